//! Redundant audio (RFC 2198 RED) and Opus in-band FEC, read without decoding.
//!
//! Browsers that negotiate `red/48000/2` send each Opus frame together with a copy of the
//! previous one (or two): a single lost packet is rebuilt from the next. The router forwards
//! such packets as they are to subscribers that negotiated RED, and gives the others the
//! primary block only ([`primary`]), which is plain Opus with the packet's own timestamp.
//!
//! Opus in-band FEC (LBRR, RFC 6716 §4.2.4) is another redundancy, inside one Opus frame: the
//! encoder adds it when the loss it is told about is high enough. [`opus_has_fec`] reads the
//! LBRR flag of a packet's first SILK frame from its first bytes, as libwebrtc's
//! `WebRtcOpus_PacketHasFec` does, so the router can count FEC-bearing packets.
//!
//! Nothing here allocates: both functions read a borrowed payload.

use thiserror::Error;

/// RFC 2198 §3: a header block with the F bit set is 4 bytes (F, block PT, 14-bit timestamp
/// offset, 10-bit block length); the last one (F = 0, the primary's PT) is 1 byte.
const REDUNDANT_HEADER_LEN: usize = 4;
/// The F bit: another header block follows.
const F_BIT: u8 = 0x80;
/// Redundant blocks accepted in one packet. Browsers send one or two; the RFC sets no limit, so
/// a bound keeps a crafted packet from being walked for long.
pub const MAX_REDUNDANT_BLOCKS: usize = 8;

/// Why a RED payload was not accepted. Such a packet is dropped and counted
/// (`red_malformed`), never forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RedError {
    /// The header blocks run past the end of the payload.
    #[error("RED header truncated")]
    TruncatedHeader,
    /// More than [`MAX_REDUNDANT_BLOCKS`] redundant blocks.
    #[error("more than {MAX_REDUNDANT_BLOCKS} redundant blocks")]
    TooManyBlocks,
    /// The redundant blocks' lengths add up to more than the payload holds.
    #[error("redundant blocks of {claimed} bytes in a payload of {available}")]
    BlocksTooLong {
        /// Bytes the header blocks claim.
        claimed: usize,
        /// Bytes after the header.
        available: usize,
    },
    /// Nothing left for the primary block.
    #[error("RED packet without a primary block")]
    EmptyPrimary,
}

/// Where the primary (newest) encoding of a RED payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedPrimary {
    /// The primary block's payload type (the publisher's Opus payload type).
    pub pt: u8,
    /// Offset of the primary block in the RED payload; it runs to the end.
    pub offset: usize,
    /// Redundant blocks before it.
    pub redundant: usize,
}

/// Finds the primary block of an RFC 2198 payload (§3: header blocks, then the data blocks in
/// the same order, the primary last). Every length is checked against the payload.
pub fn primary(payload: &[u8]) -> Result<RedPrimary, RedError> {
    let mut pos = 0;
    let mut redundant_len = 0usize;
    let mut redundant = 0;
    loop {
        let Some(&first) = payload.get(pos) else {
            return Err(RedError::TruncatedHeader);
        };
        if first & F_BIT == 0 {
            pos += 1;
            let available = payload.len() - pos;
            if redundant_len > available {
                return Err(RedError::BlocksTooLong {
                    claimed: redundant_len,
                    available,
                });
            }
            let offset = pos + redundant_len;
            if offset == payload.len() {
                return Err(RedError::EmptyPrimary);
            }
            return Ok(RedPrimary {
                pt: first & !F_BIT,
                offset,
                redundant,
            });
        }
        if redundant == MAX_REDUNDANT_BLOCKS {
            return Err(RedError::TooManyBlocks);
        }
        let Some(header) = payload.get(pos..pos + REDUNDANT_HEADER_LEN) else {
            return Err(RedError::TruncatedHeader);
        };
        // The low 10 bits of the 4-byte header block are the block length.
        let block_len = (usize::from(header[2] & 0x03) << 8) | usize::from(header[3]);
        redundant_len += block_len;
        redundant += 1;
        pos += REDUNDANT_HEADER_LEN;
    }
}

