//! drover's own HTTP/1.1 client, for the pooled connections to a service's endpoints.
//!
//! hyper's client puts a task and a channel between a request and its connection: the
//! request is handed to the connection's task, which writes it, reads the answer and hands
//! that back. Here the request's own task writes the request and reads the answer, with no
//! hop: in one A/B, a minimal proxy with such a client (`bench/floor`'s `half`) took 19.6 µs
//! of CPU per request against 23.2 with hyper's (docs/benchmarks.md). hyper still serves clients, speaks HTTP/2
//! and carries upgrades.
//!
//! What it does:
//! - the request head is written with the headers as drover prepared them, and the body
//!   framed by its length when that is known and no trailers follow, else chunked (request
//!   trailers go with the last chunk);
//! - the request body is written while the answer is read, so an upstream that answers
//!   early (a 413, or a stream echoed back) is heard; the body goes on being written while
//!   the answer's body is read;
//! - interim answers (1xx) are skipped; `101` is an error here, since only upgrade requests
//!   (which do not come here) may switch protocols;
//! - an answer's framing follows RFC 9112 section 6.3, with the ambiguous cases refused:
//!   `Content-Length` beside `Transfer-Encoding`, a repeated or malformed `Content-Length`;
//! - an answer's hop-by-hop fields (`Connection` and those it names, `Transfer-Encoding`,
//!   `Keep-Alive`...) are read for what they say and left out of the head handed back, so
//!   that the caller has none to remove;
//! - a connection goes back to the pool only when its request was written whole, its answer
//!   read to its end with nothing after it, and neither side asked to close.
//!
//! A connection waiting in the pool has no task reading it: whether its upstream closed it
//! is found when it is taken out (a read that would block means it is still open), and by
//! the pool's sweep.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::forward::ReqBody;
use crate::http::{BodyError, Forwarding};
use crate::upstream::Stream;

/// The largest answer head (status line and header fields) taken from an upstream; larger
/// ones are refused with 502 (nginx refuses above `proxy_buffer_size`, 4 or 8 KB).
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in an answer head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Header fields whose places in the head are noted on the stack; more take an allocation.
pub(crate) const FEW_FIELDS: usize = 24;
// `parse_head` marks fields by place in a `u128`.
const _: () = assert!(MAX_HEADERS <= 128);
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// The first read buffer of a connection; reads that fill it grow it, up to `MAX_READ`.
const FIRST_READ: usize = 8 * 1024;
/// The most one read of an answer offers (hyper's client went up to about 400 KB).
const MAX_READ: usize = 256 * 1024;
/// Request bytes gathered before they are written.
const GATHER: usize = 64 * 1024;
/// A connection keeps its read buffer in the pool up to this size.
const KEEP_BUFFER: usize = 16 * 1024;
/// The most header names a connection remembers from its last answers (see `Names`).
const REMEMBERED_NAMES: usize = 32;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its answer was complete")]
    Closed,
    #[error("the upstream's answer is invalid: {0}")]
    Invalid(&'static str),
    #[error("the request body failed: {0}")]
    Body(BodyError),
}

fn invalid<T>(why: &'static str) -> Result<T, Error> {
    Err(Error::Invalid(why))
}

/// An open HTTP/1.1 connection to an endpoint, idle between requests.
pub(crate) struct H1Conn {
    io: Stream,
    /// Read from the upstream and not yet used.
    buf: BytesMut,
    /// How much the next read offers; doubles when a read fills it.
    read_size: usize,
    /// Set to each request's deadline. One request at a time uses the connection, and each
    /// deadline is later than the one before, so tokio moves the timer in place (an atomic
    /// store) instead of taking it out of its timer wheel and putting it back. Made by the
    /// first request.
    deadline: Option<Pin<Box<Sleep>>>,
    /// It carried a request before the current one.
    used: bool,
    /// The upstream has sent something since the current request began.
    heard: bool,
    /// The buffer requests are written from, kept between requests: no allocation for each.
    out_buf: BytesMut,
    /// The header names of its last answers.
    names: Names,
}

impl std::fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// What sending a request came to.
pub(crate) enum Sent {
    /// The answer's head; its body follows in the `H1Body`, which holds the connection.
    Answer(Response<H1Body>),
    /// No usable answer came. `resend` when the connection had carried a request before and
    /// the upstream closed it with no byte of an answer: the race between an upstream's idle
    /// close and a request (see `forward`).
    Failed { error: Error, resend: bool },
    /// The deadline passed before the answer's head.
    TimedOut,
}

