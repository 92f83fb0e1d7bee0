//! The node relay: one call over several server processes (docs/relay.md, "Between nodes").
//!
//! Each node keeps one QUIC connection to each peer node (`link.rs`; the lower node id dials,
//! with backoff, and dials again when it drops), authenticated both ways with the shared
//! `relay_secret` (`secure.rs`). On its control stream the nodes tell each other which
//! workers have participants of which calls (`wire.rs`); where a call has participants on
//! both, the leader of the pair (the lower id) opens a *channel* for each pair of workers that
//! carry it, and each end opens a relay link on its worker (`hub.rs`). Relay frames then go
//! between the two routers: media, levels, NACKs and keepalives in QUIC datagrams
//! (unreliable: the core repairs or conceals a loss), everything else, and any frame too big
//! for a datagram, on the control stream.
//!
//! A link is per pair of workers because a router exports only its own participants' tracks
//! (`calls_core::relay`: nothing is re-exported, so nothing loops); a call spread over
//! workers on both nodes is a full mesh of channels, like the in-process links (`spread.rs`).
//!
//! Every queue between threads is bounded: the frames of the workers for a peer (per lane,
//! `relay_queue_frames`; a full one drops and counts, a worker never waits), the frames from
//! a peer for a worker (the worker's own lanes), and the control stream (QUIC flow control
//! holds a peer that sends faster than the hub takes).

mod hub;
mod link;
mod secure;
mod wire;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use calls_core::{CallId, LinkId};
use tokio::sync::{mpsc, Notify};

use crate::spread::Spread;
use crate::worker::Cmd;
use crate::worker_queue::WorkerQueue;

/// Session ids are `node_id << SESSION_NODE_SHIFT` plus a counter, so that the ids of two
/// nodes never meet in one call (the core needs them unique across the routers of a call).
/// 40 bits leave 2^40 sessions per node start, and keep every id below 2^48, exact in a
/// JavaScript number.
pub const SESSION_NODE_SHIFT: u32 = 40;

/// The first session id of node `node` (its sessions count up from there).
pub fn first_session_id(node: u8) -> u64 {
    (u64::from(node) << SESSION_NODE_SHIFT) + 1
}

/// Relay link ids of node channels start here, far above the in-process links' (which count
/// from 1), so the two never meet on one router.
const NODE_LINK_BASE: u64 = 1 << 62;

/// A configured peer node: `host:port` or `id=host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// Its node id, when the configuration says it.
    pub id: Option<u8>,
    /// `host:port`, resolved at each dial (a Kubernetes pod's DNS name follows the pod).
    pub addr: String,
}

impl PeerAddr {
    /// Parses one `relay_peers` entry.
    pub fn parse(text: &str) -> Result<PeerAddr, String> {
        let text = text.trim();
        let (id, addr) = match text.split_once('=') {
            Some((id, addr)) => (
                Some(
                    id.trim()
                        .parse::<u8>()
                        .map_err(|_| format!("node id {:?} is not 0-255", id.trim()))?,
                ),
                addr.trim(),
            ),
            None => (None, text),
        };
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| "needs host:port".to_owned())?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err("needs host:port".to_owned());
        }
        Ok(PeerAddr {
            id,
            addr: addr.to_owned(),
        })
    }
}

/// Where a worker sends the frames of one node channel: the peer's queues, and the channel.
#[derive(Debug, Clone)]
pub struct NodeTx {
    pub chan: u32,
    pub out: Arc<PeerOut>,
}

/// The queues from the workers to one peer node's connection, persistent across reconnects.
#[derive(Debug)]
pub struct PeerOut {
    media: mpsc::Sender<(u32, Bytes)>,
    control: mpsc::Sender<(u32, Bytes)>,
    metrics: Arc<NodeMetrics>,
}

/// Whether a relay frame may be lost: it goes in a datagram and in the media lanes. The same
/// split as between workers (`spread::droppable`: media, levels, NACKs, keepalives).
pub fn droppable(frame: &[u8]) -> bool {
    frame.get(2).copied().is_some_and(crate::spread::droppable)
}

impl PeerOut {
    /// Queues a frame of channel `chan` for the peer; never waits. A full queue drops it
    /// (counted); returns whether it was queued.
    pub fn send(&self, chan: u32, frame: Bytes) -> bool {
        let lane = if droppable(&frame) {
            &self.media
        } else {
            &self.control
        };
        if lane.try_send((chan, frame)).is_ok() {
            true
        } else {
            self.metrics.count_drop(DropReason::QueueFull);
            false
        }
    }
}

/// Counters of one peer node (label `peer`).
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub connected: AtomicU64,
    pub connections: AtomicU64,
    /// Frames sent in datagrams, and on the control stream (control frames, and media too
    /// big for a datagram).
    pub frames_out_datagram: AtomicU64,
    pub frames_out_stream: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub channels: AtomicU64,
}

