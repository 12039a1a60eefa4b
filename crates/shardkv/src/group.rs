//! A replica group: [`ShardSm`], the key/value state machine of one group, replicated by
//! `sixfive-rsm`, and [`ShardServer`], the node that serves it, follows the controller and
//! hands shards over (see the crate documentation for the protocol and the shard states).
//!
//! Every change of ownership is a command in the group's own log (a new configuration, a
//! shard installed, a shard deleted), so all replicas of a group agree on which shards it
//! serves at every log position, and a client operation is checked against that ownership at
//! the position where it is applied (writes) or read (ReadIndex reads).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sixfive_kv::{KvError, KvStore, Op, OpResult, Request};
use sixfive_raft::{Role, Storage, Term};
use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node};
use sixfive_rsm::{ApplyCtx, RsmNode, StateMachine};

use crate::{Gid, NSHARDS, POLL_MICROS, POLL_TIMER, RaftCtx, ShardConfig, Wire, key2shard};

/// Default session lifetime without activity: 10 minutes of log time.
pub const SESSION_TTL: Micros = 600_000_000;

/// Where a shard stands in a group (see the crate documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    /// Not this group's, and no data held.
    #[default]
    Absent,
    /// Owned in the current configuration and present: client operations are answered.
    Serving,
    /// Owned in the current configuration; its data has not arrived yet.
    Waiting,
    /// Owned in the previous configuration, not in the current one: frozen, kept until the new
    /// owner acknowledges it, then deleted.
    Sending,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    reply: OpResult,
    last_active: Micros,
}

/// A shard's contents: its keys and the session table of the clerks that wrote to it. They
/// always travel together, so a write retried at the new owner is answered from the session
/// instead of being applied twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardData {
    store: KvStore,
    sessions: BTreeMap<u64, Session>,
}

impl ShardData {
    /// Number of keys.
    pub fn keys(&self) -> usize {
        self.store.len()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Shard {
    state: ShardState,
    /// Invariant: empty when `state` is `Absent` or `Waiting`.
    data: ShardData,
}

/// A command in a group's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum GroupCmd {
    /// A clerk's write (or a read sent as a command).
    Client(Request),
    /// Move to this configuration (ignored unless it is the next one and every shard is settled).
    Config(ShardConfig),
    /// A shard received for configuration `num` (ignored unless it is awaited).
    Install {
        /// Configuration.
        num: u64,
        /// Shard.
        shard: usize,
        /// Its contents.
        data: ShardData,
    },
    /// The new owner has shard `shard` of configuration `num`: drop it (ignored unless it is
    /// being sent).
    Delete {
        /// Configuration.
        num: u64,
        /// Shard.
        shard: usize,
    },
}

/// A read-only question (ReadIndex): a Get, or a Scan of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRead {
    /// The shard asked (for a Get, it must be the key's).
    pub shard: usize,
    /// The read.
    pub op: Op,
}

/// A group's answer to a clerk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupReply {
    /// The operation's result.
    Done(OpResult),
    /// This group does not serve that shard now (ErrWrongGroup): ask the controller again.
    WrongGroup,
}

/// The state machine of one replica group.
///
/// Invariants: `shards.len() == NSHARDS`; a shard is `Serving` or `Waiting` only if
/// `config.shards[s] == gid`, and `Sending` only if `prev.shards[s] == gid` and
/// `config.shards[s] != gid`; `prev.num + 1 == config.num` (after the first configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSm {
    gid: Gid,
    config: ShardConfig,
    prev: ShardConfig,
    shards: Vec<Shard>,
    /// Log time of the next sweep of idle sessions.
    next_sweep: Micros,
}

impl ShardSm {
    /// The state machine of group `gid`, at configuration 0.
    pub fn new(gid: Gid) -> ShardSm {
        assert!(gid != 0, "group id 0 is reserved");
        ShardSm {
            gid,
            config: ShardConfig::default(),
            prev: ShardConfig::default(),
            shards: vec![Shard::default(); NSHARDS],
            next_sweep: 0,
        }
    }

    /// The group's id.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The configuration the group is in.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Each shard's state.
    pub fn states(&self) -> [ShardState; NSHARDS] {
        std::array::from_fn(|s| self.shards[s].state)
    }