impl H1Conn {
    pub(crate) fn new(io: Stream) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            deadline: None,
            used: false,
            heard: false,
            out_buf: BytesMut::new(),
            names: Names::default(),
        })
    }

    /// Whether an idle connection can take a request: its upstream has neither closed it
    /// nor sent anything (an idle connection has nothing to say). Never waits.
    pub(crate) fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut read = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut read)
            .is_pending()
    }

    /// Sends `req` and waits until `until` at most for the answer's head. The request's head
    /// comes back with what became of it, for another try to send again without a copy.
    ///
    /// Not an `async fn`, which would keep `req` in the future beside its parts and the
    /// bytes being written: every request's future would be larger and more to copy.
    pub(crate) fn send(
        mut self: Box<Self>,
        req: Request<ReqBody>,
        until: Instant,
        forwarding: Option<Forwarding<'_>>,
    ) -> impl Future<Output = (Sent, http::request::Parts)> {
        let at = tokio::time::Instant::from_std(until);
        match &mut self.deadline {
            Some(d) => d.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        let reused = std::mem::replace(&mut self.used, true);
        self.heard = false;
        let head_only = req.method() == Method::HEAD;
        let (parts, body) = req.into_parts();
        let mut out = Outgoing::new(&parts, body, std::mem::take(&mut self.out_buf), forwarding);
        async move {
            let got = poll_fn(|cx| self.poll_answer(cx, &mut out, head_only)).await;
            let sent = match got {
                Ok(Some(answer)) => {
                    if out.done {
                        self.out_buf = std::mem::take(&mut out.pending);
                    }
                    let (head, body) = H1Body::new(self, answer, out);
                    Sent::Answer(Response::from_parts(head, body))
                }
                Ok(None) => Sent::TimedOut,
                Err(error) => {
                    let unanswered = reused && !self.heard;
                    let resend = unanswered && matches!(error, Error::Closed | Error::Io(_));
                    Sent::Failed { error, resend }
                }
            };
            (sent, parts)
        }
    }

    /// Writes what it can of the request, then reads until a final answer's head is in;
    /// `None` once the deadline has passed.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outgoing,
        head_only: bool,
    ) -> Poll<Result<Option<Head>, Error>> {
        out.poll_write(&mut self.io, cx)?;
        loop {
            if let Some(head) = parse_head(&mut self.buf, head_only, &mut self.names)? {
                return Poll::Ready(Ok(Some(head)));
            }
            if self.buf.len() >= MAX_HEAD {
                return Poll::Ready(invalid("its head is larger than 64 KiB"));
            }
            match self.poll_fill(cx)? {
                Poll::Ready(true) => {}
                // An upstream that stopped reading the request may have said why before
                // closing; if it did not, its write error is the cause.
                Poll::Ready(false) => {
                    return Poll::Ready(Err(out.failure.take().unwrap_or(Error::Closed)));
                }
                Poll::Pending => break,
            }
        }
        let deadline = self.deadline.as_mut().expect("set by send");
        deadline.as_mut().poll(cx).map(|()| Ok(None))
    }

    /// Reads more into the buffer; false at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let offered = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == offered && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        self.heard |= n > 0;
        Poll::Ready(Ok(n > 0))
    }

    /// Ready for the pool: large buffers are given back.
    fn rest(mut self: Box<Self>) -> Box<Self> {
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = BytesMut::new();
            self.read_size = FIRST_READ;
        }
        if self.out_buf.capacity() > KEEP_BUFFER {
            self.out_buf = BytesMut::new();
        }
        self
    }
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: an answer to HEAD, a 204 or a 304, or `Content-Length: 0`.
    Empty,
    /// `Content-Length`.
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A final answer's head, without its hop-by-hop fields, and what it says about what
/// follows it.
struct Head {
    parts: http::response::Parts,
    framing: Framing,
    /// The connection cannot be used again after this answer.
    close: bool,
}

/// Where a header field lies in the head: the start and end of its name, then of its value.
type Span = [u32; 4];

/// The header names of a connection's last answers, by their place in the head, each as it
/// was written and as parsed. An upstream tends to send the same fields in the same order
/// in every answer, so a name written as the one in its place before is taken from here:
/// a comparison of bytes instead of a parse (about 150 instructions each, with an
/// allocation for a name the `http` crate does not know).
#[derive(Default)]
pub(crate) struct Names(Vec<(Box<[u8]>, HeaderName)>);

