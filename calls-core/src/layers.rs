//! Simulcast and temporal layers: what a publisher sends (measured per layer), and how one
//! subscriber's bandwidth is shared among the video tracks it receives.
//!
//! The allocator is a pure function ([`allocate`]); the router applies its result with
//! hysteresis ([`UPGRADE_MARGIN`], [`UPGRADE_HOLD`]) and switches layers only at keyframes.

use std::time::{Duration, Instant};

use str0m::media::Rid;

/// Highest VP8/VP9 temporal layer id we keep statistics for (L1T3 uses 0..=2).
pub(crate) const MAX_TID: usize = 3;
/// "All temporal layers" (no temporal filtering).
pub(crate) const ALL_TIDS: u8 = u8::MAX;
/// Rates are measured over windows this long, then smoothed.
const METER_WINDOW: Duration = Duration::from_millis(500);
/// Weight of the newest window in the smoothed rate.
const METER_ALPHA: f64 = 0.5;

/// A simulcast layer not seen for this long (and not paused by us) is considered stopped by the
/// publisher (a browser dropping its top layer for CPU or bandwidth): subscribers move off it.
pub(crate) const LAYER_TIMEOUT: Duration = Duration::from_millis(1000);
/// An upgrade needs the estimate above the new allocation's cost times this …
pub(crate) const UPGRADE_MARGIN: f64 = 1.15;
/// … for at least this long. Downgrades happen at once.
pub(crate) const UPGRADE_HOLD: Duration = Duration::from_millis(1500);
/// A layer nobody has wanted for this long is paused at the publisher (dynacast) …
pub(crate) const DYNACAST_PAUSE_AFTER: Duration = Duration::from_secs(2);
/// Audio reserved per forwarded audio stream when sharing a subscriber's bandwidth (Opus with
/// headers, SRTP and TWCC overhead).
pub(crate) const AUDIO_RESERVE_BPS: u64 = 50_000;
/// Assumed layer bitrates (low → high) until a layer has been measured.
const DEFAULT_LAYER_BPS: [u64; 3] = [150_000, 500_000, 1_500_000];

/// Bytes and frames per temporal layer over a window, smoothed into rates.
#[derive(Debug, Clone)]
pub(crate) struct RateMeter {
    window_start: Option<Instant>,
    bytes: [u64; MAX_TID + 1],
    frames: u32,
    /// Smoothed bits per second per temporal layer (index = TID; non-temporal streams use 0).
    bps: [f64; MAX_TID + 1],
    fps: f64,
    measured: bool,
}

impl RateMeter {
    pub fn new() -> Self {
        RateMeter {
            window_start: None,
            bytes: [0; MAX_TID + 1],
            frames: 0,
            bps: [0.0; MAX_TID + 1],
            fps: 0.0,
            measured: false,
        }
    }

    /// Counts one packet (`bytes` of payload plus headers) of temporal layer `tid`.
    pub fn record(&mut self, bytes: usize, tid: u8, end_of_frame: bool, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= METER_WINDOW {
            self.close_window(elapsed);
            self.window_start = Some(now);
        }
        let tid = usize::from(tid).min(MAX_TID);
        self.bytes[tid] += bytes as u64;
        if end_of_frame {
            self.frames += 1;
        }
    }

    fn close_window(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let alpha = if self.measured { METER_ALPHA } else { 1.0 };
        for (rate, bytes) in self.bps.iter_mut().zip(self.bytes.iter_mut()) {
            let now_bps = *bytes as f64 * 8.0 / secs;
            *rate = alpha * now_bps + (1.0 - alpha) * *rate;
            *bytes = 0;
        }
        self.fps = alpha * f64::from(self.frames) / secs + (1.0 - alpha) * self.fps;
        self.frames = 0;
        self.measured = true;
    }

    /// Whether at least one window has been measured.
    pub fn measured(&self) -> bool {
        self.measured
    }

    /// Smoothed bits per second of temporal layers `0..=tid` (all layers for [`ALL_TIDS`]).
    pub fn bps_up_to(&self, tid: u8) -> u64 {
        let last = usize::from(tid).min(MAX_TID);
        self.bps[..=last].iter().sum::<f64>() as u64
    }

    /// Smoothed frames per second.
    #[cfg(test)]
    pub fn fps(&self) -> f64 {
        self.fps
    }
}

