//! What the agent tells the control plane about its host: facts once per session, load
//! with every heartbeat. Read from the host itself (via `sysinfo`), never configured.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flotilla::proto::{HostFacts, HostLoad};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// Load is sampled at most this often, however many heartbeats ask.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Reads host facts and load. Cheap to clone; samples are shared.
#[derive(Clone)]
pub struct HostProbe {
    disk_path: PathBuf,
    // std Mutex: held only while sampling, never across an await.
    cache: Arc<Mutex<Option<(Instant, HostLoad)>>>,
}

impl HostProbe {
    /// `disk_path` picks the filesystem whose usage is reported (the one holding it).
    pub fn new(disk_path: impl Into<PathBuf>) -> Self {
        Self { disk_path: disk_path.into(), cache: Arc::default() }
    }

    pub fn facts(&self) -> HostFacts {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let (disk_total, _) = disk_usage(&self.disk_path);
        HostFacts {
            hostname: System::host_name().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            kernel_version: System::kernel_version().unwrap_or_default(),
            architecture: System::cpu_arch(),
            cpu_count: u32::try_from(system.cpus().len()).unwrap_or(u32::MAX),
            memory_total_bytes: system.total_memory(),
            disk_total_bytes: disk_total,
        }
    }

    /// The host's load now (at most `SAMPLE_EVERY` old); `containers` is counted by the caller.
    pub fn load(&self, containers: u32) -> HostLoad {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache.as_ref().filter(|(at, _)| at.elapsed() < SAMPLE_EVERY).map(|(_, l)| *l);
        let mut load = fresh.unwrap_or_else(|| {
            let sample = sample(&self.disk_path);
            *cache = Some((Instant::now(), sample));
            sample
        });
        load.container_count = containers;
        load
    }
}

fn sample(disk_path: &Path) -> HostLoad {
    let mut system = System::new();
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let average = System::load_average();
    let (total, free) = disk_usage(disk_path);
    HostLoad {
        load_average_1m: average.one,
        load_average_5m: average.five,
        load_average_15m: average.fifteen,
        memory_used_bytes: system.used_memory(),
        disk_used_bytes: total.saturating_sub(free),
        disk_free_bytes: free,
        container_count: 0,
    }
}

/// (total, available) bytes of the filesystem holding `path`: the mount point that is the
/// longest prefix of it.
fn disk_usage(path: &Path) -> (u64, u64) {
    let disks = Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.total_space(), d.available_space()))
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_and_load_come_from_this_host() {
        let probe = HostProbe::new("/");
        let facts = probe.facts();
        assert!(facts.cpu_count >= 1);
        assert!(facts.memory_total_bytes > 0);
        assert!(facts.disk_total_bytes > 0, "the root filesystem has a size");
        assert_eq!(facts.hostname, System::host_name().unwrap_or_default());
        let load = probe.load(3);
        assert_eq!(load.container_count, 3);
        assert!(load.memory_used_bytes > 0 && load.memory_used_bytes <= facts.memory_total_bytes);
        assert!(load.disk_free_bytes <= facts.disk_total_bytes);
    }
}
