//! The clocks of liveness, delivery and retention: one set for the whole control plane.

use std::time::Duration;

use clap::Args;

/// The clocks of liveness. Defaults suit production; tests shrink them.
#[derive(Debug, Clone, Copy, Args)]
pub struct Timing {
    /// How often agents send a heartbeat. The control plane decides; agents obey.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How many heartbeat intervals of silence make a droplet `unreachable`.
    #[arg(long, env = "FLOTILLA_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// How often the latest heartbeats are written to PostgreSQL, all in one statement.
    #[arg(long, env = "FLOTILLA_FLUSH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// How long a droplet whose session closed stays `online` waiting for a new session
    /// before it is `offline`.
    #[arg(long, env = "FLOTILLA_RECONNECT_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// On shutdown, agents are told to come back after a random delay up to this long.
    #[arg(long, env = "FLOTILLA_RECONNECT_SPREAD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconnect_spread: Duration,
    /// On shutdown, how long sessions get to close before they are cut.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a new session may take to say `Hello`.
    #[arg(long, env = "FLOTILLA_HELLO_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub hello_timeout: Duration,
    /// How often the deployments of connected droplets are compared with what the
    /// droplets report, and corrected.
    #[arg(long, env = "FLOTILLA_RECONCILE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// How long finished commands and events are kept.
    #[arg(long, env = "FLOTILLA_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// How often what is older than the retention is pruned (in small batches).
    #[arg(long, env = "FLOTILLA_PRUNE_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub prune_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
            flush_interval: Duration::from_secs(30),
            reconnect_grace: Duration::from_secs(60),
            reconnect_spread: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
        }
    }
}

impl Timing {
    /// Silence longer than this makes a droplet `unreachable`.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1)
    }

    /// Refuses settings that cannot work together.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--flush-interval", self.flush_interval),
            ("--hello-timeout", self.hello_timeout),
            ("--reconcile-interval", self.reconcile_interval),
            ("--retention", self.retention),
            ("--prune-interval", self.prune_interval),
        ];
        for (flag, value) in positive {
            if value.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if self.missed_heartbeats == 0 {
            return Err("--missed-heartbeats must be at least 1".into());
        }
        Ok(())
    }
}
