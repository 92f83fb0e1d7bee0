//! The sans-IO router: many calls, one port, one `Router` per worker.
//!
//! This file owns the router's state, its commands (`join`, `leave`, `set_muted`, …), its
//! outputs (`Output`, `Event`, `Transmit`) and the drive loop (`handle_timeout`, `poll_output`,
//! draining sessions). The rest is split by responsibility; a datagram's path reads in file
//! order:
//! - `router/ingress.rs`: datagrams and ICE-TCP frames → demux → STUN admission → session;
//! - `router/forwarding.rs`: a publisher's RTP packet → each subscriber's slot (rewrite, write);
//! - `router/slots.rs`: which source each subscriber's receive slots carry (the mapping);
//! - `router/negotiation.rs`: signaling, SDP offers and answers, publishing and unpublishing;
//! - `router/allocation.rs`: bandwidth shared among a subscriber's video slots, dynacast, the
//!   periodic tick;
//! - `router/relay.rs`: relay links: a call's tracks exported to and imported from other
//!   routers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::BweKind;
use str0m::config::DtlsCert;
use str0m::crypto::Sha1HmacProvider;
use str0m::{Event as RtcEvent, Input, Output as RtcOutput, Reason};

use crate::call::{Call, PublishedTrack, TrackKey};
use crate::config::Config;
use crate::consent::ConsentChecks;
use crate::demux::{self, FlowTable, Proto};
use crate::error::{ConfigError, RouterError};
use crate::ids::{CallId, Grants, SessionId, TrackSource, UserId};
use crate::load::{Governor, Load, LoadLevel};
use crate::metrics::{MetricsSnapshot, SessionStats};
use crate::session::Session;
use crate::signal::{RosterEntry, ServerMessage};
use crate::tcp::{ConnId, TcpConn};

mod allocation;
mod forwarding;
mod ingress;
mod listener_loss;
mod negotiation;
mod recording;
mod relay;
mod slots;

/// An unanswered router offer is sent again after this long …
const OFFER_RESEND_AFTER: Duration = Duration::from_secs(4);
/// … at most this many times.
const MAX_OFFER_RESENDS: u8 = 3;

/// Router-level deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    /// The session must be connected by now.
    Connect,
    /// The session's router offer should have been answered by now.
    OfferResend,
}

/// Shortest wait the router asks for (see `drain`).
const MIN_WAKE: Duration = Duration::from_millis(1);
/// The timeout reported when nothing is scheduled.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Period of the router's tick: layer allocation (upgrades after their hold time, stalled
/// layers), dynacast pauses, active speaker. Also the timer granularity of quiet sessions (see
/// `is_quiet`): str0m's timers of a muted listener fire at most this often (instead of every
/// 40 ms for the pacer), on the tick's grid, so one wake-up serves them all.
const TICK: Duration = Duration::from_millis(250);

/// An incoming datagram (or, for ICE-TCP, one de-framed RFC 4571 frame).
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// UDP or TCP.
    pub proto: Proto,
    /// The remote address it came from.
    pub source: SocketAddr,
    /// The local address it arrived on.
    pub destination: SocketAddr,
    /// Its bytes.
    pub contents: &'a [u8],
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// UDP or TCP.
    pub proto: Proto,
    /// For TCP: the connection to write to (`contents` already carries the RFC 4571 prefix).
    pub conn: Option<ConnId>,
    /// The local address to send from (one of the advertised candidates).
    pub source: SocketAddr,
    /// Where to send.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: Vec<u8>,
}

/// Why a session left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveReason {
    /// The embedder called [`Router::leave`].
    Left,
    /// ICE or DTLS failed or timed out.
    Disconnected,
}

