//! One participant's connection: a str0m `Rtc` (ICE-lite, DTLS-SRTP, SDP, RTP mode) plus what
//! the router knows about it (grants, published mids, subscriptions, negotiation state).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use str0m::bwe::Bitrate;
use str0m::change::SdpPendingOffer;
use str0m::config::DtlsCert;
use str0m::format::Codec;
use str0m::media::{Mid, Pt, Rid};
use str0m::net::TcpType;
use str0m::rtp::{SeqNo, Ssrc};
use str0m::{Candidate, IceCreds, Rtc};

use crate::config::Config;
use crate::ids::{CallId, Grants, SessionId, TrackSource, UserId};
use crate::signal::SlotKind;
use crate::slot::Slot;

/// How often str0m reports per-session stats (RTT, loss).
const STATS_INTERVAL: Duration = Duration::from_secs(2);
/// Outgoing audio packets str0m keeps per stream. Our audio writes are not nackable, so this
/// only holds packets between `write_rtp` and the next poll (str0m's default is 50).
const SEND_BUFFER_AUDIO: usize = 16;
/// The age limit of an audio stream's (unused) resend cache: str0m's default.
const AUDIO_RTX_CACHE_AGE: Duration = Duration::from_secs(3);
/// Outgoing video packets str0m keeps per stream for NACK/RTX and BWE probing: at 1.5 Mbit/s
/// of ~1100-byte packets, 300 packets are ~1.7 s of history (str0m's default is 1000).
const SEND_BUFFER_VIDEO: usize = 300;
/// Sent packets the TWCC register keeps per session (str0m's default is 1000, ~88 KB per
/// session; the vendored str0m makes it configurable). Feedback for a packet comes within an
/// RTT plus Chromium's ~100 ms feedback interval: 250 records cover ~550 ms at 450 packets/s
/// (nine camera slots and a screen), and listeners send far fewer.
const TWCC_SEND_HISTORY: usize = 250;

/// A send stream that has carried nothing for this long is taken out of str0m (parked): str0m
/// visits every send stream of a session on every timeout (sender reports, pacer queue
/// states), so a 200-person call where most microphones are muted would otherwise pay for
/// ~200 idle streams per subscriber on every packet. Longer than str0m's pacer queue limit
/// (2 s), so nothing is still queued in a parked stream.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(5);

/// A send stream taken out of str0m while idle (see [`PARK_AFTER`]): what declaring it again
/// needs so the subscriber sees the same stream continue.
#[derive(Debug, Clone, Copy)]
pub struct ParkedStream {
    /// Its RTX SSRC (the SDP announced both).
    pub rtx: Option<Ssrc>,
    /// The slot's m-line.
    pub mid: Mid,
    /// Where its RTX sequence goes on. A stream declared anew starts RTX at a random number:
    /// the subscriber would drop what looks like old packets (probes and resends lost to it,
    /// its bandwidth estimate collapsing), and SRTP would reuse packet indexes under the same
    /// key (vendored str0m patch 0006).
    pub next_rtx_seq: SeqNo,
}

impl ParkedStream {
    /// Declares the stream in `rtc` again, its RTX sequence where it stopped.
    fn declare(&self, rtc: &mut Rtc, ssrc: Ssrc) {
        // str0m never removes m-lines (we do not use `remove_media`); checked all the same,
        // since declaring a stream on an unknown mid panics inside str0m.
        let Some(audio) = rtc.media(self.mid).map(|m| m.kind().is_audio()) else {
            return;
        };
        let mut api = rtc.direct_api();
        let tx = api.declare_stream_tx(ssrc, self.rtx, self.mid, None);
        tx.set_next_rtx_seq_no(self.next_rtx_seq);
        tune_send_stream(tx, audio);
    }
}

/// Sets up a slot's send stream, as str0m made it in an SDP operation or as it is declared
/// again after parking. Audio is never resent, so str0m's cap on the resent share of a stream
/// has nothing to cap there: without the cap str0m keeps no send history for it (an entry
/// per packet, and one more cache line per packet per listener on the forwarding path).
pub(crate) fn tune_send_stream(tx: &mut str0m::rtp::StreamTx, audio: bool) {
    if audio {
        tx.set_rtx_cache(SEND_BUFFER_AUDIO, AUDIO_RTX_CACHE_AGE, None);
    }
}

