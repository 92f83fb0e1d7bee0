//! Receive slots on the simulated network: a subscriber's connection is a fixed set of slots
//! (audio, camera, screen) whose sources change by mapping messages, never by renegotiation.
//! Every assertion is about what peers received (per slot and per publisher, checked against
//! the source tag in each synthetic payload), messages they got, or router counters.
//!
//! Run with `cargo test -p calls-core --test slots`.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{epoch, secs, stats};

use std::time::Duration;

use calls_core::sim::receiver::clear_rtp_header;
use calls_core::sim::{Impairment, PeerOptions, SimWorld, TrackStats};
use calls_core::{ClientMessage, Config, SessionId, SlotKind, TrackSource};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;

/// Who `rx`'s slots of `kind` carry now, by the mapping it was sent.
fn carried(world: &SimWorld, rx: SessionId, kind: SlotKind) -> Vec<SessionId> {
    let mut list: Vec<SessionId> = world
        .peer(rx)
        .slots()
        .iter()
        .filter(|s| s.kind == kind)
        .filter_map(|s| s.session)
        .collect();
    list.sort();
    list
}

/// The mid of `rx`'s slot that carries `tx`'s `kind` source now.
fn slot_of(world: &SimWorld, rx: SessionId, tx: SessionId, src: TrackSource) -> Option<String> {
    world
        .peer(rx)
        .slots()
        .slot_of(tx, src)
        .map(|s| s.mid.clone())
}

/// What arrived on `rx`'s first camera slot.
fn camera_slot(world: &SimWorld, rx: SessionId) -> TrackStats {
    let peer = world.peer(rx);
    peer.slots()
        .iter()
        .find(|s| s.kind == SlotKind::Camera)
        .and_then(|s| peer.slot_stats().get(&s.mid))
        .cloned()
        .unwrap_or_default()
}

/// A readable dump of slots and what arrived, for assertion messages.
fn describe(world: &SimWorld) -> String {
    let mut out = format!("\nat {:?}:", world.elapsed());
    for p in world.peers() {
        out += &format!(
            "\n  {} neg={:?} errors={:?} misattributed={} unattributed={:?}",
            p.session(),
            p.negotiation_counts(),
            p.errors(),
            p.misattributed(),
            p.unattributed()
                .iter()
                .map(|(m, t)| (m.as_str(), t.packets))
                .collect::<Vec<_>>(),
        );
        for s in p.slots().iter() {
            let t = p.slot_stats().get(&s.mid);
            out += &format!(
                "\n    slot {} {:?} -> {:?} {:?}: {} pkts, gaps {}, missing {}, ssrc changes {}, pic breaks {}, ts back {}",
                s.mid,
                s.kind,
                s.session,
                s.source,
                t.map_or(0, |t| t.packets),
                t.map_or(0, |t| t.gaps),
                t.map_or(0, |t| t.missing),
                t.map_or(0, |t| t.ssrc_changes),
                t.map_or(0, |t| t.picture_id_breaks),
                t.map_or(0, |t| t.timestamp_regressions),
            );
        }
    }
    out
}

/// No packet arrived on a slot before the mapping naming its source (or on an empty slot).
fn assert_attribution_clean(world: &SimWorld) {
    for p in world.peers() {
        assert_eq!(p.misattributed(), 0, "{}", describe(world));
        assert!(p.unattributed().is_empty(), "{}", describe(world));
    }
}

/// `n` participants with microphones in `call`, all silent (a muted-looking meeting), the
/// first `speakers` of them talking.
fn meeting(world: &mut SimWorld, n: usize, speakers: usize) -> Vec<SessionId> {
    let peers: Vec<SessionId> = (0..n)
        .map(|i| world.add_peer("meeting", format!("p{i}"), PeerOptions::audio_only()))
        .collect();
    for (i, &p) in peers.iter().enumerate() {
        world.peer_mut(p).set_silent(i >= speakers);
    }
    peers
}

#[test]
fn joining_never_renegotiates_others() {
    let mut world = SimWorld::new(101, epoch());
    let peers = meeting(&mut world, 50, 2);
    let (talker, other_talker) = (peers[0], peers[1]);
    let ok = world.run_until(
        |w| {
            peers[2..]
                .iter()
                .all(|&rx| stats(w, rx, talker, MIC).packets > 0)
        },
        secs(10.0),
    );
    assert!(ok, "the meeting did not settle{}", describe(&world));
    world.run_for(secs(1.0));
    let offers: Vec<u64> = peers
        .iter()
        .map(|&p| world.peer(p).negotiation_counts().offers_received)
        .collect();
    // Each got exactly one router offer: its slots.
    assert!(offers.iter().all(|&n| n == 1), "{offers:?}");
    let renegotiations = world.metrics().renegotiations;

    // The 51st joins, with a camera, and talks.
    let newcomer = world.add_peer("meeting", "p50", PeerOptions::default());
    let ok = world.run_until(
        |w| {
            stats(w, newcomer, talker, MIC).packets > 0
                && [peers[2], peers[49]]
                    .iter()
                    .all(|&rx| stats(w, rx, newcomer, CAM).keyframes > 0)
        },
        secs(5.0),
    );
    assert!(ok, "the newcomer did not settle{}", describe(&world));
    world.run_for(secs(1.0));
    for (i, &p) in peers.iter().enumerate() {
        assert_eq!(
            world.peer(p).negotiation_counts().offers_received,
            offers[i],
            "{p} got a router offer when the 51st joined"
        );
    }
    // One renegotiation in all: the newcomer's own slots.
    assert_eq!(world.metrics().renegotiations, renegotiations + 1);
    assert!(stats(&world, newcomer, other_talker, MIC).packets > 0);
    assert_attribution_clean(&world);
}

