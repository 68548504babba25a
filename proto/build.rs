//! Compiles the .proto contracts with protox, a pure-Rust parser, so builds need no `protoc`.
use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/billing/v1/billing.proto",
        "protos/usage/v1/usage.proto",
    ];
    let descriptors = protox::compile(files, ["protos"])?;

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    println!("cargo:rerun-if-changed=protos"); // compile_fds does not emit this itself
    Ok(())
}
