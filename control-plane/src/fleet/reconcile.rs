//! Desired state against observed: the commands that close the gap.
//!
//! On every `Hello` (against the inventory the agent just sent) and on a periodic sweep
//! of the droplets connected here (against what they last reported), each deployment's
//! desired generation and run state is compared with its newest container:
//!
//! - wanted running, no container (deleted behind our back) → `Deploy` the generation;
//! - wanted running, an older generation → `Deploy` the wanted one;
//! - wanted running, stopped (and its restart policy is not `no`) → `Start`;
//! - wanted stopped, running → `Stop`; wanted removed, present → `Remove`;
//! - a managed container of a deployment this fleet does not know → `Remove` (on `Hello`,
//!   where the inventory shows such strays).
//!
//! Never for a deployment that has a command open (it is settling), nor for one marked
//! `failed` (it stays stopped until a restart or a new spec is asked for), nor for one whose
//! newest command expired (its deadline said "not after then"). A deployment
//! whose corrective commands keep failing (an image that cannot be pulled) is retried
//! with a back-off: 30 s after the first failure, doubling up to 10 minutes. Each
//! corrective command is an event saying why.

use std::{collections::HashMap, time::Duration};

use chrono::Utc;
use flotilla::{
    DropletId,
    proto::{self, ContainerState, ContainerStatus, command, restart_policy},
};
use prost::Message as _;
use sqlx::PgConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    fleet::Fleet,
    fleet::commands::{self, Options},
    fleet::deployments,
    store::{self, DeploymentRow},
};

const FIRST_RETRY: Duration = Duration::from_secs(30);
const MAX_RETRY: Duration = Duration::from_secs(600);

/// How long after `failures` corrective failures in a row to try again.
pub fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(10)).min(MAX_RETRY)
}

/// What to do about one deployment, and why.
fn correction(
    row: &DeploymentRow,
    observed: Option<&ContainerStatus>,
    restarts_on_its_own: bool,
) -> Option<(command::Kind, String)> {
    let id = row.id.to_string();
    let generation = u64::try_from(row.generation).unwrap_or(0);
    let present = observed.filter(|c| c.state() != ContainerState::Removed && !c.container_id.is_empty());
    use crate::store::DesiredState::{Removed, Running, Stopped};
    let deploy = |why: String| {
        let deploy = proto::Deploy { deployment_id: id.clone(), generation, spec: None };
        Some((command::Kind::Deploy(deploy), why))
    };
    match (row.desired(), present) {
        (Some(Running), None) => deploy(format!("no container runs generation {generation}: creating it")),
        (Some(Running), Some(c)) if c.generation < generation => {
            deploy(format!("generation {} runs, {generation} is wanted: replacing it", c.generation))
        }
        // Exited cleanly or by a stop signal (137, 143): nobody will start it but us. Any
        // other exit code is the engine's restart policy's to handle, and past its cap a
        // crash loop, which marks the deployment failed.
        (Some(Running), Some(c))
            if matches!(c.state(), ContainerState::Exited | ContainerState::Created)
                && matches!(c.exit_code, None | Some(0 | 137 | 143))
                && restarts_on_its_own =>
        {
            let why = format!("the container is {} but should run: starting it", c.state().as_str_name());
            Some((command::Kind::Start(proto::Start { deployment_id: id }), why))
        }
        (Some(Stopped), Some(c)) if matches!(c.state(), ContainerState::Running | ContainerState::Restarting) => {
            let stop = proto::Stop { deployment_id: id, grace: None };
            Some((command::Kind::Stop(stop), "the container runs but should be stopped: stopping it".into()))
        }
        (Some(Removed), Some(_)) => {
            let remove = proto::Remove { deployment_id: id, remove_volumes: false };
            Some((command::Kind::Remove(remove), "the deployment was removed but its container remains".into()))
        }
        _ => None,
    }
}

/// Whether the deployment is to be left alone for now: waiting out a back-off after
/// failed commands, or its newest command expired (its deadline said "not after then";
/// the next change asked for lifts that).
async fn holding_off(conn: &mut PgConnection, deployment: Uuid) -> sqlx::Result<bool> {
    let recent = store::recent_command_states(conn, deployment, 12).await?;
    if recent.first().is_some_and(|(state, _)| state == "expired") {
        return Ok(true);
    }
    let failures = recent.iter().take_while(|(state, _)| state == "failed").count();
    let Some(last) = recent.first().and_then(|(_, at)| *at).filter(|_| failures > 0) else { return Ok(false) };
    let wait = chrono::Duration::from_std(retry_after(u32::try_from(failures).unwrap_or(u32::MAX))).unwrap_or_default();
    Ok(last + wait > Utc::now())
}

