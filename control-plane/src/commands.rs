//! The command ledger: commands are rows before they are messages.
//!
//! An API change writes its command in the same transaction as the change itself (a
//! deployment's new generation, its desired state) and `NOTIFY`s the droplet's id. The
//! session holding the droplet delivers its open commands in `seq` order, at most
//! [`WINDOW`] unanswered at a time, and re-sends every unanswered one on each new session;
//! the agent applies each id at most once and answers repeats from its own record. A
//! command whose deadline passes before it is delivered ends `expired`, never run.
//!
//! `NOTIFY` carries ids only. Missed notifications are covered by a slow poll.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use flotilla::{
    DropletId,
    proto::{self, Command, CommandOptions, CommandRecord, ContainerStatus, ControlMessage, command, control_message},
};
use prost::Message as _;
use sqlx::{PgConnection, PgPool, postgres::PgListener};
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    notify::{Heard, hear},
    sessions::Outbound,
    state::State,
};

/// `NOTIFY` channel: a droplet (the payload) has new commands.
pub const QUEUED_CHANNEL: &str = "flotilla_commands";
/// `NOTIFY` channel: a command (the payload) reached a final state.
pub const DONE_CHANNEL: &str = "flotilla_command_done";
/// Commands sent to one droplet and not yet answered, at most.
pub const WINDOW: usize = 32;
/// The fallback for missed notifications.
const POLL: Duration = Duration::from_secs(5);
/// Longest idempotency key accepted.
const MAX_KEY: usize = 200;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CommandRow {
    pub id: Uuid,
    pub account: String,
    pub droplet_id: Uuid,
    pub deployment_id: Option<Uuid>,
    pub seq: i64,
    pub kind: String,
    pub payload: Vec<u8>,
    pub idempotency_key: Option<String>,
    pub requested_by: String,
    pub state: String,
    pub message: String,
    pub result: Option<Vec<u8>>,
    pub attempts: i32,
    pub deadline: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub acked_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

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

impl TryFrom<Option<CommandOptions>> for Options {
    type Error = String;

    fn try_from(options: Option<CommandOptions>) -> Result<Self, String> {
        let options = options.unwrap_or_default();
        let key = options.idempotency_key;
        if key.len() > MAX_KEY || key.chars().any(char::is_control) {
            return Err(format!("options.idempotency_key: at most {MAX_KEY} characters, no control characters"));
        }
        let deadline = match options.deadline {
            None => None,
            Some(t) => Some(
                DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                    .ok_or("options.deadline: not a valid instant")?,
            ),
        };
        Ok(Self { idempotency_key: Some(key).filter(|k| !k.is_empty()), deadline, requested_by: String::new() })
    }
}

/// Locks the droplet's row for the rest of the transaction (issuing is serialised per
/// droplet, which gives `seq` its order and makes idempotency keys race-free) and
/// returns its account; `None` if there is no such droplet.
pub async fn lock_droplet(conn: &mut PgConnection, droplet: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT account FROM droplets WHERE id = $1 FOR UPDATE").bind(droplet).fetch_optional(conn).await
}

/// The command already issued with this key on this droplet. Call with the droplet locked.
pub async fn by_key(conn: &mut PgConnection, droplet: Uuid, key: &str) -> sqlx::Result<Option<CommandRow>> {
    sqlx::query_as("SELECT * FROM commands WHERE droplet_id = $1 AND idempotency_key = $2")
        .bind(droplet)
        .bind(key)
        .fetch_optional(conn)
        .await
}

/// Writes a command, queued, and notifies the droplet's session (at commit). Call with
/// the droplet locked ([`lock_droplet`]) and the key checked ([`by_key`]).
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
        let superseded: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE commands SET state = 'cancelled', finished_at = now(),
                 message = 'superseded by generation ' || $2
             WHERE deployment_id = $1 AND kind = 'deploy' AND state = 'queued' RETURNING id",
        )
        .bind(deployment)
        .bind(deploy.generation.to_string())
        .fetch_all(&mut *conn)
        .await?;
        for old in superseded {
            notify_done(conn, old).await?;
        }
    }
    let payload = Command {
        id: id.to_string(),
        deadline: options
            .deadline
            .map(|d| prost_types::Timestamp { seconds: d.timestamp(), nanos: d.timestamp_subsec_nanos() as i32 }),
        kind: Some(kind),
    };
    let row: CommandRow = sqlx::query_as(
        "WITH seq AS (UPDATE droplets SET command_seq = command_seq + 1 WHERE id = $2 RETURNING account, command_seq)
         INSERT INTO commands
             (id, account, droplet_id, deployment_id, seq, kind, payload, idempotency_key, deadline, requested_by)
         SELECT $1, seq.account, $2, $3, seq.command_seq, $4, $5, $6, $7, $8 FROM seq
         RETURNING *",
    )
    .bind(id)
    .bind(droplet)
    .bind(deployment)
    .bind(name)
    .bind(payload.encode_to_vec())
    .bind(&options.idempotency_key)
    .bind(options.deadline)
    .bind(&options.requested_by)
    .fetch_one(&mut *conn)
    .await?;
    event(conn, &row, "command.queued", &format!("{name} queued")).await?;
    sqlx::query("SELECT pg_notify($1, $2)").bind(QUEUED_CHANNEL).bind(droplet.to_string()).execute(&mut *conn).await?;
    Ok(row)
}

