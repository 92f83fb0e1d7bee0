//! Synthetic VP8 for simulated publishers: simulcast layer targets, temporal-layer patterns and
//! RFC 7741 packetization, so the router sees what a browser would send without a real encoder.
//!
//! Every packet of a frame carries the VP8 payload descriptor (RFC 7741 §4.2) with X=1 and a
//! 15-bit PictureID (I=1, M=1); with three temporal layers also TL0PICIDX (L=1) and TID/Y
//! (T=1), K=0. The first packet of a frame has S=1, PID=0 and a VP8 payload header (§4.3)
//! whose P bit is 0 on keyframes, followed on keyframes by the start code and the layer's size,
//! so `str0m::format::detect_vp8_keyframe` and `str0m::rtp::Vp8Descriptor::starts_keyframe`
//! both recognise it. The rest of a packet is filler, except its last two bytes: the temporal
//! layer id (second to last) and the spatial layer index, 0 = lowest (last), which a receiving
//! [`SimPeer`](super::SimPeer) uses to tell which layer it got.
//!
//! Frame sizes: a simulcast layer aims at [`LayerSpec::bitrate_bps`] averaged over a keyframe
//! interval, with keyframes about four delta frames, TID0 frames larger and TID2 frames smaller
//! than average, and ±10 % seeded jitter. A single-layer stream keeps the harness's original
//! sizes (a 15-packet keyframe, 1–3 packets of 600–1100 bytes otherwise).

use std::time::{Duration, Instant};

use str0m::media::Rid;

use crate::ids::TrackSource;

/// Largest RTP payload a synthetic frame is split into.
pub const MAX_PACKET_PAYLOAD: usize = 1100;
/// A keyframe is about this many delta frames.
const KEYFRAME_FACTOR: f64 = 4.0;
/// Relative size of a frame by temporal layer id (0, 1, 2); their mean over the 0,2,1,2
/// pattern is 1.
const TID_WEIGHT: [f64; 3] = [1.4, 1.0, 0.8];
/// Temporal layer id of the n-th frame after a TID0 frame (RFC 7741 §4.1, L1T3 pattern).
const TID_PATTERN: [u8; 4] = [0, 2, 1, 2];
/// Packets in a single-layer keyframe (the harness's original size).
const SINGLE_KEYFRAME_PACKETS: usize = 15;
/// PictureID is 15 bits (RFC 7741 §4.2, M=1).
const PICTURE_ID_MASK: u16 = 0x7FFF;

/// One simulcast layer a simulated publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// The RTP stream id (`a=rid`) of the layer.
    pub rid: &'static str,
    /// Spatial layer index, 0 = lowest (also the last byte of every payload).
    pub index: u8,
    /// Average RTP payload bit rate the layer aims at, keyframes included.
    pub bitrate_bps: u32,
    /// Frame width written into keyframes.
    pub width: u16,
    /// Frame height written into keyframes.
    pub height: u16,
}

/// A camera's simulcast layers, low to high (as a browser lists them).
pub const CAMERA_LAYERS: [LayerSpec; 3] = [
    LayerSpec {
        rid: "q",
        index: 0,
        bitrate_bps: 150_000,
        width: 320,
        height: 180,
    },
    LayerSpec {
        rid: "h",
        index: 1,
        bitrate_bps: 500_000,
        width: 640,
        height: 360,
    },
    LayerSpec {
        rid: "f",
        index: 2,
        bitrate_bps: 1_500_000,
        width: 1280,
        height: 720,
    },
];

/// A screen share's simulcast layers, low to high.
pub const SCREEN_LAYERS: [LayerSpec; 2] = [
    LayerSpec {
        rid: "h",
        index: 0,
        bitrate_bps: 300_000,
        width: 960,
        height: 540,
    },
    LayerSpec {
        rid: "f",
        index: 1,
        bitrate_bps: 1_200_000,
        width: 1920,
        height: 1080,
    },
];

/// The simulcast layers a publisher of `source` sends with
/// [`PeerOptions::with_simulcast`](super::PeerOptions::with_simulcast), low to high (empty for
/// the microphone).
pub fn simulcast_layers(source: TrackSource) -> &'static [LayerSpec] {
    match source {
        TrackSource::Microphone => &[],
        TrackSource::Camera => &CAMERA_LAYERS,
        TrackSource::Screen => &SCREEN_LAYERS,
    }
}

