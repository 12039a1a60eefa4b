//! Node configuration, validated once at the boundary.

use crate::types::NodeId;

/// How a node behaves. Times are in ticks; the driver decides how long a tick is
/// (the simulator and the servers use 10 ms).
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// Every voter of the cluster, this node included.
    pub voters: Vec<NodeId>,
    /// Base election timeout; the real timeout is drawn from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: u32,
    /// Heartbeat interval. Must be below `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Pre-vote (thesis section 9.6): a partitioned node cannot inflate terms.
    pub pre_vote: bool,
    /// Check-quorum (thesis section 6.2) with leader lease (thesis section 4.2.3).
    ///
    /// A leader counts, per window of `election_ticks` of its own ticks, which followers it
    /// heard from; at the end of a window in which fewer than a majority (itself included)
    /// answered, it steps down. A follower that heard from its leader within the last
    /// `election_ticks` ignores vote requests (the lease), except those a transfer target sends
    /// after `TimeoutNow`.
    ///
    /// **How long a deposed leader may believe it leads.** The flags are cleared at each check,
    /// so an answer that arrives just after a check keeps the leader in office through the
    /// following window: a leader cut off from a majority steps down at the latest
    /// `2 * election_ticks` of its own ticks after the last message it received from a majority
    /// (at the defaults, 60 ticks = 600 ms with 10 ms ticks), never later. A successor can be
    /// elected once the followers' leases and timeouts run out, which is `election_ticks` to
    /// `2 * election_ticks` of *their* ticks after they last heard from the old leader, plus a
    /// pre-vote and a vote round trip, or at once after a transfer's `TimeoutNow`. So two nodes
    /// may both believe they lead for up to `2 * election_ticks` ticks, and for longer in real
    /// time if the old leader's ticks run late (a stop-the-world pause, a slow clock): the bound
    /// is counted in the deposed leader's own ticks. The core therefore never answers reads from
    /// this belief: ReadIndex confirms leadership with a heartbeat round. With check-quorum off
    /// there is no bound: a leader cut off from everyone leads until it hears of a higher term.
    pub check_quorum: bool,
    /// Upper bound on the entry bytes in one `Append` (at least one entry is always sent).
    pub max_msg_bytes: usize,
    /// Most `Append` messages in flight to one follower (pipelining window).
    pub max_inflight_msgs: usize,
    /// Size of one InstallSnapshot chunk, in bytes of snapshot data.
    pub snapshot_chunk_bytes: usize,
    /// Most bytes of command data (`Entry::data`) a leader holds proposed but not yet
    /// committed in its term. A proposal that would go past it is refused with
    /// [`crate::ProposeError::UncommittedLimit`] (retry once earlier proposals commit); a
    /// proposal is always taken when nothing is uncommitted, however large.
    pub max_uncommitted_bytes: usize,
    /// Most bytes of committed entries (counted as [`crate::Entry::size_bytes`]) handed out in
    /// one `Ready` (at least one entry is); the rest follows in later `Ready`s.
    pub max_committed_bytes_per_ready: usize,
    /// Most ReadIndex requests a leader holds unanswered; more are refused with
    /// [`crate::ProposeError::PendingReadsLimit`] (retry once earlier reads are answered).
    pub max_pending_reads: usize,
    /// Seed of the node's private random generator (election timeouts).
    pub seed: u64,
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid raft config: {}", self.0)
    }
}
impl std::error::Error for ConfigError {}

impl Config {
    /// Defaults for node `id` of the cluster `voters`: 10 ms ticks give a 300-600 ms election
    /// timeout and 10 heartbeats per second; 64 MiB of uncommitted proposals, 16 MiB of
    /// committed entries per `Ready`, 4096 pending reads.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Config {
        Config {
            id,
            voters,
            election_ticks: 30,
            heartbeat_ticks: 10,
            pre_vote: true,
            check_quorum: true,
            max_msg_bytes: 1 << 20,
            max_inflight_msgs: 256,
            snapshot_chunk_bytes: 1 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_committed_bytes_per_ready: 16 << 20,
            max_pending_reads: 4096,
            seed: id,
        }
    }

    /// Checks the configuration; every other part of the core trusts it afterwards.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_string()));
        if self.id == 0 {
            return err("node id 0 is reserved");
        }
        if !self.voters.contains(&self.id) {
            return err("voters must include this node's id");
        }
        let mut v = self.voters.clone();
        v.sort_unstable();
        v.dedup();
        if v.len() != self.voters.len() || v.contains(&0) {
            return err("voters must be distinct non-zero ids");
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return err("need 0 < heartbeat_ticks < election_ticks");
        }
        if self.max_inflight_msgs == 0 || self.snapshot_chunk_bytes == 0 || self.max_msg_bytes == 0 {
            return err("max_inflight_msgs, max_msg_bytes and snapshot_chunk_bytes must be positive");
        }
        if self.max_uncommitted_bytes == 0 || self.max_committed_bytes_per_ready == 0 || self.max_pending_reads == 0 {
            return err("max_uncommitted_bytes, max_committed_bytes_per_ready and max_pending_reads must be positive");
        }
        Ok(())
    }
}
