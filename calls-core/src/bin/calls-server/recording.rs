//! Recorded files on disk: the workers hand the router's recording outputs to one writer
//! thread, which owns every file. A worker never waits for the disk: file bytes go through a
//! bounded budget (`recording_queue_chunks`); when the writer falls that far behind, the chunk
//! is dropped (counted) and that file ends there (it stays playable up to what was written).
//! The small control messages (a file opened or finished, a recording started or stopped)
//! always go through.
//!
//! Layout: `<recording_dir>/<call>-<start unix ms>/`, one file per recorded source
//! (`0001-s3-microphone.ogg`, `0002-s3-camera.ivf`, …), `manifest.json` (rewritten whenever a
//! file finishes) and, at the stop, `compose.sh`: the `ffmpeg` command that mixes the folder
//! into one `mix.webm` (docs/recording.md).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use calls_core::record::{FileId, FileSummary, RecordOutput, RecordedFile, RecordingOptions};
use calls_core::CallId;
use serde::Serialize;

/// Counters the `/metrics` page shows (`calls_server_recording_*`).
#[derive(Debug, Default)]
pub struct RecordingCounters {
    /// File chunks dropped because the writer was behind.
    pub dropped: AtomicU64,
    /// Bytes written to disk.
    pub written: AtomicU64,
    /// Write errors (disk full, permissions).
    pub errors: AtomicU64,
}

/// The workers' handle on the writer thread (cheap to clone).
#[derive(Debug, Clone)]
pub struct RecordingSink {
    tx: mpsc::Sender<RecordOutput>,
    /// Data chunks queued and not yet written.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub counters: Arc<RecordingCounters>,
}

/// Per worker: the files whose chunks were dropped (they end where they were cut).
#[derive(Debug, Default)]
pub struct Truncated(HashSet<(CallId, FileId)>);

impl RecordingSink {
    /// Starts the writer thread for `dir` (created if missing).
    pub fn start(dir: PathBuf, capacity: usize) -> std::io::Result<RecordingSink> {
        std::fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(RecordingCounters::default());
        let writer = Writer {
            dir,
            calls: HashMap::new(),
            queued: queued.clone(),
            counters: counters.clone(),
        };
        std::thread::Builder::new()
            .name("calls-recorder".into())
            .spawn(move || writer.run(rx))?;
        Ok(RecordingSink {
            tx,
            queued,
            capacity,
            counters,
        })
    }

