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

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use flotilla::{
    DropletId,
    proto::{self, Command, CommandOptions, CommandRecord, ContainerStatus, ControlMessage, command, control_message},
};
use prost::Message as _;
use sqlx::{PgConnection, PgPool, postgres::PgListener};
use tokio::{
    sync::{Notify, broadcast},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
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
    sqlx::query("INSERT INTO events (account, droplet_id, deployment_id, kind, message) VALUES ($1, $2, $3, $4, $5)")
        .bind(&row.account)
        .bind(row.droplet_id)
        .bind(row.deployment_id)
        .bind(kind)
        .bind(format!("{} {}: {message}", row.kind, row.id))
        .execute(conn)
        .await?;
    Ok(())
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

/// The agent has the command.
pub async fn acked(db: &PgPool, droplet: DropletId, id: Uuid) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    let row: Option<CommandRow> = sqlx::query_as(
        "UPDATE commands SET state = 'acked', acked_at = now()
         WHERE id = $1 AND droplet_id = $2 AND state IN ('queued', 'sent') RETURNING *",
    )
    .bind(id)
    .bind(droplet.as_uuid())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = row {
        event(&mut tx, &row, "command.acked", "the droplet has it").await?;
    }
    tx.commit().await
}

/// The agent's answer: the command is final. Answers to commands not open (repeats,
/// late answers) change nothing.
pub async fn finished(db: &PgPool, droplet: DropletId, result: &proto::CommandResult) -> sqlx::Result<()> {
    let Ok(id) = Uuid::try_parse(&result.command_id) else { return Ok(()) };
    let state = match (result.success, result.expired) {
        (true, _) => "succeeded",
        (false, true) => "expired",
        (false, false) => "failed",
    };
    let mut tx = db.begin().await?;
    let row: Option<CommandRow> = sqlx::query_as(
        "UPDATE commands SET state = $3, message = $4, result = $5, finished_at = now(),
             acked_at = coalesce(acked_at, now())
         WHERE id = $1 AND droplet_id = $2 AND state IN ('queued', 'sent', 'acked')
         RETURNING *",
    )
    .bind(id)
    .bind(droplet.as_uuid())
    .bind(state)
    .bind(&result.message)
    .bind(result.container.as_ref().map(|c| c.encode_to_vec()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return tx.commit().await };
    let message = if result.message.is_empty() { state.to_owned() } else { format!("{state}: {}", result.message) };
    event(&mut tx, &row, &format!("command.{state}"), &message).await?;
    notify_done(&mut tx, id).await?;
    tx.commit().await?;
    let round_trip = (chrono::Utc::now() - row.created_at).to_std().ok();
    crate::metrics::get().command_finished(state, round_trip);
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
    .bind(i64::try_from(WINDOW * 4).unwrap_or(128))
    .fetch_all(&state.db)
    .await?;
    sent_here.retain(|id| open.iter().any(|row| row.id == *id));
    let mut in_flight = sent_here.len();
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
        let mut tx = state.db.begin().await?;
        // Only while this session holds the droplet: after a takeover by a session on
        // another replica, this one sends nothing more.
        let updated: Option<CommandRow> = sqlx::query_as(
            "UPDATE commands SET state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END,
                 sent_at = now(), attempts = attempts + 1
             WHERE id = $1 AND state IN ('queued', 'sent', 'acked')
               AND EXISTS (SELECT 1 FROM droplets WHERE id = $2 AND session_id = $3)
             RETURNING *",
        )
        .bind(row.id)
        .bind(droplet.as_uuid())
        .bind(session)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(updated) = updated else { continue };
        event(&mut tx, &updated, "command.sent", &format!("attempt {}", updated.attempts)).await?;
        tx.commit().await?;
        let message = ControlMessage { kind: Some(control_message::Kind::Command(message)) };
        if outbound.send(Ok(message)).await.is_err() {
            return Ok(false);
        }
        tracing::debug!(command_id = %row.id, kind = %row.kind, seq = row.seq, attempt = row.attempts + 1, "command sent");
        sent_here.insert(row.id);
        in_flight += 1;
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

/// Command completions, for `WaitCommand`: one listener per process.
#[derive(Clone)]
pub struct Completions {
    tx: broadcast::Sender<Uuid>,
}

impl Default for Completions {
    fn default() -> Self {
        Self { tx: broadcast::channel(1024).0 }
    }
}

impl Completions {
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }
}

/// Listens for queued commands (waking the droplet's session here, if any) and for
/// completions (waking `WaitCommand` callers).
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
                        let _ = completions.tx.send(id);
                    }
                }
                // Every session and every waiter looks again (the nil id: "any command").
                Heard::Lost => {
                    sessions.wake_all();
                    let _ = completions.tx.send(Uuid::nil());
                }
            }
        }
    });
    Ok(())
}
