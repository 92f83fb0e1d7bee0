//! Hooks for the fuzz targets in `fuzz/` (not API: hidden from docs, may change at any time).
//! Only what public API cannot reach is here.

use std::time::Instant;

use crate::forward::Verdict;

/// The per-subscriber RTP rewriter (crate-private `forward::Rewriter`), for fuzzing sequences
/// of packets, epochs (unmute, source change) and keyframes.
#[derive(Debug)]
pub struct Rewriter(crate::forward::Rewriter);

impl Rewriter {
    /// A rewriter for a new subscription.
    pub fn new(clock_rate: u32, is_video: bool, epoch: u32) -> Self {
        Rewriter(crate::forward::Rewriter::new(clock_rate, is_video, epoch))
    }

    /// The slot starts carrying another source (epoch `epoch`), at a keyframe for video.
    pub fn switch_source(&mut self, epoch: u32) {
        self.0.switch_source(epoch);
    }

    /// One packet: `Some((seq, timestamp))` to forward, `None` to drop.
    pub fn rewrite(
        &mut self,
        epoch: u32,
        seq: u64,
        timestamp: u32,
        keyframe: bool,
        now: Instant,
    ) -> Option<(u64, u32)> {
        match self.0.rewrite(epoch, seq, timestamp, keyframe, now) {
            Verdict::Forward { seq, timestamp } => Some((seq, timestamp)),
            Verdict::Drop => None,
        }
    }

    /// A simulcast layer switch at a keyframe of the new layer.
    pub fn switch_layer(&mut self) {
        self.0.switch_layer();
    }

    /// Paused (no budget, hidden tile): resumes at a keyframe.
    pub fn pause(&mut self) {
        self.0.pause();
    }

    /// A packet deliberately not forwarded (an upper temporal layer).
    pub fn skip(&mut self, seq: u64) {
        self.0.skip(seq);
    }

    /// Whether it still waits for a keyframe.
    pub fn waits_for_keyframe(&self) -> bool {
        self.0.waits_for_keyframe()
    }
}

/// What the router reads from one decrypted video RTP payload, by each parser it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VideoPayloadFacts {
    /// Keyframe detection as VP8, VP9, H.264 and AV1, in that order.
    pub keyframe: [bool; 4],
    /// VP8 (RFC 7741) temporal layer id and picture start.
    pub vp8_temporal: (Option<u8>, bool),
    /// VP9 temporal layer id and picture start.
    pub vp9_temporal: (Option<u8>, bool),
    /// The VP8 descriptor parsed (str0m), and its picture id and TL0PICIDX.
    pub vp8_descriptor: Option<(Option<u16>, Option<u8>)>,
}

/// Runs every payload parser of the forwarding path on `payload` (the router picks one by the
/// track's codec; a fuzz target runs them all).
pub fn parse_video_payload(payload: &[u8]) -> VideoPayloadFacts {
    use crate::forward::VideoCodec;
    let keyframe = [
        VideoCodec::Vp8,
        VideoCodec::Vp9,
        VideoCodec::H264,
        VideoCodec::Av1,
    ]
    .map(|codec| codec.is_keyframe(payload));
    VideoPayloadFacts {
        keyframe,
        vp8_temporal: crate::layers::vp8_temporal(payload),
        vp9_temporal: crate::layers::vp9_temporal(payload),
        vp8_descriptor: str0m::rtp::Vp8Descriptor::parse(payload)
            .ok()
            .map(|d| (d.picture_id(), d.tl0_pic_idx())),
    }
}

/// The per-subscriber VP8 picture-id munger (crate-private `forward::Vp8Munger`).
#[derive(Debug, Default)]
pub struct Vp8Munger(crate::forward::Vp8Munger);

impl Vp8Munger {
    /// A layer switch: the next picture is rebased onto the last one sent.
    pub fn switch_layer(&mut self) {
        self.0.switch_layer();
    }

    /// A whole upper-temporal-layer picture was dropped.
    pub fn dropped_picture(&mut self) {
        self.0.dropped_picture();
    }

    /// Parses `payload`'s descriptor and returns whether it would be patched; `None` if it
    /// does not parse.
    pub fn patch(&mut self, payload: &[u8]) -> Option<bool> {
        let descriptor = str0m::rtp::Vp8Descriptor::parse(payload).ok()?;
        Some(self.0.patch(&descriptor).is_some())
    }
}

/// The active-speaker detector (crate-private `speaker::SpeakerDetector`), fed RFC 6464 audio
/// levels as str0m reports them from the decrypted header extension.
#[derive(Debug)]
pub struct SpeakerDetector(crate::speaker::SpeakerDetector);

impl SpeakerDetector {
    /// A detector forwarding at most `top_n` speakers (`0`: everybody).
    pub fn new(top_n: usize) -> Self {
        SpeakerDetector(crate::speaker::SpeakerDetector::new(top_n))
    }

    /// One audio packet's level (dBov, any `i8`) and voice-activity flag.
    pub fn observe(&mut self, session: u64, level: i8, vad: Option<bool>, now: Instant) {
        self.0.observe(crate::SessionId(session), level, vad, now);
    }

    /// Mutes or unmutes a publisher.
    pub fn set_muted(&mut self, session: u64, muted: bool, now: Instant) {
        self.0.set_muted(crate::SessionId(session), muted, now);
    }

    /// Forgets a publisher (left the call).
    pub fn remove(&mut self, session: u64) {
        self.0.remove(crate::SessionId(session));
    }

    /// The periodic re-measure; the new active speaker if it changed.
    pub fn tick(&mut self, now: Instant) -> Option<Option<u64>> {
        self.0.tick(now).map(|s| s.map(|s| s.0))
    }

    /// The current active speaker.
    pub fn active(&self) -> Option<u64> {
        self.0.active().map(|s| s.0)
    }

    /// The top-N set, strongest first.
    pub fn top(&self) -> Vec<u64> {
        self.0.top().iter().map(|s| s.0).collect()
    }

    /// Whether `session`'s audio is forwarded now.
    pub fn is_forwarded(&self, session: u64, now: Instant) -> bool {
        self.0.is_forwarded(crate::SessionId(session), now)
    }
}

/// The forwarding path's RFC 2198 reader: `Some((primary payload type, primary offset,
/// redundant blocks))`, or `None` for a payload it refuses (dropped and counted).
pub fn red_primary(payload: &[u8]) -> Option<(u8, usize, usize)> {
    crate::red::primary(payload)
        .ok()
        .map(|p| (p.pt, p.offset, p.redundant))
}

/// Whether an Opus packet carries in-band FEC, as the router counts it.
pub fn opus_has_fec(packet: &[u8]) -> bool {
    crate::red::opus_has_fec(packet)
}

/// Most redundant blocks the RED reader accepts.
pub const MAX_RED_BLOCKS: usize = crate::red::MAX_REDUNDANT_BLOCKS;
