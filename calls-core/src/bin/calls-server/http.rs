//! HTTP + WebSocket signaling, the demo page, metrics and health; the admin API.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router as Http};
use calls_core::{CallId, RouterError, SessionId, UserId};
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::{authorize, ice_servers, random_token, Purpose};
use crate::config::ServerConfig;
use crate::load_meter::WorkerStatus;
use crate::tcp_limits::TcpLimits;
use crate::worker::{worker_for_call, ClientSender, Cmd, ToClient, Workers};

/// WebSocket close code of a join refused because the worker is overloaded: 1013 "Try Again
/// Later" (RFC 6455 registry); the reason and the `error` message before it carry the hint.
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
/// WebSocket close code of a join refused for good (token, call full, router full).
const CLOSE_REFUSED: u16 = 4001;
/// WebSocket close code of a client that did not read its signaling: its outgoing queue
/// (`ws_send_queue_messages`) filled up and the worker ended its session.
const CLOSE_SLOW_CONSUMER: u16 = 4009;
/// Bytes a WebSocket asks the kernel for per read. tungstenite zeroes this much of its buffer
/// before every read attempt, and `session_socket` attempts one each time it wakes to send a
/// message (a roster or speaker broadcast wakes every socket of the call). Its default, 128 KiB,
/// made that zeroing 40 % of the signaling thread's CPU in a 600-participant call. Signaling
/// messages are small; a larger one (an SDP offer) just takes a few reads.
const WS_READ_BUFFER: usize = 8 * 1024;

const PAGE: &str = include_str!("page.html");

/// A live session's resume ticket: while its socket is open, and for `reconnect_grace_s` after
/// it dropped.
struct Detached {
    session: SessionId,
    worker: usize,
    call: String,
    /// Who joined: only the same user (same token subject, or demo name) may resume.
    user: String,
    /// Bumped when a new socket takes the session over, so the old socket's grace timer
    /// knows not to end it.
    generation: u64,
}

pub struct App {
    pub config: ServerConfig,
    pub workers: Workers,
    pub draining: AtomicBool,
    pub started: Instant,
    next_session: AtomicU64,
    resumes: Mutex<HashMap<String, Detached>>,
    /// Live sessions per (call, user), oldest first: `max_sessions_per_user`.
    by_user: Mutex<UserSessions>,
    /// Log lines about joins refused before authentication (their call names are anyone's).
    refusal_logs: Mutex<LogBudget>,
    /// ICE-TCP connection limits and counters, for `/metrics`.
    pub tcp: TcpLimits,
    pub open_sockets: AtomicU64,
    /// Every open WebSocket's sender, to announce a drain.
    broadcast: Mutex<HashMap<u64, ClientSender>>,
    /// The recording writer (`recording_dir` set): its counters for `/metrics`.
    pub recording: Option<crate::recording::RecordingSink>,
    /// The node relay (configured), for `/metrics` and the debug admin API.
    pub node: Option<crate::node::Relay>,
}

impl App {
    pub fn new(
        config: ServerConfig,
        workers: Workers,
        tcp: TcpLimits,
        started: Instant,
        recording: Option<crate::recording::RecordingSink>,
        node: Option<crate::node::Relay>,
    ) -> Arc<App> {
        // Unique across nodes: the node id is in the high bits (node/mod.rs).
        let first_session = crate::node::first_session_id(config.node_id.unwrap_or(0));
        Arc::new(App {
            config,
            workers,
            draining: AtomicBool::new(false),
            started,
            next_session: AtomicU64::new(first_session),
            resumes: Mutex::new(HashMap::new()),
            by_user: Mutex::new(UserSessions::default()),
            refusal_logs: Mutex::new(LogBudget::default()),
            tcp,
            open_sockets: AtomicU64::new(0),
            broadcast: Mutex::new(HashMap::new()),
            recording,
            node,
        })
    }

    /// Stop accepting joins and tell every client.
    pub fn start_drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(
            deadline_s = self.config.drain_deadline_s,
            "draining: no new joins"
        );
        for w in 0..self.workers.count() {
            self.workers.send_release(w, Cmd::Drain);
        }
        let msg =
            json!({"type": "draining", "deadline_s": self.config.drain_deadline_s}).to_string();
        if let Ok(all) = self.broadcast.lock() {
            for tx in all.values() {
                // A full queue: that client is a slow consumer, its worker closes it.
                let _ = tx.try_send(ToClient::Text(msg.clone()));
            }
        }
    }
}

pub fn public(app: Arc<App>) -> Http {
    Http::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .with_state(app)
}

