//! The command round trip: from the API call to the command being `succeeded`, as a
//! client sees it (`StartDeployment`, then `WaitCommand`), for a command with no Docker
//! work to speak of (starting a container that runs: the engine answers "already
//! started"). Offered open-loop at a fixed rate, over several droplets, each with a real
//! agent and a real container. Real PostgreSQL, TLS, gRPC and Docker, all on this machine.
//!
//!     scripts/bench.sh commands          # starts a throwaway PostgreSQL, then runs this

/// The end-to-end tests' helpers (tests/e2e/helpers.rs and tests/e2e/helpers/), of which a
/// benchmark uses a part.
#[path = "../tests/e2e"]
#[allow(dead_code)]
mod e2e {
    pub mod helpers;
}

use std::time::{Duration, Instant};

use e2e::helpers::{
    TestControlPlane, TestDb,
    deploy::{Cleanup, create, test_server_spec, wait_state},
    fast_timing, percentile,
};
use flotilla::{
    DropletId,
    proto::{ContainerState, StartDeploymentRequest, WaitCommandRequest, command_record::State},
};

/// Droplets the commands are spread over (`FLOTILLA_BENCH_DROPLETS` to change it).
const DROPLETS: usize = 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let timing = flotilla_control_plane::timing::Timing {
        heartbeat_interval: Duration::from_secs(5),
        flush_interval: Duration::from_secs(5),
        reconcile_interval: Duration::from_secs(60),
        ..fast_timing()
    };
    // Two calls per command: well above the API's default per-key rate limit.
    let cp = TestControlPlane::builder(&db.pool).timing(timing).per_second(1_000_000).start().await?;
    let mut agents = Vec::new();
    let mut deployments = Vec::new();
    let mut cleanups = Vec::new();
    let droplets = std::env::var("FLOTILLA_BENCH_DROPLETS").ok().and_then(|n| n.parse().ok()).unwrap_or(DROPLETS);
    for _ in 0..droplets {
        let droplet = DropletId::new();
        cleanups.push(Cleanup(droplet));
        agents.push(cp.agent(droplet).await?);
        cp.await_status(droplet, flotilla::proto::DropletStatus::Online, Duration::from_secs(60)).await?;
        let created = create(&cp, droplet, test_server_spec()).await?;
        wait_state(&cp, &created.id, ContainerState::Running).await?;
        deployments.push(created.id);
    }
    // One HTTP/2 connection, many concurrent calls on it.
    let fleet = cp.fleet().await?;

    for (rate, seconds) in [(100u32, 10u64), (300, 10), (1000, 5)] {
        let total = rate as usize * seconds as usize;
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..total {
            ticker.tick().await;
            let id = deployments[n % deployments.len()].clone();
            let mut client = fleet.clone();
            calls.spawn(async move {
                let t0 = Instant::now();
                let request = StartDeploymentRequest { id, options: None };
                let command = client.start_deployment(request).await?.into_inner().last_command_id;
                let wait = WaitCommandRequest {
                    id: command,
                    timeout: prost_types::Duration::try_from(Duration::from_secs(120)).ok(),
                };
                let done = client.wait_command(wait).await?.into_inner();
                anyhow::ensure!(done.state() == State::Succeeded, "command ended {:?}: {}", done.state(), done.message);
                Ok::<_, anyhow::Error>(t0.elapsed())
            });
        }
        let offered = started.elapsed();
        let mut samples = Vec::with_capacity(total);
        while let Some(joined) = calls.join_next().await {
            samples.push(joined??);
        }
        let all_done = started.elapsed();
        samples.sort();
        println!(
            "command round trip at {rate}/s offered ({total} commands over {droplets} droplets, offered in {:.1}s, all \
             succeeded after {:.1}s, {:.0}/s done): p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            offered.as_secs_f64(),
            all_done.as_secs_f64(),
            total as f64 / all_done.as_secs_f64(),
            percentile(&samples, 0.50),
            percentile(&samples, 0.90),
            percentile(&samples, 0.99),
            samples[samples.len() - 1]
        );
    }
    for agent in agents {
        agent.stop().await?;
    }
    cp.stop().await?;
    Ok(())
}
