//! Exponential back-off with full jitter (each delay uniform in [0, min(cap, base·2ⁿ)]),
//! so a fleet that lost its control plane together does not dial back together.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap: cap.max(base), attempt: 0 }
    }

    /// The ceiling of the next delay: base·2ⁿ, at most the cap.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, and one more attempt counted.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    /// After a healthy session: start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Whether to log the `n`th consecutive failure at info: the first few, then at powers
/// of two, so a long outage logs a handful of lines, not thousands.
pub fn worth_logging(n: u32) -> bool {
    n <= 3 || n.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_ceiling_capped_at_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(&ceilings[..7], &[100, 200, 400, 800, 1600, 3200, 5000]);
        assert!(ceilings[7..].iter().all(|c| *c == 5000));
    }

    #[test]
    fn reset_starts_over_and_huge_attempt_counts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..200 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(60));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
        assert_eq!(backoff.attempts(), 0);
    }

    #[test]
    fn jitter_is_full_not_a_fixed_schedule() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(backoff.next_delay());
        }
        assert!(seen.len() > 90, "delays are drawn, not fixed");
        assert!(seen.iter().any(|d| *d < Duration::from_millis(500)), "full jitter reaches low delays");
    }

    #[test]
    fn repeated_failures_are_logged_less_often() {
        let logged: Vec<u32> = (1..=100).filter(|n| worth_logging(*n)).collect();
        assert_eq!(logged, [1, 2, 3, 4, 8, 16, 32, 64]);
    }
}
