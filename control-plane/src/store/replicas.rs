//! `replicas`: the control-plane processes sharing this database, and which of them holds
//! each droplet's session.

use std::time::Duration;

use flotilla::DropletId;
use sqlx::PgPool;
use uuid::Uuid;

/// `NOTIFY` channel: `<droplet>:<session>:<epoch>` now holds the droplet.
pub const SESSIONS_CHANNEL: &str = "flotilla_sessions";

/// Records this replica as alive, and releases the sessions it held in an earlier life
/// (they ended with that process). Returns how many were released.
pub async fn start_replica(db: &PgPool, replica: Uuid, api_address: &str) -> sqlx::Result<u64> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    sqlx::query(
        "INSERT INTO replicas (id, hostname, api_address) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET hostname = $2, api_address = $3, started_at = now(), last_seen_at = now()",
    )
    .bind(replica)
    .bind(hostname)
    .bind(api_address)
    .execute(db)
    .await?;
    let done = sqlx::query(
        "UPDATE droplets SET session_id = NULL, session_replica = NULL, disconnected_at = now(), updated_at = now()
         WHERE session_replica = $1 OR (session_id IS NOT NULL AND session_replica IS NULL)",
    )
    .bind(replica)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// On shutdown: the droplets this replica sends away will reconnect because we asked;
/// their reconnection does not count against the session rate limit.
pub async fn forgive_reconnects(db: &PgPool, replica: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE droplets SET session_window_count = 0 WHERE session_replica = $1")
        .bind(replica)
        .execute(db)
        .await?;
    Ok(())
}

/// The API address of the other replica holding `droplet`'s session, if one does.
pub async fn holder_api(db: &PgPool, droplet: DropletId, me: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT r.api_address FROM droplets d JOIN replicas r ON r.id = d.session_replica
         WHERE d.id = $1 AND d.session_id IS NOT NULL AND r.id <> $2 AND r.api_address <> ''",
    )
    .bind(droplet.as_uuid())
    .bind(me)
    .fetch_optional(db)
    .await
}

/// Tells every replica that `session`, of claim `epoch`, now holds `droplet` (at commit).
pub async fn announce_session(db: &PgPool, droplet: DropletId, session: Uuid, epoch: i64) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(SESSIONS_CHANNEL)
        .bind(format!("{droplet}:{session}:{epoch}"))
        .execute(db)
        .await?;
    Ok(())
}

/// Refreshes this replica's heartbeat; if another replica is silent past `failover`,
/// releases the sessions it held (their droplets start the reconnect grace) and forgets
/// replicas gone for a day. Returns how many sessions were released.
pub async fn replica_beat(db: &PgPool, replica: Uuid, failover: Duration) -> sqlx::Result<u64> {
    sqlx::query("UPDATE replicas SET last_seen_at = now() WHERE id = $1").bind(replica).execute(db).await?;
    let dead: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM replicas WHERE last_seen_at < now() - make_interval(secs => $1) AND id <> $2)",
    )
    .bind(failover.as_secs_f64())
    .bind(replica)
    .fetch_one(db)
    .await?;
    if !dead {
        return Ok(0);
    }
    let released = sqlx::query(
        "UPDATE droplets SET session_id = NULL, session_replica = NULL, disconnected_at = now(), updated_at = now()
         WHERE session_replica IN (
             SELECT id FROM replicas WHERE last_seen_at < now() - make_interval(secs => $1) AND id <> $2)",
    )
    .bind(failover.as_secs_f64())
    .bind(replica)
    .execute(db)
    .await?
    .rows_affected();
    // Forget replicas long gone.
    sqlx::query("DELETE FROM replicas WHERE last_seen_at < now() - interval '1 day'").execute(db).await?;
    Ok(released)
}
