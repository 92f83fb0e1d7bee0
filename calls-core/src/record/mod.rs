//! Recording: a tap on the forwarding path that writes standard files without decoding.
//!
//! The embedder starts a recording of one call ([`Router::start_recording`](crate::Router::start_recording))
//! and stops it; in between the router hands every recorded source's RTP packets (after SRTP,
//! before any subscriber's rewrite) to the call's `Recorder`, which reorders them in a small
//! jitter buffer and writes them into files — as bytes in [`RecordOutput::Data`] outputs. The
//! core writes no file itself: the embedder appends each `Data` to the file announced by
//! [`RecordOutput::FileStarted`].
//!
//! | source | codec | file |
//! |---|---|---|
//! | microphone | Opus | Ogg/Opus (RFC 7845), pages through the [`ogg`] crate |
//! | camera, screen | VP8, VP9 | IVF (32-byte header, a 12-byte header per frame) |
//! | camera, screen | H264, AV1 | not recorded ([`FileSummary`] is never opened; see docs/recording.md) |
//!
//! What the files get right:
//! - **order**: a reorder buffer per source (`jitter`) waits up to [`AUDIO_REORDER`] /
//!   [`VIDEO_REORDER`] for a missing sequence number (NACK and RTX repair video meanwhile);
//! - **keyframes**: video starts at a keyframe (one is requested when the recording starts, and
//!   after a loss broke a frame), and a broken frame is never written;
//! - **simulcast**: the best layer the publisher sends is recorded, dynacast keeps it on, and a
//!   switch happens at a keyframe of the new layer with the timeline continued;
//! - **gaps** (mute, a paused stream, loss) keep their length: silent Opus frames fill audio
//!   gaps, a video frame is held until the next (its timestamp says when that comes);
//! - **sync**: each file's [`FileSummary::start_offset_ms`] places its first sample on the
//!   recording's clock (its epoch: the start), from the publisher's RTCP sender reports (NTP ↔
//!   RTP), so one participant's audio and video line up and everybody shares one timeline;
//! - **cut files** stay playable as far as written: Ogg pages are closed every second, IVF
//!   frames are whole.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use str0m::media::Rid;
use str0m::rtp::rtcp::SenderInfo;

use crate::call::TrackKey;
use crate::ids::{CallId, SessionId, TrackSource, UserId};

pub(crate) mod jitter;
pub(crate) mod opus;
pub(crate) mod video;

use jitter::{Buffered, ReorderBuffer};
use opus::OggOpus;
use video::{FrameAssembler, Ivf};

/// How long an audio source's reorder buffer waits for a missing packet before it is counted
/// lost (and its time filled with silence): late enough for network reordering, short enough
/// that a recording lags little.
pub const AUDIO_REORDER: Duration = Duration::from_millis(100);
/// The same for video: a lost packet is NACKed and resent within about one round trip, so the
/// buffer waits longer before it gives up on a frame (and waits for a keyframe).
pub const VIDEO_REORDER: Duration = Duration::from_millis(300);
/// A source whose RTP clock and arrival clock disagree by more than this across one packet
/// (a new SSRC after renegotiation, a sender that reset its timestamps) continues its timeline
/// from the arrival time instead.
const MAX_CLOCK_DISAGREEMENT: Duration = Duration::from_secs(2);
/// A recorded simulcast layer that sent nothing for this long has stopped (the publisher
/// dropped it, its CPU or uplink shrank): the recording takes the next keyframe of any layer
/// still flowing, without waiting for the router's verdict on the layer (a second, which
/// would cost a second of video). Longer than the gap between two frames of a 5 fps layer.
const RECORDED_LAYER_STALL: Duration = Duration::from_millis(250);
/// Opus RTP clock (RFC 7587: always 48 kHz).
const OPUS_CLOCK: u32 = 48_000;
/// Video RTP clock.
const VIDEO_CLOCK: u32 = 90_000;

