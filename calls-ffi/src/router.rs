//! `calls_router`: the whole [`Router`] surface behind an opaque handle.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use calls_core::{
    CallId, Config, ConfigError, ConnId, Datagram, Grants, Proto, RecordingOptions, Router,
    SessionId, UserId,
};

use crate::address::{calls_address, socket_addr_arg};
use crate::boundary::{self, settle, Failure};
use crate::output::{calls_output, Prepared, Recordings};
use crate::result::{calls_result, set_last_error};

/// Grant bit: may publish a microphone track.
pub const CALLS_GRANT_PUBLISH_AUDIO: u32 = 1;
/// Grant bit: may publish a camera track.
pub const CALLS_GRANT_PUBLISH_VIDEO: u32 = 2;
/// Grant bit: may publish a screen share.
pub const CALLS_GRANT_PUBLISH_SCREEN: u32 = 4;
/// Grant bit: may receive the other participants' tracks.
pub const CALLS_GRANT_SUBSCRIBE: u32 = 8;
/// Every grant: a regular participant.
pub const CALLS_GRANTS_ALL: u32 = 15;
/// Listen and watch only.
pub const CALLS_GRANTS_VIEWER: u32 = 8;
/// Opt-out bit, added to the others: the session is never recorded
/// (`calls_router_start_recording` leaves its sources out, and tells it so).
pub const CALLS_GRANT_UNRECORDABLE: u32 = 16;

/// Recording source bit: microphones (Opus → Ogg).
pub const CALLS_RECORD_AUDIO: u32 = 1;
/// Recording source bit: cameras (VP8/VP9 → IVF).
pub const CALLS_RECORD_CAMERA: u32 = 2;
/// Recording source bit: screen shares (VP8/VP9 → IVF).
pub const CALLS_RECORD_SCREEN: u32 = 4;
/// Every source.
pub const CALLS_RECORD_ALL: u32 = 7;

/// A media router: many calls on one UDP port (and one TCP port for ICE-TCP). Opaque.
///
/// Created by `calls_router_new_json` or `calls_router_new_toml`, freed by
/// `calls_router_free`. Not thread-safe: use it from one thread at a time (it may move between
/// threads). Run one router per core and pin each call to one router.
#[derive(Debug)]
pub struct calls_router {
    router: Router,
    clock: Clock,
    /// An output the caller's buffer was too small for; returned by the next poll.
    pending: Option<Prepared>,
    /// The numbers given to running recordings (`calls_output.recording`).
    recordings: Recordings,
    /// A call panicked: the router may be inconsistent, so it refuses every call.
    poisoned: bool,
}

/// How far `now_us` may be from the creation time: 100 years.
const MAX_CLOCK_SPAN_US: u64 = 100 * 365 * 24 * 3600 * 1_000_000;

/// Maps the caller's monotonic microseconds to `Instant`s and back, from one origin taken at
/// creation.
#[derive(Debug, Clone, Copy)]
struct Clock {
    origin: Instant,
    origin_us: u64,
}

impl Clock {
    fn instant(&self, now_us: u64) -> Result<Instant, Failure> {
        // A time this far off is a unit mistake or garbage, and `Instant` arithmetic in the
        // core would overflow (panic) near the ends of its range.
        if now_us.abs_diff(self.origin_us) > MAX_CLOCK_SPAN_US {
            return Err(Failure::new(
                calls_result::InvalidArgument,
                format!(
                    "`now_us` {now_us} is more than 100 years from the router's creation time {} µs",
                    self.origin_us
                ),
            ));
        }
        let at = if now_us >= self.origin_us {
            self.origin
                .checked_add(Duration::from_micros(now_us - self.origin_us))
        } else {
            self.origin
                .checked_sub(Duration::from_micros(self.origin_us - now_us))
        };
        at.ok_or_else(|| {
            Failure::new(
                calls_result::InvalidArgument,
                format!(
                    "`now_us` {now_us} is too far from the router's creation time {} µs",
                    self.origin_us
                ),
            )
        })
    }

