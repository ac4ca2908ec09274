//! `Fleet`: the API operators, scripts and Supabase call.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        self, CreateDeploymentRequest, CreateEnrollmentTokenRequest, CreateEnrollmentTokenResponse,
        DeleteDropletRequest, DeleteDropletResponse, Deployment, Droplet, EnrollmentToken, GetDeploymentRequest,
        GetDropletRequest, HostFacts, HostLoad, ListDropletsRequest, ListDropletsResponse, ListEnrollmentTokensRequest,
        ListEnrollmentTokensResponse, ListToolsRequest, ListToolsResponse, ProtocolVersion,
        RevokeEnrollmentTokenRequest, fleet_server::Fleet,
    },
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    commands::{self, Options},
    deployments::{self, Verb},
    enrollment, live,
    state::State,
    store::{self, DropletRow, DropletStatus},
};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
const PAGE_TOKEN_PREFIX: &str = "droplets/after/";

pub struct FleetApi {
    db: PgPool,
    state: State,
}

impl FleetApi {
    pub fn new(state: State) -> Self {
        Self { db: state.db.clone(), state }
    }
}

/// Database failures are logged here and reach the client only as `Unavailable`.
fn db_error(error: sqlx::Error) -> Status {
    tracing::error!(%error, "database error");
    Status::unavailable("the control plane's database is unavailable; try again")
}

fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a UUID")))
}

/// `InvalidArgument` naming every bad field in the message and, for programs, as a
/// `google.rpc.BadRequest` detail (one field violation each).
pub fn invalid_spec(invalid: &flotilla::spec::SpecError) -> Status {
    use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};
    let violations: Vec<FieldViolation> = invalid
        .violations
        .iter()
        .map(|v| FieldViolation::new(format!("spec.{}", v.field), v.description.clone()))
        .collect();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        invalid.to_string(),
        ErrorDetails::with_bad_request(violations),
    )
}

fn deployment_status(error: deployments::DeploymentError) -> Status {
    use deployments::DeploymentError as E;
    match error {
        E::Invalid(invalid) => invalid_spec(&invalid),
        E::NoDroplet(_) | E::NotFound(_) => Status::not_found(error.to_string()),
        E::Removed(_) => Status::failed_precondition(error.to_string()),
        E::KeyReused => Status::already_exists(error.to_string()),
        E::Unreadable(_) => {
            tracing::error!(%error, "unreadable deployment");
            Status::internal("the deployment's stored spec cannot be read")
        }
        E::Database(error) => db_error(error),
    }
}

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(300);

/// How a change's command is to be issued, from the request.
fn options(options: Option<proto::CommandOptions>, remote: Option<std::net::SocketAddr>) -> Result<Options, Status> {
    let mut options = Options::try_from(options).map_err(Status::invalid_argument)?;
    options.requested_by = remote.map(|a| format!("api {}", a.ip())).unwrap_or_else(|| "api".into());
    Ok(options)
}

fn command_page_token(token: &str) -> Result<(DateTime<Utc>, Uuid), Status> {
    let bad = || Status::invalid_argument("page_token: not a token this API issued");
    let text = URL_SAFE_NO_PAD.decode(token).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(bad)?;
    let rest = text.strip_prefix("commands/before/").ok_or_else(bad)?;
    let (micros, id) = rest.split_once('/').ok_or_else(bad)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
    Ok((at, Uuid::try_parse(id).map_err(|_| bad())?))
}

/// A grace period from the API: at most an hour (Docker counts it in whole seconds).
fn grace(grace: Option<prost_types::Duration>) -> Result<Option<prost_types::Duration>, Status> {
    let Some(d) = grace else { return Ok(None) };
    match Duration::try_from(d) {
        Ok(d) if d <= Duration::from_secs(3600) => Ok(Some(d.try_into().unwrap_or_default())),
        _ => Err(Status::invalid_argument("grace: must be between 0 and 1 hour")),
    }
}

impl FleetApi {
    async fn lifecycle(&self, id: Uuid, verb: Verb, options: Options) -> Result<Response<Deployment>, Status> {
        let deployment = deployments::lifecycle(&self.state, id, verb, &options).await.map_err(deployment_status)?;
        tracing::info!(deployment_id = %id, ?verb, "deployment lifecycle");
        Ok(Response::new(deployment))
    }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn create_deployment(
        &self,
        request: Request<CreateDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let droplet = DropletId::from_uuid(parse_id("droplet_id", &request.droplet_id)?);
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let created =
            deployments::create(&self.state, droplet, &request.name, spec, &options(request.options, remote)?)
                .await
                .map_err(deployment_status)?;
        tracing::info!(deployment_id = %created.id, droplet_id = %droplet, "deployment created");
        Ok(Response::new(created))
    }