/// Which sources a recording takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordingOptions {
    /// `None`: everyone in the call, also those who join later; `Some`: only these sessions.
    /// Sessions whose [`Grants::recordable`](crate::Grants::recordable) is `false` are left
    /// out either way.
    #[serde(default)]
    pub sessions: Option<Vec<SessionId>>,
    /// Record microphones.
    #[serde(default = "yes")]
    pub audio: bool,
    /// Record cameras.
    #[serde(default = "yes")]
    pub camera: bool,
    /// Record screen shares.
    #[serde(default = "yes")]
    pub screen: bool,
}

fn yes() -> bool {
    true
}

impl Default for RecordingOptions {
    fn default() -> Self {
        RecordingOptions::everyone()
    }
}

impl RecordingOptions {
    /// Everyone's microphone, camera and screen.
    pub fn everyone() -> Self {
        RecordingOptions {
            sessions: None,
            audio: true,
            camera: true,
            screen: true,
        }
    }

    /// Only these sessions (all their sources).
    pub fn sessions(sessions: Vec<SessionId>) -> Self {
        RecordingOptions {
            sessions: Some(sessions),
            ..RecordingOptions::everyone()
        }
    }

    /// The same options, taking microphones, cameras and screens as given.
    pub fn with_sources(mut self, audio: bool, camera: bool, screen: bool) -> Self {
        self.audio = audio;
        self.camera = camera;
        self.screen = screen;
        self
    }

    /// Whether `session`'s `source` is to be recorded (grants aside).
    pub fn takes(&self, session: SessionId, source: TrackSource) -> bool {
        let by_source = match source {
            TrackSource::Microphone => self.audio,
            TrackSource::Camera => self.camera,
            TrackSource::Screen => self.screen,
        };
        by_source
            && self
                .sessions
                .as_ref()
                .is_none_or(|list| list.contains(&session))
    }
}

/// A recorded file's number within its recording (1, 2, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(pub u32);

/// The container a file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Container {
    /// Ogg with Opus (RFC 7845): `.ogg`.
    Ogg,
    /// IVF with VP8 or VP9 frames: `.ivf`.
    Ivf,
}

impl Container {
    /// The file name extension.
    pub fn extension(self) -> &'static str {
        match self {
            Container::Ogg => "ogg",
            Container::Ivf => "ivf",
        }
    }
}

/// One file of a recording, announced before its first bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    /// Its number in this recording.
    pub id: FileId,
    /// A file name made of safe characters only (`0001-s3-microphone.ogg`): the number, the
    /// session and the source. User names stay out of it (they are user input).
    pub name: String,
    /// Whose source.
    pub session: SessionId,
    /// That session's user.
    pub user: UserId,
    /// Microphone, camera or screen.
    pub source: TrackSource,
    /// `opus`, `vp8` or `vp9`.
    pub codec: String,
    /// The container.
    pub container: Container,
}

/// Where a file's start offset comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SyncSource {
    /// The publisher's RTCP sender reports (NTP ↔ RTP): its tracks line up with each other to
    /// the sample, and with the others through the least transit time seen.
    SenderReport,
    /// No sender report arrived in time: the first packet's arrival.
    Arrival,
}

/// What one finished file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSummary {
    /// The file.
    pub id: FileId,
    /// When its first sample plays, in milliseconds after the recording started (the epoch
    /// every file of the recording shares). Negative when it was captured just before.
    pub start_offset_ms: i64,
    /// Its length in milliseconds: audio samples written (silence included) / 48, or the
    /// last video frame's timestamp.
    pub duration_ms: u64,
    /// Opus packets (silence included) or video frames written.
    pub frames: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Audio: milliseconds of silence written into gaps (mute, pauses, loss).
    pub silence_ms: u64,
    /// Packets lost (never arrived in time for the reorder buffer) or late.
    pub lost_packets: u64,
    /// Video: frames not written because a packet of theirs was lost, or they depended on one.
    pub broken_frames: u64,
    /// Video: simulcast layer switches.
    pub layer_switches: u32,
    /// Where `start_offset_ms` comes from.
    pub sync: SyncSource,
}

