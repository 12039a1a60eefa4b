//! The etcd state machine replicated by the real `Rsm` on three simulated servers: leases
//! expire through the log with the leader's stamp, so every replica deletes the same keys at
//! the same revision; crashes, a leader change and snapshot installs leave every replica with
//! the same store. Failing seeds print; `SEED=n` replays one.

use std::rc::Rc;

use sixfive_etcd::proto::etcdserverpb::{LeaseGrantRequest, PutRequest, RangeRequest};
use sixfive_etcd::{Command, EtcdError, EtcdSm, Output, Query, QueryOutput};
use sixfive_rpc::Transport;
use sixfive_rsm::testkit::{RsmCluster, request};
use sixfive_rsm::{RsmReply, RsmRequest, StateMachine};
use sixfive_sim::{MS, NetConfig, SEC, SimClient, seeds::run_seeds};

type Cluster = Rc<RsmCluster<EtcdSm>>;

/// Submits a command, trying the leader first, until one server applies it. A retry after an
/// abandoned attempt may apply it twice: the test asserts agreement, not counts.
async fn submit(cl: &Cluster, c: &SimClient, cmd: &Command) -> Result<Output, EtcdError> {
    let t0 = c.now();
    while c.now() - t0 < 20 * SEC {
        let mut order = cl.ids();
        if let Some(l) = cl.leader() {
            order.retain(|&i| i != l);
            order.insert(0, l);
        }
        for id in order {
            if let Ok(RsmReply::Done(out)) = request(c, id, &RsmRequest::Command(cmd.encode()), SEC).await {
                return sixfive_etcd::sm::decode_result(&out);
            }
        }
        c.sleep(50 * MS).await;
    }
    panic!("no server applied {cmd:?} within 20 s");
}

fn put(k: &str, lease: i64) -> Command {
    Command::Put(PutRequest { key: k.into(), value: b"v".to_vec(), lease, ..Default::default() })
}

fn live_keys(sm: &EtcdSm) -> Vec<Vec<u8>> {
    let q = Query::Range(RangeRequest { key: vec![0], range_end: vec![0], keys_only: true, ..Default::default() });
    match sm.answer(q) {
        Ok(QueryOutput::Range(r)) => r.kvs.into_iter().map(|kv| kv.key).collect(),
        o => panic!("{o:?}"),
    }
}

#[test]
fn replicas_agree_on_leases_expiry_and_history() {
    run_seeds("replicas_agree_on_leases_expiry_and_history", 3, |seed| {
        // A small Raft state bound: snapshots are taken and installed along the way.
        let cl: Cluster = Rc::new(RsmCluster::new(seed, 3, NetConfig::default(), Some(1024), EtcdSm::default));
        let c = cl.world.client(1000);
        let cl2 = cl.clone();
        cl.world.block_on(async move {
            let cl = cl2;
            cl.wait_leader(&c).await;
            let granted = submit(&cl, &c, &Command::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 3 })).await;
            assert!(matches!(granted, Ok(Output::LeaseGrant(_)) | Err(EtcdError::LeaseExist)), "{granted:?}");
            for i in 0..60 {
                let lease = if i % 3 == 0 { 7 } else { 0 };
                submit(&cl, &c, &put(&format!("k{i:02}"), lease)).await.expect("put applies");
                if i == 20 {
                    // Lose the leader mid-way; it comes back later and catches up.
                    let l = cl.leader().expect("a leader");
                    cl.crash(l);
                    c.sleep(2 * SEC).await;
                    cl.start(l);
                }
            }
            // The lease was granted at least 3 s of log time ago; the leader's expiry entry
            // revokes it at its own stamp.
            c.sleep(4 * SEC).await;
            let expired = submit(&cl, &c, &Command::ExpireLeases).await.expect("expiry applies");
            let Output::Expired(ids) = expired else { panic!("{expired:?}") };
            // A retried attempt may find it already revoked by the first.
            assert!(ids == vec![7] || ids.is_empty(), "{ids:?}");
            submit(&cl, &c, &put("after", 0)).await.expect("put applies");
            // Every replica reaches the same state.
            for _ in 0..200 {
                let snaps: Vec<Option<Vec<u8>>> = cl.ids().iter().map(|&id| cl.with_sm(id, |s| s.snapshot())).collect();
                if snaps.iter().all(|s| s.is_some() && *s == snaps[0]) {
                    break;
                }
                c.sleep(50 * MS).await;
            }
            let snap: Vec<usize> = cl.ids().iter().map(|&id| cl.snapshot_bytes(id)).collect();
            assert!(snap.iter().any(|&b| b > 0), "seed {seed}: no server snapshotted: {snap:?}");
            let first = cl.with_sm(1, |s| s.snapshot()).unwrap();
            for id in cl.ids() {
                assert_eq!(cl.with_sm(id, |s| s.snapshot()).unwrap(), first, "seed {seed}: replica {id} differs");
                cl.with_sm(id, |s| {
                    s.check();
                    let keys = live_keys(s);
                    for i in (0..60).step_by(3) {
                        assert!(!keys.contains(&format!("k{i:02}").into_bytes()), "leased key k{i:02} survived");
                    }
                    assert!(keys.contains(&b"k01".to_vec()) && keys.contains(&b"after".to_vec()));
                    assert!(
                        s.answer(Query::LeaseLeases)
                            .is_ok_and(|o| matches!(o, QueryOutput::LeaseLeases(r) if r.leases.is_empty()))
                    );
                });
            }
        });
    });
}
