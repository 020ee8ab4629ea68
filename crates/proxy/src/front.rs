//! drover's own HTTP/1.1 server, for the requests most clients send: HTTP/1.1, without a body
//! or with a small one that comes with the head. Whatever else comes on the connection is left
//! to hyper.
//!
//! hyper's server costs drover about a third of its instructions per request: a dispatcher
//! that loops over reading, the service and writing, a boxed request future, and its own
//! head parsing and encoding (docs/benchmarks.md). Here the connection's task reads the head,
//! calls [`crate::http::handle`] and writes the answer with nothing in between.
//!
//! What it takes: a complete HTTP/1.1 head whose method is not HEAD or CONNECT, that has no
//! `Transfer-Encoding`, `Expect`, `Upgrade` or `TE`, whose `Connection` says only `close` or
//! `keep-alive`, and that has either no `Content-Length` or one (in plain digits) whose body
//! has all been read with the head: a POST of a few kilobytes usually comes in one segment.
//! Any other head, a malformed one, one with more fields than the listener allows or larger
//! than its `max_header_bytes`, or one whose body is still to come, goes to hyper unread
//! ([`Outcome::Handover`]): the rules for streamed bodies, upgrades and errors stay hyper's.
//!
//! The answer is written as hyper would write it, so that a client cannot tell which of the
//! two served it: the same status line, the fields in the same order, the same framing
//! (`Content-Length` when the body's length is known, else chunked), a `Date` when there is
//! none, and `Connection: close` when the connection closes after it. As with hyper, the
//! client's going away while the answer is awaited drops the request (counted as 499), and
//! trailers are not sent (hyper sends them only to a client that asked with `TE: trailers`).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::ConnCtx;
use crate::h1::{FEW_FIELDS, Names, field_room, has_token, parse_length, tokens};
use crate::http::{RequestBody, ResponseBody};

/// The most header fields parsed here: hyper's default, and the size of the stack array the
/// parser fills. A head with more goes to hyper, which applies the listener's own limit.
const MAX_FIELDS: usize = 100;
/// The read buffer's first size; it grows up to the listener's `max_header_bytes`.
const FIRST_READ: usize = 4096;
/// Room made for an answer's head before it is written (most heads take a few hundred bytes).
const HEAD_ROOM: usize = 1024;
/// Answer bytes gathered before they are written.
const GATHER: usize = 64 * 1024;
/// Body data up to this size is copied behind the head into one buffer; larger pieces are
/// written from where they are.
const COPY_UNDER: usize = 16 * 1024;

/// How serving a connection with this server ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The connection is over: the client closed it, an answer said `Connection: close`, or a
    /// write failed.
    Closed,
    /// Asked to finish ([`serve`]'s `finish`) while no request was under way: the stream is
    /// free, with nothing read from it.
    Idle,
    /// A request this server does not take: its bytes are handed back to be read again
    /// (hyper's turn).
    Handover(Bytes),
}

/// A listener's limits on request heads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// `max_header_bytes`: a larger head is left to hyper, which refuses it.
    pub head_bytes: usize,
    /// `max_header_count`.
    pub fields: usize,
}

/// Serves requests on `io` until the connection ends, `finish` is set while it waits for a
/// request, or a request comes that hyper must serve.
pub(crate) async fn serve<IO>(
    io: &mut IO,
    ctx: &Arc<ConnCtx>,
    finish: &AtomicBool,
    limits: Limits,
) -> Outcome
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        io,
        buf: BytesMut::new(),
        names: Names::default(),
        out: Outbox::default(),
    };
    loop {
        let head = loop {
            if !conn.buf.is_empty() {
                match parse(&mut conn.buf, limits, &mut conn.names) {
                    Parsed::Request(head) => break head,
                    Parsed::Partial if conn.buf.len() < limits.head_bytes => {}
                    Parsed::Partial | Parsed::Other => {
                        return Outcome::Handover(conn.buf.split().freeze());
                    }
                }
            }
            match poll_fn(|cx| conn.poll_more(cx, finish)).await {
                Read::More => {}
                Read::Finish => return Outcome::Idle,
                Read::End => return Outcome::Closed,
            }
        };
        let Head { request, close } = head;
        let mut answer = pin!(crate::http::handle(ctx.clone(), request));
        // As hyper: a client that goes away before its answer cancels its request.
        let response = poll_fn(|cx| {
            if let Poll::Ready(Ok(response)) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            match conn.poll_gone(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let Some(response) = response else {
            return Outcome::Closed;
        };
        let keep_alive = !close && !finish.load(Ordering::Relaxed);
        match conn.answer(response, keep_alive).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return Outcome::Closed,
        }
        if !conn.buf.is_empty() {
            // The next request began while this one was answered: its head is under way, and
            // the header deadline, not the idle one, applies.
            ctx.on_read();
        }
    }
}

/// A connection's state between its requests.
struct Conn<'a, IO> {
    io: &'a mut IO,
    /// Read from the client and not yet used.
    buf: BytesMut,
    /// The header names of its last requests: a client sends the same fields in the same
    /// order request after request.
    names: Names,
    out: Outbox,
}

