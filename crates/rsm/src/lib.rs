//! # sixfive-rsm: a replicated state machine on Raft
//!
//! [`Rsm`] is sans-IO like the core under it: it owns a [`RawNode`], the [`Storage`] the
//! node persists to, and the application's [`StateMachine`]. Commands go through the log
//! ([`Rsm::submit`]); read-only queries go through ReadIndex ([`Rsm::query`]) and never touch
//! the log. Each call to [`Rsm::process`] runs the Ready loop (apply what is committed, persist,
//! then hand out the messages to send; [`Rsm::process_sending`] hands out a leader's Appends
//! before its own write, and every answer as soon as it is known) and returns the submissions
//! that finished:
//!
//! - a command finishes when the entry at its index is applied: with its result if the entry
//!   is the one submitted here, with [`SubmitError::WrongLeader`] (not applied) if another
//!   leader's entry took that index;
//! - every pending command fails with [`SubmitError::Abandoned`] (outcome unknown) and every
//!   pending query with [`SubmitError::WrongLeader`] as soon as this node stops leading or its
//!   term changes, so callers never wait on a deposed leader;
//! - [`Rsm::shutdown`] fails everything still pending with [`SubmitError::Shutdown`].
//!
//! When the persisted Raft state reaches `max_raft_state` bytes, the state machine is
//! snapshotted at the applied index and the log compacted; a restarted node restores the
//! snapshot and replays the log after it. With [`Rsm::with_amortized_snapshots`] (what the
//! server processes use) the log may also grow to the size of the last snapshot first: a state
//! machine whose state outgrew `max_raft_state`, such as an MVCC history, would otherwise be
//! serialised whole every `max_raft_state` bytes of log, more bytes written for snapshots than
//! for the log. (The course's tests bound the Raft state by `max_raft_state` itself, so the
//! default keeps that bound.)
//!
//! With [`Rsm::with_background_snapshots`] (also the server processes' choice) a snapshot no
//! longer stalls the node: [`Rsm::take_snapshot_job`] hands out a [`SnapshotJob`] holding a copy
//! of the state ([`StateMachine::snapshot_later`]); the driver runs it on another thread
//! (serialise, write, sync: seconds for an MVCC history of hundreds of MB) while the node goes
//! on, and hands the outcome back to [`Rsm::finish_snapshot`], which puts the snapshot in effect
//! (the storage renames its file into place; the log is compacted) only then, once durable,
//! and drops it if a snapshot from the leader superseded it meanwhile. A crash at any point
//! loses nothing: until the install, the log still holds every entry the snapshot covers.
//!
//! Membership changes online: [`Rsm::change_membership`] (or [`RsmRequest::ChangeMembership`])
//! proposes one (learners join, learners are promoted, members leave; the core's rules are on
//! [`sixfive_raft::ConfState`]); it completes with the new configuration once its entry is
//! applied. [`Rsm::membership`] (or [`RsmRequest::Membership`]) reports the configuration in
//! effect. The configuration travels in the core's snapshots, so a restarted node or one
//! that catches up by snapshot knows it.
//!
//! [`RsmNode`] serves an `Rsm` as a [`sixfive_rpc::Node`]: peers exchange Raft messages,
//! clients send [`RsmRequest`]s and get [`RsmReply`]s.
#![deny(missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sixfive_raft::{
    CompactError, ConfChange, ConfChangeError, ConfState, Config, ConfigError, EntryKind, Index, Message, NodeId,
    ProposeError, RawNode, Ready, Role, Snapshot, SnapshotMeta, SnapshotWriter, Status, Storage, SyncJob, Term,
    persist_ready, write_ready,
};
use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node};

#[cfg(feature = "testkit")]
pub mod testkit;

/// Context of one applied command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyCtx {
    /// Log index of the command.
    pub index: Index,
    /// Time the leader stamped on the command; never decreases along the log as the state
    /// machine sees it (use it for deterministic expiry, e.g. of client sessions).
    pub time: Micros,
}

/// What the application replicates. Must be deterministic: the same commands in the same
/// order give the same results and state on every replica.
pub trait StateMachine {
    /// Applies a committed command; returns its result.
    fn apply(&mut self, cmd: &[u8], ctx: ApplyCtx) -> Vec<u8>;
    /// Answers a read-only query from the current state.
    fn query(&self, query: &[u8]) -> Vec<u8>;
    /// Serializes the whole state.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, snapshot: &[u8]);
    /// The current state, to be serialised later on another thread (background snapshots,
    /// [`Rsm::with_background_snapshots`]): the function must append to the buffer it is given
    /// what [`StateMachine::snapshot`] returns now, and return the buffer. Override it with a
    /// copy cheaper than serialising; the default serialises now.
    fn snapshot_later(&self) -> Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send> {
        let data = self.snapshot();
        Box::new(move |mut out| {
            out.extend_from_slice(&data);
            out
        })
    }
}

/// A snapshot to take away from the node's loop ([`Rsm::with_background_snapshots`]): run it
/// on another thread, then hand the outcome to [`Rsm::finish_snapshot`].
pub struct SnapshotJob<E> {
    meta: SnapshotMeta,
    conf: ConfState,
    state: Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>,
    writer: Option<SnapshotWriter<E>>,
}

impl<E> SnapshotJob<E> {
    /// The applied index the snapshot is taken at.
    pub fn index(&self) -> Index {
        self.meta.index
    }

    /// The slow part: serialises the state, builds the snapshot and, if the storage writes
    /// snapshots in the background ([`Storage::snapshot_writer`]), writes and syncs its file.
    pub fn run(self) -> TakenSnapshot<E> {
        // The state is serialised straight after the configuration: the snapshot's bytes are
        // built once, not copied (they may be hundreds of MB).
        let prefix = Snapshot::conf_prefix(&self.conf);
        let prefix_len = prefix.len();
        let data = (self.state)(prefix);
        let app_bytes = data.len() - prefix_len;
        let snapshot = Arc::new(Snapshot { meta: self.meta, data });
        let written = match self.writer {
            Some(write) => write(&snapshot),
            None => Ok(()),
        };
        TakenSnapshot { snapshot, app_bytes, written }
    }
}

/// What a [`SnapshotJob`] produced, for [`Rsm::finish_snapshot`].
pub struct TakenSnapshot<E> {
    snapshot: Arc<Snapshot>,
    app_bytes: usize,
    written: Result<(), E>,
}

/// Pipelined persistence ([`Rsm::with_pipelined_persistence`]): what is written and waits
/// for a sync running elsewhere.
struct Pipeline<E> {
    /// `Ready`s written, oldest first, each with the number of the sync that makes it durable
    /// (0: none of its own; it waits only for those before it).
    in_flight: VecDeque<(Ready, u64)>,
    /// Syncs started so far (on this thread or elsewhere).
    started: u64,
    /// The number of the sync running elsewhere, if one is.
    running: Option<u64>,
    /// The job of the sync just started, for the driver to take.
    job: Option<SyncJob<E>>,
    /// Written since the last sync started.
    unsynced: bool,
    /// A `Ready` carrying a snapshot from the leader, taken while a sync ran: it is persisted
    /// (and synced, with everything before it) once that sync is done; no `Ready` is taken
    /// meanwhile.
    parked: Option<Ready>,
}

/// Why a submission did not complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SubmitError {
    /// Refused: this node does not lead, or the command's log slot went to another leader's
    /// entry. The command was not applied. Retry at `leader` if known.
    #[error("not the leader (leader: {leader:?}); the command was not applied, retry there")]
    WrongLeader {
        /// Who this node believes leads.
        leader: Option<NodeId>,
    },
    /// This node stopped leading after proposing the command and before seeing it applied: it
    /// may or may not be applied by the new leader. Retry there (with a session, so the
    /// command takes effect at most once).
    #[error("leadership lost after proposing; the command may or may not be applied (leader: {leader:?})")]
    Abandoned {
        /// Who this node believes leads.
        leader: Option<NodeId>,
    },
    /// The server is shutting down.
    #[error("server shutting down")]
    Shutdown,
    /// Refused for now by back-pressure: the leader holds as many uncommitted proposal bytes
    /// or unanswered reads as it allows (`Config::max_uncommitted_bytes`,
    /// `Config::max_pending_reads`). Not applied; retry the same node after a pause.
    #[error("the leader is busy (too much uncommitted or pending); not applied, retry shortly")]
    Busy,
    /// A membership change was refused (see [`sixfive_raft::ConfChangeError`]); nothing
    /// changed. `retryable`: the same change may succeed later (e.g. once a learner caught up).
    #[error("membership change refused: {reason}")]
    MembershipRefused {
        /// Why.
        reason: String,
        /// Whether retrying the same change may succeed.
        retryable: bool,
    },
}

