//! Section 4A (and 4C's snapshot_4c): the replicated state machine with a counter.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use sixfive_linearizability::models::FnModel;
use sixfive_linearizability::{Op, Verdict, check};
use sixfive_raft::NodeId;
use sixfive_rpc::Transport;
use sixfive_rsm::testkit::{RsmCluster, request};
use sixfive_rsm::{ApplyCtx, RsmReply, RsmRequest, StateMachine, SubmitError};
use sixfive_sim::{MS, NetConfig, SEC, SimClient, seeds::run_seeds};

/// A counter: "inc" returns the new value.
#[derive(Default)]
struct Inc {
    n: u64,
}

impl StateMachine for Inc {
    fn apply(&mut self, cmd: &[u8], _: ApplyCtx) -> Vec<u8> {
        assert_eq!(cmd, b"inc");
        self.n += 1;
        self.n.to_le_bytes().to_vec()
    }
    fn query(&self, _: &[u8]) -> Vec<u8> {
        self.n.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.n.to_le_bytes().to_vec()
    }
    fn restore(&mut self, s: &[u8]) {
        self.n = u64::from_le_bytes(s.try_into().unwrap());
    }
}

fn num(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap())
}

type History = Rc<RefCell<Vec<Op<(), u64>>>>;

/// Submits "inc" to `server` once; records it.
async fn inc_at(c: &SimClient, server: NodeId, h: &History, timeout: u64) -> Result<u64, SubmitError> {
    let call = c.now();
    let r = request(c, server, &RsmRequest::Command(b"inc".to_vec()), timeout).await;
    let out = match r {
        Ok(RsmReply::Done(v)) => Ok(num(&v)),
        Ok(RsmReply::Failed(e)) => Err(e),
        Ok(RsmReply::Malformed(m)) => panic!("{m}"),
        Err(_) => Err(SubmitError::Abandoned { leader: None }),
    };
    let (ret, output) = match &out {
        Ok(v) => (Some(c.now()), Some(*v)),
        Err(SubmitError::WrongLeader { .. } | SubmitError::Busy) => return out, // refused: never applied
        Err(_) => (None, None), // abandoned or no answer: may or may not have been applied
    };
    h.borrow_mut().push(Op { client: c.me(), call, ret, input: (), output });
    out
}

/// The course's `oneInc`: tries servers (the leader first) for up to 10 s until one applies it.
async fn one_inc(cl: &RsmCluster<Inc>, c: &SimClient, h: &History) -> u64 {
    let t0 = c.now();
    while c.now() - t0 < 10 * SEC {
        let mut order = cl.ids();
        if let Some(l) = cl.leader() {
            order.retain(|&i| i != l);
            order.insert(0, l);
        }
        for id in order {
            if let Ok(v) = inc_at(c, id, h, SEC).await {
                return v;
            }
        }
        c.sleep(50 * MS).await;
    }
    panic!("one_inc: no server applied the increment within 10 s");
}

fn check_counter(h: &History) {
    let model = FnModel::new(0u64, |s: &u64, _: &()| (s + 1, s + 1), |_: &()| 0);
    match check(&model, &h.borrow(), Duration::from_secs(20)) {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable(why) => panic!("counter history not linearizable\n{why}"),
        Verdict::Unknown => panic!("counter history: the check ran out of time"),
    }
}

/// Waits until every running server's counter equals `n`.
async fn converge(cl: &RsmCluster<Inc>, c: &SimClient, n: u64) {
    for _ in 0..100 {
        if cl.ids().iter().all(|&id| cl.with_sm(id, |s| s.n).is_none_or(|v| v == n)) {
            return;
        }
        c.sleep(50 * MS).await;
    }
    let got: Vec<_> = cl.ids().iter().map(|&id| cl.with_sm(id, |s| s.n)).collect();
    panic!("replicas did not converge on {n}: {got:?}");
}

fn cluster(seed: u64, max_raft_state: Option<usize>) -> Rc<RsmCluster<Inc>> {
    Rc::new(RsmCluster::new(seed, 3, NetConfig::default(), max_raft_state, Inc::default))
}

