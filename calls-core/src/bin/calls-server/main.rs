//! The calls reference media server: the "dedicated daemon" shape of the product.
//!
//! ```sh
//! cargo run --release -p calls-core --features server --bin calls-server    # demo mode on localhost
//! cargo run --release -p calls-core --features server --bin calls-server -- --config calls.toml
//! calls-server probe HOST:8443 --ufrag probe --password "$PROBE_PASSWORD"  # is the port reachable?
//! ```
//! Then open <http://127.0.0.1:8080/>. Media: UDP and TCP 8443; signaling: HTTP/WebSocket
//! 8080; admin API: 8445 (with an API key). See docs/server.md.
//!
//! tokio does the HTTP/WebSocket and TCP I/O, a plain thread reads the UDP socket, and one
//! `calls_core::Router` per worker thread does everything WebRTC. Calls are pinned to a worker
//! by a hash of the call id.

// The server is an embedder: it owns the clock, which calls-core's clippy config bans in the core.
#![allow(clippy::disallowed_methods)]

mod auth;
mod config;
mod http;
mod load_meter;
mod media;
mod node;
mod probe;
mod recording;
mod spread;
mod stun;
mod tcp_limits;
mod udp_send;
mod worker;
mod worker_queue;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use calls_core::Router;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::ServerConfig;
use crate::load_meter::WorkerStatus;
use crate::worker::{Worker, Workers};
use crate::worker_queue::WorkerQueue;

/// The crate version, as `--version`, `/version` and `calls_build_info` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit built (build.rs; `GIT_COMMIT` at build time, or "unknown").
pub const COMMIT: &str = env!("BUILD_GIT_COMMIT");
/// Exit status when a router worker panicked (EX_SOFTWARE): the process exits so that its
/// supervisor (systemd `Restart=`, Kubernetes) starts a fresh one (docs/server.md, "Overload").
pub const EXIT_WORKER_PANICKED: i32 = 70;
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUILD_GIT_COMMIT"),
    ")"
);

/// The calls reference media server (the dedicated daemon shape of calls).
///
/// Settings come from a TOML file (--config) overlaid with CALLS_* environment variables; every
/// setting, its variable and its default are listed below. See docs/server.md.
#[derive(Debug, Parser)]
#[command(
    name = "calls-server",
    version = LONG_VERSION,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The configuration file (TOML); CALLS_* variables override its settings.
    #[arg(long, env = "CALLS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, list every problem, and exit: 0 valid, 2 not.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Is a calls media port reachable over UDP and TCP? (a STUN request signed with the
    /// server's probe credential; see docs/server.md, "The probe")
    Probe(probe::ProbeArgs),
}

/// The command line definition, with the settings table (generated from the defaults) as the
/// help's epilogue.
fn command() -> clap::Command {
    Cli::command().after_help(config::settings_help())
}

