//! The shardkv swarm: one seed picks 2-4 replica groups, 2-5 clerks, a fault mix and a
//! snapshot limit; for 8 virtual seconds an administrator joins, removes and moves groups and
//! shards at random while the clerks run versioned Puts, Gets and Appends, and servers (of the
//! groups and of the controller) crash (sometimes with torn writes) and restart, the network splits, nodes disconnect,
//! messages are lost, duplicated, reordered and held back, links are cut one way. After every fault, and every 10 ms of virtual time between
//! them, the single-owner check runs (no shard is served by two groups for one configuration,
//! none by a group its configuration does not give it to). Then everything heals and settles; every
//! acknowledged write must be present exactly once and every history must be linearizable.
//! Panics (with the reason) on a violation.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use sixfive_kv::check::{check_appends, check_client_appends, check_versioned, token};
use sixfive_kv::{History, KvClient, KvError, Record};
use sixfive_rpc::Transport;
use sixfive_sim::{MS, NetConfig, Rng, SEC};

use crate::sim::ShardSim;
use crate::{Gid, NSHARDS};

/// What one swarm run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardSwarmReport {
    /// The seed.
    pub seed: u64,
    /// Replica groups.
    pub groups: u64,
    /// Clerks.
    pub clients: u64,
    /// Operations recorded (and checked).
    pub ops: u64,
    /// Puts acknowledged.
    pub acked_puts: u64,
    /// Appends acknowledged.
    pub acked_appends: u64,
    /// Configuration changes made (joins, leaves, moves).
    pub reconfigs: u64,
    /// Server crashes injected.
    pub crashes: u64,
    /// Partitions and disconnections injected.
    pub partitions: u64,
    /// Simulator events handled.
    pub events: u64,
    /// Hash of every event handled: equal for two runs of one seed.
    pub trace: u64,
}

impl ShardSwarmReport {
    /// Adds another run's counts to these totals (seed and sizes are left as they are).
    pub fn merge(&mut self, r: &ShardSwarmReport) {
        self.ops += r.ops;
        self.acked_puts += r.acked_puts;
        self.acked_appends += r.acked_appends;
        self.reconfigs += r.reconfigs;
        self.crashes += r.crashes;
        self.partitions += r.partitions;
        self.events += r.events;
    }
}

#[derive(Default)]
struct Acked {
    puts: BTreeMap<String, u64>,
    appends: BTreeMap<u64, u64>,
}