/// The bandwidth assumed towards a new session until its estimator knows better: enough for
/// a middle simulcast layer or two low ones; the estimator probes upwards from here.
pub(crate) const INITIAL_ESTIMATE_BPS: u64 = 1_000_000;

/// Video layer selection for one source on one slot.
#[derive(Debug, Default)]
pub(crate) struct Selection {
    /// The allocator's choice: the simulcast layer (`None` rid without simulcast) and the
    /// highest temporal layer. `None`: nothing (no budget, or paused by the subscriber).
    pub target: Option<(Option<Rid>, u8)>,
    /// The simulcast layer forwarded now; the switch to `target` waits for its keyframe.
    pub current: Option<Rid>,
    /// The temporal cap in force (changed at picture starts).
    pub tid_cap: u8,
    /// Since when an upgrade has been affordable (hysteresis).
    pub upgrade_since: Option<Instant>,
    /// When the target last changed to another spatial layer (for switch-time metrics).
    pub switch_started: Option<Instant>,
}

/// Slot m-lines a router offer adds or turns on or off.
#[derive(Debug, Default)]
pub(crate) struct SlotChange {
    /// New m-lines, by kind.
    pub added: Vec<(Mid, SlotKind)>,
    /// Inactive slots turned back on (indices into `Session::slots`).
    pub reactivated: Vec<usize>,
    /// Active slots turned off (already taken out of forwarding when the offer was made).
    pub deactivated: Vec<usize>,
}

/// A router offer waiting for the client's answer.
#[derive(Debug)]
pub(crate) struct PendingOffer {
    pub pending: SdpPendingOffer,
    /// What this offer changes in the slots.
    pub change: SlotChange,
    /// The offer as sent, for [`Router::resend_signaling`](crate::Router::resend_signaling).
    pub sdp: String,
    /// When it was (last) sent, and how often it was re-sent unanswered.
    pub sent_at: Instant,
    pub resends: u8,
}

/// In declaration order (`repr(C)`): what forwarding a packet reads of every listener
/// (`connected`, `slots`) shares one cache line; Rust's own order put them in two of this
/// ~11 KB struct.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Session {
    pub connected: bool,
    pub muted: bool,
    /// Receive slots whose m-line has been negotiated, in SDP order.
    pub slots: Vec<Slot>,
    pub call: CallId,
    pub user: UserId,
    pub grants: Grants,
    pub rtc: Rtc,
    pub local_creds: IceCreds,
    /// The client has made its first offer (the router offers only after that).
    pub negotiated: bool,
    pub screen_mid: Option<Mid>,
    /// Mids this session publishes on (accepted by the grants).
    pub published: Vec<Mid>,
    /// Incoming SSRC → (mid, rid), cached from str0m's receive streams.
    pub rx_ssrc: HashMap<Ssrc, (Mid, Option<Rid>)>,
    /// Camera slots this session wants (`video_slots` until it sends `slots`).
    pub video_slots: usize,
    /// Sessions whose cameras go on this session's camera slots first, in this order.
    pub pins: Vec<SessionId>,
    pub pending_offer: Option<PendingOffer>,
    /// Next time str0m wants `handle_timeout`.
    pub next_timeout: Option<Instant>,
    /// In the router's touched list (has writes that need a timeout to go out).
    pub touched: bool,
    /// Packets written since the session last ran (`Router::finish` lets each one out).
    pub unflushed: u16,
    /// When str0m last asked to be woken (before any rounding to the router's tick grid).
    pub str0m_due: Option<Instant>,
    /// Nothing in this session needs str0m's timers on time (`router::is_quiet`), as of its
    /// last drain.
    pub quiet: bool,
    pub rtt_ms: Option<f64>,
    pub egress_loss: Option<f64>,
    pub ingress_loss: Option<f64>,
    /// The `fraction lost` floor (1/256) last set on this session's microphone streams'
    /// receiver reports (`Router::apply_listener_loss`).
    pub reported_loss_floor: Option<u8>,
    /// [`Router::set_bandwidth_cap`](crate::Router::set_bandwidth_cap).
    pub bandwidth_cap: Option<u64>,
    /// The congestion controller's latest estimate towards this session (bits per second).
    pub bwe_estimate: Option<u64>,
    /// The (minimum, desired) bitrates last given to str0m's estimator.
    pub bwe_asked: (u64, u64),
    /// Send streams taken out of str0m while idle, by SSRC. Declared again with the same
    /// SSRCs (and RTX sequence) before the next write, and for the time of each SDP operation
    /// ([`Session::with_streams_declared`]).
    pub parked: HashMap<Ssrc, ParkedStream>,
    /// The client's ICE credentials from its latest offer: the router's consent checks to a
    /// new address of this session are signed with them ([`crate::consent`]).
    pub remote_ice: Option<crate::limits::RemoteIce>,
    /// RED packets written to this subscriber as their primary Opus block only.
    pub red_stripped: u64,
    /// The audio written to this subscriber carries transport-wide sequence numbers (so its
    /// client sends transport-cc feedback for it): only while it also receives video
    /// ([`Session::measure_audio_with_video`]).
    pub audio_measured: bool,
    /// [`Session::video_feeds`], kept by [`Session::refresh_video_feeds`] after every change
    /// of a video slot's source: the router asks for it on every wake-up of the session, and
    /// counting walked all 15 slots (~6 KB) each time.
    video_feeds: usize,
}

