//! Control planes as real processes (the `flotilla-control-plane` binary), so a test can
//! kill one with SIGKILL, and a TCP balancer in front of them, as agents would have in
//! production.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{TestDb, temp_dir};

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The control-plane binary beside the test binary: `cargo build --bins` builds it
/// (scripts/test.sh does, before the tests).
fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|deps| deps.parent()).context("the test binary's directory")?;
    let binary = dir.join("flotilla-control-plane");
    anyhow::ensure!(
        binary.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        binary.display()
    );
    Ok(binary)
}

pub struct ControlPlaneProcess {
    pub agent_addr: SocketAddr,
    pub enroll_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    database_url: String,
    master_key: String,
    /// An admin key of the `default` account.
    pub admin_key: String,
    child: Option<Child>,
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

impl ControlPlaneProcess {
    /// Starts `flotilla-control-plane serve` on `db` with `master_key` (hex), with the
    /// tests' fast clocks, and waits until its API answers.
    pub async fn start(db: &TestDb, master_key: &str) -> anyhow::Result<Self> {
        let base = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
        let (server, _) = base.rsplit_once('/').context("DATABASE_URL has no database name")?;
        let mut process = Self {
            agent_addr: free_addr()?,
            enroll_addr: free_addr()?,
            api_addr: free_addr()?,
            data_dir: temp_dir("flotilla-cp-process"),
            database_url: format!("{server}/{}", db.name),
            master_key: master_key.to_owned(),
            admin_key: super::api_key(&db.pool, "default", flotilla_control_plane::auth::Scope::Admin).await?,
            child: None,
        };
        process.restart().await?;
        Ok(process)
    }

    /// Starts the process again (the same replica, ports and data dir) and waits until it
    /// serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.respawn()?;
        self.ready().await
    }

    /// Kills the process if it runs and starts it again, without waiting.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.join("control-plane.log"))?;
        let child = Command::new(binary()?)
            .arg("serve")
            .args(["--agent-listen", &self.agent_addr.to_string()])
            .args(["--enroll-listen", &self.enroll_addr.to_string()])
            .args(["--api-listen", &self.api_addr.to_string(), "--api-plaintext"])
            .args(["--data-dir", &self.data_dir.display().to_string()])
            .args(["--heartbeat-interval", "200ms", "--flush-interval", "500ms", "--reconnect-grace", "30s"])
            .args(["--reconcile-interval", "1s", "--shutdown-grace", "3s"])
            .env("DATABASE_URL", &self.database_url)
            .env("FLOTILLA_MASTER_KEY", &self.master_key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting flotilla-control-plane")?;
        self.child = Some(child);
        Ok(())
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.fleet().await.is_err() {
            if let Some(status) = self.child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                anyhow::bail!("the control-plane process exited ({status}):\n{}", self.log());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the control plane did not serve in 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub async fn fleet(&self) -> anyhow::Result<super::Fleet> {
        super::fleet_client(self.api_addr, &self.admin_key).await
    }

    /// SIGKILL: no goodbye, no clean-up, as when a machine dies.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("control-plane.log")).unwrap_or_default()
    }
}

/// A TCP balancer on loopback: each connection goes to the first backend that accepts
/// it, starting from the next one in turn, as a round-robin load balancer with health
/// checks would send it. With `prefer_first`, always starting from the first.
pub struct Balancer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        Self::with(backends, true).await
    }

    pub async fn round_robin(backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        Self::with(backends, false).await
    }

    async fn with(backends: Vec<SocketAddr>, prefer_first: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut turn = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let mut order = backends.clone();
                if !prefer_first && !order.is_empty() {
                    let first = turn % order.len();
                    order.rotate_left(first);
                    turn += 1;
                }
                tokio::spawn(async move {
                    for backend in order {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }
}
