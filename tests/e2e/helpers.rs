//! What the end-to-end tests share: a fresh database per test, a real control plane on
//! port 0, real agents, and real gRPC clients over real TLS.

pub mod deploy;
pub mod process;
pub mod registry;

use std::{
    future::Future, net::SocketAddr, num::NonZeroU32, path::PathBuf, str::FromStr as _, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use flotilla::{
    DropletId,
    proto::{
        AgentMessage, ControlMessage, CreateEnrollmentTokenRequest, CreateEnrollmentTokenResponse, Droplet,
        DropletStatus, GetDropletRequest, Hello, HostFacts, agent_gateway_client::AgentGatewayClient, agent_message,
        fleet_client::FleetClient,
    },
};
use flotilla_agent::{AgentConfig, Credentials, Enrollment, IdentitySource, enroll::Trust, identity::Store};
use flotilla_control_plane::{
    Listeners, ServeConfig,
    identity::master_key::MasterKey,
    identity::pki::{Authorities, Ca},
    timing::Timing,
};
use sqlx::{ConnectOptions as _, PgPool, postgres::PgConnectOptions};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A database of its own for one test, migrated by the control plane at start.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
}

impl TestDb {
    pub async fn new() -> anyhow::Result<Self> {
        flotilla::telemetry::init_for_tests();
        let url = std::env::var("DATABASE_URL").map_err(|_| {
            anyhow::anyhow!(
                "DATABASE_URL is not set: run the tests with `scripts/test.sh`, which starts a throwaway PostgreSQL"
            )
        })?;
        let admin = PgConnectOptions::from_str(&url).context("parsing DATABASE_URL")?;
        let name = format!("flotilla_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin.connect().await.context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        // Pooled as the control plane pools its own.
        let pool = flotilla_control_plane::store::pool_options(16)
            .connect_with(admin.database(&name))
            .await
            .context("connecting to the test database")?;
        flotilla_control_plane::store::MIGRATOR.run(&pool).await?;
        Ok(Self { pool, name })
    }

    /// Write statements (INSERT, UPDATE) on `droplets` executed in this database so far,
    /// and the rows they touched, as PostgreSQL's `pg_stat_statements` counts them. Its
    /// counters are updated as each statement ends, unlike `pg_stat_database`'s, which lag
    /// by seconds.
    pub async fn writes(&self) -> anyhow::Result<(i64, i64)> {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&self.pool).await.context(
            "pg_stat_statements: start PostgreSQL with shared_preload_libraries=pg_stat_statements (scripts/test.sh does)",
        )?;
        let (calls, rows): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT sum(calls)::int8, sum(rows)::int8 FROM pg_stat_statements s
             JOIN pg_database d ON d.oid = s.dbid
             WHERE d.datname = current_database() AND s.query ~* '^\\s*(INSERT\\s+INTO|UPDATE)\\s+droplets\\M'",
        )
        .fetch_one(&self.pool)
        .await
        .context("reading pg_stat_statements")?;
        Ok((calls.unwrap_or(0), rows.unwrap_or(0)))
    }

    pub async fn droplet_count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM droplets").fetch_one(&self.pool).await?)
    }
}

/// Liveness clocks shrunk for tests.
pub fn fast_timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_millis(100),
        missed_heartbeats: 3,
        flush_interval: Duration::from_millis(200),
        reconnect_grace: Duration::from_secs(1),
        reconnect_spread: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(3),
        hello_timeout: Duration::from_secs(3),
        reconcile_interval: Duration::from_secs(1),
        retention: Duration::from_secs(30 * 24 * 3600),
        prune_interval: Duration::from_secs(3600),
    }
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// Puts `authorization: Bearer <key>` on every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A fleet API client that sends an API key.
pub type Fleet = FleetClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A plaintext client of the fleet API at `addr` (served with `--api-plaintext`), calling
/// with `key`.
pub async fn fleet_client(addr: SocketAddr, key: &str) -> anyhow::Result<Fleet> {
    fleet_over(Endpoint::from_shared(format!("http://{addr}"))?.connect().await?, key)
}

