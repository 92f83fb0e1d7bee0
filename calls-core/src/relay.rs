//! Relay links: the wire format two routers speak to share one call's tracks.
//!
//! A call can span routers: several workers of one process, or several nodes. Each router
//! *exports* the tracks its own participants publish on every relay link of the call, and
//! *imports* the tracks the other end exports; an imported track is a published track like
//! any other (slots, top-N audio, simulcast layers, dynacast, NACK from each subscriber's send
//! buffer). The router does no I/O for it either: [`Router::relay_open`](crate::Router::relay_open)
//! opens a link, [`Output::Relay`](crate::Output::Relay) carries bytes for it and
//! [`Router::handle_relay`](crate::Router::handle_relay) takes bytes from it. How the bytes
//! travel is the embedder's business: a bounded channel between worker threads, QUIC
//! datagrams between nodes.
//!
//! ## Framing (version 1)
//! Every frame is one message, self-delimited by its transport (a channel item, a datagram):
//!
//! ```text
//! magic 0xCA | version 0x01 | type u8 | body
//! ```
//!
//! Integers are big-endian. Strings are a `u8` (RIDs, MIDs) or `u16` (user ids) length and
//! UTF-8 bytes. A RID is at most 8 bytes; a frame that breaks any of this is refused with a
//! [`FrameError`] by [`Frame::decode`], which never panics and never allocates.
//!
//! | type | frame | body |
//! |---|---|---|
//! | 1 | [`Frame::Member`] | session u64, muted u8, user str16 |
//! | 2 | [`Frame::MemberLeft`] | session u64 |
//! | 3 | [`Frame::Track`] | track u16, session u64, source u8, mid str8 |
//! | 4 | [`Frame::TrackEnd`] | track u16 |
//! | 5 | [`Frame::Media`] | track u16, flags u8, codec u8, pt u8, primary pt u8, seq u64, rtp time u32, audio level u8, rid str8, payload (the rest) |
//! | 6 | [`Frame::Level`] | track u16, audio level u8, flags u8 |
//! | 7 | [`Frame::KeyframeRequest`] | track u16, rid str8 |
//! | 8 | [`Frame::LayerDemand`] | track u16, count u8, rid str8 × count |
//! | 9 | [`Frame::Nack`] | track u16, seq u64, bitmask u16, rid str8 |
//! | 10 | [`Frame::Keepalive`] | (none) |
//!
//! `track` is a number the exporting router gives each track it exports on a link (see
//! [`Frame::Track`]); the frames that go the other way (keyframe requests, layer demand,
//! NACKs) name the exporter's number.

use std::fmt;

use str0m::media::Rid;

use crate::ids::{SessionId, TrackSource};

/// First byte of every relay frame.
pub const MAGIC: u8 = 0xCA;
/// The framing version this router speaks.
pub const VERSION: u8 = 1;
/// Magic, version and type.
const HEADER_LEN: usize = 3;
/// Longest RID (str0m's `Rid` holds 8 bytes).
const MAX_RID_LEN: usize = 8;
/// Most layers a [`Frame::LayerDemand`] can name.
pub const MAX_DEMANDED_LAYERS: usize = 8;
/// Largest payload a [`Frame::Media`] carries (an RTP payload never exceeds a datagram).
pub const MAX_MEDIA_PAYLOAD: usize = 1500;

/// One relay link, named by the embedder (unique per router).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link{}", self.0)
    }
}

/// A track number on one link, given by the exporting router.
pub type TrackNo = u16;

/// The codec of a relayed media packet (what the importer needs to map payload types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayCodec {
    /// Opus, 48 kHz.
    Opus,
    /// VP8, 90 kHz.
    Vp8,
    /// VP9, 90 kHz.
    Vp9,
    /// H.264, 90 kHz.
    H264,
    /// AV1, 90 kHz.
    Av1,
}

