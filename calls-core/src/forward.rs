//! Forwarding without depacketizing: per (publisher track → subscriber) rewriting of sequence
//! numbers and timestamps so each subscriber sees one continuous stream, and keyframe detection.

use std::time::Instant;

use str0m::format::{
    detect_av1_keyframe, detect_h264_keyframe, detect_vp8_keyframe, detect_vp9_keyframe,
};
use str0m::rtp::{Vp8Descriptor, Vp8Patch};

/// Video codecs we know how to find keyframes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VideoCodec {
    Vp8,
    Vp9,
    H264,
    Av1,
    Other,
}

impl VideoCodec {
    pub fn from_str0m(codec: str0m::format::Codec) -> Self {
        use str0m::format::Codec;
        match codec {
            Codec::Vp8 => VideoCodec::Vp8,
            Codec::Vp9 => VideoCodec::Vp9,
            Codec::H264 => VideoCodec::H264,
            Codec::Av1 => VideoCodec::Av1,
            _ => VideoCodec::Other,
        }
    }

    /// Whether this RTP payload starts (or carries) a keyframe.
    pub fn is_keyframe(self, payload: &[u8]) -> bool {
        match self {
            VideoCodec::Vp8 => detect_vp8_keyframe(payload),
            VideoCodec::Vp9 => detect_vp9_keyframe(payload),
            VideoCodec::H264 => detect_h264_keyframe(payload),
            VideoCodec::Av1 => detect_av1_keyframe(payload),
            VideoCodec::Other => false,
        }
    }
}

/// What a rewriter decided about one incoming packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send with these outgoing sequence number and RTP timestamp.
    Forward { seq: u64, timestamp: u32 },
    /// Not for this subscriber (waiting for a keyframe, or older than the last resync).
    Drop,
}

/// Rewrites one publisher track for one subscriber.
///
/// Outgoing sequence numbers start at a small random-free base (ROC 0, as str0m requires for a
/// fresh receiver) and stay gap-free across resyncs (start, unmute, layer switch); a gap in the
/// publisher's stream (real loss) stays a gap so the subscriber can NACK it. Timestamps stay
/// monotonic: after a resync the outgoing timestamp advances by the wallclock time elapsed.
#[derive(Debug)]
pub(crate) struct Rewriter {
    clock_rate: u32,
    is_video: bool,
    /// Set until the first packet after a resync has been forwarded.
    resync: bool,
    /// Video only: forward nothing until a keyframe starts.
    wait_keyframe: bool,
    seq_offset: i64,
    ts_offset: u32,
    /// The publisher's sequence number at the last resync; older packets are not ours to send.
    base_in_seq: u64,
    last_out_seq: Option<u64>,
    last_out_ts: u32,
    last_out_at: Option<Instant>,
    /// The publisher track's epoch when we last synced; a change forces a resync.
    epoch: u32,
    /// Highest publisher sequence number forwarded or deliberately skipped since the resync.
    highest_in: Option<u64>,
    /// The last deliberately skipped sequence number: older packets (late, reordered) would
    /// map onto numbers already used, since the offset changed at the skip.
    last_skip: Option<u64>,
}

impl Rewriter {
    pub fn new(clock_rate: u32, is_video: bool, epoch: u32) -> Self {
        Rewriter {
            clock_rate,
            is_video,
            resync: true,
            wait_keyframe: is_video,
            seq_offset: 0,
            ts_offset: 0,
            base_in_seq: 0,
            last_out_seq: None,
            last_out_ts: 0,
            last_out_at: None,
            epoch,
            highest_in: None,
            last_skip: None,
        }
    }

    /// Whether this subscriber still waits for a keyframe (so one should be requested).
    pub fn waits_for_keyframe(&self) -> bool {
        self.wait_keyframe
    }

    /// Nothing was (or will be) forwarded for a while (paused): video restarts at a keyframe,
    /// numbering continues without a gap.
    pub fn pause(&mut self) {
        self.resync = true;
        self.wait_keyframe = self.is_video;
    }

    /// A simulcast layer switch at a keyframe of the new layer: the next packet (that keyframe)
    /// continues this stream's numbering; the new layer's own numbers are rebased onto it.
    pub fn switch_layer(&mut self) {
        self.resync = true;
        self.wait_keyframe = false;
    }

    /// The slot this rewriter numbers starts carrying another publisher track (of epoch
    /// `epoch`), at a keyframe for video: the next packet continues this stream's numbering
    /// and timestamps, whatever the new source's own numbers are.
    pub fn switch_source(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.switch_layer();
    }

    /// A packet deliberately not forwarded (an upper temporal layer this subscriber does not
    /// get): later packets are renumbered so the subscriber sees no gap (and sends no NACK).
    pub fn skip(&mut self, seq: u64) {
        if self.resync || self.wait_keyframe {
            return;
        }
        if self.highest_in.is_some_and(|h| seq == h + 1) {
            self.highest_in = Some(seq);
            self.seq_offset -= 1;
            self.last_skip = Some(seq);
        }
    }

