//! The fault-tolerant key/value service: [`KvSm`] replicated by `sixfive-rsm`, and the
//! [`RaftClerk`] that finds the leader.
//!
//! Exactly-once: every write carries (client id, sequence number); the state machine keeps,
//! per client, the last sequence number applied and its reply, and answers a retry from that
//! record instead of applying it again. The session table is part of the snapshot. It is
//! bounded: sessions idle longer than a TTL (measured in leader-stamped log time, so every
//! replica expires the same sessions at the same log position) are dropped, and beyond a
//! maximum count the least recently active go first.
//!
//! Reads (Get, Scan) go through ReadIndex: linearizable, without a log entry. A read on a
//! minority side never answers: the leader there cannot confirm its leadership.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sixfive_rpc::{Endpoint, Micros, Transport};
use sixfive_rsm::{ApplyCtx, RsmReply, RsmRequest, StateMachine, SubmitError};

use crate::clerk::{History, KvClient, Record};
use crate::server::Request;
use crate::store::{KvError, KvStore, Op, OpResult};

/// Default session lifetime without activity: 10 minutes of log time.
pub const SESSION_TTL: Micros = 600_000_000;
/// Default most sessions kept.
pub const MAX_SESSIONS: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    reply: OpResult,
    last_active: Micros,
}

/// The replicated key/value state machine.
///
/// Invariant: `by_activity` holds exactly one `(last_active, client)` per session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSm {
    store: KvStore,
    sessions: BTreeMap<u64, Session>,
    #[serde(skip)]
    by_activity: BTreeSet<(Micros, u64)>,
    ttl: Micros,
    max_sessions: usize,
}

impl Default for KvSm {
    fn default() -> Self {
        KvSm::with_limits(SESSION_TTL, MAX_SESSIONS)
    }
}

impl KvSm {
    /// A state machine whose sessions expire after `ttl` of log time and number at most `max`.
    pub fn with_limits(ttl: Micros, max: usize) -> KvSm {
        KvSm {
            store: KvStore::default(),
            sessions: BTreeMap::new(),
            by_activity: BTreeSet::new(),
            ttl,
            max_sessions: max,
        }
    }

    /// The store.
    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// Number of client sessions kept.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn execute(&mut self, req: Request, now: Micros) -> OpResult {
        if let Some(s) = self.sessions.get(&req.client) {
            if req.seq == s.seq {
                return s.reply.clone(); // a retry: answer it, do not apply it again
            }
            if req.seq < s.seq {
                return OpResult::Err(KvError::Stale);
            }
        }
        let reply = self.store.apply(req.op);
        if let Some(old) =
            self.sessions.insert(req.client, Session { seq: req.seq, reply: reply.clone(), last_active: now })
        {
            self.by_activity.remove(&(old.last_active, req.client));
        }
        self.by_activity.insert((now, req.client));
        self.expire(now);
        reply
    }

    /// Drops idle sessions, then the least recently active beyond the maximum. Depends only on
    /// the log, so every replica drops the same ones.
    fn expire(&mut self, now: Micros) {
        while let Some(&(t, client)) = self.by_activity.first() {
            if t.saturating_add(self.ttl) >= now && self.sessions.len() <= self.max_sessions {
                break;
            }
            self.by_activity.pop_first();
            self.sessions.remove(&client);
        }
    }
}

impl StateMachine for KvSm {
    fn apply(&mut self, cmd: &[u8], ctx: ApplyCtx) -> Vec<u8> {
        let reply = match postcard::from_bytes::<Request>(cmd) {
            Ok(req) => self.execute(req, ctx.time),
            Err(e) => OpResult::Err(KvError::Malformed(e.to_string())),
        };
        postcard::to_allocvec(&reply).expect("encodes")
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let reply = match postcard::from_bytes::<Op>(query) {
            Ok(op) if op.is_read_only() => self.store.read(&op),
            Ok(_) => OpResult::Err(KvError::Malformed("a write sent as a query".into())),
            Err(e) => OpResult::Err(KvError::Malformed(e.to_string())),
        };
        postcard::to_allocvec(&reply).expect("encodes")
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encodes")
    }

    fn restore(&mut self, snapshot: &[u8]) {
        let mut sm: KvSm = postcard::from_bytes(snapshot).expect("snapshots are our own encoding");
        sm.by_activity = sm.sessions.iter().map(|(c, s)| (s.last_active, *c)).collect();
        *self = sm;
    }
}

/// How long the clerk waits for one server before trying another.
pub const RAFT_CALL_TIMEOUT: Micros = 1_000_000;
/// Pause after every server failed once in a row.
pub const ROUND_PAUSE: Micros = 50_000;

/// The client of the replicated service: finds the leader, remembers it, retries elsewhere on
/// error or timeout. Writes are exactly-once through the session (client id, sequence).
pub struct RaftClerk<T> {
    t: T,
    servers: Vec<Endpoint>,
    leader: usize,
    client: u64,
    seq: u64,
    history: Option<History>,
}

impl<T: Transport> RaftClerk<T> {
    /// A clerk with the unique id `client` for the cluster `servers`.
    pub fn new(t: T, servers: Vec<Endpoint>, client: u64) -> RaftClerk<T> {
        assert!(!servers.is_empty(), "a clerk needs at least one server");
        RaftClerk { t, servers, leader: 0, client, seq: 0, history: None }
    }

