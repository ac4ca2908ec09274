//! Who is calling the fleet API, and what they may touch.
//!
//! Every call carries `authorization: Bearer <key>` (gRPC metadata or the HTTP header:
//! the HTTP side passes its headers through unchanged). A key belongs to one account and
//! has a scope: `read` < `write` < `admin`. A key reaches only its own account's
//! droplets, deployments, commands, events and tokens; another account's id answers
//! `NotFound` exactly as a missing id does, so ids cannot be probed. `admin` keys reach
//! every account and manage API keys.

pub mod jwt;
pub mod keys;
pub mod scope;

pub use keys::{KEY_PREFIX, KeyError, NewKey, create};
pub use scope::Scope;

use keys::{digest, valid_account};

use std::{fmt, num::NonZeroU32, sync::Arc, time::Duration};

use chrono::Utc;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use sqlx::PgPool;
use tonic::{Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::store::{self};

/// `last_used_at` is written at most this often per key.
const LAST_USED_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: String,
    pub scope: Scope,
    /// Names the credential in audit trails (`requested_by`) and logs: never the key.
    pub principal: String,
}

/// What a caller can reach by id. Each is looked up by id in its table's `account`.
#[derive(Debug, Clone, Copy)]
pub enum Owned {
    Droplet,
    Deployment,
    Command,
    EnrollmentToken,
    ApiKey,
}

impl Owned {
    fn noun(self) -> &'static str {
        match self {
            Owned::Droplet => "droplet",
            Owned::Deployment => "deployment",
            Owned::Command => "command",
            Owned::EnrollmentToken => "enrollment token",
            Owned::ApiKey => "API key",
        }
    }

    fn table(self) -> store::Owned {
        match self {
            Owned::Droplet => store::Owned::Droplets,
            Owned::Deployment => store::Owned::Deployments,
            Owned::Command => store::Owned::Commands,
            Owned::EnrollmentToken => store::Owned::EnrollmentTokens,
            Owned::ApiKey => store::Owned::ApiKeys,
        }
    }

    /// The one answer for "missing" and "another account's".
    pub fn not_found(self, id: impl fmt::Display) -> Status {
        Status::not_found(format!("{} {id} not found", self.noun()))
    }
}

impl Caller {
    /// Refuses a call that needs more than this caller's scope.
    pub fn require(&self, scope: Scope, call: &str) -> Result<(), Status> {
        if self.scope >= scope {
            return Ok(());
        }
        Err(Status::permission_denied(format!("{call} needs the {scope} scope; this key has {}", self.scope)))
    }

    /// Whether this caller may see what `account` owns.
    pub fn sees(&self, account: &str) -> bool {
        self.scope == Scope::Admin || self.account == account
    }

    /// The account a list is limited to: the caller's own, or for admins the one asked
    /// for (all when none is).
    pub fn list_account(&self, asked: &str) -> Result<Option<String>, Status> {
        match (self.scope, asked) {
            (Scope::Admin, "") => Ok(None),
            (Scope::Admin, asked) => Ok(Some(asked.to_owned())),
            (_, "") => Ok(Some(self.account.clone())),
            (_, asked) if asked == self.account => Ok(Some(self.account.clone())),
            (_, asked) => Err(self.foreign_account(asked)),
        }
    }

    /// The account something new is created in: the caller's own unless an admin names
    /// another.
    pub fn create_account(&self, asked: &str) -> Result<String, Status> {
        Ok(self.list_account(asked)?.unwrap_or_else(|| self.account.clone()))
    }

    fn foreign_account(&self, asked: &str) -> Status {
        Status::permission_denied(format!(
            "account: this key belongs to account {:?} and cannot act for {asked:?}",
            self.account
        ))
    }

    /// `Ok` when `id` exists and this caller may see it; `NotFound` otherwise, whichever
    /// of the two it is.
    pub async fn reach(&self, db: &PgPool, what: Owned, id: Uuid) -> Result<(), Status> {
        let account = store::account_of(db, what.table(), id).await.map_err(database)?;
        match account {
            Some(account) if self.sees(&account) => Ok(()),
            _ => Err(what.not_found(id)),
        }
    }
}

fn database(error: sqlx::Error) -> Status {
    crate::api::status::db_error(error)
}

/// Checks the credentials of API calls, and limits each key's rate.
#[derive(Clone)]
pub struct ApiKeys {
    db: PgPool,
    limiter: Arc<DefaultKeyedRateLimiter<Uuid>>,
    jwt: Option<crate::api::auth::jwt::Verifier>,
    /// Accounts known to exist, so token callers do not write on every call.
    accounts: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys").finish_non_exhaustive()
    }
}

/// Requests per second per key, with bursts of twice that.
pub const DEFAULT_RATE: u32 = 100;

