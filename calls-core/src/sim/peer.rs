//! A simulated participant: a real str0m [`Rtc`] on the client side (full ICE, controlling, RTP
//! mode) that publishes synthetic Opus and VP8, negotiates with the router through typed
//! signaling messages, and keeps statistics of every RTP packet it receives.
//!
//! A peer does no I/O. It is driven by [`SimWorld`](super::SimWorld) (or a test) through
//! [`SimPeer::handle_datagram`], [`SimPeer::handle_signal`] and [`SimPeer::handle_timeout`], and
//! leaves what it wants to send in an outbox ([`SimPeer::take_transmits`],
//! [`SimPeer::take_signals`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{detect_vp8_keyframe, Codec};
use str0m::media::{Direction, KeyframeRequest, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::ids::{SessionId, TrackSource, UserId};
use crate::signal::{ClientMessage, ServerMessage, TrackInfo};
use crate::Proto;

/// Audio packet interval (Opus 20 ms frames).
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Video frame interval (30 fps).
const VIDEO_INTERVAL: Duration = Duration::from_nanos(33_333_333);
/// Opus RTP clock ticks per 20 ms frame at 48 kHz.
const AUDIO_TICKS: u32 = 960;
/// VP8 RTP clock ticks per frame at 90 kHz and 30 fps.
const VIDEO_TICKS: u32 = 3000;
/// Least time between two keyframes sent because of keyframe requests.
const KEYFRAME_REQUEST_THROTTLE: Duration = Duration::from_millis(100);
/// Packets in a synthetic keyframe.
const KEYFRAME_PACKETS: usize = 15;
/// Server messages kept in [`SimPeer::signal_log`].
const SIGNAL_LOG_LEN: usize = 256;

/// How a simulated participant reaches the router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// A UDP host candidate (the normal case).
    #[default]
    Udp,
    /// Only an *active* ICE-TCP host candidate, as a browser behind a firewall that blocks
    /// UDP: ICE can pair it only with the router's passive TCP candidate. The world opens a
    /// simulated TCP connection on the peer's first TCP transmit and carries RFC 4571 frames.
    Tcp,
}

/// What a simulated participant publishes and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerOptions {
    /// Publish a microphone (Opus, one packet per 20 ms).
    pub audio: bool,
    /// Publish a camera (VP8, 30 fps).
    pub video: bool,
    /// Publish a screen share (a second VP8 m-line, announced with `screen_mid`).
    pub screen: bool,
    /// Time between unsolicited keyframes.
    pub keyframe_interval: Duration,
    /// The address this peer sends from; `None` lets the world pick one.
    pub addr: Option<SocketAddr>,
    /// What the router lets this participant do (passed to `Router::join`).
    pub grants: crate::ids::Grants,
    /// UDP, or ICE-TCP only.
    pub transport: Transport,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            audio: true,
            video: true,
            screen: false,
            keyframe_interval: Duration::from_secs(3),
            addr: None,
            grants: crate::ids::Grants::ALL,
            transport: Transport::Udp,
        }
    }
}

impl PeerOptions {
    /// Microphone only.
    pub fn audio_only() -> Self {
        PeerOptions {
            video: false,
            ..PeerOptions::default()
        }
    }

    /// Sets the keyframe interval.
    pub fn keyframe_interval(mut self, interval: Duration) -> Self {
        self.keyframe_interval = interval;
        self
    }

    /// Also shares a screen.
    pub fn with_screen(mut self) -> Self {
        self.screen = true;
        self
    }

    /// Reaches the router over ICE-TCP only (see [`Transport::Tcp`]).
    pub fn tcp_only(mut self) -> Self {
        self.transport = Transport::Tcp;
        self
    }
}

/// What one peer received on one track.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackStats {
    /// The local mid the packets arrived on (the last one, if the track moved).
    pub mid: String,
    /// RTP packets received.
    pub packets: u64,
    /// RTP payload bytes received.
    pub bytes: u64,
    /// Extended sequence number of the first packet.
    pub first_seq: Option<u64>,
    /// Highest extended sequence number seen.
    pub last_seq: Option<u64>,
    /// Sequence numbers skipped after the first packet (never received in order).
    pub gaps: u64,
    /// Sequence numbers skipped after the first keyframe (video), or after the first packet
    /// (audio).
    pub gaps_after_keyframe: u64,
    /// Packets at or below the highest sequence number seen (duplicates, reordered, repaired).
    pub late_or_duplicate: u64,
    /// Packets that start a VP8 keyframe.
    pub keyframes: u64,
    /// When the first packet arrived.
    pub first_packet_at: Option<Instant>,
    /// When the last packet arrived.
    pub last_packet_at: Option<Instant>,
    /// When the first keyframe arrived.
    pub first_keyframe_at: Option<Instant>,
    /// The SSRC the packets carry (the last one).
    pub ssrc: u32,
    /// How often the SSRC changed (continuity is restarted each time, not counted as a gap).
    pub ssrc_changes: u64,
}

