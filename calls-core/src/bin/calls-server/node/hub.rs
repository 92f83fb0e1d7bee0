//! The node relay's state: which calls each peer node has on which workers, and the channels
//! (relay links between a worker here and a worker there) that follow from it. One task owns
//! it and handles, in order: connections coming and going, the peers' control messages, and
//! the local calls' changes (from `spread.rs`).
//!
//! - **Announcements.** Each node tells each peer, for every call it has participants in, on
//!   which of its workers (again when that changes; an empty list: the call left the node).
//!   After connecting, each sends all of them and then `Synced`.
//! - **Channels.** The *leader* of a pair of nodes (the lower id) opens a channel for every
//!   pair of workers, one here and one there, that both carry a call, and closes those that no
//!   longer do. It sends `Open` before its worker opens the link, so the follower knows the
//!   channel before the first frame; the follower opens its link on `Open`.
//! - **A connection drops.** Nothing closes: the links go silent and the core pauses their
//!   tracks. When it comes back, the leader repeats its open channels (the follower closes the
//!   ones not repeated) and both re-announce. A peer that restarted (a new incarnation) had its
//!   links torn down with it: all its channels are closed before new ones open.
//! - **A peer gone for good** (no connection for `relay_peer_gone_s`): all its channels are
//!   closed, so its participants leave this node's calls.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use calls_core::{CallId, LinkId};
use quinn::VarInt;
use tokio::sync::mpsc;

use super::link::{Context, PeerShared, CLOSE_DUPLICATE, CLOSE_PROTOCOL};
use super::wire::Msg;
use super::{node_link, CallChanges, DropReason, NodeTx};
use crate::spread::Spread;
use crate::worker::{Cmd, RelayPeer};
use crate::worker_queue::WorkerQueue;

/// Events queued for the hub; a connection reading faster than the hub waits.
pub const EVENT_QUEUE: usize = 1024;
/// Channels one peer may have open with this node (a channel is a relay link on a worker).
const MAX_CHANNELS_PER_PEER: usize = 16_384;
/// Calls one peer may announce.
const MAX_CALLS_PER_PEER: usize = 65_536;
/// Messages waiting for one connection's control stream: room for a full snapshot (every call
/// announced, and a channel for each) and the changes after it. A peer that does not read its
/// stream while that many wait is closed (its successor gets a fresh snapshot).
pub const CONTROL_QUEUE: usize = 2 * MAX_CALLS_PER_PEER + 1024;
/// How often gone peers are looked for.
const TICK: Duration = Duration::from_millis(500);

/// What the connections tell the hub.
#[derive(Debug)]
pub enum HubEvent {
    /// An authenticated connection with `peer`; `ctl` takes the messages to send on it.
    Connected {
        peer: u8,
        incarnation: u64,
        generation: u64,
        /// Dialed by the node with the lower id (preferred over one that is not).
        dialed_by_lower: bool,
        /// The connection, to close (`None` in the hub's unit tests).
        conn: Option<quinn::Connection>,
        /// Set when the hub closes it for another connection with the same peer.
        superseded: Arc<AtomicBool>,
        ctl: mpsc::Sender<Msg>,
    },
    Disconnected {
        peer: u8,
        generation: u64,
    },
    Message {
        peer: u8,
        generation: u64,
        msg: Msg,
    },
    /// Debug builds: drop the connection with `peer` (`Relay::cut`).
    #[cfg(debug_assertions)]
    Cut {
        peer: u8,
    },
}

/// A channel: a relay link between `worker` here and `remote_worker` on the peer.
#[derive(Debug, Clone)]
struct Channel {
    call: CallId,
    worker: usize,
    remote_worker: u8,
    link: LinkId,
}

/// The connection in use with a peer.
#[derive(Debug)]
struct Live {
    generation: u64,
    dialed_by_lower: bool,
    conn: Option<quinn::Connection>,
    superseded: Arc<AtomicBool>,
    ctl: mpsc::Sender<Msg>,
    /// The peer's `Synced` arrived on it: its announcements are complete.
    synced: bool,
}

impl Live {
    fn close(&self, code: u32, reason: &[u8]) {
        if let Some(conn) = &self.conn {
            conn.close(VarInt::from_u32(code), reason);
        }
    }
}

