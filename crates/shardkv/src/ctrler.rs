//! The shard controller: a state machine on `sixfive-rsm` holding the numbered configurations.
//!
//! - Join (group id -> servers), Leave (group ids) and Move (shard, group) each make a new
//!   configuration; Query (number, or the latest) reads one through ReadIndex.
//! - Join and Leave rebalance with [`rebalance`]: shard counts per group differ by at most one,
//!   no shard is left on an unknown group, and only the shards that must move do; the result
//!   depends only on the previous configuration and the set of groups (ordered maps, ties
//!   broken by group id), so every replica computes the same one.
//! - Changes are exactly-once for their clients through sessions (client id, sequence number),
//!   like the KV's: a retried Join answers the first one's result instead of applying again.
//! - Bad input (group 0, a Join of a group already present, a Leave or Move naming an unknown
//!   group, a shard out of range, a Leave that would leave no group at all) gets a typed
//!   [`CtrlError`] and makes no configuration.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sixfive_raft::Storage;
use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node, Transport};
use sixfive_rsm::{ApplyCtx, RsmNode, RsmRequest, StateMachine};

use crate::clerk::call_rsm;
use crate::{Gid, NSHARDS, RaftCtx, ShardConfig, Wire};

/// A change to the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtrlOp {
    /// New groups (id -> servers).
    Join {
        /// The groups.
        groups: BTreeMap<Gid, Vec<Endpoint>>,
    },
    /// Groups that go away; their shards are spread over the others.
    Leave {
        /// Their ids.
        gids: Vec<Gid>,
    },
    /// Puts `shard` on `gid` (no rebalancing; the next Join or Leave may move it again).
    Move {
        /// The shard.
        shard: usize,
        /// Its new group.
        gid: Gid,
    },
}

/// Why a change was refused. No configuration was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CtrlError {
    /// Group 0 means "no group" and cannot be used.
    #[error("group id 0 is reserved (it means: no group)")]
    ZeroGid,
    /// The group is already in the configuration.
    #[error("group {0} has already joined")]
    AlreadyJoined(Gid),
    /// The group is not in the configuration.
    #[error("group {0} is not in the configuration")]
    UnknownGroup(Gid),
    /// A group needs at least one server.
    #[error("group {0} has no servers")]
    NoServers(Gid),
    /// The change names no group.
    #[error("the change names no group")]
    Empty,
    /// Shard number out of range.
    #[error("shard {shard} out of range (there are {max} shards)")]
    BadShard {
        /// Asked.
        shard: usize,
        /// Number of shards.
        max: usize,
    },
    /// The Leave would remove every group: their shards would have nowhere to go.
    #[error("cannot remove every group: the shards would have nowhere to go")]
    LastGroup,
    /// A delayed copy of a request the client has already moved past; not executed.
    #[error("stale duplicate of an earlier request; not executed")]
    Stale,
    /// The request could not be decoded.
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// A change as the controller's log carries it: with the client's session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtrlRequest {
    /// The clerk's id.
    pub client: u64,
    /// Increases with each change of that clerk (retries repeat it).
    pub seq: u64,
    /// The change.
    pub op: CtrlOp,
}

/// A change's answer: the number of the configuration it made.
pub type CtrlReply = Result<u64, CtrlError>;

/// A read-only question to the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtrlQuery {
    /// Which configuration; `None` (or a number past the latest) means the latest.
    pub num: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    reply: CtrlReply,
    last_active: Micros,
}

/// Default session lifetime without activity: 10 minutes of log time.
pub const SESSION_TTL: Micros = 600_000_000;

/// The controller's state machine.
///
/// Invariant: `configs[i].num == i`; `configs[0]` has no groups and every shard on group 0;
/// every later configuration is balanced after a Join or Leave and never names an unknown group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtrlerSm {
    configs: Vec<ShardConfig>,
    sessions: BTreeMap<u64, Session>,
}

impl Default for CtrlerSm {
    fn default() -> Self {
        CtrlerSm { configs: vec![ShardConfig::default()], sessions: BTreeMap::new() }
    }
}

