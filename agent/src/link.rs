//! The agent's link to the control plane: get credentials (stored, or enrolled with a
//! token), dial out, hold one session, heartbeat at the pace the control plane sets, renew
//! the certificate over it (`renewal`), and reconnect forever as [`crate::backoff`] says.
//!
//! The agent's wiring: the only module that starts the executor, the health monitor and the
//! event follower, each session handing them its [`Wire`].

use std::time::Duration;

use anyhow::Context as _;
use flotilla::{
    DropletId,
    proto::{
        ControlMessage, Goodbye, Heartbeat, Hello, RenewCertificate, agent_gateway_client::AgentGatewayClient,
        agent_message, control_message, goodbye::Reason,
    },
    protocol,
    telemetry::error_chain,
};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    backoff::{Reconnect, SessionEnd, worth_logging},
    config::{AgentConfig, IdentitySource},
    docker::Engine,
    enroll,
    executor::{Executor, Runner},
    host::HostProbe,
    identity::{Credentials, Held, Store},
    ledger::Ledger,
    runtime::Runtime,
    wire::Wire,
};

mod renewal;

use renewal::Renewal;

/// The control plane must answer `Hello` within this.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// Used until `Welcome` says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// How a session ended.
#[derive(Debug)]
enum Ended {
    /// We were asked to stop.
    Shutdown,
    /// The control plane said goodbye.
    Goodbye(Goodbye),
    /// Anything else: refused, broken, timed out.
    Failed(anyhow::Error),
}

