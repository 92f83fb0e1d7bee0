//! Unit tests of the simulated network (`calls_core::sim::SimNet`).

// The wall clock is read once per test for the virtual epoch.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use calls_core::sim::{Delivery, Impairment, SimNet};

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 5000))
}

fn drain(net: &mut SimNet, until: Instant) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Some(d) = net.pop_due(until) {
        out.push(d);
    }
    out
}

#[test]
fn perfect_wire_delivers_everything_in_order_after_the_delay() {
    let start = Instant::now();
    let mut net = SimNet::new(1, start);
    net.set_default(Impairment::delay(Duration::from_millis(30)));
    for i in 0..100u8 {
        net.send(
            addr(1),
            addr(2),
            vec![i],
            start + Duration::from_millis(i as u64),
        );
    }
    assert!(net.pop_due(start + Duration::from_millis(29)).is_none());
    let got = drain(&mut net, start + Duration::from_secs(1));
    assert_eq!(got.len(), 100);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, d)| d.contents == vec![i as u8]));
    assert_eq!(got[0].deliver_at, start + Duration::from_millis(30));
    assert_eq!(net.stats().delivered, 100);
}

#[test]
fn loss_is_roughly_the_configured_rate_and_reproducible() {
    let run = |seed| {
        let start = Instant::now();
        let mut net = SimNet::new(seed, start);
        net.set_default(Impairment::default().with_loss(0.1));
        for _ in 0..10_000 {
            net.send(addr(1), addr(2), vec![0; 10], start);
        }
        let delivered: Vec<_> = drain(&mut net, start)
            .into_iter()
            .map(|d| d.contents)
            .collect();
        (net.stats().dropped_loss, delivered.len())
    };
    let (lost, delivered) = run(42);
    assert!((800..1200).contains(&lost), "lost {lost}");
    assert_eq!(lost as usize + delivered, 10_000);
    assert_eq!(run(42), (lost, delivered));
}

#[test]
fn jitter_without_reorder_keeps_order() {
    let start = Instant::now();
    let mut net = SimNet::new(3, start);
    net.set_default(
        Impairment::delay(Duration::from_millis(20)).with_jitter(Duration::from_millis(40)),
    );
    for i in 0..200u16 {
        net.send(
            addr(1),
            addr(2),
            i.to_be_bytes().to_vec(),
            start + Duration::from_millis(i as u64),
        );
    }
    let got = drain(&mut net, start + Duration::from_secs(5));
    let seqs: Vec<u16> = got
        .iter()
        .map(|d| u16::from_be_bytes([d.contents[0], d.contents[1]]))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn jitter_with_reorder_reorders() {
    let start = Instant::now();
    let mut net = SimNet::new(3, start);
    net.set_default(
        Impairment::delay(Duration::from_millis(20))
            .with_jitter(Duration::from_millis(40))
            .with_reorder(true),
    );
    for i in 0..200u16 {
        net.send(
            addr(1),
            addr(2),
            i.to_be_bytes().to_vec(),
            start + Duration::from_millis(i as u64),
        );
    }
    let got = drain(&mut net, start + Duration::from_secs(5));
    assert_eq!(got.len(), 200);
    let seqs: Vec<u16> = got
        .iter()
        .map(|d| u16::from_be_bytes([d.contents[0], d.contents[1]]))
        .collect();
    assert!(seqs.windows(2).any(|w| w[0] > w[1]));
}

#[test]
fn bandwidth_cap_paces_and_drops_tail() {
    let start = Instant::now();
    let mut net = SimNet::new(5, start);
    // 1 Mbit/s, room for 10 datagrams of 1000 bytes.
    net.set_link(
        addr(1),
        addr(2),
        Impairment::default().with_bandwidth(1_000_000, 10_000),
    );
    for _ in 0..50 {
        net.send(addr(1), addr(2), vec![0; 1000], start);
    }
    // 1000 B at 1 Mbit/s is 8 ms each; the queue holds 10 of them.
    assert_eq!(net.stats().dropped_queue, 40);
    let got = drain(&mut net, start + Duration::from_secs(1));
    assert_eq!(got.len(), 10);
    assert_eq!(got[0].deliver_at, start + Duration::from_millis(8));
    assert_eq!(got[9].deliver_at, start + Duration::from_millis(80));
    // The other direction is unaffected.
    net.send(addr(2), addr(1), vec![0; 1000], start);
    assert_eq!(net.next_delivery_time(), Some(start));
}

#[test]
fn most_specific_rule_wins() {
    let start = Instant::now();
    let mut net = SimNet::new(0, start);
    let d = |ms| Impairment::delay(Duration::from_millis(ms));
    net.set_default(d(1));
    net.set_downlink(addr(2), d(2));
    net.set_uplink(addr(1), d(3));
    net.set_link(addr(1), addr(3), d(4));
    assert_eq!(net.impairment(addr(1), addr(3)), d(4));
    assert_eq!(net.impairment(addr(1), addr(2)), d(3));
    assert_eq!(net.impairment(addr(4), addr(2)), d(2));
    assert_eq!(net.impairment(addr(4), addr(5)), d(1));
}
