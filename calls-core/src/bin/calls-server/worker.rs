//! One router per worker thread. Calls are pinned to a worker by a hash of the call id; the
//! media dispatcher routes a new 5-tuple by the worker index minted into the ICE ufrag, then
//! by the flow table workers fill from `Event::FlowAdmitted`.

use crate::recording::{RecordingSink, Truncated};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calls_core::{
    CallId, ConnId, Datagram, Event, Grants, LinkId, MetricsSnapshot, Output, Proto, Router,
    RouterError, SessionId, UserId,
};
use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::load_meter::{LoadMeter, WorkerStatus};
use crate::node::NodeTx;
use crate::spread::Spread;
use crate::tcp_limits::TcpCounters;
use crate::udp_send::UdpSender;
use crate::worker_queue::{Lane, Queued, WorkerQueue};

/// 5-tuple (remote, proto) → worker, kept from the routers' flow events (admitted, removed):
/// exactly the flows some router has now, so it neither grows without bound nor keeps a
/// flow that moved to another worker pointed at the old one.
pub type FlowMap = Arc<Mutex<HashMap<(Proto, SocketAddr), usize>>>;

/// The write side of one ICE-TCP connection, held by the worker: a bounded queue of frames for
/// its writer task. Dropping it closes the connection: what is queued is still written while
/// the socket takes it, but a write that has to wait for the client ends the connection at
/// once (a client that does not read is not waited for).
#[derive(Debug)]
pub struct TcpWriter {
    frames: mpsc::Sender<Vec<u8>>,
    /// Never sent on: the writer task stops when this is dropped.
    _close_on_drop: oneshot::Sender<()>,
}

impl TcpWriter {
    /// A writer whose queue holds at most `queue_frames` frames, and the other end, for the
    /// connection's writer task.
    pub fn new(queue_frames: usize) -> (TcpWriter, TcpWriterTask) {
        let (frames, queue) = mpsc::channel(queue_frames);
        let (close, dropped) = oneshot::channel();
        let writer = TcpWriter {
            frames,
            _close_on_drop: close,
        };
        (writer, TcpWriterTask { queue, dropped })
    }
}

/// What the connection's writer task reads: the frames, and whether the worker dropped the
/// [`TcpWriter`].
#[derive(Debug)]
pub struct TcpWriterTask {
    /// Frames to write, in order.
    pub queue: mpsc::Receiver<Vec<u8>>,
    /// Completes (with an error) when the worker drops the [`TcpWriter`].
    pub dropped: oneshot::Receiver<()>,
}

/// The sending side of a session's WebSocket: bounded (`ws_send_queue_messages`). A worker
/// that finds it full ends the session and drops it; the socket task then closes the
/// WebSocket with 4009 (a slow consumer is closed, not buffered for ever).
pub type ClientSender = mpsc::Sender<ToClient>;

/// A message for a session's WebSocket.
#[derive(Debug)]
pub enum ToClient {
    Text(String),
    Close(String),
    /// A resumed socket took the session over: close this one, the session goes on.
    Replaced,
}

