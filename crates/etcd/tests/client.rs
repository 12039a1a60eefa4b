//! The gRPC service through the `etcd-client` crate, over a real socket, on an in-process
//! replica: what a Rust program using etcd sees when it talks to sixfive.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions, WatchResponse,
};
use sixfive_etcd::replica::{ManualClock, MemberInfo};
use sixfive_etcd::{AutoCompaction, Config, EtcdService, LocalReplica, ServiceConfig};
use sixfive_etcd::{Replica, ReplicaError, ReplicaStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

struct Server {
    addr: String,
    clock: ManualClock,
    _stop: oneshot::Sender<()>,
}

async fn start(cfg: ServiceConfig) -> Server {
    let clock = ManualClock::new(1_000_000_000);
    let replica = Arc::new(LocalReplica::with_clock(Config::default(), clock.clock()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(EtcdService::new(replica, cfg).serve(listener, async {
        let _ = stopped.await;
    }));
    Server { addr, clock, _stop: stop }
}

async fn client(s: &Server) -> Client {
    Client::connect([s.addr.as_str()], None).await.unwrap()
}

fn grpc(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        e => panic!("not a gRPC status: {e:?}"),
    }
}

async fn next(w: &mut etcd_client::WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("a watch response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn put_get_prefix_range_delete() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    let r = c.put("foo", "bar", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 2);
    let r = c.put("foo", "baz", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"bar");
    for k in ["foo/a", "foo/b", "fop", "fo"] {
        c.put(k, k, None).await.unwrap();
    }
    let g = c.get("foo", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!((kv.value(), kv.version(), kv.create_revision(), kv.mod_revision()), (&b"baz"[..], 2, 2, 3));
    let keys =
        |g: &etcd_client::GetResponse| g.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&c.get("foo", Some(GetOptions::new().with_prefix())).await.unwrap()), ["foo", "foo/a", "foo/b"]);
    assert_eq!(keys(&c.get("fo", Some(GetOptions::new().with_range("foo/b"))).await.unwrap()), ["fo", "foo", "foo/a"]);
    assert_eq!(keys(&c.get("foo/b", Some(GetOptions::new().with_from_key())).await.unwrap()), ["foo/b", "fop"]);
    let lim = c.get("", Some(GetOptions::new().with_all_keys().with_limit(2))).await.unwrap();
    assert_eq!((keys(&lim).len(), lim.more(), lim.count()), (2, true, 5));
    let sorted = c
        .get("", Some(GetOptions::new().with_all_keys().with_sort(SortTarget::Key, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(keys(&sorted), ["fop", "foo/b", "foo/a", "foo", "fo"]);
    let old = c.get("foo", Some(GetOptions::new().with_revision(2))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"bar", "a read at a past revision");
    assert!(c.get("foo", Some(GetOptions::new().with_keys_only())).await.unwrap().kvs()[0].value().is_empty());
    assert_eq!(c.get("foo", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count(), 3);
    let d = c.delete("foo", Some(DeleteOptions::new().with_prefix().with_prev_key())).await.unwrap();
    assert_eq!((d.deleted(), d.prev_kvs().len()), (3, 3));
    assert!(c.get("foo", None).await.unwrap().kvs().is_empty());
    let ser = c.get("fop", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(ser.kvs()[0].value(), b"fop");
}

#[tokio::test]
async fn txn_compare_and_swap() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    c.put("lock", "free", None).await.unwrap();
    let cas = |want: &'static str, new: &'static str| {
        Txn::new()
            .when([Compare::value("lock", CompareOp::Equal, want)])
            .and_then([TxnOp::put("lock", new, None)])
            .or_else([TxnOp::get("lock", None)])
    };
    let r = c.txn(cas("free", "held")).await.unwrap();
    assert!(r.succeeded());
    let r = c.txn(cas("free", "stolen")).await.unwrap();
    assert!(!r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"held"),
        o => panic!("{o:?}"),
    }
    let r = c
        .txn(Txn::new().when([Compare::version("absent", CompareOp::Equal, 0)]).and_then([
            TxnOp::put("a", "1", None),
            TxnOp::put("b", "2", None),
            TxnOp::delete("lock", None),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded());
    let rev = r.header().unwrap().revision();
    let a = c.get("a", None).await.unwrap();
    let b = c.get("b", None).await.unwrap();
    assert_eq!((a.kvs()[0].mod_revision(), b.kvs()[0].mod_revision()), (rev, rev), "one revision per txn");
    let dup = c.txn(Txn::new().and_then([TxnOp::put("x", "1", None), TxnOp::put("x", "2", None)])).await.unwrap_err();
    let st = grpc(dup);
    assert_eq!(
        (st.code(), st.message()),
        (tonic::Code::InvalidArgument, "etcdserver: duplicate key given in txn request")
    );
    let many: Vec<TxnOp> = (0..200).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect();
    let st = grpc(c.txn(Txn::new().and_then(many)).await.unwrap_err());
    assert_eq!(
        (st.code(), st.message()),
        (tonic::Code::InvalidArgument, "etcdserver: too many operations in txn request")
    );
}

#[tokio::test]
async fn errors_carry_etcds_codes_and_messages() {
    let s = start(ServiceConfig { max_request_bytes: 1024, ..ServiceConfig::default() }).await;
    let mut c = client(&s).await;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await.unwrap();
    }
    c.compact(4, None).await.unwrap();
    let st = grpc(c.get("k", Some(GetOptions::new().with_revision(3))).await.unwrap_err());
    assert_eq!(
        (st.code(), st.message()),
        (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
    );
    let st = grpc(c.get("k", Some(GetOptions::new().with_revision(100))).await.unwrap_err());
    assert_eq!(
        (st.code(), st.message()),
        (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
    );
    let st = grpc(c.compact(3, None).await.unwrap_err());
    assert_eq!(st.code(), tonic::Code::OutOfRange);
    let st = grpc(c.put("", "v", None).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::InvalidArgument, "etcdserver: key is not provided"));
    let st = grpc(c.put("big", vec![0u8; 2048], None).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::InvalidArgument, "etcdserver: request is too large"));
    let st = grpc(c.put("k", "v", Some(PutOptions::new().with_lease(42))).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::NotFound, "etcdserver: requested lease not found"));
    let st = grpc(c.put("nokey", "", Some(PutOptions::new().with_ignore_value())).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::InvalidArgument, "etcdserver: key not found"));
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v4", "refused requests changed nothing");
}

#[tokio::test]
async fn leases_grant_keepalive_ttl_revoke_and_expire() {
    // No promotion extension: the keeper's promotion after the (first) election may land after
    // the grants below, and would add its extension to the remaining TTL checked here.
    let s = start(ServiceConfig {
        lease_check_interval: Duration::from_millis(20),
        lease_promote_extend: Duration::ZERO,
        ..ServiceConfig::default()
    })
    .await;
    let mut c = client(&s).await;
    let g = c.lease_grant(10, Some(LeaseGrantOptions::new().with_id(1234))).await.unwrap();
    assert_eq!((g.id(), g.ttl()), (1234, 10));
    let st = grpc(c.lease_grant(10, Some(LeaseGrantOptions::new().with_id(1234))).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::FailedPrecondition, "etcdserver: lease already exists"));
    let chosen = c.lease_grant(30, None).await.unwrap().id();
    assert!(chosen > 0);
    c.put("l/a", "1", Some(PutOptions::new().with_lease(1234))).await.unwrap();
    c.put("l/b", "2", Some(PutOptions::new().with_lease(1234))).await.unwrap();
    c.put("l/c", "3", Some(PutOptions::new().with_lease(chosen))).await.unwrap();
    let ttl = c.lease_time_to_live(1234, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert_eq!((ttl.ttl(), ttl.granted_ttl(), ttl.keys().len()), (10, 10, 2));
    let mut ids: Vec<i64> = c.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    ids.sort();
    assert_eq!(ids, {
        let mut v = vec![1234, chosen];
        v.sort();
        v
    });

    // Keep-alive restarts the TTL at the leader's clock.
    s.clock.advance(6_000_000);
    let (mut keeper, mut stream) = c.lease_keep_alive(1234).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let ka = stream.message().await.unwrap().unwrap();
    assert_eq!((ka.id(), ka.ttl()), (1234, 10));
    assert_eq!(c.lease_time_to_live(1234, None).await.unwrap().ttl(), 10);

    // Expiry: the leader's keeper revokes the lease through the log; its keys go.
    s.clock.advance(11_000_000);
    let mut gone = false;
    for _ in 0..500 {
        if c.get("l/a", None).await.unwrap().kvs().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "an expired lease's keys are deleted");
    assert!(c.get("l/b", None).await.unwrap().kvs().is_empty());
    assert_eq!(c.lease_time_to_live(1234, None).await.unwrap().ttl(), -1, "etcd answers -1 for an unknown lease");
    keeper.keep_alive().await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 0, "a keep-alive of an unknown lease gets TTL 0");
    // (the other lease was kept alive by nobody but is younger: 30 s from grant.)
    c.lease_revoke(chosen).await.unwrap();
    assert!(c.get("l/c", None).await.unwrap().kvs().is_empty(), "revoke deletes the attached keys");
    let st = grpc(c.lease_revoke(chosen).await.unwrap_err());
    assert_eq!(st.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn watch_past_revisions_prefix_filters_and_cancel() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    c.put("w/a", "1", None).await.unwrap(); // 2
    c.put("w/b", "1", None).await.unwrap(); // 3
    c.delete("w/a", None).await.unwrap(); // 4
    c.put("x", "1", None).await.unwrap(); // 5

    // From a past revision: history replayed in order, prefix only, with prev_kv.
    let mut w =
        c.watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(2).with_prev_key())).await.unwrap();
    let created = next(&mut w).await;
    assert!(created.created());
    let id = created.watch_id();
    let mut evs = Vec::new();
    while evs.len() < 3 {
        let r = next(&mut w).await;
        assert_eq!(r.watch_id(), id);
        evs.extend(r.events().iter().map(|e| {
            let kv = e.kv().unwrap();
            (
                format!("{:?}", e.event_type()),
                kv.key_str().unwrap().to_string(),
                kv.mod_revision(),
                e.prev_kv().map(|p| p.mod_revision()),
            )
        }));
    }
    assert_eq!(
        evs,
        [
            ("Put".to_string(), "w/a".to_string(), 2, None),
            ("Put".into(), "w/b".into(), 3, None),
            ("Delete".into(), "w/a".into(), 4, Some(2)),
        ]
    );
    // New events arrive live; another watch on the same stream filters puts out.
    w.watch("w/", Some(WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]))).await.unwrap();
    let created2 = next(&mut w).await;
    assert!(created2.created());
    let id2 = created2.watch_id();
    assert_ne!(id, id2);
    c.put("w/c", "1", None).await.unwrap(); // 6
    c.delete("w/b", None).await.unwrap(); // 7
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = next(&mut w).await;
        for e in r.events() {
            seen.push((r.watch_id(), e.kv().unwrap().mod_revision()));
        }
    }
    seen.sort();
    let mut want = vec![(id, 6), (id, 7), (id2, 7)];
    want.sort();
    assert_eq!(seen, want, "the NOPUT watcher sees only the delete");

    w.cancel(id).await.unwrap();
    let r = next(&mut w).await;
    assert!(r.canceled() && r.watch_id() == id);
    w.request_progress().await.unwrap();
    let p = next(&mut w).await;
    assert_eq!((p.watch_id(), p.header().unwrap().revision()), (-1, 7), "progress: everything up to 7 sent");
}

