//! The sans-IO router: many calls, one port, one `Router` per worker.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::BweKind;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::DtlsCert;
use str0m::crypto::Sha1HmacProvider;
use str0m::ice::{StunMessage, StunMessageBuilder};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::Receive;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Vp8Descriptor};
use str0m::{Candidate, Event as RtcEvent, Input, Output as RtcOutput};

use crate::call::{Call, PublishedTrack, TrackKey};

mod simulcast;
use crate::config::Config;
use crate::consent::ConsentChecks;
use crate::demux::{self, Class, DropReason, FlowKey, FlowTable, Proto, MAX_DATAGRAM_BYTES};
use crate::error::{ConfigError, RouterError, SignalError};
use crate::forward::{Rewriter, Verdict, VideoCodec};
use crate::ids::{CallId, Grants, SessionId, TrackSource, UserId};
use crate::layers;
use crate::metrics::{MetricsSnapshot, SessionStats};
use crate::session::{
    pt_for, restrict_offer, AddedLine, IdleLine, OutTrack, PendingOffer, Selection, Session,
};
use crate::signal::{ClientMessage, ServerMessage, TrackInfo};
use crate::tcp::{self, ConnId, Framer, TcpConn, TcpError};

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
/// layers), dynacast pauses, active speaker.
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
    sessions: HashMap<SessionId, Session>,
    calls: HashMap<CallId, Call>,
    tracks: HashMap<TrackKey, PublishedTrack>,
    ufrags: HashMap<String, SessionId>,
    flows: FlowTable,
    /// Checks sent to new addresses before they get media (issue 16, finding 3).
    consent: ConsentChecks,
    tcp_conns: HashMap<ConnId, TcpConn>,
    tcp_by_addr: HashMap<(SocketAddr, SocketAddr), ConnId>,
    outputs: VecDeque<Output>,
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Sessions that must be connected by a deadline (join + `connect_timeout_ms`).
    /// Router-level deadlines (connect timeouts, unanswered offers), checked lazily.
    deadlines: BinaryHeap<Reverse<(Instant, SessionId, Deadline)>>,
    touched: Vec<SessionId>,
    /// Sessions whose subscriptions may need a router offer.
    renegotiate: Vec<SessionId>,
    /// Sessions to remove once the current input is done (str0m gave up on them).
    dead: Vec<SessionId>,
    counters: Counters,
    /// Probe-answer token bucket: (tokens, last refill).
    probe_bucket: (f64, Instant),
    draining: bool,
    last_now: Instant,
    /// Next periodic tick (layer allocation, dynacast, active speaker).
    next_tick: Instant,
    /// Scratch list of sessions whose timeout is due (kept to avoid an allocation per call).
    due: Vec<SessionId>,
    /// Subscribers whose layer allocation must be recomputed after the current input.
    reallocate: Vec<SessionId>,
    /// Video tracks whose dynacast state must be recomputed after the current input.
    dynacast: Vec<TrackKey>,
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
            timers: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            touched: Vec::new(),
            renegotiate: Vec::new(),
            dead: Vec::new(),
            counters: Counters::default(),
            probe_bucket: (f64::from(probe_burst), now),
            draining: false,
            last_now: now,
            next_tick: later(now, TICK),
            due: Vec::new(),
            reallocate: Vec::new(),
            dynacast: Vec::new(),
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
    pub fn worker_of_datagram(datagram: &[u8]) -> Option<u8> {
        demux::stun_local_ufrag(datagram).and_then(demux::ufrag::worker)
    }

    /// Re-sends what a session's signaling channel may have lost (after the embedder's
    /// signaling connection dropped and came back): the track list and any outstanding router
    /// offer, unchanged.
    pub fn resend_signaling(&mut self, session: SessionId) -> Result<(), RouterError> {
        let state = self
            .sessions
            .get(&session)
            .ok_or(RouterError::UnknownSession(session))?;
        let offer = state.pending_offer.as_ref().map(|p| p.sdp.clone());
        let tracks = self.track_list(session);
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Tracks { tracks }));
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
        self.last_now = now;
        let refused = if self.draining {
            Some(RouterError::Draining)
        } else if self.sessions.contains_key(&session) {
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
        self.sessions.insert(session, state);
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
        let existing: Vec<(SessionId, UserId)> = members
            .iter()
            .filter_map(|m| self.sessions.get(m).map(|s| (*m, s.user.clone())))
            .collect();
        members.push(session);
        for (other, other_user) in existing {
            self.outputs.push_back(Output::Signal(
                session,
                ServerMessage::ParticipantJoined {
                    session: other,
                    user: other_user,
                },
            ));
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
        self.last_now = now;
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        self.remove_session(session, LeaveReason::Left, now);
        self.finish(now);
        Ok(())
    }

    /// Mutes or unmutes a participant's microphone (the embedder's command; clients can also
    /// send [`ClientMessage::Mute`]). Muted audio is not forwarded.
    pub fn set_muted(
        &mut self,
        session: SessionId,
        muted: bool,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = now;
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
        self.last_now = now;
        let state = self
            .sessions
            .get_mut(&session)
            .ok_or(RouterError::UnknownSession(session))?;
        state.bandwidth_cap = bps;
        self.allocate(session, now);
        self.finish(now);
        Ok(())
    }

    /// Feeds one received datagram. Unknown, garbage and unauthenticated datagrams are dropped
    /// silently (no reply) and counted by reason in [`metrics`](Self::metrics).
    pub fn handle_datagram(&mut self, datagram: Datagram<'_>, now: Instant) {
        self.handle_datagrams(std::iter::once(datagram), now);
    }

    /// Feeds a batch of received datagrams (what one `recvmmsg` returned), then drain
    /// [`Router::poll_output`] once. Same as [`Router::handle_datagram`] for each, except that
    /// every subscriber session touched by the batch is given its timeout once, not once per
    /// datagram: with a bandwidth estimator and pacer per session (str0m's `handle_timeout`),
    /// that is most of the per-packet cost in a big call. Keep batches small (≤ 32): writes to
    /// one subscriber wait in str0m until that timeout.
    pub fn handle_datagrams<'a>(
        &mut self,
        datagrams: impl IntoIterator<Item = Datagram<'a>>,
        now: Instant,
    ) {
        self.last_now = now;
        for datagram in datagrams {
            self.ingest(datagram, now);
        }
        self.finish(now);
    }

    /// Announces an accepted ICE-TCP connection (on the TCP media port) before its bytes.
    /// `local` is the socket's local address (`accept()` gives it); behind NAT or port
    /// forwarding it may differ from the advertised candidate.
    pub fn tcp_accepted(
        &mut self,
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), TcpError> {
        if self.tcp_conns.contains_key(&conn) {
            return Err(TcpError::ConnectionExists(conn));
        }
        // str0m sees (and sends from) the advertised candidate address, not the socket's.
        let local = self.local_address(Proto::Tcp, local);
        self.tcp_by_addr.insert((remote, local), conn);
        self.tcp_conns.insert(
            conn,
            TcpConn {
                remote,
                local,
                framer: Framer::default(),
            },
        );
        Ok(())
    }

    /// Feeds bytes read from an ICE-TCP connection, split anywhere. Each complete RFC 4571
    /// frame goes through the same demux as a UDP datagram. On an error the router has
    /// forgotten the connection and the embedder should close it; nothing else is disturbed.
    pub fn handle_tcp_data(
        &mut self,
        conn: ConnId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), TcpError> {
        self.last_now = now;
        let Some(mut state) = self.tcp_conns.remove(&conn) else {
            return Err(TcpError::UnknownConnection(conn));
        };
        let (remote, local) = (state.remote, state.local);
        let result = state.framer.push(bytes, |frame| {
            self.ingest(
                Datagram {
                    proto: Proto::Tcp,
                    source: remote,
                    destination: local,
                    contents: frame,
                },
                now,
            );
        });
        let outcome = match result {
            Ok(()) => {
                self.tcp_conns.insert(conn, state);
                Ok(())
            }
            Err(len) => {
                self.count_drop(DropReason::TcpFrameTooLarge);
                self.counters.snapshot.tcp_rejected += 1;
                self.forget_tcp(conn, remote, local);
                Err(TcpError::FrameTooLarge {
                    conn,
                    len,
                    max: MAX_DATAGRAM_BYTES,
                })
            }
        };
        self.finish(now);
        outcome
    }

    /// The embedder closed (or lost) an ICE-TCP connection.
    pub fn tcp_closed(&mut self, conn: ConnId) -> Result<(), TcpError> {
        let state = self
            .tcp_conns
            .remove(&conn)
            .ok_or(TcpError::UnknownConnection(conn))?;
        self.forget_tcp(conn, state.remote, state.local);
        Ok(())
    }

    fn forget_tcp(&mut self, conn: ConnId, remote: SocketAddr, local: SocketAddr) {
        self.tcp_conns.remove(&conn);
        if self.tcp_by_addr.get(&(remote, local)) == Some(&conn) {
            self.tcp_by_addr.remove(&(remote, local));
        }
        self.flows.remove_key(&FlowKey {
            proto: Proto::Tcp,
            source: remote,
            destination: local,
        });
    }

    /// One datagram (or TCP frame) through the demux into its session, drained.
    fn ingest(&mut self, datagram: Datagram<'_>, now: Instant) {
        let snapshot = &mut self.counters.snapshot;
        snapshot.datagrams_in += 1;
        snapshot.datagram_bytes_in += datagram.contents.len() as u64;
        if datagram.contents.len() > MAX_DATAGRAM_BYTES {
            self.count_drop(DropReason::Oversized);
            return;
        }
        let class = demux::classify(datagram.contents);
        if class == Class::Other {
            self.count_drop(DropReason::Unclassified);
            return;
        }
        let key = FlowKey {
            proto: datagram.proto,
            source: datagram.source,
            destination: datagram.destination,
        };
        let known = self.flows.lookup(&key);
        if class == Class::Stun && known.is_none() && self.answer_probe(&datagram, now) {
            return;
        }
        // Issue 16, finding 3: the answer to a consent check admits its flow (consent.rs).
        if let Some(confirmed) = (class == Class::Stun)
            .then(|| self.consent.answered(datagram.contents, key, self.hmac))
            .flatten()
            .filter(|c| self.sessions.contains_key(&c.session))
        {
            let max = self.config.max_flows_per_session;
            self.flows.insert(key, confirmed.session, max);
            let request = Datagram {
                contents: &confirmed.request,
                ..datagram
            };
            return self.ingest(request, now);
        }
        let session = match (class, known) {
            (Class::Stun, _) => match self.admit_stun(&datagram, key, known) {
                Ok(session) => session,
                Err(reason) => {
                    self.count_drop(reason);
                    return;
                }
            },
            (_, Some(session)) => session,
            (_, None) => {
                self.count_drop(DropReason::UnknownSource);
                return;
            }
        };
        let destination = self.local_address(datagram.proto, datagram.destination);
        let Some(state) = self.sessions.get_mut(&session) else {
            self.count_drop(DropReason::UnknownSource);
            return;
        };
        let receive = match Receive::new(
            datagram.proto.into(),
            datagram.source,
            destination,
            datagram.contents,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(%session, "unparsable datagram: {e}");
                self.count_drop(DropReason::SessionRejected);
                return;
            }
        };
        if let Err(e) = state.rtc.handle_input(Input::Receive(now, receive)) {
            tracing::debug!(%session, "session refused datagram: {e}");
            self.count_drop(DropReason::SessionRejected);
        }
        self.drain(session, now);
    }

    /// Feeds one signaling message from a participant. A refused message is answered with a
    /// [`ServerMessage::Error`] to that participant and returned as an error; the session and
    /// everyone else go on.
    pub fn handle_signal(
        &mut self,
        session: SessionId,
        msg: ClientMessage,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = now;
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        self.counters.snapshot.signals_in += 1;
        let result = self.apply_signal(session, msg, now);
        self.finish(now);
        result.map_err(|error| self.refuse_signal(session, error))
    }

    /// Like [`handle_signal`](Self::handle_signal), from JSON text.
    pub fn handle_signal_json(
        &mut self,
        session: SessionId,
        text: &str,
        now: Instant,
    ) -> Result<(), RouterError> {
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        match ClientMessage::from_json(text) {
            Ok(msg) => self.handle_signal(session, msg, now),
            Err(error) => {
                self.counters.snapshot.signals_in += 1;
                Err(self.refuse_signal(session, error))
            }
        }
    }

    /// Advances time: runs every session whose timer is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
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
            let live = self
                .sessions
                .get_mut(&session)
                .is_some_and(|state| state.next_timeout == Some(at));
            if live {
                due.push(session);
            }
        }
        for session in due.drain(..) {
            let Some(state) = self.sessions.get_mut(&session) else {
                continue;
            };
            state.next_timeout = None;
            if let Err(e) = state.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(%session, "timeout failed: {e}");
            }
            self.drain(session, now);
        }
        self.due = due;
        if now >= self.next_tick {
            self.next_tick = later(now, TICK);
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
        if !self.sessions.is_empty() {
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

    /// A router offer went unanswered for `OFFER_RESEND_AFTER`: the client may have lost it
    /// (a dropped signaling connection, a client bug). Send it again, a few times, unchanged.
    fn resend_offer(&mut self, session: SessionId, now: Instant) {
        let Some(pending) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.pending_offer.as_mut())
        else {
            return;
        };
        if now.saturating_duration_since(pending.sent_at) < OFFER_RESEND_AFTER {
            return;
        }
        if pending.resends >= MAX_OFFER_RESENDS {
            tracing::info!(%session, "router offer never answered; giving up on re-sending it");
            return;
        }
        pending.resends += 1;
        pending.sent_at = now;
        tracing::debug!(%session, resend = pending.resends, "re-sending an unanswered router offer");
        self.deadlines.push(Reverse((
            later(now, OFFER_RESEND_AFTER),
            session,
            Deadline::OfferResend,
        )));
        let _ = self.resend_signaling(session);
    }

    /// A snapshot of every counter and gauge.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.counters.snapshot.clone();
        m.sessions = self.sessions.len() as u64;
        m.calls = self.calls.len() as u64;
        m.flows = self.flows.len() as u64;
        m.tcp_connections = self.tcp_conns.len() as u64;
        m.connected_sessions = self.sessions.values().filter(|s| s.connected).count() as u64;
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

    // ---------------------------------------------------------------- demux

    fn count_drop(&mut self, reason: DropReason) {
        *self.counters.snapshot.drops.entry(reason).or_insert(0) += 1;
    }

    /// Routes a STUN datagram: a binding request is routed by its USERNAME's ufrag and, for a
    /// flow not yet known for that session, admitted only after MESSAGE-INTEGRITY checks out
    /// against that session's password. Other STUN goes to the flow's session, if any.
    fn admit_stun(
        &mut self,
        datagram: &Datagram<'_>,
        key: FlowKey,
        known: Option<SessionId>,
    ) -> Result<SessionId, DropReason> {
        let message =
            StunMessage::parse(datagram.contents).map_err(|_| DropReason::MalformedStun)?;
        if !message.is_binding_request() {
            return known.ok_or(DropReason::StunNotBindingRequest);
        }
        let local = message
            .username()
            .and_then(|u| u.split_once(':'))
            .map(|(local, _)| local)
            .ok_or(DropReason::UnknownUfrag)?;
        let session = *self.ufrags.get(local).ok_or(DropReason::UnknownUfrag)?;
        if known == Some(session) {
            return Ok(session); // str0m checks integrity on known flows too
        }
        let state = self
            .sessions
            .get(&session)
            .ok_or(DropReason::UnknownUfrag)?;
        let hmac = self.hmac;
        let authentic = message.verify(state.local_creds.pass.as_bytes(), |key, parts| {
            hmac.sha1_hmac(key, parts)
        });
        if !authentic {
            return Err(DropReason::StunAuthFailed);
        }
        if key.proto == Proto::Udp {
            // Issue 16, finding 3: a new UDP address answers a check first (consent.rs).
            let local = self.local_address(Proto::Udp, key.destination);
            let (ufrag, remote) = (&state.local_creds.ufrag, state.remote_ice.as_ref());
            let (request, now) = (datagram.contents, self.last_now);
            let hmac = self.hmac;
            return Err(self
                .consent
                .challenge(key, session, ufrag, remote, request, local, hmac, now));
        }
        self.flows
            .insert(key, session, self.config.max_flows_per_session);
        Ok(session)
    }

    /// Answers a STUN binding request for the probe credential (see `Config::probe_ufrag`).
    /// Returns false if the datagram is not a probe (it then takes the normal path).
    fn answer_probe(&mut self, datagram: &Datagram<'_>, now: Instant) -> bool {
        let (Some(ufrag), Some(password)) = (&self.config.probe_ufrag, &self.config.probe_password)
        else {
            return false;
        };
        let Ok(message) = StunMessage::parse(datagram.contents) else {
            return false;
        };
        let is_probe = message.is_binding_request()
            && message
                .username()
                .and_then(|u| u.split_once(':'))
                .is_some_and(|(local, _)| local == ufrag.as_str());
        if !is_probe {
            return false;
        }
        let hmac = self.hmac;
        if !message.verify(password.as_bytes(), |k, p| hmac.sha1_hmac(k, p)) {
            self.count_drop(DropReason::StunAuthFailed);
            return true;
        }
        // Token bucket: at most `probe_replies_per_second`, bursts of the same size.
        let rate = f64::from(self.config.probe_replies_per_second);
        let elapsed = now
            .saturating_duration_since(self.probe_bucket.1)
            .as_secs_f64();
        let tokens = (self.probe_bucket.0 + elapsed * rate).min(rate);
        self.probe_bucket = (tokens, now);
        if tokens < 1.0 {
            self.count_drop(DropReason::ProbeRateLimited);
            return true;
        }
        self.probe_bucket.0 -= 1.0;
        let reply = StunMessageBuilder::new()
            .binding()
            .success()
            .xor_mapped_address(datagram.source)
            .build(message.trans_id());
        let mut buf = [0u8; 256];
        let Ok(len) = reply.to_bytes(Some(password.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        }) else {
            return true;
        };
        if len > datagram.contents.len() {
            // Never answer with more bytes than were sent (no amplification).
            self.count_drop(DropReason::ProbeRateLimited);
            return true;
        }
        let local = self.local_address(datagram.proto, datagram.destination);
        let (conn, contents) = match datagram.proto {
            Proto::Udp => (None, buf[..len].to_vec()),
            Proto::Tcp => match self.tcp_by_addr.get(&(datagram.source, local)) {
                Some(conn) => (Some(*conn), tcp::frame(&buf[..len])),
                None => return true,
            },
        };
        self.counters.snapshot.probe_replies += 1;
        self.outputs.push_back(Output::Transmit(Transmit {
            proto: datagram.proto,
            conn,
            source: local,
            destination: datagram.source,
            contents,
        }));
        true
    }

    /// The advertised candidate address matching where a datagram arrived. Behind NAT or with
    /// a host override the socket's address differs from the candidate; str0m expects the
    /// candidate address.
    fn local_address(&self, proto: Proto, arrived_on: SocketAddr) -> SocketAddr {
        let candidates = match proto {
            Proto::Udp => &self.udp_candidates,
            Proto::Tcp => &self.tcp_candidates,
        };
        if candidates.contains(&arrived_on) {
            return arrived_on;
        }
        candidates
            .iter()
            .find(|c| c.is_ipv4() == arrived_on.is_ipv4())
            .copied()
            .unwrap_or(arrived_on)
    }

    // ---------------------------------------------------------------- draining sessions

    /// Drains one session's str0m outputs completely (the str0m rule: drain after every input).
    fn drain(&mut self, session: SessionId, now: Instant) {
        loop {
            let Some(state) = self.sessions.get_mut(&session) else {
                return;
            };
            let out = match state.rtc.poll_output() {
                Ok(out) => out,
                Err(e) => {
                    tracing::warn!(%session, "session failed: {e}");
                    self.dead.push(session);
                    return;
                }
            };
            match out {
                RtcOutput::Timeout(at) => {
                    if !state.rtc.is_alive() {
                        self.dead.push(session);
                        return;
                    }
                    // "Again at once" becomes a millisecond later: the embedder's loop must
                    // not spin (str0m's pacer can ask for `now` again).
                    let at = if at <= now { later(now, MIN_WAKE) } else { at };
                    if state.next_timeout != Some(at) {
                        state.next_timeout = Some(at);
                        self.timers.push(Reverse((at, session)));
                    }
                    return;
                }
                RtcOutput::Transmit(t) => self.transmit(t),
                RtcOutput::Event(event) => self.on_rtc_event(session, event, now),
            }
        }
    }

    /// Queues one of str0m's transmits; ICE-TCP ones are framed for their connection.
    fn transmit(&mut self, t: str0m::net::Transmit) {
        let proto = proto_of(t.proto);
        let (conn, contents) = match proto {
            Proto::Udp => (None, Vec::from(t.contents)),
            Proto::Tcp => {
                let Some(conn) = self.tcp_by_addr.get(&(t.destination, t.source)).copied() else {
                    self.counters.snapshot.tcp_unsent += 1;
                    return;
                };
                (Some(conn), tcp::frame(&t.contents))
            }
        };
        let snapshot = &mut self.counters.snapshot;
        snapshot.datagrams_out += 1;
        snapshot.datagram_bytes_out += contents.len() as u64;
        self.outputs.push_back(Output::Transmit(Transmit {
            proto,
            conn,
            source: t.source,
            destination: t.destination,
            contents,
        }));
    }

    /// After each input: give touched sessions their timeout (so queued writes go out), run
    /// pending renegotiations, remove dead sessions, and keep the timer heap compact.
    fn finish(&mut self, now: Instant) {
        loop {
            if let Some(session) = self.touched.pop() {
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.touched = false;
                    if let Err(e) = state.rtc.handle_input(Input::Timeout(now)) {
                        tracing::debug!(%session, "timeout failed: {e}");
                    }
                    self.drain(session, now);
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

    fn touch(&mut self, session: SessionId) {
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
                    let key = s.out_by_mid.get(&req.mid).copied()?;
                    let out = s.outgoing.get(&key)?;
                    // The layer this subscriber decodes (or is about to).
                    let rid = out.sel.current.or(out.sel.target.and_then(|t| t.0));
                    Some((key, rid))
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

    // ---------------------------------------------------------------- publishing

    /// An m-line appeared or changed direction in this session's SDP.
    fn on_media(
        &mut self,
        session: SessionId,
        mid: Mid,
        kind: MediaKind,
        direction: Direction,
        now: Instant,
    ) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let we_receive = matches!(direction, Direction::RecvOnly | Direction::SendRecv);
        let key = TrackKey {
            publisher: session,
            mid,
        };
        let is_ours = state.out_by_mid.contains_key(&mid);
        if is_ours {
            return; // a subscription m-line, not a published track
        }
        if we_receive && !state.published.contains(&mid) {
            let source = match kind {
                MediaKind::Audio => TrackSource::Microphone,
                MediaKind::Video if state.screen_mid == Some(mid) => TrackSource::Screen,
                MediaKind::Video => TrackSource::Camera,
            };
            if !state.grants.may_publish(source) {
                // restrict_offer already answered it without; this is the media-layer backstop.
                return;
            }
            state.published.push(mid);
            let call = state.call.clone();
            self.tracks.insert(key, PublishedTrack::new(kind, source));
            if let Some(c) = self.calls.get_mut(&call) {
                c.tracks.push(key);
            }
            self.outputs.push_back(Output::Event(Event::TrackPublished {
                session,
                mid: mid.to_string(),
                source,
            }));
            if source == TrackSource::Screen {
                let user = state.user.clone();
                self.broadcast(
                    &call,
                    None,
                    ServerMessage::Screen {
                        session,
                        user,
                        on: true,
                    },
                );
            }
            self.renegotiate_call(&call, Some(session));
        } else if !we_receive && state.published.contains(&mid) {
            self.unpublish(key, now);
        }
    }

    /// Stops a published track: subscribers drop it at their next router offer.
    fn unpublish(&mut self, key: TrackKey, _now: Instant) {
        let Some(track) = self.tracks.remove(&key) else {
            return;
        };
        let Some(state) = self.sessions.get_mut(&key.publisher) else {
            return;
        };
        state.published.retain(|m| *m != key.mid);
        let call = state.call.clone();
        let user = state.user.clone();
        if let Some(c) = self.calls.get_mut(&call) {
            c.tracks.retain(|k| *k != key);
        }
        for sub in &track.subscribers {
            if let Some(s) = self.sessions.get_mut(sub) {
                if let Some(out) = s.outgoing.remove(&key) {
                    if !track.is_audio() {
                        s.video_out -= 1;
                    }
                    s.out_by_mid.remove(&out.mid);
                    s.idle.push(IdleLine {
                        mid: out.mid,
                        kind: track.kind,
                        continuation: out.rewriter.continuation(),
                    });
                }
            }
        }
        self.outputs
            .push_back(Output::Event(Event::TrackUnpublished {
                session: key.publisher,
                mid: key.mid.to_string(),
            }));
        if track.source == TrackSource::Screen {
            self.broadcast(
                &call,
                None,
                ServerMessage::Screen {
                    session: key.publisher,
                    user,
                    on: false,
                },
            );
        }
        self.renegotiate_call(&call, Some(key.publisher));
    }

    fn renegotiate_call(&mut self, call: &CallId, except: Option<SessionId>) {
        if let Some(c) = self.calls.get(call) {
            for member in &c.members {
                if Some(*member) != except && !self.renegotiate.contains(member) {
                    self.renegotiate.push(*member);
                }
            }
        }
    }

    // ---------------------------------------------------------------- forwarding

    /// One RTP packet from a publisher: measure its layer, then for every subscriber decide
    /// (its layer, its temporal cap, keyframe gating), rewrite and write.
    fn forward(&mut self, publisher: SessionId, packet: RtpPacket, now: Instant) {
        let Some(state) = self.sessions.get_mut(&publisher) else {
            return;
        };
        let Some((mid, rid)) = state.rx_stream(packet.header.ssrc) else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let muted = state.muted;
        let codec = state.codec_of(packet.header.payload_type);
        let key = TrackKey { publisher, mid };
        let Some(track) = self.tracks.get_mut(&key) else {
            // Not a published track (forbidden by the grants, or already stopped).
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let payload_len = packet.payload.len();
        let is_audio = track.is_audio();
        self.counters.snapshot.media_in.add(is_audio, payload_len);
        if is_audio && muted {
            self.counters.snapshot.media_dropped += 1;
            return;
        }
        let Some((codec, clock_rate)) = codec else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        if is_audio {
            if let Some(call) = self.calls.get_mut(&state.call) {
                if let Some(level) = packet.header.ext_vals.audio_level {
                    call.speakers.observe(
                        publisher,
                        level,
                        packet.header.ext_vals.voice_activity,
                        now,
                    );
                }
                if !call.speakers.is_forwarded(publisher, now) {
                    // Not among the loudest: nobody needs this packet (top-N audio).
                    self.counters.snapshot.audio_not_forwarded += 1;
                    return;
                }
            }
        }
        let mut keyframe = false;
        let mut tid = None;
        let mut starts_picture = false;
        let mut vp8 = None;
        let mut new_layer = false;
        if !is_audio {
            track.codec = VideoCodec::from_str0m(codec);
            keyframe = track.codec.is_keyframe(&packet.payload);
            match track.codec {
                VideoCodec::Vp8 => {
                    (tid, starts_picture) = layers::vp8_temporal(&packet.payload);
                    vp8 = Vp8Descriptor::parse(&packet.payload).ok();
                }
                VideoCodec::Vp9 => (tid, starts_picture) = layers::vp9_temporal(&packet.payload),
                _ => {}
            }
            let Some((index, is_new)) = track.layer_index(rid, now) else {
                self.counters.snapshot.media_dropped += 1;
                return;
            };
            new_layer = is_new;
            let layer = &mut track.layers[index];
            layer.last_seen = now;
            layer.max_tid = layer
                .max_tid
                .max(tid.unwrap_or(0).min(layers::MAX_TID as u8));
            layer
                .meter
                .record(payload_len, tid.unwrap_or(0), packet.header.marker, now);
        }
        let track = if new_layer {
            // Every subscriber of this track can be given the new layer — before this packet
            // (often the keyframe that starts the layer) is fanned out.
            let subscribers = track.subscribers.clone();
            for sub in subscribers {
                self.allocate(sub, now);
            }
            let Some(track) = self.tracks.get_mut(&key) else {
                return;
            };
            track
        } else {
            track
        };
        let simulcast = rid.is_some();
        let epoch = track.epoch;
        let mut need_keyframe = false;
        let mut switches = 0;
        let subscribers = std::mem::take(&mut track.subscribers);
        for sub in &subscribers {
            let Some(s) = self.sessions.get_mut(sub) else {
                continue;
            };
            let Some(out) = s.outgoing.get_mut(&key) else {
                continue;
            };
            if !is_audio {
                let sel = &mut out.sel;
                let Some((target_rid, target_tid)) = sel.target else {
                    continue; // paused: no budget, or the subscriber hid it
                };
                if simulcast && sel.current != rid {
                    if target_rid != rid {
                        continue; // another layer than this subscriber's
                    }
                    if !keyframe {
                        need_keyframe = true; // switching waits for this layer's keyframe
                        continue;
                    }
                    // The switch: this keyframe starts the new layer, seamlessly.
                    if sel.current.is_some() {
                        out.rewriter.switch_layer();
                    }
                    sel.current = rid;
                    sel.vp8.switch_layer();
                    sel.tid_cap = target_tid;
                    if let Some(started) = sel.switch_started.take() {
                        self.counters
                            .snapshot
                            .layer_switch_time
                            .record(now.saturating_duration_since(started));
                    }
                    switches += 1;
                }
                // Temporal layers: raise the cap only where the stream can be decoded from
                // (a TL0 picture), lower it at any picture start.
                if starts_picture && (tid == Some(0) || target_tid < sel.tid_cap) {
                    sel.tid_cap = target_tid;
                }
                if tid.is_some_and(|t| t > sel.tid_cap) {
                    out.rewriter.skip(*packet.seq_no);
                    if starts_picture {
                        sel.vp8.dropped_picture();
                    }
                    continue;
                }
            }
            let in_pt = packet.header.payload_type;
            let out_pt = match out.pt_map.iter().find(|(i, _)| *i == in_pt) {
                Some(&(_, pt)) => pt,
                None => {
                    let Some(pt) = pt_for(&s.rtc, codec, clock_rate) else {
                        continue; // this subscriber did not negotiate the codec
                    };
                    out.pt_map.push((in_pt, pt));
                    pt
                }
            };
            let verdict = out.rewriter.rewrite(
                epoch,
                *packet.seq_no,
                packet.header.timestamp,
                keyframe,
                now,
            );
            let Verdict::Forward { seq, timestamp } = verdict else {
                need_keyframe |= out.rewriter.waits_for_keyframe();
                continue;
            };
            let patch = vp8.as_ref().and_then(|d| out.sel.vp8.patch(d));
            let ssrc = out.ssrc;
            out.last_write = now;
            if std::mem::take(&mut out.parked) && s.unpark(ssrc) {
                self.counters.snapshot.streams_unparked += 1;
            }
            // Only what the subscriber needs; str0m writes MID, TWCC and abs-send-time itself.
            let ext = ExtensionValues {
                audio_level: packet.header.ext_vals.audio_level,
                voice_activity: packet.header.ext_vals.voice_activity,
                video_orientation: packet.header.ext_vals.video_orientation,
                ..Default::default()
            };
            let mut api = s.rtc.direct_api();
            let Some(tx) = api.stream_tx(&ssrc) else {
                continue;
            };
            let mut write = RtpWrite::new(
                out_pt,
                seq.into(),
                timestamp,
                packet.timestamp,
                packet.payload.clone(),
            )
            .marker(packet.header.marker)
            .ext_vals(ext)
            .nackable(!is_audio);
            if let Some(patch) = patch {
                write = write.vp8_patch(patch);
            }
            tx.write_rtp(write);
            self.counters.snapshot.media_out.add(is_audio, payload_len);
            if !s.touched {
                s.touched = true;
                self.touched.push(*sub);
            }
        }
        if let Some(track) = self.tracks.get_mut(&key) {
            track.subscribers = subscribers;
        }
        if switches > 0 {
            self.counters.snapshot.layer_switches += switches;
            self.dynacast.push(key);
        }
        if need_keyframe {
            self.request_keyframe(key, rid, now, false);
        }
    }

    /// Asks a publisher for a keyframe of one layer, at most once per
    /// `keyframe_request_interval` per layer (all subscribers' requests are aggregated into
    /// one). `urgent` (a new subscriber) allows a request after a fifth of the interval.
    fn request_keyframe(&mut self, key: TrackKey, rid: Option<Rid>, now: Instant, urgent: bool) {
        let interval = self.config.keyframe_request_interval();
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        if track.is_audio() {
            return;
        }
        let min_gap = if urgent { interval / 5 } else { interval };
        if let Some(layer) = track.layers.iter_mut().find(|l| l.rid == rid) {
            if layer
                .last_keyframe_request
                .is_some_and(|last| now.saturating_duration_since(last) < min_gap)
            {
                return;
            }
            layer.last_keyframe_request = Some(now);
        }
        let Some(publisher) = self.sessions.get_mut(&key.publisher) else {
            return;
        };
        let mut api = publisher.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(key.mid, rid) else {
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        self.counters.snapshot.keyframe_requests_out += 1;
        self.touch(key.publisher);
    }

    // ---------------------------------------------------------------- signaling

    fn refuse_signal(&mut self, session: SessionId, error: SignalError) -> RouterError {
        self.counters.snapshot.signal_errors += 1;
        tracing::debug!(%session, "signal refused: {error}");
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::error(&error)));
        RouterError::Signal { session, error }
    }

    fn apply_signal(
        &mut self,
        session: SessionId,
        msg: ClientMessage,
        now: Instant,
    ) -> Result<(), SignalError> {
        match msg {
            ClientMessage::Offer { sdp, screen_mid } => {
                self.on_client_offer(session, &sdp, screen_mid, now)
            }
            ClientMessage::Answer { sdp } => self.on_client_answer(session, &sdp, now),
            ClientMessage::Candidate { candidate } => {
                let line = candidate.trim();
                let line = line.strip_prefix("a=").unwrap_or(line);
                if line.is_empty() {
                    return Ok(()); // end-of-candidates
                }
                let parsed = Candidate::from_sdp_string(line)
                    .map_err(|e| SignalError::Candidate(e.to_string()))?;
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.rtc.add_remote_candidate(parsed);
                }
                self.drain(session, now);
                Ok(())
            }
            ClientMessage::Mute => {
                self.set_muted(session, true, now).ok();
                Ok(())
            }
            ClientMessage::Unmute => {
                let allowed = self
                    .sessions
                    .get(&session)
                    .is_some_and(|s| s.grants.publish_audio);
                if !allowed {
                    return Err(SignalError::NotAllowed(
                        "this session may not publish audio",
                    ));
                }
                self.set_muted(session, false, now).ok();
                Ok(())
            }
            ClientMessage::ScreenOn { mid } => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return Ok(());
                };
                if !state.grants.publish_screen {
                    return Err(SignalError::NotAllowed(
                        "this session may not share its screen",
                    ));
                }
                let mid = Mid::from(mid.as_str());
                state.screen_mid = Some(mid);
                let key = TrackKey {
                    publisher: session,
                    mid,
                };
                if let Some(track) = self.tracks.get_mut(&key) {
                    if track.source != TrackSource::Screen && track.kind == MediaKind::Video {
                        track.source = TrackSource::Screen;
                        let call = state.call.clone();
                        let user = state.user.clone();
                        self.broadcast(
                            &call,
                            None,
                            ServerMessage::Screen {
                                session,
                                user,
                                on: true,
                            },
                        );
                        self.renegotiate_call(&call, Some(session));
                    }
                }
                Ok(())
            }
            ClientMessage::Preference {
                mid,
                paused,
                max_layer,
            } => self.set_preference(session, &mid, paused, max_layer, now),
            ClientMessage::ScreenOff => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return Ok(());
                };
                if let Some(mid) = state.screen_mid.take() {
                    self.unpublish(
                        TrackKey {
                            publisher: session,
                            mid,
                        },
                        now,
                    );
                }
                Ok(())
            }
        }
    }

    fn on_client_offer(
        &mut self,
        session: SessionId,
        sdp: &str,
        screen_mid: Option<String>,
        now: Instant,
    ) -> Result<(), SignalError> {
        let facts = crate::limits::check_offer(sdp, screen_mid.as_deref(), &self.config)?; // issue 16
        let Some(state) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        state.remote_ice = facts.remote_ice.or(state.remote_ice.take()); // issue 16: consent
        if let Some(mid) = &screen_mid {
            if state.grants.publish_screen {
                state.screen_mid = Some(Mid::from(mid.as_str()));
            }
        }
        let (sdp, restricted) = restrict_offer(sdp, state.grants, screen_mid.as_deref());
        if restricted > 0 {
            tracing::info!(%session, restricted, "offer restricted by grants");
        }
        let offer = SdpOffer::from_sdp_string(&sdp).map_err(|e| SignalError::Sdp(e.to_string()))?;
        if let Some(pending) = state.pending_offer.take() {
            // Glare: the client's offer wins. str0m rolls our offer back in accept_offer; the
            // tracks it would have added stay wanted and go into the next router offer, and
            // the existing m-lines it reused go back to the idle pool.
            for line in pending.added {
                if let Some(continuation) = line.continuation {
                    state.idle.push(IdleLine {
                        mid: line.mid,
                        kind: line.kind,
                        continuation,
                    });
                }
            }
            self.counters.snapshot.glare_rollbacks += 1;
            tracing::debug!(%session, "glare: the client's offer wins; ours is re-offered after the answer");
        }
        let state = self
            .sessions
            .get_mut(&session)
            .ok_or(SignalError::UnexpectedAnswer)?;
        let answer = state
            .with_streams_declared(|rtc| rtc.sdp_api().accept_offer(offer))
            .map_err(|e| SignalError::Sdp(e.to_string()))?;
        state.negotiated = true;
        self.outputs.push_back(Output::Signal(
            session,
            ServerMessage::Answer {
                sdp: answer.to_sdp_string(),
            },
        ));
        self.drain(session, now);
        // Anything the rolled-back or never-sent offers carried goes out now.
        if !self.renegotiate.contains(&session) {
            self.renegotiate.push(session);
        }
        Ok(())
    }

    fn on_client_answer(
        &mut self,
        session: SessionId,
        sdp: &str,
        now: Instant,
    ) -> Result<(), SignalError> {
        let Some(state) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        let Some(pending) = state.pending_offer.take() else {
            return Err(SignalError::UnexpectedAnswer);
        };
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| SignalError::Sdp(e.to_string()))?;
        let accepted =
            state.with_streams_declared(|rtc| rtc.sdp_api().accept_answer(pending.pending, answer));
        if let Err(e) = accepted {
            // The offer is spent; what it carried is offered again.
            if !self.renegotiate.contains(&session) {
                self.renegotiate.push(session);
            }
            return Err(SignalError::Sdp(e.to_string()));
        }
        let mut attached = Vec::new();
        for line in pending.added {
            let Some(track) = self.tracks.get(&line.key) else {
                // Unpublished meanwhile: the m-line waits for the next track.
                state.idle.push(IdleLine {
                    mid: line.mid,
                    kind: line.kind,
                    continuation: line.continuation.unwrap_or_default(),
                });
                continue;
            };
            if attach(state, line, track, now) {
                attached.push(line.key);
            }
        }
        self.drain(session, now);
        for key in attached {
            self.subscribed(session, key, now);
        }
        if !self.renegotiate.contains(&session) {
            self.renegotiate.push(session);
        }
        Ok(())
    }

    /// Sends a router offer if this session's subscriptions differ from what its call
    /// publishes, unless an offer is already outstanding (never two offers in flight).
    fn offer_if_needed(&mut self, session: SessionId, now: Instant) {
        let Some(state) = self.sessions.get(&session) else {
            return;
        };
        if !state.negotiated || state.pending_offer.is_some() {
            return;
        }
        let wanted: Vec<(TrackKey, MediaKind, TrackSource)> = if state.grants.subscribe {
            self.calls
                .get(&state.call)
                .map(|c| {
                    c.tracks
                        .iter()
                        .filter(|k| k.publisher != session && !state.outgoing.contains_key(k))
                        .filter_map(|k| self.tracks.get(k).map(|t| (*k, t.kind, t.source)))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let sending = |rtc: &str0m::Rtc, mid: Mid| {
            rtc.media(mid)
                .is_some_and(|m| m.direction() == Direction::SendOnly)
        };
        let idle_but_sending = state.idle.iter().any(|l| sending(&state.rtc, l.mid));
        if wanted.is_empty() && !idle_but_sending {
            return;
        }
        // Reuse idle m-lines of the same kind first. One still negotiated as sendonly carries
        // the new track at once; an inactive one is turned back on in the offer.
        let mut attached = Vec::new();
        let mut reactivate = Vec::new();
        let mut fresh = Vec::new();
        for (key, kind, source) in wanted {
            let Some(pos) = state.idle.iter().position(|l| l.kind == kind) else {
                fresh.push((key, kind, source));
                continue;
            };
            let idle = state.idle.swap_remove(pos);
            let line = AddedLine {
                key,
                mid: idle.mid,
                kind,
                continuation: Some(idle.continuation),
            };
            if sending(&state.rtc, idle.mid) {
                if let Some(track) = self.tracks.get(&key) {
                    if attach(state, line, track, now) {
                        attached.push(key);
                    }
                }
            } else {
                reactivate.push(line);
            }
        }
        let idle: Vec<Mid> = state.idle.iter().map(|l| l.mid).collect();
        let (applied, added) = state.with_streams_declared(|rtc| {
            let mut api = rtc.sdp_api();
            for line in &reactivate {
                api.set_direction(line.mid, Direction::SendOnly);
            }
            for mid in idle {
                api.set_direction(mid, Direction::Inactive);
            }
            let mut added = reactivate;
            for (key, kind, source) in fresh {
                let stream_id = format!("{}", key.publisher);
                let track_id = format!("{}-{}-{}", key.publisher, source.as_str(), key.mid);
                let mid = api.add_media(
                    kind,
                    Direction::SendOnly,
                    Some(stream_id),
                    Some(track_id),
                    None,
                );
                added.push(AddedLine {
                    key,
                    mid,
                    kind,
                    continuation: None,
                });
            }
            (api.apply(), added)
        });
        let offer = applied.map(|(offer, pending)| {
            let sdp = offer.to_sdp_string();
            state.pending_offer = Some(PendingOffer {
                pending,
                added,
                sdp: sdp.clone(),
                sent_at: now,
                resends: 0,
            });
            sdp
        });
        if offer.is_some() {
            tracing::debug!(%session, "router offer sent");
            self.deadlines.push(Reverse((
                later(now, OFFER_RESEND_AFTER),
                session,
                Deadline::OfferResend,
            )));
        }
        for key in attached.iter().copied() {
            self.subscribed(session, key, now);
        }
        if offer.is_none() && attached.is_empty() {
            return;
        }
        let tracks = self.track_list(session);
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Tracks { tracks }));
        if let Some(sdp) = offer {
            self.counters.snapshot.renegotiations += 1;
            self.outputs
                .push_back(Output::Signal(session, ServerMessage::Offer { sdp }));
        }
    }

    /// The tracks a session receives (negotiated and in its pending offer), by local mid.
    fn track_list(&self, session: SessionId) -> Vec<TrackInfo> {
        let Some(state) = self.sessions.get(&session) else {
            return Vec::new();
        };
        let pending = state
            .pending_offer
            .iter()
            .flat_map(|p| p.added.iter().map(|l| (l.key, l.mid)));
        let current = state.outgoing.iter().map(|(k, o)| (*k, o.mid));
        let mut list: Vec<TrackInfo> = current
            .chain(pending)
            .filter_map(|(key, mid)| {
                let track = self.tracks.get(&key)?;
                let publisher = self.sessions.get(&key.publisher)?;
                Some(TrackInfo {
                    mid: mid.to_string(),
                    session: key.publisher,
                    user: publisher.user.clone(),
                    source: track.source,
                })
            })
            .collect();
        list.sort_by(|a, b| a.mid.cmp(&b.mid));
        list
    }

    fn broadcast(&mut self, call: &CallId, except: Option<SessionId>, msg: ServerMessage) {
        if let Some(c) = self.calls.get(call) {
            for member in &c.members {
                if Some(*member) != except {
                    self.outputs.push_back(Output::Signal(*member, msg.clone()));
                }
            }
        }
    }

    // ---------------------------------------------------------------- leaving

    fn remove_session(&mut self, session: SessionId, reason: LeaveReason, now: Instant) {
        let Some(state) = self.sessions.get(&session) else {
            return;
        };
        let published = state.published.clone();
        let subscribed: Vec<TrackKey> = state.outgoing.keys().copied().collect();
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
        if let Some(c) = self.calls.get_mut(&call) {
            c.members.retain(|m| *m != session);
            c.speakers.remove(session);
            if c.members.is_empty() {
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

/// Starts writing `line.key`'s track into the subscriber's m-line `line.mid`. Returns false if
/// str0m has no send stream there (the answer refused the m-line).
fn attach(state: &mut Session, line: AddedLine, track: &PublishedTrack, now: Instant) -> bool {
    // A reused m-line's stream may be parked: it carries a track again.
    state.unpark_mid(line.mid);
    let Some(ssrc) = state
        .rtc
        .direct_api()
        .stream_tx_by_mid(line.mid, None)
        .map(|tx| tx.ssrc())
    else {
        tracing::warn!(mid = %line.mid, "no send stream for a negotiated m-line");
        return false;
    };
    let clock_rate = if track.is_audio() { 48_000 } else { 90_000 };
    let rewriter = match line.continuation {
        Some(from) => Rewriter::continuing(clock_rate, !track.is_audio(), track.epoch, from),
        None => Rewriter::new(clock_rate, !track.is_audio(), track.epoch),
    };
    state.out_by_mid.insert(line.mid, line.key);
    state.outgoing.insert(
        line.key,
        OutTrack {
            mid: line.mid,
            ssrc,
            rewriter,
            pt_map: Vec::new(),
            sel: Selection::default(),
            last_write: now,
            parked: false,
        },
    );
    if !track.is_audio() {
        state.video_out += 1;
    }
    true
}

/// `at + by`, saturating at `at` where `Instant` cannot go further (an embedder's clock near
/// the end of its range must not panic the router).
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or(at)
}

fn proto_of(proto: str0m::net::Protocol) -> Proto {
    match proto {
        str0m::net::Protocol::Udp => Proto::Udp,
        _ => Proto::Tcp,
    }
}
