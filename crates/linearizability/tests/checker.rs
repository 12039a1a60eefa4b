use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sixfive_linearizability::models::*;
use sixfive_linearizability::{Op, Verdict, check};

const BUDGET: Duration = Duration::from_secs(10);

fn op<I, O>(client: u64, call: u64, ret: u64, input: I, output: O) -> Op<I, O> {
    Op { client, call, ret: Some(ret), input, output: Some(output) }
}
fn unknown<I, O>(client: u64, call: u64, input: I) -> Op<I, O> {
    Op { client, call, ret: None, input, output: None }
}
fn get(k: &str) -> AppendInput {
    AppendInput::Get { key: k.into() }
}
fn put(k: &str, v: &str) -> AppendInput {
    AppendInput::Put { key: k.into(), value: v.into() }
}
fn append(k: &str, a: &str) -> AppendInput {
    AppendInput::Append { key: k.into(), arg: a.into() }
}
fn val(v: &str) -> AppendOutput {
    AppendOutput::Value(v.into())
}

#[test]
fn sequential_history_is_linearizable() {
    let h = vec![op(0, 0, 1, put("x", "1"), AppendOutput::Ok), op(0, 2, 3, get("x"), val("1"))];
    assert_eq!(check(&AppendKv, &h, BUDGET), Verdict::Linearizable);
}

#[test]
fn read_concurrent_with_write_may_see_either() {
    for seen in ["", "1"] {
        let h = vec![op(0, 0, 10, put("x", "1"), AppendOutput::Ok), op(1, 5, 6, get("x"), val(seen))];
        assert_eq!(check(&AppendKv, &h, BUDGET), Verdict::Linearizable, "seen {seen:?}");
    }
}

