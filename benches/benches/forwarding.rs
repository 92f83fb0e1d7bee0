//! Forwarding throughput: our router vs the str0m-chat-style baseline vs the AES-128-GCM seal
//! limit, all in one run. One iteration = one incoming media packet; throughput elements =
//! packets forwarded per incoming packet (the fan-out), so criterion's "elem/s" is forwarded
//! packets per second on one core. Also prints live heap bytes per participant.
//!
//! `cargo bench -p calls-benches --bench forwarding` (see docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use calls_benches::alloc::{live_bytes, CountingAlloc};
use calls_benches::baseline::BaselineCall;
use calls_benches::ours::OursCall;
use calls_benches::{test_mode, Media};
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
    fn counts(&self) -> (u64, u64) {
        (self.routed, self.forwarded)
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
        for &n in fanouts {
            group.throughput(Throughput::Elements(n as u64));
            let mut ours = OursCall::new(media, 1, n);
            group.bench_function(BenchmarkId::new("ours", n), |b| {
                b.iter_custom(|iters| run(&mut ours, iters))
            });
            ours.flush();
            check(&format!("ours {name} 1->{n}"), &ours, n as u64);
            let mut chat = BaselineCall::new(media, 1, n);
            group.bench_function(BenchmarkId::new("chat-baseline", n), |b| {
                b.iter_custom(|iters| run(&mut chat, iters))
            });
            check(&format!("chat {name} 1->{n}"), &chat, n as u64);
        }
        group.finish();
    }
}

/// A big call: two speakers, everyone else listening. Also measures memory per participant.
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
    let participants = if test_mode() { 12 } else { 200 };
    let fanout = participants as u64 - 1;
    let mut group = c.benchmark_group("room-2-speakers-all-mics");
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
    let scenarios: [(String, usize, Build); 3] = [
        (format!("{big} participants, 2 audio speakers"), big, |n| {
            OursCall::new(Media::Audio, 2, n - 2)
        }),
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

criterion_group!(benches, aes_gcm, forwarding, big_call, muted_room, memory);
criterion_main!(benches);
