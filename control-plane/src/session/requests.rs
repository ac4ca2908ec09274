//! Live requests in flight on one session: `Inspect` and `CheckHealth` wait for one
//! `RequestReply`; `FetchLogs` receives `LogChunk`s until its last one.
//!
//! The table lives inside the session's registry entry (`sessions.rs`), so an answer is
//! only ever matched against requests sent on the session it arrives on: one droplet can
//! never answer another's request, and when a session ends, every caller waiting on it
//! learns so at once (its sender is dropped).
//!
//! Log chunks are handed to the caller's bounded queue without waiting: a session's
//! inbound loop must never block on a slow API caller. When the queue is full, the chunk
//! is dropped and its bytes are counted into the next chunk that gets through, so the
//! caller sees the same "dropped N bytes" marker the agent uses.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use flotilla::proto::{LogChunk, RequestReply};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Requests one session may have in flight.
pub const MAX_PENDING: usize = 256;
/// Log output queued per caller, in bytes (each chunk also counts [`CHUNK_OVERHEAD`]).
pub const LOG_QUEUE_BYTES: usize = 1 << 20;
const CHUNK_OVERHEAD: usize = 128;

fn cost(item: &LogItem) -> usize {
    match item {
        LogItem::Chunk(chunk) => chunk.data.len() + CHUNK_OVERHEAD,
        LogItem::Failed(message) => message.len() + CHUNK_OVERHEAD,
    }
}

/// The session's end of a caller's log queue: bounded in bytes, never waits.
#[derive(Clone)]
pub struct LogSender {
    tx: mpsc::UnboundedSender<LogItem>,
    queued: Arc<AtomicUsize>,
}

/// The caller's end.
pub struct LogReceiver {
    rx: mpsc::UnboundedReceiver<LogItem>,
    queued: Arc<AtomicUsize>,
    /// An item read while merging, to be returned next.
    ahead: Option<LogItem>,
}

/// The most output merged into one item for the caller.
pub const MERGE_BYTES: usize = 64 << 10;

pub fn log_queue() -> (LogSender, LogReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (LogSender { tx, queued: queued.clone() }, LogReceiver { rx, queued, ahead: None })
}

enum Refused {
    Full(LogItem),
    Closed,
}

impl LogSender {
    /// Queues `item` if it fits (`force`: whatever the size, for the last one).
    fn offer(&self, item: LogItem, force: bool) -> Result<(), Refused> {
        let cost = cost(&item);
        if !force && self.queued.load(Ordering::Acquire) + cost > LOG_QUEUE_BYTES {
            return if self.tx.is_closed() { Err(Refused::Closed) } else { Err(Refused::Full(item)) };
        }
        self.queued.fetch_add(cost, Ordering::AcqRel);
        self.tx.send(item).map_err(|_| Refused::Closed)
    }
}

impl LogReceiver {
    fn taken(&self, item: LogItem) -> LogItem {
        self.queued.fetch_sub(cost(&item), Ordering::AcqRel);
        item
    }

    /// The next item, with the chunks already waiting behind it merged in (same stream,
    /// nothing dropped in between, up to [`MERGE_BYTES`]): a caller that fell behind
    /// catches up in few large messages, not many tiny ones (which HTTP/2 peers rightly
    /// treat as abuse).
    pub async fn recv(&mut self) -> Option<LogItem> {
        let first = match self.ahead.take() {
            Some(item) => item,
            None => {
                let item = self.rx.recv().await?;
                self.taken(item)
            }
        };
        let LogItem::Chunk(mut chunk) = first else { return Some(first) };
        while !chunk.end && chunk.data.len() < MERGE_BYTES {
            let Ok(next) = self.rx.try_recv() else { break };
            match self.taken(next) {
                LogItem::Chunk(next)
                    if !next.end
                        && next.stream == chunk.stream
                        && next.dropped_bytes == 0
                        && chunk.data.len() + next.data.len() <= MERGE_BYTES =>
                {
                    chunk.data.extend_from_slice(&next.data);
                }
                other => {
                    self.ahead = Some(other);
                    break;
                }
            }
        }
        Some(LogItem::Chunk(chunk))
    }
}

