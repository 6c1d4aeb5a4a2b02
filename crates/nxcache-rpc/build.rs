// Generates the gRPC code from proto/ with a vendored protoc: nothing to install.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let proto_root = "../../proto";
    let file = "../../proto/nxcache/cluster/v1/cluster.proto";
    tonic_prost_build::configure()
        // Artifact chunks as `Bytes`: handed to the store and the network without copies.
        .bytes(".nxcache.cluster.v1.PutChunk")
        .bytes(".nxcache.cluster.v1.GetChunk")
        .compile_protos(&[file], &[proto_root])?;
    println!("cargo:rerun-if-changed={file}");
    Ok(())
}
