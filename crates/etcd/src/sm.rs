//! etcd's key/value service as a deterministic [`StateMachine`]: MVCC store plus leases.
//!
//! Writes ([`Command`]) go through the log and are applied here with the leader-stamped time of
//! their entry; reads ([`Query`]) are answered from the applied state. The behaviour follows
//! etcd v3.6's `server/etcdserver/txn` and `server/storage/mvcc` (cited per function), so a
//! client sees the same responses and errors.
//!
//! Leases live in log time: a lease granted or kept alive by an entry stamped `t` expires at
//! `t + ttl`. Nothing expires by itself: the leader sees expired leases with
//! [`Query::ExpiredLeases`] (at its clock) and proposes [`Command::ExpireLeases`]; the entry
//! revokes the leases expired at *its* stamp, so every replica deletes the same keys at the
//! same revisions. A new leader proposes [`Command::PromoteLeases`], which extends every lease
//! as etcd's `Promote` does, so a leader change never expires a lease early.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sixfive_rsm::{ApplyCtx, StateMachine};

use crate::error::EtcdError;
use crate::mvcc::{KeyRange, LegacyStore, RevError, Store};
use crate::proto::etcdserverpb::{
    self as pb, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    HashKvResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb;

/// Time in microseconds (the leader's clock, as stamped on log entries).
pub type Micros = u64;

/// Up to this many history entries, debug builds check every invariant after each command.
#[cfg(debug_assertions)]
const CHECK_ENTRIES_MAX: usize = 2048;

/// etcd's largest lease TTL, in seconds (`lease.MaxLeaseTTL`).
pub const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// Settings every replica must share (they decide what commands do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most operations in one txn (`--max-txn-ops`, etcd's default 128).
    pub max_txn_ops: usize,
    /// Shortest lease TTL granted, in seconds; shorter requests get this one. etcd's default is
    /// 2 (1.5 election timeouts of 1 s, rounded up).
    pub min_lease_ttl_secs: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_txn_ops: 128, min_lease_ttl_secs: 2 }
    }
}

/// A write, replicated through the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// KV.Put.
    Put(PutRequest),
    /// KV.DeleteRange.
    DeleteRange(DeleteRangeRequest),
    /// KV.Txn.
    Txn(TxnRequest),
    /// KV.Compact.
    Compact(CompactionRequest),
    /// Lease.LeaseGrant (id 0: the state machine chooses one).
    LeaseGrant(LeaseGrantRequest),
    /// Lease.LeaseRevoke.
    LeaseRevoke(LeaseRevokeRequest),
    /// One keep-alive of Lease.LeaseKeepAlive.
    LeaseKeepAlive(i64),
    /// Revokes every lease expired at the entry's time (proposed by the leader).
    ExpireLeases,
    /// Extends every lease to the entry's time plus `extend` plus its TTL (proposed by a new
    /// leader, as etcd's lessor `Promote`).
    PromoteLeases {
        /// Extra time, in microseconds (etcd uses the election timeout).
        extend: Micros,
    },
}

/// What a [`Command`] returns when it succeeds. Response headers carry only the revision;
/// the service fills in the cluster and member ids and the term.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Of [`Command::Put`].
    Put(PutResponse),
    /// Of [`Command::DeleteRange`].
    DeleteRange(DeleteRangeResponse),
    /// Of [`Command::Txn`].
    Txn(TxnResponse),
    /// Of [`Command::Compact`].
    Compact(CompactionResponse),
    /// Of [`Command::LeaseGrant`].
    LeaseGrant(LeaseGrantResponse),
    /// Of [`Command::LeaseRevoke`].
    LeaseRevoke(LeaseRevokeResponse),
    /// Of [`Command::LeaseKeepAlive`].
    LeaseKeepAlive(LeaseKeepAliveResponse),
    /// Of [`Command::ExpireLeases`]: the leases revoked, in the order they were.
    Expired(Vec<i64>),
    /// Of [`Command::PromoteLeases`]: how many leases were extended.
    Promoted(usize),
}

/// A read, answered from the applied state.
#[derive(Clone, Debug, PartialEq)]
pub enum Query {
    /// KV.Range.
    Range(RangeRequest),
    /// The changes to a key range from revision `from` on (the watch log): at most about `max`
    /// events (a revision's events are never split), each with its previous key-value.
    Events {
        /// Key (etcd convention with `range_end`).
        key: Vec<u8>,
        /// Range end (empty: the key alone; `"\0"`: every key from `key`).
        range_end: Vec<u8>,
        /// First revision wanted.
        from: i64,
        /// Soft limit on the number of events.
        max: usize,
    },
    /// Lease.LeaseTimeToLive, at the reader's clock `now`.
    LeaseTimeToLive {
        /// The lease.
        id: i64,
        /// List the attached keys.
        keys: bool,
        /// The reader's clock.
        now: Micros,
    },
    /// Lease.LeaseLeases.
    LeaseLeases,
    /// The leases expired at `now` (the leader then proposes [`Command::ExpireLeases`]).
    ExpiredLeases {
        /// The leader's clock.
        now: Micros,
    },
    /// The current and compaction revisions.
    Revision,
    /// Maintenance.HashKV.
    HashKv {
        /// Revision to hash up to (0: the current one).
        revision: i64,
    },
}

