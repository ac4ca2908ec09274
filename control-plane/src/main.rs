use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use flotilla_control_plane::{
    Listeners, ServeConfig,
    config::{CaCommand, Cli, Command, ServeArgs},
    pki::{self, Ca},
    serve, server, store,
};
use time::OffsetDateTime;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    flotilla::telemetry::init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => run_serve(args).await,
        Command::Ca(CaCommand::Init {
            data_dir,
            public_names,
        }) => {
            let (ca, created) = Ca::load_or_create(&data_dir)?;
            let server = ca.issue_server(
                &server::server_names(&public_names),
                server::SERVER_CERT_VALIDITY,
            )?;
            pki::write_pair(&data_dir, "server", &server)?;
            let verb = if created {
                "created"
            } else {
                "kept the existing"
            };
            println!(
                "{verb} CA in {}\nCA sha256: {}",
                data_dir.display(),
                ca.sha256_pin()
            );
            Ok(())
        }
        Command::Ca(CaCommand::IssueAgent {
            data_dir,
            droplet,
            out,
            valid_for,
        }) => {
            let ca = Ca::load(&data_dir).with_context(|| {
                format!(
                    "no CA in {}: run `flotilla-control-plane ca init` first",
                    data_dir.display()
                )
            })?;
            let now = OffsetDateTime::now_utc();
            let issued = ca.issue_agent(droplet, now - pki::BACKDATE, now + valid_for)?;
            pki::write_pair(&out, "agent", &issued)?;
            std::fs::write(out.join("ca.crt"), ca.cert_pem()).context("writing ca.crt")?;
            println!(
                "wrote agent.crt, agent.key and ca.crt for droplet {droplet} to {}",
                out.display()
            );
            Ok(())
        }
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let agent = TcpListener::bind(args.agent_listen)
        .await
        .with_context(|| format!("binding the agent port {}", args.agent_listen))?;
    let api = TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding the API port {}", args.api_listen))?;
    let db = store::connect(&args.database_url, args.database_connections).await?;
    let config = ServeConfig {
        data_dir: args.data_dir,
        public_names: args.public_names,
        timing: args.timing,
    };
    serve(db, config, Listeners { agent, api }, shutdown_signal()).await
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
}
