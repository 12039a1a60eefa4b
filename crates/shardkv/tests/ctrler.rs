//! Section 5A: the shard controller, replicated by Raft in the simulator; and a property test of
//! the rebalancer against random Join/Leave/Move sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use sixfive_rpc::Endpoint;
use sixfive_shardkv::ctrler::{CtrlError, CtrlOp, CtrlerSm, rebalance};
use sixfive_shardkv::sim::ShardSim;
use sixfive_shardkv::{Gid, NSHARDS, ShardConfig};
use sixfive_sim::seeds::run_seeds;
use sixfive_sim::{NetConfig, Rng, SEC};

fn sim(seed: u64) -> Rc<ShardSim> {
    Rc::new(ShardSim::new(seed, NetConfig::default(), &[], 3, None))
}

fn servers(g: Gid) -> Vec<Endpoint> {
    vec![g * 10 + 1, g * 10 + 2, g * 10 + 3]
}

fn groups(gids: &[Gid]) -> BTreeMap<Gid, Vec<Endpoint>> {
    gids.iter().map(|&g| (g, servers(g))).collect()
}

/// The configuration has exactly the groups `gids`, every shard on one of them, and is balanced.
fn check(c: &ShardConfig, gids: &[Gid]) {
    let want: BTreeSet<Gid> = gids.iter().copied().collect();
    let have: BTreeSet<Gid> = c.groups.keys().copied().collect();
    assert_eq!(have, want, "wrong groups in {c:?}");
    if want.is_empty() {
        assert_eq!(c.shards, [0; NSHARDS]);
        return;
    }
    for (s, g) in c.shards.iter().enumerate() {
        assert!(want.contains(g), "shard {s} on unknown group {g} in {c:?}");
    }
    let counts: Vec<usize> = want.iter().map(|&g| c.shards_of(g).len()).collect();
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "unbalanced {counts:?} in {c:?}");
}

fn moved(a: &ShardConfig, b: &ShardConfig) -> Vec<usize> {
    (0..NSHARDS).filter(|&s| a.shards[s] != b.shards[s]).collect()
}

