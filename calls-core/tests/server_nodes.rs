//! One call over two `calls-server` processes (issue 14, parts 3 and 4): two nodes on
//! loopback, each with its own HTTP, media and relay ports, bridge a call that has
//! participants on both over their authenticated QUIC relay. Real str0m participants receive
//! each other's microphone and camera whichever node they joined; a node with the wrong secret
//! gets no bridge (and is counted); when a node dies, the other's participants go on and the
//! dead node's participants leave their roster.
#![allow(clippy::unwrap_used)]
// Real server processes on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

#[path = "common/server.rs"]
mod server;

use std::net::UdpSocket;
use std::time::Duration;

use calls_core::TrackSource;
use server::{metric, received, request, run_for, run_until, Server, WsParticipant, ADMIN_KEY};

const SECRET: &str = "node-relay-test-secret-0123456789";

/// The relay port of the node whose ports start at `base` (HTTP, admin, media, relay).
fn relay_port(base: u16) -> u16 {
    base + 3
}

/// A `relay_peers` entry for the node at `base`: `id=host:port`, or `host:port` without an id.
fn peer(id: Option<u8>, base: u16) -> String {
    let addr = format!("127.0.0.1:{}", relay_port(base));
    match id {
        Some(id) => format!("{id}={addr}"),
        None => addr,
    }
}

/// A node: ports from `base` (HTTP, admin, media, relay), node id `id`, one peer; a peer
/// unreachable for `gone_s` seconds is gone for good.
fn node_with(base: u16, id: u8, peer: &str, secret: &str, workers: &str, gone_s: &str) -> Server {
    let relay = format!("127.0.0.1:{}", relay_port(base));
    Server::start(
        base,
        base + 1,
        base + 2,
        workers,
        &[
            ("CALLS_MEDIA_BIND", "127.0.0.1"),
            ("CALLS_CALL_SPREAD_AFTER", "1"),
            ("CALLS_NODE_ID", &id.to_string()),
            ("CALLS_RELAY_LISTEN", &relay),
            ("CALLS_RELAY_PEERS", peer),
            ("CALLS_RELAY_SECRET", secret),
            ("CALLS_RELAY_PEER_GONE_S", gone_s),
        ],
    )
}

fn node(base: u16, id: u8, peer: &str, secret: &str, workers: &str) -> Server {
    node_with(base, id, peer, secret, workers, "3")
}

fn report(people: &[&WsParticipant]) -> String {
    let mut lines = Vec::new();
    for rx in people {
        for tx in people {
            if rx.session() != tx.session() {
                lines.push(format!(
                    "{} ← {}: mic {} cam {}",
                    rx.session(),
                    tx.session(),
                    received(rx, tx, TrackSource::Microphone),
                    received(rx, tx, TrackSource::Camera)
                ));
            }
        }
    }
    lines.join("\n")
}

