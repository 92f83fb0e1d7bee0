//! Video frames from RTP payloads (the payload descriptor removed, nothing decoded) and the IVF
//! files they are written into.
//!
//! IVF is the container of the VP8/VP9/AV1 reference tools: a 32-byte file header, then per
//! frame a 12-byte header (length, 64-bit timestamp) and the frame. Every frame is complete
//! when it is written, so a file cut anywhere plays up to its last whole frame.

use std::time::Instant;

use super::jitter::Buffered;
use super::SenderClock;

/// IVF timestamps count hundredths of a second. A finer time base (the RTP clock's 1/90000)
/// is one ffmpeg calls unreliable: it then guesses a frame rate from the first frames
/// (20 fps, say) and works in that unit, where two frames of a camera that captured one late
/// and the next on time (2 ms apart, seen with Chromium under load) share a timestamp: its
/// null muxer reports "non monotonically increasing dts" on a plain decode. At 1/100 ffmpeg
/// takes the time base as the frame rate, and every frame has its own 10 ms step (see
/// [`Ivf::write`]).
const IVF_TICKS_PER_SECOND: u32 = 100;
/// RTP video clock ticks per IVF tick.
const RTP_TICKS_PER_IVF_TICK: u64 = 90_000 / IVF_TICKS_PER_SECOND as u64;
/// The largest frame assembled (a 4K keyframe is well under this); a bigger one is dropped.
const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Where the codec's data starts in a VP8 RTP payload (RFC 7741 §4.2), and whether this packet
/// starts a frame (S bit with partition index 0). `None` if the descriptor is cut short.
fn vp8_descriptor(payload: &[u8]) -> Option<(usize, bool)> {
    let first = *payload.first()?;
    let starts = first & 0x10 != 0 && first & 0x07 == 0;
    let mut len = 1;
    if first & 0x80 != 0 {
        let ext = *payload.get(len)?;
        len += 1;
        if ext & 0x80 != 0 {
            let picture_id = *payload.get(len)?;
            len += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            len += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            len += 1; // TID/Y/KEYIDX
        }
    }
    (len < payload.len()).then_some((len, starts))
}

/// What a VP9 RTP payload descriptor (RFC 9628 §4.2) says about its packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vp9Packet {
    offset: usize,
    /// B: the first packet of a (layer) frame.
    begins: bool,
    /// E: the last packet of a (layer) frame.
    ends: bool,
    /// The spatial layer (0 without layer indices).
    spatial: u8,
}

fn vp9_descriptor(payload: &[u8]) -> Option<Vp9Packet> {
    let first = *payload.first()?;
    let (has_pid, inter, has_layers, flexible) = (
        first & 0x80 != 0,
        first & 0x40 != 0,
        first & 0x20 != 0,
        first & 0x10 != 0,
    );
    let (begins, ends, has_ss) = (first & 0x08 != 0, first & 0x04 != 0, first & 0x02 != 0);
    let mut len = 1;
    if has_pid {
        len += if *payload.get(len)? & 0x80 != 0 { 2 } else { 1 };
    }
    let mut spatial = 0;
    if has_layers {
        spatial = (*payload.get(len)? >> 1) & 0x07;
        len += 1;
        if !flexible {
            len += 1; // TL0PICIDX
        }
    }
    if flexible && inter {
        // Up to three reference indices, each with N (another follows).
        for _ in 0..3 {
            let p_diff = *payload.get(len)?;
            len += 1;
            if p_diff & 0x01 == 0 {
                break;
            }
        }
    }
    if has_ss {
        let ss = *payload.get(len)?;
        len += 1;
        let spatial_layers = usize::from(ss >> 5) + 1;
        if ss & 0x10 != 0 {
            len += 4 * spatial_layers; // widths and heights
        }
        if ss & 0x08 != 0 {
            let pictures = *payload.get(len)?;
            len += 1;
            for _ in 0..pictures {
                let picture = *payload.get(len)?;
                len += 1 + usize::from((picture >> 2) & 0x03);
            }
        }
    }
    (len < payload.len()).then_some(Vp9Packet {
        offset: len,
        begins,
        ends,
        spatial,
    })
}