#[test]
fn audio_slots_follow_the_loudest() {
    let mut world = SimWorld::new(102, epoch());
    // p0..p2 talk, p3 and p4 are quiet, p5 listens.
    let peers = meeting(&mut world, 6, 3);
    let listener = peers[5];
    world.run_for(secs(4.0));
    assert_eq!(
        carried(&world, listener, SlotKind::Audio),
        peers[..3].to_vec(),
        "{}",
        describe(&world)
    );
    // A turn change: p2 stops, p4 starts.
    world.peer_mut(peers[2]).set_silent(true);
    world.peer_mut(peers[4]).set_silent(false);
    let ok = world.run_until(
        |w| carried(w, listener, SlotKind::Audio) == vec![peers[0], peers[1], peers[4]],
        secs(6.0),
    );
    assert!(ok, "the slots did not follow p4{}", describe(&world));
    let before = stats(&world, listener, peers[4], MIC).packets;
    world.run_for(secs(1.0));
    assert!(stats(&world, listener, peers[4], MIC).packets >= before + 40);
    // The slot p4 took kept its SSRC and numbering: one stream per slot.
    for (mid, t) in world.peer(listener).slot_stats() {
        assert_eq!(t.ssrc_changes, 0, "slot {mid}{}", describe(&world));
        assert_eq!(t.gaps, 0, "slot {mid}{}", describe(&world));
        assert_eq!(t.timestamp_regressions, 0, "slot {mid}{}", describe(&world));
    }
    assert!(world.metrics().slot_switches > 0);
    assert_attribution_clean(&world);
}

/// A camera meeting: `cameras` publishers (simulcast off, 10 s keyframe interval so that
/// switches need keyframe requests) and one viewer with `video_slots` camera slots.
fn camera_meeting(
    seed: u64,
    cameras: usize,
    video_slots: usize,
    impairment: Impairment,
) -> (SimWorld, Vec<SessionId>, SessionId) {
    let mut config = Config::default();
    config.video_slots = video_slots;
    let mut world = SimWorld::with_config(seed, epoch(), config);
    world.set_impairment(impairment);
    let slow = PeerOptions::default().keyframe_interval(secs(10.0));
    let publishers: Vec<SessionId> = (0..cameras)
        .map(|i| world.add_peer("room", format!("cam{i}"), slow.clone()))
        .collect();
    for &p in &publishers {
        world.peer_mut(p).set_silent(true);
    }
    let viewer = world.add_peer(
        "room",
        "viewer",
        PeerOptions {
            audio: false,
            video: false,
            ..PeerOptions::default()
        },
    );
    (world, publishers, viewer)
}

/// Pins `who` for `viewer` (a `pin` message).
fn pin(world: &mut SimWorld, viewer: SessionId, who: &[SessionId]) {
    let msg = ClientMessage::Pin {
        sessions: who.to_vec(),
    };
    world.signal_now(viewer, msg).expect("pin accepted");
}

