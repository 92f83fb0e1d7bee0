//! One relay connection's life: dial (with backoff) or accept, authenticate both ways, then
//! carry messages and frames until it ends; the hub (`hub.rs`) decides what they mean.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use calls_core::LinkId;
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use super::hub::HubEvent;
use super::secure::{self, Role};
use super::wire::{self, Hello, Msg, LENGTH_LEN, MAX_MESSAGE};
use super::{droppable, DropReason, NodeMetrics, NodeSettings, PeerCounters, PeerOut};
use crate::worker::Cmd;
use crate::worker_queue::{Lane, WorkerQueue};

/// A connection that has not proven the secret this long after it arrived (or was dialed) is
/// closed, the QUIC handshake included.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections still handshaking or authenticating at once; more are refused at once, so
/// strangers cannot hold many half-open connections.
const MAX_PENDING: u64 = 16;
/// Dial backoff: from this, doubling, up to [`MAX_BACKOFF`]; back to the start after a
/// connection that lasted [`STABLE`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const STABLE: Duration = Duration::from_secs(10);

/// QUIC application close codes of the relay.
pub const CLOSE_DONE: u32 = 0;
/// The other end did not prove the secret (or is not the node it should be).
pub const CLOSE_UNAUTHENTICATED: u32 = 1;
/// Another connection with the same node is kept instead of this one.
pub const CLOSE_DUPLICATE: u32 = 2;
/// A protocol violation (an oversized message).
pub const CLOSE_PROTOCOL: u32 = 3;

/// What the connections share: settings, counters, the workers' queues, the peers' queues.
#[derive(Debug)]
pub struct Context {
    pub settings: NodeSettings,
    /// This process's random incarnation (a restarted node has a new one).
    pub incarnation: u64,
    pub metrics: Arc<NodeMetrics>,
    pub queues: Vec<Arc<WorkerQueue<Cmd>>>,
    pub peers: Mutex<HashMap<u8, Arc<PeerShared>>>,
    pub events: mpsc::Sender<HubEvent>,
    pub next_generation: AtomicU64,
    /// Connections handshaking or authenticating now.
    pub pending: AtomicU64,
    /// Peers whose connections are refused until then (debug builds: `Relay::cut`).
    pub cut_until: Mutex<HashMap<u8, Instant>>,
}

/// One peer node's state that outlives its connections.
#[derive(Debug)]
pub struct PeerShared {
    /// The workers' side of its queues.
    pub out: Arc<PeerOut>,
    /// The connection's side (one connection reads them at a time).
    rx: tokio::sync::Mutex<PeerRx>,
    /// Channel → the worker and link its frames go to (the hub keeps it).
    pub inbound: Mutex<HashMap<u32, (usize, LinkId)>>,
    pub counters: Arc<PeerCounters>,
}

#[derive(Debug)]
struct PeerRx {
    media: mpsc::Receiver<(u32, Bytes)>,
    control: mpsc::Receiver<(u32, Bytes)>,
}

impl Context {
    /// Peer `node`'s state, made on first use.
    pub fn peer(&self, node: u8) -> Arc<PeerShared> {
        let mut peers = match self.peers.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(peers.entry(node).or_insert_with(|| {
            let cap = self.settings.queue_frames;
            let (media_tx, media) = mpsc::channel(cap);
            let (control_tx, control) = mpsc::channel(cap);
            let counters = self.metrics.peer(node);
            Arc::new(PeerShared {
                out: Arc::new(PeerOut {
                    media: media_tx,
                    control: control_tx,
                    metrics: Arc::clone(&self.metrics),
                }),
                rx: tokio::sync::Mutex::new(PeerRx { media, control }),
                inbound: Mutex::new(HashMap::new()),
                counters,
            })
        }))
    }

