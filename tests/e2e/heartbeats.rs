//! Heartbeats are cheap: they live in the owning control plane's memory and reach
//! PostgreSQL in one batched statement per flush interval, not one write each.

use std::time::Duration;

use flotilla::DropletId;

use crate::helpers::{TestControlPlane, TestDb, fast_timing, wait_for};

const AGENTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_from_200_agents_are_written_in_batches() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let timing = flotilla_control_plane::timing::Timing {
        heartbeat_interval: Duration::from_millis(200),
        flush_interval: Duration::from_secs(1),
        missed_heartbeats: 10,
        reconnect_grace: Duration::from_secs(60),
        ..fast_timing()
    };
    let cp = TestControlPlane::builder(&db.pool).timing(timing).start().await?;
    // No Docker engine for these agents: 200 of them would only measure the engine.
    let mut agents = Vec::with_capacity(AGENTS);
    for _ in 0..AGENTS {
        agents.push(cp.agent_with(DropletId::new(), "/nonexistent/docker.sock").await?);
    }
    wait_for("every agent online", Duration::from_secs(60), || async {
        let online: i64 =
            sqlx::query_scalar("SELECT count(*) FROM droplets WHERE status = 'online'").fetch_one(&db.pool).await?;
        Ok(online == AGENTS as i64)
    })
    .await?;

    let window = Duration::from_secs(4);
    let (calls_before, rows_before) = db.writes().await?;
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&db.pool).await?;
    tokio::time::sleep(window).await;
    let (calls_after, rows_after) = db.writes().await?;

    // Every droplet's last-seen moved during the window, so heartbeats did reach the
    // database: 200 agents × 5 heartbeats/s × 4 s ≈ 4,000 heartbeats.
    let fresh: i64 = sqlx::query_scalar("SELECT count(*) FROM droplets WHERE last_seen_at > $1")
        .bind(started)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(fresh, AGENTS as i64, "every droplet's heartbeats were written");

    // ... by about one statement per flush interval (4, +1 for the window's edges), plus
    // the offline sweep (at most 1), each writing a row per droplet: not one per heartbeat.
    let calls = calls_after - calls_before;
    let rows = rows_after - rows_before;
    eprintln!("heartbeat window {window:?}: {calls} write statements, {rows} rows, {AGENTS} agents");
    assert!((3..=7).contains(&calls), "{calls} write statements for ~4,000 heartbeats: not batched");
    assert!(rows >= 3 * AGENTS as i64, "{rows} rows in {calls} statements: each flush writes every droplet");

    for agent in agents {
        agent.stop().await?;
    }
    cp.stop().await?;
    Ok(())
}
