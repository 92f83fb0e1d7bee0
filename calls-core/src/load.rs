//! Overload: the load an embedder measures on a router's thread, and the level the router
//! derives from it (with hysteresis) to shed video and refuse joins.
//!
//! The core reads no clock and cannot see its own CPU. The embedder measures how late its loop
//! runs (due timers handled late, queued input handled late) and how busy it is, and reports it
//! with [`Router::set_load`](crate::Router::set_load), typically twice a second. The router
//! turns the reports into a [`LoadLevel`]:
//!
//! | level | entered when | what the router does |
//! |---|---|---|
//! | [`LoadLevel::Normal`] | — | everything |
//! | [`LoadLevel::Degraded`] | lag ≥ `overload_degrade_lag_ms` or busy ≥ `overload_busy_percent` | refuses joins ([`RouterError::Overloaded`](crate::RouterError::Overloaded)); every video slot capped at its lowest simulcast layer |
//! | [`LoadLevel::Overloaded`] | lag ≥ `overload_shed_video_lag_ms` | also stops forwarding cameras (a screen share stays, at its lowest layer); audio, signaling, ICE, DTLS and RTCP go on |
//!
//! A level is entered when [`ESCALATE_AFTER`] consecutive reports call for it (one report of a
//! lag spike, a big join's SDP work, sheds nothing). It is left one step at a time, after the
//! load has stayed below [`RECOVER_FRACTION`] of the thresholds for the recovery hold
//! (`overload_recover_ms`); each step restarts that hold. A level entered again soon after it
//! was left (within [`RELAPSE_WINDOW`] holds: full quality did not fit after all) doubles the
//! hold, up to [`MAX_BACKOFF`] times `overload_recover_ms`; a router that stays at a level for
//! [`RELAPSE_WINDOW`] holds without relapsing gets the short hold back. So a router near a
//! threshold does not flap, and one whose load fits only degraded settles there.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Consecutive reports that must call for a higher level before it is entered.
pub const ESCALATE_AFTER: u8 = 2;
/// A level is left only while the load stays below this fraction of the thresholds that put
/// the router there (lag and busy alike): the gap between entering and leaving a level.
pub const RECOVER_FRACTION: f64 = 0.5;
/// Re-entering a level within this many recovery holds after leaving it is a relapse: the
/// next hold is twice as long.
pub const RELAPSE_WINDOW: u32 = 3;
/// The longest recovery hold, in multiples of `overload_recover_ms`.
pub const MAX_BACKOFF: u32 = 16;

/// How loaded a router is, as the router acts on it (see the [module docs](self)).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LoadLevel {
    /// Everything is served.
    #[default]
    Normal,
    /// Joins are refused and video is capped at its lowest simulcast layer.
    Degraded,
    /// Joins are refused and only audio (and screen shares, at their lowest layer) is forwarded.
    Overloaded,
}

impl LoadLevel {
    /// 0, 1, 2: the level as a number (metrics, the C ABI).
    pub fn as_u8(self) -> u8 {
        match self {
            LoadLevel::Normal => 0,
            LoadLevel::Degraded => 1,
            LoadLevel::Overloaded => 2,
        }
    }

    /// `normal`, `degraded`, `overloaded`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadLevel::Normal => "normal",
            LoadLevel::Degraded => "degraded",
            LoadLevel::Overloaded => "overloaded",
        }
    }

    /// Whether joins are accepted at this level.
    pub fn accepts_joins(self) -> bool {
        self == LoadLevel::Normal
    }

    fn down(self) -> LoadLevel {
        match self {
            LoadLevel::Overloaded => LoadLevel::Degraded,
            _ => LoadLevel::Normal,
        }
    }
}

/// One load report from the embedder, measured over its last window (see
/// [`Router::set_load`](crate::Router::set_load)).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Load {
    /// How late the router's thread handled what was due: the larger of its timers' lateness
    /// (called after the deadline [`Output::Timeout`](crate::Output) asked for) and its queued
    /// input's (handled after it arrived). The window's maximum.
    pub lag: Duration,
    /// Fraction of the window the thread was working rather than waiting, 0.0–1.0.
    pub busy: f64,
}

impl Load {
    /// A report of `lag` and `busy` (clamped to 0.0–1.0; NaN counts as 0).
    pub fn new(lag: Duration, busy: f64) -> Load {
        let busy = if busy.is_nan() {
            0.0
        } else {
            busy.clamp(0.0, 1.0)
        };
        Load { lag, busy }
    }
}

/// The thresholds of [`Config`] that the governor applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Thresholds {
    degrade_lag: Duration,
    shed_video_lag: Duration,
    busy: f64,
    recover: Duration,
}