/// What one of a session's payload types carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadCodec {
    pub codec: Codec,
    pub clock_rate: u32,
    /// The codec's own payload type (for a RED type: the one its blocks must carry).
    pub primary_pt: Pt,
    /// The payload type is the RFC 2198 RED type wrapping `codec` (its primary).
    pub red: bool,
}

impl Session {
    pub fn new(
        id: SessionId,
        call: CallId,
        user: UserId,
        grants: Grants,
        config: &Config,
        dtls_cert: &DtlsCert,
        now: Instant,
    ) -> Self {
        let random = IceCreds::new();
        let local_creds = IceCreds {
            ufrag: crate::demux::ufrag::mint(config.worker_index, &random.ufrag),
            pass: random.pass,
        };
        let mut builder = Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .set_local_ice_credentials(local_creds.clone())
            .set_dtls_cert(dtls_cert.clone())
            .clear_codecs()
            .enable_opus(true, config.red);
        // Our answer's Opus fmtp carries `usedtx=1`: the client's encoder sends DTX when
        // silent (the vendored str0m's `set_opus_dtx`).
        builder.codec_config().set_opus_dtx(config.opus_dtx);
        let mut rtc = builder
            .enable_vp8(true)
            .enable_h264(true)
            .enable_vp9(true)
            .enable_av1(true)
            .set_stats_interval(Some(STATS_INTERVAL))
            .set_send_buffer_audio(SEND_BUFFER_AUDIO)
            .set_send_buffer_video(SEND_BUFFER_VIDEO)
            .enable_bwe(Some(Bitrate::bps(INITIAL_ESTIMATE_BPS)))
            .set_twcc_send_history(TWCC_SEND_HISTORY)
            .build(now);
        // Nothing but audio to send yet: leave it unmeasured (`measure_audio_with_video`).
        rtc.direct_api().set_audio_transport_cc(false);
        let udp = config
            .udp_candidates()
            .into_iter()
            .map(|addr| (addr, Candidate::host(addr, "udp")));
        let tcp = config
            .tcp_candidates()
            .into_iter()
            .filter(|_| config.enable_tcp)
            .map(|addr| {
                let candidate = Candidate::builder()
                    .tcp()
                    .host(addr)
                    .tcptype(TcpType::Passive)
                    .build();
                (addr, candidate)
            });
        for (addr, candidate) in udp.chain(tcp) {
            match candidate {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(session = %id, %addr, "host candidate refused: {e}"),
            }
        }
        Session {
            call,
            user,
            grants,
            rtc,
            local_creds,
            muted: false,
            connected: false,
            negotiated: false,
            screen_mid: None,
            published: Vec::new(),
            rx_ssrc: HashMap::new(),
            slots: Vec::new(),
            video_slots: config.video_slots,
            pins: Vec::new(),
            pending_offer: None,
            next_timeout: None,
            touched: false,
            unflushed: 0,
            str0m_due: None,
            quiet: false,
            rtt_ms: None,
            egress_loss: None,
            ingress_loss: None,
            reported_loss_floor: None,
            bandwidth_cap: None,
            bwe_estimate: None,
            bwe_asked: (0, 0),
            parked: HashMap::new(),
            remote_ice: None,
            red_stripped: 0,
            audio_measured: false,
            video_feeds: 0,
        }
    }

