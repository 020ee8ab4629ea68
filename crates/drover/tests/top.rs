mod support;

// `drover top` against a real drover: `--once` prints the frame the terminal would show, and
// the tests read it as a user would; one test drives the interactive screen in tmux.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// What one run of `drover top` did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the run succeeded with nothing on stderr; the frame.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:#?}");
        assert_eq!(self.stderr, "", "{self:#?}");
        &self.stdout
    }
}

fn top_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_drover"));
    command
        .arg("top")
        .args(args)
        .env_remove("DROVER_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn finished(child: std::process::Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs `drover top ARGS` with `env` as extra environment (DROVER_ADMIN_TOKEN is removed
/// unless given), off the test's async threads.
async fn top_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let child = top_command(args, env).spawn().unwrap();
    tokio::task::spawn_blocking(move || finished(child))
        .await
        .unwrap()
}

/// `drover top --once --admin ADMIN --interval 300ms ARGS`.
async fn top_once(admin: SocketAddr, args: &[&str]) -> Run {
    let admin = admin.to_string();
    let mut all = vec!["--once", "--admin", &admin, "--interval", "300ms"];
    all.extend_from_slice(args);
    top_env(&all, &[]).await
}

/// The cells of the endpoint row of `address` in the services panel: address, weight, state,
/// health, in-flight, requests/s, errors/s, then the sparkline and the reason.
fn endpoint_row<'a>(frame: &'a str, address: &str) -> Vec<&'a str> {
    let needle = format!("│  {address} ");
    let line = frame
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no row for {address} in\n{frame}"));
    let row: Vec<&str> = line.split_whitespace().skip(1).collect();
    assert!(row.len() >= 7, "{line}");
    row
}

/// The columns' titles, as the rows are read by `endpoint_row`.
fn assert_columns(frame: &str) {
    let header = frame
        .lines()
        .find(|l| l.contains("ADDRESS"))
        .unwrap_or_else(|| panic!("no column titles in\n{frame}"));
    let titles: Vec<&str> = header.split_whitespace().skip(1).take(7).collect();
    assert_eq!(
        titles,
        [
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "IN-FLIGHT",
            "REQ/S",
            "ERR/S"
        ],
        "{frame}"
    );
}

fn rate(row: &[&str]) -> f64 {
    row[5]
        .parse()
        .unwrap_or_else(|_| panic!("no rate in {row:?}"))
}

