//! Active speaker and top-N audio forwarding, from the RFC 6464 audio levels publishers put in
//! their RTP header extensions. Nothing is decoded.
//!
//! One [`SpeakerDetector`] per call. The router feeds it every audio packet's level
//! ([`SpeakerDetector::observe`], O(1), no allocation), the publishers' mute state
//! ([`SpeakerDetector::set_muted`]) and departures ([`SpeakerDetector::remove`]), and calls
//! [`SpeakerDetector::tick`] about every [`BUCKET`] to learn when the active speaker changes
//! and to recompute the top-N set. [`SpeakerDetector::is_forwarded`] then says whether a
//! publisher's audio goes to the subscribers at all: a 1000-person call forwards the few people
//! talking, not 999 silent streams.
//!
//! ## How it measures
//! Each publisher has a ring of [`WINDOW_BUCKETS`] buckets of [`BUCKET`] each (the last
//! 1.2 s). A packet is *voiced* when its level is at least [`VOICED_LEVEL_DBOV`], or when the
//! sender's voice activity flag is set and the level is at least [`VAD_MIN_LEVEL_DBOV`]. A bucket
//! is voiced when at least half of its packets are; counting buckets rather than packets keeps
//! the measure in units of time, whatever the packet duration and with DTX (few packets during
//! silence). A publisher is **speaking** while at least [`SPEAKING_MIN_VOICED_BUCKETS`] buckets
//! of the window are voiced: steady noise below the threshold never is, and a cough or click
//! shorter than 200 ms covers at most two buckets.
//!
//! Publishers are compared by a **score** in dB: the mean level of their voiced packets over the
//! window, plus `10·log10(voiced buckets / window)` — the speech energy per unit of time, so
//! someone talking steadily outranks someone equally loud who says one word.
//!
//! ## Hysteresis
//! A challenger replaces the active speaker (or a top-N member) only after *beating* it for
//! [`SWITCH_HOLD`]: speaking, with no pause longer than [`MAX_CHALLENGE_GAP`], and scoring
//! [`LOUDER_MARGIN_DB`] higher than the incumbent — or at all while the incumbent is not
//! speaking. An active speaker who stopped keeps the role for [`RELEASE_HOLD`] while nobody
//! takes over; then the call has no active speaker. A top-N slot held by someone not speaking
//! goes at once to a challenger who is (that cannot flap: the newcomer stays speaking for most of
//! a window after they stop), and an empty slot is filled at once, so the set is never short
//! while the call has more publishers than slots.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ids::SessionId;

/// Length of one measurement bucket: 100 ms.
///
/// Five 20 ms Opus packets, enough for a per-bucket majority vote, and the natural period for
/// [`SpeakerDetector::tick`] (ticking faster gains nothing).
pub(crate) const BUCKET: Duration = Duration::from_millis(100);

/// Number of buckets in a publisher's window: 12, i.e. 1.2 s.
///
/// Long enough to span the pauses between words and syllables (so a talker stays speaking
/// through them), short enough that the detector reacts within about a second.
pub(crate) const WINDOW_BUCKETS: usize = 12;

/// Level from which a packet counts as voiced on its own: −50 dBov.
///
/// Speech into a headset or laptop microphone arrives at roughly −40 to −10 dBov after the
/// sender's gain control; room tone, fans and line noise sit around −60 dBov and below.
pub(crate) const VOICED_LEVEL_DBOV: i8 = -50;

/// Lowest level at which the sender's voice activity flag (the RFC 6464 V bit) is believed:
/// −70 dBov.
///
/// The flag lets a quiet talker count as voiced below [`VOICED_LEVEL_DBOV`], but some senders set
/// it on near-silence; digital silence (−127) with the flag set is not speech. A cleared flag
/// vetoes nothing: senders that do not run VAD send the bit as 0, which looks the same.
pub(crate) const VAD_MIN_LEVEL_DBOV: i8 = -70;

/// Voiced buckets a publisher needs in its window to be speaking: 5 of 12 (500 ms of the last
/// 1.2 s).
///
/// Conversational speech is voiced well over half the time. An isolated spike shorter than
/// 200 ms makes at most two voiced buckets (a bucket needs half its packets voiced), two in one
/// window at most four — below five. A talker who starts is speaking after 0.5 s; one who
/// stops is no longer speaking 0.8 s later.
pub(crate) const SPEAKING_MIN_VOICED_BUCKETS: u32 = 5;

/// How much higher a challenger must score than the incumbent to displace it while both are
/// speaking: 3 dB.
///
/// Twice the power — clearly louder. Two people talking at the same level differ by less (a
/// window's score moves about 1.5 dB as their voiced share swings between 5 and 7 buckets), so
/// they do not displace each other by turns.
pub(crate) const LOUDER_MARGIN_DB: f32 = 3.0;

