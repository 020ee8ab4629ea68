//! `drover top`: the dashboard's view in a terminal.
//!
//! It polls the admin API (`/api/v1/status`, `/api/v1/listeners`, `/api/v1/services`) every
//! `--interval`, computes each endpoint's requests and errors per second from the counters'
//! deltas between two polls, and follows `/api/v1/events` in the background for the recent
//! changes. The screen is drawn by one pure function of the [`model::Model`], in the terminal
//! (ratatui on crossterm) or, with `--once`, into a buffer printed as text.
//!
//! The admin address and the token follow `drover ctl`'s conventions. When the API cannot be
//! reached or refuses the token, the header says so and polling goes on; with `--once` the
//! frame is printed all the same, the problem goes to stderr and the exit code is 1.

mod client;
mod model;
mod render;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ratatui::DefaultTerminal;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::ctl::{self, AdminUrl};
use client::Client;
use model::{Model, Update};
use render::View;

/// How often the screen is redrawn and the keyboard read, between polls.
const TICK: Duration = Duration::from_millis(200);

/// Options of `drover top`.
#[derive(clap::Args)]
pub struct TopArgs {
    /// URL of drover's admin API: `http://HOST:PORT`, or just `HOST:PORT`.
    #[arg(long, value_name = "URL", default_value = ctl::DEFAULT_ADMIN)]
    admin: String,
    /// Token the admin API wants, sent as `Authorization: Bearer TOKEN`; by default the
    /// value of $DROVER_ADMIN_TOKEN, which keeps it out of the process list.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Time between two polls of the admin API, such as `1s` or `500ms` (100ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Print one frame as text and exit, instead of taking over the terminal: the frame
    /// after two polls --interval apart, so that rates are known. Exits 1 when the admin
    /// API could not be read.
    #[arg(long)]
    once: bool,
    /// Width of the frame --once prints.
    #[arg(long, value_name = "COLUMNS", default_value_t = 120, requires = "once",
          value_parser = clap::value_parser!(u16).range(20..=1000))]
    width: u16,
    /// Height of the frame --once prints.
    #[arg(long, value_name = "LINES", default_value_t = 40, requires = "once",
          value_parser = clap::value_parser!(u16).range(8..=1000))]
    height: u16,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<drover_model::Duration>()
        .map_err(|e| e.to_string())?
        .get();
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!(
            "{s:?} is out of range: use 100ms to 1h, such as \"1s\""
        ));
    }
    Ok(d)
}