/// What a [`Query`] returns.
#[derive(Clone, Debug, PartialEq)]
pub enum QueryOutput {
    /// Of [`Query::Range`].
    Range(RangeResponse),
    /// Of [`Query::Events`].
    Events {
        /// The events, in revision order, with `prev_kv` filled when known.
        events: Vec<mvccpb::Event>,
        /// The next revision to ask for (past the last event returned, or past the store
        /// revision when everything was returned).
        next: i64,
        /// The store revision when read.
        revision: i64,
    },
    /// Of [`Query::Events`] from a compacted revision.
    EventsCompacted {
        /// The compaction revision (a watcher is cancelled with it).
        compact_revision: i64,
        /// The store revision.
        revision: i64,
    },
    /// Of [`Query::LeaseTimeToLive`].
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    /// Of [`Query::LeaseLeases`].
    LeaseLeases(LeaseLeasesResponse),
    /// Of [`Query::ExpiredLeases`].
    ExpiredLeases(Vec<i64>),
    /// Of [`Query::Revision`].
    Revision {
        /// The store revision.
        revision: i64,
        /// The last compaction revision (-1: never compacted).
        compact_revision: i64,
    },
    /// Of [`Query::HashKv`].
    HashKv(HashKvResponse),
}

/// A lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    /// Granted TTL in seconds (after the minimum was applied).
    ttl: i64,
    /// Log time at which it expires.
    expiry: Micros,
    /// Keys attached. Invariant: exactly the live keys whose value carries this lease.
    keys: BTreeSet<Vec<u8>>,
}

/// The state machine.
#[derive(Clone, Debug)]
pub struct EtcdSm {
    cfg: Config,
    state: State,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    store: Store,
    leases: BTreeMap<i64, Lease>,
    /// Largest entry time applied.
    clock: Micros,
}

/// The state as snapshots encoded it before [`SNAPSHOT_FORMAT`] (the store's revision index
/// included); still read.
#[derive(Deserialize)]
struct LegacyState {
    store: LegacyStore,
    leases: BTreeMap<i64, Lease>,
    clock: Micros,
}

/// The first bytes of a snapshot in today's format, then the state in postcard. A legacy
/// snapshot cannot start with them: its first byte is the number of keys, and with no key its
/// second is the length of the (then empty) revision index, 0.
const SNAPSHOT_FORMAT: [u8; 4] = [0x00, 0xFF, b'E', 2];

/// A snapshot of `state`, appended to `out`.
fn encode_snapshot(state: &State, mut out: Vec<u8>) -> Vec<u8> {
    // The encoding is smaller than the store's size estimate (no per-entry overhead): one
    // allocation, no copy as it grows.
    out.reserve(state.store.size_bytes() as usize + 64);
    out.extend_from_slice(&SNAPSHOT_FORMAT);
    postcard::to_extend(state, out).expect("the state encodes")
}

/// The state a snapshot holds, in either format.
fn decode_snapshot(b: &[u8]) -> Result<State, postcard::Error> {
    match b.strip_prefix(&SNAPSHOT_FORMAT) {
        Some(rest) => postcard::from_bytes(rest),
        None => {
            let l: LegacyState = postcard::from_bytes(b)?;
            Ok(State { store: l.store.into(), leases: l.leases, clock: l.clock })
        }
    }
}

fn hdr(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..Default::default() })
}

fn secs(t: i64) -> Micros {
    (t.max(0) as u64).saturating_mul(1_000_000)
}

impl Default for EtcdSm {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl EtcdSm {
    /// An empty store at revision 1.
    pub fn new(cfg: Config) -> Self {
        EtcdSm { cfg, state: State { store: Store::new(), leases: BTreeMap::new(), clock: 0 } }
    }

