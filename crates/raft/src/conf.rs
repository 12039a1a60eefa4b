//! Cluster membership: who votes, who only learns, and how the set changes (thesis chapter 4).
//!
//! # The rules, and why they are safe
//!
//! A configuration ([`ConfState`]) is carried by a log entry of kind [`EntryKind::ConfChange`]
//! whose data is the *whole* resulting configuration (not a delta), and by every snapshot (see
//! [`Snapshot::conf_state`]).
//!
//! 1. **A configuration takes effect when its entry is appended, committed or not** (thesis
//!    section 4.1): every node uses the latest configuration in its log, or the one in its
//!    snapshot if the log after it holds none, or the bootstrap voters of [`crate::Config`] if
//!    neither does. A node whose log loses that entry (a new leader truncates it) falls back to
//!    the previous configuration in its log at once: the change is rolled back. Because the
//!    configuration follows the log and not the commit index, a restarted node that lost its
//!    commit index (it is not synced on its own) still uses the right configuration.
//! 2. **Voter changes go through joint consensus** (thesis section 4.3): the leader appends
//!    `C_old,new` (voters = new, `voters_outgoing` = old); while a node's configuration is joint,
//!    an election needs a majority of the old voters *and* of the new, and so does commitment
//!    (and check-quorum and ReadIndex). Once `C_old,new` is committed the leader appends
//!    `C_new` on its own (leaving the joint state is automatic). Safety: at every moment, every
//!    quorum a node may use intersects every quorum another node may use. While `C_old,new`
//!    is uncommitted, nodes use `C_old` or `C_old,new`, and both need a majority of `C_old`. Once
//!    it is committed, a majority of `C_old` holds it, so no node lacking it can be elected
//!    (its log is behind a voter it needs); nodes then use `C_old,new` or `C_new`, and both need
//!    a majority of `C_new`. `C_new` is only appended after `C_old,new` commits.
//! 3. **Changes that touch only learners take effect directly**: learners count in no quorum,
//!    so every quorum before the change is a quorum after it.
//! 4. **One change at a time, and not before the leader has committed an entry of its own
//!    term**: a leader refuses a new change while its latest configuration is uncommitted or
//!    joint, and until its term's no-op is committed. The second rule closes the hole found
//!    in single-server changes (Ongaro, raft-dev, 2015): a leader could otherwise build a
//!    change on a configuration that a concurrent, uncommitted change of an earlier term had
//!    already replaced on other nodes.
//! 5. **Learners** receive entries and snapshots but never campaign, and their votes and
//!    acknowledgements are never counted: only the members of [`ConfState::voters`] and
//!    [`ConfState::voters_outgoing`] make quorums. (Like etcd, a learner still *answers* a vote
//!    request on the log check alone: the candidate may already know it as a voter. The
//!    candidate counts the answer only if its configuration says so.) A learner becomes a
//!    voter only once it has caught up with the leader: the leader refuses
//!    [`ConfChange::Promote`] of a lagging learner with [`ConfChangeError::LearnerBehind`].
//! 6. **Removal**: a leader that is not a voter of `C_new` keeps leading (without counting
//!    itself) until `C_new` is committed, then steps down, handing leadership to an
//!    up-to-date voter with `TimeoutNow`. A node that is a member of no configuration it
//!    knows of is *removed* ([`crate::Status::removed`]) and never campaigns.

use serde::{Deserialize, Serialize};

use crate::types::{EntryKind, Index, NodeId, Snapshot};

/// Who votes and who learns. Lists are sorted and without duplicates; `learners` shares no id
/// with `voters` or `voters_outgoing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfState {
    /// The voters (in a joint configuration: the incoming voters, `C_new`).
    pub voters: Vec<NodeId>,
    /// In a joint configuration the outgoing voters (`C_old`); empty otherwise.
    pub voters_outgoing: Vec<NodeId>,
    /// Members that receive the log but never vote or count.
    pub learners: Vec<NodeId>,
    /// The application's bytes that travel with the configuration and follow its rules (in
    /// effect on append, rolled back with it, kept in snapshots, recovered on restart): what
    /// etcd puts in a `ConfChangeV2`'s context. The servers keep their member directory here
    /// (each member's name and peer address), so that every node knows how to reach every
    /// member of the configuration it uses. Opaque to the core; a change keeps it unless its
    /// proposer gives a new one ([`crate::RawNode::propose_conf_change_with_context`]).
    #[serde(with = "crate::bytes")]
    pub context: Vec<u8>,
}

