//! The minimal tokio embedder (examples/minimal_embedder.rs) carries a real call: two str0m
//! participants join it over loopback (real UDP, JSON-lines signaling) and hear and see each
//! other.
#![allow(clippy::unwrap_used)] // test: fail loudly
#![allow(clippy::disallowed_methods)] // real sockets, real time

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calls_core::sim::LineParticipant;
use calls_core::TrackSource;

struct Embedder(Child);

impl Drop for Embedder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> (Embedder, SocketAddr) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "calls-core",
            "--example",
            "minimal_embedder",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let binary =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../debug/examples/minimal_embedder");
    let mut child = Command::new(binary)
        .args(["--media", "127.0.0.1:0", "--signal", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let signal = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("signal="))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (Embedder(child), signal)
}

#[test]
fn two_participants_talk_through_the_minimal_tokio_embedder() {
    let (_embedder, signal) = start();
    let mut alice = LineParticipant::join(signal, "standup", "alice", 1, Instant::now());
    let mut bob = LineParticipant::join(signal, "standup", "bob", 2, Instant::now());
    let started = Instant::now();
    let both_ways = |a: &LineParticipant, b: &LineParticipant| {
        [TrackSource::Microphone, TrackSource::Camera]
            .iter()
            .all(|s| a.received(b, *s) >= 50 && b.received(a, *s) >= 50)
    };
    while !both_ways(&alice, &bob) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no two-way media: alice got {}/{} from bob, bob got {}/{} from alice",
            alice.received(&bob, TrackSource::Microphone),
            alice.received(&bob, TrackSource::Camera),
            bob.received(&alice, TrackSource::Microphone),
            bob.received(&alice, TrackSource::Camera),
        );
        alice.step(Instant::now());
        bob.step(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
}