/// Why a relay frame or message from or for a peer was dropped (label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A queue towards a peer or a worker was full.
    QueueFull,
    /// A frame for a channel this node does not have (just closed, or not yet open).
    UnknownChannel,
    /// A datagram or message that does not decode.
    Malformed,
    /// A control-stream message longer than the protocol allows (the connection is closed).
    Oversized,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::QueueFull,
        DropReason::UnknownChannel,
        DropReason::Malformed,
        DropReason::Oversized,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::UnknownChannel => "unknown_channel",
            DropReason::Malformed => "malformed",
            DropReason::Oversized => "oversized",
        }
    }
}

/// The node relay's counters for `/metrics`.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    peers: Mutex<BTreeMap<u8, Arc<PeerCounters>>>,
    dropped: [AtomicU64; 4],
    /// Connections closed because the other end did not prove the secret (wrong MAC, no hello
    /// in time, a bad hello, the wrong node).
    pub auth_failures: AtomicU64,
    /// Incoming connections refused because too many were still authenticating.
    pub refused: AtomicU64,
}

impl NodeMetrics {
    pub fn count_drop(&self, why: DropReason) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of peer `node` (made on first use: at most 256).
    pub fn peer(&self, node: u8) -> Arc<PeerCounters> {
        let Ok(mut peers) = self.peers.lock() else {
            return Arc::default();
        };
        Arc::clone(peers.entry(node).or_default())
    }

    /// The OpenMetrics text of the node relay's series (no `# EOF`).
    pub fn render(&self) -> String {
        let peers: Vec<(u8, Arc<PeerCounters>)> = self
            .peers
            .lock()
            .map(|p| p.iter().map(|(k, v)| (*k, Arc::clone(v))).collect())
            .unwrap_or_default();
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&PeerCounters) -> u64| {
                let _ = write!(out, "# TYPE {name} {kind}\n# HELP {name} {help}\n");
                let sample = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                for (peer, c) in &peers {
                    let _ = writeln!(out, "{sample}{{peer=\"{peer}\"}} {}", value(c));
                }
            };
        family(
            "calls_node_peer_connected",
            "gauge",
            "1 while an authenticated relay connection to the peer node is up.",
            &|c| c.connected.load(Ordering::Relaxed),
        );
        family(
            "calls_node_connections",
            "counter",
            "Authenticated relay connections made with the peer node (more than one: it reconnected).",
            &|c| c.connections.load(Ordering::Relaxed),
        );
        family(
            "calls_node_relay_channels",
            "gauge",
            "Relay links (one per pair of workers of a call) open with the peer node.",
            &|c| c.channels.load(Ordering::Relaxed),
        );
        family(
            "calls_node_relay_bytes_out",
            "counter",
            "Bytes of the relay frames sent to the peer node (without QUIC overhead).",
            &|c| c.bytes_out.load(Ordering::Relaxed),
        );
        family(
            "calls_node_relay_frames_in",
            "counter",
            "Relay frames received from the peer node and handed to a worker.",
            &|c| c.frames_in.load(Ordering::Relaxed),
        );
        family(
            "calls_node_relay_bytes_in",
            "counter",
            "Bytes of the relay frames received from the peer node.",
            &|c| c.bytes_in.load(Ordering::Relaxed),
        );
        let _ = write!(out, "# TYPE calls_node_relay_frames_out counter\n# HELP calls_node_relay_frames_out Relay frames sent to the peer node, in QUIC datagrams or on the control stream.\n");
        for (peer, c) in &peers {
            let _ = write!(
                out,
                "calls_node_relay_frames_out_total{{peer=\"{peer}\",path=\"datagram\"}} {}\ncalls_node_relay_frames_out_total{{peer=\"{peer}\",path=\"stream\"}} {}\n",
                c.frames_out_datagram.load(Ordering::Relaxed),
                c.frames_out_stream.load(Ordering::Relaxed)
            );
        }
        out += "# TYPE calls_node_relay_dropped counter\n# HELP calls_node_relay_dropped Relay frames or messages dropped: a full queue, an unknown channel, malformed, oversized.\n";
        for why in DropReason::ALL {
            let _ = writeln!(
                out,
                "calls_node_relay_dropped_total{{reason=\"{}\"}} {}",
                why.label(),
                self.dropped[why as usize].load(Ordering::Relaxed)
            );
        }
        let _ = write!(
            out,
            "# TYPE calls_node_auth_failures counter\n# HELP calls_node_auth_failures Relay connections closed because the other end did not prove the shared secret.\ncalls_node_auth_failures_total {}\n",
            self.auth_failures.load(Ordering::Relaxed)
        );
        let _ = write!(
            out,
            "# TYPE calls_node_refused counter\n# HELP calls_node_refused Relay connections refused because too many were still authenticating.\ncalls_node_refused_total {}\n",
            self.refused.load(Ordering::Relaxed)
        );
        out
    }
}

/// Calls whose workers changed (a worker got its first participant of the call or lost its
/// last), for the hub to announce. A set, so it stays as small as the number of calls.
#[derive(Debug, Default)]
pub struct CallChanges {
    dirty: Mutex<HashSet<CallId>>,
    notify: Notify,
}

