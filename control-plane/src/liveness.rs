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
    state::State,
    store::{self, DropletStatus},
};

/// Starts the three tasks; each stops when `stop` is cancelled (the flusher after one
/// last flush).
pub fn spawn(state: &State, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    tasks.spawn(flusher(state.clone(), stop.clone()));
    tasks.spawn(monitor(state.clone(), stop.clone()));
    tasks.spawn(sweeper(state.clone(), stop.clone()));
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(period.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Writes all pending heartbeats now.
pub async fn flush(state: &State) {
    let batch = state.sessions.take_pending();
    if batch.is_empty() {
        crate::metrics::get().flushed();
        return;
    }
    match store::flush_heartbeats(&state.db, &batch).await {
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

async fn flusher(state: State, stop: CancellationToken) {
    let mut ticker = ticker(state.timing.flush_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => flush(&state).await,
        }
    }
    flush(&state).await;
}

async fn monitor(state: State, stop: CancellationToken) {
    let limit = state.timing.silence_limit();
    let mut ticker = ticker(state.timing.heartbeat_interval / 2);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        for (droplet, session_id) in state.sessions.mark_silent(limit) {
            match store::set_liveness(&state.db, droplet, session_id, DropletStatus::Unreachable).await {
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

async fn sweeper(state: State, stop: CancellationToken) {
    let grace = state.timing.reconnect_grace;
    let mut ticker = ticker((grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match store::sweep_offline(&state.db, grace).await {
            Ok(gone) => {
                for droplet in gone {
                    tracing::info!(droplet_id = %droplet, ?grace, "droplet offline: no session within the reconnect grace");
                }
            }
            Err(error) => tracing::warn!(%error, "offline sweep failed"),
        }
    }
}