    /// The caller's time of `at`, rounded up (waking before a deadline would find nothing due).
    fn micros(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.origin) {
            Some(after) => {
                let us = after.as_nanos().div_ceil(1000);
                self.origin_us
                    .saturating_add(u64::try_from(us).unwrap_or(u64::MAX))
            }
            None => {
                let before = self.origin.duration_since(at).as_micros();
                self.origin_us
                    .saturating_sub(u64::try_from(before).unwrap_or(u64::MAX))
            }
        }
    }
}

/// Runs a router function's body: NULL and poison checks, the panic boundary (a panic poisons
/// the handle), and the result code.
fn with_router(
    router: *mut calls_router,
    body: impl FnOnce(&mut calls_router) -> Result<(), Failure>,
) -> calls_result {
    if router.is_null() {
        set_last_error("`router` is NULL".to_owned());
        return calls_result::NullParameter;
    }
    // SAFETY: `router` is not NULL, and the C contract says it is a handle from
    // `calls_router_new_*` that has not been freed and that no other thread uses during this
    // call; so it points to a live `calls_router` and this is the only reference to it.
    let handle = unsafe { &mut *router };
    if handle.poisoned {
        set_last_error("the router panicked earlier and is poisoned; free it".to_owned());
        return calls_result::Poisoned;
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut *handle)));
    if outcome.is_err() {
        handle.poisoned = true;
    }
    settle(outcome)
}

fn new_router(
    config: impl FnOnce() -> Result<Config, Failure>,
    now_us: u64,
    out: *mut *mut calls_router,
) -> calls_result {
    boundary::guard(|| {
        boundary::require_out(out, "out")?;
        let config = config()?;
        // The one clock read of the library: it anchors the caller's `now_us` to `Instant`.
        let origin = Instant::now();
        let router = Router::new(config, origin)?;
        let handle = Box::new(calls_router {
            router,
            clock: Clock {
                origin,
                origin_us: now_us,
            },
            pending: None,
            recordings: Recordings::default(),
            poisoned: false,
        });
        boundary::write_out(out, Box::into_raw(handle), "out")
    })
}

fn parsed(config: Result<Config, ConfigError>) -> Result<Config, Failure> {
    config.map_err(Failure::from)
}

/// Creates a router from a JSON configuration (`"{}"` for all defaults; keys as in
/// docs/configuration.md) and writes the handle to `*out`. `now_us` is the caller's monotonic
/// clock in microseconds; every later `now_us` must come from the same clock.
///
/// Free the router with `calls_router_free`. Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_CONFIG_INVALID` (the last error message lists every problem, one per line).
#[no_mangle]
pub extern "C" fn calls_router_new_json(
    config_json: *const c_char,
    now_us: u64,
    out: *mut *mut calls_router,
) -> calls_result {
    new_router(
        || {
            parsed(Config::from_json_str(boundary::str_arg(
                config_json,
                "config_json",
            )?))
        },
        now_us,
        out,
    )
}

/// Creates a router from a TOML configuration (`""` for all defaults). Otherwise like
/// `calls_router_new_json`.
#[no_mangle]
pub extern "C" fn calls_router_new_toml(
    config_toml: *const c_char,
    now_us: u64,
    out: *mut *mut calls_router,
) -> calls_result {
    new_router(
        || {
            parsed(Config::from_toml_str(boundary::str_arg(
                config_toml,
                "config_toml",
            )?))
        },
        now_us,
        out,
    )
}

/// Frees a router and everything it holds (sessions end without a goodbye: call
/// `calls_router_leave` first for a polite close). NULL is accepted and does nothing, like
/// `free(3)`. A poisoned router can still be freed. The handle is invalid afterwards.
///
/// Not thread-safe with other calls on the same router.
#[no_mangle]
pub extern "C" fn calls_router_free(router: *mut calls_router) -> calls_result {
    if router.is_null() {
        return calls_result::Ok;
    }
    boundary::guard(|| {
        drop_handle(router);
        Ok(())
    })
}

