//! Relay links (see [`crate::relay`] for the wire format): one call's tracks shared with
//! another router.
//!
//! - **Export.** Every member of the call on this router is announced on each of the call's
//!   links ([`Frame::Member`]), every track they publish is numbered and announced
//!   ([`Frame::Track`]), and its packets follow as [`Frame::Media`]: video only in the layers the
//!   other router demands (dynacast across the link), audio only while its speaker is among
//!   the loudest — otherwise just its level ([`Frame::Level`]) so the other router's speaker
//!   detection hears everyone. Video frames stay in a small per-track cache for the link's
//!   NACKs.
//! - **Import.** The other router's members and tracks become remote members and published
//!   tracks here. Their packets go through the same forwarding as a local publisher's, so slots,
//!   mapping messages, top-N audio, layer allocation and each subscriber's NACK/RTX (from its
//!   str0m send buffer) work unchanged. What would go to a local publisher goes back over the
//!   link instead: keyframe requests, layer demand.
//! - **Loss on the link.** The importer watches each layer's sequence numbers: a short gap is
//!   NACKed on the link and repaired from the exporter's cache; a long one (or a link that went
//!   silent and came back) is concealed: the track starts a new epoch, subscribers' rewriters
//!   resync without a sequence gap and wait for the keyframe the importer asks for.
//! - **Liveness.** A link that sends nothing for [`RELAY_KEEPALIVE`] sends a keepalive; one
//!   that hears nothing for [`RELAY_SILENT_AFTER`] is silent: its tracks pause (subscribers keep
//!   their slots and just get no packets) and resume when frames come back. Only
//!   [`Router::relay_close`] tears them down.
//!
//! Only a router's own participants are exported: routers of a call are connected pairwise
//! (a full mesh), never through a chain, so nothing loops.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::media::{MediaKind, Mid, Rid};

use super::forwarding::MediaPacket;
use super::{Output, Router};
use crate::call::{Call, PublishedTrack, TrackKey, MAX_LAYERS};
use crate::error::RouterError;
use crate::ids::{CallId, SessionId, TrackSource, UserId};
use crate::relay::{
    Frame, LinkId, MediaFrame, RelayCodec, TrackNo, FLAG_KEYFRAME, FLAG_LEVEL, FLAG_MARKER,
    FLAG_RED, FLAG_VOICE, MAX_DEMANDED_LAYERS,
};
use crate::session::{PayloadCodec, Session};
use crate::signal::ServerMessage;

/// A link that sent nothing for this long sends a keepalive.
pub const RELAY_KEEPALIVE: Duration = Duration::from_millis(500);
/// A link that received nothing for this long is silent: its tracks pause. Three keepalives
/// lost in a row.
pub const RELAY_SILENT_AFTER: Duration = Duration::from_millis(1_500);
/// Video packets an exporter keeps per track and link for the link's NACKs: about one second
/// of a 2.5 Mbit/s camera, longer than any in-process or same-region link's round trip.
const RELAY_CACHE_PACKETS: usize = 256;
/// A gap on the link up to this many packets is NACKed (one [`Frame::Nack`] names 17); a
/// longer one is concealed with a keyframe.
const RELAY_NACK_SPAN: u64 = 17;
/// NACKs sent for one lost packet before the importer gives up on it (the subscriber's own
/// NACK, then its keyframe request, take over).
const RELAY_NACK_TRIES: u8 = 3;
/// Lost packets one imported track keeps asking for.
const MAX_PENDING_NACKS: usize = 64;
/// Most tracks one link may import (65,536 numbers exist; a call's publishers are far fewer).
const MAX_IMPORTS_PER_LINK: usize = 4_096;
/// Most remote members one link may announce.
const MAX_MEMBERS_PER_LINK: usize = 20_000;

/// One track this router exports on a link.
#[derive(Debug)]
struct Export {
    key: TrackKey,
    /// The layers the importer wants (`None`: it has not said, so all of them).
    demand: Option<Vec<Rid>>,
    /// Recent video frames, for NACKs on the link: (layer, sequence number, frame).
    cache: VecDeque<(Option<Rid>, u64, Bytes)>,
}

/// One track this router imports from a link.
#[derive(Debug)]
struct Import {
    key: TrackKey,
    /// Per layer, the highest sequence number received over the link.
    highest: Vec<(Option<Rid>, u64)>,
    /// Video packets NACKed on the link and not yet received: (layer, sequence number, NACKs
    /// sent). Asked again every tick, up to [`RELAY_NACK_TRIES`] times (a retransmission can be
    /// lost too); at most [`MAX_PENDING_NACKS`], the oldest given up first.
    pending: VecDeque<(Option<Rid>, u64, u8)>,
}

