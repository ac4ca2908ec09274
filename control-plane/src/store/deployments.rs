//! `deployments`, `containers`, `mcp_servers` and `mcp_tools`: desired and observed state.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// What a deployment is to be doing, stored as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredState {
    Running,
    Stopped,
    Removed,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
            DesiredState::Removed => "removed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(DesiredState::Running),
            "stopped" => Some(DesiredState::Stopped),
            "removed" => Some(DesiredState::Removed),
            _ => None,
        }
    }
}

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

impl DeploymentRow {
    /// The desired state; `None` only if the column holds a value this binary does not know.
    pub fn desired(&self) -> Option<DesiredState> {
        DesiredState::parse(&self.desired_state)
    }

    pub fn is_removed(&self) -> bool {
        self.desired() == Some(DesiredState::Removed)
    }
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
    desired: DesiredState,
    retry: bool,
) -> sqlx::Result<Option<DeploymentRow>> {
    sqlx::query_as(
        "UPDATE deployments SET desired_state = $2, updated_at = now(),
             failed = failed AND NOT $3, last_error = CASE WHEN $3 THEN '' ELSE last_error END
         WHERE id = $1 AND (desired_state <> 'removed' OR $2 = 'removed')
         RETURNING *",
    )
    .bind(id)
    .bind(desired.as_str())
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

/// What the probe last found of a deployment's MCP server.
#[derive(Debug, Clone)]
pub struct McpServerTools {
    pub name: String,
    pub version: String,
    pub discovered_at: DateTime<Utc>,
    pub tools: Vec<McpToolRow>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct McpToolRow {
    pub name: String,
    pub description: String,
    pub input_schema: sqlx::types::Json<serde_json::Value>,
}

/// The deployment's MCP server and its tools, by name; `None` before the probe found one.
pub async fn mcp_tools(db: &PgPool, deployment: Uuid) -> sqlx::Result<Option<McpServerTools>> {
    let server: Option<(String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT name, version, discovered_at FROM mcp_servers WHERE deployment_id = $1")
            .bind(deployment)
            .fetch_optional(db)
            .await?;
    let Some((name, version, discovered_at)) = server else { return Ok(None) };
    let tools =
        sqlx::query_as("SELECT name, description, input_schema FROM mcp_tools WHERE deployment_id = $1 ORDER BY name")
            .bind(deployment)
            .fetch_all(db)
            .await?;
    Ok(Some(McpServerTools { name, version, discovered_at, tools }))
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

/// A deployment as listed: its row, the container's last report, its newest command.
#[derive(sqlx::FromRow)]
pub struct ListedDeployment {
    #[sqlx(flatten)]
    pub row: DeploymentRow,
    /// The container's last report, encoded.
    pub container: Option<Vec<u8>>,
    pub last_command: Option<Uuid>,
}

/// Which deployments `list_deployments` returns.
#[derive(Debug, Default)]
pub struct DeploymentFilter {
    pub droplet: Option<Uuid>,
    pub account: Option<String>,
    pub include_removed: bool,
    /// Keyset position: deployments ordered by id after this one.
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// Deployments in id order, each with its container and newest command, in one query.
pub async fn list_deployments(db: &PgPool, filter: &DeploymentFilter) -> sqlx::Result<Vec<ListedDeployment>> {
    sqlx::query_as(
        "SELECT d.*, c.status AS container,
                (SELECT id FROM commands WHERE deployment_id = d.id ORDER BY seq DESC LIMIT 1) AS last_command
         FROM deployments d LEFT JOIN containers c ON c.deployment_id = d.id
         WHERE ($1::uuid IS NULL OR d.droplet_id = $1)
           AND ($2::text IS NULL OR d.account = $2)
           AND ($3 OR d.desired_state <> 'removed')
           AND ($4::uuid IS NULL OR d.id > $4)
         ORDER BY d.id
         LIMIT $5",
    )
    .bind(filter.droplet)
    .bind(filter.account.as_deref())
    .bind(filter.include_removed)
    .bind(filter.after)
    .bind(filter.limit)
    .fetch_all(db)
    .await
}

/// Every deployment of a droplet, removed ones too.
pub async fn deployments_of(conn: &mut sqlx::PgConnection, droplet: Uuid) -> sqlx::Result<Vec<DeploymentRow>> {
    sqlx::query_as("SELECT * FROM deployments WHERE droplet_id = $1").bind(droplet).fetch_all(conn).await
}

/// What a droplet last reported of each of its deployments' containers, encoded.
pub async fn reported_containers(conn: &mut sqlx::PgConnection, droplet: Uuid) -> sqlx::Result<Vec<(Uuid, Vec<u8>)>> {
    sqlx::query_as("SELECT deployment_id, status FROM containers WHERE droplet_id = $1")
        .bind(droplet)
        .fetch_all(conn)
        .await
}
