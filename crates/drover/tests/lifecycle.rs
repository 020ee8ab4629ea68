//! The process as an operator sees it: `drover check`, `--version`, start-up failures, and
//! graceful shutdown on SIGTERM.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn drover(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .output()
        .unwrap()
}

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn check_passes_on_every_example() {
    let files = examples();
    assert!(files.len() >= 3, "examples/ has {files:?}");
    for file in files {
        let out = drover(&["check", "--config", file.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("listeners:\n") && stdout.contains("services:\n"),
            "{stdout}"
        );
        assert!(stdout.trim_end().ends_with(": OK"), "{stdout}");
    }
}

#[test]
fn check_prints_the_effective_configuration() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/basic.toml");
    let out = drover(&["check", "--config", file.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Defaults the file leaves out are shown as they apply.
    assert!(stdout.contains("web              127.0.0.1:8080         http  max_connections=10000 request_header_timeout=10s idle_timeout=75s"), "{stdout}");
    assert!(
        stdout.contains("web host=example.com path_prefix=/api -> webserver"),
        "{stdout}"
    );
    assert!(
        stdout.contains("127.0.0.1:9001 weight=2") && stdout.contains("127.0.0.1:9002 weight=1"),
        "{stdout}"
    );
}

#[test]
fn check_fails_with_the_line_and_field_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[listeners]]\nname = \"web\"\nlisten = \"127.0.0.1:80\"\n\n[[routes]]\nlistener = \"web\"\nservice = \"api\"\n\n[[routes]]\nlistener = \"nope\"\nservice = \"api\"\n",
    )
    .unwrap();
    let out = drover(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    let f = file.display();
    assert_eq!(
        lines,
        [
            format!(
                "{f}:7:11: routes[0].service: no service named \"api\"; no services are defined"
            ),
            format!(
                "{f}:10:12: routes[1].listener: no listener named \"nope\"; defined listeners: \"web\""
            ),
            format!(
                "{f}:11:11: routes[1].service: no service named \"api\"; no services are defined"
            ),
        ]
    );
    let missing = drover(&["check", "--config", "/nonexistent/drover.toml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"));
}

#[test]
fn version_is_printed() {
    let out = drover(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("drover {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_refuses_an_invalid_first_config_and_a_busy_port() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.toml");
    std::fs::write(
        &file,
        "[[listeners]]\nname = \"web\"\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let out = drover(&[
        "run",
        "--config",
        file.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("d.toml:3:10: listeners[0].listen: invalid address \"nowhere\""),
        "{stderr}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = drover(&["run", "--listen", &addr, "--admin", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("listener default: cannot listen on {addr}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_in_flight_completes_after_sigterm() {
    let origin = Origin::start("slow").await;
    let port = free_port();
    let mut d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let url = format!("http://127.0.0.1:{port}/slow?ms=1500");
    let in_flight = tokio::spawn(async move { try_get(&client(), &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    d.signal("TERM");

    // New connections are refused at once.
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with(b"slow\nslept 1500 ms"));
    let exit = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "{}", d.log_text());
    assert!(
        signalled.elapsed() >= Duration::from_millis(1000),
        "exited before the request ended"
    );
    assert!(d.log_text().contains("SIGTERM: shutting down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_grace_is_cut_and_drover_still_exits_cleanly() {
    let origin = Origin::start("slow").await;
    let port = free_port();
    let config = format!(
        "[global]\nshutdown_grace = \"500ms\"\n{}",
        one_service(port, &[(origin.addr, 1)])
    );
    let mut d = Drover::start(&config).await;
    let url = format!("http://127.0.0.1:{port}/slow?ms=20000");
    let in_flight = tokio::spawn(async move { try_get(&client(), &url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    d.signal("INT");
    let exit = d.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(exit.code(), Some(0), "{}", d.log_text());
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(in_flight.await.unwrap().is_err(), "the request was cut");
}

/// `--workers 3` runs the data plane on three threads of its own, named so that `ps -L` and
/// `top -H` tell them apart, beside one for the sources, the admin API and health checks.
#[tokio::test]
async fn the_data_plane_runs_on_the_worker_threads_asked_for() {
    let origin = Origin::start("a").await;
    let port = free_port();
    let drover =
        Drover::start_with(&one_service(port, &[(origin.addr, 1)]), &["--workers", "3"]).await;
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", drover.pid()));
    let mut names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("drover-"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "drover-control",
            "drover-worker-0",
            "drover-worker-1",
            "drover-worker-2"
        ]
    );
    let (status, _) = get_fresh(([127, 0, 0, 1], port).into(), "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}
