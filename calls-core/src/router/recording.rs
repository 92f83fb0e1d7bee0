//! Recording commands and the router's side of the recording tap (`record/`): which tracks a
//! call's recording takes, telling the participants, asking for keyframes, ending files when
//! sources stop. The per-packet hand-off is in `forwarding.rs` (one branch on
//! `PublishedTrack::recorded` when nothing is recorded).

use std::time::Instant;

use str0m::media::Rid;

use super::{Output, Router};
use crate::call::{PublishedTrack, TrackKey};
use crate::error::RouterError;
use crate::ids::{CallId, SessionId};
use crate::record::{RecordOutput, Recorder, RecordingOptions};
use crate::signal::ServerMessage;

impl Router {
    /// Starts recording a call: from now on the sources `options` names (and that the
    /// publishers' [`Grants::recordable`](crate::Grants::recordable) allow) are written into
    /// files, handed out as [`Output::Record`] ([`RecordOutput`]): `Started`, then per source
    /// `FileStarted`, `Data`…, `FileFinished`. Participants who publish later are taken too.
    /// Every member is told ([`ServerMessage::Recording`]), and so is everyone who joins while
    /// it runs. Video starts at a keyframe, which is requested now.
    ///
    /// ```no_run
    /// # use std::time::Instant;
    /// # use calls_core::{CallId, Config, Output, Router};
    /// # use calls_core::record::{RecordOutput, RecordingOptions};
    /// # let mut router = Router::new(Config::default(), Instant::now()).unwrap();
    /// let call = CallId::from("standup");
    /// router.start_recording(&call, RecordingOptions::everyone(), Instant::now())?;
    /// // ... in the drive loop:
    /// match router.poll_output() {
    ///     Output::Record(RecordOutput::FileStarted { file, .. }) => { /* create file.name */ }
    ///     Output::Record(RecordOutput::Data { file, bytes, .. }) => { /* append bytes */ }
    ///     _ => {}
    /// }
    /// # Ok::<(), calls_core::RouterError>(())
    /// ```
    pub fn start_recording(
        &mut self,
        call: &CallId,
        options: RecordingOptions,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let c = self
            .calls
            .get_mut(call)
            .ok_or_else(|| RouterError::UnknownCall(call.clone()))?;
        if c.recorder.is_some() {
            return Err(RouterError::AlreadyRecording(call.clone()));
        }
        c.recorder = Some(Box::new(Recorder::new(call.clone(), options.clone(), now)));
        let tracks = c.tracks.clone();
        self.counters.snapshot.recordings_started += 1;
        self.record_out.push_back(RecordOutput::Started {
            call: call.clone(),
            options,
        });
        tracing::info!(%call, "recording started");
        for key in tracks {
            self.record_if_taken(key, now);
        }
        self.announce_recording(call, true);
        self.finish(now);
        Ok(())
    }

    /// Stops a call's recording: what the reorder buffers hold is written, every file is
    /// finished (`FileFinished` with its start offset and duration), then `Stopped`. Every
    /// member is told.
    pub fn stop_recording(&mut self, call: &CallId, now: Instant) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let recorder = self
            .calls
            .get_mut(call)
            .ok_or_else(|| RouterError::UnknownCall(call.clone()))?
            .recorder
            .take()
            .ok_or_else(|| RouterError::NotRecording(call.clone()))?;
        self.end_recording(call, recorder, now);
        self.announce_recording(call, false);
        self.finish(now);
        Ok(())
    }

    /// Whether a call is being recorded.
    pub fn is_recording(&self, call: &CallId) -> bool {
        self.calls.get(call).is_some_and(|c| c.recorder.is_some())
    }

    /// Finishes a recording taken out of its call (stopped, or the call ended).
    pub(super) fn end_recording(&mut self, call: &CallId, recorder: Box<Recorder>, now: Instant) {
        let tracks = self
            .calls
            .get(call)
            .map(|c| c.tracks.clone())
            .unwrap_or_default();
        for key in tracks {
            if let Some(track) = self.tracks.get_mut(&key) {
                if std::mem::replace(&mut track.recorded, false) && !track.is_audio() {
                    self.dynacast.push(key); // the recorded layer may pause now
                }
            }
        }
        recorder.stop(now, &mut self.record_out);
        tracing::info!(%call, "recording stopped");
    }

    /// A published track joins its call's recording if the recording takes it (its source,
    /// its publisher, the publisher's grants). Video asks for a keyframe at once.
    pub(super) fn record_if_taken(&mut self, key: TrackKey, now: Instant) {
        let Some(state) = self.sessions.get(&key.publisher) else {
            return;
        };
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        let Some(recorder) = self
            .calls
            .get_mut(&state.call)
            .and_then(|c| c.recorder.as_deref_mut())
        else {
            return;
        };
        if !state.grants.recordable || !recorder.options().takes(key.publisher, track.source) {
            return;
        }
        recorder.add_track(key, state.user.clone(), track.source);
        track.recorded = true;
        if !track.is_audio() {
            let best = best_layer(track, now);
            self.request_keyframe(key, best, now, true);
            self.dynacast.push(key);
        }
    }

    /// A recorded track stopped (unpublished, or its publisher left): its file is finished.
    pub(super) fn unrecord(&mut self, call: &CallId, key: TrackKey, now: Instant) {
        if let Some(recorder) = self
            .calls
            .get_mut(call)
            .and_then(|c| c.recorder.as_deref_mut())
        {
            recorder.remove_track(key, now, &mut self.record_out);
        }
    }

    /// Every tick: reorder buffers give up on what is missing, and video that still waits for
    /// a keyframe (start, loss, a layer switch) asks again (throttled per layer).
    pub(super) fn recording_tick(&mut self, now: Instant) {
        let mut wanted: Vec<(TrackKey, Option<Rid>)> = Vec::new();
        for call in self.calls.values_mut() {
            if let Some(recorder) = call.recorder.as_deref_mut() {
                recorder.tick(now, &mut self.record_out);
                recorder.keyframes_wanted(&mut wanted);
            }
        }
        for (key, rid) in wanted {
            self.request_keyframe(key, rid, now, false);
        }
    }

    /// Tells every member of `call` whether it is recorded now (and whether their own sources
    /// are in it).
    fn announce_recording(&mut self, call: &CallId, active: bool) {
        let Some(c) = self.calls.get(call) else {
            return;
        };
        for member in &c.members {
            let msg = self.recording_message(c.recorder.as_deref(), *member, active);
            self.outputs.push_back(Output::Signal(*member, msg));
        }
    }

    /// The [`ServerMessage::Recording`] for one member.
    pub(super) fn recording_message(
        &self,
        recorder: Option<&Recorder>,
        member: SessionId,
        active: bool,
    ) -> ServerMessage {
        let recorded = active
            && self
                .sessions
                .get(&member)
                .is_some_and(|s| s.grants.recordable)
            && recorder.is_some_and(|r| {
                r.options()
                    .sessions
                    .as_ref()
                    .is_none_or(|list| list.contains(&member))
            });
        ServerMessage::Recording { active, recorded }
    }
}

/// The simulcast layer a recording takes: the best one the publisher sends (or that dynacast
/// paused and can resume). `None` for a track without simulcast.
pub(super) fn best_layer(track: &PublishedTrack, now: Instant) -> Option<Rid> {
    track
        .layers
        .iter()
        .rev()
        .find(|layer| layer.available(now))
        .and_then(|layer| layer.rid)
}
