//! Counters and gauges: a plain serializable snapshot, and its Prometheus text exposition.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::demux::DropReason;
use crate::ids::{CallId, SessionId};

/// Packets and bytes, split by media kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaCounts {
    /// Audio RTP packets.
    pub audio_packets: u64,
    /// Audio RTP payload bytes.
    pub audio_bytes: u64,
    /// Video RTP packets.
    pub video_packets: u64,
    /// Video RTP payload bytes.
    pub video_bytes: u64,
}

/// Count, sum and maximum of a duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationStats {
    /// How many.
    pub count: u64,
    /// Their sum, in milliseconds.
    pub total_ms: u64,
    /// The longest, in milliseconds.
    pub max_ms: u64,
}

impl DurationStats {
    pub(crate) fn record(&mut self, d: std::time::Duration) {
        let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
        self.count += 1;
        self.total_ms = self.total_ms.saturating_add(ms);
        self.max_ms = self.max_ms.max(ms);
    }

    fn merge(&mut self, other: &DurationStats) {
        self.count += other.count;
        self.total_ms = self.total_ms.saturating_add(other.total_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// The mean in milliseconds (`None` without samples).
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.total_ms as f64 / self.count as f64)
    }
}

impl MediaCounts {
    pub(crate) fn add(&mut self, is_audio: bool, bytes: usize) {
        if is_audio {
            self.audio_packets += 1;
            self.audio_bytes += bytes as u64;
        } else {
            self.video_packets += 1;
            self.video_bytes += bytes as u64;
        }
    }
}

/// What str0m knows about one session's link quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStats {
    /// The session.
    pub session: SessionId,
    /// Its call.
    pub call: CallId,
    /// Round-trip time from RTCP, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Fraction of our packets the subscriber reported lost (0.0–1.0).
    pub egress_loss: Option<f64>,
    /// Fraction of the publisher's packets we lost (0.0–1.0).
    pub ingress_loss: Option<f64>,
    /// The bandwidth the router uses towards this session, bits per second: the congestion
    /// controller's estimate, or the session's cap if lower (`None` before the first estimate).
    #[serde(default)]
    pub bandwidth_bps: Option<u64>,
    /// RED packets this subscriber got as their primary Opus block only (it did not
    /// negotiate RED).
    #[serde(default)]
    pub red_stripped: u64,
    /// The loss the router would report to this publisher's microphone encoder: the worst of
    /// its own uplink and its current listeners' downlinks, capped (see
    /// [`quality.md`](../docs/quality.md)); `None` when it publishes no forwarded audio.
    #[serde(default)]
    pub listener_loss: Option<f64>,
}