#[test]
fn ctrler_basic_5a() {
    run_seeds("ctrler_basic_5a", 1, |seed| {
        let sim = sim(seed);
        let mut ck = sim.ctrler_clerk();
        // Basic leave/join.
        let history = sim.world.block_on(async move {
            let mut cfa = vec![ck.query(None).await.unwrap()];
            check(&cfa[0], &[]);
            ck.join(groups(&[1])).await.unwrap();
            cfa.push(ck.query(None).await.unwrap());
            check(&cfa[1], &[1]);
            ck.join(groups(&[2])).await.unwrap();
            cfa.push(ck.query(None).await.unwrap());
            check(&cfa[2], &[1, 2]);
            assert_eq!(ck.join(groups(&[2])).await, Err(CtrlError::AlreadyJoined(2)), "a second Join of 2 is refused");
            let c = ck.query(None).await.unwrap();
            assert_eq!(c, cfa[2], "a refused change makes no configuration");
            ck.leave(vec![1]).await.unwrap();
            cfa.push(ck.query(None).await.unwrap());
            check(&cfa[3], &[2]);
            // Leaving the last group would drop its shards: refused (where the course allows
            // it, we keep the data safe), and nothing changes.
            assert_eq!(ck.leave(vec![2]).await, Err(CtrlError::LastGroup));
            assert_eq!(ck.leave(vec![1]).await, Err(CtrlError::UnknownGroup(1)));
            assert_eq!(ck.query(None).await.unwrap(), cfa[3]);
            for (i, c) in cfa.iter().enumerate() {
                assert_eq!(c.num, i as u64);
            }
            cfa
        });
        // Historical queries give the same answers while each server is down in turn.
        for s in sim.ctrlers() {
            sim.crash(s);
            let (mut ck, h) = (sim.ctrler_clerk(), history.clone());
            sim.world.block_on(async move {
                for c in &h {
                    assert_eq!(&ck.query(Some(c.num)).await.unwrap(), c, "configuration {} changed", c.num);
                }
                assert_eq!(&ck.query(Some(1000)).await.unwrap(), h.last().unwrap(), "past the latest: the latest");
            });
            sim.start(s);
        }
        // Move.
        let mut ck = sim.ctrler_clerk();
        sim.world.block_on(async move {
            ck.join(groups(&[503, 504])).await.unwrap();
            for i in 0..NSHARDS {
                let g = if i < NSHARDS / 2 { 503 } else { 504 };
                ck.move_shard(i, g).await.unwrap();
            }
            let c = ck.query(None).await.unwrap();
            for i in 0..NSHARDS {
                assert_eq!(c.shards[i], if i < NSHARDS / 2 { 503 } else { 504 }, "Move did not take: {c:?}");
            }
            assert_eq!(ck.move_shard(NSHARDS, 503).await, Err(CtrlError::BadShard { shard: NSHARDS, max: NSHARDS }));
            assert_eq!(ck.move_shard(0, 77).await, Err(CtrlError::UnknownGroup(77)));
            ck.leave(vec![503, 504]).await.unwrap();
            check(&ck.query(None).await.unwrap(), &[2]);
        });
        // Concurrent leave/join: ten clerks, each joins two groups and removes one of them.
        let npara = 10u64;
        let tasks: Vec<_> = (0..npara)
            .map(|i| {
                let mut ck = sim.ctrler_clerk();
                sim.world.spawn(async move {
                    let gid = 100 + i * 10;
                    ck.join(groups(&[gid + 1000])).await.unwrap();
                    ck.join(groups(&[gid])).await.unwrap();
                    ck.leave(vec![gid + 1000]).await.unwrap();
                })
            })
            .collect();
        let mut ck = sim.ctrler_clerk();
        sim.world.block_on(async move {
            for t in tasks {
                t.await;
            }
            let mut gids: Vec<Gid> = (0..npara).map(|i| 100 + i * 10).collect();
            gids.push(2);
            check(&ck.query(None).await.unwrap(), &gids);
            // Minimal transfers after joins: shards move only to the new groups.
            let c1 = ck.query(None).await.unwrap();
            for i in 0..5 {
                ck.join(groups(&[2000 + i])).await.unwrap();
            }
            let c2 = ck.query(None).await.unwrap();
            for s in 0..NSHARDS {
                if c2.shards[s] < 2000 {
                    assert_eq!(c2.shards[s], c1.shards[s], "shard {s} moved between old groups after Join()s");
                }
            }
            // Minimal transfers after leaves: only the leaving groups' shards move.
            for i in 0..5 {
                ck.leave(vec![2000 + i]).await.unwrap();
            }
            let c3 = ck.query(None).await.unwrap();
            for s in 0..NSHARDS {
                if c2.shards[s] < 2000 {
                    assert_eq!(c3.shards[s], c2.shards[s], "shard {s} of a staying group moved after Leave()s");
                }
            }
            check(&c3, &gids);
        });
    });
}

#[test]
fn ctrler_minimal_again_5a() {
    run_seeds("ctrler_minimal_again_5a", 1, |seed| {
        let sim = sim(seed);
        let mut ck = sim.ctrler_clerk();
        sim.world.block_on(async move {
            ck.join(groups(&[1])).await.unwrap();
            ck.join(groups(&[2])).await.unwrap();
            for g in 3..=6 {
                let before = ck.query(None).await.unwrap();
                ck.join(groups(&[g])).await.unwrap();
                let after = ck.query(None).await.unwrap();
                let m = moved(&before, &after);
                assert!(m.len() <= NSHARDS / 3 + 1, "Join of {g} moved {} shards: {m:?}", m.len());
                assert!(m.iter().all(|&s| after.shards[s] == g), "Join of {g} moved shards between other groups");
            }
            for g in [3, 1, 6, 5] {
                let before = ck.query(None).await.unwrap();
                ck.leave(vec![g]).await.unwrap();
                let after = ck.query(None).await.unwrap();
                let m = moved(&before, &after);
                assert!(m.len() <= NSHARDS / 3 + 1, "Leave of {g} moved {} shards: {m:?}", m.len());
                assert!(m.iter().all(|&s| before.shards[s] == g), "Leave of {g} moved shards it did not hold");
                check(&after, &after.groups.keys().copied().collect::<Vec<_>>());
            }
        });
    });
}