/// A fleet API client over `channel`, calling with `key`.
pub fn fleet_over(channel: Channel, key: &str) -> anyhow::Result<Fleet> {
    let bearer = Bearer(format!("Bearer {key}").parse().context("an API key is ASCII")?);
    Ok(FleetClient::with_interceptor(channel, bearer))
}

/// An HTTP client (rustls with ring) trusting the CA certificates in `ca_pem`.
pub fn http_client(ca_pem: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(cert?)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder().tls_backend_preconfigured(tls).build()?)
}

/// A new API key, straight into the database as `api-key create` makes one.
pub async fn api_key(
    pool: &PgPool,
    account: &str,
    scope: flotilla_control_plane::api::auth::Scope,
) -> anyhow::Result<String> {
    Ok(flotilla_control_plane::api::auth::create(pool, account, scope, "tests", None).await?.key)
}

/// How a test control plane serves its API.
#[derive(Clone)]
pub struct ApiOptions {
    /// Requests per second per key.
    pub rate: NonZeroU32,
    pub jwt: Option<flotilla_control_plane::api::auth::jwt::JwtConfig>,
    /// What new droplets run, and the providers that make them.
    pub agent_image: String,
    pub providers: flotilla_control_plane::fleet::provisioning::Providers,
    pub provision_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            rate: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
            jwt: None,
            agent_image: "flotilla-agent:test".into(),
            providers: Default::default(),
            provision_timeout: Duration::from_secs(120),
        }
    }
}

/// A control plane serving in this process.
pub struct TestControlPlane {
    pub agent_addr: SocketAddr,
    pub enroll_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub timing: Timing,
    pub master_key: Arc<MasterKey>,
    pub cert_validity: Duration,
    /// An admin key of the `default` account, which `fleet()` calls with.
    pub admin_key: String,
    api: ApiOptions,
    pool: PgPool,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A stopped control plane, ready to start again on the same ports with the same keys.
pub struct Stopped {
    pool: PgPool,
    data_dir: PathBuf,
    timing: Timing,
    master_key: Arc<MasterKey>,
    cert_validity: Duration,
    api: ApiOptions,
    addrs: [SocketAddr; 3],
}

impl Stopped {
    pub async fn start_again(self) -> anyhow::Result<TestControlPlane> {
        let [agent, enroll, api] = self.addrs;
        let listeners = Listeners {
            agent: TcpListener::bind(agent).await?,
            enroll: TcpListener::bind(enroll).await?,
            api: TcpListener::bind(api).await?,
        };
        Builder {
            pool: self.pool,
            timing: self.timing,
            master_key: self.master_key,
            cert_validity: self.cert_validity,
            api: self.api,
            per_second: None,
            data_dir: Some(self.data_dir),
            listeners: Some(listeners),
        }
        .start()
        .await
    }
}

/// How a test control plane starts: [`TestControlPlane::builder`], then what differs from
/// the defaults (the tests' fast clocks, a new master key, hour-long droplet
/// certificates, [`ApiOptions::default`]), then `start()`.
pub struct Builder {
    pool: PgPool,
    timing: Timing,
    master_key: Arc<MasterKey>,
    cert_validity: Duration,
    api: ApiOptions,
    per_second: Option<u32>,
    /// Where a stopped control plane kept its files and listened: set only by
    /// [`Stopped::start_again`].
    data_dir: Option<PathBuf>,
    listeners: Option<Listeners>,
}

impl Builder {
    /// Liveness clocks, instead of [`fast_timing`].
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// A given master key: the same key makes another process of the same fleet.
    pub fn master_key(mut self, master_key: Arc<MasterKey>) -> Self {
        self.master_key = master_key;
        self
    }