impl RelayCodec {
    fn as_u8(self) -> u8 {
        match self {
            RelayCodec::Opus => 1,
            RelayCodec::Vp8 => 2,
            RelayCodec::Vp9 => 3,
            RelayCodec::H264 => 4,
            RelayCodec::Av1 => 5,
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => RelayCodec::Opus,
            2 => RelayCodec::Vp8,
            3 => RelayCodec::Vp9,
            4 => RelayCodec::H264,
            5 => RelayCodec::Av1,
            _ => return None,
        })
    }

    /// The codec as str0m names it.
    pub fn to_str0m(self) -> str0m::format::Codec {
        use str0m::format::Codec;
        match self {
            RelayCodec::Opus => Codec::Opus,
            RelayCodec::Vp8 => Codec::Vp8,
            RelayCodec::Vp9 => Codec::Vp9,
            RelayCodec::H264 => Codec::H264,
            RelayCodec::Av1 => Codec::Av1,
        }
    }

    /// The relay code of a str0m codec (`None`: not relayed).
    pub fn from_str0m(codec: str0m::format::Codec) -> Option<Self> {
        use str0m::format::Codec;
        Some(match codec {
            Codec::Opus => RelayCodec::Opus,
            Codec::Vp8 => RelayCodec::Vp8,
            Codec::Vp9 => RelayCodec::Vp9,
            Codec::H264 => RelayCodec::H264,
            Codec::Av1 => RelayCodec::Av1,
            _ => return None,
        })
    }

    /// Its RTP clock rate.
    pub fn clock_rate(self) -> u32 {
        match self {
            RelayCodec::Opus => 48_000,
            _ => 90_000,
        }
    }
}

/// [`Frame::Media`] flag: the RTP marker bit.
pub const FLAG_MARKER: u8 = 1;
/// [`Frame::Media`] flag: the packet starts a keyframe (as the exporter read it).
pub const FLAG_KEYFRAME: u8 = 1 << 1;
/// [`Frame::Media`] and [`Frame::Level`] flag: `audio_level` is present.
pub const FLAG_LEVEL: u8 = 1 << 2;
/// [`Frame::Media`] and [`Frame::Level`] flag: the voice-activity bit of RFC 6464.
pub const FLAG_VOICE: u8 = 1 << 3;
/// [`Frame::Media`] flag: the payload is RED (RFC 2198) around `primary_pt`.
pub const FLAG_RED: u8 = 1 << 4;
const MEDIA_FLAGS: u8 = FLAG_MARKER | FLAG_KEYFRAME | FLAG_LEVEL | FLAG_VOICE | FLAG_RED;
const LEVEL_FLAGS: u8 = FLAG_LEVEL | FLAG_VOICE;

/// One media packet of an exported track, decrypted, with what the importer must know
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaFrame<'a> {
    /// The exporter's number for the track.
    pub track: TrackNo,
    /// [`FLAG_MARKER`], [`FLAG_KEYFRAME`], [`FLAG_LEVEL`], [`FLAG_VOICE`], [`FLAG_RED`].
    pub flags: u8,
    /// Its codec.
    pub codec: RelayCodec,
    /// The publisher's payload type (the importer maps it per subscriber, as for a local
    /// publisher).
    pub pt: u8,
    /// For RED: the payload type of the primary block's codec at the publisher.
    pub primary_pt: u8,
    /// The publisher's extended sequence number.
    pub seq: u64,
    /// The RTP timestamp.
    pub rtp_time: u32,
    /// RFC 6464 level (0 loudest … 127 silence), valid with [`FLAG_LEVEL`].
    pub audio_level: u8,
    /// Its simulcast layer.
    pub rid: Option<Rid>,
    /// The RTP payload.
    pub payload: &'a [u8],
}

/// One relay message (see the [module docs](self) for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame<'a> {
    /// A participant of the call on the sending router (joined, or its mute changed).
    Member {
        /// Its session (unique among the routers of a call).
        session: SessionId,
        /// Its microphone is muted.
        muted: bool,
        /// Its user.
        user: &'a str,
    },
    /// That participant left.
    MemberLeft {
        /// Its session.
        session: SessionId,
    },
    /// The sender exports a track: `session`'s `mid`, numbered `track` on this link.
    Track {
        /// Its number on this link.
        track: TrackNo,
        /// The publisher.
        session: SessionId,
        /// Microphone, camera or screen.
        source: TrackSource,
        /// The publisher's m-line.
        mid: &'a str,
    },
    /// The track ended.
    TrackEnd {
        /// Its number.
        track: TrackNo,
    },
    /// A media packet.
    Media(MediaFrame<'a>),
    /// An audio track's level, for a packet the exporter did not relay (its speaker is not
    /// among the call's loudest): the importer's speaker detection still hears it.
    Level {
        /// The track.
        track: TrackNo,
        /// RFC 6464 level.
        audio_level: u8,
        /// [`FLAG_VOICE`] or 0.
        flags: u8,
    },
    /// The importer needs a keyframe of this layer.
    KeyframeRequest {
        /// The exporter's track number.
        track: TrackNo,
        /// The layer.
        rid: Option<Rid>,
    },
    /// The layers of a simulcast track the importer wants (dynacast): the others may stop.
    LayerDemand {
        /// The exporter's track number.
        track: TrackNo,
        /// How many of `rids` count.
        count: u8,
        /// The wanted layers.
        rids: [Rid; MAX_DEMANDED_LAYERS],
    },
    /// The importer lost `seq` (and those of `bitmask`: bit i is `seq + 1 + i`) of a layer
    /// on the link: send them again if you still have them.
    Nack {
        /// The exporter's track number.
        track: TrackNo,
        /// The layer.
        rid: Option<Rid>,
        /// The first lost sequence number.
        seq: u64,
        /// The following ones lost.
        bitmask: u16,
    },
    /// Nothing to say; the link is alive.
    Keepalive,
}

