//! Simulcast, bandwidth and speakers on the deterministic simulated network: real str0m peers
//! publish three-layer VP8 simulcast (with temporal layers) and Opus with audio levels; the
//! router shares each subscriber's bandwidth estimate among its video, switches layers at
//! keyframes, pauses unwatched layers at the publisher, and forwards only the loudest audio.
//!
//! Run with `cargo test -p calls-core --test simulcast -- --nocapture` to see the measured
//! switch times (`# …` lines).

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{epoch, secs, speaker_announced, stats};

use std::time::Duration;

use calls_core::sim::{Impairment, PeerOptions, SimWorld, TrackStats};
use calls_core::{Config, Event, SessionId, TrackSource};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;
const SCREEN: TrackSource = TrackSource::Screen;
/// The top camera layer (`f`) and the lowest (`q`).
const TOP: u8 = 2;
const LOWEST: u8 = 0;

fn layer(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource) -> Option<u8> {
    stats(world, rx, tx, src).last_layer
}

fn describe(world: &SimWorld) -> String {
    let mut out = format!("\nat {:?}:", world.elapsed());
    for p in world.peers() {
        for (tx, src, t) in p.received() {
            if src.is_audio() {
                out += &format!("\n  {} from {tx} {src:?}: {} pkts", p.session(), t.packets);
                continue;
            }
            out += &format!(
                "\n  {} from {tx} {src:?}: {} pkts, missing {}, layers {:?} (changes {:?}), tids {:?}, \
                 max gap {:?}, pic breaks {}, tl0 breaks {}, switches off keyframe {}",
                p.session(),
                t.packets,
                t.missing,
                t.frames_by_layer,
                t.layer_changes.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
                t.frames_by_tid,
                t.max_frame_gap,
                t.picture_id_breaks,
                t.tl0_breaks,
                t.switches_off_keyframe
            );
        }
        if !p.layers_log().is_empty() {
            out += &format!(
                "\n  {} dynacast: {:?}",
                p.session(),
                p.layers_log().iter().map(|(_, _, a)| a).collect::<Vec<_>>()
            );
        }
    }
    let m = world.metrics();
    out += &format!(
        "\n  router: layer switches {}, switch time {:?}, dynacast {}, keyframe requests out {}",
        m.layer_switches, m.layer_switch_time, m.dynacast_updates, m.keyframe_requests_out
    );
    out
}

/// Alice publishes simulcast camera (and microphone); Bob only watches. Runs until Bob
/// decodes Alice's top layer.
fn alice_and_bob(seed: u64, alice: PeerOptions) -> (SimWorld, SessionId, SessionId) {
    let mut world = SimWorld::new(seed, epoch());
    let a = world.add_peer("room", "alice", alice);
    let b = world.add_peer("room", "bob", PeerOptions::audio_only());
    // Steady state: on the top layer, and no layer change for a second (the first packets
    // may come from whichever layer the router learns of first).
    let top = world.run_until(|w| settled(w, b, a, CAM, TOP), secs(20.0));
    assert!(
        top,
        "bob never settled on alice's top layer{}",
        describe(&world)
    );
    (world, a, b)
}

/// `rx` receives `tx`'s `src` on `layer`, with no layer change for a second.
fn settled(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource, layer: u8) -> bool {
    let t = stats(world, rx, tx, src);
    t.last_layer == Some(layer)
        && t.layer_changes
            .last()
            .is_some_and(|(at, _)| world.now().saturating_duration_since(*at) >= secs(1.0))
}

/// Sequence continuity, no freeze, switches only at keyframes, picture ids continuous.
fn assert_clean_video(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource) {
    let t = stats(world, rx, tx, src);
    assert_eq!(t.missing, 0, "sequence gap{}", describe(world));
    assert_eq!(
        t.switches_off_keyframe,
        0,
        "switched off a keyframe{}",
        describe(world)
    );
    assert_eq!(
        t.picture_id_breaks,
        0,
        "picture ids broke{}",
        describe(world)
    );
    assert_eq!(t.tl0_breaks, 0, "TL0PICIDX broke{}", describe(world));
    // A screen share's keyframes are large (paced out at the estimate) and it runs at 15 fps.
    let limit = Duration::from_millis(if src == SCREEN { 500 } else { 300 });
    assert!(
        t.max_frame_gap < limit,
        "video froze for {:?}{}",
        t.max_frame_gap,
        describe(world)
    );
}

