//! Each worker's own load, measured where it happens (issue 15), and what the HTTP side reads
//! of it without asking the worker (a worker too busy to answer must still show in `/metrics`,
//! `/healthz` and `/readyz`).
//!
//! Over every [`LOAD_WINDOW`] the worker's loop records how late it handled due timers, how
//! long input waited in its queue, and how much CPU time its thread used; at the window's end
//! it publishes them in its [`WorkerStatus`] and reports them to its router
//! (`Router::set_load`), which decides the load level.
//!
//! The busy share is the thread's CPU time over the window (`CLOCK_THREAD_CPUTIME_ID`), not
//! the wall-clock time it did not spend waiting for input: on a machine with more runnable
//! threads than cores a thread waits to be scheduled after every wake-up, and counting that as
//! work reported a worker at 30 % of a core as 90 % busy, which refused joins early. Waiting
//! to be scheduled is lateness: it shows in the lag, which the router weighs too.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use calls_core::{Load, LoadLevel};

/// The measuring window: the router gets one report per window.
pub const LOAD_WINDOW: Duration = Duration::from_millis(500);

/// What one worker publishes for the HTTP side. Written by the worker only.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    /// Cleared when the worker's thread ends (it never does on purpose).
    pub alive: AtomicBool,
    /// When the loop last went round, in ms since the server started.
    pub heartbeat_ms: AtomicU64,
    /// The last window's largest timer lateness, µs.
    pub timer_lag_us: AtomicU64,
    /// The last window's largest input lateness (time in the queue), µs.
    pub input_lag_us: AtomicU64,
    /// The last window's busy share, ‰.
    pub busy_permille: AtomicU64,
    /// The router's load level (`LoadLevel::as_u8`).
    pub level: AtomicU8,
    /// Sessions on the worker's router.
    pub sessions: AtomicU64,
    /// WebSockets closed because their outgoing queue was full (slow consumers).
    pub ws_slow_consumers: AtomicU64,
    /// Relay links to other workers open now (a call spread over workers).
    pub relay_links: AtomicU64,
    /// Relay frames handed to other workers, and their bytes.
    pub relay_frames_out: AtomicU64,
    pub relay_bytes_out: AtomicU64,
    /// Relay frames from other workers handled.
    pub relay_frames_in: AtomicU64,
    /// Relay frames dropped: the other worker's media lane was full (or the link unknown).
    pub relay_dropped: AtomicU64,
}

impl WorkerStatus {
    pub fn new() -> Self {
        let status = WorkerStatus::default();
        status.alive.store(true, Ordering::Relaxed);
        status
    }

    /// Whether the worker runs and went round its loop within `stall` (now = `now_ms` since
    /// the server started).
    pub fn is_running(&self, now_ms: u64, stall: Duration) -> bool {
        let beat = self.heartbeat_ms.load(Ordering::Relaxed);
        self.alive.load(Ordering::Relaxed)
            && now_ms.saturating_sub(beat) <= stall.as_millis() as u64
    }