#[test]
fn a_call_spans_two_nodes_and_survives_losing_one() {
    // Node 1 has two workers and spreads every call, so its two participants are on different
    // workers: two channels to node 2, one per pair of workers.
    let (a_base, b_base) = (18_520, 18_530);
    let a = node(a_base, 1, &peer(Some(2), b_base), SECRET, "2");
    let b = node(b_base, 2, &peer(Some(1), a_base), SECRET, "1");
    let mut alice = WsParticipant::join(a_base, "bridge", "alice", None, 61);
    let mut carol = WsParticipant::join(a_base, "bridge", "carol", None, 62);
    let mut bob = WsParticipant::join(b_base, "bridge", "bob", None, 63);
    assert_ne!(alice.session(), bob.session());
    assert!(bob.session().0 >> 40 == 2 && alice.session().0 >> 40 == 1);

    let everyone_gets_everyone = |people: &[&mut WsParticipant]| {
        people.iter().all(|rx| {
            people
                .iter()
                .filter(|tx| tx.session() != rx.session())
                .all(|tx| {
                    received(rx, tx, TrackSource::Microphone) > 100
                        && received(rx, tx, TrackSource::Camera) > 100
                })
        })
    };
    let done = run_until(
        &mut [&mut alice, &mut carol, &mut bob],
        Duration::from_secs(30),
        everyone_gets_everyone,
    );
    let (_, a_metrics) = request(a_base, "GET", "/metrics", None).unwrap();
    let (_, b_metrics) = request(b_base, "GET", "/metrics", None).unwrap();
    assert!(
        done,
        "not everyone got everyone:\n{}\nnode 1:\n{a_metrics}",
        report(&[&alice, &carol, &bob])
    );
    assert_eq!(
        metric(&a_metrics, "calls_node_peer_connected", "peer=\"2\""),
        1.0
    );
    assert_eq!(
        metric(&a_metrics, "calls_node_relay_channels", "peer=\"2\""),
        2.0,
        "one channel per pair of workers\n{a_metrics}"
    );
    for (name, text) in [("node 1", &a_metrics), ("node 2", &b_metrics)] {
        let out = metric(text, "calls_node_relay_frames_out_total", "");
        let inn = metric(text, "calls_node_relay_frames_in_total", "");
        assert!(
            out > 200.0 && inn > 200.0,
            "{name}: out {out} in {inn}\n{text}"
        );
        assert_eq!(metric(text, "calls_node_auth_failures_total", ""), 0.0);
        assert_eq!(
            metric(text, "calls_relay_dropped_malformed_total", ""),
            0.0,
            "{name}"
        );
    }
    println!(
        "# bridged:\n{}\n# node 1 relay frames out {} (datagrams {}), in {}",
        report(&[&alice, &carol, &bob]),
        metric(&a_metrics, "calls_node_relay_frames_out_total", ""),
        metric(&a_metrics, "calls_node_relay_frames_out_total", "datagram"),
        metric(&a_metrics, "calls_node_relay_frames_in_total", "")
    );
    // Bob's roster on node 2 lists alice and carol (remote members are members).
    assert!(bob
        .heard_type("participant_joined")
        .iter()
        .any(|m| m["user"] == "alice"));

    // Garbage on the relay port changes nothing (quinn drops what is not QUIC).
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u8 {
        let _ = junk.send_to(&[i; 64], ("127.0.0.1", relay_port(a_base)));
    }

    // Node 2 dies. Alice and carol go on with each other; after relay_peer_gone_s bob leaves
    // their roster.
    let bob_session = bob.session();
    drop(bob);
    b.stop();
    let (before_ac, before_ca) = (
        received(&alice, &carol, TrackSource::Camera),
        received(&carol, &alice, TrackSource::Camera),
    );
    let bob_left = |people: &[&mut WsParticipant]| {
        people.iter().all(|p| {
            p.heard_type("participant_left")
                .iter()
                .any(|m| m["session"].as_u64() == Some(bob_session.0))
        })
    };
    let left = run_until(
        &mut [&mut alice, &mut carol],
        Duration::from_secs(15),
        bob_left,
    );
    run_for(&mut [&mut alice, &mut carol], Duration::from_secs(2));
    let (_, a_metrics) = request(a_base, "GET", "/metrics", None).unwrap();
    assert!(left, "bob never left node 1's roster\n{a_metrics}");
    let (after_ac, after_ca) = (
        received(&alice, &carol, TrackSource::Camera),
        received(&carol, &alice, TrackSource::Camera),
    );
    assert!(
        after_ac > before_ac + 100 && after_ca > before_ca + 100,
        "alice and carol stopped getting each other: {before_ac}->{after_ac}, {before_ca}->{after_ca}"
    );
    assert_eq!(
        metric(&a_metrics, "calls_node_peer_connected", "peer=\"2\""),
        0.0
    );
    assert_eq!(
        metric(&a_metrics, "calls_node_relay_channels", "peer=\"2\""),
        0.0
    );
    println!("# after node 2 died: alice <- carol camera {before_ac} -> {after_ac}, carol <- alice {before_ca} -> {after_ca}");
    let logs = a.stop();
    assert!(!logs.contains(SECRET), "the secret was logged");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// The connection between the nodes drops for 2 s (debug admin API: node 1 closes it and
/// refuses it meanwhile) and comes back: nobody leaves, the imported tracks pause (the core's
/// 1.5 s silence) and resume.
#[test]
fn a_dropped_node_connection_pauses_then_resumes() {
    let (a_base, b_base) = (18_570, 18_580);
    let a = node_with(a_base, 1, &peer(Some(2), b_base), SECRET, "1", "10");
    let b = node_with(b_base, 2, &peer(Some(1), a_base), SECRET, "1", "10");
    let mut alice = WsParticipant::join(a_base, "blip", "alice", None, 81);
    let mut bob = WsParticipant::join(b_base, "blip", "bob", None, 82);
    let bridged = |people: &[&mut WsParticipant]| {
        received(people[1], people[0], TrackSource::Camera) > 100
            && received(people[0], people[1], TrackSource::Camera) > 100
    };
    assert!(
        run_until(
            &mut [&mut alice, &mut bob],
            Duration::from_secs(30),
            bridged
        ),
        "never bridged:\n{}",
        report(&[&alice, &bob])
    );
    let (status, _) = request(
        a_base + 1,
        "POST",
        "/api/debug/relay/cut/2/2000",
        Some(ADMIN_KEY),
    )
    .unwrap();
    assert_eq!(status, 202);
    // The cut: after the silence rule, nothing crosses.
    run_for(&mut [&mut alice, &mut bob], Duration::from_millis(1700));
    let paused_at = received(&bob, &alice, TrackSource::Camera);
    run_for(&mut [&mut alice, &mut bob], Duration::from_millis(300));
    let still_paused = received(&bob, &alice, TrackSource::Camera);
    // Back: media flows again, both ways.
    let resumed = |people: &[&mut WsParticipant]| {
        received(people[1], people[0], TrackSource::Camera) > still_paused + 100
            && received(people[0], people[1], TrackSource::Microphone) > 0
    };
    let back = run_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(20),
        resumed,
    );
    let (_, a_metrics) = request(a_base, "GET", "/metrics", None).unwrap();
    let (_, b_metrics) = request(b_base, "GET", "/metrics", None).unwrap();
    assert!(
        back,
        "media did not resume:\n{}\n{a_metrics}",
        report(&[&alice, &bob])
    );
    assert!(
        still_paused <= paused_at + 5,
        "media crossed a cut link: {paused_at} -> {still_paused}"
    );
    assert!(
        metric(&a_metrics, "calls_node_connections_total", "peer=\"2\"") >= 2.0,
        "it reconnected\n{a_metrics}"
    );
    for (name, text) in [("node 1", &a_metrics), ("node 2", &b_metrics)] {
        assert!(
            metric(text, "calls_relay_link_silences_total", "") >= 1.0
                && metric(text, "calls_relay_link_resumes_total", "") >= 1.0,
            "{name}: the link went silent and resumed\n{text}"
        );
    }
    // Nobody left.
    assert!(alice.heard_type("participant_left").is_empty());
    assert!(bob.heard_type("participant_left").is_empty());
    println!(
        "# cut for 2 s: bob <- alice camera {paused_at} -> {still_paused} (paused) -> {} (resumed)",
        received(&bob, &alice, TrackSource::Camera)
    );
    drop((a, b));
}