/// One simulcast layer (or the only layer of a non-simulcast video track) as received.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// `None` for a non-simulcast track.
    pub rid: Option<Rid>,
    /// Order among the track's layers: 0 = lowest resolution.
    pub rank: u8,
    pub last_seen: Instant,
    pub meter: RateMeter,
    /// Highest temporal layer id seen (0 = no temporal layering).
    pub max_tid: u8,
    /// Keyframe request throttling for this layer.
    pub last_keyframe_request: Option<Instant>,
    /// Dynacast: whether the publisher was last told to send this layer.
    pub sending: bool,
    /// Dynacast: since when no subscriber needs this layer.
    pub unneeded_since: Option<Instant>,
}

impl Layer {
    pub fn new(rid: Option<Rid>, rank: u8, now: Instant) -> Self {
        Layer {
            rid,
            rank,
            last_seen: now,
            meter: RateMeter::new(),
            max_tid: 0,
            last_keyframe_request: None,
            sending: true,
            unneeded_since: None,
        }
    }

    /// Whether a subscriber can be given this layer: it is arriving, or we paused it ourselves
    /// (and can resume it).
    pub fn available(&self, now: Instant) -> bool {
        !self.sending || now.saturating_duration_since(self.last_seen) < LAYER_TIMEOUT
    }

    /// Bitrate of temporal layers `0..=tid`: measured, or assumed by rank until measured.
    pub fn bps(&self, tid: u8) -> u64 {
        if self.meter.measured() {
            self.meter.bps_up_to(tid).max(1)
        } else {
            let full = DEFAULT_LAYER_BPS[usize::from(self.rank).min(2)];
            match tid {
                0 if self.max_tid > 0 => full / 4,
                1 if self.max_tid > 1 => full / 2,
                _ => full,
            }
        }
    }
}

/// Where a simulcast rid sits among its track's layers. Browsers name them low to high
/// (q/h/f, l/m/h, 0/1/2); unknown names rank by first appearance after the known ones.
pub(crate) fn rid_rank(rid: &Rid) -> u8 {
    match &**rid {
        "q" | "l" | "0" | "low" | "lo" => 0,
        "h" | "m" | "1" | "mid" | "medium" => 1,
        "f" | "2" | "high" | "full" | "hi" => 2,
        _ => 3,
    }
}

/// One choice for a track: a spatial layer and the highest temporal layer forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    /// Index into the track's `layers`.
    pub layer: usize,
    /// Highest TID forwarded ([`ALL_TIDS`] = everything).
    pub tid: u8,
    pub bps: u64,
}

/// The choices of one track, cheapest first: the lowest spatial layer with fewer temporal
/// layers (for a subscriber that cannot even take its full frame rate), then each spatial layer
/// in full. Layers that are not [`Layer::available`] are left out.
pub(crate) fn choices(layers: &[Layer], now: Instant, out: &mut Vec<Choice>) {
    out.clear();
    let mut first = true;
    for (i, layer) in layers.iter().enumerate() {
        if !layer.available(now) {
            continue;
        }
        if first && layer.max_tid > 0 {
            for tid in 0..layer.max_tid {
                out.push(Choice {
                    layer: i,
                    tid,
                    bps: layer.bps(tid),
                });
            }
        }
        first = false;
        out.push(Choice {
            layer: i,
            tid: ALL_TIDS,
            bps: layer.bps(ALL_TIDS),
        });
    }
}

/// What the allocator needs to know about one video track a subscriber receives.
#[derive(Debug, Clone)]
pub(crate) struct Want {
    /// Higher goes first: screen share 3, the active speaker's camera 2, other cameras 1.
    pub priority: u8,
    /// The track's choices, cheapest first (see [`choices`]).
    pub choices: Vec<Choice>,
    /// The highest choice index the subscriber accepts (its `max_layer` preference).
    pub max: Option<usize>,
    /// The subscriber paused this track.
    pub paused: bool,
}

/// Shares `budget` (bits per second) among tracks: every track the subscriber has not paused
/// gets at least its cheapest choice (the lowest layer, at the lowest frame rate if it has
/// temporal layers): a starved link gets thin video, never a black tile. The remaining budget
/// then raises tracks one step at a time, round-robin within a priority, higher priorities
/// first. Returns one choice index per track (`None` = send nothing).
pub(crate) fn allocate(budget: u64, wants: &[Want]) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(wants[i].priority));
    let mut alloc: Vec<Option<usize>> = vec![None; wants.len()];
    let mut remaining = budget;
    for &i in &order {
        let w = &wants[i];
        let Some(cheapest) = w.choices.first() else {
            continue;
        };
        if w.paused {
            continue;
        }
        alloc[i] = Some(0);
        remaining = remaining.saturating_sub(cheapest.bps);
    }
    let mut start = 0;
    while start < order.len() {
        let priority = wants[order[start]].priority;
        let end = order[start..]
            .iter()
            .position(|&i| wants[i].priority != priority)
            .map_or(order.len(), |n| start + n);
        loop {
            let mut raised = false;
            for &i in &order[start..end] {
                let w = &wants[i];
                let Some(k) = alloc[i] else { continue };
                let top = w.max.unwrap_or(usize::MAX).min(w.choices.len() - 1);
                if k >= top {
                    continue;
                }
                let step = w.choices[k + 1].bps.saturating_sub(w.choices[k].bps);
                if step <= remaining {
                    remaining -= step;
                    alloc[i] = Some(k + 1);
                    raised = true;
                }
            }
            if !raised {
                break;
            }
        }
        start = end;
    }
    alloc
}

