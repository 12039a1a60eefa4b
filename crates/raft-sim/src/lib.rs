//! # sixfive-raft-sim: Raft clusters in the deterministic simulator
//!
//! [`Cluster`] runs nodes of the sans-IO core over the simulator's faulty network and lossy
//! disks in virtual time, with the safety [`Checker`] after every event. [`swarm`] mixes every
//! fault at random under one seed and then requires the healed cluster to make progress.
//! The scenario suite of the course lives in this crate's `tests/`.
#![deny(missing_docs)]

pub mod bench;
mod checker;
mod cluster;
mod storage;
pub mod swarm;

pub use checker::Checker;
pub use cluster::{AppliedLog, Cluster, ClusterConfig, TICK, cmd};
pub use storage::{NodeStorage, RaftDisk, RaftOp, SimStorage};
