//! Command delivery down one session: the droplet's open commands in `seq` order, at most
//! [`WINDOW`] unanswered at a time, every unanswered one again on each new session; and the
//! recorder that writes the session's answers to the ledger in group commits.
//!
//! `NOTIFY` carries ids only. Missed notifications are covered by a slow poll.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::Utc;
use flotilla::{
    DropletId,
    proto::{Command, ControlMessage, command, control_message},
};
use prost::Message as _;
use sqlx::PgPool;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    fleet::{
        Fleet,
        commands::{self, Answer, Completions, WINDOW},
        deployments::{self, DeploymentError},
    },
    session::registry::{Outbound, Sessions},
    store::notify::{Heard, hear, listen},
    store::{self, CommandRow, DONE_CHANNEL, QUEUED_CHANNEL},
};

/// The fallback for missed notifications.
const POLL: Duration = Duration::from_secs(5);
/// Answers gathered from one session at most, per transaction.
const BATCH: usize = 512;

/// Records a session's answers in the ledger. The session's inbound loop hands each
/// answer over and reads on; the recorder writes whatever has gathered meanwhile in one
/// transaction (a group commit): one transaction per answer when the control plane is
/// idle, one per hundreds when it is busy, instead of one per answer always.
pub struct Recorder {
    tx: mpsc::Sender<Answer>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub fn start(db: PgPool, sessions: Sessions, droplet: DropletId) -> Self {
        let (tx, mut rx) = mpsc::channel::<Answer>(BATCH);
        let task = tokio::spawn(
            async move {
                let mut batch = Vec::with_capacity(BATCH);
                while rx.recv_many(&mut batch, BATCH).await > 0 {
                    // Only a final answer makes room in the window; an ack does not.
                    let room = batch.iter().any(|answer| matches!(answer, Answer::Finished(..)));
                    match commands::record(&db, droplet, &batch).await {
                        Ok(finished) => {
                            let metrics = crate::metrics::get();
                            for (agents, round_trip) in finished {
                                metrics.command_finished(&agents, round_trip);
                            }
                        }
                        // The commands stay open: they are sent again on the next session,
                        // and the agent answers from its record.
                        Err(error) => tracing::warn!(%error, answers = batch.len(), "could not record answers"),
                    }
                    batch.clear();
                    if room {
                        // The next commands may go.
                        sessions.wake(droplet);
                    }
                }
            }
            .in_current_span(),
        );
        Self { tx, task }
    }

    /// Hands an answer over; waits only when [`BATCH`] answers are already waiting.
    pub async fn answer(&self, answer: Answer) {
        let _ = self.tx.send(answer).await;
    }

    /// Records what is still waiting, then ends.
    pub async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// Delivers a droplet's commands over one session until it ends.
#[tracing::instrument(name = "delivery", skip_all)]
pub async fn deliver(
    fleet: Fleet,
    droplet: DropletId,
    session: Uuid,
    outbound: Outbound,
    wake: Arc<Notify>,
    end: CancellationToken,
) {
    let mut sent_here: HashSet<Uuid> = HashSet::new();
    loop {
        match pump(&fleet, droplet, session, &outbound, &mut sent_here).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => tracing::warn!(%error, "could not deliver commands; retrying"),
        }
        tokio::select! {
            () = end.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Sends what may be sent now. `Ok(false)`: the session is gone.
async fn pump(
    fleet: &Fleet,
    droplet: DropletId,
    session: Uuid,
    outbound: &Outbound,
    sent_here: &mut HashSet<Uuid>,
) -> sqlx::Result<bool> {
    let open = store::open_commands(&fleet.db, droplet.as_uuid(), i64::try_from(WINDOW * 2).unwrap_or(64)).await?;
    sent_here.retain(|id| open.iter().any(|row| row.id == *id));
    let mut in_flight = sent_here.len();
    let mut ready = Vec::new();
    for row in &open {
        if sent_here.contains(&row.id) {
            continue;
        }
        if in_flight >= WINDOW {
            break;
        }
        // The agent checks the deadline too: this only spares sending what is too late.
        if row.state != "acked" && row.deadline.is_some_and(|d| d < Utc::now()) {
            commands::close(&fleet.db, row, "expired", "the deadline passed before the droplet received it").await?;
            continue;
        }
        let Some(message) = message_for(fleet, row).await? else { continue };
        ready.push((row.id, message));
        in_flight += 1;
    }
    if ready.is_empty() {
        return Ok(true);
    }
    let ids: Vec<Uuid> = ready.iter().map(|(id, _)| *id).collect();
    let marked = store::mark_sent(&fleet.db, &ids, droplet.as_uuid(), session).await?;
    for row in &marked {
        let Some(index) = ready.iter().position(|(id, _)| *id == row.id) else { continue };
        let (_, message) = ready.swap_remove(index);
        let message = ControlMessage { kind: Some(control_message::Kind::Command(message)) };
        if outbound.send(Ok(message)).await.is_err() {
            return Ok(false);
        }
        tracing::debug!(command_id = %row.id, kind = %row.kind, seq = row.seq, attempt = row.attempts, "command sent");
        sent_here.insert(row.id);
    }
    Ok(true)
}

/// The message for a row: a `Deploy` gets its deployment's spec, if that generation is
/// still the one wanted; otherwise the command is cancelled and `None` returned.
async fn message_for(fleet: &Fleet, row: &CommandRow) -> sqlx::Result<Option<Command>> {
    let Ok(mut command) = Command::decode(row.payload.as_slice()) else {
        commands::close(&fleet.db, row, "failed", "the stored command cannot be read").await?;
        return Ok(None);
    };
    if let Some(command::Kind::Deploy(deploy)) = &mut command.kind {
        let Some(deployment) = row.deployment_id else {
            commands::close(&fleet.db, row, "cancelled", "its deployment was deleted").await?;
            return Ok(None);
        };
        match deployments::spec_for(fleet, deployment, deploy.generation).await {
            Ok(Ok(spec)) => deploy.spec = Some(spec),
            Ok(Err(why)) => {
                commands::close(&fleet.db, row, "cancelled", &why).await?;
                return Ok(None);
            }
            Err(DeploymentError::Database(error)) => return Err(error),
            Err(error) => {
                commands::close(&fleet.db, row, "failed", &error.to_string()).await?;
                return Ok(None);
            }
        }
    }
    Ok(Some(command))
}

/// Listens for queued commands (waking the droplet's session here, if any) and for
/// completions (waking that command's `WaitCommand` callers).
pub async fn spawn_listener(
    db: PgPool,
    sessions: Sessions,
    completions: Completions,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> sqlx::Result<()> {
    let mut listener = listen(&db, &[QUEUED_CHANNEL, DONE_CHANNEL]).await?;
    tasks.spawn(async move {
        while let Some(heard) = hear(&mut listener, &stop, "command").await {
            match heard {
                Heard::Notification(notification) => {
                    let payload = notification.payload();
                    if notification.channel() == QUEUED_CHANNEL {
                        if let Ok(droplet) = payload.parse::<DropletId>() {
                            sessions.wake(droplet);
                        }
                    } else if let Ok(id) = Uuid::try_parse(payload) {
                        completions.completed(id);
                    }
                }
                // Every session and every waiter looks again.
                Heard::Lost => {
                    sessions.wake_all();
                    completions.all();
                }
            }
        }
    });
    Ok(())
}
