//! The Flotilla agent: one per droplet. It dials out to the control plane over mutual
//! TLS, reports its host, and runs the containers of the deployments it is given.
//!
//! Layers, top down (`scripts/layers-agent.sh` checks there is no circle): `link` holds the
//! session and is the only module that starts the others' tasks; `executor`, `health`,
//! `events` and `logs` act and report over the session's `wire`; they reach Docker
//! through `runtime` (and its `probe`, `status`, `pull`), which names only `labels`.
//! `config`, `identity`, `enroll`, `ledger`, `backoff`, `host` and `docker` are leaves or
//! nearly so.

pub mod backoff;
pub mod config;
pub mod docker;
pub mod enroll;
mod events;
mod executor;
pub mod health;
pub mod host;
pub mod identity;
pub mod labels;
pub mod ledger;
pub mod link;
mod logs;
pub mod runtime;
mod wire;

pub use config::{AgentConfig, Enrollment, IdentitySource};
pub use identity::Credentials;
pub use link::run;
