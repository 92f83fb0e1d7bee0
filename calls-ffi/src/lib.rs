//! # calls-ffi: the C ABI of `calls`
//!
//! A thin shell over [`calls_core::Router`] for C, C++, Go (cgo) and anything else that speaks
//! the C ABI. It builds `libcalls.so` and `libcalls.a`; the header is `include/calls.h`
//! (generated from this crate by cbindgen and committed). `docs/embedding-c.md` walks through
//! the event loop, `examples/server.c` is a complete server.
//!
//! ## Rules of the API
//! - Handles are opaque (`calls_router *`). Every function returns a [`calls_result`]
//!   (`CALLS_RESULT_OK` = 0; the numbers are stable) and writes its outputs through
//!   out-pointers. [`calls_last_error_message`](result::calls_last_error_message) gives the text of the last failure on the
//!   calling thread.
//! - NULL pointers, bad UTF-8, bad addresses and out-of-range values are errors, never crashes.
//! - Every entry point catches panics: a panic returns `CALLS_RESULT_PANIC` and poisons the
//!   router handle; every later call on it returns `CALLS_RESULT_POISONED` (only
//!   `calls_router_free` still works).
//! - Buffers belong to the caller: functions that return bytes or text take a buffer and its
//!   length and report the size they need (`CALLS_RESULT_BUFFER_TOO_SMALL`). The only thing
//!   the library allocates for the caller is the router, freed with `calls_router_free`.
//! - Time is the caller's monotonic clock in microseconds (`now_us`, e.g. from
//!   `clock_gettime(CLOCK_MONOTONIC)`); timeouts come back on the same clock.
//! - A router handle is not thread-safe: one thread at a time may use it (it may move between
//!   threads). Functions without a router handle are thread-safe.
//!
//! ## Layout
//! | module | what |
//! |---|---|
//! | [`result`] | `calls_result` codes, error mapping, the per-thread last error message |
//! | `boundary` | the panic boundary and the pointer/buffer helpers every entry point uses |
//! | [`address`] | `calls_address`, the socket address struct of the API |
//! | [`router`] | `calls_router` and its functions: the whole `Router` surface |
//! | [`output`] | `calls_output`, what `calls_router_poll_output` yields |

// This crate is the one place in the workspace where `unsafe` is allowed (the workspace denies
// it): a C ABI has to turn raw pointers into references. Every `unsafe` block carries a
// `// SAFETY:` comment, and all of them sit in small helpers in `boundary.rs` or next to them.
#![allow(unsafe_code)]
#![warn(missing_docs)]
// C naming is the point of this crate: `calls_router`, `calls_result`, …
#![allow(non_camel_case_types)]

pub mod address;
mod boundary;
pub mod output;
pub mod result;
pub mod router;

pub use address::calls_address;
pub use output::{calls_event_kind, calls_output, calls_output_kind, calls_proto};
pub use result::calls_result;
pub use router::calls_router;

use std::ffi::c_char;

/// The library version as a NUL-terminated string ("calls-ffi 0.1.0 (calls-core, str0m 0.25)").
const VERSION: &str = concat!(
    "calls-ffi ",
    env!("CARGO_PKG_VERSION"),
    " (calls-core, str0m 0.25)\0"
);

/// Writes the library version, a static NUL-terminated string, to `*out`.
///
/// The string lives as long as the library: do not free it. Thread-safe.
///
/// Errors: `CALLS_RESULT_NULL_PARAMETER` if `out` is NULL.
#[no_mangle]
pub extern "C" fn calls_version(out: *mut *const c_char) -> calls_result {
    boundary::guard(|| boundary::write_out(out, VERSION.as_ptr().cast::<c_char>(), "out"))
}