/// What a poll of an answer's body came to.
enum Polled {
    Frame(Option<Result<http_body::Frame<Bytes>, crate::http::BodyError>>),
    /// Nothing yet, and answer bytes are waiting to be written.
    Wait,
    /// The client went away.
    Gone,
}

/// What a read for the next request came to.
enum Read {
    More,
    /// Asked to finish, with nothing of a request read.
    Finish,
    /// The client closed the connection, or it failed.
    End,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<'_, IO> {
    /// Reads more of the next request.
    fn poll_more(&mut self, cx: &mut Context<'_>, finish: &AtomicBool) -> Poll<Read> {
        if self.buf.is_empty() && finish.load(Ordering::Relaxed) {
            return Poll::Ready(Read::Finish);
        }
        if self.buf.capacity() - self.buf.len() < FIRST_READ / 4 {
            self.buf.reserve(FIRST_READ);
        }
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self.io),
            cx,
            &mut self.buf
        )) {
            Ok(0) | Err(_) => Poll::Ready(Read::End),
            Ok(_) => Poll::Ready(Read::More),
        }
    }

    /// Ready if the client has closed the connection (or it failed) while a request is under
    /// way. Bytes that come meanwhile (the next request) are kept, and then nothing more is
    /// read until the answer is out.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.buf.is_empty() {
            return Poll::Pending;
        }
        self.buf.reserve(FIRST_READ);
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self.io),
            cx,
            &mut self.buf
        )) {
            Ok(0) | Err(_) => Poll::Ready(()),
            Ok(_) => Poll::Pending,
        }
    }

    /// Writes an answer, its body to the end. Whether the connection may carry another
    /// request after it.
    async fn answer(
        &mut self,
        response: Response<ResponseBody>,
        keep_alive: bool,
    ) -> io::Result<bool> {
        let (mut parts, body) = response.into_parts();
        let length = (!body.is_end_stream()).then(|| body.size_hint().exact());
        // Room for the head and a small body at once: a connection's outbox starts empty,
        // and growing it piece by piece took five reallocations for a 1 KiB answer.
        let copied = match length {
            Some(Some(n)) if n < COPY_UNDER as u64 => n as usize,
            _ => 0,
        };
        self.out.tail.reserve(HEAD_ROOM + copied);
        let Ok((mut framing, last)) =
            encode_head(&mut self.out.tail, &mut parts, length, keep_alive)
        else {
            // hyper, given an answer it cannot frame, writes nothing and closes.
            self.out.clear();
            return Ok(false);
        };
        // Dropped, and so counted, before the last bytes go out, as hyper does.
        let mut body = (framing != Framing::Length(0)).then_some(body);
        while let Some(b) = &mut body {
            if self.out.len() >= GATHER {
                self.flush().await?;
            }
            let polled = poll_fn(|cx| match Pin::new(&mut *b).poll_frame(cx) {
                // Nothing more for now: what is gathered goes out while the body waits.
                Poll::Pending if !self.out.is_empty() => Poll::Ready(Polled::Wait),
                Poll::Pending => match self.poll_gone(cx) {
                    Poll::Ready(()) => Poll::Ready(Polled::Gone),
                    Poll::Pending => Poll::Pending,
                },
                Poll::Ready(frame) => Poll::Ready(Polled::Frame(frame)),
            })
            .await;
            match polled {
                Polled::Wait => self.flush().await?,
                Polled::Gone => return Ok(false),
                Polled::Frame(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.out.put_data(data, &mut framing);
                    }
                    if b.is_end_stream() || framing == Framing::Length(0) {
                        body = None;
                    }
                }
                Polled::Frame(None) => body = None,
                Polled::Frame(Some(Err(_))) => {
                    // The upstream broke off: what came goes out, then the connection closes
                    // without the end of the framing, so that the client sees the answer cut.
                    self.flush().await?;
                    return Ok(false);
                }
            }
        }
        if framing == Framing::Chunked {
            self.out.tail.put_slice(b"0\r\n\r\n");
        }
        self.flush().await?;
        Ok(!last)
    }

    /// Writes out everything gathered.
    async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.out.poll_write(&mut *self.io, cx)).await
    }
}

