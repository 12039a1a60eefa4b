//! The consensus state machine: roles, elections, replication, commitment, snapshots,
//! ReadIndex and leadership transfer. Pure: input is `tick`/`step`/`propose`, output is
//! messages and log changes collected for the next `Ready`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::conf::{ConfChange, ConfChangeError, ConfState, VoteResult, entry_conf};
use crate::config::Config;
use crate::log::RaftLog;
use crate::progress::{OutgoingSnapshot, Progress, ProgressState};
use crate::read_only::ReadOnly;
use crate::types::*;

/// A node's role (section 5.1, plus the pre-candidate of thesis section 9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Answers leaders and candidates.
    Follower,
    /// Asking whether an election could be won, without raising its term.
    PreCandidate,
    /// Asking for votes in a new term.
    Candidate,
    /// Replicates its log to the others.
    Leader,
}

/// How an election starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Campaign {
    /// A timeout or an operator: pre-vote first when enabled.
    PreElection,
    /// The real election, after a pre-vote was won (or with pre-vote off). Respects leases.
    Election,
    /// On `TimeoutNow` only: skips pre-vote, and its vote requests pass voters' leases.
    Transfer,
}

/// Why a proposal (or a read, or a transfer) was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// Only the leader takes proposals; `leader` is who this node believes leads, if anyone.
    NotLeader {
        /// Best guess of the current leader.
        leader: Option<NodeId>,
    },
    /// The leader is handing leadership over and takes no new proposals meanwhile.
    TransferInProgress,
    /// The node named is not a voter of this cluster.
    UnknownNode(NodeId),
    /// Back-pressure: the leader already holds `limit` bytes of uncommitted proposals
    /// ([`Config::max_uncommitted_bytes`]). Retry the same leader once earlier ones commit.
    UncommittedLimit {
        /// The limit, in bytes of command data.
        limit: usize,
    },
    /// Back-pressure: the leader already holds `limit` unanswered ReadIndex requests
    /// ([`Config::max_pending_reads`]). Retry the same leader once earlier ones are answered.
    PendingReadsLimit {
        /// The limit, in requests.
        limit: usize,
    },
}

impl ProposeError {
    /// Whether the same request may succeed later (here or at another node). Only a request
    /// naming a node that is not a voter never will.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProposeError::UnknownNode(_))
    }
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NotLeader { leader: Some(l) } => write!(f, "not the leader; try node {l}"),
            ProposeError::NotLeader { leader: None } => write!(f, "not the leader; no leader known, retry later"),
            ProposeError::TransferInProgress => write!(f, "leadership transfer in progress; retry shortly"),
            ProposeError::UnknownNode(n) => write!(f, "node {n} is not a voter of this cluster"),
            ProposeError::UncommittedLimit { limit } => {
                write!(f, "the leader holds {limit} bytes of uncommitted proposals; retry shortly")
            }
            ProposeError::PendingReadsLimit { limit } => {
                write!(f, "the leader holds {limit} unanswered reads; retry shortly")
            }
        }
    }
}
impl std::error::Error for ProposeError {}

/// The Raft state of one node.
pub struct Raft {
    pub(crate) id: NodeId,
    /// The configuration in effect: the latest in the log, else the snapshot's, else the
    /// bootstrap voters (see the `conf` module).
    pub(crate) conf: ConfState,
    /// Position (index, term) of the entry that carries `conf`, or of the snapshot when `conf`
    /// comes from it (0, 0 for the bootstrap configuration).
    pub(crate) conf_at: (Index, Term),
    /// The configuration at the snapshot's index (or the bootstrap one).
    snap_conf: ConfState,
    /// This node was a member of a configuration it held (in this incarnation, or in the log
    /// or snapshot it restarted from). Never goes back to false.
    was_member: bool,
    pub(crate) cfg: Config,
    /// Invariant: never decreases.
    pub(crate) term: Term,
    /// Invariant: once `Some` in a term, stays the same until the term changes (one vote per term).
    pub(crate) vote: Option<NodeId>,
    pub(crate) leader: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) log: RaftLog,
    /// Leader only: one entry per other member (voters and learners), plus members that the
    /// latest configuration removed until it is committed (so they learn of their removal).
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    /// Candidate/pre-candidate only: answers received.
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_ticks: u32,
    pub(crate) msgs: Vec<Message>,
    read_only: ReadOnly,
    pub(crate) read_states: Vec<ReadState>,
    lead_transferee: Option<NodeId>,
    /// Leader only: ticks since the transfer to `lead_transferee` began (a retry of the same
    /// transfer does not restart it). Kept apart from `election_elapsed`, so that no transfer
    /// request delays check-quorum.
    transfer_elapsed: u32,
    /// Leader only: bytes of command data proposed in this term and not yet committed.
    /// Invariant: zero unless leader.
    uncommitted_bytes: usize,
    /// Leader only: identity of the next snapshot transfer.
    next_stream: u64,
    /// Follower only: a snapshot being received in chunks.
    incoming_snapshot: Option<IncomingSnapshot>,
    rng: u64,
}

