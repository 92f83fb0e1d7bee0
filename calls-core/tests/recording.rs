//! Recording on the deterministic simulated network: real str0m peers publish Opus and VP8
//! (also as simulcast), the router records the call, and every test parses the files it
//! produced (Ogg pages and their granule positions, IVF frames and their timestamps and
//! keyframe flags) — the bytes an embedder would have written to disk.

// The wall clock is read exactly once, for the virtual epoch; everything else is virtual time.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{epoch, secs};

use std::io::Cursor;

use calls_core::record::{Container, RecordingOptions, SyncSource};
use calls_core::sim::{PeerOptions, SimRecordedFile, SimWorld};
use calls_core::{Grants, ServerMessage, SessionId, TrackSource};

const MIC: TrackSource = TrackSource::Microphone;
const CAM: TrackSource = TrackSource::Camera;

/// One Opus packet of an Ogg/Opus file: its bytes, and the granule position of the page it
/// ended on when it was the last on that page.
struct OggPacket {
    data: Vec<u8>,
    page_granule: Option<u64>,
}

/// Parses an Ogg/Opus file: checks the two header packets, returns the audio packets.
fn ogg_packets(bytes: &[u8]) -> Vec<OggPacket> {
    let mut reader = ogg::PacketReader::new(Cursor::new(bytes.to_vec()));
    let head = reader.read_packet_expected().unwrap();
    assert!(head.data.starts_with(b"OpusHead"), "no OpusHead");
    assert!(head.first_in_stream());
    let tags = reader.read_packet_expected().unwrap();
    assert!(tags.data.starts_with(b"OpusTags"), "no OpusTags");
    let mut packets = Vec::new();
    while let Some(p) = reader.read_packet().unwrap() {
        let page_granule = p.last_in_page().then(|| p.absgp_page());
        packets.push(OggPacket {
            data: p.data,
            page_granule,
        });
    }
    packets
}

/// 48 kHz samples of an Opus packet (RFC 6716 §3.1), independent of the recorder's code.
fn opus_samples(packet: &[u8]) -> u64 {
    let toc = packet[0];
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u64::from(packet[1] & 0x3f),
    };
    frame * frames
}

/// A silent CELT frame (what the recorder writes into gaps).
fn is_silence(packet: &[u8]) -> bool {
    packet.len() >= 3 && packet[0] >> 3 >= 28 && packet.ends_with(&[0xFF, 0xFE])
}

/// One frame of an IVF file.
#[derive(Debug)]
struct IvfFrame {
    pts: u64,
    keyframe: bool,
    /// The synthetic encoder's spatial layer index (its last byte).
    layer: u8,
}

/// IVF ticks per second (the recorder writes hundredths: docs/recording.md).
const IVF_RATE: u64 = 100;

/// Parses an IVF file: checks the header (VP8, 1/100), returns the frames with their
/// timestamps in 90 kHz ticks (to the IVF's 10 ms).
fn ivf_frames(bytes: &[u8]) -> Vec<IvfFrame> {
    assert!(bytes.len() >= 32, "no IVF header");
    assert_eq!(&bytes[..4], b"DKIF");
    assert_eq!(&bytes[8..12], b"VP80");
    let timebase = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    assert_eq!(u64::from(timebase), IVF_RATE);
    let mut frames = Vec::new();
    let mut at = 32;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let pts =
            u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap()) * (90_000 / IVF_RATE);
        let frame = &bytes[at + 12..at + 12 + len];
        frames.push(IvfFrame {
            pts,
            // RFC 6386 §9.1: bit 0 of the frame tag is 0 for a keyframe.
            keyframe: frame[0] & 0x01 == 0,
            layer: frame[len - 1],
        });
        at += 12 + len;
    }
    frames
}

