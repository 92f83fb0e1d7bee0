//! The load tester's engine: simulated participants ([`SimPeer`]s) on Rust threads, each with a
//! real UDP socket and a WebSocket to the reference server's `/ws` signaling.
//!
//! A [`Swarm`] splits its participants over `threads` media threads. Each media thread has a
//! connector thread that opens the WebSockets in start order (ramp-up) and waits for the
//! server's `welcome`; the media thread then owns the participant: it feeds the WebSocket's
//! messages and the socket's datagrams to the peer, wakes it on its timers (20 ms Opus, 30 fps
//! VP8, str0m's own), and sends what it wants sent. One `mio` poll per media thread waits for
//! all of its sockets. Statistics are published to a shared table four times a second.
//!
//! Everything is bounded: each participant stops at the swarm's deadline (or on
//! [`Swarm::stop`]), says `{"type":"leave"}`, closes its WebSocket and drops its socket.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use calls_core::sim::{PeerOptions, PeerSignal, SimPeer};
use calls_core::{ServerMessage, SessionId, TrackSource, UserId};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// A gap longer than this between two packets of a video track is a freeze.
const FREEZE: Duration = Duration::from_millis(500);
/// How often a media thread publishes its participants' statistics.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// The longest a media thread sleeps (it also wakes for peers' timers and sockets).
const MAX_WAIT: Duration = Duration::from_millis(50);
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
    /// Talk: audio levels of speech. A non-speaker sends silence (level -127) or is muted.
    pub speaking: bool,
    /// A non-speaker is muted (`{"type":"mute"}`; the router forwards nothing) instead of
    /// sending silence that the router forwards.
    pub muted: bool,
    /// When to join, after the swarm starts (ramp-up).
    pub start_after: Duration,
    /// Seed of the peer's synthetic media.
    pub seed: u64,
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
    /// No participants, no threads, or a zero duration.
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
    /// Per publisher track.
    pub tracks: Vec<TrackReport>,
}

/// Shared between the swarm handle and its threads.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    running_threads: AtomicUsize,
    stats: Mutex<Vec<ParticipantStats>>,
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
                state: "waiting",
                ..ParticipantStats::default()
            })
            .collect();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            running_threads: AtomicUsize::new(threads),
            stats: Mutex::new(stats),
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
        let (mut ws, _) =
            tungstenite::client(url.as_str(), stream).map_err(|e| format!("handshake: {e}"))?;
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

/// Freeze bookkeeping of one received video track.
#[derive(Debug, Default, Clone, Copy)]
struct FreezeWatch {
    last: Option<Instant>,
    freezes: u64,
    frozen: Duration,
}