    /// The MVCC store.
    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Applies a command at log time `now` (what [`StateMachine::apply`] does after decoding).
    pub fn apply_command(&mut self, cmd: Command, index: u64, now: Micros) -> Result<Output, EtcdError> {
        self.state.clock = self.state.clock.max(now);
        let now = self.state.clock;
        let out = match cmd {
            Command::Put(p) => {
                check_put(&p)?;
                // etcd's applier checks a plain put's lease before its ignore flags (a txn's
                // checkPut does the reverse).
                if p.lease != 0 && !self.state.leases.contains_key(&p.lease) {
                    return Err(EtcdError::LeaseNotFound);
                }
                let mut tx = Tx::begin(&mut self.state);
                tx.check_put(&p)?;
                let r = tx.put(&p);
                tx.end();
                Ok(Output::Put(r?))
            }
            Command::DeleteRange(d) => {
                if d.key.is_empty() {
                    return Err(EtcdError::EmptyKey);
                }
                let mut tx = Tx::begin(&mut self.state);
                let r = tx.delete_range(&d);
                tx.end();
                Ok(Output::DeleteRange(r))
            }
            Command::Txn(t) => {
                check_txn(&t, self.cfg.max_txn_ops)?;
                let mut tx = Tx::begin(&mut self.state);
                let path = tx.compare_path(&t);
                tx.check_txn(&t, &path)?;
                let mut resp = TxnResponse::default();
                // checkTxn above rules out every error of the execution; end the transaction
                // anyway so the store stays whole if one happened.
                let res = tx.txn(&t, &path, &mut resp);
                resp.header = hdr(tx.cur());
                tx.end();
                res?;
                Ok(Output::Txn(resp))
            }
            Command::Compact(c) => {
                self.state.store.compact(c.revision)?;
                Ok(Output::Compact(CompactionResponse { header: hdr(self.state.store.rev()) }))
            }
            Command::LeaseGrant(g) => self.grant(g, index, now).map(Output::LeaseGrant),
            Command::LeaseRevoke(r) => {
                if !self.state.leases.contains_key(&r.id) {
                    return Err(EtcdError::LeaseNotFound);
                }
                self.revoke(r.id);
                Ok(Output::LeaseRevoke(LeaseRevokeResponse { header: hdr(self.state.store.rev()) }))
            }
            Command::LeaseKeepAlive(id) => {
                // Renewable until its revocation is applied (etcd refuses a lease past its
                // expiry at once). Here expiry is an entry in the log, so a renewal ordered
                // before it wins cleanly; and a new leader's promotion is an entry too, which a
                // client's first keep-alive after a failover may precede: refusing that one
                // would expire a lease early, which a leader change must never do.
                let l = self.state.leases.get_mut(&id).ok_or(EtcdError::LeaseNotFound)?;
                l.expiry = now.saturating_add(secs(l.ttl));
                let ttl = l.ttl;
                Ok(Output::LeaseKeepAlive(LeaseKeepAliveResponse { header: hdr(self.state.store.rev()), id, ttl }))
            }
            Command::ExpireLeases => {
                let mut expired: Vec<(Micros, i64)> =
                    self.state.leases.iter().filter(|(_, l)| l.expiry <= now).map(|(id, l)| (l.expiry, *id)).collect();
                expired.sort_unstable();
                let ids: Vec<i64> = expired.into_iter().map(|(_, id)| id).collect();
                for id in &ids {
                    self.revoke(*id);
                }
                Ok(Output::Expired(ids))
            }
            Command::PromoteLeases { extend } => {
                for l in self.state.leases.values_mut() {
                    l.expiry = now.saturating_add(extend).saturating_add(secs(l.ttl));
                }
                Ok(Output::Promoted(self.state.leases.len()))
            }
        };
        // The full check is linear in the store: run it after every command while the store
        // is small (every test's), not on a loaded server built with debug assertions.
        #[cfg(debug_assertions)]
        if self.state.store.entries() <= CHECK_ENTRIES_MAX {
            self.check();
        }
        out
    }

    /// Lease grant (etcd `lessor.Grant`). An id of 0 gets one chosen from the log index, the
    /// same on every replica.
    fn grant(&mut self, g: LeaseGrantRequest, index: u64, now: Micros) -> Result<LeaseGrantResponse, EtcdError> {
        let mut id = g.id;
        if id == 0 {
            let mut x = index;
            loop {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                // Positive and non-zero, as etcd's generated ids are.
                let cand = (z & (i64::MAX as u64)) as i64;
                if cand != 0 && !self.state.leases.contains_key(&cand) {
                    id = cand;
                    break;
                }
            }
        }
        if g.ttl > MAX_LEASE_TTL_SECS {
            return Err(EtcdError::LeaseTtlTooLarge);
        }
        if self.state.leases.contains_key(&id) {
            return Err(EtcdError::LeaseExist);
        }
        let ttl = g.ttl.max(self.cfg.min_lease_ttl_secs);
        self.state.leases.insert(id, Lease { ttl, expiry: now.saturating_add(secs(ttl)), keys: BTreeSet::new() });
        Ok(LeaseGrantResponse { header: hdr(self.state.store.rev()), id, ttl, error: String::new() })
    }

    /// Deletes a lease's keys (in key order, one write transaction) and the lease.
    fn revoke(&mut self, id: i64) {
        let keys: Vec<Vec<u8>> = self.state.leases[&id].keys.iter().cloned().collect();
        let mut tx = Tx::begin(&mut self.state);
        for k in keys {
            tx.delete_key(&k);
        }
        tx.end();
        let l = self.state.leases.remove(&id).expect("lease exists");
        debug_assert!(l.keys.is_empty(), "revoked lease still holds keys");
    }