/// A frame assembled from its packets (its bytes are in [`FrameAssembler::data`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    pub timestamp: u32,
    pub keyframe: bool,
    pub arrival: Instant,
    pub sender: Option<SenderClock>,
}

/// Joins a video stream's packets (in sequence order) into frames. A frame with a missing
/// packet is dropped, and so is everything after it until a keyframe (it would not decode).
#[derive(Debug)]
pub(crate) struct FrameAssembler {
    vp9: bool,
    data: Vec<u8>,
    frame: Option<Frame>,
    last_seq: Option<u64>,
    /// A frame was lost: wait for a keyframe.
    broken: bool,
    broken_frames: u64,
    wants_keyframe: bool,
}

impl FrameAssembler {
    pub fn new(vp9: bool) -> Self {
        FrameAssembler {
            vp9,
            data: Vec::new(),
            frame: None,
            last_seq: None,
            broken: true,
            broken_frames: 0,
            wants_keyframe: false,
        }
    }

    /// The bytes of the frame [`push`](Self::push) returned.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Frames dropped (lost packets, or depending on a lost frame).
    pub fn broken(&self) -> u64 {
        self.broken_frames
    }

    /// Whether a loss made a keyframe necessary since the last call.
    pub fn take_wants_keyframe(&mut self) -> bool {
        std::mem::take(&mut self.wants_keyframe)
    }

    /// Another stream follows (a simulcast layer switch at its keyframe).
    pub fn reset(&mut self) {
        self.frame = None;
        self.last_seq = None;
        self.broken = true;
    }

    /// The next packet in sequence order; returns a frame when this packet completes one.
    pub fn push(&mut self, packet: &Buffered) -> Option<Frame> {
        let contiguous = self.last_seq.is_none_or(|last| packet.seq == last + 1);
        self.last_seq = Some(packet.seq);
        let payload = &packet.payload[usize::from(packet.offset)..];
        let (offset, begins, ends, skip) = if self.vp9 {
            let d = vp9_descriptor(payload)?;
            // Spatial layers above the base are left out: the base decodes alone.
            (d.offset, d.begins, d.ends || packet.marker, d.spatial > 0)
        } else {
            let (offset, begins) = vp8_descriptor(payload)?;
            (offset, begins, packet.marker, false)
        };
        if !contiguous && self.frame.take().is_some() {
            self.lose_frame();
        } else if !contiguous {
            self.lose_frame_between();
        }
        if skip {
            return None;
        }
        if begins {
            if self.frame.take().is_some() {
                self.lose_frame(); // its end never came
            }
            if self.broken && !packet.keyframe {
                self.broken_frames += 1;
                return None;
            }
            self.broken = false;
            self.data.clear();
            self.frame = Some(Frame {
                timestamp: packet.timestamp,
                keyframe: packet.keyframe,
                arrival: packet.arrival,
                sender: packet.sender,
            });
        }
        let frame = self.frame?;
        if frame.timestamp != packet.timestamp || self.data.len() + payload.len() > MAX_FRAME {
            self.frame = None;
            self.lose_frame();
            return None;
        }
        self.data.extend_from_slice(&payload[offset..]);
        if ends {
            self.frame = None;
            return Some(frame);
        }
        None
    }

    fn lose_frame(&mut self) {
        self.broken_frames += 1;
        self.lose_frame_between();
    }

    /// Packets went missing between frames: the next frames may refer to what was lost.
    fn lose_frame_between(&mut self) {
        if !self.broken {
            self.broken = true;
            self.wants_keyframe = true;
        }
    }
}

/// One IVF file being written.
#[derive(Debug)]
pub(crate) struct Ivf {
    vp9: bool,
    bytes: Vec<u8>,
    frames: u64,
    last_pts: u64,
    /// The last frame's timestamp as written (IVF ticks).
    last_written: Option<u64>,
}

