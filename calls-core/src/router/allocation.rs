//! Allocation: sharing each subscriber's bandwidth estimate among its video slots (with
//! hysteresis), the subscriber's slot preferences, dynacast (which layers a publisher needs to
//! send at all) and the periodic tick (active speaker, pending upgrades, parking idle streams).

use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::media::{Mid, Rid};

use super::{Event, Output, Router};
use crate::call::{TrackKey, RECENT_SPEAKERS};
use crate::error::SignalError;
use crate::ids::{SessionId, TrackSource};
use crate::layers::{
    self, Choice, Want, AUDIO_RESERVE_BPS, DYNACAST_PAUSE_AFTER, UPGRADE_HOLD, UPGRADE_MARGIN,
};
use crate::load::LoadLevel;
use crate::session::INITIAL_ESTIMATE_BPS;
use crate::signal::ServerMessage;

/// How far above the rate an upgrade needs the estimator is asked to probe.
const PROBE_HEADROOM: f64 = 1.1;

/// Allocation priority of a video slot's source for one subscriber: the screen, then the
/// active speaker and pinned participants, then the others.
fn priority(
    source: TrackSource,
    publisher: SessionId,
    speaker: Option<SessionId>,
    pinned: bool,
) -> u8 {
    match source {
        TrackSource::Screen => 3,
        _ if speaker == Some(publisher) || pinned => 2,
        _ => 1,
    }
}

impl Router {
    /// Shares `session`'s bandwidth among its video slots (see
    /// [`layers::allocate`]): downgrades at once, upgrades after [`UPGRADE_HOLD`] above the
    /// new cost × [`UPGRADE_MARGIN`]. Tells str0m's estimator what to probe for.
    /// Measures the subscriber's audio with transport-cc only while it gets video
    /// ([`crate::session::Session::measure_audio_with_video`]).
    ///
    /// The router's CPU is a budget too (see [`crate::load`]): from [`LoadLevel::Degraded`]
    /// every slot is capped at its lowest spatial layer (fewer, smaller packets to encrypt and
    /// send), at [`LoadLevel::Overloaded`] camera slots are paused (a screen share keeps its
    /// lowest layer). Audio is never touched.
    pub(super) fn allocate(&mut self, session: SessionId, now: Instant) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        state.measure_audio_with_video();
        let state = &*state;
        if state.video_feeds() == 0 {
            return;
        }
        let estimate = state.bwe_estimate.unwrap_or(INITIAL_ESTIMATE_BPS);
        let budget = state
            .bandwidth_cap
            .map_or(estimate, |cap| cap.min(estimate));
        let speaker = self
            .calls
            .get(&state.call)
            .and_then(|c| c.speakers.active());
        let audio = state
            .slots
            .iter()
            .filter(|s| !s.is_video() && s.current.is_some())
            .count();
        let reserve = AUDIO_RESERVE_BPS * audio as u64;
        let load = self.load.level();
        let feeds = state.video_feeds();
        let mut indices: Vec<usize> = Vec::with_capacity(feeds);
        let mut wants: Vec<Want> = Vec::with_capacity(feeds);
        // What each slot would take without the CPU cap: the rate str0m's estimator is asked
        // to reach stays there while the router sheds, so the estimate does not decay to the
        // shed rate and recovery need not re-probe the link from the bottom.
        let mut unshed: Vec<(Option<usize>, bool)> = Vec::with_capacity(feeds);
        for (index, slot) in state.slots.iter().enumerate() {
            if !slot.active || !slot.is_video() {
                continue;
            }
            let Some(feed) = slot.target() else {
                continue;
            };
            let Some(track) = self.tracks.get(&feed.key) else {
                continue;
            };
            if track.layers.is_empty() {
                continue;
            }
            let mut choices = Vec::new();
            layers::choices(&track.layers, now, &mut choices);
            if choices.is_empty() {
                continue; // every layer stalled: keep waiting on the current one
            }
            let mut max = layers::max_choice(&track.layers, &choices, slot.max_layer);
            let mut paused = slot.paused;
            unshed.push((max, paused));
            if load >= LoadLevel::Degraded {
                let lowest = layers::max_choice(&track.layers, &choices, Some(0)).unwrap_or(0);
                max = Some(max.map_or(lowest, |m| m.min(lowest)));
                paused |= load >= LoadLevel::Overloaded && track.source != TrackSource::Screen;
            }
            let pinned = state.pins.contains(&feed.key.publisher);
            indices.push(index);
            wants.push(Want {
                priority: priority(track.source, feed.key.publisher, speaker, pinned),
                choices,
                max,
                paused,
            });
        }
        let video_budget = budget.saturating_sub(reserve);
        let down = layers::allocate(video_budget, &wants);
        let up = layers::allocate((video_budget as f64 / UPGRADE_MARGIN) as u64, &wants);