fn main() {
    // clap prints usage errors and exits with status 2; --help and --version exit 0.
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(Command::Probe(args)) = &cli.command {
        std::process::exit(probe::run(args));
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match ServerConfig::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            std::process::exit(2);
        }
    };
    if cli.check_config {
        println!("configuration ok");
        return;
    }
    init_logging(&config);
    if let Err(e) = run(config) {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

/// Logs go to stderr; colours only when stderr is a terminal and `NO_COLOR` is unset, so a log
/// file or the journal gets plain text.
fn init_logging(config: &ServerConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if config.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
}

fn run(config: ServerConfig) -> Result<(), String> {
    let discovered: Vec<_> = config
        .stun_server
        .as_deref()
        .and_then(stun::discover_public_ip)
        .into_iter()
        .collect();
    let workers_n = match config.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
    .min(255);

    let udp = if config.disable_udp {
        tracing::warn!("UDP media disabled: clients can only connect over ICE-TCP");
        None
    } else {
        let addr = SocketAddr::new(config.media_bind, config.udp_port);
        Some(media::bind_udp(addr).map_err(|e| format!("cannot bind UDP {addr}: {e}"))?)
    };

    let flows = worker::FlowMap::default();
    let tcp_limits = tcp_limits::TcpLimits::new(
        config.tcp_max_connections,
        config.tcp_max_connections_per_ip,
    );
    let started = Instant::now();
    let recording = match &config.recording_dir {
        Some(dir) => Some(
            recording::RecordingSink::start(dir.clone(), config.recording_queue_chunks)
                .map_err(|e| format!("recording_dir {}: {e}", dir.display()))?,
        ),
        None => None,
    };
    // Every queue first: a worker hands relay frames to the others' queues (`spread.rs`).
    let queues: Vec<Arc<WorkerQueue<worker::Cmd>>> = (0..workers_n)
        .map(|_| {
            Arc::new(WorkerQueue::new(
                config.worker_queue_commands,
                config.worker_queue_datagrams,
            ))
        })
        .collect();
    let statuses: Vec<Arc<WorkerStatus>> = (0..workers_n)
        .map(|_| Arc::new(WorkerStatus::new()))
        .collect();
    let relay = config.relay_enabled().then(|| {
        (
            Arc::new(node::CallChanges::default()),
            Arc::new(node::NodeMetrics::default()),
        )
    });
    let spread = Arc::new(spread::Spread::new(
        queues.clone(),
        statuses.clone(),
        config.call_spread_after,
        relay.as_ref().map(|(changes, _)| Arc::clone(changes)),
    ));
    for index in 0..workers_n {
        let router_config = config
            .router_config(index as u8, &discovered)
            .map_err(|p| format!("router config: {}", p.join("; ")))?;
        let router = Router::new(router_config, Instant::now()).map_err(|e| e.to_string())?;
        let queue = Arc::clone(&queues[index]);
        let status = Arc::clone(&statuses[index]);
        let worker = Worker::new(
            index,
            router,
            udp.as_ref().and_then(media::clone_udp),
            flows.clone(),
            Arc::clone(&tcp_limits.counters),
            Arc::clone(&status),
            started,
        )
        .with_recording(recording.clone())
        .with_spread(Arc::clone(&spread));
        std::thread::Builder::new()
            .name(format!("router-{index}"))
            .spawn(move || run_worker(index, worker, queue, &status))
            .map_err(|e| e.to_string())?;
    }
    let workers = Workers {
        queues,
        status: statuses,
        flows,
        probe_ufrag: config.probe_ufrag.clone(),
        spread,
    };
    if let Some(udp) = udp {
        let w = workers.clone();
        std::thread::Builder::new()
            .name("udp-recv".into())
            .spawn(move || media::run_udp(udp, w))
            .map_err(|e| e.to_string())?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let node_relay = match (&relay, config.node_settings()) {
            (Some((changes, metrics)), Some(settings)) => Some(node::start(
                settings,
                workers.queues.clone(),
                Arc::clone(&workers.spread),
                Arc::clone(changes),
                Arc::clone(metrics),
            )?),
            _ => None,
        };
        let app = http::App::new(
            config.clone(),
            workers.clone(),
            tcp_limits.clone(),
            started,
            recording.clone(),
            node_relay,
        );
        if config.tcp_port != 0 {
            let addr = SocketAddr::new(config.media_bind, config.tcp_port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind TCP {addr}: {e}"))?;
            tracing::info!(%addr, "ICE-TCP media listening");
            tokio::spawn(media::run_tcp(
                listener,
                workers.clone(),
                tcp_limits.clone(),
                config.tcp_write_queue_frames,
            ));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let http_listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(|e| format!("cannot bind HTTP {}: {e}", config.http_listen))?;
        if config.demo_mode() {
            tracing::warn!("demo mode: anyone who reaches {} may join any call (set auth_secret to require tokens)", config.http_listen);
        }
        tracing::info!(
            version = VERSION,
            commit = COMMIT,
            "calls server ready: open http://{}/  (media UDP {} / TCP {} on {}, {} workers)",
            config.http_listen,
            if config.disable_udp { "off".to_owned() } else { config.udp_port.to_string() },
            config.tcp_port,
            config.media_bind,
            workers_n
        );
        let http_task = tokio::spawn(http::serve(http_listener, http::public(app.clone()), stop_rx.clone()));
        if config.admin_api_key.is_some() {
            let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
                .await
                .map_err(|e| format!("cannot bind admin API {}: {e}", config.admin_listen))?;
            tracing::info!(addr = %config.admin_listen, "admin API listening");
            tokio::spawn(http::serve(admin_listener, http::admin(app.clone()), stop_rx.clone()));
        } else {
            tracing::info!("admin API off (no admin_api_key)");
        }

        wait_for_signal().await;
        app.start_drain();
        let deadline = Instant::now() + Duration::from_secs(config.drain_deadline_s);
        loop {
            let sessions = workers.metrics().await.sessions;
            if sessions == 0 {
                tracing::info!("all calls ended; exiting");
                break;
            }
            if Instant::now() >= deadline {
                tracing::info!(sessions, "drain deadline reached; exiting");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = wait_for_signal() => {
                    tracing::info!("second signal: exiting now");
                    break;
                }
            }
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), http_task).await;
        let _ = app.open_sockets.load(Ordering::Relaxed);
        Ok::<(), String>(())
    })?;
    Ok(())
}

/// Runs one worker. A panic in it (a bug) ends the process with [`EXIT_WORKER_PANICKED`]: the
/// router's state is lost, its calls cannot go on, and a server that kept running with a dead
/// worker would keep routing that worker's calls and flows to nobody. All calls of the process
/// drop and their clients rejoin the restarted server. The panic message is on stderr first.
fn run_worker(
    index: usize,
    worker: Worker,
    queue: Arc<WorkerQueue<worker::Cmd>>,
    status: &WorkerStatus,
) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run(queue)));
    status.alive.store(false, Ordering::SeqCst);
    if outcome.is_err() {
        tracing::error!(
            worker = index,
            status = EXIT_WORKER_PANICKED,
            "router worker panicked; exiting so that the supervisor restarts the server"
        );
        std::process::exit(EXIT_WORKER_PANICKED);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let matches = command().try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn unknown_flags_are_refused_with_a_usage_message() {
        let e = parse(&["calls-server", "--bogus"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(e.to_string().contains("Usage"), "{e}");
    }

    #[test]
    fn version_names_the_commit() {
        let e = parse(&["calls-server", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        let text = e.to_string();
        assert!(text.contains(VERSION) && text.contains("commit"), "{text}");
    }

    #[test]
    fn help_lists_every_setting_with_its_variable_and_default() {
        let help = command().render_help().to_string();
        for needle in ["--config", "CALLS_CONFIG", "--check-config", "probe"] {
            assert!(help.contains(needle), "{needle} missing:\n{help}");
        }
        for line in [
            "udp_port  CALLS_UDP_PORT  8443",
            "auth_secret  CALLS_AUTH_SECRET  unset",
        ] {
            let squeezed = help.split_whitespace().collect::<Vec<_>>().join("  ");
            assert!(squeezed.contains(line), "{line:?} missing:\n{help}");
        }
    }

    #[test]
    fn probe_is_a_subcommand_with_env_credentials() {
        let cli = parse(&[
            "calls-server",
            "probe",
            "127.0.0.1:8443",
            "--ufrag",
            "probe",
            "--password",
            "secret",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Probe(_))));
        assert!(parse(&["calls-server", "probe"]).is_err());
        assert!(parse(&["calls-server", "--check-config", "probe", "h:1"]).is_err());
    }
}
