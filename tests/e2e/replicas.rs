//! Several control planes on one database: a change made through any replica reaches the
//! droplet through the replica holding its session; a newer session anywhere closes the
//! older; starting a replica leaves the others' sessions alone; flapping sessions are
//! rate-limited.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{ContainerState, WaitCommandRequest, command_record::State, control_message, goodbye::Reason},
};
use uuid::Uuid;

use crate::helpers::{
    self, TestControlPlane, TestDb,
    deploy::{Cleanup, create, test_server_spec, wait_state},
    hello, new_master_key,
};

const WITHIN: Duration = Duration::from_secs(60);

/// Two replicas of one fleet: one database, one master key.
async fn two(db: &TestDb) -> anyhow::Result<(TestControlPlane, TestControlPlane)> {
    let key = new_master_key();
    let validity = Duration::from_secs(3600);
    let a = TestControlPlane::builder(&db.pool).master_key(key.clone()).cert_validity(validity).start().await?;
    let b = TestControlPlane::builder(&db.pool).master_key(key).cert_validity(validity).start().await?;
    Ok((a, b))
}

fn replica_of(cp: &TestControlPlane) -> anyhow::Result<Uuid> {
    Ok(Uuid::try_parse(std::fs::read_to_string(cp.data_dir.join("replica-id"))?.trim())?)
}