#[test]
fn ctrler_multi_5a() {
    run_seeds("ctrler_multi_5a", 1, |seed| {
        let sim = sim(seed);
        let mut ck = sim.ctrler_clerk();
        sim.world.block_on(async move {
            ck.join(groups(&[1, 2, 3])).await.unwrap();
            check(&ck.query(None).await.unwrap(), &[1, 2, 3]);
            ck.leave(vec![1, 3]).await.unwrap();
            check(&ck.query(None).await.unwrap(), &[2]);
        });
        // Concurrent multi-joins and multi-leaves.
        let tasks: Vec<_> = (0..10u64)
            .map(|i| {
                let mut ck = sim.ctrler_clerk();
                sim.world.spawn(async move {
                    let gid = 100 + i * 10;
                    ck.join(groups(&[gid, gid + 1000])).await.unwrap();
                    ck.leave(vec![gid + 1000]).await.unwrap();
                })
            })
            .collect();
        let mut ck = sim.ctrler_clerk();
        sim.world.block_on(async move {
            for t in tasks {
                t.await;
            }
            let mut gids: Vec<Gid> = (0..10).map(|i| 100 + i * 10).collect();
            gids.push(2);
            let c1 = ck.query(None).await.unwrap();
            check(&c1, &gids);
            // Minimal transfers after a multi-join.
            let newg: Vec<Gid> = (0..5).map(|i| 3000 + i).collect();
            ck.join(groups(&newg)).await.unwrap();
            let c2 = ck.query(None).await.unwrap();
            let mut all = gids.clone();
            all.extend(&newg);
            check(&c2, &all);
            for s in 0..NSHARDS {
                if !newg.contains(&c2.shards[s]) {
                    assert_eq!(c2.shards[s], c1.shards[s], "shard {s} moved between old groups after a multi-join");
                }
            }
            // Minimal transfers after a multi-leave.
            ck.leave(newg.clone()).await.unwrap();
            let c3 = ck.query(None).await.unwrap();
            check(&c3, &gids);
            for s in 0..NSHARDS {
                if !newg.contains(&c2.shards[s]) {
                    assert_eq!(c3.shards[s], c2.shards[s], "shard {s} of a staying group moved after a multi-leave");
                }
            }
        });
        // Every server holds the same configurations.
        sim.world.run_for(SEC);
        let all: Vec<_> = sim.ctrlers().into_iter().map(|e| sim.with_ctrler(e, |sm| sm.configs().to_vec())).collect();
        assert!(all[0].as_ref().is_some_and(|c| c.len() > 20));
        assert!(all.iter().all(|c| c == &all[0]), "servers disagree on the configurations");
    });
}

/// The lower bound on shards moved to rebalance `before` over `gids`: every shard not on a
/// staying group must move, and a staying group keeps at most its target (the groups holding
/// the most keep the larger targets).
fn fewest_moves(before: &[Gid; NSHARDS], gids: &BTreeSet<Gid>) -> usize {
    let n = gids.len();
    let (base, extra) = (NSHARDS / n, NSHARDS % n);
    let mut held: Vec<usize> = gids.iter().map(|g| before.iter().filter(|&&x| x == *g).count()).collect();
    held.sort_unstable_by(|a, b| b.cmp(a));
    let kept: usize = held.iter().enumerate().map(|(i, &h)| h.min(base + usize::from(i < extra))).sum();
    NSHARDS - kept
}

