//! Typed signaling messages between a participant and the router.
//!
//! The embedder carries them over its own channel (a WebSocket, the chat server's connection, …)
//! as JSON: every message is an object with a `"type"` field in `snake_case`.
//!
//! A participant receives on a fixed set of **slots** (router→client m-lines: a few audio, the
//! camera tiles it shows, one screen), negotiated once after its first offer; which participant
//! a slot carries is a [`ServerMessage::Slots`] mapping, sent before the first packet of a new
//! source. Nobody is renegotiated when others join, leave or publish (docs/signaling.md).
//!
//! Negotiation rules (perfect negotiation with the **client impolite**):
//! - The client sends an [`ClientMessage::Offer`] for what it publishes; the router answers.
//! - The router sends a [`ServerMessage::Offer`] of the client's slots after its first offer and
//!   after a [`ClientMessage::Slots`] request; the client answers with
//!   [`ClientMessage::Answer`]. The router never has two offers in flight.
//! - Glare: if the client's offer crosses a router offer, **the client's offer wins**: the router
//!   drops its own offer, answers the client, and re-offers its changes after that. A client that
//!   receives a router offer while its own offer is outstanding ignores the router's offer.

use serde::{Deserialize, Serialize};

use crate::error::SignalError;
use crate::ids::{SessionId, TrackSource, UserId};

/// Largest signaling message the router parses (SDP of a large call fits comfortably).
pub const MAX_SIGNAL_BYTES: usize = 256 * 1024;

/// The signaling protocol's version (2: receive slots). Embedders announce it to clients (the
/// reference server's `welcome` carries it as `protocol`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Most sessions a [`ClientMessage::Pin`] may name.
pub const MAX_PINS: usize = 25;

/// A message from a participant to the router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ClientMessage {
    /// An SDP offer: the client's publishing tracks (and any change to them).
    Offer {
        /// The SDP text.
        sdp: String,
        /// Which m-line (`a=mid`) carries a screen share; other video m-lines are cameras.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        screen_mid: Option<String>,
    },
    /// The SDP answer to a router offer.
    Answer {
        /// The SDP text.
        sdp: String,
    },
    /// A trickled ICE candidate (`candidate:` line). Optional with an ICE-lite router.
    Candidate {
        /// The candidate attribute as the browser gives it.
        candidate: String,
    },
    /// Stop forwarding this participant's microphone.
    Mute,
    /// Resume forwarding this participant's microphone.
    Unmute,
    /// The video m-line `mid` is a screen share (may also be given in the offer).
    ScreenOn {
        /// The m-line carrying the screen.
        mid: String,
    },
    /// The screen share has stopped.
    ScreenOff,
    /// Put these participants' cameras on this client's camera slots first, in this order
    /// (replaces the previous list; empty unpins). At most [`MAX_PINS`].
    Pin {
        /// The pinned sessions.
        sessions: Vec<SessionId>,
    },
    /// How many camera slots this client wants (0 to the router's `max_video_slots`). The only
    /// message that makes the router renegotiate a subscriber.
    Slots {
        /// Camera slots wanted.
        video: u16,
    },
    /// How this client wants one of its camera or screen slots: `paused` stops its video (a
    /// hidden tile), `max_layer` caps the simulcast layer (0 = lowest) whatever the bandwidth
    /// allows. It applies to whoever the slot carries. Sent again to change; both fields default
    /// to "no restriction".
    Preference {
        /// The slot's m-line (as in [`ServerMessage::Slots`]).
        mid: String,
        /// Forward nothing on this track until set back to `false`.
        #[serde(default)]
        paused: bool,
        /// Highest simulcast layer to forward (0 = lowest); `None` = as high as bandwidth allows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_layer: Option<u8>,
    },
}

impl ClientMessage {
    /// Parses a JSON message, bounded in size.
    pub fn from_json(text: &str) -> Result<Self, SignalError> {
        if text.len() > MAX_SIGNAL_BYTES {
            return Err(SignalError::TooLarge {
                len: text.len(),
                max: MAX_SIGNAL_BYTES,
            });
        }
        serde_json::from_str(text).map_err(|e| SignalError::Json(e.to_string()))
    }

    /// Serializes to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a receive slot carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    /// One of the loudest microphones.
    Audio,
    /// A camera tile.
    Camera,
    /// The screen share.
    Screen,
}

impl SlotKind {
    /// Short label used in metrics, logs and msid.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotKind::Audio => "audio",
            SlotKind::Camera => "camera",
            SlotKind::Screen => "screen",
        }
    }
}

/// One receive slot's mapping: which participant's source it carries from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The slot's m-line in the receiving client's SDP.
    pub mid: String,
    /// Audio, camera or screen.
    pub kind: SlotKind,
    /// The session it carries; `None`: the slot is empty.
    pub session: Option<SessionId>,
    /// That session's user.
    pub user: Option<UserId>,
    /// That session's source.
    pub source: Option<TrackSource>,
}

/// One participant in a [`ServerMessage::Roster`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// Their session.
    pub session: SessionId,
    /// Their user.
    pub user: UserId,
    /// Their microphone is muted.
    pub muted: bool,
    /// What they publish now.
    pub publishing: Vec<TrackSource>,
}