    /// Shards answered now.
    pub fn serving(&self) -> Vec<usize> {
        (0..NSHARDS).filter(|&s| self.shards[s].state == ShardState::Serving).collect()
    }

    /// Keys held in each shard (present only while `Serving` or `Sending`).
    pub fn keys_held(&self) -> [usize; NSHARDS] {
        std::array::from_fn(|s| self.shards[s].data.keys())
    }

    /// Whether no shard is on its way in or out: only then may the next configuration come.
    pub fn settled(&self) -> bool {
        self.shards.iter().all(|s| matches!(s.state, ShardState::Serving | ShardState::Absent))
    }

    fn check_invariants(&self) {
        for (s, sh) in self.shards.iter().enumerate() {
            let owned = self.config.shards[s] == self.gid;
            match sh.state {
                ShardState::Serving | ShardState::Waiting => assert!(owned, "shard {s} {:?} but not owned", sh.state),
                ShardState::Sending => assert!(!owned && self.prev.shards[s] == self.gid, "shard {s} Sending"),
                ShardState::Absent => assert!(!owned, "shard {s} owned but Absent"),
            }
            if matches!(sh.state, ShardState::Absent | ShardState::Waiting) {
                assert!(sh.data == ShardData::default(), "shard {s} {:?} holds data", sh.state);
            }
        }
    }

    fn client(&mut self, req: Request, now: Micros) -> GroupReply {
        let s = key2shard(req.op.key());
        if req.op.is_read_only() {
            return self.read(&ShardRead { shard: s, op: req.op });
        }
        let sweep = now >= self.next_sweep;
        let shard = &mut self.shards[s];
        if shard.state != ShardState::Serving {
            return GroupReply::WrongGroup;
        }
        if let Some(sess) = shard.data.sessions.get(&req.client) {
            if req.seq == sess.seq {
                return GroupReply::Done(sess.reply.clone());
            }
            if req.seq < sess.seq {
                return GroupReply::Done(OpResult::Err(KvError::Stale));
            }
        }
        let reply = shard.data.store.apply(req.op);
        shard.data.sessions.insert(req.client, Session { seq: req.seq, reply: reply.clone(), last_active: now });
        if sweep {
            // Idle sessions go; decided by log time only, so every replica drops the same ones.
            for sh in &mut self.shards {
                sh.data.sessions.retain(|_, x| x.last_active.saturating_add(SESSION_TTL) >= now);
            }
            self.next_sweep = now + SESSION_TTL / 16;
        }
        GroupReply::Done(reply)
    }

    fn read(&self, r: &ShardRead) -> GroupReply {
        if r.shard >= NSHARDS {
            return GroupReply::Done(OpResult::Err(KvError::Malformed(format!("shard {} out of range", r.shard))));
        }
        match &r.op {
            Op::Get { key } if key2shard(key) != r.shard => {
                return GroupReply::Done(OpResult::Err(KvError::Malformed(format!(
                    "key {key:?} is in shard {}, not {}",
                    key2shard(key),
                    r.shard
                ))));
            }
            op if !op.is_read_only() => {
                return GroupReply::Done(OpResult::Err(KvError::Malformed("a write sent as a query".into())));
            }
            _ => {}
        }
        let shard = &self.shards[r.shard];
        if shard.state != ShardState::Serving {
            return GroupReply::WrongGroup;
        }
        GroupReply::Done(shard.data.store.read(&r.op))
    }

    fn next_config(&mut self, next: ShardConfig) {
        if next.num != self.config.num + 1 || !self.settled() {
            return; // a stale or early proposal: configurations go one at a time
        }
        for s in 0..NSHARDS {
            let (was, now) = (self.config.shards[s], next.shards[s]);
            let shard = &mut self.shards[s];
            shard.state = match (was == self.gid, now == self.gid) {
                (true, true) => ShardState::Serving,
                (false, true) if was == 0 => ShardState::Serving, // nobody had it: starts empty
                (false, true) => ShardState::Waiting,
                (true, false) => ShardState::Sending,
                (false, false) => ShardState::Absent,
            };
        }
        self.prev = std::mem::replace(&mut self.config, next);
    }

    fn install(&mut self, num: u64, shard: usize, data: ShardData) {
        if num == self.config.num && shard < NSHARDS && self.shards[shard].state == ShardState::Waiting {
            self.shards[shard] = Shard { state: ShardState::Serving, data };
        }
    }

