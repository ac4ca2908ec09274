//! Compiles `proto/` into Rust with `tonic-prost-build`.
//!
//! `protox` parses the `.proto` files in pure Rust, so a plain `cargo build` needs no
//! `protoc` on the machine. The same descriptor set is written to `OUT_DIR` for gRPC
//! server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] =
    &["proto/flotilla/v1/types.proto", "proto/flotilla/v1/agent.proto", "proto/flotilla/v1/fleet.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(out_dir.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The RPC `Connect` would clash with the generated `AgentGatewayClient::connect(dst)`;
        // clients build a `Channel` themselves and call `new`.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
