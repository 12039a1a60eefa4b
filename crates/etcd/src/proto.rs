//! The etcd v3 protobuf types and gRPC services, generated at build time from `proto/`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `mvccpb`: key-values and watch events.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
/// `authpb`: users, roles and permissions.
pub mod authpb {
    tonic::include_proto!("authpb");
}
/// `etcdserverpb`: the KV, Watch, Lease, Cluster, Maintenance and Auth services.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
