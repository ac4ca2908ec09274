//! The command line: global connection flags (with environment fallbacks), then one
//! subcommand per verb.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Operate a Flotilla fleet: droplets, deployments, logs and events",
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage or configuration, 3 unauthenticated or permission denied, \
                  4 not found, 5 invalid argument, 6 conflict or failed precondition, 7 unavailable or deadline \
                  exceeded, 8 the command or deployment failed, 9 timed out waiting."
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print the API's answers as proto3 JSON (streams: one object per line).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the control plane is and how to call it.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The control plane's API: https://HOST:PORT (TLS) or http://HOST:PORT (plaintext).
    #[arg(long, env = "FLOTILLA_URL", global = true)]
    pub url: Option<String>,
    /// An API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "FLOTILLA_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// A CA certificate (PEM) to trust besides the system's, e.g. the control plane's
    /// `<data-dir>/ca.crt`.
    #[arg(long, env = "FLOTILLA_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Droplets: the machines that run deployments.
    #[command(subcommand, visible_alias = "droplet")]
    Droplets(DropletsCommand),
    /// Run an image on a droplet and wait until it is running (and healthy).
    Deploy(DeployArgs),
    /// List deployments.
    Ps(PsArgs),
    /// Print a deployment as the API stores it (JSON).
    Inspect(Target),
    /// The MCP tools a deployment's server offers.
    Tools(Target),
    /// Start a stopped deployment.
    Start(StartArgs),
    /// Stop a deployment's container.
    Stop(StopArgs),
    /// Restart a deployment's container (also retries a crash-looped deployment).
    Restart(StopArgs),
    /// Remove a deployment and its container.
    Rm(RmArgs),
    /// A deployment's container output.
    Logs(LogsArgs),
    /// What happens in the fleet: commands, containers, pulls, health.
    Events(EventsArgs),
}

