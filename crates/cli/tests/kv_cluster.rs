//! The replicated key/value service as real server processes (`sixfive kv serve`) on loopback
//! TCP with data on disk: histories recorded by clients in this process are checked for
//! linearizability, and every acknowledged write must survive kill -9, SIGSTOP, restarts and
//! snapshot installation. Bad input on both ports must close only that connection.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sixfive_kv::check::{check_appends, check_client_appends, token};
use sixfive_kv::{History, KvClient, Op, OpResult, Record};
use sixfive_rpc::Transport;
use sixfive_rsm::{RsmReply, RsmRequest};
use sixfive_runtime::client::{Cluster, random_u64};

mod common;
use common::{BIN, TestCluster, free_port, run_local};

/// A client that appends its tokens to random keys and reads keys back until `stop`; returns
/// how many appends it made (each acknowledged: the clerk retries until it is).
async fn worker(cluster: Cluster, c: u64, keys: Vec<String>, history: History, stop: Rc<Cell<bool>>) -> u64 {
    let mut clerk = cluster.clerk(random_u64()).with_history(history);
    let mut j = 0;
    let mut i = c as usize;
    while !stop.get() {
        i = i.wrapping_mul(31).wrapping_add(7);
        let key = &keys[i % keys.len()];
        if i.is_multiple_of(3) {
            let r = clerk.get(key).await;
            assert!(matches!(r, Ok(_) | Err(sixfive_kv::KvError::NoKey)), "get: {r:?}");
        } else {
            clerk.append(key, &token(c, j)).await.expect("append is acknowledged");
            j += 1;
        }
    }
    j
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}

/// Runs `clients` workers while `faults` runs; then checks that the history is linearizable
/// and that every client's acknowledged appends are present exactly once, in order. Returns the
/// keys' final values.
async fn workload<F: std::future::Future<Output = ()>>(
    tc: &TestCluster,
    clients: u64,
    nkeys: usize,
    faults: F,
) -> Vec<String> {
    let cluster = tc.connect().await;
    let history = History::default();
    let stop = Rc::new(Cell::new(false));
    let ks = keys(nkeys);
    let handles: Vec<_> = (0..clients)
        .map(|c| tokio::task::spawn_local(worker(cluster.clone(), c, ks.clone(), history.clone(), stop.clone())))
        .collect();
    faults.await;
    stop.set(true);
    let mut counts = Vec::new();
    for h in handles {
        counts.push(h.await.unwrap());
    }
    let mut clerk = cluster.clerk(random_u64());
    let mut values = Vec::new();
    for k in &ks {
        values.push(clerk.get(k).await.map(|(v, _)| v).unwrap_or_default());
    }
    for (c, n) in counts.iter().enumerate() {
        assert!(*n > 0, "client {c} made no progress");
        check_client_appends(&values, c as u64, Some(*n));
    }
    let records = history.records();
    check_appends(&records);
    eprintln!("{} operations checked, appends per client {counts:?}", records.len());
    values
}

#[test]
fn three_nodes_linearizable_history() {
    // With network threads: the layout other than the default (the network on each node's own
    // thread), which every other test here runs.
    let mut tc = TestCluster::new("basic", 3, &["--io-threads=2"]);
    run_local(async {
        workload(&tc, 5, 3, tokio::time::sleep(Duration::from_secs(3))).await;
    });
    tc.ok = true;
}

#[test]
fn kill9_leader_under_load_repeatedly_loses_nothing() {
    let mut tc = TestCluster::new("kill9", 3, &[]);
    run_local(async {
        let faults = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let l = tc.leader().await;
                tc.kill9(l);
                tokio::time::sleep(Duration::from_millis(1200)).await;
                tc.start(l);
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        };
        workload(&tc, 4, 3, faults).await;
    });
    tc.ok = true;
}

