//! The load tester's engine: simulated participants ([`SimPeer`]s) on Rust threads, each with a
//! real UDP socket (or, with [`Transport::Tcp`], an ICE-TCP connection: see [`crate::ice_tcp`])
//! and a WebSocket to the reference server's `/ws` signaling.
//!
//! A [`Swarm`] splits its participants over `threads` media threads. Each media thread has a
//! connector thread that opens the WebSockets in start order (ramp-up) and waits for the
//! server's `welcome`; the media thread then owns the participant: it feeds the WebSocket's
//! messages and the socket's datagrams (or RFC 4571 frames) to the peer, wakes it on its
//! timers (20 ms Opus, 30 fps VP8, str0m's own), and sends what it wants sent. One `mio` poll
//! per media thread waits for all of its sockets. Statistics are published to a shared table
//! four times a second.
//!
//! Video is simulcast by default ([`ParticipantSpec::simulcast`]): the router picks one layer
//! per subscriber. A participant receives on a fixed set of slots (signaling protocol 2); the
//! peer follows the router's slot mapping and measures each slot's stream and each publisher's
//! share of it with the simulation's receiver ([`calls_core::sim::receiver`]: [`TrackStats`],
//! the [`SlotMap`](calls_core::sim::SlotMap)), so the load test and the scenario tests measure
//! alike. Three measurements are fed where datagrams are read, because the peer keeps no
//! per-packet record, with the same receiver module's [`Jitter`] (RFC 3550 interarrival jitter,
//! from the clear-text RTP header of each SRTP packet and its arrival time), [`LayerBytes`]
//! (the peer's byte count, attributed to the layer it was receiving when each packet arrived)
//! and [`Freezes`]. They are kept per slot (one SSRC for the slot's life) and per publisher
//! (whoever the mapping says the slot carries).
//!
//! Everything is bounded: each participant stops at the swarm's deadline (or on
//! [`Swarm::stop`]), says `{"type":"leave"}`, closes its WebSocket and drops its socket.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use calls_core::sim::receiver::{clear_rtp_header, OPUS_CLOCK_RATE, VP8_CLOCK_RATE};
use calls_core::sim::{
    simulcast_layers, Freezes, Jitter, LayerBytes, PeerOptions, PeerSignal, SimPeer, TrackStats,
    Transport,
};
use calls_core::{Proto, ServerMessage, SessionId, SlotKind, TrackSource, UserId};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use serde::Serialize;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

use crate::ice_tcp::{Deframer, TcpLink, TcpLinkError};

/// How often a media thread publishes its participants' statistics.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// The longest a media thread sleeps (it also wakes for peers' timers and sockets).
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Bytes a participant's WebSocket asks the kernel for per read. tungstenite zeroes this much
/// of its buffer before every read attempt, the one that finds nothing included; with its
/// default (128 KiB) that zeroing was ~3 % of a 600-participant swarm's CPU. Server messages
/// are small; a larger one (an SDP offer) just takes a few reads.
const WS_READ_BUFFER: usize = 8 * 1024;
/// A media thread's read buffer (one UDP datagram, or one read of an ICE-TCP stream).
const READ_BUFFER: usize = 16 * 1024;
/// A participant's media socket is readable (its token is even).
const READY_MEDIA: u8 = 1;
/// A participant's WebSocket is readable (its token is odd).
const READY_WS: u8 = 2;
/// Receive buffer asked for each participant's UDP socket (the kernel caps it at
/// `net.core.rmem_max`): a media thread that is descheduled for a while must not lose packets.
const UDP_RECV_BUFFER: usize = 1 << 20;
/// How long a WebSocket connect + handshake + `welcome` may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one simulated participant does.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantSpec {
    /// The call to join.
    pub call: String,
    /// The user name (`?user=` in demo mode).
    pub user: String,
    /// A join token (`?token=`), when the server has an `auth_secret`.
    pub token: Option<String>,
    /// Publish a microphone (synthetic Opus, 20 ms packets with audio levels).
    pub audio: bool,
    /// Publish a camera (synthetic VP8, 30 fps, a keyframe every 3 s and on PLI).
    pub video: bool,
    /// Publish a screen share (a second synthetic VP8 track).
    pub screen: bool,
    /// Send video as simulcast: the camera as layers `q`, `h`, `f` (≈150 k, 500 k,
    /// 1.5 Mbit/s), a screen share as `h`, `f`, each with three temporal layers. Off: one VP8
    /// stream per track (≈520 kbit/s).
    pub simulcast: bool,
    /// Talk: audio levels of speech. A non-speaker sends silence (level -127) or is muted.
    pub speaking: bool,
    /// A non-speaker is muted (`{"type":"mute"}`; the router forwards nothing) instead of
    /// sending silence that the router forwards.
    pub muted: bool,
    /// Honour the server's `usedtx=1`: while quiet, send a packet per 400 ms (Opus DTX, as
    /// Chromium does) instead of one per 20 ms.
    pub dtx: bool,
    /// When to join, after the swarm starts (ramp-up).
    pub start_after: Duration,
    /// Seed of the peer's synthetic media.
    pub seed: u64,
    /// How its media reaches the server: UDP, or ICE-TCP only (an active TCP candidate; one
    /// connection to the server's TCP candidate, opened on the peer's first TCP transmit).
    pub transport: Transport,
    /// ICE-TCP only: stop reading the connection this long after the `welcome`, and never read
    /// it again: a client whose app froze. It goes on sending (its media, ICE checks), so it
    /// notices when the server closes the connection (the next write is reset), and counts a
    /// `tcp_errors`. `None`: it reads until the end.
    pub stall_reading_after: Option<Duration>,
}

/// What runs and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmConfig {
    /// The server's HTTP address: `http://127.0.0.1:8080`, `ws://…` or `127.0.0.1:8080`.
    pub url: String,
    /// The participants.
    pub participants: Vec<ParticipantSpec>,
    /// Everyone stops this long after the swarm starts.
    pub duration: Duration,
    /// Media threads (at least 1).
    pub threads: usize,
    /// Allow a server that is not on a loopback address.
    pub allow_remote: bool,
}

/// Errors that refuse to start a swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmError {
    /// The URL is not `[http|ws]://host:port[/…]` or does not resolve.
    BadUrl(String),
    /// The server is not on a loopback address and `allow_remote` is off.
    NotLoopback(SocketAddr),
    /// No participants, no threads, a zero duration, or a UDP participant asked to stall its
    /// reads.
    BadConfig(String),
}

impl std::fmt::Display for SwarmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwarmError::BadUrl(e) => write!(f, "bad server URL: {e}"),
            SwarmError::NotLoopback(a) => write!(f, "{a} is not a loopback address"),
            SwarmError::BadConfig(e) => write!(f, "bad swarm configuration: {e}"),
        }
    }
}

impl std::error::Error for SwarmError {}