/// Rebalances `shards` over `groups`: afterwards every shard is on a group of `groups` (or on
/// 0 if there is none), counts differ by at most one, and the fewest shards possible moved.
///
/// Deterministic: the groups that keep one shard more than the others are those holding the
/// most now (ties: smaller gid first); a group over its target gives up its highest-numbered
/// shards; freed shards go, lowest first, to the groups under target in gid order.
pub fn rebalance(shards: &mut [Gid; NSHARDS], groups: &BTreeSet<Gid>) {
    if groups.is_empty() {
        *shards = [0; NSHARDS];
        return;
    }
    let mut held: BTreeMap<Gid, Vec<usize>> = groups.iter().map(|&g| (g, Vec::new())).collect();
    let mut free = Vec::new();
    for (s, g) in shards.iter().enumerate() {
        match held.get_mut(g) {
            Some(v) => v.push(s),
            None => free.push(s),
        }
    }
    let n = groups.len();
    let (base, extra) = (NSHARDS / n, NSHARDS % n);
    let mut order: Vec<Gid> = groups.iter().copied().collect();
    order.sort_by_key(|g| (std::cmp::Reverse(held[g].len()), *g));
    let target: BTreeMap<Gid, usize> =
        order.iter().enumerate().map(|(i, &g)| (g, base + usize::from(i < extra))).collect();
    for (g, v) in held.iter_mut() {
        while v.len() > target[g] {
            free.push(v.pop().expect("over target"));
        }
    }
    free.sort_unstable();
    let mut free = free.into_iter();
    for (g, v) in held.iter_mut() {
        while v.len() < target[g] {
            let s = free.next().expect("targets sum to NSHARDS");
            v.push(s);
            shards[s] = *g;
        }
    }
    debug_assert!(free.next().is_none(), "every freed shard was placed");
}

impl CtrlerSm {
    /// Configuration `num` (`None` or past the latest: the latest).
    pub fn config(&self, num: Option<u64>) -> &ShardConfig {
        let latest = self.configs.last().expect("configuration 0 always exists");
        match num {
            Some(n) if (n as usize) < self.configs.len() => &self.configs[n as usize],
            _ => latest,
        }
    }

    /// Every configuration, in order.
    pub fn configs(&self) -> &[ShardConfig] {
        &self.configs
    }

    /// Applies `op` to the latest configuration, making a new one; a refused change makes none.
    pub fn change(&mut self, op: &CtrlOp) -> CtrlReply {
        let cur = self.config(None);
        let mut next = ShardConfig { num: cur.num + 1, shards: cur.shards, groups: cur.groups.clone() };
        match op {
            CtrlOp::Join { groups } => {
                if groups.is_empty() {
                    return Err(CtrlError::Empty);
                }
                for (&g, servers) in groups {
                    if g == 0 {
                        return Err(CtrlError::ZeroGid);
                    }
                    if next.groups.contains_key(&g) {
                        return Err(CtrlError::AlreadyJoined(g));
                    }
                    if servers.is_empty() {
                        return Err(CtrlError::NoServers(g));
                    }
                }
                next.groups.extend(groups.iter().map(|(g, s)| (*g, s.clone())));
                rebalance(&mut next.shards, &next.groups.keys().copied().collect());
            }
            CtrlOp::Leave { gids } => {
                if gids.is_empty() {
                    return Err(CtrlError::Empty);
                }
                for g in gids {
                    if next.groups.remove(g).is_none() {
                        return Err(CtrlError::UnknownGroup(*g));
                    }
                }
                if next.groups.is_empty() {
                    return Err(CtrlError::LastGroup);
                }
                rebalance(&mut next.shards, &next.groups.keys().copied().collect());
            }
            CtrlOp::Move { shard, gid } => {
                if *shard >= NSHARDS {
                    return Err(CtrlError::BadShard { shard: *shard, max: NSHARDS });
                }
                if !next.groups.contains_key(gid) {
                    return Err(if *gid == 0 { CtrlError::ZeroGid } else { CtrlError::UnknownGroup(*gid) });
                }
                next.shards[*shard] = *gid;
            }
        }
        let num = next.num;
        self.configs.push(next);
        Ok(num)
    }

    fn execute(&mut self, req: CtrlRequest, now: Micros) -> CtrlReply {
        if let Some(s) = self.sessions.get(&req.client) {
            if req.seq == s.seq {
                return s.reply.clone();
            }
            if req.seq < s.seq {
                return Err(CtrlError::Stale);
            }
        }
        let reply = self.change(&req.op);
        self.sessions.insert(req.client, Session { seq: req.seq, reply: reply.clone(), last_active: now });
        self.sessions.retain(|_, s| s.last_active.saturating_add(SESSION_TTL) >= now);
        reply
    }
}

