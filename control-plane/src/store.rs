//! PostgreSQL: the single source of truth. Every SQL statement of the control plane lives
//! under this module, one file per group of tables; callers name items as `store::x`.

use sqlx::{PgPool, postgres::PgPoolOptions};

mod api_keys;
mod authorities;
mod certificates;
mod commands;
mod deployments;
mod droplets;
mod events;
mod jobs;
pub mod notify;
mod replicas;
pub mod retention;
mod tokens;

pub use self::{
    api_keys::*, authorities::*, certificates::*, commands::*, deployments::*, droplets::*, events::*, jobs::*,
    replicas::*, tokens::*,
};

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

/// The newest migration applied successfully, if any.
pub async fn applied_migration(db: &PgPool) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(db).await
}

/// Holds a transaction-scoped advisory lock until `conn`'s transaction ends.
pub async fn advisory_lock(conn: &mut sqlx::PgConnection, key: i64) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(key).execute(conn).await?;
    Ok(())
}

/// Droplets by status and open commands by state, for the fleet-wide gauges.
pub async fn fleet_counts(db: &PgPool) -> sqlx::Result<(Vec<(String, i64)>, Vec<(String, i64)>)> {
    let droplets = sqlx::query_as("SELECT status, count(*) FROM droplets GROUP BY status").fetch_all(db).await?;
    // Open commands only: the partial index makes this cheap however long the ledger.
    let open = sqlx::query_as(
        "SELECT state, count(*) FROM commands WHERE state IN ('queued', 'sent', 'acked') GROUP BY state",
    )
    .fetch_all(db)
    .await?;
    Ok((droplets, open))
}
