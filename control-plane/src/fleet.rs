//! The domain: droplets, deployments, the command ledger, desired state, provisioning and
//! the event log. It takes validated values and knows nothing of sessions or the API.

pub mod commands;
pub mod deployments;
pub mod droplets;
pub mod events;
pub mod provisioning;
pub mod reconcile;

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use uuid::Uuid;

use crate::identity::{master_key::MasterKey, pki::Authorities};

/// What the domain needs, as one cheap-to-clone handle: the database and the few shared
/// pieces its functions use. Nothing of sessions or the API.
#[derive(Clone)]
pub struct Fleet {
    pub db: PgPool,
    /// Seals deployment specs (they may carry secrets).
    pub master_key: Arc<MasterKey>,
    /// The CAs in service: tokens carry the active one's pin.
    pub authorities: Arc<Authorities>,
    /// Commands reaching a final state, for `WaitCommand`.
    pub completions: commands::Completions,
    /// Wakes `WatchEvents` streams when events are written.
    pub bell: events::Bell,
    /// What new droplets are told: where to connect and which agent image to run.
    pub endpoints: Arc<provisioning::Endpoints>,
    /// The providers droplets can be made with (besides `byo`).
    pub providers: Arc<provisioning::Providers>,
    /// How long a provider's droplet has to connect before it is `error` and cleaned up.
    pub provision_timeout: Duration,
    /// This process, among the control planes sharing the database (provisioning leases).
    pub replica: Uuid,
}