#[test]
fn basic_4a() {
    run_seeds("basic_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let c = cl.world.client(1000);
        let (cl2, h2) = (cl.clone(), h.clone());
        cl.world.block_on(async move {
            for i in 0..10 {
                assert_eq!(one_inc(&cl2, &c, &h2).await, i + 1);
            }
            converge(&cl2, &c, 10).await;
        });
        check_counter(&h);
    });
}

#[test]
fn concurrent_4a() {
    run_seeds("concurrent_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000 + i));
                cl.world.spawn(async move { one_inc(&cl2, &c, &h2).await })
            })
            .collect();
        let (cl2, c) = (cl.clone(), cl.world.client(999));
        let mut results = cl.world.block_on(async move {
            let mut r = Vec::new();
            for hd in handles {
                r.push(hd.await);
            }
            converge(&cl2, &c, 50).await;
            r
        });
        results.sort_unstable();
        assert_eq!(results, (1..=50).collect::<Vec<_>>(), "each increment applied exactly once");
        check_counter(&h);
    });
}

#[test]
fn leader_failure_4a() {
    run_seeds("leader_failure_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        cl.world.block_on(async move {
            assert_eq!(one_inc(&cl2, &c, &h2).await, 1);
            let l = cl2.wait_leader(&c).await;
            cl2.world.net(|n| n.disconnect(l));
            assert_eq!(one_inc(&cl2, &c, &h2).await, 2);
            cl2.world.net(|n| n.connect(l));
            let l2 = cl2.wait_leader(&c).await;
            cl2.crash(l2);
            assert_eq!(one_inc(&cl2, &c, &h2).await, 3);
            cl2.start(l2);
            converge(&cl2, &c, 3).await;
        });
        check_counter(&h);
    });
}

#[test]
fn leader_partition_4a() {
    run_seeds("leader_partition_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        let leader = cl.world.block_on(async move {
            assert_eq!(one_inc(&cl2, &c, &h2).await, 1);
            cl2.wait_leader(&c).await
        });
        // Cut the leader off with a client of its own.
        let others: Vec<u64> = cl.ids().into_iter().filter(|&i| i != leader).chain([1001]).collect();
        cl.world.net(|n| n.partition(&[&[leader, 1000], &others]));
        // (time returned, result) of each submit to the cut-off leader.
        type Returned = Rc<RefCell<Vec<(u64, Result<u64, SubmitError>)>>>;
        let returned: Returned = Rc::default();
        for _ in 0..100 {
            let (c, h2, ret) = (cl.world.client(1000), h.clone(), returned.clone());
            cl.world.spawn(async move {
                let r = inc_at(&c, leader, &h2, 60 * SEC).await;
                ret.borrow_mut().push((c.now(), r));
            });
        }
        // The majority makes progress meanwhile.
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1001));
        cl.world.block_on(async move {
            c.sleep(100 * MS).await;
            for i in 0..10 {
                assert_eq!(one_inc(&cl2, &c, &h2).await, 2 + i);
            }
        });
        let healed_at = cl.world.now();
        cl.world.net(|n| n.heal());
        cl.world.run_for(SEC);
        let returned = returned.borrow();
        assert_eq!(returned.len(), 100, "all submits to the cut-off leader return within 1 s of healing");
        for (t, r) in returned.iter() {
            assert!(r.is_err(), "a submit to a cut-off leader returned OK: {r:?}");
            assert!(*t <= healed_at + SEC);
        }
        let (cl2, c) = (cl.clone(), cl.world.client(1002));
        cl.world.block_on(async move { converge(&cl2, &c, 11).await });
        check_counter(&h);
    });
}

#[test]
fn restart_replay_4a() {
    run_seeds("restart_replay_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        cl.world.block_on(async move {
            for i in 0..100 {
                assert_eq!(one_inc(&cl2, &c, &h2).await, i + 1);
            }
        });
        for id in cl.ids() {
            cl.restart(id);
        }
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        cl.world.block_on(async move {
            assert_eq!(one_inc(&cl2, &c, &h2).await, 101, "state replayed from the log after a restart");
        });
        check_counter(&h);
    });
}

