//! Deterministic simulation: real str0m client peers, the [`Router`](crate::Router) in the
//! middle, an in-memory network with loss/delay/jitter/bandwidth caps, and one virtual clock.
//!
//! Everything is reproducible from a seed: the network draws from a seeded RNG, peers are
//! iterated in a fixed order, and no wall clock is read (the caller passes the start `Instant`).
//!
//! - [`net`]: [`SimNet`], datagrams in flight ordered by arrival time.
//! - [`peer`]: [`SimPeer`], a participant publishing synthetic Opus and VP8 (optionally as
//!   simulcast, with temporal layers) and measuring what it receives per publisher track.
//! - [`receiver`]: what a receiver measures ([`TrackStats`]) and the slot mapping it follows
//!   ([`SlotMap`]), shared with the load tester's participants.
//! - [`encoder`]: the synthetic VP8 behind it: simulcast layer targets ([`simulcast_layers`]),
//!   the RFC 7741 payload descriptor, frame sizes.
//! - [`tcp`]: simulated ICE-TCP connections (reliable, ordered, RFC 4571 frames split at
//!   seeded-random points) for peers with [`Transport::Tcp`].
//! - [`lines`]: [`LineParticipant`], a peer on real sockets with JSON-lines signaling, for
//!   tests against real server processes.
//! - [`world`]: [`SimWorld`], the router, the peers, the network, the TCP connections and
//!   in-memory signaling on one event loop.
//! - [`relay`]: [`SimRelayPair`], two worlds whose routers share calls over a relay link
//!   that can lose frames or go silent.

pub mod encoder;
pub mod lines;
pub mod net;
pub mod peer;
pub mod receiver;
pub mod relay;
pub mod tcp;
pub mod world;

pub use encoder::{simulcast_layers, LayerSpec};
pub use lines::LineParticipant;
pub use net::{Delivery, Impairment, NetStats, SimNet};
pub use peer::{
    NegotiationCounts, PeerOptions, PeerSignal, PeerTransmit, SentStats, SimPeer, Transport,
};
pub use receiver::{Attribution, DelayHistogram, Freezes, Jitter, LayerBytes, SlotMap, TrackStats};
pub use relay::SimRelayPair;
pub use tcp::{Deframer, TcpDirStats, TcpStats};
pub use world::{SimRecordedFile, SimWorld};