    /// Hands a frame from a peer to a worker's queue: media lane for what may be lost, control
    /// lane for the rest; a full lane drops it (counted). Never waits.
    pub fn deliver(&self, peer: &PeerShared, worker: usize, link: LinkId, frame: Bytes) {
        let Some(queue) = self.queues.get(worker) else {
            self.metrics.count_drop(DropReason::UnknownChannel);
            return;
        };
        let len = frame.len() as u64;
        let lane = if droppable(&frame) {
            Lane::Media
        } else {
            Lane::Control
        };
        if queue.push(lane, Cmd::Relay { link, bytes: frame }).is_ok() {
            peer.counters.frames_in.fetch_add(1, Ordering::Relaxed);
            peer.counters.bytes_in.fetch_add(len, Ordering::Relaxed);
        } else {
            self.metrics.count_drop(DropReason::QueueFull);
        }
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// It never proved the secret (or is the wrong node, or this node itself).
    Unauthenticated,
    /// Another connection with the node is kept: do not dial it again.
    Superseded,
    /// It worked, then closed or timed out.
    Closed,
    /// It reached this node itself (a `host:port` peer entry that is this node).
    Itself,
}

/// Accepts relay connections for the life of the process.
pub async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<Context>) {
    while let Some(incoming) = endpoint.accept().await {
        if ctx.pending.load(Ordering::Relaxed) >= MAX_PENDING {
            ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        ctx.pending.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
            let conn = tokio::time::timeout_at(deadline, incoming).await;
            match conn {
                Ok(Ok(conn)) => {
                    run(conn, Role::Acceptor, None, deadline, &ctx).await;
                }
                Ok(Err(e)) => {
                    ctx.pending.fetch_sub(1, Ordering::Relaxed);
                    ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "relay handshake failed: {e}");
                }
                Err(_) => {
                    ctx.pending.fetch_sub(1, Ordering::Relaxed);
                    ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "relay handshake timed out");
                }
            }
        });
    }
}

/// Dials a peer node and keeps a connection to it: again after it drops, with backoff. Stops
/// when the peer has the lower id and is known (it dials), or when another connection with it
/// is preferred.
pub async fn dial_loop(endpoint: quinn::Endpoint, peer: super::PeerAddr, ctx: Arc<Context>) {
    let me = ctx.settings.node_id;
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some(id) = peer.id {
            if id == me {
                // One peer list for every node (a StatefulSet's pods): this entry is this node.
                tracing::debug!(peer = %peer.addr, "relay_peers: this node itself, not dialed");
                return;
            }
            if id < me {
                tracing::info!(peer = id, addr = %peer.addr, "node relay: the peer has the lower id and dials this node");
                return;
            }
        }
        let started = Instant::now();
        match dial(&endpoint, &peer, &ctx).await {
            Some(Ended::Itself) => {
                tracing::debug!(peer = %peer.addr, "relay_peers: this node itself, not dialed again");
                return;
            }
            Some(Ended::Superseded) => {
                tracing::info!(addr = %peer.addr, "node relay: another connection with that node is kept; not dialing it again");
                return;
            }
            Some(Ended::Closed) if started.elapsed() >= STABLE => backoff = MIN_BACKOFF,
            _ => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One dial: resolve, connect, run. `None` when it never connected.
async fn dial(endpoint: &quinn::Endpoint, peer: &super::PeerAddr, ctx: &Context) -> Option<Ended> {
    let addr = match tokio::net::lookup_host(&peer.addr).await {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => {
            tracing::debug!(peer = %peer.addr, "node relay: cannot resolve: {e}");
            return None;
        }
    };
    let connecting = match endpoint.connect(addr, secure::SERVER_NAME) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %peer.addr, "node relay: cannot dial: {e}");
            return None;
        }
    };
    ctx.pending.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => Some(run(conn, Role::Dialer, peer.id, deadline, ctx).await),
        Ok(Err(e)) => {
            ctx.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.addr, "node relay: connect failed: {e}");
            None
        }
        Err(_) => {
            ctx.pending.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}

