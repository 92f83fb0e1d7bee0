//! Forwarding: a publisher's RTP packet (decrypted by its session) to every subscriber slot
//! that carries its track. Nothing is depacketized: the packet's layer and keyframe marks are
//! read from the payload descriptor, then each slot decides (its layer, its temporal cap, a
//! keyframe-gated source or layer switch), rewrites sequence number and timestamp, and writes.
//!
//! Audio goes to the call's members through their audio slots (the loudest few, see
//! `speaker.rs`); video to the sessions whose camera or screen slot holds the track
//! (`PublishedTrack::subscribers`, kept by `slots.rs`). RED audio (RFC 2198, `red.rs`) goes as
//! is to subscribers that negotiated RED, and as its primary Opus block to the others.
//!
//! How a written packet leaves: audio to a subscriber that does not measure it (no video
//! reaches it) is made at once (str0m's `send_rtp_now`, vendored patch 0009) and goes out
//! right after the slot messages the packet caused; everything else is queued in str0m and
//! let out by the flush after the input (`Router::finish`).

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::Instant;

use str0m::media::{KeyframeRequestKind, Pt, Rid};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, VideoOrientation, Vp8Descriptor};

use super::relay::ExportPacket;
use super::Router;
use crate::call::TrackKey;
use crate::forward::{Verdict, VideoCodec};
use crate::ids::SessionId;
use crate::layers;
use crate::record::{RecCodec, RecPacket, SenderClock};
use crate::red::{self, RedPrimary};
use crate::session::{pt_for, red_pt_for, PayloadCodec, Session};
use crate::slot::{Feed, PtMapping, AUDIO_SLOT_STALE};
use crate::speaker::SpeakerDetector;

/// One media packet to forward, from a local publisher's session (str0m's `RtpPacket`) or
/// from a relay link (`relay.rs`): what forwarding reads of it, nothing more.
#[derive(Debug)]
pub(super) struct MediaPacket {
    /// The publisher's extended sequence number.
    pub seq: u64,
    /// RTP timestamp.
    pub rtp_time: u32,
    pub marker: bool,
    /// The publisher's payload type.
    pub pt: Pt,
    pub payload: Arc<[u8]>,
    /// When it reached this router.
    pub arrival: Instant,
    pub audio_level: Option<i8>,
    pub voice_activity: Option<bool>,
    pub video_orientation: Option<VideoOrientation>,
    /// The publisher's latest sender report (recording's clock).
    pub sender: Option<SenderClock>,
    /// Whether it starts a keyframe, when already known (the exporting router read it).
    pub keyframe: Option<bool>,
}

impl MediaPacket {
    /// Takes what forwarding needs out of str0m's packet (the payload is moved, not copied).
    fn from_rtp(packet: RtpPacket) -> Self {
        let ext = &packet.header.ext_vals;
        MediaPacket {
            seq: *packet.seq_no,
            rtp_time: packet.header.timestamp,
            marker: packet.header.marker,
            pt: packet.header.payload_type,
            audio_level: ext.audio_level,
            voice_activity: ext.voice_activity,
            video_orientation: ext.video_orientation,
            sender: packet
                .last_sender_info
                .as_ref()
                .and_then(SenderClock::from_info),
            arrival: packet.timestamp,
            payload: packet.payload,
            keyframe: None,
        }
    }
}

/// What forwarding needs to know about one incoming packet, measured once for all slots.
struct Incoming<'a> {
    packet: &'a MediaPacket,
    key: TrackKey,
    rid: Option<Rid>,
    codec: str0m::format::Codec,
    clock_rate: u32,
    epoch: u32,
    is_audio: bool,
    keyframe: bool,
    tid: Option<u8>,
    starts_picture: bool,
    vp8: Option<Vp8Descriptor>,
    /// Audio: where the primary block of a RED packet is.
    red: Option<RedPrimary>,
    /// The primary block as a payload of its own, made at most once per packet, when the first
    /// subscriber without RED needs it.
    primary: OnceCell<Arc<[u8]>>,
}

