//! What a receiver measures: per received stream ([`TrackStats`]: packets, gaps and holes,
//! keyframes, frames per layer, freezes, VP8 picture-id continuity, frame rate) and which
//! source each receive slot carries ([`SlotMap`], from the router's `slots` messages, checked
//! against the source tag every synthetic payload carries).
//!
//! Shared by the simulated peers ([`SimPeer`](super::SimPeer)) and the load tester's
//! participants (calls-py), so both measure the same way. What a receiver measures where its
//! datagrams arrive (the peer keeps no per-packet record) is here too: the RFC 3550
//! interarrival jitter ([`Jitter`], from [`clear_rtp_header`]), freezes ([`Freezes`]) and
//! payload bytes per simulcast layer ([`LayerBytes`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use str0m::format::detect_vp8_keyframe;
use str0m::rtp::{RedDecoder, RtpPacket, Vp8Descriptor};

use crate::ids::{SessionId, TrackSource};
use crate::signal::SlotInfo;

use super::encoder::{layer_and_tid, opus_origin, opus_sent_at, source_tag};

/// Sequence numbers behind the highest one received that are still watched for a late
/// (retransmitted) arrival; holes further behind stay counted in [`TrackStats::missing`].
const HOLE_WINDOW: u64 = 2048;
/// Frame arrival times kept per track for [`TrackStats::fps_over`] (17 s at 30 fps).
const FRAME_TIMES_LEN: usize = 512;
/// Entries kept in [`TrackStats::layer_changes`].
const LAYER_CHANGES_LEN: usize = 1024;
/// VP8 PictureIDs are 15 bits (RFC 7741 §4.2, M=1).
const PICTURE_ID_MASK: u16 = 0x7FFF;
/// A gap longer than this between two packets of a video stream is a freeze.
pub const FREEZE: Duration = Duration::from_millis(500);
/// RTP clock rate of Opus (RFC 7587 §4.1: always 48 kHz).
pub const OPUS_CLOCK_RATE: f64 = 48_000.0;
/// RTP clock rate of VP8 (RFC 7741 §4.1).
pub const VP8_CLOCK_RATE: f64 = 90_000.0;

/// What one peer received on one track.
///
/// Audio fills the packet, sequence and timing fields; video also the frame and layer fields,
/// read from the synthetic payloads' VP8 descriptor and tail (see the [module docs](self)).
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
    /// Sequence numbers after the first packet not received so far: [`TrackStats::gaps`] minus
    /// the holes a late packet (a retransmission) filled. Holes more than 2048 sequence numbers
    /// behind the highest are no longer watched and stay counted.
    pub missing: u64,
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
    /// Video frames (packets with the marker bit, duplicates not counted) by spatial layer, as
    /// the payload's last byte says (0 = lowest; higher indices count as 2).
    pub frames_by_layer: [u64; 3],
    /// Video frames by VP8 temporal layer id, as the payload's second-to-last byte says.
    pub frames_by_tid: [u64; 4],
    /// The spatial layer of the last in-order video packet.
    pub last_layer: Option<u8>,
    /// When the received spatial layer changed, and to which; the first entry is the first
    /// layer received. The latest 1024 changes are kept.
    pub layer_changes: Vec<(Instant, u8)>,
    /// Layer changes whose first packet was not the start of a keyframe (a decoder could not
    /// continue there: the router must switch only at keyframes).
    pub switches_off_keyframe: u64,
    /// Video: the longest time between two consecutive in-order frames (marker packets) after
    /// the first keyframe — how long the picture froze at worst. Measured when the next frame
    /// arrives: a freeze still going on shows in [`TrackStats::fps_over`] instead.
    pub max_frame_gap: Duration,
    /// Video: consecutive frames whose VP8 PictureIDs did not differ by exactly one (mod
    /// 2^15) — a frame the router dropped without renumbering, or a layer switch it did not
    /// smooth over. Judged on packets with adjacent sequence numbers once both arrived (the
    /// next frame's first packet must carry the last one's PictureID + 1, packets within a
    /// frame the same), so network loss repaired by retransmission is no break.
    pub picture_id_breaks: u64,
    /// Video: TL0PICIDX went up by more than one (or back) between packets with adjacent
    /// sequence numbers.
    pub tl0_breaks: u64,
    /// In-order packets whose RTP timestamp went backwards from the previous in-order one
    /// (wrapping): a stream the receiver's jitter buffer would have to reset.
    pub timestamp_regressions: u64,
    /// Audio: packets that arrived as RED (RFC 2198) rather than plain Opus.
    pub red_packets: u64,
    /// Audio: packets whose Opus payload (a RED packet's primary block) carried the synthetic
    /// publisher's own sequence number and RTP time (`encoder::opus_payload`).
    pub audio_checked: u64,
    /// Audio: packets that were neither a synthetic Opus packet nor a RED packet whose primary
    /// block is one (a RED header sent where plain Opus was negotiated, a broken block).
    pub audio_unreadable: u64,
    /// Audio: how often the difference between the publisher's (sequence number, RTP time) and
    /// the received packet's changed. The router's rebasing keeps it constant; each resync (a
    /// source switch, an unmute, top-N forwarding again) changes it once. A packet carried with
    /// another packet's numbers (a redundant block taken for the primary) changes it twice.
    pub audio_offset_changes: u64,
    /// RED packets whose redundant block was not the publisher's previous packet (its own
    /// numbers one sequence number and one timestamp offset back).
    pub red_redundancy_wrong: u64,
    /// The latest RTCP sender report of the stream, as str0m attaches it to received packets:
    /// (the sender's packet count, the report's RTP time, the RTP timestamp of the packet
    /// that carried it). `None` before the first report.
    pub sender_report: Option<(u32, u32, u32)>,
    /// Audio: how long each packet took from its publisher's send to its arrival here, from
    /// the send time the synthetic publisher wrote into it, when the publisher and this
    /// receiver share a clock origin ([`PeerOptions::clock_origin`](super::PeerOptions::clock_origin)).
    pub audio_delay: DelayHistogram,
    /// Bookkeeping behind the counters above.
    continuity: Continuity,
}