/// A message from the router to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerMessage {
    /// The answer to the client's offer.
    Answer {
        /// The SDP text.
        sdp: String,
    },
    /// A router-initiated offer: this client's receive slots.
    Offer {
        /// The SDP text.
        sdp: String,
    },
    /// Slot mapping: every slot right before each router offer, then the slots whose source
    /// changes, each before the first packet of its new source.
    Slots {
        /// The slots described.
        slots: Vec<SlotInfo>,
    },
    /// Who is in the call, sent once to a participant right after it joined (itself excluded).
    Roster {
        /// Everyone else.
        participants: Vec<RosterEntry>,
    },
    /// Another participant joined the call.
    ParticipantJoined {
        /// Their session.
        session: SessionId,
        /// Their user.
        user: UserId,
    },
    /// Another participant left the call.
    ParticipantLeft {
        /// Their session.
        session: SessionId,
        /// Their user.
        user: UserId,
    },
    /// A participant's microphone was muted or unmuted (also sent to the participant itself).
    Muted {
        /// Whose microphone.
        session: SessionId,
        /// Their user.
        user: UserId,
        /// Now muted.
        muted: bool,
    },
    /// A participant started or stopped publishing a source.
    Published {
        /// Who.
        session: SessionId,
        /// Their user.
        user: UserId,
        /// Microphone, camera or screen.
        source: TrackSource,
        /// Now publishing.
        on: bool,
    },
    /// Dynacast: the simulcast layers of one of this client's own tracks that someone watches.
    /// The client should send exactly these (`RTCRtpSender.setParameters`, `active` per
    /// encoding) and may stop encoding the others until they are listed again.
    Layers {
        /// The client's own m-line of the track.
        mid: String,
        /// The RIDs to keep sending (empty: nobody watches this track's video now).
        active: Vec<String>,
    },
    /// The call's active speaker changed (voice activity measured from the RFC 6464 audio
    /// levels, with a hold time). `session` is `None` when nobody has spoken for a while.
    Speaker {
        /// The loudest sustained speaker.
        session: Option<SessionId>,
    },
    /// The call is being recorded (`active`), or no longer: sent to every member when a
    /// recording starts or stops, and to whoever joins while one runs. `recorded` says whether
    /// this participant's own sources are in it (a session whose grants forbid recording, or
    /// that the recording does not name, is left out).
    Recording {
        /// A recording runs now.
        active: bool,
        /// This participant's microphone, camera and screen are recorded.
        recorded: bool,
    },
    /// Something the client sent was refused; the session goes on.
    Error {
        /// Stable machine-readable code (`bad_json`, `bad_sdp`, `not_allowed`, …).
        code: String,
        /// Human-readable detail.
        message: String,
    },
}

impl ServerMessage {
    /// The message's `type`, as in its JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Answer { .. } => "answer",
            ServerMessage::Offer { .. } => "offer",
            ServerMessage::Slots { .. } => "slots",
            ServerMessage::Roster { .. } => "roster",
            ServerMessage::ParticipantJoined { .. } => "participant_joined",
            ServerMessage::ParticipantLeft { .. } => "participant_left",
            ServerMessage::Muted { .. } => "muted",
            ServerMessage::Published { .. } => "published",
            ServerMessage::Layers { .. } => "layers",
            ServerMessage::Speaker { .. } => "speaker",
            ServerMessage::Recording { .. } => "recording",
            ServerMessage::Error { .. } => "error",
        }
    }

    /// Serializes to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a JSON message (for clients and tests).
    pub fn from_json(text: &str) -> Result<Self, SignalError> {
        if text.len() > MAX_SIGNAL_BYTES {
            return Err(SignalError::TooLarge {
                len: text.len(),
                max: MAX_SIGNAL_BYTES,
            });
        }
        serde_json::from_str(text).map_err(|e| SignalError::Json(e.to_string()))
    }

    pub(crate) fn error(err: &SignalError) -> Self {
        ServerMessage::Error {
            code: err.code().to_owned(),
            message: err.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_round_trip_as_tagged_json() {
        let msg = ClientMessage::Offer {
            sdp: "v=0".into(),
            screen_mid: Some("2".into()),
        };
        let json = msg.to_json();
        assert_eq!(json, r#"{"type":"offer","sdp":"v=0","screen_mid":"2"}"#);
        assert_eq!(ClientMessage::from_json(&json).ok(), Some(msg));
        assert_eq!(
            ClientMessage::from_json(r#"{"type":"mute"}"#).ok(),
            Some(ClientMessage::Mute)
        );
    }

    #[test]
    fn malformed_client_messages_are_typed_errors() {
        assert!(matches!(
            ClientMessage::from_json("{"),
            Err(SignalError::Json(_))
        ));
        assert!(matches!(
            ClientMessage::from_json(r#"{"type":"launch_rockets"}"#),
            Err(SignalError::Json(_))
        ));
        let huge = "x".repeat(MAX_SIGNAL_BYTES + 1);
        assert!(matches!(
            ClientMessage::from_json(&huge),
            Err(SignalError::TooLarge { .. })
        ));
    }
}
