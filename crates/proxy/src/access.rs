//! The access log: one line per request, as JSON or in the combined format of nginx and
//! Apache, to stdout or a file.
//!
//! A request's record is made when its response is finished: when the last byte of the
//! response body has been handed to the client's connection, or when the response is dropped
//! before that (the client went away, or the body was empty and never read). So every record
//! has the request's total time, and the bytes that were really sent.
//!
//! The data plane never waits for the log. Records go through a bounded queue with
//! `try_send`; when the queue is full (the disk or the pipe behind it is slower than the
//! traffic), the record is dropped and counted, and the request goes on. A thread of its own
//! formats the records and writes them, so that a slow or stuck sink blocks that thread alone.
//! While records keep coming it takes what is queued every 10 ms, in one write, and is never
//! parked, so a request's `try_send` never pays for waking it; after 100 ms without records
//! it sleeps until the next one. With no access log, a request pays one `Option` check.
//!
//! A file is opened in append mode, and opened again by [`AccessLog::reopen`] (the binary
//! calls it on SIGUSR1), so that logrotate can rename it and signal: lines from then on go
//! to a new file at the original path.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use tokio::sync::{mpsc, oneshot};

use crate::stats::{ListenerStats, RouteStats};

/// How each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One JSON object per line, with every field.
    #[default]
    Json,
    /// nginx's and Apache's `combined`: client, time, request line, status, bytes, referer,
    /// user agent.
    Combined,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Format::Json),
            "combined" => Ok(Format::Combined),
            other => Err(format!(
                "unknown access log format {other:?}: use `json` or `combined`"
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Format::Json => "json",
            Format::Combined => "combined",
        })
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to; opened again on [`AccessLog::reopen`].
    File(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("stdout"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What crosses the queue to the writer thread.
// Records go inline, not boxed: boxing would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Record(Record),
    /// Opens the file again (its flag is set too, in case the queue is full).
    Reopen,
    /// Writes out everything received so far, then answers.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Shared {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
    reopen: AtomicBool,
}

/// The sending side of the access log; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Record(_) => "Record",
            Msg::Reopen => "Reopen",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl AccessLog {
    /// Opens the target (a file is created if need be, and appended to) and starts the
    /// writer thread. `buffer` records may wait for it; more are dropped. Opening a FIFO
    /// waits for its reader.
    pub fn start(target: Target, format: Format, buffer: usize) -> io::Result<AccessLog> {
        let sink = Sink::open(&target)?;
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            rx,
            sink,
            target,
            format,
            shared: shared.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog { tx, shared })
    }

    /// Opens the file again at its path (after logrotate renamed it); lines written from
    /// then on go to the new file. Nothing for stdout.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Relaxed);
        // A full queue means the writer is busy, and sees the flag before its next write.
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Waits up to `within` for every record queued so far to be written (at shutdown).
    pub async fn flush(&self, within: Duration) {
        let (done, wait) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }

    /// Records written to the target.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Records dropped: the queue was full, or writing them failed.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes to the target that failed.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Records waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The queue's size.
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// Hands a record to the writer, or drops and counts it when the queue is full. Never
    /// waits.
    #[inline]
    pub(crate) fn send(&self, record: Record) {
        if self.tx.try_send(Msg::Record(record)).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One request, as logged.
#[derive(Debug)]
pub(crate) struct Record {
    /// When its head was received.
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub host: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub listener: Arc<ListenerStats>,
    /// The route matched, with its service; None for a request no route took.
    pub route: Option<Arc<RouteStats>>,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// The endpoint of the last try.
    pub upstream: Option<SocketAddr>,
    /// From the start of the try that answered to its response head.
    pub upstream_time: Option<Duration>,
    pub total_time: Duration,
    /// Tries made upstream.
    pub attempts: u32,
}

enum Sink {
    Stdout,
    File(std::fs::File),
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout,
            Target::File(path) => Sink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(f) => f.write_all(bytes),
        }
    }
}

/// Batches larger than this are written before more records are formatted.
const BATCH_BYTES: usize = 64 * 1024;
/// How often the writer takes what is queued while records keep coming.
const TICK: Duration = Duration::from_millis(10);
/// Empty ticks after which the writer sleeps until the next record.
const IDLE_TICKS: u32 = 10;

struct Writer {
    rx: mpsc::Receiver<Msg>,
    sink: Sink,
    target: Target,
    format: Format,
    shared: Arc<Shared>,
    /// Whether the last write failed (so that a lasting failure is logged once).
    failing: bool,
}

