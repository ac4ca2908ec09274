//! What every part of a running control plane shares: a cheap-to-clone handle.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;

use crate::{
    commands::Completions, config::Timing, crypto::MasterKey, pki::Authorities, revocation::Revocations,
    sessions::Sessions,
};

#[derive(Clone)]
pub struct State {
    pub db: PgPool,
    pub sessions: Sessions,
    pub timing: Timing,
    /// The CAs in service: the active one signs droplet certificates.
    pub authorities: Arc<Authorities>,
    pub revocations: Revocations,
    /// How long droplet certificates are valid.
    pub cert_validity: Duration,
    /// Seals deployment specs (they may carry secrets).
    pub master_key: Arc<MasterKey>,
    /// Commands reaching a final state, for `WaitCommand`.
    pub completions: Completions,
    /// This process, among the control planes sharing the database.
    pub replica: uuid::Uuid,
    /// Checks API credentials and limits each key's rate.
    pub keys: crate::auth::ApiKeys,
    /// Wakes `WatchEvents` streams when events are written.
    pub bell: crate::events::Bell,
    /// Cancelled when shutdown begins: long streams (events) end so the API can stop.
    pub stopping: tokio_util::sync::CancellationToken,
    /// TLS for calls to other replicas' APIs (`None`: they serve plaintext).
    pub forward_tls: Option<tonic::transport::ClientTlsConfig>,
    /// What new droplets are told: where to connect and which agent image to run.
    pub endpoints: Endpoints,
    /// The providers droplets can be made with (besides `byo`).
    pub providers: crate::provisioning::Providers,
    /// How long a provider's droplet has to connect before it is `error` and cleaned up.
    pub provision_timeout: Duration,
}

/// Where droplets reach the control plane, and the agent image they run.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// `host:port` of the agent port.
    pub agent: String,
    /// `host:port` of the enrollment port.
    pub enroll: String,
    pub agent_image: String,
}

impl State {
    /// The CAs agents must trust, PEM, for `Welcome` and `Certificate`.
    pub fn trust_bundle(&self) -> flotilla::proto::TrustBundle {
        flotilla::proto::TrustBundle { ca_certificates_pem: self.authorities.bundle.clone() }
    }
}
