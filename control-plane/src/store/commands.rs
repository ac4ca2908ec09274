//! `commands`: the ledger, one row per command, in `seq` order per droplet, and the
//! `NOTIFY`s that wake delivery and waiters.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// `NOTIFY` channel: a droplet (the payload) has new commands.
pub const QUEUED_CHANNEL: &str = "flotilla_commands";
/// `NOTIFY` channel: a command (the payload) reached a final state.
pub const DONE_CHANNEL: &str = "flotilla_command_done";

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

pub async fn notify_done(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(DONE_CHANNEL).bind(id.to_string()).execute(conn).await?;
    Ok(())
}

pub async fn get_command(db: &PgPool, id: Uuid) -> sqlx::Result<Option<CommandRow>> {
    sqlx::query_as("SELECT * FROM commands WHERE id = $1").bind(id).fetch_optional(db).await
}

/// The newest command of a deployment.
pub async fn last_command_of_deployment(db: &PgPool, deployment: Uuid) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT id FROM commands WHERE deployment_id = $1 ORDER BY seq DESC LIMIT 1")
        .bind(deployment)
        .fetch_optional(db)
        .await
}

/// Commands by droplet and/or deployment, newest first, from before `before` (a seq).
pub async fn list_commands(
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

/// Events of commands, in the order given, in one statement.
pub async fn insert_command_events(
    conn: &mut PgConnection,
    events: &[(&CommandRow, String, String)],
) -> sqlx::Result<()> {
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

pub async fn command_event(conn: &mut PgConnection, row: &CommandRow, kind: &str, message: &str) -> sqlx::Result<()> {
    insert_command_events(conn, &[(row, kind.to_owned(), message.to_owned())]).await
}

/// Cancels the queued `deploy`s of a deployment (a newer generation supersedes them), with
/// their completions.
pub async fn supersede_queued_deploys(conn: &mut PgConnection, deployment: Uuid, generation: u64) -> sqlx::Result<()> {
    let superseded: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE commands SET state = 'cancelled', finished_at = now(),
             message = 'superseded by generation ' || $2
         WHERE deployment_id = $1 AND kind = 'deploy' AND state = 'queued' RETURNING id",
    )
    .bind(deployment)
    .bind(generation.to_string())
    .fetch_all(&mut *conn)
    .await?;
    for old in superseded {
        notify_done(conn, old).await?;
    }
    Ok(())
}

/// A command to write: what `insert_command` stores.
pub struct NewCommand<'a> {
    pub id: Uuid,
    pub droplet: Uuid,
    pub deployment: Option<Uuid>,
    pub kind: &'a str,
    /// The encoded command, as the agent will receive it.
    pub payload: Vec<u8>,
    pub idempotency_key: Option<&'a str>,
    pub deadline: Option<DateTime<Utc>>,
    pub requested_by: &'a str,
}

/// Writes a command, queued, at the droplet's next `seq`, with its event, and notifies the
/// droplet's session (at commit). Call with the droplet locked ([`lock_droplet`]).
pub async fn insert_command(conn: &mut PgConnection, new: NewCommand<'_>) -> sqlx::Result<CommandRow> {
    let row: CommandRow = sqlx::query_as(
        "WITH seq AS (UPDATE droplets SET command_seq = command_seq + 1 WHERE id = $2 RETURNING account, command_seq)
         INSERT INTO commands
             (id, account, droplet_id, deployment_id, seq, kind, payload, idempotency_key, deadline, requested_by)
         SELECT $1, seq.account, $2, $3, seq.command_seq, $4, $5, $6, $7, $8 FROM seq
         RETURNING *",
    )
    .bind(new.id)
    .bind(new.droplet)
    .bind(new.deployment)
    .bind(new.kind)
    .bind(new.payload)
    .bind(new.idempotency_key)
    .bind(new.deadline)
    .bind(new.requested_by)
    .fetch_one(&mut *conn)
    .await?;
    command_event(conn, &row, "command.queued", &format!("{} queued", new.kind)).await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(QUEUED_CHANNEL)
        .bind(new.droplet.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(row)
}

/// Marks open commands of `droplet` acked, with their events; returns the rows changed.
pub async fn mark_acked(
    conn: &mut PgConnection,
    droplet: Uuid,
    ids: &[Uuid],
    at: &[DateTime<Utc>],
) -> sqlx::Result<Vec<CommandRow>> {
    let rows: Vec<CommandRow> = sqlx::query_as(
        "UPDATE commands c SET state = 'acked', acked_at = v.at
         FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, at)
         WHERE c.id = v.id AND c.droplet_id = $3 AND c.state IN ('queued', 'sent')
         RETURNING c.*",
    )
    .bind(ids)
    .bind(at)
    .bind(droplet)
    .fetch_all(&mut *conn)
    .await?;
    let events: Vec<_> =
        rows.iter().map(|row| (row, "command.acked".to_owned(), "the droplet has it".to_owned())).collect();
    insert_command_events(conn, &events).await?;
    Ok(rows)
}