pub fn admin(app: Arc<App>) -> Http {
    let admin = Http::new()
        .route("/api/calls", get(admin_calls))
        .route("/api/calls/{call}", delete(admin_end_call))
        .route(
            "/api/calls/{call}/recording",
            post(admin_start_recording).delete(admin_stop_recording),
        )
        .route("/api/sessions/{session}", delete(admin_kick))
        .route("/api/sessions/{session}/bandwidth", post(admin_bandwidth))
        .route("/api/drain", post(admin_drain));
    #[cfg(debug_assertions)]
    let admin = admin
        .route("/api/debug/panic/{worker}", post(admin_debug_panic))
        .route("/api/debug/lag/{worker}/{ms}", post(admin_debug_lag))
        .route(
            "/api/debug/relay/cut/{peer}/{ms}",
            post(admin_debug_relay_cut),
        );
    admin.with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

impl App {
    /// Milliseconds since the server started (the workers' heartbeat clock).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The first worker that is not running (thread gone, or no heartbeat for
    /// `worker_stall_s`).
    fn stalled_worker(&self) -> Option<usize> {
        let now = self.now_ms();
        let stall = Duration::from_secs(self.config.worker_stall_s);
        self.workers
            .status
            .iter()
            .position(|s| !s.is_running(now, stall))
    }

    /// Whether a worker takes joins: running, not overloaded, below `worker_max_sessions`.
    fn accepts_joins(&self, status: &WorkerStatus) -> bool {
        status.level() == 0
            && status.sessions.load(Ordering::Relaxed) < self.config.worker_max_sessions as u64
    }

    /// `None` when ready for joins, else why not.
    fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("draining".to_owned());
        }
        if let Some(w) = self.stalled_worker() {
            return Some(format!("worker {w} is not running"));
        }
        if !self.workers.status.iter().any(|s| self.accepts_joins(s)) {
            return Some("every worker is overloaded or full".to_owned());
        }
        None
    }
}

