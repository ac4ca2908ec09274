//! Runs what the control plane asks, one command at a time and in order, beside the
//! session loop (which keeps heartbeating meanwhile).
//!
//! Commands (deploy, start, stop, restart, remove) are acknowledged at once and answered
//! with a `CommandResult` carrying the container as it is afterwards. Requests (inspect,
//! check health) are answered with a `RequestReply`.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla::proto::{
    Command, CommandResult, ContainerEvent, ContainerState, ContainerStatus, Health, HealthStatus, RequestReply,
    agent_message, command,
};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    ledger::Ledger,
    logs::LogStreams,
    runtime::{self, Runtime},
    wire::Wire,
};

/// Commands waiting behind the one running.
const QUEUE: usize = 256;
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Runs commands one at a time, in order, for the agent's whole life. A session that
/// ends does not abandon a command halfway: it runs to its end, its result is recorded,
/// and it is reported on whichever session is open by then (or answered from the record
/// when the control plane sends it again).
#[derive(Clone)]
pub(crate) struct Runner {
    queue: mpsc::Sender<(Command, Result<Runtime, String>)>,
    /// The session results are reported on.
    wire: Arc<watch::Sender<Option<Wire>>>,
    ledger: Ledger,
    /// Commands queued or running: a repeat of one of these is acknowledged, not queued.
    pending: Arc<Mutex<HashSet<String>>>,
}

impl Runner {
    pub(crate) fn start(ledger: Ledger) -> Self {
        let (queue, mut commands) = mpsc::channel::<(Command, Result<Runtime, String>)>(QUEUE);
        let (wire, current) = watch::channel::<Option<Wire>>(None);
        let pending: Arc<Mutex<HashSet<String>>> = Arc::default();
        {
            let (ledger, pending) = (ledger.clone(), pending.clone());
            tokio::spawn(
                async move {
                    while let Some((command, runtime)) = commands.recv().await {
                        let wire = current.borrow().clone();
                        apply(&ledger, &pending, &current, command, runtime, wire).await;
                    }
                }
                .in_current_span(),
            );
        }
        Self { queue, wire: Arc::new(wire), ledger, pending }
    }

    /// Results go out on this session from now on.
    pub(crate) fn attach(&self, wire: Wire) {
        self.wire.send_replace(Some(wire));
    }
}

/// Runs one command to its end, records its result and reports it on the session open by
/// then, if any.
#[tracing::instrument(skip_all, fields(command_id = %command.id, deployment_id = deployment_of(&command)))]
async fn apply(
    ledger: &Ledger,
    pending: &Mutex<HashSet<String>>,
    current: &watch::Receiver<Option<Wire>>,
    command: Command,
    runtime: Result<Runtime, String>,
    wire: Option<Wire>,
) {
    let id = command.id.clone();
    let reply = execute(runtime.as_ref(), command, wire.as_ref()).await;
    // On disk before it is reported: a result the control plane has seen is never
    // applied again.
    if let agent_message::Kind::CommandResult(result) = &reply
        && let Err(error) = ledger.record(result)
    {
        tracing::error!(%error, "could not record a command's result; a repeat of it would run again");
    }
    lock(pending).remove(&id);
    let wire = current.borrow().clone();
    match wire {
        Some(wire) => {
            if let Err(error) = wire.send(reply).await {
                tracing::debug!("result recorded, not reported: {error:#}");
            }
        }
        None => tracing::debug!("result recorded; reported when asked again"),
    }
}

/// The deployment a command or request concerns, if it names one.
fn deployment_of(command: &Command) -> Option<&str> {
    let id = match command.kind.as_ref()? {
        command::Kind::Deploy(deploy) => &deploy.deployment_id,
        command::Kind::Start(start) => &start.deployment_id,
        command::Kind::Stop(stop) => &stop.deployment_id,
        command::Kind::Restart(restart) => &restart.deployment_id,
        command::Kind::Remove(remove) => &remove.deployment_id,
        command::Kind::Inspect(inspect) => &inspect.deployment_id,
        command::Kind::CheckHealth(check) => &check.deployment_id,
        command::Kind::FetchLogs(fetch) => &fetch.deployment_id,
        command::Kind::CancelLogs(_) => return None,
    };
    Some(id.as_str())
}

/// One session's view: requests run here, commands go to the agent's [`Runner`].
pub(crate) struct Executor {
    runner: Runner,
    runtime: Result<Runtime, String>,
    logs: LogStreams,
}

impl Executor {
    pub(crate) fn start(runtime: Result<Runtime, String>, wire: Wire, runner: Runner) -> Self {
        runner.attach(wire);
        Self { runner, runtime, logs: LogStreams::new() }
    }

