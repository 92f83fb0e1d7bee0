//! Router configuration: a plain serde struct with documented defaults and a `validate()` that
//! reports every problem at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Highest accepted `max_microphones_per_session` / `max_cameras_per_session` /
/// `max_screens_per_session`.
const MAX_TRACKS_PER_SOURCE: usize = 16;
/// Highest accepted `max_mlines_per_offer`: str0m parses every m-line of an offer.
const MAX_MLINES: usize = 4096;
/// Highest accepted `max_simulcast_layers` (browsers send at most 3 or 4).
const MAX_SIMULCAST_LAYERS: usize = 4;

/// Configuration of one [`Router`](crate::Router).
///
/// Every field has a default; a TOML or JSON document only names what it changes:
///
/// ```
/// let config = calls_core::Config::from_toml_str(r#"
///     udp_port = 8443
///     ice_host_override = ["203.0.113.7"]
///     max_participants_per_call = 50
/// "#).unwrap();
/// assert_eq!(config.tcp_port, 8443);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// UDP port the embedder receives media on. Default `8443`.
    pub udp_port: u16,
    /// TCP port for ICE-TCP (RFC 4571 framing). Default `8443`.
    pub tcp_port: u16,
    /// The address the embedder's media sockets are bound to. Default `127.0.0.1`.
    /// Used as the host candidate unless `ice_host_override` is set.
    pub bind_address: IpAddr,
    /// Addresses advertised to clients as host candidates instead of `bind_address`
    /// (public IP behind 1:1 NAT, a load balancer address, IPv4 and IPv6 side by side).
    pub ice_host_override: Vec<IpAddr>,
    /// Port advertised in candidates instead of `udp_port`/`tcp_port` (port forwarding).
    pub ice_port_override: Option<u16>,
    /// Joins beyond this many participants in one call get [`RouterError::CallFull`](crate::RouterError). Default `100`.
    pub max_participants_per_call: usize,
    /// Sessions on this router (all calls). Default `10000`.
    pub max_sessions: usize,
    /// Index of this router among the workers sharing a port (0–255); it is minted into every
    /// ICE ufrag so a dispatcher can route a new flow with [`Router::worker_of_datagram`](crate::Router::worker_of_datagram).
    pub worker_index: u8,
    /// Minimum time between two keyframe requests sent to one publisher track, in milliseconds.
    /// Default `500`.
    pub keyframe_request_interval_ms: u64,
    /// Remote addresses remembered per session (NAT rebinding, several candidate pairs).
    /// Default `8`; the oldest is forgotten beyond it.
    pub max_flows_per_session: usize,
    /// Advertise UDP host candidates. Default `true`; `false` leaves clients only ICE-TCP
    /// (for deployments or tests where UDP is blocked).
    pub enable_udp: bool,
    /// Advertise passive ICE-TCP candidates on `tcp_port` (for clients whose UDP is blocked).
    /// Default `true`; turn off if the embedder does not accept TCP.
    pub enable_tcp: bool,
    /// ICE ufrag of the media-port probe credential. With `probe_password` set, the router
    /// answers authenticated STUN binding requests for it on UDP and TCP (rate-limited, never
    /// larger than the request), so `calls probe` can tell an open port from a blocked one.
    pub probe_ufrag: Option<String>,
    /// Password of the probe credential (22+ characters, as ICE passwords).
    pub probe_password: Option<String>,
    /// Probe answers per second, router-wide. Default `20`.
    pub probe_replies_per_second: u32,
    /// A session that has not completed ICE and DTLS this long after `join` is removed
    /// (reported as [`LeaveReason::Disconnected`](crate::LeaveReason)). Default `30000`.
    pub connect_timeout_ms: u64,
    /// Audio streams forwarded per call: the loudest this many speakers (plus anyone who just
    /// unmuted), so a big call does not forward every silent microphone. Default `3`; `0`
    /// forwards every unmuted microphone.
    pub top_n_audio: usize,
    /// Audio receive slots per subscriber: how many of the loudest microphones a participant
    /// hears at once. Default `3` (as `top_n_audio`).
    pub audio_slots: usize,
    /// Camera receive slots a subscriber gets unless it asks for another number (a 3×3 grid).
    /// Default `9`.
    pub video_slots: usize,
    /// Most camera slots a subscriber may ask for (`slots` message). Default `25`.
    pub max_video_slots: usize,
    /// Send a binding request to a new UDP address and admit it only when the client answers
    /// it (issue 16, finding 3: a participant cannot point its media at a spoofed address).
    /// Default `true` ([security.md](../docs/security.md)).
    pub consent_checks: bool,
    /// Microphone tracks one session may send (sending audio m-lines in its offers); an offer
    /// beyond it is refused with [`SignalError::TooManyTracks`](crate::SignalError). Default `1`.
    pub max_microphones_per_session: usize,
    /// Camera tracks one session may send (sending video m-lines other than its screen).
    /// Default `2`.
    pub max_cameras_per_session: usize,
    /// Screen-share tracks one session may send. Default `1`.
    pub max_screens_per_session: usize,
    /// m-lines in one client offer, all directions; beyond it the offer is refused with
    /// [`SignalError::TooManyMLines`](crate::SignalError) before it is parsed. Default `512`.
    pub max_mlines_per_offer: usize,
    /// Simulcast layers one track may send (`a=rid` send lines); beyond it the offer is refused
    /// with [`SignalError::TooManyLayers`](crate::SignalError). Default `3`.
    pub max_simulcast_layers: usize,
    /// Render per-session series (`calls_session_*{call,session}`) in the Prometheus text of
    /// the bindings and the reference server. Default `false`: one series per session is
    /// unbounded cardinality for a metrics store, and call names are user input.
    pub metrics_per_session: bool,
    /// Negotiate RFC 2198 redundant audio (`red/48000/2` wrapping Opus) with clients that offer
    /// it, and forward it as is to subscribers that negotiated it (the primary Opus block to the
    /// others). Default `true`: at 5 % loss RED keeps speech clean for the price of about twice
    /// the audio bitrate ([quality.md](../docs/quality.md)). `false` negotiates plain Opus only.
    pub red: bool,
    /// Ask clients to send Opus with discontinuous transmission (`usedtx=1` in the answer's
    /// Opus format parameters, RFC 7587): a muted or silent microphone then sends a packet
    /// every 400 ms instead of every 20 ms (Chromium honours it). Default `true`: in a call
    /// where everyone holds a microphone and few talk, the silent ones are most of the
    /// packets the router takes in ([performance.md](../docs/performance.md)). `false` leaves
    /// the choice to the client (browsers then send 50 packets a second, silence included).
    pub opus_dtx: bool,
    /// Load reports ([`Router::set_load`](crate::Router::set_load)) with at least this lag, in
    /// milliseconds, put the router in [`LoadLevel::Degraded`](crate::LoadLevel): joins are
    /// refused with [`RouterError::Overloaded`](crate::RouterError) and video is capped at its
    /// lowest simulcast layer. Default `50`.
    pub overload_degrade_lag_ms: u64,
    /// Load reports with at least this lag, in milliseconds, put the router in
    /// [`LoadLevel::Overloaded`](crate::LoadLevel): cameras stop being forwarded, audio goes
    /// on. Default `200`.
    pub overload_shed_video_lag_ms: u64,
    /// Load reports with the router's thread busy at least this percentage of the time also
    /// put it in `Degraded` (no headroom left for a join). Default `90`.
    pub overload_busy_percent: u8,
    /// The load must stay below half the thresholds this long, in milliseconds, before the
    /// router steps down one level (and again for the next); also the retry hint of
    /// `Overloaded` refusals. Default `5000`.
    pub overload_recover_ms: u64,
}

