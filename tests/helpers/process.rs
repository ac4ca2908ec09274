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
use flotilla::proto::fleet_client::FleetClient;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

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
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    child: Child,
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlaneProcess {
    /// Starts `flotilla-control-plane serve` on `db` with `master_key` (hex), with the
    /// tests' fast clocks, and waits until its API answers.
    pub async fn start(db: &TestDb, master_key: &str) -> anyhow::Result<Self> {
        let base = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
        let (server, _) = base.rsplit_once('/').context("DATABASE_URL has no database name")?;
        let url = format!("{server}/{}", db.name);
        let (agent_addr, enroll_addr, api_addr) = (free_addr()?, free_addr()?, free_addr()?);
        let data_dir = temp_dir("flotilla-cp-process");
        let log = std::fs::File::create(data_dir.join("control-plane.log"))?;
        let child = Command::new(binary()?)
            .arg("serve")
            .args(["--agent-listen", &agent_addr.to_string()])
            .args(["--enroll-listen", &enroll_addr.to_string()])
            .args(["--api-listen", &api_addr.to_string()])
            .args(["--data-dir", &data_dir.display().to_string()])
            .args(["--heartbeat-interval", "200ms", "--flush-interval", "500ms", "--reconnect-grace", "30s"])
            .args(["--reconcile-interval", "1s", "--shutdown-grace", "3s"])
            .env("DATABASE_URL", url)
            .env("FLOTILLA_MASTER_KEY", master_key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting flotilla-control-plane")?;
        let mut process = Self { agent_addr, api_addr, data_dir, child };
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while process.fleet().await.is_err() {
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!("the control-plane process exited ({status}):\n{}", process.log());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the control plane did not serve in 30 s:\n{}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(process)
    }

    pub async fn fleet(&self) -> anyhow::Result<FleetClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.api_addr))?.connect().await?;
        Ok(FleetClient::new(channel))
    }

    /// SIGKILL: no goodbye, no clean-up, as when a machine dies.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("control-plane.log")).unwrap_or_default()
    }
}

/// A TCP balancer on loopback: each connection goes to the first backend that accepts
/// it, as a load balancer with health checks would send it.
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                tokio::spawn(async move {
                    for backend in backends {
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