impl From<ConfChangeError> for SubmitError {
    fn from(e: ConfChangeError) -> SubmitError {
        match e {
            ConfChangeError::NotLeader { leader } => SubmitError::WrongLeader { leader },
            e => SubmitError::MembershipRefused { retryable: e.is_retryable(), reason: e.to_string() },
        }
    }
}

/// The cluster's membership as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The configuration in effect on this node (the latest in its log).
    pub conf: ConfState,
    /// The index of the entry that carries it (that of the snapshot, or 0 for the bootstrap
    /// configuration, when the log holds none).
    pub conf_index: Index,
    /// Whether it is committed (a change under way is not, or is still joint).
    pub settled: bool,
    /// Who this node believes leads.
    pub leader: Option<NodeId>,
    /// This node was removed from the cluster.
    pub removed: bool,
}

/// Identifies one submission on one node.
pub type SubmitId = u64;

/// Frees `garbage` on a thread of its own: the entries a snapshot covers are up to hundreds of
/// MB in a hundred thousand allocations, and freeing them on the node's loop stalled it for
/// tens of milliseconds. (If no thread can be started, it is freed here.)
fn free_elsewhere<T: Send + 'static>(garbage: T) {
    let _ = std::thread::Builder::new().name("sixfive-free".into()).spawn(move || drop(garbage));
}

/// What [`Rsm::process_sending`] hands out, each as soon as it may go.
#[derive(Debug)]
pub enum Output {
    /// A message for a peer.
    Message(Message),
    /// A submission that finished.
    Done(Completion),
}

/// A finished submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Which one.
    pub id: SubmitId,
    /// Its result.
    pub result: Result<Vec<u8>, SubmitError>,
}

/// What a log entry carries: the command plus who proposed it, so the proposer can tell its
/// own entry from another leader's at the same index.
/// Decoding borrows the command from the entry (no copy before it is applied).
#[derive(Serialize, Deserialize)]
struct LogCommand<'a> {
    origin: NodeId,
    id: SubmitId,
    time: Micros,
    #[serde(borrow, serialize_with = "sixfive_raft::bytes::serialize")]
    cmd: &'a [u8],
}

/// The replicated state machine of one node.
pub struct Rsm<S: Storage, M> {
    raw: RawNode,
    storage: S,
    sm: M,
    id: NodeId,
    max_raft_state: Option<usize>,
    /// Bytes of the latest snapshot's state machine data (taken or restored).
    last_snapshot_bytes: usize,
    /// Let the log grow to the last snapshot's size before the next one.
    amortize_snapshots: bool,
    /// Snapshots are taken by [`SnapshotJob`]s off the loop, not in `process`.
    background_snapshots: bool,
    /// The index of the [`SnapshotJob`] handed out and not finished yet.
    snapshot_in_flight: Option<Index>,
    next_id: SubmitId,
    /// Largest command time applied (the state machine's clock never goes back).
    clock: Micros,
    /// Commands proposed here: index -> (term, id).
    pending: BTreeMap<Index, (Term, SubmitId)>,
    /// Queries waiting for their ReadIndex round: id -> (term, query).
    reads_waiting: BTreeMap<SubmitId, (Term, Vec<u8>)>,
    /// Queries whose read index is known: (index, id, query), served once applied.
    reads_ready: Vec<(Index, SubmitId, Vec<u8>)>,
    /// Queries that share one ReadIndex round ([`Rsm::query_batch`]): the id the round was
    /// asked under -> the other ids of the batch (each also in `reads_waiting`).
    read_batches: BTreeMap<SubmitId, Vec<SubmitId>>,
    /// Snapshots received from a leader and installed.
    snapshots_installed: u64,
    /// The highest index the state machine has applied (or restored from a snapshot).
    applied: Index,
    /// With pipelined persistence: the `Ready`s in flight.
    pipeline: Option<Pipeline<S::Error>>,
}

impl<S: Storage, M: StateMachine> Rsm<S, M> {
    /// A node over `storage` (empty for a new node; otherwise it restarts from it, restoring
    /// the snapshot into `sm` and replaying the log). `max_raft_state`: snapshot when the
    /// persisted Raft state reaches that many bytes; `None`: never.
    pub fn new(cfg: Config, storage: S, mut sm: M, max_raft_state: Option<usize>) -> Result<Self, ConfigError> {
        let state = storage.initial_state().map_err(|e| ConfigError(format!("cannot read storage: {e:?}")))?;
        let last_snapshot_bytes = state.snapshot.as_ref().map_or(0, |s| s.app_data().len());
        if let Some(s) = &state.snapshot {
            sm.restore(s.app_data());
        }
        let id = cfg.id;
        let applied = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
        let raw = RawNode::restart(cfg, state)?;
        Ok(Rsm {
            raw,
            storage,
            sm,
            id,
            max_raft_state,
            last_snapshot_bytes,
            amortize_snapshots: false,
            background_snapshots: false,
            snapshot_in_flight: None,
            next_id: 1,
            clock: 0,
            pending: BTreeMap::new(),
            reads_waiting: BTreeMap::new(),
            reads_ready: Vec::new(),
            read_batches: BTreeMap::new(),
            snapshots_installed: 0,
            applied,
            pipeline: None,
        })
    }

    /// One Raft tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from a peer (invalid ones are refused and change nothing).
    pub fn step(&mut self, m: Message) -> Result<(), sixfive_raft::StepError> {
        self.raw.step(m)
    }

    fn not_leader(&self) -> SubmitError {
        SubmitError::WrongLeader { leader: self.raw.status().leader }
    }

    /// Snapshots only once the log is also as large as the last snapshot (see the crate's
    /// documentation): at most one byte serialised per byte logged, whatever the state's size.
    pub fn with_amortized_snapshots(mut self) -> Self {
        self.amortize_snapshots = true;
        self
    }

    /// Snapshots are taken off the node's loop (see the crate's documentation): `process` no
    /// longer takes them; the driver asks [`Rsm::take_snapshot_job`] after processing, runs the
    /// job on another thread and hands its outcome to [`Rsm::finish_snapshot`].
    pub fn with_background_snapshots(mut self) -> Self {
        self.background_snapshots = true;
        self
    }

    /// Pipelined persistence: the node writes each `Ready` at once but syncs it on another
    /// thread, and meanwhile goes on: it steps the followers' answers, applies and answers
    /// what they commit, and writes the next `Ready`s behind it (see [`sixfive_raft::Ready`]
    /// for the rules it keeps). After each processing the driver takes the sync to run with
    /// [`Rsm::take_sync_job`] and hands its outcome to [`Rsm::finish_sync`]. A storage that
    /// cannot sync from another thread ([`Storage::start_sync`] gives `None`) is synced in
    /// `process` as before.
    pub fn with_pipelined_persistence(mut self) -> Self {
        self.pipeline = Some(Pipeline {
            in_flight: VecDeque::new(),
            started: 0,
            running: None,
            job: None,
            unsynced: false,
            parked: None,
        });
        self
    }

    /// Proposes a command stamped with `now`. It completes in a later [`Rsm::process`].
    pub fn submit(&mut self, cmd: Vec<u8>, now: Micros) -> Result<SubmitId, SubmitError> {
        let id = self.next_id;
        let entry = postcard::to_allocvec(&LogCommand { origin: self.id, id, time: now, cmd: &cmd }).expect("encodes");
        match self.raw.propose(entry) {
            Ok((index, term)) => {
                self.next_id += 1;
                self.pending.insert(index, (term, id));
                Ok(id)
            }
            Err(e) => Err(Self::refused(e)),
        }
    }

    /// Proposes a membership change (leader only). It completes once its entry is applied,
    /// with the new configuration (a postcard-encoded [`ConfState`]; a change of voters is
    /// then in its joint phase, which the leader leaves on its own: see [`Rsm::membership`]).
    /// A node joins as a learner first ([`ConfChange::AddLearner`]), started with an empty
    /// `Config::voters`; it is promoted once caught up ([`ConfChange::Promote`]).
    pub fn change_membership(&mut self, changes: &[ConfChange]) -> Result<SubmitId, SubmitError> {
        let id = self.next_id;
        let (index, term) = self.raw.propose_conf_change(changes)?;
        self.next_id += 1;
        self.pending.insert(index, (term, id));
        Ok(id)
    }

    /// [`Rsm::change_membership`] that also replaces the configuration's context (see
    /// [`ConfState::context`]: the servers keep their member directory there), only if the
    /// configuration in effect is still the one at `conf_index` ([`Membership::conf_index`]):
    /// the caller computed the new context from that one, and must not overwrite a context
    /// another change wrote since. Refused (retryable) otherwise.
    pub fn change_membership_with(
        &mut self,
        changes: &[ConfChange],
        context: Vec<u8>,
        conf_index: Index,
    ) -> Result<SubmitId, SubmitError> {
        let now = self.raw.status().conf_index;
        if now != conf_index {
            return Err(SubmitError::MembershipRefused {
                retryable: true,
                reason: format!(
                    "the configuration changed (now the one at index {now}, not {conf_index}); read it again"
                ),
            });
        }
        let id = self.next_id;
        let (index, term) = self.raw.propose_conf_change_with_context(changes, context)?;
        self.next_id += 1;
        self.pending.insert(index, (term, id));
        Ok(id)
    }

