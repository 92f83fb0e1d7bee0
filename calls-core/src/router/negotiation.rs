//! Negotiation: signaling messages, SDP offers and answers, and what they change.
//!
//! The client offers what it publishes; each sending m-line becomes a published track
//! (`on_media`). After its first offer the router offers the client's receive slots (`A` audio,
//! `V` camera, one screen) — the only router offers there are, apart from the one that follows a
//! `slots` request. Others joining or publishing never renegotiate anyone: they change the slot
//! mapping (`slots.rs`).

use std::cmp::Reverse;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::Candidate;

use super::{later, Deadline, Event, Output, Router, MAX_OFFER_RESENDS, OFFER_RESEND_AFTER};
use crate::call::{PublishedTrack, TrackKey};
use crate::error::{RouterError, SignalError};
use crate::ids::{SessionId, TrackSource};
use crate::session::{restrict_offer, PendingOffer, SlotChange};
use crate::signal::{ClientMessage, ServerMessage, SlotKind, MAX_PINS};
use crate::slot::Slot;

impl Router {
    /// Feeds one signaling message from a participant. A refused message is answered with a
    /// [`ServerMessage::Error`] to that participant and returned as an error; the session and
    /// everyone else go on.
    pub fn handle_signal(
        &mut self,
        session: SessionId,
        msg: ClientMessage,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        self.counters.snapshot.signals_in += 1;
        let result = self.apply_signal(session, msg, now);
        self.finish(now);
        result.map_err(|error| self.refuse_signal(session, error))
    }

    /// Like [`handle_signal`](Self::handle_signal), from JSON text.
    pub fn handle_signal_json(
        &mut self,
        session: SessionId,
        text: &str,
        now: Instant,
    ) -> Result<(), RouterError> {
        if !self.sessions.contains_key(&session) {
            return Err(RouterError::UnknownSession(session));
        }
        match ClientMessage::from_json(text) {
            Ok(msg) => self.handle_signal(session, msg, now),
            Err(error) => {
                self.counters.snapshot.signals_in += 1;
                Err(self.refuse_signal(session, error))
            }
        }
    }

