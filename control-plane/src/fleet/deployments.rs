//! Deployments: a validated spec stored (sealed: it may hold secrets), and the command
//! that asks the droplet to run it.
//!
//! Delivery here is best effort over the live session; the durable command ledger
//! (commands as rows, re-sent after reconnects, applied once) replaces it.

use chrono::{DateTime, Utc};
use flotilla::{
    DropletId,
    proto::{self, ContainerStatus, Deploy, command},
    spec::{DeploymentSpec, SpecError},
};
use prost::Message as _;
use uuid::Uuid;

use crate::{
    fleet::Fleet,
    fleet::commands::{self, Options},
    store::{self, DesiredState},
};

fn seal_context(id: Uuid) -> Vec<u8> {
    [b"flotilla/deployment-spec/".as_slice(), id.as_bytes()].concat()
}

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("droplet {0} not found")]
    NoDroplet(Uuid),
    #[error("deployment {0} not found")]
    NotFound(Uuid),
    #[error("the stored spec of deployment {0} cannot be read with this master key")]
    Unreadable(Uuid),
    #[error("deployment {0} was removed")]
    Removed(Uuid),
    #[error("options.idempotency_key: this key was already used on this droplet for another change")]
    KeyReused,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A change of a deployment's run state, asked through the API.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    Start,
    Stop { grace: Option<prost_types::Duration> },
    Restart { grace: Option<prost_types::Duration> },
    Remove { volumes: bool },
}

/// A deployment as the fleet shows it: its spec with every secret masked, the last
/// report of its container, and its newest command.
#[derive(Debug, Clone)]
pub struct DeploymentView {
    /// `None` for a deployment only checked (`validate`), never stored.
    pub id: Option<Uuid>,
    pub droplet: Uuid,
    pub account: String,
    pub name: String,
    pub generation: u64,
    pub desired: Option<DesiredState>,
    pub spec: proto::DeploymentSpec,
    pub container: Option<ContainerStatus>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub last_error: String,
    pub failed: bool,
    pub last_command: Option<Uuid>,
}

/// Host ports `spec` publishes that another live deployment on the droplet already
/// publishes, as field violations.
async fn host_port_conflicts(
    fleet: &Fleet,
    conn: &mut sqlx::PgConnection,
    droplet: DropletId,
    this: Uuid,
    spec: &DeploymentSpec,
) -> Result<(), DeploymentError> {
    let wanted: Vec<(usize, u16, &'static str)> = spec
        .ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.host_port.filter(|&h| h != 0).map(|h| (i, h, p.protocol.as_str())))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let mut violations = Vec::new();
    for row in store::live_deployments_of(&mut *conn, droplet.as_uuid()).await? {
        if row.id == this {
            continue;
        }
        let Ok(other) = spec_of(fleet, &row).and_then(|s| DeploymentSpec::try_from(s).map_err(DeploymentError::from))
        else {
            continue;
        };
        for (i, port, protocol) in &wanted {
            if other.ports.iter().any(|p| p.host_port == Some(*port) && p.protocol.as_str() == *protocol) {
                violations.push(flotilla::spec::FieldViolation {
                    field: format!("ports[{i}].host_port"),
                    description: format!(
                        "{port}/{protocol} is already published on this droplet by deployment {}",
                        row.id
                    ),
                });
            }
        }
    }
    if violations.is_empty() { Ok(()) } else { Err(SpecError { violations }.into()) }
}