/// Runs one seed; panics with the reason on a violation.
pub fn run(seed: u64) -> ShardSwarmReport {
    let mut pick = Rng::new(seed ^ 0x5AAD_C0DE);
    let ngroups = pick.range(2, 4);
    let clients = pick.range(2, 5);
    let net = NetConfig {
        unreliable: pick.chance(0.5),
        long_reordering: pick.chance(0.15),
        long_delays: pick.chance(0.15),
        duplicate: pick.chance(0.3),
    };
    let max_raft_state = if pick.chance(0.5) { Some(pick.range(500, 4000) as usize) } else { None };
    let gids: Vec<Gid> = (0..ngroups).map(|i| 100 + i).collect();
    let sim = Rc::new(ShardSim::new(seed, net, &gids, 3, max_raft_state));
    let mut rep = ShardSwarmReport { seed, groups: ngroups, clients, ..Default::default() };
    sim.join(&gids[..1]);
    let joined: Rc<RefCell<BTreeSet<Gid>>> = Rc::new(RefCell::new([gids[0]].into()));

    // Append keys and versioned keys, spread over the shards.
    let akeys: Vec<String> = (0..3).map(|i| crate::key_in_shard("a", (i * 3) % NSHARDS)).collect();
    let vkeys: Vec<String> = (0..3).map(|i| crate::key_in_shard("v", (i * 3 + 1) % NSHARDS)).collect();
    let h = History::default();
    let acked: Rc<RefCell<Acked>> = Rc::default();
    let done = Rc::new(Cell::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut ck = sim.clerk(&h);
            let (acked, done, akeys, vkeys) = (acked.clone(), done.clone(), akeys.clone(), vkeys.clone());
            sim.world.spawn(async move {
                let mut j = 0u64;
                while !done.get() {
                    let w = ck.transport().world().clone();
                    if w.random(3) == 0 {
                        let key = &akeys[w.random(akeys.len() as u64) as usize];
                        ck.append(key, &token(c, j)).await.expect("append");
                        *acked.borrow_mut().appends.entry(c).or_insert(0) += 1;
                        j += 1;
                    } else {
                        let key = vkeys[w.random(vkeys.len() as u64) as usize].clone();
                        let ver = match ck.get(&key).await {
                            Ok((_, v)) => v,
                            Err(KvError::NoKey) => 0,
                            Err(e) => panic!("get: {e}"),
                        };
                        match ck.put(&key, &format!("{c}.{j}"), ver).await {
                            Ok(()) => *acked.borrow_mut().puts.entry(key).or_insert(0) += 1,
                            Err(KvError::Version) => {}
                            Err(e) => panic!("put: {e}"),
                        }
                    }
                    ck.transport().sleep(w.random(30) * MS).await;
                }
            })
        })
        .collect();

    // The administrator: a random join, leave or move every 0.3-1.3 s.
    let admin = {
        let mut ck = sim.ctrler_clerk();
        let (joined, done, gids, sim2) = (joined.clone(), done.clone(), gids.clone(), sim.clone());
        sim.world.spawn(async move {
            let mut changes = 0u64;
            while !done.get() {
                let w = sim2.world.clone();
                ck.transport().sleep((300 + w.random(1000)) * MS).await;
                if done.get() {
                    break;
                }
                let out: Vec<Gid> = gids.iter().copied().filter(|g| !joined.borrow().contains(g)).collect();
                let inn: Vec<Gid> = joined.borrow().iter().copied().collect();
                match w.random(3) {
                    0 if !out.is_empty() => {
                        let g = out[w.random(out.len() as u64) as usize];
                        ck.join([(g, sim2.servers(g))].into()).await.expect("join");
                        joined.borrow_mut().insert(g);
                    }
                    1 if inn.len() > 1 => {
                        let g = inn[w.random(inn.len() as u64) as usize];
                        ck.leave(vec![g]).await.expect("leave");
                        joined.borrow_mut().remove(&g);
                    }
                    _ => {
                        let g = inn[w.random(inn.len() as u64) as usize];
                        ck.move_shard(w.random(NSHARDS as u64) as usize, g).await.expect("move");
                    }
                }
                changes += 1;
            }
            changes
        })
    };

    // Faults for 8 virtual seconds; the single-owner check after every event.
    let servers: Vec<u64> = sim.ctrlers().into_iter().chain(sim.all_servers()).collect();
    let end = sim.world.now() + 8 * SEC;
    while sim.world.now() < end {
        // Between faults, the single-owner check every 10 ms of virtual time.
        let step_end = sim.world.now() + sim.world.random(300) * MS + MS;
        while sim.world.now() < step_end {
            sim.world.run_for((step_end - sim.world.now()).min(10 * MS));
            sim.check_single_owner();
        }
        let e = servers[sim.world.random(servers.len() as u64) as usize];
        match sim.world.random(100) {
            0..=7 => {
                rep.partitions += 1;
                let mut shuffled = servers.clone();
                sim.world.with_rng(|r| r.shuffle(&mut shuffled));
                let cut = 1 + sim.world.random(shuffled.len() as u64 - 1) as usize;
                sim.world.net(|n| n.partition(&[&shuffled[..cut], &shuffled[cut..]]));
            }
            8..=17 => sim.world.net(|n| n.heal()),
            18..=29 => {
                if sim.is_up(e) {
                    rep.crashes += 1;
                    let torn = sim.world.random(2) == 0;
                    sim.crash_with(e, torn);
                } else {
                    sim.start(e);
                }
            }
            30..=35 => sim.world.net(|n| if n.is_connected(e) { n.disconnect(e) } else { n.connect(e) }),
            36..=38 => sim.world.net(|n| n.config.unreliable = !n.config.unreliable),
            39 => sim.world.net(|n| n.config.long_reordering = !n.config.long_reordering),
            40..=42 => {
                rep.partitions += 1;
                let other = servers[sim.world.random(servers.len() as u64) as usize];
                sim.world.net(|n| n.cut_one_way(e, other));
            }
            43..=44 => {
                let until = sim.world.now() + sim.world.random(1500) * MS;
                sim.world.net(|n| n.hold(e, until));
            }
            45 => sim.world.net(|n| n.config.duplicate = !n.config.duplicate),
            _ => {}
        }
        sim.check_single_owner();
    }

    // Heal everything; clerks finish their current operation; the groups settle.
    done.set(true);
    sim.world.net(|n| {
        n.heal();
        n.config = NetConfig::default();
        for &e in &servers {
            n.connect(e);
        }
    });
    for &e in &servers {
        if !sim.is_up(e) {
            sim.start(e);
        }
    }
    rep.reconfigs = sim.world.block_on(async move {
        for t in tasks {
            t.await;
        }
        admin.await
    });
    sim.settle_or_panic();

    // No acknowledged write lost: read everything back (recorded, so it is checked too).
    let mut ck = sim.clerk(&h);
    let acked_now = std::mem::take(&mut *acked.borrow_mut());
    let (ak, vk) = (akeys.clone(), vkeys.clone());
    let (appended, versions) = sim.world.block_on(async move {
        let mut a = Vec::new();
        for k in &ak {
            a.push(ck.get(k).await.map(|(v, _)| v).unwrap_or_default());
        }
        let mut vs = BTreeMap::new();
        for k in &vk {
            vs.insert(k.clone(), ck.get(k).await.map(|(_, v)| v).unwrap_or(0));
        }
        (a, vs)
    });
    for (key, n) in &acked_now.puts {
        assert_eq!(versions[key], *n, "key {key}: version {} but {n} acknowledged Puts", versions[key]);
    }
    for c in 0..clients {
        check_client_appends(&appended, c, Some(acked_now.appends.get(&c).copied().unwrap_or(0)));
    }
    sim.check_single_owner();
    let records = h.records();
    rep.ops = records.len() as u64;
    rep.acked_puts = acked_now.puts.values().sum();
    rep.acked_appends = acked_now.appends.values().sum();
    rep.events = sim.world.events_handled();
    rep.trace = sim.world.trace_hash();
    let (appends, versioned): (Vec<Record>, Vec<Record>) =
        records.into_iter().partition(|r| akeys.contains(&r.op.key().to_string()));
    check_appends(&appends);
    check_versioned(&versioned);
    rep
}
