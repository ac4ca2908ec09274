//! The Fleet API: what operators, scripts and Supabase Edge Functions call, over gRPC
//! ([`grpc`]) and HTTP/JSON ([`http`]) with one behaviour. Handlers authenticate
//! ([`auth`]), convert ([`convert`]), call the fleet, and map its errors ([`status`]).

pub mod auth;
pub mod convert;
pub mod grpc;
pub mod http;
pub mod openapi;
pub mod paging;
pub mod status;

use tokio_util::sync::CancellationToken;

use crate::{fleet::Fleet, session::Agents};

/// What the API floor needs, as one cheap-to-clone handle.
#[derive(Clone)]
pub struct Api {
    pub fleet: Fleet,
    /// For live reads, answered by the droplet's session (here or on another replica).
    pub agents: Agents,
    /// Checks API credentials and limits each key's rate.
    pub keys: auth::ApiKeys,
    /// Cancelled when shutdown begins: long streams (events) end so the API can stop.
    pub stopping: CancellationToken,
}
