//! API keys: made here, shown once, stored as SHA-256 hashes (`store::api_keys`).

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    api::auth::scope::Scope,
    store::{self, KeyRow, NewKeyRow},
};

/// Every key starts with this, so a leaked one is easy to recognise (and to scan for).
pub const KEY_PREFIX: &str = "flk_";

/// How much of a key is stored and shown in clear, to tell keys apart.
const SHOWN_CHARS: usize = 12;

/// A new key, as shown once.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: Uuid,
    /// The secret. Shown to whoever created it, then never again.
    pub key: String,
    pub row: KeyRow,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "account: {0:?} is not an account name (lowercase letters, digits and '-', starting with a letter or digit, at most 63)"
    )]
    BadAccount(String),
    #[error("expires: must be in the future and at most 10 years away")]
    BadExpiry,
    #[error("name: at most 200 characters")]
    BadName,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub(super) fn valid_account(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

pub(super) fn digest(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Creates a key (and its account, when new).
pub async fn create(
    db: &PgPool,
    account: &str,
    scope: Scope,
    name: &str,
    expires_in: Option<Duration>,
) -> Result<NewKey, KeyError> {
    if !valid_account(account) {
        return Err(KeyError::BadAccount(account.to_owned()));
    }
    if name.chars().count() > 200 {
        return Err(KeyError::BadName);
    }
    let expires_at = match expires_in {
        None => None,
        Some(d) if d.is_zero() || d > Duration::from_secs(10 * 366 * 24 * 3600) => return Err(KeyError::BadExpiry),
        Some(d) => Some(Utc::now() + chrono::TimeDelta::from_std(d).map_err(|_| KeyError::BadExpiry)?),
    };
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let id = Uuid::now_v7();
    let new = NewKeyRow {
        id,
        account,
        name,
        scope: scope.as_str(),
        prefix: &key[..SHOWN_CHARS],
        sha256: digest(&key),
        expires_at,
    };
    let row = store::insert_api_key(db, new).await?;
    Ok(NewKey { id, key, row })
}