    /// Decides about one packet of the publisher's stream.
    ///
    /// `epoch` is the publisher track's discontinuity counter (bumped on unmute and source
    /// changes); `seq` is the publisher's extended sequence number.
    pub fn rewrite(
        &mut self,
        epoch: u32,
        seq: u64,
        timestamp: u32,
        keyframe: bool,
        now: Instant,
    ) -> Verdict {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.resync = true;
            self.wait_keyframe = self.is_video;
        }
        if self.wait_keyframe {
            if !keyframe {
                return Verdict::Drop;
            }
            self.wait_keyframe = false;
            self.resync = true;
        }
        if self.resync {
            self.resync = false;
            let next_out = self.last_out_seq.map_or(1, |s| s + 1);
            self.seq_offset = next_out as i64 - seq as i64;
            let next_ts = match self.last_out_at {
                Some(at) => {
                    let elapsed = now.saturating_duration_since(at);
                    let ticks = (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000)
                        .max(1) as u32;
                    self.last_out_ts.wrapping_add(ticks)
                }
                None => timestamp,
            };
            self.ts_offset = next_ts.wrapping_sub(timestamp);
            self.base_in_seq = seq;
            self.highest_in = Some(seq);
            self.last_skip = None;
        } else if seq < self.base_in_seq || self.last_skip.is_some_and(|s| seq <= s) {
            // From before the last resync, or at or before the last skip: it would map onto
            // numbers already used.
            return Verdict::Drop;
        }
        if self.highest_in.is_none_or(|h| seq > h) {
            self.highest_in = Some(seq);
        }
        let out_seq = (seq as i64 + self.seq_offset) as u64;
        let out_ts = timestamp.wrapping_add(self.ts_offset);
        if self.last_out_seq.is_none_or(|last| out_seq > last) {
            self.last_out_seq = Some(out_seq);
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
        }
        Verdict::Forward {
            seq: out_seq,
            timestamp: out_ts,
        }
    }
}

/// Keeps a subscriber's VP8 picture ids and TL0PICIDX continuous across simulcast layer
/// switches (each layer numbers its own pictures) and over dropped temporal-layer pictures.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Vp8Munger {
    /// Set at a layer switch: the next picture is rebased onto the last one sent.
    rebase: bool,
    pic_offset: u16,
    tl0_offset: u8,
    last_pic: Option<u16>,
    last_tl0: Option<u8>,
}

/// 15-bit picture ids.
const PIC_ID_MASK: u16 = 0x7fff;

impl Vp8Munger {
    /// The next packet starts another layer's keyframe.
    pub fn switch_layer(&mut self) {
        self.rebase = true;
    }

    /// A whole picture of an upper temporal layer was dropped: close its picture-id gap.
    pub fn dropped_picture(&mut self) {
        self.pic_offset = self.pic_offset.wrapping_sub(1) & PIC_ID_MASK;
    }