impl Ivf {
    pub fn new(vp9: bool) -> Self {
        Ivf {
            vp9,
            bytes: Vec::new(),
            frames: 0,
            last_pts: 0,
            last_written: None,
        }
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The last frame's timestamp (90 kHz ticks).
    pub fn last_pts(&self) -> u64 {
        self.last_pts
    }

    /// Writes one frame at `pts` (90 kHz ticks from the file's start); the file header goes
    /// before the first one (a keyframe, whose size it records). In the file every frame's
    /// timestamp is at least one IVF tick (10 ms) after the previous one's: a frame that
    /// would share its predecessor's tick moves to the next.
    pub fn write(&mut self, frame: &[u8], keyframe: bool, pts: u64) {
        if self.frames == 0 {
            let (width, height) = if keyframe && !self.vp9 {
                vp8_size(frame).unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            self.bytes.extend_from_slice(b"DKIF");
            self.bytes.extend_from_slice(&0u16.to_le_bytes()); // version
            self.bytes.extend_from_slice(&32u16.to_le_bytes()); // header length
            self.bytes
                .extend_from_slice(if self.vp9 { b"VP90" } else { b"VP80" });
            self.bytes.extend_from_slice(&width.to_le_bytes());
            self.bytes.extend_from_slice(&height.to_le_bytes());
            // Time base 1/100 (denominator first), then the frame count: unknown while the
            // file grows (readers count the frames themselves).
            self.bytes
                .extend_from_slice(&IVF_TICKS_PER_SECOND.to_le_bytes());
            self.bytes.extend_from_slice(&1u32.to_le_bytes());
            self.bytes.extend_from_slice(&0u32.to_le_bytes());
            self.bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        let Ok(len) = u32::try_from(frame.len()) else {
            return;
        };
        // Timestamps never go back (a reordered frame keeps its predecessor's).
        let pts = pts.max(self.last_pts);
        let nearest = (pts + RTP_TICKS_PER_IVF_TICK / 2) / RTP_TICKS_PER_IVF_TICK;
        let written = self
            .last_written
            .map_or(nearest, |last| nearest.max(last + 1));
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(&written.to_le_bytes());
        self.bytes.extend_from_slice(frame);
        self.frames += 1;
        self.last_pts = pts;
        self.last_written = Some(written);
    }

    /// The bytes written since the last call.
    pub fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

/// Width and height from a VP8 keyframe's header (RFC 6386 §9.1: a 3-byte frame tag, the
/// start code 9d 01 2a, then 14-bit width and height).
fn vp8_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([*frame.get(6)?, *frame.get(7)?]) & 0x3fff;
    let height = u16::from_le_bytes([*frame.get(8)?, *frame.get(9)?]) & 0x3fff;
    Some((width, height))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;
    use std::sync::Arc;

    fn vp8(seq: u64, ts: u32, start: bool, marker: bool, key: bool, body: &[u8]) -> Buffered {
        // X=1, S as given, PID 0; I=1 with a 15-bit picture id.
        let mut payload = vec![if start { 0x90 } else { 0x80 }, 0x80, 0x80, 0x01];
        payload.extend_from_slice(body);
        Buffered {
            seq,
            timestamp: ts,
            marker,
            keyframe: key,
            payload: Arc::from(payload),
            offset: 0,
            arrival: Instant::now(),
            sender: None,
        }
    }

    #[test]
    fn vp8_descriptors_are_measured() {
        assert_eq!(vp8_descriptor(&[0x10, 0xAA]), Some((1, true)));
        assert_eq!(
            vp8_descriptor(&[0x90, 0x80, 0x81, 0x02, 0xAA]),
            Some((4, true))
        );
        assert_eq!(
            vp8_descriptor(&[0x80, 0xE0, 0x05, 0x01, 0x20, 0xAA]),
            Some((5, false))
        );
        assert_eq!(vp8_descriptor(&[0x90, 0x80, 0x81]), None); // cut short
        assert_eq!(vp8_descriptor(&[]), None);
    }

    #[test]
    fn vp9_descriptors_are_measured() {
        // I, B, E; 7-bit picture id.
        let d = vp9_descriptor(&[0x8C, 0x05, 0xAA]).unwrap();
        assert_eq!((d.offset, d.begins, d.ends, d.spatial), (2, true, true, 0));
        // L (non-flexible: TL0PICIDX too), spatial layer 1.
        let d = vp9_descriptor(&[0x28, 0x02, 0x07, 0xAA]).unwrap();
        assert_eq!((d.offset, d.spatial), (3, 1));
        // V with one spatial layer's size and one picture group entry with one reference.
        let d = vp9_descriptor(&[0x0A, 0x18, 0, 1, 0, 1, 1, 0x04, 0x01, 0xAA]).unwrap();
        assert_eq!(d.offset, 9);
        assert_eq!(vp9_descriptor(&[0x0A, 0x18, 0]), None);
    }

    #[test]
    fn frames_are_joined_and_a_loss_waits_for_a_keyframe() {
        let mut frames = FrameAssembler::new(false);
        assert!(frames.push(&vp8(1, 0, false, true, false, b"x")).is_none()); // no start
        assert!(frames
            .push(&vp8(2, 3000, true, false, true, b"ke"))
            .is_none());
        let frame = frames
            .push(&vp8(3, 3000, false, true, false, b"y"))
            .unwrap();
        assert!(frame.keyframe);
        assert_eq!(frames.data(), b"key");
        // 4 is lost: frame 5–6 is dropped, and so is the next delta frame.
        assert!(frames
            .push(&vp8(5, 6000, false, true, false, b"z"))
            .is_none());
        assert!(frames.take_wants_keyframe());
        assert!(frames
            .push(&vp8(6, 9000, true, true, false, b"d"))
            .is_none());
        let frame = frames.push(&vp8(7, 12000, true, true, true, b"K")).unwrap();
        assert!(frame.keyframe);
        assert_eq!(frames.broken(), 1);
    }

    #[test]
    fn the_ivf_header_records_codec_size_and_time_base() {
        let mut ivf = Ivf::new(false);
        let key = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
        ivf.write(&key, true, 0);
        ivf.write(&[1, 2, 3], false, 3000);
        let bytes = ivf.take_bytes();
        assert_eq!(&bytes[..4], b"DKIF");
        assert_eq!(&bytes[8..12], b"VP80");
        assert_eq!(u16::from_le_bytes([bytes[12], bytes[13]]), 640);
        assert_eq!(u16::from_le_bytes([bytes[14], bytes[15]]), 480);
        assert_eq!(bytes.len(), 32 + 12 + key.len() + 12 + 3);
        assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 100);
        assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().unwrap()), 1);
        let second = 32 + 12 + key.len();
        let pts = u64::from_le_bytes(bytes[second + 4..second + 12].try_into().unwrap());
        assert_eq!(pts, 3, "3000 ticks of 90 kHz are 3 hundredths");
    }