async fn event(conn: &mut PgConnection, row: &CommandRow, kind: &str, message: &str) -> sqlx::Result<()> {
    insert_events(conn, &[(row, kind.to_owned(), message.to_owned())]).await
}

async fn notify_done(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(DONE_CHANNEL).bind(id.to_string()).execute(conn).await?;
    Ok(())
}

pub async fn get(db: &PgPool, id: Uuid) -> sqlx::Result<Option<CommandRow>> {
    sqlx::query_as("SELECT * FROM commands WHERE id = $1").bind(id).fetch_optional(db).await
}

/// The newest command of a deployment.
pub async fn last_of_deployment(db: &PgPool, deployment: Uuid) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT id FROM commands WHERE deployment_id = $1 ORDER BY seq DESC LIMIT 1")
        .bind(deployment)
        .fetch_optional(db)
        .await
}

/// Commands by droplet and/or deployment, newest first, from before `before` (a seq).
pub async fn list(
    db: &PgPool,
    droplet: Option<Uuid>,
    deployment: Option<Uuid>,
    state: Option<&str>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<CommandRow>> {
    sqlx::query_as(
        "SELECT * FROM commands
         WHERE ($1::uuid IS NULL OR droplet_id = $1) AND ($2::uuid IS NULL OR deployment_id = $2)
           AND ($3::text IS NULL OR state = $3)
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
         ORDER BY created_at DESC, id DESC LIMIT $6",
    )
    .bind(droplet)
    .bind(deployment)
    .bind(state)
    .bind(before.map(|b| b.0))
    .bind(before.map(|b| b.1))
    .bind(limit)
    .fetch_all(db)
    .await
}

/// What an agent said about a command, and when it was heard.
#[derive(Debug)]
pub enum Answer {
    /// The agent has the command.
    Acked(Uuid, DateTime<Utc>),
    /// The command is final on the agent.
    Finished(Box<proto::CommandResult>, DateTime<Utc>),
}

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
    pub fn start(state: State, droplet: DropletId) -> Self {
        let (tx, mut rx) = mpsc::channel::<Answer>(BATCH);
        let task = tokio::spawn(
            async move {
                let mut batch = Vec::with_capacity(BATCH);
                while rx.recv_many(&mut batch, BATCH).await > 0 {
                    // Only a final answer makes room in the window; an ack does not.
                    let room = batch.iter().any(|answer| matches!(answer, Answer::Finished(..)));
                    match record(&state.db, droplet, &batch).await {
                        Ok(finished) => {
                            let metrics = crate::metrics::get();
                            for (state, round_trip) in finished {
                                metrics.command_finished(&state, round_trip);
                            }
                        }
                        // The commands stay open: they are sent again on the next session,
                        // and the agent answers from its record.
                        Err(error) => tracing::warn!(%error, answers = batch.len(), "could not record answers"),
                    }
                    batch.clear();
                    if room {
                        // The next commands may go.
                        state.sessions.wake(droplet);
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

/// Writes a batch of answers in one transaction: acknowledgements first, then results,
/// each as one statement, with their events. Answers to commands not open (repeats,
/// late answers) change nothing. Returns the final states reached, with round trips.
async fn record(db: &PgPool, droplet: DropletId, answers: &[Answer]) -> sqlx::Result<Vec<(String, Option<Duration>)>> {
    let (mut acked, mut acked_at) = (Vec::new(), Vec::new());
    let mut done = Finished::default();
    for answer in answers {
        match answer {
            Answer::Acked(id, at) => {
                acked.push(*id);
                acked_at.push(*at);
            }
            Answer::Finished(result, at) => done.push(result, *at),
        }
    }
    let mut tx = db.begin().await?;
    if !acked.is_empty() {
        let rows: Vec<CommandRow> = sqlx::query_as(
            "UPDATE commands c SET state = 'acked', acked_at = v.at
             FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, at)
             WHERE c.id = v.id AND c.droplet_id = $3 AND c.state IN ('queued', 'sent')
             RETURNING c.*",
        )
        .bind(&acked)
        .bind(&acked_at)
        .bind(droplet.as_uuid())
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<_> =
            rows.iter().map(|row| (row, "command.acked".to_owned(), "the droplet has it".to_owned())).collect();
        insert_events(&mut tx, &events).await?;
    }
    let mut finished = Vec::new();
    if !done.ids.is_empty() {
        let mut rows: Vec<CommandRow> = sqlx::query_as(
            "UPDATE commands c SET state = v.state, message = v.message, result = v.result, finished_at = v.at,
                 acked_at = coalesce(c.acked_at, v.at)
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[])
                 AS v(id, state, message, result, at)
             WHERE c.id = v.id AND c.droplet_id = $6 AND c.state IN ('queued', 'sent', 'acked')
             RETURNING c.*",
        )
        .bind(&done.ids)
        .bind(&done.states)
        .bind(&done.messages)
        .bind(&done.results)
        .bind(&done.at)
        .bind(droplet.as_uuid())
        .fetch_all(&mut *tx)
        .await?;
        rows.sort_by_key(|row| row.seq);
        let events: Vec<_> = rows
            .iter()
            .map(|row| {
                let message =
                    if row.message.is_empty() { row.state.clone() } else { format!("{}: {}", row.state, row.message) };
                (row, format!("command.{}", row.state), message)
            })
            .collect();
        insert_events(&mut tx, &events).await?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        sqlx::query("SELECT pg_notify($1, id::text) FROM unnest($2::uuid[]) AS id")
            .bind(DONE_CHANNEL)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        for row in &rows {
            let round_trip = row.finished_at.and_then(|at| (at - row.created_at).to_std().ok());
            finished.push((row.state.clone(), round_trip));
        }
    }
    tx.commit().await?;
    Ok(finished)
}

/// Results, as columns for one `unnest`.
#[derive(Default)]
struct Finished {
    ids: Vec<Uuid>,
    states: Vec<&'static str>,
    messages: Vec<String>,
    results: Vec<Option<Vec<u8>>>,
    at: Vec<DateTime<Utc>>,
}

impl Finished {
    fn push(&mut self, result: &proto::CommandResult, at: DateTime<Utc>) {
        // A malformed id or a second result for the same command in one batch: nothing
        // to record (the first result is the one that counts).
        let Ok(id) = Uuid::try_parse(&result.command_id) else { return };
        if self.ids.contains(&id) {
            return;
        }
        let state = match (result.success, result.expired) {
            (true, _) => "succeeded",
            (false, true) => "expired",
            (false, false) => "failed",
        };
        self.ids.push(id);
        self.states.push(state);
        self.messages.push(result.message.clone());
        self.results.push(result.container.as_ref().map(|c| c.encode_to_vec()));
        self.at.push(at);
    }
}

/// Events of commands, in the order given, in one statement.
async fn insert_events(conn: &mut PgConnection, events: &[(&CommandRow, String, String)]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = events.iter().map(|(row, ..)| row.account.as_str()).collect();
    let droplets: Vec<Uuid> = events.iter().map(|(row, ..)| row.droplet_id).collect();
    let deployments: Vec<Option<Uuid>> = events.iter().map(|(row, ..)| row.deployment_id).collect();
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    let messages: Vec<String> =
        events.iter().map(|(row, _, message)| format!("{} {}: {message}", row.kind, row.id)).collect();
    sqlx::query(
        "INSERT INTO events (account, droplet_id, deployment_id, kind, message)
         SELECT account, droplet_id, deployment_id, kind, message
         FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[]) WITH ORDINALITY
             AS e(account, droplet_id, deployment_id, kind, message, n)
         ORDER BY n",
    )
    .bind(&accounts)
    .bind(&droplets)
    .bind(&deployments)
    .bind(&kinds)
    .bind(&messages)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends an open command without running it.
async fn close(db: &PgPool, row: &CommandRow, state: &str, why: &str) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    let done = sqlx::query(
        "UPDATE commands SET state = $2, message = $3, finished_at = now()
         WHERE id = $1 AND state IN ('queued', 'sent')",
    )
    .bind(row.id)
    .bind(state)
    .bind(why)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        event(&mut tx, row, &format!("command.{state}"), why).await?;
        notify_done(&mut tx, row.id).await?;
        tx.commit().await?;
        crate::metrics::get().command_finished(state, None);
        return Ok(());
    }
    tx.commit().await
}

/// The API's view of a command.
pub fn to_proto(row: &CommandRow) -> CommandRecord {
    use proto::command_record::State as S;
    let state = match row.state.as_str() {
        "queued" => S::Queued,
        "sent" => S::Sent,
        "acked" => S::Acked,
        "succeeded" => S::Succeeded,
        "failed" => S::Failed,
        "expired" => S::Expired,
        "cancelled" => S::Cancelled,
        _ => S::Unspecified,
    };
    let ts = |t: Option<DateTime<Utc>>| {
        t.map(|t| prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
    };
    CommandRecord {
        id: row.id.to_string(),
        droplet_id: row.droplet_id.to_string(),
        deployment_id: row.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
        kind: row.kind.clone(),
        state: state as i32,
        message: row.message.clone(),
        result: row.result.as_deref().and_then(|b| ContainerStatus::decode(b).ok()),
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        idempotency_key: row.idempotency_key.clone().unwrap_or_default(),
        requested_by: row.requested_by.clone(),
        deadline: ts(row.deadline),
        created_at: ts(Some(row.created_at)),
        sent_at: ts(row.sent_at),
        acked_at: ts(row.acked_at),
        finished_at: ts(row.finished_at),
    }
}

/// Delivers a droplet's commands over one session until it ends.
pub async fn deliver(
    state: State,
    droplet: DropletId,
    session: Uuid,
    outbound: Outbound,
    wake: Arc<Notify>,
    end: CancellationToken,
) {
    let mut sent_here: HashSet<Uuid> = HashSet::new();
    loop {
        match pump(&state, droplet, session, &outbound, &mut sent_here).await {
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
    state: &State,
    droplet: DropletId,
    session: Uuid,
    outbound: &Outbound,
    sent_here: &mut HashSet<Uuid>,
) -> sqlx::Result<bool> {
    let open: Vec<CommandRow> = sqlx::query_as(
        "SELECT * FROM commands WHERE droplet_id = $1 AND state IN ('queued', 'sent', 'acked')
         ORDER BY seq LIMIT $2",
    )
    .bind(droplet.as_uuid())
    .bind(i64::try_from(WINDOW * 2).unwrap_or(64))
    .fetch_all(&state.db)
    .await?;
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
            close(&state.db, row, "expired", "the deadline passed before the droplet received it").await?;
            continue;
        }
        let Some(message) = message_for(state, row).await? else { continue };
        ready.push((row.id, message));
        in_flight += 1;
    }
    if ready.is_empty() {
        return Ok(true);
    }
    // Marked sent in one transaction, and only while this session holds the droplet:
    // after a takeover by a session on another replica, this one sends nothing more.
    let ids: Vec<Uuid> = ready.iter().map(|(id, _)| *id).collect();
    let mut tx = state.db.begin().await?;
    let mut marked: Vec<CommandRow> = sqlx::query_as(
        "UPDATE commands SET state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END,
             sent_at = now(), attempts = attempts + 1
         WHERE id = ANY($1) AND state IN ('queued', 'sent', 'acked')
           AND EXISTS (SELECT 1 FROM droplets WHERE id = $2 AND session_id = $3)
         RETURNING *",
    )
    .bind(&ids)
    .bind(droplet.as_uuid())
    .bind(session)
    .fetch_all(&mut *tx)
    .await?;
    marked.sort_by_key(|row| row.seq);
    let events: Vec<_> =
        marked.iter().map(|row| (row, "command.sent".to_owned(), format!("attempt {}", row.attempts))).collect();
    insert_events(&mut tx, &events).await?;
    tx.commit().await?;
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
async fn message_for(state: &State, row: &CommandRow) -> sqlx::Result<Option<Command>> {
    let Ok(mut command) = Command::decode(row.payload.as_slice()) else {
        close(&state.db, row, "failed", "the stored command cannot be read").await?;
        return Ok(None);
    };
    if let Some(command::Kind::Deploy(deploy)) = &mut command.kind {
        let Some(deployment) = row.deployment_id else {
            close(&state.db, row, "cancelled", "its deployment was deleted").await?;
            return Ok(None);
        };
        match crate::deployments::spec_for(state, deployment, deploy.generation).await {
            Ok(Ok(spec)) => deploy.spec = Some(spec),
            Ok(Err(why)) => {
                close(&state.db, row, "cancelled", &why).await?;
                return Ok(None);
            }
            Err(crate::deployments::DeploymentError::Database(error)) => return Err(error),
            Err(error) => {
                close(&state.db, row, "failed", &error.to_string()).await?;
                return Ok(None);
            }
        }
    }
    Ok(Some(command))
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

    fn completed(&self, id: Uuid) {
        if let Some(tx) = self.lock().get(&id) {
            tx.send_replace(());
        }
    }

    /// Notifications may have been missed: every waiter looks again.
    fn all(&self) {
        for tx in self.lock().values() {
            tx.send_replace(());
        }
    }

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

/// Listens for queued commands (waking the droplet's session here, if any) and for
/// completions (waking that command's `WaitCommand` callers).
pub async fn spawn_listener(
    db: PgPool,
    sessions: crate::sessions::Sessions,
    completions: Completions,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(&db).await?;
    listener.listen_all([QUEUED_CHANNEL, DONE_CHANNEL]).await?;
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
                // Every session and every waiter looks again (the nil id: "any command").
                Heard::Lost => {
                    sessions.wake_all();
                    completions.all();
                }
            }
        }
    });
    Ok(())
}
