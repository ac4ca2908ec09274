//! An agent's session with the control plane, end to end: real TLS, real gRPC, real
//! PostgreSQL, and the machine's real Docker engine.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        AgentMessage, DropletStatus, Heartbeat, HostLoad, ListDropletsRequest, agent_message, control_message,
        goodbye::Reason,
    },
};

use crate::helpers::{TestControlPlane, TestDb, hello, wait_for};

const WITHIN: Duration = Duration::from_secs(20);

fn docker_server_version() -> String {
    let out = std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("the docker CLI runs: these tests need a Docker engine");
    assert!(out.status.success(), "no Docker engine answers: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_makes_its_droplet_online_with_real_host_facts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let agent = cp.agent(droplet).await?;

    let seen = cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    let host = seen.host.clone().unwrap_or_default();
    assert_eq!(seen.id, droplet.to_string());
    assert_eq!(seen.account, "default");
    assert_eq!(seen.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(host.hostname, sysinfo_hostname());
    assert_eq!(host.cpu_count as usize, std::thread::available_parallelism()?.get().max(host.cpu_count as usize));
    assert!(host.memory_total_bytes > 0 && host.disk_total_bytes > 0);
    assert!(!host.os.is_empty() && !host.kernel_version.is_empty());
    assert_eq!(seen.docker_version, docker_server_version());
    assert_eq!(seen.protocol, Some(flotilla::protocol::CURRENT));
    assert!(seen.connected_at.is_some());

    // Heartbeats reach the database in batches: last-seen moves and the load is real.
    let first_seen = seen.last_seen_at.expect("last seen at connect");
    wait_for("a flushed heartbeat", WITHIN, || async {
        let now = cp.droplet(droplet).await?;
        Ok(now.last_seen_at.as_ref().is_some_and(|t| (t.seconds, t.nanos) > (first_seen.seconds, first_seen.nanos)))
    })
    .await?;
    let load = cp.droplet(droplet).await?.load.unwrap_or_default();
    assert!(load.memory_used_bytes > 0 && load.memory_used_bytes <= host.memory_total_bytes);
    assert!(load.disk_free_bytes > 0 && load.disk_used_bytes + load.disk_free_bytes <= host.disk_total_bytes);

    // The list shows it too.
    let list = cp.fleet().await?.list_droplets(ListDropletsRequest::default()).await?.into_inner();
    assert_eq!(list.droplets.len(), 1);
    assert_eq!(list.droplets[0].status(), DropletStatus::Online);

    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

fn sysinfo_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_its_droplet_offline_once_the_grace_has_passed() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let agent = cp.agent(droplet).await?;
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;

    agent.stop().await?;
    let offline = cp.await_status(droplet, DropletStatus::Offline, WITHIN).await?;

    // Not before the grace: the sweep compares against the moment the session closed.
    let (disconnected, updated): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT disconnected_at, updated_at FROM droplets WHERE id = $1")
            .bind(droplet.as_uuid())
            .fetch_one(&db.pool)
            .await?;
    assert!(offline.disconnected_at.is_some());
    assert!(
        (updated - disconnected).to_std()? >= cp.timing.reconnect_grace,
        "offline {:?} after the session closed, sooner than the grace",
        updated - disconnected
    );
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_turns_unreachable_and_comes_back_with_a_heartbeat() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    // A client that says Hello and then nothing, with its connection held open.
    let mut session = cp.raw_session(droplet, hello()).await?;
    let welcome = session.next().await?;
    let Some(control_message::Kind::Welcome(welcome)) = welcome.kind else {
        anyhow::bail!("expected Welcome, got {welcome:?}");
    };
    assert_eq!(welcome.droplet_id, droplet.to_string(), "the droplet is named by its certificate");
    assert_eq!(welcome.heartbeat_interval, Some(prost_types_duration(cp.timing.heartbeat_interval)));
    assert!(!welcome.trust_bundle.unwrap_or_default().ca_certificates_pem.is_empty());
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;

    cp.await_status(droplet, DropletStatus::Unreachable, WITHIN).await?;

    let beat = Heartbeat { load: Some(HostLoad { container_count: 7, ..Default::default() }), sent_at: None };
    session.tx.send(AgentMessage { seq: 2, kind: Some(agent_message::Kind::Heartbeat(beat)) }).await?;
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    wait_for("the heartbeat's load to be flushed", WITHIN, || async {
        Ok(cp.droplet(droplet).await?.load.unwrap_or_default().container_count == 7)
    })
    .await?;
    drop(session);
    cp.stop().await?;
    Ok(())
}

fn prost_types_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("duration fits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_by_itself_after_the_control_plane_restarts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let agent = cp.agent(droplet).await?;
    let before = cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    let first_connect = before.connected_at.expect("connected");

    let cp = cp.restart().await?;
    wait_for("a new session after the restart", WITHIN, || async {
        let now = cp.droplet(droplet).await?;
        let reconnected = now
            .connected_at
            .as_ref()
            .is_some_and(|t| (t.seconds, t.nanos) > (first_connect.seconds, first_connect.nanos));
        Ok(reconnected && now.status() == DropletStatus::Online && now.disconnected_at.is_none())
    })
    .await?;
    // The restart never made the droplet offline: the grace covered it.
    let offline_moves: i64 =
        sqlx::query_scalar("SELECT count(*) FROM droplets WHERE status = 'offline'").fetch_one(&db.pool).await?;
    assert_eq!(offline_moves, 0);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_goodbye_with_a_reconnect_hint_within_the_spread() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let mut session = cp.raw_session(droplet, hello()).await?;
    session.next().await?; // Welcome
    let spread = cp.timing.reconnect_spread;
    let stopping = tokio::spawn(cp.stop());
    let message = session.next().await?;
    let Some(control_message::Kind::Goodbye(goodbye)) = message.kind else {
        anyhow::bail!("expected Goodbye, got {message:?}");
    };
    assert_eq!(goodbye.reason(), Reason::Shutdown);
    let hint = Duration::try_from(goodbye.reconnect_after.expect("a hint"))?;
    assert!(hint >= spread / 10 && hint <= spread, "hint {hint:?} outside the spread {spread:?}");
    drop(session);
    stopping.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_for_the_same_droplet_displaces_the_first() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let mut first = cp.raw_session(droplet, hello()).await?;
    first.next().await?;
    let mut second = cp.raw_session(droplet, hello()).await?;
    second.next().await?;
    let message = first.next().await?;
    let Some(control_message::Kind::Goodbye(goodbye)) = message.kind else {
        anyhow::bail!("expected Goodbye, got {message:?}");
    };
    assert_eq!(goodbye.reason(), Reason::Superseded);
    // The first session's end must not release the droplet the second one holds.
    drop(first);
    tokio::time::sleep(cp.timing.reconnect_grace * 2).await;
    let now = cp.droplet(droplet).await?;
    assert_ne!(now.status(), DropletStatus::Offline, "the second session still holds the droplet");
    assert!(now.disconnected_at.is_none());
    drop(second);
    cp.stop().await?;
    Ok(())
}
