//! The swarm: one seed picks a cluster shape, a fault mix and a workload; the cluster runs a
//! safety phase with faults at random and then a liveness phase on a healed network.
//!
//! The fault mix includes membership changes: new nodes join as learners, learners are
//! promoted, voters and learners are removed (the leader too), and voters are replaced by
//! learners in one joint change.
//!
//! Checked: everything [`crate::Checker`] checks after every event (one leader per term, log
//! matching, leader completeness, one command per index, quorums of the configuration in
//! effect, legal configuration steps), that every ReadIndex answer is at least every index
//! applied anywhere before the read was asked, and that after healing every member of the
//! final configuration applies a new command and agrees on the whole applied history.

use std::collections::BTreeMap;

use sixfive_raft::{ConfChange, Role};
use sixfive_sim::{MS, Micros, NetConfig, Rng, SEC};

use sixfive_storage::fs::SimFsConfig;

use crate::cluster::{Cluster, ClusterConfig, cmd};

/// Which storage the swarm's nodes run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwarmStorage {
    /// The in-memory model (its durable state is known, so every send is checked against it).
    Model,
    /// The production `FileStorage` on a simulated file system that loses unsynced pages in
    /// any order, may zero-fill grown files, fails calls with EIO/ENOSPC and takes time to sync.
    File,
}

/// What one swarm run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwarmReport {
    /// The seed.
    pub seed: u64,
    /// Nodes in the cluster (every node ever added).
    pub nodes: usize,
    /// Commands proposed (accepted by a leader).
    pub proposed: u64,
    /// Distinct indexes applied by some node.
    pub applied: u64,
    /// Terms that had a leader.
    pub leaders: u64,
    /// Crashes injected (including crashes in the middle of a write).
    pub crashes: u64,
    /// Nodes stopped by an injected storage failure.
    pub storage_failures: u64,
    /// Crashes of a leader after its `Append`s left and before its own write was durable.
    pub crashes_after_early_send: u64,
    /// Commits by a leader whose own write was not yet durable (followers made the quorum).
    pub commits_before_own_sync: u64,
    /// Stop-the-world pauses injected.
    pub pauses: u64,
    /// Partitions and disconnections injected.
    pub partitions: u64,
    /// Reads answered through ReadIndex.
    pub reads: u64,
    /// Membership changes accepted by a leader (joining, promotion, removal, replacement).
    pub conf_changes: u64,
    /// Simulator events processed.
    pub events: u64,
    /// Virtual time simulated.
    pub virtual_micros: Micros,
    /// Trace hash (equal for equal seeds).
    pub trace: u64,
}

impl SwarmReport {
    /// Adds another run's counts to these totals (seed, nodes and trace are left as they are).
    pub fn merge(&mut self, r: &SwarmReport) {
        self.proposed += r.proposed;
        self.applied += r.applied;
        self.leaders += r.leaders;
        self.crashes += r.crashes;
        self.storage_failures += r.storage_failures;
        self.crashes_after_early_send += r.crashes_after_early_send;
        self.commits_before_own_sync += r.commits_before_own_sync;
        self.pauses += r.pauses;
        self.partitions += r.partitions;
        self.reads += r.reads;
        self.conf_changes += r.conf_changes;
        self.events += r.events;
        self.virtual_micros += r.virtual_micros;
    }
}

/// Runs one swarm seed on the storage model; panics (with the checker's message) on any
/// violation.
pub fn run(seed: u64, fault_micros: Micros) -> SwarmReport {
    run_on(seed, fault_micros, SwarmStorage::Model)
}