    /// The membership as this node sees it.
    pub fn membership(&self) -> Membership {
        let st = self.raw.status();
        Membership {
            conf_index: st.conf_index,
            settled: !st.conf.is_joint() && st.commit >= st.conf_index,
            conf: st.conf,
            leader: st.leader,
            removed: st.removed,
        }
    }

    /// Why the core refused a proposal or a read, as the client sees it (nothing was applied).
    fn refused(e: ProposeError) -> SubmitError {
        match e {
            ProposeError::NotLeader { leader } => SubmitError::WrongLeader { leader },
            ProposeError::TransferInProgress | ProposeError::UnknownNode(_) => {
                SubmitError::WrongLeader { leader: None }
            }
            ProposeError::UncommittedLimit { .. } | ProposeError::PendingReadsLimit { .. } => SubmitError::Busy,
        }
    }

    /// Asks a read-only query; answered once leadership is confirmed (ReadIndex) and the
    /// state machine has applied the read index. Never appends to the log.
    pub fn query(&mut self, query: Vec<u8>) -> Result<SubmitId, SubmitError> {
        let id = self.next_id;
        match self.raw.read_index(id.to_le_bytes().to_vec()) {
            Ok(()) => {
                self.next_id += 1;
                self.reads_waiting.insert(id, (self.raw.status().term, query));
                Ok(id)
            }
            Err(e @ ProposeError::PendingReadsLimit { .. }) => Err(Self::refused(e)),
            Err(_) => Err(self.not_leader()),
        }
    }