    async fn list_tools(&self, request: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let id = parse_id("deployment_id", &request.get_ref().deployment_id)?;
        Ok(Response::new(deployments::tools(&self.state, id).await.map_err(deployment_status)?))
    }

    async fn get_deployment(&self, request: Request<GetDeploymentRequest>) -> Result<Response<Deployment>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        Ok(Response::new(deployments::get(&self.state, id).await.map_err(deployment_status)?))
    }

    async fn start_deployment(
        &self,
        request: Request<proto::StartDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        self.lifecycle(id, Verb::Start, options(request.options, remote)?).await
    }

    async fn stop_deployment(
        &self,
        request: Request<proto::StopDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        self.lifecycle(id, Verb::Stop { grace: grace(request.grace)? }, options(request.options, remote)?).await
    }

    async fn restart_deployment(
        &self,
        request: Request<proto::RestartDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        self.lifecycle(id, Verb::Restart { grace: grace(request.grace)? }, options(request.options, remote)?).await
    }

    async fn remove_deployment(
        &self,
        request: Request<proto::RemoveDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        self.lifecycle(id, Verb::Remove { volumes: request.remove_volumes }, options(request.options, remote)?).await
    }

    async fn update_deployment(
        &self,
        request: Request<proto::UpdateDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let options = options(request.options, remote)?;
        Ok(Response::new(deployments::update(&self.state, id, spec, &options).await.map_err(deployment_status)?))
    }

    async fn get_command(
        &self,
        request: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::CommandRecord>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        let row = commands::get(&self.db, id).await.map_err(db_error)?;
        let row = row.ok_or_else(|| Status::not_found(format!("command {id} not found")))?;
        Ok(Response::new(commands::to_proto(&row)))
    }

    async fn list_commands(
        &self,
        request: Request<proto::ListCommandsRequest>,
    ) -> Result<Response<proto::ListCommandsResponse>, Status> {
        let request = request.into_inner();
        let optional = |field: &str, value: &str| {
            if value.is_empty() { Ok(None) } else { parse_id(field, value).map(Some) }
        };
        let droplet = optional("droplet_id", &request.droplet_id)?;
        let deployment = optional("deployment_id", &request.deployment_id)?;
        if droplet.is_none() && deployment.is_none() {
            return Err(Status::invalid_argument("droplet_id, deployment_id: give at least one"));
        }
        let state = match request.state() {
            proto::command_record::State::Unspecified => None,
            state => Some(state.as_str_name().trim_start_matches("STATE_").to_lowercase()),
        };
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!("page_size: at most {MAX_PAGE_SIZE}")));
            }
            n => n,
        };
        let before = if request.page_token.is_empty() { None } else { Some(command_page_token(&request.page_token)?) };
        let rows = commands::list(&self.db, droplet, deployment, state.as_deref(), before, i64::from(limit) + 1)
            .await
            .map_err(db_error)?;
        let more = rows.len() > limit as usize;
        let rows = &rows[..rows.len().min(limit as usize)];
        let next_page_token = match rows.last() {
            Some(last) if more => {
                URL_SAFE_NO_PAD.encode(format!("commands/before/{}/{}", last.created_at.timestamp_micros(), last.id))
            }
            _ => String::new(),
        };
        Ok(Response::new(proto::ListCommandsResponse {
            commands: rows.iter().map(commands::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn wait_command(
        &self,
        request: Request<proto::WaitCommandRequest>,
    ) -> Result<Response<proto::CommandRecord>, Status> {
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        let timeout = match request.timeout.map(Duration::try_from) {
            None => DEFAULT_WAIT,
            Some(Ok(t)) if t <= MAX_WAIT => t,
            Some(_) => return Err(Status::invalid_argument("timeout: must be between 0 and 5 minutes")),
        };
        // Subscribed before reading, so a completion in between is not missed.
        let mut done = self.state.completions.subscribe();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let row = commands::get(&self.db, id).await.map_err(db_error)?;
            let row = row.ok_or_else(|| Status::not_found(format!("command {id} not found")))?;
            if commands::is_final(&row.state) {
                return Ok(Response::new(commands::to_proto(&row)));
            }
            loop {
                match tokio::time::timeout_at(until, done.recv()).await {
                    Err(_) => return Ok(Response::new(commands::to_proto(&row))),
                    Ok(Ok(finished)) if finished != id && !finished.is_nil() => continue,
                    // Ours, "any" (the listener reconnected), or missed some: read again.
                    Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        return Err(Status::unavailable("the control plane is shutting down"));
                    }
                }
            }
        }
    }

    async fn inspect_deployment(
        &self,
        request: Request<proto::InspectDeploymentRequest>,
    ) -> Result<Response<proto::ContainerStatus>, Status> {
        let forwarded = request.metadata().contains_key(live::FORWARDED);
        Ok(Response::new(live::inspect(&self.state, &request.get_ref().id, forwarded).await?))
    }

    async fn check_deployment_health(
        &self,
        request: Request<proto::CheckDeploymentHealthRequest>,
    ) -> Result<Response<proto::CheckDeploymentHealthResponse>, Status> {
        let forwarded = request.metadata().contains_key(live::FORWARDED);
        Ok(Response::new(live::check_health(&self.state, &request.get_ref().id, forwarded).await?))
    }

    type TailLogsStream = live::LogStream;

    async fn tail_logs(
        &self,
        request: Request<proto::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        let forwarded = request.metadata().contains_key(live::FORWARDED);
        Ok(Response::new(live::tail_logs(&self.state, request.into_inner(), forwarded).await?))
    }

    async fn delete_droplet(
        &self,
        request: Request<DeleteDropletRequest>,
    ) -> Result<Response<DeleteDropletResponse>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        let revoked = match store::delete_droplet(&self.db, id).await.map_err(db_error)? {
            Some(revoked) => revoked,
            None => return Err(Status::not_found(format!("droplet {id} not found"))),
        };
        tracing::info!(droplet_id = %id, certificates = revoked.len(), "droplet deleted");
        Ok(Response::new(DeleteDropletResponse { revoked_certificate_serials: revoked }))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<CreateEnrollmentTokenRequest>,
    ) -> Result<Response<CreateEnrollmentTokenResponse>, Status> {
        let request = request.into_inner();
        let droplet = match request.droplet_id.as_str() {
            "" => None,
            id => Some(DropletId::from_uuid(parse_id("droplet_id", id)?)),
        };
        let ttl = match request.ttl {
            None => enrollment::DEFAULT_TTL,
            Some(ttl) => {
                Duration::try_from(ttl).map_err(|_| Status::invalid_argument("ttl: must be a positive duration"))?
            }
        };
        let account = if request.account.is_empty() { store::DEFAULT_ACCOUNT } else { &request.account };
        let ca = &self.state.authorities.active;
        let created = enrollment::create(&self.db, ca, account, droplet, &request.name, ttl).await.map_err(
            |error| match error {
                enrollment::CreateError::Store(store::TokenCreateError::Database(error)) => db_error(error),
                enrollment::CreateError::Store(store::TokenCreateError::OtherAccount(id)) => {
                    Status::not_found(format!("droplet {id} not found"))
                }
                enrollment::CreateError::Store(store::TokenCreateError::NoAccount(_)) => {
                    Status::not_found(format!("account: {error}"))
                }
                enrollment::CreateError::Store(store::TokenCreateError::Deleting(_)) => {
                    Status::failed_precondition(format!("droplet_id: {error}"))
                }
                other => Status::invalid_argument(other.to_string()),
            },
        )?;
        tracing::info!(token_id = %created.row.id, droplet_id = %created.row.droplet_id, "enrollment token created");
        Ok(Response::new(CreateEnrollmentTokenResponse {
            token: created.token,
            enrollment_token: Some(token_to_proto(created.row)),
            ca_sha256: ca.sha256_pin(),
        }))
    }

    async fn list_enrollment_tokens(
        &self,
        request: Request<ListEnrollmentTokensRequest>,
    ) -> Result<Response<ListEnrollmentTokensResponse>, Status> {
        let account = Some(request.get_ref().account.as_str()).filter(|a| !a.is_empty());
        let rows = store::list_tokens(&self.db, account).await.map_err(db_error)?;
        Ok(Response::new(ListEnrollmentTokensResponse {
            enrollment_tokens: rows.into_iter().map(token_to_proto).collect(),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentToken>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        store::revoke_token(&self.db, id).await.map_err(db_error)?;
        let row = store::get_token(&self.db, id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Status::not_found(format!("enrollment token {id} not found")))?;
        if row.used_at.is_some() {
            return Err(Status::failed_precondition(format!("enrollment token {id} was already used")));
        }
        Ok(Response::new(token_to_proto(row)))
    }

    async fn get_droplet(&self, request: Request<GetDropletRequest>) -> Result<Response<Droplet>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        let row = store::get_droplet(&self.db, id).await.map_err(db_error)?;
        let row = row.ok_or_else(|| Status::not_found(format!("droplet {id} not found")))?;
        Ok(Response::new(droplet_to_proto(row)))
    }

    async fn list_droplets(
        &self,
        request: Request<ListDropletsRequest>,
    ) -> Result<Response<ListDropletsResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!("page_size: at most {MAX_PAGE_SIZE}, got {n}")));
            }
            n => n,
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_page_token(token)?),
        };
        let status = match proto::DropletStatus::try_from(request.status) {
            Ok(proto::DropletStatus::Unspecified) => None,
            Ok(status) => Some(status_from_proto(status)),
            Err(_) => {
                return Err(Status::invalid_argument(format!("status: {} is not a droplet status", request.status)));
            }
        };
        // One more than asked tells whether another page follows.
        let mut rows =
            store::list_droplets(&self.db, after, status, i64::from(page_size) + 1).await.map_err(db_error)?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => encode_page_token(last.id),
            _ => String::new(),
        };
        Ok(Response::new(ListDropletsResponse {
            droplets: rows.into_iter().map(droplet_to_proto).collect(),
            next_page_token,
        }))
    }
}

