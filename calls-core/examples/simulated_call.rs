//! Three simulated participants in one call for five virtual seconds, then a report of what
//! flowed: packets and bytes per track as each peer received them, sequence gaps, keyframes,
//! and the router's metrics.
//!
//! ```text
//! cargo run -p calls-core --features sim --example simulated_call [seed] [loss_percent]
//! ```
//!
//! Everything runs on a virtual clock over an in-memory network; the same seed prints the same
//! report.

// The wall clock is read once, for the virtual epoch.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use calls_core::sim::{Impairment, PeerOptions, SimWorld};
use calls_core::TrackSource;

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let loss_percent: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0.0);

    let mut world = SimWorld::new(seed, Instant::now());
    world.set_impairment(
        Impairment::delay(Duration::from_millis(15))
            .with_jitter(Duration::from_millis(5))
            .with_loss(loss_percent / 100.0),
    );
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    let carol = world.add_peer("standup", "carol", PeerOptions::audio_only().with_screen());
    world.run_for(Duration::from_secs(5));

    println!(
        "simulated call, seed {seed}, {loss_percent}% loss, {:?} virtual, {} loop steps",
        world.elapsed(),
        world.steps()
    );
    for peer in world.peers() {
        let connected = peer
            .connected_at()
            .map(|t| {
                format!(
                    "{:?}",
                    t.saturating_duration_since(world.now() - world.elapsed())
                )
            })
            .unwrap_or_else(|| "never".into());
        println!(
            "\n{} ({}) at {} — connected after {connected}",
            peer.session(),
            peer.user(),
            peer.addr()
        );
        for source in [
            TrackSource::Microphone,
            TrackSource::Camera,
            TrackSource::Screen,
        ] {
            let sent = peer.sent(source);
            if sent.packets > 0 {
                println!(
                    "  sent {:<10} {:>5} pkts {:>8} B, {} keyframes ({} requested)",
                    source.as_str(),
                    sent.packets,
                    sent.bytes,
                    sent.keyframes,
                    sent.keyframe_requests
                );
            }
        }
        for (publisher, source, t) in peer.received() {
            println!(
                "  from {publisher} {:<10} {:>5} pkts {:>8} B, gaps {} (after first keyframe {}), late/dup {}, keyframes {}",
                source.as_str(),
                t.packets,
                t.bytes,
                t.gaps,
                t.gaps_after_keyframe,
                t.late_or_duplicate,
                t.keyframes
            );
        }
        for (mid, t) in peer.unattributed() {
            println!("  unattributed mid {mid}: {} pkts", t.packets);
        }
        let n = peer.negotiation_counts();
        println!(
            "  negotiation: {} offers sent, {} router offers ({} ignored), errors {:?}",
            n.offers_sent,
            n.offers_received,
            n.offers_ignored,
            peer.errors()
        );
    }

    let m = world.metrics();
    let net = world.net().stats();
    println!("\nnetwork: {net:?}");
    println!(
        "router: {} sessions ({} connected), {} calls, {} flows",
        m.sessions, m.connected_sessions, m.calls, m.flows
    );
    println!(
        "  datagrams in/out {}/{}, bytes in/out {}/{}",
        m.datagrams_in, m.datagrams_out, m.datagram_bytes_in, m.datagram_bytes_out
    );
    println!("  media in  {:?}", m.media_in);
    println!("  media out {:?}", m.media_out);
    println!(
        "  media dropped {}, keyframe requests in/out {}/{}, renegotiations {}, glare rollbacks {}",
        m.media_dropped,
        m.keyframe_requests_in,
        m.keyframe_requests_out,
        m.renegotiations,
        m.glare_rollbacks
    );
    println!("  drops {:?}", m.drops);
    for s in &m.session_stats {
        println!(
            "  {}: rtt {:?} ms, egress loss {:?}, ingress loss {:?}",
            s.session, s.rtt_ms, s.egress_loss, s.ingress_loss
        );
    }
    let _ = (alice, bob, carol);
}
