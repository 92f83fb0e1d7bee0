//! Recorder unit tests: start offsets from sender reports, outputs in order, bad input.

#![allow(clippy::disallowed_methods)] // a base instant for virtual time

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::Mid;

use super::*;

fn key(publisher: u64, mid: &str) -> TrackKey {
    TrackKey {
        publisher: SessionId(publisher),
        mid: Mid::from(mid),
    }
}

fn summaries(out: &VecDeque<RecordOutput>) -> Vec<FileSummary> {
    out.iter()
        .filter_map(|o| match o {
            RecordOutput::FileFinished { summary, .. } => Some(summary.clone()),
            _ => None,
        })
        .collect()
}

/// Audio arrives 50 ms after capture, video 150 ms after (a keyframe is big and paced). The
/// sender reports say the video's first frame was captured 200 ms after the audio's first
/// packet: the files' start offsets say so too (arrival would have said 300 ms).
#[test]
fn start_offsets_follow_sender_reports() {
    let t0 = Instant::now();
    let mut recorder = Recorder::new(CallId::from("c"), RecordingOptions::everyone(), t0);
    let (audio, video) = (key(1, "0"), key(1, "1"));
    recorder.add_track(audio, UserId::from("alice"), TrackSource::Microphone);
    recorder.add_track(video, UserId::from("alice"), TrackSource::Camera);
    let mut out = VecDeque::new();
    let opus: Arc<[u8]> = Arc::from(&[0x78u8, 1, 2, 3][..]);
    let audio_sr = SenderClock {
        ntp_secs: 1000.0,
        rtp: 7000,
    };
    let video_sr = SenderClock {
        ntp_secs: 1000.2,
        rtp: 90_000,
    };
    for i in 0..100u32 {
        let packet = RecPacket {
            seq: 100 + u64::from(i),
            timestamp: 7000 + 960 * i,
            marker: false,
            payload: &opus,
            offset: 0,
            keyframe: false,
            rid: None,
            sender: Some(audio_sr),
            arrival: t0 + Duration::from_millis(50 + 20 * u64::from(i)),
        };
        recorder.on_packet(audio, RecCodec::Opus, None, packet, &mut out);
    }
    for j in 0..30u32 {
        let keyframe = j == 0;
        let frame: Arc<[u8]> = Arc::from(&[0x10u8, if keyframe { 0 } else { 1 }, 0, 0][..]);
        let packet = RecPacket {
            seq: 500 + u64::from(j),
            timestamp: 90_000 + 3000 * j,
            marker: true,
            payload: &frame,
            offset: 0,
            keyframe,
            rid: None,
            sender: Some(video_sr),
            arrival: t0 + Duration::from_millis(350 + 33 * u64::from(j)),
        };
        recorder.on_packet(video, RecCodec::Vp8, None, packet, &mut out);
    }
    recorder.stop(t0 + Duration::from_secs(2), &mut out);
    let files = summaries(&out);
    assert_eq!(files.len(), 2, "{out:?}");
    assert_eq!(files[0].sync, SyncSource::SenderReport);
    assert_eq!(files[0].start_offset_ms, 50);
    assert_eq!(files[1].sync, SyncSource::SenderReport);
    assert_eq!(files[1].start_offset_ms, 250);
    assert_eq!(files[1].frames, 30);
    assert!(matches!(out.back(), Some(RecordOutput::Stopped { .. })));
}

/// Garbage payloads (empty, cut descriptors, absurd TOCs) are dropped, never a panic.
#[test]
fn malformed_payloads_are_dropped() {
    let t0 = Instant::now();
    let mut recorder = Recorder::new(CallId::from("c"), RecordingOptions::everyone(), t0);
    let (audio, video) = (key(1, "0"), key(1, "1"));
    recorder.add_track(audio, UserId::from("a"), TrackSource::Microphone);
    recorder.add_track(video, UserId::from("a"), TrackSource::Camera);
    let mut out = VecDeque::new();
    let payloads: [&[u8]; 5] = [&[], &[0xFF], &[0x03], &[0x90, 0x80], &[0x80, 0xFF, 0xFF]];
    for (i, bytes) in payloads.iter().enumerate() {
        let payload: Arc<[u8]> = Arc::from(*bytes);
        for (k, codec) in [(audio, RecCodec::Opus), (video, RecCodec::Vp8)] {
            let packet = RecPacket {
                seq: i as u64,
                timestamp: (i as u32).wrapping_mul(0x9000_0000),
                marker: true,
                payload: &payload,
                offset: 0,
                keyframe: true,
                rid: None,
                sender: None,
                arrival: t0 + Duration::from_millis(i as u64),
            };
            recorder.on_packet(k, codec, None, packet, &mut out);
        }
    }
    recorder.stop(t0 + Duration::from_secs(1), &mut out);
    assert_eq!(summaries(&out).len(), 2);
}

