//! `calls-server` spreads one call over its workers (issue 14, part 2): with
//! `CALLS_CALL_SPREAD_AFTER=1` and two workers, the participants of one call land on both, and
//! the workers relay the publishers' tracks to each other in-process. Real str0m participants
//! on loopback (UDP media to the one media port, WebSocket signaling) must receive each other's
//! microphone and camera whichever worker they are on, and `/metrics` shows each worker's share.
#![allow(clippy::unwrap_used)]
// A real server process on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

#[path = "common/server.rs"]
mod server;

use std::time::Duration;

use calls_core::TrackSource;
use server::{metric, received, request, run_until, Server, WsParticipant, ADMIN_KEY};

#[test]
fn one_call_spans_two_workers_and_everyone_gets_everyone() {
    let (http, admin, media) = (18_461, 18_462, 18_463);
    // Two workers, and every call spread from its first participant on.
    let server = Server::start(
        http,
        admin,
        media,
        "2",
        &[
            ("CALLS_CALL_SPREAD_AFTER", "1"),
            ("CALLS_MEDIA_BIND", "127.0.0.1"),
        ],
    );
    let mut people: Vec<WsParticipant> = ["alice", "bob", "carol"]
        .iter()
        .enumerate()
        .map(|(i, user)| WsParticipant::join(http, "big", user, None, 40 + i as u64))
        .collect();
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
    let mut all: Vec<&mut WsParticipant> = people.iter_mut().collect();
    let done = run_until(&mut all, Duration::from_secs(20), everyone_gets_everyone);
    let report: Vec<String> = people
        .iter()
        .flat_map(|rx| {
            people.iter().map(move |tx| {
                format!(
                    "{} ← {}: mic {} cam {}",
                    rx.session(),
                    tx.session(),
                    received(rx, tx, TrackSource::Microphone),
                    received(rx, tx, TrackSource::Camera)
                )
            })
        })
        .collect();
    let (_, calls) = request(admin, "GET", "/api/calls", Some(ADMIN_KEY)).unwrap();
    let (_, metrics) = request(http, "GET", "/metrics", None).unwrap();
    drop(server);
    assert!(
        done,
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
