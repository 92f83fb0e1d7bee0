//! Our router: a call set up with `calls_core::sim::SimWorld`, then driven directly (see the
//! crate docs for the generate / route / maintain split).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use calls_core::sim::{PeerOptions, SimWorld};
use calls_core::{Datagram, Grants, Output, Proto, Router, SessionId, TrackSource};

use crate::{is_rtp_media, Media, STEP};

/// How often (server time) subscribers get to send their STUN/RTCP.
const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

/// A call on our router with `publishers` senders of `media` and `subscribers` listeners.
#[derive(Debug)]
pub struct OursCall {
    world: SimWorld,
    publishers: Vec<(SessionId, SocketAddr, Instant)>,
    subscribers: Vec<SessionId>,
    router_addr: SocketAddr,
    now: Instant,
    deadline: Instant,
    next_publisher: usize,
    last_maintain: Instant,
    /// Router datagrams for publishers, delivered in `maintain`.
    to_publishers: Vec<(usize, Vec<u8>)>,
    /// RTP packets the router sent to subscribers.
    pub forwarded: u64,
    /// Media datagrams routed.
    pub routed: u64,
    /// Media the router had written to subscribers before the bench began (setup).
    media_out_before: u64,
}

impl OursCall {
    /// Builds and settles the call (everyone receives every publisher). Panics if it does not
    /// settle.
    pub fn new(media: Media, publishers: usize, subscribers: usize) -> OursCall {
        OursCall::room(media, publishers, subscribers, false)
    }

    /// Like [`OursCall::new`], but with `muted_mics` every listener also publishes a
    /// microphone and is muted by the router (a big meeting: everyone has a mic, two talk).
    /// The call then runs 6 s more, so idle send streams are parked as in a long call.
    pub fn room(media: Media, publishers: usize, subscribers: usize, muted_mics: bool) -> OursCall {
        #[allow(clippy::disallowed_methods)] // the virtual epoch
        let start = Instant::now();
        let mut config = calls_core::Config::default();
        config.max_participants_per_call = config
            .max_participants_per_call
            .max(publishers + subscribers);
        let mut world = SimWorld::with_config(7, start, config);
        let options = match media {
            Media::Audio => PeerOptions::audio_only(),
            Media::Video => PeerOptions {
                audio: false,
                ..PeerOptions::default()
            },
        };
        let pubs: Vec<SessionId> = (0..publishers)
            .map(|i| world.add_peer("bench", format!("pub{i}"), options.clone()))
            .collect();
        let listener = if muted_mics {
            PeerOptions::audio_only()
        } else {
            PeerOptions {
                audio: false,
                video: false,
                grants: Grants::VIEWER,
                ..PeerOptions::default()
            }
        };
        let subs: Vec<SessionId> = (0..subscribers)
            .map(|i| world.add_peer("bench", format!("sub{i}"), listener.clone()))
            .collect();
        let source = match media {
            Media::Audio => TrackSource::Microphone,
            Media::Video => TrackSource::Camera,
        };
        let settled = world.run_until(
            |w| {
                subs.iter().all(|s| {
                    pubs.iter().all(|p| {
                        w.peer(*s)
                            .received_from(*p, source)
                            .is_some_and(|t| t.packets > 0)
                    })
                })
            },
            Duration::from_secs(30),
        );
        assert!(settled, "bench call did not settle");
        if muted_mics {
            for s in &subs {
                world.set_muted(*s, true);
            }
            world.run_for(Duration::from_secs(6));
        }
        let now = world.now();
        let router_addr = world.router_addr();
        let publishers = pubs
            .iter()
            .map(|p| (*p, world.peer(*p).addr(), now))
            .collect();
        OursCall {
            world,
            publishers,
            subscribers: subs,
            router_addr,
            now,
            deadline: now,
            next_publisher: 0,
            last_maintain: now,
            to_publishers: Vec::new(),
            forwarded: 0,
            routed: 0,
            media_out_before: 0,
        }
        .with_baseline()
    }

    fn media_out(&self) -> u64 {
        let out = self.world.router().metrics().media_out;
        out.audio_packets + out.video_packets
    }

    fn with_baseline(mut self) -> Self {
        self.media_out_before = self.media_out();
        self
    }

    /// Participants in the call.
    pub fn participants(&self) -> usize {
        self.publishers.len() + self.subscribers.len()
    }

