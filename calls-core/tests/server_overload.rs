//! `calls-server` under the failures of issue 15, as an orchestrator sees them: its health and
//! readiness endpoints, the per-worker series of `/metrics`, and a worker thread that panics
//! (debug builds have `POST /api/debug/panic/{worker}` on the admin API for this test).
#![allow(clippy::unwrap_used)]
// test: fail loudly
// A real server process on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[path = "common/server.rs"]
mod server;

use server::{request, Server, ADMIN_KEY};

/// The documented exit status of a server whose worker panicked (docs/server.md).
const EXIT_WORKER_PANICKED: i32 = 70;

/// Starts the server with `workers` workers and the admin API (plus `env`).
fn start_with(http: u16, admin: u16, media: u16, workers: &str, env: &[(&str, &str)]) -> Server {
    Server::start(http, admin, media, workers, env)
}

fn start(http: u16, admin: u16, media: u16) -> Server {
    start_with(http, admin, media, "2", &[])
}

/// Polls `path` until it answers `status` (at most 20 s).
fn wait_for_status(port: u16, path: &str, status: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if request(port, "GET", path, None).is_some_and(|r| r.0 == status) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A WebSocket frame from the server: opcode and payload (RFC 6455 §5.2; server frames are
/// not masked).
fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    stream.read_exact(&mut payload).ok()?;
    Some((head[0] & 0x0F, payload))
}

/// Opens `/ws?call=…&user=…` and returns the server's first text message and, if the server
/// closes at once, its close code.
fn join(port: u16, call: &str, user: &str) -> (serde_json::Value, Option<u16>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /ws?call={call}&user={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (opcode, text) = read_frame(&mut stream).unwrap();
    assert_eq!(opcode, 1, "a text frame first");
    let message: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let close = match read_frame(&mut stream) {
        Some((8, payload)) if payload.len() >= 2 => {
            Some(u16::from_be_bytes([payload[0], payload[1]]))
        }
        _ => None,
    };
    (message, close)
}

/// A worker whose loop lags (forced with the debug-only lag endpoint) refuses joins with the
/// typed error and close 1013, `/readyz` flips while it is the only worker, `/healthz` stays
/// 200 (it runs), and both come back once the lag is gone.
#[test]
fn an_overloaded_worker_refuses_joins_with_1013_and_readyz_flips() {
    let (http, admin, media) = (18_666, 18_667, 18_668);
    let mut server = start_with(
        http,
        admin,
        media,
        "1",
        &[("CALLS_OVERLOAD_RECOVER_MS", "1000")],
    );
    let child = &mut server.child;
    assert!(wait_for_status(http, "/readyz", 200));
    let (welcome, _) = join(http, "room", "ada");
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    let lag = request(admin, "POST", "/api/debug/lag/0/300", Some(ADMIN_KEY));
    assert_eq!(lag.map(|r| r.0), Some(202));
    assert!(
        wait_for_status(http, "/readyz", 503),
        "readyz never flipped"
    );
    let (_, ready) = request(http, "GET", "/readyz", None).unwrap();
    let health = request(http, "GET", "/healthz", None).unwrap();
    let (_, metrics) = request(http, "GET", "/metrics", None).unwrap();
    let (refusal, close) = join(http, "room", "bob");

    request(admin, "POST", "/api/debug/lag/0/0", Some(ADMIN_KEY)).unwrap();
    let recovered = wait_for_status(http, "/readyz", 200);
    let (again, _) = join(http, "room", "cy");
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(ready, "every worker is overloaded or full\n");
    assert_eq!(health, (200, "ok\n".to_owned()));
    assert!(
        metrics.contains("calls_worker_load_level{worker=\"0\"} 2\n")
            && metrics.contains("calls_ready 0\n"),
        "{metrics}"
    );
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "overloaded", "{refusal}");
    assert_eq!(refusal["retry_after_s"], 1, "{refusal}");
    assert_eq!(close, Some(1013));
    assert!(recovered, "readyz stayed 503 after the lag ended");
    assert_eq!(again["type"], "welcome", "{again}");
}

#[test]
fn health_readiness_and_worker_series_while_all_is_well() {
    let (http, admin, media) = (18_660, 18_661, 18_662);
    let mut server = start(http, admin, media);
    let child = &mut server.child;
    let health = request(http, "GET", "/healthz", None);
    let ready = request(http, "GET", "/readyz", None);
    let metrics = request(http, "GET", "/metrics", None);
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(health, Some((200, "ok\n".to_owned())));
    assert_eq!(ready, Some((200, "ready\n".to_owned())));
    let (status, metrics) = metrics.unwrap();
    assert_eq!(status, 200);
    for w in ["0", "1"] {
        for line in [
            format!("calls_worker_up{{worker=\"{w}\"}} 1\n"),
            format!("calls_worker_load_level{{worker=\"{w}\"}} 0\n"),
            format!("calls_worker_queue_dropped_total{{worker=\"{w}\",lane=\"media\"}} 0\n"),
        ] {
            assert!(metrics.contains(&line), "{line:?} missing:\n{metrics}");
        }
        assert!(
            metrics.contains(&format!("calls_worker_busy_ratio{{worker=\"{w}\"}} ")),
            "{metrics}"
        );
    }
    assert!(metrics.contains("calls_ready 1\n"), "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
}

/// The documented choice: a worker that panics takes the process down with status 70, so the
/// supervisor restarts it; nothing keeps answering `/healthz` with 200 for a dead worker.
#[test]
fn a_worker_that_panics_ends_the_process_with_status_70() {
    let (http, admin, media) = (18_663, 18_664, 18_665);
    let mut server = start(http, admin, media);
    let child = &mut server.child;
    assert_eq!(request(http, "GET", "/healthz", None).unwrap().0, 200);

    // The trigger is guarded like the rest of the admin API.
    let refused = request(
        admin,
        "POST",
        "/api/debug/panic/1",
        Some("wrong-key-wrong-key"),
    );
    assert_eq!(refused.map(|r| r.0), Some(401));
    let accepted = request(admin, "POST", "/api/debug/panic/1", Some(ADMIN_KEY));
    assert_eq!(accepted.map(|r| r.0), Some(202));

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_WORKER_PANICKED), "{logs}");
    assert!(
        logs.contains("worker 1 panicked on request") && logs.contains("router worker panicked"),
        "{logs}"
    );
    assert!(
        request(http, "GET", "/healthz", None).is_none(),
        "something still answers"
    );
}
