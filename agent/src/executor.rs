//! Runs what the control plane asks, one command at a time and in order, beside the
//! session loop (which keeps heartbeating meanwhile).
//!
//! Commands (deploy, start, stop, restart, remove) are acknowledged at once and answered
//! with a `CommandResult` carrying the container as it is afterwards. Requests (inspect,
//! check health) are answered with a `RequestReply`.

use std::time::Duration;

use flotilla::proto::{Command, CommandResult, ContainerStatus, RequestReply, agent_message, command};
use tokio::{sync::mpsc, task::JoinHandle};
use uuid::Uuid;

use crate::{
    link::Wire,
    runtime::{self, Runtime},
};

/// Commands waiting behind the one running.
const QUEUE: usize = 256;
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

pub(crate) struct Executor {
    queue: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Drop for Executor {
    fn drop(&mut self) {
        // The session is over: whatever it was running is abandoned with it.
        self.task.abort();
    }
}

impl Executor {
    pub(crate) fn start(runtime: Result<Runtime, String>, wire: Wire) -> Self {
        let (queue, mut commands) = mpsc::channel::<Command>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                let id = command.id.clone();
                let reply = execute(runtime.as_ref(), command).await;
                if let Err(error) = wire.send(reply).await {
                    tracing::debug!(command_id = %id, "could not report a result: {error:#}");
                    return;
                }
            }
        });
        Self { queue, task }
    }

    /// Acknowledges a command and queues it.
    pub(crate) async fn submit(&self, command: Command, wire: &Wire) {
        let is_command = matches!(
            command.kind,
            Some(
                command::Kind::Deploy(_)
                    | command::Kind::Start(_)
                    | command::Kind::Stop(_)
                    | command::Kind::Restart(_)
                    | command::Kind::Remove(_)
            )
        );
        if is_command {
            let ack = flotilla::proto::CommandAck { command_id: command.id.clone() };
            let _ = wire.send(agent_message::Kind::CommandAck(ack)).await;
        }
        if let Err(mpsc::error::TrySendError::Full(command)) = self.queue.try_send(command) {
            let reply = failed(&command.id, is_command, "the agent is busy: too many commands queued".into(), None);
            let _ = wire.send(reply).await;
        }
    }
}

fn failed(id: &str, is_command: bool, message: String, container: Option<ContainerStatus>) -> agent_message::Kind {
    if is_command {
        agent_message::Kind::CommandResult(CommandResult {
            command_id: id.to_owned(),
            success: false,
            message,
            container,
            finished_at: Some(std::time::SystemTime::now().into()),
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

async fn execute(runtime: Result<&Runtime, &String>, command: Command) -> agent_message::Kind {
    let id = command.id;
    if command
        .deadline
        .and_then(|d| std::time::SystemTime::try_from(d).ok())
        .is_some_and(|d| d < std::time::SystemTime::now())
    {
        return failed(&id, true, "the command's deadline passed before it could run".into(), None);
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
    tracing::info!(command_id = %id, kind = kind_name(&kind), "running");
    let outcome: Result<Option<ContainerStatus>, (String, Option<Uuid>)> = match &kind {
        command::Kind::Deploy(deploy) => match runtime::validate(deploy) {
            Err(invalid) => Err((invalid, None)),
            Ok((deployment, generation, spec)) => runtime
                .deploy(deployment, generation, &spec)
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
            Ok(d) => {
                runtime.remove(d, remove.remove_volumes).await.map(|()| None).map_err(|e| (e.to_string(), Some(d)))
            }
        },
        command::Kind::Inspect(inspect) => match deployment(&inspect.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.status(d).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::CheckHealth(check) => match deployment(&check.deployment_id) {
            Err(e) => Err((e, None)),
            Ok(d) => runtime.status(d).await.map(Some).map_err(|e| (e.to_string(), Some(d))),
        },
        command::Kind::FetchLogs(_) | command::Kind::CancelLogs(_) => {
            Err(("log streaming is not available in this agent version".into(), None))
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
            container,
            finished_at: Some(std::time::SystemTime::now().into()),
        }),
        Ok(container) => agent_message::Kind::RequestReply(RequestReply {
            request_id: id,
            success: true,
            message: String::new(),
            health: container.as_ref().and_then(|c| c.health.clone()),
            container,
        }),
        Err((message, deployment)) => {
            tracing::warn!(command_id = %id, "failed: {message}");
            // Report the container as it is now, so the control plane's view stays true.
            let container = match deployment {
                Some(d) => runtime.status(d).await.ok(),
                None => None,
            };
            failed(&id, is_command, message, container)
        }
    }
}

fn kind_name(kind: &command::Kind) -> &'static str {
    match kind {
        command::Kind::Deploy(_) => "deploy",
        command::Kind::Start(_) => "start",
        command::Kind::Stop(_) => "stop",
        command::Kind::Restart(_) => "restart",
        command::Kind::Remove(_) => "remove",
        command::Kind::CheckHealth(_) => "check-health",
        command::Kind::FetchLogs(_) => "fetch-logs",
        command::Kind::CancelLogs(_) => "cancel-logs",
        command::Kind::Inspect(_) => "inspect",
    }
}
