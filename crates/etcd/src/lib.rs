//! # sixfive-etcd: etcd's v3 API on sixfive
#![deny(missing_docs)]

pub mod error;
pub mod mvcc;
pub mod proto;
pub mod replica;
pub mod service;
pub mod sm;

pub use error::EtcdError;
pub use replica::{LocalReplica, Replica, ReplicaError, ReplicaStatus};
pub use service::{EtcdService, ServiceConfig};
pub use sm::{Command, Config, EtcdSm, Output, Query, QueryOutput};
