//! The command ledger: commands are rows before they are messages.
//!
//! An API change writes its command in the same transaction as the change itself (a
//! deployment's new generation, its desired state) and `NOTIFY`s the droplet's id. The
//! session holding the droplet delivers its open commands in `seq` order, at most
//! [`WINDOW`] unanswered at a time, and re-sends every unanswered one on each new session
//! (`session::delivery`); the agent applies each id at most once and answers repeats from
//! its own record. A command whose deadline passes before it is delivered ends `expired`,
//! never run.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use flotilla::{
    DropletId,
    proto::{self, Command, command},
};
use prost::Message as _;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    fleet::Fleet,
    store::{self, CommandRow, NewCommand, Results},
};

/// Commands sent to one droplet and not yet answered, at most.
pub const WINDOW: usize = 32;
/// Longest idempotency key accepted.
const MAX_KEY: usize = 200;

pub fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "expired" | "cancelled")
}

/// Options from the API, checked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub idempotency_key: Option<String>,
    pub deadline: Option<DateTime<Utc>>,
    /// Who asked, for the record (the API caller's address until accounts have keys).
    pub requested_by: String,
}

impl Options {
    /// Options with a checked idempotency key (empty: none).
    pub fn new(idempotency_key: String, deadline: Option<DateTime<Utc>>) -> Result<Self, String> {
        let key = idempotency_key;
        if key.len() > MAX_KEY || key.chars().any(char::is_control) {
            return Err(format!("options.idempotency_key: at most {MAX_KEY} characters, no control characters"));
        }
        Ok(Self { idempotency_key: Some(key).filter(|k| !k.is_empty()), deadline, requested_by: String::new() })
    }
}

/// Writes a command, queued, and notifies the droplet's session (at commit). Call with
/// the droplet locked ([`store::lock_droplet`]) and the key checked ([`store::by_key`]).
pub async fn issue(
    conn: &mut PgConnection,
    droplet: Uuid,
    deployment: Option<Uuid>,
    kind: command::Kind,
    options: &Options,
) -> sqlx::Result<CommandRow> {
    let id = Uuid::new_v4();
    let name = kind.name();
    // A newer generation supersedes an older one not yet on its way.
    if let (command::Kind::Deploy(deploy), Some(deployment)) = (&kind, deployment) {
        store::supersede_queued_deploys(conn, deployment, deploy.generation).await?;
    }
    let payload = Command {
        id: id.to_string(),
        deadline: options
            .deadline
            .map(|d| prost_types::Timestamp { seconds: d.timestamp(), nanos: d.timestamp_subsec_nanos() as i32 }),
        kind: Some(kind),
    };
    let new = NewCommand {
        id,
        droplet,
        deployment,
        kind: name,
        payload: payload.encode_to_vec(),
        idempotency_key: options.idempotency_key.as_deref(),
        deadline: options.deadline,
        requested_by: &options.requested_by,
    };
    store::insert_command(conn, new).await
}

/// What an agent said about a command, and when it was heard.
#[derive(Debug)]
pub enum Answer {
    /// The agent has the command.
    Acked(Uuid, DateTime<Utc>),
    /// The command is final on the agent.
    Finished(Box<proto::CommandResult>, DateTime<Utc>),
}

/// Writes a batch of answers in one transaction: acknowledgements first, then results,
/// each as one statement, with their events. Answers to commands not open (repeats,
/// late answers) change nothing. Returns the final states reached, with round trips.
pub async fn record(
    db: &PgPool,
    droplet: DropletId,
    answers: &[Answer],
) -> sqlx::Result<Vec<(String, Option<Duration>)>> {
    let (mut acked, mut acked_at) = (Vec::new(), Vec::new());
    let mut done = Results::default();
    for answer in answers {
        match answer {
            Answer::Acked(id, at) => {
                acked.push(*id);
                acked_at.push(*at);
            }
            Answer::Finished(result, at) => push_result(&mut done, result, *at),
        }
    }
    let mut tx = db.begin().await?;
    if !acked.is_empty() {
        store::mark_acked(&mut tx, droplet.as_uuid(), &acked, &acked_at).await?;
    }
    let mut finished = Vec::new();
    if !done.ids.is_empty() {
        for row in store::mark_finished(&mut tx, droplet.as_uuid(), &done).await? {
            let round_trip = row.finished_at.and_then(|at| (at - row.created_at).to_std().ok());
            finished.push((row.state, round_trip));
        }
    }
    tx.commit().await?;
    Ok(finished)
}

