//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, shared with the corpus replay test
//! (`benches/tests/fuzz_corpus.rs`) so CI replays every committed input through the same code
//! without nightly. Each body takes arbitrary bytes, drives public API, and panics only on a
//! real bug (an invariant broken, or a panic inside calls).
//!
//! # Fixtures shared by consecutive inputs
//!
//! A router with a joined session costs about a millisecond to build in a fuzz build (the DTLS
//! certificate, and one ephemeral key pair per DTLS group for the session), and the `stun`
//! target's offer/answer as much again: building them per input capped those targets at
//! 60–500 executions a second. So the targets that need a router (`datagram`, `stun`,
//! `tcp_frames`, `signal_json`) take it from a per-target [`Fixture`] that serves
//! consecutive inputs: at most [`INPUTS_PER_ROUTER`] of them, and only while its session lives
//! (a connect timeout or a protocol error removes it; the next input then gets a fresh router).
//! Virtual time carries on from one input to the next, so it stays monotonic for the router.
//!
//! The price: an input may meet state earlier inputs left (an admitted peer, a renegotiated
//! session), so a crash found by libFuzzer can depend on the inputs before it. Running the
//! crash file alone (`cargo fuzz run <target> <file>`) starts from a fresh fixture, like the
//! corpus replay test, which calls [`reset_fixtures`] before every file; if that does not
//! reproduce it, replay the run's recent inputs in order (libFuzzer `-runs` over the corpus
//! directory in the order it found them). `config`, `rewriter` and `ffi` are cheap per input,
//! or test router creation itself, and `sdp_offer` spends its time in str0m's SDP parser:
//! they build everything afresh.
//!
//! A shared fixture keeps memory from one input to the next, so libFuzzer's per-input leak
//! check (it re-runs an input that allocated more than it freed, then scans the heap) fires
//! often on these targets until it gives up after 1000 attempts ("libFuzzer disabled leak
//! detection after every mutation"); the first minutes of a run are slower for it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use calls_core::str0m::change::SdpOffer;
use calls_core::str0m::ice::{StunMessage, TransId};
use calls_core::str0m::media::{Direction, MediaKind};
use calls_core::str0m::{Candidate, Rtc};
use calls_core::{
    CallId, ClientMessage, Config, ConnId, Datagram, Event, Grants, Output, Proto, Router,
    ServerMessage, SessionId, TrackSource,
};

/// A target body: arbitrary bytes in, a panic only for a bug.
pub type Body = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Body)] = &[
    ("datagram", datagram),
    ("stun", stun),
    ("tcp_frames", tcp_frames),
    ("signal_json", signal_json),
    ("sdp_offer", sdp_offer),
    ("rewriter", rewriter),
    ("config", config),
    ("ffi", ffi),
    ("signal_session", signal_session),
    ("rtp_payload", rtp_payload),
    ("red_payload", red_payload),
    ("relay_frames", relay_frames),
];

/// The one clock read: a base instant for virtual time.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods)]
    *EPOCH.get_or_init(Instant::now)
}

fn router_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8443))
}

fn peer_addr(selector: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1 + selector % 4), 5000))
}

/// A str0m client's offer (one sendrecv audio, one sendonly video), made once per process.
pub fn client_offer() -> &'static str {
    static OFFER: OnceLock<String> = OnceLock::new();
    OFFER.get_or_init(|| {
        let mut rtc = Rtc::builder().build(epoch());
        if let Ok(c) = Candidate::host(peer_addr(0), "udp") {
            rtc.add_local_candidate(c);
        }
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        match api.apply() {
            Some((offer, _)) => offer.to_sdp_string(),
            None => String::new(),
        }
    })
}

/// How many consecutive inputs one [`Fixture`] router serves before a fresh one replaces it:
/// enough to spread its cost thin, few enough that state cannot grow without bound.
pub const INPUTS_PER_ROUTER: u32 = 1000;

/// A router with session 1 joined to call "fuzz", shared by consecutive inputs of one target
/// (see the module docs).
struct Fixture<S> {
    router: Router,
    /// Virtual time where the previous input left off.
    now: Instant,
    /// Inputs served so far.
    inputs: u32,
    /// What the target's set-up learned about the session (the `stun` target: its ICE
    /// credentials).
    session: S,
}

type Slot<S> = RefCell<Option<Fixture<S>>>;