impl TrackStats {
    fn record(&mut self, mid: &str, pkt: &RtpPacket, is_video: bool, now: Instant) {
        let seq = *pkt.seq_no;
        let ssrc = *pkt.header.ssrc;
        if self.packets > 0 && ssrc != self.ssrc {
            self.ssrc_changes += 1;
            self.last_seq = None;
        }
        self.ssrc = ssrc;
        if self.mid != mid {
            self.mid = mid.to_owned();
        }
        self.packets += 1;
        self.bytes += pkt.payload.len() as u64;
        self.first_packet_at.get_or_insert(now);
        self.last_packet_at = Some(now);
        self.first_seq.get_or_insert(seq);
        match self.last_seq {
            None => self.last_seq = Some(seq),
            Some(last) if seq > last => {
                let missing = seq - last - 1;
                self.gaps += missing;
                if !is_video || self.keyframes > 0 {
                    self.gaps_after_keyframe += missing;
                }
                self.last_seq = Some(seq);
            }
            Some(_) => self.late_or_duplicate += 1,
        }
        if is_video && detect_vp8_keyframe(&pkt.payload) {
            self.keyframes += 1;
            self.first_keyframe_at.get_or_insert(now);
        }
    }
}

/// What one peer sent on one of its tracks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentStats {
    /// RTP packets written.
    pub packets: u64,
    /// RTP payload bytes written.
    pub bytes: u64,
    /// Video frames (or audio packets) written.
    pub frames: u64,
    /// Keyframes written.
    pub keyframes: u64,
    /// Keyframe requests received for this track.
    pub keyframe_requests: u64,
    /// Writes skipped because str0m had no send stream for the mid yet.
    pub skipped: u64,
}

/// A message the peer wants to hand to the router's signaling input.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerSignal {
    /// A typed message (goes to `Router::handle_signal`).
    Message(ClientMessage),
    /// Raw text (goes to `Router::handle_signal_json`), for malformed-input tests.
    Json(String),
}

/// A datagram the peer wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTransmit {
    /// UDP, or one ICE-TCP frame (without the RFC 4571 length prefix: the world adds it).
    pub proto: Proto,
    /// The peer's own address.
    pub source: SocketAddr,
    /// Where it goes (the router's candidate).
    pub destination: SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// A change to what the peer publishes, waiting for the current offer to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalChange {
    StartScreen,
    Stop(TrackSource),
}

/// One published track and its synthetic encoder.
#[derive(Debug)]
struct Publisher {
    source: TrackSource,
    /// Set when the m-line is added to an offer.
    mid: Option<Mid>,
    next_at: Option<Instant>,
    seq: u64,
    rtp_time: u32,
    keyframe_interval: Duration,
    last_keyframe_at: Option<Instant>,
    force_keyframe: bool,
    stopped: bool,
    sent: SentStats,
}

impl Publisher {
    fn new(source: TrackSource, keyframe_interval: Duration, rng: &mut fastrand::Rng) -> Self {
        Publisher {
            source,
            mid: None,
            next_at: None,
            // A random start, low enough to stay at SRTP rollover counter 0.
            seq: rng.u64(1000..30_000),
            rtp_time: rng.u32(..),
            keyframe_interval,
            last_keyframe_at: None,
            force_keyframe: true,
            stopped: false,
            sent: SentStats::default(),
        }
    }

    fn is_video(&self) -> bool {
        !self.source.is_audio()
    }

    fn interval(&self) -> Duration {
        if self.is_video() {
            VIDEO_INTERVAL
        } else {
            AUDIO_INTERVAL
        }
    }
}

