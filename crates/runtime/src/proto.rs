//! The messages on the wire, each one frame (see [`crate::frame`]), postcard-encoded.
//!
//! Peers: the node with the lower id dials; its first frame is a [`PeerHello`]; the other answers
//! with a [`PeerWelcome`] and from then on both send [`PeerFrame`]s over that single connection:
//! Raft messages, and requests a member forwards to the leader with their replies. Clients: [`ClientMsg`] frames in, [`ServerMsg`] frames out, answered by
//! call id, in any order.

use serde::{Deserialize, Serialize};

/// Marks the first frame of a peer connection (and the protocol version).
pub const PEER_MAGIC: [u8; 4] = *b"S5P3";

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
    /// The dialer's client URLs (`host:port`), for the member list.
    pub client_urls: Vec<String>,
    /// The dialer's name (a member added without one, by etcd's MemberAdd, is listed by it).
    pub name: String,
}

/// The answer to a [`PeerHello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerWelcome {
    /// Accepted: peer frames follow. With the answering member's client URLs.
    Accepted {
        /// `host:port` of each.
        client_urls: Vec<String>,
        /// The answering member's name.
        name: String,
    },
    /// Refused, with the reason (the connection closes).
    Refused(String),
}

/// Marks the first frame of a connection from a server that asks to join the cluster
/// (`--initial-cluster-state existing`): a [`JoinRequest`].
pub const JOIN_MAGIC: [u8; 4] = *b"S5J1";

/// First frame of a joining server, sent to a member's peer port: "I was added as `name` at
/// `peer_addr`; who am I, and who are the others?"
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// [`JOIN_MAGIC`].
    pub magic: [u8; 4],
    /// The joining server's name.
    pub name: String,
    /// Its peer address (`host:port`).
    pub peer_addr: String,
}

/// The answer to a [`JoinRequest`] (the connection then closes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinAnswer {
    /// The member was added: its id, the cluster's id, and every member's name and peer address.
    Accepted {
        /// The cluster's id.
        cluster_id: u64,
        /// The joining member's id.
        id: u64,
        /// Every member (the joining one too).
        members: Vec<(u64, String, String)>,
    },
    /// Not added (or another name or address), with the reason.
    Refused(String),
}

/// What one peer frame carries, tagged by its first byte (so a Raft message is written as it
/// is, without being copied into an envelope).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerFrame {
    /// A Raft message (tag 0), as the node encoded it.
    Raft(Vec<u8>),
    /// A request forwarded to this member's node (tag 1): a follower sends its clients'
    /// requests to the leader. Answered by a [`PeerFrame::Reply`] with the same call id.
    Call(u64, Vec<u8>),
    /// The node's answer to a forwarded request (tag 2).
    Reply(u64, Vec<u8>),
}

impl PeerFrame {
    /// The bytes in front of the body: the tag, and the call id of a call or reply.
    pub fn head(&self) -> ([u8; 9], usize) {
        let mut h = [0u8; 9];
        match self {
            PeerFrame::Raft(_) => (h, 1),
            PeerFrame::Call(c, _) | PeerFrame::Reply(c, _) => {
                h[0] = if matches!(self, PeerFrame::Call(..)) { 1 } else { 2 };
                h[1..].copy_from_slice(&c.to_le_bytes());
                (h, 9)
            }
        }
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        match self {
            PeerFrame::Raft(b) | PeerFrame::Call(_, b) | PeerFrame::Reply(_, b) => b,
        }
    }

    /// Parses a frame from its tag (the payload's first byte) and the rest of its payload.
    pub fn parse(tag: u8, mut rest: Vec<u8>) -> Result<PeerFrame, String> {
        match tag {
            0 => Ok(PeerFrame::Raft(rest)),
            1 | 2 => {
                let c = rest
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .ok_or("truncated peer frame")?;
                rest.drain(..8);
                Ok(if tag == 1 { PeerFrame::Call(c, rest) } else { PeerFrame::Reply(c, rest) })
            }
            t => Err(format!("unknown peer frame tag {t}")),
        }
    }
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
    /// The cluster's members as this member knows them.
    Members {
        /// Request id.
        call: u64,
    },
    /// Change the membership (the member asked makes the change at the leader).
    ChangeMembers {
        /// Request id.
        call: u64,
        /// The change.
        op: crate::members::MemberOp,
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
    /// Answer to [`ClientMsg::Members`].
    Members {
        /// Request id.
        call: u64,
        /// The members.
        members: crate::members::MembersView,
    },
    /// Answer to [`ClientMsg::ChangeMembers`]: the id of the member concerned and the
    /// membership the change was planned from, or why it was refused or failed.
    MembersChanged {
        /// Request id.
        call: u64,
        /// The outcome.
        result: Result<(u64, crate::members::MembersView), crate::members::ChangeError>,
    },
}

impl ServerMsg {
    /// The encoding of `ServerMsg::Reply { call, body }` up to the body's bytes (the variant,
    /// the call id, the body's length), so that a reply is framed without copying its body
    /// into a message first.
    pub fn reply_head(call: u64, body_len: usize) -> Vec<u8> {
        // Reply is variant 1; postcard writes integers and lengths as varints.
        let head = postcard::to_allocvec(&(1u32, call)).expect("encodes");
        postcard::to_extend(&(body_len as u64), head).expect("encodes")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_head_and_its_body_are_the_encoded_reply() {
        for (call, len) in [(0u64, 0usize), (1, 5), (u64::MAX, 300), (1 << 40, 70_000)] {
            let body = vec![7u8; len];
            let whole = postcard::to_allocvec(&ServerMsg::Reply { call, body: body.clone() }).unwrap();
            assert_eq!([ServerMsg::reply_head(call, len), body].concat(), whole, "call {call}, {len} bytes");
        }
    }
}