impl Incoming<'_> {
    /// The packet's primary Opus block (the whole payload unless it is RED).
    fn primary_payload(&self) -> Arc<[u8]> {
        let payload = &self.packet.payload;
        match self.red {
            None => payload.clone(),
            // str0m takes an `Arc<[u8]>` and cannot share a slice of one: one copy per
            // packet, shared by every subscriber that gets it.
            Some(primary) => self
                .primary
                .get_or_init(|| Arc::from(&payload[primary.offset..]))
                .clone(),
        }
    }
}

/// What writing one packet into one slot did.
enum Written {
    /// Sent (queued in str0m).
    Sent,
    /// Made at once (str0m's `send_rtp_now`): the datagram, to go out after the slot
    /// mapping messages this packet caused.
    Now(str0m::net::Transmit),
    /// Not for this slot now.
    Skipped,
    /// The slot waits for a keyframe of this track.
    WantsKeyframe,
}

impl Router {
    /// One RTP packet from a local publisher's session: find its track, then forward it.
    pub(super) fn forward(&mut self, publisher: SessionId, packet: RtpPacket, now: Instant) {
        let Some(state) = self.sessions.get_mut(&publisher) else {
            return;
        };
        let Some((mid, rid)) = state.rx_stream(packet.header.ssrc) else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let muted = state.muted;
        let codec = state.codec_of(packet.header.payload_type);
        let key = TrackKey { publisher, mid };
        self.forward_media(key, rid, codec, muted, MediaPacket::from_rtp(packet), now);
    }