    /// How long the droplet certificates it issues are valid.
    pub fn cert_validity(mut self, cert_validity: Duration) -> Self {
        self.cert_validity = cert_validity;
        self
    }

    /// These API options, in place of the defaults (and of `jwt` set before).
    pub fn api(mut self, api: ApiOptions) -> Self {
        self.api = api;
        self
    }

    /// Allows `per_second` API requests per key (above zero, checked at `start`).
    pub fn per_second(mut self, per_second: u32) -> Self {
        self.per_second = Some(per_second);
        self
    }

    /// Also accepts JWTs as `jwt` says.
    pub fn jwt(mut self, jwt: flotilla_control_plane::api::auth::jwt::JwtConfig) -> Self {
        self.api.jwt = Some(jwt);
        self
    }

    /// Serves on port 0 (or where it served before it stopped) and waits until the API
    /// answers.
    pub async fn start(self) -> anyhow::Result<TestControlPlane> {
        let Self { pool: owned_pool, timing, master_key, cert_validity, mut api, per_second, data_dir, listeners } =
            self;
        let pool = &owned_pool;
        if let Some(per_second) = per_second {
            api.rate = NonZeroU32::new(per_second).context("a rate above zero")?;
        }
        let listeners = match listeners {
            Some(listeners) => listeners,
            None => {
                let bind = || TcpListener::bind("127.0.0.1:0");
                Listeners { agent: bind().await?, enroll: bind().await?, api: bind().await? }
            }
        };
        let data_dir = data_dir.unwrap_or_else(|| temp_dir("flotilla-cp"));
        let agent_addr = listeners.agent.local_addr()?;
        let enroll_addr = listeners.enroll.local_addr()?;
        let api_addr = listeners.api.local_addr()?;
        let stop = CancellationToken::new();
        let config = ServeConfig {
            data_dir: data_dir.clone(),
            public_names: vec![],
            advertise_api: None,
            timing,
            master_key: master_key.clone(),
            cert_validity,
            api_rate_limit: api.rate,
            api_tls: flotilla_control_plane::identity::tls::ApiTls::FleetCa,
            jwt: api.jwt.clone(),
            agent_image: api.agent_image.clone(),
            providers: api.providers.clone(),
            provision_timeout: api.provision_timeout,
        };
        let admin_key = api_key(pool, "default", flotilla_control_plane::api::auth::Scope::Admin).await?;
        let task = tokio::spawn(flotilla_control_plane::serve(
            pool.clone(),
            config,
            listeners,
            stop.clone().cancelled_owned(),
        ));
        let cp = TestControlPlane {
            agent_addr,
            enroll_addr,
            api_addr,
            data_dir,
            timing,
            master_key,
            cert_validity,
            admin_key,
            api,
            pool: pool.clone(),
            stop,
            task,
        };
        // Serving once the server certificate exists and the API answers.
        wait_for("the control plane to serve", Duration::from_secs(20), || async {
            Ok(cp.data_dir.join("server.crt").exists() && cp.fleet().await.is_ok())
        })
        .await?;
        Ok(cp)
    }
}

pub fn new_master_key() -> Arc<MasterKey> {
    Arc::new(MasterKey::from_bytes(&rand::random::<[u8; 32]>()).expect("32 bytes make a key"))
}

impl TestControlPlane {
    /// A control plane on `pool`, to set up and `start()`.
    pub fn builder(pool: &PgPool) -> Builder {
        Builder {
            pool: pool.clone(),
            timing: fast_timing(),
            master_key: new_master_key(),
            cert_validity: Duration::from_secs(3600),
            api: ApiOptions::default(),
            per_second: None,
            data_dir: None,
            listeners: None,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(self) -> anyhow::Result<Stopped> {
        self.stop.cancel();
        self.task.await.context("control plane task")??;
        Ok(Stopped {
            pool: self.pool,
            data_dir: self.data_dir,
            timing: self.timing,
            master_key: self.master_key,
            cert_validity: self.cert_validity,
            api: self.api,
            addrs: [self.agent_addr, self.enroll_addr, self.api_addr],
        })
    }

    /// Stops and starts again on the same ports with the same CA.
    pub async fn restart(self) -> anyhow::Result<Self> {
        self.stop().await?.start_again().await
    }

    /// The fleet's CAs, as this control plane reads them.
    pub async fn authorities(&self) -> anyhow::Result<Authorities> {
        Ok(Authorities::load_or_create(&self.pool, &self.master_key).await?.0)
    }

    pub async fn ca(&self) -> anyhow::Result<Ca> {
        Ok(self.authorities().await?.active)
    }

    /// Fresh credentials for one droplet, valid for an hour, recorded as the operator tool
    /// `ca issue-agent` records them.
    pub async fn credentials(&self, droplet: DropletId) -> anyhow::Result<Credentials> {
        credentials(&self.pool, &self.master_key, droplet).await
    }

    pub fn agent_url(&self) -> String {
        format!("https://localhost:{}", self.agent_addr.port())
    }

    pub fn enroll_url(&self) -> String {
        format!("https://localhost:{}", self.enroll_addr.port())
    }

    /// The API's URL as clients give it (gRPC and HTTP share it). It serves TLS with a
    /// certificate from the fleet CA, for `localhost` among other names.
    pub fn api_url(&self) -> String {
        format!("https://localhost:{}", self.api_addr.port())
    }

    /// The CA certificates clients of the API trust, PEM.
    pub fn api_ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.api_ca_file())?)
    }

