//! `droplets`: each droplet, its session and liveness, its facts and labels.

use chrono::{DateTime, Utc};
use flotilla::DropletId;
use sqlx::PgPool;
use uuid::Uuid;

use super::*;

/// A droplet's status, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropletStatus {
    Pending,
    Provisioning,
    Online,
    Unreachable,
    Offline,
    Error,
    Deleting,
}

impl DropletStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Online => "online",
            Self::Unreachable => "unreachable",
            Self::Offline => "offline",
            Self::Error => "error",
            Self::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "provisioning" => Self::Provisioning,
            "online" => Self::Online,
            "unreachable" => Self::Unreachable,
            "offline" => Self::Offline,
            "error" => Self::Error,
            "deleting" => Self::Deleting,
            _ => return None,
        })
    }
}

/// One row of `droplets`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DropletRow {
    pub id: Uuid,
    pub account: String,
    pub status: String,
    pub status_message: String,
    pub labels: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    pub agent_version: String,
    pub protocol_major: i32,
    pub protocol_minor: i32,
    pub hostname: String,
    pub os: String,
    pub kernel_version: String,
    pub architecture: String,
    pub cpu_count: i32,
    pub memory_total_bytes: i64,
    pub disk_total_bytes: i64,
    pub docker_version: String,
    pub load_average_1m: f64,
    pub load_average_5m: f64,
    pub load_average_15m: f64,
    pub memory_used_bytes: i64,
    pub disk_used_bytes: i64,
    pub disk_free_bytes: i64,
    pub container_count: i32,
    pub session_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub disconnected_at: Option<DateTime<Utc>>,
    /// `byo`, `local`, `digitalocean`.
    pub provider: String,
    /// The provider's id for the droplet's machine, once made.
    pub cloud_id: Option<String>,
    pub public_ipv4: String,
    pub private_ipv4: String,
}

/// The latest heartbeat of one droplet, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenLoad {
    pub droplet: DropletId,
    pub seen_at: DateTime<Utc>,
    pub load: Load,
}

/// A droplet's load, as its columns hold it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    pub load_average_1m: f64,
    pub load_average_5m: f64,
    pub load_average_15m: f64,
    pub memory_used_bytes: i64,
    pub disk_used_bytes: i64,
    pub disk_free_bytes: i64,
    pub container_count: i32,
}

/// What an agent says of its droplet when a session begins, as the columns hold it.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub agent_version: String,
    pub protocol_major: i32,
    pub protocol_minor: i32,
    pub hostname: String,
    pub os: String,
    pub kernel_version: String,
    pub architecture: String,
    pub cpu_count: i32,
    pub memory_total_bytes: i64,
    pub disk_total_bytes: i64,
    pub docker_version: String,
    pub load: Load,
}

/// What happened when a session asked to hold a droplet.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The session holds the droplet; its epoch orders it among the droplet's sessions
    /// (a later claim has a larger one).
    Held(i64),
    /// Too many new sessions for this droplet lately: try again after this long.
    RateLimited(std::time::Duration),
    /// The droplet is being deleted: it may not connect again.
    Deleting,
    /// The session's certificate was revoked.
    Revoked,
}

/// Records a new session for a droplet from its `Hello`: the droplet is `online`, with the
/// facts the agent reported. Creates the droplet in the default account if it is new.
/// New sessions allowed per droplet within [`SESSION_WINDOW`] (as SwarmKit: more than 3 in
/// 8 s is refused with a hint to come back later).
pub const SESSIONS_PER_WINDOW: i32 = 3;
pub const SESSION_WINDOW: std::time::Duration = std::time::Duration::from_secs(8);