    /// One packet of a published track (local, or imported from a relay link): measure its
    /// layer, export it on the call's relay links (local tracks), then for every slot that
    /// carries its track decide, rewrite and write.
    pub(super) fn forward_media(
        &mut self,
        key: TrackKey,
        rid: Option<Rid>,
        codec: Option<PayloadCodec>,
        muted: bool,
        packet: MediaPacket,
        now: Instant,
    ) {
        let publisher = key.publisher;
        let Some(call_id) =
            super::relay::publisher_call(&self.sessions, &self.remote_members, publisher)
        else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let Some(track) = self.tracks.get_mut(&key) else {
            // Not a published track (forbidden by the grants, or already stopped).
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let payload_len = packet.payload.len();
        let is_audio = track.is_audio();
        self.counters.snapshot.media_in.add(is_audio, payload_len);
        if is_audio && muted {
            self.counters.snapshot.media_dropped += 1;
            return;
        }
        let Some(PayloadCodec {
            codec,
            clock_rate,
            primary_pt,
            red,
        }) = codec
        else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        // Measured once for every slot; the video fields are filled below for video only.
        let mut incoming = Incoming {
            packet: &packet,
            key,
            rid,
            codec,
            clock_rate,
            epoch: track.epoch,
            is_audio,
            keyframe: false,
            tid: None,
            starts_picture: false,
            vp8: None,
            red: None,
            primary: OnceCell::new(),
        };
        if is_audio {
            let red = if red {
                self.counters.snapshot.red_packets_in += 1;
                match red::primary(&packet.payload) {
                    Ok(primary) if primary.pt == *primary_pt => Some(primary),
                    Ok(primary) => {
                        // RFC 2198 allows another codec in the blocks; this RED type was
                        // negotiated for Opus only.
                        tracing::trace!(%publisher, pt = primary.pt, "RED of another codec dropped");
                        self.counters.snapshot.red_malformed += 1;
                        return;
                    }
                    Err(error) => {
                        tracing::trace!(%publisher, "RED packet dropped: {error}");
                        self.counters.snapshot.red_malformed += 1;
                        return;
                    }
                }
            } else {
                None
            };
            track.red = red.is_some();
            if track.recorded {
                // Recorded whether or not it is among the loudest (top-N is for listeners).
                if let Some(recorder) = self
                    .calls
                    .get_mut(call_id)
                    .and_then(|c| c.recorder.as_deref_mut())
                {
                    let rec = rec_packet(&packet, red.map_or(0, |p| p.offset), false, rid);
                    recorder.on_packet(
                        key,
                        RecCodec::from_str0m(codec),
                        None,
                        rec,
                        &mut self.record_out,
                    );
                }
            }
            let opus = &packet.payload[red.map_or(0, |p| p.offset)..];
            if codec == str0m::format::Codec::Opus && red::opus_has_fec(opus) {
                self.counters.snapshot.opus_fec_packets += 1;
            }
            if let Some(call) = self.calls.get_mut(call_id) {
                if let Some(level) = packet.audio_level {
                    call.speakers
                        .observe(publisher, level, packet.voice_activity, now);
                }
                let forwarded = call.speakers.is_forwarded(publisher, now);
                if !track.exports.is_empty() {
                    let export = ExportPacket {
                        packet: &packet,
                        rid,
                        codec,
                        red_primary: red.map(|_| *primary_pt),
                        keyframe: false,
                        level_only: !forwarded,
                    };
                    self.relay.export(
                        &track.exports,
                        &export,
                        now,
                        &mut self.outputs,
                        &mut self.counters.snapshot.relay,
                    );
                }
                if !forwarded {
                    // Not among the loudest: nobody needs this packet (top-N audio).
                    self.counters.snapshot.audio_not_forwarded += 1;
                    track.forwarding = false;
                    return;
                }
            }
            if !std::mem::replace(&mut track.forwarding, true) {
                track.epoch = track.epoch.wrapping_add(1);
            }
            incoming.epoch = track.epoch;
            incoming.red = red;
            self.forward_audio(&incoming, now);
            return;
        }
        track.codec = VideoCodec::from_str0m(codec);
        incoming.keyframe = packet
            .keyframe
            .unwrap_or_else(|| track.codec.is_keyframe(&packet.payload));
        if !track.exports.is_empty() {
            let export = ExportPacket {
                packet: &packet,
                rid,
                codec,
                red_primary: None,
                keyframe: incoming.keyframe,
                level_only: false,
            };
            self.relay.export(
                &track.exports,
                &export,
                now,
                &mut self.outputs,
                &mut self.counters.snapshot.relay,
            );
        }
        match track.codec {
            VideoCodec::Vp8 => {
                (incoming.tid, incoming.starts_picture) = layers::vp8_temporal(&packet.payload);
                incoming.vp8 = Vp8Descriptor::parse(&packet.payload).ok();
            }
            VideoCodec::Vp9 => {
                (incoming.tid, incoming.starts_picture) = layers::vp9_temporal(&packet.payload);
            }
            _ => {}
        }
        let tid = incoming.tid;
        let Some((index, new_layer)) = track.layer_index(rid, now) else {
            self.counters.snapshot.media_dropped += 1;
            return;
        };
        let layer = &mut track.layers[index];
        layer.last_seen = now;
        layer.max_tid = layer
            .max_tid
            .max(tid.unwrap_or(0).min(layers::MAX_TID as u8));
        layer
            .meter
            .record(payload_len, tid.unwrap_or(0), packet.marker, now);
        let mut record_keyframe = None;
        if track.recorded {
            let best = super::recording::best_layer(track, now);
            if let Some(recorder) = self
                .calls
                .get_mut(call_id)
                .and_then(|c| c.recorder.as_deref_mut())
            {
                let rec = rec_packet(&packet, 0, incoming.keyframe, rid);
                record_keyframe = recorder.on_packet(
                    key,
                    RecCodec::from_str0m(codec),
                    best,
                    rec,
                    &mut self.record_out,
                );
            }
        }
        if new_layer {
            // Every subscriber of this track can be given the new layer — before this packet
            // (often the keyframe that starts the layer) is fanned out.
            let subscribers = track.subscribers.clone();
            for sub in subscribers {
                self.allocate(sub, now);
            }
        }
        if let Some(rid) = record_keyframe {
            self.request_keyframe(key, rid, now, false);
        }
        self.forward_video(&incoming, now);
    }

    /// A forwarded speaker's packet to every member's audio slots: the slot that carries this
    /// speaker, or a free one (empty, or its speaker is no longer forwarded, or silent for
    /// [`AUDIO_SLOT_STALE`]). An audio slot changes speaker at once; the client hears of it
    /// first.
    fn forward_audio(&mut self, incoming: &Incoming<'_>, now: Instant) {
        let publisher = incoming.key.publisher;
        // The call is looked up by reference (the sessions and calls maps are disjoint
        // borrows): no copy of its id per packet.
        let Some(c) = super::relay::publisher_call(&self.sessions, &self.remote_members, publisher)
            .and_then(|call| self.calls.get_mut(call))
        else {
            return;
        };
        let members = std::mem::take(&mut c.members);
        let speakers = &c.speakers;
        let mut switched: Vec<(SessionId, str0m::media::Mid)> = Vec::new();
        for member in &members {
            if *member == publisher {
                continue;
            }
            let Some(s) = self.sessions.get_mut(member) else {
                continue;
            };
            if !s.connected {
                continue; // str0m would drop it, and the slot's numbering would have a gap
            }
            let Some(index) = audio_slot(s, incoming.key, speakers, now) else {
                if s.slots
                    .iter()
                    .any(|slot| slot.kind == crate::SlotKind::Audio)
                {
                    self.counters.snapshot.audio_without_slot += 1;
                }
                continue;
            };
            let slot = &mut s.slots[index];
            if slot.current.as_ref().is_none_or(|f| f.key != incoming.key) {
                slot.switch_audio(incoming.key, incoming.epoch);
                switched.push((*member, slot.mid));
                self.counters.snapshot.slot_switches += 1;
            }
            let written = write(
                s,
                index,
                incoming,
                &mut self.counters.snapshot,
                self.direct_audio,
                now,
            );
            settle(written, s, *member, &mut self.touched, &mut self.sent_now);
        }
        if let Some(c) =
            super::relay::publisher_call(&self.sessions, &self.remote_members, publisher)
                .and_then(|call| self.calls.get_mut(call))
        {
            c.members = members;
        }
        // Queued before the packets leave (they go out when the touched sessions run, or
        // right after these messages).
        for (member, mid) in switched {
            self.tell_slots(member, &[mid]);
        }
        self.transmit_sent_now();
    }

    /// The datagrams made at once during one packet's forwarding ([`Written::Now`]), to the
    /// outputs, after the messages that must precede them.
    fn transmit_sent_now(&mut self) {
        let mut sent = std::mem::take(&mut self.sent_now);
        for t in sent.drain(..) {
            self.transmit(t);
        }
        self.sent_now = sent;
    }

    /// A video packet to every slot that carries its track or waits for it.
    fn forward_video(&mut self, incoming: &Incoming<'_>, now: Instant) {
        let key = incoming.key;
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        let subscribers = std::mem::take(&mut track.subscribers);
        let mut need_keyframe = false;
        let mut switches = 0;
        let mut switched: Vec<(SessionId, str0m::media::Mid, Option<TrackKey>)> = Vec::new();
        for sub in &subscribers {
            let Some(s) = self.sessions.get_mut(sub) else {
                continue;
            };
            if !s.connected {
                continue; // asked for keyframes when it connects
            }
            let Some(index) = s.slots.iter().position(|slot| slot.holds(key)) else {
                continue;
            };
            let slot = &mut s.slots[index];
            if slot.next.as_ref().is_some_and(|f| f.key == key) {
                // A new source waits for this slot: it takes over at a keyframe of its target
                // layer, and the stream goes on seamlessly.
                let Some(target) = slot.next.as_ref().and_then(|f| f.sel.target) else {
                    continue; // no budget for it yet
                };
                if target.0 != incoming.rid {
                    continue;
                }
                if !incoming.keyframe {
                    need_keyframe = true;
                    continue;
                }
                let old = slot.take_next(incoming.epoch);
                if let Some(feed) = slot.current.as_mut() {
                    feed.sel.current = incoming.rid;
                    feed.sel.tid_cap = target.1;
                    if let Some(started) = feed.sel.switch_started.take() {
                        self.counters
                            .snapshot
                            .layer_switch_time
                            .record(now.saturating_duration_since(started));
                    }
                }
                switched.push((*sub, slot.mid, old));
                self.counters.snapshot.slot_switches += 1;
            } else if slot.next.is_some() {
                // The current source goes on, frozen at its layer, until the next one's
                // keyframe.
                let frozen = slot.current.as_ref().and_then(|f| f.sel.current);
                if frozen != incoming.rid {
                    continue;
                }
            } else {
                let Some(feed) = slot.current.as_mut() else {
                    continue;
                };
                let sel = &mut feed.sel;
                let Some((target_rid, target_tid)) = sel.target else {
                    continue; // paused: no budget, or the subscriber hid it
                };
                if incoming.rid.is_some() && sel.current != incoming.rid {
                    if target_rid != incoming.rid {
                        continue; // another layer than this slot's
                    }
                    if !incoming.keyframe {
                        need_keyframe = true; // switching waits for this layer's keyframe
                        continue;
                    }
                    // The switch: this keyframe starts the new layer, seamlessly.
                    if sel.current.is_some() {
                        slot.rewriter.switch_layer();
                    }
                    sel.current = incoming.rid;
                    slot.vp8.switch_layer();
                    sel.tid_cap = target_tid;
                    if let Some(started) = sel.switch_started.take() {
                        self.counters
                            .snapshot
                            .layer_switch_time
                            .record(now.saturating_duration_since(started));
                    }
                    switches += 1;
                }
            }
            let written = write(
                s,
                index,
                incoming,
                &mut self.counters.snapshot,
                self.direct_audio,
                now,
            );
            need_keyframe |= settle(written, s, *sub, &mut self.touched, &mut self.sent_now);
        }
        if let Some(track) = self.tracks.get_mut(&key) {
            track.subscribers = subscribers;
        }
        for (sub, mid, old) in switched {
            self.tell_slots(sub, &[mid]);
            if let Some(old) = old {
                self.forget_subscriber(old, sub);
                self.dynacast.push(old);
            }
            self.dynacast.push(key);
        }
        self.transmit_sent_now();
        if switches > 0 {
            self.counters.snapshot.layer_switches += switches;
            self.dynacast.push(key);
        }
        if need_keyframe {
            self.request_keyframe(key, incoming.rid, now, false);
        }
    }

    /// Asks a publisher for a keyframe of one layer, at most once per
    /// `keyframe_request_interval` per layer (all subscribers' requests are aggregated into
    /// one). `urgent` (a new subscriber) allows a request after a fifth of the interval.
    pub(super) fn request_keyframe(
        &mut self,
        key: TrackKey,
        rid: Option<Rid>,
        now: Instant,
        urgent: bool,
    ) {
        let interval = self.config.keyframe_request_interval();
        let Some(track) = self.tracks.get_mut(&key) else {
            return;
        };
        if track.is_audio() {
            return;
        }
        let min_gap = if urgent { interval / 5 } else { interval };
        if let Some(layer) = track.layers.iter_mut().find(|l| l.rid == rid) {
            if layer
                .last_keyframe_request
                .is_some_and(|last| now.saturating_duration_since(last) < min_gap)
            {
                return;
            }
            layer.last_keyframe_request = Some(now);
        }
        let Some(publisher) = self.sessions.get_mut(&key.publisher) else {
            self.relay_keyframe_request(key, rid, now);
            return;
        };
        let mut api = publisher.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(key.mid, rid) else {
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        self.counters.snapshot.keyframe_requests_out += 1;
        self.touch(key.publisher);
    }
}

/// The audio slot of `s` for the speaker `key`: the one carrying it, else an empty one, else
/// one whose speaker is no longer forwarded, else one silent for [`AUDIO_SLOT_STALE`] (the
/// longest silent of those). Someone who just unmuted, finding none, takes the slot of the
/// weakest top-N speaker: their first words are heard (the displaced speaker waits for a free
/// slot; nobody displaces back, so slots do not flap).
fn audio_slot(
    s: &Session,
    key: TrackKey,
    speakers: &SpeakerDetector,
    now: Instant,
) -> Option<usize> {
    let audio = || {
        s.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.kind == crate::SlotKind::Audio && slot.active)
    };
    // Audio slots switch at once (they never have a `next`): only `current` is read, one
    // cache line per slot (see `Slot`).
    if let Some((i, _)) = audio().find(|(_, slot)| slot.carries(key)) {
        return Some(i);
    }
    if let Some((i, _)) = audio().find(|(_, slot)| slot.current.is_none()) {
        return Some(i);
    }
    let free = |slot: &crate::slot::Slot| {
        let Some(Feed { key: held, .. }) = slot.current.as_ref() else {
            return true;
        };
        !speakers.is_forwarded(held.publisher, now)
            || now.saturating_duration_since(slot.last_write) >= AUDIO_SLOT_STALE
    };
    let stale = audio()
        .filter(|(_, slot)| free(slot))
        .min_by_key(|(_, slot)| slot.last_write)
        .map(|(i, _)| i);
    if stale.is_some() || !speakers.in_unmute_grace(key.publisher, now) {
        return stale;
    }
    audio()
        .filter_map(|(i, slot)| {
            let held = slot.current.as_ref()?.key.publisher;
            Some((speakers.weakness(held, now), i))
        })
        .filter(|(weakness, _)| *weakness > 0)
        .max()
        .map(|(_, i)| i)
}

/// Rewrites and writes one packet into slot `index` of subscriber `s`, whose current source
/// is the packet's track: the temporal cap, the payload type of this session, sequence number
/// and timestamp continuity, VP8 picture ids.
fn write(
    s: &mut Session,
    index: usize,
    incoming: &Incoming<'_>,
    counters: &mut crate::metrics::MetricsSnapshot,
    direct_audio: bool,
    now: Instant,
) -> Written {
    let packet = incoming.packet;
    let slot = &mut s.slots[index];
    let Some(feed) = slot.current.as_mut() else {
        return Written::Skipped;
    };
    if !incoming.is_audio {
        let sel = &mut feed.sel;
        // Temporal layers: raise the cap only where the stream can be decoded from (a TL0
        // picture), lower it at any picture start.
        if let Some((_, target_tid)) = sel.target {
            if incoming.starts_picture && (incoming.tid == Some(0) || target_tid < sel.tid_cap) {
                sel.tid_cap = target_tid;
            }
        }
        if incoming.tid.is_some_and(|t| t > sel.tid_cap) {
            slot.rewriter.skip(packet.seq);
            if incoming.starts_picture {
                slot.vp8.dropped_picture();
            }
            return Written::Skipped;
        }
    }
    let in_pt = packet.pt;
    let mapping = match feed.pt_map.get(in_pt) {
        Some(mapping) => mapping,
        None => {
            let Some(pt) = pt_for(&s.rtc, incoming.codec, incoming.clock_rate) else {
                return Written::Skipped; // this subscriber did not negotiate the codec
            };
            // RED goes as is only where the payload type inside its blocks means the same
            // codec to this subscriber; otherwise the primary block goes as plain Opus.
            let red_pt = incoming
                .red
                .filter(|primary| *pt == primary.pt)
                .and_then(|_| red_pt_for(&s.rtc, pt));
            let mapping = PtMapping {
                publisher: in_pt,
                subscriber: red_pt.unwrap_or(pt),
                strip_red: incoming.red.is_some() && red_pt.is_none(),
            };
            feed.pt_map.insert(mapping);
            mapping
        }
    };
    let verdict = slot.rewriter.rewrite(
        incoming.epoch,
        packet.seq,
        packet.rtp_time,
        incoming.keyframe,
        now,
    );
    let Verdict::Forward { seq, timestamp } = verdict else {
        return if slot.rewriter.waits_for_keyframe() {
            Written::WantsKeyframe
        } else {
            Written::Skipped
        };
    };
    let patch = incoming.vp8.as_ref().and_then(|d| slot.vp8.patch(d));
    let ssrc = slot.ssrc;
    slot.last_write = now;
    if std::mem::take(&mut slot.parked) && s.unpark(ssrc) {
        counters.streams_unparked += 1;
    }
    // Only what the subscriber needs; str0m writes MID, TWCC and abs-send-time itself.
    let ext = ExtensionValues {
        audio_level: packet.audio_level,
        voice_activity: packet.voice_activity,
        video_orientation: packet.video_orientation,
        ..Default::default()
    };
    let payload = if mapping.strip_red {
        incoming.primary_payload()
    } else {
        packet.payload.clone()
    };
    let payload_len = payload.len();
    let mut api = s.rtc.direct_api();
    let mut rtp = RtpWrite::new(
        mapping.subscriber,
        seq.into(),
        timestamp,
        packet.arrival,
        payload,
    )
    .marker(packet.marker)
    .ext_vals(ext)
    .nackable(!incoming.is_audio);
    if let Some(patch) = patch {
        rtp = rtp.vp8_patch(patch);
    }
    let count = |counters: &mut crate::metrics::MetricsSnapshot, red_stripped: &mut u64| {
        counters.media_out.add(incoming.is_audio, payload_len);
        if mapping.strip_red {
            counters.red_stripped += 1;
            *red_stripped += 1;
        }
    };
    // Audio to a subscriber that does not measure it (no video: vendored str0m patch 0009)
    // is neither paced nor stamped for the estimate: it goes out now, not through str0m's
    // send queue, its pacer and a poll per packet.
    if incoming.is_audio && direct_audio {
        match api.send_rtp_now(ssrc, rtp, now) {
            Ok(t) => {
                counters.direct_sends += 1;
                count(counters, &mut s.red_stripped);
                return Written::Now(t);
            }
            Err(back) => rtp = back,
        }
    }
    let Some(tx) = api.stream_tx(&ssrc) else {
        return Written::Skipped;
    };
    tx.write_rtp(rtp);
    s.unflushed = s.unflushed.saturating_add(1);
    count(counters, &mut s.red_stripped);
    Written::Sent
}

/// What is left to do after [`write`] to session `id` (`s`): a queued packet goes out when
/// the session is flushed after the input (`Router::finish`), one made at once after the slot
/// messages the forwarded packet caused (`Router::transmit_sent_now`). Returns whether the
/// slot waits for a keyframe.
fn settle(
    written: Written,
    s: &mut Session,
    id: SessionId,
    touched: &mut Vec<SessionId>,
    sent_now: &mut Vec<str0m::net::Transmit>,
) -> bool {
    match written {
        Written::Sent => {
            if !s.touched {
                s.touched = true;
                touched.push(id);
            }
        }
        Written::Now(t) => sent_now.push(t),
        Written::WantsKeyframe => return true,
        Written::Skipped => {}
    }
    false
}

/// What a recording needs of one packet (borrowed: nothing is copied unless it is recorded).
fn rec_packet(
    packet: &MediaPacket,
    offset: usize,
    keyframe: bool,
    rid: Option<Rid>,
) -> RecPacket<'_> {
    RecPacket {
        seq: packet.seq,
        timestamp: packet.rtp_time,
        marker: packet.marker,
        payload: &packet.payload,
        offset,
        keyframe,
        rid,
        sender: packet.sender,
        arrival: packet.arrival,
    }
}