    /// The load level the worker's router acts on.
    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    pub fn seconds(us: &AtomicU64) -> f64 {
        us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Accumulates one window of measurements in the worker's loop.
#[derive(Debug)]
pub struct LoadMeter {
    started: Instant,
    window_start: Instant,
    idle: Duration,
    timer_lag: Duration,
    input_lag: Duration,
    /// The least lag reported (debug builds: `POST /api/debug/lag/{worker}/{ms}`, to test
    /// overload deterministically); zero otherwise.
    lag_floor: Duration,
    /// The thread's CPU time (`None` where the platform has no per-thread clock: the busy
    /// share then falls back to the wall-clock time not spent waiting).
    cpu_clock: fn() -> Option<Duration>,
    /// The thread's CPU time at the window's start.
    cpu_start: Option<Duration>,
}

/// The calling thread's CPU time.
pub fn thread_cpu_time() -> Option<Duration> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(t.tv_sec).ok()?;
    let nanos = u32::try_from(t.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

impl LoadMeter {
    /// `started`: the server's start (the heartbeat's origin).
    pub fn new(started: Instant, now: Instant) -> Self {
        Self::with_cpu_clock(started, now, thread_cpu_time)
    }

    /// A meter reading the thread's CPU time from `cpu_clock`, called on the worker's thread.
    pub fn with_cpu_clock(
        started: Instant,
        now: Instant,
        cpu_clock: fn() -> Option<Duration>,
    ) -> Self {
        LoadMeter {
            started,
            window_start: now,
            idle: Duration::ZERO,
            timer_lag: Duration::ZERO,
            input_lag: Duration::ZERO,
            lag_floor: Duration::ZERO,
            cpu_clock,
            cpu_start: cpu_clock(),
        }
    }

    /// Starts a fresh window at `now`, reading the CPU clock on the calling thread (the one
    /// the meter measures from then on).
    pub fn restart(&mut self, now: Instant) {
        self.new_window(now, (self.cpu_clock)());
    }

    /// Clears the window's measurements; it starts at `now` with the thread's CPU time
    /// `cpu_start`. The lag floor stays.
    fn new_window(&mut self, now: Instant, cpu_start: Option<Duration>) {
        self.window_start = now;
        self.idle = Duration::ZERO;
        self.timer_lag = Duration::ZERO;
        self.input_lag = Duration::ZERO;
        self.cpu_start = cpu_start;
    }

    /// Debug builds: every report from now on says at least `lag`.
    #[cfg(debug_assertions)]
    pub fn set_lag_floor(&mut self, lag: Duration) {
        self.lag_floor = lag;
    }

    /// A due timer was handled `late` after its deadline.
    pub fn timer_late(&mut self, late: Duration) {
        self.timer_lag = self.timer_lag.max(late);
    }

    /// An input waited `late` in the queue.
    pub fn input_late(&mut self, late: Duration) {
        self.input_lag = self.input_lag.max(late);
    }

    /// The loop waited `idle` for work.
    pub fn idle(&mut self, idle: Duration) {
        self.idle += idle;
    }

    /// How long the loop may wait before the window ends.
    pub fn until_report(&self, now: Instant) -> Duration {
        (self.window_start + LOAD_WINDOW).saturating_duration_since(now)
    }

    /// Beats the heartbeat; at the end of a window, publishes it and returns the report for
    /// the router.
    pub fn tick(&mut self, now: Instant, status: &WorkerStatus) -> Option<Load> {
        let since_start = now.saturating_duration_since(self.started).as_millis() as u64;
        status.heartbeat_ms.store(since_start, Ordering::Relaxed);
        let window = now.saturating_duration_since(self.window_start);
        if window < LOAD_WINDOW {
            return None;
        }
        let cpu_now = (self.cpu_clock)();
        let busy = match (self.cpu_start, cpu_now) {
            (Some(start), Some(now_cpu)) => {
                (now_cpu.saturating_sub(start).as_secs_f64() / window.as_secs_f64()).min(1.0)
            }
            _ => 1.0 - self.idle.as_secs_f64() / window.as_secs_f64(),
        };
        let lag = self.timer_lag.max(self.input_lag).max(self.lag_floor);
        let load = Load::new(lag, busy);
        let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        status
            .timer_lag_us
            .store(us(self.timer_lag), Ordering::Relaxed);
        status
            .input_lag_us
            .store(us(self.input_lag), Ordering::Relaxed);
        status
            .busy_permille
            .store((load.busy * 1000.0).round() as u64, Ordering::Relaxed);
        self.new_window(now, cpu_now);
        Some(load)
    }

    /// Publishes the router's level after a report.
    pub fn publish_level(status: &WorkerStatus, level: LoadLevel) {
        status.level.store(level.as_u8(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reports_the_worst_lateness_and_the_busy_share() {
        let t = Instant::now();
        let status = WorkerStatus::new();
        // Without a thread clock: the wall-clock time not spent waiting.
        let mut meter = LoadMeter::with_cpu_clock(t, t, || None);
        meter.timer_late(Duration::from_millis(3));
        meter.input_late(Duration::from_millis(70));
        meter.timer_late(Duration::from_millis(1));
        meter.idle(Duration::from_millis(100));
        assert!(meter
            .tick(t + Duration::from_millis(499), &status)
            .is_none());
        let load = meter.tick(t + LOAD_WINDOW, &status).unwrap();
        assert_eq!(load.lag, Duration::from_millis(70));
        assert!((load.busy - 0.8).abs() < 1e-9, "{}", load.busy);
        assert_eq!(status.input_lag_us.load(Ordering::Relaxed), 70_000);
        assert_eq!(status.timer_lag_us.load(Ordering::Relaxed), 3_000);
        assert_eq!(status.busy_permille.load(Ordering::Relaxed), 800);
        assert!(status.is_running(500, Duration::from_secs(1)));
        assert!(!status.is_running(5_000, Duration::from_secs(1)));
        status.alive.store(false, Ordering::Relaxed);
        assert!(!status.is_running(500, Duration::from_secs(1)));
    }

    thread_local! {
        static FAKE_CPU: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
    }

    fn fake_cpu() -> Option<Duration> {
        Some(FAKE_CPU.with(|c| c.get()))
    }

    #[test]
    fn the_busy_share_is_the_threads_cpu_time_not_time_spent_off_the_queue() {
        let t = Instant::now();
        let status = WorkerStatus::new();
        FAKE_CPU.with(|c| c.set(Duration::from_secs(7)));
        let mut meter = LoadMeter::with_cpu_clock(t, t, fake_cpu);
        // It waited for input only 50 ms of the window (woken often, then waiting to be
        // scheduled) but ran 150 ms of it.
        meter.idle(Duration::from_millis(50));
        FAKE_CPU.with(|c| c.set(Duration::from_millis(7_150)));
        let load = meter.tick(t + LOAD_WINDOW, &status).unwrap();
        assert!((load.busy - 0.3).abs() < 1e-9, "{}", load.busy);
        assert_eq!(status.busy_permille.load(Ordering::Relaxed), 300);
        // The next window starts from the CPU time at the end of this one.
        FAKE_CPU.with(|c| c.set(Duration::from_millis(7_600)));
        let load = meter.tick(t + 2 * LOAD_WINDOW, &status).unwrap();
        assert!((load.busy - 0.9).abs() < 1e-9, "{}", load.busy);
        // The real clock counts this thread's work.
        let before = thread_cpu_time().expect("a per-thread CPU clock on Linux");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = thread_cpu_time().expect("clock") - before;
        assert!(
            used >= Duration::from_millis(5),
            "{used:?} of CPU in 30 ms spinning"
        );
    }
}
