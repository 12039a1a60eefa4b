//! A Raft cluster running in virtual time: every node is a [`RawNode`] with a [`SimStorage`],
//! every message is encoded, routed through the faulty [`Network`] and decoded, and the
//! [`Checker`] watches every event. The methods named after the course's tester
//! (`check_one_leader`, `one`, `n_committed`, `wait`, ...) let scenario tests read like the
//! course's own.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use sixfive_raft::{
    ConfChange, ConfChangeError, ConfState, Config, EntryKind, Index, Message, MessageBody, NodeId, RawNode, ReadState,
    Ready, Role, Status, Storage, Term, persist_ready, write_ready,
};
use sixfive_sim::{EventQueue, Fate, MS, Micros, NetConfig, Network, Rng, SEC};
use sixfive_storage::fs::SimFsConfig;

use crate::checker::Checker;
use crate::storage::{NodeStorage, SimStorage};

/// Length of one Raft tick in virtual time.
pub const TICK: Micros = 10 * MS;

/// How a simulated cluster is set up.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Number of nodes (ids 1..=nodes).
    pub nodes: usize,
    /// Network fault model at the start.
    pub net: NetConfig,
    /// Take a snapshot whenever an applied index `i` has `(i + 1) % every == 0` (the course's rule).
    pub snapshot_every: Option<u64>,
    /// Probability that a node crashes in the middle of persisting a `Ready` (after writing,
    /// before syncing), losing the unsynced writes.
    pub crash_in_ready: f64,
    /// Crashes tear: a random prefix of the unsynced writes survives.
    pub torn_writes: bool,
    /// Adjusts each node's Raft configuration.
    pub tweak: fn(&mut Config),
    /// Run the production `FileStorage` on a simulated file system with these faults, instead
    /// of the in-memory storage model.
    pub file_storage: Option<SimFsConfig>,
    /// Clocks run at different rates: each node's tick lasts `TICK * (1 + d)` with `d` drawn
    /// at each start from `[-clock_drift, clock_drift]`.
    pub clock_drift: f64,
    /// Pipelined persistence (as the production server does it): each `Ready` that must be
    /// synced is written at once and synced 0.05-3 ms later, while the node goes on handling
    /// events and taking more `Ready`s, written behind it and completed in order: the
    /// followers' answers reach a leader whose own write is not durable yet, and a crash
    /// meanwhile loses every `Ready` in flight. Otherwise a node persists each `Ready` before
    /// handling anything else.
    pub async_persist: bool,
}

impl ClusterConfig {
    /// `nodes` nodes on a reliable network, no snapshots, clean crashes.
    pub fn new(nodes: usize) -> ClusterConfig {
        ClusterConfig {
            nodes,
            net: NetConfig::default(),
            snapshot_every: None,
            crash_in_ready: 0.0,
            torn_writes: false,
            tweak: |_| {},
            file_storage: None,
            clock_drift: 0.0,
            async_persist: false,
        }
    }

    /// Same, on an unreliable network.
    pub fn unreliable(nodes: usize) -> ClusterConfig {
        ClusterConfig { net: NetConfig { unreliable: true, ..Default::default() }, ..ClusterConfig::new(nodes) }
    }
}

/// The test application's state: which command was applied at which index.
/// Its snapshot is this whole structure, so a restored node knows its history.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedLog {
    /// Highest index applied (no-ops included).
    pub last_applied: Index,
    /// Commands by index (no-ops excluded).
    pub cmds: BTreeMap<Index, Vec<u8>>,
}

enum Event {
    Tick {
        node: usize,
        incarnation: u64,
    },
    /// The sync of a node's pending `Ready` completes (with `async_persist`).
    Persisted {
        node: usize,
        incarnation: u64,
    },
    Deliver {
        from: NodeId,
        to: NodeId,
        reply: bool,
        bytes: Vec<u8>,
    },
}

struct Slot {
    id: NodeId,
    storage: NodeStorage,
    raw: Option<RawNode>,
    /// What this node's application has applied (kept across a crash, reset at restart).
    sm: AppliedLog,
    incarnation: u64,
    reads: Vec<ReadState>,
    /// Snapshots received from a leader and installed.
    installed_snapshots: u64,
    /// Length of this instance's tick (its clock's rate).
    tick_micros: Micros,
    /// A stop-the-world pause: nothing runs before this time; then the timers that should
    /// have fired meanwhile fire in a burst.
    paused_until: Micros,
    /// (term, highest commit index) checked for a quorum while this instance led in that term.
    checked_commit: (Term, Index),
    /// `Ready`s written and waiting for a sync (with `async_persist`), oldest first, and
    /// whether their early messages went out.
    pending: VecDeque<(Ready, bool)>,
}