#[test]
fn subscriber_drops_to_low_layer_when_bandwidth_falls() {
    let (mut world, alice, bob) = alice_and_bob(51, PeerOptions::default().with_simulcast());
    world.run_for(secs(2.0));
    assert_eq!(layer(&world, bob, alice, CAM), Some(TOP));

    // The router's own cap (what an admin or a test sets): deterministic, no network loss.
    let capped_at = world.now();
    world.set_bandwidth_cap(bob, Some(300_000)).unwrap();
    let low = world.run_until(|w| layer(w, bob, alice, CAM) == Some(LOWEST), secs(1.0));
    let took = world.now() - capped_at;
    println!("# router cap 300 kbit/s: top → lowest layer in {took:?}");
    assert!(
        low,
        "bob not on the lowest layer 1 s after the cap{}",
        describe(&world)
    );
    world.run_for(secs(2.0));
    assert_eq!(layer(&world, bob, alice, CAM), Some(LOWEST));
    assert_clean_video(&world, bob, alice, CAM);
    let t = stats(&world, bob, alice, CAM);
    assert!(
        t.fps_over(secs(1.0), world.now()) >= 25.0,
        "the lowest layer should come at full frame rate{}",
        describe(&world)
    );
}

#[test]
fn subscriber_drops_when_the_network_itself_is_capped() {
    let (mut world, alice, bob) = alice_and_bob(52, PeerOptions::default().with_simulcast());
    world.run_for(secs(2.0));
    // A real bottleneck on Bob's downlink: the congestion controller has to notice it.
    let capped_at = world.now();
    world.set_peer_impairment(
        bob,
        Impairment::default(),
        Impairment::delay(Duration::from_millis(20)).with_bandwidth(300_000, 30_000),
    );
    // str0m's delay-based estimate backs off in steps (about -15 % every few hundred ms), so
    // a 5× overload takes seconds to be fully recognised; the first downgrade comes sooner.
    let down = world.run_until(|w| layer(w, bob, alice, CAM) != Some(TOP), secs(8.0));
    let first = world.now() - capped_at;
    let low = world.run_until(|w| layer(w, bob, alice, CAM) == Some(LOWEST), secs(8.0));
    let took = world.now() - capped_at;
    println!(
        "# network cap 300 kbit/s: first downgrade after {first:?}, lowest layer after {took:?}"
    );
    assert!(
        down && low,
        "bob stayed above the lowest layer{}",
        describe(&world)
    );
    assert!(
        took <= secs(8.0),
        "took {took:?} to react{}",
        describe(&world)
    );
    // Once down, the stream flows again: the lowest layer fits the link.
    let before = stats(&world, bob, alice, CAM);
    world.run_for(secs(3.0));
    let after = stats(&world, bob, alice, CAM);
    let frames = |t: &TrackStats| t.frames_by_layer.iter().sum::<u64>();
    assert!(
        frames(&after) - frames(&before) >= 45,
        "only {} frames in 3 s on the capped link{}",
        frames(&after) - frames(&before),
        describe(&world)
    );
    assert_eq!(after.picture_id_breaks, 0, "{}", describe(&world));
}

