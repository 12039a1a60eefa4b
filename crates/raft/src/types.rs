//! The values that cross the core's boundary: log entries, persistent state, snapshots, messages.

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node's identity. Zero is never a valid id (it is rejected by [`crate::Config::validate`]).
pub type NodeId = u64;
/// A Raft term (section 5.1). Terms only grow.
pub type Term = u64;
/// A position in the log; the first entry has index 1, index 0 is "before the log".
pub type Index = u64;

/// What an entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A command proposed by the application.
    Normal,
    /// The empty entry a new leader appends so that it can commit entries of earlier terms
    /// (section 5.4.2) and serve ReadIndex (thesis section 6.4). Applications skip it.
    Noop,
    /// A configuration change: `data` is the whole new [`crate::ConfState`] (decode it with
    /// [`crate::ConfState::decode`]). It takes effect when appended (see [`crate::conf`]); applications may record it, and otherwise skip it.
    ConfChange,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Term of the leader that created the entry.
    pub term: Term,
    /// Position in the log.
    pub index: Index,
    /// Normal command or leader no-op.
    pub kind: EntryKind,
    /// The command; empty for a no-op.
    #[serde(with = "crate::bytes")]
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry counts for when messages are size-limited.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 24
    }
}

/// State that must be on stable storage before the node answers anyone (Figure 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate that received this node's vote in `term`.
    pub vote: Option<NodeId>,
    /// Highest index known committed (persisted so a restart can re-apply without waiting).
    pub commit: Index,
}

/// Where a snapshot ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Last index the snapshot covers.
    pub index: Index,
    /// Term of the entry at `index`.
    pub term: Term,
}

/// A state-machine snapshot covering the log up to `meta.index`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Position of the snapshot.
    pub meta: SnapshotMeta,
    /// The application's serialized state; opaque to Raft.
    #[serde(with = "crate::bytes")]
    pub data: Vec<u8>,
}

/// A read that became safe: once the application has applied `index`, it may answer the read
/// identified by `ctx` from its state machine (ReadIndex, thesis section 6.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// Commit index at the time the read was requested.
    pub index: Index,
    /// The caller's identifier for the read.
    pub ctx: Vec<u8>,
}

/// A message between two nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// Sender's term (for a granted pre-vote: the term the pre-candidate would campaign in).
    pub term: Term,
    /// What it says.
    pub body: MessageBody,
}

/// The kinds of message (Figure 2, plus pre-vote, chunked snapshots and leadership transfer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// RequestVote; with `pre` it is a pre-vote (thesis section 9.6) that changes no state.
    Vote {
        /// Pre-vote round.
        pre: bool,
        /// Candidate's last log index.
        last_index: Index,
        /// Candidate's last log term.
        last_term: Term,
        /// Sent by the target of a leadership transfer after `TimeoutNow` (and only then):
        /// voters ignore their leader lease.
        transfer: bool,
    },
    /// Answer to `Vote`.
    VoteResponse {
        /// Answer to a pre-vote.
        pre: bool,
        /// Vote granted.
        granted: bool,
    },
    /// AppendEntries carrying entries.
    Append {
        /// Index of the entry before `entries`.
        prev_index: Index,
        /// Term of that entry.
        prev_term: Term,
        /// Entries to append (possibly none: a probe).
        entries: Vec<Entry>,
        /// Leader's commit index.
        commit: Index,
    },
    /// Answer to `Append`.
    AppendResponse {
        /// On success the follower's log matches the leader's through `index`.
        /// On rejection `index` is the `prev_index` that did not match.
        index: Index,
        /// Whether the entries were accepted.
        success: bool,
        /// On rejection: where the leader should look next (fast backtracking).
        hint: Option<RejectHint>,
    },
    /// Empty AppendEntries that keeps followers quiet and confirms leadership for ReadIndex.
    Heartbeat {
        /// `min(leader commit, follower match)`, so a follower never commits what it lacks.
        commit: Index,
        /// Latest ReadIndex round the leader started.
        read_seq: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatResponse {
        /// Echo of the heartbeat's `read_seq`.
        read_seq: u64,
    },
    /// One chunk of InstallSnapshot (section 7).
    ///
    /// A transfer is a stream identified by (sender, term, `stream`): the receiver only ever
    /// joins chunks of one stream, and checks the whole snapshot against `checksum` before
    /// installing it, so chunks of two senders or two transfers are never spliced.
    Snapshot {
        /// Which snapshot.
        meta: SnapshotMeta,
        /// The transfer this chunk belongs to; the sender numbers its transfers upwards.
        stream: u64,
        /// Byte offset of `data` in the snapshot.
        offset: u64,
        /// The chunk.
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
        /// Last chunk.
        done: bool,
        /// CRC32C of the whole snapshot (`meta.index`, `meta.term` little-endian, then the data).
        checksum: u32,
    },
    /// Answer to a snapshot chunk.
    SnapshotResponse {
        /// Which snapshot (or, when `done` after a stale snapshot, the follower's commit index).
        index: Index,
        /// Echo of the chunk's `stream`.
        stream: u64,
        /// The offset the follower expects next.
        next_offset: u64,
        /// The follower's log now matches through `index`.
        done: bool,
    },
    /// Leadership transfer: start an election now, past any leader lease (thesis section 3.10).
    TimeoutNow {
        /// The leader's last index when it sent this: the target had acknowledged it. A receiver
        /// whose log no longer ends exactly there (the leader took proposals since, so it
        /// abandoned the transfer) ignores the message; so does one of an older term.
        last_index: Index,
    },
}

