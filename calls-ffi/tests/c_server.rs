//! The C example server (`examples/server.c`) carries a real call: it is compiled against
//! libcalls, started on free loopback ports, and two str0m participants join it through its
//! JSON-lines signaling channel and exchange media over real UDP sockets. Both must receive
//! the other's audio and video. Fails after 20 s.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use calls_core::sim::LineParticipant as Participant;
use calls_core::TrackSource;

const DEADLINE: Duration = Duration::from_secs(20);
/// Packets each participant must receive from the other, per track (≈ 1 s of audio).
const ENOUGH_PACKETS: u64 = 50;

/// Builds libcalls.a (`cargo test` builds only the rlib for tests) and compiles
/// `examples/server.c` against it.
fn build_server() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // target/<profile>/deps/c_server-<hash> → target/<profile>/libcalls.a
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "-p",
            "calls-ffi",
            "--lib",
            "--target-dir",
        ])
        .arg(target_dir);
    if profile_dir.ends_with("release") {
        cargo.arg("--release");
    }
    let status = cargo.status().unwrap();
    assert!(status.success(), "cargo build -p calls-ffi failed");
    let lib = profile_dir.join("libcalls.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("calls-server");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let output = Command::new(cc)
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .args(["-O1", "-g", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("examples/server.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "compiling server.c failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// The server process; stopped with SIGTERM (and killed if that fails) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts the server on free ports and returns it with its signaling address.
    fn start(binary: &Path) -> (Server, SocketAddr) {
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("calls-server.log");
        let mut child = Command::new(binary)
            .args(["--media", "127.0.0.1:0", "--signal", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let server = Server { child, log };
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("server did not start:\n{}", server.log_text()));
        // "listening media=127.0.0.1:P signal=127.0.0.1:S"
        let signal = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("signal="))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        (server, signal)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the server must exit cleanly (status 0) within 5 s.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "server exited with {status}:\n{}",
                    self.log_text()
                );
                return self.log_text();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server ignored SIGTERM:\n{}", self.log_text());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_str0m_participants_hear_and_see_each_other_through_the_c_server() {
    let binary = build_server();
    let (server, signal) = Server::start(&binary);
    let mut alice = Participant::join(signal, "standup", "alice", 1, Instant::now());
    let mut bob = Participant::join(signal, "standup", "bob", 2, Instant::now());

    let started = Instant::now();
    let done = |a: &Participant, b: &Participant| {
        [TrackSource::Microphone, TrackSource::Camera]
            .iter()
            .all(|s| a.received(b, *s) >= ENOUGH_PACKETS && b.received(a, *s) >= ENOUGH_PACKETS)
    };
    while !done(&alice, &bob) {
        if started.elapsed() > DEADLINE {
            panic!(
                "no two-way media after {DEADLINE:?}: alice got {}/{} audio/video packets from \
                 bob, bob got {}/{} from alice; connected {}/{}; rtc errors {:?} {:?}\n\
                 server log:\n{}",
                alice.received(&bob, TrackSource::Microphone),
                alice.received(&bob, TrackSource::Camera),
                bob.received(&alice, TrackSource::Microphone),
                bob.received(&alice, TrackSource::Camera),
                alice.peer.is_connected(),
                bob.peer.is_connected(),
                alice.peer.rtc_errors(),
                bob.peer.rtc_errors(),
                server.log_text()
            );
        }
        alice.step(Instant::now());
        bob.step(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }

    // Bob hangs up: the server makes him leave, and says so in its log; then a clean stop.
    drop(bob);
    let waited = Instant::now();
    while !server.log_text().contains("\"type\":\"left\"") && waited.elapsed() < DEADLINE {
        alice.step(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = server.stop();
    assert!(log.contains("\"type\":\"left\""), "bob never left:\n{log}");
    assert!(log.contains("\"type\":\"connected\""), "{log}");
}