#[test]
fn subscriber_climbs_back_when_bandwidth_returns() {
    let (mut world, alice, bob) = alice_and_bob(53, PeerOptions::default().with_simulcast());
    world.set_bandwidth_cap(bob, Some(300_000)).unwrap();
    let low = world.run_until(|w| layer(w, bob, alice, CAM) == Some(LOWEST), secs(2.0));
    assert!(low, "{}", describe(&world));
    world.run_for(secs(2.0));

    let lifted_at = world.now();
    world.set_bandwidth_cap(bob, None).unwrap();
    let top = world.run_until(|w| layer(w, bob, alice, CAM) == Some(TOP), secs(10.0));
    let took = world.now() - lifted_at;
    println!("# cap lifted: lowest → top layer in {took:?}");
    assert!(top, "bob never climbed back{}", describe(&world));
    assert_clean_video(&world, bob, alice, CAM);

    // A noisy cap hovering around the middle layer's cost: at most one settling change, no
    // flapping between layers.
    world.run_for(secs(1.0));
    let changes_before = stats(&world, bob, alice, CAM).layer_changes.len();
    for i in 0..40 {
        let bps = if i % 2 == 0 { 720_000 } else { 860_000 };
        world.set_bandwidth_cap(bob, Some(bps)).unwrap();
        world.run_for(secs(0.25));
    }
    let t = stats(&world, bob, alice, CAM);
    let changes = t.layer_changes.len() - changes_before;
    println!("# noisy cap 720/860 kbit/s for 10 s: {changes} layer changes");
    assert!(changes <= 2, "flapped {changes} times{}", describe(&world));
    assert_eq!(t.last_layer, Some(1), "{}", describe(&world));
    assert_clean_video(&world, bob, alice, CAM);
}

#[test]
fn switch_waits_for_keyframe() {
    // Keyframes only on request: every switch must come from one the router asked for.
    let options = PeerOptions::default()
        .with_simulcast()
        .keyframe_interval(secs(60.0));
    let (mut world, alice, bob) = alice_and_bob(54, options);
    let requests_before = world.peer(alice).sent_layer(CAM, "q").keyframe_requests;
    world.set_bandwidth_cap(bob, Some(300_000)).unwrap();
    assert!(world.run_until(|w| layer(w, bob, alice, CAM) == Some(LOWEST), secs(2.0)));
    // The router asked for a keyframe of the layer it switched to …
    let q = world.peer(alice).sent_layer(CAM, "q");
    assert!(
        q.keyframe_requests > requests_before,
        "{}",
        describe(&world)
    );
    // … and Bob's decoder saw every layer change begin with a keyframe, with no gap.
    assert_clean_video(&world, bob, alice, CAM);
    let t = stats(&world, bob, alice, CAM);
    assert!(t.layer_changes.len() >= 2, "{:?}", t.layer_changes);
    let m = world.metrics();
    assert!(m.layer_switches >= 2, "{}", describe(&world));
    println!(
        "# layer switch time (decision → keyframe forwarded): mean {:?} ms, max {} ms over {}",
        m.layer_switch_time.mean_ms(),
        m.layer_switch_time.max_ms,
        m.layer_switch_time.count
    );
}

#[test]
fn unwatched_layer_is_paused_then_resumed() {
    let (mut world, alice, bob) = alice_and_bob(55, PeerOptions::default().with_simulcast());
    // Bob watches the top layer only: q and h are paused at Alice after the dynacast delay.
    let paused = world.run_until(
        |w| {
            w.peer(alice)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| active == &["f".to_string()])
        },
        secs(5.0),
    );
    assert!(
        paused,
        "alice was never told to send only f{}",
        describe(&world)
    );
    let q_before = world.peer(alice).sent_layer(CAM, "q");
    world.run_for(secs(1.0));
    assert_eq!(
        world.peer(alice).sent_layer(CAM, "q").packets,
        q_before.packets,
        "q still sent while paused"
    );

    // Bob's link shrinks: the router resumes q at once and switches him there.
    let capped_at = world.now();
    world.set_bandwidth_cap(bob, Some(300_000)).unwrap();
    world.run_for(secs(0.01)); // the signaling hop
    let resumed = world
        .peer(alice)
        .layers_log()
        .last()
        .is_some_and(|(_, _, active)| active.contains(&"q".to_string()));
    assert!(resumed, "q not resumed at once{}", describe(&world));
    assert!(world.run_until(|w| layer(w, bob, alice, CAM) == Some(LOWEST), secs(2.0)));
    println!(
        "# paused layer resumed and switched to in {:?}",
        world.now() - capped_at
    );
    assert_clean_video(&world, bob, alice, CAM);
    // And f, no longer watched, is paused in turn.
    let f_paused = world.run_until(
        |w| {
            w.peer(alice)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| !active.contains(&"f".to_string()))
        },
        secs(5.0),
    );
    assert!(f_paused, "{}", describe(&world));
}

