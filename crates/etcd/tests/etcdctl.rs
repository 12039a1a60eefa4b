//! etcdctl (Debian's `etcd-client`), unmodified, against the service on an in-process replica:
//! what an etcd operator types works on sixfive. Skipped with a note when etcdctl is absent.

use std::process::{Command as Proc, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sixfive_etcd::{Config, EtcdService, LocalReplica, ServiceConfig};

fn have_etcdctl() -> bool {
    Proc::new("etcdctl").arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

struct Ctl {
    endpoint: String,
}

impl Ctl {
    fn cmd(&self, args: &[&str]) -> Proc {
        let mut p = Proc::new("etcdctl");
        p.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoint)).args(args);
        p
    }

    /// Runs etcdctl; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        self.run_in(args, "")
    }

    fn run_in(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child =
            self.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
        (status.success(), String::from_utf8_lossy(&stdout).into(), String::from_utf8_lossy(&stderr).into())
    }

    /// Runs etcdctl and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "etcdctl {args:?} failed: {err}");
        out
    }
}

/// Runs a long-lived etcdctl until its output ends with `want` (or 20 s pass), then stops it;
/// returns what it printed.
fn read_until(mut cmd: Proc, want: &str) -> String {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&out).ends_with(want) && std::time::Instant::now() < deadline {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
            out.extend(b);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&out).into()
}

#[test]
fn etcdctl_works_against_sixfive() {
    if !have_etcdctl() {
        println!("etcdctl is not on the PATH (Debian: etcd-client); skipped");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let replica = Arc::new(LocalReplica::new(Config::default()));
    rt.spawn(EtcdService::new(replica, ServiceConfig::default()).serve(listener, std::future::pending()));
    let ctl = Ctl { endpoint };

    // KV.
    assert_eq!(ctl.ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ctl.ok(&["put", "foo2", "baz"]), "OK\n");
    assert_eq!(ctl.ok(&["get", "foo"]), "foo\nbar\n");
    assert_eq!(ctl.ok(&["get", "foo", "--prefix"]), "foo\nbar\nfoo2\nbaz\n");
    assert_eq!(ctl.ok(&["get", "f", "--prefix", "--keys-only", "--limit=1"]), "foo\n\n");
    let json = ctl.ok(&["get", "foo", "--prefix", "-w", "json"]);
    assert!(json.contains(r#""count":2"#) && json.contains(r#""key":"Zm9v""#), "{json}");
    assert_eq!(ctl.ok(&["put", "foo", "new"]), "OK\n");
    assert_eq!(ctl.ok(&["get", "foo", "--rev=2"]), "foo\nbar\n", "a read at a past revision");
    let txn = ctl.run_in(&["txn"], "value(\"foo2\") = \"baz\"\n\nput foo2 qux\n\nget foo2\n\n");
    assert!(txn.0, "{}", txn.2);
    assert_eq!(txn.1, "SUCCESS\n\nOK\n");
    assert_eq!(ctl.ok(&["get", "foo2"]), "foo2\nqux\n");
    assert_eq!(ctl.ok(&["del", "foo"]), "1\n");
    assert_eq!(ctl.ok(&["get", "foo"]), "");

    // Watch from a past revision replays history.
    let out = read_until(ctl.cmd(&["watch", "foo2", "--rev=1"]), "PUT\nfoo2\nbaz\nPUT\nfoo2\nqux\n");
    assert_eq!(out, "PUT\nfoo2\nbaz\nPUT\nfoo2\nqux\n");

    // Leases.
    let grant = ctl.ok(&["lease", "grant", "60"]);
    let id = grant.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(grant, format!("lease {id} granted with TTL(60s)\n"));
    assert_eq!(ctl.ok(&["put", "leased", "v", &format!("--lease={id}")]), "OK\n");
    let ttl = ctl.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")), "{ttl}");
    assert!(ttl.ends_with("attached keys([leased])\n"), "{ttl}");
    assert_eq!(ctl.ok(&["lease", "keep-alive", "--once", &id]), format!("lease {id} keepalived with TTL(60)\n"));
    assert_eq!(ctl.ok(&["lease", "list"]), format!("found 1 leases\n{id}\n"));
    assert_eq!(ctl.ok(&["lease", "revoke", &id]), format!("lease {id} revoked\n"));
    assert_eq!(ctl.ok(&["get", "leased"]), "", "revoking deletes the lease's keys");

    // Compaction and its error.
    assert_eq!(ctl.ok(&["compaction", "3"]), "compacted revision 3\n");
    let (ok, _, err) = ctl.run(&["get", "foo", "--rev=2"]);
    assert!(!ok && err.contains("etcdserver: mvcc: required revision has been compacted"), "{err}");

    // Cluster and maintenance.
    assert_eq!(ctl.ok(&["member", "list"]), "1, started, default, , , false\n");
    let status = ctl.ok(&["endpoint", "status"]);
    assert!(status.contains("3.6.0") && status.contains("true"), "{status}");
    let (ok, _, health) = ctl.run(&["endpoint", "health"]);
    assert!(ok && health.contains("is healthy"), "{health}");

    // `lock`: two etcdctl processes contend; the second runs only after the first released.
    let log = std::env::temp_dir().join(format!("sixfive-etcdctl-lock-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let l = log.display().to_string();
    let a = ctl
        .cmd(&["lock", "mylock", "--", "sh", "-c", &format!("echo A-in >> {l}; sleep 1; echo A-out >> {l}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // B starts once A holds the lock.
    for _ in 0..1000 {
        if std::fs::read_to_string(&log).is_ok_and(|s| s.contains("A-in")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, _, err) = ctl.run(&["lock", "mylock", "--", "sh", "-c", &format!("echo B-in >> {l}")]);
    assert!(ok, "{err}");
    assert!(a.wait_with_output().unwrap().status.success());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "A-in\nA-out\nB-in\n", "the lock excludes");
    let _ = std::fs::remove_file(&log);

    // `elect`: a candidate wins; an observer sees its proposal.
    let mut cand = ctl.cmd(&["elect", "myelection", "p1"]).stdout(Stdio::null()).spawn().unwrap();
    let seen = read_until(ctl.cmd(&["elect", "-l", "myelection"]), "\np1\n");
    let _ = cand.kill();
    let _ = cand.wait();
    assert!(seen.starts_with("myelection/") && seen.ends_with("\np1\n"), "{seen}");
}