    /// Hands one output to the writer without waiting. File bytes beyond the budget are
    /// dropped, and their file is cut there (`truncated` remembers it for this worker).
    pub fn offer(&self, out: RecordOutput, truncated: &mut Truncated) {
        match &out {
            RecordOutput::Data { call, file, .. } => {
                let key = (call.clone(), *file);
                if truncated.0.contains(&key)
                    || self.queued.load(Ordering::Relaxed) >= self.capacity
                {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    if truncated.0.insert(key) {
                        tracing::warn!(%call, file = file.0, "recording writer behind: file cut here");
                    }
                    return;
                }
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            RecordOutput::FileFinished { call, summary }
                if truncated.0.remove(&(call.clone(), summary.id)) =>
            {
                // The manifest says so (the writer sees the missing bytes).
                tracing::info!(%call, file = summary.id.0, "a cut recording file finished");
            }
            _ => {}
        }
        if self.tx.send(out).is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One file as the manifest lists it.
#[derive(Debug, Serialize)]
struct ManifestFile {
    #[serde(flatten)]
    file: RecordedFile,
    /// Filled when it finished.
    #[serde(flatten)]
    summary: Option<FileSummary>,
    /// Bytes on disk (less than `summary.bytes` when the writer had to cut it).
    written: u64,
    truncated: bool,
}

#[derive(Debug, Serialize)]
struct Manifest<'a> {
    call: &'a CallId,
    started_at_unix_ms: u64,
    stopped_at_unix_ms: Option<u64>,
    options: &'a RecordingOptions,
    files: &'a [ManifestFile],
    /// `sh compose.sh` (the same command) mixes the folder into `mix.webm`.
    compose: String,
}

/// One call's folder.
#[derive(Debug)]
struct Folder {
    path: PathBuf,
    started_at_unix_ms: u64,
    options: RecordingOptions,
    files: Vec<ManifestFile>,
    open: HashMap<FileId, File>,
}

struct Writer {
    dir: PathBuf,
    calls: HashMap<CallId, Folder>,
    queued: Arc<AtomicUsize>,
    counters: Arc<RecordingCounters>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A call name as a folder name: letters, digits, `-` and `_` only (call names are user input),
/// at most 64 characters.
fn safe_name(call: &CallId) -> String {
    let name: String = call
        .as_str()
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "call".to_owned()
    } else {
        name
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<RecordOutput>) {
        while let Ok(out) = rx.recv() {
            self.handle(out);
        }
        // The server is exiting: what is open stays as written (playable), manifests too.
    }

    fn handle(&mut self, out: RecordOutput) {
        match out {
            RecordOutput::Started { call, options } => {
                let started = unix_ms();
                let path = self.dir.join(format!("{}-{started}", safe_name(&call)));
                if let Err(e) = std::fs::create_dir_all(&path) {
                    self.error(&call, &path, &e);
                }
                tracing::info!(%call, path = %path.display(), "recording into");
                let folder = Folder {
                    path,
                    started_at_unix_ms: started,
                    options,
                    files: Vec::new(),
                    open: HashMap::new(),
                };
                self.calls.insert(call.clone(), folder);
                self.write_manifest(&call, None);
            }
            RecordOutput::FileStarted { call, file } => {
                let Some(folder) = self.calls.get_mut(&call) else {
                    return;
                };
                let path = folder.path.join(&file.name);
                match File::create(&path) {
                    Ok(f) => {
                        folder.open.insert(file.id, f);
                    }
                    Err(e) => {
                        self.error(&call, &path, &e);
                        return;
                    }
                }
                folder.files.push(ManifestFile {
                    file,
                    summary: None,
                    written: 0,
                    truncated: false,
                });
            }
            RecordOutput::Data { call, file, bytes } => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                let Some(folder) = self.calls.get_mut(&call) else {
                    return;
                };
                let Some(f) = folder.open.get_mut(&file) else {
                    return;
                };
                if let Err(e) = f.write_all(&bytes) {
                    folder.open.remove(&file);
                    let path = folder.path.clone();
                    self.error(&call, &path, &e);
                    return;
                }
                self.counters
                    .written
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if let Some(entry) = folder.files.iter_mut().find(|m| m.file.id == file) {
                    entry.written += bytes.len() as u64;
                }
            }
            RecordOutput::FileFinished { call, summary } => {
                let Some(folder) = self.calls.get_mut(&call) else {
                    return;
                };
                folder.open.remove(&summary.id);
                if let Some(entry) = folder.files.iter_mut().find(|m| m.file.id == summary.id) {
                    entry.truncated = entry.written < summary.bytes;
                    entry.summary = Some(summary);
                }
                self.write_manifest(&call, None);
            }
            RecordOutput::Stopped { call } => {
                self.write_manifest(&call, Some(unix_ms()));
                if let Some(folder) = self.calls.remove(&call) {
                    let script = format!(
                        "#!/bin/sh\n# Mixes this recording into mix.webm (docs/recording.md).\ncd \"$(dirname \"$0\")\" && {}\n",
                        compose_command(&folder.files)
                    );
                    let path = folder.path.join("compose.sh");
                    if let Err(e) = std::fs::write(&path, script) {
                        self.error(&call, &path, &e);
                    }
                    tracing::info!(%call, files = folder.files.len(), "recording finished");
                }
            }
            _ => {}
        }
    }

    fn write_manifest(&mut self, call: &CallId, stopped: Option<u64>) {
        let Some(folder) = self.calls.get(call) else {
            return;
        };
        let manifest = Manifest {
            call,
            started_at_unix_ms: folder.started_at_unix_ms,
            stopped_at_unix_ms: stopped,
            options: &folder.options,
            files: &folder.files,
            compose: compose_command(&folder.files),
        };
        let path = folder.path.join("manifest.json");
        let text = match serde_json::to_string_pretty(&manifest) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%call, "manifest not serialized: {e}");
                return;
            }
        };
        // Written beside, then renamed: a crash never leaves half a manifest.
        let tmp = folder.path.join("manifest.json.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            self.error(call, &path, &e);
        }
    }

    fn error(&self, call: &CallId, path: &Path, e: &std::io::Error) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%call, path = %path.display(), "recording write failed: {e}");
    }
}

/// Tile size of each camera or screen in the mix.
const TILE: (u32, u32) = (640, 360);