/// How long a challenger must keep beating the incumbent (active speaker or weakest speaking
/// top-N member) before it takes over: 700 ms.
///
/// Longer than a word or a short interjection ("yes", "mm-hm"; see also [`MAX_CHALLENGE_GAP`]),
/// short enough that the highlighted speaker follows a real turn change within about 1.5 s.
pub(crate) const SWITCH_HOLD: Duration = Duration::from_millis(700);

/// Longest silence that does not interrupt a challenge: 300 ms. A challenger must have sent a
/// voiced packet this recently, or its [`SWITCH_HOLD`] starts over.
///
/// Longer than the gaps between words. It stops a loud interjection ("wait!") from winning the
/// role after it ended, while the window still counts it as speaking for up to 0.8 s: with it,
/// a burst must last about 0.9 s to take over.
pub(crate) const MAX_CHALLENGE_GAP: Duration = Duration::from_millis(300);

/// How long an active speaker who stopped speaking keeps the role while nobody takes over:
/// 1.5 s. After that the call has no active speaker.
///
/// Covers a pause to think or breathe. "Stopped speaking" itself comes up to 0.8 s after the
/// last word (see [`SPEAKING_MIN_VOICED_BUCKETS`]), so the highlight goes 2–2.3 s after silence.
pub(crate) const RELEASE_HOLD: Duration = Duration::from_millis(1500);

/// How long a publisher's audio is forwarded after it unmutes, even outside the top N: 5 s.
///
/// Unmuting announces speech. People start talking a second or two after clicking unmute; it
/// then takes half a second of talk to count as speaking ([`SPEAKING_MIN_VOICED_BUCKETS`]) and,
/// against speaking members, [`SWITCH_HOLD`] more to win a slot. Five seconds covers all of it,
/// so their first words are heard.
pub(crate) const UNMUTE_GRACE: Duration = Duration::from_millis(5000);

/// The quietest level RFC 6464 can express (and what str0m reports for digital silence):
/// −127 dBov.
const SILENCE_DBOV: i8 = -127;

/// Active speaker detection and top-N audio selection for one call.
///
/// Sans-IO: every method that depends on time takes `now`.
#[derive(Debug)]
pub(crate) struct SpeakerDetector {
    top_n: usize,
    /// Origin of bucket numbering; set by the first call that passes a time.
    epoch: Option<Instant>,
    publishers: HashMap<SessionId, Publisher>,
    active: Option<SessionId>,
    /// When the active speaker was first seen not speaking (cleared when they speak again).
    active_quiet_since: Option<Instant>,
    /// The top-N set, strongest first.
    top: Vec<SessionId>,
    /// Reused by `tick` so that it does not allocate.
    scratch: Vec<SessionId>,
}

/// One audio publisher's window and hysteresis state.
#[derive(Debug)]
struct Publisher {
    buckets: [Bucket; WINDOW_BUCKETS],
    muted: bool,
    /// End of the forwarding grace after the last unmute.
    grace_until: Option<Instant>,
    /// When this publisher last sent a voiced packet: ranks publishers who are not speaking.
    last_voiced: Option<Instant>,
    /// The measurement taken by the last `tick`.
    measure: Measure,
    in_top: bool,
    /// Since when this publisher has beaten the active speaker.
    beating_active_since: Option<Instant>,
    /// Since when this publisher (outside the top N) has beaten the weakest member.
    beating_top_since: Option<Instant>,
}

/// Counts for one [`BUCKET`] of one publisher.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Absolute bucket number (time since the epoch / [`BUCKET`]); a slot whose number is not
    /// in the current window is stale.
    index: u64,
    packets: u16,
    voiced: u16,
    /// Sum of the levels (dBov, ≤ 0) of the voiced packets.
    voiced_level_sum: i32,
}

/// What a publisher's window says at one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measure {
    speaking: bool,
    /// Sent a voiced packet within the last [`MAX_CHALLENGE_GAP`]: talking right now.
    talking: bool,
    /// Speech energy in dB (see the module docs); −∞ when nothing in the window was voiced.
    score: f32,
}

impl Measure {
    const SILENT: Measure = Measure {
        speaking: false,
        talking: false,
        score: f32::NEG_INFINITY,
    };

    /// Whether `self` should displace an incumbent measured as `incumbent`: it is speaking and
    /// talking right now, and the incumbent is not speaking or `self` is clearly louder.
    fn beats(self, incumbent: Measure) -> bool {
        self.speaking
            && self.talking
            && (!incumbent.speaking || self.score >= incumbent.score + LOUDER_MARGIN_DB)
    }
}

impl Publisher {
    fn new() -> Self {
        Publisher {
            buckets: [Bucket::default(); WINDOW_BUCKETS],
            muted: false,
            grace_until: None,
            last_voiced: None,
            measure: Measure::SILENT,
            in_top: false,
            beating_active_since: None,
            beating_top_since: None,
        }
    }