/// Authenticates `conn` by `deadline` (counted from when it arrived or was dialed), then
/// carries it until it ends. Counts it out of `pending` once the authentication is over.
async fn run(
    conn: quinn::Connection,
    role: Role,
    expected: Option<u8>,
    deadline: tokio::time::Instant,
    ctx: &Context,
) -> Ended {
    let remote = conn.remote_address();
    let authed = tokio::time::timeout_at(deadline, authenticate(&conn, role, expected, ctx)).await;
    ctx.pending.fetch_sub(1, Ordering::Relaxed);
    let refused = match authed {
        Ok(Ok(ok)) => Ok(ok),
        Ok(Err(why)) => Err(why),
        Err(_) => Err("no proof of the secret in time".to_owned()),
    };
    let (hello, send, recv) = match refused {
        Ok(ok) => ok,
        Err(why) => {
            ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            // A peer this node dials is one of ours, misconfigured: say it. Strangers that
            // dial in are only counted (they could fill the log).
            if role == Role::Dialer {
                tracing::warn!(%remote, "node relay: connection refused: {why}");
            } else {
                tracing::debug!(%remote, "node relay: connection refused: {why}");
            }
            conn.close(VarInt::from_u32(CLOSE_UNAUTHENTICATED), b"unauthenticated");
            return Ended::Unauthenticated;
        }
    };
    let me = ctx.settings.node_id;
    let node = hello.node;
    if node == me {
        if hello.incarnation == ctx.incarnation {
            // This process dialed itself (a `host:port` entry in `relay_peers` that is this
            // node): the dialer hangs up once it has seen the acceptor's hello.
            if role == Role::Dialer {
                conn.close(VarInt::from_u32(CLOSE_DONE), b"itself");
            } else {
                let _ = tokio::time::timeout(AUTH_TIMEOUT, conn.closed()).await;
            }
            return Ended::Itself;
        }
        ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%remote, "node relay: another node has this node's id {me}; refused");
        conn.close(VarInt::from_u32(CLOSE_UNAUTHENTICATED), b"same node id");
        return Ended::Unauthenticated;
    }
    let cut = ctx
        .cut_until
        .lock()
        .ok()
        .and_then(|c| c.get(&node).copied())
        .is_some_and(|until| Instant::now() < until);
    if cut {
        tracing::info!(
            peer = node,
            "node relay: connection refused while cut (debug)"
        );
        conn.close(VarInt::from_u32(CLOSE_DONE), b"cut");
        return Ended::Closed;
    }
    let peer = ctx.peer(node);
    let generation = ctx.next_generation.fetch_add(1, Ordering::Relaxed);
    let superseded = Arc::new(AtomicBool::new(false));
    let (ctl, ctl_rx) = mpsc::channel(super::hub::CONTROL_QUEUE);
    let dialed_by_lower = match role {
        Role::Dialer => me < node,
        Role::Acceptor => node < me,
    };
    tracing::info!(peer = node, %remote, ?role, "node relay: peer connected and authenticated");
    let connected = HubEvent::Connected {
        peer: node,
        incarnation: hello.incarnation,
        generation,
        dialed_by_lower,
        conn: Some(conn.clone()),
        superseded: Arc::clone(&superseded),
        ctl,
    };
    if ctx.events.send(connected).await.is_err() {
        return Ended::Closed;
    }
    tokio::select! {
        why = read_stream(recv, node, generation, ctx) => {
            if let Err(code) = why {
                conn.close(VarInt::from_u32(code), b"protocol error");
            }
        }
        () = read_datagrams(&conn, &peer, ctx) => {}
        () = write(&conn, send, ctl_rx, &peer) => {}
    }
    conn.close(VarInt::from_u32(CLOSE_DONE), b"closed");
    let _ = ctx
        .events
        .send(HubEvent::Disconnected {
            peer: node,
            generation,
        })
        .await;
    let remote_duplicate = matches!(
        conn.close_reason(),
        Some(ConnectionError::ApplicationClosed(ref c)) if c.error_code == VarInt::from_u32(CLOSE_DUPLICATE)
    );
    tracing::info!(peer = node, reason = ?conn.close_reason(), "node relay: connection ended");
    if superseded.load(Ordering::Relaxed) || remote_duplicate {
        Ended::Superseded
    } else {
        Ended::Closed
    }
}

/// The hello exchange: the dialer speaks first, the acceptor answers only a valid hello.
async fn authenticate(
    conn: &quinn::Connection,
    role: Role,
    expected: Option<u8>,
    ctx: &Context,
) -> Result<(Hello, SendStream, RecvStream), String> {
    let exporter = secure::exporter(conn).ok_or("no TLS exporter")?;
    let secret = &ctx.settings.secret.0;
    let me = ctx.settings.node_id;
    let mine = Msg::Hello(Hello {
        node: me,
        incarnation: ctx.incarnation,
        mac: secure::mac(secret, role, me, ctx.incarnation, &exporter),
    });
    let mut buf = BytesMut::new();
    mine.encode(&mut buf);
    let (mut send, mut recv) = match role {
        Role::Dialer => {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&buf).await.map_err(|e| e.to_string())?;
            (send, recv)
        }
        Role::Acceptor => conn.accept_bi().await.map_err(|e| e.to_string())?,
    };
    let theirs = match read_message(&mut recv).await {
        Ok(Some(Ok(Msg::Hello(h)))) => h,
        Ok(Some(Ok(_))) => return Err("the first message is not a hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad hello: {e}")),
        Ok(None) => return Err("closed before its hello".into()),
        Err(e) => return Err(format!("hello: {e}")),
    };
    if !secure::verify(
        secret,
        role.other(),
        theirs.node,
        theirs.incarnation,
        &exporter,
        &theirs.mac,
    ) {
        return Err("wrong relay secret (MAC mismatch)".into());
    }
    if let Some(id) = expected.filter(|id| *id != theirs.node) {
        return Err(format!("expected node {id}, it is node {}", theirs.node));
    }
    if role == Role::Acceptor {
        send.write_all(&buf).await.map_err(|e| e.to_string())?;
    }
    Ok((theirs, send, recv))
}

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadExactError),
    #[error("message of {0} bytes is over the limit")]
    Oversized(usize),
}

