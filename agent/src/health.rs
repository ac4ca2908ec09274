//! Self-healing: the health monitor probes every running managed container that has a
//! health check (the probes are [`crate::runtime::probe`]'s), reports each change of health
//! or of an MCP server's tools, restarts a container that stays unhealthy (with growing
//! waits) and stops it, reported crash-looping, once it has used its restarts.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use flotilla::proto::{ContainerEvent, Health, HealthStatus, McpServer, agent_message};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::{
    runtime::{
        Runtime,
        probe::{Target, probe},
    },
    wire::Wire,
};

/// The wait before the first restart for failed health; it doubles per restart.
const HEAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_HEAL_BACKOFF: Duration = Duration::from_secs(300);
/// Healthy this long, a container's restart count starts over.
const HEALTHY_RESETS_AFTER: Duration = Duration::from_secs(300);

/// The wait after the `n`th restart before another: 1 s, 2 s, 4 s, ... at most 5 min.
pub fn heal_backoff(n: u32) -> Duration {
    HEAL_BACKOFF.saturating_mul(1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX)).min(MAX_HEAL_BACKOFF)
}

/// Self-healing state of one container, kept across its restarts.
#[derive(Default)]
struct Healing {
    restarts: u32,
    next_allowed: Option<Instant>,
    healthy_since: Option<Instant>,
    given_up: bool,
}

/// One container's probe state.
#[derive(Clone)]
struct Tracked {
    /// The container's start: a restart begins its probing (and tool discovery) anew.
    started_at: Option<prost_types::Timestamp>,
    next_due: Instant,
    started: Instant,
    failures: u32,
    health: Health,
    server: Option<McpServer>,
}