#[derive(Debug)]
struct Peer {
    id: u8,
    /// This node has the lower id: it numbers, opens and closes the channels.
    leader: bool,
    shared: Arc<PeerShared>,
    live: Option<Live>,
    incarnation: Option<u64>,
    /// When the last connection ended (`None` while connected, or never connected).
    lost_at: Option<Instant>,
    /// Its workers per call, as announced.
    calls: HashMap<CallId, BTreeSet<u8>>,
    /// Announcements since the connection began, until its `Synced`.
    pending_calls: HashMap<CallId, BTreeSet<u8>>,
    channels: HashMap<u32, Channel>,
    /// Follower: channels not yet repeated by the leader since the connection began.
    unconfirmed: HashSet<u32>,
    next_chan: u32,
}

impl Peer {
    fn send(&self, msg: Msg) {
        if let Some(live) = &self.live {
            match live.ctl.try_send(msg) {
                Ok(()) => {}
                // The connection is ending; its successor gets a fresh snapshot.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                // The peer does not read its control stream: close; the next connection
                // starts from a fresh snapshot.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.shared.out.metrics.count_drop(DropReason::QueueFull);
                    live.close(CLOSE_PROTOCOL, b"control queue full");
                }
            }
        }
    }
}

/// The hub (see the [module docs](self)).
#[derive(Debug)]
pub struct Hub {
    me: u8,
    peer_gone: Duration,
    queues: Vec<Arc<WorkerQueue<Cmd>>>,
    spread: Arc<Spread>,
    changes: Arc<CallChanges>,
    ctx: Arc<Context>,
    /// This node's workers per call, as last announced.
    local: HashMap<CallId, BTreeSet<u8>>,
    peers: HashMap<u8, Peer>,
    next_link: u64,
}

impl Hub {
    pub fn new(
        me: u8,
        peer_gone: Duration,
        queues: Vec<Arc<WorkerQueue<Cmd>>>,
        spread: Arc<Spread>,
        changes: Arc<CallChanges>,
        ctx: Arc<Context>,
    ) -> Self {
        Hub {
            me,
            peer_gone,
            queues,
            spread,
            changes,
            ctx,
            local: HashMap::new(),
            peers: HashMap::new(),
            next_link: 0,
        }
    }

