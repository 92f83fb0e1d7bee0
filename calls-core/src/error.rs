//! Errors, one enum per public surface.

use thiserror::Error;

use crate::ids::{CallId, SessionId};

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
    /// A signaling message was refused (the session goes on).
    #[error("signaling error on {session}: {error}")]
    Signal {
        /// The session that sent it.
        session: SessionId,
        /// What was wrong.
        error: SignalError,
    },
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
