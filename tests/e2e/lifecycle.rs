//! A deployment's lifecycle through the API: stop, start, restart, remove, update to a new
//! generation, a retry after a crash loop, host ports shared between deployments, and an
//! out-of-memory kill reported as such. All against the real Docker engine.

use flotilla::proto::{
    ContainerState, CreateDeploymentRequest, DeploymentSpec, EnvVar, GetDeploymentRequest, PortPublication,
    RemoveDeploymentRequest, Resources, RestartDeploymentRequest, RestartPolicy, StartDeploymentRequest,
    StopDeploymentRequest, UpdateDeploymentRequest, deployment::DesiredState, restart_policy,
};
use tonic::Code;

use crate::helpers::{
    TestControlPlane, TestDb,
    deploy::{Online, WITHIN, create, deployment, docker_ids, docker_inspect, seconds, test_server_spec, wait_state},
    wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_restart_and_remove_through_the_api() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let running = wait_state(&cp, &created.id, ContainerState::Running).await?;
    let container = running.container.unwrap_or_default();
    let mut fleet = cp.fleet().await?;

    let stopped = fleet
        .stop_deployment(StopDeploymentRequest { id: created.id.clone(), grace: seconds(1), options: None })
        .await?;
    assert_eq!(stopped.into_inner().desired_state(), DesiredState::Stopped);
    wait_state(&cp, &created.id, ContainerState::Exited).await?;
    assert_eq!(docker_inspect(&container.container_id, "{{.State.Status}}")?, "exited");

    let started = fleet.start_deployment(StartDeploymentRequest { id: created.id.clone(), options: None }).await?;
    assert_eq!(started.into_inner().desired_state(), DesiredState::Running);
    wait_state(&cp, &created.id, ContainerState::Running).await?;
    let first_start = docker_inspect(&container.container_id, "{{.State.StartedAt}}")?;

    fleet
        .restart_deployment(RestartDeploymentRequest { id: created.id.clone(), grace: seconds(1), options: None })
        .await?;
    wait_for("the container to be restarted", WITHIN, || async {
        Ok(docker_inspect(&container.container_id, "{{.State.StartedAt}}")? != first_start)
    })
    .await?;
    assert_eq!(docker_inspect(&container.container_id, "{{.State.Status}}")?, "running");
    assert_eq!(docker_ids(droplet)?, std::slice::from_ref(&container.container_id), "the same container, restarted");

    let removed = fleet
        .remove_deployment(RemoveDeploymentRequest { id: created.id.clone(), remove_volumes: true, options: None })
        .await?;
    assert_eq!(removed.into_inner().desired_state(), DesiredState::Removed);
    wait_state(&cp, &created.id, ContainerState::Removed).await?;
    assert!(docker_ids(droplet)?.is_empty(), "no container left");

    // A removed deployment stays readable and stays removed.
    let start = fleet.start_deployment(StartDeploymentRequest { id: created.id.clone(), options: None }).await;
    let refused = start.expect_err("removed");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("removed"), "{}", refused.message());
    let again = fleet
        .remove_deployment(RemoveDeploymentRequest { id: created.id.clone(), remove_volumes: false, options: None })
        .await;
    assert!(again.is_ok(), "removing twice is not an error: {again:?}");
    assert_eq!(deployment(&cp, &created.id).await?.desired_state(), DesiredState::Removed);

    // Bad input.
    let unknown = uuid::Uuid::new_v4().to_string();
    let status = fleet
        .stop_deployment(StopDeploymentRequest { id: unknown, grace: None, options: None })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    let long = StopDeploymentRequest { id: created.id.clone(), grace: seconds(7200), options: None };
    let status = fleet.stop_deployment(long).await.expect_err("grace too long");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("grace"), "{}", status.message());
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_runs_the_next_generation_and_keeps_secrets_sent_back_masked() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    wait_state(&cp, &created.id, ContainerState::Running).await?;
    let mut fleet = cp.fleet().await?;

    // Edit the spec as read back (its secret shows as "***") and send it again.
    let mut spec = deployment(&cp, &created.id).await?.spec.unwrap_or_default();
    assert_eq!(spec.env[1].value, "***");
    spec.env.push(EnvVar { name: "GREETING".into(), value: "hello".into(), secret: false });
    let updated = fleet
        .update_deployment(UpdateDeploymentRequest { id: created.id.clone(), spec: Some(spec), options: None })
        .await?;
    assert_eq!(updated.into_inner().generation, 2);
    wait_for("generation 2 to run", WITHIN, || async {
        let d = deployment(&cp, &created.id).await?;
        Ok(d.container.is_some_and(|c| c.generation == 2 && c.state() == ContainerState::Running))
    })
    .await?;
    let container = deployment(&cp, &created.id).await?.container.unwrap_or_default();
    assert_eq!(container.name, format!("flotilla-{}-g2", created.id));
    let env = docker_inspect(&container.container_id, "{{json .Config.Env}}")?;
    assert!(env.contains("API_TOKEN=s3cret-value") && env.contains("GREETING=hello"), "{env}");
    assert_eq!(docker_ids(droplet)?, std::slice::from_ref(&container.container_id), "generation 1 is gone");

    // A generation whose image is missing fails on the droplet; generation 2 keeps running.
    let mut broken = test_server_spec();
    broken.image = "flotilla-test/not-there:latest".into();
    fleet
        .update_deployment(UpdateDeploymentRequest { id: created.id.clone(), spec: Some(broken), options: None })
        .await?;
    wait_for("the failure to be recorded", WITHIN, || async {
        Ok(deployment(&cp, &created.id).await?.last_error.contains("not-there"))
    })
    .await?;
    let after = deployment(&cp, &created.id).await?;
    assert_eq!(after.generation, 3);
    let still = after.container.unwrap_or_default();
    assert_eq!((still.generation, still.state()), (2, ContainerState::Running), "the old generation still runs");
    assert_eq!(docker_inspect(&container.container_id, "{{.State.Status}}")?, "running");

    let invalid = DeploymentSpec { image: "UPPER/case::bad".into(), ..test_server_spec() };
    let status = fleet
        .update_deployment(UpdateDeploymentRequest { id: created.id.clone(), spec: Some(invalid), options: None })
        .await;
    let status = status.expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("image"), "{}", status.message());
    assert_eq!(deployment(&cp, &created.id).await?.generation, 3, "nothing stored");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_retries_a_deployment_that_crash_looped() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let mut spec = test_server_spec();
    spec.env.push(EnvVar { name: "EXIT_AFTER_MS".into(), value: "300".into(), secret: false });
    spec.restart_policy = Some(RestartPolicy { mode: restart_policy::Mode::OnFailure as i32, max_retries: 1 });
    let created = create(&cp, droplet, spec).await?;
    wait_for("the deployment to fail", WITHIN, || async { Ok(deployment(&cp, &created.id).await?.failed) }).await?;
    let container = deployment(&cp, &created.id).await?.container.unwrap_or_default();
    let stopped_at = docker_inspect(&container.container_id, "{{.State.FinishedAt}}")?;

    let retried = cp
        .fleet()
        .await?
        .restart_deployment(RestartDeploymentRequest { id: created.id.clone(), grace: seconds(1), options: None })
        .await?
        .into_inner();
    assert!(!retried.failed && retried.last_error.is_empty(), "{retried:?}");
    // It runs again (and, exiting again, will crash-loop again: that is the point).
    wait_for("the container to run again", WITHIN, || async {
        Ok(docker_inspect(&container.container_id, "{{.State.FinishedAt}}")? != stopped_at)
    })
    .await?;
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_taken_by_another_deployment_on_the_droplet_is_refused() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = cp.pending_droplet().await?;
    let publish = |host_port| PortPublication { container_port: 8080, host_port, ..Default::default() };
    let first = create(&cp, droplet, DeploymentSpec { ports: vec![publish(18080)], ..test_server_spec() }).await?;

    let clash = DeploymentSpec { ports: vec![publish(18081), publish(18080)], ..test_server_spec() };
    let request = CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: String::new(),
        spec: Some(clash),
        options: None,
        validate_only: false,
    };
    let status = cp.fleet().await?.create_deployment(request).await.expect_err("port taken");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ports[1].host_port") && status.message().contains(&first.id),
        "names the field and the deployment holding the port: {}",
        status.message()
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments").fetch_one(&db.pool).await?;
    assert_eq!(stored, 1);

    // The deployment holding the port may keep it across updates; once removed, it is free.
    let mut fleet = cp.fleet().await?;
    let same = DeploymentSpec { ports: vec![publish(18080)], ..test_server_spec() };
    fleet
        .update_deployment(UpdateDeploymentRequest { id: first.id.clone(), spec: Some(same.clone()), options: None })
        .await?;
    fleet
        .remove_deployment(RemoveDeploymentRequest { id: first.id.clone(), remove_volumes: false, options: None })
        .await?;
    create(&cp, droplet, same).await?;
    let get = fleet.get_deployment(GetDeploymentRequest { id: first.id.clone() }).await?.into_inner();
    assert_eq!(get.desired_state(), DesiredState::Removed);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_for_memory_is_reported_as_oom() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;
    let mut spec = test_server_spec();
    spec.env.push(EnvVar { name: "ALLOCATE_MB".into(), value: "256".into(), secret: false });
    spec.resources = Some(Resources { memory_bytes: 32 << 20, cpu_millis: 0 });
    spec.restart_policy = Some(RestartPolicy { mode: restart_policy::Mode::No as i32, max_retries: 0 });
    let created = create(&cp, droplet, spec).await?;
    wait_for("an oom event", WITHIN, || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE deployment_id = $1 AND kind = 'container.oom'")
                .bind(uuid::Uuid::parse_str(&created.id)?)
                .fetch_one(&db.pool)
                .await?;
        Ok(n >= 1)
    })
    .await?;
    let exited = wait_state(&cp, &created.id, ContainerState::Exited).await?;
    let container = exited.container.unwrap_or_default();
    assert_eq!(container.exit_code, Some(137), "killed by the kernel");
    assert_eq!(docker_inspect(&container.container_id, "{{.State.OOMKilled}}")?, "true");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
