//! The slot mapping: which publisher track each subscriber's receive slots carry.
//!
//! - Camera slots: the subscriber's pins first (in its order), then the active speaker's camera,
//!   then recent speakers' cameras, then the other cameras in publish order. A slot keeps its
//!   source while that source is still wanted (no reshuffling); a new source waits on its slot
//!   for a keyframe while the old one goes on (`Slot::next`).
//! - The screen slot: the latest screen share.
//! - Audio slots are taken per packet by the loudest speakers (`forwarding.rs`).
//!
//! Every change the client must know of goes out as a `slots` message before the first packet
//! of the new source; emptied slots are announced at once.

use std::collections::HashSet;
use std::time::Instant;

use super::{Output, Router};
use crate::call::TrackKey;
use crate::ids::{CallId, SessionId, TrackSource};
use crate::signal::{ServerMessage, SlotInfo, SlotKind};
use crate::slot::Feed;

/// Camera ranking buckets (lower first): pins by position, then the active speaker, then
/// recent speakers by recency, then everyone else by publish order.
const RANK_SPEAKER: usize = 1_000;
const RANK_RECENT: usize = 2_000;
const RANK_OTHER: usize = 1_000_000;

impl Router {
    /// Every slot of `session` with what it carries now (inactive ones empty), and the slots a
    /// pending router offer adds (empty), in SDP order.
    pub(super) fn slot_list(&self, session: SessionId) -> Vec<SlotInfo> {
        let Some(state) = self.sessions.get(&session) else {
            return Vec::new();
        };
        let mut list: Vec<SlotInfo> = state
            .slots
            .iter()
            .map(|s| self.slot_info(s.mid, s.kind, s.current.as_ref().map(|f| f.key)))
            .collect();
        if let Some(pending) = &state.pending_offer {
            for &(mid, kind) in &pending.change.added {
                list.push(self.slot_info(mid, kind, None));
            }
        }
        list
    }

    /// One slot's mapping as the client sees it.
    pub(super) fn slot_info(
        &self,
        mid: str0m::media::Mid,
        kind: SlotKind,
        key: Option<TrackKey>,
    ) -> SlotInfo {
        let source = key.and_then(|k| {
            let track = self.tracks.get(&k)?;
            let user = match self.sessions.get(&k.publisher) {
                Some(publisher) => publisher.user.clone(),
                None => self.remote_members.get(&k.publisher)?.user.clone(),
            };
            Some((k.publisher, user, track.source))
        });
        SlotInfo {
            mid: mid.to_string(),
            kind,
            session: source.as_ref().map(|s| s.0),
            user: source.as_ref().map(|s| s.1.clone()),
            source: source.map(|s| s.2),
        }
    }

