//! The sharded service's client.
//!
//! [`ShardClerk`] keeps the latest configuration it has seen. Each operation goes to the group
//! that owns its key's shard there (to the server it last found leading); on `ErrWrongGroup`,
//! or when no server of the group answered in a whole round, it asks the controller for the
//! latest configuration and tries again. A write keeps its (client, sequence) through every
//! retry, in any group, so the shard's session (which moves with the shard) applies it once.
//!
//! A scan is scattered over the shards (each shard's part is read linearizably from its owner)
//! and merged in key order. The whole scan is not one atomic snapshot across shards: a write
//! to one shard may be seen while a concurrent write to another is not.

use std::collections::BTreeMap;

use sixfive_kv::{History, KvClient, KvError, Op, OpResult, Record, Request};
use sixfive_rpc::{Endpoint, Micros, Transport};
use sixfive_rsm::{RsmReply, RsmRequest, SubmitError};

use crate::ctrler::CtrlerClerk;
use crate::group::{GroupCmd, GroupReply, ShardRead};
use crate::{Gid, NSHARDS, ShardConfig, key2shard};

/// How long a clerk waits for one server.
pub const CALL_TIMEOUT: Micros = 1_000_000;
/// Pause after a whole round of servers failed.
pub const ROUND_PAUSE: Micros = 50_000;
/// Pause before asking the controller again after a group refused or did not answer.
pub const REQUERY_PAUSE: Micros = 100_000;

/// Sends `req` to the servers of one replicated state machine, starting with `*leader` and
/// following leader hints, until one answers `Done` (`Some(Ok)`) or `Malformed` (`Some(Err)`),
/// or (`None`) `rounds` rounds of failures have passed. `*leader` is left at the last server
/// that answered or was hinted.
pub(crate) async fn call_rsm<T: Transport>(
    t: &T,
    servers: &[Endpoint],
    leader: &mut usize,
    req: &[u8],
    rounds: Option<usize>,
) -> Option<Result<Vec<u8>, String>> {
    let (mut failures, mut done_rounds) = (0usize, 0usize);
    loop {
        *leader %= servers.len();
        let reply =
            t.call(servers[*leader], req.to_vec(), CALL_TIMEOUT).await.ok().and_then(|b| postcard::from_bytes(&b).ok());
        match reply {
            Some(RsmReply::Done(r)) => return Some(Ok(r)),
            Some(RsmReply::Malformed(m)) => return Some(Err(m)),
            Some(RsmReply::Failed(
                SubmitError::WrongLeader { leader: Some(l) } | SubmitError::Abandoned { leader: Some(l) },
            )) if servers.contains(&l) && servers[*leader] != l => {
                *leader = servers.iter().position(|&s| s == l).expect("contains");
            }
            _ => *leader = (*leader + 1) % servers.len(),
        }
        failures += 1;
        if failures == servers.len() {
            failures = 0;
            done_rounds += 1;
            if rounds.is_some_and(|r| done_rounds >= r) {
                return None;
            }
            t.sleep(ROUND_PAUSE).await;
        }
    }
}

/// The client of the sharded key/value service.
pub struct ShardClerk<T> {
    t: T,
    ctrl: CtrlerClerk<T>,
    config: ShardConfig,
    leaders: BTreeMap<Gid, usize>,
    client: u64,
    seq: u64,
    history: Option<History>,
}

impl<T: Transport + Clone> ShardClerk<T> {
    /// A clerk with the unique id `client`, finding groups through the controller `ctrlers`.
    pub fn new(t: T, ctrlers: Vec<Endpoint>, client: u64) -> Self {
        ShardClerk {
            ctrl: CtrlerClerk::new(t.clone(), ctrlers, client),
            t,
            config: ShardConfig::default(),
            leaders: BTreeMap::new(),
            client,
            seq: 0,
            history: None,
        }
    }

    /// Records every Get, Put, Append and Delete into `h` (scans span shards and are not
    /// recorded).
    pub fn with_history(mut self, h: History) -> Self {
        self.history = Some(h);
        self
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// The configuration the clerk last saw.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Sends the request for `shard` to its owner until a group answers it.
    async fn route(&mut self, shard: usize, req: &[u8]) -> OpResult {
        loop {
            let gid = self.config.shards[shard];
            if let Some(servers) = self.config.groups.get(&gid) {
                let mut leader = self.leaders.get(&gid).copied().unwrap_or(0);
                let reply = call_rsm(&self.t, servers, &mut leader, req, Some(1)).await;
                self.leaders.insert(gid, leader);
                match reply {
                    Some(Ok(bytes)) => match postcard::from_bytes::<GroupReply>(&bytes) {
                        Ok(GroupReply::Done(r)) => return r,
                        Ok(GroupReply::WrongGroup) => {}
                        Err(e) => return OpResult::Err(KvError::Malformed(e.to_string())),
                    },
                    Some(Err(m)) => return OpResult::Err(KvError::Malformed(m)),
                    None => {}
                }
            }
            // A newer configuration is tried at once; the same one again only after a pause
            // (the owner may still be waiting for the shard).
            match self.ctrl.query(None).await {
                Ok(c) if c.num > self.config.num => self.config = c,
                _ => self.t.sleep(REQUERY_PAUSE).await,
            }
        }
    }

    async fn run_op(&mut self, op: Op) -> OpResult {
        if let Op::Scan { start, end, limit } = op {
            return self.scan_shards(start, end, limit).await;
        }
        let call = self.t.now();
        let shard = key2shard(op.key());
        let req = if op.is_read_only() {
            RsmRequest::Query(postcard::to_allocvec(&ShardRead { shard, op: op.clone() }).expect("encodes"))
        } else {
            self.seq += 1;
            let cmd = GroupCmd::Client(Request { client: self.client, seq: self.seq, op: op.clone() });
            RsmRequest::Command(postcard::to_allocvec(&cmd).expect("encodes"))
        };
        let result = self.route(shard, &postcard::to_allocvec(&req).expect("encodes")).await;
        if let Some(h) = &self.history {
            h.push(Record { client: self.client, call, ret: Some(self.t.now()), op, result: Some(result.clone()) });
        }
        result
    }

    /// Scatter: each shard's first `limit` entries in range, from its owner; merge: the first
    /// `limit` of their union in key order.
    async fn scan_shards(&mut self, start: String, end: Option<String>, limit: u32) -> OpResult {
        let mut all = Vec::new();
        for shard in 0..NSHARDS {
            let op = Op::Scan { start: start.clone(), end: end.clone(), limit };
            let q = postcard::to_allocvec(&ShardRead { shard, op }).expect("encodes");
            let req = postcard::to_allocvec(&RsmRequest::Query(q)).expect("encodes");
            match self.route(shard, &req).await {
                OpResult::Entries(e) => all.extend(e),
                OpResult::Err(e) => return OpResult::Err(e),
                r => return OpResult::Err(KvError::Malformed(format!("unexpected scan reply {r:?}"))),
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit as usize);
        OpResult::Entries(all)
    }
}

/// Writes are exactly-once (per-shard sessions that migrate with the shard); Gets are
/// linearizable (ReadIndex at the owner); Scans are scattered and merged per shard.
impl<T: Transport + Clone> KvClient for ShardClerk<T> {
    async fn run(&mut self, op: Op) -> OpResult {
        self.run_op(op).await
    }
}