thread_local! {
    static DATAGRAM: Slot<()> = const { RefCell::new(None) };
    static STUN: Slot<IceCredentials> = const { RefCell::new(None) };
    static TCP_FRAMES: Slot<()> = const { RefCell::new(None) };
    static SIGNAL_JSON: Slot<()> = const { RefCell::new(None) };
    static SIGNAL_SESSION: Slot<Published> = const { RefCell::new(None) };
    static RELAY_FRAMES: Slot<()> = const { RefCell::new(None) };
}

/// Drops every target's fixture, so that the next input of each starts from a fresh router
/// (the corpus replay test calls this before every file, to replay each one on its own).
pub fn reset_fixtures() {
    DATAGRAM.with(|f| f.replace(None));
    STUN.with(|f| f.replace(None));
    TCP_FRAMES.with(|f| f.replace(None));
    SIGNAL_JSON.with(|f| f.replace(None));
    SIGNAL_SESSION.with(|f| f.replace(None));
    RELAY_FRAMES.with(|f| f.replace(None));
}

/// Runs `body` with the router (and the virtual time) of the target's fixture, building a
/// fresh one with `set_up` when there is none, it has served [`INPUTS_PER_ROUTER`] inputs, or
/// its session has gone. `set_up` returning `None` skips the input.
fn with_fixture<S: 'static>(
    slot: &'static LocalKey<Slot<S>>,
    set_up: fn(&mut Router, Instant) -> Option<S>,
    body: impl FnOnce(&mut Router, &mut Instant, &S),
) {
    slot.with(|cell| {
        let mut fixture = cell.borrow_mut();
        let usable = fixture
            .as_ref()
            .is_some_and(|f| f.inputs < INPUTS_PER_ROUTER && f.router.session_count() > 0);
        if !usable {
            // Drop the old router before building the next one.
            *fixture = None;
            let mut router = new_router();
            let Some(session) = set_up(&mut router, epoch()) else {
                return;
            };
            *fixture = Some(Fixture {
                router,
                now: epoch(),
                inputs: 0,
                session,
            });
        }
        let Some(f) = fixture.as_mut() else {
            return;
        };
        f.inputs += 1;
        body(&mut f.router, &mut f.now, &f.session);
    });
}

fn new_router() -> Router {
    match Router::new(Config::default(), epoch()) {
        Ok(r) => r,
        Err(e) => panic!("default config refused: {e}"),
    }
}

/// Joins session 1 to call "fuzz" (a fixture's set-up).
fn join_session(router: &mut Router, now: Instant) -> Option<()> {
    if let Err(e) = router.join(
        CallId::from("fuzz"),
        SessionId(1),
        "u".into(),
        Grants::ALL,
        now,
    ) {
        panic!("join refused: {e}");
    }
    drain(router);
    Some(())
}

/// Drains every output; returns the signals' JSON. A runaway output queue is a bug.
fn drain(router: &mut Router) -> Vec<ServerMessage> {
    let mut signals = Vec::new();
    for _ in 0..100_000 {
        match router.poll_output() {
            Output::Timeout(_) => return signals,
            Output::Signal(_, msg) => signals.push(msg),
            _ => {}
        }
    }
    panic!("poll_output never reached Timeout");
}

/// Splits input into (selector, bytes) records: `[selector, len_hi, len_lo, bytes...]`.
fn records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 3 {
            return None;
        }
        let selector = data[0];
        let len = usize::from(u16::from_be_bytes([data[1], data[2]])).min(data.len() - 3);
        let record = &data[3..3 + len];
        data = &data[3 + len..];
        Some((selector, record))
    })
}

/// How far past its last datagram a `datagram` input runs the router's timers: the idle,
/// layer and tick timers (≤ 1 s) fire at the end of the input that armed them; the longer ones
/// (statistics 2 s, offer resend 4 s, unmute grace 5 s, connect deadline 30 s) fire during a
/// later input, since the fixture's clock moves at least this much per input. Jumping past the
/// connect deadline every input would remove the fixture's session, and with it the point of
/// sharing it; it fires every thirty inputs or so, with whatever state they left.
const DATAGRAM_TIMERS: Duration = Duration::from_secs(1);

/// Datagram demux and classification: arbitrary datagrams from a few sources (one of them a
/// session's admitted peer after a `stun` record) into a router with one session.
pub fn datagram(data: &[u8]) {
    with_fixture(&DATAGRAM, join_session, |router, now, ()| {
        datagrams_into(router, now, data);
    });
}