    /// A TLS connection to the API, trusting the fleet CA.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.api_ca_pem()?));
        Ok(Endpoint::from_shared(self.api_url())?.tls_config(tls)?.connect().await?)
    }

    /// An HTTP client for the API's HTTP/JSON side, trusting the fleet CA.
    pub fn http(&self) -> anyhow::Result<reqwest::Client> {
        http_client(Some(&self.api_ca_pem()?))
    }

    /// A client calling with `key`.
    pub async fn fleet_with(&self, key: &str) -> anyhow::Result<Fleet> {
        fleet_over(self.channel().await?, key)
    }

    /// The CA certificates (PEM) that clients of the API trust.
    pub fn api_ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.crt")
    }

    /// A client with the admin key.
    pub async fn fleet(&self) -> anyhow::Result<Fleet> {
        self.fleet_with(&self.admin_key).await
    }

    /// A client with a new key of `account` and `scope`.
    pub async fn fleet_as(
        &self,
        account: &str,
        scope: flotilla_control_plane::api::auth::Scope,
    ) -> anyhow::Result<Fleet> {
        self.fleet_with(&api_key(&self.pool, account, scope).await?).await
    }

    /// A token through the API.
    pub async fn token(&self, droplet: Option<DropletId>) -> anyhow::Result<CreateEnrollmentTokenResponse> {
        let request = CreateEnrollmentTokenRequest {
            droplet_id: droplet.map(|d| d.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        Ok(self.fleet().await?.create_enrollment_token(request).await?.into_inner())
    }

    /// A new droplet with no agent yet (`pending`), made the way operators make one: by
    /// creating an enrollment token.
    pub async fn pending_droplet(&self) -> anyhow::Result<DropletId> {
        Ok(self.token(None).await?.enrollment_token.unwrap_or_default().droplet_id.parse()?)
    }

    pub async fn droplet(&self, id: DropletId) -> anyhow::Result<Droplet> {
        let mut fleet = self.fleet().await?;
        Ok(fleet.get_droplet(GetDropletRequest { id: id.to_string() }).await?.into_inner())
    }

    /// Waits until the droplet has `status` through the API.
    pub async fn await_status(
        &self,
        id: DropletId,
        status: DropletStatus,
        within: Duration,
    ) -> anyhow::Result<Droplet> {
        wait_for(&format!("droplet {id} to be {status:?}"), within, || async {
            Ok(self.droplet(id).await.map(|d| d.status() == status).unwrap_or(false))
        })
        .await?;
        self.droplet(id).await
    }

    /// An in-process agent for `droplet` with operator-issued credentials, using this
    /// machine's Docker engine.
    pub async fn agent(&self, droplet: DropletId) -> anyhow::Result<TestAgent> {
        self.agent_with(droplet, "/var/run/docker.sock").await
    }

    pub async fn agent_with(&self, droplet: DropletId, docker_socket: &str) -> anyhow::Result<TestAgent> {
        let credentials = self.credentials(droplet).await?;
        // The droplet's own state dir, the same for every agent of this droplet: an agent
        // started again finds its record of applied commands, as on a real droplet.
        let state_dir = std::env::temp_dir().join(format!("flotilla-agent-{droplet}"));
        Ok(self.spawn_agent(IdentitySource::Fixed(credentials), docker_socket, Some(state_dir)))
    }

    /// An in-process agent keeping its credentials in `state_dir`, enrolling with `token`
    /// when it has none.
    pub fn enrolling_agent(&self, state_dir: &std::path::Path, token: Option<&str>) -> TestAgent {
        let enrollment = token.map(|token| Enrollment {
            token: token.to_owned(),
            url: self.enroll_url(),
            trust: Trust::Pin(flotilla_agent::enroll::pin_from_token(token).unwrap_or_default()),
        });
        let identity = IdentitySource::StateDir { store: Store::new(state_dir), enrollment };
        self.spawn_agent(identity, "/var/run/docker.sock", Some(state_dir.to_owned()))
    }

    fn spawn_agent(&self, identity: IdentitySource, docker_socket: &str, state_dir: Option<PathBuf>) -> TestAgent {
        agent_at(self.agent_url(), identity, docker_socket, state_dir)
    }

    /// A bare protocol client with valid credentials: it speaks only when told to.
    pub async fn raw_session(&self, droplet: DropletId, hello: Hello) -> anyhow::Result<RawSession> {
        let creds = self.credentials(droplet).await?;
        self.raw_session_with(&creds, hello).await
    }

    pub async fn raw_session_with(&self, creds: &Credentials, hello: Hello) -> anyhow::Result<RawSession> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&creds.ca_pem))
            .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(self.agent_url())?.tls_config(tls)?.connect().await?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage { seq: 1, kind: Some(agent_message::Kind::Hello(hello)) }).await?;
        let inbound = AgentGatewayClient::new(channel).connect(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RawSession { tx, inbound })
    }
}

