//! `Fleet`: the API operators, scripts and Supabase call.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        self, CreateDeploymentRequest, CreateEnrollmentTokenRequest, CreateEnrollmentTokenResponse,
        DeleteDropletRequest, DeleteDropletResponse, Deployment, Droplet, EnrollmentToken, GetDeploymentRequest,
        GetDropletRequest, ListDropletsRequest, ListDropletsResponse, ListEnrollmentTokensRequest,
        ListEnrollmentTokensResponse, ListToolsRequest, ListToolsResponse, RevokeEnrollmentTokenRequest,
        fleet_server::Fleet,
    },
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    api::{
        Api,
        auth::{self, Caller, Owned, Scope},
        convert::{
            self, command_to_proto, deployment_to_proto, droplet_to_proto, key_to_proto, status_from_proto,
            token_to_proto, tools_to_proto,
        },
        paging::{self, List},
        status::{db_error, deployment_status, droplet_status, key_status},
    },
    fleet::{
        commands::{self, Options},
        deployments::{self, Verb},
        droplets, events,
    },
    session::live,
    store,
};

pub struct FleetApi {
    db: PgPool,
    api: Api,
}

impl FleetApi {
    pub fn new(api: Api) -> Self {
        Self { db: api.fleet.db.clone(), api }
    }
}

fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value).map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a UUID")))
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
        let caller = self.api.keys.authenticate(request.metadata()).await?;
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
        let deployment =
            deployments::lifecycle(&self.api.fleet, id, verb, &options).await.map_err(deployment_status)?;
        tracing::info!(deployment_id = %id, ?verb, "deployment lifecycle");
        Ok(Response::new(deployment_to_proto(deployment)))
    }
}