/// Upper bound of `audio_slots`: more voices at once than anyone can follow.
const MAX_AUDIO_SLOTS: usize = 16;
/// Upper bound of `max_video_slots`: an 8×8 grid.
const MAX_VIDEO_SLOTS: usize = 64;

impl Default for Config {
    fn default() -> Self {
        Config {
            udp_port: 8443,
            tcp_port: 8443,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ice_host_override: Vec::new(),
            ice_port_override: None,
            max_participants_per_call: 100,
            max_sessions: 10_000,
            worker_index: 0,
            keyframe_request_interval_ms: 500,
            max_flows_per_session: 8,
            connect_timeout_ms: 30_000,
            enable_udp: true,
            enable_tcp: true,
            probe_ufrag: None,
            probe_password: None,
            probe_replies_per_second: 20,
            top_n_audio: 3,
            audio_slots: 3,
            video_slots: 9,
            max_video_slots: 25,
            consent_checks: true,
            max_microphones_per_session: 1,
            max_cameras_per_session: 2,
            max_screens_per_session: 1,
            max_mlines_per_offer: 512,
            max_simulcast_layers: 3,
            metrics_per_session: false,
            red: true,
            opus_dtx: true,
            overload_degrade_lag_ms: 50,
            overload_shed_video_lag_ms: 200,
            overload_busy_percent: 90,
            overload_recover_ms: 5_000,
        }
    }
}

