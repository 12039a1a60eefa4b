//! # sixfive-raft: a sans-IO Raft core
//!
//! The consensus algorithm of Ongaro and Ousterhout's "In Search of an Understandable Consensus
//! Algorithm" (cited as "section N") and Ongaro's thesis (cited as "thesis section N"), as a pure
//! state machine in the style of etcd-io/raft and tikv/raft-rs. It has no threads, clock,
//! sockets or files: the same input on the same state gives the same output, so a simulator can
//! drive a whole cluster deterministically and a production driver can run it over TCP and disk.
//!
//! Inputs: [`RawNode::tick`], [`RawNode::step`], [`RawNode::propose`], [`RawNode::read_index`],
//! [`RawNode::transfer_leader`], [`RawNode::compact`]. Output: [`Ready`], whose documentation
//! says what the driver must do and in which order, acknowledged with [`RawNode::advance`].
//! A leader's replication messages may leave before its own write of the same entries
//! (thesis section 10.2.1); it counts its own copy only once the write is reported done. The
//! safety argument is on [`Ready`].
//!
//! Features: elections with randomised timeouts, pre-vote, check-quorum with leader lease;
//! replication with fast backtracking, batching (every proposal made between two `Ready`s goes
//! out in one message per follower), pipelining with a bounded in-flight window, a message size
//! limit; snapshots with chunked InstallSnapshot (each transfer a stream with its own identity
//! and checksum, kept valid while the leader compacts again); ReadIndex, with the requests that
//! arrive together sharing one heartbeat round; leadership transfer; back-pressure (bounds on
//! uncommitted proposal bytes, committed bytes per `Ready` and pending reads, refused with
//! typed, retryable errors); no fsync for a change of the commit index alone.
//!
//! Design choices: the log lives in memory after the latest snapshot (the application compacts
//! it by taking snapshots), so the core never reads storage; membership changes online
//! ([`RawNode::propose_conf_change`]: learners, joint consensus, removal; the rules and their
//! safety argument are in the [`conf`] module); a new leader appends a no-op entry, so the first command of a fresh cluster has index 2.
//!
//! ```
//! use sixfive_raft::{Config, RawNode};
//! let mut node = RawNode::new(Config::new(1, vec![1])).unwrap();
//! node.campaign(); // a single-voter cluster elects itself
//! let (index, _term) = node.propose(b"x".to_vec()).unwrap();
//! let ready = node.ready();
//! // send ready.messages (a leader's Appends) at once; persist ready.entries and
//! // ready.hard_state; then send ready.persisted_messages and apply ready.committed_entries.
//! assert_eq!(ready.entries.last().unwrap().index, index);
//! node.advance(&ready);
//! // The leader counts its own copy once persisted: alone, that commits the entry.
//! let ready = node.ready();
//! assert_eq!(ready.committed_entries.last().unwrap().index, index);
//! node.advance(&ready);
//! ```
#![deny(missing_docs)]

pub mod bytes;
pub mod conf;
mod config;
mod log;
mod progress;
mod raft;
mod raw_node;
mod read_only;
mod storage;
mod types;

pub use conf::{ConfChange, ConfChangeError, ConfState};
pub use config::{Config, ConfigError};
pub use log::{Compacted, RaftLog};
pub use progress::{Progress, ProgressState};
pub use raft::{ProposeError, Role};
pub use raw_node::{CompactError, RawNode, Ready, Status, StepError};
pub use storage::{RestoredState, SnapshotWriter, Storage, SyncJob, persist_ready, write_ready};
pub use types::*;

/// The README's examples are compiled and run as doctests, so they cannot go stale.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