/// Received payload bitrate by simulcast layer (RID), kbit/s. A camera's layers are `q`, `h`,
/// `f`; a screen share's `h`, `f`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LayerKbps {
    /// The lowest camera layer.
    pub q: f64,
    /// The middle camera layer, or the lower screen-share layer.
    pub h: f64,
    /// The top layer.
    pub f: f64,
}

impl LayerKbps {
    fn add(&mut self, rid: &str, kbps: f64) {
        match rid {
            "q" => self.q += kbps,
            "h" => self.h += kbps,
            "f" => self.f += kbps,
            _ => {}
        }
    }
}

/// What one participant received from one publisher track.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrackReport {
    /// The publisher's session.
    pub publisher: u64,
    /// `microphone`, `camera` or `screen`.
    pub source: &'static str,
    /// RTP packets received.
    pub packets: u64,
    /// RTP payload bytes received.
    pub bytes: u64,
    /// Sequence numbers never received (loss).
    pub lost: u64,
    /// VP8 keyframes received.
    pub keyframes: u64,
    /// Payload bitrate between the first and the last packet, kbit/s.
    pub kbps: f64,
    /// Video gaps longer than 500 ms (including one still going on at the end).
    pub freezes: u64,
    /// Their total length, ms.
    pub freeze_ms: f64,
    /// Whether the publisher sends this track as simulcast (a swarm participant with
    /// [`ParticipantSpec::simulcast`] and video).
    pub simulcast: bool,
    /// Simulcast video: `kbps` split by the layer the packets arrived on (`None` for audio
    /// and single-layer video).
    pub kbps_by_layer: Option<LayerKbps>,
    /// Video frames by spatial layer index (0 = lowest).
    pub frames_by_layer: [u64; 3],
    /// Simulcast video: the RID of the layer received last.
    pub layer: Option<&'static str>,
    /// How often the received spatial layer changed (of the latest 1024 changes).
    pub layer_switches: u64,
    /// Video: the longest time between two consecutive frames after the first keyframe, ms.
    pub max_frame_gap_ms: f64,
    /// RFC 3550 §6.4.1 interarrival jitter at the end (or now), ms; `None` before two packets.
    pub jitter_ms: Option<f64>,
    /// The largest value the jitter estimate reached, ms.
    pub jitter_max_ms: Option<f64>,
}

/// What one participant received on one receive slot: one continuous stream, whoever it
/// carried.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SlotReport {
    /// The slot's m-line.
    pub mid: String,
    /// `audio`, `camera` or `screen`.
    pub kind: &'static str,
    /// The publisher the slot carries now (`None`: empty).
    pub session: Option<u64>,
    /// That publisher's source.
    pub source: Option<&'static str>,
    /// The publisher whose stream the slot carried last: `session`, or, for a slot emptied
    /// since (its publisher left or went quiet at the end of a run), the one before.
    pub last_session: Option<u64>,
    /// RTP packets received.
    pub packets: u64,
    /// RTP payload bytes received.
    pub bytes: u64,
    /// Sequence numbers never received (loss).
    pub lost: u64,
    /// VP8 keyframes received.
    pub keyframes: u64,
    /// Payload bitrate between the first and the last packet, kbit/s.
    pub kbps: f64,
    /// Video gaps longer than 500 ms (including one still going on at the end).
    pub freezes: u64,
    /// Their total length, ms.
    pub freeze_ms: f64,
    /// Video frames by spatial layer index (0 = lowest).
    pub frames_by_layer: [u64; 3],
    /// Video: the RID of the layer received last.
    pub layer: Option<&'static str>,
    /// How often the received spatial layer changed (of the latest 1024 changes).
    pub layer_switches: u64,
    /// Video: the longest time between two consecutive frames after the first keyframe, ms.
    pub max_frame_gap_ms: f64,
    /// RFC 3550 §6.4.1 interarrival jitter at the end (or now), ms; `None` before two packets.
    pub jitter_ms: Option<f64>,
    /// The largest value the jitter estimate reached, ms.
    pub jitter_max_ms: Option<f64>,
    /// How often the slot's SSRC changed (0: one SSRC for the slot's life, as it should be).
    pub ssrc_changes: u64,
    /// Video: consecutive frames whose VP8 PictureIDs are not consecutive (a source or layer
    /// change the router did not smooth over).
    pub picture_id_breaks: u64,
    /// Video: layer or source changes that did not start at a keyframe.
    pub switches_off_keyframe: u64,
}

/// One participant's statistics (times in seconds since the swarm started, or milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ParticipantStats {
    /// Index in the swarm.
    pub index: usize,
    /// Its call.
    pub call: String,
    /// Its user name.
    pub user: String,
    /// Whether it talks.
    pub speaking: bool,
    /// Whether it publishes its video as simulcast.
    pub simulcast: bool,
    /// `udp`, or `tcp` (ICE-TCP only).
    pub transport: &'static str,
    /// `waiting`, `joining`, `joined` (welcome received), `connected` (ICE+DTLS up),
    /// `done` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    pub error: Option<String>,
    /// The server's session id.
    pub session: Option<u64>,
    /// When the WebSocket connect started, s since the swarm start.
    pub join_started_s: Option<f64>,
    /// WebSocket connect → `welcome`, ms.
    pub welcome_ms: Option<f64>,
    /// WebSocket connect → ICE and DTLS up, ms.
    pub connected_ms: Option<f64>,
    /// WebSocket connect → first media packet received (the join time), ms.
    pub join_ms: Option<f64>,
    /// RTP packets sent (all tracks).
    pub packets_sent: u64,
    /// RTP payload bytes sent.
    pub bytes_sent: u64,
    /// RTP packets received (all tracks).
    pub packets_received: u64,
    /// RTP payload bytes received.
    pub bytes_received: u64,
    /// Sequence numbers never received, all tracks.
    pub lost: u64,
    /// `lost / (packets_received + lost)`.
    pub loss: f64,
    /// Packets received out of order or twice.
    pub late_or_duplicate: u64,
    /// Seconds between the first media packet received and the end (or now).
    pub media_s: f64,
    /// Received payload bitrate over `media_s`, kbit/s.
    pub rx_kbps: f64,
    /// Sent payload bitrate since connected, kbit/s.
    pub tx_kbps: f64,
    /// Video freezes (gaps over 500 ms) over all received video tracks.
    pub freezes: u64,
    /// Keyframe requests (PLI/FIR) received for our video.
    pub keyframe_requests: u64,
    /// Server messages that could not be parsed or `error` messages from the router.
    pub signal_errors: u64,
    /// Per publisher track (attributed by the slot mapping).
    pub tracks: Vec<TrackReport>,
    /// Per receive slot.
    pub slots: Vec<SlotReport>,
    /// Packets whose payload came from another publisher than the slot mapping said (the
    /// router forwarded a source before telling the client): 0 when the router is right.
    pub misattributed: u64,
    /// Received simulcast video payload bitrate by layer over `media_s`, kbit/s (single-layer
    /// video is only in `rx_kbps`).
    pub rx_kbps_by_layer: LayerKbps,
    /// The largest RFC 3550 jitter among its received audio tracks, ms.
    pub audio_jitter_ms: Option<f64>,
    /// The largest RFC 3550 jitter among its received video tracks, ms.
    pub video_jitter_ms: Option<f64>,
    /// Audio delay: how long its received audio packets took from their publisher's send
    /// (in this process) to its receive, over every publisher it heard; median, ms. It holds
    /// the server's and the network's share and the load tester's own lateness in sending and
    /// reading (a busy tester reads late). `None` before the first audio packet.
    pub audio_delay_p50_ms: Option<f64>,
    /// Audio delay, 99th percentile, ms.
    pub audio_delay_p99_ms: Option<f64>,
    /// Audio delay, the largest, ms.
    pub audio_delay_max_ms: Option<f64>,
    /// The longest frame gap among its received video tracks, ms.
    pub max_frame_gap_ms: f64,
    /// `speaker` messages (active speaker changes) received.
    pub speaker_messages: u64,
    /// `layers` (dynacast) messages received about its own video.
    pub layers_messages: u64,
    /// ICE-TCP: the connection failed (closed or reset by the server, refused, or a frame
    /// longer than [`crate::ice_tcp::MAX_FRAME`]); the participant's media ended there.
    pub tcp_errors: u64,
    /// ICE-TCP: frames not sent (the send queue was full, or another destination).
    pub tcp_frames_dropped: u64,
}