    /// Asks several read-only queries with one ReadIndex round: each is linearizable, since the
    /// round starts after all of them arrived. Returns their ids, in order.
    pub fn query_batch(&mut self, queries: Vec<Vec<u8>>) -> Result<Vec<SubmitId>, SubmitError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.next_id;
        if self.raw.read_index(first.to_le_bytes().to_vec()).is_err() {
            return Err(self.not_leader());
        }
        let term = self.raw.status().term;
        let ids: Vec<SubmitId> = (first..first + queries.len() as u64).collect();
        self.next_id += queries.len() as u64;
        for (id, q) in ids.iter().zip(queries) {
            self.reads_waiting.insert(*id, (term, q));
        }
        self.read_batches.insert(first, ids[1..].to_vec());
        Ok(ids)
    }

    /// Applies committed entries in order, handing out the submissions they finish.
    fn apply_committed(&mut self, entries: &[sixfive_raft::Entry], out: &mut dyn FnMut(Output)) {
        if let Some(e) = entries.last() {
            self.applied = e.index;
        }
        for e in entries {
            let mine = self.pending.remove(&e.index);
            if e.kind == EntryKind::Noop {
                if let Some((_, id)) = mine {
                    out(Output::Done(Completion { id, result: Err(SubmitError::WrongLeader { leader: None }) }));
                }
                continue;
            }
            if e.kind == EntryKind::ConfChange {
                // In effect in the core since it was appended; now committed and applied.
                if let Some((term, id)) = mine {
                    let result = if term == e.term {
                        Ok(e.data.to_vec())
                    } else {
                        Err(SubmitError::WrongLeader { leader: None })
                    };
                    out(Output::Done(Completion { id, result }));
                }
                continue;
            }
            let c: LogCommand = postcard::from_bytes(&e.data).expect("log entries are our own encoding");
            self.clock = self.clock.max(c.time);
            let result = self.sm.apply(c.cmd, ApplyCtx { index: e.index, time: self.clock });
            if let Some((_, id)) = mine {
                let ok = c.origin == self.id && c.id == id;
                let result = if ok { Ok(result) } else { Err(SubmitError::WrongLeader { leader: None }) };
                out(Output::Done(Completion { id, result }));
            }
        }
    }

    /// Runs the Ready loop. Returns the messages to send (everything they depend on is
    /// already persisted) and the submissions that finished. [`Rsm::process_sending`] hands
    /// them out as they become ready instead: a leader's Appends before its own write.
    pub fn process(&mut self) -> Result<(Vec<Message>, Vec<Completion>), S::Error> {
        let mut msgs = Vec::new();
        let mut done = Vec::new();
        self.process_sending(&mut |o| match o {
            Output::Message(m) => msgs.push(m),
            Output::Done(c) => done.push(c),
        })?;
        Ok((msgs, done))
    }

    /// Runs the Ready loop, handing out each message and each finished submission as soon as
    /// it may go:
    /// - a leader's replication messages before the write and sync of the entries they carry
    ///   (so followers write theirs meanwhile: thesis section 10.2.1), every other message
    ///   after them;
    /// - committed entries are applied, and their submissions answered, before this node's
    ///   own write of the `Ready`'s new entries, as etcd's server does: committed means held
    ///   durably by a majority already, so the answer need not wait for this node's next
    ///   sync (which would add a whole sync to every write's latency). A `Ready` carrying a
    ///   snapshot applies after the persist, as the core's order has it.
    ///
    /// On a storage error, messages already handed out acknowledge nothing (see
    /// [`sixfive_raft::Ready`]); answers already handed out were for committed entries.
    pub fn process_sending(&mut self, out: &mut dyn FnMut(Output)) -> Result<(), S::Error> {
        if self.pipeline.is_some() {
            self.process_pipelined(out)?;
        } else {
            while self.raw.has_ready() {
                let mut rd = self.raw.ready();
                for m in std::mem::take(&mut rd.messages) {
                    out(Output::Message(m));
                }
                if rd.snapshot.is_none() {
                    self.apply_committed(&rd.committed_entries, out);
                    self.take_read_states(&rd);
                    persist_ready(&mut self.storage, &rd)?;
                    self.finish_written(rd, out);
                } else {
                    persist_ready(&mut self.storage, &rd)?;
                    self.finish_with_snapshot(rd, out);
                }
            }
        }
        self.answer_reads(out);
        if !self.background_snapshots {
            self.maybe_snapshot()?;
        }
        Ok(())
    }

    /// The pipelined Ready loop (see [`Rsm::with_pipelined_persistence`]): each `Ready` is
    /// written at once; a sync is started once none runs; a `Ready` is finished once it and
    /// those before it are durable.
    fn process_pipelined(&mut self, out: &mut dyn FnMut(Output)) -> Result<(), S::Error> {
        loop {
            while self.pipeline().parked.is_none() && self.raw.has_ready() {
                let mut rd = self.raw.ready();
                for m in std::mem::take(&mut rd.messages) {
                    out(Output::Message(m));
                }
                if rd.snapshot.is_some() {
                    if self.pipeline().running.is_some() {
                        self.pipeline().parked = Some(rd);
                        break;
                    }
                    self.persist_snapshot_ready(rd, out)?;
                    continue;
                }
                self.apply_committed(&rd.committed_entries, out);
                self.take_read_states(&rd);
                write_ready(&mut self.storage, &rd)?;
                let p = self.pipeline();
                let sync = if rd.must_sync() {
                    p.unsynced = true;
                    p.started + 1
                } else {
                    0
                };
                if sync == 0 && p.in_flight.is_empty() {
                    self.finish_written(rd, out);
                } else {
                    p.in_flight.push_back((rd, sync));
                }
            }
            let p = self.pipeline();
            // One sync at a time, even for a node that stopped leading while its sync runs:
            // two `fdatasync`s of one file at once could see a write-back error reported to
            // the other one only (Linux reports it once per open file), and this one would
            // then vouch for data the failure lost. It waits for that sync instead.
            if !p.unsynced || p.running.is_some() {
                return Ok(());
            }
            p.unsynced = false;
            p.started += 1;
            let number = p.started;
            // Only a leader syncs elsewhere: its own copy is one of three, and its loop has the
            // followers' answers to handle meanwhile. A follower's answer waits for its sync
            // anyway, and the trip to a sync thread and back would only lengthen it.
            let leading = self.raw.status().role == Role::Leader;
            let job = if leading { self.storage.start_sync()? } else { None };
            match job {
                Some(job) => {
                    let p = self.pipeline();
                    p.running = Some(number);
                    p.job = Some(job);
                    return Ok(());
                }
                None => {
                    // A follower, or a storage that syncs on this thread only.
                    self.storage.sync()?;
                    self.finish_synced(number, out);
                }
            }
        }
    }

    fn pipeline(&mut self) -> &mut Pipeline<S::Error> {
        self.pipeline.as_mut().expect("pipelined persistence")
    }

    /// Pipelined persistence: the sync to run now on another thread, if one was started.
    pub fn take_sync_job(&mut self) -> Option<SyncJob<S::Error>> {
        self.pipeline.as_mut()?.job.take()
    }

    /// Pipelined persistence: the outcome of the job from [`Rsm::take_sync_job`]. The `Ready`s
    /// it made durable are finished (their messages handed out), then a snapshot from the
    /// leader that waited for it, then the Ready loop runs again. An error is the storage's:
    /// the node must stop.
    pub fn finish_sync(&mut self, result: Result<(), S::Error>, out: &mut dyn FnMut(Output)) -> Result<(), S::Error> {
        let p = self.pipeline();
        let synced = p.running.take().expect("finish_sync without a sync job running");
        assert!(p.job.is_none(), "finish_sync before the job was taken");
        self.storage.finish_sync(result)?;
        self.finish_synced(synced, out);
        if let Some(rd) = self.pipeline().parked.take() {
            self.persist_snapshot_ready(rd, out)?;
        }
        self.process_sending(out)
    }

    /// Finishes, in order, the `Ready`s in flight that sync `synced` made durable.
    fn finish_synced(&mut self, synced: u64, out: &mut dyn FnMut(Output)) {
        while let Some((_, sync)) = self.pipeline().in_flight.front() {
            if *sync > synced {
                break;
            }
            let (rd, _) = self.pipeline().in_flight.pop_front().expect("looked at");
            self.finish_written(rd, out);
        }
    }

    /// A `Ready` with a snapshot, with no sync running: written and synced here (which makes
    /// every `Ready` in flight durable too), then finished after them.
    fn persist_snapshot_ready(&mut self, rd: Ready, out: &mut dyn FnMut(Output)) -> Result<(), S::Error> {
        persist_ready(&mut self.storage, &rd)?;
        let p = self.pipeline();
        p.unsynced = false;
        self.finish_synced(u64::MAX, out);
        self.finish_with_snapshot(rd, out);
        Ok(())
    }

    /// A durable `Ready` (its committed entries already applied): what acknowledges it goes out.
    fn finish_written(&mut self, mut rd: Ready, out: &mut dyn FnMut(Output)) {
        for m in std::mem::take(&mut rd.persisted_messages) {
            out(Output::Message(m));
        }
        self.raw.advance(&rd);
    }

    /// A durable `Ready` carrying a snapshot: restore it, then apply what follows it.
    fn finish_with_snapshot(&mut self, mut rd: Ready, out: &mut dyn FnMut(Output)) {
        for m in std::mem::take(&mut rd.persisted_messages) {
            out(Output::Message(m));
        }
        let s = rd.snapshot.as_ref().expect("a snapshot");
        self.sm.restore(s.app_data());
        self.applied = s.meta.index;
        self.last_snapshot_bytes = s.app_data().len();
        self.snapshots_installed += 1;
        // Commands at or below the snapshot were applied or overwritten by others and cannot
        // be told apart any more: outcome unknown (clients retry, sessions dedup).
        let later = self.pending.split_off(&(s.meta.index + 1));
        for (_, (_, id)) in std::mem::replace(&mut self.pending, later) {
            out(Output::Done(Completion { id, result: Err(SubmitError::Abandoned { leader: None }) }));
        }
        self.apply_committed(&rd.committed_entries, out);
        self.take_read_states(&rd);
        self.raw.advance(&rd);
    }

    /// Reads whose ReadIndex round finished wait for the state machine to reach their index.
    fn take_read_states(&mut self, rd: &Ready) {
        for rs in &rd.read_states {
            let id = u64::from_le_bytes(rs.ctx.as_slice().try_into().expect("our ctx"));
            if let Some((_, q)) = self.reads_waiting.remove(&id) {
                self.reads_ready.push((rs.index, id, q));
            }
            for other in self.read_batches.remove(&id).unwrap_or_default() {
                if let Some((_, q)) = self.reads_waiting.remove(&other) {
                    self.reads_ready.push((rs.index, other, q));
                }
            }
        }
    }

    /// Answers the reads the state machine has caught up with, and fails what a lost
    /// leadership abandoned.
    fn answer_reads(&mut self, out: &mut dyn FnMut(Output)) {
        let mut done = Vec::new();
        let applied = self.applied;
        let (ready, later): (Vec<_>, Vec<_>) = self.reads_ready.drain(..).partition(|(i, _, _)| *i <= applied);
        self.reads_ready = later;
        for (_, id, q) in ready {
            done.push(Completion { id, result: Ok(self.sm.query(&q)) });
        }
        self.fail_if_deposed(&mut done);
        for c in done {
            out(Output::Done(c));
        }
    }

    /// Everything pending fails once this node stops leading or its term moves on.
    fn fail_if_deposed(&mut self, done: &mut Vec<Completion>) {
        let st = self.raw.status();
        let leading = st.role == Role::Leader;
        let leader = st.leader.filter(|&l| l != self.id);
        let err = SubmitError::WrongLeader { leader };
        let stale_cmds: Vec<Index> =
            self.pending.iter().filter(|(_, (t, _))| !leading || *t != st.term).map(|(i, _)| *i).collect();
        for i in stale_cmds {
            let (_, id) = self.pending.remove(&i).expect("listed");
            done.push(Completion { id, result: Err(SubmitError::Abandoned { leader }) });
        }
        let stale_reads: Vec<SubmitId> =
            self.reads_waiting.iter().filter(|(_, (t, _))| !leading || *t != st.term).map(|(id, _)| *id).collect();
        for id in stale_reads {
            self.reads_waiting.remove(&id);
            self.read_batches.remove(&id);
            done.push(Completion { id, result: Err(err.clone()) });
        }
        if !leading {
            for (_, id, _) in self.reads_ready.drain(..) {
                done.push(Completion { id, result: Err(err.clone()) });
            }
        }
    }

    /// Whether the Raft state has grown enough for a snapshot.
    fn snapshot_due(&self) -> bool {
        let Some(max) = self.max_raft_state else { return false };
        let threshold = if self.amortize_snapshots { max.max(self.last_snapshot_bytes) } else { max };
        self.storage.raft_state_bytes() >= threshold
    }

    fn maybe_snapshot(&mut self) -> Result<(), S::Error> {
        if !self.snapshot_due() {
            return Ok(());
        }
        let applied = self.applied;
        let data = self.sm.snapshot();
        self.last_snapshot_bytes = data.len();
        if let Ok(snap) = self.raw.compact(applied, data) {
            self.storage.save_snapshot(&snap)?;
            self.storage.sync()?;
        }
        Ok(())
    }

    /// Background snapshots: the snapshot due now at the applied index, if one is and none is
    /// under way. Cheap: the state is copied ([`StateMachine::snapshot_later`]), not serialised.
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob<S::Error>> {
        if !self.background_snapshots || self.snapshot_in_flight.is_some() || !self.snapshot_due() {
            return None;
        }
        // (Refused while a snapshot from the leader waits for a sync: the log is compacted
        // past what the state machine applied.)
        let (meta, conf) = self.raw.snapshot_position(self.applied).ok()?;
        self.snapshot_in_flight = Some(meta.index);
        Some(SnapshotJob { meta, conf, state: self.sm.snapshot_later(), writer: self.storage.snapshot_writer() })
    }

    /// Background snapshots: puts a finished job's snapshot in effect (the storage installs it
    /// durably, then the log is compacted); `Ok(false)` if a snapshot from the leader
    /// superseded it meanwhile (it is dropped). An error is the storage's (writing the file or
    /// installing it): the node must stop, as after any storage error.
    ///
    /// With pipelined persistence it may be installed while a sync runs elsewhere: the
    /// install syncs everything written before it, and the `Ready`s in flight still finish
    /// when that sync does.
    pub fn finish_snapshot(&mut self, taken: TakenSnapshot<S::Error>) -> Result<bool, S::Error> {
        let TakenSnapshot { snapshot, app_bytes, written } = taken;
        debug_assert_eq!(self.snapshot_in_flight, Some(snapshot.meta.index), "the job handed out");
        self.snapshot_in_flight = None;
        written?;
        match self.raw.snapshot_position(snapshot.meta.index) {
            Err(CompactError::AlreadyCompacted) => return Ok(false),
            Err(e) => unreachable!("a snapshot at an applied index: {e}"),
            Ok((meta, conf)) => {
                assert!(meta == snapshot.meta && snapshot.conf_state() == Some(conf), "the log changed below applied");
            }
        }
        self.storage.install_written_snapshot(snapshot.clone())?;
        let dropped = self.raw.compact_to(snapshot).expect("checked above");
        free_elsewhere(dropped);
        self.last_snapshot_bytes = app_bytes;
        Ok(true)
    }

    /// Whether a [`SnapshotJob`] was handed out and is not finished.
    pub fn snapshot_in_flight(&self) -> bool {
        self.snapshot_in_flight.is_some()
    }

    /// Fails every pending submission: the server is going away.
    pub fn shutdown(&mut self) -> Vec<Completion> {
        let mut done: Vec<Completion> = std::mem::take(&mut self.pending)
            .into_values()
            .map(|(_, id)| Completion { id, result: Err(SubmitError::Shutdown) })
            .collect();
        done.extend(
            std::mem::take(&mut self.reads_waiting)
                .into_keys()
                .map(|id| Completion { id, result: Err(SubmitError::Shutdown) }),
        );
        self.read_batches.clear();
        done.extend(self.reads_ready.drain(..).map(|(_, id, _)| Completion { id, result: Err(SubmitError::Shutdown) }));
        done
    }

    /// Snapshots received from a leader and installed since this node started.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }

    /// Raft status.
    pub fn status(&self) -> Status {
        // The state machine's own applied index: the core counts entries applied once handed
        // out, and a snapshot from the leader may wait for a sync before it is restored.
        Status { applied: self.applied, ..self.raw.status() }
    }

    /// The state machine.
    pub fn state_machine(&self) -> &M {
        &self.sm
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The Raft node (for tools and tests).
    pub fn raw(&mut self) -> &mut RawNode {
        &mut self.raw
    }

    /// The Raft node, to look at (e.g. the leader's progress of each member).
    pub fn raw_node(&self) -> &RawNode {
        &self.raw
    }
}

