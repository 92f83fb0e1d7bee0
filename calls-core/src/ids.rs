//! Typed identifiers used across the public API.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A call (room): every session joined with the same `CallId` hears and sees the others.
///
/// Chosen by the embedder (for example the channel id of a chat product).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CallId(pub String);

impl CallId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for CallId {
    fn from(value: &str) -> Self {
        CallId(value.to_owned())
    }
}

impl From<String> for CallId {
    fn from(value: String) -> Self {
        CallId(value)
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One participant's connection to a call; chosen by the embedder, unique per router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// The user behind a session (display name or account id), passed through to other participants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub String);

impl From<&str> for UserId {
    fn from(value: &str) -> Self {
        UserId(value.to_owned())
    }
}

impl From<String> for UserId {
    fn from(value: String) -> Self {
        UserId(value)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a session may do in its call. Enforced at the media layer: an offer that sends what the
/// grants forbid is answered without it, and RTP on a forbidden track is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Grants {
    /// May send a microphone track.
    pub publish_audio: bool,
    /// May send a camera track.
    pub publish_video: bool,
    /// May send a screen share track.
    pub publish_screen: bool,
    /// May receive the other participants' tracks.
    pub subscribe: bool,
    /// May be recorded: `false` leaves this session's microphone, camera and screen out of
    /// every recording of its call (see [`Router::start_recording`](crate::Router::start_recording)).
    #[serde(default = "yes")]
    pub recordable: bool,
}

fn yes() -> bool {
    true
}

impl Grants {
    /// Everything allowed: a regular participant.
    pub const ALL: Grants = Grants {
        publish_audio: true,
        publish_video: true,
        publish_screen: true,
        subscribe: true,
        recordable: true,
    };

    /// Listen and watch only.
    pub const VIEWER: Grants = Grants {
        publish_audio: false,
        publish_video: false,
        publish_screen: false,
        subscribe: true,
        recordable: true,
    };

    /// Builds grants from the four permissions (recordable, as by default).
    pub fn new(
        publish_audio: bool,
        publish_video: bool,
        publish_screen: bool,
        subscribe: bool,
    ) -> Self {
        Grants {
            publish_audio,
            publish_video,
            publish_screen,
            subscribe,
            recordable: true,
        }
    }

    /// The same grants, with [`recordable`](Self::recordable) set: `false` keeps this session
    /// out of recordings.
    pub fn with_recordable(mut self, recordable: bool) -> Self {
        self.recordable = recordable;
        self
    }

    /// Whether a track of this source may be published.
    pub fn may_publish(&self, source: TrackSource) -> bool {
        match source {
            TrackSource::Microphone => self.publish_audio,
            TrackSource::Camera => self.publish_video,
            TrackSource::Screen => self.publish_screen,
        }
    }
}

impl Default for Grants {
    fn default() -> Self {
        Grants::ALL
    }
}

/// Where a published track comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    /// Audio from a microphone.
    Microphone,
    /// Video from a camera.
    Camera,
    /// Video of a shared screen.
    Screen,
}

impl TrackSource {
    /// Whether this source carries audio.
    pub fn is_audio(self) -> bool {
        matches!(self, TrackSource::Microphone)
    }

    /// Short label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackSource::Microphone => "microphone",
            TrackSource::Camera => "camera",
            TrackSource::Screen => "screen",
        }
    }
}
