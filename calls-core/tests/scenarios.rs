//! Scenario tests: real str0m client peers talk to the router over a simulated network on a
//! virtual clock. Every assertion is about packets peers actually received, messages they got,
//! or router counters — never about private state.
//!
//! Run with `cargo test -p calls-core --test scenarios`.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{epoch, secs, stats};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use calls_core::sim::{
    simulcast_layers, Impairment, PeerOptions, SentStats, SimWorld, TrackStats, Transport,
};
use calls_core::{
    ClientMessage, Config, DropReason, Grants, RouterError, ServerMessage, SessionId, SignalError,
    SlotKind, TcpError, TrackSource,
};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;
const SCREEN: TrackSource = TrackSource::Screen;

fn world(seed: u64) -> SimWorld {
    SimWorld::new(seed, epoch())
}

/// Every peer in `sessions` receives every source in `sources` of every other peer.
fn everyone_receives(world: &SimWorld, sessions: &[SessionId], sources: &[TrackSource]) -> bool {
    sessions.iter().all(|&rx| {
        sessions.iter().filter(|&&tx| tx != rx).all(|&tx| {
            sources.iter().all(|&src| {
                world
                    .peer(rx)
                    .received_from(tx, src)
                    .is_some_and(|t| t.packets > 0 && (src.is_audio() || t.keyframes > 0))
            })
        })
    })
}

/// Runs until everyone in `sessions` hears and sees everyone else, or fails the test.
fn settle(world: &mut SimWorld, sessions: &[SessionId], sources: &[TrackSource]) {
    let ok = world.run_until(|w| everyone_receives(w, sessions, sources), secs(5.0));
    assert!(ok, "call did not settle: {}", describe(world));
}

/// A readable dump of who received what, for assertion messages.
fn describe(world: &SimWorld) -> String {
    let mut out = format!("\nat {:?}:", world.elapsed());
    for p in world.peers() {
        out += &format!(
            "\n  {} connected={} neg={:?} errors={:?} rtc_errors={:?} misattributed={} slots={:?}",
            p.session(),
            p.is_connected(),
            p.negotiation_counts(),
            p.errors(),
            p.rtc_errors(),
            p.misattributed(),
            p.slots()
                .iter()
                .map(|t| (t.mid.as_str(), t.kind, t.session, t.source))
                .collect::<Vec<_>>(),
        );
        for (tx, src, t) in p.received() {
            out += &format!(
                "\n    from {tx} {src:?}: {} pkts, gaps {} (after kf {}), missing {}, late/dup {}, kf {}, ssrc changes {}",
                t.packets, t.gaps, t.gaps_after_keyframe, t.missing, t.late_or_duplicate, t.keyframes, t.ssrc_changes
            );
            if !src.is_audio() {
                out += &format!(
                    "\n      frames by layer {:?} by tid {:?}, layer changes {:?}, max frame gap {:?}, picture id breaks {}, tl0 breaks {}",
                    t.frames_by_layer,
                    t.frames_by_tid,
                    t.layer_changes.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
                    t.max_frame_gap,
                    t.picture_id_breaks,
                    t.tl0_breaks
                );
            }
        }
        for (mid, t) in p.unattributed() {
            out += &format!("\n    unattributed mid {mid}: {} pkts", t.packets);
        }
    }
    out += &format!("\n  router signal errors: {:?}", world.signal_errors());
    out
}

/// Over a window, every receiver got what each sender sent, within `slack` packets still in
/// flight (audio, video), and each sender sent at least `min_sent` packets (audio, video).
/// Video slack covers the router's pacer: while a subscriber's bandwidth estimate is still
/// rising, packets sent before the window may leave it during the window (and vice versa).
fn assert_window_delivered(
    world: &SimWorld,
    before: &[(SessionId, SessionId, TrackSource, u64, u64)],
    slack: (u64, u64),
    min_sent: (u64, u64),
) {
    for (rx, tx, src, w) in window(before, world) {
        let pick = |(audio, video): (u64, u64)| if src.is_audio() { audio } else { video };
        let slack = pick(slack);
        assert!(
            w.received + slack >= w.sent && w.received <= w.sent + slack,
            "{rx} got {} of {} packets of {tx} {src:?} in the window{}",
            w.received,
            w.sent,
            describe(world)
        );
        assert!(
            w.sent >= pick(min_sent),
            "{tx} sent only {} {src:?} packets",
            w.sent
        );
    }
}

/// Every stream each of `peers` received came from another of them, attributed to a track, with
/// no sequence gap after its first keyframe, no late or duplicate packet and one SSRC throughout.
fn assert_streams_clean(world: &SimWorld, peers: &[SessionId]) {
    for &rx in peers {
        let peer = world.peer(rx);
        assert!(peer.unattributed().is_empty(), "{}", describe(world));
        for (tx, src, t) in peer.received() {
            assert!(peers.contains(&tx) && tx != rx);
            let problems = [
                ("gaps after keyframe", t.gaps_after_keyframe),
                ("late or duplicate", t.late_or_duplicate),
                ("SSRC changes", t.ssrc_changes),
            ];
            for (what, count) in problems {
                assert_eq!(
                    count,
                    0,
                    "{rx} from {tx} {src:?}: {what}{}",
                    describe(world)
                );
            }
        }
    }
}

/// Packets of `tx`'s `src` that `rx` received during a window, against what `tx` sent in it.
struct Window {
    received: u64,
    sent: u64,
}

fn window(
    before: &[(SessionId, SessionId, TrackSource, u64, u64)],
    world: &SimWorld,
) -> Vec<(SessionId, SessionId, TrackSource, Window)> {
    before
        .iter()
        .map(|&(rx, tx, src, rx0, tx0)| {
            let received = stats(world, rx, tx, src).packets - rx0;
            let sent = world.peer(tx).sent(src).packets - tx0;
            (rx, tx, src, Window { received, sent })
        })
        .collect()
}

fn snapshot(
    world: &SimWorld,
    sessions: &[SessionId],
    sources: &[TrackSource],
) -> Vec<(SessionId, SessionId, TrackSource, u64, u64)> {
    let mut out = Vec::new();
    for &rx in sessions {
        for &tx in sessions.iter().filter(|&&tx| tx != rx) {
            for &src in sources {
                out.push((
                    rx,
                    tx,
                    src,
                    stats(world, rx, tx, src).packets,
                    world.peer(tx).sent(src).packets,
                ));
            }
        }
    }
    out
}

