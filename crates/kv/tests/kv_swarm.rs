//! The KV swarm (see `sixfive_kv::swarm`): CI runs 500 seeds; `SEEDS=10000` for more. And the
//! swarm's own history check, fed histories that must be rejected, so that a check that
//! passes everything would fail here.

use std::panic::{AssertUnwindSafe, catch_unwind};

use sixfive_kv::swarm::check_history;
use sixfive_kv::{KvError, Op, OpResult, Record};
use sixfive_sim::seeds::run_seeds;

#[test]
fn kv_swarm_random_faults() {
    let mut total = sixfive_kv::swarm::KvSwarmReport::default();
    run_seeds("kv_swarm_random_faults", 500, |seed| {
        let r = sixfive_kv::swarm::run(seed);
        total.merge(&r);
    });
    // The swarm must exercise the service, not idle through its faults.
    assert!(
        total.ops > 0 && total.crashes > 0 && total.pauses > 0 && total.acked_puts > 0 && total.acked_appends > 0,
        "{total:?}"
    );
}

fn rec(client: u64, call: u64, ret: u64, op: Op, result: OpResult) -> Record {
    Record { client, call, ret: Some(ret), op, result: Some(result) }
}

fn put(key: &str, value: &str, version: u64) -> Op {
    Op::Put { key: key.into(), value: value.into(), version }
}

fn get(key: &str) -> Op {
    Op::Get { key: key.into() }
}

fn value(v: &str, version: u64) -> OpResult {
    OpResult::Value { value: v.into(), version }
}

fn rejected(history: Vec<Record>) -> String {
    let err = catch_unwind(AssertUnwindSafe(|| check_history(history))).expect_err("accepted a bad history");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn swarm_check_accepts_a_good_history() {
    check_history(vec![
        rec(1, 0, 10, put("v0", "x", 0), OpResult::Ok),
        rec(2, 5, 30, get("v0"), value("x", 1)),
        rec(1, 20, 40, Op::Append { key: "a".into(), arg: "t".into() }, OpResult::Appended { old: String::new() }),
        rec(2, 50, 60, get("a"), value("t", 1)),
    ]);
}

#[test]
fn swarm_check_rejects_a_stale_read() {
    // The Put finished before the Get began; the Get still saw no key.
    let why = rejected(vec![
        rec(1, 0, 10, put("v0", "x", 0), OpResult::Ok),
        rec(2, 20, 30, get("v0"), OpResult::Err(KvError::NoKey)),
    ]);
    assert!(why.contains("not linearizable"), "{why}");
    // A read older than an earlier read of another client.
    rejected(vec![
        rec(1, 0, 10, put("v0", "x", 0), OpResult::Ok),
        rec(1, 15, 18, put("v0", "y", 1), OpResult::Ok),
        rec(2, 20, 30, get("v0"), value("y", 2)),
        rec(3, 40, 50, get("v0"), value("x", 1)),
    ]);
}

#[test]
fn swarm_check_rejects_a_lost_or_doubled_append() {
    let append = |arg: &str| Op::Append { key: "a".into(), arg: arg.into() };
    rejected(vec![
        rec(1, 0, 10, append("p"), OpResult::Appended { old: String::new() }),
        rec(2, 20, 30, get("a"), OpResult::Err(KvError::NoKey)),
    ]);
    rejected(vec![
        rec(1, 0, 10, append("p"), OpResult::Appended { old: String::new() }),
        rec(2, 20, 30, get("a"), value("pp", 2)),
    ]);
}

#[test]
fn swarm_check_rejects_two_puts_on_one_version() {
    rejected(vec![rec(1, 0, 10, put("v0", "x", 0), OpResult::Ok), rec(2, 0, 10, put("v0", "y", 0), OpResult::Ok)]);
}
