//! Test support shared by the KV scenario suites.
#![allow(unused_imports)]

pub use sixfive_kv::check::*;