/// Frame interval of a simulcast publisher of `source` (camera 30 fps, screen 15 fps).
pub(crate) fn simulcast_frame_interval(source: TrackSource) -> Duration {
    match source {
        TrackSource::Screen => Duration::from_nanos(66_666_667),
        _ => Duration::from_nanos(33_333_333),
    }
}

/// One synthetic frame, packetized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub keyframe: bool,
    pub tid: u8,
    /// RTP payloads with their marker bit (set on the last packet).
    pub packets: Vec<(Vec<u8>, bool)>,
}

/// The VP8 encoder state of one stream (a simulcast layer, or the only one).
#[derive(Debug, Clone)]
pub(crate) struct Vp8Encoder {
    /// `None` for a single-layer stream (original sizes, layer index 0).
    spec: Option<LayerSpec>,
    temporal_layers: u8,
    picture_id: u16,
    tl0_pic_idx: u8,
    /// Position in [`TID_PATTERN`].
    pattern_pos: usize,
}

impl Vp8Encoder {
    /// An encoder for one stream. `temporal_layers` is 1 or 3 (anything above 1 means 3).
    pub fn new(spec: Option<LayerSpec>, temporal_layers: u8, rng: &mut fastrand::Rng) -> Self {
        Vp8Encoder {
            spec,
            temporal_layers: if temporal_layers <= 1 { 1 } else { 3 },
            picture_id: rng.u16(..) & PICTURE_ID_MASK,
            tl0_pic_idx: rng.u8(..),
            pattern_pos: 0,
        }
    }

    /// The rid this stream is sent with (`None` without simulcast).
    pub fn rid(&self) -> Option<Rid> {
        self.spec.map(|s| Rid::from(s.rid))
    }

    /// Encodes the next frame. `frames_per_keyframe` (frames in a keyframe interval) spreads the
    /// keyframes' extra bytes so a layer meets its bit rate on average; `frame_interval` is the
    /// time between frames. Single-layer streams draw their sizes from `legacy_rng` exactly as
    /// the harness always did; simulcast layers draw from `rng`.
    pub fn encode(
        &mut self,
        keyframe: bool,
        frame_interval: Duration,
        frames_per_keyframe: f64,
        rng: &mut fastrand::Rng,
        legacy_rng: &mut fastrand::Rng,
    ) -> Frame {
        if keyframe {
            // Keyframes are TID0 and restart the temporal pattern.
            self.pattern_pos = 0;
        }
        let tid = if self.temporal_layers == 1 {
            0
        } else {
            TID_PATTERN[self.pattern_pos]
        };
        if tid == 0 {
            self.tl0_pic_idx = self.tl0_pic_idx.wrapping_add(1);
        }
        let lens = match self.spec {
            None => single_layer_lens(keyframe, legacy_rng),
            Some(spec) => {
                let bytes = frame_bytes(
                    spec.bitrate_bps,
                    frame_interval,
                    frames_per_keyframe,
                    keyframe,
                    tid,
                    rng,
                );
                split(bytes)
            }
        };
        let header = Header {
            picture_id: self.picture_id,
            temporal: (self.temporal_layers == 3).then_some((self.tl0_pic_idx, tid)),
            keyframe,
            layer: self.spec.map(|s| s.index).unwrap_or(0),
            size: self.spec.map(|s| (s.width, s.height)).unwrap_or((640, 360)),
        };
        let count = lens.len();
        let packets = lens
            .into_iter()
            .enumerate()
            .map(|(n, len)| (header.packet(len, n == 0), n + 1 == count))
            .collect();
        self.picture_id = (self.picture_id + 1) & PICTURE_ID_MASK;
        self.pattern_pos = (self.pattern_pos + 1) % TID_PATTERN.len();
        Frame {
            keyframe,
            tid,
            packets,
        }
    }
}

/// The harness's original single-layer sizes (and order of random draws).
fn single_layer_lens(keyframe: bool, rng: &mut fastrand::Rng) -> Vec<usize> {
    let count = if keyframe {
        SINGLE_KEYFRAME_PACKETS
    } else {
        rng.usize(1..=3)
    };
    (0..count)
        .map(|_| {
            if keyframe {
                1100
            } else {
                rng.usize(600..=1100)
            }
        })
        .collect()
}