    /// A router offer went unanswered for `OFFER_RESEND_AFTER`: the client may have lost it
    /// (a dropped signaling connection, a client bug). Send it again, a few times, unchanged.
    pub(super) fn resend_offer(&mut self, session: SessionId, now: Instant) {
        let Some(pending) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.pending_offer.as_mut())
        else {
            return;
        };
        if now.saturating_duration_since(pending.sent_at) < OFFER_RESEND_AFTER {
            return;
        }
        if pending.resends >= MAX_OFFER_RESENDS {
            tracing::info!(%session, "router offer never answered; giving up on re-sending it");
            return;
        }
        pending.resends += 1;
        pending.sent_at = now;
        tracing::debug!(%session, resend = pending.resends, "re-sending an unanswered router offer");
        self.deadlines.push(Reverse((
            later(now, OFFER_RESEND_AFTER),
            session,
            Deadline::OfferResend,
        )));
        let _ = self.resend_signaling(session);
    }

    fn refuse_signal(&mut self, session: SessionId, error: SignalError) -> RouterError {
        self.counters.snapshot.signal_errors += 1;
        tracing::debug!(%session, "signal refused: {error}");
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::error(&error)));
        RouterError::Signal { session, error }
    }

    fn apply_signal(
        &mut self,
        session: SessionId,
        msg: ClientMessage,
        now: Instant,
    ) -> Result<(), SignalError> {
        match msg {
            ClientMessage::Offer { sdp, screen_mid } => {
                self.on_client_offer(session, &sdp, screen_mid, now)
            }
            ClientMessage::Answer { sdp } => self.on_client_answer(session, &sdp, now),
            ClientMessage::Candidate { candidate } => {
                let line = candidate.trim();
                let line = line.strip_prefix("a=").unwrap_or(line);
                if line.is_empty() {
                    return Ok(()); // end-of-candidates
                }
                let parsed = Candidate::from_sdp_string(line)
                    .map_err(|e| SignalError::Candidate(e.to_string()))?;
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.rtc.add_remote_candidate(parsed);
                }
                self.drain(session, now);
                Ok(())
            }
            ClientMessage::Mute => {
                self.set_muted(session, true, now).ok();
                Ok(())
            }
            ClientMessage::Unmute => {
                let allowed = self
                    .sessions
                    .get(&session)
                    .is_some_and(|s| s.grants.publish_audio);
                if !allowed {
                    return Err(SignalError::NotAllowed(
                        "this session may not publish audio",
                    ));
                }
                self.set_muted(session, false, now).ok();
                Ok(())
            }
            ClientMessage::ScreenOn { mid } => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return Ok(());
                };
                if !state.grants.publish_screen {
                    return Err(SignalError::NotAllowed(
                        "this session may not share its screen",
                    ));
                }
                let mid = Mid::from(mid.as_str());
                state.screen_mid = Some(mid);
                let key = TrackKey {
                    publisher: session,
                    mid,
                };
                let was_camera = self.tracks.get_mut(&key).is_some_and(|track| {
                    let camera = track.source == TrackSource::Camera;
                    if camera {
                        track.source = TrackSource::Screen;
                    }
                    camera
                });
                if was_camera {
                    // Published as a camera before the client said what it is.
                    let call = state.call.clone();
                    let user = state.user.clone();
                    self.broadcast_published(&call, session, &user, TrackSource::Camera, false);
                    self.broadcast_published(&call, session, &user, TrackSource::Screen, true);
                    self.remap_call(&call, Some(session));
                }
                Ok(())
            }
            ClientMessage::ScreenOff => {
                let Some(state) = self.sessions.get_mut(&session) else {
                    return Ok(());
                };
                if let Some(mid) = state.screen_mid.take() {
                    self.unpublish(
                        TrackKey {
                            publisher: session,
                            mid,
                        },
                        now,
                    );
                }
                Ok(())
            }
            ClientMessage::Pin { sessions } => {
                if sessions.len() > MAX_PINS {
                    return Err(SignalError::Invalid("more pins than allowed (25)"));
                }
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.pins = sessions;
                    self.map_video(session, now);
                }
                Ok(())
            }
            ClientMessage::Slots { video } => {
                let video = usize::from(video);
                if video > self.config.max_video_slots {
                    return Err(SignalError::Invalid(
                        "more camera slots than `max_video_slots` allows",
                    ));
                }
                if let Some(state) = self.sessions.get_mut(&session) {
                    if state.video_slots != video {
                        state.video_slots = video;
                        self.queue_offer(session);
                    }
                }
                Ok(())
            }
            ClientMessage::Preference {
                mid,
                paused,
                max_layer,
            } => self.set_preference(session, &mid, paused, max_layer, now),
        }
    }

    fn on_client_offer(
        &mut self,
        session: SessionId,
        sdp: &str,
        screen_mid: Option<String>,
        now: Instant,
    ) -> Result<(), SignalError> {
        let facts = crate::limits::check_offer(sdp, screen_mid.as_deref(), &self.config)?; // issue 16
        let Some(state) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        state.remote_ice = facts.remote_ice.or(state.remote_ice.take()); // issue 16: consent
        if let Some(mid) = &screen_mid {
            if state.grants.publish_screen {
                state.screen_mid = Some(Mid::from(mid.as_str()));
            }
        }
        let (sdp, restricted) = restrict_offer(sdp, state.grants, screen_mid.as_deref());
        if restricted > 0 {
            tracing::info!(%session, restricted, "offer restricted by grants");
        }
        let offer = SdpOffer::from_sdp_string(&sdp).map_err(|e| SignalError::Sdp(e.to_string()))?;
        if let Some(pending) = state.pending_offer.take() {
            // Glare: the client's offer wins. str0m rolls our offer back in accept_offer: the
            // m-lines it added never existed, and the slots it turned off stay on.
            for index in pending.change.deactivated {
                if let Some(slot) = state.slots.get_mut(index) {
                    slot.active = true;
                }
            }
            self.counters.snapshot.glare_rollbacks += 1;
            tracing::debug!(%session, "glare: the client's offer wins; ours is re-offered after the answer");
        }
        let answer = state
            .with_streams_declared(|rtc| rtc.sdp_api().accept_offer(offer))
            .map_err(|e| SignalError::Sdp(e.to_string()))?;
        state.negotiated = true;
        self.outputs.push_back(Output::Signal(
            session,
            ServerMessage::Answer {
                sdp: answer.to_sdp_string(),
            },
        ));
        self.drain(session, now);
        // The slots go out now if they never did (the first offer, or glare).
        self.queue_offer(session);
        Ok(())
    }

    fn on_client_answer(
        &mut self,
        session: SessionId,
        sdp: &str,
        now: Instant,
    ) -> Result<(), SignalError> {
        let Some(state) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        let Some(pending) = state.pending_offer.take() else {
            return Err(SignalError::UnexpectedAnswer);
        };
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| SignalError::Sdp(e.to_string()))?;
        let accepted =
            state.with_streams_declared(|rtc| rtc.sdp_api().accept_answer(pending.pending, answer));
        if let Err(e) = accepted {
            // The offer is spent; what it carried is offered again.
            for index in pending.change.deactivated {
                if let Some(slot) = state.slots.get_mut(index) {
                    slot.active = true;
                }
            }
            self.queue_offer(session);
            return Err(SignalError::Sdp(e.to_string()));
        }
        for (mid, kind) in pending.change.added {
            let ssrc = state
                .rtc
                .direct_api()
                .stream_tx_by_mid(mid, None)
                .map(|tx| {
                    crate::session::tune_send_stream(tx, kind == crate::SlotKind::Audio);
                    tx.ssrc()
                });
            match ssrc {
                Some(ssrc) => state.slots.push(Slot::new(mid, kind, ssrc, now)),
                None => tracing::warn!(%session, %mid, "no send stream for a negotiated slot"),
            }
        }
        for index in pending.change.reactivated {
            if let Some(slot) = state.slots.get_mut(index) {
                slot.active = true;
                slot.last_write = now;
            }
        }
        self.drain(session, now);
        self.map_video(session, now);
        self.queue_offer(session);
        Ok(())
    }

    /// Looks at `session`'s slots after the current input (`offer_if_needed`).
    pub(super) fn queue_offer(&mut self, session: SessionId) {
        if !self.renegotiate.contains(&session) {
            self.renegotiate.push(session);
        }
    }

    /// Sends a router offer if this session's slots differ from what it should have (`A`
    /// audio, its `V` camera, one screen), unless an offer is already outstanding (never two
    /// in flight). Surplus camera slots are turned `inactive` and kept for a later request.
    pub(super) fn offer_if_needed(&mut self, session: SessionId, now: Instant) {
        let audio_slots = self.config.audio_slots;
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        if !state.negotiated || state.pending_offer.is_some() || !state.grants.subscribe {
            return;
        }
        let wanted = [
            (SlotKind::Audio, audio_slots),
            (SlotKind::Camera, state.video_slots),
            (SlotKind::Screen, 1),
        ];
        let mut change = SlotChange::default();
        for (kind, want) in wanted {
            let active = state
                .slots
                .iter()
                .filter(|s| s.kind == kind && s.active)
                .count();
            if active < want {
                let mut missing = want - active;
                for (i, slot) in state.slots.iter().enumerate() {
                    if missing > 0 && slot.kind == kind && !slot.active {
                        change.reactivated.push(i);
                        missing -= 1;
                    }
                }
                // Fresh m-lines for the rest (their mids are known once the offer is made).
                change
                    .added
                    .extend(std::iter::repeat_n((Mid::from(""), kind), missing));
            } else if active > want {
                let surplus = (0..state.slots.len())
                    .rev()
                    .filter(|&i| state.slots[i].kind == kind && state.slots[i].active)
                    .take(active - want);
                change.deactivated.extend(surplus);
            }
        }
        if change.added.is_empty() && change.reactivated.is_empty() && change.deactivated.is_empty()
        {
            return;
        }
        let mut cleared = Vec::new();
        for &index in &change.deactivated {
            let slot = &mut state.slots[index];
            slot.active = false;
            cleared.extend(slot.current.iter().chain(slot.next.iter()).map(|f| f.key));
            slot.clear();
            slot.told = None;
        }
        state.refresh_video_feeds();
        let reactivate: Vec<Mid> = change
            .reactivated
            .iter()
            .map(|&i| state.slots[i].mid)
            .collect();
        let deactivate: Vec<Mid> = change
            .deactivated
            .iter()
            .map(|&i| state.slots[i].mid)
            .collect();
        let slot_count = state.slots.len();
        let added = &mut change.added;
        let applied = state.with_streams_declared(|rtc| {
            let mut api = rtc.sdp_api();
            for mid in reactivate {
                api.set_direction(mid, Direction::SendOnly);
            }
            for mid in deactivate {
                api.set_direction(mid, Direction::Inactive);
            }
            for (n, (mid, kind)) in added.iter_mut().enumerate() {
                let media = match kind {
                    SlotKind::Audio => MediaKind::Audio,
                    SlotKind::Camera | SlotKind::Screen => MediaKind::Video,
                };
                // One msid stream per slot: a browser makes one MediaStream per slot, so a
                // slot's track can be attached to its tile once and for all.
                let name = format!("slot-{}-{}", kind.as_str(), slot_count + n);
                *mid = api.add_media(
                    media,
                    Direction::SendOnly,
                    Some(name.clone()),
                    Some(name),
                    None,
                );
            }
            api.apply()
        });
        let Some((offer, pending)) = applied else {
            return;
        };
        let sdp = offer.to_sdp_string();
        state.pending_offer = Some(PendingOffer {
            pending,
            change,
            sdp: sdp.clone(),
            sent_at: now,
            resends: 0,
        });
        tracing::debug!(%session, "router offer of the slots sent");
        self.deadlines.push(Reverse((
            later(now, OFFER_RESEND_AFTER),
            session,
            Deadline::OfferResend,
        )));
        for key in cleared {
            self.forget_subscriber(key, session);
        }
        self.counters.snapshot.renegotiations += 1;
        let slots = self.slot_list(session);
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Slots { slots }));
        self.outputs
            .push_back(Output::Signal(session, ServerMessage::Offer { sdp }));
    }

    /// An m-line appeared or changed direction in this session's SDP.
    pub(super) fn on_media(
        &mut self,
        session: SessionId,
        mid: Mid,
        kind: MediaKind,
        direction: Direction,
        now: Instant,
    ) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let is_slot = state.slots.iter().any(|s| s.mid == mid)
            || state
                .pending_offer
                .as_ref()
                .is_some_and(|p| p.change.added.iter().any(|(m, _)| *m == mid));
        if is_slot {
            return; // a receive slot, not a published track
        }
        let we_receive = matches!(direction, Direction::RecvOnly | Direction::SendRecv);
        let key = TrackKey {
            publisher: session,
            mid,
        };
        if we_receive && !state.published.contains(&mid) {
            let source = match kind {
                MediaKind::Audio => TrackSource::Microphone,
                MediaKind::Video if state.screen_mid == Some(mid) => TrackSource::Screen,
                MediaKind::Video => TrackSource::Camera,
            };
            if !state.grants.may_publish(source) {
                // restrict_offer already answered it without; this is the media-layer backstop.
                return;
            }
            state.published.push(mid);
            let call = state.call.clone();
            let user = state.user.clone();
            self.tracks.insert(key, PublishedTrack::new(kind, source));
            if let Some(c) = self.calls.get_mut(&call) {
                c.tracks.push(key);
            }
            self.outputs.push_back(Output::Event(Event::TrackPublished {
                session,
                mid: mid.to_string(),
                source,
            }));
            self.broadcast_published(&call, session, &user, source, true);
            if kind == MediaKind::Video {
                self.remap_call(&call, Some(session));
            }
            self.record_if_taken(key, now);
            self.export_track(key, None, now);
        } else if !we_receive && state.published.contains(&mid) {
            self.unpublish(key, now);
        }
    }

    /// Stops a published track: the slots that carried it are emptied (and given to another
    /// source where there is one).
    pub(super) fn unpublish(&mut self, key: TrackKey, now: Instant) {
        let Some(track) = self.tracks.remove(&key) else {
            return;
        };
        let (call, user) = match self.sessions.get_mut(&key.publisher) {
            Some(state) => {
                state.published.retain(|m| *m != key.mid);
                (state.call.clone(), state.user.clone())
            }
            // An imported track (its link or member went, or its exporter ended it).
            None => match self.remote_members.get(&key.publisher) {
                Some(m) => (m.call.clone(), m.user.clone()),
                None => return,
            },
        };
        self.export_track_end(&track.exports, now);
        if let Some(c) = self.calls.get_mut(&call) {
            c.tracks.retain(|k| *k != key);
        }
        if track.recorded {
            self.unrecord(&call, key, now);
        }
        let holders: Vec<SessionId> = if track.is_audio() {
            self.calls
                .get(&call)
                .map(|c| c.members.clone())
                .unwrap_or_default()
        } else {
            track.subscribers.clone()
        };
        for holder in holders {
            self.empty_slots_of(holder, key);
        }
        self.outputs
            .push_back(Output::Event(Event::TrackUnpublished {
                session: key.publisher,
                mid: key.mid.to_string(),
            }));
        self.broadcast_published(&call, key.publisher, &user, track.source, false);
        if !track.is_audio() {
            self.remap_call(&call, Some(key.publisher));
        }
    }

    /// Tells a call that `session` started or stopped publishing `source`.
    fn broadcast_published(
        &mut self,
        call: &crate::ids::CallId,
        session: SessionId,
        user: &crate::ids::UserId,
        source: TrackSource,
        on: bool,
    ) {
        self.broadcast(
            call,
            Some(session),
            ServerMessage::Published {
                session,
                user: user.clone(),
                source,
                on,
            },
        );
    }
}
