//! Sections 4B and 4C: the fault-tolerant KV on the replicated state machine.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use common::*;
use sixfive_kv::{History, KvClient, KvError, KvSm, RaftClerk};
use sixfive_raft::NodeId;
use sixfive_rpc::Transport;
use sixfive_rsm::testkit::{RsmCluster, TestNode};
use sixfive_sim::{MS, NetConfig, SEC, SimClient, seeds::run_seeds};

type Cluster = Rc<RsmCluster<KvSm>>;

fn cluster(seed: u64, n: u64, unreliable: bool, max_raft_state: Option<usize>) -> Cluster {
    Rc::new(RsmCluster::new(seed, n, NetConfig { unreliable, ..Default::default() }, max_raft_state, KvSm::default))
}

fn clerk(cl: &Cluster, endpoint: u64, id: u64, h: &History) -> RaftClerk<SimClient> {
    RaftClerk::new(cl.world.client(endpoint), cl.ids(), id).with_history(h.clone())
}

#[derive(Clone, Copy, Default)]
struct Opts {
    clients: u64,
    servers: u64,
    unreliable: bool,
    crash: bool,
    partitions: bool,
    max_raft_state: Option<usize>,
    random_keys: bool,
}

/// The course's generic test: 3 rounds of 1 s of clients doing Get-then-Put(version), with
/// the faults `o` asks for; after each round the version of every key must equal the number of
/// successful Puts to it (sessions make every result exact), the Raft state must respect
/// `max_raft_state`, and at the end the whole history must be linearizable.
fn generic(seed: u64, o: Opts) {
    let cl = cluster(seed, o.servers, o.unreliable, o.max_raft_state);
    let h = History::default();
    let oks: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
    for round in 0..3u64 {
        let done = Rc::new(Cell::new(false));
        let clients: Vec<_> = (0..o.clients)
            .map(|i| {
                let id = round * 1000 + i;
                let mut ck = clerk(&cl, 10_000 + id, id, &h);
                let (done, oks) = (done.clone(), oks.clone());
                cl.world.spawn(async move {
                    let mut n = 0u64;
                    while !done.get() {
                        let key = if o.random_keys {
                            format!("k{}", ck.transport().world().random(3))
                        } else {
                            format!("c{i}")
                        };
                        let ver = match ck.get(&key).await {
                            Ok((_, v)) => v,
                            Err(KvError::NoKey) => 0,
                            Err(e) => panic!("get: {e}"),
                        };
                        match ck.put(&key, &format!("{id}.{n}"), ver).await {
                            Ok(()) => *oks.borrow_mut().entry(key).or_insert(0) += 1,
                            Err(KvError::Version) => assert!(o.random_keys, "a client alone on its key lost a race"),
                            Err(e) => panic!("put: {e}"),
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        if o.partitions {
            let (cl2, done, c) = (cl.clone(), done.clone(), cl.world.client(9_999));
            cl.world.spawn(async move {
                loop {
                    let pause = 1000 + cl2.world.random(200);
                    c.sleep(pause * MS).await;
                    if done.get() {
                        break;
                    }
                    let mut ids = cl2.ids();
                    cl2.world.with_rng(|r| r.shuffle(&mut ids));
                    let cut = 1 + cl2.world.random(ids.len() as u64 - 1) as usize;
                    cl2.world.net(|n| n.partition(&[&ids[..cut], &ids[cut..]]));
                }
            });
        }
        cl.world.run_for(SEC);
        done.set(true);
        cl.world.net(|n| n.heal());
        if o.crash {
            // Stop all servers, pause, restart all from their disks.
            for id in cl.ids() {
                cl.crash(id);
            }
            cl.world.run_for(SEC);
            for id in cl.ids() {
                cl.start(id);
            }
        }
        let counts = cl.world.block_on(async move {
            let mut v = Vec::new();
            for c in clients {
                v.push(c.await);
            }
            v
        });
        assert!(counts.iter().all(|&n| n > 0), "a client made no progress in round {round}: {counts:?}");
        let mut ck = clerk(&cl, 9_000 + round, 900_000 + round, &h);
        let expected = oks.borrow().clone();
        cl.world.block_on(async move {
            for (key, n) in expected {
                let (_, ver) = ck.get(&key).await.expect("key exists");
                assert_eq!(ver, n, "key {key}: version {ver} but {n} successful Puts");
            }
        });
        for id in cl.ids() {
            match o.max_raft_state {
                Some(m) => {
                    let size = cl.raft_state_bytes(id);
                    assert!(size <= 8 * m, "server {id}: Raft state {size} bytes > 8 x {m}");
                }
                None => assert_eq!(cl.snapshot_bytes(id), 0, "server {id} snapshotted with max_raft_state -1"),
            }
        }
    }
    check_versioned(&h.records());
}

fn run(name: &str, o: Opts) {
    run_seeds(name, 1, |seed| generic(seed, o));
}

const FIVE: Opts = Opts { clients: 5, servers: 5, ..Opts::ZERO };

impl Opts {
    const ZERO: Opts = Opts {
        clients: 0,
        servers: 0,
        unreliable: false,
        crash: false,
        partitions: false,
        max_raft_state: None,
        random_keys: false,
    };
}

#[test]
fn basic_4b() {
    run("basic_4b", Opts { clients: 1, ..FIVE });
}

#[test]
fn concurrent_4b() {
    run("concurrent_4b", FIVE);
}

#[test]
fn unreliable_4b() {
    run("unreliable_4b", Opts { unreliable: true, ..FIVE });
}

#[test]
fn many_partitions_one_client_4b() {
    run("many_partitions_one_client_4b", Opts { clients: 1, partitions: true, ..FIVE });
}

#[test]
fn many_partitions_many_clients_4b() {
    run("many_partitions_many_clients_4b", Opts { partitions: true, ..FIVE });
}

#[test]
fn persist_one_client_4b() {
    run("persist_one_client_4b", Opts { clients: 1, crash: true, ..FIVE });
}

#[test]
fn persist_concurrent_4b() {
    run("persist_concurrent_4b", Opts { crash: true, ..FIVE });
}

#[test]
fn persist_concurrent_unreliable_4b() {
    run("persist_concurrent_unreliable_4b", Opts { crash: true, unreliable: true, ..FIVE });
}

#[test]
fn persist_partition_4b() {
    run("persist_partition_4b", Opts { crash: true, partitions: true, ..FIVE });
}

#[test]
fn persist_partition_unreliable_4b() {
    run("persist_partition_unreliable_4b", Opts { crash: true, partitions: true, unreliable: true, ..FIVE });
}

#[test]
fn persist_partition_unreliable_linearizable_4b() {
    run(
        "persist_partition_unreliable_linearizable_4b",
        Opts {
            clients: 15,
            servers: 7,
            crash: true,
            partitions: true,
            unreliable: true,
            random_keys: true,
            ..Opts::ZERO
        },
    );
}

const SNAP: Option<usize> = Some(1000);

#[test]
fn snapshot_recover_4c() {
    run("snapshot_recover_4c", Opts { clients: 1, crash: true, max_raft_state: SNAP, ..FIVE });
}

#[test]
fn snapshot_recover_many_clients_4c() {
    run("snapshot_recover_many_clients_4c", Opts { clients: 20, crash: true, max_raft_state: SNAP, ..FIVE });
}

#[test]
fn snapshot_unreliable_4c() {
    run("snapshot_unreliable_4c", Opts { unreliable: true, max_raft_state: SNAP, ..FIVE });
}

#[test]
fn snapshot_unreliable_recover_4c() {
    run("snapshot_unreliable_recover_4c", Opts { unreliable: true, crash: true, max_raft_state: SNAP, ..FIVE });
}

#[test]
fn snapshot_unreliable_recover_concurrent_partition_4c() {
    run(
        "snapshot_unreliable_recover_concurrent_partition_4c",
        Opts { unreliable: true, crash: true, partitions: true, max_raft_state: SNAP, ..FIVE },
    );
}

#[test]
fn snapshot_unreliable_recover_concurrent_partition_linearizable_4c() {
    run(
        "snapshot_unreliable_recover_concurrent_partition_linearizable_4c",
        Opts {
            clients: 15,
            servers: 7,
            unreliable: true,
            crash: true,
            partitions: true,
            max_raft_state: SNAP,
            random_keys: true,
        },
    );
}

/// 1,000 sequential Puts; the course requires at most 33.3 ms each on average.
fn speed(seed: u64, max_raft_state: Option<usize>) {
    let cl = cluster(seed, 3, false, max_raft_state);
    let h = History::default();
    let mut ck = clerk(&cl, 1000, 1, &h);
    let per_put = cl.world.block_on(async move {
        ck.put("k", "0", 0).await.unwrap(); // wait for a leader
        let t0 = ck.transport().now();
        for i in 1..=1000u64 {
            ck.put("k", &format!("{i}"), i).await.unwrap();
        }
        (ck.transport().now() - t0) / 1000
    });
    eprintln!("{per_put} us per Put");
    assert!(per_put * 3 <= 100 * MS, "Puts took {per_put} us each on average (limit 33.3 ms)");
    check_versioned(&h.records());
}

#[test]
fn speed_4b() {
    run_seeds("speed_4b", 1, |seed| speed(seed, None));
}

#[test]
fn speed_4c() {
    run_seeds("speed_4c", 1, |seed| speed(seed, SNAP));
}

#[test]
fn one_partition_4b() {
    run_seeds("one_partition_4b", 1, |seed| {
        let cl = cluster(seed, 5, false, None);
        let h = History::default();
        let (mut ck, c) = (clerk(&cl, 1000, 1, &h), cl.world.client(999));
        let cl2 = cl.clone();
        let leader = cl.world.block_on(async move {
            ck.put("1", "13", 0).await.unwrap();
            cl2.wait_leader(&c).await
        });
        // The leader and one follower form the minority, each side with its own clients.
        let others: Vec<NodeId> = cl.ids().into_iter().filter(|&i| i != leader).collect();
        let minority = [leader, others[0], 2001, 2002];
        let majority = [others[1], others[2], others[3], 2000];
        cl.world.net(|n| n.partition(&[&minority, &majority]));
        let mut ckp1 = clerk(&cl, 2000, 2, &h);
        let (mut ckp2a, mut ckp2b) = (clerk(&cl, 2001, 3, &h), clerk(&cl, 2002, 4, &h));
        let put_done: Rc<Cell<Option<u64>>> = Rc::default();
        let get_done: Rc<Cell<Option<u64>>> = Rc::default();
        let (pd, gd) = (put_done.clone(), get_done.clone());
        cl.world.spawn(async move {
            let _ = ckp2a.put("1", "15", 2).await;
            pd.set(Some(ckp2a.transport().now()));
        });
        cl.world.spawn(async move {
            let _ = ckp2b.get("1").await;
            gd.set(Some(ckp2b.transport().now()));
        });
        let t0 = cl.world.now();
        cl.world.block_on(async move {
            ckp1.put("1", "14", 1).await.unwrap();
            assert_eq!(ckp1.get("1").await.unwrap(), ("14".into(), 2));
            ckp1.transport().sleep(SEC).await;
        });
        assert!(put_done.get().is_none(), "a Put in the minority completed");
        assert!(get_done.get().is_none(), "a Get in the minority completed");
        assert!(cl.world.now() >= t0 + SEC);
        let mut ckp1 = clerk(&cl, 2000, 5, &h);
        cl.world.block_on(async move {
            assert_eq!(ckp1.get("1").await.unwrap(), ("14".into(), 2));
            ckp1.put("1", "16", 2).await.unwrap();
            assert_eq!(ckp1.get("1").await.unwrap(), ("16".into(), 3));
        });
        let healed = cl.world.now();
        cl.world.net(|n| n.heal());
        cl.world.run_for(3 * SEC);
        let p = put_done.get().expect("the minority's Put completes after healing");
        assert!(p <= healed + 3 * SEC);
        assert!(get_done.get().is_some_and(|g| g <= healed + 2 * SEC), "the minority's Get completes within 2 s");
        check_versioned(&h.records());
    });
}

fn snapshots_installed(cl: &Cluster, id: NodeId) -> u64 {
    cl.world.inspect::<TestNode<KvSm>, _>(id, |n| n.rsm().snapshots_installed()).unwrap()
}

#[test]
fn snapshot_rpc_4c() {
    run_seeds("snapshot_rpc_4c", 1, |seed| {
        let cl = cluster(seed, 3, false, SNAP);
        let h = History::default();
        let mut ck = clerk(&cl, 1000, 1, &h);
        cl.world.block_on(async move { ck.put("a", "A", 0).await.unwrap() });
        // A bunch of Puts into the majority partition.
        cl.world.net(|n| n.partition(&[&[1, 2, 2000], &[3]]));
        let mut ck1 = clerk(&cl, 2000, 2, &h);
        cl.world.block_on(async move {
            for i in 0..50 {
                ck1.put(&format!("{i}"), &format!("{i}"), 0).await.unwrap();
            }
            ck1.transport().sleep(SEC).await;
            ck1.put("b", "B", 0).await.unwrap();
        });
        // The majority threw away most of its log.
        for id in [1, 2] {
            let size = cl.raft_state_bytes(id);
            assert!(size <= 8000, "server {id}: Raft state {size} bytes > 8000");
        }
        // A majority that needs the lagging server: it must catch up.
        cl.world.net(|n| n.partition(&[&[1, 3, 2001], &[2]]));
        let mut ck2 = clerk(&cl, 2001, 3, &h);
        cl.world.block_on(async move {
            ck2.put("c", "C", 0).await.unwrap();
            ck2.put("d", "D", 0).await.unwrap();
            assert_eq!(ck2.get("a").await.unwrap().0, "A");
            assert_eq!(ck2.get("b").await.unwrap().0, "B");
            assert_eq!(ck2.get("1").await.unwrap().0, "1");
            assert_eq!(ck2.get("49").await.unwrap().0, "49");
        });
        assert!(snapshots_installed(&cl, 3) >= 1, "the lagging server did not catch up by InstallSnapshot");
        // Everybody.
        cl.world.net(|n| n.heal());
        let mut ck3 = clerk(&cl, 2002, 4, &h);
        cl.world.block_on(async move {
            ck3.put("e", "E", 0).await.unwrap();
            assert_eq!(ck3.get("c").await.unwrap().0, "C");
            assert_eq!(ck3.get("e").await.unwrap().0, "E");
            assert_eq!(ck3.get("1").await.unwrap().0, "1");
        });
        check_versioned(&h.records());
    });
}

#[test]
fn snapshot_size_4c() {
    run_seeds("snapshot_size_4c", 1, |seed| {
        let cl = cluster(seed, 3, false, SNAP);
        let h = History::default();
        let mut ck = clerk(&cl, 1000, 1, &h);
        cl.world.block_on(async move {
            let mut ver = 0;
            for _ in 0..200 {
                ck.put("x", "0", ver).await.unwrap();
                assert_eq!(ck.get("x").await.unwrap(), ("0".into(), ver + 1));
                ck.put("x", "1", ver + 1).await.unwrap();
                assert_eq!(ck.get("x").await.unwrap(), ("1".into(), ver + 2));
                ver += 2;
            }
        });
        for id in cl.ids() {
            let (log, snap) = (cl.raft_state_bytes(id), cl.snapshot_bytes(id));
            assert!(log <= 8000, "server {id}: Raft state {log} bytes > 8000");
            assert!(snap <= 500, "server {id}: snapshot {snap} bytes > 500");
        }
        check_versioned(&h.records());
    });
}

/// Beyond the course: Appends are applied exactly once through retries, partitions and crashes.
#[test]
fn append_exactly_once_faults_4b() {
    run_seeds("append_exactly_once_faults_4b", 1, |seed| {
        let cl = cluster(seed, 5, true, SNAP);
        let h = History::default();
        let counts: Vec<_> = (0..5u64)
            .map(|c| {
                let mut ck = clerk(&cl, 1000 + c, c, &h);
                cl.world.spawn(async move {
                    for j in 0..30 {
                        ck.append(&format!("k{}", j % 2), &token(c, j)).await.unwrap();
                    }
                    30u64
                })
            })
            .collect();
        for _ in 0..4 {
            cl.world.run_for(700 * MS);
            let mut ids = cl.ids();
            cl.world.with_rng(|r| r.shuffle(&mut ids));
            cl.world.net(|n| n.partition(&[&ids[..2], &ids[2..]]));
            cl.world.run_for(700 * MS);
            cl.restart(ids[0]);
            cl.world.net(|n| n.heal());
        }
        let counts = cl.world.block_on(async move {
            let mut v = Vec::new();
            for c in counts {
                v.push(c.await);
            }
            v
        });
        let mut ck = clerk(&cl, 999, 99, &h);
        let values =
            cl.world.block_on(async move { vec![ck.get("k0").await.unwrap().0, ck.get("k1").await.unwrap().0] });
        for (c, &n) in counts.iter().enumerate() {
            check_client_appends(&values, c as u64, Some(n));
        }
        check_appends(&h.records());
    });
}

/// Beyond the course: Delete, Scan and the limits through the replicated path; bad input gets
/// a clear error and changes nothing.
#[test]
fn scan_delete_and_limits_replicated() {
    run_seeds("scan_delete_and_limits_replicated", 1, |seed| {
        let cl = cluster(seed, 3, false, None);
        let h = History::default();
        let mut ck = clerk(&cl, 1000, 1, &h);
        let c = cl.world.client(1001);
        cl.world.block_on(async move {
            for k in ["a", "b", "c", "d"] {
                ck.put(k, k, 0).await.unwrap();
            }
            let keys = |e: Vec<(String, String, u64)>| e.into_iter().map(|(k, _, _)| k).collect::<Vec<_>>();
            assert_eq!(keys(ck.scan("b", Some("d"), 10).await.unwrap()), ["b", "c"]);
            assert_eq!(keys(ck.scan("", None, 3).await.unwrap()), ["a", "b", "c"]);
            ck.delete("b").await.unwrap();
            assert_eq!(ck.delete("b").await, Err(KvError::NoKey));
            assert_eq!(keys(ck.scan("", None, 10).await.unwrap()), ["a", "c", "d"]);
            let huge = "x".repeat(sixfive_kv::store::MAX_VALUE_BYTES + 1);
            assert!(matches!(ck.put("a", &huge, 1).await, Err(KvError::ValueTooLarge { .. })));
            assert!(matches!(ck.scan("", None, 1_000_000).await, Err(KvError::ScanLimit { .. })));
            assert_eq!(ck.get("a").await.unwrap(), ("a".into(), 1), "a refused Put changed nothing");
            // Garbage to a server: a clear error back, nothing applied.
            let reply = c.call(1, vec![0xFF; 8], SEC).await.unwrap();
            let r: sixfive_rsm::RsmReply = postcard::from_bytes(&reply).unwrap();
            assert!(matches!(r, sixfive_rsm::RsmReply::Malformed(_)), "{r:?}");
        });
    });
}
