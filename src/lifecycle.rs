//! When a token may be used, when it is refreshed, and how long to wait
//! before trying again after a failure. Every function takes the time.
//!
//! * A token is **usable** until `expires - margin`, where the margin (the
//!   clock-skew allowance) is a quarter of its lifetime, capped at five minutes:
//!   5 min for a 24 h token, 2 s for an 8 s test token.
//! * It is **refreshed** from half of its lifetime on, as the Azure SDKs do, in
//!   the background; until the margin the old token keeps serving requests.
//!   The quarter of the lifetime between refresh and margin is the time the
//!   refresh has to succeed before any request has to wait.
//! * A time written into shared data that lies in the future was written
//!   before the wall clock stepped back; whatever wait it implies is void
//!   ([`crate::clock::stepped_back`]), so a step can cost an extra fetch but never a stall.

use crate::clock::stepped_back;
use crate::token::{FailureClass, Token};

/// The largest clock-skew margin, as in the Azure SDKs.
pub const MAX_MARGIN_MS: u64 = 5 * 60 * 1000;
/// First retry delay after a transient failure.
pub const BACKOFF_BASE_MS: u64 = 500;
/// Longest delay between retries of a transient failure.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// Longest delay between retries while no usable token exists: requests are
/// waiting, so a recovered endpoint must be noticed within seconds. Still
/// far below IMDS's budget (20 calls/s per VM).
pub const URGENT_CAP_MS: u64 = 4_000;
/// Delay between retries when the token endpoint refused the request (no
/// identity yet, ambiguous identity): an identity may be assigned a minute later.
pub const REFUSED_RETRY_MS: u64 = 30_000;

/// What became of a token the upstream rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// One replacement fetch was asked for; the token serves until it lands.
    Requested,
    /// A replacement for this token is already on its way.
    Pending,
    /// Asked recently (at most once per `invalidation_interval_ms`): asks
    /// again in this many ms.
    RateLimited { again_in_ms: u64 },
    /// Asked, and the endpoint answered with the very same token (managed
    /// identity endpoints cache tokens for hours): kept, not asked again for
    /// this many ms.
    SameTokenReturned { again_in_ms: u64 },
    /// A newer token already serves; nothing to do.
    AlreadyReplaced,
}

impl Token {
    pub fn lifetime_ms(&self) -> u64 {
        self.expires_at_ms.saturating_sub(self.obtained_at_ms)
    }

    /// The clock-skew allowance for this token.
    pub fn margin_ms(&self) -> u64 {
        (self.lifetime_ms() / 4).min(MAX_MARGIN_MS)
    }

    /// The first instant at which this token must no longer leave the proxy.
    pub fn unusable_at_ms(&self) -> u64 {
        self.expires_at_ms.saturating_sub(self.margin_ms())
    }

    pub fn usable(&self, now_ms: u64) -> bool {
        now_ms < self.unusable_at_ms()
    }

    /// From this instant a background refresh is due: half-life, or the
    /// poll time of a credential that names no expiry.
    pub fn refresh_at_ms(&self) -> u64 {
        let half_life = self.obtained_at_ms + self.lifetime_ms() / 2;
        self.refresh_after_ms
            .map_or(half_life, |at| at.min(half_life))
    }

    /// A token obtained "in the future" was timed by a clock that has since
    /// stepped back: refresh it, so its times are measured anew.
    pub fn refresh_due(&self, now_ms: u64) -> bool {
        now_ms >= self.refresh_at_ms() || stepped_back(self.obtained_at_ms, now_ms)
    }
}

/// Delay before attempt `attempt + 1` after `attempt` consecutive failures.
/// Transient failures back off exponentially with jitter (half to full delay,
/// so workers and proxies on one node spread out); refusals retry slowly.
pub fn retry_delay_ms(class: FailureClass, attempt: u32, seed: u64) -> u64 {
    let full = match class {
        FailureClass::Transient => {
            let exp = attempt.saturating_sub(1).min(16);
            BACKOFF_BASE_MS.saturating_mul(1 << exp).min(BACKOFF_CAP_MS)
        }
        FailureClass::Refused | FailureClass::Misconfigured => REFUSED_RETRY_MS,
    };
    let half = full / 2;
    half + crate::clock::splitmix64(seed) % (full - half + 1)
}

