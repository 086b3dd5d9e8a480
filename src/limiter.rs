//! A budget for log lines: one per key per interval, so a storm of 401s, or
//! of requests no target takes, cannot flood the proxy's log. Per VM, time
//! passed in.

use std::collections::HashMap;

/// One log line per key (a diagnosis code, or another fixed word) per interval.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: HashMap<&'static str, u64>,
}

impl LogLimiter {
    pub const INTERVAL_MS: u64 = 10_000;

    pub fn allow(&mut self, diagnosis: &'static str, now_ms: u64) -> bool {
        match self.last.get(diagnosis) {
            Some(last) if now_ms < last + Self::INTERVAL_MS && *last <= now_ms => false,
            _ => {
                self.last.insert(diagnosis, now_ms);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::annotate::diagnosis;

    #[test]
    fn a_storm_of_one_diagnosis_logs_once_per_interval() {
        let mut limiter = LogLimiter::default();
        assert!(limiter.allow(diagnosis::ROLE_MISSING, 0));
        assert!(!limiter.allow(diagnosis::ROLE_MISSING, 9_999));
        assert!(
            limiter.allow(diagnosis::NETWORK_RULE, 5_000),
            "each diagnosis has its own budget"
        );
        assert!(limiter.allow(diagnosis::ROLE_MISSING, 10_000));
        // A clock that stepped back does not silence a diagnosis for long.
        assert!(limiter.allow(diagnosis::ROLE_MISSING, 5_000));
    }
}
