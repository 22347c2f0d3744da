//! Compiles `schema/switchboard.proto` (the wire schema) and
//! `schema/switchboard_e2e.proto` (the end-to-end plaintext envelope, same
//! package) with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=schema/switchboard.proto");
    println!("cargo:rerun-if-changed=schema/switchboard_e2e.proto");
    let fds = protox::compile(["switchboard.proto", "switchboard_e2e.proto"], ["schema"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