/// GETs the service view until `want` holds for it.
async fn service_until(d: &Drover, name: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = d
            .api("GET", &format!("/api/v1/services/{name}"), None)
            .await;
        if want(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never came: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoint_of(service: &Value, address: SocketAddr) -> &Value {
    service["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address.to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_lists_listeners_services_endpoints_and_the_rates_of_those_that_served() {
    let o = origins(&["one", "two", "three"]).await;
    let (web, quiet) = (free_port(), free_port());
    let config = format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{web}"

[[listeners]]
name = "quiet"
listen = "127.0.0.1:{quiet}"

[[routes]]
listener = "web"
service = "web"

[[routes]]
listener = "quiet"
service = "idle"

[services.web]
endpoints = [ {{ address = "{}", weight = 1 }}, {{ address = "{}", weight = 1 }} ]

[services.idle]
policy = "least_conn"
endpoints = [ {{ address = "{}", weight = 3 }} ]
"#,
        o[0].addr, o[1].addr, o[2].addr
    );
    let d = Drover::start(&config).await;

    // Traffic through `web` for as long as top measures.
    let admin = d.admin.to_string();
    let mut child = top_command(
        &[
            "--once",
            "--admin",
            &admin,
            "--interval",
            "1s",
            "--width",
            "140",
            "--height",
            "40",
        ],
        &[],
    )
    .spawn()
    .unwrap();
    let client = client();
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "drover top --once did not end");
        let (status, _, _) = get(&client, &format!("http://127.0.0.1:{web}/")).await;
        assert_eq!(status, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = finished(child);
    let frame = run.ok();
    assert!(sent > 20, "only {sent} requests were sent");

    assert!(frame.contains("generation 1"), "{frame}");
    assert!(frame.contains(&format!("http://{}", d.admin)), "{frame}");
    for (name, port) in [("web", web), ("quiet", quiet)] {
        let line = frame
            .lines()
            .find(|l| l.starts_with(&format!("│{name} ")))
            .unwrap_or_else(|| panic!("listener {name} missing:\n{frame}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[..3],
            [&format!("│{name}"), &format!("127.0.0.1:{port}"), "http"],
            "{frame}"
        );
    }
    assert!(
        frame
            .lines()
            .any(|l| l.contains("│web  round_robin  2 endpoints")),
        "{frame}"
    );
    assert!(
        frame
            .lines()
            .any(|l| l.contains("│idle  least_conn  1 endpoint")),
        "{frame}"
    );
    assert_columns(frame);
    for origin in &o[..2] {
        let row = endpoint_row(frame, &origin.addr.to_string());
        assert_eq!(&row[1..4], ["1", "enabled", "up"], "{frame}");
        let in_flight: u64 = row[4].parse().unwrap();
        assert!(in_flight <= 1, "one request at a time: {frame}");
        assert!(rate(&row) > 0.0, "{} served traffic:\n{frame}", origin.name);
        assert_eq!(row[6], "0", "no errors: {frame}");
        // The sparkline's one sample is the tallest bar.
        assert_eq!(row[7], "█", "{frame}");
    }
    let idle = endpoint_row(frame, &o[2].addr.to_string());
    assert_eq!(&idle[1..4], ["3", "enabled", "up"], "{frame}");
    assert_eq!(rate(&idle), 0.0, "{frame}");
    // Both endpoints of web shared the requests of one second, round robin.
    let total: f64 = o[..2]
        .iter()
        .map(|x| rate(&endpoint_row(frame, &x.addr.to_string())))
        .sum();
    assert!(
        total <= sent as f64 * 1.5,
        "{total} req/s for {sent} requests"
    );
    // The change that made generation 1 is listed.
    assert!(frame.contains("Recent changes"), "{frame}");
    assert!(frame.contains("service web added"), "{frame}");
    assert_eq!(frame.lines().count(), 40);
    assert!(frame.lines().all(|l| l.chars().count() <= 140), "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_endpoint_shows_drain_and_a_stopped_one_shows_down() {
    let o = origins(&["one", "two"]).await;
    let port = free_port();
    let mut config = one_service(port, &[(o[0].addr, 1), (o[1].addr, 1)]);
    config.push_str(
        "\n[services.web.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\n",
    );
    let d = Drover::start(&config).await;

    let (status, _) = d
        .api(
            "PATCH",
            &format!("/api/v1/services/web/endpoints/{}", o[0].addr),
            Some(r#"{"state":"drain"}"#),
        )
        .await;
    assert_eq!(status, 200);
    o[1].stop();
    service_until(&d, "web", |v| {
        endpoint_of(v, o[1].addr)["health"]["state"] == "unhealthy"
    })
    .await;

    let run = top_once(d.admin, &[]).await;
    let frame = run.ok();
    assert_columns(frame);
    let drained = endpoint_row(frame, &o[0].addr.to_string());
    assert_eq!(&drained[2..4], ["drain", "up"], "{frame}");
    let down = endpoint_row(frame, &o[1].addr.to_string());
    assert_eq!(&down[2..4], ["enabled", "down"], "{frame}");
    let line = frame
        .lines()
        .find(|l| l.contains(&format!("│  {} ", o[1].addr)))
        .unwrap();
    assert!(line.contains("failed check"), "the reason: {line}");
    // The drain is the last change, in the header and in the list.
    assert!(frame.contains("generation 2"), "{frame}");
    assert!(frame.contains("last change"), "{frame}");
    assert!(
        frame.contains(&format!(
            "service web: endpoint {} state enabled -> drain",
            o[0].addr
        )),
        "{frame}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_top_reports_the_401_and_exits_1_and_with_it_works() {
    let o = origins(&["one"]).await;
    let port = free_port();
    let d = Drover::start_with(
        &one_service(port, &[(o[0].addr, 1)]),
        &["--admin-token", "s3cret"],
    )
    .await;
    let address = o[0].addr.to_string();

    let run = top_once(d.admin, &[]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.starts_with("drover top: "), "{run:#?}");
    assert!(run.stderr.contains("401"), "{run:#?}");
    assert!(
        run.stderr
            .contains("pass --token TOKEN or set DROVER_ADMIN_TOKEN"),
        "{run:#?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    // The frame says it too, and shows nothing it could not read.
    assert!(run.stdout.contains("problem: the admin API at"), "{run:#?}");
    assert!(run.stdout.contains("401"), "{run:#?}");
    assert!(!run.stdout.contains(&address), "{run:#?}");

    let run = top_once(d.admin, &["--token", "wrong"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("the token given was refused"),
        "{run:#?}"
    );

    let run = top_once(d.admin, &["--token", "s3cret"]).await;
    let row = endpoint_row(run.ok(), &address);
    assert_eq!(row[2], "enabled");

    let admin = d.admin.to_string();
    let run = top_env(
        &["--once", "--admin", &admin, "--interval", "200ms"],
        &[("DROVER_ADMIN_TOKEN", "s3cret")],
    )
    .await;
    endpoint_row(run.ok(), &address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_admin_value_is_refused_with_what_is_expected() {
    for args in [
        &["--once", "--admin", "https://127.0.0.1:8687"][..],
        &["--once", "--admin", "127.0.0.1:http"],
        &["--once", "--admin", "http://user:pw@127.0.0.1:8687"],
        // Before the terminal is touched, too.
        &["--admin", "not an address"],
    ] {
        let started = Instant::now();
        let run = top_env(args, &[]).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(
            run.stderr.starts_with("drover top: --admin "),
            "{args:?}: {run:#?}"
        );
        assert!(
            run.stderr.contains("expected http://HOST:PORT"),
            "{args:?}: {run:#?}"
        );
        assert_eq!(run.stdout, "", "{args:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
    }
    let run = top_env(&["--once", "--admin", "https://127.0.0.1:8687"], &[]).await;
    assert!(run.stderr.contains("plain http"), "{run:#?}");

    let run = top_env(&["--once", "--interval", "5"], &[]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("--interval"), "{run:#?}");
    assert!(run.stderr.contains("a unit is missing"), "{run:#?}");
    let run = top_env(&["--width", "100"], &[]).await;
    assert_eq!(run.code, Some(2), "--width needs --once: {run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_api_that_cannot_be_reached_is_named_in_the_frame() {
    let port = free_port();
    let run = top_env(
        &[
            "--once",
            "--admin",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "200ms",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let header = run.stdout.lines().take(4).collect::<Vec<_>>().join(" ");
    assert!(
        header.contains(&format!(
            "problem: cannot reach the admin API at http://127.0.0.1:{port}"
        )),
        "{run:#?}"
    );
    assert!(header.contains("retrying every 200ms"), "{run:#?}");
    assert!(
        run.stderr
            .starts_with("drover top: cannot reach the admin API"),
        "{run:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_top_says_to_use_once() {
    let o = origins(&["one"]).await;
    let d = Drover::start(&one_service(free_port(), &[(o[0].addr, 1)])).await;
    let admin = d.admin.to_string();
    let run = top_env(&["--admin", &admin], &[]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("use --once"), "{run:#?}");
}

// ---------------------------------------------------------------------------------------------
// The interactive screen, in a tmux pane.

/// A tmux server of this test's own, on a socket in a temporary directory; killed when
/// dropped.
struct Tmux {
    dir: tempfile::TempDir,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("socket"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// Waits until the pane shows every one of `needles`; the screen.
    async fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{needles:?} never showed:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("socket"))
            .arg("kill-server")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_terminal_top_draws_pauses_and_quits_on_q_or_sigterm_restoring_the_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed (apt-get install tmux)");
        return;
    }
    let o = origins(&["one", "two"]).await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(o[0].addr, 1), (o[1].addr, 1)])).await;
    let tmux = Tmux {
        dir: tempfile::tempdir().unwrap(),
    };
    tmux.run(&[
        "-f",
        "/dev/null",
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "36",
        "sh",
    ]);
    // A shell runs top, then says how top ended and how the terminal was left (the markers
    // it prints, `TOP-EXIT=0` and `END2`, are not in the command line it echoes).
    let command = format!(
        "{} top --admin {} --interval 300ms; echo TOP-EXIT=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo; echo END$((1+1))",
        env!("CARGO_BIN_EXE_drover"),
        d.admin
    );
    tmux.run(&["send-keys", "-t", "top", "-l", &command]);
    tmux.run(&["send-keys", "-t", "top", "Enter"]);

    let a = o[0].addr.to_string();
    let b = o[1].addr.to_string();
    let screen = tmux
        .wait_for(&["generation 1", &a, &b, "Recent changes", "q  quit"])
        .await;
    assert!(screen.contains("┌ Services"), "{screen}");

    // A change made now shows up in the list, with its reason from the event stream.
    let (status, _) = d
        .api(
            "PATCH",
            &format!("/api/v1/services/web/endpoints/{b}"),
            Some(r#"{"weight":5}"#),
        )
        .await;
    assert_eq!(status, 200);
    tmux.wait_for(&[
        "generation 2",
        &format!("(PATCH /api/v1/services/web/endpoints/{b})"),
    ])
    .await;

    tmux.run(&["send-keys", "-t", "top", "p"]);
    tmux.wait_for(&["PAUSED", "p  resume"]).await;
    tmux.run(&["send-keys", "-t", "top", "p"]);
    let screen = tmux.wait_for(&["p  pause"]).await;
    assert!(!screen.contains("PAUSED"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let screen = tmux.wait_for(&["TOP-EXIT=0", "END2"]).await;
    // Raw mode is off again (line editing and echo are back) and the alternate screen is
    // gone: the shell's screen shows the command, not the dashboard.
    assert_restored(&screen, "TOP-EXIT=0");

    // SIGTERM ends it as q does.
    tmux.run(&["send-keys", "-t", "top", "clear", "Enter"]);
    let pid_file = d.dir.path().join("top.pid");
    let command = format!(
        "sh -c 'echo $$ > {}; exec {} top --admin {} --interval 300ms'; echo TOP2-EXIT=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo; echo END$((2+1))",
        pid_file.display(),
        env!("CARGO_BIN_EXE_drover"),
        d.admin
    );
    tmux.run(&["send-keys", "-t", "top", "-l", &command]);
    tmux.run(&["send-keys", "-t", "top", "Enter"]);
    tmux.wait_for(&["generation 2", &a, "q  quit"]).await;
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let screen = tmux.wait_for(&["TOP2-EXIT=0", "END3"]).await;
    assert_restored(&screen, "TOP2-EXIT=0");
}

/// Asserts that the line after `marker` lists the terminal modes of a cooked terminal, and
/// that the dashboard is not on the screen.
fn assert_restored(screen: &str, marker: &str) {
    let modes = screen
        .lines()
        .skip_while(|l| !l.contains(marker))
        .nth(1)
        .unwrap_or_default();
    let modes: Vec<&str> = modes.split_whitespace().collect();
    assert!(
        modes.contains(&"icanon") && modes.contains(&"echo"),
        "{modes:?}\n{screen}"
    );
    assert!(!screen.contains("┌ Services"), "{screen}");
}
