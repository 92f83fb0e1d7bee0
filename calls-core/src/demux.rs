//! One port, many sessions: classify each datagram (RFC 7983), find its session by 5-tuple in
//! O(1), and admit new flows only through an authenticated STUN binding request.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use str0m::ice::StunMessage;

use crate::ids::SessionId;
use crate::router::Event;

/// Transport of a datagram or frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// A UDP datagram.
    Udp,
    /// An RFC 4571 frame on an ICE-TCP connection.
    Tcp,
}

impl From<Proto> for str0m::net::Protocol {
    fn from(value: Proto) -> Self {
        match value {
            Proto::Udp => str0m::net::Protocol::Udp,
            Proto::Tcp => str0m::net::Protocol::Tcp,
        }
    }
}

/// What the first byte says a datagram is (RFC 7983 §7, extended by RFC 9443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 0–3: STUN.
    Stun,
    /// 20–63: DTLS.
    Dtls,
    /// 128–191: RTP or RTCP.
    Rtp,
    /// Anything else (ZRTP, TURN channels, garbage).
    Other,
}

/// Classifies a datagram by its first byte.
pub fn classify(datagram: &[u8]) -> Class {
    match datagram.first() {
        Some(0..=3) => Class::Stun,
        Some(20..=63) => Class::Dtls,
        Some(128..=191) => Class::Rtp,
        _ => Class::Other,
    }
}

/// Whether a datagram is RTP media, as opposed to control traffic (STUN, DTLS, RTCP) that an
/// embedder under load should serve first (see [`crate::load`]). RFC 7983: first byte 128–191
/// is RTP or RTCP; RFC 5761 §4: the second byte of RTCP is its packet type 192–223, which
/// reads as payload type 64–95 with the marker bit masked off (never used by RTP then).
/// Stateless and allocation-free: a dispatcher can call it for every datagram.
pub fn is_rtp_media(datagram: &[u8]) -> bool {
    match (classify(datagram), datagram.get(1)) {
        (Class::Rtp, Some(second)) => !(64..=95).contains(&(second & 0x7F)),
        _ => false,
    }
}

/// Why an incoming datagram was dropped without reaching a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DropReason {
    /// First byte is no STUN, DTLS or RTP/RTCP (RFC 7983).
    Unclassified,
    /// Looked like STUN but did not parse.
    MalformedStun,
    /// STUN from an unknown source that is not a binding request.
    StunNotBindingRequest,
    /// A binding request whose USERNAME names no session here.
    UnknownUfrag,
    /// A binding request that failed MESSAGE-INTEGRITY.
    StunAuthFailed,
    /// DTLS or RTP/RTCP from a source that never authenticated.
    UnknownSource,
    /// Larger than any valid datagram.
    Oversized,
    /// The session refused it (str0m error: bad DTLS, SRTP auth failure, …).
    SessionRejected,
    /// An ICE-TCP frame longer than any datagram (the connection is closed).
    TcpFrameTooLarge,
    /// A probe request beyond `probe_replies_per_second`, or too small to answer.
    ProbeRateLimited,
    /// An authenticated binding request from a new UDP address, held until that address
    /// answers the router's own check (docs/security.md, "Media redirection"): a spoofed
    /// address never does.
    ConsentPending,
}

impl DropReason {
    /// Every reason, for metrics that list zero counts too.
    pub const ALL: [DropReason; 11] = [
        DropReason::Unclassified,
        DropReason::MalformedStun,
        DropReason::StunNotBindingRequest,
        DropReason::UnknownUfrag,
        DropReason::StunAuthFailed,
        DropReason::UnknownSource,
        DropReason::Oversized,
        DropReason::SessionRejected,
        DropReason::TcpFrameTooLarge,
        DropReason::ProbeRateLimited,
        DropReason::ConsentPending,
    ];

    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Unclassified => "unclassified",
            DropReason::MalformedStun => "malformed_stun",
            DropReason::StunNotBindingRequest => "stun_not_binding_request",
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::StunAuthFailed => "stun_auth_failed",
            DropReason::UnknownSource => "unknown_source",
            DropReason::Oversized => "oversized",
            DropReason::SessionRejected => "session_rejected",
            DropReason::TcpFrameTooLarge => "tcp_frame_too_large",
            DropReason::ProbeRateLimited => "probe_rate_limited",
            DropReason::ConsentPending => "consent_pending",
        }
    }
}

/// Largest datagram accepted (a jumbo-free Ethernet MTU plus slack).
pub const MAX_DATAGRAM_BYTES: usize = 2048;

/// The 5-tuple of a flow (the protocol is the fifth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub proto: Proto,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// The local ufrag named by a STUN binding request's USERNAME (`local:remote`), without checking
/// anything else. Cheap and stateless: a dispatcher uses it to pick the worker for a new flow.
pub fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    if classify(datagram) != Class::Stun {
        return None;
    }
    let message = StunMessage::parse(datagram).ok()?;
    if !message.is_binding_request() {
        return None;
    }
    let username: &str = message.username()?;
    let (local, _remote) = username.split_once(':')?;
    Some(local)
}

/// The worker a STUN binding success response belongs to, read from its transaction id, if it
/// answers one of the router's consent checks (the `consent` module: their transaction ids
/// start with the worker index). Stateless like [`stun_local_ufrag`]: a response comes from an
/// address no flow has yet, and carries no USERNAME to route it by. Anything else is `None`.
pub fn consent_answer_worker(datagram: &[u8]) -> Option<u8> {
    // RFC 5389 §6: type 0x0101 (binding success), magic cookie, 12-byte transaction id.
    let header = datagram.get(..20)?;
    if header[..2] != [0x01, 0x01] || header[4..8] != [0x21, 0x12, 0xA4, 0x42] {
        return None;
    }
    Some(header[8])
}