impl Writer {
    /// Writes what is queued every [`TICK`] while records come; once the queue has stayed
    /// empty for [`IDLE_TICKS`], sleeps until the next message instead. While traffic flows,
    /// the writer is never parked, so a request's `try_send` never has to wake a thread.
    fn run(mut self) {
        let mut buf = String::with_capacity(BATCH_BYTES * 2);
        let mut lines = 0u64;
        let mut idle = 0;
        loop {
            let mut received = 0;
            let closed = loop {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        received += 1;
                        self.handle(msg, &mut buf, &mut lines);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break false,
                    Err(mpsc::error::TryRecvError::Disconnected) => break true,
                }
            };
            self.write(&mut buf, &mut lines);
            if closed {
                return;
            }
            idle = if received == 0 { idle + 1 } else { 0 };
            if idle < IDLE_TICKS {
                std::thread::sleep(TICK);
                continue;
            }
            match self.rx.blocking_recv() {
                Some(msg) => self.handle(msg, &mut buf, &mut lines),
                None => return,
            }
            idle = 0;
        }
    }

    fn handle(&mut self, msg: Msg, buf: &mut String, lines: &mut u64) {
        match msg {
            Msg::Record(r) => {
                match self.format {
                    Format::Json => json_line(buf, &r),
                    Format::Combined => combined_line(buf, &r),
                }
                *lines += 1;
                if buf.len() >= BATCH_BYTES {
                    self.write(buf, lines);
                }
            }
            Msg::Reopen => self.write(buf, lines),
            Msg::Flush(done) => {
                self.write(buf, lines);
                let _ = done.send(());
            }
        }
    }

    /// Writes the batch (reopening the file first if asked), and counts its lines.
    fn write(&mut self, buf: &mut String, lines: &mut u64) {
        if self.shared.reopen.swap(false, Ordering::Relaxed) {
            // What was received before the signal still belongs to the old file.
            self.write_batch(buf, lines);
            match Sink::open(&self.target) {
                Ok(sink) => {
                    self.sink = sink;
                    tracing::info!(target = %self.target, "access log reopened");
                }
                Err(e) => tracing::error!(
                    target = %self.target,
                    "cannot reopen the access log, still writing to the file open before: {e}"
                ),
            }
        }
        self.write_batch(buf, lines);
    }

    fn write_batch(&mut self, buf: &mut String, lines: &mut u64) {
        if buf.is_empty() {
            return;
        }
        match self.sink.write_all(buf.as_bytes()) {
            Ok(()) => {
                self.shared.written.fetch_add(*lines, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::info!(target = %self.target, "access log writable again");
                }
            }
            Err(e) => {
                // Part of the batch may have gone out; it is counted as lost all the same.
                self.shared.dropped.fetch_add(*lines, Ordering::Relaxed);
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(target = %self.target, "cannot write the access log, its lines are lost until it can: {e}");
                }
            }
        }
        buf.clear();
        *lines = 0;
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// The Host header, or the `:authority` of an HTTP/2 request.
fn host(r: &Record) -> Option<&[u8]> {
    r.host
        .as_ref()
        .map(HeaderValue::as_bytes)
        .or_else(|| r.uri.authority().map(|a| a.as_str().as_bytes()))
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// UTC date and time of `t`: (year, month, day, hour, minute, second, millisecond).
fn utc(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, day) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400) as u32;
    (y, mo, day, s / 3600, s / 60 % 60, s % 60, d.subsec_millis())
}