    /// Measures the audio sent to this session with transport-cc (the vendored str0m's
    /// `set_audio_transport_cc`) exactly while a video slot carries or awaits a source.
    ///
    /// The bandwidth estimate matters only for choosing video layers. A listener that hears
    /// audio alone would otherwise send a transport-cc report for it about ten times a second:
    /// in a meeting of muted microphones that was most of the datagrams reaching the server.
    /// The estimator's probes stay measured, and once video flows the audio is measured again,
    /// so the estimate covers everything on the link, as before.
    pub fn measure_audio_with_video(&mut self) {
        let measure = self.video_feeds() > 0;
        if measure != self.audio_measured {
            self.audio_measured = measure;
            self.rtc.direct_api().set_audio_transport_cc(measure);
        }
    }

    /// Parks the send streams of slots idle for [`PARK_AFTER`] (and of inactive slots).
    /// Returns how many were parked.
    pub fn park_idle(&mut self, now: Instant) -> usize {
        let mut count = 0;
        let mut api = self.rtc.direct_api();
        for slot in &mut self.slots {
            if slot.parked || now.saturating_duration_since(slot.last_write) < PARK_AFTER {
                continue;
            }
            let Some(parked) = api.stream_tx(&slot.ssrc).map(|tx| ParkedStream {
                rtx: tx.rtx(),
                mid: slot.mid,
                next_rtx_seq: tx.next_rtx_seq_no(),
            }) else {
                continue;
            };
            api.remove_stream_tx(slot.ssrc);
            self.parked.insert(slot.ssrc, parked);
            slot.parked = true;
            count += 1;
        }
        count
    }

    /// Video slots that carry or wait for a source (the allocator skips sessions without any).
    pub fn video_feeds(&self) -> usize {
        debug_assert_eq!(
            self.video_feeds,
            self.count_video_feeds(),
            "a video slot changed its source without refresh_video_feeds"
        );
        self.video_feeds
    }

    /// Counts [`Session::video_feeds`] again: after a video slot's source (`next` or
    /// `current`) or its `active` flag changed.
    pub fn refresh_video_feeds(&mut self) {
        self.video_feeds = self.count_video_feeds();
    }

    fn count_video_feeds(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.active && s.is_video() && s.target().is_some())
            .count()
    }

    /// The slot on m-line `mid`.
    pub fn slot_by_mid(&self, mid: Mid) -> Option<usize> {
        self.slots.iter().position(|s| s.mid == mid)
    }

    /// Declares a parked send stream again (same SSRC and RTX SSRC, so the SDP stays true).
    /// Returns whether it was parked.
    pub fn unpark(&mut self, ssrc: Ssrc) -> bool {
        let Some(parked) = self.parked.remove(&ssrc) else {
            return false;
        };
        parked.declare(&mut self.rtc, ssrc);
        if let Some(slot) = self.slots.iter_mut().find(|s| s.ssrc == ssrc) {
            slot.parked = false;
        }
        true
    }

    /// Runs an SDP operation with every parked send stream declared, and parks them again
    /// after it: str0m lists the SSRCs of existing send streams in its offers, and, when it
    /// applies an offer or answer, makes new streams with new SSRCs for sending m-lines that
    /// have none.
    pub fn with_streams_declared<T>(&mut self, op: impl FnOnce(&mut Rtc) -> T) -> T {
        for (&ssrc, parked) in &self.parked {
            parked.declare(&mut self.rtc, ssrc);
        }
        let result = op(&mut self.rtc);
        let mut api = self.rtc.direct_api();
        for (&ssrc, parked) in &mut self.parked {
            // Nothing is sent during an SDP operation; read back all the same.
            if let Some(tx) = api.stream_tx(&ssrc) {
                parked.next_rtx_seq = tx.next_rtx_seq_no();
            }
            api.remove_stream_tx(ssrc);
        }
        result
    }

    /// (mid, rid) of an incoming SSRC, cached (the MID/RID extensions stop after a while).
    pub fn rx_stream(&mut self, ssrc: Ssrc) -> Option<(Mid, Option<Rid>)> {
        if let Some(found) = self.rx_ssrc.get(&ssrc) {
            return Some(*found);
        }
        let found = self
            .rtc
            .direct_api()
            .stream_rx(&ssrc)
            .map(|stream| (stream.mid(), stream.rid()))?;
        // Bounded by the streams str0m accepted for negotiated m-lines.
        self.rx_ssrc.insert(ssrc, found);
        Some(found)
    }

    /// The codec of one of this session's payload types (a RED type counts as its primary's,
    /// with `red` set).
    pub fn codec_of(&self, pt: Pt) -> Option<PayloadCodec> {
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.pt() == pt || p.red() == Some(pt))
            .map(|p| PayloadCodec {
                codec: p.spec().codec,
                clock_rate: p.spec().clock_rate.get(),
                primary_pt: p.pt(),
                red: p.pt() != pt,
            })
    }
}

