//! `authorities`: the fleet CAs, their keys sealed with the master key.

use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuthorityRow {
    pub id: Uuid,
    pub cert_pem: String,
    pub sha256: String,
    pub key_ciphertext: Vec<u8>,
    pub state: String,
    pub created_at: DateTime<Utc>,
}

/// Every CA not retired, oldest first.
pub async fn authorities_in_service(conn: &mut sqlx::PgConnection) -> sqlx::Result<Vec<AuthorityRow>> {
    sqlx::query_as(
        "SELECT id, cert_pem, sha256, key_ciphertext, state, created_at FROM certificate_authorities
         WHERE state <> 'retired' ORDER BY created_at, id",
    )
    .fetch_all(conn)
    .await
}

pub async fn insert_authority(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    cert_pem: &str,
    sha256: &str,
    key_ciphertext: &[u8],
    state: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO certificate_authorities (id, cert_pem, sha256, key_ciphertext, state)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(cert_pem)
    .bind(sha256)
    .bind(key_ciphertext)
    .bind(state)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_authority_state(conn: &mut sqlx::PgConnection, from: &str, to: &str) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE certificate_authorities SET state = $2,
             retired_at = CASE WHEN $2 = 'retired' THEN now() ELSE retired_at END
         WHERE state = $1",
    )
    .bind(from)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