#[derive(Debug, Subcommand)]
pub enum DropletsCommand {
    /// List droplets.
    #[command(visible_alias = "list")]
    Ls(DropletsLs),
    /// Show one droplet.
    Get {
        /// The droplet's id.
        id: String,
    },
    /// Register a new droplet: prints its id, a one-time enrollment token and how to start
    /// its agent.
    Create(DropletsCreate),
    /// Delete a droplet: revokes its certificates and closes its session.
    #[command(visible_alias = "delete")]
    Rm {
        /// The droplet's id.
        id: String,
    },
    /// A new one-time token to (re-)enroll an existing droplet.
    Token(DropletsToken),
    /// Set (`key=value`) or remove (`key-`) droplet labels.
    Label {
        /// The droplet's id.
        id: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct DropletsLs {
    /// Only droplets in this status.
    #[arg(long, value_enum)]
    pub status: Option<Status>,
    /// Label requirements, comma-separated: `k=v`, `k!=v`, `k`, `!k`.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Only this account's droplets (admin keys; others see their own).
    #[arg(long)]
    pub account: Option<String>,
    /// Droplets asked for per call (the CLI pages through all of them).
    #[arg(long, default_value_t = 1000, hide = true)]
    pub page_size: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Status {
    Pending,
    Provisioning,
    Online,
    Unreachable,
    Offline,
    Error,
    Deleting,
}

/// How the printed install command starts the agent.
#[derive(Debug, Args)]
pub struct Install {
    /// The agent's image in the printed `docker run` command.
    #[arg(long, default_value = "flotilla-agent:latest")]
    pub agent_image: String,
    /// The control plane's agent port in the printed command. Default: the API's host,
    /// port 7443.
    #[arg(long)]
    pub agent_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct DropletsCreate {
    /// A name for operators (the token's).
    #[arg(long)]
    pub name: Option<String>,
    /// How long the token is valid (at most 24h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The account the droplet belongs to (admin keys).
    #[arg(long)]
    pub account: Option<String>,
    /// How the droplet is made: byo (an existing host: you run the printed line on it).
    #[arg(long, default_value = "byo")]
    pub provider: String,
    /// A label, `key=value` (repeatable).
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DropletsToken {
    /// The droplet's id.
    pub id: String,
    /// How long the token is valid (at most 24h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub install: Install,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The droplet to run on.
    #[arg(long)]
    pub droplet: String,
    /// The deployment's name.
    #[arg(long)]
    pub name: Option<String>,
    /// The image, e.g. registry.example.com/team/server:1.2.
    #[arg(long)]
    pub image: String,
    /// An environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A secret environment variable: encrypted at rest, masked in every answer (repeatable).
    #[arg(long = "secret", value_name = "KEY=VALUE")]
    pub secrets: Vec<String>,
    /// Publish a port (repeatable): [IP:][HOST:]CONTAINER[/udp].
    #[arg(long = "port", short = 'p', value_name = "HOST:CONTAINER")]
    pub ports: Vec<String>,
    /// A named volume (repeatable): NAME:PATH[:ro].
    #[arg(long = "volume", short = 'v', value_name = "NAME:PATH")]
    pub volumes: Vec<String>,
    /// The container port of the MCP server (streamable HTTP).
    #[arg(long)]
    pub mcp_port: Option<u32>,
    /// The MCP endpoint's path.
    #[arg(long, default_value = "/mcp", requires = "mcp_port")]
    pub mcp_path: String,
    /// The health check: mcp, http:[PORT]/PATH, docker or none. Default: mcp with
    /// --mcp-port, else none.
    #[arg(long, value_name = "CHECK")]
    pub health: Option<String>,
    /// When to pull the image.
    #[arg(long, value_enum)]
    pub pull: Option<Pull>,
    /// Retrying with the same key never deploys twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Arguments for the image's entrypoint (replace its CMD), after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Pull {
    Never,
    IfNotPresent,
    Always,
}

/// Whether and how long to wait for a change to be carried out.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Wait until the droplet carried the change out (deploy waits by default).
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,
    /// Return as soon as the change is recorded.
    #[arg(long, overrides_with = "wait")]
    pub no_wait: bool,
    /// How long to wait.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only this droplet's deployments.
    #[arg(long)]
    pub droplet: Option<String>,
    /// Include removed deployments.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Only this account's deployments (admin keys; others see their own).
    #[arg(long)]
    pub account: Option<String>,
    /// Deployments asked for per call (the CLI pages through all of them).
    #[arg(long, default_value_t = 1000, hide = true)]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct Target {
    /// The deployment's id.
    pub deployment: String,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The deployment's id.
    pub deployment: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The deployment's id.
    pub deployment: String,
    /// Between SIGTERM and SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<Duration>,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The deployment's id.
    pub deployment: String,
    /// Also remove the deployment's named volumes (their data is lost).
    #[arg(long)]
    pub volumes: bool,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// What every lifecycle verb takes.
#[derive(Debug, Clone, Args)]
pub struct ChangeArgs {
    /// Retrying with the same key never issues the command twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The deployment's id.
    pub deployment: String,
    /// Keep printing new output until the container exits.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines (default: all the droplet has).
    #[arg(long, short = 'n')]
    pub tail: Option<u32>,
    /// Only output since then: a duration back from now (10m, 2h) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen (from now on, unless --from-oldest or
    /// --since-cursor say otherwise). Without it: the events kept so far.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only this droplet's events.
    #[arg(long)]
    pub droplet: Option<String>,
    /// Only this deployment's events.
    #[arg(long)]
    pub deployment: Option<String>,
    /// Only events of this kind (repeatable); `container.*` matches a prefix.
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// Only this account's events (admin keys; others see their own).
    #[arg(long)]
    pub account: Option<String>,
    /// Go on after this event (an earlier event's `cursor`, from --json).
    #[arg(long, conflicts_with = "from_oldest")]
    pub since_cursor: Option<String>,
    /// Start from the oldest event kept.
    #[arg(long)]
    pub from_oldest: bool,
}