/// Answer bytes waiting to be written: pieces of body data too large to copy, and behind them
/// the tail the head and small data are copied into.
#[derive(Default)]
struct Outbox {
    pieces: std::collections::VecDeque<Bytes>,
    tail: BytesMut,
}

impl Outbox {
    fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum::<usize>() + self.tail.len()
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.tail.is_empty()
    }

    fn clear(&mut self) {
        self.pieces.clear();
        self.tail.clear();
    }

    /// Adds a piece of body data in the answer's framing.
    fn put_data(&mut self, data: Bytes, framing: &mut Framing) {
        match framing {
            Framing::Length(left) => *left = left.saturating_sub(data.len() as u64),
            Framing::Chunked => {
                let mut size = [0u8; 16];
                let n = hex(data.len(), &mut size);
                self.tail.put_slice(&size[..n]);
                self.tail.put_slice(b"\r\n");
            }
        }
        if data.len() < COPY_UNDER {
            self.tail.put_slice(&data);
        } else {
            if !self.tail.is_empty() {
                self.pieces.push_back(self.tail.split().freeze());
            }
            self.pieces.push_back(data);
        }
        if *framing == Framing::Chunked {
            self.tail.put_slice(b"\r\n");
        }
    }

    fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let n = if self.pieces.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.tail))?
            } else {
                let mut slices = [IoSlice::new(&[]); 16];
                let mut count = 0;
                for piece in self.pieces.iter().take(slices.len() - 1) {
                    slices[count] = IoSlice::new(piece);
                    count += 1;
                }
                slices[count] = IoSlice::new(&self.tail);
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..=count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        // The tail's buffer stays for the next answer.
        self.tail.clear();
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.pieces.front_mut() {
                Some(piece) if piece.len() <= n => {
                    n -= piece.len();
                    self.pieces.pop_front();
                }
                Some(piece) => {
                    piece.advance(n);
                    return;
                }
                None => {
                    self.tail.advance(n);
                    return;
                }
            }
        }
    }
}

/// `n` in hexadecimal digits (upper case, as hyper writes chunk sizes) at the start of `out`;
/// how many.
fn hex(mut n: usize, out: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 16];
    let mut count = 0;
    loop {
        digits[count] = b"0123456789ABCDEF"[n & 0xf];
        count += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..count].iter().rev().enumerate() {
        out[i] = *d;
    }
    count
}

/// A request head, read.
struct Head {
    request: Request<RequestBody>,
    /// The client asked to close the connection after the answer.
    close: bool,
}

// Returned once per head and taken apart at once: a box would cost an allocation a request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Request(Head),
    Partial,
    /// Not one this server takes: malformed, too large, with an upgrade, or with a body that
    /// is not all here.
    Other,
}

