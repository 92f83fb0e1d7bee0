//! # calls-core: a sans-IO WebRTC media router (SFU)
//!
//! `calls-core` routes the audio, camera and screen-share RTP of group calls without decoding
//! it. It does no I/O of its own: no sockets, threads, clocks or async runtime. The embedder —
//! a chat server running calls in-process, the reference daemon, a C program, a Python load
//! test — feeds it datagrams, signaling messages and time, and drains what it must send.
//!
//! Many calls share **one UDP port and one TCP port** (default 8443 for both; ICE-TCP with
//! RFC 4571 framing, passive candidates): the [`Router`] classifies every datagram
//! (RFC 7983), finds its session by 5-tuple in O(1), and admits a new 5-tuple only through a
//! STUN binding request that authenticates against a session's ICE password. Everything else is
//! dropped without a reply and counted ([`MetricsSnapshot::drops`]).
//!
//! Each participant is a [str0m](https://docs.rs/str0m) `Rtc` in ICE-lite, RTP mode: DTLS-SRTP,
//! SDP offer/answer (with router-initiated renegotiation when others publish or leave), NACK/RTX
//! and RTCP come from str0m; the router rewrites sequence numbers and timestamps per subscriber,
//! aggregates keyframe requests, and enforces each session's [`Grants`].
//!
//! ## Where things live
//! | module | concern |
//! |---|---|
//! | [`router`] | the [`Router`]: inputs, outputs, timers, sessions, calls |
//! | [`demux`] | RFC 7983 classification, 5-tuple flows, STUN admission, worker ufrags |
//! | [`tcp`] | ICE-TCP: RFC 4571 framing per connection, bounded reassembly |
//! | `session` | one str0m `Rtc` per participant, grant enforcement on offers |
//! | `call` | who is in a call and what they publish |
//! | `forward` | per-subscriber RTP rewriting, keyframe detection, VP8 picture-id continuity |
//! | `layers` | simulcast/temporal layer measurement and the per-subscriber bandwidth allocator |
//! | `speaker` | voice activity from RFC 6464 audio levels, active speaker, top-N audio |
//! | [`record`] | recording: a tap on forwarding that writes Ogg/Opus and IVF files, no decoding |
//! | [`relay`] | relay links: one call's tracks shared between routers (workers, nodes) |
//! | `red` | RFC 2198 redundant audio (primary block) and Opus in-band FEC flags, read in place |
//! | [`signal`] | typed JSON signaling messages |
//! | [`metrics`] | counters, snapshot, Prometheus text |
//! | [`config`] | [`Config`] with defaults and `validate()` |
//! | [`load`] | overload: the embedder's [`Load`] reports, the router's [`LoadLevel`] |
//! | [`error`] | [`RouterError`], [`SignalError`], [`ConfigError`] |
//! | `sim` (feature `sim`) | deterministic network + str0m client peers for tests |
//!
//! ## The drive loop
//! After **every** input (`handle_datagram`, `handle_signal`, `handle_timeout`, `join`, …)
//! drain [`Router::poll_output`] until it returns [`Output::Timeout`]; then wait for the next
//! datagram, signaling message or that timeout. A router is `Send`: run one per core and pin
//! each call to one router (hash the call id).
//!
//! ```no_run
//! use std::net::UdpSocket;
//! use std::time::Instant;
//! use calls_core::{CallId, Config, Datagram, Grants, Output, Proto, Router, SessionId};
//!
//! # fn deliver_signal(_: SessionId, _: String) {}
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let socket = UdpSocket::bind("127.0.0.1:8443")?;
//! let local = socket.local_addr()?;
//! let mut router = Router::new(Config::default(), Instant::now())?;
//! router.join(CallId::from("standup"), SessionId(1), "alice".into(), Grants::ALL, Instant::now())?;
//! // ... the client's offer arrives on your signaling channel:
//! // router.handle_signal_json(SessionId(1), &offer_json, Instant::now())?;
//! let mut buf = vec![0u8; 2048];
//! loop {
//!     // 1. Drain every output.
//!     let deadline = loop {
//!         match router.poll_output() {
//!             Output::Transmit(t) => { socket.send_to(&t.contents, t.destination)?; }
//!             Output::Signal(session, msg) => deliver_signal(session, msg.to_json()),
//!             Output::Event(event) => println!("{event:?}"),
//!             Output::Timeout(at) => break at,
//!             _ => {}
//!         }
//!     };
//!     // 2. Wait for a datagram or the deadline, then feed exactly one input.
//!     let wait = deadline.saturating_duration_since(Instant::now());
//!     socket.set_read_timeout(Some(wait.max(std::time::Duration::from_millis(1))))?;
//!     match socket.recv_from(&mut buf) {
//!         Ok((n, source)) => router.handle_datagram(
//!             Datagram { proto: Proto::Udp, source, destination: local, contents: &buf[..n] },
//!             Instant::now(),
//!         ),
//!         Err(_) => router.handle_timeout(Instant::now()),
//!     }
//! }
//! # }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod call;
pub mod config;
mod consent;
pub mod demux;
pub mod error;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod ids;
mod layers;
mod limits;
pub mod load;
pub mod metrics;
pub mod record;
mod red;
pub mod relay;
pub mod router;
mod session;
pub mod signal;
#[cfg(feature = "sim")]
pub mod sim;
mod slot;
mod speaker;
pub mod tcp;

pub use config::Config;
pub use demux::{DropReason, Proto};
pub use error::{ConfigError, RouterError, SignalError};
pub use ids::{CallId, Grants, SessionId, TrackSource, UserId};
pub use load::{Load, LoadLevel};
pub use metrics::MetricsSnapshot;
pub use record::{RecordOutput, RecordingOptions};
pub use relay::LinkId;
pub use router::{Datagram, Event, LeaveReason, Output, Router, Transmit};
pub use signal::{
    ClientMessage, RosterEntry, ServerMessage, SlotInfo, SlotKind, MAX_PINS, PROTOCOL_VERSION,
};
pub use tcp::{ConnId, TcpError};

/// Re-export of the str0m version this crate is built on (for embedders' test peers).
pub use str0m;
