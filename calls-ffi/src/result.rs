//! Result codes, the mapping from the core's errors, and the per-thread last error message.

use std::cell::RefCell;
use std::ffi::c_char;

use calls_core::{ConfigError, RouterError, SignalError, TcpError};

use crate::boundary::{self, Failure};

/// What every function returns. `CALLS_RESULT_OK` (0) is success; the numbers are stable
/// across releases (new codes get new numbers). `calls_last_error_message` has the detail.
///
/// Groups: 1–99 misuse of the API, 100–199 configuration, 200–299 router commands,
/// 300–399 signaling messages (the router has also queued an `error` message to the session),
/// 400–499 ICE-TCP connections (close the connection).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum calls_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullParameter = 1,
    /// A string argument is not valid UTF-8.
    InvalidUtf8 = 2,
    /// A `calls_address` has an unknown family, or an address string does not parse.
    InvalidAddress = 3,
    /// Another argument is out of range (unknown grant bits, a `now_us` the clock cannot
    /// represent, …).
    InvalidArgument = 4,
    /// The caller's buffer is too small; the required size was written to the size
    /// out-parameter. Nothing was consumed: call again with a larger buffer.
    BufferTooSmall = 5,
    /// The library panicked (a bug). If a router handle was involved it is now poisoned.
    Panic = 6,
    /// The router handle panicked earlier; it refuses every call but `calls_router_free`.
    Poisoned = 7,
    /// The configuration does not parse or does not validate; the message lists every problem.
    ConfigInvalid = 100,
    /// No session with this id on this router.
    UnknownSession = 200,
    /// A session with this id already exists.
    SessionExists = 201,
    /// The call has reached `max_participants_per_call`.
    CallFull = 202,
    /// The router has reached `max_sessions`.
    RouterFull = 203,
    /// The router is draining (`calls_router_start_draining`) and accepts no new joins.
    Draining = 204,
    /// No call with this name on this router (nobody is in it).
    UnknownCall = 205,
    /// The call is being recorded already (`calls_router_start_recording`).
    AlreadyRecording = 206,
    /// The call is not being recorded (`calls_router_stop_recording`).
    NotRecording = 207,
    /// Another refusal of a router command (a newer core than this mapping knows).
    RouterRefused = 299,
    /// The signaling message is not valid JSON or not a known message (code `bad_json`).
    SignalBadJson = 300,
    /// The signaling message exceeds 256 KiB (code `too_large`).
    SignalTooLarge = 301,
    /// The SDP could not be parsed or was refused (code `bad_sdp`).
    SignalBadSdp = 302,
    /// An answer arrived with no router offer outstanding (code `unexpected_answer`).
    SignalUnexpectedAnswer = 303,
    /// A trickled ICE candidate could not be parsed (code `bad_candidate`).
    SignalBadCandidate = 304,
    /// The session's grants do not allow this (code `not_allowed`).
    SignalNotAllowed = 305,
    /// The message names an m-line the session does not have (code `unknown_mid`).
    SignalUnknownMid = 306,
    /// Another refusal of a signaling message (see the message text).
    SignalRefused = 399,
    /// No ICE-TCP connection with this id (never announced, or already forgotten).
    TcpUnknownConnection = 400,
    /// `calls_router_tcp_accepted` twice with the same connection id.
    TcpConnectionExists = 401,
    /// The connection announced a frame larger than any datagram: the router has forgotten
    /// it, close the socket.
    TcpFrameTooLarge = 402,
    /// Another ICE-TCP refusal: the router has forgotten the connection, close the socket.
    TcpRefused = 499,
}