/// A simulcast switch whose sender reports disagree with the arrivals by hours (a stale or
/// foreign report) continues the file by arrival: the timeline never jumps.
#[test]
fn a_layer_switch_with_contradicting_sender_reports_continues_by_arrival() {
    let t0 = Instant::now();
    let report = |ntp_secs: f64, rtp: u32| SenderClock { ntp_secs, rtp };
    let mut timeline = Timeline::new(VIDEO_CLOCK);
    assert_eq!(timeline.place(1000, t0, Some(report(100.0, 1000))), 0);
    let ms50 = Duration::from_millis(50);
    assert_eq!(timeline.place(1000 + 4500, t0 + ms50, None), 4500);
    // The new layer's report puts its frame 10,000 s later; it arrived 50 ms later.
    timeline.rebase = true;
    let pos = timeline.place(77, t0 + 2 * ms50, Some(report(10_100.0, 77)));
    assert_eq!(pos, 9000, "continued by arrival");
    // Consistent reports are believed (they beat arrival jitter): 40 ms by the clocks.
    timeline.rebase = true;
    let pos = timeline.place(500, t0 + 3 * ms50, Some(report(10_100.04, 500)));
    assert_eq!(pos, 9000 + 3600);
}

/// The recorded simulcast layer stops while the router still counts it as sent (it waits a
/// second before it says so): after [`RECORDED_LAYER_STALL`] the recording asks the layer
/// still flowing for a keyframe and continues on it, instead of losing that second.
#[test]
fn a_stalled_layer_is_replaced_by_a_flowing_one_at_its_keyframe() {
    let t0 = Instant::now();
    let mut recorder = Recorder::new(CallId::from("c"), RecordingOptions::everyone(), t0);
    let video = key(1, "1");
    recorder.add_track(video, UserId::from("a"), TrackSource::Camera);
    let mut out = VecDeque::new();
    let (f, q) = (Rid::from("f"), Rid::from("q"));
    let keyframe: Arc<[u8]> = Arc::from(&[0x10u8, 0, 0, 0][..]);
    let delta: Arc<[u8]> = Arc::from(&[0x10u8, 1, 0, 0][..]);
    let mut requested = Vec::new();
    for i in 0..30u32 {
        let at = t0 + Duration::from_millis(50 * u64::from(i));
        // `f` sends frames 0..10 (0 a keyframe) and stops; `q` sends all along, a keyframe
        // only at frame 16 (800 ms), after the stall was noticed and a keyframe asked for.
        let layers = [(f, i < 10, i == 0, 1000u64), (q, true, i == 16, 5000)];
        for (rid, sends, is_key, seq0) in layers {
            if !sends {
                continue;
            }
            let packet = RecPacket {
                seq: seq0 + u64::from(i),
                timestamp: 3000 * i,
                marker: true,
                payload: if is_key { &keyframe } else { &delta },
                offset: 0,
                keyframe: is_key,
                rid: Some(rid),
                sender: None,
                arrival: at,
            };
            if let Some(wanted) =
                recorder.on_packet(video, RecCodec::Vp8, Some(f), packet, &mut out)
            {
                requested.push((i, wanted));
            }
        }
    }
    recorder.stop(t0 + Duration::from_millis(1500), &mut out);
    let files = summaries(&out);
    assert_eq!(files.len(), 1, "{out:?}");
    assert_eq!(files[0].layer_switches, 1);
    // f's 10 frames, then q's from its keyframe (16..30): nothing lost but the stall.
    assert_eq!(files[0].frames, 10 + 14);
    assert!(
        requested
            .iter()
            .any(|(i, r)| *r == Some(q) && (14..16).contains(i)),
        "a keyframe of q asked for once f stalled: {requested:?}"
    );
}