/// The layout of configurations written before they carried a context (still read back).
#[derive(Deserialize)]
struct ConfStateV1 {
    voters: Vec<NodeId>,
    voters_outgoing: Vec<NodeId>,
    learners: Vec<NodeId>,
}

/// One step of a configuration change, proposed with [`crate::RawNode::propose_conf_change`].
/// Several steps proposed together form one change (e.g. a replacement:
/// `[Promote(new), Remove(old)]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChange {
    /// A new member that receives the log but does not vote (a new server starts so).
    AddLearner(NodeId),
    /// A learner becomes a voter; refused while it lags the leader.
    Promote(NodeId),
    /// A voter or learner leaves the cluster.
    Remove(NodeId),
}

/// Why a configuration change was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChangeError {
    /// Only the leader takes changes; `leader` is who this node believes leads, if anyone.
    NotLeader {
        /// Best guess of the current leader.
        leader: Option<NodeId>,
    },
    /// The leader is handing leadership over.
    TransferInProgress,
    /// An earlier change is not finished (uncommitted or still joint), or this leader has not
    /// committed an entry of its term yet. Retry shortly.
    ChangeInProgress,
    /// The learner to promote has not caught up with the leader's log yet. Retry later.
    LearnerBehind {
        /// The learner.
        id: NodeId,
        /// What the leader knows it holds.
        match_index: Index,
        /// What it must hold.
        needed: Index,
    },
    /// The change makes no sense for the current configuration (never retryable as is).
    Invalid(String),
}

impl ConfChangeError {
    /// Whether the same change may succeed later (here or at another node).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ConfChangeError::Invalid(_))
    }
}

impl std::fmt::Display for ConfChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfChangeError::NotLeader { leader: Some(l) } => write!(f, "not the leader; try node {l}"),
            ConfChangeError::NotLeader { leader: None } => write!(f, "not the leader; no leader known, retry later"),
            ConfChangeError::TransferInProgress => write!(f, "leadership transfer in progress; retry shortly"),
            ConfChangeError::ChangeInProgress => write!(f, "a configuration change is in progress; retry shortly"),
            ConfChangeError::LearnerBehind { id, match_index, needed } => {
                write!(f, "learner {id} holds the log up to {match_index}, needs {needed}; retry once it catches up")
            }
            ConfChangeError::Invalid(s) => write!(f, "invalid configuration change: {s}"),
        }
    }
}
impl std::error::Error for ConfChangeError {}

/// Majority of a set that must hold for `ok`; an empty set never has one.
fn majority(set: &[NodeId], ok: &dyn Fn(NodeId) -> bool) -> bool {
    set.iter().filter(|&&id| ok(id)).count() > set.len() / 2
}

/// Largest index held by a majority of `set`, by `matched`.
fn majority_index(set: &[NodeId], matched: &dyn Fn(NodeId) -> Index) -> Index {
    if set.is_empty() {
        return 0;
    }
    let mut m: Vec<Index> = set.iter().map(|&id| matched(id)).collect();
    m.sort_unstable_by(|a, b| b.cmp(a));
    m[set.len() / 2]
}

/// Outcome of an election so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteResult {
    Won,
    Lost,
    Pending,
}

impl ConfState {
    /// A configuration of `voters` alone.
    pub fn with_voters(mut voters: Vec<NodeId>) -> ConfState {
        voters.sort_unstable();
        voters.dedup();
        ConfState { voters, voters_outgoing: Vec::new(), learners: Vec::new(), context: Vec::new() }
    }

