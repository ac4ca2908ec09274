//! Flotilla: run MCP servers on a fleet of droplets.
//!
//! This root crate holds what the control plane and the agent share: the generated
//! protocol (`proto`), the protocol version rules (`protocol`) and how a droplet is
//! named in its certificate (`identity`).

pub mod identity;
pub mod protocol;
pub mod spec;
pub mod telemetry;

/// Code generated from `proto/flotilla/v1` by `build.rs`.
pub mod proto {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("flotilla.v1");

    /// The encoded descriptor set of every Flotilla proto file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));
}

pub use identity::DropletId;