/// Why [`Frame::decode`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than its fields.
    #[error("relay frame truncated")]
    Truncated,
    /// The first byte is not [`MAGIC`].
    #[error("not a relay frame (magic {0:#04x})")]
    BadMagic(u8),
    /// Another framing version.
    #[error("relay framing version {0} not supported")]
    Version(u8),
    /// An unknown frame type.
    #[error("unknown relay frame type {0}")]
    UnknownType(u8),
    /// A field holds a value it cannot (a codec, source or flag unknown, a RID too long, a
    /// string not UTF-8, a count too large).
    #[error("relay frame field `{0}` invalid")]
    Invalid(&'static str),
    /// Bytes after the last field.
    #[error("relay frame has trailing bytes")]
    Trailing,
}

/// A reader over a frame's bytes: every read checks its length.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn str8(&mut self, field: &'static str) -> Result<&'a str, FrameError> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| FrameError::Invalid(field))
    }

    fn str16(&mut self, field: &'static str) -> Result<&'a str, FrameError> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| FrameError::Invalid(field))
    }

    /// A RID: empty means none.
    fn rid(&mut self) -> Result<Option<Rid>, FrameError> {
        let s = self.str8("rid")?;
        if s.is_empty() {
            return Ok(None);
        }
        if s.len() > MAX_RID_LEN || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(FrameError::Invalid("rid"));
        }
        Ok(Some(Rid::from(s)))
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing)
        }
    }
}

fn source_to_u8(source: TrackSource) -> u8 {
    match source {
        TrackSource::Microphone => 1,
        TrackSource::Camera => 2,
        TrackSource::Screen => 3,
    }
}

fn source_from_u8(value: u8) -> Option<TrackSource> {
    Some(match value {
        1 => TrackSource::Microphone,
        2 => TrackSource::Camera,
        3 => TrackSource::Screen,
        _ => return None,
    })
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u8::MAX))];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

fn put_rid(out: &mut Vec<u8>, rid: Option<Rid>) {
    match rid {
        Some(rid) => put_str8(out, &rid),
        None => out.push(0),
    }
}

impl<'a> Frame<'a> {
    /// The frame's type byte.
    fn kind(&self) -> u8 {
        match self {
            Frame::Member { .. } => 1,
            Frame::MemberLeft { .. } => 2,
            Frame::Track { .. } => 3,
            Frame::TrackEnd { .. } => 4,
            Frame::Media(_) => 5,
            Frame::Level { .. } => 6,
            Frame::KeyframeRequest { .. } => 7,
            Frame::LayerDemand { .. } => 8,
            Frame::Nack { .. } => 9,
            Frame::Keepalive => 10,
        }
    }