    fn delete(&mut self, num: u64, shard: usize) {
        if num == self.config.num && shard < NSHARDS && self.shards[shard].state == ShardState::Sending {
            self.shards[shard] = Shard::default();
        }
    }
}

impl StateMachine for ShardSm {
    fn apply(&mut self, cmd: &[u8], ctx: ApplyCtx) -> Vec<u8> {
        let reply = match postcard::from_bytes::<GroupCmd>(cmd) {
            Ok(GroupCmd::Client(req)) => self.client(req, ctx.time),
            Ok(GroupCmd::Config(c)) => {
                self.next_config(c);
                GroupReply::Done(OpResult::Ok)
            }
            Ok(GroupCmd::Install { num, shard, data }) => {
                self.install(num, shard, data);
                GroupReply::Done(OpResult::Ok)
            }
            Ok(GroupCmd::Delete { num, shard }) => {
                self.delete(num, shard);
                GroupReply::Done(OpResult::Ok)
            }
            Err(e) => GroupReply::Done(OpResult::Err(KvError::Malformed(e.to_string()))),
        };
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
        postcard::to_allocvec(&reply).expect("encodes")
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let reply = match postcard::from_bytes::<ShardRead>(query) {
            Ok(r) => self.read(&r),
            Err(e) => GroupReply::Done(OpResult::Err(KvError::Malformed(e.to_string()))),
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

/// What a leader proposed for the group's own protocol, so it does not propose it again in
/// the same term (an entry of a leader's term is never lost while it leads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proposal {
    Config(u64),
    Install(u64, usize),
    Delete(u64, usize),
}

/// A replica group's server: the replicated [`ShardSm`] served to clerks (RsmRequests:
/// commands carry [`GroupCmd::Client`], queries [`ShardRead`], answers are [`GroupReply`]),
/// plus, while it leads, the loop that polls the controller and pushes shards given away.
pub struct ShardServer<S: Storage> {
    node: RsmNode<S, ShardSm>,
    peers: Vec<Endpoint>,
    ctrlers: Vec<Endpoint>,
    next_ctrler: usize,
    proposed: BTreeMap<Proposal, Term>,
    /// Configuration number and shard states when last looked at: a change triggers a poll
    /// at once (push what was just given away, ask for the next configuration when settled)
    /// instead of waiting for the timer.
    seen: (u64, [ShardState; NSHARDS]),
    /// Who pushed each shard this group waits for: (configuration, shard) -> the sender's
    /// servers, acknowledged as soon as the shard is installed.
    senders: BTreeMap<(u64, usize), Vec<Endpoint>>,
}

impl<S: Storage> ShardServer<S> {
    /// A server of the group whose servers are `peers`, following the controller `ctrlers`.
    pub fn new(node: RsmNode<S, ShardSm>, peers: Vec<Endpoint>, ctrlers: Vec<Endpoint>) -> Self {
        assert!(!ctrlers.is_empty(), "a group needs a controller");
        let seen = (node.rsm().state_machine().config.num, node.rsm().state_machine().states());
        ShardServer { node, peers, ctrlers, next_ctrler: 0, proposed: BTreeMap::new(), seen, senders: BTreeMap::new() }
    }

    /// The replicated state machine node.
    pub fn node(&self) -> &RsmNode<S, ShardSm> {
        &self.node
    }

    /// The group's state machine.
    pub fn sm(&self) -> &ShardSm {
        self.node.rsm().state_machine()
    }

    /// With group commit (`RsmNode::with_group_commit`): runs the deferred Ready loop once for
    /// the batch of events just handled, then acts on what it applied. A driver of such a
    /// server calls it after each batch.
    pub fn flush(&mut self, ctx: &mut dyn Ctx) {
        self.node.flush(&mut RaftCtx(ctx));
        self.react(ctx);
    }

    fn leading(&self) -> Option<Term> {
        let st = self.node.rsm().status();
        (st.role == Role::Leader).then_some(st.term)
    }

    fn propose(&mut self, ctx: &mut dyn Ctx, what: Proposal, cmd: GroupCmd) {
        let Some(term) = self.leading() else { return };
        if self.proposed.get(&what) == Some(&term) {
            return;
        }
        let bytes = postcard::to_allocvec(&cmd).expect("encodes");
        if self.node.rsm_mut().submit(bytes, ctx.now()).is_ok() {
            self.proposed.insert(what, term);
            self.node.flush(&mut RaftCtx(ctx));
        }
    }

    /// After every event: if the group's configuration or shard states moved, act on it now.
    fn react(&mut self, ctx: &mut dyn Ctx) {
        let now = (self.sm().config.num, self.sm().states());
        if now == self.seen {
            return;
        }
        self.seen = now;
        let (num, states) = now;
        if self.leading().is_some() {
            // Acknowledge the shards just installed.
            for ((n, shard), to) in &self.senders {
                if *n == num && states[*shard] == ShardState::Serving {
                    let ack = Wire::ShardAck { num, shard: *shard }.encode();
                    for &e in to {
                        ctx.send(e, ack.clone());
                    }
                }
            }
            self.poll(ctx);
        }
        self.senders.retain(|(n, s), _| *n == num && states[*s] == ShardState::Waiting);
    }

    /// While leading: ask for the next configuration once settled, push every shard given away.
    fn poll(&mut self, ctx: &mut dyn Ctx) {
        let Some(term) = self.leading() else {
            self.proposed.clear();
            return;
        };
        // Forget proposals of other terms, and those a newer configuration has made moot.
        let num = self.sm().config.num;
        self.proposed.retain(|p, t| {
            *t == term
                && match *p {
                    Proposal::Config(n) => n > num,
                    Proposal::Install(n, _) | Proposal::Delete(n, _) => n >= num,
                }
        });
        let sm = self.node.rsm().state_machine();
        if sm.settled() {
            let to = self.ctrlers[self.next_ctrler % self.ctrlers.len()];
            self.next_ctrler += 1;
            ctx.send(to, Wire::ConfigQuery { num: sm.config.num + 1 }.encode());
        }
        for (s, shard) in sm.shards.iter().enumerate() {
            if shard.state != ShardState::Sending {
                continue;
            }
            let owner = sm.config.shards[s];
            let push = Wire::ShardPush {
                num: sm.config.num,
                shard: s,
                data: shard.data.clone(),
                reply_to: self.peers.clone(),
            }
            .encode();
            for &to in sm.config.groups.get(&owner).map(Vec::as_slice).unwrap_or_default() {
                ctx.send(to, push.clone());
            }
        }
    }
}

impl<S: Storage> Node for ShardServer<S> {
    fn on_start(&mut self, ctx: &mut dyn Ctx) {
        self.node.on_start(&mut RaftCtx(ctx));
        ctx.set_timer(POLL_MICROS, POLL_TIMER);
    }

    fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64) {
        if id == POLL_TIMER {
            self.poll(ctx);
            ctx.set_timer(POLL_MICROS, POLL_TIMER);
        } else {
            self.node.on_timer(&mut RaftCtx(ctx), id);
            self.react(ctx);
        }
    }

    fn on_message(&mut self, ctx: &mut dyn Ctx, from: Endpoint, message: Vec<u8>) {
        let Ok(wire) = postcard::from_bytes::<Wire>(&message) else { return };
        match wire {
            Wire::Raft(m) => self.node.on_message(&mut RaftCtx(ctx), from, m),
            Wire::ConfigReply { config } => {
                let sm = self.sm();
                if config.num == sm.config.num + 1 && sm.settled() {
                    let num = config.num;
                    self.propose(ctx, Proposal::Config(num), GroupCmd::Config(config));
                }
            }
            Wire::ShardPush { num, shard, data, reply_to } => {
                if self.leading().is_none() || shard >= NSHARDS {
                    return;
                }
                let sm = self.sm();
                let state = sm.shards[shard].state;
                if sm.config.num > num || (sm.config.num == num && state == ShardState::Serving) {
                    let ack = Wire::ShardAck { num, shard }.encode();
                    for to in reply_to {
                        ctx.send(to, ack.clone());
                    }
                } else if sm.config.num == num && state == ShardState::Waiting {
                    self.senders.insert((num, shard), reply_to);
                    self.propose(ctx, Proposal::Install(num, shard), GroupCmd::Install { num, shard, data });
                }
            }
            Wire::ShardAck { num, shard } => {
                let sm = self.sm();
                if shard < NSHARDS && sm.config.num == num && sm.shards[shard].state == ShardState::Sending {
                    self.propose(ctx, Proposal::Delete(num, shard), GroupCmd::Delete { num, shard });
                }
            }
            Wire::ConfigQuery { .. } => {} // for controllers
        }
        self.react(ctx);
    }

    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
        self.node.on_request(&mut RaftCtx(ctx), from, call, request);
        self.react(ctx);
    }

