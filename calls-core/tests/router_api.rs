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
    CallId, ClientMessage, Config, ConnId, Datagram, DropReason, Event, Grants, Output, Proto,
    Router, RouterError, ServerMessage, SessionId, SignalError, TcpError, TrackSource,
};

struct Drained {
    transmits: Vec<calls_core::Transmit>,
    signals: Vec<(SessionId, ServerMessage)>,
    events: Vec<Event>,
}

fn drain(router: &mut Router) -> Drained {
    let mut d = Drained {
        transmits: Vec::new(),
        signals: Vec::new(),
        events: Vec::new(),
    };
    loop {
        match router.poll_output() {
            Output::Transmit(t) => d.transmits.push(t),
            Output::Signal(s, m) => d.signals.push((s, m)),
            Output::Event(e) => d.events.push(e),
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
    client_pwd: String,
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
        client_pwd: attr(&offer_sdp, "a=ice-pwd:"),
    }
}

/// The client's signed success answer to the router's consent check `check` (a binding
/// request the router sent to `source`).
fn consent_answer(check: &[u8], creds: &Creds, source: SocketAddr) -> Vec<u8> {
    let request = StunMessage::parse(check).unwrap();
    assert!(request.is_binding_request());
    assert_eq!(
        request.username(),
        Some(format!("{}:{}", creds.client_ufrag, creds.ufrag).as_str()),
        "a check names the client's ufrag first"
    );
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    assert!(request.verify(creds.client_pwd.as_bytes(), |k, p| hmac.sha1_hmac(k, p)));
    let reply = StunMessage::binding_reply(request.trans_id(), source);
    let mut buf = vec![0u8; 1500];
    let n = reply
        .to_bytes(Some(creds.client_pwd.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        })
        .unwrap();
    buf.truncate(n);
    buf
}

/// The default configuration, consent checks on (issue 16, finding 3). They are the default;
/// set here so that these tests keep checking them if the default ever changes.
fn consent_config() -> Config {
    let mut config = Config::default();
    config.consent_checks = true;
    config
}

/// A client's authenticated binding request from `source`, through the consent check the
/// router sends back (answered as the client would). Returns what the router sent after the
/// answer (the binding response to the held request) and every event on the way.
fn admit(
    router: &mut Router,
    creds: &Creds,
    source: &str,
    local: SocketAddr,
    now: Instant,
) -> Drained {
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    router.handle_datagram(datagram(source, local, &good), now);
    let mut first = drain(router);
    let check = first
        .transmits
        .iter()
        .find(|t| t.destination == source.parse().unwrap())
        .expect("a consent check to the new address");
    let answer = consent_answer(&check.contents, creds, source.parse().unwrap());
    // The answer carries no USERNAME; a dispatcher with one router per core routes it by its
    // transaction id, which starts with the worker index (issue 16, finding 3: without this
    // the server dropped every answer, and aiortc never connected with consent checks on).
    let worker = router.config().worker_index;
    assert_eq!(Router::worker_of_datagram(&answer), Some(worker));
    router.handle_datagram(datagram(source, local, &answer), now);
    let mut after = drain(router);
    first.events.append(&mut after.events);
    after.events = first.events;
    after
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
    let config = Config::from_toml_str("worker_index = 7\nconsent_checks = true").unwrap();
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

    // The real thing: checked, then admitted, answered, remembered.
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    assert_eq!(Router::worker_of_datagram(&good), Some(7));
    let replies = admit(&mut router, &creds, "192.0.2.20:5000", local, now).transmits;
    assert_eq!(replies.len(), 1, "one binding response");
    assert_eq!(replies[0].destination, "192.0.2.20:5000".parse().unwrap());
    assert!(StunMessage::parse(&replies[0].contents)
        .unwrap()
        .is_successful_binding_response());
    assert_eq!(router.metrics().flows, 1);
}

#[test]
fn ipv6_flows_are_admitted_like_ipv4() {
    let now = Instant::now();
    let config = Config::from_toml_str("bind_address = \"::1\"\nconsent_checks = true").unwrap();
    let local: SocketAddr = "[::1]:8443".parse().unwrap();
    let mut router = Router::new(config, now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let replies = admit(&mut router, &creds, "[2001:db8::5]:6000", local, now).transmits;
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
    let mut router = Router::new(consent_config(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    let good = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    admit(&mut router, &creds, "192.0.2.20:5000", local, now);
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
    let mut router = Router::new(consent_config(), now).unwrap();
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
        "only the authenticated request is answered (with a consent check)"
    );
    assert_eq!(replies[0].destination, "192.0.2.20:5000".parse().unwrap());
    let m = router.metrics();
    assert_eq!(m.flows, 0, "admitted once the check is answered");
    assert_eq!(m.dropped(DropReason::ConsentPending), 1);
    assert_eq!(m.dropped(DropReason::StunAuthFailed), 1);
    assert_eq!(m.dropped(DropReason::Unclassified), 1);
    assert_eq!(m.datagrams_in, 3);
}

/// An embedder's address → session map kept only from the router's flow events, as the
/// reference server keeps its address → worker map.
#[derive(Debug, Default)]
struct FlowMap(std::collections::HashMap<(Proto, SocketAddr), SessionId>);

impl FlowMap {
    fn apply(&mut self, events: &[Event]) {
        for event in events {
            match event {
                Event::FlowAdmitted {
                    session,
                    proto,
                    remote,
                    ..
                } => {
                    self.0.insert((*proto, *remote), *session);
                }
                Event::FlowMoved {
                    from,
                    to,
                    proto,
                    remote,
                    ..
                } => {
                    assert_eq!(
                        self.0.get(&(*proto, *remote)),
                        Some(from),
                        "moved from its owner"
                    );
                    self.0.insert((*proto, *remote), *to);
                }
                Event::FlowRemoved {
                    session,
                    proto,
                    remote,
                    ..
                } => {
                    assert_eq!(
                        self.0.remove(&(*proto, *remote)),
                        Some(*session),
                        "removed from its owner"
                    );
                }
                _ => {}
            }
        }
    }
}

/// Finding 4 (issue 16): a participant rotating its source port admits a new flow per port;
/// the router forgets the oldest beyond `max_flows_per_session` and says so, so a map kept
/// from the events stays the router's flow table (before, it only grew). A flow that moves
/// to another session, and a session that leaves, are reported too.
#[test]
fn flow_events_keep_an_embedders_map_exact_while_ports_rotate() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(consent_config(), now).unwrap();
    let max = router.config().max_flows_per_session;
    let mut map = FlowMap::default();
    let alice = join_and_offer(&mut router, SessionId(1), now);
    let bob = join_and_offer(&mut router, SessionId(2), now);
    for port in 5000..5020u16 {
        let d = admit(
            &mut router,
            &alice,
            &format!("192.0.2.20:{port}"),
            local,
            now,
        );
        map.apply(&d.events);
        assert_eq!(map.0.len() as u64, router.metrics().flows);
    }
    assert_eq!(map.0.len(), max);
    assert!(map
        .0
        .contains_key(&(Proto::Udp, "192.0.2.20:5019".parse().unwrap())));
    assert!(!map
        .0
        .contains_key(&(Proto::Udp, "192.0.2.20:5000".parse().unwrap())));

    // Bob's NAT hands him a port alice used: the flow moves to bob.
    let d = admit(&mut router, &bob, "192.0.2.20:5019", local, now);
    assert!(
        d.events.iter().any(|e| matches!(
            e,
            Event::FlowMoved {
                from: SessionId(1),
                to: SessionId(2),
                ..
            }
        )),
        "{:?}",
        d.events
    );
    map.apply(&d.events);
    // Alice leaves: her flows go, bob's (the moved one) stays.
    router.leave(SessionId(1), now).unwrap();
    map.apply(&drain(&mut router).events);
    assert_eq!(
        map.0.values().copied().collect::<Vec<_>>(),
        vec![SessionId(2)]
    );
    assert_eq!(router.metrics().flows, 1);
}

/// Finding 3 (issue 16): a participant signs a USE-CANDIDATE binding request with its own ICE
/// password and spoofs a victim's source address. The router answers only with one consent
/// check to that address (no larger than the request) and admits nothing until the client's
/// signed answer comes from there, so its media cannot be pointed at the victim.
#[test]
fn a_spoofed_source_gets_one_check_and_no_flow() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let mut router = Router::new(consent_config(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    admit(&mut router, &creds, "192.0.2.20:5000", local, now);
    let spoofed = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    let victim = "203.0.113.99:443";
    let mut sent_to_victim = Vec::new();
    for i in 0..20u64 {
        let at = now + std::time::Duration::from_millis(100 * i);
        router.handle_datagram(datagram(victim, local, &spoofed), at);
        sent_to_victim.extend(
            drain(&mut router)
                .transmits
                .into_iter()
                .filter(|t| t.destination == victim.parse().unwrap()),
        );
    }
    // One check per 250 ms at most, each a binding request no larger than the spoofed one.
    assert!(
        sent_to_victim.len() <= 8,
        "{} datagrams",
        sent_to_victim.len()
    );
    for t in &sent_to_victim {
        assert!(t.contents.len() <= spoofed.len() + 8);
        assert!(StunMessage::parse(&t.contents)
            .unwrap()
            .is_binding_request());
    }
    // The attacker can sign an answer as the client, but cannot see the check's transaction
    // id (it went to the victim): an answer with another one admits nothing. Neither does
    // the right one with a broken signature.
    let hmac = calls_core::str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let guessed = StunMessage::binding_reply(TransId::new(), victim.parse().unwrap());
    let mut buf = vec![0u8; 1500];
    let n = guessed
        .to_bytes(Some(creds.client_pwd.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        })
        .unwrap();
    router.handle_datagram(datagram(victim, local, &buf[..n]), now);
    let check = &sent_to_victim.last().unwrap().contents;
    let mut tampered = consent_answer(check, &creds, victim.parse().unwrap());
    tampered[24] ^= 1; // inside XOR-MAPPED-ADDRESS, covered by MESSAGE-INTEGRITY
    router.handle_datagram(datagram(victim, local, &tampered), now);
    drain(&mut router);
    let m = router.metrics();
    assert_eq!(m.flows, 1, "only the real address");
    // 20 spoofed requests, plus the real address's first one (held until its check).
    assert_eq!(m.dropped(DropReason::ConsentPending), 21);
}

/// Finding 2 (issue 16): an offer sending more microphones than the session may publish is
/// refused with a typed error before str0m sees it; nothing is published and the session
/// goes on (a valid offer afterwards is answered).
#[test]
fn an_offer_beyond_the_track_limits_is_refused_and_the_session_goes_on() {
    let now = Instant::now();
    let mut router = Router::new(consent_config(), now).unwrap();
    router
        .join(
            CallId::from("room"),
            SessionId(1),
            "alice".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    drain(&mut router);
    let mut client = Rtc::builder().build(now);
    let mut api = client.sdp_api();
    for _ in 0..3 {
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    }
    let (offer, _pending): (SdpOffer, _) = api.apply().unwrap();
    let err = router
        .handle_signal(
            SessionId(1),
            ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                screen_mid: None,
            },
            now,
        )
        .unwrap_err();
    let expected = SignalError::TooManyTracks {
        track: TrackSource::Microphone,
        count: 2,
        max: 1,
    };
    assert_eq!(
        err,
        RouterError::Signal {
            session: SessionId(1),
            error: expected.clone()
        }
    );
    let d = drain(&mut router);
    assert_eq!(
        d.signals,
        vec![(
            SessionId(1),
            ServerMessage::Error {
                code: "too_many_tracks".into(),
                message: expected.to_string()
            }
        )]
    );
    assert!(!d
        .events
        .iter()
        .any(|e| matches!(e, Event::TrackPublished { .. })));
    // The same client, within the limits, is answered.
    let mut client = Rtc::builder().build(now);
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, _pending): (SdpOffer, _) = api.apply().unwrap();
    router
        .handle_signal(
            SessionId(1),
            ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                screen_mid: None,
            },
            now,
        )
        .unwrap();
    assert!(drain(&mut router)
        .signals
        .iter()
        .any(|(_, m)| matches!(m, ServerMessage::Answer { .. })));
}

/// Finding 1 (issue 16): a session that leaves reports its ICE-TCP flows as removed, so the
/// embedder closes those connections instead of keeping them open for nobody.
#[test]
fn a_session_that_leaves_reports_its_tcp_flows_for_closing() {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let remote: SocketAddr = "192.0.2.30:40000".parse().unwrap();
    let mut router = Router::new(consent_config(), now).unwrap();
    let creds = join_and_offer(&mut router, SessionId(1), now);
    router.tcp_accepted(ConnId(5), remote, local).unwrap();
    let request = binding_request(&creds.ufrag, &creds.client_ufrag, &creds.pwd);
    let mut framed = (request.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    router.handle_tcp_data(ConnId(5), &framed, now).unwrap();
    let admitted = drain(&mut router).events;
    assert!(admitted.iter().any(|e| matches!(
        e,
        Event::FlowAdmitted { proto: Proto::Tcp, remote: r, .. } if *r == remote
    )));
    router.leave(SessionId(1), now).unwrap();
    let events = drain(&mut router).events;
    let removed = events
        .iter()
        .position(|e| matches!(e, Event::FlowRemoved { proto: Proto::Tcp, remote: r, .. } if *r == remote))
        .expect("the TCP flow is reported removed");
    let left = events
        .iter()
        .position(|e| matches!(e, Event::Left { .. }))
        .unwrap();
    assert!(removed < left, "flow changes come first: {events:?}");
}

/// An SDP offer from the lines, as the client sends it (`\r\n` line ends).
fn offer_json(lines: &[&str]) -> String {
    let sdp: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
    ClientMessage::Offer {
        sdp,
        screen_mid: None,
    }
    .to_json()
}

/// Found by fuzzing `signal_json` (issue 16): after a first offer sending H.264 on payload type
/// 123, a second offer whose old video m-line is disabled with a format that is no payload type,
/// and whose new sendrecv video m-line demands PT 123 for another H.264 profile, made str0m
/// assert "Pt locked multiple times" while answering: one participant's offer panicked the
/// router, and the reference server exits on a worker panic, ending every call on it. Now the
/// codec the remote maps to a taken PT is not negotiated there; the router answers and goes on.
#[test]
fn an_offer_demanding_a_payload_type_already_taken_does_not_panic_the_router() {
    let now = Instant::now();
    let mut router = Router::new(Config::default(), now).unwrap();
    router
        .join(
            CallId::from("room"),
            SessionId(1),
            "mallory".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    drain(&mut router);
    let session = [
        "v=0",
        "o=- 1 2 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE a v",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:a",
        "a=sendrecv",
        "a=rtpmap:111 opus/48000/2",
    ];
    let credentials = [
        "a=ice-ufrag:I7Fq8XfjixEMRyR7",
        "a=ice-pwd:OXESpVkd1FjmEUXT7anYGb",
        "a=fingerprint:sha-256 A8:52:28:89:2A:2C:45:28:3A:A5:84:8F:71:76:E1:9E:75:02:5F:32:DA:36:46:0A:9B:17:4C:1E:92:52:2D:BD",
    ];
    let first: Vec<&str> = session
        .iter()
        .chain(&["m=video 9 UDP/TLS/RTP/SAVPF 123"])
        .chain(&credentials)
        .chain(&["a=mid:v", "a=sendonly", "a=rtpmap:123 H264/90000"])
        .copied()
        .collect();
    let _ = router.handle_signal_json(SessionId(1), &offer_json(&first), now);
    drain(&mut router);
    let second: Vec<&str> = session
        .iter()
        .chain(&[
            "m=video 0 UDP/TLS/RTP/SAVPF 364115",
            "a=mid:v",
            "a=sendrecv",
            "m=video 0 UDP/TLS/RTP/SAVPF 123",
        ])
        .chain(&credentials[..2])
        .chain(&[
            "a=mid:w",
            "a=sendrecv",
            "a=rtpmap:123 H264/90000",
            "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
        ])
        .copied()
        .collect();
    let _ = router.handle_signal_json(SessionId(1), &offer_json(&second), now);
    drain(&mut router);
    // The router goes on: another participant joins and is answered.
    let mut client = Rtc::builder().build(now);
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, _pending): (SdpOffer, _) = api.apply().unwrap();
    router
        .join(
            CallId::from("room"),
            SessionId(2),
            "bob".into(),
            Grants::ALL,
            now,
        )
        .unwrap();
    router
        .handle_signal(
            SessionId(2),
            ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                screen_mid: None,
            },
            now,
        )
        .unwrap();
    assert!(drain(&mut router)
        .signals
        .iter()
        .any(|(s, m)| *s == SessionId(2) && matches!(m, ServerMessage::Answer { .. })));
}
