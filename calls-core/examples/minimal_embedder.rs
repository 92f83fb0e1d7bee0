//! The smallest complete embedder of calls-core with tokio: one UDP socket for every call's media,
//! signaling as JSON lines over TCP, one `Router`, the drive loop. Read it with docs/embedding-rust.md.
//!
//! ```sh
//! cargo run -p calls-core --example minimal_embedder -- --media 127.0.0.1:8443 --signal 127.0.0.1:8444
//! ```
//! Signaling protocol (one JSON object per line): the client sends
//! `{"join":{"call":"standup","user":"alice"}}`, gets `{"joined":{"session":1}}`, then sends and
//! receives the messages of docs/signaling.md. Closing the connection leaves the call.

// An embedder owns the clock; only calls-core itself is sans-IO.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::time::Instant;

use calls_core::{CallId, Config, Datagram, Grants, Output, Proto, Router, SessionId, UserId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// What the signaling connections tell the router loop.
enum Inbound {
    Join {
        call: String,
        user: String,
        out: mpsc::UnboundedSender<String>,
        session: tokio::sync::oneshot::Sender<SessionId>,
    },
    Line {
        session: SessionId,
        text: String,
    },
    Gone {
        session: SessionId,
    },
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let udp = UdpSocket::bind(arg("--media", "127.0.0.1:8443")).await?;
    let media = udp.local_addr()?;
    let listener = TcpListener::bind(arg("--signal", "127.0.0.1:8444")).await?;
    let mut config = Config::default();
    config.bind_address = media.ip();
    config.udp_port = media.port();
    config.enable_tcp = false; // this embedder accepts no ICE-TCP
    let mut router = Router::new(config, Instant::now())?;
    println!("listening media={media} signal={}", listener.local_addr()?);

    let (inbound_tx, mut inbound) = mpsc::unbounded_channel::<Inbound>();
    tokio::spawn(accept_signaling(listener, inbound_tx));
    let mut clients: HashMap<SessionId, mpsc::UnboundedSender<String>> = HashMap::new();
    let mut next_session = 1;
    let mut term = signal(SignalKind::terminate())?;
    let mut buf = vec![0u8; 2048];
    loop {
        // 1. Drain every output after every input.
        let deadline = loop {
            match router.poll_output() {
                Output::Transmit(t) => {
                    let _ = udp.send_to(&t.contents, t.destination).await;
                }
                Output::Signal(session, msg) => {
                    if let Some(out) = clients.get(&session) {
                        let _ = out.send(msg.to_json());
                    }
                }
                Output::Event(event) => eprintln!("{event:?}"),
                Output::Timeout(at) => break at,
                _ => {}
            }
        };
        // 2. Wait for exactly one input.
        tokio::select! {
            received = udp.recv_from(&mut buf) => {
                let (n, source) = received?;
                let datagram = Datagram { proto: Proto::Udp, source, destination: media, contents: &buf[..n] };
                router.handle_datagram(datagram, Instant::now());
            }
            Some(msg) = inbound.recv() => match msg {
                Inbound::Join { call, user, out, session: assigned } => {
                    let session = SessionId(next_session);
                    next_session += 1;
                    let joined = router.join(CallId::from(call), session, UserId::from(user), Grants::ALL, Instant::now());
                    let reply = match joined {
                        Ok(()) => serde_json::json!({"joined": {"session": session.0}}),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    };
                    let _ = out.send(reply.to_string());
                    let _ = assigned.send(session);
                    clients.insert(session, out);
                }
                Inbound::Line { session, text } => {
                    // A refused message comes back to the client as an `error` signal.
                    let _ = router.handle_signal_json(session, &text, Instant::now());
                }
                Inbound::Gone { session } => {
                    clients.remove(&session);
                    let _ = router.leave(session, Instant::now());
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => router.handle_timeout(Instant::now()),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("stopping");
    Ok(())
}

/// Each TCP connection: a join line, then signaling lines both ways.
async fn accept_signaling(listener: TcpListener, inbound: mpsc::UnboundedSender<Inbound>) {
    while let Ok((stream, _)) = listener.accept().await {
        let inbound = inbound.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let Ok(Some(first)) = lines.next_line().await else {
                return;
            };
            let join: serde_json::Value = serde_json::from_str(&first).unwrap_or_default();
            let (Some(call), Some(user)) =
                (join["join"]["call"].as_str(), join["join"]["user"].as_str())
            else {
                let _ = write
                    .write_all(b"{\"error\":\"first line must be a join\"}\n")
                    .await;
                return;
            };
            let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
            let (assigned_tx, assigned) = tokio::sync::oneshot::channel();
            let join = Inbound::Join {
                call: call.to_owned(),
                user: user.to_owned(),
                out: out_tx,
                session: assigned_tx,
            };
            let _ = inbound.send(join);
            let Ok(session) = assigned.await else { return };
            let writer = tokio::spawn(async move {
                while let Some(line) = out_rx.recv().await {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            while let Ok(Some(text)) = lines.next_line().await {
                let _ = inbound.send(Inbound::Line { session, text });
            }
            let _ = inbound.send(Inbound::Gone { session });
            writer.abort();
        });
    }
}
