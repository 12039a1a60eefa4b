//! The public face of the core: a node driven by `tick`, `step`, `propose`, and `ready`/`advance`.

use crate::config::{Config, ConfigError};
use crate::log::RaftLog;
use crate::raft::{Campaign, ProposeError, Raft, Role};
use crate::storage::RestoredState;
use crate::types::*;

/// What the driver must do next. Process it in this order, then call [`RawNode::advance`]:
///
/// 1. Persist `snapshot`, `entries` and `hard_state` and make them durable
///    ([`crate::persist_ready`] does exactly this).
/// 2. Only then send `messages`: they may acknowledge what step 1 persisted.
/// 3. If `snapshot` is set, restore the state machine from it; then apply `committed_entries`
///    in order (skipping [`EntryKind::Noop`]).
/// 4. Serve each of `read_states` once the state machine has applied its `index`.
#[derive(Debug, Default)]
pub struct Ready {
    /// Term, vote or commit changed: persist this.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it (it replaces the log), then restore the
    /// state machine from it before applying `committed_entries`.
    pub snapshot: Option<Snapshot>,
    /// Entries to persist. Storage first drops any entry at or after `entries[0].index`.
    pub entries: Vec<Entry>,
    /// Messages to send after the persistence above.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in index order.
    pub committed_entries: Vec<Entry>,
    /// Reads that became safe (ReadIndex).
    pub read_states: Vec<ReadState>,
    /// See [`Ready::must_sync`].
    must_sync: bool,
}

impl Ready {
    /// Whether anything must be made durable (`fsync`) before the messages go out: a new term
    /// or vote, entries, or a snapshot. A change of the commit index alone need not be (as
    /// etcd's `MustSync`): a commit index lost in a crash is learned again from the leader, and
    /// it never points past synced entries (those in this `Ready` make it sync). Write
    /// `hard_state` all the same; a later sync makes it durable.
    pub fn must_sync(&self) -> bool {
        self.must_sync
    }
}

/// A summary of a node's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Role.
    pub role: Role,
    /// Who this node believes leads.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: Index,
    /// Applied index.
    pub applied: Index,
    /// Last log index.
    pub last_index: Index,
    /// Index of the latest snapshot.
    pub snapshot_index: Index,
}

/// Why a step was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// The message is addressed to another node.
    WrongRecipient {
        /// The address on the message.
        to: NodeId,
    },
    /// The sender is not a voter of this cluster.
    UnknownSender {
        /// The sender.
        from: NodeId,
    },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::WrongRecipient { to } => write!(f, "message addressed to node {to}, not to this node"),
            StepError::UnknownSender { from } => {
                write!(f, "message from node {from}, which is not a voter of this cluster")
            }
        }
    }
}
impl std::error::Error for StepError {}

/// Why a compaction was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompactError {
    /// The index is at or below the current snapshot.
    AlreadyCompacted,
    /// The index has not been applied yet.
    NotApplied,
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::AlreadyCompacted => write!(f, "the log is already compacted past that index"),
            CompactError::NotApplied => write!(f, "cannot snapshot an index that has not been applied"),
        }
    }
}
impl std::error::Error for CompactError {}

/// A Raft node without IO.
pub struct RawNode {
    raft: Raft,
    /// The hard state last handed out in a `Ready`.
    prev_hard_state: HardState,
    /// A `Ready` was handed out and not yet advanced.
    ready_pending: bool,
}

impl RawNode {
    /// A brand-new node with an empty log.
    pub fn new(cfg: Config) -> Result<RawNode, ConfigError> {
        RawNode::restart(cfg, RestoredState::default())
    }

    /// A node rebuilt from what it persisted. The application must restore its state machine
    /// from `state.snapshot` itself; committed entries after it come out in later `Ready`s.
    pub fn restart(cfg: Config, state: RestoredState) -> Result<RawNode, ConfigError> {
        cfg.validate()?;
        let log = RaftLog::new(state.snapshot, state.entries, state.hard_state.commit);
        let mut hs = state.hard_state;
        hs.commit = log.committed();
        let raft = Raft::new(cfg, hs, log);
        let node = RawNode { prev_hard_state: raft.hard_state(), raft, ready_pending: false };
        node.check();
        Ok(node)
    }

    fn check(&self) {
        if cfg!(debug_assertions) {
            self.raft.check_invariants();
        }
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.raft.tick();
        self.check();
    }