    /// Runs for the life of the process.
    pub async fn run(mut self, mut events: mpsc::Receiver<HubEvent>) {
        let mut tick = tokio::time::interval(TICK);
        let changes = Arc::clone(&self.changes);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => return,
                },
                () = changes.notify.notified() => self.on_local_changes(),
                _ = tick.tick() => self.forget_gone_peers(Instant::now()),
            }
        }
    }

    fn on_event(&mut self, event: HubEvent) {
        match event {
            HubEvent::Connected {
                peer,
                incarnation,
                generation,
                dialed_by_lower,
                conn,
                superseded,
                ctl,
            } => self.connected(
                peer,
                incarnation,
                Live {
                    generation,
                    dialed_by_lower,
                    conn,
                    superseded,
                    ctl,
                    synced: false,
                },
            ),
            HubEvent::Disconnected { peer, generation } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.live.as_ref().is_some_and(|l| l.generation == generation) {
                    p.live = None;
                    p.lost_at = Some(Instant::now());
                    p.shared.counters.connected.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        peer,
                        "node relay: peer unreachable; its tracks pause until it is back"
                    );
                }
            }
            #[cfg(debug_assertions)]
            HubEvent::Cut { peer } => {
                if let Some(live) = self.peers.get(&peer).and_then(|p| p.live.as_ref()) {
                    live.close(super::link::CLOSE_DONE, b"cut");
                }
            }
            HubEvent::Message {
                peer,
                generation,
                msg,
            } => {
                let current = self
                    .peers
                    .get(&peer)
                    .and_then(|p| p.live.as_ref())
                    .is_some_and(|l| l.generation == generation);
                if current {
                    self.on_message(peer, msg);
                }
            }
        }
    }

    fn connected(&mut self, id: u8, incarnation: u64, live: Live) {
        let shared = self.ctx.peer(id);
        let me = self.me;
        let p = self.peers.entry(id).or_insert_with(|| Peer {
            id,
            leader: me < id,
            shared,
            live: None,
            incarnation: None,
            lost_at: None,
            calls: HashMap::new(),
            pending_calls: HashMap::new(),
            channels: HashMap::new(),
            unconfirmed: HashSet::new(),
            next_chan: 0,
        });
        if let Some(old) = &p.live {
            // Two connections with one node: keep the one the lower id dialed; between two
            // alike, the newer (the older is likely dead and not yet timed out).
            let (keep_new, loser) = if old.dialed_by_lower && !live.dialed_by_lower {
                (false, &live)
            } else {
                (true, old)
            };
            loser.superseded.store(true, Ordering::Relaxed);
            loser.close(CLOSE_DUPLICATE, b"duplicate");
            if !keep_new {
                return;
            }
        }
        if p.incarnation.is_some_and(|known| known != incarnation) {
            tracing::info!(
                peer = id,
                "node relay: the peer restarted; its old links close"
            );
            let tell = p.leader;
            close_all(p, &self.queues, tell);
        }
        // No state with this peer (never connected, or given up as gone): the peer must drop
        // whatever it still has with this node, or its links would outlive ours.
        let fresh = p.incarnation.is_none();
        p.incarnation = Some(incarnation);
        p.live = Some(live);
        p.lost_at = None;
        p.pending_calls.clear();
        p.unconfirmed = if p.leader {
            HashSet::new()
        } else {
            p.channels.keys().copied().collect()
        };
        p.shared.counters.connected.store(1, Ordering::Relaxed);
        p.shared
            .counters
            .connections
            .fetch_add(1, Ordering::Relaxed);
        // The snapshot: `Reset` if this node has nothing with the peer, every local call, the
        // leader's open channels, then `Synced`.
        if fresh {
            p.send(Msg::Reset);
        }
        for (call, workers) in &self.local {
            p.send(Msg::Announce {
                call: call.clone(),
                workers: workers.iter().copied().collect(),
            });
        }
        if p.leader {
            for (chan, c) in &p.channels {
                p.send(Msg::Open {
                    chan: *chan,
                    leader_worker: c.worker as u8,
                    follower_worker: c.remote_worker,
                    call: c.call.clone(),
                });
            }
        }
        p.send(Msg::Synced);
    }

    fn on_message(&mut self, id: u8, msg: Msg) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let synced = p.live.as_ref().is_some_and(|l| l.synced);
        match msg {
            Msg::Hello(_) => self.ctx.metrics.count_drop(DropReason::Malformed),
            Msg::Announce { call, workers } => {
                let calls = if synced {
                    &mut p.calls
                } else {
                    &mut p.pending_calls
                };
                if workers.is_empty() {
                    calls.remove(&call);
                } else if calls.len() < MAX_CALLS_PER_PEER || calls.contains_key(&call) {
                    calls.insert(call, workers.into_iter().collect());
                } else {
                    self.ctx.metrics.count_drop(DropReason::QueueFull);
                }
                if synced {
                    self.reconcile(id);
                }
            }
            Msg::Reset => {
                if !p.channels.is_empty() {
                    tracing::info!(
                        peer = id,
                        "node relay: the peer has no links with this node; closing ours"
                    );
                }
                // The leader tells the follower, which may have opened some of them from this
                // node's snapshot already.
                let tell = p.leader;
                close_all(p, &self.queues, tell);
            }
            Msg::Synced => {
                if let Some(live) = &mut p.live {
                    live.synced = true;
                }
                p.calls = std::mem::take(&mut p.pending_calls);
                if !p.leader {
                    // What the leader did not repeat, it closed while the connection was down.
                    for chan in std::mem::take(&mut p.unconfirmed) {
                        close_channel(p, chan, &self.queues, false);
                    }
                }
                self.reconcile(id);
            }
            Msg::Open {
                chan,
                leader_worker,
                follower_worker,
                call,
            } => {
                if p.leader {
                    self.ctx.metrics.count_drop(DropReason::Malformed);
                    return;
                }
                p.unconfirmed.remove(&chan);
                let worker = usize::from(follower_worker);
                if let Some(c) = p.channels.get(&chan) {
                    if c.call == call && c.worker == worker && c.remote_worker == leader_worker {
                        return; // repeated after a reconnect: still open
                    }
                    close_channel(p, chan, &self.queues, false);
                }
                if worker >= self.queues.len() || p.channels.len() >= MAX_CHANNELS_PER_PEER {
                    self.ctx.metrics.count_drop(DropReason::Malformed);
                    return;
                }
                let link = node_link(&mut self.next_link);
                open_channel(
                    p,
                    chan,
                    Channel {
                        call,
                        worker,
                        remote_worker: leader_worker,
                        link,
                    },
                    &self.queues,
                );
            }
            Msg::Close { chan } => {
                if !p.leader {
                    close_channel(p, chan, &self.queues, false);
                }
            }
            Msg::Frame { chan, frame } => match p.channels.get(&chan) {
                Some(c) => self.ctx.deliver(&p.shared, c.worker, c.link, frame),
                None => self.ctx.metrics.count_drop(DropReason::UnknownChannel),
            },
        }
    }

    /// Takes the calls whose workers changed, announces them, and reconciles every peer.
    fn on_local_changes(&mut self) {
        let changed = self.changes.take();
        if changed.is_empty() {
            return;
        }
        for call in changed {
            let workers: BTreeSet<u8> = self
                .spread
                .workers_of(&call)
                .into_iter()
                .map(|w| w as u8)
                .collect();
            if self.local.get(&call) == Some(&workers)
                || (workers.is_empty() && !self.local.contains_key(&call))
            {
                continue;
            }
            for p in self.peers.values() {
                p.send(Msg::Announce {
                    call: call.clone(),
                    workers: workers.iter().copied().collect(),
                });
            }
            if workers.is_empty() {
                self.local.remove(&call);
            } else {
                self.local.insert(call, workers);
            }
        }
        let ids: Vec<u8> = self.peers.keys().copied().collect();
        for id in ids {
            self.reconcile(id);
        }
    }

    /// The leader's part: a channel for every pair of workers that both carry a call, none
    /// for the others. While the peer is unreachable (or has not finished its snapshot) only
    /// the channels whose local side emptied are closed; its calls are as it last said.
    fn reconcile(&mut self, id: u8) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if !p.leader {
            return;
        }
        let synced = p.live.as_ref().is_some_and(|l| l.synced);
        let mut wanted: HashSet<(CallId, usize, u8)> = HashSet::new();
        for (call, theirs) in &p.calls {
            if let Some(ours) = self.local.get(call) {
                for w in ours {
                    for r in theirs {
                        wanted.insert((call.clone(), usize::from(*w), *r));
                    }
                }
            }
        }
        let stale: Vec<u32> = p
            .channels
            .iter()
            .filter(|(_, c)| {
                let local_gone = !self
                    .local
                    .get(&c.call)
                    .is_some_and(|ws| ws.contains(&(c.worker as u8)));
                local_gone
                    || (synced && !wanted.contains(&(c.call.clone(), c.worker, c.remote_worker)))
            })
            .map(|(chan, _)| *chan)
            .collect();
        for chan in stale {
            close_channel(p, chan, &self.queues, true);
        }
        if !synced {
            return;
        }
        let have: HashSet<(CallId, usize, u8)> = p
            .channels
            .values()
            .map(|c| (c.call.clone(), c.worker, c.remote_worker))
            .collect();
        let mut missing: Vec<(CallId, usize, u8)> = wanted.difference(&have).cloned().collect();
        missing.sort();
        for (call, worker, remote_worker) in missing {
            if p.channels.len() >= MAX_CHANNELS_PER_PEER || worker >= self.queues.len() {
                break;
            }
            p.next_chan = p.next_chan.wrapping_add(1);
            let chan = p.next_chan;
            // The follower learns the channel before any frame of it (the connection writes
            // the hub's messages first).
            p.send(Msg::Open {
                chan,
                leader_worker: worker as u8,
                follower_worker: remote_worker,
                call: call.clone(),
            });
            let link = node_link(&mut self.next_link);
            open_channel(
                p,
                chan,
                Channel {
                    call,
                    worker,
                    remote_worker,
                    link,
                },
                &self.queues,
            );
        }
    }

    /// Closes every channel of the peers unreachable for longer than `relay_peer_gone_s`.
    fn forget_gone_peers(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            let gone = p
                .lost_at
                .is_some_and(|at| now.saturating_duration_since(at) >= self.peer_gone);
            if gone {
                tracing::warn!(
                    peer = p.id,
                    "node relay: peer gone for good; its participants leave the calls here"
                );
                close_all(p, &self.queues, false);
                p.calls.clear();
                p.incarnation = None;
                p.lost_at = None;
            }
        }
    }
}

