//! `pace`: an open-loop HTTP/1.1 load generator that sends requests at a fixed
//! rate and reports latency percentiles (standard library only).
//!
//!     pace --addr 127.0.0.1:18080 --path /1k --rate 8000 --conns 64 \
//!          --duration 10 --warmup 1
//!
//! Each of the `--conns` keep-alive connections has its own thread and its own
//! schedule: connection k sends its j-th request at t0 + (k + j * conns) / rate,
//! so together they send `rate` requests per second, evenly spread. A request's
//! latency is measured from the time it was *scheduled*, not from when it was
//! written, so a slow response that delays the next request on the same
//! connection is charged to that request too (no coordinated omission, as in
//! wrk2). Requests scheduled during the warm-up are sent but not recorded.
//!
//! Output: one JSON object on stdout.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    addr: SocketAddr,
    host: String,
    path: String,
    rate: f64,
    conns: usize,
    duration: f64,
    warmup: f64,
}

fn usage() -> ! {
    eprintln!(
        "usage: pace --addr IP:PORT [--path /] [--host H] --rate REQ_PER_S \
         [--conns 64] [--duration 10] [--warmup 1]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut addr = None;
    let mut host = None;
    let mut path = "/".to_string();
    let mut rate = None;
    let mut conns = 64usize;
    let mut duration = 10.0f64;
    let mut warmup = 1.0f64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => addr = Some(value.parse().unwrap_or_else(|_| usage())),
            "--host" => host = Some(value),
            "--path" => path = value,
            "--rate" => rate = Some(value.parse().unwrap_or_else(|_| usage())),
            "--conns" => conns = value.parse().unwrap_or_else(|_| usage()),
            "--duration" => duration = value.parse().unwrap_or_else(|_| usage()),
            "--warmup" => warmup = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let addr: SocketAddr = addr.unwrap_or_else(|| usage());
    let rate: f64 = rate.unwrap_or_else(|| usage());
    if rate <= 0.0 || conns == 0 || duration <= 0.0 || warmup < 0.0 {
        usage();
    }
    Args {
        host: host.unwrap_or_else(|| addr.to_string()),
        addr,
        path,
        rate,
        conns,
        duration,
        warmup,
    }
}

/// Ask for precise sleeps: the default 50 µs timer slack would add up to
/// 50 µs to every send time.
fn tighten_timer_slack() {
    unsafe extern "C" {
        fn prctl(option: i32, ...) -> i32;
    }
    const PR_SET_TIMERSLACK: i32 = 29;
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long; 1 ns is valid.
    unsafe {
        prctl(PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    sent: u64,
    completed: u64,
    errors: u64,
    reconnects: u64,
    non_2xx: u64,
}

enum Outcome {
    Ok(u16),
    /// The connection failed or the response could not be read.
    Broken,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (Content-Length or chunked framing) from `stream`.
/// `buf` keeps whatever was read past its end (there is none: one request is
/// in flight per connection).
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, scratch: &mut [u8]) -> Outcome {
    buf.clear();
    // Headers.
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(scratch) {
            Ok(0) => return Outcome::Broken,
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Broken,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut content_length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        if let Some(v) = line.strip_prefix("content-length:") {
            content_length = v.trim().parse::<usize>().ok();
        } else if let Some(v) = line.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        }
    }
    let mut body: Vec<u8> = buf[head_end..].to_vec();
    if chunked {
        // Enough to skip a chunked body: read until the terminating chunk.
        loop {
            if find(&body, b"\r\n0\r\n\r\n").is_some() || body.starts_with(b"0\r\n\r\n") {
                return Outcome::Ok(status);
            }
            match stream.read(scratch) {
                Ok(0) => return Outcome::Broken,
                Ok(n) => body.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Outcome::Broken,
            }
        }
    }
    let want = content_length.unwrap_or(0);
    let mut have = body.len();
    while have < want {
        match stream.read(scratch) {
            Ok(0) => return Outcome::Broken,
            Ok(n) => have += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Broken,
        }
    }
    Outcome::Ok(status)
}

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(s)
}

fn worker(k: usize, args: Arc<Args>, t0: Instant) -> Tally {
    tighten_timer_slack();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: drover-bench-pace\r\n\r\n",
        args.path, args.host
    );
    let interval = args.conns as f64 / args.rate;
    let offset = k as f64 / args.rate;
    let warm_end = args.warmup;
    let end = args.warmup + args.duration;
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut stream = connect(args.addr);
    let mut j: u64 = 0;
    loop {
        let at = offset + j as f64 * interval;
        if at >= end {
            break;
        }
        j += 1;
        let due = t0 + Duration::from_secs_f64(at);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let recorded = at >= warm_end;
        if stream.is_none() {
            tally.reconnects += 1;
            stream = connect(args.addr);
        }
        let Some(s) = stream.as_mut() else {
            if recorded {
                tally.errors += 1;
            }
            continue;
        };
        if recorded {
            tally.sent += 1;
        }
        let ok = s.write_all(request.as_bytes()).is_ok();
        let outcome = if ok { read_response(s, &mut buf, &mut scratch) } else { Outcome::Broken };
        let done = Instant::now();
        match outcome {
            Outcome::Ok(status) => {
                if recorded {
                    tally.completed += 1;
                    if !(200..400).contains(&status) {
                        tally.non_2xx += 1;
                    }
                    let us = done.saturating_duration_since(due).as_micros();
                    tally.latencies_us.push(us.min(u32::MAX as u128) as u32);
                }
            }
            Outcome::Broken => {
                if recorded {
                    tally.errors += 1;
                }
                stream = None;
            }
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

fn json_num(x: f64) -> String {
    if x.is_finite() { format!("{x:.1}") } else { "null".into() }
}

fn main() {
    let args = Arc::new(parse_args());
    // Start the schedule a little later so that every thread is ready.
    let t0 = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = (0..args.conns)
        .map(|k| {
            let args = Arc::clone(&args);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || worker(k, args, t0))
                .expect("spawn")
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        let t = h.join().expect("worker panicked");
        all.latencies_us.extend(t.latencies_us);
        all.sent += t.sent;
        all.completed += t.completed;
        all.errors += t.errors;
        all.reconnects += t.reconnects;
        all.non_2xx += t.non_2xx;
    }
    let elapsed = t0.elapsed().as_secs_f64() - args.warmup;
    let mut lat = all.latencies_us;
    lat.sort_unstable();
    let mean = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64
    };
    println!(
        "{{\"rate_target\": {}, \"conns\": {}, \"duration_s\": {}, \"warmup_s\": {}, \
         \"sent\": {}, \"completed\": {}, \"errors\": {}, \"non_2xx_3xx\": {}, \"reconnects\": {}, \
         \"achieved_rps\": {}, \"mean_us\": {}, \"p50_us\": {}, \"p90_us\": {}, \"p99_us\": {}, \
         \"p999_us\": {}, \"max_us\": {}}}",
        args.rate,
        args.conns,
        args.duration,
        args.warmup,
        all.sent,
        all.completed,
        all.errors,
        all.non_2xx,
        all.reconnects,
        json_num(all.completed as f64 / elapsed.max(1e-9)),
        json_num(mean),
        json_num(percentile(&lat, 50.0)),
        json_num(percentile(&lat, 90.0)),
        json_num(percentile(&lat, 99.0)),
        json_num(percentile(&lat, 99.9)),
        json_num(lat.last().map(|&x| x as f64).unwrap_or(f64::NAN)),
    );
}
