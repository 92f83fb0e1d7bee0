//! Server configuration: a TOML file (`--config PATH` or `CALLS_CONFIG`) overlaid with
//! `CALLS_*` environment variables. Every problem is reported at once, file problems with
//! `file:line:column`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A TURN server handed to clients, with time-limited REST credentials when `secret` is set.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnServer {
    /// `turn:` / `turns:` URLs.
    pub urls: Vec<String>,
    /// Shared secret (coturn `static-auth-secret`) for TURN REST credentials.
    pub secret: Option<String>,
    /// Lifetime of minted credentials, seconds.
    #[serde(default = "default_turn_ttl")]
    pub ttl_s: u64,
}

fn default_turn_ttl() -> u64 {
    86_400
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the media sockets (UDP and TCP).
    pub media_bind: IpAddr,
    /// UDP media port.
    pub udp_port: u16,
    /// TCP media port (ICE-TCP); 0 disables TCP.
    pub tcp_port: u16,
    /// Disable UDP media (TCP candidates only) — for testing TCP fallback.
    pub disable_udp: bool,
    /// Addresses advertised as host candidates (public IP behind NAT, …).
    pub ice_host_override: Vec<IpAddr>,
    /// Port advertised instead of the media ports (port forwarding).
    pub ice_port_override: Option<u16>,
    /// STUN server (`host:port`) used once at start to discover the public IP; failures only log.
    pub stun_server: Option<String>,
    /// TURN servers handed to clients.
    pub turn_servers: Vec<TurnServer>,
    /// HTTP + WebSocket signaling listener.
    pub http_listen: SocketAddr,
    /// Admin API listener; needs `admin_api_key`.
    pub admin_listen: SocketAddr,
    /// Bearer key for the admin API; the admin API is off without it.
    pub admin_api_key: Option<String>,
    /// Shared secret (HS256) the chat server signs join tokens with. Without it the server runs
    /// in demo mode (open joins), which is only allowed when HTTP listens on loopback.
    pub auth_secret: Option<String>,
    /// Allow open joins even though HTTP is not on loopback (never in production).
    pub demo_mode_anywhere: bool,
    /// Origins allowed to open the WebSocket (empty: same host as the page only).
    pub allowed_origins: Vec<String>,
    /// Participants per call.
    pub max_participants_per_call: usize,
    /// Audio streams forwarded per call (the loudest; 0 = every unmuted microphone).
    pub top_n_audio: usize,
    /// Audio receive slots per participant (the loudest voices heard at once).
    pub audio_slots: usize,
    /// Camera receive slots per participant unless its client asks for another number.
    pub video_slots: usize,
    /// Most camera slots a client may ask for.
    pub max_video_slots: usize,
    /// Negotiate Opus RED (RFC 2198 redundant audio) with clients that offer it.
    pub red: bool,
    pub opus_dtx: bool,
    /// A new UDP address of a session gets media only after it answered the router's binding
    /// request (no media redirection to a spoofed address; docs/security.md).
    pub consent_checks: bool,
    /// Sending audio m-lines one session's offer may carry.
    pub max_microphones_per_session: usize,
    /// Sending video m-lines other than the screen one session's offer may carry.
    pub max_cameras_per_session: usize,
    /// Sending screen m-lines one session's offer may carry.
    pub max_screens_per_session: usize,
    /// M-lines of any direction in one client offer.
    pub max_mlines_per_offer: usize,
    /// Simulcast layers one track may send.
    pub max_simulcast_layers: usize,
    /// Router worker threads (0: one per core).
    pub workers: usize,
    /// How long a dropped WebSocket may reconnect and resume its session, seconds.
    pub reconnect_grace_s: u64,
    /// How long calls may go on after SIGTERM/SIGINT before the server exits, seconds.
    pub drain_deadline_s: u64,
    /// WebSocket messages larger than this close the connection.
    pub ws_max_message_bytes: usize,
    /// Sustained WebSocket messages per second per connection (bursts of 4× allowed).
    pub ws_messages_per_second: u32,
    /// Media-port probe credential (`calls probe`): ufrag and a 22+ character password.
    pub probe_ufrag: Option<String>,
    pub probe_password: Option<String>,
    /// Log filter (`info`, `debug`, `calls_core=debug,info`, …); `RUST_LOG` wins if set.
    pub log_level: String,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
    /// Open ICE-TCP connections, all sources together; beyond it new ones are closed at once.
    pub tcp_max_connections: usize,
    /// Open ICE-TCP connections from one source IP.
    pub tcp_max_connections_per_ip: usize,
    /// Frames waiting to be written on one ICE-TCP connection; a connection whose client does
    /// not read them is closed when its queue is full.
    pub tcp_write_queue_frames: usize,
    /// Live sessions of one user in one call (the token's `sub`); a join beyond it ends the
    /// user's oldest session there ("newest wins"). 0: no limit.
    pub max_sessions_per_user: usize,
    /// The join token's `aud` must be this, when set.
    pub auth_audience: Option<String>,
    /// The join token's `iss` must be this, when set.
    pub auth_issuer: Option<String>,
    /// Per-session series (`calls_session_*{call,session}`) in `/metrics`; off by default
    /// (unbounded cardinality).
    pub metrics_per_session: bool,
    /// Sessions one worker takes; joins beyond it are refused (`router_full`).
    pub worker_max_sessions: usize,
    /// A call with this many participants takes its next joins on the least loaded worker,
    /// relaying tracks between its workers (0: a call stays on one worker). A call also
    /// spreads when its worker is degraded or overloaded.
    pub call_spread_after: usize,
    /// Commands (signaling, joins, STUN/DTLS/RTCP, ICE-TCP bytes) queued for one worker.
    pub worker_queue_commands: usize,
    /// RTP datagrams queued for one worker; beyond it the newest are dropped (counted).
    pub worker_queue_datagrams: usize,
    /// Messages queued for one WebSocket; a client that lets it fill up is closed (4009).
    pub ws_send_queue_messages: usize,
    /// A worker whose loop has not gone round this long makes `/healthz` answer 503.
    pub worker_stall_s: u64,
    /// Overload: lag (ms) that makes a worker refuse joins and cap video at its lowest layer.
    pub overload_degrade_lag_ms: u64,
    /// Overload: lag (ms) that makes a worker stop forwarding cameras (audio goes on).
    pub overload_shed_video_lag_ms: u64,
    /// Overload: a worker busy this percentage of the time refuses joins.
    pub overload_busy_percent: u8,
    /// Overload: calm time (ms) before a worker steps down one level; the retry hint.
    pub overload_recover_ms: u64,
    /// Where recordings are written (one folder per recording); recording is off without it.
    pub recording_dir: Option<PathBuf>,
    /// File chunks waiting for the recording writer thread; beyond it chunks are dropped
    /// (counted) and their file ends there, so the media loop never waits for the disk.
    pub recording_queue_chunks: usize,
    /// This node's number among the nodes a call can span (0-255; required with the relay).
    /// It is the high bits of the session ids this node gives out, so they are unique across
    /// nodes (docs/relay.md, "Between nodes").
    pub node_id: Option<u8>,
    /// UDP address of the node relay (QUIC); the relay is off unless this or `relay_peers` is
    /// set.
    pub relay_listen: Option<SocketAddr>,
    /// The other nodes: `host:port` or `id=host:port`. The node with the lower id dials.
    pub relay_peers: Vec<String>,
    /// Shared secret of the node relay (both ends prove they hold it); required with the relay.
    pub relay_secret: Option<String>,
    /// Seconds a peer node may stay unreachable before its participants leave this node's calls.
    pub relay_peer_gone_s: u64,
    /// Relay frames queued for one peer node, per lane (media, control); beyond it they are
    /// dropped (counted), so a worker never waits for the network.
    pub relay_queue_frames: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        // The router's own defaults, where a setting passes straight through.
        let core = calls_core::Config::default();
        ServerConfig {
            media_bind: "127.0.0.1".parse().expect("literal"),
            udp_port: 8443,
            tcp_port: 8443,
            disable_udp: false,
            ice_host_override: Vec::new(),
            ice_port_override: None,
            stun_server: None,
            turn_servers: Vec::new(),
            http_listen: "127.0.0.1:8080".parse().expect("literal"),
            admin_listen: "127.0.0.1:8445".parse().expect("literal"),
            admin_api_key: None,
            auth_secret: None,
            demo_mode_anywhere: false,
            allowed_origins: Vec::new(),
            max_participants_per_call: 100,
            top_n_audio: 3,
            audio_slots: 3,
            video_slots: 9,
            max_video_slots: 25,
            red: true,
            opus_dtx: true,
            consent_checks: core.consent_checks,
            max_microphones_per_session: core.max_microphones_per_session,
            max_cameras_per_session: core.max_cameras_per_session,
            max_screens_per_session: core.max_screens_per_session,
            max_mlines_per_offer: core.max_mlines_per_offer,
            max_simulcast_layers: core.max_simulcast_layers,
            workers: 0,
            reconnect_grace_s: 10,
            drain_deadline_s: 60,
            ws_max_message_bytes: 256 * 1024,
            ws_messages_per_second: 50,
            probe_ufrag: None,
            probe_password: None,
            log_level: "info".to_owned(),
            log_json: false,
            tcp_max_connections: 10_000,
            tcp_max_connections_per_ip: 128,
            tcp_write_queue_frames: 512,
            max_sessions_per_user: 1,
            auth_audience: None,
            auth_issuer: None,
            metrics_per_session: false,
            worker_max_sessions: 10_000,
            call_spread_after: 150,
            worker_queue_commands: 4096,
            worker_queue_datagrams: 8192,
            ws_send_queue_messages: 1024,
            worker_stall_s: 10,
            overload_degrade_lag_ms: 50,
            overload_shed_video_lag_ms: 200,
            overload_busy_percent: 90,
            overload_recover_ms: 5_000,
            recording_dir: None,
            recording_queue_chunks: 4096,
            node_id: None,
            relay_listen: None,
            relay_peers: Vec::new(),
            relay_secret: None,
            relay_peer_gone_s: 10,
            relay_queue_frames: 4096,
        }
    }
}