/// Liveness: 503 while draining (as before) and whenever a worker is not running, so that no
/// probe is ever told all is well by a process with a dead or stuck worker.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if let Some(w) = app.stalled_worker() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("worker {w} is not running\n"),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// Readiness for new joins: also 503 while every worker is overloaded or full, so a load
/// balancer or Kubernetes sends joins elsewhere (the calls already here go on).
async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.not_ready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({
        "name": "calls reference server",
        "version": crate::VERSION,
        "commit": crate::COMMIT,
        "core": "calls-core",
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let (snapshot, unanswered) = app.workers.metrics_within(Duration::from_secs(2)).await;
    let mut text = snapshot.to_prometheus_with(app.config.metrics_per_session);
    // Process metrics before the OpenMetrics terminator.
    if let Some(stripped) = text.strip_suffix("# EOF\n") {
        text = stripped.to_owned();
    }
    text.push_str(&process_metrics(&app));
    text.push_str(&worker_metrics(&app));
    if let Some(node) = &app.node {
        text.push_str(&node.metrics().render());
    }
    text.push_str(&build_info());
    if let Some(sink) = &app.recording {
        let c = &sink.counters;
        for (name, help, value) in [
            ("calls_server_recording_dropped", "Recording file chunks dropped because the writer thread was behind (their file ends there)", &c.dropped),
            ("calls_server_recording_written_bytes", "Recording bytes written to disk", &c.written),
            ("calls_server_recording_errors", "Recording write errors (disk full, permissions)", &c.errors),
        ] {
            text.push_str(&format!(
                "# TYPE {name} counter\n# HELP {name} {help}.\n{name}_total {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
    }
    text.push_str("# TYPE calls_workers_unanswered gauge\n# HELP calls_workers_unanswered Router workers too busy to answer this scrape within 2 s (their counts are missing).\n");
    text.push_str(&format!("calls_workers_unanswered {unanswered}\n"));
    text.push_str("# EOF\n");
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `calls_build_info{version, commit} 1`: which build answers (an OpenMetrics info metric).
fn build_info() -> String {
    format!(
        "# TYPE calls_build info\n# HELP calls_build The server's version and git commit.\ncalls_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        crate::VERSION,
        crate::COMMIT
    )
}

/// Per-worker series (label `worker`, at most 255 values): load, lag, queues, liveness.
fn worker_metrics(app: &App) -> String {
    let now = app.now_ms();
    let stall = Duration::from_secs(app.config.worker_stall_s);
    let statuses = &app.workers.status;
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(usize, &WorkerStatus) -> String| {
            out += &format!("# TYPE {name} {kind}\n# HELP {name} {help}\n");
            let sample = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            for (w, s) in statuses.iter().enumerate() {
                out += &format!("{sample}{{worker=\"{w}\"}} {}\n", value(w, s));
            }
        };
    family(
        "calls_worker_up",
        "gauge",
        "1 while the worker's thread runs and its loop went round within worker_stall_s.",
        &|_, s| u8::from(s.is_running(now, stall)).to_string(),
    );
    family(
        "calls_worker_timer_lag_seconds",
        "gauge",
        "Largest lateness of a due timer in the worker's last 0.5 s window.",
        &|_, s| WorkerStatus::seconds(&s.timer_lag_us).to_string(),
    );
    family(
        "calls_worker_input_lag_seconds",
        "gauge",
        "Longest time an input waited in the worker's queue in the last 0.5 s window.",
        &|_, s| WorkerStatus::seconds(&s.input_lag_us).to_string(),
    );
    family(
        "calls_worker_busy_ratio",
        "gauge",
        "CPU time of the worker's thread over its last 0.5 s window, as a share of the window.",
        &|_, s| (s.busy_permille.load(Ordering::Relaxed) as f64 / 1000.0).to_string(),
    );
    family(
        "calls_worker_relay_links",
        "gauge",
        "Relay links of the worker to other workers and nodes (calls spread over workers or nodes; docs/relay.md).",
        &|_, s| s.relay_links.load(Ordering::Relaxed).to_string(),
    );
    family(
        "calls_worker_relay_frames_out",
        "counter",
        "Relay frames the worker handed to other workers (its share of the in-process relay).",
        &|_, s| s.relay_frames_out.load(Ordering::Relaxed).to_string(),
    );
    family(
        "calls_worker_relay_bytes_out",
        "counter",
        "Bytes of the relay frames the worker handed to other workers.",
        &|_, s| s.relay_bytes_out.load(Ordering::Relaxed).to_string(),
    );
    family(
        "calls_worker_relay_frames_in",
        "counter",
        "Relay frames from other workers the worker handled.",
        &|_, s| s.relay_frames_in.load(Ordering::Relaxed).to_string(),
    );
    family(
        "calls_worker_relay_dropped",
        "counter",
        "Relay frames dropped because the other worker's media lane was full.",
        &|_, s| s.relay_dropped.load(Ordering::Relaxed).to_string(),
    );
    family("calls_worker_load_level", "gauge", "Load level of the worker's router: 0 normal, 1 degraded (joins refused, video at its lowest layer), 2 overloaded (cameras shed).", &|_, s| s.level().to_string());
    family(
        "calls_worker_sessions",
        "gauge",
        "Sessions on the worker's router.",
        &|_, s| s.sessions.load(Ordering::Relaxed).to_string(),
    );
    let queues = &app.workers.queues;
    out += "# TYPE calls_worker_queue_depth gauge\n# HELP calls_worker_queue_depth Inputs waiting for the worker, by lane (control: signaling, STUN, DTLS, RTCP, TCP; media: RTP).\n";
    for (w, q) in queues.iter().enumerate() {
        let (control, media) = q.depth();
        out += &format!("calls_worker_queue_depth{{worker=\"{w}\",lane=\"control\"}} {control}\ncalls_worker_queue_depth{{worker=\"{w}\",lane=\"media\"}} {media}\n");
    }
    out += "# TYPE calls_worker_queue_dropped counter\n# HELP calls_worker_queue_dropped Inputs refused because the worker's lane was full (worker_queue_commands, worker_queue_datagrams).\n";
    for (w, q) in queues.iter().enumerate() {
        out += &format!(
            "calls_worker_queue_dropped_total{{worker=\"{w}\",lane=\"control\"}} {}\ncalls_worker_queue_dropped_total{{worker=\"{w}\",lane=\"media\"}} {}\n",
            q.drops.control.load(Ordering::Relaxed),
            q.drops.media.load(Ordering::Relaxed)
        );
    }
    let slow: u64 = statuses
        .iter()
        .map(|s| s.ws_slow_consumers.load(Ordering::Relaxed))
        .sum();
    out += "# TYPE calls_ws_slow_consumers counter\n# HELP calls_ws_slow_consumers WebSockets closed (4009) because they did not read their signaling (ws_send_queue_messages full).\n";
    out += &format!("calls_ws_slow_consumers_total {slow}\n");
    out += "# TYPE calls_ready gauge\n# HELP calls_ready 1 when /readyz answers 200 (joins accepted somewhere).\n";
    out += &format!("calls_ready {}\n", u8::from(app.not_ready().is_none()));
    out
}

fn process_metrics(app: &App) -> String {
    let mut out = String::new();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name: utime is 14th, stime 15th (1-based, whole line).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    if fields.len() > 13 {
        let utime: f64 = fields[11].parse().unwrap_or(0.0);
        let stime: f64 = fields[12].parse().unwrap_or(0.0);
        out += "# TYPE process_cpu_seconds counter\n# HELP process_cpu_seconds CPU time of the server process.\n";
        out += &format!("process_cpu_seconds_total {}\n", (utime + stime) / ticks);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kb) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        out += "# TYPE process_resident_memory_bytes gauge\n# HELP process_resident_memory_bytes Resident memory.\n";
        out += &format!("process_resident_memory_bytes {}\n", kb * 1024);
    }
    let tcp = &app.tcp.counters;
    out += "# TYPE calls_tcp_open gauge\n# HELP calls_tcp_open ICE-TCP connections open on the listener (routed or not).\n";
    out += &format!("calls_tcp_open {}\n", app.tcp.open());
    out += "# TYPE calls_tcp_refused counter\n# HELP calls_tcp_refused ICE-TCP connections closed at accept: over tcp_max_connections_per_ip (per_ip) or tcp_max_connections (total).\n";
    for (limit, n) in [
        ("per_ip", &tcp.refused_per_ip),
        ("total", &tcp.refused_total),
    ] {
        out += &format!(
            "calls_tcp_refused_total{{limit=\"{limit}\"}} {}\n",
            n.load(Ordering::Relaxed)
        );
    }
    out += "# TYPE calls_tcp_accept_errors counter\n# HELP calls_tcp_accept_errors Failed accepts on the ICE-TCP listener (EMFILE, …), each followed by a backoff.\n";
    out += &format!(
        "calls_tcp_accept_errors_total {}\n",
        tcp.accept_errors.load(Ordering::Relaxed)
    );
    out += "# TYPE calls_tcp_write_queue_full counter\n# HELP calls_tcp_write_queue_full ICE-TCP connections closed because the client did not read (tcp_write_queue_frames).\n";
    out += &format!(
        "calls_tcp_write_queue_full_total {}\n",
        tcp.write_queue_full.load(Ordering::Relaxed)
    );
    out += "# TYPE calls_tcp_write_stalls counter\n# HELP calls_tcp_write_stalls ICE-TCP connections closed because one write waited 10 s for a client that did not read.\n";
    out += &format!(
        "calls_tcp_write_stalls_total {}\n",
        tcp.write_stalls.load(Ordering::Relaxed)
    );
    out += "# TYPE calls_websockets gauge\n# HELP calls_websockets Open signaling WebSockets.\n";
    out += &format!(
        "calls_websockets {}\n",
        app.open_sockets.load(Ordering::Relaxed)
    );
    out += "# TYPE calls_draining gauge\n# HELP calls_draining 1 while draining.\n";
    out += &format!(
        "calls_draining {}\n",
        u8::from(app.draining.load(Ordering::SeqCst))
    );
    out += "# TYPE process_uptime_seconds gauge\n# HELP process_uptime_seconds Time since start.\n";
    out += &format!(
        "process_uptime_seconds {}\n",
        app.started.elapsed().as_secs()
    );
    out
}

#[derive(Debug, Deserialize)]
struct JoinQuery {
    call: Option<String>,
    user: Option<String>,
    token: Option<String>,
    resume: Option<String>,
}

fn origin_allowed(config: &ServerConfig, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true; // not a browser (load tests, aiortc): no Origin to check
    };
    if !config.allowed_origins.is_empty() {
        return config
            .allowed_origins
            .iter()
            .any(|o| o == origin || o == "*");
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        == Some(host)
}

async fn ws(
    State(app): State<Arc<App>>,
    Query(q): Query<JoinQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&app.config, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let max = app.config.ws_max_message_bytes;
    upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| session_socket(app, q, socket))
}

async fn close(mut socket: WebSocket, reason: &str) {
    close_with(&mut socket, CLOSE_REFUSED, reason).await;
}

/// A refused join: an `error` message with the router's code (and `retry_after_s` when a
/// retry may work), then the close: 1013 for `overloaded`, 4001 for the rest.
async fn refuse_join(mut socket: WebSocket, e: &RouterError) {
    let mut msg = json!({"type": "error", "code": e.code(), "message": e.to_string()});
    let code = match e.retry_after_s() {
        Some(s) => {
            msg["retry_after_s"] = json!(s);
            CLOSE_TRY_AGAIN_LATER
        }
        None => CLOSE_REFUSED,
    };
    if socket
        .send(Message::Text(msg.to_string().into()))
        .await
        .is_ok()
    {
        close_with(&mut socket, code, &e.to_string()).await;
    }
}

/// Closes with a code and reason, then reads (and discards) until the client's close reply, for
/// at most a second: closing a TCP socket with unread data sends a reset, and the browser would
/// report 1006 instead of our code.
async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: close_reason(reason).to_owned().into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// One participant's signaling connection, for its whole life (or until it drops).
async fn session_socket(app: Arc<App>, q: JoinQuery, mut socket: WebSocket) {
    let call = q.call.unwrap_or_default();
    if call.is_empty() || call.len() > 128 {
        return close(socket, "a call name (1–128 characters) is required").await;
    }
    let purpose = match q.resume {
        Some(_) => Purpose::Resume,
        None => Purpose::Join,
    };
    let admission = match authorize(
        &app.config,
        &call,
        q.user.as_deref(),
        q.token.as_deref(),
        purpose,
    ) {
        Ok(a) => a,
        Err(reason) => {
            app.log_refusal(&call, &reason);
            return close(socket, &reason).await;
        }
    };
    let (tx, mut rx) = mpsc::channel::<ToClient>(app.config.ws_send_queue_messages);
    // Resume a session of this user in this call (also while draining), or join anew.
    let resumed = q.resume.as_deref().and_then(|token| {
        let mut resumes = app.resumes.lock().ok()?;
        take_over(&mut resumes, token, &call, &admission.user)
            .map(|(session, worker, generation)| (session, worker, token.to_owned(), generation))
    });
    let resumed = match resumed {
        Some((session, worker, token, generation)) => {
            let (reply, alive) = tokio::sync::oneshot::channel();
            // A full queue drops `reply`: the resume fails like a vanished session.
            let _ = app.workers.send(
                worker,
                Cmd::Reattach {
                    session,
                    out: tx.clone(),
                    reply,
                },
            );
            if alive.await != Ok(true) {
                // The router removed it while the client was away (connect timeout, kicked):
                // say so instead of leaving a socket attached to nothing.
                end_session(&app, &token, worker, session, "session ended");
                return close(socket, "session ended; join again").await;
            }
            tracing::info!(%session, "signaling resumed");
            Some((session, worker, token, generation))
        }
        None => None,
    };
    let (session, worker, resume_token, generation) = match resumed {
        Some(r) => r,
        None => {
            if app.draining.load(Ordering::SeqCst) {
                return close(socket, "server is draining").await;
            }
            let session = SessionId(app.next_session.fetch_add(1, Ordering::Relaxed));
            let call_id = CallId::from(call.as_str());
            let worker = app.workers.spread.place(&call_id);
            let (reply, result) = tokio::sync::oneshot::channel();
            let join = Cmd::Join {
                session,
                call: CallId::from(call.as_str()),
                user: UserId::from(admission.user.as_str()),
                name: admission.name.clone(),
                grants: admission.grants,
                out: tx.clone(),
                reply,
            };
            let refusal = if app.workers.send(worker, join).is_err() {
                // The worker's queue is full: it is far behind, whatever its level says.
                Some(RouterError::Overloaded {
                    retry_after_s: (app.config.overload_recover_ms / 1000).max(1),
                })
            } else {
                match result.await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => return close(socket, "server is shutting down").await,
                }
            };
            if let Some(e) = refusal {
                app.workers.spread.unplace(&call_id, worker);
                tracing::info!(call = ?call, worker, code = e.code(), "join refused: {e}");
                return refuse_join(socket, &e).await;
            }
            let token = random_token();
            if let Ok(mut resumes) = app.resumes.lock() {
                resumes.insert(
                    token.clone(),
                    Detached {
                        session,
                        worker,
                        call: call.clone(),
                        user: admission.user.clone(),
                        generation: 0,
                    },
                );
            }
            // One user, one session per call (by default): the newest wins.
            let evicted = app.by_user.lock().map_or_else(
                |_| Vec::new(),
                |mut by_user| {
                    by_user.add(
                        &call,
                        &admission.user,
                        LiveSession {
                            session,
                            worker,
                            resume_token: token.clone(),
                        },
                        app.config.max_sessions_per_user,
                    )
                },
            );
            for old in evicted {
                tracing::info!(session = %old.session, user = ?admission.user, "replaced by a newer session of the same user");
                end_session(
                    &app,
                    &old.resume_token,
                    old.worker,
                    old.session,
                    "joined again elsewhere",
                );
            }
            tracing::info!(%session, call = ?call, user = ?admission.user, worker, "joined");
            (session, worker, token, 0)
        }
    };
    let welcome = json!({
        "type": "welcome",
        "session": session.0,
        "protocol": calls_core::PROTOCOL_VERSION,
        "user": admission.user,
        "name": admission.name,
        "resume": resume_token,
        "ice_servers": ice_servers(&app.config.turn_servers, &admission.user),
        "demo": app.config.demo_mode(),
    });
    if socket
        .send(Message::Text(welcome.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let socket_id = app.open_sockets.fetch_add(1, Ordering::Relaxed) + 1_000_000 * session.0;
    if let Ok(mut all) = app.broadcast.lock() {
        all.insert(socket_id, tx.clone());
    }
    drop(tx);

    // Token bucket: `rate` per second, bursts of 4×.
    let rate = f64::from(app.config.ws_messages_per_second);
    let mut tokens = rate * 4.0;
    let mut last = Instant::now();
    let mut left_for_good = false;
    'messages: loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        // A message over `ws_max_message_bytes` is abuse, not a network drop:
                        // no resume for it. (tungstenite reports it as a capacity error.)
                        let text = e.to_string();
                        if text.contains("Space limit exceeded") || text.contains("too long") {
                            tracing::info!(%session, "WebSocket message over the size limit; closing");
                            left_for_good = true;
                        }
                        break;
                    }
                    None => break,
                };
                match msg {
                    Message::Text(text) => {
                        let now = Instant::now();
                        tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate * 4.0);
                        last = now;
                        if tokens < 1.0 {
                            close_with(&mut socket, 4008, "too many messages").await;
                            left_for_good = true;
                            break;
                        }
                        tokens -= 1.0;
                        if is_leave(text.as_str()) {
                            left_for_good = true;
                            break;
                        }
                        if let Some(on) = record_request(text.as_str()) {
                            // Start or stop the call's recording: the token's `record` grant
                            // (the worker refuses it on this WebSocket without).
                            let cmd = Cmd::Record {
                                call: CallId::from(call.as_str()),
                                options: on.then(calls_core::RecordingOptions::everyone),
                                from: Some((session, admission.may_record)),
                                reply: None,
                            };
                            let _ = app.workers.send(worker, cmd);
                            continue;
                        }
                        // A full queue drops it (counted in calls_worker_queue_dropped_total).
                        let _ = app.workers.send(worker, Cmd::Signal { session, text: text.to_string() });
                    }
                    Message::Binary(_) => {
                        close_with(&mut socket, 1003, "text messages only").await;
                        left_for_good = true;
                        break;
                    }
                    Message::Close(_) => {
                        // Complete the closing handshake: tungstenite queued the reply to the
                        // client's close but writes it only on the next read (a send is refused
                        // after a close); without it browsers see 1006 instead of a clean close.
                        // That read then ends the stream at once (None).
                        let _ = tokio::time::timeout(Duration::from_secs(1), socket.recv()).await;
                        break;
                    }
                    _ => {}
                }
            }
            outgoing = rx.recv() => {
                // Everything already queued for this client goes out in one write: a join
                // sends everyone in the call several roster messages at once. (A close frame
                // is sent with a flush, which takes the fed messages before it along.)
                let mut next = outgoing;
                loop {
                    match next {
                        Some(ToClient::Text(text)) => {
                            if socket.feed(Message::Text(text.into())).await.is_err() {
                                break 'messages;
                            }
                            next = match rx.try_recv() {
                                Ok(msg) => Some(msg),
                                Err(mpsc::error::TryRecvError::Empty) => {
                                    if socket.flush().await.is_err() {
                                        break 'messages;
                                    }
                                    continue 'messages;
                                }
                                Err(mpsc::error::TryRecvError::Disconnected) => None,
                            };
                        }
                        Some(ToClient::Close(reason)) => {
                            close_with(&mut socket, 4000, &reason).await;
                            left_for_good = true;
                            break 'messages;
                        }
                        Some(ToClient::Replaced) => {
                            // Not the end of the session: the newer socket has it (its
                            // generation keeps this socket's grace timer from ending it).
                            close_with(&mut socket, 4000, "resumed on another connection").await;
                            break 'messages;
                        }
                        None => {
                            // The worker dropped our sender without a close: we did not read
                            // our messages fast enough and it ended the session.
                            close_with(&mut socket, CLOSE_SLOW_CONSUMER, "too slow: signaling queue full; join again").await;
                            break 'messages;
                        }
                    }
                }
            }
        }
    }
    app.open_sockets.fetch_sub(1, Ordering::Relaxed);
    if let Ok(mut all) = app.broadcast.lock() {
        all.remove(&socket_id);
    }
    if left_for_good {
        end_session(&app, &resume_token, worker, session, "left");
        return;
    }
    // Dropped without saying goodbye: keep the session for the grace period.
    let grace = Duration::from_secs(app.config.reconnect_grace_s);
    tracing::info!(%session, grace_s = grace.as_secs(), "signaling dropped; waiting for a resume");
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let still_ours = app
            .resumes
            .lock()
            .ok()
            .and_then(|r| r.get(&resume_token).map(|d| d.generation == generation))
            .unwrap_or(false);
        if still_ours {
            end_session(&app, &resume_token, worker, session, "signaling lost");
        }
    });
}

