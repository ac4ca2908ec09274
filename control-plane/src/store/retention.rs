//! Retention: finished commands and events older than the retention are deleted, a small
//! batch per statement, so no statement holds locks for long or bloats one transaction.
//! Open commands are never pruned, however old.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// Deletes what is older than `retention`; returns (commands, events) deleted.
pub async fn prune(db: &PgPool, retention: Duration) -> sqlx::Result<(u64, u64)> {
    let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut commands = 0;
    loop {
        let done = sqlx::query(
            "DELETE FROM commands WHERE id IN (
                 SELECT id FROM commands WHERE finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before)
        .bind(BATCH)
        .execute(db)
        .await?
        .rows_affected();
        commands += done;
        if done < BATCH as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let mut events = 0;
    loop {
        let done =
            sqlx::query("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < $1 ORDER BY id LIMIT $2)")
                .bind(before)
                .bind(BATCH)
                .execute(db)
                .await?
                .rows_affected();
        events += done;
        if done < BATCH as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok((commands, events))
}

/// Prunes every `interval` until `stop`.
pub fn spawn(db: PgPool, retention: Duration, interval: Duration, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    let stop = stop.clone();
    tasks.spawn(async move {
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match prune(&db, retention).await {
                Ok((0, 0)) => {}
                Ok((commands, events)) => tracing::info!(commands, events, "pruned what is past the retention"),
                Err(error) => tracing::warn!(%error, "pruning failed; trying again next time"),
            }
        }
    });
}