/// Shared between the swarm handle and its threads.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    running_threads: AtomicUsize,
    stats: Mutex<Vec<ParticipantStats>>,
    /// Sessions of joined participants that publish simulcast video: their tracks' layers are
    /// named by RID in everyone's report.
    simulcast_sessions: Mutex<HashSet<u64>>,
}

/// A running set of simulated participants. Dropping it stops them and waits for the threads.
#[derive(Debug)]
pub struct Swarm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
}

impl Swarm {
    /// Starts the threads; participants join on their `start_after`.
    pub fn start(config: SwarmConfig) -> Result<Swarm, SwarmError> {
        if config.participants.is_empty() {
            return Err(SwarmError::BadConfig("no participants".into()));
        }
        if config.duration.is_zero() {
            return Err(SwarmError::BadConfig("duration is 0".into()));
        }
        if let Some(index) = config
            .participants
            .iter()
            .position(|p| p.stall_reading_after.is_some() && p.transport != Transport::Tcp)
        {
            return Err(SwarmError::BadConfig(format!(
                "participant {index}: stall_reading_after needs transport tcp"
            )));
        }
        let (server, host) = resolve(&config.url)?;
        if !config.allow_remote && !server.ip().is_loopback() {
            return Err(SwarmError::NotLoopback(server));
        }
        let threads = config.threads.clamp(1, config.participants.len());
        let started = Instant::now();
        let deadline = started + config.duration;
        let stats = config
            .participants
            .iter()
            .enumerate()
            .map(|(index, p)| ParticipantStats {
                index,
                call: p.call.clone(),
                user: p.user.clone(),
                speaking: p.speaking,
                simulcast: p.simulcast,
                transport: transport_name(p.transport),
                state: "waiting",
                ..ParticipantStats::default()
            })
            .collect();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            running_threads: AtomicUsize::new(threads),
            stats: Mutex::new(stats),
            simulcast_sessions: Mutex::new(HashSet::new()),
        });
        let mut handles = Vec::new();
        for t in 0..threads {
            let mine: Vec<(usize, ParticipantSpec)> = config
                .participants
                .iter()
                .enumerate()
                .filter(|(i, _)| i % threads == t)
                .map(|(i, p)| (i, p.clone()))
                .collect();
            let (tx, rx) = mpsc::channel();
            let connector = Connector {
                server,
                host: host.clone(),
                shared: shared.clone(),
                started,
                deadline,
            };
            let specs = mine.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("calls-join-{t}"))
                    .spawn(move || connector.run(specs, tx))
                    .map_err(|e| SwarmError::BadConfig(format!("spawn: {e}")))?,
            );
            let worker = MediaThread {
                shared: shared.clone(),
                started,
                deadline,
                server,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("calls-media-{t}"))
                    .spawn(move || worker.run(rx, mine.len()))
                    .map_err(|e| SwarmError::BadConfig(format!("spawn: {e}")))?,
            );
        }
        Ok(Swarm {
            shared,
            threads: handles,
            started,
            deadline,
        })
    }

    /// A snapshot of every participant's statistics (at most 250 ms old while running).
    pub fn stats(&self) -> Vec<ParticipantStats> {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Asks every participant to leave now (returns at once; see [`Swarm::wait`]).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Whether media threads are still running.
    pub fn is_running(&self) -> bool {
        self.shared.running_threads.load(Ordering::SeqCst) > 0
    }

    /// Waits until every thread has finished, at most `timeout`. Returns whether they have.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
        true
    }

    /// Seconds since the swarm started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The configured run time, in seconds.
    pub fn duration(&self) -> f64 {
        (self.deadline - self.started).as_secs_f64()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// `http://host:port/…`, `ws://host:port/…` or `host:port` → the address and the `Host` text.
fn resolve(url: &str) -> Result<(SocketAddr, String), SwarmError> {
    let rest = ["http://", "ws://"]
        .iter()
        .find_map(|p| url.strip_prefix(p))
        .unwrap_or(url);
    if url.starts_with("https://") || url.starts_with("wss://") {
        return Err(SwarmError::BadUrl(format!("{url}: TLS is not supported")));
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(SwarmError::BadUrl(format!("{url}: no host")));
    }
    let with_port = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| SwarmError::BadUrl(format!("{url}: {e}")))?
        .next()
        .ok_or_else(|| SwarmError::BadUrl(format!("{url}: no address")))?;
    Ok((addr, with_port))
}

