//! # calls-py: Python bindings of calls, and its load tester
//!
//! Built by maturin (feature `extension-module`) into the Python module `calls._calls`; the
//! Python package `calls` (`python/calls/`) is its public face. Two halves:
//!
//! | module | what |
//! |---|---|
//! | [`swarm`] | the load tester's engine: simulated str0m participants on Rust threads, real UDP sockets or ICE-TCP connections, WebSocket signaling to the reference server (pure Rust, tested by `cargo test`) |
//! | [`clock`] | caller seconds ↔ `Instant`, refusing times more than 100 years from the origin (as the C ABI does) |
//! | [`ice_tcp`] | a TCP-only participant's ICE-TCP connection: non-blocking connect on its first TCP transmit, RFC 4571 framing both ways |
//! | `py` (feature `extension-module`) | the pyo3 classes: `Router` (the sans-IO router), its outputs, the `testing.Peer` helper, `Swarm`, and the exception classes |
//!
//! The shells hold no routing logic: everything is `calls_core`.

pub mod clock;
pub mod ice_tcp;
pub mod swarm;

#[cfg(feature = "extension-module")]
mod py;
