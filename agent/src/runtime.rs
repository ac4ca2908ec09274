//! The agent's hands on the local Docker engine: deploy, start, stop, restart and remove
//! the containers of deployments, and report what is really there ([`status`]), with the
//! health checks they carry ([`probe`]) and the progress of image pulls (`pull`).
//!
//! Scoping: every container the agent makes carries `dev.flotilla.managed=true`,
//! `dev.flotilla.droplet=<this droplet>`, `dev.flotilla.deployment=<id>` and
//! `dev.flotilla.generation=<n>` (the keys are in [`crate::labels`]), and is named
//! `flotilla-<deployment>-g<generation>`. The
//! agent lists only containers carrying its own droplet label and refuses to touch a
//! container of a matching name that lacks them: anything else on the host, including
//! another agent's containers on a shared engine, is invisible to it.

use std::collections::HashMap;

use bollard::{
    Docker,
    auth::DockerCredentials,
    errors::Error as DockerError,
    models::{
        ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HostConfig, HostConfigLogConfig, Mount,
        MountTypeEnum, NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
        VolumeCreateOptions,
    },
    query_parameters::{
        CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
        ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RestartContainerOptionsBuilder,
        StopContainerOptionsBuilder,
    },
};
use flotilla::{
    DropletId,
    proto::{self, ContainerStatus},
    spec::{DeploymentSpec, PullPolicy, RestartMode},
};
use futures::StreamExt as _;
use uuid::Uuid;

use crate::labels;

pub mod probe;
mod pull;
pub mod status;

use probe::{ProbeSpec, Target};
use pull::PullReport;
use status::status_of;

/// What went wrong, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the Docker engine refused: {0}")]
    Docker(#[from] DockerError),
    #[error("image {0} is not on this droplet and the pull policy is `never`")]
    ImageMissing(String),
    #[error("pulling {image}: {message}")]
    Pull { image: String, message: String },
    #[error("deployment {0} has no container on this droplet")]
    NotDeployed(Uuid),
    #[error("a container named {0} exists but is not managed by this agent; it is left alone")]
    Foreign(String),
    #[error("generation {new} failed to start ({reason}); generation {old} was restarted")]
    RolledBack { new: u64, old: u64, reason: String },
}

/// The local engine, scoped to one droplet.
#[derive(Clone)]
pub struct Runtime {
    docker: Docker,
    droplet: DropletId,
}

/// `flotilla-<deployment>-g<generation>`.
pub fn container_name(deployment: Uuid, generation: u64) -> String {
    format!("flotilla-{deployment}-g{generation}")
}

/// The per-droplet network every managed container joins.
pub fn network_name(droplet: DropletId) -> String {
    format!("flotilla-{droplet}")
}

fn is_not_found(error: &DockerError) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code: 404, .. })
}

impl Runtime {
    pub fn new(docker: Docker, droplet: DropletId) -> Self {
        Self { docker, droplet }
    }

    pub fn droplet(&self) -> DropletId {
        self.droplet
    }