impl ServerConfig {
    /// Loads the file (if any), applies `CALLS_*` variables from `env`, validates.
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut config = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => from_toml(&path.display().to_string(), &text, &mut problems),
                Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
            },
            None => ServerConfig::default(),
        };
        for (key, value) in env {
            let Some(name) = key.strip_prefix("CALLS_") else {
                continue;
            };
            if name == "CONFIG" {
                continue;
            }
            // The variable's name only: its value may be a secret (issue 16, finding 6).
            if let Err(e) = config.set(name, value) {
                problems.push(format!("{key}: {e}"));
            }
        }
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        fn parse<T: std::str::FromStr>(v: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            v.trim().parse::<T>().map_err(|e| e.to_string())
        }
        fn list(v: &str) -> impl Iterator<Item = &str> {
            v.split(',').map(str::trim).filter(|s| !s.is_empty())
        }
        match name {
            "MEDIA_BIND" => self.media_bind = parse(value)?,
            "UDP_PORT" => self.udp_port = parse(value)?,
            "TCP_PORT" => self.tcp_port = parse(value)?,
            "DISABLE_UDP" => self.disable_udp = parse(value)?,
            "ICE_HOST_OVERRIDE" => {
                self.ice_host_override = list(value).map(parse).collect::<Result<_, _>>()?
            }
            "ICE_PORT_OVERRIDE" => self.ice_port_override = Some(parse(value)?),
            "STUN_SERVER" => self.stun_server = Some(value.to_owned()),
            "TURN_URLS" => {
                let urls: Vec<String> = list(value).map(str::to_owned).collect();
                match self.turn_servers.first_mut() {
                    Some(t) => t.urls = urls,
                    None => self.turn_servers.push(TurnServer {
                        urls,
                        secret: None,
                        ttl_s: default_turn_ttl(),
                    }),
                }
            }
            "TURN_SECRET" => match self.turn_servers.first_mut() {
                Some(t) => t.secret = Some(value.to_owned()),
                None => return Err("set CALLS_TURN_URLS too".to_owned()),
            },
            "HTTP_LISTEN" => self.http_listen = parse(value)?,
            "ADMIN_LISTEN" => self.admin_listen = parse(value)?,
            "ADMIN_API_KEY" => self.admin_api_key = Some(value.to_owned()),
            "AUTH_SECRET" => self.auth_secret = Some(value.to_owned()),
            "DEMO_MODE_ANYWHERE" => self.demo_mode_anywhere = parse(value)?,
            "ALLOWED_ORIGINS" => self.allowed_origins = list(value).map(str::to_owned).collect(),
            "MAX_PARTICIPANTS_PER_CALL" => self.max_participants_per_call = parse(value)?,
            "TOP_N_AUDIO" => self.top_n_audio = parse(value)?,
            "AUDIO_SLOTS" => self.audio_slots = parse(value)?,
            "VIDEO_SLOTS" => self.video_slots = parse(value)?,
            "MAX_VIDEO_SLOTS" => self.max_video_slots = parse(value)?,
            "RED" => self.red = parse(value)?,
            "OPUS_DTX" => self.opus_dtx = parse(value)?,
            "CONSENT_CHECKS" => self.consent_checks = parse(value)?,
            "MAX_MICROPHONES_PER_SESSION" => self.max_microphones_per_session = parse(value)?,
            "MAX_CAMERAS_PER_SESSION" => self.max_cameras_per_session = parse(value)?,
            "MAX_SCREENS_PER_SESSION" => self.max_screens_per_session = parse(value)?,
            "MAX_MLINES_PER_OFFER" => self.max_mlines_per_offer = parse(value)?,
            "MAX_SIMULCAST_LAYERS" => self.max_simulcast_layers = parse(value)?,
            "WORKERS" => self.workers = parse(value)?,
            "RECONNECT_GRACE_S" => self.reconnect_grace_s = parse(value)?,
            "DRAIN_DEADLINE_S" => self.drain_deadline_s = parse(value)?,
            "WS_MAX_MESSAGE_BYTES" => self.ws_max_message_bytes = parse(value)?,
            "WS_MESSAGES_PER_SECOND" => self.ws_messages_per_second = parse(value)?,
            "PROBE_UFRAG" => self.probe_ufrag = Some(value.to_owned()),
            "PROBE_PASSWORD" => self.probe_password = Some(value.to_owned()),
            "LOG_LEVEL" => self.log_level = value.to_owned(),
            "LOG_JSON" => self.log_json = parse(value)?,
            "TCP_MAX_CONNECTIONS" => self.tcp_max_connections = parse(value)?,
            "TCP_MAX_CONNECTIONS_PER_IP" => self.tcp_max_connections_per_ip = parse(value)?,
            "TCP_WRITE_QUEUE_FRAMES" => self.tcp_write_queue_frames = parse(value)?,
            "MAX_SESSIONS_PER_USER" => self.max_sessions_per_user = parse(value)?,
            "AUTH_AUDIENCE" => self.auth_audience = Some(value.to_owned()),
            "AUTH_ISSUER" => self.auth_issuer = Some(value.to_owned()),
            "METRICS_PER_SESSION" => self.metrics_per_session = parse(value)?,
            "WORKER_MAX_SESSIONS" => self.worker_max_sessions = parse(value)?,
            "CALL_SPREAD_AFTER" => self.call_spread_after = parse(value)?,
            "WORKER_QUEUE_COMMANDS" => self.worker_queue_commands = parse(value)?,
            "WORKER_QUEUE_DATAGRAMS" => self.worker_queue_datagrams = parse(value)?,
            "WS_SEND_QUEUE_MESSAGES" => self.ws_send_queue_messages = parse(value)?,
            "WORKER_STALL_S" => self.worker_stall_s = parse(value)?,
            "OVERLOAD_DEGRADE_LAG_MS" => self.overload_degrade_lag_ms = parse(value)?,
            "OVERLOAD_SHED_VIDEO_LAG_MS" => self.overload_shed_video_lag_ms = parse(value)?,
            "OVERLOAD_BUSY_PERCENT" => self.overload_busy_percent = parse(value)?,
            "OVERLOAD_RECOVER_MS" => self.overload_recover_ms = parse(value)?,
            "RECORDING_DIR" => self.recording_dir = Some(PathBuf::from(value)),
            "RECORDING_QUEUE_CHUNKS" => self.recording_queue_chunks = parse(value)?,
            "NODE_ID" => self.node_id = Some(parse(value)?),
            "RELAY_LISTEN" => self.relay_listen = Some(parse(value)?),
            "RELAY_PEERS" => self.relay_peers = list(value).map(str::to_owned).collect(),
            "RELAY_SECRET" => self.relay_secret = Some(value.to_owned()),
            "RELAY_PEER_GONE_S" => self.relay_peer_gone_s = parse(value)?,
            "RELAY_QUEUE_FRAMES" => self.relay_queue_frames = parse(value)?,
            other => return Err(format!("unknown setting CALLS_{other}")),
        }
        Ok(())
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.tcp_max_connections == 0 || self.tcp_max_connections_per_ip == 0 {
            p.push(
                "`tcp_max_connections` and `tcp_max_connections_per_ip` must be at least 1 (set `tcp_port` 0 to turn ICE-TCP off)"
                    .to_owned(),
            );
        }
        if self.tcp_write_queue_frames < 16 {
            p.push(format!(
                "`tcp_write_queue_frames` {} cannot hold one video frame's packets (minimum 16)",
                self.tcp_write_queue_frames
            ));
        }
        if self.udp_port == 0 && !self.disable_udp {
            p.push("`udp_port` 0 is not a port".to_owned());
        }
        if self.disable_udp && self.tcp_port == 0 {
            p.push("UDP is disabled and `tcp_port` is 0: no media transport left".to_owned());
        }
        if self.media_bind.is_unspecified()
            && self.ice_host_override.is_empty()
            && self.stun_server.is_none()
        {
            p.push(format!(
                "`media_bind` {} is unspecified: set `ice_host_override` (CALLS_ICE_HOST_OVERRIDE) to the address clients reach, or a `stun_server` to discover it",
                self.media_bind
            ));
        }
        if self.auth_secret.is_none()
            && !self.http_listen.ip().is_loopback()
            && !self.demo_mode_anywhere
        {
            p.push(format!(
                "`http_listen` {} is not loopback but no `auth_secret` is set: open joins (demo mode) are only allowed on loopback",
                self.http_listen
            ));
        }
        if let Some(secret) = &self.auth_secret {
            if secret.len() < 16 {
                p.push("`auth_secret` is shorter than 16 bytes".to_owned());
            }
        }
        if let Some(key) = &self.admin_api_key {
            if key.len() < 16 {
                p.push("`admin_api_key` is shorter than 16 bytes".to_owned());
            }
        }
        for t in &self.turn_servers {
            if t.urls.is_empty() {
                p.push("a `turn_servers` entry has no `urls`".to_owned());
            }
            for url in &t.urls {
                if !(url.starts_with("turn:") || url.starts_with("turns:")) {
                    p.push(format!(
                        "TURN url {url:?} does not start with turn: or turns:"
                    ));
                }
            }
        }
        if self.max_participants_per_call < 2 {
            p.push("`max_participants_per_call` must be at least 2".to_owned());
        }
        if self.ws_max_message_bytes < 16 * 1024 {
            p.push("`ws_max_message_bytes` below 16384 cannot carry an SDP offer".to_owned());
        }
        if self.ws_messages_per_second == 0 {
            p.push("`ws_messages_per_second` 0 would refuse every message".to_owned());
        }
        if self.worker_max_sessions == 0 {
            p.push("`worker_max_sessions` 0 admits nobody".to_owned());
        }
        if self.worker_queue_commands < 64 {
            p.push(format!(
                "`worker_queue_commands` {} is below 64: one join's signaling would not fit",
                self.worker_queue_commands
            ));
        }
        if self.worker_queue_datagrams < 64 {
            p.push(format!(
                "`worker_queue_datagrams` {} is below 64: one video frame's packets would not fit",
                self.worker_queue_datagrams
            ));
        }
        if self.recording_queue_chunks < 16 {
            p.push(format!(
                "`recording_queue_chunks` {} is below 16: a keyframe alone would not fit",
                self.recording_queue_chunks
            ));
        }
        if self.ws_send_queue_messages < 16 {
            p.push(format!(
                "`ws_send_queue_messages` {} is below 16: a join's first messages would not fit",
                self.ws_send_queue_messages
            ));
        }
        if self.worker_stall_s == 0 {
            p.push("`worker_stall_s` 0 would call every worker stalled".to_owned());
        }
        p.extend(self.relay_problems());
        p
    }

    /// The node relay is configured (`relay_listen` or `relay_peers`).
    pub fn relay_enabled(&self) -> bool {
        self.relay_listen.is_some() || !self.relay_peers.is_empty()
    }

    /// The peer nodes, parsed (`relay_peers`); the problems are reported by `problems()`.
    pub fn relay_peer_list(&self) -> Vec<crate::node::PeerAddr> {
        self.relay_peers
            .iter()
            .filter_map(|p| crate::node::PeerAddr::parse(p).ok())
            .collect()
    }

    /// What the node relay needs, when it is configured (and the configuration is valid).
    pub fn node_settings(&self) -> Option<crate::node::NodeSettings> {
        if !self.relay_enabled() {
            return None;
        }
        Some(crate::node::NodeSettings {
            node_id: self.node_id?,
            listen: self.relay_listen?,
            peers: self.relay_peer_list(),
            secret: crate::node::RelaySecret(self.relay_secret.as_ref()?.as_bytes().to_vec()),
            peer_gone: std::time::Duration::from_secs(self.relay_peer_gone_s),
            queue_frames: self.relay_queue_frames,
        })
    }

    fn relay_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for peer in &self.relay_peers {
            if let Err(e) = crate::node::PeerAddr::parse(peer) {
                p.push(format!("`relay_peers` entry {peer:?}: {e}"));
            }
        }
        if !self.relay_enabled() {
            return p;
        }
        if self.relay_listen.is_none() {
            p.push("`relay_peers` is set but `relay_listen` is not: the node relay needs its UDP address (CALLS_RELAY_LISTEN)".to_owned());
        }
        if self.node_id.is_none() {
            p.push("the node relay needs this node's `node_id` (CALLS_NODE_ID, 0-255, different on every node)".to_owned());
        }
        match &self.relay_secret {
            None => p.push(
                "the node relay needs `relay_secret` (CALLS_RELAY_SECRET), the same on every node"
                    .to_owned(),
            ),
            Some(secret) if secret.len() < 16 => {
                p.push("`relay_secret` is shorter than 16 bytes".to_owned())
            }
            Some(_) => {}
        }
        if self.relay_queue_frames < 64 {
            p.push(format!(
                "`relay_queue_frames` {} is below 64: one video frame's packets would not fit",
                self.relay_queue_frames
            ));
        }
        p
    }

    /// Open joins (no token).
    pub fn demo_mode(&self) -> bool {
        self.auth_secret.is_none()
    }

    /// The router configuration for worker `index`.
    pub fn router_config(
        &self,
        index: u8,
        extra_hosts: &[IpAddr],
    ) -> Result<calls_core::Config, Vec<String>> {
        let mut config = calls_core::Config::default();
        config.udp_port = if self.udp_port == 0 {
            8443
        } else {
            self.udp_port
        };
        config.tcp_port = if self.tcp_port == 0 {
            8443
        } else {
            self.tcp_port
        };
        config.bind_address = self.media_bind;
        config.ice_host_override = self.ice_host_override.clone();
        if config.ice_host_override.is_empty()
            && !extra_hosts.is_empty()
            && !self.media_bind.is_unspecified()
        {
            // Keep the local address reachable for clients on the same network.
            config.ice_host_override.push(self.media_bind);
        }
        for ip in extra_hosts {
            if !config.ice_host_override.contains(ip) {
                config.ice_host_override.push(*ip);
            }
        }
        config.ice_port_override = self.ice_port_override;
        config.max_participants_per_call = self.max_participants_per_call;
        config.top_n_audio = self.top_n_audio;
        config.audio_slots = self.audio_slots;
        config.video_slots = self.video_slots;
        config.max_video_slots = self.max_video_slots;
        config.consent_checks = self.consent_checks;
        config.max_microphones_per_session = self.max_microphones_per_session;
        config.max_cameras_per_session = self.max_cameras_per_session;
        config.max_screens_per_session = self.max_screens_per_session;
        config.max_mlines_per_offer = self.max_mlines_per_offer;
        config.max_simulcast_layers = self.max_simulcast_layers;
        config.red = self.red;
        config.opus_dtx = self.opus_dtx;
        config.worker_index = index;
        config.enable_udp = !self.disable_udp;
        config.enable_tcp = self.tcp_port != 0;
        config.probe_ufrag = self.probe_ufrag.clone();
        config.probe_password = self.probe_password.clone();
        config.max_sessions = self.worker_max_sessions;
        config.overload_degrade_lag_ms = self.overload_degrade_lag_ms;
        config.overload_shed_video_lag_ms = self.overload_shed_video_lag_ms;
        config.overload_busy_percent = self.overload_busy_percent;
        config.overload_recover_ms = self.overload_recover_ms;
        config.validate().map_err(|e| e.problems)?;
        Ok(config)
    }
}

