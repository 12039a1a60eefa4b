//! The public face of the core: a node driven by `tick`, `step`, `propose`, and `ready`/`advance`.

use crate::conf::{ConfChange, ConfChangeError, ConfState};
use crate::config::{Config, ConfigError};
use crate::log::{Compacted, RaftLog};
use crate::raft::{Campaign, ProposeError, Raft, Role};
use crate::storage::RestoredState;
use crate::types::*;

/// What the driver must do next. Process it in this order, then call [`RawNode::advance`]:
///
/// 1. Send `messages` at once, if the driver wants to: they acknowledge nothing, so they may go
///    out before (or while) step 2 writes (thesis section 10.2.1: the leader writes its own log
///    in parallel with replicating it). A driver may also send them after step 2.
/// 2. Persist `snapshot`, `entries` and `hard_state` and make them durable if
///    [`Ready::must_sync`] ([`crate::persist_ready`] does exactly this).
/// 3. Only then send `persisted_messages`: they may acknowledge what step 2 persisted.
/// 4. If `snapshot` is set, restore the state machine from it; then apply `committed_entries`
///    in order (skipping [`EntryKind::Noop`]; an [`EntryKind::ConfChange`] entry carries a
///    configuration that is already in effect in the core). A snapshot's own bytes are
///    [`Snapshot::app_data`]: its `data` also carries the configuration.
/// 5. Serve each of `read_states` once the state machine has applied its `index`.
///
/// Between `ready` and `advance` the driver may go on calling `step`, `tick`, `propose` and
/// the rest while it persists (on another thread, say), and even `ready` again: several
/// `Ready`s may be in flight (pipelined persistence) if the driver keeps three rules:
///
/// - it writes the `Ready`s in the order it took them (so a later one's truncation lands after
///   an earlier one's entries), and each write reaches the disk no earlier than those before;
/// - it sends a `Ready`'s `persisted_messages` only once that `Ready` and every earlier one
///   are durable (a message may acknowledge entries an earlier `Ready` carried);
/// - it calls [`RawNode::advance`] for each, in the same order, once it is durable.
///
/// Committed entries are handed out once, in the `Ready` that carries them: the application
/// applies them as it takes that `Ready` (they need no local persist: see
/// [`Ready::committed_entries`]), unless the `Ready` carries a snapshot, which is restored
/// after the persist with the entries after it. While a `Ready` carrying a snapshot is in
/// flight, [`RawNode::has_ready`] says no: later entries apply only on the restored state.
/// The simulator drives both ways (`ClusterConfig::async_persist`); the production server
/// pipelines a leader's syncs.
///
/// # Which messages may go out before the persist, and why that is safe
///
/// `messages` holds only what a leader sends to replicate, `Append`, `Heartbeat`,
/// `Snapshot` chunks and `TimeoutNow`, and only when neither this `Ready` nor one still in
/// flight changes the term or the vote (otherwise every message is in `persisted_messages`). Everything else (vote
/// requests and answers, append, heartbeat and snapshot answers) waits for the persist.
///
/// - *The term is durable before any message of that term leaves.* A node leads term `T` only
///   after a `Ready` that persisted term `T` with its own vote (the election's vote requests
///   wait for it), or, for a cluster whose quorum is the leader alone, in a `Ready` that still
///   carries the new term, which therefore sends nothing early. So a leader's early messages
///   are of a durable term, and a crash cannot make a node forget the term it replicated in
///   and lead that term a second time with another log (which would break Log Matching:
///   one index and term, two different entries).
/// - *Votes and acknowledgements are durable before they are sent.* A granted vote, and an
///   `AppendResponse` or `SnapshotResponse` saying "I hold these entries", always wait for the
///   persist: a voter that crashed after answering still holds its vote (Election Safety) and
///   an acknowledged entry is on that follower's disk (the commit rule counts durable copies).
///   A candidate's vote requests wait too, since it counts its own vote at once.
/// - *The leader's own copy counts only once durable.* Entries the leader appends are
///   replicated at once, but the leader counts itself toward an entry's quorum only when
///   [`RawNode::advance`] reports the `Ready` carrying it persisted (its match index is the
///   persisted index, not the last index). A leader that crashes between sending its
///   `Append`s and persisting never counted itself: if the entry was committed, a majority of
///   *followers* acknowledged it from their durable logs, which is the commit rule (section
///   5.3) unchanged. After the restart the entry may be missing from the old leader's log; that
///   is the case of any follower that had not received it yet, and the old leader (its term
///   and vote for itself durable) can never lead that term again, so no other entry takes
///   that index and term.
/// - *An acknowledgement never outlives what it acknowledges.* Messages made between two
///   `Ready`s wait for the next one; if a later input drops the entries an `AppendResponse`
///   acknowledged (a new leader's conflicting entries, a snapshot) or ends the term of a vote
///   granted, that message is dropped before the `Ready` is built, since the persist it would
///   follow no longer holds what it vouches for (as if lost; Raft retries). This matters to
///   any driver that steps several messages per `Ready` (group commit) or while it persists.
/// - An `Append` carries entries the leader may not hold durably yet; the receiver treats
///   them like any other (it acknowledges only what it persisted). Its `commit` field is the
///   leader's commit index, which counted only durable copies.
#[derive(Debug, Default)]
pub struct Ready {
    /// Term, vote or commit changed: persist this.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it (it replaces the log), then restore the
    /// state machine from it before applying `committed_entries`.
    pub snapshot: Option<Snapshot>,
    /// Entries to persist. Storage first drops any entry at or after `entries[0].index`.
    pub entries: Vec<Entry>,
    /// Messages that may be sent before the persistence above (a leader's replication; see
    /// the type's documentation).
    pub messages: Vec<Message>,
    /// Messages to send only after the persistence above.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in index order. Committed means durable on a majority,
    /// so they may be applied before (or while) this node persists its own copy; the node
    /// counts them applied once handed out, so apply them before compacting past them.
    pub committed_entries: Vec<Entry>,
    /// Reads that became safe (ReadIndex).
    pub read_states: Vec<ReadState>,
    /// See [`Ready::must_sync`].
    must_sync: bool,
}

