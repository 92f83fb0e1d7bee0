//! `calls-server` spreads one call over its workers (issue 14, part 2): with
//! `CALLS_CALL_SPREAD_AFTER=1` and two workers, the participants of one call land on both, and
//! the workers relay the publishers' tracks to each other in-process. Real str0m participants
//! on loopback (UDP media to the one media port, WebSocket signaling) must receive each other's
//! microphone and camera whichever worker they are on, and `/metrics` shows each worker's share.
#![allow(clippy::unwrap_used)]
// A real server process on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calls_core::sim::{PeerOptions, PeerSignal, SimPeer};
use calls_core::{ServerMessage, SessionId, TrackSource, UserId};

const SERVER: &str = env!("CARGO_BIN_EXE_calls-server");
const ADMIN_KEY: &str = "spread-test-admin-key";

/// One HTTP/1.0 request; the status code and body, `None` when nobody answers.
fn request(port: u16, path: &str, key: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// A server with two workers that spreads every call from its first participant on.
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
        .env("CALLS_MEDIA_BIND", "127.0.0.1")
        .env("CALLS_UDP_PORT", media.to_string())
        .env("CALLS_TCP_PORT", media.to_string())
        .env("CALLS_WORKERS", "2")
        .env("CALLS_CALL_SPREAD_AFTER", "1")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(http, "/healthz", None).is_none() {
        assert!(Instant::now() < deadline, "the server never answered");
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A str0m participant with a real UDP socket and the server's WebSocket signaling.
struct WsParticipant {
    peer: SimPeer,
    udp: UdpSocket,
    ws: TcpStream,
    inbox: Vec<u8>,
}

impl WsParticipant {
    fn join(http: u16, call: &str, user: &str, seed: u64, now: Instant) -> WsParticipant {
        let mut ws = TcpStream::connect(("127.0.0.1", http)).unwrap();
        ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            ws,
            "GET /ws?call={call}&user={user} HTTP/1.1\r\nHost: 127.0.0.1:{http}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            ws.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut inbox = Vec::new();
        let welcome = loop {
            if let Some((_, text)) = take_frame(&mut inbox) {
                break text;
            }
            let mut chunk = [0u8; 4096];
            let n = ws.read(&mut chunk).unwrap();
            assert!(n > 0, "server closed the WebSocket");
            inbox.extend_from_slice(&chunk[..n]);
        };
        let welcome: serde_json::Value = serde_json::from_slice(&welcome).unwrap();
        let session = welcome["session"]
            .as_u64()
            .unwrap_or_else(|| panic!("no welcome: {welcome}"));
        ws.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let mut peer = SimPeer::new(
            SessionId(session),
            UserId::from(user),
            udp.local_addr().unwrap(),
            &PeerOptions::default(),
            seed,
            now,
        );
        peer.start(now);
        WsParticipant {
            peer,
            udp,
            ws,
            inbox,
        }
    }

    fn step(&mut self, now: Instant) {
        let mut chunk = [0u8; 65536];
        loop {
            match self.ws.read(&mut chunk) {
                Ok(0) => panic!("server closed the WebSocket"),
                Ok(n) => self.inbox.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("WebSocket read: {e}"),
            }
        }
        while let Some((opcode, payload)) = take_frame(&mut self.inbox) {
            if opcode != 1 {
                continue;
            }
            // Server-only messages (welcome, draining) are not ServerMessages.
            if let Ok(msg) = ServerMessage::from_json(&String::from_utf8_lossy(&payload)) {
                self.peer.handle_signal(msg, now);
            }
        }
        let mut datagram = [0u8; 2048];
        loop {
            match self.udp.recv_from(&mut datagram) {
                Ok((n, source)) => self.peer.handle_datagram(source, &datagram[..n], now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("udp recv: {e}"),
            }
        }
        if self.peer.poll_timeout().is_some_and(|at| at <= now) {
            self.peer.handle_timeout(now);
        }
        for signal in self.peer.take_signals() {
            let json = match signal {
                PeerSignal::Message(msg) => msg.to_json(),
                PeerSignal::Json(text) => text,
            };
            self.ws.set_nonblocking(false).unwrap();
            self.ws
                .write_all(&client_text_frame(json.as_bytes()))
                .unwrap();
            self.ws.set_nonblocking(true).unwrap();
        }
        for transmit in self.peer.take_transmits() {
            let _ = self.udp.send_to(&transmit.contents, transmit.destination);
        }
    }

    fn received(&self, from: &WsParticipant, source: TrackSource) -> u64 {
        self.peer
            .received_from(from.peer.session(), source)
            .map_or(0, |t| t.packets)
    }
}

/// A client text frame (RFC 6455 §5.2: FIN, opcode 1, masked with a zero key).
fn client_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// One complete server frame (unmasked) off the front of `inbox`: (opcode, payload).
fn take_frame(inbox: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if inbox.len() < 2 {
        return None;
    }
    let (len, at) = match inbox[1] & 0x7F {
        126 if inbox.len() >= 4 => (usize::from(u16::from_be_bytes([inbox[2], inbox[3]])), 4),
        127 if inbox.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&inbox[2..10]);
            (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
        }
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    if inbox.len() < at + len {
        return None;
    }
    let opcode = inbox[0] & 0x0F;
    let payload = inbox[at..at + len].to_vec();
    inbox.drain(..at + len);
    Some((opcode, payload))
}

/// The sum of a metric's samples in a Prometheus text, by label text (`""`: all samples).
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn one_call_spans_two_workers_and_everyone_gets_everyone() {
    let (http, admin, media) = (18_461, 18_462, 18_463);
    let mut server = start(http, admin, media);
    let t0 = Instant::now();
    let mut people: Vec<WsParticipant> = ["alice", "bob", "carol"]
        .iter()
        .enumerate()
        .map(|(i, user)| WsParticipant::join(http, "big", user, 40 + i as u64, t0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let everyone_gets_everyone = |people: &[WsParticipant]| {
        people.iter().all(|rx| {
            people
                .iter()
                .filter(|tx| tx.peer.session() != rx.peer.session())
                .all(|tx| {
                    rx.received(tx, TrackSource::Microphone) > 100
                        && rx.received(tx, TrackSource::Camera) > 100
                })
        })
    };
    while Instant::now() < deadline && !everyone_gets_everyone(&people) {
        let now = Instant::now();
        for p in &mut people {
            p.step(now);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let report: Vec<String> = people
        .iter()
        .flat_map(|rx| {
            people.iter().map(move |tx| {
                format!(
                    "{} ← {}: mic {} cam {}",
                    rx.peer.session(),
                    tx.peer.session(),
                    rx.received(tx, TrackSource::Microphone),
                    rx.received(tx, TrackSource::Camera)
                )
            })
        })
        .collect();
    let (_, calls) = request(admin, "/api/calls", Some(ADMIN_KEY)).unwrap();
    let (_, metrics) = request(http, "/metrics", None).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        everyone_gets_everyone(&people),
        "not everyone got everyone:\n{}\n{calls}",
        report.join("\n")
    );
    // The call is on both workers.
    let calls: serde_json::Value = serde_json::from_str(&calls).unwrap();
    let mut workers: Vec<u64> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["call"] == "big")
        .filter_map(|c| c["worker"].as_u64())
        .collect();
    workers.sort_unstable();
    assert_eq!(workers, vec![0, 1], "{calls}");
    // Each worker relays its share, and nothing was dropped on the way.
    for w in ["0", "1"] {
        let label = format!("worker=\"{w}\"");
        let out = metric(&metrics, "calls_worker_relay_frames_out_total", &label);
        let inn = metric(&metrics, "calls_worker_relay_frames_in_total", &label);
        assert!(
            out > 100.0 && inn > 100.0,
            "worker {w}: out {out} in {inn}\n{metrics}"
        );
        assert_eq!(metric(&metrics, "calls_worker_relay_links", &label), 1.0);
    }
    assert_eq!(
        metric(&metrics, "calls_relay_dropped_malformed_total", ""),
        0.0
    );
    assert_eq!(
        metric(&metrics, "calls_relay_dropped_unknown_total", ""),
        0.0
    );
    println!("# {}", report.join("; "));
}
