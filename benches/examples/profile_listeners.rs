//! A profiling driver for the `idle-listeners` scenario (one audio speaker to N listeners,
//! then silence), without criterion: `perf record -g target/release/examples/profile_listeners
//! 1000 20000 10` runs N=1000 listeners, 20 000 speaker packets, then 10 s of silence, and
//! prints the same per-packet and per-idle-listener figures as the bench.
use std::time::{Duration, Instant};

use calls_benches::{ours::OursCall, Media};

const CHUNK: u64 = 100;

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().ok());
    let n = args.next().flatten().unwrap_or(1000) as usize;
    let packets = args.next().flatten().unwrap_or(20_000);
    let idle_s = args.next().flatten().unwrap_or(10);
    let mut call = OursCall::new(Media::Audio, 1, n);
    let mut left = packets;
    let mut timed = Duration::ZERO;
    while left > 0 {
        let k = left.min(CHUNK);
        let batch = call.generate(k as usize);
        #[allow(clippy::disallowed_methods)] // a profiling driver measures wall time
        let t = Instant::now();
        call.route(&batch);
        timed += t.elapsed();
        call.maintain();
        left -= k;
    }
    let per_packet = timed.as_nanos() as f64 / (packets as f64 * n as f64);
    call.fall_silent();
    let wakeups = call.timer_wakeups();
    let busy = call.idle_for(Duration::from_secs(idle_s));
    let wakeups = call.timer_wakeups() - wakeups;
    let idle = busy.as_nanos() as f64 / (n as f64 * idle_s as f64);
    println!(
        "1 -> {n}: {per_packet:.0} ns per forwarded packet; idle {:.1} us per listener per second, {:.1} timer wake-ups per listener per second",
        idle / 1000.0,
        wakeups as f64 / (n as f64 * idle_s as f64),
    );
}