    /// Feeds a message from another node.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.raft.id {
            return Err(StepError::WrongRecipient { to: m.to });
        }
        if m.from == self.raft.id || !self.raft.voters.contains(&m.from) {
            return Err(StepError::UnknownSender { from: m.from });
        }
        let (term, vote) = (self.raft.term, self.raft.vote);
        self.raft.step(m);
        // One vote per term (section 5.2).
        debug_assert!(
            self.raft.term != term || vote.is_none() || self.raft.vote == vote,
            "vote changed within term {term}"
        );
        self.check();
        Ok(())
    }

    /// Proposes a command. On success returns the index and term it will have if committed.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(Index, Term), ProposeError> {
        let r = self.raft.propose(data);
        self.check();
        r
    }

    /// Asks for a linearizable read point; a [`ReadState`] with `ctx` comes out in a later
    /// `Ready` once leadership is confirmed. Lost (never answered) if leadership changes.
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        let r = self.raft.read_index(ctx);
        self.check();
        r
    }

    /// Hands leadership to `to` once it has caught up (thesis section 3.10).
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        if !self.raft.voters.contains(&to) {
            return Err(ProposeError::UnknownNode(to));
        }
        let r = self.raft.transfer_leader(to);
        self.check();
        r
    }

    /// Starts an election now (tests and operators); pre-vote first when enabled.
    pub fn campaign(&mut self) {
        self.raft.campaign(Campaign::PreElection);
        self.check();
    }

    /// The application has a snapshot of its state through `index` (which it has applied):
    /// the log is compacted and the returned snapshot must be saved with
    /// [`crate::Storage::save_snapshot`].
    pub fn compact(&mut self, index: Index, data: Vec<u8>) -> Result<Snapshot, CompactError> {
        if index <= self.raft.log.snapshot().meta.index {
            return Err(CompactError::AlreadyCompacted);
        }
        if index > self.raft.log.applied() {
            return Err(CompactError::NotApplied);
        }
        let s = self.raft.compact(index, data);
        self.check();
        Ok(s)
    }

    /// Whether `ready()` has anything to hand out.
    pub fn has_ready(&self) -> bool {
        let r = &self.raft;
        !r.msgs.is_empty()
            || !r.read_states.is_empty()
            || r.hard_state() != self.prev_hard_state
            || r.log.snapshot_pending
            || r.log.persisted < r.log.last_index()
            || r.log.applied < r.log.committed
            || r.has_pending_sends()
    }

    /// Collects what the driver must do; see [`Ready`] for the order. Call [`RawNode::advance`]
    /// with it before calling `ready` again.
    pub fn ready(&mut self) -> Ready {
        assert!(!self.ready_pending, "ready() called twice without advance()");
        self.ready_pending = true;
        self.raft.flush();
        let r = &mut self.raft;
        let hs = r.hard_state();
        let prev = self.prev_hard_state;
        let snapshot = if r.log.snapshot_pending { Some(r.log.snapshot().clone()) } else { None };
        let entries = r.log.unpersisted();
        let must_sync = hs.term != prev.term || hs.vote != prev.vote || !entries.is_empty() || snapshot.is_some();
        Ready {
            hard_state: (hs != prev).then_some(hs),
            snapshot,
            entries,
            messages: std::mem::take(&mut r.msgs),
            committed_entries: r.log.to_apply(r.cfg.max_committed_bytes_per_ready),
            read_states: std::mem::take(&mut r.read_states),
            must_sync,
        }
    }

    /// Tells the node that `ready` was processed: persisted, sent and applied.
    pub fn advance(&mut self, ready: &Ready) {
        assert!(self.ready_pending, "advance() without ready()");
        self.ready_pending = false;
        let log = &mut self.raft.log;
        if let Some(hs) = ready.hard_state {
            self.prev_hard_state = hs;
        }
        if ready.snapshot.is_some() {
            log.snapshot_pending = false;
        }
        if let Some(e) = ready.entries.last() {
            log.persisted_to(e.index, e.term);
        }
        if let Some(e) = ready.committed_entries.last() {
            log.applied_to(e.index);
        }
        self.check();
    }

    /// A summary of the node's state.
    pub fn status(&self) -> Status {
        let r = &self.raft;
        Status {
            id: r.id,
            term: r.term,
            vote: r.vote,
            role: r.role,
            leader: r.leader,
            commit: r.log.committed(),
            applied: r.log.applied(),
            last_index: r.log.last_index(),
            snapshot_index: r.log.snapshot().meta.index,
        }
    }

    /// The leader's view of each follower (empty unless leader).
    pub fn progress(&self) -> &std::collections::BTreeMap<NodeId, crate::Progress> {
        &self.raft.progress
    }

    /// The node's log (for checkers and tools).
    pub fn log(&self) -> &RaftLog {
        &self.raft.log
    }
}
