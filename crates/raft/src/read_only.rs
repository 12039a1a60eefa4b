//! ReadIndex bookkeeping (thesis section 6.4): a read is safe at the commit index recorded when
//! it arrived, once a majority has answered a heartbeat sent after it arrived.

use std::collections::{BTreeMap, VecDeque};

use crate::types::{Index, NodeId};

/// A read waiting for its heartbeat round.
#[derive(Clone, Debug)]
pub(crate) struct PendingRead {
    /// Heartbeat round that confirms it.
    pub seq: u64,
    /// Commit index when it arrived.
    pub index: Index,
    /// The caller's identifier.
    pub ctx: Vec<u8>,
}

/// Reads in flight on a leader.
///
/// Invariant: `pending` is ordered by `seq`, and every `seq <= self.seq`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadOnly {
    /// Latest heartbeat round started.
    pub seq: u64,
    /// Reads waiting for their round to be acknowledged by a majority.
    pub pending: VecDeque<PendingRead>,
    /// Highest round each follower has answered.
    pub acked: BTreeMap<NodeId, u64>,
    /// Reads that came before the leader committed an entry of its own term.
    pub before_first_commit: Vec<Vec<u8>>,
}

impl ReadOnly {
    /// Starts a new round for a read at `index`; returns the round to put in heartbeats.
    pub fn add(&mut self, index: Index, ctx: Vec<u8>) -> u64 {
        self.seq += 1;
        self.pending.push_back(PendingRead { seq: self.seq, index, ctx });
        self.seq
    }

    /// Records `from`'s answer and returns the reads that became safe, oldest first.
    /// `quorum` counts the leader itself.
    pub fn ack(&mut self, from: NodeId, seq: u64, quorum: usize) -> Vec<PendingRead> {
        let e = self.acked.entry(from).or_insert(0);
        *e = (*e).max(seq);
        let mut safe = Vec::new();
        while let Some(front) = self.pending.front() {
            let acks = 1 + self.acked.values().filter(|&&s| s >= front.seq).count();
            if acks < quorum {
                break;
            }
            safe.push(self.pending.pop_front().expect("front exists"));
        }
        safe
    }
}
