//! Typed signaling messages between a participant and the router.
//!
//! The embedder carries them over its own channel (a WebSocket, the chat server's connection, …)
//! as JSON: every message is an object with a `"type"` field in `snake_case`.
//!
//! Negotiation rules (perfect negotiation with the **client impolite**):
//! - The client sends an [`ClientMessage::Offer`] for what it publishes; the router answers.
//! - When other participants' tracks appear or go, the router sends a [`ServerMessage::Offer`];
//!   the client answers with [`ClientMessage::Answer`]. The router never has two offers in flight.
//! - Glare: if the client's offer crosses a router offer, **the client's offer wins**: the router
//!   drops its own offer, answers the client, and re-offers its changes after that. A client that
//!   receives a router offer while its own offer is outstanding ignores the router's offer.

use serde::{Deserialize, Serialize};

use crate::error::SignalError;
use crate::ids::{SessionId, TrackSource, UserId};

/// Largest signaling message the router parses (SDP of a large call fits comfortably).
pub const MAX_SIGNAL_BYTES: usize = 256 * 1024;

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
    /// How this client wants one of the tracks it receives: `paused` stops its video (a hidden
    /// tile), `max_layer` caps the simulcast layer (0 = lowest) whatever the bandwidth allows.
    /// Sent again to change; both fields default to "no restriction".
    Preference {
        /// The receiving client's m-line of the track (as in [`ServerMessage::Tracks`]).
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

/// A published track as the router announces it to other participants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// The m-line in *the receiving client's* SDP that carries this track.
    pub mid: String,
    /// The publishing session.
    pub session: SessionId,
    /// The publishing user.
    pub user: UserId,
    /// Microphone, camera or screen.
    pub source: TrackSource,
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
    /// A router-initiated offer (tracks of other participants added or removed).
    Offer {
        /// The SDP text.
        sdp: String,
    },
    /// The tracks this client now receives, sent with each router offer and after each change.
    Tracks {
        /// Every track the client receives, by its local mid.
        tracks: Vec<TrackInfo>,
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
    /// A participant started or stopped sharing their screen.
    Screen {
        /// Who shares.
        session: SessionId,
        /// Their user.
        user: UserId,
        /// Now sharing.
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
    /// Something the client sent was refused; the session goes on.
    Error {
        /// Stable machine-readable code (`bad_json`, `bad_sdp`, `not_allowed`, …).
        code: String,
        /// Human-readable detail.
        message: String,
    },
}

impl ServerMessage {
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
