//! A real image registry on loopback (Debian's `docker-registry`, the CNCF distribution
//! registry), optionally behind basic auth, that the tests push images to and the Docker
//! engine pulls from. Docker trusts registries on 127.0.0.0/8 without TLS.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use super::{temp_dir, wait_for};

pub struct Registry {
    /// `127.0.0.1:<port>`, the image name prefix.
    pub addr: String,
    /// Basic-auth user and password, when the registry requires them.
    pub credentials: Option<(String, String)>,
    child: Child,
    dir: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Registry {
    /// Starts a registry on a free loopback port; with `credentials`, every request needs
    /// them (htpasswd, bcrypt, as the registry requires).
    pub async fn start(credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let binary = which("docker-registry").context(
            "docker-registry is not installed: scripts/test.sh installs it (Debian package docker-registry)",
        )?;
        let dir = temp_dir("flotilla-registry");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((user, password)) = credentials {
            which("htpasswd").context("htpasswd is not installed: scripts/test.sh installs it (apache2-utils)")?;
            let line = run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
            std::fs::write(dir.join("htpasswd"), line)?;
            auth =
                format!("auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n", dir.join("htpasswd").display());
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    \
             enabled: true\nhttp:\n  addr: {addr}\n{auth}",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new(binary)
            .args(["serve", &dir.join("config.yml").display().to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = Self {
            addr: addr.clone(),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            child,
            dir,
        };
        wait_for("the registry to answer", Duration::from_secs(30), || async {
            Ok(std::net::TcpStream::connect(&addr).is_ok())
        })
        .await
        .with_context(|| {
            std::fs::read_to_string(registry.dir.join("registry.log")).unwrap_or_else(|e| format!("no log: {e}"))
        })?;
        Ok(registry)
    }

    /// Pushes local image `local` here as `<addr>/<name>`, then removes that tag from the
    /// engine, so a deployment of it must pull. Returns the pushed reference.
    pub fn push(&self, local: &str, name: &str) -> anyhow::Result<String> {
        let reference = format!("{}/{name}", self.addr);
        // A Docker client configuration of its own: the login stays out of the host's.
        let config = self.dir.join("docker-config");
        std::fs::create_dir_all(&config)?;
        let config = config.display().to_string();
        if let Some((user, password)) = &self.credentials {
            let mut login = Command::new("docker")
                .args(["--config", &config, "login", "--username", user, "--password-stdin", &self.addr])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            use std::io::Write as _;
            login.stdin.take().context("docker login's stdin")?.write_all(password.as_bytes())?;
            let out = login.wait_with_output()?;
            anyhow::ensure!(out.status.success(), "docker login: {}", String::from_utf8_lossy(&out.stderr));
        }
        run(Command::new("docker").args(["tag", local, &reference]))?;
        run(Command::new("docker").args(["--config", &config, "push", &reference]))?;
        run(Command::new("docker").args(["rmi", &reference]))?;
        if local.starts_with("flotilla-test/unique:") {
            run(Command::new("docker").args(["rmi", local]))?;
        }
        Ok(reference)
    }
}

/// A new image: `base` plus one layer no other image has, so pulling it downloads a
/// layer for real. Returns its local name.
pub fn unique_image(base: &str) -> anyhow::Result<String> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("flotilla-test/unique:{tag}");
    let id = run(Command::new("docker").args(["create", base]))?.trim().to_owned();
    let file = temp_dir("flotilla-layer").join("unique");
    std::fs::write(&file, format!("{tag}\n").repeat(4096))?;
    let copied = run(Command::new("docker").args(["cp", &file.display().to_string(), &format!("{id}:/unique")]));
    let committed = copied.and_then(|_| run(Command::new("docker").args(["commit", &id, &name])));
    let _ = run(Command::new("docker").args(["rm", "-f", &id]));
    committed?;
    Ok(name)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| PathBuf::from(dir).join(program)).find(|p| p.is_file())
}