/// Final states to record, as columns for one `unnest`.
#[derive(Default)]
pub struct Results {
    pub ids: Vec<Uuid>,
    pub states: Vec<&'static str>,
    pub messages: Vec<String>,
    pub results: Vec<Option<Vec<u8>>>,
    pub at: Vec<DateTime<Utc>>,
}

/// Records final states of open commands of `droplet`, with their events and completion
/// notifications; returns the rows changed, in `seq` order.
pub async fn mark_finished(conn: &mut PgConnection, droplet: Uuid, done: &Results) -> sqlx::Result<Vec<CommandRow>> {
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
    .bind(droplet)
    .fetch_all(&mut *conn)
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
    insert_command_events(conn, &events).await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    sqlx::query("SELECT pg_notify($1, id::text) FROM unnest($2::uuid[]) AS id")
        .bind(DONE_CHANNEL)
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    Ok(rows)
}

/// Ends an open command that was not run (`expired`, `cancelled`, `failed`), with its
/// event and completion. Returns whether it was still open.
pub async fn close_command(db: &PgPool, row: &CommandRow, state: &str, why: &str) -> sqlx::Result<bool> {
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
    let closed = done.rows_affected() == 1;
    if closed {
        command_event(&mut tx, row, &format!("command.{state}"), why).await?;
        notify_done(&mut tx, row.id).await?;
    }
    tx.commit().await?;
    Ok(closed)
}

/// The open commands of a droplet in `seq` order, at most `limit`.
pub async fn open_commands(db: &PgPool, droplet: Uuid, limit: i64) -> sqlx::Result<Vec<CommandRow>> {
    sqlx::query_as(
        "SELECT * FROM commands WHERE droplet_id = $1 AND state IN ('queued', 'sent', 'acked')
         ORDER BY seq LIMIT $2",
    )
    .bind(droplet)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Marks commands sent (one more attempt), with their events, in one transaction, and
/// only while `session` holds the droplet: after a takeover by a session on another
/// replica, this one sends nothing more. Returns the rows marked, in `seq` order.
pub async fn mark_sent(db: &PgPool, ids: &[Uuid], droplet: Uuid, session: Uuid) -> sqlx::Result<Vec<CommandRow>> {
    let mut tx = db.begin().await?;
    let mut marked: Vec<CommandRow> = sqlx::query_as(
        "UPDATE commands SET state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END,
             sent_at = now(), attempts = attempts + 1
         WHERE id = ANY($1) AND state IN ('queued', 'sent', 'acked')
           AND EXISTS (SELECT 1 FROM droplets WHERE id = $2 AND session_id = $3)
         RETURNING *",
    )
    .bind(ids)
    .bind(droplet)
    .bind(session)
    .fetch_all(&mut *tx)
    .await?;
    marked.sort_by_key(|row| row.seq);
    let events: Vec<_> =
        marked.iter().map(|row| (row, "command.sent".to_owned(), format!("attempt {}", row.attempts))).collect();
    insert_command_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(marked)
}

/// The states of a deployment's newest commands, newest first, with when each finished.
pub async fn recent_command_states(
    conn: &mut PgConnection,
    deployment: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<(String, Option<DateTime<Utc>>)>> {
    sqlx::query_as("SELECT state, finished_at FROM commands WHERE deployment_id = $1 ORDER BY seq DESC LIMIT $2")
        .bind(deployment)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// The deployments of a droplet that have an open command (`None` for commands of none).
pub async fn deployments_with_open_commands(conn: &mut PgConnection, droplet: Uuid) -> sqlx::Result<Vec<Option<Uuid>>> {
    sqlx::query_scalar(
        "SELECT deployment_id FROM commands WHERE droplet_id = $1 AND state IN ('queued', 'sent', 'acked')",
    )
    .bind(droplet)
    .fetch_all(conn)
    .await
}
