//! Simulated ICE-TCP connections: a reliable, ordered byte stream per direction carrying
//! RFC 4571 frames (2-byte big-endian length prefix), delivered through the virtual clock and
//! split at seeded-random points on the way.
//!
//! [`SimWorld`](super::SimWorld) owns the connections. A peer's frame is prefixed and queued on
//! the upstream pipe; when it is due, everything due at that instant is concatenated (as a socket
//! read would find it) and re-split into chunks of random length — some of 1–3 bytes, so length
//! prefixes are split, some up to the maximum chunk, so several frames arrive in one chunk — and
//! each chunk goes to `Router::handle_tcp_data`. Now and then the tail of a delivery is held
//! back for up to a millisecond (a late segment), so a partial frame waits in the receiver
//! while other inputs are processed. The router's framed transmits travel the same
//! way downstream and are reassembled by [`Deframer`] before the peer sees them.
//!
//! Nothing is lost or reordered (TCP): impairment loss, reordering and bandwidth caps do not
//! apply; its delay and jitter do, never letting bytes overtake earlier ones.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::SessionId;
use crate::tcp::ConnId;

/// Counters of one direction of the simulated TCP connections (summed over connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpDirStats {
    /// Frames queued (one per datagram).
    pub frames: u64,
    /// Bytes queued, length prefixes included.
    pub bytes: u64,
    /// Chunks handed to the receiver.
    pub chunks: u64,
    /// Chunks that ended inside a length prefix (after its first byte).
    pub prefix_splits: u64,
    /// Chunks that ended inside a frame body.
    pub body_splits: u64,
    /// Chunks that completed two frames or more.
    pub coalesced_chunks: u64,
    /// Most frames completed by one chunk.
    pub max_frames_per_chunk: u64,
    /// Frames the receiving side's reassembly produced (equals `frames` when nothing is in
    /// flight).
    pub frames_reassembled: u64,
    /// Deliveries whose tail was held back to a later instant (a late segment), so the
    /// receiver holds a partial frame while other inputs go on.
    pub deferred_tails: u64,
}

impl TcpDirStats {
    pub(crate) fn add(&mut self, other: &TcpDirStats) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.chunks += other.chunks;
        self.prefix_splits += other.prefix_splits;
        self.body_splits += other.body_splits;
        self.coalesced_chunks += other.coalesced_chunks;
        self.max_frames_per_chunk = self.max_frames_per_chunk.max(other.max_frames_per_chunk);
        self.frames_reassembled += other.frames_reassembled;
        self.deferred_tails += other.deferred_tails;
    }
}

/// Counters of the simulated ICE-TCP connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections opened (`Router::tcp_accepted` succeeded).
    pub opened: u64,
    /// Connections the world closed because the peer left (`Router::tcp_closed`).
    pub closed: u64,
    /// Connections closed because the router returned an error from `handle_tcp_data`.
    pub reset: u64,
    /// Peer → router.
    pub up: TcpDirStats,
    /// Router → peer.
    pub down: TcpDirStats,
    /// Frames a peer sent on a connection that was closed (dropped).
    pub dropped_on_closed: u64,
    /// Router TCP transmits for a connection the world does not have open (dropped).
    pub unroutable: u64,
    /// Router TCP transmits whose destination is not the connection's remote address.
    pub misaddressed: u64,
}

/// Reassembles RFC 4571 frames from chunks split anywhere (the harness's own implementation,
/// independent of the router's).
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    /// Feeds one chunk; returns the frames it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 2 {
            let len = u16::from_be_bytes([self.buf[at], self.buf[at + 1]]) as usize;
            if self.buf.len() - at < 2 + len {
                break;
            }
            frames.push(self.buf[at + 2..at + 2 + len].to_vec());
            at += 2 + len;
        }
        self.buf.drain(..at);
        frames
    }

    /// Bytes of an incomplete frame held.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Prefixes a datagram with its RFC 4571 length.