/// Property: after any sequence of Joins, Leaves and Moves, every Join/Leave gives a balanced
/// configuration on known groups only, moves exactly the fewest shards possible, moves only
/// shards to new groups (Join, from a balanced start) or from leaving groups (Leave), and two
/// replicas applying the same changes agree byte for byte.
#[test]
fn rebalance_properties_random_sequences() {
    run_seeds("rebalance_properties_random_sequences", 400, |seed| {
        let mut rng = Rng::new(seed);
        let (mut a, mut b) = (CtrlerSm::default(), CtrlerSm::default());
        let mut present: BTreeSet<Gid> = BTreeSet::new();
        let mut balanced = true;
        for _ in 0..40 {
            let before = a.config(None).clone();
            let op = match rng.below(10) {
                0..=3 => {
                    let k = rng.range(1, 4);
                    let gids: BTreeSet<Gid> =
                        (0..k).map(|_| rng.range(1, 16)).filter(|g| !present.contains(g)).collect();
                    if gids.is_empty() {
                        continue;
                    }
                    CtrlOp::Join { groups: gids.iter().map(|&g| (g, servers(g))).collect() }
                }
                4..=7 if present.len() > 1 => {
                    let mut v: Vec<Gid> = present.iter().copied().collect();
                    rng.shuffle(&mut v);
                    let k = rng.range(1, v.len() as u64 - 1) as usize; // at least one group stays
                    CtrlOp::Leave { gids: v[..k].to_vec() }
                }
                _ if !present.is_empty() => {
                    let v: Vec<Gid> = present.iter().copied().collect();
                    CtrlOp::Move { shard: rng.below(NSHARDS as u64) as usize, gid: *rng.pick(&v) }
                }
                _ => continue,
            };
            let r = a.change(&op);
            assert_eq!(r, b.change(&op), "replicas answered differently");
            assert_eq!(r, Ok(before.num + 1), "{op:?} refused: {r:?}");
            let after = a.config(None).clone();
            match &op {
                CtrlOp::Join { groups } => {
                    present.extend(groups.keys());
                    check(&after, &present.iter().copied().collect::<Vec<_>>());
                    let m = moved(&before, &after);
                    assert_eq!(m.len(), fewest_moves(&before.shards, &present), "{op:?} moved {m:?}");
                    if balanced && !before.groups.is_empty() {
                        assert!(
                            m.iter().all(|&s| groups.contains_key(&after.shards[s])),
                            "{op:?}: {before:?} -> {after:?}"
                        );
                    }
                    balanced = true;
                }
                CtrlOp::Leave { gids } => {
                    for g in gids {
                        present.remove(g);
                    }
                    check(&after, &present.iter().copied().collect::<Vec<_>>());
                    let m = moved(&before, &after);
                    assert_eq!(m.len(), fewest_moves(&before.shards, &present), "{op:?} moved {m:?}");
                    if balanced {
                        assert!(m.iter().all(|&s| gids.contains(&before.shards[s])), "{op:?}: {before:?} -> {after:?}");
                    }
                    balanced = true;
                }
                CtrlOp::Move { shard, gid } => {
                    assert_eq!(
                        moved(&before, &after),
                        if before.shards[*shard] == *gid { vec![] } else { vec![*shard] }
                    );
                    balanced = false;
                }
            }
        }
        assert_eq!(a, b, "two replicas of the same changes differ");
        // Rebalancing an already balanced assignment moves nothing.
        let mut shards = a.config(None).shards;
        let gids: BTreeSet<Gid> = a.config(None).groups.keys().copied().collect();
        if balanced && !gids.is_empty() {
            rebalance(&mut shards, &gids);
            assert_eq!(shards, a.config(None).shards, "rebalance of a balanced assignment moved shards");
        }
    });
}

/// Beyond the course: over a lossy network with controller servers crashing, every change is
/// applied exactly once (retries are answered from the session): the configurations are
/// numbered 0..=changes with no gap or duplicate, and each clerk's answers are increasing.
#[test]
fn ctrler_exactly_once_under_faults() {
    run_seeds("ctrler_exactly_once_under_faults", 3, |seed| {
        let sim = Rc::new(ShardSim::new(seed, NetConfig { unreliable: true, ..Default::default() }, &[], 3, Some(500)));
        let tasks: Vec<_> = (0..4u64)
            .map(|c| {
                let mut ck = sim.ctrler_clerk();
                sim.world.spawn(async move {
                    let mut nums = Vec::new();
                    for i in 0..5 {
                        let gid = 1 + c * 100 + i;
                        nums.push(ck.join(groups(&[gid])).await.unwrap());
                        nums.push(ck.move_shard(i as usize, gid).await.unwrap());
                    }
                    nums
                })
            })
            .collect();
        for round in 0..6 {
            sim.world.run_for(300 * sixfive_sim::MS);
            let e = sim.ctrlers()[round % 3];
            sim.crash(e);
            sim.world.run_for(200 * sixfive_sim::MS);
            sim.start(e);
        }
        let mut ck = sim.ctrler_clerk();
        let (all, latest) = sim.world.block_on(async move {
            let mut all = Vec::new();
            for t in tasks {
                let nums = t.await;
                assert!(nums.windows(2).all(|w| w[0] < w[1]), "a clerk's changes out of order: {nums:?}");
                all.extend(nums);
            }
            (all, ck.query(None).await.unwrap())
        });
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=40).collect::<Vec<u64>>(), "every change made exactly one configuration");
        assert_eq!(latest.num, 40);
        assert_eq!(latest.groups.len(), 20);
    });
}
