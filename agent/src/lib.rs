//! The Flotilla agent: one per droplet. It dials out to the control plane over mutual
//! TLS, reports its host and keeps the session alive.

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