    /// Answers a query (what [`StateMachine::query`] does after decoding).
    pub fn answer(&self, q: Query) -> Result<QueryOutput, EtcdError> {
        let st = &self.state;
        match q {
            Query::Range(r) => {
                check_range(&r)?;
                range(&st.store, &r, st.store.rev()).map(QueryOutput::Range)
            }
            Query::Events { key, range_end, from, max } => {
                let kr = KeyRange::new(&key, &range_end);
                let rev = st.store.rev();
                match st.store.events(&kr, from, rev, max) {
                    Err(_) => {
                        Ok(QueryOutput::EventsCompacted { compact_revision: st.store.compact_rev(), revision: rev })
                    }
                    Ok(evs) => {
                        let next = match evs.last() {
                            Some(e) if e.rev.0 < rev => e.rev.0 + 1,
                            _ => rev + 1,
                        };
                        let next = next.max(from);
                        Ok(QueryOutput::Events {
                            events: evs.iter().map(|e| e.to_proto(true)).collect(),
                            next,
                            revision: rev,
                        })
                    }
                }
            }
            Query::LeaseTimeToLive { id, keys, now } => {
                let l = st.leases.get(&id).ok_or(EtcdError::LeaseNotFound)?;
                // etcd: int64(time.Until(expiry).Seconds()), truncated toward zero.
                let remaining = (l.expiry as i128 - now as i128) / 1_000_000;
                Ok(QueryOutput::LeaseTimeToLive(LeaseTimeToLiveResponse {
                    header: hdr(st.store.rev()),
                    id,
                    ttl: remaining as i64,
                    granted_ttl: l.ttl,
                    keys: if keys { l.keys.iter().cloned().collect() } else { Vec::new() },
                }))
            }
            Query::LeaseLeases => Ok(QueryOutput::LeaseLeases(LeaseLeasesResponse {
                header: hdr(st.store.rev()),
                leases: st.leases.keys().map(|id| LeaseStatus { id: *id }).collect(),
            })),
            Query::ExpiredLeases { now } => Ok(QueryOutput::ExpiredLeases(
                st.leases.iter().filter(|(_, l)| l.expiry <= now).map(|(id, _)| *id).collect(),
            )),
            Query::Revision => {
                Ok(QueryOutput::Revision { revision: st.store.rev(), compact_revision: st.store.compact_rev() })
            }
            Query::HashKv { revision } => {
                let cur = st.store.rev();
                let rev = if revision <= 0 { cur } else { revision };
                if rev > cur {
                    return Err(EtcdError::FutureRev);
                }
                if rev < st.store.compact_rev() {
                    return Err(EtcdError::Compacted);
                }
                Ok(QueryOutput::HashKv(HashKvResponse {
                    header: hdr(cur),
                    hash: st.store.hash(rev),
                    compact_revision: st.store.compact_rev(),
                    hash_revision: rev,
                }))
            }
        }
    }

    /// Checks the invariants of the store and the leases; panics on a broken one.
    pub fn check(&self) {
        let st = &self.state;
        st.store.check();
        let rev = st.store.rev();
        let mut attached = BTreeMap::new();
        for kv in st.store.range(&KeyRange::From(vec![]), rev, 0, false).kvs {
            if kv.lease != 0 {
                assert!(st.leases.contains_key(&kv.lease), "key {:?} holds a lease that does not exist", kv.key);
                attached.insert(kv.key, kv.lease);
            }
        }
        let mut listed = BTreeMap::new();
        for (id, l) in &st.leases {
            for k in &l.keys {
                listed.insert(k.clone(), *id);
            }
        }
        assert_eq!(attached, listed, "lease key sets disagree with the keys' leases");
    }
}

/// A write transaction over the state (etcd's `storeTxnWrite` plus the lessor).
struct Tx<'a> {
    st: &'a mut State,
    begin: i64,
    changes: i64,
}

impl<'a> Tx<'a> {
    fn begin(st: &'a mut State) -> Self {
        let begin = st.store.rev();
        Tx { st, begin, changes: 0 }
    }

    /// The revision reads inside the transaction see (etcd: `beginRev + 1` once it changed
    /// something).
    fn cur(&self) -> i64 {
        if self.changes > 0 { self.begin + 1 } else { self.begin }
    }

    fn end(self) {
        if self.changes > 0 {
            self.st.store.commit(self.begin + 1);
        }
    }

    fn next_rev(&mut self) -> (i64, i64) {
        let r = (self.begin + 1, self.changes);
        self.changes += 1;
        r
    }

    fn set_lease(&mut self, key: &[u8], old: i64, new: i64) {
        if old == new {
            return;
        }
        if old != 0
            && let Some(l) = self.st.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if new != 0 {
            self.st.leases.get_mut(&new).expect("lease checked before the write").keys.insert(key.to_vec());
        }
    }

    /// etcd `checkPut`, at the state before the transaction's writes.
    fn check_put(&self, p: &PutRequest) -> Result<(), EtcdError> {
        if (p.ignore_value || p.ignore_lease) && self.st.store.get_at(&p.key, self.begin).is_none() {
            return Err(EtcdError::KeyNotFound);
        }
        if p.lease != 0 && !self.st.leases.contains_key(&p.lease) {
            return Err(EtcdError::LeaseNotFound);
        }
        Ok(())
    }

    /// etcd `put`.
    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, EtcdError> {
        // The key's current value matters only to a put that keeps its value or lease.
        let cur = if p.ignore_value || p.ignore_lease {
            let cur = self.st.store.get_at(&p.key, self.cur()).ok_or(EtcdError::KeyNotFound)?;
            Some((cur.value.clone(), cur.lease))
        } else {
            None
        };
        let value = match &cur {
            Some((value, _)) if p.ignore_value => value.clone(),
            _ => p.value.as_slice().into(),
        };
        let lease = match cur {
            Some((_, lease)) if p.ignore_lease => lease,
            _ => p.lease,
        };
        if lease != 0 && !self.st.leases.contains_key(&lease) {
            return Err(EtcdError::LeaseNotFound);
        }
        let rev = self.next_rev();
        let (_, prev) = self.st.store.put(&p.key, value, lease, rev);
        self.set_lease(&p.key, prev.as_ref().map_or(0, |k| k.lease), lease);
        Ok(PutResponse {
            header: hdr(self.begin + 1),
            prev_kv: if p.prev_kv { prev.map(|k| k.to_proto(&p.key)) } else { None },
        })
    }

