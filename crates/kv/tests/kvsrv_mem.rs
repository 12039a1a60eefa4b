//! Section 2, memory: what the single server keeps per client, and after a large value is
//! overwritten. Measured with a counting allocator: the server's footprint is what the heap
//! gets back when the server is dropped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

mod common;

use sixfive_kv::{Clerk, History, KvClient, KvError, KvServer};
use sixfive_sim::{NetConfig, World, seeds::run_seeds};

struct Counting;

thread_local! {
    /// Live heap bytes allocated by this thread (the simulator is single-threaded).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn add(n: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + n));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            add(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        add(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            add(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.with(|c| c.get())
}

/// Bytes the heap gets back when the server at endpoint 1 is dropped.
fn server_footprint(w: &World) -> isize {
    let before = live();
    w.crash(1);
    before - live()
}

#[test]
fn mem_put_many_clients_2() {
    run_seeds("mem_put_many_clients_2", 1, |seed| {
        const CLIENTS: u64 = 100_000;
        const VALUE: usize = 1000;
        let w = World::new(seed, NetConfig::default());
        w.start_node(1, KvServer::new());
        let value = "v".repeat(VALUE);
        let h = History::default();
        for batch in 0..CLIENTS / 1000 {
            let handles: Vec<_> = (0..1000)
                .map(|i| {
                    let id = batch * 1000 + i;
                    let mut ck = Clerk::new(w.client(1_000_000 + id), 1, id).with_history(h.clone());
                    let v = value.clone();
                    w.spawn(async move { ck.put(&format!("k{id}"), &v, 0).await })
                })
                .collect();
            let results = w.block_on(async move {
                let mut r = Vec::new();
                for h in handles {
                    r.push(h.await);
                }
                r
            });
            assert!(results.iter().all(|r| *r == Ok(())), "every client's Put succeeds");
        }
        let n = w.inspect::<KvServer, _>(1, |s| s.store().len()).unwrap();
        assert_eq!(n as u64, CLIENTS);
        let footprint = server_footprint(&w);
        let per_client = (footprint - (CLIENTS as isize) * VALUE as isize) / CLIENTS as isize;
        eprintln!("server footprint {footprint} bytes: {per_client} bytes per client beyond the values");
        assert!(per_client <= 200, "{per_client} bytes per client beyond the values (limit 200)");
        common::check_versioned(&h.records());
    });
}

#[test]
fn mem_large_value_overwritten_2() {
    run_seeds("mem_large_value_overwritten_2", 1, |seed| {
        const BIG: usize = 10 << 20;
        let w = World::new(seed, NetConfig::default());
        w.start_node(1, KvServer::new());
        let h = History::default();
        let mut ck = Clerk::new(w.client(1000), 1, 0).with_history(h.clone());
        w.block_on(async move {
            ck.append("k", &"x".repeat(BIG)).await.unwrap();
            // The reply to this Append carries the 10 MiB old value; the server must not keep it.
            let old = ck.append("k", "y").await.unwrap();
            assert_eq!(old.len(), BIG);
            let (_, ver) = ck.get("k").await.unwrap();
            assert_eq!(ck.put("k", "small", ver).await, Ok(()));
            assert_eq!(ck.get("k").await.map(|(v, _)| v), Ok("small".to_string()));
            assert_eq!(ck.get("nope").await, Err(KvError::NoKey));
        });
        let footprint = server_footprint(&w);
        eprintln!("server footprint after overwriting a 10 MiB value: {footprint} bytes");
        assert!(footprint < BIG as isize, "server still holds {footprint} bytes");
        common::check_store(&h.records());
    });
}
