//! Ogg/Opus files (RFC 7845) from Opus RTP payloads, without decoding: each RTP payload is one
//! Opus packet; the granule position counts 48 kHz samples, and gaps are filled with silent
//! CELT frames so the file keeps the call's time.

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

/// Ogg pages are closed at least this often (in Opus packets, 20 ms each usually): a file cut
/// by a crash loses at most about a second.
const PACKETS_PER_PAGE: u32 = 50;
/// Smallest silence written into a gap (2.5 ms, the shortest Opus frame); shorter
/// differences between the RTP clock and the file are left alone (they do not add up: every
/// packet is placed by its own timestamp).
const SILENCE_GRAIN: u64 = 120;
/// Longest Opus packet, in samples (120 ms).
const MAX_PACKET: u64 = 5760;
/// A silent CELT frame (RFC 6716 §4.3: the silence flag decodes first, from these bytes).
const SILENT_FRAME: [u8; 2] = [0xFF, 0xFE];
/// TOC of one fullband CELT frame of 20, 10, 5 and 2.5 ms (configs 31, 30, 29, 28), mono,
/// code 0 — paired with its length in samples.
const SILENCE_TOCS: [(u8, u64); 4] = [(0xF8, 960), (0xF0, 480), (0xE8, 240), (0xE0, 120)];
/// 120 ms of silence in one packet: code 3 (RFC 6716 §3.2.5), six constant-size 20 ms CELT
/// frames.
const SILENCE_120MS: [u8; 14] = [
    0xFB, 6, 0xFF, 0xFE, 0xFF, 0xFE, 0xFF, 0xFE, 0xFF, 0xFE, 0xFF, 0xFE, 0xFF, 0xFE,
];

/// The length in 48 kHz samples of an Opus packet, from its TOC byte (RFC 6716 §3.1), or
/// `None` when it is malformed.
pub(crate) fn packet_samples(packet: &[u8]) -> Option<u64> {
    let toc = *packet.first()?;
    let config = usize::from(toc >> 3);
    let frame: u64 = match config {
        0..=11 => [480, 960, 1920, 2880][config % 4],
        12..=15 => [480, 960][config % 2],
        _ => [120, 240, 480, 960][config % 4],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u64::from(*packet.get(1)? & 0x3F),
    };
    let samples = frame * frames;
    (frames > 0 && samples <= MAX_PACKET).then_some(samples)
}

/// One Ogg/Opus file being written.
pub(crate) struct OggOpus {
    writer: PacketWriter<'static, Vec<u8>>,
    serial: u32,
    /// Samples written (the granule position after the last packet).
    samples: u64,
    /// Samples of silence written.
    silence: u64,
    packets: u64,
    since_page: u32,
    /// The last packet, held back so the stream's end can be marked on it.
    held: Option<(Vec<u8>, u64)>,
    malformed: u64,
}

impl std::fmt::Debug for OggOpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OggOpus")
            .field("serial", &self.serial)
            .field("samples", &self.samples)
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

impl OggOpus {
    /// Starts a file: the identification and comment headers, each on its own page.
    pub fn new(serial: u32) -> Self {
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(2); // channels: WebRTC negotiates opus/48000/2; mono packets decode to both
        head.extend_from_slice(&0u16.to_le_bytes()); // pre-skip: the stream starts mid-way
        head.extend_from_slice(&48_000u32.to_le_bytes()); // input rate (informational)
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family 0
        let vendor = b"calls";
        let mut tags = Vec::with_capacity(16 + vendor.len());
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no user comments
        let mut ogg = OggOpus {
            writer: PacketWriter::new(Vec::new()),
            serial,
            samples: 0,
            silence: 0,
            packets: 0,
            since_page: 0,
            held: None,
            malformed: 0,
        };
        ogg.put(head, PacketWriteEndInfo::EndPage, 0);
        ogg.put(tags, PacketWriteEndInfo::EndPage, 0);
        ogg
    }

    /// Samples written so far (silence included).
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Samples of silence written so far.
    pub fn silence_samples(&self) -> u64 {
        self.silence
    }

