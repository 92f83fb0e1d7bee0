//! `calls-server` records a call: the admin API starts and stops it (with the admin key only),
//! a token's `record` grant lets a participant do it from its WebSocket, and the files land
//! under `recording_dir`, one folder per recording, with a manifest that lists every source.
//! Participants are str0m peers on the server's own WebSocket protocol and real UDP.
#![allow(clippy::unwrap_used)]
// test: fail loudly
// A real server process on the wall clock: the deadlines below only bound the waits.
#![allow(clippy::disallowed_methods)]

#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use calls_core::TrackSource;
use server::{request, request_with_body, run_for, run_until, Server, WsParticipant, ADMIN_KEY};

/// A fresh, empty directory for one test's recordings.
fn recording_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("calls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The folders in `dir` (one per recording).
fn folders(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    all.sort();
    all
}

/// Waits (up to 10 s) until the folder's manifest says the recording stopped (the writer
/// thread writes it after the last file), and returns it.
fn finished_manifest(folder: &Path) -> serde_json::Value {
    let path = folder.join("manifest.json");
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
            if !manifest["stopped_at_unix_ms"].is_null() && folder.join("compose.sh").exists() {
                return manifest;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never said the recording stopped", path.display());
}

/// Whether `p` receives audio and video from `from`.
fn hears(p: &WsParticipant, from: &WsParticipant) -> bool {
    [TrackSource::Microphone, TrackSource::Camera]
        .iter()
        .all(|s| {
            p.peer
                .received_from(from.session(), *s)
                .is_some_and(|t| t.packets > 0)
        })
}

/// The `recording` messages a participant heard, as `(active, recorded)`.
fn recording_messages(p: &WsParticipant) -> Vec<(bool, bool)> {
    p.heard_type("recording")
        .iter()
        .map(|m| {
            (
                m["active"].as_bool().unwrap(),
                m["recorded"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// An HS256 join token for the test's secret.
fn token(secret: &str, call: &str, user: &str, grants: serde_json::Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"call": call, "sub": user, "exp": exp, "grants": grants});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[test]
fn the_admin_api_records_a_call_into_one_folder_with_a_manifest() {
    let dir = recording_dir("admin-recording");
    let (http, admin, media) = (18_670, 18_671, 18_672);
    let server = Server::start(
        http,
        admin,
        media,
        "1",
        &[("CALLS_RECORDING_DIR", dir.to_str().unwrap())],
    );
    let path = "/api/calls/rec-room/recording";

    // Nobody is in the call yet: both directions say so by name.
    let unknown_start = request(admin, "POST", path, Some(ADMIN_KEY)).unwrap();
    let unknown_stop = request(admin, "DELETE", path, Some(ADMIN_KEY)).unwrap();

    let mut alice = WsParticipant::join(http, "rec-room", "alice", None, 1);
    let mut bob = WsParticipant::join(http, "rec-room", "bob", None, 2);
    let flowing = run_until(&mut [&mut alice, &mut bob], Duration::from_secs(20), |p| {
        hears(p[0], p[1]) && hears(p[1], p[0])
    });
    assert!(flowing, "alice and bob never heard each other");

    // The admin key is required, and a bad body is refused before anything starts.
    let no_key = request(admin, "POST", path, None).unwrap();
    let wrong_key = request(admin, "POST", path, Some("not-the-admin-key-at-all")).unwrap();
    let bad_body = request_with_body(admin, "POST", path, Some(ADMIN_KEY), "[1, 2]").unwrap();
    assert!(folders(&dir).is_empty(), "no recording without the key");

    let started = request(admin, "POST", path, Some(ADMIN_KEY)).unwrap();
    let again = request(admin, "POST", path, Some(ADMIN_KEY)).unwrap();
    run_for(&mut [&mut alice, &mut bob], Duration::from_secs(3));
    let stop_no_key = request(admin, "DELETE", path, None).unwrap();
    let stopped = request(admin, "DELETE", path, Some(ADMIN_KEY)).unwrap();
    let stopped_again = request(admin, "DELETE", path, Some(ADMIN_KEY)).unwrap();
    run_for(&mut [&mut alice, &mut bob], Duration::from_millis(300));
    let (_, metrics) = request(http, "GET", "/metrics", None).unwrap();

    let error_code = |body: &str| -> String {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(unknown_start.0, 404, "{unknown_start:?}");
    assert_eq!(error_code(&unknown_start.1), "unknown_call");
    assert_eq!(unknown_stop.0, 404, "{unknown_stop:?}");
    assert_eq!(error_code(&unknown_stop.1), "unknown_call");
    assert!(unknown_stop.1.contains("rec-room"), "{unknown_stop:?}");
    assert_eq!(no_key.0, 401);
    assert_eq!(wrong_key.0, 401);
    assert_eq!(bad_body.0, 400, "{bad_body:?}");
    assert!(bad_body.1.starts_with("recording options:"), "{bad_body:?}");
    assert_eq!(started.0, 204, "{started:?}");
    assert_eq!(again.0, 409, "{again:?}");
    assert_eq!(error_code(&again.1), "already_recording");
    assert_eq!(stop_no_key.0, 401);
    assert_eq!(stopped.0, 204, "{stopped:?}");
    assert_eq!(stopped_again.0, 409, "{stopped_again:?}");
    assert_eq!(error_code(&stopped_again.1), "not_recording");
    // Both were told it started (and that they are in it), then that it stopped.
    for p in [&alice, &bob] {
        assert_eq!(
            recording_messages(p),
            [(true, true), (false, false)],
            "{:?}",
            p.heard
        );
    }

    let all = folders(&dir);
    assert_eq!(all.len(), 1, "one folder per recording: {all:?}");
    let folder = &all[0];
    let name = folder.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("rec-room-"), "{name}");
    let manifest = finished_manifest(folder);
    assert_eq!(manifest["call"], "rec-room");
    let started_at = manifest["started_at_unix_ms"].as_u64().unwrap();
    let stopped_at = manifest["stopped_at_unix_ms"].as_u64().unwrap();
    assert!(
        (2_900..6_000).contains(&(stopped_at - started_at)),
        "{manifest}"
    );
    assert_eq!(manifest["options"]["sessions"], serde_json::Value::Null);
    let files = manifest["files"].as_array().unwrap();
    let mut sources: Vec<(String, String, String, String)> = files
        .iter()
        .map(|f| {
            (
                f["user"].as_str().unwrap().to_owned(),
                f["source"].as_str().unwrap().to_owned(),
                f["codec"].as_str().unwrap().to_owned(),
                f["container"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    sources.sort();
    let want = |user: &str, source: &str, codec: &str, container: &str| {
        (
            user.to_owned(),
            source.to_owned(),
            codec.to_owned(),
            container.to_owned(),
        )
    };
    assert_eq!(
        sources,
        [
            want("alice", "camera", "vp8", "ivf"),
            want("alice", "microphone", "opus", "ogg"),
            want("bob", "camera", "vp8", "ivf"),
            want("bob", "microphone", "opus", "ogg"),
        ],
        "{manifest}"
    );
    for f in files {
        let file = folder.join(f["name"].as_str().unwrap());
        let bytes = std::fs::read(&file).unwrap();
        let magic: &[u8] = if f["container"] == "ogg" {
            b"OggS"
        } else {
            b"DKIF"
        };
        assert!(bytes.starts_with(magic), "{} {f}", file.display());
        assert_eq!(f["bytes"].as_u64(), Some(bytes.len() as u64), "{f}");
        assert_eq!(f["written"].as_u64(), Some(bytes.len() as u64), "{f}");
        assert_eq!(f["truncated"], false, "{f}");
        // Files start when the recording does (video: at its first keyframe, asked for at
        // once) and last until the stop; the server's loop and the writer add a little.
        let offset = f["start_offset_ms"].as_i64().unwrap();
        let duration = f["duration_ms"].as_u64().unwrap();
        assert!((-500..1_500).contains(&offset), "{f}");
        assert!((1_500..4_500).contains(&duration), "{f}");
        assert!(f["frames"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["lost_packets"], 0, "loopback loses nothing: {f}");
    }
    let compose = std::fs::read_to_string(folder.join("compose.sh")).unwrap();
    assert!(
        compose.contains("ffmpeg") && compose.contains("mix.webm"),
        "{compose}"
    );
    assert_eq!(
        manifest["compose"].as_str().map(|c| compose.contains(c)),
        Some(true)
    );
    let written = metrics
        .lines()
        .find_map(|l| l.strip_prefix("calls_server_recording_written_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(written.is_some_and(|w| w > 0.0), "{metrics}");

    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_token_grant_lets_a_participant_record_and_leaves_the_unrecordable_out() {
    let dir = recording_dir("grant-recording");
    let secret = "server-recording-test-secret-0123456789";
    let (http, admin, media) = (18_673, 18_674, 18_675);
    let server = Server::start(
        http,
        admin,
        media,
        "1",
        &[
            ("CALLS_RECORDING_DIR", dir.to_str().unwrap()),
            ("CALLS_AUTH_SECRET", secret),
        ],
    );
    let call = "grant-room";
    let av = serde_json::json!({"audio": true, "video": true});
    let host = token(
        secret,
        call,
        "carol",
        serde_json::json!({"audio": true, "video": true, "record": true}),
    );
    let guest = token(secret, call, "dan", av.clone());
    let private = token(
        secret,
        call,
        "erin",
        serde_json::json!({"audio": true, "video": true, "recordable": false}),
    );
    let mut carol = WsParticipant::join(http, call, "carol", Some(&host), 3);
    let mut dan = WsParticipant::join(http, call, "dan", Some(&guest), 4);
    let mut erin = WsParticipant::join(http, call, "erin", Some(&private), 5);
    let flowing = run_until(
        &mut [&mut carol, &mut dan, &mut erin],
        Duration::from_secs(30),
        |p| hears(p[0], p[1]) && hears(p[0], p[2]) && hears(p[1], p[0]),
    );
    assert!(flowing, "the three never heard each other");

    // Without the grant: refused on its own socket, nothing starts.
    dan.send_text(r#"{"type":"record","on":true}"#);
    let refused = run_until(
        &mut [&mut carol, &mut dan, &mut erin],
        Duration::from_secs(5),
        |p| !p[1].heard_type("error").is_empty(),
    );
    assert!(refused, "dan heard no refusal: {:?}", dan.heard);
    assert_eq!(dan.heard_type("error")[0]["code"], "not_allowed");
    assert!(folders(&dir).is_empty(), "dan started a recording");

    carol.send_text(r#"{"type":"record","on":true}"#);
    run_for(
        &mut [&mut carol, &mut dan, &mut erin],
        Duration::from_secs(2),
    );
    carol.send_text(r#"{"type":"record","on":false}"#);
    let told = run_until(
        &mut [&mut carol, &mut dan, &mut erin],
        Duration::from_secs(5),
        |p| p.iter().all(|p| recording_messages(p).len() == 2),
    );
    assert!(told, "not everyone heard the start and the stop");
    let (status, calls) = request(admin, "GET", "/api/calls", Some(ADMIN_KEY)).unwrap();

    assert_eq!(recording_messages(&carol), [(true, true), (false, false)]);
    assert_eq!(recording_messages(&dan), [(true, true), (false, false)]);
    // erin knows a recording runs, and that she is not in it.
    assert_eq!(recording_messages(&erin), [(true, false), (false, false)]);
    assert_eq!(status, 200);
    assert!(calls.contains(call), "{calls}");
    let all = folders(&dir);
    assert_eq!(all.len(), 1, "{all:?}");
    let manifest = finished_manifest(&all[0]);
    let mut users: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["user"].as_str().unwrap())
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["carol", "carol", "dan", "dan"], "{manifest}");

    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_recording_dir_the_admin_api_says_recording_is_off() {
    let (http, admin, media) = (18_676, 18_677, 18_678);
    let server = Server::start(http, admin, media, "1", &[]);
    let mut ada = WsParticipant::join(http, "plain-room", "ada", None, 6);
    run_for(&mut [&mut ada], Duration::from_millis(300));
    let refused = request(
        admin,
        "POST",
        "/api/calls/plain-room/recording",
        Some(ADMIN_KEY),
    )
    .unwrap();
    drop(server);

    assert_eq!(
        refused,
        (409, "recording is off: set recording_dir\n".to_owned())
    );
    assert!(ada.heard_type("recording").is_empty(), "{:?}", ada.heard);
}