fn optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() { Ok(None) } else { parse_id(field, value).map(Some) }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    #[tracing::instrument(skip_all, fields(rpc = "CreateDeployment", droplet_id = %request.get_ref().droplet_id))]
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
            let checked = deployments::validate(&self.api.fleet, droplet, &request.name, spec).await;
            return Ok(Response::new(deployment_to_proto(checked.map_err(deployment_status)?)));
        }
        let options = options(request.options, &caller, remote)?;
        let created = deployments::create(&self.api.fleet, droplet, &request.name, spec, &options)
            .await
            .map_err(deployment_status)?;
        let created = deployment_to_proto(created);
        tracing::info!(deployment_id = %created.id, droplet_id = %droplet, by = %caller.principal, "deployment created");
        Ok(Response::new(created))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListTools", deployment_id = %request.get_ref().deployment_id))]
    async fn list_tools(&self, request: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let id = self
            .deployment(&request, Scope::Read, "ListTools", ("deployment_id", &request.get_ref().deployment_id))
            .await?;
        let found = deployments::tools(&self.api.fleet, id).await.map_err(deployment_status)?;
        Ok(Response::new(tools_to_proto(found)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetDeployment", deployment_id = %request.get_ref().id))]
    async fn get_deployment(&self, request: Request<GetDeploymentRequest>) -> Result<Response<Deployment>, Status> {
        let id = self.deployment(&request, Scope::Read, "GetDeployment", ("id", &request.get_ref().id)).await?;
        let deployment = deployments::get(&self.api.fleet, id).await.map_err(deployment_status)?;
        Ok(Response::new(deployment_to_proto(deployment)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListDeployments", droplet_id = %request.get_ref().droplet_id))]
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
        let size = paging::page_size(request.page_size)?;
        let filter = deployments::Filter {
            droplet,
            account: caller.list_account(&request.account)?,
            include_removed: request.include_removed,
            after: paging::after_id(List::Deployments, &request.page_token)?,
            limit: i64::from(size) + 1,
        };
        let mut rows = deployments::list(&self.api.fleet, &filter).await.map_err(deployment_status)?;
        let next_page_token = paging::next_page(&mut rows, size, List::Deployments, |d| {
            d.id.map(|id| id.to_string()).unwrap_or_default()
        });
        let deployments = rows.into_iter().map(deployment_to_proto).collect();
        Ok(Response::new(proto::ListDeploymentsResponse { deployments, next_page_token }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "StartDeployment", deployment_id = %request.get_ref().id))]
    async fn start_deployment(
        &self,
        request: Request<proto::StartDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "StartDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        self.lifecycle(id, Verb::Start, options(request.options, &caller, remote)?).await
    }

    #[tracing::instrument(skip_all, fields(rpc = "StopDeployment", deployment_id = %request.get_ref().id))]
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

    #[tracing::instrument(skip_all, fields(rpc = "RestartDeployment", deployment_id = %request.get_ref().id))]
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

    #[tracing::instrument(skip_all, fields(rpc = "RemoveDeployment", deployment_id = %request.get_ref().id))]
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

    #[tracing::instrument(skip_all, fields(rpc = "UpdateDeployment", deployment_id = %request.get_ref().id))]
    async fn update_deployment(
        &self,
        request: Request<proto::UpdateDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let (id, caller) = self.change(&request, "UpdateDeployment", &request.get_ref().id).await?;
        let remote = request.remote_addr();
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let options = options(request.options, &caller, remote)?;
        let updated = deployments::update(&self.api.fleet, id, spec, &options).await.map_err(deployment_status)?;
        Ok(Response::new(deployment_to_proto(updated)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetCommand", command_id = %request.get_ref().id))]
    async fn get_command(
        &self,
        request: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::CommandRecord>, Status> {
        let id = self.command(&request, "GetCommand", &request.get_ref().id).await?;
        let row = store::get_command(&self.db, id).await.map_err(db_error)?;
        let row = row.ok_or_else(|| Owned::Command.not_found(id))?;
        Ok(Response::new(command_to_proto(&row)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListCommands", droplet_id = %request.get_ref().droplet_id, deployment_id = %request.get_ref().deployment_id))]
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
        let limit = paging::page_size(request.page_size)?;
        let before = paging::before_instant(List::Commands, &request.page_token)?;
        let mut rows =
            store::list_commands(&self.db, droplet, deployment, state.as_deref(), before, i64::from(limit) + 1)
                .await
                .map_err(db_error)?;
        let next_page_token =
            paging::next_page(&mut rows, limit, List::Commands, |c| paging::instant_position(c.created_at, c.id));
        Ok(Response::new(proto::ListCommandsResponse {
            commands: rows.iter().map(command_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "WaitCommand", command_id = %request.get_ref().id))]
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
        let row = commands::wait(&self.api.fleet, id, timeout).await.map_err(db_error)?;
        Ok(Response::new(command_to_proto(&row.ok_or_else(|| Owned::Command.not_found(id))?)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "InspectDeployment", deployment_id = %request.get_ref().id))]
    async fn inspect_deployment(
        &self,
        request: Request<proto::InspectDeploymentRequest>,
    ) -> Result<Response<proto::ContainerStatus>, Status> {
        self.deployment(&request, Scope::Read, "InspectDeployment", ("id", &request.get_ref().id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::inspect(&self.api.agents, &request.get_ref().id, &origin).await?))
    }

    #[tracing::instrument(skip_all, fields(rpc = "CheckDeploymentHealth", deployment_id = %request.get_ref().id))]
    async fn check_deployment_health(
        &self,
        request: Request<proto::CheckDeploymentHealthRequest>,
    ) -> Result<Response<proto::CheckDeploymentHealthResponse>, Status> {
        self.deployment(&request, Scope::Read, "CheckDeploymentHealth", ("id", &request.get_ref().id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::check_health(&self.api.agents, &request.get_ref().id, &origin).await?))
    }

    type TailLogsStream = live::LogStream;

    #[tracing::instrument(skip_all, fields(rpc = "TailLogs", deployment_id = %request.get_ref().deployment_id))]
    async fn tail_logs(
        &self,
        request: Request<proto::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        self.deployment(&request, Scope::Read, "TailLogs", ("deployment_id", &request.get_ref().deployment_id)).await?;
        let origin = live::Origin::of(request.metadata());
        Ok(Response::new(live::tail_logs(&self.api.agents, request.into_inner(), &origin).await?))
    }

    #[tracing::instrument(skip_all, fields(rpc = "DeleteDroplet", droplet_id = %request.get_ref().id))]
    async fn delete_droplet(
        &self,
        request: Request<DeleteDropletRequest>,
    ) -> Result<Response<DeleteDropletResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "DeleteDroplet").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        caller.reach(&self.db, Owned::Droplet, id).await?;
        let revoked = droplets::delete(&self.api.fleet, id).await.map_err(droplet_status)?;
        tracing::info!(droplet_id = %id, by = %caller.principal, "droplet delete asked");
        Ok(Response::new(DeleteDropletResponse { revoked_certificate_serials: revoked }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "CreateEnrollmentToken", droplet_id = %request.get_ref().droplet_id))]
    async fn create_enrollment_token(
        &self,
        request: Request<CreateEnrollmentTokenRequest>,
    ) -> Result<Response<CreateEnrollmentTokenResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "CreateEnrollmentToken").await?;
        let request = request.into_inner();
        let droplet = optional_id("droplet_id", &request.droplet_id)?;
        let account = match droplet {
            Some(droplet) => {
                caller.reach(&self.db, Owned::Droplet, droplet).await?;
                String::new()
            }
            None => caller.create_account(&request.account)?,
        };
        let ttl = convert::ttl("ttl", request.ttl)?;
        let created = droplets::create_token(&self.api.fleet, &account, droplet, &request.name, ttl)
            .await
            .map_err(droplet_status)?;
        tracing::info!(token_id = %created.row.id, droplet_id = %created.row.droplet_id, by = %caller.principal, "enrollment token created");
        Ok(Response::new(CreateEnrollmentTokenResponse {
            token: created.token,
            enrollment_token: Some(token_to_proto(created.row)),
            ca_sha256: self.api.fleet.authorities.active.sha256_pin(),
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListEnrollmentTokens"))]
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

    #[tracing::instrument(skip_all, fields(rpc = "RevokeEnrollmentToken", token_id = %request.get_ref().id))]
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

    #[tracing::instrument(skip_all, fields(rpc = "GetDroplet", droplet_id = %request.get_ref().id))]
    async fn get_droplet(&self, request: Request<GetDropletRequest>) -> Result<Response<Droplet>, Status> {
        let caller = self.caller(&request, Scope::Read, "GetDroplet").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        let row = store::get_droplet(&self.db, id).await.map_err(db_error)?;
        let row = row.filter(|row| caller.sees(&row.account)).ok_or_else(|| Owned::Droplet.not_found(id))?;
        Ok(Response::new(droplet_to_proto(row)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListDroplets"))]
    async fn list_droplets(
        &self,
        request: Request<ListDropletsRequest>,
    ) -> Result<Response<ListDropletsResponse>, Status> {
        let caller = self.caller(&request, Scope::Read, "ListDroplets").await?;
        let request = request.into_inner();
        let size = paging::page_size(request.page_size)?;
        let status = match proto::DropletStatus::try_from(request.status) {
            Ok(proto::DropletStatus::Unspecified) => None,
            Ok(status) => Some(status_from_proto(status)),
            Err(_) => {
                return Err(Status::invalid_argument(format!("status: {} is not a droplet status", request.status)));
            }
        };
        let filter = store::DropletFilter {
            after: paging::after_id(List::Droplets, &request.page_token)?,
            status,
            account: caller.list_account(&request.account)?,
            selector: request
                .label_selector
                .parse()
                .map_err(|problem| Status::invalid_argument(format!("label_selector: {problem}")))?,
        };
        // One more than asked tells whether another page follows.
        let mut rows = store::list_droplets(&self.db, &filter, i64::from(size) + 1).await.map_err(db_error)?;
        let next_page_token = paging::next_page(&mut rows, size, List::Droplets, |d| d.id.to_string());
        Ok(Response::new(ListDropletsResponse {
            droplets: rows.into_iter().map(droplet_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "CreateDroplet", provider = %request.get_ref().provider))]
    async fn create_droplet(
        &self,
        request: Request<proto::CreateDropletRequest>,
    ) -> Result<Response<proto::CreateDropletResponse>, Status> {
        let caller = self.caller(&request, Scope::Write, "CreateDroplet").await?;
        let request = request.into_inner();
        let make = match request.provider.as_str() {
            "" | "byo" => {
                droplets::Make::Bring { name: request.name, token_ttl: convert::ttl("token_ttl", request.token_ttl)? }
            }
            name => droplets::Make::Provider(name.to_owned()),
        };
        let account = caller.create_account(&request.account)?;
        let made = droplets::create(&self.api.fleet, &account, make, request.labels).await.map_err(droplet_status)?;
        Ok(Response::new(match made {
            droplets::Made::Provisioning(row) => {
                tracing::info!(droplet_id = %row.id, %account, by = %caller.principal, "droplet provisioning");
                proto::CreateDropletResponse { droplet: Some(droplet_to_proto(row)), ..Default::default() }
            }
            droplets::Made::Brought(brought) => {
                tracing::info!(droplet_id = %brought.row.id, %account, by = %caller.principal, "droplet created (byo)");
                proto::CreateDropletResponse {
                    droplet: Some(droplet_to_proto(brought.row)),
                    token: brought.token,
                    install_command: brought.install_command,
                }
            }
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "UpdateDropletLabels", droplet_id = %request.get_ref().id))]
    async fn update_droplet_labels(
        &self,
        request: Request<proto::UpdateDropletLabelsRequest>,
    ) -> Result<Response<Droplet>, Status> {
        let caller = self.caller(&request, Scope::Write, "UpdateDropletLabels").await?;
        let request = request.into_inner();
        let id = parse_id("id", &request.id)?;
        caller.reach(&self.db, Owned::Droplet, id).await?;
        let row = droplets::set_labels(&self.api.fleet, id, request.labels).await.map_err(droplet_status)?;
        Ok(Response::new(droplet_to_proto(row)))
    }

    type WatchEventsStream = convert::EventStream;

    #[tracing::instrument(skip_all, fields(rpc = "WatchEvents", droplet_id = %request.get_ref().droplet_id, deployment_id = %request.get_ref().deployment_id))]
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
        };
        let filter = events::with_kinds(filter, &request.kinds).map_err(Status::invalid_argument)?;
        let from = match (request.cursor.as_str(), request.from_oldest) {
            ("", true) => events::Cursor::OLDEST,
            ("", false) => events::now(&self.db).await.map_err(db_error)?,
            (cursor, _) => events::Cursor::decode(cursor).map_err(|bad| Status::invalid_argument(bad.to_string()))?,
        };
        let stream = events::watch(
            self.db.clone(),
            self.api.fleet.bell.clone(),
            from,
            filter,
            request.follow,
            self.api.stopping.clone(),
        );
        Ok(Response::new(convert::event_stream(stream)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "CreateApiKey"))]
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
        let created = auth::create(&self.db, &account, scope, &request.name, expires_in).await.map_err(key_status)?;
        tracing::info!(api_key_id = %created.id, %account, %scope, by = %caller.principal, "API key created");
        Ok(Response::new(proto::CreateApiKeyResponse { key: created.key, api_key: Some(key_to_proto(created.row)) }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListApiKeys"))]
    async fn list_api_keys(
        &self,
        request: Request<proto::ListApiKeysRequest>,
    ) -> Result<Response<proto::ListApiKeysResponse>, Status> {
        let caller = self.caller(&request, Scope::Admin, "ListApiKeys").await?;
        let account = caller.list_account(&request.get_ref().account)?;
        let rows = store::list_api_keys(&self.db, account.as_deref()).await.map_err(db_error)?;
        Ok(Response::new(proto::ListApiKeysResponse { api_keys: rows.into_iter().map(key_to_proto).collect() }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "RevokeApiKey", api_key_id = %request.get_ref().id))]
    async fn revoke_api_key(
        &self,
        request: Request<proto::RevokeApiKeyRequest>,
    ) -> Result<Response<proto::ApiKey>, Status> {
        let caller = self.caller(&request, Scope::Admin, "RevokeApiKey").await?;
        let id = parse_id("id", &request.get_ref().id)?;
        caller.reach(&self.db, Owned::ApiKey, id).await?;
        let row =
            store::revoke_api_key(&self.db, id).await.map_err(db_error)?.ok_or_else(|| Owned::ApiKey.not_found(id))?;
        tracing::info!(api_key_id = %id, by = %caller.principal, "API key revoked");
        Ok(Response::new(key_to_proto(row)))
    }
}