impl Names {
    /// The name written `raw`, the `place`th of its head; `None` if it is not a valid name.
    pub(crate) fn get(&mut self, place: usize, raw: &[u8]) -> Option<HeaderName> {
        if let Some((seen, name)) = self.0.get(place)
            && **seen == *raw
        {
            return Some(name.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        let entry = (Box::from(raw), name.clone());
        if let Some(slot) = self.0.get_mut(place) {
            *slot = entry;
        } else if place == self.0.len() && place < REMEMBERED_NAMES {
            self.0.push(entry);
        }
        Some(name)
    }
}

/// Room for `count` notes on a head's fields: on the stack for the usual few (`few` is cleared
/// at every head, so it is kept small), else in `many`.
pub(crate) fn field_room<'a, T: Copy + Default>(
    few: &'a mut [T; FEW_FIELDS],
    many: &'a mut Vec<T>,
    count: usize,
) -> &'a mut [T] {
    if count <= FEW_FIELDS {
        &mut few[..count]
    } else {
        many.resize(count, T::default());
        many
    }
}

/// Takes a final answer's head off the front of `buf`, skipping interim (1xx) answers;
/// `None` while it is incomplete.
fn parse_head(
    buf: &mut BytesMut,
    head_only: bool,
    names: &mut Names,
) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised: 100 fields are 3.2 KB to clear, at every read of a head.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Complete(_)) => {
                return invalid("its head is larger than 64 KiB");
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return invalid("its head has more than 100 header fields");
            }
            Err(_) => return invalid("its head is malformed"),
        };
        let Ok(status) = StatusCode::from_u16(res.code.unwrap_or(0)) else {
            return invalid("its status code is out of range");
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return invalid("it switched protocols, which the request did not ask for");
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let mut length = None;
        let mut chunked = None;
        let mut close = res.version != Some(1);
        let head_range = buf.as_ptr() as usize..buf.as_ptr() as usize + len;
        // Where a slice of the head lies in it; an empty one may lie anywhere.
        let at = |s: &[u8]| -> [u32; 2] {
            let start = s.as_ptr() as usize;
            if s.is_empty() || !head_range.contains(&start) {
                return [0, 0];
            }
            let from = (start - head_range.start) as u32;
            [from, from + s.len() as u32]
        };
        let count = res.headers.len();
        let (mut few, mut many): ([Span; FEW_FIELDS], Vec<Span>) =
            ([[0; 4]; FEW_FIELDS], Vec::new());
        let spans = field_room(&mut few, &mut many, count);
        // The fields left out of the answer handed back, by place: hop-by-hop ones.
        let mut hop: u128 = 0;
        // Connection names fields besides its options `close` and `keep-alive`.
        let mut names_fields = false;
        for (i, (field, span)) in res.headers.iter().zip(spans.iter_mut()).enumerate() {
            let name = field.name.as_bytes();
            if hop_by_hop(name) {
                hop |= 1 << i;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                if length.is_some() {
                    return invalid("it has more than one Content-Length");
                }
                length = Some(parse_length(field.value)?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // The last coding of the last field decides.
                let last = field.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                close |= has_token(field.value, b"close");
                names_fields |= tokens(field.value).any(|t| {
                    !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
                });
            }
            let ([a, b], [c, d]) = (at(name), at(field.value));
            *span = [a, b, c, d];
        }
        if names_fields {
            // Rare: the fields Connection names go too (RFC 9110 section 7.6.1), but Trailer,
            // which says what trailers follow.
            let named: Vec<&[u8]> = res
                .headers
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case("connection"))
                .flat_map(|f| tokens(f.value))
                .collect();
            for (i, field) in res.headers.iter().enumerate() {
                let name = field.name.as_bytes();
                if !name.eq_ignore_ascii_case(b"trailer")
                    && named.iter().any(|t| t.eq_ignore_ascii_case(name))
                {
                    hop |= 1 << i;
                }
            }
        }
        let framing = if head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(_), Some(_)) => {
                    return invalid("it has both Content-Length and Transfer-Encoding");
                }
                (Some(true), None) => Framing::Chunked,
                (Some(false), None) | (None, None) => Framing::UntilClose,
                (None, Some(0)) => Framing::Empty,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        // The values stay slices of the head, kept as shared bytes: no copy of each.
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count - hop.count_ones() as usize);
        for (place, &[a, b, c, d]) in spans.iter().enumerate() {
            if hop & (1 << place) != 0 {
                continue;
            }
            let (Some(name), Ok(value)) = (
                names.get(place, &head[a as usize..b as usize]),
                HeaderValue::from_maybe_shared(head.slice(c as usize..d as usize)),
            ) else {
                return invalid("a header field is malformed");
            };
            headers.append(name, value);
        }
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        return Ok(Some(Head {
            parts,
            framing,
            close: close || framing == Framing::UntilClose,
        }));
    }
}