/// Page tokens are opaque to clients: keyset positions, so pages stay stable while rows
/// are added.
fn encode_page_token(after: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{after}"))
}

fn decode_page_token(token: &str) -> Result<Uuid, Status> {
    let invalid = || Status::invalid_argument("page_token: not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(invalid)?;
    Uuid::try_parse(id).map_err(|_| invalid())
}

pub fn token_to_proto(row: store::TokenRow) -> EnrollmentToken {
    use proto::enrollment_token::State as S;
    let state = if row.revoked_at.is_some() {
        S::Revoked
    } else if row.used_at.is_some() {
        S::Used
    } else if row.expires_at <= Utc::now() {
        S::Expired
    } else {
        S::Usable
    };
    EnrollmentToken {
        id: row.id.to_string(),
        account: row.account,
        droplet_id: row.droplet_id.to_string(),
        name: row.name,
        created_at: Some(timestamp(row.created_at)),
        expires_at: Some(timestamp(row.expires_at)),
        used_at: row.used_at.map(timestamp),
        revoked_at: row.revoked_at.map(timestamp),
        state: state as i32,
    }
}

fn status_from_proto(status: proto::DropletStatus) -> DropletStatus {
    use proto::DropletStatus as P;
    match status {
        P::Pending | P::Unspecified => DropletStatus::Pending,
        P::Provisioning => DropletStatus::Provisioning,
        P::Online => DropletStatus::Online,
        P::Unreachable => DropletStatus::Unreachable,
        P::Offline => DropletStatus::Offline,
        P::Error => DropletStatus::Error,
        P::Deleting => DropletStatus::Deleting,
    }
}

fn status_to_proto(status: &str) -> proto::DropletStatus {
    use proto::DropletStatus as P;
    match DropletStatus::parse(status) {
        Some(DropletStatus::Pending) => P::Pending,
        Some(DropletStatus::Provisioning) => P::Provisioning,
        Some(DropletStatus::Online) => P::Online,
        Some(DropletStatus::Unreachable) => P::Unreachable,
        Some(DropletStatus::Offline) => P::Offline,
        Some(DropletStatus::Error) => P::Error,
        Some(DropletStatus::Deleting) => P::Deleting,
        None => P::Unspecified,
    }
}

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn unsigned32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

pub fn droplet_to_proto(row: DropletRow) -> Droplet {
    Droplet {
        id: row.id.to_string(),
        account: row.account,
        status: status_to_proto(&row.status) as i32,
        status_message: row.status_message,
        agent_version: row.agent_version,
        host: Some(HostFacts {
            hostname: row.hostname,
            os: row.os,
            kernel_version: row.kernel_version,
            architecture: row.architecture,
            cpu_count: unsigned32(row.cpu_count),
            memory_total_bytes: unsigned(row.memory_total_bytes),
            disk_total_bytes: unsigned(row.disk_total_bytes),
        }),
        docker_version: row.docker_version,
        load: Some(HostLoad {
            load_average_1m: row.load_average_1m,
            load_average_5m: row.load_average_5m,
            load_average_15m: row.load_average_15m,
            memory_used_bytes: unsigned(row.memory_used_bytes),
            disk_used_bytes: unsigned(row.disk_used_bytes),
            disk_free_bytes: unsigned(row.disk_free_bytes),
            container_count: unsigned32(row.container_count),
        }),
        created_at: Some(timestamp(row.created_at)),
        connected_at: row.connected_at.map(timestamp),
        last_seen_at: row.last_seen_at.map(timestamp),
        disconnected_at: row.disconnected_at.map(timestamp),
        labels: row.labels.0.into_iter().collect(),
        protocol: Some(ProtocolVersion {
            major: unsigned32(row.protocol_major),
            minor: unsigned32(row.protocol_minor),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::new_v4();
        assert_eq!(decode_page_token(&encode_page_token(id)).ok(), Some(id));
        for bad in ["", "!!!", "ZHJvcGxldHM", &URL_SAFE_NO_PAD.encode("droplets/after/nope")] {
            let status = decode_page_token(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("page_token"));
        }
    }

    #[test]
    fn every_stored_status_maps_to_its_proto_value_and_back() {
        for s in ["pending", "provisioning", "online", "unreachable", "offline", "error", "deleting"] {
            let status = DropletStatus::parse(s).expect(s);
            assert_eq!(status_from_proto(status_to_proto(s)), status);
        }
    }
}
