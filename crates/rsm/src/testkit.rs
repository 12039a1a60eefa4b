//! Test support: a cluster of [`RsmNode`]s in the simulator's [`World`], each with a
//! simulated disk that outlives the node, so a crash loses exactly the unsynced writes.

use std::cell::RefCell;
use std::rc::Rc;

use sixfive_raft::{Config, Entry, HardState, NodeId, RestoredState, Role, Snapshot, Status, Storage};
use sixfive_raft_sim::{NodeStorage, SimStorage};
use sixfive_rpc::Transport;
use sixfive_sim::{MS, NetConfig, SimClient, World};
use sixfive_storage::fs::SimFsConfig;

use crate::{Rsm, RsmNode, RsmReply, RsmRequest, StateMachine};

/// A node's storage, shared with the harness so it survives the node: the in-memory model
/// or the production `FileStorage` on a simulated disk.
#[derive(Clone)]
pub struct SharedStorage(pub Rc<RefCell<NodeStorage>>);

impl Default for SharedStorage {
    fn default() -> Self {
        SharedStorage(Rc::new(RefCell::new(NodeStorage::Model(SimStorage::default()))))
    }
}

impl Storage for SharedStorage {
    type Error = String;
    fn initial_state(&self) -> Result<RestoredState, Self::Error> {
        self.0.borrow().initial_state()
    }
    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), Self::Error> {
        self.0.borrow_mut().save_hard_state(hs)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), Self::Error> {
        self.0.borrow_mut().append(entries)
    }
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error> {
        self.0.borrow_mut().save_snapshot(snapshot)
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        self.0.borrow_mut().sync()
    }
    fn raft_state_bytes(&self) -> usize {
        self.0.borrow().raft_state_bytes()
    }
}

/// The node type the cluster runs.
pub type TestNode<M> = RsmNode<SharedStorage, M>;

/// A cluster of replicated state machines; server `i` (1-based) has endpoint and Raft id `i`.
pub struct RsmCluster<M> {
    /// The world they run in.
    pub world: World,
    n: u64,
    disks: Vec<SharedStorage>,
    make: Box<dyn Fn() -> M>,
    max_raft_state: Option<usize>,
}

impl<M: StateMachine + 'static> RsmCluster<M> {
    /// Starts `n` servers whose state machines come from `make`.
    pub fn new(
        seed: u64,
        n: u64,
        net: NetConfig,
        max_raft_state: Option<usize>,
        make: impl Fn() -> M + 'static,
    ) -> Self {
        Self::new_on(seed, n, net, max_raft_state, None, make)
    }

    /// Same, with the servers' Raft state in the production `FileStorage` on simulated disks
    /// with the given faults (`None`: the in-memory model).
    pub fn new_on(
        seed: u64,
        n: u64,
        net: NetConfig,
        max_raft_state: Option<usize>,
        file_storage: Option<SimFsConfig>,
        make: impl Fn() -> M + 'static,
    ) -> Self {
        let world = World::new(seed, net);
        let disks = (0..n)
            .map(|_| match file_storage {
                None => SharedStorage::default(),
                Some(fc) => {
                    let rng = world.with_rng(|r| r.fork());
                    SharedStorage(Rc::new(RefCell::new(NodeStorage::file(rng, fc))))
                }
            })
            .collect();
        let c = RsmCluster { world, n, disks, make: Box::new(make), max_raft_state };
        for id in c.ids() {
            c.start(id);
        }
        c
    }

    /// Server ids.
    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.n).collect()
    }

    /// Starts server `id` from its disk (it stays down if an injected I/O error stops it
    /// from opening its storage).
    pub fn start(&self, id: NodeId) {
        let mut cfg = Config::new(id, self.ids());
        cfg.seed = self.world.random(u64::MAX);
        let disk = &self.disks[(id - 1) as usize];
        if self.world.is_up(id) {
            // Stopped by a storage failure: the process exits first; the machine (and its page
            // cache) stays up.
            self.world.crash(id);
            self.world.with_rng(|rng| disk.0.borrow_mut().stop_process(rng, false));
        }
        if disk.0.borrow_mut().reopen().is_err() {
            return;
        }
        let rsm = Rsm::new(cfg, disk.clone(), (self.make)(), self.max_raft_state).expect("valid config");
        self.world.start_node(id, RsmNode::new(rsm));
    }

    /// Crashes server `id`: its unsynced writes are lost.
    pub fn crash(&self, id: NodeId) {
        self.world.crash(id);
        let disk = &self.disks[(id - 1) as usize];
        self.world.with_rng(|rng| disk.0.borrow_mut().crash(rng, false));
    }

    /// Crashes and restarts server `id`.
    pub fn restart(&self, id: NodeId) {
        self.crash(id);
        self.start(id);
    }

    /// Shuts server `id` down gracefully (pending submissions are answered).
    pub fn shutdown(&self, id: NodeId) {
        self.world.shutdown(id);
    }

    /// Whether server `id` runs (a server stopped by a storage failure does not).
    pub fn is_up(&self, id: NodeId) -> bool {
        self.world.is_up(id) && self.world.inspect::<TestNode<M>, _>(id, |n| n.failed().is_none()).unwrap_or(true)
    }

    /// Changes the simulated disks' faults (file storage only).
    pub fn set_fs_config(&self, config: SimFsConfig) {
        for d in &self.disks {
            if let Some(fs) = d.0.borrow().fs() {
                fs.set_config(config);
            }
        }
    }

    /// Raft status of server `id`, if it runs.
    pub fn status(&self, id: NodeId) -> Option<Status> {
        self.world.inspect::<TestNode<M>, _>(id, |n| n.rsm().status())
    }

    /// Runs `f` on server `id`'s state machine.
    pub fn with_sm<T>(&self, id: NodeId, f: impl FnOnce(&M) -> T) -> Option<T> {
        self.world.inspect::<TestNode<M>, _>(id, |n| f(n.rsm().state_machine()))
    }

    /// A running, connected server that believes it leads in the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.ids()
            .into_iter()
            .filter(|&id| self.world.net(|n| n.is_connected(id)))
            .filter_map(|id| self.status(id).filter(|s| s.role == Role::Leader).map(|s| (s.term, id)))
            .max()
            .map(|(_, id)| id)
    }

    /// Waits (up to 10 s of virtual time) for a leader.
    pub async fn wait_leader(&self, client: &SimClient) -> NodeId {
        for _ in 0..200 {
            if let Some(l) = self.leader() {
                return l;
            }
            client.sleep(50 * MS).await;
        }
        panic!("no leader within 10 s");
    }

    /// Bytes of Raft state on server `id`'s disk.
    pub fn raft_state_bytes(&self, id: NodeId) -> usize {
        self.disks[(id - 1) as usize].raft_state_bytes()
    }

    /// Bytes of server `id`'s snapshot on disk.
    pub fn snapshot_bytes(&self, id: NodeId) -> usize {
        self.disks[(id - 1) as usize].0.borrow().snapshot_bytes()
    }

    /// Largest Raft state on any server's disk.
    pub fn max_raft_state_bytes(&self) -> usize {
        self.ids().into_iter().map(|id| self.raft_state_bytes(id)).max().unwrap_or(0)
    }
}

/// Sends one request to server `to` and decodes the answer.
pub async fn request(
    client: &SimClient,
    to: NodeId,
    req: &RsmRequest,
    timeout: u64,
) -> Result<RsmReply, sixfive_rpc::RpcError> {
    let bytes = client.call(to, postcard::to_allocvec(req).expect("encodes"), timeout).await?;
    Ok(postcard::from_bytes(&bytes).expect("replies decode"))
}