/// A simulated participant. See the [module docs](self).
#[derive(Debug)]
pub struct SimPeer {
    session: SessionId,
    user: UserId,
    addr: SocketAddr,
    transport: Transport,
    rtc: Rtc,
    rng: fastrand::Rng,
    publishers: Vec<Publisher>,
    pending_offer: Option<SdpPendingOffer>,
    queued_changes: VecDeque<LocalChange>,
    muted: bool,
    silent: bool,
    connected_at: Option<Instant>,
    ice_state: Option<IceConnectionState>,
    rtc_timeout: Option<Instant>,
    /// The last `handle_timeout`; a wake-up at or before it is pushed a millisecond later so a
    /// driver loop always advances.
    woken_at: Option<Instant>,
    dead: bool,
    outbox: Vec<PeerTransmit>,
    signals_out: Vec<PeerSignal>,
    tracks: Vec<TrackInfo>,
    received: BTreeMap<(SessionId, u8), TrackStats>,
    unattributed: BTreeMap<String, TrackStats>,
    ssrc_mids: BTreeMap<u32, Mid>,
    signal_log: VecDeque<ServerMessage>,
    signal_counts: BTreeMap<&'static str, u64>,
    participants_left: Vec<SessionId>,
    participants_joined: Vec<SessionId>,
    errors: Vec<(String, String)>,
    rtc_errors: Vec<String>,
    offers_received: u64,
    offers_ignored: u64,
    offers_sent: u64,
    answers_received: u64,
    answers_sent: u64,
    keyframe_requests: u64,
    remote_ufrag: Option<String>,
    remote_media_lines: usize,
}

/// The `a=ice-ufrag` and the number of `m=` lines of an SDP.
fn sdp_summary(sdp: &str) -> (Option<String>, usize) {
    let ufrag = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .map(|u| u.trim().to_owned());
    let media_lines = sdp.lines().filter(|l| l.starts_with("m=")).count();
    (ufrag, media_lines)
}

fn source_rank(source: TrackSource) -> u8 {
    match source {
        TrackSource::Microphone => 0,
        TrackSource::Camera => 1,
        TrackSource::Screen => 2,
    }
}

fn message_kind(msg: &ServerMessage) -> &'static str {
    match msg {
        ServerMessage::Answer { .. } => "answer",
        ServerMessage::Offer { .. } => "offer",
        ServerMessage::Tracks { .. } => "tracks",
        ServerMessage::ParticipantJoined { .. } => "participant_joined",
        ServerMessage::ParticipantLeft { .. } => "participant_left",
        ServerMessage::Muted { .. } => "muted",
        ServerMessage::Screen { .. } => "screen",
        ServerMessage::Layers { .. } => "layers",
        ServerMessage::Speaker { .. } => "speaker",
        ServerMessage::Error { .. } => "error",
    }
}

impl SimPeer {
    /// Creates a peer at `addr` with a host candidate there (UDP, or active TCP for
    /// [`Transport::Tcp`]). Nothing is sent until [`SimPeer::start`].
    pub fn new(
        session: SessionId,
        user: UserId,
        addr: SocketAddr,
        options: &PeerOptions,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut rtc = Rtc::builder().set_rtp_mode(true).build(now);
        let candidate = match options.transport {
            Transport::Udp => Candidate::host(addr, "udp"),
            Transport::Tcp => Candidate::builder()
                .tcp()
                .host(addr)
                .tcptype(TcpType::Active)
                .build(),
        };
        match candidate {
            Ok(c) => {
                rtc.add_local_candidate(c);
            }
            Err(e) => panic!("sim peer address {addr} is no host candidate: {e}"),
        }
        let mut peer = SimPeer {
            session,
            user,
            addr,
            transport: options.transport,
            rtc,
            rng: fastrand::Rng::with_seed(seed),
            publishers: Vec::new(),
            pending_offer: None,
            queued_changes: VecDeque::new(),
            muted: false,
            silent: false,
            connected_at: None,
            ice_state: None,
            rtc_timeout: None,
            woken_at: None,
            dead: false,
            outbox: Vec::new(),
            signals_out: Vec::new(),
            tracks: Vec::new(),
            received: BTreeMap::new(),
            unattributed: BTreeMap::new(),
            ssrc_mids: BTreeMap::new(),
            signal_log: VecDeque::new(),
            signal_counts: BTreeMap::new(),
            participants_left: Vec::new(),
            participants_joined: Vec::new(),
            errors: Vec::new(),
            rtc_errors: Vec::new(),
            offers_received: 0,
            offers_ignored: 0,
            offers_sent: 0,
            answers_received: 0,
            answers_sent: 0,
            keyframe_requests: 0,
            remote_ufrag: None,
            remote_media_lines: 0,
        };
        for source in [
            (options.audio, TrackSource::Microphone),
            (options.video, TrackSource::Camera),
            (options.screen, TrackSource::Screen),
        ]
        .into_iter()
        .filter_map(|(on, source)| on.then_some(source))
        {
            let publisher = Publisher::new(source, options.keyframe_interval, &mut peer.rng);
            peer.publishers.push(publisher);
        }
        peer
    }

