//! Relay links on the deterministic simulated network: two routers, each with its own real
//! str0m peers, share one call over a relay link (`SimRelayPair`: zero delay, optional
//! seeded loss, a cut). Subscribers on one router must get the other router's publishers as
//! if they were local: slots with mapping messages, top-N audio, simulcast layers, keyframes.
//!
//! Run with `cargo test -p calls-core --test relay -- --nocapture` to see the `# …` lines.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{epoch, secs};

use std::time::Duration;

use calls_core::relay::LinkId;
use calls_core::sim::{PeerOptions, SimRelayPair, SimWorld, TrackStats};
use calls_core::{ServerMessage, SessionId, TrackSource};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;

/// What `rx` (in `world`) received of `tx`'s `src`.
fn got(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource) -> TrackStats {
    world
        .peer(rx)
        .received_from(tx, src)
        .cloned()
        .unwrap_or_default()
}

/// Both routers' relay counters and what the pair carried, for failure messages.
fn describe(pair: &SimRelayPair) -> String {
    let mut out = format!(
        "\n  link carried a→b {} b→a {}, lost a→b {} b→a {}",
        pair.carried[0], pair.carried[1], pair.lost[0], pair.lost[1]
    );
    for (name, world) in [("a", &pair.a), ("b", &pair.b)] {
        out += &format!("\n  router {name}: {:?}", world.metrics().relay);
        for p in world.peers() {
            for (publisher, source, t) in p.received() {
                out += &format!(
                    "\n    {} ← {publisher} {source:?}: {} packets, missing {}, late {}, keyframes {}, layer {:?}, max gap {:?}",
                    p.session(),
                    t.packets,
                    t.missing,
                    t.late_or_duplicate,
                    t.keyframes,
                    t.last_layer,
                    t.max_frame_gap
                );
            }
            if !p.layers_log().is_empty() {
                out += &format!(
                    "\n    {} dynacast: {:?}",
                    p.session(),
                    p.layers_log().iter().map(|(_, _, a)| a).collect::<Vec<_>>()
                );
            }
        }
    }
    out
}

/// Alice (microphone and `alice` video) on router a, Bob (microphone) on router b, the link
/// open for their call.
fn alice_on_a_bob_on_b(seed: u64, alice: PeerOptions) -> (SimRelayPair, SessionId, SessionId) {
    let mut pair = SimRelayPair::new(seed, epoch());
    let a = pair.a.add_peer("room", "alice", alice);
    pair.open("room");
    let b = pair.b.add_peer("room", "bob", PeerOptions::audio_only());
    (pair, a, b)
}

#[test]
fn imported_track_reaches_subscribers_on_another_router() {
    let (mut pair, alice, bob) = alice_on_a_bob_on_b(81, PeerOptions::default());
    pair.run_for(secs(6.0));
    let d = describe(&pair);

    // Bob, on b, receives Alice's microphone and camera from a, on his fixed slots, told who
    // they carry; the payloads are Alice's (the sim tags them with the publisher's session).
    let cam = got(&pair.b, bob, alice, CAM);
    let mic = got(&pair.b, bob, alice, MIC);
    let sent_cam = pair.a.peer(alice).sent(CAM);
    assert!(cam.packets > 200, "bob got too little camera{d}");
    assert!(cam.keyframes >= 1, "no keyframe{d}");
    assert_eq!(cam.missing, 0, "camera gap{d}");
    assert!(cam.max_frame_gap < Duration::from_millis(300), "froze{d}");
    assert!(
        cam.packets * 10 >= sent_cam.packets * 8,
        "bob got {} of {} camera packets{d}",
        cam.packets,
        sent_cam.packets
    );
    assert!(mic.packets > 150, "bob heard too little of alice{d}");
    assert_eq!(pair.b.peer(bob).misattributed(), 0, "{d}");
    let slot = pair.b.peer(bob).slots().slot_of(alice, CAM).cloned();
    assert_eq!(
        slot.as_ref().and_then(|s| s.user.clone()).map(|u| u.0),
        Some("alice".to_string()),
        "bob's camera slot is not mapped to alice: {slot:?}{d}"
    );
    // The other way too: Alice hears Bob.
    let back = got(&pair.a, alice, bob, MIC);
    assert!(back.packets > 150, "alice heard too little of bob{d}");
    // Each knows the other as a participant.
    assert!(
        pair.a.peer(alice).participants_joined().contains(&bob),
        "{d}"
    );
    let roster_has_alice = pair.b.peer(bob).signal_log().any(|m| match m {
        ServerMessage::Roster { participants } => participants.iter().any(|p| p.session == alice),
        _ => false,
    });
    assert!(roster_has_alice, "bob's roster lacks alice{d}");
    // The link carried it, and nothing was refused.
    let (ma, mb) = (pair.a.metrics().relay, pair.b.metrics().relay);
    assert_eq!((ma.links, mb.links), (1, 1));
    assert_eq!((ma.exported_tracks, mb.imported_tracks), (2, 2), "{d}");
    assert_eq!(
        ma.dropped_malformed + ma.dropped_unknown + ma.dropped_conflict,
        0,
        "{d}"
    );
    assert_eq!(
        mb.dropped_malformed + mb.dropped_unknown + mb.dropped_conflict,
        0,
        "{d}"
    );
    println!(
        "# bob got {} camera packets of {} sent, {} microphone; link a→b {} frames, {} bytes",
        cam.packets, sent_cam.packets, mic.packets, ma.frames_out, ma.bytes_out
    );
}