impl CallChanges {
    /// `call`'s workers changed.
    pub fn changed(&self, call: &CallId) {
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty.insert(call.clone());
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<CallId> {
        self.dirty
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default()
    }
}

/// What the relay needs of the rest of the server.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: u8,
    pub listen: std::net::SocketAddr,
    pub peers: Vec<PeerAddr>,
    pub secret: RelaySecret,
    pub peer_gone: std::time::Duration,
    pub queue_frames: usize,
}

/// The shared relay secret; its `Debug` never shows it (a logged configuration stays safe).
#[derive(Clone)]
pub struct RelaySecret(pub Vec<u8>);

impl std::fmt::Debug for RelaySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelaySecret(..)")
    }
}

/// Starts the node relay on the current tokio runtime: binds the QUIC endpoint, dials the
/// peers, accepts connections. Returns once the endpoint is bound.
pub fn start(
    settings: NodeSettings,
    queues: Vec<Arc<WorkerQueue<Cmd>>>,
    spread: Arc<Spread>,
    changes: Arc<CallChanges>,
    metrics: Arc<NodeMetrics>,
) -> Result<Relay, String> {
    let endpoint = secure::endpoint(settings.listen)?;
    // The configured peers' series exist from the start (`calls_node_peer_connected` 0 until
    // they connect), so an alert sees a peer that never came.
    for id in settings.peers.iter().filter_map(|p| p.id) {
        if id != settings.node_id {
            metrics.peer(id);
        }
    }
    tracing::info!(
        node = settings.node_id,
        listen = %settings.listen,
        peers = settings.peers.len(),
        "node relay listening (QUIC)"
    );
    let (events, hub_rx) = mpsc::channel(hub::EVENT_QUEUE);
    let ctx = Arc::new(link::Context {
        settings: settings.clone(),
        incarnation: {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| format!("random: {e}"))?;
            u64::from_be_bytes(bytes)
        },
        metrics: Arc::clone(&metrics),
        queues: queues.clone(),
        peers: Mutex::default(),
        events,
        next_generation: AtomicU64::new(1),
        pending: AtomicU64::new(0),
        cut_until: Mutex::default(),
    });
    let hub = hub::Hub::new(
        settings.node_id,
        settings.peer_gone,
        queues,
        spread,
        changes,
        Arc::clone(&ctx),
    );
    tokio::spawn(hub.run(hub_rx));
    tokio::spawn(link::accept_loop(endpoint.clone(), Arc::clone(&ctx)));
    for peer in settings.peers {
        tokio::spawn(link::dial_loop(endpoint.clone(), peer, Arc::clone(&ctx)));
    }
    Ok(Relay { ctx })
}

/// The running node relay, for `/metrics` and the debug admin API.
#[derive(Debug, Clone)]
pub struct Relay {
    ctx: Arc<link::Context>,
}

impl Relay {
    pub fn metrics(&self) -> &NodeMetrics {
        &self.ctx.metrics
    }

    /// Debug builds only (`POST /api/debug/relay/cut/{peer}/{ms}`): drops the connection with
    /// `peer` and refuses it again for `duration`, to test a link that drops and comes back.
    #[cfg(debug_assertions)]
    pub fn cut(&self, peer: u8, duration: std::time::Duration) {
        if let Ok(mut cut) = self.ctx.cut_until.lock() {
            cut.insert(peer, std::time::Instant::now() + duration);
        }
        let _ = self.ctx.events.try_send(hub::HubEvent::Cut { peer });
    }
}

/// A fresh link id for a node channel.
fn node_link(next: &mut u64) -> LinkId {
    *next += 1;
    LinkId(NODE_LINK_BASE + *next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_or_without_an_id() {
        assert_eq!(
            PeerAddr::parse(" 2 = calls-2.calls.svc:7443 "),
            Ok(PeerAddr {
                id: Some(2),
                addr: "calls-2.calls.svc:7443".to_owned()
            })
        );
        assert_eq!(PeerAddr::parse("127.0.0.1:7443").unwrap().id, None);
        assert_eq!(PeerAddr::parse("[::1]:7443").unwrap().addr, "[::1]:7443");
        for bad in ["", "host", "host:0", ":7443", "300=h:1", "x=h:1", "h:port"] {
            assert!(PeerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_ids_of_two_nodes_never_meet_and_stay_exact_in_javascript() {
        assert_eq!(first_session_id(0), 1);
        assert!(first_session_id(1) > 1 << 39);
        assert!(first_session_id(255) + (1 << 39) < 1 << 53);
    }

    #[test]
    fn metrics_render_every_family_with_base_units() {
        let m = NodeMetrics::default();
        m.peer(2)
            .frames_out_datagram
            .fetch_add(3, Ordering::Relaxed);
        m.count_drop(DropReason::Malformed);
        m.auth_failures.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("calls_node_relay_frames_out_total{peer=\"2\",path=\"datagram\"} 3"),
            "{text}"
        );
        assert!(text.contains("calls_node_relay_dropped_total{reason=\"malformed\"} 1"));
        assert!(text.contains("calls_node_auth_failures_total 1"));
    }
}
