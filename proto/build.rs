//! Compiles `switchboard/v1/*.proto` with protox (pure Rust: no `protoc` needed) and
//! writes the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "switchboard/v1/common.proto",
        "switchboard/v1/messaging.proto",
        "switchboard/v1/placement.proto",
        "switchboard/v1/edge.proto",
        "switchboard/v1/resources.proto",
        "switchboard/v1/admin.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("switchboard_descriptor.bin"), bytes)?;
    // Codegen only: the crates that serve and dial bring tonic's transports (so no
    // `connect(url)` here), and the services exist only with the `grpc` feature, so that a
    // crate using the messages alone (edge-core) sees neither tonic nor tokio.
    let grpc_only = "#[cfg(feature = \"grpc\")]";
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .client_mod_attribute(".", grpc_only)
        .server_mod_attribute(".", grpc_only)
        .compile_fds(fds)?;
    Ok(())
}
