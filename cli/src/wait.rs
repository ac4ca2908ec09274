//! Waiting for a change to be carried out: the command to finish (`WaitCommand`), then
//! the container to run and, when it has a health check, to be healthy. A spinner (or a
//! progress bar while an image pulls) says what it waits for.

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use flotilla::proto::{
    CommandRecord, ContainerState, Deployment, Event, GetDeploymentRequest, Health, WaitCommandRequest,
    command_record::State,
};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::Streaming;

use crate::{
    connect::Fleet,
    exit::{Exit, Failure},
    output,
};

/// How long one `WaitCommand` call may block, so the spinner can say where the command is.
const WAIT_STEP: Duration = Duration::from_secs(5);
/// How often the deployment is read while its container comes up.
const POLL: Duration = Duration::from_millis(500);

/// Waits until command `id` is final. Succeeded is `Ok`; failed, expired and cancelled are
/// `Exit::Failed`; still going at `deadline` is `Exit::Timeout`.
pub async fn command(
    fleet: &mut Fleet,
    id: &str,
    deadline: Instant,
    progress: &Progress,
) -> anyhow::Result<CommandRecord> {
    loop {
        let step = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_secs(1), WAIT_STEP);
        let request = WaitCommandRequest { id: id.to_owned(), timeout: output::duration(step) };
        let record = fleet.wait_command(request).await?.into_inner();
        let state = output::word(record.state().as_str_name(), "STATE_");
        match record.state() {
            State::Succeeded => return Ok(record),
            State::Failed | State::Expired | State::Cancelled => {
                let why = if record.message.is_empty() { String::new() } else { format!(": {}", record.message) };
                return Err(Failure::of(Exit::Failed, format!("{} command {id} {state}{why}", record.kind)));
            }
            _ if Instant::now() >= deadline => {
                return Err(Failure::of(
                    Exit::Timeout,
                    format!("timed out: {} command {id} is still {state} (is the droplet online?)", record.kind),
                ));
            }
            State::Queued => progress.say(&format!("{}: queued until the droplet is connected", record.kind)),
            _ => progress.say(&format!("{}: {state} on the droplet", record.kind)),
        }
    }
}

/// Where a deployment's container is, as far as `deploy --wait` is concerned.
enum Verdict {
    Ready,
    /// Not yet; the words say what is awaited.
    Pending(String),
    /// It will not get there by itself.
    Broken(String),
}

fn verdict(deployment: &Deployment) -> Verdict {
    if deployment.failed {
        return Verdict::Broken(format!("deployment failed: {}", deployment.last_error));
    }
    let Some(container) = &deployment.container else {
        return Verdict::Pending("waiting for the droplet to report the container".into());
    };
    let health = container.health.as_ref();
    let state = output::word(container.state().as_str_name(), "CONTAINER_STATE_");
    match container.state() {
        ContainerState::CrashLooping | ContainerState::Dead | ContainerState::Removed => {
            return Verdict::Broken(format!("container {state}"));
        }
        ContainerState::Running => {}
        _ => return Verdict::Pending(format!("container {state}")),
    }
    if deployment.spec.as_ref().is_none_or(|s| s.health_check.is_none()) {
        return Verdict::Ready;
    }
    match health.map(|h| h.health()) {
        Some(Health::Healthy) => Verdict::Ready,
        Some(Health::Unhealthy) => Verdict::Pending(format!("unhealthy: {}", health.map_or("", |h| h.detail.as_str()))),
        _ => Verdict::Pending("running; waiting for the health check".into()),
    }
}

