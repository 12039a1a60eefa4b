//! etcd v3 API
#![deny(missing_docs)]

pub mod proto;