/// `{"type":"leave"}` in any JSON spelling (`json.dumps` puts a space after the colon).
/// `{"type":"record","on":true|false}`: a participant starts or stops the call's recording.
fn record_request(text: &str) -> Option<bool> {
    if !text.contains("record") {
        return None;
    }
    let v = serde_json::from_str::<serde_json::Value>(text).ok()?;
    (v.get("type")?.as_str()? == "record")
        .then(|| v.get("on").and_then(|o| o.as_bool()).unwrap_or(true))
}

fn is_leave(text: &str) -> bool {
    text.contains("leave")
        && serde_json::from_str::<serde_json::Value>(text)
            .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("leave"))
}

fn end_session(app: &App, resume_token: &str, worker: usize, session: SessionId, reason: &str) {
    if let Ok(mut r) = app.resumes.lock() {
        r.remove(resume_token);
    }
    if let Ok(mut by_user) = app.by_user.lock() {
        by_user.remove(session);
    }
    app.workers.send_release(
        worker,
        Cmd::Leave {
            session,
            reason: reason.to_owned(),
        },
    );
}

/// Most bytes of a WebSocket close reason (RFC 6455 §5.5: a control frame's payload is at
/// most 125 bytes, two of them the code). Longer ones made clients see 1006 instead.
const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes at a character boundary.
fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Takes over the session of resume `token` for `user` in `call`: `Some((session, worker,
/// generation))`, the generation bumped so the previous socket's grace timer leaves it alone.
/// `None` when the token is unknown or belongs to another call or user.
fn take_over(
    resumes: &mut HashMap<String, Detached>,
    token: &str,
    call: &str,
    user: &str,
) -> Option<(SessionId, usize, u64)> {
    let entry = resumes.get_mut(token)?;
    if entry.call != call || entry.user != user {
        return None;
    }
    entry.generation += 1;
    Some((entry.session, entry.worker, entry.generation))
}