/// Bytes of one frame of a layer sending `bitrate_bps`: the mean frame size corrected for the
/// keyframes' extra size, weighted by temporal layer, with ±10 % jitter.
fn frame_bytes(
    bitrate_bps: u32,
    frame_interval: Duration,
    frames_per_keyframe: f64,
    keyframe: bool,
    tid: u8,
    rng: &mut fastrand::Rng,
) -> usize {
    let mean = f64::from(bitrate_bps) / 8.0 * frame_interval.as_secs_f64();
    let frames = frames_per_keyframe.max(1.0);
    let delta = mean * frames / (frames - 1.0 + KEYFRAME_FACTOR);
    let size = if keyframe {
        delta * KEYFRAME_FACTOR
    } else {
        delta * TID_WEIGHT[usize::from(tid.min(2))]
    };
    let jitter = 0.9 + 0.2 * rng.f64();
    (size * jitter).round().max(64.0) as usize
}

/// Splits `bytes` into the fewest packets of at most [`MAX_PACKET_PAYLOAD`], sizes within one
/// byte of each other.
fn split(bytes: usize) -> Vec<usize> {
    let count = bytes.div_ceil(MAX_PACKET_PAYLOAD).max(1);
    let base = bytes / count;
    let extra = bytes % count;
    (0..count).map(|n| base + usize::from(n < extra)).collect()
}

/// What goes into every packet of one frame.
#[derive(Debug, Clone, Copy)]
struct Header {
    picture_id: u16,
    /// TL0PICIDX and TID, with three temporal layers.
    temporal: Option<(u8, u8)>,
    keyframe: bool,
    layer: u8,
    size: (u16, u16),
}

impl Header {
    /// One packet of `len` bytes (at least 32).
    fn packet(&self, len: usize, first: bool) -> Vec<u8> {
        let len = len.max(32);
        let mut p = vec![0xA5u8; len];
        // RFC 7741 §4.2: X=1, N=0, S on the first packet of the frame, PID=0.
        p[0] = 0x80 | if first { 0x10 } else { 0x00 };
        // I=1, and L=1, T=1 with temporal layers; K=0.
        p[1] = 0x80 | if self.temporal.is_some() { 0x60 } else { 0x00 };
        // M=1: 15-bit PictureID.
        p[2] = 0x80 | (self.picture_id >> 8) as u8;
        p[3] = self.picture_id as u8;
        let mut at = 4;
        let mut tid = 0;
        if let Some((tl0_pic_idx, t)) = self.temporal {
            tid = t;
            p[4] = tl0_pic_idx;
            // TID (2 bits), Y (layer sync: TID0 and TID1 frames depend only on TID0), KEYIDX 0.
            let sync = u8::from(t <= 1);
            p[5] = (t << 6) | (sync << 5);
            at = 6;
        }
        if first {
            // RFC 7741 §4.3: VP8 payload header, Size0 | show_frame=1 | version 0 | P.
            p[at] = 0x10 | u8::from(!self.keyframe);
            p[at + 1] = 0x00;
            p[at + 2] = 0x00;
            if self.keyframe {
                // RFC 6386 §9.1: keyframe start code, then 14-bit width and height.
                p[at + 3..at + 6].copy_from_slice(&[0x9D, 0x01, 0x2A]);
                p[at + 6..at + 8].copy_from_slice(&self.size.0.to_le_bytes());
                p[at + 8..at + 10].copy_from_slice(&self.size.1.to_le_bytes());
            }
        }
        p[len - 2] = tid;
        p[len - 1] = self.layer;
        p
    }
}

/// What a receiver reads from a synthetic VP8 payload's tail: (spatial layer, TID).
pub(crate) fn layer_and_tid(payload: &[u8]) -> Option<(u8, u8)> {
    match payload {
        [.., tid, layer] if payload.len() >= 2 => Some((*layer, *tid)),
        _ => None,
    }
}

/// Marks a source tag in a synthetic payload (before the tag's four bytes).
const SOURCE_TAG_MARK: u8 = 0xC5;
/// Bytes at a payload's end that the source tag takes: mark, 4-byte tag, and the two tail
/// bytes (TID, layer) after it, which it leaves alone.
const SOURCE_TAG_END: usize = 7;