impl Thresholds {
    pub fn from_config(config: &Config) -> Thresholds {
        Thresholds {
            degrade_lag: Duration::from_millis(config.overload_degrade_lag_ms),
            shed_video_lag: Duration::from_millis(config.overload_shed_video_lag_ms),
            busy: f64::from(config.overload_busy_percent) / 100.0,
            recover: Duration::from_millis(config.overload_recover_ms),
        }
    }

    /// The level `load` calls for, with every threshold scaled by `scale`.
    fn level_for(&self, load: Load, scale: f64) -> LoadLevel {
        if load.lag >= self.shed_video_lag.mul_f64(scale) {
            LoadLevel::Overloaded
        } else if load.lag >= self.degrade_lag.mul_f64(scale) || load.busy >= self.busy * scale {
            LoadLevel::Degraded
        } else {
            LoadLevel::Normal
        }
    }
}

/// Turns load reports into a level: up after [`ESCALATE_AFTER`] reports, down one step per
/// calm `recover` period.
#[derive(Debug)]
pub(crate) struct Governor {
    thresholds: Thresholds,
    level: LoadLevel,
    /// Consecutive reports that called for a level above the current one, and the lowest of
    /// the levels they called for.
    pending_up: (u8, LoadLevel),
    /// Since when the load has stayed below [`RECOVER_FRACTION`] of the current level's
    /// thresholds.
    calm_since: Option<Instant>,
    /// The recovery hold is `recover × backoff` (1, 2, 4, … [`MAX_BACKOFF`]).
    backoff: u32,
    /// The last step down: when, and from which level.
    stepped_down: Option<(Instant, LoadLevel)>,
    /// When the current level was entered.
    entered: Option<Instant>,
}

impl Governor {
    pub fn new(config: &Config) -> Governor {
        Governor {
            thresholds: Thresholds::from_config(config),
            level: LoadLevel::Normal,
            pending_up: (0, LoadLevel::Normal),
            calm_since: None,
            backoff: 1,
            stepped_down: None,
            entered: None,
        }
    }

    /// The recovery hold now (grows with relapses).
    fn hold(&self) -> Duration {
        self.thresholds.recover * self.backoff
    }

    pub fn level(&self) -> LoadLevel {
        self.level
    }

    /// How long a refused client should wait before it tries again: one recovery hold.
    pub fn retry_after(&self) -> Duration {
        self.hold()
    }

