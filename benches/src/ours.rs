//! Our router: a call set up with `calls_core::sim::SimWorld`, then driven directly (see the
//! crate docs for the generate / route / maintain split).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use calls_core::record::RecordOutput;
use calls_core::sim::{simulcast_layers, PeerOptions, SimWorld};
use calls_core::{
    CallId, Datagram, Grants, Output, Proto, RecordingOptions, Router, SessionId, TrackSource,
};

use crate::{is_rtp_media, Media, ServerClock, STEP};

/// How often (server time) subscribers get to send their STUN/RTCP.
const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

/// A call on our router with `publishers` senders of `media` and `subscribers` listeners.
#[derive(Debug)]
pub struct OursCall {
    world: SimWorld,
    publishers: Vec<(SessionId, SocketAddr, Instant)>,
    subscribers: Vec<SessionId>,
    router_addr: SocketAddr,
    clock: ServerClock,
    now: Instant,
    /// Publisher send time of each generated media datagram not yet routed.
    sent_at: VecDeque<Instant>,
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
    /// Recorded file bytes the router handed out ([`OursCall::start_recording`]); the bench
    /// drops them, as it drops what goes to subscribers.
    pub recorded_bytes: u64,
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
        OursCall::from_world(world, &pubs, subs)
    }

    /// One publisher sends three-layer simulcast camera (`q`, `h`, `f`; no audio) to viewers;
    /// viewer `i` is held on spatial layer `layers[i]` (0 = `q`) by a router bandwidth cap
    /// between that layer's bit rate and the next one's. Runs the call until every viewer has
    /// received its layer, unchanged, for a second; panics with each viewer's state if the mix
    /// is not reached. The server clock then follows media time ([`ServerClock::Media`]): the
    /// router measures each layer's bit rate in its own time, and at [`STEP`] per datagram
    /// it would see every layer a few hundred times too expensive and move everyone to the
    /// lowest temporal layer of `q`.
    pub fn simulcast(layers: &[u8]) -> OursCall {
        #[allow(clippy::disallowed_methods)] // the virtual epoch
        let start = Instant::now();
        let mut config = calls_core::Config::default();
        config.max_participants_per_call = config.max_participants_per_call.max(layers.len() + 1);
        let mut world = SimWorld::with_config(7, start, config);
        let camera = PeerOptions {
            audio: false,
            ..PeerOptions::default().with_simulcast()
        };
        let publisher = world.add_peer("bench", "pub0", camera);
        let viewer = PeerOptions {
            audio: false,
            video: false,
            grants: Grants::VIEWER,
            ..PeerOptions::default()
        };
        let subs: Vec<SessionId> = (0..layers.len())
            .map(|i| world.add_peer("bench", format!("sub{i}"), viewer.clone()))
            .collect();
        for (s, &layer) in subs.iter().zip(layers) {
            world
                .set_bandwidth_cap(*s, layer_cap(layer))
                .expect("a viewer session");
        }
        let settled = world.run_until(
            |w| {
                subs.iter()
                    .zip(layers)
                    .all(|(s, &layer)| settled_on(w, *s, publisher, layer))
            },
            Duration::from_secs(30),
        );
        assert!(
            settled,
            "simulcast bench call did not reach its layer mix {layers:?} in 30 s of sim time:{}",
            describe_layers(&world, &subs, publisher, layers)
        );
        // The top layer is reached as soon as an estimate clears its cost by the upgrade
        // margin; a little longer lets the estimates climb past it, away from the edge.
        world.run_for(Duration::from_secs(3));
        let held = subs
            .iter()
            .zip(layers)
            .all(|(s, &layer)| settled_on(&world, *s, publisher, layer));
        assert!(
            held,
            "simulcast bench call left its layer mix {layers:?}:{}",
            describe_layers(&world, &subs, publisher, layers)
        );
        OursCall::from_world(world, &[publisher], subs).with_clock(ServerClock::Media)
    }

    /// The call as the world left it: the bench takes over the router's clock from here.
    fn from_world(world: SimWorld, pubs: &[SessionId], subs: Vec<SessionId>) -> OursCall {
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
            clock: ServerClock::Step,
            now,
            sent_at: VecDeque::new(),
            deadline: now,
            next_publisher: 0,
            last_maintain: now,
            to_publishers: Vec::new(),
            forwarded: 0,
            routed: 0,
            media_out_before: 0,
            recorded_bytes: 0,
        }
        .with_baseline()
    }

    /// Audio to listeners without video sent at once (the default) or queued in str0m as
    /// before the vendored patch 0009 ([`calls_core::Router::set_direct_audio`]).
    pub fn with_direct_audio(mut self, on: bool) -> Self {
        self.world.router_mut().set_direct_audio(on);
        self
    }

    /// Sets how the server clock advances while routing (default [`ServerClock::Step`]).
    pub fn with_clock(mut self, clock: ServerClock) -> Self {
        self.clock = clock;
        self
    }

    /// Media packets the router has written to subscribers since the bench began (its own
    /// count, `metrics().media_out`: independent of pacing).
    pub fn media_forwarded(&self) -> u64 {
        self.media_out() - self.media_out_before
    }

    /// Simulated time the set-up took (the world's clock stops when the bench takes over).
    pub fn setup_sim_time(&self) -> Duration {
        self.world.elapsed()
    }

    /// Simulcast layer switches the router has made so far (`metrics().layer_switches`).
    pub fn layer_switches(&self) -> u64 {
        self.world.router().metrics().layer_switches
    }

    /// Session timer wake-ups the router has run so far (`metrics().timer_wakeups`).
    pub fn timer_wakeups(&self) -> u64 {
        self.world.router().metrics().timer_wakeups
    }

    /// Keyframe requests the router has sent to publishers so far.
    pub fn keyframe_requests(&self) -> u64 {
        self.world.router().metrics().keyframe_requests_out
    }

    /// The bandwidth the router assumes towards each subscriber (estimate or cap), bits/s.
    pub fn subscriber_budgets(&self) -> Vec<Option<u64>> {
        let stats = self.world.router().metrics().session_stats;
        self.subscribers
            .iter()
            .map(|s| {
                stats
                    .iter()
                    .find(|st| st.session == *s)
                    .and_then(|st| st.bandwidth_bps)
            })
            .collect()
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
                    self.sent_at.push_back(at);
                } else {
                    self.route_one(addr, &t.contents, None);
                }
            }
        }
        batch
    }

    /// Timed: routes datagrams as an embedder would (one input, drain until `Timeout`, run
    /// due timers), dropping what the router sends to subscribers.
    pub fn route(&mut self, batch: &[(SocketAddr, Vec<u8>)]) {
        for (source, contents) in batch {
            let sent_at = self.sent_at.pop_front();
            self.route_one(*source, contents, sent_at);
            self.routed += 1;
        }
    }

    /// One datagram; `sent_at` is a media datagram's send time (for [`ServerClock::Media`]).
    fn route_one(&mut self, source: SocketAddr, contents: &[u8], sent_at: Option<Instant>) {
        self.now += STEP;
        if let (ServerClock::Media, Some(at)) = (self.clock, sent_at) {
            self.now = self.now.max(at);
        }
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
            &mut self.recorded_bytes,
        );
    }

    /// Routes `packets` media packets as the forwarding bench does (generation and maintenance
    /// untimed, in chunks of 256) and returns the time spent in [`OursCall::route`].
    pub fn run_timed(&mut self, packets: u64) -> Duration {
        const CHUNK: u64 = 256;
        let mut total = Duration::ZERO;
        let mut left = packets;
        while left > 0 {
            let n = left.min(CHUNK);
            let batch = self.generate(n as usize);
            #[allow(clippy::disallowed_methods)] // measuring the router's CPU time
            let started = Instant::now();
            self.route(&batch);
            total += started.elapsed();
            self.maintain();
            left -= n;
        }
        total
    }

    /// Starts recording the call (every source): from now on each routed media packet also
    /// goes through the recorder, and the file bytes come out (counted in `recorded_bytes`).
    pub fn start_recording(&mut self) {
        let now = self.now;
        self.world
            .router_mut()
            .start_recording(&CallId::from("bench"), RecordingOptions::everyone(), now)
            .expect("the bench call exists and is not recorded yet");
        self.drain_router();
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
        self.maintain_timed();
    }

    /// [`OursCall::maintain`], returning the time the router spent on the subscribers'
    /// datagrams.
    fn maintain_timed(&mut self) -> Duration {
        let mut busy = Duration::ZERO;
        for (i, contents) in std::mem::take(&mut self.to_publishers) {
            let (session, _, clock) = self.publishers[i];
            let router_addr = self.router_addr;
            self.world
                .peer_mut(session)
                .handle_datagram(router_addr, &contents, clock);
        }
        if self.now.saturating_duration_since(self.last_maintain) < MAINTAIN_EVERY {
            return busy;
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
                #[allow(clippy::disallowed_methods)] // measuring the router's CPU time
                let started = Instant::now();
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
                busy += started.elapsed();
                let router_addr = self.router_addr;
                for r in replies {
                    self.world.peer_mut(s).handle_datagram(router_addr, &r, now);
                }
                let _ = self.world.peer_mut(s).take_transmits();
            }
        }
        busy
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

    /// Mutes every publisher at the router (nothing is forwarded any more) and runs the router
    /// 6 s of server time, so the subscribers' slots are parked as in a long quiet stretch.
    pub fn fall_silent(&mut self) {
        for (session, _, _) in self.publishers.clone() {
            let now = self.now;
            let muted = self.world.router_mut().set_muted(session, true, now);
            assert!(muted.is_ok(), "a publisher of the call is unknown");
            self.drain_router();
        }
        self.idle_for(Duration::from_secs(6));
    }

    /// Timed: `duration` of server time with nothing to forward, as a worker lives it: every
    /// router timer when it falls due, and the subscribers' own STUN consent and RTCP (every
    /// [`MAINTAIN_EVERY`]) fed in. Returns the router's CPU time only (the simulated clients'
    /// work is not counted).
    pub fn idle_for(&mut self, duration: Duration) -> Duration {
        let end = self.now + duration;
        let mut busy = Duration::ZERO;
        while self.now < end {
            let next = self
                .deadline
                .min(self.last_maintain + MAINTAIN_EVERY)
                .min(end);
            self.now = next.max(self.now + Duration::from_micros(100));
            #[allow(clippy::disallowed_methods)] // measuring the router's CPU time
            let started = Instant::now();
            self.world.router_mut().handle_timeout(self.now);
            self.drain_router();
            busy += started.elapsed();
            busy += self.maintain_timed();
        }
        busy
    }

    /// Takes the router out of the call and drops everything else (the client peers), so the
    /// router's own memory can be measured.
    pub fn into_router(mut self) -> Router {
        let now = self.now;
        let empty = Router::new(calls_core::Config::default(), now).expect("default config");
        std::mem::replace(self.world.router_mut(), empty)
    }
}