    fn delete_key(&mut self, key: &[u8]) -> bool {
        let rev = (self.begin + 1, self.changes);
        match self.st.store.delete(key, rev) {
            Some(prev) => {
                self.changes += 1;
                self.set_lease(key, prev.lease, 0);
                true
            }
            None => false,
        }
    }

    /// etcd `deleteRange`.
    fn delete_range(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let kr = KeyRange::new(&d.key, &d.range_end);
        let prev_kvs = if d.prev_kv { self.st.store.range(&kr, self.cur(), 0, false).kvs } else { Vec::new() };
        let keys = self.st.store.live_keys(&kr);
        let mut deleted = 0;
        for k in keys {
            if self.delete_key(&k) {
                deleted += 1;
            }
        }
        let rev = if deleted > 0 || self.changes > 0 { self.begin + 1 } else { self.begin };
        DeleteRangeResponse { header: hdr(rev), deleted, prev_kvs }
    }

    /// etcd `compareToPath`: which branch each (nested) txn takes, in the order the
    /// transaction visits them, decided on the state before any write.
    fn compare_path(&self, t: &TxnRequest) -> Vec<bool> {
        let ok = t.compare.iter().all(|c| compare(&self.st.store, self.begin, c));
        let mut path = vec![ok];
        for op in if ok { &t.success } else { &t.failure } {
            if let Some(pb::request_op::Request::RequestTxn(inner)) = &op.request {
                path.extend(self.compare_path(inner));
            }
        }
        path
    }

    /// etcd `checkTxn`: errors that abort the whole transaction before any write.
    fn check_txn(&self, t: &TxnRequest, path: &[bool]) -> Result<usize, EtcdError> {
        let mut used = 0;
        let mut rest = &path[1..];
        for op in if path[0] { &t.success } else { &t.failure } {
            match &op.request {
                Some(pb::request_op::Request::RequestRange(r)) => {
                    if r.revision > self.begin {
                        return Err(EtcdError::FutureRev);
                    }
                    if r.revision != 0 && r.revision < self.st.store.compact_rev() {
                        return Err(EtcdError::Compacted);
                    }
                }
                Some(pb::request_op::Request::RequestPut(p)) => self.check_put(p)?,
                Some(pb::request_op::Request::RequestTxn(inner)) => {
                    let n = self.check_txn(inner, rest)?;
                    used += n + 1;
                    rest = &rest[n + 1..];
                }
                Some(pb::request_op::Request::RequestDeleteRange(_)) | None => {}
            }
        }
        Ok(used)
    }

    /// etcd `executeTxn`: runs the chosen branch; returns how many nested txns it consumed.
    fn txn(&mut self, t: &TxnRequest, path: &[bool], resp: &mut TxnResponse) -> Result<usize, EtcdError> {
        resp.succeeded = path[0];
        let mut used = 0;
        let mut rest = &path[1..];
        for op in if path[0] { &t.success } else { &t.failure } {
            let r = match &op.request {
                Some(pb::request_op::Request::RequestRange(r)) => {
                    pb::response_op::Response::ResponseRange(range(&self.st.store, r, self.cur())?)
                }
                Some(pb::request_op::Request::RequestPut(p)) => pb::response_op::Response::ResponsePut(self.put(p)?),
                Some(pb::request_op::Request::RequestDeleteRange(d)) => {
                    pb::response_op::Response::ResponseDeleteRange(self.delete_range(d))
                }
                Some(pb::request_op::Request::RequestTxn(inner)) => {
                    let mut ir = TxnResponse { header: Some(ResponseHeader::default()), ..Default::default() };
                    let n = self.txn(inner, rest, &mut ir)?;
                    used += n + 1;
                    rest = &rest[n + 1..];
                    pb::response_op::Response::ResponseTxn(ir)
                }
                None => continue,
            };
            resp.responses.push(ResponseOp { response: Some(r) });
        }
        Ok(used)
    }
}

/// etcd `applyCompare`: every key of the compare's range must satisfy it; an empty range
/// compares a zero key-value (never true for a value compare).
fn compare(store: &Store, at: i64, c: &Compare) -> bool {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let kr = KeyRange::new(&c.key, &c.range_end);
    let kvs = store.range(&kr, at, 0, false).kvs;
    let target = CompareTarget::try_from(c.target).ok();
    let one = |kv: &mvccpb::KeyValue| {
        let ord = match target {
            Some(CompareTarget::Value) => {
                let v: &[u8] = match &c.target_union {
                    Some(TargetUnion::Value(v)) => v,
                    _ => &[],
                };
                kv.value.as_slice().cmp(v)
            }
            Some(CompareTarget::Create) => kv.create_revision.cmp(&match c.target_union {
                Some(TargetUnion::CreateRevision(r)) => r,
                _ => 0,
            }),
            Some(CompareTarget::Mod) => kv.mod_revision.cmp(&match c.target_union {
                Some(TargetUnion::ModRevision(r)) => r,
                _ => 0,
            }),
            Some(CompareTarget::Version) => kv.version.cmp(&match c.target_union {
                Some(TargetUnion::Version(r)) => r,
                _ => 0,
            }),
            Some(CompareTarget::Lease) => kv.lease.cmp(&match c.target_union {
                Some(TargetUnion::Lease(r)) => r,
                _ => 0,
            }),
            None => std::cmp::Ordering::Equal,
        };
        match CompareResult::try_from(c.result) {
            Ok(CompareResult::Equal) => ord.is_eq(),
            Ok(CompareResult::NotEqual) => ord.is_ne(),
            Ok(CompareResult::Greater) => ord.is_gt(),
            Ok(CompareResult::Less) => ord.is_lt(),
            Err(_) => true,
        }
    };
    if kvs.is_empty() {
        if target == Some(CompareTarget::Value) {
            return false;
        }
        return one(&mvccpb::KeyValue::default());
    }
    kvs.iter().all(one)
}

