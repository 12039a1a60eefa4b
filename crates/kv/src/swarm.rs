//! The KV swarm: one seed picks 3 or 5 servers, 2-6 clients on a few keys, a fault mix and
//! snapshot limits; 10 virtual seconds of versioned Puts, Gets and Appends under random
//! partitions, one-way cuts, held links, crashes and restarts, stop-the-world pauses,
//! disconnections, loss, duplication, long reordering and delays, with clocks up to 10% apart
//! and, on a third of the seeds, the production FileStorage on faulty simulated disks; then
//! everything heals. Every history must be linearizable and every acknowledged write present
//! exactly once. Panics (with the reason) on a violation.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use sixfive_rpc::Transport;
use sixfive_rsm::testkit::RsmCluster;
use sixfive_sim::{MS, NetConfig, Rng, SEC};
use sixfive_storage::fs::SimFsConfig;

use crate::check::*;
use crate::{History, KvClient, KvError, KvSm, RaftClerk, Record};

/// What one swarm run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvSwarmReport {
    /// The seed.
    pub seed: u64,
    /// Servers.
    pub servers: u64,
    /// Clients.
    pub clients: u64,
    /// Operations recorded (and checked).
    pub ops: u64,
    /// Puts acknowledged.
    pub acked_puts: u64,
    /// Appends acknowledged.
    pub acked_appends: u64,
    /// Server crashes and restarts injected.
    pub crashes: u64,
    /// Partitions, one-way cuts and disconnections injected.
    pub partitions: u64,
    /// Stop-the-world pauses injected.
    pub pauses: u64,
    /// Simulator events handled.
    pub events: u64,
}

#[derive(Default)]
struct Acked {
    /// Successful Puts per versioned key.
    puts: BTreeMap<String, u64>,
    /// Acknowledged appends per client.
    appends: BTreeMap<u64, u64>,
}

impl KvSwarmReport {
    /// Adds another run's counts to these totals (seed and sizes are left as they are).
    pub fn merge(&mut self, r: &KvSwarmReport) {
        self.ops += r.ops;
        self.acked_puts += r.acked_puts;
        self.acked_appends += r.acked_appends;
        self.crashes += r.crashes;
        self.partitions += r.partitions;
        self.pauses += r.pauses;
        self.events += r.events;
    }
}