    /// Whether this is the joint configuration `C_old,new`.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Whether `id` votes (in either half of a joint configuration).
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// Whether `id` is a voter or a learner.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every voter of either half, sorted.
    pub fn all_voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.voters.iter().chain(self.voters_outgoing.iter()).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every member, sorted.
    pub fn members(&self) -> Vec<NodeId> {
        let mut v = self.all_voters();
        v.extend(self.learners.iter().copied());
        v.sort_unstable();
        v
    }

    /// Whether the nodes for which `ok` holds form a quorum: a majority of `voters`, and in a
    /// joint configuration also a majority of `voters_outgoing`.
    pub fn has_quorum(&self, ok: &dyn Fn(NodeId) -> bool) -> bool {
        majority(&self.voters, ok) && (!self.is_joint() || majority(&self.voters_outgoing, ok))
    }

    /// Largest index a quorum holds, given what each voter holds.
    pub fn committed_index(&self, matched: &dyn Fn(NodeId) -> Index) -> Index {
        let incoming = majority_index(&self.voters, matched);
        if self.is_joint() { incoming.min(majority_index(&self.voters_outgoing, matched)) } else { incoming }
    }

    /// Election outcome given the answers so far (`Some(true)` granted, `Some(false)` refused).
    pub(crate) fn vote_result(&self, answer: &dyn Fn(NodeId) -> Option<bool>) -> VoteResult {
        let one = |set: &[NodeId]| {
            let yes = set.iter().filter(|&&id| answer(id) == Some(true)).count();
            let no = set.iter().filter(|&&id| answer(id) == Some(false)).count();
            let need = set.len() / 2 + 1;
            if yes >= need {
                VoteResult::Won
            } else if set.len() - no < need {
                VoteResult::Lost
            } else {
                VoteResult::Pending
            }
        };
        let a = one(&self.voters);
        let b = if self.is_joint() { one(&self.voters_outgoing) } else { VoteResult::Won };
        match (a, b) {
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            _ => VoteResult::Pending,
        }
    }

    /// The configuration after `changes` (which must be applied to a non-joint configuration):
    /// joint when the voters change, direct when only learners do.
    pub fn apply(&self, changes: &[ConfChange]) -> Result<ConfState, ConfChangeError> {
        let invalid = |s: String| Err(ConfChangeError::Invalid(s));
        if self.is_joint() {
            return Err(ConfChangeError::ChangeInProgress);
        }
        if changes.is_empty() {
            return invalid("no change given".into());
        }
        let mut voters = self.voters.clone();
        let mut learners = self.learners.clone();
        for c in changes {
            match *c {
                ConfChange::AddLearner(0) | ConfChange::Promote(0) | ConfChange::Remove(0) => {
                    return invalid("node id 0 is reserved".into());
                }
                ConfChange::AddLearner(id) => {
                    if voters.contains(&id) || learners.contains(&id) || self.is_member(id) {
                        return invalid(format!("node {id} is already a member"));
                    }
                    learners.push(id);
                }
                ConfChange::Promote(id) => {
                    if !learners.contains(&id) {
                        return invalid(format!("node {id} is not a learner (add it as a learner first)"));
                    }
                    learners.retain(|&l| l != id);
                    voters.push(id);
                }
                ConfChange::Remove(id) => {
                    if !voters.contains(&id) && !learners.contains(&id) {
                        return invalid(format!("node {id} is not a member"));
                    }
                    voters.retain(|&v| v != id);
                    learners.retain(|&l| l != id);
                }
            }
        }
        if voters.is_empty() {
            return invalid("the change would leave no voter".into());
        }
        voters.sort_unstable();
        learners.sort_unstable();
        let outgoing = if voters != self.voters { self.voters.clone() } else { Vec::new() };
        if learners.iter().any(|l| outgoing.contains(l)) {
            return invalid("a voter cannot become a learner in one change (remove it, then add it)".into());
        }
        Ok(ConfState { voters, voters_outgoing: outgoing, learners, context: self.context.clone() })
    }

