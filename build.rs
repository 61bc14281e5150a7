//! Generates the gRPC code for the SPIFFE Workload API and Sigil's own APIs
//! from `proto/`, with a pure-Rust protobuf compiler so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spiffe/workload.proto",
        "proto/sigil/types/v1/types.proto",
        "proto/sigil/agent/v1/agent.proto",
        "proto/sigil/admin/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }

    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    Ok(())
}