    /// Measures the window ending with bucket `current`, at `now`.
    fn measure(&self, current: u64, now: Instant) -> Measure {
        if self.muted {
            return Measure::SILENT;
        }
        let oldest = current.saturating_sub(WINDOW_BUCKETS as u64 - 1);
        let mut voiced_buckets = 0u32;
        let mut voiced_packets = 0i32;
        let mut level_sum = 0i32;
        for bucket in &self.buckets {
            if bucket.index < oldest || bucket.index > current || bucket.packets == 0 {
                continue;
            }
            if 2 * bucket.voiced >= bucket.packets {
                voiced_buckets += 1;
            }
            voiced_packets += i32::from(bucket.voiced);
            level_sum += bucket.voiced_level_sum;
        }
        if voiced_packets == 0 {
            return Measure::SILENT;
        }
        let voice_level = level_sum as f32 / voiced_packets as f32;
        // A few voiced packets that made no voiced bucket still rank their sender among the
        // publishers who are not speaking: count them as one bucket.
        let share = voiced_buckets.max(1) as f32 / WINDOW_BUCKETS as f32;
        Measure {
            speaking: voiced_buckets >= SPEAKING_MIN_VOICED_BUCKETS,
            talking: self
                .last_voiced
                .is_some_and(|at| now.saturating_duration_since(at) <= MAX_CHALLENGE_GAP),
            score: voice_level + 10.0 * share.log10(),
        }
    }

    fn clear_window(&mut self) {
        self.buckets = [Bucket::default(); WINDOW_BUCKETS];
        self.measure = Measure::SILENT;
        self.last_voiced = None;
    }
}

/// Ranking order of publishers, strongest first: speaking, then score, then most recently
/// voiced, then the lower session id (so the order is deterministic).
fn rank(ida: SessionId, pa: &Publisher, idb: SessionId, pb: &Publisher) -> std::cmp::Ordering {
    pb.measure
        .speaking
        .cmp(&pa.measure.speaking)
        .then(pb.measure.score.total_cmp(&pa.measure.score))
        .then(pb.last_voiced.cmp(&pa.last_voiced))
        .then(ida.cmp(&idb))
}

/// [`rank`] for two sessions of `publishers` (which must hold both).
fn by_rank(
    publishers: &HashMap<SessionId, Publisher>,
) -> impl Fn(&SessionId, &SessionId) -> std::cmp::Ordering + '_ {
    |a, b| rank(*a, &publishers[a], *b, &publishers[b])
}

/// Marks `session` as holding a top-N slot or not; a member has no challenge running.
fn set_in_top(publishers: &mut HashMap<SessionId, Publisher>, session: SessionId, in_top: bool) {
    if let Some(publisher) = publishers.get_mut(&session) {
        publisher.in_top = in_top;
        publisher.beating_top_since = None;
    }
}

impl SpeakerDetector {
    /// A detector that forwards the audio of at most `top_n` publishers (plus those in their
    /// [`UNMUTE_GRACE`]); `0` forwards everybody and only detects the active speaker.
    pub fn new(top_n: usize) -> Self {
        SpeakerDetector {
            top_n,
            epoch: None,
            publishers: HashMap::new(),
            active: None,
            active_quiet_since: None,
            top: Vec::with_capacity(top_n),
            scratch: Vec::new(),
        }
    }

