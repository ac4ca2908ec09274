//! Several control planes on one database.
//!
//! Each process is a replica with an id kept in its data dir (a restarted process is the
//! same replica) and a row in `replicas` it refreshes every heartbeat interval. A replica
//! silent for twice the silence limit (at least [`MIN_FAILOVER`]) is dead: any replica
//! releases the sessions it held, which starts their droplets' reconnect grace, so agents
//! have time to reach another replica before anything is marked offline.
//!
//! A droplet's session row names its replica and an epoch that grows with every session.
//! A new session on any replica takes over: the claim notifies `flotilla_sessions`, and
//! the replica holding an older session of that droplet closes it with `Goodbye`. Command
//! delivery checks the session row on every send, so an older session never sends again.

use std::{path::Path, time::Duration};

use flotilla::{
    DropletId,
    proto::{Goodbye, goodbye::Reason},
};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    session::registry::Sessions,
    store::{
        self,
        notify::{Heard, hear, listen},
    },
};

/// A replica is never declared dead sooner than this.
pub const MIN_FAILOVER: Duration = Duration::from_secs(5);

/// This process's replica id, created on first start.
pub fn load_or_create_id(data_dir: &Path) -> anyhow::Result<Uuid> {
    let path = data_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Uuid::try_parse(text.trim()).map_err(|_| {
            anyhow::anyhow!("{} does not hold a replica id; delete it to start afresh", path.display())
        })?),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            std::fs::create_dir_all(data_dir)?;
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
        Err(error) => Err(error.into()),
    }
}

/// How long a replica may be silent before it is dead.
pub fn failover_after(silence_limit: Duration) -> Duration {
    (silence_limit * 2).max(MIN_FAILOVER)
}

/// Keeps this replica's row fresh, releases the sessions of dead replicas, and closes
/// sessions here that a newer session elsewhere took over.
pub async fn spawn(
    db: PgPool,
    replica: Uuid,
    sessions: Sessions,
    heartbeat: Duration,
    failover: Duration,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> sqlx::Result<()> {
    let mut listener = listen(&db, &[store::SESSIONS_CHANNEL]).await?;
    let listening = sessions.clone();
    let stop_listening = stop.clone();
    tasks.spawn(async move {
        while let Some(heard) = hear(&mut listener, &stop_listening, "session").await {
            // A lost notification only delays the close: the old session can no longer
            // send commands (delivery checks the session row) and the agent has moved on.
            let Heard::Notification(notification) = heard else { continue };
            let mut parts = notification.payload().split(':');
            let (Some(droplet), Some(session)) = (parts.next(), parts.next()) else { continue };
            let (Ok(droplet), Ok(session)) = (droplet.parse::<DropletId>(), Uuid::try_parse(session)) else {
                continue;
            };
            // A replica of an earlier version announces no epoch: its session is newer.
            let epoch = parts.next().and_then(|e| e.parse::<i64>().ok()).unwrap_or(i64::MAX);
            let goodbye = Goodbye {
                reason: Reason::Superseded as i32,
                message: "a newer session for this droplet took over".into(),
                ..Default::default()
            };
            if listening.close_older(droplet, session, epoch, goodbye) {
                tracing::info!(droplet_id = %droplet, "a newer session on another replica took over; closed this one");
            }
        }
    });
    let stop = stop.clone();
    tasks.spawn(async move {
        let mut ticker = tokio::time::interval(heartbeat.max(Duration::from_secs(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(error) = beat(&db, replica, failover).await {
                tracing::warn!(%error, "could not record this replica's heartbeat");
            }
        }
    });
    Ok(())
}

async fn beat(db: &PgPool, replica: Uuid, failover: Duration) -> sqlx::Result<()> {
    let released = store::replica_beat(db, replica, failover).await?;
    if released > 0 {
        tracing::warn!(droplets = released, "released the sessions of a replica that went silent");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_keeps_its_id_across_restarts() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("flotilla-replica-{}", Uuid::new_v4()));
        let first = load_or_create_id(&dir)?;
        assert_eq!(load_or_create_id(&dir)?, first);
        std::fs::write(dir.join("replica-id"), "garbage")?;
        assert!(load_or_create_id(&dir).is_err());
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    #[test]
    fn failover_waits_twice_the_silence_limit_and_never_less_than_the_floor() {
        assert_eq!(failover_after(Duration::from_secs(30)), Duration::from_secs(60));
        assert_eq!(failover_after(Duration::from_millis(300)), MIN_FAILOVER);
    }
}