fn file_of(world: &SimWorld, session: SessionId, source: TrackSource) -> &SimRecordedFile {
    world
        .recorded_files()
        .iter()
        .find(|f| f.file.session == session && f.file.source == source)
        .unwrap_or_else(|| panic!("no {source:?} file of {session}: {:?}", world.record_log()))
}

fn recording_messages(world: &SimWorld, session: SessionId) -> Vec<(bool, bool)> {
    world
        .peer(session)
        .signal_log()
        .filter_map(|m| match m {
            ServerMessage::Recording { active, recorded } => Some((*active, *recorded)),
            _ => None,
        })
        .collect()
}

/// The camera sends keyframes only every 10 s; the recording starts between two. The file
/// must start with a keyframe (the router asked for one at once), not wait 10 s, and hold
/// every frame after it at 30 fps with timestamps that keep time.
#[test]
fn recording_starts_at_a_keyframe() {
    let mut world = SimWorld::new(11, epoch());
    let alice = world.add_peer(
        "room",
        "alice",
        PeerOptions::default().keyframe_interval(secs(10.0)),
    );
    let bob = world.add_peer("room", "bob", PeerOptions::audio_only());
    world.run_for(secs(3.0));
    let requests_before = world.peer(alice).sent(CAM).keyframe_requests;
    world
        .start_recording("room", RecordingOptions::everyone())
        .unwrap();
    world.run_for(secs(4.0));
    world.stop_recording("room").unwrap();

    assert!(world.peer(alice).sent(CAM).keyframe_requests > requests_before);
    let cam = file_of(&world, alice, CAM);
    assert_eq!(cam.file.container, Container::Ivf);
    let frames = ivf_frames(&cam.bytes);
    assert!(frames[0].keyframe, "the first frame is no keyframe");
    assert_eq!(frames[0].pts, 0);
    // Started at once (not at the next natural keyframe, 7 s later), and 30 fps from then.
    let summary = cam.summary.as_ref().unwrap();
    assert!(summary.start_offset_ms < 300, "{summary:?}");
    let expected = 4.0 * 30.0;
    assert!(
        (frames.len() as f64 - expected).abs() < expected * 0.05,
        "{} frames",
        frames.len()
    );
    assert!(frames.windows(2).all(|w| w[1].pts > w[0].pts));
    let last = frames.last().unwrap().pts as f64 / 90_000.0;
    assert!((last - 4.0).abs() < 0.2, "last frame at {last} s");
    assert_eq!(summary.frames, frames.len() as u64);
    assert_eq!(summary.bytes, cam.bytes.len() as u64);
    // Bob's microphone is in it too; nobody else's camera.
    file_of(&world, bob, MIC);
    assert_eq!(world.recorded_files().len(), 3);
    let m = world.metrics();
    assert_eq!(m.recording_files, 3);
    assert_eq!(
        m.recording_bytes,
        world
            .recorded_files()
            .iter()
            .map(|f| f.bytes.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(m.recorders, 0);
}

/// Alice talks 2 s, mutes for 3 s (the router forwards and records nothing), talks 2 s more.
/// The Ogg file lasts the whole 7 s: the mute is 3 s of silent Opus frames, and the granule
/// positions count every sample with no jump.
#[test]
fn recording_fills_mute_gaps_with_silence() {
    let mut world = SimWorld::new(12, epoch());
    let alice = world.add_peer("room", "alice", PeerOptions::audio_only());
    world.add_peer("room", "bob", PeerOptions::audio_only());
    world.run_for(secs(2.0));
    world
        .start_recording("room", RecordingOptions::everyone())
        .unwrap();
    assert!(world.router().is_recording(&"room".into()));
    world.run_for(secs(2.0));
    world.set_muted(alice, true);
    world.run_for(secs(3.0));
    world.set_muted(alice, false);
    world.run_for(secs(2.0));
    world.stop_recording("room").unwrap();

    let mic = file_of(&world, alice, MIC);
    let packets = ogg_packets(&mic.bytes);
    let mut samples = 0;
    let mut silence = 0;
    for p in &packets {
        samples += opus_samples(&p.data);
        if is_silence(&p.data) {
            silence += opus_samples(&p.data);
        }
        // Every page's granule is the sum of what came before: no jump, no compression.
        if let Some(granule) = p.page_granule {
            assert_eq!(granule, samples, "a page's granule skips");
        }
    }
    let seconds = samples as f64 / 48_000.0;
    assert!((seconds - 7.0).abs() < 0.1, "{seconds} s recorded");
    let silent = silence as f64 / 48_000.0;
    assert!((silent - 3.0).abs() < 0.1, "{silent} s of silence");
    // The talking parts are Alice's own packets (the simulator's hybrid 20 ms frames).
    let talk = packets.iter().filter(|p| p.data[0] == 0x78).count();
    assert!((talk as i64 - 200).abs() <= 5, "{talk} packets of speech");
    let summary = mic.summary.as_ref().unwrap();
    assert!(
        (summary.duration_ms as i64 - 7000).abs() < 100,
        "{summary:?}"
    );
    assert!(
        (summary.silence_ms as i64 - 3000).abs() < 100,
        "{summary:?}"
    );
}

/// Alice sends three simulcast layers and the recording takes the top one. Then her top
/// layer stops (as a browser drops it when its uplink shrinks): the recording continues on the
/// middle layer from one of its keyframes, with timestamps that keep counting real time.
#[test]
fn recording_survives_a_layer_switch() {
    let mut world = SimWorld::new(13, epoch());
    let alice = world.add_peer("room", "alice", PeerOptions::default().with_simulcast());
    world.add_peer("room", "bob", PeerOptions::audio_only());
    world.run_for(secs(2.0));
    world
        .start_recording("room", RecordingOptions::everyone())
        .unwrap();
    world.run_for(secs(3.0));
    // The publisher stops its top layer by itself.
    world.peer_mut(alice).suspend_layer(CAM, "f", true);
    world.run_for(secs(3.0));
    world.stop_recording("room").unwrap();

    let cam = file_of(&world, alice, CAM);
    let frames = ivf_frames(&cam.bytes);
    assert!(frames[0].keyframe);
    assert_eq!(frames[0].layer, 2, "not the top layer first");
    let switch = frames
        .iter()
        .position(|f| f.layer != 2)
        .unwrap_or_else(|| panic!("no switch: {:?}", cam.summary));
    assert_eq!(frames[switch].layer, 1);
    assert!(frames[switch].keyframe, "the switch is not at a keyframe");
    assert!(frames[switch..].iter().all(|f| f.layer == 1));
    // Real time between the last top-layer frame and the first middle-layer one is held in
    // the file, not compressed to one frame interval (33 ms). The switch comes after 0.3 s
    // (the recorder noticed the stalled layer after 250 ms of silence) or 1.03 s (the
    // router's own layer timeout came first); which one varies from run to run.
    let gap = (frames[switch].pts - frames[switch - 1].pts) as f64 / 90_000.0;
    assert!(gap > 0.2 && gap < 2.0, "switch gap {gap} s");
    assert!(frames.windows(2).all(|w| w[1].pts > w[0].pts));
    let last = frames.last().unwrap().pts as f64 / 90_000.0;
    assert!((last - 6.0).abs() < 0.25, "last frame at {last} s");
    let summary = cam.summary.as_ref().unwrap();
    assert_eq!(summary.layer_switches, 1, "{summary:?}");
}

/// Alice (microphone and camera) is in the call when the recording starts; Bob joins two
/// seconds later. Every file starts at its own offset on the recording's clock and they all
/// end at the stop; Alice's audio and video start together. (Bob stays six seconds: senders
/// report audio only every five, and his files are placed by those reports.)
#[test]
fn recorded_tracks_share_one_clock() {
    let mut world = SimWorld::new(14, epoch());
    let alice = world.add_peer("room", "alice", PeerOptions::default());
    world.run_for(secs(2.0));
    world
        .start_recording("room", RecordingOptions::everyone())
        .unwrap();
    world.run_for(secs(2.0));
    let bob = world.add_peer("room", "bob", PeerOptions::default());
    world.run_for(secs(6.0));
    world.stop_recording("room").unwrap();

    let end_ms = 8000;
    let mut starts = Vec::new();
    for (who, source) in [(alice, MIC), (alice, CAM), (bob, MIC), (bob, CAM)] {
        let file = file_of(&world, who, source);
        let summary = file.summary.as_ref().unwrap();
        assert_eq!(
            summary.sync,
            SyncSource::SenderReport,
            "{source:?} of {who}"
        );
        let end = summary.start_offset_ms + summary.duration_ms as i64;
        assert!(
            (end - end_ms).abs() < 150,
            "{source:?} of {who} ends at {end} ms: {summary:?}"
        );
        starts.push(summary.start_offset_ms);
        // Disk per hour of this source (docs/recording.md): `--nocapture` shows it.
        let per_hour = file.bytes.len() as f64 / summary.duration_ms as f64 * 3_600_000.0;
        println!(
            "# {source:?} of {who}: {} bytes in {} ms = {:.1} MB per hour",
            file.bytes.len(),
            summary.duration_ms,
            per_hour / 1e6
        );
    }
    assert!(
        (starts[0] - starts[1]).abs() < 100,
        "alice's starts {starts:?}"
    );
    assert!(
        starts[0].abs() < 100,
        "alice started with the recording: {starts:?}"
    );
    assert!(
        (2000..2500).contains(&starts[2]),
        "bob joined 2 s in: {starts:?}"
    );
    assert!(
        (starts[2] - starts[3]).abs() < 150,
        "bob's starts {starts:?}"
    );
}

/// Carol's grants forbid recording her: her microphone and camera are never written, and she
/// is told the call is recorded without her. Alice is recorded and told so; Dave, who joins
/// while it runs, is told at once.
#[test]
fn unrecordable_session_is_left_out() {
    let mut world = SimWorld::new(15, epoch());
    let alice = world.add_peer("room", "alice", PeerOptions::default());
    let carol = world.add_peer(
        "room",
        "carol",
        PeerOptions {
            grants: Grants::ALL.with_recordable(false),
            ..PeerOptions::default()
        },
    );
    world.run_for(secs(2.0));
    world
        .start_recording("room", RecordingOptions::everyone())
        .unwrap();
    world.run_for(secs(2.0));
    let dave = world.add_peer("room", "dave", PeerOptions::audio_only());
    world.run_for(secs(2.0));
    world.stop_recording("room").unwrap();
    world.run_for(secs(0.1)); // the `recording` messages reach the peers

    let sessions: Vec<SessionId> = world
        .recorded_files()
        .iter()
        .map(|f| f.file.session)
        .collect();
    assert!(
        !sessions.contains(&carol),
        "carol was recorded: {sessions:?}"
    );
    assert_eq!(world.recorded_files().len(), 3, "{sessions:?}"); // alice ×2, dave
    assert!(!file_of(&world, alice, MIC).bytes.is_empty());
    assert!(!file_of(&world, dave, MIC).bytes.is_empty());
    // Carol still hears Alice: forwarding does not care.
    assert!(world
        .peer(carol)
        .received_from(alice, MIC)
        .is_some_and(|t| t.packets > 0));
    assert_eq!(
        recording_messages(&world, alice),
        [(true, true), (false, false)]
    );
    assert_eq!(
        recording_messages(&world, carol),
        [(true, false), (false, false)]
    );
    assert_eq!(
        recording_messages(&world, dave),
        [(true, true), (false, false)]
    );
    // Starting twice, or stopping what does not run, is refused.
    assert!(world.stop_recording("room").is_err());
    assert!(world.stop_recording("nowhere").is_err());
}