/// Frees a non-NULL handle.
fn drop_handle(router: *mut calls_router) {
    // SAFETY: `router` is not NULL (checked by the caller), and the C contract says it came
    // from `Box::into_raw` in `calls_router_new_*` and is freed exactly once, with no call on
    // it running or following.
    drop(unsafe { Box::from_raw(router) });
}

/// Writes the configuration the router runs with, as JSON with every key (defaults filled
/// in), into `buf` (NUL-terminated; the length without the NUL goes to `*out_len`).
/// Pass `buf = NULL, buf_len = 0` to learn the size needed.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_BUFFER_TOO_SMALL` (size needed, with
/// the NUL, in `*out_len`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_config_json(
    router: *mut calls_router,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> calls_result {
    with_router(router, |handle| {
        let json = serde_json::to_string(handle.router.config()).map_err(|e| {
            Failure::new(calls_result::InvalidArgument, format!("config JSON: {e}"))
        })?;
        boundary::copy_text(&json, buf, buf_len, out_len)
    })
}

/// Adds participant `session` (an id you choose, unique on this router) as `user` to call
/// `call` (an id you choose, e.g. the channel id) with `grants` (`CALLS_GRANT_*` bits, e.g.
/// `CALLS_GRANTS_ALL`; add `CALLS_GRANT_UNRECORDABLE` to keep it out of recordings). The client then sends its offer, which you pass to
/// `calls_router_handle_signal`. Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_INVALID_ARGUMENT` (unknown grant bits, `now_us` out of range: more than
/// 100 years from the creation time),
/// `CALLS_RESULT_SESSION_EXISTS`, `CALLS_RESULT_CALL_FULL`, `CALLS_RESULT_ROUTER_FULL`,
/// `CALLS_RESULT_DRAINING`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_join(
    router: *mut calls_router,
    call: *const c_char,
    session: u64,
    user: *const c_char,
    grants: u32,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let call = boundary::str_arg(call, "call")?;
        let user = boundary::str_arg(user, "user")?;
        if grants & !(CALLS_GRANTS_ALL | CALLS_GRANT_UNRECORDABLE) != 0 {
            return Err(Failure::new(
                calls_result::InvalidArgument,
                format!("`grants` {grants:#x} has bits that are no CALLS_GRANT_*"),
            ));
        }
        let grants = Grants::new(
            grants & CALLS_GRANT_PUBLISH_AUDIO != 0,
            grants & CALLS_GRANT_PUBLISH_VIDEO != 0,
            grants & CALLS_GRANT_PUBLISH_SCREEN != 0,
            grants & CALLS_GRANT_SUBSCRIBE != 0,
        )
        .with_recordable(grants & CALLS_GRANT_UNRECORDABLE == 0);
        let now = handle.clock.instant(now_us)?;
        handle.router.join(
            CallId::from(call),
            SessionId(session),
            UserId::from(user),
            grants,
            now,
        )?;
        Ok(())
    })
}

/// Removes a participant: frees its session and tells the others. Call it when the
/// participant's signaling connection ends. Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_UNKNOWN_SESSION`,
/// `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_leave(
    router: *mut calls_router,
    session: u64,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let now = handle.clock.instant(now_us)?;
        handle.router.leave(SessionId(session), now)?;
        Ok(())
    })
}

/// Mutes (`muted` true) or unmutes a participant's microphone on your command (clients can
/// also send `{"type":"mute"}`). Muted audio is not forwarded. Drain
/// `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_UNKNOWN_SESSION`,
/// `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_set_muted(
    router: *mut calls_router,
    session: u64,
    muted: bool,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let now = handle.clock.instant(now_us)?;
        handle.router.set_muted(SessionId(session), muted, now)?;
        Ok(())
    })
}