/// A point-in-time copy of every metric of one router.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Sessions now on the router.
    pub sessions: u64,
    /// Calls with at least one session.
    pub calls: u64,
    /// Remembered 5-tuples.
    pub flows: u64,
    /// Sessions with ICE and DTLS up.
    pub connected_sessions: u64,
    /// Open ICE-TCP connections.
    pub tcp_connections: u64,
    /// ICE-TCP connections the router asked the embedder to close (bad framing, unknown).
    pub tcp_rejected: u64,
    /// Outgoing ICE-TCP frames for a connection that is already closed.
    pub tcp_unsent: u64,
    /// Datagrams handed to the router.
    pub datagrams_in: u64,
    /// Datagram bytes handed to the router.
    pub datagram_bytes_in: u64,
    /// Datagrams the router asked to send.
    pub datagrams_out: u64,
    /// Datagram bytes the router asked to send.
    pub datagram_bytes_out: u64,
    /// Datagrams dropped before reaching a session, by reason.
    pub drops: BTreeMap<DropReason, u64>,
    /// RTP received from publishers.
    pub media_in: MediaCounts,
    /// RTP written to subscribers.
    pub media_out: MediaCounts,
    /// RTP from publishers that was not forwarded (forbidden track, muted, unknown stream).
    pub media_dropped: u64,
    /// Keyframe requests received from subscribers.
    pub keyframe_requests_in: u64,
    /// Keyframe requests sent to publishers (after aggregation and throttling).
    pub keyframe_requests_out: u64,
    /// Joins accepted.
    pub joins: u64,
    /// Joins refused (call full, router full, draining, duplicate).
    pub joins_refused: u64,
    /// Sessions removed (leave or disconnect).
    pub leaves: u64,
    /// Signaling messages received.
    pub signals_in: u64,
    /// Signaling messages refused with an error.
    pub signal_errors: u64,
    /// Router-initiated SDP offers.
    pub renegotiations: u64,
    /// Router offers abandoned because the client's offer crossed them (glare).
    pub glare_rollbacks: u64,
    /// Media-port probe requests answered.
    pub probe_replies: u64,
    /// Audio packets not forwarded because their speaker is not among the call's loudest
    /// (`top_n_audio`).
    pub audio_not_forwarded: u64,
    /// Simulcast layer switches done (at a keyframe of the new layer).
    pub layer_switches: u64,
    /// Time from deciding a layer switch to the new layer's keyframe reaching the subscriber.
    pub layer_switch_time: DurationStats,
    /// Dynacast messages sent to publishers (layers paused or resumed).
    pub dynacast_updates: u64,
    /// Active speaker changes announced.
    pub speaker_changes: u64,
    /// Idle send streams taken out of str0m (nothing forwarded into them for 5 s).
    pub streams_parked: u64,
    /// Parked send streams declared again (media to forward into them).
    pub streams_unparked: u64,
    /// Receive slots that changed source (a speaker took an audio slot, a camera slot switched
    /// at a keyframe).
    pub slot_switches: u64,
    /// Slot mapping messages sent.
    pub slot_messages: u64,
    /// Forwarded audio packets a member had no free audio slot for (more forwarded speakers
    /// than `audio_slots`).
    pub audio_without_slot: u64,
    /// Sessions woken because their own timer fell due (str0m's pacer, RTCP, feedback), not
    /// counting the wake-ups that send what was just forwarded to them.
    pub timer_wakeups: u64,
    /// Sessions flushed after media was written to them (once per session and input).
    #[serde(default)]
    pub write_flushes: u64,
    /// Of the [`write_flushes`](Self::write_flushes), those that also ran the session's due
    /// str0m timers. The rest only let the written packets out (quiet sessions, and sessions
    /// with no timer due); their timers run on their own wake-ups.
    #[serde(default)]
    pub write_timeouts: u64,
    /// Audio packets sent to a subscriber at once, without str0m's send queue and pacer
    /// (subscribers that do not measure their audio: no video reaches them). The rest of the
    /// media out was queued and flushed (`write_flushes`).
    #[serde(default)]
    pub direct_sends: u64,
    /// Published microphones whose latest packet was RED (RFC 2198 redundant audio).
    #[serde(default)]
    pub red_streams: u64,
    /// RED packets received from publishers.
    #[serde(default)]
    pub red_packets_in: u64,
    /// RED packets written to subscribers as their primary Opus block only (subscribers that
    /// did not negotiate RED); per subscriber in `session_stats`.
    #[serde(default)]
    pub red_stripped: u64,
    /// RED packets dropped because their headers did not add up (lengths past the end, no
    /// primary block, too many blocks) or their primary block is not the negotiated Opus.
    #[serde(default)]
    pub red_malformed: u64,
    /// Opus packets from publishers (the primary block of RED ones) that carry in-band FEC
    /// (the LBRR flag of their first SILK frame).
    #[serde(default)]
    pub opus_fec_packets: u64,
    /// The router's load level (0 normal, 1 degraded, 2 overloaded; see
    /// [`LoadLevel`](crate::LoadLevel)). Merged snapshots keep the highest.
    #[serde(default)]
    pub load_level: u64,
    /// Load level changes (both ways).
    #[serde(default)]
    pub load_level_changes: u64,
    /// Joins refused because the router was overloaded (also counted in `joins_refused`).
    #[serde(default)]
    pub joins_refused_overloaded: u64,
    /// Calls being recorded now.
    #[serde(default)]
    pub recorders: u64,
    /// Recordings started.
    #[serde(default)]
    pub recordings_started: u64,
    /// Recorded files opened (one per recorded source and stretch of publishing).
    #[serde(default)]
    pub recording_files: u64,
    /// Bytes of recorded files handed to the embedder.
    #[serde(default)]
    pub recording_bytes: u64,
    /// Relay links (`relay`): frames, tracks, loss on links.
    #[serde(default)]
    pub relay: RelayCounts,
    /// Per-session link quality.
    pub session_stats: Vec<SessionStats>,
}