/// Something the embedder may want to know (log, audit, UI); the router has already acted on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A session joined a call.
    Joined {
        /// The session.
        session: SessionId,
        /// Its call.
        call: CallId,
        /// Its user.
        user: UserId,
    },
    /// ICE and DTLS are up: media can flow.
    Connected {
        /// The session.
        session: SessionId,
    },
    /// A session is gone and everything it held is freed.
    Left {
        /// The session.
        session: SessionId,
        /// Its call.
        call: CallId,
        /// Why.
        reason: LeaveReason,
    },
    /// A session publishes a new track.
    TrackPublished {
        /// The publisher.
        session: SessionId,
        /// Its m-line.
        mid: String,
        /// Microphone, camera or screen.
        source: TrackSource,
    },
    /// A session stopped publishing a track.
    TrackUnpublished {
        /// The publisher.
        session: SessionId,
        /// Its m-line.
        mid: String,
    },
    /// A new remote address authenticated for a session (first contact, NAT rebinding, a TCP
    /// connection). A dispatcher in front of several routers uses it to route that 5-tuple.
    FlowAdmitted {
        /// The session.
        session: SessionId,
        /// UDP or TCP.
        proto: Proto,
        /// The client's address.
        remote: SocketAddr,
        /// The local address it reached.
        local: SocketAddr,
    },
    /// A remote address no longer reaches a session: the session left, its TCP connection
    /// closed, or it was the oldest of more than `max_flows_per_session` (a client rotating
    /// source ports). A dispatcher forgets that 5-tuple; for TCP, the embedder closes the
    /// connection (a session that left keeps none open).
    FlowRemoved {
        /// The session it belonged to.
        session: SessionId,
        /// UDP or TCP.
        proto: Proto,
        /// The client's address.
        remote: SocketAddr,
        /// The local address it reached.
        local: SocketAddr,
    },
    /// A remote address authenticated for another session of this router (a NAT reused the
    /// port): its datagrams now go to `to`. Followed by [`Event::FlowAdmitted`] for `to`.
    FlowMoved {
        /// The session it belonged to.
        from: SessionId,
        /// The session it belongs to now.
        to: SessionId,
        /// UDP or TCP.
        proto: Proto,
        /// The client's address.
        remote: SocketAddr,
        /// The local address it reached.
        local: SocketAddr,
    },
    /// A session's microphone was muted or unmuted.
    MuteChanged {
        /// The session.
        session: SessionId,
        /// Now muted.
        muted: bool,
    },
    /// A call's active speaker changed (also sent to its members as
    /// [`ServerMessage::Speaker`]).
    SpeakerChanged {
        /// The call.
        call: CallId,
        /// The new active speaker; `None` when nobody speaks.
        session: Option<SessionId>,
    },
    /// The router's load level changed (see [`Router::set_load`]): it now sheds (or stops
    /// shedding) video and refuses (or accepts) joins.
    LoadLevelChanged {
        /// The level before.
        from: LoadLevel,
        /// The level now.
        to: LoadLevel,
    },
}

/// What [`Router::poll_output`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Output {
    /// Send these bytes.
    Transmit(Transmit),
    /// Deliver this message on the session's signaling channel.
    Signal(SessionId, ServerMessage),
    /// Something happened.
    Event(Event),
    /// Recording output: a file to create, bytes to append to it, a file or recording
    /// finished (see [`Router::start_recording`]).
    Record(crate::record::RecordOutput),
    /// A frame for relay link `link` (see [`crate::relay`]): hand it to the router at the
    /// other end with [`Router::handle_relay`]. Frames of one link go in order; losing some
    /// is survived (NACKed, or concealed with a keyframe).
    Relay {
        /// The link.
        link: crate::relay::LinkId,
        /// One frame.
        bytes: bytes::Bytes,
    },
    /// Nothing more to do: call [`Router::handle_timeout`] at this time (or on the next input).
    Timeout(Instant),
}

/// Counters kept while running (gauges are computed in [`Router::metrics`]).
#[derive(Debug, Default)]
struct Counters {
    snapshot: MetricsSnapshot,
}