/// Commands from the I/O side to a worker.
#[derive(Debug)]
pub enum Cmd {
    Datagram {
        source: SocketAddr,
        destination: SocketAddr,
        bytes: Vec<u8>,
        at: Instant,
    },
    TcpAccepted {
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
        writer: TcpWriter,
    },
    TcpData {
        conn: ConnId,
        bytes: Vec<u8>,
        at: Instant,
    },
    TcpClosed {
        conn: ConnId,
    },
    Join {
        session: SessionId,
        call: CallId,
        user: UserId,
        name: String,
        grants: Grants,
        out: ClientSender,
        reply: oneshot::Sender<Result<(), RouterError>>,
    },
    /// A resumed WebSocket replaces the old one. `reply`: whether the session still exists
    /// (the router may have removed it while the client was away).
    Reattach {
        session: SessionId,
        out: ClientSender,
        reply: oneshot::Sender<bool>,
    },
    Signal {
        session: SessionId,
        text: String,
    },
    Leave {
        session: SessionId,
        reason: String,
    },
    EndCall {
        call: CallId,
    },
    /// Start (`options: Some`) or stop (`None`) a call's recording: from the admin API (with
    /// `reply`), or from a participant (`from`: its session, and whether its token may; its
    /// WebSocket hears a refusal).
    Record {
        call: CallId,
        options: Option<calls_core::RecordingOptions>,
        from: Option<(SessionId, bool)>,
        reply: Option<oneshot::Sender<Result<(), RouterError>>>,
    },
    /// Admin API: cap (or uncap, `None`) the bandwidth the router assumes towards `session`.
    /// Workers that do not host the session reply `UnknownSession`.
    SetBandwidthCap {
        session: SessionId,
        bps: Option<u64>,
        reply: oneshot::Sender<Result<(), RouterError>>,
    },
    /// Open relay link `link` for `call`; its frames go to `peer`: another worker
    /// (`spread.rs`) or a node channel (`node/`).
    RelayOpen {
        call: CallId,
        link: LinkId,
        peer: RelayPeer,
    },
    /// Close relay link `link`.
    RelayClose {
        link: LinkId,
    },
    /// A frame from the other end of relay link `link`.
    Relay {
        link: LinkId,
        bytes: bytes::Bytes,
    },
    Drain,
    Metrics {
        reply: oneshot::Sender<MetricsSnapshot>,
    },
    ListCalls {
        reply: oneshot::Sender<Vec<CallInfo>>,
    },
    /// Debug builds only (`POST /api/debug/panic/{worker}` on the admin API): the worker
    /// panics, to test what the server does then (it exits; docs/server.md, "Overload").
    #[cfg(debug_assertions)]
    DebugPanic,
    /// Debug builds only (`POST /api/debug/lag/{worker}/{ms}`): the worker reports at least
    /// this lag from now on (0 ends it), to test overload without overloading the machine.
    #[cfg(debug_assertions)]
    DebugLag {
        lag: Duration,
    },
}

/// The other end of a relay link.
#[derive(Debug, Clone)]
pub enum RelayPeer {
    /// Another worker of this process (its index).
    Worker(usize),
    /// A worker of another node, through that node's relay connection.
    Node(NodeTx),
}

/// A call as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct CallInfo {
    pub call: String,
    pub worker: usize,
    pub participants: Vec<ParticipantInfo>,
}

#[derive(Debug, Serialize)]
pub struct ParticipantInfo {
    pub session: u64,
    pub user: String,
    pub name: String,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    pub egress_loss: Option<f64>,
    pub ingress_loss: Option<f64>,
}

/// The worker a call is pinned to.
pub fn worker_for_call(call: &str, workers: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    call.hash(&mut h);
    (h.finish() % workers.max(1) as u64) as usize
}

struct Client {
    call: CallId,
    user: UserId,
    name: String,
    out: ClientSender,
    connected: bool,
}

pub struct Worker {
    index: usize,
    router: Router,
    /// What the HTTP side reads of this worker (load, liveness).
    status: Arc<WorkerStatus>,
    meter: LoadMeter,
    /// WebSockets whose queue was full this round: ended after the drain.
    slow: Vec<SessionId>,
    /// Queues the UDP transmits of one drain and sends them in batches.
    udp: Option<UdpSender>,
    flows: FlowMap,
    clients: HashMap<SessionId, Client>,
    tcp_writers: HashMap<ConnId, TcpWriter>,
    /// Each open ICE-TCP connection by its client address (flow events name the address).
    tcp_by_remote: HashMap<SocketAddr, ConnId>,
    /// ICE-TCP counters for `/metrics` (write queues that filled up).
    tcp_counters: Arc<TcpCounters>,
    /// Reused buffer for a batch of datagrams.
    batch: Vec<Queued<Cmd>>,
    /// The recording writer thread (`recording_dir` set), and the files this worker had to cut.
    recording: Option<RecordingSink>,
    truncated: Truncated,
    /// Call placement over workers (relay links between them).
    spread: Option<Arc<Spread>>,
    /// The other end of each relay link.
    relay_peers: HashMap<LinkId, RelayPeer>,
}

/// Most datagrams handed to the router as one batch (str0m holds a subscriber's writes until
/// the batch's timeout; audio streams keep 16).
const MAX_BATCH: usize = 16;