/// One InstallSnapshot chunk, as received.
struct Chunk {
    meta: SnapshotMeta,
    stream: u64,
    offset: u64,
    data: Vec<u8>,
    done: bool,
    checksum: u32,
}

/// A snapshot stream being received: chunks of exactly one stream are joined.
struct IncomingSnapshot {
    from: NodeId,
    term: Term,
    stream: u64,
    meta: SnapshotMeta,
    checksum: u32,
    data: Vec<u8>,
}

impl Raft {
    pub(crate) fn new(cfg: Config, hs: HardState, log: RaftLog) -> Raft {
        let snap_conf = log.snapshot.conf_state().unwrap_or_else(|| ConfState::with_voters(cfg.voters.clone()));
        let mut r = Raft {
            id: cfg.id,
            conf: snap_conf.clone(),
            conf_at: (0, 0),
            was_member: false,
            snap_conf,
            term: hs.term,
            vote: hs.vote,
            leader: None,
            role: Role::Follower,
            log,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: 0,
            msgs: Vec::new(),
            read_only: ReadOnly::default(),
            read_states: Vec::new(),
            lead_transferee: None,
            transfer_elapsed: 0,
            uncommitted_bytes: 0,
            next_stream: 1,
            incoming_snapshot: None,
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(cfg.id),
            cfg,
        };
        r.refresh_conf();
        r.was_member = r.snap_conf.is_member(r.id)
            || r.log.entries.iter().filter_map(entry_conf).any(|c| c.is_member(r.id))
            || r.conf.is_member(r.id);
        r.become_follower(hs.term, None);
        r
    }

    // ---------------------------------------------------------------- configuration

    /// Whether this node may campaign and be counted: a voter of its configuration.
    pub(crate) fn is_voter(&self) -> bool {
        self.conf.is_voter(self.id)
    }

    /// Whether this node knows it is no member of its cluster any more: it was a member, and
    /// its configuration no longer names it. (A new node catching up through configurations
    /// from before it was added is not removed.)
    pub(crate) fn is_removed(&self) -> bool {
        self.was_member && !self.conf.is_member(self.id)
    }

    /// The configuration in effect at `index` (held in the log or at the snapshot).
    pub(crate) fn conf_at_index(&self, index: Index) -> ConfState {
        let base = self.log.snapshot.meta.index;
        (base + 1..=index.min(self.log.last_index()))
            .rev()
            .find_map(|i| self.log.entry(i).and_then(entry_conf))
            .unwrap_or_else(|| self.snap_conf.clone())
    }

    /// Recomputes the configuration from the log (rule 1 of the `conf` module): after entries
    /// were appended or truncated, a snapshot was installed or the log compacted.
    fn refresh_conf(&mut self) {
        let found = self.log.entries.iter().rev().find(|e| e.kind == EntryKind::ConfChange);
        let (conf, at) = match found {
            Some(e) => (entry_conf(e).expect("a configuration entry"), (e.index, e.term)),
            None => {
                let m = self.log.snapshot.meta;
                (self.snap_conf.clone(), (m.index, m.term))
            }
        };
        self.conf_at = at;
        self.was_member |= conf.is_member(self.id);
        if conf != self.conf {
            self.conf = conf;
            self.sync_progress();
        }
    }

    /// Leader only: tracks every member of the configuration (new ones start probing at the
    /// end of our log). Members that left stay tracked until the configuration is committed.
    fn sync_progress(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let next = self.log.last_index() + 1;
        for id in self.conf.members() {
            if id != self.id {
                self.progress.entry(id).or_insert_with(|| Progress::new(next));
            }
        }
        if self.log.committed >= self.conf_at.0 {
            // A member the configuration removed stays tracked (and gets heartbeats carrying
            // the commit index) until it holds the entry that removed it; it is dropped with a
            // last heartbeat that tells it the entry is committed, so it knows its removal is
            // final (rule 6) and its server can stop. (One that never answers is dropped at the
            // next change.)
            let (conf, at, committed, seq) = (&self.conf, self.conf_at.0, self.log.committed, self.read_only.seq);
            let mut told = Vec::new();
            self.progress.retain(|id, p| {
                if conf.is_member(*id) || p.match_index < at {
                    return true;
                }
                told.push((*id, p.match_index.min(committed)));
                false
            });
            for (to, commit) in told {
                self.send(to, MessageBody::Heartbeat { commit, read_seq: seq });
            }
        }
    }

    /// Leader, before a new change: stops tracking members that left and never acknowledged it.
    fn forget_departed(&mut self) {
        let conf = &self.conf;
        self.progress.retain(|id, _| conf.is_member(*id));
    }

    /// Whether a change is under way: the latest configuration is uncommitted or joint.
    fn change_pending(&self) -> bool {
        self.conf_at.0 > self.log.committed || self.conf.is_joint()
    }