pub async fn claim_droplet(
    db: &PgPool,
    droplet: DropletId,
    session_id: Uuid,
    replica: Uuid,
    serial: &str,
    facts: &Facts,
) -> sqlx::Result<Claim> {
    let window: Option<(i32, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE droplets SET
             session_window_count = CASE WHEN session_window_start > now() - make_interval(secs => $2)
                                         THEN session_window_count + 1 ELSE 1 END,
             session_window_start = CASE WHEN session_window_start > now() - make_interval(secs => $2)
                                         THEN session_window_start ELSE now() END
         WHERE id = $1
         RETURNING session_window_count, session_window_start",
    )
    .bind(droplet.as_uuid())
    .bind(SESSION_WINDOW.as_secs_f64())
    .fetch_optional(db)
    .await?;
    if let Some((count, start)) = window
        && count > SESSIONS_PER_WINDOW
    {
        let until = start + chrono::Duration::from_std(SESSION_WINDOW).unwrap_or_default();
        let wait = (until - Utc::now()).to_std().unwrap_or_default().max(std::time::Duration::from_secs(1));
        return Ok(Claim::RateLimited(wait));
    }
    let load = &facts.load;
    let row: Option<(String, i64)> = sqlx::query_as(
        r#"
        INSERT INTO droplets AS d (
            id, account, status, agent_version, protocol_major, protocol_minor,
            hostname, os, kernel_version, architecture, cpu_count,
            memory_total_bytes, disk_total_bytes, docker_version,
            load_average_1m, load_average_5m, load_average_15m,
            memory_used_bytes, disk_used_bytes, disk_free_bytes, container_count,
            session_id, connected_at, last_seen_at, disconnected_at, status_message, session_replica, session_epoch,
            session_window_start, session_window_count)
        SELECT $1, $2, 'online', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
               $14, $15, $16, $17, $18, $19, $20, $21, now(), now(), NULL, '', $23, 1, now(), 1
        -- A certificate revoked since its handshake must not bring its droplet back.
        WHERE NOT EXISTS (SELECT 1 FROM certificates WHERE serial = $22 AND revoked_at IS NOT NULL)
        ON CONFLICT (id) DO UPDATE SET
            status = CASE WHEN d.status = 'deleting' THEN d.status ELSE 'online' END,
            agent_version = EXCLUDED.agent_version,
            protocol_major = EXCLUDED.protocol_major,
            protocol_minor = EXCLUDED.protocol_minor,
            hostname = EXCLUDED.hostname,
            os = EXCLUDED.os,
            kernel_version = EXCLUDED.kernel_version,
            architecture = EXCLUDED.architecture,
            cpu_count = EXCLUDED.cpu_count,
            memory_total_bytes = EXCLUDED.memory_total_bytes,
            disk_total_bytes = EXCLUDED.disk_total_bytes,
            docker_version = EXCLUDED.docker_version,
            load_average_1m = EXCLUDED.load_average_1m,
            load_average_5m = EXCLUDED.load_average_5m,
            load_average_15m = EXCLUDED.load_average_15m,
            memory_used_bytes = EXCLUDED.memory_used_bytes,
            disk_used_bytes = EXCLUDED.disk_used_bytes,
            disk_free_bytes = EXCLUDED.disk_free_bytes,
            container_count = EXCLUDED.container_count,
            session_id = CASE WHEN d.status = 'deleting' THEN d.session_id ELSE EXCLUDED.session_id END,
            session_replica = CASE WHEN d.status = 'deleting' THEN d.session_replica ELSE EXCLUDED.session_replica END,
            session_epoch = d.session_epoch + 1,
            connected_at = now(),
            last_seen_at = now(),
            disconnected_at = NULL,
            status_message = '',
            updated_at = now()
        RETURNING d.status, d.session_epoch
        "#,
    )
    .bind(droplet.as_uuid())
    .bind(DEFAULT_ACCOUNT)
    .bind(&facts.agent_version)
    .bind(facts.protocol_major)
    .bind(facts.protocol_minor)
    .bind(&facts.hostname)
    .bind(&facts.os)
    .bind(&facts.kernel_version)
    .bind(&facts.architecture)
    .bind(facts.cpu_count)
    .bind(facts.memory_total_bytes)
    .bind(facts.disk_total_bytes)
    .bind(&facts.docker_version)
    .bind(load.load_average_1m)
    .bind(load.load_average_5m)
    .bind(load.load_average_15m)
    .bind(load.memory_used_bytes)
    .bind(load.disk_used_bytes)
    .bind(load.disk_free_bytes)
    .bind(load.container_count)
    .bind(session_id)
    .bind(serial)
    .bind(replica)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        None => Claim::Revoked,
        Some((status, _)) if status == "deleting" => Claim::Deleting,
        Some((_, epoch)) => Claim::Held(epoch),
    })
}

