//! The command ledger: commands are rows before they are messages, delivered when the
//! droplet is there, applied once, and never run after their deadline.

use std::time::Duration;

use anyhow::Context as _;
use flotilla::{
    DropletId,
    proto::{
        CommandOptions, CommandRecord, CreateDeploymentRequest, DropletStatus, GetCommandRequest, ListCommandsRequest,
        RestartDeploymentRequest, StartDeploymentRequest, StopDeploymentRequest, WaitCommandRequest,
        command_record::State,
    },
};
use tonic::Code;

use crate::helpers::{
    self, TestControlPlane, TestDb,
    deploy::{Cleanup, WITHIN, create, deployment, docker_ids, docker_inspect, seconds, test_server_spec},
    fast_timing,
    process::{AgentProcess, Gate},
};

async fn wait(cp: &TestControlPlane, id: &str) -> anyhow::Result<CommandRecord> {
    let request = WaitCommandRequest { id: id.into(), timeout: seconds(60) };
    Ok(cp.fleet().await?.wait_command(request).await?.into_inner())
}

/// A control plane and a droplet that has no agent yet.
async fn offline() -> anyhow::Result<(TestDb, TestControlPlane, DropletId, Cleanup)> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = cp.pending_droplet().await?;
    Ok((db, cp, droplet, Cleanup(droplet)))
}