impl calls_result {
    /// Every code, for `calls_result_name` and the tests.
    pub(crate) const ALL: [calls_result; 30] = [
        calls_result::Ok,
        calls_result::NullParameter,
        calls_result::InvalidUtf8,
        calls_result::InvalidAddress,
        calls_result::InvalidArgument,
        calls_result::BufferTooSmall,
        calls_result::Panic,
        calls_result::Poisoned,
        calls_result::ConfigInvalid,
        calls_result::UnknownSession,
        calls_result::SessionExists,
        calls_result::CallFull,
        calls_result::RouterFull,
        calls_result::Draining,
        calls_result::UnknownCall,
        calls_result::AlreadyRecording,
        calls_result::NotRecording,
        calls_result::RouterRefused,
        calls_result::SignalBadJson,
        calls_result::SignalTooLarge,
        calls_result::SignalBadSdp,
        calls_result::SignalUnexpectedAnswer,
        calls_result::SignalBadCandidate,
        calls_result::SignalNotAllowed,
        calls_result::SignalUnknownMid,
        calls_result::SignalRefused,
        calls_result::TcpUnknownConnection,
        calls_result::TcpConnectionExists,
        calls_result::TcpFrameTooLarge,
        calls_result::TcpRefused,
    ];

    /// The C name of the code, NUL-terminated.
    fn name(self) -> &'static str {
        match self {
            calls_result::Ok => "CALLS_RESULT_OK\0",
            calls_result::NullParameter => "CALLS_RESULT_NULL_PARAMETER\0",
            calls_result::InvalidUtf8 => "CALLS_RESULT_INVALID_UTF8\0",
            calls_result::InvalidAddress => "CALLS_RESULT_INVALID_ADDRESS\0",
            calls_result::InvalidArgument => "CALLS_RESULT_INVALID_ARGUMENT\0",
            calls_result::BufferTooSmall => "CALLS_RESULT_BUFFER_TOO_SMALL\0",
            calls_result::Panic => "CALLS_RESULT_PANIC\0",
            calls_result::Poisoned => "CALLS_RESULT_POISONED\0",
            calls_result::ConfigInvalid => "CALLS_RESULT_CONFIG_INVALID\0",
            calls_result::UnknownSession => "CALLS_RESULT_UNKNOWN_SESSION\0",
            calls_result::SessionExists => "CALLS_RESULT_SESSION_EXISTS\0",
            calls_result::CallFull => "CALLS_RESULT_CALL_FULL\0",
            calls_result::RouterFull => "CALLS_RESULT_ROUTER_FULL\0",
            calls_result::Draining => "CALLS_RESULT_DRAINING\0",
            calls_result::UnknownCall => "CALLS_RESULT_UNKNOWN_CALL\0",
            calls_result::AlreadyRecording => "CALLS_RESULT_ALREADY_RECORDING\0",
            calls_result::NotRecording => "CALLS_RESULT_NOT_RECORDING\0",
            calls_result::RouterRefused => "CALLS_RESULT_ROUTER_REFUSED\0",
            calls_result::SignalBadJson => "CALLS_RESULT_SIGNAL_BAD_JSON\0",
            calls_result::SignalTooLarge => "CALLS_RESULT_SIGNAL_TOO_LARGE\0",
            calls_result::SignalBadSdp => "CALLS_RESULT_SIGNAL_BAD_SDP\0",
            calls_result::SignalUnexpectedAnswer => "CALLS_RESULT_SIGNAL_UNEXPECTED_ANSWER\0",
            calls_result::SignalBadCandidate => "CALLS_RESULT_SIGNAL_BAD_CANDIDATE\0",
            calls_result::SignalNotAllowed => "CALLS_RESULT_SIGNAL_NOT_ALLOWED\0",
            calls_result::SignalUnknownMid => "CALLS_RESULT_SIGNAL_UNKNOWN_MID\0",
            calls_result::SignalRefused => "CALLS_RESULT_SIGNAL_REFUSED\0",
            calls_result::TcpUnknownConnection => "CALLS_RESULT_TCP_UNKNOWN_CONNECTION\0",
            calls_result::TcpConnectionExists => "CALLS_RESULT_TCP_CONNECTION_EXISTS\0",
            calls_result::TcpFrameTooLarge => "CALLS_RESULT_TCP_FRAME_TOO_LARGE\0",
            calls_result::TcpRefused => "CALLS_RESULT_TCP_REFUSED\0",
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure::new(calls_result::ConfigInvalid, error.to_string())
    }
}

