// Vendored from etcd-client 0.21.1 (MIT): the only change is this build script, which compiles
// the protobufs with protox instead of `protoc`, so building sixfive's tests needs no `protoc`.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    let fds = protox::compile(
        [
            "etcd/api/authpb/auth.proto",
            "etcd/api/etcdserverpb/rpc.proto",
            "etcd/api/mvccpb/kv.proto",
            "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ],
        [proto_root],
    )
    .expect("Failed to compile proto files");
    tonic_prost_build::configure()
        .build_server(should_build_server())
        .compile_fds(fds)
        .expect("Failed to generate code from the proto files");
}
