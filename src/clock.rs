//! Time, as the filter sees it: a wall clock that may step backwards (NTP, a
//! VM resumed from a snapshot), passed in as milliseconds since the epoch.
//!
//! Waits that belong to one VM (parked requests, the call in flight) run on
//! [`Monotonic`], derived from the wall clock; a time another VM wrote into
//! shared data that lies in the future was written before a backward step,
//! and whatever wait it implies is void ([`stepped_back`]): a step can cost an
//! extra fetch, never a stall.

/// How far in the future a recorded time may lie (threads reading the clock
/// a moment apart) before it means the clock stepped back.
pub const CLOCK_STEP_TOLERANCE_MS: u64 = 1_000;

/// Was `recorded_ms` written under a wall clock that has since stepped back?
pub fn stepped_back(recorded_ms: u64, now_ms: u64) -> bool {
    recorded_ms > now_ms.saturating_add(CLOCK_STEP_TOLERANCE_MS)
}

/// splitmix64: one pure step from a seed to well-spread bits (retry jitter,
/// assertion ids). Not for secrets.
pub fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A clock that never runs backwards, derived from a wall clock that may:
/// it advances by every forward step of the wall clock and ignores backward
/// ones, so durations measured on it stay true across a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Monotonic {
    last_wall_ms: Option<u64>,
    now_ms: u64,
}

impl Monotonic {
    /// Advance to the wall clock's `wall_ms`; the monotonic time.
    pub fn observe(&mut self, wall_ms: u64) -> u64 {
        match self.last_wall_ms {
            None => self.now_ms = wall_ms,
            Some(last) => self.now_ms += wall_ms.saturating_sub(last),
        }
        self.last_wall_ms = Some(wall_ms);
        self.now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_ignores_backward_steps_and_keeps_forward_ones() {
        let mut clock = Monotonic::default();
        assert_eq!(clock.observe(10_000), 10_000);
        assert_eq!(clock.observe(4_000), 10_000, "a step back adds nothing");
        assert_eq!(
            clock.observe(4_500),
            10_500,
            "forward steps count from there"
        );
    }

    #[test]
    fn a_time_recorded_beyond_the_tolerance_means_the_clock_stepped_back() {
        assert!(!stepped_back(1_500, 1_000));
        assert!(stepped_back(2_001, 1_000));
    }
}