/// Runs one swarm seed on the given storage.
pub fn run_on(seed: u64, fault_micros: Micros, storage: SwarmStorage) -> SwarmReport {
    let mut pick = Rng::new(seed ^ 0x5EED);
    let nodes = *pick.pick(&[3usize, 5, 5, 7]);
    let mut cfg = ClusterConfig::new(nodes);
    cfg.net = NetConfig {
        unreliable: pick.chance(0.5),
        long_reordering: pick.chance(0.3),
        long_delays: false,
        duplicate: false,
    };
    cfg.snapshot_every = if pick.chance(0.6) { Some(pick.range(3, 40)) } else { None };
    cfg.crash_in_ready = if pick.chance(0.5) { 0.002 } else { 0.0 };
    cfg.torn_writes = pick.chance(0.5);
    // Small limits so that batching, pipelining windows and chunked snapshots are exercised.
    cfg.tweak = if pick.chance(0.5) {
        |c| {
            c.max_msg_bytes = 64;
            c.max_inflight_msgs = 2;
            c.snapshot_chunk_bytes = 40;
            c.max_committed_bytes_per_ready = 64;
            c.max_uncommitted_bytes = 100;
            c.max_pending_reads = 2;
        }
    } else {
        |_| {}
    };
    let fs_faults = SimFsConfig {
        fail_rate: if pick.chance(0.5) { 0.0005 } else { 0.0 },
        zero_fill: pick.chance(0.5),
        sync_latency: pick.below(3) * MS,
    };
    if storage == SwarmStorage::File {
        cfg.file_storage = Some(fs_faults);
    }
    cfg.clock_drift = if pick.chance(0.5) { 0.1 } else { 0.0 };
    cfg.net.duplicate = pick.chance(0.3);
    cfg.async_persist = pick.chance(0.5);
    let membership = pick.chance(0.5);
    let mut c = Cluster::new(cfg, seed);
    let mut rep = SwarmReport { seed, nodes, ..Default::default() };
    let mut next_cmd = 1u64;
    // ctx -> highest index applied anywhere when the read was asked.
    let mut read_floor: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut reads_seen: BTreeMap<u64, usize> = BTreeMap::new();

    let end = c.now() + fault_micros;
    while c.now() < end {
        let step = c.rng.range(1, 60) * MS;
        c.sleep(step);
        let ids = c.ids();
        rep.reads += check_reads(&c, &ids, &read_floor, &mut reads_seen);
        let roll = c.rng.below(1000);
        let id = *c.rng.pick(&ids);
        // Clients mostly talk to whoever claims to lead, sometimes to anyone.
        let leader = ids.iter().copied().rfind(|&i| c.status(i).is_some_and(|s| s.role == Role::Leader));
        let target = if c.rng.chance(0.8) { leader.unwrap_or(id) } else { id };
        match roll {
            0..=499 => {
                for _ in 0..c.rng.range(1, 4) {
                    if c.start(target, cmd(next_cmd)).is_some() {
                        rep.proposed += 1;
                    }
                    next_cmd += 1;
                }
            }
            500..=559 => {
                let floor = c.checker().applied().keys().next_back().copied().unwrap_or(0);
                let ctx = next_cmd.to_le_bytes().to_vec();
                next_cmd += 1;
                if c.read_index(target, ctx.clone()) {
                    read_floor.insert(ctx, floor);
                }
            }
            560..=574 => {
                if c.is_live(id) {
                    c.crash(id);
                    rep.crashes += 1;
                } else {
                    c.restart(id);
                }
            }
            575..=589 => {
                if c.net.is_connected(id) {
                    c.disconnect(id);
                    rep.partitions += 1;
                } else {
                    c.connect(id);
                }
            }
            590..=599 => {
                let mut shuffled = ids.clone();
                c.rng.shuffle(&mut shuffled);
                let cut = c.rng.range(1, ids.len() as u64 - 1) as usize;
                c.net.partition(&[&shuffled[..cut], &shuffled[cut..]]);
                rep.partitions += 1;
            }
            600..=624 => {
                // Heal one thing at a time, so faults come and go.
                c.net.heal();
                c.connect(id);
                if !c.is_live(id) {
                    c.restart(id);
                }
            }
            625..=629 => {
                if let Some(l) = leader {
                    c.transfer_leader(l, id);
                }
            }
            630..=634 => c.net.config.unreliable = !c.net.config.unreliable,
            635..=637 => c.net.config.long_reordering = !c.net.config.long_reordering,
            638..=642 => {
                let d = c.rng.range(100, 3000) * MS;
                c.pause(id, d);
                rep.pauses += 1;
            }
            643..=647 => {
                let to = *c.rng.pick(&ids);
                if to != id {
                    c.net.cut_one_way(id, to);
                    rep.partitions += 1;
                }
            }
            648..=652 => {
                let until = c.now() + c.rng.range(50, 1500) * MS;
                c.net.hold(id, until);
            }
            653..=655 => c.net.config.duplicate = !c.net.config.duplicate,
            656..=699 if membership => {
                if let Some(l) = leader {
                    rep.conf_changes += change_membership(&mut c, l, nodes) as u64;
                }
            }
            _ => {}
        }
    }

    // Liveness: heal everything; the cluster must converge and make progress.
    c.net.heal();
    c.net.config = NetConfig::default();
    c.set_crash_in_ready(0.0);
    c.set_fs_config(SimFsConfig { fail_rate: 0.0, ..fs_faults });
    let ids = c.ids();
    for &id in &ids {
        c.connect(id);
        if !c.is_live(id) {
            c.restart(id);
        }
    }
    c.sleep(2 * SEC); // let long-delayed messages drain
    let index = c.one(cmd(u64::MAX), 1, true);
    // Every member of the final configuration (once no change is under way) catches up.
    let mut members = Vec::new();
    for _ in 0..100 {
        let leader = ids.iter().copied().rfind(|&i| c.status(i).is_some_and(|s| s.role == Role::Leader));
        if let Some(st) = leader.and_then(|l| c.status(l))
            && !st.conf.is_joint()
            && st.commit >= st.conf_index
        {
            members = st.conf.members();
            if members.iter().all(|&m| c.applied(m).last_applied >= index) {
                break;
            }
        }
        c.sleep(100 * MS);
    }
    assert!(!members.is_empty(), "no leader with a settled configuration after healing\n{}", c.dump());
    rep.reads += check_reads(&c, &ids, &read_floor, &mut reads_seen);
    // Every member applied the same history, and it is the one the checker saw.
    let reference = c.applied(members[0]).cmds.clone();
    for &id in &members {
        let log = c.applied(id);
        assert!(log.last_applied >= index, "node {id} did not catch up");
        let upto: BTreeMap<_, _> = log.cmds.range(..=index).map(|(k, v)| (*k, v.clone())).collect();
        let reference_upto: BTreeMap<_, _> = reference.range(..=index).map(|(k, v)| (*k, v.clone())).collect();
        assert_eq!(upto, reference_upto, "node {id} applied a different history");
    }
    rep.nodes = ids.len();
    rep.applied = c.checker().applied().len() as u64;
    rep.storage_failures = c.storage_failures();
    rep.crashes_after_early_send = c.crashes_after_early_send();
    rep.commits_before_own_sync = c.commits_before_own_sync();
    rep.leaders = c.checker().leaders().len() as u64;
    rep.events = c.events();
    rep.virtual_micros = c.now();
    rep.trace = c.trace_hash();
    rep
}

