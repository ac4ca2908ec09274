//! Command-line configuration, with environment fallbacks.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::timing::Timing;
use flotilla::DropletId;

#[derive(Debug, Parser)]
#[command(name = "flotilla-control-plane", version, about = "The Flotilla control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the agent port, the enrollment port and the fleet API.
    Serve(Box<ServeArgs>),
    /// Manage the fleet's certificate authorities.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Manage enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage droplets.
    #[command(subcommand)]
    Droplet(DropletCommand),
    /// Manage droplet certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Manage keys for the fleet API.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
}

/// Where the fleet's state and its CA key are.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Holds the server certificate, and the master key file when no key is given.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "/var/lib/flotilla")]
    pub data_dir: PathBuf,
    /// The key that encrypts the CA key in the database: 32 bytes as 64 hex digits or base64.
    /// Every control plane on one database needs the same one.
    #[arg(long, env = "FLOTILLA_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Read (or create) the master key here when --master-key is not given.
    /// Default: <data-dir>/master.key.
    #[arg(long, env = "FLOTILLA_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
}

impl StateArgs {
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file.clone().unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the fleet CA (if there is none) and print its SHA-256 pin.
    Init {
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the CAs in service.
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Rotation, step 1: add a new CA that is trusted but does not sign yet.
    Stage {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Rotation, step 2: the staged CA signs from the next start of each control plane;
    /// the old one stays trusted.
    Activate {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Rotation, step 3: stop trusting the old CA.
    Retire {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Write a client certificate for one droplet (agent.crt, agent.key, ca.crt): an
    /// operator's escape hatch; droplets normally enroll with a token.
    IssueAgent {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        droplet: DropletId,
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token (shown once).
    Create {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, default_value = "default")]
        account: String,
        /// An existing droplet to enroll again; a new droplet when omitted.
        #[arg(long)]
        droplet: Option<DropletId>,
        /// At most 24h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke an unused token.
    Revoke {
        #[command(flatten)]
        state: StateArgs,
        id: uuid::Uuid,
    },
}

/// Only the database: API keys live there.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key for the fleet API. The key is printed once, on stdout; only its hash
    /// is kept.
    Create {
        #[command(flatten)]
        db: DatabaseArgs,
        /// The account the key acts for (created when new).
        #[arg(long, default_value = "default")]
        account: String,
        /// read: get, list, watch, logs, tools. write: also changes. admin: also API
        /// keys, and every account.
        #[arg(long)]
        scope: crate::api::auth::Scope,
        /// Never expires when omitted (e.g. 90d).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never the keys themselves).
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a key: calls with it fail from now on.
    Revoke {
        #[command(flatten)]
        db: DatabaseArgs,
        id: uuid::Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum DropletCommand {
    /// Delete a droplet: its certificates are revoked and its session closed at once.
    Delete {
        #[command(flatten)]
        state: StateArgs,
        id: DropletId,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke one certificate (by serial) or every certificate of a droplet (by id).
    Revoke {
        #[command(flatten)]
        state: StateArgs,
        /// A certificate serial (hex) or a droplet id.
        target: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Where agents connect (mutual TLS).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN", default_value = "0.0.0.0:7443")]
    pub agent_listen: SocketAddr,
    /// Where droplets enroll with a token (server-authenticated TLS only).
    #[arg(long, env = "FLOTILLA_ENROLL_LISTEN", default_value = "0.0.0.0:7444")]
    pub enroll_listen: SocketAddr,
    /// How long droplet certificates are valid; agents renew them at 50-80% of it.
    #[arg(long, env = "FLOTILLA_CERT_VALIDITY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,
    /// The fleet API: gRPC and HTTP/JSON on one port, every call with an API key.
    #[arg(long, env = "FLOTILLA_API_LISTEN", default_value = "127.0.0.1:7080")]
    pub api_listen: SocketAddr,
    /// Serve the API with this certificate chain (PEM), e.g. from a public CA, instead of
    /// one from the fleet CA. Needs --api-tls-key.
    #[arg(long, env = "FLOTILLA_API_TLS_CERT", requires = "api_tls_key", conflicts_with = "api_plaintext")]
    pub api_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-tls-cert.
    #[arg(long, env = "FLOTILLA_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Serve the API without TLS: for local development, or behind a proxy that
    /// terminates TLS. API keys then cross the network in clear up to that proxy.
    #[arg(long, env = "FLOTILLA_API_PLAINTEXT")]
    pub api_plaintext: bool,
    /// Where other replicas reach this one's API, to forward live requests (logs,
    /// inspect, health) for droplets whose session is here. Defaults to --api-listen
    /// (with 127.0.0.1 for an unspecified address).
    #[arg(long, env = "FLOTILLA_ADVERTISE_API")]
    pub advertise_api: Option<String>,
    /// A DNS name or IP address agents use to reach the control plane (repeatable).
    #[arg(long = "public-name", env = "FLOTILLA_PUBLIC_NAMES", value_delimiter = ',')]
    pub public_names: Vec<String>,
    #[command(flatten)]
    pub timing: Timing,
    /// Fleet API requests per second allowed to each API key (bursts of twice that);
    /// more are refused with RESOURCE_EXHAUSTED (HTTP 429 with Retry-After).
    #[arg(long, env = "FLOTILLA_API_RATE_LIMIT", default_value_t = NonZeroU32::new(crate::api::auth::DEFAULT_RATE).unwrap_or(NonZeroU32::MIN))]
    pub api_rate_limit: NonZeroU32,
    /// Accept Supabase user tokens (HS256) signed with this JWT secret.
    #[arg(long, env = "FLOTILLA_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Accept Supabase user tokens signed with the keys of this JWKS (e.g.
    /// https://<project>.supabase.co/auth/v1/.well-known/jwks.json).
    #[arg(long, env = "FLOTILLA_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// The `aud` tokens must carry.
    #[arg(long, env = "FLOTILLA_JWT_AUDIENCE", default_value = "authenticated")]
    pub jwt_audience: String,
    /// The `iss` tokens must carry, when set (e.g. https://<project>.supabase.co/auth/v1).
    #[arg(long, env = "FLOTILLA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The claim (a dotted path) naming the caller's account.
    #[arg(long, env = "FLOTILLA_JWT_ACCOUNT_CLAIM", default_value = "app_metadata.flotilla_account")]
    pub jwt_account_claim: String,
    /// The scope of token callers: read or write (admin is for API keys only).
    #[arg(long, env = "FLOTILLA_JWT_SCOPE", default_value = "read")]
    pub jwt_scope: crate::api::auth::Scope,
    /// The agent image new droplets run (`[registry/]name:tag`).
    #[arg(long, env = "FLOTILLA_AGENT_IMAGE", default_value = concat!("flotilla-agent:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// Offer the `local` provider: droplets as agent containers on this machine's Docker
    /// engine (development and tests).
    #[arg(long, env = "FLOTILLA_LOCAL_PROVIDER")]
    pub local_provider: bool,
    /// Offer the `digitalocean` provider with this API token (never logged or stored).
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_TOKEN", hide_env_values = true)]
    pub digitalocean_token: Option<String>,
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_REGION", default_value = "fra1")]
    pub digitalocean_region: String,
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_SIZE", default_value = "s-1vcpu-1gb")]
    pub digitalocean_size: String,
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_IMAGE", default_value = "debian-12-x64")]
    pub digitalocean_image: String,
    /// SSH key fingerprints or ids put on new droplets' root (repeatable; break-glass only).
    #[arg(long = "digitalocean-ssh-key", env = "FLOTILLA_DIGITALOCEAN_SSH_KEYS", value_delimiter = ',')]
    pub digitalocean_ssh_keys: Vec<String>,
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_VPC")]
    pub digitalocean_vpc: Option<String>,
    /// DigitalOcean's API (a stand-in in tests).
    #[arg(long, env = "FLOTILLA_DIGITALOCEAN_API", default_value = "https://api.digitalocean.com")]
    pub digitalocean_api: String,
    /// How long a provider's new droplet has to connect before it is `error` and what was
    /// made for it is destroyed.
    #[arg(long, env = "FLOTILLA_PROVISION_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub provision_timeout: Duration,
    /// Connections to PostgreSQL.
    #[arg(long, env = "FLOTILLA_DATABASE_CONNECTIONS", default_value_t = 16)]
    pub database_connections: u32,
}

impl ServeArgs {
    /// The providers the flags configure.
    pub fn providers(&self) -> anyhow::Result<crate::fleet::provisioning::Providers> {
        use std::sync::Arc;
        let mut providers = crate::fleet::provisioning::Providers::default();
        if self.local_provider {
            let local = crate::fleet::provisioning::local::Local::new(
                crate::fleet::provisioning::local::LocalConfig::default(),
            )?;
            providers = providers.with("local", Arc::new(local));
        }
        if let Some(token) = &self.digitalocean_token {
            use crate::fleet::provisioning::digitalocean::{ApiToken, DigitalOcean, DigitalOceanConfig};
            let mut config = DigitalOceanConfig::new(
                ApiToken::new(token.clone()),
                &self.digitalocean_region,
                &self.digitalocean_size,
                &self.digitalocean_image,
            );
            config.base_url = self.digitalocean_api.clone();
            config.ssh_keys = self.digitalocean_ssh_keys.clone();
            config.vpc_uuid = self.digitalocean_vpc.clone();
            providers = providers.with("digitalocean", Arc::new(DigitalOcean::new(config)?));
        }
        Ok(providers)
    }

    /// Whether and how Supabase user tokens are accepted, from the flags.
    pub fn jwt(&self) -> Result<Option<crate::api::auth::jwt::JwtConfig>, String> {
        if self.jwt_secret.is_none() && self.jwt_jwks_url.is_none() {
            return Ok(None);
        }
        if self.jwt_scope == crate::api::auth::Scope::Admin {
            return Err("--jwt-scope: token callers get read or write; admin is for API keys".into());
        }
        Ok(Some(crate::api::auth::jwt::JwtConfig {
            secret: self.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            jwks_url: self.jwt_jwks_url.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            account_claim: self.jwt_account_claim.clone(),
            scope: self.jwt_scope,
        }))
    }

    /// How the API port speaks, from the flags.
    pub fn api_tls(&self) -> crate::identity::tls::ApiTls {
        match (&self.api_tls_cert, &self.api_tls_key, self.api_plaintext) {
            (_, _, true) => crate::identity::tls::ApiTls::Plaintext,
            (Some(cert), Some(key), false) => {
                crate::identity::tls::ApiTls::Files { cert: cert.clone(), key: key.clone() }
            }
            _ => crate::identity::tls::ApiTls::FleetCa,
        }
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
        let Command::Serve(args) = parse(&["serve", "--database-url", "postgres://x/y"])?.command else {
            panic!("not serve");
        };
        assert_eq!(args.agent_listen, "0.0.0.0:7443".parse().expect("addr"));
        assert_eq!(args.enroll_listen, "0.0.0.0:7444".parse().expect("addr"));
        assert_eq!(args.cert_validity, Duration::from_secs(24 * 3600));
        assert_eq!(args.state.master_key_path(), PathBuf::from("/var/lib/flotilla/master.key"));
        assert!(args.api_listen.ip().is_loopback(), "the unauthenticated API listens on loopback");
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
        let err = parse(&["serve", "--database-url", "x", "--heartbeat-interval", "soon"]).expect_err("not a duration");
        assert!(err.to_string().contains("--heartbeat-interval"), "{err}");
        let timing = Timing { heartbeat_interval: Duration::ZERO, ..Timing::default() };
        assert_eq!(timing.validate(), Err("--heartbeat-interval must be greater than zero".into()));
        let err = parse(&["ca", "issue-agent", "--data-dir", "d", "--droplet", "nope", "--out", "o"])
            .expect_err("not a uuid");
        assert!(err.to_string().contains("--droplet"), "{err}");
    }
}
