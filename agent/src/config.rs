//! The agent's configuration: the command line (flags with environment fallbacks), and
//! [`AgentConfig`], what a running agent is built from (by `main`, or by a test).

use std::{path::PathBuf, time::Duration};

use clap::Parser;

use crate::{
    enroll::Trust,
    identity::{Credentials, Store},
};

#[derive(Debug, Clone, Parser)]
#[command(name = "flotilla-agent", version, about = "The Flotilla agent: one per droplet")]
pub struct AgentArgs {
    /// The control plane's agent port, e.g. https://cp.example.com:7443.
    #[arg(long, env = "FLOTILLA_CONTROL_PLANE")]
    pub control_plane: String,
    /// The droplet's client certificate (PEM). Default: <state-dir>/agent.crt.
    #[arg(long, env = "FLOTILLA_CERT")]
    pub cert: Option<PathBuf>,
    /// The droplet's private key (PEM). Default: <state-dir>/agent.key.
    #[arg(long, env = "FLOTILLA_KEY")]
    pub key: Option<PathBuf>,
    /// The fleet CA the control plane's certificate must chain to. Default: <state-dir>/ca.crt.
    #[arg(long, env = "FLOTILLA_CA")]
    pub ca: Option<PathBuf>,
    /// A one-time enrollment token, used when the state dir holds no valid certificate.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// SHA-256 of the fleet CA certificate (hex). Default: the pin inside the token.
    #[arg(long, env = "FLOTILLA_CA_SHA256")]
    pub ca_sha256: Option<String>,
    /// Trust the system's root certificates instead of a pin, for a control plane whose
    /// enrollment port has a publicly trusted certificate.
    #[arg(long, env = "FLOTILLA_TRUST_SYSTEM_ROOTS")]
    pub trust_system_roots: bool,
    /// The enrollment port. Default: the control plane's host, port 7444.
    #[arg(long, env = "FLOTILLA_ENROLL_URL")]
    pub enroll_url: Option<String>,
    /// The name to verify in the control plane's certificate. Default: the URL's host.
    #[arg(long, env = "FLOTILLA_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Where the agent keeps its credentials and records.
    #[arg(long, env = "FLOTILLA_STATE_DIR", default_value = "/var/lib/flotilla-agent")]
    pub state_dir: PathBuf,
    /// The local Docker engine's socket.
    #[arg(long, env = "FLOTILLA_DOCKER_SOCKET", default_value = "/var/run/docker.sock")]
    pub docker_socket: String,
    /// First reconnect delay ceiling; it doubles per failure up to --max-backoff.
    #[arg(long, env = "FLOTILLA_INITIAL_BACKOFF", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub initial_backoff: Duration,
    #[arg(long, env = "FLOTILLA_MAX_BACKOFF", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
}

impl AgentArgs {
    /// The enrollment URL: as given, or the control plane's host on port 7444.
    pub fn enroll_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.enroll_url {
            return Ok(url.clone());
        }
        let uri: http::Uri = self.control_plane.parse()?;
        let host = uri.host().ok_or_else(|| anyhow::anyhow!("--control-plane has no host"))?;
        Ok(format!("https://{host}:7444"))
    }

    pub fn cert_path(&self) -> PathBuf {
        self.cert.clone().unwrap_or_else(|| self.state_dir.join("agent.crt"))
    }

    pub fn key_path(&self) -> PathBuf {
        self.key.clone().unwrap_or_else(|| self.state_dir.join("agent.key"))
    }

    pub fn ca_path(&self) -> PathBuf {
        self.ca.clone().unwrap_or_else(|| self.state_dir.join("ca.crt"))
    }
}

/// Where the agent's credentials come from.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// Fixed credentials (`--cert`/`--key`, tests): used as they are, never renewed.
    Fixed(Credentials),
    /// The state dir: enroll with a token when it holds no valid certificate, renew over
    /// the session, persist every change.
    StateDir { store: Store, enrollment: Option<Enrollment> },
}

/// How to enroll when the state dir has no valid certificate.
#[derive(Clone)]
pub struct Enrollment {
    pub token: String,
    pub url: String,
    pub trust: Trust,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Enrollment").field("url", &self.url).field("trust", &self.trust).finish_non_exhaustive()
    }
}

/// Everything a running agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    pub control_plane: String,
    pub server_name: Option<String>,
    pub identity: IdentitySource,
    pub docker_socket: String,
    pub disk_path: std::path::PathBuf,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Where the record of applied commands is kept (`commands.log`); `None` keeps it in
    /// memory only, which loses it when the agent restarts.
    pub state_dir: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_default_to_the_state_dir() -> Result<(), clap::Error> {
        let args =
            AgentArgs::try_parse_from(["flotilla-agent", "--control-plane", "https://cp:7443", "--state-dir", "/s"])?;
        assert_eq!(args.cert_path(), PathBuf::from("/s/agent.crt"));
        assert_eq!(args.key_path(), PathBuf::from("/s/agent.key"));
        assert_eq!(args.ca_path(), PathBuf::from("/s/ca.crt"));
        assert_eq!(args.docker_socket, "/var/run/docker.sock");
        assert_eq!(args.initial_backoff, Duration::from_millis(500));
        assert_eq!(args.max_backoff, Duration::from_secs(60));
        assert_eq!(args.enroll_url().expect("url"), "https://cp:7444");
        assert!(!args.trust_system_roots && args.token.is_none());
        Ok(())
    }

    #[test]
    fn the_control_plane_is_required_and_named_when_missing() {
        let err = AgentArgs::try_parse_from(["flotilla-agent"]).expect_err("required");
        assert!(err.to_string().contains("--control-plane"), "{err}");
        let err = AgentArgs::try_parse_from(["flotilla-agent", "--control-plane", "x", "--max-backoff", "forever"])
            .expect_err("not a duration");
        assert!(err.to_string().contains("--max-backoff"), "{err}");
    }
}