impl Worker {
    pub fn new(
        index: usize,
        router: Router,
        udp: Option<UdpSocket>,
        flows: FlowMap,
        tcp_counters: Arc<TcpCounters>,
        status: Arc<WorkerStatus>,
        started: Instant,
    ) -> Self {
        Worker {
            index,
            router,
            status,
            meter: LoadMeter::new(started, Instant::now()),
            slow: Vec::new(),
            udp: udp.map(UdpSender::new),
            flows,
            clients: HashMap::new(),
            tcp_writers: HashMap::new(),
            tcp_by_remote: HashMap::new(),
            tcp_counters,
            batch: Vec::with_capacity(MAX_BATCH),
            recording: None,
            truncated: Truncated::default(),
            spread: None,
            relay_peers: HashMap::new(),
        }
    }

    /// Hands this worker's recording outputs to the writer thread (`recording_dir` set).
    pub fn with_recording(mut self, sink: Option<RecordingSink>) -> Self {
        self.recording = sink;
        self
    }

    /// Shares the call placement: relay frames go to other workers, leaves are counted.
    pub fn with_spread(mut self, spread: Arc<Spread>) -> Self {
        self.spread = Some(spread);
        self
    }

    /// Runs for the life of the process. Each round: drain the router, measure (timer
    /// lateness, queue lateness, idle time; a load report per window), then either run the
    /// due timers or take the next input, control before media.
    pub fn run(mut self, queue: Arc<WorkerQueue<Cmd>>) {
        // The meter reads this thread's CPU clock: start its first window here, not on the
        // thread that built the worker.
        self.meter.restart(Instant::now());
        loop {
            let deadline = self.drain();
            let now = Instant::now();
            if let Some(load) = self.meter.tick(now, &self.status) {
                let level = self.router.set_load(load, now);
                LoadMeter::publish_level(&self.status, level);
                self.status
                    .sessions
                    .store(self.router.session_count() as u64, Ordering::Relaxed);
                continue; // drain what the new level changed
            }
            if deadline <= now {
                // Timers first: under load the queue is never empty, and waiting for it to
                // run dry would starve every session's timers (pacer, RTCP feedback, DTLS
                // retransmits, ICE consent) for as long as datagrams keep coming.
                self.meter.timer_late(now - deadline);
                self.router.handle_timeout(now);
                continue;
            }
            let wait = (deadline - now)
                .min(self.meter.until_report(now))
                .min(Duration::from_millis(500));
            let item = queue.pop(wait);
            let after = Instant::now();
            match item {
                Some(first) => {
                    // Idle until it arrived (nothing, if it was waiting already).
                    self.meter
                        .idle(first.queued_at.saturating_duration_since(now));
                    self.handle_queued(first, &queue);
                }
                None => {
                    self.meter.idle(after.saturating_duration_since(now));
                    self.router.handle_timeout(after);
                }
            }
        }
    }

