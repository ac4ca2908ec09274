//! Live reads of a deployment, answered by its droplet now and never stored: inspect,
//! check health, logs (DESIGN.md, "Two kinds of traffic": requests, unlike commands,
//! are not in the ledger; a request to a droplet without a session fails at once).
//!
//! A request may land on any replica. When the droplet's session is on another one, the
//! request is forwarded to that replica's API (marked, so it is never forwarded twice),
//! as Nomad servers forward to the server holding a client's connection.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        CancelLogs, CheckDeploymentHealthRequest, CheckDeploymentHealthResponse, CheckHealth, Command, ContainerStatus,
        FetchLogs, Inspect, InspectDeploymentRequest, LogEntry, RequestReply, TailLogsRequest, command,
        control_message, fleet_client::FleetClient,
    },
};
use futures::Stream;
use tokio::sync::oneshot;
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};
use uuid::Uuid;

use crate::{
    session::Agents,
    session::registry::{RequestError, Sessions},
    session::requests::{LogItem, Waiter, log_queue},
    store,
};

/// How long a droplet has to answer `Inspect` or `CheckHealth` (a health probe has its
/// own, shorter, timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn parse(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a UUID")))
}

/// The droplet a deployment runs on.
async fn droplet_of(agents: &Agents, deployment: Uuid) -> Result<DropletId, Status> {
    match store::get_deployment(agents.db(), deployment).await {
        Ok(Some(row)) if row.is_removed() => {
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
    agents: &Agents,
    droplet: DropletId,
    waiter: Waiter,
    kind: command::Kind,
    logs: bool,
) -> Result<InFlight, RequestError> {
    let id = Uuid::new_v4();
    let command = Command { id: id.to_string(), deadline: None, kind: Some(kind) };
    agents.sessions.request(droplet, id, waiter, control_message::Kind::Command(command))?;
    Ok(InFlight { sessions: agents.sessions.clone(), droplet, id, logs })
}

/// Metadata on a request one replica forwards to another: it is never forwarded again.
pub const FORWARDED: &str = "flotilla-forwarded-by";

/// A client of the replica holding the droplet's session, when that is another replica
/// and this request was not forwarded already; otherwise the "not connected" error.
async fn holder(agents: &Agents, droplet: DropletId, origin: &Origin) -> Result<FleetClient<Channel>, Status> {
    let not_connected = || request_error(droplet, RequestError::NotConnected);
    if origin.forwarded {
        return Err(not_connected());
    }
    let address = match store::holder_api(agents.db(), droplet, agents.replica).await {
        Ok(Some(address)) => address,
        Ok(None) => return Err(not_connected()),
        Err(error) => {
            tracing::error!(%error, "database error");
            return Err(Status::unavailable("the control plane's database is unavailable; try again"));
        }
    };
    let bad_address = || Status::internal(format!("the replica holding droplet {droplet} advertises a bad address"));
    let scheme = if agents.forward_tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|_| bad_address())?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = agents.forward_tls.clone() {
        endpoint = endpoint.tls_config(tls).map_err(|_| bad_address())?;
    }
    match endpoint.connect().await {
        Ok(channel) => Ok(FleetClient::new(channel)),
        Err(error) => {
            tracing::warn!(%error, %address, "could not reach the replica holding a droplet's session");
            Err(Status::unavailable(format!(
                "the control plane replica holding droplet {droplet}'s session cannot be reached; try again"
            )))
        }
    }
}

/// Where a live request came from: a client, or another replica passing one on.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Another replica sent it: it is never forwarded again.
    pub forwarded: bool,
    /// The caller's credentials, passed on so the replica holding the session checks
    /// them again (every replica decides access for itself).
    pub authorization: Option<tonic::metadata::AsciiMetadataValue>,
}

impl Origin {
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Self {
        Self { forwarded: metadata.contains_key(FORWARDED), authorization: metadata.get("authorization").cloned() }
    }
}

