//! The Flotilla control plane: sessions with agents over mutual TLS, droplet state in
//! PostgreSQL, and the fleet API.
//!
//! `serve` is the whole server; `main.rs` only parses flags, binds and waits for a signal.

pub mod api;
pub mod auth;
pub mod cloudinit;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod deployments;
pub mod enrollment;
pub mod events;
pub mod gateway;
pub mod http;
pub mod jwt;
pub mod labels;
pub mod live;
pub mod liveness;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod pki;
pub mod provider;
pub mod provisioning;
pub mod reconcile;
pub mod replicas;
pub mod requests;
pub mod retention;
pub mod revocation;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod tls;

pub use server::{Listeners, ServeConfig, serve};