/// What a recording hands the embedder (through [`Output::Record`](crate::Output::Record)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RecordOutput {
    /// A recording started; its epoch (time zero of every file's start offset) is now.
    Started {
        /// The call.
        call: CallId,
        /// What it records.
        options: RecordingOptions,
    },
    /// A new file: create it (empty); its bytes follow in [`RecordOutput::Data`].
    FileStarted {
        /// The call.
        call: CallId,
        /// The file.
        file: RecordedFile,
    },
    /// Bytes to append to a file.
    Data {
        /// The call.
        call: CallId,
        /// The file.
        file: FileId,
        /// The bytes, in order.
        bytes: Vec<u8>,
    },
    /// A file is complete (its source stopped, left, or the recording stopped): nothing more
    /// is appended.
    FileFinished {
        /// The call.
        call: CallId,
        /// What it holds.
        summary: FileSummary,
    },
    /// The recording stopped (by [`Router::stop_recording`](crate::Router::stop_recording),
    /// or because everyone left): every file is finished.
    Stopped {
        /// The call.
        call: CallId,
    },
}

impl RecordOutput {
    /// The call this output belongs to.
    pub fn call(&self) -> &CallId {
        match self {
            RecordOutput::Started { call, .. }
            | RecordOutput::FileStarted { call, .. }
            | RecordOutput::Data { call, .. }
            | RecordOutput::FileFinished { call, .. }
            | RecordOutput::Stopped { call } => call,
        }
    }
}

/// The mapping of a sender report: this NTP time (seconds since the Unix epoch) is this RTP
/// timestamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SenderClock {
    ntp_secs: f64,
    rtp: u32,
}

impl SenderClock {
    pub fn from_info(info: &SenderInfo) -> Option<Self> {
        let ntp = info.ntp_time.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        Some(SenderClock {
            ntp_secs: ntp.as_secs_f64(),
            rtp: info.rtp_time.numer() as u32,
        })
    }

    /// The NTP time of RTP timestamp `ts` (within ±2^31 ticks of the report).
    fn ntp_of(&self, ts: u32, clock_rate: u32) -> f64 {
        let ticks = ts.wrapping_sub(self.rtp) as i32;
        self.ntp_secs + f64::from(ticks) / f64::from(clock_rate)
    }
}

/// One RTP packet offered to a recording.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecPacket<'a> {
    pub seq: u64,
    pub timestamp: u32,
    pub marker: bool,
    pub payload: &'a Arc<[u8]>,
    /// Where the codec payload starts (the primary block of a RED packet).
    pub offset: usize,
    pub keyframe: bool,
    pub rid: Option<Rid>,
    pub sender: Option<SenderClock>,
    pub arrival: Instant,
}

/// What the router is told about a recorded track's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecCodec {
    Opus,
    Vp8,
    Vp9,
    /// Not recordable without a container we write (H264, AV1, …).
    Other,
}

impl RecCodec {
    pub fn from_str0m(codec: str0m::format::Codec) -> Self {
        use str0m::format::Codec;
        match codec {
            Codec::Opus => RecCodec::Opus,
            Codec::Vp8 => RecCodec::Vp8,
            Codec::Vp9 => RecCodec::Vp9,
            _ => RecCodec::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RecCodec::Opus => "opus",
            RecCodec::Vp8 => "vp8",
            RecCodec::Vp9 => "vp9",
            RecCodec::Other => "other",
        }
    }
}

/// Per publisher: the least (arrival − NTP capture time) seen, mapping its sender reports'
/// wallclock onto the recording's clock. The least is the packet that waited least on the way.
#[derive(Debug, Default, Clone, Copy)]
struct PublisherClock {
    offset_secs: Option<f64>,
}

/// A recorded source's timeline: where each RTP timestamp falls in the file, in clock ticks.
#[derive(Debug)]
struct Timeline {
    clock_rate: u32,
    /// The last packet placed: its RTP timestamp, position and arrival.
    last: Option<(u32, u64, Instant)>,
    /// The next packet starts a new stream (a simulcast layer): continue by the sender
    /// reports (or arrival) rather than by its own timestamps.
    rebase: bool,
    /// The sender report of the stream `last` came from.
    last_sender: Option<SenderClock>,
}