/// What a log caller receives.
#[derive(Debug)]
pub enum LogItem {
    Chunk(LogChunk),
    /// The droplet could not serve the request (no such container, engine error).
    Failed(String),
}

/// A caller waiting for an answer.
pub enum Waiter {
    Reply(oneshot::Sender<RequestReply>),
    Logs(LogSender),
}

struct Pending {
    waiter: Waiter,
    /// Log bytes dropped here and not yet reported to the caller.
    dropped: u64,
}

/// What the session should do after a log chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterChunk {
    Delivered,
    /// No such request (finished, cancelled, or never ours): nothing to do.
    Unknown,
    /// The caller hung up: tell the agent to stop streaming.
    CallerGone,
}

#[derive(Default)]
pub struct PendingRequests {
    pending: HashMap<Uuid, Pending>,
}

impl PendingRequests {
    /// Records a caller; `false` when the session has too many requests in flight.
    pub fn insert(&mut self, id: Uuid, waiter: Waiter) -> bool {
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        self.pending.insert(id, Pending { waiter, dropped: 0 });
        true
    }

    /// Forgets a request (its caller gave up). Returns whether it was still open.
    pub fn remove(&mut self, id: Uuid) -> bool {
        self.pending.remove(&id).is_some()
    }

    /// Hands a reply to its caller. A failed reply ends a log stream.
    pub fn reply(&mut self, reply: RequestReply) {
        let Some(id) = Uuid::try_parse(&reply.request_id).ok() else { return };
        let Some(pending) = self.pending.remove(&id) else {
            tracing::debug!(request_id = %reply.request_id, "a reply nobody waits for (late, or the caller gave up)");
            return;
        };
        match pending.waiter {
            Waiter::Reply(tx) => {
                let _ = tx.send(reply);
            }
            Waiter::Logs(tx) => {
                let message = if reply.success { "the droplet ended the log stream".to_owned() } else { reply.message };
                let _ = tx.offer(LogItem::Failed(message), true);
            }
        }
    }