pub fn main(args: TopArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("drover top: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `--admin` as `drover ctl` reads it, and with a port that is a number: `HOST:http` would
/// otherwise pass as port 80.
fn parse_admin(given: &str) -> Result<AdminUrl, String> {
    let admin = AdminUrl::parse(given)?;
    let authority = admin.authority.as_str();
    let port = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").map(|(_, port)| port),
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    if let Some(port) = port.filter(|p| p.parse::<u16>().is_err()) {
        return Err(format!(
            "--admin {given:?}: the port {port:?} is not a number from 0 to 65535; \
             expected http://HOST:PORT"
        ));
    }
    Ok(admin)
}

fn run(args: TopArgs) -> Result<ExitCode, String> {
    let admin = parse_admin(&args.admin)?;
    let model = Model::new(admin.url(""), args.interval);
    let client = Client {
        admin,
        token: ctl::token_or_env(args.token),
    };
    if args.once {
        once(client, model, args.interval, args.width, args.height)
    } else {
        interactive(client, model, args.interval)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

// ---------------------------------------------------------------------------------------------
// --once: one frame as text.

fn once(
    client: Client,
    mut model: Model,
    interval: Duration,
    width: u16,
    height: u16,
) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let (tx, mut rx) = unbounded_channel();
        let events = tokio::spawn(client.clone().follow_events(interval, tx));
        let first = client.poll().await;
        model.apply(Update::Poll(first, Instant::now()));
        tokio::time::sleep(interval).await;
        let second = client.poll().await;
        while let Ok(update) = rx.try_recv() {
            model.apply(update);
        }
        model.apply(Update::Poll(second, Instant::now()));
        events.abort();
    });
    model.now_ms = now_ms();
    let mut buf = Buffer::empty(Rect::new(0, 0, width, height));
    render::render(&model, &View::default(), buf.area, &mut buf);
    let text = render::buffer_text(&buf);
    let mut out = std::io::stdout().lock();
    // A closed pipe (`drover top --once | head`) is not an error.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(match &model.problem {
        Some(problem) => {
            eprintln!("drover top: {problem}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    })
}

// ---------------------------------------------------------------------------------------------
// The terminal.

fn interactive(client: Client, model: Model, interval: Duration) -> Result<(), String> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err("drover top draws on a terminal, and this is not one; \
             use --once to print one frame as text"
            .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (tx, mut rx) = unbounded_channel();
    runtime.spawn(client.clone().poll_forever(interval, tx.clone()));
    runtime.spawn(client.follow_events(interval.max(Duration::from_secs(1)), tx));
    // SIGTERM, SIGHUP (the terminal closed) and SIGINT end it as `q` does, so that the
    // terminal is restored.
    let signalled = Arc::new(AtomicBool::new(false));
    runtime.spawn(on_signal(signalled.clone()));
    // Raw mode and the alternate screen; ratatui also installs a panic hook that restores
    // the terminal before the panic is reported.
    let mut terminal =
        ratatui::try_init().map_err(|e| format!("cannot take over the terminal: {e}"))?;
    let result = screen(&mut terminal, &mut rx, model, &signalled);
    ratatui::restore();
    runtime.shutdown_background();
    result.map_err(|e| format!("terminal: {e}"))
}

async fn on_signal(signalled: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = hup.recv() => {}
        _ = int.recv() => {}
    }
    signalled.store(true, Ordering::Relaxed);
}

/// Draws and reads keys until `q`, Esc, Ctrl-C or a signal.
fn screen(
    terminal: &mut DefaultTerminal,
    rx: &mut UnboundedReceiver<Update>,
    mut model: Model,
    signalled: &AtomicBool,
) -> std::io::Result<()> {
    let mut view = View::default();
    // While paused, the screen shows this copy; the model goes on taking the polls.
    let mut frozen: Option<Model> = None;
    while !signalled.load(Ordering::Relaxed) {
        while let Ok(update) = rx.try_recv() {
            model.apply(update);
        }
        model.now_ms = now_ms();
        let shown = frozen.as_ref().unwrap_or(&model);
        terminal.draw(|frame| {
            view.scroll = render::render(shown, &view, frame.area(), frame.buffer_mut());
        })?;
        if !event::poll(TICK)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind == KeyEventKind::Release {
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Down | KeyCode::Char('j') => view.scroll += 1,
            KeyCode::Up | KeyCode::Char('k') => view.scroll = view.scroll.saturating_sub(1),
            KeyCode::PageDown => view.scroll += 10,
            KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(10),
            KeyCode::Home | KeyCode::Char('g') => view.scroll = 0,
            KeyCode::End | KeyCode::Char('G') => view.scroll = usize::MAX,
            KeyCode::Char('p') | KeyCode::Char(' ') => {
                view.paused = !view.paused;
                frozen = view.paused.then(|| model.clone());
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_needs_a_numeric_port() {
        assert_eq!(parse_admin("127.0.0.1:8687").unwrap().port, 8687);
        assert_eq!(parse_admin("http://[::1]:9000/").unwrap().port, 9000);
        assert_eq!(parse_admin("localhost").unwrap().port, 80);
        let e = parse_admin("127.0.0.1:http").unwrap_err();
        assert!(
            e.starts_with("--admin \"127.0.0.1:http\": the port \"http\""),
            "{e}"
        );
        assert!(e.ends_with("expected http://HOST:PORT"), "{e}");
        assert!(
            parse_admin("https://h:1")
                .unwrap_err()
                .contains("plain http")
        );
    }

    #[test]
    fn the_interval_has_units_and_bounds() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_interval("5")
                .unwrap_err()
                .contains("a unit is missing")
        );
        assert!(parse_interval("10ms").unwrap_err().contains("100ms to 1h"));
        assert!(parse_interval("2h").unwrap_err().contains("100ms to 1h"));
    }
}
