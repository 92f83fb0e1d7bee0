//! Opus RED (RFC 2198) and in-band FEC through the router, on the deterministic simulated
//! network: a RED publisher (as Chromium) heard by a RED subscriber (as is) and a plain-Opus
//! one (as Firefox or aiortc: the primary block only), and the loss the router would report to
//! a publisher's encoder. Every payload carries its publisher's own sequence number and RTP
//! time (`sim::encoder`), so a receiver checks that it got the right block with the right
//! numbers.
//!
//! Run with `cargo test -p calls-core --test red`.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{epoch, secs, speaker_announced, stats};

use calls_core::sim::{Impairment, PeerOptions, SimWorld, TrackStats};
use calls_core::{Config, SessionId, TrackSource};

const MIC: TrackSource = TrackSource::Microphone;

fn world(seed: u64, config: Config) -> SimWorld {
    SimWorld::with_config(seed, epoch(), config)
}

/// Alice publishes RED, Carol takes RED, Bob only plain Opus; all audio only.
fn red_call(seed: u64, config: Config) -> (SimWorld, [SessionId; 3]) {
    let mut world = world(seed, config);
    let alice = world.add_peer("room", "alice", PeerOptions::audio_only().with_red());
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    let carol = world.add_peer("room", "carol", PeerOptions::audio_only().with_red());
    let heard = world.run_until(
        |w| stats(w, bob, alice, MIC).packets > 0 && stats(w, carol, alice, MIC).packets > 0,
        secs(5.0),
    );
    assert!(heard, "alice is not heard{}", describe(&world));
    (world, [alice, bob, carol])
}

fn describe(world: &SimWorld) -> String {
    let mut out = format!("\nat {:?}: {:?}", world.elapsed(), world.metrics());
    for p in world.peers() {
        for (tx, src, t) in p.received() {
            out += &format!(
                "\n  {} <- {tx} {src:?}: packets={} red={} checked={} unreadable={} offsets={} gaps={} missing={}",
                p.session(),
                t.packets,
                t.red_packets,
                t.audio_checked,
                t.audio_unreadable,
                t.audio_offset_changes,
                t.gaps,
                t.missing,
            );
        }
    }
    out
}

/// What `rx` got of `tx`'s microphone between two snapshots.
fn delta(before: &TrackStats, after: &TrackStats) -> (u64, u64, u64) {
    (
        after.packets - before.packets,
        after.red_packets - before.red_packets,
        after.audio_checked - before.audio_checked,
    )
}

#[test]
fn red_is_forwarded_to_red_subscribers() {
    let (mut world, [alice, _bob, carol]) = red_call(171, Config::default());
    let before = stats(&world, carol, alice, MIC);
    let m0 = world.metrics();
    world.run_for(secs(5.0));
    let after = stats(&world, carol, alice, MIC);
    let (packets, red, checked) = delta(&before, &after);
    let sent = world.peer(alice).sent(MIC).packets;
    assert!(
        packets >= 240,
        "carol got {packets} packets in 5 s{}",
        describe(&world)
    );
    // Every packet came as RED, whole: its primary is alice's packet, its redundant block the
    // one before, with the numbers alice gave them (rebased as one stream).
    assert_eq!(red, packets, "not all RED{}", describe(&world));
    assert_eq!(checked, packets);
    assert_eq!(after.audio_unreadable, 0);
    assert_eq!(after.red_redundancy_wrong, 0);
    assert_eq!(after.audio_offset_changes, 0, "{}", describe(&world));
    assert_eq!((after.gaps, after.timestamp_regressions), (0, 0));
    let m = world.metrics();
    assert_eq!(
        m.red_streams, 2,
        "alice's and carol's microphones are RED streams"
    );
    assert!(m.red_packets_in - m0.red_packets_in >= 240);
    assert!(sent >= after.packets);
    assert_eq!(m.red_malformed, 0);
    // Carol negotiated RED: nothing was stripped for her.
    let carol_stats = m.session_stats.iter().find(|s| s.session == carol);
    assert_eq!(carol_stats.map(|s| s.red_stripped), Some(0));
}

