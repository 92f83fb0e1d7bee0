//! The I/O limit: one UDP `send_to` per packet on loopback (100 B and 1200 B), the cost an
//! embedder pays per forwarded packet without batching.
//!
//! `cargo bench -p calls-benches --bench udp` (see docs/performance.md).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::UdpSocket;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn udp_send(c: &mut Criterion) {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.connect(receiver.local_addr().unwrap()).unwrap();
    receiver.set_nonblocking(true).unwrap();
    let mut sink = vec![0u8; 2048];
    let mut group = c.benchmark_group("limit-udp-send-loopback");
    for size in [100usize, 1200] {
        group.throughput(Throughput::Elements(1));
        let payload = vec![0x5Au8; size];
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(64);
                    let t = std::time::Instant::now();
                    for _ in 0..n {
                        let _ = sender.send(&payload);
                    }
                    total += t.elapsed();
                    // Untimed: empty the receiver so sends never fail with ENOBUFS.
                    while receiver.recv(&mut sink).is_ok() {}
                    left -= n;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, udp_send);
criterion_main!(benches);
