//! Command-line configuration, with environment fallbacks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use flotilla::DropletId;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-control-plane",
    version,
    about = "The Flotilla control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the agent port and the fleet API.
    Serve(ServeArgs),
    /// Manage the fleet's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA and the control plane's server certificate in the data directory.
    Init {
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
        /// A DNS name or IP address agents use to reach the control plane (repeatable).
        #[arg(long = "public-name")]
        public_names: Vec<String>,
    },
    /// Write a client certificate for one droplet (agent.crt, agent.key, ca.crt).
    IssueAgent {
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long)]
        droplet: DropletId,
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Where agents connect (mutual TLS).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN", default_value = "0.0.0.0:7443")]
    pub agent_listen: SocketAddr,
    /// The fleet API (gRPC). Plaintext and unauthenticated for now, so loopback by default.
    #[arg(long, env = "FLOTILLA_API_LISTEN", default_value = "127.0.0.1:7080")]
    pub api_listen: SocketAddr,
    /// Holds the CA and the server certificate.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "/var/lib/flotilla")]
    pub data_dir: PathBuf,
    /// A DNS name or IP address agents use to reach the control plane (repeatable).
    #[arg(
        long = "public-name",
        env = "FLOTILLA_PUBLIC_NAMES",
        value_delimiter = ','
    )]
    pub public_names: Vec<String>,
    #[command(flatten)]
    pub timing: Timing,
    /// Connections to PostgreSQL.
    #[arg(long, env = "FLOTILLA_DATABASE_CONNECTIONS", default_value_t = 16)]
    pub database_connections: u32,
}

/// The clocks of liveness. Defaults suit production; tests shrink them.
#[derive(Debug, Clone, Copy, Args)]
pub struct Timing {
    /// How often agents send a heartbeat. The control plane decides; agents obey.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How many heartbeat intervals of silence make a droplet `unreachable`.
    #[arg(long, env = "FLOTILLA_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// How often the latest heartbeats are written to PostgreSQL, all in one statement.
    #[arg(long, env = "FLOTILLA_FLUSH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// How long a droplet whose session closed stays `online` waiting for a new session
    /// before it is `offline`.
    #[arg(long, env = "FLOTILLA_RECONNECT_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// On shutdown, agents are told to come back after a random delay up to this long.
    #[arg(long, env = "FLOTILLA_RECONNECT_SPREAD", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconnect_spread: Duration,
    /// On shutdown, how long sessions get to close before they are cut.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a new session may take to say `Hello`.
    #[arg(long, env = "FLOTILLA_HELLO_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub hello_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
            flush_interval: Duration::from_secs(30),
            reconnect_grace: Duration::from_secs(60),
            reconnect_spread: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

impl Timing {
    /// Silence longer than this makes a droplet `unreachable`.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1)
    }

    /// Refuses settings that cannot work together.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--flush-interval", self.flush_interval),
            ("--hello-timeout", self.hello_timeout),
        ];
        for (flag, value) in positive {
            if value.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if self.missed_heartbeats == 0 {
            return Err("--missed-heartbeats must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla-control-plane").chain(args.iter().copied()))
    }

    #[test]
    fn serve_has_safe_defaults() -> Result<(), clap::Error> {
        let Command::Serve(args) = parse(&["serve", "--database-url", "postgres://x/y"])?.command
        else {
            panic!("not serve");
        };
        assert_eq!(args.agent_listen, "0.0.0.0:7443".parse().expect("addr"));
        assert!(
            args.api_listen.ip().is_loopback(),
            "the unauthenticated API listens on loopback"
        );
        assert_eq!(args.timing.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(args.timing.silence_limit(), Duration::from_secs(30));
        assert!(args.timing.validate().is_ok());
        Ok(())
    }

    #[test]
    fn durations_and_repeated_names_parse() -> Result<(), clap::Error> {
        let Command::Serve(args) = parse(&[
            "serve",
            "--database-url",
            "postgres://x/y",
            "--heartbeat-interval",
            "250ms",
            "--reconnect-grace",
            "2m",
            "--public-name",
            "cp.example.com",
            "--public-name",
            "10.0.0.5",
        ])?
        .command
        else {
            panic!("not serve");
        };
        assert_eq!(args.timing.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(args.timing.reconnect_grace, Duration::from_secs(120));
        assert_eq!(args.public_names, ["cp.example.com", "10.0.0.5"]);
        Ok(())
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let err = parse(&[
            "serve",
            "--database-url",
            "x",
            "--heartbeat-interval",
            "soon",
        ])
        .expect_err("not a duration");
        assert!(err.to_string().contains("--heartbeat-interval"), "{err}");
        let timing = Timing {
            heartbeat_interval: Duration::ZERO,
            ..Timing::default()
        };
        assert_eq!(
            timing.validate(),
            Err("--heartbeat-interval must be greater than zero".into())
        );
        let err = parse(&[
            "ca",
            "issue-agent",
            "--data-dir",
            "d",
            "--droplet",
            "nope",
            "--out",
            "o",
        ])
        .expect_err("not a uuid");
        assert!(err.to_string().contains("--droplet"), "{err}");
    }
}
