//! 1,000 commands over 20 droplets while control-plane replicas are killed (SIGKILL) and
//! restarted at random: every command ends in a final state, and none is applied twice,
//! as Docker and the agents' own records show, not only the database.

use std::{collections::HashMap, time::Duration};

use flotilla::{
    DropletId,
    proto::{
        CommandOptions, ContainerState, CreateDeploymentRequest, GetDeploymentRequest, RestartDeploymentRequest,
        StartDeploymentRequest, WaitCommandRequest, command_record::State,
    },
};

use crate::helpers::{
    self, TestDb,
    deploy::{Cleanup, DockerEvents, test_server_spec},
    process::{Balancer, ControlPlaneProcess},
};

const DROPLETS: usize = 20;
const COMMANDS: usize = 1000;
/// Every this many commands, a restart (whose effect Docker counts); the rest are starts
/// of running containers.
const RESTART_EVERY: usize = 25;

/// A call to any replica that answers, the same request again on another when one is
/// down: with an idempotency key, retrying is always safe.
async fn any<T, F, Fut>(replicas: &[std::net::SocketAddr], key: &str, mut call: F) -> anyhow::Result<T>
where
    F: FnMut(helpers::Fleet) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut n = rand::random::<u32>() as usize;
    loop {
        let addr = replicas[n % replicas.len()];
        n += 1;
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
        {
            match call(helpers::fleet_over(channel, key)?).await {
                Ok(response) => return Ok(response.into_inner()),
                // The replica died under the call: another one answers the same request.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) => {}
                Err(status) => anyhow::bail!("{status}"),
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "no replica answered for 3 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_commands_through_replica_crashes_each_end_and_none_runs_twice() -> anyhow::Result<()> {
    // Dropped last, after the control planes are gone: nothing recreates what it removes.
    let mut cleanups = Vec::new();
    let db = TestDb::new().await?;
    let bytes: [u8; 32] = rand::random();
    let key_hex = hex::encode(bytes);
    let key = flotilla_control_plane::identity::master_key::MasterKey::from_bytes(&bytes)?;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ControlPlaneProcess::start(&db, &key_hex).await?);
    }
    let apis: Vec<_> = replicas.iter().map(|r| r.api_addr).collect();
    let api_key = replicas[0].admin_key.clone();
    let balancer = Balancer::round_robin(replicas.iter().map(|r| r.agent_addr).collect()).await?;

    let mut droplets = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..DROPLETS {
        let droplet = DropletId::new();
        cleanups.push(Cleanup(droplet));
        let state_dir = helpers::temp_dir("flotilla-chaos-agent");
        let credentials = helpers::credentials(&db.pool, &key, droplet).await?;
        agents.push(helpers::agent_at(
            format!("https://localhost:{}", balancer.addr.port()),
            flotilla_agent::IdentitySource::Fixed(credentials),
            "/var/run/docker.sock",
            Some(state_dir.clone()),
        ));
        droplets.push((droplet, state_dir));
    }
    helpers::wait_for("every droplet online", Duration::from_secs(120), || async {
        let online: i64 =
            sqlx::query_scalar("SELECT count(*) FROM droplets WHERE status = 'online'").fetch_one(&db.pool).await?;
        Ok(online == DROPLETS as i64)
    })
    .await?;
    let mut deployments = Vec::new();
    for (droplet, _) in &droplets {
        let request = CreateDeploymentRequest {
            droplet_id: droplet.to_string(),
            name: String::new(),
            spec: Some(test_server_spec()),
            options: Some(CommandOptions { idempotency_key: format!("create-{droplet}"), deadline: None }),
            validate_only: false,
        };
        let created = any(&apis, &api_key, |mut f| {
            let request = request.clone();
            async move { f.create_deployment(request).await }
        })
        .await?;
        deployments.push(created.id);
    }
    let mut containers = Vec::new();
    for id in &deployments {
        helpers::wait_for("the container to run", Duration::from_secs(120), || async {
            let d = any(&apis, &api_key, |mut f| {
                let id = id.clone();
                async move { f.get_deployment(GetDeploymentRequest { id }).await }
            })
            .await?;
            Ok(d.container.is_some_and(|c| c.state() == ContainerState::Running))
        })
        .await?;
        let d = any(&apis, &api_key, |mut f| {
            let id = id.clone();
            async move { f.get_deployment(GetDeploymentRequest { id }).await }
        })
        .await?;
        containers.push(d.container.unwrap_or_default().container_id);
    }
    let restarts = DockerEvents::follow(&["event=restart", "label=dev.flotilla.managed=true"], "{{.Actor.ID}}")?;

    // Chaos: every 2 s a random replica is SIGKILLed, and started again a second later.
    let replicas = Chaos(std::sync::Arc::new(std::sync::Mutex::new(replicas)));
    let chaos = {
        let replicas = replicas.0.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut kills = 0u32;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let victim = rand::random::<u32>() as usize % 3;
                let _ = replicas.lock().unwrap_or_else(|p| p.into_inner())[victim].kill();
                kills += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(error) = replicas.lock().unwrap_or_else(|p| p.into_inner())[victim].respawn() {
                    eprintln!("restarting replica {victim}: {error:#}");
                }
                eprintln!("chaos: replica {victim} killed and started again ({kills} so far)");
            }
        }))
    };

    // The commands, issued over ~10 s, each through any replica that answers.
    let mut issued = tokio::task::JoinSet::new();
    for n in 0..COMMANDS {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let apis = apis.clone();
        let api_key = api_key.clone();
        let id = deployments[n % DROPLETS].clone();
        issued.spawn(async move {
            let options = Some(CommandOptions { idempotency_key: format!("chaos-{n}"), deadline: None });
            let command = if n % RESTART_EVERY == 0 {
                let request = RestartDeploymentRequest { id: id.clone(), grace: None, options };
                any(&apis, &api_key, |mut f| {
                    let request = request.clone();
                    async move { f.restart_deployment(request).await }
                })
                .await?
            } else {
                let request = StartDeploymentRequest { id: id.clone(), options };
                any(&apis, &api_key, |mut f| {
                    let request = request.clone();
                    async move { f.start_deployment(request).await }
                })
                .await?
            }
            .last_command_id;
            let done = any(&apis, &api_key, |mut f| {
                let wait = WaitCommandRequest {
                    id: command.clone(),
                    timeout: prost_types::Duration::try_from(Duration::from_secs(60)).ok(),
                };
                async move {
                    let done = f.wait_command(wait).await?;
                    if done.get_ref().state() == State::Succeeded || done.get_ref().state() == State::Failed {
                        Ok(done)
                    } else {
                        Err(tonic::Status::unavailable("not final yet"))
                    }
                }
            })
            .await?;
            Ok::<_, anyhow::Error>((n, id, command, done.state(), done.message))
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = issued.join_next().await {
        outcomes.push(joined??);
    }
    drop(chaos);

    // Every command final, and succeeded.
    assert_eq!(outcomes.len(), COMMANDS);
    let failed: Vec<_> = outcomes.iter().filter(|o| o.3 != State::Succeeded).collect();
    assert!(failed.is_empty(), "{} commands did not succeed: {failed:?}", failed.len());
    let distinct: std::collections::HashSet<&String> = outcomes.iter().map(|o| &o.2).collect();
    assert_eq!(distinct.len(), COMMANDS, "one command per idempotency key");

    // Each droplet's own record holds each of its commands once.
    let mut by_deployment: HashMap<&String, Vec<&String>> = HashMap::new();
    for (_, deployment, command, _, _) in &outcomes {
        by_deployment.entry(deployment).or_default().push(command);
    }
    for agent in agents {
        agent.stop().await?;
    }
    for (i, (_, state_dir)) in droplets.iter().enumerate() {
        let record = flotilla_agent::ledger::Ledger::open(state_dir)?.recent(usize::MAX);
        for command in &by_deployment[&deployments[i]] {
            assert_eq!(record.iter().filter(|r| r == command).count(), 1, "command {command} recorded once");
        }
    }

    // Docker restarted each container exactly as often as restarts were asked for.
    let seen = restarts.seen();
    for (i, container) in containers.iter().enumerate() {
        let asked = outcomes.iter().filter(|o| o.1 == deployments[i] && o.0 % RESTART_EVERY == 0).count();
        let restarted = seen.iter().filter(|id| *id == container).count();
        assert_eq!(restarted, asked, "container {container}: {asked} restarts asked, {restarted} seen");
    }
    Ok(())
}

/// The replicas, killed when the test ends however it ends (before the containers are
/// cleaned up, so nothing recreates them).
struct Chaos(std::sync::Arc<std::sync::Mutex<Vec<ControlPlaneProcess>>>);

impl Drop for Chaos {
    fn drop(&mut self) {
        for replica in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            let _ = replica.kill();
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
