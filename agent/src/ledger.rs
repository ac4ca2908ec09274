//! The agent's record of applied commands: each command id is applied at most once, even
//! when the control plane sends it again (after a reconnect, a control-plane failover, or
//! an agent restart between applying a command and reporting it).
//!
//! The record is a file in the state dir: length-prefixed `CommandResult`s, each appended
//! and fsynced *before* the result is sent, so a result the control plane has seen is
//! always on disk. A torn last record (a crash mid-write) is ignored. The file keeps the
//! newest [`KEEP`] results and is compacted (rewritten beside, then renamed) once it holds
//! twice that. Without a state dir (tests with fixed credentials) the record lives in
//! memory only.

use std::{
    collections::{HashMap, VecDeque},
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use flotilla::proto::CommandResult;
use prost::Message as _;

/// Results kept: far more than the commands a control plane could still re-send.
#[cfg(not(test))]
pub const KEEP: usize = 4096;
#[cfg(test)]
pub const KEEP: usize = 16;
const FILE: &str = "commands.log";

struct Inner {
    path: Option<PathBuf>,
    file: Option<File>,
    results: HashMap<String, CommandResult>,
    order: VecDeque<String>,
    /// Records in the file (compaction is due at 2 × KEEP).
    records: usize,
}

/// Cheap to clone; shared by every session of the agent's life.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
}

impl Ledger {
    /// A record that lives in memory only.
    pub fn in_memory() -> Self {
        Self::from_inner(Inner { path: None, file: None, results: HashMap::new(), order: VecDeque::new(), records: 0 })
    }

    fn from_inner(inner: Inner) -> Self {
        Self { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Opens (or creates) the record in `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let mut inner =
            Inner { path: Some(path.clone()), file: None, results: HashMap::new(), order: VecDeque::new(), records: 0 };
        if let Ok(mut file) = File::open(&path) {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            let mut at = 0;
            while at + 4 <= bytes.len() {
                let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
                let Some(record) = bytes.get(at + 4..at + 4 + len) else { break };
                let Ok(result) = CommandResult::decode(record) else { break };
                inner.remember(result);
                inner.records += 1;
                at += 4 + len;
            }
            if at < bytes.len() {
                tracing::warn!(path = %path.display(), "the command record ends with a torn write; it is dropped");
                inner.rewrite()?;
            }
        }
        inner.file = Some(OpenOptions::new().create(true).append(true).open(&path)?);
        Ok(Self::from_inner(inner))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps whole; a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The recorded result of command `id`, if it was applied.
    pub fn result(&self, id: &str) -> Option<CommandResult> {
        self.lock().results.get(id).cloned()
    }

    /// Records a result, durably, before it is reported.
    pub fn record(&self, result: &CommandResult) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(file) = inner.file.as_mut() {
            let bytes = result.encode_to_vec();
            let mut framed = Vec::with_capacity(bytes.len() + 4);
            framed.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
            framed.extend_from_slice(&bytes);
            file.write_all(&framed)?;
            file.sync_data()?;
            inner.records += 1;
        }
        inner.remember(result.clone());
        if inner.records >= 2 * KEEP {
            inner.rewrite()?;
        }
        Ok(())
    }

    /// The ids applied most recently, newest last (for `Hello`).
    pub fn recent(&self, n: usize) -> Vec<String> {
        let inner = self.lock();
        inner.order.iter().skip(inner.order.len().saturating_sub(n)).cloned().collect()
    }
}

impl Inner {
    fn remember(&mut self, result: CommandResult) {
        let id = result.command_id.clone();
        if self.results.insert(id.clone(), result).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > KEEP {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
    }

    /// Writes the kept results to a new file and renames it over the old one.
    fn rewrite(&mut self) -> io::Result<()> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        let temp = path.with_extension("log.new");
        {
            let mut file = File::create(&temp)?;
            for id in &self.order {
                if let Some(result) = self.results.get(id) {
                    let bytes = result.encode_to_vec();
                    file.write_all(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes())?;
                    file.write_all(&bytes)?;
                }
            }
            file.sync_all()?;
        }
        std::fs::rename(&temp, &path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.records = self.order.len();
        self.file = Some(OpenOptions::new().append(true).open(&path)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str) -> CommandResult {
        CommandResult { command_id: id.into(), success: true, message: format!("applied {id}"), ..Default::default() }
    }

    fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("flotilla-ledger-{}", uuid::Uuid::new_v4()))
    }

    #[test]
    fn results_survive_a_restart_and_a_torn_last_record() -> io::Result<()> {
        let dir = dir();
        let ledger = Ledger::open(&dir)?;
        ledger.record(&result("a"))?;
        ledger.record(&result("b"))?;
        drop(ledger);
        // A crash in the middle of the next write.
        let mut file = OpenOptions::new().append(true).open(dir.join(FILE))?;
        file.write_all(&[200, 0, 0, 0, 1, 2, 3])?;
        drop(file);

        let ledger = Ledger::open(&dir)?;
        assert_eq!(ledger.result("a").map(|r| r.message), Some("applied a".into()));
        assert_eq!(ledger.recent(10), ["a", "b"]);
        ledger.record(&result("c"))?;
        drop(ledger);
        let ledger = Ledger::open(&dir)?;
        assert_eq!(ledger.recent(10), ["a", "b", "c"], "the torn record was dropped, not glued to the next");
        std::fs::remove_dir_all(dir)
    }

    #[test]
    fn the_record_is_compacted_to_the_newest_results() -> io::Result<()> {
        let dir = dir();
        let ledger = Ledger::open(&dir)?;
        for n in 0..2 * KEEP + 10 {
            ledger.record(&result(&n.to_string()))?;
        }
        drop(ledger);
        let ledger = Ledger::open(&dir)?;
        assert!(ledger.result("0").is_none(), "the oldest are forgotten");
        assert!(ledger.result(&(2 * KEEP + 9).to_string()).is_some());
        assert_eq!(ledger.recent(usize::MAX).len(), KEEP);
        let size = std::fs::metadata(dir.join(FILE))?.len();
        assert!(size < (KEEP as u64 + 1) * 40, "compacted: {size} bytes");
        std::fs::remove_dir_all(dir)
    }
}