impl Timeline {
    fn new(clock_rate: u32) -> Self {
        Timeline {
            clock_rate,
            last: None,
            rebase: false,
            last_sender: None,
        }
    }

    fn ticks(&self, d: Duration) -> i64 {
        (d.as_secs_f64() * f64::from(self.clock_rate)).round() as i64
    }

    /// The position of a packet (in order of its stream).
    fn place(&mut self, ts: u32, arrival: Instant, sender: Option<SenderClock>) -> u64 {
        let Some((last_ts, last_pos, last_arrival)) = self.last else {
            self.last = Some((ts, 0, arrival));
            self.last_sender = sender;
            return 0;
        };
        let by_arrival = self.ticks(arrival.saturating_duration_since(last_arrival));
        let limit = self.ticks(MAX_CLOCK_DISAGREEMENT);
        // Whatever the clocks say, a distance the arrivals contradict by more than the limit
        // is wrong (a stale or foreign sender report, a sender that reset its timestamps):
        // the arrival decides then.
        let unless_contradicted = |delta: i64| {
            if (delta - by_arrival).abs() > limit {
                by_arrival
            } else {
                delta
            }
        };
        let delta = if self.rebase {
            // Another stream: its timestamps have another origin. Both streams' sender
            // reports give the true distance; without them, the arrival does.
            match (self.last_sender, sender) {
                (Some(old), Some(new)) => {
                    let secs =
                        new.ntp_of(ts, self.clock_rate) - old.ntp_of(last_ts, self.clock_rate);
                    unless_contradicted((secs * f64::from(self.clock_rate)).round() as i64)
                }
                _ => by_arrival,
            }
        } else {
            unless_contradicted(i64::from(ts.wrapping_sub(last_ts) as i32))
        };
        self.rebase = false;
        let pos = last_pos.saturating_add_signed(delta.max(0));
        if pos >= last_pos {
            self.last = Some((ts, pos, arrival));
        }
        if sender.is_some() {
            self.last_sender = sender;
        }
        pos
    }
}

/// The file writer of one source.
#[derive(Debug)]
enum Writer {
    Opus(OggOpus),
    Video { frames: FrameAssembler, ivf: Ivf },
}

/// One recorded source (a published track) and its file.
#[derive(Debug)]
struct TrackRecorder {
    file: RecordedFile,
    writer: Writer,
    buffer: ReorderBuffer,
    timeline: Timeline,
    /// Video: the simulcast layer recorded now (`Some(None)`: the only layer), and the one to
    /// switch to at its next keyframe.
    layer: Option<Option<Rid>>,
    target: Option<Rid>,
    /// Video: when the recorded layer's last packet arrived.
    layer_seen: Option<Instant>,
    /// The first sample: its RTP timestamp and arrival, and its NTP time once a sender report
    /// of its stream says.
    first: Option<(u32, Instant, Option<f64>)>,
    bytes: u64,
    layer_switches: u32,
    /// Video: a keyframe should be asked for (start, loss).
    wants_keyframe: bool,
}

/// The recording of one call. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Recorder {
    call: CallId,
    options: RecordingOptions,
    epoch: Instant,
    tracks: HashMap<TrackKey, TrackRecorder>,
    /// Tracks taken that have not shown their codec yet (the file opens on their first packet).
    pending: HashMap<TrackKey, (UserId, TrackSource)>,
    clocks: HashMap<SessionId, PublisherClock>,
    next_file: u32,
    /// Released packets, reused (no allocation per packet once warm).
    scratch: Vec<Buffered>,
}

impl Recorder {
    pub fn new(call: CallId, options: RecordingOptions, now: Instant) -> Self {
        Recorder {
            call,
            options,
            epoch: now,
            tracks: HashMap::new(),
            pending: HashMap::new(),
            clocks: HashMap::new(),
            next_file: 1,
            scratch: Vec::new(),
        }
    }

    pub fn options(&self) -> &RecordingOptions {
        &self.options
    }

