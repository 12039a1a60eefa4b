//! 3A: leader election.

use sixfive_raft_sim::{Cluster, ClusterConfig};

use crate::{ELECTION_TIMEOUT, after, scenario};

#[test]
fn initial_election_3a() {
    scenario("initial_election_3a", |seed| {
        let mut c = Cluster::new(ClusterConfig::new(3), seed);
        c.check_one_leader();
        // Sleep a bit to avoid racing with followers learning of the election.
        c.sleep(50 * sixfive_sim::MS);
        let term1 = c.check_terms();
        assert!(term1 >= 1, "term is {term1}, but should be at least 1");
        // Without failures, the leader and term stay the same.
        c.sleep(2 * ELECTION_TIMEOUT);
        let term2 = c.check_terms();
        assert_eq!(term1, term2, "term changed even though there were no failures");
        c.check_one_leader();
    });
}

#[test]
fn re_election_3a() {
    scenario("re_election_3a", |seed| {
        let n = 3;
        let mut c = Cluster::new(ClusterConfig::new(n as usize), seed);
        let leader1 = c.check_one_leader();
        // The leader disconnects: a new one must be elected.
        c.disconnect(leader1);
        c.check_one_leader();
        // The old leader rejoins: it must not disturb the new one.
        c.connect(leader1);
        let leader2 = c.check_one_leader();
        // No quorum: no leader.
        c.disconnect(leader2);
        c.disconnect(after(leader2, 1, n));
        c.sleep(2 * ELECTION_TIMEOUT);
        c.check_no_leader();
        // A quorum returns: a leader.
        c.connect(after(leader2, 1, n));
        c.check_one_leader();
        // The last node rejoins: still one leader.
        c.connect(leader2);
        c.check_one_leader();
    });
}

#[test]
fn many_elections_3a() {
    scenario("many_elections_3a", |seed| {
        let n = 7;
        let mut c = Cluster::new(ClusterConfig::new(n), seed);
        c.check_one_leader();
        for _ in 0..10 {
            // Cut three random nodes (possibly the same one twice): four or more remain.
            let ids = c.ids();
            let cut: Vec<u64> = (0..3).map(|_| *c.rng.pick(&ids)).collect();
            for &i in &cut {
                c.disconnect(i);
            }
            c.check_one_leader();
            for &i in &cut {
                c.connect(i);
            }
        }
        c.check_one_leader();
    });
}
