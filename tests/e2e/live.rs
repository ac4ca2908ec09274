//! Live requests through the API, answered by the droplet's agent from the real Docker
//! engine: logs (tail, follow, slow readers, cancellation), inspect, health checked now.

use std::time::Duration;

use flotilla::proto::{
    CheckDeploymentHealthRequest, ContainerState, Health, HealthCheck, HttpProbe, InspectDeploymentRequest, LogEntry,
    RestartPolicy, TailLogsRequest, health_check, log_chunk::Stream, restart_policy,
};
use futures::StreamExt as _;
use tonic::Code;

use crate::helpers::{
    self, TestControlPlane, TestDb,
    deploy::{Online, WITHIN, create, docker_inspect, seconds, test_server_spec, wait_state, with_env},
    wait_for,
};

fn tail(id: &str, tail: u32, follow: bool) -> TailLogsRequest {
    TailLogsRequest { deployment_id: id.into(), tail, since: None, follow }
}

/// Every entry of a log stream that ends by itself, or the error it ended with.
async fn collect(fleet: &mut helpers::Fleet, request: TailLogsRequest) -> anyhow::Result<Vec<LogEntry>> {
    let mut stream = fleet.tail_logs(request).await?.into_inner();
    let mut entries = Vec::new();
    while let Some(entry) = tokio::time::timeout(WITHIN, stream.next()).await? {
        entries.push(entry?);
    }
    Ok(entries)
}