/// Registers a channel and opens its link on the worker (the worker's control lane takes it
/// before any frame queued after it).
fn open_channel(p: &mut Peer, chan: u32, c: Channel, queues: &[Arc<WorkerQueue<Cmd>>]) {
    if let Ok(mut inbound) = p.shared.inbound.lock() {
        inbound.insert(chan, (c.worker, c.link));
    }
    tracing::info!(peer = p.id, chan, call = %c.call, worker = c.worker, remote_worker = c.remote_worker, link = %c.link, "node relay: channel opened");
    if let Some(q) = queues.get(c.worker) {
        q.push_release(Cmd::RelayOpen {
            call: c.call.clone(),
            link: c.link,
            peer: RelayPeer::Node(NodeTx {
                chan,
                out: Arc::clone(&p.shared.out),
            }),
        });
    }
    p.channels.insert(chan, c);
    p.shared
        .counters
        .channels
        .store(p.channels.len() as u64, Ordering::Relaxed);
}

/// Unregisters a channel and closes its link on the worker; `tell`: the leader tells the peer.
fn close_channel(p: &mut Peer, chan: u32, queues: &[Arc<WorkerQueue<Cmd>>], tell: bool) {
    let Some(c) = p.channels.remove(&chan) else {
        return;
    };
    if tell {
        p.send(Msg::Close { chan });
    }
    if let Ok(mut inbound) = p.shared.inbound.lock() {
        inbound.remove(&chan);
    }
    tracing::info!(peer = p.id, chan, call = %c.call, worker = c.worker, "node relay: channel closed");
    if let Some(q) = queues.get(c.worker) {
        q.push_release(Cmd::RelayClose { link: c.link });
    }
    p.shared
        .counters
        .channels
        .store(p.channels.len() as u64, Ordering::Relaxed);
}

