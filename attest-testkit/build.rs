//! Compiles SPIFFE's workload.proto (X.509 part) with protox, a pure-Rust protobuf
//! compiler, so no system `protoc` is needed; tonic-prost-build generates the server
//! the tests run and a client used to check that the server refuses requests without the
//! `workload.spiffe.io` header.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let descriptors = protox::compile(["workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
