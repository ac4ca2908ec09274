//! The `flotilla-agent` binary: parses the flags into an [`AgentConfig`], sets up tracing,
//! and runs the agent until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use flotilla_agent::{
    AgentConfig, Credentials, Enrollment, IdentitySource,
    config::AgentArgs,
    enroll::{self, Trust},
    identity::Store,
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    flotilla::telemetry::init();
    match run(AgentArgs::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let identity = if args.cert.is_some() || args.key.is_some() {
        let read = |path: std::path::PathBuf, what: &str| {
            std::fs::read_to_string(&path).with_context(|| format!("reading the {what} at {}", path.display()))
        };
        IdentitySource::Fixed(Credentials {
            cert_pem: read(args.cert_path(), "certificate")?,
            key_pem: read(args.key_path(), "key")?,
            ca_pem: read(args.ca_path(), "CA bundle")?,
        })
    } else {
        let enrollment = match &args.token {
            None => None,
            Some(token) => {
                let trust = if args.trust_system_roots {
                    Trust::SystemRoots
                } else {
                    let pin = args.ca_sha256.clone().or_else(|| enroll::pin_from_token(token)).context(
                        "the token carries no CA pin: give --ca-sha256, or --trust-system-roots for a publicly trusted control plane",
                    )?;
                    Trust::Pin(pin.to_ascii_lowercase())
                };
                Some(Enrollment { token: token.clone(), url: args.enroll_url()?, trust })
            }
        };
        IdentitySource::StateDir { store: Store::new(&args.state_dir), enrollment }
    };
    let config = AgentConfig {
        control_plane: args.control_plane,
        server_name: args.server_name,
        identity,
        docker_socket: args.docker_socket,
        disk_path: "/".into(),
        initial_backoff: args.initial_backoff,
        max_backoff: args.max_backoff,
        state_dir: Some(args.state_dir.clone()),
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal as unix_signal};
        match unix_signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("stopping");
        signal.cancel();
    });
    flotilla_agent::run(config, shutdown).await
}