    /// The descriptor patch for one forwarded packet, if its ids must change.
    pub fn patch(&mut self, desc: &Vp8Descriptor) -> Option<Vp8Patch> {
        let pic = desc.picture_id();
        let tl0 = desc.tl0_pic_idx();
        if self.rebase {
            self.rebase = false;
            if let (Some(p), Some(last)) = (pic, self.last_pic) {
                self.pic_offset = last.wrapping_add(1).wrapping_sub(p) & PIC_ID_MASK;
            }
            if let (Some(t), Some(last)) = (tl0, self.last_tl0) {
                self.tl0_offset = last.wrapping_add(1).wrapping_sub(t);
            }
        }
        let out_pic = pic.map(|p| p.wrapping_add(self.pic_offset) & PIC_ID_MASK);
        let out_tl0 = tl0.map(|t| t.wrapping_add(self.tl0_offset));
        if out_pic.is_some() {
            self.last_pic = out_pic;
        }
        if out_tl0.is_some() {
            self.last_tl0 = out_tl0;
        }
        if self.pic_offset == 0 && self.tl0_offset == 0 {
            return None;
        }
        let mut builder = desc.patch();
        if let Some(p) = out_pic {
            builder = builder.picture_id(p);
        }
        if let Some(t) = out_tl0 {
            builder = builder.tl0_pic_idx(t);
        }
        // A 7-bit picture id cannot carry every 15-bit value: send that packet unpatched.
        builder.build().ok()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn audio_is_rebased_to_start_at_one_and_keeps_loss_gaps() {
        let now = Instant::now();
        let mut rw = Rewriter::new(48_000, false, 0);
        assert_eq!(
            rw.rewrite(0, 5000, 960, false, now),
            Verdict::Forward {
                seq: 1,
                timestamp: 960
            }
        );
        assert_eq!(
            rw.rewrite(0, 5001, 1920, false, now),
            Verdict::Forward {
                seq: 2,
                timestamp: 1920
            }
        );
        // 5002 lost upstream: the gap stays so the subscriber can NACK it.
        assert_eq!(
            rw.rewrite(0, 5003, 3840, false, now),
            Verdict::Forward {
                seq: 4,
                timestamp: 3840
            }
        );
        // The retransmission arrives late and fills it.
        assert_eq!(
            rw.rewrite(0, 5002, 2880, false, now),
            Verdict::Forward {
                seq: 3,
                timestamp: 2880
            }
        );
    }

    #[test]
    fn resync_after_epoch_change_is_gap_free_and_monotonic() {
        let t0 = Instant::now();
        let mut rw = Rewriter::new(48_000, false, 0);
        rw.rewrite(0, 100, 10_000, false, t0);
        rw.rewrite(0, 101, 10_960, false, t0 + Duration::from_millis(20));
        // Muted for a while (packets 102..=599 dropped by the router), then unmuted: epoch 1.
        let at = t0 + Duration::from_millis(1020);
        match rw.rewrite(1, 600, 500_000, false, at) {
            Verdict::Forward { seq, timestamp } => {
                assert_eq!(seq, 3);
                assert_eq!(timestamp, 10_960 + 48_000);
            }
            Verdict::Drop => panic!("dropped"),
        }
        // A straggler from before the unmute is dropped, not sent with a reused number.
        assert_eq!(rw.rewrite(1, 101, 10_960, false, at), Verdict::Drop);
    }

    #[test]
    fn a_source_switch_continues_the_stream() {
        let t0 = Instant::now();
        let mut rw = Rewriter::new(48_000, false, 0);
        rw.rewrite(0, 700, 1_000, false, t0);
        rw.rewrite(0, 701, 1_960, false, t0);
        // Another speaker takes the slot: its own numbers are rebased onto the stream's.
        rw.switch_source(5);
        let at = t0 + Duration::from_millis(500);
        assert_eq!(
            rw.rewrite(5, 9, 123_456, false, at),
            Verdict::Forward {
                seq: 3,
                timestamp: 1_960 + 24_000
            }
        );
        // A late packet of the previous source would reuse numbers: the router no longer
        // forwards it, and the rewriter would not either.
        assert_eq!(rw.rewrite(5, 8, 123_000, false, at), Verdict::Drop);
    }

    #[test]
    fn skipped_packets_leave_no_gap_and_late_ones_cannot_collide() {
        let now = Instant::now();
        let mut rw = Rewriter::new(90_000, true, 0);
        let fwd = |v| match v {
            Verdict::Forward { seq, .. } => Some(seq),
            Verdict::Drop => None,
        };
        assert_eq!(fwd(rw.rewrite(0, 100, 0, true, now)), Some(1));
        assert_eq!(fwd(rw.rewrite(0, 102, 0, false, now)), Some(3)); // 101 lost: a gap
        rw.skip(103); // an upper temporal layer
        rw.skip(104);
        assert_eq!(fwd(rw.rewrite(0, 105, 0, false, now)), Some(4));
        // 101 arrives late (a retransmission): its old number (2) is gone with the offset.
        assert_eq!(fwd(rw.rewrite(0, 101, 0, false, now)), None);
        // A skipped packet arriving again (RTX) would take 105's number.
        assert_eq!(fwd(rw.rewrite(0, 104, 0, false, now)), None);
        // A skip after a gap cannot be closed (the gap may be loss): numbering stays.
        rw.skip(107);
        assert_eq!(fwd(rw.rewrite(0, 108, 0, false, now)), Some(7));
    }

    #[test]
    fn video_waits_for_a_keyframe() {
        let now = Instant::now();
        let mut rw = Rewriter::new(90_000, true, 0);
        assert!(rw.waits_for_keyframe());
        assert_eq!(rw.rewrite(0, 10, 0, false, now), Verdict::Drop);
        assert_eq!(
            rw.rewrite(0, 11, 3000, true, now),
            Verdict::Forward {
                seq: 1,
                timestamp: 3000
            }
        );
        assert_eq!(
            rw.rewrite(0, 12, 3000, false, now),
            Verdict::Forward {
                seq: 2,
                timestamp: 3000
            }
        );
        assert!(!rw.waits_for_keyframe());
    }

    #[test]
    fn vp8_keyframe_detection() {
        // S=1, PID=0, no extensions; VP8 payload header P bit 0 = keyframe.
        assert!(VideoCodec::Vp8.is_keyframe(&[0x10, 0x00, 0x9d, 0x01, 0x2a]));
        assert!(!VideoCodec::Vp8.is_keyframe(&[0x10, 0x01, 0x00]));
        // Not the start of a partition.
        assert!(!VideoCodec::Vp8.is_keyframe(&[0x00, 0x00, 0x00]));
    }
}
