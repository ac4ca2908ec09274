//! The agent's runtime against the real Docker engine: deploy, lifecycle, generations,
//! rollback, and scoping to its own droplet. The image is the test MCP server built by
//! `scripts/images.sh` (run by `scripts/test.sh`).

use std::{collections::HashMap, time::Duration};

use bollard::{
    Docker,
    query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder},
};
use flotilla::{
    DropletId,
    proto::{self, ContainerState, Deploy},
    spec::DeploymentSpec,
};
use flotilla_agent::runtime::{self, Runtime, RuntimeError, container_name};
use uuid::Uuid;

const IMAGE: &str = "flotilla-test/mcp-server:latest";

async fn docker() -> anyhow::Result<Docker> {
    let docker = Docker::connect_with_unix("/var/run/docker.sock", 60, bollard::API_DEFAULT_VERSION)?
        .negotiate_version()
        .await
        .map_err(|e| anyhow::anyhow!("these tests need the Docker engine at /var/run/docker.sock: {e}"))?;
    docker
        .inspect_image(IMAGE)
        .await
        .map_err(|e| anyhow::anyhow!("image {IMAGE} is missing ({e}): run scripts/images.sh (scripts/test.sh does)"))?;
    Ok(docker)
}

fn spec(extra: impl FnOnce(&mut proto::DeploymentSpec)) -> anyhow::Result<DeploymentSpec> {
    let mut spec = proto::DeploymentSpec {
        image: IMAGE.into(),
        pull_policy: proto::deployment_spec::PullPolicy::Never as i32,
        env: vec![proto::EnvVar { name: "PORT".into(), value: "8080".into(), secret: false }],
        ..Default::default()
    };
    extra(&mut spec);
    Ok(DeploymentSpec::try_from(spec)?)
}

/// Removes everything a test droplet made, however the test ended.
struct Cleanup {
    docker: Docker,
    droplet: DropletId,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let droplet = self.droplet;
        // Best effort, on the CLI so it runs outside the test's runtime.
        let ids = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=dev.flotilla.droplet={droplet}")])
            .output();
        if let Ok(out) = ids {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker").args(["rm", "-f", "-v", id]).output();
            }
        }
        let _ = std::process::Command::new("docker").args(["network", "rm", &runtime::network_name(droplet)]).output();
        let _ = &self.docker;
    }
}

async fn setup() -> anyhow::Result<(Docker, Runtime, Cleanup)> {
    let docker = docker().await?;
    let droplet = DropletId::new();
    let runtime = Runtime::new(docker.clone(), droplet);
    Ok((docker.clone(), runtime, Cleanup { docker, droplet }))
}

