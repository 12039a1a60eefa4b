//! The single-server key/value service (section 2): one [`KvStore`] behind RPC.
//!
//! Versioned Puts need no per-client state: a retried Put is made safe by its version (the
//! clerk turns a retry's ErrVersion into ErrMaybe). Appends are not idempotent, so for them the
//! server remembers, per client, the last Append's sequence number and reply; the reply is
//! dropped as soon as the client sends anything newer, so a large old value is not kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sixfive_rpc::{CallId, Ctx, Endpoint, Node};

use crate::store::{KvError, KvStore, Op, OpResult};

/// A request to the single server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The clerk's id.
    pub client: u64,
    /// Increases with each operation of that clerk (retries repeat it).
    pub seq: u64,
    /// The operation.
    pub op: Op,
}

/// Per-client memory for exactly-once Appends.
#[derive(Clone, Debug)]
struct Session {
    seq: u64,
    /// Reply to the Append numbered `seq`, until the client moves on.
    reply: Option<OpResult>,
}

/// The server.
#[derive(Debug, Default)]
pub struct KvServer {
    store: KvStore,
    sessions: BTreeMap<u64, Session>,
}

impl KvServer {
    /// A server with an empty store.
    pub fn new() -> KvServer {
        KvServer::default()
    }

    /// Executes one request.
    pub fn handle(&mut self, req: Request) -> OpResult {
        if let Op::Append { .. } = req.op {
            if let Some(s) = self.sessions.get(&req.client) {
                if req.seq < s.seq || (req.seq == s.seq && s.reply.is_none()) {
                    return OpResult::Err(KvError::Stale);
                }
                if req.seq == s.seq {
                    return s.reply.clone().expect("checked");
                }
            }
            let r = self.store.apply(req.op);
            self.sessions.insert(req.client, Session { seq: req.seq, reply: Some(r.clone()) });
            return r;
        }
        if let Some(s) = self.sessions.get_mut(&req.client)
            && req.seq > s.seq
        {
            s.reply = None; // the client has its Append's answer: forget it
        }
        self.store.apply(req.op)
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &KvStore {
        &self.store
    }
}

impl Node for KvServer {
    fn on_start(&mut self, _: &mut dyn Ctx) {}
    fn on_timer(&mut self, _: &mut dyn Ctx, _: u64) {}
    fn on_message(&mut self, _: &mut dyn Ctx, _: Endpoint, _: Vec<u8>) {}

    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
        let reply = match postcard::from_bytes::<Request>(&request) {
            Ok(req) => self.handle(req),
            Err(e) => OpResult::Err(KvError::Malformed(e.to_string())),
        };
        ctx.reply(from, call, postcard::to_allocvec(&reply).expect("replies encode"));
    }
}
