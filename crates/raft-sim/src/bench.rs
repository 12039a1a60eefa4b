//! Measurements in virtual time (no wall-clock figures): how many fsyncs a committed write
//! costs each node.

use sixfive_raft::{NodeId, Role};

use crate::cluster::{Cluster, ClusterConfig, cmd};

/// Fsyncs per committed write, by role.
#[derive(Clone, Debug, PartialEq)]
pub struct FsyncReport {
    /// Writes committed (and applied on every node).
    pub writes: u64,
    /// Writes proposed together before waiting for them.
    pub in_flight: u64,
    /// Syncs per write on the leader.
    pub leader: f64,
    /// Syncs per write on each follower, in id order.
    pub followers: Vec<f64>,
}

/// Commits `writes` writes on a reliable `nodes`-node cluster, `in_flight` at a time (each
/// group proposed at once, then waited for on every node), and counts each node's syncs
/// after the election has settled.
pub fn fsyncs_per_write(nodes: usize, writes: u64, in_flight: u64) -> FsyncReport {
    assert!(writes > 0 && in_flight > 0, "writes and in_flight must be positive");
    let mut c = Cluster::new(ClusterConfig::new(nodes), 1);
    let leader = c.check_one_leader();
    c.one(cmd(0), nodes, false); // the no-op and a first write, outside the count
    c.sleep(200 * sixfive_sim::MS); // let every commit index settle
    let before: Vec<u64> = c.ids().iter().map(|&id| c.syncs(id)).collect();
    let mut n = 0;
    while n < writes {
        let group = in_flight.min(writes - n);
        c.one_many((0..group).map(|k| cmd(1 + n + k)).collect(), nodes, false);
        n += group;
    }
    assert_eq!(c.status(leader).map(|s| s.role), Some(Role::Leader), "the leader changed during the run");
    let per = |id: NodeId| (c.syncs(id) - before[(id - 1) as usize]) as f64 / writes as f64;
    FsyncReport {
        writes,
        in_flight,
        leader: per(leader),
        followers: c.ids().into_iter().filter(|&id| id != leader).map(per).collect(),
    }
}
