//! A simulated participant: a real str0m [`Rtc`] on the client side (full ICE, controlling, RTP
//! mode) that publishes synthetic Opus and VP8, negotiates with the router through typed
//! signaling messages, and keeps statistics of every RTP packet it receives.
//!
//! A peer does no I/O. It is driven by [`SimWorld`](super::SimWorld) (or a test) through
//! [`SimPeer::handle_datagram`], [`SimPeer::handle_signal`] and [`SimPeer::handle_timeout`], and
//! leaves what it wants to send in an outbox ([`SimPeer::take_transmits`],
//! [`SimPeer::take_signals`]).
//!
//! # What a peer publishes ([`PeerOptions`])
//!
//! - `audio`: Opus, one 60–120-byte packet per 20 ms, with RFC 6464 audio levels. Each
//!   payload carries the publisher's own sequence number and RTP time after the TOC
//!   ([`super::encoder`]), and the LBRR (in-band FEC) flag with `opus_fec`. With `red`
//!   ([`PeerOptions::with_red`]) the peer offers `red/48000/2` and, where it was negotiated,
//!   sends every packet as RFC 2198 RED: the previous packet as the redundant block (timestamp
//!   offset 960), this one as the primary.
//! - `video` (camera) and `screen`: VP8 with an RFC 7741 payload descriptor on every packet
//!   (see [`super::encoder`]): a 15-bit PictureID, and with `temporal_layers` = 3 (the default
//!   with simulcast) TL0PICIDX and TID in the L1T3 pattern 0,2,1,2 (keyframes are TID0); with
//!   `temporal_layers` = 1 (the default without simulcast) only the PictureID. The last payload byte is the spatial layer index
//!   and the one before it the TID, so receivers can tell what they got.
//! - `simulcast` ([`PeerOptions::with_simulcast`]): the camera is offered with
//!   `a=simulcast:send q;h;f` (≈150 kbit/s, 500 kbit/s, 1.5 Mbit/s, 30 fps) and a screen share
//!   with `h;f` (≈300 kbit/s, 1.2 Mbit/s, 15 fps) — [`super::encoder::simulcast_layers`]. Each
//!   layer is its own RTP stream (SSRC, sequence numbers, RTP time, PictureID) written with
//!   `direct_api().stream_tx_by_mid(mid, Some(rid))`, with its own keyframes. Without
//!   simulcast a video track is one stream at 30 fps with the harness's original frame sizes.
//!
//! # How a peer reacts
//!
//! - A keyframe request (PLI/FIR) forces a keyframe on the layer it names (all layers when it
//!   names none), at most one per layer per 100 ms.
//! - Dynacast, `ServerMessage::Layers { mid, active }`: layers of that m-line not in `active`
//!   stop being written; a layer that comes back starts with a keyframe. For a single-layer
//!   track an empty `active` pauses it and any other list resumes it. Every message is logged
//!   ([`SimPeer::layers_log`]).
//!
//! # What a peer measures
//!
//! Per publisher track ([`TrackStats`]): packets, sequence gaps and holes never filled
//! (`missing`), keyframes, and for video frames per spatial and temporal layer, layer switches,
//! the longest time without a frame (freezes), PictureID / TL0PICIDX discontinuities and the
//! frame rate over a trailing window ([`TrackStats::fps_over`]). Per own track and layer what
//! was sent ([`SimPeer::sent`], [`SimPeer::sent_layer`]).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, FormatParams};
use str0m::media::{
    Direction, Frequency, KeyframeRequest, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RedEncoder, RedundantBlock, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::ids::{SessionId, TrackSource, UserId};
use crate::signal::{ClientMessage, ServerMessage};
use crate::Proto;

use super::encoder::{
    frames_per_interval, keyframe_due, opus_payload, simulcast_frame_interval, simulcast_layers,
    stamp_sent_at, tag_source, Frame, Vp8Encoder,
};
use super::receiver::{session_tag, Attribution, DelayHistogram, SlotMap, TrackStats};

/// Audio packet interval (Opus 20 ms frames).
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Video frame interval (30 fps).
const VIDEO_INTERVAL: Duration = Duration::from_nanos(33_333_333);
/// Opus RTP clock ticks per 20 ms frame at 48 kHz.
const AUDIO_TICKS: u32 = 960;
/// VP8 RTP clock rate.
const VIDEO_CLOCK_RATE: f64 = 90_000.0;
/// Least time between two keyframes sent because of keyframe requests.
const KEYFRAME_REQUEST_THROTTLE: Duration = Duration::from_millis(100);
/// Server messages kept in [`SimPeer::signal_log`].
const SIGNAL_LOG_LEN: usize = 256;
/// `Layers` messages kept in [`SimPeer::layers_log`].
const LAYERS_LOG_LEN: usize = 4096;
/// Seed salt of the synthetic encoders' RNG, which is separate from the peer's main RNG so a
/// peer without simulcast draws exactly the numbers it always did.
const ENCODER_SEED_SALT: u64 = 0xD1B5_4A32_D192_ED03;

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
    /// Send the camera as three simulcast layers `q`, `h`, `f` and a screen share as `h`, `f`
    /// (see the [module docs](self)); default off: one stream per video track.
    pub simulcast: bool,
    /// VP8 temporal layers per video stream: 1 (every frame TID0; the default), or 3 (the L1T3
    /// pattern 0,2,1,2 with TL0PICIDX and TID in the payload descriptor; the default set by
    /// [`PeerOptions::with_simulcast`], as browsers send VP8 simulcast).
    pub temporal_layers: u8,
    /// Offer Opus RED (`red/48000/2`, RFC 2198) and send audio as RED where negotiated, as
    /// Chromium does. Default off: plain Opus, as Firefox and aiortc.
    pub red: bool,
    /// Mark every Opus packet as carrying in-band FEC (the LBRR flag). Default off.
    pub opus_fec: bool,
    /// Offer Opus on this payload type instead of str0m's 111 (Firefox uses 109); `None`
    /// keeps the default. Not with `red` (str0m numbers RED itself).
    pub opus_pt: Option<u8>,
    /// With `red`: every n-th RED packet (by sequence number) lies about its redundant block's
    /// length (1023 bytes, past the packet's end), as a broken or hostile client might.
    pub red_lie_every: Option<u64>,
    /// Honour `usedtx=1` in the router's answer, as Chromium does: while muted or silent the
    /// microphone sends one packet per 400 ms (Opus DTX) instead of one per 20 ms. Default on.
    pub dtx: bool,
    /// A time origin this peer shares with the peers it hears and that hear it. With it, each
    /// Opus payload carries its send time (µs since the origin) and a receiver records how
    /// long every audio packet took to reach it ([`TrackStats::audio_delay`]). Only
    /// meaningful in one process (the simulation, the load tester's swarm); [`SimWorld`]
    /// sets its start time on peers that have none. Default `None`: no send times.
    ///
    /// [`SimWorld`]: super::SimWorld
    pub clock_origin: Option<Instant>,
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
            simulcast: false,
            temporal_layers: 1,
            red: false,
            opus_fec: false,
            opus_pt: None,
            red_lie_every: None,
            dtx: true,
            clock_origin: None,
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

    /// Sends video as simulcast: camera layers `q`, `h`, `f`, screen layers `h`, `f`, each
    /// with three temporal layers (change with [`PeerOptions::temporal_layers`] afterwards).
    pub fn with_simulcast(mut self) -> Self {
        self.simulcast = true;
        self.temporal_layers = 3;
        self
    }

    /// Offers Opus RED and sends audio as RED where it was negotiated.
    pub fn with_red(mut self) -> Self {
        self.red = true;
        self
    }

    /// Offers Opus on payload type `pt` (see [`PeerOptions::opus_pt`]).
    pub fn opus_pt(mut self, pt: u8) -> Self {
        self.opus_pt = Some(pt);
        self
    }

    /// Ignores `usedtx=1` in the router's answer: a muted or silent microphone keeps sending
    /// a packet every 20 ms (a client without DTX).
    pub fn without_dtx(mut self) -> Self {
        self.dtx = false;
        self
    }

    /// Marks every Opus packet as carrying in-band FEC.
    pub fn with_opus_fec(mut self) -> Self {
        self.opus_fec = true;
        self
    }

    /// Sets the VP8 temporal layers per video stream. Panics unless `n` is 1 or 3.
    pub fn temporal_layers(mut self, n: u8) -> Self {
        assert!(n == 1 || n == 3, "temporal_layers is 1 or 3, not {n}");
        self.temporal_layers = n;
        self
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

impl SentStats {
    /// Adds `other`'s packets, bytes, frames, keyframes and skipped writes (not its keyframe
    /// requests, which callers count per track or per layer).
    fn add(&mut self, other: &SentStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.frames += other.frames;
        self.keyframes += other.keyframes;
        self.skipped += other.skipped;
    }
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

/// One RTP stream of a published track: a simulcast layer, or the track's only stream.
#[derive(Debug)]
struct Encoding {
    /// The VP8 encoder (video only).
    vp8: Option<Vp8Encoder>,
    rid: Option<Rid>,
    seq: u64,
    rtp_time: u32,
    last_keyframe_at: Option<Instant>,
    force_keyframe: bool,
    /// Dynacast: whether the router wants this stream now.
    active: bool,
    /// The publisher itself stopped this layer (as a browser drops its top layer when its
    /// uplink shrinks): nothing is sent whatever dynacast says.
    suspended: bool,
    sent: SentStats,
}

impl Encoding {
    fn new(vp8: Option<Vp8Encoder>, seq: u64, rtp_time: u32) -> Self {
        Encoding {
            rid: vp8.as_ref().and_then(|e| e.rid()),
            vp8,
            seq,
            rtp_time,
            last_keyframe_at: None,
            force_keyframe: true,
            active: true,
            suspended: false,
            sent: SentStats::default(),
        }
    }
}

/// One published track and its synthetic encoders.
#[derive(Debug)]
struct Publisher {
    source: TrackSource,
    /// Set when the m-line is added to an offer.
    mid: Option<Mid>,
    next_at: Option<Instant>,
    /// Time between frames (audio: packets).
    interval: Duration,
    /// RTP clock ticks per frame.
    ticks: u32,
    keyframe_interval: Duration,
    stopped: bool,
    /// Sent as simulcast layers (one [`Encoding`] per rid).
    simulcast: bool,
    encodings: Vec<Encoding>,
    /// Keyframe requests received for this track (whichever layer they named).
    keyframe_requests: u64,
    /// Audio: the previous Opus packet, the redundant block of the next RED packet.
    last_opus: Option<Vec<u8>>,
    /// Audio: frames in a row the microphone has been quiet (muted or silent), for DTX.
    quiet_frames: u32,
}

impl Publisher {
    /// A publisher of `source`. The first stream's sequence number and RTP time come from
    /// `rng` (as they always did); everything the encoders add comes from `encoder_rng`.
    fn new(
        source: TrackSource,
        options: &PeerOptions,
        rng: &mut fastrand::Rng,
        encoder_rng: &mut fastrand::Rng,
    ) -> Self {
        let is_video = !source.is_audio();
        // A random start, low enough to stay at SRTP rollover counter 0.
        let seq = rng.u64(1000..30_000);
        let rtp_time = rng.u32(..);
        let layers = if is_video && options.simulcast {
            simulcast_layers(source)
        } else {
            &[]
        };
        let encodings = if layers.is_empty() {
            let vp8 = is_video.then(|| Vp8Encoder::new(None, options.temporal_layers, encoder_rng));
            vec![Encoding::new(vp8, seq, rtp_time)]
        } else {
            layers
                .iter()
                .enumerate()
                .map(|(n, layer)| {
                    let (seq, rtp_time) = if n == 0 {
                        (seq, rtp_time)
                    } else {
                        (encoder_rng.u64(1000..30_000), encoder_rng.u32(..))
                    };
                    let vp8 = Vp8Encoder::new(Some(*layer), options.temporal_layers, encoder_rng);
                    Encoding::new(Some(vp8), seq, rtp_time)
                })
                .collect()
        };
        let interval = match (is_video, layers.is_empty()) {
            (false, _) => AUDIO_INTERVAL,
            (true, true) => VIDEO_INTERVAL,
            (true, false) => simulcast_frame_interval(source),
        };
        let ticks = if is_video {
            (interval.as_secs_f64() * VIDEO_CLOCK_RATE).round() as u32
        } else {
            AUDIO_TICKS
        };
        Publisher {
            source,
            mid: None,
            next_at: None,
            interval,
            ticks,
            keyframe_interval: options.keyframe_interval,
            stopped: false,
            simulcast: !layers.is_empty(),
            encodings,
            keyframe_requests: 0,
            last_opus: None,
            quiet_frames: 0,
        }
    }

    fn is_video(&self) -> bool {
        !self.source.is_audio()
    }

    /// The `a=simulcast` send layers to offer, low to high.
    fn simulcast_offer(&self) -> Option<Simulcast> {
        if !self.simulcast {
            return None;
        }
        let mut simulcast = Simulcast::new();
        for rid in self.encodings.iter().filter_map(|e| e.rid) {
            simulcast.add_send_layer(SimulcastLayer::new(&rid));
        }
        Some(simulcast)
    }

    fn frames_written(&self) -> u64 {
        self.encodings.iter().map(|e| e.sent.frames).sum()
    }
}

/// An incoming SSRC's m-line: its name (the mid as the slot map keys it) and kind.
#[derive(Debug)]
struct RxStream {
    name: String,
    video: bool,
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
    /// Draws of the synthetic encoders (separate so single-layer peers keep their numbers).
    encoder_rng: fastrand::Rng,
    /// What this peer publishes, and how (for tracks added later, such as a screen share).
    options: PeerOptions,
    publishers: Vec<Publisher>,
    pending_offer: Option<SdpPendingOffer>,
    queued_changes: VecDeque<LocalChange>,
    muted: bool,
    silent: bool,
    /// The router's answer asked for Opus DTX (`usedtx=1`); see [`PeerOptions::dtx`].
    dtx_asked: bool,
    connected_at: Option<Instant>,
    ice_state: Option<IceConnectionState>,
    rtc_timeout: Option<Instant>,
    /// The last `handle_timeout`; a wake-up at or before it is pushed a millisecond later so a
    /// driver loop always advances.
    woken_at: Option<Instant>,
    dead: bool,
    outbox: Vec<PeerTransmit>,
    signals_out: Vec<PeerSignal>,
    slots: SlotMap,
    received: BTreeMap<(SessionId, u8), TrackStats>,
    unattributed: BTreeMap<String, TrackStats>,
    /// What arrived on each receive slot, by mid, whoever it came from.
    slot_stats: BTreeMap<String, TrackStats>,
    /// Packets whose payload came from another publisher than the slot's mapping said.
    misattributed: u64,
    /// What each incoming SSRC arrives on, looked up once (per packet it was a walk over
    /// the m-lines and two string allocations: most of a load-test participant's own cost).
    ssrc_mids: BTreeMap<u32, RxStream>,
    signal_log: VecDeque<ServerMessage>,
    layers_log: Vec<(Instant, String, Vec<String>)>,
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
    /// The `fraction lost` (0.0–1.0) the last receiver report for each of our send streams
    /// said, by mid.
    reported_loss: BTreeMap<Mid, f32>,
    remote_ufrag: Option<String>,
    /// The router's ICE password for this session, from its last SDP.
    remote_pwd: Option<String>,
    remote_media_lines: usize,
}

/// The `a=ice-ufrag` and the number of `m=` lines of an SDP.
/// Opus DTX sends a frame every 400 ms while the input is silent: one 20 ms frame in 20.
const DTX_INTERVAL_FRAMES: u32 = 20;

/// Whether an SDP asks for Opus DTX: `usedtx=1` in the format parameters of a payload type
/// mapped to `opus/48000/2`.
fn opus_dtx_asked(sdp: &str) -> bool {
    let opus: Vec<&str> = sdp
        .lines()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("opus/"))
        .map(|(pt, _)| pt)
        .collect();
    sdp.lines()
        .filter_map(|l| l.strip_prefix("a=fmtp:"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(pt, _)| opus.contains(pt))
        .any(|(_, params)| params.split(';').any(|kv| kv.trim() == "usedtx=1"))
}

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
        let mut builder = Rtc::builder().set_rtp_mode(true);
        if options.red {
            builder = builder.enable_opus(true, true);
        }
        if let Some(pt) = options.opus_pt {
            let codecs = builder.codec_config();
            codecs.enable_opus(false, false);
            codecs.add_config(
                pt.into(),
                None,
                Codec::Opus,
                Frequency::FORTY_EIGHT_KHZ,
                Some(2),
                FormatParams {
                    min_p_time: Some(10),
                    use_inband_fec: Some(true),
                    ..FormatParams::default()
                },
            );
        }
        // Egress stats carry the `fraction lost` the router's receiver reports say.
        let mut rtc = builder
            .set_stats_interval(Some(Duration::from_secs(1)))
            .build(now);
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
            encoder_rng: fastrand::Rng::with_seed(seed ^ ENCODER_SEED_SALT),
            options: options.clone(),
            publishers: Vec::new(),
            pending_offer: None,
            queued_changes: VecDeque::new(),
            muted: false,
            silent: false,
            dtx_asked: false,
            connected_at: None,
            ice_state: None,
            rtc_timeout: None,
            woken_at: None,
            dead: false,
            outbox: Vec::new(),
            signals_out: Vec::new(),
            slots: SlotMap::default(),
            received: BTreeMap::new(),
            unattributed: BTreeMap::new(),
            slot_stats: BTreeMap::new(),
            misattributed: 0,
            ssrc_mids: BTreeMap::new(),
            signal_log: VecDeque::new(),
            layers_log: Vec::new(),
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
            reported_loss: BTreeMap::new(),
            remote_ufrag: None,
            remote_pwd: None,
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
            let publisher = Publisher::new(source, options, &mut peer.rng, &mut peer.encoder_rng);
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
            let simulcast = p.simulcast_offer();
            p.mid = Some(api.add_media(kind, Direction::SendOnly, None, None, simulcast));
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

    /// The slot mapping the router sent: which of our mids carries whose source.
    pub fn slots(&self) -> &SlotMap {
        &self.slots
    }

    /// What arrived on each receive slot (by mid), whoever it came from: one continuous stream
    /// per slot.
    pub fn slot_stats(&self) -> &BTreeMap<String, TrackStats> {
        &self.slot_stats
    }

    /// Packets whose payload (its source tag) came from another publisher than the slot
    /// mapping said at the time: the router forwarded a source before telling us.
    pub fn misattributed(&self) -> u64 {
        self.misattributed
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

    /// How long the audio this peer received took to reach it, over every publisher it heard
    /// ([`TrackStats::audio_delay`]; empty without a [`PeerOptions::clock_origin`]).
    pub fn audio_delay(&self) -> DelayHistogram {
        let mut all = DelayHistogram::default();
        for (_, source, stats) in self.received() {
            if source.is_audio() {
                all.merge(&stats.audio_delay);
            }
        }
        all
    }

    /// Packets that arrived on slots the mapping called empty (or never described), by mid.
    pub fn unattributed(&self) -> &BTreeMap<String, TrackStats> {
        &self.unattributed
    }

    /// Total RTP packets received (attributed or not).
    pub fn packets_received(&self) -> u64 {
        self.received.values().map(|s| s.packets).sum::<u64>()
            + self.unattributed.values().map(|s| s.packets).sum::<u64>()
    }

    /// What we sent on `source`, all simulcast layers together. `keyframe_requests` counts
    /// requests for the track, whichever layer they named.
    pub fn sent(&self, source: TrackSource) -> SentStats {
        let mut total = SentStats::default();
        for p in self.publishers.iter().filter(|p| p.source == source) {
            for e in &p.encodings {
                total.add(&e.sent);
            }
            total.keyframe_requests += p.keyframe_requests;
        }
        total
    }

    /// What we sent on simulcast layer `rid` of `source` (`""` names the only stream of a
    /// track sent without simulcast). `keyframe_requests` counts requests that named this
    /// layer or no layer.
    pub fn sent_layer(&self, source: TrackSource, rid: &str) -> SentStats {
        let mut total = SentStats::default();
        for p in self.publishers.iter().filter(|p| p.source == source) {
            for e in p
                .encodings
                .iter()
                .filter(|e| e.rid.as_deref().unwrap_or("") == rid)
            {
                total.add(&e.sent);
                total.keyframe_requests += e.sent.keyframe_requests;
            }
        }
        total
    }

    /// The `Layers` (dynacast) messages received, as (when, mid, active rids), oldest first;
    /// the latest 4096 are kept.
    pub fn layers_log(&self) -> &[(Instant, String, Vec<String>)] {
        &self.layers_log
    }

    /// The last server messages (bounded), oldest first.
    pub fn signal_log(&self) -> impl Iterator<Item = &ServerMessage> {
        self.signal_log.iter()
    }

    /// How many server messages of a kind arrived (`"offer"`, `"answer"`, `"tracks"`,
    /// `"participant_joined"`, `"participant_left"`, `"muted"`, `"screen"`, `"layers"`,
    /// `"speaker"`, `"error"`).
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

    /// The `fraction lost` (0.0–1.0) the router's last receiver report for our audio (the
    /// worst of our audio send streams) said, once one arrived.
    pub fn reported_audio_loss(&self) -> Option<f32> {
        self.reported_loss
            .iter()
            .filter(|(mid, _)| {
                self.rtc
                    .media(**mid)
                    .is_some_and(|m| m.kind() == MediaKind::Audio)
            })
            .map(|(_, loss)| *loss)
            .reduce(f32::max)
    }

    /// Keyframe requests received for any of our video tracks.
    pub fn keyframe_requests(&self) -> u64 {
        self.keyframe_requests
    }

    /// The router's ICE ufrag for this session, from its last SDP.
    pub fn remote_ice_ufrag(&self) -> Option<&str> {
        self.remote_ufrag.as_deref()
    }

    /// The router's ICE password for this session, from its last SDP: what a participant can
    /// sign binding requests with (the media-redirection test plays a rogue one).
    pub fn remote_ice_password(&self) -> Option<&str> {
        self.remote_pwd.as_deref()
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

    /// Stops (or restarts) simulcast layer `rid` of `source` by the publisher's own decision,
    /// whatever the router's dynacast asks: a browser whose uplink or CPU no longer carries
    /// its top layer. A restarted layer begins with a keyframe.
    pub fn suspend_layer(&mut self, source: TrackSource, rid: &str, suspended: bool) {
        for p in self.publishers.iter_mut().filter(|p| p.source == source) {
            for e in p
                .encodings
                .iter_mut()
                .filter(|e| e.rid.as_deref() == Some(rid))
            {
                if e.suspended && !suspended {
                    e.force_keyframe = true;
                }
                e.suspended = suspended;
            }
        }
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
        // Timers run when due (`poll_timeout`), not after every packet (vendored str0m patch
        // 0008): a load-test participant hears 50–100 packets a second.
        if let Err(e) = self.rtc.handle_receive(now, receive) {
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
        let wrote = self.send_due_media(now);
        // str0m's timers run when due; media written between them goes out with
        // `handle_written` (vendored str0m patch 0005). A muted microphone's frame clock ticks
        // 50 times a second and writes only its DTX frames.
        if self.rtc_timeout.is_none_or(|t| t <= now) {
            self.pump(now);
        } else if wrote {
            self.rtc.handle_written(now);
            self.drain(now);
        }
    }

    /// A message from the router's signaling channel.
    pub fn handle_signal(&mut self, msg: ServerMessage, now: Instant) {
        *self.signal_counts.entry(msg.kind()).or_insert(0) += 1;
        if let ServerMessage::Offer { sdp } | ServerMessage::Answer { sdp } = &msg {
            let (ufrag, media_lines) = sdp_summary(sdp);
            self.remote_ufrag = ufrag.or(self.remote_ufrag.take());
            let pwd = sdp
                .lines()
                .find_map(|l| l.trim().strip_prefix("a=ice-pwd:"))
                .map(|p| p.trim().to_owned());
            self.remote_pwd = pwd.or(self.remote_pwd.take());
            self.remote_media_lines = media_lines;
        }
        // Only an SDP exchange changes the `Rtc`; the rest (roster, slots, layers, speaker) is
        // bookkeeping, and str0m is not pumped for it: every join sends a few roster messages
        // to everyone in the call.
        let negotiates = matches!(
            msg,
            ServerMessage::Offer { .. } | ServerMessage::Answer { .. }
        );
        match &msg {
            ServerMessage::Answer { sdp } => self.accept_answer(sdp, now),
            ServerMessage::Offer { sdp } => self.accept_offer(sdp, now),
            ServerMessage::Slots { slots } => self.slots.apply(slots),
            ServerMessage::ParticipantJoined { session, .. } => {
                self.participants_joined.push(*session)
            }
            ServerMessage::Roster { participants } => self
                .participants_joined
                .extend(participants.iter().map(|p| p.session)),
            ServerMessage::ParticipantLeft { session, .. } => self.participants_left.push(*session),
            ServerMessage::Error { code, message } => {
                self.errors.push((code.clone(), message.clone()))
            }
            ServerMessage::Layers { mid, active } => self.on_layers(mid, active, now),
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
        if negotiates {
            self.pump(now);
        }
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
        self.dtx_asked = opus_dtx_asked(sdp);
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
                let mut p = Publisher::new(
                    TrackSource::Screen,
                    &self.options,
                    &mut self.rng,
                    &mut self.encoder_rng,
                );
                let simulcast = p.simulcast_offer();
                let mid =
                    api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast);
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
            if p.next_at.is_none() && p.mid.is_some() && !p.stopped && p.frames_written() == 0 {
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

    /// The RED payload type wrapping our Opus type `opus`, if the router accepted it (str0m
    /// keeps a RED type on the codec only when both sides named it).
    fn red_pt(&self, opus: Pt) -> Option<Pt> {
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.pt() == opus)
            .and_then(|p| p.red())
    }

    /// Writes the frames due by `now`. Returns whether anything was written (STR0M-NOTES:
    /// writes go out only on the next timeout, or `handle_written`).
    fn send_due_media(&mut self, now: Instant) -> bool {
        let mut wrote = false;
        for i in 0..self.publishers.len() {
            while let Some(at) = self.publishers[i].next_at {
                if at > now {
                    break;
                }
                let interval = self.publishers[i].interval;
                self.publishers[i].next_at = Some(at + interval);
                wrote |= self.write_frame(i, now);
            }
        }
        wrote
    }

    /// Writes one audio packet, or one video frame on each active layer, of publisher `i`.
    /// Returns whether anything was written.
    fn write_frame(&mut self, i: usize, now: Instant) -> bool {
        let is_video = self.publishers[i].is_video();
        let Some(mid) = self.publishers[i].mid else {
            return false;
        };
        let codec = if is_video { Codec::Vp8 } else { Codec::Opus };
        let Some(pt) = self.payload_type(mid, codec) else {
            for e in self.publishers[i].encodings.iter_mut().filter(|e| e.active) {
                e.sent.skipped += 1;
            }
            return false;
        };
        let red_pt = if is_video { None } else { self.red_pt(pt) };
        if !is_video {
            let dtx = (self.muted || self.silent) && self.options.dtx && self.dtx_asked;
            let p = &mut self.publishers[i];
            if dtx {
                p.quiet_frames = p.quiet_frames.saturating_add(1);
                // Opus DTX: the first quiet frame, then one per DTX_INTERVAL_FRAMES; the RTP
                // clock runs on, the sequence numbers do not.
                if (p.quiet_frames - 1) % DTX_INTERVAL_FRAMES != 0 {
                    let e = &mut p.encodings[0];
                    if e.sent.frames > 0 {
                        e.rtp_time = e.rtp_time.wrapping_add(p.ticks);
                    }
                    return false;
                }
            } else {
                p.quiet_frames = 0;
            }
        }
        let fec = self.options.opus_fec;
        let red_lie_every = self.options.red_lie_every;
        let tag = session_tag(self.session);
        let clock_origin = self.options.clock_origin;
        let SimPeer {
            rtc,
            rng,
            encoder_rng,
            publishers,
            muted,
            silent,
            ..
        } = self;
        let p = &mut publishers[i];
        let mut frames: Vec<(usize, Frame)> = Vec::with_capacity(p.encodings.len());
        if is_video {
            let frames_per_keyframe = frames_per_interval(p.keyframe_interval, p.interval);
            for (n, e) in p.encodings.iter_mut().enumerate() {
                if !e.active || e.suspended {
                    continue;
                }
                let Some(vp8) = &mut e.vp8 else {
                    continue;
                };
                let keyframe =
                    e.force_keyframe || keyframe_due(e.last_keyframe_at, p.keyframe_interval, now);
                if keyframe {
                    e.force_keyframe = false;
                    e.last_keyframe_at = Some(now);
                }
                let frame = vp8.encode(keyframe, p.interval, frames_per_keyframe, encoder_rng, rng);
                frames.push((n, frame));
            }
        } else {
            let len = rng.usize(60..=120);
            let e = &p.encodings[0];
            let mut opus = opus_payload(len, e.seq, e.rtp_time, fec);
            if let Some(origin) = clock_origin {
                let micros = now.saturating_duration_since(origin).as_micros();
                stamp_sent_at(&mut opus, u64::try_from(micros).unwrap_or(u64::MAX));
            }
            tag_source(&mut opus, tag);
            let payload = match red_pt {
                // RFC 2198: the previous packet (960 ticks earlier) as the redundant block.
                Some(_) => {
                    let redundant: Vec<RedundantBlock> = p
                        .last_opus
                        .take()
                        .map(|payload| RedundantBlock {
                            pt: *pt,
                            timestamp_offset: p.ticks,
                            payload,
                        })
                        .into_iter()
                        .collect();
                    let mut red = RedEncoder::encode(*pt, &opus, &redundant);
                    let lie = red_lie_every.is_some_and(|n| n > 0 && e.seq % n == 0);
                    if lie && !redundant.is_empty() {
                        // RFC 2198 §3: the block length is the low 10 bits of the 4-byte header.
                        red[2] |= 0x03;
                        red[3] = 0xFF;
                    }
                    p.last_opus = Some(opus);
                    red
                }
                None => opus,
            };
            frames.push((
                0,
                Frame {
                    keyframe: false,
                    tid: 0,
                    packets: vec![(payload, false)],
                },
            ));
        }
        let quiet = *muted || *silent;
        let audio_level = if quiet { -127 } else { -(rng.i8(20..50)) };
        let ext_vals = if is_video {
            ExtensionValues::default()
        } else {
            ExtensionValues {
                audio_level: Some(audio_level),
                voice_activity: Some(!quiet),
                ..ExtensionValues::default()
            }
        };

        let mut direct = rtc.direct_api();
        let mut wrote = false;
        for (n, frame) in frames {
            let e = &mut p.encodings[n];
            let Some(stream) = direct.stream_tx_by_mid(mid, e.rid) else {
                e.sent.skipped += 1;
                continue;
            };
            for (mut payload, marker) in frame.packets {
                tag_source(&mut payload, tag);
                e.sent.packets += 1;
                e.sent.bytes += payload.len() as u64;
                stream.write_rtp(
                    RtpWrite::new(red_pt.unwrap_or(pt), e.seq.into(), e.rtp_time, now, payload)
                        .marker(marker)
                        .ext_vals(ext_vals.clone())
                        .nackable(is_video),
                );
                e.seq += 1;
            }
            e.sent.frames += 1;
            if frame.keyframe {
                e.sent.keyframes += 1;
            }
            wrote = true;
        }
        // RTP time follows the capture clock, also on layers paused by dynacast.
        for e in &mut p.encodings {
            if e.sent.frames > 0 {
                e.rtp_time = e.rtp_time.wrapping_add(p.ticks);
            }
        }
        wrote
    }

    /// A PLI or FIR for one of our video tracks: a keyframe on the layer it names (every layer
    /// when it names none) with the next frame. A single-layer track sends that frame at once,
    /// as the harness always did; simulcast layers keep their frame clock.
    fn on_keyframe_request(&mut self, req: KeyframeRequest, now: Instant) {
        self.keyframe_requests += 1;
        let Some(p) = self
            .publishers
            .iter_mut()
            .find(|p| p.mid == Some(req.mid) && p.is_video() && !p.stopped)
        else {
            return;
        };
        p.keyframe_requests += 1;
        let running = p.next_at.is_some();
        let mut forced = false;
        for e in p
            .encodings
            .iter_mut()
            .filter(|e| req.rid.is_none() || e.rid == req.rid)
        {
            e.sent.keyframe_requests += 1;
            let throttled = e
                .last_keyframe_at
                .is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_REQUEST_THROTTLE);
            if !throttled && running {
                e.force_keyframe = true;
                forced = true;
            }
        }
        if forced && !p.simulcast {
            p.next_at = Some(now);
        }
    }

    /// Dynacast: keep sending only the layers in `active` of our m-line `mid`.
    fn on_layers(&mut self, mid: &str, active: &[String], now: Instant) {
        if self.layers_log.len() == LAYERS_LOG_LEN {
            self.layers_log.remove(0);
        }
        self.layers_log.push((now, mid.to_owned(), active.to_vec()));
        let Some(p) = self
            .publishers
            .iter_mut()
            .find(|p| p.is_video() && !p.stopped && p.mid.is_some_and(|m| m.to_string() == mid))
        else {
            return;
        };
        for e in &mut p.encodings {
            let on = match &e.rid {
                Some(rid) => active.iter().any(|a| a.as_str() == &**rid),
                None => !active.is_empty(),
            };
            if on && !e.active {
                // A decoder can only join a resumed stream at a keyframe.
                e.force_keyframe = true;
            }
            e.active = on;
        }
    }

    fn on_rtp(&mut self, pkt: RtpPacket, now: Instant) {
        let ssrc = *pkt.header.ssrc;
        let rx = match self.ssrc_mids.entry(ssrc) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => {
                let Some(mid) = self
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| s.mid())
                else {
                    return;
                };
                let video = self
                    .rtc
                    .media(mid)
                    .is_some_and(|m| m.kind() == MediaKind::Video);
                new.insert(RxStream {
                    name: mid.to_string(),
                    video,
                })
            }
        };
        let RxStream { name, video } = rx;
        let is_video = *video;
        let stats = match self.slots.attribute(name, &pkt.payload) {
            Attribution::Mapped(session, source) => self
                .received
                .entry((session, source_rank(source)))
                .or_default(),
            Attribution::Unmapped => self.unattributed.entry(name.clone()).or_default(),
            Attribution::Misattributed => {
                self.misattributed += 1;
                self.unattributed.entry(name.clone()).or_default()
            }
        };
        stats.record(name, &pkt, is_video, now);
        if !is_video {
            let red = self
                .rtc
                .codec_config()
                .params()
                .iter()
                .any(|p| p.red() == Some(pkt.header.payload_type));
            stats.record_audio(&pkt, red, self.options.clock_origin, now);
        }
        match self.slot_stats.get_mut(name.as_str()) {
            Some(slot) => slot.record(name, &pkt, is_video, now),
            None => self
                .slot_stats
                .entry(name.clone())
                .or_default()
                .record(name, &pkt, is_video, now),
        }
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
            Event::MediaEgressStats(stats) => {
                if let Some(loss) = stats.loss {
                    self.reported_loss.insert(stats.mid, loss);
                }
            }
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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use str0m::change::SdpOffer;
    use str0m::media::{KeyframeRequestKind, Mid, Rid};
    use str0m::net::{Protocol, Receive};
    use str0m::{Candidate, Event, Input, Output, Rtc};

    use str0m::format::detect_vp8_keyframe;

    use super::super::encoder::layer_and_tid;
    use super::*;

    const CAM: TrackSource = TrackSource::Camera;
    const SCREEN: TrackSource = TrackSource::Screen;

    fn peer_addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], 5000))
    }

    fn sfu_addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 443))
    }

    fn new_peer(options: &PeerOptions, now: Instant) -> SimPeer {
        SimPeer::new(
            SessionId(1),
            UserId::from("alice"),
            peer_addr(),
            options,
            9,
            now,
        )
    }

    /// The SDP of the first offer a peer with `options` sends.
    fn first_offer(options: &PeerOptions) -> String {
        let mut peer = new_peer(options, Instant::now());
        peer.start(Instant::now());
        match peer.take_signals().into_iter().next() {
            Some(PeerSignal::Message(ClientMessage::Offer { sdp, .. })) => sdp,
            other => panic!("first signal is no offer: {other:?}"),
        }
    }

    /// What the receiving end saw of one (mid, rid) stream.
    #[derive(Debug, Default)]
    struct Got {
        packets: u64,
        frames: u64,
        keyframes: u64,
        /// Whether each received frame started with a keyframe, in order.
        frame_starts: Vec<bool>,
        layers: Vec<u8>,
        tids: [u64; 4],
    }

    /// One simulated peer and a bare str0m session in RTP mode answering it (as the router's
    /// session would), on a perfect zero-delay wire, stepped one millisecond at a time.
    struct Loopback {
        now: Instant,
        peer: SimPeer,
        sfu: Rtc,
        got: HashMap<(Mid, Option<Rid>), Got>,
        /// Per stream: whether the next packet starts a frame.
        frame_start: HashMap<(Mid, Option<Rid>), bool>,
    }

    impl Loopback {
        fn new(options: PeerOptions) -> Self {
            let now = Instant::now();
            let mut sfu = Rtc::builder()
                .set_rtp_mode(true)
                .set_ice_lite(true)
                .build(now);
            let candidate = Candidate::host(sfu_addr(), "udp").expect("host candidate");
            sfu.add_local_candidate(candidate);
            let mut peer = new_peer(&options, now);
            peer.start(now);
            let offer = match peer.take_signals().into_iter().next() {
                Some(PeerSignal::Message(ClientMessage::Offer { sdp, .. })) => sdp,
                other => panic!("first signal is no offer: {other:?}"),
            };
            let offer = SdpOffer::from_sdp_string(&offer).expect("offer parses");
            let answer = sfu.sdp_api().accept_offer(offer).expect("offer accepted");
            let sdp = answer.to_sdp_string();
            peer.handle_signal(ServerMessage::Answer { sdp }, now);
            let mut lo = Loopback {
                now,
                peer,
                sfu,
                got: HashMap::new(),
                frame_start: HashMap::new(),
            };
            lo.exchange();
            lo
        }

        /// Moves datagrams both ways until neither side has anything to send.
        fn exchange(&mut self) {
            loop {
                let up = self.peer.take_transmits();
                let mut moved = !up.is_empty();
                for t in up {
                    let receive = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                        .expect("datagram");
                    self.sfu
                        .handle_input(Input::Receive(self.now, receive))
                        .expect("sfu input");
                    moved |= self.drain_sfu();
                }
                moved |= self.drain_sfu();
                if !moved {
                    break;
                }
            }
        }

        /// Drains the SFU session: datagrams go to the peer, packets are counted. Returns
        /// whether anything went to the peer.
        fn drain_sfu(&mut self) -> bool {
            let mut sent = false;
            loop {
                match self.sfu.poll_output().expect("sfu output") {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        self.peer.handle_datagram(t.source, &t.contents, self.now);
                        sent = true;
                    }
                    Output::Event(Event::RtpPacket(pkt)) => self.count(pkt),
                    Output::Event(_) => {}
                }
            }
            sent
        }

        fn count(&mut self, pkt: RtpPacket) {
            let mut api = self.sfu.direct_api();
            let Some(rx) = api.stream_rx(&pkt.header.ssrc) else {
                return;
            };
            let key = (rx.mid(), rx.rid());
            let got = self.got.entry(key).or_default();
            got.packets += 1;
            let starts = self.frame_start.entry(key).or_insert(true);
            if *starts {
                got.frame_starts.push(detect_vp8_keyframe(&pkt.payload));
            }
            *starts = pkt.header.marker;
            if detect_vp8_keyframe(&pkt.payload) {
                got.keyframes += 1;
            }
            if let Some((layer, tid)) = layer_and_tid(&pkt.payload) {
                if got.layers.last() != Some(&layer) {
                    got.layers.push(layer);
                }
                if pkt.header.marker {
                    got.frames += 1;
                    got.tids[usize::from(tid.min(3))] += 1;
                }
            }
        }

        fn run_for(&mut self, duration: Duration) {
            let end = self.now + duration;
            while self.now < end {
                self.now += Duration::from_millis(1);
                if self.peer.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.peer.handle_timeout(self.now);
                }
                self.sfu
                    .handle_input(Input::Timeout(self.now))
                    .expect("sfu timeout");
                self.drain_sfu();
                self.exchange();
            }
        }

        fn got(&self, mid: Mid, rid: Option<&str>) -> &Got {
            let key = (mid, rid.map(Rid::from));
            self.got.get(&key).unwrap_or_else(|| {
                panic!("nothing received on {mid} {rid:?}: {:?}", self.got.keys())
            })
        }

        fn camera(&self) -> Mid {
            self.peer.mid_of(CAM).expect("camera mid")
        }

        fn signal(&mut self, msg: ServerMessage) {
            self.peer.handle_signal(msg, self.now);
            self.exchange();
        }
    }

    #[test]
    fn simulcast_offer_names_layers_low_to_high() {
        let sdp = first_offer(&PeerOptions::default().with_simulcast().with_screen());
        assert!(sdp.contains("a=simulcast:send q;h;f"), "{sdp}");
        assert!(sdp.contains("a=simulcast:send h;f"), "{sdp}");
        for rid in ["q", "h", "f"] {
            assert!(sdp.contains(&format!("a=rid:{rid} send")), "{sdp}");
        }
        let plain = first_offer(&PeerOptions::default().with_screen());
        assert!(!plain.contains("a=simulcast"), "{plain}");
        assert!(!plain.contains("a=rid"), "{plain}");
    }

    #[test]
    fn every_layer_is_its_own_stream_at_its_own_rate() {
        let mut lo = Loopback::new(PeerOptions::default().with_simulcast().with_screen());
        lo.run_for(Duration::from_secs(3));
        let cam = lo.camera();
        let screen = lo.peer.mid_of(SCREEN).expect("screen mid");
        for (mid, source, rids, fps) in [
            (cam, CAM, &["q", "h", "f"][..], 30),
            (screen, SCREEN, &["h", "f"][..], 15),
        ] {
            for (index, rid) in rids.iter().enumerate() {
                let got = lo.got(mid, Some(rid));
                let sent = lo.peer.sent_layer(source, rid);
                assert_eq!(got.packets, sent.packets, "{source:?} {rid}");
                assert_eq!(got.layers, [index as u8], "{source:?} {rid}: layer tail");
                assert!(
                    got.frames.abs_diff(3 * fps) <= 2,
                    "{source:?} {rid}: {} frames in 3 s",
                    got.frames
                );
                assert_eq!(
                    got.frame_starts.first(),
                    Some(&true),
                    "starts with a keyframe"
                );
                // L1T3: half the frames TID2, a quarter each TID0 and TID1.
                assert!(got.tids[2].abs_diff(got.frames / 2) <= 2, "{:?}", got.tids);
                assert!(got.tids[0].abs_diff(got.frames / 4) <= 2, "{:?}", got.tids);
            }
            assert_eq!(lo.peer.sent_layer(source, "").packets, 0);
        }
        let total = lo.peer.sent(CAM);
        let layers: u64 = ["q", "h", "f"]
            .iter()
            .map(|r| lo.peer.sent_layer(CAM, r).bytes)
            .sum();
        assert_eq!(total.bytes, layers);
        let f = lo.peer.sent_layer(CAM, "f").bytes;
        let q = lo.peer.sent_layer(CAM, "q").bytes;
        assert!(f > 8 * q, "f {f} bytes, q {q} bytes");
    }

    #[test]
    fn keyframe_request_names_one_layer() {
        let mut lo = Loopback::new(PeerOptions::default().with_simulcast());
        lo.run_for(Duration::from_millis(500));
        let cam = lo.camera();
        let before: Vec<SentStats> = ["q", "h", "f"]
            .iter()
            .map(|r| lo.peer.sent_layer(CAM, r))
            .collect();
        let mut api = lo.sfu.direct_api();
        let rx = api
            .stream_rx_by_mid(cam, Some(Rid::from("h")))
            .expect("h receive stream");
        rx.request_keyframe(KeyframeRequestKind::Pli);
        lo.run_for(Duration::from_millis(200));
        for (rid, before) in ["q", "h", "f"].iter().zip(&before) {
            let now = lo.peer.sent_layer(CAM, rid);
            let (requests, keyframes) = if *rid == "h" { (1, 1) } else { (0, 0) };
            assert_eq!(
                now.keyframe_requests - before.keyframe_requests,
                requests,
                "{rid}"
            );
            assert_eq!(now.keyframes - before.keyframes, keyframes, "{rid}");
        }
        assert_eq!(lo.peer.sent(CAM).keyframe_requests, 1);
    }

    #[test]
    fn dynacast_pauses_layers_and_resumes_with_a_keyframe() {
        let mut lo = Loopback::new(PeerOptions::default().with_simulcast());
        lo.run_for(Duration::from_millis(500));
        let cam = lo.camera();
        let only_f = vec!["f".to_owned()];
        lo.signal(ServerMessage::Layers {
            mid: cam.to_string(),
            active: only_f.clone(),
        });
        let paused = ["q", "h"].map(|r| lo.got(cam, Some(r)).packets);
        let f_before = lo.got(cam, Some("f")).packets;
        lo.run_for(Duration::from_secs(1));
        assert_eq!(["q", "h"].map(|r| lo.got(cam, Some(r)).packets), paused);
        assert!(lo.got(cam, Some("f")).packets > f_before);

        let all: Vec<String> = ["q", "h", "f"].map(String::from).to_vec();
        lo.signal(ServerMessage::Layers {
            mid: cam.to_string(),
            active: all.clone(),
        });
        let q_frames = lo.got(cam, Some("q")).frame_starts.len();
        lo.run_for(Duration::from_millis(200));
        let q = lo.got(cam, Some("q"));
        assert_eq!(
            q.frame_starts.get(q_frames),
            Some(&true),
            "resumes at a keyframe"
        );
        assert!(q.frame_starts[q_frames + 1..].iter().all(|k| !k));
        let f = lo.got(cam, Some("f"));
        assert_eq!(f.keyframes, 1, "f never paused: no extra keyframe");

        let log: Vec<(String, Vec<String>)> = lo
            .peer
            .layers_log()
            .iter()
            .map(|(_, mid, active)| (mid.clone(), active.clone()))
            .collect();
        assert_eq!(log, [(cam.to_string(), only_f), (cam.to_string(), all)]);
        assert_eq!(lo.peer.signal_count("layers"), 2);
    }

    #[test]
    fn single_layer_track_pauses_on_empty_layers() {
        let mut lo = Loopback::new(PeerOptions::default().temporal_layers(1));
        lo.run_for(Duration::from_millis(300));
        let cam = lo.camera();
        let got = lo.got(cam, None);
        assert_eq!(got.tids[1..], [0, 0, 0], "one temporal layer: all TID0");
        assert_eq!(lo.peer.sent_layer(CAM, ""), lo.peer.sent(CAM));
        lo.signal(ServerMessage::Layers {
            mid: cam.to_string(),
            active: vec![],
        });
        let paused = lo.got(cam, None).packets;
        lo.run_for(Duration::from_millis(300));
        assert_eq!(lo.got(cam, None).packets, paused);
        lo.signal(ServerMessage::Layers {
            mid: cam.to_string(),
            active: vec!["any".into()],
        });
        let frames = lo.got(cam, None).frame_starts.len();
        lo.run_for(Duration::from_millis(300));
        assert_eq!(lo.got(cam, None).frame_starts.get(frames), Some(&true));
    }

    #[test]
    fn speaker_messages_are_logged() {
        let mut lo = Loopback::new(PeerOptions::audio_only());
        lo.signal(ServerMessage::Speaker {
            session: Some(SessionId(4)),
        });
        assert_eq!(lo.peer.signal_count("speaker"), 1);
        assert!(lo.peer.signal_log().any(|m| matches!(
            m,
            ServerMessage::Speaker {
                session: Some(SessionId(4))
            }
        )));
    }
}