    /// Commands are acknowledged and queued: they run one at a time, in order. Requests
    /// only read, so they run at once, beside the commands.
    #[tracing::instrument(skip_all, fields(command_id = %command.id, deployment_id = deployment_of(&command)))]
    pub(crate) async fn submit(&self, command: Command, wire: &Wire) {
        match command.kind {
            Some(command::Kind::FetchLogs(fetch)) => match &self.runtime {
                Ok(runtime) => self.logs.fetch(runtime.clone(), wire.clone(), command.id, fetch).await,
                Err(why) => {
                    let reply = failed(&command.id, false, format!("the Docker engine is unavailable: {why}"), None);
                    let _ = wire.send(reply).await;
                }
            },
            Some(command::Kind::CancelLogs(cancel)) => self.logs.cancel(wire, &cancel.request_id).await,
            Some(command::Kind::Inspect(_) | command::Kind::CheckHealth(_)) => {
                let runtime = self.runtime.clone();
                let wire = wire.clone();
                tokio::spawn(
                    async move {
                        let reply = execute(runtime.as_ref(), command, Some(&wire)).await;
                        let _ = wire.send(reply).await;
                    }
                    .in_current_span(),
                );
            }
            _ => {
                let ack = flotilla::proto::CommandAck { command_id: command.id.clone() };
                let _ = wire.send(agent_message::Kind::CommandAck(ack)).await;
                let runner = &self.runner;
                if let Some(result) = runner.ledger.result(&command.id) {
                    // Applied already (before a reconnect, or before this agent restarted):
                    // the same answer again, and Docker is not touched.
                    tracing::info!("a repeated command, answered from the record");
                    let _ = wire.send(agent_message::Kind::CommandResult(result)).await;
                    return;
                }
                if !lock(&runner.pending).insert(command.id.clone()) {
                    // Queued or running (perhaps sent on an earlier session): its result
                    // will come on this one.
                    return;
                }
                if let Err(mpsc::error::TrySendError::Full((command, _))) =
                    runner.queue.try_send((command, self.runtime.clone()))
                {
                    lock(&runner.pending).remove(&command.id);
                    let reply = failed(&command.id, true, "the agent is busy: too many commands queued".into(), None);
                    let _ = wire.send(reply).await;
                }
            }
        }
    }
}