#[test]
fn video_slot_switch_waits_for_keyframe() {
    let (mut world, cams, viewer) = camera_meeting(103, 2, 1, Impairment::default());
    let (a, b) = (cams[0], cams[1]);
    pin(&mut world, viewer, &[a]);
    let ok = world.run_until(|w| stats(w, viewer, a, CAM).keyframes > 0, secs(5.0));
    assert!(ok, "a never showed{}", describe(&world));
    world.run_for(secs(2.0));
    let keyframes_before = world.peer(b).sent(CAM).keyframes;

    pin(&mut world, viewer, &[b]);
    let t0 = world.now();
    let ok = world.run_until(|w| stats(w, viewer, b, CAM).packets > 0, secs(3.0));
    assert!(ok, "the slot never switched to b{}", describe(&world));
    let t = stats(&world, viewer, b, CAM);
    // b's first packet on the slot was a keyframe: the switch waited for one, and one was
    // asked for (b's own interval is 10 s).
    assert_eq!(
        t.first_keyframe_at,
        t.first_packet_at,
        "{}",
        describe(&world)
    );
    assert!(world.peer(b).sent(CAM).keyframes > keyframes_before);
    assert!(t.first_packet_at.is_some_and(|at| at - t0 <= secs(1.0)));
    // a went on until b's keyframe (within a frame interval): the tile never went blank,
    // and the slot's numbering has no gap.
    let a_last = stats(&world, viewer, a, CAM).last_packet_at;
    let b_first = t.first_packet_at;
    assert!(
        matches!((a_last, b_first), (Some(a), Some(b)) if a + secs(0.05) >= b),
        "a stopped {a_last:?} before b started {b_first:?}"
    );
    let slot = camera_slot(&world, viewer);
    assert!(slot.gaps == 0 && slot.ssrc_changes == 0, "{slot:?}");
    assert_eq!(
        slot_of(&world, viewer, b, CAM),
        world
            .peer(viewer)
            .slots()
            .iter()
            .find(|s| s.kind == SlotKind::Camera)
            .map(|s| s.mid.clone())
    );
    assert_attribution_clean(&world);
}

#[test]
fn slot_stream_is_continuous_across_sources() {
    let (mut world, cams, viewer) = camera_meeting(104, 3, 1, Impairment::default());
    for round in 0..6 {
        let who = cams[round % 3];
        pin(&mut world, viewer, &[who]);
        let since = stats(&world, viewer, who, CAM).packets;
        let ok = world.run_until(
            |w| stats(w, viewer, who, CAM).packets > since + 30,
            secs(4.0),
        );
        assert!(ok, "round {round}: {who} never showed{}", describe(&world));
    }
    let slot = camera_slot(&world, viewer);
    let mid = slot.mid.clone();
    assert!(world.metrics().slot_switches >= 5);
    assert_eq!(slot.ssrc_changes, 0, "slot {mid}{}", describe(&world));
    assert_eq!(
        slot.gaps,
        0,
        "sequence gap on slot {mid}{}",
        describe(&world)
    );
    assert_eq!(slot.picture_id_breaks, 0, "{}", describe(&world));
    assert_eq!(slot.timestamp_regressions, 0, "{}", describe(&world));
    // Five switches (round 0 pins the camera already shown), each at a keyframe.
    assert!(slot.keyframes >= 5, "{slot:?}");
    assert_attribution_clean(&world);
}

#[test]
fn nack_on_a_slot_resends_the_sources_packet() {
    let lossy = Impairment::delay(Duration::from_millis(20)).with_loss(0.05);
    let (mut world, cams, viewer) = camera_meeting(105, 2, 1, Impairment::default());
    world.set_peer_impairment(viewer, Impairment::default(), lossy);
    for round in 0..4 {
        let who = cams[round % 2];
        pin(&mut world, viewer, &[who]);
        let since = stats(&world, viewer, who, CAM).packets;
        let ok = world.run_until(
            |w| stats(w, viewer, who, CAM).packets > since + 100,
            secs(6.0),
        );
        assert!(ok, "round {round}: {who} never showed{}", describe(&world));
    }
    world.run_for(secs(1.0));
    let slot = camera_slot(&world, viewer);
    // Losses happened and were repaired by retransmissions of the right source's packets
    // (a retransmission of another source's packet would be misattributed).
    assert!(slot.gaps > 5, "no loss to repair: {slot:?}");
    assert!(
        slot.late_or_duplicate >= slot.gaps / 2,
        "few retransmissions arrived{}",
        describe(&world)
    );
    assert!(
        slot.missing * 10 <= slot.gaps,
        "holes left unrepaired: {} of {}{}",
        slot.missing,
        slot.gaps,
        describe(&world)
    );
    assert_attribution_clean(&world);
}

#[test]
fn mapping_message_precedes_first_packet() {
    // Speakers taking turns, cameras switching with them, people joining and leaving: every
    // packet on every slot came from the source the mapping named when it arrived.
    let mut world = SimWorld::new(106, epoch());
    let mut peers: Vec<SessionId> = (0..6)
        .map(|i| world.add_peer("room", format!("p{i}"), PeerOptions::default()))
        .collect();
    for &p in &peers {
        world.peer_mut(p).set_silent(true);
    }
    for turn in 0..6 {
        let talker = peers[turn % peers.len()];
        world.peer_mut(talker).set_silent(false);
        world.run_for(secs(2.5));
        world.peer_mut(talker).set_silent(true);
        if turn == 2 {
            let (left, _) = world.leave(peers.remove(1));
            assert_eq!(left, Ok(()));
            peers.push(world.add_peer("room", "late", PeerOptions::default()));
        }
    }
    world.run_for(secs(1.0));
    assert!(world.metrics().slot_switches > 10);
    assert!(world.metrics().slot_messages > 10);
    assert_attribution_clean(&world);
}