/// Whether an Opus packet carries in-band FEC (LBRR data) for the frame before it.
///
/// RFC 6716: the TOC byte (§3.1) gives the mode, frame size and channels; SILK and hybrid
/// frames start with the VAD flags and the LBRR flag of each channel (§4.2.3), which the range
/// coder stores in the first bits of the frame's first byte. CELT-only packets never carry
/// LBRR. Packets this cannot read (code 3 with padding or variable sizes it does not follow,
/// truncated) count as without FEC.
pub fn opus_has_fec(packet: &[u8]) -> bool {
    let Some(&toc) = packet.first() else {
        return false;
    };
    let config = toc >> 3;
    // §3.1: configs 16–31 are CELT-only.
    if config >= 16 {
        return false;
    }
    // SILK frames per channel in one Opus frame: 40 and 60 ms SILK frames are 2 and 3 20-ms
    // SILK frames; 10 and 20 ms (and every hybrid config, 12–15) are one.
    let silk_frames: u32 = match (config < 12, config & 0x03) {
        (true, 2) => 2,
        (true, 3) => 3,
        _ => 1,
    };
    let channels: u32 = if toc & 0x04 != 0 { 2 } else { 1 };
    let Some(first_frame) = first_frame_offset(packet) else {
        return false;
    };
    let Some(&flags) = packet.get(first_frame) else {
        return false;
    };
    // Per channel: `silk_frames` VAD bits, then the LBRR bit (libwebrtc's PacketHasFec).
    (1..=channels).any(|channel| {
        let bit = channel * (silk_frames + 1) - 1;
        flags & (0x80 >> bit) != 0
    })
}

/// Where the first frame of an Opus packet starts (RFC 6716 §3.2), if the packet says.
fn first_frame_offset(packet: &[u8]) -> Option<usize> {
    let toc = *packet.first()?;
    match toc & 0x03 {
        // §3.2.2, §3.2.3: one frame, or two of equal size, right after the TOC.
        0 | 1 => Some(1),
        // §3.2.4: the first frame's length (1 or 2 bytes) comes first.
        2 => {
            let len_byte = *packet.get(1)?;
            Some(if len_byte < 252 { 2 } else { 3 })
        }
        // §3.2.5: frame count byte, optional padding length, and with VBR the lengths of all
        // frames but the last.
        _ => {
            let count_byte = *packet.get(1)?;
            let vbr = count_byte & 0x80 != 0;
            let padded = count_byte & 0x40 != 0;
            let frames = usize::from(count_byte & 0x3F);
            let mut pos = 2;
            if padded {
                // Each 255 means 254 bytes of padding and another length byte.
                loop {
                    let b = *packet.get(pos)?;
                    pos += 1;
                    if b != 255 {
                        break;
                    }
                }
            }
            if vbr {
                for _ in 1..frames {
                    let b = *packet.get(pos)?;
                    pos += if b < 252 { 1 } else { 2 };
                }
            }
            Some(pos)
        }
    }
}

/// The most loss reported to a publisher's encoder for its listeners: libwebrtc's Opus encoder
/// caps the packet loss rate it plans FEC for at 20 % (`kMaxPacketLossFraction`), so more
/// would only say the same thing louder.
pub const MAX_REPORTED_LOSS: f64 = 0.2;