/// One relay link.
#[derive(Debug)]
struct Link {
    call: CallId,
    exports: HashMap<TrackNo, Export>,
    export_no: HashMap<TrackKey, TrackNo>,
    next_no: TrackNo,
    imports: HashMap<TrackNo, Import>,
    /// The remote members this link announced.
    members: Vec<SessionId>,
    last_heard: Instant,
    last_sent: Instant,
    silent: bool,
}

/// A participant of the call on the other end of a link.
#[derive(Debug)]
pub(super) struct RemoteMember {
    pub link: LinkId,
    pub call: CallId,
    pub user: UserId,
    pub muted: bool,
}

/// Every relay link of a router and what they carry.
#[derive(Debug, Default)]
pub(super) struct RelayState {
    links: HashMap<LinkId, Link>,
    /// Imported tracks: their link and the exporter's number for them.
    imported: HashMap<TrackKey, (LinkId, TrackNo)>,
}

impl RelayState {
    /// Whether any link is open.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    pub fn imported_count(&self) -> usize {
        self.imported.len()
    }

    pub fn exported_count(&self) -> usize {
        self.links.values().map(|l| l.exports.len()).sum()
    }

    /// The layers the links demand of an exported track: `None` when some link wants all.
    pub fn demanded(&self, exports: &[(LinkId, TrackNo)]) -> Option<Vec<Rid>> {
        let mut all = Vec::new();
        for (link, no) in exports {
            let demand = self
                .links
                .get(link)
                .and_then(|l| l.exports.get(no))
                .map(|e| e.demand.as_ref());
            match demand {
                Some(Some(rids)) => all.extend_from_slice(rids),
                Some(None) => return None,
                None => {}
            }
        }
        Some(all)
    }
}

/// The call of a publisher, local or remote.
pub(super) fn publisher_call<'a>(
    sessions: &'a HashMap<SessionId, Box<Session>>,
    remote_members: &'a HashMap<SessionId, RemoteMember>,
    publisher: SessionId,
) -> Option<&'a CallId> {
    match sessions.get(&publisher) {
        Some(s) => Some(&s.call),
        None => remote_members.get(&publisher).map(|m| &m.call),
    }
}

/// RFC 6464 level as str0m holds it (−127 … 0 dBov) to the relay's (0 … 127).
fn level_to_wire(level: i8) -> u8 {
    level.unsigned_abs().min(127)
}

fn level_from_wire(level: u8) -> i8 {
    -(level.min(127) as i8)
}

/// What the exporter knows of one packet, to put on each link.
pub(super) struct ExportPacket<'a> {
    pub packet: &'a MediaPacket,
    pub rid: Option<Rid>,
    pub codec: str0m::format::Codec,
    pub red_primary: Option<u8>,
    pub keyframe: bool,
    /// Audio of a speaker the call does not forward now: only its level goes.
    pub level_only: bool,
}

/// Counts a frame out and queues it.
fn send(
    outputs: &mut VecDeque<Output>,
    counters: &mut crate::metrics::RelayCounts,
    link: LinkId,
    bytes: Bytes,
) {
    counters.frames_out += 1;
    counters.bytes_out += bytes.len() as u64;
    outputs.push_back(Output::Relay { link, bytes });
}

impl RelayState {
    /// Puts one packet of an exported track on each of its links (see the module docs).
    pub fn export(
        &mut self,
        exports: &[(LinkId, TrackNo)],
        p: &ExportPacket<'_>,
        now: Instant,
        outputs: &mut VecDeque<Output>,
        counters: &mut crate::metrics::RelayCounts,
    ) {
        let Some(codec) = RelayCodec::from_str0m(p.codec) else {
            return;
        };
        let packet = p.packet;
        for &(link_id, no) in exports {
            let Some(link) = self.links.get_mut(&link_id) else {
                continue;
            };
            let Some(export) = link.exports.get_mut(&no) else {
                continue;
            };
            let mut level_flags = 0;
            if let Some(level) = packet.audio_level {
                level_flags |= FLAG_LEVEL;
                if packet.voice_activity == Some(true) {
                    level_flags |= FLAG_VOICE;
                }
                if p.level_only {
                    let frame = Frame::Level {
                        track: no,
                        audio_level: level_to_wire(level),
                        flags: level_flags & FLAG_VOICE,
                    };
                    link.last_sent = now;
                    send(outputs, counters, link_id, Bytes::from(frame.encode()));
                    continue;
                }
            }
            if p.level_only {
                continue;
            }
            if let Some(demand) = &export.demand {
                if p.rid.is_some_and(|r| !demand.contains(&r)) {
                    counters.layers_withheld += 1;
                    continue;
                }
            }
            let mut flags = level_flags;
            if packet.marker {
                flags |= FLAG_MARKER;
            }
            if p.keyframe {
                flags |= FLAG_KEYFRAME;
            }
            if p.red_primary.is_some() {
                flags |= FLAG_RED;
            }
            let frame = Frame::Media(MediaFrame {
                track: no,
                flags,
                codec,
                pt: *packet.pt,
                primary_pt: p.red_primary.unwrap_or(0),
                seq: packet.seq,
                rtp_time: packet.rtp_time,
                audio_level: packet.audio_level.map_or(127, level_to_wire),
                rid: p.rid,
                payload: &packet.payload,
            });
            let bytes = Bytes::from(frame.encode());
            if codec != RelayCodec::Opus {
                if export.cache.len() >= RELAY_CACHE_PACKETS {
                    export.cache.pop_front();
                }
                export.cache.push_back((p.rid, packet.seq, bytes.clone()));
            }
            link.last_sent = now;
            send(outputs, counters, link_id, bytes);
        }
    }
}