/// Runs one seed; panics with the reason on a violation.
pub fn run(seed: u64) -> KvSwarmReport {
    let mut pick = Rng::new(seed ^ 0xC0FFEE);
    let servers = *pick.pick(&[3u64, 5]);
    let clients = pick.range(2, 6);
    let vkeys = pick.range(1, 3);
    let net = NetConfig {
        unreliable: pick.chance(0.5),
        long_reordering: pick.chance(0.2),
        long_delays: pick.chance(0.2),
        duplicate: false,
    };
    let max_raft_state = if pick.chance(0.5) { Some(pick.range(300, 3000) as usize) } else { None };
    // A third of the seeds run the production FileStorage on simulated disks that lose
    // unsynced pages, zero-fill, fail calls and take time to sync.
    let fs_faults = SimFsConfig {
        fail_rate: if pick.chance(0.5) { 0.0005 } else { 0.0 },
        zero_fill: pick.chance(0.5),
        sync_latency: pick.below(3) * MS,
    };
    let file_storage = pick.chance(1.0 / 3.0).then_some(fs_faults);
    let mut net = net;
    net.duplicate = pick.chance(0.3);
    let cl = Rc::new(RsmCluster::new_on(seed, servers, net, max_raft_state, file_storage, KvSm::default));
    if pick.chance(0.5) {
        // Clocks up to 10% apart.
        for id in cl.ids() {
            cl.world.set_clock_rate(id, 0.9 + pick.below(201) as f64 / 1000.0);
        }
    }
    let mut rep = KvSwarmReport { seed, servers, clients, ..Default::default() };
    let h = History::default();
    let acked: Rc<RefCell<Acked>> = Rc::default();
    let done = Rc::new(Cell::new(false));

    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut ck = RaftClerk::new(cl.world.client(1000 + c), cl.ids(), c).with_history(h.clone());
            let (acked, done) = (acked.clone(), done.clone());
            cl.world.spawn(async move {
                let mut j = 0u64;
                // Read floor: the newest version this client has seen or written, per key. A
                // later read must never return an older one (a stale read).
                let mut floor: BTreeMap<String, u64> = BTreeMap::new();
                while !done.get() {
                    let w = ck.transport().world().clone();
                    if w.random(3) == 0 {
                        ck.append("a", &token(c, j)).await.expect("append");
                        *acked.borrow_mut().appends.entry(c).or_insert(0) += 1;
                        j += 1;
                    } else {
                        let key = format!("v{}", w.random(vkeys));
                        let ver = match ck.get(&key).await {
                            Ok((_, v)) => v,
                            Err(KvError::NoKey) => 0,
                            Err(e) => panic!("{e}"),
                        };
                        let seen = floor.entry(key.clone()).or_insert(0);
                        assert!(ver >= *seen, "client {c} read version {ver} of {key} after seeing version {seen}");
                        *seen = ver;
                        match ck.put(&key, &format!("{c}"), ver).await {
                            Ok(()) => {
                                floor.insert(key.clone(), ver + 1);
                                *acked.borrow_mut().puts.entry(key).or_insert(0) += 1
                            }
                            Err(KvError::Version) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    ck.transport().sleep(w.random(20) * MS).await;
                }
            })
        })
        .collect();

    // Faults for 10 virtual seconds.
    let ids = cl.ids();
    let end = cl.world.now() + 10 * SEC;
    while cl.world.now() < end {
        let step = cl.world.random(300) * MS + MS;
        cl.world.run_for(step);
        let id = ids[cl.world.random(ids.len() as u64) as usize];
        match cl.world.random(100) {
            0..=9 => {
                rep.partitions += 1;
                let mut shuffled = ids.clone();
                cl.world.with_rng(|r| r.shuffle(&mut shuffled));
                let cut = 1 + cl.world.random(ids.len() as u64 - 1) as usize;
                cl.world.net(|n| n.partition(&[&shuffled[..cut], &shuffled[cut..]]));
            }
            10..=19 => cl.world.net(|n| n.heal()),
            20..=26 => {
                if cl.is_up(id) {
                    rep.crashes += 1;
                    cl.crash(id);
                } else {
                    cl.start(id);
                }
            }
            27..=32 => cl.world.net(|n| if n.is_connected(id) { n.disconnect(id) } else { n.connect(id) }),
            33..=35 => cl.world.net(|n| n.config.unreliable = !n.config.unreliable),
            36 => cl.world.net(|n| n.config.long_reordering = !n.config.long_reordering),
            37..=39 => {
                let d = cl.world.random(3000) * MS;
                cl.world.pause(id, d);
                rep.pauses += 1;
            }
            40..=42 => {
                let to = ids[cl.world.random(ids.len() as u64) as usize];
                if to != id {
                    rep.partitions += 1;
                    cl.world.net(|n| n.cut_one_way(id, to));
                }
            }
            43..=44 => {
                let until = cl.world.now() + cl.world.random(1500) * MS;
                cl.world.net(|n| n.hold(id, until));
            }
            45 => cl.world.net(|n| n.config.duplicate = !n.config.duplicate),
            _ => {}
        }
    }

    // Heal everything; clients finish their current operation.
    done.set(true);
    cl.set_fs_config(SimFsConfig { fail_rate: 0.0, ..fs_faults });
    cl.world.net(|n| {
        n.heal();
        n.config = NetConfig::default();
        for &id in &ids {
            n.connect(id);
        }
    });
    for &id in &ids {
        if !cl.is_up(id) {
            cl.start(id);
        }
    }
    cl.world.block_on(async move {
        for t in tasks {
            t.await;
        }
    });

    // No acknowledged write lost: read everything back (recorded, so it is checked too).
    let mut ck = RaftClerk::new(cl.world.client(999), cl.ids(), 999).with_history(h.clone());
    let acked_now = std::mem::take(&mut *acked.borrow_mut());
    let (appended, versions) = cl.world.block_on(async move {
        let a = ck.get("a").await.map(|(v, _)| v).unwrap_or_default();
        let mut vs = BTreeMap::new();
        for k in 0..vkeys {
            let key = format!("v{k}");
            vs.insert(key.clone(), ck.get(&key).await.map(|(_, v)| v).unwrap_or(0));
        }
        (a, vs)
    });
    for (key, n) in &acked_now.puts {
        assert_eq!(versions[key], *n, "key {key}: version {} but {n} acknowledged Puts", versions[key]);
    }
    for c in 0..clients {
        check_client_appends(std::slice::from_ref(&appended), c, Some(acked_now.appends.get(&c).copied().unwrap_or(0)));
    }
    let records = h.records();
    rep.ops = records.len() as u64;
    rep.acked_puts = acked_now.puts.values().sum();
    rep.acked_appends = acked_now.appends.values().sum();
    rep.events = cl.world.events_handled();
    check_history(records);
    rep
}

/// The swarm's history check: the appends to key "a" and the versioned keys, each checked
/// for linearizability. Panics with the reason on a violation.
pub fn check_history(records: Vec<Record>) {
    let (appends, versioned): (Vec<Record>, Vec<Record>) = records.into_iter().partition(|r| r.op.key() == "a");
    check_appends(&appends);
    check_versioned(&versioned);
}
