//! The PROXY protocol (HAProxy's, versions 1 and 2): a header at the start of a connection
//! that carries the original client's and destination's addresses across a proxy.
//!
//! drover writes it to upstreams of services that ask for it (`proxy_protocol = "v1"` or
//! `"v2"`), and reads it from the downstream addresses a listener trusts
//! (`proxy_protocol_from`): [`read_header`] takes the header off the front of a connection and
//! hands back, in a [`Prefixed`] stream, whatever bytes came with it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The 12 bytes that open a version 2 header.
const V2_SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// A version 1 header is one line of at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;

/// Version 1: `PROXY TCP4 SRC DST SRCPORT DSTPORT\r\n`. Mixed families are written as
/// IPv6, with IPv4 addresses mapped.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(source, destination);
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// Version 2, command PROXY over TCP, with no TLVs.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(source, destination);
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both addresses in one family: IPv4 when both can be, else IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canon(a), canon(b));
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        let six = |s: SocketAddr| SocketAddr::new(IpAddr::V6(v6(s.ip())), s.port());
        (six(a), six(b))
    }
}

/// What a PROXY header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// The original client and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The sender speaks for itself (v1 `UNKNOWN`, v2 LOCAL, or a family it does not carry):
    /// the connection's own addresses stand.
    Local,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More bytes are needed to decide.
    #[error("incomplete PROXY protocol header")]
    Incomplete,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
}

/// Parses a header at the start of `buf`: what it says, and its length in bytes.
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    if buf.len() < V2_SIGNATURE.len() {
        let v2_prefix = V2_SIGNATURE.starts_with(buf);
        let v1_prefix = b"PROXY ".starts_with(&buf[..buf.len().min(6)]);
        return if v2_prefix || v1_prefix {
            Err(ParseError::Incomplete)
        } else {
            Err(ParseError::Invalid("no PROXY protocol signature"))
        };
    }
    if buf.starts_with(&V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(b"PROXY ") {
        parse_v1(buf)
    } else {
        Err(ParseError::Invalid("no PROXY protocol signature"))
    }
}