/// Records the new desired state and queues the command, in one transaction.
pub async fn lifecycle(
    fleet: &Fleet,
    id: Uuid,
    verb: Verb,
    options: &Options,
) -> Result<DeploymentView, DeploymentError> {
    let (desired, retry, kind_name) = match verb {
        Verb::Start => (DesiredState::Running, true, "start"),
        Verb::Restart { .. } => (DesiredState::Running, true, "restart"),
        Verb::Stop { .. } => (DesiredState::Stopped, false, "stop"),
        Verb::Remove { .. } => (DesiredState::Removed, false, "remove"),
    };
    let droplet = store::get_deployment(&fleet.db, id).await?.ok_or(DeploymentError::NotFound(id))?.droplet_id;
    let mut tx = match begin(fleet, droplet, options, DeploymentError::NotFound(id)).await? {
        Begun::Fresh(tx) => tx,
        Begun::Earlier(earlier) => return repeat(fleet, &earlier, Some(id), kind_name).await,
    };
    if store::set_desired_state(&mut *tx, id, desired, retry).await?.is_none() {
        return Err(match store::get_deployment(&mut *tx, id).await? {
            Some(_) => DeploymentError::Removed(id),
            None => DeploymentError::NotFound(id),
        });
    }
    let deployment_id = id.to_string();
    let kind = match verb {
        Verb::Start => command::Kind::Start(proto::Start { deployment_id }),
        Verb::Stop { grace } => command::Kind::Stop(proto::Stop { deployment_id, grace }),
        Verb::Restart { grace } => command::Kind::Restart(proto::Restart { deployment_id, grace }),
        Verb::Remove { volumes } => command::Kind::Remove(proto::Remove { deployment_id, remove_volumes: volumes }),
    };
    let command = commands::issue(&mut tx, droplet, Some(id), kind, options).await?;
    tx.commit().await?;
    answer(fleet, id, command.id).await
}

