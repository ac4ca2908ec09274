//! A deployment made through the API runs on the droplet: the control plane stores it,
//! the agent runs it on the real Docker engine and reports the container back.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        ContainerState, CreateDeploymentRequest, EnvVar, Health, HealthCheck, HttpProbe, ListToolsRequest,
        RestartPolicy, health_check, restart_policy,
    },
};
use tonic::Code;

use crate::helpers::{
    TestControlPlane, TestDb,
    deploy::{Online, WITHIN, create, deploy_and_wait_healthy, deployment, docker_inspect, seconds, test_server_spec},
    wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_made_through_the_api_ends_running_on_the_droplet() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;

    let request = CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: "test-mcp".into(),
        spec: Some(test_server_spec()),
        options: None,
        validate_only: false,
    };
    let created = cp.fleet().await?.create_deployment(request).await?.into_inner();
    assert_eq!(created.generation, 1);
    let masked = created.spec.clone().unwrap_or_default();
    assert_eq!(masked.env[1].value, "***", "secret values never come back");
    assert_eq!(masked.env[0].value, "8080");

    wait_for("the container to run", WITHIN, || async {
        let d = deployment(&cp, &created.id).await?;
        Ok(d.container.is_some_and(|c| c.state() == ContainerState::Running))
    })
    .await?;
    let container = deployment(&cp, &created.id).await?.container.unwrap_or_default();
    assert_eq!(container.name, format!("flotilla-{}-g1", created.id));
    // The secret reached the one place that needs it: the container's own configuration.
    let env = docker_inspect(&container.container_id, "{{json .Config.Env}}")?;
    assert!(env.contains("API_TOKEN=s3cret-value"), "{env}");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT spec_sealed FROM deployments").fetch_one(&db.pool).await?;
    assert!(!stored.windows(12).any(|w| w == b"s3cret-value"), "the spec is sealed at rest");

    // An agent restart re-reports the inventory and touches nothing.
    let started = docker_inspect(&container.container_id, "{{.State.StartedAt}}")?;
    let reported_before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT reported_at FROM containers").fetch_one(&db.pool).await?;
    agent.stop().await?;
    let agent = cp.agent(droplet).await?;
    wait_for("the inventory to be re-reported", WITHIN, || async {
        let reported: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT reported_at FROM containers").fetch_one(&db.pool).await?;
        Ok(reported > reported_before)
    })
    .await?;
    assert_eq!(docker_inspect(&container.container_id, "{{.State.StartedAt}}")?, started, "not restarted");
    let ours = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=dev.flotilla.droplet={droplet}")])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&ours.stdout).split_whitespace().count(), 1, "nothing duplicated");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_refused_with_every_bad_field_named_and_nothing_stored() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = cp.pending_droplet().await?;
    let mut spec = test_server_spec();
    spec.privileged = true;
    spec.env.push(EnvVar { name: "BAD=NAME".into(), value: String::new(), secret: false });
    let request = CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: String::new(),
        spec: Some(spec),
        options: None,
        validate_only: false,
    };
    let status = cp.fleet().await?.create_deployment(request).await.expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("privileged") && status.message().contains("env[2].name"),
        "{}",
        status.message()
    );
    // Programs get the same as a google.rpc.BadRequest detail, one violation per field.
    let bad = tonic_types::StatusExt::get_details_bad_request(&status).expect("a BadRequest detail");
    let fields: Vec<&str> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"spec.privileged") && fields.contains(&"spec.env[2].name"), "{fields:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments").fetch_one(&db.pool).await?;
    assert_eq!(stored, 0);

    let request = CreateDeploymentRequest {
        droplet_id: DropletId::new().to_string(),
        name: String::new(),
        spec: Some(test_server_spec()),
        options: None,
        validate_only: false,
    };
    assert_eq!(cp.fleet().await?.create_deployment(request).await.expect_err("no droplet").code(), Code::NotFound);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_server_turns_healthy_only_by_answering_mcp_and_its_tools_are_stored() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;

    let mut spec = test_server_spec();
    spec.health_check = Some(HealthCheck {
        probe: Some(health_check::Probe::Mcp(Default::default())),
        interval: seconds(1),
        timeout: seconds(1),
        ..Default::default()
    });
    let healthy = deploy_and_wait_healthy(&cp, droplet, spec).await?;
    let health = healthy.container.and_then(|c| c.health).unwrap_or_default();
    assert!(health.detail.contains("tools/list") && health.detail.contains("echo"), "{}", health.detail);
    assert!(health.latency.is_some());

    let tools =
        cp.fleet().await?.list_tools(ListToolsRequest { deployment_id: healthy.id.clone() }).await?.into_inner();
    assert_eq!(tools.server_name, "flotilla-test-mcp-server");
    let names: Vec<&str> = tools.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["add", "echo"]);
    let echo: serde_json::Value = serde_json::from_str(&tools.tools[1].input_schema_json)?;
    assert_eq!(echo["properties"]["text"]["type"], "string", "{echo}");
    assert_eq!(tools.tools[1].description, "Echo the text back");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_endpoint_switched_to_failing_gets_the_container_restarted_with_the_reason() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;

    let mut spec = test_server_spec();
    spec.health_check = Some(HealthCheck {
        probe: Some(health_check::Probe::Http(HttpProbe { port: 8080, path: "/healthz".into(), ..Default::default() })),
        interval: seconds(1),
        timeout: seconds(1),
        failure_threshold: 2,
        ..Default::default()
    });
    let healthy = deploy_and_wait_healthy(&cp, droplet, spec).await?;
    let container = healthy.container.unwrap_or_default();
    let ip = docker_inspect(
        &container.container_id,
        &format!("{{{{(index .NetworkSettings.Networks \"flotilla-{droplet}\").IPAddress}}}}"),
    )?;
    let out = std::process::Command::new("curl")
        .args(["-fsS", "-X", "POST", &format!("http://{ip}:8080/healthz/fail")])
        .output()?;
    anyhow::ensure!(out.status.success(), "switching the health endpoint: {}", String::from_utf8_lossy(&out.stderr));

    // The agent sees it fail twice, then restarts it, and says why.
    wait_for("a restart for failed health", WITHIN, || async {
        let restarts: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE kind = 'container.restart' AND message LIKE '%answered 503%'",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(restarts >= 1)
    })
    .await?;

    // Self-healing: the agent restarts it, and the fresh process answers again.
    wait_for("the restarted container to be healthy", WITHIN, || async {
        let d = deployment(&cp, &healthy.id).await?;
        Ok(d.container.and_then(|c| c.health).is_some_and(|h| h.health() == Health::Healthy))
    })
    .await?;
    let restarted = docker_inspect(&container.container_id, "{{.State.StartedAt}}")?;
    let first_start = container.started_at.map(|t| t.seconds).unwrap_or_default();
    let restarted_at = chrono::DateTime::parse_from_rfc3339(&restarted)?.timestamp();
    assert!(restarted_at > first_start, "the container was restarted");
    assert!(!deployment(&cp, &healthy.id).await?.failed);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_container_is_capped_reported_and_left_stopped() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;

    let mut spec = test_server_spec();
    spec.env.push(EnvVar { name: "EXIT_AFTER_MS".into(), value: "200".into(), secret: false });
    spec.env.push(EnvVar { name: "EXIT_CODE".into(), value: "3".into(), secret: false });
    spec.restart_policy = Some(RestartPolicy { mode: restart_policy::Mode::OnFailure as i32, max_retries: 2 });
    let created = create(&cp, droplet, spec).await?;

    wait_for("the deployment to be failed", Duration::from_secs(60), || async {
        Ok(deployment(&cp, &created.id).await?.failed)
    })
    .await?;
    let failed = deployment(&cp, &created.id).await?;
    let container = failed.container.clone().unwrap_or_default();
    assert_eq!(container.state(), ContainerState::CrashLooping);
    assert_eq!(container.restart_count, 2, "capped at the policy's retries");
    assert_eq!(container.exit_code, Some(3));
    assert!(failed.last_error.contains("exited with code 3"), "{}", failed.last_error);
    // Left stopped: the engine does not restart it again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(docker_inspect(&container.container_id, "{{.State.Status}} {{.RestartCount}}")?, "exited 2");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_stays_unhealthy_is_restarted_up_to_its_cap_then_left_stopped() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;

    let mut spec = test_server_spec();
    spec.restart_policy = Some(RestartPolicy { mode: restart_policy::Mode::OnFailure as i32, max_retries: 1 });
    spec.health_check = Some(HealthCheck {
        // A path the server does not have: never healthy.
        probe: Some(health_check::Probe::Http(HttpProbe { port: 8080, path: "/nope".into(), ..Default::default() })),
        interval: seconds(1),
        timeout: seconds(1),
        failure_threshold: 2,
        ..Default::default()
    });
    let created = create(&cp, droplet, spec).await?;
    wait_for("the deployment to be given up on", Duration::from_secs(60), || async {
        Ok(deployment(&cp, &created.id).await?.failed)
    })
    .await?;
    let failed = deployment(&cp, &created.id).await?;
    assert!(failed.last_error.contains("after 1 restarts"), "{}", failed.last_error);
    let container = failed.container.unwrap_or_default();
    wait_for("the container to be stopped", WITHIN, || async {
        Ok(docker_inspect(&container.container_id, "{{.State.Status}}")? == "exited")
    })
    .await?;
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