/// Parses a configuration file. A syntax error ends parsing (nothing after it can be read); a
/// key with a wrong type or an unknown key does not hide the others: each is checked alone, and
/// the configuration keeps the keys that parsed, so validation still sees them.
fn from_toml(file: &str, text: &str, problems: &mut Vec<String>) -> ServerConfig {
    let at = |span: Option<Range<usize>>| match span {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{file}:{line}:{column}")
        }
        None => file.to_owned(),
    };
    let keys: BTreeMap<Spanned<String>, toml::Value> = match toml::from_str(text) {
        Ok(keys) => keys,
        Err(e) => {
            problems.push(format!("{}: {}", at(e.span()), e.message().trim()));
            return ServerConfig::default();
        }
    };
    // In the file's order, so the problems read top to bottom.
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_by_key(|(key, _)| key.span().start);
    let mut parsed = toml::Table::new();
    for (key, value) in keys {
        let span = key.span();
        let key = key.into_inner();
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        match toml::Value::Table(alone).try_into::<ServerConfig>() {
            Ok(_) => {
                parsed.insert(key, value);
            }
            Err(e) if e.message().starts_with("unknown field") => problems.push(format!(
                "{}: `{key}` is not a setting (`calls-server --help` lists them)",
                at(Some(span))
            )),
            Err(e) => problems.push(format!(
                "{}: `{key}`: {}",
                at(Some(span)),
                e.message().trim()
            )),
        }
    }
    toml::Value::Table(parsed)
        .try_into()
        .unwrap_or_else(|e: toml::de::Error| {
            problems.push(format!("{file}: {}", e.message().trim()));
            ServerConfig::default()
        })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Every setting: its TOML key, its environment variable(s) and what it does. `--help` prints