/// What [`TrackStats`] reads from one received RTP packet.
#[derive(Debug, Clone, Copy)]
struct Received<'a> {
    /// Extended sequence number.
    seq: u64,
    ssrc: u32,
    marker: bool,
    /// RTP timestamp.
    timestamp: u32,
    payload: &'a [u8],
}

/// What [`TrackStats`] remembers between packets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Continuity {
    /// Sequence numbers skipped and not (yet) filled, within [`HOLE_WINDOW`].
    holes: BTreeSet<u64>,
    /// Arrival times of the latest frames, oldest first.
    frame_times: VecDeque<Instant>,
    last_frame_at: Option<Instant>,
    /// VP8 descriptor fields by extended sequence number, within [`HOLE_WINDOW`].
    descriptors: BTreeMap<u64, Vp8Mark>,
    /// RTP timestamp of the last in-order packet.
    last_timestamp: Option<u32>,
    /// Audio: (received − publisher's) 16-bit sequence number and RTP time, last seen.
    audio_offset: Option<(u16, u32)>,
}

/// What a packet's VP8 descriptor said, for continuity checks against its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vp8Mark {
    picture_id: Option<u16>,
    tl0_pic_idx: Option<u8>,
    /// The packet ends a frame.
    marker: bool,
    /// The packet starts a keyframe.
    keyframe: bool,
}

impl Vp8Mark {
    /// (PictureID break, TL0PICIDX break) between this packet and the `next` one.
    fn breaks(&self, next: &Vp8Mark) -> (bool, bool) {
        let picture_id = match (self.picture_id, next.picture_id) {
            (Some(a), Some(b)) if self.marker => b != (a + 1) & PICTURE_ID_MASK,
            // A picture cut short by a layer switch, followed by the new layer's keyframe: the
            // decoder drops the unfinished picture and starts again, as after a loss.
            (Some(a), Some(b)) if next.keyframe => b != (a + 1) & PICTURE_ID_MASK && b != a,
            (Some(a), Some(b)) => b != a,
            _ => false,
        };
        let tl0 = match (self.tl0_pic_idx, next.tl0_pic_idx) {
            (Some(a), Some(b)) => b.wrapping_sub(a) > 1,
            _ => false,
        };
        (picture_id, tl0)
    }
}

impl TrackStats {
    /// Frames per second received over the `window` before `now`: frames (marker packets)
    /// that arrived after `now - window`, divided by the window. Only the latest 512 frames
    /// are remembered, so a window longer than that many frames reads low.
    pub fn fps_over(&self, window: Duration, now: Instant) -> f64 {
        if window.is_zero() {
            return 0.0;
        }
        let frames = self
            .continuity
            .frame_times
            .iter()
            .rev()
            .take_while(|t| now.saturating_duration_since(**t) < window)
            .filter(|t| **t <= now)
            .count();
        frames as f64 / window.as_secs_f64()
    }

    pub(crate) fn record(&mut self, mid: &str, pkt: &RtpPacket, is_video: bool, now: Instant) {
        if let Some(info) = &pkt.last_sender_info {
            self.sender_report = Some((
                info.sender_packet_count,
                info.rtp_time.numer() as u32,
                pkt.header.timestamp,
            ));
        }
        let packet = Received {
            seq: *pkt.seq_no,
            ssrc: *pkt.header.ssrc,
            marker: pkt.header.marker,
            timestamp: pkt.header.timestamp,
            payload: &pkt.payload,
        };
        self.record_packet(mid, packet, is_video, now);
    }

