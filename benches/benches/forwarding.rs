//! Forwarding throughput: our router vs the str0m-chat-style baseline vs the AES-128-GCM seal
//! limit, all in one run. One iteration = one incoming media packet (100 in the simulcast
//! group, see [`simulcast`]); throughput elements = packets forwarded per iteration (the
//! fan-out), so criterion's "elem/s" is forwarded packets per second on one core. Also prints
//! live heap bytes per participant.
//!
//! `cargo bench -p calls-benches --bench forwarding` (see docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use calls_benches::alloc::{live_bytes, CountingAlloc};
use calls_benches::baseline::BaselineCall;
use calls_benches::ours::OursCall;
use calls_benches::{test_mode, Media, ServerClock};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Datagrams generated ahead per timed chunk.
const CHUNK: u64 = 256;

/// Everything a call needs to be benchmarked the same way.
trait BenchCall {
    fn generate(&mut self, n: usize) -> Vec<(std::net::SocketAddr, Vec<u8>)>;
    fn route(&mut self, batch: &[(std::net::SocketAddr, Vec<u8>)]);
    fn maintain(&mut self);
    fn counts(&self) -> (u64, u64);
}

impl BenchCall for OursCall {
    fn generate(&mut self, n: usize) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
        OursCall::generate(self, n)
    }
    fn route(&mut self, batch: &[(std::net::SocketAddr, Vec<u8>)]) {
        OursCall::route(self, batch)
    }
    fn maintain(&mut self) {
        OursCall::maintain(self)
    }
    /// The router's own count of media written to subscribers (pacing does not delay it).
    fn counts(&self) -> (u64, u64) {
        (self.routed, self.media_forwarded())
    }
}

impl BenchCall for BaselineCall {
    fn generate(&mut self, n: usize) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
        BaselineCall::generate(self, n)
    }
    fn route(&mut self, batch: &[(std::net::SocketAddr, Vec<u8>)]) {
        BaselineCall::route(self, batch)
    }
    fn maintain(&mut self) {
        BaselineCall::maintain(self)
    }
    fn counts(&self) -> (u64, u64) {
        (self.routed, self.forwarded)
    }
}

/// Times only `route`: generation and maintenance happen between chunks.
fn run(call: &mut impl BenchCall, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let batch = call.generate(n as usize);
        let t = Instant::now();
        call.route(&batch);
        total += t.elapsed();
        call.maintain();
        left -= n;
    }
    total
}

/// Checks that the call forwarded what it should (fan-out per routed packet).
fn check(name: &str, call: &impl BenchCall, fanout: u64) {
    let (routed, forwarded) = call.counts();
    let expected = routed * fanout;
    eprintln!(
        "{name}: routed {routed} media packets, forwarded {forwarded} (expected ~{expected})"
    );
    assert!(
        forwarded * 100 >= expected * 95,
        "{name}: forwarded {forwarded} of {expected}"
    );
}

fn forwarding(c: &mut Criterion) {
    let fanouts: &[usize] = if test_mode() { &[1, 10] } else { &[1, 10, 50] };
    for media in [Media::Audio, Media::Video] {
        let name = match media {
            Media::Audio => "audio",
            Media::Video => "video",
        };
        let mut group = c.benchmark_group(format!("1-to-n-{name}"));
        group.sample_size(20);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        // Video follows media time: under the 10 µs step str0m's pacer would hold most video
        // legs until the untimed flush, leaving their egress out of the measurement.
        let clock = match media {
            Media::Audio => ServerClock::Step,
            Media::Video => ServerClock::Media,
        };
        for &n in fanouts {
            group.throughput(Throughput::Elements(n as u64));
            let mut ours = OursCall::new(media, 1, n).with_clock(clock);
            group.bench_function(BenchmarkId::new("ours", n), |b| {
                b.iter_custom(|iters| run(&mut ours, iters))
            });
            ours.flush();
            check(&format!("ours {name} 1->{n}"), &ours, n as u64);
            let mut chat = BaselineCall::new(media, 1, n).with_clock(clock);
            group.bench_function(BenchmarkId::new("chat-baseline", n), |b| {
                b.iter_custom(|iters| run(&mut chat, iters))
            });
            check(&format!("chat {name} 1->{n}"), &chat, n as u64);
        }
        group.finish();
    }
}