/// Caps the bandwidth the router assumes towards participant `session` at `bps` bits per
/// second, below its congestion-controller estimate: the router then picks lower simulcast
/// layers for what it sends to that participant (at once, and until the cap changes). For an
/// admin limiting one participant, or for tests. **`bps` 0 removes the cap** (the estimate
/// alone decides again). Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_UNKNOWN_SESSION`,
/// `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_set_bandwidth_cap(
    router: *mut calls_router,
    session: u64,
    bps: u64,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let now = handle.clock.instant(now_us)?;
        let cap = (bps != 0).then_some(bps);
        handle
            .router
            .set_bandwidth_cap(SessionId(session), cap, now)?;
        Ok(())
    })
}

/// Stops accepting joins (`calls_router_join` returns `CALLS_RESULT_DRAINING`); sessions
/// already in calls go on. For a graceful shutdown or a rolling upgrade.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_start_draining(router: *mut calls_router) -> calls_result {
    with_router(router, |handle| {
        handle.router.start_draining();
        Ok(())
    })
}

/// Starts recording call `call`: from now on the sources it takes are written into files,
/// which come out of `calls_router_poll_output` as `CALLS_OUTPUT_KIND_RECORD` outputs
/// (`started`, then per source `file_started`, `data`…, `file_finished`; see
/// docs/recording.md). `sessions` lists the sessions to record (`sessions_len` of them);
/// `sessions_len` 0 records everyone, also those who join later (`sessions` may then be
/// NULL). `sources` is `CALLS_RECORD_*` bits (`CALLS_RECORD_ALL`). Sessions joined without
/// being recordable are left out either way. Every member gets a `recording` signaling
/// message. Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER` (also `sessions` NULL with `sessions_len` > 0),
/// `CALLS_RESULT_INVALID_UTF8`, `CALLS_RESULT_INVALID_ARGUMENT` (unknown or no source bits,
/// `now_us`), `CALLS_RESULT_UNKNOWN_CALL` (nobody is in `call`),
/// `CALLS_RESULT_ALREADY_RECORDING`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_start_recording(
    router: *mut calls_router,
    call: *const c_char,
    sessions: *const u64,
    sessions_len: usize,
    sources: u32,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let call = boundary::str_arg(call, "call")?;
        if sources & !CALLS_RECORD_ALL != 0 || sources == 0 {
            return Err(Failure::new(
                calls_result::InvalidArgument,
                format!("`sources` {sources:#x} must be CALLS_RECORD_* bits, at least one"),
            ));
        }
        let options = if sessions_len == 0 {
            RecordingOptions::everyone()
        } else {
            let ids = boundary::slice_arg(sessions, sessions_len, "sessions")?;
            RecordingOptions::sessions(ids.iter().copied().map(SessionId).collect())
        }
        .with_sources(
            sources & CALLS_RECORD_AUDIO != 0,
            sources & CALLS_RECORD_CAMERA != 0,
            sources & CALLS_RECORD_SCREEN != 0,
        );
        let now = handle.clock.instant(now_us)?;
        handle
            .router
            .start_recording(&CallId::from(call), options, now)?;
        Ok(())
    })
}

/// Stops call `call`'s recording: what its reorder buffers hold is written, every file is
/// finished (`file_finished` with its start offset and duration), then `stopped`. Every
/// member gets a `recording` signaling message. Drain `calls_router_poll_output` afterwards.
/// (A recording also stops by itself when everyone has left the call.)
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`), `CALLS_RESULT_UNKNOWN_CALL`,
/// `CALLS_RESULT_NOT_RECORDING`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_stop_recording(
    router: *mut calls_router,
    call: *const c_char,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let call = boundary::str_arg(call, "call")?;
        let now = handle.clock.instant(now_us)?;
        handle.router.stop_recording(&CallId::from(call), now)?;
        Ok(())
    })
}

/// Writes whether call `call` is being recorded to `*out` (false for a call nobody is in).
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_is_recording(
    router: *mut calls_router,
    call: *const c_char,
    out: *mut bool,
) -> calls_result {
    with_router(router, |handle| {
        let call = boundary::str_arg(call, "call")?;
        let recording = handle.router.is_recording(&CallId::from(call));
        boundary::write_out(out, recording, "out")
    })
}

/// Feeds one UDP datagram received on the media port: `source` is the remote address it came
/// from, `destination` the local address it arrived on (the socket's bound address is fine).
/// Garbage, unknown and unauthenticated datagrams are dropped silently and counted in the
/// metrics: that is not an error. Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time. `data` is only read during the call.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER` (`data` may be NULL only if `len` is 0),
/// `CALLS_RESULT_INVALID_ADDRESS`, `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`),
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_handle_datagram(
    router: *mut calls_router,
    source: *const calls_address,
    destination: *const calls_address,
    data: *const u8,
    len: usize,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let source = socket_addr_arg(source, "source")?;
        let destination = socket_addr_arg(destination, "destination")?;
        let contents = boundary::bytes_arg(data, len, "data")?;
        let now = handle.clock.instant(now_us)?;
        handle.router.handle_datagram(
            Datagram {
                proto: Proto::Udp,
                source,
                destination,
                contents,
            },
            now,
        );
        Ok(())
    })
}

