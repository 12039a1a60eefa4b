//! etcd's v3 API on a real three-member sixfive cluster (`sixfive kv serve --api etcd`, one OS
//! process each, data on disk), driven by the `etcd-client` crate and by etcdctl unmodified:
//! compare-and-set through Txn under `kill -9` of the leader checked for linearizability,
//! watches that lose and reorder nothing across leader changes and reconnects, and etcdctl
//! against every member (followers forward to the leader).

use std::cell::{Cell, RefCell};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use sixfive_linearizability::models::{VersionedInput as In, VersionedKv, VersionedOutput as Out};
use sixfive_linearizability::{Op, Verdict, check};

mod common;
use common::{BIN, TestCluster, free_port, run_local};

const ETCD: &[&str] = &["--api=etcd"];

async fn connect(urls: &[String]) -> Client {
    let opts =
        ConnectOptions::new().with_timeout(Duration::from_secs(3)).with_connect_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(urls, Some(opts.clone())).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect to {urls:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type History = Rc<RefCell<Vec<Op<In, Out>>>>;

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// Reads a key and then compare-and-sets it at the version read (a Txn: if the version still
/// is what was read, put; else read it back), until `stop`. Every answered operation goes into
/// the history; a CAS without an answer goes in with an unknown outcome. Returns the number of
/// CAS that succeeded.
async fn cas_worker(
    urls: Vec<String>,
    c: u64,
    keys: Vec<String>,
    h: History,
    t0: Instant,
    stop: Rc<Cell<bool>>,
) -> u64 {
    let mut client = connect(&urls).await;
    let (mut i, mut j, mut won) = (c as usize, 0u64, 0);
    while !stop.get() {
        i = i.wrapping_mul(31).wrapping_add(7);
        let key = keys[i % keys.len()].clone();
        let call = micros(t0);
        let version = match client.get(key.as_str(), None).await {
            Ok(r) => {
                let out = match r.kvs().first() {
                    Some(kv) => Out::Value(kv.value_str().unwrap().to_string(), kv.version() as u64),
                    None => Out::NoKey,
                };
                let version = match &out {
                    Out::Value(_, v) => *v,
                    _ => 0,
                };
                let ret = Some(micros(t0));
                h.borrow_mut().push(Op {
                    client: c,
                    call,
                    ret,
                    input: In::Get { key: key.clone() },
                    output: Some(out),
                });
                version
            }
            // A read that failed changed nothing.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let value = format!("c{c}-{j}");
        j += 1;
        let input = In::Put { key: key.clone(), value: value.clone(), version };
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, version as i64)])
            .and_then([TxnOp::put(key.as_str(), value.clone(), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let call = micros(t0);
        let (ret, output) = match client.txn(txn).await {
            Ok(r) if r.succeeded() => {
                won += 1;
                (Some(micros(t0)), Some(Out::Ok))
            }
            Ok(r) => {
                let absent = match r.op_responses().first() {
                    Some(TxnOpResponse::Get(g)) => g.kvs().is_empty(),
                    other => panic!("the failure branch reads the key: {other:?}"),
                };
                (Some(micros(t0)), Some(if absent { Out::NoKey } else { Out::ErrVersion }))
            }
            // No answer (the member died, the leader changed): it may or may not have applied.
            // Find out from the key where the key tells (values are unique, versions only grow:
            // no deletes here): our value at version+1 means it applied; another value at
            // version+1, or a version still at ours, means it never will (then it had no effect
            // and leaves the history). Otherwise the outcome stays unknown. So the checker sees
            // few unknowns, each of which multiplies its work.
            // A refused connection never carried the request.
            Err(e) if e.to_string().contains("tcp connect error") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => match settle(&mut client, &key, version, &value).await {
                Settled::Applied => (Some(micros(t0)), Some(Out::Ok)),
                Settled::NotApplied => continue,
                Settled::Unknown => (None, None),
            },
        };
        h.borrow_mut().push(Op { client: c, call, ret, input, output });
        // A bounded history: the checker's work grows fast with operations per key.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    won
}

enum Settled {
    Applied,
    NotApplied,
    Unknown,
}

/// What became of a CAS of `key` from `version` to `value` that got no answer.
async fn settle(client: &mut Client, key: &str, version: u64, value: &str) -> Settled {
    for _ in 0..200 {
        // A read from after the failure: if the write is still in flight somewhere it may land
        // later, so only a version past ours settles it.
        if let Ok(r) = client.get(key, None).await {
            let (v, ver) = match r.kvs().first() {
                Some(kv) => (kv.value_str().unwrap_or("").to_string(), kv.version() as u64),
                None => (String::new(), 0),
            };
            return if ver == version + 1 && v == value {
                Settled::Applied
            } else if ver == version + 1 {
                Settled::NotApplied
            } else {
                // At our version still (it may yet apply) or far past it (ambiguous).
                Settled::Unknown
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Settled::Unknown
}

#[test]
fn etcd_txn_cas_under_kill9_of_the_leader_is_linearizable() {
    let mut tc = TestCluster::new("etcd-cas", 3, ETCD);
    run_local(async {
        let urls = tc.urls();
        let keys: Vec<String> = (0..6).map(|i| format!("cas/{i}")).collect();
        let h: History = Rc::default();
        let stop = Rc::new(Cell::new(false));
        let t0 = Instant::now();
        tc.leader().await;
        let workers: Vec<_> = (0..4)
            .map(|c| tokio::task::spawn_local(cas_worker(urls.clone(), c, keys.clone(), h.clone(), t0, stop.clone())))
            .collect();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let l = tc.leader().await;
            tc.kill9(l);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tc.start(l);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.set(true);
        let mut won = 0;
        for w in workers {
            won += w.await.unwrap();
        }
        // Every key read once more at the end: what was acknowledged must be there.
        let mut client = connect(&urls).await;
        for key in &keys {
            let call = micros(t0);
            let r = loop {
                match client.get(key.as_str(), None).await {
                    Ok(r) => break r,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let out = match r.kvs().first() {
                Some(kv) => Out::Value(kv.value_str().unwrap().to_string(), kv.version() as u64),
                None => Out::NoKey,
            };
            let ret = Some(micros(t0));
            h.borrow_mut().push(Op { client: 99, call, ret, input: In::Get { key: key.clone() }, output: Some(out) });
        }
        let history = h.borrow().clone();
        assert!(won >= 20, "only {won} compare-and-sets succeeded");
        let verdict = check(&VersionedKv, &history, Duration::from_secs(60));
        assert_eq!(verdict, Verdict::Linearizable, "{} operations", history.len());
        let unknown = history.iter().filter(|o| o.output.is_none()).count();
        eprintln!("{} operations checked ({unknown} of unknown outcome), {won} CAS succeeded", history.len());
    });
    tc.ok = true;
}

/// Follows the prefix `w/` from revision `from` through one member after another: whenever the
/// stream ends or stalls, it reconnects (to the next member) from the revision after the last
/// one seen. Records every event's revision and key, until `until` is reached.
async fn follower_watch(
    tc_urls: Vec<String>,
    on: Rc<Cell<usize>>,
    from: i64,
    until: Rc<Cell<i64>>,
) -> Vec<(i64, String)> {
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut next = from;
    let mut reconnects = 0;
    loop {
        if until.get() > 0 && next > until.get() {
            eprintln!("watch: {} events, {reconnects} reconnects", seen.len());
            return seen;
        }
        let i = on.get();
        let url = tc_urls[i].clone();
        let Ok(Ok(mut client)) =
            tokio::time::timeout(Duration::from_secs(1), Client::connect([url.as_str()], None)).await
        else {
            on.set((i + 1) % tc_urls.len());
            reconnects += 1;
            continue;
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(2), client.watch("w/", Some(opts))).await
        else {
            on.set((i + 1) % tc_urls.len());
            reconnects += 1;
            continue;
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(r))) => {
                    assert!(!r.canceled(), "watch cancelled: {}", r.cancel_reason());
                    for e in r.events() {
                        let kv = e.kv().expect("an event has its key");
                        let rev = kv.mod_revision();
                        assert!(rev >= next, "event at revision {rev} replayed (expected {next} or later)");
                        seen.push((rev, kv.key_str().unwrap().to_string()));
                        next = rev + 1;
                    }
                    if until.get() > 0 && next > until.get() {
                        break;
                    }
                }
                // Ended, failed or stalled: resume elsewhere from `next`.
                _ => {
                    on.set((i + 1) % tc_urls.len());
                    reconnects += 1;
                    break;
                }
            }
        }
    }
}

#[test]
fn etcd_watch_loses_and_reorders_nothing_across_leader_changes_and_reconnects() {
    let mut tc = TestCluster::new("etcd-watch", 3, ETCD);
    run_local(async {
        let urls = tc.urls();
        let leader = tc.leader().await;
        let mut client = connect(&urls).await;
        let start = client.put("start", "1", None).await.unwrap().header().unwrap().revision();
        // The watcher starts on a follower.
        let on = Rc::new(Cell::new((leader + 1) % 3));
        let until = Rc::new(Cell::new(0));
        let watcher = tokio::task::spawn_local(follower_watch(urls.clone(), on.clone(), start + 1, until.clone()));
        let stop = Rc::new(Cell::new(false));
        let writer = {
            let (urls, stop) = (urls.clone(), stop.clone());
            tokio::task::spawn_local(async move {
                let mut client = connect(&urls).await;
                let mut acked = Vec::new();
                let mut i = 0;
                while !stop.get() {
                    let key = format!("w/{i:06}");
                    if client.put(key.as_str(), "v", None).await.is_ok() {
                        acked.push(key);
                        i += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                acked
            })
        };
        for round in 0..4 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            // Alternately the leader and the member the watcher is on.
            let victim = if round % 2 == 0 { tc.leader().await } else { on.get() };
            tc.kill9(victim);
            tokio::time::sleep(Duration::from_millis(1200)).await;
            tc.start(victim);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.set(true);
        let acked = writer.await.unwrap();
        let last = loop {
            if let Ok(r) = client.get("w/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await
            {
                break r.header().unwrap().revision();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        until.set(last);
        let seen =
            tokio::time::timeout(Duration::from_secs(60), watcher).await.expect("the watcher catches up").unwrap();
        // Only puts under w/ were made after `start`: one event per revision, every revision.
        let revs: Vec<i64> = seen.iter().map(|(r, _)| *r).collect();
        let want: Vec<i64> = (start + 1..=last).collect();
        assert_eq!(revs, want, "events must cover every revision once, in order");
        let keys: std::collections::BTreeSet<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
        for k in &acked {
            assert!(keys.contains(k.as_str()), "acknowledged put of {k} never reached the watcher");
        }
        assert!(acked.len() > 50, "only {} puts acknowledged", acked.len());
        eprintln!("{} puts acknowledged, {} events watched", acked.len(), seen.len());
    });
    tc.ok = true;
}

fn etcdctl_installed() -> bool {
    Command::new("etcdctl").arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn ok(endpoints: &str, args: &[&str]) -> String {
    let (ok, out, err) = etcdctl(endpoints, args);
    assert!(ok, "etcdctl {args:?} failed: {out}{err}");
    out
}

#[test]
fn etcdctl_against_every_member_of_a_sixfive_cluster() {
    if !etcdctl_installed() {
        eprintln!("skipped: etcdctl is not installed (Debian: apt-get install etcd-client)");
        return;
    }
    let mut tc = TestCluster::new("etcdctl", 3, ETCD);
    run_local(async {
        tc.leader().await;
    });
    let urls = tc.urls();
    let all = urls.join(",");
    // A write through each member (followers forward to the leader), read through another.
    for i in 0..3 {
        ok(&urls[i], &["put", &format!("k{i}"), &format!("v{i}")]);
        assert_eq!(ok(&urls[(i + 1) % 3], &["get", &format!("k{i}"), "--print-value-only"]).trim(), format!("v{i}"));
    }
    let txn = Command::new("etcdctl")
        .arg(format!("--endpoints={}", urls[1]))
        .args(["txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        txn.stdin.as_ref().unwrap().write_all(b"value(\"k0\") = \"v0\"\n\nput k0 swapped\n\n\n").unwrap();
    }
    let out = txn.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("SUCCESS"), "{out:?}");
    assert_eq!(ok(&urls[2], &["get", "k0", "--print-value-only"]).trim(), "swapped");

    // Every member, with its client URL, as any member lists them.
    let list: serde_json::Value = serde_json::from_str(&ok(&urls[2], &["member", "list", "-w", "json"])).unwrap();
    let members = list["members"].as_array().unwrap();
    let mut names: Vec<&str> = members.iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for m in members {
        let client = m["clientURLs"][0].as_str().unwrap_or("");
        assert!(urls.iter().any(|u| u == client), "member {m} lists client URL {client:?}");
    }
    // Status of every member, found through the member list: one leader, the same term.
    let status: serde_json::Value =
        serde_json::from_str(&ok(&urls[0], &["endpoint", "status", "--cluster", "-w", "json"])).unwrap();
    let status = status.as_array().unwrap();
    assert_eq!(status.len(), 3, "{status:?}");
    let leaders: std::collections::BTreeSet<u64> =
        status.iter().map(|s| s["Status"]["leader"].as_u64().unwrap()).collect();
    assert_eq!(leaders.len(), 1, "every member names the same leader: {status:?}");
    // etcdctl prints health to stderr.
    let (healthy, out, err) = etcdctl(&all, &["endpoint", "health", "--cluster"]);
    assert!(healthy && err.matches("is healthy").count() == 3, "{out}{err}");

    // A lock held through one member blocks a contender on another until released.
    let holder = Command::new("etcdctl")
        .arg(format!("--endpoints={}", urls[0]))
        .args(["lock", "the-lock", "--", "sh", "-c", "echo held; sleep 2; echo released"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let contender = etcdctl(&urls[2], &["lock", "the-lock", "echo", "second"]);
    let held = holder.wait_with_output().unwrap();
    let held = String::from_utf8_lossy(&held.stdout).to_string();
    assert!(held.contains("held") && held.contains("released"), "{held}");
    assert!(contender.0 && contender.1.contains("second"), "{contender:?}");

    // A lease kept alive survives the loss of the leader (the new leader extends it).
    let lease = ok(&urls[0], &["lease", "grant", "4"]);
    let id = lease.split_whitespace().nth(1).unwrap().to_string();
    ok(&urls[0], &["put", "--lease", &id, "leased", "x"]);
    let mut keeper = Command::new("etcdctl")
        .arg(format!("--endpoints={all}"))
        .args(["lease", "keep-alive", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let leader = run_local(async { tc.leader().await });
    tc.kill9(leader);
    std::thread::sleep(Duration::from_secs(6));
    let alive: Vec<String> = (0..3).filter(|i| *i != leader).map(|i| urls[i].clone()).collect();
    assert_eq!(ok(&alive.join(","), &["get", "leased", "--print-value-only"]).trim(), "x");
    let _ = keeper.kill();
    let _ = keeper.wait();
    tc.start(leader);
    tc.ok = true;
}

#[test]
fn a_data_directory_keeps_the_api_it_was_made_with() {
    let mut tc = TestCluster::new("etcd-api-dir", 1, ETCD);
    run_local(async {
        tc.leader().await;
    });
    assert!(tc.terminate(0).success());
    let out = Command::new(BIN)
        .args(["kv", "serve", "--name", "n1", "--api", "sixfive"])
        .arg(format!("--data-dir={}", tc.servers[0].dir.display()))
        .arg(format!("--initial-cluster={}", tc.initial))
        .args(["--initial-cluster-token", &tc.token])
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", tc.servers[0].peer_port))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{}", tc.servers[0].client_port))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the etcd API, but this server has --api sixfive")
            && err.contains("refusing to start"),
        "{err}"
    );
    tc.ok = true;
}

/// etcdctl's membership commands against a sixfive cluster: a learner added with `member add
/// --learner` is started with the settings etcdctl prints, catches up, is promoted with
/// `member promote`; `member remove` of a running member stops that server (exit 0), and the
/// cluster keeps serving through the new member. Unknown ids and bad URLs get etcd's errors.
#[test]
fn etcdctl_member_add_promote_remove() {
    if !etcdctl_installed() {
        eprintln!("skipped: etcdctl is not installed (Debian: apt-get install etcd-client)");
        return;
    }
    let mut tc = TestCluster::new("etcd-members", 3, ETCD);
    run_local(async {
        tc.leader().await;
    });
    let urls = tc.urls();
    let all = urls.join(",");
    ok(&all, &["put", "before", "1"]);
    let (p4, c4) = (free_port(), free_port());
    let out = ok(&urls[1], &["member", "add", "n4", "--learner", &format!("--peer-urls=http://127.0.0.1:{p4}")]);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=\"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{k} not in {out}"))
            .to_string()
    };
    assert_eq!(field("ETCD_INITIAL_CLUSTER_STATE"), "existing");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let n4_log = tc.root.join("n4.log");
    let mut n4 = Command::new(BIN)
        .args(["kv", "serve", "--name", "n4", "--api", "etcd"])
        .arg(format!("--data-dir={}", tc.root.join("n4").display()))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{c4}"))
        .arg(format!("--listen-peer-urls={}", field("ETCD_INITIAL_ADVERTISE_PEER_URLS")))
        .arg(format!("--initial-cluster={}", field("ETCD_INITIAL_CLUSTER")))
        .args(["--initial-cluster-state", "existing", "--initial-cluster-token", &tc.token])
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&n4_log).unwrap())
        .spawn()
        .unwrap();
    let members = |at: &str| -> Vec<(String, bool)> {
        let list: serde_json::Value = serde_json::from_str(&ok(at, &["member", "list", "-w", "json"])).unwrap();
        let mut v: Vec<(String, bool)> = list["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap_or("").to_string(), m["isLearner"].as_bool().unwrap_or(false)))
            .collect();
        v.sort();
        v
    };
    // Listed as a learner under the name it started with; promoted once it has caught up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !members(&urls[0]).contains(&("n4".into(), true)) {
        assert!(Instant::now() < deadline, "{:?}", members(&urls[0]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (promoted, out, err) = etcdctl(&urls[2], &["member", "promote", &id, "--command-timeout=15s"]);
        if promoted {
            assert!(out.contains("promoted"), "{out}");
            break;
        }
        assert!(err.contains("in sync with leader"), "{err}");
        assert!(Instant::now() < deadline, "never promoted: {err}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let n4_url = format!("http://127.0.0.1:{c4}");
    assert_eq!(ok(&n4_url, &["get", "before", "--print-value-only"]).trim(), "1");
    // Removing a running member stops it; the others serve on with n4.
    let (ok3, _, err) = etcdctl(&urls[0], &["member", "remove", "3"]);
    assert!(ok3, "{err}");
    let status = tc.wait_exit(2, Duration::from_secs(20));
    assert!(status.success(), "a removed member exits cleanly: {status:?}");
    assert!(tc.log_of(2).contains("removed from the cluster"));
    assert_eq!(members(&urls[0]), vec![("n1".into(), false), ("n2".into(), false), ("n4".into(), false)]);
    ok(&n4_url, &["put", "after", "2"]);
    assert_eq!(ok(&urls[0], &["get", "after", "--print-value-only"]).trim(), "2");
    // Errors as etcd gives them.
    let (done, _, err) = etcdctl(&urls[0], &["member", "remove", "99"]);
    assert!(!done && err.contains("member not found"), "{err}");
    let (done, _, err) = etcdctl(&urls[0], &["member", "promote", "1"]);
    assert!(!done && err.contains("can only promote a learner member"), "{err}");
    let (done, _, err) = etcdctl(&urls[0], &["member", "add", "x", &format!("--peer-urls=http://127.0.0.1:{p4}")]);
    assert!(!done && err.contains("Peer URLs already exists"), "{err}");
    // The member with the lowest id (the others accept its connections rather than dial it),
    // leader or not, also learns its removal and stops.
    let (ok1, _, err) = etcdctl(&n4_url, &["member", "remove", "1"]);
    assert!(ok1, "{err}");
    let status = tc.wait_exit(0, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    ok(&format!("{},{n4_url}", urls[1]), &["put", "two-left", "3"]);
    assert_eq!(members(&n4_url), vec![("n2".into(), false), ("n4".into(), false)]);
    let _ = n4.kill();
    let _ = n4.wait();
    tc.ok = true;
}

/// `bench kv --etcd-endpoints` drives a running server of etcd's API through the etcd-client
/// crate, and prints a writes and a reads row with their rates; nothing else is started.
#[test]
fn bench_kv_drives_a_running_etcd_api_server() {
    let mut tc = TestCluster::new("etcd-bench", 1, ETCD);
    run_local(async {
        tc.leader().await;
    });
    let out = Command::new(BIN)
        .args(["bench", "kv", "--secs", "0.5", "--clients", "8", "--etcd-endpoints", &tc.urls().join(",")])
        .current_dir(&tc.root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for row in ["writes (Put)", "reads (Get, lin.)"] {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row:?} row in\n{text}"));
        let rate: f64 = line[row.len()..].split_whitespace().next().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{line}");
    }
    assert!(!text.contains("sixfive writes"), "only the etcd-API load runs:\n{text}");
    assert!(!tc.root.join("sixfive-bench-data").exists(), "no cluster of its own");
    tc.ok = true;
}