/// Compares a droplet's deployments with `inventory` (all its managed containers, as in
/// `Hello`) or, without one, with what it last reported. Returns the commands issued.
pub async fn droplet(fleet: &Fleet, droplet: DropletId, inventory: Option<&[ContainerStatus]>) -> sqlx::Result<usize> {
    let mut tx = fleet.db.begin().await?;
    if store::lock_droplet(&mut tx, droplet.as_uuid()).await?.is_none() {
        return Ok(0);
    }
    let deployments = store::deployments_of(&mut tx, droplet.as_uuid()).await?;
    let observed: HashMap<Uuid, ContainerStatus> = match inventory {
        Some(inventory) => {
            let mut newest: HashMap<Uuid, ContainerStatus> = HashMap::new();
            for container in inventory {
                let Ok(id) = Uuid::try_parse(&container.deployment_id) else { continue };
                if newest.get(&id).is_none_or(|c| c.generation < container.generation) {
                    newest.insert(id, container.clone());
                }
            }
            newest
        }
        None => {
            let rows = store::reported_containers(&mut tx, droplet.as_uuid()).await?;
            rows.into_iter().filter_map(|(id, b)| ContainerStatus::decode(b.as_slice()).ok().map(|c| (id, c))).collect()
        }
    };
    let open = store::deployments_with_open_commands(&mut tx, droplet.as_uuid()).await?;
    let options = Options { requested_by: "reconciler".into(), ..Options::default() };
    let mut issued = 0;
    for row in &deployments {
        if row.failed || open.contains(&Some(row.id)) {
            continue;
        }
        let restarts_on_its_own = deployments::spec_of(fleet, row)
            .ok()
            .and_then(|spec| spec.restart_policy)
            .is_none_or(|policy| policy.mode() != restart_policy::Mode::No);
        let Some((kind, why)) = correction(row, observed.get(&row.id), restarts_on_its_own) else { continue };
        if holding_off(&mut tx, row.id).await? {
            continue;
        }
        let command = commands::issue(&mut tx, droplet.as_uuid(), Some(row.id), kind, &options).await?;
        record(&mut tx, row, &format!("{why} (command {})", command.id)).await?;
        tracing::info!(deployment_id = %row.id, command_id = %command.id, "reconcile: {why}");
        issued += 1;
    }
    // Containers of deployments this fleet does not know, seen in the inventory.
    if inventory.is_some() && !open.contains(&None) {
        for (id, container) in &observed {
            if deployments.iter().any(|d| d.id == *id) || container.state() == ContainerState::Removed {
                continue;
            }
            let remove = proto::Remove { deployment_id: id.to_string(), remove_volumes: true };
            let command =
                commands::issue(&mut tx, droplet.as_uuid(), None, command::Kind::Remove(remove), &options).await?;
            tracing::info!(deployment_id = %id, command_id = %command.id, "reconcile: removing a container of an unknown deployment");
            issued += 1;
        }
    }
    tx.commit().await?;
    Ok(issued)
}

async fn record(conn: &mut PgConnection, row: &DeploymentRow, message: &str) -> sqlx::Result<()> {
    store::insert_event(conn, &row.account, Some(row.droplet_id), Some(row.id), "reconcile", message).await
}

/// Sweeps the droplets `connected` names (those with a session here) every `interval`.
pub fn spawn(
    fleet: &Fleet,
    connected: impl Fn() -> Vec<DropletId> + Send + 'static,
    interval: Duration,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let (fleet, stop) = (fleet.clone(), stop.clone());
    tasks.spawn(async move {
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            for droplet in connected() {
                if let Err(error) = self::droplet(&fleet, droplet, None).await {
                    tracing::warn!(droplet_id = %droplet, %error, "reconciling failed");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_corrections_are_retried_less_and_less_often() {
        assert_eq!(retry_after(1), Duration::from_secs(30));
        assert_eq!(retry_after(2), Duration::from_secs(60));
        assert_eq!(retry_after(5), Duration::from_secs(480));
        assert_eq!(retry_after(6), MAX_RETRY);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }
}