    /// Takes a published track into the recording (its file opens with its first packet).
    pub fn add_track(&mut self, key: TrackKey, user: UserId, source: TrackSource) {
        if !self.tracks.contains_key(&key) {
            self.pending.insert(key, (user, source));
        }
    }

    /// Whether a recorded video track needs simulcast layer `rid` now (the one recorded, or
    /// the one it switches to), for dynacast.
    pub fn wants_layer(&self, key: TrackKey, rid: Option<Rid>) -> bool {
        if self.pending.contains_key(&key) {
            return true; // not started: whichever it will choose
        }
        self.tracks
            .get(&key)
            .is_some_and(|t| t.layer == Some(rid) || t.target == rid)
    }

    /// Video tracks still waiting for a keyframe of their target layer (start, a switch, a
    /// loss): the router asks again (throttled) on its tick.
    pub fn keyframes_wanted(&mut self, out: &mut Vec<(TrackKey, Option<Rid>)>) {
        for (key, track) in &mut self.tracks {
            let switching = track.layer != Some(track.target);
            if matches!(track.writer, Writer::Video { .. }) && (track.wants_keyframe || switching) {
                track.wants_keyframe = false;
                out.push((*key, track.target));
            }
        }
    }

    /// One packet of a recorded track. `codec` comes from the publisher's payload type; for
    /// video `best` is the best simulcast layer the publisher sends now (the one to record).
    /// Returns the layer to request a keyframe of, when one is wanted now.
    pub fn on_packet(
        &mut self,
        key: TrackKey,
        codec: RecCodec,
        best: Option<Rid>,
        packet: RecPacket<'_>,
        out: &mut VecDeque<RecordOutput>,
    ) -> Option<Option<Rid>> {
        if let Some((user, source)) = self.pending.remove(&key) {
            self.open(key, user, source, codec, out);
        }
        if let Some(sender) = packet.sender {
            // Publisher clock: the least (arrival − capture) over all its packets.
            let clock_rate = if codec == RecCodec::Opus {
                OPUS_CLOCK
            } else {
                VIDEO_CLOCK
            };
            let ntp = sender.ntp_of(packet.timestamp, clock_rate);
            let arrival = packet
                .arrival
                .saturating_duration_since(self.epoch)
                .as_secs_f64();
            let clock = self.clocks.entry(key.publisher).or_default();
            let offset = arrival - ntp;
            clock.offset_secs = Some(clock.offset_secs.map_or(offset, |o: f64| o.min(offset)));
        }
        let track = self.tracks.get_mut(&key)?;
        if let Writer::Video { .. } = track.writer {
            if track.target != best {
                track.target = best;
                if track.layer != Some(best) {
                    track.wants_keyframe = true; // a switch begins
                }
            }
            if track.layer != Some(packet.rid) {
                // Not the recorded layer: it may be the target's keyframe that starts it, or,
                // when the recorded layer has stopped (or none has started the file yet: the
                // target may change while dynacast resumes the upper layers), a keyframe of a
                // layer still flowing.
                let starting = track.layer.is_none();
                let stalled = !starting
                    && track.layer_seen.is_some_and(|seen| {
                        packet.arrival.saturating_duration_since(seen) >= RECORDED_LAYER_STALL
                    });
                if !packet.keyframe {
                    if stalled {
                        // Ask this layer for a keyframe (the router throttles the requests).
                        return Some(packet.rid);
                    }
                    return std::mem::take(&mut track.wants_keyframe).then_some(track.target);
                }
                if packet.rid != track.target && !stalled && !starting {
                    return std::mem::take(&mut track.wants_keyframe).then_some(track.target);
                }
                // The old layer's frames go out first, then the new one continues the timeline.
                track.release(&mut self.scratch, true, packet.arrival, &self.call, out);
                if track.layer.is_some() {
                    track.layer_switches += 1;
                    track.timeline.rebase = true;
                }
                track.layer = Some(packet.rid);
                if packet.rid != track.target {
                    // Taken for a stalled layer: the target's own keyframe switches again.
                    track.wants_keyframe = true;
                }
                track.buffer.reset();
                if let Writer::Video { frames, .. } = &mut track.writer {
                    frames.reset();
                }
            }
        }
        if let Writer::Video { .. } = track.writer {
            track.layer_seen = Some(packet.arrival);
        }
        if track.first.is_none() {
            track.first = Some((packet.timestamp, packet.arrival, None));
        }
        if let (Some((ts, _, ntp @ None)), Some(sender)) = (&mut track.first, packet.sender) {
            if track.layer_switches == 0 {
                *ntp = Some(sender.ntp_of(*ts, track.timeline.clock_rate));
            }
        }
        track.buffer.push(packet);
        track.release(&mut self.scratch, false, packet.arrival, &self.call, out);
        std::mem::take(&mut track.wants_keyframe).then_some(track.target)
    }