/// Writes the publisher's 32-bit `tag` into a synthetic payload (Opus or VP8, at least 32
/// bytes), before the two tail bytes: a receiver can then tell whose packet arrived on a slot,
/// whatever the router's mapping said.
pub fn tag_source(payload: &mut [u8], tag: u32) {
    let len = payload.len();
    if len < 32 {
        return;
    }
    payload[len - SOURCE_TAG_END] = SOURCE_TAG_MARK;
    payload[len - 6..len - 2].copy_from_slice(&tag.to_le_bytes());
}

/// The source tag of a synthetic payload, if it carries one.
pub fn source_tag(payload: &[u8]) -> Option<u32> {
    let len = payload.len();
    if len < 32 || payload[len - SOURCE_TAG_END] != SOURCE_TAG_MARK {
        return None;
    }
    let tag: [u8; 4] = payload[len - 6..len - 2].try_into().ok()?;
    Some(u32::from_le_bytes(tag))
}

/// TOC byte of the synthetic Opus packets: config 15 (hybrid, fullband, 20 ms), mono, one
/// frame (RFC 6716 §3.1).
pub const OPUS_TOC: u8 = 0x78;
/// The first byte after the TOC of a SILK or hybrid frame: the VAD flag, and the LBRR (in-band
/// FEC) flag after it (RFC 6716 §4.2.3).
const OPUS_VAD: u8 = 0x80;
const OPUS_LBRR: u8 = 0x40;
/// Filler of synthetic payloads.
const FILLER: u8 = 0x5A;