    fn on_shutdown(&mut self, ctx: &mut dyn Ctx) {
        self.node.on_shutdown(&mut RaftCtx(ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(sm: &mut ShardSm, cmd: GroupCmd, time: Micros) -> GroupReply {
        postcard::from_bytes(&sm.apply(&postcard::to_allocvec(&cmd).unwrap(), ApplyCtx { index: 1, time })).unwrap()
    }
    fn cfg(num: u64, shards: [Gid; NSHARDS]) -> ShardConfig {
        let groups = shards.iter().filter(|&&g| g != 0).map(|&g| (g, vec![g * 10 + 1])).collect();
        ShardConfig { num, shards, groups }
    }
    fn append(client: u64, seq: u64, key: &str) -> GroupCmd {
        GroupCmd::Client(Request { client, seq, op: Op::Append { key: key.into(), arg: "x".into() } })
    }

    #[test]
    fn shards_move_with_their_sessions_and_are_deleted_after() {
        let k = crate::key_in_shard("k", 3);
        let (mut a, mut b) = (ShardSm::new(1), ShardSm::new(2));
        let c1 = cfg(1, [1; NSHARDS]);
        apply(&mut a, GroupCmd::Config(c1.clone()), 0);
        apply(&mut b, GroupCmd::Config(c1), 0);
        assert_eq!(a.serving().len(), NSHARDS);
        assert!(b.serving().is_empty());
        assert_eq!(apply(&mut a, append(9, 1, &k), 1), GroupReply::Done(OpResult::Appended { old: "".into() }));
        let mut two = [1; NSHARDS];
        two[3] = 2;
        let c2 = cfg(2, two);
        apply(&mut a, GroupCmd::Config(c2.clone()), 2);
        apply(&mut b, GroupCmd::Config(c2), 2);
        assert_eq!(a.states()[3], ShardState::Sending);
        assert_eq!(b.states()[3], ShardState::Waiting);
        assert_eq!(apply(&mut a, append(9, 2, &k), 3), GroupReply::WrongGroup, "a frozen shard is not served");
        assert_eq!(apply(&mut b, append(9, 1, &k), 3), GroupReply::WrongGroup, "nor one not yet received");
        assert!(!a.settled() && !b.settled());
        let data = a.shards[3].data.clone();
        apply(&mut b, GroupCmd::Install { num: 2, shard: 3, data }, 4);
        assert_eq!(b.serving(), vec![3]);
        // The retry of seq 1 (applied by a, reply lost) is answered from the moved session.
        assert_eq!(apply(&mut b, append(9, 1, &k), 5), GroupReply::Done(OpResult::Appended { old: "".into() }));
        assert_eq!(apply(&mut b, append(9, 2, &k), 5), GroupReply::Done(OpResult::Appended { old: "x".into() }));
        apply(&mut a, GroupCmd::Delete { num: 1, shard: 3 }, 6);
        assert_eq!(a.states()[3], ShardState::Sending, "a delete for another configuration is ignored");
        apply(&mut a, GroupCmd::Delete { num: 2, shard: 3 }, 6);
        assert_eq!(a.states()[3], ShardState::Absent);
        assert_eq!(a.keys_held()[3], 0);
        assert!(a.settled() && b.settled());
    }

    #[test]
    fn configurations_go_one_at_a_time() {
        let mut a = ShardSm::new(1);
        apply(&mut a, GroupCmd::Config(cfg(2, [1; NSHARDS])), 0);
        assert_eq!(a.config().num, 0, "configuration 2 before 1 is ignored");
        apply(&mut a, GroupCmd::Config(cfg(1, [1; NSHARDS])), 0);
        assert_eq!(a.config().num, 1);
        let mut other = ShardSm::new(1);
        other.restore(&a.snapshot());
        assert_eq!(other, a);
    }
}