    pub(crate) fn propose_conf_change(
        &mut self,
        changes: &[ConfChange],
        context: Option<Vec<u8>>,
    ) -> Result<(Index, Term), ConfChangeError> {
        if self.role != Role::Leader {
            return Err(ConfChangeError::NotLeader { leader: self.leader });
        }
        if self.lead_transferee.is_some() {
            return Err(ConfChangeError::TransferInProgress);
        }
        if self.change_pending() || !self.committed_in_term() {
            return Err(ConfChangeError::ChangeInProgress);
        }
        let mut next = self.conf.apply(changes)?;
        self.forget_departed();
        if let Some(c) = context {
            next.context = c;
        }
        // A node becomes a voter only once it holds everything the leader has committed and
        // streams in order: it then cannot stall the new quorum (thesis section 4.2.1).
        let needed = self.log.committed;
        for id in next.all_voters() {
            if self.conf.is_voter(id) || id == self.id {
                continue;
            }
            let (match_index, replicating) =
                self.progress.get(&id).map_or((0, false), |p| (p.match_index, p.state == ProgressState::Replicate));
            if match_index < needed || !replicating {
                return Err(ConfChangeError::LearnerBehind { id, match_index, needed });
            }
        }
        let index = self.append_conf(next);
        Ok((index, self.term))
    }

    /// Appends a configuration entry; it takes effect at once (rule 1).
    fn append_conf(&mut self, next: ConfState) -> Index {
        let data = next.encode();
        self.uncommitted_bytes += data.len();
        let index = self.log.last_index() + 1;
        self.log.append(&[Entry { term: self.term, index, kind: EntryKind::ConfChange, data: data.into() }]);
        self.conf = next;
        self.conf_at = (index, self.term);
        self.sync_progress();
        // Committed by followers' answers or by our own persist, like any entry.
        self.maybe_commit();
        index
    }

    /// Leader only, after its commit index moved: leave a committed joint configuration
    /// (rule 2), stop tracking removed members, and step down once a configuration that
    /// removed this node is committed (rule 6).
    fn after_commit(&mut self) {
        if self.role != Role::Leader || self.log.committed < self.conf_at.0 {
            return;
        }
        if self.conf.is_joint() {
            let next = self.conf.leave_joint();
            self.append_conf(next);
            return;
        }
        self.sync_progress();
        if !self.conf.is_voter(self.id) {
            // Tell the voters what is committed, and hand over to one that is up to date.
            self.broadcast_heartbeat();
            let last = self.log.last_index();
            let heir = self
                .conf
                .voters
                .iter()
                .copied()
                .find(|id| self.progress.get(id).is_some_and(|p| p.match_index == last));
            if let Some(to) = heir {
                self.send_timeout_now(to);
            }
            self.become_follower(self.term, None);
        }
    }