/// RFC 3986 percent-encoding of a query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn update(shared: &Shared, index: usize, f: impl FnOnce(&mut ParticipantStats)) {
    if let Ok(mut stats) = shared.stats.lock() {
        if let Some(s) = stats.get_mut(index) {
            f(s);
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `udp` or `tcp`, as in the report.
fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

/// A participant whose WebSocket is open and whose `welcome` arrived.
struct Joined {
    index: usize,
    spec: ParticipantSpec,
    ws: WebSocket<TcpStream>,
    session: u64,
    opened_at: Instant,
}

/// Opens WebSockets in start order for one media thread.
struct Connector {
    server: SocketAddr,
    host: String,
    shared: Arc<Shared>,
    started: Instant,
    deadline: Instant,
}

impl Connector {
    fn run(self, mut specs: Vec<(usize, ParticipantSpec)>, to_media: Sender<Joined>) {
        specs.sort_by_key(|(_, s)| s.start_after);
        for (index, spec) in specs {
            let at = self.started + spec.start_after;
            while Instant::now() < at {
                if self.stopped() {
                    return;
                }
                std::thread::sleep((at - Instant::now()).min(Duration::from_millis(20)));
            }
            if self.stopped() {
                return;
            }
            let opened_at = Instant::now();
            update(&self.shared, index, |s| {
                s.state = "joining";
                s.join_started_s = Some((opened_at - self.started).as_secs_f64());
            });
            match self.join(&spec) {
                Ok((ws, session)) => {
                    let welcome = opened_at.elapsed();
                    update(&self.shared, index, |s| {
                        s.state = "joined";
                        s.session = Some(session);
                        s.welcome_ms = Some(millis(welcome));
                    });
                    if spec.simulcast && (spec.video || spec.screen) {
                        if let Ok(mut sessions) = self.shared.simulcast_sessions.lock() {
                            sessions.insert(session);
                        }
                    }
                    let joined = Joined {
                        index,
                        spec,
                        ws,
                        session,
                        opened_at,
                    };
                    if to_media.send(joined).is_err() {
                        return;
                    }
                }
                Err(error) => update(&self.shared, index, |s| {
                    s.state = "failed";
                    s.error = Some(error);
                }),
            }
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }

    /// Connect, handshake, read the `welcome`: the WebSocket (non-blocking) and the session.
    fn join(&self, spec: &ParticipantSpec) -> Result<(WebSocket<TcpStream>, u64), String> {
        let stream = TcpStream::connect_timeout(&self.server, JOIN_TIMEOUT)
            .map_err(|e| format!("connect {}: {e}", self.server))?;
        stream
            .set_read_timeout(Some(JOIN_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(JOIN_TIMEOUT)))
            .and_then(|_| stream.set_nodelay(true))
            .map_err(|e| format!("socket: {e}"))?;
        let mut url = format!(
            "ws://{}/ws?call={}&user={}",
            self.host,
            encode(&spec.call),
            encode(&spec.user)
        );
        if let Some(token) = &spec.token {
            url.push_str("&token=");
            url.push_str(&encode(token));
        }
        let config =
            tungstenite::protocol::WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
        let (mut ws, _) =
            tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
                .map_err(|e| format!("handshake: {e}"))?;
        let session = loop {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    let value: serde_json::Value = serde_json::from_str(text.as_str())
                        .map_err(|e| format!("bad welcome: {e}"))?;
                    if value["type"] == "welcome" {
                        break value["session"]
                            .as_u64()
                            .ok_or_else(|| format!("welcome without a session: {value}"))?;
                    }
                }
                Ok(Message::Close(frame)) => {
                    return Err(match frame {
                        Some(f) => format!("refused ({}): {}", u16::from(f.code), f.reason),
                        None => "refused: closed".to_owned(),
                    })
                }
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for welcome: {e}")),
            }
        };
        ws.get_mut()
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;
        Ok((ws, session))
    }
}

/// What the media thread measures itself about one received stream (a slot, or a publisher's
/// share of the slots), next to its `TrackStats`.
#[derive(Debug, Default, Clone, Copy)]
struct TrackWatch {
    freeze: Freezes,
    jitter: Jitter,
    layers: LayerBytes,
}

fn clock_rate(is_audio: bool) -> f64 {
    if is_audio {
        OPUS_CLOCK_RATE
    } else {
        VP8_CLOCK_RATE
    }
}

/// The source a slot of `kind` carries (what names its simulcast layers).
fn slot_source(kind: SlotKind) -> TrackSource {
    match kind {
        SlotKind::Audio => TrackSource::Microphone,
        SlotKind::Camera => TrackSource::Camera,
        SlotKind::Screen => TrackSource::Screen,
    }
}

/// The RID of `source`'s simulcast layer `index` (camera `q`/`h`/`f`, screen `h`/`f`).
fn layer_rid(source: TrackSource, index: usize) -> Option<&'static str> {
    simulcast_layers(source)
        .iter()
        .find(|l| usize::from(l.index) == index)
        .map(|l| l.rid)
}

/// How a participant's media reaches the server.
enum MediaSocket {
    Udp(mio::net::UdpSocket),
    /// Registered with the poll when it connects (the peer's first TCP transmit).
    Tcp(TcpLink),
}

/// One receive slot as the media thread watches it.
struct SlotWatch {
    mid: String,
    /// Whether the slot's m-line is video (a slot keeps its kind for its life): audio slots
    /// have no freezes or layers to watch, and are skipped without a lookup by mid.
    video: bool,
    watch: TrackWatch,
}

/// A participant owned by a media thread.
struct Live {
    index: usize,
    ws: WebSocket<TcpStream>,
    ws_open: bool,
    media: MediaSocket,
    /// The poll token of `media`.
    media_token: Token,
    /// ICE-TCP: the partial frame between reads.
    deframer: Deframer,
    /// ICE-TCP: from then on the connection is not read ([`ParticipantSpec::stall_reading_after`]).
    stall_reading_at: Option<Instant>,
    tcp_errors: u64,
    peer: SimPeer,
    opened_at: Instant,
    connected_at: Option<Instant>,
    first_media_at: Option<Instant>,
    /// Per publisher track received, by (publisher session, source).
    watches: HashMap<(u64, TrackSource), TrackWatch>,
    /// Per receive slot that carried a packet: what the thread measured of its stream.
    slot_watches: Vec<SlotWatch>,
    /// Which slot (index in `slot_watches`) an SSRC is (learnt from the peer's per-slot
    /// `TrackStats::ssrc`: one SSRC per slot for its life).
    slot_of_ssrc: HashMap<u32, usize>,
    /// SSRCs no slot carries (RTX, probes, or not yet seen by the peer); forgotten every
    /// report, so a slot seen later is found.
    unknown_ssrcs: HashSet<u32>,
    signal_errors: u64,
    failed: Option<String>,
    done: bool,
}

/// Runs the media of one thread's participants.
struct MediaThread {
    shared: Arc<Shared>,
    /// The swarm's start: the clock origin every participant's audio send times count from
    /// ([`PeerOptions::clock_origin`]), so any participant can time any other's packets.
    started: Instant,
    deadline: Instant,
    server: SocketAddr,
}

impl MediaThread {
    fn run(self, joins: Receiver<Joined>, expected: usize) {
        if let Err(e) = self.run_inner(joins, expected) {
            if let Ok(mut stats) = self.shared.stats.lock() {
                for s in stats.iter_mut().filter(|s| s.state != "done") {
                    s.state = "failed";
                    s.error.get_or_insert_with(|| format!("media thread: {e}"));
                }
            }
        }
        self.shared.running_threads.fetch_sub(1, Ordering::SeqCst);
    }