fn datagrams_into(router: &mut Router, now: &mut Instant, data: &[u8]) {
    for (selector, bytes) in records(data) {
        *now += Duration::from_millis(u64::from(selector >> 4));
        let proto = if selector & 0x08 != 0 {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        router.handle_datagram(
            Datagram {
                proto,
                source: peer_addr(selector),
                destination: router_addr(),
                contents: bytes,
            },
            *now,
        );
        drain(router);
        let _ = Router::worker_of_datagram(bytes);
    }
    *now += DATAGRAM_TIMERS;
    router.handle_timeout(*now);
    drain(router);
}

fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// The ICE credentials of session 1 after it answered [`client_offer`]: the router's (from the
/// answer) and the client's ufrag.
struct IceCredentials {
    local_ufrag: String,
    local_pwd: String,
    remote_ufrag: String,
    /// The client's password: it signs the answers to the router's consent checks.
    remote_pwd: String,
}

/// Joins session 1 and has it answer [`client_offer`] (the `stun` fixture's set-up).
fn join_and_answer(router: &mut Router, now: Instant) -> Option<IceCredentials> {
    join_session(router, now)?;
    let offer = client_offer();
    let _ = router.handle_signal(
        SessionId(1),
        ClientMessage::Offer {
            sdp: offer.to_owned(),
            screen_mid: None,
        },
        now,
    );
    let answer = drain(router).into_iter().find_map(|m| match m {
        ServerMessage::Answer { sdp } => Some(sdp),
        _ => None,
    })?;
    let attr = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Some(IceCredentials {
        local_ufrag: attr(&answer, "a=ice-ufrag:"),
        local_pwd: attr(&answer, "a=ice-pwd:"),
        remote_ufrag: attr(offer, "a=ice-ufrag:"),
        remote_pwd: attr(offer, "a=ice-pwd:"),
    })
}

/// STUN admission: a session that has answered an offer, then binding requests built from the
/// input (right or wrong ufrag/password, priority, USE-CANDIDATE, role) with optional byte
/// flips after signing, from several sources; then arbitrary datagrams from those sources.
/// With the fixture, the sources may already be admitted peers (nominated, even) when an
/// input starts.
pub fn stun(data: &[u8]) {
    with_fixture(&STUN, join_and_answer, |router, now, credentials| {
        binding_requests_into(router, now, credentials, data);
    });
}

fn binding_requests_into(
    router: &mut Router,
    now: &mut Instant,
    credentials: &IceCredentials,
    data: &[u8],
) {
    let IceCredentials {
        local_ufrag,
        local_pwd,
        remote_ufrag,
        remote_pwd,
    } = credentials;
    for (selector, bytes) in records(data) {
        *now += Duration::from_millis(u64::from(selector >> 5));
        let source = peer_addr(selector);
        let contents = if selector & 0x10 != 0 {
            bytes.to_vec()
        } else {
            let good_user = selector & 0x04 == 0;
            let username = if good_user {
                format!("{local_ufrag}:{remote_ufrag}")
            } else {
                String::from_utf8_lossy(bytes).into_owned()
            };
            let prio = bytes
                .get(..4)
                .map_or(1, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let msg = StunMessage::binding_request(
                &username,
                TransId::new(),
                selector & 0x08 != 0,
                u64::from(prio),
                prio,
                selector & 0x02 != 0,
            );
            let password = if selector & 0x01 == 0 {
                local_pwd.as_bytes()
            } else {
                bytes
            };
            let mut buf = vec![0u8; 1500];
            let Ok(len) = msg.to_bytes(Some(password), &mut buf, hmac_sha1) else {
                continue;
            };
            buf.truncate(len);
            // Flip one byte chosen by the input (tampering after signing).
            if let Some(&at) = bytes.get(4) {
                if selector & 0x40 != 0 && len > 0 {
                    let i = usize::from(at) % len;
                    buf[i] ^= bytes.get(5).copied().unwrap_or(1) | 1;
                }
            }
            buf
        };
        router.handle_datagram(
            Datagram {
                proto: Proto::Udp,
                source,
                destination: router_addr(),
                contents: &contents,
            },
            *now,
        );
        // A real client at `source` answers the router's consent check (signed with its
        // password, same transaction id), which admits the flow; with the wrong-password bit
        // set, nobody answers (a spoofed address).
        let checks = drain_transmits(router, source);
        if selector & 0x01 == 0 {
            for check in checks {
                let Some(answer) = consent_answer(&check, remote_pwd, source) else {
                    continue;
                };
                router.handle_datagram(
                    Datagram {
                        proto: Proto::Udp,
                        source,
                        destination: router_addr(),
                        contents: &answer,
                    },
                    *now,
                );
                drain(router);
            }
        }
    }
}

/// Drains every output; returns the datagrams sent to `to` (a runaway queue is a bug).
fn drain_transmits(router: &mut Router, to: SocketAddr) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    for _ in 0..100_000 {
        match router.poll_output() {
            Output::Timeout(_) => return sent,
            Output::Transmit(t) if t.destination == to => sent.push(t.contents),
            _ => {}
        }
    }
    panic!("poll_output never reached Timeout");
}

/// The client's signed success answer to a binding request the router sent it (a consent
/// check); `None` for anything else.
fn consent_answer(check: &[u8], client_pwd: &str, client: SocketAddr) -> Option<Vec<u8>> {
    let request = StunMessage::parse(check).ok()?;
    if !request.is_binding_request() {
        return None;
    }
    let reply = StunMessage::binding_reply(request.trans_id(), client);
    let mut buf = vec![0u8; 1500];
    let len = reply
        .to_bytes(Some(client_pwd.as_bytes()), &mut buf, hmac_sha1)
        .ok()?;
    buf.truncate(len);
    Some(buf)
}

/// ICE-TCP reassembly: the input is a byte stream of RFC 4571 frames (whatever it holds),
/// delivered in chunks whose sizes come from the input too; a second connection gets the same
/// bytes in one piece. Errors are fine; panics and runaway buffers are not. Both connections
/// are closed at the end, so the next input (same fixture router) can accept them again.
pub fn tcp_frames(data: &[u8]) {
    let Some((&split_seed, stream)) = data.split_first() else {
        return;
    };
    with_fixture(&TCP_FRAMES, join_session, |router, now, ()| {
        tcp_stream_into(router, now, split_seed, stream);
    });
}

fn tcp_stream_into(router: &mut Router, now: &mut Instant, split_seed: u8, stream: &[u8]) {
    let local = router_addr();
    let conns = [(ConnId(1), peer_addr(1)), (ConnId(2), peer_addr(2))];
    for (conn, remote) in conns {
        // The previous input closed both (or the router forgot them on an error).
        if let Err(e) = router.tcp_accepted(conn, remote, local) {
            panic!("a closed connection's id is still taken: {e}");
        }
    }
    let mut rest = stream;
    let mut size = usize::from(split_seed).max(1);
    while !rest.is_empty() {
        let n = size.min(rest.len());
        *now += Duration::from_micros(100);
        if router.handle_tcp_data(ConnId(1), &rest[..n], *now).is_err() {
            break;
        }
        drain(router);
        rest = &rest[n..];
        // The next chunk size: a function of the bytes just sent, 1..=256.
        size = usize::from(rest.first().copied().unwrap_or(0)).wrapping_mul(7) % 256 + 1;
    }
    let _ = router.handle_tcp_data(ConnId(2), stream, *now);
    drain(router);
    for (conn, _) in conns {
        let _ = router.tcp_closed(conn);
    }
    drain(router);
}

/// Signaling JSON: parsed alone, then handed to a router session (before and after its first
/// offer: the fixture's session has seen the inputs before this one) and to an unknown session.
pub fn signal_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ClientMessage::from_json(text);
    if let Ok(msg) = &parsed {
        // A parsed message survives a round trip.
        let json = msg.to_json();
        assert!(
            ClientMessage::from_json(&json).is_ok(),
            "round trip failed: {json}"
        );
    }
    let _ = ServerMessage::from_json(text);
    with_fixture(&SIGNAL_JSON, join_session, |router, now, ()| {
        *now += Duration::from_millis(10);
        let _ = router.handle_signal_json(SessionId(1), text, *now);
        drain(router);
        let _ = router.handle_signal_json(SessionId(2), text, *now);
        drain(router);
    });
}