/// How a change that issues a command starts.
enum Begun {
    /// A transaction holding the droplet's row: issue the command in it.
    Fresh(sqlx::Transaction<'static, sqlx::Postgres>),
    /// The idempotency key was used already, by this command.
    Earlier(Box<store::CommandRow>),
}

/// Locks the droplet (issuing is serialised per droplet, which makes idempotency keys
/// race-free) and looks up the options' idempotency key. `missing` is the error when the
/// droplet does not exist.
async fn begin(
    fleet: &Fleet,
    droplet: Uuid,
    options: &Options,
    missing: DeploymentError,
) -> Result<Begun, DeploymentError> {
    let mut tx = fleet.db.begin().await?;
    store::lock_droplet(&mut tx, droplet).await?.ok_or(missing)?;
    if let Some(key) = &options.idempotency_key
        && let Some(earlier) = store::by_key(&mut tx, droplet, key).await?
    {
        tx.commit().await?;
        return Ok(Begun::Earlier(Box::new(earlier)));
    }
    Ok(Begun::Fresh(tx))
}

/// The answer to a call repeated with the same idempotency key: the deployment and the
/// command the first call made, if the key was used for the same change (`kind`, and the
/// same deployment when one is named).
async fn repeat(
    fleet: &Fleet,
    earlier: &store::CommandRow,
    deployment: Option<Uuid>,
    kind: &str,
) -> Result<DeploymentView, DeploymentError> {
    let Some(made) = earlier.deployment_id.filter(|d| earlier.kind == kind && deployment.is_none_or(|id| id == *d))
    else {
        return Err(DeploymentError::KeyReused);
    };
    answer(fleet, made, earlier.id).await
}

/// The deployment as an answer to the call that issued `command`.
async fn answer(fleet: &Fleet, id: Uuid, command: Uuid) -> Result<DeploymentView, DeploymentError> {
    let mut deployment = get(fleet, id).await?;
    deployment.last_command = Some(command);
    Ok(deployment)
}

/// A new spec, run as the next generation. Secret values sent back masked ("***") keep
/// their stored values.
pub async fn update(
    fleet: &Fleet,
    id: Uuid,
    spec: proto::DeploymentSpec,
    options: &Options,
) -> Result<DeploymentView, DeploymentError> {
    let row = store::get_deployment(&fleet.db, id).await?.ok_or(DeploymentError::NotFound(id))?;
    let droplet = DropletId::from_uuid(row.droplet_id);
    let mut tx = match begin(fleet, droplet.as_uuid(), options, DeploymentError::NotFound(id)).await? {
        Begun::Fresh(tx) => tx,
        Begun::Earlier(earlier) => return repeat(fleet, &earlier, Some(id), "deploy").await,
    };
    // Read again under the lock: the generation to follow is the latest.
    let row = store::get_deployment(&mut *tx, id).await?.ok_or(DeploymentError::NotFound(id))?;
    if row.is_removed() {
        return Err(DeploymentError::Removed(id));
    }
    let spec = keep_masked_secrets(spec, &spec_of(fleet, &row)?);
    let validated = DeploymentSpec::try_from(spec.clone())?;
    host_port_conflicts(fleet, &mut tx, droplet, id, &validated).await?;
    let sealed = fleet.master_key.seal(&seal_context(id), &spec.encode_to_vec());
    let row = store::update_deployment_spec(&mut *tx, id, &sealed).await?.ok_or(DeploymentError::Removed(id))?;
    let generation = u64::try_from(row.generation).unwrap_or(0);
    let deploy = Deploy { deployment_id: id.to_string(), generation, spec: None };
    let command = commands::issue(&mut tx, droplet.as_uuid(), Some(id), command::Kind::Deploy(deploy), options).await?;
    tx.commit().await?;
    tracing::info!(deployment_id = %id, generation, "deployment updated");
    answer(fleet, id, command.id).await
}

/// Puts stored secret values back where the new spec carries the mask.
fn keep_masked_secrets(mut spec: proto::DeploymentSpec, stored: &proto::DeploymentSpec) -> proto::DeploymentSpec {
    for var in spec.env.iter_mut().filter(|v| v.secret && v.value == "***") {
        if let Some(old) = stored.env.iter().find(|o| o.secret && o.name == var.name) {
            var.value = old.value.clone();
        }
    }
    if let (Some(auth), Some(old)) = (spec.registry_auth.as_mut(), stored.registry_auth.as_ref())
        && auth.password == "***"
        && auth.username == old.username
        && auth.server == old.server
    {
        auth.password = old.password.clone();
    }
    spec
}

/// The stored spec of a deployment, unsealed.
pub fn spec_of(fleet: &Fleet, row: &store::DeploymentRow) -> Result<proto::DeploymentSpec, DeploymentError> {
    let bytes = fleet
        .master_key
        .open(&seal_context(row.id), &row.spec_sealed)
        .map_err(|_| DeploymentError::Unreadable(row.id))?;
    proto::DeploymentSpec::decode(bytes.as_slice()).map_err(|_| DeploymentError::Unreadable(row.id))
}

/// Validates, stores at generation 1 and queues its `Deploy`, in one transaction. With an
/// idempotency key already used on the droplet, returns the deployment that key made.
pub async fn create(
    fleet: &Fleet,
    droplet: DropletId,
    name: &str,
    spec: proto::DeploymentSpec,
    options: &Options,
) -> Result<DeploymentView, DeploymentError> {
    let validated = DeploymentSpec::try_from(spec.clone())?;
    let mut tx = match begin(fleet, droplet.as_uuid(), options, DeploymentError::NoDroplet(droplet.as_uuid())).await? {
        Begun::Fresh(tx) => tx,
        Begun::Earlier(earlier) => return repeat(fleet, &earlier, None, "deploy").await,
    };
    let id = Uuid::new_v4();
    host_port_conflicts(fleet, &mut tx, droplet, id, &validated).await?;
    let sealed = fleet.master_key.seal(&seal_context(id), &spec.encode_to_vec());
    let row = store::insert_deployment(&mut *tx, id, droplet.as_uuid(), name, &sealed)
        .await?
        .ok_or(DeploymentError::NoDroplet(droplet.as_uuid()))?;
    // The spec stays sealed in the deployment; the command names the generation.
    let deploy = Deploy { deployment_id: id.to_string(), generation: 1, spec: None };
    let command = commands::issue(&mut tx, droplet.as_uuid(), Some(id), command::Kind::Deploy(deploy), options).await?;
    tx.commit().await?;
    let mut deployment = view(fleet, row, None)?;
    deployment.last_command = Some(command.id);
    Ok(deployment)
}

/// What `create` would store, checked the same way (spec, droplet, host ports) but not
/// stored and not sent: the answer to `validate_only`.
pub async fn validate(
    fleet: &Fleet,
    droplet: DropletId,
    name: &str,
    spec: proto::DeploymentSpec,
) -> Result<DeploymentView, DeploymentError> {
    let validated = DeploymentSpec::try_from(spec.clone())?;
    let mut tx = fleet.db.begin().await?;
    let account = store::account_unless_deleting(&mut *tx, droplet.as_uuid()).await?;
    let account = account.ok_or(DeploymentError::NoDroplet(droplet.as_uuid()))?;
    host_port_conflicts(fleet, &mut tx, droplet, Uuid::nil(), &validated).await?;
    tx.rollback().await?;
    Ok(DeploymentView {
        id: None,
        droplet: droplet.as_uuid(),
        account,
        name: name.to_owned(),
        generation: 1,
        desired: Some(DesiredState::Running),
        spec: mask(spec),
        container: None,
        created_at: None,
        updated_at: None,
        last_error: String::new(),
        failed: false,
        last_command: None,
    })
}

/// The spec of `generation` of a deployment, for its `Deploy` command; `Ok(Err(why))`
/// when that generation is no longer wanted.
pub async fn spec_for(
    fleet: &Fleet,
    id: Uuid,
    generation: u64,
) -> Result<Result<proto::DeploymentSpec, String>, DeploymentError> {
    let Some(row) = store::get_deployment(&fleet.db, id).await? else {
        return Ok(Err("its deployment was deleted".into()));
    };
    if row.is_removed() {
        return Ok(Err("its deployment was removed".into()));
    }
    if u64::try_from(row.generation).ok() != Some(generation) {
        return Ok(Err(format!("superseded by generation {}", row.generation)));
    }
    spec_of(fleet, &row).map(Ok)
}

/// The tools the deployment's MCP server listed the last time the probe reached it.
pub async fn tools(fleet: &Fleet, id: Uuid) -> Result<Option<store::McpServerTools>, DeploymentError> {
    store::get_deployment(&fleet.db, id).await?.ok_or(DeploymentError::NotFound(id))?;
    Ok(store::mcp_tools(&fleet.db, id).await?)
}

pub async fn get(fleet: &Fleet, id: Uuid) -> Result<DeploymentView, DeploymentError> {
    let row = store::get_deployment(&fleet.db, id).await?.ok_or(DeploymentError::NotFound(id))?;
    let container =
        store::container_status(&fleet.db, id).await?.and_then(|b| ContainerStatus::decode(b.as_slice()).ok());
    let mut deployment = view(fleet, row, container)?;
    deployment.last_command = store::last_command_of_deployment(&fleet.db, id).await?;
    Ok(deployment)
}

fn view(
    fleet: &Fleet,
    row: store::DeploymentRow,
    container: Option<ContainerStatus>,
) -> Result<DeploymentView, DeploymentError> {
    let spec = spec_of(fleet, &row)?;
    Ok(DeploymentView {
        id: Some(row.id),
        droplet: row.droplet_id,
        desired: row.desired(),
        account: row.account,
        name: row.name,
        generation: u64::try_from(row.generation).unwrap_or(0),
        spec: mask(spec),
        container,
        created_at: Some(row.created_at),
        updated_at: Some(row.updated_at),
        last_error: row.last_error,
        failed: row.failed,
        last_command: None,
    })
}

/// The spec as the API shows it: every secret replaced by "***".
pub fn mask(mut spec: proto::DeploymentSpec) -> proto::DeploymentSpec {
    for var in spec.env.iter_mut().filter(|v| v.secret) {
        var.value = "***".into();
    }
    if let Some(auth) = spec.registry_auth.as_mut().filter(|a| !a.password.is_empty()) {
        auth.password = "***".into();
    }
    spec
}

/// A container event: its state is stored; a crash loop marks the deployment failed.
pub async fn event(fleet: &Fleet, droplet: DropletId, event: &proto::ContainerEvent) {
    let Some(container) = &event.container else { return };
    // Pull progress comes before there is a container: it is only recorded.
    if event.action != "pull" {
        observe(fleet, droplet, container).await;
    }
    if let Ok(deployment) = Uuid::try_parse(&container.deployment_id) {
        let kind = format!("container.{}", event.action);
        let message = match event.exit_code {
            Some(code) if event.detail.is_empty() => format!("exit code {code}"),
            _ => event.detail.clone(),
        };
        if let Err(error) =
            store::record_deployment_event(&fleet.db, droplet.as_uuid(), deployment, &kind, &message).await
        {
            tracing::warn!(%error, "could not record an event");
        }
    }
    if container.state() == proto::ContainerState::CrashLooping
        && let Ok(deployment) = Uuid::try_parse(&container.deployment_id)
    {
        tracing::warn!(%deployment, "deployment failed: {}", event.detail);
        let why = format!("crash-looping: {}", event.detail);
        if let Err(error) = store::mark_deployment_failed(&fleet.db, deployment, droplet.as_uuid(), &why).await {
            tracing::warn!(%error, "could not record a failed deployment");
        }
    }
}

/// What a droplet reported of a container: stored against the deployment, if it is that
/// droplet's.
pub async fn observe(fleet: &Fleet, droplet: DropletId, status: &ContainerStatus) {
    let Ok(deployment) = Uuid::try_parse(&status.deployment_id) else { return };
    let generation = i64::try_from(status.generation).unwrap_or(i64::MAX);
    // Reports from the engine's side (command results, Docker events) carry no probe
    // result; they must not erase what the health monitor last said of the same container.
    let mut status = status.clone();
    let removed_one = status.state() == proto::ContainerState::Removed && !status.container_id.is_empty();
    if removed_one || status.health.is_none() || status.mcp_server.is_none() {
        let stored = store::container_status(&fleet.db, deployment).await.ok().flatten();
        let stored = stored.and_then(|b| ContainerStatus::decode(b.as_slice()).ok());
        match stored {
            Some(stored) if stored.container_id == status.container_id => {
                status.health = status.health.or(stored.health);
                status.mcp_server = status.mcp_server.or(stored.mcp_server);
            }
            // One container going away (an old generation replaced, a new one rolled
            // back) says nothing about the container the deployment runs now. Only a
            // `Remove` (no container id: all of them) ends the deployment's container.
            Some(_) if removed_one => {
                tracing::debug!(%deployment, container_id = %status.container_id, "an earlier container was removed");
                return;
            }
            _ => {}
        }
    }
    let status = &status;
    // The MCP server first: whoever sees the container healthy (the probe that found the
    // server) finds its tools too.
    if let Some(server) = &status.mcp_server
        && let Err(error) = store::record_mcp_server(&fleet.db, droplet.as_uuid(), deployment, server).await
    {
        tracing::warn!(%error, "could not record an MCP server's tools");
    }
    let recorded = store::record_container(
        &fleet.db,
        droplet.as_uuid(),
        deployment,
        generation,
        status.state().as_str_name(),
        &status.encode_to_vec(),
    )
    .await;
    match recorded {
        Ok(true) => {}
        Ok(false) => tracing::debug!(%deployment, "report about an unknown deployment ignored"),
        Err(error) => tracing::warn!(%error, "could not record a container's state"),
    }
}

/// Which deployments `list` returns.
pub type Filter = store::DeploymentFilter;

/// Deployments in id order, each with its container and newest command, in one query.
pub async fn list(fleet: &Fleet, filter: &Filter) -> Result<Vec<DeploymentView>, DeploymentError> {
    let rows = store::list_deployments(&fleet.db, filter).await?;
    rows.into_iter()
        .map(|listed| {
            let container = listed.container.and_then(|b| ContainerStatus::decode(b.as_slice()).ok());
            let mut deployment = view(fleet, listed.row, container)?;
            deployment.last_command = listed.last_command;
            Ok(deployment)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_hides_secret_values_and_registry_passwords_only() {
        let spec = proto::DeploymentSpec {
            env: vec![
                proto::EnvVar { name: "PUBLIC".into(), value: "shown".into(), secret: false },
                proto::EnvVar { name: "TOKEN".into(), value: "hunter2".into(), secret: true },
            ],
            registry_auth: Some(proto::RegistryAuth {
                username: "me".into(),
                password: "pw".into(),
                server: String::new(),
            }),
            ..Default::default()
        };
        let masked = mask(spec);
        assert_eq!(masked.env[0].value, "shown");
        assert_eq!(masked.env[1].value, "***");
        assert_eq!(masked.registry_auth.map(|a| (a.username, a.password)), Some(("me".into(), "***".into())));
    }
}
