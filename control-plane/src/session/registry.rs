//! The live sessions of this process, keyed by droplet, and the liveness each one carries.
//!
//! Heartbeats touch only this map: the latest load waits here until the flusher writes all
//! of them in one statement (`liveness.rs`). Agents transitions go to PostgreSQL at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chrono::Utc;
use flotilla::{
    DropletId,
    proto::{ControlMessage, Goodbye, HostLoad, control_message, goodbye::Reason},
};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::{
    session::requests::{AfterChunk, PendingRequests, Waiter},
    store::{Facts, Load, SeenLoad},
};

/// Where a session's messages to its agent go.
pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

/// A cheap-to-clone handle on the registry.
///
/// The lock is a std `Mutex`: it is never held across an `.await`, and every critical
/// section is a map lookup. (A fleet far past one replica's sessions would shard it.)
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<DropletId, Entry>>>,
}

struct Entry {
    session_id: Uuid,
    /// The claim's epoch: a droplet's later session has a larger one.
    epoch: i64,
    /// The serial of the certificate the session authenticated with.
    serial: String,
    outbound: Outbound,
    /// Cancelled to end the session's task.
    end: CancellationToken,
    last_heartbeat: Instant,
    unreachable: bool,
    pending: Option<SeenLoad>,
    /// Live requests sent on this session and not yet answered.
    requests: PendingRequests,
    /// Wakes the session's command delivery.
    wake: Arc<Notify>,
}

/// A session that `register` displaced.
pub struct Displaced {
    pub session_id: Uuid,
    outbound: Outbound,
    end: CancellationToken,
}

impl Displaced {
    /// Tells the displaced session's agent why, and ends that session.
    pub fn close(self, goodbye: Goodbye) {
        send_goodbye(&self.outbound, &self.end, goodbye);
    }
}

/// Why a live request could not be sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the droplet has no session with this control plane")]
    NotConnected,
    #[error("the droplet's session is busy: too many requests in flight")]
    Busy,
}

/// A session whose droplet has a newer session here already.
#[derive(Debug, PartialEq, Eq)]
pub struct Stale;

/// What a heartbeat changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// The droplet was `unreachable` and is back.
    Recovered,
    Recorded,
    /// No such session here (it was displaced).
    Unknown,
}

fn send_goodbye(outbound: &Outbound, end: &CancellationToken, goodbye: Goodbye) {
    let message = ControlMessage { kind: Some(control_message::Kind::Goodbye(goodbye)) };
    // A full queue means the agent is not reading; it gets no goodbye, just the close.
    let _ = outbound.try_send(Ok(message));
    end.cancel();
}

/// A heartbeat's load as the droplet's columns hold it (counts past `i64::MAX` saturate).
pub fn stored_load(load: &HostLoad) -> Load {
    Load {
        load_average_1m: load.load_average_1m,
        load_average_5m: load.load_average_5m,
        load_average_15m: load.load_average_15m,
        memory_used_bytes: clamp_i64(load.memory_used_bytes),
        disk_used_bytes: clamp_i64(load.disk_used_bytes),
        disk_free_bytes: clamp_i64(load.disk_free_bytes),
        container_count: clamp_i32(load.container_count),
    }
}

