//! What two nodes say on their relay connection, besides the relay frames themselves.
//!
//! **The control stream** (one bidirectional QUIC stream, opened by the dialer) carries
//! messages, each a `u32` big-endian length and then the message; a length above
//! [`MAX_MESSAGE`] ends the connection (nothing that large is ever sent). The first byte of a
//! message is its type:
//!
//! | type | message | body |
//! |---|---|---|
//! | 1 | [`Msg::Hello`] | magic `CALLSRLY`, version u8, node u8, incarnation u64, HMAC-SHA256 (32 bytes) |
//! | 2 | [`Msg::Announce`] | count u8, worker u8 × count, call (the rest, UTF-8) |
//! | 3 | [`Msg::Open`] | channel u32, dialer's worker u8, other worker u8, call (the rest) |
//! | 4 | [`Msg::Close`] | channel u32 |
//! | 5 | [`Msg::Frame`] | channel u32, relay frame (the rest) |
//! | 6 | [`Msg::Synced`] | (none) |
//! | 7 | [`Msg::Reset`] | (none) |
//!
//! **Datagrams** carry one relay frame each: channel u32, then the frame (`calls_core::relay`).
//!
//! A *channel* is one relay link between a worker here and a worker there, numbered by the
//! leader of the pair of nodes (the lower node id). Both ends name it in every frame.

use bytes::{BufMut, Bytes, BytesMut};
use calls_core::CallId;

/// Largest control-stream message: a relay `Member` frame with the longest user id
/// (65,535 bytes) fits, with room.
pub const MAX_MESSAGE: usize = 128 * 1024;
/// The channel number in front of a frame.
pub const CHANNEL_LEN: usize = 4;
/// The length prefix of a control-stream message.
pub const LENGTH_LEN: usize = 4;
/// First bytes of a hello.
pub const HELLO_MAGIC: &[u8; 8] = b"CALLSRLY";
/// The node protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest call id a message may carry (the HTTP side refuses longer ones).
const MAX_CALL_LEN: usize = 1024;

/// The first message each side sends: who it is, and the proof that it holds the secret
/// (`auth.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: u8,
    /// A random number per process: a peer that restarted has a new one.
    pub incarnation: u64,
    pub mac: [u8; 32],
}

/// One control-stream message (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    /// The sender's workers that have participants of `call` now (none: the call left it).
    Announce {
        call: CallId,
        workers: Vec<u8>,
    },
    /// The leader opened channel `chan` between its worker `leader_worker` and the
    /// receiver's `follower_worker` for `call`.
    Open {
        chan: u32,
        leader_worker: u8,
        follower_worker: u8,
        call: CallId,
    },
    /// Channel `chan` is closed.
    Close {
        chan: u32,
    },
    /// A relay frame that must not be lost (or did not fit in a datagram).
    Frame {
        chan: u32,
        frame: Bytes,
    },
    /// The sender's announcements (and, from the leader, its open channels) after connecting
    /// are complete: what it did not repeat is gone.
    Synced,
    /// The sender has no channel with the receiver (it is new, restarted, or gave the receiver
    /// up as gone): the receiver closes all of its channels with the sender. First, when sent.
    Reset,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("message too short")]
    Truncated,
    #[error("bad hello")]
    BadHello,
    #[error("call id is not UTF-8 or too long")]
    BadCall,
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello(_) => 1,
            Msg::Announce { .. } => 2,
            Msg::Open { .. } => 3,
            Msg::Close { .. } => 4,
            Msg::Frame { .. } => 5,
            Msg::Synced => 6,
            Msg::Reset => 7,
        }
    }

    /// Appends the message with its length prefix.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        out.put_u8(self.kind());
        match self {
            Msg::Hello(h) => {
                out.put_slice(HELLO_MAGIC);
                out.put_u8(PROTOCOL_VERSION);
                out.put_u8(h.node);
                out.put_u64(h.incarnation);
                out.put_slice(&h.mac);
            }
            Msg::Announce { call, workers } => {
                let n = workers.len().min(usize::from(u8::MAX));
                out.put_u8(n as u8);
                out.put_slice(&workers[..n]);
                out.put_slice(call.as_str().as_bytes());
            }
            Msg::Open {
                chan,
                leader_worker,
                follower_worker,
                call,
            } => {
                out.put_u32(*chan);
                out.put_u8(*leader_worker);
                out.put_u8(*follower_worker);
                out.put_slice(call.as_str().as_bytes());
            }
            Msg::Close { chan } => out.put_u32(*chan),
            Msg::Frame { chan, frame } => {
                out.put_u32(*chan);
                out.put_slice(frame);
            }
            Msg::Synced | Msg::Reset => {}
        }
        let len = (out.len() - start - LENGTH_LEN) as u32;
        out[start..start + LENGTH_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one message (without its length prefix). A frame's bytes are a slice of
    /// `body`, not a copy.
    pub fn decode(body: &Bytes) -> Result<Msg, WireError> {
        let (&kind, rest) = body.split_first().ok_or(WireError::Empty)?;
        let u32_at = |at: usize| -> Result<u32, WireError> {
            rest.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or(WireError::Truncated)
        };
        match kind {
            1 => {
                if rest.len() != 8 + 1 + 1 + 8 + 32 || &rest[..8] != HELLO_MAGIC {
                    return Err(WireError::BadHello);
                }
                if rest[8] != PROTOCOL_VERSION {
                    return Err(WireError::BadHello);
                }
                let mut incarnation = [0u8; 8];
                incarnation.copy_from_slice(&rest[10..18]);
                let mut mac = [0u8; 32];
                mac.copy_from_slice(&rest[18..50]);
                Ok(Msg::Hello(Hello {
                    node: rest[9],
                    incarnation: u64::from_be_bytes(incarnation),
                    mac,
                }))
            }
            2 => {
                let (&n, rest) = rest.split_first().ok_or(WireError::Truncated)?;
                let n = usize::from(n);
                let workers = rest.get(..n).ok_or(WireError::Truncated)?.to_vec();
                Ok(Msg::Announce {
                    call: call(&rest[n..])?,
                    workers,
                })
            }
            3 => {
                let chan = u32_at(0)?;
                let workers = rest.get(4..6).ok_or(WireError::Truncated)?;
                Ok(Msg::Open {
                    chan,
                    leader_worker: workers[0],
                    follower_worker: workers[1],
                    call: call(&rest[6..])?,
                })
            }
            4 if rest.len() == 4 => Ok(Msg::Close { chan: u32_at(0)? }),
            5 => Ok(Msg::Frame {
                chan: u32_at(0)?,
                frame: body.slice(1 + CHANNEL_LEN..),
            }),
            6 if rest.is_empty() => Ok(Msg::Synced),
            7 if rest.is_empty() => Ok(Msg::Reset),
            4 | 6 | 7 => Err(WireError::Truncated),
            other => Err(WireError::UnknownType(other)),
        }
    }
}

