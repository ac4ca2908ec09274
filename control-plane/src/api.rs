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
    auth::{self, Caller, Owned, Scope},
    commands::{self, Options},
    deployments::{self, Verb},
    enrollment, events, labels, live,
    state::State,
    store::{self, DropletRow, DropletStatus},
};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

pub struct FleetApi {
    db: PgPool,
    state: State,
}

impl FleetApi {
    pub fn new(state: State) -> Self {
        Self { db: state.db.clone(), state }
    }
}

/// Database failures are logged here and reach the client only as `Unavailable`; a text
/// holding a NUL character (which PostgreSQL cannot store) is the caller's mistake.
pub fn db_error(error: sqlx::Error) -> Status {
    if let sqlx::Error::Database(e) = &error
        && e.code().as_deref() == Some("22021")
    {
        return Status::invalid_argument("a text field holds a NUL character, which cannot be stored");
    }
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
fn options(
    options: Option<proto::CommandOptions>,
    caller: &Caller,
    remote: Option<std::net::SocketAddr>,
) -> Result<Options, Status> {
    let mut options = Options::try_from(options).map_err(Status::invalid_argument)?;
    options.requested_by = match remote {
        Some(remote) => format!("{} from {}", caller.principal, remote.ip()),
        None => caller.principal.clone(),
    };
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
    /// The authenticated caller, when its scope allows `call`.
    async fn caller<T>(&self, request: &Request<T>, scope: Scope, call: &str) -> Result<Caller, Status> {
        let caller = self.state.keys.authenticate(request.metadata()).await?;
        caller.require(scope, call)?;
        Ok(caller)
    }

    /// The deployment named by `field` (`id` or `deployment_id`), when the caller may
    /// reach it with `scope`.
    async fn deployment<T>(
        &self,
        request: &Request<T>,
        scope: Scope,
        call: &str,
        (field, id): (&str, &str),
    ) -> Result<Uuid, Status> {
        let caller = self.caller(request, scope, call).await?;
        let id = parse_id(field, id)?;
        caller.reach(&self.db, Owned::Deployment, id).await?;
        Ok(id)
    }

    /// A change to deployment `id`: needs `write`.
    async fn change<T>(&self, request: &Request<T>, call: &str, id: &str) -> Result<(Uuid, Caller), Status> {
        let caller = self.caller(request, Scope::Write, call).await?;
        let id = parse_id("id", id)?;
        caller.reach(&self.db, Owned::Deployment, id).await?;
        Ok((id, caller))
    }

    async fn command<T>(&self, request: &Request<T>, call: &str, id: &str) -> Result<Uuid, Status> {
        let caller = self.caller(request, Scope::Read, call).await?;
        let id = parse_id("id", id)?;
        caller.reach(&self.db, Owned::Command, id).await?;
        Ok(id)
    }

    async fn lifecycle(&self, id: Uuid, verb: Verb, options: Options) -> Result<Response<Deployment>, Status> {
        let deployment = deployments::lifecycle(&self.state, id, verb, &options).await.map_err(deployment_status)?;
        tracing::info!(deployment_id = %id, ?verb, "deployment lifecycle");
        Ok(Response::new(deployment))
    }
}

/// `page_size` as asked, within bounds.
fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(Status::invalid_argument(format!("page_size: at most {MAX_PAGE_SIZE}, got {n}"))),
        n => Ok(n),
    }
}

/// The last page's token when more rows follow (`rows` holds one more than a page).
fn next_page<T>(rows: &mut Vec<T>, size: u32, id_of: impl Fn(&T) -> Uuid, prefix: &str) -> String {
    let more = rows.len() > size as usize;
    rows.truncate(size as usize);
    match rows.last() {
        Some(last) if more => encode_page_token(prefix, id_of(last)),
        _ => String::new(),
    }
}

