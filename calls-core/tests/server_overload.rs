//! `calls-server` under the failures of issue 15, as an orchestrator sees them: its health and
//! readiness endpoints, the per-worker series of `/metrics`, and a worker thread that panics
//! (debug builds have `POST /api/debug/panic/{worker}` on the admin API for this test).
#![allow(clippy::unwrap_used)]
// test: fail loudly
// A real server process on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_calls-server");
const ADMIN_KEY: &str = "overload-test-admin-key";
/// The documented exit status of a server whose worker panicked (docs/server.md).
const EXIT_WORKER_PANICKED: i32 = 70;

/// One HTTP/1.0 request; the status code and body, `None` when nobody answers.
fn request(port: u16, method: &str, path: &str, key: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Starts the server with two workers and the admin API; waits until `/healthz` answers.
fn start(http: u16, admin: u16, media: u16) -> Child {
    let mut cmd = Command::new(SERVER);
    for (key, _) in std::env::vars() {
        if key.starts_with("CALLS_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .env("CALLS_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("CALLS_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("CALLS_ADMIN_API_KEY", ADMIN_KEY)
        .env("CALLS_UDP_PORT", media.to_string())
        .env("CALLS_TCP_PORT", media.to_string())
        .env("CALLS_WORKERS", "2")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(http, "GET", "/healthz", None).is_none() {
        assert!(Instant::now() < deadline, "the server never answered");
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn health_readiness_and_worker_series_while_all_is_well() {
    let (http, admin, media) = (18_660, 18_661, 18_662);
    let mut child = start(http, admin, media);
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
    let mut child = start(http, admin, media);
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