/// The sans-IO media router. See the [crate docs](crate) for the drive loop.
pub struct Router {
    config: Config,
    hmac: &'static dyn Sha1HmacProvider,
    /// The DTLS certificate every session of this router presents.
    dtls_cert: DtlsCert,
    /// The advertised candidate addresses, computed once (consulted for every datagram).
    udp_candidates: Vec<SocketAddr>,
    tcp_candidates: Vec<SocketAddr>,
    /// Boxed: a `Session` is ~11 KB inline (str0m's `Rtc`), and a map of them would keep up
    /// to twice that per session in empty buckets.
    sessions: HashMap<SessionId, Box<Session>>,
    calls: HashMap<CallId, Call>,
    tracks: HashMap<TrackKey, PublishedTrack>,
    ufrags: HashMap<String, SessionId>,
    flows: FlowTable,
    /// Checks sent to new addresses before they get media (issue 16, finding 3).
    consent: ConsentChecks,
    tcp_conns: HashMap<ConnId, TcpConn>,
    tcp_by_addr: HashMap<(SocketAddr, SocketAddr), ConnId>,
    outputs: VecDeque<Output>,
    /// What recordings produced, handed out after `outputs`.
    record_out: VecDeque<crate::record::RecordOutput>,
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Sessions that must be connected by a deadline (join + `connect_timeout_ms`).
    /// Router-level deadlines (connect timeouts, unanswered offers), checked lazily.
    deadlines: BinaryHeap<Reverse<(Instant, SessionId, Deadline)>>,
    touched: Vec<SessionId>,
    /// Datagrams made at once while forwarding one packet (`forwarding::Written::Now`); kept
    /// for its capacity.
    sent_now: Vec<str0m::net::Transmit>,
    /// Audio to subscribers that do not measure it goes out at once (default); off, it is
    /// queued in str0m like everything else ([`Router::set_direct_audio`]).
    direct_audio: bool,
    /// Sessions whose slots may need a router offer (first offer, `slots` request, glare).
    renegotiate: Vec<SessionId>,
    /// Subscribers whose video slot mapping must be recomputed after the current input
    /// (cameras published or stopped, speaker changed, pins changed).
    remap: Vec<SessionId>,
    /// Sessions to remove once the current input is done (str0m gave up on them).
    dead: Vec<SessionId>,
    counters: Counters,
    /// Probe-answer token bucket: (tokens, last refill).
    probe_bucket: (f64, Instant),
    draining: bool,
    /// The load level from the embedder's reports (overload: shed video, refuse joins).
    load: Governor,
    /// The latest time any input brought (it never goes back: a batch of datagrams carries
    /// when they were received, which can be before a timeout already handled).
    last_now: Instant,
    /// When the router was created: the origin of the quiet grid.
    started: Instant,
    /// Next periodic tick (layer allocation, dynacast, active speaker).
    next_tick: Instant,
    /// Scratch list of sessions whose timeout is due (kept to avoid an allocation per call).
    due: Vec<SessionId>,
    /// Subscribers whose layer allocation must be recomputed after the current input.
    reallocate: Vec<SessionId>,
    /// Video tracks whose dynacast state must be recomputed after the current input.
    dynacast: Vec<TrackKey>,
    /// Relay links to other routers and what they carry.
    relay: relay::RelayState,
    /// Participants of this router's calls on the other ends of relay links.
    remote_members: HashMap<SessionId, relay::RemoteMember>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("sessions", &self.sessions.len())
            .field("calls", &self.calls.len())
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Creates a router. `now` is the embedder's monotonic clock at creation.
    pub fn new(config: Config, now: Instant) -> Result<Router, ConfigError> {
        config.validate()?;
        let probe_burst = config.probe_replies_per_second;
        let provider = str0m::crypto::from_feature_flags();
        // The same provider str0m uses for its own STUN checks.
        let hmac = provider.sha1_hmac_provider;
        // One DTLS certificate per router, shared by its sessions (as mediasoup does per
        // worker): generating one per join costs ~1 ms of ECDSA key generation.
        let dtls_cert = provider
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| ConfigError {
                problems: vec!["the crypto provider cannot generate a DTLS certificate".to_owned()],
            })?;
        let (udp_candidates, tcp_candidates) = (config.udp_candidates(), config.tcp_candidates());
        let load = Governor::new(&config);
        Ok(Router {
            config,
            hmac,
            dtls_cert,
            udp_candidates,
            tcp_candidates,
            sessions: HashMap::new(),
            calls: HashMap::new(),
            tracks: HashMap::new(),
            ufrags: HashMap::new(),
            flows: FlowTable::default(),
            consent: ConsentChecks::default(),
            tcp_conns: HashMap::new(),
            tcp_by_addr: HashMap::new(),
            outputs: VecDeque::new(),
            record_out: VecDeque::new(),
            timers: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            touched: Vec::new(),
            sent_now: Vec::new(),
            direct_audio: true,
            renegotiate: Vec::new(),
            remap: Vec::new(),
            dead: Vec::new(),
            counters: Counters::default(),
            probe_bucket: (f64::from(probe_burst), now),
            draining: false,
            load,
            last_now: now,
            started: now,
            next_tick: later(now, TICK),
            due: Vec::new(),
            reallocate: Vec::new(),
            dynacast: Vec::new(),
            relay: relay::RelayState::default(),
            remote_members: HashMap::new(),
        })
    }

    /// The configuration this router runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Which worker a datagram belongs to, from the ufrag of a STUN binding request (stateless).
    ///
    /// A dispatcher that runs one router per core calls this for datagrams from unknown
    /// 5-tuples, forwards them to that worker, and remembers the 5-tuple → worker mapping.
    /// The answer to one of the router's consent checks (a binding success response from an
    /// address no flow has yet) goes to the worker whose index its transaction id starts with.
    pub fn worker_of_datagram(datagram: &[u8]) -> Option<u8> {
        demux::stun_local_ufrag(datagram)
            .and_then(demux::ufrag::worker)
            .or_else(|| demux::consent_answer_worker(datagram))
    }

    /// Re-sends what a session's signaling channel may have lost (after the embedder's
    /// signaling connection dropped and came back): the whole slot mapping and any
    /// outstanding router offer, unchanged.
    pub fn resend_signaling(&mut self, session: SessionId) -> Result<(), RouterError> {
        let state = self
            .sessions
            .get(&session)
            .ok_or(RouterError::UnknownSession(session))?;
        let offer = state.pending_offer.as_ref().map(|p| p.sdp.clone());
        let slots = self.slot_list(session);
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Slots { slots }));
        if let Some(sdp) = offer {
            self.outputs
                .push_back(Output::Signal(session, ServerMessage::Offer { sdp }));
        }
        Ok(())
    }

    /// Stops accepting joins; sessions already in calls go on.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// Reports how loaded the router's thread is (the embedder measures it; the core has no
    /// clock of its own). Call it periodically, e.g. every 500 ms, with the window's figures:
    ///
    /// ```no_run
    /// # use std::time::{Duration, Instant};
    /// # use calls_core::{Config, Load, Router};
    /// # let mut router = Router::new(Config::default(), Instant::now()).unwrap();
    /// // The loop handled a due timer 80 ms late and was busy 95 % of the last 500 ms.
    /// router.set_load(Load::new(Duration::from_millis(80), 0.95), Instant::now());
    /// // ... then drain poll_output as after every input.
    /// ```
    ///
    /// The router derives its [`LoadLevel`] with hysteresis (see [`crate::load`]): from
    /// `Degraded` it refuses joins with [`RouterError::Overloaded`] and caps video at the
    /// lowest simulcast layer, at `Overloaded` it stops forwarding cameras; audio, signaling,
    /// ICE, DTLS and RTCP go on. A change is reported as [`Event::LoadLevelChanged`] and the
    /// subscribers' layers are re-allocated at once. Returns the level now.
    pub fn set_load(&mut self, load: Load, now: Instant) -> LoadLevel {
        self.last_now = self.last_now.max(now);
        let from = self.load.level();
        if let Some(to) = self.load.report(load, now) {
            self.counters.snapshot.load_level_changes += 1;
            tracing::info!(
                ?from,
                ?to,
                lag_ms = load.lag.as_millis() as u64,
                busy = load.busy,
                "load level changed"
            );
            self.outputs
                .push_back(Output::Event(Event::LoadLevelChanged { from, to }));
            for (id, state) in &self.sessions {
                if state.video_feeds() > 0 && !self.reallocate.contains(id) {
                    self.reallocate.push(*id);
                }
            }
            self.finish(now);
        }
        self.load.level()
    }

    /// The load level the router acts on now (see [`Router::set_load`]).
    pub fn load_level(&self) -> LoadLevel {
        self.load.level()
    }

    /// Adds a participant to a call. The client then sends its offer through
    /// [`handle_signal`](Self::handle_signal).
    pub fn join(
        &mut self,
        call: CallId,
        session: SessionId,
        user: UserId,
        grants: Grants,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let refused = if self.draining {
            Some(RouterError::Draining)
        } else if !self.load.level().accepts_joins() {
            self.counters.snapshot.joins_refused_overloaded += 1;
            Some(RouterError::Overloaded {
                retry_after_s: self.load.retry_after().as_secs().max(1),
            })
        } else if self.sessions.contains_key(&session) || self.remote_members.contains_key(&session)
        {
            // A remote member (relay link) holds the id too: ids are unique across a call's
            // routers.
            Some(RouterError::SessionExists(session))
        } else if self.sessions.len() >= self.config.max_sessions {
            Some(RouterError::RouterFull {
                max: self.config.max_sessions,
            })
        } else if self
            .calls
            .get(&call)
            .is_some_and(|c| c.members.len() >= self.config.max_participants_per_call)
        {
            Some(RouterError::CallFull {
                call: call.clone(),
                max: self.config.max_participants_per_call,
            })
        } else {
            None
        };
        if let Some(err) = refused {
            self.counters.snapshot.joins_refused += 1;
            return Err(err);
        }
        let state = Session::new(
            session,
            call.clone(),
            user.clone(),
            grants,
            &self.config,
            &self.dtls_cert,
            now,
        );
        self.ufrags.insert(state.local_creds.ufrag.clone(), session);
        self.sessions.insert(session, Box::new(state));
        self.deadlines.push(Reverse((
            later(now, self.config.connect_timeout()),
            session,
            Deadline::Connect,
        )));
        let top_n = self.config.top_n_audio;
        let members = &mut self
            .calls
            .entry(call.clone())
            .or_insert_with(|| Call::new(top_n))
            .members;
        for other in members.iter() {
            self.outputs.push_back(Output::Signal(
                *other,
                ServerMessage::ParticipantJoined {
                    session,
                    user: user.clone(),
                },
            ));
        }
        let participants: Vec<RosterEntry> = members
            .iter()
            .filter_map(|m| {
                let s = self.sessions.get(m)?;
                Some(RosterEntry {
                    session: *m,
                    user: s.user.clone(),
                    muted: s.muted,
                    publishing: s
                        .published
                        .iter()
                        .filter_map(|mid| {
                            let key = TrackKey {
                                publisher: *m,
                                mid: *mid,
                            };
                            self.tracks.get(&key).map(|t| t.source)
                        })
                        .collect(),
                })
            })
            .collect();
        members.push(session);
        let mut participants = participants;
        participants.extend(self.remote_roster(&call));
        self.outputs.push_back(Output::Signal(
            session,
            ServerMessage::Roster { participants },
        ));
        self.export_member(session, None, now);
        if let Some(recorder) = self.calls.get(&call).and_then(|c| c.recorder.as_deref()) {
            let msg = self.recording_message(Some(recorder), session, true);
            self.outputs.push_back(Output::Signal(session, msg));
        }
        self.counters.snapshot.joins += 1;
        self.outputs.push_back(Output::Event(Event::Joined {
            session,
            call,
            user,
        }));
        self.drain(session, now);
        self.finish(now);
        tracing::debug!(%session, "joined");
        Ok(())
    }

    /// Removes a participant: frees its session, flows and tracks, and tells the others.
    pub fn leave(&mut self, session: SessionId, now: Instant) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        self.remove_session(session, LeaveReason::Left, now);
        self.finish(now);
        Ok(())
    }

    /// Mutes or unmutes a participant's microphone (the embedder's command; clients can also
    /// send [`ClientMessage::Mute`](crate::ClientMessage::Mute)). Muted audio is not forwarded.
    pub fn set_muted(
        &mut self,
        session: SessionId,
        muted: bool,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let state = self
            .sessions
            .get_mut(&session)
            .ok_or(RouterError::UnknownSession(session))?;
        if state.muted == muted {
            return Ok(());
        }
        state.muted = muted;
        let user = state.user.clone();
        let call = state.call.clone();
        if let Some(c) = self.calls.get_mut(&call) {
            c.speakers.set_muted(session, muted, now);
        }
        let published = state.published.clone();
        if !muted {
            // Subscribers resync their audio rewriters: the stream continues without a gap.
            for mid in published {
                if let Some(track) = self.tracks.get_mut(&TrackKey {
                    publisher: session,
                    mid,
                }) {
                    if track.is_audio() {
                        track.epoch = track.epoch.wrapping_add(1);
                    }
                }
            }
        }
        self.broadcast(
            &call,
            None,
            ServerMessage::Muted {
                session,
                user,
                muted,
            },
        );
        self.outputs
            .push_back(Output::Event(Event::MuteChanged { session, muted }));
        self.export_member(session, None, now);
        Ok(())
    }

    /// Caps the bandwidth the router assumes towards `session` (bits per second), below its
    /// congestion-controller estimate: for tests, and for an admin limiting one participant.
    /// `None` removes the cap. Layer choice follows at once.
    pub fn set_bandwidth_cap(
        &mut self,
        session: SessionId,
        bps: Option<u64>,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let state = self
            .sessions
            .get_mut(&session)
            .ok_or(RouterError::UnknownSession(session))?;
        state.bandwidth_cap = bps;
        self.allocate(session, now);
        self.finish(now);
        Ok(())
    }

    /// Advances time: runs every session whose timer is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        while let Some(Reverse((at, session, kind))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if !self.deadline_live(session, kind) {
                continue;
            }
            match kind {
                Deadline::Connect => {
                    tracing::info!(%session, "never connected; removing");
                    self.dead.push(session);
                }
                Deadline::OfferResend => self.resend_offer(session, now),
            }
        }
        // Each due session is woken once per call: one that asks again for a time not after
        // `now` (str0m's pacer does) is woken on the next call, not in a loop here.
        let mut due = std::mem::take(&mut self.due);
        while let Some(Reverse((at, session))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            // The heap can hold the same (at, session) twice (a timeout moved away and back):
            // taking `next_timeout` here makes the second entry stale, so a session is woken
            // once per due time, not once per entry.
            if let Some(state) = self.sessions.get_mut(&session) {
                if state.next_timeout == Some(at) {
                    state.next_timeout = None;
                    due.push(session);
                }
            }
        }
        for session in due.drain(..) {
            let Some(state) = self.sessions.get_mut(&session) else {
                continue;
            };
            state.next_timeout = None;
            self.counters.snapshot.timer_wakeups += 1;
            if let Err(e) = state.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(%session, "timeout failed: {e}");
            }
            self.drain(session, now);
        }
        self.due = due;
        if now >= self.next_tick {
            self.next_tick = on_tick_grid(self.started, later(now, MIN_WAKE));
            self.tick(now);
        }
        self.finish(now);
    }

    /// The next output. Drain until [`Output::Timeout`] after **every** input.
    pub fn poll_output(&mut self) -> Output {
        if let Some(event) = self.flows.pop_event() {
            return Output::Event(event); // flow changes first, in order (demux::FlowTable)
        }
        if let Some(check) = self.consent.pop_transmit() {
            return Output::Transmit(check); // consent checks to new addresses (consent.rs)
        }
        if let Some(out) = self.outputs.pop_front() {
            return out;
        }
        if let Some(out) = self.record_out.pop_front() {
            use crate::record::RecordOutput;
            match &out {
                RecordOutput::FileStarted { .. } => self.counters.snapshot.recording_files += 1,
                RecordOutput::Data { bytes, .. } => {
                    self.counters.snapshot.recording_bytes += bytes.len() as u64;
                }
                _ => {}
            }
            return Output::Record(out);
        }
        let mut next = None;
        while let Some(Reverse((at, session))) = self.timers.peek().copied() {
            let live = self
                .sessions
                .get(&session)
                .is_some_and(|s| s.next_timeout == Some(at));
            if live {
                next = Some(at);
                break;
            }
            self.timers.pop();
        }
        while let Some(Reverse((at, session, kind))) = self.deadlines.peek().copied() {
            if self.deadline_live(session, kind) {
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
                break;
            }
            self.deadlines.pop();
        }
        if !self.sessions.is_empty() || !self.relay.is_empty() {
            next = Some(next.map_or(self.next_tick, |n: Instant| n.min(self.next_tick)));
        }
        // Nothing scheduled: come back in a while (or on the next input).
        Output::Timeout(next.unwrap_or_else(|| later(self.last_now, IDLE_TIMEOUT)))
    }

    /// Whether a router-level deadline still means something.
    fn deadline_live(&self, session: SessionId, kind: Deadline) -> bool {
        let Some(state) = self.sessions.get(&session) else {
            return false;
        };
        match kind {
            Deadline::Connect => !state.connected,
            Deadline::OfferResend => state.pending_offer.is_some(),
        }
    }

    /// Whether audio to a subscriber that does not measure it (no video reaches it) is sent
    /// at once, without str0m's send queue, pacer and a poll per packet (default on; the
    /// vendored str0m patch 0009, `calls_direct_sends_total`). Off, every packet is queued
    /// and flushed after the input, as before: for A/B measurements (`idle-listeners` bench)
    /// and for tests of the queued path.
    pub fn set_direct_audio(&mut self, on: bool) {
        self.direct_audio = on;
    }

    /// A snapshot of every counter and gauge.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.counters.snapshot.clone();
        m.sessions = self.sessions.len() as u64;
        m.calls = self.calls.len() as u64;
        m.flows = self.flows.len() as u64;
        m.tcp_connections = self.tcp_conns.len() as u64;
        m.connected_sessions = self.sessions.values().filter(|s| s.connected).count() as u64;
        m.red_streams = self.tracks.values().filter(|t| t.red).count() as u64;
        m.recorders = self.calls.values().filter(|c| c.recorder.is_some()).count() as u64;
        let listener_losses = self.listener_losses();
        m.load_level = u64::from(self.load.level().as_u8());
        m.relay.links = self.relay.link_count() as u64;
        m.relay.imported_tracks = self.relay.imported_count() as u64;
        m.relay.exported_tracks = self.relay.exported_count() as u64;
        let mut stats: Vec<SessionStats> = self
            .sessions
            .iter()
            .map(|(id, s)| SessionStats {
                session: *id,
                call: s.call.clone(),
                rtt_ms: s.rtt_ms,
                egress_loss: s.egress_loss,
                ingress_loss: s.ingress_loss,
                bandwidth_bps: match (s.bwe_estimate, s.bandwidth_cap) {
                    (Some(e), Some(c)) => Some(e.min(c)),
                    (e, c) => e.or(c),
                },
                red_stripped: s.red_stripped,
                listener_loss: listener_losses.get(id).copied(),
            })
            .collect();
        stats.sort_by_key(|s| s.session);
        m.session_stats = stats;
        m
    }

    /// Sessions now on this router.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Internal table sizes, for leak checks: (sessions, calls, tracks, ufrags, flows, timers).
    #[doc(hidden)]
    pub fn table_sizes(&self) -> [usize; 6] {
        [
            self.sessions.len(),
            self.calls.len(),
            self.tracks.len(),
            self.ufrags.len(),
            self.flows.len(),
            self.timers.len(),
        ]
    }

    /// Drains one session's str0m outputs completely (the str0m rule: drain after every input).
    /// Whether it sent anything.
    pub(super) fn drain(&mut self, session: SessionId, now: Instant) -> bool {
        let mut sent = false;
        loop {
            let Some(state) = self.sessions.get_mut(&session) else {
                return sent;
            };
            let out = match state.rtc.poll_output() {
                Ok(out) => out,
                Err(e) => {
                    tracing::warn!(%session, "session failed: {e}");
                    self.dead.push(session);
                    return sent;
                }
            };
            match out {
                RtcOutput::Timeout(at) => {
                    if !state.rtc.is_alive() {
                        self.dead.push(session);
                        return sent;
                    }
                    // "Again at once" becomes a millisecond later: the embedder's loop must
                    // not spin (str0m's pacer can ask for `now` again).
                    // A session that wants to run again at once has output queued (str0m's
                    // pacer sends one packet per wake-up): that never waits for the grid.
                    //
                    // A quiet session's timers run on the tick grid, also those already due
                    // (a write lets its packets out without running them, see `finish`),
                    // but not a pacer with packets to send.
                    state.str0m_due = Some(at);
                    state.quiet = is_quiet(state, session, &self.tracks);
                    let immediate = at <= now;
                    let sending = matches!(
                        state.rtc.last_timeout_reason(),
                        Reason::Pacer(_) | Reason::SendStream
                    );
                    let at = if immediate && (sending || !state.quiet) {
                        later(now, MIN_WAKE)
                    } else if state.quiet {
                        on_tick_grid(self.started, at.max(later(now, MIN_WAKE)))
                    } else {
                        at
                    };
                    if state.next_timeout != Some(at) {
                        state.next_timeout = Some(at);
                        self.timers.push(Reverse((at, session)));
                    }
                    return sent;
                }
                RtcOutput::Transmit(t) => {
                    sent = true;
                    self.transmit(t);
                }
                RtcOutput::Event(event) => self.on_rtc_event(session, event, now),
            }
        }
    }

    /// After each input: give touched sessions their timeout (so queued writes go out), run
    /// pending renegotiations, remove dead sessions, and keep the timer heap compact.
    pub(super) fn finish(&mut self, now: Instant) {
        // str0m ignores a timeout (and `handle_written`) older than its last input, and the
        // packets just written would wait for its next timer: flush at the newest time seen.
        let now = now.max(self.last_now);
        loop {
            if let Some(session) = self.touched.pop() {
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.touched = false;
                    let written = std::mem::take(&mut state.unflushed);
                    // What was written goes out. A session whose timers are due runs them too,
                    // unless it is quiet: its timers wait for the tick grid (see `drain`).
                    let due = state.str0m_due.is_none_or(|t| t <= now);
                    self.counters.snapshot.write_flushes += 1;
                    if due && !state.quiet {
                        self.counters.snapshot.write_timeouts += 1;
                        if let Err(e) = state.rtc.handle_input(Input::Timeout(now)) {
                            tracing::debug!(%session, "timeout failed: {e}");
                        }
                    } else {
                        state.rtc.handle_written(now);
                    }
                    let mut sent = self.drain(session, now);
                    // str0m's pacer lets one packet out per run and asks to run again at once.
                    // A quiet session is not run again at once (its timers wait for the tick
                    // grid, and one of them is usually due), so every other packet written
                    // since its last run gets a run of its own here; otherwise they queued
                    // up, and in a 1000-participant call listeners heard the speakers 2 s late.
                    for _ in 1..written {
                        if !sent {
                            break; // nothing went out: the queue is empty
                        }
                        let Some(state) = self.sessions.get_mut(&session) else {
                            break;
                        };
                        state.rtc.handle_written(now);
                        sent = self.drain(session, now);
                    }
                }
                continue;
            }
            if let Some(session) = self.dead.pop() {
                if self.sessions.contains_key(&session) {
                    self.remove_session(session, LeaveReason::Disconnected, now);
                }
                continue;
            }
            if let Some(session) = self.renegotiate.pop() {
                self.offer_if_needed(session, now);
                continue;
            }
            if let Some(session) = self.remap.pop() {
                self.map_video(session, now);
                continue;
            }
            if let Some(session) = self.reallocate.pop() {
                self.allocate(session, now);
                continue;
            }
            if let Some(key) = self.dynacast.pop() {
                self.update_dynacast(key, now);
                continue;
            }
            break;
        }
        if self.timers.len() > 4 * self.sessions.len() + 1024 {
            self.timers = self
                .sessions
                .iter()
                .filter_map(|(id, s)| s.next_timeout.map(|t| Reverse((t, *id))))
                .collect();
        }
    }

    pub(super) fn touch(&mut self, session: SessionId) {
        if let Some(state) = self.sessions.get_mut(&session) {
            if !state.touched {
                state.touched = true;
                self.touched.push(session);
            }
        }
    }

    fn on_rtc_event(&mut self, session: SessionId, event: RtcEvent, now: Instant) {
        match event {
            RtcEvent::RtpPacket(packet) => self.forward(session, packet, now),
            RtcEvent::KeyframeRequest(req) => {
                self.counters.snapshot.keyframe_requests_in += 1;
                let wanted = self.sessions.get(&session).and_then(|s| {
                    let slot = &s.slots[s.slot_by_mid(req.mid)?];
                    // The source and layer this subscriber decodes (or is about to).
                    let feed = slot.current.as_ref().or(slot.next.as_ref())?;
                    let rid = feed.sel.current.or(feed.sel.target.and_then(|t| t.0));
                    Some((feed.key, rid))
                });
                if let Some((key, rid)) = wanted {
                    self.request_keyframe(key, rid, now, false);
                }
            }
            RtcEvent::EgressBitrateEstimate(estimate) => {
                let bps = match estimate {
                    BweKind::Twcc { estimate, .. } => estimate.as_u64(),
                    BweKind::Remb { estimate, .. } => estimate.as_u64(),
                    _ => return,
                };
                if let Some(state) = self.sessions.get_mut(&session) {
                    let before = state.bwe_estimate.replace(bps);
                    // Re-share at once when the estimate falls (or first arrives); rises are
                    // picked up by the tick, after the upgrade hold.
                    if before.is_none_or(|b| bps < b) && !self.reallocate.contains(&session) {
                        self.reallocate.push(session);
                    }
                }
            }
            RtcEvent::Connected => {
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.connected = true;
                    // Video slots whose source started before we could send wait for a
                    // keyframe of it.
                    let wanted: Vec<(TrackKey, Option<str0m::media::Rid>)> = state
                        .slots
                        .iter()
                        .filter_map(|s| s.target())
                        .filter_map(|f| Some((f.key, f.sel.target?.0)))
                        .collect();
                    for (key, rid) in wanted {
                        self.request_keyframe(key, rid, now, true);
                    }
                }
                self.outputs
                    .push_back(Output::Event(Event::Connected { session }));
            }
            RtcEvent::IceConnectionStateChange(str0m::IceConnectionState::Disconnected) => {
                tracing::info!(%session, "ICE disconnected");
                self.dead.push(session);
            }
            RtcEvent::MediaAdded(added) => {
                self.on_media(session, added.mid, added.kind, added.direction, now);
            }
            RtcEvent::MediaChanged(changed) => {
                let kind = self
                    .sessions
                    .get(&session)
                    .and_then(|s| s.rtc.media(changed.mid).map(|m| m.kind()));
                if let Some(kind) = kind {
                    self.on_media(session, changed.mid, kind, changed.direction, now);
                }
            }
            RtcEvent::MediaEgressStats(stats) => {
                if let Some(state) = self.sessions.get_mut(&session) {
                    if let Some(rtt) = stats.rtt {
                        state.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                    }
                    if let Some(loss) = stats.loss {
                        state.egress_loss = Some(loss as f64);
                        if let Some(slot) = state.slots.iter_mut().find(|s| s.mid == stats.mid) {
                            slot.egress_loss = Some(loss as f64);
                        }
                    }
                }
            }
            RtcEvent::MediaIngressStats(stats) => {
                if let Some(state) = self.sessions.get_mut(&session) {
                    if let Some(loss) = stats.loss {
                        state.ingress_loss = Some(loss as f64);
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn broadcast(
        &mut self,
        call: &CallId,
        except: Option<SessionId>,
        msg: ServerMessage,
    ) {
        if let Some(c) = self.calls.get(call) {
            for member in &c.members {
                if Some(*member) != except {
                    self.outputs.push_back(Output::Signal(*member, msg.clone()));
                }
            }
        }
    }

    fn remove_session(&mut self, session: SessionId, reason: LeaveReason, now: Instant) {
        let Some(state) = self.sessions.get(&session) else {
            return;
        };
        let published = state.published.clone();
        let subscribed: Vec<TrackKey> = state
            .slots
            .iter()
            .flat_map(|s| s.current.iter().chain(s.next.iter()).map(|f| f.key))
            .collect();
        let call = state.call.clone();
        let user = state.user.clone();
        for mid in published {
            self.unpublish(
                TrackKey {
                    publisher: session,
                    mid,
                },
                now,
            );
        }
        for key in subscribed {
            if let Some(track) = self.tracks.get_mut(&key) {
                track.subscribers.retain(|s| *s != session);
            }
        }
        let Some(mut state) = self.sessions.remove(&session) else {
            return;
        };
        // Tell the client's stack we are gone (RTCP BYE, DTLS close_notify) if it still listens.
        if state.connected && state.rtc.close().is_ok() {
            while let Ok(out) = state.rtc.poll_output() {
                match out {
                    RtcOutput::Transmit(t) => self.transmit(t),
                    RtcOutput::Timeout(_) => break,
                    RtcOutput::Event(_) => {}
                }
            }
        }
        self.ufrags.remove(&state.local_creds.ufrag);
        self.flows.remove_session(session);
        self.touched.retain(|s| *s != session);
        self.renegotiate.retain(|s| *s != session);
        self.remap.retain(|s| *s != session);
        // The last one out ends the call's recording (its own tracks' files are finished).
        let last = self
            .calls
            .get(&call)
            .is_some_and(|c| c.members.iter().all(|m| *m == session));
        if let Some(recorder) = self
            .calls
            .get_mut(&call)
            .filter(|_| last)
            .and_then(|c| c.recorder.take())
        {
            self.end_recording(&call, recorder, now);
        }
        self.export_member_left(&call, session, now);
        if let Some(c) = self.calls.get_mut(&call) {
            c.members.retain(|m| *m != session);
            c.speakers.remove(session);
            c.recent_speakers.retain(|s| *s != session);
            // A call spanning routers lives here while its links do (remote members, their
            // tracks).
            if c.members.is_empty() && c.relay_links.is_empty() {
                self.calls.remove(&call);
            }
        }
        self.broadcast(
            &call,
            None,
            ServerMessage::ParticipantLeft { session, user },
        );
        self.counters.snapshot.leaves += 1;
        self.outputs.push_back(Output::Event(Event::Left {
            session,
            call,
            reason,
        }));
        tracing::debug!(%session, ?reason, "left");
    }
}

/// Whether a session has nothing that needs str0m's timers on time: connected, no video to
/// send (its camera and screen slots carry nothing) and nothing to receive but a muted
/// microphone. A muted listener in a big call. Its pacer (40 ms ticks with congestion control)
/// and RTCP run on the quiet grid instead; a packet written to it still goes out at once (the
/// touched sessions get their timeout after each input).
fn is_quiet(
    state: &Session,
    session: SessionId,
    tracks: &HashMap<TrackKey, PublishedTrack>,
) -> bool {
    // Deactivated slots are emptied, so "no video slot in use" is "no video feeds".
    state.connected
        && state.video_feeds() == 0
        && state.published.iter().all(|&mid| {
            tracks
                .get(&TrackKey {
                    publisher: session,
                    mid,
                })
                .is_none_or(|t| t.is_audio() && state.muted)
        })
}

/// The first point of the tick grid (multiples of [`TICK`] from `started`, the router's start)
/// at or after `at`: quiet sessions' timers are rounded up to it, so they are woken together
/// with the tick (four times a second) instead of one by one.
fn on_tick_grid(started: Instant, at: Instant) -> Instant {
    let since = at.saturating_duration_since(started);
    let grid = TICK.as_nanos();
    let ticks = since.as_nanos().div_ceil(grid);
    let offset = Duration::from_nanos(u64::try_from(ticks * grid).unwrap_or(u64::MAX));
    started.checked_add(offset).unwrap_or(at).max(at)
}

/// `at + by`, saturating at `at` where `Instant` cannot go further (an embedder's clock near
/// the end of its range must not panic the router).
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or(at)
}
