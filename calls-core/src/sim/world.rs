//! [`SimWorld`]: one [`Router`], any number of [`SimPeer`]s, a [`SimNet`] between them and
//! in-memory signaling, all driven by one virtual clock.
//!
//! The loop always advances to the earliest thing that is due — a datagram arriving, a signaling
//! message arriving, the router's timeout, a peer's timeout or media frame — and after **every**
//! input to the router or a peer drains its outputs completely (router `Transmit` → network,
//! `Signal` → the peer's signaling queue; peer datagrams → network, peer messages → the router's
//! signaling input). Peers are visited in session order and randomness comes from the seed, so a
//! run is reproducible.
//!
//! ICE-TCP: the first time a peer transmits with `Protocol::Tcp` to the router's passive TCP
//! candidate, the world opens a connection (`Router::tcp_accepted` with a fresh [`ConnId`]) and
//! from then on carries the peer's frames on it, split at seeded-random points, into
//! `Router::handle_tcp_data`; router transmits with `Proto::Tcp` go back the same way to the
//! peer (see [`super::tcp`]). An error from `handle_tcp_data` is recorded
//! ([`SimWorld::tcp_errors`]) and closes the connection; frames the peer sends afterwards are
//! dropped. [`SimWorld::leave`] calls `Router::tcp_closed` after `Router::leave`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::error::RouterError;
use crate::ids::{CallId, SessionId, UserId};
use crate::metrics::MetricsSnapshot;
use crate::record::{FileSummary, RecordOutput, RecordedFile, RecordingOptions};
use crate::relay::LinkId;
use crate::router::{Datagram, Event, Output, Router};
use crate::signal::ServerMessage;
use crate::tcp::{ConnId, TcpError};
use crate::{Config, Proto};

use super::net::{Impairment, SimNet};
use super::peer::{PeerOptions, PeerSignal, PeerTransmit, SimPeer};
use super::tcp::{self, SimTcpConn, TcpStats};

/// Port every simulated peer sends from.
const PEER_PORT: u16 = 5000;
/// Steps at one instant after which the loop is considered stuck (a component that keeps
/// asking to be woken "now").
const MAX_STEPS_PER_INSTANT: u32 = 1_000_000;
/// Minimum advance when a component asks for a timeout that is not in the future.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);
/// Default upper bound of one simulated TCP read/write chunk.
const TCP_MAX_CHUNK: usize = 4096;

/// One file a recording produced, as the world collected it from the router's outputs.
#[derive(Debug, Clone)]
pub struct SimRecordedFile {
    /// The call recorded.
    pub call: CallId,
    /// The file as announced.
    pub file: RecordedFile,
    /// Every `Data` output for it, appended.
    pub bytes: Vec<u8>,
    /// Its summary, once finished.
    pub summary: Option<FileSummary>,
}

/// A signaling message on its way.
#[derive(Debug)]
enum SignalInFlight {
    ToRouter(SessionId, PeerSignal),
    ToPeer(SessionId, ServerMessage),
}

/// Datagrams recorded for tests: those a peer sent (replay tests) or those the router sent
/// to one address (what went on the wire, before the network's loss).
#[derive(Debug, Default)]
struct Capture {
    from: Option<SocketAddr>,
    to: Option<SocketAddr>,
    max: usize,
    datagrams: Vec<Vec<u8>>,
}

impl Capture {
    fn record(&mut self, source: SocketAddr, destination: SocketAddr, contents: &[u8]) {
        let wanted = match (self.from, self.to) {
            (None, None) => false,
            (from, to) => from.is_none_or(|f| f == source) && to.is_none_or(|t| t == destination),
        };
        if wanted && self.datagrams.len() < self.max {
            self.datagrams.push(contents.to_vec());
        }
    }
}

