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
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