/// Probes every running managed container that has a health check, and reports each
/// change of health (or of its tools) as a `ContainerEvent`.
pub(crate) struct Monitor {
    task: JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Monitor {
    pub(crate) fn start(runtime: Runtime, wire: Wire) -> Self {
        let mut watch = Watch { runtime, wire, tracked: HashMap::new(), healing: HashMap::new() };
        let task = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if watch.round().await.is_err() {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Self { task }
    }
}

/// The session closed: the monitor ends.
struct Closed;

/// The monitor's state across rounds.
struct Watch {
    runtime: Runtime,
    wire: Wire,
    tracked: HashMap<String, Tracked>,
    healing: HashMap<String, Healing>,
}

impl Watch {
    /// Probes each target that is due.
    async fn round(&mut self) -> Result<(), Closed> {
        let targets = match self.runtime.probe_targets().await {
            Ok(targets) => targets,
            Err(error) => {
                tracing::debug!("cannot list probe targets: {error}");
                return Ok(());
            }
        };
        self.tracked.retain(|id, _| targets.iter().any(|t| &t.container_id == id));
        self.healing.retain(|id, h| h.given_up || targets.iter().any(|t| &t.container_id == id));
        for target in targets {
            self.check(target).await?;
        }
        Ok(())
    }

    /// Probes one container if it is due; reports a change of health, restarts it or gives
    /// up on it.
    #[tracing::instrument(skip_all, fields(deployment_id = %target.status.deployment_id, container = %target.container_id))]
    async fn check(&mut self, target: Target) -> Result<(), Closed> {
        let now = Instant::now();
        let fresh = Tracked {
            started_at: target.status.started_at,
            next_due: now,
            started: now,
            failures: 0,
            health: Health::Starting,
            server: None,
        };
        let known = self.tracked.contains_key(&target.container_id);
        let state = self.tracked.entry(target.container_id.clone()).or_insert_with(|| fresh.clone());
        if !known || state.started_at != target.status.started_at {
            *state = fresh;
            // A container this monitor gave up on was left stopped: whoever
            // started it again (a `Start` or `Restart` command) asked for a
            // fresh set of restarts.
            if self.healing.get(&target.container_id).is_some_and(|h| h.given_up) {
                self.healing.remove(&target.container_id);
            }
        }
        if now < state.next_due {
            return Ok(());
        }
        let outcome = probe(&target).await;
        state.next_due = Instant::now() + target.probe.interval;
        let before = (state.health, state.server.clone());
        if outcome.ok {
            state.failures = 0;
            state.health = Health::Healthy;
            state.server = outcome.server;
        } else if state.started.elapsed() >= target.probe.start_period {
            state.failures += 1;
            if state.failures >= target.probe.threshold {
                state.health = Health::Unhealthy;
            }
        }
        let heal = self.healing.entry(target.container_id.clone()).or_default();
        if outcome.ok {
            let since = *heal.healthy_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= HEALTHY_RESETS_AFTER {
                heal.restarts = 0;
            }
        } else {
            heal.healthy_since = None;
        }
        if state.health == Health::Unhealthy && !heal.given_up {
            let deployment = target.status.deployment_id.parse::<uuid::Uuid>().ok();
            let why = format!("the health probe failed {} times in a row: {}", state.failures, outcome.detail);
            let (action, detail) = if heal.restarts >= target.probe.max_restarts {
                heal.given_up = true;
                ("crash_loop", format!("{why}; still unhealthy after {} restarts, left stopped", heal.restarts))
            } else if heal.next_allowed.is_none_or(|at| Instant::now() >= at) {
                heal.restarts += 1;
                heal.next_allowed = Some(Instant::now() + heal_backoff(heal.restarts));
                if let Some(deployment) = deployment
                    && let Err(error) = self.runtime.restart(deployment, Duration::from_secs(10)).await
                {
                    tracing::warn!("could not restart an unhealthy container: {error}");
                }
                ("restart", format!("{why}; restart {} of {}", heal.restarts, target.probe.max_restarts))
            } else {
                ("", String::new())
            };
            if !action.is_empty() {
                tracing::warn!("{detail}");
                let mut container = match deployment {
                    Some(d) => self.runtime.status(d).await.unwrap_or_else(|_| target.status.clone()),
                    None => target.status.clone(),
                };
                if action == "crash_loop" {
                    container.state = flotilla::proto::ContainerState::CrashLooping as i32;
                }
                container.health = Some(HealthStatus {
                    health: Health::Unhealthy as i32,
                    detail: outcome.detail.clone(),
                    latency: prost_types::Duration::try_from(outcome.latency).ok(),
                    checked_at: Some(std::time::SystemTime::now().into()),
                    consecutive_failures: state.failures,
                });
                let event = ContainerEvent {
                    container: Some(container),
                    action: action.into(),
                    exit_code: None,
                    at: Some(std::time::SystemTime::now().into()),
                    detail,
                };
                if self.wire.send(agent_message::Kind::ContainerEvent(event)).await.is_err() {
                    return Err(Closed);
                }
                // Stopped after the verdict went out: the control plane marks
                // the deployment failed before it sees the container stop, so
                // nothing starts it again.
                if action == "crash_loop"
                    && let Some(deployment) = deployment
                    && let Err(error) = self.runtime.stop(deployment, Duration::from_secs(10)).await
                {
                    tracing::warn!("could not stop a container that keeps failing: {error}");
                }
                return Ok(());
            }
        }
        if (state.health, state.server.clone()) == before {
            return Ok(());
        }
        let mut container = target.status;
        container.health = Some(HealthStatus {
            health: state.health as i32,
            detail: outcome.detail,
            latency: prost_types::Duration::try_from(outcome.latency).ok(),
            checked_at: Some(std::time::SystemTime::now().into()),
            consecutive_failures: state.failures,
        });
        container.mcp_server = state.server.clone();
        tracing::info!(health = ?state.health, "health changed");
        let event = ContainerEvent {
            container: Some(container),
            action: "health_status".into(),
            exit_code: None,
            at: Some(std::time::SystemTime::now().into()),
            detail: String::new(),
        };
        if self.wire.send(agent_message::Kind::ContainerEvent(event)).await.is_err() {
            return Err(Closed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healing_waits_longer_after_each_restart_up_to_five_minutes() {
        let waits: Vec<u64> = (1..=12).map(|n| heal_backoff(n).as_secs()).collect();
        assert_eq!(&waits[..5], &[2, 4, 8, 16, 32]);
        assert!(waits.iter().all(|w| *w <= 300));
        assert_eq!(heal_backoff(u32::MAX).as_secs(), 300);
    }
}