#[test]
fn pinned_participant_keeps_a_slot() {
    let (mut world, cams, viewer) = camera_meeting(107, 3, 1, Impairment::default());
    let pinned = cams[2];
    pin(&mut world, viewer, &[pinned]);
    let ok = world.run_until(|w| stats(w, viewer, pinned, CAM).packets > 0, secs(5.0));
    assert!(ok, "the pinned camera never showed{}", describe(&world));
    // The others take turns speaking: the active speaker would take the only camera slot if
    // the viewer had not pinned.
    let before = [cams[0], cams[1]].map(|c| stats(&world, viewer, c, CAM).packets);
    for &talker in &cams[..2] {
        world.peer_mut(talker).set_silent(false);
        world.run_for(secs(3.0));
        world.peer_mut(talker).set_silent(true);
    }
    assert_eq!(carried(&world, viewer, SlotKind::Camera), vec![pinned]);
    let after = [cams[0], cams[1]].map(|c| stats(&world, viewer, c, CAM).packets);
    assert_eq!(before, after, "an unpinned camera took the slot");
    // Unpinned, the slot follows the speaker.
    pin(&mut world, viewer, &[]);
    world.peer_mut(cams[0]).set_silent(false);
    let ok = world.run_until(
        |w| carried(w, viewer, SlotKind::Camera) == vec![cams[0]],
        secs(5.0),
    );
    assert!(
        ok,
        "unpinned, the slot did not follow the speaker{}",
        describe(&world)
    );
    assert_attribution_clean(&world);
}

