//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/*`) through the same bodies the
//! fuzz targets run (`calls_benches::fuzz_bodies`), on stable, as a normal test.
//!
//! `regenerate_seed_corpora` (ignored) rewrites the seeds from the simulation harness:
//! `cargo test -p calls-benches --test fuzz_corpus -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use calls_benches::fuzz_bodies::{client_offer, reset_fixtures, TARGETS};
use calls_core::sim::{PeerOptions, SimWorld};
use calls_core::ClientMessage;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_corpus_input_replays_cleanly() {
    let mut total = 0;
    for (name, body) in TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {name}");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            // Each file on its own, as `cargo fuzz run <target> <file>` runs it: the targets
            // that share a router between inputs start from a fresh one.
            reset_fixtures();
            body(&data);
            total += 1;
        }
    }
    eprintln!("replayed {total} corpus inputs");
}

/// The fuzz targets share a router between consecutive inputs (`fuzz_bodies` module docs):
/// every corpus, twice over without a reset, goes through that path too (the second pass meets
/// the state the first left).
#[test]
fn every_corpus_replays_through_a_shared_fixture() {
    for (name, body) in TARGETS {
        let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(name))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        reset_fixtures();
        for file in files.iter().chain(&files) {
            body(&std::fs::read(file).unwrap());
        }
    }
}