fn key(key: &str) -> Option<CommandOptions> {
    Some(CommandOptions { idempotency_key: key.into(), deadline: None })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_issued_while_the_droplet_is_offline_runs_once_when_it_returns() -> anyhow::Result<()> {
    let (db, cp, droplet, _cleanup) = offline().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let command = cp.fleet().await?.get_command(GetCommandRequest { id: created.last_command_id.clone() }).await?;
    let command = command.into_inner();
    assert_eq!((command.state(), command.kind.as_str(), command.attempts), (State::Queued, "deploy", 0));
    assert_eq!(command.deployment_id, created.id);
    // Who asked: the API key (by prefix and name, never the key) and where from.
    let by = &command.requested_by;
    assert!(by.starts_with("key flk_") && by.ends_with("(tests) from 127.0.0.1"), "{by}");

    let agent = cp.agent(droplet).await?;
    let done = wait(&cp, &created.last_command_id).await?;
    assert_eq!(done.state(), State::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 1, "sent once");
    assert!(done.result.is_some_and(|c| c.name == format!("flotilla-{}-g1", created.id)));
    assert_eq!(docker_ids(droplet)?.len(), 1, "one container");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM events WHERE kind LIKE 'command.%' ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(kinds, ["command.queued", "command.sent", "command.acked", "command.succeeded"]);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_the_droplet_is_offline_expires_the_command_unrun() -> anyhow::Result<()> {
    let (_db, cp, droplet, _cleanup) = offline().await?;
    let deadline = std::time::SystemTime::now() + Duration::from_millis(500);
    let request = CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: String::new(),
        spec: Some(test_server_spec()),
        options: Some(CommandOptions { idempotency_key: String::new(), deadline: Some(deadline.into()) }),
        validate_only: false,
    };
    let created = cp.fleet().await?.create_deployment(request).await?.into_inner();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let agent = cp.agent(droplet).await?;
    let done = wait(&cp, &created.last_command_id).await?;
    assert_eq!(done.state(), State::Expired, "{done:?}");
    assert!(done.message.contains("deadline"), "{}", done.message);
    // Given the agent time to have run it, had it been sent: nothing ran.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(docker_ids(droplet)?.is_empty(), "never run");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_makes_one_command_even_at_the_same_moment() -> anyhow::Result<()> {
    let (db, cp, droplet, _cleanup) = offline().await?;
    let request = || CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: "once".into(),
        spec: Some(test_server_spec()),
        options: key("create-once"),
        validate_only: false,
    };
    let (mut a, mut b) = (cp.fleet().await?, cp.fleet().await?);
    let (first, second) = tokio::join!(a.create_deployment(request()), b.create_deployment(request()));
    let (first, second) = (first?.into_inner(), second?.into_inner());
    assert_eq!(first.id, second.id, "one deployment");
    assert_eq!(first.last_command_id, second.last_command_id, "one command");
    let counts: (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM deployments), (SELECT count(*) FROM commands)")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(counts, (1, 1));

    let stop = || StopDeploymentRequest { id: first.id.clone(), grace: None, options: key("stop-once") };
    let (x, y) = tokio::join!(a.stop_deployment(stop()), b.stop_deployment(stop()));
    assert_eq!(x?.into_inner().last_command_id, y?.into_inner().last_command_id);
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM commands").fetch_one(&db.pool).await?;
    assert_eq!(commands, 2);

    // A key names one change: used for another, it is refused.
    let reused = a.start_deployment(StartDeploymentRequest { id: first.id.clone(), options: key("stop-once") }).await;
    let reused = reused.expect_err("the key belongs to the stop");
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert!(reused.message().contains("idempotency_key"), "{}", reused.message());

    // Newest first, a page at a time.
    let list = |page_token: String| ListCommandsRequest {
        deployment_id: first.id.clone(),
        page_size: 1,
        page_token,
        ..Default::default()
    };
    let page = a.list_commands(list(String::new())).await?.into_inner();
    assert_eq!(page.commands.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>(), ["stop"]);
    let page = a.list_commands(list(page.next_page_token)).await?.into_inner();
    assert_eq!(page.commands.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>(), ["deploy"]);
    assert!(page.next_page_token.is_empty());
    let bad = a.list_commands(ListCommandsRequest::default()).await.expect_err("no filter");
    assert_eq!(bad.code(), Code::InvalidArgument);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_applying_a_command_and_reporting_it_answers_the_repeat_from_its_record()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let token = cp.token(None).await?;
    let droplet: DropletId = token.enrollment_token.unwrap_or_default().droplet_id.parse()?;
    let _cleanup = Cleanup(droplet);
    // A real agent process, enrolled with the token, dialling the control plane through a
    // gate (by the name in the control plane's certificate).
    let gate = Gate::start(cp.agent_addr).await?;
    let url = format!("https://localhost:{}", gate.addr.port());
    let state_dir = helpers::temp_dir("flotilla-agent-process");
    let mut agent = AgentProcess::start(&url, &cp.enroll_url(), &state_dir, Some(&token.token))?;
    let log = |agent: &AgentProcess| format!("the agent's log:\n{}", agent.log());
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await.with_context(|| log(&agent))?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let deployed = wait(&cp, &created.last_command_id).await?;
    anyhow::ensure!(deployed.state() == State::Succeeded, "{deployed:?}\n{}", log(&agent));
    let container = deployment(&cp, &created.id).await?.container.context("no container")?.container_id;
    let first_start = docker_inspect(&container, "{{.State.StartedAt}}")?;

    // From now on what the agent sends (its ack, its result, its heartbeats) never reaches
    // the control plane, while commands still reach the agent.
    gate.hold_upstream();
    let restart = RestartDeploymentRequest { id: created.id.clone(), grace: seconds(1), options: None };
    let command = cp.fleet().await?.restart_deployment(restart).await?.into_inner().last_command_id;
    // The record is appended and fsynced before the result is sent: once it holds the
    // command, the restart is done, and only the report is missing.
    let record = state_dir.join("commands.log");
    helpers::wait_for("the agent to apply the restart and record its result", WITHIN, || async {
        let recorded =
            std::fs::read(&record).unwrap_or_default().windows(command.len()).any(|w| w == command.as_bytes());
        Ok(recorded && docker_inspect(&container, "{{.State.StartedAt}}")? != first_start)
    })
    .await
    .with_context(|| log(&agent))?;
    let restarted = docker_inspect(&container, "{{.State.StartedAt}}")?;
    let held = cp.fleet().await?.get_command(GetCommandRequest { id: command.clone() }).await?.into_inner();
    assert_eq!((held.state(), held.attempts), (State::Sent, 1), "neither acked nor answered: {held:?}");
    assert_eq!(command_events(&db, &command).await?, ["command.queued", "command.sent"]);

    // SIGKILL before it could report; a new process on the same state dir, with no token:
    // it has its identity, and its record.
    agent.kill()?;
    gate.open();
    let mut agent = AgentProcess::start(&url, &cp.enroll_url(), &state_dir, None)?;
    let again = wait(&cp, &command).await?;
    assert_eq!((again.state(), again.attempts), (State::Succeeded, 2), "sent again, answered: {}", log(&agent));
    assert_eq!(
        command_events(&db, &command).await?,
        ["command.queued", "command.sent", "command.sent", "command.acked", "command.succeeded"]
    );
    assert_eq!(docker_inspect(&container, "{{.State.StartedAt}}")?, restarted, "not restarted twice");
    assert_eq!(docker_ids(droplet)?, std::slice::from_ref(&container), "the same single container");
    let answered = agent
        .log()
        .lines()
        .any(|line| line.contains("a repeated command, answered from the record") && line.contains(&command));
    assert!(answered, "the repeat was not answered from the record; {}", log(&agent));
    agent.kill()?;
    cp.stop().await?;
    Ok(())
}