/// The simulated cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    /// The run's randomness; tests draw from it too, so the seed decides everything.
    pub rng: Rng,
    now: Micros,
    /// The network; tests change its faults and partitions directly.
    pub net: Network,
    queue: EventQueue<Event>,
    slots: Vec<Slot>,
    checker: Checker,
    trace: u64,
    events: u64,
    storage_failures: u64,
    crashes_after_early_send: u64,
    commits_before_own_sync: u64,
}

/// Writes a `Ready`'s persistent parts in `persist_ready`'s order, without syncing.
/// Encodes a test command from a number.
pub fn cmd(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

impl Cluster {
    /// A cluster whose every choice follows from `seed`; all nodes start at once.
    pub fn new(cfg: ClusterConfig, seed: u64) -> Cluster {
        let mut rng = Rng::new(seed);
        let storages: Vec<NodeStorage> = (0..cfg.nodes)
            .map(|_| match cfg.file_storage {
                Some(fc) => NodeStorage::file(rng.fork(), fc),
                None => NodeStorage::Model(SimStorage::default()),
            })
            .collect();
        let mut c = Cluster {
            rng,
            now: 0,
            net: Network::new(cfg.net),
            queue: EventQueue::default(),
            slots: (1..=cfg.nodes as u64)
                .zip(storages)
                .map(|(id, storage)| Slot {
                    id,
                    storage,
                    raw: None,
                    sm: AppliedLog::default(),
                    incarnation: 0,
                    reads: Vec::new(),
                    installed_snapshots: 0,
                    tick_micros: TICK,
                    paused_until: 0,
                    checked_commit: (0, 0),
                    pending: VecDeque::new(),
                })
                .collect(),
            checker: Checker::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            events: 0,
            storage_failures: 0,
            crashes_after_early_send: 0,
            commits_before_own_sync: 0,
            cfg,
        };
        for id in c.ids() {
            c.restart(id);
        }
        c
    }

    /// Adds a node with a new id and empty storage, started at once; it knows no
    /// configuration until a leader adds it (see [`Cluster::change_membership`]). Returns its id.
    pub fn add_node(&mut self) -> NodeId {
        let storage = match self.cfg.file_storage {
            Some(fc) => NodeStorage::file(self.rng.fork(), fc),
            None => NodeStorage::Model(SimStorage::default()),
        };
        let id = self.slots.len() as u64 + 1;
        self.slots.push(Slot {
            id,
            storage,
            raw: None,
            sm: AppliedLog::default(),
            incarnation: 0,
            reads: Vec::new(),
            installed_snapshots: 0,
            tick_micros: TICK,
            paused_until: 0,
            checked_commit: (0, 0),
            pending: VecDeque::new(),
        });
        self.trace(10, &id.to_le_bytes());
        self.restart(id);
        id
    }

    /// Proposes a configuration change at node `id` (see
    /// [`sixfive_raft::RawNode::propose_conf_change`]).
    pub fn change_membership(&mut self, id: NodeId, changes: &[ConfChange]) -> Result<Index, ConfChangeError> {
        self.trace(11, &postcard::to_allocvec(changes).expect("encodes"));
        if self.is_paused(id) {
            return Err(ConfChangeError::NotLeader { leader: None });
        }
        let raw = self.slot(id).raw.as_mut().ok_or(ConfChangeError::NotLeader { leader: None })?;
        let (index, _) = raw.propose_conf_change(changes)?;
        self.drive(id);
        Ok(index)
    }

    /// Node ids (every node ever added, removed ones included).
    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.slots.len() as u64).collect()
    }

    /// Virtual time now.
    pub fn now(&self) -> Micros {
        self.now
    }

    /// Hash of every event so far: equal for two runs of the same seed.
    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    /// Events processed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The checker's record.
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    fn trace(&mut self, tag: u64, data: &[u8]) {
        let mut h = self.trace;
        for b in self.now.to_le_bytes().iter().chain(tag.to_le_bytes().iter()).chain(data.iter()) {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self.trace = h;
    }

    fn slot(&mut self, id: NodeId) -> &mut Slot {
        &mut self.slots[(id - 1) as usize]
    }

    // ------------------------------------------------------------ time

    /// Runs every event due within the next `d` of virtual time.
    pub fn sleep(&mut self, d: Micros) {
        let until = self.now + d;
        while let Some((t, ev)) = self.queue.pop_until(until) {
            self.now = t;
            self.events += 1;
            match ev {
                Event::Tick { node, incarnation } => self.on_tick(node, incarnation),
                Event::Persisted { node, incarnation } => self.on_persisted(node, incarnation),
                Event::Deliver { from, to, reply, bytes } => self.on_deliver(from, to, reply, bytes),
            }
        }
        self.now = until;
    }

    fn on_tick(&mut self, node: usize, incarnation: u64) {
        let now = self.now;
        let slot = &mut self.slots[node];
        if slot.incarnation != incarnation {
            return; // a tick of a crashed instance
        }
        if now < slot.paused_until {
            let until = slot.paused_until;
            self.queue.push(until, Event::Tick { node, incarnation });
            return;
        }
        let Some(raw) = slot.raw.as_mut() else { return };
        // After a pause, every tick that was due meanwhile fires at once (capped).
        let due =
            if slot.paused_until > 0 && now == slot.paused_until { 1 + 20.min(now / slot.tick_micros) } else { 1 };
        for _ in 0..due {
            raw.tick();
        }
        let id = slot.id;
        let tick = slot.tick_micros;
        self.trace(1, &id.to_le_bytes());
        self.drive(id);
        self.queue.push(self.now + tick, Event::Tick { node, incarnation });
    }

    fn on_deliver(&mut self, from: NodeId, to: NodeId, reply: bool, bytes: Vec<u8>) {
        let until = self.slot(to).paused_until;
        if self.now < until {
            // The receiver is paused: the message waits in its socket buffer.
            self.queue.push(until, Event::Deliver { from, to, reply, bytes });
            return;
        }
        if self.slot(to).raw.is_none() || !self.net.arrive(from, to, reply) {
            return;
        }
        self.trace(2, &bytes);
        let m: Message = postcard::from_bytes(&bytes).expect("messages decode");
        self.slot(to).raw.as_mut().expect("live").step(m).expect("messages from peers to their receiver");
        self.drive(to);
    }

    /// Every message must depend only on what its sender has made durable (a crash right
    /// after sending must not let the sender forget a term, a vote or entries it vouched for).
    fn check_durable(&self, m: &Message) {
        let Some(d) = self.slots[(m.from - 1) as usize].storage.durable() else { return };
        let pre = matches!(m.body, MessageBody::Vote { pre: true, .. } | MessageBody::VoteResponse { pre: true, .. });
        if !pre {
            assert!(
                d.hard_state.term >= m.term,
                "node {} sent {:?} in term {} with only term {} durable",
                m.from,
                m.body,
                m.term,
                d.hard_state.term
            );
        }
        if d.hard_state.term > m.term {
            // With pipelined persistence, a message of an earlier `Ready` goes out once later
            // ones are durable too, which may have moved to a newer term (and truncated what
            // it acknowledged): what it vouched for was durable, as for a message delayed in
            // the network, and no node ever acts again in a term it left.
            return;
        }
        let durable_last = d.entries.last().map_or(d.snapshot.as_ref().map_or(0, |s| s.meta.index), |e| e.index);
        match &m.body {
            MessageBody::VoteResponse { pre: false, granted: true } => assert!(
                d.hard_state.term == m.term && d.hard_state.vote == Some(m.to),
                "node {} granted its vote to {} in term {} before persisting it (durable: {:?})",
                m.from,
                m.to,
                m.term,
                d.hard_state
            ),
            MessageBody::AppendResponse { success: true, index, .. } => assert!(
                durable_last >= *index,
                "node {} acknowledged entries up to {index} with only {durable_last} durable",
                m.from
            ),
            _ => {}
        }
    }

    fn send(&mut self, m: Message, delay: Micros) {
        self.check_durable(&m);
        if let MessageBody::VoteResponse { pre: false, granted: true } = m.body {
            self.checker.on_vote(m.from, m.to, m.term);
        }
        let bytes = postcard::to_allocvec(&m).expect("messages encode");
        let reply = m.body.is_response();
        match self.net.send(&mut self.rng, self.now + delay, m.from, m.to, reply, bytes.len()) {
            Fate::Deliver(at) => {
                if let Some(again) = self.net.duplicate(&mut self.rng, at) {
                    self.queue.push(again, Event::Deliver { from: m.from, to: m.to, reply, bytes: bytes.clone() });
                }
                self.queue.push(at, Event::Deliver { from: m.from, to: m.to, reply, bytes })
            }
            Fate::Drop | Fate::FailAt(_) => {}
        }
    }

    /// Processes every `Ready` of node `id` the way a real driver would (see [`sixfive_raft::Ready`]).
    ///
    /// With [`ClusterConfig::async_persist`], a `Ready` that must be synced is written at once
    /// and synced later (a `Persisted` event): meanwhile the node goes on handling messages,
    /// ticks and proposals and takes more `Ready`s, written behind it and finished after it,
    /// so the followers' answers to its early `Append`s can reach a leader whose own copy is
    /// not durable yet, and committed entries are applied while later ones are in flight.
    fn drive(&mut self, id: NodeId) {
        let i = (id - 1) as usize;
        loop {
            let slot = &mut self.slots[i];
            let Some(raw) = slot.raw.as_mut() else { return };
            if !raw.has_ready() {
                break;
            }
            let mut rd = raw.ready();
            // 1. A leader's replication leaves at once, before its own write of the same
            //    entries (thesis 10.2.1), so a crash below may come after the followers got
            //    entries the leader then loses.
            let sent_early = !rd.messages.is_empty();
            for m in std::mem::take(&mut rd.messages) {
                self.send(m, 0);
            }
            let slot = &mut self.slots[i];
            if self.cfg.async_persist && (rd.must_sync() || !slot.pending.is_empty()) {
                // 2'. Write now, behind the `Ready`s in flight; sync when a `Persisted` event
                //     fires (one that must sync schedules one), finish in order after it.
                if write_ready(&mut slot.storage, &rd).is_err() {
                    self.storage_failures += 1;
                    self.stop_after_storage_failure(id);
                    return;
                }
                self.check_written(id, &rd);
                let slot = &mut self.slots[i];
                let must_sync = rd.must_sync();
                slot.pending.push_back((rd, sent_early));
                if must_sync {
                    let (node, incarnation) = (i, slot.incarnation);
                    let after = self.rng.range(50, 3 * MS);
                    self.queue.push(self.now + after, Event::Persisted { node, incarnation });
                }
                continue;
            }
            // 2. Persist. Possibly crash between the writes and the sync.
            if rd.must_sync() && self.cfg.crash_in_ready > 0.0 && self.rng.chance(self.cfg.crash_in_ready) {
                // Errors do not matter here: the node crashes anyway.
                let _ = write_ready(&mut slot.storage, &rd);
                self.trace(3, &id.to_le_bytes());
                self.crash(id);
                self.crashes_after_early_send += u64::from(sent_early);
                return;
            }
            if persist_ready(&mut slot.storage, &rd).is_err() {
                // An I/O error: the storage is poisoned, the node stops (a restart re-reads
                // the disk).
                self.storage_failures += 1;
                self.stop_after_storage_failure(id);
                return;
            }
            let delay = slot.storage.fs().map_or(0, |fs| fs.take_latency());
            self.check_written(id, &rd);
            if !self.finish_ready(id, rd, delay) {
                return;
            }
        }
        self.check_leader(id);
    }

    /// The checker learns what node `id` wrote (Log Matching is checked on it).
    fn check_written(&mut self, id: NodeId, rd: &Ready) {
        if let Some(s) = &rd.snapshot {
            self.checker.on_snapshot(id, s.meta.index, s.meta.term);
        }
        let raw = self.slots[(id - 1) as usize].raw.as_ref().expect("live");
        self.checker.on_entries(id, &rd.entries, raw.log());
    }

    /// A sync of node `id` completes (or the node crashes first): every `Ready` written so
    /// far is durable, and they are finished in order.
    fn on_persisted(&mut self, node: usize, incarnation: u64) {
        let slot = &mut self.slots[node];
        if slot.incarnation != incarnation || slot.pending.is_empty() {
            return;
        }
        if self.now < slot.paused_until {
            let until = slot.paused_until;
            self.queue.push(until, Event::Persisted { node, incarnation });
            return;
        }
        let id = slot.id;
        self.trace(12, &id.to_le_bytes());
        if self.cfg.crash_in_ready > 0.0 && self.rng.chance(self.cfg.crash_in_ready) {
            let sent_early = self.slots[node].pending.iter().any(|(_, early)| *early);
            self.trace(3, &id.to_le_bytes());
            self.crash(id);
            self.crashes_after_early_send += u64::from(sent_early);
            return;
        }
        let slot = &mut self.slots[node];
        if slot.storage.sync().is_err() {
            self.storage_failures += 1;
            self.stop_after_storage_failure(id);
            return;
        }
        let delay = slot.storage.fs().map_or(0, |fs| fs.take_latency());
        while let Some((rd, _)) = self.slots[node].pending.pop_front() {
            if !self.finish_ready(id, rd, delay) {
                return;
            }
        }
        self.drive(id);
    }

    /// Steps 3 and 4 of a `Ready` whose writes are durable: send what acknowledges them, apply,
    /// advance, and snapshot as the course's tester does. False if the node stopped.
    fn finish_ready(&mut self, id: NodeId, mut rd: Ready, delay: Micros) -> bool {
        let i = (id - 1) as usize;
        // 3. Send what may acknowledge the persist, once it is done.
        for m in std::mem::take(&mut rd.persisted_messages) {
            self.send(m, delay);
        }
        // 4. Apply.
        let slot = &mut self.slots[i];
        if let Some(s) = &rd.snapshot {
            let sm: AppliedLog = postcard::from_bytes(s.app_data()).expect("snapshot decodes");
            assert_eq!(sm.last_applied, s.meta.index, "snapshot contents do not match its index");
            slot.sm = sm;
            self.checker.on_install(id, s.conf_state().expect("the core's snapshots carry a configuration"));
            slot.installed_snapshots += 1;
        }
        let mut take_snapshot = None;
        let term = slot.raw.as_ref().expect("live").status().term;
        for e in &rd.committed_entries {
            assert_eq!(e.index, slot.sm.last_applied + 1, "node {id} applied index {} out of order", e.index);
            slot.sm.last_applied = e.index;
            if e.kind == EntryKind::Normal {
                slot.sm.cmds.insert(e.index, e.data.to_vec());
            }
            self.checker.on_apply(id, term, e);
            if self.cfg.snapshot_every.is_some_and(|n| (e.index + 1) % n == 0) {
                take_snapshot = Some((e.index, postcard::to_allocvec(&slot.sm).expect("encodes")));
            }
        }
        slot.reads.extend(rd.read_states.iter().cloned());
        let raw = slot.raw.as_mut().expect("live");
        raw.advance(&rd);
        // The application snapshots and saves it, as the course's tester does.
        if let Some((index, data)) = take_snapshot
            && let Ok(snap) = raw.compact(index, data)
        {
            if slot.storage.save_snapshot(&snap).and_then(|()| slot.storage.sync()).is_err() {
                self.storage_failures += 1;
                self.stop_after_storage_failure(id);
                return false;
            }
            self.checker.on_compact(id, index);
        }
        true
    }

    /// Checks after node `id` handled an event: a leader was elected by a quorum and holds
    /// what was committed before (the checker), and what it commits is durable on a quorum.
    fn check_leader(&mut self, id: NodeId) {
        let i = (id - 1) as usize;
        let Some(raw) = self.slots[i].raw.as_ref() else { return };
        let st = raw.status();
        if st.role == Role::Leader {
            self.checker.on_leader(id, st.term, raw.log(), &st.conf);
            let slot = &self.slots[i];
            if slot.checked_commit.0 != st.term {
                // Newly elected: what it committed as a follower, earlier leaders committed.
                self.slots[i].checked_commit = (st.term, st.commit);
            } else if st.commit > slot.checked_commit.1 {
                let term = raw.log().term(st.commit).expect("the leader holds what it committed");
                self.slots[i].checked_commit.1 = st.commit;
                self.commits_before_own_sync += u64::from(!self.slots[i].pending.is_empty());
                self.check_commit_quorum(id, st.commit, term, &st.conf);
            }
        }
    }

    /// Commitment with the right quorum: when leader `id` advances its commit index to
    /// `index`, the nodes whose *durable* log holds that entry form a quorum of the leader's
    /// configuration (both majorities when joint; learners never count). Checked when every
    /// node runs on the storage model (whose durable state is known).
    fn check_commit_quorum(&self, id: NodeId, index: Index, term: Term, conf: &ConfState) {
        let mut holders = Vec::new();
        for s in &self.slots {
            let Some(d) = s.storage.durable() else { return };
            let snap = d.snapshot.as_ref().map_or(0, |x| x.meta.index);
            let holds = snap >= index || d.entries.iter().any(|e| e.index == index && e.term == term);
            if holds {
                holders.push(s.id);
            }
        }
        assert!(
            conf.has_quorum(&|v| holders.contains(&v)),
            "leader {id} committed index {index} (term {term}) held durably only by {holders:?}, no quorum of {conf:?}\n{}",
            self.dump()
        );
    }

    // ------------------------------------------------------------ faults

    /// Stops node `id`: its unsynced writes are lost (or torn), its in-memory state is gone.
    pub fn crash(&mut self, id: NodeId) {
        let torn = self.cfg.torn_writes;
        let slot = &mut self.slots[(id - 1) as usize];
        slot.pending.clear();
        if slot.raw.take().is_some() {
            slot.storage.crash(&mut self.rng, torn);
            slot.incarnation += 1;
            self.trace(4, &id.to_le_bytes());
        }
    }

    /// Node `id`'s storage failed: its process stops (the machine, and its page cache, stay
    /// up); a restart re-reads the disk.
    fn stop_after_storage_failure(&mut self, id: NodeId) {
        let torn = self.cfg.torn_writes;
        let slot = &mut self.slots[(id - 1) as usize];
        slot.pending.clear();
        if slot.raw.take().is_some() {
            slot.storage.stop_process(&mut self.rng, torn);
            slot.incarnation += 1;
            self.trace(4, &id.to_le_bytes());
        }
    }

    /// Starts a new instance of node `id` from what its disk holds (crashing a running one first).
    pub fn restart(&mut self, id: NodeId) {
        self.crash(id);
        // Nodes added later join with no bootstrap configuration: they learn it from a leader.
        let bootstrap = if id <= self.cfg.nodes as u64 { (1..=self.cfg.nodes as u64).collect() } else { vec![] };
        let mut rc = Config::new(id, bootstrap.clone());
        rc.seed = self.rng.next_u64();
        (self.cfg.tweak)(&mut rc);
        let slot = &mut self.slots[(id - 1) as usize];
        if slot.storage.reopen().is_err() {
            self.storage_failures += 1;
            return; // an I/O error at start-up: the node stays down
        }
        let state = slot.storage.initial_state().expect("opened");
        slot.sm = match &state.snapshot {
            Some(s) => {
                let sm: AppliedLog = postcard::from_bytes(s.app_data()).expect("snapshot decodes");
                assert_eq!(sm.last_applied, s.meta.index, "stored snapshot does not match its index");
                sm
            }
            None => AppliedLog::default(),
        };
        slot.reads.clear();
        slot.paused_until = 0;
        slot.checked_commit = (0, 0);
        if self.cfg.clock_drift > 0.0 {
            let d = (self.rng.below(2001) as f64 / 1000.0 - 1.0) * self.cfg.clock_drift;
            slot.tick_micros = ((TICK as f64) * (1.0 + d)) as Micros;
        }
        let base_conf =
            state.snapshot.as_ref().and_then(|s| s.conf_state()).unwrap_or_else(|| ConfState::with_voters(bootstrap));
        self.checker.on_install(id, base_conf);
        let raw = RawNode::restart(rc, state).expect("valid config");
        self.checker.on_restart(id, raw.log());
        slot.raw = Some(raw);
        let node = (id - 1) as usize;
        let incarnation = slot.incarnation;
        let phase = self.rng.below(TICK);
        self.queue.push(self.now + phase, Event::Tick { node, incarnation });
        self.trace(5, &id.to_le_bytes());
    }

    /// Pauses node `id` for `d` (a stop-the-world garbage collection, a SIGSTOP, a VM
    /// migration): no timer fires and no message is handled until it resumes; then the ticks
    /// it missed fire in a burst and the messages that arrived are handled in order.
    pub fn pause(&mut self, id: NodeId, d: Micros) {
        let until = self.now + d;
        let slot = self.slot(id);
        if slot.raw.is_some() {
            slot.paused_until = slot.paused_until.max(until);
            self.trace(9, &id.to_le_bytes());
        }
    }

    /// Whether node `id` is paused now.
    pub fn is_paused(&self, id: NodeId) -> bool {
        self.now < self.slots[(id - 1) as usize].paused_until
    }

    /// Sets the probability of a crash in the middle of persisting a `Ready`.
    pub fn set_crash_in_ready(&mut self, p: f64) {
        self.cfg.crash_in_ready = p;
    }

    /// Cuts node `id` off the network.
    pub fn disconnect(&mut self, id: NodeId) {
        self.net.disconnect(id);
        self.trace(6, &id.to_le_bytes());
    }

    /// Reconnects node `id`.
    pub fn connect(&mut self, id: NodeId) {
        self.net.connect(id);
        self.trace(7, &id.to_le_bytes());
    }

    /// Whether node `id` is running.
    pub fn is_live(&self, id: NodeId) -> bool {
        self.slots[(id - 1) as usize].raw.is_some()
    }

    /// Whether node `id` is running and connected.
    pub fn is_up(&self, id: NodeId) -> bool {
        self.is_live(id) && self.net.is_connected(id)
    }

    // ------------------------------------------------------------ client operations

    /// Proposes `cmd` at node `id` (the course's `Start`): index and term, or `None` if it is
    /// not running or not the leader.
    pub fn start(&mut self, id: NodeId, cmd: Vec<u8>) -> Option<(Index, Term)> {
        self.trace(8, &cmd);
        if self.is_paused(id) {
            return None;
        }
        let r = self.slot(id).raw.as_mut()?.propose(cmd).ok()?;
        self.drive(id);
        Some(r)
    }

    /// Asks node `id` for a ReadIndex; the answer lands in [`Cluster::reads`].
    pub fn read_index(&mut self, id: NodeId, ctx: Vec<u8>) -> bool {
        let ok = !self.is_paused(id) && self.slot(id).raw.as_mut().is_some_and(|r| r.read_index(ctx).is_ok());
        if ok {
            self.drive(id);
        }
        ok
    }

    /// Asks leader `id` to hand leadership to `to`.
    pub fn transfer_leader(&mut self, id: NodeId, to: NodeId) -> bool {
        let ok = !self.is_paused(id) && self.slot(id).raw.as_mut().is_some_and(|r| r.transfer_leader(to).is_ok());
        if ok {
            self.drive(id);
        }
        ok
    }

    /// ReadIndex answers node `id` produced since it started.
    pub fn reads(&self, id: NodeId) -> &[ReadState] {
        &self.slots[(id - 1) as usize].reads
    }

    /// Node `id`'s status, if running.
    pub fn status(&self, id: NodeId) -> Option<Status> {
        self.slots[(id - 1) as usize].raw.as_ref().map(|r| r.status())
    }

    /// What node `id`'s application applied.
    pub fn applied(&self, id: NodeId) -> &AppliedLog {
        &self.slots[(id - 1) as usize].sm
    }

    /// Bytes of Raft state node `id` has on disk (log and hard state, not the snapshot).
    pub fn raft_state_bytes(&self, id: NodeId) -> usize {
        self.slots[(id - 1) as usize].storage.raft_state_bytes()
    }

    /// Syncs node `id`'s storage made, over all its restarts.
    pub fn syncs(&self, id: NodeId) -> u64 {
        self.slots[(id - 1) as usize].storage.syncs()
    }

    /// Crashes in the middle of persisting a `Ready` whose early messages (a leader's
    /// `Append`s, sent before its own write) had already gone out.
    pub fn crashes_after_early_send(&self) -> u64 {
        self.crashes_after_early_send
    }

    /// Times a leader advanced its commit index while its own write of the log was not yet
    /// durable (with `async_persist`): the followers' copies made the quorum.
    pub fn commits_before_own_sync(&self) -> u64 {
        self.commits_before_own_sync
    }

    /// Storage failures (injected I/O errors) that stopped a node.
    pub fn storage_failures(&self) -> u64 {
        self.storage_failures
    }

    /// Changes the simulated file systems' faults (file storage only).
    pub fn set_fs_config(&mut self, config: SimFsConfig) {
        for s in &self.slots {
            if let Some(fs) = s.storage.fs() {
                fs.set_config(config);
            }
        }
    }

    /// Snapshots node `id` received from leaders and installed, over all its restarts.
    pub fn installed_snapshots(&self, id: NodeId) -> u64 {
        self.slots[(id - 1) as usize].installed_snapshots
    }

    /// Largest Raft state on any node's disk (the course's `LogSize`).
    pub fn max_raft_state_bytes(&self) -> usize {
        self.ids().into_iter().map(|id| self.raft_state_bytes(id)).max().unwrap_or(0)
    }

    /// Bytes of node `id`'s snapshot on disk.
    pub fn snapshot_bytes(&self, id: NodeId) -> usize {
        self.slots[(id - 1) as usize].storage.snapshot_bytes()
    }

    /// RPCs (requests) received by all nodes.
    pub fn rpc_total(&self) -> u64 {
        self.net.total().rpcs_received
    }

    /// Bytes sent by all nodes.
    pub fn bytes_total(&self) -> u64 {
        self.net.total().bytes_sent
    }

    /// A description of every node, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = format!("at {} us:\n", self.now);
        for s in &self.slots {
            match &s.raw {
                None => out += &format!("  node {}: down\n", s.id),
                Some(r) => {
                    out += &format!(
                        "  node {} (connected: {}): {:?} applied {}\n",
                        s.id,
                        self.net.is_connected(s.id),
                        r.status(),
                        s.sm.last_applied
                    );
                    for (id, p) in r.progress() {
                        out += &format!(
                            "    -> {id}: match {} next {} {:?} probe_sent {} inflight {}\n",
                            p.match_index,
                            p.next_index,
                            p.state,
                            p.probe_sent,
                            p.inflights.len()
                        );
                    }
                }
            }
        }
        out
    }

    // ------------------------------------------------------------ the course's tester helpers

    /// Polls (10 times, 450-550 ms apart) until exactly one connected node leads the newest
    /// term; fails on two leaders in one term or on none at all.
    pub fn check_one_leader(&mut self) -> NodeId {
        for _ in 0..10 {
            let d = self.rng.range(450, 550) * MS;
            self.sleep(d);
            let mut leaders: BTreeMap<Term, Vec<NodeId>> = BTreeMap::new();
            for id in self.ids() {
                if let Some(st) = self.status(id).filter(|_| self.net.is_connected(id))
                    && st.role == Role::Leader
                {
                    leaders.entry(st.term).or_default().push(id);
                }
            }
            for (term, ls) in &leaders {
                assert!(ls.len() <= 1, "term {term} has {} (>1) leaders: {ls:?}", ls.len());
            }
            if let Some((_, ls)) = leaders.iter().next_back() {
                return ls[0];
            }
        }
        panic!("expected one leader, got none");
    }

    /// All connected nodes agree on the term; returns it.
    pub fn check_terms(&self) -> Term {
        let mut term = None;
        for id in self.ids().into_iter().filter(|&id| self.is_up(id)) {
            let t = self.status(id).expect("live").term;
            match term {
                None => term = Some(t),
                Some(x) => assert_eq!(x, t, "servers disagree on term"),
            }
        }
        term.expect("some node is up")
    }

    /// No connected node believes it leads.
    pub fn check_no_leader(&self) {
        for id in self.ids().into_iter().filter(|&id| self.is_up(id)) {
            assert_ne!(
                self.status(id).expect("live").role,
                Role::Leader,
                "node {id} is leader, but no leader was expected"
            );
        }
    }

    /// How many nodes have applied `index`, and the command there (all must agree).
    pub fn n_committed(&self, index: Index) -> (usize, Option<Vec<u8>>) {
        let mut count = 0;
        let mut cmd: Option<&Vec<u8>> = None;
        for s in &self.slots {
            if s.sm.last_applied >= index {
                let c = s.sm.cmds.get(&index);
                if count > 0 {
                    assert_eq!(cmd, c, "committed values do not match at index {index}");
                }
                cmd = c;
                count += 1;
            }
        }
        (count, cmd.cloned())
    }

    /// The course's `one`: keep submitting `cmd` to connected nodes for up to 10 s until one
    /// leader takes it and at least `expected` nodes apply it within 2 s. Returns its index.
    pub fn one(&mut self, cmd: Vec<u8>, expected: usize, retry: bool) -> Index {
        self.one_many(vec![cmd], expected, retry)[0]
    }

    /// Several `one` calls running at the same time (as concurrent clients would).
    pub fn one_many(&mut self, cmds: Vec<Vec<u8>>, expected: usize, retry: bool) -> Vec<Index> {
        enum State {
            Starting,
            Waiting { index: Index, since: Micros },
        }
        struct Task {
            cmd: Vec<u8>,
            wake: Micros,
            state: State,
            done: Option<Index>,
        }
        let t0 = self.now;
        let n = self.slots.len() as u64;
        let mut starts = 0;
        let mut tasks: Vec<Task> =
            cmds.into_iter().map(|cmd| Task { cmd, wake: t0, state: State::Starting, done: None }).collect();
        loop {
            let mut next_wake = None::<Micros>;
            for t in tasks.iter_mut().filter(|t| t.done.is_none()) {
                assert!(
                    self.now - t0 < 10 * SEC,
                    "one({:?}) failed to reach agreement in 10 s\n{}",
                    t.cmd,
                    self.dump()
                );
                if t.wake <= self.now {
                    match t.state {
                        State::Starting => {
                            t.wake = self.now + 50 * MS;
                            for _ in 0..n {
                                starts = (starts + 1) % n;
                                let id = starts + 1;
                                if self.is_up(id)
                                    && let Some((index, _)) = self.start(id, t.cmd.clone())
                                {
                                    t.state = State::Waiting { index, since: self.now };
                                    t.wake = self.now;
                                    break;
                                }
                            }
                        }
                        State::Waiting { index, since } => {
                            let (nd, c) = self.n_committed(index);
                            if nd > 0 && nd >= expected && c.as_ref() == Some(&t.cmd) {
                                t.done = Some(index);
                                continue;
                            }
                            if self.now - since >= 2 * SEC {
                                assert!(retry, "one({:?}) failed to reach agreement", t.cmd);
                                t.state = State::Starting;
                            } else {
                                t.wake = self.now + 20 * MS;
                            }
                        }
                    }
                }
                next_wake = Some(next_wake.map_or(t.wake, |w| w.min(t.wake)));
            }
            match next_wake {
                None => return tasks.into_iter().map(|t| t.done.expect("finished")).collect(),
                Some(w) => self.sleep(w.saturating_sub(self.now)),
            }
        }
    }

    /// Waits (with back-off) until `n` nodes applied `index`; `None` if some node moved past
    /// `start_term` meanwhile (the proposal may have been lost).
    pub fn wait(&mut self, index: Index, n: usize, start_term: Option<Term>) -> Option<Vec<u8>> {
        let mut to = 10 * MS;
        for _ in 0..30 {
            if self.n_committed(index).0 >= n {
                break;
            }
            self.sleep(to);
            if to < SEC {
                to *= 2;
            }
            if let Some(t) = start_term
                && self.ids().iter().any(|&id| self.status(id).is_some_and(|s| s.term > t))
            {
                return None;
            }
        }
        let (nd, c) = self.n_committed(index);
        assert!(nd >= n, "only {nd} decided for index {index}; wanted {n}");
        c
    }
}
