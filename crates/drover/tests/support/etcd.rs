//! A real etcd cluster for tests: N members of Debian's etcd-server (3.4, installed by
//! scripts/test.sh) on free loopback ports, each with its own data directory, killed on drop.
//! Members can be killed and restarted one at a time, or all stopped and started again with
//! their data, as a cluster that lost its machines and got them back.
//!
//! ```ignore
//! let mut etcd = EtcdCluster::start(3).await;
//! let url = etcd.url(); // etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
//! etcd.kill(0);
//! etcd.restart(0).await;
//! etcd.stop_all();
//! etcd.start_all().await;
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_etcd::etcd_client;

use super::{client, full, send, try_get};

/// How long a cluster may take to elect a leader and answer.
const READY_WITHIN: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

/// A free loopback port for a member, below the kernel's ephemeral range
/// (`ip_local_port_range`). The kernel never gives a port there to an outgoing connection
/// or to a bind to port 0, which other tests do all the time; so a member that a test stops
/// can start again on its port, as it must (its peers know it by that address). A port from
/// `free_port` could be taken in the meantime (it happened in CI: "bind: address already in
/// use" on a restart). The search starts at a random point, so that tests running at the
/// same time rarely try the same ports; `taken` are the ones this cluster already has.
fn member_port(taken: &[u16]) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000u16, ephemeral_from.saturating_sub(10_000).max(1));
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (0..span)
        .map(|i| low + ((start + u64::from(i)) % u64::from(span)) as u16)
        .find(|port| {
            !taken.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
        })
        .expect("no free loopback port below the ephemeral range")
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one of them answers healthy. The ports are
    /// free when chosen, but another test's cluster can take one before etcd binds it: then
    /// the cluster is started again on new ports, up to three times.
    pub async fn start(n: usize) -> EtcdCluster {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists() || which("etcd"),
            "etcd is missing: scripts/test.sh installs it (apt-get install etcd-server)"
        );
        for _ in 0..2 {
            let mut cluster = Self::launch_all(n);
            match cluster.healthy().await {
                Ok(()) => return cluster,
                Err(log) if log.contains("address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        let mut cluster = Self::launch_all(n);
        cluster.wait_healthy().await;
        cluster
    }

    /// Launches `n` new members on fresh ports, without waiting for them.
    fn launch_all(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::with_capacity(2 * n);
        for _ in 0..2 * n {
            ports.push(member_port(&ports));
        }
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data: dir.path().join(format!("m{}.etcd", i + 1)),
                log: dir.path().join(format!("m{}.log", i + 1)),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..n {
            cluster.launch(i);
        }
        cluster
    }

    fn launch(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} is running", m.name);
        let client_url = format!("http://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "drover-test"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// `etcd://127.0.0.1:P1,…` with every member, and the default prefix.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// The client URLs (`http://127.0.0.1:P`) of every member, for etcd-client.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Kills member `i` with SIGKILL, as if its machine died.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops member `i` with SIGSTOP (`thaw` goes on): its process and connections stay, but
    /// it answers nothing, as a member whose machine hangs or whose network is cut.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "STOP");
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, "CONT");
    }

    fn signal(&self, i: usize, name: &str) {
        let child = self.members[i].child.as_ref().expect("the member runs");
        super::signal(child.id(), name);
    }

    /// Starts member `i` again with its data, and waits until the cluster is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
        self.wait_healthy().await;
    }

    /// Kills every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every member that is not running, with its data, and waits until all are
    /// healthy.
    pub async fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.launch(i);
            }
        }
        self.wait_healthy().await;
    }

    /// Waits until every running member says it is healthy (it has a leader).
    pub async fn wait_healthy(&mut self) {
        if let Err(why) = self.healthy().await {
            panic!("{why}");
        }
    }

    /// Waits until every running member is healthy, or says which one exited and why.
    async fn healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let http = client();
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}/health", self.members[i].client_port);
            loop {
                // A member that exits (a port taken, say) keeps the others from a quorum:
                // watch them all.
                for j in 0..self.members.len() {
                    let Some(child) = self.members[j].child.as_mut() else {
                        continue;
                    };
                    if let Some(status) = child.try_wait().unwrap() {
                        return Err(format!(
                            "etcd member {} exited with {status}:\n{}",
                            self.members[j].name,
                            self.log(j)
                        ));
                    }
                }
                if let Ok((_, _, body)) = try_get(&http, &url).await
                    && String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Which member is the leader now, as the running members report it.
    pub async fn leader(&self) -> usize {
        let http = client();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let req = http::Request::post(format!(
                    "http://127.0.0.1:{}/v3/maintenance/status",
                    m.client_port
                ))
                .body(full("{}"))
                .unwrap();
                let Ok((_, _, body)) = send(&http, req).await else {
                    continue;
                };
                let status: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if status["leader"].is_string() && status["leader"] == status["header"]["member_id"]
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "the etcd cluster has no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// A client of the running members.
    pub async fn client(&self) -> etcd_client::Client {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        etcd_client::Client::connect(endpoints, Some(options))
            .await
            .expect("etcd-client connects")
    }

    /// The value of `key` and its mod revision, if it exists.
    pub async fn get(&self, key: &str) -> Option<(String, i64)> {
        let response = self.client().await.get(key, None).await.unwrap();
        response.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        })
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
