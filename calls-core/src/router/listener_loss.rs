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
//! str0m writes its receiver reports itself, from what it received. The vendored str0m
//! (`calls-core/vendor/README.md`) has a floor for the reported `fraction lost` per receive
//! stream (`StreamRx::set_reported_loss_floor`): every tick the router sets it on each
//! publisher's microphone streams to this value (exported per session as `listener_loss`). Only
//! the reports on the wire change; the stream's own loss statistics stay what was measured, so
//! the uplink loss read back does not feed on itself.

use std::collections::HashMap;

use str0m::media::MediaKind;

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

    /// Every tick: the listener loss of each microphone publisher becomes the floor of the
    /// `fraction lost` in the receiver reports str0m sends it (changed streams only).
    pub(super) fn apply_listener_loss(&mut self) {
        let losses = self.listener_losses();
        for (publisher, loss) in losses {
            let Some(state) = self.sessions.get_mut(&publisher) else {
                continue;
            };
            // RFC 3550 §6.4.1: fraction lost in 1/256 units; no floor when nothing is lost.
            let floor = ((loss * 256.0) as u8 > 0).then_some((loss * 256.0) as u8);
            if state.reported_loss_floor == floor {
                continue;
            }
            state.reported_loss_floor = floor;
            let mids: Vec<_> = state
                .published
                .iter()
                .copied()
                .filter(|&mid| {
                    state
                        .rtc
                        .media(mid)
                        .is_some_and(|m| m.kind() == MediaKind::Audio)
                })
                .collect();
            let mut api = state.rtc.direct_api();
            for mid in mids {
                if let Some(rx) = api.stream_rx_by_mid(mid, None) {
                    rx.set_reported_loss_floor(floor);
                }
            }
        }
    }
}