/// A session's RED payload type wrapping `primary` (its payload type for the codec), if it
/// negotiated RED.
pub(crate) fn red_pt_for(rtc: &Rtc, primary: Pt) -> Option<Pt> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.pt() == primary)
        .and_then(|p| p.red())
}

/// A session's payload type for a codec (and clock rate).
pub(crate) fn pt_for(rtc: &Rtc, codec: Codec, clock_rate: u32) -> Option<Pt> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec && p.spec().clock_rate.get() == clock_rate)
        .map(|p| p.pt())
}

/// Rewrites an offer so that m-lines the grants forbid are not sent to us: `sendrecv` becomes
/// `recvonly` and `sendonly` becomes `inactive`. str0m then answers them accordingly, so the
/// browser never starts sending them. Returns the rewritten SDP and how many m-lines changed.
pub(crate) fn restrict_offer(
    sdp: &str,
    grants: Grants,
    screen_mid: Option<&str>,
) -> (String, usize) {
    // First pass: find each m-section's kind and mid.
    struct Section {
        start: usize,
        end: usize,
        source: Option<TrackSource>,
    }
    let lines: Vec<&str> = sdp.lines().collect();
    let mut sections: Vec<Section> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("m=") {
            if let Some(last) = sections.last_mut() {
                last.end = i;
            }
            let source = if rest.starts_with("audio") {
                Some(TrackSource::Microphone)
            } else if rest.starts_with("video") {
                Some(TrackSource::Camera)
            } else {
                None
            };
            sections.push(Section {
                start: i,
                end: lines.len(),
                source,
            });
        }
    }
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    let mut changed = 0;
    for section in &sections {
        let Some(mut source) = section.source else {
            continue;
        };
        let mid = lines[section.start..section.end]
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .map(str::trim);
        if source == TrackSource::Camera && mid.is_some() && mid == screen_mid {
            source = TrackSource::Screen;
        }
        if grants.may_publish(source) {
            continue;
        }
        for line in &mut out[section.start..section.end] {
            let replacement = match line.trim_end() {
                "a=sendrecv" => "a=recvonly",
                "a=sendonly" => "a=inactive",
                _ => continue,
            };
            *line = replacement.to_owned();
            changed += 1;
        }
    }
    let mut text = out.join("\r\n");
    text.push_str("\r\n");
    (text, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n";

    #[test]
    fn viewer_offer_is_answered_without_its_tracks() {
        let (sdp, changed) = restrict_offer(OFFER, Grants::VIEWER, None);
        assert_eq!(changed, 3);
        assert!(sdp.contains("a=mid:0\r\na=recvonly"));
        assert!(sdp.contains("a=mid:1\r\na=inactive"));
    }

    #[test]
    fn screen_grant_is_separate_from_camera() {
        let grants = Grants::new(true, true, false, true);
        let (sdp, changed) = restrict_offer(OFFER, grants, Some("2"));
        assert_eq!(changed, 1);
        assert!(sdp.contains("a=mid:1\r\na=sendonly"));
        assert!(sdp.contains("a=mid:2\r\na=inactive"));
    }
}
