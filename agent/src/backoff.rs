//! How long the agent waits before dialling the control plane again: exponential back-off
//! with full jitter (each delay uniform in [0, min(cap, base·2ⁿ)]), so a fleet that lost its
//! control plane together does not dial back together, with the control plane's
//! `Goodbye.reconnect_after` as a floor.

use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

/// A welcomed session that lasted this long starts the back-off over.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

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

/// How a session ended, as far as the next dial is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The control plane said goodbye, perhaps saying when to come back.
    Goodbye { reconnect_after: Option<Duration> },
    /// Refused, broken, timed out, or no credentials to dial with yet.
    Failed,
}

/// The reconnect decision: the wait before each dial, from how the sessions before it went.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    failures: u32,
}

impl Reconnect {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { backoff: Backoff::new(base, cap), failures: 0 }
    }

    /// The wait before dialling again after a session that started at `started`, was
    /// `welcomed` (or not) and ended so. A welcomed session that lasted
    /// [`HEALTHY_SESSION`] starts the back-off over. A goodbye's `reconnect_after` is a
    /// floor, honoured even above the cap, but never a way to dial sooner than back-off
    /// says after repeated failures; a goodbye after a welcome with no hint redials at once.
    pub fn after(&mut self, started: Instant, welcomed: bool, end: SessionEnd) -> Duration {
        if welcomed && started.elapsed() >= HEALTHY_SESSION {
            self.backoff.reset();
            self.failures = 0;
        }
        match end {
            SessionEnd::Goodbye { reconnect_after } => {
                if !welcomed {
                    self.failures = self.failures.saturating_add(1);
                }
                let backoff = if welcomed { Duration::ZERO } else { self.backoff.next_delay() };
                reconnect_after.unwrap_or(Duration::ZERO).max(backoff).max(Duration::from_millis(1))
            }
            SessionEnd::Failed => {
                self.failures = self.failures.saturating_add(1);
                self.backoff.next_delay()
            }
        }
    }

    /// Failures in a row (sessions that never got going), for logging.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The most the next failure can wait.
    pub fn ceiling(&self) -> Duration {
        self.backoff.ceiling()
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

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn failed_dials_wait_a_full_jitter_delay_under_a_doubling_cap() {
        tokio::time::pause();
        let mut reconnect = Reconnect::new(BASE, CAP);
        let mut waits = Vec::new();
        for n in 1..=40u32 {
            let ceiling = reconnect.ceiling();
            let started = Instant::now();
            let wait = reconnect.after(started, false, SessionEnd::Failed);
            assert!(wait <= ceiling && ceiling <= CAP, "failure {n}: {wait:?} above {ceiling:?}");
            assert_eq!(reconnect.failures(), n);
            waits.push(wait);
        }
        assert_eq!(reconnect.ceiling(), CAP);
        assert!(waits.iter().all(|w| *w <= CAP), "the cap bounds every wait");
        let distinct: std::collections::HashSet<_> = waits[10..].iter().collect();
        assert!(distinct.len() > 25, "capped waits are still drawn, not the cap each time");
        assert!(waits[10..].iter().any(|w| *w < CAP / 2), "full jitter: low waits too");
    }

    #[tokio::test]
    async fn the_servers_reconnect_after_is_a_floor_even_above_the_cap() {
        tokio::time::pause();
        let hint = |secs| SessionEnd::Goodbye { reconnect_after: Some(Duration::from_secs(secs)) };
        let mut reconnect = Reconnect::new(BASE, CAP);
        // After a welcome (a drain, a failover), exactly the hint: no back-off on top.
        assert_eq!(reconnect.after(Instant::now(), true, hint(30)), Duration::from_secs(30));
        assert_eq!(reconnect.failures(), 0);
        // A goodbye after a welcome without a hint: dial again at once.
        let none = SessionEnd::Goodbye { reconnect_after: None };
        assert_eq!(reconnect.after(Instant::now(), true, none), Duration::from_millis(1));

        // Turned away before Welcome, again and again: the hint is a floor, and once the
        // back-off ceiling passes it, the back-off can wait longer.
        let mut above = 0;
        for n in 1..=60u32 {
            let ceiling = reconnect.ceiling();
            let wait = reconnect.after(Instant::now(), false, hint(1));
            assert!(wait >= Duration::from_secs(1), "{wait:?} is under the hint");
            assert!(wait <= ceiling.max(Duration::from_secs(1)), "{wait:?} is above {ceiling:?}");
            assert_eq!(reconnect.failures(), n, "a goodbye before Welcome is a failure");
            above += usize::from(wait > Duration::from_secs(1));
        }
        assert!(above > 20, "back-off still applies under a hint: {above} of 60 waited longer");
        let long = reconnect.after(Instant::now(), false, hint(600));
        assert_eq!(long, Duration::from_secs(600), "a hint above the cap is honoured");
    }

    #[tokio::test]
    async fn only_a_welcomed_session_that_lasted_starts_the_back_off_over() {
        tokio::time::pause();
        let mut reconnect = Reconnect::new(BASE, Duration::from_secs(60));
        for _ in 0..5 {
            reconnect.after(Instant::now(), false, SessionEnd::Failed);
        }
        assert_eq!(reconnect.ceiling(), Duration::from_millis(3200));

        // Welcomed, but broke after 9 s: still failing.
        let started = Instant::now();
        tokio::time::advance(HEALTHY_SESSION - Duration::from_secs(1)).await;
        reconnect.after(started, true, SessionEnd::Failed);
        assert_eq!((reconnect.failures(), reconnect.ceiling()), (6, Duration::from_millis(6400)));

        // Lasted 10 s but never welcomed (a hung handshake): still failing.
        let started = Instant::now();
        tokio::time::advance(HEALTHY_SESSION).await;
        reconnect.after(started, false, SessionEnd::Failed);
        assert_eq!((reconnect.failures(), reconnect.ceiling()), (7, Duration::from_millis(12800)));

        // Welcomed and lasted 10 s: the next failure is the first again.
        let started = Instant::now();
        tokio::time::advance(HEALTHY_SESSION).await;
        let wait = reconnect.after(started, true, SessionEnd::Failed);
        assert!(wait <= BASE, "{wait:?}");
        assert_eq!((reconnect.failures(), reconnect.ceiling()), (1, BASE * 2));
    }

    #[test]
    fn repeated_failures_are_logged_less_often() {
        let logged: Vec<u32> = (1..=100).filter(|n| worth_logging(*n)).collect();
        assert_eq!(logged, [1, 2, 3, 4, 8, 16, 32, 64]);
    }
}
