//! PostgreSQL: the single source of truth. Every SQL statement of the control plane lives
//! under this module, one file per group of tables; callers name items as `store::x`.

use sqlx::{PgPool, postgres::PgPoolOptions};

mod authorities;
mod certificates;
mod commands;
mod deployments;
mod droplets;
pub mod notify;
pub mod retention;
mod tokens;

pub use self::{authorities::*, certificates::*, commands::*, deployments::*, droplets::*, tokens::*};

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