/// Takes a request off the front of `buf`, if its head is whole and one this server takes,
/// and its body (if any) is all there.
fn parse(buf: &mut BytesMut, limits: Limits, names: &mut Names) -> Parsed {
    // Uninitialised: 100 fields are 3.2 KB to clear, at every read of a head.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let fields = &mut fields[..limits.fields.min(MAX_FIELDS)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) if len <= limits.head_bytes => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD" | "CONNECT") | None => return Parsed::Other,
        Some(other) => match Method::from_bytes(other.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Parsed::Other,
        },
    };
    let mut close = false;
    let mut length: Option<u64> = None;
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        let framed = match name.len() {
            2 => is(b"te"),
            6 => is(b"expect"),
            7 => is(b"upgrade"),
            10 if is(b"connection") => !tokens(field.value).all(|o| {
                let c = o.eq_ignore_ascii_case(b"close");
                close |= c;
                c || o.eq_ignore_ascii_case(b"keep-alive")
            }),
            // One length, in plain digits; hyper's rules decide any other.
            14 if is(b"content-length") => match parse_length(field.value) {
                Ok(n) if length.is_none() => {
                    length = Some(n);
                    false
                }
                _ => true,
            },
            17 => is(b"transfer-encoding"),
            _ => false,
        };
        if framed {
            return Parsed::Other;
        }
    }
    let length = length.unwrap_or(0);
    if length > (buf.len() - len) as u64 {
        // The body has not all come with the head: hyper reads it as it comes.
        return Parsed::Other;
    }
    let head_range = buf.as_ptr() as usize..buf.as_ptr() as usize + len;
    // Where a slice of the head lies in it, as [start, end).
    let at = |s: &[u8]| -> Option<[usize; 2]> {
        let start = s.as_ptr() as usize;
        if s.is_empty() {
            return Some([0, 0]);
        }
        let from = head_range
            .contains(&start)
            .then(|| start - head_range.start)?;
        Some([from, from + s.len()])
    };
    let Some([t0, t1]) = req.path.and_then(|p| at(p.as_bytes())) else {
        return Parsed::Other;
    };
    let (mut few, mut many) = ([[0usize; 4]; FEW_FIELDS], Vec::new());
    let spans = field_room(&mut few, &mut many, req.headers.len());
    for (field, span) in req.headers.iter().zip(spans.iter_mut()) {
        let (Some([a, b]), Some([c, d])) = (at(field.name.as_bytes()), at(field.value)) else {
            return Parsed::Other;
        };
        *span = [a, b, c, d];
    }
    // The head's bytes are shared by the target and the values: no copy of each.
    let head = buf.split_to(len).freeze();
    let Some((uri, headers)) = build(&head, [t0, t1], spans, names) else {
        // Put back for hyper, which answers a head it cannot use itself. httparse lets
        // through nothing that `http` refuses, so this is not expected to happen.
        let rest = buf.split();
        buf.extend_from_slice(&head);
        buf.unsplit(rest);
        return Parsed::Other;
    };
    let body = match length {
        0 => Bytes::new(),
        n => buf.split_to(n as usize).freeze(),
    };
    let mut request = Request::new(RequestBody::Whole(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request(Head { request, close })
}

/// Takes request heads off `input` as the server does, for fuzzing and its corpus replay
/// (`crate::http::fuzz_front_end`): whatever the bytes, a head is taken only whole, and one
/// that is not taken is left as it came, for hyper.
pub(crate) fn fuzz_heads(input: &[u8]) {
    let limits = Limits {
        head_bytes: 8192,
        fields: MAX_FIELDS,
    };
    let mut buf = BytesMut::from(input);
    let mut names = Names::default();
    loop {
        let before = buf.clone();
        match parse(&mut buf, limits, &mut names) {
            Parsed::Request(_) => {
                assert!(buf.len() < before.len() && before.ends_with(&buf));
            }
            Parsed::Partial | Parsed::Other => {
                assert_eq!(buf, before, "a head not taken was changed");
                return;
            }
        }
    }
}

/// The target and the header fields of a head, from where they lie in it.
fn build(
    head: &Bytes,
    [t0, t1]: [usize; 2],
    spans: &[[usize; 4]],
    names: &mut Names,
) -> Option<(Uri, HeaderMap)> {
    let uri = Uri::from_maybe_shared(head.slice(t0..t1)).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (place, &[a, b, c, d]) in spans.iter().enumerate() {
        let name = names.get(place, &head[a..b])?;
        let value = HeaderValue::from_maybe_shared(head.slice(c..d)).ok()?;
        headers.append(name, value);
    }
    Some((uri, headers))
}

/// How an answer's body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`, with the bytes still to come.
    Length(u64),
    Chunked,
}