/// A client's request to an [`RsmNode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RsmRequest {
    /// Replicate and apply this command.
    Command(#[serde(with = "sixfive_raft::bytes")] Vec<u8>),
    /// Answer this read-only query linearizably (ReadIndex).
    Query(#[serde(with = "sixfive_raft::bytes")] Vec<u8>),
    /// Change the membership (see [`Rsm::change_membership`]); answered once applied.
    ChangeMembership(Vec<ConfChange>),
    /// Change the membership and the configuration's context, if the configuration is still
    /// the one at `conf_index` (see [`Rsm::change_membership_with`]); answered once applied.
    ChangeMembershipWith {
        /// The steps.
        changes: Vec<ConfChange>,
        /// The new context.
        #[serde(with = "sixfive_raft::bytes")]
        context: Vec<u8>,
        /// The configuration the context was computed from.
        conf_index: Index,
    },
    /// Report the membership as the receiving node sees it, at once: a postcard-encoded
    /// [`Membership`] (not linearizable; ask the leader for the latest).
    Membership,
}

/// An [`RsmNode`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RsmReply {
    /// The command's or query's result.
    Done(#[serde(with = "sixfive_raft::bytes")] Vec<u8>),
    /// Refused or abandoned; see the error.
    Failed(SubmitError),
    /// The request could not be decoded.
    Malformed(String),
}

/// How often Raft ticks.
pub const TICK_MICROS: Micros = 10_000;
const TICK_TIMER: u64 = 1;

/// An [`Rsm`] served over RPC: peers' Raft messages arrive as one-way messages (Raft node id =
/// endpoint), clients send [`RsmRequest`]s.
///
/// A storage error stops the node for good (its Raft state may be half-written and the
/// storage refuses further writes): every waiting client is answered with
/// [`SubmitError::Shutdown`], later requests too, nothing else runs, and [`RsmNode::failed`]
/// says why. The process around it should exit; a restart re-reads the disk.
pub struct RsmNode<S: Storage, M> {
    rsm: Rsm<S, M>,
    waiting: BTreeMap<SubmitId, (Endpoint, CallId)>,
    failed: Option<String>,
    /// Group commit: requests and messages only queue work; the driver calls
    /// [`RsmNode::flush`] once per batch of events, so one Ready (one sync) covers them all.
    deferred: bool,
    /// Group commit: queries of the current batch, asked together at the next flush.
    queued_reads: Vec<(Endpoint, CallId, Vec<u8>)>,
}

impl<S: Storage, M: StateMachine> RsmNode<S, M> {
    /// A node serving `rsm`.
    pub fn new(rsm: Rsm<S, M>) -> RsmNode<S, M> {
        RsmNode { rsm, waiting: BTreeMap::new(), failed: None, deferred: false, queued_reads: Vec::new() }
    }

    /// Why the node stopped, if its storage failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Group commit: requests and peer messages no longer run the Ready loop themselves; the
    /// driver must call [`RsmNode::flush`] after each batch of events (timers still flush).
    /// Every proposal of a batch then goes into one Ready, written and synced once.
    pub fn with_group_commit(mut self) -> RsmNode<S, M> {
        self.deferred = true;
        self
    }

    /// The replicated state machine.
    pub fn rsm(&self) -> &Rsm<S, M> {
        &self.rsm
    }

    /// The replicated state machine, mutably (tests submit directly, as the course's do).
    pub fn rsm_mut(&mut self) -> &mut Rsm<S, M> {
        &mut self.rsm
    }

    /// Runs the Ready loop and carries out its results: sends messages, answers clients.
    /// Returns the completions of submissions made directly (not through a request).
    pub fn flush(&mut self, ctx: &mut dyn Ctx) -> Vec<Completion> {
        if self.failed.is_some() {
            return Vec::new();
        }
        if !self.queued_reads.is_empty() {
            let (who, queries): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.queued_reads).into_iter().map(|(to, call, q)| ((to, call), q)).unzip();
            match self.rsm.query_batch(queries) {
                Ok(ids) => self.waiting.extend(ids.into_iter().zip(who)),
                Err(e) => {
                    let reply = postcard::to_allocvec(&RsmReply::Failed(e)).expect("encodes");
                    for (to, call) in who {
                        ctx.reply(to, call, reply.clone());
                    }
                }
            }
        }
        // A leader's Appends leave before its own write and sync, the rest after them; answers
        // to committed commands before it too.
        self.carry_out(ctx, |rsm, out| rsm.process_sending(out))
    }

    /// Runs `f` on the state machine, sending and answering what it hands out as it goes; a
    /// storage error stops the node (everything waiting fails). Returns the completions of
    /// submissions made directly.
    fn carry_out(
        &mut self,
        ctx: &mut dyn Ctx,
        f: impl FnOnce(&mut Rsm<S, M>, &mut dyn FnMut(Output)) -> Result<(), S::Error>,
    ) -> Vec<Completion> {
        let waiting = &mut self.waiting;
        let mut direct = Vec::new();
        let processed = f(&mut self.rsm, &mut |o| match o {
            Output::Message(m) => {
                ctx.send(m.to, postcard::to_extend(&m, Vec::with_capacity(m.size_hint())).expect("encodes"))
            }
            Output::Done(c) => answer_one(ctx, waiting, c, &mut direct),
        });
        if let Err(e) = processed {
            self.failed = Some(format!("storage failed: {e:?}"));
            let done = self.rsm.shutdown();
            direct.extend(self.answer(ctx, done));
        }
        direct
    }

    /// Pipelined persistence: the sync to run now on another thread, if any (see
    /// [`Rsm::take_sync_job`]).
    pub fn take_sync_job(&mut self) -> Option<SyncJob<S::Error>> {
        if self.failed.is_some() {
            return None;
        }
        self.rsm.take_sync_job()
    }

    /// Pipelined persistence: a sync job's outcome (see [`Rsm::finish_sync`]): what it made
    /// durable is sent and answered. A storage error stops the node, as in [`RsmNode::flush`].
    /// Returns the completions of submissions made directly.
    pub fn finish_sync(&mut self, ctx: &mut dyn Ctx, result: Result<(), S::Error>) -> Vec<Completion> {
        if self.failed.is_some() {
            return Vec::new();
        }
        self.carry_out(ctx, |rsm, out| rsm.finish_sync(result, out))
    }

    /// Background snapshots: the snapshot job due now, if any (see [`Rsm::take_snapshot_job`]).
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob<S::Error>> {
        if self.failed.is_some() {
            return None;
        }
        self.rsm.take_snapshot_job()
    }

    /// Background snapshots: a job's outcome (see [`Rsm::finish_snapshot`]). A storage error
    /// stops the node, as in [`RsmNode::flush`].
    pub fn finish_snapshot(&mut self, ctx: &mut dyn Ctx, taken: TakenSnapshot<S::Error>) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.rsm.finish_snapshot(taken) {
            self.failed = Some(format!("storage failed: {e:?}"));
            let done = self.rsm.shutdown();
            self.answer(ctx, done);
        }
    }

    fn answer(&mut self, ctx: &mut dyn Ctx, done: Vec<Completion>) -> Vec<Completion> {
        let mut direct = Vec::new();
        for c in done {
            answer_one(ctx, &mut self.waiting, c, &mut direct);
        }
        direct
    }
}

/// Answers the client waiting for `c`, or keeps `c` in `direct` if it was submitted directly.
fn answer_one(
    ctx: &mut dyn Ctx,
    waiting: &mut BTreeMap<SubmitId, (Endpoint, CallId)>,
    c: Completion,
    direct: &mut Vec<Completion>,
) {
    match waiting.remove(&c.id) {
        Some((to, call)) => {
            let reply = match c.result {
                Ok(r) => RsmReply::Done(r),
                Err(e) => RsmReply::Failed(e),
            };
            ctx.reply(to, call, postcard::to_allocvec(&reply).expect("encodes"));
        }
        None => direct.push(c),
    }
}

