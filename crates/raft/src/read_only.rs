//! ReadIndex bookkeeping (thesis section 6.4): a read is safe at the commit index recorded when
//! it arrived, once a majority has answered a heartbeat sent after it arrived.
//!
//! Reads that arrive between two `Ready`s share one heartbeat round (batching): they wait for
//! round `seq + 1`, which the leader starts when it builds the next `Ready`.

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
/// Invariants: `pending` is ordered by `seq`; every `seq <= self.seq + 1`, and a read waits for
/// round `self.seq + 1` (not sent yet) exactly when `round_due`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadOnly {
    /// Latest heartbeat round sent.
    pub seq: u64,
    /// Reads are waiting for round `seq + 1`, which has not been sent.
    pub round_due: bool,
    /// Reads waiting for their round to be acknowledged by a majority.
    pub pending: VecDeque<PendingRead>,
    /// Highest round each follower has answered.
    pub acked: BTreeMap<NodeId, u64>,
    /// Reads that came before the leader committed an entry of its own term.
    pub before_first_commit: Vec<Vec<u8>>,
}

impl ReadOnly {
    /// Queues a read at `index` for the next round (see [`ReadOnly::start_round`]).
    pub fn add(&mut self, index: Index, ctx: Vec<u8>) {
        self.pending.push_back(PendingRead { seq: self.seq + 1, index, ctx });
        self.round_due = true;
    }

    /// Starts the round the queued reads wait for, if any: the round to put in heartbeats.
    pub fn start_round(&mut self) -> Option<u64> {
        if !self.round_due {
            return None;
        }
        self.round_due = false;
        self.seq += 1;
        Some(self.seq)
    }

    /// Reads held, answered or not yet started.
    pub fn len(&self) -> usize {
        self.pending.len() + self.before_first_commit.len()
    }

    /// Records `from`'s answer to round `seq` and returns the reads that became safe, oldest
    /// first. `quorum` counts the leader itself.
    pub fn ack(&mut self, from: NodeId, seq: u64, quorum: usize) -> Vec<PendingRead> {
        if seq > self.seq {
            return Vec::new(); // an answer to a round this leader never sent: not ours to count
        }
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

    /// Panics if an invariant listed on the struct does not hold.
    pub fn check_invariants(&self) {
        let mut prev = 0;
        for r in &self.pending {
            assert!(r.seq >= prev, "pending reads out of round order");
            assert!(r.seq <= self.seq + 1, "read waits for round {} past the next ({})", r.seq, self.seq + 1);
            prev = r.seq;
        }
        assert_eq!(self.round_due, self.pending.back().is_some_and(|r| r.seq == self.seq + 1), "round_due out of step");
    }
}