/// SDP offers: arbitrary text as a session's offer (with and without a screen mid), then the
/// same text as an answer, with time passing in between. A fresh router for every input, unlike
/// the other router targets: str0m's SDP parser, not the join, is most of the time here (a
/// shared fixture measured no faster), and every offer stays a session's first.
pub fn sdp_offer(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = SdpOffer::from_sdp_string(text);
    let mut router = new_router();
    join_session(&mut router, epoch());
    offer_and_answer(&mut router, &mut epoch(), text);
}

fn offer_and_answer(router: &mut Router, now: &mut Instant, text: &str) {
    let screen_mid = text.lines().find_map(|l| l.strip_prefix("a=mid:"));
    let _ = router.handle_signal(
        SessionId(1),
        ClientMessage::Offer {
            sdp: text.to_owned(),
            screen_mid: screen_mid.map(str::to_owned),
        },
        *now,
    );
    drain(router);
    *now += Duration::from_secs(1);
    let _ = router.handle_signal(
        SessionId(1),
        ClientMessage::Answer {
            sdp: text.to_owned(),
        },
        *now,
    );
    drain(router);
    *now += Duration::from_secs(5);
    router.handle_timeout(*now);
    drain(router);
}

/// The RTP rewriter with arbitrary packet sequences, epochs and keyframes, including a
/// slot's source change, simulcast layer switches, pauses and skipped (temporal-layer)
/// packets. Invariants: within one epoch, distinct incoming sequence numbers never map to the
/// same outgoing one, and the first forward after a resync continues right after the highest
/// number sent.
pub fn rewriter(data: &[u8]) {
    use calls_core::fuzzing::Rewriter;
    use std::collections::HashMap;
    let Some((&flags, packets)) = data.split_first() else {
        return;
    };
    let is_video = flags & 1 != 0;
    let clock_rate = if is_video { 90_000 } else { 48_000 };
    let mut rw = Rewriter::new(clock_rate, is_video, 0);
    let mut now = epoch();
    let mut epoch_no = 0u32;
    let mut base: u64 = 1 << 20;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut highest: Option<u64> = None;
    let mut resync = true;
    for chunk in packets.chunks(4) {
        let [a, b, c, d] = match *chunk {
            [a, b, c, d] => [a, b, c, d],
            _ => return,
        };
        now += Duration::from_millis(u64::from(d));
        match a >> 6 {
            // New epoch (unmute, source change): a resync.
            0 if a & 0x20 != 0 => {
                epoch_no += 1;
                seen.clear();
                resync = true;
            }
            // A slot changes source: the stream continues with another track's numbers.
            1 if a & 0x20 != 0 => {
                epoch_no += 1;
                rw.switch_source(epoch_no);
                seen.clear();
                resync = true;
            }
            // A simulcast switch: another layer's numbers from here on.
            2 if a & 0x20 != 0 => {
                rw.switch_layer();
                seen.clear();
                resync = true;
            }
            // Paused by the allocator or the subscriber.
            3 if a & 0x20 != 0 => {
                rw.pause();
                seen.clear();
                resync = true;
            }
            _ => {}
        }
        // Publisher sequence numbers: a walk with jumps back and forth (loss, reorder).
        let step = i64::from(i8::from_ne_bytes([b]));
        base = base.saturating_add_signed(step).clamp(0, 1 << 47);
        let timestamp = u32::from_be_bytes([c, d, b, a]);
        let keyframe = a & 0x10 != 0;
        if a & 0x08 != 0 && !resync {
            rw.skip(base); // an upper temporal layer this subscriber does not get
            continue;
        }
        if let Some((out_seq, _)) = rw.rewrite(epoch_no, base, timestamp, keyframe, now) {
            if resync {
                assert_eq!(
                    out_seq,
                    highest.map_or(1, |h| h + 1),
                    "a resync must continue right after the highest number sent"
                );
                resync = false;
            }
            if let Some(prev_in) = seen.insert(out_seq, base) {
                assert_eq!(prev_in, base, "two packets got outgoing seq {out_seq}");
            }
            highest = Some(highest.map_or(out_seq, |h| h.max(out_seq)));
        }
    }
}