/// Node 2 is killed and started again at once (a new process, same id and ports): node 1
/// sees a new incarnation, closes the old links at once (bob leaves, well before
/// `relay_peer_gone_s`) and bridges the call again for the participant who rejoins.
#[test]
fn a_restarted_node_is_bridged_again() {
    let (a_base, b_base) = (18_590, 18_600);
    let b_peer = peer(Some(1), a_base);
    let a = node_with(a_base, 1, &peer(Some(2), b_base), SECRET, "1", "30");
    let b = node_with(b_base, 2, &b_peer, SECRET, "1", "30");
    let mut alice = WsParticipant::join(a_base, "again", "alice", None, 91);
    let mut bob = WsParticipant::join(b_base, "again", "bob", None, 92);
    let bridged = |people: &[&mut WsParticipant]| {
        received(people[1], people[0], TrackSource::Camera) > 50
            && received(people[0], people[1], TrackSource::Camera) > 50
    };
    assert!(
        run_until(
            &mut [&mut alice, &mut bob],
            Duration::from_secs(30),
            bridged
        ),
        "never bridged:\n{}",
        report(&[&alice, &bob])
    );
    let old_bob = bob.session();
    drop(bob);
    b.stop();
    let restarted = std::time::Instant::now();
    let b = node_with(b_base, 2, &b_peer, SECRET, "1", "30");
    let mut bob = WsParticipant::join(b_base, "again", "bob", None, 93);
    let done = run_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(25),
        bridged,
    );
    let (_, a_metrics) = request(a_base, "GET", "/metrics", None).unwrap();
    assert!(
        done,
        "not bridged again:\n{}\n{a_metrics}",
        report(&[&alice, &bob])
    );
    let old_left = |people: &[&mut WsParticipant]| {
        people[0]
            .heard_type("participant_left")
            .iter()
            .any(|m| m["session"].as_u64() == Some(old_bob.0))
    };
    assert!(
        run_until(
            &mut [&mut alice, &mut bob],
            Duration::from_secs(5),
            old_left
        ),
        "the old bob never left alice's roster"
    );
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "{took:?}: waited for relay_peer_gone_s"
    );
    println!("# node 2 restarted: bridged again and the old bob gone after {took:?}");
    drop((a, b));
}