/// The lifecycle events of command `id`, oldest first.
async fn command_events(db: &TestDb, id: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT kind FROM events WHERE kind LIKE 'command.%' AND strpos(message, $1) > 0 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_a_command_returns_at_its_timeout_when_it_is_not_done() -> anyhow::Result<()> {
    let (_db, cp, droplet, _cleanup) = offline().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let request = WaitCommandRequest { id: created.last_command_id.clone(), timeout: seconds(1) };
    let waited = cp.fleet().await?.wait_command(request).await?.into_inner();
    assert_eq!(waited.state(), State::Queued);
    let missing = WaitCommandRequest { id: uuid::Uuid::new_v4().to_string(), timeout: seconds(1) };
    assert_eq!(cp.fleet().await?.wait_command(missing).await.expect_err("unknown").code(), Code::NotFound);
    let long = WaitCommandRequest { id: created.last_command_id, timeout: seconds(3600) };
    assert_eq!(cp.fleet().await?.wait_command(long).await.expect_err("too long").code(), Code::InvalidArgument);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_commands_and_events_past_the_retention_are_pruned_and_open_ones_kept() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let timing = flotilla_control_plane::timing::Timing {
        retention: Duration::from_secs(3600),
        prune_interval: Duration::from_millis(200),
        ..fast_timing()
    };
    let cp = TestControlPlane::builder(&db.pool).timing(timing).start().await?;
    let droplet = cp.pending_droplet().await?;
    let open = create(&cp, droplet, test_server_spec()).await?;
    let recent = create(&cp, droplet, test_server_spec()).await?;
    // An open command two hours old stays; a recent finished one stays; 2,500 finished two
    // hours ago (more than a batch) go, with the old events.
    sqlx::query("UPDATE commands SET created_at = now() - interval '2 hours' WHERE id = $1::uuid;")
        .bind(&open.last_command_id)
        .execute(&db.pool)
        .await?;
    sqlx::query("UPDATE commands SET state = 'succeeded', finished_at = now() WHERE id = $1::uuid")
        .bind(&recent.last_command_id)
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO commands (id, account, droplet_id, seq, kind, payload, state, created_at, finished_at)
         SELECT gen_random_uuid(), 'default', $1, 1000 + g, 'start', '', 'succeeded',
                now() - interval '3 hours', now() - interval '2 hours'
         FROM generate_series(1, 2500) g",
    )
    .bind(droplet.as_uuid())
    .execute(&db.pool)
    .await?;
    sqlx::query("UPDATE events SET at = now() - interval '2 hours' WHERE kind = 'command.queued'")
        .execute(&db.pool)
        .await?;
    helpers::wait_for("the old rows to be pruned", Duration::from_secs(30), || async {
        let left: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM commands), (SELECT count(*) FROM events WHERE kind = 'command.queued')",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(left == (2, 0))
    })
    .await?;
    let kept: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM commands ORDER BY seq").fetch_all(&db.pool).await?;
    assert_eq!(kept, [open.last_command_id, recent.last_command_id]);
    cp.stop().await?;
    Ok(())
}