/// A Get sent straight to one member (no leader search): `Some(value)` if it answered.
async fn direct_get(cluster: &Cluster, endpoint: u64, key: &str) -> Option<OpResult> {
    let q = postcard::to_allocvec(&Op::Get { key: key.into() }).unwrap();
    let req = postcard::to_allocvec(&RsmRequest::Query(q)).unwrap();
    let reply = cluster.transport.call(endpoint, req, 300_000).await.ok()?;
    match postcard::from_bytes::<RsmReply>(&reply).ok()? {
        RsmReply::Done(r) => postcard::from_bytes(&r).ok(),
        _ => None,
    }
}

#[test]
fn sigstop_leader_answers_nothing_stale() {
    let mut tc = TestCluster::new("sigstop", 3, &[]);
    run_local(async {
        let cluster = tc.connect().await;
        let old = tc.leader().await;
        let old_ep = cluster.endpoints[old];
        let history = History::default();
        let stop = Rc::new(Cell::new(false));
        let ks = keys(1);
        let handles: Vec<_> = (0..3)
            .map(|c| tokio::task::spawn_local(worker(cluster.clone(), c, ks.clone(), history.clone(), stop.clone())))
            .collect();
        // A reader pinned to the old leader: whatever it answers goes into the history.
        let pinned = {
            let (cluster, history, stop) = (cluster.clone(), history.clone(), stop.clone());
            tokio::task::spawn_local(async move {
                let mut answered = 0;
                while !stop.get() {
                    let call = cluster.transport.now();
                    if let Some(r) = direct_get(&cluster, old_ep, "k0").await {
                        answered += 1;
                        let ret = Some(cluster.transport.now());
                        history.push(Record {
                            client: 999,
                            call,
                            ret,
                            op: Op::Get { key: "k0".into() },
                            result: Some(r),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answered
            })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tc.signal(old, libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(2500)).await; // well past the 500-1000 ms election timeout
        tc.signal(old, libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        stop.set(true);
        let mut counts = Vec::new();
        for h in handles {
            counts.push(h.await.unwrap());
        }
        let answered = pinned.await.unwrap();
        assert!(answered > 0, "the pinned reader got no answer at all before the pause");
        let records = history.records();
        check_appends(&records);
        let mut clerk = cluster.clerk(random_u64());
        let v = clerk.get("k0").await.map(|(v, _)| v).unwrap_or_default();
        for (c, n) in counts.iter().enumerate() {
            check_client_appends(std::slice::from_ref(&v), c as u64, Some(*n));
        }
        let now_leader = tc.leader().await;
        eprintln!("old leader {old}, now {now_leader}; {} ops; pinned reads answered {answered}", records.len());
    });
    tc.ok = true;
}

#[test]
fn whole_cluster_restarts_from_disk() {
    let mut tc = TestCluster::new("restart", 3, &[]);
    run_local(async {
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        for i in 0..50 {
            clerk.append(&format!("r{}", i % 5), &format!("<{i}>")).await.unwrap();
        }
        clerk.put("p", "v1", 0).await.unwrap();
        // Graceful stop of every member, the leader first: it hands leadership over; each exits 0.
        let l = tc.leader().await;
        assert!(tc.terminate(l).success(), "the leader did not stop cleanly");
        assert!(tc.log_of(l).contains("leadership handed to member"), "SIGTERM hands leadership over");
        for i in (0..3).filter(|&i| i != l) {
            let st = tc.terminate(i);
            assert!(st.success(), "member {i} did not stop cleanly: {st}");
        }
        for i in 0..3 {
            tc.start(i);
        }
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        for k in 0..5 {
            let want: String = (0..50).filter(|i| i % 5 == k).map(|i| format!("<{i}>")).collect();
            assert_eq!(clerk.get(&format!("r{k}")).await.unwrap().0, want);
        }
        assert_eq!(clerk.get("p").await.unwrap(), ("v1".into(), 1));
        // Power failure of every member at once: acknowledged writes survive too.
        clerk.put("p", "v2", 1).await.unwrap();
        for i in 0..3 {
            tc.kill9(i);
        }
        for i in 0..3 {
            tc.start(i);
        }
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        assert_eq!(clerk.get("p").await.unwrap(), ("v2".into(), 2));
        // A damaged log (not a torn tail) stops the start, naming the file and offset.
        assert!(tc.terminate(0).success());
        let log = tc.servers[0].dir.join("raft/raft.log");
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[12] ^= 0xff;
        std::fs::write(&log, bytes).unwrap();
        let out = tc.command(0).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("raft.log is corrupt at byte"), "{err}");
    });
    tc.ok = true;
}

#[test]
fn snapshot_installs_on_a_member_that_was_down() {
    let mut tc = TestCluster::new("snapshot", 3, &["--snapshot-bytes", "20000"]);
    run_local(async {
        let cluster = tc.connect().await;
        let leader = tc.leader().await;
        let down = (leader + 1) % 3;
        tc.kill9(down);
        let mut clerk = cluster.clerk(random_u64());
        let chunk = "x".repeat(200);
        for i in 0..400 {
            clerk.append(&format!("s{}", i % 10), &chunk).await.unwrap();
        }
        let st = cluster.transport.status(cluster.endpoints[leader], 1_000_000).await.unwrap();
        assert!(st.snapshot_index > 0, "the leader compacted its log: {st:?}");
        tc.start(down);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = cluster.transport.status(cluster.endpoints[down], 500_000).await
                && s.snapshot_index > 0
                && s.applied >= st.commit
            {
                break;
            }
            assert!(Instant::now() < deadline, "the restarted member did not catch up by snapshot");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The member that was down now carries the majority: the data must be whole.
        let other = (0..3).find(|&i| i != down && i != leader).unwrap();
        tc.kill9(other);
        for k in 0..10 {
            let v = clerk.get(&format!("s{k}")).await.unwrap().0;
            assert_eq!(v.len(), 40 * 200, "key s{k}");
        }
    });
    tc.ok = true;
}

/// Sends `bytes` and reports whether the server closed the connection (read returns 0 or an
/// error) within 5 s.
fn closed_after(port: u16, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        }
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut tc = TestCluster::new("bad", 3, &[]);
    run_local(async {
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        clerk.put("safe", "1", 0).await.unwrap();

        // Garbage and oversized frames on both ports of every member.
        let oversized = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        let bad_crc = [3, 0, 0, 0, 1, 2, 3, 4, b'a', b'b', b'c'];
        for s in &tc.servers {
            for port in [s.client_port, s.peer_port] {
                assert!(closed_after(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "garbage on {port}");
                assert!(closed_after(port, &oversized), "oversized frame on {port}");
                assert!(closed_after(port, &bad_crc), "bad checksum on {port}");
            }
        }
        assert_eq!(clerk.get("safe").await.unwrap(), ("1".into(), 1), "the cluster still serves, unchanged");
        assert!(tc.log_of(0).contains("oversized frame"), "the reason is logged");
        assert!(tc.log_of(0).contains("closing client connection"), "the reason is logged");

        // A second server on a data directory in use.
        let out = tc.command(0).stderr(Stdio::piped()).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another server"));

        // An unknown member name.
        let out = Command::new(BIN)
            .args(["kv", "serve", "--name", "zz", "--initial-cluster", &tc.initial])
            .arg(format!("--data-dir={}", tc.root.join("zz").display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not in --initial-cluster"));

        // A member of another cluster dialing n1's peer port is refused with a clear log line.
        let stranger_port = free_port();
        let mut stranger = Command::new(BIN)
            .args(["kv", "serve", "--name", "x0"])
            .arg(format!("--data-dir={}", tc.root.join("x0").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{}", free_port()))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{stranger_port}"))
            .arg(format!(
                "--initial-cluster=x0=http://127.0.0.1:{stranger_port},n1=http://127.0.0.1:{}",
                tc.servers[0].peer_port
            ))
            .args(["--initial-cluster-token", "another"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tc.log_of(0).contains("cluster id mismatch") {
            assert!(Instant::now() < deadline, "n1 did not log the refusal");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stranger.kill();
        let _ = stranger.wait();

        // A member started on another cluster's data is refused.
        let st = tc.terminate(2);
        assert!(st.success());
        let out = tc.command_as(2, "another").output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("another cluster's data"));
        tc.start(2);
        assert_eq!(clerk.get("safe").await.unwrap(), ("1".into(), 1));
    });
    tc.ok = true;
}

/// Mounts a tmpfs of `size` at `dir`; false (with a note) where mounting is not permitted.
fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: cannot mount a tmpfs here (not root, or not permitted): full-disk test skipped");
    }
    ok
}

struct Unmount(Vec<PathBuf>);
impl Drop for Unmount {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(d).status();
        }
    }
}

/// Fills the file system holding `dir` with a ballast file until it has no space left.
fn fill(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("ballast");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    p
}

#[test]
fn full_disk_fails_writes_clearly_loses_nothing_and_recovers() {
    let mut tc = TestCluster::prepare("disk", 3, &[]);
    let mut mounts = Unmount(Vec::new());
    for s in &tc.servers {
        if !mount_tmpfs(&s.dir, "8m") {
            tc.ok = true;
            return;
        }
        mounts.0.push(s.dir.clone());
    }
    for i in 0..3 {
        tc.start(i);
    }
    run_local(async {
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        let mut acked = Vec::new();
        for i in 0..20 {
            clerk.put(&format!("d{i}"), &format!("value {i}"), 0).await.unwrap();
            acked.push(i);
        }
        let ballast: Vec<PathBuf> = tc.servers.iter().map(|s| fill(&s.dir)).collect();
        // Writes now fail: each server's storage refuses, the server stops with the error logged.
        let big = "z".repeat(8192);
        let mut failed = false;
        for i in 20..400 {
            match tokio::time::timeout(Duration::from_secs(3), clerk.put(&format!("d{i}"), &big, 0)).await {
                Ok(Ok(())) => acked.push(i),
                Ok(Err(e)) => panic!("put d{i}: {e}"),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "writes kept succeeding on full disks");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stopped = Vec::new();
        while stopped.is_empty() {
            for (i, s) in tc.servers.iter().enumerate() {
                if let Some(st) = s.child.borrow_mut().as_mut().and_then(|c| c.try_wait().unwrap()) {
                    assert!(!st.success(), "a server whose disk is full exits non-zero");
                    stopped.push(i);
                }
            }
            assert!(Instant::now() < deadline, "no server stopped on its full disk");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for &i in &stopped {
            let log = tc.log_of(i);
            assert!(log.contains("No space left on device"), "the log names the cause:\n{log}");
            tc.servers[i].child.borrow_mut().take();
        }
        // Space freed: the stopped servers restart from their disks and serve again.
        for b in &ballast {
            std::fs::remove_file(b).unwrap();
        }
        for &i in &stopped {
            tc.start(i);
        }
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        for &i in &acked {
            let want = if i < 20 { format!("value {i}") } else { big.clone() };
            assert_eq!(clerk.get(&format!("d{i}")).await.unwrap().0, want, "acknowledged d{i}");
        }
        clerk.put("after", "ok", 0).await.unwrap();
        eprintln!(
            "{} writes acknowledged before the disks filled; servers {stopped:?} stopped and recovered",
            acked.len()
        );
    });
    tc.ok = true;
}

/// Firewall rules that drop traffic between two sets of addresses; removed when dropped.
struct Partition(Vec<(String, String)>);

impl Partition {
    fn iptables(args: &[&str]) -> bool {
        Command::new("iptables")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn available() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        root && Partition::iptables(&["-L", "INPUT", "-n"])
    }

    fn between(a: &[&str], b: &[&str]) -> Partition {
        let mut rules = Vec::new();
        for x in a {
            for y in b {
                for (s, d) in [(x, y), (y, x)] {
                    assert!(Partition::iptables(&["-I", "INPUT", "-s", s, "-d", d, "-j", "DROP"]), "iptables -I");
                    rules.push((s.to_string(), d.to_string()));
                }
            }
        }
        Partition(rules)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for (s, d) in self.0.drain(..) {
            Partition::iptables(&["-D", "INPUT", "-s", &s, "-d", &d, "-j", "DROP"]);
        }
    }
}

#[test]
fn partitioned_leader_answers_nothing_and_the_cluster_converges_after_healing() {
    if !Partition::available() {
        eprintln!("note: not root or no iptables: partition test skipped");
        return;
    }
    let hosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let mut tc = TestCluster::prepare_on("partition", &hosts, &[]);
    for i in 0..3 {
        tc.start(i);
    }
    run_local(async {
        let cluster = tc.connect().await;
        let old = tc.leader().await;
        let old_ep = cluster.endpoints[old];
        let history = History::default();
        let stop = Rc::new(Cell::new(false));
        let ks = keys(2);
        let handles: Vec<_> = (0..3)
            .map(|c| tokio::task::spawn_local(worker(cluster.clone(), c, ks.clone(), history.clone(), stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let others: Vec<&str> = (0..3).filter(|&i| i != old).map(|i| hosts[i]).collect();
        let cut = Partition::between(&[hosts[old]], &others);
        // Give the rules a moment: what the old leader had in flight may still complete.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut stale = Vec::new();
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            if let Some(r) = direct_get(&cluster, old_ep, "k0").await {
                stale.push(r);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stale.is_empty(), "the minority leader answered reads: {stale:?}");
        let during = history.records().len();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(history.records().len() > during, "the majority side makes progress");
        drop(cut);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.set(true);
        let mut counts = Vec::new();
        for h in handles {
            counts.push(h.await.unwrap());
        }
        let mut clerk = cluster.clerk(random_u64());
        let mut values = Vec::new();
        for k in &ks {
            values.push(clerk.get(k).await.map(|(v, _)| v).unwrap_or_default());
        }
        for (c, n) in counts.iter().enumerate() {
            check_client_appends(&values, c as u64, Some(*n));
        }
        check_appends(&history.records());
        // Converged: every member applies the same log.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut applied = Vec::new();
            for e in &cluster.endpoints {
                applied.push(cluster.transport.status(*e, 500_000).await.map(|s| s.applied).unwrap_or(0));
            }
            if applied.iter().all(|a| *a == applied[0] && *a > 0) {
                break;
            }
            assert!(Instant::now() < deadline, "members did not converge: applied {applied:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tc.ok = true;
}

fn cli(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["kv"])
        .args(args)
        .args(["--endpoints", endpoints, "--command-timeout", "10"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// `sixfive kv cluster` as a user runs it: starts, serves the command-line client (exit codes,
/// JSON), stops cleanly on Ctrl-C, and a second run finds the data of the first.
#[test]
fn kv_cluster_command_and_client_exit_codes() {
    let root = std::env::temp_dir().join(format!("sixfive-kv-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let cp: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let pp: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let join = |v: &[u16]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let endpoints = cp.iter().map(|p| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let start = || {
        Command::new(BIN)
            .current_dir(&root)
            .args(["kv", "cluster", "--client-ports", &join(&cp), "--peer-ports", &join(&pp)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_ready = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, out, _) = cli(&endpoints, &["status"]);
            if code == 0 {
                assert!(out.contains("leader"), "{out}");
                return;
            }
            assert_eq!(code, 6, "status exits 6 (unavailable) until ready");
            assert!(Instant::now() < deadline, "the cluster never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut c = start();
    wait_ready();
    assert!(root.join("sixfive-data/n1/raft/raft.log").exists(), "data under ./sixfive-data");
    assert_eq!(cli(&endpoints, &["put", "greeting", "hello"]).0, 0);
    assert_eq!(cli(&endpoints, &["get", "greeting"]), (0, "hello".into(), String::new()));
    let (code, json, _) = cli(&endpoints, &["get", "greeting", "-w", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["value"].as_str(), v["version"].as_u64()), (Some("hello"), Some(1)));
    assert_eq!(cli(&endpoints, &["get", "nothing"]).0, 3, "not found");
    assert_eq!(cli(&endpoints, &["cas", "greeting", "x", "--version", "7"]).0, 4, "version mismatch");
    assert_eq!(cli(&endpoints, &["cas", "greeting", "hi", "--version", "1"]).0, 0);
    assert_eq!(cli(&endpoints, &["append", "greeting", "!"]).1, "hi");
    assert_eq!(cli(&endpoints, &["put", "doomed", "x"]).0, 0);
    assert_eq!(cli(&endpoints, &["del", "doomed"]).0, 0);
    assert_eq!(cli(&endpoints, &["del", "doomed"]).0, 3);
    assert_eq!(cli(&endpoints, &["scan"]).1, "greeting\thi!\t3");
    // Ctrl-C: every server stops cleanly, the command exits 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    assert!(c.wait().unwrap().success());
    let (code, _, err) = cli(&endpoints, &["get", "greeting"]);
    assert_eq!(code, 6, "unavailable once stopped: {err}");
    // Again: the data is still there.
    let mut c = start();
    wait_ready();
    assert_eq!(cli(&endpoints, &["get", "greeting"]).1, "hi!");
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    assert!(c.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&root);
}

/// One plain HTTP GET; the status line's code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// `/metrics` and `/health` on running members: health says 200 while there is a leader and a
/// quorum and 503 once the quorum is gone; the metrics count what the cluster did.
#[test]
fn metrics_and_health_answer_on_running_members() {
    let mut tc = TestCluster::prepare("metrics", 3, &[]);
    let metrics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (i, port) in metrics.iter().enumerate() {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&tc.servers[i].log).unwrap();
        let child =
            tc.command(i).arg(format!("--listen-metrics-urls=http://127.0.0.1:{port}")).stderr(log).spawn().unwrap();
        *tc.servers[i].child.borrow_mut() = Some(child);
    }
    let leader = run_local(async {
        let cluster = tc.connect().await;
        let mut clerk = cluster.clerk(random_u64());
        for i in 0..50 {
            clerk.put(&format!("m{i}"), "v", 0).await.unwrap();
        }
        tc.leader().await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    for &port in &metrics {
        loop {
            let (code, body) = http_get(port, "/health");
            if code == 200 {
                assert!(body.contains("\"health\":\"true\""), "{body}");
                break;
            }
            assert!(Instant::now() < deadline, "member on metrics port {port} never became healthy: {code} {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (code, body) = http_get(metrics[leader], "/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    };
    assert_eq!(value("sixfive_is_leader"), 1.0);
    assert!(value("sixfive_commit_index") >= 50.0, "{body}");
    assert!(value("sixfive_fsyncs_total") > 0.0, "{body}");
    assert!(body.contains("sixfive_fsync_seconds_bucket"), "a latency histogram: {body}");
    assert_eq!(http_get(metrics[leader], "/nope").0, 404);
    // Two members gone: the last one has no quorum, and says so.
    let last = (leader + 1) % 3;
    for i in 0..3 {
        if i != last {
            tc.kill9(i);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _) = http_get(metrics[last], "/health");
        if code == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "health still {code} without a quorum");
        std::thread::sleep(Duration::from_millis(200));
    }
    tc.ok = true;
}

/// The membership as `kv member list -w json` prints it: (name, learner) of each member.
fn member_list(endpoints: &str) -> Vec<(String, bool)> {
    let (code, out, err) = cli(endpoints, &["member", "list", "-w", "json"]);
    assert_eq!(code, 0, "member list: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["learner"].as_bool().unwrap()))
        .collect()
}

/// Kills the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server is lost for good (killed, its data directory deleted) while clients run; a fresh
/// server on another port replaces it: `kv member add`, started with `--initial-cluster-state
/// existing`, catches up by snapshot, is promoted by the leader, and the lost one is removed.
/// The history stays linearizable, nothing acknowledged is lost, and the new member then
/// carries the majority with a founding member restarted with today's member list.
/// (The new server is started before it is added: it is refused with the reason, and joins
/// once added.)
#[test]
fn a_lost_server_is_replaced_under_load() {
    let mut tc = TestCluster::new("replace", 3, &["--snapshot-bytes", "20000"]);
    let (p4, c4) = (free_port(), free_port());
    let n4_log = tc.root.join("n4.log");
    let old = tc.urls().join(",");
    let n4 = std::cell::RefCell::new(None);
    let n2_again = std::cell::RefCell::new(None);
    run_local(async {
        let faults = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tc.kill9(2);
            std::fs::remove_dir_all(&tc.servers[2].dir).unwrap();
            let child = Command::new(BIN)
                .args(["kv", "serve", "--name", "n4"])
                .arg(format!("--data-dir={}", tc.root.join("n4").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{c4}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{p4}"))
                .arg(format!("--initial-cluster={},n4=http://127.0.0.1:{p4}", tc.initial))
                .args(["--initial-cluster-state", "existing", "--initial-cluster-token", &tc.token])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--snapshot-bytes", "20000"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&n4_log).unwrap())
                .spawn()
                .unwrap();
            *n4.borrow_mut() = Some(KillOnDrop(child));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&n4_log).unwrap_or_default().contains("no member named n4") {
                assert!(Instant::now() < deadline, "n4 was not refused before it was added");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (code, out, err) =
                cli(&old, &["member", "add", "n4", "--peer-urls", &format!("http://127.0.0.1:{p4}")]);
            assert_eq!(code, 0, "member add: {out} {err}");
            assert!(out.contains("SIXFIVE_INITIAL_CLUSTER_STATE=\"existing\""), "{out}");
            // Refused with the reason: a second member under the same name or address.
            let (code, _, err) = cli(&old, &["member", "add", "n4", "--peer-urls", "http://127.0.0.1:1"]);
            assert!(code == 1 && err.contains("exists already"), "{code} {err}");
            // The leader promotes it once it has caught up.
            let deadline = Instant::now() + Duration::from_secs(40);
            while !member_list(&old).contains(&("n4".into(), false)) {
                let log = std::fs::read_to_string(&n4_log).unwrap_or_default();
                assert!(Instant::now() < deadline, "n4 was not promoted: {:?}\n{log}", member_list(&old));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (code, _, err) = cli(&old, &["member", "remove", "n3"]);
            assert_eq!(code, 0, "member remove: {err}");
            tokio::time::sleep(Duration::from_millis(1500)).await;
        };
        let values = workload(&tc, 4, 3, faults).await;
        let (code, _, err) = cli(&old, &["member", "remove", "n3"]);
        assert!(code == 3 && err.contains("no member"), "removing an unknown member: {code} {err}");
        let members = member_list(&old);
        assert_eq!(members, vec![("n1".into(), false), ("n2".into(), false), ("n4".into(), false)]);
        let new = format!("http://127.0.0.1:{c4}");
        let cluster = Cluster::connect(std::slice::from_ref(&new), 1_000_000).await.unwrap();
        let st = cluster.transport.status(cluster.endpoints[0], 1_000_000).await.unwrap();
        assert!(st.snapshot_index > 0, "n4 caught up by snapshot: {st:?}");
        let log = std::fs::read_to_string(&n4_log).unwrap();
        assert!(log.contains("joined the cluster as a learner"), "{log}");
        // A client given one member's URL learns the others' (n4's too).
        let from_one = Cluster::connect(&tc.urls()[..1], 1_000_000).await.unwrap();
        assert_eq!(from_one.endpoints, vec![1, 2, 4], "{:?}", from_one.urls);
        assert!(from_one.urls.contains(&(4, format!("127.0.0.1:{c4}"))), "{:?}", from_one.urls);
        // n2, a founding member, restarts with today's member list (in an order that would
        // make it id 1) and no token: its data directory says who it is, as with etcd.
        assert!(tc.terminate(1).success());
        let (n2, n2_log) = (&tc.servers[1], tc.root.join("n2-again.log"));
        let today = format!(
            "n2=http://127.0.0.1:{},n1=http://127.0.0.1:{},n4=http://127.0.0.1:{p4}",
            n2.peer_port, tc.servers[0].peer_port
        );
        let again = Command::new(BIN)
            .args(["kv", "serve", "--name", "n2", "--initial-cluster", &today])
            .arg(format!("--data-dir={}", n2.dir.display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{}", n2.client_port))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", n2.peer_port))
            .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--snapshot-bytes", "20000"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&n2_log).unwrap())
            .spawn()
            .unwrap();
        *n2_again.borrow_mut() = Some(KillOnDrop(again));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&n2_log).unwrap_or_default();
            let exited = n2_again.borrow_mut().as_mut().unwrap().0.try_wait().unwrap();
            assert!(exited.is_none(), "n2 did not restart ({exited:?}):\n{log}");
            let rejoined = match Cluster::connect(std::slice::from_ref(&tc.urls()[1]), 1_000_000).await {
                Ok(c) => c.transport.status(c.endpoints[0], 1_000_000).await.is_ok_and(|st| st.leader.is_some()),
                Err(_) => false,
            };
            if rejoined {
                break;
            }
            assert!(Instant::now() < deadline, "n2 did not rejoin the cluster:\n{log}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // n4 now carries the majority with n2.
        tc.kill9(0);
        let cluster = Cluster::connect(&[tc.urls()[1].clone(), new], 1_000_000).await.unwrap();
        let mut clerk = cluster.clerk(random_u64());
        assert!(values.iter().any(|v| !v.is_empty()));
        let read_all = async {
            for (i, want) in values.iter().enumerate() {
                let got = match clerk.get(&format!("k{i}")).await {
                    Err(sixfive_kv::KvError::NoKey) => String::new(),
                    r => r.unwrap().0,
                };
                assert_eq!(&got, want, "key k{i}");
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read_all).await.expect("n2 and n4 serve every key");
    });
    let log = std::fs::read_to_string(tc.root.join("n2-again.log")).unwrap();
    assert!(log.contains("ignored: the data directory is member 2"), "{log}");
    drop((n4, n2_again));
    tc.ok = true;
}

/// `bench kv` starts its clusters, prints every row with a rate, and holds its directory: a
/// second run on it is refused instead of wiping the first one's servers.
#[test]
fn bench_kv_prints_its_rows_and_refuses_a_second_run_on_its_directory() {
    let dir = std::env::temp_dir().join(format!("sixfive-bench-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = Command::new(BIN)
        .args(["bench", "kv", "--secs", "1", "--clients", "16", "--no-etcd"])
        .arg(format!("--data-dir={}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first run holds the directory from its start until it ends.
    std::thread::sleep(Duration::from_millis(500));
    let second = Command::new(BIN)
        .args(["bench", "kv", "--secs", "1", "--no-etcd"])
        .arg(format!("--data-dir={}", dir.display()))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another `sixfive bench kv` is using"));
    let out = first.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for row in [
        "sixfive writes (Put)",
        "sixfive reads (Get, RI)",
        "sixfive --api etcd writes (Put)",
        "sixfive --api etcd reads (Get, lin.)",
    ] {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row:?} row in\n{text}"));
        let rate: f64 = line[row.len()..].split_whitespace().next().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{line}");
    }
    assert!(text.contains("fsyncs per write"), "{text}");
    assert!(!dir.exists(), "the bench removes its data when done");
}
