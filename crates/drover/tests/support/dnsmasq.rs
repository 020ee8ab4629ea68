//! A real DNS server for tests: dnsmasq (Debian `dnsmasq-base`, installed by scripts/test.sh)
//! on a free loopback port, answering only from its own hosts file and SRV records, with a
//! 1 s TTL. Its A records change by rewriting the hosts file and sending SIGHUP (dnsmasq
//! re-reads `--addn-hosts` files then); its SRV records, given on the command line, change by
//! a restart on the same port. Killed on drop.
//!
//! It also carries a minimal DNS client (A queries over UDP), so that a test can wait until
//! dnsmasq really serves a change before it measures how long drover takes to follow.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// One SRV record: `name` served by `target:port`.
#[derive(Debug, Clone)]
pub struct Srv {
    pub name: String,
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

impl Srv {
    pub fn new(name: &str, target: &str, port: u16) -> Srv {
        Srv {
            name: name.into(),
            target: target.into(),
            port,
            priority: 0,
            weight: 1,
        }
    }

    pub fn weight(mut self, weight: u16) -> Srv {
        self.weight = weight;
        self
    }

    pub fn priority(mut self, priority: u16) -> Srv {
        self.priority = priority;
        self
    }

    fn arg(&self) -> String {
        format!(
            "--srv-host={},{},{},{},{}",
            self.name, self.target, self.port, self.priority, self.weight
        )
    }
}

/// A running dnsmasq.
pub struct Dnsmasq {
    child: Option<Child>,
    /// Where it answers, UDP and TCP: `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    hosts: PathBuf,
    log: PathBuf,
    srv: Vec<Srv>,
}

impl Dnsmasq {
    /// Starts dnsmasq serving `hosts` (name, address) and `srv`.
    pub async fn start(hosts: &[(&str, IpAddr)], srv: &[Srv]) -> Dnsmasq {
        assert!(
            std::path::Path::new(DNSMASQ).exists(),
            "{DNSMASQ} is missing: scripts/test.sh installs it (apt-get install dnsmasq-base)"
        );
        let dir = tempfile::tempdir().unwrap();
        // dnsmasq started as root drops to `nobody`, which must still read the hosts file when
        // SIGHUP makes it re-read it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hosts_file = dir.path().join("hosts");
        let log = dir.path().join("dnsmasq.log");
        let mut d = Dnsmasq {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            hosts: hosts_file,
            log,
            srv: srv.to_vec(),
        };
        d.write_hosts(hosts);
        for _ in 0..5 {
            d.addr = SocketAddr::from(([127, 0, 0, 1], free_udp_and_tcp_port()));
            if d.launch().await {
                return d;
            }
        }
        panic!("dnsmasq never started:\n{}", d.log_text());
    }

    /// Serves `hosts` from now on: the file is replaced, dnsmasq gets SIGHUP, and this returns
    /// once dnsmasq answers every name with its new addresses.
    pub async fn set_hosts(&self, hosts: &[(&str, IpAddr)]) {
        self.write_hosts(hosts);
        let pid = self.child.as_ref().expect("dnsmasq runs").id();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP dnsmasq failed");
        let mut names: Vec<&str> = hosts.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        let deadline = Instant::now() + Duration::from_secs(5);
        for name in names {
            let mut want: Vec<Ipv4Addr> = hosts
                .iter()
                .filter(|(n, _)| *n == name)
                .filter_map(|(_, ip)| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            want.sort();
            loop {
                let mut got = self
                    .query_a(name)
                    .await
                    .map(|(_, ips)| ips)
                    .unwrap_or_default();
                got.sort();
                if got == want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "dnsmasq never served {name} as {want:?} after SIGHUP (last {got:?}):\n{}",
                    self.log_text()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Stops it and starts it again on the same port with these SRV records (and the same
    /// hosts file).
    pub async fn restart_with_srv(&mut self, srv: &[Srv]) {
        self.stop();
        self.srv = srv.to_vec();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The port was just released; another process could take it, but nothing here would.
        while !self.launch().await {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not restart on {}:\n{}",
                self.addr,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts it again with the same records, after `stop`.
    pub async fn restart(&mut self) {
        let srv = self.srv.clone();
        self.restart_with_srv(&srv).await;
    }

    /// Kills it: from now on nothing answers on its port.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log: start-up, reloads and every query (`--log-queries`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many queries of `qtype` (`A`, `AAAA`, `SRV`) for `name` it has received.
    pub fn queries(&self, qtype: &str, name: &str) -> usize {
        let needle = format!("query[{qtype}] {name} from");
        self.log_text().matches(&needle).count()
    }

    /// Asks it for the A records of `name`: the response code and the addresses.
    pub async fn query_a(&self, name: &str) -> Result<(u8, Vec<Ipv4Addr>), String> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        // Each query has its own socket, so its port is as good an id as any.
        let id = socket.local_addr().map_err(|e| e.to_string())?.port();
        socket
            .send_to(&encode_query(id, name, 1), self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf))
            .await
            .map_err(|_| "no answer within 500ms".to_string())?
            .map_err(|e| e.to_string())?;
        decode_a_answers(id, &buf[..n])
    }

    fn write_hosts(&self, hosts: &[(&str, IpAddr)]) {
        let text: String = hosts.iter().map(|(n, ip)| format!("{ip} {n}\n")).collect();
        let tmp = self.dir.path().join(".hosts.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&tmp, &self.hosts).unwrap();
    }

    /// Spawns dnsmasq on `self.addr` and waits until it answers; false if it exited (its
    /// port was taken).
    async fn launch(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file",
            "--log-queries",
            "--local-ttl=1",
        ])
        .arg(format!("--port={}", self.addr.port()))
        .arg(format!("--addn-hosts={}", self.hosts.display()))
        .args(self.srv.iter().map(Srv::arg))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("dnsmasq starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            // Any answer, even REFUSED for a name it does not know, means it is up.
            if self.query_probe().await {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn query_probe(&self) -> bool {
        self.query_a("dnsmasq-probe.invalid").await.is_ok()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port free for both UDP and TCP a moment ago (dnsmasq binds both), below the
/// kernel's ephemeral range (32768 and up): a restart reuses the port, and in that range the
/// random source port of some client's query (drover's own resolver, say) could take it
/// while dnsmasq is down.
fn free_udp_and_tcp_port() -> u16 {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    loop {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = 20_000 + (seed >> 8) as u16 % 12_000;
        let free = UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// A standard query with recursion desired.
fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The response code and the A records of a response to query `id`.
fn decode_a_answers(id: u16, m: &[u8]) -> Result<(u8, Vec<Ipv4Addr>), String> {
    let short = || "short DNS response".to_string();
    let u16_at = |i: usize| -> Result<u16, String> {
        m.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(short)
    };
    if u16_at(0)? != id {
        return Err("response to another query".into());
    }
    let rcode = m.get(3).ok_or_else(short)? & 0x0f;
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    // Skips a name: labels up to a zero byte, or up to a compression pointer.
    let skip_name = |mut i: usize| -> Result<usize, String> {
        loop {
            let len = *m.get(i).ok_or_else(short)?;
            match len {
                0 => return Ok(i + 1),
                l if l & 0xc0 == 0xc0 => return Ok(i + 2),
                l => i += 1 + l as usize,
            }
        }
    };
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut ips = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let (rtype, rdlen) = (u16_at(i)?, u16_at(i + 8)? as usize);
        let data = m.get(i + 10..i + 10 + rdlen).ok_or_else(short)?;
        if rtype == 1 && rdlen == 4 {
            ips.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    Ok((rcode, ips))
}