    /// Hands a log chunk to its caller without waiting.
    pub fn chunk(&mut self, mut chunk: LogChunk) -> AfterChunk {
        let Some(id) = Uuid::try_parse(&chunk.request_id).ok() else { return AfterChunk::Unknown };
        let Some(pending) = self.pending.get_mut(&id) else { return AfterChunk::Unknown };
        let Waiter::Logs(tx) = &pending.waiter else { return AfterChunk::Unknown };
        chunk.dropped_bytes += pending.dropped;
        if chunk.end {
            // The last chunk always gets through: it is small, and it ends the request.
            let _ = tx.offer(LogItem::Chunk(chunk), true);
            self.pending.remove(&id);
            return AfterChunk::Delivered;
        }
        match tx.offer(LogItem::Chunk(chunk), false) {
            Ok(()) => {
                pending.dropped = 0;
                AfterChunk::Delivered
            }
            Err(Refused::Full(LogItem::Chunk(chunk))) => {
                pending.dropped = chunk.dropped_bytes + chunk.data.len() as u64;
                AfterChunk::Delivered
            }
            Err(_) => {
                self.pending.remove(&id);
                AfterChunk::CallerGone
            }
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: Uuid, data: &[u8], end: bool) -> LogChunk {
        LogChunk { request_id: id.to_string(), data: data.to_vec(), end, ..Default::default() }
    }

    #[tokio::test]
    async fn a_full_caller_queue_drops_chunks_and_reports_the_bytes_in_the_next_one() {
        let mut requests = PendingRequests::default();
        let id = Uuid::new_v4();
        let (tx, mut rx) = log_queue();
        assert!(requests.insert(id, Waiter::Logs(tx)));
        // Fill the queue to within a chunk of its bound.
        let big = vec![b'x'; LOG_QUEUE_BYTES - 2 * CHUNK_OVERHEAD];
        assert_eq!(requests.chunk(chunk(id, &big, false)), AfterChunk::Delivered);
        // These two do not fit: dropped and counted.
        requests.chunk(chunk(id, b"lost\n", false));
        requests.chunk(chunk(id, b"lost too\n", false));
        assert!(
            matches!(rx.recv().await, Some(LogItem::Chunk(c)) if c.data.len() == big.len() && c.dropped_bytes == 0)
        );
        requests.chunk(chunk(id, b"after\n", false));
        match rx.recv().await {
            Some(LogItem::Chunk(c)) => {
                assert_eq!(c.data, b"after\n");
                assert_eq!(c.dropped_bytes, 14, "5 + 9 bytes were dropped before it");
            }
            other => panic!("expected a chunk, got {other:?}"),
        }
        // The last chunk gets through even into a full queue, and ends the request.
        requests.chunk(chunk(id, &big, false));
        requests.chunk(chunk(id, b"lost\n", false));
        assert_eq!(requests.chunk(chunk(id, b"", true)), AfterChunk::Delivered);
        assert!(requests.is_empty());
        assert!(matches!(rx.recv().await, Some(LogItem::Chunk(c)) if !c.end));
        assert!(matches!(rx.recv().await, Some(LogItem::Chunk(c)) if c.end && c.dropped_bytes == 5));
    }

    #[tokio::test]
    async fn chunks_waiting_for_a_caller_are_merged_per_stream_and_never_across_a_loss() {
        let mut requests = PendingRequests::default();
        let id = Uuid::new_v4();
        let (tx, mut rx) = log_queue();
        requests.insert(id, Waiter::Logs(tx));
        let on = |stream: i32, data: &[u8], dropped: u64| LogChunk {
            request_id: id.to_string(),
            stream,
            data: data.to_vec(),
            dropped_bytes: dropped,
            ..Default::default()
        };
        for chunk in [on(1, b"a\n", 0), on(1, b"b\n", 0), on(2, b"err\n", 0), on(2, b"more\n", 0), on(2, b"c\n", 7)] {
            requests.chunk(chunk);
        }
        requests.chunk(chunk(id, b"", true));
        let mut got = Vec::new();
        while let Some(LogItem::Chunk(c)) = rx.recv().await {
            let end = c.end;
            got.push((c.stream, String::from_utf8_lossy(&c.data).into_owned(), c.dropped_bytes, end));
            if end {
                break;
            }
        }
        assert_eq!(
            got,
            [
                (1, "a\nb\n".to_owned(), 0, false),
                (2, "err\nmore\n".to_owned(), 0, false),
                (2, "c\n".to_owned(), 7, false),
                (0, String::new(), 0, true),
            ]
        );
    }

    #[tokio::test]
    async fn a_caller_that_hung_up_stops_the_stream() {
        let mut requests = PendingRequests::default();
        let id = Uuid::new_v4();
        let (tx, rx) = log_queue();
        requests.insert(id, Waiter::Logs(tx));
        drop(rx);
        assert_eq!(requests.chunk(chunk(id, b"x\n", false)), AfterChunk::CallerGone);
        assert_eq!(requests.chunk(chunk(id, b"x\n", false)), AfterChunk::Unknown);
    }

    #[tokio::test]
    async fn replies_reach_their_own_caller_only_and_failures_end_log_streams() {
        let mut requests = PendingRequests::default();
        let (inspect, logs) = (Uuid::new_v4(), Uuid::new_v4());
        let (reply_tx, reply_rx) = oneshot::channel();
        let (log_tx, mut log_rx) = log_queue();
        requests.insert(inspect, Waiter::Reply(reply_tx));
        requests.insert(logs, Waiter::Logs(log_tx));
        // An answer to a request this session never sent changes nothing.
        requests.reply(RequestReply { request_id: Uuid::new_v4().to_string(), ..Default::default() });
        assert_eq!(requests.len(), 2);
        requests.reply(RequestReply { request_id: inspect.to_string(), success: true, ..Default::default() });
        assert!(reply_rx.await.is_ok_and(|r| r.success));
        let failure =
            RequestReply { request_id: logs.to_string(), message: "no container".into(), ..Default::default() };
        requests.reply(failure);
        assert!(matches!(log_rx.recv().await, Some(LogItem::Failed(m)) if m == "no container"));
        assert!(requests.is_empty());
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_requests() {
        let mut requests = PendingRequests::default();
        for _ in 0..MAX_PENDING {
            assert!(requests.insert(Uuid::new_v4(), Waiter::Reply(oneshot::channel().0)));
        }
        assert!(!requests.insert(Uuid::new_v4(), Waiter::Reply(oneshot::channel().0)));
    }
}