/// `message` as a request forwarded by this replica.
fn forward<T>(agents: &Agents, message: T, origin: &Origin) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = agents.replica.to_string().parse() {
        request.metadata_mut().insert(FORWARDED, value);
    }
    if let Some(authorization) = origin.authorization.clone() {
        request.metadata_mut().insert("authorization", authorization);
    }
    request
}

/// Why `ask` got no answer.
enum Unanswered {
    /// The droplet has no session here.
    NotHere(DropletId),
    Failed(Status),
}

impl From<Status> for Unanswered {
    fn from(status: Status) -> Self {
        Self::Failed(status)
    }
}

/// Sends a request and waits for its answer.
async fn ask(agents: &Agents, deployment: Uuid, kind: command::Kind) -> Result<RequestReply, Unanswered> {
    let droplet = droplet_of(agents, deployment).await?;
    let (tx, rx) = oneshot::channel();
    let _in_flight = match send(agents, droplet, Waiter::Reply(tx), kind, false) {
        Ok(in_flight) => in_flight,
        Err(RequestError::NotConnected) => return Err(Unanswered::NotHere(droplet)),
        Err(error) => return Err(request_error(droplet, error).into()),
    };
    let answered = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
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
    };
    Ok(answered?)
}

pub async fn inspect(agents: &Agents, id: &str, origin: &Origin) -> Result<ContainerStatus, Status> {
    let deployment = parse("id", id)?;
    let kind = command::Kind::Inspect(Inspect { deployment_id: deployment.to_string() });
    match ask(agents, deployment, kind).await {
        Ok(reply) => reply.container.ok_or_else(|| Status::internal("the droplet's answer carried no container")),
        Err(Unanswered::Failed(status)) => Err(status),
        Err(Unanswered::NotHere(droplet)) => {
            let request = forward(agents, InspectDeploymentRequest { id: id.to_owned() }, origin);
            Ok(holder(agents, droplet, origin).await?.inspect_deployment(request).await?.into_inner())
        }
    }
}

pub async fn check_health(agents: &Agents, id: &str, origin: &Origin) -> Result<CheckDeploymentHealthResponse, Status> {
    let deployment = parse("id", id)?;
    let kind = command::Kind::CheckHealth(CheckHealth { deployment_id: deployment.to_string() });
    match ask(agents, deployment, kind).await {
        Ok(reply) => Ok(CheckDeploymentHealthResponse { health: reply.health, container: reply.container }),
        Err(Unanswered::Failed(status)) => Err(status),
        Err(Unanswered::NotHere(droplet)) => {
            let request = forward(agents, CheckDeploymentHealthRequest { id: id.to_owned() }, origin);
            Ok(holder(agents, droplet, origin).await?.check_deployment_health(request).await?.into_inner())
        }
    }
}

/// A stream of log entries, from this replica's session or forwarded from another's.
pub type LogStream = std::pin::Pin<Box<dyn Stream<Item = Result<LogEntry, Status>> + Send>>;

/// Streams a deployment's logs from its droplet.
pub async fn tail_logs(agents: &Agents, request: TailLogsRequest, origin: &Origin) -> Result<LogStream, Status> {
    let deployment = parse("deployment_id", &request.deployment_id)?;
    let droplet = droplet_of(agents, deployment).await?;
    let (tx, rx) = log_queue();
    let fetch = FetchLogs {
        deployment_id: deployment.to_string(),
        tail: request.tail,
        since: request.since,
        follow: request.follow,
    };
    let in_flight = match send(agents, droplet, Waiter::Logs(tx), command::Kind::FetchLogs(fetch), true) {
        Ok(in_flight) => in_flight,
        Err(RequestError::NotConnected) => {
            // The stream of the replica holding the session, passed through as it comes
            // (its bounds and drop markers apply); hanging up here hangs up there.
            let mut holder = holder(agents, droplet, origin).await?;
            let stream = holder.tail_logs(forward(agents, request, origin)).await?.into_inner();
            return Ok(Box::pin(stream));
        }
        Err(error) => return Err(request_error(droplet, error)),
    };
    Ok(Box::pin(futures::stream::unfold((rx, Some(in_flight)), move |(mut rx, in_flight)| async move {
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
    })))
}