async fn session_row(db: &TestDb, droplet: DropletId) -> anyhow::Result<(Option<Uuid>, Option<Uuid>, i64)> {
    Ok(sqlx::query_as("SELECT session_id, session_replica, session_epoch FROM droplets WHERE id = $1")
        .bind(droplet.as_uuid())
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_another_replica_runs_through_the_one_holding_the_session() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (a, b) = two(&db).await?;
    let droplet = DropletId::new();
    let _cleanup = Cleanup(droplet);
    let agent = a.agent(droplet).await?;
    a.await_status(droplet, flotilla::proto::DropletStatus::Online, WITHIN).await?;
    assert_eq!(session_row(&db, droplet).await?.1, Some(replica_of(&a)?));

    // Made through B, which has no session for the droplet: the ledger and NOTIFY carry it.
    let created = create(&b, droplet, test_server_spec()).await?;
    let request = WaitCommandRequest {
        id: created.last_command_id.clone(),
        timeout: prost_types::Duration::try_from(WITHIN).ok(),
    };
    let done = b.fleet().await?.wait_command(request).await?.into_inner();
    assert_eq!((done.state(), done.attempts), (State::Succeeded, 1), "{done:?}");
    wait_state(&b, &created.id, ContainerState::Running).await?;

    // Starting another replica leaves A's sessions alone.
    let before = session_row(&db, droplet).await?;
    let c = TestControlPlane::builder(&db.pool)
        .master_key(b.master_key.clone())
        .cert_validity(b.cert_validity)
        .start()
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(session_row(&db, droplet).await?, before, "the session stays A's");
    agent.stop().await?;
    for cp in [c, b, a] {
        cp.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_on_another_replica_closes_the_older_one() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (a, b) = two(&db).await?;
    let droplet = DropletId::new();
    let mut old = a.raw_session(droplet, hello()).await?;
    assert!(matches!(old.next().await?.kind, Some(control_message::Kind::Welcome(_))));
    let (_, replica, epoch) = session_row(&db, droplet).await?;
    assert_eq!((replica, epoch), (Some(replica_of(&a)?), 1));

    let mut new = b.raw_session(droplet, hello()).await?;
    assert!(matches!(new.next().await?.kind, Some(control_message::Kind::Welcome(_))));
    match old.next().await?.kind {
        Some(control_message::Kind::Goodbye(goodbye)) => assert_eq!(goodbye.reason(), Reason::Superseded),
        other => anyhow::bail!("expected Goodbye, got {other:?}"),
    }
    let (_, replica, epoch) = session_row(&db, droplet).await?;
    assert_eq!((replica, epoch), (Some(replica_of(&b)?), 2), "B holds it now, one epoch on");
    drop(new);
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_three_new_sessions_in_eight_seconds_are_refused_with_a_retry_hint() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let creds = cp.credentials(droplet).await?;
    for n in 1..=3 {
        let mut session = cp.raw_session_with(&creds, hello()).await?;
        let first = session.next().await?;
        assert!(matches!(first.kind, Some(control_message::Kind::Welcome(_))), "session {n}: {first:?}");
    }
    let mut fourth = cp.raw_session_with(&creds, hello()).await?;
    match fourth.next().await?.kind {
        Some(control_message::Kind::Goodbye(goodbye)) => {
            assert_eq!(goodbye.reason(), Reason::RateLimited);
            let wait = goodbye.reconnect_after.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
            assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_secs(8), "{wait:?}");
        }
        other => anyhow::bail!("expected a rate-limit Goodbye, got {other:?}"),
    }
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_live_reads_through_a_replica_without_the_session_are_forwarded_whole_and_in_order()
-> anyhow::Result<()> {
    use flotilla::proto::{InspectDeploymentRequest, TailLogsRequest, log_chunk::Stream};
    use futures::StreamExt as _;

    let db = TestDb::new().await?;
    let (a, b) = two(&db).await?;
    let droplet = DropletId::new();
    let _cleanup = Cleanup(droplet);
    let agent = a.agent(droplet).await?;
    a.await_status(droplet, flotilla::proto::DropletStatus::Online, WITHIN).await?;
    let spec = helpers::deploy::with_env(test_server_spec(), &[("LOG_BURST", "2000"), ("LOG_EVERY_MS", "50")]);
    let created = create(&a, droplet, spec).await?;
    let running = wait_state(&a, &created.id, ContainerState::Running).await?;

    // B holds no session for the droplet: it forwards to A.
    let mut fleet = b.fleet().await?;
    let inspected = fleet.inspect_deployment(InspectDeploymentRequest { id: created.id.clone() }).await?.into_inner();
    assert_eq!(inspected.container_id, running.container.unwrap_or_default().container_id);

    let request = TailLogsRequest { deployment_id: created.id.clone(), tail: 0, since: None, follow: true };
    let mut stream = fleet.tail_logs(request).await?.into_inner();
    let (mut burst, mut lines, mut text) = (0u64, Vec::new(), String::new());
    while lines.len() < 5 {
        let entry = tokio::time::timeout(WITHIN, stream.next()).await?.ok_or(anyhow::anyhow!("the stream ended"))??;
        assert_eq!(entry.dropped_bytes, 0, "a reader that keeps up loses nothing");
        if entry.stream() != Stream::Stdout {
            continue;
        }
        text.push_str(&String::from_utf8_lossy(&entry.data));
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text[..complete].lines() {
            if let Some(n) = line.strip_prefix("burst line ") {
                assert_eq!(n.parse::<u64>()?, burst, "the burst, whole and in order");
                burst += 1;
            } else if let Some(n) = line.strip_prefix("line ") {
                lines.push(n.parse::<u64>()?);
            }
        }
        text.drain(..complete);
    }
    assert_eq!(burst, 2000);
    assert!(lines.windows(2).all(|w| w[1] == w[0] + 1), "followed lines in order: {lines:?}");
    drop(stream);
    agent.stop().await?;
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_holding_the_session_killed_mid_command_another_replica_finishes_it_once() -> anyhow::Result<()> {
    use flotilla::proto::{GetDeploymentRequest, RestartDeploymentRequest};
    use helpers::process::{Balancer, ControlPlaneProcess};

    let db = TestDb::new().await?;
    let bytes: [u8; 32] = rand::random();
    let key = flotilla_control_plane::identity::master_key::MasterKey::from_bytes(&bytes)?;
    let mut a = ControlPlaneProcess::start(&db, &hex::encode(bytes)).await?;
    let b = ControlPlaneProcess::start(&db, &hex::encode(bytes)).await?;
    // Agents dial the balancer; it prefers A while A is up.
    let balancer = Balancer::start(vec![a.agent_addr, b.agent_addr]).await?;
    let droplet = DropletId::new();
    let _cleanup = Cleanup(droplet);
    let credentials = helpers::credentials(&db.pool, &key, droplet).await?;
    let agent = helpers::agent_at(
        format!("https://localhost:{}", balancer.addr.port()),
        flotilla_agent::IdentitySource::Fixed(credentials),
        "/var/run/docker.sock",
        Some(helpers::temp_dir("flotilla-agent")),
    );
    let replica = |dir: &std::path::Path| -> anyhow::Result<Uuid> {
        Ok(Uuid::try_parse(std::fs::read_to_string(dir.join("replica-id"))?.trim())?)
    };
    let (replica_a, replica_b) = (replica(&a.data_dir)?, replica(&b.data_dir)?);
    helpers::wait_for("A to hold the session", WITHIN, || async {
        // No row until the first session.
        Ok(session_row(&db, droplet).await.ok().and_then(|row| row.1) == Some(replica_a))
    })
    .await?;

    let mut fleet = b.fleet().await?;
    let created = fleet
        .create_deployment(flotilla::proto::CreateDeploymentRequest {
            droplet_id: droplet.to_string(),
            name: String::new(),
            spec: Some(test_server_spec()),
            options: None,
            validate_only: false,
        })
        .await?
        .into_inner();
    helpers::wait_for("the container to run", WITHIN, || async {
        let d = b.fleet().await?.get_deployment(GetDeploymentRequest { id: created.id.clone() }).await?.into_inner();
        Ok(d.container.is_some_and(|c| c.state() == ContainerState::Running))
    })
    .await?;
    let get = fleet.get_deployment(GetDeploymentRequest { id: created.id.clone() }).await?.into_inner();
    let container = get.container.unwrap_or_default().container_id;
    let restarts =
        helpers::deploy::DockerEvents::follow(&["event=restart", &format!("container={container}")], "{{.Action}}")?;

    // A restart, and the replica holding the session dies under it: whatever state the
    // command was in (queued, sent, acked, running), B finishes it.
    let restart = RestartDeploymentRequest { id: created.id.clone(), grace: None, options: None };
    let command = fleet.restart_deployment(restart).await?.into_inner().last_command_id;
    a.kill()?;
    let wait = WaitCommandRequest { id: command, timeout: prost_types::Duration::try_from(WITHIN).ok() };
    let done = fleet.wait_command(wait).await?.into_inner();
    assert_eq!(done.state(), State::Succeeded, "{done:?}\n{}", b.log());
    assert_eq!(session_row(&db, droplet).await?.1, Some(replica_b), "the agent moved to B");

    // Once, as Docker saw it.
    let restarts = restarts.seen().iter().filter(|l| *l == "restart").count();
    assert_eq!(restarts, 1, "restarted exactly once");
    agent.stop().await?;
    Ok(())
}