fn optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() { Ok(None) } else { parse_id(field, value).map(Some) }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn create_deployment(
        &self,
        request: Request<CreateDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let caller = self.caller(&request, Scope::Write, "CreateDeployment").await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let droplet = parse_id("droplet_id", &request.droplet_id)?;
        caller.reach(&self.db, Owned::Droplet, droplet).await?;
        let droplet = DropletId::from_uuid(droplet);
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        if request.validate_only {
            let checked = deployments::validate(&self.state, droplet, &request.name, spec).await;
            return Ok(Response::new(checked.map_err(deployment_status)?));
        }
        let options = options(request.options, &caller, remote)?;
        let created = deployments::create(&self.state, droplet, &request.name, spec, &options)
            .await
            .map_err(deployment_status)?;
        tracing::info!(deployment_id = %created.id, droplet_id = %droplet, by = %caller.principal, "deployment created");
        Ok(Response::new(created))
    }

    async fn list_tools(&self, request: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let id = self
            .deployment(&request, Scope::Read, "ListTools", ("deployment_id", &request.get_ref().deployment_id))
            .await?;
        Ok(Response::new(deployments::tools(&self.state, id).await.map_err(deployment_status)?))
    }

    async fn get_deployment(&self, request: Request<GetDeploymentRequest>) -> Result<Response<Deployment>, Status> {
        let id = self.deployment(&request, Scope::Read, "GetDeployment", ("id", &request.get_ref().id)).await?;
        Ok(Response::new(deployments::get(&self.state, id).await.map_err(deployment_status)?))
    }

    async fn list_deployments(
        &self,
        request: Request<proto::ListDeploymentsRequest>,
    ) -> Result<Response<proto::ListDeploymentsResponse>, Status> {
        let caller = self.caller(&request, Scope::Read, "ListDeployments").await?;
        let request = request.into_inner();
        let droplet = optional_id("droplet_id", &request.droplet_id)?;
        if let Some(droplet) = droplet {
            caller.reach(&self.db, Owned::Droplet, droplet).await?;
        }
        let size = page_size(request.page_size)?;
        let filter = deployments::Filter {
            droplet,
            account: caller.list_account(&request.account)?,
            include_removed: request.include_removed,
            after: decode_page_token(DEPLOYMENTS_PAGE, &request.page_token)?,
            limit: i64::from(size) + 1,
        };
        let mut rows = deployments::list(&self.state, &filter).await.map_err(deployment_status)?;
        let next_page_token =
            next_page(&mut rows, size, |d| Uuid::try_parse(&d.id).unwrap_or_default(), DEPLOYMENTS_PAGE);
        Ok(Response::new(proto::ListDeploymentsResponse { deployments: rows, next_page_token }))
    }

    async fn start_deployment(
        &self,
        request: Request<proto::StartDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "StartDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        self.lifecycle(id, Verb::Start, options(request.options, &caller, remote)?).await
    }

    async fn stop_deployment(
        &self,
        request: Request<proto::StopDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "StopDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let verb = Verb::Stop { grace: grace(request.grace)? };
        self.lifecycle(id, verb, options(request.options, &caller, remote)?).await
    }

    async fn restart_deployment(
        &self,
        request: Request<proto::RestartDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "RestartDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let verb = Verb::Restart { grace: grace(request.grace)? };
        self.lifecycle(id, verb, options(request.options, &caller, remote)?).await
    }

    async fn remove_deployment(
        &self,
        request: Request<proto::RemoveDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "RemoveDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let verb = Verb::Remove { volumes: request.remove_volumes };
        self.lifecycle(id, verb, options(request.options, &caller, remote)?).await
    }

    async fn update_deployment(
        &self,
        request: Request<proto::UpdateDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "UpdateDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let options = options(request.options, &caller, remote)?;
        Ok(Response::new(deployments::update(&self.state, id, spec, &options).await.map_err(deployment_status)?))
    }

    async fn get_command(
        &self,
        request: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::CommandRecord>, Status> {
        let id = self.command(&request, "GetCommand", &request.get_ref().id).await?;
        let row = commands::get(&self.db, id).await.map_err(db_error)?;
        let row = row.ok_or_else(|| Owned::Command.not_found(id))?;
        Ok(Response::new(commands::to_proto(&row)))
    }

    async fn list_commands(
        &self,
        request: Request<proto::ListCommandsRequest>,
    ) -> Result<Response<proto::ListCommandsResponse>, Status> {
        let caller = self.caller(&request, Scope::Read, "ListCommands").await?;
        let request = request.into_inner();
        let droplet = optional_id("droplet_id", &request.droplet_id)?;
        let deployment = optional_id("deployment_id", &request.deployment_id)?;
        match (droplet, deployment) {
            (None, None) => return Err(Status::invalid_argument("droplet_id, deployment_id: give at least one")),
            (Some(droplet), _) => caller.reach(&self.db, Owned::Droplet, droplet).await?,
            (None, Some(deployment)) => caller.reach(&self.db, Owned::Deployment, deployment).await?,
        }
        let state = match request.state() {
            proto::command_record::State::Unspecified => None,
            state => Some(state.as_str_name().trim_start_matches("STATE_").to_lowercase()),
        };
        let limit = page_size(request.page_size)?;
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
        let id = self.command(&request, "WaitCommand", &request.get_ref().id).await?;
        let request = request.into_inner();
        let timeout = match request.timeout.map(Duration::try_from) {
            None => DEFAULT_WAIT,
            Some(Ok(t)) if t <= MAX_WAIT => t,
            Some(_) => return Err(Status::invalid_argument("timeout: must be between 0 and 5 minutes")),
        };
        // Waiting before reading, so a completion in between is not missed.
        let mut done = self.state.completions.wait(id);
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let row = commands::get(&self.db, id).await.map_err(db_error)?;
            let row = row.ok_or_else(|| Owned::Command.not_found(id))?;
            if commands::is_final(&row.state) {
                return Ok(Response::new(commands::to_proto(&row)));
            }
            if tokio::time::timeout_at(until, done.changed()).await.is_err() {
                return Ok(Response::new(commands::to_proto(&row)));
            }
        }
    }

    async fn inspect_deployment(
        &self,
        request: Request<proto::InspectDeploymentRequest>,
    ) -> Result<Response<proto::ContainerStatus>, Status> {
        self.deployment(&request, Scope::Read, "InspectDeployment", ("id", &request.get_ref().id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::inspect(&self.state, &request.get_ref().id, &origin).await?))
    }

    async fn check_deployment_health(
        &self,
        request: Request<proto::CheckDeploymentHealthRequest>,
    ) -> Result<Response<proto::CheckDeploymentHealthResponse>, Status> {
        self.deployment(&request, Scope::Read, "CheckDeploymentHealth", ("id", &request.get_ref().id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::check_health(&self.state, &request.get_ref().id, &origin).await?))
    }

    type TailLogsStream = live::LogStream;

    async fn tail_logs(
        &self,
        request: Request<proto::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        self.deployment(&request, Scope::Read, "TailLogs", ("deployment_id", &request.get_ref().deployment_id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::tail_logs(&self.state, request.into_inner(), &origin).await?))
    }

    async fn delete_droplet(
        &self,
        request: Request<DeleteDropletRequest>,
    ) -> Result<Response<DeleteDropletResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "DeleteDroplet").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        caller.reach(&self.db, Owned::Droplet, id).await?;
        let provider: Option<String> = sqlx::query_scalar("SELECT provider FROM droplets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db)
            .await
            .map_err(db_error)?;
        if provider.as_deref().is_some_and(|p| p != "byo") {
            // Its machine is destroyed by a job; the droplet stays `deleting` until then.
            let revoked = crate::provisioning::begin_delete(&self.db, id).await.map_err(db_error)?;
            tracing::info!(droplet_id = %id, by = %caller.principal, "droplet deleting");
            return Ok(Response::new(DeleteDropletResponse { revoked_certificate_serials: revoked }));
        }
        let revoked = match store::delete_droplet(&self.db, id).await.map_err(db_error)? {
            Some(revoked) => revoked,
            None => return Err(Owned::Droplet.not_found(id)),
        };
        tracing::info!(droplet_id = %id, certificates = revoked.len(), by = %caller.principal, "droplet deleted");
        Ok(Response::new(DeleteDropletResponse { revoked_certificate_serials: revoked }))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<CreateEnrollmentTokenRequest>,
    ) -> Result<Response<CreateEnrollmentTokenResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "CreateEnrollmentToken").await?;
        let request = request.into_inner();
        let droplet = optional_id("droplet_id", &request.droplet_id)?;
        if let Some(droplet) = droplet {
            caller.reach(&self.db, Owned::Droplet, droplet).await?;
        }
        let ttl = match request.ttl {
            None => enrollment::DEFAULT_TTL,
            Some(ttl) => {
                Duration::try_from(ttl).map_err(|_| Status::invalid_argument("ttl: must be a positive duration"))?
            }
        };
        let account = match droplet {
            // A token for an existing droplet is in the droplet's account.
            Some(droplet) => store::get_droplet(&self.db, droplet)
                .await
                .map_err(db_error)?
                .map(|d| d.account)
                .ok_or_else(|| Owned::Droplet.not_found(droplet))?,
            None => caller.create_account(&request.account)?,
        };
        let ca = &self.state.authorities.active;
        let droplet = droplet.map(DropletId::from_uuid);
        let created = enrollment::create(&self.db, ca, &account, droplet, &request.name, ttl).await.map_err(
            |error| match error {
                enrollment::CreateError::Store(store::TokenCreateError::Database(error)) => db_error(error),
                enrollment::CreateError::Store(store::TokenCreateError::OtherAccount(id)) => {
                    Owned::Droplet.not_found(id)
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
        tracing::info!(token_id = %created.row.id, droplet_id = %created.row.droplet_id, by = %caller.principal, "enrollment token created");
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
        let caller = self.caller(&request, Scope::Read, "ListEnrollmentTokens").await?;
        let account = caller.list_account(&request.get_ref().account)?;
        let rows = store::list_tokens(&self.db, account.as_deref()).await.map_err(db_error)?;
        Ok(Response::new(ListEnrollmentTokensResponse {
            enrollment_tokens: rows.into_iter().map(token_to_proto).collect(),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentToken>, Status> {
        let caller = self.caller(&request, Scope::Write, "RevokeEnrollmentToken").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        caller.reach(&self.db, Owned::EnrollmentToken, id).await?;
        store::revoke_token(&self.db, id).await.map_err(db_error)?;
        let row = store::get_token(&self.db, id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Owned::EnrollmentToken.not_found(id))?;
        if row.used_at.is_some() {
            return Err(Status::failed_precondition(format!("enrollment token {id} was already used")));
        }
        Ok(Response::new(token_to_proto(row)))
    }

    async fn get_droplet(&self, request: Request<GetDropletRequest>) -> Result<Response<Droplet>, Status> {
        let caller = self.caller(&request, Scope::Read, "GetDroplet").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        let row = store::get_droplet(&self.db, id).await.map_err(db_error)?;
        let row = row.filter(|row| caller.sees(&row.account)).ok_or_else(|| Owned::Droplet.not_found(id))?;
        Ok(Response::new(droplet_to_proto(row)))
    }

    async fn list_droplets(
        &self,
        request: Request<ListDropletsRequest>,
    ) -> Result<Response<ListDropletsResponse>, Status> {
        let caller = self.caller(&request, Scope::Read, "ListDroplets").await?;
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let status = match proto::DropletStatus::try_from(request.status) {
            Ok(proto::DropletStatus::Unspecified) => None,
            Ok(status) => Some(status_from_proto(status)),
            Err(_) => {
                return Err(Status::invalid_argument(format!("status: {} is not a droplet status", request.status)));
            }
        };
        let filter = store::DropletFilter {
            after: decode_page_token(DROPLETS_PAGE, &request.page_token)?,
            status,
            account: caller.list_account(&request.account)?,
            selector: request
                .label_selector
                .parse()
                .map_err(|problem| Status::invalid_argument(format!("label_selector: {problem}")))?,
        };
        // One more than asked tells whether another page follows.
        let mut rows = store::list_droplets(&self.db, &filter, i64::from(size) + 1).await.map_err(db_error)?;
        let next_page_token = next_page(&mut rows, size, |d| d.id, DROPLETS_PAGE);
        Ok(Response::new(ListDropletsResponse {
            droplets: rows.into_iter().map(droplet_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn create_droplet(
        &self,
        request: Request<proto::CreateDropletRequest>,
    ) -> Result<Response<proto::CreateDropletResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "CreateDroplet").await?;
        let request = request.into_inner();
        let provider = match request.provider.as_str() {
            "" | "byo" => "byo",
            name => match self.state.providers.get(name) {
                Some(_) => name,
                None => {
                    let mut known = vec!["byo"];
                    known.extend(self.state.providers.names());
                    return Err(Status::invalid_argument(format!(
                        "provider: {name:?} is not a provider of this control plane ({})",
                        known.join(", ")
                    )));
                }
            },
        };
        let labels: std::collections::BTreeMap<String, String> = request.labels.into_iter().collect();
        let problems = labels::validate(&labels);
        if !problems.is_empty() {
            return Err(bad_fields("labels", &problems));
        }
        if provider != "byo" {
            // Made in the background: the answer comes back at once, `provisioning`.
            let account = caller.create_account(&request.account)?;
            let timeout = self.state.provision_timeout;
            let row = crate::provisioning::begin_create(&self.db, &account, provider, &labels, timeout).await.map_err(
                |error| match error {
                    sqlx::Error::Database(e) if e.is_foreign_key_violation() => {
                        Status::not_found(format!("account: {account:?} does not exist"))
                    }
                    other => db_error(other),
                },
            )?;
            tracing::info!(droplet_id = %row.id, %provider, %account, by = %caller.principal, "droplet provisioning");
            return Ok(Response::new(proto::CreateDropletResponse {
                droplet: Some(droplet_to_proto(row)),
                ..Default::default()
            }));
        }
        let ttl = match request.token_ttl {
            None => enrollment::DEFAULT_TTL,
            Some(ttl) => Duration::try_from(ttl)
                .map_err(|_| Status::invalid_argument("token_ttl: must be a positive duration"))?,
        };
        let account = caller.create_account(&request.account)?;
        let ca = &self.state.authorities.active;
        let created =
            enrollment::create(&self.db, ca, &account, None, &request.name, ttl).await.map_err(
                |error| match error {
                    enrollment::CreateError::Store(store::TokenCreateError::Database(error)) => db_error(error),
                    enrollment::CreateError::Store(store::TokenCreateError::NoAccount(_)) => {
                        Status::not_found(format!("account: {error}"))
                    }
                    other => Status::invalid_argument(other.to_string()),
                },
            )?;
        let droplet = created.row.droplet_id;
        let row = store::set_labels(&self.db, droplet, &labels)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Owned::Droplet.not_found(droplet))?;
        let endpoints = &self.state.endpoints;
        let options = crate::cloudinit::UserDataOptions::new(
            endpoints.agent.clone(),
            endpoints.enroll.clone(),
            created.token.clone(),
            ca.sha256_pin(),
            endpoints.agent_image.clone(),
        );
        let install_command = crate::cloudinit::install_command(&options).map_err(|error| {
            tracing::error!(%error, "the control plane's own droplet settings are not valid");
            Status::failed_precondition(format!("the control plane's droplet settings: {error}"))
        })?;
        tracing::info!(droplet_id = %droplet, %account, by = %caller.principal, "droplet created (byo)");
        Ok(Response::new(proto::CreateDropletResponse {
            droplet: Some(droplet_to_proto(row)),
            token: created.token,
            install_command,
        }))
    }

    async fn update_droplet_labels(
        &self,
        request: Request<proto::UpdateDropletLabelsRequest>,
    ) -> Result<Response<Droplet>, Status> {
        let caller = self.caller(&request, Scope::Write, "UpdateDropletLabels").await?;
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        caller.reach(&self.db, Owned::Droplet, id).await?;
        let labels: std::collections::BTreeMap<String, String> = request.labels.into_iter().collect();
        let problems = labels::validate(&labels);
        if !problems.is_empty() {
            return Err(bad_fields("labels", &problems));
        }
        let row = store::set_labels(&self.db, id, &labels).await.map_err(db_error)?;
        Ok(Response::new(droplet_to_proto(row.ok_or_else(|| Owned::Droplet.not_found(id))?)))
    }

    type WatchEventsStream = events::EventStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = self.caller(&request, Scope::Read, "WatchEvents").await?;
        let request = request.into_inner();
        let droplet = optional_id("droplet_id", &request.droplet_id)?;
        if let Some(droplet) = droplet {
            caller.reach(&self.db, Owned::Droplet, droplet).await?;
        }
        let deployment = optional_id("deployment_id", &request.deployment_id)?;
        if let Some(deployment) = deployment {
            caller.reach(&self.db, Owned::Deployment, deployment).await?;
        }
        let filter = events::Filter {
            account: caller.list_account(&request.account)?,
            droplet,
            deployment,
            ..Default::default()
        }
        .kinds(&request.kinds)?;
        let from = match (request.cursor.as_str(), request.from_oldest) {
            ("", true) => events::Cursor::OLDEST,
            ("", false) => events::now(&self.db).await.map_err(db_error)?,
            (cursor, _) => events::Cursor::decode(cursor)?,
        };
        let stream = events::watch(
            self.db.clone(),
            self.state.bell.clone(),
            from,
            filter,
            request.follow,
            self.state.stopping.clone(),
        );
        Ok(Response::new(stream))
    }

    async fn create_api_key(
        &self,
        request: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::CreateApiKeyResponse>, Status> {
        let caller = self.caller(&request, Scope::Admin, "CreateApiKey").await?;
        let request = request.into_inner();
        let scope = Scope::parse(&request.scope).ok_or_else(|| {
            Status::invalid_argument(format!("scope: {:?} is not a scope: read, write or admin", request.scope))
        })?;
        let expires_in = match request.expires_in {
            None => None,
            Some(d) => Some(
                Duration::try_from(d)
                    .map_err(|_| Status::invalid_argument("expires_in: must be a positive duration"))?,
            ),
        };
        let account = caller.create_account(&request.account)?;
        let created =
            auth::create(&self.db, &account, scope, &request.name, expires_in).await.map_err(|error| match error {
                auth::KeyError::Database(error) => db_error(error),
                invalid => Status::invalid_argument(invalid.to_string()),
            })?;
        tracing::info!(api_key_id = %created.id, %account, %scope, by = %caller.principal, "API key created");
        Ok(Response::new(proto::CreateApiKeyResponse { key: created.key, api_key: Some(key_to_proto(created.row)) }))
    }

    async fn list_api_keys(
        &self,
        request: Request<proto::ListApiKeysRequest>,
    ) -> Result<Response<proto::ListApiKeysResponse>, Status> {
        let caller = self.caller(&request, Scope::Admin, "ListApiKeys").await?;
        let account = caller.list_account(&request.get_ref().account)?;
        let rows = auth::list(&self.db, account.as_deref()).await.map_err(db_error)?;
        Ok(Response::new(proto::ListApiKeysResponse { api_keys: rows.into_iter().map(key_to_proto).collect() }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<proto::RevokeApiKeyRequest>,
    ) -> Result<Response<proto::ApiKey>, Status> {
        let caller = self.caller(&request, Scope::Admin, "RevokeApiKey").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        caller.reach(&self.db, Owned::ApiKey, id).await?;
        let row = auth::revoke(&self.db, id).await.map_err(db_error)?.ok_or_else(|| Owned::ApiKey.not_found(id))?;
        tracing::info!(api_key_id = %id, by = %caller.principal, "API key revoked");
        Ok(Response::new(key_to_proto(row)))
    }
}

/// `InvalidArgument` with one `BadRequest` field violation per problem.
fn bad_fields(field: &str, problems: &[String]) -> Status {
    use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};
    let violations: Vec<FieldViolation> = problems.iter().map(|p| FieldViolation::new(field, p.clone())).collect();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {}", problems.join("; ")),
        ErrorDetails::with_bad_request(violations),
    )
}

pub fn key_to_proto(row: auth::KeyRow) -> proto::ApiKey {
    proto::ApiKey {
        id: row.id.to_string(),
        account: row.account,
        name: row.name,
        scope: row.scope,
        prefix: row.prefix,
        created_at: Some(timestamp(row.created_at)),
        expires_at: row.expires_at.map(timestamp),
        revoked_at: row.revoked_at.map(timestamp),
        last_used_at: row.last_used_at.map(timestamp),
    }
}

const DROPLETS_PAGE: &str = "droplets/after/";
const DEPLOYMENTS_PAGE: &str = "deployments/after/";

/// Page tokens are opaque to clients: keyset positions, so pages stay stable while rows
/// are added.
fn encode_page_token(prefix: &str, after: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{prefix}{after}"))
}

/// The position in a page token; `None` for the first page (no token).
fn decode_page_token(prefix: &str, token: &str) -> Result<Option<Uuid>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Status::invalid_argument("page_token: not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(prefix).ok_or_else(invalid)?;
    Uuid::try_parse(id).map(Some).map_err(|_| invalid())
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
        provider: row.provider,
        cloud_id: row.cloud_id.unwrap_or_default(),
        public_ipv4: row.public_ipv4,
        private_ipv4: row.private_ipv4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::new_v4();
        assert_eq!(decode_page_token(DROPLETS_PAGE, &encode_page_token(DROPLETS_PAGE, id)).ok(), Some(Some(id)));
        assert_eq!(decode_page_token(DROPLETS_PAGE, "").ok(), Some(None));
        let other = encode_page_token(DEPLOYMENTS_PAGE, id);
        for bad in ["!!!", "ZHJvcGxldHM", &URL_SAFE_NO_PAD.encode("droplets/after/nope"), &other] {
            let status = decode_page_token(DROPLETS_PAGE, bad).expect_err(bad);
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
