//! The session's outbound half: the sender every part of the agent reports on, and the
//! sequence number each message carries. A leaf: it names no other agent module.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use flotilla::proto::{AgentMessage, agent_message};
use tokio::sync::mpsc;

/// Messages queued for the session before a sender waits.
const QUEUE: usize = 64;

/// Cheap to clone; shared by the session loop, the executor, the monitor, the event
/// follower and the log streams of one session.
#[derive(Clone)]
pub(crate) struct Wire {
    tx: mpsc::Sender<AgentMessage>,
    seq: Arc<AtomicU64>,
}

impl Wire {
    /// A new outbound half, and the stream the session sends.
    pub(crate) fn channel() -> (Self, mpsc::Receiver<AgentMessage>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx, seq: Arc::default() }, rx)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends if the session's queue has room; what does not fit is dropped (for reports
    /// that are nice to have, like pull progress).
    pub(crate) fn try_send(&self, kind: agent_message::Kind) -> bool {
        let seq = self.next_seq();
        self.tx.try_send(AgentMessage { seq, kind: Some(kind) }).is_ok()
    }

    pub(crate) async fn send(&self, kind: agent_message::Kind) -> anyhow::Result<()> {
        let seq = self.next_seq();
        self.tx.send(AgentMessage { seq, kind: Some(kind) }).await.context("the session's outbound stream closed")
    }

    /// 1, 2, 3, … in the order messages are handed to the session.
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla::proto::CommandAck;

    fn ack(id: &str) -> agent_message::Kind {
        agent_message::Kind::CommandAck(CommandAck { command_id: id.into() })
    }

    #[tokio::test]
    async fn messages_are_numbered_in_order_and_a_full_queue_drops_only_what_may_be_dropped() -> anyhow::Result<()> {
        let (wire, mut rx) = Wire::channel();
        wire.send(ack("a")).await?;
        assert!(wire.clone().try_send(ack("b")), "a clone shares the sequence");
        let seqs: Vec<u64> = [rx.recv().await, rx.recv().await].into_iter().flatten().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2]);
        for _ in 0..QUEUE {
            assert!(wire.try_send(ack("fill")));
        }
        assert!(!wire.try_send(ack("dropped")), "no room: dropped, not waited for");
        drop(rx);
        assert!(wire.is_closed());
        assert!(wire.send(ack("late")).await.is_err(), "a closed session is an error to a sender");
        Ok(())
    }
}
