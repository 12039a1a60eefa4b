//! Section 2: the single-server versioned KV, Append, and the lock, over the simulated network.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::*;
use sixfive_kv::{Clerk, History, KvClient, KvError, KvServer, Lock, LockError};
use sixfive_rpc::Transport;
use sixfive_sim::{MS, NetConfig, SEC, SimClient, World, seeds::run_seeds};

const SERVER: u64 = 1;

fn world(seed: u64, unreliable: bool) -> World {
    let w = World::new(seed, NetConfig { unreliable, ..Default::default() });
    w.start_node(SERVER, KvServer::new());
    w
}

fn clerk(w: &World, i: u64, h: &History) -> Clerk<SimClient> {
    Clerk::new(w.client(1000 + i), SERVER, i).with_history(h.clone())
}

#[test]
fn reliable_put_2() {
    run_seeds("reliable_put_2", 1, |seed| {
        let w = world(seed, false);
        let h = History::default();
        let mut ck = clerk(&w, 0, &h);
        w.block_on(async move {
            assert_eq!(ck.get("k").await, Err(KvError::NoKey));
            assert_eq!(ck.put("k", "6.5840", 0).await, Ok(()));
            assert_eq!(ck.get("k").await, Ok(("6.5840".into(), 1)));
            assert_eq!(ck.put("k", "x", 0).await, Err(KvError::Version), "version 0 on an existing key");
            assert_eq!(ck.put("k", "x", 2).await, Err(KvError::Version), "a version from the future");
            assert_eq!(ck.put("k", "x", 1).await, Ok(()));
            assert_eq!(ck.get("k").await, Ok(("x".into(), 2)));
            assert_eq!(ck.put("y", "y", 1).await, Err(KvError::NoKey));
            assert_eq!(ck.get("y").await, Err(KvError::NoKey));
        });
        check_versioned(&h.records());
    });
}

#[test]
fn put_concurrent_reliable_2() {
    run_seeds("put_concurrent_reliable_2", 1, |seed| {
        let w = world(seed, false);
        let h = History::default();
        let oks = Rc::new(Cell::new(0u64));
        let until = w.now() + SEC;
        for i in 0..10 {
            let mut ck = clerk(&w, i, &h);
            let oks = oks.clone();
            w.spawn(async move {
                while ck.transport().world().now() < until {
                    let ver = match ck.get("k").await {
                        Ok((_, v)) => v,
                        Err(KvError::NoKey) => 0,
                        Err(e) => panic!("{e}"),
                    };
                    match ck.put("k", &format!("{i}"), ver).await {
                        Ok(()) => oks.set(oks.get() + 1),
                        Err(KvError::Version) => {}
                        Err(e) => panic!("reliable network: {e}"),
                    }
                }
            });
        }
        w.run_for(SEC + 100 * MS);
        let mut ck = clerk(&w, 99, &h);
        let (_, version) = w.block_on(async move { ck.get("k").await.unwrap() });
        assert!(oks.get() > 10, "only {} Puts succeeded", oks.get());
        assert_eq!(version, oks.get(), "final version is not the number of successful Puts");
        check_versioned(&h.records());
    });
}

#[test]
fn unreliable_net_2() {
    run_seeds("unreliable_net_2", 1, |seed| {
        let w = world(seed, true);
        let h = History::default();
        let mut ck = clerk(&w, 0, &h);
        let retried = w.block_on(async move {
            let mut retried = false;
            for attempt in 0..100u64 {
                let mut i = 0;
                loop {
                    let r = ck.put("k", &format!("{i}"), attempt).await;
                    if r != Err(KvError::Maybe) {
                        if i > 0 {
                            assert_eq!(r, Err(KvError::Version), "a Put after ErrMaybe must find its own write");
                        } else {
                            assert_eq!(r, Ok(()));
                        }
                        break;
                    }
                    retried = true;
                    i += 1;
                }
                let (_, ver) = ck.get("k").await.unwrap();
                assert_eq!(ver, attempt + 1, "wrong version");
            }
            retried
        });
        assert!(retried, "Clerk.put never returned ErrMaybe");
        check_versioned(&h.records());
    });
}

