//! When the agent renews its certificate over the session: at a random point between half
//! and four fifths of its validity (so a fleet enrolled together does not renew together),
//! and again every [`RETRY`] while a request goes unanswered.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::identity::Held;

/// A request that brought no certificate back is sent again after this.
pub(super) const RETRY: Duration = Duration::from_secs(5);

/// When to renew the certificate, and the key waiting for its certificate.
pub(super) struct Renewal {
    at: Option<Instant>,
    pending: Option<rcgen::KeyPair>,
}

impl Renewal {
    /// Renewal of `held`, or none at all when it is off (fixed credentials).
    pub(super) fn new(enabled: bool, held: Option<&Held>) -> Self {
        let at = held.filter(|_| enabled).map(schedule);
        Self { at, pending: None }
    }

    /// Resolves when a renewal is due; never if renewal is off.
    pub(super) async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// A request went out: if no certificate comes back, ask again in a while.
    pub(super) fn sent(&mut self, key: rcgen::KeyPair) {
        self.pending = Some(key);
        self.sent_failed();
    }

    /// No request could be made or kept: try again in a while.
    pub(super) fn sent_failed(&mut self) {
        self.at = Some(Instant::now() + RETRY);
    }

    /// The key of the request in flight, once: a second certificate is nobody's.
    pub(super) fn take_key(&mut self) -> Option<rcgen::KeyPair> {
        self.pending.take()
    }

    /// A new certificate is kept: its own validity sets the next renewal.
    pub(super) fn renewed(&mut self, held: &Held) {
        self.at = Some(schedule(held));
    }
}

fn schedule(held: &Held) -> Instant {
    let fraction = rand::random_range(0.5..0.8);
    renew_at(held.not_before, held.not_after, fraction, SystemTime::now(), Instant::now())
}

/// The instant to renew a certificate valid from `not_before` to `not_after`: `fraction`
/// of the way through its validity, read on the wall clock (`wall_now`) and turned into an
/// instant of the monotonic one (`now`); at once when that point has passed.
pub(super) fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    wall_now: SystemTime,
    now: Instant,
) -> Instant {
    let validity = not_after.duration_since(not_before).unwrap_or_default();
    let at = not_before + validity.mul_f64(fraction);
    now + at.duration_since(wall_now).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use flotilla::DropletId;

    use super::*;
    use crate::identity::Credentials;

    const SECOND: Duration = Duration::from_secs(1);

    /// A certificate issued `age` ago, valid for `validity`.
    fn held(age: Duration, validity: Duration) -> Held {
        let not_before = SystemTime::now() - age;
        Held {
            credentials: Credentials { cert_pem: String::new(), key_pem: String::new(), ca_pem: String::new() },
            droplet: DropletId::new(),
            not_before,
            not_after: not_before + validity,
        }
    }

    /// How long `renewal.due()` takes on the paused clock.
    async fn wait(renewal: &Renewal) -> Duration {
        let started = Instant::now();
        renewal.due().await;
        started.elapsed()
    }

    /// `waited` is `expected`, give or take the timer's millisecond ticks.
    fn about(waited: Duration, expected: Duration) -> bool {
        waited >= expected && waited <= expected + Duration::from_millis(2)
    }

    #[test]
    fn renewal_is_the_drawn_fraction_of_the_validity_counted_from_now() {
        let (wall, now) = (SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000), Instant::now());
        let issued = wall - 100 * SECOND;
        let expires = issued + 1000 * SECOND;
        assert_eq!(renew_at(issued, expires, 0.5, wall, now), now + 400 * SECOND);
        assert_eq!(renew_at(issued, expires, 0.8, wall, now), now + 700 * SECOND);
        // Offline past the renewal point (but not the expiry): renew at once.
        assert_eq!(renew_at(wall - 900 * SECOND, wall + 100 * SECOND, 0.5, wall, now), now);
        // A certificate that ends before it begins is renewed at once, not never.
        assert_eq!(renew_at(issued, issued - SECOND, 0.5, wall, now), now);
    }

    #[tokio::test]
    async fn a_renewal_falls_due_between_half_and_four_fifths_of_the_validity() {
        tokio::time::pause();
        let mut waits = HashSet::new();
        for _ in 0..500 {
            let renewal = Renewal::new(true, Some(&held(Duration::ZERO, 1000 * SECOND)));
            let waited = wait(&renewal).await;
            // The wall clock runs on while the paused one does not: allow it a second.
            assert!(waited >= 499 * SECOND && waited < 800 * SECOND, "due after {waited:?}");
            waits.insert(waited.as_secs());
        }
        assert!(waits.len() > 200, "renewal times are spread: {} distinct of 500", waits.len());
    }

    #[tokio::test]
    async fn a_certificate_past_its_renewal_point_is_renewed_at_once() {
        tokio::time::pause();
        let renewal = Renewal::new(true, Some(&held(900 * SECOND, 1000 * SECOND)));
        let waited = wait(&renewal).await;
        assert!(about(waited, Duration::ZERO), "due after {waited:?}");
    }

    #[tokio::test]
    async fn fixed_credentials_are_never_renewed() {
        tokio::time::pause();
        let ten_years = Duration::from_secs(10 * 365 * 86_400);
        for renewal in [Renewal::new(false, Some(&held(900 * SECOND, 1000 * SECOND))), Renewal::new(true, None)] {
            assert!(tokio::time::timeout(ten_years, renewal.due()).await.is_err(), "renewal fell due");
        }
    }

    #[tokio::test]
    async fn an_unanswered_request_is_sent_again_until_a_certificate_comes() -> anyhow::Result<()> {
        tokio::time::pause();
        let mut renewal = Renewal::new(true, Some(&held(900 * SECOND, 1000 * SECOND)));
        renewal.due().await;
        renewal.sent(rcgen::KeyPair::generate()?);
        assert!(about(wait(&renewal).await, RETRY), "no certificate: ask again");
        renewal.sent(rcgen::KeyPair::generate()?);
        assert!(about(wait(&renewal).await, RETRY));
        renewal.sent_failed();
        assert!(about(wait(&renewal).await, RETRY), "no CSR could be made: try again");

        // The certificate comes: its own validity (an hour) sets the next renewal.
        assert!(renewal.take_key().is_some(), "the key of the request in flight");
        assert!(renewal.take_key().is_none(), "a second certificate finds no key");
        renewal.renewed(&held(Duration::ZERO, 3600 * SECOND));
        let waited = wait(&renewal).await;
        assert!(waited >= 1799 * SECOND && waited < 2880 * SECOND, "due after {waited:?}");
        Ok(())
    }
}