    fn run_inner(&self, joins: Receiver<Joined>, expected: usize) -> std::io::Result<()> {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(1024);
        let mut live: Vec<Live> = Vec::with_capacity(expected);
        // Per participant, which of its sockets reported readiness (READY_MEDIA, READY_WS):
        // a WebSocket read costs a buffer clear in tungstenite, so it is not attempted for
        // every media datagram.
        let mut ready: Vec<u8> = Vec::with_capacity(expected);
        // Per participant, when its peer wants to be woken (`None`: never, or done), kept
        // beside `ready` so a loop only visits participants with something to do: walking
        // every participant's state on every wake-up cost a cache miss each.
        let mut due: Vec<Option<Instant>> = Vec::with_capacity(expected);
        let mut next_publish = Instant::now();
        let mut buf = vec![0u8; READ_BUFFER];
        let mut connector_gone = false;
        loop {
            let now = Instant::now();
            if self.shared.stop.load(Ordering::SeqCst) || now >= self.deadline {
                break;
            }
            // New participants from the connector.
            loop {
                match joins.try_recv() {
                    Ok(joined) => {
                        let slot = live.len();
                        let mut l = self.adopt(joined, Token(slot * 2), now)?;
                        if let MediaSocket::Udp(udp) = &mut l.media {
                            poll.registry()
                                .register(udp, l.media_token, Interest::READABLE)?;
                        }
                        let fd = l.ws.get_ref().as_raw_fd();
                        poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(slot * 2 + 1),
                            Interest::READABLE,
                        )?;
                        live.push(l);
                        // The connector may have read past the welcome: look now.
                        ready.push(READY_MEDIA | READY_WS);
                        due.push(Some(now));
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        connector_gone = true;
                        break;
                    }
                }
            }
            // Wait for sockets or the next timer.
            let wake = due
                .iter()
                .flatten()
                .fold(self.deadline.min(next_publish), |wake, at| wake.min(*at));
            let cap = if connector_gone {
                MAX_WAIT
            } else {
                Duration::from_millis(5)
            };
            let wait = wake.saturating_duration_since(Instant::now()).min(cap);
            if ready.iter().all(|r| *r == 0) {
                match poll.poll(&mut events, Some(wait)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for event in events.iter() {
                    let token = event.token().0;
                    if let Some(r) = ready.get_mut(token / 2) {
                        *r |= if token % 2 == 0 {
                            READY_MEDIA
                        } else {
                            READY_WS
                        };
                    }
                }
            }
            let now = Instant::now();
            for (slot, l) in live.iter_mut().enumerate() {
                // Taken even from a participant that is done: its sockets may still report
                // (a closed WebSocket hangs up), and a flag left set would keep the thread
                // from polling again, so nobody else on it would read another packet.
                let is_ready = std::mem::take(&mut ready[slot]);
                if is_ready == 0 && due[slot].is_none_or(|at| at > now) {
                    continue; // nothing read, nothing due: nothing new to send either
                }
                if l.done {
                    due[slot] = None;
                    continue;
                }
                // Read again per participant: going through hundreds takes milliseconds, and
                // the audio send times and arrivals are stamped with it (audio delay).
                let now = Instant::now();
                if is_ready & READY_WS != 0 {
                    l.read_signaling(now);
                }
                if is_ready & READY_MEDIA != 0 {
                    l.read_media(&mut buf, now);
                }
                if l.peer.poll_timeout().is_some_and(|at| at <= now) {
                    l.peer.handle_timeout(now);
                }
                l.flush(self.server, poll.registry());
                if l.failed.is_some() {
                    l.finish(now);
                }
                due[slot] = if l.done { None } else { l.peer.poll_timeout() };
            }
            if now >= next_publish {
                next_publish = now + PUBLISH_EVERY;
                self.publish(&mut live, now);
            }
        }
        let now = Instant::now();
        for l in live.iter_mut() {
            l.finish(now);
        }
        self.publish(&mut live, now);
        Ok(())
    }

    fn adopt(&self, joined: Joined, media_token: Token, now: Instant) -> std::io::Result<Live> {
        let bind: SocketAddr = if self.server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        }
        .parse()
        .map_err(|_| std::io::Error::other("bind address"))?;
        let bind = if self.server.ip().is_loopback() {
            bind
        } else {
            SocketAddr::new(local_ip_towards(self.server)?, 0)
        };
        let spec = &joined.spec;
        let (media, addr) = match spec.transport {
            Transport::Udp => {
                let udp = UdpSocket::bind(bind)?;
                udp.set_nonblocking(true)?;
                let udp = {
                    let socket = socket2::Socket::from(udp);
                    // Best effort: the default buffer still works, it only drops sooner.
                    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
                    UdpSocket::from(socket)
                };
                let addr = udp.local_addr()?;
                (MediaSocket::Udp(mio::net::UdpSocket::from_std(udp)), addr)
            }
            Transport::Tcp => {
                let (link, addr) = TcpLink::bind(bind.ip())?;
                (MediaSocket::Tcp(link), addr)
            }
        };
        let base = if spec.simulcast {
            PeerOptions::default().with_simulcast()
        } else {
            PeerOptions::default()
        };
        let options = PeerOptions {
            audio: spec.audio,
            video: spec.video,
            screen: spec.screen,
            transport: spec.transport,
            dtx: spec.dtx,
            clock_origin: Some(self.started),
            ..base
        };
        let mut peer = SimPeer::new(
            SessionId(joined.session),
            UserId::from(spec.user.as_str()),
            addr,
            &options,
            spec.seed,
            now,
        );
        if spec.audio && !spec.speaking {
            if spec.muted {
                peer.set_muted(true);
            } else {
                peer.set_silent(true);
            }
        }
        peer.start(now);
        let stall_reading_at = spec.stall_reading_after.map(|after| now + after);
        Ok(Live {
            index: joined.index,
            ws: joined.ws,
            ws_open: true,
            media,
            media_token,
            deframer: Deframer::default(),
            stall_reading_at,
            tcp_errors: 0,
            peer,
            opened_at: joined.opened_at,
            connected_at: None,
            first_media_at: None,
            watches: HashMap::new(),
            slot_watches: Vec::new(),
            slot_of_ssrc: HashMap::new(),
            unknown_ssrcs: HashSet::new(),
            signal_errors: 0,
            failed: None,
            done: false,
        })
    }

    /// Copies every participant's statistics to the shared table (one lock).
    fn publish(&self, live: &mut [Live], now: Instant) {
        let simulcast = self
            .shared
            .simulcast_sessions
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let reports: Vec<(usize, ParticipantStats)> = live
            .iter_mut()
            .map(|l| (l.index, l.report(now, self.deadline, &simulcast)))
            .collect();
        if let Ok(mut stats) = self.shared.stats.lock() {
            for (index, report) in reports {
                if let Some(s) = stats.get_mut(index) {
                    let keep = (s.join_started_s, s.welcome_ms);
                    *s = ParticipantStats {
                        index,
                        call: std::mem::take(&mut s.call),
                        user: std::mem::take(&mut s.user),
                        speaking: s.speaking,
                        simulcast: s.simulcast,
                        transport: s.transport,
                        join_started_s: keep.0,
                        welcome_ms: keep.1,
                        ..report
                    };
                }
            }
        }
    }
}