/// them with their defaults; a test keeps the list in step with `ServerConfig`.
const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "media_bind",
        "CALLS_MEDIA_BIND",
        "address of the media sockets (UDP and TCP)",
    ),
    ("udp_port", "CALLS_UDP_PORT", "UDP media port"),
    (
        "tcp_port",
        "CALLS_TCP_PORT",
        "TCP media port (ICE-TCP); 0 disables TCP",
    ),
    (
        "disable_udp",
        "CALLS_DISABLE_UDP",
        "TCP candidates only (to test TCP fallback)",
    ),
    (
        "ice_host_override",
        "CALLS_ICE_HOST_OVERRIDE",
        "addresses advertised to clients (comma-separated)",
    ),
    (
        "ice_port_override",
        "CALLS_ICE_PORT_OVERRIDE",
        "port advertised instead of the media ports",
    ),
    (
        "stun_server",
        "CALLS_STUN_SERVER",
        "STUN host:port to discover the public IP at start",
    ),
    (
        "turn_servers",
        "CALLS_TURN_URLS, CALLS_TURN_SECRET",
        "TURN servers handed to clients",
    ),
    (
        "http_listen",
        "CALLS_HTTP_LISTEN",
        "HTTP + WebSocket signaling listener",
    ),
    (
        "admin_listen",
        "CALLS_ADMIN_LISTEN",
        "admin API listener (needs admin_api_key)",
    ),
    (
        "admin_api_key",
        "CALLS_ADMIN_API_KEY",
        "bearer key of the admin API (off without it)",
    ),
    (
        "auth_secret",
        "CALLS_AUTH_SECRET",
        "HS256 secret of join tokens (unset: demo mode, loopback only)",
    ),
    (
        "demo_mode_anywhere",
        "CALLS_DEMO_MODE_ANYWHERE",
        "open joins off loopback (never in production)",
    ),
    (
        "allowed_origins",
        "CALLS_ALLOWED_ORIGINS",
        "origins allowed to open the WebSocket (comma-separated)",
    ),
    (
        "max_participants_per_call",
        "CALLS_MAX_PARTICIPANTS_PER_CALL",
        "participants per call",
    ),
    (
        "top_n_audio",
        "CALLS_TOP_N_AUDIO",
        "loudest microphones forwarded per call (0: all)",
    ),
    (
        "audio_slots",
        "CALLS_AUDIO_SLOTS",
        "audio receive slots per participant (1-16)",
    ),
    (
        "video_slots",
        "CALLS_VIDEO_SLOTS",
        "camera receive slots per participant unless its client asks for another number",
    ),
    (
        "red",
        "CALLS_RED",
        "negotiate Opus RED (redundant audio) with clients that offer it (true/false)",
    ),
    (
        "opus_dtx",
        "CALLS_OPUS_DTX",
        "ask clients for Opus DTX: a muted or silent microphone sends 2.5 packets/s, not 50 (true/false)",
    ),
    (
        "consent_checks",
        "CALLS_CONSENT_CHECKS",
        "a new UDP address of a session gets media only after answering a binding request (true/false)",
    ),
    (
        "max_microphones_per_session",
        "CALLS_MAX_MICROPHONES_PER_SESSION",
        "sending audio m-lines one offer may carry",
    ),
    (
        "max_cameras_per_session",
        "CALLS_MAX_CAMERAS_PER_SESSION",
        "sending camera m-lines one offer may carry",
    ),
    (
        "max_screens_per_session",
        "CALLS_MAX_SCREENS_PER_SESSION",
        "sending screen m-lines one offer may carry",
    ),
    (
        "max_mlines_per_offer",
        "CALLS_MAX_MLINES_PER_OFFER",
        "m-lines of any direction in one client offer",
    ),
    (
        "max_simulcast_layers",
        "CALLS_MAX_SIMULCAST_LAYERS",
        "simulcast layers one track may send",
    ),
    (
        "max_video_slots",
        "CALLS_MAX_VIDEO_SLOTS",
        "most camera slots a client may ask for (at most 64)",
    ),
    (
        "workers",
        "CALLS_WORKERS",
        "router worker threads (0: one per core)",
    ),
    (
        "reconnect_grace_s",
        "CALLS_RECONNECT_GRACE_S",
        "seconds a dropped WebSocket may resume",
    ),
    (
        "drain_deadline_s",
        "CALLS_DRAIN_DEADLINE_S",
        "seconds calls may go on after SIGTERM",
    ),
    (
        "ws_max_message_bytes",
        "CALLS_WS_MAX_MESSAGE_BYTES",
        "larger WebSocket messages close the connection",
    ),
    (
        "ws_messages_per_second",
        "CALLS_WS_MESSAGES_PER_SECOND",
        "sustained WebSocket messages per second",
    ),
    (
        "probe_ufrag",
        "CALLS_PROBE_UFRAG",
        "media-port probe credential: ufrag",
    ),
    (
        "probe_password",
        "CALLS_PROBE_PASSWORD",
        "media-port probe credential: password (22+)",
    ),
    (
        "log_level",
        "CALLS_LOG_LEVEL",
        "log filter (RUST_LOG wins if set)",
    ),
    (
        "log_json",
        "CALLS_LOG_JSON",
        "log JSON lines instead of text",
    ),
    (
        "tcp_max_connections",
        "CALLS_TCP_MAX_CONNECTIONS",
        "open ICE-TCP connections in total",
    ),
    (
        "tcp_max_connections_per_ip",
        "CALLS_TCP_MAX_CONNECTIONS_PER_IP",
        "open ICE-TCP connections per source IP",
    ),
    (
        "tcp_write_queue_frames",
        "CALLS_TCP_WRITE_QUEUE_FRAMES",
        "frames queued per ICE-TCP connection before it is closed",
    ),
    (
        "max_sessions_per_user",
        "CALLS_MAX_SESSIONS_PER_USER",
        "sessions of one user per call; newest wins (0: no limit)",
    ),
    (
        "auth_audience",
        "CALLS_AUTH_AUDIENCE",
        "required join-token `aud`",
    ),
    (
        "auth_issuer",
        "CALLS_AUTH_ISSUER",
        "required join-token `iss`",
    ),
    (
        "metrics_per_session",
        "CALLS_METRICS_PER_SESSION",
        "per-session series in /metrics",
    ),
    (
        "worker_max_sessions",
        "CALLS_WORKER_MAX_SESSIONS",
        "sessions per worker; more joins are refused (router_full)",
    ),
    (
        "call_spread_after",
        "CALLS_CALL_SPREAD_AFTER",
        "participants after which a call spreads over workers (0: never)",
    ),
    (
        "worker_queue_commands",
        "CALLS_WORKER_QUEUE_COMMANDS",
        "commands queued per worker (signaling, STUN/DTLS/RTCP, TCP)",
    ),
    (
        "worker_queue_datagrams",
        "CALLS_WORKER_QUEUE_DATAGRAMS",
        "RTP datagrams queued per worker; the newest are dropped beyond it",
    ),
    (
        "ws_send_queue_messages",
        "CALLS_WS_SEND_QUEUE_MESSAGES",
        "messages queued per WebSocket; a client that lets it fill is closed (4009)",
    ),
    (
        "worker_stall_s",
        "CALLS_WORKER_STALL_S",
        "a worker stuck this long makes /healthz answer 503",
    ),
    (
        "overload_degrade_lag_ms",
        "CALLS_OVERLOAD_DEGRADE_LAG_MS",
        "worker lag that refuses joins and caps video at its lowest layer",
    ),
    (
        "overload_shed_video_lag_ms",
        "CALLS_OVERLOAD_SHED_VIDEO_LAG_MS",
        "worker lag that stops forwarding cameras (audio goes on)",
    ),
    (
        "overload_busy_percent",
        "CALLS_OVERLOAD_BUSY_PERCENT",
        "worker busy share (%) that refuses joins",
    ),
    (
        "overload_recover_ms",
        "CALLS_OVERLOAD_RECOVER_MS",
        "calm time before a worker steps down one level; the retry hint",
    ),
    (
        "recording_dir",
        "CALLS_RECORDING_DIR",
        "where recordings are written, one folder per recording (unset: recording off)",
    ),
    (
        "recording_queue_chunks",
        "CALLS_RECORDING_QUEUE_CHUNKS",
        "file chunks queued for the recording writer; beyond it a file is cut (counted)",
    ),
    (
        "node_id",
        "CALLS_NODE_ID",
        "this node's number, 0-255, unique among the relay's nodes (high bits of session ids)",
    ),
    (
        "relay_listen",
        "CALLS_RELAY_LISTEN",
        "UDP address of the node relay (QUIC), e.g. 0.0.0.0:7443 (unset: relay off)",
    ),
    (
        "relay_peers",
        "CALLS_RELAY_PEERS",
        "peer nodes, host:port or id=host:port (comma-separated); the lower id dials",
    ),
    (
        "relay_secret",
        "CALLS_RELAY_SECRET",
        "shared secret every node proves it holds (16+ bytes; required with the relay)",
    ),
    (
        "relay_peer_gone_s",
        "CALLS_RELAY_PEER_GONE_S",
        "seconds an unreachable peer node keeps its participants in calls here",
    ),
    (
        "relay_queue_frames",
        "CALLS_RELAY_QUEUE_FRAMES",
        "relay frames queued per peer node and lane; beyond it they are dropped (counted)",
    ),
];

