//! A [`SimPeer`] on real sockets: UDP media and a JSON-lines signaling connection, the protocol
//! of the minimal embedders (`examples/minimal_embedder.rs`, `calls-ffi/examples/server.c`):
//! the client sends `{"join":{"call":"…","user":"…"}}`, the server answers
//! `{"joined":{"session":N}}`, then each line is one signaling message.
//!
//! For tests against real processes on loopback; it reads the wall clock (the caller's choice,
//! passed in as `now` to every step), and panics with a clear message when the server misbehaves.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::peer::{PeerOptions, PeerSignal, SimPeer};
use crate::ids::{SessionId, TrackSource, UserId};
use crate::signal::ServerMessage;

/// A str0m participant with a real UDP socket and a JSON-lines signaling connection.
#[derive(Debug)]
pub struct LineParticipant {
    /// The peer (its counters say what it received).
    pub peer: SimPeer,
    udp: UdpSocket,
    signaling: TcpStream,
    inbox: Vec<u8>,
}

impl LineParticipant {
    /// Connects to `signal`, joins `call` as `user`, and starts publishing.
    pub fn join(
        signal: SocketAddr,
        call: &str,
        user: &str,
        seed: u64,
        now: Instant,
    ) -> LineParticipant {
        let mut signaling = TcpStream::connect(signal).expect("connect to the signaling port");
        signaling
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("socket option");
        let join = serde_json::json!({"join": {"call": call, "user": user}});
        writeln!(signaling, "{join}").expect("send join");
        let mut inbox = Vec::new();
        let ack = loop {
            if let Some(line) = take_line(&mut inbox) {
                break line;
            }
            let mut chunk = [0u8; 4096];
            let n = signaling.read(&mut chunk).expect("read the join answer");
            assert!(n > 0, "server closed the signaling connection");
            inbox.extend_from_slice(&chunk[..n]);
        };
        let ack: serde_json::Value = serde_json::from_str(&ack).expect("JSON join answer");
        let session = ack["joined"]["session"]
            .as_u64()
            .unwrap_or_else(|| panic!("join refused: {ack}"));
        signaling.set_nonblocking(true).expect("socket option");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        udp.set_nonblocking(true).expect("socket option");
        let mut peer = SimPeer::new(
            SessionId(session),
            UserId::from(user),
            udp.local_addr().expect("local address"),
            &PeerOptions::default(),
            seed,
            now,
        );
        peer.start(now);
        LineParticipant {
            peer,
            udp,
            signaling,
            inbox,
        }
    }

    /// Moves everything one step: signaling both ways, datagrams both ways, timers.
    pub fn step(&mut self, now: Instant) {
        let mut chunk = [0u8; 65536];
        loop {
            match self.signaling.read(&mut chunk) {
                Ok(0) => panic!("server closed the signaling connection"),
                Ok(n) => self.inbox.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("signaling read: {e}"),
            }
        }
        while let Some(line) = take_line(&mut self.inbox) {
            let msg = ServerMessage::from_json(&line).expect("a ServerMessage line");
            self.peer.handle_signal(msg, now);
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
            self.signaling
                .set_nonblocking(false)
                .expect("socket option");
            writeln!(self.signaling, "{json}").expect("signaling write");
            self.signaling.set_nonblocking(true).expect("socket option");
        }
        for transmit in self.peer.take_transmits() {
            let _ = self.udp.send_to(&transmit.contents, transmit.destination);
        }
    }

    /// RTP packets received from `from`'s `source` track.
    pub fn received(&self, from: &LineParticipant, source: TrackSource) -> u64 {
        self.peer
            .received_from(from.peer.session(), source)
            .map_or(0, |t| t.packets)
    }
}

fn take_line(inbox: &mut Vec<u8>) -> Option<String> {
    let end = inbox.iter().position(|b| *b == b'\n')?;
    let line: Vec<u8> = inbox.drain(..=end).collect();
    Some(String::from_utf8_lossy(&line[..end]).into_owned())
}
