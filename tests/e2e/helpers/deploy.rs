//! Deployments end to end: a control plane, one connected droplet whose agent uses this
//! machine's Docker engine, and what the deployment tests share.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{
        ContainerState, CreateDeploymentRequest, Deployment, DeploymentSpec, DropletStatus, EnvVar,
        GetDeploymentRequest, Health, McpEndpoint, deployment_spec::PullPolicy,
    },
};

use super::{TestAgent, TestControlPlane, TestDb, wait_for};

pub const WITHIN: Duration = Duration::from_secs(60);
pub const IMAGE: &str = "flotilla-test/mcp-server:latest";

pub fn test_server_spec() -> DeploymentSpec {
    DeploymentSpec {
        image: IMAGE.into(),
        pull_policy: PullPolicy::Never as i32,
        env: vec![
            EnvVar { name: "PORT".into(), value: "8080".into(), secret: false },
            EnvVar { name: "API_TOKEN".into(), value: "s3cret-value".into(), secret: true },
        ],
        mcp: Some(McpEndpoint { port: 8080, path: "/mcp".into() }),
        ..Default::default()
    }
}

/// Removes a droplet's containers and network however the test ends.
pub struct Cleanup(pub DropletId);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let out = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=dev.flotilla.droplet={}", self.0)])
            .output();
        if let Ok(out) = out {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker").args(["rm", "-f", "-v", id]).output();
            }
        }
        let _ = std::process::Command::new("docker").args(["network", "rm", &format!("flotilla-{}", self.0)]).output();
    }
}

/// A control plane and one connected droplet whose agent uses this machine's engine.
pub struct Online {
    pub db: TestDb,
    pub cp: TestControlPlane,
    pub droplet: DropletId,
    pub agent: TestAgent,
    pub _cleanup: Cleanup,
}

impl Online {
    pub async fn start() -> anyhow::Result<Self> {
        let db = TestDb::new().await?;
        let cp = TestControlPlane::builder(&db.pool).start().await?;
        let droplet = DropletId::new();
        let _cleanup = Cleanup(droplet);
        let agent = cp.agent(droplet).await?;
        cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
        Ok(Self { db, cp, droplet, agent, _cleanup })
    }
}

pub async fn deployment(cp: &TestControlPlane, id: &str) -> anyhow::Result<Deployment> {
    Ok(cp.fleet().await?.get_deployment(GetDeploymentRequest { id: id.into() }).await?.into_inner())
}

pub fn docker_inspect(id: &str, format: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker").args(["inspect", "-f", format, id]).output()?;
    anyhow::ensure!(out.status.success(), "docker inspect: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

pub async fn deploy_and_wait_healthy(
    cp: &TestControlPlane,
    droplet: DropletId,
    spec: DeploymentSpec,
) -> anyhow::Result<Deployment> {
    let created = create(cp, droplet, spec).await?;
    wait_for("the deployment to be healthy", WITHIN, || async {
        let d = deployment(cp, &created.id).await?;
        Ok(d.container.and_then(|c| c.health).is_some_and(|h| h.health() == Health::Healthy))
    })
    .await?;
    deployment(cp, &created.id).await
}

pub fn seconds(n: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_secs(n)).ok()
}

/// `spec` with these plain env vars added.
pub fn with_env(mut spec: DeploymentSpec, vars: &[(&str, &str)]) -> DeploymentSpec {
    for (name, value) in vars {
        spec.env.push(EnvVar { name: (*name).into(), value: (*value).into(), secret: false });
    }
    spec
}

/// Creates a deployment through the API.
pub async fn create(cp: &TestControlPlane, droplet: DropletId, spec: DeploymentSpec) -> anyhow::Result<Deployment> {
    let request = CreateDeploymentRequest {
        droplet_id: droplet.to_string(),
        name: String::new(),
        spec: Some(spec),
        options: None,
        validate_only: false,
    };
    Ok(cp.fleet().await?.create_deployment(request).await?.into_inner())
}

/// Waits until the stored container of deployment `id` is in `state`.
pub async fn wait_state(cp: &TestControlPlane, id: &str, state: ContainerState) -> anyhow::Result<Deployment> {
    wait_for(&format!("the container to be {state:?}"), WITHIN, || async {
        Ok(deployment(cp, id).await?.container.is_some_and(|c| c.state() == state))
    })
    .await?;
    deployment(cp, id).await
}

/// The ids of every container labelled with `droplet`, running or not.
pub fn docker_ids(droplet: DropletId) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label=dev.flotilla.droplet={droplet}")])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
}

/// Docker's event stream, followed from now on by `docker events` (Docker's own history
/// keeps only the last few hundred events, too few to count on a busy engine).
pub struct DockerEvents {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl DockerEvents {
    /// Follows the events matching `filters` (`docker events --filter` values), each
    /// line formatted by `format` (a Go template).
    pub fn follow(filters: &[&str], format: &str) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let mut command = std::process::Command::new("docker");
        command.arg("events");
        for filter in filters {
            command.args(["--filter", filter]);
        }
        let mut child = command
            .args(["--format", format])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or(anyhow::anyhow!("docker events has no stdout"))?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        // `docker events` subscribes before it prints anything; give it a moment.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self { child, lines })
    }

    /// The lines seen so far (after a moment for the last ones to arrive).
    pub fn seen(&self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(500));
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for DockerEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