pub(crate) fn parse_length(value: &[u8]) -> Result<u64, Error> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return invalid("its Content-Length is not a number");
    }
    Ok(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// The items of a comma-separated field value, trimmed, empty ones left out.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a field describes the connection rather than the message (RFC 9110 section
/// 7.6.1, and the older `Keep-Alive` and `Proxy-Connection`): such fields are not handed on.
/// `Trailer` is not among them: it names the trailers that follow.
fn hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// The request on its way: bytes to write, then the rest of its body.
struct Outgoing {
    pending: BytesMut,
    body: Option<ReqBody>,
    chunked: bool,
    /// Body bytes still owed under a `Content-Length`.
    owed: u64,
    /// All of it written and flushed, or given up.
    done: bool,
    /// Why the writing was given up; the connection cannot be used again.
    failure: Option<Error>,
}

impl Outgoing {
    /// `pending` is the connection's buffer, empty: the head is written into it, with the
    /// forwarding headers if they are not in `parts`' map.
    fn new(
        parts: &http::request::Parts,
        body: ReqBody,
        mut pending: BytesMut,
        forwarding: Option<Forwarding<'_>>,
    ) -> Self {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        // Written out, its room comes back to the front without an allocation.
        pending.clear();
        pending.reserve(512);
        pending.put_slice(parts.method.as_str().as_bytes());
        pending.put_u8(b' ');
        pending.put_slice(target.as_bytes());
        pending.put_slice(b" HTTP/1.1\r\n");
        let (mut announced, mut trailer_named) = (false, false);
        let (mut host, mut prior_for) = (None, false);
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                announced = true;
                continue;
            } else if name == header::TRAILER {
                trailer_named = true;
                continue;
            } else if name == header::HOST {
                // Kept, and its first value is X-Forwarded-Host's, as `get` would give.
                host.get_or_insert(value);
            } else if forwarding.is_some()
                && let Some(is_for) = Forwarding::replaces(name)
            {
                prior_for |= is_for;
                continue;
            }
            put_field(&mut pending, name, value);
        }
        if let Some(forwarding) = forwarding {
            forwarding.write(&mut pending, &parts.headers, host, prior_for);
        }
        let trailers = body.trailers_follow(trailer_named);
        if trailers {
            for value in parts.headers.get_all(header::TRAILER) {
                put_field(&mut pending, &header::TRAILER, value);
            }
        }
        let (chunked, owed) = match body.size_hint().exact() {
            // Trailers need the chunked coding, even when the length is known.
            Some(_) if trailers => (true, 0),
            Some(0) if !announced => (false, 0),
            Some(n) => {
                let _ = write!(pending, "content-length: {n}\r\n");
                (false, n)
            }
            None => (true, 0),
        };
        if chunked {
            pending.put_slice(b"transfer-encoding: chunked\r\n");
        }
        pending.put_slice(b"\r\n");
        Self {
            pending,
            body: (chunked || owed > 0).then_some(body),
            chunked,
            owed,
            done: false,
            failure: None,
        }
    }

    /// Writes what it can. A body that fails ends the exchange; a connection that fails
    /// only stops the writing, since the upstream may have answered before it stopped
    /// reading (`failure` keeps the cause).
    fn poll_write(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Result<(), Error> {
        while !self.done {
            // What the body has ready goes behind what is pending, so that a small request
            // goes out in one write.
            if let Some(body) = self.body.as_mut()
                && self.pending.len() < GATHER
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        match frame.into_data() {
                            Ok(data) => self.put_data(&data)?,
                            Err(frame) => {
                                if let Ok(trailers) = frame.into_trailers() {
                                    self.put_end(Some(&trailers))?;
                                }
                            }
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.put_end(None)?;
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return Err(Error::Body(e)),
                    Poll::Pending => {}
                }
            }
            if !self.pending.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &self.pending) {
                    Poll::Ready(Ok(0)) => self.give_up(Error::Closed),
                    Poll::Ready(Ok(n)) => self.pending.advance(n),
                    Poll::Ready(Err(e)) => self.give_up(e.into()),
                    Poll::Pending => return Ok(()),
                }
            } else if self.body.is_some() {
                // Waiting for the body: what was written goes out meanwhile (TLS may hold it).
                if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                    self.give_up(e.into());
                    continue;
                }
                return Ok(());
            } else {
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.done = true,
                    Poll::Ready(Err(e)) => self.give_up(e.into()),
                    Poll::Pending => return Ok(()),
                }
            }
        }
        Ok(())
    }

    fn give_up(&mut self, why: Error) {
        self.done = true;
        self.body = None;
        self.failure.get_or_insert(why);
    }

    fn put_data(&mut self, data: &[u8]) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let _ = write!(self.pending, "{:x}\r\n", data.len());
            self.pending.put_slice(data);
            self.pending.put_slice(b"\r\n");
            return Ok(());
        }
        if data.len() as u64 > self.owed {
            return Err(Error::Body("it is longer than its Content-Length".into()));
        }
        self.owed -= data.len() as u64;
        self.pending.put_slice(data);
        Ok(())
    }

    /// The body's end: the last chunk with the trailers, if chunked.
    fn put_end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Error> {
        self.body = None;
        if !self.chunked {
            if self.owed > 0 {
                return Err(Error::Body("it is shorter than its Content-Length".into()));
            }
            return Ok(());
        }
        self.pending.put_slice(b"0\r\n");
        for (name, value) in trailers.into_iter().flatten() {
            // Never framing in a trailer section (RFC 9110 section 6.5.1).
            if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
                put_field(&mut self.pending, name, value);
            }
        }
        self.pending.put_slice(b"\r\n");
        Ok(())
    }
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