    /// Checks an audio packet against the numbers its synthetic publisher wrote into it (call
    /// after [`record`](Self::record)); `red`: it arrived with the RED payload type. RED is read
    /// with str0m's decoder, independent of the router's parser. With the `clock_origin` its
    /// publisher stamped its send time against, the packet's delay (to `now`) is recorded too.
    pub(crate) fn record_audio(
        &mut self,
        pkt: &RtpPacket,
        red: bool,
        clock_origin: Option<Instant>,
        now: Instant,
    ) {
        let payload: &[u8] = &pkt.payload;
        let primary = if red {
            self.red_packets += 1;
            let Ok(blocks) = RedDecoder::decode(payload) else {
                self.audio_unreadable += 1;
                return;
            };
            let primary = blocks.iter().find(|b| b.is_primary).map(|b| b.payload);
            let redundant = blocks.iter().find(|b| !b.is_primary);
            if let (Some(block), Some(primary)) = (redundant, primary.and_then(opus_origin)) {
                let expected = (
                    primary.0.wrapping_sub(1),
                    primary.1.wrapping_sub(block.timestamp_offset),
                );
                if opus_origin(block.payload) != Some(expected) {
                    self.red_redundancy_wrong += 1;
                }
            }
            primary
        } else {
            Some(payload)
        };
        let Some((seq, rtp_time)) = primary.and_then(opus_origin) else {
            self.audio_unreadable += 1;
            return;
        };
        if let (Some(origin), Some(sent)) = (clock_origin, primary.and_then(opus_sent_at)) {
            let sent_at = origin + Duration::from_micros(sent);
            self.audio_delay
                .record(now.saturating_duration_since(sent_at));
        }
        self.audio_checked += 1;
        let offset = (
            (*pkt.seq_no as u16).wrapping_sub(seq),
            pkt.header.timestamp.wrapping_sub(rtp_time),
        );
        if self
            .continuity
            .audio_offset
            .replace(offset)
            .is_some_and(|last| last != offset)
        {
            self.audio_offset_changes += 1;
        }
    }

