//! The replicated log as one node holds it: a snapshot followed by entries, and the cursors that
//! say how far the log is committed, persisted and applied.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::types::{Entry, Index, RejectHint, Snapshot, SnapshotMeta, Term};

/// What a compaction dropped from the log: the entries the snapshot covers and the snapshot
/// it replaced. Freeing them can take long (hundreds of MB, a hundred thousand allocations):
/// a driver may drop this on another thread.
#[must_use = "dropping it frees the compacted entries here; that is fine, but say so"]
pub struct Compacted {
    _entries: VecDeque<Entry>,
    _snapshot: Arc<Snapshot>,
}

impl std::fmt::Debug for Compacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Compacted({} entries)", self._entries.len())
    }
}

/// The log.
///
/// Invariants (checked by [`RaftLog::check_invariants`]):
/// - `entries[i].index == snapshot.meta.index + 1 + i` (no holes);
/// - entry terms never decrease, and are `>= snapshot.meta.term`;
/// - `snapshot.meta.index <= applied <= committed <= last_index()` (section 5.3, section 7);
/// - `persisted <= written <= last_index()`.
#[derive(Clone, Debug)]
pub struct RaftLog {
    /// Everything up to `snapshot.meta.index` is compacted into this snapshot (shared with the
    /// transfers that stream it, so a compaction does not disturb them).
    pub(crate) snapshot: Arc<Snapshot>,
    /// Entries after the snapshot.
    pub(crate) entries: VecDeque<Entry>,
    /// Highest index known committed.
    pub(crate) committed: Index,
    /// Highest index handed to the application (in a `Ready`, which the application applies
    /// before it compacts anything).
    pub(crate) applied: Index,
    /// Highest index handed out in a `Ready` to be written (the driver may still be writing or
    /// syncing it: several `Ready`s may be in flight).
    pub(crate) written: Index,
    /// Highest index the driver reported persisted (advanced by `advance`; entries restored
    /// at start-up are persisted). A leader counts its own copy only this far.
    pub(crate) persisted: Index,
    /// A snapshot received from the leader that has not been handed out in a `Ready` yet.
    pub(crate) snapshot_pending: bool,
    /// Lowest index whose entry was dropped (truncated, or replaced by a snapshot) since the
    /// node last looked (`take_truncated`): acknowledgements queued before that no longer hold.
    pub(crate) truncated_from: Option<Index>,
}

impl RaftLog {
    /// A log restored from storage (or empty).
    pub(crate) fn new(snapshot: Option<Snapshot>, entries: Vec<Entry>, commit: Index) -> RaftLog {
        let snapshot = Arc::new(snapshot.unwrap_or_default());
        let base = snapshot.meta.index;
        let entries: VecDeque<Entry> = entries.into_iter().filter(|e| e.index > base).collect();
        let last = base + entries.len() as u64;
        RaftLog {
            committed: commit.clamp(base, last),
            applied: base,
            written: last,
            persisted: last,
            snapshot,
            entries,
            snapshot_pending: false,
            truncated_from: None,
        }
    }