/// A live session as the per-user cap sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LiveSession {
    session: SessionId,
    worker: usize,
    resume_token: String,
}

/// Live sessions per (call, user), oldest first.
#[derive(Debug, Default)]
struct UserSessions(HashMap<(String, String), Vec<LiveSession>>);

impl UserSessions {
    /// Records a new session; returns the oldest ones beyond `max` (0: no limit), to be ended.
    fn add(&mut self, call: &str, user: &str, live: LiveSession, max: usize) -> Vec<LiveSession> {
        let list = self
            .0
            .entry((call.to_owned(), user.to_owned()))
            .or_default();
        list.push(live);
        if max == 0 || list.len() <= max {
            return Vec::new();
        }
        let excess = list.len() - max;
        list.drain(..excess).collect()
    }

    /// Forgets an ended session.
    fn remove(&mut self, session: SessionId) {
        self.0.retain(|_, list| {
            list.retain(|l| l.session != session);
            !list.is_empty()
        });
    }
}

/// Refused joins logged per [`LOG_WINDOW`]; beyond it they are counted and summed up in the
/// next window's first line, so anyone trying call names cannot flood the log.
const LOGS_PER_WINDOW: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A log-line budget: [`LOGS_PER_WINDOW`] per [`LOG_WINDOW`].
#[derive(Debug, Default)]
struct LogBudget {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// `Some(lines suppressed since the last allowed one)` if a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= LOG_WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= LOGS_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl App {
    /// Logs a join refused before authentication, within the log budget. The call name is
    /// anyone's input: logged with `Debug` (escaped) and cut to 64 characters.
    fn log_refusal(&self, call: &str, reason: &str) {
        let allowed = self
            .refusal_logs
            .lock()
            .ok()
            .and_then(|mut budget| budget.allow(Instant::now()));
        if let Some(suppressed) = allowed {
            let call: String = call.chars().take(64).collect();
            tracing::info!(call = ?call, suppressed, "join refused: {reason}");
        }
    }
}

