//! The end-to-end test kit: a real `drover` process with its own config file, log and admin
//! port; real drover-echo origins on loopback ports; and HTTP clients. Everything talks over
//! real sockets on 127.0.0.1.

#![allow(dead_code)]

pub mod consul;
pub mod dnsmasq;
pub mod docker;
pub mod etcd;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

pub type Body = BoxBody<Bytes, Infallible>;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A drover-echo origin served from this test process.
pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    /// Makes it fail or recover while it runs.
    pub state: std::sync::Arc<drover_echo::EchoState>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        Self::start_on(name, 0).await
    }

    pub async fn start_on(name: &str, port: u16) -> Origin {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(drover_echo::EchoState::default());
        let task = tokio::spawn(drover_echo::serve_with(
            listener,
            name.to_string(),
            state.clone(),
        ));
        Origin {
            addr,
            name: name.to_string(),
            state,
            task,
        }
    }

    /// Stops it as if its process died: no more connections accepted, every open one closed.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Starts one origin per name.
pub async fn origins(names: &[&str]) -> Vec<Origin> {
    let mut out = Vec::new();
    for name in names {
        out.push(Origin::start(name).await);
    }
    out
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running drover process.
pub struct Drover {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    pub admin: SocketAddr,
    /// The arguments after `run`, for a restart.
    args: Vec<String>,
    /// Environment variables set for it, for a restart too.
    env: Vec<(&'static str, &'static str)>,
    /// Sent as a bearer token by `api`.
    pub token: Option<String>,
}

impl Drover {
    /// Starts `drover run --config FILE` with `config` as the file's text.
    pub async fn start(config: &str) -> Drover {
        Self::start_env(config, &[]).await
    }

    /// Starts drover like `start`, for a test that measures how much memory it gives back:
    /// glibc's threshold above which a block gets a mapping of its own, returned to the
    /// system when it is freed, is fixed at its default of 128 KiB. Left to itself, glibc
    /// raises the threshold each time such a block is freed, and then keeps the next blocks
    /// of that size in its heap, where freeing them often returns nothing: the RSS after a
    /// burst of connections then depends on the order its buffers were freed in (73 to 131 MiB
    /// after the same burst of slow readers), not on what drover still holds (29 to 30 MiB
    /// with the threshold fixed).
    pub async fn start_measured(config: &str) -> Drover {
        Self::start_env(config, &[("MALLOC_MMAP_THRESHOLD_", "131072")]).await
    }

    async fn start_env(config: &str, env: &[(&'static str, &'static str)]) -> Drover {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, config).unwrap();
        let path_arg = path.to_str().unwrap().to_string();
        Self::spawn(dir, path, &["--config", &path_arg], env).await
    }

    /// Starts `drover run ARGS` with no config file.
    pub async fn start_args(args: &[&str]) -> Drover {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.toml");
        Self::spawn(dir, path, args, &[]).await
    }

    /// Starts drover with the config file `config` and more arguments.
    pub async fn start_with(config: &str, args: &[&str]) -> Drover {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, config).unwrap();
        let path_arg = path.to_str().unwrap().to_string();
        let mut all = vec!["--config", path_arg.as_str()];
        all.extend_from_slice(args);
        Self::spawn(dir, path.clone(), &all, &[]).await
    }

    async fn spawn(
        dir: tempfile::TempDir,
        config: PathBuf,
        args: &[&str],
        env: &[(&'static str, &'static str)],
    ) -> Drover {
        let log = dir.path().join("drover.log");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data = dir.path().join("data");
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for extra in [
            "--admin",
            &admin.to_string(),
            "--log-level",
            "info,drover_proxy=debug",
        ] {
            args.push(extra.to_string());
        }
        args.push("--data-dir".into());
        args.push(data.to_str().unwrap().to_string());
        let token = args
            .iter()
            .position(|a| a == "--admin-token")
            .map(|i| args[i + 1].clone());
        let env = env.to_vec();
        let child = Self::launch(&args, &env, &log);
        let mut d = Drover {
            child,
            dir,
            config,
            log,
            admin,
            args,
            env,
            token,
        };
        d.wait_ready().await;
        d
    }

    fn launch(args: &[String], env: &[(&str, &str)], log: &std::path::Path) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("run")
            .args(args)
            .env_remove("DROVER_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("drover starts")
    }

    /// Kills drover with SIGKILL (no chance to save or clean up anything), then starts it
    /// again with the same arguments, config file and data directory.
    pub async fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::launch(&self.args, &self.env, &self.log);
        self.wait_ready().await;
    }

    /// Calls the admin API with the token, if any; returns the status and the JSON body
    /// (Null when the body is not JSON).
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(full(body.unwrap_or("").to_string())).unwrap();
        let (status, _, bytes) = send(&client(), req).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "drover exited with {status} while starting:\n{}",
                    self.log_text()
                );
            }
            if let Ok(s) = self.status().await
                && s["generation"].as_u64() >= Some(1)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "drover not ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin API's `/api/v1/status`.
    pub async fn status(&self) -> Result<serde_json::Value, String> {
        let mut req = Request::get(format!("http://{}/api/v1/status", self.admin));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let (status, _, body) = send(&client(), req.body(empty()).unwrap()).await?;
        if status != StatusCode::OK {
            return Err(format!("status {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }

    pub async fn generation(&self) -> u64 {
        self.status().await.unwrap()["generation"].as_u64().unwrap()
    }

    /// Waits until the configuration in force is at least generation `n`.
    pub async fn wait_generation(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.generation().await < n {
            assert!(
                Instant::now() < deadline,
                "generation {n} never came:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces the config file atomically (written beside it, then renamed over it).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join(".drover.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Waits until the log contains `needle` at least `count` times; returns the log.
    pub async fn wait_log(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= count {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} x{count} never logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "drover did not exit:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident and peak resident memory in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Drover {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty() -> Body {
    Empty::new().boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// GET with a keep-alive client; the whole body.
pub async fn try_get(
    client: &Client<HttpConnector, Body>,
    url: &str,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let req = Request::get(url).body(empty()).unwrap();
    send(client, req).await
}

pub async fn get(
    client: &Client<HttpConnector, Body>,
    url: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    try_get(client, url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub async fn send(
    client: &Client<HttpConnector, Body>,
    req: Request<Body>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// GET on a new connection that is closed afterwards.
pub async fn get_fresh(addr: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .header("connection", "close")
        .body(empty())
        .unwrap();
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let _ = driver.await;
    Ok((status, body))
}

/// Which origin answered, from the x-echo-name header.
pub fn origin_of(headers: &HeaderMap) -> String {
    headers
        .get("x-echo-name")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A config with one listener `web` on `port`, routing everything to service `web` over
/// `endpoints` given as (address, weight).
pub fn one_service(port: u16, endpoints: &[(SocketAddr, u32)]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
service = "web"

[services.web]
endpoints = [ {} ]
"#,
        endpoints.join(", ")
    )
}

/// Reads one response with a Content-Length body from a keep-alive connection, as text.
pub async fn read_response(s: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(": "))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .expect("a Content-Length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Sends signal `name` (`TERM`, `STOP`, …) to process `pid`, with kill(1).
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid} failed");
}
