//! `WatchEvents`: the events table as a stream a client can leave and resume.
//!
//! A position is `(transaction, id)`, and only transactions older than the oldest one still
//! running are read (`store::read_events`), so a stream never skips an event that commits
//! late.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::Stream;
use sqlx::PgPool;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::store::{
    self, EVENTS_CHANNEL, EventFilter, EventRow,
    notify::{Heard, hear, listen},
};

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

/// A cursor this API did not issue.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("cursor: not a cursor this API issued")]
pub struct InvalidCursor;

impl Cursor {
    pub const OLDEST: Cursor = Cursor { tx: 0, id: 0 };

    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("events/{}/{}", self.tx, self.id))
    }

    pub fn decode(text: &str) -> Result<Self, InvalidCursor> {
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| InvalidCursor)?;
        let text = String::from_utf8(bytes).map_err(|_| InvalidCursor)?;
        let (tx, id) = text.strip_prefix("events/").and_then(|rest| rest.split_once('/')).ok_or(InvalidCursor)?;
        let (tx, id) = (tx.parse().map_err(|_| InvalidCursor)?, id.parse().map_err(|_| InvalidCursor)?);
        if tx < 0 || id < 0 {
            return Err(InvalidCursor);
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
    let mut listener = listen(db, &[EVENTS_CHANNEL]).await?;
    tasks.spawn(async move {
        // A notification or a lost connection: either way, watchers read again.
        while let Some(Heard::Notification(_) | Heard::Lost) = hear(&mut listener, &stop, "event").await {
            bell.ring();
        }
    });
    Ok(())
}

/// Which events a watcher gets.
pub type Filter = EventFilter;

/// Adds kinds to a filter: exact kinds, and prefixes written `kind.*`.
pub fn with_kinds(mut filter: Filter, kinds: &[String]) -> Result<Filter, String> {
    for kind in kinds {
        match kind.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => filter.prefixes.push(prefix.to_owned()),
            None if !kind.is_empty() && !kind.contains('*') => filter.kinds.push(kind.clone()),
            _ => return Err(format!("kinds: {kind:?} is neither a kind nor a prefix ending in '*'")),
        }
    }
    Ok(filter)
}

/// An event as watched: the stored row and the cursor that resumes after it.
#[derive(Debug)]
pub struct Event {
    pub cursor: Cursor,
    pub row: EventRow,
}

/// Where "now" is: after every event of a finished transaction.
pub async fn now(db: &PgPool) -> sqlx::Result<Cursor> {
    Ok(Cursor { tx: store::event_horizon(db).await?, id: 0 })
}

/// The events after `after` that match, and the position the next read starts from
/// (past events that did not match, too).
async fn read(db: &PgPool, after: Cursor, filter: &Filter) -> sqlx::Result<(Vec<EventRow>, Cursor)> {
    let (rows, horizon) = store::read_events(db, (after.tx, after.id), filter, BATCH).await?;
    let next = match rows.last() {
        // A full batch: more may follow right after the last one.
        Some(last) if rows.len() as i64 == BATCH => Cursor { tx: last.tx, id: last.id },
        // Everything below the horizon has been looked at.
        _ => after.max(Cursor { tx: horizon, id: 0 }),
    };
    Ok((rows, next))
}

/// A watch ends with this when the database cannot be read: resume from the last cursor.
#[derive(Debug, thiserror::Error)]
#[error("the control plane's database is unavailable; resume from the last cursor")]
pub struct Unreadable;

pub type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Unreadable>> + Send>>;

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
                    let _ = tx.send(Err(Unreadable)).await;
                    return;
                }
            };
            let full = rows.len() as i64 == BATCH;
            for row in rows {
                let event = Event { cursor: Cursor { tx: row.tx, id: row.id }, row };
                if tx.send(Ok(event)).await.is_err() {
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
            assert_eq!(Cursor::decode(bad), Err(InvalidCursor), "{bad}");
        }
        assert!(Cursor { tx: 2, id: 1 } > Cursor { tx: 1, id: 99 });
    }

    #[test]
    fn kind_filters() {
        let filter = with_kinds(Filter::default(), &["container.*".into(), "reconcile".into()]).expect("valid");
        assert_eq!((filter.prefixes, filter.kinds), (vec!["container.".to_owned()], vec!["reconcile".to_owned()]));
        for bad in ["", "*a*", "a*b"] {
            assert!(with_kinds(Filter::default(), &[bad.into()]).is_err(), "{bad}");
        }
    }
}