/// `[selector, len_hi, len_lo, bytes...]`, the record format of the datagram/stun/ffi bodies.
fn record(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(&(bytes.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

#[test]
#[ignore = "rewrites fuzz/corpus seeds; run by hand"]
fn regenerate_seed_corpora() {
    // Real datagrams: a peer's STUN, DTLS and SRTP/SRTCP from the simulated call.
    let mut world = SimWorld::new(3, Instant::now());
    let a = world.add_peer("c", "a", PeerOptions::default());
    let addr = world.peer(a).addr();
    world.capture_from(addr, 400);
    let _b = world.add_peer("c", "b", PeerOptions::audio_only());
    world.run_for(Duration::from_secs(2));
    let captured: Vec<Vec<u8>> = world.captured().to_vec();
    assert!(captured.len() > 20, "captured {}", captured.len());
    let pick = |first: std::ops::RangeInclusive<u8>| {
        captured
            .iter()
            .filter(|d| d.first().is_some_and(|b| first.contains(b)))
            .take(6)
            .cloned()
            .collect::<Vec<_>>()
    };
    let stun = pick(0..=3);
    let dtls = pick(20..=63);
    let rtp = pick(128..=191);
    for (i, d) in stun.iter().chain(&dtls).chain(&rtp).enumerate() {
        write("datagram", &format!("real-{i:02}"), &record(0x01, d));
        write("ffi", &format!("datagram-{i:02}"), &{
            let mut v = vec![0x00];
            v.extend(record(0, d));
            v
        });
        // RFC 4571 framing of the same datagram.
        let mut framed = vec![(i as u8).wrapping_mul(37) | 1];
        framed.extend_from_slice(&(d.len() as u16).to_be_bytes());
        framed.extend_from_slice(d);
        write("tcp_frames", &format!("real-{i:02}"), &framed);
    }
    let mut sequence = Vec::new();
    for d in stun.iter().chain(&dtls).chain(&rtp) {
        sequence.extend(record(0x11, d));
    }
    write("datagram", "real-sequence", &sequence);
    let mut framed_stream = vec![5u8];
    for d in stun.iter().chain(&rtp) {
        framed_stream.extend_from_slice(&(d.len() as u16).to_be_bytes());
        framed_stream.extend_from_slice(d);
    }
    write("tcp_frames", "real-stream", &framed_stream);

    // STUN admission: good credentials, wrong password, tampered, raw.
    for (i, selector) in [0x00u8, 0x02, 0x0a, 0x01, 0x04, 0x42, 0x10]
        .iter()
        .enumerate()
    {
        write(
            "stun",
            &format!("sel-{i:02}"),
            &record(*selector, &[0, 0, 0, 100, 7, 1]),
        );
    }
    if let Some(d) = stun.first() {
        write("stun", "raw-real", &record(0x10, d));
    }

    // Signaling: every message kind, with a real offer.
    let offer = client_offer().to_owned();
    let messages = [
        ClientMessage::Offer {
            sdp: offer.clone(),
            screen_mid: Some("1".into()),
        },
        ClientMessage::Answer { sdp: offer.clone() },
        ClientMessage::Candidate {
            candidate: "candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host".into(),
        },
        ClientMessage::Mute,
        ClientMessage::Unmute,
        ClientMessage::ScreenOn { mid: "1".into() },
        ClientMessage::ScreenOff,
    ];
    for (i, m) in messages.iter().enumerate() {
        write(
            "signal_json",
            &format!("msg-{i:02}"),
            m.to_json().as_bytes(),
        );
        write("ffi", &format!("signal-{i:02}"), &{
            let mut v = vec![0x05];
            v.extend(record(2, m.to_json().as_bytes()));
            v
        });
    }
    write("sdp_offer", "str0m-offer", offer.as_bytes());
    write(
        "sdp_offer",
        "str0m-offer-crlf-stripped",
        offer.replace("\r\n", "\n").as_bytes(),
    );

    // Rewriter: audio and video sequences with loss, reorder, epochs and a reused line.
    write(
        "rewriter",
        "audio",
        &[0, 0, 1, 0, 20, 0, 1, 0, 20, 0, 2, 0, 20, 0, 255, 0, 20],
    );
    write(
        "rewriter",
        "video-keyframe-epoch",
        &[
            1, 0, 1, 0, 33, 0x10, 1, 0, 33, 0, 1, 0, 33, 0x20, 1, 0, 33, 0x10, 1, 0, 33,
        ],
    );
    write(
        "rewriter",
        "reused-line",
        &[0, 0, 1, 0, 20, 0x60, 1, 0, 20, 0, 1, 0, 20],
    );

    // Config: the defaults as TOML and JSON, and a typical override.
    write("config", "empty-toml", b"");
    write("config", "json-empty", b"{}");
    write(
        "config",
        "overrides-toml",
        b"udp_port = 8443\nbind_address = \"0.0.0.0\"\nice_host_override = [\"203.0.113.7\"]\nice_port_override = 443\n",
    );
    write(
        "ffi",
        "toml-config",
        b"\xc0udp_port = 9000\nbind_address = \"127.0.0.1\"\n",
    );
    write("ffi", "address", b"\x07192.0.2.1:5000");

    // Signaling sessions: every message kind from session 1 (after session 2's offer), a
    // leave and a re-join, an unknown session, and an offer beyond the track limits.
    let mut frames = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        frames.extend(record((i as u8) << 3, m.to_json().as_bytes()));
    }
    write("signal_session", "every-kind", &frames);
    let mut leave_and_rejoin = record(0x01, br#"{"type": "leave"}"#);
    leave_and_rejoin.extend(record(0x05, messages[0].to_json().as_bytes()));
    leave_and_rejoin.extend(record(0x02, br#"{"type":"mute"}"#));
    write("signal_session", "leave-rejoin-unknown", &leave_and_rejoin);
    let two_mics = offer.replacen(
        "m=audio",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:x\r\na=sendrecv\r\nm=audio",
        1,
    );
    let too_many = ClientMessage::Offer {
        sdp: two_mics,
        screen_mid: None,
    };
    write(
        "signal_session",
        "offer-beyond-limits",
        &record(0x01, too_many.to_json().as_bytes()),
    );

    // RTP payloads: VP8 with picture id and temporal layer (keyframe start), VP9 with layer
    // indices, an AV1 aggregation header starting a sequence, an H.264 IDR, audio levels.
    let vp8_key = [
        0x90, 0xe0, 0x80, 0x01, 0x05, 0x40, 0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a,
    ];
    let vp9_key = [0xaa, 0x80, 0x01, 0x00, 0x05, 0x00, 0x00];
    let av1_key = [0x18, 0x0a, 0x0b, 0x00, 0x00, 0x00];
    let h264_idr = [0x65, 0x88, 0x84, 0x00];
    let mut payloads = vec![3u8];
    for (selector, payload) in [
        (0x00u8, &vp8_key[..]),
        (0x09, &vp8_key[..]),
        (0x12, &vp8_key[..]),
        (0x00, &vp9_key[..]),
        (0x00, &av1_key[..]),
        (0x00, &h264_idr[..]),
        (0x0b, &[1, 0xe0, 2, 0xd8, 3, 0x81][..]),
        (0x13, &[1, 0xf0, 2, 0x90][..]),
        (0x07, &[][..]),
        (0x04, &[0x82][..]),
        (0x0d, &[0x02][..]),
        (0x0f, &[][..]),
    ] {
        payloads.extend(record(selector, payload));
    }
    write("rtp_payload", "every-parser", &payloads);
}

/// Seeds for `relay_frames` (issue 14): real frames a router puts on a relay link — members,
/// tracks, Opus and VP8 simulcast media, levels, keepalives — one frame per file (the
/// `Frame::decode` path), and records files with a link's opening frames in order (the
/// router path). `cargo test -p calls-benches --test fuzz_corpus regenerate_relay_seeds --
/// --ignored`.
#[test]
#[ignore]
fn regenerate_relay_seeds() {
    use calls_core::relay::{Frame, LinkId};
    let mut world = SimWorld::new(14, Instant::now());
    world.add_peer("fuzz", "alice", PeerOptions::default().with_simulcast());
    world.relay_open("fuzz", LinkId(1)).unwrap();
    world.run_for(Duration::from_secs(2));
    let frames = world.take_relay_out();
    assert!(frames.len() > 100, "only {} frames", frames.len());
    let dir = corpus_dir("relay_frames");
    std::fs::create_dir_all(&dir).unwrap();
    let mut kinds_seen = std::collections::BTreeMap::new();
    for (_, bytes) in &frames {
        let kind = bytes[2];
        let n = kinds_seen.entry(kind).or_insert(0);
        if *n < 3 {
            *n += 1;
            std::fs::write(dir.join(format!("frame-type{kind}-{n}")), bytes).unwrap();
        }
    }
    let mut records = Vec::new();
    for (_, bytes) in frames.iter().take(40) {
        records.push(0u8); // link 1, no time step
        records.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        records.extend_from_slice(bytes);
    }
    std::fs::write(dir.join("records-link-opening"), &records).unwrap();
    let feedback = [
        Frame::KeyframeRequest {
            track: 1,
            rid: None,
        },
        Frame::Nack {
            track: 1,
            rid: None,
            seq: 1,
            bitmask: 0b11,
        },
        Frame::Keepalive,
    ];
    for (i, frame) in feedback.iter().enumerate() {
        std::fs::write(dir.join(format!("feedback-{i}")), frame.encode()).unwrap();
    }
}