/// Config parsing: TOML and JSON, validation, and a serialize/parse round trip of what parsed.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for config in [Config::from_toml_str(text), Config::from_json_str(text)]
        .into_iter()
        .flatten()
    {
        let _ = config.validate();
        let _ = Router::new(config, epoch());
    }
}

/// The C API with arbitrary buffers: router creation from arbitrary config text, address
/// parsing and formatting, datagrams, TCP bytes, signaling text, and output polling into
/// buffers of input-chosen sizes (including too small).
pub fn ffi(data: &[u8]) {
    use calls::{calls_address, calls_output};
    use std::ffi::CString;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = CString::new(
        rest.iter()
            .copied()
            .filter(|b| *b != 0)
            .collect::<Vec<u8>>(),
    )
    .unwrap_or_default();
    let mut address = calls_address::from(router_addr());
    let _ = calls::address::calls_address_parse(text.as_ptr(), &mut address);
    let mut small = vec![0 as std::ffi::c_char; usize::from(selector % 64)];
    let mut len = 0usize;
    let _ =
        calls::address::calls_address_format(&address, small.as_mut_ptr(), small.len(), &mut len);
    let _ = calls::result::calls_result_name(u32::from(selector), &mut std::ptr::null());
    let mut worker = 0i32;
    let _ = calls::router::calls_worker_of_datagram(rest.as_ptr(), rest.len(), &mut worker);

    let mut router: *mut calls::calls_router = std::ptr::null_mut();
    let config = if selector & 0x80 != 0 {
        text.clone()
    } else {
        CString::default()
    };
    let created = if selector & 0x40 != 0 {
        calls::router::calls_router_new_toml(config.as_ptr(), 0, &mut router)
    } else {
        calls::router::calls_router_new_json(c"{}".as_ptr(), 0, &mut router)
    };
    if created != calls::calls_result::Ok || router.is_null() {
        return;
    }
    let call = c"fuzz";
    let user = c"u";
    let _ = calls::router::calls_router_join(router, call.as_ptr(), 1, user.as_ptr(), 0xff, 0);
    let source = calls_address::from(peer_addr(selector));
    let destination = calls_address::from(router_addr());
    let mut now_us = 1u64;
    let mut out = calls_output {
        kind: calls::calls_output_kind::Timeout,
        proto: calls::calls_proto::None,
        event: calls::calls_event_kind::Other,
        session: 0,
        conn: 0,
        source,
        destination,
        len: 0,
        timeout_us: 0,
        record: calls::output::calls_record_kind::None,
        recording: 0,
        file: 0,
    };
    let mut buf = vec![0u8; 1 << (selector % 12)];
    for (kind, bytes) in records(rest) {
        now_us += 1000;
        match kind % 6 {
            0 => {
                let _ = calls::router::calls_router_handle_datagram(
                    router,
                    &source,
                    &destination,
                    bytes.as_ptr(),
                    bytes.len(),
                    now_us,
                );
            }
            1 => {
                let _ = calls::router::calls_router_tcp_accepted(router, 7, &source, &destination);
                let _ = calls::router::calls_router_handle_tcp_data(
                    router,
                    7,
                    bytes.as_ptr(),
                    bytes.len(),
                    now_us,
                );
            }
            2 => {
                let json = CString::new(
                    bytes
                        .iter()
                        .copied()
                        .filter(|b| *b != 0)
                        .collect::<Vec<u8>>(),
                )
                .unwrap_or_default();
                let _ = calls::router::calls_router_handle_signal(router, 1, json.as_ptr(), now_us);
            }
            3 => {
                let _ = calls::router::calls_router_handle_timeout(router, now_us);
            }
            4 => {
                let _ =
                    calls::router::calls_router_set_muted(router, 1, bytes.len() % 2 == 0, now_us);
            }
            _ => {
                let _ = calls::router::calls_router_tcp_closed(router, 7);
            }
        }
        // Drain with the chosen buffer; on "too small", grow it and retry.
        for _ in 0..10_000 {
            let r = calls::router::calls_router_poll_output(
                router,
                &mut out,
                buf.as_mut_ptr(),
                buf.len(),
            );
            if r == calls::calls_result::BufferTooSmall {
                buf.resize(buf.len() * 2 + 64, 0);
                continue;
            }
            if r != calls::calls_result::Ok || out.kind == calls::calls_output_kind::Timeout {
                break;
            }
        }
    }
    let mut msg_len = 0usize;
    let _ = calls::result::calls_last_error_message(small.as_mut_ptr(), small.len(), &mut msg_len);
    let _ = calls::router::calls_router_free(router);
}

