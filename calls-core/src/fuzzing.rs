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
