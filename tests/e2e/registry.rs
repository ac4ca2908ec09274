//! Pulls for real: a registry on loopback, pull policies, pull progress as events, and
//! registry credentials that reach the engine and nowhere else.

use flotilla::proto::{
    ContainerState, DeploymentSpec, RegistryAuth, deployment::DesiredState, deployment_spec::PullPolicy,
};

use crate::helpers::{
    self,
    deploy::{IMAGE, Online, WITHIN, create, deployment, test_server_spec, wait_state},
    registry::{Registry, unique_image},
    wait_for,
};

fn from(reference: &str, policy: PullPolicy) -> DeploymentSpec {
    DeploymentSpec { image: reference.into(), pull_policy: policy as i32, ..test_server_spec() }
}

/// The pull events of a deployment, oldest first.
async fn pull_events(db: &helpers::TestDb, deployment: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT message FROM events WHERE deployment_id = $1 AND kind = 'container.pull' ORDER BY id",
    )
    .bind(uuid::Uuid::parse_str(deployment)?)
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_follow_the_pull_policy_and_report_their_progress() -> anyhow::Result<()> {
    let registry = Registry::start(None).await?;
    let tag = format!("policy-{}", uuid::Uuid::new_v4().simple());
    // An image with a layer this engine does not hold: the pull downloads it.
    let reference = registry.push(&unique_image(IMAGE)?, &format!("flotilla-test/mcp-server:{tag}"))?;
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;

    // `never`: the image is not on the droplet, so nothing runs, and the error says why.
    let never = create(&cp, droplet, from(&reference, PullPolicy::Never)).await?;
    wait_for("the refusal to be recorded", WITHIN, || async {
        Ok(deployment(&cp, &never.id).await?.last_error.contains("pull policy is `never`"))
    })
    .await?;
    assert!(deployment(&cp, &never.id).await?.last_error.contains(&reference));
    assert!(pull_events(&db, &never.id).await?.is_empty(), "nothing pulled");

    // `if-not-present`: pulled from the registry, with progress, then run.
    let first = create(&cp, droplet, from(&reference, PullPolicy::IfNotPresent)).await?;
    wait_state(&cp, &first.id, ContainerState::Running).await?;
    let events = pull_events(&db, &first.id).await?;
    assert!(events.first().is_some_and(|e| e.starts_with(&format!("pulling {reference}"))), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("layer ") && e.ends_with("pull complete")), "{events:?}");
    let last = events.last().cloned().unwrap_or_default();
    assert!(last.starts_with(&format!("pulled {reference}")) && last.contains("Digest: sha256:"), "{last}");
    let local = std::process::Command::new("docker").args(["image", "inspect", &reference]).output()?;
    assert!(local.status.success(), "the engine holds the pulled image");

    // `if-not-present` again: the image is here now; no pull.
    let second = create(&cp, droplet, from(&reference, PullPolicy::IfNotPresent)).await?;
    wait_state(&cp, &second.id, ContainerState::Running).await?;
    assert!(pull_events(&db, &second.id).await?.is_empty());

    // `always`: asks the registry even so.
    let third = create(&cp, droplet, from(&reference, PullPolicy::Always)).await?;
    wait_state(&cp, &third.id, ContainerState::Running).await?;
    let events = pull_events(&db, &third.id).await?;
    assert!(events.last().is_some_and(|e| e.contains("Image is up to date")), "{events:?}");

    // A reference the registry does not have fails with the registry's own words.
    let missing = format!("{}/flotilla-test/nothing-here:{tag}", registry.addr);
    let absent = create(&cp, droplet, from(&missing, PullPolicy::IfNotPresent)).await?;
    wait_for("the failed pull to be recorded", WITHIN, || async {
        Ok(deployment(&cp, &absent.id).await?.last_error.starts_with(&format!("pulling {missing}")))
    })
    .await?;
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &reference]).output();
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_registry_gets_the_deployments_credentials_and_nobody_else_sees_them() -> anyhow::Result<()> {
    const PASSWORD: &str = "pull-secret-7f3a9c";
    let registry = Registry::start(Some(("fleet", PASSWORD))).await?;
    let tag = format!("private-{}", uuid::Uuid::new_v4().simple());
    let reference = registry.push(IMAGE, &format!("flotilla-test/mcp-server:{tag}"))?;
    let Online { db, cp, droplet, agent, _cleanup } = Online::start().await?;
    let auth = |password: &str| RegistryAuth {
        username: "fleet".into(),
        password: password.into(),
        server: registry.addr.clone(),
    };

    // No credentials, then wrong ones: the registry refuses, and the error says so.
    let anonymous = create(&cp, droplet, from(&reference, PullPolicy::IfNotPresent)).await?;
    let wrong = create(
        &cp,
        droplet,
        DeploymentSpec { registry_auth: Some(auth("not-it")), ..from(&reference, PullPolicy::IfNotPresent) },
    )
    .await?;
    for refused in [&anonymous, &wrong] {
        wait_for("the refused pull to be recorded", WITHIN, || async {
            let error = deployment(&cp, &refused.id).await?.last_error;
            Ok(error.starts_with(&format!("pulling {reference}")) && error.contains("auth"))
        })
        .await?;
    }

    // The right ones: pulled and run.
    let spec = DeploymentSpec { registry_auth: Some(auth(PASSWORD)), ..from(&reference, PullPolicy::IfNotPresent) };
    let created = create(&cp, droplet, spec).await?;
    assert_eq!(created.spec.as_ref().and_then(|s| s.registry_auth.as_ref()).map(|a| a.password.as_str()), Some("***"));
    let running = wait_state(&cp, &created.id, ContainerState::Running).await?;
    assert_eq!(running.desired_state(), DesiredState::Running);
    assert_eq!(running.spec.and_then(|s| s.registry_auth).map(|a| a.password), Some("***".into()));

    // The password is nowhere in the database: not in the sealed spec, events or errors.
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar("SELECT spec_sealed FROM deployments").fetch_all(&db.pool).await?;
    assert!(sealed.iter().all(|s| !s.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes())));
    let leaks: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events WHERE message LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM deployments WHERE last_error LIKE '%' || $1 || '%')",
    )
    .bind(PASSWORD)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(leaks, 0);
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &reference]).output();
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