fn parse_v1(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ParseError::Invalid(
                "a version 1 line longer than 107 bytes",
            ))
        } else {
            Err(ParseError::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ParseError::Invalid("not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // PROXY
    let family = parts.next().ok_or(ParseError::Invalid("no family"))?;
    if family == "UNKNOWN" {
        return Ok((Header::Local, end + 2));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ParseError::Invalid(
            "a version 1 line needs 4 fields after the family",
        ));
    };
    let ip = |s: &str| {
        s.parse::<IpAddr>()
            .map_err(|_| ParseError::Invalid("a bad address"))
    };
    // Ports are decimal without leading zeros or signs.
    let port = |s: &str| {
        let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        let ok = ok && (s == "0" || !s.starts_with('0'));
        ok.then(|| s.parse::<u16>().ok())
            .flatten()
            .ok_or(ParseError::Invalid("a bad port"))
    };
    let (src, dst) = (ip(src)?, ip(dst)?);
    let fits = match family {
        "TCP4" => src.is_ipv4() && dst.is_ipv4(),
        "TCP6" => src.is_ipv6() && dst.is_ipv6(),
        _ => {
            return Err(ParseError::Invalid(
                "the family must be TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    if !fits {
        return Err(ParseError::Invalid(
            "addresses of another family than the line says",
        ));
    }
    let header = Header::Proxied {
        source: SocketAddr::new(src, port(sport)?),
        destination: SocketAddr::new(dst, port(dport)?),
    };
    Ok((header, end + 2))
}

fn parse_v2(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    if buf.len() < 16 {
        return Err(ParseError::Incomplete);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ParseError::Invalid(
            "version 2 signature with another version",
        ));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let total = 16 + len;
    if buf.len() < total {
        return Err(ParseError::Incomplete);
    }
    let body = &buf[16..total];
    match command {
        0 => return Ok((Header::Local, total)),
        1 => {}
        _ => return Err(ParseError::Invalid("a command other than LOCAL or PROXY")),
    }
    let header = match buf[13] {
        // TCP or UDP over IPv4.
        0x11 | 0x12 => {
            if body.len() < 12 {
                return Err(ParseError::Invalid("an IPv4 block shorter than 12 bytes"));
            }
            let ip = |o: usize| IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        0x21 | 0x22 => {
            if body.len() < 36 {
                return Err(ParseError::Invalid("an IPv6 block shorter than 36 bytes"));
            }
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                IpAddr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC or UNIX: nothing drover can use; the connection's addresses stand.
        _ => Header::Local,
    };
    Ok((header, total))
}

/// Reads a PROXY header (v1 or v2) from the start of `stream`: what it says, and the stream
/// with the bytes that arrived after the header put back in front. Bytes that cannot start a
/// header, a malformed header, or a stream that ends first are errors.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    mut stream: S,
) -> io::Result<(Header, Prefixed<S>)> {
    let mut buf = Vec::with_capacity(256);
    loop {
        match parse(&buf) {
            Ok((header, len)) => {
                buf.drain(..len);
                return Ok((header, Prefixed::new(buf, stream)));
            }
            Err(ParseError::Incomplete) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        // A v2 header announces its length; v1 is one short line. Read no further than that
        // needs, in chunks.
        buf.reserve(512);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended before a whole PROXY protocol header",
            ));
        }
    }
}

/// A stream with bytes already read from it put back in front: reads return those bytes
/// first, then the stream's own. Writes go straight to the stream.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// Whether bytes put back in front are still to be read.
    pub(crate) fn holds_unread(&self) -> bool {
        self.pos < self.prefix.len()
    }

    /// The stream, without what was put back in front.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }

    /// Puts bytes just read back in front: they are read again first, then any bytes of the
    /// prefix not read yet, then the stream's own.
    pub(crate) fn unread(&mut self, mut bytes: Vec<u8>) {
        bytes.extend_from_slice(&self.prefix[self.pos..]);
        self.prefix = bytes;
        self.pos = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
                // What the stream already holds comes in the same read: hyper sizes its read
                // buffer by what one read gives, and would double it for a short first read.
                // If the stream has nothing yet, or fails, the next read finds out again.
                if buf.remaining() > 0 {
                    let _ = Pin::new(&mut this.inner).poll_read(cx, buf);
                }
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_header_is_taken_off_and_the_bytes_after_it_are_read_next() {
        let src = addr("192.0.2.7:51000");
        let dst = addr("10.0.0.1:443");
        for header in [encode_v1(src, dst), encode_v2(src, dst)] {
            let (mut client, server) = tokio::io::duplex(64);
            let mut sent = header.clone();
            sent.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            let writer = tokio::spawn(async move {
                // In small pieces, so the header arrives split.
                for chunk in sent.chunks(5) {
                    client.write_all(chunk).await.unwrap();
                    tokio::task::yield_now().await;
                }
                client
            });
            let (h, mut rest) = read_header(server).await.unwrap();
            assert_eq!(
                h,
                Header::Proxied {
                    source: src,
                    destination: dst
                }
            );
            drop(writer.await.unwrap());
            let mut after = Vec::new();
            rest.read_to_end(&mut after).await.unwrap();
            assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
        }
    }

    #[tokio::test]
    async fn unread_bytes_come_back_first_and_the_streams_own_bytes_follow_in_the_same_read() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" HTTP/1.1\r\n\r\n").await.unwrap();
        let mut stream = Prefixed::new(b"GET /path".to_vec(), server);
        // Read part of the prefix, put it back: the order stays as it was sent.
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET ");
        stream.unread(first.to_vec());
        // One read gives the whole prefix and what the stream already holds.
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /path HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn no_header_or_an_early_end_is_an_error() {
        let (mut c, s) = tokio::io::duplex(64);
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let e = read_header(s).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let (mut c, s) = tokio::io::duplex(64);
        c.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        drop(c);
        let e = read_header(s).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn what_is_written_reads_back() {
        for (src, dst) in [
            ("192.0.2.7:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:51000", "[2001:db8::1]:443"),
        ] {
            let (src, dst) = (addr(src), addr(dst));
            for bytes in [encode_v1(src, dst), encode_v2(src, dst)] {
                let (h, n) = parse(&bytes).unwrap();
                assert_eq!(n, bytes.len());
                assert_eq!(
                    h,
                    Header::Proxied {
                        source: src,
                        destination: dst
                    }
                );
            }
        }
        assert_eq!(
            encode_v1(addr("192.0.2.7:51000"), addr("10.0.0.1:443")),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n"
        );
        // Mixed families become IPv6.
        let v1 = encode_v1(addr("192.0.2.7:1"), addr("[::1]:2"));
        assert_eq!(v1, b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n");
    }

    #[test]
    fn a_header_split_anywhere_is_incomplete_until_whole() {
        for bytes in [
            encode_v1(addr("192.0.2.7:51000"), addr("10.0.0.1:443")),
            encode_v2(addr("[2001:db8::7]:51000"), addr("[2001:db8::1]:443")),
        ] {
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..cut]),
                    Err(ParseError::Incomplete),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn local_and_unknown_leave_the_connection_s_addresses() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\nGET"), Ok((Header::Local, 15)));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok((Header::Local, 16)));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ParseError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(ParseError::Invalid(_))
        ));
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 12]);
        v3.extend_from_slice(&[0; 12]);
        assert!(matches!(parse(&v3), Err(ParseError::Invalid(_))));
    }
}
