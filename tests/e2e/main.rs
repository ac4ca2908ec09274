//! The end-to-end tests, one module per area, in one test binary: real PostgreSQL (a fresh
//! database per test), control planes on port 0, real agents and Docker containers, real
//! TLS and gRPC. One binary links the helpers and the workspace's crates once instead of
//! once per area. Run them with `scripts/test.sh`; a name filter picks an area
//! (`scripts/test.sh enrollment::`) or a test.

mod helpers;

mod api;
mod auth;
mod chaos;
mod cli;
mod cloudinit;
mod commands;
mod deployments;
mod digitalocean;
mod edge_function;
mod enrollment;
mod events;
mod grpcurl;
mod heartbeats;
mod http;
mod images;
mod jwt;
mod lifecycle;
mod live;
mod openapi;
mod provisioning;
mod reconcile;
mod refusals;
mod registry;
mod replicas;
mod revocation;
mod rotation;
mod runtime;
mod secrets;
mod session;
