//! Providers make and destroy the machines droplets run on, behind one interface.
//!
//! A provider knows nothing of enrollment or sessions: it creates a machine that boots with
//! the given user data, says when it is up and at which addresses, and destroys it. Every
//! machine carries the Flotilla droplet id (a DigitalOcean tag, a container label), so
//! [`Provider::find`] can recover one whose create answer was lost, and clean-up after a
//! failed create is `find` then `delete` on each.

use std::{fmt, net::Ipv4Addr, time::Duration};

use flotilla::DropletId;
use futures::future::BoxFuture;

/// The provider's own id for a machine (DigitalOcean: the droplet's integer id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloudId(pub String);

impl fmt::Display for CloudId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to create: the provider adds its own configured region, size, image and keys.
#[derive(Clone, PartialEq, Eq)]
pub struct CreateSpec {
    pub droplet: DropletId,
    pub account: String,
    /// The machine's name (and hostname).
    pub name: String,
    /// The `#cloud-config` from [`crate::fleet::provisioning::cloudinit::render`]; it holds a one-time token.
    /// Cloud machines boot with it.
    pub user_data: String,
    /// The agent's settings as its environment, and its image: what the user data starts,
    /// for providers that start the agent container themselves (`local`). Holds the token.
    pub agent_env: Vec<(&'static str, String)>,
    pub agent_image: String,
}

impl fmt::Debug for CreateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateSpec")
            .field("droplet", &self.droplet)
            .field("account", &self.account)
            .field("name", &self.name)
            .field("user_data", &format_args!("<{} bytes>", self.user_data.len()))
            .field("agent_env", &format_args!("<{} settings>", self.agent_env.len()))
            .field("agent_image", &self.agent_image)
            .finish()
    }
}

/// A running machine's IPv4 addresses; either may be absent (no public networking, no VPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Addresses {
    pub public_ipv4: Option<Ipv4Addr>,
    pub private_ipv4: Option<Ipv4Addr>,
}

/// Why a provider call failed. [`ProviderError::is_retryable`] says whether the same call
/// may succeed later; the client has already retried what was safe to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The request is wrong before it is sent (a name or tag the cloud would refuse).
    #[error("invalid request: {field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// The credential is missing, wrong or revoked: an operator must fix the config.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },
    #[error("not found: {what}")]
    NotFound { what: String },
    /// The cloud refused the request (4xx other than 401/404/429), with its own reason.
    #[error("refused ({status} {id}): {message}")]
    Refused { status: u16, id: String, message: String },
    /// Too many requests; `retry_after` is when the cloud said to come back, if it did.
    #[error("rate limited{}", retry_after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    /// A 5xx or a connection that failed: worth retrying.
    #[error("unavailable: {message}")]
    Unavailable { message: String },
    /// A request, or a wait for a machine to become active, took too long.
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
    /// The cloud answered something this client cannot read.
    #[error("unexpected answer: {message}")]
    Protocol { message: String },
}

impl ProviderError {
    /// Whether trying again later may succeed (rate limits, 5xx, timeouts, lost connections).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unavailable { .. } | Self::Timeout { .. })
    }
}

/// A place droplets run. Boxed futures keep it usable as `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + fmt::Debug {
    /// Creates a machine and returns its id at once; it is not running yet. Never makes two
    /// machines for one droplet knowingly: a create whose answer was lost is looked up first.
    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<CloudId, ProviderError>>;

    /// Waits until the machine is active and returns its addresses, or times out.
    fn wait_active<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<Addresses, ProviderError>>;

    /// Destroys the machine; one already gone counts as destroyed.
    fn delete<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Every machine this provider made for `droplet`, lowest id first.
    fn find(&self, droplet: DropletId) -> BoxFuture<'_, Result<Vec<CloudId>, ProviderError>>;
}

/// Exponential back-off with full jitter: a random delay up to `initial × 2^attempt`, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(self.max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_errors_are_retryable() {
        assert!(ProviderError::RateLimited { retry_after: None }.is_retryable());
        assert!(ProviderError::Unavailable { message: "502".into() }.is_retryable());
        assert!(ProviderError::Timeout { what: "get".into(), after: Duration::from_secs(1) }.is_retryable());
        assert!(!ProviderError::Unauthorized { message: "bad token".into() }.is_retryable());
        assert!(!ProviderError::NotFound { what: "droplet 1".into() }.is_retryable());
        let refused = ProviderError::Refused { status: 422, id: "unprocessable_entity".into(), message: "x".into() };
        assert!(!refused.is_retryable());
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(100 * 2u64.pow(attempt.min(4))).min(Duration::from_secs(1));
            assert!(backoff.delay(attempt) <= ceiling, "attempt {attempt}");
        }
    }

    #[test]
    fn user_data_stays_out_of_debug() {
        let spec = CreateSpec {
            droplet: DropletId::new(),
            account: "default".into(),
            name: "web-1".into(),
            user_data: "FLOTILLA_TOKEN=FLT1-secret".into(),
            agent_env: vec![("FLOTILLA_TOKEN", "FLT1-secret".into())],
            agent_image: "flotilla-agent:test".into(),
        };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("FLT1") && shown.contains("bytes"), "{shown}");
    }
}