/// Fresh credentials for one droplet from the fleet CA in `pool`, valid for an hour,
/// recorded as the operator tool `ca issue-agent` records them.
pub async fn credentials(pool: &PgPool, master_key: &MasterKey, droplet: DropletId) -> anyhow::Result<Credentials> {
    let authorities = Authorities::load_or_create(pool, master_key).await?.0;
    let ca = &authorities.active;
    let now = time::OffsetDateTime::now_utc();
    let issued = ca.issue_agent(droplet, now - time::Duration::minutes(1), now + time::Duration::hours(1))?;
    let mut conn = pool.acquire().await?;
    flotilla_control_plane::identity::enrollment::record(&mut conn, ca, droplet, &issued, "operator").await?;
    Ok(Credentials { cert_pem: issued.cert_pem, key_pem: issued.key_pem, ca_pem: authorities.bundle.concat() })
}

/// An in-process agent dialling `url`.
pub fn agent_at(url: String, identity: IdentitySource, docker_socket: &str, state_dir: Option<PathBuf>) -> TestAgent {
    let config = AgentConfig {
        control_plane: url,
        server_name: None,
        identity,
        docker_socket: docker_socket.into(),
        disk_path: "/".into(),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        state_dir,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(flotilla_agent::run(config, stop.clone()));
    TestAgent { stop, task }
}

pub struct RawSession {
    pub tx: mpsc::Sender<AgentMessage>,
    pub inbound: tonic::Streaming<ControlMessage>,
}

impl RawSession {
    pub async fn next(&mut self) -> anyhow::Result<ControlMessage> {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .context("no message from the control plane")??
            .context("the control plane closed the stream")
    }
}

/// A `Hello` as an agent of this build would send it.
pub fn hello() -> Hello {
    Hello {
        protocol: Some(flotilla::protocol::CURRENT),
        agent_version: "test".into(),
        host: Some(HostFacts { hostname: "raw-client".into(), cpu_count: 1, ..Default::default() }),
        ..Default::default()
    }
}

pub struct TestAgent {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestAgent {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("agent task")?
    }

    /// How the agent ended by itself (an error it could not get past).
    pub async fn ended(self, within: Duration) -> anyhow::Result<anyhow::Result<()>> {
        tokio::time::timeout(within, self.task).await.context("the agent is still running")?.context("agent task")
    }
}

/// For a test that installs process-wide state (the global tracing subscriber): runs the
/// test `name` (`area::test`) again, alone in a process of its own (this binary, `--exact`),
/// and fails if it fails there. True in that process, where the test does its work.
pub async fn alone(name: &str) -> anyhow::Result<bool> {
    const ALONE: &str = "FLOTILLA_TEST_ALONE";
    if std::env::var_os(ALONE).is_some() {
        return Ok(true);
    }
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", name, "--nocapture"])
        .env(ALONE, name)
        .output()
        .await
        .context("running the test alone")?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    anyhow::ensure!(output.status.success(), "{name}, alone in a process, failed ({}):\n{text}", output.status);
    anyhow::ensure!(text.contains("1 passed"), "{name} did not run alone:\n{text}");
    Ok(false)
}

/// Polls `check` until it says true, failing with `what` after `within`. For waiting on
/// eventual states, never for asserting speed.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A plain `AgentGateway` client for the enrollment port: it trusts the fleet CA and
/// presents no certificate.
pub async fn enroll_client(cp: &TestControlPlane) -> anyhow::Result<AgentGatewayClient<Channel>> {
    let bundle = cp.authorities().await?.bundle.concat();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(bundle)).domain_name("localhost");
    let channel = Endpoint::from_shared(cp.enroll_url())?.tls_config(tls)?.connect().await?;
    Ok(AgentGatewayClient::new(channel))
}