/// etcd `executeRange` at store revision `cur`.
fn range(store: &Store, r: &RangeRequest, cur: i64) -> Result<RangeResponse, EtcdError> {
    use pb::range_request::{SortOrder, SortTarget};
    let filtered =
        r.min_mod_revision != 0 || r.max_mod_revision != 0 || r.min_create_revision != 0 || r.max_create_revision != 0;
    let order = SortOrder::try_from(r.sort_order).map_err(|_| EtcdError::InvalidSortOption)?;
    let target = SortTarget::try_from(r.sort_target).map_err(|_| EtcdError::InvalidSortOption)?;
    let mut limit = if order != SortOrder::None || filtered { 0 } else { r.limit.max(0) as usize };
    if limit > 0 {
        limit += 1;
    }
    let at = store.read_rev(r.revision, cur).map_err(|e| match e {
        RevError::Compacted => EtcdError::Compacted,
        RevError::Future => EtcdError::FutureRev,
    })?;
    let kr = KeyRange::new(&r.key, &r.range_end);
    let res = store.range(&kr, at, limit, r.count_only);
    let mut kvs = res.kvs;
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }
    let order = match (target, order) {
        (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
        (t, SortOrder::None) if t != SortTarget::Key => SortOrder::Ascend,
        (_, o) => o,
    };
    if order != SortOrder::None {
        // Stable, so ties keep key order (etcd's sort.Sort leaves the order of ties unspecified).
        match target {
            SortTarget::Key => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { header: hdr(cur), kvs, more, count: res.count })
}

/// etcd `checkRangeRequest`.
pub fn check_range(r: &RangeRequest) -> Result<(), EtcdError> {
    use pb::range_request::{SortOrder, SortTarget};
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(EtcdError::InvalidSortOption);
    }
    Ok(())
}

/// etcd `checkPutRequest`.
pub fn check_put(p: &PutRequest) -> Result<(), EtcdError> {
    if p.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

/// etcd's checks of a txn request: `checkTxnRequest` (sizes, keys, nested operations) then
/// `checkIntervals` on both branches (no key written twice).
pub fn check_txn(t: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    check_txn_ops(t, max_ops as i64)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_txn_ops(t: &TxnRequest, max_ops: i64) -> Result<(), EtcdError> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len()) as i64;
    if opc > max_ops {
        return Err(EtcdError::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(pb::request_op::Request::RequestRange(r)) => check_range(r)?,
            Some(pb::request_op::Request::RequestPut(p)) => check_put(p)?,
            Some(pb::request_op::Request::RequestDeleteRange(d)) => {
                if d.key.is_empty() {
                    return Err(EtcdError::EmptyKey);
                }
            }
            Some(pb::request_op::Request::RequestTxn(inner)) => check_txn_ops(inner, max_ops - opc)?,
            None => return Err(EtcdError::KeyNotFound),
        }
    }
    Ok(())
}

/// A deleted interval of etcd's `checkIntervals`: `[key, end)` with an empty `end` unbounded,
/// or the key alone.
struct Interval {
    key: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn hits(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_slice(),
            Some(e) => k >= self.key.as_slice() && (e.is_empty() || k < e.as_slice()),
        }
    }
}