    /// Tells `session` what its slots in `changed` carry now (a `slots` message with just
    /// those), for the ones whose mapping differs from what it was last told.
    pub(super) fn tell_slots(&mut self, session: SessionId, changed: &[str0m::media::Mid]) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let mut news = Vec::new();
        for slot in state.slots.iter_mut().filter(|s| changed.contains(&s.mid)) {
            let now_carries = slot.current.as_ref().map(|f| f.key);
            if slot.told != now_carries {
                slot.told = now_carries;
                news.push((slot.mid, slot.kind, now_carries));
            }
        }
        if news.is_empty() {
            return;
        }
        let slots = news
            .into_iter()
            .map(|(mid, kind, key)| self.slot_info(mid, kind, key))
            .collect();
        self.counters.snapshot.slot_messages += 1;
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Slots { slots }));
    }

    /// Recomputes the video mapping of every member of `call` (but `except`) after the current
    /// input.
    pub(super) fn remap_call(&mut self, call: &CallId, except: Option<SessionId>) {
        let Some(c) = self.calls.get(call) else {
            return;
        };
        // An audio-only call has nothing to map (unpublishing already emptied the slots of a
        // track that went): a speaker change in a 1000-person meeting costs nothing here.
        let has_video = c
            .tracks
            .iter()
            .any(|k| self.tracks.get(k).is_some_and(|t| !t.is_audio()));
        if !has_video {
            return;
        }
        for member in &c.members {
            if Some(*member) != except && !self.remap.contains(member) {
                self.remap.push(*member);
            }
        }
    }

    /// Puts the right cameras and screen on `session`'s video slots (see the module docs).
    pub(super) fn map_video(&mut self, session: SessionId, now: Instant) {
        let Some(state) = self.sessions.get(&session) else {
            return;
        };
        if state.slots.is_empty() {
            return;
        }
        let Some(call) = self.calls.get(&state.call) else {
            return;
        };
        let speaker = call.speakers.active();
        let mut cameras: Vec<(usize, TrackKey)> = Vec::new();
        let mut screen = None;
        for (order, key) in call.tracks.iter().enumerate() {
            if key.publisher == session {
                continue;
            }
            let Some(track) = self.tracks.get(key) else {
                continue;
            };
            match track.source {
                TrackSource::Screen => screen = Some(*key),
                TrackSource::Camera => {
                    let publisher = key.publisher;
                    let rank = if let Some(p) = state.pins.iter().position(|s| *s == publisher) {
                        p
                    } else if speaker == Some(publisher) {
                        RANK_SPEAKER
                    } else if let Some(r) =
                        call.recent_speakers.iter().position(|s| *s == publisher)
                    {
                        RANK_RECENT + r
                    } else {
                        RANK_OTHER + order
                    };
                    cameras.push((rank, *key));
                }
                TrackSource::Microphone => {}
            }
        }
        cameras.sort_unstable();
        let camera_slots = state
            .slots
            .iter()
            .filter(|s| s.kind == SlotKind::Camera && s.active)
            .count();
        let desired: Vec<TrackKey> = cameras
            .into_iter()
            .take(camera_slots)
            .map(|(_, k)| k)
            .collect();
        let mut changed = self.place(session, SlotKind::Camera, &desired);
        changed.extend(self.place(session, SlotKind::Screen, screen.as_slice()));
        self.tell_slots(session, &changed);
        self.allocate(session, now);
    }

    /// Puts the `desired` tracks on `session`'s active slots of `kind`: a slot keeps a source
    /// that is still desired; the others get the remaining desired sources (empty slots first)
    /// as their next source, or are emptied. Returns the slots emptied (to be told).
    fn place(
        &mut self,
        session: SessionId,
        kind: SlotKind,
        desired: &[TrackKey],
    ) -> Vec<str0m::media::Mid> {
        let Some(state) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        let mut placed: HashSet<TrackKey> = HashSet::with_capacity(desired.len());
        let mut dropped: Vec<TrackKey> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        for (i, slot) in state.slots.iter_mut().enumerate() {
            if slot.kind != kind || !slot.active {
                continue;
            }
            let current = slot.current.as_ref().map(|f| f.key);
            let next = slot.next.as_ref().map(|f| f.key);
            if let Some(c) = current.filter(|c| desired.contains(c) && !placed.contains(c)) {
                // Still wanted: keep it, and forget a switch away from it.
                placed.insert(c);
                if let Some(n) = slot.next.take() {
                    dropped.push(n.key);
                }
                continue;
            }
            if let Some(n) = next.filter(|n| desired.contains(n) && !placed.contains(n)) {
                placed.insert(n);
                continue;
            }
            free.push(i);
        }
        // Empty slots first: a slot still showing someone keeps showing them if it can.
        free.sort_by_key(|&i| state.slots[i].target().is_some());
        let mut free = free.into_iter();
        let mut added = Vec::new();
        for key in desired.iter().filter(|k| !placed.contains(k)) {
            let Some(i) = free.next() else {
                break;
            };
            let slot = &mut state.slots[i];
            if let Some(n) = slot.next.replace(Feed::new(*key)) {
                dropped.push(n.key);
            }
            added.push(*key);
        }
        let mut emptied = Vec::new();
        for i in free {
            let slot = &mut state.slots[i];
            dropped.extend(slot.current.iter().chain(slot.next.iter()).map(|f| f.key));
            if slot.target().is_some() {
                slot.clear();
                emptied.push(slot.mid);
            }
        }
        state.refresh_video_feeds();
        for key in added {
            if let Some(track) = self.tracks.get_mut(&key) {
                if !track.subscribers.contains(&session) {
                    track.subscribers.push(session);
                }
            }
        }
        for key in dropped {
            self.forget_subscriber(key, session);
        }
        emptied
    }

    /// Takes `session` off `key`'s subscriber list unless one of its slots still holds it.
    pub(super) fn forget_subscriber(&mut self, key: TrackKey, session: SessionId) {
        let holds = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.slots.iter().any(|slot| slot.holds(key)));
        if holds {
            return;
        }
        if let Some(track) = self.tracks.get_mut(&key) {
            track.subscribers.retain(|s| *s != session);
        }
    }

    /// `key` is gone: the slots of `holder` that carried it (or waited for it) let it go, and
    /// the client hears of slots left empty. Camera slots are refilled by the remap that
    /// follows an unpublish.
    pub(super) fn empty_slots_of(&mut self, holder: SessionId, key: TrackKey) {
        let Some(state) = self.sessions.get_mut(&holder) else {
            return;
        };
        let mut emptied = Vec::new();
        for slot in &mut state.slots {
            if slot.next.as_ref().is_some_and(|f| f.key == key) {
                slot.next = None;
            }
            if slot.current.as_ref().is_some_and(|f| f.key == key) {
                slot.current = None;
                slot.rewriter.pause();
                emptied.push(slot.mid);
            }
        }
        state.refresh_video_feeds();
        if !emptied.is_empty() {
            self.tell_slots(holder, &emptied);
        }
    }
}