#[test]
fn keyframe_request_crosses_the_relay() {
    // Alice sends a keyframe only every 30 s: Bob, joining later on the other router, can only
    // start quickly if his router's keyframe request reaches her through the link.
    let options = PeerOptions::default().keyframe_interval(Duration::from_secs(30));
    let mut pair = SimRelayPair::new(82, epoch());
    let alice = pair.a.add_peer("room", "alice", options);
    pair.open("room");
    pair.run_for(secs(3.0));
    let requests_before = pair.a.peer(alice).sent(CAM).keyframe_requests;
    let bob = pair.b.add_peer("room", "bob", PeerOptions::audio_only());
    let joined = pair.b.now();
    pair.run_for(secs(3.0));
    let d = describe(&pair);
    let cam = got(&pair.b, bob, alice, CAM);
    let first = cam.first_keyframe_at.expect("bob never got a keyframe");
    assert!(
        first - joined < Duration::from_secs(2),
        "first keyframe {:?} after joining{d}",
        first - joined
    );
    assert!(
        pair.a.peer(alice).sent(CAM).keyframe_requests > requests_before,
        "alice was never asked for a keyframe{d}"
    );
    assert!(pair.b.metrics().relay.keyframe_requests_out >= 1, "{d}");
    assert!(pair.a.metrics().relay.keyframe_requests_in >= 1, "{d}");
    assert!(cam.packets > 100, "{d}");
    assert_eq!(cam.switches_off_keyframe, 0, "{d}");
    println!("# bob's first keyframe {:?} after joining", first - joined);
}

#[test]
fn layer_demand_crosses_the_relay() {
    let (mut pair, alice, bob) = alice_on_a_bob_on_b(83, PeerOptions::default().with_simulcast());
    // Nobody on a watches Alice; Bob on b watches her top layer. a pauses q and h only: f is
    // wanted by the other router.
    let only_f = pair_run_until(
        &mut pair,
        |p| {
            p.a.peer(alice)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| active == &["f".to_string()])
        },
        secs(25.0),
    );
    assert!(
        only_f,
        "alice was never told to send only f{}",
        describe(&pair)
    );
    pair.run_for(secs(1.0));
    let top = got(&pair.b, bob, alice, CAM);
    assert_eq!(top.last_layer, Some(2), "bob not on f{}", describe(&pair));
    let withheld = pair.a.metrics().relay.layers_withheld;

    // Bob's link shrinks: b wants q, a resumes it at Alice, and Bob switches to it.
    pair.b.set_bandwidth_cap(bob, Some(300_000)).unwrap();
    let q_back = pair_run_until(
        &mut pair,
        |p| {
            p.a.peer(alice)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| active.contains(&"q".to_string()))
        },
        secs(2.0),
    );
    assert!(q_back, "q never resumed at alice{}", describe(&pair));
    let low = pair_run_until(
        &mut pair,
        |p| got(&p.b, bob, alice, CAM).last_layer == Some(0),
        secs(3.0),
    );
    assert!(low, "bob never got q{}", describe(&pair));
    // Nobody wants f any more: paused at Alice.
    let f_paused = pair_run_until(
        &mut pair,
        |p| {
            p.a.peer(alice)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| !active.contains(&"f".to_string()))
        },
        secs(6.0),
    );
    assert!(f_paused, "f still sent{}", describe(&pair));
    let d = describe(&pair);
    let cam = got(&pair.b, bob, alice, CAM);
    assert_eq!(cam.missing, 0, "{d}");
    assert_eq!(cam.switches_off_keyframe, 0, "{d}");
    assert!(pair.b.metrics().relay.layer_demands_out >= 2, "{d}");
    // Layers withheld and resumed are no loss: nothing was NACKed or concealed.
    assert_eq!(pair.b.metrics().relay.concealed, 0, "{d}");
    assert_eq!(pair.b.metrics().relay.nacks_out, 0, "{d}");
    assert!(pair.a.metrics().relay.layer_demands_in >= 2, "{d}");
    println!("# layers withheld from the link before the cap: {withheld}");
}

