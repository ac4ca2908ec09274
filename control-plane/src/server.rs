//! The control plane as one function: give it bound listeners, a migrated database and a
//! shutdown future; it serves until the future resolves, then drains in a fixed order.

use std::{future::Future, num::NonZeroU32, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use flotilla::proto::{
    FILE_DESCRIPTOR_SET, Goodbye, agent_gateway_server::AgentGatewayServer, fleet_server::FleetServer, goodbye::Reason,
};
use rand::Rng as _;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    api::{Api, auth::ApiKeys, grpc::FleetApi, http::Http},
    fleet::{Fleet, commands::Completions, events, provisioning, reconcile},
    identity::{
        master_key::MasterKey,
        pki::{self, Authorities},
        revocation::{self, Revocations},
        tls,
    },
    session::{Agents, accept, agent_service::Gateway, delivery, liveness, registry::Sessions, replicas},
    store::{self, retention},
    timing::Timing,
};

/// Server certificates are re-issued from the CA at every start.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// What `serve` needs beyond its listeners and database.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub public_names: Vec<String>,
    /// Where other replicas reach this API (`host:port`); the API listener's address
    /// when `None`.
    pub advertise_api: Option<String>,
    pub timing: Timing,
    /// Decrypts the CA key stored in PostgreSQL.
    pub master_key: Arc<MasterKey>,
    /// How long droplet certificates are valid.
    pub cert_validity: Duration,
    /// API requests per second per key (bursts of twice that).
    pub api_rate_limit: NonZeroU32,
    /// TLS on the API port.
    pub api_tls: tls::ApiTls,
    /// Accept Supabase user tokens too.
    pub jwt: Option<crate::api::auth::jwt::JwtConfig>,
    /// The agent image new droplets run.
    pub agent_image: String,
    /// Providers besides `byo`, and how long their droplets have to connect.
    pub providers: crate::fleet::provisioning::Providers,
    pub provision_timeout: Duration,
}

/// The control plane's bound sockets. Tests bind port 0.
pub struct Listeners {
    pub agent: TcpListener,
    pub enroll: TcpListener,
    pub api: TcpListener,
}

