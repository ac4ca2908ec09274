//! `flotilla`: the operator's command line over the control plane's `flotilla.v1.Fleet`
//! gRPC API. Human tables by default, proto3 JSON with `--json`, and exit codes that
//! scripts can rely on (see `exit.rs`).

mod args;
mod connect;
mod deployments;
mod droplets;
mod events;
mod exit;
mod logs;
mod output;
mod wait;

use std::process::ExitCode;

use clap::Parser as _;

use crate::{
    args::{Cli, Command},
    deployments::Verb,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotilla: cannot start the async runtime: {error}");
            return ExitCode::from(exit::Exit::Error as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let (code, message) = exit::describe(&error);
            if !message.is_empty() {
                eprintln!("flotilla: {message}");
            }
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = output::Output { json: cli.json };
    let mut fleet = connect::fleet(&cli.connection).await?;
    match cli.command {
        Command::Droplets(command) => droplets::run(&mut fleet, out, &cli.connection, command).await,
        Command::Deploy(deploy) => deployments::deploy(&mut fleet, out, deploy).await,
        Command::Ps(ps) => deployments::ps(&mut fleet, out, ps).await,
        Command::Inspect(target) => deployments::inspect(&mut fleet, target).await,
        Command::Tools(target) => deployments::tools(&mut fleet, out, target).await,
        Command::Start(a) => deployments::change(&mut fleet, out, a.deployment, Verb::Start, a.change).await,
        Command::Stop(a) => deployments::change(&mut fleet, out, a.deployment, Verb::Stop(a.grace), a.change).await,
        Command::Restart(a) => {
            deployments::change(&mut fleet, out, a.deployment, Verb::Restart(a.grace), a.change).await
        }
        Command::Rm(a) => {
            let verb = Verb::Remove { volumes: a.volumes };
            deployments::change(&mut fleet, out, a.deployment, verb, a.change).await
        }
        Command::Logs(logs) => logs::run(&mut fleet, out, logs).await,
        Command::Events(watch) => events::run(&mut fleet, out, watch).await,
    }
}