    /// Time passed: reorder buffers give up on what is missing.
    pub fn tick(&mut self, now: Instant, out: &mut VecDeque<RecordOutput>) {
        for track in self.tracks.values_mut() {
            track.release(&mut self.scratch, false, now, &self.call, out);
        }
    }

    /// A track stopped (unpublished, or its publisher left): its file is finished.
    pub fn remove_track(&mut self, key: TrackKey, now: Instant, out: &mut VecDeque<RecordOutput>) {
        self.pending.remove(&key);
        if let Some(track) = self.tracks.remove(&key) {
            let clock = self.clocks.get(&key.publisher).copied().unwrap_or_default();
            self.finish(track, clock, false, now, out);
        }
    }

    /// The recording stops: every file is finished (audio padded with silence up to now, so
    /// every file ends at the stop).
    pub fn stop(mut self, now: Instant, out: &mut VecDeque<RecordOutput>) {
        let mut tracks: Vec<(TrackKey, TrackRecorder)> = self.tracks.drain().collect();
        tracks.sort_by_key(|(_, t)| t.file.id);
        for (key, track) in tracks {
            let clock = self.clocks.get(&key.publisher).copied().unwrap_or_default();
            self.finish(track, clock, true, now, out);
        }
        out.push_back(RecordOutput::Stopped { call: self.call });
    }

    fn open(
        &mut self,
        key: TrackKey,
        user: UserId,
        source: TrackSource,
        codec: RecCodec,
        out: &mut VecDeque<RecordOutput>,
    ) {
        let (writer, container, clock_rate) = match codec {
            RecCodec::Opus => (
                Writer::Opus(OggOpus::new(self.next_file)),
                Container::Ogg,
                OPUS_CLOCK,
            ),
            RecCodec::Vp8 | RecCodec::Vp9 => (
                Writer::Video {
                    frames: FrameAssembler::new(codec == RecCodec::Vp9),
                    ivf: Ivf::new(codec == RecCodec::Vp9),
                },
                Container::Ivf,
                VIDEO_CLOCK,
            ),
            RecCodec::Other => {
                tracing::info!(call = %self.call, publisher = %key.publisher, "a source in a codec without a recording container is left out");
                return;
            }
        };
        let id = FileId(self.next_file);
        self.next_file += 1;
        let file = RecordedFile {
            id,
            name: format!(
                "{:04}-s{}-{}.{}",
                id.0,
                key.publisher.0,
                source.as_str(),
                container.extension()
            ),
            session: key.publisher,
            user,
            source,
            codec: codec.name().to_owned(),
            container,
        };
        out.push_back(RecordOutput::FileStarted {
            call: self.call.clone(),
            file: file.clone(),
        });
        let video = container == Container::Ivf;
        self.tracks.insert(
            key,
            TrackRecorder {
                file,
                writer,
                buffer: ReorderBuffer::new(if video { VIDEO_REORDER } else { AUDIO_REORDER }),
                timeline: Timeline::new(clock_rate),
                layer: None,
                target: None,
                layer_seen: None,
                first: None,
                bytes: 0,
                layer_switches: 0,
                wants_keyframe: video,
            },
        );
    }