/// Announces an accepted ICE-TCP connection on the TCP media port, before any of its bytes.
/// `conn` is a number you choose, unique among open connections (e.g. a counter); `remote`
/// is the peer's address, `local` the address it connected to.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_ADDRESS`,
/// `CALLS_RESULT_TCP_CONNECTION_EXISTS`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_tcp_accepted(
    router: *mut calls_router,
    conn: u64,
    remote: *const calls_address,
    local: *const calls_address,
) -> calls_result {
    with_router(router, |handle| {
        let remote = socket_addr_arg(remote, "remote")?;
        let local = socket_addr_arg(local, "local")?;
        handle.router.tcp_accepted(ConnId(conn), remote, local)?;
        Ok(())
    })
}

/// Feeds bytes read from ICE-TCP connection `conn`, split anywhere (the router reassembles
/// RFC 4571 frames). On `CALLS_RESULT_TCP_*` errors the router has forgotten the connection:
/// close the socket (no `calls_router_tcp_closed` needed). Drain `calls_router_poll_output`
/// afterwards, also after an error.
///
/// Router: one thread at a time. `data` is only read during the call.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_TCP_UNKNOWN_CONNECTION`,
/// `CALLS_RESULT_TCP_FRAME_TOO_LARGE`, `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`),
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_handle_tcp_data(
    router: *mut calls_router,
    conn: u64,
    data: *const u8,
    len: usize,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let bytes = boundary::bytes_arg(data, len, "data")?;
        let now = handle.clock.instant(now_us)?;
        handle.router.handle_tcp_data(ConnId(conn), bytes, now)?;
        Ok(())
    })
}

/// The ICE-TCP connection `conn` was closed (by either side): the router forgets it.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_TCP_UNKNOWN_CONNECTION`,
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_tcp_closed(router: *mut calls_router, conn: u64) -> calls_result {
    with_router(router, |handle| {
        handle.router.tcp_closed(ConnId(conn))?;
        Ok(())
    })
}

/// Feeds one signaling message from participant `session`: JSON text as in
/// docs/signaling.md (`{"type":"offer","sdp":"…"}`, `{"type":"answer",…}`, `{"type":"mute"}`,
/// …), NUL-terminated, at most 256 KiB. Drain `calls_router_poll_output` afterwards: answers
/// and offers come out as `CALLS_OUTPUT_KIND_SIGNAL`.
///
/// A refused message (`CALLS_RESULT_SIGNAL_*`) has also been answered with an `error` message
/// to the session, which goes on; you need not do anything but drain.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_UTF8`,
/// `CALLS_RESULT_UNKNOWN_SESSION`, `CALLS_RESULT_SIGNAL_*`, `CALLS_RESULT_INVALID_ARGUMENT`
/// (`now_us`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_handle_signal(
    router: *mut calls_router,
    session: u64,
    json: *const c_char,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let text = boundary::str_arg(json, "json")?;
        let now = handle.clock.instant(now_us)?;
        handle
            .router
            .handle_signal_json(SessionId(session), text, now)?;
        Ok(())
    })
}