/// Tracks each session of the `signal_session` fixture publishes now, by (session, mid).
type Published = RefCell<HashMap<(SessionId, String), TrackSource>>;

/// Sessions of the `signal_session` fixture: 1 and 2 take the input's messages, 3 is unknown.
const SIGNAL_SESSIONS: [SessionId; 3] = [SessionId(1), SessionId(2), SessionId(3)];

/// Joins sessions 1 and 2 to call "fuzz", and has session 2 offer [`client_offer`] (so it
/// publishes, and session 1's tracks get offered to it).
fn join_two_and_offer(router: &mut Router, now: Instant) -> Option<Published> {
    for session in &SIGNAL_SESSIONS[..2] {
        if let Err(e) = router.join(CallId::from("fuzz"), *session, "u".into(), Grants::ALL, now) {
            panic!("join refused: {e}");
        }
    }
    let published = Published::default();
    let _ = router.handle_signal(
        SessionId(2),
        ClientMessage::Offer {
            sdp: client_offer().to_owned(),
            screen_mid: None,
        },
        now,
    );
    drain_checked(router, &published);
    Some(published)
}

/// Drains every output, checking what a signaling client and an embedder rely on: every
/// message the router sends serializes to JSON that parses back, and no session ever publishes
/// more tracks of a source than the default limits allow (issue 16, finding 2).
fn drain_checked(router: &mut Router, published: &Published) {
    let config = Config::default();
    let mut tracks = published.borrow_mut();
    for _ in 0..100_000 {
        match router.poll_output() {
            Output::Timeout(_) => return,
            Output::Signal(_, msg) => {
                let json = msg.to_json();
                if let Err(e) = ServerMessage::from_json(&json) {
                    panic!("the router sent a message that does not parse back ({e}): {json}");
                }
            }
            Output::Event(Event::TrackPublished {
                session,
                mid,
                source,
            }) => {
                tracks.insert((session, mid), source);
                let live = tracks
                    .iter()
                    .filter(|((s, _), src)| *s == session && **src == source)
                    .count();
                let max = match source {
                    TrackSource::Microphone => config.max_microphones_per_session,
                    TrackSource::Camera => config.max_cameras_per_session,
                    TrackSource::Screen => config.max_screens_per_session,
                };
                assert!(
                    live <= max,
                    "{session} publishes {live} {source:?} tracks (max {max})"
                );
            }
            Output::Event(Event::TrackUnpublished { session, mid }) => {
                tracks.remove(&(session, mid));
            }
            Output::Event(Event::Left { session, .. }) => {
                tracks.retain(|(s, _), _| *s != session);
            }
            _ => {}
        }
    }
    panic!("poll_output never reached Timeout");
}

