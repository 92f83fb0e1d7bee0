//! The calls reference media server: the "dedicated daemon" shape of the product.
//!
//! ```sh
//! cargo run --release -p calls-core --features server --bin calls-server    # demo mode on localhost
//! cargo run --release -p calls-core --features server --bin calls-server -- --config calls.toml
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
mod media;
mod stun;
mod udp_send;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use calls_core::Router;
use tracing_subscriber::EnvFilter;

use crate::config::ServerConfig;
use crate::worker::{Worker, Workers};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: server [--config FILE] [--check-config]\n\nSettings come from FILE (TOML) and CALLS_* environment variables; see docs/server.md.\n--check-config validates them and exits (0: valid, 2: every problem listed).");
        return;
    }
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CALLS_CONFIG").map(PathBuf::from));
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match ServerConfig::load(path.as_deref(), &env) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            std::process::exit(2);
        }
    };
    if args.iter().any(|a| a == "--check-config") {
        println!("configuration ok");
        return;
    }
    init_logging(&config);
    if let Err(e) = run(config) {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

fn init_logging(config: &ServerConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    if config.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
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
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for index in 0..workers_n {
        let router_config = config
            .router_config(index as u8, &discovered)
            .map_err(|p| format!("router config: {}", p.join("; ")))?;
        let router = Router::new(router_config, Instant::now()).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let worker = Worker::new(
            index,
            router,
            udp.as_ref().and_then(media::clone_udp),
            flows.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("router-{index}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| e.to_string())?,
        );
        senders.push(tx);
    }
    let workers = Workers {
        senders,
        flows,
        probe_ufrag: config.probe_ufrag.clone(),
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
        let app = http::App::new(config.clone(), workers.clone());
        if config.tcp_port != 0 {
            let addr = SocketAddr::new(config.media_bind, config.tcp_port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind TCP {addr}: {e}"))?;
            tracing::info!(%addr, "ICE-TCP media listening");
            tokio::spawn(media::run_tcp(listener, workers.clone()));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let http_listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(|e| format!("cannot bind HTTP {}: {e}", config.http_listen))?;
        if config.demo_mode() {
            tracing::warn!("demo mode: anyone who reaches {} may join any call (set auth_secret to require tokens)", config.http_listen);
        }
        tracing::info!(
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