impl StateMachine for CtrlerSm {
    fn apply(&mut self, cmd: &[u8], ctx: ApplyCtx) -> Vec<u8> {
        let reply = match postcard::from_bytes::<CtrlRequest>(cmd) {
            Ok(req) => self.execute(req, ctx.time),
            Err(e) => Err(CtrlError::Malformed(e.to_string())),
        };
        postcard::to_allocvec(&reply).expect("encodes")
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let reply = match postcard::from_bytes::<CtrlQuery>(query) {
            Ok(q) => Ok(self.config(q.num).clone()),
            Err(e) => Err(CtrlError::Malformed(e.to_string())),
        };
        postcard::to_allocvec(&reply).expect("encodes")
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encodes")
    }

    fn restore(&mut self, snapshot: &[u8]) {
        *self = postcard::from_bytes(snapshot).expect("snapshots are our own encoding");
    }
}

/// A controller server: the replicated [`CtrlerSm`] served to clerks (RsmRequests) and to
/// replica groups, which ask for configurations by number with one-way messages. Any replica
/// that has applied configuration `n` answers for it: configurations never change once made,
/// so a follower's copy is as good as the leader's.
pub struct CtrlerServer<S: Storage> {
    node: RsmNode<S, CtrlerSm>,
}

impl<S: Storage> CtrlerServer<S> {
    /// A server over `node`.
    pub fn new(node: RsmNode<S, CtrlerSm>) -> Self {
        CtrlerServer { node }
    }

    /// The replicated state machine node.
    pub fn node(&self) -> &RsmNode<S, CtrlerSm> {
        &self.node
    }

    /// With group commit (`RsmNode::with_group_commit`): runs the deferred Ready loop once for
    /// the batch of events just handled. A driver of such a server calls it after each batch.
    pub fn flush(&mut self, ctx: &mut dyn Ctx) {
        self.node.flush(&mut RaftCtx(ctx));
    }
}

impl<S: Storage> Node for CtrlerServer<S> {
    fn on_start(&mut self, ctx: &mut dyn Ctx) {
        self.node.on_start(&mut RaftCtx(ctx));
    }

    fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64) {
        self.node.on_timer(&mut RaftCtx(ctx), id);
    }

    fn on_message(&mut self, ctx: &mut dyn Ctx, from: Endpoint, message: Vec<u8>) {
        match postcard::from_bytes::<Wire>(&message) {
            Ok(Wire::Raft(m)) => self.node.on_message(&mut RaftCtx(ctx), from, m),
            Ok(Wire::ConfigQuery { num }) => {
                let sm = self.node.rsm().state_machine();
                if (num as usize) < sm.configs.len() {
                    ctx.send(from, Wire::ConfigReply { config: sm.configs[num as usize].clone() }.encode());
                }
            }
            _ => {} // not for a controller, or garbage: dropped
        }
    }

    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
        self.node.on_request(&mut RaftCtx(ctx), from, call, request);
    }

    fn on_shutdown(&mut self, ctx: &mut dyn Ctx) {
        self.node.on_shutdown(&mut RaftCtx(ctx));
    }
}

/// The controller's client: finds the leader, retries until answered; changes are exactly-once.
pub struct CtrlerClerk<T> {
    t: T,
    servers: Vec<Endpoint>,
    leader: usize,
    client: u64,
    seq: u64,
}

impl<T: Transport> CtrlerClerk<T> {
    /// A clerk with the unique id `client` for the controller servers `servers`.
    pub fn new(t: T, servers: Vec<Endpoint>, client: u64) -> Self {
        assert!(!servers.is_empty(), "a clerk needs at least one server");
        CtrlerClerk { t, servers, leader: 0, client, seq: 0 }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.t
    }

    async fn change(&mut self, op: CtrlOp) -> CtrlReply {
        self.seq += 1;
        let cmd = postcard::to_allocvec(&CtrlRequest { client: self.client, seq: self.seq, op }).expect("encodes");
        let req = postcard::to_allocvec(&RsmRequest::Command(cmd)).expect("encodes");
        match call_rsm(&self.t, &self.servers, &mut self.leader, &req, None).await {
            Some(Ok(bytes)) => {
                postcard::from_bytes(&bytes).unwrap_or_else(|e| Err(CtrlError::Malformed(e.to_string())))
            }
            Some(Err(m)) => Err(CtrlError::Malformed(m)),
            None => unreachable!("unbounded retries always end with an answer"),
        }
    }

    /// Adds groups; returns the new configuration's number.
    pub async fn join(&mut self, groups: BTreeMap<Gid, Vec<Endpoint>>) -> CtrlReply {
        self.change(CtrlOp::Join { groups }).await
    }