/// Advances time: call it when the `timeout_us` of the last `CALLS_OUTPUT_KIND_TIMEOUT` has passed
/// (calling it early is harmless). Drain `calls_router_poll_output` afterwards.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_INVALID_ARGUMENT` (`now_us`),
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_handle_timeout(
    router: *mut calls_router,
    now_us: u64,
) -> calls_result {
    with_router(router, |handle| {
        let now = handle.clock.instant(now_us)?;
        handle.router.handle_timeout(now);
        Ok(())
    })
}

/// Takes the next output into `*out`, copying its bytes (a datagram, or NUL-terminated JSON
/// text) into the caller's buffer `buf` of `buf_len` bytes; `out->len` tells how many.
///
/// **After every input** (join, leave, set_muted, set_bandwidth_cap, handle_datagram,
/// handle_tcp_data, handle_signal, handle_timeout) call this until `out->kind` is
/// `CALLS_OUTPUT_KIND_TIMEOUT`; then wait for the next input or until `out->timeout_us`.
/// Skipping the drain loses media.
///
/// If the buffer is too small, the result is `CALLS_RESULT_BUFFER_TOO_SMALL`, `out->kind` and
/// `out->len` (the size needed) are set, and the output stays queued: call again with a
/// buffer of at least `out->len` bytes. Datagrams are at most 2050 bytes; signaling text can
/// be tens of KiB (a 64 KiB buffer that grows on demand is a good choice). A timeout needs no
/// buffer (`buf` may be NULL when `buf_len` is 0).
///
/// Router: one thread at a time. The buffer is only written during the call.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_BUFFER_TOO_SMALL`,
/// `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_poll_output(
    router: *mut calls_router,
    out: *mut calls_output,
    buf: *mut u8,
    buf_len: usize,
) -> calls_result {
    with_router(router, |handle| {
        boundary::require_out(out, "out")?;
        if buf.is_null() && buf_len > 0 {
            return Err(Failure::null("buf"));
        }
        let prepared = match handle.pending.take() {
            Some(prepared) => prepared,
            None => {
                let clock = handle.clock;
                Prepared::new(
                    handle.router.poll_output(),
                    |at| clock.micros(at),
                    &mut handle.recordings,
                )
            }
        };
        let mut header = prepared.header;
        if boundary::copy_into(&prepared.bytes, buf, buf_len)? {
            header.len = prepared.len();
            boundary::write_out(out, header, "out")
        } else {
            header.len = prepared.bytes.len();
            boundary::write_out(out, header, "out")?;
            let message = format!(
                "buffer of {buf_len} bytes is too small for this output: {} needed",
                prepared.bytes.len()
            );
            handle.pending = Some(prepared);
            Err(Failure::new(calls_result::BufferTooSmall, message))
        }
    })
}

/// Writes a snapshot of every counter and gauge as JSON (fields as in docs/metrics.md) into
/// `buf`, NUL-terminated; the length without the NUL goes to `*out_len`. Pass `buf = NULL,
/// buf_len = 0` to learn the size needed.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_BUFFER_TOO_SMALL` (size needed, with
/// the NUL, in `*out_len`), `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_metrics_json(
    router: *mut calls_router,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> calls_result {
    with_router(router, |handle| {
        let json = serde_json::to_string(&handle.router.metrics()).map_err(|e| {
            Failure::new(calls_result::InvalidArgument, format!("metrics JSON: {e}"))
        })?;
        boundary::copy_text(&json, buf, buf_len, out_len)
    })
}

