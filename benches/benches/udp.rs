//! The I/O limit: what it costs to put one packet (100 B and 1200 B) on loopback UDP.
//!
//! - `send-1-dest`: one `send` per packet on a connected socket, the cost an embedder pays per
//!   forwarded packet without batching.
//! - `sendto-10-dests`: one `send_to` per packet, round-robin to 10 receiver sockets, as an SFU's
//!   fan-out does (each subscriber is a different destination).
//! - `sendmmsg-{8,32}-10-dests` (Linux): the same packets to the same 10 receivers, 8 or 32 per
//!   `sendmmsg(2)` call. This is the batching the reference server does; UDP GSO does not apply,
//!   because one GSO send carries segments to a single destination.
//!
//! Every variant counts one element per packet. Receivers are emptied untimed between chunks of
//! 64 packets so sends never fail with ENOBUFS. On loopback the kernel delivers to the receiving
//! socket inside the send call, so each number includes the receive queueing, the same for all.
//!
//! On Linux the clock is the sending thread's CPU time, not the wall clock: the cost of a send is
//! CPU time, and on a shared machine the wall clock also counts the time other processes hold the
//! core (two wall-clock runs minutes apart disagreed by 2× here). If the kernel defers the loopback
//! receive to `ksoftirqd` under heavy network load, that part would go uncounted.
//!
//! `cargo bench -p calls-benches --bench udp` (see docs/performance.md).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Packets sent between two untimed drains of the receivers.
const CHUNK: u64 = 64;
/// Distinct destinations of the fan-out variants.
const RECEIVERS: usize = 10;

fn udp_send(c: &mut Criterion) {
    let receivers: Vec<UdpSocket> = (0..RECEIVERS)
        .map(|_| {
            let r = UdpSocket::bind("127.0.0.1:0").unwrap();
            r.set_nonblocking(true).unwrap();
            r
        })
        .collect();
    let destinations: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect(destinations[0]).unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sink = vec![0u8; 2048];
    let mut drain = move || {
        for r in &receivers {
            while r.recv(&mut sink).is_ok() {}
        }
    };

    let mut group = c.benchmark_group("limit-udp-send-loopback");
    group.throughput(Throughput::Elements(1));
    for size in [100usize, 1200] {
        let payload = vec![0x5Au8; size];
        group.bench_function(BenchmarkId::new("send-1-dest", size), |b| {
            b.iter_custom(|iters| {
                timed_chunks(iters, &mut drain, |n| {
                    for _ in 0..n {
                        let _ = connected.send(&payload);
                    }
                })
            })
        });
        group.bench_function(BenchmarkId::new("sendto-10-dests", size), |b| {
            b.iter_custom(|iters| {
                timed_chunks(iters, &mut drain, |n| {
                    for i in 0..n as usize {
                        let _ = sender.send_to(&payload, destinations[i % RECEIVERS]);
                    }
                })
            })
        });
        #[cfg(target_os = "linux")]
        for batch in [8usize, 32] {
            let id = BenchmarkId::new(format!("sendmmsg-{batch}-10-dests"), size);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    timed_chunks(iters, &mut drain, |n| {
                        let mut sent = 0;
                        while sent < n as usize {
                            let count = batch.min(n as usize - sent);
                            sent += mmsg::send(&sender, &destinations, sent, &payload, count);
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

/// Times `send(n)` over chunks of at most [`CHUNK`] packets, draining the receivers untimed
/// between chunks.
fn timed_chunks(iters: u64, drain: &mut impl FnMut(), mut send: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let t = thread_time();
        send(n);
        total += thread_time().saturating_sub(t);
        drain();
        left -= n;
    }
    total
}

/// CPU time of the calling thread.
#[cfg(target_os = "linux")]
fn thread_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Wall-clock time since the first call (no portable thread CPU clock).
#[cfg(not(target_os = "linux"))]
fn thread_time() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

#[cfg(target_os = "linux")]
mod mmsg {
    use std::io::IoSlice;
    use std::net::{SocketAddr, UdpSocket};

    use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

    /// Sends `count` copies of `payload` with one `sendmmsg`, the first to
    /// `destinations[first % len]` and on round-robin, building the headers as the reference
    /// server does (calls-core/src/bin/calls-server/udp_send.rs). Returns how many the kernel took (at least one,
    /// so the caller's loop always ends).
    pub fn send(
        socket: &UdpSocket,
        destinations: &[SocketAddr],
        first: usize,
        payload: &[u8],
        count: usize,
    ) -> usize {
        let addrs: Vec<SocketAddrAny> = (0..count)
            .map(|i| destinations[(first + i) % destinations.len()].into())
            .collect();
        let iovs: Vec<IoSlice<'_>> = (0..count).map(|_| IoSlice::new(payload)).collect();
        let mut controls: [SendAncillaryBuffer<'_, '_, '_>; 32] =
            std::array::from_fn(|_| SendAncillaryBuffer::default());
        let mut msgs: Vec<MMsgHdr<'_>> = addrs
            .iter()
            .zip(&iovs)
            .zip(controls.iter_mut())
            .map(|((addr, iov), control)| {
                MMsgHdr::new_with_addr(addr, std::slice::from_ref(iov), control)
            })
            .collect();
        sendmmsg(socket, &mut msgs, SendFlags::empty()).map_or(1, |n| n.max(1))
    }
}

criterion_group!(benches, udp_send);
criterion_main!(benches);