#[test]
fn three_participants_hear_and_see_each_other() {
    let mut world = world(1);
    let peers: Vec<SessionId> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| world.add_peer("standup", *u, PeerOptions::default()))
        .collect();
    settle(&mut world, &peers, &[MIC, CAM]);

    let before = snapshot(&world, &peers, &[MIC, CAM]);
    world.run_for(secs(5.0));

    // On a perfect zero-delay wire only the packets of the last instant may be in flight: an
    // audio packet or one video frame (a keyframe is 15 packets).
    assert_window_delivered(&world, &before, (2, 40), (240, 150));
    assert_streams_clean(&world, &peers);
}

#[test]
fn late_joiner_gets_keyframe_quickly() {
    let mut world = world(2);
    world.set_impairment(Impairment::delay(Duration::from_millis(25)));
    let slow_keyframes = PeerOptions::default().keyframe_interval(secs(10.0));
    let alice = world.add_peer("standup", "alice", slow_keyframes.clone());
    let bob = world.add_peer("standup", "bob", slow_keyframes.clone());
    settle(&mut world, &[alice, bob], &[MIC, CAM]);
    world.run_until(|w| w.elapsed() >= secs(5.0), secs(10.0));
    let keyframes_before = [alice, bob].map(|s| world.peer(s).sent(CAM).keyframes);

    let carol = world.add_peer("standup", "carol", slow_keyframes);
    // Subscription set up: connected, and its camera slots negotiated.
    let subscribed = world.run_until(
        |w| {
            let c = w.peer(carol);
            c.is_connected()
                && c.slots().iter().any(|s| s.kind == SlotKind::Camera)
                && !c.has_pending_offer()
                && c.negotiation_counts().answers_sent > 0
        },
        secs(2.0),
    );
    assert!(subscribed, "carol never subscribed{}", describe(&world));
    let subscribed_at = world.now();

    let got = world.run_until(
        |w| {
            [alice, bob]
                .iter()
                .all(|&p| stats(w, carol, p, CAM).keyframes > 0)
        },
        secs(3.0),
    );
    assert!(got, "carol got no keyframe within 3 s{}", describe(&world));
    for publisher in [alice, bob] {
        let t = stats(&world, carol, publisher, CAM);
        let waited = t
            .first_keyframe_at
            .map(|k| k.saturating_duration_since(subscribed_at));
        assert!(
            waited.is_some_and(|w| w <= secs(1.0)),
            "carol waited {waited:?} for {publisher}'s keyframe (publisher interval is 10 s)"
        );
        assert_eq!(t.gaps_after_keyframe, 0, "{}", describe(&world));
    }
    // The keyframes came because someone asked: the publishers sent extra ones.
    for (i, publisher) in [alice, bob].into_iter().enumerate() {
        assert!(
            world.peer(publisher).sent(CAM).keyframes > keyframes_before[i],
            "{publisher} sent no extra keyframe"
        );
    }
}

#[test]
fn simulcast_publisher_reaches_subscriber() {
    let mut world = world(31);
    let alice = world.add_peer("standup", "alice", PeerOptions::default().with_simulcast());
    let bob = world.add_peer("standup", "bob", PeerOptions::audio_only());
    let seeing = world.run_until(|w| stats(w, bob, alice, CAM).keyframes > 0, secs(5.0));
    assert!(seeing, "bob never saw alice{}", describe(&world));

    let layers = simulcast_layers(CAM);
    let sent_before: Vec<SentStats> = layers
        .iter()
        .map(|l| world.peer(alice).sent_layer(CAM, l.rid))
        .collect();
    let received_before = stats(&world, bob, alice, CAM);
    let window = secs(5.0);
    world.run_for(window);

    // Alice sends every layer at its own rate (30 fps, keyframes included) — except those the
    // router paused because nobody watches them (dynacast; see tests/simulcast.rs).
    let paused = |rid: &str| {
        world
            .peer(alice)
            .layers_log()
            .iter()
            .any(|(_, _, active)| !active.iter().any(|a| a == rid))
    };
    for (layer, before) in layers.iter().zip(&sent_before) {
        if paused(layer.rid) {
            continue;
        }
        let now = world.peer(alice).sent_layer(CAM, layer.rid);
        let bps = (now.bytes - before.bytes) as f64 * 8.0 / window.as_secs_f64();
        let target = f64::from(layer.bitrate_bps);
        assert!(
            (bps - target).abs() <= target * 0.25,
            "layer {} sent {bps:.0} bit/s, target {target}",
            layer.rid
        );
        let frames = now.frames - before.frames;
        assert!(
            (148..=152).contains(&frames),
            "layer {}: {frames} frames",
            layer.rid
        );
    }
    assert_eq!(world.peer(alice).sent_layer(CAM, "").packets, 0);

    // Bob sees one continuous stream of whichever layer (and temporal layers) the router
    // picks for him: at least the TL0 rate (7.5 fps), still flowing at the end.
    let t = stats(&world, bob, alice, CAM);
    let frames = |t: &TrackStats| t.frames_by_layer.iter().sum::<u64>();
    assert!(
        frames(&t) - frames(&received_before) >= 35,
        "bob got {} frames in 5 s{}",
        frames(&t) - frames(&received_before),
        describe(&world)
    );
    assert!(
        t.fps_over(secs(1.0), world.now()) >= 7.0,
        "video stalled at the end{}",
        describe(&world)
    );
    assert_eq!(t.missing, 0, "{}", describe(&world));
    assert!(
        t.max_frame_gap < Duration::from_millis(200),
        "video froze for {:?}{}",
        t.max_frame_gap,
        describe(&world)
    );
    assert!(t.last_layer.is_some_and(|l| usize::from(l) < layers.len()));
}

#[test]
fn mute_stops_audio_for_everyone() {
    let mut world = world(3);
    let peers: Vec<SessionId> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| world.add_peer("standup", *u, PeerOptions::default()))
        .collect();
    let (alice, bob, carol) = (peers[0], peers[1], peers[2]);
    settle(&mut world, &peers, &[MIC, CAM]);
    world.run_for(secs(1.0));

    world.set_muted(alice, true);
    world.run_for(secs(0.1));
    for &p in &peers {
        let told = world.peer(p).signal_log().any(
            |m| matches!(m, ServerMessage::Muted { session, muted: true, .. } if *session == alice),
        );
        assert!(told, "{p} was not told that alice muted");
    }
    let mic_at_mute = [bob, carol].map(|rx| stats(&world, rx, alice, MIC).packets);
    let cam_at_mute = [bob, carol].map(|rx| stats(&world, rx, alice, CAM).packets);
    let bob_mic_at_mute = stats(&world, carol, bob, MIC).packets;
    world.run_for(secs(2.0));
    for (i, rx) in [bob, carol].into_iter().enumerate() {
        assert_eq!(
            stats(&world, rx, alice, MIC).packets,
            mic_at_mute[i],
            "{rx} still hears muted alice{}",
            describe(&world)
        );
        assert!(
            stats(&world, rx, alice, CAM).packets > cam_at_mute[i] + 100,
            "{rx} lost alice's camera while she was muted"
        );
    }
    assert!(
        stats(&world, carol, bob, MIC).packets > bob_mic_at_mute + 80,
        "bob's audio stopped too"
    );
    // Alice kept sending (silence), the router dropped it.
    assert!(world.metrics().media_dropped > 0);

    world.set_muted(alice, false);
    world.run_for(secs(2.0));
    for (i, rx) in [bob, carol].into_iter().enumerate() {
        let t = stats(&world, rx, alice, MIC);
        assert!(
            t.packets > mic_at_mute[i] + 80,
            "{rx} does not hear alice after unmute{}",
            describe(&world)
        );
        assert_eq!(
            t.gaps,
            0,
            "{rx}: sequence gap across mute{}",
            describe(&world)
        );
        assert_eq!(t.late_or_duplicate, 0);
        assert_eq!(t.ssrc_changes, 0);
    }
}