/// The highest choice index whose spatial layer rank is at most `max_layer`.
pub(crate) fn max_choice(
    layers: &[Layer],
    choices: &[Choice],
    max_layer: Option<u8>,
) -> Option<usize> {
    let max_layer = max_layer?;
    choices
        .iter()
        .rposition(|c| layers.get(c.layer).is_some_and(|l| l.rank <= max_layer))
        .or(Some(0))
}

/// The temporal layer id of a VP8 packet and whether it starts a picture (S=1, PID=0), from
/// the RFC 7741 payload descriptor. `None` for the TID when the descriptor has no T bit.
pub(crate) fn vp8_temporal(payload: &[u8]) -> (Option<u8>, bool) {
    let Some(&first) = payload.first() else {
        return (None, false);
    };
    let starts = first & 0x10 != 0 && first & 0x07 == 0;
    if first & 0x80 == 0 {
        return (None, starts);
    }
    let Some(&ext) = payload.get(1) else {
        return (None, starts);
    };
    let mut at = 2;
    if ext & 0x80 != 0 {
        match payload.get(at) {
            Some(b) if b & 0x80 != 0 => at += 2,
            Some(_) => at += 1,
            None => return (None, starts),
        }
    }
    if ext & 0x40 != 0 {
        at += 1;
    }
    if ext & 0x20 == 0 {
        return (None, starts);
    }
    (payload.get(at).map(|b| b >> 6), starts)
}