pub(crate) fn frame(datagram: &[u8]) -> Vec<u8> {
    let len = match u16::try_from(datagram.len()) {
        Ok(len) => len,
        Err(_) => panic!(
            "a {}-byte datagram does not fit an RFC 4571 frame",
            datagram.len()
        ),
    };
    let mut out = Vec::with_capacity(datagram.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    out
}

/// One direction of a connection: bytes in flight in order, plus an observer that parses what
/// the receiver is handed (for the statistics and to check the framing).
#[derive(Debug, Default)]
pub(crate) struct Pipe {
    queue: VecDeque<(Instant, Vec<u8>)>,
    last_at: Option<Instant>,
    observer: Deframer,
    pub stats: TcpDirStats,
}

impl Pipe {
    /// Queues bytes sent at `now` to arrive after `delay` (never before earlier bytes).
    pub fn send(&mut self, bytes: Vec<u8>, frames: u64, now: Instant, delay: Duration) {
        let at = self
            .last_at
            .map_or(now + delay, |last| last.max(now + delay));
        self.last_at = Some(at);
        self.stats.frames += frames;
        self.stats.bytes += bytes.len() as u64;
        self.queue.push_back((at, bytes));
    }

    /// When the next bytes arrive.
    pub fn next_time(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// Everything that has arrived by `now`, as one buffer. One delivery in eight holds a
    /// random tail back until up to 1 ms later (never after bytes queued behind it).
    pub fn take_due(&mut self, now: Instant, rng: &mut fastrand::Rng) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, bytes)) = self.queue.pop_front() {
                match &mut out {
                    None => out = Some(bytes),
                    Some(buf) => buf.extend_from_slice(&bytes),
                }
            }
        }
        let mut buf = out?;
        if buf.len() > 1 && rng.u8(..8) == 0 {
            let tail = buf.split_off(rng.usize(1..buf.len()));
            let mut at = now + Duration::from_millis(1);
            if let Some((next, _)) = self.queue.front() {
                at = at.min(*next);
            }
            self.last_at = Some(self.last_at.map_or(at, |last| last.max(at)));
            self.queue.push_front((at, tail));
            self.stats.deferred_tails += 1;
        }
        Some(buf)
    }

    /// Records a chunk handed to the receiver; returns the frames it completed.
    pub fn observe(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let frames = self.observer.push(chunk);
        let n = frames.len() as u64;
        self.stats.chunks += 1;
        self.stats.frames_reassembled += n;
        if n >= 2 {
            self.stats.coalesced_chunks += 1;
        }
        self.stats.max_frames_per_chunk = self.stats.max_frames_per_chunk.max(n);
        match self.observer.pending() {
            0 => {}
            1 => self.stats.prefix_splits += 1,
            _ => self.stats.body_splits += 1,
        }
        frames
    }

    /// Drops everything in flight.
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// Splits `len` bytes into chunks of random length: a quarter of them 1–3 bytes, the rest
/// 1..=`max_chunk`.
pub(crate) fn chunk_lengths(rng: &mut fastrand::Rng, len: usize, max_chunk: usize) -> Vec<usize> {
    let max_chunk = max_chunk.max(1);
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = if rng.u8(..4) == 0 {
            rng.usize(1..=3)
        } else {
            rng.usize(1..=max_chunk)
        };
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// One simulated ICE-TCP connection between a peer (active side) and the router.
#[derive(Debug)]
pub(crate) struct SimTcpConn {
    pub session: SessionId,
    /// The peer's address (the router's `remote`).
    pub peer: SocketAddr,
    /// The router's passive TCP candidate (the router's `local`).
    pub router: SocketAddr,
    pub open: bool,
    pub up: Pipe,
    pub down: Pipe,
    pub rng: fastrand::Rng,
    /// Reassembles router frames for the peer.
    pub peer_deframer: Deframer,
}

impl SimTcpConn {
    pub fn new(
        conn: ConnId,
        session: SessionId,
        peer: SocketAddr,
        router: SocketAddr,
        seed: u64,
    ) -> Self {
        SimTcpConn {
            session,
            peer,
            router,
            open: true,
            up: Pipe::default(),
            down: Pipe::default(),
            rng: fastrand::Rng::with_seed(seed ^ conn.0.wrapping_mul(0xD6E8_FEB8_6659_FD93)),
            peer_deframer: Deframer::default(),
        }
    }

    pub fn next_time(&self) -> Option<Instant> {
        if !self.open {
            return None;
        }
        match (self.up.next_time(), self.down.next_time()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn close(&mut self) {
        self.open = false;
        self.up.clear();
        self.down.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deframer_reassembles_any_split() {
        let frames: Vec<Vec<u8>> = vec![vec![1; 5], vec![2; 1], vec![3; 300], vec![4; 2]];
        let stream: Vec<u8> = frames.iter().flat_map(|f| frame(f)).collect();
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut d = Deframer::default();
            let mut got = Vec::new();
            let mut at = 0;
            for n in chunk_lengths(&mut rng, stream.len(), 40) {
                got.extend(d.push(&stream[at..at + n]));
                at += n;
            }
            assert_eq!(got, frames, "seed {seed}");
            assert_eq!(d.pending(), 0);
        }
    }
}