/// The local address the kernel would use to reach `server`.
fn local_ip_towards(server: SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let probe = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(server)?;
    Ok(probe.local_addr()?.ip())
}

impl Live {
    fn read_signaling(&mut self, now: Instant) {
        while self.ws_open {
            match self.ws.read() {
                Ok(Message::Text(text)) => self.on_server_text(text.as_str(), now),
                Ok(Message::Close(frame)) => {
                    self.ws_open = false;
                    if !self.done {
                        self.failed = Some(match frame {
                            Some(f) => {
                                format!("server closed ({}): {}", u16::from(f.code), f.reason)
                            }
                            None => "server closed the WebSocket".to_owned(),
                        });
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.ws_open = false;
                    self.failed = Some(format!("WebSocket: {e}"));
                }
            }
        }
    }

    fn on_server_text(&mut self, text: &str, now: Instant) {
        match ServerMessage::from_json(text) {
            Ok(msg) => {
                if matches!(msg, ServerMessage::Error { .. }) {
                    self.signal_errors += 1;
                }
                self.peer.handle_signal(msg, now);
            }
            // Server-only messages (`welcome`, `draining`, …) are not the router's.
            Err(_) => {
                let known = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_owned))
                    .is_some_and(|t| t == "welcome" || t == "draining");
                if !known {
                    self.signal_errors += 1;
                }
            }
        }
    }

    fn read_media(&mut self, buf: &mut [u8], now: Instant) {
        let got = match self.media {
            MediaSocket::Udp(_) => self.read_udp(buf, now),
            MediaSocket::Tcp(_) => self.read_tcp(buf, now),
        };
        if !got {
            return;
        }
        if self.connected_at.is_none() && self.peer.is_connected() {
            self.connected_at = Some(now);
        }
        if self.first_media_at.is_none() && self.peer.packets_received() > 0 {
            self.first_media_at = Some(now);
        }
        for (publisher, source, stats) in self.peer.received() {
            if source.is_audio() {
                continue;
            }
            let watch = self.watches.entry((publisher.0, source)).or_default();
            watch.freeze.observe(stats.last_packet_at);
        }
        for slot in self.slot_watches.iter_mut().filter(|s| s.video) {
            if let Some(stats) = self.peer.slot_stats().get(slot.mid.as_str()) {
                slot.watch.freeze.observe(stats.last_packet_at);
            }
        }
    }

    /// Every datagram waiting on the UDP socket; whether there was one.
    fn read_udp(&mut self, buf: &mut [u8], now: Instant) -> bool {
        let mut got = false;
        while let MediaSocket::Udp(udp) = &self.media {
            match udp.recv_from(buf) {
                Ok((n, source)) => {
                    self.receive(Proto::Udp, source, &buf[..n], now);
                    got = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP port unreachable and the like: keep going.
                Err(_) => break,
            }
        }
        got
    }

    /// Everything waiting on the ICE-TCP connection, frame by frame; whether there was
    /// anything. A closed connection or an oversized frame ends the participant's media.
    /// A stalled reader reads nothing: what the server sends piles up in the kernel's buffers.
    fn read_tcp(&mut self, buf: &mut [u8], now: Instant) -> bool {
        if self.stall_reading_at.is_some_and(|at| now >= at) {
            return false;
        }
        let mut got = false;
        while let MediaSocket::Tcp(link) = &mut self.media {
            let Some(server) = link.server() else {
                break;
            };
            let n = match link.read(buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    self.tcp_failed(e);
                    break;
                }
            };
            got = true;
            // The peer is handed each frame as it completes, like a datagram.
            let mut deframer = std::mem::take(&mut self.deframer);
            let deframed = deframer.push(&buf[..n], |frame| {
                self.receive(Proto::Tcp, server, frame, now);
            });
            self.deframer = deframer;
            if let Err(len) = deframed {
                self.tcp_failed(TcpLinkError::FrameTooLarge(len));
                break;
            }
        }
        got
    }

    /// The ICE-TCP connection failed: count it, close it, and end the participant's media.
    fn tcp_failed(&mut self, error: TcpLinkError) {
        self.tcp_errors += 1;
        if let MediaSocket::Tcp(link) = &mut self.media {
            link.close();
        }
        if !self.done && self.failed.is_none() {
            self.failed = Some(format!("ICE-TCP: {error}"));
        }
    }

    /// One datagram (or ICE-TCP frame) from the server, to the peer and the jitter/layer
    /// bookkeeping.
    fn receive(&mut self, proto: Proto, source: SocketAddr, datagram: &[u8], now: Instant) {
        let arrival = Instant::now();
        self.peer.handle_receive(proto, source, datagram, now);
        if let Some((ssrc, rtp_time)) = clear_rtp_header(datagram) {
            self.on_rtp(ssrc, rtp_time, arrival);
        }
    }

    /// An RTP packet of `ssrc` was just handed to the peer: its jitter, and for video the
    /// bytes it added, counted on the layer the stream is on, for its slot and for the
    /// publisher the slot carries.
    fn on_rtp(&mut self, ssrc: u32, rtp_time: u32, arrival: Instant) {
        let index = match self.slot_of_ssrc.get(&ssrc) {
            Some(index) => *index,
            None if self.unknown_ssrcs.contains(&ssrc) => return,
            None => {
                let found = self
                    .peer
                    .slot_stats()
                    .iter()
                    .find(|(_, stats)| stats.packets > 0 && stats.ssrc == ssrc)
                    .map(|(mid, _)| mid.clone());
                // The slot's kind comes with its mapping, which precedes its first packet.
                let kind = found
                    .as_ref()
                    .and_then(|mid| self.peer.slots().get(mid))
                    .map(|s| s.kind);
                let (Some(mid), Some(kind)) = (found, kind) else {
                    self.unknown_ssrcs.insert(ssrc);
                    return;
                };
                let index = match self.slot_watches.iter().position(|s| s.mid == mid) {
                    Some(index) => index,
                    None => {
                        self.slot_watches.push(SlotWatch {
                            mid,
                            video: kind != SlotKind::Audio,
                            watch: TrackWatch::default(),
                        });
                        self.slot_watches.len() - 1
                    }
                };
                self.slot_of_ssrc.insert(ssrc, index);
                index
            }
        };
        let slot = &mut self.slot_watches[index];
        let is_audio = !slot.video;
        let clock = clock_rate(is_audio);
        slot.watch.jitter.on_packet(ssrc, arrival, rtp_time, clock);
        if let (false, Some(stream)) = (is_audio, self.peer.slot_stats().get(slot.mid.as_str())) {
            slot.watch.layers.count(stream);
        }
        let Some(mapped) = self.peer.slots().get(&slot.mid) else {
            return;
        };
        let (Some(publisher), Some(source)) = (mapped.session, mapped.source) else {
            return;
        };
        let Some(stats) = self.peer.received_from(publisher, source) else {
            return;
        };
        let watch = self.watches.entry((publisher.0, source)).or_default();
        watch.jitter.on_packet(ssrc, arrival, rtp_time, clock);
        if !is_audio {
            watch.layers.count(stats);
        }
    }

    fn flush(&mut self, server: SocketAddr, registry: &Registry) {
        if self.ws_open {
            for signal in self.peer.take_signals() {
                let json = match signal {
                    PeerSignal::Message(msg) => msg.to_json(),
                    PeerSignal::Json(text) => text,
                };
                self.send_ws(Message::text(json));
            }
            match self.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.ws_open = false;
                    self.failed = Some(format!("WebSocket: {e}"));
                }
            }
        } else {
            self.peer.take_signals();
        }
        for transmit in self.peer.take_transmits() {
            // Only to the server: a peer never sends elsewhere on a loopback test.
            let to = transmit.destination;
            if to.ip() != server.ip() && !to.ip().is_loopback() {
                continue;
            }
            match (&mut self.media, transmit.proto) {
                (MediaSocket::Udp(udp), Proto::Udp) => {
                    let _ = udp.send_to(&transmit.contents, to);
                }
                (MediaSocket::Tcp(link), Proto::Tcp) => {
                    if let Err(e) = link.send(to, &transmit.contents, registry, self.media_token) {
                        self.tcp_failed(e);
                    }
                }
                _ => {}
            }
        }
        if let MediaSocket::Tcp(link) = &mut self.media {
            if let Err(e) = link.write() {
                self.tcp_failed(e);
            }
        }
    }

    fn send_ws(&mut self, msg: Message) {
        match self.ws.send(msg) {
            Ok(()) => {}
            // Queued in tungstenite's buffer; flushed on the next `flush`.
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                self.ws_open = false;
                self.failed = Some(format!("WebSocket: {e}"));
            }
        }
    }

    /// Leave: `{"type":"leave"}`, close the WebSocket, close the peer. Idempotent.
    fn finish(&mut self, now: Instant) {
        if self.done {
            return;
        }
        self.done = true;
        self.freeze_check_at_end(now);
        if self.ws_open {
            self.send_ws(Message::text(r#"{"type":"leave"}"#));
            let _ = self.ws.close(None);
            let stream = self.ws.get_mut();
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = self.ws.flush();
            let _ = self.ws.get_mut().shutdown(std::net::Shutdown::Both);
            self.ws_open = false;
        }
        self.peer.close();
        if let MediaSocket::Tcp(link) = &mut self.media {
            link.close();
        }
    }

    fn freeze_check_at_end(&mut self, now: Instant) {
        let slots = self.slot_watches.iter_mut().map(|s| &mut s.watch.freeze);
        for watch in self
            .watches
            .values_mut()
            .map(|w| &mut w.freeze)
            .chain(slots)
        {
            watch.finish(now);
        }
    }

    fn report(
        &mut self,
        now: Instant,
        deadline: Instant,
        simulcast: &HashSet<u64>,
    ) -> ParticipantStats {
        // A slot the peer saw since the last look can be found by its SSRC now.
        self.unknown_ssrcs.clear();
        let end = now.min(deadline);
        let mut r = ParticipantStats {
            state: if self.failed.is_some() {
                "failed"
            } else if self.done {
                "done"
            } else if self.connected_at.is_some() {
                "connected"
            } else {
                "joined"
            },
            error: self.failed.clone(),
            session: Some(self.peer.session().0),
            connected_ms: self
                .connected_at
                .map(|t| millis(t.saturating_duration_since(self.opened_at))),
            join_ms: self
                .first_media_at
                .map(|t| millis(t.saturating_duration_since(self.opened_at))),
            keyframe_requests: self.peer.keyframe_requests(),
            signal_errors: self.signal_errors,
            speaker_messages: self.peer.signal_count("speaker"),
            layers_messages: self.peer.signal_count("layers"),
            tcp_errors: self.tcp_errors,
            tcp_frames_dropped: match &self.media {
                MediaSocket::Tcp(link) => link.frames_dropped(),
                MediaSocket::Udp(_) => 0,
            },
            misattributed: self.peer.misattributed(),
            ..ParticipantStats::default()
        };
        for (mid, stream) in self.peer.slot_stats() {
            let Some(slot) = self.peer.slots().get(mid) else {
                continue;
            };
            let watch = self
                .slot_watches
                .iter()
                .find(|s| s.mid == *mid)
                .map(|s| s.watch)
                .unwrap_or_default();
            let previous = self.peer.slots().previous(mid).map(|(s, _)| s.0);
            r.slots.push(slot_report(slot, previous, stream, &watch));
        }
        for source in [
            TrackSource::Microphone,
            TrackSource::Camera,
            TrackSource::Screen,
        ] {
            let sent = self.peer.sent(source);
            r.packets_sent += sent.packets;
            r.bytes_sent += sent.bytes;
        }
        if let Some(t) = self.connected_at {
            let secs = end.saturating_duration_since(t).as_secs_f64();
            if secs > 0.0 {
                r.tx_kbps = r.bytes_sent as f64 * 8.0 / secs / 1000.0;
            }
        }
        // Simulcast payload bytes by RID, over all tracks.
        let mut layer_bytes = LayerKbps::default();
        for (publisher, source, stats) in self.peer.received() {
            let watch = self
                .watches
                .get(&(publisher.0, source))
                .copied()
                .unwrap_or_default();
            let is_simulcast = !source.is_audio() && simulcast.contains(&publisher.0);
            let track = track_report(publisher.0, source, stats, &watch, is_simulcast);
            if is_simulcast {
                for (index, bytes) in watch.layers.by_layer.iter().enumerate() {
                    if let Some(rid) = layer_rid(source, index) {
                        layer_bytes.add(rid, *bytes as f64);
                    }
                }
            }
            let jitter = if source.is_audio() {
                &mut r.audio_jitter_ms
            } else {
                &mut r.video_jitter_ms
            };
            if let Some(j) = track.jitter_ms {
                *jitter = Some(jitter.map_or(j, |worst| worst.max(j)));
            }
            r.max_frame_gap_ms = r.max_frame_gap_ms.max(track.max_frame_gap_ms);
            r.packets_received += stats.packets;
            r.bytes_received += stats.bytes;
            r.lost += stats.gaps;
            r.late_or_duplicate += stats.late_or_duplicate;
            r.freezes += watch.freeze.count;
            r.tracks.push(track);
        }
        let delay = self.peer.audio_delay();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        r.audio_delay_p50_ms = ms(delay.quantile(0.5));
        r.audio_delay_p99_ms = ms(delay.quantile(0.99));
        r.audio_delay_max_ms = ms(delay.max());
        for stats in self.peer.unattributed().values() {
            r.packets_received += stats.packets;
            r.bytes_received += stats.bytes;
            r.lost += stats.gaps;
        }
        if r.packets_received + r.lost > 0 {
            r.loss = r.lost as f64 / (r.packets_received + r.lost) as f64;
        }
        if let Some(t) = self.first_media_at {
            r.media_s = end.saturating_duration_since(t).as_secs_f64();
            if r.media_s > 0.0 {
                r.rx_kbps = r.bytes_received as f64 * 8.0 / r.media_s / 1000.0;
                let kbps = |bytes: f64| bytes * 8.0 / r.media_s / 1000.0;
                r.rx_kbps_by_layer = LayerKbps {
                    q: kbps(layer_bytes.q),
                    h: kbps(layer_bytes.h),
                    f: kbps(layer_bytes.f),
                };
            }
        }
        r
    }
}

/// The bitrate of `bytes` over the span between a stream's first and last packet, kbit/s.
fn span_kbps(stats: &TrackStats) -> impl Fn(u64) -> f64 {
    let span = match (stats.first_packet_at, stats.last_packet_at) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    move |bytes: u64| {
        if span > 0.0 {
            bytes as f64 * 8.0 / span / 1000.0
        } else {
            0.0
        }
    }
}

/// One receive slot's report from the peer's statistics and the media thread's own.
fn slot_report(
    slot: &calls_core::SlotInfo,
    previous: Option<u64>,
    stats: &TrackStats,
    watch: &TrackWatch,
) -> SlotReport {
    let kbps = span_kbps(stats);
    let jitter = watch.jitter.millis();
    let source = slot_source(slot.kind);
    SlotReport {
        mid: slot.mid.clone(),
        kind: slot.kind.as_str(),
        session: slot.session.map(|s| s.0),
        source: slot.source.map(TrackSource::as_str),
        last_session: slot.session.map(|s| s.0).or(previous),
        packets: stats.packets,
        bytes: stats.bytes,
        lost: stats.gaps,
        keyframes: stats.keyframes,
        kbps: kbps(stats.bytes),
        freezes: watch.freeze.count,
        freeze_ms: millis(watch.freeze.frozen),
        frames_by_layer: stats.frames_by_layer,
        layer: stats
            .last_layer
            .and_then(|l| layer_rid(source, usize::from(l))),
        layer_switches: stats.layer_changes.len().saturating_sub(1) as u64,
        max_frame_gap_ms: millis(stats.max_frame_gap),
        jitter_ms: jitter.map(|(j, _)| j),
        jitter_max_ms: jitter.map(|(_, max)| max),
        ssrc_changes: stats.ssrc_changes,
        picture_id_breaks: stats.picture_id_breaks,
        switches_off_keyframe: stats.switches_off_keyframe,
    }
}

/// One received track's report from the peer's statistics and the media thread's own.
fn track_report(
    publisher: u64,
    source: TrackSource,
    stats: &TrackStats,
    watch: &TrackWatch,
    is_simulcast: bool,
) -> TrackReport {
    let kbps = span_kbps(stats);
    let kbps_by_layer = is_simulcast.then(|| {
        let mut by_layer = LayerKbps::default();
        for (index, bytes) in watch.layers.by_layer.iter().enumerate() {
            if let Some(rid) = layer_rid(source, index) {
                by_layer.add(rid, kbps(*bytes));
            }
        }
        by_layer
    });
    let jitter = watch.jitter.millis();
    TrackReport {
        publisher,
        source: source.as_str(),
        packets: stats.packets,
        bytes: stats.bytes,
        lost: stats.gaps,
        keyframes: stats.keyframes,
        kbps: kbps(stats.bytes),
        freezes: watch.freeze.count,
        freeze_ms: millis(watch.freeze.frozen),
        simulcast: is_simulcast,
        kbps_by_layer,
        frames_by_layer: stats.frames_by_layer,
        layer: stats
            .last_layer
            .filter(|_| is_simulcast)
            .and_then(|l| layer_rid(source, usize::from(l))),
        layer_switches: stats.layer_changes.len().saturating_sub(1) as u64,
        max_frame_gap_ms: millis(stats.max_frame_gap),
        jitter_ms: jitter.map(|(j, _)| j),
        jitter_max_ms: jitter.map(|(_, max)| max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(encode("user-1_x.y~"), "user-1_x.y~");
    }

    #[test]
    fn urls_resolve_with_or_without_a_scheme() {
        let (addr, host) = resolve("http://127.0.0.1:8080/").expect("resolves");
        assert_eq!(addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(host, "127.0.0.1:8080");
        assert!(resolve("ws://127.0.0.1:9/x").is_ok());
        assert!(matches!(
            resolve("https://127.0.0.1:8080"),
            Err(SwarmError::BadUrl(_))
        ));
    }

    #[test]
    fn layers_are_named_by_rid() {
        assert_eq!(layer_rid(TrackSource::Camera, 0), Some("q"));
        assert_eq!(layer_rid(TrackSource::Camera, 2), Some("f"));
        assert_eq!(layer_rid(TrackSource::Screen, 0), Some("h"));
        assert_eq!(layer_rid(TrackSource::Screen, 2), None);
        assert_eq!(layer_rid(TrackSource::Microphone, 0), None);
    }

    fn speaker(transport: Transport) -> ParticipantSpec {
        ParticipantSpec {
            call: "c".into(),
            user: "u".into(),
            token: None,
            audio: true,
            video: false,
            screen: false,
            simulcast: true,
            speaking: true,
            muted: false,
            dtx: true,
            start_after: Duration::ZERO,
            seed: 1,
            transport,
            stall_reading_after: None,
        }
    }

    fn swarm_of(url: &str, participants: Vec<ParticipantSpec>) -> SwarmConfig {
        SwarmConfig {
            url: url.into(),
            participants,
            duration: Duration::from_secs(1),
            threads: 1,
            allow_remote: false,
        }
    }

    #[test]
    fn a_swarm_refuses_a_remote_server() {
        let config = swarm_of("http://192.0.2.1:8080", vec![speaker(Transport::Udp)]);
        assert!(matches!(
            Swarm::start(config),
            Err(SwarmError::NotLoopback(_))
        ));
    }

    #[test]
    fn only_an_ice_tcp_participant_can_stall_its_reads() {
        let stalled = ParticipantSpec {
            stall_reading_after: Some(Duration::from_secs(1)),
            ..speaker(Transport::Udp)
        };
        let config = swarm_of("http://127.0.0.1:9", vec![speaker(Transport::Udp), stalled]);
        match Swarm::start(config) {
            Err(SwarmError::BadConfig(e)) => {
                assert_eq!(e, "participant 1: stall_reading_after needs transport tcp");
            }
            other => panic!("a stalled UDP reader was not refused: {other:?}"),
        }
    }
}