/// etcd `checkIntervals`: the puts of a branch, which must not repeat a key or fall in one of
/// its deleted intervals (nested txns' branches included).
fn check_intervals(reqs: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Interval>), EtcdError> {
    let mut dels = Vec::new();
    for op in reqs {
        if let Some(pb::request_op::Request::RequestDeleteRange(d)) = &op.request {
            dels.push(Interval {
                key: d.key.clone(),
                end: if d.range_end.is_empty() { None } else { Some(d.range_end.clone()) },
            });
        }
    }
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in reqs {
        let Some(pb::request_op::Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.hits(k)) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || dels.iter().any(|d| d.hits(k)) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(pb::request_op::Request::RequestPut(p)) = &op.request else { continue };
        if puts.contains(&p.key) || dels.iter().any(|d| d.hits(&p.key)) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

// ---- The byte encodings the log and the query path carry. ----

#[derive(Serialize, Deserialize)]
enum WireCommand {
    Put(Vec<u8>),
    DeleteRange(Vec<u8>),
    Txn(Vec<u8>),
    Compact(Vec<u8>),
    LeaseGrant(Vec<u8>),
    LeaseRevoke(Vec<u8>),
    LeaseKeepAlive(i64),
    ExpireLeases,
    PromoteLeases(u64),
}

#[derive(Serialize, Deserialize)]
enum WireOutput {
    Put(Vec<u8>),
    DeleteRange(Vec<u8>),
    Txn(Vec<u8>),
    Compact(Vec<u8>),
    LeaseGrant(Vec<u8>),
    LeaseRevoke(Vec<u8>),
    LeaseKeepAlive(Vec<u8>),
    Expired(Vec<i64>),
    Promoted(u64),
}

#[derive(Serialize, Deserialize)]
enum WireQuery {
    Range(Vec<u8>),
    Events { key: Vec<u8>, range_end: Vec<u8>, from: i64, max: u64 },
    LeaseTimeToLive { id: i64, keys: bool, now: u64 },
    LeaseLeases,
    ExpiredLeases { now: u64 },
    Revision,
    HashKv { revision: i64 },
}

#[derive(Serialize, Deserialize)]
enum WireQueryOutput {
    Range(Vec<u8>),
    Events { events: Vec<Vec<u8>>, next: i64, revision: i64 },
    EventsCompacted { compact_revision: i64, revision: i64 },
    LeaseTimeToLive(Vec<u8>),
    LeaseLeases(Vec<u8>),
    ExpiredLeases(Vec<i64>),
    Revision { revision: i64, compact_revision: i64 },
    HashKv(Vec<u8>),
}

fn enc<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

fn dec<M: prost::Message + Default>(b: &[u8]) -> Result<M, EtcdError> {
    M::decode(b).map_err(|_| EtcdError::Malformed)
}

fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("in-memory encoding cannot fail")
}

fn from_bytes<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, EtcdError> {
    postcard::from_bytes(b).map_err(|_| EtcdError::Malformed)
}

impl Command {
    /// The bytes the log carries.
    pub fn encode(&self) -> Vec<u8> {
        to_bytes(&match self {
            Command::Put(m) => WireCommand::Put(enc(m)),
            Command::DeleteRange(m) => WireCommand::DeleteRange(enc(m)),
            Command::Txn(m) => WireCommand::Txn(enc(m)),
            Command::Compact(m) => WireCommand::Compact(enc(m)),
            Command::LeaseGrant(m) => WireCommand::LeaseGrant(enc(m)),
            Command::LeaseRevoke(m) => WireCommand::LeaseRevoke(enc(m)),
            Command::LeaseKeepAlive(id) => WireCommand::LeaseKeepAlive(*id),
            Command::ExpireLeases => WireCommand::ExpireLeases,
            Command::PromoteLeases { extend } => WireCommand::PromoteLeases(*extend),
        })
    }

    /// Decodes [`Command::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<Self, EtcdError> {
        Ok(match from_bytes(b)? {
            WireCommand::Put(m) => Command::Put(dec(&m)?),
            WireCommand::DeleteRange(m) => Command::DeleteRange(dec(&m)?),
            WireCommand::Txn(m) => Command::Txn(dec(&m)?),
            WireCommand::Compact(m) => Command::Compact(dec(&m)?),
            WireCommand::LeaseGrant(m) => Command::LeaseGrant(dec(&m)?),
            WireCommand::LeaseRevoke(m) => Command::LeaseRevoke(dec(&m)?),
            WireCommand::LeaseKeepAlive(id) => Command::LeaseKeepAlive(id),
            WireCommand::ExpireLeases => Command::ExpireLeases,
            WireCommand::PromoteLeases(extend) => Command::PromoteLeases { extend },
        })
    }
}

/// Encodes the result of a command (what [`StateMachine::apply`] returns).
pub fn encode_result(r: &Result<Output, EtcdError>) -> Vec<u8> {
    let w: Result<WireOutput, EtcdError> = r.as_ref().map_err(|e| *e).map(|o| match o {
        Output::Put(m) => WireOutput::Put(enc(m)),
        Output::DeleteRange(m) => WireOutput::DeleteRange(enc(m)),
        Output::Txn(m) => WireOutput::Txn(enc(m)),
        Output::Compact(m) => WireOutput::Compact(enc(m)),
        Output::LeaseGrant(m) => WireOutput::LeaseGrant(enc(m)),
        Output::LeaseRevoke(m) => WireOutput::LeaseRevoke(enc(m)),
        Output::LeaseKeepAlive(m) => WireOutput::LeaseKeepAlive(enc(m)),
        Output::Expired(ids) => WireOutput::Expired(ids.clone()),
        Output::Promoted(n) => WireOutput::Promoted(*n as u64),
    });
    to_bytes(&w)
}

/// Decodes [`encode_result`]'s bytes.
pub fn decode_result(b: &[u8]) -> Result<Output, EtcdError> {
    let w: Result<WireOutput, EtcdError> = from_bytes(b)?;
    Ok(match w? {
        WireOutput::Put(m) => Output::Put(dec(&m)?),
        WireOutput::DeleteRange(m) => Output::DeleteRange(dec(&m)?),
        WireOutput::Txn(m) => Output::Txn(dec(&m)?),
        WireOutput::Compact(m) => Output::Compact(dec(&m)?),
        WireOutput::LeaseGrant(m) => Output::LeaseGrant(dec(&m)?),
        WireOutput::LeaseRevoke(m) => Output::LeaseRevoke(dec(&m)?),
        WireOutput::LeaseKeepAlive(m) => Output::LeaseKeepAlive(dec(&m)?),
        WireOutput::Expired(ids) => Output::Expired(ids),
        WireOutput::Promoted(n) => Output::Promoted(n as usize),
    })
}