/// Closes every channel with the peer; `tell`: the leader tells the peer of each.
fn close_all(p: &mut Peer, queues: &[Arc<WorkerQueue<Cmd>>], tell: bool) {
    let chans: Vec<u32> = p.channels.keys().copied().collect();
    for chan in chans {
        close_channel(p, chan, queues, tell);
    }
    p.unconfirmed.clear();
}

#[cfg(test)]
mod tests {
    //! Two hubs wired back to back without sockets: the test carries each hub's messages to
    //! the other and reads the relay commands their workers got.
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use super::*;
    use crate::load_meter::WorkerStatus;
    use crate::node::{NodeMetrics, NodeSettings, RelaySecret};

    const GONE: Duration = Duration::from_secs(10);

    struct Node {
        id: u8,
        incarnation: u64,
        hub: Hub,
        queues: Vec<Arc<WorkerQueue<Cmd>>>,
        spread: Arc<Spread>,
        /// What the hub sends on its connection with the other node.
        ctl: Option<mpsc::Receiver<Msg>>,
        generation: u64,
        /// Relay links open on its workers (from the commands they got).
        links: BTreeMap<LinkId, usize>,
    }

    fn node(id: u8, workers: usize, incarnation: u64) -> Node {
        let queues: Vec<Arc<WorkerQueue<Cmd>>> = (0..workers)
            .map(|_| Arc::new(WorkerQueue::new(1024, 1024)))
            .collect();
        let statuses = (0..workers)
            .map(|_| Arc::new(WorkerStatus::new()))
            .collect();
        let changes = Arc::new(CallChanges::default());
        // Every call spreads from its first participant on: joins alternate between workers.
        let spread = Arc::new(Spread::new(
            queues.clone(),
            statuses,
            1,
            Some(Arc::clone(&changes)),
        ));
        let (events, _) = mpsc::channel(1);
        let ctx = Arc::new(Context {
            settings: NodeSettings {
                node_id: id,
                listen: "127.0.0.1:0".parse().unwrap(),
                peers: Vec::new(),
                secret: RelaySecret(Vec::new()),
                peer_gone: GONE,
                queue_frames: 64,
            },
            incarnation,
            metrics: Arc::new(NodeMetrics::default()),
            queues: queues.clone(),
            peers: Mutex::default(),
            events,
            next_generation: AtomicU64::new(1),
            pending: AtomicU64::new(0),
            cut_until: Mutex::default(),
        });
        let hub = Hub::new(id, GONE, queues.clone(), Arc::clone(&spread), changes, ctx);
        Node {
            id,
            incarnation,
            hub,
            queues,
            spread,
            ctl: None,
            generation: 0,
            links: BTreeMap::new(),
        }
    }