/// Writes an answer's head into `out` as hyper's server does for an HTTP/1.1 client's
/// request that is not HEAD or CONNECT. `length` is the body's: `None` for no body,
/// `Some(None)` for a body of unknown length. Returns how the body is framed, and whether
/// the connection closes after it. An error (nothing written) for an answer hyper would not
/// send: a 1xx, or a `Content-Length` it cannot use.
fn encode_head(
    out: &mut BytesMut,
    parts: &mut http::response::Parts,
    length: Option<Option<u64>>,
    keep_alive: bool,
) -> Result<(Framing, bool), ()> {
    let status = parts.status;
    if status.is_informational() {
        return Err(());
    }
    let headers = &mut parts.headers;
    if !keep_alive {
        match headers.entry(header::CONNECTION) {
            header::Entry::Occupied(mut e) => {
                if !e.iter().any(|v| has_close(v.as_bytes())) {
                    e.append(HeaderValue::from_static("close"));
                }
            }
            header::Entry::Vacant(e) => {
                e.insert(HeaderValue::from_static("close"));
            }
        }
    }
    let start = out.len();
    if status == StatusCode::OK {
        out.put_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.put_slice(b"HTTP/1.1 ");
        out.put_slice(status.as_str().as_bytes());
        out.put_slice(b" ");
        out.put_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.put_slice(b"\r\n");
    }
    // 204 and 304 have no body, and neither Content-Length nor chunks.
    let bodied = status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED;
    let mut framing = None;
    let mut last = !keep_alive;
    let mut dated = false;
    // A field of several values is written on one line, as hyper does for these.
    let mut open_line: Option<HeaderName> = None;
    let mut chunked_last = true;
    let mut length_seen: Option<u64> = None;
    let fail = |out: &mut BytesMut| {
        out.truncate(start);
        Err(())
    };
    for (name, value) in headers.iter() {
        if open_line.as_ref().is_some_and(|n| n != name) {
            end_line(out, &mut open_line, chunked_last);
        }
        let joined = open_line.is_some();
        match *name {
            header::CONTENT_LENGTH => {
                if framing.is_some() && length_seen.is_none() {
                    // After a Transfer-Encoding.
                    return fail(out);
                }
                let len = match length {
                    // No body: a length field would announce one.
                    None => continue,
                    Some(Some(known)) => known,
                    Some(None) => match parse_length(value.as_bytes()) {
                        Ok(n) => n,
                        Err(_) => return fail(out),
                    },
                };
                match length_seen {
                    Some(seen) if length == Some(None) && seen != len => return fail(out),
                    Some(_) => continue,
                    None => {}
                }
                length_seen = Some(len);
                if !bodied {
                    continue;
                }
                framing = Some(Framing::Length(len));
                out.put_slice(b"content-length: ");
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r\n");
            }
            header::TRANSFER_ENCODING => {
                if !bodied {
                    continue;
                }
                if length_seen.is_some() {
                    return fail(out);
                }
                framing = Some(Framing::Chunked);
                chunked_last = value
                    .as_bytes()
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                put_joined(out, &mut open_line, name, value, joined);
            }
            header::CONNECTION => {
                last |= has_close(value.as_bytes());
                put_joined(out, &mut open_line, name, value, joined);
            }
            header::TRAILER => {
                if bodied {
                    put_joined(out, &mut open_line, name, value, joined);
                }
            }
            _ => {
                dated |= *name == header::DATE;
                out.put_slice(name.as_str().as_bytes());
                out.put_slice(b": ");
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r\n");
            }
        }
    }
    end_line(out, &mut open_line, chunked_last);
    let framing = match framing {
        _ if !bodied => Framing::Length(0),
        Some(f) => f,
        None => match length {
            None | Some(Some(0)) => {
                out.put_slice(b"content-length: 0\r\n");
                Framing::Length(0)
            }
            Some(Some(n)) => {
                out.put_slice(b"content-length: ");
                out.put_slice(itoa(n, &mut [0u8; 20]));
                out.put_slice(b"\r\n");
                Framing::Length(n)
            }
            Some(None) => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        },
    };
    if !dated {
        out.put_slice(b"date: ");
        put_date(out);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    Ok((framing, last))
}

/// Writes one value of a field whose values share a line: the name before the first.
fn put_joined(
    out: &mut BytesMut,
    open_line: &mut Option<HeaderName>,
    name: &HeaderName,
    value: &HeaderValue,
    joined: bool,
) {
    if joined {
        out.put_slice(b", ");
    } else {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        *open_line = Some(name.clone());
    }
    out.put_slice(value.as_bytes());
}

/// Ends a line [`put_joined`] opened; a Transfer-Encoding that does not end in `chunked`
/// gets it, since the body is chunked.
fn end_line(out: &mut BytesMut, open_line: &mut Option<HeaderName>, chunked_last: bool) {
    if let Some(name) = open_line.take() {
        if name == header::TRANSFER_ENCODING && !chunked_last {
            out.put_slice(b", chunked");
        }
        out.put_slice(b"\r\n");
    }
}

fn has_close(value: &[u8]) -> bool {
    has_token(value, b"close")
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

thread_local! {
    /// The `Date` value of the current second, and that second.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

/// The current time as an HTTP date, formatted once a second per thread.
fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut date = cell.borrow_mut();
        if date.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == date.1.len() {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = second;
            }
        }
        out.put_slice(&date.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        head_bytes: 8192,
        fields: 100,
    };

    fn parse_all(wire: &[u8], limits: Limits) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(wire);
        let parsed = parse(&mut buf, limits, &mut Names::default());
        (parsed, buf)
    }

    #[test]
    fn a_plain_request_is_taken_and_what_follows_it_stays() {
        let wire =
            b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next";
        let (parsed, rest) = parse_all(wire, LIMITS);
        let Parsed::Request(Head { request, close }) = parsed else {
            panic!("not taken");
        };
        assert!(!close);
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=1");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "example.com");
        let twos: Vec<_> = request.headers().get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert!(request.body().is_end_stream());
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn a_body_that_came_with_its_head_is_taken_with_it() {
        let wire = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /next";
        let (parsed, rest) = parse_all(wire, LIMITS);
        let Parsed::Request(Head { request, .. }) = parsed else {
            panic!("not taken");
        };
        assert_eq!(&rest[..], b"GET /next");
        assert_eq!(request.headers()["content-length"], "5");
        let body = request.into_body();
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(matches!(&body, RequestBody::Whole(data) if data == "hello"));
        // An empty one is no body at all, as hyper's own would be.
        let wire = b"PUT /p HTTP/1.1\r\ncontent-length: 00\r\n\r\n";
        let (parsed, rest) = parse_all(wire, LIMITS);
        let Parsed::Request(Head { request, .. }) = parsed else {
            panic!("not taken");
        };
        assert!(rest.is_empty());
        assert!(request.body().is_end_stream());
    }

    #[test]
    fn connection_close_is_heard_among_its_options() {
        for (value, close) in [
            ("close", true),
            ("Keep-Alive", false),
            ("keep-alive, close", true),
            ("CLOSE ,", true),
        ] {
            let wire = format!("DELETE /x HTTP/1.1\r\nConnection: {value}\r\n\r\n");
            match parse_all(wire.as_bytes(), LIMITS).0 {
                Parsed::Request(head) => assert_eq!(head.close, close, "{value}"),
                _ => panic!("{value}: not taken"),
            }
        }
    }

    #[test]
    fn heads_with_a_body_an_upgrade_or_another_version_are_left_whole_for_hyper() {
        let limits = Limits {
            head_bytes: 64,
            fields: 2,
        };
        for wire in [
            "GET / HTTP/1.0\r\n\r\n",
            "HEAD / HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            "POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\na",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: close, x-via-hyper\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
            "GET /a-path-long-enough-to-take-the-head-over-its-limit HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n",
            "GET /\0 HTTP/1.1\r\n\r\n",
        ] {
            let (parsed, rest) = parse_all(wire.as_bytes(), limits);
            assert!(matches!(parsed, Parsed::Other), "{wire:?} taken");
            assert_eq!(&rest[..], wire.as_bytes(), "{wire:?} not left whole");
        }
        let (parsed, rest) = parse_all(b"GET / HTTP/1.1\r\nHost: a\r\n", limits);
        assert!(matches!(parsed, Parsed::Partial));
        assert_eq!(rest.len(), 25);
    }

    /// The head `encode_head` writes, with the value of its own `date` field masked.
    fn head(
        status: u16,
        fields: &[(&str, &str)],
        length: Option<Option<u64>>,
        keep_alive: bool,
    ) -> Result<(String, Framing, bool), ()> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in fields {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let (mut parts, ()) = response.into_parts();
        let mut out = BytesMut::new();
        let (framing, last) = encode_head(&mut out, &mut parts, length, keep_alive)?;
        let text = String::from_utf8(out.to_vec()).unwrap();
        let dated = fields.iter().any(|(n, _)| n.eq_ignore_ascii_case("date"));
        let text = match text.find("date: ") {
            Some(at) if !dated => {
                let value = &text[at + 6..at + 6 + 29];
                assert!(value.ends_with(" GMT"), "{value}");
                text.replace(value, "DATE")
            }
            _ => text,
        };
        Ok((text, framing, last))
    }

    #[test]
    fn answers_are_framed_as_hyper_frames_them() {
        let ok = |s, f: &[(&str, &str)], l, k| head(s, f, l, k).unwrap();
        assert_eq!(
            ok(200, &[("content-type", "text/plain")], Some(Some(5)), true),
            (
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\ndate: DATE\r\n\r\n"
                    .into(),
                Framing::Length(5),
                false
            )
        );
        // A length field given is written where it stands; the body's own length decides.
        assert_eq!(
            ok(
                404,
                &[("content-length", "3"), ("x", "y")],
                Some(Some(3)),
                true
            )
            .0,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nx: y\r\ndate: DATE\r\n\r\n"
        );
        // Unknown length: chunked.
        assert_eq!(
            ok(200, &[], Some(None), true),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: DATE\r\n\r\n".into(),
                Framing::Chunked,
                false
            )
        );
        // No body: a length of 0, whatever a field said; none at all for 204 and 304.
        assert_eq!(
            ok(200, &[("content-length", "10")], None, true).0,
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: DATE\r\n\r\n"
        );
        assert_eq!(
            ok(
                304,
                &[("content-length", "10"), ("etag", "\"e\"")],
                None,
                true
            ),
            (
                "HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\ndate: DATE\r\n\r\n".into(),
                Framing::Length(0),
                false
            )
        );
        assert_eq!(
            ok(204, &[], None, true).0,
            "HTTP/1.1 204 No Content\r\ndate: DATE\r\n\r\n"
        );
        // A date given is kept; an odd status gets hyper's stand-in reason.
        assert_eq!(
            ok(
                599,
                &[("date", "Mon, 01 Jan 2024 00:00:00 GMT")],
                None,
                true
            )
            .0,
            "HTTP/1.1 599 <none>\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn a_closing_connection_says_so_once() {
        let (text, _, last) = head(200, &[], None, false).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: DATE\r\n\r\n"
        );
        assert!(last);
        let (text, _, last) = head(431, &[("connection", "close")], None, false).unwrap();
        assert_eq!(text.matches("close").count(), 1, "{text}");
        assert!(last);
        // An answer's own close is heard on a kept-alive connection too.
        let (_, _, last) = head(200, &[("connection", "close")], None, true).unwrap();
        assert!(last);
    }

    #[test]
    fn fields_of_several_values_that_frame_the_answer_share_a_line() {
        let fields = [
            ("transfer-encoding", "gzip"),
            ("trailer", "a"),
            ("trailer", "b"),
            ("vary", "x"),
            ("vary", "y"),
        ];
        let (text, framing, _) = head(200, &fields, Some(None), true).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ntrailer: a, b\r\n\
             vary: x\r\nvary: y\r\ndate: DATE\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
    }

    #[test]
    fn answers_hyper_would_refuse_are_refused() {
        // Two lengths that differ, for a body whose length is not known.
        let two = [("content-length", "3"), ("content-length", "4")];
        assert!(head(200, &two, Some(None), true).is_err());
        assert!(head(200, &[("content-length", "x")], Some(None), true).is_err());
        assert!(head(103, &[], None, true).is_err());
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        let mut out = [0u8; 16];
        for (n, text) in [
            (0, "0"),
            (10, "A"),
            (4096, "1000"),
            (usize::MAX, "FFFFFFFFFFFFFFFF"),
        ] {
            let len = hex(n, &mut out);
            assert_eq!(&out[..len], text.as_bytes());
        }
    }
}