/// The next control-stream message: `None` at the end of the stream, `Some(Err)` for one that
/// does not decode (its bytes are consumed: the stream stays in step).
async fn read_message(
    recv: &mut RecvStream,
) -> Result<Option<Result<Msg, wire::WireError>>, ReadError> {
    let mut len = [0u8; LENGTH_LEN];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(ReadError::Oversized(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(Msg::decode(&Bytes::from(body))))
}

/// Reads control-stream messages and hands them to the hub in order (waiting when it is
/// behind: QUIC flow control then holds the peer). `Err(close code)` on a protocol violation.
async fn read_stream(
    mut recv: RecvStream,
    node: u8,
    generation: u64,
    ctx: &Context,
) -> Result<(), u32> {
    loop {
        match read_message(&mut recv).await {
            Ok(Some(Ok(msg))) => {
                let event = HubEvent::Message {
                    peer: node,
                    generation,
                    msg,
                };
                if ctx.events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Some(Err(e))) => {
                ctx.metrics.count_drop(DropReason::Malformed);
                tracing::debug!(peer = node, "node relay: message dropped: {e}");
            }
            Ok(None) => return Ok(()),
            Err(ReadError::Oversized(len)) => {
                ctx.metrics.count_drop(DropReason::Oversized);
                tracing::warn!(peer = node, len, "node relay: oversized message; closing");
                return Err(CLOSE_PROTOCOL);
            }
            Err(e) => {
                tracing::debug!(peer = node, "node relay: control stream ended: {e}");
                return Ok(());
            }
        }
    }
}

/// Hands each datagram's frame to the worker of its channel.
async fn read_datagrams(conn: &quinn::Connection, peer: &PeerShared, ctx: &Context) {
    while let Ok(datagram) = conn.read_datagram().await {
        let Some((chan, frame)) = wire::split_datagram(&datagram) else {
            ctx.metrics.count_drop(DropReason::Malformed);
            continue;
        };
        let target = peer.inbound.lock().ok().and_then(|m| m.get(&chan).copied());
        match target {
            Some((worker, link)) => ctx.deliver(peer, worker, link, frame),
            None => ctx.metrics.count_drop(DropReason::UnknownChannel),
        }
    }
}

/// Sends the hub's messages (first) and the workers' frames: a frame that may be lost in a
/// datagram when it fits, everything else on the control stream.
async fn write(
    conn: &quinn::Connection,
    mut send: SendStream,
    mut ctl: mpsc::Receiver<Msg>,
    peer: &PeerShared,
) {
    // One connection reads the peer's queues at a time (a superseded one lets go when its
    // control queue closes).
    let mut rx = peer.rx.lock().await;
    let PeerRx { media, control } = &mut *rx;
    let mut buf = BytesMut::with_capacity(4096);
    let mut arena = wire::DatagramArena::default();
    // The hub's first messages (announcements, channels) go before any frame.
    let Some(first) = ctl.recv().await else {
        return;
    };
    first.encode(&mut buf);
    if send.write_all(&buf).await.is_err() {
        return;
    }
    loop {
        buf.clear();
        let (chan, frame) = tokio::select! {
            biased;
            msg = ctl.recv() => {
                let Some(msg) = msg else { return };
                msg.encode(&mut buf);
                if send.write_all(&buf).await.is_err() {
                    return;
                }
                continue;
            }
            Some(item) = control.recv() => item,
            Some(item) = media.recv() => item,
        };
        let len = frame.len() as u64;
        let fits = conn
            .max_datagram_size()
            .is_some_and(|max| frame.len() + wire::CHANNEL_LEN <= max);
        let datagram = if droppable(&frame) && fits {
            // quinn drops the oldest datagrams if its send buffer is full: loss the relay
            // repairs or conceals.
            match conn.send_datagram(arena.datagram(chan, &frame)) {
                Ok(()) => true,
                // The path's datagram size shrank: the stream takes it.
                Err(quinn::SendDatagramError::TooLarge) => false,
                Err(_) => {
                    peer.out.metrics.count_drop(DropReason::QueueFull);
                    continue;
                }
            }
        } else {
            false
        };
        if datagram {
            peer.counters
                .frames_out_datagram
                .fetch_add(1, Ordering::Relaxed);
        } else {
            Msg::Frame { chan, frame }.encode(&mut buf);
            if send.write_all(&buf).await.is_err() {
                return;
            }
            peer.counters
                .frames_out_stream
                .fetch_add(1, Ordering::Relaxed);
        }
        peer.counters.bytes_out.fetch_add(len, Ordering::Relaxed);
    }
}