fn push_result(done: &mut Results, result: &proto::CommandResult, at: DateTime<Utc>) {
    // A malformed id or a second result for the same command in one batch: nothing
    // to record (the first result is the one that counts).
    let Ok(id) = Uuid::try_parse(&result.command_id) else { return };
    if done.ids.contains(&id) {
        return;
    }
    let state = match (result.success, result.expired) {
        (true, _) => "succeeded",
        (false, true) => "expired",
        (false, false) => "failed",
    };
    done.ids.push(id);
    done.states.push(state);
    done.messages.push(result.message.clone());
    done.results.push(result.container.as_ref().map(|c| c.encode_to_vec()));
    done.at.push(at);
}

/// Ends an open command without running it.
pub async fn close(db: &PgPool, row: &CommandRow, state: &str, why: &str) -> sqlx::Result<()> {
    if store::close_command(db, row, state, why).await? {
        crate::metrics::get().command_finished(state, None);
    }
    Ok(())
}

/// Waits until command `id` is final, or `timeout` has passed; returns it as it stands
/// then (`None`: there is no such command).
pub async fn wait(fleet: &Fleet, id: Uuid, timeout: Duration) -> sqlx::Result<Option<CommandRow>> {
    // Waiting before reading, so a completion in between is not missed.
    let mut done = fleet.completions.wait(id);
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let Some(row) = store::get_command(&fleet.db, id).await? else { return Ok(None) };
        if is_final(&row.state) || tokio::time::timeout_at(until, done.changed()).await.is_err() {
            return Ok(Some(row));
        }
    }
}

/// Command completions, for `WaitCommand`: each waiter is woken by its own command only.
/// (One broadcast to every waiter made a backlog of N waiters cost N wake-ups per
/// completion: quadratic exactly when the control plane is busiest.)
#[derive(Clone, Default)]
pub struct Completions {
    waiting: Arc<std::sync::Mutex<HashMap<Uuid, watch::Sender<()>>>>,
}

impl Completions {
    /// A waiter for `id`. Create it before reading the command's state, so a completion
    /// in between is not missed.
    pub fn wait(&self, id: Uuid) -> Waiter {
        let rx = self.lock().entry(id).or_insert_with(|| watch::channel(()).0).subscribe();
        Waiter { id, rx, completions: self.clone() }
    }

    /// Command `id` reached a final state: its waiters look again.
    pub fn completed(&self, id: Uuid) {
        if let Some(tx) = self.lock().get(&id) {
            tx.send_replace(());
        }
    }

    /// Notifications may have been missed: every waiter looks again.
    pub fn all(&self) {
        for tx in self.lock().values() {
            tx.send_replace(());
        }
    }

    // A std mutex: never held across an `.await`, every critical section is a map lookup.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Woken when its command may have reached a final state.
pub struct Waiter {
    id: Uuid,
    rx: watch::Receiver<()>,
    completions: Completions,
}

impl Waiter {
    /// Returns when the command may have changed: read it again.
    pub async fn changed(&mut self) {
        // The sender lives in the map as long as this waiter does.
        let _ = self.rx.changed().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.completions.lock();
        // This waiter's receiver is the last one: nobody waits for this command here.
        if waiting.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            waiting.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_by_its_own_command_only() {
        let completions = Completions::default();
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut waiter = completions.wait(mine);
        completions.completed(other);
        assert!(tokio::time::timeout(LONG, waiter.changed()).await.is_err(), "another command woke it");
        completions.completed(mine);
        assert!(tokio::time::timeout(LONG, waiter.changed()).await.is_ok(), "its own command did not wake it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_between_waiting_and_reading_is_not_missed() {
        let completions = Completions::default();
        let id = Uuid::new_v4();
        let mut waiter = completions.wait(id);
        // The command finishes before the waiter looks: the next look returns at once.
        completions.completed(id);
        assert!(tokio::time::timeout(Duration::from_millis(1), waiter.changed()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn lost_notifications_wake_every_waiter() {
        let completions = Completions::default();
        let mut waiters: Vec<Waiter> = (0..3).map(|_| completions.wait(Uuid::new_v4())).collect();
        completions.all();
        for waiter in &mut waiters {
            assert!(tokio::time::timeout(LONG, waiter.changed()).await.is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_waiter_of_a_command_takes_its_entry_away() {
        let completions = Completions::default();
        let id = Uuid::new_v4();
        let (first, second) = (completions.wait(id), completions.wait(id));
        drop(first);
        assert_eq!(completions.lock().len(), 1, "another waiter still waits");
        drop(second);
        assert!(completions.lock().is_empty(), "nobody waits: nothing kept");
    }

    #[test]
    fn idempotency_keys_are_bounded_and_printable() {
        assert_eq!(Options::new(String::new(), None).map(|o| o.idempotency_key), Ok(None));
        assert!(Options::new("deploy-42".into(), None).is_ok());
        assert!(Options::new("x".repeat(MAX_KEY + 1), None).is_err());
        assert!(Options::new("a\nb".into(), None).is_err());
    }
}