/// Runs the agent until `shutdown` is cancelled. Returns an error only for what needs an
/// operator: no usable credentials, a refused enrollment, a bad configuration.
#[tracing::instrument(name = "agent", skip_all, fields(droplet_id = tracing::field::Empty))]
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ledger = match &config.state_dir {
        Some(dir) => Ledger::open(dir).with_context(|| format!("opening the command record in {}", dir.display()))?,
        None => Ledger::in_memory(),
    };
    let mut agent = Agent {
        runner: Runner::start(ledger.clone()),
        ledger,
        host: HostProbe::new(config.disk_path.clone()),
        engine: Engine::new(&config.docker_socket),
        droplet: None,
        store: match &config.identity {
            IdentitySource::StateDir { store, .. } => Some(store.clone()),
            IdentitySource::Fixed(_) => None,
        },
        held: None,
    };
    let mut reconnect = Reconnect::new(config.initial_backoff, config.max_backoff);
    loop {
        let started = Instant::now();
        let (ended, welcomed) = match agent.credentials(&config).await {
            Ok(held) => {
                tracing::Span::current().record("droplet_id", tracing::field::display(held.droplet));
                let endpoint = endpoint(&config, &held.credentials)?;
                agent.held = Some(held);
                agent.session(&endpoint, &shutdown).await
            }
            Err(CredentialsError::Fatal(error)) => return Err(error),
            Err(CredentialsError::Retry(error)) => (Ended::Failed(error), false),
        };
        let delay = match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Goodbye(goodbye) => {
                let hint = goodbye.reconnect_after.and_then(|d| Duration::try_from(d).ok());
                match goodbye.reason() {
                    Reason::IncompatibleProtocol => tracing::error!(
                        required = %goodbye.required_protocol.unwrap_or_default(),
                        "the control plane refused this agent's protocol: {}", goodbye.message
                    ),
                    Reason::Revoked => tracing::error!("the control plane revoked this droplet: {}", goodbye.message),
                    reason => tracing::info!(?reason, ?hint, "the control plane said goodbye: {}", goodbye.message),
                }
                reconnect.after(started, welcomed, SessionEnd::Goodbye { reconnect_after: hint })
            }
            Ended::Failed(error) => {
                let delay = reconnect.after(started, welcomed, SessionEnd::Failed);
                let failures = reconnect.failures();
                if worth_logging(failures) {
                    tracing::warn!(failures, retry_in = ?delay, "no session with the control plane: {error:#}");
                } else {
                    tracing::debug!(failures, retry_in = ?delay, "no session with the control plane: {error:#}");
                }
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

enum CredentialsError {
    Fatal(anyhow::Error),
    Retry(anyhow::Error),
}

fn endpoint(config: &AgentConfig, credentials: &Credentials) -> anyhow::Result<Endpoint> {
    let uri: http::Uri = config.control_plane.parse().with_context(|| {
        format!("--control-plane {:?} is not a URL like https://cp.example.com:7443", config.control_plane)
    })?;
    if uri.scheme_str() != Some("https") {
        anyhow::bail!("--control-plane must be an https:// URL: the session is always TLS");
    }
    let host = uri.host().context("--control-plane has no host")?;
    let server_name = config.server_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
        .identity(Identity::from_pem(&credentials.cert_pem, &credentials.key_pem))
        .domain_name(server_name);
    Ok(Endpoint::from(uri)
        .tls_config(tls)
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

struct Agent {
    /// Commands applied, with their results: each is applied once across sessions.
    ledger: Ledger,
    /// Runs commands across sessions.
    runner: Runner,
    host: HostProbe,
    engine: Engine,
    /// Learned from `Welcome`.
    droplet: Option<DropletId>,
    /// Where credentials persist, unless they are fixed.
    store: Option<Store>,
    /// The credentials of the current session.
    held: Option<Held>,
}

impl Agent {
    /// The credentials for the next connection: stored ones while valid (never
    /// re-enrolling then), otherwise a fresh enrollment with the token.
    async fn credentials(&mut self, config: &AgentConfig) -> Result<Held, CredentialsError> {
        let (store, enrollment) = match &config.identity {
            IdentitySource::Fixed(credentials) => {
                return Held::from_credentials(credentials.clone()).map_err(CredentialsError::Fatal);
            }
            IdentitySource::StateDir { store, enrollment } => (store, enrollment),
        };
        let stored = store.load().map_err(CredentialsError::Fatal)?;
        let expired = match stored {
            Some(held) if !held.expired() => return Ok(held),
            Some(held) => Some(held),
            None => None,
        };
        let Some(enrollment) = enrollment else {
            let remedy = "create a token with `flotilla-control-plane token create` and start the agent with --token (or FLOTILLA_TOKEN)";
            return Err(CredentialsError::Fatal(match expired {
                Some(held) => anyhow::anyhow!(
                    "this droplet's certificate expired at {} while it was offline; it needs a new token: \
                     create one with `flotilla-control-plane token create --droplet {}` and start the agent with --token",
                    humantime::format_rfc3339_seconds(held.not_after),
                    held.droplet
                ),
                None => {
                    anyhow::anyhow!("no certificate in {} and no enrollment token: {remedy}", store.dir().display())
                }
            }));
        };
        tracing::info!(url = %enrollment.url, "enrolling with the token");
        match enroll::enroll(&enrollment.url, &enrollment.token, &enrollment.trust, self.host.facts()).await {
            Ok(enrolled) => {
                store.save_bundle(&enrolled.bundle).map_err(CredentialsError::Fatal)?;
                store.save_identity(&enrolled.cert_pem, &enrolled.key_pem).map_err(CredentialsError::Fatal)?;
                let held = store.load().map_err(CredentialsError::Fatal)?.ok_or_else(|| {
                    CredentialsError::Fatal(anyhow::anyhow!("the enrolled credentials did not persist"))
                })?;
                tracing::info!(droplet_id = %held.droplet, "enrolled");
                Ok(held)
            }
            Err(enroll::EnrollError::Unreachable(error)) => Err(CredentialsError::Retry(anyhow::anyhow!(error))),
            Err(error) => Err(CredentialsError::Fatal(error.into())),
        }
    }

    /// One session, from dial to end. Returns how it ended and whether `Welcome` came.
    #[tracing::instrument(skip_all, fields(control_plane = %endpoint.uri(), session_id = tracing::field::Empty))]
    async fn session(&mut self, endpoint: &Endpoint, shutdown: &CancellationToken) -> (Ended, bool) {
        let mut welcomed = false;
        let ended = tokio::select! {
            () = shutdown.cancelled() => Ended::Shutdown,
            ended = self.session_inner(endpoint, shutdown, &mut welcomed) => ended,
        };
        (ended, welcomed)
    }

    async fn session_inner(&mut self, endpoint: &Endpoint, shutdown: &CancellationToken, welcomed: &mut bool) -> Ended {
        let channel: Channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(error) => {
                return Ended::Failed(anyhow::anyhow!("dialling {}: {}", endpoint.uri(), error_chain(&error)));
            }
        };
        let (wire, rx) = Wire::channel();
        if let Err(error) = wire.send(agent_message::Kind::Hello(self.hello().await)).await {
            return Ended::Failed(error);
        }
        let mut client = AgentGatewayClient::new(channel);
        let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return Ended::Failed(anyhow::anyhow!("opening the session: {}", error_chain(&status)));
            }
        };

        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await;
        let welcome = match first {
            Ok(Ok(Some(ControlMessage { kind: Some(control_message::Kind::Welcome(welcome)) }))) => welcome,
            Ok(Ok(Some(ControlMessage { kind: Some(control_message::Kind::Goodbye(goodbye)) }))) => {
                return Ended::Goodbye(goodbye);
            }
            Ok(Ok(Some(other))) => {
                return Ended::Failed(anyhow::anyhow!("expected Welcome, got {other:?}"));
            }
            Ok(Ok(None)) => {
                return Ended::Failed(anyhow::anyhow!("the control plane closed the session before Welcome"));
            }
            Ok(Err(status)) => {
                return Ended::Failed(anyhow::anyhow!("the session was refused: {}", error_chain(&status)));
            }
            Err(_) => {
                return Ended::Failed(anyhow::anyhow!("no Welcome within {WELCOME_TIMEOUT:?}"));
            }
        };
        *welcomed = true;
        tracing::Span::current().record("session_id", welcome.session_id.as_str());
        self.droplet = welcome.droplet_id.parse().ok();
        let interval = welcome
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_HEARTBEAT);
        tracing::info!(droplet_id = %welcome.droplet_id, heartbeat = ?interval, "session open");

        if let (Some(store), Some(bundle)) = (&self.store, &welcome.trust_bundle)
            && let Err(error) = store.save_bundle(&bundle.ca_certificates_pem)
        {
            tracing::warn!("could not store the trust bundle: {error:#}");
        }

        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewal = Renewal::new(self.store.is_some(), self.held.as_ref());
        let executor = Executor::start(self.runtime(), wire.clone(), self.runner.clone());
        let _monitor = self.runtime().ok().map(|runtime| crate::health::Monitor::start(runtime, wire.clone()));
        let _events = self
            .runtime()
            .ok()
            .zip(self.engine.docker().ok())
            .map(|(runtime, docker)| crate::events::Follower::start(docker, runtime, wire.clone()));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                () = renewal.due() => {
                    match enroll::key_and_csr() {
                        Ok((key, csr_pem)) => {
                            tracing::info!("renewing the droplet's certificate");
                            renewal.sent(key);
                            if let Err(error) = wire.send(agent_message::Kind::RenewCertificate(RenewCertificate { csr_pem })).await {
                                return Ended::Failed(error);
                            }
                        }
                        Err(error) => {
                            tracing::warn!("cannot make a CSR: {error:#}");
                            renewal.sent_failed();
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { load: Some(self.load().await), sent_at: Some(std::time::SystemTime::now().into()) };
                    if let Err(error) = wire.send(agent_message::Kind::Heartbeat(beat)).await {
                        return Ended::Failed(error);
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(ControlMessage { kind: Some(kind) })) => {
                        if let Some(ended) = self.handle(kind, &wire, &mut renewal, &executor).await {
                            return ended;
                        }
                    }
                    Ok(Some(ControlMessage { kind: None })) => {}
                    Ok(None) => return Ended::Failed(anyhow::anyhow!("the control plane ended the session")),
                    Err(status) => return Ended::Failed(anyhow::anyhow!("the session broke: {}", error_chain(&status))),
                },
            }
        }
    }

    /// Keeps a renewed certificate for the next connection; this session goes on.
    fn store_renewed(&mut self, certificate: flotilla::proto::Certificate, renewal: &mut Renewal) {
        let (Some(store), Some(key)) = (&self.store, renewal.take_key()) else {
            tracing::warn!("ignored a certificate nobody asked for");
            return;
        };
        let saved = (|| {
            let bundle = certificate.trust_bundle.unwrap_or_default().ca_certificates_pem;
            let held = Held::from_credentials(Credentials {
                cert_pem: certificate.certificate_chain_pem.clone(),
                key_pem: key.serialize_pem(),
                ca_pem: bundle.concat(),
            })?;
            anyhow::ensure!(
                Some(held.droplet) == self.held.as_ref().map(|h| h.droplet),
                "the certificate names another droplet"
            );
            store.save_bundle(&bundle)?;
            store.save_identity(&certificate.certificate_chain_pem, &key.serialize_pem())?;
            Ok(held)
        })();
        match saved {
            Ok(held) => {
                tracing::info!(not_after = %humantime::format_rfc3339_seconds(held.not_after), "stored the renewed certificate");
                renewal.renewed(&held);
                self.held = Some(held);
            }
            Err(error) => {
                tracing::warn!("could not keep the renewed certificate: {error:#}");
                renewal.sent_failed();
            }
        }
    }

    async fn handle(
        &mut self,
        kind: control_message::Kind,
        wire: &Wire,
        renewal: &mut Renewal,
        executor: &Executor,
    ) -> Option<Ended> {
        match kind {
            control_message::Kind::Goodbye(goodbye) => return Some(Ended::Goodbye(goodbye)),
            control_message::Kind::Command(command) => executor.submit(command, wire).await,
            control_message::Kind::Welcome(_) => tracing::debug!("ignored a second Welcome"),
            control_message::Kind::Certificate(certificate) => self.store_renewed(certificate, renewal),
        }
        None
    }

    /// The runtime for this droplet's containers, or why there is none.
    fn runtime(&self) -> Result<Runtime, String> {
        let droplet = self.held.as_ref().map(|h| h.droplet).ok_or("no droplet identity")?;
        Ok(Runtime::new(self.engine.docker()?, droplet))
    }

    async fn hello(&mut self) -> Hello {
        let (docker_version, docker_error) = match self.engine.version().await {
            Ok(version) => (version, String::new()),
            Err(error) => {
                tracing::warn!("Docker engine unavailable: {error}");
                (String::new(), error)
            }
        };
        let inventory = match self.runtime() {
            Ok(runtime) => runtime.inventory().await.unwrap_or_else(|error| {
                tracing::warn!("could not list this droplet's containers: {error}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Hello {
            protocol: Some(protocol::CURRENT),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            host: Some(self.host.facts()),
            docker_version,
            docker_error,
            inventory,
            applied_command_ids: self.ledger.recent(100),
            load: Some(self.load().await),
        }
    }

    async fn load(&self) -> flotilla::proto::HostLoad {
        let containers = match self.droplet {
            Some(droplet) => self.engine.managed_containers(droplet).await,
            None => 0,
        };
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || host.load(containers)).await.unwrap_or_default()
    }
}
