//! `events`: the append-only audit log, read in `(transaction, id)` order.
//!
//! See `migrations/0007_event_stream.sql` for why positions are `(transaction, id)` and
//! why only transactions older than the snapshot's xmin are read.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// `NOTIFY` channel of the trigger on `events`: something was written.
pub const EVENTS_CHANNEL: &str = "flotilla_events";

#[derive(Debug, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub tx: i64,
    pub at: DateTime<Utc>,
    pub account: String,
    pub droplet_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub kind: String,
    pub message: String,
}

/// Which events a read returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub account: Option<String>,
    pub droplet: Option<Uuid>,
    pub deployment: Option<Uuid>,
    /// Exact kinds, and prefixes of kinds; both empty: every kind.
    pub kinds: Vec<String>,
    pub prefixes: Vec<String>,
}

/// The oldest transaction still running: every event of a transaction before it is
/// readable and will stay as it is.
pub async fn event_horizon(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(db).await
}

/// At most `limit` events after `(tx, id)` that match, below the horizon, and that
/// horizon, read in one snapshot.
pub async fn read_events(
    db: &PgPool,
    after: (i64, i64),
    filter: &EventFilter,
    limit: i64,
) -> sqlx::Result<(Vec<EventRow>, i64)> {
    let mut tx = db.begin().await?;
    // One snapshot for both statements: the horizon and the rows below it.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let horizon = event_horizon(&mut *tx).await?;
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, tx::text::bigint AS tx, at, account, droplet_id, deployment_id, kind, message
         FROM events
         WHERE (tx, id) > ($1::text::xid8, $2) AND tx < $3::text::xid8
           AND ($4::text IS NULL OR account = $4)
           AND ($5::uuid IS NULL OR droplet_id = $5)
           AND ($6::uuid IS NULL OR deployment_id = $6)
           AND ((cardinality($7::text[]) = 0 AND cardinality($8::text[]) = 0)
                OR kind = ANY($7) OR EXISTS (SELECT 1 FROM unnest($8::text[]) p WHERE starts_with(kind, p)))
         ORDER BY tx, id
         LIMIT $9",
    )
    .bind(after.0.to_string())
    .bind(after.1)
    .bind(horizon.to_string())
    .bind(filter.account.as_deref())
    .bind(filter.droplet)
    .bind(filter.deployment)
    .bind(&filter.kinds)
    .bind(&filter.prefixes)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((rows, horizon))
}

/// Appends one event.
pub async fn insert_event(
    conn: &mut PgConnection,
    account: &str,
    droplet: Option<Uuid>,
    deployment: Option<Uuid>,
    kind: &str,
    message: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO events (account, droplet_id, deployment_id, kind, message) VALUES ($1, $2, $3, $4, $5)")
        .bind(account)
        .bind(droplet)
        .bind(deployment)
        .bind(kind)
        .bind(message)
        .execute(conn)
        .await?;
    Ok(())
}
