//! Receive slots: the fixed set of router→client m-lines a subscriber receives on (a few audio,
//! the camera tiles it shows, one screen), and what each one carries now.
//!
//! A slot is one send stream (one SSRC and RTX SSRC for its life) with one [`Rewriter`] and one
//! [`Vp8Munger`]: whichever publisher track it carries, the subscriber sees one continuous
//! stream. A source change is the same keyframe-gated switch as a simulcast layer change (video)
//! or an immediate resync (audio). The mapping (slot → publisher) lives in [`Slot::current`] and
//! [`Slot::next`]; the router tells the client before the first packet of a new source.

use std::time::{Duration, Instant};

use str0m::media::{Mid, Pt};
use str0m::rtp::Ssrc;

use crate::call::TrackKey;
use crate::forward::{Rewriter, Vp8Munger};
use crate::session::Selection;
use crate::signal::SlotKind;

/// An audio slot whose source sent nothing for this long may be given to another speaker even
/// if its source is still among the forwarded ones (longer than Opus DTX's 400 ms between
/// comfort-noise packets, so a pausing talker keeps its slot).
pub(crate) const AUDIO_SLOT_STALE: Duration = Duration::from_millis(1000);

/// One publisher track on a slot.
///
/// In declaration order (`repr(C)`): what every forwarded packet reads first, next to the
/// [`Slot`] fields before it (see there).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Feed {
    pub key: TrackKey,
    /// Publisher payload type → this session's (filled lazily).
    pub pt_map: PtMap,
    /// Video: which layer of the track this slot forwards.
    pub sel: Selection,
}

/// A feed's payload type mappings, kept inside the slot: a publisher sends one to three
/// types on a track (Opus and RED; a video codec), and a heap list would be one more cache
/// line to fetch per forwarded packet and listener. A publisher with more types than this
/// has the others worked out per packet (still correct, only slower).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PtMap([Option<PtMapping>; 4]);

impl PtMap {
    /// The mapping of the publisher's payload type `pt`, if known.
    pub fn get(&self, pt: Pt) -> Option<PtMapping> {
        self.0.iter().flatten().find(|m| m.publisher == pt).copied()
    }

    /// Remembers `mapping` (while there is room).
    pub fn insert(&mut self, mapping: PtMapping) {
        if let Some(free) = self.0.iter_mut().find(|m| m.is_none()) {
            *free = Some(mapping);
        }
    }
}

/// How one publisher payload type goes out on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PtMapping {
    /// The publisher's payload type.
    pub publisher: Pt,
    /// The subscriber's payload type for it.
    pub subscriber: Pt,
    /// The publisher's type is RED and the subscriber gets the primary Opus block only (it did
    /// not negotiate RED, or its Opus payload type differs from the one inside the blocks).
    pub strip_red: bool,
}

impl Feed {
    pub fn new(key: TrackKey) -> Self {
        Feed {
            key,
            sel: Selection::default(),
            pt_map: PtMap::default(),
        }
    }
}

/// One receive slot of a subscriber.
///
/// In declaration order (`repr(C)`), the fields every forwarded packet reads first: the slot's
/// kind, state and SSRC, then its current source's key and payload types. A packet goes to
/// hundreds of listeners, each slot in its own cache line; finding the slot that carries a
/// source reads one line per slot, not two or three.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Slot {
    pub kind: SlotKind,
    /// Negotiated `sendonly`; `false` once a smaller `slots` request turned it `inactive` (kept
    /// for a later larger request, so the SDP never grows past the largest count asked).
    pub active: bool,
    /// Its str0m send stream is parked (see [`crate::session::PARK_AFTER`]).
    pub parked: bool,
    pub ssrc: Ssrc,
    /// When something was last written into this slot (or it was created).
    pub last_write: Instant,
    /// The source forwarded now.
    pub current: Option<Feed>,
    pub rewriter: Rewriter,
    /// Video: the source that takes over at its next keyframe (the current one goes on until
    /// then).
    pub next: Option<Feed>,
    pub mid: Mid,
    pub vp8: Vp8Munger,
    /// The subscriber's preferences for this slot (camera and screen).
    pub paused: bool,
    pub max_layer: Option<u8>,
    /// The source the client was last told this slot carries (`None`: empty).
    pub told: Option<TrackKey>,
    /// The loss the subscriber last reported for this slot's stream (0.0–1.0), for the loss
    /// reported to the publishers it carries (`router/listener_loss.rs`).
    pub egress_loss: Option<f64>,
}

impl Slot {
    pub fn new(mid: Mid, kind: SlotKind, ssrc: Ssrc, now: Instant) -> Self {
        let rewriter = match kind {
            SlotKind::Audio => Rewriter::new(48_000, false, 0),
            SlotKind::Camera | SlotKind::Screen => Rewriter::new(90_000, true, 0),
        };
        Slot {
            mid,
            kind,
            ssrc,
            active: true,
            current: None,
            next: None,
            rewriter,
            vp8: Vp8Munger::default(),
            paused: false,
            max_layer: None,
            last_write: now,
            parked: false,
            told: None,
            egress_loss: None,
        }
    }

    pub fn is_video(&self) -> bool {
        self.kind != SlotKind::Audio
    }

    /// The source this slot is headed for: the one waiting for its keyframe, else the current.
    pub fn target(&self) -> Option<&Feed> {
        self.next.as_ref().or(self.current.as_ref())
    }

    /// Whether this slot carries `key` now or is about to.
    pub fn holds(&self, key: TrackKey) -> bool {
        self.carries(key) || self.next.as_ref().is_some_and(|f| f.key == key)
    }

    /// Whether `key` is the source forwarded now (`current`; [`Slot::holds`] also counts the
    /// one waiting for its keyframe). Reads the slot's first cache line only.
    pub fn carries(&self, key: TrackKey) -> bool {
        self.current.as_ref().is_some_and(|f| f.key == key)
    }

    /// Starts carrying `key` on an audio slot at once: the next packet resyncs the stream.
    pub fn switch_audio(&mut self, key: TrackKey, epoch: u32) {
        self.current = Some(Feed::new(key));
        self.rewriter.switch_source(epoch);
    }

    /// The waiting source's keyframe arrived: it becomes the current one; the stream continues
    /// across the change (numbering, timestamps, VP8 picture ids).
    pub fn take_next(&mut self, epoch: u32) -> Option<TrackKey> {
        let next = self.next.take()?;
        let old = self.current.replace(next).map(|f| f.key);
        self.rewriter.switch_source(epoch);
        self.vp8.switch_layer();
        old
    }

    /// Carries nothing any more; a later source starts at a keyframe (video).
    pub fn clear(&mut self) {
        self.current = None;
        self.next = None;
        self.rewriter.pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(publisher: u8, subscriber: u8) -> PtMapping {
        PtMapping {
            publisher: Pt::new_with_value(publisher),
            subscriber: Pt::new_with_value(subscriber),
            strip_red: false,
        }
    }

    #[test]
    fn pt_map_keeps_four_and_finds_them() {
        let mut map = PtMap::default();
        assert_eq!(map.get(Pt::new_with_value(111)), None);
        for pt in 100..105 {
            map.insert(mapping(pt, pt + 10));
        }
        for pt in 100..104 {
            assert_eq!(map.get(Pt::new_with_value(pt)), Some(mapping(pt, pt + 10)));
        }
        // No room for a fifth: the forwarding path works it out per packet instead.
        assert_eq!(map.get(Pt::new_with_value(104)), None);
    }
}