    /// The encoded size, for one exact allocation.
    fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Member { user, .. } => 8 + 1 + 2 + user.len().min(usize::from(u16::MAX)),
                Frame::MemberLeft { .. } => 8,
                Frame::Track { mid, .. } => 2 + 8 + 1 + 1 + mid.len(),
                Frame::TrackEnd { .. } => 2,
                Frame::Media(m) => {
                    2 + 1 + 1 + 1 + 1 + 8 + 4 + 1 + 1 + MAX_RID_LEN + m.payload.len()
                }
                Frame::Level { .. } => 4,
                Frame::KeyframeRequest { .. } => 2 + 1 + MAX_RID_LEN,
                Frame::LayerDemand { count, .. } => 2 + 1 + usize::from(*count) * 9,
                Frame::Nack { .. } => 2 + 8 + 2 + 1 + MAX_RID_LEN,
                Frame::Keepalive => 0,
            }
    }

    /// Encodes the frame (one allocation of its exact size, or a little more).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[MAGIC, VERSION, self.kind()]);
        match self {
            Frame::Member {
                session,
                muted,
                user,
            } => {
                out.extend_from_slice(&session.0.to_be_bytes());
                out.push(u8::from(*muted));
                let user = &user.as_bytes()[..user.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&(user.len() as u16).to_be_bytes());
                out.extend_from_slice(user);
            }
            Frame::MemberLeft { session } => out.extend_from_slice(&session.0.to_be_bytes()),
            Frame::Track {
                track,
                session,
                source,
                mid,
            } => {
                out.extend_from_slice(&track.to_be_bytes());
                out.extend_from_slice(&session.0.to_be_bytes());
                out.push(source_to_u8(*source));
                put_str8(out, mid);
            }
            Frame::TrackEnd { track } => out.extend_from_slice(&track.to_be_bytes()),
            Frame::Media(m) => {
                out.extend_from_slice(&m.track.to_be_bytes());
                out.push(m.flags & MEDIA_FLAGS);
                out.push(m.codec.as_u8());
                out.push(m.pt);
                out.push(m.primary_pt);
                out.extend_from_slice(&m.seq.to_be_bytes());
                out.extend_from_slice(&m.rtp_time.to_be_bytes());
                out.push(m.audio_level);
                put_rid(out, m.rid);
                out.extend_from_slice(m.payload);
            }
            Frame::Level {
                track,
                audio_level,
                flags,
            } => {
                out.extend_from_slice(&track.to_be_bytes());
                out.push(*audio_level);
                out.push(*flags & LEVEL_FLAGS);
            }
            Frame::KeyframeRequest { track, rid } => {
                out.extend_from_slice(&track.to_be_bytes());
                put_rid(out, *rid);
            }
            Frame::LayerDemand { track, count, rids } => {
                out.extend_from_slice(&track.to_be_bytes());
                let count = usize::from(*count).min(MAX_DEMANDED_LAYERS);
                out.push(count as u8);
                for rid in &rids[..count] {
                    put_rid(out, Some(*rid));
                }
            }
            Frame::Nack {
                track,
                rid,
                seq,
                bitmask,
            } => {
                out.extend_from_slice(&track.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&bitmask.to_be_bytes());
                put_rid(out, *rid);
            }
            Frame::Keepalive => {}
        }
    }

    /// Decodes one frame, borrowing its strings and payload from `bytes`. Never panics.
    pub fn decode(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let mut r = Reader { bytes };
        let magic = r.u8()?;
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = r.u8()?;
        let frame = match kind {
            1 => {
                let session = SessionId(r.u64()?);
                let muted = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(FrameError::Invalid("muted")),
                };
                let user = r.str16("user")?;
                Frame::Member {
                    session,
                    muted,
                    user,
                }
            }
            2 => Frame::MemberLeft {
                session: SessionId(r.u64()?),
            },
            3 => {
                let track = r.u16()?;
                let session = SessionId(r.u64()?);
                let source = source_from_u8(r.u8()?).ok_or(FrameError::Invalid("source"))?;
                let mid = r.str8("mid")?;
                if mid.is_empty() || mid.len() > 16 {
                    return Err(FrameError::Invalid("mid"));
                }
                Frame::Track {
                    track,
                    session,
                    source,
                    mid,
                }
            }
            4 => Frame::TrackEnd { track: r.u16()? },
            5 => {
                let track = r.u16()?;
                let flags = r.u8()?;
                if flags & !MEDIA_FLAGS != 0 {
                    return Err(FrameError::Invalid("flags"));
                }
                let codec = RelayCodec::from_u8(r.u8()?).ok_or(FrameError::Invalid("codec"))?;
                let pt = r.u8()?;
                let primary_pt = r.u8()?;
                if pt > 127 || primary_pt > 127 {
                    return Err(FrameError::Invalid("pt"));
                }
                let seq = r.u64()?;
                let rtp_time = r.u32()?;
                let audio_level = r.u8()?;
                if audio_level > 127 {
                    return Err(FrameError::Invalid("audio_level"));
                }
                let rid = r.rid()?;
                let payload = r.take(r.bytes.len())?;
                if payload.len() > MAX_MEDIA_PAYLOAD {
                    return Err(FrameError::Invalid("payload"));
                }
                Frame::Media(MediaFrame {
                    track,
                    flags,
                    codec,
                    pt,
                    primary_pt,
                    seq,
                    rtp_time,
                    audio_level,
                    rid,
                    payload,
                })
            }
            6 => {
                let track = r.u16()?;
                let audio_level = r.u8()?;
                let flags = r.u8()?;
                if audio_level > 127 {
                    return Err(FrameError::Invalid("audio_level"));
                }
                if flags & !LEVEL_FLAGS != 0 {
                    return Err(FrameError::Invalid("flags"));
                }
                Frame::Level {
                    track,
                    audio_level,
                    flags,
                }
            }
            7 => Frame::KeyframeRequest {
                track: r.u16()?,
                rid: r.rid()?,
            },
            8 => {
                let track = r.u16()?;
                let count = r.u8()?;
                if usize::from(count) > MAX_DEMANDED_LAYERS {
                    return Err(FrameError::Invalid("count"));
                }
                let mut rids = [Rid::from(""); MAX_DEMANDED_LAYERS];
                for slot in rids.iter_mut().take(usize::from(count)) {
                    *slot = r.rid()?.ok_or(FrameError::Invalid("rid"))?;
                }
                Frame::LayerDemand { track, count, rids }
            }
            9 => {
                let track = r.u16()?;
                let seq = r.u64()?;
                let bitmask = r.u16()?;
                let rid = r.rid()?;
                Frame::Nack {
                    track,
                    rid,
                    seq,
                    bitmask,
                }
            }
            10 => Frame::Keepalive,
            other => return Err(FrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame<'_>) {
        let bytes = frame.encode();
        assert!(bytes.len() <= frame.encoded_len(), "{frame:?}");
        assert_eq!(Frame::decode(&bytes), Ok(frame));
    }

    #[test]
    fn every_frame_type_round_trips() {
        let mut rids = [Rid::from(""); MAX_DEMANDED_LAYERS];
        rids[0] = Rid::from("q");
        rids[1] = Rid::from("h");
        roundtrip(Frame::Member {
            session: SessionId(7),
            muted: true,
            user: "alice",
        });
        roundtrip(Frame::MemberLeft {
            session: SessionId(u64::MAX),
        });
        roundtrip(Frame::Track {
            track: 3,
            session: SessionId(9),
            source: TrackSource::Camera,
            mid: "1",
        });
        roundtrip(Frame::TrackEnd { track: 3 });
        roundtrip(Frame::Media(MediaFrame {
            track: 3,
            flags: FLAG_MARKER | FLAG_KEYFRAME,
            codec: RelayCodec::Vp8,
            pt: 96,
            primary_pt: 0,
            seq: 1 << 40,
            rtp_time: 90_000,
            audio_level: 0,
            rid: Some(Rid::from("f")),
            payload: &[1, 2, 3],
        }));
        roundtrip(Frame::Level {
            track: 1,
            audio_level: 30,
            flags: FLAG_VOICE,
        });
        roundtrip(Frame::KeyframeRequest {
            track: 2,
            rid: None,
        });
        roundtrip(Frame::LayerDemand {
            track: 2,
            count: 2,
            rids,
        });
        roundtrip(Frame::Nack {
            track: 2,
            rid: Some(Rid::from("h")),
            seq: 100,
            bitmask: 0b101,
        });
        roundtrip(Frame::Keepalive);
    }

    #[test]
    fn malformed_frames_are_refused_not_panicked_on() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Truncated));
        assert_eq!(
            Frame::decode(&[0x80, 1, 10]),
            Err(FrameError::BadMagic(0x80))
        );
        assert_eq!(Frame::decode(&[MAGIC, 2, 10]), Err(FrameError::Version(2)));
        assert_eq!(
            Frame::decode(&[MAGIC, 1, 99]),
            Err(FrameError::UnknownType(99))
        );
        assert_eq!(Frame::decode(&[MAGIC, 1, 10, 0]), Err(FrameError::Trailing));
        assert_eq!(Frame::decode(&[MAGIC, 1, 4, 0]), Err(FrameError::Truncated));
        // A RID longer than 8 bytes.
        let mut bad = vec![MAGIC, 1, 7, 0, 1, 9];
        bad.extend_from_slice(b"abcdefghi");
        assert_eq!(Frame::decode(&bad), Err(FrameError::Invalid("rid")));
        // Every prefix of a valid media frame is refused.
        let media = Frame::Media(MediaFrame {
            track: 1,
            flags: 0,
            codec: RelayCodec::Opus,
            pt: 111,
            primary_pt: 0,
            seq: 5,
            rtp_time: 960,
            audio_level: 127,
            rid: None,
            payload: &[],
        })
        .encode();
        for n in 0..media.len() {
            assert!(Frame::decode(&media[..n]).is_err(), "prefix {n}");
        }
    }
}