impl<S: Storage, M: StateMachine> Node for RsmNode<S, M> {
    fn on_start(&mut self, ctx: &mut dyn Ctx) {
        ctx.set_timer(TICK_MICROS, TICK_TIMER);
    }

    fn on_timer(&mut self, ctx: &mut dyn Ctx, _id: u64) {
        if self.failed.is_some() {
            return;
        }
        self.rsm.tick();
        self.flush(ctx);
        ctx.set_timer(TICK_MICROS, TICK_TIMER);
    }

    fn on_message(&mut self, ctx: &mut dyn Ctx, _from: Endpoint, message: Vec<u8>) {
        // A message that does not decode or does not belong to this cluster is dropped.
        if self.failed.is_none()
            && let Ok(m) = postcard::from_bytes::<Message>(&message)
            && self.rsm.step(m).is_ok()
            && !self.deferred
        {
            self.flush(ctx);
        }
    }

    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
        if self.failed.is_some() {
            let reply = RsmReply::Failed(SubmitError::Shutdown);
            ctx.reply(from, call, postcard::to_allocvec(&reply).expect("encodes"));
            return;
        }
        let submitted = match postcard::from_bytes::<RsmRequest>(&request) {
            Ok(RsmRequest::Command(cmd)) => self.rsm.submit(cmd, ctx.now()),
            Ok(RsmRequest::Query(q)) if self.deferred => {
                // One ReadIndex round for every query of the batch, at the flush.
                self.queued_reads.push((from, call, q));
                return;
            }
            Ok(RsmRequest::Query(q)) => self.rsm.query(q),
            Ok(RsmRequest::ChangeMembership(changes)) => self.rsm.change_membership(&changes),
            Ok(RsmRequest::ChangeMembershipWith { changes, context, conf_index }) => {
                self.rsm.change_membership_with(&changes, context, conf_index)
            }
            Ok(RsmRequest::Membership) => {
                let m = postcard::to_allocvec(&self.rsm.membership()).expect("encodes");
                ctx.reply(from, call, postcard::to_allocvec(&RsmReply::Done(m)).expect("encodes"));
                return;
            }
            Err(e) => {
                let reply = RsmReply::Malformed(e.to_string());
                ctx.reply(from, call, postcard::to_allocvec(&reply).expect("encodes"));
                return;
            }
        };
        match submitted {
            Ok(id) => {
                self.waiting.insert(id, (from, call));
                if !self.deferred {
                    self.flush(ctx);
                }
            }
            Err(e) => ctx.reply(from, call, postcard::to_allocvec(&RsmReply::Failed(e)).expect("encodes")),
        }
    }

    fn on_shutdown(&mut self, ctx: &mut dyn Ctx) {
        let reply = postcard::to_allocvec(&RsmReply::Failed(SubmitError::Shutdown)).expect("encodes");
        for (to, call, _) in std::mem::take(&mut self.queued_reads) {
            ctx.reply(to, call, reply.clone());
        }
        let done = self.rsm.shutdown();
        self.answer(ctx, done);
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::SharedStorage;

    /// Counts applied commands; a query answers the count followed by the query's bytes.
    #[derive(Default)]
    struct Count(u64);
    impl StateMachine for Count {
        fn apply(&mut self, _cmd: &[u8], _ctx: ApplyCtx) -> Vec<u8> {
            self.0 += 1;
            Vec::new()
        }
        fn query(&self, q: &[u8]) -> Vec<u8> {
            let mut out = self.0.to_le_bytes().to_vec();
            out.extend_from_slice(q);
            out
        }
        fn snapshot(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
        fn restore(&mut self, s: &[u8]) {
            self.0 = u64::from_le_bytes(s.try_into().unwrap());
        }
    }

    /// A state machine whose snapshot is large: 20 KB.
    #[derive(Default)]
    struct Big(u64);
    impl StateMachine for Big {
        fn apply(&mut self, _cmd: &[u8], _ctx: ApplyCtx) -> Vec<u8> {
            self.0 += 1;
            Vec::new()
        }
        fn query(&self, _q: &[u8]) -> Vec<u8> {
            Vec::new()
        }
        fn snapshot(&self) -> Vec<u8> {
            let mut s = self.0.to_le_bytes().to_vec();
            s.resize(20_000, 0);
            s
        }
        fn restore(&mut self, s: &[u8]) {
            self.0 = u64::from_le_bytes(s[..8].try_into().unwrap());
        }
    }

    #[test]
    fn a_state_larger_than_the_threshold_is_snapshotted_once_per_its_size_of_log() {
        let mut rsm = Rsm::new(Config::new(1, vec![1]), SharedStorage::default(), Big(0), Some(2_000))
            .unwrap()
            .with_amortized_snapshots();
        for _ in 0..100 {
            rsm.tick();
            rsm.process().unwrap();
        }
        assert_eq!(rsm.status().role, Role::Leader);
        let mut snapshots = std::collections::BTreeSet::new();
        for _ in 0..600 {
            rsm.submit(vec![7; 100], 0).unwrap();
            rsm.process().unwrap();
            snapshots.insert(rsm.status().snapshot_index);
        }
        snapshots.remove(&0);
        // 60 KB of log: the first snapshot at 2 KB, then one per 20 KB (the snapshot's size),
        // not one per 2 KB (about 30).
        assert!((2..=5).contains(&snapshots.len()), "{} snapshots: {snapshots:?}", snapshots.len());
        assert!(rsm.storage().raft_state_bytes() <= 25_000, "the log is still compacted");
    }

    /// A single-node leader over `storage`, taking snapshots in the background past 2 KB.
    fn background_leader(storage: SharedStorage) -> Rsm<SharedStorage, Count> {
        let mut rsm = Rsm::new(Config::new(1, vec![1]), storage, Count(0), Some(2_000))
            .unwrap()
            .with_amortized_snapshots()
            .with_background_snapshots();
        for _ in 0..100 {
            rsm.tick();
            rsm.process().unwrap();
        }
        assert_eq!(rsm.status().role, Role::Leader);
        rsm
    }

    #[test]
    fn a_background_snapshot_takes_effect_only_once_finished_and_the_node_goes_on_meanwhile() {
        let storage = SharedStorage::default();
        let mut rsm = background_leader(storage.clone());
        let mut job = None;
        for _ in 0..100 {
            rsm.submit(vec![7; 100], 0).unwrap();
            rsm.process().unwrap();
            job = rsm.take_snapshot_job();
            if job.is_some() {
                break;
            }
        }
        let job = job.expect("a snapshot is due past 2 KB of log");
        assert_eq!(job.index(), rsm.status().applied);
        assert_eq!(rsm.status().snapshot_index, 0, "process takes no snapshot itself");
        // The node goes on while the job runs; no second job meanwhile.
        let running = std::thread::spawn(move || job.run());
        for _ in 0..30 {
            rsm.submit(vec![8; 100], 0).unwrap();
            rsm.process().unwrap();
            assert!(rsm.take_snapshot_job().is_none(), "one snapshot at a time");
        }
        assert_eq!(rsm.status().snapshot_index, 0, "nothing in effect before it finishes");
        let taken = running.join().unwrap();
        let applied = rsm.status().applied;
        let snap_at = taken.snapshot.meta.index;
        assert!(rsm.finish_snapshot(taken).unwrap());
        assert!(!rsm.snapshot_in_flight());
        assert_eq!(rsm.status().snapshot_index, snap_at);
        assert!(snap_at < applied, "the commands applied meanwhile stay in the log");
        let count = rsm.state_machine().0;
        // A restart restores the snapshot and replays the log after it: nothing lost.
        drop(rsm);
        let restarted = Rsm::new(Config::new(1, vec![1]), storage, Count(0), Some(2_000)).unwrap();
        let st = storage_state(&restarted);
        assert_eq!(st.0, snap_at, "the snapshot is in the storage");
        assert_eq!(st.1, applied - snap_at, "and the entries after it");
        let mut restarted = restarted;
        for _ in 0..100 {
            restarted.tick();
            restarted.process().unwrap();
        }
        assert_eq!(restarted.state_machine().0, count);
    }

    #[test]
    fn a_committed_command_is_answered_before_the_leaders_next_write() {
        // The leader's answer to a committed command must not wait for its own write and sync
        // of the entries proposed after it (that would add a sync to every write's latency).
        let storages: Vec<SharedStorage> = (0..3).map(|_| SharedStorage::default()).collect();
        let mut nodes: Vec<Rsm<SharedStorage, Count>> = (1..=3)
            .map(|id| {
                Rsm::new(Config::new(id, vec![1, 2, 3]), storages[id as usize - 1].clone(), Count(0), None).unwrap()
            })
            .collect();
        let deliver = |nodes: &mut Vec<Rsm<SharedStorage, Count>>, msgs: Vec<Message>| {
            for m in msgs {
                let _ = nodes[m.to as usize - 1].step(m);
            }
        };
        nodes[0].raw().campaign();
        for _ in 0..10 {
            let msgs: Vec<Message> = nodes.iter_mut().flat_map(|n| n.process().unwrap().0).collect();
            deliver(&mut nodes, msgs);
        }
        assert_eq!(nodes[0].status().role, Role::Leader);
        let a = nodes[0].submit(vec![1], 0).unwrap();
        let (msgs, done) = nodes[0].process().unwrap();
        assert!(done.is_empty());
        deliver(&mut nodes, msgs);
        for i in 1..3 {
            let msgs = nodes[i].process().unwrap().0;
            deliver(&mut nodes, msgs);
        }
        // `a` is committed on the leader, not applied; `b` is proposed: one Ready holds both.
        let b = nodes[0].submit(vec![2], 0).unwrap();
        let leader_log = storages[0].clone();
        let last_persisted = move || leader_log.0.borrow().initial_state().unwrap().entries.last().unwrap().index;
        let before = last_persisted();
        let mut answered_at = Vec::new();
        nodes[0]
            .process_sending(&mut |o| {
                if let Output::Done(c) = o {
                    answered_at.push((c.id, last_persisted()));
                }
            })
            .unwrap();
        assert_eq!(answered_at, vec![(a, before)], "a answered while b was not yet written");
        assert_eq!(last_persisted(), before + 1, "b written after");
        assert_ne!(a, b);
        assert_eq!(nodes[0].state_machine().0, 1);
    }

    /// A storage whose sync "runs elsewhere": the job does nothing and the model disk syncs
    /// when its outcome comes back, so what was written is durable only then.
    struct SyncLater(SharedStorage);
    impl Storage for SyncLater {
        type Error = String;
        fn initial_state(&self) -> Result<sixfive_raft::RestoredState, String> {
            self.0.initial_state()
        }
        fn save_hard_state(&mut self, hs: &sixfive_raft::HardState) -> Result<(), String> {
            self.0.save_hard_state(hs)
        }
        fn append(&mut self, entries: &[sixfive_raft::Entry]) -> Result<(), String> {
            self.0.append(entries)
        }
        fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), String> {
            self.0.save_snapshot(snapshot)
        }
        fn sync(&mut self) -> Result<(), String> {
            self.0.sync()
        }
        fn raft_state_bytes(&self) -> usize {
            self.0.raft_state_bytes()
        }
        fn start_sync(&mut self) -> Result<Option<SyncJob<String>>, String> {
            Ok(Some(Box::new(|| Ok(()))))
        }
        fn finish_sync(&mut self, result: Result<(), String>) -> Result<(), String> {
            result?;
            self.0.sync()
        }
    }

    /// Three pipelined nodes on model disks whose syncs run "elsewhere" ([`SyncLater`]).
    fn pipelined_cluster(max_raft_state: Option<usize>) -> (Vec<SharedStorage>, Vec<Rsm<SyncLater, Count>>) {
        let disks: Vec<SharedStorage> = (0..3).map(|_| SharedStorage::default()).collect();
        let nodes = (1..=3)
            .map(|id| {
                let storage = SyncLater(disks[id as usize - 1].clone());
                Rsm::new(Config::new(id, vec![1, 2, 3]), storage, Count(0), max_raft_state)
                    .unwrap()
                    .with_pipelined_persistence()
            })
            .collect();
        (disks, nodes)
    }

    #[test]
    fn a_pipelined_leader_answers_what_its_followers_made_durable_while_its_own_sync_runs() {
        let (disks, mut nodes) = pipelined_cluster(None);
        let durable_last = |i: usize| disks[i].0.borrow().durable().unwrap().entries.last().map_or(0, |e| e.index);
        // Runs `f` on node `i`, keeping its messages and the ids it answered.
        fn on(
            n: &mut Rsm<SyncLater, Count>,
            f: impl FnOnce(&mut Rsm<SyncLater, Count>, &mut dyn FnMut(Output)) -> Result<(), String>,
        ) -> (Vec<Message>, Vec<SubmitId>) {
            let (mut msgs, mut done) = (Vec::new(), Vec::new());
            f(n, &mut |o| match o {
                Output::Message(m) => msgs.push(m),
                Output::Done(c) => done.push(c.id),
            })
            .unwrap();
            (msgs, done)
        }
        // Follower `f` gets `msgs`, syncs on its loop and acknowledges; the leader hears it:
        // what the leader answers.
        let ack = |nodes: &mut Vec<Rsm<SyncLater, Count>>, f: usize, msgs: &[Message]| {
            for m in msgs.iter().filter(|m| m.to == f as u64 + 1) {
                nodes[f].step(m.clone()).unwrap();
            }
            let (acks, _) = on(&mut nodes[f], |n, out| n.process_sending(out));
            for m in acks {
                nodes[0].step(m).unwrap();
            }
            on(&mut nodes[0], |n, out| n.process_sending(out)).1
        };
        // Every node processes; a sync a leader started finishes at once; messages delivered.
        let settle = |nodes: &mut Vec<Rsm<SyncLater, Count>>, done: &mut Vec<SubmitId>| {
            for _ in 0..20 {
                let mut msgs = Vec::new();
                for n in nodes.iter_mut() {
                    let (m, d) = on(n, |n, out| {
                        n.process_sending(out)?;
                        match n.take_sync_job() {
                            Some(job) => n.finish_sync(job(), out),
                            None => Ok(()),
                        }
                    });
                    msgs.extend(m);
                    done.extend(d);
                }
                for m in msgs {
                    let _ = nodes[m.to as usize - 1].step(m);
                }
            }
        };
        let mut done = Vec::new();
        nodes[0].raw().campaign();
        settle(&mut nodes, &mut done);
        assert_eq!(nodes[0].status().role, Role::Leader);

        let a = nodes[0].submit(vec![1], 0).unwrap();
        let (msgs_a, answered) = on(&mut nodes[0], |n, out| n.process_sending(out));
        assert!(answered.is_empty());
        let sync_a = nodes[0].take_sync_job().expect("the leader syncs its entry elsewhere");
        let a_index = nodes[0].status().last_index;
        assert!(durable_last(0) < a_index, "a is written, not durable, on the leader");
        // Node 2's copy and the leader's unsynced one: not a quorum of durable copies.
        assert!(ack(&mut nodes, 1, &msgs_a).is_empty(), "committed on a copy that is not durable");
        assert_eq!(durable_last(1), a_index, "a follower acknowledges only what it synced");
        // b comes while the leader's sync runs: written behind it, no second sync meanwhile.
        let b = nodes[0].submit(vec![2], 0).unwrap();
        let (msgs_b, answered) = on(&mut nodes[0], |n, out| n.process_sending(out));
        assert!(answered.is_empty());
        assert!(nodes[0].take_sync_job().is_none(), "one sync at a time");
        assert_eq!(nodes[0].status().last_index, a_index + 1, "b is written meanwhile");
        // Node 3's copy too: a is answered, the leader's own copy still not durable.
        assert_eq!(ack(&mut nodes, 2, &msgs_a), vec![a]);
        assert!(durable_last(0) < a_index);
        // The sync ends: a is durable on the leader. b was written after it began: b's own
        // sync starts, and until it ends node 2's copy of b alone does not commit it.
        let (_, answered) = on(&mut nodes[0], |n, out| n.finish_sync(sync_a(), out));
        assert!(answered.is_empty());
        assert!(durable_last(0) >= a_index, "(this model's sync also covers what came after it began)");
        let sync_b = nodes[0].take_sync_job().expect("b's sync");
        assert!(ack(&mut nodes, 1, &msgs_b).is_empty(), "b committed on the leader's unsynced copy");
        let (_, answered) = on(&mut nodes[0], |n, out| n.finish_sync(sync_b(), out));
        assert_eq!(answered, vec![b], "node 2's copy and the leader's, durable now");
        assert_eq!(durable_last(0), a_index + 1);
        // Node 3 gets b too, and a heartbeat tells the followers b is committed.
        for m in msgs_b.into_iter().filter(|m| m.to == 3) {
            nodes[2].step(m).unwrap();
        }
        settle(&mut nodes, &mut done);
        for _ in 0..Config::new(1, vec![1]).heartbeat_ticks {
            nodes[0].tick();
        }
        settle(&mut nodes, &mut done);
        assert!(done.is_empty());
        for n in &nodes {
            assert_eq!(n.state_machine().0, 2, "{:?}", n.status());
        }
    }

    #[test]
    fn a_leader_deposed_while_its_sync_runs_answers_nothing_until_it_ends() {
        // Node 1 leads with a sync of its own running elsewhere when it is cut off; nodes 2
        // and 3 elect a leader, go on and compact. Reconnected, node 1 steps down, but starts
        // no second sync while the first runs (two at once could hide a write-back error from
        // one of them), so it answers nothing until that sync ends; then it catches up from
        // the new leader's snapshot.
        let (disks, mut nodes) = pipelined_cluster(Some(2_000));
        // Ticks, processes, delivers; syncs started elsewhere finish at once except node 1's
        // while `hold` is set; `cut` drops everything to and from node 1.
        let run = |nodes: &mut Vec<Rsm<SyncLater, Count>>, cut: bool, hold: bool, steps: usize| {
            for t in 0..steps {
                let mut msgs = Vec::new();
                for (i, n) in nodes.iter_mut().enumerate() {
                    if t % 10 == 0 && !(cut && i == 0) {
                        n.tick();
                    }
                    let mut out = |o| {
                        if let Output::Message(m) = o {
                            msgs.push(m)
                        }
                    };
                    n.process_sending(&mut out).unwrap();
                    if !(hold && i == 0)
                        && let Some(job) = n.take_sync_job()
                    {
                        n.finish_sync(job(), &mut out).unwrap();
                    }
                }
                for m in msgs {
                    if !(cut && (m.to == 1 || m.from == 1)) {
                        let _ = nodes[m.to as usize - 1].step(m);
                    }
                }
            }
        };
        nodes[0].raw().campaign();
        run(&mut nodes, false, false, 50);
        assert_eq!(nodes[0].status().role, Role::Leader);
        nodes[0].submit(vec![1; 100], 0).unwrap();
        nodes[0].process_sending(&mut |_| {}).unwrap();
        let held = nodes[0].take_sync_job().expect("the leader syncs elsewhere");
        run(&mut nodes, true, true, 400);
        let leader = (1..3).find(|&i| nodes[i].status().role == Role::Leader).expect("2 and 3 elect a leader");
        for _ in 0..100 {
            nodes[leader].submit(vec![2; 100], 0).unwrap();
            run(&mut nodes, true, true, 2);
        }
        assert!(nodes[leader].status().snapshot_index > 0, "the new leader compacted");
        let (before, applied_before) = (nodes[0].state_machine().0, nodes[0].status().applied);
        run(&mut nodes, false, true, 100);
        assert_eq!(nodes[0].status().role, Role::Follower);
        assert_eq!(nodes[0].snapshots_installed(), 0);
        assert_eq!(nodes[0].state_machine().0, before);
        assert_eq!(nodes[0].status().applied, applied_before);
        let durable_term = disks[0].0.borrow().durable().unwrap().hard_state.term;
        assert!(durable_term < nodes[0].status().term, "no second sync while the old leader's runs");
        let mut sent = Vec::new();
        nodes[0]
            .finish_sync(held(), &mut |o| {
                if let Output::Message(m) = o {
                    sent.push(m)
                }
            })
            .unwrap();
        assert!(!sent.is_empty(), "its answers go out once the sync ended");
        for m in sent {
            let _ = nodes[m.to as usize - 1].step(m);
        }
        run(&mut nodes, false, false, 100);
        assert_eq!(nodes[0].snapshots_installed(), 1, "caught up from the new leader's snapshot");
        let count = nodes[leader].state_machine().0;
        assert!(count >= 100);
        for n in &nodes {
            assert_eq!(n.state_machine().0, count);
        }
        let durable = disks[0].0.borrow().durable().unwrap().snapshot.as_ref().map_or(0, |s| s.meta.index);
        assert!(durable > 0, "node 1's snapshot is on its disk");
    }

    fn storage_state<M: StateMachine>(rsm: &Rsm<SharedStorage, M>) -> (Index, u64) {
        let st = rsm.storage().initial_state().unwrap();
        (
            st.snapshot.map_or(0, |s| s.meta.index),
            st.entries.iter().filter(|e| e.kind == EntryKind::Normal).count() as u64,
        )
    }

    #[test]
    fn a_snapshot_from_the_leader_supersedes_one_under_way() {
        // Three nodes; node 3 is cut off with a snapshot job under way while the others go
        // on and compact their logs; reconnected, it installs the leader's snapshot, and its
        // own, older one is dropped when it finishes.
        let mut nodes: Vec<Rsm<SharedStorage, Count>> = (1..=3)
            .map(|id| {
                let rsm = Rsm::new(Config::new(id, vec![1, 2, 3]), SharedStorage::default(), Count(0), Some(2_000))
                    .unwrap()
                    .with_background_snapshots();
                if id == 3 { rsm } else { rsm.with_amortized_snapshots() }
            })
            .collect();
        // Delivers messages until quiet; `cut` drops everything to and from node 3.
        let run = |nodes: &mut Vec<Rsm<SharedStorage, Count>>, cut: bool, ticks: usize| {
            for t in 0..ticks {
                if t % 10 == 0 {
                    for n in nodes.iter_mut() {
                        n.tick();
                    }
                }
                let mut msgs = Vec::new();
                for n in nodes.iter_mut() {
                    msgs.extend(n.process().unwrap().0);
                }
                for m in msgs {
                    if !(cut && (m.to == 3 || m.from == 3)) {
                        let _ = nodes[m.to as usize - 1].step(m);
                    }
                }
            }
        };
        nodes[0].raw().campaign();
        run(&mut nodes, false, 50);
        assert_eq!(nodes[0].status().role, Role::Leader);
        for _ in 0..25 {
            nodes[0].submit(vec![1; 100], 0).unwrap();
        }
        run(&mut nodes, false, 50);
        let job = nodes[2].take_snapshot_job().expect("node 3 is past 2 KB");
        let under_way = std::thread::spawn(move || job.run());
        for _ in 0..200 {
            nodes[0].submit(vec![2; 100], 0).unwrap();
            run(&mut nodes, true, 3);
            for node in nodes.iter_mut().take(2) {
                if let Some(job) = node.take_snapshot_job() {
                    let taken = job.run();
                    assert!(node.finish_snapshot(taken).unwrap());
                }
            }
        }
        let leader_snap = nodes[0].status().snapshot_index;
        assert!(leader_snap > nodes[2].status().applied, "the leader compacted past node 3");
        run(&mut nodes, false, 200);
        assert_eq!(nodes[2].snapshots_installed(), 1, "node 3 caught up by the leader's snapshot");
        let installed = nodes[2].status().snapshot_index;
        assert!(!nodes[2].finish_snapshot(under_way.join().unwrap()).unwrap(), "the older one is dropped");
        assert_eq!(nodes[2].status().snapshot_index, installed);
        assert_eq!(nodes[2].storage().initial_state().unwrap().snapshot.unwrap().meta.index, installed);
        assert_eq!(nodes[2].state_machine().0, nodes[0].state_machine().0);
        assert_eq!(nodes[0].state_machine().0, 225);
        // It snapshots on its own again afterwards.
        for _ in 0..30 {
            nodes[0].submit(vec![3; 100], 0).unwrap();
            run(&mut nodes, false, 3);
        }
        run(&mut nodes, false, 30);
        let job = nodes[2].take_snapshot_job().expect("past 2 KB again");
        assert!(nodes[2].finish_snapshot(job.run()).unwrap());
        assert_eq!(nodes[2].state_machine().0, 255);
    }

    #[test]
    fn a_batch_of_queries_shares_one_read_index_round_and_each_is_answered() {
        let mut follower = Rsm::new(Config::new(1, vec![1, 2, 3]), SharedStorage::default(), Count(0), None).unwrap();
        assert_eq!(
            follower.query_batch(vec![b"a".to_vec()]),
            Err(SubmitError::WrongLeader { leader: None }),
            "only a leader confirms reads"
        );
        let mut rsm = Rsm::new(Config::new(1, vec![1]), SharedStorage::default(), Count(0), None).unwrap();
        for _ in 0..100 {
            rsm.tick();
            rsm.process().unwrap();
        }
        assert_eq!(rsm.status().role, Role::Leader);
        rsm.submit(b"x".to_vec(), 0).unwrap();
        assert_eq!(rsm.query_batch(Vec::new()), Ok(Vec::new()));
        let ids = rsm.query_batch(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]).unwrap();
        assert_eq!(ids.len(), 3);
        let (_, done) = rsm.process().unwrap();
        let answers: BTreeMap<SubmitId, Vec<u8>> =
            done.into_iter().filter_map(|c| Some((c.id, c.result.ok()?))).collect();
        for (id, q) in ids.iter().zip([b"a", b"b", b"c"]) {
            let mut want = 1u64.to_le_bytes().to_vec();
            want.extend_from_slice(q);
            assert_eq!(answers.get(id), Some(&want), "query {id} sees the command applied before it");
        }
        assert!(rsm.read_batches.is_empty() && rsm.reads_waiting.is_empty());
    }
}