#[test]
fn shutdown_4a() {
    run_seeds("shutdown_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        let leader = cl.world.block_on(async move {
            one_inc(&cl2, &c, &h2).await;
            cl2.wait_leader(&c).await
        });
        // The leader cannot commit (cut off from the others), so the submits wait...
        let others: Vec<u64> = cl.ids().into_iter().filter(|&i| i != leader).collect();
        cl.world.net(|n| n.partition(&[&[leader, 1000], &others]));
        let returned: Rc<RefCell<Vec<u64>>> = Rc::default();
        for _ in 0..100 {
            let (c, h2, ret) = (cl.world.client(1000), h.clone(), returned.clone());
            cl.world.spawn(async move {
                let r = inc_at(&c, leader, &h2, 60 * SEC).await;
                assert!(r.is_err(), "applied without a majority");
                ret.borrow_mut().push(c.now());
            });
        }
        cl.world.run_for(20 * MS);
        assert!(returned.borrow().is_empty(), "nothing returns before the shutdown");
        // ...until the servers shut down: every in-flight submit returns promptly.
        let t = cl.world.now();
        for id in cl.ids() {
            cl.shutdown(id);
        }
        cl.world.run_for(11 * SEC);
        let returned = returned.borrow();
        assert_eq!(returned.len(), 100);
        assert!(returned.iter().all(|&r| r <= t + 11 * SEC));
        check_counter(&h);
    });
}

#[test]
fn restart_submit_4a() {
    run_seeds("restart_submit_4a", 1, |seed| {
        let cl = cluster(seed, None);
        let h = History::default();
        let ok: Rc<RefCell<Vec<u64>>> = Rc::default();
        let stop = Rc::new(std::cell::Cell::new(false));
        let client_task = {
            let (cl2, h2, c, ok, stop) = (cl.clone(), h.clone(), cl.world.client(1000), ok.clone(), stop.clone());
            cl.world.spawn(async move {
                while !stop.get() {
                    for id in cl2.ids() {
                        if let Ok(v) = inc_at(&c, id, &h2, SEC).await {
                            ok.borrow_mut().push(v);
                        }
                    }
                    c.sleep(10 * MS).await;
                }
            })
        };
        for _ in 0..5 {
            cl.world.run_for(500 * MS);
            for id in cl.ids() {
                cl.restart(id);
            }
        }
        cl.world.run_for(SEC);
        stop.set(true);
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1001));
        let last = cl.world.block_on(async move {
            client_task.await;
            let v = one_inc(&cl2, &c, &h2).await;
            converge(&cl2, &c, v).await;
            v
        });
        let ok = ok.borrow();
        assert!(!ok.is_empty(), "no submit succeeded across restarts");
        let mut sorted = ok.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ok.len(), "two OK submits returned the same value");
        assert!(last > *sorted.last().unwrap());
        check_counter(&h);
    });
}

#[test]
fn snapshot_4c() {
    run_seeds("snapshot_4c", 1, |seed| {
        let cl = cluster(seed, Some(1000));
        let h = History::default();
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        cl.world.block_on(async move {
            for i in 0..100 {
                assert_eq!(one_inc(&cl2, &c, &h2).await, i + 1);
            }
            converge(&cl2, &c, 100).await;
        });
        for id in cl.ids() {
            let size = cl.raft_state_bytes(id);
            assert!(size <= 2000, "server {id}: Raft state {size} bytes > 2000 with max_raft_state 1000");
            assert!(cl.snapshot_bytes(id) > 0, "server {id} took no snapshot");
        }
        for id in cl.ids() {
            cl.restart(id);
        }
        let (cl2, h2, c) = (cl.clone(), h.clone(), cl.world.client(1000));
        cl.world.block_on(async move {
            assert_eq!(one_inc(&cl2, &c, &h2).await, 101, "state restored from snapshot and log");
        });
        check_counter(&h);
    });
}