    /// A control item is handled alone; a media datagram together with the media datagrams
    /// queued behind it (up to [`MAX_BATCH`], and only while no control item waits): each
    /// subscriber session then gets one str0m timeout per batch instead of one per datagram.
    fn handle_queued(&mut self, first: Queued<Cmd>, queue: &WorkerQueue<Cmd>) {
        let now = Instant::now();
        self.meter
            .input_late(now.saturating_duration_since(first.queued_at));
        if first.lane == Lane::Control {
            self.handle(first.item);
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.push(first);
        queue.pop_media(&mut batch, MAX_BATCH - 1);
        if let Some(last) = batch.last() {
            self.meter
                .input_late(now.saturating_duration_since(last.queued_at));
        }
        let at = batch
            .iter()
            .filter_map(|q| match &q.item {
                Cmd::Datagram { at, .. } => Some(*at),
                _ => None,
            })
            .max()
            .unwrap_or(now);
        let datagrams = batch.iter().filter_map(|q| match &q.item {
            Cmd::Datagram {
                source,
                destination,
                bytes,
                ..
            } => Some(Datagram {
                proto: Proto::Udp,
                source: *source,
                destination: *destination,
                contents: bytes,
            }),
            _ => None,
        });
        self.router.handle_datagrams(datagrams, at);
        for queued in &batch {
            if let Cmd::Relay { link, bytes } = &queued.item {
                self.status.relay_frames_in.fetch_add(1, Ordering::Relaxed);
                self.router.handle_relay(*link, bytes, at);
            }
        }
        batch.clear();
        self.batch = batch;
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Datagram {
                source,
                destination,
                bytes,
                at,
            } => self.router.handle_datagram(
                Datagram {
                    proto: Proto::Udp,
                    source,
                    destination,
                    contents: &bytes,
                },
                at,
            ),
            Cmd::TcpAccepted {
                conn,
                remote,
                local,
                writer,
            } => {
                if self.router.tcp_accepted(conn, remote, local).is_ok() {
                    self.tcp_writers.insert(conn, writer);
                    self.tcp_by_remote.insert(remote, conn);
                }
            }
            Cmd::TcpData { conn, bytes, at } => {
                if let Err(e) = self.router.handle_tcp_data(conn, &bytes, at) {
                    tracing::debug!(worker = self.index, "closing TCP connection: {e}");
                    // Dropping the writer closes the socket.
                    self.forget_tcp(conn);
                }
            }
            Cmd::TcpClosed { conn } => {
                let _ = self.router.tcp_closed(conn);
                self.forget_tcp(conn);
            }
            Cmd::Join {
                session,
                call,
                user,
                name,
                grants,
                out,
                reply,
            } => {
                let result = self
                    .router
                    .join(call.clone(), session, user.clone(), grants, now);
                if result.is_ok() {
                    self.clients.insert(
                        session,
                        Client {
                            call,
                            user,
                            name,
                            out,
                            connected: false,
                        },
                    );
                }
                let _ = reply.send(result);
            }
            Cmd::Reattach {
                session,
                out,
                reply,
            } => {
                let alive = match self.clients.get_mut(&session) {
                    Some(client) => {
                        // The old socket (if it is still open) is closed: one live socket per
                        // session, the newest wins.
                        let old = std::mem::replace(&mut client.out, out);
                        // Full: dropping `old` closes that socket all the same.
                        let _ = old.try_send(ToClient::Replaced);
                        let _ = self.router.resend_signaling(session);
                        true
                    }
                    None => false,
                };
                let _ = reply.send(alive);
            }
            Cmd::Signal { session, text } => {
                // Refusals go back to the client as `error` messages through poll_output.
                let _ = self.router.handle_signal_json(session, &text, now);
            }
            Cmd::Leave { session, reason } => {
                self.send_to_client(session, ToClient::Close(reason));
                let _ = self.router.leave(session, now);
            }
            Cmd::EndCall { call } => {
                let sessions: Vec<SessionId> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.call == call)
                    .map(|(s, _)| *s)
                    .collect();
                for session in sessions {
                    self.send_to_client(
                        session,
                        ToClient::Close("call ended by an administrator".into()),
                    );
                    let _ = self.router.leave(session, now);
                }
            }
            Cmd::Record {
                call,
                options,
                from,
                reply,
            } => {
                let result = match (options, from) {
                    (_, Some((session, false))) => Err(RouterError::Signal {
                        session,
                        error: calls_core::SignalError::NotAllowed(
                            "this session may not start or stop recordings",
                        ),
                    }),
                    (Some(_), _) if self.recording.is_none() => {
                        Err(RouterError::NotRecording(call.clone()))
                    }
                    (Some(options), _) => self.router.start_recording(&call, options, now),
                    (None, _) => self.router.stop_recording(&call, now),
                };
                let on = self.router.is_recording(&call);
                match &result {
                    Ok(()) => {
                        tracing::info!(worker = self.index, %call, by = ?from, on, "recording command")
                    }
                    Err(e) => {
                        tracing::info!(worker = self.index, %call, "recording command refused: {e}")
                    }
                }
                if let (Some((session, _)), Err(e)) = (from, &result) {
                    let msg = serde_json::json!({"type": "error", "code": e.code(), "message": e.to_string()});
                    self.send_to_client(session, ToClient::Text(msg.to_string()));
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Cmd::SetBandwidthCap {
                session,
                bps,
                reply,
            } => {
                let result = self.router.set_bandwidth_cap(session, bps, now);
                if result.is_ok() {
                    tracing::info!(worker = self.index, %session, ?bps, "bandwidth cap set by an administrator");
                }
                let _ = reply.send(result);
            }
            Cmd::RelayOpen { call, link, peer } => match self.router.relay_open(call, link, now) {
                Ok(()) => {
                    self.relay_peers.insert(link, peer);
                    self.status.relay_links.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(worker = self.index, %link, "relay_open: {e}"),
            },
            Cmd::RelayClose { link } => {
                if self.router.relay_close(link, now).is_ok() {
                    self.status.relay_links.fetch_sub(1, Ordering::Relaxed);
                }
                self.relay_peers.remove(&link);
            }
            Cmd::Relay { link, bytes } => {
                self.status.relay_frames_in.fetch_add(1, Ordering::Relaxed);
                self.router.handle_relay(link, &bytes, now);
            }
            Cmd::Drain => self.router.start_draining(),
            Cmd::Metrics { reply } => {
                let _ = reply.send(self.router.metrics());
            }
            Cmd::ListCalls { reply } => {
                let stats = self.router.metrics().session_stats;
                let mut calls: HashMap<String, CallInfo> = HashMap::new();
                for (session, client) in &self.clients {
                    let s = stats.iter().find(|s| s.session == *session);
                    calls
                        .entry(client.call.to_string())
                        .or_insert_with(|| CallInfo {
                            call: client.call.to_string(),
                            worker: self.index,
                            participants: Vec::new(),
                        })
                        .participants
                        .push(ParticipantInfo {
                            session: session.0,
                            user: client.user.to_string(),
                            name: client.name.clone(),
                            connected: client.connected,
                            rtt_ms: s.and_then(|s| s.rtt_ms),
                            egress_loss: s.and_then(|s| s.egress_loss),
                            ingress_loss: s.and_then(|s| s.ingress_loss),
                        });
                }
                let mut list: Vec<CallInfo> = calls.into_values().collect();
                list.sort_by(|a, b| a.call.cmp(&b.call));
                for c in &mut list {
                    c.participants.sort_by_key(|p| p.session);
                }
                let _ = reply.send(list);
            }
            #[cfg(debug_assertions)]
            Cmd::DebugPanic => panic!("worker {} panicked on request (debug build)", self.index),
            #[cfg(debug_assertions)]
            Cmd::DebugLag { lag } => self.meter.set_lag_floor(lag),
        }
    }

    /// Drains the router; returns its next deadline. UDP transmits are queued and sent before
    /// this returns (a full queue is sent on the way).
    fn drain(&mut self) -> Instant {
        loop {
            match self.router.poll_output() {
                Output::Timeout(at) => {
                    if !self.slow.is_empty() {
                        self.end_slow_consumers();
                        continue; // drain what their leaving produced
                    }
                    if let Some(udp) = &mut self.udp {
                        udp.flush();
                    }
                    return at;
                }
                Output::Transmit(t) => match (t.proto, t.conn) {
                    (Proto::Udp, _) => {
                        if let Some(udp) = &mut self.udp {
                            udp.push(t.destination, t.contents);
                        }
                    }
                    (Proto::Tcp, Some(conn)) => {
                        let sent = match self.tcp_writers.get(&conn) {
                            Some(writer) => writer.frames.try_send(t.contents),
                            None => Ok(()),
                        };
                        match sent {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => {
                                // The client does not read: close it rather than queue
                                // without bound (issue 16, finding 1).
                                self.tcp_counters
                                    .write_queue_full
                                    .fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(worker = self.index, %conn, "TCP write queue full; closing");
                                let _ = self.router.tcp_closed(conn);
                                self.forget_tcp(conn);
                            }
                            Err(TrySendError::Closed(_)) => {
                                // Its socket is gone (reset, or a write stalled); its
                                // connection task reports the close too. Not a full queue.
                                let _ = self.router.tcp_closed(conn);
                                self.forget_tcp(conn);
                            }
                        }
                    }
                    _ => {}
                },
                Output::Signal(session, msg) => {
                    self.send_to_client(session, ToClient::Text(msg.to_json()));
                }
                Output::Event(event) => self.on_event(event),
                Output::Record(out) => {
                    if let Some(sink) = &self.recording {
                        sink.offer(out, &mut self.truncated);
                    }
                }
                Output::Relay { link, bytes } => {
                    let len = bytes.len() as u64;
                    let sent = match (self.relay_peers.get(&link), &self.spread) {
                        (Some(RelayPeer::Worker(peer)), Some(spread)) => {
                            spread.forward(*peer, link, bytes)
                        }
                        // Counted by the node relay (`calls_node_relay_*`), sent or dropped.
                        (Some(RelayPeer::Node(node)), _) => {
                            node.out.send(node.chan, bytes);
                            continue;
                        }
                        _ => false,
                    };
                    if sent {
                        self.status.relay_frames_out.fetch_add(1, Ordering::Relaxed);
                        self.status
                            .relay_bytes_out
                            .fetch_add(len, Ordering::Relaxed);
                    } else {
                        self.status.relay_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
    }

    /// Queues a message for a session's WebSocket. A full queue marks the session a slow
    /// consumer (ended after this drain); a closed one is its socket task gone (nothing to do).
    fn send_to_client(&mut self, session: SessionId, msg: ToClient) {
        let Some(client) = self.clients.get(&session) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = client.out.try_send(msg) {
            if !self.slow.contains(&session) {
                self.slow.push(session);
            }
        }
    }

    /// Ends the sessions whose WebSocket did not read its messages: their sender is dropped
    /// (the socket task closes with 4009) and they leave the call.
    fn end_slow_consumers(&mut self) {
        let now = Instant::now();
        for session in std::mem::take(&mut self.slow) {
            if self.clients.remove(&session).is_none() {
                continue;
            }
            self.status
                .ws_slow_consumers
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker = self.index, %session, "signaling queue full: slow consumer closed");
            if let Err(e) = self.router.leave(session, now) {
                tracing::debug!(worker = self.index, %session, "slow consumer leave: {e}");
            }
        }
    }

    /// Drops an ICE-TCP connection's writer (its connection task then closes the socket).
    fn forget_tcp(&mut self, conn: ConnId) {
        self.tcp_writers.remove(&conn);
        self.tcp_by_remote.retain(|_, c| *c != conn);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::FlowAdmitted { proto, remote, .. } => {
                if let Ok(mut flows) = self.flows.lock() {
                    flows.insert((proto, remote), self.index);
                }
            }
            Event::FlowRemoved { proto, remote, .. } => {
                forget_flow(&self.flows, proto, remote, self.index);
                if proto == Proto::Tcp {
                    // Its session left or moved on: nobody reads this connection any more.
                    if let Some(conn) = self.tcp_by_remote.get(&remote).copied() {
                        let _ = self.router.tcp_closed(conn);
                        self.forget_tcp(conn);
                    }
                }
            }
            Event::Connected { session } => {
                tracing::info!(worker = self.index, %session, "media connected");
                if let Some(client) = self.clients.get_mut(&session) {
                    client.connected = true;
                }
            }
            Event::Left {
                session,
                reason,
                call,
                ..
            } => {
                if let Some(spread) = &self.spread {
                    spread.unplace(&call, self.index);
                }
                tracing::info!(worker = self.index, %session, ?reason, "left");
                self.send_to_client(session, ToClient::Close(format!("left: {reason:?}")));
                self.clients.remove(&session);
            }
            other => tracing::debug!(worker = self.index, "{other:?}"),
        }
    }
}

/// Forgets a flow a router removed, unless another worker has admitted it since (a client
/// whose address moved to a call on another worker): the map then keeps the newer owner.
pub fn forget_flow(flows: &FlowMap, proto: Proto, remote: SocketAddr, worker: usize) {
    if let Ok(mut flows) = flows.lock() {
        if flows.get(&(proto, remote)) == Some(&worker) {
            flows.remove(&(proto, remote));
        }
    }
}

/// Handles to all workers: their queues and what they publish.
#[derive(Clone)]
pub struct Workers {
    pub queues: Vec<Arc<WorkerQueue<Cmd>>>,
    pub status: Vec<Arc<WorkerStatus>>,
    pub flows: FlowMap,
    /// The probe credential's ufrag: probes go to worker 0.
    pub probe_ufrag: Option<String>,
    /// Which workers each call is on (`spread.rs`).
    pub spread: Arc<Spread>,
}

impl Workers {
    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Queues a command in `worker`'s control lane; gives it back when the lane is full (the
    /// worker is far behind) or the worker does not exist.
    pub fn send(&self, worker: usize, cmd: Cmd) -> Result<(), Cmd> {
        match self.queues.get(worker) {
            Some(q) => q.push(Lane::Control, cmd),
            None => Err(cmd),
        }
    }

    /// Queues a command that frees resources (leave, TCP closed): never refused.
    pub fn send_release(&self, worker: usize, cmd: Cmd) {
        if let Some(q) = self.queues.get(worker) {
            q.push_release(cmd);
        }
    }

    /// Queues a received datagram: RTP media in the media lane, STUN, DTLS and RTCP in the
    /// control lane. A full lane drops it (counted per worker and lane).
    pub fn send_datagram(&self, worker: usize, cmd: Cmd, media: bool) {
        if let Some(q) = self.queues.get(worker) {
            let lane = if media { Lane::Media } else { Lane::Control };
            let _ = q.push(lane, cmd);
        }
    }

    /// The worker for a datagram from `remote`: the flow table, else the ufrag of a STUN
    /// binding request. `None`: nobody would accept it.
    pub fn route(&self, proto: Proto, remote: SocketAddr, datagram: &[u8]) -> Option<usize> {
        if let Some(w) = self
            .flows
            .lock()
            .ok()
            .and_then(|f| f.get(&(proto, remote)).copied())
        {
            return Some(w);
        }
        if let Some(probe) = &self.probe_ufrag {
            if calls_core::demux::stun_local_ufrag(datagram) == Some(probe.as_str()) {
                return Some(0);
            }
        }
        Router::worker_of_datagram(datagram)
            .map(usize::from)
            .filter(|w| *w < self.count())
    }

    pub async fn metrics(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for w in 0..self.count() {
            let (reply, rx) = oneshot::channel();
            if self.send(w, Cmd::Metrics { reply }).is_err() {
                continue;
            }
            if let Ok(m) = rx.await {
                total.merge(&m);
            }
        }
        total
    }

    /// Like [`metrics`](Self::metrics), for scrapes: asks every worker at once and waits at most
    /// `limit`, so one worker busy with a huge call cannot stall `/metrics`. Returns the sum of
    /// the answers and how many workers did not answer in time.
    pub async fn metrics_within(&self, limit: std::time::Duration) -> (MetricsSnapshot, usize) {
        let pending: Vec<_> = (0..self.count())
            .map(|w| {
                let (reply, rx) = oneshot::channel();
                // A full queue drops `reply`: that worker counts as unanswered.
                let _ = self.send(w, Cmd::Metrics { reply });
                rx
            })
            .collect();
        let deadline = tokio::time::Instant::now() + limit;
        let mut total = MetricsSnapshot::default();
        let mut unanswered = 0;
        for rx in pending {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(m)) => total.merge(&m),
                _ => unanswered += 1,
            }
        }
        (total, unanswered)
    }

    /// Caps (or, with `None`, uncaps) the bandwidth towards `session` on whichever worker hosts
    /// it. `Err(UnknownSession)` when no worker does.
    pub async fn set_bandwidth_cap(
        &self,
        session: SessionId,
        bps: Option<u64>,
    ) -> Result<(), RouterError> {
        let pending: Vec<_> = (0..self.count())
            .map(|w| {
                let (reply, rx) = oneshot::channel();
                let _ = self.send(
                    w,
                    Cmd::SetBandwidthCap {
                        session,
                        bps,
                        reply,
                    },
                );
                rx
            })
            .collect();
        let mut outcome = Err(RouterError::UnknownSession(session));
        for rx in pending {
            match rx.await {
                Ok(Ok(())) => outcome = Ok(()),
                Ok(Err(RouterError::UnknownSession(_))) | Err(_) => {}
                Ok(Err(e)) if outcome.is_err() => outcome = Err(e),
                Ok(Err(_)) => {}
            }
        }
        outcome
    }

    pub async fn calls(&self) -> Vec<CallInfo> {
        let mut all = Vec::new();
        for w in 0..self.count() {
            let (reply, rx) = oneshot::channel();
            if self.send(w, Cmd::ListCalls { reply }).is_err() {
                continue;
            }
            if let Ok(list) = rx.await {
                all.extend(list);
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 4 (issue 16): a flow that moved to a call on another worker stays routed there
    /// when the old worker reports it removed (before, the old worker's leave deleted it and
    /// the survivor's media was dropped at the dispatcher for good).
    #[test]
    fn a_removed_flow_is_forgotten_only_by_the_worker_that_has_it() {
        let flows = FlowMap::default();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        flows.lock().unwrap().insert((Proto::Udp, remote), 2);
        forget_flow(&flows, Proto::Udp, remote, 1);
        assert_eq!(flows.lock().unwrap().get(&(Proto::Udp, remote)), Some(&2));
        forget_flow(&flows, Proto::Udp, remote, 2);
        assert!(flows.lock().unwrap().is_empty());
    }
}
