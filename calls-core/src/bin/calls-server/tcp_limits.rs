//! Limits on the ICE-TCP listener (issue 16, finding 1): connections per source IP and in
//! total, backoff when `accept` fails, and a bounded write queue per connection. Without them
//! file descriptors were the only limit, an `accept` error such as EMFILE spun a runtime
//! thread that also serves signaling, and a client that never read grew its queue without end.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// First pause after a failed `accept` …
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// … doubled per consecutive failure up to this (EMFILE clears when connections close).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// Connections refused: the source IP had `tcp_max_connections_per_ip` open.
    pub refused_per_ip: AtomicU64,
    /// Connections refused: `tcp_max_connections` were open.
    pub refused_total: AtomicU64,
    /// `accept` calls that failed (EMFILE, ENFILE, ENOBUFS, …).
    pub accept_errors: AtomicU64,
    /// Connections closed because their write queue was full (the client does not read).
    pub write_queue_full: AtomicU64,
    /// Connections closed because one write waited too long for the client's window (a client
    /// that stopped reading while too little was sent to it to fill the queue).
    pub write_stalls: AtomicU64,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Open ICE-TCP connections, counted per source IP and in total.
#[derive(Debug, Clone)]
pub struct TcpLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Arc<Mutex<Open>>,
    pub counters: Arc<TcpCounters>,
}

/// A slot held by one open connection; dropping it frees the slot.
#[derive(Debug)]
pub struct TcpSlot {
    ip: IpAddr,
    open: Arc<Mutex<Open>>,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.by_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.by_ip.remove(&self.ip);
                }
            }
        }
    }
}

impl TcpLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        TcpLimits {
            max_total,
            max_per_ip,
            open: Arc::default(),
            counters: Arc::default(),
        }
    }

    /// A slot for a new connection from `ip`, or `None` (counted) when `ip` or the server is
    /// at its cap: the caller closes the connection at once.
    pub fn admit(&self, ip: IpAddr) -> Option<TcpSlot> {
        let mut open = self.open.lock().ok()?;
        if open.total >= self.max_total {
            self.counters.refused_total.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let from_ip = open.by_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            self.counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *from_ip += 1;
        open.total += 1;
        Some(TcpSlot {
            ip,
            open: Arc::clone(&self.open),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().map_or(0, |o| o.total)
    }
}

/// Exponential backoff for a failing `accept` loop: 10 ms, 20 ms, … 1 s; reset by a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// The pause after another consecutive failure.
    pub fn failed(&mut self) -> Duration {
        let pause = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((pause * 2).min(ACCEPT_BACKOFF_MAX));
        pause
    }

    /// `accept` worked: the next failure starts from the shortest pause again.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 1 (issue 16): one source IP cannot hold more than its share of connections,
    /// nor everyone more than the total; a closed connection frees its slot; refusals are
    /// counted.
    #[test]
    fn connections_beyond_the_caps_are_refused_and_counted() {
        let limits = TcpLimits::new(5, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third from one IP");
        drop(first);
        let _again = limits.admit(a).unwrap();
        let others: Vec<_> = (0..3).map(|_| limits.admit(b)).collect();
        assert_eq!(others.iter().filter(|s| s.is_some()).count(), 2);
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let _c = limits.admit(c).unwrap();
        assert!(
            limits.admit("192.0.2.4".parse().unwrap()).is_none(),
            "total cap"
        );
        assert_eq!(limits.open(), 5);
        assert_eq!(limits.counters.refused_per_ip.load(Ordering::Relaxed), 2);
        assert_eq!(limits.counters.refused_total.load(Ordering::Relaxed), 1);
    }

    /// Finding 1 (issue 16): a failing `accept` (EMFILE) pauses 10 ms, doubling to 1 s,
    /// instead of retrying at once.
    #[test]
    fn accept_errors_back_off_exponentially_up_to_a_second() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u64> = (0..9)
            .map(|_| backoff.failed().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(10));
    }
}