#[tokio::test]
async fn watch_on_compacted_revision_is_cancelled_with_the_compact_revision() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    for i in 0..5 {
        c.put("k", format!("{i}"), None).await.unwrap(); // 2..=6
    }
    c.compact(5, None).await.unwrap();
    let mut w = c.watch("k", Some(WatchOptions::new().with_start_revision(3))).await.unwrap();
    assert!(next(&mut w).await.created());
    let r = next(&mut w).await;
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 5);
    // Resuming from the compaction revision works: no event lost after it.
    let mut w = c.watch("k", Some(WatchOptions::new().with_start_revision(5))).await.unwrap();
    assert!(next(&mut w).await.created());
    let r = next(&mut w).await;
    let revs: Vec<i64> = r.events().iter().map(|e| e.kv().unwrap().mod_revision()).collect();
    assert_eq!(revs, [5, 6]);
}

/// As etcd: a watch whose range holds no key (`range_end` at or below `key`) is refused at once
/// with one response, created and canceled, for watch id -1; `"\0"` as the end means "from
/// `key` on" and is served; the stream goes on serving its other watches.
#[tokio::test]
async fn a_watch_on_an_empty_range_is_refused_at_once() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    let mut w = c.watch("b", Some(WatchOptions::new().with_range("c"))).await.unwrap();
    assert!(next(&mut w).await.created());
    for (key, end) in [("c", "a/3"), ("b", "b")] {
        w.watch(key, Some(WatchOptions::new().with_range(end).with_start_revision(1))).await.unwrap();
        let r = next(&mut w).await;
        assert!(r.created() && r.canceled(), "{key:?}..{end:?}: {r:?}");
        assert_eq!((r.watch_id(), r.cancel_reason()), (-1, "mvcc: watcher range is empty"));
    }
    w.watch("b", Some(WatchOptions::new().with_from_key())).await.unwrap();
    let from_key = next(&mut w).await;
    assert!(from_key.created() && !from_key.canceled(), "{from_key:?}");
    c.put("bb", "1", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let r = next(&mut w).await;
        seen.extend(r.events().iter().map(|e| (r.watch_id(), e.kv().unwrap().key_str().unwrap().to_string())));
    }
    seen.sort();
    assert_eq!(seen, [(0, "bb".to_string()), (from_key.watch_id(), "bb".to_string())]);
}

