//! The shardkv swarm (see `sixfive_shardkv::swarm`): CI runs a few hundred seeds;
//! `SEEDS=2000` (or more) for a longer hunt, `SEED=n` to replay one.

use sixfive_sim::seeds::run_seeds;

#[test]
fn shardkv_swarm_random_faults() {
    let mut total = sixfive_shardkv::swarm::ShardSwarmReport::default();
    run_seeds("shardkv_swarm_random_faults", 500, |seed| {
        let r = sixfive_shardkv::swarm::run(seed);
        total.merge(&r);
    });
    // The swarm must exercise the service, not idle through its faults.
    assert!(
        total.ops > 0 && total.crashes > 0 && total.reconfigs > 0 && total.acked_puts > 0 && total.acked_appends > 0,
        "{total:?}"
    );
}

#[test]
fn shardkv_same_seed_same_trace() {
    run_seeds("shardkv_same_seed_same_trace", 3, |seed| {
        let (a, b) = (sixfive_shardkv::swarm::run(seed), sixfive_shardkv::swarm::run(seed));
        assert_eq!(a, b, "two runs of one seed differ");
        assert!(a.events > 0);
    });
}
