//! The Flotilla control plane: sessions with agents over mutual TLS, droplet state in
//! PostgreSQL, and the fleet API.
//!
//! One house with floors, each depending only on the floors below it:
//!
//! - [`api`]: the Fleet API over gRPC and HTTP/JSON, authentication, OpenAPI;
//! - [`session`]: one task per connected agent, the registry of sessions, live requests,
//!   liveness, replicas, and command delivery down a stream;
//! - [`fleet`]: the domain: droplets, deployments, the command ledger, desired state,
//!   provisioning, events;
//! - [`identity`]: the fleet CA, the master key, enrollment, revocation, TLS;
//! - [`store`]: every SQL statement, `LISTEN/NOTIFY`, retention.
//!
//! [`timing`], [`labels`] and [`metrics`] are leaves every floor may use. Only [`server`]
//! (wiring and shutdown order) and [`admin`] name every floor. `scripts/layers.sh` checks
//! these rules.

pub mod admin;
pub mod api;
pub mod cli;
pub mod fleet;
pub mod identity;
pub mod labels;
pub mod metrics;
pub mod server;
pub mod session;
pub mod store;
pub mod timing;

pub use server::{Listeners, ServeConfig, serve};