#[test]
fn more_slots_on_request() {
    let (mut world, cams, viewer) = camera_meeting(108, 4, 1, Impairment::default());
    let ok = world.run_until(
        |w| carried(w, viewer, SlotKind::Camera).len() == 1,
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    let offers = world.peer(viewer).negotiation_counts().offers_received;
    world
        .signal_now(viewer, ClientMessage::Slots { video: 3 })
        .expect("slots accepted");
    let ok = world.run_until(
        |w| {
            carried(w, viewer, SlotKind::Camera).len() == 3
                && cams[..3]
                    .iter()
                    .all(|&c| stats(w, viewer, c, CAM).keyframes > 0)
        },
        secs(5.0),
    );
    assert!(ok, "three cameras never showed{}", describe(&world));
    assert_eq!(
        world.peer(viewer).negotiation_counts().offers_received,
        offers + 1
    );
    // Fewer again: the surplus slots are turned off (and kept); nothing arrives on them.
    world
        .signal_now(viewer, ClientMessage::Slots { video: 2 })
        .expect("slots accepted");
    world.run_for(secs(2.0));
    assert_eq!(carried(&world, viewer, SlotKind::Camera).len(), 2);
    let lines = world.peer(viewer).remote_media_lines();
    // Back up to 3: the kept m-line is turned on again, the SDP does not grow.
    world
        .signal_now(viewer, ClientMessage::Slots { video: 3 })
        .expect("slots accepted");
    let ok = world.run_until(
        |w| carried(w, viewer, SlotKind::Camera).len() == 3,
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    assert_eq!(world.peer(viewer).remote_media_lines(), lines);
    // Beyond the maximum: a typed error, nothing renegotiated.
    let too_many = world.signal_now(viewer, ClientMessage::Slots { video: 26 });
    assert!(too_many.is_err());
    assert_attribution_clean(&world);
}

#[test]
fn muted_listeners_wake_on_the_tick_grid() {
    // One speaker, 20 listeners holding muted microphones: their timers (pacer, RTCP) are
    // coalesced on the router's 250 ms tick instead of str0m's 40 ms pacer period.
    let mut world = SimWorld::new(109, epoch());
    let peers = meeting(&mut world, 21, 1);
    let talker = peers[0];
    for &p in &peers[1..] {
        world.set_muted(p, true);
    }
    let ok = world.run_until(
        |w| {
            peers[1..]
                .iter()
                .all(|&rx| stats(w, rx, talker, MIC).packets > 0)
        },
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    world.run_for(secs(2.0));
    let m = world.metrics();
    let (before, timeouts, direct) = (m.timer_wakeups, m.write_timeouts, m.direct_sends);
    let heard = stats(&world, peers[20], talker, MIC).packets;
    world.run_for(secs(10.0));
    let m = world.metrics();
    let wakeups = m.timer_wakeups - before;
    let per_listener_second = wakeups as f64 / (20.0 * 10.0);
    println!("# {per_listener_second:.1} timer wake-ups per muted listener per second");
    // 4 per second on the grid, plus the speaker's own (≤ 25 per second); 25 each before.
    assert!(
        per_listener_second <= 6.0,
        "{per_listener_second:.1} wake-ups per listener per second"
    );
    // A packet to a listener that does not measure its audio (no video reaches it) goes out
    // at once, through no send queue, pacer or poll (the vendored str0m patch 0009,
    // `DirectApi::send_rtp_now`); its timers (RTCP, the bandwidth estimator) wait for the
    // grid instead of running on every packet.
    let (timeouts, direct) = (m.write_timeouts - timeouts, m.direct_sends - direct);
    println!("# {direct} packets sent at once, {timeouts} writes ran timers");
    assert!(direct >= 20 * 480, "{direct} packets sent at once");
    assert_eq!(timeouts, 0, "writes to quiet listeners ran their timers");
    // They still hear the speaker, every packet.
    let t = stats(&world, peers[20], talker, MIC);
    assert!(t.packets >= heard + 480, "{t:?}");
    assert_eq!(t.gaps, 0);
    // And get sender reports for the packets sent at once: the sender's count (since the
    // slot's stream was last declared: the same 487 of 601 when queued) and its RTP clock
    // (48 kHz) follow the packets (lip sync and receiver statistics read them).
    let (sent, report_time, packet_time) = t.sender_report.expect("a sender report");
    assert!(
        sent >= 400 && u64::from(sent) <= t.packets,
        "{sent} sent, {} received",
        t.packets
    );
    // The report is the latest one (str0m's RTCP interval: a few seconds), on the packets'
    // clock: a little behind the newest packet, never ahead (the same with queued audio).
    let behind = packet_time.wrapping_sub(report_time) as i32;
    assert!(
        (0..6 * 48_000).contains(&behind),
        "report {report_time}, packet {packet_time}"
    );
}

/// A call gone silent sleeps. str0m's delay-based bandwidth estimator, with no transport-cc
/// feedback for longer than two round trips, asked to be woken again after one smoothed round
/// trip: on a fast network (here zero delay, on a LAN well under a millisecond) every session
/// of a silent call was woken every millisecond, about 1000 times a second instead of 4. The
/// vendored str0m patch 0003 (`calls-core/vendor/patches/`) makes it check every 25 ms
/// instead, which the router's quiet grid coalesces; this test fails without it.
#[test]
fn a_silent_call_sleeps_on_a_fast_network() {
    let mut world = SimWorld::new(111, epoch());
    let peers = meeting(&mut world, 11, 1);
    let talker = peers[0];
    for &p in &peers[1..] {
        world.set_muted(p, true);
    }
    let ok = world.run_until(
        |w| {
            peers[1..]
                .iter()
                .all(|&rx| stats(w, rx, talker, MIC).packets > 0)
        },
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    // The speaker is muted at the router: nothing is forwarded any more.
    let now = world.now();
    assert!(world.router_mut().set_muted(talker, true, now).is_ok());
    world.run_for(secs(3.0));
    let before = world.metrics().timer_wakeups;
    world.run_for(secs(10.0));
    let wakeups = world.metrics().timer_wakeups - before;
    let per_session_second = wakeups as f64 / (11.0 * 10.0);
    println!("# {per_session_second:.1} timer wake-ups per session per second");
    assert!(
        per_session_second <= 6.0,
        "{per_session_second:.1} wake-ups per session per second in a silent call"
    );
    // Still connected: the router did not give up on anyone.
    assert_eq!(
        world.router().metrics().sessions,
        11,
        "{}",
        describe(&world)
    );
}

#[test]
fn quiet_listeners_hear_two_speakers_without_delay() {
    // Two speakers' packets reach a muted listener in the same instant: str0m sends one per
    // wake-up, and the second must not wait for the tick grid.
    for (camera, direct) in [(false, true), (false, false), (true, true)] {
        let mut world = SimWorld::new(110, epoch());
        world.router_mut().set_direct_audio(direct);
        two_speakers_reach_quiet_listeners_at_once(world, camera);
    }
}

#[test]
fn quiet_listeners_hear_two_speakers_without_delay_from_a_late_batch() {
    // As the reference server feeds the router: both speakers' packets in one batch, stamped
    // when they were received, 30 ms before the timers the worker ran first (a busy worker,
    // below the lag that degrades it). Each packet written must go out in that batch's
    // flush: str0m lets one out per run and ignores a time older than its last, and a quiet
    // listener's next run is on the tick grid. Before the fix the listeners fell behind by
    // one packet per batch, for good (2 s late in a 1000-participant call). Each half of the
    // fix (one run per packet written, the flush at the newest time) fails this alone.
    //
    // Listeners that receive no video get their audio at once (str0m patch 0009), without
    // the send queue; with a camera in the call their audio is measured for the bandwidth
    // estimate, so it is queued and flushed. The fix above is for quiet listeners with queued
    // audio: with direct audio off, as before the patch.
    for (camera, direct) in [(false, true), (false, false), (true, true)] {
        let mut world = SimWorld::new(111, epoch());
        world.batch_router_input(Some(Duration::from_millis(30)));
        world.router_mut().set_direct_audio(direct);
        two_speakers_reach_quiet_listeners_at_once(world, camera);
    }
}

fn two_speakers_reach_quiet_listeners_at_once(mut world: SimWorld, camera: bool) {
    let mut peers = meeting(&mut world, 6, 2);
    if camera {
        let cam = world.add_peer("meeting", "camera", PeerOptions::default());
        world.set_muted(cam, true);
        peers.push(cam);
    }
    for &p in &peers[2..] {
        world.set_muted(p, true);
    }
    let ok = world.run_until(
        |w| {
            peers[2..].iter().all(|&listener| {
                peers[..2]
                    .iter()
                    .all(|&s| stats(w, listener, s, MIC).packets > 0)
            })
        },
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    if camera {
        let seen = |w: &SimWorld| {
            peers[2..6]
                .iter()
                .all(|&l| stats(w, l, peers[6], TrackSource::Camera).packets > 0)
        };
        assert!(world.run_until(seen, secs(5.0)), "{}", describe(&world));
    }
    let m = world.metrics();
    let (flushes, direct) = (m.write_flushes, m.direct_sends);
    world.run_for(secs(3.0));
    let m = world.metrics();
    let (flushes, direct) = (m.write_flushes - flushes, m.direct_sends - direct);
    // 4 listeners × 2 speakers × 50 packets a second for 3 s: each went one way or the other
    // (a flush covers what one input wrote to a session: both speakers, in batch mode).
    // With a camera, only its publisher (who sees no video) hears at once: ≤ 300.
    if camera {
        assert!(
            flushes >= 1000 && direct <= 310,
            "{flushes} flushes, {direct} at once"
        );
    } else if world.metrics().direct_sends == 0 {
        assert!(flushes >= 550, "{flushes} flushes, direct audio off");
    } else {
        assert!(direct >= 1150, "{flushes} flushes, {direct} at once");
    }
    for &listener in &peers[2..6] {
        for &speaker in &peers[..2] {
            let t = stats(&world, listener, speaker, MIC);
            let sent_for = t.last_packet_at.zip(t.first_packet_at).map(|(l, f)| l - f);
            // 50 packets a second arrive as they are sent: none held back for a quarter second.
            assert!(
                sent_for.is_some_and(|d| t.packets as f64 >= d.as_secs_f64() * 50.0 * 0.95),
                "listener {listener}, speaker {speaker}: {t:?}"
            );
            assert!(
                world.now() - t.last_packet_at.unwrap_or(world.now()) < secs(0.1),
                "listener {listener}, speaker {speaker}: {t:?}"
            );
            // Measured packet by packet: from the speaker's send to the listener's receive.
            let delay = &t.audio_delay;
            assert!(
                delay.count() + 5 >= t.packets && delay.max() < Some(secs(0.06)),
                "listener {listener}, speaker {speaker}: delay p50 {:?}, p99 {:?}, max {:?} over {} packets",
                delay.quantile(0.5),
                delay.quantile(0.99),
                delay.max(),
                delay.count()
            );
        }
    }
}

#[test]
fn listeners_measure_the_audio_delay_the_network_adds() {
    // Each audio payload carries its publisher's send time (the peers share the world's
    // clock), so a listener measures the whole path: 40 ms up to the router, 40 ms down.
    let mut world = SimWorld::new(113, epoch());
    world.set_impairment(Impairment::delay(Duration::from_millis(40)));
    let peers = meeting(&mut world, 4, 1);
    world.run_for(secs(6.0));
    for &listener in &peers[1..] {
        let t = stats(&world, listener, peers[0], MIC);
        let delay = t.audio_delay.clone();
        let all = world.peer(listener).audio_delay();
        assert!(
            all.count() >= delay.count(),
            "the peer's total holds its tracks'"
        );
        let (p50, p99, max) = (
            delay.quantile(0.5).unwrap_or_default(),
            delay.quantile(0.99).unwrap_or_default(),
            delay.max().unwrap_or_default(),
        );
        assert!(
            delay.count() > 200 && delay.count() + 5 >= t.packets,
            "listener {listener}: {} delays for {} packets",
            delay.count(),
            t.packets
        );
        assert!(
            p50 >= secs(0.08) && p99 <= secs(0.09) && max < secs(0.1),
            "listener {listener}: p50 {p50:?}, p99 {p99:?}, max {max:?}"
        );
    }
}

/// Packets the router took in from `peer`'s microphone over `window` of simulated time.
fn mic_packets_over(world: &mut SimWorld, peer: SessionId, window: Duration) -> u64 {
    let before = world.peer(peer).sent(MIC).packets;
    world.run_for(window);
    world.peer(peer).sent(MIC).packets - before
}

#[test]
fn muted_microphones_send_dtx_when_the_router_asks() {
    // The router's answer asks for Opus DTX (`usedtx=1`): a muted microphone that honours it
    // (as Chromium does) sends 2.5 packets a second instead of 50, so a call where everyone
    // holds a microphone takes in little more than its speakers' packets.
    let mut world = SimWorld::new(131, epoch());
    let talker = world.add_peer("dtx", "talker", PeerOptions::audio_only());
    let muted = world.add_peer("dtx", "muted", PeerOptions::audio_only());
    let old = world.add_peer("dtx", "old", PeerOptions::audio_only().without_dtx());
    let ok = world.run_until(
        |w| {
            [muted, old]
                .iter()
                .all(|&rx| stats(w, rx, talker, MIC).packets > 0)
        },
        secs(5.0),
    );
    assert!(ok, "{}", describe(&world));
    world.set_muted(muted, true);
    world.set_muted(old, true);
    world.run_for(secs(1.0));
    let window = secs(10.0);
    let before = (
        world.peer(muted).sent(MIC).packets,
        world.peer(old).sent(MIC).packets,
        world.peer(talker).sent(MIC).packets,
    );
    let heard = stats(&world, muted, talker, MIC).packets;
    world.run_for(window);
    let dtx = world.peer(muted).sent(MIC).packets - before.0;
    let no_dtx = world.peer(old).sent(MIC).packets - before.1;
    let talked = world.peer(talker).sent(MIC).packets - before.2;
    println!("# 10 s muted: {dtx} packets with DTX, {no_dtx} without; the talker {talked}");
    assert!(
        (20..=30).contains(&dtx),
        "{dtx} packets from a DTX microphone in 10 s"
    );
    assert!(
        no_dtx >= 490,
        "{no_dtx} packets from a microphone without DTX"
    );
    assert!(
        talked >= 490,
        "the talker's microphone is not DTX'd: {talked}"
    );
    // The muted listener still hears the talker, every packet.
    assert!(stats(&world, muted, talker, MIC).packets >= heard + 490);
    // Unmuted again: 50 a second at once.
    world.set_muted(muted, false);
    world.run_for(secs(0.5));
    let unmuted = mic_packets_over(&mut world, muted, secs(2.0));
    assert!(unmuted >= 98, "{unmuted} packets in 2 s after unmuting");
}

#[test]
fn opus_dtx_off_leaves_muted_microphones_at_full_rate() {
    let mut config = Config::default();
    config.opus_dtx = false;
    let mut world = SimWorld::with_config(132, epoch(), config);
    let talker = world.add_peer("dtx", "talker", PeerOptions::audio_only());
    let muted = world.add_peer("dtx", "muted", PeerOptions::audio_only());
    let ok = world.run_until(|w| stats(w, muted, talker, MIC).packets > 0, secs(5.0));
    assert!(ok, "{}", describe(&world));
    world.set_muted(muted, true);
    world.run_for(secs(1.0));
    let sent = mic_packets_over(&mut world, muted, secs(10.0));
    assert!(
        sent >= 490,
        "{sent} packets from a muted microphone, DTX not asked for"
    );
}

/// Transport-cc feedback datagrams among `datagrams` (SRTCP leaves the first RTCP header of a
/// compound in the clear, and str0m puts its transport-cc feedback first: an RTPFB packet,
/// PT 205, with FMT 15 (draft-holmer-rmcat-transport-wide-cc-extensions).
fn transport_cc_reports(datagrams: &[Vec<u8>]) -> usize {
    datagrams
        .iter()
        .filter(|d| d.len() >= 8 && (128..192).contains(&d[0]) && d[0] & 31 == 15 && d[1] == 205)
        .count()
}

#[test]
fn listeners_of_audio_alone_send_no_transport_cc_feedback() {
    // A listener that hears only audio would send the router a transport-cc report about ten
    // times a second, for an estimate that only chooses video layers: in a meeting of muted
    // microphones that was most of the datagrams the server took in. The router leaves such
    // a listener's audio unmeasured (the vendored str0m patch 0004), and measures it again
    // as soon as a camera reaches the listener, so the estimate covers the whole link.
    let mut world = SimWorld::new(141, epoch());
    let peers = meeting(&mut world, 4, 1);
    let (talker, listener) = (peers[0], peers[3]);
    for &p in &peers[1..] {
        world.set_muted(p, true);
    }
    let ok = world.run_until(|w| stats(w, listener, talker, MIC).packets > 0, secs(5.0));
    assert!(ok, "{}", describe(&world));
    world.run_for(secs(3.0));
    let window = secs(10.0);
    let heard = stats(&world, listener, talker, MIC).packets;
    let addr = world.peer(listener).addr();
    world.capture_from(addr, 100_000);
    world.run_for(window);
    let audio_only = transport_cc_reports(world.captured());
    let t = stats(&world, listener, talker, MIC);
    println!("# audio alone: {audio_only} transport-cc reports in 10 s");
    assert!(t.packets >= heard + 480 && t.gaps == 0, "{t:?}");
    // Only the estimator's occasional probes are reported on (none at all once it settled).
    assert!(audio_only <= 5, "{audio_only} reports in 10 s");

    // A camera joins: the listener's camera slot carries it, and everything it receives is
    // measured again.
    let camera = world.add_peer("meeting", "camera", PeerOptions::default());
    world.peer_mut(camera).set_silent(true);
    let ok = world.run_until(|w| stats(w, listener, camera, CAM).packets > 0, secs(5.0));
    assert!(ok, "{}", describe(&world));
    world.run_for(secs(1.0));
    world.capture_from(addr, 100_000);
    world.run_for(window);
    let with_video = transport_cc_reports(world.captured());
    println!("# with video: {with_video} transport-cc reports in 10 s");
    assert!(
        with_video >= 50,
        "{with_video} reports in 10 s with a camera"
    );
}

/// SSRC, sequence number and payload type of an RTP datagram (None for RTCP, STUN, DTLS:
/// the receiver's [`clear_rtp_header`] tells them apart).
fn rtp_header(d: &[u8]) -> Option<(u32, u16, u8)> {
    let (ssrc, _) = clear_rtp_header(d)?;
    Some((ssrc, u16::from_be_bytes([d[2], d[3]]), d[1] & 0x7F))
}

#[test]
fn a_parked_slot_resumes_its_rtx_sequence() {
    // A slot idle for 5 s is parked (its send stream taken out of str0m) and declared again
    // before its next packet. str0m started a stream declared anew at a random RTX sequence
    // number: the subscriber dropped the resumed slot's resends and probe padding as old
    // packets (its transport-cc reports called them lost and its bandwidth estimate fell to
    // the audio rate), and SRTP would encrypt under packet indexes it had used. Every SSRC the
    // router sends, RTX included, goes on from where it stopped (vendored str0m patch 0006).
    let lossy = Impairment::delay(Duration::from_millis(20)).with_loss(0.05);
    let (mut world, cams, viewer) = camera_meeting(107, 1, 1, Impairment::default());
    let cam = cams[0];
    world.set_peer_impairment(viewer, Impairment::default(), lossy);
    let ok = world.run_until(|w| stats(w, viewer, cam, CAM).packets > 100, secs(8.0));
    assert!(ok, "the camera never showed{}", describe(&world));
    let mid = slot_of(&world, viewer, cam, CAM).expect("camera slot");
    let addr = world.peer(viewer).addr();
    world.capture_to(addr, 1_000_000);
    world.run_for(secs(3.0));
    let before = world.captured().len();

    // The viewer pauses the slot: nothing is written to it, and after 5 s it is parked.
    let pause = |paused| ClientMessage::Preference {
        mid: mid.clone(),
        paused,
        max_layer: None,
    };
    let parked = world.metrics().streams_parked;
    world.signal_now(viewer, pause(true)).expect("pause");
    world.run_for(secs(7.0));
    assert!(
        world.metrics().streams_parked > parked,
        "the slot was not parked"
    );
    let paused = world.captured().len();
    let unparked = world.metrics().streams_unparked;
    world.signal_now(viewer, pause(false)).expect("resume");
    world.run_for(secs(4.0));
    assert!(
        world.metrics().streams_unparked > unparked,
        "the slot never resumed"
    );

    // (index in the capture, SSRC, sequence number, payload type) of every RTP packet.
    let packets: Vec<(usize, u32, u16, u8)> = world
        .captured()
        .iter()
        .enumerate()
        .filter_map(|(i, d)| rtp_header(d).map(|(ssrc, seq, pt)| (i, ssrc, seq, pt)))
        .collect();
    let mut last: std::collections::BTreeMap<u32, u16> = std::collections::BTreeMap::new();
    for &(_, ssrc, seq, pt) in &packets {
        if let Some(prev) = last.insert(ssrc, seq) {
            assert_eq!(
                seq,
                prev.wrapping_add(1),
                "SSRC {ssrc} (PT {pt}) jumped from {prev} to {seq}"
            );
        }
    }
    // The slot's RTX stream carried resends before the pause and after it.
    let streams: std::collections::BTreeSet<(u32, u8)> =
        packets.iter().map(|&(_, s, _, p)| (s, p)).collect();
    println!("# SSRC/PT streams to the viewer: {streams:?}");
    let sent = |stream: (u32, u8), captured: std::ops::Range<usize>| {
        packets
            .iter()
            .any(|&(i, s, _, p)| captured.contains(&i) && (s, p) == stream)
    };
    let across: Vec<&(u32, u8)> = streams
        .iter()
        .filter(|&&stream| sent(stream, 0..before) && sent(stream, paused..usize::MAX))
        .collect();
    assert!(
        across.len() >= 3,
        "expected the audio slot, the camera slot and its RTX on both sides of the pause: {across:?}"
    );
}