/// A router bandwidth cap that holds a viewer on simulcast camera layer `layer`: halfway
/// between its bit rate and the next layer's (the router upgrades only when the budget exceeds
/// a layer's cost by 15 %, so both margins are wide); none for the top layer.
fn layer_cap(layer: u8) -> Option<u64> {
    let specs = simulcast_layers(TrackSource::Camera);
    let this = specs.get(usize::from(layer))?;
    let next = specs.get(usize::from(layer) + 1)?;
    Some((u64::from(this.bitrate_bps) + u64::from(next.bitrate_bps)) / 2)
}

/// `viewer` receives `publisher`'s camera on `layer`, with no layer change for a second (the
/// shape of `settled` in `calls-core/tests/simulcast.rs`).
fn settled_on(world: &SimWorld, viewer: SessionId, publisher: SessionId, layer: u8) -> bool {
    world
        .peer(viewer)
        .received_from(publisher, TrackSource::Camera)
        .is_some_and(|t| {
            t.last_layer == Some(layer)
                && t.layer_changes.last().is_some_and(|(at, _)| {
                    world.now().saturating_duration_since(*at) >= Duration::from_secs(1)
                })
        })
}

/// Each viewer's intended and received layers, for a failed set-up.
fn describe_layers(
    world: &SimWorld,
    viewers: &[SessionId],
    publisher: SessionId,
    layers: &[u8],
) -> String {
    let budgets = world.metrics().session_stats;
    let mut out = String::new();
    for (viewer, layer) in viewers.iter().zip(layers) {
        let budget = budgets
            .iter()
            .find(|s| s.session == *viewer)
            .and_then(|s| s.bandwidth_bps);
        let _ = write!(
            out,
            "\n  {viewer}: wants layer {layer}, budget {budget:?} bit/s, "
        );
        match world
            .peer(*viewer)
            .received_from(publisher, TrackSource::Camera)
        {
            Some(t) => {
                let _ = write!(
                    out,
                    "on {:?}, frames by layer {:?}, changes {:?}",
                    t.last_layer,
                    t.frames_by_layer,
                    t.layer_changes.iter().map(|(_, l)| *l).collect::<Vec<_>>()
                );
            }
            None => out.push_str("nothing received"),
        }
    }
    out
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
    recorded_bytes: &mut u64,
) -> Instant {
    loop {
        match router.poll_output() {
            Output::Record(RecordOutput::Data { bytes, .. }) => {
                *recorded_bytes += bytes.len() as u64;
            }
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