/// An answer's body, read from its connection; the request's body goes on being written
/// meanwhile if it is not all out yet. Holds the connection until the pool takes it back.
pub(crate) struct H1Body {
    conn: Option<Box<H1Conn>>,
    reading: Reading,
    /// The rest of the request, when it was not all written by the answer's head (boxed:
    /// the answer's body is moved about, and this is rare).
    out: Option<Box<Outgoing>>,
    /// The connection cannot be used again: the answer said so, or the request failed.
    close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Bytes still to come under a `Content-Length`.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line comes next.
    Size,
    /// Bytes left of the chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
    /// After the trailer section.
    Finished,
}

/// What the chunked decoder made of the buffer.
enum Step {
    Frame(Frame<Bytes>),
    /// It needs more bytes.
    More,
    End,
}

impl H1Body {
    fn new(conn: Box<H1Conn>, head: Head, out: Outgoing) -> (http::response::Parts, Self) {
        let reading = match head.framing {
            Framing::Empty => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(Chunk::Size),
            Framing::UntilClose => Reading::UntilClose,
        };
        let body = Self {
            conn: Some(conn),
            reading,
            close: head.close || out.failure.is_some(),
            out: (!out.done).then(|| Box::new(out)),
        };
        (head.parts, body)
    }

    /// The connection, when this answer has been read to its end and the connection can
    /// take another request.
    pub(crate) fn take_reusable(&mut self) -> Option<Box<H1Conn>> {
        let reusable = self.reading == Reading::Done
            && !self.close
            && self.out.is_none()
            && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if reusable {
            self.conn.take().map(H1Conn::rest)
        } else {
            None
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(out) = &mut self.out {
            if let Err(e) = out.poll_write(&mut conn.io, cx) {
                // The answer is under way: the request's failure only spoils the connection.
                tracing::debug!("the request failed after the answer's head: {e}");
                out.give_up(e);
            }
            if out.done {
                self.close |= out.failure.is_some();
                self.out = None;
            }
        }
        loop {
            let frame = match &mut self.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Length(0) => {
                    self.reading = Reading::Done;
                    continue;
                }
                Reading::Length(left) if !conn.buf.is_empty() => {
                    let n = (*left).min(conn.buf.len() as u64);
                    *left -= n;
                    Frame::data(conn.buf.split_to(n as usize).freeze())
                }
                Reading::UntilClose if !conn.buf.is_empty() => {
                    Frame::data(conn.buf.split().freeze())
                }
                Reading::Chunked(chunk) => match step(&mut conn.buf, chunk)? {
                    Step::Frame(f) => f,
                    Step::End => {
                        self.reading = Reading::Done;
                        continue;
                    }
                    Step::More => match std::task::ready!(conn.poll_fill(cx))? {
                        true => continue,
                        false => return Poll::Ready(Some(Err(Error::Closed))),
                    },
                },
                Reading::Length(_) | Reading::UntilClose => {
                    match std::task::ready!(conn.poll_fill(cx))? {
                        true => continue,
                        false if self.reading == Reading::UntilClose => {
                            self.reading = Reading::Done;
                            self.close = true;
                            continue;
                        }
                        false => return Poll::Ready(Some(Err(Error::Closed))),
                    }
                }
            };
            if let Reading::Length(0) = self.reading {
                self.reading = Reading::Done;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }
}

/// One step of the chunked decoder over `buf`.
fn step(buf: &mut BytesMut, chunk: &mut Chunk) -> Result<Step, Error> {
    loop {
        match chunk {
            Chunk::Size => {
                // The same limit whether the line came whole or in pieces.
                let eol = buf.windows(2).position(|w| w == b"\r\n");
                if eol.unwrap_or(buf.len()) > MAX_CHUNK_LINE {
                    return invalid("a chunk-size line is too long");
                }
                let Some(eol) = eol else {
                    return Ok(Step::More);
                };
                let line = &buf[..eol];
                let digits = line
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii_end();
                if digits.is_empty() || digits.len() > 15 {
                    return invalid("a chunk size is missing or too large");
                }
                let mut size = 0u64;
                for d in digits {
                    let Some(v) = (*d as char).to_digit(16) else {
                        return invalid("a chunk size is not hexadecimal");
                    };
                    size = size * 16 + u64::from(v);
                }
                buf.advance(eol + 2);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Ok(Step::Frame(Frame::data(buf.split_to(n as usize).freeze())));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return invalid("a chunk's data is not followed by CRLF");
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (len, map) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, _))) if len > MAX_HEAD => {
                        return invalid("its trailer section is larger than 64 KiB");
                    }
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut map = HeaderMap::new();
                        for f in fields.iter() {
                            let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) else {
                                return invalid("a trailer field is malformed");
                            };
                            map.append(name, value);
                        }
                        (len, map)
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        return invalid("its trailer section is larger than 64 KiB");
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(_) => return invalid("its trailer section is malformed"),
                };
                buf.advance(len);
                *chunk = Chunk::Finished;
                if !map.is_empty() {
                    return Ok(Step::Frame(Frame::trailers(map)));
                }
            }
            Chunk::Finished => return Ok(Step::End),
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.get_mut().poll_body(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.reading == Reading::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// For fuzzing (`fuzz/fuzz_targets/upstream_http1.rs`): an upstream's whole answer to a GET,
/// read the way drover reads it. Its status and body, or `None` when drover refuses it or it
/// is incomplete.
pub fn fuzz_upstream_answer(data: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut buf = BytesMut::from(data);
    let head = parse_head(&mut buf, false, &mut Names::default()).ok()??;
    let body = match head.framing {
        Framing::Empty => Vec::new(),
        Framing::Length(n) => buf.get(..usize::try_from(n).ok()?)?.to_vec(),
        Framing::UntilClose => buf.to_vec(),
        Framing::Chunked => {
            let mut chunk = Chunk::Size;
            let mut out = Vec::new();
            loop {
                match step(&mut buf, &mut chunk).ok()? {
                    Step::Frame(f) => {
                        if let Ok(d) = f.into_data() {
                            out.extend_from_slice(&d);
                        }
                    }
                    Step::More => return None,
                    Step::End => break out,
                }
            }
        }
    };
    Some((head.parts.status.as_u16(), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::KeptBody;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Feeds `wire` to the chunked decoder split at `at`, and returns the data and trailers.
    fn decode_split(wire: &[u8], at: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut buf = BytesMut::new();
        let mut chunk = Chunk::Size;
        let mut data = Vec::new();
        let mut trailers = None;
        let mut parts = [&wire[..at], &wire[at..]].into_iter();
        loop {
            match step(&mut buf, &mut chunk)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Step::End => return Ok((data, trailers)),
                Step::More => match parts.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(Error::Closed),
                },
            }
        }
    }

    #[test]
    fn a_chunked_body_split_anywhere_decodes_to_its_data_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nx-sum: 42\r\n\r\n";
        for at in 0..=wire.len() {
            let (data, trailers) = decode_split(wire, at).unwrap();
            assert_eq!(data, b"hello world!", "split at {at}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-sum"], "42", "split at {at}");
        }
        let (data, trailers) = decode_split(b"0\r\n\r\n", 2).unwrap();
        assert!(data.is_empty() && trailers.is_none());
    }

    #[test]
    fn bad_chunks_are_refused() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"\r\n",
            b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            let e = decode_split(wire, wire.len()).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{wire:?}: {e}");
        }
    }

    /// What decoding came to, comparable: the data and trailers, or the kind of error.
    type Decoded = Result<(Vec<u8>, Vec<(String, String)>), String>;

    fn outcome(wire: &[u8], at: usize) -> Decoded {
        match decode_split(wire, at) {
            Ok((data, trailers)) => Ok((
                data,
                trailers
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect(),
            )),
            Err(Error::Invalid(why)) => Err(why.to_string()),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    /// Random damage to valid chunked bodies: however the bytes arrive, split in two
    /// anywhere, the decoder comes to the same data and trailers, or the same error.
    #[test]
    fn damaged_chunked_bodies_decode_alike_however_they_arrive() {
        let seeds: [&[u8]; 3] = [
            b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nx-sum: 42\r\n\r\n",
            b"a\r\n0123456789\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let alphabet = b"0123456789abcdefxz;:= \r\n";
        let (mut decoded, mut refused) = (0, 0);
        for round in 0..3000 {
            let mut wire = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + next(3) {
                let at = next(wire.len());
                match next(3) {
                    0 => wire[at] = alphabet[next(alphabet.len())],
                    1 => wire.insert(at, alphabet[next(alphabet.len())]),
                    _ => {
                        wire.remove(at);
                    }
                }
            }
            let whole = outcome(&wire, wire.len());
            for at in 0..wire.len() {
                assert_eq!(
                    outcome(&wire, at),
                    whole,
                    "{:?} split at {at}",
                    String::from_utf8_lossy(&wire)
                );
            }
            match whole {
                Ok(_) => decoded += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(
            decoded > 100 && refused > 100,
            "{decoded} decoded, {refused} refused"
        );
    }

    fn head_of(wire: &[u8], head_only: bool) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(wire), head_only, &mut Names::default())
    }

    #[test]
    fn the_framing_follows_the_head() {
        let framing = |wire: &[u8]| head_of(wire, false).unwrap().unwrap().framing;
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
            Framing::Length(12)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            framing(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n"),
            Framing::Empty
        );
        let head = head_of(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Empty, "an answer to HEAD");
        assert_eq!(
            head.parts.headers["content-length"], "7",
            "kept for the client"
        );
    }

    #[test]
    fn names_taken_from_earlier_answers_are_the_ones_written() {
        // One connection's answers, as `H1Conn` reads them: fields that come back in their
        // place, change case, move, or go.
        type Fields = &'static [(&'static str, &'static str)];
        let answers: [(&[u8], Fields); 4] = [
            (
                b"HTTP/1.1 200 OK\r\nX-Trace: 1\r\nContent-Length: 0\r\n\r\n",
                &[("x-trace", "1"), ("content-length", "0")],
            ),
            (
                b"HTTP/1.1 200 OK\r\nx-trace: 2\r\nContent-Length: 0\r\n\r\n",
                &[("x-trace", "2"), ("content-length", "0")],
            ),
            (
                b"HTTP/1.1 200 OK\r\nX-Other: 3\r\ncontent-length: 0\r\nX-Trace: 4\r\n\r\n",
                &[("x-other", "3"), ("content-length", "0"), ("x-trace", "4")],
            ),
            (
                b"HTTP/1.1 204 No Content\r\nX-Trace: 5\r\n\r\n",
                &[("x-trace", "5")],
            ),
        ];
        let mut names = Names::default();
        for (wire, want) in answers {
            let head = parse_head(&mut BytesMut::from(wire), false, &mut names)
                .unwrap()
                .unwrap();
            let got: Vec<(&str, &str)> = head
                .parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
                .collect();
            assert_eq!(got, want, "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_left_out_but_trailer() {
        let fields = |wire: &[u8]| -> Vec<String> {
            let head = head_of(wire, false).unwrap().unwrap();
            head.parts.headers.keys().map(|k| k.to_string()).collect()
        };
        assert_eq!(
            fields(b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nProxy-Authorization: x\r\nTrailer: x-sum\r\n\r\n"),
            ["server", "trailer"]
        );
        assert_eq!(
            fields(b"HTTP/1.1 200 OK\r\nX-Secret: 1\r\nConnection: close, , X-Secret\r\nx-kept: 1\r\nconnection: trailer, x-other\r\nX-Other: 2\r\ntrailer: x-sum\r\ncontent-length: 0\r\n\r\n"),
            ["x-kept", "trailer", "content-length"]
        );
    }

    #[test]
    fn interim_answers_are_skipped_and_close_is_heard() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nconnection: keep-alive, close\r\nx-empty:\r\ncontent-length: 2\r\n\r\nokNEXT"[..],
        );
        let head = parse_head(&mut buf, false, &mut Names::default())
            .unwrap()
            .unwrap();
        assert_eq!(head.parts.status, StatusCode::CREATED);
        assert_eq!(head.parts.headers["x-empty"], "");
        assert!(head.close);
        assert_eq!(&buf[..], b"okNEXT", "the body and what follows stay");
        let old = head_of(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(old.close, "HTTP/1.0 answers end their connection");
        assert!(
            head_of(b"HTTP/1.1 200 OK\r\ncontent-len", false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
        ] {
            let e = head_of(wire, false).err();
            assert!(
                matches!(e, Some(Error::Invalid(_))),
                "{}: {e:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    /// A connection to a peer that reads one request and answers with `answer`; the peer
    /// hands back what it read.
    async fn exchange(
        req: Request<ReqBody>,
        answer: &'static [u8],
    ) -> (Sent, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Reads until the request has gone quiet, then answers.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            got
        });
        let stream = Stream::Plain(TcpStream::connect(addr).await.unwrap());
        let (sent, _) = H1Conn::new(stream)
            .send(req, Instant::now() + Duration::from_secs(5), None)
            .await;
        (sent, peer)
    }

    fn answer(sent: Sent) -> Response<H1Body> {
        match sent {
            Sent::Answer(response) => response,
            Sent::Failed { error, .. } => panic!("no answer: {error}"),
            Sent::TimedOut => panic!("no answer in time"),
        }
    }

    fn request(method: &str, body: &'static [u8], trailers: Option<HeaderMap>) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Bytes(KeptBody::new(
            &Bytes::from_static(body),
            &trailers,
        )));
        *req.method_mut() = method.parse().unwrap();
        *req.uri_mut() = "/p?q=1".parse().unwrap();
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.test"));
        req
    }

    #[tokio::test]
    async fn a_request_is_written_with_its_framing_and_the_answer_read_to_its_end() {
        let (sent, peer) = exchange(
            request("POST", b"hello", None),
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nworld",
        )
        .await;
        let response = answer(sent);
        assert_eq!(response.headers()["x-a"], "1");
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            data.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(data, b"world");
        assert!(
            body.take_reusable().is_some(),
            "the connection can go again"
        );
        assert_eq!(
            String::from_utf8(peer.await.unwrap()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.test\r\ncontent-length: 5\r\n\r\nhello"
        );
    }

    #[tokio::test]
    async fn request_trailers_go_with_the_last_chunk() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        let (sent, peer) = exchange(
            request("PUT", b"data", Some(trailers)),
            b"HTTP/1.1 204 No Content\r\n\r\n",
        )
        .await;
        let response = answer(sent);
        assert!(response.body().is_end_stream());
        assert_eq!(
            String::from_utf8(peer.await.unwrap()).unwrap(),
            "PUT /p?q=1 HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\nx-checksum: abc\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error_and_the_connection_is_not_reused() {
        let (sent, _peer) = exchange(
            request("GET", b"", None),
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        )
        .await;
        let response = answer(sent);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "short");
        assert!(matches!(body.frame().await, Some(Err(Error::Closed))));
        assert!(body.take_reusable().is_none());
    }

    #[tokio::test]
    async fn an_idle_connection_its_upstream_closed_is_not_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conn = H1Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
        let (peer, _) = listener.accept().await.unwrap();
        assert!(conn.is_open());
        drop(peer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!conn.is_open());
    }
}