impl ApiKeys {
    pub fn new(db: PgPool, per_second: NonZeroU32, jwt: Option<crate::api::auth::jwt::Verifier>) -> Self {
        let burst = per_second.saturating_mul(NonZeroU32::MIN.saturating_add(1));
        let limiter = RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst));
        Self { db, limiter: Arc::new(limiter), jwt, accounts: Arc::default() }
    }

    fn limit(&self, key: Uuid) -> Result<(), Status> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| rate_limited(not_until.wait_time_from(governor::clock::DefaultClock::default().now())))
    }

    /// The caller of a request, from its `authorization` header.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let key = match bearer(metadata)? {
            Credential::Key(key) => key,
            Credential::Jwt(token) => return self.token_caller(token).await,
        };
        let row = store::api_key_by_digest(&self.db, &digest(key)).await.map_err(database)?;
        let Some(row) = row else {
            return Err(Status::unauthenticated("authorization: unknown API key"));
        };
        let now = Utc::now();
        if let Some(at) = row.revoked_at {
            return Err(Status::unauthenticated(format!("authorization: this API key was revoked at {at}")));
        }
        if let Some(at) = row.expires_at.filter(|at| *at <= now) {
            return Err(Status::unauthenticated(format!("authorization: this API key expired at {at}")));
        }
        let scope = Scope::parse(&row.scope).ok_or_else(|| Status::internal("an API key has an unknown scope"))?;
        self.limit(row.id)?;
        if row.last_used_at.is_none_or(|at| now - at > LAST_USED_EVERY) {
            if let Err(error) = store::touch_api_key(&self.db, row.id).await {
                tracing::warn!(%error, "could not record when an API key was last used");
            }
        }
        Ok(Caller { account: row.account, scope, principal: format!("key {} ({})", row.prefix, row.name) })
    }

    /// A Supabase user token's caller: the configured claim's account, the configured scope.
    async fn token_caller(&self, token: &str) -> Result<Caller, Status> {
        let Some(verifier) = &self.jwt else {
            return Err(Status::unauthenticated(format!(
                "authorization: not a Flotilla API key (they start with {KEY_PREFIX}), and this control plane accepts no JWTs"
            )));
        };
        let verified = verifier.verify(token).await?;
        if !valid_account(&verified.account) {
            return Err(Status::permission_denied(format!(
                "authorization: the token's account {:?} is not an account name",
                verified.account
            )));
        }
        // Each user has a rate of their own, kept under an id derived from the subject.
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest(&format!("jwt/{}", verified.subject))[..16]);
        self.limit(Uuid::from_bytes(id))?;
        let known = self.accounts.lock().map(|known| known.contains(&verified.account)).unwrap_or(false);
        if !known {
            store::ensure_account(&self.db, &verified.account).await.map_err(database)?;
            if let Ok(mut known) = self.accounts.lock() {
                known.insert(verified.account.clone());
            }
        }
        Ok(Caller {
            account: verified.account,
            scope: verifier.scope(),
            principal: format!("user {}", verified.subject),
        })
    }

    /// Forgets rate-limit state of keys not seen lately (call now and then).
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// `ResourceExhausted` with a `google.rpc.RetryInfo` the HTTP side turns into
/// `Retry-After`.
pub fn rate_limited(wait: Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    // Whole milliseconds, at least one: a zero delay would invite a hot loop.
    let wait = wait.max(Duration::from_millis(1));
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("rate limit: too many requests with this API key; retry in {} ms", wait.as_millis()),
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

/// What a bearer credential is.
#[derive(Debug, PartialEq, Eq)]
enum Credential<'a> {
    Key(&'a str),
    /// Three dot-separated parts: a JWT (a Supabase user token).
    Jwt(&'a str),
}

/// The credential in `authorization: Bearer <credential>`.
fn bearer(metadata: &MetadataMap) -> Result<Credential<'_>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "authorization: missing; send the header `authorization: Bearer <API key>`",
        ));
    };
    let malformed = || Status::unauthenticated("authorization: expected `Bearer <API key>`");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, key) = value.split_once(' ').ok_or_else(malformed)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() || key.contains(' ') {
        return Err(malformed());
    }
    if key.starts_with(KEY_PREFIX) {
        return Ok(Credential::Key(key));
    }
    if key.split('.').count() == 3 {
        return Ok(Credential::Jwt(key));
    }
    Err(Status::unauthenticated(format!(
        "authorization: not a Flotilla API key (they start with {KEY_PREFIX}) nor a JWT"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().expect("ascii"));
        map
    }

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer(&metadata("Bearer flk_abc")).ok(), Some(Credential::Key("flk_abc")));
        assert_eq!(bearer(&metadata("bearer flk_abc")).ok(), Some(Credential::Key("flk_abc")));
        assert_eq!(bearer(&metadata("Bearer a.b.c")).ok(), Some(Credential::Jwt("a.b.c")));
        for (value, says) in [
            ("flk_abc", "expected `Bearer"),
            ("Basic flk_abc", "expected `Bearer"),
            ("Bearer ", "expected `Bearer"),
            ("Bearer a b", "expected `Bearer"),
            ("Bearer abc", "not a Flotilla API key"),
        ] {
            let status = bearer(&metadata(value)).expect_err(value);
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{value}");
            assert!(status.message().contains(says), "{value}: {}", status.message());
        }
        let missing = bearer(&MetadataMap::new()).expect_err("missing");
        assert!(missing.message().contains("missing"));
    }

    #[test]
    fn scopes_are_ordered_and_accounts_fenced() {
        let write = Caller { account: "a".into(), scope: Scope::Write, principal: "t".into() };
        assert!(write.require(Scope::Read, "x").is_ok());
        assert!(write.require(Scope::Write, "x").is_ok());
        let denied = write.require(Scope::Admin, "CreateApiKey").expect_err("admin");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "CreateApiKey needs the admin scope; this key has write");
        assert!(write.sees("a") && !write.sees("b"));
        assert_eq!(write.list_account("").ok().flatten().as_deref(), Some("a"));
        assert_eq!(write.list_account("b").expect_err("b").code(), tonic::Code::PermissionDenied);
        let admin = Caller { scope: Scope::Admin, ..write };
        assert!(admin.sees("b"));
        assert_eq!(admin.list_account("").ok(), Some(None));
        assert_eq!(admin.create_account("").ok().as_deref(), Some("a"));
        assert_eq!(admin.create_account("b").ok().as_deref(), Some("b"));
    }

    #[test]
    fn account_names() {
        for good in ["a", "default", "team-7", "0x"] {
            assert!(valid_account(good), "{good}");
        }
        for bad in ["", "-a", "A", "a_b", "a b", &"a".repeat(64)] {
            assert!(!valid_account(bad), "{bad}");
        }
    }
}