#[test]
fn red_is_stripped_for_plain_opus_subscribers() {
    let (mut world, [alice, bob, _carol]) = red_call(172, Config::default());
    let before = stats(&world, bob, alice, MIC);
    world.run_for(secs(5.0));
    let after = stats(&world, bob, alice, MIC);
    let (packets, red, checked) = delta(&before, &after);
    assert!(
        packets >= 240,
        "bob got {packets} packets in 5 s{}",
        describe(&world)
    );
    // Plain Opus only: every packet is alice's primary block (its TOC first, not a RED
    // header), carrying the sequence number and timestamp alice sent it with, rebased by the
    // same offset throughout: the redundant block was never taken for the primary.
    assert_eq!(
        red,
        0,
        "bob got RED he did not negotiate{}",
        describe(&world)
    );
    assert_eq!(checked, packets, "{}", describe(&world));
    assert_eq!(after.audio_unreadable, 0);
    assert_eq!(after.audio_offset_changes, 0, "{}", describe(&world));
    assert_eq!((after.gaps, after.late_or_duplicate), (0, 0));
    assert_eq!(after.timestamp_regressions, 0);
    let m = world.metrics();
    let bob_stripped = m
        .session_stats
        .iter()
        .find(|s| s.session == bob)
        .map_or(0, |s| s.red_stripped);
    assert!(
        bob_stripped >= after.packets && m.red_stripped == bob_stripped,
        "stripped: bob {bob_stripped}, total {}, bob received {}",
        m.red_stripped,
        after.packets
    );
}

#[test]
fn plain_opus_publisher_reaches_red_subscribers_as_plain_opus() {
    let (mut world, [alice, bob, carol]) = red_call(173, Config::default());
    world.run_for(secs(3.0));
    // Bob publishes plain Opus: carol (RED) and alice (RED) get it as it is.
    for rx in [alice, carol] {
        let t = stats(&world, rx, bob, MIC);
        assert!(t.packets >= 100, "{rx} hears bob: {}", t.packets);
        assert_eq!((t.red_packets, t.audio_unreadable), (0, 0));
        assert_eq!(t.audio_checked, t.packets);
    }
}

/// Payload types are per subscriber: a plain-Opus subscriber on payload type 109 (as Firefox)
/// gets the stripped primary on 109 (its str0m would drop any type it did not negotiate), while
/// the RED subscriber gets RED on its RED type.
#[test]
fn payload_types_are_mapped_per_subscriber() {
    let mut world = world(178, Config::default());
    let alice = world.add_peer("room", "alice", PeerOptions::audio_only().with_red());
    let dave = world.add_peer("room", "dave", PeerOptions::audio_only().opus_pt(109));
    let carol = world.add_peer("room", "carol", PeerOptions::audio_only().with_red());
    world.run_for(secs(4.0));
    let to_dave = stats(&world, dave, alice, MIC);
    assert!(
        to_dave.packets >= 150,
        "dave hears alice: {}{}",
        to_dave.packets,
        describe(&world)
    );
    assert_eq!((to_dave.red_packets, to_dave.audio_unreadable), (0, 0));
    assert_eq!(to_dave.audio_checked, to_dave.packets);
    assert_eq!(to_dave.audio_offset_changes, 0);
    let to_carol = stats(&world, carol, alice, MIC);
    assert!(to_carol.packets >= 150);
    assert_eq!(to_carol.red_packets, to_carol.packets);
    // Dave's own Opus on 109 reaches the RED subscribers as plain Opus on their type.
    let from_dave = stats(&world, carol, dave, MIC);
    assert!(from_dave.packets >= 150);
    assert_eq!(
        (from_dave.red_packets, from_dave.audio_checked),
        (0, from_dave.packets)
    );
}