/// Where a rejecting follower suggests the leader retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectHint {
    /// The follower's term at the rejected index, if it has an entry there.
    pub conflict_term: Option<Term>,
    /// First index of `conflict_term` in the follower's log, or its last index + 1.
    pub conflict_index: Index,
}

impl Snapshot {
    /// CRC32C of the snapshot's position and data, as carried by every chunk of its transfer.
    pub fn checksum(&self) -> u32 {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&self.meta.index.to_le_bytes());
        head[8..].copy_from_slice(&self.meta.term.to_le_bytes());
        crc32c::crc32c_append(crc32c::crc32c(&head), &self.data)
    }
}

impl Message {
    /// About the size of the message's encoding (usually a little more), so that it is
    /// encoded into one allocation instead of a buffer doubled a dozen times.
    pub fn size_hint(&self) -> usize {
        64 + match &self.body {
            MessageBody::Append { entries, .. } => entries.iter().map(Entry::size_bytes).sum(),
            MessageBody::Snapshot { data, .. } => data.len(),
            _ => 0,
        }
    }
}

impl MessageBody {
    /// True for the answers; the network's fault model treats these as RPC replies.
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            MessageBody::VoteResponse { .. }
                | MessageBody::AppendResponse { .. }
                | MessageBody::HeartbeatResponse { .. }
                | MessageBody::SnapshotResponse { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &Message) -> usize {
        postcard::to_allocvec(m).unwrap().len()
    }

    #[test]
    fn a_messages_size_hint_covers_its_encoding_without_waste() {
        let entry = |index: Index| Entry { term: 3, index, kind: EntryKind::Normal, data: vec![7; 150].into() };
        let append = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::Append {
                prev_index: 99,
                prev_term: 3,
                entries: (100..200).map(entry).collect(),
                commit: 98,
            },
        };
        let chunk = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::Snapshot {
                meta: SnapshotMeta { index: 1 << 40, term: 3 },
                stream: 1,
                offset: 1 << 20,
                data: vec![1; 5000],
                done: false,
                checksum: 0xdead_beef,
            },
        };
        let vote = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::Vote { pre: false, last_index: 1 << 50, last_term: 3, transfer: false },
        };
        for m in [&append, &chunk, &vote] {
            // Enough for one allocation, and at most a few bytes per entry and 64 more.
            let (hint, len) = (m.size_hint(), encoded(m));
            assert!(hint >= len, "{hint} < {len}: {:?}", m.body);
            let entries = if let MessageBody::Append { entries, .. } = &m.body { entries.len() } else { 0 };
            assert!(hint <= len + 24 * entries + 64, "{hint} for {len} bytes: {:?}", m.body);
        }
    }
}
