//! Control planes and agents as real processes (the `flotilla-control-plane` and
//! `flotilla-agent` binaries), so a test can kill one with SIGKILL; a TCP balancer in front
//! of control planes, as agents would have in production; and a gate that can stop what an
//! agent sends from reaching its control plane.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

use super::{TestDb, temp_dir};

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The binary `name` beside the test binary (target/debug/): `cargo build --workspace --bins`
/// builds it (scripts/test.sh does, before the tests). Cargo's `CARGO_BIN_EXE_<name>` only
/// names binaries of the test's own package, and these belong to other packages.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|deps| deps.parent()).context("the test binary's directory")?;
    let binary = dir.join(name);
    anyhow::ensure!(
        binary.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        binary.display()
    );
    Ok(binary)
}

/// A child process, SIGKILLed when dropped.
struct Running(Option<Child>);

impl Running {
    /// SIGKILL, then reaps it.
    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.kill();
    }
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
    child: Running,
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
            admin_key: super::api_key(&db.pool, "default", flotilla_control_plane::api::auth::Scope::Admin).await?,
            child: Running(None),
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
        let child = Command::new(binary("flotilla-control-plane")?)
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
        self.child = Running(Some(child));
        Ok(())
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        // An answered call, not only a connection: the process binds its ports before the
        // server starts (and writes its replica id).
        while !self.serving().await {
            if let Some(status) = self.child.0.as_mut().map(Child::try_wait).transpose()?.flatten() {
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

    async fn serving(&self) -> bool {
        let request = flotilla::proto::ListDropletsRequest::default();
        match self.fleet().await {
            Ok(mut fleet) => fleet.list_droplets(request).await.is_ok(),
            Err(_) => false,
        }
    }

    pub async fn fleet(&self) -> anyhow::Result<super::Fleet> {
        super::fleet_client(self.api_addr, &self.admin_key).await
    }

    /// SIGKILL: no goodbye, no clean-up, as when a machine dies.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()
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

/// A `flotilla-agent` process keeping its identity and its record of applied commands in
/// `state_dir`, as on a droplet. Its log is `agent.log` in the state dir, kept across
/// starts.
pub struct AgentProcess {
    pub state_dir: PathBuf,
    child: Running,
}

impl AgentProcess {
    /// Starts the agent dialling `control_plane` (a URL) with this machine's Docker engine
    /// and short reconnect back-offs. With `token` it enrolls at `enroll_url` when the state
    /// dir holds no identity, trusting the CA pin the token carries.
    pub fn start(control_plane: &str, enroll_url: &str, state_dir: &Path, token: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(state_dir.join("agent.log"))?;
        writeln!(log, "---- flotilla-agent starts{} ----", if token.is_some() { ", with a token" } else { "" })?;
        let mut command = Command::new(binary("flotilla-agent")?);
        command
            .args(["--control-plane", control_plane, "--enroll-url", enroll_url])
            .args(["--state-dir", &state_dir.display().to_string()])
            .args(["--docker-socket", "/var/run/docker.sock"])
            .args(["--initial-backoff", "100ms", "--max-backoff", "1s"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("FLOTILLA_TOKEN")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let child = command.spawn().context("starting flotilla-agent")?;
        Ok(Self { state_dir: state_dir.to_owned(), child: Running(Some(child)) })
    }

    /// SIGKILL: no goodbye, nothing flushed or reported, as when a droplet loses power.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()
    }

    /// Everything the agent logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }
}

/// A TCP proxy on loopback in front of `upstream` that can hold what its clients send:
/// once held, a connection keeps reading from its client but forwards nothing more
/// upstream (the bytes are dropped), while what the upstream sends still reaches the
/// client. So an agent behind it receives commands and applies them, and its
/// acknowledgements, results and heartbeats never arrive.
pub struct Gate {
    pub addr: SocketAddr,
    hold: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Aborting the accept loop drops its `JoinSet`, which aborts every connection.
        self.task.abort();
    }
}

impl Gate {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hold = Arc::new(AtomicBool::new(false));
        let held = hold.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(relay(client, upstream, held.clone()));
            }
        });
        Ok(Self { addr, hold, task })
    }

    /// From now on, what clients send goes nowhere, on open connections and new ones. A
    /// connection held once stays held until one side closes it.
    pub fn hold_upstream(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// New connections are forwarded both ways again.
    pub fn open(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }
}

/// One connection through a [`Gate`]. When either side closes, both are closed: what was
/// held is dropped with the connection, never delivered late.
async fn relay(client: TcpStream, upstream: SocketAddr, hold: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut held = false;
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            held |= hold.load(Ordering::SeqCst);
            if !held && to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