/// Writes the metrics in the Prometheus text exposition format (names `calls_*`) into `buf`,
/// NUL-terminated; serve it on your `/metrics` endpoint. Otherwise like
/// `calls_router_metrics_json`.
#[no_mangle]
pub extern "C" fn calls_router_metrics_prometheus(
    router: *mut calls_router,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> calls_result {
    with_router(router, |handle| {
        let text = handle
            .router
            .metrics()
            .to_prometheus_with(handle.router.config().metrics_per_session);
        boundary::copy_text(&text, buf, buf_len, out_len)
    })
}

/// Writes the number of sessions on the router to `*out`.
///
/// Router: one thread at a time.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`, `CALLS_RESULT_POISONED`.
#[no_mangle]
pub extern "C" fn calls_router_session_count(
    router: *mut calls_router,
    out: *mut usize,
) -> calls_result {
    with_router(router, |handle| {
        boundary::write_out(out, handle.router.session_count(), "out")
    })
}

/// For a dispatcher that runs one router per core on a shared port: which worker a datagram
/// from an unknown 5-tuple belongs to, read from the ICE ufrag of a STUN binding request
/// (the `worker_index` each router's config was given). Writes the index (0–255) to
/// `*out_worker`, or -1 if the datagram names no worker (drop it). Needs no router.
/// Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER`.
#[no_mangle]
pub extern "C" fn calls_worker_of_datagram(
    data: *const u8,
    len: usize,
    out_worker: *mut i32,
) -> calls_result {
    boundary::guard(|| {
        boundary::require_out(out_worker, "out_worker")?;
        let bytes = boundary::bytes_arg(data, len, "data")?;
        let worker = Router::worker_of_datagram(bytes).map_or(-1, i32::from);
        boundary::write_out(out_worker, worker, "out_worker")
    })
}

#[cfg(test)]
impl calls_router {
    /// Runs `body` on a router the way every entry point does (for the poisoning test).
    pub(crate) fn run_for_test(
        router: *mut calls_router,
        body: impl FnOnce(&mut calls_router) -> Result<(), Failure>,
    ) -> calls_result {
        with_router(router, body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::ptr;

    use super::*;
    use crate::output::calls_output_kind;

    fn new_router() -> *mut calls_router {
        let mut router = ptr::null_mut();
        let config = c"{}";
        assert_eq!(
            calls_router_new_json(config.as_ptr(), 1_000, &mut router),
            calls_result::Ok
        );
        router
    }

    #[test]
    fn a_panic_poisons_the_router_and_only_free_still_works() {
        let router = new_router();
        let result = calls_router::run_for_test(router, |_| panic!("injected"));
        assert_eq!(result, calls_result::Panic);
        let (call, user) = (c"c", c"u");
        let join = calls_router_join(router, call.as_ptr(), 1, user.as_ptr(), 15, 2_000);
        assert_eq!(join, calls_result::Poisoned);
        assert_eq!(
            calls_router_handle_timeout(router, 3_000),
            calls_result::Poisoned
        );
        let mut out = std::mem::MaybeUninit::<calls_output>::uninit();
        assert_eq!(
            calls_router_poll_output(router, out.as_mut_ptr(), ptr::null_mut(), 0),
            calls_result::Poisoned
        );
        assert_eq!(calls_router_free(router), calls_result::Ok);
    }

    #[test]
    fn timeouts_come_back_on_the_callers_clock() {
        let router = new_router();
        let mut out = std::mem::MaybeUninit::<calls_output>::uninit();
        assert_eq!(
            calls_router_poll_output(router, out.as_mut_ptr(), ptr::null_mut(), 0),
            calls_result::Ok
        );
        // SAFETY: poll_output returned OK, so it wrote the output.
        let out = unsafe { out.assume_init() };
        assert_eq!(out.kind, calls_output_kind::Timeout);
        // Idle: one second after the last input (creation at 1000 µs).
        assert_eq!(out.timeout_us, 1_000 + 1_000_000);
        assert_eq!(calls_router_free(router), calls_result::Ok);
    }

    #[test]
    fn clock_round_trips_and_rounds_deadlines_up() {
        let origin = Instant::now();
        let clock = Clock {
            origin,
            origin_us: 500,
        };
        let at = clock.instant(1_500).unwrap();
        assert_eq!(at - origin, Duration::from_millis(1));
        assert_eq!(clock.micros(at), 1_500);
        assert_eq!(clock.micros(at + Duration::from_nanos(1)), 1_501);
        assert!(clock.instant(u64::MAX).is_err());
    }
}