        let mut video_wanted_bps: u64 = 0;
        let mut changed: Vec<(TrackKey, Option<Rid>)> = Vec::new();
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        for (i, &index) in indices.iter().enumerate() {
            let crate::slot::Slot {
                next,
                current,
                rewriter,
                ..
            } = &mut state.slots[index];
            let waiting = next.is_some();
            let Some(feed) = next.as_mut().or(current.as_mut()) else {
                continue;
            };
            let key = feed.key;
            let Some(track) = self.tracks.get(&key) else {
                continue;
            };
            let out = feed;
            let w = &wants[i];
            let rid_of = |c: &Choice| track.layers.get(c.layer).and_then(|l| l.rid);
            let current = out.sel.target.and_then(|(rid, tid)| {
                w.choices
                    .iter()
                    .position(|c| rid_of(c) == rid && c.tid == tid)
            });
            let new = match current {
                // Fresh, or its layer stopped: whatever fits now.
                None => down[i],
                Some(c) if down[i].is_none_or(|d| d < c) => down[i],
                Some(c) if up[i].is_some_and(|u| u > c) => {
                    let since = *out.sel.upgrade_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= UPGRADE_HOLD {
                        up[i]
                    } else {
                        Some(c)
                    }
                }
                Some(c) => {
                    out.sel.upgrade_since = None;
                    Some(c)
                }
            };
            if new != current || (new.is_none() && out.sel.target.is_some()) {
                out.sel.upgrade_since = None;
                let before = out.sel.target;
                out.sel.target = new.map(|k| (rid_of(&w.choices[k]), w.choices[k].tid));
                // A source waiting for its keyframe has not started: nothing to pause.
                if out.sel.target.is_none() && !waiting {
                    out.sel.current = None;
                    rewriter.pause();
                } else if before.is_none() && !track.is_simulcast() && !waiting {
                    rewriter.pause(); // resumes at the next keyframe
                }
                let new_rid = out.sel.target.and_then(|t| t.0);
                if out.sel.target.is_some()
                    && (out.sel.current != new_rid || before.is_none())
                    && track.is_simulcast()
                {
                    out.sel.switch_started = Some(now);
                }
                if out.sel.target.is_some() && before.map(|b| b.0) != Some(new_rid) {
                    changed.push((key, new_rid));
                }
                self.dynacast.push(key);
            }
            let (max, paused) = unshed[i];
            let top = max
                .unwrap_or(usize::MAX)
                .min(w.choices.len().saturating_sub(1));
            if let Some(top) = w.choices.get(top).filter(|_| !paused) {
                video_wanted_bps += top.bps;
            }
        }
        // Probe for what the subscriber would like (str0m sends probe clusters when the desired
        // rate rises above the estimate). An upgrade needs the estimate UPGRADE_MARGIN above
        // the layers' cost, so that is what is probed for (with headroom: an estimate settles
        // a little under the probed rate). Asking for the bare cost deadlocked: an estimate
        // between the cost and cost × margin was never probed higher, and the slot stayed a
        // layer down for good. No sustained padding: at one padding stream per subscriber, a
        // big call would spend more on padding than on media.
        let wanted_bps =
            reserve + (video_wanted_bps as f64 * UPGRADE_MARGIN * PROBE_HEADROOM) as u64;
        let minimum = 0;
        if state.bwe_asked != (minimum, wanted_bps) {
            state.bwe_asked = (minimum, wanted_bps);
            state
                .rtc
                .bwe()
                .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(wanted_bps.max(1)));
            self.touch(session);
        }
        for (key, rid) in changed {
            self.request_keyframe(key, rid, now, true);
        }
    }

    /// [`ClientMessage::Preference`](crate::ClientMessage::Preference): per camera or screen
    /// slot, whoever it carries.
    pub(super) fn set_preference(
        &mut self,
        session: SessionId,
        mid: &str,
        paused: bool,
        max_layer: Option<u8>,
        now: Instant,
    ) -> Result<(), SignalError> {
        let Some(state) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        let index = state
            .slot_by_mid(Mid::from(mid))
            .filter(|&i| state.slots[i].is_video())
            .ok_or_else(|| SignalError::UnknownMid(mid.to_owned()))?;
        let slot = &mut state.slots[index];
        slot.paused = paused;
        slot.max_layer = max_layer;
        self.allocate(session, now);
        Ok(())
    }

    /// Dynacast for one simulcast track: layers no subscriber has wanted for
    /// [`DYNACAST_PAUSE_AFTER`] are paused at the publisher; a wanted layer is resumed at once.
    pub(super) fn update_dynacast(&mut self, key: TrackKey, now: Instant) {
        let Some(track) = self.tracks.get(&key) else {
            return;
        };
        if !track.is_simulcast() {
            return;
        }
        let mut needed = [false; crate::call::MAX_LAYERS];
        for sub in &track.subscribers {
            let Some(s) = self.sessions.get(sub) else {
                continue;
            };
            for slot in s.slots.iter().filter(|slot| slot.holds(key)) {
                let frozen = slot.next.as_ref().is_some_and(|n| n.key != key);
                let feed = if frozen {
                    slot.current.as_ref()
                } else {
                    slot.target()
                };
                let Some(feed) = feed else {
                    continue;
                };
                for (i, layer) in track.layers.iter().enumerate() {
                    // A source about to be replaced keeps only the layer it forwards.
                    let wanted = if frozen {
                        feed.sel.current == layer.rid
                    } else {
                        feed.sel.target.is_some_and(|t| t.0 == layer.rid)
                            || (feed.sel.target.is_some() && feed.sel.current == layer.rid)
                    };
                    needed[i] |= wanted;
                }
            }
        }
        // A recording keeps the layer it records (and the one it switches to).
        let recorder = track
            .recorded
            .then(|| self.sessions.get(&key.publisher))
            .flatten()
            .and_then(|s| self.calls.get(&s.call))
            .and_then(|c| c.recorder.as_deref());
        if let Some(recorder) = recorder {
            for (i, layer) in track.layers.iter().enumerate() {
                needed[i] |= recorder.wants_layer(key, layer.rid);
            }
        }
        // Other routers keep the layers they want (dynacast across relay links).
        if !track.exports.is_empty() {
            match self.relay.demanded(&track.exports) {
                None => needed = [true; crate::call::MAX_LAYERS],
                Some(rids) => {
                    for (i, layer) in track.layers.iter().enumerate() {
                        needed[i] |= layer.rid.is_some_and(|r| rids.contains(&r));
                    }
                }
            }
        }
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        let mut active: Vec<Rid> = Vec::with_capacity(track.layers.len());
        for (i, layer) in track.layers.iter_mut().enumerate() {
            let keep = if needed[i] {
                layer.unneeded_since = None;
                true
            } else {
                let since = *layer.unneeded_since.get_or_insert(now);
                let keep = now.saturating_duration_since(since) < DYNACAST_PAUSE_AFTER;
                keep && layer.sending
            };
            if let Some(rid) = layer.rid {
                if keep {
                    active.push(rid);
                }
            }
        }
        let all_sending = track.announced.is_none();
        let everything = active.len() == track.layers.len();
        if (all_sending && everything) || track.announced.as_ref() == Some(&active) {
            return;
        }
        for layer in &mut track.layers {
            let sending = layer.rid.is_some_and(|r| active.contains(&r));
            if sending && !layer.sending {
                // Give the publisher time to start it before calling it stalled.
                layer.last_seen = now;
            }
            layer.sending = sending;
        }
        track.announced = Some(active.clone());
        self.counters.snapshot.dynacast_updates += 1;
        if self.relay_layer_demand(key, &active, now) {
            return; // an imported track: its exporter hears what this router wants
        }
        let msg = ServerMessage::Layers {
            mid: key.mid.to_string(),
            active: active.iter().map(|r| r.to_string()).collect(),
        };
        self.outputs.push_back(Output::Signal(key.publisher, msg));
    }

    /// Every [`super::TICK`]: active speakers, allocation (pending upgrades, stalled layers),
    /// dynacast pauses.
    pub(super) fn tick(&mut self, now: Instant) {
        let mut speaker_changes: Vec<(crate::ids::CallId, Option<SessionId>)> = Vec::new();
        for (id, call) in &mut self.calls {
            if let Some(change) = call.speakers.tick(now) {
                speaker_changes.push((id.clone(), change));
            }
        }
        for (call, session) in speaker_changes {
            self.counters.snapshot.speaker_changes += 1;
            self.broadcast(&call, None, ServerMessage::Speaker { session });
            self.outputs.push_back(Output::Event(Event::SpeakerChanged {
                call: call.clone(),
                session,
            }));
            // The speaker's camera goes on everyone's slots (and gets priority there).
            if let Some(c) = self.calls.get_mut(&call) {
                if let Some(speaker) = session {
                    c.recent_speakers.retain(|s| *s != speaker);
                    c.recent_speakers.insert(0, speaker);
                    c.recent_speakers.truncate(RECENT_SPEAKERS);
                }
            }
            self.remap_call(&call, None);
        }
        let sessions: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.video_feeds() > 0)
            .map(|(id, _)| *id)
            .collect();
        for session in sessions {
            self.allocate(session, now);
        }
        let tracks: Vec<TrackKey> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.is_simulcast())
            .map(|(k, _)| *k)
            .collect();
        for key in tracks {
            self.update_dynacast(key, now);
        }
        for state in self.sessions.values_mut() {
            self.counters.snapshot.streams_parked += state.park_idle(now) as u64;
        }
        self.recording_tick(now);
        self.apply_listener_loss();
        self.relay_tick(now);
    }
}