/// A participant owned by a media thread.
struct Live {
    index: usize,
    ws: WebSocket<TcpStream>,
    ws_open: bool,
    udp: mio::net::UdpSocket,
    peer: SimPeer,
    opened_at: Instant,
    connected_at: Option<Instant>,
    first_media_at: Option<Instant>,
    freezes: HashMap<(u64, &'static str), FreezeWatch>,
    signal_errors: u64,
    failed: Option<String>,
    done: bool,
}

/// Runs the media of one thread's participants.
struct MediaThread {
    shared: Arc<Shared>,
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
        let mut ready: Vec<bool> = Vec::with_capacity(expected);
        let mut next_publish = Instant::now();
        let mut buf = vec![0u8; 2048];
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
                        let mut l = self.adopt(joined, now)?;
                        poll.registry().register(
                            &mut l.udp,
                            Token(slot * 2),
                            Interest::READABLE,
                        )?;
                        let fd = l.ws.get_ref().as_raw_fd();
                        poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(slot * 2 + 1),
                            Interest::READABLE,
                        )?;
                        live.push(l);
                        // The connector may have read past the welcome: look now.
                        ready.push(true);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        connector_gone = true;
                        break;
                    }
                }
            }
            // Wait for sockets or the next timer.
            let mut wake = self.deadline.min(next_publish);
            for l in live.iter().filter(|l| !l.done) {
                if let Some(at) = l.peer.poll_timeout() {
                    wake = wake.min(at);
                }
            }
            let cap = if connector_gone {
                MAX_WAIT
            } else {
                Duration::from_millis(5)
            };
            let wait = wake.saturating_duration_since(Instant::now()).min(cap);
            if !ready.iter().any(|r| *r) {
                match poll.poll(&mut events, Some(wait)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for event in events.iter() {
                    if let Some(r) = ready.get_mut(event.token().0 / 2) {
                        *r = true;
                    }
                }
            }
            let now = Instant::now();
            for (slot, l) in live.iter_mut().enumerate() {
                if l.done {
                    continue;
                }
                if std::mem::take(&mut ready[slot]) {
                    l.read_signaling(now);
                    l.read_media(&mut buf, now);
                }
                if l.peer.poll_timeout().is_some_and(|at| at <= now) {
                    l.peer.handle_timeout(now);
                }
                l.flush(self.server);
                if l.failed.is_some() {
                    l.finish(now);
                }
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

    fn adopt(&self, joined: Joined, now: Instant) -> std::io::Result<Live> {
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
        let udp = UdpSocket::bind(bind)?;
        udp.set_nonblocking(true)?;
        let udp = {
            let socket = socket2::Socket::from(udp);
            // Best effort: the default buffer still works, it only drops sooner.
            let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
            UdpSocket::from(socket)
        };
        let addr = udp.local_addr()?;
        let spec = &joined.spec;
        let options = PeerOptions {
            audio: spec.audio,
            video: spec.video,
            screen: spec.screen,
            ..PeerOptions::default()
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
        Ok(Live {
            index: joined.index,
            ws: joined.ws,
            ws_open: true,
            udp: mio::net::UdpSocket::from_std(udp),
            peer,
            opened_at: joined.opened_at,
            connected_at: None,
            first_media_at: None,
            freezes: HashMap::new(),
            signal_errors: 0,
            failed: None,
            done: false,
        })
    }

    /// Copies every participant's statistics to the shared table (one lock).
    fn publish(&self, live: &mut [Live], now: Instant) {
        let reports: Vec<(usize, ParticipantStats)> = live
            .iter_mut()
            .map(|l| (l.index, l.report(now, self.deadline)))
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

fn source_name(source: TrackSource) -> &'static str {
    source.as_str()
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
        let mut got = false;
        loop {
            match self.udp.recv_from(buf) {
                Ok((n, source)) => {
                    self.peer.handle_datagram(source, &buf[..n], now);
                    got = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP port unreachable and the like: keep going.
                Err(_) => break,
            }
        }
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
            let watch = self
                .freezes
                .entry((publisher.0, source_name(source)))
                .or_default();
            if let (Some(prev), Some(last)) = (watch.last, stats.last_packet_at) {
                let gap = last.saturating_duration_since(prev);
                if gap > FREEZE {
                    watch.freezes += 1;
                    watch.frozen += gap;
                }
            }
            watch.last = stats.last_packet_at;
        }
    }

    fn flush(&mut self, server: SocketAddr) {
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
            if to.ip() == server.ip() || to.ip().is_loopback() {
                let _ = self.udp.send_to(&transmit.contents, to);
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
    }

    fn freeze_check_at_end(&mut self, now: Instant) {
        for watch in self.freezes.values_mut() {
            if let Some(last) = watch.last {
                let gap = now.saturating_duration_since(last);
                if gap > FREEZE {
                    watch.freezes += 1;
                    watch.frozen += gap;
                }
            }
        }
    }

    fn report(&mut self, now: Instant, deadline: Instant) -> ParticipantStats {
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
            ..ParticipantStats::default()
        };
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
        for (publisher, source, stats) in self.peer.received() {
            let name = source_name(source);
            let watch = self
                .freezes
                .get(&(publisher.0, name))
                .copied()
                .unwrap_or_default();
            let span = match (stats.first_packet_at, stats.last_packet_at) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
                _ => 0.0,
            };
            r.packets_received += stats.packets;
            r.bytes_received += stats.bytes;
            r.lost += stats.gaps;
            r.late_or_duplicate += stats.late_or_duplicate;
            r.freezes += watch.freezes;
            r.tracks.push(TrackReport {
                publisher: publisher.0,
                source: name,
                packets: stats.packets,
                bytes: stats.bytes,
                lost: stats.gaps,
                keyframes: stats.keyframes,
                kbps: if span > 0.0 {
                    stats.bytes as f64 * 8.0 / span / 1000.0
                } else {
                    0.0
                },
                freezes: watch.freezes,
                freeze_ms: millis(watch.frozen),
            });
        }
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
            }
        }
        r
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
    fn a_swarm_refuses_a_remote_server() {
        let spec = ParticipantSpec {
            call: "c".into(),
            user: "u".into(),
            token: None,
            audio: true,
            video: false,
            screen: false,
            speaking: true,
            muted: false,
            start_after: Duration::ZERO,
            seed: 1,
        };
        let config = SwarmConfig {
            url: "http://192.0.2.1:8080".into(),
            participants: vec![spec],
            duration: Duration::from_secs(1),
            threads: 1,
            allow_remote: false,
        };
        assert!(matches!(
            Swarm::start(config),
            Err(SwarmError::NotLoopback(_))
        ));
    }
}