/// A CSR for a fresh key, as an agent makes it.
pub fn csr() -> anyhow::Result<String> {
    Ok(flotilla_agent::enroll::key_and_csr()?.1)
}

/// The droplet named by the first certificate of a PEM chain.
pub fn droplet_of(pem: &str) -> anyhow::Result<DropletId> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().context("no certificate")??;
    Ok(flotilla::identity::droplet_from_certificate(&der)?)
}

impl TestDb {
    /// (certificates issued, tokens used) — what an enrollment changes.
    pub async fn enrollment_state(&self) -> anyhow::Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM certificates), (SELECT count(*) FROM enrollment_tokens WHERE used_at IS NOT NULL)",
        )
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Dials `cp`'s agent port with raw rustls, trusting `ca_pem` and presenting `client` (a
/// PEM certificate and key, or nothing), and returns the server's verdict: `Ok` if it
/// answered HTTP/2, else the TLS error it sent. In TLS 1.3 the client finishes its side
/// first, so the verdict arrives on the first read.
pub async fn tls_verdict(
    cp: &TestControlPlane,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> anyhow::Result<Result<(), rustls::Error>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut key.as_bytes())?.context("no private key")?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cp.agent_addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await??;
        Ok::<_, std::io::Error>(())
    }
    .await;
    Ok(outcome.map_err(|e| match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.clone(),
        None => rustls::Error::General(e.to_string()),
    }))
}

/// The `p` quantile (0..=1) of sorted samples, for the benchmarks' figures.
#[allow(dead_code, reason = "only the benchmarks (benches/) use it")]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
