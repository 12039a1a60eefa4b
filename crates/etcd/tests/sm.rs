//! The state machine against etcd's documented semantics (etcd v3.6 `server/etcdserver/txn`,
//! `server/storage/mvcc`, `server/lease`), and against a naive model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sixfive_etcd::proto::etcdserverpb::{
    self as pb, CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, compare::CompareResult, compare::CompareTarget, compare::TargetUnion,
    range_request::SortOrder, range_request::SortTarget,
};
use sixfive_etcd::proto::mvccpb;
use sixfive_etcd::{Command, Config, EtcdError, EtcdSm, Output, Query, QueryOutput};
use sixfive_rsm::{ApplyCtx, StateMachine};

const SEC: u64 = 1_000_000;

struct T {
    sm: EtcdSm,
    index: u64,
    now: u64,
}

impl T {
    fn new() -> Self {
        T { sm: EtcdSm::new(Config::default()), index: 0, now: 1_000 * SEC }
    }
    /// Applies through the byte encoding, as a replica does.
    fn apply(&mut self, c: Command) -> Result<Output, EtcdError> {
        self.index += 1;
        let out = self.sm.apply(&c.encode(), ApplyCtx { index: self.index, time: self.now });
        sixfive_etcd::sm::decode_result(&out)
    }
    fn query(&self, q: Query) -> Result<QueryOutput, EtcdError> {
        sixfive_etcd::sm::decode_answer(&self.sm.query(&q.encode()))
    }
    fn put(&mut self, k: &str, v: &str) -> i64 {
        match self.apply(Command::Put(put(k, v))).unwrap() {
            Output::Put(r) => r.header.unwrap().revision,
            o => panic!("{o:?}"),
        }
    }
    fn del(&mut self, k: &str, end: &str) -> i64 {
        match self
            .apply(Command::DeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            }))
            .unwrap()
        {
            Output::DeleteRange(r) => r.deleted,
            o => panic!("{o:?}"),
        }
    }
    fn range(&self, r: RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        match self.query(Query::Range(r))? {
            QueryOutput::Range(r) => Ok(r),
            o => panic!("{o:?}"),
        }
    }
    fn get(&self, k: &str) -> Option<mvccpb::KeyValue> {
        self.range(RangeRequest { key: k.into(), ..Default::default() }).unwrap().kvs.pop()
    }
    fn txn(&mut self, t: TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        self.apply(Command::Txn(t)).map(|o| match o {
            Output::Txn(t) => t,
            o => panic!("{o:?}"),
        })
    }
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

fn keys(r: &pb::RangeResponse) -> Vec<String> {
    r.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect()
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp { request: Some(pb::request_op::Request::RequestPut(put(k, v))) }
}

fn op_get(k: &str) -> RequestOp {
    RequestOp {
        request: Some(pb::request_op::Request::RequestRange(RangeRequest { key: k.into(), ..Default::default() })),
    }
}

fn op_del(k: &str) -> RequestOp {
    RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: k.into(),
            ..Default::default()
        })),
    }
}

fn cmp(k: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare { key: k.into(), target: target as i32, result: result as i32, target_union: Some(u), range_end: vec![] }
}

