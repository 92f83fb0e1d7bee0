//! Errors, one enum per public surface.

use thiserror::Error;

use crate::ids::{CallId, SessionId, TrackSource};

/// Errors from [`Router`](crate::Router) commands.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouterError {
    /// No session with this id on this router.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// A session with this id already exists.
    #[error("session {0} already exists")]
    SessionExists(SessionId),
    /// The call has reached `max_participants_per_call`.
    #[error("call {call} is full ({max} participants)")]
    CallFull {
        /// The call.
        call: CallId,
        /// The configured limit.
        max: usize,
    },
    /// The router has reached `max_sessions`.
    #[error("router is full ({max} sessions)")]
    RouterFull {
        /// The configured limit.
        max: usize,
    },
    /// The router is draining and accepts no new joins.
    #[error("router is draining and accepts no new joins")]
    Draining,
    /// The router's thread is behind (its embedder reported lag, see
    /// [`Router::set_load`](crate::Router::set_load)): it keeps the sessions it carries and
    /// takes no new ones. Try again after `retry_after_s`, or on another router.
    #[error("router is overloaded; retry after {retry_after_s} s")]
    Overloaded {
        /// Seconds after which a retry may succeed (one recovery hold).
        retry_after_s: u64,
    },
    /// No call with this id on this router (nobody has joined it).
    #[error("unknown call {0}")]
    UnknownCall(CallId),
    /// The call is already being recorded (stop that recording first).
    #[error("call {0} is already being recorded")]
    AlreadyRecording(CallId),
    /// The call is not being recorded.
    #[error("call {0} is not being recorded")]
    NotRecording(CallId),
    /// No relay link with this id on this router.
    #[error("unknown relay link {0}")]
    UnknownRelayLink(crate::relay::LinkId),
    /// A relay link with this id is already open.
    #[error("relay link {0} is already open")]
    RelayLinkExists(crate::relay::LinkId),
    /// A signaling message was refused (the session goes on).
    #[error("signaling error on {session}: {error}")]
    Signal {
        /// The session that sent it.
        session: SessionId,
        /// What was wrong.
        error: SignalError,
    },
}

impl RouterError {
    /// Stable machine-readable code: what a client or an orchestrator acts on (the reference
    /// server sends it as the `code` of an `error` message before closing a refused join).
    pub fn code(&self) -> &'static str {
        match self {
            RouterError::UnknownSession(_) => "unknown_session",
            RouterError::SessionExists(_) => "session_exists",
            RouterError::CallFull { .. } => "call_full",
            RouterError::RouterFull { .. } => "router_full",
            RouterError::Draining => "draining",
            RouterError::Overloaded { .. } => "overloaded",
            RouterError::UnknownCall(_) => "unknown_call",
            RouterError::AlreadyRecording(_) => "already_recording",
            RouterError::NotRecording(_) => "not_recording",
            RouterError::UnknownRelayLink(_) => "unknown_relay_link",
            RouterError::RelayLinkExists(_) => "relay_link_exists",
            RouterError::Signal { error, .. } => error.code(),
        }
    }

    /// For refusals that may succeed later (full, draining, overloaded): the seconds to wait
    /// before trying again, if the router knows.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            RouterError::Overloaded { retry_after_s } => Some(*retry_after_s),
            _ => None,
        }
    }
}

/// What was wrong with a signaling message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalError {
    /// Not valid JSON or not a known message.
    #[error("malformed message: {0}")]
    Json(String),
    /// Larger than [`MAX_SIGNAL_BYTES`](crate::signal::MAX_SIGNAL_BYTES).
    #[error("message of {len} bytes exceeds {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The SDP could not be parsed or was refused.
    #[error("bad SDP: {0}")]
    Sdp(String),
    /// An answer arrived with no offer outstanding.
    #[error("answer without an outstanding offer")]
    UnexpectedAnswer,
    /// A candidate line could not be parsed.
    #[error("bad ICE candidate: {0}")]
    Candidate(String),
    /// The grants do not allow this.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// A mid that no m-line carries.
    #[error("unknown mid {0}")]
    UnknownMid(String),
    /// A value out of its range (more slots than allowed, too many pins).
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// The offer has more m-lines than `max_mlines_per_offer`.
    #[error("the offer has {count} m-lines; at most {max} are accepted")]
    TooManyMLines {
        /// m-lines in the offer (all directions).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The offer sends more tracks of one source than the session may publish
    /// (`max_microphones_per_session`, `max_cameras_per_session`, `max_screens_per_session`).
    #[error("the offer sends {count} {} tracks; at most {max} are accepted", .track.as_str())]
    TooManyTracks {
        /// Microphone, camera or screen.
        track: TrackSource,
        /// Sending m-lines of that source (counted up to the first beyond the limit).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A track offers more simulcast layers than `max_simulcast_layers`.
    #[error("m-line {mid} sends {count} simulcast layers; at most {max} are accepted")]
    TooManyLayers {
        /// The m-line.
        mid: String,
        /// Its layers.
        count: usize,
        /// The limit.
        max: usize,
    },
}

impl SignalError {
    /// Stable machine-readable code, as sent in [`ServerMessage::Error`](crate::ServerMessage).
    pub fn code(&self) -> &'static str {
        match self {
            SignalError::Json(_) => "bad_json",
            SignalError::TooLarge { .. } => "too_large",
            SignalError::Sdp(_) => "bad_sdp",
            SignalError::UnexpectedAnswer => "unexpected_answer",
            SignalError::Candidate(_) => "bad_candidate",
            SignalError::NotAllowed(_) => "not_allowed",
            SignalError::UnknownMid(_) => "unknown_mid",
            SignalError::Invalid(_) => "invalid",
            SignalError::TooManyMLines { .. } => "too_many_mlines",
            SignalError::TooManyTracks { .. } => "too_many_tracks",
            SignalError::TooManyLayers { .. } => "too_many_layers",
        }
    }
}

/// Every problem found in a [`Config`](crate::Config), reported at once.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, in words an admin understands.
    pub problems: Vec<String>,
}
