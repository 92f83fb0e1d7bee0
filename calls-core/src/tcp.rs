//! ICE-TCP: RFC 4571 framing. Each accepted TCP connection carries 2-byte length-prefixed
//! frames; every frame is a datagram (STUN, DTLS, RTP/RTCP) for the same demux as UDP.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::demux::MAX_DATAGRAM_BYTES;

/// An accepted TCP connection, numbered by the embedder (unique per router while open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp{}", self.0)
    }
}

/// Why the router wants a TCP connection closed. After any of these the router has forgotten
/// the connection; the embedder closes the socket.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TcpError {
    /// `handle_tcp_data`/`tcp_closed` for a connection never announced with `tcp_accepted`.
    #[error("unknown TCP connection {0}")]
    UnknownConnection(ConnId),
    /// `tcp_accepted` twice for the same id.
    #[error("TCP connection {0} already exists")]
    ConnectionExists(ConnId),
    /// A frame longer than any valid datagram: not ICE-TCP, or an attack.
    #[error("TCP connection {conn} announced a {len}-byte frame (max {max})")]
    FrameTooLarge {
        /// The connection.
        conn: ConnId,
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Reassembles RFC 4571 frames from a byte stream split anywhere. Holds at most one partial
/// frame (≤ 2 + `MAX_DATAGRAM_BYTES` bytes); complete frames in the input are passed on
/// without copying. The router uses it per accepted connection; clients of the port (the load
/// tester's ICE-TCP participants) use it for the server's stream.
#[derive(Debug, Default)]
pub struct Framer {
    partial: Vec<u8>,
}

impl Framer {
    /// Feeds bytes; calls `on_frame` for each complete frame. Returns the announced length of
    /// an oversized frame as an error (the stream cannot be resynchronised after that).
    pub fn push(&mut self, mut input: &[u8], mut on_frame: impl FnMut(&[u8])) -> Result<(), usize> {
        while !input.is_empty() {
            if self.partial.is_empty() && input.len() >= 2 {
                let len = frame_len(input[0], input[1])?;
                if input.len() >= 2 + len {
                    if len > 0 {
                        on_frame(&input[2..2 + len]);
                    }
                    input = &input[2 + len..];
                    continue;
                }
            }
            // A partial frame: keep exactly what completes its header, then its body.
            let wanted = if self.partial.len() < 2 {
                2 - self.partial.len()
            } else {
                2 + frame_len(self.partial[0], self.partial[1])? - self.partial.len()
            };
            let take = wanted.min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() >= 2 {
                let len = frame_len(self.partial[0], self.partial[1])?;
                if self.partial.len() == 2 + len {
                    if len > 0 {
                        on_frame(&self.partial[2..]);
                    }
                    self.partial.clear();
                }
            }
        }
        Ok(())
    }

    /// Bytes of an incomplete frame held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

fn frame_len(hi: u8, lo: u8) -> Result<usize, usize> {
    let len = u16::from_be_bytes([hi, lo]) as usize;
    if len > MAX_DATAGRAM_BYTES {
        Err(len)
    } else {
        Ok(len)
    }
}

/// Prefixes a datagram with its RFC 4571 length.
pub(crate) fn frame(datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(datagram.len() + 2);
    out.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    out.extend_from_slice(datagram);
    out
}

/// One accepted connection.
#[derive(Debug)]
pub(crate) struct TcpConn {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub framer: Framer,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frames: &[&[u8]]) -> Vec<u8> {
        frames.iter().flat_map(|f| frame(f)).collect()
    }

    #[test]
    fn frames_survive_a_split_at_every_possible_point() {
        let a: Vec<u8> = (0..100).collect();
        let b: Vec<u8> = vec![7; 1];
        let c: Vec<u8> = (0..=255).cycle().take(1500).collect();
        let bytes = stream(&[&a, &b, &c]);
        for first in 0..=bytes.len() {
            for second in first..=bytes.len() {
                // Three chunks: [..first], [first..second], [second..].
                if second - first > 3 && second != bytes.len() && first % 7 != 0 {
                    continue; // keep the quadratic sweep fast; every single split point is covered
                }
                let mut framer = Framer::default();
                let mut got: Vec<Vec<u8>> = Vec::new();
                for chunk in [&bytes[..first], &bytes[first..second], &bytes[second..]] {
                    framer.push(chunk, |f| got.push(f.to_vec())).unwrap();
                }
                assert_eq!(
                    got,
                    vec![a.clone(), b.clone(), c.clone()],
                    "split {first}/{second}"
                );
            }
        }
    }

    #[test]
    fn byte_at_a_time_works_and_holds_at_most_one_frame() {
        let c: Vec<u8> = vec![0x80; MAX_DATAGRAM_BYTES];
        let bytes = stream(&[&c, &c]);
        let mut framer = Framer::default();
        let mut count = 0;
        for byte in &bytes {
            framer
                .push(std::slice::from_ref(byte), |_| count += 1)
                .unwrap();
            assert!(framer.partial.len() <= MAX_DATAGRAM_BYTES + 2);
        }
        assert_eq!(count, 2);
    }

    #[test]
    fn oversized_frames_are_refused_even_when_split() {
        let mut framer = Framer::default();
        assert_eq!(framer.push(&[0xff, 0xff, 1, 2, 3], |_| {}), Err(0xffff));
        let mut framer = Framer::default();
        framer.push(&[0x10], |_| {}).unwrap();
        assert_eq!(framer.push(&[0x00], |_| {}), Err(0x1000));
    }
}