    /// Removes groups; returns the new configuration's number.
    pub async fn leave(&mut self, gids: Vec<Gid>) -> CtrlReply {
        self.change(CtrlOp::Leave { gids }).await
    }

    /// Moves one shard; returns the new configuration's number.
    pub async fn move_shard(&mut self, shard: usize, gid: Gid) -> CtrlReply {
        self.change(CtrlOp::Move { shard, gid }).await
    }

    /// Configuration `num` (`None`: the latest), linearizably (ReadIndex).
    pub async fn query(&mut self, num: Option<u64>) -> Result<ShardConfig, CtrlError> {
        self.query_rounds(num, None).await.expect("unbounded retries always end with an answer")
    }

    /// Like [`CtrlerClerk::query`] but gives up (`None`) after `rounds` rounds over the servers.
    pub async fn query_rounds(
        &mut self,
        num: Option<u64>,
        rounds: Option<usize>,
    ) -> Option<Result<ShardConfig, CtrlError>> {
        let q = postcard::to_allocvec(&CtrlQuery { num }).expect("encodes");
        let req = postcard::to_allocvec(&RsmRequest::Query(q)).expect("encodes");
        Some(match call_rsm(&self.t, &self.servers, &mut self.leader, &req, rounds).await? {
            Ok(bytes) => postcard::from_bytes(&bytes).unwrap_or_else(|e| Err(CtrlError::Malformed(e.to_string()))),
            Err(m) => Err(CtrlError::Malformed(m)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(sm: &mut CtrlerSm, gids: &[Gid]) -> CtrlReply {
        sm.change(&CtrlOp::Join { groups: gids.iter().map(|&g| (g, vec![g * 10])).collect() })
    }

    #[test]
    fn bad_input_is_refused_and_makes_no_config() {
        let mut sm = CtrlerSm::default();
        assert_eq!(sm.change(&CtrlOp::Leave { gids: vec![1] }), Err(CtrlError::UnknownGroup(1)));
        assert_eq!(join(&mut sm, &[0]), Err(CtrlError::ZeroGid));
        assert_eq!(join(&mut sm, &[]), Err(CtrlError::Empty));
        assert_eq!(sm.change(&CtrlOp::Join { groups: [(5, vec![])].into() }), Err(CtrlError::NoServers(5)));
        assert_eq!(join(&mut sm, &[1]), Ok(1));
        assert_eq!(join(&mut sm, &[1]), Err(CtrlError::AlreadyJoined(1)));
        assert_eq!(sm.change(&CtrlOp::Leave { gids: vec![1] }), Err(CtrlError::LastGroup));
        assert_eq!(
            sm.change(&CtrlOp::Move { shard: NSHARDS, gid: 1 }),
            Err(CtrlError::BadShard { shard: 10, max: 10 })
        );
        assert_eq!(sm.change(&CtrlOp::Move { shard: 0, gid: 2 }), Err(CtrlError::UnknownGroup(2)));
        assert_eq!(sm.configs().len(), 2, "only the good Join made a configuration");
        assert_eq!(sm.config(None).shards, [1; NSHARDS]);
    }

    #[test]
    fn sessions_make_changes_exactly_once() {
        let mut sm = CtrlerSm::default();
        let req = |seq, op| postcard::to_allocvec(&CtrlRequest { client: 7, seq, op }).unwrap();
        let j = CtrlOp::Join { groups: [(1, vec![1])].into() };
        let ctx = ApplyCtx { index: 1, time: 0 };
        let r1: CtrlReply = postcard::from_bytes(&sm.apply(&req(1, j.clone()), ctx)).unwrap();
        let r2: CtrlReply = postcard::from_bytes(&sm.apply(&req(1, j.clone()), ctx)).unwrap();
        assert_eq!((r1, r2), (Ok(1), Ok(1)), "the retry is answered, not applied");
        assert_eq!(sm.configs().len(), 2);
        let j2 = CtrlOp::Join { groups: [(2, vec![2])].into() };
        let _: CtrlReply = postcard::from_bytes(&sm.apply(&req(2, j2), ctx)).unwrap();
        let r3: CtrlReply = postcard::from_bytes(&sm.apply(&req(1, j), ctx)).unwrap();
        assert_eq!(r3, Err(CtrlError::Stale));
        let mut other = CtrlerSm::default();
        other.restore(&sm.snapshot());
        assert_eq!(other, sm);
    }
}