/// The signaling surface as the reference server drives it: a stream of WebSocket text frames
/// (records: `[selector, len_hi, len_lo, text...]`) for two sessions of one call and an
/// unknown one, each through the same envelope as `calls-server`'s socket loop: frames over
/// the server's 256 KiB limit are refused unread, `{"type":"leave"}` in any spelling leaves,
/// everything else goes to `handle_signal_json`. A session that left joins again when a
/// later frame's selector asks for it. Invariants: see `drain_checked`.
pub fn signal_session(data: &[u8]) {
    with_fixture(
        &SIGNAL_SESSION,
        join_two_and_offer,
        |router, now, published| {
            for (selector, bytes) in records(data) {
                *now += Duration::from_millis(u64::from(selector >> 3));
                let session = SIGNAL_SESSIONS[usize::from(selector & 0x03) % 3];
                let Ok(text) = std::str::from_utf8(bytes) else {
                    continue;
                };
                if text.len() > SERVER_FRAME_LIMIT {
                    continue;
                }
                if selector & 0x04 != 0 && session != SessionId(3) {
                    // Join again if it left (the server's resume-less reconnect).
                    let _ =
                        router.join(CallId::from("fuzz"), session, "u".into(), Grants::ALL, *now);
                    drain_checked(router, published);
                }
                if is_leave(text) {
                    let _ = router.leave(session, *now);
                } else {
                    let _ = router.handle_signal_json(session, text, *now);
                }
                drain_checked(router, published);
            }
            *now += Duration::from_secs(1);
            router.handle_timeout(*now);
            drain_checked(router, published);
        },
    );
}

/// The reference server's WebSocket message limit (`ws_max_message_bytes` default).
const SERVER_FRAME_LIMIT: usize = 256 * 1024;

/// The server's leave test: `{"type":"leave"}` in any JSON spelling.
fn is_leave(text: &str) -> bool {
    text.contains("leave")
        && serde_json::from_str::<serde_json::Value>(text)
            .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("leave"))
}

