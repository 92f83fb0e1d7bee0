//! The bounded queue from the I/O threads to one router worker, in two lanes (issue 15).
//!
//! - **control**: signaling, joins, leaves, ICE-TCP bytes, and the datagrams that keep sessions
//!   alive: STUN (ICE consent), DTLS, RTCP (`calls_core::demux::is_rtp_media` is false);
//! - **media**: RTP datagrams.
//!
//! The worker always takes control first, so under load the consent checks, handshakes and
//! feedback of the sessions it carries never wait behind a backlog of media. Each lane has a
//! bound; a push to a full lane is refused and counted (the media lane's refusals are the
//! newest datagrams: tail drop, the cheapest place to shed). Commands that free resources
//! (a leave, a closed TCP connection) are never refused: there are at most as many of them as
//! open sessions and connections, which have their own limits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which lane an item travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Served first.
    Control,
    /// Served when no control item waits.
    Media,
}

/// An item with the time it was queued (the worker's input lateness is measured from it).
#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    pub queued_at: Instant,
    pub lane: Lane,
}

#[derive(Debug)]
struct Lanes<T> {
    control: VecDeque<Queued<T>>,
    media: VecDeque<Queued<T>>,
}

/// Items refused because their lane was full, per lane (for `/metrics`).
#[derive(Debug, Default)]
pub struct QueueDrops {
    pub control: AtomicU64,
    pub media: AtomicU64,
}

/// A two-lane bounded queue with one consumer (see the [module docs](self)).
#[derive(Debug)]
pub struct WorkerQueue<T> {
    lanes: Mutex<Lanes<T>>,
    ready: Condvar,
    control_cap: usize,
    media_cap: usize,
    pub drops: QueueDrops,
}

impl<T> WorkerQueue<T> {
    pub fn new(control_cap: usize, media_cap: usize) -> Self {
        WorkerQueue {
            lanes: Mutex::new(Lanes {
                control: VecDeque::with_capacity(control_cap.min(1024)),
                media: VecDeque::with_capacity(media_cap.min(4096)),
            }),
            ready: Condvar::new(),
            control_cap,
            media_cap,
            drops: QueueDrops::default(),
        }
    }

    /// Queues `item` in `lane`; gives it back (counted) when that lane is full.
    pub fn push(&self, lane: Lane, item: T) -> Result<(), T> {
        self.push_at(lane, item, false)
    }

    /// Queues a command that frees resources (leave, TCP closed): never refused.
    pub fn push_release(&self, item: T) {
        // Cannot fail: `force` skips the bound.
        let _ = self.push_at(Lane::Control, item, true);
    }

    fn push_at(&self, lane: Lane, item: T, force: bool) -> Result<(), T> {
        let Ok(mut lanes) = self.lanes.lock() else {
            return Err(item); // the worker panicked holding the lock: the process is exiting
        };
        let (queue, cap, drops) = match lane {
            Lane::Control => (&mut lanes.control, self.control_cap, &self.drops.control),
            Lane::Media => (&mut lanes.media, self.media_cap, &self.drops.media),
        };
        if queue.len() >= cap && !force {
            drops.fetch_add(1, Ordering::Relaxed);
            return Err(item);
        }
        queue.push_back(Queued {
            item,
            queued_at: Instant::now(),
            lane,
        });
        drop(lanes);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, control first, waiting at most `timeout` for one.
    pub fn pop(&self, timeout: Duration) -> Option<Queued<T>> {
        let lanes = self.lanes.lock().ok()?;
        let (mut lanes, _) = self
            .ready
            .wait_timeout_while(lanes, timeout, |l| {
                l.control.is_empty() && l.media.is_empty()
            })
            .ok()?;
        lanes
            .control
            .pop_front()
            .or_else(|| lanes.media.pop_front())
    }

    /// Moves up to `max` media items into `out`, but none while a control item waits (it
    /// goes first).
    pub fn pop_media(&self, out: &mut Vec<Queued<T>>, max: usize) {
        let Ok(mut lanes) = self.lanes.lock() else {
            return;
        };
        if !lanes.control.is_empty() {
            return;
        }
        let n = max.min(lanes.media.len());
        out.extend(lanes.media.drain(..n));
    }

    /// Items waiting now: (control, media).
    pub fn depth(&self) -> (usize, usize) {
        self.lanes
            .lock()
            .map_or((0, 0), |l| (l.control.len(), l.media.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_goes_first_and_full_lanes_refuse_and_count() {
        let q = WorkerQueue::new(2, 3);
        for i in 0..5 {
            let _ = q.push(Lane::Media, i);
        }
        assert_eq!(q.drops.media.load(Ordering::Relaxed), 2);
        q.push(Lane::Control, 100).unwrap();
        q.push(Lane::Control, 101).unwrap();
        assert_eq!(q.push(Lane::Control, 102), Err(102));
        q.push_release(103);
        assert_eq!(q.depth(), (3, 3));
        // No media batch while control waits.
        let mut batch = Vec::new();
        q.pop_media(&mut batch, 16);
        assert!(batch.is_empty());
        let order: Vec<i32> = (0..3)
            .filter_map(|_| q.pop(Duration::ZERO))
            .map(|x| x.item)
            .collect();
        assert_eq!(order, [100, 101, 103]);
        q.pop_media(&mut batch, 2);
        assert_eq!(batch.iter().map(|x| x.item).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(
            q.pop(Duration::ZERO).map(|x| (x.item, x.lane)),
            Some((2, Lane::Media))
        );
        assert!(q.pop(Duration::from_millis(1)).is_none());
        assert_eq!(q.drops.control.load(Ordering::Relaxed), 1);
    }
}
