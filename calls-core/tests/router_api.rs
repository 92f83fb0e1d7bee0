//! The router's command surface and its single-port admission rules, driven directly
//! (no simulated network): typed errors, limits, STUN authentication, IPv4 and IPv6.
#![allow(clippy::disallowed_methods)] // tests read the clock once for a base instant
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::time::Instant;

use calls_core::str0m::change::SdpOffer;
use calls_core::str0m::ice::{StunMessage, TransId};
use calls_core::str0m::media::{Direction, MediaKind};
use calls_core::str0m::Rtc;
use calls_core::{
    CallId, ClientMessage, Config, ConnId, Datagram, DropReason, Grants, Output, Proto, Router,
    RouterError, ServerMessage, SessionId, SignalError, TcpError,
};

struct Drained {
    transmits: Vec<calls_core::Transmit>,
    signals: Vec<(SessionId, ServerMessage)>,
}

fn drain(router: &mut Router) -> Drained {
    let mut d = Drained {
        transmits: Vec::new(),
        signals: Vec::new(),
    };
    loop {
        match router.poll_output() {
            Output::Transmit(t) => d.transmits.push(t),
            Output::Signal(s, m) => d.signals.push((s, m)),
            Output::Timeout(_) => return d,
            _ => {}
        }
    }
}

/// The ICE credentials a STUN check needs: the router's (from its answer) and the client's.
struct Creds {
    ufrag: String,
    pwd: String,
    client_ufrag: String,
}

/// Joins `session` and negotiates a client offer with one audio track.
fn join_and_offer(router: &mut Router, session: SessionId, now: Instant) -> Creds {
    router
        .join(
            CallId::from("room"),
            session,
            "alice".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    drain(router);
    let mut client = Rtc::builder().build(now);
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, _pending): (SdpOffer, _) = api.apply().unwrap();
    let offer_sdp = offer.to_sdp_string();
    router
        .handle_signal(
            session,
            ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                screen_mid: None,
            },
            now,
        )
        .unwrap();
    let answer = drain(router)
        .signals
        .into_iter()
        .find_map(|(s, m)| match m {
            ServerMessage::Answer { sdp } if s == session => Some(sdp),
            _ => None,
        })
        .expect("an answer");
    let attr = |sdp: &str, name: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .expect("attribute in answer")
    };
    Creds {
        ufrag: attr(&answer, "a=ice-ufrag:"),
        pwd: attr(&answer, "a=ice-pwd:"),
        client_ufrag: attr(&offer_sdp, "a=ice-ufrag:"),
    }
}

fn binding_request(local_ufrag: &str, remote_ufrag: &str, password: &str) -> Vec<u8> {
    let username = format!("{local_ufrag}:{remote_ufrag}");
    let msg = StunMessage::binding_request(&username, TransId::new(), true, 42, 1_000, true);
    let mut buf = vec![0u8; 1500];
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let n = msg
        .to_bytes(Some(password.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        })
        .unwrap();
    buf.truncate(n);
    buf
}

fn datagram<'a>(source: &str, destination: SocketAddr, contents: &'a [u8]) -> Datagram<'a> {
    Datagram {
        proto: Proto::Udp,
        source: source.parse().unwrap(),
        destination,
        contents,
    }
}