/// The session closed: start the reconnect grace. A no-op if another session took over.
pub async fn release_droplet(db: &PgPool, droplet: DropletId, session_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE droplets SET session_id = NULL, session_replica = NULL, disconnected_at = now(), updated_at = now()
         WHERE id = $1 AND session_id = $2",
    )
    .bind(droplet.as_uuid())
    .bind(session_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Moves a droplet between `online` and `unreachable`, only while `session_id` holds it.
pub async fn set_liveness(
    db: &PgPool,
    droplet: DropletId,
    session_id: Uuid,
    status: DropletStatus,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE droplets SET status = $3, updated_at = now()
         WHERE id = $1 AND session_id = $2 AND status IN ('online', 'unreachable') AND status <> $3",
    )
    .bind(droplet.as_uuid())
    .bind(session_id)
    .bind(status.as_str())
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the latest heartbeat of many droplets in one statement.
pub async fn flush_heartbeats(db: &PgPool, batch: &[SeenLoad]) -> sqlx::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = batch.iter().map(|s| s.droplet.as_uuid()).collect();
    let seen: Vec<DateTime<Utc>> = batch.iter().map(|s| s.seen_at).collect();
    let l1: Vec<f64> = batch.iter().map(|s| s.load.load_average_1m).collect();
    let l5: Vec<f64> = batch.iter().map(|s| s.load.load_average_5m).collect();
    let l15: Vec<f64> = batch.iter().map(|s| s.load.load_average_15m).collect();
    let mem: Vec<i64> = batch.iter().map(|s| s.load.memory_used_bytes).collect();
    let used: Vec<i64> = batch.iter().map(|s| s.load.disk_used_bytes).collect();
    let free: Vec<i64> = batch.iter().map(|s| s.load.disk_free_bytes).collect();
    let containers: Vec<i32> = batch.iter().map(|s| s.load.container_count).collect();
    let done = sqlx::query(
        r#"
        UPDATE droplets AS d SET
            last_seen_at = GREATEST(d.last_seen_at, v.seen_at),
            load_average_1m = v.l1, load_average_5m = v.l5, load_average_15m = v.l15,
            memory_used_bytes = v.mem, disk_used_bytes = v.used, disk_free_bytes = v.free,
            container_count = v.containers
        FROM UNNEST($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[],
                    $6::int8[], $7::int8[], $8::int8[], $9::int4[])
             AS v(id, seen_at, l1, l5, l15, mem, used, free, containers)
        WHERE d.id = v.id
        "#,
    )
    .bind(ids)
    .bind(seen)
    .bind(l1)
    .bind(l5)
    .bind(l15)
    .bind(mem)
    .bind(used)
    .bind(free)
    .bind(containers)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Marks `offline` every droplet whose session closed more than `grace` ago and that no
/// session has claimed since. Returns the droplets it changed.
pub async fn sweep_offline(db: &PgPool, grace: std::time::Duration) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "UPDATE droplets SET status = 'offline', updated_at = now()
         WHERE session_id IS NULL AND status IN ('online', 'unreachable')
           AND disconnected_at < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(grace.as_secs_f64())
    .fetch_all(db)
    .await
}

pub async fn get_droplet(db: &PgPool, id: Uuid) -> sqlx::Result<Option<DropletRow>> {
    sqlx::query_as("SELECT * FROM droplets WHERE id = $1").bind(id).fetch_optional(db).await
}

/// Droplets in id order, after `after`, at most `limit`.
/// Which droplets `list_droplets` returns.
#[derive(Debug, Default)]
pub struct DropletFilter {
    /// Keyset position: droplets ordered by id after this one.
    pub after: Option<Uuid>,
    pub status: Option<DropletStatus>,
    pub account: Option<String>,
    pub selector: crate::labels::Selector,
}

pub async fn list_droplets(db: &PgPool, filter: &DropletFilter, limit: i64) -> sqlx::Result<Vec<DropletRow>> {
    let mut query = sqlx::QueryBuilder::new("SELECT * FROM droplets WHERE true");
    if let Some(after) = filter.after {
        query.push(" AND id > ").push_bind(after);
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(account) = &filter.account {
        query.push(" AND account = ").push_bind(account.clone());
    }
    filter.selector.push_sql(&mut query);
    query.push(" ORDER BY id LIMIT ").push_bind(limit);
    query.build_query_as().fetch_all(db).await
}

/// Replaces a droplet's labels; `None` when there is no such droplet.
pub async fn set_labels(
    db: &PgPool,
    id: Uuid,
    labels: &std::collections::BTreeMap<String, String>,
) -> sqlx::Result<Option<DropletRow>> {
    sqlx::query_as("UPDATE droplets SET labels = $2 WHERE id = $1 RETURNING *")
        .bind(id)
        .bind(sqlx::types::Json(labels))
        .fetch_optional(db)
        .await
}

/// Deletes a droplet: revokes its certificates (closing its session everywhere), then
/// removes it with its tokens. Returns the revoked serials, or `None` if there was no such
/// droplet.
pub async fn delete_droplet(db: &PgPool, id: Uuid) -> sqlx::Result<Option<Vec<String>>> {
    let mut tx = db.begin().await?;
    let found: Option<Uuid> = sqlx::query_scalar("SELECT id FROM droplets WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if found.is_none() {
        return Ok(None);
    }
    let revoked = revoke_certificates(&mut tx, &Revoke::Droplet(id)).await?;
    sqlx::query("DELETE FROM droplets WHERE id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(revoked.into_iter().map(|(serial, _)| serial).collect()))
}

/// The account of a droplet that is not being deleted; `None` for any other.
pub async fn account_unless_deleting(db: impl sqlx::PgExecutor<'_>, droplet: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT account FROM droplets WHERE id = $1 AND status <> 'deleting'")
        .bind(droplet)
        .fetch_optional(db)
        .await
}
