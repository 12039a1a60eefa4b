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
    /// Check-quorum: a leader that has not heard from a majority for an election timeout steps
    /// down, and followers that heard from a leader recently ignore vote requests (leader lease).
    pub check_quorum: bool,
    /// Upper bound on the entry bytes in one `Append` (at least one entry is always sent).
    pub max_msg_bytes: usize,
    /// Most `Append` messages in flight to one follower (pipelining window).
    pub max_inflight_msgs: usize,
    /// Size of one InstallSnapshot chunk.
    pub snapshot_chunk_bytes: usize,
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
    /// timeout and 10 heartbeats per second.
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
        Ok(())
    }
}