async fn state(docker: &Docker, id: &str) -> anyhow::Result<Option<bool>> {
    match docker.inspect_container(id, None::<InspectContainerOptions>).await {
        Ok(found) => Ok(Some(found.state.and_then(|s| s.running).unwrap_or(false))),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_a_labelled_container_and_the_lifecycle_works() -> anyhow::Result<()> {
    let (docker, runtime, _cleanup) = setup().await?;
    let deployment = Uuid::new_v4();
    let status = runtime.deploy(deployment, 1, &spec(|_| {})?, &|_| {}).await?;
    assert_eq!(status.state(), ContainerState::Running);
    assert_eq!(status.name, container_name(deployment, 1));
    assert_eq!((status.deployment_id.as_str(), status.generation), (deployment.to_string().as_str(), 1));

    let found = docker.inspect_container(&status.container_id, None::<InspectContainerOptions>).await?;
    let labels = found.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get("dev.flotilla.managed").map(String::as_str), Some("true"));
    assert_eq!(labels.get("dev.flotilla.droplet"), Some(&runtime.droplet().to_string()));
    let host = found.host_config.unwrap_or_default();
    assert_eq!(host.log_config.and_then(|l| l.config).and_then(|c| c.get("max-size").cloned()).as_deref(), Some("10m"));
    let networks = found.network_settings.and_then(|n| n.networks).unwrap_or_default();
    assert!(networks.contains_key(&runtime::network_name(runtime.droplet())), "{:?}", networks.keys());

    // The same generation again changes nothing.
    let again = runtime.deploy(deployment, 1, &spec(|_| {})?, &|_| {}).await?;
    assert_eq!(again.container_id, status.container_id);

    let stopped = runtime.stop(deployment, Duration::from_secs(5)).await?;
    assert_eq!(stopped.state(), ContainerState::Exited);
    assert_eq!(runtime.start(deployment).await?.state(), ContainerState::Running);
    let restarted = runtime.restart(deployment, Duration::from_secs(5)).await?;
    assert_eq!(restarted.state(), ContainerState::Running);
    assert_eq!(runtime.inventory().await?.len(), 1);

    runtime.remove(deployment, true).await?;
    assert_eq!(state(&docker, &status.container_id).await?, None);
    runtime.remove(deployment, true).await?; // removing what is gone succeeds
    assert!(matches!(runtime.start(deployment).await, Err(RuntimeError::NotDeployed(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_replaces_the_old_and_a_broken_one_rolls_back() -> anyhow::Result<()> {
    let (docker, runtime, _cleanup) = setup().await?;
    let deployment = Uuid::new_v4();
    let first = runtime.deploy(deployment, 1, &spec(|_| {})?, &|_| {}).await?;
    let second =
        runtime.deploy(deployment, 2, &spec(|s| drop(s.labels.insert("tier".into(), "two".into())))?, &|_| {}).await?;
    assert_eq!(second.generation, 2);
    assert_eq!(second.state(), ContainerState::Running);
    assert_eq!(state(&docker, &first.container_id).await?, None, "the old generation is removed");

    // Generation 3 cannot start (no such entrypoint): generation 2 keeps running.
    let broken = spec(|s| s.command = vec!["/does-not-exist".into()])?;
    match runtime.deploy(deployment, 3, &broken, &|_| {}).await {
        Err(RuntimeError::RolledBack { new: 3, old: 2, .. }) => {}
        other => anyhow::bail!("expected a rollback to generation 2, got {other:?}"),
    }
    assert_eq!(state(&docker, &second.container_id).await?, Some(true));
    let inventory = runtime.inventory().await?;
    assert_eq!(inventory.len(), 1, "{inventory:?}");
    assert_eq!(inventory[0].generation, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_this_droplets_labels_are_never_touched() -> anyhow::Result<()> {
    let (docker, runtime, _cleanup) = setup().await?;
    let deployment = Uuid::new_v4();
    // A container that merely has the name this deployment would use.
    let name = container_name(deployment, 1);
    let out = std::process::Command::new("docker")
        .args(["create", "--name", &name, "--label", "owner=someone-else", IMAGE])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker create: {}", String::from_utf8_lossy(&out.stderr));
    let foreign = String::from_utf8(out.stdout)?.trim().to_owned();
    // Another agent's container on the same engine.
    let other = Runtime::new(docker.clone(), DropletId::new());
    let _other_cleanup = Cleanup { docker: docker.clone(), droplet: other.droplet() };
    let theirs = other.deploy(Uuid::new_v4(), 1, &spec(|_| {})?, &|_| {}).await?;

    match runtime.deploy(deployment, 1, &spec(|_| {})?, &|_| {}).await {
        Err(RuntimeError::Foreign(n)) => assert_eq!(n, name),
        other => anyhow::bail!("expected the foreign container to be refused, got {other:?}"),
    }
    assert_eq!(state(&docker, &foreign).await?, Some(false), "the foreign container is untouched");
    assert!(runtime.inventory().await?.is_empty(), "another droplet's containers are invisible");
    assert_eq!(state(&docker, &theirs.container_id).await?, Some(true));
    docker.remove_container(&foreign, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await?;
    let filters = HashMap::from([("label", vec![format!("dev.flotilla.droplet={}", runtime.droplet())])]);
    let ours = docker
        .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))
        .await?;
    assert!(ours.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_refused_before_docker_and_a_missing_image_is_named() -> anyhow::Result<()> {
    let (_docker, runtime, _cleanup) = setup().await?;
    let deploy = Deploy {
        deployment_id: Uuid::new_v4().to_string(),
        generation: 1,
        spec: Some(proto::DeploymentSpec { image: IMAGE.into(), privileged: true, ..Default::default() }),
    };
    let refused = runtime::validate(&deploy).expect_err("privileged");
    assert!(refused.contains("privileged"), "{refused}");

    let missing = spec(|s| s.image = "flotilla-test/not-built:never".into())?;
    match runtime.deploy(Uuid::new_v4(), 1, &missing, &|_| {}).await {
        Err(RuntimeError::ImageMissing(image)) => assert_eq!(image, "flotilla-test/not-built:never"),
        other => anyhow::bail!("expected a missing image, got {other:?}"),
    }
    assert!(runtime.inventory().await?.is_empty());
    Ok(())
}
