//! The `local` provider: a "droplet" is an agent container on the control plane's own
//! Docker engine, for development and tests. Several run side by side.
//!
//! Each gets a state volume of its own and the agent makes the droplet's own network for
//! the containers it runs. The agent container shares the host's network namespace, so it
//! dials the control plane on loopback exactly as a remote agent dials its public address,
//! and reaches its containers on the droplet network as it would on a real droplet.
//! Destroying one removes the agent, its state and everything it ran: on a real cloud that
//! is what destroying the machine does.

use std::{collections::HashMap, time::Duration};

use bollard::{
    Docker,
    models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum, RestartPolicy, RestartPolicyNameEnum},
    query_parameters::{
        CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder, RemoveVolumeOptions, StartContainerOptions,
    },
};
use flotilla::DropletId;
use futures::{FutureExt as _, future::BoxFuture};

use super::provider::{Addresses, CloudId, CreateSpec, Provider, ProviderError};

/// Labels the agent container (and its volume) with the droplet it is.
pub const LABEL_LOCAL_DROPLET: &str = "dev.flotilla.local-droplet";
/// The label the agent puts on every container it runs (see agent/src/runtime.rs).
const LABEL_MANAGED_DROPLET: &str = "dev.flotilla.droplet";

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The engine's socket, mounted into each agent container too.
    pub docker_socket: String,
    /// How long `wait_active` waits for the container to run.
    pub active_timeout: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self { docker_socket: "/var/run/docker.sock".into(), active_timeout: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone)]
pub struct Local {
    docker: Docker,
    config: LocalConfig,
}

fn engine(error: bollard::errors::Error) -> ProviderError {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, message } => {
            ProviderError::NotFound { what: message }
        }
        bollard::errors::Error::DockerResponseServerError { status_code, message } if status_code < 500 => {
            ProviderError::Refused { status: status_code, id: "docker".into(), message }
        }
        other => ProviderError::Unavailable { message: format!("the Docker engine: {other}") },
    }
}

fn container_name(droplet: DropletId) -> String {
    format!("flotilla-droplet-{droplet}")
}

fn volume_name(droplet: DropletId) -> String {
    format!("flotilla-droplet-{droplet}-state")
}

impl Local {
    pub fn new(config: LocalConfig) -> Result<Self, ProviderError> {
        let docker = Docker::connect_with_unix(&config.docker_socket, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| ProviderError::Unavailable { message: format!("the Docker engine: {e}") })?;
        Ok(Self { docker, config })
    }

    async fn containers(&self, label: String) -> Result<Vec<String>, ProviderError> {
        let filters = HashMap::from([("label", vec![label])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let mut ids: Vec<String> = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine)?
            .into_iter()
            .filter_map(|c| c.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn create_container(&self, spec: &CreateSpec) -> Result<CloudId, ProviderError> {
        if let Some(existing) = self.containers(format!("{LABEL_LOCAL_DROPLET}={}", spec.droplet)).await?.first() {
            return Ok(CloudId(existing.clone()));
        }
        let labels = HashMap::from([
            (LABEL_LOCAL_DROPLET.to_owned(), spec.droplet.to_string()),
            ("dev.flotilla.account".to_owned(), spec.account.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(spec.agent_image.clone()),
            env: Some(
                spec.agent_env
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    // A local agent logs as verbosely as the control plane that made it.
                    .chain(std::env::var("RUST_LOG").ok().map(|filter| format!("RUST_LOG={filter}")))
                    .collect(),
            ),
            labels: Some(labels),
            hostname: Some(spec.name.clone()),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                mounts: Some(vec![
                    Mount {
                        typ: Some(MountTypeEnum::BIND),
                        source: Some(self.config.docker_socket.clone()),
                        target: Some("/var/run/docker.sock".into()),
                        ..Default::default()
                    },
                    Mount {
                        typ: Some(MountTypeEnum::VOLUME),
                        source: Some(volume_name(spec.droplet)),
                        target: Some(crate::fleet::provisioning::cloudinit::STATE_DIR.into()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&container_name(spec.droplet)).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(engine)?;
        self.docker.start_container(&created.id, None::<StartContainerOptions>).await.map_err(engine)?;
        Ok(CloudId(created.id))
    }

    async fn running(&self, id: &CloudId) -> Result<Addresses, ProviderError> {
        let until = tokio::time::Instant::now() + self.config.active_timeout;
        loop {
            let inspected =
                self.docker.inspect_container(&id.0, None::<InspectContainerOptions>).await.map_err(engine)?;
            let state = inspected.state.unwrap_or_default();
            if state.running == Some(true) {
                // On the host's network: the addresses are the host's.
                return Ok(Addresses::default());
            }
            if tokio::time::Instant::now() >= until {
                return Err(ProviderError::Timeout {
                    what: format!("agent container {id} to run (state {:?})", state.status),
                    after: self.config.active_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn destroy(&self, id: &CloudId) -> Result<(), ProviderError> {
        let inspected = match self.docker.inspect_container(&id.0, None::<InspectContainerOptions>).await {
            Ok(inspected) => inspected,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
            Err(error) => return Err(engine(error)),
        };
        let droplet = inspected.config.and_then(|c| c.labels).and_then(|l| l.get(LABEL_LOCAL_DROPLET).cloned());
        let remove = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.docker.remove_container(&id.0, Some(remove)).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(error) => return Err(engine(error)),
        }
        let Some(droplet) = droplet.and_then(|d| d.parse::<DropletId>().ok()) else { return Ok(()) };
        // What the agent ran, its network and its state go with it.
        for managed in self.containers(format!("{LABEL_MANAGED_DROPLET}={droplet}")).await? {
            let remove = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
            match self.docker.remove_container(&managed, Some(remove)).await {
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(error) => return Err(engine(error)),
            }
        }
        for result in [
            self.docker.remove_network(&format!("flotilla-{droplet}")).await,
            self.docker.remove_volume(&volume_name(droplet), None::<RemoveVolumeOptions>).await,
        ] {
            match result {
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(error) => return Err(engine(error)),
            }
        }
        Ok(())
    }
}

impl Provider for Local {
    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<CloudId, ProviderError>> {
        self.create_container(spec).boxed()
    }

    fn wait_active<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<Addresses, ProviderError>> {
        self.running(id).boxed()
    }

    fn delete<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<(), ProviderError>> {
        self.destroy(id).boxed()
    }

    fn find(&self, droplet: DropletId) -> BoxFuture<'_, Result<Vec<CloudId>, ProviderError>> {
        async move {
            let ids = self.containers(format!("{LABEL_LOCAL_DROPLET}={droplet}")).await?;
            Ok(ids.into_iter().map(CloudId).collect())
        }
        .boxed()
    }
}
