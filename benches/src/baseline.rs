//! The baseline: forwarding the way str0m's `examples/chat.rs` does it. One `Rtc` per peer in
//! sample (frame) mode, one shared port, and per incoming datagram: a linear `accepts()` scan
//! over every peer, `MediaData` written to every other peer's writer, then `Input::Timeout` to
//! every peer and every peer polled until its timeout.
//!
//! Simulcast ([`BaselineCall::simulcast`]) the way chat.rs does it too: the publisher sends
//! every layer, and each peer is written only the media of one rid (chat.rs hard-codes `h` for
//! everyone; here each listener has its own fixed rid, so the layer mix matches ours).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use calls_core::sim::simulcast_layers;
use calls_core::str0m::format::Codec;
use calls_core::str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use calls_core::str0m::net::{Protocol, Receive};
use calls_core::str0m::{Candidate, Event, Input, Output, Rtc};
use calls_core::TrackSource;

use crate::{is_rtp_media, Media, ServerClock, STEP};

/// A server-side peer: its `Rtc`, per publisher index the mid it receives that publisher on,
/// and the one simulcast layer it is written (chat.rs's `chosen_rid`).
#[derive(Debug)]
struct ServerPeer {
    rtc: Rtc,
    tracks_out: Vec<(usize, Mid)>,
    chosen_rid: Option<Rid>,
}

/// A client: a publisher or a listener.
#[derive(Debug)]
struct Client {
    rtc: Rtc,
    addr: SocketAddr,
    /// The mid it publishes on (publishers only).
    send_mid: Option<Mid>,
    clock: Instant,
    frames: u64,
    connected: bool,
}

impl Client {
    /// Drains the client; returns its datagrams.
    fn poll(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(o) = self.rtc.poll_output() {
            match o {
                Output::Transmit(t) => out.push((self.addr, t.contents.to_vec())),
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(_) => {}
                Output::Timeout(_) => break,
            }
        }
        out
    }
}

/// A chat-style call with `publishers` senders of `media` and `subscribers` listeners.
#[derive(Debug)]
pub struct BaselineCall {
    media: Media,
    server: Vec<ServerPeer>,
    clients: Vec<Client>,
    publishers: usize,
    /// Simulcast layers each publisher sends (rid and frame size in bytes), low to high; empty
    /// without simulcast.
    layers: Vec<(Rid, usize)>,
    server_addr: SocketAddr,
    clock: ServerClock,
    now: Instant,
    /// Publisher send time of each generated media datagram not yet routed.
    sent_at: VecDeque<Instant>,
    next_publisher: usize,
    /// Server datagrams for clients (non-media), delivered in `maintain`.
    to_clients: Vec<(SocketAddr, Vec<u8>)>,
    /// RTP packets the server sent to subscribers.
    pub forwarded: u64,
    /// Media datagrams routed.
    pub routed: u64,
}

impl BaselineCall {
    /// Builds the call: every client connected, every listener receiving every publisher.
    pub fn new(media: Media, publishers: usize, subscribers: usize) -> BaselineCall {
        BaselineCall::build(media, publishers, &vec![None; subscribers])
    }

    /// One publisher sends simulcast video as three rids `q`, `h`, `f` (30 fps, each frame
    /// the size that gives the layer's bit rate in `calls_core::sim::simulcast_layers`);
    /// listener `i` is written rid `layers[i]` (0 = `q`). The server clock follows media time
    /// ([`ServerClock::Media`]), as in our simulcast bench.
    pub fn simulcast(layers: &[u8]) -> BaselineCall {
        let specs = simulcast_layers(TrackSource::Camera);
        let chosen: Vec<Option<Rid>> = layers
            .iter()
            .map(|&l| Some(Rid::from(specs[usize::from(l)].rid)))
            .collect();
        BaselineCall::build(Media::Video, 1, &chosen).with_clock(ServerClock::Media)
    }

    /// Sets how the server clock advances while routing (default [`ServerClock::Step`]).
    pub fn with_clock(mut self, clock: ServerClock) -> Self {
        self.clock = clock;
        self
    }