impl Ready {
    /// Whether anything must be made durable (`fsync`) before `persisted_messages` go out: a
    /// new term or vote, entries, or a snapshot. A change of the commit index alone need not be
    /// (as etcd's `MustSync`): a commit index lost in a crash is learned again from the leader,
    /// and it never points past synced entries (those in this `Ready` make it sync). Write
    /// `hard_state` all the same; a later sync makes it durable.
    pub fn must_sync(&self) -> bool {
        self.must_sync
    }

    /// Every message, in an order valid for a driver that persists first and sends after:
    /// `messages`, then `persisted_messages`.
    pub fn all_messages(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().chain(self.persisted_messages.iter())
    }
}

/// Whether a message may leave before the `Ready` carrying it is persisted (see [`Ready`]):
/// a leader's replication, which acknowledges nothing.
fn may_precede_persist(m: &Message) -> bool {
    matches!(
        m.body,
        MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. }
            | MessageBody::TimeoutNow { .. }
    )
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
    /// The configuration in effect (the latest in the log; see [`crate::ConfState`]).
    pub conf: ConfState,
    /// Index of the entry that carries `conf` (or of the snapshot it comes from). The
    /// configuration is committed once `commit >= conf_index`.
    pub conf_index: Index,
    /// This node was removed: it was a member, and the configuration in effect no longer
    /// names it; it never campaigns (a driver should log it, and may stop the server once
    /// `commit >= conf_index`, when the removal is final). A new node catching up through
    /// configurations from before it was added is not removed. Known in the incarnation that
    /// saw the removal, and after a restart while the log or snapshot still shows a
    /// configuration that named this node (a node restarted from a snapshot taken after its
    /// removal cannot tell it from a node not yet added).
    pub removed: bool,
}

