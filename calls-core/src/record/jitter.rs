//! The reorder buffer of one recorded source: packets in, packets out in sequence order.
//!
//! A ring indexed by extended sequence number (allocated once per recorded source). A missing
//! number is waited for until the packet after it has waited `max_delay` (or the ring is half
//! full); then it is counted lost and skipped. Packets older than what was released, and
//! duplicates, are dropped and counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{RecPacket, SenderClock};

/// Packets a ring holds: at 1.5 Mbit/s of ~1100-byte packets, about 1.5 s of video — far
/// more than [`VIDEO_REORDER`](super::VIDEO_REORDER) keeps.
const RING: usize = 256;

/// One packet waiting in the buffer.
#[derive(Debug, Clone)]
pub(crate) struct Buffered {
    pub seq: u64,
    pub timestamp: u32,
    pub marker: bool,
    pub keyframe: bool,
    pub payload: Arc<[u8]>,
    /// Where the codec payload starts in `payload`.
    pub offset: u16,
    pub arrival: Instant,
    pub sender: Option<SenderClock>,
}

#[derive(Debug)]
pub(crate) struct ReorderBuffer {
    ring: Vec<Option<Buffered>>,
    max_delay: Duration,
    /// The next sequence number to release.
    next: Option<u64>,
    held: usize,
    /// Since when the oldest held packet has waited behind a missing one.
    waiting_since: Option<Instant>,
    lost: u64,
}

impl ReorderBuffer {
    pub fn new(max_delay: Duration) -> Self {
        ReorderBuffer {
            ring: Vec::new(),
            max_delay,
            next: None,
            held: 0,
            waiting_since: None,
            lost: 0,
        }
    }

    /// Packets lost, late or duplicated so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Forgets everything held and the numbering (a new stream follows).
    pub fn reset(&mut self) {
        self.ring.iter_mut().for_each(|slot| *slot = None);
        self.next = None;
        self.held = 0;
        self.waiting_since = None;
    }

    /// Whether `seq` fits the ring now; if not, [`release`](Self::release) everything first
    /// (a gap longer than the ring: whatever waits behind it goes out).
    pub fn fits(&self, seq: u64) -> bool {
        self.next.is_none_or(|next| seq < next + RING as u64)
    }

    pub fn push(&mut self, packet: RecPacket<'_>) {
        if self.ring.is_empty() {
            self.ring.resize(RING, None);
        }
        let next = *self.next.get_or_insert(packet.seq);
        if packet.seq < next {
            self.lost += 1; // too late: its place was given up, or a duplicate
            return;
        }
        if !self.fits(packet.seq) {
            // A jump far ahead (a long outage, a new numbering) with the ring flushed (the
            // caller's part); anything still held is given up.
            self.lost += (packet.seq - next).min(u64::from(u32::MAX)) + self.held as u64;
            self.reset();
            self.next = Some(packet.seq);
        }
        let index = (packet.seq % RING as u64) as usize;
        if self.ring[index].is_some() {
            self.lost += 1; // a duplicate
            return;
        }
        let Ok(offset) = u16::try_from(packet.offset) else {
            return;
        };
        self.ring[index] = Some(Buffered {
            seq: packet.seq,
            timestamp: packet.timestamp,
            marker: packet.marker,
            keyframe: packet.keyframe,
            payload: packet.payload.clone(),
            offset,
            arrival: packet.arrival,
            sender: packet.sender,
        });
        self.held += 1;
        // Held behind a missing packet (unless released at once): the wait counts from the
        // oldest packet held.
        self.waiting_since.get_or_insert(packet.arrival);
    }

    /// Appends what may go out now, in order (`flush`: everything held).
    pub fn release(&mut self, now: Instant, flush: bool, out: &mut Vec<Buffered>) {
        let Some(mut next) = self.next else {
            return;
        };
        while self.held > 0 {
            let index = (next % RING as u64) as usize;
            if let Some(p) = self.ring[index].take() {
                self.held -= 1;
                next += 1;
                out.push(p);
                continue;
            }
            // `next` is missing: wait for it, up to `max_delay` after the first held packet
            // arrived behind it.
            let since = *self.waiting_since.get_or_insert(now);
            let give_up = flush
                || now.saturating_duration_since(since) >= self.max_delay
                || self.held >= RING / 2;
            if !give_up {
                break;
            }
            self.lost += 1;
            next += 1;
        }
        if self.held == 0 {
            self.waiting_since = None;
        }
        self.next = Some(next);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;

    fn packet(seq: u64, payload: &Arc<[u8]>, at: Instant) -> RecPacket<'_> {
        RecPacket {
            seq,
            timestamp: seq as u32 * 960,
            marker: false,
            payload,
            offset: 0,
            keyframe: false,
            rid: None,
            sender: None,
            arrival: at,
        }
    }

    fn seqs(out: &[Buffered]) -> Vec<u64> {
        out.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn reordered_packets_come_out_in_order() {
        let t0 = Instant::now();
        let data: Arc<[u8]> = Arc::from(&[1u8, 2, 3][..]);
        let mut buffer = ReorderBuffer::new(Duration::from_millis(100));
        let mut out = Vec::new();
        for seq in [10, 12, 11, 13] {
            buffer.push(packet(seq, &data, t0));
            buffer.release(t0, false, &mut out);
        }
        assert_eq!(seqs(&out), [10, 11, 12, 13]);
        assert_eq!(buffer.lost(), 0);
    }

    #[test]
    fn a_missing_packet_is_waited_for_then_given_up() {
        let t0 = Instant::now();
        let data: Arc<[u8]> = Arc::from(&[1u8][..]);
        let mut buffer = ReorderBuffer::new(Duration::from_millis(100));
        let mut out = Vec::new();
        buffer.push(packet(1, &data, t0));
        buffer.push(packet(3, &data, t0));
        buffer.release(t0, false, &mut out);
        assert_eq!(seqs(&out), [1]);
        buffer.release(t0 + Duration::from_millis(50), false, &mut out);
        assert_eq!(seqs(&out), [1]);
        buffer.release(t0 + Duration::from_millis(100), false, &mut out);
        assert_eq!(seqs(&out), [1, 3]);
        assert_eq!(buffer.lost(), 1);
        // 2 arrives after all: too late.
        buffer.push(packet(2, &data, t0 + Duration::from_millis(120)));
        assert_eq!(buffer.lost(), 2);
    }

    #[test]
    fn a_jump_far_ahead_starts_over_without_panicking() {
        let t0 = Instant::now();
        let data: Arc<[u8]> = Arc::from(&[1u8][..]);
        let mut buffer = ReorderBuffer::new(Duration::from_millis(100));
        let mut out = Vec::new();
        buffer.push(packet(5, &data, t0));
        buffer.push(packet(7, &data, t0));
        assert!(!buffer.fits(1_000_000));
        buffer.release(t0, true, &mut out);
        buffer.push(packet(1_000_000, &data, t0));
        buffer.release(t0, true, &mut out);
        assert_eq!(seqs(&out), [5, 7, 1_000_000]);
        out.clear();
        for seq in 1_000_001..1_000_000 + 3 * RING as u64 {
            buffer.push(packet(seq, &data, t0));
            buffer.release(t0, false, &mut out);
        }
        assert_eq!(out.len(), 3 * RING - 1);
    }
}
