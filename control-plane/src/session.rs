//! Sessions with agents: one task per connected droplet ([`agent_service`]), the registry
//! of this process's sessions ([`registry`]), command delivery down a stream
//! ([`delivery`]), live requests and their forwarding ([`requests`], [`live`]), liveness
//! from heartbeats ([`liveness`]), and several replicas on one database ([`replicas`]).
//! The agent protocol's messages stop here.

pub mod accept;
pub mod agent_service;
pub mod delivery;
pub mod live;
pub mod liveness;
pub mod registry;
pub mod replicas;
pub mod requests;

use std::{sync::Arc, time::Duration};

use uuid::Uuid;

use crate::{
    fleet::Fleet,
    identity::{pki::Authorities, revocation::Revocations},
    timing::Timing,
};

/// What the session floor needs, as one cheap-to-clone handle.
#[derive(Clone)]
pub struct Agents {
    pub fleet: Fleet,
    /// The sessions of this process.
    pub sessions: registry::Sessions,
    pub timing: Timing,
    /// This process, among the control planes sharing the database.
    pub replica: Uuid,
    /// The CAs in service: the active one signs renewed certificates.
    pub authorities: Arc<Authorities>,
    pub revocations: Revocations,
    /// How long droplet certificates are valid.
    pub cert_validity: Duration,
    /// TLS for calls to other replicas' APIs (`None`: they serve plaintext).
    pub forward_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Agents {
    pub fn db(&self) -> &sqlx::PgPool {
        &self.fleet.db
    }

    /// The CAs agents must trust, PEM, for `Welcome` and `Certificate`.
    pub fn trust_bundle(&self) -> flotilla::proto::TrustBundle {
        flotilla::proto::TrustBundle { ca_certificates_pem: self.authorities.bundle.clone() }
    }
}