/// The facts a `Hello` reports, as the droplet's columns hold them.
pub fn stored_facts(hello: &flotilla::proto::Hello) -> Facts {
    let host = hello.host.clone().unwrap_or_default();
    let protocol = hello.protocol.unwrap_or_default();
    Facts {
        agent_version: hello.agent_version.clone(),
        protocol_major: clamp_i32(protocol.major),
        protocol_minor: clamp_i32(protocol.minor),
        hostname: host.hostname,
        os: host.os,
        kernel_version: host.kernel_version,
        architecture: host.architecture,
        cpu_count: clamp_i32(host.cpu_count),
        memory_total_bytes: clamp_i64(host.memory_total_bytes),
        disk_total_bytes: clamp_i64(host.disk_total_bytes),
        docker_version: hello.docker_version.clone(),
        load: stored_load(&hello.load.unwrap_or_default()),
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<DropletId, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated: every
        // critical section is a single insert, remove or field write.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a session of claim `epoch`, returning the one it displaced for the same
    /// droplet; `Err(Stale)` (and nothing registered) when a newer claim's session is here
    /// already.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        droplet: DropletId,
        session_id: Uuid,
        epoch: i64,
        serial: String,
        outbound: Outbound,
        end: CancellationToken,
        wake: Arc<Notify>,
    ) -> Result<Option<Displaced>, Stale> {
        let mut map = self.lock();
        if map.get(&droplet).is_some_and(|current| current.epoch > epoch) {
            return Err(Stale);
        }
        let entry = Entry {
            session_id,
            epoch,
            serial,
            outbound,
            end,
            last_heartbeat: Instant::now(),
            unreachable: false,
            pending: None,
            requests: PendingRequests::default(),
            wake,
        };
        Ok(map.insert(droplet, entry).map(|old| Displaced {
            session_id: old.session_id,
            outbound: old.outbound,
            end: old.end,
        }))
    }

    /// Removes a session if it is still the droplet's current one; returns its unwritten
    /// heartbeat.
    pub fn remove(&self, droplet: DropletId, session_id: Uuid) -> Option<Option<SeenLoad>> {
        let mut map = self.lock();
        match map.get(&droplet) {
            Some(entry) if entry.session_id == session_id => map.remove(&droplet).map(|e| e.pending),
            _ => None,
        }
    }

    /// Records a heartbeat in memory.
    pub fn heartbeat(&self, droplet: DropletId, session_id: Uuid, load: HostLoad) -> Beat {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(&droplet).filter(|e| e.session_id == session_id) else {
            return Beat::Unknown;
        };
        entry.last_heartbeat = Instant::now();
        entry.pending = Some(SeenLoad { droplet, seen_at: Utc::now(), load: stored_load(&load) });
        if std::mem::replace(&mut entry.unreachable, false) { Beat::Recovered } else { Beat::Recorded }
    }

    /// Takes every heartbeat not yet written.
    pub fn take_pending(&self) -> Vec<SeenLoad> {
        self.lock().values_mut().filter_map(|e| e.pending.take()).collect()
    }

    /// Marks unreachable every session silent for longer than `silence`, returning the ones
    /// that just became so.
    pub fn mark_silent(&self, silence: Duration) -> Vec<(DropletId, Uuid)> {
        let now = Instant::now();
        self.lock()
            .iter_mut()
            .filter(|(_, e)| !e.unreachable && now.duration_since(e.last_heartbeat) > silence)
            .map(|(droplet, e)| {
                e.unreachable = true;
                (*droplet, e.session_id)
            })
            .collect()
    }

    /// Closes the droplet's session if it runs on the certificate `serial`. Returns whether
    /// one was closed.
    pub fn close_if_serial(&self, droplet: DropletId, serial: &str, reason: Reason, message: &str) -> bool {
        let map = self.lock();
        let Some(entry) = map.get(&droplet).filter(|e| e.serial == serial) else { return false };
        let goodbye = Goodbye { reason: reason as i32, message: message.into(), ..Default::default() };
        send_goodbye(&entry.outbound, &entry.end, goodbye);
        true
    }

    /// Closes the droplet's session here if it is older than `session`, of claim `epoch`.
    /// Returns whether one was closed.
    pub fn close_older(&self, droplet: DropletId, session: Uuid, epoch: i64, goodbye: Goodbye) -> bool {
        let map = self.lock();
        // An announcement heard late, after a newer session registered here, closes nothing.
        let Some(entry) = map.get(&droplet).filter(|e| e.session_id != session && e.epoch < epoch) else {
            return false;
        };
        send_goodbye(&entry.outbound, &entry.end, goodbye);
        true
    }

    /// Queues a message to the droplet's session here, if it has one. `false` when it has
    /// none or its queue is full.
    pub fn send(&self, droplet: DropletId, kind: control_message::Kind) -> bool {
        let map = self.lock();
        let Some(entry) = map.get(&droplet) else { return false };
        entry.outbound.try_send(Ok(ControlMessage { kind: Some(kind) })).is_ok()
    }

    /// Registers `waiter` as request `id` on the droplet's session and sends `kind` to the
    /// agent. The caller is registered first, so even an instant answer finds it.
    pub fn request(
        &self,
        droplet: DropletId,
        id: Uuid,
        waiter: Waiter,
        kind: control_message::Kind,
    ) -> Result<(), RequestError> {
        let mut map = self.lock();
        let entry = map.get_mut(&droplet).ok_or(RequestError::NotConnected)?;
        if !entry.requests.insert(id, waiter) {
            return Err(RequestError::Busy);
        }
        if entry.outbound.try_send(Ok(ControlMessage { kind: Some(kind) })).is_err() {
            entry.requests.remove(id);
            return Err(RequestError::Busy);
        }
        Ok(())
    }

    /// Forgets request `id` (its caller gave up); returns whether it was still open.
    pub fn forget_request(&self, droplet: DropletId, id: Uuid) -> bool {
        self.lock().get_mut(&droplet).is_some_and(|e| e.requests.remove(id))
    }

    /// An answer arrived on session `session_id`: only that session's requests can match.
    pub fn reply(&self, droplet: DropletId, session_id: Uuid, reply: flotilla::proto::RequestReply) {
        if let Some(entry) = self.lock().get_mut(&droplet).filter(|e| e.session_id == session_id) {
            entry.requests.reply(reply);
        }
    }

    /// A log chunk arrived on session `session_id`.
    pub fn log_chunk(&self, droplet: DropletId, session_id: Uuid, chunk: flotilla::proto::LogChunk) -> AfterChunk {
        match self.lock().get_mut(&droplet).filter(|e| e.session_id == session_id) {
            Some(entry) => entry.requests.chunk(chunk),
            None => AfterChunk::Unknown,
        }
    }

    /// The droplets with a session here.
    pub fn droplets(&self) -> Vec<DropletId> {
        self.lock().keys().copied().collect()
    }

    /// Wakes the droplet's command delivery, if its session is here.
    pub fn wake(&self, droplet: DropletId) {
        if let Some(entry) = self.lock().get(&droplet) {
            entry.wake.notify_one();
        }
    }

    pub fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.wake.notify_one();
        }
    }

    /// Says goodbye to every session; `goodbye` makes each one's message.
    pub fn close_all(&self, mut goodbye: impl FnMut() -> Goodbye) {
        for entry in self.lock().values() {
            send_goodbye(&entry.outbound, &entry.end, goodbye());
        }
    }

    /// Ends every session without a word (after the drain grace ran out).
    pub fn cancel_all(&self) {
        for entry in self.lock().values() {
            entry.end.cancel();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        sessions: &Sessions,
        droplet: DropletId,
    ) -> (Uuid, mpsc::Receiver<Result<ControlMessage, Status>>, CancellationToken) {
        let (tx, rx) = mpsc::channel(4);
        let end = CancellationToken::new();
        let id = Uuid::new_v4();
        assert!(matches!(sessions.register(droplet, id, 1, "01".into(), tx, end.clone(), Arc::default()), Ok(None)));
        (id, rx, end)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_session_turns_unreachable_once_and_recovers_on_a_heartbeat() {
        let sessions = Sessions::default();
        let droplet = DropletId::new();
        let (id, _rx, _end) = entry(&sessions, droplet);
        assert!(sessions.mark_silent(Duration::from_secs(3)).is_empty());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(sessions.mark_silent(Duration::from_secs(3)), vec![(droplet, id)]);
        assert!(sessions.mark_silent(Duration::from_secs(3)).is_empty(), "reported once");
        assert_eq!(sessions.heartbeat(droplet, id, HostLoad::default()), Beat::Recovered);
        assert_eq!(sessions.heartbeat(droplet, id, HostLoad::default()), Beat::Recorded);
    }

    #[tokio::test]
    async fn heartbeats_wait_in_memory_and_are_taken_once() {
        let sessions = Sessions::default();
        let droplet = DropletId::new();
        let (id, _rx, _end) = entry(&sessions, droplet);
        for n in 0..5 {
            sessions.heartbeat(droplet, id, HostLoad { container_count: n, ..Default::default() });
        }
        let pending = sessions.take_pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].load.container_count, 4, "only the latest heartbeat is kept");
        assert!(sessions.take_pending().is_empty());
    }

    #[tokio::test]
    async fn a_new_session_displaces_the_old_and_the_old_cannot_remove_it() {
        let sessions = Sessions::default();
        let droplet = DropletId::new();
        let (old, mut old_rx, old_end) = entry(&sessions, droplet);
        let (tx, _rx) = mpsc::channel(4);
        let new = Uuid::new_v4();
        let displaced = sessions.register(droplet, new, 2, "02".into(), tx, CancellationToken::new(), Arc::default());
        let displaced = displaced.ok().flatten().expect("the old session is displaced");
        assert_eq!(displaced.session_id, old);
        displaced.close(Goodbye::default());
        assert!(old_end.is_cancelled());
        assert!(matches!(old_rx.try_recv(), Ok(Ok(ControlMessage { kind: Some(control_message::Kind::Goodbye(_)) }))));
        assert!(sessions.remove(droplet, old).is_none());
        assert_eq!(sessions.heartbeat(droplet, old, HostLoad::default()), Beat::Unknown);
        assert_eq!(sessions.len(), 1);
    }

    #[tokio::test]
    async fn an_announcement_heard_late_closes_only_older_sessions() {
        let sessions = Sessions::default();
        let droplet = DropletId::new();
        // Session 1 (epoch 1) registered here, then session 2 (epoch 2) took over here too.
        let (first, _first_rx, _first_end) = entry(&sessions, droplet);
        let (tx, mut rx) = mpsc::channel(4);
        let (second, second_end) = (Uuid::new_v4(), CancellationToken::new());
        let displaced = sessions.register(droplet, second, 2, "02".into(), tx, second_end.clone(), Arc::default());
        assert!(matches!(displaced, Ok(Some(_))));
        // The first session's announcement arrives now: it must not close the newer one.
        assert!(!sessions.close_older(droplet, first, 1, Goodbye::default()));
        assert!(!second_end.is_cancelled());
        assert!(rx.try_recv().is_err(), "no goodbye for the newer session");
        // A third session, on another replica, is newer: this one goes.
        assert!(sessions.close_older(droplet, Uuid::new_v4(), 3, Goodbye::default()));
        assert!(second_end.is_cancelled());
    }

    #[tokio::test]
    async fn a_session_overtaken_before_it_registers_is_refused() {
        let sessions = Sessions::default();
        let droplet = DropletId::new();
        let (tx, _rx) = mpsc::channel(4);
        let newer = Uuid::new_v4();
        assert!(matches!(
            sessions.register(droplet, newer, 5, "05".into(), tx, CancellationToken::new(), Arc::default()),
            Ok(None)
        ));
        let (tx, _rx) = mpsc::channel(4);
        let older =
            sessions.register(droplet, Uuid::new_v4(), 4, "04".into(), tx, CancellationToken::new(), Arc::default());
        assert_eq!(older.err(), Some(Stale));
        assert_eq!(sessions.droplets(), vec![droplet]);
        assert_eq!(sessions.heartbeat(droplet, newer, HostLoad::default()), Beat::Recorded, "the newer one stays");
    }
}