/// Mints ICE ufrags that carry the worker index, and reads it back.
pub(crate) mod ufrag {
    /// `w` + two hex digits of the worker + random tail.
    pub fn mint(worker: u8, random_tail: &str) -> String {
        format!("w{worker:02x}{random_tail}")
    }

    /// The worker index minted into a ufrag, if it is one of ours.
    pub fn worker(ufrag: &str) -> Option<u8> {
        let hex = ufrag.strip_prefix('w')?.get(..2)?;
        u8::from_str_radix(hex, 16).ok()
    }
}

/// 5-tuple → session, plus each session's flows so they can be forgotten with it.
///
/// Every change is queued as an [`Event`] (admitted, moved, removed) in the order it happened;
/// the router hands them out first in `poll_output`, so a dispatcher that keeps its own
/// address → worker map from them (several routers on one port) stays exactly in step.
#[derive(Debug, Default)]
pub(crate) struct FlowTable {
    by_key: HashMap<FlowKey, SessionId>,
    by_session: HashMap<SessionId, Vec<FlowKey>>,
    events: VecDeque<Event>,
}

impl FlowTable {
    pub fn lookup(&self, key: &FlowKey) -> Option<SessionId> {
        self.by_key.get(key).copied()
    }

    /// Remembers `key` for `session`; beyond `max` flows the oldest one is forgotten. A flow that
    /// belonged to another session moves (the other session's peer went away or rebinding).
    pub fn insert(&mut self, key: FlowKey, session: SessionId, max: usize) {
        if let Some(previous) = self.by_key.insert(key, session) {
            if previous == session {
                return;
            }
            if let Some(flows) = self.by_session.get_mut(&previous) {
                flows.retain(|k| *k != key);
            }
            self.events.push_back(Event::FlowMoved {
                from: previous,
                to: session,
                proto: key.proto,
                remote: key.source,
                local: key.destination,
            });
        }
        tracing::debug!(%session, source = %key.source, "flow admitted");
        self.events.push_back(Event::FlowAdmitted {
            session,
            proto: key.proto,
            remote: key.source,
            local: key.destination,
        });
        let flows = self.by_session.entry(session).or_default();
        flows.push(key);
        while flows.len() > max {
            let oldest = flows.remove(0);
            self.by_key.remove(&oldest);
            self.events.push_back(removed(session, oldest));
        }
    }

    /// Forgets one flow (a TCP connection closed).
    pub fn remove_key(&mut self, key: &FlowKey) {
        if let Some(session) = self.by_key.remove(key) {
            if let Some(flows) = self.by_session.get_mut(&session) {
                flows.retain(|k| k != key);
            }
            self.events.push_back(removed(session, *key));
        }
    }

    pub fn remove_session(&mut self, session: SessionId) {
        if let Some(flows) = self.by_session.remove(&session) {
            for key in flows {
                self.by_key.remove(&key);
                self.events.push_back(removed(session, key));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The oldest change not yet handed out.
    pub fn pop_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn removed(session: SessionId, key: FlowKey) -> Event {
    Event::FlowRemoved {
        session,
        proto: key.proto,
        remote: key.source,
        local: key.destination,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_media_is_told_from_rtcp_stun_and_dtls() {
        // Opus PT 111 with and without the marker bit; VP8 PT 96.
        assert!(is_rtp_media(&[0x80, 111, 0, 1]));
        assert!(is_rtp_media(&[0x80, 0x80 | 111, 0, 1]));
        assert!(is_rtp_media(&[0x90, 96, 0, 1]));
        // RTCP SR 200, RR 201, RTPFB 205, PSFB 206 (a compound's first packet).
        for pt in [200u8, 201, 205, 206] {
            assert!(!is_rtp_media(&[0x81, pt, 0, 7]), "{pt}");
        }
        assert!(!is_rtp_media(&[0x00, 0x01, 0, 0])); // STUN binding request
        assert!(!is_rtp_media(&[22, 0xfe, 0xfd])); // DTLS handshake
        assert!(!is_rtp_media(&[0x80]));
        assert!(!is_rtp_media(&[]));
    }

    #[test]
    fn classify_follows_rfc7983() {
        assert_eq!(classify(&[0]), Class::Stun);
        assert_eq!(classify(&[3]), Class::Stun);
        assert_eq!(classify(&[4]), Class::Other);
        assert_eq!(classify(&[19]), Class::Other);
        assert_eq!(classify(&[20]), Class::Dtls);
        assert_eq!(classify(&[63]), Class::Dtls);
        assert_eq!(classify(&[64]), Class::Other);
        assert_eq!(classify(&[128]), Class::Rtp);
        assert_eq!(classify(&[191]), Class::Rtp);
        assert_eq!(classify(&[192]), Class::Other);
        assert_eq!(classify(&[]), Class::Other);
    }

    #[test]
    fn ufrag_carries_the_worker() {
        let u = ufrag::mint(0xab, "xyz123");
        assert_eq!(ufrag::worker(&u), Some(0xab));
        assert_eq!(ufrag::worker("nope"), None);
    }

    #[test]
    fn flow_table_bounds_flows_per_session() {
        let mut table = FlowTable::default();
        let dst: SocketAddr = "10.0.0.1:8443".parse().unwrap();
        for port in 1..=10u16 {
            let key = FlowKey {
                proto: Proto::Udp,
                source: SocketAddr::new("192.0.2.1".parse().unwrap(), port),
                destination: dst,
            };
            table.insert(key, SessionId(1), 3);
        }
        assert_eq!(table.len(), 3);
        table.remove_session(SessionId(1));
        assert_eq!(table.len(), 0);
    }
}