/// A muted microphone's audio slot is parked (its send stream taken out of str0m) at every
/// subscriber after 5 s, stays parked while a newcomer joins (who renegotiates nobody), and
/// carries audio again on unmute with the same SSRC, no sequence gap and nothing unattributed.
#[test]
fn idle_streams_are_parked_and_resume_intact() {
    let mut world = world(31);
    let mut peers: Vec<SessionId> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| world.add_peer("standup", *u, PeerOptions::default()))
        .collect();
    let alice = peers[0];
    settle(&mut world, &peers, &[MIC, CAM]);
    world.set_muted(alice, true);
    world.run_for(secs(6.0));
    let parked = world.metrics().streams_parked;
    assert!(
        parked >= 2,
        "alice's microphone was not parked at bob and carol ({parked} parked){}",
        describe(&world)
    );
    let mic_at_mute: Vec<u64> = peers[1..]
        .iter()
        .map(|&rx| stats(&world, rx, alice, MIC).packets)
        .collect();

    // A newcomer while alice's microphone is parked everywhere.
    let offers_before: Vec<u64> = peers[1..]
        .iter()
        .map(|&p| world.peer(p).negotiation_counts().offers_received)
        .collect();
    let dave = world.add_peer("standup", "dave", PeerOptions::default());
    let others: Vec<SessionId> = peers[1..].to_vec();
    let ok = world.run_until(
        |w| {
            others.iter().all(|&p| {
                stats(w, dave, p, MIC).packets > 0
                    && stats(w, dave, p, CAM).keyframes > 0
                    && stats(w, p, dave, MIC).packets > 0
            })
        },
        secs(5.0),
    );
    assert!(ok, "dave did not settle{}", describe(&world));
    peers.push(dave);
    world.run_for(secs(6.0));
    // Dave's idle slots are parked too; bob and carol were not renegotiated.
    let m = world.metrics();
    assert!(
        m.streams_parked > parked,
        "parked {} (before dave {parked}){}",
        m.streams_parked,
        describe(&world)
    );
    for (i, &rx) in peers[1..3].iter().enumerate() {
        assert_eq!(stats(&world, rx, alice, MIC).packets, mic_at_mute[i]);
        assert_eq!(
            world.peer(rx).negotiation_counts().offers_received,
            offers_before[i],
            "{rx} was renegotiated when dave joined"
        );
    }

    world.set_muted(alice, false);
    world.run_for(secs(2.0));
    assert!(world.metrics().streams_unparked > 0);
    for &rx in &peers[1..] {
        let t = stats(&world, rx, alice, MIC);
        let before = peers[1..3]
            .iter()
            .position(|&p| p == rx)
            .map_or(0, |i| mic_at_mute[i]);
        assert!(
            t.packets > before + 80,
            "{rx} does not hear alice after unmute{}",
            describe(&world)
        );
        assert_eq!(
            t.gaps,
            0,
            "{rx}: sequence gap across parking{}",
            describe(&world)
        );
    }
    assert_streams_clean(&world, &peers);
}

#[test]
fn leave_cleans_up_and_notifies_others() {
    let mut world = world(4);
    let peers: Vec<SessionId> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| world.add_peer("standup", *u, PeerOptions::default()))
        .collect();
    let (alice, bob, carol) = (peers[0], peers[1], peers[2]);
    settle(&mut world, &peers, &[MIC, CAM]);
    world.run_for(secs(0.5));
    let before = world.metrics();
    assert_eq!(
        (before.sessions, before.calls, before.flows),
        (3, 1, 3),
        "{before:?}"
    );
    let offers_before = [alice, bob].map(|s| world.peer(s).negotiation_counts().offers_received);

    let (result, _carol) = world.leave(carol);
    assert_eq!(result, Ok(()));
    world.run_for(secs(0.5));
    let carol_at_leave = [alice, bob].map(|rx| {
        (
            stats(&world, rx, carol, MIC).packets,
            stats(&world, rx, carol, CAM).packets,
        )
    });
    let others_before = snapshot(&world, &[alice, bob], &[MIC, CAM]);
    world.run_for(secs(1.0));

    for (i, rx) in [alice, bob].into_iter().enumerate() {
        let peer = world.peer(rx);
        assert!(
            peer.participants_left().contains(&carol),
            "{rx} not told carol left"
        );
        assert_eq!(
            peer.negotiation_counts().offers_received,
            offers_before[i],
            "{rx} was renegotiated after carol left{}",
            describe(&world)
        );
        assert!(!peer.has_pending_offer());
        assert!(
            peer.slots().iter().all(|t| t.session != Some(carol)),
            "{rx}'s slots still name carol{}",
            describe(&world)
        );
        assert_eq!(
            (
                stats(&world, rx, carol, MIC).packets,
                stats(&world, rx, carol, CAM).packets
            ),
            carol_at_leave[i]
        );
    }
    for (rx, tx, src, w) in window(&others_before, &world) {
        assert!(
            w.received + w.sent / 50 + 16 >= w.sent,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        assert_eq!(stats(&world, rx, tx, src).gaps_after_keyframe, 0);
    }
    let after = world.metrics();
    assert_eq!(
        (after.sessions, after.calls, after.flows),
        (2, 1, 2),
        "{after:?}"
    );
    assert_eq!(after.leaves, before.leaves + 1);
    assert!(world
        .events()
        .iter()
        .any(|e| matches!(e, calls_core::Event::Left { session, .. } if *session == carol)));
}