    fn build(media: Media, publishers: usize, chosen: &[Option<Rid>]) -> BaselineCall {
        let subscribers = chosen.len();
        let simulcast = chosen.iter().any(Option::is_some);
        let layers: Vec<(Rid, usize)> = if simulcast {
            simulcast_layers(TrackSource::Camera)
                .iter()
                .map(|l| (Rid::from(l.rid), (l.bitrate_bps / 8 / 30) as usize))
                .collect()
        } else {
            Vec::new()
        };
        #[allow(clippy::disallowed_methods)] // the virtual epoch
        let start = Instant::now();
        let server_addr = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 8443));
        let kind = match media {
            Media::Audio => MediaKind::Audio,
            Media::Video => MediaKind::Video,
        };
        let mut call = BaselineCall {
            media,
            server: Vec::new(),
            clients: Vec::new(),
            publishers,
            layers,
            server_addr,
            clock: ServerClock::Step,
            now: start,
            sent_at: VecDeque::new(),
            next_publisher: 0,
            to_clients: Vec::new(),
            forwarded: 0,
            routed: 0,
        };
        let total = publishers + subscribers;
        for i in 0..total {
            let addr = SocketAddr::from((Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8), 5000));
            let mut client = Rtc::builder()
                .clear_codecs()
                .enable_opus(true, false)
                .enable_vp8(true)
                .build(start);
            client.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
            let mut server = Rtc::builder()
                .set_ice_lite(true)
                .clear_codecs()
                .enable_opus(true, false)
                .enable_vp8(true)
                .build(start);
            server.add_local_candidate(Candidate::host(server_addr, "udp").expect("candidate"));
            let mut api = client.sdp_api();
            let send_layers = simulcast.then(|| {
                let mut s = Simulcast::new();
                for (rid, _) in &call.layers {
                    s.add_send_layer(SimulcastLayer::new(rid));
                }
                s
            });
            let send_mid = (i < publishers)
                .then(|| api.add_media(kind, Direction::SendOnly, None, None, send_layers));
            // A receive line per other publisher (chat.rs adds them by renegotiation).
            let recv: Vec<(usize, Mid)> = (0..publishers)
                .filter(|p| *p != i)
                .map(|p| {
                    (
                        p,
                        api.add_media(kind, Direction::RecvOnly, None, None, None),
                    )
                })
                .collect();
            let (offer, pending) = api.apply().expect("an offer");
            let answer = server.sdp_api().accept_offer(offer).expect("answer");
            client
                .sdp_api()
                .accept_answer(pending, answer)
                .expect("accept answer");
            call.server.push(ServerPeer {
                rtc: server,
                tracks_out: recv,
                chosen_rid: i.checked_sub(publishers).and_then(|sub| chosen[sub]),
            });
            call.clients.push(Client {
                rtc: client,
                addr,
                send_mid,
                clock: start,
                frames: 0,
                connected: false,
            });
        }
        call.connect();
        call
    }

    /// Participants in the call.
    pub fn participants(&self) -> usize {
        self.clients.len()
    }

    /// Runs everyone (untimed) until every client and server peer is connected.
    fn connect(&mut self) {
        for _ in 0..2000 {
            self.now += Duration::from_millis(5);
            let now = self.now;
            let mut to_server = Vec::new();
            for c in &mut self.clients {
                c.clock = now;
                c.rtc.handle_input(Input::Timeout(now)).expect("timeout");
                to_server.extend(c.poll());
            }
            for (source, contents) in to_server {
                self.server_input(source, &contents);
            }
            self.server_tick();
            self.maintain_all(now);
            if self.clients.iter().all(|c| c.connected) {
                return;
            }
        }
        panic!("baseline call did not connect");
    }

    /// chat.rs: find the peer that accepts the datagram by scanning all of them.
    fn server_input(&mut self, source: SocketAddr, contents: &[u8]) {
        let Ok(receive) = Receive::new(Protocol::Udp, source, self.server_addr, contents) else {
            return;
        };
        let input = Input::Receive(self.now, receive);
        if let Some(peer) = self.server.iter_mut().find(|p| p.rtc.accepts(&input)) {
            let _ = peer.rtc.handle_input(input);
        }
    }

    /// chat.rs: poll every peer, propagate media to every other peer's writer, then give every
    /// peer a timeout and poll again.
    fn server_tick(&mut self) {
        let now = self.now;
        for round in 0..2 {
            let mut media = Vec::new();
            for (index, peer) in self.server.iter_mut().enumerate() {
                while let Ok(out) = peer.rtc.poll_output() {
                    match out {
                        Output::Transmit(t) => {
                            if is_rtp_media(&t.contents) {
                                self.forwarded += 1;
                            } else {
                                self.to_clients.push((t.destination, t.contents.to_vec()));
                            }
                        }
                        Output::Event(Event::MediaData(data)) => media.push((index, data)),
                        Output::Event(_) => {}
                        Output::Timeout(_) => break,
                    }
                }
            }
            for (from, data) in media {
                for peer in &mut self.server {
                    // chat.rs's simulcast "selection strategy": one rid per peer.
                    if data.rid.is_some() && data.rid != peer.chosen_rid {
                        continue;
                    }
                    let Some(mid) = peer
                        .tracks_out
                        .iter()
                        .find(|(p, _)| *p == from)
                        .map(|(_, m)| *m)
                    else {
                        continue;
                    };
                    let Some(writer) = peer.rtc.writer(mid) else {
                        continue;
                    };
                    let Some(pt) = writer.match_params(data.params) else {
                        continue;
                    };
                    let _ = writer.write(pt, data.network_time, data.time, data.data.clone());
                }
            }
            if round == 0 {
                for peer in &mut self.server {
                    let _ = peer.rtc.handle_input(Input::Timeout(now));
                }
            }
        }
    }

    /// Untimed: the next `n` media datagrams of the publishers (round robin).
    pub fn generate(&mut self, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut batch = Vec::with_capacity(n);
        let (interval, codec, size) = match self.media {
            Media::Audio => (Duration::from_millis(20), Codec::Opus, 100),
            Media::Video => (Duration::from_nanos(33_333_333), Codec::Vp8, 1000),
        };
        while batch.len() < n {
            let i = self.next_publisher;
            self.next_publisher = (i + 1) % self.publishers;
            let c = &mut self.clients[i];
            c.clock += interval;
            c.frames += 1;
            let mid = c.send_mid.expect("a publisher");
            let rtp_time = match self.media {
                Media::Audio => MediaTime::new(c.frames * 960, Frequency::FORTY_EIGHT_KHZ),
                Media::Video => MediaTime::new(c.frames * 3000, Frequency::NINETY_KHZ),
            };
            let frames: Vec<(Option<Rid>, usize)> = if self.layers.is_empty() {
                vec![(None, size)]
            } else {
                self.layers.iter().map(|(r, s)| (Some(*r), *s)).collect()
            };
            let mut other = Vec::new();
            // One write per layer, each followed by a poll (str0m refuses a second write
            // before the first is polled out).
            for (rid, size) in frames {
                let mut writer = c.rtc.writer(mid).expect("writer");
                let pt = writer
                    .payload_params()
                    .find(|p| p.spec().codec == codec)
                    .map(|p| p.pt())
                    .expect("pt");
                if let Some(rid) = rid {
                    writer = writer.rid(rid);
                }
                let mut frame = vec![0x5Au8; size];
                frame[0] = 0x10; // VP8: P bit 0, a keyframe; harmless for Opus
                writer.write(pt, c.clock, rtp_time, frame).expect("write");
                let _ = c.rtc.handle_input(Input::Timeout(c.clock));
                while let Ok(out) = c.rtc.poll_output() {
                    match out {
                        Output::Transmit(t) if is_rtp_media(&t.contents) => {
                            batch.push((c.addr, t.contents.to_vec()));
                            self.sent_at.push_back(c.clock);
                        }
                        Output::Transmit(t) => other.push((c.addr, t.contents.to_vec())),
                        Output::Event(_) => {}
                        Output::Timeout(_) => break,
                    }
                }
            }
            for (source, contents) in other {
                self.route_one(source, &contents, None);
            }
        }
        batch
    }

    /// Timed: each datagram through the chat.rs loop.
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
        self.server_input(source, contents);
        self.server_tick();
    }

    /// The server side alone (the clients dropped), for memory measurement.
    pub fn into_server(self) -> Vec<Rtc> {
        self.server.into_iter().map(|p| p.rtc).collect()
    }

    /// Untimed: server replies reach the clients; listeners run their timers.
    pub fn maintain(&mut self) {
        let now = self.now;
        self.maintain_all(now);
    }

    fn maintain_all(&mut self, now: Instant) {
        for (dest, contents) in std::mem::take(&mut self.to_clients) {
            if let Some(c) = self.clients.iter_mut().find(|c| c.addr == dest) {
                let at = c.clock.max(now);
                if let Ok(r) = Receive::new(Protocol::Udp, self.server_addr, c.addr, &contents) {
                    let _ = c.rtc.handle_input(Input::Receive(at, r));
                }
                let out = c.poll();
                for (source, contents) in out {
                    self.server_input(source, &contents);
                }
            }
        }
        self.server_tick();
    }
}