    /// Sends the first offer (everything the peer publishes). A peer that publishes nothing
    /// offers one receive-only audio m-line, as a browser viewer does with
    /// `addTransceiver('audio', {direction: 'recvonly'})`, so ICE and DTLS start.
    pub fn start(&mut self, now: Instant) {
        let mut api = self.rtc.sdp_api();
        if self.publishers.is_empty() {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        for p in &mut self.publishers {
            let kind = if p.is_video() {
                MediaKind::Video
            } else {
                MediaKind::Audio
            };
            p.mid = Some(api.add_media(kind, Direction::SendOnly, None, None, None));
        }
        if let Some(applied) = api.apply() {
            self.send_offer(applied);
        }
        self.pump(now);
    }

    /// Sends an offer (naming the screen m-line, if any) and waits for its answer.
    fn send_offer(&mut self, (offer, pending): (SdpOffer, SdpPendingOffer)) {
        self.pending_offer = Some(pending);
        self.offers_sent += 1;
        let screen_mid = self.mid_of(TrackSource::Screen).map(|m| m.to_string());
        self.signals_out
            .push(PeerSignal::Message(ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                screen_mid,
            }));
    }

    /// The router session this peer is.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The user behind it.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The peer's address (its UDP socket, or the local end of its ICE-TCP connection).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How the peer reaches the router.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// When ICE and DTLS came up, if they did.
    pub fn connected_at(&self) -> Option<Instant> {
        self.connected_at
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.connected_at.is_some() && !self.dead
    }

    /// The last ICE connection state str0m reported.
    pub fn ice_state(&self) -> Option<IceConnectionState> {
        self.ice_state
    }

    /// Whether our own offer waits for the router's answer.
    pub fn has_pending_offer(&self) -> bool {
        self.pending_offer.is_some()
    }

    /// The local mid that carries a published source.
    pub fn mid_of(&self, source: TrackSource) -> Option<Mid> {
        self.publishers
            .iter()
            .find(|p| p.source == source && !p.stopped)
            .and_then(|p| p.mid)
    }

    /// The latest `Tracks` message: which of our mids carries whose track.
    pub fn tracks(&self) -> &[TrackInfo] {
        &self.tracks
    }

    /// What we received of `publisher`'s `source` track.
    pub fn received_from(&self, publisher: SessionId, source: TrackSource) -> Option<&TrackStats> {
        self.received.get(&(publisher, source_rank(source)))
    }

    /// Every attributed track we received from, as (publisher, source, stats).
    pub fn received(&self) -> impl Iterator<Item = (SessionId, TrackSource, &TrackStats)> {
        self.received.iter().map(|(&(s, rank), stats)| {
            let source = match rank {
                0 => TrackSource::Microphone,
                1 => TrackSource::Camera,
                _ => TrackSource::Screen,
            };
            (s, source, stats)
        })
    }

    /// Packets that arrived on mids no `Tracks` message explained, by mid.
    pub fn unattributed(&self) -> &BTreeMap<String, TrackStats> {
        &self.unattributed
    }

    /// Total RTP packets received (attributed or not).
    pub fn packets_received(&self) -> u64 {
        self.received.values().map(|s| s.packets).sum::<u64>()
            + self.unattributed.values().map(|s| s.packets).sum::<u64>()
    }

    /// What we sent on `source`.
    pub fn sent(&self, source: TrackSource) -> SentStats {
        self.publishers.iter().filter(|p| p.source == source).fold(
            SentStats::default(),
            |mut acc, p| {
                acc.packets += p.sent.packets;
                acc.bytes += p.sent.bytes;
                acc.frames += p.sent.frames;
                acc.keyframes += p.sent.keyframes;
                acc.keyframe_requests += p.sent.keyframe_requests;
                acc.skipped += p.sent.skipped;
                acc
            },
        )
    }

