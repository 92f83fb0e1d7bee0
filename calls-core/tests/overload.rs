//! Overload on the simulated network (issue 15): a router whose embedder reports lag keeps the
//! sessions it carries, sheds video layers, then cameras, never audio, refuses joins with the
//! typed error, and climbs back with hysteresis.
//!
//! The embedder is modelled in [`CpuBudget`]: a thread that can do `budget` units of work per
//! second (one unit per datagram in or out of the router). Work beyond the budget piles up as
//! a backlog, and the backlog is the lag it reports, exactly as a real worker's queue grows
//! when packets arrive faster than it handles them. So shedding really lowers the lag here,
//! as it does on a real machine. Everything runs in virtual time; nothing is timed.
//!
//! Run with `cargo test -p calls-core --features server --test overload -- --nocapture`.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{epoch, secs, stats};

use std::time::Duration;

use calls_core::sim::{PeerOptions, SimWorld};
use calls_core::{
    CallId, Config, Event, Load, LoadLevel, RouterError, SessionId, TrackSource, UserId,
};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;
/// How often the embedder reports (the reference server's window).
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// An embedder thread with a fixed amount of work per second (see the module docs).
struct CpuBudget {
    units_per_second: f64,
    backlog: f64,
    last_work: u64,
}

impl CpuBudget {
    fn new(world: &SimWorld, units_per_second: f64) -> CpuBudget {
        CpuBudget {
            units_per_second,
            backlog: 0.0,
            last_work: work(world),
        }
    }

    /// Runs one report window and tells the router what the window cost.
    fn step(&mut self, world: &mut SimWorld) -> LoadLevel {
        world.run_for(REPORT_EVERY);
        let now = work(world);
        let done = (now - self.last_work) as f64;
        self.last_work = now;
        let capacity = self.units_per_second * REPORT_EVERY.as_secs_f64();
        self.backlog = (self.backlog + done - capacity).max(0.0);
        let lag = Duration::from_secs_f64(self.backlog / self.units_per_second);
        let at = world.now();
        world
            .router_mut()
            .set_load(Load::new(lag, done / capacity), at)
    }
}

/// Units of work the router has done so far: datagrams in and out.
fn work(world: &SimWorld) -> u64 {
    let m = world.metrics();
    m.datagrams_in + m.datagrams_out
}

/// Reports a fixed load for `duration`, one report per window.
fn report(world: &mut SimWorld, load: Load, duration: Duration) -> LoadLevel {
    let mut level = world.router().load_level();
    let end = world.now() + duration;
    while world.now() < end {
        world.run_for(REPORT_EVERY);
        let at = world.now();
        level = world.router_mut().set_load(load, at);
    }
    level
}

/// A report of `ms` lag on a thread busy a third of the time.
fn lag(ms: u64) -> Load {
    Load::new(Duration::from_millis(ms), 0.3)
}

/// Audio packets each peer has received so far, from anyone.
fn audio_received(world: &SimWorld) -> Vec<(SessionId, u64)> {
    world
        .peers()
        .map(|p| {
            let audio = p
                .received()
                .filter(|(_, src, _)| src.is_audio())
                .map(|(_, _, t)| t.packets)
                .sum();
            (p.session(), audio)
        })
        .collect()
}

/// Video packets `rx` has received so far, from anyone.
fn video_received(world: &SimWorld, rx: SessionId) -> u64 {
    world
        .peer(rx)
        .received()
        .filter(|(_, src, _)| !src.is_audio())
        .map(|(_, _, t)| t.packets)
        .sum()
}

fn level_changes(world: &SimWorld) -> Vec<LoadLevel> {
    world
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::LoadLevelChanged { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

fn left(world: &SimWorld) -> Vec<SessionId> {
    world
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Left { session, .. } => Some(*session),
            _ => None,
        })
        .collect()
}

fn describe(world: &SimWorld) -> String {
    let m = world.metrics();
    let mut out = format!(
        "\nat {:?}: level {:?}, changes {:?}, left {:?}, rtp out {:?}",
        world.elapsed(),
        world.router().load_level(),
        level_changes(world),
        left(world),
        m.media_out
    );
    for p in world.peers() {
        let bandwidth = m
            .session_stats
            .iter()
            .find(|s| s.session == p.session())
            .and_then(|s| s.bandwidth_bps);
        out += &format!(
            "\n  {} connected {} errors {:?} bandwidth {bandwidth:?}",
            p.session(),
            p.is_connected(),
            p.errors()
        );
        for (tx, src, t) in p.received() {
            out += &format!(
                "\n    from {tx} {src:?}: {} pkts, layers {:?}, last {:?}",
                t.packets, t.frames_by_layer, t.last_layer
            );
        }
    }
    out
}