fn two_calls_never_mix(mut world: SimWorld) {
    let red: Vec<SessionId> = ["ann", "ben"]
        .iter()
        .map(|u| world.add_peer("red", *u, PeerOptions::default()))
        .collect();
    let blue: Vec<SessionId> = ["cat", "dan"]
        .iter()
        .map(|u| world.add_peer("blue", *u, PeerOptions::default()))
        .collect();
    settle(&mut world, &red, &[MIC, CAM]);
    settle(&mut world, &blue, &[MIC, CAM]);
    world.run_for(secs(3.0));

    for (mine, theirs) in [(&red, &blue), (&blue, &red)] {
        for &rx in mine.iter() {
            let peer = world.peer(rx);
            let other = mine.iter().copied().find(|&s| s != rx).unwrap_or(rx);
            for (tx, _, t) in peer.received() {
                assert_eq!(
                    tx, other,
                    "{rx} received {} packets from {tx} of the other call",
                    t.packets
                );
            }
            assert!(peer.unattributed().is_empty(), "{}", describe(&world));
            assert!(peer
                .slots()
                .iter()
                .all(|t| t.session.is_none() || t.session == Some(other)));
            assert!(peer
                .participants_joined()
                .iter()
                .all(|s| !theirs.contains(s)));
            let from_other: u64 = [MIC, CAM]
                .iter()
                .map(|&s| stats(&world, rx, other, s).packets)
                .sum();
            assert_eq!(peer.packets_received(), from_other);
            assert!(from_other > 300);
        }
    }
    let m = world.metrics();
    assert_eq!((m.sessions, m.calls, m.flows), (4, 2, 4), "{m:?}");
}

#[test]
fn two_calls_on_one_port_never_mix() {
    two_calls_never_mix(world(5));
}

#[test]
fn two_calls_on_one_ipv6_port_never_mix() {
    let mut config = Config::default();
    config.bind_address = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let world = SimWorld::with_config(55, epoch(), config);
    assert!(world.router_addr().is_ipv6());
    two_calls_never_mix(world);
}

#[test]
fn audio_survives_10_percent_loss_and_jitter() {
    let mut world = world(6);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    // Bob is on a bad network, both ways: 10 % loss, 20 ms ± 30 ms.
    let bad = Impairment::delay(Duration::from_millis(20))
        .with_loss(0.10)
        .with_jitter(Duration::from_millis(30));
    world.set_peer_impairment(bob, bad, bad);
    // Alice is on a decent one.
    let good = Impairment::delay(Duration::from_millis(10));
    world.set_peer_impairment(alice, good, good);
    settle(&mut world, &[alice, bob], &[MIC]);

    let before = snapshot(&world, &[alice, bob], &[MIC]);
    world.run_for(secs(10.0));
    for (rx, tx, _, w) in window(&before, &world) {
        assert!(w.sent >= 490, "{tx} sent {} audio packets in 10 s", w.sent);
        assert!(
            w.received * 100 >= w.sent * 80,
            "{rx} heard only {} of {} audio packets from {tx}{}",
            w.received,
            w.sent,
            describe(&world)
        );
    }
    assert!(world.net().stats().dropped_loss > 0);
}

#[test]
fn renegotiation_glare_resolves() {
    let mut world = world(7);
    world.set_signaling_delay(Duration::from_millis(40));
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    settle(&mut world, &[alice, bob], &[MIC, CAM]);

    // Carol's first offer is answered and the router offers her slots; she starts a screen
    // share while that offer is on its way: the offers cross.
    let carol = world.add_peer("standup", "carol", PeerOptions::default());
    let crossing = world.run_until(
        |w| {
            w.signals_in_flight_to(carol)
                .any(|m| matches!(m, ServerMessage::Offer { .. }))
        },
        secs(3.0),
    );
    assert!(crossing, "no router offer to carol{}", describe(&world));
    let now = world.now();
    world.peer_mut(carol).start_screen(now);

    let everyone = [alice, bob, carol];
    let done = world.run_until(
        |w| {
            everyone_receives(w, &everyone, &[MIC, CAM])
                && [alice, bob]
                    .iter()
                    .all(|&rx| stats(w, rx, carol, SCREEN).keyframes > 0)
        },
        secs(5.0),
    );
    assert!(done, "glare did not resolve{}", describe(&world));
    world.run_for(secs(1.0));

    let carol_neg = world.peer(carol).negotiation_counts();
    assert!(
        carol_neg.offers_ignored >= 1,
        "offers did not cross: {carol_neg:?}"
    );
    assert!(
        world.metrics().glare_rollbacks >= 1,
        "{:?}",
        world.metrics()
    );
    for &p in &everyone {
        let peer = world.peer(p);
        assert!(!peer.has_pending_offer(), "{p} still waits for an answer");
        assert!(
            peer.errors().is_empty() && peer.rtc_errors().is_empty(),
            "{}",
            describe(&world)
        );
        for (tx, src, t) in peer.received() {
            assert_eq!(
                t.gaps_after_keyframe,
                0,
                "{p} from {tx} {src:?}{}",
                describe(&world)
            );
        }
    }
}

// ---- garbage ----------------------------------------------------------------------------

/// A small seeded generator (SplitMix64), so the test needs no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn below(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// CRC-32 (IEEE), for STUN FINGERPRINT.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A STUN binding request (RFC 8445 §7.1) with `username`, a MESSAGE-INTEGRITY that is
/// `integrity` (20 bytes, not a real HMAC) and a correct FINGERPRINT.
fn stun_binding_request(rng: &mut Rng, username: &str, integrity: [u8; 20]) -> Vec<u8> {
    let mut attrs = Vec::new();
    let attr = |attrs: &mut Vec<u8>, typ: u16, value: &[u8]| {
        attrs.extend_from_slice(&typ.to_be_bytes());
        attrs.extend_from_slice(&(value.len() as u16).to_be_bytes());
        attrs.extend_from_slice(value);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
    };
    attr(&mut attrs, 0x0006, username.as_bytes()); // USERNAME
    attr(&mut attrs, 0x0024, &(rng.next() as u32).to_be_bytes()); // PRIORITY
    attr(&mut attrs, 0x802A, &rng.next().to_be_bytes()); // ICE-CONTROLLING
    attr(&mut attrs, 0x0008, &integrity); // MESSAGE-INTEGRITY
    let mut msg = Vec::new();
    msg.extend_from_slice(&0x0001u16.to_be_bytes());
    msg.extend_from_slice(&((attrs.len() + 8) as u16).to_be_bytes());
    msg.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    for _ in 0..12 {
        msg.push(rng.byte());
    }
    msg.extend_from_slice(&attrs);
    let fingerprint = crc32(&msg) ^ 0x5354_554E;
    msg.extend_from_slice(&0x8028u16.to_be_bytes());
    msg.extend_from_slice(&4u16.to_be_bytes());
    msg.extend_from_slice(&fingerprint.to_be_bytes());
    msg
}