/// The loss to report to a publisher's audio encoder: the worst of its own uplink loss and its
/// listeners' downlink loss, capped at [`MAX_REPORTED_LOSS`] (fractions, 0.0–1.0; unknown
/// counts as none).
pub fn reported_loss(uplink: Option<f64>, worst_listener: Option<f64>) -> f64 {
    // `f64::max` ignores a NaN operand: a broken report counts as none.
    let worst = uplink.unwrap_or(0.0).max(worst_listener.unwrap_or(0.0));
    worst.clamp(0.0, MAX_REPORTED_LOSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RED payload built by hand: one redundant block of `red` and the primary `primary`.
    fn red_packet(red: &[u8], primary: &[u8]) -> Vec<u8> {
        let offset: u16 = 960;
        let len = red.len() as u16;
        let mut out = vec![
            F_BIT | 111,
            (offset >> 6) as u8,
            (((offset & 0x3F) << 2) as u8) | ((len >> 8) as u8 & 0x03),
            (len & 0xFF) as u8,
            111,
        ];
        out.extend_from_slice(red);
        out.extend_from_slice(primary);
        out
    }

    #[test]
    fn primary_block_is_found_after_the_redundant_one() {
        let packet = red_packet(&[1, 2, 3], &[0x78, 9, 9, 9]);
        let p = primary(&packet).expect("valid");
        assert_eq!(p.pt, 111);
        assert_eq!(p.redundant, 1);
        assert_eq!(&packet[p.offset..], &[0x78, 9, 9, 9]);
    }

    #[test]
    fn str0m_encoded_red_agrees() {
        use str0m::rtp::{RedEncoder, RedundantBlock};
        let older = RedundantBlock {
            pt: 111,
            timestamp_offset: 1920,
            payload: vec![7; 70],
        };
        let old = RedundantBlock {
            pt: 111,
            timestamp_offset: 960,
            payload: vec![8; 80],
        };
        let packet = RedEncoder::encode(111, &[0x78, 1, 2], &[older, old]);
        let p = primary(&packet).expect("valid");
        assert_eq!((p.pt, p.redundant), (111, 2));
        assert_eq!(&packet[p.offset..], &[0x78, 1, 2]);
    }

    #[test]
    fn a_packet_with_only_the_primary_header_is_the_primary() {
        let packet = [111, 0x78, 1];
        assert_eq!(
            primary(&packet),
            Ok(RedPrimary {
                pt: 111,
                offset: 1,
                redundant: 0
            })
        );
    }

    #[test]
    fn lying_lengths_are_errors_not_panics() {
        // A redundant block claiming 1023 bytes in a 10-byte packet.
        let mut packet = red_packet(&[1, 2, 3], &[0x78]);
        packet[2] |= 0x03;
        packet[3] = 0xFF;
        assert!(matches!(
            primary(&packet),
            Err(RedError::BlocksTooLong { claimed: 1023, .. })
        ));
        assert_eq!(primary(&[]), Err(RedError::TruncatedHeader));
        assert_eq!(primary(&[F_BIT | 111, 0]), Err(RedError::TruncatedHeader));
        assert_eq!(primary(&[111]), Err(RedError::EmptyPrimary));
        assert_eq!(
            primary(&red_packet(&[1, 2, 3], &[])),
            Err(RedError::EmptyPrimary)
        );
        let endless = [F_BIT | 111, 0, 0, 0].repeat(MAX_REDUNDANT_BLOCKS + 1);
        assert_eq!(primary(&endless), Err(RedError::TooManyBlocks));
    }

    #[test]
    fn reported_loss_is_the_worst_link_capped() {
        assert_eq!(reported_loss(None, None), 0.0);
        assert_eq!(reported_loss(Some(0.01), Some(0.07)), 0.07);
        assert_eq!(reported_loss(Some(0.05), Some(0.02)), 0.05);
        assert_eq!(reported_loss(None, Some(0.6)), MAX_REPORTED_LOSS);
        assert_eq!(reported_loss(Some(f64::NAN), None), 0.0);
    }

    #[test]
    fn lbrr_flag_is_read_from_silk_and_hybrid_packets() {
        // Config 15 (hybrid FB 20 ms), mono, code 0: VAD bit 0x80, LBRR bit 0x40.
        assert!(opus_has_fec(&[0x78, 0xC0, 0]));
        assert!(!opus_has_fec(&[0x78, 0x80, 0]));
        // Config 1 (SILK NB 20 ms), stereo: second channel's LBRR bit is 0x80 >> 3.
        assert!(opus_has_fec(&[0x0C, 0x10, 0]));
        assert!(!opus_has_fec(&[0x0C, 0xA0, 0]));
        // Config 3 (SILK NB 60 ms): three VAD bits, then LBRR (0x10).
        assert!(opus_has_fec(&[0x18, 0x10, 0]));
        // Config 31 (CELT-only): never.
        assert!(!opus_has_fec(&[0xF8, 0xFF, 0xFF]));
        // Code 2: a 2-byte first length, then the frame.
        assert!(opus_has_fec(&[0x7A, 252, 1, 0x40]));
        // Code 3, VBR, padded by 2, three frames (two lengths).
        assert!(opus_has_fec(&[0x7B, 0xC3, 2, 10, 20, 0x40]));
        // Truncated or empty: no.
        assert!(!opus_has_fec(&[]));
        assert!(!opus_has_fec(&[0x78]));
        assert!(!opus_has_fec(&[0x7B, 0xC3, 255]));
    }
}
