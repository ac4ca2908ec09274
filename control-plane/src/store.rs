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

/// How the control plane pools its connections. No ping before each checkout (sqlx's
/// default): it is a round trip per checkout, which at a few thousand statements a second
/// took about 14% of the CPU samples of `benches/commands.rs` (control plane, agents and
/// client in one process). A connection that died is found by the statement that uses it
/// instead, which fails as UNAVAILABLE (retryable) and takes the connection out of the pool.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .test_before_acquire(false)
}

/// Connects to PostgreSQL and applies pending migrations.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context as _;
    let pool = pool_options(max_connections)
        .connect(database_url)
        .await
        .context("connecting to PostgreSQL (check --database-url / DATABASE_URL)")?;
    MIGRATOR.run(&pool).await.context("applying database migrations")?;
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
    hello: &Hello,
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
    .bind(serial)
    .bind(replica)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        None => Claim::Revoked,
        Some((status,)) if status == "deleting" => Claim::Deleting,
        Some(_) => Claim::Held,
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
    let mem: Vec<i64> = batch.iter().map(|s| clamp_i64(s.load.memory_used_bytes)).collect();
    let used: Vec<i64> = batch.iter().map(|s| clamp_i64(s.load.disk_used_bytes)).collect();
    let free: Vec<i64> = batch.iter().map(|s| clamp_i64(s.load.disk_free_bytes)).collect();
    let containers: Vec<i32> = batch.iter().map(|s| clamp_i32(s.load.container_count)).collect();
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

// ---------------------------------------------------------------------------
// Certificate authorities
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Enrollment tokens
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Certificates and revocation
// ---------------------------------------------------------------------------

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

pub async fn get_token(db: &PgPool, id: Uuid) -> sqlx::Result<Option<TokenRow>> {
    sqlx::query_as("SELECT * FROM enrollment_tokens WHERE id = $1").bind(id).fetch_optional(db).await
}

// ---------------------------------------------------------------------------
// Deployments and observed containers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeploymentRow {
    pub id: Uuid,
    pub account: String,
    pub droplet_id: Uuid,
    pub name: String,
    pub generation: i64,
    pub desired_state: String,
    pub spec_sealed: Vec<u8>,
    pub last_error: String,
    pub failed: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The droplet gave up on a deployment (crash-looping past its cap).
pub async fn mark_deployment_failed(db: &PgPool, id: Uuid, droplet: Uuid, why: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE deployments SET failed = true, last_error = $3, updated_at = now() WHERE id = $1 AND droplet_id = $2",
    )
    .bind(id)
    .bind(droplet)
    .bind(why)
    .execute(db)
    .await?;
    Ok(())
}

/// Stores a new deployment at generation 1. `None` if the droplet does not exist.
pub async fn insert_deployment(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
    droplet: Uuid,
    name: &str,
    spec_sealed: &[u8],
) -> sqlx::Result<Option<DeploymentRow>> {
    sqlx::query_as(
        "INSERT INTO deployments (id, account, droplet_id, name, generation, desired_state, spec_sealed)
         SELECT $1, d.account, d.id, $3, 1, 'running', $4 FROM droplets d WHERE d.id = $2
         RETURNING *",
    )
    .bind(id)
    .bind(droplet)
    .bind(name)
    .bind(spec_sealed)
    .fetch_optional(db)
    .await
}

/// Records a new desired run state; `retry` also clears `failed` (an operator asked for
/// the container to run again). A removed deployment stays removed: `None` then, as for
/// an unknown one.
pub async fn set_desired_state(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
    desired: &str,
    retry: bool,
) -> sqlx::Result<Option<DeploymentRow>> {
    sqlx::query_as(
        "UPDATE deployments SET desired_state = $2, updated_at = now(),
             failed = failed AND NOT $3, last_error = CASE WHEN $3 THEN '' ELSE last_error END
         WHERE id = $1 AND (desired_state <> 'removed' OR $2 = 'removed')
         RETURNING *",
    )
    .bind(id)
    .bind(desired)
    .bind(retry)
    .fetch_optional(db)
    .await
}

/// Stores a new spec as the next generation, to run. `None` if the deployment is unknown
/// or removed.
pub async fn update_deployment_spec(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
    spec_sealed: &[u8],
) -> sqlx::Result<Option<DeploymentRow>> {
    sqlx::query_as(
        "UPDATE deployments SET spec_sealed = $2, generation = generation + 1, desired_state = 'running',
             failed = false, last_error = '', updated_at = now()
         WHERE id = $1 AND desired_state <> 'removed'
         RETURNING *",
    )
    .bind(id)
    .bind(spec_sealed)
    .fetch_optional(db)
    .await
}