#[test]
fn stale_read_after_write_is_not_linearizable() {
    let h = vec![
        op(0, 0, 1, put("x", "1"), AppendOutput::Ok),
        op(1, 2, 3, get("x"), val("1")),
        op(2, 4, 5, get("x"), val("")),
    ];
    match check(&AppendKv, &h, BUDGET) {
        Verdict::NotLinearizable(why) => {
            assert!(why.contains("client    2"), "explanation names the stale read: {why}");
            assert!(why.contains("up to time 5"), "shortest failing prefix ends at the stale read: {why}");
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn reads_cannot_go_back_in_time_even_when_concurrent_with_the_write() {
    // Both reads overlap the write, but the second starts after the first ended: once the new
    // value was seen, the old one may not come back.
    let h = vec![
        op(0, 0, 100, put("x", "1"), AppendOutput::Ok),
        op(1, 10, 20, get("x"), val("1")),
        op(2, 30, 40, get("x"), val("")),
    ];
    assert!(matches!(check(&AppendKv, &h, BUDGET), Verdict::NotLinearizable(_)));
}

#[test]
fn unknown_outcome_may_or_may_not_take_effect() {
    for seen in ["", "1"] {
        let h = vec![unknown(0, 0, put("x", "1")), op(1, 5, 6, get("x"), val(seen))];
        assert_eq!(check(&AppendKv, &h, BUDGET), Verdict::Linearizable, "seen {seen:?}");
    }
    // ... but not take effect and then be undone.
    let h = vec![unknown(0, 0, put("x", "1")), op(1, 5, 6, get("x"), val("1")), op(1, 7, 8, get("x"), val(""))];
    assert!(matches!(check(&AppendKv, &h, BUDGET), Verdict::NotLinearizable(_)));
}

#[test]
fn append_applied_twice_is_caught() {
    let h = vec![op(0, 0, 1, append("x", "a"), val("")), op(1, 2, 3, get("x"), val("aa"))];
    assert!(matches!(check(&AppendKv, &h, BUDGET), Verdict::NotLinearizable(_)));
    let ok = vec![
        op(0, 0, 1, append("x", "a"), val("")),
        op(0, 2, 3, append("x", "b"), val("a")),
        op(1, 4, 5, get("x"), val("ab")),
    ];
    assert_eq!(check(&AppendKv, &ok, BUDGET), Verdict::Linearizable);
}

#[test]
fn keys_are_independent() {
    let h = vec![
        op(0, 0, 1, put("x", "1"), AppendOutput::Ok),
        op(1, 2, 3, get("y"), val("")),
        op(1, 4, 5, get("x"), val("1")),
    ];
    assert_eq!(check(&AppendKv, &h, BUDGET), Verdict::Linearizable);
}

fn vput(k: &str, v: &str, ver: u64) -> VersionedInput {
    VersionedInput::Put { key: k.into(), value: v.into(), version: ver }
}
fn vget(k: &str) -> VersionedInput {
    VersionedInput::Get { key: k.into() }
}

#[test]
fn versioned_semantics() {
    use VersionedOutput::*;
    let good = vec![
        op(0, 0, 1, vget("k"), NoKey),
        op(0, 2, 3, vput("k", "a", 1), NoKey),
        op(0, 4, 5, vput("k", "a", 0), Ok),
        op(0, 6, 7, vput("k", "b", 0), ErrVersion),
        op(0, 8, 9, vget("k"), Value("a".into(), 1)),
        op(0, 10, 11, vput("k", "b", 1), Ok),
        op(0, 12, 13, vget("k"), Value("b".into(), 2)),
    ];
    assert_eq!(check(&VersionedKv, &good, BUDGET), Verdict::Linearizable);
    // A Put that "succeeded" with a stale version is impossible.
    let bad = vec![op(0, 0, 1, vput("k", "a", 0), Ok), op(0, 2, 3, vput("k", "b", 0), Ok)];
    assert!(matches!(check(&VersionedKv, &bad, BUDGET), Verdict::NotLinearizable(_)));
}

#[test]
fn versioned_maybe_applies_exactly_when_the_version_matches() {
    use VersionedOutput::*;
    // ErrMaybe with a matching version: it applied.
    let applied = vec![op(0, 0, 1, vput("k", "a", 0), ErrMaybe), op(0, 2, 3, vget("k"), Value("a".into(), 1))];
    assert_eq!(check(&VersionedKv, &applied, BUDGET), Verdict::Linearizable);
    // Concurrent with another Put, it may have lost the race instead.
    let lost = vec![
        op(0, 0, 10, vput("k", "a", 0), ErrMaybe),
        op(1, 1, 2, vput("k", "b", 0), Ok),
        op(0, 11, 12, vget("k"), Value("b".into(), 1)),
    ];
    assert_eq!(check(&VersionedKv, &lost, BUDGET), Verdict::Linearizable);
    // Alone on the key, a matching ErrMaybe Put cannot have failed.
    let impossible = vec![op(0, 0, 1, vput("k", "a", 0), ErrMaybe), op(0, 2, 3, vget("k"), NoKey)];
    assert!(matches!(check(&VersionedKv, &impossible, BUDGET), Verdict::NotLinearizable(_)));
}

#[test]
fn generic_model_from_a_function() {
    // A counter: Inc returns the new value.
    let m = FnModel::new(0u64, |s: &u64, _: &()| (s + 1, s + 1), |_: &()| 0);
    let good = vec![op(0, 0, 10, (), 2u64), op(1, 1, 11, (), 1u64)];
    assert_eq!(check(&m, &good, BUDGET), Verdict::Linearizable);
    let bad = vec![op(0, 0, 1, (), 2u64), op(1, 2, 3, (), 1u64)];
    assert!(matches!(check(&m, &bad, BUDGET), Verdict::NotLinearizable(_)));
}

/// A linearizable history of `n` operations by `clients` clients on `keys` keys: each
/// operation takes effect at a random point inside its interval, in that order.
fn generate(n: usize, clients: u64, keys: u64, seed: u64) -> Vec<Op<AppendInput, AppendOutput>> {
    let mut x = seed;
    let mut rnd = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let mut free_at = vec![0u64; clients as usize];
    // (linearization point, client, call, ret, input)
    let mut planned = Vec::new();
    for i in 0..n {
        let c = rnd(clients);
        let call = free_at[c as usize] + rnd(5);
        let lin = call + 1 + rnd(20);
        let ret = lin + 1 + rnd(20);
        free_at[c as usize] = ret + 1;
        let key = format!("k{}", rnd(keys));
        let input = match rnd(3) {
            0 => AppendInput::Get { key },
            1 => AppendInput::Put { key, value: format!("p{i}.") },
            _ => AppendInput::Append { key, arg: format!("a{i}.") },
        };
        planned.push((lin, i, c, call, ret, input));
    }
    planned.sort_by_key(|p| (p.0, p.1));
    let mut store: BTreeMap<String, String> = BTreeMap::new();
    planned
        .into_iter()
        .map(|(_, _, c, call, ret, input)| {
            let output = match &input {
                AppendInput::Get { key } => AppendOutput::Value(store.get(key).cloned().unwrap_or_default()),
                AppendInput::Put { key, value } => {
                    store.insert(key.clone(), value.clone());
                    AppendOutput::Ok
                }
                AppendInput::Append { key, arg } => {
                    let old = store.get(key).cloned().unwrap_or_default();
                    store.insert(key.clone(), format!("{old}{arg}"));
                    AppendOutput::Value(old)
                }
            };
            op(c, call, ret, input, output)
        })
        .collect()
}

#[test]
fn ten_thousand_operations_on_a_hundred_keys() {
    let h = generate(10_000, 10, 100, 0x1234_5678);
    let t = Instant::now();
    assert_eq!(check(&AppendKv, &h, BUDGET), Verdict::Linearizable);
    eprintln!("10,000 operations, 100 keys, 10 clients: checked in {:?}", t.elapsed());
    // Corrupt one read: now it must be caught, with a short explanation.
    let mut bad = h.clone();
    let i = bad.iter().rposition(|o| matches!(&o.output, Some(AppendOutput::Value(v)) if !v.is_empty())).unwrap();
    bad[i].output = Some(AppendOutput::Value("corrupt".into()));
    match check(&AppendKv, &bad, BUDGET) {
        Verdict::NotLinearizable(why) => {
            assert!(why.lines().count() < 200, "explanation is a prefix of one key's history")
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn budget_exhaustion_answers_unknown() {
    // Many fully concurrent appends with unknown outcomes and a final read no order explains:
    // the search must try a huge number of orders, and gives up.
    let mut h: Vec<Op<AppendInput, AppendOutput>> =
        (0..40).map(|i| unknown(i, 0, append("x", &format!("{i},")))).collect();
    h.push(op(99, 1, 2, get("x"), val("none of them")));
    h.push(op(99, 3, 4, get("x"), val("other")));
    assert_eq!(check(&AppendKv, &h, Duration::from_millis(50)), Verdict::Unknown);
}

#[test]
fn many_unobserved_unknown_operations_are_cheap() {
    // 100 increments whose outcome nobody learned (sent to a cut-off leader), while 50 known
    // increments proceed: the known ones explain every observed value by themselves.
    let m = FnModel::new(0u64, |s: &u64, _: &()| (s + 1, s + 1), |_: &()| 0);
    let mut h: Vec<Op<(), u64>> = (0..100).map(|i| unknown(i, 10, ())).collect();
    for k in 0..50u64 {
        h.push(op(1000, 20 + 10 * k, 25 + 10 * k, (), k + 1));
    }
    assert_eq!(check(&m, &h, BUDGET), Verdict::Linearizable);
    // And when one unknown increment must have happened, it is found.
    let mut h2: Vec<Op<(), u64>> = (0..100).map(|i| unknown(i, 10, ())).collect();
    h2.push(op(1000, 20, 25, (), 2));
    assert_eq!(check(&m, &h2, BUDGET), Verdict::Linearizable);
}