/// ReadIndex safety: an answered read's index is at least every index applied before it was
/// asked (so a read never misses an acknowledged write).
fn check_reads(c: &Cluster, ids: &[u64], floor: &BTreeMap<Vec<u8>, u64>, seen: &mut BTreeMap<u64, usize>) -> u64 {
    let mut answered = 0;
    for &id in ids {
        let reads = c.reads(id);
        let done = seen.entry(id).or_insert(0);
        if reads.len() < *done {
            *done = 0; // restarted: its list began again
        }
        for r in &reads[*done..] {
            let f = floor.get(&r.ctx).expect("a read we asked for");
            assert!(r.index >= *f, "read at index {} misses index {f} applied before it was asked", r.index);
            answered += 1;
        }
        *done = reads.len();
    }
    answered
}

/// One random membership change at leader `l`: a new node joins as a learner, a learner is
/// promoted or removed, a voter is removed (perhaps the leader itself), or a learner replaces a
/// voter. Voters never drop below `min(3, initial)`; at most 4 nodes are ever added. Returns
/// whether the leader accepted it.
fn change_membership(c: &mut Cluster, l: u64, initial: usize) -> bool {
    let Some(st) = c.status(l) else { return false };
    let conf = st.conf;
    let min_voters = initial.min(3);
    let learner = (!conf.learners.is_empty()).then(|| *c.rng.pick(&conf.learners));
    let voter = *c.rng.pick(&conf.voters);
    let changes = match c.rng.below(5) {
        0 if c.ids().len() < initial + 4 => {
            let id = c.add_node();
            vec![ConfChange::AddLearner(id)]
        }
        1 => match learner {
            Some(n) => vec![ConfChange::Promote(n)],
            None => return false,
        },
        2 if conf.voters.len() > min_voters => vec![ConfChange::Remove(voter)],
        3 => match learner {
            Some(n) => vec![ConfChange::Promote(n), ConfChange::Remove(voter)],
            None => return false,
        },
        4 => match learner {
            Some(n) if c.rng.chance(0.3) => vec![ConfChange::Remove(n)],
            _ => return false,
        },
        _ => return false,
    };
    c.change_membership(l, &changes).is_ok()
}