/// Clients append unique tokens for `dur`; each client uses its own key unless `keys` are shared.
fn append_workload(seed: u64, clients: u64, unreliable: bool, shared_keys: u64, per_client_limit: Option<u64>) {
    let w = world(seed, unreliable);
    let h = History::default();
    let until = w.now() + SEC;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let mut ck = clerk(&w, c, &h);
            w.spawn(async move {
                let mut done = 0u64;
                let mut expect_own = String::new();
                loop {
                    if per_client_limit.is_some_and(|n| done >= n) {
                        break;
                    }
                    if per_client_limit.is_none() && ck.transport().world().now() >= until {
                        break;
                    }
                    let key = if shared_keys == 0 { format!("c{c}") } else { format!("k{}", (c + done) % shared_keys) };
                    let t = token(c, done);
                    let old = ck.append(&key, &t).await.expect("append");
                    if shared_keys == 0 {
                        assert!(old == expect_own, "client {c}: append returned a wrong old value");
                        expect_own.push_str(&t);
                        if done.is_multiple_of(5) {
                            let (v, _) = ck.get(&key).await.expect("get");
                            assert!(v == expect_own, "client {c}: get after append returned a wrong value");
                        }
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    let counts = w.block_on(async move {
        let mut v = Vec::new();
        for hd in handles {
            v.push(hd.await);
        }
        v
    });
    let mut ck = clerk(&w, 999, &h);
    let keys: Vec<String> = if shared_keys == 0 {
        (0..clients).map(|c| format!("c{c}")).collect()
    } else {
        (0..shared_keys).map(|k| format!("k{k}")).collect()
    };
    let values = w.block_on(async move {
        let mut v = Vec::new();
        for k in keys {
            v.push(ck.get(&k).await.map(|(v, _)| v).unwrap_or_default());
        }
        v
    });
    for (c, &n) in counts.iter().enumerate() {
        assert!(n > 0, "client {c} made no progress");
        check_client_appends(&values, c as u64, Some(n));
    }
    check_appends(&h.records());
}

#[test]
fn basic_2() {
    run_seeds("basic_2", 1, |seed| append_workload(seed, 1, false, 0, None));
}

#[test]
fn concurrent_2() {
    run_seeds("concurrent_2", 1, |seed| append_workload(seed, 5, false, 3, None));
}

#[test]
fn unreliable_2() {
    run_seeds("unreliable_2", 1, |seed| append_workload(seed, 5, true, 3, None));
}

#[test]
fn unreliable_one_key_2() {
    run_seeds("unreliable_one_key_2", 1, |seed| append_workload(seed, 5, true, 1, Some(10)));
}

/// Clients loop for 2 s: acquire, check the guard key is empty, write their id, hold 10 ms,
/// clear it, release. Returns the number of acquisitions.
fn lock_workload(seed: u64, clients: u64, unreliable: bool) -> u64 {
    let w = world(seed, unreliable);
    let h = History::default();
    let until = w.now() + 2 * SEC;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let me = format!("owner-{c}");
            let mut lock = Lock::new(clerk(&w, c, &h), "lock", &me);
            w.spawn(async move {
                let mut n = 0u64;
                while lock.clerk().transport().world().now() < until {
                    lock.acquire().await.expect("acquire");
                    let ck = lock.clerk();
                    let (v, ver) = match ck.get("guard").await {
                        Ok(x) => x,
                        Err(KvError::NoKey) => (String::new(), 0),
                        Err(e) => panic!("{e}"),
                    };
                    assert_eq!(v, "", "two holders: {me} found {v} holding the lock");
                    // We hold the lock, so nobody else writes the guard: ErrMaybe means applied.
                    assert!(matches!(ck.put("guard", &me, ver).await, Ok(()) | Err(KvError::Maybe)));
                    ck.transport().sleep(10 * MS).await;
                    assert!(matches!(ck.put("guard", "", ver + 1).await, Ok(()) | Err(KvError::Maybe)));
                    lock.release().await.expect("release by the owner");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total = w.block_on(async move {
        let mut t = 0;
        for hd in handles {
            t += hd.await;
        }
        t
    });
    check_versioned(&h.records());
    total
}

#[test]
fn lock_one_client_reliable_2() {
    run_seeds("lock_one_client_reliable_2", 1, |seed| {
        let n = lock_workload(seed, 1, false);
        assert!(n >= 50, "one client acquired the lock only {n} times in 2 s");
    });
}

#[test]
fn lock_many_clients_reliable_2() {
    run_seeds("lock_many_clients_reliable_2", 1, |seed| {
        let n = lock_workload(seed, 10, false);
        assert!(n >= 20, "ten clients acquired the lock only {n} times in 2 s");
    });
}

#[test]
fn lock_one_client_unreliable_2() {
    run_seeds("lock_one_client_unreliable_2", 1, |seed| {
        // About 7 operations per cycle at ~27 ms each on this network: ~10 cycles in 2 s.
        let n = lock_workload(seed, 1, true);
        assert!(n >= 5, "{n} acquisitions");
    });
}

#[test]
fn lock_many_clients_unreliable_2() {
    run_seeds("lock_many_clients_unreliable_2", 1, |seed| {
        let n = lock_workload(seed, 10, true);
        assert!(n >= 3, "{n} acquisitions");
    });
}

#[test]
fn lock_release_by_non_owner_refused_2() {
    run_seeds("lock_release_by_non_owner_refused_2", 1, |seed| {
        let w = world(seed, false);
        let h = History::default();
        let mut a = Lock::new(clerk(&w, 0, &h), "lock", "a");
        let mut b = Lock::new(clerk(&w, 1, &h), "lock", "b");
        w.block_on(async move {
            assert_eq!(b.release().await, Err(LockError::NotOwner("b".into())), "nobody holds it");
            a.acquire().await.unwrap();
            assert_eq!(b.release().await, Err(LockError::NotOwner("b".into())), "a holds it");
            a.release().await.unwrap();
            b.acquire().await.unwrap();
            b.release().await.unwrap();
        });
        check_versioned(&h.records());
    });
}

#[test]
fn malformed_request_refused_2() {
    let w = world(1, false);
    let c = w.client(1000);
    let reply = w.block_on(async move { c.call(SERVER, vec![0xFF, 0xFF, 0xFF], SEC).await.unwrap() });
    let r: sixfive_kv::OpResult = postcard::from_bytes(&reply).unwrap();
    assert!(matches!(r, sixfive_kv::OpResult::Err(KvError::Malformed(_))), "{r:?}");
    assert_eq!(w.inspect::<KvServer, _>(SERVER, |s| s.store().len()), Some(0), "nothing changed");
}