/// The simulated world. See the [module docs](self).
///
/// ```
/// # use std::time::{Duration, Instant};
/// # use calls_core::TrackSource;
/// # use calls_core::sim::{PeerOptions, SimWorld};
/// # fn example(start: Instant) {
/// let mut world = SimWorld::new(1, start);
/// let alice = world.add_peer("standup", "alice", PeerOptions::audio_only());
/// let bob = world.add_peer("standup", "bob", PeerOptions::audio_only());
/// world.run_for(Duration::from_secs(2));
/// let heard = world.peer(bob).received_from(alice, TrackSource::Microphone);
/// assert!(heard.is_some_and(|t| t.packets > 0));
/// # }
/// ```
#[derive(Debug)]
pub struct SimWorld {
    start: Instant,
    now: Instant,
    seed: u64,
    router: Router,
    router_addrs: Vec<SocketAddr>,
    router_tcp_addrs: Vec<SocketAddr>,
    router_timeout: Option<Instant>,
    peers: BTreeMap<SessionId, SimPeer>,
    peer_addrs: BTreeMap<SocketAddr, SessionId>,
    net: SimNet,
    signaling_delay: Duration,
    signals: BTreeMap<(Instant, u64), SignalInFlight>,
    signal_order: u64,
    /// Router offers to lose per session (see `lose_offers_to`).
    lost_offers: BTreeMap<SessionId, u32>,
    next_session: u64,
    next_host: u32,
    ipv6: bool,
    events: Vec<Event>,
    signal_errors: Vec<(SessionId, RouterError)>,
    router_sent_to: BTreeMap<SocketAddr, u64>,
    undeliverable: u64,
    signals_to_absent: u64,
    capture: Capture,
    /// `Some(lag)`: datagrams for the router go to it in batches (see
    /// [`SimWorld::batch_router_input`]).
    router_batch: Option<Duration>,
    steps: u64,
    tcp_conns: BTreeMap<ConnId, SimTcpConn>,
    tcp_routes: BTreeMap<(SocketAddr, SocketAddr), ConnId>,
    next_conn: u64,
    tcp_max_chunk: usize,
    tcp_accept_local: Option<SocketAddr>,
    tcp_errors: Vec<(ConnId, TcpError)>,
    tcp_stats: TcpStats,
    router_tcp_sent_to: BTreeMap<SocketAddr, u64>,
    recorded: Vec<SimRecordedFile>,
    record_log: Vec<RecordOutput>,
    /// Relay frames the router emitted, not yet taken (see [`SimWorld::take_relay_out`]).
    relay_out: Vec<(LinkId, bytes::Bytes)>,
}

impl SimWorld {
    /// A world with a default-configured router (UDP host candidate 127.0.0.1:8443), a perfect
    /// network and instant signaling. `start` is the virtual epoch (take `Instant::now()` once in
    /// the test).
    pub fn new(seed: u64, start: Instant) -> Self {
        Self::with_config(seed, start, Config::default())
    }

    /// A world whose router runs with `config`. Peers get IPv6 addresses when the router's
    /// bind address is IPv6.
    pub fn with_config(seed: u64, start: Instant, config: Config) -> Self {
        let router_addrs = config.udp_candidates();
        let router_tcp_addrs = if config.enable_tcp {
            config.tcp_candidates()
        } else {
            Vec::new()
        };
        let ipv6 = config.bind_address.is_ipv6();
        let router = match Router::new(config, start) {
            Ok(r) => r,
            Err(e) => panic!("sim router config refused: {e}"),
        };
        let mut world = SimWorld {
            start,
            now: start,
            seed,
            router,
            router_addrs,
            router_tcp_addrs,
            router_timeout: None,
            peers: BTreeMap::new(),
            peer_addrs: BTreeMap::new(),
            net: SimNet::new(seed, start),
            signaling_delay: Duration::ZERO,
            signals: BTreeMap::new(),
            signal_order: 0,
            lost_offers: BTreeMap::new(),
            next_session: 1,
            next_host: 0,
            ipv6,
            events: Vec::new(),
            signal_errors: Vec::new(),
            router_sent_to: BTreeMap::new(),
            undeliverable: 0,
            signals_to_absent: 0,
            capture: Capture::default(),
            router_batch: None,
            steps: 0,
            tcp_conns: BTreeMap::new(),
            tcp_routes: BTreeMap::new(),
            next_conn: 1,
            tcp_max_chunk: TCP_MAX_CHUNK,
            tcp_accept_local: None,
            tcp_errors: Vec::new(),
            tcp_stats: TcpStats::default(),
            router_tcp_sent_to: BTreeMap::new(),
            recorded: Vec::new(),
            record_log: Vec::new(),
            relay_out: Vec::new(),
        };
        world.drain_router();
        world
    }

