//! # sixfive-shardkv: the sharded key/value service
//!
//! Keys are split into [`NSHARDS`] shards; each shard is served by one *replica group* (a
//! Raft-replicated key/value state machine), and a Raft-replicated *shard controller* decides
//! which group serves which shard.
//!
//! - [`ctrler`]: the controller's state machine (Join, Leave, Move, Query over numbered
//!   [`ShardConfig`]s, with the deterministic minimal-movement [`ctrler::rebalance`]), its server
//!   node and its clerk;
//! - [`group`]: a replica group's state machine ([`group::ShardSm`]) and server node
//!   ([`group::ShardServer`]): per-shard stores and session tables, configurations applied one
//!   at a time through the group's own log, shard migration and garbage collection;
//! - [`clerk`]: the client ([`clerk::ShardClerk`]): routes each operation to the group that owns
//!   its key, re-queries the controller on `ErrWrongGroup`, and scans across shards.
//!
//! ## Key to shard
//!
//! [`key2shard`]: the 64-bit FNV-1a hash of the key's bytes, modulo [`NSHARDS`]. A hash (not the
//! course's first byte) so that keys sharing a prefix spread over the shards. Tests that need a
//! key in a given shard ask [`key_in_shard`].
//!
//! ## Migration: push, and the states of a shard
//!
//! Shards are **pushed** by the group that gives them away. Every group, through its own Raft
//! log, moves from configuration `n` to `n + 1` only once every shard it holds is settled
//! (`Serving` or `Absent`), so it never skips a configuration. Applying configuration `n + 1`
//! sets each shard's state ([`group::ShardState`]):
//!
//! - kept (owned in `n` and `n + 1`): stays `Serving` and keeps answering throughout
//!   (challenge 2: unaffected shards never pause);
//! - gained from nobody (the first configuration that assigns it): `Serving`, empty;
//! - gained from another group: `Waiting` until that group's data arrives;
//! - lost: `Sending`: frozen (no client operation is answered for it any more) and kept until
//!   the new owner has it;
//! - neither: `Absent`.
//!
//! The leader of a group with `Sending` shards pushes each one (its store *and its session
//! table*, so a write retried across the migration is still applied once) to the servers of
//! the new owner every poll interval. The new owner's leader, if it is at configuration `n + 1`
//! and the shard is `Waiting`, replicates an `Install` through its own log; from that entry on
//! the shard is `Serving` there, independently of its other shards (challenge 2: a received
//! shard is served at once). A push that finds the shard already installed (or the receiver
//! already past `n + 1`) is answered with an acknowledgement; the sender then replicates a
//! `Delete` through *its* log, which drops the data and makes the shard `Absent` (challenge 1:
//! garbage collection through both groups' logs; the shard is never without a copy, and the
//! old copy goes as soon as the new one is durable in the new owner's log).
//!
//! Why push rather than pull: one side drives the whole hand-off (push, acknowledgement,
//! deletion) with a single retry loop and nothing to remember on the receiving side; the
//! receiver only ever answers "installed" or stays silent. With pull, the receiver drives the
//! transfer but the sender still needs a second confirmation before deleting, so two loops on
//! two sides. A receiver that falls behind is not a problem: the sender keeps pushing, the
//! pushes are ignored until the receiver reaches configuration `n + 1`.
//!
//! ## Sessions and reads
//!
//! Each shard has its own session table (client id -> last sequence number applied to that
//! shard and its reply). A clerk numbers its writes across all shards; a write is answered from
//! the table when it repeats the last sequence number, refused as stale when older, applied
//! otherwise. Sessions idle for [`group::SESSION_TTL`] of leader-stamped log time are dropped in
//! a sweep decided by the log alone, the same on every replica (an expired clerk's retry would
//! be applied again, the documented cost of bounding the table). Gets and per-shard scans go
//! through ReadIndex and are answered only if the shard is `Serving` at the read index, so a
//! group never answers from a shard it has given away.
//!
//! A shard is never served by two groups for the same configuration: a group serves a shard
//! only while it is `Serving`, which requires that the group's current configuration assigns
//! it the shard. The controller never lets the last group leave (its shards would have nowhere
//! to go), so after the first Join no shard is ever assigned to nobody and no data is dropped.
//!
//! ## Limits (known, by design or not yet done)
//!
//! - A group that owes a shard to a dead group, or waits for one from it, stays at its
//!   configuration until that group comes back (its other shards keep serving); configurations
//!   are never skipped, so nothing is lost meanwhile.
//! - The controller keeps every configuration (Query may ask for any of them): its state grows
//!   by one configuration per change.
//! - A push carries the whole shard and is repeated every poll interval until acknowledged;
//!   there is no chunking or rate limit for very large shards yet.
//! - The same servers run as real processes on the production runtime (`sixfive-runtime`'s
//!   `shard` module and the `sixfive shardkv` commands), with group commit
//!   ([`ShardServer::flush`], [`CtrlerServer::flush`] after each batch of events).
#![deny(missing_docs)]