impl Router {
    /// Opens relay link `link` for `call`: this router's members and tracks of the call are
    /// announced on it at once, and their media follows; what the other end announces is
    /// imported (see [`crate::relay`]). Drain [`Router::poll_output`] afterwards: the frames
    /// for the link come out as [`Output::Relay`].
    ///
    /// Session ids must be unique among the routers of a call (the reference server numbers
    /// them process-wide): a remote member whose id is a local session is refused.
    pub fn relay_open(
        &mut self,
        call: CallId,
        link: LinkId,
        now: Instant,
    ) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        if self.relay.links.contains_key(&link) {
            return Err(RouterError::RelayLinkExists(link));
        }
        let top_n = self.config.top_n_audio;
        let c = self
            .calls
            .entry(call.clone())
            .or_insert_with(|| Call::new(top_n));
        c.relay_links.push(link);
        let members = c.members.clone();
        let tracks: Vec<TrackKey> = c
            .tracks
            .iter()
            .filter(|k| self.sessions.contains_key(&k.publisher))
            .copied()
            .collect();
        self.relay.links.insert(
            link,
            Link {
                call,
                exports: HashMap::new(),
                export_no: HashMap::new(),
                next_no: 0,
                imports: HashMap::new(),
                members: Vec::new(),
                last_heard: now,
                last_sent: now,
                silent: false,
            },
        );
        self.counters.snapshot.relay.links_opened += 1;
        tracing::debug!(%link, "relay link opened");
        for member in members {
            self.export_member(member, Some(link), now);
        }
        for key in tracks {
            self.export_track(key, Some(link), now);
        }
        self.finish(now);
        Ok(())
    }

    /// Closes relay link `link`: the tracks and members it imported are gone (subscribers'
    /// slots are emptied and remapped, members hear `participant_left`), and nothing more is
    /// exported on it.
    pub fn relay_close(&mut self, link: LinkId, now: Instant) -> Result<(), RouterError> {
        self.last_now = self.last_now.max(now);
        let Some(l) = self.relay.links.get(&link) else {
            return Err(RouterError::UnknownRelayLink(link));
        };
        let members = l.members.clone();
        for member in members {
            self.remote_member_left(link, member, now);
        }
        let Some(l) = self.relay.links.remove(&link) else {
            return Ok(());
        };
        for export in l.exports.values() {
            if let Some(track) = self.tracks.get_mut(&export.key) {
                track.exports.retain(|(id, _)| *id != link);
            }
            self.dynacast.push(export.key);
        }
        if let Some(c) = self.calls.get_mut(&l.call) {
            c.relay_links.retain(|id| *id != link);
            if c.members.is_empty() && c.relay_links.is_empty() {
                self.calls.remove(&l.call);
            }
        }
        self.counters.snapshot.relay.links_closed += 1;
        tracing::debug!(%link, "relay link closed");
        self.finish(now);
        Ok(())
    }

    /// The relay links open now, with their call.
    pub fn relay_links(&self) -> Vec<(LinkId, CallId)> {
        let mut links: Vec<(LinkId, CallId)> = self
            .relay
            .links
            .iter()
            .map(|(id, l)| (*id, l.call.clone()))
            .collect();
        links.sort();
        links
    }

    /// One frame from relay link `link`. Malformed frames, frames of unknown links and frames
    /// naming unknown tracks or members are dropped and counted
    /// ([`MetricsSnapshot::relay`](crate::MetricsSnapshot::relay)); nothing here fails. Drain
    /// [`Router::poll_output`] afterwards.
    pub fn handle_relay(&mut self, link: LinkId, bytes: &[u8], now: Instant) {
        self.last_now = self.last_now.max(now);
        let counters = &mut self.counters.snapshot.relay;
        counters.frames_in += 1;
        counters.bytes_in += bytes.len() as u64;
        let Some(l) = self.relay.links.get_mut(&link) else {
            counters.dropped_unknown += 1;
            return;
        };
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(error) => {
                counters.dropped_malformed += 1;
                tracing::trace!(%link, "relay frame dropped: {error}");
                return;
            }
        };
        l.last_heard = now;
        if std::mem::take(&mut l.silent) {
            self.relay_resumed(link, now);
        }
        match frame {
            Frame::Member {
                session,
                muted,
                user,
            } => self.remote_member(link, session, muted, user, now),
            Frame::MemberLeft { session } => {
                let known = self
                    .remote_members
                    .get(&session)
                    .is_some_and(|m| m.link == link);
                if known {
                    self.remote_member_left(link, session, now);
                } else {
                    self.counters.snapshot.relay.dropped_unknown += 1;
                }
            }
            Frame::Track {
                track,
                session,
                source,
                mid,
            } => self.import_track(link, track, session, source, mid),
            Frame::TrackEnd { track } => {
                match self
                    .relay
                    .links
                    .get_mut(&link)
                    .and_then(|l| l.imports.remove(&track))
                {
                    Some(import) => {
                        self.relay.imported.remove(&import.key);
                        self.unpublish(import.key, now);
                    }
                    None => self.counters.snapshot.relay.dropped_unknown += 1,
                }
            }
            Frame::Media(media) => self.import_media(link, &media, now),
            Frame::Level {
                track,
                audio_level,
                flags,
            } => self.import_level(link, track, audio_level, flags, now),
            Frame::KeyframeRequest { track, rid } => match self.export_key(link, track) {
                Some(key) => {
                    self.counters.snapshot.relay.keyframe_requests_in += 1;
                    self.request_keyframe(key, rid, now, false);
                }
                None => self.counters.snapshot.relay.dropped_unknown += 1,
            },
            Frame::LayerDemand { track, count, rids } => {
                let export = self
                    .relay
                    .links
                    .get_mut(&link)
                    .and_then(|l| l.exports.get_mut(&track));
                match export {
                    Some(export) => {
                        let wanted = rids[..usize::from(count).min(MAX_DEMANDED_LAYERS)].to_vec();
                        export.demand = Some(wanted);
                        self.counters.snapshot.relay.layer_demands_in += 1;
                        self.dynacast.push(export.key);
                    }
                    None => self.counters.snapshot.relay.dropped_unknown += 1,
                }
            }
            Frame::Nack {
                track,
                rid,
                seq,
                bitmask,
            } => self.relay_nack(link, track, rid, seq, bitmask, now),
            Frame::Keepalive => {}
        }
        self.finish(now);
    }

    /// The exported track numbered `no` on `link`.
    fn export_key(&self, link: LinkId, no: TrackNo) -> Option<TrackKey> {
        Some(self.relay.links.get(&link)?.exports.get(&no)?.key)
    }

    /// Queues a frame for a link.
    fn relay_send(&mut self, link: LinkId, frame: &Frame<'_>, now: Instant) {
        if let Some(l) = self.relay.links.get_mut(&link) {
            l.last_sent = now;
            send(
                &mut self.outputs,
                &mut self.counters.snapshot.relay,
                link,
                Bytes::from(frame.encode()),
            );
        }
    }

    /// The links a call has (none for most calls: no allocation then).
    fn links_of(&self, call: &CallId) -> Vec<LinkId> {
        self.calls
            .get(call)
            .map(|c| c.relay_links.clone())
            .unwrap_or_default()
    }

    /// Announces a local member (joined, or its mute changed) on `only` or on every link of
    /// its call.
    pub(super) fn export_member(&mut self, session: SessionId, only: Option<LinkId>, now: Instant) {
        let Some(state) = self.sessions.get(&session) else {
            return;
        };
        let links = match only {
            Some(link) => vec![link],
            None => self.links_of(&state.call),
        };
        if links.is_empty() {
            return;
        }
        let frame = Frame::Member {
            session,
            muted: state.muted,
            user: &state.user.0,
        }
        .encode();
        for link in links {
            if let Some(l) = self.relay.links.get_mut(&link) {
                l.last_sent = now;
                send(
                    &mut self.outputs,
                    &mut self.counters.snapshot.relay,
                    link,
                    Bytes::from(frame.clone()),
                );
            }
        }
    }

    /// A local member left: every link of its call hears it.
    pub(super) fn export_member_left(&mut self, call: &CallId, session: SessionId, now: Instant) {
        for link in self.links_of(call) {
            self.relay_send(link, &Frame::MemberLeft { session }, now);
        }
    }

    /// Starts exporting a local track on `only` or on every link of its call.
    pub(super) fn export_track(&mut self, key: TrackKey, only: Option<LinkId>, now: Instant) {
        let Some(call) = self.sessions.get(&key.publisher).map(|s| s.call.clone()) else {
            return;
        };
        let Some(source) = self.tracks.get(&key).map(|t| t.source) else {
            return;
        };
        let links = match only {
            Some(link) => vec![link],
            None => self.links_of(&call),
        };
        for link in links {
            let Some(l) = self.relay.links.get_mut(&link) else {
                continue;
            };
            if l.export_no.contains_key(&key) {
                continue;
            }
            // Numbers are not reused while the link lives (65,536 tracks per link).
            let no = l.next_no;
            l.next_no = l.next_no.wrapping_add(1);
            l.export_no.insert(key, no);
            l.exports.insert(
                no,
                Export {
                    key,
                    demand: None,
                    cache: VecDeque::new(),
                },
            );
            if let Some(track) = self.tracks.get_mut(&key) {
                track.exports.push((link, no));
            }
            let mid = key.mid.to_string();
            let frame = Frame::Track {
                track: no,
                session: key.publisher,
                source,
                mid: &mid,
            };
            self.relay_send(link, &frame, now);
        }
    }

    /// A local track ended: its links hear it.
    pub(super) fn export_track_end(&mut self, exports: &[(LinkId, TrackNo)], now: Instant) {
        for &(link, no) in exports {
            let Some(l) = self.relay.links.get_mut(&link) else {
                continue;
            };
            if let Some(export) = l.exports.remove(&no) {
                l.export_no.remove(&export.key);
            }
            self.relay_send(link, &Frame::TrackEnd { track: no }, now);
        }
    }

    /// The link's NACK: the cached frames it names go again.
    fn relay_nack(
        &mut self,
        link: LinkId,
        no: TrackNo,
        rid: Option<Rid>,
        seq: u64,
        bitmask: u16,
        now: Instant,
    ) {
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        let Some(export) = l.exports.get(&no) else {
            self.counters.snapshot.relay.dropped_unknown += 1;
            return;
        };
        self.counters.snapshot.relay.nacks_in += 1;
        let lost = std::iter::once(seq).chain(
            (0..16u64)
                .filter(|i| bitmask & (1 << i) != 0)
                .map(|i| seq.wrapping_add(i + 1)),
        );
        for wanted in lost {
            let hit = export
                .cache
                .iter()
                .find(|(r, s, _)| *r == rid && *s == wanted)
                .map(|(_, _, b)| b.clone());
            match hit {
                Some(bytes) => {
                    self.counters.snapshot.relay.retransmits += 1;
                    l.last_sent = now;
                    send(
                        &mut self.outputs,
                        &mut self.counters.snapshot.relay,
                        link,
                        bytes,
                    );
                }
                None => self.counters.snapshot.relay.retransmits_missed += 1,
            }
        }
    }

    /// A member of the other router (new, or its mute changed).
    fn remote_member(
        &mut self,
        link: LinkId,
        session: SessionId,
        muted: bool,
        user: &str,
        now: Instant,
    ) {
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        let call = l.call.clone();
        if self.sessions.contains_key(&session) {
            // Session ids must be unique among the routers of a call.
            self.counters.snapshot.relay.dropped_conflict += 1;
            tracing::debug!(%link, %session, "remote member has a local session's id");
            return;
        }
        match self.remote_members.get_mut(&session) {
            Some(m) if m.link != link => {
                self.counters.snapshot.relay.dropped_conflict += 1;
            }
            Some(m) => {
                if m.muted == muted {
                    return;
                }
                m.muted = muted;
                let user = m.user.clone();
                if let Some(c) = self.calls.get_mut(&call) {
                    c.speakers.set_muted(session, muted, now);
                }
                if !muted {
                    self.bump_epochs(session, true);
                }
                self.broadcast(
                    &call,
                    None,
                    ServerMessage::Muted {
                        session,
                        user,
                        muted,
                    },
                );
            }
            None => {
                if l.members.len() >= MAX_MEMBERS_PER_LINK {
                    self.counters.snapshot.relay.dropped_limit += 1;
                    return;
                }
                l.members.push(session);
                let user = UserId(user.to_owned());
                self.remote_members.insert(
                    session,
                    RemoteMember {
                        link,
                        call: call.clone(),
                        user: user.clone(),
                        muted,
                    },
                );
                if let Some(c) = self.calls.get_mut(&call) {
                    c.speakers.set_muted(session, muted, now);
                }
                self.broadcast(
                    &call,
                    None,
                    ServerMessage::ParticipantJoined { session, user },
                );
            }
        }
    }

    /// A member of the other router left (or its link closed): its tracks go, the call hears.
    fn remote_member_left(&mut self, link: LinkId, session: SessionId, now: Instant) {
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        l.members.retain(|m| *m != session);
        let nos: Vec<TrackNo> = l
            .imports
            .iter()
            .filter(|(_, i)| i.key.publisher == session)
            .map(|(no, _)| *no)
            .collect();
        let mut keys = Vec::with_capacity(nos.len());
        for no in nos {
            if let Some(import) = l.imports.remove(&no) {
                keys.push(import.key);
            }
        }
        for key in keys {
            self.relay.imported.remove(&key);
            self.unpublish(key, now);
        }
        let Some(member) = self.remote_members.remove(&session) else {
            return;
        };
        if let Some(c) = self.calls.get_mut(&member.call) {
            c.speakers.remove(session);
            c.recent_speakers.retain(|s| *s != session);
        }
        for state in self.sessions.values_mut() {
            state.pins.retain(|p| *p != session);
        }
        self.broadcast(
            &member.call,
            None,
            ServerMessage::ParticipantLeft {
                session,
                user: member.user,
            },
        );
    }

    /// A track the other router exports.
    fn import_track(
        &mut self,
        link: LinkId,
        no: TrackNo,
        session: SessionId,
        source: TrackSource,
        mid: &str,
    ) {
        let known = self
            .remote_members
            .get(&session)
            .is_some_and(|m| m.link == link);
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        if !known || l.imports.contains_key(&no) {
            self.counters.snapshot.relay.dropped_unknown += 1;
            return;
        }
        if l.imports.len() >= MAX_IMPORTS_PER_LINK {
            self.counters.snapshot.relay.dropped_limit += 1;
            return;
        }
        let key = TrackKey {
            publisher: session,
            mid: Mid::from(mid),
        };
        if self.tracks.contains_key(&key) {
            self.counters.snapshot.relay.dropped_conflict += 1;
            return;
        }
        l.imports.insert(
            no,
            Import {
                key,
                highest: Vec::new(),
                pending: VecDeque::new(),
            },
        );
        let call = l.call.clone();
        self.relay.imported.insert(key, (link, no));
        let kind = if source.is_audio() {
            MediaKind::Audio
        } else {
            MediaKind::Video
        };
        self.tracks.insert(key, PublishedTrack::new(kind, source));
        if let Some(c) = self.calls.get_mut(&call) {
            c.tracks.push(key);
        }
        let user = self.remote_members.get(&session).map(|m| m.user.clone());
        if let Some(user) = user {
            self.broadcast(
                &call,
                None,
                ServerMessage::Published {
                    session,
                    user,
                    source,
                    on: true,
                },
            );
        }
        if kind == MediaKind::Video {
            self.remap_call(&call, None);
        }
        self.counters.snapshot.relay.tracks_imported += 1;
    }

    /// A media packet of an imported track: repair or conceal loss on the link, then forward
    /// it as a local publisher's.
    fn import_media(&mut self, link: LinkId, media: &MediaFrame<'_>, now: Instant) {
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        let Some(import) = l.imports.get_mut(&media.track) else {
            self.counters.snapshot.relay.dropped_unknown += 1;
            return;
        };
        let key = import.key;
        let video = media.codec != RelayCodec::Opus;
        let mut gap = None;
        let layer = import.highest.iter().position(|(r, _)| *r == media.rid);
        let layers = import.highest.len();
        match layer.map(|i| &mut import.highest[i].1) {
            Some(highest) => {
                if media.seq > *highest {
                    let lost = media.seq - *highest - 1;
                    if lost > 0 {
                        gap = Some((*highest + 1, lost));
                    }
                    *highest = media.seq;
                } else {
                    self.counters.snapshot.relay.late_frames += 1;
                    let rid = media.rid;
                    import
                        .pending
                        .retain(|(r, seq, _)| !(*r == rid && *seq == media.seq));
                }
            }
            None if layers < MAX_LAYERS => {
                import.highest.push((media.rid, media.seq));
            }
            None => {
                self.counters.snapshot.relay.dropped_limit += 1;
                return;
            }
        }
        if let Some((first, lost)) = gap {
            self.counters.snapshot.relay.lost_frames += lost;
            if video && lost <= RELAY_NACK_SPAN {
                let mut bitmask = 0u16;
                for i in 1..lost {
                    bitmask |= 1 << (i - 1);
                }
                if let Some(import) = self
                    .relay
                    .links
                    .get_mut(&link)
                    .and_then(|l| l.imports.get_mut(&media.track))
                {
                    for seq in first..first + lost {
                        if import.pending.len() >= MAX_PENDING_NACKS {
                            import.pending.pop_front();
                            self.counters.snapshot.relay.nacks_given_up += 1;
                        }
                        import.pending.push_back((media.rid, seq, 1));
                    }
                }
                self.counters.snapshot.relay.nacks_out += 1;
                let frame = Frame::Nack {
                    track: media.track,
                    rid: media.rid,
                    seq: first,
                    bitmask,
                };
                self.relay_send(link, &frame, now);
            } else if video {
                // Too much to repair: subscribers resync at the keyframe asked for here.
                self.counters.snapshot.relay.concealed += 1;
                if let Some(track) = self.tracks.get_mut(&key) {
                    track.epoch = track.epoch.wrapping_add(1);
                }
                self.request_keyframe(key, media.rid, now, true);
            }
        }
        let red = media.flags & FLAG_RED != 0;
        let codec = PayloadCodec {
            codec: media.codec.to_str0m(),
            clock_rate: media.codec.clock_rate(),
            primary_pt: if red { media.primary_pt } else { media.pt }.into(),
            red,
        };
        let has_level = media.flags & FLAG_LEVEL != 0;
        let packet = MediaPacket {
            seq: media.seq,
            rtp_time: media.rtp_time,
            marker: media.flags & FLAG_MARKER != 0,
            pt: media.pt.into(),
            // str0m takes an `Arc<[u8]>`: the one copy of an imported packet.
            payload: Arc::from(media.payload),
            arrival: now,
            audio_level: has_level.then(|| level_from_wire(media.audio_level)),
            voice_activity: has_level.then_some(media.flags & FLAG_VOICE != 0),
            video_orientation: None,
            sender: None,
            keyframe: video.then_some(media.flags & FLAG_KEYFRAME != 0),
        };
        let muted = self
            .remote_members
            .get(&key.publisher)
            .is_some_and(|m| m.muted);
        self.counters.snapshot.relay.media_in += 1;
        self.forward_media(key, media.rid, Some(codec), muted, packet, now);
    }

    /// The level of a remote speaker's packet that was not relayed.
    fn import_level(&mut self, link: LinkId, no: TrackNo, level: u8, flags: u8, now: Instant) {
        let Some(key) = self
            .relay
            .links
            .get(&link)
            .and_then(|l| l.imports.get(&no))
            .map(|i| i.key)
        else {
            self.counters.snapshot.relay.dropped_unknown += 1;
            return;
        };
        let Some(member) = self.remote_members.get(&key.publisher) else {
            return;
        };
        if let Some(c) = self.calls.get_mut(&member.call) {
            c.speakers.observe(
                key.publisher,
                level_from_wire(level),
                Some(flags & FLAG_VOICE != 0),
                now,
            );
        }
    }

    /// A keyframe request for an imported track goes to its exporter. Returns whether the
    /// track is imported.
    pub(super) fn relay_keyframe_request(
        &mut self,
        key: TrackKey,
        rid: Option<Rid>,
        now: Instant,
    ) -> bool {
        let Some(&(link, track)) = self.relay.imported.get(&key) else {
            return false;
        };
        self.counters.snapshot.relay.keyframe_requests_out += 1;
        self.relay_send(link, &Frame::KeyframeRequest { track, rid }, now);
        true
    }

    /// Dynacast for an imported track: the layers wanted here go to its exporter. Returns
    /// whether the track is imported.
    pub(super) fn relay_layer_demand(
        &mut self,
        key: TrackKey,
        active: &[Rid],
        now: Instant,
    ) -> bool {
        let Some(&(link, track)) = self.relay.imported.get(&key) else {
            return false;
        };
        // The exporter withholds the layers not demanded: a layer demanded again comes back
        // with a jump in its sequence numbers that is no loss. Each layer starts afresh.
        if let Some(import) = self
            .relay
            .links
            .get_mut(&link)
            .and_then(|l| l.imports.get_mut(&track))
        {
            import
                .highest
                .retain(|(rid, _)| rid.is_some_and(|r| active.contains(&r)));
            import
                .pending
                .retain(|(rid, _, _)| rid.is_some_and(|r| active.contains(&r)));
        }
        let mut rids = [Rid::from(""); MAX_DEMANDED_LAYERS];
        let count = active.len().min(MAX_DEMANDED_LAYERS);
        rids[..count].copy_from_slice(&active[..count]);
        self.counters.snapshot.relay.layer_demands_out += 1;
        let frame = Frame::LayerDemand {
            track,
            count: count as u8,
            rids,
        };
        self.relay_send(link, &frame, now);
        true
    }

    /// Every tick: keepalives, and links that went silent.
    pub(super) fn relay_tick(&mut self, now: Instant) {
        let mut keepalive = Vec::new();
        for (id, l) in &mut self.relay.links {
            if now.saturating_duration_since(l.last_sent) >= RELAY_KEEPALIVE {
                keepalive.push(*id);
            }
            if !l.silent && now.saturating_duration_since(l.last_heard) >= RELAY_SILENT_AFTER {
                l.silent = true;
                self.counters.snapshot.relay.link_silences += 1;
                tracing::info!(link = %id, "relay link silent: its tracks pause");
            }
        }
        for link in keepalive {
            self.relay_send(link, &Frame::Keepalive, now);
        }
        self.relay_nack_again(now);
    }

    /// Every tick: lost packets not repaired yet are asked for again (a retransmission can be
    /// lost as well), up to [`RELAY_NACK_TRIES`] NACKs each.
    fn relay_nack_again(&mut self, now: Instant) {
        let mut again: Vec<(LinkId, Frame<'static>)> = Vec::new();
        for (id, l) in &mut self.relay.links {
            if l.silent {
                continue;
            }
            for (&track, import) in &mut l.imports {
                let before = import.pending.len();
                import
                    .pending
                    .retain(|(_, _, tries)| *tries < RELAY_NACK_TRIES);
                self.counters.snapshot.relay.nacks_given_up +=
                    (before - import.pending.len()) as u64;
                for (rid, seq, tries) in &mut import.pending {
                    *tries += 1;
                    again.push((
                        *id,
                        Frame::Nack {
                            track,
                            rid: *rid,
                            seq: *seq,
                            bitmask: 0,
                        },
                    ));
                }
            }
        }
        for (link, frame) in again {
            self.counters.snapshot.relay.nacks_out += 1;
            self.relay_send(link, &frame, now);
        }
    }

    /// A silent link speaks again: its video tracks start a new epoch (subscribers resync at
    /// the next keyframe, without a sequence gap) and keyframes are asked for.
    fn relay_resumed(&mut self, link: LinkId, now: Instant) {
        self.counters.snapshot.relay.link_resumes += 1;
        tracing::info!(%link, "relay link speaks again: its tracks resume");
        let Some(l) = self.relay.links.get_mut(&link) else {
            return;
        };
        let keys: Vec<TrackKey> = l
            .imports
            .values_mut()
            .map(|i| {
                i.highest.clear();
                i.pending.clear();
                i.key
            })
            .collect();
        for key in keys {
            let Some(track) = self.tracks.get_mut(&key) else {
                continue;
            };
            track.epoch = track.epoch.wrapping_add(1);
            let rids: Vec<Option<Rid>> = track.layers.iter().map(|l| l.rid).collect();
            for rid in rids {
                self.request_keyframe(key, rid, now, true);
            }
        }
    }

    /// A discontinuity on `publisher`'s tracks (audio only with `audio_only`).
    fn bump_epochs(&mut self, publisher: SessionId, audio_only: bool) {
        for (key, track) in &mut self.tracks {
            if key.publisher == publisher && (!audio_only || track.is_audio()) {
                track.epoch = track.epoch.wrapping_add(1);
            }
        }
    }

    /// The remote members of `call` for a roster (with what they publish).
    pub(super) fn remote_roster(&self, call: &CallId) -> Vec<crate::signal::RosterEntry> {
        let Some(c) = self.calls.get(call) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for link in &c.relay_links {
            let Some(l) = self.relay.links.get(link) else {
                continue;
            };
            for session in &l.members {
                let Some(m) = self.remote_members.get(session) else {
                    continue;
                };
                entries.push(crate::signal::RosterEntry {
                    session: *session,
                    user: m.user.clone(),
                    muted: m.muted,
                    publishing: c
                        .tracks
                        .iter()
                        .filter(|k| k.publisher == *session)
                        .filter_map(|k| self.tracks.get(k).map(|t| t.source))
                        .collect(),
                });
            }
        }
        entries
    }
}