/// RED headers can lie: a redundant block claiming more bytes than the packet has is dropped
/// for everyone and counted, never forwarded (a RED subscriber's decoder would choke on it, a
/// plain one would get garbage as Opus), and the stream goes on around it.
#[test]
fn lying_red_packets_are_dropped_and_counted() {
    let mut world = world(179, Config::default());
    let mut liar = PeerOptions::audio_only().with_red();
    liar.red_lie_every = Some(10);
    let alice = world.add_peer("room", "alice", liar);
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    let carol = world.add_peer("room", "carol", PeerOptions::audio_only().with_red());
    world.run_for(secs(5.0));
    let m = world.metrics();
    let sent = world.peer(alice).sent(MIC).packets;
    assert!(sent >= 240);
    // One in ten lies (the very first RED packet has no redundant block to lie about).
    assert!(
        m.red_malformed * 10 + 10 >= sent && m.red_malformed * 10 <= sent + 10,
        "{} malformed of {sent}",
        m.red_malformed
    );
    for rx in [bob, carol] {
        let t = stats(&world, rx, alice, MIC);
        assert!(
            t.packets + m.red_malformed + 5 >= sent,
            "{rx} got {} of {sent}",
            t.packets
        );
        assert!(t.packets + m.red_malformed <= sent);
        // What arrived is intact: a primary or a whole RED packet, with the right numbers.
        assert_eq!((t.audio_unreadable, t.red_redundancy_wrong), (0, 0));
        assert_eq!(t.audio_checked, t.packets);
        assert_eq!(t.audio_offset_changes, 0);
    }
}

#[test]
fn red_off_by_config_negotiates_plain_opus() {
    let mut config = Config::default();
    config.red = false;
    let (mut world, [alice, bob, carol]) = red_call(174, config);
    world.run_for(secs(3.0));
    for rx in [bob, carol] {
        let t = stats(&world, rx, alice, MIC);
        assert!(t.packets >= 100);
        assert_eq!(t.red_packets, 0, "{rx} got RED with RED off");
        assert_eq!(t.audio_checked, t.packets);
    }
    let m = world.metrics();
    assert_eq!((m.red_packets_in, m.red_streams, m.red_stripped), (0, 0, 0));
}

#[test]
fn audio_level_and_speaker_work_with_red() {
    let mut world = world(175, Config::default());
    let peers: Vec<SessionId> = (0..4)
        .map(|i| {
            world.add_peer(
                "room",
                format!("p{i}"),
                PeerOptions::audio_only().with_red(),
            )
        })
        .collect();
    for &p in &peers {
        world.peer_mut(p).set_silent(true);
    }
    world.run_for(secs(3.0));
    assert_eq!(
        speaker_announced(&world, peers[3]),
        None,
        "silence made a speaker"
    );

    // The level comes from the RFC 6464 header extension, which RED leaves alone.
    world.peer_mut(peers[0]).set_silent(false);
    let ok = world.run_until(
        |w| speaker_announced(w, peers[3]) == Some(Some(peers[0])),
        secs(3.0),
    );
    assert!(ok, "p0 never became the speaker{}", describe(&world));
    world.peer_mut(peers[0]).set_silent(true);
    world.peer_mut(peers[1]).set_silent(false);
    let ok = world.run_until(
        |w| speaker_announced(w, peers[3]) == Some(Some(peers[1])),
        secs(4.0),
    );
    assert!(ok, "the speaker did not follow p1{}", describe(&world));
    assert!(world.metrics().red_packets_in > 0);

    // Mute stops p1's RED audio at the others; unmute brings it back without a gap.
    world.set_muted(peers[1], true);
    world.run_for(secs(0.2));
    let at_mute = stats(&world, peers[2], peers[1], MIC).packets;
    world.run_for(secs(1.0));
    assert_eq!(stats(&world, peers[2], peers[1], MIC).packets, at_mute);
    world.set_muted(peers[1], false);
    world.run_for(secs(1.5));
    let t = stats(&world, peers[2], peers[1], MIC);
    assert!(
        t.packets > at_mute + 50,
        "no audio after unmute{}",
        describe(&world)
    );
    assert_eq!(
        (t.gaps, t.red_packets, t.audio_unreadable),
        (0, t.packets, 0)
    );
}

