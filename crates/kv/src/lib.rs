//! # sixfive-kv: the key/value service
//!
//! - [`store`]: the state machine: versioned Put/Get, exactly-once Append, Delete, ordered
//!   Scan, with size limits checked before anything changes;
//! - [`server`]: the single-server service and its [`server::Request`] protocol;
//! - [`clerk`]: its client, which retries until it hears back and reports a retried Put's
//!   ErrVersion as ErrMaybe, and records histories for linearizability checks;
//! - [`lock`]: a lock built only on the clerk's Get and Put;
//! - [`replicated`]: the fault-tolerant service: the store as a replicated state machine
//!   with exactly-once client sessions, and the clerk that finds the leader.
//!
//! Servers are [`sixfive_rpc::Node`]s and clerks are async over [`sixfive_rpc::Transport`],
//! so the deterministic simulator and the production runtime run the same code.
#![deny(missing_docs)]

#[cfg(feature = "sim")]
pub mod check;
pub mod clerk;
pub mod lock;
pub mod replicated;
pub mod server;
pub mod store;
#[cfg(feature = "sim")]
pub mod swarm;

pub use clerk::{Clerk, History, KvClient, Record};
pub use lock::{Lock, LockError};
pub use replicated::{KvSm, RaftClerk};
pub use server::{KvServer, Request};
pub use store::{KvError, KvStore, Op, OpResult};
