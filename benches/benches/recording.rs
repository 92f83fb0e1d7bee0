//! Recording cost: the router with a call recorded against the same call without, in one
//! run, as µs per routed packet and as a ratio to forwarding one leg.
//!
//! `cargo bench -p calls-benches --bench recording` (numbers in docs/recording.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::Duration;

use calls_benches::ours::OursCall;
use calls_benches::{test_mode, Media, ServerClock};
use criterion::{criterion_group, criterion_main, Criterion};

/// What recording costs the router: one publisher, one subscriber (one leg), the same call
/// with and without the call recorded, timed in alternating rounds in the same run. Prints the
/// µs per routed packet of each, the difference (the recording's cost per packet of the
/// source) and its ratio to forwarding one leg. Timed by hand (like the forwarding bench's
/// `idle_listeners`): the two calls must be interleaved so that a noisy neighbour on the machine hits both alike.
/// The file bytes are counted and dropped (writing them is the embedder's cost).
fn recording(_c: &mut Criterion) {
    let packets: u64 = if test_mode() { 300 } else { 10_000 };
    let rounds = if test_mode() { 2 } else { 10 };
    for media in [Media::Audio, Media::Video] {
        let (name, clock) = match media {
            Media::Audio => ("audio", ServerClock::Step),
            Media::Video => ("video", ServerClock::Media),
        };
        let mut plain = OursCall::new(media, 1, 1).with_clock(clock);
        let mut recorded = OursCall::new(media, 1, 1).with_clock(clock);
        recorded.start_recording();
        // Untimed: video waits for the keyframe the recording asked for.
        plain.run_timed(packets);
        recorded.run_timed(packets);
        let before = recorded.recorded_bytes;
        let (mut plain_time, mut recorded_time) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..rounds {
            plain_time += plain.run_timed(packets);
            recorded_time += recorded.run_timed(packets);
        }
        let timed = (rounds * packets) as f64;
        let plain_us = plain_time.as_secs_f64() * 1e6 / timed;
        let recorded_us = recorded_time.as_secs_f64() * 1e6 / timed;
        let written = recorded.recorded_bytes - before;
        eprintln!(
            "recording {name}: forwarding one leg {plain_us:.2} us per packet, with the call recorded {recorded_us:.2} us; recording costs {:.2} us per packet of the source = {:.2}x forwarding one leg ({} B of file per packet)",
            recorded_us - plain_us,
            (recorded_us - plain_us) / plain_us,
            written / (rounds * packets),
        );
        assert!(
            written > 0,
            "recording {name}: the recorder wrote nothing while timed"
        );
    }
}

criterion_group!(benches, recording);
criterion_main!(benches);
