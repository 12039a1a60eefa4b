//! 3D: log compaction and InstallSnapshot. The application snapshots whenever
//! `(applied index + 1) % 10 == 0`; the persisted Raft state must stay under 2,000 bytes.

use sixfive_raft_sim::{Cluster, ClusterConfig};
use sixfive_sim::NetConfig;

use crate::{after, rand_cmd, scenario};

const SNAPSHOT_INTERVAL: u64 = 10;
const MAX_LOG_SIZE: usize = 2000;

fn config(reliable: bool) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(3);
    cfg.net = NetConfig { unreliable: !reliable, ..Default::default() };
    cfg.snapshot_every = Some(SNAPSHOT_INTERVAL);
    cfg
}

fn snap_common(seed: u64, disconnect: bool, reliable: bool, crash: bool) {
    let n = 3u64;
    let mut c = Cluster::new(config(reliable), seed);
    let v = rand_cmd(&mut c);
    c.one(v, n as usize, true);
    let mut leader1 = c.check_one_leader();
    for i in 0..30 {
        let (mut victim, mut sender) = (after(leader1, 1, n), leader1);
        if i % 3 == 1 {
            sender = after(leader1, 1, n);
            victim = leader1;
        }
        if disconnect {
            c.disconnect(victim);
            let v = rand_cmd(&mut c);
            c.one(v, n as usize - 1, true);
        }
        if crash {
            c.crash(victim);
            let v = rand_cmd(&mut c);
            c.one(v, n as usize - 1, true);
        }
        // Perhaps send enough to get a snapshot.
        let nn = SNAPSHOT_INTERVAL / 2 + c.rng.below(SNAPSHOT_INTERVAL);
        for _ in 0..nn {
            let v = rand_cmd(&mut c);
            c.start(sender, v);
        }
        // Let the appliers catch up with the Starts.
        let v = rand_cmd(&mut c);
        if !disconnect && !crash {
            c.one(v, n as usize, true);
        } else {
            c.one(v, n as usize - 1, true);
        }
        let size = c.max_raft_state_bytes();
        assert!(size < MAX_LOG_SIZE, "log size too large: {size} bytes");
        if disconnect {
            // Reconnect a follower that may need a snapshot to catch up.
            c.connect(victim);
            let v = rand_cmd(&mut c);
            c.one(v, n as usize, true);
            leader1 = c.check_one_leader();
        }
        if crash {
            c.restart(victim);
            c.connect(victim);
            let v = rand_cmd(&mut c);
            c.one(v, n as usize, true);
            leader1 = c.check_one_leader();
        }
    }
    if disconnect || crash {
        let installed: u64 = c.ids().into_iter().map(|id| c.installed_snapshots(id)).sum();
        assert!(installed > 0, "no lagging node ever caught up by InstallSnapshot");
    }
}

#[test]
fn snapshot_basic_3d() {
    scenario("snapshot_basic_3d", |seed| snap_common(seed, false, true, false));
}

#[test]
fn snapshot_install_3d() {
    scenario("snapshot_install_3d", |seed| snap_common(seed, true, true, false));
}

#[test]
fn snapshot_install_unreliable_3d() {
    scenario("snapshot_install_unreliable_3d", |seed| snap_common(seed, true, false, false));
}

#[test]
fn snapshot_install_crash_3d() {
    scenario("snapshot_install_crash_3d", |seed| snap_common(seed, false, true, true));
}

#[test]
fn snapshot_install_uncrash_3d() {
    scenario("snapshot_install_uncrash_3d", |seed| snap_common(seed, false, false, true));
}

#[test]
fn snapshot_all_crash_3d() {
    scenario("snapshot_all_crash_3d", |seed| {
        let n = 3;
        let mut c = Cluster::new(config(true), seed);
        let v = rand_cmd(&mut c);
        c.one(v, n, true);
        for _ in 0..5 {
            // Perhaps enough to get a snapshot.
            let nn = SNAPSHOT_INTERVAL / 2 + c.rng.below(SNAPSHOT_INTERVAL);
            for _ in 0..nn {
                let v = rand_cmd(&mut c);
                c.one(v, n, true);
            }
            let v = rand_cmd(&mut c);
            let index1 = c.one(v, n, true);
            // Crash all.
            for id in c.ids() {
                c.restart(id);
            }
            let v = rand_cmd(&mut c);
            let index2 = c.one(v, n, true);
            assert!(index2 > index1, "index decreased from {index1} to {index2}");
        }
    });
}

#[test]
fn snapshot_init_3d() {
    scenario("snapshot_init_3d", |seed| {
        let n = 3;
        let mut c = Cluster::new(config(true), seed);
        let v = rand_cmd(&mut c);
        c.one(v, n, true);
        // Enough ops to make a snapshot.
        for _ in 0..=SNAPSHOT_INTERVAL {
            let v = rand_cmd(&mut c);
            c.one(v, n, true);
        }
        assert!(c.ids().into_iter().all(|id| c.status(id).unwrap().snapshot_index > 0), "no snapshot taken");
        for id in c.ids() {
            c.restart(id);
        }
        // A single op, to get something written back to persistent storage.
        let v = rand_cmd(&mut c);
        c.one(v, n, true);
        for id in c.ids() {
            c.restart(id);
        }
        // Another op to trigger a potential bug.
        let v = rand_cmd(&mut c);
        c.one(v, n, true);
    });
}
