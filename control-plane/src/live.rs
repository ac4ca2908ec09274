//! Live reads of a deployment, answered by its droplet now and never stored: inspect,
//! check health, logs (DESIGN.md, "Two kinds of traffic": requests, unlike commands,
//! are not in the ledger; a request to a droplet without a session fails at once).

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        CancelLogs, CheckHealth, Command, FetchLogs, Inspect, LogEntry, RequestReply, TailLogsRequest, command,
        control_message,
    },
};
use futures::Stream;
use tokio::sync::oneshot;
use tonic::Status;
use uuid::Uuid;

use crate::{
    requests::{LogItem, Waiter, log_queue},
    sessions::{RequestError, Sessions},
    state::State,
    store,
};

/// How long a droplet has to answer `Inspect` or `CheckHealth` (a health probe has its
/// own, shorter, timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn parse(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a UUID")))
}

/// The droplet a deployment runs on.
async fn droplet_of(state: &State, deployment: Uuid) -> Result<DropletId, Status> {
    match store::get_deployment(&state.db, deployment).await {
        Ok(Some(row)) if row.desired_state == "removed" => {
            Err(Status::failed_precondition(format!("deployment {deployment} was removed")))
        }
        Ok(Some(row)) => Ok(DropletId::from_uuid(row.droplet_id)),
        Ok(None) => Err(Status::not_found(format!("deployment {deployment} not found"))),
        Err(error) => {
            tracing::error!(%error, "database error");
            Err(Status::unavailable("the control plane's database is unavailable; try again"))
        }
    }
}

fn request_error(droplet: DropletId, error: RequestError) -> Status {
    match error {
        RequestError::NotConnected => Status::failed_precondition(format!(
            "droplet {droplet} is not connected to this control plane; live requests need its session"
        )),
        RequestError::Busy => Status::resource_exhausted(format!("droplet {droplet}: {error}; try again shortly")),
    }
}

/// A request in flight. Dropping it (the caller hung up, timed out, or finished) forgets
/// the request; a log stream still open is cancelled on the droplet too.
struct InFlight {
    sessions: Sessions,
    droplet: DropletId,
    id: Uuid,
    logs: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.sessions.forget_request(self.droplet, self.id) && self.logs {
            let cancel = Command {
                id: Uuid::new_v4().to_string(),
                deadline: None,
                kind: Some(command::Kind::CancelLogs(CancelLogs { request_id: self.id.to_string() })),
            };
            self.sessions.send(self.droplet, control_message::Kind::Command(cancel));
        }
    }
}

fn send(
    state: &State,
    droplet: DropletId,
    waiter: Waiter,
    kind: command::Kind,
    logs: bool,
) -> Result<InFlight, Status> {
    let id = Uuid::new_v4();
    let command = Command { id: id.to_string(), deadline: None, kind: Some(kind) };
    state
        .sessions
        .request(droplet, id, waiter, control_message::Kind::Command(command))
        .map_err(|e| request_error(droplet, e))?;
    Ok(InFlight { sessions: state.sessions.clone(), droplet, id, logs })
}

/// Sends a request and waits for its answer.
async fn ask(state: &State, deployment: Uuid, kind: command::Kind) -> Result<RequestReply, Status> {
    let droplet = droplet_of(state, deployment).await?;
    let (tx, rx) = oneshot::channel();
    let _in_flight = send(state, droplet, Waiter::Reply(tx), kind, false)?;
    match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "droplet {droplet} did not answer within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))),
        Ok(Err(_)) => {
            Err(Status::unavailable(format!("droplet {droplet}'s session ended before it answered; try again")))
        }
        Ok(Ok(reply)) if !reply.success => {
            Err(Status::failed_precondition(format!("droplet {droplet} answered: {}", reply.message)))
        }
        Ok(Ok(reply)) => Ok(reply),
    }
}

pub async fn inspect(state: &State, id: &str) -> Result<flotilla::proto::ContainerStatus, Status> {
    let deployment = parse("id", id)?;
    let reply =
        ask(state, deployment, command::Kind::Inspect(Inspect { deployment_id: deployment.to_string() })).await?;
    reply.container.ok_or_else(|| Status::internal("the droplet's answer carried no container"))
}

pub async fn check_health(state: &State, id: &str) -> Result<flotilla::proto::CheckDeploymentHealthResponse, Status> {
    let deployment = parse("id", id)?;
    let kind = command::Kind::CheckHealth(CheckHealth { deployment_id: deployment.to_string() });
    let reply = ask(state, deployment, kind).await?;
    Ok(flotilla::proto::CheckDeploymentHealthResponse { health: reply.health, container: reply.container })
}

/// Streams a deployment's logs from its droplet.
pub async fn tail_logs(
    state: &State,
    request: TailLogsRequest,
) -> Result<impl Stream<Item = Result<LogEntry, Status>> + Send + 'static, Status> {
    let deployment = parse("deployment_id", &request.deployment_id)?;
    let droplet = droplet_of(state, deployment).await?;
    let (tx, rx) = log_queue();
    let fetch = FetchLogs {
        deployment_id: deployment.to_string(),
        tail: request.tail,
        since: request.since,
        follow: request.follow,
    };
    let in_flight = send(state, droplet, Waiter::Logs(tx), command::Kind::FetchLogs(fetch), true)?;
    Ok(futures::stream::unfold((rx, Some(in_flight)), move |(mut rx, in_flight)| async move {
        // `None`: the stream has ended (its last item was yielded).
        let in_flight = in_flight?;
        let entry = |c: flotilla::proto::LogChunk| LogEntry {
            stream: c.stream,
            data: c.data,
            at: c.at,
            dropped_bytes: c.dropped_bytes,
        };
        match rx.recv().await {
            Some(LogItem::Chunk(chunk)) if chunk.end => {
                if chunk.data.is_empty() && chunk.dropped_bytes == 0 {
                    None
                } else {
                    Some((Ok(entry(chunk)), (rx, None)))
                }
            }
            Some(LogItem::Chunk(chunk)) => Some((Ok(entry(chunk)), (rx, Some(in_flight)))),
            Some(LogItem::Failed(message)) => {
                Some((Err(Status::failed_precondition(format!("droplet {droplet} answered: {message}"))), (rx, None)))
            }
            None => Some((
                Err(Status::unavailable(format!("droplet {droplet}'s session ended; the log stream is cut"))),
                (rx, None),
            )),
        }
    }))
}
