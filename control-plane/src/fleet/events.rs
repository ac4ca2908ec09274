//! `WatchEvents`: the events table as a stream a client can leave and resume.
//!
//! See `migrations/0007_event_stream.sql` for why positions are `(transaction, id)` and
//! why only transactions older than the snapshot's xmin are read.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use futures::Stream;
use sqlx::PgPool;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::store::notify::{Heard, hear, listen};

const CHANNEL: &str = "flotilla_events";
/// Events read per query.
const BATCH: i64 = 500;
/// Watchers look again this often even without a notification: an event whose
/// transaction was held back behind an older one becomes readable without a new insert.
const POLL: Duration = Duration::from_secs(1);

/// A position in the stream: after every event before it in (tx, id) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    tx: i64,
    id: i64,
}

impl Cursor {
    pub const OLDEST: Cursor = Cursor { tx: 0, id: 0 };

    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("events/{}/{}", self.tx, self.id))
    }

    pub fn decode(text: &str) -> Result<Self, Status> {
        let bad = || Status::invalid_argument("cursor: not a cursor this API issued");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (tx, id) = text.strip_prefix("events/").and_then(|rest| rest.split_once('/')).ok_or_else(bad)?;
        let (tx, id) = (tx.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?);
        if tx < 0 || id < 0 {
            return Err(bad());
        }
        Ok(Cursor { tx, id })
    }
}

/// Wakes watchers when events are written anywhere (`NOTIFY` from a trigger).
#[derive(Clone)]
pub struct Bell {
    tx: watch::Sender<u64>,
}

impl Default for Bell {
    fn default() -> Self {
        Self { tx: watch::channel(0).0 }
    }
}

impl Bell {
    fn ring(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

pub async fn spawn_listener(
    db: &PgPool,
    bell: Bell,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> sqlx::Result<()> {
    let mut listener = listen(db, &[CHANNEL]).await?;
    tasks.spawn(async move {
        // A notification or a lost connection: either way, watchers read again.
        while let Some(Heard::Notification(_) | Heard::Lost) = hear(&mut listener, &stop, "event").await {
            bell.ring();
        }
    });
    Ok(())
}

/// Which events a watcher gets.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account: Option<String>,
    pub droplet: Option<Uuid>,
    pub deployment: Option<Uuid>,
    /// Exact kinds, and prefixes (from `kind.*`).
    pub kinds: Vec<String>,
    pub prefixes: Vec<String>,
}

impl Filter {
    pub fn kinds(mut self, kinds: &[String]) -> Result<Self, Status> {
        for kind in kinds {
            match kind.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => self.prefixes.push(prefix.to_owned()),
                None if !kind.is_empty() && !kind.contains('*') => self.kinds.push(kind.clone()),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "kinds: {kind:?} is neither a kind nor a prefix ending in '*'"
                    )));
                }
            }
        }
        Ok(self)
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    tx: i64,
    at: DateTime<Utc>,
    account: String,
    droplet_id: Option<Uuid>,
    deployment_id: Option<Uuid>,
    kind: String,
    message: String,
}

/// Where "now" is: after every event of a finished transaction.
pub async fn now(db: &PgPool) -> sqlx::Result<Cursor> {
    let tx: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(db).await?;
    Ok(Cursor { tx, id: 0 })
}

/// The events after `after` that match, and the position the next read starts from
/// (past events that did not match, too).
async fn read(db: &PgPool, after: Cursor, filter: &Filter) -> sqlx::Result<(Vec<Row>, Cursor)> {
    let mut tx = db.begin().await?;
    // One snapshot for both statements: the horizon and the rows below it.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let horizon: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(&mut *tx).await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, tx::text::bigint AS tx, at, account, droplet_id, deployment_id, kind, message
         FROM events
         WHERE (tx, id) > ($1::text::xid8, $2) AND tx < $3::text::xid8
           AND ($4::text IS NULL OR account = $4)
           AND ($5::uuid IS NULL OR droplet_id = $5)
           AND ($6::uuid IS NULL OR deployment_id = $6)
           AND ((cardinality($7::text[]) = 0 AND cardinality($8::text[]) = 0)
                OR kind = ANY($7) OR EXISTS (SELECT 1 FROM unnest($8::text[]) p WHERE starts_with(kind, p)))
         ORDER BY tx, id
         LIMIT $9",
    )
    .bind(after.tx.to_string())
    .bind(after.id)
    .bind(horizon.to_string())
    .bind(filter.account.as_deref())
    .bind(filter.droplet)
    .bind(filter.deployment)
    .bind(&filter.kinds)
    .bind(&filter.prefixes)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let next = match rows.last() {
        // A full batch: more may follow right after the last one.
        Some(last) if rows.len() as i64 == BATCH => Cursor { tx: last.tx, id: last.id },
        // Everything below the horizon has been looked at.
        _ => after.max(Cursor { tx: horizon, id: 0 }),
    };
    Ok((rows, next))
}

fn to_proto(row: Row) -> flotilla::proto::Event {
    flotilla::proto::Event {
        cursor: Cursor { tx: row.tx, id: row.id }.encode(),
        account: row.account,
        droplet_id: row.droplet_id.map(|d| d.to_string()).unwrap_or_default(),
        deployment_id: row.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
        kind: row.kind,
        message: row.message,
        at: Some(crate::api::convert::timestamp(row.at)),
    }
}

pub type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<flotilla::proto::Event, Status>> + Send>>;

/// The events after `from`; with `follow`, new ones as they become readable, until the
/// caller hangs up or `stop` (shutdown) is cancelled.
pub fn watch(
    db: PgPool,
    bell: Bell,
    from: Cursor,
    filter: Filter,
    follow: bool,
    stop: CancellationToken,
) -> EventStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut rung = bell.tx.subscribe();
    tokio::spawn(async move {
        let mut position = from;
        loop {
            // Marked seen before reading, so a ring during the read is not lost.
            rung.borrow_and_update();
            let (rows, next) = match read(&db, position, &filter).await {
                Ok(read) => read,
                Err(error) => {
                    tracing::error!(%error, "database error while watching events");
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "the control plane's database is unavailable; resume from the last cursor",
                        )))
                        .await;
                    return;
                }
            };
            let full = rows.len() as i64 == BATCH;
            for row in rows {
                if tx.send(Ok(to_proto(row))).await.is_err() {
                    return; // The caller hung up.
                }
            }
            position = next;
            if full {
                continue;
            }
            if !follow {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tx.closed() => return,
                _ = rung.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let cursor = Cursor { tx: 123_456, id: 42 };
        assert_eq!(Cursor::decode(&cursor.encode()).ok(), Some(cursor));
        for bad in ["", "!!", &URL_SAFE_NO_PAD.encode("events/x/1"), &URL_SAFE_NO_PAD.encode("events/-1/1")] {
            assert_eq!(Cursor::decode(bad).map_err(|s| s.code()), Err(tonic::Code::InvalidArgument), "{bad}");
        }
        assert!(Cursor { tx: 2, id: 1 } > Cursor { tx: 1, id: 99 });
    }

    #[test]
    fn kind_filters() {
        let filter = Filter::default().kinds(&["container.*".into(), "reconcile".into()]).expect("valid");
        assert_eq!((filter.prefixes, filter.kinds), (vec!["container.".to_owned()], vec!["reconcile".to_owned()]));
        for bad in ["", "*a*", "a*b"] {
            assert!(Filter::default().kinds(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