/// A big call: two speakers, everyone else listening.
fn big_call(c: &mut Criterion) {
    let participants = if test_mode() { 50 } else { 1000 };
    let fanout = participants as u64 - 1;
    let mut group = c.benchmark_group("big-call-2-speakers");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(fanout));

    let mut ours = OursCall::new(Media::Audio, 2, participants - 2);
    group.bench_function(BenchmarkId::new("ours", participants), |b| {
        b.iter_custom(|iters| run(&mut ours, iters))
    });
    ours.flush();
    check("ours big call", &ours, fanout);
    drop(ours);

    let before = live_bytes();
    let mut chat = BaselineCall::new(Media::Audio, 2, participants - 2);
    group.bench_function(BenchmarkId::new("chat-baseline", participants), |b| {
        b.iter_custom(|iters| run(&mut chat, iters))
    });
    check("chat big call", &chat, fanout);
    let server = chat.into_server();
    let server_only = live_bytes() - before;
    drop(server);
    eprintln!(
        "memory chat {participants} participants (after the accelerated bench, see memory()): server {} B/participant",
        server_only / participants as isize,
    );
    group.finish();
}

/// A meeting where everyone publishes a microphone, two talk and the rest are muted, against
/// the same call where the listeners publish nothing: the same forwarding work, so the ratio
/// is what idle subscriptions cost (str0m visits every send stream on every timeout; the
/// router parks idle ones).
fn muted_room(c: &mut Criterion) {
    room_with_mics(c, "room-2-speakers-all-mics", 200);
}

/// The reference call (rtcd's sizing): 1000 participants, everyone holding a microphone,
/// muted, two talking; against the same call without the listeners' microphones. With
/// receive slots a subscriber's connection is the same size either way, so the ratio should
/// be close to 1.
fn room_1000(c: &mut Criterion) {
    room_with_mics(c, "room-1000-all-mics", 1000);
}

fn room_with_mics(c: &mut Criterion, name: &str, participants: usize) {
    let participants = if test_mode() { 12 } else { participants };
    let fanout = participants as u64 - 1;
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(fanout));
    for muted_mics in [true, false] {
        let name = if muted_mics { "muted-mics" } else { "no-mics" };
        let mut ours = OursCall::room(Media::Audio, 2, participants - 2, muted_mics);
        group.bench_function(BenchmarkId::new(name, participants), |b| {
            b.iter_custom(|iters| run(&mut ours, iters))
        });
        ours.flush();
        check(&format!("ours room {name}"), &ours, fanout);
    }
    group.finish();
}