    pub(crate) fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed }
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64: small, seedable, good enough for timeouts.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        debug_assert_ne!(to, self.id, "a node never messages itself");
        self.msgs.push(Message { from: self.id, to, term: self.term, body });
    }

    /// Leader: every node it replicates to. Others: every voter (those a candidate asks).
    fn others(&self) -> Vec<NodeId> {
        if self.role == Role::Leader {
            return self.progress.keys().copied().collect();
        }
        self.conf.all_voters().into_iter().filter(|&v| v != self.id).collect()
    }

    // ---------------------------------------------------------------- role changes

    fn reset(&mut self, term: Term) {
        if self.term != term {
            assert!(term > self.term, "term goes back from {} to {term}", self.term);
            self.term = term;
            self.vote = None;
            // A vote granted in the old term and still queued would go out after a persist
            // that holds the new term and no such vote: drop it (it is as if lost).
            self.msgs.retain(|m| !matches!(m.body, MessageBody::VoteResponse { pre: false, granted: true }));
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let e = self.cfg.election_ticks as u64;
        self.randomized_election_ticks = (e + self.next_random() % e) as u32;
        self.votes.clear();
        self.progress.clear();
        self.read_only = ReadOnly::default();
        self.lead_transferee = None;
        self.transfer_elapsed = 0;
        self.uncommitted_bytes = 0;
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader does not pre-campaign");
        // Term and vote stay as they are: a pre-vote changes no persistent state.
        self.votes.clear();
        self.leader = None;
        self.election_elapsed = 0;
        let e = self.cfg.election_ticks as u64;
        self.randomized_election_ticks = (e + self.next_random() % e) as u32;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader does not campaign");
        self.reset(self.term + 1);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        assert_eq!(self.role, Role::Candidate, "only a candidate becomes leader");
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.sync_progress();
        // Section 5.4.2 / thesis 6.4: a no-op of our own term lets earlier entries commit and
        // lets ReadIndex know the commit index is current.
        self.append_entry(EntryKind::Noop, Vec::new());
    }

    /// Starts an election (pre-vote first when enabled, unless this is a leadership transfer).
    pub(crate) fn campaign(&mut self, kind: Campaign) {
        if self.role == Role::Leader || !self.is_voter() {
            // Learners and removed nodes never campaign (the latter say so in their status).
            return;
        }
        let pre = kind == Campaign::PreElection && self.cfg.pre_vote;
        // Only a transfer target passes the voters' leases; a won pre-vote does not.
        let transfer = kind == Campaign::Transfer;
        if pre {
            self.become_pre_candidate();
        } else {
            self.become_candidate();
        }
        self.votes.insert(self.id, true);
        if self.poll_won() {
            // Single-voter cluster.
            if pre {
                self.campaign(Campaign::Election);
            } else {
                self.become_leader();
            }
            return;
        }
        let term = if pre { self.term + 1 } else { self.term };
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for to in self.others() {
            self.msgs.push(Message {
                from: self.id,
                to,
                term,
                body: MessageBody::Vote { pre, last_index, last_term, transfer },
            });
        }
    }

    /// Only the answers of voters of our configuration count (never a learner's).
    fn poll(&self) -> VoteResult {
        self.conf.vote_result(&|id| self.votes.get(&id).copied())
    }

    fn poll_won(&self) -> bool {
        self.poll() == VoteResult::Won
    }

    fn poll_lost(&self) -> bool {
        self.poll() == VoteResult::Lost
    }

    // ---------------------------------------------------------------- tick

    pub(crate) fn tick(&mut self) {
        self.election_elapsed += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else if self.election_elapsed >= self.randomized_election_ticks {
            self.election_elapsed = 0;
            self.campaign(Campaign::PreElection);
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        for p in self.progress.values_mut() {
            if !p.inflights.is_empty() {
                p.stalled_ticks = p.stalled_ticks.saturating_add(1);
            }
        }
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                let me = self.id;
                let progress = &self.progress;
                let active = |id| id == me || progress.get(&id).is_some_and(|p| p.recent_active);
                if !self.conf.has_quorum(&active) {
                    // Check-quorum: we may be cut off; let a connected majority elect someone.
                    self.become_follower(self.term, None);
                    return;
                }
                for p in self.progress.values_mut() {
                    p.recent_active = false;
                }
            }
        }
        if self.lead_transferee.is_some() {
            // A transfer that did not finish within an election timeout is abandoned.
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.cfg.election_ticks {
                self.lead_transferee = None;
                self.transfer_elapsed = 0;
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    /// Heartbeats carry the latest ReadIndex round started, so every heartbeat answer counts
    /// for it.
    fn broadcast_heartbeat(&mut self) {
        let seq = self.read_only.seq;
        for to in self.others() {
            let commit = self.progress[&to].match_index.min(self.log.committed);
            self.send(to, MessageBody::Heartbeat { commit, read_seq: seq });
        }
    }

    // ---------------------------------------------------------------- proposals

    fn append_entry(&mut self, kind: EntryKind, data: Vec<u8>) -> Index {
        let index = self.log.last_index() + 1;
        self.log.append(&[Entry { term: self.term, index, kind, data: data.into() }]);
        // The leader counts itself only once the entry is persisted (`on_persisted`): its
        // Appends may go out before its own write (see `Ready`), so followers alone may
        // commit it meanwhile, as `maybe_commit` after their answers does.
        index
    }

    pub(crate) fn propose(&mut self, data: Vec<u8>) -> Result<(Index, Term), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.lead_transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        let limit = self.cfg.max_uncommitted_bytes;
        if self.uncommitted_bytes > 0 && self.uncommitted_bytes.saturating_add(data.len()) > limit {
            // Back-pressure (etcd's MaxUncommittedEntriesSize): one proposal is always taken.
            return Err(ProposeError::UncommittedLimit { limit });
        }
        self.uncommitted_bytes += data.len();
        let index = self.append_entry(EntryKind::Normal, data);
        Ok((index, self.term))
    }

    /// Sends whatever each follower is missing, and one heartbeat round for the ReadIndex
    /// requests that arrived. Called before every `Ready` is built, so all proposals (and all
    /// reads) made since the last `Ready` go out together (batching).
    pub(crate) fn flush(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        for to in self.others() {
            while self.send_append(to, false) {}
        }
        if self.read_only.start_round().is_some() {
            self.broadcast_heartbeat();
        }
    }

    /// Whether `flush` would send anything.
    pub(crate) fn has_pending_sends(&self) -> bool {
        self.role == Role::Leader
            && (self.read_only.round_due
                || self
                    .progress
                    .values()
                    .any(|p| !p.is_paused(self.cfg.max_inflight_msgs) && p.next_index <= self.log.last_index()))
    }

    /// Sends one `Append` (or snapshot chunk) to `to`. Returns true if more could follow at once.
    fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let max_inflight = self.cfg.max_inflight_msgs;
        let pr = self.progress.get(&to).expect("progress for every follower");
        if pr.is_paused(max_inflight) {
            return false;
        }
        let next = pr.next_index;
        if next <= self.log.snapshot.meta.index {
            // The entries it needs are compacted: stream the snapshot instead (section 7). The
            // transfer keeps this snapshot even if the log is compacted again meanwhile.
            let snapshot = Arc::clone(&self.log.snapshot);
            let out = OutgoingSnapshot { stream: self.next_stream, checksum: snapshot.checksum(), snapshot };
            self.next_stream += 1;
            self.progress.get_mut(&to).expect("exists").become_snapshot(out);
            self.send_snapshot_chunk(to, 0);
            return false;
        }
        let last = self.log.last_index();
        if next > last && !allow_empty {
            return false;
        }
        let prev_index = next - 1;
        let prev_term = self.log.term(prev_index).expect("prev_index held");
        let entries = self.log.slice(next, last + 1, self.cfg.max_msg_bytes);
        let sent_last = entries.last().map(|e| e.index);
        let commit = self.log.committed;
        self.send(to, MessageBody::Append { prev_index, prev_term, entries, commit });
        let pr = self.progress.get_mut(&to).expect("exists");
        match pr.state {
            ProgressState::Replicate => {
                if let Some(l) = sent_last {
                    pr.next_index = l + 1;
                    pr.inflights.push_back(l);
                }
                sent_last.is_some() && pr.next_index <= last
            }
            ProgressState::Probe => {
                pr.probe_sent = true;
                false
            }
            ProgressState::Snapshot { .. } => unreachable!("paused"),
        }
    }

    /// Sends the chunk at `offset` of the transfer under way to `to`.
    fn send_snapshot_chunk(&mut self, to: NodeId, offset: u64) {
        let Some(out) = self.progress.get(&to).and_then(|p| p.outgoing.clone()) else { return };
        let snap = &out.snapshot;
        let len = snap.data.len() as u64;
        let offset = offset.min(len);
        let end = (offset + self.cfg.snapshot_chunk_bytes as u64).min(len);
        let body = MessageBody::Snapshot {
            meta: snap.meta,
            stream: out.stream,
            offset,
            data: snap.data[offset as usize..end as usize].to_vec(),
            done: end == len,
            checksum: out.checksum,
        };
        self.send(to, body);
    }

    /// Figure 2, rules for leaders: commit the highest index stored on a majority, but only by
    /// counting entries of the current term (section 5.4.2, Figure 8).
    fn maybe_commit(&mut self) -> bool {
        if self.role != Role::Leader {
            return false;
        }
        // The leader's own copy counts only as far as it is durable (see `Ready`).
        let (me, persisted) = (self.id, self.log.persisted);
        let progress = &self.progress;
        let matched = |id| if id == me { persisted } else { progress.get(&id).map_or(0, |p| p.match_index) };
        let candidate = self.conf.committed_index(&matched);
        if candidate > self.log.committed && self.log.term(candidate) == Some(self.term) {
            let had_committed_in_term = self.committed_in_term();
            let newly: usize = (self.log.committed + 1..=candidate)
                .filter_map(|i| self.log.entry(i))
                .filter(|e| e.term == self.term)
                .map(|e| e.data.len())
                .sum();
            self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(newly);
            self.log.commit_to(candidate);
            if !had_committed_in_term {
                for ctx in std::mem::take(&mut self.read_only.before_first_commit) {
                    self.start_read(ctx);
                }
            }
            self.after_commit();
            return true;
        }
        false
    }

    /// The driver persisted the log through `index` (whose entry has `term`): a leader counts
    /// its own copy from now on, which may commit entries.
    pub(crate) fn on_persisted(&mut self, index: Index, term: Term) {
        self.log.persisted_to(index, term);
        self.maybe_commit();
    }

    fn committed_in_term(&self) -> bool {
        self.log.term(self.log.committed) == Some(self.term)
    }

    // ---------------------------------------------------------------- ReadIndex

    pub(crate) fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        let limit = self.cfg.max_pending_reads;
        if self.read_only.len() >= limit {
            return Err(ProposeError::PendingReadsLimit { limit });
        }
        if !self.committed_in_term() {
            // Our commit index may lag the true one until our no-op commits (thesis 6.4 step 1).
            self.read_only.before_first_commit.push(ctx);
            return Ok(());
        }
        self.start_read(ctx);
        Ok(())
    }

    fn start_read(&mut self, ctx: Vec<u8>) {
        let index = self.log.committed;
        let me = self.id;
        if self.conf.has_quorum(&|id| id == me) {
            self.read_states.push(ReadState { index, ctx });
            return;
        }
        // The heartbeat round goes out with the next `Ready`, shared by every read until then.
        self.read_only.add(index, ctx);
    }

    // ---------------------------------------------------------------- transfer

    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if to == self.id || !self.progress.contains_key(&to) || !self.conf.voters.contains(&to) {
            return Ok(()); // nothing to do, or not a voter (the RawNode boundary rejects that)
        }
        let caught_up = self.progress[&to].match_index == self.log.last_index();
        if self.lead_transferee == Some(to) {
            // A retry: the transfer under way keeps its deadline (and check-quorum its clock,
            // which no transfer touches); only a lost TimeoutNow is worth sending again.
            if caught_up {
                self.send_timeout_now(to);
            }
            return Ok(());
        }
        self.lead_transferee = Some(to);
        self.transfer_elapsed = 0;
        if caught_up {
            self.send_timeout_now(to);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    fn send_timeout_now(&mut self, to: NodeId) {
        let last_index = self.log.last_index();
        self.send(to, MessageBody::TimeoutNow { last_index });
    }

    // ---------------------------------------------------------------- step

    pub(crate) fn step(&mut self, m: Message) {
        let leader_msg =
            matches!(m.body, MessageBody::Append { .. } | MessageBody::Heartbeat { .. } | MessageBody::Snapshot { .. });
        if m.term > self.term {
            if let MessageBody::Vote { transfer, .. } = m.body {
                let in_lease =
                    self.cfg.check_quorum && self.leader.is_some() && self.election_elapsed < self.cfg.election_ticks;
                if in_lease && !transfer {
                    // Leader lease: we heard from a live leader recently, so this candidate is
                    // disruptive (e.g. just rejoined after a partition). Ignore it.
                    return;
                }
            }
            match m.body {
                MessageBody::Vote { pre: true, .. } => {}
                MessageBody::VoteResponse { pre: true, granted: true } => {}
                _ => {
                    let leader = if leader_msg { Some(m.from) } else { None };
                    self.become_follower(m.term, leader);
                }
            }
        } else if m.term < self.term {
            if leader_msg && (self.cfg.check_quorum || self.cfg.pre_vote) {
                // A stale leader (or one cut off) learns our term and steps down.
                self.send(m.from, MessageBody::AppendResponse { index: 0, success: false, hint: None });
            } else if let MessageBody::Vote { pre: true, .. } = m.body {
                self.send(m.from, MessageBody::VoteResponse { pre: true, granted: false });
            }
            return;
        }

        match m.body {
            MessageBody::Vote { pre, last_index, last_term, .. } => {
                self.handle_vote(m.from, m.term, pre, last_index, last_term)
            }
            MessageBody::VoteResponse { pre, granted } => self.handle_vote_response(m.from, pre, granted),
            MessageBody::Append { prev_index, prev_term, entries, commit } => {
                self.become_follower_of(m.from);
                let conf_entries = entries.iter().any(|e| e.kind == EntryKind::ConfChange);
                self.handle_append(m.from, prev_index, prev_term, commit, entries);
                if conf_entries || self.log.term(self.conf_at.0) != Some(self.conf_at.1) {
                    // A configuration arrived, or the entry carrying ours was truncated.
                    self.refresh_conf();
                }
            }
            MessageBody::Heartbeat { commit, read_seq } => {
                self.become_follower_of(m.from);
                debug_assert!(commit <= self.log.last_index(), "heartbeat commit past our log");
                self.log.commit_to(commit.min(self.log.last_index()));
                self.send(m.from, MessageBody::HeartbeatResponse { read_seq });
            }
            MessageBody::Snapshot { meta, stream, offset, data, done, checksum } => {
                self.become_follower_of(m.from);
                let chunk = Chunk { meta, stream, offset, data, done, checksum };
                self.handle_snapshot_chunk(m.from, chunk);
            }
            MessageBody::TimeoutNow { last_index } => {
                // Honoured only while our log ends exactly where the leader's did when it sent
                // this: a leader that took proposals since has abandoned the transfer.
                let current = self.log.last_index() == last_index && self.log.last_term() == m.term;
                if self.role != Role::Leader && current {
                    self.campaign(Campaign::Transfer);
                }
            }
            MessageBody::AppendResponse { index, success, hint } => {
                if self.role == Role::Leader {
                    self.handle_append_response(m.from, index, success, hint);
                }
            }
            MessageBody::HeartbeatResponse { read_seq } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(m.from, read_seq);
                }
            }
            MessageBody::SnapshotResponse { index, stream, next_offset, done } => {
                if self.role == Role::Leader {
                    self.handle_snapshot_response(m.from, index, stream, next_offset, done);
                }
            }
        }
    }

    /// A message of the current term from a leader: follow it.
    fn become_follower_of(&mut self, leader: NodeId) {
        if self.role != Role::Follower {
            // Section 5.2: a candidate that hears from a leader of its term steps down.
            assert_ne!(self.role, Role::Leader, "two leaders in term {}", self.term);
            self.become_follower(self.term, Some(leader));
        }
        self.leader = Some(leader);
        self.election_elapsed = 0;
    }

    fn handle_vote(&mut self, from: NodeId, term: Term, pre: bool, last_index: Index, last_term: Term) {
        let can_vote =
            self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none()) || (pre && term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_index, last_term);
        if granted && !pre {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        // A granted pre-vote answers in the term the candidate would use, so it is not stale.
        let reply_term = if pre && granted { term } else { self.term };
        self.msgs.push(Message {
            from: self.id,
            to: from,
            term: reply_term,
            body: MessageBody::VoteResponse { pre, granted },
        });
    }

    fn handle_vote_response(&mut self, from: NodeId, pre: bool, granted: bool) {
        let expected = if pre { Role::PreCandidate } else { Role::Candidate };
        if self.role != expected {
            return;
        }
        self.votes.insert(from, granted);
        if self.poll_won() {
            if pre {
                self.campaign(Campaign::Election);
            } else {
                self.become_leader();
            }
        } else if self.poll_lost() {
            self.become_follower(self.term, None);
        }
    }

    fn handle_append(&mut self, from: NodeId, prev_index: Index, prev_term: Term, commit: Index, entries: Vec<Entry>) {
        if prev_index < self.log.snapshot.meta.index {
            // Already compacted here: everything up to our commit index matches the leader.
            let index = self.log.committed;
            self.send(from, MessageBody::AppendResponse { index, success: true, hint: None });
            return;
        }
        match self.log.maybe_append(prev_index, prev_term, commit, &entries) {
            Some(last_new) => {
                self.drop_stale_acks();
                self.send(from, MessageBody::AppendResponse { index: last_new, success: true, hint: None })
            }
            None => {
                let hint = self.log.reject_hint(prev_index);
                self.send(from, MessageBody::AppendResponse { index: prev_index, success: false, hint: Some(hint) });
            }
        }
    }

    /// Entries were dropped from our log (a new leader's conflicting entries, or a snapshot).
    /// An acknowledgement still queued for them (made in an earlier step, not yet sent since
    /// it waits for the next `Ready`'s persist) would vouch for entries that that persist no
    /// longer holds: drop it (it is as if lost; the leader asks again).
    fn drop_stale_acks(&mut self) {
        if let Some(from) = self.log.take_truncated() {
            self.msgs.retain(
                |m| !matches!(m.body, MessageBody::AppendResponse { success: true, index, .. } if index >= from),
            );
        }
    }

    fn handle_append_response(&mut self, from: NodeId, index: Index, success: bool, hint: Option<RejectHint>) {
        let Some(pr) = self.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        if !success {
            let Some(hint) = hint else { return };
            let next = self.log.next_after_reject(hint);
            let pr = self.progress.get_mut(&from).expect("exists");
            if pr.maybe_decrease_to(index, next) {
                self.send_append(from, false);
            }
            return;
        }
        if !pr.maybe_update(index) {
            return;
        }
        if pr.state == ProgressState::Probe {
            pr.become_replicate();
        }
        self.maybe_commit();
        if !self.conf.is_member(from) {
            // A departed member caught up with its removal: tell it, and stop tracking it.
            self.sync_progress();
            return;
        }
        if self.lead_transferee == Some(from) && self.progress[&from].match_index == self.log.last_index() {
            self.send_timeout_now(from);
        }
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, read_seq: u64) {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        pr.probe_sent = false;
        if pr.inflights.len() >= self.cfg.max_inflight_msgs {
            pr.inflights.pop_front();
        }
        match pr.state {
            ProgressState::Snapshot { acked_offset, .. } => {
                // A chunk may have been lost: resend from where the follower confirmed.
                self.send_snapshot_chunk(from, acked_offset);
            }
            _ if pr.match_index < last
                && (pr.inflights.is_empty() || pr.stalled_ticks >= 2 * self.cfg.heartbeat_ticks) =>
            {
                // The follower lags and nothing in flight is making progress: an Append was
                // probably lost. An Append at next_index makes the follower say where it is.
                // (With Appends still in flight we wait: on a network that reorders, this probe
                // could overtake them and cause a needless rejection and resend.)
                self.progress.get_mut(&from).expect("exists").stalled_ticks = 0;
                self.send_append(from, true);
            }
            _ => {}
        }
        if read_seq > 0 {
            for r in self.read_only.ack(from, read_seq, self.id, &self.conf) {
                self.read_states.push(ReadState { index: r.index, ctx: r.ctx });
            }
        }
    }

    fn handle_snapshot_chunk(&mut self, from: NodeId, c: Chunk) {
        let (term, stream) = (self.term, c.stream);
        if c.meta.index <= self.log.committed {
            // Stale: we already have all of it.
            self.incoming_snapshot = None;
            let index = self.log.committed;
            self.send(from, MessageBody::SnapshotResponse { index, stream, next_offset: 0, done: true });
            return;
        }
        if let Some(inc) = &self.incoming_snapshot
            && (inc.from, inc.term) == (from, term)
            && inc.stream > stream
        {
            return; // a delayed chunk of a transfer this leader has since replaced
        }
        let same_stream = |inc: &IncomingSnapshot| {
            (inc.from, inc.term, inc.stream, inc.meta, inc.checksum) == (from, term, stream, c.meta, c.checksum)
        };
        if c.offset == 0 && !self.incoming_snapshot.as_ref().is_some_and(same_stream) {
            self.incoming_snapshot =
                Some(IncomingSnapshot { from, term, stream, meta: c.meta, checksum: c.checksum, data: Vec::new() });
        }
        let next_offset = match &mut self.incoming_snapshot {
            Some(inc) if same_stream(inc) && inc.data.len() as u64 == c.offset => {
                inc.data.extend_from_slice(&c.data);
                inc.data.len() as u64
            }
            Some(inc) if same_stream(inc) => inc.data.len() as u64, // duplicate or out of order
            _ => 0,                                                 // another stream's chunk: never joined to ours
        };
        let index = c.meta.index;
        if !(c.done && next_offset == c.offset + c.data.len() as u64) {
            self.send(from, MessageBody::SnapshotResponse { index, stream, next_offset, done: false });
            return;
        }
        let inc = self.incoming_snapshot.take().expect("just filled");
        let snapshot = Snapshot { meta: inc.meta, data: inc.data };
        if snapshot.checksum() != inc.checksum {
            // Corrupted in transit: start the transfer over.
            self.send(from, MessageBody::SnapshotResponse { index, stream, next_offset: 0, done: false });
            return;
        }
        if self.log.match_term(index, snapshot.meta.term) {
            // We hold the entry the snapshot ends at, so our log already matches through it.
            self.log.commit_to(index);
        } else {
            if let Some(c) = snapshot.conf_state() {
                self.snap_conf = c;
            }
            self.log.restore(snapshot);
            self.drop_stale_acks();
            self.refresh_conf();
        }
        self.send(from, MessageBody::SnapshotResponse { index, stream, next_offset, done: true });
    }

    fn handle_snapshot_response(&mut self, from: NodeId, index: Index, stream: u64, next_offset: u64, done: bool) {
        let Some(pr) = self.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        let current = pr.outgoing.as_ref().is_some_and(|o| o.stream == stream);
        if done {
            pr.maybe_update(index);
            // The transfer under way ends when it is answered, or when the follower's log
            // already matches through its snapshot anyway.
            if let ProgressState::Snapshot { meta, .. } = pr.state
                && (current || pr.match_index >= meta.index)
            {
                pr.become_probe();
            }
            self.maybe_commit();
            return;
        }
        if let ProgressState::Snapshot { acked_offset, .. } = &mut pr.state {
            // Follow the offset the follower asks for: forward as chunks land, backward if it
            // lost its partial copy (it restarted, or the checksum failed). An answer repeating
            // the offset we already follow is a duplicate (a resent chunk): ignoring it keeps a
            // single chunk stream. Answers about other streams are not ours to follow.
            if current && next_offset != *acked_offset {
                *acked_offset = next_offset;
                self.send_snapshot_chunk(from, next_offset);
            }
        }
    }

    // ---------------------------------------------------------------- snapshots from the app

    /// The application's snapshot through `index`: the snapshot also carries the
    /// configuration in effect there.
    pub(crate) fn compact(&mut self, index: Index, data: Vec<u8>) -> Snapshot {
        let conf = self.conf_at_index(index);
        let snapshot = self.log.compact(index, &conf, &data);
        self.snap_conf = conf;
        self.refresh_conf();
        snapshot
    }

    /// [`Raft::compact`] with a snapshot the application built (see `RawNode::compact_to`).
    pub(crate) fn compact_to(&mut self, snapshot: std::sync::Arc<Snapshot>, conf: ConfState) -> crate::log::Compacted {
        let dropped = self.log.compact_to(snapshot);
        self.snap_conf = conf;
        self.refresh_conf();
        dropped
    }

    // ---------------------------------------------------------------- invariants

    /// Panics if an invariant does not hold. Run after every input in debug builds.
    pub(crate) fn check_invariants(&self) {
        self.log.check_invariants();
        self.read_only.check_invariants();
        if self.role != Role::Leader {
            assert_eq!(self.uncommitted_bytes, 0, "uncommitted bytes counted off the leader");
            assert!(self.lead_transferee.is_none(), "a transfer under way off the leader");
        }
        for (id, p) in &self.progress {
            let streaming = matches!(p.state, ProgressState::Snapshot { .. });
            assert_eq!(streaming, p.outgoing.is_some(), "snapshot state and transfer out of step for {id}");
        }
        match self.role {
            Role::Leader => {
                assert_eq!(self.leader, Some(self.id), "a leader knows it leads");
                assert_eq!(self.vote, Some(self.id), "a leader voted for itself");
                for id in self.conf.members() {
                    assert!(id == self.id || self.progress.contains_key(&id), "no progress for member {id}");
                }
                if self.log.committed >= self.conf_at.0 {
                    assert!(self.is_voter(), "a leader outside its committed configuration");
                }
                for (id, p) in &self.progress {
                    assert!(p.match_index < p.next_index, "match {} >= next {} for {id}", p.match_index, p.next_index);
                    assert!(p.match_index <= self.log.last_index(), "follower {id} matches past our log");
                }
            }
            Role::Candidate => assert_eq!(self.vote, Some(self.id), "a candidate voted for itself"),
            Role::Follower | Role::PreCandidate => assert!(self.progress.is_empty(), "only leaders track progress"),
        }
        self.conf.check_invariants();
        if self.conf_at.0 > self.log.snapshot.meta.index {
            let e = self.log.entry(self.conf_at.0).expect("the configuration entry is held");
            assert_eq!((e.term, entry_conf(e).as_ref()), (self.conf_at.1, Some(&self.conf)), "configuration stale");
            assert!(
                self.log.entries().filter(|x| x.index > e.index).all(|x| x.kind != EntryKind::ConfChange),
                "a later configuration entry is not in effect"
            );
        } else {
            assert_eq!(self.conf, self.snap_conf, "configuration differs from the snapshot's");
        }
        if matches!(self.role, Role::PreCandidate | Role::Candidate) {
            assert!(self.is_voter(), "a non-voter campaigns");
        }
    }
}