impl crate::store::Failure {
    /// When the next attempt may start: the backoff as scheduled while a
    /// usable token still serves requests, capped at [`URGENT_CAP_MS`] once
    /// none does. Refusals stay slow: requests do not wait on them. A failure
    /// recorded before a backward clock step holds nothing back.
    pub fn next_attempt_ms(&self, now_ms: u64, urgent: bool) -> u64 {
        if stepped_back(self.at_ms, now_ms) {
            return now_ms;
        }
        let scheduled = self.retry_at_ms;
        if urgent && self.cause.class() == FailureClass::Transient {
            scheduled.min(self.at_ms + URGENT_CAP_MS)
        } else {
            scheduled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Secret;

    fn token(obtained_s: u64, lifetime_s: u64) -> Token {
        Token {
            secret: Secret::new("t".into()),
            obtained_at_ms: obtained_s * 1000,
            expires_at_ms: (obtained_s + lifetime_s) * 1000,
            refresh_after_ms: None,
        }
    }

    #[test]
    fn day_long_token_is_usable_until_five_minutes_before_expiry_to_the_second() {
        let t = token(1_000, 86_400);
        let expiry = 1_000 + 86_400;
        assert!(t.usable((expiry - 301) * 1000));
        assert!(t.usable((expiry - 300) * 1000 - 1));
        assert!(!t.usable((expiry - 300) * 1000));
        assert!(!t.usable((expiry - 299) * 1000));
        assert!(!t.usable(expiry * 1000));
    }

    #[test]
    fn day_long_token_is_refreshed_from_half_its_lifetime() {
        let t = token(1_000, 86_400);
        assert!(!t.refresh_due((1_000 + 43_199) * 1000));
        assert!(t.refresh_due((1_000 + 43_200) * 1000));
    }

    #[test]
    fn short_token_keeps_a_quarter_of_its_life_as_margin() {
        let t = token(100, 8);
        assert_eq!(t.margin_ms(), 2_000);
        assert!(t.usable(105_999));
        assert!(!t.usable(106_000));
        assert!(!t.refresh_due(103_999));
        assert!(t.refresh_due(104_000));
    }

    #[test]
    fn refresh_always_comes_before_the_margin() {
        for lifetime in [1, 2, 8, 60, 600, 3_599, 86_399, 604_800] {
            let t = token(0, lifetime);
            assert!(t.refresh_at_ms() < t.unusable_at_ms(), "{lifetime}");
        }
    }

    #[test]
    fn expired_token_is_never_usable() {
        let t = token(0, 60);
        assert!(!t.usable(60_000));
        assert!(!t.usable(u64::MAX));
    }

    #[test]
    fn transient_backoff_grows_exponentially_with_jitter_up_to_the_cap() {
        for seed in 0..200 {
            for attempt in 1..=20 {
                let d = retry_delay_ms(FailureClass::Transient, attempt, seed);
                let full = (BACKOFF_BASE_MS << (attempt - 1).min(16)).min(BACKOFF_CAP_MS);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d} vs {full}"
                );
            }
        }
        let spread: std::collections::BTreeSet<u64> = (0..50)
            .map(|s| retry_delay_ms(FailureClass::Transient, 5, s))
            .collect();
        assert!(spread.len() > 10, "jitter spreads retries: {spread:?}");
    }

    #[test]
    fn without_a_usable_token_the_next_attempt_comes_within_the_urgent_cap() {
        use crate::store::Failure;
        use crate::token::FetchFailure;
        let failure = |cause| Failure {
            cause,
            attempts: 9,
            retry_at_ms: 1_000 + 30_000,
            at_ms: 1_000,
        };
        let transient = failure(FetchFailure::NoResponse);
        assert_eq!(transient.next_attempt_ms(1_000, false), 31_000);
        assert_eq!(
            transient.next_attempt_ms(1_000, true),
            1_000 + URGENT_CAP_MS
        );
        let refused = failure(FetchFailure::Status {
            status: 400,
            error: None,
            description: None,
            codes: Vec::new(),
        });
        assert_eq!(refused.next_attempt_ms(1_000, true), 31_000);
    }

    #[test]
    fn a_failure_recorded_before_a_backward_clock_step_holds_nothing_back() {
        use crate::store::Failure;
        use crate::token::FetchFailure;
        let failure = Failure {
            cause: FetchFailure::NoResponse,
            attempts: 3,
            retry_at_ms: 10_000_000 + 2_000,
            at_ms: 10_000_000,
        };
        // The clock jumps an hour back: the backoff would otherwise last an hour.
        let stepped = 10_000_000 - 3_600_000;
        assert_eq!(failure.next_attempt_ms(stepped, false), stepped);
        // A few hundred ms of disagreement between threads is not a step.
        assert_eq!(failure.next_attempt_ms(10_000_000 - 500, false), 10_002_000);
    }

    #[test]
    fn a_token_obtained_before_a_backward_clock_step_is_refreshed() {
        let t = token(10_000, 86_400);
        assert!(!t.refresh_due(10_001_000));
        assert!(t.refresh_due(10_000_000 - 3_600_000));
        assert!(
            t.usable(10_000_000 - 3_600_000),
            "and keeps serving meanwhile"
        );
    }

    #[test]
    fn refused_requests_are_retried_slowly() {
        for seed in 0..50 {
            let d = retry_delay_ms(FailureClass::Refused, 1, seed);
            assert!(d >= REFUSED_RETRY_MS / 2, "{d}");
        }
    }
}
