//! One call over several workers: where each call's participants are, which worker takes the
//! next join, and the relay links between the workers a call is on (docs/relay.md,
//! docs/server.md "One call on several workers").
//!
//! A call starts on its home worker (a hash of its id). Once it has `call_spread_after`
//! participants, or its worker is degraded, each join goes to the worker with the fewest of the
//! call's participants among the least loaded ones. A worker that gets its first participant of a
//! call opens a relay link to every other worker the call is on; a worker whose last one leaves
//! closes its links. Relay frames go from worker to worker through their queues (no sockets; a
//! frame's `Bytes` is moved, not copied), media in the media lane, membership and feedback in
//! the control lane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use calls_core::{CallId, LinkId};

use crate::load_meter::WorkerStatus;
use crate::node::CallChanges;
use crate::worker::{worker_for_call, Cmd, RelayPeer};
use crate::worker_queue::{Lane, WorkerQueue};

/// Relay frame types (`calls_core::relay`) that go in the media lane, where a full lane drops
/// them: media (5), levels (6), NACKs (9) and keepalives (10) come often and losing one is
/// survived. Members, tracks, keyframe requests and layer demand go in the control lane and are
/// never refused (they are rare, and losing one would leave the other side wrong until the next).
pub fn droppable(frame_type: u8) -> bool {
    matches!(frame_type, 5 | 6 | 9 | 10)
}

/// A relay link between two workers of one call.
#[derive(Debug, Clone, Copy)]
struct Route {
    link: LinkId,
    ends: [usize; 2],
}

/// One call's participants per worker and its links.
#[derive(Debug)]
struct Placement {
    per_worker: Vec<usize>,
    routes: Vec<Route>,
}

/// Placement of calls on workers, shared by the HTTP side (joins) and the workers (leaves).
#[derive(Debug)]
pub struct Spread {
    queues: Vec<Arc<WorkerQueue<Cmd>>>,
    status: Vec<Arc<WorkerStatus>>,
    spread_after: usize,
    calls: Mutex<HashMap<CallId, Placement>>,
    next_link: AtomicU64,
    /// Told when a worker gets its first participant of a call or loses its last (the node
    /// relay announces it to the other nodes); `None` without the node relay.
    changes: Option<Arc<CallChanges>>,
}

impl Spread {
    pub fn new(
        queues: Vec<Arc<WorkerQueue<Cmd>>>,
        status: Vec<Arc<WorkerStatus>>,
        spread_after: usize,
        changes: Option<Arc<CallChanges>>,
    ) -> Self {
        Spread {
            queues,
            status,
            spread_after,
            calls: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            changes,
        }
    }

    /// The worker that takes the next join of `call`, counted there from now on (give it back
    /// with [`Spread::unplace`] if the join fails). Opens the relay links a new worker of the
    /// call needs.
    pub fn place(&self, call: &CallId) -> usize {
        let n = self.queues.len();
        let Ok(mut calls) = self.calls.lock() else {
            return worker_for_call(call.as_str(), n);
        };
        let placement = calls.entry(call.clone()).or_insert_with(|| Placement {
            per_worker: vec![0; n],
            routes: Vec::new(),
        });
        let total: usize = placement.per_worker.iter().sum();
        let home = worker_for_call(call.as_str(), n);
        let worker = if n <= 1 || self.spread_after == 0 {
            home
        } else {
            // While small, a call stays on the worker that has most of it, unless that one is
            // struggling.
            let current = if total == 0 {
                home
            } else {
                (0..n)
                    .max_by_key(|&w| (placement.per_worker[w], w == home))
                    .unwrap_or(home)
            };
            if total < self.spread_after && self.level(current) == 0 {
                current
            } else {
                (0..n)
                    .min_by_key(|&w| {
                        let sessions = self.status[w].sessions.load(Ordering::Relaxed);
                        (self.level(w), placement.per_worker[w], sessions)
                    })
                    .unwrap_or(home)
            }
        };
        placement.per_worker[worker] += 1;
        if placement.per_worker[worker] == 1 {
            if let Some(changes) = &self.changes {
                changes.changed(call);
            }
            let others: Vec<usize> = (0..n)
                .filter(|&w| w != worker && placement.per_worker[w] > 0)
                .collect();
            for other in others {
                let link = LinkId(self.next_link.fetch_add(1, Ordering::Relaxed));
                placement.routes.push(Route {
                    link,
                    ends: [worker, other],
                });
                tracing::info!(%call, %link, worker, other, "call spans another worker: relay link opened");
                // The new worker first: the other one announces its side as soon as it opens,
                // and the new one must know the link by then (a worker's control lane is
                // FIFO, so its open comes before any frame for it). The new worker has nothing
                // to announce yet: its first participant joins after this.
                for (end, peer) in [(worker, other), (other, worker)] {
                    self.queues[end].push_release(Cmd::RelayOpen {
                        call: call.clone(),
                        link,
                        peer: RelayPeer::Worker(peer),
                    });
                }
            }
        }
        worker
    }