    /// Records every operation into `h`.
    pub fn with_history(mut self, h: History) -> RaftClerk<T> {
        self.history = Some(h);
        self
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Runs `op` until some leader answers.
    async fn run_op(&mut self, op: Op) -> OpResult {
        let call = self.t.now();
        let req = if op.is_read_only() {
            RsmRequest::Query(postcard::to_allocvec(&op).expect("encodes"))
        } else {
            self.seq += 1;
            RsmRequest::Command(
                postcard::to_allocvec(&Request { client: self.client, seq: self.seq, op: op.clone() })
                    .expect("encodes"),
            )
        };
        let bytes = postcard::to_allocvec(&req).expect("encodes");
        let mut failures_in_a_row = 0;
        let result = loop {
            let to = self.servers[self.leader];
            let reply = self
                .t
                .call(to, bytes.clone(), RAFT_CALL_TIMEOUT)
                .await
                .ok()
                .and_then(|b| postcard::from_bytes::<RsmReply>(&b).ok());
            match reply {
                Some(RsmReply::Done(r)) => {
                    break postcard::from_bytes::<OpResult>(&r)
                        .unwrap_or_else(|e| OpResult::Err(KvError::Malformed(e.to_string())));
                }
                Some(RsmReply::Malformed(m)) => break OpResult::Err(KvError::Malformed(m)),
                Some(RsmReply::Failed(
                    SubmitError::WrongLeader { leader: Some(l) } | SubmitError::Abandoned { leader: Some(l) },
                )) if self.servers.contains(&l) => {
                    self.leader = self.servers.iter().position(|&s| s == l).expect("contains");
                }
                // The leader is overloaded (back-pressure): not applied; wait, then retry it.
                Some(RsmReply::Failed(SubmitError::Busy)) => self.t.sleep(ROUND_PAUSE).await,
                _ => self.leader = (self.leader + 1) % self.servers.len(),
            }
            failures_in_a_row += 1;
            if failures_in_a_row % self.servers.len() == 0 {
                self.t.sleep(ROUND_PAUSE).await;
            }
        };
        if let Some(h) = &self.history {
            h.push(Record { client: self.client, call, ret: Some(self.t.now()), op, result: Some(result.clone()) });
        }
        result
    }
}

/// Writes are exactly-once (sessions); Gets and Scans are linearizable through ReadIndex.
impl<T: Transport> KvClient for RaftClerk<T> {
    async fn run(&mut self, op: Op) -> OpResult {
        self.run_op(op).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(client: u64, seq: u64, op: Op) -> Vec<u8> {
        postcard::to_allocvec(&Request { client, seq, op }).unwrap()
    }
    fn append(k: &str, a: &str) -> Op {
        Op::Append { key: k.into(), arg: a.into() }
    }
    fn apply(sm: &mut KvSm, c: Vec<u8>, index: u64, time: Micros) -> OpResult {
        postcard::from_bytes(&sm.apply(&c, ApplyCtx { index, time })).unwrap()
    }

    #[test]
    fn retries_are_answered_not_reapplied() {
        let mut sm = KvSm::default();
        assert_eq!(apply(&mut sm, cmd(1, 1, append("k", "x")), 1, 0), OpResult::Appended { old: "".into() });
        assert_eq!(
            apply(&mut sm, cmd(1, 1, append("k", "x")), 2, 0),
            OpResult::Appended { old: "".into() },
            "retry answered from the session"
        );
        assert_eq!(apply(&mut sm, cmd(1, 2, append("k", "y")), 3, 0), OpResult::Appended { old: "x".into() });
        assert_eq!(
            apply(&mut sm, cmd(1, 1, append("k", "x")), 4, 0),
            OpResult::Err(KvError::Stale),
            "an old duplicate is refused"
        );
        let q = postcard::to_allocvec(&Op::Get { key: "k".into() }).unwrap();
        let got: OpResult = postcard::from_bytes(&sm.query(&q)).unwrap();
        assert_eq!(got, OpResult::Value { value: "xy".into(), version: 2 });
    }

    #[test]
    fn sessions_survive_snapshot_and_restore() {
        let mut sm = KvSm::default();
        apply(&mut sm, cmd(7, 1, append("k", "x")), 1, 5);
        let mut other = KvSm::default();
        other.restore(&sm.snapshot());
        assert_eq!(other, sm);
        assert_eq!(apply(&mut other, cmd(7, 1, append("k", "x")), 2, 6), OpResult::Appended { old: "".into() });
        assert_eq!(other.store().read(&Op::Get { key: "k".into() }), OpResult::Value { value: "x".into(), version: 1 });
    }

    #[test]
    fn sessions_expire_deterministically_and_stay_bounded() {
        let log: Vec<(Vec<u8>, Micros)> =
            (0..50u64).map(|i| (cmd(i % 7, i / 7 + 1, append("k", "z")), i * 3)).collect();
        let run = || {
            let mut sm = KvSm::with_limits(20, 4);
            for (i, (c, t)) in log.iter().enumerate() {
                apply(&mut sm, c.clone(), i as u64 + 1, *t);
                assert!(sm.sessions() <= 4, "more sessions than the maximum");
            }
            sm
        };
        let (a, b) = (run(), run());
        assert_eq!(a.snapshot(), b.snapshot(), "two replicas of the same log keep the same sessions");
        // At log time 147 with a 20 us TTL, only clients active since 127 remain.
        assert!(a.sessions.values().all(|s| s.last_active + 20 >= 147));
        assert!(a.sessions() >= 1);
        // An expired client's retry is applied again (documented cost of expiry).
        let mut sm = KvSm::with_limits(10, 100);
        apply(&mut sm, cmd(1, 1, append("e", "a")), 1, 0);
        apply(&mut sm, cmd(2, 1, append("f", "b")), 2, 100);
        assert_eq!(sm.sessions(), 1, "client 1 expired");
    }
}