/// The `ffmpeg` command that mixes a recording folder into `mix.webm`: every audio file delayed
/// to its start offset and mixed, every video file scaled into a tile of a grid, padded with
/// black before its start. Run in the folder.
fn compose_command(files: &[ManifestFile]) -> String {
    let offset = |f: &ManifestFile| f.summary.as_ref().map_or(0, |s| s.start_offset_ms.max(0));
    let audio: Vec<&ManifestFile> = files.iter().filter(|f| f.file.codec == "opus").collect();
    let video: Vec<&ManifestFile> = files.iter().filter(|f| f.file.codec != "opus").collect();
    let mut cmd = String::from("ffmpeg -y -hide_banner");
    for f in &audio {
        cmd += &format!(" -i {}", f.file.name);
    }
    // A simulcast layer switch changes a video file's frame size mid-way. By default ffmpeg
    // then rebuilds the whole filter graph, audio included, and the mix's audio timestamps
    // jump back (its muxer reports non-monotonic DTS); `scale` takes the new size as it is.
    for f in &video {
        cmd += &format!(" -reinit_filter 0 -i {}", f.file.name);
    }
    let mut graph: Vec<String> = Vec::new();
    for (i, f) in audio.iter().enumerate() {
        graph.push(format!("[{i}:a]adelay=delays={}:all=1[a{i}]", offset(f)));
    }
    if !audio.is_empty() {
        let inputs: String = (0..audio.len()).map(|i| format!("[a{i}]")).collect();
        graph.push(format!(
            "{inputs}amix=inputs={}:duration=longest:normalize=0[aout]",
            audio.len()
        ));
    }
    let (w, h) = TILE;
    for (k, f) in video.iter().enumerate() {
        let input = audio.len() + k;
        graph.push(format!(
            "[{input}:v]scale={w}:{h}:force_original_aspect_ratio=decrease,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1,fps=30,tpad=start_duration={:.3}:color=black[v{k}]",
            offset(f) as f64 / 1000.0
        ));
    }
    match video.len() {
        0 => {}
        1 => graph.push("[v0]null[vout]".to_owned()),
        n => {
            let cols = (n as f64).sqrt().ceil() as usize;
            let layout: Vec<String> = (0..n)
                .map(|k| format!("{}_{}", (k % cols) as u32 * w, (k / cols) as u32 * h))
                .collect();
            let inputs: String = (0..n).map(|k| format!("[v{k}]")).collect();
            graph.push(format!(
                "{inputs}xstack=inputs={n}:layout={}:fill=black[vout]",
                layout.join("|")
            ));
        }
    }
    if graph.is_empty() {
        return "echo 'nothing recorded'".to_owned();
    }
    cmd += &format!(" -filter_complex '{}'", graph.join(";"));
    if !video.is_empty() {
        cmd += " -map '[vout]' -c:v libvpx -deadline realtime -cpu-used 8 -b:v 1500k";
    }
    if !audio.is_empty() {
        cmd += " -map '[aout]' -c:a libopus -b:a 96k";
    }
    cmd + " mix.webm"
}

#[cfg(test)]
mod tests {
    use super::*;
    use calls_core::record::{Container, SyncSource};
    use calls_core::{SessionId, TrackSource, UserId};

    fn file(id: u32, source: TrackSource, codec: &str, start: i64) -> ManifestFile {
        let container = if codec == "opus" {
            Container::Ogg
        } else {
            Container::Ivf
        };
        ManifestFile {
            file: RecordedFile {
                id: FileId(id),
                name: format!("{id:04}-s1-{}.{}", source.as_str(), container.extension()),
                session: SessionId(1),
                user: UserId::from("alice"),
                source,
                codec: codec.to_owned(),
                container,
            },
            summary: Some(FileSummary {
                id: FileId(id),
                start_offset_ms: start,
                duration_ms: 1000,
                frames: 1,
                bytes: 1,
                silence_ms: 0,
                lost_packets: 0,
                broken_frames: 0,
                layer_switches: 0,
                sync: SyncSource::SenderReport,
            }),
            written: 1,
            truncated: false,
        }
    }

    #[test]
    fn the_compose_command_delays_and_tiles_every_file() {
        let files = [
            file(1, TrackSource::Microphone, "opus", 0),
            file(2, TrackSource::Camera, "vp8", 33),
            file(3, TrackSource::Microphone, "opus", 2040),
            file(4, TrackSource::Camera, "vp8", 2100),
        ];
        let cmd = compose_command(&files);
        assert!(cmd.starts_with("ffmpeg -y -hide_banner -i 0001-s1-microphone.ogg -i 0003-s1-microphone.ogg -reinit_filter 0 -i 0002-s1-camera.ivf -reinit_filter 0 -i 0004-s1-camera.ivf"), "{cmd}");
        assert!(cmd.contains("[1:a]adelay=delays=2040:all=1[a1]"), "{cmd}");
        assert!(cmd.contains("amix=inputs=2"), "{cmd}");
        assert!(cmd.contains("[3:v]scale=640:360"), "{cmd}");
        assert!(cmd.contains("tpad=start_duration=2.100"), "{cmd}");
        assert!(cmd.contains("xstack=inputs=2:layout=0_0|640_0"), "{cmd}");
        assert!(cmd.ends_with("mix.webm"), "{cmd}");
        assert_eq!(compose_command(&[]), "echo 'nothing recorded'");
    }

    #[test]
    fn call_names_become_safe_folder_names() {
        assert_eq!(safe_name(&CallId::from("../../etc x")), "______etc_x");
        assert_eq!(safe_name(&CallId::from("")), "call");
        assert_eq!(safe_name(&CallId::from("team-a_1")), "team-a_1");
    }
}
