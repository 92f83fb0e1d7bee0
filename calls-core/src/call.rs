//! Calls (rooms): who is in them and which tracks they publish.

use std::time::Instant;

use str0m::media::{MediaKind, Mid, Rid};

use crate::forward::VideoCodec;
use crate::ids::{SessionId, TrackSource};
use crate::layers::{rid_rank, Layer};
use crate::speaker::SpeakerDetector;

/// One published track: a publisher's m-line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TrackKey {
    pub publisher: SessionId,
    pub mid: Mid,
}

/// Members of one call and the tracks they publish.
#[derive(Debug)]
pub(crate) struct Call {
    /// Sessions in join order.
    pub members: Vec<SessionId>,
    /// Tracks in publish order.
    pub tracks: Vec<TrackKey>,
    /// Voice activity, active speaker and top-N audio.
    pub speakers: SpeakerDetector,
    /// Who was the active speaker, most recent first (at most [`RECENT_SPEAKERS`]): camera
    /// slots go to them after pins and the current speaker.
    pub recent_speakers: Vec<SessionId>,
    /// The call's recording, while one runs (`record/`).
    pub recorder: Option<Box<crate::record::Recorder>>,
    /// Relay links to other routers that carry this call (`router/relay.rs`).
    pub relay_links: Vec<crate::relay::LinkId>,
}

/// Recent speakers a call remembers for the camera slots (more than any grid shows).
pub(crate) const RECENT_SPEAKERS: usize = 64;

impl Call {
    pub fn new(top_n_audio: usize) -> Self {
        Call {
            members: Vec::new(),
            tracks: Vec::new(),
            speakers: SpeakerDetector::new(top_n_audio),
            recent_speakers: Vec::new(),
            recorder: None,
            relay_links: Vec::new(),
        }
    }
}

/// A track a publisher sends, and who receives it.
#[derive(Debug)]
pub(crate) struct PublishedTrack {
    pub kind: MediaKind,
    pub source: TrackSource,
    /// Bumped on every discontinuity subscribers must resync over (unmute, audio forwarded
    /// again after top-N held it back).
    pub epoch: u32,
    /// Audio: its last packet was forwarded (top-N); a packet forwarded after some were held
    /// back starts a new epoch, so slots continue without a sequence gap (silence, not loss).
    pub forwarding: bool,
    /// Video: the sessions with a slot that carries this track or waits for its keyframe
    /// (audio reaches the call's members through their audio slots instead).
    pub subscribers: Vec<SessionId>,
    /// Video: the layers received, lowest first (one layer with `rid: None` without
    /// simulcast). Bounded by [`MAX_LAYERS`].
    pub layers: Vec<Layer>,
    /// Dynacast: the RIDs the publisher was last told to send (`None`: never told).
    pub announced: Option<Vec<Rid>>,
    pub codec: VideoCodec,
    /// Audio: its latest packet was RED (RFC 2198), for the `red_streams` gauge.
    pub red: bool,
    /// Its call's recording takes it: the one branch forwarding takes for recording.
    pub recorded: bool,
    /// A local track: the relay links it is exported on, with its number there.
    pub exports: Vec<(crate::relay::LinkId, crate::relay::TrackNo)>,
}

/// Most simulcast layers accepted per track (browsers send up to 3).
pub(crate) const MAX_LAYERS: usize = 4;

impl PublishedTrack {
    pub fn new(kind: MediaKind, source: TrackSource) -> Self {
        PublishedTrack {
            kind,
            source,
            epoch: 0,
            forwarding: true,
            subscribers: Vec::new(),
            layers: Vec::new(),
            announced: None,
            codec: VideoCodec::Other,
            red: false,
            recorded: false,
            exports: Vec::new(),
        }
    }

    pub fn is_audio(&self) -> bool {
        self.kind == MediaKind::Audio
    }

    pub fn is_simulcast(&self) -> bool {
        self.layers.first().is_some_and(|l| l.rid.is_some())
    }

    /// The index of `rid`'s layer, adding it (in rank order) on first sight. `None` when the
    /// track already has [`MAX_LAYERS`] others. Returns also whether the layer is new.
    pub fn layer_index(&mut self, rid: Option<Rid>, now: Instant) -> Option<(usize, bool)> {
        if let Some(i) = self.layers.iter().position(|l| l.rid == rid) {
            return Some((i, false));
        }
        if self.layers.len() >= MAX_LAYERS {
            return None;
        }
        let rank = rid.as_ref().map_or(0, rid_rank);
        let at = self
            .layers
            .iter()
            .position(|l| l.rid.as_ref().map_or(0, rid_rank) > rank)
            .unwrap_or(self.layers.len());
        self.layers.insert(at, Layer::new(rid, rank, now));
        // Ranks are positions (unknown names sort after the known ones).
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.rank = i as u8;
        }
        Some((at, true))
    }
}