/// Router heap per participant, each call fresh and run at real packet rates for 12 s of
/// virtual time (so str0m's time-bounded histories and the TWCC send register, 1000 records,
/// are as full as in a real call; see `OursCall::run_realtime`), then the router alone.
fn memory(_c: &mut Criterion) {
    let big = if test_mode() { 50 } else { 1000 };
    let room = if test_mode() { 12 } else { 200 };
    let video = if test_mode() { 4 } else { 10 };
    type Build = fn(usize) -> OursCall;
    let scenarios: [(String, usize, Build); 4] = [
        (format!("{big} participants, 2 audio speakers"), big, |n| {
            OursCall::new(Media::Audio, 2, n - 2)
        }),
        (
            format!(
                "{big} participants, 2 speakers, {} muted microphones",
                big - 2
            ),
            big,
            |n| OursCall::room(Media::Audio, 2, n - 2, true),
        ),
        (
            format!(
                "{room} participants, 2 speakers, {} muted microphones",
                room - 2
            ),
            room,
            |n| OursCall::room(Media::Audio, 2, n - 2, true),
        ),
        (format!("video 1 -> {video}"), video + 1, |n| {
            OursCall::new(Media::Video, 1, n - 1)
        }),
    ];
    for (name, participants, build) in scenarios {
        let before = live_bytes();
        let mut call = build(participants);
        call.run_realtime(Duration::from_secs(12));
        let router = call.into_router();
        let router_only = live_bytes() - before;
        drop(router);
        eprintln!(
            "memory ours {name} (12 s at real rates): router {} B/participant",
            router_only / participants as isize,
        );
    }
    // Memory must not grow with the call's length: the reference call (everyone a muted
    // microphone, two talking), router alone, after 24 s and after 48 s. str0m kept one
    // history entry per packet sent on a stream that never saw a NACK (all audio) for the
    // stream's life, 1.2 KB per second per listener and speaker (vendored str0m patch 0010).
    // Not the participants: their str0m's TWCC send registers (1000 records) take minutes to
    // fill at DTX rates.
    let router_after = |secs: u64| {
        let before = live_bytes();
        let mut call = OursCall::room(Media::Audio, 2, big - 2, true);
        call.run_realtime(Duration::from_secs(secs));
        let router = call.into_router();
        let bytes = live_bytes() - before;
        drop(router);
        bytes / big as isize
    };
    let (early, late) = (router_after(24), router_after(48));
    eprintln!(
        "memory ours {big} participants, 2 speakers, {} muted microphones: router {early} B/participant after 24 s, {late} after 48 s",
        big - 2
    );
    assert!(
        late - early < 2048,
        "the router's memory grew {} B per participant from 24 s to 48 s of the same call",
        late - early
    );
}

/// Incoming packets per criterion iteration in the simulcast group: its mean fan-out (≈ 3.7)
/// is not a whole number and criterion's elements are, so one iteration is 100 packets and
/// its elements are 100 × the mean fan-out, rounded (error ≤ 0.2 %).
const SIMULCAST_ITER: u64 = 100;

/// Spatial layer of each viewer (0 = `q`): about a third each, the rest on `f`
/// (10 viewers: 3 `q`, 3 `h`, 4 `f`; 4 viewers: 1, 1, 2).
fn simulcast_mix(viewers: usize) -> Vec<u8> {
    let third = viewers / 3;
    (0..viewers)
        .map(|i| match i {
            i if i < third => 0,
            i if i < 2 * third => 1,
            _ => 2,
        })
        .collect()
}

/// Untimed: routes `packets` and returns the mean fan-out over them, and the counts after.
fn warm_up(call: &mut impl BenchCall, packets: u64) -> (f64, (u64, u64)) {
    let (routed, forwarded) = call.counts();
    run(call, packets);
    let after = call.counts();
    let mean = (after.1 - forwarded) as f64 / (after.0 - routed) as f64;
    (mean, after)
}

/// Checks that what was routed since `from` (the end of the warm-up) was forwarded at the
/// warm-up's mean fan-out, within 5 %. Routes untimed up to `min_packets` first if the timed
/// run was shorter (test mode), so the mean is over keyframes and every temporal layer.
fn check_mean(
    name: &str,
    call: &mut impl BenchCall,
    from: (u64, u64),
    fanout: f64,
    min_packets: u64,
) {
    let timed = call.counts().0 - from.0;
    if timed < min_packets {
        run(call, min_packets - timed);
    }
    let (routed, forwarded) = call.counts();
    let (routed, forwarded) = (routed - from.0, forwarded - from.1);
    let mean = forwarded as f64 / routed as f64;
    eprintln!(
        "{name}: routed {routed} media packets, forwarded {forwarded}: {mean:.3} per packet (warm-up: {fanout:.3})"
    );
    assert!(
        (mean - fanout).abs() <= 0.05 * fanout,
        "{name}: forwarded {mean:.3} per packet, the warm-up {fanout:.3}"
    );
}

