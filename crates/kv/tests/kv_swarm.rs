//! The KV swarm (see `sixfive_kv::swarm`): CI runs a few hundred seeds; `SEEDS=10000` for more.

use sixfive_sim::seeds::run_seeds;

#[test]
fn kv_swarm_random_faults() {
    let mut total = sixfive_kv::swarm::KvSwarmReport::default();
    run_seeds("kv_swarm_random_faults", 300, |seed| {
        let r = sixfive_kv::swarm::run(seed);
        total.merge(&r);
    });
    // The swarm must exercise the service, not idle through its faults.
    assert!(total.ops > 0 && total.crashes > 0 && total.acked_puts > 0 && total.acked_appends > 0, "{total:?}");
}