    fn finish(
        &mut self,
        mut track: TrackRecorder,
        clock: PublisherClock,
        pad_to_now: bool,
        now: Instant,
        out: &mut VecDeque<RecordOutput>,
    ) {
        track.release(&mut self.scratch, true, now, &self.call, out);
        let clock_rate = track.timeline.clock_rate;
        if let (Writer::Opus(ogg), true, Some((_, pos, arrival))) =
            (&mut track.writer, pad_to_now, track.timeline.last)
        {
            // Muted (or silent) until the end: the file still lasts until the stop.
            let since = now.saturating_duration_since(arrival).as_secs_f64();
            let end = pos + (since * f64::from(clock_rate)) as u64;
            ogg.fill_to(end);
        }
        let (duration_ticks, frames, silence, broken) = match &mut track.writer {
            Writer::Opus(ogg) => {
                ogg.finish();
                (ogg.samples(), ogg.packets(), ogg.silence_samples(), 0)
            }
            Writer::Video { frames, ivf } => (ivf.last_pts(), ivf.frames(), 0, frames.broken()),
        };
        track.emit(&self.call, out);
        let (start_offset_ms, sync) = match track.first {
            Some((_, _, Some(ntp))) if clock.offset_secs.is_some() => {
                let at = ntp + clock.offset_secs.unwrap_or(0.0);
                ((at * 1000.0).round() as i64, SyncSource::SenderReport)
            }
            Some((_, arrival, _)) => (
                arrival.saturating_duration_since(self.epoch).as_millis() as i64,
                SyncSource::Arrival,
            ),
            None => (0, SyncSource::Arrival),
        };
        out.push_back(RecordOutput::FileFinished {
            call: self.call.clone(),
            summary: FileSummary {
                id: track.file.id,
                start_offset_ms,
                duration_ms: duration_ticks * 1000 / u64::from(clock_rate),
                frames,
                bytes: track.bytes,
                silence_ms: silence * 1000 / u64::from(OPUS_CLOCK),
                lost_packets: track.buffer.lost(),
                broken_frames: broken,
                layer_switches: track.layer_switches,
                sync,
            },
        });
    }
}

impl TrackRecorder {
    /// Writes what the reorder buffer releases (everything with `flush`).
    fn release(
        &mut self,
        scratch: &mut Vec<Buffered>,
        flush: bool,
        now: Instant,
        call: &CallId,
        out: &mut VecDeque<RecordOutput>,
    ) {
        scratch.clear();
        self.buffer.release(now, flush, scratch);
        if scratch.is_empty() {
            return;
        }
        for packet in scratch.drain(..) {
            match &mut self.writer {
                Writer::Opus(ogg) => {
                    let pos = self
                        .timeline
                        .place(packet.timestamp, packet.arrival, packet.sender);
                    ogg.write(&packet.payload[usize::from(packet.offset)..], pos);
                }
                Writer::Video { frames, ivf } => {
                    let Some(frame) = frames.push(&packet) else {
                        continue;
                    };
                    if ivf.frames() == 0 && !frame.keyframe {
                        continue; // a file starts at a keyframe
                    }
                    let pos = self
                        .timeline
                        .place(frame.timestamp, frame.arrival, frame.sender);
                    ivf.write(frames.data(), frame.keyframe, pos);
                }
            }
        }
        if let Writer::Video { frames, .. } = &mut self.writer {
            self.wants_keyframe |= frames.take_wants_keyframe();
        }
        self.emit(call, out);
    }

    /// Hands over the bytes written so far.
    fn emit(&mut self, call: &CallId, out: &mut VecDeque<RecordOutput>) {
        let bytes = match &mut self.writer {
            Writer::Opus(ogg) => ogg.take_bytes(),
            Writer::Video { ivf, .. } => ivf.take_bytes(),
        };
        if !bytes.is_empty() {
            self.bytes += bytes.len() as u64;
            out.push_back(RecordOutput::Data {
                call: call.clone(),
                file: self.file.id,
                bytes,
            });
        }
    }
}

#[cfg(test)]
mod tests;
