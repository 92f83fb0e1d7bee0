//! The panic boundary and the pointer helpers every entry point goes through.
//!
//! Entry points never touch a raw pointer themselves: they call these helpers, which check for
//! NULL and validity and hold the crate's `unsafe` blocks with their justification. The safety
//! contract they rely on is the one `calls.h` states for every function: a non-NULL pointer
//! points to memory of the documented size that stays valid for the duration of the call.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::result::{calls_result, set_last_error};

/// A failed call: its code and the message for `calls_last_error_message`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: calls_result,
    pub message: String,
}

impl Failure {
    pub fn new(code: calls_result, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn null(name: &str) -> Self {
        Failure::new(calls_result::NullParameter, format!("`{name}` is NULL"))
    }
}

/// Runs an entry point's body: catches panics and turns the outcome into a code, remembering
/// the message of a failure as this thread's last error.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> calls_result {
    settle(catch_unwind(AssertUnwindSafe(body)))
}

/// Turns the outcome of a caught body into a result code (and the last error message).
pub(crate) fn settle(outcome: std::thread::Result<Result<(), Failure>>) -> calls_result {
    match outcome {
        Ok(Ok(())) => calls_result::Ok,
        Ok(Err(failure)) => {
            set_last_error(failure.message);
            failure.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last_error(format!("calls panicked (a bug): {what}"));
            calls_result::Panic
        }
    }
}

/// Writes `value` to an out-pointer.
pub(crate) fn write_out<T>(out: *mut T, value: T, name: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: `out` is not NULL, and the C contract says a non-NULL out-pointer points to a
    // writable, aligned `T`. `write` does not read or drop the (possibly uninitialised) old
    // value; all `T` written here are plain `Copy` data.
    unsafe { out.write(value) };
    Ok(())
}

/// Checks that an out-pointer is not NULL before any work is done (so a call that would fail
/// on its output has no side effects).
pub(crate) fn require_out<T>(out: *mut T, name: &str) -> Result<(), Failure> {
    if out.is_null() {
        Err(Failure::null(name))
    } else {
        Ok(())
    }
}

/// Borrows a NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(text: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if text.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: `text` is not NULL and the C contract says it points to a NUL-terminated string
    // that stays valid and unmodified for the duration of the call; the borrow does not
    // outlive the call (callers use it only inside the entry point).
    let bytes = unsafe { CStr::from_ptr(text) };
    bytes.to_str().map_err(|e| {
        Failure::new(
            calls_result::InvalidUtf8,
            format!("`{name}` is not valid UTF-8: {e}"),
        )
    })
}

/// Borrows a byte-buffer argument (`data` may be NULL only when `len` is 0).
pub(crate) fn bytes_arg<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Failure::null(name));
    }
    if len > isize::MAX as usize {
        return Err(Failure::new(
            calls_result::InvalidArgument,
            format!("`{name}` length {len} is not a buffer length"),
        ));
    }
    // SAFETY: `data` is not NULL, `len` fits a slice, and the C contract says `data` points to
    // `len` readable bytes that stay valid and unmodified for the duration of the call.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// Borrows an array-of-`u64` argument of `len` elements (`data` may be NULL only when `len`
/// is 0).
pub(crate) fn slice_arg<'a>(
    data: *const u64,
    len: usize,
    name: &str,
) -> Result<&'a [u64], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Failure::null(name));
    }
    if len > isize::MAX as usize / std::mem::size_of::<u64>() {
        return Err(Failure::new(
            calls_result::InvalidArgument,
            format!("`{name}` length {len} is not an array length"),
        ));
    }
    if !data.is_aligned() {
        return Err(Failure::new(
            calls_result::InvalidArgument,
            format!("`{name}` is not aligned for uint64_t"),
        ));
    }
    // SAFETY: `data` is not NULL, aligned, and `len` elements fit a slice; the C contract says
    // it points to `len` initialised `uint64_t`s that stay valid and unmodified for the
    // duration of the call (any bit pattern is a valid `u64`).
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// Reads a struct argument passed by pointer.
pub(crate) fn read_arg<T: Copy>(value: *const T, name: &str) -> Result<T, Failure> {
    if value.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: `value` is not NULL and the C contract says it points to an initialised, aligned
    // `T`. Only plain-integer structs are read this way, so any bit pattern is a valid `T`.
    Ok(unsafe { value.read() })
}

/// Copies bytes into the caller's buffer, or reports the size needed.
///
/// Returns `Ok(false)` and writes nothing if `buf_len < bytes.len()`. `buf` may be NULL only
/// when `buf_len` is 0.
pub(crate) fn copy_into(bytes: &[u8], buf: *mut u8, buf_len: usize) -> Result<bool, Failure> {
    if buf.is_null() && buf_len > 0 {
        return Err(Failure::null("buf"));
    }
    if bytes.len() > buf_len {
        return Ok(false);
    }
    if !bytes.is_empty() {
        // SAFETY: `buf` is not NULL (bytes is non-empty, so buf_len > 0), the C contract says
        // it points to `buf_len` writable bytes, and `bytes.len() <= buf_len`. The regions
        // cannot overlap: `bytes` is memory this library owns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
    }
    Ok(true)
}

/// Copies text NUL-terminated into the caller's buffer and its length (without the NUL) to
/// `*out_len`; if the buffer is too small, writes the required size (with the NUL) to
/// `*out_len` and fails with `CALLS_RESULT_BUFFER_TOO_SMALL`.
pub(crate) fn copy_text(
    text: &str,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> Result<(), Failure> {
    require_out(out_len, "out_len")?;
    if buf.is_null() && buf_len > 0 {
        return Err(Failure::null("buf"));
    }
    let required = text.len() + 1;
    if required > buf_len {
        write_out(out_len, required, "out_len")?;
        return Err(Failure::new(
            calls_result::BufferTooSmall,
            format!("buffer of {buf_len} bytes is too small: {required} needed"),
        ));
    }
    let buf = buf.cast::<u8>();
    copy_into(text.as_bytes(), buf, buf_len)?;
    // SAFETY: `required <= buf_len`, so index `text.len()` is inside the caller's buffer (not
    // NULL: buf_len >= 1 here and NULL with a length was refused above).
    unsafe { buf.add(text.len()).write(0) };
    write_out(out_len, text.len(), "out_len")
}
