//! Log streaming: a `FetchLogs` request streams a container's output as `LogChunk`s until
//! the tail is done, the followed container exits, or `CancelLogs` arrives.
//!
//! Docker is read as fast as it writes. What the session cannot carry yet waits in a
//! buffer bounded in bytes ([`BUFFER_BYTES`] per stream); when it is full, output is
//! dropped and counted, and the next chunk says how many bytes were lost. A slow reader
//! therefore never costs unbounded memory and never stalls the session, which heartbeats
//! and command results share.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use bollard::container::LogOutput;
use flotilla::proto::{FetchLogs, LogChunk, RequestReply, agent_message, log_chunk::Stream};
use futures::StreamExt as _;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{runtime::Runtime, wire::Wire};

/// Output buffered per stream while the session is busy; beyond it, output is dropped.
pub const BUFFER_BYTES: usize = 1 << 20;
/// The largest chunk sent: lines are merged up to this size.
pub const CHUNK_BYTES: usize = 16 << 10;
/// Log streams one session may hold open at once.
pub const MAX_STREAMS: usize = 32;

/// The open log streams of one session. Dropping it ends them all.
pub(crate) struct LogStreams {
    open: Arc<Mutex<HashMap<String, CancellationToken>>>,
    session: CancellationToken,
}

impl Drop for LogStreams {
    fn drop(&mut self) {
        self.session.cancel();
    }
}

impl LogStreams {
    pub(crate) fn new() -> Self {
        Self { open: Arc::default(), session: CancellationToken::new() }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        // Every critical section is one insert or remove: a poisoned map is still whole.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts streaming; refuses (with a `RequestReply`) when too many streams are open.
    pub(crate) async fn fetch(&self, runtime: Runtime, wire: Wire, request_id: String, fetch: FetchLogs) {
        let cancel = self.session.child_token();
        let refused = {
            let mut open = self.open();
            let full = open.len() >= MAX_STREAMS;
            if !full {
                open.insert(request_id.clone(), cancel.clone());
            }
            full
        };
        if refused {
            let message = format!("this droplet already streams {MAX_STREAMS} logs; cancel one first");
            let _ = wire.send(failure(&request_id, message)).await;
            return;
        }
        let open = self.open.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = stream(&runtime, &wire, &request_id, &fetch) => {}
                }
                open.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&request_id);
            }
            .in_current_span(),
        );
    }

    /// Stops a stream and sends its last chunk. Cancelling an unknown (or finished) stream
    /// is not an error: the stream may have ended on its own meanwhile.
    pub(crate) async fn cancel(&self, wire: &Wire, request_id: &str) {
        let Some(cancel) = self.open().remove(request_id) else { return };
        cancel.cancel();
        let end = LogChunk { request_id: request_id.to_owned(), end: true, ..Default::default() };
        let _ = wire.send(agent_message::Kind::LogChunk(end)).await;
    }
}

fn failure(request_id: &str, message: String) -> agent_message::Kind {
    agent_message::Kind::RequestReply(RequestReply {
        request_id: request_id.to_owned(),
        success: false,
        message,
        ..Default::default()
    })
}

/// A piece of output on its way from Docker to the session.
struct Piece {
    stream: Stream,
    data: Vec<u8>,
    at: Option<prost_types::Timestamp>,
    /// Bytes dropped just before this piece.
    dropped: u64,
}

enum Read {
    Piece(Piece),
    /// Docker ended the stream; bytes dropped since the last piece.
    End {
        dropped: u64,
    },
    Failed(String),
}