/// Polls deployment `id` until its container runs (and is healthy, when it has a health
/// check). At `deadline`, an unhealthy or exited container is `Exit::Failed`, anything
/// else `Exit::Timeout`.
pub async fn ready(fleet: &mut Fleet, id: &str, deadline: Instant, progress: &Progress) -> anyhow::Result<Deployment> {
    loop {
        let deployment = fleet.get_deployment(GetDeploymentRequest { id: id.to_owned() }).await?.into_inner();
        match verdict(&deployment) {
            Verdict::Ready => return Ok(deployment),
            Verdict::Broken(why) => return Err(Failure::of(Exit::Failed, format!("deployment {id}: {why}"))),
            Verdict::Pending(why) if Instant::now() >= deadline => {
                let exit =
                    if why.starts_with("unhealthy") || why.contains("exited") { Exit::Failed } else { Exit::Timeout };
                return Err(Failure::of(exit, format!("deployment {id} is not ready in time: {why}")));
            }
            Verdict::Pending(why) => progress.say(&why),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `work`, feeding `container.pull` events of deployment `id` from `events` to
/// `progress` meanwhile. Events are a nicety: a failed stream is dropped silently.
pub async fn with_pull_progress<T>(
    work: impl Future<Output = anyhow::Result<T>>,
    mut events: Option<Streaming<Event>>,
    id: &str,
    progress: &Progress,
) -> anyhow::Result<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            event = next(&mut events) => match event {
                Some(event) if event.deployment_id == id => progress.pull(&event.message),
                Some(_) => {}
                None => events = None,
            },
        }
    }
}

async fn next(events: &mut Option<Streaming<Event>>) -> Option<Event> {
    match events {
        Some(stream) => stream.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// A spinner on a terminal; plain lines on stderr otherwise (each new message once).
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    last: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Progress {
    pub fn new(first: &str) -> Self {
        let progress = Self { bar: None, last: Default::default() };
        if !std::io::stderr().is_terminal() {
            progress.say(first);
            return progress;
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(spinner());
        bar.enable_steady_tick(Duration::from_millis(100));
        bar.set_message(first.to_owned());
        Self { bar: Some(bar), ..progress }
    }

    pub fn say(&self, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_style(spinner());
                bar.set_message(message.to_owned());
            }
            None => {
                // The lock is never held across an await.
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                if *last != message {
                    eprintln!("{message}");
                    *last = message.to_owned();
                }
            }
        }
    }

    /// A pull event's message: `downloading: N of M bytes` moves the bar, others are said.
    pub fn pull(&self, message: &str) {
        match (download(message), &self.bar) {
            (Some((done, total)), Some(bar)) => {
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed:>3} pulling [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_length(total);
                bar.set_position(done);
            }
            // Without a terminal, byte counts would only flood the log.
            (Some(_), None) => {}
            (None, _) => self.say(message),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn spinner() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {elapsed:>3} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// `downloading: 1024 of 4096 bytes` → (1024, 4096), as the agent reports pulls.
fn download(message: &str) -> Option<(u64, u64)> {
    let rest = message.strip_prefix("downloading: ")?.strip_suffix(" bytes")?;
    let (done, total) = rest.split_once(" of ")?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use flotilla::proto::{ContainerStatus, DeploymentSpec, HealthCheck, HealthStatus};

    use super::*;

    #[test]
    fn download_lines_are_parsed() {
        assert_eq!(download("downloading: 1024 of 4096 bytes"), Some((1024, 4096)));
        assert_eq!(download("layer abc: pull complete"), None);
    }

    fn deployment(state: ContainerState, health: Option<Health>, checked: bool) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec { health_check: checked.then(HealthCheck::default), ..Default::default() }),
            container: Some(ContainerStatus {
                state: state as i32,
                health: health.map(|h| HealthStatus { health: h as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_means_running_and_healthy_when_checked() {
        assert!(matches!(verdict(&deployment(ContainerState::Running, None, false)), Verdict::Ready));
        assert!(matches!(verdict(&deployment(ContainerState::Running, None, true)), Verdict::Pending(_)));
        assert!(matches!(verdict(&deployment(ContainerState::Running, Some(Health::Healthy), true)), Verdict::Ready));
        assert!(matches!(verdict(&deployment(ContainerState::CrashLooping, None, true)), Verdict::Broken(_)));
        let failed = Deployment { failed: true, ..deployment(ContainerState::Exited, None, true) };
        assert!(matches!(verdict(&failed), Verdict::Broken(_)));
    }
}
