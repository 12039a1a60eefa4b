//! Test support: a cluster of [`RsmNode`]s in the simulator's [`World`], each with a
//! simulated disk that outlives the node, so a crash loses exactly the unsynced writes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use sixfive_raft::{
    ConfChange, ConfState, Config, Entry, HardState, NodeId, RestoredState, Role, Snapshot, Status, Storage,
};
use sixfive_raft_sim::{NodeStorage, SimStorage};
use sixfive_rpc::Transport;
use sixfive_sim::{MS, NetConfig, SEC, SimClient, World};
use sixfive_storage::fs::SimFsConfig;

use crate::{Membership, Rsm, RsmNode, RsmReply, RsmRequest, StateMachine, SubmitError};

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
    /// Servers ever started (ids `1..=n`); the first `initial` form the bootstrap voters.
    n: Cell<u64>,
    initial: u64,
    disks: RefCell<Vec<SharedStorage>>,
    file_storage: Option<SimFsConfig>,
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
        let c = RsmCluster {
            world,
            n: Cell::new(0),
            initial: n,
            disks: RefCell::new(Vec::new()),
            file_storage,
            make: Box::new(make),
            max_raft_state,
        };
        for _ in 0..n {
            c.new_disk();
        }
        for id in c.ids() {
            c.start(id);
        }
        c
    }

    fn new_disk(&self) -> NodeId {
        let disk = match self.file_storage {
            None => SharedStorage::default(),
            Some(fc) => {
                let rng = self.world.with_rng(|r| r.fork());
                SharedStorage(Rc::new(RefCell::new(NodeStorage::file(rng, fc))))
            }
        };
        self.disks.borrow_mut().push(disk);
        self.n.set(self.n.get() + 1);
        self.n.get()
    }

    fn disk(&self, id: NodeId) -> SharedStorage {
        self.disks.borrow()[(id - 1) as usize].clone()
    }

    /// Server ids (every server ever started, removed ones included).
    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.n.get()).collect()
    }

    /// Starts a brand-new server (next id, empty disk) that knows no configuration: it serves
    /// nothing until a leader adds it ([`RsmCluster::change_membership`]). Returns its id.
    pub fn add_server(&self) -> NodeId {
        let id = self.new_disk();
        self.start(id);
        id
    }

    /// The membership as server `id` sees it, if it runs.
    pub fn membership(&self, id: NodeId) -> Option<Membership> {
        self.world.inspect::<TestNode<M>, _>(id, |n| n.rsm().membership())
    }

    /// Proposes `changes` through the leader (retrying while refused for now, or unanswered)
    /// until a leader's settled configuration satisfies `done`; returns it. Panics after 30 s
    /// of virtual time, or if the change is refused as invalid while `done` does not hold.
    pub async fn change_membership(
        &self,
        client: &SimClient,
        changes: &[ConfChange],
        done: impl Fn(&ConfState) -> bool,
    ) -> ConfState {
        let t0 = client.now();
        while client.now() - t0 < 30 * SEC {
            let l = self.wait_leader(client).await;
            let m = self.membership(l).expect("the leader runs");
            if m.settled && done(&m.conf) {
                return m.conf;
            }
            if m.settled {
                match request(client, l, &RsmRequest::ChangeMembership(changes.to_vec()), SEC).await {
                    Ok(RsmReply::Failed(SubmitError::MembershipRefused { retryable: false, reason })) => {
                        let now = self.membership(l).map(|m| m.conf);
                        assert!(now.as_ref().is_some_and(&done), "change {changes:?} refused: {reason} ({now:?})");
                    }
                    Ok(RsmReply::Malformed(m)) => panic!("{m}"),
                    _ => {}
                }
            }
            client.sleep(100 * MS).await;
        }
        panic!("membership change {changes:?} did not settle within 30 s");
    }

    /// Starts server `id` from its disk (it stays down if an injected I/O error stops it
    /// from opening its storage).
    pub fn start(&self, id: NodeId) {
        // Servers added later join with no bootstrap configuration.
        let bootstrap = if id <= self.initial { (1..=self.initial).collect() } else { vec![] };
        let mut cfg = Config::new(id, bootstrap);
        cfg.seed = self.world.random(u64::MAX);
        let disk = &self.disk(id);
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
        let disk = &self.disk(id);
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
        for d in self.disks.borrow().iter() {
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
        self.disk(id).raft_state_bytes()
    }

    /// Bytes of server `id`'s snapshot on disk.
    pub fn snapshot_bytes(&self, id: NodeId) -> usize {
        self.disk(id).0.borrow().snapshot_bytes()
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