    /// A frame 2 ms after its predecessor (captured late, the next on time) gets its own
    /// 10 ms step: no two frames share a timestamp, and the next ones are where they belong.
    #[test]
    fn frames_never_share_an_ivf_timestamp() {
        let mut ivf = Ivf::new(false);
        let key = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
        ivf.write(&key, true, 63_090);
        ivf.write(&[1], false, 71_820);
        ivf.write(&[2], false, 72_000);
        ivf.write(&[3], false, 76_500);
        let bytes = ivf.take_bytes();
        let mut at = 32;
        let mut written = Vec::new();
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            written.push(u64::from_le_bytes(
                bytes[at + 4..at + 12].try_into().unwrap(),
            ));
            at += 12 + len;
        }
        assert_eq!(written, [70, 80, 81, 85]);
        let mut again = Ivf::new(false);
        again.write(&key, true, 0);
        again.write(&[1], false, 180);
        again.write(&[2], false, 200);
        let bytes = again.take_bytes();
        let third = 32 + 12 + key.len() + 12 + 1;
        let pts = u64::from_le_bytes(bytes[third + 4..third + 12].try_into().unwrap());
        assert_eq!(
            pts, 2,
            "0, then 180 and 200 ticks: 0, 1 (rounded 0, moved on), 2"
        );
    }
}