#[test]
fn relay_loss_is_repaired_or_concealed() {
    let (mut pair, alice, bob) = alice_on_a_bob_on_b(84, PeerOptions::default());
    pair.run_for(secs(2.0));
    pair.loss_ab = 0.05;
    let before = got(&pair.b, bob, alice, CAM);
    pair.run_for(secs(10.0));
    pair.loss_ab = 0.0;
    pair.run_for(secs(1.0));
    let d = describe(&pair);
    let cam = got(&pair.b, bob, alice, CAM);
    let mic = got(&pair.b, bob, alice, MIC);
    let (ma, mb) = (pair.a.metrics().relay, pair.b.metrics().relay);
    assert!(pair.lost[0] > 50, "the link lost too little to test{d}");
    assert!(mb.lost_frames > 0 && mb.nacks_out > 0, "b never noticed{d}");
    assert!(ma.retransmits > 0, "a never repaired{d}");
    // Video: every hole repaired (the late packets filled them) or concealed by a keyframe,
    // and the picture never froze for long.
    assert!(cam.packets > before.packets + 400, "{d}");
    assert_eq!(cam.missing, 0, "bob's camera has holes{d}");
    assert!(
        cam.late_or_duplicate > 0,
        "no repaired packet reached bob{d}"
    );
    assert!(cam.max_frame_gap < Duration::from_millis(400), "froze{d}");
    // Audio is not repaired (a late packet is useless), but what arrives plays on.
    assert!(mic.packets > 400, "{d}");

    // A burst too long to repair (0.6 s of everything a→b): concealed. Bob's stream resyncs
    // at the keyframe b asks for, still without a sequence hole.
    let keyframes = cam.keyframes;
    pair.loss_ab = 1.0;
    pair.run_for(secs(0.6));
    pair.loss_ab = 0.0;
    pair.run_for(secs(2.0));
    let d = describe(&pair);
    let after = got(&pair.b, bob, alice, CAM);
    assert!(
        pair.b.metrics().relay.concealed >= 1,
        "nothing concealed{d}"
    );
    assert!(
        after.keyframes > keyframes,
        "no keyframe after the burst{d}"
    );
    assert_eq!(after.missing, 0, "a hole after the burst{d}");
    assert_eq!(after.switches_off_keyframe, 0, "{d}");
    assert!(after.packets > cam.packets + 80, "{d}");
    println!(
        "# link lost {} frames a→b; b NACKed {} times, a resent {} ({} no longer cached), {} gaps concealed; bob's camera: {} late packets, 0 missing",
        pair.lost[0], mb.nacks_out, ma.retransmits, ma.retransmits_missed, mb.concealed, cam.late_or_duplicate
    );
}

#[test]
fn relay_link_drop_pauses_then_resumes() {
    let (mut pair, alice, bob) = alice_on_a_bob_on_b(85, PeerOptions::default());
    pair.run_for(secs(3.0));
    let before = got(&pair.b, bob, alice, CAM);
    assert!(before.packets > 100, "{}", describe(&pair));

    // The link goes silent for 3 s (a stalled worker, a network partition).
    pair.cut = true;
    pair.run_for(secs(0.2));
    let at_cut = got(&pair.b, bob, alice, CAM);
    pair.run_for(secs(2.8));
    let d = describe(&pair);
    let during = got(&pair.b, bob, alice, CAM);
    assert_eq!(
        during.packets, at_cut.packets,
        "media crossed a cut link{d}"
    );
    assert_eq!(pair.b.metrics().relay.link_silences, 1, "{d}");
    // Paused, not gone: no one left, the slot still shows Alice.
    assert!(
        !pair.b.peer(bob).participants_left().contains(&alice),
        "{d}"
    );
    assert!(
        pair.b.peer(bob).slots().slot_of(alice, CAM).is_some(),
        "{d}"
    );
    assert_eq!(pair.b.metrics().relay.imported_tracks, 2, "{d}");

    // The link comes back: media resumes at a keyframe, without a sequence hole.
    pair.cut = false;
    let resumed = pair_run_until(
        &mut pair,
        |p| got(&p.b, bob, alice, CAM).keyframes > during.keyframes,
        secs(2.0),
    );
    assert!(
        resumed,
        "no keyframe after the link came back{}",
        describe(&pair)
    );
    pair.run_for(secs(2.0));
    let d = describe(&pair);
    let after = got(&pair.b, bob, alice, CAM);
    assert!(after.packets > during.packets + 80, "{d}");
    assert_eq!(after.missing, 0, "a hole across the cut{d}");
    assert_eq!(after.switches_off_keyframe, 0, "{d}");
    assert_eq!(pair.b.metrics().relay.link_resumes, 1, "{d}");
    let mic = got(&pair.b, bob, alice, MIC);
    assert!(
        mic.last_packet_at
            .is_some_and(|t| pair.b.now() - t < secs(0.2)),
        "{d}"
    );
    assert!(pair.b.peer(bob).errors().is_empty(), "{d}");
}