/// A synthetic Opus packet of `len` bytes (at least 32): the TOC, the VAD flag (and LBRR flag
/// with `fec`), then the publisher's own 16-bit sequence number and RTP time, so a receiver
/// can check that what reached it is this packet with its numbers merely rebased
/// ([`opus_origin`]); the rest is filler (and the source tag).
pub(crate) fn opus_payload(len: usize, seq: u64, rtp_time: u32, fec: bool) -> Vec<u8> {
    let mut payload = vec![FILLER; len.max(32)];
    payload[0] = OPUS_TOC;
    payload[1] = if fec { OPUS_VAD | OPUS_LBRR } else { OPUS_VAD };
    payload[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
    payload[4..8].copy_from_slice(&rtp_time.to_be_bytes());
    payload
}

/// The publisher's (16-bit sequence number, RTP time) written into a synthetic Opus payload by
/// [`opus_payload`]; `None` for anything else (a RED header where Opus was expected).
pub(crate) fn opus_origin(payload: &[u8]) -> Option<(u16, u32)> {
    if payload.len() < 32 || payload[0] != OPUS_TOC {
        return None;
    }
    let seq = u16::from_be_bytes([payload[2], payload[3]]);
    let rtp_time = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    Some((seq, rtp_time))
}

/// Marks a send time in a synthetic Opus payload (byte 8, before the time's 7 bytes).
const SENT_AT_MARK: u8 = 0xD3;
/// Where a synthetic Opus payload keeps its send time: the mark, then 56 bits of µs.
const SENT_AT: std::ops::Range<usize> = 8..16;

/// Writes the publisher's send time (`micros` since the clock origin its receivers share,
/// [`PeerOptions::clock_origin`](super::PeerOptions::clock_origin)) into a synthetic Opus
/// payload made by [`opus_payload`], after its sequence number and RTP time, so that a receiver
/// in the same process can measure how long the packet took to reach it.
pub(crate) fn stamp_sent_at(payload: &mut [u8], micros: u64) {
    if payload.len() < 32 || payload[0] != OPUS_TOC {
        return;
    }
    let bytes = micros.min((1 << 56) - 1).to_be_bytes();
    payload[SENT_AT.start] = SENT_AT_MARK;
    payload[SENT_AT.start + 1..SENT_AT.end].copy_from_slice(&bytes[1..]);
}

/// The send time [`stamp_sent_at`] wrote into a synthetic Opus payload (µs since the clock
/// origin), if it carries one.
pub(crate) fn opus_sent_at(payload: &[u8]) -> Option<u64> {
    if payload.len() < 32 || payload[0] != OPUS_TOC || payload[SENT_AT.start] != SENT_AT_MARK {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[1..].copy_from_slice(&payload[SENT_AT.start + 1..SENT_AT.end]);
    Some(u64::from_be_bytes(bytes))
}

/// Frames in one keyframe interval at one frame per `frame_interval` (over which a layer's
/// keyframe bytes are spread).
pub(crate) fn frames_per_interval(keyframe_interval: Duration, frame_interval: Duration) -> f64 {
    if frame_interval.is_zero() {
        return 1.0;
    }
    (keyframe_interval.as_secs_f64() / frame_interval.as_secs_f64()).max(1.0)
}

/// Whether a periodic keyframe is due for a stream whose last keyframe was at `last`.
pub(crate) fn keyframe_due(last: Option<Instant>, interval: Duration, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= interval)
}

#[cfg(test)]
mod tests {
    use str0m::format::detect_vp8_keyframe;
    use str0m::rtp::Vp8Descriptor;

    use super::*;

    const FRAME: Duration = Duration::from_nanos(33_333_333);

    fn encoder(spec: Option<LayerSpec>, temporal_layers: u8) -> (Vp8Encoder, fastrand::Rng) {
        let mut rng = fastrand::Rng::with_seed(7);
        (Vp8Encoder::new(spec, temporal_layers, &mut rng), rng)
    }

    fn frames(enc: &mut Vp8Encoder, rng: &mut fastrand::Rng, n: usize) -> Vec<Frame> {
        let mut legacy = fastrand::Rng::with_seed(8);
        (0..n)
            .map(|i| enc.encode(i == 0, FRAME, 90.0, rng, &mut legacy))
            .collect()
    }

    #[test]
    fn keyframes_are_recognised_by_both_str0m_parsers() {
        for temporal_layers in [1, 3] {
            for spec in [None, Some(CAMERA_LAYERS[0]), Some(CAMERA_LAYERS[2])] {
                let (mut enc, mut rng) = encoder(spec, temporal_layers);
                let all = frames(&mut enc, &mut rng, 8);
                for (i, frame) in all.iter().enumerate() {
                    assert_eq!(frame.keyframe, i == 0);
                    for (n, (payload, _)) in frame.packets.iter().enumerate() {
                        let starts = frame.keyframe && n == 0;
                        assert_eq!(detect_vp8_keyframe(payload), starts, "frame {i} packet {n}");
                        let descriptor = Vp8Descriptor::parse(payload);
                        let Ok(descriptor) = descriptor else {
                            panic!("frame {i} packet {n}: {descriptor:?}");
                        };
                        assert_eq!(descriptor.starts_keyframe(payload), starts);
                    }
                }
            }
        }
    }

    #[test]
    fn descriptor_carries_picture_id_tl0picidx_and_tid_pattern() {
        let (mut enc, mut rng) = encoder(Some(CAMERA_LAYERS[1]), 3);
        let all = frames(&mut enc, &mut rng, 9);
        let tids: Vec<u8> = all.iter().map(|f| f.tid).collect();
        assert_eq!(tids, [0, 2, 1, 2, 0, 2, 1, 2, 0]);
        let mut last: Option<(u16, u8)> = None;
        for frame in &all {
            let (first, _) = &frame.packets[0];
            let Ok(d) = Vp8Descriptor::parse(first) else {
                panic!("no descriptor");
            };
            let (Some(pid), Some(tl0)) = (d.picture_id(), d.tl0_pic_idx()) else {
                panic!("picture id and tl0picidx missing");
            };
            assert_eq!(first[0] & 0x80, 0x80, "X");
            assert_eq!(first[1] & 0xF0, 0xE0, "I, L, T set, K clear");
            assert_eq!(first[5] >> 6, frame.tid, "TID");
            assert_eq!((first[5] >> 5) & 1, u8::from(frame.tid <= 1), "Y");
            if let Some((last_pid, last_tl0)) = last {
                assert_eq!(pid, (last_pid + 1) & PICTURE_ID_MASK);
                let step = if frame.tid == 0 { 1 } else { 0 };
                assert_eq!(tl0, last_tl0.wrapping_add(step));
            }
            last = Some((pid, tl0));
            for (payload, _) in &frame.packets {
                assert!(payload.len() <= MAX_PACKET_PAYLOAD);
                assert_eq!(layer_and_tid(payload), Some((1, frame.tid)));
                let Ok(d) = Vp8Descriptor::parse(payload) else {
                    panic!("no descriptor");
                };
                assert_eq!(d.picture_id(), Some(pid), "same picture id in every packet");
            }
            let markers: Vec<bool> = frame.packets.iter().map(|(_, m)| *m).collect();
            assert_eq!(markers.iter().filter(|m| **m).count(), 1);
            assert_eq!(markers.last(), Some(&true));
        }
    }

    #[test]
    fn one_temporal_layer_has_only_picture_id() {
        let (mut enc, mut rng) = encoder(Some(CAMERA_LAYERS[0]), 1);
        for frame in frames(&mut enc, &mut rng, 4) {
            assert_eq!(frame.tid, 0);
            let (first, _) = &frame.packets[0];
            assert_eq!(first[1], 0x80, "only I set");
            let Ok(d) = Vp8Descriptor::parse(first) else {
                panic!("no descriptor");
            };
            assert!(d.picture_id().is_some());
            assert_eq!(d.tl0_pic_idx(), None);
        }
    }

    #[test]
    fn picture_id_wraps_at_15_bits() {
        let (mut enc, mut rng) = encoder(None, 3);
        enc.picture_id = PICTURE_ID_MASK;
        let all = frames(&mut enc, &mut rng, 2);
        let pids: Vec<Option<u16>> = all
            .iter()
            .map(|f| Vp8Descriptor::parse(&f.packets[0].0).ok()?.picture_id())
            .collect();
        assert_eq!(pids, [Some(PICTURE_ID_MASK), Some(0)]);
    }

    #[test]
    fn layer_sizes_meet_targets_with_bigger_keyframes_and_tid0() {
        for spec in CAMERA_LAYERS {
            let (mut enc, mut rng) = encoder(Some(spec), 3);
            let mut legacy = fastrand::Rng::with_seed(1);
            // 3 s at 30 fps with one keyframe: the interval the sizes are spread over.
            let all: Vec<Frame> = (0..90)
                .map(|i| enc.encode(i == 0, FRAME, 90.0, &mut rng, &mut legacy))
                .collect();
            let bytes = |f: &Frame| f.packets.iter().map(|(p, _)| p.len()).sum::<usize>() as f64;
            let total: f64 = all.iter().map(bytes).sum();
            let bps = total * 8.0 / 3.0;
            let target = f64::from(spec.bitrate_bps);
            assert!((bps - target).abs() < target * 0.1, "{} {bps}", spec.rid);
            let mean_of = |tid: u8| {
                let sizes: Vec<f64> = all[1..]
                    .iter()
                    .filter(|f| f.tid == tid)
                    .map(bytes)
                    .collect();
                sizes.iter().sum::<f64>() / sizes.len() as f64
            };
            assert!(mean_of(0) > mean_of(2) * 1.3, "{}", spec.rid);
            let key = bytes(&all[0]);
            assert!(
                key > mean_of(1) * 3.0 && key < mean_of(1) * 5.0,
                "{}",
                spec.rid
            );
        }
    }

    #[test]
    fn single_layer_keeps_the_original_sizes() {
        let (mut enc, mut rng) = encoder(None, 3);
        let mut legacy = fastrand::Rng::with_seed(3);
        let key = enc.encode(true, FRAME, 90.0, &mut rng, &mut legacy);
        assert_eq!(key.packets.len(), 15);
        assert!(key.packets.iter().all(|(p, _)| p.len() == 1100));
        let delta = enc.encode(false, FRAME, 90.0, &mut rng, &mut legacy);
        assert!((1..=3).contains(&delta.packets.len()));
        assert!(delta
            .packets
            .iter()
            .all(|(p, _)| (600..=1100).contains(&p.len())));
    }

    #[test]
    fn an_opus_payload_carries_its_send_time_beside_its_numbers_and_tag() {
        for len in [32, 60, 120] {
            let mut payload = opus_payload(len, 70_000, 123_456, true);
            assert_eq!(opus_sent_at(&payload), None, "filler is not a send time");
            tag_source(&mut payload, 0xABCD_EF01);
            stamp_sent_at(&mut payload, 987_654_321);
            assert_eq!(opus_sent_at(&payload), Some(987_654_321));
            assert_eq!(opus_origin(&payload), Some((70_000u64 as u16, 123_456)));
            assert_eq!(source_tag(&payload), Some(0xABCD_EF01));
        }
        let mut video = vec![FILLER; 64];
        stamp_sent_at(&mut video, 5);
        assert_eq!(opus_sent_at(&video), None, "only Opus payloads are stamped");
        let mut far = opus_payload(40, 1, 2, false);
        stamp_sent_at(&mut far, u64::MAX);
        assert_eq!(
            opus_sent_at(&far),
            Some((1 << 56) - 1),
            "saturates at 56 bits"
        );
    }
}
