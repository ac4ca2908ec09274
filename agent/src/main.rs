use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use flotilla_agent::{AgentConfig, Credentials, config::AgentArgs};
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
    let read = |path: std::path::PathBuf, what: &str| {
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading the {what} at {}: give it with --{what} or put it in --state-dir",
                path.display()
            )
        })
    };
    let credentials = Credentials {
        cert_pem: read(args.cert_path(), "cert")?,
        key_pem: read(args.key_path(), "key")?,
        ca_pem: read(args.ca_path(), "ca")?,
    };
    let config = AgentConfig {
        control_plane: args.control_plane,
        server_name: args.server_name,
        credentials,
        docker_socket: args.docker_socket,
        disk_path: "/".into(),
        initial_backoff: args.initial_backoff,
        max_backoff: args.max_backoff,
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