fn lock(pending: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn failed(id: &str, is_command: bool, message: String, container: Option<ContainerStatus>) -> agent_message::Kind {
    failed_for(id, is_command, message, container, None)
}

fn failed_for(
    id: &str,
    is_command: bool,
    message: String,
    container: Option<ContainerStatus>,
    deployment: Option<Uuid>,
) -> agent_message::Kind {
    if is_command {
        agent_message::Kind::CommandResult(CommandResult {
            command_id: id.to_owned(),
            success: false,
            message,
            container,
            finished_at: Some(std::time::SystemTime::now().into()),
            expired: false,
            deployment_id: deployment.map(|d| d.to_string()).unwrap_or_default(),
        })
    } else {
        agent_message::Kind::RequestReply(RequestReply {
            request_id: id.to_owned(),
            success: false,
            message,
            container,
            health: None,
        })
    }
}

fn deployment(id: &str) -> Result<Uuid, String> {
    Uuid::try_parse(id).map_err(|_| format!("deployment_id: {id:?} is not a UUID"))
}

fn grace(d: Option<prost_types::Duration>) -> Duration {
    d.and_then(|d| Duration::try_from(d).ok()).unwrap_or(DEFAULT_GRACE)
}

async fn execute(runtime: Result<&Runtime, &String>, command: Command, wire: Option<&Wire>) -> agent_message::Kind {
    let id = command.id;
    if command
        .deadline
        .and_then(|d| std::time::SystemTime::try_from(d).ok())
        .is_some_and(|d| d < std::time::SystemTime::now())
    {
        let mut reply = failed(&id, true, "the command's deadline passed before it could run".into(), None);
        if let agent_message::Kind::CommandResult(result) = &mut reply {
            result.expired = true;
        }
        return reply;
    }
    let Some(kind) = command.kind else {
        return failed(&id, true, "an empty command".into(), None);
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(why) => {
            let is_command = !matches!(kind, command::Kind::Inspect(_) | command::Kind::CheckHealth(_));
            return failed(&id, is_command, format!("the Docker engine is unavailable: {why}"), None);
        }
    };
    tracing::info!(kind = kind.name(), "running");
    let outcome: Result<Option<ContainerStatus>, (String, Option<Uuid>)> = match &kind {
        command::Kind::Deploy(deploy) => match runtime::validate(deploy) {
            Err(invalid) => Err((invalid, None)),
            Ok((deployment, generation, spec)) => runtime
                .deploy(deployment, generation, &spec, &|detail| pull_progress(wire, deployment, generation, detail))
                .await
                .map(Some)
                .map_err(|e| (e.to_string(), Some(deployment))),
        },
        command::Kind::Start(start) => match deployment(&start.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.start(d).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::Stop(stop) => match deployment(&stop.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.stop(d, grace(stop.grace)).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::Restart(restart) => match deployment(&restart.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.restart(d, grace(restart.grace)).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::Remove(remove) => match deployment(&remove.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime
                .remove(d, remove.remove_volumes)
                .await
                .map(|()| {
                    Some(ContainerStatus {
                        deployment_id: d.to_string(),
                        state: ContainerState::Removed as i32,
                        ..Default::default()
                    })
                })
                .map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::Inspect(inspect) => match deployment(&inspect.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.status(d).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::CheckHealth(check) => match deployment(&check.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => return check_health(runtime, &id, d).await,
        },
        // Served by `LogStreams`, never queued.
        command::Kind::FetchLogs(_) | command::Kind::CancelLogs(_) => {
            Err(("log requests are not commands".into(), None))
        }
    };
    let is_command = !matches!(
        kind,
        command::Kind::Inspect(_)
            | command::Kind::CheckHealth(_)
            | command::Kind::FetchLogs(_)
            | command::Kind::CancelLogs(_)
    );
    match outcome {
        Ok(container) if is_command => agent_message::Kind::CommandResult(CommandResult {
            command_id: id,
            success: true,
            message: String::new(),
            deployment_id: container.as_ref().map(|c| c.deployment_id.clone()).unwrap_or_default(),
            container,
            finished_at: Some(std::time::SystemTime::now().into()),
            expired: false,
        }),
        Ok(container) => agent_message::Kind::RequestReply(RequestReply {
            request_id: id,
            success: true,
            message: String::new(),
            health: container.as_ref().and_then(|c| c.health.clone()),
            container,
        }),
        Err((message, deployment)) => {
            tracing::warn!("failed: {message}");
            // Report the container as it is now, so the control plane's view stays true.
            let container = match deployment {
                Some(d) => runtime.status(d).await.ok(),
                None => None,
            };
            failed_for(&id, is_command, message, container, deployment)
        }
    }
}

/// Pull progress, as an event of the deployment (there is no container yet). Progress is
/// nice to have: when the session's queue is full it is dropped rather than waited for.
fn pull_progress(wire: Option<&Wire>, deployment: Uuid, generation: u64, detail: String) {
    let Some(wire) = wire else { return };
    let container = ContainerStatus { deployment_id: deployment.to_string(), generation, ..Default::default() };
    let event = ContainerEvent {
        container: Some(container),
        action: "pull".into(),
        exit_code: None,
        at: Some(std::time::SystemTime::now().into()),
        detail,
    };
    if !wire.try_send(agent_message::Kind::ContainerEvent(event)) {
        tracing::debug!(%deployment, "pull progress not reported: the session is busy");
    }
}

/// Probes the deployment's container now, the way its health check says.
async fn check_health(runtime: &Runtime, id: &str, deployment: Uuid) -> agent_message::Kind {
    let reply = |success: bool, message: String, container: Option<ContainerStatus>, health: Option<HealthStatus>| {
        agent_message::Kind::RequestReply(RequestReply {
            request_id: id.to_owned(),
            success,
            message,
            container,
            health,
        })
    };
    let status = match runtime.status(deployment).await {
        Ok(status) => status,
        Err(error) => return reply(false, error.to_string(), None, None),
    };
    if status.state() != ContainerState::Running {
        let message = format!("the container is not running (it is {})", status.state().as_str_name());
        return reply(false, message, Some(status), None);
    }
    let target = match runtime.probe_target(deployment).await {
        Ok(Some(target)) => target,
        Ok(None) => {
            let message = "the deployment has no health check".to_owned();
            return reply(false, message, Some(status), None);
        }
        Err(error) => return reply(false, error.to_string(), Some(status), None),
    };
    let outcome = runtime::probe::probe(&target).await;
    let health = HealthStatus {
        health: if outcome.ok { Health::Healthy } else { Health::Unhealthy } as i32,
        detail: outcome.detail,
        latency: prost_types::Duration::try_from(outcome.latency).ok(),
        checked_at: Some(std::time::SystemTime::now().into()),
        consecutive_failures: u32::from(!outcome.ok),
    };
    let mut container = target.status;
    container.mcp_server = outcome.server;
    reply(true, String::new(), Some(container), Some(health))
}