#[test]
fn a_node_with_the_wrong_secret_gets_no_bridge() {
    let (a_base, b_base) = (18_540, 18_550);
    let a = node(a_base, 1, &peer(None, b_base), SECRET, "1");
    let b = node(
        b_base,
        2,
        &peer(None, a_base),
        "another-secret-0123456789abcdef",
        "1",
    );
    let mut alice = WsParticipant::join(a_base, "bridge", "alice", None, 71);
    let mut bob = WsParticipant::join(b_base, "bridge", "bob", None, 72);
    run_for(&mut [&mut alice, &mut bob], Duration::from_secs(4));
    let (_, a_metrics) = request(a_base, "GET", "/metrics", None).unwrap();
    let (_, b_metrics) = request(b_base, "GET", "/metrics", None).unwrap();
    assert_eq!(received(&alice, &bob, TrackSource::Microphone), 0);
    assert_eq!(received(&bob, &alice, TrackSource::Microphone), 0);
    assert!(alice.heard_type("participant_joined").is_empty());
    for (name, text) in [("node 1", &a_metrics), ("node 2", &b_metrics)] {
        assert!(
            metric(text, "calls_node_auth_failures_total", "") >= 1.0,
            "{name}\n{text}"
        );
        assert_eq!(metric(text, "calls_node_peer_connected", ""), 0.0, "{name}");
        assert_eq!(metric(text, "calls_node_relay_frames_in_total", ""), 0.0);
    }
    let (a_logs, b_logs) = (a.stop(), b.stop());
    assert!(!a_logs.contains(SECRET) && !b_logs.contains(SECRET));
    assert!(!b_logs.contains("another-secret"));
}

/// A QUIC client on the relay port that is not a calls node: a stranger, or one that knows the
/// secret and then misbehaves. It speaks the relay's hello by hand (node/wire.rs, node/secure.rs).
mod fake_node {
    use std::sync::Arc;

    use quinn::crypto::rustls::QuicClientConfig;
    use quinn::rustls;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCertificate;

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A connection to the relay at `port` (TLS and QUIC only; nothing said yet).
    pub async fn connect(port: u16) -> quinn::Connection {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"calls-relay/1".to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        endpoint
            .connect(([127, 0, 0, 1], port).into(), "calls-relay")
            .unwrap()
            .await
            .unwrap()
    }