#[test]
fn screen_share_keeps_priority_over_cameras() {
    let mut world = SimWorld::new(56, epoch());
    let alice = world.add_peer(
        "room",
        "alice",
        PeerOptions::default().with_simulcast().with_screen(),
    );
    let carol = world.add_peer("room", "carol", PeerOptions::default().with_simulcast());
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    let all = world.run_until(
        |w| {
            layer(w, bob, alice, SCREEN).is_some()
                && layer(w, bob, alice, CAM).is_some()
                && layer(w, bob, carol, CAM).is_some()
        },
        secs(10.0),
    );
    assert!(all, "{}", describe(&world));
    // 1.6 Mbit/s: the screen's full layer (1.2 M) first, the cameras get what is left.
    world.set_bandwidth_cap(bob, Some(1_600_000)).unwrap();
    // (Bob's estimate grows to the cap by probing first; on the way a camera may briefly
    // take a middle layer while the screen still climbs. What must hold is where it settles.)
    world.run_until(
        |w| {
            settled(w, bob, alice, SCREEN, 1)
                && [alice, carol]
                    .iter()
                    .all(|&cam| settled(w, bob, cam, CAM, LOWEST))
        },
        secs(30.0),
    );
    assert_eq!(
        layer(&world, bob, alice, SCREEN),
        Some(1),
        "screen not at its top layer{}",
        describe(&world)
    );
    for cam in [alice, carol] {
        assert_eq!(
            layer(&world, bob, cam, CAM),
            Some(LOWEST),
            "{}",
            describe(&world)
        );
    }
    assert_clean_video(&world, bob, alice, SCREEN);
}

#[test]
fn temporal_layer_drop_halves_frame_rate() {
    let (mut world, alice, bob) = alice_and_bob(57, PeerOptions::default().with_simulcast());
    let full = stats(&world, bob, alice, CAM).fps_over(secs(1.0), world.now());
    // Not even the lowest layer at 30 fps fits (150 kbit/s plus the audio reserve), its two
    // lower temporal layers (15 fps) do.
    world.set_bandwidth_cap(bob, Some(170_000)).unwrap();
    world.run_for(secs(3.0));
    let t = stats(&world, bob, alice, CAM);
    let fps = t.fps_over(secs(1.0), world.now());
    println!("# frame rate {full:.1} fps → {fps:.1} fps (lowest layer, TID ≤ 1)");
    assert!(
        (27.0..=33.0).contains(&full),
        "full rate {full}{}",
        describe(&world)
    );
    assert!(
        (12.0..=18.0).contains(&fps),
        "capped rate {fps}{}",
        describe(&world)
    );
    assert_eq!(t.last_layer, Some(LOWEST));
    // Dropped pictures leave no sequence or picture-id gap for the decoder.
    assert_clean_video(&world, bob, alice, CAM);
    let before = stats(&world, bob, alice, CAM);
    world.run_for(secs(2.0));
    let after = stats(&world, bob, alice, CAM);
    assert_eq!(
        after.frames_by_tid[2],
        before.frames_by_tid[2],
        "TID 2 still forwarded{}",
        describe(&world)
    );
}

/// Everyone publishes audio only; `loud` speaks, the others are silent.
fn audio_call(seed: u64, n: usize, config: Config) -> (SimWorld, Vec<SessionId>) {
    let mut world = SimWorld::with_config(seed, epoch(), config);
    let peers: Vec<SessionId> = (0..n)
        .map(|i| world.add_peer("room", format!("p{i}"), PeerOptions::audio_only()))
        .collect();
    for &p in &peers {
        world.peer_mut(p).set_silent(true);
    }
    (world, peers)
}

