//! PostgreSQL: the single source of truth. Every query the control plane runs lives here.

use chrono::{DateTime, Utc};
use flotilla::{
    DropletId,
    proto::{Hello, HostLoad},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

/// The schema, from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The account every droplet belongs to until API keys bring accounts of their own.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Connects to PostgreSQL and applies pending migrations.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context as _;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(database_url)
        .await
        .context("connecting to PostgreSQL (check --database-url / DATABASE_URL)")?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    Ok(pool)
}

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
}

/// The latest heartbeat of one droplet, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenLoad {
    pub droplet: DropletId,
    pub seen_at: DateTime<Utc>,
    pub load: HostLoad,
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// What happened when a session asked to hold a droplet.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Held,
    /// The droplet is being deleted: it may not connect again.
    Deleting,
}

/// Records a new session for a droplet from its `Hello`: the droplet is `online`, with the
/// facts the agent reported. Creates the droplet in the default account if it is new.
pub async fn claim_droplet(
    db: &PgPool,
    droplet: DropletId,
    session_id: Uuid,
    hello: &Hello,
) -> sqlx::Result<Claim> {
    let host = hello.host.clone().unwrap_or_default();
    let load = hello.load.unwrap_or_default();
    let protocol = hello.protocol.unwrap_or_default();
    let row: Option<(String,)> = sqlx::query_as(
        r#"
        INSERT INTO droplets AS d (
            id, account, status, agent_version, protocol_major, protocol_minor,
            hostname, os, kernel_version, architecture, cpu_count,
            memory_total_bytes, disk_total_bytes, docker_version,
            load_average_1m, load_average_5m, load_average_15m,
            memory_used_bytes, disk_used_bytes, disk_free_bytes, container_count,
            session_id, connected_at, last_seen_at, disconnected_at, status_message)
        VALUES ($1, $2, 'online', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                $14, $15, $16, $17, $18, $19, $20, $21, now(), now(), NULL, '')
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
            connected_at = now(),
            last_seen_at = now(),
            disconnected_at = NULL,
            status_message = '',
            updated_at = now()
        RETURNING d.status
        "#,
    )
    .bind(droplet.as_uuid())
    .bind(DEFAULT_ACCOUNT)
    .bind(&hello.agent_version)
    .bind(clamp_i32(protocol.major))
    .bind(clamp_i32(protocol.minor))
    .bind(&host.hostname)
    .bind(&host.os)
    .bind(&host.kernel_version)
    .bind(&host.architecture)
    .bind(clamp_i32(host.cpu_count))
    .bind(clamp_i64(host.memory_total_bytes))
    .bind(clamp_i64(host.disk_total_bytes))
    .bind(&hello.docker_version)
    .bind(load.load_average_1m)
    .bind(load.load_average_5m)
    .bind(load.load_average_15m)
    .bind(clamp_i64(load.memory_used_bytes))
    .bind(clamp_i64(load.disk_used_bytes))
    .bind(clamp_i64(load.disk_free_bytes))
    .bind(clamp_i32(load.container_count))
    .bind(session_id)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        Some((status,)) if status == "deleting" => Claim::Deleting,
        _ => Claim::Held,
    })
}

/// The session closed: start the reconnect grace. A no-op if another session took over.
pub async fn release_droplet(
    db: &PgPool,
    droplet: DropletId,
    session_id: Uuid,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE droplets SET session_id = NULL, disconnected_at = now(), updated_at = now()
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
    let mem: Vec<i64> = batch
        .iter()
        .map(|s| clamp_i64(s.load.memory_used_bytes))
        .collect();
    let used: Vec<i64> = batch
        .iter()
        .map(|s| clamp_i64(s.load.disk_used_bytes))
        .collect();
    let free: Vec<i64> = batch
        .iter()
        .map(|s| clamp_i64(s.load.disk_free_bytes))
        .collect();
    let containers: Vec<i32> = batch
        .iter()
        .map(|s| clamp_i32(s.load.container_count))
        .collect();
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

/// At start-up: sessions recorded by a previous run of this control plane are gone. Their
/// droplets get the reconnect grace from now, so a restart does not flap the fleet.
///
/// This assumes one control-plane process per database; several replicas need session
/// ownership per replica, which the command-ledger work brings.
pub async fn release_stale_sessions(db: &PgPool) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE droplets SET session_id = NULL, disconnected_at = now(), updated_at = now()
         WHERE session_id IS NOT NULL",
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

pub async fn get_droplet(db: &PgPool, id: Uuid) -> sqlx::Result<Option<DropletRow>> {
    sqlx::query_as("SELECT * FROM droplets WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Droplets in id order, after `after`, at most `limit`.
pub async fn list_droplets(
    db: &PgPool,
    after: Option<Uuid>,
    status: Option<DropletStatus>,
    limit: i64,
) -> sqlx::Result<Vec<DropletRow>> {
    sqlx::query_as(
        "SELECT * FROM droplets
         WHERE ($1::uuid IS NULL OR id > $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY id
         LIMIT $3",
    )
    .bind(after)
    .bind(status.map(DropletStatus::as_str))
    .bind(limit)
    .fetch_all(db)
    .await
}