/// The deployments of a droplet that are not removed (to check host ports against).
pub async fn live_deployments_of(db: impl sqlx::PgExecutor<'_>, droplet: Uuid) -> sqlx::Result<Vec<DeploymentRow>> {
    sqlx::query_as("SELECT * FROM deployments WHERE droplet_id = $1 AND desired_state <> 'removed' ORDER BY id")
        .bind(droplet)
        .fetch_all(db)
        .await
}

pub async fn get_deployment(db: impl sqlx::PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<DeploymentRow>> {
    sqlx::query_as("SELECT * FROM deployments WHERE id = $1").bind(id).fetch_optional(db).await
}

pub async fn set_deployment_error(db: &PgPool, id: Uuid, droplet: Uuid, error: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE deployments SET last_error = $3, updated_at = now() WHERE id = $1 AND droplet_id = $2")
        .bind(id)
        .bind(droplet)
        .bind(error)
        .execute(db)
        .await?;
    Ok(())
}

/// Records what a droplet reports of a deployment's container, only for deployments of
/// that droplet (a droplet cannot write another droplet's state).
pub async fn record_container(
    db: &PgPool,
    droplet: Uuid,
    deployment: Uuid,
    generation: i64,
    state: &str,
    status: &[u8],
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO containers (deployment_id, droplet_id, status, state, generation)
         SELECT id, droplet_id, $3, $4, $5 FROM deployments WHERE id = $1 AND droplet_id = $2
         ON CONFLICT (deployment_id) DO UPDATE SET
             status = EXCLUDED.status, state = EXCLUDED.state, generation = EXCLUDED.generation,
             reported_at = now()",
    )
    .bind(deployment)
    .bind(droplet)
    .bind(status)
    .bind(state)
    .bind(generation)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn container_status(db: &PgPool, deployment: Uuid) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT status FROM containers WHERE deployment_id = $1")
        .bind(deployment)
        .fetch_optional(db)
        .await
}

/// Replaces what is known of a deployment's MCP server and its tools.
pub async fn record_mcp_server(
    db: &PgPool,
    droplet: Uuid,
    deployment: Uuid,
    server: &flotilla::proto::McpServer,
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    let done = sqlx::query(
        "INSERT INTO mcp_servers (deployment_id, name, version)
         SELECT id, $3, $4 FROM deployments WHERE id = $1 AND droplet_id = $2
         ON CONFLICT (deployment_id) DO UPDATE SET name = EXCLUDED.name, version = EXCLUDED.version, discovered_at = now()",
    )
    .bind(deployment)
    .bind(droplet)
    .bind(&server.name)
    .bind(&server.version)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(());
    }
    sqlx::query("DELETE FROM mcp_tools WHERE deployment_id = $1").bind(deployment).execute(&mut *tx).await?;
    for tool in &server.tools {
        let schema: serde_json::Value =
            serde_json::from_str(&tool.input_schema_json).unwrap_or(serde_json::Value::Null);
        sqlx::query("INSERT INTO mcp_tools (deployment_id, name, description, input_schema) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(deployment)
            .bind(&tool.name)
            .bind(&tool.description)
            .bind(sqlx::types::Json(schema))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// The deployment's MCP server (name, version, discovered at) and its tools, by name.
#[allow(clippy::type_complexity)]
pub async fn mcp_tools(
    db: &PgPool,
    deployment: Uuid,
) -> sqlx::Result<Option<((String, String, DateTime<Utc>), Vec<(String, String, sqlx::types::Json<serde_json::Value>)>)>>
{
    let server: Option<(String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT name, version, discovered_at FROM mcp_servers WHERE deployment_id = $1")
            .bind(deployment)
            .fetch_optional(db)
            .await?;
    let Some(server) = server else { return Ok(None) };
    let tools =
        sqlx::query_as("SELECT name, description, input_schema FROM mcp_tools WHERE deployment_id = $1 ORDER BY name")
            .bind(deployment)
            .fetch_all(db)
            .await?;
    Ok(Some((server, tools)))
}

/// Appends an event about one of a droplet's deployments (attributed to that droplet's
/// account; ignored for deployments of other droplets).
pub async fn record_deployment_event(
    db: &PgPool,
    droplet: Uuid,
    deployment: Uuid,
    kind: &str,
    message: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO events (account, droplet_id, deployment_id, kind, message)
         SELECT account, droplet_id, id, $3, $4 FROM deployments WHERE id = $1 AND droplet_id = $2",
    )
    .bind(deployment)
    .bind(droplet)
    .bind(kind)
    .bind(message)
    .execute(db)
    .await?;
    Ok(())
}