async fn stream(runtime: &Runtime, wire: &Wire, request_id: &str, fetch: &FetchLogs) {
    let deployment = match Uuid::try_parse(&fetch.deployment_id) {
        Ok(id) => id,
        Err(_) => {
            let message = format!("deployment_id: {:?} is not a UUID", fetch.deployment_id);
            let _ = wire.send(failure(request_id, message)).await;
            return;
        }
    };
    let since = fetch.since.and_then(|t| SystemTime::try_from(t).ok());
    let mut logs = match runtime.logs(deployment, fetch.tail, since, fetch.follow).await {
        Ok(logs) => Box::pin(logs),
        Err(error) => {
            let _ = wire.send(failure(request_id, error.to_string())).await;
            return;
        }
    };

    // The reader never waits for the session: it takes room from `budget` or drops.
    let budget = Arc::new(Semaphore::new(BUFFER_BYTES));
    let (tx, mut rx) = mpsc::unbounded_channel::<Read>();
    let reader = {
        let budget = budget.clone();
        async move {
            let mut dropped = 0u64;
            while let Some(item) = logs.next().await {
                let (stream, frame) = match item {
                    Ok(LogOutput::StdOut { message }) => (Stream::Stdout, message),
                    Ok(LogOutput::StdErr { message }) => (Stream::Stderr, message),
                    Ok(LogOutput::Console { message }) => (Stream::Stdout, message),
                    Ok(LogOutput::StdIn { .. }) => continue,
                    Err(error) => {
                        let _ = tx.send(Read::Failed(format!("reading the container's logs: {error}")));
                        return;
                    }
                };
                let (at, data) = split_timestamp(&frame);
                let room = u32::try_from(data.len()).ok().and_then(|n| budget.try_acquire_many(n).ok());
                match room {
                    Some(permit) => {
                        // Given back by the writer once the piece is on its way.
                        permit.forget();
                        let piece = Piece { stream, data: data.to_vec(), at, dropped };
                        dropped = 0;
                        if tx.send(Read::Piece(piece)).is_err() {
                            return;
                        }
                    }
                    None => dropped += data.len() as u64,
                }
            }
            let _ = tx.send(Read::End { dropped });
        }
    };
    let writer = async {
        // A message read ahead while merging, to be sent next.
        let mut ahead: Option<Read> = None;
        loop {
            let read = match ahead.take() {
                Some(read) => read,
                None => match rx.recv().await {
                    Some(read) => read,
                    None => return,
                },
            };
            let message = match read {
                Read::Failed(message) => {
                    let _ = wire.send(failure(request_id, message)).await;
                    return;
                }
                Read::End { dropped } => {
                    let end = LogChunk {
                        request_id: request_id.to_owned(),
                        end: true,
                        dropped_bytes: dropped,
                        ..Default::default()
                    };
                    let _ = wire.send(agent_message::Kind::LogChunk(end)).await;
                    return;
                }
                Read::Piece(mut chunk) => {
                    // Merge what is already waiting: same stream, nothing lost in between.
                    while chunk.data.len() < CHUNK_BYTES {
                        match rx.try_recv() {
                            Ok(Read::Piece(next))
                                if next.stream == chunk.stream
                                    && next.dropped == 0
                                    && chunk.data.len() + next.data.len() <= CHUNK_BYTES =>
                            {
                                budget.add_permits(next.data.len());
                                chunk.data.extend_from_slice(&next.data);
                            }
                            Ok(next) => {
                                ahead = Some(next);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    budget.add_permits(chunk.data.len());
                    LogChunk {
                        request_id: request_id.to_owned(),
                        stream: chunk.stream as i32,
                        data: chunk.data,
                        at: chunk.at,
                        dropped_bytes: chunk.dropped,
                        end: false,
                    }
                }
            };
            if wire.send(agent_message::Kind::LogChunk(message)).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Docker's `timestamps=true` prefix (`2026-11-24T09:00:00.123456789Z `), parsed and
/// removed. A frame without one is returned whole.
fn split_timestamp(frame: &[u8]) -> (Option<prost_types::Timestamp>, &[u8]) {
    let Some(space) = frame.iter().take(40).position(|&b| b == b' ') else { return (None, frame) };
    let parsed = std::str::from_utf8(&frame[..space]).ok().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    match parsed {
        Some(t) => (
            Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }),
            &frame[space + 1..],
        ),
        None => (None, frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_are_parsed_and_stripped() {
        let (at, data) = split_timestamp(b"2026-11-24T09:00:01.500000000Z hello world\n");
        assert_eq!(data, b"hello world\n");
        let at = at.expect("a timestamp");
        assert_eq!((at.seconds, at.nanos), (1_795_510_801, 500_000_000));
        let (at, data) = split_timestamp(b"no timestamp here\n");
        assert!(at.is_none());
        assert_eq!(data, b"no timestamp here\n");
    }
}