impl Query {
    /// The bytes a query travels as.
    pub fn encode(&self) -> Vec<u8> {
        to_bytes(&match self {
            Query::Range(m) => WireQuery::Range(enc(m)),
            Query::Events { key, range_end, from, max } => {
                WireQuery::Events { key: key.clone(), range_end: range_end.clone(), from: *from, max: *max as u64 }
            }
            Query::LeaseTimeToLive { id, keys, now } => WireQuery::LeaseTimeToLive { id: *id, keys: *keys, now: *now },
            Query::LeaseLeases => WireQuery::LeaseLeases,
            Query::ExpiredLeases { now } => WireQuery::ExpiredLeases { now: *now },
            Query::Revision => WireQuery::Revision,
            Query::HashKv { revision } => WireQuery::HashKv { revision: *revision },
        })
    }

    /// Decodes [`Query::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<Self, EtcdError> {
        Ok(match from_bytes(b)? {
            WireQuery::Range(m) => Query::Range(dec(&m)?),
            WireQuery::Events { key, range_end, from, max } => {
                Query::Events { key, range_end, from, max: max as usize }
            }
            WireQuery::LeaseTimeToLive { id, keys, now } => Query::LeaseTimeToLive { id, keys, now },
            WireQuery::LeaseLeases => Query::LeaseLeases,
            WireQuery::ExpiredLeases { now } => Query::ExpiredLeases { now },
            WireQuery::Revision => Query::Revision,
            WireQuery::HashKv { revision } => Query::HashKv { revision },
        })
    }
}

/// Encodes the answer to a query (what [`StateMachine::query`] returns).
pub fn encode_answer(r: &Result<QueryOutput, EtcdError>) -> Vec<u8> {
    let w: Result<WireQueryOutput, EtcdError> = r.as_ref().map_err(|e| *e).map(|o| match o {
        QueryOutput::Range(m) => WireQueryOutput::Range(enc(m)),
        QueryOutput::Events { events, next, revision } => {
            WireQueryOutput::Events { events: events.iter().map(enc).collect(), next: *next, revision: *revision }
        }
        QueryOutput::EventsCompacted { compact_revision, revision } => {
            WireQueryOutput::EventsCompacted { compact_revision: *compact_revision, revision: *revision }
        }
        QueryOutput::LeaseTimeToLive(m) => WireQueryOutput::LeaseTimeToLive(enc(m)),
        QueryOutput::LeaseLeases(m) => WireQueryOutput::LeaseLeases(enc(m)),
        QueryOutput::ExpiredLeases(ids) => WireQueryOutput::ExpiredLeases(ids.clone()),
        QueryOutput::Revision { revision, compact_revision } => {
            WireQueryOutput::Revision { revision: *revision, compact_revision: *compact_revision }
        }
        QueryOutput::HashKv(m) => WireQueryOutput::HashKv(enc(m)),
    });
    to_bytes(&w)
}

/// Decodes [`encode_answer`]'s bytes.
pub fn decode_answer(b: &[u8]) -> Result<QueryOutput, EtcdError> {
    let w: Result<WireQueryOutput, EtcdError> = from_bytes(b)?;
    Ok(match w? {
        WireQueryOutput::Range(m) => QueryOutput::Range(dec(&m)?),
        WireQueryOutput::Events { events, next, revision } => {
            QueryOutput::Events { events: events.iter().map(|e| dec(e)).collect::<Result<_, _>>()?, next, revision }
        }
        WireQueryOutput::EventsCompacted { compact_revision, revision } => {
            QueryOutput::EventsCompacted { compact_revision, revision }
        }
        WireQueryOutput::LeaseTimeToLive(m) => QueryOutput::LeaseTimeToLive(dec(&m)?),
        WireQueryOutput::LeaseLeases(m) => QueryOutput::LeaseLeases(dec(&m)?),
        WireQueryOutput::ExpiredLeases(ids) => QueryOutput::ExpiredLeases(ids),
        WireQueryOutput::Revision { revision, compact_revision } => {
            QueryOutput::Revision { revision, compact_revision }
        }
        WireQueryOutput::HashKv(m) => QueryOutput::HashKv(dec(&m)?),
    })
}

impl StateMachine for EtcdSm {
    fn apply(&mut self, cmd: &[u8], ctx: ApplyCtx) -> Vec<u8> {
        let r = Command::decode(cmd).and_then(|c| self.apply_command(c, ctx.index, ctx.time));
        encode_result(&r)
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        encode_answer(&Query::decode(query).and_then(|q| self.answer(q)))
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_snapshot(&self.state, Vec::new())
    }

    /// A copy of the state, serialised later on another thread. The store's copy is O(1)
    /// (persistent maps, see [`Store`]); only the leases are copied.
    fn snapshot_later(&self) -> Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send> {
        let state = self.state.clone();
        Box::new(move |out| encode_snapshot(&state, out))
    }

    fn restore(&mut self, snapshot: &[u8]) {
        // A snapshot comes from a replica of this state machine; one that does not decode is
        // a broken invariant of the layer below, not bad input.
        self.state = decode_snapshot(snapshot).expect("snapshot of an EtcdSm");
    }
}
