//! History checks for key/value runs in the simulator: every check panics with an explanation
//! when the history is not linearizable (or when the check cannot conclude).

use std::time::Duration;

use crate::{KvError, Op, OpResult, Record};
use sixfive_linearizability::models::{
    AppendInput, AppendKv, AppendOutput, VersionedInput, VersionedKv, VersionedOutput,
};
use sixfive_linearizability::{Op as HOp, Verdict, check};

/// How long a history check may search before answering "unknown".
pub const CHECK_BUDGET: Duration = Duration::from_secs(20);

fn verdict(v: Verdict, what: &str) {
    match v {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable(why) => panic!("{what} history is not linearizable\n{why}"),
        Verdict::Unknown => panic!(
            "{what} history: the linearizability check ran out of time (unknown); a check that cannot conclude proves nothing"
        ),
    }
}

/// Checks a history of Gets and versioned Puts.
pub fn check_versioned(history: &[Record]) {
    let ops: Vec<HOp<VersionedInput, VersionedOutput>> = history
        .iter()
        .map(|r| {
            let input = match &r.op {
                Op::Get { key } => VersionedInput::Get { key: key.clone() },
                Op::Put { key, value, version } => {
                    VersionedInput::Put { key: key.clone(), value: value.clone(), version: *version }
                }
                op => panic!("not a versioned-store operation: {op:?}"),
            };
            let output = r.result.as_ref().map(|res| match res {
                OpResult::Value { value, version } => VersionedOutput::Value(value.clone(), *version),
                OpResult::Ok => VersionedOutput::Ok,
                OpResult::Err(KvError::NoKey) => VersionedOutput::NoKey,
                OpResult::Err(KvError::Version) => VersionedOutput::ErrVersion,
                OpResult::Err(KvError::Maybe) => VersionedOutput::ErrMaybe,
                other => panic!("unexpected result {other:?}"),
            });
            HOp { client: r.client, call: r.call, ret: if output.is_some() { r.ret } else { None }, input, output }
        })
        .collect();
    verdict(check(&VersionedKv, &ops, CHECK_BUDGET), "versioned KV");
}

/// Checks a history of Gets and Appends (an absent key reads as "").
pub fn check_appends(history: &[Record]) {
    let ops: Vec<HOp<AppendInput, AppendOutput>> = history
        .iter()
        .map(|r| {
            let input = match &r.op {
                Op::Get { key } => AppendInput::Get { key: key.clone() },
                Op::Append { key, arg } => AppendInput::Append { key: key.clone(), arg: arg.clone() },
                op => panic!("not an append-store operation: {op:?}"),
            };
            let output = r.result.as_ref().map(|res| match res {
                OpResult::Value { value, .. } => AppendOutput::Value(value.clone()),
                OpResult::Err(KvError::NoKey) => AppendOutput::Value(String::new()),
                OpResult::Appended { old } => AppendOutput::Value(old.clone()),
                other => panic!("unexpected result {other:?}"),
            });
            HOp { client: r.client, call: r.call, ret: if output.is_some() { r.ret } else { None }, input, output }
        })
        .collect();
    verdict(check(&AppendKv, &ops, CHECK_BUDGET), "append KV");
}

/// Checks a history of any single-key operations against the store itself as the sequential
/// specification (the generic model), partitioned by key.
pub fn check_store(history: &[Record]) {
    use crate::KvStore;
    use sixfive_linearizability::models::FnModel;
    let model = FnModel::new(
        KvStore::default(),
        |s: &KvStore, op: &Op| {
            let mut next = s.clone();
            let r = next.apply(op.clone());
            (next, r)
        },
        |op: &Op| {
            assert!(!matches!(op, Op::Scan { .. }), "scans span keys; check them another way");
            op.key().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
        },
    );
    let ops: Vec<HOp<Op, OpResult>> = history
        .iter()
        .map(|r| HOp { client: r.client, call: r.call, ret: r.ret, input: r.op.clone(), output: r.result.clone() })
        .collect();
    verdict(check(&model, &ops, CHECK_BUDGET), "KV store");
}

/// The token client `c` appends as its `j`-th append.
pub fn token(c: u64, j: u64) -> String {
    format!("x {c} {j} y")
}

fn short(v: &str) -> String {
    if v.len() <= 200 { v.to_string() } else { format!("{}...({} bytes)", &v[..200], v.len()) }
}

/// Checks that in each of `values` (one per key) every token of client `c` appears in the
/// order the client appended it, and, when `count` is given, that exactly the tokens
/// `0..count` of `c` appear once each across all keys.
pub fn check_client_appends(values: &[String], c: u64, count: Option<u64>) {
    let prefix = format!("x {c} ");
    let mut seen = std::collections::BTreeSet::new();
    for value in values {
        let mut last: Option<u64> = None;
        let mut rest = value.as_str();
        while let Some(pos) = rest.find(&prefix) {
            let after = &rest[pos + prefix.len()..];
            let end = after.find(" y").expect("token is terminated");
            let j: u64 = after[..end].parse().expect("token number");
            if let Some(l) = last {
                assert!(
                    j > l,
                    "client {c}: append {j} after {l} in one key: out of order or duplicated in {}",
                    short(value)
                );
            }
            assert!(seen.insert(j), "client {c}: append {j} present twice");
            last = Some(j);
            rest = &after[end..];
        }
    }
    if let Some(n) = count {
        assert_eq!(seen.len() as u64, n, "client {c}: {} of its {n} appends present", seen.len());
        assert!(seen.iter().copied().eq(0..n), "client {c}: some appends missing");
    }
}