/// A configuration as TOML (unset options are absent).
fn as_table(config: &ServerConfig) -> toml::Table {
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::Table::new(),
    }
}

/// The settings table of `--help`: key, variable, default, meaning.
pub fn settings_help() -> String {
    let defaults = as_table(&ServerConfig::default());
    let rows: Vec<[String; 4]> = SETTINGS
        .iter()
        .map(|(key, env, what)| {
            let default = defaults
                .get(*key)
                .map_or_else(|| "unset".to_owned(), |v| v.to_string());
            [
                (*key).to_owned(),
                (*env).to_owned(),
                default,
                (*what).to_owned(),
            ]
        })
        .collect();
    let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out =
        String::from("Settings (TOML key in --config FILE, environment variable, default):\n");
    for [key, env, default, what] in rows {
        out += &format!("  {key:w0$}  {env:w1$}  {default:w2$}  {what}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_a_loopback_demo() {
        let c = ServerConfig::load(None, &[]).unwrap();
        assert!(c.demo_mode());
        assert_eq!((c.udp_port, c.tcp_port), (8443, 8443));
    }

    #[test]
    fn env_overrides_and_every_problem_is_listed() {
        let c = ServerConfig::load(
            None,
            &env(&[
                ("CALLS_UDP_PORT", "9000"),
                ("CALLS_ICE_HOST_OVERRIDE", "203.0.113.5, 2001:db8::5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.udp_port, 9000);
        assert_eq!(c.ice_host_override.len(), 2);
        let problems = ServerConfig::load(
            None,
            &env(&[
                ("CALLS_UDP_PORT", "x"),
                ("CALLS_HTTP_LISTEN", "0.0.0.0:80"),
                ("CALLS_BOGUS", "1"),
            ]),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("demo mode")),
            "{problems:?}"
        );
    }

    #[test]
    fn router_config_carries_worker_and_transport_choices() {
        let c = ServerConfig {
            disable_udp: true,
            ..ServerConfig::default()
        };
        let r = c
            .router_config(3, &["198.51.100.1".parse().unwrap()])
            .unwrap();
        assert_eq!(r.worker_index, 3);
        assert!(!r.enable_udp && r.enable_tcp);
        let expected: Vec<IpAddr> = vec![
            "127.0.0.1".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        ];
        assert_eq!(r.ice_host_override, expected);
    }

    #[test]
    fn a_file_with_several_mistakes_lists_each_with_its_line_and_column() {
        let text = "udp_port = \"x\"\ntcp_port = 8443\nbogus = 1\n\nhttp_listen = \"0.0.0.0:80\"\n";
        let mut problems = Vec::new();
        let config = from_toml("calls.toml", text, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("calls.toml:1:1: `udp_port`"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("calls.toml:3:1: `bogus`"),
            "{problems:?}"
        );
        // The keys that parsed are kept, so validation still sees them (demo mode off loopback).
        assert_eq!(config.http_listen.port(), 80);
        assert!(!config.problems().is_empty());
    }

    #[test]
    fn a_syntax_error_has_a_line_and_column() {
        let mut problems = Vec::new();
        from_toml(
            "calls.toml",
            "udp_port = 8443\ntcp_port = = 1\n",
            &mut problems,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("calls.toml:2:"), "{problems:?}");
    }

    #[test]
    fn every_setting_is_in_the_help_and_settable_from_the_environment() {
        let defaults = as_table(&ServerConfig {
            // Options are absent from TOML when unset: give them values to list every key.
            ice_port_override: Some(1),
            stun_server: Some(String::new()),
            admin_api_key: Some(String::new()),
            auth_secret: Some(String::new()),
            probe_ufrag: Some(String::new()),
            probe_password: Some(String::new()),
            auth_audience: Some(String::new()),
            auth_issuer: Some(String::new()),
            recording_dir: Some(PathBuf::new()),
            node_id: Some(1),
            relay_listen: Some("127.0.0.1:7443".parse().unwrap()),
            relay_secret: Some(String::new()),
            ..ServerConfig::default()
        });
        let listed: Vec<&str> = SETTINGS.iter().map(|(key, _, _)| *key).collect();
        let fields: Vec<&str> = defaults.keys().map(String::as_str).collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, fields, "SETTINGS and ServerConfig differ");
        let mut config = ServerConfig::default();
        for (key, vars, _) in SETTINGS {
            for var in vars.split(", ") {
                let name = var.strip_prefix("CALLS_").unwrap();
                if let Err(e) = config.set(name, "1") {
                    assert!(!e.starts_with("unknown setting"), "{key}: {var}: {e}");
                }
            }
        }
        assert!(settings_help().contains("CALLS_WS_MESSAGES_PER_SECOND"));
    }

    #[test]
    fn the_node_relay_needs_an_id_a_listen_address_and_a_secret() {
        let secret = "relay-secret-0123456789";
        let c = ServerConfig::load(
            None,
            &env(&[
                ("CALLS_NODE_ID", "2"),
                ("CALLS_RELAY_LISTEN", "127.0.0.1:7443"),
                ("CALLS_RELAY_PEERS", "1=10.0.0.1:7443, calls-1.calls:7443"),
                ("CALLS_RELAY_SECRET", secret),
            ]),
        )
        .unwrap();
        assert!(c.relay_enabled());
        assert_eq!(c.relay_peer_list().len(), 2);
        assert_eq!(c.relay_peer_list()[0].id, Some(1));
        assert!(
            !ServerConfig::default().relay_enabled(),
            "off unless configured"
        );
        let problems = ServerConfig::load(
            None,
            &env(&[("CALLS_RELAY_PEERS", "x=nowhere, 1=host-without-port")]),
        )
        .unwrap_err();
        // Two bad peers, no listen address, no node id, no secret.
        assert_eq!(problems.len(), 5, "{problems:?}");
        let short = ServerConfig::load(
            None,
            &env(&[
                ("CALLS_NODE_ID", "1"),
                ("CALLS_RELAY_LISTEN", "127.0.0.1:7443"),
                ("CALLS_RELAY_SECRET", "short-s3cr3t"),
            ]),
        )
        .unwrap_err();
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(!short[0].contains("short-s3cr3t"), "{short:?}");
        let toml = "node_id = 3\nrelay_listen = \"127.0.0.1:7443\"\nrelay_peers = [\"4=127.0.0.1:7444\"]\nrelay_secret = \"0123456789abcdef\"\n";
        let mut problems = Vec::new();
        let c = from_toml("calls.toml", toml, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((c.node_id, c.relay_peers.len()), (Some(3), 1));
    }

    /// Finding 6 (issue 16): a refused variable is named, its value (maybe a secret) is not.
    #[test]
    fn config_errors_name_the_variable_not_its_secret_value() {
        let secret = "s3cr3t-turn-shared-key-0000";
        let problems = ServerConfig::load(
            None,
            &env(&[
                ("CALLS_TURN_SECRET", secret),
                ("CALLS_ADMIN_LISTEN", "hunter2-is-not-an-address"),
            ]),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        for p in &problems {
            assert!(!p.contains(secret) && !p.contains("hunter2"), "{p}");
        }
        assert!(
            problems[0].starts_with("CALLS_TURN_SECRET: "),
            "{problems:?}"
        );
    }
}