    /// The last server messages (bounded), oldest first.
    pub fn signal_log(&self) -> impl Iterator<Item = &ServerMessage> {
        self.signal_log.iter()
    }

    /// How many server messages of a kind arrived (`"offer"`, `"answer"`, `"tracks"`,
    /// `"participant_joined"`, `"participant_left"`, `"muted"`, `"screen"`, `"error"`).
    pub fn signal_count(&self, kind: &str) -> u64 {
        self.signal_counts.get(kind).copied().unwrap_or(0)
    }

    /// Sessions announced as left.
    pub fn participants_left(&self) -> &[SessionId] {
        &self.participants_left
    }

    /// Sessions announced as joined.
    pub fn participants_joined(&self) -> &[SessionId] {
        &self.participants_joined
    }

    /// `ServerMessage::Error`s received, as (code, message).
    pub fn errors(&self) -> &[(String, String)] {
        &self.errors
    }

    /// Problems str0m reported (refused SDP, …), as text.
    pub fn rtc_errors(&self) -> &[String] {
        &self.rtc_errors
    }

    /// Router offers received / ignored because of glare / our offers sent / answers received /
    /// answers sent.
    pub fn negotiation_counts(&self) -> NegotiationCounts {
        NegotiationCounts {
            offers_received: self.offers_received,
            offers_ignored: self.offers_ignored,
            offers_sent: self.offers_sent,
            answers_received: self.answers_received,
            answers_sent: self.answers_sent,
        }
    }

    /// Keyframe requests received for any of our video tracks.
    pub fn keyframe_requests(&self) -> u64 {
        self.keyframe_requests
    }

    /// The router's ICE ufrag for this session, from its last SDP.
    pub fn remote_ice_ufrag(&self) -> Option<&str> {
        self.remote_ufrag.as_deref()
    }

    /// How many m-lines the router's last SDP (offer or answer) had.
    pub fn remote_media_lines(&self) -> usize {
        self.remote_media_lines
    }

    /// Whether we currently tell the router our microphone is muted.
    pub fn is_muted(&self) -> bool {
        self.muted
    }