pub mod clerk;
pub mod ctrler;
pub mod group;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "sim")]
pub mod swarm;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sixfive_rpc::Endpoint;

pub use clerk::ShardClerk;
pub use ctrler::{CtrlError, CtrlOp, CtrlerClerk, CtrlerServer, CtrlerSm};
pub use group::{ShardServer, ShardSm, ShardState};

/// Number of shards.
pub const NSHARDS: usize = 10;

/// A replica group's id; 0 means "no group".
pub type Gid = u64;

/// The shard of `key`: FNV-1a (64-bit) of its bytes, modulo [`NSHARDS`].
pub fn key2shard(key: &str) -> usize {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    (h % NSHARDS as u64) as usize
}

/// The first key of the form `{prefix}{i}` (i = 0, 1, ...) that falls in `shard`.
pub fn key_in_shard(prefix: &str, shard: usize) -> String {
    assert!(shard < NSHARDS, "shard {shard} out of range");
    (0u64..).map(|i| format!("{prefix}{i}")).find(|k| key2shard(k) == shard).expect("some key hashes there")
}

/// One numbered configuration: which group serves each shard, and the servers of each group.
///
/// Invariant (after the first Join): every shard's group is a key of `groups`. Configuration 0
/// has no groups and every shard on group 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfig {
    /// Its number; each change makes the next one.
    pub num: u64,
    /// Shard -> group (0: none).
    pub shards: [Gid; NSHARDS],
    /// Group -> its servers.
    pub groups: BTreeMap<Gid, Vec<Endpoint>>,
}

impl ShardConfig {
    /// The shards of group `gid`, in order.
    pub fn shards_of(&self, gid: Gid) -> Vec<usize> {
        (0..NSHARDS).filter(|&s| self.shards[s] == gid).collect()
    }
}

/// One-way messages between servers (Raft traffic of a group travels wrapped in `Raft`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Wire {
    /// A Raft message between servers of one group (the encoding `sixfive-rsm` sends).
    Raft(Vec<u8>),
    /// Group leader -> a controller server: send me configuration `num` if you have it.
    ConfigQuery { num: u64 },
    /// Controller server -> group leader: the configuration asked for.
    ConfigReply { config: ShardConfig },
    /// Old owner -> new owner: shard `shard` as it was when the sender reached configuration `num`.
    ShardPush { num: u64, shard: usize, data: group::ShardData, reply_to: Vec<Endpoint> },
    /// New owner -> old owner: shard `shard` of configuration `num` is installed here.
    ShardAck { num: u64, shard: usize },
}

impl Wire {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encodes")
    }
}

/// A [`sixfive_rpc::Ctx`] that wraps every one-way message of the Raft node inside it in
/// [`Wire::Raft`], so Raft traffic and shard traffic share one message space.
pub(crate) struct RaftCtx<'a>(pub(crate) &'a mut dyn sixfive_rpc::Ctx);

impl sixfive_rpc::Ctx for RaftCtx<'_> {
    fn now(&self) -> sixfive_rpc::Micros {
        self.0.now()
    }
    fn me(&self) -> Endpoint {
        self.0.me()
    }
    fn send(&mut self, to: Endpoint, message: Vec<u8>) {
        self.0.send(to, Wire::Raft(message).encode());
    }
    fn reply(&mut self, to: Endpoint, call: sixfive_rpc::CallId, reply: Vec<u8>) {
        self.0.reply(to, call, reply);
    }
    fn set_timer(&mut self, after: sixfive_rpc::Micros, id: u64) {
        self.0.set_timer(after, id);
    }
}

/// How often a group's leader polls the controller and pushes shards it gives away.
pub const POLL_MICROS: sixfive_rpc::Micros = 100_000;
/// Timer id of the poll (the Raft node inside uses small ids).
pub(crate) const POLL_TIMER: u64 = 0x5_4A2D;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key2shard_is_stable_and_spreads() {
        assert_eq!(key2shard("a"), key2shard("a"));
        let mut counts = [0; NSHARDS];
        for i in 0..1000 {
            counts[key2shard(&format!("user{i}"))] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        for s in 0..NSHARDS {
            assert_eq!(key2shard(&key_in_shard("k", s)), s);
        }
    }
}
