//! Helpers shared by the scenario test files (`scenarios.rs`, `simulcast.rs`, `slots.rs`,
//! `red.rs`): the virtual epoch, durations, what a peer received, and the speaker it was told of.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use calls_core::sim::{SimWorld, TrackStats};
use calls_core::{ServerMessage, SessionId, TrackSource};

/// The virtual epoch: the only wall-clock read of a test binary.
#[allow(clippy::disallowed_methods)]
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `s` seconds.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// What `rx` received of `tx`'s `src` (empty if nothing).
#[allow(dead_code)] // not every test file looks at what peers received
pub fn stats(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource) -> TrackStats {
    world
        .peer(rx)
        .received_from(tx, src)
        .cloned()
        .unwrap_or_default()
}

/// The active speaker `to` was last told of (`None`: never told; `Some(None)`: nobody speaks).
#[allow(dead_code)] // not every test file looks at speakers
pub fn speaker_announced(world: &SimWorld, to: SessionId) -> Option<Option<SessionId>> {
    world
        .peer(to)
        .signal_log()
        .filter_map(|m| match m {
            ServerMessage::Speaker { session } => Some(*session),
            _ => None,
        })
        .last()
}
