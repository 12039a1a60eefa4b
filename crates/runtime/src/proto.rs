//! The messages on the wire, each one frame (see [`crate::frame`]), postcard-encoded.
//!
//! Peers: the node with the lower id dials; its first frame is a [`PeerHello`]; the other answers
//! with a [`PeerWelcome`] and from then on both send raw Raft messages (one per frame) over that
//! single connection. Clients: [`ClientMsg`] frames in, [`ServerMsg`] frames out, answered by
//! call id, in any order.

use serde::{Deserialize, Serialize};

/// Marks the first frame of a peer connection (and the protocol version).
pub const PEER_MAGIC: [u8; 4] = *b"S5P1";

/// First frame a dialing peer sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    /// [`PEER_MAGIC`].
    pub magic: [u8; 4],
    /// The cluster the dialer belongs to (see [`crate::server::cluster_id`]).
    pub cluster_id: u64,
    /// The dialer's member id.
    pub from: u64,
    /// The member the dialer means to reach.
    pub to: u64,
}

/// The answer to a [`PeerHello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerWelcome {
    /// Accepted: Raft messages follow.
    Accepted,
    /// Refused, with the reason (the connection closes).
    Refused(String),
}

/// A client's frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Who are you?
    Hello {
        /// Request id.
        call: u64,
    },
    /// A request for the served node (for the KV: an `RsmRequest`).
    Call {
        /// Request id, echoed in the reply.
        call: u64,
        /// The request.
        #[serde(with = "sixfive_raft::bytes")]
        body: Vec<u8>,
    },
    /// This member's state.
    Status {
        /// Request id.
        call: u64,
    },
}

/// A server's frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to [`ClientMsg::Hello`].
    Hello {
        /// Request id.
        call: u64,
        /// The cluster's id.
        cluster_id: u64,
        /// This member's id.
        id: u64,
        /// This member's name.
        name: String,
    },
    /// Answer to [`ClientMsg::Call`].
    Reply {
        /// Request id.
        call: u64,
        /// The node's reply.
        #[serde(with = "sixfive_raft::bytes")]
        body: Vec<u8>,
    },
    /// Answer to [`ClientMsg::Status`].
    Status {
        /// Request id.
        call: u64,
        /// The member's state.
        status: MemberStatus,
    },
}

/// What `kv status` shows for one member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Follower, PreCandidate, Candidate or Leader.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Who this member believes leads.
    pub leader: Option<u64>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Index of the latest snapshot.
    pub snapshot_index: u64,
    /// Bytes of the write-ahead log on disk.
    pub log_bytes: u64,
    /// Bytes of the snapshot on disk.
    pub snapshot_bytes: u64,
}
