//! The `drover` binary: command line, wiring of sources, reconciler, data plane and admin
//! listener, signals, and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_admin::Admin;
use drover_control::api;
use drover_control::{Reconciler, Snapshot};
use drover_discovery::file::{self, FileSource};
use drover_model::{Config, SourceId};
use drover_proxy::{Proxy, Workers};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod access_log;
mod agent;
mod agents_args;
mod ctl;
mod sources;
mod store_args;
mod top;

/// A dynamic reverse proxy and load balancer.
#[derive(Parser)]
#[command(name = "drover", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Validate a config file and print the listeners, routes and services it defines.
    Check {
        /// The config file to check.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage a running drover through its admin API.
    Ctl(ctl::CtlArgs),
    /// Watch a running drover's listeners, services and endpoints in the terminal.
    Top(top::TopArgs),
    /// Register this host's labelled containers in etcd or Consul, for gateways to serve.
    Agent(Box<agent::AgentArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file, watched for changes; without it drover runs on its embedded default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address of the embedded default's HTTP listener (only without --config).
    #[arg(long, value_parser = parse_listen)]
    listen: Option<SocketAddr>,
    /// Address of the admin listener.
    #[arg(long, default_value = "127.0.0.1:8687", value_parser = parse_listen)]
    admin: SocketAddr,
    /// Bearer token the admin API requires (from DROVER_ADMIN_TOKEN when not given here).
    /// Needed when --admin is not a loopback address.
    #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Directory for state made through the management API.
    #[arg(long, default_value = "./drover-data")]
    data_dir: PathBuf,
    /// Worker threads of the data plane [default: the CPUs this process may run on].
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, such as `info` or `drover_proxy=debug,info` (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    log_level: String,
    #[command(flatten)]
    mappings: sources::MappingArgs,
    #[command(flatten)]
    docker: sources::DockerArgs,
    #[command(flatten)]
    agents: agents_args::AgentsArgs,
    #[command(flatten)]
    access_log: access_log::AccessLogArgs,
    #[command(flatten)]
    store: store_args::StoreArgs,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    drover_model::spec::parse_listen_addr(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Ctl(args) => ctl::main(args),
        Command::Top(args) => top::main(args),
        Command::Agent(args) => agent::main(args),
        Command::Run(args) => {
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log_level.clone());
            // Logs go through a bounded queue to a writer thread: nothing logs synchronously.
            let (writer, _flush_on_exit) = tracing_appender::non_blocking(std::io::stdout());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer)
                .with_ansi(false)
                .init();
            // The data plane serves on workers of its own, one thread each; the rest of
            // drover (sources, reconciler, admin API, health checks) on one more thread.
            let workers = args
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let result = Workers::start(workers)
                .context("cannot start the data plane's worker threads")
                .and_then(|workers| {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name("drover-control")
                        .enable_all()
                        .build()
                        .context("cannot start the async runtime")?;
                    runtime.block_on(run(args, &workers))
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("drover: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match drover_config::load(path) {
        Ok(config) => {
            print!("{}", describe(&config));
            println!("{}: OK", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The listeners, routes and services of a configuration, as `drover check` prints them.
fn describe(c: &Config) -> String {
    let mut out = String::from("listeners:\n");
    for l in &c.listeners {
        out += &format!(
            "  {:<16} {:<22} {:<5} max_connections={} request_header_timeout={} idle_timeout={}\n",
            l.name,
            l.listen,
            l.protocol,
            l.max_connections,
            l.request_header_timeout,
            l.idle_timeout
        );
    }
    out += "routes:\n";
    for r in &c.routes {
        out += &format!("  {r}\n");
    }
    out += "services:\n";
    for (name, s) in &c.services {
        out += &format!(
            "  {name:<16} policy={} endpoints={} connect_timeout={} response_timeout={}\n",
            s.policy,
            s.endpoints.len(),
            s.connect_timeout,
            s.response_timeout
        );
        for e in &s.endpoints {
            out += &format!("    {} weight={}\n", e.address, e.weight);
        }
    }
    out
}

async fn run(args: Box<RunArgs>, workers: &Workers) -> anyhow::Result<()> {
    let token = args.admin_token.clone().filter(|t| !t.is_empty());
    anyhow::ensure!(
        token.is_some() || args.admin.ip().is_loopback(),
        "the admin API on {} would be reachable from other hosts without a token; set --admin-token or DROVER_ADMIN_TOKEN, or bind it to a loopback address such as 127.0.0.1:8687",
        args.admin
    );
    // The API's state: the file in --data-dir, or with --store what etcd holds.
    let api_start = args.store.open(&args.data_dir).await?;
    let access_log = args.access_log.start()?;
    let proxy = Proxy::on(workers, access_log.clone());
    let data_plane = proxy.handle();
    let mut reconciler = Reconciler::new(proxy);
    let status = reconciler.subscribe();
    let (snapshots, inbox) = mpsc::channel(64);
    let (reload, reload_rx) = mpsc::channel(1);

    args.mappings.check()?;
    let mapping_initial = args.mappings.initial();
    let with_mappings = args.mappings.any() || args.docker.enabled() || args.agents.enabled();
    let mapping_source = args.mappings.build()?;
    let docker_source = args.docker.build()?;
    let watched = match &args.config {
        Some(path) => {
            anyhow::ensure!(
                args.listen.is_none(),
                "--listen sets the embedded default's listener; with --config, set `listen` in the file"
            );
            // Watch first: a change made while the file is first read is then not missed.
            let source = FileSource::watch(path)
                .with_context(|| format!("cannot watch {}", path.display()))?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config = drover_config::parse(&text, path).map_err(|e| anyhow::anyhow!("{e}"))?;
            // The id the source's later snapshots carry: from its absolute path.
            let id = file::source_id(source.path());
            drover_control::sources::health(&id).synced();
            reconciler
                .apply_now(Snapshot::new(id, config, "startup"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Some((source, text))
        }
        None if with_mappings => {
            anyhow::ensure!(
                args.listen.is_none(),
                "--listen sets the embedded default's listener; mappings and containers listen on their own ports"
            );
            None
        }
        None => {
            let listen = args.listen.unwrap_or(([127, 0, 0, 1], 8080).into());
            let snapshot = Snapshot::new(
                SourceId("default".into()),
                Config::embedded_default(listen),
                "startup (embedded default)",
            );
            reconciler
                .apply_now(snapshot)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            None
        }
    };

    if let Some((source, config)) = mapping_initial {
        reconciler
            .apply_now(Snapshot::new(source, config, "startup (mappings)"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(state) = api_start.initial().filter(|s| !s.is_empty()) {
        let origin = api_start.origin(&args.data_dir);
        reconciler
            .apply_now(Snapshot::new(
                api::source_id(),
                state.to_config(),
                api_start.reason(),
            ))
            .map_err(|e| {
                anyhow::anyhow!(
                    "the state made through the API, {origin}, does not fit the configuration: {e}"
                )
            })?;
    }
    let admin_listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("admin listener: cannot listen on {}", args.admin))?;
    tracing::info!(
        "admin API on {}{}",
        args.admin,
        if token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    let stop_admin = CancellationToken::new();
    let (api_store, follower) =
        api_start.into_store(&args.data_dir, snapshots.clone(), status.clone());
    let admin = Arc::new(Admin {
        api: api_store,
        status,
        proxy: data_plane.clone(),
        events: reconciler.events(),
        reconciler: reconciler.metrics(),
        token,
        stop: stop_admin.clone(),
    });
    tokio::spawn(drover_admin::serve(admin_listener, admin));

    let stop_sources = CancellationToken::new();
    if let Some(follower) = follower {
        follower.spawn(stop_sources.clone());
    }
    mapping_source.spawn(snapshots.clone(), stop_sources.clone());
    if let Some(docker) = docker_source {
        tokio::spawn(docker.run(
            snapshots.clone(),
            reconciler.subscribe(),
            stop_sources.clone(),
        ));
    }
    args.agents.spawn(snapshots.clone(), stop_sources.clone())?;
    tokio::spawn(reconciler.run(inbox));
    if let Some((source, text)) = watched {
        tokio::spawn(source.run(snapshots.clone(), reload_rx, text));
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = usr1.recv() => match &access_log {
                Some(log) => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    log.reopen();
                }
                None => tracing::info!("SIGUSR1: no access log to reopen"),
            },
            _ = hup.recv() => {
                if args.config.is_some() {
                    tracing::info!("SIGHUP: re-reading the config file");
                    let _ = reload.try_send(());
                } else {
                    tracing::info!("SIGHUP: no config file to re-read");
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        }
    }
    stop_admin.cancel();
    stop_sources.cancel();
    data_plane.shutdown().await;
    if let Some(log) = &access_log {
        log.flush(std::time::Duration::from_secs(1)).await;
    }
    tracing::info!("stopped");
    Ok(())
}
