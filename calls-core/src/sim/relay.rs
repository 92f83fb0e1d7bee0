//! [`SimRelayPair`]: two [`SimWorld`]s, each with its own router and peers, on one virtual
//! clock, whose routers are joined by one relay link (the same [`LinkId`] on both sides).
//!
//! Frames cross the link at once (zero delay), in order, unless the pair is told to lose a
//! share of them (seeded) or to cut the link (everything lost, both ways): a relay over a
//! lossy network, a worker or node that stalls.

use std::time::{Duration, Instant};

use crate::relay::LinkId;

use super::world::SimWorld;

/// Two relayed worlds. See the [module docs](self).
#[derive(Debug)]
pub struct SimRelayPair {
    /// The first router's world.
    pub a: SimWorld,
    /// The second router's world.
    pub b: SimWorld,
    /// The link's id on both routers.
    pub link: LinkId,
    /// Share of frames lost from `a` to `b` (0 … 1).
    pub loss_ab: f64,
    /// Share of frames lost from `b` to `a`.
    pub loss_ba: f64,
    /// Everything is lost, both ways.
    pub cut: bool,
    /// Frames carried `a` → `b` and `b` → `a`.
    pub carried: [u64; 2],
    /// Frames lost `a` → `b` and `b` → `a`.
    pub lost: [u64; 2],
    rng: fastrand::Rng,
}

impl SimRelayPair {
    /// Two default-configured worlds; `b`'s peers get session ids from 1001 on.
    pub fn new(seed: u64, start: Instant) -> Self {
        let a = SimWorld::new(seed, start);
        let mut b = SimWorld::new(seed.wrapping_add(1), start);
        b.set_next_session(1001);
        SimRelayPair {
            a,
            b,
            link: LinkId(1),
            loss_ab: 0.0,
            loss_ba: 0.0,
            cut: false,
            carried: [0; 2],
            lost: [0; 2],
            rng: fastrand::Rng::with_seed(seed ^ 0x5EED_0F7E),
        }
    }

    /// Opens the link for `call` on both routers.
    pub fn open(&mut self, call: &str) {
        if let Err(e) = self.a.relay_open(call, self.link) {
            panic!("relay_open on a: {e}");
        }
        if let Err(e) = self.b.relay_open(call, self.link) {
            panic!("relay_open on b: {e}");
        }
        self.exchange();
    }

    /// Runs both worlds for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let limit = self.a.now().max(self.b.now()) + duration;
        loop {
            if self.exchange() {
                continue;
            }
            let next = [self.a.next_due(), self.b.next_due()]
                .into_iter()
                .flatten()
                .min()
                .filter(|t| *t <= limit);
            let at = next.unwrap_or(limit);
            self.a.run_until_instant(at);
            self.b.run_until_instant(at);
            if next.is_none() && !self.exchange() {
                return;
            }
        }
    }

    /// Carries every pending frame across the link; returns whether there were any.
    fn exchange(&mut self) -> bool {
        let ab = self.a.take_relay_out();
        let ba = self.b.take_relay_out();
        let moved = !ab.is_empty() || !ba.is_empty();
        for (link, bytes) in ab {
            if self.cut || self.rng.f64() < self.loss_ab {
                self.lost[0] += 1;
                continue;
            }
            self.carried[0] += 1;
            self.b.handle_relay(link, &bytes);
        }
        for (link, bytes) in ba {
            if self.cut || self.rng.f64() < self.loss_ba {
                self.lost[1] += 1;
                continue;
            }
            self.carried[1] += 1;
            self.a.handle_relay(link, &bytes);
        }
        moved
    }
}