    fn record_packet(&mut self, mid: &str, pkt: Received<'_>, is_video: bool, now: Instant) {
        let Received { seq, ssrc, .. } = pkt;
        if self.packets > 0 && ssrc != self.ssrc {
            self.ssrc_changes += 1;
            self.last_seq = None;
            // A new stream: its numbering has nothing to do with the old one's.
            self.continuity.holes.clear();
            self.continuity.descriptors.clear();
            self.continuity.last_timestamp = None;
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
        let mut in_order = true;
        let mut duplicate = false;
        match self.last_seq {
            None => self.last_seq = Some(seq),
            Some(last) if seq > last => {
                if let Some(previous) = self.continuity.last_timestamp {
                    // RFC 3550 timestamps wrap: "backwards" is a negative 32-bit difference.
                    if (pkt.timestamp.wrapping_sub(previous) as i32) < 0 {
                        self.timestamp_regressions += 1;
                    }
                }
                let skipped = seq - last - 1;
                self.gaps += skipped;
                if !is_video || self.keyframes > 0 {
                    self.gaps_after_keyframe += skipped;
                }
                self.missing += skipped;
                let floor = seq.saturating_sub(HOLE_WINDOW);
                let holes = &mut self.continuity.holes;
                holes.extend((last + 1).max(floor)..seq);
                if holes.first().is_some_and(|h| *h < floor) {
                    *holes = holes.split_off(&floor);
                }
                self.last_seq = Some(seq);
            }
            Some(_) => {
                self.late_or_duplicate += 1;
                in_order = false;
                if self.continuity.holes.remove(&seq) {
                    self.missing -= 1;
                } else {
                    duplicate = true;
                }
            }
        }
        if in_order {
            self.continuity.last_timestamp = Some(pkt.timestamp);
        }
        if is_video && detect_vp8_keyframe(pkt.payload) {
            self.keyframes += 1;
            self.first_keyframe_at.get_or_insert(now);
        }
        if is_video && !duplicate {
            self.record_video(pkt, in_order, now);
        }
    }

    /// PictureID and TL0PICIDX continuity with the packets just before and after this one.
    fn record_descriptor(&mut self, pkt: Received<'_>) {
        let Ok(descriptor) = Vp8Descriptor::parse(pkt.payload) else {
            return;
        };
        let mark = Vp8Mark {
            picture_id: descriptor.picture_id(),
            tl0_pic_idx: descriptor.tl0_pic_idx(),
            marker: pkt.marker,
            keyframe: descriptor.starts_keyframe(pkt.payload),
        };
        let marks = &mut self.continuity.descriptors;
        let before = pkt.seq.checked_sub(1).and_then(|s| marks.get(&s));
        let after = marks.get(&(pkt.seq + 1));
        let pairs = [
            before.map(|b| b.breaks(&mark)),
            after.map(|a| mark.breaks(a)),
        ];
        for (picture_id, tl0) in pairs.into_iter().flatten() {
            self.picture_id_breaks += u64::from(picture_id);
            self.tl0_breaks += u64::from(tl0);
        }
        marks.insert(pkt.seq, mark);
        let floor = self.last_seq.unwrap_or(pkt.seq).saturating_sub(HOLE_WINDOW);
        if marks.first_key_value().is_some_and(|(s, _)| *s < floor) {
            *marks = marks.split_off(&floor);
        }
    }

    /// Frame and layer bookkeeping for a video packet seen for the first time.
    fn record_video(&mut self, pkt: Received<'_>, in_order: bool, now: Instant) {
        self.record_descriptor(pkt);
        let tail = layer_and_tid(pkt.payload);
        if let (true, Some((layer, _))) = (in_order, tail) {
            if self.last_layer != Some(layer) {
                if self.last_layer.is_some() && !detect_vp8_keyframe(pkt.payload) {
                    self.switches_off_keyframe += 1;
                }
                self.last_layer = Some(layer);
                if self.layer_changes.len() == LAYER_CHANGES_LEN {
                    self.layer_changes.remove(0);
                }
                self.layer_changes.push((now, layer));
            }
        }
        if !pkt.marker {
            return;
        }
        if let Some((layer, tid)) = tail {
            self.frames_by_layer[usize::from(layer.min(2))] += 1;
            self.frames_by_tid[usize::from(tid.min(3))] += 1;
        }
        let c = &mut self.continuity;
        if c.frame_times.len() == FRAME_TIMES_LEN {
            c.frame_times.pop_front();
        }
        c.frame_times.push_back(now);
        if !in_order {
            return;
        }
        if self.keyframes > 0 {
            if let Some(prev) = c.last_frame_at {
                self.max_frame_gap = self.max_frame_gap.max(now.saturating_duration_since(prev));
            }
            c.last_frame_at = Some(now);
        }
    }
}

/// Buckets of a [`DelayHistogram`] per doubling of the delay: each is ~4.4 % wide.
const DELAY_BUCKETS_PER_OCTAVE: f64 = 16.0;
/// Buckets of a [`DelayHistogram`]: the first holds delays under 1 ms, the last everything
/// from 2^(254/16) ms (~60 s) up.
const DELAY_BUCKETS: usize = 256;

/// A distribution of delays (how long packets took to arrive), in logarithmic buckets ~4.4 %
/// wide from 1 ms to ~60 s, with the exact count, mean and maximum. Quantiles are read as the
/// upper edge of the bucket the sample falls in (never more than the maximum), so they are at
/// most ~4.4 % high. Fixed size (1 KiB once the first delay is recorded) whatever the number
/// of packets; histograms of several tracks or participants merge exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelayHistogram {
    count: u64,
    sum_us: u64,
    max_us: u64,
    /// Empty until the first delay is recorded, then [`DELAY_BUCKETS`] counts.
    buckets: Vec<u32>,
}

impl DelayHistogram {
    fn bucket_of(us: u64) -> usize {
        if us < 1000 {
            return 0;
        }
        let octaves = (us as f64 / 1000.0).log2();
        (1 + (octaves * DELAY_BUCKETS_PER_OCTAVE) as usize).min(DELAY_BUCKETS - 1)
    }

    /// The upper edge of bucket `index`.
    fn upper_edge(index: usize) -> Duration {
        let ms = 2f64.powf(index as f64 / DELAY_BUCKETS_PER_OCTAVE);
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// Adds one delay.
    pub fn record(&mut self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        if self.buckets.is_empty() {
            self.buckets = vec![0; DELAY_BUCKETS];
        }
        let bucket = &mut self.buckets[Self::bucket_of(us)];
        *bucket = bucket.saturating_add(1);
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// Adds every delay `other` holds.
    pub fn merge(&mut self, other: &DelayHistogram) {
        if other.count == 0 {
            return;
        }
        if self.buckets.is_empty() {
            self.buckets = vec![0; DELAY_BUCKETS];
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Delays recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest delay recorded.
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.max_us))
    }

    /// The mean delay.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.sum_us / self.count))
    }

    /// The `q` quantile (0.5: the median, 0.99: the 99th percentile; nearest rank), as the
    /// upper edge of its bucket and at most the maximum; `None` before the first delay.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        let max = Duration::from_micros(self.max_us);
        for (index, n) in self.buckets.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                let edge = if index == DELAY_BUCKETS - 1 {
                    max
                } else {
                    Self::upper_edge(index)
                };
                return Some(edge.min(max));
            }
        }
        Some(max)
    }
}

