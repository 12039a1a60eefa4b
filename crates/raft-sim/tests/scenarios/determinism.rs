//! Determinism: one seed decides everything, so two runs of a seed give the same trace.

use sixfive_raft_sim::swarm;
use sixfive_sim::SEC;

#[test]
fn same_seed_same_trace() {
    for seed in [1, 2, 3] {
        let a = swarm::run(seed, 5 * SEC);
        let b = swarm::run(seed, 5 * SEC);
        assert_eq!(a, b, "seed {seed} ran differently twice");
    }
    assert_ne!(swarm::run(1, 5 * SEC).trace, swarm::run(2, 5 * SEC).trace, "different seeds, same trace");
}