fn call(bytes: &[u8]) -> Result<CallId, WireError> {
    if bytes.is_empty() || bytes.len() > MAX_CALL_LEN {
        return Err(WireError::BadCall);
    }
    std::str::from_utf8(bytes)
        .map(CallId::from)
        .map_err(|_| WireError::BadCall)
}

/// A datagram's channel and frame (a slice of `datagram`, not a copy); `None` if it is too
/// short to hold a channel and a frame header.
pub fn split_datagram(datagram: &Bytes) -> Option<(u32, Bytes)> {
    let chan = datagram
        .get(..CHANNEL_LEN)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)?;
    (datagram.len() > CHANNEL_LEN + 2).then(|| (chan, datagram.slice(CHANNEL_LEN..)))
}

/// Builds datagrams (channel + frame) out of one big buffer, so that a packet costs a copy,
/// not an allocation: each datagram is split off the front, and the buffer is renewed when
/// what is left cannot hold the next one (the old one is freed when its last datagram is).
#[derive(Debug)]
pub struct DatagramArena {
    buf: BytesMut,
}

/// Bytes allocated at a time for datagrams (about 50 video packets).
const ARENA_BYTES: usize = 64 * 1024;

impl Default for DatagramArena {
    fn default() -> Self {
        DatagramArena {
            buf: BytesMut::with_capacity(ARENA_BYTES),
        }
    }
}

impl DatagramArena {
    /// `chan` and `frame` as one datagram.
    pub fn datagram(&mut self, chan: u32, frame: &[u8]) -> Bytes {
        let len = CHANNEL_LEN + frame.len();
        if self.buf.capacity() - self.buf.len() < len {
            self.buf = BytesMut::with_capacity(ARENA_BYTES.max(len));
        }
        self.buf.put_u32(chan);
        self.buf.put_slice(frame);
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: Msg) {
        let mut out = BytesMut::new();
        msg.encode(&mut out);
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        let body = out.freeze().slice(4..);
        assert_eq!(Msg::decode(&body), Ok(msg));
    }

    #[test]
    fn every_message_round_trips() {
        roundtrip(Msg::Hello(Hello {
            node: 7,
            incarnation: 0xdead_beef_0102_0304,
            mac: [9; 32],
        }));
        roundtrip(Msg::Announce {
            call: CallId::from("standup"),
            workers: vec![0, 3],
        });
        roundtrip(Msg::Announce {
            call: CallId::from("gone"),
            workers: vec![],
        });
        roundtrip(Msg::Open {
            chan: 42,
            leader_worker: 1,
            follower_worker: 0,
            call: CallId::from("standup"),
        });
        roundtrip(Msg::Close { chan: 42 });
        roundtrip(Msg::Frame {
            chan: 3,
            frame: Bytes::from_static(&[0xCA, 1, 10]),
        });
        roundtrip(Msg::Synced);
        roundtrip(Msg::Reset);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let mut rng = fastrand::Rng::with_seed(14);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if !bytes.is_empty() {
                bytes[0] = rng.u8(0..8);
            }
            let _ = Msg::decode(&Bytes::from(bytes.clone()));
            let _ = split_datagram(&Bytes::from(bytes));
        }
        assert_eq!(Msg::decode(&Bytes::new()), Err(WireError::Empty));
        assert_eq!(
            Msg::decode(&Bytes::from_static(&[3, 0, 0])),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Msg::decode(&Bytes::from_static(&[2, 0, 0xff, 0xfe])),
            Err(WireError::BadCall)
        );
    }

    #[test]
    fn datagrams_share_one_buffer() {
        let mut arena = DatagramArena::default();
        let a = arena.datagram(1, &[0xCA, 1, 5, 7]);
        let b = arena.datagram(2, &[0xCA, 1, 10]);
        assert_eq!(
            split_datagram(&a),
            Some((1, Bytes::from_static(&[0xCA, 1, 5, 7])))
        );
        assert_eq!(
            split_datagram(&b),
            Some((2, Bytes::from_static(&[0xCA, 1, 10])))
        );
        assert_eq!(
            split_datagram(&Bytes::from_static(&[0, 0, 0, 1, 0xCA])),
            None
        );
        // Thousands of datagrams: the arena renews itself instead of growing.
        for i in 0..10_000u32 {
            let d = arena.datagram(i, &[0u8; 1200]);
            assert_eq!(d.len(), 1204);
        }
        assert!(arena.buf.capacity() <= ARENA_BYTES);
    }
}