    /// A participant of `call` on `worker` is gone (left, or its join failed). The worker's last
    /// one closes its relay links, at both ends.
    pub fn unplace(&self, call: &CallId, worker: usize) {
        let Ok(mut calls) = self.calls.lock() else {
            return;
        };
        let Some(placement) = calls.get_mut(call) else {
            return;
        };
        let Some(count) = placement.per_worker.get_mut(worker) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            if let Some(changes) = &self.changes {
                changes.changed(call);
            }
            let (closed, kept): (Vec<Route>, Vec<Route>) = placement
                .routes
                .iter()
                .partition(|r| r.ends.contains(&worker));
            placement.routes = kept;
            for route in closed {
                tracing::info!(%call, link = %route.link, "relay link closed");
                for end in route.ends {
                    self.queues[end].push_release(Cmd::RelayClose { link: route.link });
                }
            }
        }
        if placement.per_worker.iter().all(|c| *c == 0) {
            calls.remove(call);
        }
    }

    /// The workers `call` is on now.
    pub fn workers_of(&self, call: &CallId) -> Vec<usize> {
        let Ok(calls) = self.calls.lock() else {
            return Vec::new();
        };
        calls.get(call).map_or_else(Vec::new, |p| {
            (0..p.per_worker.len())
                .filter(|&w| p.per_worker[w] > 0)
                .collect()
        })
    }

    /// Hands a relay frame to the worker at the other end of its link. A full media lane drops
    /// a [`droppable`] frame (the relay repairs or conceals the loss); the others are never
    /// refused. Returns whether it was queued.
    pub fn forward(&self, peer: usize, link: LinkId, bytes: bytes::Bytes) -> bool {
        let Some(queue) = self.queues.get(peer) else {
            return false;
        };
        let media = bytes.get(2).copied().is_some_and(droppable);
        let cmd = Cmd::Relay { link, bytes };
        if media {
            queue.push(Lane::Media, cmd).is_ok()
        } else {
            queue.push_release(cmd);
            true
        }
    }

    fn level(&self, worker: usize) -> u8 {
        self.status[worker].level.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spread(workers: usize, after: usize) -> Spread {
        Spread::new(
            (0..workers)
                .map(|_| Arc::new(WorkerQueue::new(64, 64)))
                .collect(),
            (0..workers)
                .map(|_| Arc::new(WorkerStatus::new()))
                .collect(),
            after,
            None,
        )
    }

    /// The relay commands waiting in `worker`'s queue: (opened, closed) link ids.
    fn relay_commands(s: &Spread, worker: usize) -> (Vec<LinkId>, Vec<LinkId>) {
        let (mut opened, mut closed) = (Vec::new(), Vec::new());
        while let Some(q) = s.queues[worker].pop(Duration::ZERO) {
            match q.item {
                Cmd::RelayOpen { link, .. } => opened.push(link),
                Cmd::RelayClose { link } => closed.push(link),
                _ => {}
            }
        }
        (opened, closed)
    }

    #[test]
    fn a_small_call_stays_on_its_home_worker() {
        let s = spread(4, 3);
        let call = CallId::from("standup");
        let home = worker_for_call("standup", 4);
        for _ in 0..3 {
            assert_eq!(s.place(&call), home);
        }
        assert_eq!(s.workers_of(&call), vec![home]);
        assert!((0..4).all(|w| relay_commands(&s, w) == (vec![], vec![])));
    }

    #[test]
    fn a_big_call_spreads_links_its_workers_once_and_unlinks_when_one_empties() {
        let s = spread(2, 2);
        let call = CallId::from("all-hands");
        let home = worker_for_call("all-hands", 2);
        let other = 1 - home;
        assert_eq!((s.place(&call), s.place(&call)), (home, home));
        // The third join finds the call at its size: the other worker, linked to home.
        assert_eq!(s.place(&call), other);
        let (opened_home, _) = relay_commands(&s, home);
        let (opened_other, _) = relay_commands(&s, other);
        assert_eq!(opened_home.len(), 1);
        assert_eq!(opened_home, opened_other, "one link, known at both ends");
        // Joins alternate to balance the call; no second link between the same workers.
        assert_eq!(s.place(&call), other);
        assert_eq!(s.place(&call), home);
        assert_eq!(relay_commands(&s, home), (vec![], vec![]));
        // The other worker's last participant leaves: the link closes at both ends.
        s.unplace(&call, other);
        assert_eq!(relay_commands(&s, other), (vec![], vec![]));
        s.unplace(&call, other);
        assert_eq!(relay_commands(&s, home).1, opened_home);
        assert_eq!(relay_commands(&s, other).1, opened_home);
        assert_eq!(s.workers_of(&call), vec![home]);
    }

    #[test]
    fn a_degraded_worker_sends_even_a_small_call_elsewhere() {
        let s = spread(2, 100);
        let call = CallId::from("c");
        let home = worker_for_call("c", 2);
        assert_eq!(s.place(&call), home);
        s.status[home].level.store(1, Ordering::Relaxed);
        assert_eq!(s.place(&call), 1 - home);
    }

    #[test]
    fn zero_never_spreads() {
        let s = spread(2, 0);
        let call = CallId::from("c");
        let home = worker_for_call("c", 2);
        s.status[home].level.store(2, Ordering::Relaxed);
        assert!((0..10).all(|_| s.place(&call) == home));
    }
}