/// Which source each receive slot carries, as the router's `slots` messages said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    slots: BTreeMap<String, SlotInfo>,
    /// Per slot: who it carried before the last change, until the first packet of the new
    /// source arrives (packets of the old one still in flight or in the router's pacer may
    /// trail the mapping message).
    previous: BTreeMap<String, (SessionId, TrackSource)>,
}

/// Who a packet that arrived on a slot came from, by the mapping and by its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// The mapping names this publisher, and the payload's source tag agrees (or carries
    /// none).
    Mapped(SessionId, TrackSource),
    /// The slot is unknown or empty by the mapping.
    Unmapped,
    /// The mapping names another publisher than the payload's source tag: the router forwarded
    /// a source before telling the client (or told it wrong).
    Misattributed,
}

impl SlotMap {
    /// Applies a `slots` message (entries replace those with the same mid).
    pub fn apply(&mut self, slots: &[SlotInfo]) {
        for slot in slots {
            let before = self.slots.insert(slot.mid.clone(), slot.clone());
            match before.and_then(|b| Some((b.session?, b.source?))) {
                Some(old) if Some(old.0) != slot.session => {
                    self.previous.insert(slot.mid.clone(), old);
                }
                _ => {}
            }
        }
    }

    /// Who the slot on `mid` carried before its last change, until a packet of its new source
    /// arrived: for a slot that was emptied, whom it carried last.
    pub fn previous(&self, mid: &str) -> Option<(SessionId, TrackSource)> {
        self.previous.get(mid).copied()
    }

    /// The slot on `mid`, if the router described it.
    pub fn get(&self, mid: &str) -> Option<&SlotInfo> {
        self.slots.get(mid)
    }

    /// Every slot described, by mid.
    pub fn iter(&self) -> impl Iterator<Item = &SlotInfo> {
        self.slots.values()
    }

    /// The slot that carries `publisher`'s `source` now, if any.
    pub fn slot_of(&self, publisher: SessionId, source: TrackSource) -> Option<&SlotInfo> {
        self.slots
            .values()
            .find(|s| s.session == Some(publisher) && s.source == Some(source))
    }

    /// Who a packet with `payload` that arrived on `mid` is from.
    ///
    /// A packet of the slot's previous source that arrives after the change but before any
    /// packet of the new one is the old stream's tail, not a misattribution: it is attributed
    /// to the previous source.
    pub fn attribute(&mut self, mid: &str, payload: &[u8]) -> Attribution {
        let Some(slot) = self.slots.get(mid) else {
            return Attribution::Unmapped;
        };
        let tag = source_tag(payload);
        let previous = self.previous.get(mid).copied();
        if let (Some((old, old_source)), Some(tag)) = (previous, tag) {
            if tag == session_tag(old) {
                return Attribution::Mapped(old, old_source);
            }
        }
        let (Some(session), Some(source)) = (slot.session, slot.source) else {
            return Attribution::Unmapped;
        };
        match tag {
            Some(tag) if tag != session_tag(session) => Attribution::Misattributed,
            _ => {
                self.previous.remove(mid);
                Attribution::Mapped(session, source)
            }
        }
    }
}

/// The 32-bit tag of a session the synthetic payloads carry (see
/// [`encoder::tag_source`](super::encoder::tag_source)).
pub fn session_tag(session: SessionId) -> u32 {
    session.0 as u32
}

/// SSRC and RTP timestamp of an SRTP packet (RFC 3711 §3.1: the RTP header is not
/// encrypted), or `None` for STUN, DTLS and RTCP.
pub fn clear_rtp_header(datagram: &[u8]) -> Option<(u32, u32)> {
    let header = datagram.get(..12)?;
    // RFC 7983 §7: a first byte of 128–191 is RTP or RTCP; RFC 5761 §4: a second byte of
    // 192–223 (payload type 64–95 with the marker bit) is RTCP.
    if !(128..=191).contains(&header[0]) || (192..=223).contains(&header[1]) {
        return None;
    }
    let rtp_time = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let ssrc = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    Some((ssrc, rtp_time))
}

/// RFC 3550 §6.4.1 interarrival jitter of one received RTP stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Jitter {
    /// SSRC, arrival time and RTP timestamp of the previous packet.
    last: Option<(u32, Instant, u32)>,
    /// Packets of the current SSRC seen.
    packets: u64,
    /// The estimate J, seconds.
    estimate: f64,
    /// The largest estimate so far, seconds.
    max: f64,
}

