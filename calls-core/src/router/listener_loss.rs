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

use std::collections::HashMap;

use crate::ids::SessionId;
use crate::signal::SlotKind;

use super::Router;

impl Router {
    /// The loss to report to each session that publishes a microphone (0.0–0.2). One pass over
    /// every session's audio slots (each slot's current source gets the loss its listener
    /// reported for that slot's stream), not a scan of the call per publisher.
    pub(super) fn listener_losses(&self) -> HashMap<SessionId, f64> {
        let mut worst_listener: HashMap<SessionId, f64> = HashMap::new();
        let audio_slots = self
            .sessions
            .values()
            .flat_map(|listener| &listener.slots)
            .filter(|slot| slot.kind == SlotKind::Audio && slot.active);
        for slot in audio_slots {
            let (Some(feed), Some(loss)) = (slot.current.as_ref(), slot.egress_loss) else {
                continue;
            };
            let worst = worst_listener.entry(feed.key.publisher).or_insert(loss);
            *worst = worst.max(loss);
        }
        self.sessions
            .iter()
            .filter(|(&publisher, state)| {
                state.published.iter().any(|&mid| {
                    let key = crate::call::TrackKey { publisher, mid };
                    self.tracks.get(&key).is_some_and(|t| t.is_audio())
                })
            })
            .map(|(&publisher, state)| {
                let worst = worst_listener.get(&publisher).copied();
                (
                    publisher,
                    crate::red::reported_loss(state.ingress_loss, worst),
                )
            })
            .collect()
    }
}