#[test]
fn revisions_versions_and_tombstones_follow_etcd() {
    let mut t = T::new();
    assert_eq!(t.sm.store().rev(), 1, "a new store is at revision 1");
    assert_eq!(t.put("a", "1"), 2);
    assert_eq!(t.put("a", "2"), 3);
    let a = t.get("a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
    assert_eq!(t.del("a", ""), 1);
    assert_eq!(t.sm.store().rev(), 4);
    assert!(t.get("a").is_none());
    assert_eq!(t.del("a", ""), 0, "deleting nothing");
    assert_eq!(t.sm.store().rev(), 4, "a write that changes nothing does not bump the revision");
    assert_eq!(t.put("a", "3"), 5);
    let a = t.get("a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1), "a new generation starts at version 1");
    // History: reads at past revisions.
    let at = |rev| t.range(RangeRequest { key: "a".into(), revision: rev, ..Default::default() }).unwrap();
    assert_eq!(at(2).kvs[0].value, b"1");
    assert_eq!(at(3).kvs[0].value, b"2");
    assert!(at(4).kvs.is_empty(), "deleted at 4");
    assert_eq!(at(4).header.unwrap().revision, 5, "the header carries the current revision");
    assert_eq!(t.range(RangeRequest { key: "a".into(), revision: 6, ..Default::default() }), Err(EtcdError::FutureRev));
}

#[test]
fn range_options() {
    let mut t = T::new();
    for (k, v) in [("b", "3"), ("a", "2"), ("c", "1"), ("d", "0")] {
        t.put(k, v);
    }
    t.put("a", "22"); // a: create 3 mod 6 version 2
    let r = |f: &dyn Fn(&mut RangeRequest)| {
        let mut req = RangeRequest { key: "a".into(), range_end: "d".into(), ..Default::default() };
        f(&mut req);
        t.range(req).unwrap()
    };
    assert_eq!(keys(&r(&|_| {})), ["a", "b", "c"], "[key, range_end)");
    assert_eq!(keys(&r(&|q| q.range_end = vec![0])), ["a", "b", "c", "d"], "range_end \\0: from key");
    assert_eq!(keys(&r(&|q| q.range_end = vec![])), ["a"], "no range_end: the key alone");
    let lim = r(&|q| q.limit = 2);
    assert_eq!((keys(&lim), lim.more, lim.count), (vec!["a".to_string(), "b".into()], true, 3));
    let lim = r(&|q| q.limit = 3);
    assert!(!lim.more, "limit equal to the count: no more");
    let c = r(&|q| q.count_only = true);
    assert_eq!((c.kvs.len(), c.count), (0, 3));
    assert!(r(&|q| q.keys_only = true).kvs.iter().all(|kv| kv.value.is_empty() && kv.version > 0));
    let by_value = r(&|q| q.sort_target = SortTarget::Value as i32);
    assert_eq!(keys(&by_value), ["c", "a", "b"], "sort target without order: ascending");
    let desc = r(&|q| {
        q.sort_target = SortTarget::Mod as i32;
        q.sort_order = SortOrder::Descend as i32;
        q.limit = 2;
    });
    assert_eq!((keys(&desc), desc.more), (vec!["a".to_string(), "c".into()], true));
    assert_eq!(keys(&r(&|q| q.min_mod_revision = 4)), ["a", "c"]);
    assert_eq!(keys(&r(&|q| q.max_mod_revision = 4)), ["b", "c"]);
    assert_eq!(keys(&r(&|q| q.min_create_revision = 3)), ["a", "c"]);
    assert_eq!(keys(&r(&|q| q.max_create_revision = 3)), ["a", "b"]);
    assert_eq!(t.range(RangeRequest::default()), Err(EtcdError::EmptyKey));
    assert_eq!(
        t.range(RangeRequest { key: "a".into(), sort_order: 7, ..Default::default() }),
        Err(EtcdError::InvalidSortOption)
    );
    assert!(
        t.range(RangeRequest { key: "z".into(), range_end: "a".into(), ..Default::default() }).unwrap().kvs.is_empty()
    );
}

#[test]
fn put_options() {
    let mut t = T::new();
    let e = t.apply(Command::Put(PutRequest { key: "k".into(), ignore_value: true, ..Default::default() }));
    assert_eq!(e, Err(EtcdError::KeyNotFound));
    let e = t.apply(Command::Put(PutRequest {
        key: "k".into(),
        value: "v".into(),
        ignore_value: true,
        ..Default::default()
    }));
    assert_eq!(e, Err(EtcdError::ValueProvided));
    let e = t.apply(Command::Put(PutRequest { key: "k".into(), lease: 5, ..Default::default() }));
    assert_eq!(e, Err(EtcdError::LeaseNotFound));
    assert_eq!(t.sm.store().rev(), 1, "refused writes change nothing");
    t.apply(Command::LeaseGrant(LeaseGrantRequest { id: 5, ttl: 60 })).unwrap();
    t.apply(Command::Put(PutRequest { key: "k".into(), value: "v1".into(), lease: 5, ..Default::default() })).unwrap();
    let Output::Put(r) = t
        .apply(Command::Put(PutRequest { key: "k".into(), ignore_value: true, prev_kv: true, ..Default::default() }))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.prev_kv.unwrap().value, b"v1");
    let k = t.get("k").unwrap();
    assert_eq!(
        (k.value.as_slice(), k.lease, k.version),
        (&b"v1"[..], 0, 2),
        "ignore_value keeps the value; lease 0 detaches"
    );
    t.apply(Command::Put(PutRequest { key: "k".into(), value: "v2".into(), lease: 5, ..Default::default() })).unwrap();
    t.apply(Command::Put(PutRequest { key: "k".into(), value: "v3".into(), ignore_lease: true, ..Default::default() }))
        .unwrap();
    assert_eq!(t.get("k").unwrap().lease, 5, "ignore_lease keeps the lease");
}

#[test]
fn txn_compares_branches_and_nesting() {
    let mut t = T::new();
    t.put("a", "1"); // rev 2
    let r = t
        .txn(TxnRequest {
            compare: vec![
                cmp("a", CompareTarget::Value, CompareResult::Equal, TargetUnion::Value("1".into())),
                cmp("a", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(1)),
                cmp("a", CompareTarget::Create, CompareResult::Equal, TargetUnion::CreateRevision(2)),
                cmp("a", CompareTarget::Mod, CompareResult::Less, TargetUnion::ModRevision(3)),
                cmp("a", CompareTarget::Lease, CompareResult::Equal, TargetUnion::Lease(0)),
                cmp("missing", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0)),
                cmp("missing", CompareTarget::Create, CompareResult::NotEqual, TargetUnion::CreateRevision(1)),
            ],
            success: vec![op_put("b", "2"), op_get("b"), op_put("c", "3")],
            failure: vec![],
        })
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3, "one revision for the whole txn");
    let Some(pb::response_op::Response::ResponseRange(g)) = &r.responses[1].response else { panic!() };
    assert_eq!(g.kvs[0].value, b"2", "a range inside a txn sees the txn's earlier writes");
    assert_eq!(g.header.as_ref().unwrap().revision, 3);
    assert_eq!(t.get("c").unwrap().mod_revision, 3);

    // A value compare on a missing key is false.
    let r = t
        .txn(TxnRequest {
            compare: vec![cmp(
                "missing",
                CompareTarget::Value,
                CompareResult::NotEqual,
                TargetUnion::Value("x".into()),
            )],
            success: vec![op_put("x", "1")],
            failure: vec![op_get("a")],
        })
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3, "a read-only branch does not bump the revision");

    // Nested txns: the inner compare is decided before the outer writes.
    let r = t
        .txn(TxnRequest {
            compare: vec![],
            success: vec![
                op_put("n", "1"),
                RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(TxnRequest {
                        compare: vec![cmp("n", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0))],
                        success: vec![op_put("inner-then", "1")],
                        failure: vec![op_put("inner-else", "1")],
                    })),
                },
            ],
            failure: vec![],
        })
        .unwrap();
    assert!(r.succeeded);
    assert!(t.get("inner-then").is_some(), "compares see the state before the txn");
    let Some(pb::response_op::Response::ResponseTxn(inner)) = &r.responses[1].response else { panic!() };
    assert!(inner.succeeded);
}

