//! Bench harness for calls: build a call with real str0m client peers, then measure the
//! router's forwarding path on fresh encrypted packets, next to a str0m-chat-style baseline and
//! the machine's limits (see `benches/forwarding.rs`, `benches/udp.rs`, `docs/performance.md`).
//!
//! Both calls work the same way, so their numbers compare:
//! - **Set-up** (untimed): publishers and subscribers are real str0m client `Rtc`s that do ICE,
//!   DTLS-SRTP and SDP with the server side in memory.
//! - **Generate** (untimed): the publisher writes its next media packets (its own clock runs
//!   ahead at the media rate), str0m encrypts them; these are new packets, so SRTP replay
//!   protection on the server side accepts them. Non-media datagrams (STUN, RTCP) are handed
//!   over untimed.
//! - **Route** (timed): each media datagram goes through the server exactly as an embedder would
//!   feed it: demux → SRTP decrypt → rewrite → SRTP encrypt → transmit, outputs drained and
//!   dropped. The server clock advances [`STEP`] per datagram, so timers fire at about the rate
//!   they would at bench speed.
//! - **Maintain** (untimed): the server's replies reach the publisher (STUN, RTCP) and the
//!   subscribers keep their ICE consent alive; forwarded media to subscribers is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench harness: a failed set-up is a bug

pub mod alloc;
pub mod baseline;
pub mod fuzz_bodies;
pub mod ours;

use std::time::Duration;

/// Server clock advance per routed datagram (≈ real time at ~100 k incoming packets/s).
pub const STEP: Duration = Duration::from_micros(10);

/// How the server clock advances while datagrams are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerClock {
    /// [`STEP`] per datagram: about real time at bench speed, so per-session timers fire at
    /// the rate a loaded server sees them (many calls, each at its real media rate).
    Step,
    /// Each media datagram at its publisher's send time (at least [`STEP`] after the previous
    /// one): the server sees one call at its real media rate. Needed wherever the router
    /// measures rates in its own time (simulcast layer bit rates); every timer of the call then
    /// fires once per real interval, which costs more per packet than under [`ServerClock::Step`].
    Media,
}

/// What the publishers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// Opus, 60–120 B payloads, one packet per 20 ms.
    Audio,
    /// VP8, 600–1100 B payloads (keyframes 15 × 1100 B).
    Video,
}

/// RFC 7983 + RFC 5761: an RTP (not RTCP) packet.
pub fn is_rtp_media(datagram: &[u8]) -> bool {
    datagram.len() >= 12
        && (128..=191).contains(&datagram[0])
        && !(192..=223).contains(&datagram[1])
}

/// Whether the benches run in test mode (`cargo test --benches`, `cargo bench -- --test`):
/// scenarios are scaled down so CI stays fast.
pub fn test_mode() -> bool {
    std::env::args().any(|a| a == "--test") || cfg!(debug_assertions)
}
