//! A real Docker Engine for the Docker source's tests, driven with the `docker` command.
//!
//! scripts/test.sh installs Debian's docker.io and starts dockerd when none answers. No
//! registry is reachable here, so the test image is made with `docker import` from a root
//! filesystem holding busybox-static: its `httpd` serves the container's hostname (its short
//! id) at `/`, so that a response tells which container answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The test web image.
pub const IMAGE: &str = "drover-test-web:1";

/// Runs `docker ARGS`; panics with its output when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = try_docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn try_docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the docker command runs (Debian's docker.io; scripts/test.sh installs it)")
}

/// Whether the engine answers.
pub fn engine_up() -> bool {
    try_docker(&["version", "--format", "{{.Server.Version}}"])
        .status
        .success()
}

/// Waits for the engine, and makes the test image if it is missing: once per test process.
/// `Container::run` calls it too, so that a test that starts a container before anything
/// else still finds the image on a fresh engine.
pub fn ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(make_ready);
}

fn make_ready() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine_up() {
        assert!(
            Instant::now() < deadline,
            "no Docker Engine answers on /var/run/docker.sock; scripts/test.sh starts one (dockerd)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    remove_leftovers();
    if try_docker(&["image", "inspect", IMAGE]).status.success() {
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed (scripts/test.sh installs it)");
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for tool in [
        "sh", "httpd", "hostname", "mkdir", "touch", "rm", "test", "sleep", "cat", "echo",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(tool)).unwrap();
    }
    let mut tar = Command::new("tar")
        .args(["-C", root.path().to_str().unwrap(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new("docker")
        .args(["import", "-", IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(
        tar.wait().unwrap().success(),
        "tar of the test image failed"
    );
    // Another test process may have imported it at the same time: fine either way.
    assert!(
        out.status.success() || try_docker(&["image", "inspect", IMAGE]).status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the containers of test processes that are gone (killed before their drops ran).
fn remove_leftovers() {
    let listed = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=test.run",
        "--format",
        "{{.ID}} {{.Label \"test.run\"}}",
    ]);
    for line in listed.lines() {
        let Some((id, run)) = line.split_once(' ') else {
            continue;
        };
        let pid = run.split('-').next().unwrap_or_default();
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = try_docker(&["rm", "-f", id]);
        }
    }
}

/// A label value unique to one test, so that its drover takes only its own containers
/// (`--docker-constraint test.run=VALUE`).
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{nanos:x}", std::process::id())
}

/// A running container, removed on drop.
pub struct Container {
    pub name: String,
    pub id: String,
}

/// What `sh -c` runs in the test image: index.html holds the hostname, /www/healthy exists
/// until a test removes it, and httpd serves them on port 80 in the foreground.
pub const WEB: &str = "mkdir -p /www && hostname > /www/index.html && touch /www/healthy && exec httpd -f -p 80 -h /www";

impl Container {
    /// `docker run -d --name NAME -l LABEL... EXTRA... IMAGE sh -c WEB`.
    pub fn run(name: &str, labels: &[(&str, &str)], extra: &[&str]) -> Container {
        Self::run_script(name, labels, extra, WEB)
    }

    /// The same with another script for `sh -c`.
    pub fn run_script(
        name: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
        script: &str,
    ) -> Container {
        ready();
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([IMAGE.into(), "sh".into(), "-c".into(), script.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&args);
        Container {
            name: name.into(),
            id,
        }
    }

    /// The first 12 digits of its id: its hostname, so what `/` answers.
    pub fn hostname(&self) -> String {
        self.id.chars().take(12).collect()
    }

    /// Its address on the default bridge.
    pub fn ip(&self) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &self.id,
        ])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
    }

    pub fn endpoint(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip()).parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = try_docker(&["rm", "-f", &self.id]);
    }
}

/// The endpoints of a service and their admin states, from the admin API's view.
pub fn endpoint_states(service: &serde_json::Value) -> BTreeMap<String, String> {
    service["endpoints"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap_or_default().to_string(),
                        e["state"].as_str().unwrap_or("enabled").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
