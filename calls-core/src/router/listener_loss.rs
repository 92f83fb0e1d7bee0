//! The loss a publisher's audio encoder should plan for: not only its own uplink, but the
//! downlinks of the people who hear it.
//!
//! Opus in-band FEC (`useinbandfec=1`, always negotiated) costs bitrate, so an encoder turns it
//! on, and sizes it, from the loss it is told about: the `fraction lost` of the RTCP receiver
//! reports it gets (libwebrtc feeds it to the encoder as its packet loss rate). With an SFU in
//! the middle those reports describe the uplink only; a listener on a lossy downlink is never
//! heard of, and FEC stays off for them.
//!
//! The policy ([`red::reported_loss`](crate::red::reported_loss)): report the worst of the
//! publisher's own uplink loss and the downlink loss of every member whose audio slot carries
//! this publisher now (the top-N listeners: they hear this voice), capped at 20 %, the most
//! libwebrtc's Opus encoder acts on. It changes only what the publisher's encoder sees; nothing
//! is forwarded differently.
//!
//! str0m 0.25 writes its receiver reports itself, from what it received, with no way to raise
//! the reported fraction: the router computes the value (exported per session as
//! `listener_loss`) and applying it to the reports waits for a str0m hook (docs/quality.md).

use crate::call::TrackKey;
use crate::ids::SessionId;
use crate::signal::SlotKind;

use super::Router;

impl Router {
    /// The loss to report to `publisher`'s microphone (0.0–0.2), or `None` if it publishes no
    /// audio.
    pub(super) fn listener_loss(&self, publisher: SessionId) -> Option<f64> {
        let state = self.sessions.get(&publisher)?;
        let mic = state
            .published
            .iter()
            .map(|&mid| TrackKey { publisher, mid })
            .find(|key| self.tracks.get(key).is_some_and(|t| t.is_audio()))?;
        let listeners = self
            .calls
            .get(&state.call)
            .map(|call| call.members.as_slice())
            .unwrap_or_default();
        let worst_listener = listeners
            .iter()
            .filter_map(|member| self.sessions.get(member))
            .filter(|listener| {
                listener
                    .slots
                    .iter()
                    .any(|slot| slot.kind == SlotKind::Audio && slot.holds(mic))
            })
            .filter_map(|listener| listener.egress_loss)
            .reduce(f64::max);
        Some(crate::red::reported_loss(
            state.ingress_loss,
            worst_listener,
        ))
    }
}