#[test]
fn fec_bearing_opus_packets_are_counted() {
    let mut world = world(176, Config::default());
    let alice = world.add_peer(
        "room",
        "alice",
        PeerOptions::audio_only().with_red().with_opus_fec(),
    );
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    world.run_for(secs(3.0));
    let m = world.metrics();
    let from_alice = world.peer(alice).sent(MIC).packets;
    let from_bob = world.peer(bob).sent(MIC).packets;
    // Alice's packets (RED: read in the primary block) carry FEC; bob's do not.
    assert!(from_alice > 100 && from_bob > 100);
    assert!(
        m.opus_fec_packets + 5 >= from_alice && m.opus_fec_packets <= from_alice,
        "FEC packets {} of alice's {from_alice}",
        m.opus_fec_packets
    );
}

#[test]
fn loss_reported_to_publisher_reflects_listeners() {
    let mut world = world(177, Config::default());
    let alice = world.add_peer("room", "alice", PeerOptions::audio_only().with_red());
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    let carol = world.add_peer("room", "carol", PeerOptions::audio_only().with_red());
    world.run_for(secs(2.0));
    let listener_loss = |w: &SimWorld, s: SessionId| {
        w.metrics()
            .session_stats
            .iter()
            .find(|x| x.session == s)
            .and_then(|x| x.listener_loss)
    };
    // What alice's encoder is told: the `fraction lost` of the router's receiver reports on
    // the wire (str0m sends one for audio every 5 s; the floor is set on the router's tick).
    let on_the_wire = |w: &SimWorld| w.peer(alice).reported_audio_loss().unwrap_or(0.0);
    // Clean links: nothing to report beyond the (clean) uplink.
    world.run_for(secs(4.0));
    assert_eq!(listener_loss(&world, alice), Some(0.0));
    assert!(on_the_wire(&world) < 0.02, "{}", on_the_wire(&world));

    // Bob's downlink loses 10 %: alice's encoder should plan for bob, though her own uplink is
    // clean. (Carol's is clean: the worst listener counts.)
    let lossy = Impairment::default().with_loss(0.10);
    world.set_peer_impairment(bob, Impairment::default(), lossy);
    world.run_for(secs(8.0));
    let reported = listener_loss(&world, alice).unwrap_or(0.0);
    assert!(
        (0.04..=0.2).contains(&reported),
        "alice would be told {reported} with bob at 10 % loss{}",
        describe(&world)
    );
    // Bob hears carol too: her report rises the same way.
    assert!(listener_loss(&world, carol).unwrap_or(0.0) >= 0.04);
    // And alice's receiver reports say so, though her own uplink is clean: after bob's next
    // report, the router's tick, and the router's next receiver report to alice (audio: every
    // 5 s).
    world.run_for(secs(6.0));
    assert!(
        on_the_wire(&world) >= 0.04,
        "alice's receiver reports say {} with bob at 10 % loss",
        on_the_wire(&world)
    );

    // A listener at 40 % loss is capped at the 20 % the encoder acts on.
    let terrible = Impairment::default().with_loss(0.40);
    world.set_peer_impairment(bob, Impairment::default(), terrible);
    world.run_for(secs(8.0));
    assert_eq!(listener_loss(&world, alice), Some(0.2));
    world.run_for(secs(6.0));
    let capped = on_the_wire(&world);
    assert!((0.19..=0.21).contains(&capped), "{capped}");

    // Bob leaves: alice's report falls back to her clean links.
    let (left, _) = world.leave(bob);
    assert!(left.is_ok());
    world.run_for(secs(1.0));
    assert_eq!(listener_loss(&world, alice), Some(0.0));
    world.run_for(secs(6.0));
    assert!(on_the_wire(&world) < 0.02, "{}", on_the_wire(&world));
}
