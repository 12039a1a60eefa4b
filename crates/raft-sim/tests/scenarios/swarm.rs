//! The swarm: random seeds, random mixtures of every fault, all safety checks after every event,
//! then a healed cluster must make progress. CI runs a few hundred seeds; `SEEDS=10000` for more.

use sixfive_raft_sim::swarm;
use sixfive_sim::SEC;

#[test]
fn swarm_random_faults() {
    let mut total = swarm::SwarmReport::default();
    sixfive_sim::seeds::run_seeds("swarm_random_faults", 1500, |seed| {
        let r = swarm::run(seed, 20 * SEC);
        total.merge(&r);
    });
    eprintln!("swarm_random_faults totals: {total:?}");
    // The swarm must actually exercise the system, not idle through its faults (one replayed
    // seed need not show every one of them). Among them: leaders crashed after their Appends
    // left and before their own write was durable, and commits made by followers' copies
    // while the leader's own write was pending (`async_persist`).
    assert!(
        std::env::var("SEED").is_ok()
            || total.applied > 0
                && total.crashes > 0
                && total.crashes_after_early_send > 0
                && total.commits_before_own_sync > 0
                && total.leaders > 0
                && total.reads > 0
                && total.pauses > 0
                && total.conf_changes > 0,
        "{total:?}"
    );
}

/// The same swarm on the production `FileStorage` over a simulated disk that loses unsynced
/// pages in any order, zero-fills grown files, fails calls and takes time to sync.
#[test]
fn swarm_file_storage() {
    let mut total = swarm::SwarmReport::default();
    sixfive_sim::seeds::run_seeds("swarm_file_storage", 200, |seed| {
        let r = swarm::run_on(seed, 20 * SEC, swarm::SwarmStorage::File);
        total.merge(&r);
    });
    if std::env::var("SEED").is_err() {
        assert!(total.applied > 0 && total.crashes > 0 && total.storage_failures > 0, "{total:?}");
    }
}
