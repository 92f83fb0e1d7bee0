//! An in-memory datagram network on virtual time: loss, delay, jitter and bandwidth caps, all
//! drawn from one seeded RNG so a run is reproducible bit for bit.
//!
//! Random draws are made per link: the n-th datagram from `a` to `b` always meets the same fate
//! for a given seed, however traffic on other links interleaves with it. (Router and str0m
//! internals — random SSRCs, ICE credentials, hash-map order — may change the interleaving
//! between runs; per-link draws keep the network's behaviour independent of it.)
//!
//! Impairments apply per direction. The most specific rule wins: a rule for the exact
//! `(from, to)` link, then a rule for the sending address ("uplink"), then a rule for the
//! receiving address ("downlink"), then the network-wide default.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How one direction of a link treats datagrams. The default is a perfect wire: nothing lost,
/// no delay, no cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability (0.0–1.0) that a datagram is lost.
    pub loss: f64,
    /// One-way delay every datagram takes.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Whether jitter may reorder datagrams. When `false`, a datagram is never delivered before
    /// one sent earlier on the same link (jitter only bunches them up).
    pub reorder: bool,
    /// Link capacity in bit/s; `None` is unlimited. Datagrams queue behind each other.
    pub bandwidth_bps: Option<u64>,
    /// Bytes that may wait in the link's queue before new datagrams are dropped (drop-tail).
    /// Only meaningful with a bandwidth cap.
    pub queue_bytes: usize,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            bandwidth_bps: None,
            queue_bytes: 64 * 1024,
        }
    }
}

impl Impairment {
    /// A perfect wire with a fixed one-way delay.
    pub fn delay(delay: Duration) -> Self {
        Impairment {
            delay,
            ..Impairment::default()
        }
    }

    /// Sets the loss probability.
    pub fn with_loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// Sets the jitter (uniform extra delay `0..=jitter`).
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Lets jitter reorder datagrams.
    pub fn with_reorder(mut self, reorder: bool) -> Self {
        self.reorder = reorder;
        self
    }

    /// Caps the link at `bps` bit/s with a drop-tail queue of `queue_bytes`.
    pub fn with_bandwidth(mut self, bps: u64, queue_bytes: usize) -> Self {
        self.bandwidth_bps = Some(bps);
        self.queue_bytes = queue_bytes;
        self
    }
}

/// Counters of everything the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to [`SimNet::send`].
    pub sent: u64,
    /// Bytes handed to [`SimNet::send`].
    pub sent_bytes: u64,
    /// Datagrams lost at random.
    pub dropped_loss: u64,
    /// Datagrams dropped because the link's queue was full.
    pub dropped_queue: u64,
    /// Datagrams handed out by [`SimNet::pop_due`].
    pub delivered: u64,
    /// Bytes handed out by [`SimNet::pop_due`].
    pub delivered_bytes: u64,
}

/// A datagram on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Where it was sent from.
    pub from: SocketAddr,
    /// Where it goes.
    pub to: SocketAddr,
    /// Its bytes.
    pub contents: Vec<u8>,
    /// When it arrives.
    pub deliver_at: Instant,
}

/// A stable hash of a link (FNV-1a over both addresses), independent of process and platform.
fn link_hash(from: SocketAddr, to: SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for addr in [from, to] {
        match addr.ip() {
            std::net::IpAddr::V4(ip) => eat(&ip.octets()),
            std::net::IpAddr::V6(ip) => eat(&ip.octets()),
        }
        eat(&addr.port().to_be_bytes());
    }
    h
}

#[derive(Debug, PartialEq, Eq)]
struct InFlight {
    deliver_at: Instant,
    order: u64,
    from: SocketAddr,
    to: SocketAddr,
    contents: Vec<u8>,
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deliver_at, self.order).cmp(&(other.deliver_at, other.order))
    }
}

/// Per-direction state: when the serializer is free again, and the last delivery time (for
/// in-order delivery when reordering is off).
#[derive(Debug, Clone, Copy)]
struct LinkState {
    busy_until: Instant,
    last_delivery: Instant,
    /// Datagrams sent on this link so far (selects the random draw).
    count: u64,
}

/// The simulated network. Send datagrams in, pop them out when their time has come.
///
/// ```
/// # use std::time::{Duration, Instant};
/// # use calls_core::sim::{Impairment, SimNet};
/// # fn example(start: Instant) {
/// let mut net = SimNet::new(7, start);
/// net.set_default(Impairment::delay(Duration::from_millis(10)));
/// let (a, b) = ("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
/// net.send(a, b, vec![1, 2, 3], start);
/// assert_eq!(net.next_delivery_time(), Some(start + Duration::from_millis(10)));
/// assert!(net.pop_due(start).is_none());
/// let d = net.pop_due(start + Duration::from_millis(10)).unwrap();
/// assert_eq!(d.contents, vec![1, 2, 3]);
/// # }
/// ```
#[derive(Debug)]
pub struct SimNet {
    seed: u64,
    default: Impairment,
    links: BTreeMap<(SocketAddr, SocketAddr), Impairment>,
    uplinks: BTreeMap<SocketAddr, Impairment>,
    downlinks: BTreeMap<SocketAddr, Impairment>,
    state: BTreeMap<(SocketAddr, SocketAddr), LinkState>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    start: Instant,
    stats: NetStats,
}

