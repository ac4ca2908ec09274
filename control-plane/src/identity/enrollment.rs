//! Enrollment: a droplet joins the fleet with a one-time token and the CA's pin.
//!
//! A token reads `FLT1-<ca sha256, 64 hex>-<token id, 32 hex>-<secret, 64 hex>`: one
//! string carries everything a new droplet needs (compare SwarmKit's
//! `SWMTKN-1-<ca digest>-<secret>`). The database keeps only SHA-256 of the 256-bit
//! secret, compared in constant time; the id finds the row.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use flotilla::DropletId;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    identity::pki::{Ca, CsrError, Issued},
    store::{self, TokenCreateError, TokenRow},
};

const PREFIX: &str = "FLT1";
/// Tokens live an hour unless asked otherwise, and never more than a day.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A parsed enrollment token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_sha256: String,
    pub id: Uuid,
    secret: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("ca_sha256", &self.ca_sha256).field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("token: not a Flotilla enrollment token (expected FLT1-<ca sha256>-<id>-<secret>)")]
pub struct MalformedToken;

impl Token {
    fn generate(ca_sha256: &str) -> Self {
        Self { ca_sha256: ca_sha256.to_owned(), id: Uuid::new_v4(), secret: rand::random() }
    }

    fn secret_hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }

    /// The string to hand to the droplet. Shown once.
    pub fn reveal(&self) -> String {
        format!("{PREFIX}-{}-{}-{}", self.ca_sha256, self.id.simple(), hex::encode(self.secret))
    }
}

impl FromStr for Token {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some(PREFIX), Some(ca), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedToken);
        };
        let hex64 = |t: &str| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !hex64(ca) || !hex64(secret) || id.len() != 32 {
            return Err(MalformedToken);
        }
        let id = Uuid::try_parse(id).map_err(|_| MalformedToken)?;
        let secret: [u8; 32] = hex::decode(secret).ok().and_then(|b| b.try_into().ok()).ok_or(MalformedToken)?;
        Ok(Self { ca_sha256: ca.to_owned(), id, secret })
    }
}

/// A token just created: the string (shown once) and what was stored.
pub struct Created {
    pub token: String,
    pub row: TokenRow,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("ttl: at most {max:?}, got {got:?}", max = MAX_TTL)]
    TtlTooLong { got: Duration },
    #[error("ttl: must be more than zero")]
    TtlZero,
    #[error(transparent)]
    Store(#[from] TokenCreateError),
}

/// Creates a token for `droplet` (a new droplet when `None`).
pub async fn create(
    db: &PgPool,
    ca: &Ca,
    account: &str,
    droplet: Option<DropletId>,
    name: &str,
    ttl: Duration,
) -> Result<Created, CreateError> {
    if ttl.is_zero() {
        return Err(CreateError::TtlZero);
    }
    if ttl > MAX_TTL {
        return Err(CreateError::TtlTooLong { got: ttl });
    }
    let token = Token::generate(&ca.sha256_pin());
    let droplet = droplet.unwrap_or_default();
    let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    let row =
        store::create_token(db, token.id, account, droplet.as_uuid(), name, &token.secret_hash(), expires_at).await?;
    Ok(Created { token: token.reveal(), row })
}

/// Why an enrollment was refused. Each names its remedy.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Malformed(#[from] MalformedToken),
    #[error("token: not recognised by this control plane")]
    Unknown,
    #[error("token: already used; create a new one with `flotilla-control-plane token create --droplet {0}`")]
    Used(Uuid),
    #[error("token: expired at {0}; create a new one with `flotilla-control-plane token create --droplet {1}`")]
    Expired(DateTime<Utc>, Uuid),
    #[error("token: revoked; create a new one with `flotilla-control-plane token create --droplet {0}`")]
    Revoked(Uuid),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Spends a token on a CSR: the token is used once, whatever happens at the same time on
/// any control plane (the row is locked for the check-and-spend). The certificate names
/// only the token's droplet and is recorded with its serial and expiry.
pub async fn enroll(
    db: &PgPool,
    ca: &Ca,
    token: &str,
    csr_pem: &str,
    validity: Duration,
) -> Result<(DropletId, Issued), EnrollError> {
    let token: Token = token.parse()?;
    let mut tx = db.begin().await?;
    let row = store::lock_token(&mut tx, token.id).await?.ok_or(EnrollError::Unknown)?;
    if !bool::from(row.secret_hash.as_slice().ct_eq(&token.secret_hash())) {
        return Err(EnrollError::Unknown);
    }
    if row.used_at.is_some() {
        return Err(EnrollError::Used(row.droplet_id));
    }
    if row.revoked_at.is_some() {
        return Err(EnrollError::Revoked(row.droplet_id));
    }
    if row.expires_at <= Utc::now() {
        return Err(EnrollError::Expired(row.expires_at, row.droplet_id));
    }
    let droplet = DropletId::from_uuid(row.droplet_id);
    let issued = sign_for(ca, csr_pem, droplet, validity)?;
    store::mark_token_used(&mut tx, token.id).await?;
    record(&mut tx, ca, droplet, &issued, "enrollment").await?;
    tx.commit().await?;
    Ok((droplet, issued))
}

/// Signs a CSR for `droplet`, backdated a little for clock skew.
pub fn sign_for(ca: &Ca, csr_pem: &str, droplet: DropletId, validity: Duration) -> Result<Issued, CsrError> {
    let now = OffsetDateTime::now_utc();
    ca.sign_csr(csr_pem, droplet, now - crate::identity::pki::backdate_for(validity), now + validity)
}

pub async fn record(
    conn: &mut sqlx::PgConnection,
    ca: &Ca,
    droplet: DropletId,
    issued: &Issued,
    reason: &str,
) -> sqlx::Result<()> {
    store::record_certificate(
        conn,
        &issued.serial,
        droplet.as_uuid(),
        ca.id,
        to_chrono(issued.not_before),
        to_chrono(issued.not_after),
        reason,
    )
    .await
}

pub fn to_chrono(t: OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_print_their_secret() {
        let token = Token::generate(&"ab".repeat(32));
        let text = token.reveal();
        assert!(text.starts_with("FLT1-"));
        assert_eq!(text.parse::<Token>(), Ok(token.clone()));
        let secret = hex::encode(token.secret);
        assert!(!format!("{token:?}").contains(&secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = Token::generate(&"cd".repeat(32)).reveal();
        let bad = [
            String::new(),
            "FLT1".into(),
            good.replacen("FLT1", "FLT2", 1),
            format!("{good}-extra"),
            good[..good.len() - 1].to_owned(),
            good.to_uppercase(),
        ];
        for b in bad {
            assert_eq!(b.parse::<Token>(), Err(MalformedToken), "{b}");
        }
    }
}
