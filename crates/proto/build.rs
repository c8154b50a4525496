//! Compiles `proto/concord/v1/*.proto` with protox (pure Rust, so no system
//! `protoc` is needed) and generates prost messages and tonic services.
//! The encoded descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const FILES: [&str; 3] = [
    "concord/v1/types.proto",
    "concord/v1/client.proto",
    "concord/v1/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    for file in FILES {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let fds = protox::compile(FILES, [&proto_root])?;
    std::fs::write(out_dir.join("concord_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
