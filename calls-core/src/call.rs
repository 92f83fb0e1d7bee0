//! Calls (rooms): who is in them and which tracks they publish.

use std::time::Instant;

use str0m::media::{MediaKind, Mid, Rid};

use crate::forward::VideoCodec;
use crate::ids::{SessionId, TrackSource};

/// One published track: a publisher's m-line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TrackKey {
    pub publisher: SessionId,
    pub mid: Mid,
}

/// Members of one call and the tracks they publish.
#[derive(Debug, Default)]
pub(crate) struct Call {
    /// Sessions in join order.
    pub members: Vec<SessionId>,
    /// Tracks in publish order.
    pub tracks: Vec<TrackKey>,
}

/// A track a publisher sends, and who receives it.
#[derive(Debug)]
pub(crate) struct PublishedTrack {
    pub kind: MediaKind,
    pub source: TrackSource,
    /// Bumped on every discontinuity subscribers must resync over (unmute, layer switch).
    pub epoch: u32,
    /// Subscribers whose answer has been accepted, in subscription order.
    pub subscribers: Vec<SessionId>,
    /// Keyframe request throttling: when we last asked the publisher.
    pub last_keyframe_request: Option<Instant>,
    /// A subscriber waits for a keyframe that has not come yet.
    pub keyframe_wanted: bool,
    /// Simulcast: the layer being forwarded now, and the one we want to switch to at its next
    /// keyframe. `None` for a single-layer track.
    pub current_rid: Option<Rid>,
    pub target_rid: Option<Rid>,
    /// Simulcast layers seen recently, with the time of their last packet.
    pub layers: Vec<(Rid, Instant)>,
    pub codec: VideoCodec,
}

impl PublishedTrack {
    pub fn new(kind: MediaKind, source: TrackSource) -> Self {
        PublishedTrack {
            kind,
            source,
            epoch: 0,
            subscribers: Vec::new(),
            last_keyframe_request: None,
            keyframe_wanted: false,
            current_rid: None,
            target_rid: None,
            layers: Vec::new(),
            codec: VideoCodec::Other,
        }
    }

    pub fn is_audio(&self) -> bool {
        self.kind == MediaKind::Audio
    }
}