// ------------------------------------------------------------------ admin API

fn admin_authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(key) = &app.config.admin_api_key else {
        return false;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time enough for a static key compare of equal length.
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    })
}

async fn admin_calls(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(json!({ "draining": app.draining.load(Ordering::SeqCst), "calls": app.workers.calls().await })).into_response()
}

async fn admin_end_call(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(call): Path<String>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    // A call spread over workers ends on each of them.
    let call = CallId::from(call.as_str());
    let mut workers = app.workers.spread.workers_of(&call);
    if workers.is_empty() {
        workers.push(worker_for_call(call.as_str(), app.workers.count()));
    }
    for worker in workers {
        app.workers
            .send_release(worker, Cmd::EndCall { call: call.clone() });
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /api/calls/{call}/recording`, body optional: `RecordingOptions` as JSON
/// (`{"sessions": [3, 5], "audio": true, "camera": true, "screen": false}`; empty: everyone).
async fn admin_start_recording(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(call): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if app.recording.is_none() {
        return (
            StatusCode::CONFLICT,
            "recording is off: set recording_dir\n",
        )
            .into_response();
    }
    let options = if body.iter().all(u8::is_ascii_whitespace) {
        calls_core::RecordingOptions::everyone()
    } else {
        match serde_json::from_slice::<calls_core::RecordingOptions>(&body) {
            Ok(o) => o,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("recording options: {e}\n"))
                    .into_response()
            }
        }
    };
    record_command(&app, call, Some(options)).await
}

/// `DELETE /api/calls/{call}/recording`.
async fn admin_stop_recording(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(call): Path<String>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    record_command(&app, call, None).await
}

async fn record_command(
    app: &App,
    call: String,
    options: Option<calls_core::RecordingOptions>,
) -> Response {
    let worker = worker_for_call(&call, app.workers.count());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let cmd = Cmd::Record {
        call: CallId::from(call.as_str()),
        options,
        from: None,
        reply: Some(reply),
    };
    if app.workers.send(worker, cmd).is_err() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match tokio::time::timeout(Duration::from_secs(5), answer).await {
        Ok(Ok(Ok(()))) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(Err(e))) => {
            let status = match e {
                RouterError::UnknownCall(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            (
                status,
                Json(json!({"code": e.code(), "message": e.to_string()})),
            )
                .into_response()
        }
        _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn admin_kick(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(session): Path<u64>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    for w in 0..app.workers.count() {
        app.workers.send_release(
            w,
            Cmd::Leave {
                session: SessionId(session),
                reason: "removed by an administrator".into(),
            },
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The body of `POST /api/sessions/{id}/bandwidth`: `{"bps": 250000}` caps, `{"bps": null}`
/// uncaps. `bps` is required (`deserialize_with` keeps serde from reading a missing field as
/// `None`, which would silently remove a cap).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BandwidthBody {
    #[serde(deserialize_with = "Option::deserialize")]
    bps: Option<u64>,
}

fn parse_bandwidth_body(body: &[u8]) -> Result<Option<u64>, String> {
    let expected = |e: &dyn std::fmt::Display| {
        format!("expected {{\"bps\": <bits per second> | null}}: {e}\n")
    };
    // Only an object: serde would also read a struct from a sequence (`[250000]`).
    let map = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
        .map_err(|e| expected(&e))?;
    serde_json::from_value::<BandwidthBody>(serde_json::Value::Object(map))
        .map(|b| b.bps)
        .map_err(|e| expected(&e))
}

async fn admin_bandwidth(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(session): Path<String>,
    body: Bytes,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    // Parsed here rather than by the extractor, so that a bad id is 404 after the key check.
    let Ok(session) = session.parse::<u64>().map(SessionId) else {
        return (StatusCode::NOT_FOUND, "unknown session\n").into_response();
    };
    let bps = match parse_bandwidth_body(&body) {
        Ok(bps) => bps,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    match app.workers.set_bandwidth_cap(session, bps).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(RouterError::UnknownSession(_)) => {
            (StatusCode::NOT_FOUND, "unknown session\n").into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn admin_drain(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    app.start_drain();
    StatusCode::ACCEPTED.into_response()
}

/// Debug builds only: makes worker `{worker}` panic, to test the documented outcome (the
/// process exits with status 70; docs/server.md, "Overload").
#[cfg(debug_assertions)]
async fn admin_debug_panic(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(worker): Path<usize>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match app.workers.send(worker, Cmd::DebugPanic) {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such worker\n").into_response(),
    }
}

/// Debug builds only: worker `{worker}` reports at least `{ms}` of lag from now on (0 ends
/// it), so tests can drive the overload levels, refusals and `/readyz` deterministically.
#[cfg(debug_assertions)]
async fn admin_debug_lag(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((worker, ms)): Path<(usize, u64)>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let lag = Duration::from_millis(ms);
    match app.workers.send(worker, Cmd::DebugLag { lag }) {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such worker\n").into_response(),
    }
}

/// Debug builds only: drops the node relay connection with node `{peer}` and refuses it for
/// `{ms}`, so tests can watch a link drop and come back (docs/relay.md, "Between nodes").
#[cfg(debug_assertions)]
async fn admin_debug_relay_cut(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((peer, ms)): Path<(u8, u64)>,
) -> Response {
    if !admin_authorized(&app, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match &app.node {
        Some(relay) => {
            relay.cut(peer, Duration::from_millis(ms));
            StatusCode::ACCEPTED.into_response()
        }
        None => (StatusCode::NOT_FOUND, "the node relay is off\n").into_response(),
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Http,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut shutdown = shutdown;
    let _ = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 6 (issue 16): a close reason over 123 bytes (a long token error, a long call
    /// name) is cut at a character boundary, so the client sees our code, not 1006.
    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && cut.len() >= 122, "{}", cut.len());
        assert!(long.starts_with(cut));
        assert_eq!(close_reason("token expired"), "token expired");
    }

    fn detached(call: &str, user: &str) -> Detached {
        Detached {
            session: SessionId(7),
            worker: 0,
            call: call.into(),
            user: user.into(),
            generation: 0,
        }
    }

    /// Finding 5 (issue 16): a resume token takes back its session only for the same user
    /// and call, and each take-over bumps the generation (the old socket's grace timer then
    /// leaves the session alone).
    #[test]
    fn resume_is_bound_to_user_and_call() {
        let mut resumes = HashMap::new();
        resumes.insert("t".to_owned(), detached("room", "ada"));
        assert_eq!(take_over(&mut resumes, "t", "room", "mallory"), None);
        assert_eq!(take_over(&mut resumes, "t", "other", "ada"), None);
        assert_eq!(take_over(&mut resumes, "nope", "room", "ada"), None);
        assert_eq!(
            take_over(&mut resumes, "t", "room", "ada"),
            Some((SessionId(7), 0, 1))
        );
        assert_eq!(
            take_over(&mut resumes, "t", "room", "ada"),
            Some((SessionId(7), 0, 2))
        );
    }

    fn live(id: u64) -> LiveSession {
        LiveSession {
            session: SessionId(id),
            worker: 0,
            resume_token: format!("t{id}"),
        }
    }

    /// Finding 5 (issue 16): one user's joins to one call beyond `max_sessions_per_user` end
    /// the oldest (newest wins); other users and calls are not affected; 0 is no limit.
    #[test]
    fn a_user_has_one_session_per_call_and_the_newest_wins() {
        let mut by_user = UserSessions::default();
        assert!(by_user.add("room", "ada", live(1), 1).is_empty());
        assert!(by_user.add("room", "bob", live(2), 1).is_empty());
        assert!(by_user.add("other", "ada", live(3), 1).is_empty());
        assert_eq!(by_user.add("room", "ada", live(4), 1), vec![live(1)]);
        by_user.remove(SessionId(4));
        assert!(by_user.add("room", "ada", live(5), 1).is_empty());
        for id in 6..10 {
            assert!(by_user.add("room", "eve", live(id), 0).is_empty());
        }
    }

    /// Finding 6 (issue 16): refused joins (call names chosen by anyone) are logged at most
    /// 20 per 10 s; the next window's first line carries how many were left out.
    #[test]
    fn refusal_logs_are_rate_limited() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        let allowed = (0..100).filter(|_| budget.allow(start).is_some()).count();
        assert_eq!(allowed, 20);
        assert_eq!(budget.allow(start + LOG_WINDOW), Some(80));
        assert_eq!(budget.allow(start + LOG_WINDOW), Some(0));
    }

    #[test]
    fn bandwidth_body_caps_uncaps_and_refuses_the_rest() {
        assert_eq!(
            parse_bandwidth_body(br#"{"bps": 250000}"#),
            Ok(Some(250_000))
        );
        assert_eq!(parse_bandwidth_body(br#"{"bps": null}"#), Ok(None));
        for bad in [
            &br#"{}"#[..],
            br#"{"bps": -1}"#,
            br#"{"bps": "250k"}"#,
            br#"{"bps": 1.5}"#,
            br#"{"bps": 1, "extra": 2}"#,
            br#"[250000]"#,
            b"",
            b"{",
        ] {
            assert!(
                parse_bandwidth_body(bad).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