    /// The configuration that leaves the joint state: the incoming voters alone.
    pub fn leave_joint(&self) -> ConfState {
        ConfState {
            voters: self.voters.clone(),
            voters_outgoing: Vec::new(),
            learners: self.learners.clone(),
            context: self.context.clone(),
        }
    }

    /// Encodes this configuration as the data of an [`EntryKind::ConfChange`] entry.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("configurations encode")
    }

    /// Decodes the data of an [`EntryKind::ConfChange`] entry (also one written before
    /// configurations carried a context: its context is empty).
    pub fn decode(data: &[u8]) -> Option<ConfState> {
        postcard::from_bytes(data).ok().or_else(|| {
            let v1: ConfStateV1 = postcard::from_bytes(data).ok()?;
            Some(ConfState {
                voters: v1.voters,
                voters_outgoing: v1.voters_outgoing,
                learners: v1.learners,
                context: Vec::new(),
            })
        })
    }

    /// Panics unless the lists are sorted, distinct and learners are not voters.
    pub fn check_invariants(&self) {
        for l in [&self.voters, &self.voters_outgoing, &self.learners] {
            assert!(l.windows(2).all(|w| w[0] < w[1]), "configuration list not sorted and distinct: {self:?}");
        }
        assert!(self.learners.iter().all(|l| !self.is_voter(*l)), "a learner is also a voter: {self:?}");
    }
}

/// The configuration an entry carries, if it is a configuration entry.
pub(crate) fn entry_conf(e: &crate::types::Entry) -> Option<ConfState> {
    if e.kind != EntryKind::ConfChange {
        return None;
    }
    Some(ConfState::decode(&e.data).expect("configuration entries hold a ConfState"))
}

const MAGIC: &[u8; 8] = b"6f-conf\x01";

impl Snapshot {
    /// A snapshot whose data carries `conf` (the configuration in effect at `meta.index`)
    /// ahead of the application's bytes. Read them back with [`Snapshot::conf_state`] and
    /// [`Snapshot::app_data`].
    ///
    /// The layout (an 8-byte magic, the configuration's length, its bytes, their CRC32C, then
    /// the application's bytes) lives inside `data` so that stores that persist a snapshot as
    /// `meta` and `data` keep it whole without knowing about configurations.
    pub fn with_conf(meta: crate::types::SnapshotMeta, conf: &ConfState, app_data: &[u8]) -> Snapshot {
        let mut data = Snapshot::conf_prefix(conf);
        data.extend_from_slice(app_data);
        Snapshot { meta, data }
    }

    /// The start of a snapshot's `data` that carries `conf`: append the application's bytes
    /// to it and the result is what [`Snapshot::with_conf`] builds, without copying them.
    pub fn conf_prefix(conf: &ConfState) -> Vec<u8> {
        let c = conf.encode();
        let mut data = Vec::with_capacity(16 + c.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&(c.len() as u32).to_le_bytes());
        data.extend_from_slice(&c);
        data.extend_from_slice(&crc32c::crc32c(&c).to_le_bytes());
        data
    }

    fn split_conf(&self) -> Option<(ConfState, usize)> {
        let d = &self.data;
        if d.len() < 16 || &d[..8] != MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")) as usize;
        let end = 12usize.checked_add(len)?;
        if d.len() < end + 4 {
            return None;
        }
        let c = &d[12..end];
        let crc = u32::from_le_bytes(d[end..end + 4].try_into().expect("4 bytes"));
        if crc32c::crc32c(c) != crc {
            return None;
        }
        Some((ConfState::decode(c)?, end + 4))
    }

    /// The configuration in effect at the snapshot's index, if the snapshot carries one (every
    /// snapshot the core makes does; one built as a bare `Snapshot { meta, data }` does not).
    pub fn conf_state(&self) -> Option<ConfState> {
        self.split_conf().map(|(c, _)| c)
    }

    /// The application's bytes: `data` without the configuration header, if any.
    pub fn app_data(&self) -> &[u8] {
        match self.split_conf() {
            Some((_, at)) => &self.data[at..],
            None => &self.data,
        }
    }
}
