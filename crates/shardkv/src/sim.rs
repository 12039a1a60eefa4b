//! Test support: a controller group and replica groups in the simulator's [`World`], each
//! server with a simulated disk that outlives it (a crash loses exactly the unsynced writes).
//!
//! Addresses: controller servers 1..=3; group `gid`'s servers `gid * 10 + 1 ..= gid * 10 + n`;
//! clerks from 100,000 up. Raft ids are the addresses.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use sixfive_kv::History;
use sixfive_raft::{Config, NodeId, Role};
use sixfive_rpc::{Endpoint, Transport};
use sixfive_rsm::testkit::SharedStorage;
use sixfive_rsm::{Rsm, RsmNode};
use sixfive_sim::{MS, NetConfig, SEC, SimClient, World};

use crate::{CtrlerClerk, CtrlerServer, CtrlerSm, Gid, ShardClerk, ShardConfig, ShardServer, ShardSm};

/// A controller server in the simulator.
pub type TestCtrler = CtrlerServer<SharedStorage>;
/// A replica group server in the simulator.
pub type TestServer = ShardServer<SharedStorage>;

/// Controller servers, replica groups and their disks in one world.
pub struct ShardSim {
    /// The world they run in.
    pub world: World,
    ctrlers: Vec<Endpoint>,
    groups: BTreeMap<Gid, Vec<Endpoint>>,
    disks: BTreeMap<Endpoint, SharedStorage>,
    max_raft_state: Option<usize>,
    next_client: Cell<u64>,
    /// (configuration, shard) -> the group seen serving it, over the whole run.
    served: RefCell<BTreeMap<(u64, usize), Gid>>,
}

impl ShardSim {
    /// Starts 3 controller servers and the groups `gids` of `per_group` servers each (not yet
    /// joined). Every server snapshots at `max_raft_state` bytes of Raft state.
    pub fn new(seed: u64, net: NetConfig, gids: &[Gid], per_group: u64, max_raft_state: Option<usize>) -> ShardSim {
        let ctrlers: Vec<Endpoint> = (1..=3).collect();
        let groups: BTreeMap<Gid, Vec<Endpoint>> =
            gids.iter().map(|&g| (g, (1..=per_group).map(|i| g * 10 + i).collect())).collect();
        let mut disks = BTreeMap::new();
        for &e in ctrlers.iter().chain(groups.values().flatten()) {
            disks.insert(e, SharedStorage::default());
        }
        let sim = ShardSim {
            world: World::new(seed, net),
            ctrlers,
            groups,
            disks,
            max_raft_state,
            next_client: Cell::new(100_000),
            served: RefCell::default(),
        };
        for e in sim.ctrlers.clone() {
            sim.start(e);
        }
        for e in sim.groups.values().flatten().copied().collect::<Vec<_>>() {
            sim.start(e);
        }
        sim
    }

    /// The controller servers.
    pub fn ctrlers(&self) -> Vec<Endpoint> {
        self.ctrlers.clone()
    }

    /// Group ids.
    pub fn gids(&self) -> Vec<Gid> {
        self.groups.keys().copied().collect()
    }

    /// Servers of group `gid`.
    pub fn servers(&self, gid: Gid) -> Vec<Endpoint> {
        self.groups[&gid].clone()
    }

    /// Every replica group server.
    pub fn all_servers(&self) -> Vec<Endpoint> {
        self.groups.values().flatten().copied().collect()
    }

    fn group_of(&self, e: Endpoint) -> Option<Gid> {
        self.groups.iter().find(|(_, s)| s.contains(&e)).map(|(g, _)| *g)
    }

    /// Starts server `e` (controller or group) from its disk.
    pub fn start(&self, e: Endpoint) {
        let disk = self.disks[&e].clone();
        disk.0.borrow_mut().reopen().expect("the in-memory model storage always reopens");
        match self.group_of(e) {
            None => {
                let mut cfg = Config::new(e, self.ctrlers.clone());
                cfg.seed = self.world.random(u64::MAX);
                let rsm = Rsm::new(cfg, disk, CtrlerSm::default(), self.max_raft_state).expect("valid config");
                self.world.start_node(e, CtrlerServer::new(RsmNode::new(rsm)));
            }
            Some(gid) => {
                let peers = self.groups[&gid].clone();
                let mut cfg = Config::new(e, peers.clone());
                cfg.seed = self.world.random(u64::MAX);
                let rsm = Rsm::new(cfg, disk, ShardSm::new(gid), self.max_raft_state).expect("valid config");
                self.world.start_node(e, ShardServer::new(RsmNode::new(rsm), peers, self.ctrlers.clone()));
            }
        }
    }

    /// Crashes server `e`: its unsynced writes are lost.
    pub fn crash(&self, e: Endpoint) {
        self.crash_with(e, false);
    }

    /// Crashes server `e`; with `torn`, a random prefix of its unsynced writes survives.
    pub fn crash_with(&self, e: Endpoint, torn: bool) {
        self.world.crash(e);
        let disk = &self.disks[&e];
        self.world.with_rng(|rng| disk.0.borrow_mut().crash(rng, torn));
    }

    /// Whether server `e` runs.
    pub fn is_up(&self, e: Endpoint) -> bool {
        self.world.is_up(e)
    }

    /// Crashes every server of group `gid` (their disks stay).
    pub fn shutdown_group(&self, gid: Gid) {
        for e in self.servers(gid) {
            if self.is_up(e) {
                self.crash(e);
            }
        }
    }