/// `n` participants, each with a microphone and a three-layer simulcast camera, everyone
/// connected and receiving video.
fn busy_call(seed: u64, n: usize) -> (SimWorld, Vec<SessionId>) {
    let mut world = SimWorld::new(seed, epoch());
    let peers: Vec<SessionId> = (0..n)
        .map(|i| {
            world.add_peer(
                "room",
                format!("p{i}"),
                PeerOptions::default().with_simulcast(),
            )
        })
        .collect();
    let ready = world.run_until(
        |w| {
            peers.iter().all(|&rx| {
                w.peer(rx).is_connected()
                    && peers
                        .iter()
                        .filter(|&&tx| tx != rx)
                        .all(|&tx| stats(w, rx, tx, CAM).packets > 0)
            })
        },
        secs(20.0),
    );
    assert!(ready, "the call never settled{}", describe(&world));
    world.run_for(secs(3.0));
    (world, peers)
}

#[test]
fn overload_keeps_existing_sessions() {
    let (mut world, peers) = busy_call(151, 6);
    // What the call costs at full quality, per second.
    let before = work(&world);
    let audio_before = audio_received(&world);
    world.run_for(secs(4.0));
    let full_rate = (work(&world) - before) as f64 / 4.0;
    let audio_normal = audio_received(&world);

    // The embedder's thread now manages only 60 % of that.
    let mut cpu = CpuBudget::new(&world, full_rate * 0.6);
    let mut levels = Vec::new();
    for _ in 0..8 {
        levels.push(cpu.step(&mut world));
    }
    assert!(
        levels.iter().any(|l| *l >= LoadLevel::Degraded),
        "the lag never registered: {levels:?}{}",
        describe(&world)
    );
    // New joins are refused with the typed error while it sheds.
    let refused = world.try_add_peer(
        CallId::from("room"),
        SessionId(100),
        UserId::from("late"),
        PeerOptions::audio_only(),
    );
    assert!(
        matches!(refused, Err(RouterError::Overloaded { retry_after_s }) if retry_after_s >= 1),
        "{refused:?}"
    );
    assert_eq!(refused.unwrap_err().code(), "overloaded");

    // Twenty more seconds over the budget: signaling still works …
    let audio_overload_start = audio_received(&world);
    world.set_muted(peers[0], true);
    for _ in 0..40 {
        cpu.step(&mut world);
    }
    let audio_overload_end = audio_received(&world);

    // … nobody left or disconnected …
    assert!(left(&world).is_empty(), "{}", describe(&world));
    for &p in &peers {
        assert!(world.peer(p).is_connected(), "{p}{}", describe(&world));
        assert!(world.peer(p).errors().is_empty(), "{p}{}", describe(&world));
    }
    for &p in &peers[1..] {
        let saw_mute = world.peer(p).signal_log().any(|m| {
            matches!(m, calls_core::ServerMessage::Muted { session, muted: true, .. } if *session == peers[0])
        });
        assert!(saw_mute, "{p} never heard of the mute{}", describe(&world));
    }
    // … and everyone hears as much audio as at full quality (per second; the muted
    // participant is one voice fewer for the others, so the bar is on each peer's total).
    let per_second = |a: &[(SessionId, u64)], b: &[(SessionId, u64)], s: f64| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|((_, x), (_, y))| (*y - *x) as f64 / s)
            .collect()
    };
    let normal = per_second(&audio_before, &audio_normal, 4.0);
    let overloaded = per_second(&audio_overload_start, &audio_overload_end, 20.0);
    for ((&p, n), o) in peers.iter().zip(&normal).zip(&overloaded) {
        // Three audio slots at 50 packets/s: a listener hears 100–150 packets/s.
        assert!(
            *o >= 95.0 && *o >= n * 0.6,
            "{p}: {o:.0} audio packets/s under overload vs {n:.0} before{}",
            describe(&world)
        );
    }
    // The shedding brought the work under the budget: the lag is gone, and the router
    // settled instead of flapping (entered a level, possibly stepped once more, stays).
    let changes = level_changes(&world);
    assert!(
        !changes.is_empty() && changes.len() <= 3,
        "flapped: {changes:?}{}",
        describe(&world)
    );
    assert!(
        cpu.backlog < cpu.units_per_second * 0.05,
        "still {} units behind{}",
        cpu.backlog,
        describe(&world)
    );
    let m = world.metrics();
    assert_eq!(m.joins_refused_overloaded, 1);
    assert!(m.load_level >= 1);
}