#[test]
fn txn_refusals() {
    let mut t = T::new();
    let dup = t.txn(TxnRequest { success: vec![op_put("a", "1"), op_put("a", "2")], ..Default::default() });
    assert_eq!(dup, Err(EtcdError::DuplicateKey));
    let dup = t.txn(TxnRequest { success: vec![op_del("a"), op_put("a", "2")], ..Default::default() });
    assert_eq!(dup, Err(EtcdError::DuplicateKey));
    let ok =
        t.txn(TxnRequest { success: vec![op_put("a", "1")], failure: vec![op_put("a", "2")], ..Default::default() });
    assert!(ok.is_ok(), "one key in both branches is fine");
    let many = TxnRequest { success: (0..129).map(|i| op_put(&format!("k{i}"), "v")).collect(), ..Default::default() };
    assert_eq!(t.txn(many), Err(EtcdError::TooManyOps));
    let e = t.txn(TxnRequest {
        success: vec![
            op_put("b", "1"),
            RequestOp {
                request: Some(pb::request_op::Request::RequestRange(RangeRequest {
                    key: "a".into(),
                    revision: 99,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    });
    assert_eq!(e, Err(EtcdError::FutureRev));
    assert!(t.get("b").is_none(), "a refused txn writes nothing");
    assert_eq!(t.sm.store().rev(), 2);
}

#[test]
fn compaction_follows_etcd() {
    let mut t = T::new();
    t.put("a", "1"); // 2
    t.put("a", "2"); // 3
    t.put("b", "1"); // 4
    t.del("b", ""); // 5
    t.put("c", "1"); // 6
    assert_eq!(
        t.apply(Command::Compact(CompactionRequest { revision: 7, physical: false })),
        Err(EtcdError::FutureRev)
    );
    t.apply(Command::Compact(CompactionRequest { revision: 5, physical: false })).unwrap();
    assert_eq!(
        t.apply(Command::Compact(CompactionRequest { revision: 5, physical: false })),
        Err(EtcdError::Compacted)
    );
    assert_eq!(
        t.apply(Command::Compact(CompactionRequest { revision: 4, physical: false })),
        Err(EtcdError::Compacted)
    );
    let at = |rev| t.range(RangeRequest { key: "a".into(), range_end: vec![0], revision: rev, ..Default::default() });
    assert_eq!(at(4), Err(EtcdError::Compacted));
    assert_eq!(keys(&at(5).unwrap()), ["a"], "reads at the compaction revision still work");
    assert_eq!(at(5).unwrap().kvs[0].value, b"2");
    assert_eq!(keys(&at(6).unwrap()), ["a", "c"]);
    // The watch log: from the compaction revision on is kept, the delete at 5 included (as in
    // etcd since its fix for etcd-io/etcd#18089: a watch resumed there must not miss it).
    match t.query(Query::Events { key: "a".into(), range_end: vec![0], from: 5, max: 0 }).unwrap() {
        QueryOutput::Events { events, next, revision } => {
            assert_eq!((next, revision), (7, 6));
            let revs: Vec<i64> = events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision).collect();
            assert_eq!(revs, [5, 6]);
            assert_eq!(events[0].r#type, mvccpb::event::EventType::Delete as i32);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(
        t.query(Query::Events { key: "a".into(), range_end: vec![0], from: 4, max: 0 }),
        Ok(QueryOutput::EventsCompacted { compact_revision: 5, revision: 6 })
    );
    t.sm.check();
}

#[test]
fn the_event_log_never_splits_a_revision() {
    let mut t = T::new();
    t.put("a", "1"); // 2
    t.txn(TxnRequest { success: vec![op_put("b", "1"), op_put("c", "1"), op_put("d", "1")], ..Default::default() })
        .unwrap(); // 3
    t.put("e", "1"); // 4
    let mut from = 1;
    let mut batches = Vec::new();
    loop {
        match t.query(Query::Events { key: vec![0], range_end: vec![0], from, max: 2 }).unwrap() {
            QueryOutput::Events { events, next, revision } => {
                batches.push(events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision).collect::<Vec<_>>());
                from = next;
                if next > revision {
                    break;
                }
            }
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(batches, [vec![2, 3, 3, 3], vec![4]], "revision 3's three events stay together");
    // A single key's history too.
    match t.query(Query::Events { key: "b".into(), range_end: vec![], from: 1, max: 1 }).unwrap() {
        QueryOutput::Events { events, next, .. } => assert_eq!((events.len(), next), (1, 4), "resume after revision 3"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn leases_expire_through_the_log() {
    let mut t = T::new();
    let Output::LeaseGrant(g) = t.apply(Command::LeaseGrant(LeaseGrantRequest { id: 0, ttl: 1 })).unwrap() else {
        panic!()
    };
    assert!(g.id > 0, "a chosen id is positive");
    assert_eq!(g.ttl, 2, "TTLs below the minimum are raised to it");
    let id = g.id;
    assert_eq!(t.apply(Command::LeaseGrant(LeaseGrantRequest { id, ttl: 5 })), Err(EtcdError::LeaseExist));
    assert_eq!(
        t.apply(Command::LeaseGrant(LeaseGrantRequest { id: 9, ttl: 9_000_000_001 })),
        Err(EtcdError::LeaseTtlTooLarge)
    );
    for k in ["x", "y"] {
        t.apply(Command::Put(PutRequest { key: k.into(), value: "v".into(), lease: id, ..Default::default() }))
            .unwrap();
    }
    let ttl = |t: &T, now| match t.query(Query::LeaseTimeToLive { id, keys: true, now }) {
        Ok(QueryOutput::LeaseTimeToLive(r)) => (r.ttl, r.granted_ttl, r.keys.len()),
        o => panic!("{o:?}"),
    };
    assert_eq!(ttl(&t, t.now + SEC / 2), (1, 2, 2));
    t.now += SEC;
    t.apply(Command::LeaseKeepAlive(id)).unwrap();
    assert_eq!(ttl(&t, t.now), (2, 2, 2), "keep-alive restarts the TTL");
    assert_eq!(t.query(Query::ExpiredLeases { now: t.now + SEC }), Ok(QueryOutput::ExpiredLeases(vec![])));
    assert_eq!(t.query(Query::ExpiredLeases { now: t.now + 2 * SEC }), Ok(QueryOutput::ExpiredLeases(vec![id])));
    // The leader proposes the expiry; the entry's own time decides.
    assert_eq!(t.apply(Command::ExpireLeases), Ok(Output::Expired(vec![])));
    t.now += 2 * SEC;
    // Past its expiry but not yet revoked (the revocation is a later entry; a new leader's
    // promotion may come after a client's keep-alive): still renewable, for a full TTL.
    t.apply(Command::LeaseKeepAlive(id)).unwrap();
    assert_eq!(t.apply(Command::ExpireLeases), Ok(Output::Expired(vec![])), "renewed before its revocation");
    t.now += 2 * SEC;
    let rev = t.sm.store().rev();
    assert_eq!(t.apply(Command::ExpireLeases), Ok(Output::Expired(vec![id])));
    assert_eq!(t.sm.store().rev(), rev + 1, "a revoke deletes its keys in one revision");
    assert!(t.get("x").is_none() && t.get("y").is_none());
    assert_eq!(t.query(Query::LeaseTimeToLive { id, keys: false, now: t.now }), Err(EtcdError::LeaseNotFound));
    assert_eq!(t.apply(Command::LeaseRevoke(LeaseRevokeRequest { id })), Err(EtcdError::LeaseNotFound));
}

#[test]
fn promotion_extends_leases() {
    let mut t = T::new();
    t.apply(Command::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 10 })).unwrap();
    t.now += 9 * SEC;
    assert_eq!(t.apply(Command::PromoteLeases { extend: SEC }), Ok(Output::Promoted(1)));
    t.now += 10 * SEC;
    assert_eq!(t.apply(Command::ExpireLeases), Ok(Output::Expired(vec![])), "a new leader extends every lease");
    t.now += SEC;
    assert_eq!(t.apply(Command::ExpireLeases), Ok(Output::Expired(vec![7])));
}

/// A snapshot in the format written before the store's maps became persistent (the revision
/// index included, no format mark) still restores: the same keys, revisions and hash.
#[test]
fn a_snapshot_in_the_legacy_format_restores() {
    // The legacy layout, field by field as postcard wrote it (a map as its pairs).
    type Kv = (i64, i64, i64, Vec<u8>, i64); // create, mod, version, value, lease
    type Entry = ((i64, i64), Option<Kv>);
    type Lease = (i64, u64, Vec<Vec<u8>>); // ttl, expiry, keys
    #[allow(clippy::type_complexity)]
    let legacy: ((Vec<(Vec<u8>, Vec<Entry>)>, Vec<((i64, i64), Vec<u8>)>, i64, i64, u64), Vec<(i64, Lease)>, u64) = (
        (
            vec![
                (b"a".to_vec(), vec![((2, 0), Some((2, 2, 1, b"1".to_vec(), 0))), ((4, 0), None)]),
                (b"b".to_vec(), vec![((3, 0), Some((3, 3, 1, b"22".to_vec(), 0)))]),
            ],
            vec![((2, 0), b"a".to_vec()), ((3, 0), b"b".to_vec()), ((4, 0), b"a".to_vec())],
            4,
            -1,
            (1 + 1 + 48) + (1 + 48) + (1 + 2 + 48),
        ),
        vec![],
        7 * SEC,
    );
    let bytes = postcard::to_allocvec(&legacy).unwrap();
    let mut sm = EtcdSm::default();
    sm.restore(&bytes);
    sm.check();
    let mut t = T::new();
    t.put("a", "1");
    t.put("b", "22");
    t.del("a", "");
    assert_eq!(sm.store().rev(), 4);
    assert_eq!(sm.store().hash(4), t.sm.store().hash(4));
    assert_eq!(sm.store().size_bytes(), t.sm.store().size_bytes());
    let at = |rev| RangeRequest { key: b"a".to_vec(), range_end: b"c".to_vec(), revision: rev, ..Default::default() };
    let restored = T { sm, index: 4, now: 7 * SEC };
    for rev in 2..=4 {
        assert_eq!(restored.range(at(rev)), t.range(at(rev)), "revision {rev}");
    }
    // Written again, it is in today's format, which restores to the same state.
    let mut again = EtcdSm::default();
    again.restore(&restored.sm.snapshot());
    assert_eq!(again.store().hash(4), t.sm.store().hash(4));
    assert_ne!(restored.sm.snapshot(), bytes, "today's format differs");
}

#[test]
fn malformed_commands_change_nothing() {
    let mut sm = EtcdSm::default();
    let before = sm.snapshot();
    let out = sm.apply(b"\xff\xff garbage", ApplyCtx { index: 1, time: 0 });
    assert_eq!(sixfive_etcd::sm::decode_result(&out), Err(EtcdError::Malformed));
    assert_eq!(sm.snapshot(), before);
    assert_eq!(sixfive_etcd::sm::decode_answer(&sm.query(b"\xff")), Err(EtcdError::Malformed));
}

// ---- A naive model: every key's full list of (revision, value or deleted). ----

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u8),
    Del(u8, u8),
    Txn(u8, u8, u8),
    Compact(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..8, 0u8..3).prop_map(|(k, n)| Op::Del(k, n)),
        2 => (0u8..8, 0u8..8, any::<u8>()).prop_map(|(a, b, v)| Op::Txn(a, b, v)),
        1 => any::<u8>().prop_map(Op::Compact),
    ]
}

fn key(k: u8) -> Vec<u8> {
    vec![b'k', b'0' + k]
}

/// Model: for each revision, the full map of live keys (key -> (value, create, mod, version)).
type Snap = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64)>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reads_at_every_revision_match_a_naive_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut t = T::new();
        let mut model: Vec<Snap> = vec![Snap::new(), Snap::new()]; // index = revision
        let mut compacted = -1i64;
        for o in &ops {
            let cur = model.last().unwrap().clone();
            let rev = model.len() as i64;
            let mut next = cur.clone();
            let upd = |next: &mut Snap, k: Vec<u8>, v: Vec<u8>| {
                let (c, ver) = match cur.get(&k) { Some(e) => (e.1, e.3 + 1), None => (rev, 1) };
                next.insert(k, (v, c, rev, ver));
            };
            match o {
                Op::Put(k, v) => {
                    t.apply(Command::Put(PutRequest { key: key(*k), value: vec![*v], ..Default::default() })).unwrap();
                    upd(&mut next, key(*k), vec![*v]);
                }
                Op::Del(k, n) => {
                    let end = if *n == 0 { vec![] } else { key(k + n) };
                    t.apply(Command::DeleteRange(DeleteRangeRequest { key: key(*k), range_end: end.clone(), ..Default::default() })).unwrap();
                    next.retain(|kk, _| if end.is_empty() { kk != &key(*k) } else { kk < &key(*k) || kk >= &end });
                }
                Op::Txn(a, b, v) => {
                    // if a exists: put b=v else delete b
                    let ex = cur.contains_key(&key(*a));
                    let r = t.txn(TxnRequest {
                        compare: vec![cmp(std::str::from_utf8(&key(*a)).unwrap(), CompareTarget::Version, CompareResult::Greater, TargetUnion::Version(0))],
                        success: vec![op_put(std::str::from_utf8(&key(*b)).unwrap(), std::str::from_utf8(&[b'a' + v % 26]).unwrap())],
                        failure: vec![op_del(std::str::from_utf8(&key(*b)).unwrap())],
                    }).unwrap();
                    prop_assert_eq!(r.succeeded, ex);
                    if ex { upd(&mut next, key(*b), vec![b'a' + v % 26]); } else { next.remove(&key(*b)); }
                }
                Op::Compact(r) => {
                    let want = (*r as i64) % rev;
                    let res = t.apply(Command::Compact(CompactionRequest { revision: want, physical: false }));
                    if want <= compacted { prop_assert_eq!(res, Err(EtcdError::Compacted)); }
                    else { prop_assert!(res.is_ok()); compacted = want; }
                    continue;
                }
            }
            if next != cur { model.push(next); }
            prop_assert_eq!(t.sm.store().rev(), model.len() as i64 - 1);
        }
        t.sm.check();
        // Every revision: compacted ones refused, the others read exactly as the model says.
        let cur = model.len() as i64 - 1;
        for rev in 1..=cur {
            let r = t.range(RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), revision: rev, ..Default::default() });
            if rev < compacted { prop_assert_eq!(r, Err(EtcdError::Compacted)); continue; }
            let got: Snap = r.unwrap().kvs.into_iter().map(|kv| (kv.key, (kv.value, kv.create_revision, kv.mod_revision, kv.version))).collect();
            prop_assert_eq!(&got, &model[rev as usize], "revision {}", rev);
        }
        // The copy taken for a snapshot off the node's loop serialises to the same bytes,
        // even after the state moved on (deletes and compactions included above).
        let later = t.sm.snapshot_later();
        let now = t.sm.snapshot();
        t.apply(Command::Put(PutRequest { key: key(0), value: b"after".to_vec(), ..Default::default() })).unwrap();
        prop_assert_eq!(later(b"prefix".to_vec()), [&b"prefix"[..], &now].concat());
        t.apply(Command::DeleteRange(DeleteRangeRequest { key: key(0), ..Default::default() })).unwrap();
        // Snapshot and restore give the same state; hashes agree.
        let mut other = EtcdSm::default();
        other.restore(&t.sm.snapshot());
        other.check();
        prop_assert_eq!(other.snapshot(), t.sm.snapshot());
        prop_assert_eq!(other.store().hash(cur), t.sm.store().hash(cur));
    }
}