    /// Untimed: the next `n` media datagrams of the publishers (round robin), freshly
    /// encrypted. Their other datagrams (STUN, RTCP) go to the router right away.
    pub fn generate(&mut self, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            let i = self.next_publisher;
            self.next_publisher = (i + 1) % self.publishers.len();
            let (session, addr, clock) = self.publishers[i];
            let peer = self.world.peer_mut(session);
            let at = peer.poll_timeout().unwrap_or(clock).max(clock);
            peer.handle_timeout(at);
            self.publishers[i].2 = at;
            for t in self.world.peer_mut(session).take_transmits() {
                if is_rtp_media(&t.contents) {
                    batch.push((addr, t.contents));
                } else {
                    self.route_one(addr, &t.contents);
                }
            }
        }
        batch
    }

    /// Timed: routes datagrams as an embedder would (one input, drain until `Timeout`, run
    /// due timers), dropping what the router sends to subscribers.
    pub fn route(&mut self, batch: &[(SocketAddr, Vec<u8>)]) {
        for (source, contents) in batch {
            self.route_one(*source, contents);
            self.routed += 1;
        }
    }

    fn route_one(&mut self, source: SocketAddr, contents: &[u8]) {
        self.now += STEP;
        if self.deadline <= self.now {
            self.world.router_mut().handle_timeout(self.now);
            self.drain_router();
        }
        self.world.router_mut().handle_datagram(
            Datagram {
                proto: Proto::Udp,
                source,
                destination: self.router_addr,
                contents,
            },
            self.now,
        );
        self.drain_router();
    }

    /// Drains the router's outputs and remembers its next deadline.
    fn drain_router(&mut self) {
        self.deadline = drain(
            self.world.router_mut(),
            &self.publishers,
            &mut self.to_publishers,
            &mut self.forwarded,
        );
    }

    /// Untimed: lets the router's pacer send what it still holds (str0m paces video at the
    /// bandwidth estimate, and the bench feeds packets far faster than any camera, so up to
    /// the pacer's 2 s queue limit may be waiting),
    /// then takes `forwarded` from the router's own count of media written to subscribers
    /// (the transmits also carry the estimator's padding and probes, which are not media).
    pub fn flush(&mut self) {
        for _ in 0..300 {
            self.now += Duration::from_millis(10);
            self.world.router_mut().handle_timeout(self.now);
            self.drain_router();
        }
        self.forwarded = self.media_out() - self.media_out_before;
    }

    /// Untimed: replies reach the publishers; subscribers run their timers (ICE consent,
    /// RTCP) every [`MAINTAIN_EVERY`] of server time.
    pub fn maintain(&mut self) {
        for (i, contents) in std::mem::take(&mut self.to_publishers) {
            let (session, _, clock) = self.publishers[i];
            let router_addr = self.router_addr;
            self.world
                .peer_mut(session)
                .handle_datagram(router_addr, &contents, clock);
        }
        if self.now.saturating_duration_since(self.last_maintain) < MAINTAIN_EVERY {
            return;
        }
        self.last_maintain = self.now;
        let now = self.now;
        for s in self.subscribers.clone() {
            let peer = self.world.peer_mut(s);
            let addr = peer.addr();
            let mut rounds = 0;
            while peer.poll_timeout().is_some_and(|t| t <= now) && rounds < 100 {
                peer.handle_timeout(now);
                rounds += 1;
            }
            let out = peer.take_transmits();
            for t in out {
                let router = self.world.router_mut();
                router.handle_datagram(
                    Datagram {
                        proto: Proto::Udp,
                        source: addr,
                        destination: self.router_addr,
                        contents: &t.contents,
                    },
                    now,
                );
                let mut replies = Vec::new();
                while let Some(c) = next_transmit(router) {
                    if c.1 == addr && !is_rtp_media(&c.0) {
                        replies.push(c.0);
                    }
                }
                let router_addr = self.router_addr;
                for r in replies {
                    self.world.peer_mut(s).handle_datagram(router_addr, &r, now);
                }
                let _ = self.world.peer_mut(s).take_transmits();
            }
        }
    }

    /// Untimed, before any bench traffic: lets the call run in the simulated world at real
    /// packet rates (publishers send one audio packet per 20 ms, 30 video frames per second)
    /// for `duration` of virtual time. Memory is measured after this, not after the bench: str0m
    /// keeps some per-stream history for a fixed time (e.g. one second of sent bytes per stream
    /// for its resend ratio), which the bench's accelerated clock would fill with 100× more
    /// packets than a real call ever holds.
    pub fn run_realtime(&mut self, duration: Duration) {
        assert_eq!(
            self.routed, 0,
            "run_realtime is for a call the bench has not driven"
        );
        self.world.run_for(duration);
    }

    /// Takes the router out of the call and drops everything else (the client peers), so the
    /// router's own memory can be measured.
    pub fn into_router(mut self) -> Router {
        let now = self.now;
        let empty = Router::new(calls_core::Config::default(), now).expect("default config");
        std::mem::replace(self.world.router_mut(), empty)
    }
}

/// Next transmit of the router, skipping events and signals; `None` at the timeout.
fn next_transmit(router: &mut Router) -> Option<(Vec<u8>, SocketAddr)> {
    loop {
        match router.poll_output() {
            Output::Transmit(t) => return Some((t.contents, t.destination)),
            Output::Timeout(_) => return None,
            _ => {}
        }
    }
}

fn drain(
    router: &mut Router,
    publishers: &[(SessionId, SocketAddr, Instant)],
    to_publishers: &mut Vec<(usize, Vec<u8>)>,
    forwarded: &mut u64,
) -> Instant {
    loop {
        match router.poll_output() {
            Output::Transmit(t) => {
                if let Some(i) = publishers.iter().position(|p| p.1 == t.destination) {
                    to_publishers.push((i, t.contents));
                } else if is_rtp_media(&t.contents) {
                    *forwarded += 1;
                }
            }
            Output::Timeout(at) => return at,
            _ => {}
        }
    }
}
