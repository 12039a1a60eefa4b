//! The Raft scenario suite of the course (section 3 of LAB-TESTS.md), in virtual time.
//!
//! Every test runs under [`sixfive_sim::seeds::run_seeds`]: a failure prints its `SEED`, and
//! `SEED=n` replays it exactly; `SEEDS=k` runs `k` seeds.
//!
//! One adaptation throughout: our leaders append a no-op entry when elected (section 5.4.2,
//! needed for ReadIndex), so a fresh cluster's first command has index 2 and every election
//! adds one index. Where the course checks an absolute index, we check the same property
//! against the index the no-ops imply.

mod agreement;
mod determinism;
mod election;
mod hardening;
mod persistence;
mod snapshots;
mod swarm;

use sixfive_raft::NodeId;
use sixfive_raft_sim::Cluster;
use sixfive_sim::MS;

/// The course's election-timeout scale.
pub const ELECTION_TIMEOUT: u64 = 1000 * MS;

/// The node `k` places after `id` in a ring of `n` (the course's `(leader + k) % n`).
pub fn after(id: NodeId, k: u64, n: u64) -> NodeId {
    (id - 1 + k) % n + 1
}

/// A random command, as the course's `rand.Int()`.
pub fn rand_cmd(c: &mut Cluster) -> Vec<u8> {
    sixfive_raft_sim::cmd(c.rng.next_u64() >> 1)
}

/// Runs a scenario over the seeds the environment asks for (default: one, fixed per name).
pub fn scenario(name: &str, f: impl FnMut(u64)) {
    sixfive_sim::seeds::run_seeds(name, 1, f);
}