    /// Takes one report; returns the new level if it changed.
    pub fn report(&mut self, load: Load, now: Instant) -> Option<LoadLevel> {
        let wanted = self.thresholds.level_for(load, 1.0);
        if wanted > self.level {
            self.calm_since = None;
            let (count, lowest) = self.pending_up;
            let lowest = if count == 0 {
                wanted
            } else {
                lowest.min(wanted)
            };
            let count = count.saturating_add(1);
            if count >= ESCALATE_AFTER {
                self.pending_up = (0, LoadLevel::Normal);
                let window = self.hold() * RELAPSE_WINDOW;
                let relapse = self.stepped_down.is_some_and(|(at, from)| {
                    lowest >= from && now.saturating_duration_since(at) <= window
                });
                if relapse {
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
                self.level = lowest;
                self.entered = Some(now);
                return Some(lowest);
            }
            self.pending_up = (count, lowest);
            return None;
        }
        self.pending_up = (0, LoadLevel::Normal);
        // A level held without relapse for a while: the short hold again.
        let settled = self.entered.is_none_or(|at| {
            now.saturating_duration_since(at) >= self.thresholds.recover * RELAPSE_WINDOW * 4
        });
        if settled && self.level == LoadLevel::Normal {
            self.backoff = 1;
        }
        if self.level == LoadLevel::Normal {
            return None;
        }
        let calm = self.thresholds.level_for(load, RECOVER_FRACTION) < self.level;
        if !calm {
            self.calm_since = None;
            return None;
        }
        let since = *self.calm_since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.hold() {
            return None;
        }
        self.stepped_down = Some((now, self.level));
        self.level = self.level.down();
        self.entered = Some(now);
        // The next step down needs its own calm period.
        self.calm_since = Some(now);
        Some(self.level)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn governor() -> Governor {
        Governor::new(&Config::default())
    }

    #[test]
    fn one_spike_sheds_nothing_two_reports_do() {
        let t = Instant::now();
        let mut g = governor();
        assert_eq!(g.report(Load::new(ms(500), 1.0), t), None);
        assert_eq!(g.report(Load::new(ms(1), 0.1), t + ms(500)), None);
        assert_eq!(g.level(), LoadLevel::Normal);
        assert_eq!(g.report(Load::new(ms(500), 1.0), t + ms(1000)), None);
        // Two reports, one calling for Overloaded and one for Degraded: the lower one.
        assert_eq!(
            g.report(Load::new(ms(60), 0.5), t + ms(1500)),
            Some(LoadLevel::Degraded)
        );
        assert_eq!(g.report(Load::new(ms(500), 1.0), t + ms(2000)), None);
        assert_eq!(
            g.report(Load::new(ms(500), 1.0), t + ms(2500)),
            Some(LoadLevel::Overloaded)
        );
    }

    #[test]
    fn busy_alone_degrades_but_never_sheds_video() {
        let t = Instant::now();
        let mut g = governor();
        for i in 0..10 {
            g.report(Load::new(ms(0), 0.99), t + ms(500 * i));
        }
        assert_eq!(g.level(), LoadLevel::Degraded);
    }

    #[test]
    fn recovery_steps_down_one_level_per_calm_period_and_a_bump_restarts_it() {
        let t = Instant::now();
        let mut g = governor();
        g.report(Load::new(ms(400), 1.0), t);
        g.report(Load::new(ms(400), 1.0), t);
        assert_eq!(g.level(), LoadLevel::Overloaded);
        let recover = g.retry_after();
        let calm = Load::new(ms(1), 0.2);
        // Below the Overloaded threshold (200 ms) but above half of it: not calm.
        let near = Load::new(ms(120), 0.2);
        let mut at = t;
        let mut changes = Vec::new();
        for step in 0..40 {
            at += ms(500);
            let load = if step == 4 { near } else { calm };
            if let Some(level) = g.report(load, at) {
                changes.push((at - t, level));
            }
        }
        // The bump at step 4 (2.5 s) restarted the hold: down at 2.5 s + 0.5 + 5 s = 8 s,
        // then another 5 s for the next step.
        let first = ms(2500) + ms(500) + recover;
        assert_eq!(
            changes,
            vec![
                (first, LoadLevel::Degraded),
                (first + recover, LoadLevel::Normal)
            ]
        );
    }

    #[test]
    fn a_load_hovering_at_the_threshold_does_not_flap() {
        let t = Instant::now();
        let mut g = governor();
        let mut changes = 0;
        // Alternating just above and just below the degrade threshold for a minute.
        for i in 0..120u64 {
            let lag = if i % 2 == 0 { ms(55) } else { ms(45) };
            if g.report(Load::new(lag, 0.5), t + ms(500 * i)).is_some() {
                changes += 1;
            }
        }
        assert_eq!(changes, 0, "never two reports in a row above it");
        for i in 0..120u64 {
            let lag = if i % 3 == 2 { ms(45) } else { ms(55) };
            if g.report(Load::new(lag, 0.5), t + ms(60_000 + 500 * i))
                .is_some()
            {
                changes += 1;
            }
        }
        assert_eq!(changes, 1, "entered once, never left: 45 ms is not calm");
        assert_eq!(g.level(), LoadLevel::Degraded);
    }

    /// Full quality does not fit: each return to Normal is followed by a relapse, and each
    /// relapse doubles the hold, so the level changes ever more rarely.
    #[test]
    fn relapses_double_the_recovery_hold() {
        let t = Instant::now();
        let mut g = governor();
        let mut at = t;
        let mut entered_degraded = Vec::new();
        let mut level = LoadLevel::Normal;
        for _ in 0..600 {
            at += ms(500);
            // At Normal the load is too much; at Degraded it is calm.
            let load = if level == LoadLevel::Normal {
                Load::new(ms(80), 0.95)
            } else {
                Load::new(ms(2), 0.2)
            };
            if let Some(new) = g.report(load, at) {
                if new == LoadLevel::Degraded {
                    entered_degraded.push(at - t);
                }
                level = new;
            }
        }
        // Holds of 5, 10, 20, 40, 80 s (then 80) between the entries, plus the first calm
        // report (0.5 s after entering) and the two reports it takes to re-enter (1 s).
        let gaps: Vec<u64> = entered_degraded
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect();
        assert_eq!(gaps, vec![6_500, 11_500, 21_500, 41_500, 81_500, 81_500]);
        assert_eq!(g.retry_after(), ms(80_000));
    }

    #[test]
    fn reports_are_clamped() {
        assert_eq!(Load::new(ms(1), f64::NAN).busy, 0.0);
        assert_eq!(Load::new(ms(1), 7.0).busy, 1.0);
    }
}
