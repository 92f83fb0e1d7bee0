//! Helpers for the test files that spawn the reference server (`server_overload.rs`,
//! `server_recording.rs`, `server_spread.rs`, `server_nodes.rs`): the process on the ports a
//! test picks, plain HTTP/1.0 requests, a str0m participant that joins over the server's
//! WebSocket and sends media over UDP, what it received, and `/metrics` samples.
//!
//! These read the wall clock: a real process runs beside the test, and the deadlines only bound
//! the waits.
#![allow(clippy::disallowed_methods, dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calls_core::sim::{PeerOptions, PeerSignal, SimPeer};
use calls_core::{ServerMessage, SessionId, UserId};
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

pub const SERVER: &str = env!("CARGO_BIN_EXE_calls-server");
pub const ADMIN_KEY: &str = "server-test-admin-key-0123";

/// A running `calls-server`, killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub http: u16,
    pub admin: u16,
}

impl Server {
    /// Starts the server on `http` (signaling), `admin` (admin API with [`ADMIN_KEY`]) and
    /// `media` (UDP and TCP) with `workers` workers, plus the `CALLS_*` settings in `env`;
    /// returns once `/healthz` answers. Stderr is piped (read it after a kill).
    pub fn start(http: u16, admin: u16, media: u16, workers: &str, env: &[(&str, &str)]) -> Self {
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
            .env("CALLS_WORKERS", workers)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn calls-server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while request(http, "GET", "/healthz", None).is_none() {
            assert!(Instant::now() < deadline, "the server never answered");
            assert!(
                child.try_wait().expect("wait").is_none(),
                "the server exited"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, http, admin }
    }

    /// Kills the server and returns what it logged.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut logs = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut logs);
        }
        logs
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 request without a body; the status code and body, `None` when nobody answers.
pub fn request(port: u16, method: &str, path: &str, key: Option<&str>) -> Option<(u16, String)> {
    request_with_body(port, method, path, key, "")
}

/// One HTTP/1.0 request with `body`; the status code and body, `None` when nobody answers.
pub fn request_with_body(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// A str0m participant on the server's own protocol: the WebSocket `/ws?call=…&user=…`
/// (`&token=…`) for signaling, a UDP socket for media.
#[derive(Debug)]
pub struct WsParticipant {
    pub peer: SimPeer,
    ws: WebSocket<TcpStream>,
    udp: UdpSocket,
    /// Every text message the server sent, in order (JSON).
    pub heard: Vec<serde_json::Value>,
}

impl WsParticipant {
    /// Joins `call` as `user` (with `token` when the server wants one) and starts publishing
    /// audio and video. Panics when the server refuses.
    pub fn join(http: u16, call: &str, user: &str, token: Option<&str>, seed: u64) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", http)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("socket option");
        let mut url = format!("ws://127.0.0.1:{http}/ws?call={call}&user={user}");
        if let Some(token) = token {
            url.push_str("&token=");
            url.push_str(token);
        }
        let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("WebSocket handshake");
        let mut heard = Vec::new();
        let session = loop {
            match ws.read().expect("the welcome") {
                Message::Text(text) => {
                    let value: serde_json::Value =
                        serde_json::from_str(text.as_str()).expect("JSON");
                    let welcome = (value["type"] == "welcome").then(|| value["session"].as_u64());
                    heard.push(value.clone());
                    if let Some(session) = welcome {
                        break session.expect("a session in the welcome");
                    }
                }
                Message::Close(frame) => panic!("join refused: {frame:?}"),
                _ => {}
            }
        };
        ws.get_mut().set_nonblocking(true).expect("socket option");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        udp.set_nonblocking(true).expect("socket option");
        let now = Instant::now();
        let mut peer = SimPeer::new(
            SessionId(session),
            UserId::from(user),
            udp.local_addr().expect("local address"),
            &PeerOptions::default(),
            seed,
            now,
        );
        peer.start(now);
        WsParticipant {
            peer,
            ws,
            udp,
            heard,
        }
    }

    /// The session the server gave it.
    pub fn session(&self) -> SessionId {
        self.peer.session()
    }

    /// Sends one text message of the server's protocol (`{"type":"record","on":true}`).
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_owned()))
            .or_else(|e| match e {
                tungstenite::Error::Io(io) if io.kind() == ErrorKind::WouldBlock => Ok(()),
                e => Err(e),
            })
            .expect("WebSocket send");
    }

    /// Moves everything one step: signaling both ways, datagrams both ways, timers.
    pub fn step(&mut self) {
        let now = Instant::now();
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) {
                        self.heard.push(value);
                    }
                    // Server-only messages (`welcome`, `draining`) are not the router's.
                    if let Ok(msg) = ServerMessage::from_json(text.as_str()) {
                        self.peer.handle_signal(msg, now);
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("WebSocket read: {e}"),
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
            self.send_text(&json);
        }
        match self.ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("WebSocket flush: {e}"),
        }
        for transmit in self.peer.take_transmits() {
            let to: SocketAddr = transmit.destination;
            // Best effort, as UDP is: a full socket buffer drops.
            let _ = self.udp.send_to(&transmit.contents, to);
        }
    }

    /// Whether the server sent a message of this `type`.
    pub fn heard_type(&self, kind: &str) -> Vec<&serde_json::Value> {
        self.heard.iter().filter(|m| m["type"] == kind).collect()
    }
}

/// Packets `rx` received of `from`'s `source`.
pub fn received(rx: &WsParticipant, from: &WsParticipant, source: calls_core::TrackSource) -> u64 {
    rx.peer
        .received_from(from.session(), source)
        .map_or(0, |t| t.packets)
}

/// The sum of a metric's samples in a Prometheus text, by label text (`""`: all samples).
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Steps every participant (and sleeps 5 ms between rounds) for `duration`.
pub fn run_for(participants: &mut [&mut WsParticipant], duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        for p in participants.iter_mut() {
            p.step();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Steps every participant until `done` holds (at most `timeout`); whether it did.
pub fn run_until(
    participants: &mut [&mut WsParticipant],
    timeout: Duration,
    mut done: impl FnMut(&[&mut WsParticipant]) -> bool,
) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        for p in participants.iter_mut() {
            p.step();
        }
        if done(participants) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
