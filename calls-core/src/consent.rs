//! Consent before media: a remote address is used for a session only after it has answered a
//! binding request from the router (RFC 7675 §5.1 in spirit, for the first contact too).
//!
//! ICE-lite answers and nominates on what the client sends (RFC 8445 §2.5), and a participant
//! knows its own ICE password: it can sign a binding request with USE-CANDIDATE and spoof its
//! source address, and the router would then send that session's media (most of a call) to the
//! spoofed address, a victim. So an authenticated binding request from a UDP address the
//! session does not have yet is held back: the router sends its own binding request to that
//! address, signed with the client's password (from its offer), with a transaction id the
//! spoofer cannot see. Only a success response from that address, signed by the client, admits
//! the flow; the held request is then handed to the session as if it had just arrived, so a
//! real client loses one round trip, not a retransmission. A spoofed address never answers
//! (or answers without the client's signature), and gets nothing but one binding request of
//! about the size of the spoofed one (no amplification).
//!
//! The check's transaction id is the only secret of the exchange (the participant knows its
//! own password, so it could sign a forged answer): 11 of its 12 bytes come from the operating
//! system's CSPRNG. The first byte is the router's worker index, so that a dispatcher that
//! runs one router per core can route the answer, which carries no USERNAME, to the router
//! that asked ([`crate::demux::consent_answer_worker`]).
//!
//! ICE-TCP needs none of this: a TCP handshake already proved that the address answers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::crypto::Sha1HmacProvider;
use str0m::ice::{StunMessage, TransId};

use crate::demux::{DropReason, FlowKey, Proto};
use crate::ids::SessionId;
use crate::limits::RemoteIce;
use crate::router::Transmit;

/// A new address's binding requests are held for this long; retransmissions within it do not
/// send a second check (the client retransmits its own check every ~50–500 ms, RFC 8445
/// §14.3).
const RECHECK_AFTER: Duration = Duration::from_millis(250);
/// A check unanswered this long is forgotten.
const CHECK_EXPIRES: Duration = Duration::from_secs(10);
/// Outstanding checks per router: beyond it the oldest expire early (each costs a held request
/// of at most one datagram).
const MAX_PENDING: usize = 4096;
/// Largest request held back (a binding request is ~100 bytes).
const MAX_HELD_REQUEST: usize = 1024;
/// PRIORITY of the router's checks: a host candidate's (RFC 8445 §5.1.2.1, type preference
/// 126, local preference 65535, component 1). The client only echoes it in a triggered check.
const CHECK_PRIORITY: u32 = (126 << 24) | (65535 << 8) | 255;

/// A check sent to a new address, waiting for its answer.
#[derive(Debug)]
struct Pending {
    session: SessionId,
    trans_id: TransId,
    /// The client's ICE password: its answer must be signed with it.
    remote_pwd: String,
    sent_at: Instant,
    /// The latest binding request from that address, handed to the session once it answers.
    request: Vec<u8>,
}

/// The answered check: the flow to admit, and the request held back for it.
#[derive(Debug)]
pub(crate) struct Confirmed {
    pub session: SessionId,
    pub request: Vec<u8>,
}

/// Outstanding consent checks of one router.
#[derive(Debug, Default)]
pub(crate) struct ConsentChecks {
    pending: HashMap<FlowKey, Pending>,
    transmits: VecDeque<Transmit>,
}

impl ConsentChecks {
    /// An authenticated binding request for `session` from a UDP address it does not have yet:
    /// held back, and the address is sent a check (unless one went out within
    /// [`RECHECK_AFTER`]). `local` is the advertised address the request reached. Returns why
    /// the request does not reach the session now.
    #[allow(clippy::too_many_arguments)]
    pub fn challenge(
        &mut self,
        key: FlowKey,
        session: SessionId,
        worker: u8,
        local_ufrag: &str,
        remote: Option<&RemoteIce>,
        request: &[u8],
        local: SocketAddr,
        hmac: &dyn Sha1HmacProvider,
        now: Instant,
    ) -> DropReason {
        let Some(remote) = remote else {
            // No offer yet, so no client password to sign a check with: a client cannot
            // have sent a valid request before our answer anyway.
            return DropReason::ConsentPending;
        };
        if let Some(pending) = self.pending.get_mut(&key) {
            if pending.session == session
                && now.saturating_duration_since(pending.sent_at) < RECHECK_AFTER
            {
                pending.request = held(request);
                return DropReason::ConsentPending;
            }
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending
                .retain(|_, p| now.saturating_duration_since(p.sent_at) < CHECK_EXPIRES);
            if self.pending.len() >= MAX_PENDING {
                return DropReason::ConsentPending;
            }
        }
        // RFC 8445 §7.2.2: USERNAME is "their ufrag:our ufrag", signed with their password;
        // we are the controlled agent (ICE-lite).
        let username = format!("{}:{}", remote.ufrag, local_ufrag);
        let Some(trans_id) = check_trans_id(worker) else {
            return DropReason::ConsentPending; // no entropy: no check (the client retries)
        };
        let message =
            StunMessage::binding_request(&username, trans_id, false, 0, CHECK_PRIORITY, false);
        let mut buf = [0u8; 512];
        let Ok(len) = message.to_bytes(Some(remote.pwd.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        }) else {
            return DropReason::ConsentPending;
        };
        self.transmits.push_back(Transmit {
            proto: Proto::Udp,
            conn: None,
            source: local,
            destination: key.source,
            contents: buf[..len].to_vec(),
        });
        self.pending.insert(
            key,
            Pending {
                session,
                trans_id,
                remote_pwd: remote.pwd.clone(),
                sent_at: now,
                request: held(request),
            },
        );
        DropReason::ConsentPending
    }

    /// A STUN datagram from an unknown flow: if it is the signed success answer to our check to
    /// that address, the flow is confirmed (and forgotten here). `None` otherwise; the datagram
    /// then takes the normal path.
    pub fn answered(
        &mut self,
        datagram: &[u8],
        key: FlowKey,
        hmac: &dyn Sha1HmacProvider,
    ) -> Option<Confirmed> {
        let pending = self.pending.get(&key)?;
        let message = StunMessage::parse(datagram).ok()?;
        if !message.is_successful_binding_response() || message.trans_id() != pending.trans_id {
            return None;
        }
        if !message.verify(pending.remote_pwd.as_bytes(), |k, p| hmac.sha1_hmac(k, p)) {
            return None;
        }
        let pending = self.pending.remove(&key)?;
        Some(Confirmed {
            session: pending.session,
            request: pending.request,
        })
    }

    /// The next check to send.
    pub fn pop_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
}

/// A transaction id for a check from worker `worker`: the worker index, then 11 bytes from the
/// operating system's CSPRNG (`TransId::new` is not cryptographic, and a participant that could
/// predict it could forge the answer for a spoofed address). `None` if the OS has no entropy.
fn check_trans_id(worker: u8) -> Option<TransId> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes[1..]).ok()?;
    bytes[0] = worker;
    // `TransId` has no public constructor from bytes, but deserializes from them (a newtype
    // of `[u8; 12]`, transparent in serde_json). Once per check, not per packet.
    let value = serde_json::Value::Array(bytes.iter().map(|b| (*b).into()).collect());
    serde_json::from_value(value).ok()
}

fn held(request: &[u8]) -> Vec<u8> {
    request[..request.len().min(MAX_HELD_REQUEST)].to_vec()
}