/// `{"time":"2024-05-01T12:34:56.789Z",...}` and a line feed.
pub(crate) fn json_line(out: &mut String, r: &Record) {
    let (y, mo, d, h, mi, s, ms) = utc(r.time);
    let _ = write!(
        out,
        "{{\"time\":\"{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z\",\"client\":\"{}\",\"method\":",
        r.client
    );
    json_str(out, r.method.as_str().as_bytes());
    out.push_str(",\"path\":");
    json_str(out, path_and_query(&r.uri).as_bytes());
    let _ = write!(
        out,
        ",\"protocol\":\"{}\",\"status\":{},\"bytes_sent\":{},\"referer\":",
        version_str(r.version),
        r.status,
        r.bytes_sent
    );
    json_opt(out, r.referer.as_ref().map(HeaderValue::as_bytes));
    out.push_str(",\"user_agent\":");
    json_opt(out, r.user_agent.as_ref().map(HeaderValue::as_bytes));
    out.push_str(",\"host\":");
    json_opt(out, host(r));
    out.push_str(",\"listener\":");
    json_str(out, r.listener.name.as_bytes());
    out.push_str(",\"route\":");
    json_opt(out, r.route.as_ref().map(|x| x.route.as_bytes()));
    out.push_str(",\"service\":");
    json_opt(out, r.route.as_ref().map(|x| x.service.as_bytes()));
    out.push_str(",\"upstream\":");
    match r.upstream {
        Some(a) => {
            let _ = write!(out, "\"{a}\"");
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"upstream_time\":");
    match r.upstream_time {
        Some(t) => {
            let _ = write!(out, "{:.6}", t.as_secs_f64());
        }
        None => out.push_str("null"),
    }
    let _ = writeln!(
        out,
        ",\"total_time\":{:.6},\"attempts\":{}}}",
        r.total_time.as_secs_f64(),
        r.attempts
    );
}

fn json_opt(out: &mut String, v: Option<&[u8]>) {
    match v {
        Some(v) => json_str(out, v),
        None => out.push_str("null"),
    }
}

/// A JSON string of `bytes`; bytes that are not UTF-8 become U+FFFD.
fn json_str(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `127.0.0.1 - - [01/May/2024:12:34:56 +0000] "GET / HTTP/1.1" 200 612 "-" "curl/8.5.0"`
/// and a line feed: nginx's `combined`, times in UTC.
pub(crate) fn combined_line(out: &mut String, r: &Record) {
    let (y, mo, d, h, mi, s, _) = utc(r.time);
    let _ = write!(
        out,
        "{} - - [{d:02}/{}/{y:04}:{h:02}:{mi:02}:{s:02} +0000] \"",
        r.client.ip().to_canonical(),
        MONTHS[(mo - 1) as usize]
    );
    escaped(out, r.method.as_str().as_bytes());
    out.push(' ');
    escaped(out, path_and_query(&r.uri).as_bytes());
    let _ = write!(
        out,
        " {}\" {} {} \"",
        version_str(r.version),
        r.status,
        r.bytes_sent
    );
    quoted_or_dash(out, r.referer.as_ref());
    out.push_str("\" \"");
    quoted_or_dash(out, r.user_agent.as_ref());
    out.push_str("\"\n");
}

fn quoted_or_dash(out: &mut String, v: Option<&HeaderValue>) {
    match v {
        Some(v) if !v.is_empty() => escaped(out, v.as_bytes()),
        _ => out.push('-'),
    }
}

/// nginx's escaping of logged values: `"`, `\`, control bytes and bytes above 0x7e as `\xHH`.
fn escaped(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            // 2024-02-29T23:59:58.123Z
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_251_198_123),
            client: "[::ffff:10.0.0.1]:5000".parse().unwrap(),
            method: Method::GET,
            uri: "/a?b=c".parse().unwrap(),
            version: Version::HTTP_11,
            host: Some(HeaderValue::from_static("example.com")),
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8 \"x\"")),
            listener: Arc::new(ListenerStats::new("web", "127.0.0.1:80".parse().unwrap())),
            route: Some(Arc::new(RouteStats::new("web", None, "/", "api"))),
            status: 200,
            bytes_sent: 612,
            upstream: Some("127.0.0.1:9001".parse().unwrap()),
            upstream_time: Some(Duration::from_micros(1500)),
            total_time: Duration::from_micros(2250),
            attempts: 1,
        }
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
        assert_eq!(
            utc(SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_007)),
            (2000, 2, 29, 0, 0, 0, 7)
        );
    }

    #[test]
    fn json_lines_carry_every_field_escaped() {
        let mut out = String::new();
        json_line(&mut out, &record());
        assert_eq!(
            out,
            "{\"time\":\"2024-02-29T23:59:58.123Z\",\"client\":\"[::ffff:10.0.0.1]:5000\",\
             \"method\":\"GET\",\"path\":\"/a?b=c\",\"protocol\":\"HTTP/1.1\",\
             \"status\":200,\"bytes_sent\":612,\"referer\":null,\
             \"user_agent\":\"curl/8 \\\"x\\\"\",\"host\":\"example.com\",\"listener\":\"web\",\
             \"route\":\"*/\",\"service\":\"api\",\"upstream\":\"127.0.0.1:9001\",\
             \"upstream_time\":0.001500,\"total_time\":0.002250,\"attempts\":1}\n"
        );
        let mut r = record();
        r.route = None;
        r.upstream = None;
        r.upstream_time = None;
        r.user_agent = Some(HeaderValue::from_bytes(b"a\tb\xff").unwrap());
        let mut out = String::new();
        json_line(&mut out, &r);
        assert!(out.contains("\"user_agent\":\"a\\tb\u{fffd}\""), "{out}");
        assert!(
            out.contains(
                "\"route\":null,\"service\":null,\"upstream\":null,\"upstream_time\":null"
            ),
            "{out}"
        );
    }

    #[test]
    fn combined_lines_are_nginx_combined() {
        let mut out = String::new();
        combined_line(&mut out, &record());
        assert_eq!(
            out,
            "10.0.0.1 - - [29/Feb/2024:23:59:58 +0000] \"GET /a?b=c HTTP/1.1\" 200 612 \"-\" \"curl/8 \\x22x\\x22\"\n"
        );
        let mut r = record();
        r.referer = Some(HeaderValue::from_bytes(b"http://r/\\\xff").unwrap());
        let mut out = String::new();
        combined_line(&mut out, &r);
        assert!(out.contains("\"http://r/\\x5C\\xFF\""), "{out}");
    }

    #[test]
    fn formats_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("json".parse(), Ok(Format::Json));
        assert_eq!("combined".parse(), Ok(Format::Combined));
        let e = "xml".parse::<Format>().unwrap_err();
        assert!(
            e.contains("\"xml\"") && e.contains("`json` or `combined`"),
            "{e}"
        );
    }
}