    /// Records one audio packet of `session`: its RFC 6464 level as str0m reports it
    /// (`ExtensionValues::audio_level`, dBov from −127 = silence to 0 = loudest; values outside
    /// are clamped) and the sender's voice activity flag if any. A session seen for the first
    /// time becomes a publisher. Packets of muted sessions are ignored.
    ///
    /// Call it for every audio packet; it is O(1) and does not allocate (except the first time a
    /// session is seen).
    pub fn observe(&mut self, session: SessionId, level: i8, vad: Option<bool>, now: Instant) {
        let index = self.bucket_index(now);
        let publisher = self
            .publishers
            .entry(session)
            .or_insert_with(Publisher::new);
        if publisher.muted {
            return;
        }
        let level = level.clamp(SILENCE_DBOV, 0);
        let voiced =
            level >= VOICED_LEVEL_DBOV || (vad == Some(true) && level >= VAD_MIN_LEVEL_DBOV);
        let bucket = &mut publisher.buckets[(index % WINDOW_BUCKETS as u64) as usize];
        if bucket.index != index {
            if bucket.index > index && bucket.packets > 0 {
                // `now` went backwards past this slot's bucket: too old to count.
                return;
            }
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.packets = bucket.packets.saturating_add(1);
        if voiced {
            bucket.voiced = bucket.voiced.saturating_add(1);
            bucket.voiced_level_sum += i32::from(level);
            publisher.last_voiced = Some(now);
        }
    }

    /// Forgets `session` (it left the call or stopped publishing audio). If it was the active
    /// speaker, the next [`tick`](Self::tick) reports the change.
    pub fn remove(&mut self, session: SessionId) {
        self.publishers.remove(&session);
        self.top.retain(|&member| member != session);
    }

    /// Sets whether `session`'s microphone is muted. A muted publisher is never the active
    /// speaker nor in the top N, and its packets are ignored. Unmuting starts a fresh window and
    /// forwards the session for [`UNMUTE_GRACE`] so its first words are heard; repeating an
    /// unmute without a mute in between does not extend the grace.
    pub fn set_muted(&mut self, session: SessionId, muted: bool, now: Instant) {
        self.bucket_index(now);
        let publisher = self
            .publishers
            .entry(session)
            .or_insert_with(Publisher::new);
        if publisher.muted == muted {
            return;
        }
        publisher.muted = muted;
        publisher.clear_window();
        if muted {
            publisher.grace_until = None;
            publisher.in_top = false;
            self.top.retain(|&member| member != session);
        } else {
            publisher.grace_until = Some(now + UNMUTE_GRACE);
        }
    }

    /// Re-measures every publisher, updates the active speaker and the top-N set, and returns
    /// `Some(new)` when the active speaker changed (`Some(None)`: nobody is speaking any more).
    ///
    /// Call it about every [`BUCKET`] (100 ms); it is O(publishers) and does not allocate once
    /// warm.
    pub fn tick(&mut self, now: Instant) -> Option<Option<SessionId>> {
        let current = self.bucket_index(now);
        for publisher in self.publishers.values_mut() {
            publisher.measure = publisher.measure(current, now);
        }
        self.update_top(now);
        let previous = self.active;
        self.update_active(now);
        (self.active != previous).then_some(self.active)
    }

    /// The current active speaker, as last reported by [`tick`](Self::tick).
    pub fn active(&self) -> Option<SessionId> {
        self.active
    }

    /// The top-N set as of the last [`tick`](Self::tick), strongest first: at most `top_n`
    /// unmuted publishers. Empty when `top_n` is 0 (everybody is forwarded).
    #[cfg_attr(not(test), allow(dead_code))] // diagnostics and tests
    pub fn top(&self) -> &[SessionId] {
        &self.top
    }

    /// Whether `session` is forwarded only for having just unmuted (within [`UNMUTE_GRACE`],
    /// not in the top N): it may take an audio slot from the weakest top-N member.
    pub fn in_unmute_grace(&self, session: SessionId, now: Instant) -> bool {
        self.publishers.get(&session).is_some_and(|publisher| {
            !publisher.in_top && publisher.grace_until.is_some_and(|until| now < until)
        })
    }

    /// How weak `session` is as a holder of an audio slot: 0 for one in its unmute grace (never
    /// displaced), its top-N position + 1 (1 = strongest), or `usize::MAX` outside the top N.
    pub fn weakness(&self, session: SessionId, now: Instant) -> usize {
        if self.in_unmute_grace(session, now) {
            return 0;
        }
        self.top
            .iter()
            .position(|&member| member == session)
            .map_or(usize::MAX, |p| p + 1)
    }

    /// Whether `session`'s audio should be forwarded to the call: always when `top_n` is 0 or
    /// the call has at most `top_n` audio publishers (sessions known to the detector, muted or
    /// not); otherwise when `session` is in the top N or within [`UNMUTE_GRACE`] of unmuting.
    pub fn is_forwarded(&self, session: SessionId, now: Instant) -> bool {
        if self.top_n == 0 || self.publishers.len() <= self.top_n {
            return true;
        }
        self.publishers.get(&session).is_some_and(|publisher| {
            publisher.in_top || publisher.grace_until.is_some_and(|until| now < until)
        })
    }

    /// The bucket `now` falls in; the first time given sets the epoch. Times before the epoch
    /// fall in bucket 0.
    fn bucket_index(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        (now.saturating_duration_since(epoch).as_nanos() / BUCKET.as_nanos()) as u64
    }

    fn update_active(&mut self, now: Instant) {
        let incumbent = self
            .active
            .and_then(|id| self.publishers.get(&id))
            .filter(|publisher| !publisher.muted)
            .map(|publisher| publisher.measure);
        let Some(incumbent) = incumbent else {
            // Nobody holds the role (or its holder left or muted): the strongest speaker, if
            // any, takes it at once.
            self.active = self
                .publishers
                .iter()
                .filter(|(_, publisher)| publisher.measure.speaking)
                .min_by(|&(&a, pa), &(&b, pb)| rank(a, pa, b, pb))
                .map(|(&id, _)| id);
            self.active_quiet_since = None;
            for publisher in self.publishers.values_mut() {
                publisher.beating_active_since = None;
            }
            return;
        };

        let active = self.active;
        let mut successor: Option<(SessionId, Instant)> = None;
        let mut anyone_else_speaking = false;
        for (&id, publisher) in self.publishers.iter_mut() {
            if Some(id) == active {
                publisher.beating_active_since = None;
                continue;
            }
            anyone_else_speaking |= publisher.measure.speaking;
            if !publisher.measure.beats(incumbent) {
                publisher.beating_active_since = None;
                continue;
            }
            let since = *publisher.beating_active_since.get_or_insert(now);
            // Among those past the hold, the one that has beaten the speaker the longest wins.
            if now.saturating_duration_since(since) >= SWITCH_HOLD
                && successor.is_none_or(|(best_id, best_since)| (since, id) < (best_since, best_id))
            {
                successor = Some((id, since));
            }
        }

        if incumbent.speaking {
            self.active_quiet_since = None;
        } else {
            self.active_quiet_since.get_or_insert(now);
        }
        if let Some((id, _)) = successor {
            self.switch_active(Some(id));
        } else if !anyone_else_speaking
            && self
                .active_quiet_since
                .is_some_and(|since| now.saturating_duration_since(since) >= RELEASE_HOLD)
        {
            self.switch_active(None);
        }
    }

    fn switch_active(&mut self, to: Option<SessionId>) {
        self.active = to;
        self.active_quiet_since = None;
        for publisher in self.publishers.values_mut() {
            publisher.beating_active_since = None;
        }
    }

    fn update_top(&mut self, now: Instant) {
        if self.top_n == 0 {
            return;
        }
        let SpeakerDetector {
            top_n,
            publishers,
            top,
            scratch,
            ..
        } = self;
        // `remove` and `set_muted` keep `top` clean; this keeps the indexing below safe anyway.
        top.retain(|id| publishers.get(id).is_some_and(|p| !p.muted));

        // Free slots go to the strongest of the others, at once.
        if top.len() < *top_n {
            scratch.clear();
            scratch.extend(
                publishers
                    .iter()
                    .filter(|(_, p)| !p.muted && !p.in_top)
                    .map(|(&id, _)| id),
            );
            let free = *top_n - top.len();
            if scratch.len() > free {
                scratch.select_nth_unstable_by(free, by_rank(publishers));
                scratch.truncate(free);
            }
            for &id in scratch.iter() {
                set_in_top(publishers, id, true);
                top.push(id);
            }
        }
        top.sort_unstable_by(by_rank(publishers));

        // Challengers: everyone outside who beats the weakest member keeps a hold timer.
        scratch.clear();
        if let Some(weakest) = top.last().map(|id| publishers[id].measure) {
            for (&id, p) in publishers.iter_mut() {
                if p.muted || p.in_top || !p.measure.beats(weakest) {
                    p.beating_top_since = None;
                } else {
                    p.beating_top_since.get_or_insert(now);
                    scratch.push(id);
                }
            }
        }
        scratch.sort_unstable_by(by_rank(publishers));

        // Strongest challenger first against the weakest member, and so on up. A member who is
        // not speaking yields at once; a speaking one only to a challenger past its hold. (The
        // hold was timed against the weakest member, which anyone beating a stronger member
        // also beats.)
        let mut slot = top.len();
        for &challenger in scratch.iter() {
            let Some(target) = slot.checked_sub(1) else {
                break;
            };
            let incumbent = publishers[&top[target]].measure;
            let candidate = &publishers[&challenger];
            let held = candidate
                .beating_top_since
                .is_some_and(|since| now.saturating_duration_since(since) >= SWITCH_HOLD);
            if candidate.measure.beats(incumbent) && (!incumbent.speaking || held) {
                set_in_top(publishers, top[target], false);
                set_in_top(publishers, challenger, true);
                top[target] = challenger;
                slot = target;
            }
        }
        if slot < top.len() {
            top.sort_unstable_by(by_rank(publishers));
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;

    /// One packet every 20 ms (50 packets/s, Opus' default), as a publisher sends them.
    const PACKET: Duration = Duration::from_millis(20);

    /// What a participant sends at a moment: `(level dBov, voice activity flag)`, or nothing.
    type Voice = Box<dyn Fn(Duration) -> Option<(i8, Option<bool>)>>;

    /// A call in virtual time: participants send packets every 20 ms, the router ticks every
    /// 100 ms, and every active speaker change is recorded with its time.
    struct Call {
        detector: SpeakerDetector,
        base: Instant,
        elapsed: Duration,
        voices: Vec<(SessionId, Voice)>,
        changes: Vec<(Duration, Option<SessionId>)>,
    }

    impl Call {
        fn new(top_n: usize) -> Self {
            Call {
                detector: SpeakerDetector::new(top_n),
                base: Instant::now(),
                elapsed: Duration::ZERO,
                voices: Vec::new(),
                changes: Vec::new(),
            }
        }

        fn now(&self) -> Instant {
            self.base + self.elapsed
        }

        /// Gives session `id` a voice (replacing the one it had).
        fn voice(&mut self, id: u64, voice: Voice) {
            self.voices.retain(|(s, _)| *s != SessionId(id));
            self.voices.push((SessionId(id), voice));
        }

        /// Runs the call for `duration`.
        fn run(&mut self, duration: Duration) {
            let end = self.elapsed + duration;
            while self.elapsed < end {
                self.elapsed += PACKET;
                let now = self.now();
                for (session, voice) in &self.voices {
                    if let Some((level, vad)) = voice(self.elapsed) {
                        self.detector.observe(*session, level, vad, now);
                    }
                }
                if self.elapsed.as_millis() % BUCKET.as_millis() == 0 {
                    if let Some(active) = self.detector.tick(now) {
                        self.changes.push((self.elapsed, active));
                    }
                }
            }
        }

        /// Runs the call for `duration` and returns when (since the start of the call)
        /// `session` first entered the top N, if it did.
        fn run_until_in_top(&mut self, id: u64, duration: Duration) -> Option<Duration> {
            let end = self.elapsed + duration;
            while self.elapsed < end {
                self.run(BUCKET);
                if self.detector.top().contains(&SessionId(id)) {
                    return Some(self.elapsed);
                }
            }
            None
        }

        fn active_history(&self) -> Vec<Option<SessionId>> {
            self.changes.iter().map(|(_, active)| *active).collect()
        }

        fn forwarded(&self) -> Vec<u64> {
            let mut ids: Vec<u64> = self
                .voices
                .iter()
                .map(|(s, _)| *s)
                .filter(|s| self.detector.is_forwarded(*s, self.now()))
                .map(|s| s.0)
                .collect();
            ids.sort_unstable();
            ids
        }

        fn top(&self) -> Vec<u64> {
            let mut ids: Vec<u64> = self.detector.top().iter().map(|s| s.0).collect();
            ids.sort_unstable();
            ids
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Speech at `level`: 320 ms of voice, then an 80 ms gap between words (near room tone).
    fn speech(level: i8) -> Voice {
        Box::new(move |t| {
            let voiced = t.as_millis() % 400 < 320;
            Some((if voiced { level } else { -65 }, Some(voiced)))
        })
    }

    /// [`speech`] during `[from, to)`, digital silence otherwise.
    fn speech_between(level: i8, from: Duration, to: Duration) -> Voice {
        let talk = speech(level);
        Box::new(move |t| {
            if t >= from && t < to {
                talk(t)
            } else {
                Some((SILENCE_DBOV, Some(false)))
            }
        })
    }

    fn silence() -> Voice {
        Box::new(|_| Some((SILENCE_DBOV, Some(false))))
    }

    fn s(id: u64) -> Option<SessionId> {
        Some(SessionId(id))
    }

    #[test]
    fn loud_talker_becomes_active_within_a_second() {
        let mut call = Call::new(0);
        call.voice(1, speech(-20));
        call.voice(2, silence());
        call.voice(3, silence());
        call.run(ms(5000));
        assert_eq!(call.active_history(), [s(1)]);
        assert!(call.changes[0].0 <= ms(1000), "{:?}", call.changes);
    }

    #[test]
    fn quieter_talker_never_takes_over_while_the_loud_one_talks() {
        let mut call = Call::new(0);
        call.voice(1, speech(-20));
        call.voice(2, speech(-35));
        call.run(ms(20_000));
        assert_eq!(call.active_history(), [s(1)]);

        // Even when the quieter one was talking first.
        let mut call = Call::new(0);
        call.voice(2, speech(-35));
        call.voice(1, speech_between(-20, ms(3000), ms(60_000)));
        call.run(ms(20_000));
        assert_eq!(call.active_history(), [s(2), s(1)]);
        let (took_over, _) = call.changes[1];
        // ~0.5 s of talk to be speaking, then the hold.
        assert!(took_over >= ms(4000), "{:?}", call.changes);
    }

    #[test]
    fn active_speaker_follows_the_turn_and_clears_after_silence() {
        let mut call = Call::new(0);
        call.voice(1, speech_between(-20, ms(0), ms(5000)));
        // Quieter, so only the turn change (not loudness) can hand it the role.
        call.voice(2, speech_between(-30, ms(5000), ms(10_000)));
        call.run(ms(15_000));
        assert_eq!(call.active_history(), [s(1), s(2), None]);
        let (second, _) = call.changes[1];
        assert!(
            second > ms(5000) && second <= ms(6800),
            "{:?}",
            call.changes
        );
        let (cleared, _) = call.changes[2];
        assert!(
            cleared >= ms(10_000) + RELEASE_HOLD && cleared <= ms(12_500),
            "{:?}",
            call.changes
        );
    }

    #[test]
    fn two_talkers_alternating_every_300ms_do_not_flap() {
        for (level_1, level_2, phase) in [(-25, -25, 0), (-25, -27, 0), (-27, -25, 130)] {
            let mut call = Call::new(0);
            let turn = move |t: Duration| ((t.as_millis() as u64 + phase) / 300) % 2;
            call.voice(
                1,
                Box::new(move |t| Some((if turn(t) == 0 { level_1 } else { -127 }, None))),
            );
            call.voice(
                2,
                Box::new(move |t| Some((if turn(t) == 1 { level_2 } else { -127 }, None))),
            );
            call.run(ms(30_000));
            assert_eq!(
                call.changes.len(),
                1,
                "{level_1} {level_2}: {:?}",
                call.changes
            );
        }
    }

    #[test]
    fn background_noise_and_short_spikes_make_no_speaker() {
        let mut call = Call::new(2);
        // Steady room noise with the V bit clear (as str0m reports senders without VAD).
        call.voice(1, Box::new(|_| Some((-60, Some(false)))));
        // 100 ms clicks every 700 ms, not aligned with the buckets.
        call.voice(
            2,
            Box::new(|t| {
                let click = (t.as_millis() + 30) % 700 < 100;
                Some((if click { -5 } else { -60 }, Some(click)))
            }),
        );
        // 180 ms coughs every second, flagged as voice by the sender.
        call.voice(
            3,
            Box::new(|t| {
                let cough = (t.as_millis() + 50) % 1000 < 180;
                Some((if cough { -10 } else { -127 }, Some(cough)))
            }),
        );
        call.voice(4, silence());
        // A sender that sets the V bit on near-silence.
        call.voice(5, Box::new(|_| Some((-90, Some(true)))));
        call.run(ms(30_000));
        assert_eq!(call.changes, []);
    }

    #[test]
    fn loud_interjection_does_not_take_the_role() {
        let mut call = Call::new(0);
        call.voice(1, speech(-25));
        // A 10 dB louder "wait, what?" of 700 ms every 4 s.
        call.voice(
            2,
            Box::new(|t| {
                let burst = t >= ms(2000) && (t.as_millis() + 100) % 4000 < 700;
                Some((if burst { -15 } else { -127 }, Some(burst)))
            }),
        );
        call.run(ms(30_000));
        assert_eq!(call.active_history(), [s(1)]);
    }

    #[test]
    fn quiet_talker_counts_when_the_sender_flags_voice() {
        let mut call = Call::new(0);
        // -55 dBov is below the level threshold: only the V bit makes it speech.
        call.voice(
            1,
            Box::new(|t| Some((-55, Some(t.as_millis() % 400 < 320)))),
        );
        call.voice(2, Box::new(|_| Some((-55, Some(false)))));
        call.run(ms(3000));
        assert_eq!(call.active_history(), [s(1)]);
    }

    /// Ten participants, `top_n` 3; after a second of silence 3, 5 and 8 talk at -20, -25 and
    /// -30 dBov.
    fn call_of_ten_with_three_talkers() -> Call {
        let mut call = Call::new(3);
        for id in 1..=10 {
            call.voice(id, silence());
        }
        call.voice(3, speech_between(-20, ms(1000), ms(60_000)));
        call.voice(5, speech_between(-25, ms(1000), ms(60_000)));
        call.voice(8, speech_between(-30, ms(1000), ms(60_000)));
        call
    }

    #[test]
    fn top_n_forwards_exactly_the_talkers() {
        let mut call = call_of_ten_with_three_talkers();
        call.run(ms(1000));
        assert_eq!(call.forwarded(), [1, 2, 3]);
        // Slots held by silent participants go to talkers as soon as they are speaking.
        call.run(ms(800));
        assert_eq!(call.forwarded(), [3, 5, 8]);
        call.run(ms(3000));
        assert_eq!(call.top(), [3, 5, 8]);
        assert_eq!(call.forwarded(), [3, 5, 8]);
        assert_eq!(
            call.detector.top(),
            [SessionId(3), SessionId(5), SessionId(8)]
        );
    }

    #[test]
    fn top_n_is_filled_before_anyone_talks() {
        let mut call = Call::new(3);
        for id in 1..=10 {
            call.voice(id, silence());
        }
        call.run(ms(1000));
        // Nobody talks: three slots, deterministic, and the other seven stay unforwarded.
        assert_eq!(call.top(), [1, 2, 3]);
        assert_eq!(call.forwarded(), [1, 2, 3]);
    }

    #[test]
    fn louder_fourth_talker_displaces_the_quietest_after_the_hold() {
        let mut call = call_of_ten_with_three_talkers();
        call.run(ms(3000));
        let start = call.elapsed;
        call.voice(9, speech_between(-15, start, ms(60_000)));
        let entered = call
            .run_until_in_top(9, ms(5000))
            .expect("9 enters the top N");
        // ~0.5 s of talk to be speaking, then the hold.
        assert!(entered >= start + ms(1000), "{entered:?}");
        assert!(entered <= start + ms(1600), "{entered:?}");
        assert_eq!(call.top(), [3, 5, 9]);
        call.run(ms(10_000));
        assert_eq!(call.forwarded(), [3, 5, 9]);
    }

    #[test]
    fn fourth_talker_as_loud_as_the_quietest_member_does_not_displace_it() {
        let mut call = call_of_ten_with_three_talkers();
        call.run(ms(3000));
        call.voice(9, speech(-29));
        assert_eq!(call.run_until_in_top(9, ms(20_000)), None);
        assert_eq!(call.forwarded(), [3, 5, 8]);
    }

    #[test]
    fn unmuted_participant_is_forwarded_for_the_grace_period() {
        let mut call = call_of_ten_with_three_talkers();
        let now = call.now();
        call.detector.set_muted(SessionId(10), true, now);
        call.run(ms(3000));
        assert_eq!(call.forwarded(), [3, 5, 8]);

        let unmuted = call.now();
        call.detector.set_muted(SessionId(10), false, unmuted);
        call.run(ms(100));
        assert_eq!(call.forwarded(), [3, 5, 8, 10]);
        // A repeated unmute (no mute in between) does not extend the grace.
        call.run(ms(2000));
        let now = call.now();
        call.detector.set_muted(SessionId(10), false, now);
        call.run(UNMUTE_GRACE - ms(2200));
        assert_eq!(call.forwarded(), [3, 5, 8, 10]);
        call.run(ms(200));
        assert_eq!(call.now() - unmuted, UNMUTE_GRACE + ms(100));
        // Still silent after the grace: back to the three talkers.
        assert_eq!(call.forwarded(), [3, 5, 8]);
    }

    #[test]
    fn removed_session_is_forgotten() {
        let mut call = Call::new(3);
        call.voice(1, speech(-20));
        call.voice(2, speech(-30));
        call.voice(3, silence());
        call.voice(4, silence());
        call.run(ms(3000));
        assert_eq!(call.active_history(), [s(1)]);
        assert_eq!(call.forwarded(), [1, 2, 3]);

        call.voices.retain(|(id, _)| *id != SessionId(1));
        call.detector.remove(SessionId(1));
        assert!(!call.detector.top().contains(&SessionId(1)));
        call.run(ms(100));
        // The other talker takes over at once; three publishers left, all forwarded.
        assert_eq!(call.active_history(), [s(1), s(2)]);
        assert_eq!(call.forwarded(), [2, 3, 4]);

        // Coming back starts from an empty window: not a speaker on its first packets.
        call.voice(1, speech(-10));
        call.run(ms(200));
        assert_eq!(call.detector.active(), s(2));
        assert!(!call.detector.top().contains(&SessionId(1)));
    }

    #[test]
    fn muted_session_is_never_active() {
        let mut call = Call::new(1);
        call.voice(1, speech(-10));
        call.voice(2, speech(-40));
        call.voice(3, silence());
        let now = call.now();
        // Muted, yet its packets still carry loud levels.
        call.detector.set_muted(SessionId(1), true, now);
        call.run(ms(5000));
        assert_eq!(call.active_history(), [s(2)]);
        assert_eq!(call.top(), [2]);
        assert_eq!(call.forwarded(), [2]);

        // Unmuted, it takes over; muted again, it loses the role and its slot at once.
        let now = call.now();
        call.detector.set_muted(SessionId(1), false, now);
        call.run(ms(3000));
        assert_eq!(call.active_history(), [s(2), s(1)]);
        assert_eq!(call.top(), [1]);
        let now = call.now();
        call.detector.set_muted(SessionId(1), true, now);
        call.run(ms(100));
        assert_eq!(call.active_history(), [s(2), s(1), s(2)]);
        assert_eq!(call.top(), [2]);
    }

    #[test]
    fn small_calls_and_top_n_zero_forward_everybody() {
        let mut call = Call::new(0);
        for id in 1..=20 {
            call.voice(id, silence());
        }
        call.run(ms(1000));
        assert_eq!(call.forwarded().len(), 20);
        assert_eq!(call.top(), Vec::<u64>::new());

        let mut call = Call::new(3);
        call.voice(1, silence());
        call.voice(2, silence());
        call.voice(3, silence());
        call.run(ms(1000));
        assert_eq!(call.forwarded(), [1, 2, 3]);
    }
}
