//! Every `dev.flotilla.*` label key the agent writes on Docker objects and reads back: the
//! scoping of containers, networks and volumes to a droplet and deployment, and the health
//! check settings a container carries so a restarted agent finds them again.

use flotilla::DropletId;

/// `true` on everything the agent makes.
pub const MANAGED: &str = "dev.flotilla.managed";
/// The droplet that made it: an agent sees only its own.
pub const DROPLET: &str = "dev.flotilla.droplet";
pub const DEPLOYMENT: &str = "dev.flotilla.deployment";
pub const GENERATION: &str = "dev.flotilla.generation";

/// The probe: `docker`, `http` or `mcp`.
pub const PROBE: &str = "dev.flotilla.probe";
pub const PROBE_PORT: &str = "dev.flotilla.probe.port";
pub const PROBE_PATH: &str = "dev.flotilla.probe.path";
/// The HTTP statuses that pass, `min-max`.
pub const PROBE_STATUS: &str = "dev.flotilla.probe.status";
pub const PROBE_INTERVAL_MS: &str = "dev.flotilla.probe.interval-ms";
pub const PROBE_TIMEOUT_MS: &str = "dev.flotilla.probe.timeout-ms";
pub const PROBE_THRESHOLD: &str = "dev.flotilla.probe.threshold";
pub const PROBE_START_PERIOD_MS: &str = "dev.flotilla.probe.start-period-ms";
pub const PROBE_MAX_RESTARTS: &str = "dev.flotilla.probe.max-restarts";

/// The Docker `label` filter that selects what this droplet's agent manages.
pub fn managed_by(droplet: DropletId) -> Vec<String> {
    vec![format!("{MANAGED}=true"), format!("{DROPLET}={droplet}")]
}
