//! Compiles etcd's protobufs (crates/etcd/proto) with protox, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["etcd/api/etcdserverpb/rpc.proto", "etcd/api/mvccpb/kv.proto", "etcd/api/authpb/auth.proto"];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