/// Why a step was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// The message is addressed to another node.
    WrongRecipient {
        /// The address on the message.
        to: NodeId,
    },
    /// The sender is this node itself, or the reserved id 0. (Any other sender is heard:
    /// members change, and only voters of this node's configuration are ever counted.)
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
                write!(f, "message from node {from}, which cannot be a peer of this node")
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
    /// The snapshot's term or configuration is not the log's at its index.
    Mismatch,
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::AlreadyCompacted => write!(f, "the log is already compacted past that index"),
            CompactError::NotApplied => write!(f, "cannot snapshot an index that has not been applied"),
            CompactError::Mismatch => write!(f, "the snapshot does not match the log at its index"),
        }
    }
}
impl std::error::Error for CompactError {}

/// A Raft node without IO.
pub struct RawNode {
    raft: Raft,
    /// The hard state last handed out in a `Ready`.
    prev_hard_state: HardState,
    /// The term and vote of the last `Ready` advanced (so durable): until a new term or vote
    /// is, every message waits for the persist.
    durable_term_vote: (Term, Option<NodeId>),
    /// `Ready`s handed out and not yet advanced.
    in_flight: u64,
    /// A `Ready` carrying a snapshot is among them: no other is handed out until it is
    /// advanced.
    snapshot_in_flight: bool,
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
        let hs = raft.hard_state();
        let node = RawNode {
            prev_hard_state: hs,
            durable_term_vote: (hs.term, hs.vote),
            raft,
            in_flight: 0,
            snapshot_in_flight: false,
        };
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
        if m.from == self.raft.id || m.from == 0 {
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
        if !self.raft.conf.voters.contains(&to) {
            return Err(ProposeError::UnknownNode(to));
        }
        let r = self.raft.transfer_leader(to);
        self.check();
        r
    }

    /// Proposes a configuration change (leader only): learners join, learners are promoted,
    /// members leave; see [`crate::ConfState`] for the rules. On success returns the index and
    /// term of the entry; the change is in effect at once, and final once
    /// [`Status::conf`] is no longer joint and [`Status::commit`] reaches [`Status::conf_index`]
    /// (a change of voters passes through a joint configuration that the leader leaves on its
    /// own).
    pub fn propose_conf_change(&mut self, changes: &[ConfChange]) -> Result<(Index, Term), ConfChangeError> {
        let r = self.raft.propose_conf_change(changes, None);
        self.check();
        r
    }

