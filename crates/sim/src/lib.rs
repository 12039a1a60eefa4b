//! # sixfive-sim: deterministic simulation primitives
//!
//! Everything a whole-cluster simulation needs that is not specific to one layer:
//! - [`Rng`]: the one source of randomness, seeded;
//! - [`Network`]: the fault model of the scenario catalogue (reliable, unreliable, long
//!   reordering, long delays, disconnects, partitions) deciding each message's fate in virtual
//!   time, with per-node counters;
//! - [`Disk`]: a disk whose unsynced writes are lost (all, or all but a prefix) on a crash;
//! - [`EventQueue`]: timed events in virtual microseconds, ties broken by insertion order;
//! - [`World`]: a deterministic async executor in virtual time hosting event-driven server
//!   nodes and async clients (the `sixfive-rpc` seams), over the [`Network`];
//! - [`seeds`]: `SEED=n` replays one run, `SEEDS=n` runs a swarm, and every failure prints its seed.
//!
//! Nothing here reads the clock, spawns a thread or iterates a hash map: a seed decides all.
#![deny(missing_docs)]

mod disk;
mod net;
mod queue;
mod rng;
pub mod seeds;
mod world;

pub use disk::{Disk, DiskOp};
pub use net::{Counters, Endpoint, Fate, NetConfig, Network};
pub use queue::EventQueue;
pub use rng::Rng;
pub use world::{JoinHandle, SimClient, World};

/// Virtual time in microseconds.
pub type Micros = u64;
/// One millisecond of virtual time.
pub const MS: Micros = 1_000;
/// One second of virtual time.
pub const SEC: Micros = 1_000_000;
