//! Ingress: the path of a datagram from the socket to its session. One UDP port and one TCP
//! port carry every call: RFC 7983 classification, the 5-tuple flow table, STUN admission (a new
//! flow only after MESSAGE-INTEGRITY checks out against a session's password), the probe
//! credential, ICE-TCP framing (RFC 4571) per connection, and the way back out (`transmit`).
//! From here a datagram goes into its session's str0m `Rtc`; the RTP packets str0m hands back
//! continue in `forwarding.rs`.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::ice::{StunMessage, StunMessageBuilder};
use str0m::net::Receive;
use str0m::Input;

use super::{Datagram, Output, Router, Transmit};
use crate::demux::{self, Class, DropReason, FlowKey, Proto, MAX_DATAGRAM_BYTES};
use crate::ids::SessionId;
use crate::tcp::{self, ConnId, Framer, TcpConn, TcpError};

impl Router {
    /// Feeds one received datagram. Unknown, garbage and unauthenticated datagrams are dropped
    /// silently (no reply) and counted by reason in [`metrics`](Self::metrics).
    pub fn handle_datagram(&mut self, datagram: Datagram<'_>, now: Instant) {
        self.handle_datagrams(std::iter::once(datagram), now);
    }

    /// Feeds a batch of received datagrams (what one `recvmmsg` returned), then drain
    /// [`Router::poll_output`] once. Same as [`Router::handle_datagram`] for each, except that
    /// every subscriber session touched by the batch is given its timeout once, not once per
    /// datagram: with a bandwidth estimator and pacer per session (str0m's `handle_timeout`),
    /// that is most of the per-packet cost in a big call. Keep batches small (≤ 32): writes to
    /// one subscriber wait in str0m until that timeout.
    pub fn handle_datagrams<'a>(
        &mut self,
        datagrams: impl IntoIterator<Item = Datagram<'a>>,
        now: Instant,
    ) {
        self.last_now = self.last_now.max(now);
        for datagram in datagrams {
            self.ingest(datagram, now);
        }
        self.finish(now);
    }

    /// Announces an accepted ICE-TCP connection (on the TCP media port) before its bytes.
    /// `local` is the socket's local address (`accept()` gives it); behind NAT or port
    /// forwarding it may differ from the advertised candidate.
    pub fn tcp_accepted(
        &mut self,
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), TcpError> {
        if self.tcp_conns.contains_key(&conn) {
            return Err(TcpError::ConnectionExists(conn));
        }
        // str0m sees (and sends from) the advertised candidate address, not the socket's.
        let local = self.local_address(Proto::Tcp, local);
        self.tcp_by_addr.insert((remote, local), conn);
        self.tcp_conns.insert(
            conn,
            TcpConn {
                remote,
                local,
                framer: Framer::default(),
            },
        );
        Ok(())
    }

    /// Feeds bytes read from an ICE-TCP connection, split anywhere. Each complete RFC 4571
    /// frame goes through the same demux as a UDP datagram. On an error the router has
    /// forgotten the connection and the embedder should close it; nothing else is disturbed.
    pub fn handle_tcp_data(
        &mut self,
        conn: ConnId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), TcpError> {
        self.last_now = self.last_now.max(now);
        let Some(mut state) = self.tcp_conns.remove(&conn) else {
            return Err(TcpError::UnknownConnection(conn));
        };
        let (remote, local) = (state.remote, state.local);
        let result = state.framer.push(bytes, |frame| {
            self.ingest(
                Datagram {
                    proto: Proto::Tcp,
                    source: remote,
                    destination: local,
                    contents: frame,
                },
                now,
            );
        });
        let outcome = match result {
            Ok(()) => {
                self.tcp_conns.insert(conn, state);
                Ok(())
            }
            Err(len) => {
                self.count_drop(DropReason::TcpFrameTooLarge);
                self.counters.snapshot.tcp_rejected += 1;
                self.forget_tcp(conn, remote, local);
                Err(TcpError::FrameTooLarge {
                    conn,
                    len,
                    max: MAX_DATAGRAM_BYTES,
                })
            }
        };
        self.finish(now);
        outcome
    }

    /// The embedder closed (or lost) an ICE-TCP connection.
    pub fn tcp_closed(&mut self, conn: ConnId) -> Result<(), TcpError> {
        let state = self
            .tcp_conns
            .remove(&conn)
            .ok_or(TcpError::UnknownConnection(conn))?;
        self.forget_tcp(conn, state.remote, state.local);
        Ok(())
    }

    pub(super) fn forget_tcp(&mut self, conn: ConnId, remote: SocketAddr, local: SocketAddr) {
        self.tcp_conns.remove(&conn);
        if self.tcp_by_addr.get(&(remote, local)) == Some(&conn) {
            self.tcp_by_addr.remove(&(remote, local));
        }
        self.flows.remove_key(&FlowKey {
            proto: Proto::Tcp,
            source: remote,
            destination: local,
        });
    }

    /// One datagram (or TCP frame) through the demux into its session, drained.
    fn ingest(&mut self, datagram: Datagram<'_>, now: Instant) {
        let snapshot = &mut self.counters.snapshot;
        snapshot.datagrams_in += 1;
        snapshot.datagram_bytes_in += datagram.contents.len() as u64;
        if datagram.contents.len() > MAX_DATAGRAM_BYTES {
            self.count_drop(DropReason::Oversized);
            return;
        }
        let class = demux::classify(datagram.contents);
        if class == Class::Other {
            self.count_drop(DropReason::Unclassified);
            return;
        }
        let key = FlowKey {
            proto: datagram.proto,
            source: datagram.source,
            destination: datagram.destination,
        };
        let known = self.flows.lookup(&key);
        if class == Class::Stun && known.is_none() && self.answer_probe(&datagram, now) {
            return;
        }
        // Issue 16, finding 3: the answer to a consent check admits its flow (consent.rs).
        if let Some(confirmed) = (class == Class::Stun)
            .then(|| self.consent.answered(datagram.contents, key, self.hmac))
            .flatten()
            .filter(|c| self.sessions.contains_key(&c.session))
        {
            let max = self.config.max_flows_per_session;
            self.flows.insert(key, confirmed.session, max);
            let request = Datagram {
                contents: &confirmed.request,
                ..datagram
            };
            return self.ingest(request, now);
        }
        let session = match (class, known) {
            (Class::Stun, _) => match self.admit_stun(&datagram, key, known) {
                Ok(session) => session,
                Err(reason) => {
                    self.count_drop(reason);
                    return;
                }
            },
            (_, Some(session)) => session,
            (_, None) => {
                self.count_drop(DropReason::UnknownSource);
                return;
            }
        };
        let destination = self.local_address(datagram.proto, datagram.destination);
        let Some(state) = self.sessions.get_mut(&session) else {
            self.count_drop(DropReason::UnknownSource);
            return;
        };
        let receive = match Receive::new(
            datagram.proto.into(),
            datagram.source,
            destination,
            datagram.contents,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(%session, "unparsable datagram: {e}");
                self.count_drop(DropReason::SessionRejected);
                return;
            }
        };
        if let Err(e) = state.rtc.handle_input(Input::Receive(now, receive)) {
            tracing::debug!(%session, "session refused datagram: {e}");
            self.count_drop(DropReason::SessionRejected);
        }
        self.drain(session, now);
    }

    pub(super) fn count_drop(&mut self, reason: DropReason) {
        *self.counters.snapshot.drops.entry(reason).or_insert(0) += 1;
    }

    /// Routes a STUN datagram: a binding request is routed by its USERNAME's ufrag and, for a
    /// flow not yet known for that session, admitted only after MESSAGE-INTEGRITY checks out
    /// against that session's password. Other STUN goes to the flow's session, if any.
    fn admit_stun(
        &mut self,
        datagram: &Datagram<'_>,
        key: FlowKey,
        known: Option<SessionId>,
    ) -> Result<SessionId, DropReason> {
        let message =
            StunMessage::parse(datagram.contents).map_err(|_| DropReason::MalformedStun)?;
        if !message.is_binding_request() {
            return known.ok_or(DropReason::StunNotBindingRequest);
        }
        let local = message
            .username()
            .and_then(|u| u.split_once(':'))
            .map(|(local, _)| local)
            .ok_or(DropReason::UnknownUfrag)?;
        let session = *self.ufrags.get(local).ok_or(DropReason::UnknownUfrag)?;
        if known == Some(session) {
            return Ok(session); // str0m checks integrity on known flows too
        }
        let state = self
            .sessions
            .get(&session)
            .ok_or(DropReason::UnknownUfrag)?;
        let hmac = self.hmac;
        let authentic = message.verify(state.local_creds.pass.as_bytes(), |key, parts| {
            hmac.sha1_hmac(key, parts)
        });
        if !authentic {
            return Err(DropReason::StunAuthFailed);
        }
        if key.proto == Proto::Udp && self.config.consent_checks {
            // Issue 16, finding 3: a new UDP address answers a check first (consent.rs).
            let local = self.local_address(Proto::Udp, key.destination);
            let (ufrag, remote) = (&state.local_creds.ufrag, state.remote_ice.as_ref());
            let (request, now) = (datagram.contents, self.last_now);
            let (hmac, worker) = (self.hmac, self.config.worker_index);
            return Err(self.consent.challenge(
                key, session, worker, ufrag, remote, request, local, hmac, now,
            ));
        }
        self.flows
            .insert(key, session, self.config.max_flows_per_session);
        Ok(session)
    }

    /// Answers a STUN binding request for the probe credential (see `Config::probe_ufrag`).
    /// Returns false if the datagram is not a probe (it then takes the normal path).
    fn answer_probe(&mut self, datagram: &Datagram<'_>, now: Instant) -> bool {
        let (Some(ufrag), Some(password)) = (&self.config.probe_ufrag, &self.config.probe_password)
        else {
            return false;
        };
        let Ok(message) = StunMessage::parse(datagram.contents) else {
            return false;
        };
        let is_probe = message.is_binding_request()
            && message
                .username()
                .and_then(|u| u.split_once(':'))
                .is_some_and(|(local, _)| local == ufrag.as_str());
        if !is_probe {
            return false;
        }
        let hmac = self.hmac;
        if !message.verify(password.as_bytes(), |k, p| hmac.sha1_hmac(k, p)) {
            self.count_drop(DropReason::StunAuthFailed);
            return true;
        }
        // Token bucket: at most `probe_replies_per_second`, bursts of the same size.
        let rate = f64::from(self.config.probe_replies_per_second);
        let elapsed = now
            .saturating_duration_since(self.probe_bucket.1)
            .as_secs_f64();
        let tokens = (self.probe_bucket.0 + elapsed * rate).min(rate);
        self.probe_bucket = (tokens, now);
        if tokens < 1.0 {
            self.count_drop(DropReason::ProbeRateLimited);
            return true;
        }
        self.probe_bucket.0 -= 1.0;
        let reply = StunMessageBuilder::new()
            .binding()
            .success()
            .xor_mapped_address(datagram.source)
            .build(message.trans_id());
        let mut buf = [0u8; 256];
        let Ok(len) = reply.to_bytes(Some(password.as_bytes()), &mut buf, |k, p| {
            hmac.sha1_hmac(k, p)
        }) else {
            return true;
        };
        if len > datagram.contents.len() {
            // Never answer with more bytes than were sent (no amplification).
            self.count_drop(DropReason::ProbeRateLimited);
            return true;
        }
        let local = self.local_address(datagram.proto, datagram.destination);
        let (conn, contents) = match datagram.proto {
            Proto::Udp => (None, buf[..len].to_vec()),
            Proto::Tcp => match self.tcp_by_addr.get(&(datagram.source, local)) {
                Some(conn) => (Some(*conn), tcp::frame(&buf[..len])),
                None => return true,
            },
        };
        self.counters.snapshot.probe_replies += 1;
        self.outputs.push_back(Output::Transmit(Transmit {
            proto: datagram.proto,
            conn,
            source: local,
            destination: datagram.source,
            contents,
        }));
        true
    }

    /// The advertised candidate address matching where a datagram arrived. Behind NAT or with
    /// a host override the socket's address differs from the candidate; str0m expects the
    /// candidate address.
    pub(super) fn local_address(&self, proto: Proto, arrived_on: SocketAddr) -> SocketAddr {
        let candidates = match proto {
            Proto::Udp => &self.udp_candidates,
            Proto::Tcp => &self.tcp_candidates,
        };
        if candidates.contains(&arrived_on) {
            return arrived_on;
        }
        candidates
            .iter()
            .find(|c| c.is_ipv4() == arrived_on.is_ipv4())
            .copied()
            .unwrap_or(arrived_on)
    }

    /// Queues one of str0m's transmits; ICE-TCP ones are framed for their connection.
    pub(super) fn transmit(&mut self, t: str0m::net::Transmit) {
        let proto = proto_of(t.proto);
        let (conn, contents) = match proto {
            Proto::Udp => (None, Vec::from(t.contents)),
            Proto::Tcp => {
                let Some(conn) = self.tcp_by_addr.get(&(t.destination, t.source)).copied() else {
                    self.counters.snapshot.tcp_unsent += 1;
                    return;
                };
                (Some(conn), tcp::frame(&t.contents))
            }
        };
        let snapshot = &mut self.counters.snapshot;
        snapshot.datagrams_out += 1;
        snapshot.datagram_bytes_out += contents.len() as u64;
        self.outputs.push_back(Output::Transmit(Transmit {
            proto,
            conn,
            source: t.source,
            destination: t.destination,
            contents,
        }));
    }
}

fn proto_of(proto: str0m::net::Protocol) -> Proto {
    match proto {
        str0m::net::Protocol::Udp => Proto::Udp,
        _ => Proto::Tcp,
    }
}
