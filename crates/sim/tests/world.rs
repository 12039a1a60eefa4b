use std::collections::BTreeMap;

use sixfive_rpc::{CallId, Ctx, Endpoint, Node, RpcError, Transport};
use sixfive_sim::{MS, NetConfig, SEC, World};

/// Echoes requests; requests starting with 'L' are answered 50 ms later (deferred reply);
/// requests "silent" are never answered. Messages are counted.
#[derive(Default)]
struct Echo {
    later: BTreeMap<u64, (Endpoint, CallId, Vec<u8>)>,
    next: u64,
    messages: u64,
}

impl Node for Echo {
    fn on_start(&mut self, _: &mut dyn Ctx) {}
    fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64) {
        let (to, call, b) = self.later.remove(&id).unwrap();
        ctx.reply(to, call, b);
    }
    fn on_message(&mut self, _: &mut dyn Ctx, _: Endpoint, _: Vec<u8>) {
        self.messages += 1;
    }
    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, req: Vec<u8>) {
        if req == b"silent" {
            return;
        }
        if req.first() == Some(&b'L') {
            self.next += 1;
            self.later.insert(self.next, (from, call, req));
            ctx.set_timer(50 * MS, self.next);
        } else {
            ctx.reply(from, call, req);
        }
    }
}

#[test]
fn call_reply_deferred_reply_and_timeout() {
    let w = World::new(1, NetConfig::default());
    w.start_node(1, Echo::default());
    let c = w.client(100);
    let got = w.block_on(async move {
        let a = c.call(1, b"hi".to_vec(), SEC).await;
        let t0 = c.now();
        let b = c.call(1, b"Later".to_vec(), SEC).await;
        let waited = c.now() - t0;
        let t1 = c.now();
        let s = c.call(1, b"silent".to_vec(), 300 * MS).await;
        (a, b, waited, s, c.now() - t1)
    });
    assert_eq!(got.0, Ok(b"hi".to_vec()));
    assert_eq!(got.1, Ok(b"Later".to_vec()));
    assert!(got.2 >= 50 * MS && got.2 < 60 * MS, "deferred reply after {} us", got.2);
    assert_eq!(got.3, Err(RpcError::Timeout));
    assert_eq!(got.4, 300 * MS);
}

#[test]
fn crashed_or_cut_off_server_fails_calls() {
    let w = World::new(2, NetConfig::default());
    w.start_node(1, Echo::default());
    w.crash(1);
    let c = w.client(100);
    let c2 = c.clone();
    let r = w.block_on(async move { c2.call(1, b"x".to_vec(), 10 * SEC).await });
    assert_eq!(r, Err(RpcError::Failed));
    assert!(w.now() < 100 * MS, "a dead server's calls fail within 100 ms");
    w.start_node(1, Echo::default());
    w.net(|n| n.disconnect(100));
    let c3 = c.clone();
    assert_eq!(w.block_on(async move { c3.call(1, b"x".to_vec(), 10 * SEC).await }), Err(RpcError::Failed));
    w.net(|n| n.connect(100));
    assert_eq!(w.block_on(async move { c.call(1, b"x".to_vec(), SEC).await }), Ok(b"x".to_vec()));
}

#[test]
fn unreliable_network_loses_some_calls() {
    let w = World::new(3, NetConfig { unreliable: true, ..Default::default() });
    w.start_node(1, Echo::default());
    let c = w.client(100);
    let (ok, failed) = w.block_on(async move {
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..1000 {
            match c.call(1, b"x".to_vec(), SEC).await {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    // About 10% of requests and 10% of replies are lost: ~19% of calls fail.
    assert!((120..280).contains(&failed), "{failed} of 1000 failed");
    assert_eq!(ok + failed, 1000);
}

#[test]
fn tasks_run_concurrently_in_virtual_time() {
    let w = World::new(4, NetConfig::default());
    let hs: Vec<_> = (0..10u64)
        .map(|i| {
            let c = w.client(100 + i);
            w.spawn(async move {
                c.sleep(SEC).await;
                c.now()
            })
        })
        .collect();
    let ends = w.block_on(async move {
        let mut v = Vec::new();
        for h in hs {
            v.push(h.await);
        }
        v
    });
    assert!(ends.iter().all(|&t| t == SEC), "ten one-second sleeps overlap: {ends:?}");
}

#[test]
fn same_seed_same_trace() {
    let run = |seed| {
        let w = World::new(seed, NetConfig { unreliable: true, long_reordering: true, ..Default::default() });
        w.start_node(1, Echo::default());
        for i in 0..5u64 {
            let c = w.client(100 + i);
            w.spawn(async move {
                for j in 0..50u8 {
                    let _ = c.call(1, vec![j], SEC).await;
                }
            });
        }
        w.run_for(60 * SEC);
        (w.trace_hash(), w.events_handled())
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).0, run(8).0);
}

#[test]
#[should_panic(expected = "deadlock")]
fn waiting_forever_is_reported() {
    let w = World::new(5, NetConfig::default());
    w.block_on(std::future::pending::<()>());
}

#[test]
fn a_paused_node_answers_after_it_resumes_and_slow_clocks_stretch_timers() {
    let w = World::new(5, NetConfig::default());
    w.start_node(1, Echo::default());
    let c = w.client(100);
    w.pause(1, 400 * MS);
    let c2 = c.clone();
    let (r, took) = w.block_on(async move {
        let t0 = c2.now();
        let r = c2.call(1, b"x".to_vec(), SEC).await;
        (r, c2.now() - t0)
    });
    assert_eq!(r, Ok(b"x".to_vec()));
    assert!((400 * MS..402 * MS).contains(&took), "answered after {took} us, not when it resumed");
    // A clock 50% slow: the deferred reply (a 50 ms timer) comes after 75 ms.
    w.set_clock_rate(1, 1.5);
    let (r, took) = w.block_on(async move {
        let t0 = c.now();
        let r = c.call(1, b"Later".to_vec(), SEC).await;
        (r, c.now() - t0)
    });
    assert_eq!(r, Ok(b"Later".to_vec()));
    assert!((75 * MS..77 * MS).contains(&took), "deferred reply after {took} us");
}
