//! Safety properties of Raft (Figure 3), checked beside the cluster after every event.
//!
//! - Election Safety: at most one leader per term.
//! - Log Matching: two logs with an entry of the same index and term are identical up to it.
//!   Checked incrementally with a hash chain: the hash at index i covers every entry up to i, so
//!   one (index, term) must always map to one chain hash, whichever node holds it.
//! - Leader Completeness: a new leader holds every entry anyone has applied.
//! - State Machine Safety: no two nodes apply different entries at one index.
//! - Membership (thesis chapter 4): every leader was elected by a quorum of the configuration
//!   it held (both majorities when joint; never counting a learner); and the configurations
//!   each node applies, in log order from its snapshot's, only ever change by one legal step:
//!   learners alone, entering the joint state from the voters in effect, or leaving it.

use std::collections::{BTreeMap, BTreeSet};

use sixfive_raft::{ConfState, Entry, EntryKind, Index, NodeId, RaftLog, Term};

/// Hash chain of one node's log: index -> hash of the log through that index.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    hashes: BTreeMap<Index, u64>,
}

fn mix(prev: u64, e: &Entry) -> u64 {
    let mut h = prev ^ 0xcbf2_9ce4_8422_2325;
    let kind = match e.kind {
        EntryKind::Normal => 1u8,
        EntryKind::Noop => 2,
        EntryKind::ConfChange => 3,
    };
    for b in e.term.to_le_bytes().iter().chain(e.index.to_le_bytes().iter()).chain([kind].iter()).chain(e.data.iter()) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Global record of what has been seen, and the checks.
#[derive(Clone, Debug, Default)]
pub struct Checker {
    leaders: BTreeMap<Term, NodeId>,
    chain_at: BTreeMap<(Index, Term), u64>,
    applied: BTreeMap<Index, Entry>,
    /// For each applied index, a term at least that of the leader that committed it: the
    /// term of the first node seen applying it (a node learns of a commit only from a leader
    /// of its own term, or by leading).
    committed_by: BTreeMap<Index, Term>,
    chains: BTreeMap<NodeId, Chain>,
    /// Votes granted (and made durable), by (term, candidate).
    votes: BTreeMap<(Term, NodeId), BTreeSet<NodeId>>,
    /// The configuration each node's state machine has reached, applying in order.
    applied_conf: BTreeMap<NodeId, ConfState>,
}

impl Checker {
    /// Election Safety, and Leader Completeness for a node that just became leader: it holds
    /// every entry committed in an earlier term. (An election can finish late, after a later
    /// term has committed more: such entries need not be in this leader's log.)
    ///
    /// Also: its votes form a quorum of `conf`, the configuration it holds.
    pub fn on_leader(&mut self, id: NodeId, term: Term, log: &RaftLog, conf: &ConfState) {
        match self.leaders.get(&term) {
            Some(&other) => assert_eq!(other, id, "two leaders in term {term}: {other} and {id}"),
            None => {
                self.leaders.insert(term, id);
                let granted = self.votes.get(&(term, id)).cloned().unwrap_or_default();
                assert!(
                    conf.has_quorum(&|v| v == id || granted.contains(&v)),
                    "leader {id} of term {term} elected without a quorum of {conf:?}: votes {granted:?}"
                );
                let base = log.snapshot().meta.index;
                for (&i, e) in self.applied.range(base + 1..) {
                    if self.committed_by[&i] >= term {
                        continue;
                    }
                    assert_eq!(
                        log.term(i),
                        Some(e.term),
                        "leader {id} of term {term} lacks applied entry {i} (Leader Completeness)"
                    );
                }
            }
        }
    }

    /// The node persisted `entries` (which replace anything at or after the first).
    pub fn on_entries(&mut self, id: NodeId, entries: &[Entry], log: &RaftLog) {
        let Some(first) = entries.first() else { return };
        let prev_index = first.index - 1;
        let prev_term = log.term(prev_index);
        let chain = self.chains.entry(id).or_default();
        chain.hashes.split_off(&first.index);
        let mut h = if prev_index == 0 {
            0
        } else if let Some(&h) = chain.hashes.get(&prev_index) {
            h
        } else {
            let t = prev_term.expect("entry before an append is held");
            *self.chain_at.get(&(prev_index, t)).expect("snapshot point was seen before")
        };
        for e in entries {
            h = mix(h, e);
            chain.hashes.insert(e.index, h);
            let seen = *self.chain_at.entry((e.index, e.term)).or_insert(h);
            assert_eq!(seen, h, "Log Matching violated at index {} term {} on node {id}", e.index, e.term);
        }
    }

    /// The node's log now starts after a snapshot ending at (index, term).
    pub fn on_snapshot(&mut self, id: NodeId, index: Index, term: Term) {
        let chain = self.chains.entry(id).or_default();
        chain.hashes.clear();
        if index > 0 {
            let h = *self.chain_at.get(&(index, term)).expect("a snapshot point some node once held");
            chain.hashes.insert(index, h);
        }
    }

    /// The node compacted its log through `index`: forget older hashes (memory stays bounded).
    pub fn on_compact(&mut self, id: NodeId, index: Index) {
        let chain = self.chains.entry(id).or_default();
        chain.hashes = chain.hashes.split_off(&index);
    }

    /// The node restarted from its disk: rebuild its chain from the log it restored.
    pub fn on_restart(&mut self, id: NodeId, log: &RaftLog) {
        let meta = log.snapshot().meta;
        self.on_snapshot(id, meta.index, meta.term);
        let entries: Vec<Entry> = log.entries().cloned().collect();
        self.on_entries(id, &entries, log);
    }

    /// Node `voter` granted its vote to `candidate` in `term` (the grant is durable).
    pub fn on_vote(&mut self, voter: NodeId, candidate: NodeId, term: Term) {
        self.votes.entry((term, candidate)).or_default().insert(voter);
    }

    /// Node `id`'s state machine starts over from a snapshot (or from nothing) whose
    /// configuration is `conf`.
    pub fn on_install(&mut self, id: NodeId, conf: ConfState) {
        self.applied_conf.insert(id, conf);
    }

    /// State Machine Safety: `e` is applied by `id`.
    /// Node `id`, now in term `term`, applied `e`.
    pub fn on_apply(&mut self, id: NodeId, term: Term, e: &Entry) {
        if e.kind == EntryKind::ConfChange {
            let next = ConfState::decode(&e.data).expect("configuration entries decode");
            next.check_invariants();
            // (A node that joined with no configuration starts checking at its first one.)
            if let Some(prev) = self.applied_conf.get(&id).filter(|p| !p.voters.is_empty()) {
                let learners_only = !prev.is_joint() && !next.is_joint() && next.voters == prev.voters;
                let enter = !prev.is_joint() && next.voters_outgoing == prev.voters;
                let leave = prev.is_joint() && !next.is_joint() && next.voters == prev.voters;
                assert!(
                    learners_only || enter || leave,
                    "node {id} applied an illegal configuration step at index {}: {prev:?} -> {next:?}",
                    e.index
                );
            }
            self.applied_conf.insert(id, next);
        }
        match self.applied.get(&e.index) {
            Some(prev) => assert_eq!(prev, e, "node {id} applied a different entry at index {}", e.index),
            None => {
                self.applied.insert(e.index, e.clone());
                self.committed_by.insert(e.index, term);
            }
        }
    }

    /// Entries applied anywhere, by index.
    pub fn applied(&self) -> &BTreeMap<Index, Entry> {
        &self.applied
    }

    /// Leaders seen, by term.
    pub fn leaders(&self) -> &BTreeMap<Term, NodeId> {
        &self.leaders
    }
}