/// Declares [`RelayCounts`] from one table: its fields, their merge, their Prometheus names.
macro_rules! relay_counts {
    ($($(#[doc = $doc:literal])+ $kind:ident $field:ident,)+) => {
        /// Relay links (see [`crate::relay`]): what crossed them, what was refused, what was
        /// lost and repaired. Gauges are the state now; the rest are counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[non_exhaustive]
        pub struct RelayCounts {
            $($(#[doc = $doc])+ #[serde(default)] pub $field: u64,)+
        }

        impl RelayCounts {
            fn merge(&mut self, other: &RelayCounts) {
                $(self.$field += other.$field;)+
            }

            /// Every field: (name, help, is a gauge, value).
            pub fn fields(&self) -> Vec<(&'static str, &'static str, bool, u64)> {
                vec![$((
                    stringify!($field),
                    concat!($($doc),+),
                    relay_counts!(@gauge $kind),
                    self.$field,
                ),)+]
            }
        }
    };
    (@gauge gauge) => { true };
    (@gauge counter) => { false };
}

relay_counts! {
    /// Relay links open now.
    gauge links,
    /// Tracks imported from relay links now.
    gauge imported_tracks,
    /// Track exports (a track on one link) now.
    gauge exported_tracks,
    /// Relay links opened.
    counter links_opened,
    /// Relay links closed.
    counter links_closed,
    /// Relay frames received.
    counter frames_in,
    /// Relay frame bytes received.
    counter bytes_in,
    /// Relay frames sent.
    counter frames_out,
    /// Relay frame bytes sent.
    counter bytes_out,
    /// Media packets of imported tracks received.
    counter media_in,
    /// Relay frames dropped: not a valid frame (bad magic, version, type, lengths, fields).
    counter dropped_malformed,
    /// Relay frames dropped: unknown link, track or member.
    counter dropped_unknown,
    /// Relay frames dropped: a member or track id already taken (by a local session or
    /// another link).
    counter dropped_conflict,
    /// Relay frames dropped: a link's limit of members, tracks or layers reached.
    counter dropped_limit,
    /// Tracks imported.
    counter tracks_imported,
    /// Packets of exported simulcast layers not sent on a link because the other router does
    /// not want that layer (dynacast across the link).
    counter layers_withheld,
    /// Keyframe requests sent on links (for imported tracks).
    counter keyframe_requests_out,
    /// Keyframe requests received on links (for exported tracks).
    counter keyframe_requests_in,
    /// Layer demands sent on links.
    counter layer_demands_out,
    /// Layer demands received on links.
    counter layer_demands_in,
    /// Imported video packets found missing on a link (sequence gaps).
    counter lost_frames,
    /// Imported packets that arrived after a later one (reordered or repaired).
    counter late_frames,
    /// NACKs sent on links.
    counter nacks_out,
    /// NACKs received on links.
    counter nacks_in,
    /// Lost packets the importer stopped asking for (NACKed three times, or too many pending).
    counter nacks_given_up,
    /// Cached frames sent again for a link's NACK.
    counter retransmits,
    /// Frames a link's NACK asked for that were no longer cached.
    counter retransmits_missed,
    /// Gaps on a link too long to repair: concealed by a keyframe.
    counter concealed,
    /// Links that went silent (their tracks paused).
    counter link_silences,
    /// Silent links that spoke again (their tracks resumed).
    counter link_resumes,
}

impl MediaCounts {
    fn merge(&mut self, other: &MediaCounts) {
        self.audio_packets += other.audio_packets;
        self.audio_bytes += other.audio_bytes;
        self.video_packets += other.video_packets;
        self.video_bytes += other.video_bytes;
    }
}

impl MetricsSnapshot {
    /// Adds another router's snapshot into this one (one process, several worker routers).
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        self.sessions += other.sessions;
        self.calls += other.calls;
        self.flows += other.flows;
        self.connected_sessions += other.connected_sessions;
        self.tcp_connections += other.tcp_connections;
        self.tcp_rejected += other.tcp_rejected;
        self.tcp_unsent += other.tcp_unsent;
        self.datagrams_in += other.datagrams_in;
        self.datagram_bytes_in += other.datagram_bytes_in;
        self.datagrams_out += other.datagrams_out;
        self.datagram_bytes_out += other.datagram_bytes_out;
        for (reason, count) in &other.drops {
            *self.drops.entry(*reason).or_insert(0) += count;
        }
        self.media_in.merge(&other.media_in);
        self.media_out.merge(&other.media_out);
        self.media_dropped += other.media_dropped;
        self.keyframe_requests_in += other.keyframe_requests_in;
        self.keyframe_requests_out += other.keyframe_requests_out;
        self.joins += other.joins;
        self.joins_refused += other.joins_refused;
        self.leaves += other.leaves;
        self.signals_in += other.signals_in;
        self.signal_errors += other.signal_errors;
        self.renegotiations += other.renegotiations;
        self.glare_rollbacks += other.glare_rollbacks;
        self.probe_replies += other.probe_replies;
        self.audio_not_forwarded += other.audio_not_forwarded;
        self.layer_switches += other.layer_switches;
        self.layer_switch_time.merge(&other.layer_switch_time);
        self.dynacast_updates += other.dynacast_updates;
        self.speaker_changes += other.speaker_changes;
        self.streams_parked += other.streams_parked;
        self.streams_unparked += other.streams_unparked;
        self.slot_switches += other.slot_switches;
        self.slot_messages += other.slot_messages;
        self.audio_without_slot += other.audio_without_slot;
        self.timer_wakeups += other.timer_wakeups;
        self.write_flushes += other.write_flushes;
        self.write_timeouts += other.write_timeouts;
        self.direct_sends += other.direct_sends;
        self.red_streams += other.red_streams;
        self.red_packets_in += other.red_packets_in;
        self.red_stripped += other.red_stripped;
        self.red_malformed += other.red_malformed;
        self.opus_fec_packets += other.opus_fec_packets;
        self.load_level = self.load_level.max(other.load_level);
        self.load_level_changes += other.load_level_changes;
        self.joins_refused_overloaded += other.joins_refused_overloaded;
        self.recorders += other.recorders;
        self.recordings_started += other.recordings_started;
        self.recording_files += other.recording_files;
        self.recording_bytes += other.recording_bytes;
        self.relay.merge(&other.relay);
        self.session_stats
            .extend(other.session_stats.iter().cloned());
    }

    /// Total dropped datagrams (all reasons).
    pub fn dropped_total(&self) -> u64 {
        self.drops.values().sum()
    }

    /// Dropped datagrams for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition (names `calls_*`; counters end in `_total`), without
    /// per-session series (see [`to_prometheus_with`](Self::to_prometheus_with)).
    #[cfg(feature = "prometheus")]
    pub fn to_prometheus(&self) -> String {
        prom::render(self, false)
    }

    /// Like [`to_prometheus`](Self::to_prometheus); with `per_session` also one series per
    /// session (`calls_session_*{call,session}`): RTT, loss, bandwidth. Opt-in
    /// ([`Config::metrics_per_session`](crate::Config)), because every session then adds
    /// series that live on in the metrics store. Label values (call names are user input) are
    /// escaped as the text format requires.
    #[cfg(feature = "prometheus")]
    pub fn to_prometheus_with(&self, per_session: bool) -> String {
        prom::render(self, per_session)
    }
}

/// A label value escaped for the Prometheus / OpenMetrics text format (`\\`, `\"` and `\n`):
/// the encoder writes label values verbatim, so a call named `x"` + newline + `y` would end the
/// value early and break the exposition for every scraper.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(feature = "prometheus")]
mod prom {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    use std::sync::atomic::AtomicU64;

    use super::{escape_label_value, MetricsSnapshot};
    use crate::demux::DropReason;

    type Labels = Vec<(&'static str, String)>;

    fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    }

    fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
        let g: Gauge = Gauge::default();
        g.set(value as i64);
        registry.register(name, help, g);
    }

    pub(super) fn render(m: &MetricsSnapshot, per_session: bool) -> String {
        let mut registry = Registry::with_prefix("calls");
        gauge(
            &mut registry,
            "sessions",
            "Sessions on the router",
            m.sessions,
        );
        gauge(
            &mut registry,
            "calls",
            "Calls with at least one session",
            m.calls,
        );
        gauge(&mut registry, "flows", "Remembered 5-tuples", m.flows);
        gauge(
            &mut registry,
            "connected_sessions",
            "Sessions with ICE and DTLS up",
            m.connected_sessions,
        );
        counter(
            &mut registry,
            "datagrams_in",
            "Datagrams received",
            m.datagrams_in,
        );
        counter(
            &mut registry,
            "datagram_bytes_in",
            "Datagram bytes received",
            m.datagram_bytes_in,
        );
        counter(
            &mut registry,
            "datagrams_out",
            "Datagrams sent",
            m.datagrams_out,
        );
        counter(
            &mut registry,
            "datagram_bytes_out",
            "Datagram bytes sent",
            m.datagram_bytes_out,
        );

        let drops = Family::<Labels, Counter>::default();
        for reason in DropReason::ALL {
            drops
                .get_or_create(&vec![("reason", reason.as_str().to_owned())])
                .inc_by(m.dropped(reason));
        }
        registry.register(
            "datagrams_dropped",
            "Datagrams dropped before reaching a session, by reason",
            drops,
        );
        gauge(
            &mut registry,
            "tcp_connections",
            "ICE-TCP connections the router knows",
            m.tcp_connections,
        );
        counter(
            &mut registry,
            "tcp_rejected",
            "ICE-TCP connections closed for bad framing (a frame over 2048 bytes)",
            m.tcp_rejected,
        );
        counter(
            &mut registry,
            "tcp_unsent",
            "Frames for ICE-TCP connections already closed",
            m.tcp_unsent,
        );

        for (name, help, counts) in [
            ("rtp_in", "RTP received from publishers", &m.media_in),
            ("rtp_out", "RTP forwarded to subscribers", &m.media_out),
        ] {
            let packets = Family::<Labels, Counter>::default();
            let bytes = Family::<Labels, Counter>::default();
            for (kind, p, b) in [
                ("audio", counts.audio_packets, counts.audio_bytes),
                ("video", counts.video_packets, counts.video_bytes),
            ] {
                packets
                    .get_or_create(&vec![("kind", kind.to_owned())])
                    .inc_by(p);
                bytes
                    .get_or_create(&vec![("kind", kind.to_owned())])
                    .inc_by(b);
            }
            registry.register(
                format!("{name}_packets"),
                format!("{help} (packets)"),
                packets,
            );
            registry.register(
                format!("{name}_bytes"),
                format!("{help} (payload bytes)"),
                bytes,
            );
        }
        counter(
            &mut registry,
            "rtp_not_forwarded",
            "RTP from publishers not forwarded (forbidden, muted, unknown)",
            m.media_dropped,
        );
        counter(
            &mut registry,
            "keyframe_requests_in",
            "Keyframe requests from subscribers",
            m.keyframe_requests_in,
        );
        counter(
            &mut registry,
            "keyframe_requests_out",
            "Keyframe requests sent to publishers",
            m.keyframe_requests_out,
        );
        counter(&mut registry, "joins", "Joins accepted", m.joins);
        counter(
            &mut registry,
            "joins_refused",
            "Joins refused",
            m.joins_refused,
        );
        counter(&mut registry, "leaves", "Sessions removed", m.leaves);
        counter(
            &mut registry,
            "signals_in",
            "Signaling messages received",
            m.signals_in,
        );
        counter(
            &mut registry,
            "signal_errors",
            "Signaling messages refused",
            m.signal_errors,
        );
        counter(
            &mut registry,
            "renegotiations",
            "Router-initiated offers",
            m.renegotiations,
        );
        counter(
            &mut registry,
            "glare_rollbacks",
            "Router offers dropped for a crossing client offer",
            m.glare_rollbacks,
        );

        counter(
            &mut registry,
            "probe_replies",
            "Media-port probe requests answered",
            m.probe_replies,
        );
        counter(
            &mut registry,
            "audio_not_forwarded",
            "Audio packets not forwarded: their speaker is not among the loudest (top_n_audio)",
            m.audio_not_forwarded,
        );
        counter(
            &mut registry,
            "layer_switches",
            "Simulcast layer switches (at a keyframe of the new layer)",
            m.layer_switches,
        );
        // Seconds, the base unit (Prometheus naming): a float counter of the summed milliseconds.
        let switch_time = Counter::<f64, AtomicU64>::default();
        switch_time.inc_by(m.layer_switch_time.total_ms as f64 / 1000.0);
        registry.register(
            "layer_switch_seconds",
            "Total time from a layer-switch decision to the new layer's keyframe",
            switch_time,
        );
        counter(
            &mut registry,
            "dynacast_updates",
            "Messages telling publishers which simulcast layers to send",
            m.dynacast_updates,
        );
        counter(
            &mut registry,
            "speaker_changes",
            "Active speaker changes announced",
            m.speaker_changes,
        );
        counter(
            &mut registry,
            "streams_parked",
            "Idle send streams taken out of the WebRTC stack (nothing forwarded for 5 s)",
            m.streams_parked,
        );
        counter(
            &mut registry,
            "streams_unparked",
            "Parked send streams declared again (media to forward into them)",
            m.streams_unparked,
        );
        counter(
            &mut registry,
            "slot_switches",
            "Receive slots that changed source (audio at once, video at a keyframe)",
            m.slot_switches,
        );
        counter(
            &mut registry,
            "slot_messages",
            "Slot mapping messages sent to subscribers",
            m.slot_messages,
        );
        counter(
            &mut registry,
            "audio_without_slot",
            "Forwarded audio packets a member had no free audio slot for",
            m.audio_without_slot,
        );
        counter(
            &mut registry,
            "timer_wakeups",
            "Sessions woken by their own timers (pacer, RTCP, feedback); quiet sessions share the tick's grid",
            m.timer_wakeups,
        );
        counter(
            &mut registry,
            "write_flushes",
            "Sessions flushed after media was written to them",
            m.write_flushes,
        );
        counter(
            &mut registry,
            "write_timeouts",
            "Write flushes that also ran the session's due timers (never for quiet sessions)",
            m.write_timeouts,
        );
        counter(
            &mut registry,
            "direct_sends",
            "Audio packets sent at once, without the send queue and pacer (subscribers without video)",
            m.direct_sends,
        );
        gauge(
            &mut registry,
            "red_streams",
            "Published microphones sending RED (redundant audio)",
            m.red_streams,
        );
        counter(
            &mut registry,
            "red_packets_in",
            "RED audio packets received from publishers",
            m.red_packets_in,
        );
        counter(
            &mut registry,
            "red_stripped",
            "RED packets sent as plain Opus to subscribers without RED",
            m.red_stripped,
        );
        counter(
            &mut registry,
            "red_malformed",
            "RED packets dropped for headers that do not add up",
            m.red_malformed,
        );
        counter(
            &mut registry,
            "opus_fec_packets",
            "Opus packets from publishers carrying in-band FEC (LBRR)",
            m.opus_fec_packets,
        );
        gauge(
            &mut registry,
            "load_level",
            "Load level the router acts on (0 normal, 1 degraded: joins refused and video at its lowest layer, 2 overloaded: cameras shed too); the highest of the routers",
            m.load_level,
        );
        counter(
            &mut registry,
            "load_level_changes",
            "Load level changes, both ways",
            m.load_level_changes,
        );
        counter(
            &mut registry,
            "joins_refused_overloaded",
            "Joins refused because the router was overloaded (also in joins_refused)",
            m.joins_refused_overloaded,
        );
        gauge(
            &mut registry,
            "recorders",
            "Calls being recorded now",
            m.recorders,
        );
        counter(
            &mut registry,
            "recordings",
            "Recordings started",
            m.recordings_started,
        );
        counter(
            &mut registry,
            "recording_files",
            "Recorded files opened (one per recorded source)",
            m.recording_files,
        );
        counter(
            &mut registry,
            "recording_bytes",
            "Bytes of recorded files handed to the embedder",
            m.recording_bytes,
        );
        for (name, help, is_gauge, value) in m.relay.fields() {
            let name = format!("relay_{name}");
            if is_gauge {
                gauge(&mut registry, &name, help, value);
            } else {
                counter(&mut registry, &name, help, value);
            }
        }
        subscriber_quantiles(&mut registry, m);
        if per_session {
            session_series(&mut registry, m);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }

    /// Link quality over all sessions in a few series whatever the number of sessions (the
    /// ops bundle's dashboard and alerts use these; the per-session series are opt-in):
    /// nearest-rank quantiles of the subscribers' reported loss, round-trip time and
    /// bandwidth estimate.
    fn subscriber_quantiles(registry: &mut Registry, m: &MetricsSnapshot) {
        let series = |values: Vec<f64>, quantiles: &[f64]| {
            let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
            values.sort_by(f64::total_cmp);
            if !values.is_empty() {
                for &q in quantiles {
                    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
                    family
                        .get_or_create(&vec![("quantile", q.to_string())])
                        .set(values[rank - 1]);
                }
            }
            family
        };
        let stats = &m.session_stats;
        registry.register(
            "subscriber_loss_ratio",
            "Loss the subscribers report (receiver reports), quantiles over sessions",
            series(
                stats.iter().filter_map(|s| s.egress_loss).collect(),
                &[0.5, 0.9],
            ),
        );
        registry.register(
            "subscriber_rtt_seconds",
            "Round-trip time to the subscribers, quantiles over sessions",
            series(
                stats
                    .iter()
                    .filter_map(|s| s.rtt_ms)
                    .map(|v| v / 1000.0)
                    .collect(),
                &[0.5, 0.9],
            ),
        );
        registry.register(
            "subscriber_bandwidth_bytes_per_second",
            "Bandwidth towards the subscribers (congestion-control estimate or its cap), quantiles over sessions",
            series(
                stats
                    .iter()
                    .filter_map(|s| s.bandwidth_bps)
                    .map(|v| v as f64 / 8.0)
                    .collect(),
                &[0.1, 0.5],
            ),
        );
    }

    /// One series per session: opt-in (`Config::metrics_per_session`).
    fn session_series(registry: &mut Registry, m: &MetricsSnapshot) {
        let labels_of = |s: &crate::metrics::SessionStats| {
            vec![
                ("call", escape_label_value(s.call.as_str())),
                ("session", s.session.0.to_string()),
            ]
        };
        let rtt = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let loss = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for s in &m.session_stats {
            let labels = labels_of(s);
            if let Some(v) = s.rtt_ms {
                rtt.get_or_create(&labels).set(v / 1000.0);
            }
            if let Some(v) = s.egress_loss {
                loss.get_or_create(&labels).set(v);
            }
        }
        let red_stripped = Family::<Labels, Counter>::default();
        let listener_loss = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for s in &m.session_stats {
            if s.red_stripped > 0 {
                red_stripped
                    .get_or_create(&labels_of(s))
                    .inc_by(s.red_stripped);
            }
            if let Some(v) = s.listener_loss {
                listener_loss.get_or_create(&labels_of(s)).set(v);
            }
        }
        registry.register(
            "session_red_stripped",
            "RED packets each subscriber got as plain Opus",
            red_stripped,
        );
        registry.register(
            "session_listener_loss_ratio",
            "Loss the router would report to each publisher's audio encoder (worst listener, capped)",
            listener_loss,
        );
        let bandwidth = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for s in &m.session_stats {
            if let Some(v) = s.bandwidth_bps {
                let labels = labels_of(s);
                // Bytes, the base unit (Prometheus naming).
                bandwidth.get_or_create(&labels).set(v as f64 / 8.0);
            }
        }
        registry.register(
            "session_bandwidth_bytes_per_second",
            "Bandwidth towards each session: congestion-control estimate (or its cap)",
            bandwidth,
        );
        registry.register("session_rtt_seconds", "Round-trip time per session", rtt);
        registry.register(
            "session_egress_loss_ratio",
            "Loss reported by each subscriber",
            loss,
        );
    }
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let mut m = MetricsSnapshot {
            sessions: 2,
            ..Default::default()
        };
        m.drops.insert(DropReason::UnknownSource, 7);
        m.media_in.add(true, 100);
        let text = m.to_prometheus();
        assert!(text.contains("calls_sessions 2"), "{text}");
        assert!(
            text.contains("calls_datagrams_dropped_total{reason=\"unknown_source\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("calls_rtp_in_packets_total{kind=\"audio\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// The ICE-TCP counters docs/metrics.md and docs/security.md name are in the exposition.
    #[test]
    fn ice_tcp_counters_are_rendered() {
        let m = MetricsSnapshot {
            tcp_connections: 3,
            tcp_rejected: 2,
            tcp_unsent: 5,
            ..Default::default()
        };
        let text = m.to_prometheus();
        for line in [
            "calls_tcp_connections 3",
            "calls_tcp_rejected_total 2",
            "calls_tcp_unsent_total 5",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    fn session_in(call: &str) -> SessionStats {
        SessionStats {
            session: SessionId(7),
            call: CallId::from(call),
            rtt_ms: Some(20.0),
            egress_loss: Some(0.0),
            ingress_loss: None,
            red_stripped: 0,
            listener_loss: None,
            bandwidth_bps: Some(1_000_000),
        }
    }

    /// Finding 6 (issue 16): a call named `x"` + newline + `y` cannot break the exposition:
    /// every line of it is still a comment, a sample, or `# EOF`.
    #[test]
    fn hostile_call_names_are_escaped_in_label_values() {
        let m = MetricsSnapshot {
            session_stats: vec![session_in("x\"\ny\\")],
            ..Default::default()
        };
        let text = m.to_prometheus_with(true);
        assert!(
            text.contains(r#"calls_session_rtt_seconds{call="x\"\ny\\",session="7"} 0.02"#),
            "{text}"
        );
        for line in text.lines() {
            let sample = line
                .split_once(' ')
                .is_some_and(|(name, value)| !name.is_empty() && value.parse::<f64>().is_ok());
            assert!(
                line.starts_with('#') || sample,
                "not a sample: {line:?} in\n{text}"
            );
        }
    }

    /// Finding 6 (issue 16): per-session series are opt-in (unbounded cardinality).
    #[test]
    fn per_session_series_are_opt_in() {
        let m = MetricsSnapshot {
            session_stats: vec![session_in("room")],
            ..Default::default()
        };
        assert!(!m.to_prometheus().contains("calls_session_"));
        // The quantiles over sessions are always there (the ops bundle queries them).
        assert!(m
            .to_prometheus()
            .contains("calls_subscriber_rtt_seconds{quantile=\"0.5\"} 0.02"));
        assert!(m
            .to_prometheus_with(true)
            .contains("calls_session_rtt_seconds"));
    }

    #[test]
    fn metrics_are_in_base_units() {
        let mut m = MetricsSnapshot::default();
        m.layer_switch_time
            .record(std::time::Duration::from_millis(1500));
        m.session_stats.push(SessionStats {
            call: CallId::from("c"),
            session: SessionId(1),
            rtt_ms: Some(20.0),
            egress_loss: Some(0.01),
            ingress_loss: None,
            red_stripped: 0,
            listener_loss: None,
            bandwidth_bps: Some(800_000),
        });
        // Per-session series are opt-in (issue 16); their units are checked too.
        let text = m.to_prometheus_with(true);
        assert!(
            text.contains("calls_layer_switch_seconds_total 1.5\n"),
            "{text}"
        );
        assert!(text.contains("calls_session_rtt_seconds{call=\"c\",session=\"1\"} 0.02"));
        assert!(
            text.contains("calls_subscriber_rtt_seconds{quantile=\"0.9\"} 0.02"),
            "{text}"
        );
        assert!(text.contains(
            "calls_session_bandwidth_bytes_per_second{call=\"c\",session=\"1\"} 100000.0"
        ));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            for unit in ["milli", "micro", "_ms", "bits", "kbps", "kilo", "mega"] {
                assert!(!line.contains(unit), "not a base unit: {line}");
            }
        }
    }
}