    /// Starts every stopped server of group `gid`.
    pub fn start_group(&self, gid: Gid) {
        for e in self.servers(gid) {
            if !self.is_up(e) {
                self.start(e);
            }
        }
    }

    /// Runs `f` on the state machine of group server `e`, if it runs.
    pub fn with_sm<T>(&self, e: Endpoint, f: impl FnOnce(&ShardSm) -> T) -> Option<T> {
        self.world.inspect::<TestServer, _>(e, |n| f(n.sm()))
    }

    /// Runs `f` on the state machine of controller server `e`, if it runs.
    pub fn with_ctrler<T>(&self, e: Endpoint, f: impl FnOnce(&CtrlerSm) -> T) -> Option<T> {
        self.world.inspect::<TestCtrler, _>(e, |n| f(n.node().rsm().state_machine()))
    }

    /// The server of group `gid` that leads in the highest term, if any.
    pub fn group_leader(&self, gid: Gid) -> Option<NodeId> {
        self.servers(gid)
            .into_iter()
            .filter_map(|e| {
                self.world.inspect::<TestServer, _>(e, |n| n.node().rsm().status()).map(|s| (s.role, s.term, e))
            })
            .filter(|(r, _, _)| *r == Role::Leader)
            .max_by_key(|(_, t, _)| *t)
            .map(|(_, _, e)| e)
    }

    /// Bytes of Raft state on server `e`'s disk.
    pub fn raft_state_bytes(&self, e: Endpoint) -> usize {
        use sixfive_raft::Storage;
        self.disks[&e].raft_state_bytes()
    }

    /// Bytes of server `e`'s snapshot on disk.
    pub fn snapshot_bytes(&self, e: Endpoint) -> usize {
        self.disks[&e].0.borrow().snapshot_bytes()
    }

    /// A new clerk (unique id and address) recording into `h`.
    pub fn clerk(&self, h: &History) -> ShardClerk<SimClient> {
        let id = self.next_client.get();
        self.next_client.set(id + 1);
        ShardClerk::new(self.world.client(id), self.ctrlers(), id).with_history(h.clone())
    }

    /// A new controller clerk.
    pub fn ctrler_clerk(&self) -> CtrlerClerk<SimClient> {
        let id = self.next_client.get();
        self.next_client.set(id + 1);
        CtrlerClerk::new(self.world.client(id), self.ctrlers(), id)
    }

    /// Joins groups `gids` in one change (running the world until the controller answers).
    pub fn join(&self, gids: &[Gid]) {
        let groups: BTreeMap<Gid, Vec<Endpoint>> = gids.iter().map(|&g| (g, self.servers(g))).collect();
        let mut ck = self.ctrler_clerk();
        self.world.block_on(async move { ck.join(groups).await }).expect("join accepted");
    }

    /// Removes groups `gids` in one change.
    pub fn leave(&self, gids: &[Gid]) {
        let gids = gids.to_vec();
        let mut ck = self.ctrler_clerk();
        self.world.block_on(async move { ck.leave(gids).await }).expect("leave accepted");
    }

    /// Moves `shard` to `gid`.
    pub fn move_shard(&self, shard: usize, gid: Gid) {
        let mut ck = self.ctrler_clerk();
        self.world.block_on(async move { ck.move_shard(shard, gid).await }).expect("move accepted");
    }

    /// The latest configuration.
    pub fn query(&self) -> ShardConfig {
        let mut ck = self.ctrler_clerk();
        self.world.block_on(async move { ck.query(None).await }).expect("query answered")
    }

    /// Runs the world for `d` (while spawned clerks keep going).
    pub fn sleep(&self, d: sixfive_rpc::Micros) {
        let c = self.world.client(99_999);
        self.world.block_on(async move { c.sleep(d).await });
    }

    /// Checks, on every running group server, that each shard it serves is its group's in its
    /// configuration, and that no two groups have been seen serving one shard for the same
    /// configuration (over the whole run). Panics on a violation.
    pub fn check_single_owner(&self) {
        let mut served = self.served.borrow_mut();
        for e in self.all_servers() {
            let Some((gid, cfg, serving)) = self.with_sm(e, |sm| (sm.gid(), sm.config().clone(), sm.serving())) else {
                continue;
            };
            for s in serving {
                assert_eq!(cfg.shards[s], gid, "server {e} of group {gid} serves shard {s} not its own in {cfg:?}");
                let first = *served.entry((cfg.num, s)).or_insert(gid);
                assert_eq!(first, gid, "shard {s} served by groups {first} and {gid} in configuration {}", cfg.num);
            }
        }
    }

    /// Runs the world (up to `limit`) until every running server of every group is at the
    /// controller's latest configuration with every shard settled; false if that did not happen.
    pub fn settle(&self, limit: sixfive_rpc::Micros) -> bool {
        let latest = self.query().num;
        let end = self.world.now() + limit;
        while self.world.now() < end {
            let done = self
                .all_servers()
                .into_iter()
                .filter(|&e| self.is_up(e))
                .all(|e| self.with_sm(e, |sm| sm.config().num == latest && sm.settled()).unwrap_or(true));
            if done {
                return true;
            }
            self.world.run_for(50 * MS);
            self.check_single_owner();
        }
        false
    }

    /// Runs the world until every group server is up to date (at most 20 s); panics if not.
    pub fn settle_or_panic(&self) {
        assert!(self.settle(20 * SEC), "the groups did not reach the latest configuration within 20 s");
    }
}