/// Criterion elements of [`SIMULCAST_ITER`] packets at `fanout`.
fn simulcast_elements(fanout: f64) -> Throughput {
    Throughput::Elements((fanout * SIMULCAST_ITER as f64).round() as u64)
}

/// A 3-layer simulcast camera to viewers held on different layers (3 on `q`, 3 on `h`, 4 on
/// `f`) by router bandwidth caps, through the real path; then, in the same run, the same
/// number of viewers of a single-layer camera (the plain 1 → n video call) and the
/// chat.rs-style baseline of both.
///
/// Each packet goes only to the viewers on its layer, so the fan-out depends on the mix of
/// packets: an untimed warm-up of a few thousand packets measures the mean (the router's own
/// count of media written, `forwarded / routed`), the throughput elements are set to it, and
/// after the timed run [`check_mean`] asserts that the timed packets were forwarded at the same
/// mean within 5 %, and that the router switched no layer meanwhile (the mix held).
///
/// The server clock follows media time ([`ServerClock::Media`]): the router measures layer bit
/// rates in its own time, so at the usual 10 µs per datagram every layer would look a few
/// hundred times too expensive and every viewer would drop to `q`'s base temporal layer. The
/// single-layer call runs under both clocks, so the clock's own cost (timers firing once per
/// real interval of a single call) can be told apart from simulcast's.
fn simulcast(c: &mut Criterion) {
    let viewers = if test_mode() { 4 } else { 10 };
    let warm = if test_mode() { 1000 } else { 4000 };
    let mix = simulcast_mix(viewers);
    let on = |layer: u8| mix.iter().filter(|l| **l == layer).count();
    let mut group = c.benchmark_group(format!("simulcast-3-layers-to-{viewers}"));
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    let started = Instant::now();
    let mut ours = OursCall::simulcast(&mix);
    eprintln!(
        "ours simulcast: set-up {:.1} s wall ({:.1} s simulated); mix reached: {} on q, {} on h, {} on f; budgets {:?} bit/s",
        started.elapsed().as_secs_f64(),
        ours.setup_sim_time().as_secs_f64(),
        on(0),
        on(1),
        on(2),
        ours.subscriber_budgets(),
    );
    let switches = ours.layer_switches();
    let keyframe_requests = ours.keyframe_requests();
    let (fanout, from) = warm_up(&mut ours, warm);
    group.throughput(simulcast_elements(fanout));
    group.bench_function(BenchmarkId::new("ours", "simulcast"), |b| {
        b.iter_custom(|iters| run(&mut ours, iters * SIMULCAST_ITER))
    });
    check_mean("ours simulcast", &mut ours, from, fanout, warm);
    assert_eq!(
        ours.layer_switches(),
        switches,
        "ours simulcast: the router switched layers during the bench, the mix did not hold"
    );
    eprintln!(
        "ours simulcast: keyframe requests during the bench {}; budgets after {:?} bit/s",
        ours.keyframe_requests() - keyframe_requests,
        ours.subscriber_budgets()
    );
    drop(ours);

    let mut chat = BaselineCall::simulcast(&mix);
    let (fanout, from) = warm_up(&mut chat, warm);
    group.throughput(simulcast_elements(fanout));
    group.bench_function(BenchmarkId::new("chat-baseline", "simulcast"), |b| {
        b.iter_custom(|iters| run(&mut chat, iters * SIMULCAST_ITER))
    });
    check_mean("chat simulcast", &mut chat, from, fanout, warm);
    drop(chat);

    group.throughput(Throughput::Elements(viewers as u64 * SIMULCAST_ITER));
    for (name, clock) in [
        ("single-layer", ServerClock::Media),
        ("single-layer-step-clock", ServerClock::Step),
    ] {
        let mut ours = OursCall::new(Media::Video, 1, viewers).with_clock(clock);
        let (_, from) = warm_up(&mut ours, warm);
        group.bench_function(BenchmarkId::new("ours", name), |b| {
            b.iter_custom(|iters| run(&mut ours, iters * SIMULCAST_ITER))
        });
        check_mean(
            &format!("ours {name}"),
            &mut ours,
            from,
            viewers as f64,
            warm,
        );
    }
    let mut chat = BaselineCall::new(Media::Video, 1, viewers).with_clock(ServerClock::Media);
    let (_, from) = warm_up(&mut chat, warm);
    group.bench_function(BenchmarkId::new("chat-baseline", "single-layer"), |b| {
        b.iter_custom(|iters| run(&mut chat, iters * SIMULCAST_ITER))
    });
    check_mean("chat single-layer", &mut chat, from, viewers as f64, warm);
    group.finish();
}