    impl Node {
        fn connect_to(&mut self, other: &Node) {
            let (ctl, rx) = mpsc::channel(CONTROL_QUEUE);
            self.generation += 1;
            self.ctl = Some(rx);
            self.hub.on_event(HubEvent::Connected {
                peer: other.id,
                incarnation: other.incarnation,
                generation: self.generation,
                dialed_by_lower: true,
                conn: None,
                superseded: Arc::default(),
                ctl,
            });
        }

        fn disconnect_from(&mut self, other: &Node) {
            self.ctl = None;
            self.hub.on_event(HubEvent::Disconnected {
                peer: other.id,
                generation: self.generation,
            });
        }

        /// Applies the node links' commands its workers got to `links` (the in-process links
        /// between its workers are not node channels).
        fn read_workers(&mut self) {
            for (w, q) in self.queues.iter().enumerate() {
                while let Some(queued) = q.pop(Duration::ZERO) {
                    match queued.item {
                        Cmd::RelayOpen { link, .. } | Cmd::RelayClose { link }
                            if link.0 < super::super::NODE_LINK_BASE => {}
                        Cmd::RelayOpen { link, .. } => {
                            assert!(self.links.insert(link, w).is_none(), "{link} twice");
                        }
                        Cmd::RelayClose { link } => {
                            assert!(self.links.remove(&link).is_some(), "{link} not open");
                        }
                        _ => {}
                    }
                }
            }
        }

        /// Its channels with the other node: number → (its worker, the other's worker).
        fn channels(&self, other: u8) -> BTreeMap<u32, (usize, u8)> {
            self.hub.peers.get(&other).map_or_else(BTreeMap::new, |p| {
                p.channels
                    .iter()
                    .map(|(n, c)| (*n, (c.worker, c.remote_worker)))
                    .collect()
            })
        }
    }

    fn connect(a: &mut Node, b: &mut Node) {
        a.connect_to(b);
        b.connect_to(a);
        settle(a, b);
    }

    fn disconnect(a: &mut Node, b: &mut Node) {
        a.disconnect_from(b);
        b.disconnect_from(a);
        settle(a, b);
    }

    /// Carries messages both ways (while connected) and local changes until nothing moves.
    fn settle(a: &mut Node, b: &mut Node) {
        loop {
            a.hub.on_local_changes();
            b.hub.on_local_changes();
            let moved = carry(a, b) | carry(b, a);
            if !moved {
                break;
            }
        }
        a.read_workers();
        b.read_workers();
    }

    /// Hands `to` what `from` sent it; whether there was anything.
    fn carry(from: &mut Node, to: &mut Node) -> bool {
        let Some(rx) = from.ctl.as_mut() else {
            return false;
        };
        let mut moved = false;
        while let Ok(msg) = rx.try_recv() {
            moved = true;
            if to.ctl.is_some() {
                to.hub.on_event(HubEvent::Message {
                    peer: from.id,
                    generation: to.generation,
                    msg,
                });
            }
        }
        moved
    }

    /// Both ends agree on the channels (and each has a link open for each, nothing more).
    fn assert_matched(a: &Node, b: &Node, expected: usize) {
        let (ours, theirs) = (a.channels(b.id), b.channels(a.id));
        assert_eq!(ours.len(), expected, "{ours:?}");
        let mirrored: BTreeMap<u32, (usize, u8)> = theirs
            .iter()
            .map(|(n, (w, r))| (*n, (usize::from(*r), *w as u8)))
            .collect();
        assert_eq!(ours, mirrored, "the two ends disagree");
        assert_eq!(a.links.len(), expected, "node {} links", a.id);
        assert_eq!(b.links.len(), expected, "node {} links", b.id);
    }

