//! Droplets made by a provider, end to end with the `local` provider: an agent container
//! on this machine's Docker engine enrolls with its one-time token, connects over mTLS,
//! runs an MCP server, and is destroyed with everything it ran when the droplet is deleted.

use std::{sync::Arc, time::Duration};

use flotilla::{
    DropletId,
    proto::{
        CreateDropletRequest, DeleteDropletRequest, DropletStatus, GetDropletRequest, HealthCheck, ListToolsRequest,
        health_check,
    },
};
use flotilla_control_plane::{
    fleet::provisioning::Providers,
    fleet::provisioning::local::{Local, LocalConfig},
};

use crate::helpers::{ApiOptions, TestControlPlane, TestDb, deploy, wait_for};

/// The agent image `scripts/images.sh` builds.
const AGENT_IMAGE: &str = "flotilla-agent:latest";

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker").args(args).output()?;
    anyhow::ensure!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// Containers labelled `label`.
fn labelled(label: &str) -> anyhow::Result<Vec<String>> {
    Ok(docker(&["ps", "-aq", "--filter", &format!("label={label}")])?.split_whitespace().map(str::to_owned).collect())
}

/// Removes whatever a test's local droplets left, however it ends.
struct Sweep(Vec<DropletId>);

impl Drop for Sweep {
    fn drop(&mut self) {
        for droplet in &self.0 {
            for label in [format!("dev.flotilla.local-droplet={droplet}"), format!("dev.flotilla.droplet={droplet}")] {
                for id in labelled(&label).unwrap_or_default() {
                    let _ = docker(&["rm", "-f", "-v", &id]);
                }
            }
            let _ = docker(&["network", "rm", &format!("flotilla-{droplet}")]);
            let _ = docker(&["volume", "rm", &format!("flotilla-droplet-{droplet}-state")]);
        }
    }
}

fn local_options(agent_image: &str, timeout: Duration) -> anyhow::Result<ApiOptions> {
    docker(&["image", "inspect", agent_image]).map_err(|e| {
        anyhow::anyhow!("{e}: the agent image is missing; scripts/images.sh builds it (scripts/test.sh runs it)")
    })?;
    let local = Local::new(LocalConfig::default())?;
    Ok(ApiOptions {
        agent_image: agent_image.into(),
        providers: Providers::default().with("local", Arc::new(local)),
        provision_timeout: timeout,
        ..ApiOptions::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_droplet_enrolls_runs_an_mcp_server_and_is_destroyed_whole() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp =
        TestControlPlane::builder(&db.pool).api(local_options(AGENT_IMAGE, Duration::from_secs(120))?).start().await?;
    let mut fleet = cp.fleet().await?;
    let request = CreateDropletRequest {
        provider: "local".into(),
        labels: [("tier".to_owned(), "dev".to_owned())].into(),
        ..Default::default()
    };
    let created = fleet.create_droplet(request).await?.into_inner();
    let droplet = created.droplet.unwrap_or_default();
    let id: DropletId = droplet.id.parse()?;
    let _sweep = Sweep(vec![id]);
    // The answer comes at once; the machine is made in the background.
    assert_eq!(droplet.status(), DropletStatus::Provisioning);
    assert_eq!(droplet.provider, "local");
    assert!(created.token.is_empty() && created.install_command.is_empty(), "nothing to run by hand");

    let online = cp.await_status(id, DropletStatus::Online, Duration::from_secs(90)).await?;
    assert!(!online.cloud_id.is_empty());
    assert_eq!(labelled(&format!("dev.flotilla.local-droplet={id}"))?.len(), 1, "one agent container");
    // It enrolled with a token that is used up now, and holds a certificate of its own.
    let tokens: Vec<(Option<chrono::DateTime<chrono::Utc>>,)> =
        sqlx::query_as("SELECT used_at FROM enrollment_tokens WHERE droplet_id = $1")
            .bind(id.as_uuid())
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].0.is_some(), "the token was used");

    let mut spec = deploy::test_server_spec();
    spec.health_check = Some(HealthCheck {
        probe: Some(health_check::Probe::Mcp(Default::default())),
        interval: deploy::seconds(1),
        timeout: deploy::seconds(1),
        ..Default::default()
    });
    let deployed = deploy::deploy_and_wait_healthy(&cp, id, spec).await?;
    let tools = fleet.list_tools(ListToolsRequest { deployment_id: deployed.id.clone() }).await?.into_inner();
    let names: Vec<&str> = tools.tools.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"echo") && names.contains(&"add"), "{names:?}");
    assert_eq!(labelled(&format!("dev.flotilla.droplet={id}"))?.len(), 1, "the MCP server's container");

    let deleted = fleet.delete_droplet(DeleteDropletRequest { id: id.to_string() }).await?.into_inner();
    assert!(!deleted.revoked_certificate_serials.is_empty(), "its certificate is revoked at once");
    wait_for("the droplet to be gone", Duration::from_secs(60), || async {
        let gone = fleet.clone().get_droplet(GetDropletRequest { id: id.to_string() }).await;
        Ok(matches!(gone, Err(status) if status.code() == tonic::Code::NotFound))
    })
    .await?;
    assert!(labelled(&format!("dev.flotilla.local-droplet={id}"))?.is_empty(), "the agent container is gone");
    assert!(labelled(&format!("dev.flotilla.droplet={id}"))?.is_empty(), "so is what it ran");
    assert!(docker(&["volume", "inspect", &format!("flotilla-droplet-{id}-state")]).is_err(), "and its state");
    let revoked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM certificates WHERE droplet_id = $1 AND revoked_at IS NULL")
            .bind(id.as_uuid())
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(revoked, 0, "no unrevoked certificate is left");
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_droplet_whose_agent_never_connects_ends_in_error_with_nothing_left() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // An image that runs but is no agent: it never enrolls.
    let options = local_options(deploy::IMAGE, Duration::from_secs(4))?;
    let cp = TestControlPlane::builder(&db.pool).api(options).start().await?;
    let mut fleet = cp.fleet().await?;
    let created = fleet
        .create_droplet(CreateDropletRequest { provider: "local".into(), ..Default::default() })
        .await?
        .into_inner();
    let id: DropletId = created.droplet.unwrap_or_default().id.parse()?;
    let _sweep = Sweep(vec![id]);
    let failed = cp.await_status(id, DropletStatus::Error, Duration::from_secs(60)).await?;
    assert!(failed.status_message.contains("did not connect"), "{}", failed.status_message);
    wait_for("the machine to be destroyed", Duration::from_secs(30), || async {
        Ok(labelled(&format!("dev.flotilla.local-droplet={id}"))?.is_empty())
    })
    .await?;
    let usable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM enrollment_tokens WHERE droplet_id = $1 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(id.as_uuid())
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(usable, 0, "its token is revoked");
    // Deleting the failed droplet removes it.
    fleet.delete_droplet(DeleteDropletRequest { id: id.to_string() }).await?;
    wait_for("the droplet to be gone", Duration::from_secs(30), || async {
        let gone = fleet.clone().get_droplet(GetDropletRequest { id: id.to_string() }).await;
        Ok(matches!(gone, Err(status) if status.code() == tonic::Code::NotFound))
    })
    .await?;
    let unknown =
        fleet.create_droplet(CreateDropletRequest { provider: "digitalocean".into(), ..Default::default() }).await;
    let status = unknown.expect_err("not configured here");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("byo, local"), "{}", status.message());
    cp.stop().await?;
    Ok(())
}