fn text(entries: &[LogEntry], stream: Stream) -> String {
    entries.iter().filter(|e| e.stream() == stream).map(|e| String::from_utf8_lossy(&e.data).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_come_tagged_by_stream_tailed_and_followed() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let spec = with_env(test_server_spec(), &[("LOG_BURST", "50"), ("LOG_EVERY_MS", "200")]);
    let running = {
        let created = create(&cp, droplet, spec).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?
    };
    let mut fleet = cp.fleet().await?;

    // Everything so far: the burst on stdout, the server's start-up line on stderr.
    wait_for("the server to say it listens", WITHIN, || async {
        let all = collect(&mut cp.fleet().await?, tail(&running.id, 0, false)).await?;
        Ok(text(&all, Stream::Stderr).contains("listening on"))
    })
    .await?;
    let all = collect(&mut fleet, tail(&running.id, 0, false)).await?;
    let stdout = text(&all, Stream::Stdout);
    assert!(stdout.starts_with("burst line 00000000\n"), "{stdout:.200}");
    assert!(stdout.contains("burst line 00000049\n"));
    assert!(!stdout.contains("listening"), "stderr is not mixed into stdout");
    assert!(!text(&all, Stream::Stderr).contains("burst"), "stdout is not mixed into stderr");
    assert!(all.iter().all(|e| e.at.is_some() && e.dropped_bytes == 0));
    assert!(!stdout.contains("Z burst"), "Docker's timestamps are stripped from the text");

    // The last three lines only.
    let last = collect(&mut fleet, tail(&running.id, 3, false)).await?;
    let lines: usize = last.iter().map(|e| e.data.iter().filter(|&&b| b == b'\n').count()).sum();
    assert_eq!(lines, 3, "{last:?}");

    // Following: new lines keep coming after the tail.
    let mut stream = fleet.tail_logs(tail(&running.id, 1, true)).await?.into_inner();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let entry = tokio::time::timeout(WITHIN, stream.next()).await?.ok_or(anyhow::anyhow!("the stream ended"))??;
        for line in String::from_utf8_lossy(&entry.data).lines() {
            if let Some(n) = line.strip_prefix("line ") {
                seen.push(n.parse::<u64>()?);
            }
        }
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "consecutive lines as written: {seen:?}");
    drop(stream);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_a_container_ends_when_it_exits() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let mut spec = with_env(test_server_spec(), &[("EXIT_AFTER_MS", "3000"), ("EXIT_CODE", "0")]);
    spec.restart_policy = Some(RestartPolicy { mode: restart_policy::Mode::No as i32, max_retries: 0 });
    let running = {
        let created = create(&cp, droplet, spec).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?
    };
    let entries = collect(&mut cp.fleet().await?, tail(&running.id, 0, true)).await?;
    assert!(text(&entries, Stream::Stderr).contains("exiting with code 0 as asked"), "{entries:?}");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_slower_than_the_writer_loses_whole_lines_and_is_told_how_many_bytes() -> anyhow::Result<()> {
    const LINES: u64 = 300_000;
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let spec = with_env(test_server_spec(), &[("LOG_BURST", &LINES.to_string())]);
    let running = {
        let created = create(&cp, droplet, spec).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?
    };
    let container = running.container.clone().unwrap_or_default();
    let last_line = format!("burst line {:08}\n", LINES - 1);
    // Everything the container will write, counted by Docker's own CLI once all of it is
    // logged: the burst on stdout, then the start-up line on stderr.
    let mut written = 0u64;
    wait_for("the whole burst to be logged", Duration::from_secs(180), || {
        let out = std::process::Command::new("docker").args(["logs", &container.container_id]).output();
        let done = out.as_ref().is_ok_and(|out| {
            out.stdout.ends_with(last_line.as_bytes()) && String::from_utf8_lossy(&out.stderr).contains("listening")
        });
        if let Ok(out) = &out {
            written = (out.stdout.len() + out.stderr.len()) as u64;
        }
        async move { Ok(done) }
    })
    .await?;
    assert!(written >= LINES * 20, "docker logs holds {written} bytes");

    // A reader with a small HTTP/2 window that does not read for a while.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cp.api_ca_pem()?));
    let channel = tonic::transport::Endpoint::from_shared(cp.api_url())?
        .tls_config(tls)?
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await?;
    let mut fleet = helpers::fleet_over(channel, &cp.admin_key)?;
    let mut stream = fleet.tail_logs(tail(&running.id, 0, false)).await?.into_inner();
    // Long enough for the droplet to read all 6 MB even on a busy machine.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut received, mut dropped, mut next) = (0u64, 0u64, 0u64);
    let mut partial = String::new();
    while let Some(entry) = tokio::time::timeout(WITHIN, stream.next()).await? {
        let entry = entry?;
        received += entry.data.len() as u64;
        dropped += entry.dropped_bytes;
        if entry.stream() != Stream::Stdout {
            continue;
        }
        partial.push_str(&String::from_utf8_lossy(&entry.data));
        let complete = partial.rfind('\n').map_or(0, |i| i + 1);
        for line in partial[..complete].lines() {
            // Whole lines, in order, with gaps only where output was dropped.
            let n: u64 = line.strip_prefix("burst line ").ok_or(anyhow::anyhow!("a torn line: {line:?}"))?.parse()?;
            assert!(n >= next, "line {n} after line {next}");
            next = n + 1;
        }
        partial.drain(..complete);
    }
    eprintln!("slow reader: {written} bytes written, {received} received, {dropped} dropped");
    assert!(dropped > 0, "the slow reader lost output ({received} bytes received)");
    assert!(received > 0);
    assert_eq!(received + dropped, written, "every byte is either delivered or counted as dropped");
    assert!(next > 0 && next <= LINES, "lines were delivered, none made up: {next}");
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_frees_the_droplets_log_stream() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let spec = with_env(test_server_spec(), &[("LOG_EVERY_MS", "50")]);
    let running = {
        let created = create(&cp, droplet, spec).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?
    };
    let mut fleet = cp.fleet().await?;
    // An agent serves at most 32 log streams at once: 40 followers, one after the other,
    // only fit if each one's end reaches the agent.
    for n in 0..40 {
        let mut attempts = 0;
        loop {
            let mut stream = fleet.tail_logs(tail(&running.id, 1, true)).await?.into_inner();
            match tokio::time::timeout(WITHIN, stream.next()).await? {
                Some(Ok(_)) => break,
                Some(Err(status)) if status.message().contains("already streams") && attempts < 50 => {
                    // The previous follower's cancellation is still on its way.
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => anyhow::bail!("follower {n}: {other:?}"),
            }
        }
    }
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_check_health_answer_live_from_the_droplet() -> anyhow::Result<()> {
    let Online { db: _, cp, droplet, agent, _cleanup } = Online::start().await?;
    let mut spec = test_server_spec();
    spec.health_check = Some(HealthCheck {
        probe: Some(health_check::Probe::Http(HttpProbe { port: 8080, path: "/healthz".into(), ..Default::default() })),
        // The monitor probes rarely: what changes below is seen only by probing now.
        interval: seconds(300),
        timeout: seconds(2),
        ..Default::default()
    });
    let healthy = {
        let created = create(&cp, droplet, spec).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?
    };
    let container = healthy.container.clone().unwrap_or_default();
    let mut fleet = cp.fleet().await?;

    // The monitor's first probe may have come before the server listened; probing now
    // sees it answer as soon as it does.
    wait_for("a probe made now to pass", WITHIN, || async {
        let checked =
            cp.fleet().await?.check_deployment_health(CheckDeploymentHealthRequest { id: healthy.id.clone() }).await?;
        Ok(checked.into_inner().health.is_some_and(|h| h.health() == Health::Healthy))
    })
    .await?;
    let checked = fleet.check_deployment_health(CheckDeploymentHealthRequest { id: healthy.id.clone() }).await?;
    let health = checked.into_inner().health.unwrap_or_default();
    assert!(health.detail.contains("answered 200"), "{}", health.detail);

    let ip = docker_inspect(
        &container.container_id,
        &format!("{{{{(index .NetworkSettings.Networks \"flotilla-{droplet}\").IPAddress}}}}"),
    )?;
    let out = std::process::Command::new("curl")
        .args(["-fsS", "-X", "POST", &format!("http://{ip}:8080/healthz/fail")])
        .output()?;
    anyhow::ensure!(out.status.success(), "switching the health endpoint: {}", String::from_utf8_lossy(&out.stderr));
    let checked = fleet.check_deployment_health(CheckDeploymentHealthRequest { id: healthy.id.clone() }).await?;
    let health = checked.into_inner().health.unwrap_or_default();
    assert_eq!(health.health(), Health::Unhealthy);
    assert!(health.detail.contains("answered 503"), "{}", health.detail);
    assert!(health.latency.is_some() && health.checked_at.is_some());

    // Inspect sees what Docker sees now, even a change made behind the agent's back.
    let inspected = fleet.inspect_deployment(InspectDeploymentRequest { id: healthy.id.clone() }).await?.into_inner();
    assert_eq!(
        (inspected.state(), inspected.container_id.as_str()),
        (ContainerState::Running, container.container_id.as_str())
    );
    let out = std::process::Command::new("docker").args(["stop", "-t", "1", &container.container_id]).output()?;
    anyhow::ensure!(out.status.success(), "docker stop: {}", String::from_utf8_lossy(&out.stderr));
    let inspected = fleet.inspect_deployment(InspectDeploymentRequest { id: healthy.id.clone() }).await?.into_inner();
    assert_eq!(inspected.state(), ContainerState::Exited);
    let status = fleet.check_deployment_health(CheckDeploymentHealthRequest { id: healthy.id.clone() }).await;
    let status = status.expect_err("a stopped container has no health to check");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("not running"), "{}", status.message());

    // Bad input and a droplet without a session.
    let bad = fleet.inspect_deployment(InspectDeploymentRequest { id: "nope".into() }).await.expect_err("bad id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("id"), "{}", bad.message());
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = fleet.tail_logs(tail(&unknown, 0, false)).await.expect_err("unknown deployment");
    assert_eq!(missing.code(), Code::NotFound);
    agent.stop().await?;
    wait_for("the control plane to see the session end", WITHIN, || async {
        Ok(cp.droplet(droplet).await?.disconnected_at.is_some())
    })
    .await?;
    let offline = fleet.inspect_deployment(InspectDeploymentRequest { id: healthy.id.clone() }).await;
    let offline = offline.expect_err("no session");
    assert_eq!(offline.code(), Code::FailedPrecondition);
    assert!(offline.message().contains("not connected"), "{}", offline.message());
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_deployment_on_a_droplet_without_a_session_fail_at_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = cp.pending_droplet().await?;
    let created = create(&cp, droplet, test_server_spec()).await?;
    let status = cp.fleet().await?.tail_logs(tail(&created.id, 0, true)).await.expect_err("no session");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&droplet.to_string()), "names the droplet: {}", status.message());
    cp.stop().await?;
    Ok(())
}
