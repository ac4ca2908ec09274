//! Background tasks that turn heartbeats (and their absence) into droplet states.
//!
//! - the flusher writes every droplet's latest heartbeat in one statement per flush
//!   interval, so writes grow with the number of flushes, not heartbeats;
//! - the monitor marks `unreachable` a session silent for `missed_heartbeats` intervals;
//! - the sweeper marks `offline` a droplet whose session closed more than the reconnect
//!   grace ago.

use std::time::Duration;

use tokio::{task::JoinSet, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::{
    session::Agents,
    store::{self, DropletStatus},
};

/// Starts the three tasks; each stops when `stop` is cancelled (the flusher after one
/// last flush).
pub fn spawn(agents: &Agents, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    tasks.spawn(flusher(agents.clone(), stop.clone()));
    tasks.spawn(monitor(agents.clone(), stop.clone()));
    tasks.spawn(sweeper(agents.clone(), stop.clone()));
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(period.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Writes all pending heartbeats now.
pub async fn flush(agents: &Agents) {
    let batch = agents.sessions.take_pending();
    if batch.is_empty() {
        crate::metrics::get().flushed();
        return;
    }
    match store::flush_heartbeats(agents.db(), &batch).await {
        Ok(rows) => {
            crate::metrics::get().flushed();
            tracing::debug!(heartbeats = batch.len(), rows, "flushed heartbeats")
        }
        // The next heartbeats replace these; nothing else is lost.
        Err(error) => {
            tracing::warn!(%error, heartbeats = batch.len(), "could not flush heartbeats")
        }
    }
}

async fn flusher(agents: Agents, stop: CancellationToken) {
    let mut ticker = ticker(agents.timing.flush_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => flush(&agents).await,
        }
    }
    flush(&agents).await;
}

async fn monitor(agents: Agents, stop: CancellationToken) {
    let limit = agents.timing.silence_limit();
    let mut ticker = ticker(agents.timing.heartbeat_interval / 2);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        for (droplet, session_id) in agents.sessions.mark_silent(limit) {
            match store::set_liveness(agents.db(), droplet, session_id, DropletStatus::Unreachable).await {
                Ok(_) => {
                    tracing::warn!(droplet_id = %droplet, silent_for = ?limit, "droplet unreachable: heartbeats stopped")
                }
                Err(error) => {
                    tracing::error!(droplet_id = %droplet, %error, "could not record an unreachable droplet")
                }
            }
        }
    }
}

async fn sweeper(agents: Agents, stop: CancellationToken) {
    let grace = agents.timing.reconnect_grace;
    let mut ticker = ticker((grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match store::sweep_offline(agents.db(), grace).await {
            Ok(gone) => {
                for droplet in gone {
                    tracing::info!(droplet_id = %droplet, ?grace, "droplet offline: no session within the reconnect grace");
                }
            }
            Err(error) => tracing::warn!(%error, "offline sweep failed"),
        }
    }
}