    #[test]
    fn a_call_on_both_nodes_gets_one_channel_per_pair_of_workers() {
        let (mut a, mut b) = (node(1, 2, 11), node(2, 1, 22));
        connect(&mut a, &mut b);
        let call = CallId::from("standup");
        let (a0, a1) = (a.spread.place(&call), a.spread.place(&call));
        assert_ne!(a0, a1, "the call is on both of node 1's workers");
        settle(&mut a, &mut b);
        assert_matched(&a, &b, 0);
        let b0 = b.spread.place(&call);
        settle(&mut a, &mut b);
        assert_matched(&a, &b, 2);
        // Node 2's participant leaves: both channels close at both ends.
        b.spread.unplace(&call, b0);
        settle(&mut a, &mut b);
        assert_matched(&a, &b, 0);
        // Another call on node 2 only: nothing to bridge.
        b.spread.place(&CallId::from("other"));
        settle(&mut a, &mut b);
        assert_matched(&a, &b, 0);
    }

    #[test]
    fn a_reconnection_keeps_the_links_and_catches_up_with_what_changed_meanwhile() {
        let (mut a, mut b) = (node(1, 1, 11), node(2, 1, 22));
        connect(&mut a, &mut b);
        let call = CallId::from("standup");
        a.spread.place(&call);
        b.spread.place(&call);
        settle(&mut a, &mut b);
        assert_matched(&a, &b, 1);
        let before = a.links.clone();
        // A blip: nothing closes, and after it the same links go on.
        disconnect(&mut a, &mut b);
        connect(&mut a, &mut b);
        assert_matched(&a, &b, 1);
        assert_eq!(a.links, before);
        // While cut off, node 1's participant leaves (its side closes) and another joins.
        disconnect(&mut a, &mut b);
        a.spread.unplace(&call, 0);
        settle(&mut a, &mut b);
        assert!(a.links.is_empty() && b.links.len() == 1);
        a.spread.place(&call);
        settle(&mut a, &mut b);
        assert!(a.links.is_empty(), "no channel opens while cut off");
        // Back: node 2 drops the channel node 1 no longer has, and a new one opens.
        connect(&mut a, &mut b);
        assert_matched(&a, &b, 1);
        assert_ne!(a.links, before);
    }

    #[test]
    fn a_restarted_or_given_up_peer_leaves_no_link_behind() {
        let call = CallId::from("standup");
        // Node 1 gives node 2 up as gone (its links close); node 2 did not, yet. Whichever
        // end gave up, both end with the same fresh channel.
        for leader_gives_up in [true, false] {
            let (mut a, mut b) = (node(1, 1, 11), node(2, 1, 22));
            connect(&mut a, &mut b);
            a.spread.place(&call);
            b.spread.place(&call);
            settle(&mut a, &mut b);
            disconnect(&mut a, &mut b);
            let later = Instant::now() + GONE + Duration::from_secs(1);
            let quitter = if leader_gives_up { &mut a } else { &mut b };
            quitter.hub.forget_gone_peers(later);
            settle(&mut a, &mut b);
            assert_eq!(a.links.len() + b.links.len(), 1, "one end closed its link");
            connect(&mut a, &mut b);
            assert_matched(&a, &b, 1);
        }
        // Node 2 restarts (a new incarnation, nothing open): node 1 closes the old link and
        // opens a new one with the new process.
        let (mut a, mut b) = (node(1, 1, 11), node(2, 1, 22));
        connect(&mut a, &mut b);
        a.spread.place(&call);
        b.spread.place(&call);
        settle(&mut a, &mut b);
        let before = a.links.clone();
        disconnect(&mut a, &mut b);
        let mut b = node(2, 1, 23);
        b.spread.place(&call);
        connect(&mut a, &mut b);
        assert_matched(&a, &b, 1);
        assert_ne!(a.links, before);
    }
}