    /// Index of the last entry (or of the snapshot when there are none).
    pub fn last_index(&self) -> Index {
        self.snapshot.meta.index + self.entries.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot.meta.term, |e| e.term)
    }

    /// First index still held as an entry.
    pub fn first_index(&self) -> Index {
        self.snapshot.meta.index + 1
    }

    /// Term at `index`, or `None` if compacted away or past the end.
    pub fn term(&self, index: Index) -> Option<Term> {
        let base = self.snapshot.meta.index;
        if index == base {
            return Some(self.snapshot.meta.term);
        }
        if index < base || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - base - 1) as usize].term)
    }

    /// The entry at `index`, if held.
    pub fn entry(&self, index: Index) -> Option<&Entry> {
        let base = self.snapshot.meta.index;
        if index <= base || index > self.last_index() {
            return None;
        }
        Some(&self.entries[(index - base - 1) as usize])
    }

    /// Entries held, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Commit index.
    pub fn committed(&self) -> Index {
        self.committed
    }

    /// Applied index.
    pub fn applied(&self) -> Index {
        self.applied
    }

    pub(crate) fn match_term(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Section 5.4.1: a candidate's log is at least as up-to-date as ours.
    pub(crate) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    /// Entries `[lo, hi)` limited to `max_bytes` (but at least one entry if any).
    pub(crate) fn slice(&self, lo: Index, hi: Index, max_bytes: usize) -> Vec<Entry> {
        debug_assert!(lo > self.snapshot.meta.index, "slice of compacted entries");
        let mut out = Vec::new();
        let mut bytes = 0;
        for i in lo..hi.min(self.last_index() + 1) {
            let e = self.entry(i).expect("index within the log");
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// Appends entries, first truncating anything at or after `entries[0].index`.
    /// Never truncates committed entries (Leader Completeness, section 5.4).
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(first.index > self.committed, "truncating committed entry {} <= {}", first.index, self.committed);
        assert!(first.index <= self.last_index() + 1, "hole in the log before {}", first.index);
        let keep = (first.index - self.snapshot.meta.index - 1) as usize;
        if keep < self.entries.len() {
            self.truncated_from = Some(self.truncated_from.map_or(first.index, |t| t.min(first.index)));
        }
        self.entries.truncate(keep);
        self.written = self.written.min(first.index - 1);
        self.persisted = self.persisted.min(first.index - 1);
        self.entries.extend(entries.iter().cloned());
    }

    /// The follower side of AppendEntries (Figure 2, receiver rules 2-5).
    /// Returns the last index now known to match the leader, or `None` on a mismatch.
    pub(crate) fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        entries: &[Entry],
    ) -> Option<Index> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        // Rule 3: only an entry that conflicts truncates; a stale duplicate must not.
        if let Some(pos) = entries.iter().position(|e| !self.match_term(e.index, e.term)) {
            self.append(&entries[pos..]);
        }
        self.commit_to(commit.min(last_new));
        Some(last_new)
    }

    /// Fast backtracking: where the leader should look after a rejection at `prev_index`.
    pub(crate) fn reject_hint(&self, prev_index: Index) -> RejectHint {
        if prev_index > self.last_index() {
            return RejectHint { conflict_term: None, conflict_index: self.last_index() + 1 };
        }
        let term = self.term(prev_index).expect("prev_index above the snapshot");
        let mut first = prev_index;
        while first > self.first_index() && self.term(first - 1) == Some(term) {
            first -= 1;
        }
        RejectHint { conflict_term: Some(term), conflict_index: first }
    }

    /// Leader side of fast backtracking: the next index to try.
    pub(crate) fn next_after_reject(&self, hint: RejectHint) -> Index {
        if let Some(t) = hint.conflict_term {
            // Last entry of that term in our log, if we have the term at all.
            let last_of_term = (hint.conflict_index..=self.last_index()).rev().find(|&i| self.term(i) == Some(t));
            if let Some(i) = last_of_term {
                return i + 1;
            }
        }
        hint.conflict_index.max(1)
    }

    pub(crate) fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit {index} beyond last index {}", self.last_index());
            self.committed = index;
        }
    }

    /// Replaces the log by a snapshot from the leader (section 7: discard the entire log).
    pub(crate) fn restore(&mut self, snapshot: Snapshot) {
        assert!(snapshot.meta.index > self.committed, "restoring a snapshot behind the commit index");
        // Entries through the commit index are the snapshot's own; later ones may not be.
        let dropped = self.committed + 1;
        self.truncated_from = Some(self.truncated_from.map_or(dropped, |t| t.min(dropped)));
        self.entries.clear();
        self.committed = snapshot.meta.index;
        self.applied = snapshot.meta.index;
        self.written = snapshot.meta.index;
        self.persisted = snapshot.meta.index;
        self.snapshot = Arc::new(snapshot);
        self.snapshot_pending = true;
    }

    /// The application took a snapshot at `index` (<= applied): drop entries up to it.
    /// The snapshot carries `conf`, the configuration in effect at `index`.
    pub(crate) fn compact(&mut self, index: Index, conf: &crate::ConfState, data: &[u8]) -> Snapshot {
        let term = self.term(index).expect("compact index held in the log");
        let drop = (index - self.snapshot.meta.index) as usize;
        self.entries.drain(..drop);
        // The snapshot is durable once saved; the entries it covers may have been in flight.
        self.persisted = self.persisted.max(index);
        let snapshot = Snapshot::with_conf(SnapshotMeta { index, term }, conf, data);
        self.snapshot = Arc::new(snapshot.clone());
        snapshot
    }

    /// [`RaftLog::compact`] with a snapshot built elsewhere (at an applied index, for the log's
    /// term there): shared, not copied.
    pub(crate) fn compact_to(&mut self, snapshot: Arc<Snapshot>) -> Compacted {
        let index = snapshot.meta.index;
        debug_assert_eq!(self.term(index), Some(snapshot.meta.term), "a snapshot of another log");
        let drop = (index - self.snapshot.meta.index) as usize;
        // The entries kept move to a new deque (few: the log's tail past the applied index);
        // the dropped ones stay in the old one, for the caller to free.
        let kept = self.entries.split_off(drop);
        self.persisted = self.persisted.max(index);
        let entries = std::mem::replace(&mut self.entries, kept);
        Compacted { _entries: entries, _snapshot: std::mem::replace(&mut self.snapshot, snapshot) }
    }

    /// The lowest index dropped since the last call, if any.
    pub(crate) fn take_truncated(&mut self) -> Option<Index> {
        self.truncated_from.take()
    }

    /// Entries not yet handed out to be written; from now on they are.
    pub(crate) fn take_unwritten(&mut self) -> Vec<Entry> {
        let es = self.slice_all(self.written + 1, self.last_index());
        self.written = self.last_index();
        es
    }

    /// Committed entries not yet handed to the application, oldest first, up to `max_bytes`
    /// (but at least one if any). These may include entries not yet persisted here (in the
    /// same `Ready`): committed means durable on a majority, so a driver may apply them before,
    /// or while, it persists its own copy.
    pub(crate) fn to_apply(&self, max_bytes: usize) -> Vec<Entry> {
        if self.applied >= self.committed {
            return Vec::new();
        }
        self.slice(self.applied + 1, self.committed + 1, max_bytes)
    }

    fn slice_all(&self, lo: Index, hi: Index) -> Vec<Entry> {
        (lo.max(self.first_index())..=hi).filter_map(|i| self.entry(i).cloned()).collect()
    }

    /// Marks entries through `index` persisted, unless the entry there changed meanwhile (a
    /// `Ready` written before a truncation completes after it).
    pub(crate) fn persisted_to(&mut self, index: Index, term: Term) {
        if index > self.persisted && index <= self.written && self.match_term(index, term) {
            self.persisted = index;
        }
    }

    pub(crate) fn applied_to(&mut self, index: Index) {
        assert!(index <= self.committed, "applied {index} beyond commit {}", self.committed);
        self.applied = self.applied.max(index);
    }

    /// Panics if an invariant listed on the struct does not hold.
    pub fn check_invariants(&self) {
        let base = self.snapshot.meta.index;
        let mut prev_term = self.snapshot.meta.term;
        for (i, e) in self.entries.iter().enumerate() {
            assert_eq!(e.index, base + 1 + i as u64, "hole in the log");
            assert!(e.term >= prev_term, "terms decrease at index {}", e.index);
            prev_term = e.term;
        }
        assert!(base <= self.applied, "applied {} behind snapshot {base}", self.applied);
        assert!(self.applied <= self.committed, "applied {} > committed {}", self.applied, self.committed);
        assert!(self.committed <= self.last_index(), "committed {} > last {}", self.committed, self.last_index());
        assert!(self.persisted <= self.written, "persisted {} beyond written {}", self.persisted, self.written);
        assert!(self.written <= self.last_index(), "written beyond the log");
    }
}