    /// Opus packets written so far (silence included).
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Writes one Opus packet that starts `pos` samples into the file: a gap before it is
    /// filled with silence; a packet entirely before the end written so far (a duplicate) is
    /// dropped.
    pub fn write(&mut self, packet: &[u8], pos: u64) {
        let Some(samples) = packet_samples(packet) else {
            self.malformed += 1;
            return;
        };
        if pos + samples <= self.samples {
            return;
        }
        self.fill_to(pos);
        self.append(packet.to_vec(), samples);
    }

    /// Fills with silence up to `end` samples (to the nearest 2.5 ms below it).
    pub fn fill_to(&mut self, end: u64) {
        while end >= self.samples + SILENCE_GRAIN {
            let gap = end - self.samples;
            let (packet, samples) = if gap >= MAX_PACKET {
                (SILENCE_120MS.to_vec(), MAX_PACKET)
            } else {
                let Some(&(toc, samples)) = SILENCE_TOCS.iter().find(|(_, s)| *s <= gap) else {
                    break;
                };
                (vec![toc, SILENT_FRAME[0], SILENT_FRAME[1]], samples)
            };
            self.silence += samples;
            self.append(packet, samples);
        }
    }

    /// Marks the end of the stream (on the last packet's page).
    pub fn finish(&mut self) {
        match self.held.take() {
            Some((packet, granule)) => self.put(packet, PacketWriteEndInfo::EndStream, granule),
            None => {
                // Nothing but headers: end the stream on a 2.5 ms silent frame.
                let (toc, samples) = SILENCE_TOCS[3];
                self.samples += samples;
                self.silence += samples;
                self.packets += 1;
                let packet = vec![toc, SILENT_FRAME[0], SILENT_FRAME[1]];
                self.put(packet, PacketWriteEndInfo::EndStream, self.samples);
            }
        }
    }

    /// The bytes of the pages closed since the last call.
    pub fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(self.writer.inner_mut())
    }

    fn append(&mut self, packet: Vec<u8>, samples: u64) {
        self.samples += samples;
        self.packets += 1;
        if let Some((previous, granule)) = self.held.replace((packet, self.samples)) {
            self.since_page += 1;
            let end = if self.since_page >= PACKETS_PER_PAGE {
                self.since_page = 0;
                PacketWriteEndInfo::EndPage
            } else {
                PacketWriteEndInfo::NormalPacket
            };
            self.put(previous, end, granule);
        }
    }

    fn put(&mut self, packet: Vec<u8>, end: PacketWriteEndInfo, granule: u64) {
        // Writing into a `Vec` cannot fail.
        if let Err(e) = self.writer.write_packet(packet, self.serial, end, granule) {
            tracing::warn!("ogg page not written: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_packet_lengths_come_from_the_toc() {
        assert_eq!(packet_samples(&[0x78, 0]), Some(960)); // hybrid FB 20 ms
        assert_eq!(packet_samples(&[0xF8, 0xFF, 0xFE]), Some(960)); // CELT 20 ms
        assert_eq!(packet_samples(&[0xE0]), Some(120)); // CELT 2.5 ms
        assert_eq!(packet_samples(&SILENCE_120MS), Some(5760));
        assert_eq!(packet_samples(&[0x19]), Some(2 * 2880)); // SILK 60 ms, two frames
        assert_eq!(packet_samples(&[0x1B, 0x03]), None); // 3 × 60 ms > 120 ms
        assert_eq!(packet_samples(&[0x03]), None); // code 3 without its count
        assert_eq!(packet_samples(&[]), None);
    }

    #[test]
    fn silence_fills_a_gap_to_the_grain() {
        let mut ogg = OggOpus::new(1);
        ogg.write(&[0x78, 1, 2, 3], 0);
        ogg.write(&[0x78, 1, 2, 3], 960 + 48_000 + 100);
        // 1 s of silence (8 × 120 ms + 2 × 20 ms) minus nothing: the 100 samples stay.
        assert_eq!(ogg.silence_samples(), 48_000);
        assert_eq!(ogg.samples(), 960 + 48_000 + 960);
        // A duplicate changes nothing.
        ogg.write(&[0x78, 1, 2, 3], 960);
        assert_eq!(ogg.samples(), 960 + 48_000 + 960);
    }
}