impl Jitter {
    /// One packet of `ssrc` with RTP timestamp `rtp_time` arrived at `arrival`. A new SSRC
    /// starts a new estimate.
    pub fn on_packet(&mut self, ssrc: u32, arrival: Instant, rtp_time: u32, clock_rate: f64) {
        match self.last {
            Some((last_ssrc, prev_arrival, prev_rtp_time)) if last_ssrc == ssrc => {
                // D(i,j) = (Rj - Ri) - (Sj - Si), in seconds; the RTP difference is signed so a
                // reordered packet or a timestamp wrap counts right.
                let sent = f64::from(rtp_time.wrapping_sub(prev_rtp_time) as i32) / clock_rate;
                let received = arrival
                    .saturating_duration_since(prev_arrival)
                    .as_secs_f64();
                let d = received - sent;
                self.estimate += (d.abs() - self.estimate) / 16.0;
                self.max = self.max.max(self.estimate);
                self.packets += 1;
            }
            _ => {
                *self = Jitter {
                    packets: 1,
                    ..Jitter::default()
                }
            }
        }
        self.last = Some((ssrc, arrival, rtp_time));
    }

    /// (the estimate, its maximum) in ms, once there are two packets of the stream.
    pub fn millis(&self) -> Option<(f64, f64)> {
        (self.packets >= 2).then_some((self.estimate * 1000.0, self.max * 1000.0))
    }
}

/// Freezes of one received video stream: gaps over [`FREEZE`] between packets.
#[derive(Debug, Default, Clone, Copy)]
pub struct Freezes {
    last: Option<Instant>,
    /// Gaps over [`FREEZE`] so far.
    pub count: u64,
    /// Their total length.
    pub frozen: Duration,
}

impl Freezes {
    /// The stream's last packet arrived at `last_packet_at` (from [`TrackStats`]); a gap
    /// since the one before counts if it is over [`FREEZE`].
    pub fn observe(&mut self, last_packet_at: Option<Instant>) {
        if let (Some(prev), Some(last)) = (self.last, last_packet_at) {
            self.count_gap(last.saturating_duration_since(prev));
        }
        self.last = last_packet_at;
    }

    /// The end of the measurement at `now`: a freeze still going on counts.
    pub fn finish(&mut self, now: Instant) {
        if let Some(last) = self.last {
            self.count_gap(now.saturating_duration_since(last));
        }
    }

    fn count_gap(&mut self, gap: Duration) {
        if gap > FREEZE {
            self.count += 1;
            self.frozen += gap;
        }
    }
}

/// Payload bytes of one received video stream by the simulcast layer it was on when they
/// arrived.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayerBytes {
    /// The stream's [`TrackStats::bytes`] at the last look.
    seen: u64,
    /// Bytes by spatial layer index (0 = lowest; higher indices count as 2).
    pub by_layer: [u64; 3],
}

