//! Compiles `proto/` into Rust for the `sagamesh-proto` crate.
//!
//! protox parses the protos in pure Rust, so building needs no `protoc`. The
//! descriptor set is also written out for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto_dir = root.join("proto");
    let files = [
        "sagamesh/v1/events.proto",
        "sagamesh/v1/router.proto",
        "sagamesh/v1/coordinator.proto",
        "sagamesh/v1/wallets.proto",
        "sagamesh/v1/inventory.proto",
        "sagamesh/v1/purchase_logs.proto",
        "sagamesh/v1/notifications.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={}", proto_dir.join(file).display());
    }
    let descriptors = protox::compile(files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("sagamesh_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Our codec answers a message that does not decode INVALID_ARGUMENT
    // rather than INTERNAL (see `codec.rs`).
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