    /// The virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The router, to call commands directly. Outputs are drained on the next `run_*` call;
    /// prefer the world's wrappers ([`SimWorld::leave`], [`SimWorld::set_muted`], …).
    pub fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    /// The router's metrics now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.router.metrics()
    }

    /// The addresses the router receives on (its UDP host candidates).
    pub fn router_addrs(&self) -> &[SocketAddr] {
        &self.router_addrs
    }

    /// The first router address.
    pub fn router_addr(&self) -> SocketAddr {
        self.router_addrs[0]
    }

    /// The router's passive ICE-TCP candidates (empty with `enable_tcp = false`).
    pub fn router_tcp_addrs(&self) -> &[SocketAddr] {
        &self.router_tcp_addrs
    }

    /// The network.
    pub fn net(&self) -> &SimNet {
        &self.net
    }

    /// The network, to set impairments.
    pub fn net_mut(&mut self) -> &mut SimNet {
        &mut self.net
    }

    /// Sets the impairment of every link without a more specific rule.
    pub fn set_impairment(&mut self, impairment: Impairment) {
        self.net.set_default(impairment);
    }

    /// Sets the impairment of both directions between a peer and the router.
    pub fn set_peer_impairment(&mut self, session: SessionId, up: Impairment, down: Impairment) {
        let addr = self.peer(session).addr();
        self.net.set_uplink(addr, up);
        self.net.set_downlink(addr, down);
    }

    /// One-way delay of every signaling message (default zero: delivered on the next step).
    pub fn set_signaling_delay(&mut self, delay: Duration) {
        self.signaling_delay = delay;
    }

    /// Adds a participant: `Router::join`, then the peer sends its offer. Panics if the router
    /// refuses the join (use [`SimWorld::try_add_peer`] to test refusals).
    pub fn add_peer(
        &mut self,
        call: impl Into<CallId>,
        user: impl Into<UserId>,
        options: PeerOptions,
    ) -> SessionId {
        let session = SessionId(self.next_session);
        match self.try_add_peer(call.into(), session, user.into(), options) {
            Ok(s) => s,
            Err(e) => panic!("router refused join of {session}: {e}"),
        }
    }

    /// Adds a participant with a chosen session id; returns the router's refusal as is.
    pub fn try_add_peer(
        &mut self,
        call: CallId,
        session: SessionId,
        user: UserId,
        options: PeerOptions,
    ) -> Result<SessionId, RouterError> {
        self.flush_all_peers();
        self.router
            .join(call, session, user.clone(), options.grants, self.now)?;
        self.drain_router();
        self.next_session = self.next_session.max(session.0 + 1);
        let addr = options.addr.unwrap_or_else(|| self.next_peer_addr());
        let seed = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(session.0);
        let mut options = options;
        options.clock_origin.get_or_insert(self.start);
        let mut peer = SimPeer::new(session, user, addr, &options, seed, self.now);
        peer.start(self.now);
        self.peer_addrs.insert(addr, session);
        self.peers.insert(session, peer);
        self.flush_peer(session);
        Ok(session)
    }

    /// The participant leaves: `Router::leave`, then `Router::tcp_closed` for its open ICE-TCP
    /// connection if it has one, and the peer is removed from the world (packets still in
    /// flight to it are discarded). Returns the router's answer and the peer.
    pub fn leave(&mut self, session: SessionId) -> (Result<(), RouterError>, Option<SimPeer>) {
        self.flush_all_peers();
        let result = self.router.leave(session, self.now);
        self.drain_router();
        self.close_tcp_of(session);
        let peer = self.peers.remove(&session);
        if let Some(p) = &peer {
            self.peer_addrs.remove(&p.addr());
        }
        (result, peer)
    }

    /// The peer goes silent without leaving (a closed laptop lid): its `Rtc` stops and it stays
    /// in the world, so the router must notice by itself.
    pub fn silence_peer(&mut self, session: SessionId) {
        if let Some(p) = self.peers.get_mut(&session) {
            p.close();
        }
    }

    /// Mutes or unmutes a peer's microphone through its signaling channel.
    pub fn set_muted(&mut self, session: SessionId, muted: bool) {
        self.peer_mut(session).set_muted(muted);
        self.flush_peer(session);
    }

    /// A peer. Panics if there is none with this id.
    pub fn peer(&self, session: SessionId) -> &SimPeer {
        match self.peers.get(&session) {
            Some(p) => p,
            None => panic!("no sim peer {session}"),
        }
    }

    /// A peer, to act on it (mute, re-offer, send raw signaling). What it queues is sent on the
    /// next `run_*` call.
    pub fn peer_mut(&mut self, session: SessionId) -> &mut SimPeer {
        match self.peers.get_mut(&session) {
            Some(p) => p,
            None => panic!("no sim peer {session}"),
        }
    }

    /// Every peer, in session order.
    pub fn peers(&self) -> impl Iterator<Item = &SimPeer> {
        self.peers.values()
    }

    /// Session ids of every peer, in order.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.peers.keys().copied().collect()
    }

    /// Events the router emitted so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Errors the router returned for signaling the world delivered, with the session.
    pub fn signal_errors(&self) -> &[(SessionId, RouterError)] {
        &self.signal_errors
    }

    /// Datagrams the router asked to send to `addr`.
    pub fn router_transmits_to(&self, addr: SocketAddr) -> u64 {
        self.router_sent_to.get(&addr).copied().unwrap_or(0)
    }

    /// Datagrams the router asked to send, by destination.
    pub fn router_transmits(&self) -> &BTreeMap<SocketAddr, u64> {
        &self.router_sent_to
    }

    /// Router transmits with `Proto::Tcp` to `addr` (a subset of
    /// [`SimWorld::router_transmits_to`]).
    pub fn router_tcp_transmits_to(&self, addr: SocketAddr) -> u64 {
        self.router_tcp_sent_to.get(&addr).copied().unwrap_or(0)
    }

    /// Datagrams that arrived at an address nobody owns (a removed peer, a spoofed source).
    pub fn undeliverable(&self) -> u64 {
        self.undeliverable
    }

    /// The ICE-TCP connection the world opened for `session` (open or closed), if any; the
    /// latest one if there were several.
    pub fn tcp_conn_of(&self, session: SessionId) -> Option<ConnId> {
        self.tcp_conns
            .iter()
            .rev()
            .find(|(_, c)| c.session == session)
            .map(|(id, _)| *id)
    }

    /// Whether the world still has `conn` open.
    pub fn tcp_is_open(&self, conn: ConnId) -> bool {
        self.tcp_conns.get(&conn).is_some_and(|c| c.open)
    }

    /// Errors the router returned for TCP connections (each one closed the connection).
    pub fn tcp_errors(&self) -> &[(ConnId, TcpError)] {
        &self.tcp_errors
    }

    /// What the simulated TCP connections carried and how they were split.
    pub fn tcp_stats(&self) -> TcpStats {
        let mut stats = self.tcp_stats;
        for c in self.tcp_conns.values() {
            stats.up.add(&c.up.stats);
            stats.down.add(&c.down.stats);
        }
        stats
    }

    /// Sets the largest chunk a simulated TCP read hands over (default 4096 bytes; a quarter
    /// of all chunks are 1–3 bytes whatever this is).
    pub fn set_tcp_max_chunk(&mut self, max: usize) {
        self.tcp_max_chunk = max.max(1);
    }

    /// The local address passed to `Router::tcp_accepted` for connections opened from now on,
    /// as `accept()` would report it behind port forwarding or 1:1 NAT; `None` (the default)
    /// passes the candidate address the peer dialled.
    pub fn set_tcp_accept_local(&mut self, local: Option<SocketAddr>) {
        self.tcp_accept_local = local;
    }

    /// Hands raw bytes to the router on a TCP connection now, bypassing the framing and the
    /// clock (for malformed-stream tests); they follow whatever the connection delivered so far,
    /// possibly in the middle of a frame. An error is recorded and closes the connection like
    /// one on the normal path. Returns the router's answer.
    pub fn inject_tcp_data(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), TcpError> {
        let result = self.router.handle_tcp_data(conn, bytes, self.now);
        self.drain_router();
        if let Err(e) = &result {
            self.on_tcp_error(conn, e.clone());
        }
        result
    }

    /// Server messages addressed to sessions that have no peer (any more).
    pub fn signals_to_absent_peers(&self) -> u64 {
        self.signals_to_absent
    }

    /// Loop iterations so far (a cost measure).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Loses the next `count` router offers to `session` on the signaling channel (a client
    /// that missed them: a dropped WebSocket, a buggy page).
    pub fn lose_offers_to(&mut self, session: SessionId, count: u32) {
        self.lost_offers.insert(session, count);
    }

    fn take_offer_drop(&mut self, session: SessionId) -> bool {
        match self.lost_offers.get_mut(&session) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Server messages for `session` still on their way (with a signaling delay).
    pub fn signals_in_flight_to(&self, session: SessionId) -> impl Iterator<Item = &ServerMessage> {
        self.signals.values().filter_map(move |s| match s {
            SignalInFlight::ToPeer(to, msg) if *to == session => Some(msg),
            _ => None,
        })
    }

    /// Starts recording up to `max` datagrams that `from` sends (for replay tests).
    pub fn capture_from(&mut self, from: SocketAddr, max: usize) {
        self.capture = Capture {
            from: Some(from),
            to: None,
            max,
            datagrams: Vec::new(),
        };
    }

    /// Hands the router its datagrams as the reference server's worker does: everything due
    /// at one instant in one [`Router::handle_datagrams`] call, stamped `lag` before now (when
    /// they were received: they waited in the worker's queue, behind timers it ran at now).
    /// `None` (the default): one `handle_datagram` per datagram, at now.
    pub fn batch_router_input(&mut self, lag: Option<Duration>) {
        self.router_batch = lag;
    }

    /// Starts recording up to `max` datagrams that the router sends to `to` (UDP), as they
    /// leave it: before the network's loss or delay.
    pub fn capture_to(&mut self, to: SocketAddr, max: usize) {
        self.capture = Capture {
            from: None,
            to: Some(to),
            max,
            datagrams: Vec::new(),
        };
    }

    /// The datagrams recorded since [`SimWorld::capture_from`] or [`SimWorld::capture_to`].
    pub fn captured(&self) -> &[Vec<u8>] {
        &self.capture.datagrams
    }

    /// Hands a datagram from an arbitrary `source` straight to the router (first router
    /// address), now, bypassing the network; drains the router.
    pub fn inject_datagram(&mut self, source: SocketAddr, contents: &[u8]) {
        let destination = self.router_addr();
        self.inject_datagram_to(source, destination, contents);
    }

    /// Like [`SimWorld::inject_datagram`] with a chosen local destination address.
    pub fn inject_datagram_to(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) {
        self.router.handle_datagram(
            Datagram {
                proto: Proto::Udp,
                source,
                destination,
                contents,
            },
            self.now,
        );
        self.drain_router();
    }

    /// Delivers a typed message to the router now (bypassing the signaling queue) and returns
    /// the router's answer.
    pub fn signal_now(
        &mut self,
        session: SessionId,
        msg: crate::signal::ClientMessage,
    ) -> Result<(), RouterError> {
        let result = self.router.handle_signal(session, msg, self.now);
        self.drain_router();
        result
    }

    /// [`Router::set_bandwidth_cap`] now, and delivers what the router does about it.
    pub fn set_bandwidth_cap(
        &mut self,
        session: SessionId,
        bps: Option<u64>,
    ) -> Result<(), RouterError> {
        let result = self.router.set_bandwidth_cap(session, bps, self.now);
        self.drain_router();
        result
    }

    /// Delivers raw JSON to the router now and returns the router's answer.
    pub fn signal_json_now(&mut self, session: SessionId, text: &str) -> Result<(), RouterError> {
        let result = self.router.handle_signal_json(session, text, self.now);
        self.drain_router();
        result
    }

    /// Session ids of peers added from now on start at `next` (two worlds relayed to each
    /// other need distinct ids, as the routers of one call do).
    pub fn set_next_session(&mut self, next: u64) {
        self.next_session = next;
    }

    /// Opens a relay link on the router (`Router::relay_open`) and drains it.
    pub fn relay_open(&mut self, call: impl Into<CallId>, link: LinkId) -> Result<(), RouterError> {
        self.flush_all_peers();
        let result = self.router.relay_open(call.into(), link, self.now);
        self.drain_router();
        result
    }

    /// Closes a relay link on the router (`Router::relay_close`) and drains it.
    pub fn relay_close(&mut self, link: LinkId) -> Result<(), RouterError> {
        self.flush_all_peers();
        let result = self.router.relay_close(link, self.now);
        self.drain_router();
        result
    }

    /// Hands a relay frame to the router now (`Router::handle_relay`) and drains it.
    pub fn handle_relay(&mut self, link: LinkId, bytes: &[u8]) {
        self.router.handle_relay(link, bytes, self.now);
        self.drain_router();
    }

    /// The relay frames the router emitted since the last call, in order.
    pub fn take_relay_out(&mut self) -> Vec<(LinkId, bytes::Bytes)> {
        std::mem::take(&mut self.relay_out)
    }

    /// When the next thing is due in this world (`None`: nothing scheduled).
    pub fn next_due(&self) -> Option<Instant> {
        self.next_event_time()
    }

    /// Runs everything due up to and including `at` (a no-op for a time already passed).
    pub fn run_until_instant(&mut self, at: Instant) {
        self.run_until_time(at.max(self.now), |_| false);
    }

    /// Runs the world for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let limit = self.now + duration;
        self.run_until_time(limit, |_| false);
    }

    /// Runs until `cond` holds (checked before every step) or `max` of virtual time passed.
    /// Returns whether `cond` held.
    pub fn run_until(&mut self, mut cond: impl FnMut(&SimWorld) -> bool, max: Duration) -> bool {
        let limit = self.now + max;
        self.run_until_time(limit, &mut cond)
    }

    fn run_until_time(&mut self, limit: Instant, mut cond: impl FnMut(&SimWorld) -> bool) -> bool {
        self.flush_all_peers();
        let mut steps_here = 0u32;
        loop {
            if cond(self) {
                return true;
            }
            let next = match self.next_event_time() {
                Some(t) if t <= limit => t,
                _ => {
                    self.now = self.now.max(limit);
                    return cond(self);
                }
            };
            if next > self.now {
                self.now = next;
                steps_here = 0;
            }
            steps_here += 1;
            assert!(
                steps_here < MAX_STEPS_PER_INSTANT,
                "sim loop stuck at {:?}: router timeout {:?}, next delivery {:?}",
                self.elapsed(),
                self.router_timeout
                    .map(|t| t.saturating_duration_since(self.start)),
                self.net
                    .next_delivery_time()
                    .map(|t| t.saturating_duration_since(self.start)),
            );
            self.step();
        }
    }

    fn next_event_time(&self) -> Option<Instant> {
        let candidates = [
            self.router_timeout,
            self.net.next_delivery_time(),
            self.tcp_conns.values().filter_map(|c| c.next_time()).min(),
            self.signals.keys().next().map(|(t, _)| *t),
            self.peers.values().filter_map(|p| p.poll_timeout()).min(),
        ];
        candidates.into_iter().flatten().min()
    }

    /// Processes everything due at `self.now`: signaling, datagrams, TCP bytes (per connection
    /// in id order, upstream then downstream), signaling sent meanwhile, the router's timer,
    /// then each peer's timer, in that order.
    fn step(&mut self) {
        self.steps += 1;
        let now = self.now;
        // Signaling due now goes first: the router's outputs leave in order, and a slot
        // mapping sent before a packet must not be overtaken by it on a zero-delay network.
        self.deliver_due_signals(now);
        if let Some(lag) = self.router_batch {
            let mut batch = Vec::new();
            while let Some(d) = self.net.pop_due(now) {
                if self.router_addrs.contains(&d.to) {
                    batch.push(d);
                } else {
                    self.deliver_datagram(d.from, d.to, &d.contents);
                }
            }
            if !batch.is_empty() {
                let received = now.checked_sub(lag).unwrap_or(now).max(self.start);
                self.router.handle_datagrams(
                    batch.iter().map(|d| Datagram {
                        proto: Proto::Udp,
                        source: d.from,
                        destination: d.to,
                        contents: &d.contents,
                    }),
                    received,
                );
                self.drain_router();
            }
            self.deliver_due_signals(now);
        }
        // What the batch's answers made due at this instant (a zero-delay network) goes one
        // datagram at a time, also in batch mode.
        while let Some(d) = self.net.pop_due(now) {
            self.deliver_datagram(d.from, d.to, &d.contents);
            self.deliver_due_signals(now);
        }
        let due: Vec<ConnId> = self
            .tcp_conns
            .iter()
            .filter(|(_, c)| c.next_time().is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for conn in due {
            self.deliver_tcp_up(conn);
            self.deliver_tcp_down(conn);
        }
        self.deliver_due_signals(now);
        if self.router_timeout.is_some_and(|t| t <= now) {
            self.router.handle_timeout(now);
            self.drain_router();
            if self.router_timeout.is_some_and(|t| t <= now) {
                self.router_timeout = Some(now + TIMER_RESOLUTION);
            }
        }
        let due: Vec<SessionId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.poll_timeout().is_some_and(|t| t <= now))
            .map(|(s, _)| *s)
            .collect();
        for session in due {
            if let Some(peer) = self.peers.get_mut(&session) {
                peer.handle_timeout(now);
            }
            self.flush_peer(session);
        }
    }

    fn deliver_due_signals(&mut self, now: Instant) {
        while let Some(entry) = self.signals.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let signal = entry.remove();
            self.deliver_signal(signal);
        }
    }

    fn deliver_datagram(&mut self, from: SocketAddr, to: SocketAddr, contents: &[u8]) {
        if self.router_addrs.contains(&to) {
            self.router.handle_datagram(
                Datagram {
                    proto: Proto::Udp,
                    source: from,
                    destination: to,
                    contents,
                },
                self.now,
            );
            self.drain_router();
        } else if let Some(&session) = self.peer_addrs.get(&to) {
            if let Some(peer) = self.peers.get_mut(&session) {
                peer.handle_datagram(from, contents, self.now);
            }
            self.flush_peer(session);
        } else {
            self.undeliverable += 1;
        }
    }

    fn deliver_signal(&mut self, signal: SignalInFlight) {
        match signal {
            SignalInFlight::ToRouter(session, signal) => {
                let result = match signal {
                    PeerSignal::Message(msg) => self.router.handle_signal(session, msg, self.now),
                    PeerSignal::Json(text) => {
                        self.router.handle_signal_json(session, &text, self.now)
                    }
                };
                if let Err(e) = result {
                    self.signal_errors.push((session, e));
                }
                self.drain_router();
            }
            SignalInFlight::ToPeer(session, msg)
                if matches!(msg, ServerMessage::Offer { .. }) && self.take_offer_drop(session) => {}
            SignalInFlight::ToPeer(session, msg) => match self.peers.get_mut(&session) {
                Some(peer) => {
                    peer.handle_signal(msg, self.now);
                    self.flush_peer(session);
                }
                None => self.signals_to_absent += 1,
            },
        }
    }

    fn queue_signal(&mut self, signal: SignalInFlight) {
        self.signal_order += 1;
        self.signals
            .insert((self.now + self.signaling_delay, self.signal_order), signal);
    }

    /// Drains the router until it asks for a timeout (after every router input).
    fn drain_router(&mut self) {
        loop {
            match self.router.poll_output() {
                Output::Transmit(t) => {
                    *self.router_sent_to.entry(t.destination).or_insert(0) += 1;
                    match t.proto {
                        Proto::Udp => {
                            self.capture.record(t.source, t.destination, &t.contents);
                            self.net.send(t.source, t.destination, t.contents, self.now);
                        }
                        Proto::Tcp => {
                            *self.router_tcp_sent_to.entry(t.destination).or_insert(0) += 1;
                            self.send_tcp_down(t.conn, t.destination, t.contents);
                        }
                    }
                }
                Output::Signal(session, msg) => {
                    self.queue_signal(SignalInFlight::ToPeer(session, msg));
                }
                Output::Event(event) => {
                    tracing::debug!(?event, "router event");
                    self.events.push(event);
                }
                Output::Record(out) => self.collect_recording(out),
                Output::Relay { link, bytes } => self.relay_out.push((link, bytes)),
                Output::Timeout(at) => {
                    self.router_timeout = Some(at);
                    break;
                }
            }
        }
    }

    /// Files are assembled from `Data`; everything else goes to the log.
    fn collect_recording(&mut self, out: RecordOutput) {
        match out {
            RecordOutput::FileStarted { call, file } => {
                self.recorded.push(SimRecordedFile {
                    call: call.clone(),
                    file: file.clone(),
                    bytes: Vec::new(),
                    summary: None,
                });
                self.record_log
                    .push(RecordOutput::FileStarted { call, file });
            }
            RecordOutput::Data { call, file, bytes } => {
                match self
                    .recorded
                    .iter_mut()
                    .rev()
                    .find(|f| f.call == call && f.file.id == file)
                {
                    Some(f) => f.bytes.extend_from_slice(&bytes),
                    None => panic!("recording data for {file:?} before its FileStarted"),
                }
            }
            RecordOutput::FileFinished { call, summary } => {
                if let Some(f) = self
                    .recorded
                    .iter_mut()
                    .rev()
                    .find(|f| f.call == call && f.file.id == summary.id)
                {
                    f.summary = Some(summary.clone());
                }
                self.record_log
                    .push(RecordOutput::FileFinished { call, summary });
            }
            other => self.record_log.push(other),
        }
    }

    /// Starts recording `call` (`Router::start_recording`) and drains the router.
    pub fn start_recording(
        &mut self,
        call: impl Into<CallId>,
        options: RecordingOptions,
    ) -> Result<(), RouterError> {
        self.flush_all_peers();
        let result = self.router.start_recording(&call.into(), options, self.now);
        self.drain_router();
        result
    }

    /// Stops recording `call` (`Router::stop_recording`) and drains the router.
    pub fn stop_recording(&mut self, call: impl Into<CallId>) -> Result<(), RouterError> {
        self.flush_all_peers();
        let result = self.router.stop_recording(&call.into(), self.now);
        self.drain_router();
        result
    }

    /// Every file recordings produced so far, in the order they started.
    pub fn recorded_files(&self) -> &[SimRecordedFile] {
        &self.recorded
    }

    /// Recording outputs other than `Data`, in order.
    pub fn record_log(&self) -> &[RecordOutput] {
        &self.record_log
    }

    /// Moves a peer's queued datagrams onto the network and its messages into signaling.
    fn flush_peer(&mut self, session: SessionId) {
        let Some(peer) = self.peers.get_mut(&session) else {
            return;
        };
        let transmits = peer.take_transmits();
        let signals = peer.take_signals();
        for t in transmits {
            self.capture.record(t.source, t.destination, &t.contents);
            match t.proto {
                Proto::Udp => self.net.send(t.source, t.destination, t.contents, self.now),
                Proto::Tcp => self.send_tcp_up(session, t),
            }
        }
        for s in signals {
            self.queue_signal(SignalInFlight::ToRouter(session, s));
        }
    }

    /// A peer's TCP frame: opens the connection on first use, then queues the framed bytes.
    fn send_tcp_up(&mut self, session: SessionId, t: PeerTransmit) {
        let route = (t.source, t.destination);
        let conn = match self.tcp_routes.get(&route) {
            Some(&conn) => conn,
            None => {
                if !self.router_tcp_addrs.contains(&t.destination) {
                    self.undeliverable += 1;
                    return;
                }
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let local = self.tcp_accept_local.unwrap_or(t.destination);
                let accepted = self.router.tcp_accepted(conn, t.source, local);
                self.drain_router();
                if let Err(e) = accepted {
                    self.tcp_errors.push((conn, e));
                    return;
                }
                self.tcp_stats.opened += 1;
                let c = SimTcpConn::new(conn, session, t.source, t.destination, self.seed);
                self.tcp_conns.insert(conn, c);
                self.tcp_routes.insert(route, conn);
                conn
            }
        };
        let delay = self.tcp_delay(t.source, t.destination);
        let Some(c) = self.tcp_conns.get_mut(&conn).filter(|c| c.open) else {
            self.tcp_stats.dropped_on_closed += 1;
            return;
        };
        let jitter = delay.1.mul_f64(c.rng.f64());
        c.up.send(tcp::frame(&t.contents), 1, self.now, delay.0 + jitter);
    }

    /// A router TCP transmit (already framed): queues it on its connection.
    fn send_tcp_down(&mut self, conn: Option<ConnId>, destination: SocketAddr, bytes: Vec<u8>) {
        let Some(c) = conn
            .and_then(|id| self.tcp_conns.get(&id))
            .filter(|c| c.open)
        else {
            self.tcp_stats.unroutable += 1;
            return;
        };
        if c.peer != destination {
            self.tcp_stats.misaddressed += 1;
        }
        let delay = self.tcp_delay(c.router, c.peer);
        let Some(c) = conn.and_then(|id| self.tcp_conns.get_mut(&id)) else {
            return;
        };
        let jitter = delay.1.mul_f64(c.rng.f64());
        let frames = count_frames(&bytes);
        c.down.send(bytes, frames, self.now, delay.0 + jitter);
    }

    /// Delay and jitter of a TCP direction: the network's impairment for that link (loss,
    /// reordering and bandwidth caps do not apply to the simulated TCP).
    fn tcp_delay(&self, from: SocketAddr, to: SocketAddr) -> (Duration, Duration) {
        let imp = self.net.impairment(from, to);
        (imp.delay, imp.jitter)
    }

    /// Hands everything due upstream to the router in random chunks.
    fn deliver_tcp_up(&mut self, conn: ConnId) {
        let now = self.now;
        let max_chunk = self.tcp_max_chunk;
        let Some(c) = self.tcp_conns.get_mut(&conn).filter(|c| c.open) else {
            return;
        };
        let Some(bytes) = c.up.take_due(now, &mut c.rng) else {
            return;
        };
        let lengths = tcp::chunk_lengths(&mut c.rng, bytes.len(), max_chunk);
        let mut at = 0;
        for n in lengths {
            let chunk = &bytes[at..at + n];
            at += n;
            if let Some(c) = self.tcp_conns.get_mut(&conn) {
                c.up.observe(chunk);
            }
            let result = self.router.handle_tcp_data(conn, chunk, now);
            self.drain_router();
            if let Err(e) = result {
                self.on_tcp_error(conn, e);
                return;
            }
        }
    }

    /// Hands everything due downstream to the peer: random chunks through the peer-side
    /// de-framer, each completed frame as a TCP receive.
    fn deliver_tcp_down(&mut self, conn: ConnId) {
        let now = self.now;
        let max_chunk = self.tcp_max_chunk;
        let Some(c) = self.tcp_conns.get_mut(&conn).filter(|c| c.open) else {
            return;
        };
        let Some(bytes) = c.down.take_due(now, &mut c.rng) else {
            return;
        };
        let (session, from) = (c.session, c.router);
        let lengths = tcp::chunk_lengths(&mut c.rng, bytes.len(), max_chunk);
        let mut at = 0;
        for n in lengths {
            let chunk = &bytes[at..at + n];
            at += n;
            let Some(c) = self.tcp_conns.get_mut(&conn).filter(|c| c.open) else {
                return;
            };
            c.down.observe(chunk);
            let frames = c.peer_deframer.push(chunk);
            for frame in frames {
                if let Some(peer) = self.peers.get_mut(&session) {
                    peer.handle_receive(Proto::Tcp, from, &frame, now);
                }
                self.flush_peer(session);
            }
        }
    }

    /// The router forgot `conn` after an error: record it and close the connection.
    fn on_tcp_error(&mut self, conn: ConnId, error: TcpError) {
        self.tcp_errors.push((conn, error));
        if let Some(c) = self.tcp_conns.get_mut(&conn) {
            if c.open {
                c.close();
                self.tcp_stats.reset += 1;
            }
        }
    }

    /// Closes the open TCP connections of a leaving session: `Router::tcp_closed`, in id order.
    fn close_tcp_of(&mut self, session: SessionId) {
        let conns: Vec<ConnId> = self
            .tcp_conns
            .iter()
            .filter(|(_, c)| c.session == session && c.open)
            .map(|(id, _)| *id)
            .collect();
        for conn in conns {
            if let Some(c) = self.tcp_conns.get_mut(&conn) {
                c.close();
                let route = (c.peer, c.router);
                if self.tcp_routes.get(&route) == Some(&conn) {
                    self.tcp_routes.remove(&route);
                }
            }
            self.tcp_stats.closed += 1;
            if let Err(e) = self.router.tcp_closed(conn) {
                self.tcp_errors.push((conn, e));
            }
            self.drain_router();
        }
    }

    fn flush_all_peers(&mut self) {
        for session in self.sessions() {
            self.flush_peer(session);
        }
    }

    fn next_peer_addr(&mut self) -> SocketAddr {
        self.next_host += 1;
        let n = self.next_host;
        let ip = if self.ipv6 {
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0,
                0,
                0,
                0,
                0,
                (n >> 16) as u16,
                n as u16,
            ))
        } else {
            // 10.0.0.1, 10.0.0.2, … skipping .0 and .255 host parts.
            let host = 0x0a00_0000 + (n / 254) * 256 + (n % 254) + 1;
            IpAddr::V4(Ipv4Addr::from(host))
        };
        SocketAddr::new(ip, PEER_PORT)
    }
}

/// Frames in a buffer of whole RFC 4571 frames.
fn count_frames(bytes: &[u8]) -> u64 {
    let mut n = 0;
    let mut at = 0;
    while bytes.len() >= at + 2 {
        at += 2 + u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
        n += 1;
    }
    n
}
