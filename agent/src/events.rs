//! Live state from the engine itself: the agent follows Docker's event stream for its own
//! containers (start, die with exit code, oom, restart, health, destroy) and reports each
//! as a `ContainerEvent` carrying the container as it is right after.
//!
//! A container that keeps failing under an `on-failure` restart policy is stopped by the
//! engine once it has used its retries; the agent reports it `CRASH_LOOPING` then, and it is
//! left stopped.

use std::{collections::HashMap, time::Duration};

use bollard::{
    Docker,
    query_parameters::{EventsOptionsBuilder, InspectContainerOptions},
};
use flotilla::proto::{ContainerEvent, ContainerState, ContainerStatus, agent_message};
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::{
    labels,
    runtime::{Runtime, status::status_of},
    wire::Wire,
};

/// Docker actions worth reporting; others (attach, exec_*, ...) are noise.
fn reported(action: &str) -> bool {
    matches!(action, "start" | "die" | "oom" | "restart" | "destroy" | "stop" | "kill")
        || action.starts_with("health_status")
}

pub(crate) struct Follower {
    task: JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    pub(crate) fn start(docker: Docker, runtime: Runtime, wire: Wire) -> Self {
        let task = tokio::spawn(
            async move {
                loop {
                    follow(&docker, &runtime, &wire).await;
                    if wire.is_closed() {
                        return;
                    }
                    // The stream ended (engine restart?): subscribe again shortly.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            .in_current_span(),
        );
        Self { task }
    }
}

async fn follow(docker: &Docker, runtime: &Runtime, wire: &Wire) {
    let filters =
        HashMap::from([("type", vec!["container".to_owned()]), ("label", labels::managed_by(runtime.droplet()))]);
    let mut events = docker.events(Some(EventsOptionsBuilder::default().filters(&filters).build()));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::debug!(%error, "the Docker event stream broke");
                return;
            }
        };
        let Some(action) = event.action.filter(|a| reported(a)) else { continue };
        let actor = event.actor.unwrap_or_default();
        let attributes = actor.attributes.unwrap_or_default();
        // The engine filtered on our labels; check again rather than trust a filter.
        if attributes.get(labels::DROPLET) != Some(&runtime.droplet().to_string()) {
            continue;
        }
        let id = actor.id.unwrap_or_default();
        let exit_code = attributes.get("exitCode").and_then(|c| c.parse::<i64>().ok());
        let (container, detail) = match docker.inspect_container(&id, None::<InspectContainerOptions>).await {
            Ok(found) => {
                let mut status = status_of(&found);
                let detail = crash_loop(&found, &mut status);
                (status, detail)
            }
            // Gone (destroy): report what the event says.
            Err(_) => (
                ContainerStatus {
                    deployment_id: attributes.get(labels::DEPLOYMENT).cloned().unwrap_or_default(),
                    generation: attributes.get(labels::GENERATION).and_then(|g| g.parse().ok()).unwrap_or(0),
                    container_id: id.clone(),
                    name: attributes.get("name").cloned().unwrap_or_default(),
                    state: if action == "destroy" { ContainerState::Removed } else { ContainerState::Dead } as i32,
                    ..Default::default()
                },
                String::new(),
            ),
        };
        tracing::info!(deployment_id = %container.deployment_id, %action, ?exit_code, "container event");
        let event = ContainerEvent {
            container: Some(container),
            action: action.clone(),
            exit_code: if action == "die" { exit_code } else { None },
            at: Some(std::time::SystemTime::now().into()),
            detail,
        };
        if wire.send(agent_message::Kind::ContainerEvent(event)).await.is_err() {
            return;
        }
    }
}

/// Marks `status` crash-looping when the engine has given up restarting it: exited with
/// a failure after using every retry of its `on-failure` policy. Returns why, or "".
fn crash_loop(found: &bollard::models::ContainerInspectResponse, status: &mut ContainerStatus) -> String {
    let policy = found.host_config.as_ref().and_then(|h| h.restart_policy.as_ref());
    let on_failure = policy.and_then(|p| p.name) == Some(bollard::models::RestartPolicyNameEnum::ON_FAILURE);
    let max = policy.and_then(|p| p.maximum_retry_count).unwrap_or(0);
    let restarts = found.restart_count.unwrap_or(0);
    let exit = found.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0);
    let exited = status.state() == ContainerState::Exited;
    if on_failure && exited && exit != 0 && restarts >= max {
        status.state = ContainerState::CrashLooping as i32;
        format!("exited with code {exit} after {restarts} restarts (the cap is {max}); left stopped")
    } else {
        String::new()
    }
}