impl Config {
    /// Parses a TOML document (missing keys take their defaults) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![e.message().to_owned()],
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a JSON document (missing keys take their defaults) and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_json::from_str(text).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the configuration and returns every problem found, not just the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.udp_port == 0 {
            problems.push("`udp_port` 0 is not a port".to_owned());
        }
        if self.tcp_port == 0 {
            problems.push("`tcp_port` 0 is not a port".to_owned());
        }
        if self.ice_port_override == Some(0) {
            problems.push("`ice_port_override` 0 is not a port".to_owned());
        }
        if self.ice_host_override.is_empty() && self.bind_address.is_unspecified() {
            problems.push(format!(
                "`bind_address` {} is unspecified: set `ice_host_override` to the address clients reach",
                self.bind_address
            ));
        }
        for ip in &self.ice_host_override {
            if ip.is_unspecified() || ip.is_multicast() {
                problems.push(format!(
                    "`ice_host_override` entry {ip} is not an address clients can reach"
                ));
            }
        }
        if self.max_participants_per_call < 2 {
            problems.push(format!(
                "`max_participants_per_call` {} leaves no one to talk to (minimum 2)",
                self.max_participants_per_call
            ));
        }
        if self.max_sessions == 0 {
            problems.push("`max_sessions` 0 admits nobody".to_owned());
        }
        if self.keyframe_request_interval_ms < 50 || self.keyframe_request_interval_ms > 10_000 {
            problems.push(format!(
                "`keyframe_request_interval_ms` {} is outside 50..=10000",
                self.keyframe_request_interval_ms
            ));
        }
        if self.max_flows_per_session == 0 || self.max_flows_per_session > 64 {
            problems.push(format!(
                "`max_flows_per_session` {} is outside 1..=64",
                self.max_flows_per_session
            ));
        }
        match (&self.probe_ufrag, &self.probe_password) {
            (None, None) => {}
            (Some(ufrag), Some(password)) => {
                let ice_chars = |s: &str| {
                    s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
                };
                if ufrag.len() < 4 || ufrag.len() > 64 || !ice_chars(ufrag) {
                    problems.push(
                        "`probe_ufrag` must be 4–64 characters of A–Z, a–z, 0–9, + or /".to_owned(),
                    );
                }
                if crate::demux::ufrag::worker(ufrag).is_some() {
                    problems.push(format!("`probe_ufrag` {ufrag:?} looks like a session ufrag (w + two hex digits); pick another"));
                }
                if password.len() < 22 || password.len() > 256 || !ice_chars(password) {
                    problems.push(
                        "`probe_password` must be 22–256 characters of A–Z, a–z, 0–9, + or /"
                            .to_owned(),
                    );
                }
            }
            _ => problems.push("`probe_ufrag` and `probe_password` go together".to_owned()),
        }
        if self.probe_replies_per_second == 0 || self.probe_replies_per_second > 10_000 {
            problems.push(format!(
                "`probe_replies_per_second` {} is outside 1..=10000",
                self.probe_replies_per_second
            ));
        }
        if self.overload_degrade_lag_ms == 0
            || self.overload_shed_video_lag_ms <= self.overload_degrade_lag_ms
        {
            problems.push(format!(
                "`overload_degrade_lag_ms` {} and `overload_shed_video_lag_ms` {} must satisfy 0 < degrade < shed_video",
                self.overload_degrade_lag_ms, self.overload_shed_video_lag_ms
            ));
        }
        if self.overload_busy_percent == 0 || self.overload_busy_percent > 100 {
            problems.push(format!(
                "`overload_busy_percent` {} is outside 1..=100",
                self.overload_busy_percent
            ));
        }
        if !(100..=600_000).contains(&self.overload_recover_ms) {
            problems.push(format!(
                "`overload_recover_ms` {} is outside 100..=600000",
                self.overload_recover_ms
            ));
        }
        if !self.enable_udp && !self.enable_tcp {
            problems.push(
                "`enable_udp` and `enable_tcp` are both false: no way for media in".to_owned(),
            );
        }
        if self.connect_timeout_ms < 1_000 {
            problems.push(format!(
                "`connect_timeout_ms` {} is too short for ICE and DTLS (minimum 1000)",
                self.connect_timeout_ms
            ));
        }
        if self.audio_slots == 0 || self.audio_slots > MAX_AUDIO_SLOTS {
            problems.push(format!(
                "`audio_slots` {} is outside 1..={MAX_AUDIO_SLOTS}",
                self.audio_slots
            ));
        }
        if self.max_video_slots > MAX_VIDEO_SLOTS {
            problems.push(format!(
                "`max_video_slots` {} is above {MAX_VIDEO_SLOTS}",
                self.max_video_slots
            ));
        }
        if self.video_slots > self.max_video_slots {
            problems.push(format!(
                "`video_slots` {} is above `max_video_slots` {}",
                self.video_slots, self.max_video_slots
            ));
        }
        for (name, value) in [
            (
                "max_microphones_per_session",
                self.max_microphones_per_session,
            ),
            ("max_cameras_per_session", self.max_cameras_per_session),
            ("max_screens_per_session", self.max_screens_per_session),
        ] {
            if value > MAX_TRACKS_PER_SOURCE {
                problems.push(format!(
                    "`{name}` {value} is outside 0..={MAX_TRACKS_PER_SOURCE} (every track is a source for every member's slots)"
                ));
            }
        }
        let tracks = self.max_microphones_per_session
            + self.max_cameras_per_session
            + self.max_screens_per_session;
        if self.max_mlines_per_offer < tracks.max(1) || self.max_mlines_per_offer > MAX_MLINES {
            problems.push(format!(
                "`max_mlines_per_offer` {} is outside {}..={MAX_MLINES} (at least the tracks a session may send)",
                self.max_mlines_per_offer,
                tracks.max(1)
            ));
        }
        if self.max_simulcast_layers == 0 || self.max_simulcast_layers > MAX_SIMULCAST_LAYERS {
            problems.push(format!(
                "`max_simulcast_layers` {} is outside 1..={MAX_SIMULCAST_LAYERS}",
                self.max_simulcast_layers
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The addresses (with ports) advertised as UDP host candidates.
    pub fn udp_candidates(&self) -> Vec<SocketAddr> {
        let port = self.ice_port_override.unwrap_or(self.udp_port);
        self.candidate_ips()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }

    /// The addresses (with ports) advertised as passive TCP host candidates.
    pub fn tcp_candidates(&self) -> Vec<SocketAddr> {
        let port = self.ice_port_override.unwrap_or(self.tcp_port);
        self.candidate_ips()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }

    fn candidate_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let fallback = (self.ice_host_override.is_empty()).then_some(self.bind_address);
        self.ice_host_override.iter().copied().chain(fallback)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn keyframe_request_interval(&self) -> Duration {
        Duration::from_millis(self.keyframe_request_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_use_port_8443() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert_eq!(
            config.udp_candidates(),
            vec!["127.0.0.1:8443".parse().unwrap()]
        );
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let err = Config::from_toml_str(
            "udp_port = 0\ntcp_port = 0\nbind_address = \"0.0.0.0\"\nmax_participants_per_call = 1",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        assert!(err.to_string().contains("`udp_port` 0 is not a port"));
    }

    #[test]
    fn overrides_replace_the_bind_address_in_candidates() {
        let config = Config::from_json_str(
            r#"{"bind_address":"0.0.0.0","ice_host_override":["203.0.113.7","2001:db8::7"],"ice_port_override":443}"#,
        )
        .unwrap();
        assert_eq!(
            config.udp_candidates(),
            vec![
                "203.0.113.7:443".parse().unwrap(),
                "[2001:db8::7]:443".parse().unwrap()
            ]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml_str("udp_prot = 1").unwrap_err();
        assert!(err.to_string().contains("udp_prot"), "{err}");
    }
}