/// RTP payloads after decryption, as the forwarding path parses them: every video payload
/// parser (VP8/VP9/H.264/AV1 keyframe detection, VP8 and VP9 temporal-layer descriptors, the
/// VP8 descriptor and the picture-id munger across layer switches and dropped pictures), and
/// RFC 6464 audio levels into the active-speaker detector. Records
/// `[selector, len_hi, len_lo, payload...]`: the selector's low bits pick what to do with the
/// payload. Invariants: temporal ids fit their 3 bits (VP9) or 2 bits (VP8), picture ids
/// 15 bits, and the speaker detector's top-N never exceeds N nor names a session that left.
pub fn rtp_payload(data: &[u8]) {
    use calls_core::fuzzing::{parse_video_payload, SpeakerDetector, Vp8Munger};
    let Some((&top_n, rest)) = data.split_first() else {
        return;
    };
    let top_n = usize::from(top_n % 5);
    let mut speakers = SpeakerDetector::new(top_n);
    let mut munger = Vp8Munger::default();
    let mut removed = Vec::new();
    let mut now = epoch();
    for (selector, payload) in records(rest) {
        now += Duration::from_millis(u64::from(selector >> 3) * 10);
        match selector & 0x07 {
            0..=2 => {
                let facts = parse_video_payload(payload);
                if let Some(tid) = facts.vp8_temporal.0 {
                    assert!(tid < 4, "VP8 TID {tid}");
                }
                if let Some(tid) = facts.vp9_temporal.0 {
                    assert!(tid < 8, "VP9 TID {tid}");
                }
                if let Some((Some(picture_id), _)) = facts.vp8_descriptor {
                    assert!(picture_id <= 0x7fff, "VP8 picture id {picture_id}");
                }
                match selector & 0x07 {
                    1 => munger.switch_layer(),
                    2 => munger.dropped_picture(),
                    _ => {}
                }
                let _ = munger.patch(payload);
            }
            3 => {
                // Audio levels: each byte pair is (session, level); VAD from the selector.
                for pair in payload.chunks(2) {
                    let session = u64::from(pair[0] % 8);
                    let level = pair.get(1).map_or(-127, |b| *b as i8);
                    let vad = (selector & 0x08 != 0).then_some(level > -40);
                    speakers.observe(session, level, vad, now);
                    removed.retain(|s| *s != session);
                }
            }
            4 => {
                if let Some(&b) = payload.first() {
                    // Muting or unmuting makes a session a publisher again (as a re-join would).
                    let session = u64::from(b % 8);
                    speakers.set_muted(session, b & 0x80 != 0, now);
                    removed.retain(|s| *s != session);
                }
            }
            5 => {
                if let Some(&b) = payload.first() {
                    let session = u64::from(b % 8);
                    speakers.remove(session);
                    removed.push(session);
                }
            }
            _ => {
                let _ = speakers.tick(now);
                let top = speakers.top();
                assert!(top.len() <= top_n, "top {top:?} exceeds {top_n}");
                for s in top.iter().chain(speakers.active().as_ref()) {
                    assert!(!removed.contains(s), "session {s} left but is still ranked");
                }
                let _ = speakers.is_forwarded(u64::from(selector % 8), now);
            }
        }
    }
}

/// RFC 2198 RED payloads (and the Opus FEC flag reader): arbitrary bytes never panic, an
/// accepted packet's primary block is non-empty and inside it, and where str0m's own RED
/// decoder (an independent reader) also accepts the packet, both find the same primary block.
pub fn red_payload(data: &[u8]) {
    use calls_core::fuzzing::{opus_has_fec, red_primary, MAX_RED_BLOCKS};
    use calls_core::str0m::rtp::RedDecoder;
    let _ = opus_has_fec(data);
    let Some((pt, offset, redundant)) = red_primary(data) else {
        return;
    };
    assert!(pt < 128, "payload type {pt}");
    assert!(offset < data.len(), "primary at {offset} of {}", data.len());
    assert!(redundant <= MAX_RED_BLOCKS, "{redundant} redundant blocks");
    let _ = opus_has_fec(&data[offset..]);
    if let Ok(blocks) = RedDecoder::decode(data) {
        let theirs = blocks.iter().find(|b| b.is_primary).map(|b| b.payload);
        assert_eq!(theirs, Some(&data[offset..]), "str0m finds another primary");
        assert_eq!(blocks.len(), redundant + 1);
    }
}

/// Relay frames (`calls_core::relay`, issue 14): the whole input through `Frame::decode`,
/// which must never panic, and a frame it accepts must encode back to exactly the input (the
/// format is canonical: nothing is lost or invented in decoding). Then the input as records,
/// each a frame on one of a router's two relay links (one of them open for the fixture's
/// call) via `Router::handle_relay`: nothing may panic and the outputs must drain.
pub fn relay_frames(data: &[u8]) {
    use calls_core::relay::Frame;
    if let Ok(frame) = Frame::decode(data) {
        let encoded = frame.encode();
        assert_eq!(encoded, data, "{frame:?} encodes differently");
    }
    with_fixture(&RELAY_FRAMES, join_and_open_link, |router, now, ()| {
        for (selector, bytes) in records(data) {
            *now += Duration::from_millis(u64::from(selector >> 4));
            if let Ok(frame) = Frame::decode(bytes) {
                assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
            }
            let link = calls_core::LinkId(u64::from(selector & 1) + 1);
            router.handle_relay(link, bytes, *now);
            drain(router);
        }
        *now += DATAGRAM_TIMERS;
        router.handle_timeout(*now);
        drain(router);
    });
}

/// Joins session 1 to call "fuzz" and opens relay link 1 for it (link 2 stays unknown).
fn join_and_open_link(router: &mut Router, now: Instant) -> Option<()> {
    join_session(router, now)?;
    if let Err(e) = router.relay_open(CallId::from("fuzz"), calls_core::LinkId(1), now) {
        panic!("relay_open refused: {e}");
    }
    drain(router);
    Some(())
}