/// Serves until `shutdown` resolves. Then: stop accepting agents, tell every session
/// `Goodbye` with a spread-out reconnect hint, give sessions `shutdown_grace` to close,
/// write the last heartbeats, stop the API.
pub async fn serve(
    db: PgPool,
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.timing.validate().map_err(anyhow::Error::msg)?;
    store::MIGRATOR.run(&db).await.context("applying database migrations")?;

    if config.cert_validity < Duration::from_secs(1) {
        anyhow::bail!("--cert-validity must be at least one second");
    }
    let (authorities, created) = Authorities::load_or_create(&db, &config.master_key).await?;
    let ca = &authorities.active;
    if created {
        tracing::info!(sha256 = %ca.sha256_pin(), "created the fleet CA");
    }
    // Other replicas reach this one's API at its advertised address: it is a name too.
    let mut names = config.public_names.clone();
    if let Some(host) = config.advertise_api.as_deref().and_then(advertised_host) {
        names.push(host);
    }
    let server_cert = ca.issue_server(&server_names(&names), SERVER_CERT_VALIDITY)?;
    pki::write_pair(&config.data_dir, "server", &server_cert)?;
    pki::write_bundle(&config.data_dir, &authorities.bundle)?;
    let revocations = Revocations::default();
    let agent_tls = tls::agent_server_config(&authorities, &server_cert, revocations.clone())?;
    let enroll_tls = tls::enroll_server_config(&authorities, &server_cert)?;
    let ca_pin = ca.sha256_pin();

    let replica = replicas::load_or_create_id(&config.data_dir).context("reading this replica's id")?;
    let api_address = config.advertise_api.clone().unwrap_or_else(|| {
        let mut addr = listeners.api.local_addr().unwrap_or_else(|_| ([127, 0, 0, 1], 7080).into());
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        addr.to_string()
    });
    let released = store::start_replica(&db, replica, &api_address).await.context("recording this replica")?;
    if released > 0 {
        tracing::info!(
            droplets = released,
            "sessions of this replica's previous run ended; their droplets have the reconnect grace"
        );
    }

    // New droplets reach us at the first public name (loopback for local use) on the
    // ports we listen on.
    let host = config.public_names.first().cloned().unwrap_or_else(|| "localhost".to_owned());
    let endpoints = provisioning::Endpoints {
        agent: format!("{host}:{}", listeners.agent.local_addr()?.port()),
        enroll: format!("{host}:{}", listeners.enroll.local_addr()?.port()),
        agent_image: config.agent_image.clone(),
    };
    let jwt = config.jwt.clone().map(crate::api::auth::jwt::Verifier::new).transpose().context("accepting JWTs")?;
    let forward_tls = forward_tls(&config.api_tls, &authorities.bundle);
    let authorities = Arc::new(authorities);
    let fleet = Fleet {
        db: db.clone(),
        master_key: config.master_key.clone(),
        authorities: authorities.clone(),
        completions: Completions::default(),
        bell: events::Bell::default(),
        endpoints: Arc::new(endpoints),
        providers: Arc::new(config.providers.clone()),
        provision_timeout: config.provision_timeout,
        replica,
    };
    let agents = Agents {
        fleet: fleet.clone(),
        sessions: Sessions::default(),
        timing: config.timing,
        replica,
        authorities: authorities.clone(),
        revocations: revocations.clone(),
        cert_validity: config.cert_validity,
        forward_tls,
    };
    let api = Api {
        fleet: fleet.clone(),
        agents: agents.clone(),
        keys: ApiKeys::new(db.clone(), config.api_rate_limit, jwt),
        stopping: CancellationToken::new(),
    };
    let sessions = agents.sessions.clone();
    let timing = config.timing;

    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let stop_servers = CancellationToken::new();
    let mut background = JoinSet::new();
    liveness::spawn(&agents, &stop_background, &mut background);
    let connected = sessions.clone();
    reconcile::spawn(
        &fleet,
        move || connected.droplets(),
        timing.reconcile_interval,
        &stop_background,
        &mut background,
    );
    retention::spawn(db.clone(), timing.retention, timing.prune_interval, &stop_background, &mut background);
    // A revocation closes the session of the certificate it revokes, wherever it is.
    let revoked_sessions = sessions.clone();
    let close_revoked = move |droplet, serial: &str| {
        revoked_sessions.close_if_serial(droplet, serial, Reason::Revoked, "this droplet's certificate was revoked")
    };
    revocation::spawn_listener(
        db.clone(),
        revocations.clone(),
        close_revoked,
        stop_background.clone(),
        &mut background,
    )
    .await
    .context("listening for revocations")?;
    replicas::spawn(
        db.clone(),
        replica,
        sessions.clone(),
        timing.heartbeat_interval,
        replicas::failover_after(timing.silence_limit()),
        &stop_background,
        &mut background,
    )
    .await
    .context("listening for sessions")?;
    delivery::spawn_listener(
        db.clone(),
        sessions.clone(),
        fleet.completions.clone(),
        stop_background.clone(),
        &mut background,
    )
    .await
    .context("listening for commands")?;

    provisioning::spawn(&fleet, &stop_background, &mut background);
    events::spawn_listener(&db, fleet.bell.clone(), stop_background.clone(), &mut background)
        .await
        .context("listening for events")?;

    let agent_addr = listeners.agent.local_addr()?;
    let api_addr = listeners.api.local_addr()?;
    let enroll_addr = listeners.enroll.local_addr()?;
    let enroll_incoming = tls::accept_tls(listeners.enroll, enroll_tls, stop_accepting.clone(), "enrollment");
    let enroll_server = Server::builder()
        .add_service(AgentGatewayServer::new(Gateway::new(agents.clone())))
        .serve_with_incoming_shutdown(enroll_incoming, stop_servers.clone().cancelled_owned());
    let enroll_server = tokio::spawn(enroll_server);
    let incoming = accept::accept_agents(listeners.agent, agent_tls, stop_accepting.clone());
    let agent_server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(AgentGatewayServer::new(Gateway::new(agents.clone())))
        .serve_with_incoming_shutdown(incoming, stop_servers.clone().cancelled_owned());
    let agent_server = tokio::spawn(agent_server);

    let api_identity = tls::api_identity(&config.api_tls, &authorities, &server_cert)?;
    let api_server = api_server(&api, listeners.api, api_identity, stop_accepting.clone(), stop_servers.clone())?;
    let api_server = tokio::spawn(api_server);
    tracing::info!(agent = %agent_addr, api = %api_addr, enroll = %enroll_addr, ca_sha256 = %ca_pin, "control plane serving");

    shutdown.await;
    tracing::info!(sessions = sessions.len(), "shutting down");
    stop_accepting.cancel();
    api.stopping.cancel();
    // The agents we send away must not be held against their session rate limit.
    if let Err(error) = store::forgive_reconnects(&db, replica).await {
        tracing::warn!(%error, "could not reset the session rate limit of this replica's droplets");
    }
    let spread = config.timing.reconnect_spread;
    sessions.close_all(|| Goodbye {
        reason: Reason::Shutdown as i32,
        message: "the control plane is shutting down".into(),
        reconnect_after: prost_types::Duration::try_from(jitter(spread)).ok(),
        required_protocol: None,
    });
    let drained = tokio::time::timeout(config.timing.shutdown_grace, async {
        while !sessions.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(sessions = sessions.len(), "sessions did not close within the grace; cutting them");
        sessions.cancel_all();
    }
    stop_background.cancel();
    while background.join_next().await.is_some() {}
    stop_servers.cancel();
    let grace = config.timing.shutdown_grace;
    for (name, server) in [("agent", agent_server), ("enroll", enroll_server), ("api", api_server)] {
        match tokio::time::timeout(grace, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                tracing::warn!(%error, server = name, "server ended with an error")
            }
            Ok(Err(error)) => tracing::warn!(%error, server = name, "server task failed"),
            Err(_) => tracing::warn!(server = name, "server did not stop within the grace"),
        }
    }
    tracing::info!("control plane stopped");
    Ok(())
}

type ServerFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

fn api_server(
    api: &Api,
    listener: TcpListener,
    identity: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
    stop_accepting: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<ServerFuture> {
    // Both reflection versions: grpcurl before 1.9 speaks only v1alpha. Only the services
    // this port serves are advertised (the descriptor set also holds `AgentGateway`).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .include_reflection_service(false)
            .with_service_name("flotilla.v1.Fleet")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1().context("building gRPC reflection (v1)")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("building gRPC reflection (v1alpha)")?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let fleet = FleetServer::new(FleetApi::new(api.clone()));
    let http = Arc::new(Http::new(fleet.clone(), api.fleet.db.clone(), api.agents.sessions.clone())?);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(health).add_service(reflection_v1).add_service(reflection_v1alpha).add_service(fleet);
    // gRPC by its service paths; everything else is the HTTP/JSON side.
    let routes = http.router(routes.routes().into_axum_router());
    let router = Server::builder()
        .accept_http1(true)
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(tower_http::request_id::MakeRequestUuid))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .add_routes(tonic::service::Routes::from(routes));
    let stopped = async move {
        health_reporter.set_serving::<FleetServer<FleetApi>>().await;
        stop.cancelled().await;
        health_reporter.set_not_serving::<FleetServer<FleetApi>>().await;
    };
    Ok(match identity {
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped)),
        Some((chain, key)) => {
            let incoming = tls::accept_tls(listener, tls::api_server_config(chain, key)?, stop_accepting, "api");
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    })
}

/// How this replica calls other replicas' APIs: they serve as this one does.
fn forward_tls(api: &tls::ApiTls, bundle: &[String]) -> Option<tonic::transport::ClientTlsConfig> {
    let fleet_ca = tonic::transport::Certificate::from_pem(bundle.concat());
    match api {
        tls::ApiTls::Plaintext => None,
        tls::ApiTls::FleetCa => Some(tonic::transport::ClientTlsConfig::new().ca_certificate(fleet_ca)),
        tls::ApiTls::Files { .. } => {
            Some(tonic::transport::ClientTlsConfig::new().ca_certificate(fleet_ca).with_native_roots())
        }
    }
}

/// The host of a `host:port` address (IPv6 in brackets).
fn advertised_host(address: &str) -> Option<String> {
    let (host, _port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_owned())
}

/// Names the server certificate carries: loopback for local use, plus the public ones.
pub fn server_names(public: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    for name in public {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// A uniformly random delay in [spread / 10, spread], so agents do not return together.
fn jitter(spread: Duration) -> Duration {
    let floor = spread / 10;
    if spread <= floor {
        return spread;
    }
    rand::rng().random_range(floor..=spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_hints_spread_within_bounds() {
        let spread = Duration::from_secs(10);
        let hints: Vec<_> = (0..200).map(|_| jitter(spread)).collect();
        assert!(hints.iter().all(|h| *h >= Duration::from_secs(1) && *h <= spread));
        let distinct: std::collections::HashSet<_> = hints.iter().collect();
        assert!(distinct.len() > 150, "hints are spread, not one value");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn server_names_always_include_loopback_once() {
        let names = server_names(&["cp.example.com".into(), "localhost".into()]);
        assert_eq!(names, ["localhost", "127.0.0.1", "::1", "cp.example.com"]);
    }
}
