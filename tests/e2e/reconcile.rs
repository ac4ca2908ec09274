//! Desired state heals itself: what is changed behind the fleet's back on a droplet is put
//! back within a sweep (one second in these tests), and every correction says why.

use std::time::Duration;

use flotilla::proto::{
    ContainerState, DeploymentSpec, ListCommandsRequest, StopDeploymentRequest, command_record::State,
};

use crate::helpers::{
    self, TestDb,
    deploy::{Online, WITHIN, create, deployment, docker_ids, docker_inspect, test_server_spec, wait_state},
    wait_for,
};

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker").args(args).output()?;
    anyhow::ensure!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn reconcile_events(db: &TestDb, deployment: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT message FROM events WHERE deployment_id = $1 AND kind = 'reconcile' ORDER BY id")
        .bind(uuid::Uuid::parse_str(deployment)?)
        .fetch_all(&db.pool)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_removed_or_stopped_by_hand_is_put_back() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let running = wait_state(&cp, &created.id, ContainerState::Running).await?;
    let first = running.container.unwrap_or_default().container_id;

    // Stopped behind the fleet's back: started again, the same container.
    docker(&["stop", "-t", "1", &first])?;
    wait_for("the container to run again", WITHIN, || async {
        Ok(docker_inspect(&first, "{{.State.Status}}")? == "running")
    })
    .await?;
    let events = reconcile_events(&db, &created.id).await?;
    assert!(events.iter().any(|e| e.contains("should run: starting it")), "{events:?}");

    // Deleted behind its back: created again.
    docker(&["rm", "-f", &first])?;
    wait_for("a new container to run", WITHIN, || async {
        let d = deployment(&cp, &created.id).await?;
        Ok(d.container.is_some_and(|c| c.state() == ContainerState::Running && c.container_id != first))
    })
    .await?;
    let events = reconcile_events(&db, &created.id).await?;
    assert!(events.iter().any(|e| e.contains("no container runs generation 1: creating it")), "{events:?}");
    assert_eq!(docker_ids(droplet)?.len(), 1, "exactly one container");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_wanted_stopped_is_stopped_again_when_started_by_hand() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let running = wait_state(&cp, &created.id, ContainerState::Running).await?;
    let id = running.container.unwrap_or_default().container_id;
    let stop = StopDeploymentRequest { id: created.id.clone(), grace: None, options: None };
    cp.fleet().await?.stop_deployment(stop).await?;
    wait_state(&cp, &created.id, ContainerState::Exited).await?;

    docker(&["start", &id])?;
    wait_for("the container to be stopped again", WITHIN, || async {
        Ok(docker_inspect(&id, "{{.State.Status}}")? == "exited")
    })
    .await?;
    let events = reconcile_events(&db, &created.id).await?;
    assert!(events.iter().any(|e| e.contains("should be stopped")), "{events:?}");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_container_of_an_unknown_deployment_is_removed_when_the_agent_says_hello() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    agent.stop().await?;
    // A container of this droplet for a deployment the fleet never had (left over from a
    // deleted deployment, or a restored database).
    let stray = uuid::Uuid::new_v4();
    docker(&[
        "run",
        "-d",
        "--label",
        "dev.flotilla.managed=true",
        "--label",
        &format!("dev.flotilla.droplet={droplet}"),
        "--label",
        &format!("dev.flotilla.deployment={stray}"),
        "--label",
        "dev.flotilla.generation=1",
        "--name",
        &format!("flotilla-{stray}-g1"),
        helpers::deploy::IMAGE,
    ])?;
    assert_eq!(docker_ids(droplet)?.len(), 1);

    let agent = cp.agent(droplet).await?;
    wait_for("the stray container to be removed", WITHIN, || async { Ok(docker_ids(droplet)?.is_empty()) }).await?;
    let request = ListCommandsRequest { droplet_id: droplet.to_string(), ..Default::default() };
    let commands = cp.fleet().await?.list_commands(request).await?.into_inner().commands;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!((commands[0].kind.as_str(), commands[0].requested_by.as_str()), ("remove", "reconciler"));
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_that_keeps_failing_is_retried_with_back_off_not_at_every_sweep() -> anyhow::Result<()> {
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;
    let missing = DeploymentSpec { image: "flotilla-test/not-here:latest".into(), ..test_server_spec() };
    let created = create(&cp, droplet, missing).await?;
    let request = || ListCommandsRequest { deployment_id: created.id.clone(), ..Default::default() };
    wait_for("the deploy to fail", WITHIN, || async {
        let commands = cp.fleet().await?.list_commands(request()).await?.into_inner().commands;
        Ok(commands.first().is_some_and(|c| c.state() == State::Failed))
    })
    .await?;
    // Three sweeps later, still the one failed attempt: the next waits 30 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let commands = cp.fleet().await?.list_commands(request()).await?.into_inner().commands;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert!(reconcile_events(&db, &created.id).await?.is_empty());
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