fn stranger(n: u32) -> SocketAddr {
    // 198.18.0.0/15 (RFC 2544 benchmarking) — nobody in the sim lives there.
    let ip = Ipv4Addr::from(0xC612_0000 + n);
    SocketAddr::new(IpAddr::V4(ip), 1024 + (n % 60_000) as u16)
}

#[test]
fn garbage_and_unauthenticated_datagrams_are_dropped_and_counted() {
    let mut world = world(8);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    settle(&mut world, &[alice, bob], &[MIC, CAM]);
    let alice_addr = world.peer(alice).addr();
    let router_ufrag = world
        .peer(alice)
        .remote_ice_ufrag()
        .map(str::to_owned)
        .expect("router answer carries an ice-ufrag");
    world.capture_from(alice_addr, 400);
    world.run_for(secs(1.0));
    let captured: Vec<Vec<u8>> = world.captured().to_vec();
    let srtp: Vec<&Vec<u8>> = captured
        .iter()
        .filter(|d| (128..=191).contains(&d[0]))
        .collect();
    assert!(
        srtp.len() > 100,
        "captured only {} SRTP datagrams",
        srtp.len()
    );

    let base = world.metrics();
    let before = snapshot(&world, &[alice, bob], &[MIC, CAM]);
    let mut rng = Rng(8);
    let mut injected = 0u64;
    let mut replayed_same_source = 0u64;
    let mut strangers = std::collections::BTreeSet::new();

    // 100 rounds of 1000 random datagrams from 1000 sources, 10 ms apart, media flowing.
    for round in 0..100u32 {
        for i in 0..1000u32 {
            let source = stranger(rng.below(0, 1000) as u32);
            strangers.insert(source);
            let len = match i % 10 {
                0 => 0,
                1 => rng.below(1, 20) as usize,
                2 => rng.below(1500, 4000) as usize,
                _ => rng.below(20, 1500) as usize,
            };
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            if let Some(first) = bytes.first_mut() {
                // Cover every RFC 7983 class: STUN, DTLS, RTP/RTCP and the rest.
                *first = match i % 4 {
                    0 => rng.below(0, 4) as u8,
                    1 => rng.below(20, 64) as u8,
                    2 => rng.below(128, 192) as u8,
                    _ => *first,
                };
            }
            world.inject_datagram(source, &bytes);
            injected += 1;
        }

        // Targeted attacks, a few per round.
        let n = 1000 + round;
        let s = |k: u32| stranger(2000 + n * 10 + k);
        // Truncated STUN: a header cut short, and a header claiming more than is there.
        let full = stun_binding_request(&mut rng, "nosuch:peer", [0; 20]);
        world.inject_datagram(s(0), &full[..10]);
        let mut lying = full.clone();
        lying[2..4].copy_from_slice(&400u16.to_be_bytes());
        world.inject_datagram(s(1), &lying);
        // Binding requests for an unknown ufrag, and for the real one with a bad integrity.
        let unknown_ufrag = format!("zz{}:peer", rng.next() as u32);
        let unknown = stun_binding_request(&mut rng, &unknown_ufrag, [7; 20]);
        world.inject_datagram(s(2), &unknown);
        let bad_mac = stun_binding_request(&mut rng, &format!("{router_ufrag}:evil"), [9; 20]);
        world.inject_datagram(s(3), &bad_mac);
        // DTLS ClientHello-ish and RTP from strangers.
        let mut dtls = vec![22, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 1, 0, 40];
        dtls.extend((0..40).map(|_| rng.byte()));
        world.inject_datagram(s(4), &dtls);
        let mut rtp = vec![0x80, 111, 0, 1, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        rtp.extend((0..80).map(|_| rng.byte()));
        world.inject_datagram(s(5), &rtp);
        // Alice's real SRTP replayed from a stranger and from alice's own address.
        let replay = srtp[round as usize % srtp.len()];
        world.inject_datagram(s(6), replay);
        injected += 7;
        // From alice's own (authenticated) address: SRTP replay protection must discard it.
        world.inject_datagram(alice_addr, replay);
        replayed_same_source += 1;
        for k in 0..7 {
            strangers.insert(s(k));
        }

        world.run_for(Duration::from_millis(10));
    }
    world.run_for(secs(1.0));

    let m = world.metrics();
    // No reply, ever, to anyone but the two real peers.
    let replies_to_strangers: u64 = world
        .router_transmits()
        .iter()
        .filter(|(addr, _)| strangers.contains(*addr))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(replies_to_strangers, 0, "router answered strangers");
    let peer_addrs = [alice_addr, world.peer(bob).addr()];
    assert!(world
        .router_transmits()
        .keys()
        .all(|a| peer_addrs.contains(a)));
    // Memory flat.
    assert_eq!(
        (m.sessions, m.calls, m.flows),
        (base.sessions, base.calls, base.flows),
        "{m:?}"
    );
    // Every datagram from a stranger is counted as a drop, by reason. (Replays from alice's
    // own address reach her session, whose SRTP replay window discards them; the check below
    // that bob saw no duplicates covers those.)
    let dropped = m.dropped_total() - base.dropped_total();
    assert!(
        dropped >= injected,
        "only {dropped} of {injected} stranger datagrams counted as drops: {:?}",
        m.drops
    );
    assert!(replayed_same_source > 0);
    for reason in [
        DropReason::Unclassified,
        DropReason::MalformedStun,
        DropReason::UnknownUfrag,
        DropReason::StunAuthFailed,
        DropReason::UnknownSource,
        DropReason::Oversized,
    ] {
        assert!(
            m.dropped(reason) > base.dropped(reason),
            "no {reason:?} drops: {:?}",
            m.drops
        );
    }
    // The real call did not notice.
    for (rx, tx, src, w) in window(&before, &world) {
        assert!(
            w.received + w.sent / 50 + 16 >= w.sent,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        let t = stats(&world, rx, tx, src);
        assert_eq!(
            t.gaps_after_keyframe,
            0,
            "{rx} from {tx} {src:?}{}",
            describe(&world)
        );
        assert_eq!(
            t.late_or_duplicate,
            0,
            "replayed packets reached {rx}{}",
            describe(&world)
        );
    }
}

// ---- signaling ----------------------------------------------------------------------------

#[test]
fn malformed_signaling_gets_typed_error_and_other_sessions_continue() {
    let mut world = world(9);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    settle(&mut world, &[alice, bob], &[MIC, CAM]);
    world.run_for(secs(0.5));
    let before = snapshot(&world, &[alice, bob], &[MIC, CAM]);

    let is_signal_error = |r: &Result<(), RouterError>,
                           session: SessionId,
                           want: fn(&SignalError) -> bool| {
        matches!(r, Err(RouterError::Signal { session: s, error }) if *s == session && want(error))
    };

    let r = world.signal_json_now(alice, "{\"type\": \"offer\", \"sdp\": ");
    assert!(
        is_signal_error(&r, alice, |e| matches!(e, SignalError::Json(_))),
        "{r:?}"
    );
    let r = world.signal_json_now(alice, r#"{"type":"launch_rockets"}"#);
    assert!(
        is_signal_error(&r, alice, |e| matches!(e, SignalError::Json(_))),
        "{r:?}"
    );
    let r = world.signal_now(
        alice,
        ClientMessage::Offer {
            sdp: "v=0\r\nthis is not sdp\r\n".into(),
            screen_mid: None,
        },
    );
    assert!(
        is_signal_error(&r, alice, |e| matches!(e, SignalError::Sdp(_))),
        "{r:?}"
    );
    let r = world.signal_now(
        bob,
        ClientMessage::Answer {
            sdp: "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n".into(),
        },
    );
    assert!(
        is_signal_error(&r, bob, |e| matches!(e, SignalError::UnexpectedAnswer)),
        "{r:?}"
    );
    let ghost = SessionId(9999);
    assert_eq!(
        world.signal_json_now(ghost, r#"{"type":"mute"}"#),
        Err(RouterError::UnknownSession(ghost))
    );
    assert_eq!(
        world.signal_now(ghost, ClientMessage::Mute),
        Err(RouterError::UnknownSession(ghost))
    );
    world.run_for(secs(0.1));

    let codes = |s: SessionId| -> Vec<String> {
        world
            .peer(s)
            .errors()
            .iter()
            .map(|(code, _)| code.clone())
            .collect()
    };
    assert_eq!(codes(alice), ["bad_json", "bad_json", "bad_sdp"]);
    assert_eq!(codes(bob), ["unexpected_answer"]);
    assert!(world.metrics().signal_errors >= 4);

    world.run_for(secs(2.0));
    for (rx, tx, src, w) in window(&before, &world) {
        assert!(
            w.received + w.sent / 50 + 16 >= w.sent && w.sent > 50,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        assert_eq!(
            stats(&world, rx, tx, src).gaps_after_keyframe,
            0,
            "{}",
            describe(&world)
        );
    }
    // The sessions still negotiate: a screen share after the garbage works.
    let now = world.now();
    world.peer_mut(alice).start_screen(now);
    let screen = world.run_until(|w| stats(w, bob, alice, SCREEN).keyframes > 0, secs(3.0));
    assert!(
        screen,
        "alice's later screen share never reached bob{}",
        describe(&world)
    );
}

#[test]
fn thousand_join_leave_cycles_return_to_baseline() {
    let mut world = world(10);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    settle(&mut world, &[alice, bob], &[MIC, CAM]);
    world.run_for(secs(0.5));
    let base = world.metrics();
    let before = snapshot(&world, &[alice, bob], &[MIC, CAM]);

    let blackhole = Impairment::default().with_loss(1.0);
    let mut connected_cycles = 0;
    for cycle in 0..1000u32 {
        let full = cycle % 50 == 0;
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(
                10,
                100 + (cycle / 250) as u8,
                0,
                (cycle % 250) as u8 + 1,
            )),
            5000,
        );
        if !full {
            // Signaling only: the peer's datagrams never arrive, ICE never starts.
            world.net_mut().set_uplink(addr, blackhole);
        }
        let options = PeerOptions {
            addr: Some(addr),
            ..PeerOptions::default()
        };
        let guest = world.add_peer("standup", format!("guest{cycle}"), options);
        let negotiated = world.run_until(
            |w| w.peer(guest).negotiation_counts().answers_received > 0,
            secs(1.0),
        );
        assert!(negotiated, "cycle {cycle}: no answer{}", describe(&world));
        if full {
            let flowing = world.run_until(
                |w| {
                    [alice, bob]
                        .iter()
                        .all(|&rx| stats(w, rx, guest, MIC).packets > 0)
                        && [alice, bob]
                            .iter()
                            .all(|&tx| stats(w, guest, tx, MIC).packets > 0)
                },
                secs(3.0),
            );
            assert!(
                flowing,
                "cycle {cycle}: guest media did not flow{}",
                describe(&world)
            );
            connected_cycles += 1;
        }
        let (left, _) = world.leave(guest);
        assert_eq!(left, Ok(()));
        world.run_for(Duration::from_millis(if full { 200 } else { 5 }));
    }
    world.run_for(secs(2.0));
    assert_eq!(connected_cycles, 20);

    let m = world.metrics();
    assert_eq!(
        (m.sessions, m.calls, m.flows, m.connected_sessions),
        (
            base.sessions,
            base.calls,
            base.flows,
            base.connected_sessions
        ),
        "{m:?}"
    );
    assert_eq!(m.joins, base.joins + 1000);
    assert_eq!(m.leaves, base.leaves + 1000);
    for (rx, other) in [(alice, bob), (bob, alice)] {
        let peer = world.peer(rx);
        let mut carried: Vec<(SessionId, TrackSource)> = peer
            .slots()
            .iter()
            .filter_map(|t| Some((t.session?, t.source?)))
            .collect();
        carried.sort_by_key(|(s, src)| (*s, src.as_str()));
        assert_eq!(
            carried,
            vec![(other, CAM), (other, MIC)],
            "{rx}'s slots{}",
            describe(&world)
        );
        assert!(!peer.has_pending_offer());
        assert!(peer.errors().is_empty(), "{:?}", peer.errors());
        assert!(peer.rtc_errors().is_empty(), "{:?}", peer.rtc_errors());
        assert_eq!(peer.participants_left().len(), 1000);
        // The connection does not grow with churn: 2 own m-lines and the slots (3 audio,
        // 9 camera, 1 screen), whoever came and went.
        assert_eq!(
            peer.remote_media_lines(),
            2 + 13,
            "{rx}'s SDP has {} m-lines after 1000 guests came and went",
            peer.remote_media_lines()
        );
    }
    for (rx, tx, src, w) in window(&before, &world) {
        assert!(
            w.received + w.sent / 50 + 16 >= w.sent,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        assert_eq!(
            stats(&world, rx, tx, src).gaps_after_keyframe,
            0,
            "{}",
            describe(&world)
        );
    }
}

/// Grants are enforced at the media layer: a viewer that tries to publish anyway is answered
/// without its tracks and nobody receives them; a participant without the screen grant keeps
/// its camera but not its screen; a viewer that publishes nothing still receives everything.
#[test]
fn grants_are_enforced_at_the_media_layer() {
    let mut world = world(21);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let sneaky = world.add_peer(
        "standup",
        "sneaky",
        PeerOptions {
            grants: Grants::VIEWER,
            ..PeerOptions::default()
        },
    );
    let no_screen = world.add_peer(
        "standup",
        "no_screen",
        PeerOptions {
            screen: true,
            grants: Grants::new(true, true, false, true),
            ..PeerOptions::default()
        },
    );
    let watcher = world.add_peer(
        "standup",
        "watcher",
        PeerOptions {
            audio: false,
            video: false,
            grants: Grants::VIEWER,
            ..PeerOptions::default()
        },
    );
    // Everyone receives alice's microphone and camera, and no_screen's camera.
    let ok = world.run_until(
        |w| {
            [sneaky, no_screen, watcher].iter().all(|&rx| {
                [MIC, CAM].iter().all(|&src| {
                    stats(w, rx, alice, src).keyframes > 0
                        || (src == MIC && stats(w, rx, alice, src).packets > 0)
                })
            }) && [alice, sneaky, watcher]
                .iter()
                .all(|&rx| stats(w, rx, no_screen, CAM).keyframes > 0)
        },
        secs(5.0),
    );
    assert!(ok, "media did not flow: {}", describe(&world));
    world.run_for(secs(2.0));
    for rx in [alice, no_screen, watcher] {
        let peer = world.peer(rx);
        assert!(
            peer.slots().iter().all(|t| t.session != Some(sneaky)),
            "{rx} was given a viewer's track: {}",
            describe(&world)
        );
        for src in [MIC, CAM] {
            assert_eq!(stats(&world, rx, sneaky, src).packets, 0);
        }
        assert!(
            peer.slots()
                .iter()
                .all(|t| !(t.session == Some(no_screen) && t.source == Some(SCREEN))),
            "{rx} was given a forbidden screen share"
        );
        assert_eq!(stats(&world, rx, no_screen, SCREEN).packets, 0);
        assert_eq!(peer.unattributed().len(), 0, "{}", describe(&world));
    }
    // The watcher, which publishes nothing, is connected and receives both publishers.
    assert!(world.peer(watcher).is_connected());
    assert!(stats(&world, watcher, alice, MIC).packets > 50);
    assert!(stats(&world, watcher, no_screen, CAM).packets > 50);
}

/// Two UDP peers and one TCP-only peer (active ICE-TCP candidate only) on a slightly delayed,
/// jittery network; the TCP peer's stream is split at random points both ways.
fn tcp_call(seed: u64) -> (SimWorld, Vec<SessionId>) {
    let mut world = world(seed);
    world.set_impairment(
        Impairment::delay(Duration::from_millis(15)).with_jitter(Duration::from_millis(5)),
    );
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    let tina = world.add_peer(
        "standup",
        "tina",
        PeerOptions {
            transport: Transport::Tcp,
            ..PeerOptions::default()
        },
    );
    let peers = vec![alice, bob, tina];
    settle(&mut world, &peers, &[MIC, CAM]);
    (world, peers)
}

/// A participant whose UDP is blocked joins over ICE-TCP: everyone receives everyone's audio
/// and video without loss, and the router really talks TCP to it (and only TCP).
#[test]
fn tcp_only_participant_joins_a_udp_call() {
    let (mut world, peers) = tcp_call(31);
    let tina = peers[2];
    let tina_addr = world.peer(tina).addr();
    let before = snapshot(&world, &peers, &[MIC, CAM]);
    world.run_for(secs(3.0));

    // Up to ~40 ms one-way through the router: a few packets may still be on the way (an
    // audio packet or two, a video frame — a keyframe is 15 packets).
    assert_window_delivered(&world, &before, (3, 40), (140, 90));
    for &rx in &peers {
        let peer = world.peer(rx);
        assert!(peer.rtc_errors().is_empty(), "{:?}", peer.rtc_errors());
    }
    assert_streams_clean(&world, &peers);

    let m = world.metrics();
    assert_eq!(m.tcp_connections, 1, "{m:?}");
    assert_eq!((m.sessions, m.calls, m.flows), (3, 1, 3), "{m:?}");
    assert_eq!((m.tcp_rejected, m.tcp_unsent), (0, 0), "{m:?}");
    assert!(world.tcp_errors().is_empty(), "{:?}", world.tcp_errors());

    // The TCP peer's flow is TCP: every router transmit to it went on its connection, and it
    // carried the whole call (ICE, DTLS, media, RTCP).
    let to_tina = world.router_transmits_to(tina_addr);
    assert!(to_tina > 500, "router sent tina only {to_tina} datagrams");
    assert_eq!(world.router_tcp_transmits_to(tina_addr), to_tina);
    assert!(world
        .tcp_conn_of(tina)
        .is_some_and(|c| world.tcp_is_open(c)));
    for &udp_peer in &peers[..2] {
        let addr = world.peer(udp_peer).addr();
        assert!(world.router_transmits_to(addr) > 500);
        assert_eq!(world.router_tcp_transmits_to(addr), 0);
    }

    // The stream really was split anywhere and coalesced, both ways, and nothing was lost or
    // left unparsed in the reassembly.
    let tcp = world.tcp_stats();
    assert_eq!(tcp.opened, 1, "{tcp:?}");
    for (dir, d) in [("up", tcp.up), ("down", tcp.down)] {
        assert!(d.frames > 300, "{dir}: {tcp:?}");
        assert!(d.frames_reassembled + 40 >= d.frames, "{dir}: {tcp:?}");
        assert!(
            d.prefix_splits > 0,
            "{dir}: no split inside a length prefix: {tcp:?}"
        );
        assert!(d.body_splits > 0, "{dir}: no split inside a frame: {tcp:?}");
        assert!(
            d.coalesced_chunks > 0,
            "{dir}: never two frames in one chunk: {tcp:?}"
        );
        assert!(
            d.deferred_tails > 0,
            "{dir}: never a partial frame across inputs: {tcp:?}"
        );
    }
    // Everything tina published went over TCP.
    let tina_sent = world.peer(tina).sent(MIC).packets + world.peer(tina).sent(CAM).packets;
    assert!(
        tcp.up.frames > tina_sent,
        "{tina_sent} RTP packets sent; {tcp:?}"
    );
    assert_eq!(
        (
            tcp.unroutable,
            tcp.misaddressed,
            tcp.dropped_on_closed,
            tcp.reset
        ),
        (0, 0, 0, 0),
        "{tcp:?}"
    );
}

/// The TCP peer leaves: the world calls `leave` and then `tcp_closed`; the router is back to a
/// two-UDP-peer baseline and the UDP peers keep receiving each other.
#[test]
fn tcp_peer_leaving_closes_cleanly() {
    let (mut world, peers) = tcp_call(32);
    let (alice, bob, tina) = (peers[0], peers[1], peers[2]);
    world.run_for(secs(0.5));
    let conn = world.tcp_conn_of(tina);
    assert!(conn.is_some());
    let before = world.metrics();
    assert_eq!(
        (before.sessions, before.flows, before.tcp_connections),
        (3, 3, 1),
        "{before:?}"
    );

    let (result, _tina) = world.leave(tina);
    assert_eq!(result, Ok(()));
    assert!(conn.is_some_and(|c| !world.tcp_is_open(c)));
    world.run_for(secs(0.5));
    let tina_at_leave = [alice, bob].map(|rx| {
        (
            stats(&world, rx, tina, MIC).packets,
            stats(&world, rx, tina, CAM).packets,
        )
    });
    let others_before = snapshot(&world, &[alice, bob], &[MIC, CAM]);
    world.run_for(secs(1.5));

    let m = world.metrics();
    assert_eq!(
        (
            m.sessions,
            m.calls,
            m.flows,
            m.connected_sessions,
            m.tcp_connections
        ),
        (2, 1, 2, 2, 0),
        "{m:?}"
    );
    assert_eq!(m.leaves, before.leaves + 1);
    assert!(world.tcp_errors().is_empty(), "{:?}", world.tcp_errors());
    let tcp = world.tcp_stats();
    assert_eq!((tcp.opened, tcp.closed, tcp.reset), (1, 1, 0), "{tcp:?}");
    // Nothing is sent on the closed connection any more.
    assert_eq!(tcp.unroutable, 0, "{tcp:?}");

    for (i, rx) in [alice, bob].into_iter().enumerate() {
        let peer = world.peer(rx);
        assert!(
            peer.participants_left().contains(&tina),
            "{rx} not told tina left"
        );
        assert!(
            peer.slots().iter().all(|t| t.session != Some(tina)),
            "{rx}'s slots still name tina{}",
            describe(&world)
        );
        assert_eq!(
            (
                stats(&world, rx, tina, MIC).packets,
                stats(&world, rx, tina, CAM).packets
            ),
            tina_at_leave[i]
        );
    }
    for (rx, tx, src, w) in window(&others_before, &world) {
        let slack = if src.is_audio() { 3 } else { 20 };
        assert!(
            w.received + slack >= w.sent && w.sent > 40,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        assert_eq!(stats(&world, rx, tx, src).gaps_after_keyframe, 0);
    }
}

/// A TCP stream that is not ICE-TCP (an oversized frame) makes the router forget that
/// connection: the world records the error and closes it; the rest of the call goes on.
#[test]
fn broken_tcp_stream_closes_only_that_connection() {
    let (mut world, peers) = tcp_call(33);
    let (alice, bob, tina) = (peers[0], peers[1], peers[2]);
    world.run_for(secs(0.3));
    let Some(conn) = world.tcp_conn_of(tina) else {
        panic!("tina has no TCP connection");
    };
    // 0xFFFF announces a 65535-byte frame; enough of them that one lands on a frame boundary
    // even if the connection is in the middle of a frame.
    let result = world.inject_tcp_data(conn, &[0xFF; 4000]);
    assert!(
        matches!(result, Err(TcpError::FrameTooLarge { conn: c, .. }) if c == conn),
        "{result:?}"
    );
    assert_eq!(world.tcp_errors().len(), 1, "{:?}", world.tcp_errors());
    assert!(!world.tcp_is_open(conn));
    let m = world.metrics();
    assert_eq!((m.tcp_connections, m.tcp_rejected), (0, 1), "{m:?}");

    let others_before = snapshot(&world, &[alice, bob], &[MIC, CAM]);
    world.run_for(secs(1.0));
    let tcp = world.tcp_stats();
    assert_eq!(tcp.reset, 1, "{tcp:?}");
    assert!(tcp.dropped_on_closed > 0, "tina kept sending: {tcp:?}");
    // The router has no connection to send tina's media on any more.
    assert_eq!(world.metrics().tcp_connections, 0);
    for (rx, tx, src, w) in window(&others_before, &world) {
        let slack = if src.is_audio() { 3 } else { 20 };
        assert!(
            w.received + slack >= w.sent && w.sent > 20,
            "{rx} from {tx} {src:?}: {} of {}",
            w.received,
            w.sent
        );
        assert_eq!(stats(&world, rx, tx, src).gaps_after_keyframe, 0);
    }
}

/// Behind port forwarding the router advertises `:443` while the TCP socket accepted the
/// connection on `:8443`; the embedder passes what `accept()` reports as `local`, as it does for
/// UDP datagrams (which the router maps to the advertised candidate).
#[test]
fn tcp_peer_connects_behind_port_forwarding() {
    let mut config = Config::default();
    config.ice_port_override = Some(443);
    let mut world = SimWorld::with_config(40, epoch(), config);
    world.set_tcp_accept_local(Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443)));
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    let tina = world.add_peer("standup", "tina", PeerOptions::default().tcp_only());
    settle(&mut world, &[alice, tina], &[MIC, CAM]);
    let m = world.metrics();
    assert_eq!((m.tcp_connections, m.tcp_unsent), (1, 0), "{m:?}");
    assert!(world.router_tcp_transmits_to(world.peer(tina).addr()) > 0);
}

/// A client that loses a router offer (its signaling hiccuped) still gets everyone's media: the
/// router re-sends an unanswered offer after a few seconds instead of waiting forever.
#[test]
fn a_lost_router_offer_is_sent_again() {
    let mut world = world(31);
    let alice = world.add_peer("standup", "alice", PeerOptions::default());
    world.run_for(secs(0.5));
    let bob = world.add_peer("standup", "bob", PeerOptions::default());
    // Bob's first router offer (carrying alice's tracks) never reaches him.
    world.lose_offers_to(bob, 1);
    world.run_for(secs(2.0));
    assert_eq!(
        stats(&world, bob, alice, MIC).packets,
        0,
        "{}",
        describe(&world)
    );
    // Within the re-send interval (4 s) plus set-up, bob receives alice.
    settle(&mut world, &[alice, bob], &[MIC, CAM]);
    assert!(world.elapsed() < secs(9.0), "{}", describe(&world));
    assert_eq!(stats(&world, bob, alice, CAM).gaps_after_keyframe, 0);
}