impl SimNet {
    /// A perfect network; `seed` fixes every random choice, `start` is the virtual epoch.
    pub fn new(seed: u64, start: Instant) -> Self {
        SimNet {
            seed,
            default: Impairment::default(),
            links: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            downlinks: BTreeMap::new(),
            state: BTreeMap::new(),
            in_flight: BinaryHeap::new(),
            order: 0,
            start,
            stats: NetStats::default(),
        }
    }

    /// Sets the impairment of every direction that has no more specific rule.
    pub fn set_default(&mut self, impairment: Impairment) {
        self.default = impairment;
    }

    /// Sets the impairment of datagrams from `from` to `to` (one direction).
    pub fn set_link(&mut self, from: SocketAddr, to: SocketAddr, impairment: Impairment) {
        self.links.insert((from, to), impairment);
    }

    /// Sets the impairment of everything `addr` sends (its uplink).
    pub fn set_uplink(&mut self, addr: SocketAddr, impairment: Impairment) {
        self.uplinks.insert(addr, impairment);
    }

    /// Sets the impairment of everything sent to `addr` (its downlink).
    pub fn set_downlink(&mut self, addr: SocketAddr, impairment: Impairment) {
        self.downlinks.insert(addr, impairment);
    }

    /// Removes every per-link and per-address rule (the default stays).
    pub fn clear_overrides(&mut self) {
        self.links.clear();
        self.uplinks.clear();
        self.downlinks.clear();
    }

    /// The impairment that applies to datagrams from `from` to `to`.
    pub fn impairment(&self, from: SocketAddr, to: SocketAddr) -> Impairment {
        self.links
            .get(&(from, to))
            .or_else(|| self.uplinks.get(&from))
            .or_else(|| self.downlinks.get(&to))
            .copied()
            .unwrap_or(self.default)
    }

    /// Puts a datagram on the wire at `now`. It may be lost, queued or dropped by a full queue.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, contents: Vec<u8>, now: Instant) {
        let imp = self.impairment(from, to);
        self.stats.sent += 1;
        self.stats.sent_bytes += contents.len() as u64;

        let link = self.state.entry((from, to)).or_insert(LinkState {
            busy_until: self.start,
            last_delivery: self.start,
            count: 0,
        });
        link.count += 1;
        let mut rng = fastrand::Rng::with_seed(
            self.seed ^ link_hash(from, to) ^ link.count.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let lost = rng.f64() < imp.loss;
        let jitter_draw = rng.f64();
        if lost {
            self.stats.dropped_loss += 1;
            return;
        }

        let on_wire = match imp.bandwidth_bps {
            Some(bps) if bps > 0 => {
                let queued_for = link.busy_until.saturating_duration_since(now);
                let queued_bytes = (queued_for.as_secs_f64() * bps as f64 / 8.0) as usize;
                if queued_bytes + contents.len() > imp.queue_bytes {
                    self.stats.dropped_queue += 1;
                    return;
                }
                let serialize = Duration::from_secs_f64(contents.len() as f64 * 8.0 / bps as f64);
                let begin = link.busy_until.max(now);
                link.busy_until = begin + serialize;
                link.busy_until
            }
            _ => now,
        };

        let jitter = imp.jitter.mul_f64(jitter_draw);
        let mut deliver_at = on_wire + imp.delay + jitter;
        if !imp.reorder {
            deliver_at = deliver_at.max(link.last_delivery);
        }
        link.last_delivery = link.last_delivery.max(deliver_at);

        self.order += 1;
        self.in_flight.push(Reverse(InFlight {
            deliver_at,
            order: self.order,
            from,
            to,
            contents,
        }));
    }

    /// When the next datagram arrives, if any is in flight.
    pub fn next_delivery_time(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse(p)| p.deliver_at)
    }

    /// The next datagram whose time has come (`deliver_at <= now`), in arrival order.
    pub fn pop_due(&mut self, now: Instant) -> Option<Delivery> {
        if self.next_delivery_time()? > now {
            return None;
        }
        let Reverse(p) = self.in_flight.pop()?;
        self.stats.delivered += 1;
        self.stats.delivered_bytes += p.contents.len() as u64;
        Some(Delivery {
            from: p.from,
            to: p.to,
            contents: p.contents,
            deliver_at: p.deliver_at,
        })
    }

    /// Datagrams still on the wire.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// What the network did so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }
}