#[test]
fn active_speaker_follows_the_loud_participant() {
    let (mut world, peers) = audio_call(58, 4, Config::default());
    world.run_for(secs(3.0));
    assert_eq!(
        speaker_announced(&world, peers[3]),
        None,
        "silence made a speaker"
    );

    world.peer_mut(peers[0]).set_silent(false);
    let t0 = world.now();
    let ok = world.run_until(
        |w| speaker_announced(w, peers[3]) == Some(Some(peers[0])),
        secs(3.0),
    );
    assert!(ok, "p0 never became the speaker");
    println!(
        "# speaker detected {:?} after they started",
        world.now() - t0
    );

    world.peer_mut(peers[0]).set_silent(true);
    world.peer_mut(peers[1]).set_silent(false);
    let t1 = world.now();
    let ok = world.run_until(
        |w| speaker_announced(w, peers[3]) == Some(Some(peers[1])),
        secs(4.0),
    );
    assert!(ok, "the speaker did not follow p1");
    println!("# speaker followed the turn in {:?}", world.now() - t1);
    // Every member was told, and the embedder got the events.
    for &p in &peers {
        assert_eq!(speaker_announced(&world, p), Some(Some(peers[1])));
    }
    let changes: Vec<Option<SessionId>> = world
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::SpeakerChanged { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    assert_eq!(changes, vec![Some(peers[0]), Some(peers[1])], "no flapping");
}

#[test]
fn only_top_n_audio_streams_are_forwarded() {
    let mut config = Config::default();
    config.top_n_audio = 3;
    let (mut world, peers) = audio_call(59, 8, config);
    // Four talk (p0..p3), four stay silent (p4..p7).
    for &p in &peers[..4] {
        world.peer_mut(p).set_silent(false);
    }
    world.run_for(secs(4.0));
    let listener = peers[7];
    let before: Vec<u64> = peers
        .iter()
        .map(|&p| stats(&world, listener, p, MIC).packets)
        .collect();
    world.run_for(secs(3.0));
    let got: Vec<u64> = peers
        .iter()
        .enumerate()
        .map(|(i, &p)| stats(&world, listener, p, MIC).packets - before[i])
        .collect();
    println!("# packets p7 received in 3 s per publisher: {got:?}");
    let forwarded = got[..7].iter().filter(|&&n| n > 0).count();
    assert_eq!(forwarded, 3, "not exactly 3 streams forwarded: {got:?}");
    assert!(
        got[4..7].iter().all(|&n| n == 0),
        "silent streams forwarded: {got:?}"
    );
    assert!(world.metrics().audio_not_forwarded > 0);

    // Someone who unmutes is heard at once (before the detector ranks them).
    world.set_muted(peers[5], true);
    world.run_for(secs(1.0));
    world.set_muted(peers[5], false);
    world.peer_mut(peers[5]).set_silent(false);
    let heard_from = stats(&world, listener, peers[5], MIC).packets;
    world.run_for(secs(0.5));
    assert!(
        stats(&world, listener, peers[5], MIC).packets > heard_from + 10,
        "the unmuted participant was not forwarded at once"
    );
}

#[test]
fn active_speakers_camera_gets_the_better_layer() {
    let mut world = SimWorld::new(60, epoch());
    let alice = world.add_peer("room", "alice", PeerOptions::default().with_simulcast());
    let carol = world.add_peer("room", "carol", PeerOptions::default().with_simulcast());
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    for p in [carol, bob] {
        world.peer_mut(p).set_silent(true);
    }
    // Room for one middle layer and one low one.
    world.set_bandwidth_cap(bob, Some(900_000)).unwrap();
    let spoke = world.run_until(
        |w| speaker_announced(w, bob) == Some(Some(alice)),
        secs(5.0),
    );
    assert!(spoke, "alice never became the speaker{}", describe(&world));
    // Once Bob's estimate has grown to the cap (it starts lower and probes upwards), the
    // speaker's camera is the one raised.
    world.run_until(
        |w| layer(w, bob, alice, CAM) > layer(w, bob, carol, CAM),
        secs(8.0),
    );
    let (a, c) = (
        layer(&world, bob, alice, CAM),
        layer(&world, bob, carol, CAM),
    );
    println!("# speaker alice on layer {a:?}, carol on {c:?} under 900 kbit/s");
    assert!(
        a > c,
        "the speaker's camera is not preferred: {a:?} vs {c:?}{}",
        describe(&world)
    );

    // The turn passes to carol: the better layer follows her.
    world.peer_mut(alice).set_silent(true);
    world.peer_mut(carol).set_silent(false);
    let turned = world.run_until(
        |w| layer(w, bob, carol, CAM) > layer(w, bob, alice, CAM),
        secs(8.0),
    );
    assert!(
        turned,
        "the better layer did not follow the speaker{}",
        describe(&world)
    );
    assert_clean_video(&world, bob, carol, CAM);
}