#[test]
fn closing_the_link_tears_down_imported_tracks() {
    let (mut pair, alice, bob) = alice_on_a_bob_on_b(86, PeerOptions::default());
    pair.run_for(secs(2.0));
    assert!(got(&pair.b, bob, alice, CAM).packets > 0);
    pair.b.relay_close(LinkId(1)).unwrap();
    pair.a.relay_close(LinkId(1)).unwrap();
    pair.run_for(secs(1.0));
    let d = describe(&pair);
    assert!(pair.b.peer(bob).participants_left().contains(&alice), "{d}");
    assert!(pair.a.peer(alice).participants_left().contains(&bob), "{d}");
    assert!(
        pair.b.peer(bob).slots().slot_of(alice, CAM).is_none(),
        "{d}"
    );
    let (ma, mb) = (pair.a.metrics().relay, pair.b.metrics().relay);
    assert_eq!(
        (ma.links, ma.exported_tracks, ma.imported_tracks),
        (0, 0, 0),
        "{d}"
    );
    assert_eq!(
        (mb.links, mb.exported_tracks, mb.imported_tracks),
        (0, 0, 0),
        "{d}"
    );
    // Each router forgets the call's remote half; its own participants go on.
    assert_eq!(
        pair.b.router().table_sizes()[2],
        1,
        "bob's own microphone only{d}"
    );
}

#[test]
fn bad_relay_input_is_dropped_and_counted() {
    let (mut pair, _alice, _bob) = alice_on_a_bob_on_b(87, PeerOptions::default());
    pair.run_for(secs(1.0));
    let sizes = pair.b.router().table_sizes();
    let mut rng = fastrand::Rng::with_seed(7);
    let link = LinkId(1);
    for n in 0..5_000 {
        let len = rng.usize(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if n % 2 == 0 && bytes.len() >= 3 {
            // Valid header, random body: reaches every frame type's parser.
            bytes[0] = calls_core::relay::MAGIC;
            bytes[1] = calls_core::relay::VERSION;
            bytes[2] = rng.u8(1..=10);
        }
        pair.b.handle_relay(link, &bytes);
    }
    // Frames for a link that does not exist.
    pair.b
        .handle_relay(LinkId(99), &calls_core::relay::Frame::Keepalive.encode());
    let m = pair.b.metrics().relay;
    assert!(m.dropped_malformed > 2_000, "{m:?}");
    assert!(m.dropped_unknown >= 1, "{m:?}");
    // Nothing leaked into the router's tables beyond what random but valid frames may
    // announce (members and tracks are bounded per link).
    let after = pair.b.router().table_sizes();
    assert_eq!(after[0], sizes[0], "sessions");
    pair.run_for(secs(1.0));
}

#[test]
fn a_local_join_cannot_take_a_remote_members_id() {
    let (mut pair, alice, _bob) = alice_on_a_bob_on_b(88, PeerOptions::audio_only());
    pair.run_for(secs(0.5));
    let now = pair.b.now();
    let refused = pair.b.router_mut().join(
        "room".into(),
        alice,
        "mallory".into(),
        calls_core::Grants::ALL,
        now,
    );
    assert_eq!(refused, Err(calls_core::RouterError::SessionExists(alice)));
}

/// Runs the pair until `cond` holds (checked every 10 ms of virtual time) or `max` passed.
fn pair_run_until(
    pair: &mut SimRelayPair,
    mut cond: impl FnMut(&SimRelayPair) -> bool,
    max: Duration,
) -> bool {
    let step = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    while waited < max {
        if cond(pair) {
            return true;
        }
        pair.run_for(step);
        waited += step;
    }
    cond(pair)
}
