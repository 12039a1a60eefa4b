//! The client of the single-server service.

use std::sync::{Arc, Mutex};

use sixfive_rpc::{Endpoint, Micros, Transport};

use crate::server::Request;
use crate::store::{KvError, Op, OpResult};

/// How long a clerk waits for one answer before retrying.
pub const CALL_TIMEOUT: Micros = 1_000_000;
/// Pause between retries.
pub const RETRY_PAUSE: Micros = 20_000;

/// One finished (or abandoned) operation, for a linearizability check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Which clerk.
    pub client: u64,
    /// When it was called.
    pub call: Micros,
    /// When it returned; `None` if the outcome is unknown.
    pub ret: Option<Micros>,
    /// The operation.
    pub op: Op,
    /// What the clerk returned (`Err(Maybe)` for ErrMaybe); `None` if unknown.
    pub result: Option<OpResult>,
}

/// Typed key/value operations, for any clerk that can run an [`Op`] to its answer.
#[allow(async_fn_in_trait)] // clerks run on one thread in the simulator; no Send bound wanted
pub trait KvClient {
    /// Runs `op` until an answer comes.
    async fn run(&mut self, op: Op) -> OpResult;

    /// Value and version of `key`.
    async fn get(&mut self, key: &str) -> Result<(String, u64), KvError> {
        self.run(Op::Get { key: key.into() }).await.into_value()
    }

    /// Sets `key` to `value` if its version is `version` (0: the key must not exist).
    /// The single-server clerk answers `Err(Maybe)` when a retry found another version.
    async fn put(&mut self, key: &str, value: &str, version: u64) -> Result<(), KvError> {
        self.run(Op::Put { key: key.into(), value: value.into(), version }).await.into_done()
    }

    /// Appends `arg` to `key` exactly once; returns the old value.
    async fn append(&mut self, key: &str, arg: &str) -> Result<String, KvError> {
        self.run(Op::Append { key: key.into(), arg: arg.into() }).await.into_appended()
    }

    /// Removes `key`.
    async fn delete(&mut self, key: &str) -> Result<(), KvError> {
        self.run(Op::Delete { key: key.into() }).await.into_done()
    }

    /// Entries with `start <= key < end`, at most `limit`.
    async fn scan(
        &mut self,
        start: &str,
        end: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, String, u64)>, KvError> {
        self.run(Op::Scan { start: start.into(), end: end.map(Into::into), limit }).await.into_entries()
    }
}

/// A shared list of [`Record`]s that clerks append to.
#[derive(Clone, Debug, Default)]
pub struct History(Arc<Mutex<Vec<Record>>>);

impl History {
    /// Appends a record.
    pub fn push(&self, r: Record) {
        self.0.lock().expect("history").push(r);
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.0.lock().expect("history").clone()
    }
}

/// A clerk: retries each operation until it hears back.
pub struct Clerk<T> {
    t: T,
    server: Endpoint,
    client: u64,
    seq: u64,
    history: Option<History>,
}

impl<T: Transport> Clerk<T> {
    /// A clerk with id `client` talking to `server`.
    pub fn new(t: T, server: Endpoint, client: u64) -> Clerk<T> {
        Clerk { t, server, client, seq: 0, history: None }
    }

    /// Records every operation into `h`.
    pub fn with_history(mut self, h: History) -> Clerk<T> {
        self.history = Some(h);
        self
    }

    /// The clerk's transport (to sleep or read the clock).
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Sends `op` until a reply comes; returns it and whether the first attempt was answered.
    async fn run(&mut self, op: &Op) -> (OpResult, bool) {
        self.seq += 1;
        let req =
            postcard::to_allocvec(&Request { client: self.client, seq: self.seq, op: op.clone() }).expect("encodes");
        let mut first = true;
        loop {
            if let Ok(bytes) = self.t.call(self.server, req.clone(), CALL_TIMEOUT).await {
                match postcard::from_bytes::<OpResult>(&bytes) {
                    Ok(r) => return (r, first),
                    Err(e) => return (OpResult::Err(KvError::Malformed(e.to_string())), first),
                }
            }
            first = false;
            self.t.sleep(RETRY_PAUSE).await;
        }
    }

    async fn recorded(&mut self, op: Op) -> OpResult {
        let call = self.t.now();
        let (mut r, first) = self.run(&op).await;
        if matches!(op, Op::Put { .. }) && r == OpResult::Err(KvError::Version) && !first {
            // The first attempt may have been applied and changed the version.
            r = OpResult::Err(KvError::Maybe);
        }
        if let Some(h) = &self.history {
            h.push(Record { client: self.client, call, ret: Some(self.t.now()), op, result: Some(r.clone()) });
        }
        r
    }
}

impl<T: Transport> KvClient for Clerk<T> {
    async fn run(&mut self, op: Op) -> OpResult {
        self.recorded(op).await
    }
}
