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
    store::notify::{Heard, hear, listen},
};

/// `NOTIFY` channel: `<droplet>:<session>` took over the droplet.
pub const SESSIONS_CHANNEL: &str = "flotilla_sessions";
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

/// Records this replica as alive, and releases the sessions it held in an earlier life
/// (they ended with that process). Returns how many were released.
pub async fn start(db: &PgPool, replica: Uuid, api_address: &str) -> sqlx::Result<u64> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    sqlx::query(
        "INSERT INTO replicas (id, hostname, api_address) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET hostname = $2, api_address = $3, started_at = now(), last_seen_at = now()",
    )
    .bind(replica)
    .bind(hostname)
    .bind(api_address)
    .execute(db)
    .await?;
    let done = sqlx::query(
        "UPDATE droplets SET session_id = NULL, session_replica = NULL, disconnected_at = now(), updated_at = now()
         WHERE session_replica = $1 OR (session_id IS NOT NULL AND session_replica IS NULL)",
    )
    .bind(replica)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
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
    let mut listener = listen(&db, &[SESSIONS_CHANNEL]).await?;
    let listening = sessions.clone();
    let stop_listening = stop.clone();
    tasks.spawn(async move {
        while let Some(heard) = hear(&mut listener, &stop_listening, "session").await {
            // A lost notification only delays the close: the old session can no longer
            // send commands (delivery checks the session row) and the agent has moved on.
            let Heard::Notification(notification) = heard else { continue };
            let Some((droplet, session)) = notification.payload().split_once(':') else { continue };
            let (Ok(droplet), Ok(session)) = (droplet.parse::<DropletId>(), Uuid::try_parse(session)) else {
                continue;
            };
            let goodbye = Goodbye {
                reason: Reason::Superseded as i32,
                message: "a newer session for this droplet took over".into(),
                ..Default::default()
            };
            if listening.close_unless(droplet, session, goodbye) {
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
    sqlx::query("UPDATE replicas SET last_seen_at = now() WHERE id = $1").bind(replica).execute(db).await?;
    let dead: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM replicas WHERE last_seen_at < now() - make_interval(secs => $1) AND id <> $2)",
    )
    .bind(failover.as_secs_f64())
    .bind(replica)
    .fetch_one(db)
    .await?;
    if !dead {
        return Ok(());
    }
    let released = sqlx::query(
        "UPDATE droplets SET session_id = NULL, session_replica = NULL, disconnected_at = now(), updated_at = now()
         WHERE session_replica IN (
             SELECT id FROM replicas WHERE last_seen_at < now() - make_interval(secs => $1) AND id <> $2)",
    )
    .bind(failover.as_secs_f64())
    .bind(replica)
    .execute(db)
    .await?
    .rows_affected();
    if released > 0 {
        tracing::warn!(droplets = released, "released the sessions of a replica that went silent");
    }
    // Forget replicas long gone.
    sqlx::query("DELETE FROM replicas WHERE last_seen_at < now() - interval '1 day'").execute(db).await?;
    Ok(())
}

/// On shutdown: the droplets this replica sends away will reconnect because we asked;
/// their reconnection does not count against the session rate limit.
pub async fn forgive_reconnects(db: &PgPool, replica: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE droplets SET session_window_count = 0 WHERE session_replica = $1")
        .bind(replica)
        .execute(db)
        .await?;
    Ok(())
}

/// The API address of the other replica holding `droplet`'s session, if one does.
pub async fn holder_api(db: &PgPool, droplet: DropletId, me: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT r.api_address FROM droplets d JOIN replicas r ON r.id = d.session_replica
         WHERE d.id = $1 AND d.session_id IS NOT NULL AND r.id <> $2 AND r.api_address <> ''",
    )
    .bind(droplet.as_uuid())
    .bind(me)
    .fetch_optional(db)
    .await
}

/// Tells every replica that `session` now holds `droplet` (at commit).
pub async fn announce(db: &PgPool, droplet: DropletId, session: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(SESSIONS_CHANNEL)
        .bind(format!("{droplet}:{session}"))
        .execute(db)
        .await?;
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