/// The temporal layer id of a VP9 packet and whether it starts a picture (B=1 on spatial
/// layer 0), from the payload descriptor (draft-ietf-payload-vp9): `None` for the TID when
/// the descriptor carries no layer indices (L=0).
pub(crate) fn vp9_temporal(payload: &[u8]) -> (Option<u8>, bool) {
    let Some(&first) = payload.first() else {
        return (None, false);
    };
    let has_picture_id = first & 0x80 != 0;
    let has_layers = first & 0x20 != 0;
    let begins = first & 0x08 != 0;
    let mut at = 1;
    if has_picture_id {
        match payload.get(at) {
            Some(b) if b & 0x80 != 0 => at += 2,
            Some(_) => at += 1,
            None => return (None, false),
        }
    }
    if !has_layers {
        return (None, begins);
    }
    let Some(&layers) = payload.get(at) else {
        return (None, false);
    };
    let tid = layers >> 5;
    let sid = (layers >> 1) & 0x07;
    (Some(tid), begins && sid == 0)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for virtual time
mod tests {
    use super::*;

    fn want(priority: u8, rates: &[u64]) -> Want {
        Want {
            priority,
            choices: rates
                .iter()
                .enumerate()
                .map(|(layer, &bps)| Choice {
                    layer,
                    tid: ALL_TIDS,
                    bps,
                })
                .collect(),
            max: None,
            paused: false,
        }
    }

    const CAMERA: [u64; 3] = [150_000, 500_000, 1_500_000];

    #[test]
    fn plenty_of_bandwidth_gives_every_track_its_top_layer() {
        let wants = [want(1, &CAMERA), want(1, &CAMERA)];
        assert_eq!(allocate(10_000_000, &wants), vec![Some(2), Some(2)]);
    }

    #[test]
    fn a_starved_link_gets_every_track_at_its_lowest() {
        let wants = [want(1, &CAMERA), want(3, &CAMERA)];
        assert_eq!(allocate(100_000, &wants), vec![Some(0), Some(0)]);
        // What is left goes to the most important one first.
        assert_eq!(allocate(700_000, &wants), vec![Some(0), Some(1)]);
    }

    #[test]
    fn screen_share_is_raised_before_cameras() {
        let wants = [want(1, &CAMERA), want(3, &[300_000, 1_200_000])];
        // 1.2 M for the screen at full, 150 k for the camera at its lowest.
        assert_eq!(allocate(1_400_000, &wants), vec![Some(0), Some(1)]);
    }

    #[test]
    fn equal_priorities_share_round_robin() {
        let wants = [want(1, &CAMERA), want(1, &CAMERA)];
        assert_eq!(allocate(1_100_000, &wants), vec![Some(1), Some(1)]);
        assert_eq!(allocate(700_000, &wants), vec![Some(1), Some(0)]);
    }

    #[test]
    fn preferences_cap_and_pause() {
        let mut capped = want(1, &CAMERA);
        capped.max = Some(0);
        let mut paused = want(1, &CAMERA);
        paused.paused = true;
        assert_eq!(
            allocate(10_000_000, &[capped, paused, want(1, &CAMERA)]),
            vec![Some(0), None, Some(2)]
        );
    }

    #[test]
    fn temporal_choices_come_first_on_the_lowest_layer() {
        let now = Instant::now();
        let mut layers = vec![
            Layer::new(Some(Rid::from("q")), 0, now),
            Layer::new(Some(Rid::from("f")), 2, now),
        ];
        layers[0].max_tid = 2;
        let mut out = Vec::new();
        choices(&layers, now, &mut out);
        let got: Vec<(usize, u8)> = out.iter().map(|c| (c.layer, c.tid)).collect();
        assert_eq!(got, vec![(0, 0), (0, 1), (0, ALL_TIDS), (1, ALL_TIDS)]);
        assert!(out.windows(2).all(|w| w[0].bps <= w[1].bps));
        // A stalled layer (not seen for a while, not paused by us) is no choice.
        let later = now + LAYER_TIMEOUT + Duration::from_millis(1);
        layers[0].last_seen = later;
        choices(&layers, later, &mut out);
        assert!(out.iter().all(|c| c.layer == 0));
        // A layer we paused stays a choice.
        layers[1].sending = false;
        choices(&layers, later, &mut out);
        assert!(out.iter().any(|c| c.layer == 1));
    }

    #[test]
    fn meter_measures_rate_per_temporal_layer() {
        let t0 = Instant::now();
        let mut m = RateMeter::new();
        for i in 0..=60u64 {
            let at = t0 + Duration::from_millis(i * 1000 / 30);
            m.record(1000, (i % 2) as u8, true, at);
        }
        // 30 frames/s of 1000 bytes, half of them TID 0: 120 kbit/s each.
        assert!(m.measured());
        let t0_bps = m.bps_up_to(0);
        let all = m.bps_up_to(ALL_TIDS);
        assert!((100_000..140_000).contains(&t0_bps), "{t0_bps}");
        assert!((200_000..280_000).contains(&all), "{all}");
        assert!((25.0..35.0).contains(&m.fps()), "{}", m.fps());
    }

    #[test]
    fn vp9_temporal_ids_are_read_from_the_descriptor() {
        // I=1 (15-bit picture id), L=1, B=1; TID 2, SID 0; TL0PICIDX.
        let p = [0xA8, 0x80, 0x11, 0b0100_0000, 0x07, 0x00];
        assert_eq!(vp9_temporal(&p), (Some(2), true));
        // SID 1 does not start the picture.
        let p = [0xA8, 0x80, 0x11, 0b0100_0010, 0x07, 0x00];
        assert_eq!(vp9_temporal(&p), (Some(2), false));
        // No layer indices.
        assert_eq!(vp9_temporal(&[0x88, 0x05, 0x00]), (None, true));
        assert_eq!(vp9_temporal(&[0xA8]), (None, false));
        assert_eq!(vp9_temporal(&[]), (None, false));
    }

    #[test]
    fn vp8_temporal_ids_are_read_from_the_descriptor() {
        // X=1 S=1; I=1 L=1 T=1; 15-bit picture id; TL0PICIDX; TID=2 Y=1.
        let p = [0x90, 0xE0, 0x80, 0x05, 0x07, 0b1010_0000, 0x00];
        assert_eq!(vp8_temporal(&p), (Some(2), true));
        // No T bit.
        assert_eq!(vp8_temporal(&[0x90, 0x80, 0x05, 0x00]), (None, true));
        // No extension, continuation packet.
        assert_eq!(vp8_temporal(&[0x00, 0x00]), (None, false));
        // Truncated.
        assert_eq!(vp8_temporal(&[0x90, 0xE0, 0x80]), (None, true));
        assert_eq!(vp8_temporal(&[]), (None, false));
    }
}