impl From<RouterError> for Failure {
    fn from(error: RouterError) -> Self {
        let code = match &error {
            RouterError::UnknownSession(_) => calls_result::UnknownSession,
            RouterError::SessionExists(_) => calls_result::SessionExists,
            RouterError::CallFull { .. } => calls_result::CallFull,
            RouterError::RouterFull { .. } => calls_result::RouterFull,
            RouterError::Draining => calls_result::Draining,
            RouterError::UnknownCall(_) => calls_result::UnknownCall,
            RouterError::AlreadyRecording(_) => calls_result::AlreadyRecording,
            RouterError::NotRecording(_) => calls_result::NotRecording,
            RouterError::Signal { error, .. } => signal_code(error),
            _ => calls_result::RouterRefused,
        };
        Failure::new(code, error.to_string())
    }
}

fn signal_code(error: &SignalError) -> calls_result {
    match error {
        SignalError::Json(_) => calls_result::SignalBadJson,
        SignalError::TooLarge { .. } => calls_result::SignalTooLarge,
        SignalError::Sdp(_) => calls_result::SignalBadSdp,
        SignalError::UnexpectedAnswer => calls_result::SignalUnexpectedAnswer,
        SignalError::Candidate(_) => calls_result::SignalBadCandidate,
        SignalError::NotAllowed(_) => calls_result::SignalNotAllowed,
        SignalError::UnknownMid(_) => calls_result::SignalUnknownMid,
        _ => calls_result::SignalRefused,
    }
}

impl From<TcpError> for Failure {
    fn from(error: TcpError) -> Self {
        let code = match &error {
            TcpError::UnknownConnection(_) => calls_result::TcpUnknownConnection,
            TcpError::ConnectionExists(_) => calls_result::TcpConnectionExists,
            TcpError::FrameTooLarge { .. } => calls_result::TcpFrameTooLarge,
            _ => calls_result::TcpRefused,
        };
        Failure::new(code, error.to_string())
    }
}

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Remembers `message` as this thread's last error.
pub(crate) fn set_last_error(message: String) {
    // A thread being torn down has no thread-locals left; the message is lost, nothing breaks.
    let _ = LAST_ERROR.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = message;
        }
    });
}

/// Copies the message of the most recent failed call **on the calling thread** into `buf`
/// (NUL-terminated) and its length (without the NUL) to `*out_len`. The message is empty if
/// no call on this thread has failed yet. Successful calls leave it unchanged.
///
/// Pass `buf = NULL, buf_len = 0` to learn the size: the function then returns
/// `CALLS_RESULT_BUFFER_TOO_SMALL` with the required size (including the NUL) in `*out_len`.
/// This function never changes the last error itself. Thread-safe (each thread has its own).
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER` (`out_len` NULL, or `buf` NULL with `buf_len` > 0),
/// `CALLS_RESULT_BUFFER_TOO_SMALL`.
#[no_mangle]
pub extern "C" fn calls_last_error_message(
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> calls_result {
    let outcome = std::panic::catch_unwind(|| {
        let message = LAST_ERROR
            .try_with(|last| last.try_borrow().map(|m| m.clone()).unwrap_or_default())
            .unwrap_or_default();
        boundary::copy_text(&message, buf, buf_len, out_len)
    });
    match outcome {
        Ok(Ok(())) => calls_result::Ok,
        Ok(Err(failure)) => failure.code,
        Err(_) => calls_result::Panic,
    }
}

/// Writes the name of a result code (`"CALLS_RESULT_BUFFER_TOO_SMALL"`), a static
/// NUL-terminated string, to `*out`. Do not free it. Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`; `CALLS_RESULT_INVALID_ARGUMENT` for a number that is
/// no result code.
#[no_mangle]
pub extern "C" fn calls_result_name(result: u32, out: *mut *const c_char) -> calls_result {
    boundary::guard(|| {
        let code = calls_result::ALL
            .iter()
            .find(|c| **c as u32 == result)
            .ok_or_else(|| {
                Failure::new(
                    calls_result::InvalidArgument,
                    format!("{result} is no calls_result"),
                )
            })?;
        boundary::write_out(out, code.name().as_ptr().cast::<c_char>(), "out")
    })
}
