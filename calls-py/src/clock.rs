//! Time across the Python boundary: float seconds on the caller's clock ↔ `Instant`.
//!
//! Each object maps the caller time it was created at to an `Instant` read then, and every
//! later time relative to that origin. Like the C ABI (`calls-ffi`, `MAX_CLOCK_SPAN_US`), a
//! time more than [`MAX_CLOCK_SPAN_S`] from the origin is refused: it is a unit mistake or
//! garbage, and the core adds deadlines to the `Instant` it is given (`now` + reconnect grace,
//! + connect timeout, …), which would overflow and panic near the end of `Instant`'s range.

use std::time::{Duration, Instant};

/// How far a caller time may be from the origin: 100 years, as in the C ABI.
pub const MAX_CLOCK_SPAN_S: f64 = 100.0 * 365.0 * 24.0 * 3600.0;

/// Caller seconds ↔ `Instant`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_s: f64,
}

impl Clock {
    /// A clock whose origin is `now` (caller seconds) at `origin` (the `Instant` read for it).
    pub fn new(now: f64, origin: Instant) -> Clock {
        Clock {
            origin,
            origin_s: now,
        }
    }

    /// The `Instant` of caller time `now`; `Err` (the message for a `ValueError`) for a time
    /// that is not finite or more than [`MAX_CLOCK_SPAN_S`] from the origin.
    pub fn instant(&self, now: f64) -> Result<Instant, String> {
        if !now.is_finite() {
            return Err(format!("time {now} is not finite"));
        }
        let offset = now - self.origin_s;
        if !offset.is_finite() || offset.abs() > MAX_CLOCK_SPAN_S {
            return Err(format!(
                "time {now} is more than 100 years from this object's origin {}",
                self.origin_s
            ));
        }
        let shifted = if offset >= 0.0 {
            Duration::try_from_secs_f64(offset)
                .ok()
                .and_then(|d| self.origin.checked_add(d))
        } else {
            Duration::try_from_secs_f64(-offset)
                .ok()
                .and_then(|d| self.origin.checked_sub(d))
        };
        shifted.ok_or_else(|| {
            format!(
                "time {now} is too far from this object's origin {}",
                self.origin_s
            )
        })
    }

    /// The caller time of `at`.
    pub fn seconds(&self, at: Instant) -> f64 {
        if at >= self.origin {
            self.origin_s + (at - self.origin).as_secs_f64()
        } else {
            self.origin_s - (self.origin - at).as_secs_f64()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods, clippy::unwrap_used)]

    use super::*;
    use calls_core::{CallId, Config, Grants, Router, SessionId};

    /// Finding 7 (issue 16): a time far in the future used to map to an `Instant` near the end
    /// of its range, and the router's `now + connect timeout` then overflowed and panicked.
    /// It is refused like the C ABI refuses it, and the router never sees it.
    #[test]
    fn a_time_centuries_away_is_refused_not_a_panic_in_the_core() {
        let clock = Clock::new(0.0, Instant::now());
        for far in [1e18, -1e18, 4e9, MAX_CLOCK_SPAN_S * 1.01, f64::MAX] {
            assert!(clock.instant(far).is_err(), "{far} accepted");
        }
        let near = clock.instant(MAX_CLOCK_SPAN_S * 0.99).unwrap();
        // The largest accepted time still leaves the core room for its deadlines.
        let mut router = Router::new(Config::default(), clock.instant(0.0).unwrap()).unwrap();
        router
            .join(
                CallId::from("c"),
                SessionId(1),
                "u".into(),
                Grants::ALL,
                near,
            )
            .unwrap();
        while !matches!(router.poll_output(), calls_core::Output::Timeout(_)) {}
    }

    #[test]
    fn seconds_round_trip() {
        let clock = Clock::new(1000.0, Instant::now());
        let at = clock.instant(1012.5).unwrap();
        assert!((clock.seconds(at) - 1012.5).abs() < 1e-6);
        let before = clock.instant(990.0).unwrap();
        assert!((clock.seconds(before) - 990.0).abs() < 1e-6);
    }
}
