//! What a leader knows about each follower's log (Figure 2's nextIndex/matchIndex, plus flow
//! control as in etcd-io/raft `tracker/progress.go` and `tracker/inflights.go`).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::types::{Index, Snapshot, SnapshotMeta};

/// A snapshot being streamed to one follower. The leader keeps sending this very snapshot until
/// the transfer ends, however often it compacts its own log meanwhile (as etcd and raft-rs do).
#[derive(Clone)]
pub(crate) struct OutgoingSnapshot {
    /// The transfer's identity, unique among this leader's transfers.
    pub stream: u64,
    /// What is sent.
    pub snapshot: Arc<Snapshot>,
    /// [`Snapshot::checksum`] of it.
    pub checksum: u32,
}

impl std::fmt::Debug for OutgoingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingSnapshot")
            .field("stream", &self.stream)
            .field("meta", &self.snapshot.meta)
            .field("bytes", &self.snapshot.data.len())
            .finish()
    }
}

/// How the leader is sending to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Unknown match: one `Append` at a time until one succeeds.
    Probe,
    /// Matching log: entries are streamed optimistically, up to the in-flight window.
    Replicate,
    /// The follower needs entries that were compacted: a snapshot is being streamed.
    Snapshot {
        /// Which snapshot.
        meta: SnapshotMeta,
        /// Bytes the follower has confirmed.
        acked_offset: u64,
    },
}

/// The leader's view of one follower.
///
/// Invariants: `match_index < next_index` (Figure 2: nextIndex starts past matchIndex); the
/// state is `Snapshot` exactly when a snapshot is being streamed (`outgoing` is set).
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log.
    pub match_index: Index,
    /// Next index to send.
    pub next_index: Index,
    /// Sending mode.
    pub state: ProgressState,
    /// In `Probe`: an `Append` is out and no answer came yet.
    pub probe_sent: bool,
    /// In `Replicate`: last index of each `Append` not yet acknowledged, oldest first.
    pub inflights: VecDeque<Index>,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Ticks since `match_index` last advanced while Appends were in flight; when this grows
    /// past two heartbeats the in-flight Appends are presumed lost.
    pub stalled_ticks: u32,
    /// In `Snapshot`: the transfer under way.
    pub(crate) outgoing: Option<OutgoingSnapshot>,
}

impl Progress {
    pub(crate) fn new(next_index: Index) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: VecDeque::new(),
            recent_active: false,
            stalled_ticks: 0,
            outgoing: None,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        if let ProgressState::Snapshot { meta, .. } = self.state {
            self.next_index = self.match_index.max(meta.index) + 1;
        } else {
            self.next_index = self.match_index + 1;
        }
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflights.clear();
        self.outgoing = None;
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.stalled_ticks = 0;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflights.clear();
        self.outgoing = None;
    }

    pub(crate) fn become_snapshot(&mut self, out: OutgoingSnapshot) {
        self.state = ProgressState::Snapshot { meta: out.snapshot.meta, acked_offset: 0 };
        self.probe_sent = false;
        self.inflights.clear();
        self.outgoing = Some(out);
    }

    /// Whether the leader should hold back `Append`s to this follower.
    pub(crate) fn is_paused(&self, max_inflight: usize) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.len() >= max_inflight,
            ProgressState::Snapshot { .. } => true,
        }
    }

    /// A successful `Append` answer for `index`; false if it was stale.
    pub(crate) fn maybe_update(&mut self, index: Index) -> bool {
        let updated = self.match_index < index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
            self.stalled_ticks = 0;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflights.front().is_some_and(|&i| i <= index) {
            self.inflights.pop_front();
        }
        updated
    }

    /// A rejected `Append` for `rejected` (its prev index); `hint_next` is where the follower
    /// suggests to retry. Returns false if the rejection was stale.
    pub(crate) fn maybe_decrease_to(&mut self, rejected: Index, hint_next: Index) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected <= self.match_index {
                    return false; // an answer to something older than what already matched
                }
                self.become_probe();
                self.next_index = hint_next.min(rejected).max(self.match_index + 1);
                true
            }
            ProgressState::Probe => {
                if self.next_index == 0 || self.next_index - 1 != rejected {
                    return false; // not the answer to the probe we are waiting for
                }
                self.next_index = hint_next.min(rejected).max(self.match_index + 1);
                self.probe_sent = false;
                true
            }
            ProgressState::Snapshot { .. } => false,
        }
    }
}