    /// The dialer's hello for node `node` on `conn`, its MAC made with `secret`.
    pub fn hello(conn: &quinn::Connection, secret: &[u8], node: u8) -> Vec<u8> {
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, b"EXPORTER-calls-relay-auth", b"")
            .unwrap();
        let incarnation = 77u64.to_be_bytes();
        let mut input = b"calls node relay v1D".to_vec();
        input.push(node);
        input.extend_from_slice(&incarnation);
        input.extend_from_slice(&exporter);
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
        let mac = aws_lc_rs::hmac::sign(&key, &input);
        let mut body = vec![1u8];
        body.extend_from_slice(b"CALLSRLY");
        body.extend_from_slice(&[1, node]);
        body.extend_from_slice(&incarnation);
        body.extend_from_slice(mac.as_ref());
        message(&body)
    }

    /// A control-stream message: length and body.
    pub fn message(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    /// The application close code the relay closed `conn` with (waiting at most 10 s).
    pub async fn closed_with(conn: &quinn::Connection) -> Option<u64> {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed());
        match closed.await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }
}

/// Bad input on the relay port (docs/security.md, "The node relay"): a stranger that never
/// says its hello, a wrong MAC, and a peer that knows the secret but sends garbage datagrams,
/// an unknown message, a channel it may not open, then an oversized message: each is closed or
/// dropped and counted, nothing panics, and the node goes on.
#[test]
fn bad_input_on_the_relay_port_is_dropped_and_counted() {
    let base = 18_560;
    let a = node(base, 1, "", SECRET, "1");
    let relay = relay_port(base);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    runtime.block_on(async {
        // A stranger opens a connection and says nothing: closed as unauthenticated (code 1)
        // after 5 s.
        let stranger = fake_node::connect(relay).await;
        // A wrong secret: closed at once.
        let wrong = fake_node::connect(relay).await;
        let (mut send, _recv) = wrong.open_bi().await.unwrap();
        let hello = fake_node::hello(&wrong, b"not-the-secret-0123456789", 9);
        send.write_all(&hello).await.unwrap();
        assert_eq!(fake_node::closed_with(&wrong).await, Some(1));
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(fake_node::closed_with(&stranger).await, Some(1));

        // A node that knows the secret, then misbehaves.
        let rogue = fake_node::connect(relay).await;
        let (mut send, mut recv) = rogue.open_bi().await.unwrap();
        let hello = fake_node::hello(&rogue, SECRET.as_bytes(), 9);
        send.write_all(&hello).await.unwrap();
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.unwrap();
        let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], 1, "the node's hello");
        for i in 0..100u8 {
            // Too short, then a relay frame on a channel nobody opened.
            rogue.send_datagram(vec![i; 3].into()).unwrap();
            rogue
                .send_datagram(vec![0, 0, 1, i, 0xCA, 1, 10].into())
                .unwrap();
        }
        // An unknown message type, and an `Open` from the follower (node 9 > node 1).
        send.write_all(&fake_node::message(&[99, 1, 2, 3]))
            .await
            .unwrap();
        send.write_all(&fake_node::message(b"\x03\0\0\0\x05\0\0call"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A message of 1 GiB: the connection is closed (code 3) without reading it.
        send.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        assert_eq!(fake_node::closed_with(&rogue).await, Some(3));
    });
    let (status, _) = request(base, "GET", "/healthz", None).unwrap();
    let (_, metrics) = request(base, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        metric(&metrics, "calls_node_auth_failures_total", "") >= 2.0,
        "{metrics}"
    );
    for reason in ["malformed", "unknown_channel", "oversized"] {
        let n = metric(
            &metrics,
            "calls_node_relay_dropped_total",
            &format!("reason=\"{reason}\""),
        );
        assert!(n >= 1.0, "{reason}: {n}\n{metrics}");
    }
    assert_eq!(metric(&metrics, "calls_node_relay_channels", ""), 0.0);
    let logs = a.stop();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(!logs.contains(SECRET));
}
