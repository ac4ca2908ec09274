//! What every part of a running control plane shares: a cheap-to-clone handle.

use sqlx::PgPool;

use crate::{config::Timing, sessions::Sessions};

#[derive(Clone)]
pub struct State {
    pub db: PgPool,
    pub sessions: Sessions,
    pub timing: Timing,
    /// The CAs agents must trust, PEM, for `Welcome`.
    pub trust_bundle: std::sync::Arc<[String]>,
}
