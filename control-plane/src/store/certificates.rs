//! `certificates`: every certificate issued to a droplet, and revocation.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// The channel that carries `<serial>:<droplet>` of each revoked certificate.
pub const REVOCATIONS_CHANNEL: &str = "flotilla_revocations";

#[allow(clippy::too_many_arguments)]
pub async fn record_certificate(
    conn: &mut sqlx::PgConnection,
    serial: &str,
    droplet: Uuid,
    ca_id: Uuid,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO certificates (serial, droplet_id, ca_id, not_before, not_after, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(serial)
    .bind(droplet)
    .bind(ca_id)
    .bind(not_before)
    .bind(not_after)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum Revoke {
    Serial(String),
    Droplet(Uuid),
}

/// Revokes certificates and tells every control plane (NOTIFY, ids only), in one
/// transaction. Returns `(serial, droplet)` of each certificate revoked now.
pub async fn revoke_certificates(conn: &mut sqlx::PgConnection, what: &Revoke) -> sqlx::Result<Vec<(String, Uuid)>> {
    let (serial, droplet) = match what {
        Revoke::Serial(serial) => (Some(serial.as_str()), None),
        Revoke::Droplet(droplet) => (None, Some(*droplet)),
    };
    let revoked: Vec<(String, Uuid)> = sqlx::query_as(
        "UPDATE certificates SET revoked_at = now()
         WHERE revoked_at IS NULL AND (serial = $1 OR droplet_id = $2)
         RETURNING serial, droplet_id",
    )
    .bind(serial)
    .bind(droplet)
    .fetch_all(&mut *conn)
    .await?;
    for (serial, droplet) in &revoked {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REVOCATIONS_CHANNEL)
            .bind(format!("{serial}:{droplet}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(revoked)
}

/// Serials of revoked certificates that have not expired (expired ones fail the chain
/// check anyway).
pub async fn revoked_serials(db: &PgPool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > now() - interval '1 hour'",
    )
    .fetch_all(db)
    .await
}
