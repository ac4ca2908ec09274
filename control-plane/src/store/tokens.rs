//! `enrollment_tokens`: one-time tokens, stored as hashes.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenRow {
    pub id: Uuid,
    pub account: String,
    pub droplet_id: Uuid,
    pub name: String,
    pub secret_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TokenCreateError {
    #[error("droplet {0} belongs to another account")]
    OtherAccount(Uuid),
    #[error("account {0:?} does not exist")]
    NoAccount(String),
    #[error("droplet {0} is being deleted")]
    Deleting(Uuid),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Stores a token for `droplet`, creating the droplet (`pending`) if it is new.
pub async fn create_token(
    db: &PgPool,
    id: Uuid,
    account: &str,
    droplet: Uuid,
    name: &str,
    secret_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<TokenRow, TokenCreateError> {
    let mut tx = db.begin().await?;
    let exists: Option<bool> =
        sqlx::query_scalar("SELECT true FROM accounts WHERE name = $1").bind(account).fetch_optional(&mut *tx).await?;
    if exists.is_none() {
        return Err(TokenCreateError::NoAccount(account.to_owned()));
    }
    sqlx::query("INSERT INTO droplets (id, account, status) VALUES ($1, $2, 'pending') ON CONFLICT (id) DO NOTHING")
        .bind(droplet)
        .bind(account)
        .execute(&mut *tx)
        .await?;
    let (owner, status): (String, String) =
        sqlx::query_as("SELECT account, status FROM droplets WHERE id = $1 FOR UPDATE")
            .bind(droplet)
            .fetch_one(&mut *tx)
            .await?;
    if owner != account {
        return Err(TokenCreateError::OtherAccount(droplet));
    }
    if status == "deleting" {
        return Err(TokenCreateError::Deleting(droplet));
    }
    let row = sqlx::query_as(
        "INSERT INTO enrollment_tokens (id, account, droplet_id, name, secret_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(id)
    .bind(account)
    .bind(droplet)
    .bind(name)
    .bind(secret_hash)
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

pub async fn list_tokens(db: &PgPool, account: Option<&str>) -> sqlx::Result<Vec<TokenRow>> {
    sqlx::query_as(
        "SELECT * FROM enrollment_tokens WHERE ($1::text IS NULL OR account = $1) ORDER BY created_at DESC, id",
    )
    .bind(account)
    .fetch_all(db)
    .await
}

/// Revokes a token that has not been used. Returns whether one was revoked.
pub async fn revoke_token(db: &PgPool, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE enrollment_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL AND used_at IS NULL",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Locks a token for the rest of `tx`: concurrent enrollments with it wait here.
pub async fn lock_token(tx: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<Option<TokenRow>> {
    sqlx::query_as("SELECT * FROM enrollment_tokens WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(tx).await
}

pub async fn mark_token_used(tx: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE enrollment_tokens SET used_at = now() WHERE id = $1").bind(id).execute(tx).await?;
    Ok(())
}

pub async fn get_token(db: &PgPool, id: Uuid) -> sqlx::Result<Option<TokenRow>> {
    sqlx::query_as("SELECT * FROM enrollment_tokens WHERE id = $1").bind(id).fetch_optional(db).await
}