    /// [`RawNode::propose_conf_change`] that also replaces the configuration's
    /// [`ConfState::context`] (the application's bytes that travel with it, e.g. where each
    /// member listens). The context follows the configuration's rules: in effect once
    /// appended, rolled back if the entry is truncated, kept in snapshots.
    pub fn propose_conf_change_with_context(
        &mut self,
        changes: &[ConfChange],
        context: Vec<u8>,
    ) -> Result<(Index, Term), ConfChangeError> {
        let r = self.raft.propose_conf_change(changes, Some(context));
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

    /// Where a snapshot of the application's state at `index` (which it has applied) would
    /// sit, and the configuration it must carry: for an application that builds the snapshot
    /// itself, away from the node ([`Snapshot::with_conf`]), and then hands it to
    /// [`RawNode::compact_to`]. Nothing changes.
    pub fn snapshot_position(&self, index: Index) -> Result<(SnapshotMeta, ConfState), CompactError> {
        if index <= self.raft.log.snapshot().meta.index {
            return Err(CompactError::AlreadyCompacted);
        }
        if index > self.raft.log.applied() {
            return Err(CompactError::NotApplied);
        }
        let term = self.raft.log.term(index).expect("an applied index above the snapshot is in the log");
        Ok((SnapshotMeta { index, term }, self.raft.conf_at_index(index)))
    }

    /// Compacts the log up to `snapshot`, built by the application as
    /// [`RawNode::snapshot_position`] said and already saved durably: the node keeps it (to send
    /// to followers) without copying its data. Refused, changing nothing, if the log was
    /// compacted past it meanwhile (a snapshot from the leader was installed) or if it does not
    /// match the log at its index (another term or configuration). Returns what it dropped,
    /// for the caller to free where the cost does not matter.
    pub fn compact_to(&mut self, snapshot: std::sync::Arc<Snapshot>) -> Result<Compacted, CompactError> {
        let (meta, conf) = self.snapshot_position(snapshot.meta.index)?;
        if meta != snapshot.meta || snapshot.conf_state().as_ref() != Some(&conf) {
            return Err(CompactError::Mismatch);
        }
        let dropped = self.raft.compact_to(snapshot, conf);
        self.check();
        Ok(dropped)
    }

    /// Whether `ready()` has anything to hand out.
    pub fn has_ready(&self) -> bool {
        let r = &self.raft;
        !self.snapshot_in_flight
            && (!r.msgs.is_empty()
                || !r.read_states.is_empty()
                || r.hard_state() != self.prev_hard_state
                || r.log.snapshot_pending
                || r.log.written < r.log.last_index()
                || r.log.applied < r.log.committed
                || r.has_pending_sends())
    }

    /// Collects what the driver must do; see [`Ready`] for the order. Call [`RawNode::advance`]
    /// with it once it is durable; see [`Ready`] for taking more meanwhile.
    pub fn ready(&mut self) -> Ready {
        assert!(!self.snapshot_in_flight, "ready() while a Ready carrying a snapshot is in flight");
        self.in_flight += 1;
        self.raft.flush();
        let r = &mut self.raft;
        let hs = r.hard_state();
        let prev = self.prev_hard_state;
        let snapshot = if r.log.snapshot_pending { Some(r.log.snapshot().clone()) } else { None };
        r.log.snapshot_pending = false;
        self.snapshot_in_flight |= snapshot.is_some();
        let entries = r.log.take_unwritten();
        let new_term_or_vote = hs.term != prev.term || hs.vote != prev.vote;
        let must_sync = new_term_or_vote || !entries.is_empty() || snapshot.is_some();
        let all = std::mem::take(&mut r.msgs);
        let (messages, persisted_messages) = if (hs.term, hs.vote) != self.durable_term_vote {
            (Vec::new(), all)
        } else {
            all.into_iter().partition(may_precede_persist)
        };
        let committed_entries = r.log.to_apply(r.cfg.max_committed_bytes_per_ready);
        if let Some(e) = committed_entries.last() {
            r.log.applied_to(e.index);
        }
        self.prev_hard_state = hs;
        let rd = Ready {
            hard_state: (hs != prev).then_some(hs),
            snapshot,
            entries,
            messages,
            persisted_messages,
            committed_entries,
            read_states: std::mem::take(&mut r.read_states),
            must_sync,
        };
        self.check();
        rd
    }

    /// Tells the node that `ready` (the oldest `Ready` not yet advanced) was persisted and its
    /// messages sent. A leader now counts its own copy of the entries persisted, which may
    /// commit them (a later `Ready` then carries them in `committed_entries`).
    pub fn advance(&mut self, ready: &Ready) {
        assert!(self.in_flight > 0, "advance() without ready()");
        self.in_flight -= 1;
        if ready.snapshot.is_some() {
            self.snapshot_in_flight = false;
        }
        if let Some(hs) = ready.hard_state {
            self.durable_term_vote = (hs.term, hs.vote);
        }
        if let Some(e) = ready.entries.last() {
            self.raft.on_persisted(e.index, e.term);
        }
        self.check();
    }

    /// `Ready`s handed out and not yet advanced.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
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
            conf: r.conf.clone(),
            conf_index: r.conf_at.0,
            removed: r.is_removed(),
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