/// The crypto limit: one AES-128-GCM seal (SRTP's AEAD_AES_128_GCM) per forwarded packet.
fn aes_gcm(c: &mut Criterion) {
    let mut group = c.benchmark_group("limit-aes128gcm-seal");
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    for size in [100usize, 1200] {
        group.throughput(Throughput::Elements(1));
        let header = [0x80u8; 12];
        let mut buf = vec![0x5Au8; size];
        let mut counter = 0u32;
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                counter = counter.wrapping_add(1);
                let mut nonce = [0u8; 12];
                nonce[8..].copy_from_slice(&counter.to_be_bytes());
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&header),
                        &mut buf,
                    )
                    .unwrap();
                let _ = std::hint::black_box(tag);
            })
        });
    }
    group.finish();
}

/// What a silent listener costs: the worker's CPU per connected listener per second with
/// nothing to forward (timers, STUN consent, RTCP), and the cost per forwarded packet from one
/// audio speaker to 10, 100 and 1000 listeners; both as ratios to the per-packet cost of the
/// 1 -> 10 call in the same run. Timed by hand (the idle part has no criterion iteration).
/// Each size also runs with direct audio off (every packet through str0m's send queue, as
/// before the vendored patch 0009), for the ratio of the two in the same run.
fn idle_listeners(_c: &mut Criterion) {
    let sizes: &[usize] = if test_mode() {
        &[10, 20]
    } else {
        &[10, 100, 1000]
    };
    let packets: u64 = if test_mode() { 200 } else { 20_000 };
    let idle = Duration::from_secs(if test_mode() { 1 } else { 10 });
    let mut base_ns = None;
    for &n in sizes {
        let per_packet = |direct: bool| {
            let mut call = OursCall::new(Media::Audio, 1, n).with_direct_audio(direct);
            run(&mut call, packets / 10); // warm-up
            let timed = run(&mut call, packets);
            (timed.as_nanos() as f64 / (packets * n as u64) as f64, call)
        };
        let (queued_ns, queued) = per_packet(false);
        drop(queued);
        let (per_packet_ns, mut call) = per_packet(true);
        let base = *base_ns.get_or_insert(per_packet_ns);
        call.fall_silent();
        let busy = call.idle_for(idle);
        let idle_ns = busy.as_nanos() as f64 / (n as f64 * idle.as_secs_f64());
        eprintln!(
            "idle-listeners 1 -> {n}: {per_packet_ns:.0} ns per forwarded packet ({:.2}x the 1 -> {} case; queued in str0m {queued_ns:.0} ns, {:.2}x); idle {:.1} us per listener per second (= {:.1} forwarded packets)",
            per_packet_ns / base,
            sizes[0],
            queued_ns / per_packet_ns,
            idle_ns / 1000.0,
            idle_ns / base,
        );
    }
}

criterion_group!(
    benches,
    aes_gcm,
    forwarding,
    big_call,
    muted_room,
    room_1000,
    idle_listeners,
    memory,
    simulcast
);
criterion_main!(benches);