#[test]
fn overload_sheds_video_before_audio() {
    let (mut world, peers) = busy_call(152, 3);
    let (rx, tx) = (peers[1], peers[0]);
    let top = world.run_until(|w| stats(w, rx, tx, CAM).last_layer == Some(2), secs(20.0));
    assert!(top, "{}", describe(&world));

    // Degraded: upper layers go first, every camera on its lowest layer.
    assert_eq!(report(&mut world, lag(100), secs(1.0)), LoadLevel::Degraded);
    let lowest = world.run_until(
        |w| {
            peers.iter().all(|&r| {
                peers
                    .iter()
                    .filter(|&&t| t != r)
                    .all(|&t| stats(w, r, t, CAM).last_layer == Some(0))
            })
        },
        secs(3.0),
    );
    assert!(lowest, "upper layers were not shed{}", describe(&world));
    let video_degraded = video_received(&world, rx);
    world.run_for(secs(1.0));
    assert!(
        video_received(&world, rx) > video_degraded,
        "video stopped already at Degraded{}",
        describe(&world)
    );

    // Overloaded: cameras go, audio stays.
    assert_eq!(
        report(&mut world, lag(400), secs(1.0)),
        LoadLevel::Overloaded
    );
    world.run_for(secs(1.0)); // packets of frames already in flight
    let video_at = video_received(&world, rx);
    let audio_at = audio_received(&world);
    // Keep reporting the lag for three seconds.
    report(&mut world, lag(400), secs(3.0));
    assert_eq!(
        video_received(&world, rx),
        video_at,
        "cameras still forwarded while overloaded{}",
        describe(&world)
    );
    for ((p, before), (_, after)) in audio_at.iter().zip(audio_received(&world)) {
        assert!(
            after - before >= 3 * 100,
            "{p} heard {} audio packets in 3 s{}",
            after - before,
            describe(&world)
        );
    }
    // Dynacast: nobody wants the camera layers, so publishers are told to stop sending them.
    let stopped = world.run_until(
        |w| {
            w.peer(tx)
                .layers_log()
                .last()
                .is_some_and(|(_, _, active)| active.is_empty())
        },
        secs(3.0),
    );
    assert!(stopped, "publisher still asked to send{}", describe(&world));

    // Calm: one step down per 5 s calm, video first at its lowest layer, then everything.
    let calm = Load::new(Duration::from_millis(2), 0.1);
    let calm_from = world.now();
    let level = report(&mut world, calm, secs(4.0));
    assert_eq!(level, LoadLevel::Overloaded, "stepped down before the hold");
    let level = report(&mut world, calm, secs(2.0));
    assert_eq!(level, LoadLevel::Degraded);
    let back = world.run_until(
        |w| {
            stats(w, rx, tx, CAM)
                .last_packet_at
                .is_some_and(|t| t > calm_from)
        },
        secs(3.0),
    );
    assert!(
        back,
        "video did not come back at Degraded{}",
        describe(&world)
    );
    assert_eq!(stats(&world, rx, tx, CAM).last_layer, Some(0));
    let level = report(&mut world, calm, secs(5.0));
    assert_eq!(level, LoadLevel::Normal);
    let normal_at = world.now();
    let climbed = world.run_until(|w| stats(w, rx, tx, CAM).last_layer == Some(2), secs(10.0));
    println!(
        "# back on the top layer {:?} after Normal",
        world.now() - normal_at
    );
    assert!(
        climbed,
        "never climbed back to the top layer{}",
        describe(&world)
    );
    assert_eq!(
        level_changes(&world),
        vec![
            LoadLevel::Degraded,
            LoadLevel::Overloaded,
            LoadLevel::Degraded,
            LoadLevel::Normal
        ]
    );
    assert!(left(&world).is_empty(), "{}", describe(&world));
}

#[test]
fn joins_are_refused_with_the_typed_error_once_overloaded_and_accepted_after_recovery() {
    let mut config = Config::default();
    config.overload_recover_ms = 3_000;
    let mut world = SimWorld::with_config(153, epoch(), config);
    let a = world.add_peer("room", "a", PeerOptions::audio_only());
    world.run_for(secs(2.0));

    // One lag spike is not overload: joins go on.
    let at = world.now();
    world.router_mut().set_load(lag(500), at);
    let b = world.add_peer("room", "b", PeerOptions::audio_only());
    world.run_for(secs(0.5));
    let at = world.now();
    world.router_mut().set_load(lag(1), at);

    // Sustained lag: refused, typed, with the retry hint of the recovery hold.
    assert_eq!(report(&mut world, lag(80), secs(1.0)), LoadLevel::Degraded);
    for id in 10..13 {
        let refused = world.try_add_peer(
            CallId::from("room"),
            SessionId(id),
            UserId::from(format!("u{id}")),
            PeerOptions::audio_only(),
        );
        assert_eq!(refused, Err(RouterError::Overloaded { retry_after_s: 3 }));
    }
    let m = world.metrics();
    assert_eq!((m.joins_refused, m.joins_refused_overloaded), (3, 3));
    assert_eq!(m.sessions, 2);

    // Calm for the hold: accepted again; the two who were there never noticed.
    report(&mut world, lag(1), secs(3.5));
    assert_eq!(world.router().load_level(), LoadLevel::Normal);
    let c = world.add_peer("room", "c", PeerOptions::audio_only());
    let heard = world.run_until(|w| stats(w, c, a, MIC).packets > 50, secs(5.0));
    assert!(heard, "{}", describe(&world));
    assert!(world.peer(a).is_connected() && world.peer(b).is_connected());
    assert!(left(&world).is_empty());
}