#[test]
fn join_beyond_the_call_limit_is_call_full() {
    let now = Instant::now();
    let config = Config::from_toml_str("max_participants_per_call = 2").unwrap();
    let mut router = Router::new(config, now).unwrap();
    for id in 1..=2 {
        router
            .join(
                CallId::from("c"),
                SessionId(id),
                "u".into(),
                Grants::ALL,
                now,
            )
            .unwrap();
    }
    let err = router
        .join(
            CallId::from("c"),
            SessionId(3),
            "u".into(),
            Grants::ALL,
            now,
        )
        .unwrap_err();
    assert_eq!(
        err,
        RouterError::CallFull {
            call: CallId::from("c"),
            max: 2
        }
    );
    // Another call is not affected.
    router
        .join(
            CallId::from("d"),
            SessionId(3),
            "u".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    let m = router.metrics();
    assert_eq!(
        (m.sessions, m.calls, m.joins, m.joins_refused),
        (3, 2, 3, 1)
    );
}

#[test]
fn commands_on_unknown_or_duplicate_sessions_are_typed_errors() {
    let now = Instant::now();
    let mut router = Router::new(Config::default(), now).unwrap();
    let ghost = SessionId(99);
    assert_eq!(
        router.leave(ghost, now),
        Err(RouterError::UnknownSession(ghost))
    );
    assert_eq!(
        router.set_muted(ghost, true, now),
        Err(RouterError::UnknownSession(ghost))
    );
    assert_eq!(
        router.handle_signal(ghost, ClientMessage::Mute, now),
        Err(RouterError::UnknownSession(ghost))
    );
    router
        .join(
            CallId::from("c"),
            SessionId(1),
            "u".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    assert_eq!(
        router.join(
            CallId::from("c"),
            SessionId(1),
            "u".into(),
            Grants::ALL,
            now
        ),
        Err(RouterError::SessionExists(SessionId(1)))
    );
    // An answer with no offer outstanding is refused, and the client is told why.
    let err = router
        .handle_signal(
            SessionId(1),
            ClientMessage::Answer { sdp: "v=0".into() },
            now,
        )
        .unwrap_err();
    assert_eq!(
        err,
        RouterError::Signal {
            session: SessionId(1),
            error: SignalError::UnexpectedAnswer
        }
    );
    let signals = drain(&mut router).signals;
    assert!(signals.iter().any(|(s, m)| *s == SessionId(1)
        && matches!(m, ServerMessage::Error { code, .. } if code == "unexpected_answer")));
}

#[test]
fn draining_router_refuses_new_joins() {
    let now = Instant::now();
    let mut router = Router::new(Config::default(), now).unwrap();
    router.start_draining();
    assert_eq!(
        router.join(
            CallId::from("c"),
            SessionId(1),
            "u".into(),
            Grants::ALL,
            now
        ),
        Err(RouterError::Draining)
    );
}

#[test]
fn only_an_authenticated_binding_request_admits_a_new_flow() {
    let now = Instant::now();
    let config = Config::from_toml_str("worker_index = 7").unwrap();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(config, now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);

    // Wrong password: dropped, no reply, no flow.
    let forged = binding_request(&creds.ufrag, &creds.client_ufrag, "not-the-password-at-all");
    router.handle_datagram(datagram("192.0.2.10:5000", local, &forged), now);
    assert!(drain(&mut router).transmits.is_empty());
    // Unknown ufrag: same.
    let stranger = binding_request("w07nobody", &creds.client_ufrag, &creds.pwd);
    router.handle_datagram(datagram("192.0.2.11:5000", local, &stranger), now);
    assert!(drain(&mut router).transmits.is_empty());
    // RTP and DTLS from a source that never authenticated.
    router.handle_datagram(
        datagram(
            "192.0.2.12:5000",
            local,
            &[0x80, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
        ),
        now,
    );
    router.handle_datagram(
        datagram("192.0.2.12:5000", local, &[22, 254, 253, 0, 0]),
        now,
    );
    router.handle_datagram(datagram("192.0.2.12:5000", local, &[0xff; 40]), now);
    assert!(drain(&mut router).transmits.is_empty());

    let m = router.metrics();
    assert_eq!(m.flows, 0);
    assert_eq!(m.dropped(DropReason::StunAuthFailed), 1);
    assert_eq!(m.dropped(DropReason::UnknownUfrag), 1);
    assert_eq!(m.dropped(DropReason::UnknownSource), 2);
    assert_eq!(m.dropped(DropReason::Unclassified), 1);

    // The real thing: admitted, answered, remembered.
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    assert_eq!(Router::worker_of_datagram(&good), Some(7));
    router.handle_datagram(datagram("192.0.2.20:5000", local, &good), now);
    let replies = drain(&mut router).transmits;
    assert_eq!(replies.len(), 1, "one binding response");
    assert_eq!(replies[0].destination, "192.0.2.20:5000".parse().unwrap());
    assert_eq!(router.metrics().flows, 1);
}

#[test]
fn ipv6_flows_are_admitted_like_ipv4() {
    let now = Instant::now();
    let config = Config::from_toml_str("bind_address = \"::1\"").unwrap();
    let local: SocketAddr = "[::1]:8443".parse().unwrap();
    let mut router = Router::new(config, now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    router.handle_datagram(datagram("[2001:db8::5]:6000", local, &good), now);
    let replies = drain(&mut router).transmits;
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0].destination,
        "[2001:db8::5]:6000".parse().unwrap()
    );
    assert_eq!(replies[0].source, local);
}

#[test]
fn leaving_frees_flows_and_ufrags() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(Config::default(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    router.handle_datagram(datagram("192.0.2.20:5000", local, &good), now);
    drain(&mut router);
    assert_eq!(router.metrics().flows, 1);
    router.leave(SessionId(1), now).unwrap();
    drain(&mut router);
    assert_eq!(router.table_sizes()[..5], [0, 0, 0, 0, 0]);
    // The old credentials no longer admit anything.
    router.handle_datagram(datagram("192.0.2.20:5000", local, &good), now);
    assert!(drain(&mut router).transmits.is_empty());
    assert_eq!(router.metrics().dropped(DropReason::UnknownUfrag), 1);
}

#[test]
fn metrics_render_as_prometheus_text() {
    let now = Instant::now();
    let mut router = Router::new(Config::default(), now).unwrap();
    router
        .join(
            CallId::from("c"),
            SessionId(1),
            "u".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    let text = router.metrics().to_prometheus();
    assert!(text.contains("calls_sessions 1"), "{text}");
    assert!(text.contains("calls_joins_total 1"), "{text}");
}

#[test]
fn ice_tcp_frames_split_anywhere_reach_the_session_and_replies_are_framed() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let remote: SocketAddr = "192.0.2.30:40000".parse().unwrap();
    let mut router = Router::new(Config::default(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let conn = ConnId(5);
    router.tcp_accepted(conn, remote, local).unwrap();
    assert_eq!(
        router.tcp_accepted(conn, remote, local),
        Err(TcpError::ConnectionExists(conn))
    );
    let request = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    let mut framed = (request.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    // Two requests back to back, delivered one byte at a time.
    let stream: Vec<u8> = framed.iter().chain(framed.iter()).copied().collect();
    for byte in &stream {
        router
            .handle_tcp_data(conn, std::slice::from_ref(byte), now)
            .unwrap();
    }
    let replies = drain(&mut router).transmits;
    assert_eq!(replies.len(), 2, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply.proto, Proto::Tcp);
        assert_eq!(reply.conn, Some(conn));
        assert_eq!(reply.destination, remote);
        let len = u16::from_be_bytes([reply.contents[0], reply.contents[1]]) as usize;
        assert_eq!(len + 2, reply.contents.len(), "RFC 4571 prefix");
    }
    let m = router.metrics();
    assert_eq!((m.flows, m.tcp_connections), (1, 1));
    router.tcp_closed(conn).unwrap();
    let m = router.metrics();
    assert_eq!((m.flows, m.tcp_connections), (0, 0));
    assert_eq!(
        router.tcp_closed(conn),
        Err(TcpError::UnknownConnection(conn))
    );
}

#[test]
fn an_oversized_tcp_frame_closes_only_that_connection() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(Config::default(), now).unwrap();
    router
        .tcp_accepted(ConnId(1), "192.0.2.1:1000".parse().unwrap(), local)
        .unwrap();
    router
        .tcp_accepted(ConnId(2), "192.0.2.2:1000".parse().unwrap(), local)
        .unwrap();
    let err = router
        .handle_tcp_data(ConnId(1), &[0xff, 0xff, 0, 0, 0], now)
        .unwrap_err();
    assert!(
        matches!(err, TcpError::FrameTooLarge { len: 0xffff, .. }),
        "{err}"
    );
    assert_eq!(
        router.handle_tcp_data(ConnId(1), &[0, 1, 0], now),
        Err(TcpError::UnknownConnection(ConnId(1)))
    );
    // The other connection is untouched; garbage frames on it are dropped and counted.
    router
        .handle_tcp_data(ConnId(2), &[0, 3, 0xff, 0xff, 0xff], now)
        .unwrap();
    assert!(drain(&mut router).transmits.is_empty());
    let m = router.metrics();
    assert_eq!(m.tcp_connections, 1);
    assert_eq!(m.tcp_rejected, 1);
    assert_eq!(m.dropped(DropReason::TcpFrameTooLarge), 1);
    assert_eq!(m.dropped(DropReason::Unclassified), 1);
}

#[test]
fn the_probe_credential_gets_an_authenticated_reply_and_nothing_more() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let password = "probe-password-0123456789";
    let config = Config::from_toml_str(&format!(
        "probe_ufrag = \"probe\"\nprobe_password = \"{password}\"\nprobe_replies_per_second = 20"
    ))
    .unwrap_err();
    // '-' is not an ICE password character: the config says so.
    assert!(config.to_string().contains("probe_password"), "{config}");
    let password = "probe0password0123456789";
    let config = Config::from_toml_str(&format!(
        "probe_ufrag = \"probe\"\nprobe_password = \"{password}\"\nprobe_replies_per_second = 20"
    ))
    .unwrap();
    let mut router = Router::new(config, now).unwrap();

    let request = binding_request("probe", "tester", password);
    router.handle_datagram(datagram("192.0.2.40:7000", local, &request), now);
    let replies = drain(&mut router).transmits;
    assert_eq!(replies.len(), 1);
    let reply = StunMessage::parse(&replies[0].contents).unwrap();
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    assert!(reply.verify(password.as_bytes(), |k, p| hmac.sha1_hmac(k, p)));
    assert_eq!(
        reply.mapped_address(),
        Some("192.0.2.40:7000".parse().unwrap())
    );
    assert!(
        replies[0].contents.len() <= request.len(),
        "no amplification"
    );
    // No session, no flow: the probe is answered and forgotten.
    assert_eq!(router.metrics().flows, 0);

    // A wrong password gets nothing.
    let forged = binding_request("probe", "tester", "not0the0password0000000000");
    router.handle_datagram(datagram("192.0.2.41:7000", local, &forged), now);
    assert!(drain(&mut router).transmits.is_empty());

    // A flood is cut at the rate: 19 tokens left in this instant.
    for i in 0..40u16 {
        let source = format!("192.0.2.50:{}", 1000 + i);
        router.handle_datagram(datagram(&source, local, &request), now);
    }
    assert_eq!(drain(&mut router).transmits.len(), 19);
    let m = router.metrics();
    assert_eq!(m.probe_replies, 20);
    assert_eq!(m.dropped(DropReason::ProbeRateLimited), 21);
    assert_eq!(m.dropped(DropReason::StunAuthFailed), 1);
}

#[test]
fn a_batch_of_datagrams_is_handled_like_each_one() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(Config::default(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let forged = binding_request(&creds.ufrag, &creds.client_ufrag, "not-the-password-at-all");
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    let garbage = [0xffu8; 40];
    router.handle_datagrams(
        [
            datagram("192.0.2.10:5000", local, &forged),
            datagram("192.0.2.12:5000", local, &garbage),
            datagram("192.0.2.20:5000", local, &good),
        ],
        now,
    );
    let replies = drain(&mut router).transmits;
    assert_eq!(
        replies.len(),
        1,
        "only the authenticated request is answered"
    );
    assert_eq!(replies[0].destination, "192.0.2.20:5000".parse().unwrap());
    let m = router.metrics();
    assert_eq!(m.flows, 1);
    assert_eq!(m.dropped(DropReason::StunAuthFailed), 1);
    assert_eq!(m.dropped(DropReason::Unclassified), 1);
    assert_eq!(m.datagrams_in, 3);
}