#[tokio::test]
async fn watch_resumes_from_the_last_seen_revision_without_loss() {
    let s = start(ServiceConfig::default()).await;
    let mut writer = client(&s).await;
    let mut last = 0;
    let mut got = Vec::new();
    // Five reconnections; writes continue in between; every revision is seen once, in order.
    for round in 0..5 {
        let mut c = client(&s).await;
        let mut w = c.watch("r", Some(WatchOptions::new().with_start_revision(last + 1).with_prefix())).await.unwrap();
        assert!(next(&mut w).await.created());
        for i in 0..10 {
            writer.put(format!("r{}", i % 3), format!("{round}-{i}"), None).await.unwrap();
        }
        while got.len() < (round + 1) * 10 {
            for e in next(&mut w).await.events() {
                got.push(e.kv().unwrap().mod_revision());
            }
        }
        last = *got.last().unwrap();
        drop(w);
    }
    let want: Vec<i64> = (2..52).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn cluster_and_maintenance() {
    let s = start(ServiceConfig::default()).await;
    let mut c = client(&s).await;
    c.put("a", "1", None).await.unwrap();
    let m = c.member_list().await.unwrap();
    assert_eq!(m.members().len(), 1);
    let st = c.status().await.unwrap();
    assert_eq!(st.leader(), m.members()[0].id());
    assert!(st.raft_index() >= 1 && st.db_size() > 0);
    assert_eq!(st.version(), "3.6.0");
    let h1 = c.hash_kv(0).await.unwrap();
    assert_eq!(h1.header().unwrap().revision(), 2);
    c.put("b", "1", None).await.unwrap();
    let h2 = c.hash_kv(2).await.unwrap();
    assert_eq!(h1.hash(), h2.hash(), "hashing up to the same revision gives the same hash");
    assert_ne!(c.hash_kv(0).await.unwrap().hash(), h1.hash());
    let alarms = c.alarm(etcd_client::AlarmAction::Get, etcd_client::AlarmType::None, None).await.unwrap();
    assert!(alarms.alarms().is_empty());
}

/// Polls until reads at `rev` are refused as compacted.
async fn until_compacted(c: &mut Client, rev: i64) {
    for _ in 0..1000 {
        if let Err(e) = c.get("k", Some(GetOptions::new().with_revision(rev))).await {
            assert_eq!(grpc(e).code(), tonic::Code::OutOfRange);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("revision {rev} never compacted");
}

#[tokio::test]
async fn auto_compaction_by_revision_keeps_the_last_revisions() {
    let ac = AutoCompaction::Revision { retain: 3, interval: Duration::from_millis(10) };
    let s = start(ServiceConfig { auto_compaction: Some(ac), ..ServiceConfig::default() }).await;
    let mut c = client(&s).await;
    for i in 0..10 {
        c.put("k", format!("{i}"), None).await.unwrap(); // 2..=11
    }
    until_compacted(&mut c, 7).await;
    let r = c.get("k", Some(GetOptions::new().with_revision(8))).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"6", "the last 3 revisions stay readable");
}

#[tokio::test]
async fn auto_compaction_by_age_compacts_what_is_older_than_the_retention() {
    let ac = AutoCompaction::Periodic { retention: Duration::from_millis(100) };
    let s = start(ServiceConfig { auto_compaction: Some(ac), ..ServiceConfig::default() }).await;
    let mut c = client(&s).await;
    for i in 0..5 {
        c.put("k", format!("{i}"), None).await.unwrap(); // 2..=6
    }
    // Let the compactor note revision 6 at this clock time, then age it past the retention.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.clock.advance(200_000);
    c.put("k", "new", None).await.unwrap(); // 7, younger than the retention
    until_compacted(&mut c, 5).await;
    let r = c.get("k", Some(GetOptions::new().with_revision(6))).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"4", "history younger than the retention stays");
    assert!(c.get("k", Some(GetOptions::new().with_revision(7))).await.is_ok());
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    out
}

/// A replica cut off from its cluster: no leader, nothing goes through.
struct Leaderless;

#[tonic::async_trait]
impl Replica for Leaderless {
    async fn submit(&self, _cmd: Vec<u8>) -> Result<Vec<u8>, ReplicaError> {
        Err(ReplicaError::NoLeader)
    }
    async fn read(&self, _q: Vec<u8>, linearizable: bool) -> Result<Vec<u8>, ReplicaError> {
        if linearizable {
            return Err(ReplicaError::NoLeader);
        }
        // A serializable read still answers from the local (empty) state.
        Ok(sixfive_rsm::StateMachine::query(&sixfive_etcd::EtcdSm::default(), &_q))
    }
    fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
    fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            cluster_id: 7,
            member_id: 2,
            leader: None,
            term: 3,
            commit_index: 0,
            applied_index: 0,
            db_size: 0,
            members: vec![MemberInfo {
                id: 2,
                name: "n2".into(),
                peer_urls: vec![],
                client_urls: vec![],
                is_learner: false,
            }],
        }
    }
    fn now(&self) -> u64 {
        0
    }
}

#[tokio::test]
async fn health_over_http_on_the_client_port() {
    let s = start(ServiceConfig::default()).await;
    let ok = http_get(&s.addr, "/health").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with(r#"{"health":"true","reason":""}"#), "{ok}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        EtcdService::new(Arc::new(Leaderless), ServiceConfig::default()).serve(listener, std::future::pending()),
    );
    let bad = http_get(&addr, "/health").await;
    assert!(bad.starts_with("HTTP/1.1 503"), "{bad}");
    assert!(bad.ends_with(r#"{"health":"false","reason":"RAFT NO LEADER"}"#), "{bad}");
    // Without a leader, writes and linearizable reads fail as etcd's do; serializable reads work.
    let mut c = Client::connect([addr.as_str()], None).await.unwrap();
    let st = grpc(c.put("k", "v", None).await.unwrap_err());
    assert_eq!((st.code(), st.message()), (tonic::Code::Unavailable, "etcdserver: no leader"));
    let st = grpc(c.get("k", None).await.unwrap_err());
    assert_eq!(st.code(), tonic::Code::Unavailable);
    let r = c.get("k", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert!(r.kvs().is_empty());
    assert_eq!((r.header().unwrap().member_id(), r.header().unwrap().raft_term()), (2, 3));
}