impl LayerBytes {
    /// Adds the payload bytes `stats` gained since the last look to the layer it is on.
    pub fn count(&mut self, stats: &TrackStats) {
        let layer = usize::from(stats.last_layer.unwrap_or(0).min(2));
        self.by_layer[layer] += stats.bytes.saturating_sub(self.seen);
        self.seen = stats.bytes;
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::super::encoder::{Vp8Encoder, CAMERA_LAYERS};
    use super::*;

    /// Synthetic frames of one layer, as (extended seq, marker, payload) packets.
    fn packets(layer: usize, frames: usize, first_seq: u64) -> Vec<(u64, bool, Vec<u8>)> {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut legacy = fastrand::Rng::with_seed(6);
        let mut enc = Vp8Encoder::new(Some(CAMERA_LAYERS[layer]), 3, &mut rng);
        let frame = Duration::from_nanos(33_333_333);
        let mut seq = first_seq;
        let mut out = Vec::new();
        for n in 0..frames {
            for (payload, marker) in enc
                .encode(n == 0, frame, 90.0, &mut rng, &mut legacy)
                .packets
            {
                out.push((seq, marker, payload));
                seq += 1;
            }
        }
        out
    }

    fn feed(stats: &mut TrackStats, packets: &[(u64, bool, Vec<u8>)], at: Instant) {
        for (seq, marker, payload) in packets {
            let pkt = Received {
                seq: *seq,
                ssrc: 1,
                marker: *marker,
                timestamp: 0,
                payload,
            };
            stats.record_packet("0", pkt, true, at);
        }
    }

    #[test]
    fn rtp_headers_are_read_and_everything_else_skipped() {
        let mut rtp = vec![0x80, 111, 0, 7, 0, 0, 0x03, 0xC0, 0xDE, 0xAD, 0xBE, 0xEF];
        rtp.extend_from_slice(&[0; 20]);
        assert_eq!(clear_rtp_header(&rtp), Some((0xDEAD_BEEF, 960)));
        // The marker bit is not RTCP.
        rtp[1] = 0x80 | 96;
        assert!(clear_rtp_header(&rtp).is_some());
        let mut rtcp_rr = rtp.clone();
        rtcp_rr[1] = 201;
        assert_eq!(clear_rtp_header(&rtcp_rr), None);
        let stun = [0u8; 20];
        assert_eq!(clear_rtp_header(&stun), None);
        let dtls = [22u8; 20];
        assert_eq!(clear_rtp_header(&dtls), None);
        assert_eq!(clear_rtp_header(&rtp[..11]), None);
    }

    #[test]
    fn delay_quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = DelayHistogram::default();
        assert_eq!((h.quantile(0.5), h.max(), h.mean()), (None, None, None));
        // 1..=1000 ms, one each: the median is 500 ms, the 99th percentile 990 ms.
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), Some(Duration::from_millis(1000)));
        assert_eq!(h.mean(), Some(Duration::from_micros(500_500)));
        for (q, truth) in [(0.5, 500.0), (0.99, 990.0), (0.01, 10.0)] {
            let got = h.quantile(q).expect("recorded").as_secs_f64() * 1000.0;
            assert!(
                got >= truth && got <= truth * 1.045,
                "q{q}: {got} ms for {truth} ms"
            );
        }
        assert_eq!(
            h.quantile(1.0),
            Some(Duration::from_millis(1000)),
            "capped at the max"
        );
        // Under a millisecond, and far beyond the last bucket.
        let mut edges = DelayHistogram::default();
        edges.record(Duration::from_micros(10));
        assert_eq!(edges.quantile(0.5), Some(Duration::from_micros(10)));
        edges.record(Duration::from_secs(3600));
        assert_eq!(edges.quantile(1.0), Some(Duration::from_secs(3600)));
        // Merging two halves gives the whole.
        let (mut low, mut high) = (DelayHistogram::default(), DelayHistogram::default());
        for ms in 1..=1000u64 {
            let half = if ms <= 500 { &mut low } else { &mut high };
            half.record(Duration::from_millis(ms));
        }
        low.merge(&high);
        low.merge(&DelayHistogram::default());
        assert_eq!(low, h);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        let start = Instant::now();
        // Opus: 960 ticks per 20 ms, starting just before the 32-bit timestamp wraps.
        let packet = |i: u32, late_ms: u64| {
            let at = start + Duration::from_millis(20 * u64::from(i) + late_ms);
            (at, (u32::MAX - 5000).wrapping_add(i * 960))
        };
        let mut jitter = Jitter::default();
        assert_eq!(jitter.millis(), None);
        for i in 0..50 {
            let (at, rtp_time) = packet(i, 0);
            jitter.on_packet(1, at, rtp_time, 48_000.0);
        }
        assert_eq!(jitter.millis(), Some((0.0, 0.0)), "on time: no jitter");
        // 16 ms late: J += (16 - J) / 16 → 1 ms. The next is on time, 16 ms early relative to
        // it: J += (16 - 1) / 16.
        let (at, rtp_time) = packet(50, 16);
        jitter.on_packet(1, at, rtp_time, 48_000.0);
        let (j, max) = jitter.millis().expect("an estimate");
        assert!(
            (j - 1.0).abs() < 1e-9 && (max - 1.0).abs() < 1e-9,
            "{j} {max}"
        );
        let (at, rtp_time) = packet(51, 0);
        jitter.on_packet(1, at, rtp_time, 48_000.0);
        let (j, max) = jitter.millis().expect("an estimate");
        assert!(
            (j - (1.0 + 15.0 / 16.0)).abs() < 1e-9 && j == max,
            "{j} {max}"
        );
        // Another SSRC (the track was published again) starts over.
        jitter.on_packet(2, start + Duration::from_secs(5), 7, 48_000.0);
        assert_eq!(jitter.millis(), None);
    }

    #[test]
    fn freezes_count_gaps_over_half_a_second_and_one_still_going_on() {
        let start = Instant::now();
        let mut freezes = Freezes::default();
        freezes.observe(None);
        freezes.observe(Some(start));
        freezes.observe(Some(start + Duration::from_millis(400)));
        assert_eq!(freezes.count, 0, "400 ms is no freeze");
        freezes.observe(Some(start + Duration::from_millis(1100)));
        assert_eq!(
            (freezes.count, freezes.frozen),
            (1, Duration::from_millis(700))
        );
        // The same packet again (no new arrival) adds nothing.
        freezes.observe(Some(start + Duration::from_millis(1100)));
        assert_eq!(freezes.count, 1);
        freezes.finish(start + Duration::from_millis(3100));
        assert_eq!(
            (freezes.count, freezes.frozen),
            (2, Duration::from_millis(2700))
        );
    }

    #[test]
    fn missing_counts_holes_a_retransmission_did_not_fill() {
        let start = Instant::now();
        let all = packets(0, 30, 100);
        let (lost, kept): (Vec<_>, Vec<_>) = all
            .iter()
            .cloned()
            .enumerate()
            .partition(|(n, _)| *n == 5 || *n == 6 || *n == 20);
        let kept: Vec<_> = kept.into_iter().map(|(_, p)| p).collect();
        let lost: Vec<_> = lost.into_iter().map(|(_, p)| p).collect();
        let mut stats = TrackStats::default();
        feed(&mut stats, &kept, start);
        assert_eq!((stats.gaps, stats.missing), (3, 3));
        // A retransmission fills one hole; a duplicate of a received packet changes nothing.
        feed(&mut stats, &lost[..1], start);
        feed(&mut stats, &kept[..1], start);
        assert_eq!((stats.gaps, stats.missing), (3, 2));
        assert_eq!(stats.late_or_duplicate, 2);
    }

    #[test]
    fn frames_layers_and_breaks_are_measured() {
        let start = Instant::now();
        let frame = Duration::from_nanos(33_333_333);
        let mut stats = TrackStats::default();
        // Ten frames of q, one frame each 33 ms.
        let q = packets(0, 10, 1);
        let mut at = start;
        for p in &q {
            feed(&mut stats, std::slice::from_ref(p), at);
            if p.1 {
                at += frame;
            }
        }
        assert_eq!(stats.frames_by_layer, [10, 0, 0]);
        assert_eq!(stats.frames_by_tid, [3, 2, 5, 0]);
        assert_eq!((stats.picture_id_breaks, stats.tl0_breaks), (0, 0));
        assert_eq!(stats.max_frame_gap, frame);
        // A 300 ms freeze, then a switch to f (its own picture ids: a break).
        at += Duration::from_millis(300);
        let last_seq = q.last().map(|p| p.0).unwrap_or(0);
        let f = packets(2, 4, last_seq + 1);
        feed(&mut stats, &f, at);
        assert_eq!(stats.frames_by_layer, [10, 0, 4]);
        assert_eq!(stats.last_layer, Some(2));
        let changes: Vec<u8> = stats.layer_changes.iter().map(|(_, l)| *l).collect();
        assert_eq!(changes, [0, 2]);
        assert_eq!(stats.layer_changes[1].0, at);
        assert_eq!(stats.max_frame_gap, frame + Duration::from_millis(300));
        assert_eq!(stats.picture_id_breaks, 1);
        assert_eq!(stats.missing, 0);
        // Frames within the last second: the 4 f frames at `at`, and the q frames after
        // `at - 1 s` (all of them: they span 300 ms before the freeze).
        let fps = stats.fps_over(Duration::from_secs(1), at);
        assert!((fps - 14.0).abs() < 1e-9, "{fps}");
        let fps = stats.fps_over(Duration::from_millis(100), at);
        assert!((fps - 40.0).abs() < 1e-9, "{fps}");
    }

    /// Frames 0..9 of layer h (TIDs 0,2,1,2,0,2,1,2,0), packets grouped by frame.
    fn frames_of_h() -> Vec<Vec<(u64, bool, Vec<u8>)>> {
        let mut frames = Vec::new();
        let mut frame = Vec::new();
        for p in packets(1, 9, 1) {
            let end = p.1;
            frame.push(p);
            if end {
                frames.push(std::mem::take(&mut frame));
            }
        }
        frames
    }

    #[test]
    fn frames_dropped_without_renumbering_are_breaks() {
        // A router that drops frames 4..=7 and closes the sequence gap: PictureID jumps by
        // five, and TL0PICIDX by two (a whole TL0 picture is skipped).
        let mut stats = TrackStats::default();
        let mut seq = 1;
        for (n, frame) in frames_of_h().into_iter().enumerate() {
            if (4..8).contains(&n) {
                continue;
            }
            for (_, marker, payload) in frame {
                feed(&mut stats, &[(seq, marker, payload)], Instant::now());
                seq += 1;
            }
        }
        assert_eq!((stats.picture_id_breaks, stats.tl0_breaks), (1, 1));
        assert_eq!(stats.missing, 0);
    }

    #[test]
    fn loss_repaired_out_of_order_is_no_break() {
        // Frames 4..=7 are lost on the wire and arrive later, retransmitted.
        let start = Instant::now();
        let frames = frames_of_h();
        let mut stats = TrackStats::default();
        for frame in frames[..4].iter().chain(&frames[8..]) {
            feed(&mut stats, frame, start);
        }
        assert!(stats.missing > 0);
        for frame in &frames[4..8] {
            feed(&mut stats, frame, start + Duration::from_millis(50));
        }
        assert_eq!(stats.missing, 0);
        assert_eq!((stats.picture_id_breaks, stats.tl0_breaks), (0, 0));
        assert_eq!(stats.frames_by_layer, [0, 9, 0]);
    }
}
