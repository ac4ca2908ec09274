//! `accounts` and `api_keys`: keys are stored as SHA-256 hashes, never as themselves; and
//! which account owns a row of any table, for the API's checks.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: Uuid,
    pub account: String,
    pub name: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

const KEY_COLUMNS: &str = "id, account, name, scope, prefix, created_at, expires_at, revoked_at, last_used_at";

/// A key to store: its hash and the characters shown to tell it apart.
pub struct NewKeyRow<'a> {
    pub id: Uuid,
    pub account: &'a str,
    pub name: &'a str,
    pub scope: &'a str,
    pub prefix: &'a str,
    pub sha256: Vec<u8>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Creates an account if it does not exist yet.
pub async fn ensure_account(db: impl sqlx::PgExecutor<'_>, account: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO accounts (name) VALUES ($1) ON CONFLICT DO NOTHING").bind(account).execute(db).await?;
    Ok(())
}

/// Stores a key, and its account when new, in one transaction.
pub async fn insert_api_key(db: &PgPool, key: NewKeyRow<'_>) -> sqlx::Result<KeyRow> {
    let mut tx = db.begin().await?;
    ensure_account(&mut *tx, key.account).await?;
    let row: KeyRow = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, account, name, scope, prefix, sha256, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
    ))
    .bind(key.id)
    .bind(key.account)
    .bind(key.name)
    .bind(key.scope)
    .bind(key.prefix)
    .bind(key.sha256)
    .bind(key.expires_at)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

pub async fn list_api_keys(db: &PgPool, account: Option<&str>) -> sqlx::Result<Vec<KeyRow>> {
    sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE $1::text IS NULL OR account = $1 ORDER BY created_at, id"
    ))
    .bind(account)
    .fetch_all(db)
    .await
}

/// Revokes a key; `None` when there is no such key. Revoking twice keeps the first time.
pub async fn revoke_api_key(db: &PgPool, id: Uuid) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as(&format!(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING {KEY_COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The key with this hash.
pub async fn api_key_by_digest(db: &PgPool, sha256: &[u8]) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE sha256 = $1"))
        .bind(sha256)
        .fetch_optional(db)
        .await
}

/// Records that a key was used now.
pub async fn touch_api_key(db: &PgPool, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1").bind(id).execute(db).await?;
    Ok(())
}

/// The tables whose rows belong to an account.
#[derive(Debug, Clone, Copy)]
pub enum Owned {
    Droplets,
    Deployments,
    Commands,
    EnrollmentTokens,
    ApiKeys,
}

/// The account a row belongs to; `None` when there is no such row.
pub async fn account_of(db: &PgPool, table: Owned, id: Uuid) -> sqlx::Result<Option<String>> {
    let query = match table {
        Owned::Droplets => "SELECT account FROM droplets WHERE id = $1",
        Owned::Deployments => "SELECT account FROM deployments WHERE id = $1",
        Owned::Commands => "SELECT account FROM commands WHERE id = $1",
        Owned::EnrollmentTokens => "SELECT account FROM enrollment_tokens WHERE id = $1",
        Owned::ApiKeys => "SELECT account FROM api_keys WHERE id = $1",
    };
    sqlx::query_scalar(query).bind(id).fetch_optional(db).await
}