    fn labels(&self, deployment: Uuid, generation: u64) -> HashMap<String, String> {
        HashMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::DROPLET.to_owned(), self.droplet.to_string()),
            (labels::DEPLOYMENT.to_owned(), deployment.to_string()),
            (labels::GENERATION.to_owned(), generation.to_string()),
        ])
    }

    /// Managed containers of this droplet (optionally of one deployment), with their
    /// generation, oldest generation first.
    async fn managed(&self, deployment: Option<Uuid>) -> Result<Vec<(String, Uuid, u64)>, DockerError> {
        let mut filter = labels::managed_by(self.droplet);
        if let Some(deployment) = deployment {
            filter.push(format!("{}={deployment}", labels::DEPLOYMENT));
        }
        let filters = HashMap::from([("label", filter)]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let mut found: Vec<(String, Uuid, u64)> = self
            .docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // The engine filtered on these; check again rather than trust a filter.
                if labels.get(labels::DROPLET) != Some(&self.droplet.to_string()) {
                    return None;
                }
                let deployment = labels.get(labels::DEPLOYMENT)?.parse().ok()?;
                let generation = labels.get(labels::GENERATION)?.parse().ok()?;
                Some((c.id?, deployment, generation))
            })
            .collect();
        found.sort_by_key(|(_, _, generation)| *generation);
        Ok(found)
    }

    /// Inspects a container only if it is ours.
    async fn inspect_ours(&self, id_or_name: &str) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self.docker.inspect_container(id_or_name, None::<InspectContainerOptions>).await {
            Ok(found) => {
                let labels = found.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
                if labels.get(labels::DROPLET) == Some(&self.droplet.to_string()) {
                    Ok(Some(found))
                } else {
                    Err(RuntimeError::Foreign(id_or_name.to_owned()))
                }
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every managed container of this droplet, as observed now.
    pub async fn inventory(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        let mut statuses = Vec::new();
        for (id, _, _) in self.managed(None).await? {
            if let Some(found) = self.inspect_ours(&id).await? {
                statuses.push(status_of(&found));
            }
        }
        Ok(statuses)
    }

    /// Running managed containers that carry a health check, with their address on the
    /// droplet network.
    pub async fn probe_targets(&self) -> Result<Vec<Target>, RuntimeError> {
        let network = network_name(self.droplet);
        let mut targets = Vec::new();
        for (id, _, _) in self.managed(None).await? {
            let Some(found) = self.inspect_ours(&id).await? else { continue };
            if !found.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
                continue;
            }
            let labels = found.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
            let Some(probe) = ProbeSpec::from_labels(&labels) else { continue };
            let address = found
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .and_then(|n| n.get(&network))
                .and_then(|e| e.ip_address.clone())
                .filter(|ip| !ip.is_empty());
            let status = status_of(&found);
            let docker_health = status.health.as_ref().map(|h| h.health());
            targets.push(Target { container_id: id, probe, address, docker_health, status });
        }
        Ok(targets)
    }

    /// The probe target of a deployment's running container, if it has a health check.
    pub async fn probe_target(&self, deployment: Uuid) -> Result<Option<Target>, RuntimeError> {
        let wanted = deployment.to_string();
        Ok(self.probe_targets().await?.into_iter().find(|t| t.status.deployment_id == wanted))
    }

    /// The output of a deployment's newest container, each frame prefixed with Docker's
    /// RFC 3339 timestamp.
    pub async fn logs(
        &self,
        deployment: Uuid,
        tail: u32,
        since: Option<std::time::SystemTime>,
        follow: bool,
    ) -> Result<impl futures::Stream<Item = Result<bollard::container::LogOutput, DockerError>> + use<>, RuntimeError>
    {
        let id = self.newest(deployment).await?;
        let tail = if tail == 0 { "all".to_owned() } else { tail.to_string() };
        let since = since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i32::try_from(d.as_secs()).unwrap_or(i32::MAX));
        let options = bollard::query_parameters::LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .follow(follow)
            .tail(&tail)
            .since(since)
            .build();
        Ok(self.docker.logs(&id, Some(options)))
    }

    /// The status of a deployment's newest container.
    pub async fn status(&self, deployment: Uuid) -> Result<ContainerStatus, RuntimeError> {
        let (id, _, _) = self.managed(Some(deployment)).await?.pop().ok_or(RuntimeError::NotDeployed(deployment))?;
        let found = self.inspect_ours(&id).await?.ok_or(RuntimeError::NotDeployed(deployment))?;
        Ok(status_of(&found))
    }

    /// The status of a container already known to be the deployment's newest (no need to
    /// list the engine's containers again).
    async fn status_of_container(&self, deployment: Uuid, id: &str) -> Result<ContainerStatus, RuntimeError> {
        let found = self.inspect_ours(id).await?.ok_or(RuntimeError::NotDeployed(deployment))?;
        Ok(status_of(&found))
    }

    async fn ensure_network(&self) -> Result<String, RuntimeError> {
        let name = network_name(self.droplet);
        match self.docker.inspect_network(&name, None::<bollard::query_parameters::InspectNetworkOptions>).await {
            Ok(_) => return Ok(name),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([
                (labels::MANAGED.to_owned(), "true".to_owned()),
                (labels::DROPLET.to_owned(), self.droplet.to_string()),
            ])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(name),
            // Another deploy created it at the same moment.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(name),
            Err(e) => Err(e.into()),
        }
    }

    async fn pull(&self, spec: &DeploymentSpec, progress: &(dyn Fn(String) + Sync)) -> Result<(), RuntimeError> {
        let image = spec.image.to_string();
        let present = match self.docker.inspect_image(&image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(e.into()),
        };
        match (spec.pull_policy, present) {
            (PullPolicy::Never, false) => return Err(RuntimeError::ImageMissing(image)),
            (PullPolicy::Never | PullPolicy::IfNotPresent, true) => return Ok(()),
            _ => {}
        }
        let credentials = spec.registry_auth.as_ref().map(|auth| DockerCredentials {
            username: Some(auth.username.clone()),
            password: Some(auth.password.0.clone()),
            serveraddress: Some(auth.server.clone()).filter(|s| !s.is_empty()),
            ..Default::default()
        });
        let options = CreateImageOptionsBuilder::default().from_image(&image).build();
        let mut steps = self.docker.create_image(Some(options), None, credentials);
        progress(format!("pulling {image} (pull policy {})", spec.pull_policy.as_str()));
        let mut report = PullReport::default();
        while let Some(step) = steps.next().await {
            match step {
                Ok(info) => {
                    if let Some(error) = info.error_detail.and_then(|d| d.message) {
                        return Err(RuntimeError::Pull { image, message: error });
                    }
                    tracing::debug!(status = ?info.status, progress = ?info.progress, "pulling {image}");
                    if let Some(line) = report.step(info.id.as_deref(), info.status.as_deref(), info.progress_detail) {
                        progress(line);
                    }
                }
                Err(e) => return Err(RuntimeError::Pull { image, message: e.to_string() }),
            }
        }
        progress(report.finished(&image));
        Ok(())
    }

    fn create_body(
        &self,
        deployment: Uuid,
        generation: u64,
        spec: &DeploymentSpec,
        network: &str,
    ) -> ContainerCreateBody {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.extend(self.labels(deployment, generation));
        labels.extend(ProbeSpec::labels(spec));
        let mut exposed = HashMap::new();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for port in &spec.ports {
            let key = format!("{}/{}", port.container_port, port.protocol.as_str());
            exposed.insert(key.clone(), HashMap::new());
            bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(PortBinding {
                host_ip: port.bind_address.map(|ip| ip.to_string()),
                host_port: Some(port.host_port.map(|p| p.to_string()).unwrap_or_default()),
            });
        }
        let restart_policy = match spec.restart {
            RestartMode::No => RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None },
            RestartMode::Always => {
                RestartPolicy { name: Some(RestartPolicyNameEnum::ALWAYS), maximum_retry_count: None }
            }
            RestartMode::UnlessStopped => {
                RestartPolicy { name: Some(RestartPolicyNameEnum::UNLESS_STOPPED), maximum_retry_count: None }
            }
            RestartMode::OnFailure { max_retries } => RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(i64::from(max_retries)),
            },
        };
        let mounts = spec
            .volumes
            .iter()
            .map(|v| Mount {
                target: Some(v.container_path.clone()),
                source: Some(volume_name(deployment, &v.name)),
                typ: Some(MountTypeEnum::VOLUME),
                read_only: Some(v.read_only),
                ..Default::default()
            })
            .collect();
        let host_config = HostConfig {
            port_bindings: Some(bindings),
            restart_policy: Some(restart_policy),
            memory: spec.resources.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            // The limit is the limit: no swap on top of it.
            memory_swap: spec.resources.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            nano_cpus: spec.resources.cpu_millis.map(|m| i64::from(m) * 1_000_000),
            mounts: Some(mounts),
            network_mode: Some(network.to_owned()),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([("max-size".into(), "10m".into()), ("max-file".into(), "3".into())])),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.to_string()),
            entrypoint: Some(spec.command.clone()).filter(|c| !c.is_empty()),
            cmd: Some(spec.args.clone()).filter(|a| !a.is_empty()),
            env: Some(spec.env.iter().map(|v| format!("{}={}", v.name, v.value.0)).collect()),
            labels: Some(labels),
            exposed_ports: Some(exposed),
            user: spec.user.clone(),
            working_dir: spec.working_dir.clone(),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(network.to_owned(), EndpointSettings::default())])),
            }),
            ..Default::default()
        }
    }

    async fn ensure_volumes(&self, deployment: Uuid, spec: &DeploymentSpec) -> Result<(), RuntimeError> {
        for volume in &spec.volumes {
            let mut labels = self.labels(deployment, 0);
            labels.remove(labels::GENERATION);
            let options = VolumeCreateOptions {
                name: Some(volume_name(deployment, &volume.name)),
                labels: Some(labels),
                ..Default::default()
            };
            self.docker.create_volume(options).await?;
        }
        Ok(())
    }

    /// Makes `generation` of `deployment` the running container. The same generation again
    /// is a no-op (started if stopped). A new generation is pulled first, created beside
    /// the old one, the old is stopped, the new started; if the new one fails to start,
    /// the old one is started again and the failure reported.
    pub async fn deploy(
        &self,
        deployment: Uuid,
        generation: u64,
        spec: &DeploymentSpec,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<ContainerStatus, RuntimeError> {
        let existing = self.managed(Some(deployment)).await?;
        if let Some((id, _, _)) = existing.iter().find(|(_, _, g)| *g == generation) {
            let found = self.inspect_ours(id).await?.ok_or(RuntimeError::NotDeployed(deployment))?;
            // The generation runs already: a no-op, two reads of the engine.
            if found.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
                return Ok(status_of(&found));
            }
            self.docker.start_container(id, None::<bollard::query_parameters::StartContainerOptions>).await?;
            return self.status_of_container(deployment, id).await;
        }
        self.pull(spec, progress).await?;
        let network = self.ensure_network().await?;
        self.ensure_volumes(deployment, spec).await?;
        let name = container_name(deployment, generation);
        if self.inspect_ours(&name).await?.is_some() {
            // A leftover of an interrupted deploy of this generation: start afresh.
            self.docker
                .remove_container(&name, Some(RemoveContainerOptionsBuilder::default().force(true).build()))
                .await?;
        }
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), self.create_body(deployment, generation, spec, &network))
            .await?;

        let older: Vec<(String, u64)> = existing.into_iter().map(|(id, _, g)| (id, g)).collect();
        for (id, _) in &older {
            self.stop_one(id, 10).await?;
        }
        if let Err(error) =
            self.docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await
        {
            let _ = self
                .docker
                .remove_container(&created.id, Some(RemoveContainerOptionsBuilder::default().force(true).build()))
                .await;
            if let Some((old_id, old_generation)) = older.last() {
                self.docker.start_container(old_id, None::<bollard::query_parameters::StartContainerOptions>).await?;
                return Err(RuntimeError::RolledBack {
                    new: generation,
                    old: *old_generation,
                    reason: error.to_string(),
                });
            }
            return Err(error.into());
        }
        for (id, _) in &older {
            self.docker
                .remove_container(id, Some(RemoveContainerOptionsBuilder::default().force(true).build()))
                .await?;
        }
        self.status(deployment).await
    }

    async fn newest(&self, deployment: Uuid) -> Result<String, RuntimeError> {
        Ok(self.managed(Some(deployment)).await?.pop().ok_or(RuntimeError::NotDeployed(deployment))?.0)
    }

    async fn stop_one(&self, id: &str, grace_secs: i32) -> Result<(), DockerError> {
        match self.docker.stop_container(id, Some(StopContainerOptionsBuilder::default().t(grace_secs).build())).await {
            // 304: already stopped.
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn start(&self, deployment: Uuid) -> Result<ContainerStatus, RuntimeError> {
        let id = self.newest(deployment).await?;
        match self.docker.start_container(&id, None::<bollard::query_parameters::StartContainerOptions>).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.status_of_container(deployment, &id).await
    }

    pub async fn stop(&self, deployment: Uuid, grace: std::time::Duration) -> Result<ContainerStatus, RuntimeError> {
        let id = self.newest(deployment).await?;
        self.stop_one(&id, i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)).await?;
        self.status_of_container(deployment, &id).await
    }

    pub async fn restart(&self, deployment: Uuid, grace: std::time::Duration) -> Result<ContainerStatus, RuntimeError> {
        let id = self.newest(deployment).await?;
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        self.docker.restart_container(&id, Some(RestartContainerOptionsBuilder::default().t(t).build())).await?;
        self.status_of_container(deployment, &id).await
    }

    /// Removes every container of the deployment (and its volumes when asked). Removing
    /// what is already gone succeeds.
    pub async fn remove(&self, deployment: Uuid, remove_volumes: bool) -> Result<(), RuntimeError> {
        for (id, _, _) in self.managed(Some(deployment)).await? {
            match self
                .docker
                .remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).v(true).build()))
                .await
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if remove_volumes {
            let filters = HashMap::from([(
                "label",
                vec![format!("{}={}", labels::DROPLET, self.droplet), format!("{}={deployment}", labels::DEPLOYMENT)],
            )]);
            let options = bollard::query_parameters::ListVolumesOptionsBuilder::default().filters(&filters).build();
            let volumes = self.docker.list_volumes(Some(options)).await?.volumes.unwrap_or_default();
            for volume in volumes {
                self.docker.remove_volume(&volume.name, None::<bollard::query_parameters::RemoveVolumeOptions>).await?;
            }
        }
        Ok(())
    }
}

fn volume_name(deployment: Uuid, name: &str) -> String {
    format!("flotilla-{deployment}-{name}")
}

/// The spec of a `Deploy` command, validated again here before Docker is touched.
pub fn validate(deploy: &proto::Deploy) -> Result<(Uuid, u64, DeploymentSpec), String> {
    let deployment = Uuid::try_parse(&deploy.deployment_id)
        .map_err(|_| format!("deployment_id: {:?} is not a UUID", deploy.deployment_id))?;
    if deploy.generation == 0 {
        return Err("generation: must be at least 1".into());
    }
    let spec = deploy.spec.clone().ok_or("spec: is required")?;
    let spec = DeploymentSpec::try_from(spec).map_err(|e| e.to_string())?;
    Ok((deployment, deploy.generation, spec))
}