    /// Mutes or unmutes the microphone: sends `Mute`/`Unmute`. Like a browser with a disabled
    /// track, the peer keeps sending (silent) audio; the router decides what to forward.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
        let msg = if muted {
            ClientMessage::Mute
        } else {
            ClientMessage::Unmute
        };
        self.signals_out.push(PeerSignal::Message(msg));
    }

    /// Speaks or stays silent without muting: a silent microphone keeps sending packets with
    /// audio level -127 dBov and no voice activity (a participant who listens, unmuted).
    pub fn set_silent(&mut self, silent: bool) {
        self.silent = silent;
    }

    /// Starts a screen share: adds a sendonly video m-line and re-offers (after the current
    /// offer is answered, if one is outstanding).
    pub fn start_screen(&mut self, now: Instant) {
        self.queued_changes.push_back(LocalChange::StartScreen);
        self.apply_queued_change(now);
    }

    /// Stops publishing `source`: its m-line goes inactive and the peer re-offers.
    pub fn stop_publishing(&mut self, source: TrackSource, now: Instant) {
        self.queued_changes.push_back(LocalChange::Stop(source));
        self.apply_queued_change(now);
    }

    /// Sends raw text on the signaling channel (for malformed-input tests).
    pub fn send_raw_signal(&mut self, text: impl Into<String>) {
        self.signals_out.push(PeerSignal::Json(text.into()));
    }

    /// Sends a typed message on the signaling channel as is.
    pub fn send_signal(&mut self, msg: ClientMessage) {
        self.signals_out.push(PeerSignal::Message(msg));
    }

    /// Datagrams to send, oldest first.
    pub fn take_transmits(&mut self) -> Vec<PeerTransmit> {
        std::mem::take(&mut self.outbox)
    }

    /// Signaling messages to send, oldest first.
    pub fn take_signals(&mut self) -> Vec<PeerSignal> {
        std::mem::take(&mut self.signals_out)
    }

    /// The next time the peer wants [`SimPeer::handle_timeout`]: str0m's timeout or the next
    /// media frame.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.dead {
            return None;
        }
        let media = self.publishers.iter().filter_map(|p| p.next_at).min();
        let next = match (self.rtc_timeout, media) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        match self.woken_at {
            Some(w) if next <= w => Some(w + Duration::from_millis(1)),
            _ => Some(next),
        }
    }

    /// A UDP datagram arrived from `source`.
    pub fn handle_datagram(&mut self, source: SocketAddr, contents: &[u8], now: Instant) {
        self.handle_receive(Proto::Udp, source, contents, now);
    }

    /// A UDP datagram, or one complete ICE-TCP frame (length prefix removed), arrived from
    /// `source`.
    pub fn handle_receive(
        &mut self,
        proto: Proto,
        source: SocketAddr,
        contents: &[u8],
        now: Instant,
    ) {
        if self.dead {
            return;
        }
        let Ok(receive) = Receive::new(proto.into(), source, self.addr, contents) else {
            return;
        };
        if let Err(e) = self.rtc.handle_input(Input::Receive(now, receive)) {
            self.rtc_errors.push(format!("receive: {e}"));
        }
        self.drain(now);
    }

    /// Time passed: send due media, then let str0m run its timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        self.woken_at = Some(now);
        self.send_due_media(now);
        self.pump(now);
    }

    /// A message from the router's signaling channel.
    pub fn handle_signal(&mut self, msg: ServerMessage, now: Instant) {
        *self.signal_counts.entry(message_kind(&msg)).or_insert(0) += 1;
        if let ServerMessage::Offer { sdp } | ServerMessage::Answer { sdp } = &msg {
            let (ufrag, media_lines) = sdp_summary(sdp);
            self.remote_ufrag = ufrag.or(self.remote_ufrag.take());
            self.remote_media_lines = media_lines;
        }
        match &msg {
            ServerMessage::Answer { sdp } => self.accept_answer(sdp, now),
            ServerMessage::Offer { sdp } => self.accept_offer(sdp, now),
            ServerMessage::Tracks { tracks } => self.tracks = tracks.clone(),
            ServerMessage::ParticipantJoined { session, .. } => {
                self.participants_joined.push(*session)
            }
            ServerMessage::ParticipantLeft { session, .. } => self.participants_left.push(*session),
            ServerMessage::Error { code, message } => {
                self.errors.push((code.clone(), message.clone()))
            }
            _ => {}
        }
        // Keep the log small: SDP bodies of a thousand renegotiations add up.
        let logged = match msg {
            ServerMessage::Offer { .. } => ServerMessage::Offer { sdp: String::new() },
            ServerMessage::Answer { .. } => ServerMessage::Answer { sdp: String::new() },
            other => other,
        };
        if self.signal_log.len() == SIGNAL_LOG_LEN {
            self.signal_log.pop_front();
        }
        self.signal_log.push_back(logged);
        self.pump(now);
    }

    /// Closes the peer's `Rtc` (as a closed browser tab would); it sends nothing afterwards.
    pub fn close(&mut self) {
        self.rtc.disconnect();
        self.dead = true;
        self.outbox.clear();
    }

    fn accept_answer(&mut self, sdp: &str, now: Instant) {
        self.answers_received += 1;
        let Some(pending) = self.pending_offer.take() else {
            self.rtc_errors
                .push("answer without an offer of ours".into());
            return;
        };
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => {
                self.rtc_errors
                    .push(format!("router answer does not parse: {e}"));
                return;
            }
        };
        if let Err(e) = self.rtc.sdp_api().accept_answer(pending, answer) {
            self.rtc_errors.push(format!("router answer refused: {e}"));
            return;
        }
        self.start_new_publishers(now);
        self.apply_queued_change(now);
    }

    fn accept_offer(&mut self, sdp: &str, now: Instant) {
        self.offers_received += 1;
        if self.pending_offer.is_some() {
            // Impolite side of perfect negotiation: our offer wins; the router re-offers later.
            self.offers_ignored += 1;
            return;
        }
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => {
                self.rtc_errors
                    .push(format!("router offer does not parse: {e}"));
                return;
            }
        };
        match self.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                self.answers_sent += 1;
                self.signals_out
                    .push(PeerSignal::Message(ClientMessage::Answer {
                        sdp: answer.to_sdp_string(),
                    }));
            }
            Err(e) => self.rtc_errors.push(format!("router offer refused: {e}")),
        }
        let _ = now;
    }

    fn apply_queued_change(&mut self, now: Instant) {
        if self.pending_offer.is_some() {
            return;
        }
        let Some(change) = self.queued_changes.pop_front() else {
            return;
        };
        let mut api = self.rtc.sdp_api();
        let mut new_publisher = None;
        match change {
            LocalChange::StartScreen => {
                let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
                let keyframe_interval = self
                    .publishers
                    .iter()
                    .find(|p| p.is_video())
                    .map(|p| p.keyframe_interval)
                    .unwrap_or(Duration::from_secs(3));
                let mut p = Publisher::new(TrackSource::Screen, keyframe_interval, &mut self.rng);
                p.mid = Some(mid);
                new_publisher = Some(p);
            }
            LocalChange::Stop(source) => {
                for p in self
                    .publishers
                    .iter_mut()
                    .filter(|p| p.source == source && !p.stopped)
                {
                    if let Some(mid) = p.mid {
                        api.set_direction(mid, Direction::Inactive);
                    }
                    p.stopped = true;
                    p.next_at = None;
                }
            }
        }
        let applied = api.apply();
        self.publishers.extend(new_publisher);
        if let Some(applied) = applied {
            self.send_offer(applied);
        }
        self.pump(now);
    }

    /// Starts the media clock of publishers whose m-line is negotiated, once connected.
    fn start_new_publishers(&mut self, now: Instant) {
        if self.connected_at.is_none() {
            return;
        }
        for p in &mut self.publishers {
            if p.next_at.is_none() && p.mid.is_some() && !p.stopped && p.sent.frames == 0 {
                p.next_at = Some(now);
            }
        }
    }

    fn payload_type(&self, mid: Mid, codec: Codec) -> Option<Pt> {
        let remote = self.rtc.media(mid)?.remote_pts();
        self.rtc
            .codec_config()
            .params()
            .iter()
            .filter(|p| p.spec().codec == codec)
            .map(|p| p.pt())
            .find(|pt| remote.is_empty() || remote.contains(pt))
    }

    fn send_due_media(&mut self, now: Instant) {
        let mut wrote = false;
        for i in 0..self.publishers.len() {
            while let Some(at) = self.publishers[i].next_at {
                if at > now {
                    break;
                }
                let interval = self.publishers[i].interval();
                self.publishers[i].next_at = Some(at + interval);
                wrote |= self.write_frame(i, now);
            }
        }
        if wrote {
            // STR0M-NOTES: writes go out only on the next input.
            if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
                self.rtc_errors.push(format!("timeout: {e}"));
            }
        }
    }

    /// Writes one audio packet or one video frame of publisher `i`. Returns whether anything
    /// was written.
    fn write_frame(&mut self, i: usize, now: Instant) -> bool {
        let is_video = self.publishers[i].is_video();
        let Some(mid) = self.publishers[i].mid else {
            return false;
        };
        let codec = if is_video { Codec::Vp8 } else { Codec::Opus };
        let Some(pt) = self.payload_type(mid, codec) else {
            self.publishers[i].sent.skipped += 1;
            return false;
        };
        let packets: Vec<(Vec<u8>, bool)> = if is_video {
            let p = &mut self.publishers[i];
            let due = p
                .last_keyframe_at
                .is_none_or(|t| now.saturating_duration_since(t) >= p.keyframe_interval);
            let keyframe = p.force_keyframe || due;
            if keyframe {
                p.force_keyframe = false;
                p.last_keyframe_at = Some(now);
            }
            let count = if keyframe {
                KEYFRAME_PACKETS
            } else {
                self.rng.usize(1..=3)
            };
            (0..count)
                .map(|n| {
                    let len = if keyframe {
                        1100
                    } else {
                        self.rng.usize(600..=1100)
                    };
                    let mut payload = vec![0xA5u8; len];
                    // RFC 7741 §4.2: payload descriptor, S=1 PID=0 on the first packet only.
                    payload[0] = if n == 0 { 0x10 } else { 0x00 };
                    // RFC 7741 §4.3: VP8 payload header; lowest bit P is 0 for a keyframe.
                    payload[1] = if keyframe { 0x10 } else { 0x11 };
                    (payload, n + 1 == count)
                })
                .collect()
        } else {
            let len = self.rng.usize(60..=120);
            // An Opus TOC byte (SILK/CELT config is irrelevant to the router).
            let mut payload = vec![0x5Au8; len];
            payload[0] = 0x78;
            vec![(payload, false)]
        };
        let audio_level = if self.muted || self.silent {
            -127
        } else {
            -(self.rng.i8(20..50))
        };
        let ext_vals = if is_video {
            ExtensionValues::default()
        } else {
            ExtensionValues {
                audio_level: Some(audio_level),
                voice_activity: Some(!(self.muted || self.silent)),
                ..ExtensionValues::default()
            }
        };

        let p = &mut self.publishers[i];
        let mut direct = self.rtc.direct_api();
        let Some(stream) = direct.stream_tx_by_mid(mid, None) else {
            p.sent.skipped += 1;
            return false;
        };
        let keyframe = is_video && packets.first().is_some_and(|(b, _)| b[1] & 0x01 == 0);
        for (payload, marker) in packets {
            p.sent.packets += 1;
            p.sent.bytes += payload.len() as u64;
            stream.write_rtp(
                RtpWrite::new(pt, p.seq.into(), p.rtp_time, now, payload)
                    .marker(marker)
                    .ext_vals(ext_vals.clone())
                    .nackable(is_video),
            );
            p.seq += 1;
        }
        p.sent.frames += 1;
        if keyframe {
            p.sent.keyframes += 1;
        }
        p.rtp_time = p
            .rtp_time
            .wrapping_add(if is_video { VIDEO_TICKS } else { AUDIO_TICKS });
        true
    }

    fn on_keyframe_request(&mut self, req: KeyframeRequest, now: Instant) {
        self.keyframe_requests += 1;
        let Some(p) = self
            .publishers
            .iter_mut()
            .find(|p| p.mid == Some(req.mid) && p.is_video() && !p.stopped)
        else {
            return;
        };
        p.sent.keyframe_requests += 1;
        let throttled = p
            .last_keyframe_at
            .is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_REQUEST_THROTTLE);
        if !throttled && p.next_at.is_some() {
            p.force_keyframe = true;
            p.next_at = Some(now);
        }
    }

    fn on_rtp(&mut self, pkt: RtpPacket, now: Instant) {
        let ssrc = *pkt.header.ssrc;
        let mid = match self.ssrc_mids.get(&ssrc) {
            Some(mid) => *mid,
            None => {
                let Some(mid) = self
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| s.mid())
                else {
                    return;
                };
                self.ssrc_mids.insert(ssrc, mid);
                mid
            }
        };
        let is_video = self
            .rtc
            .media(mid)
            .map(|m| m.kind() == MediaKind::Video)
            .unwrap_or(false);
        let mid_str = mid.to_string();
        let info = self.tracks.iter().find(|t| t.mid == mid_str);
        let stats = match info {
            Some(t) => self
                .received
                .entry((t.session, source_rank(t.source)))
                .or_default(),
            None => self.unattributed.entry(mid_str.clone()).or_default(),
        };
        stats.record(&mid_str, &pkt, is_video, now);
    }

    /// One `Timeout` input, then drain.
    fn pump(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
            self.rtc_errors.push(format!("timeout: {e}"));
        }
        self.drain(now);
    }

    /// Drains str0m until it asks for a timeout (STR0M-NOTES: after every input).
    fn drain(&mut self, now: Instant) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.rtc_timeout = Some(t);
                    break;
                }
                Ok(Output::Transmit(t)) => self.outbox.push(PeerTransmit {
                    proto: match t.proto {
                        Protocol::Udp => Proto::Udp,
                        _ => Proto::Tcp,
                    },
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.into(),
                }),
                Ok(Output::Event(e)) => self.on_event(e, now),
                Err(e) => {
                    self.rtc_errors.push(format!("poll: {e}"));
                    self.dead = true;
                    break;
                }
            }
        }
        if !self.rtc.is_alive() {
            self.dead = true;
        }
    }

    fn on_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Connected => {
                self.connected_at = Some(now);
                self.start_new_publishers(now);
            }
            Event::IceConnectionStateChange(state) => self.ice_state = Some(state),
            Event::RtpPacket(pkt) => self.on_rtp(pkt, now),
            Event::KeyframeRequest(req) => self.on_keyframe_request(req, now),
            _ => {}
        }
    }
}

/// How many offers and answers a peer exchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NegotiationCounts {
    /// Router offers received.
    pub offers_received: u64,
    /// Router offers ignored because our own offer was outstanding (glare).
    pub offers_ignored: u64,
    /// Offers we sent.
    pub offers_sent: u64,
    /// Answers we received.
    pub answers_received: u64,
    /// Answers we sent.
    pub answers_sent: u64,
}
