//! The sharded key/value service as real processes (`sixfive shardkv serve`) on loopback TCP
//! with data on disk: a controller group and replica groups of three servers each. Keys are
//! written, a group joins and another leaves (through the `shardkv ctl` commands) while clients
//! run, and a group leader and the controller's leader are killed with kill -9 and restarted; every key must still be there, every
//! client's acknowledged appends present exactly once, and the whole recorded history
//! linearizable.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sixfive_kv::check::{check_client_appends, check_store, token};
use sixfive_kv::{History, KvClient, KvError};
use sixfive_runtime::client::random_u64;
use sixfive_runtime::shard::{ShardTransport, endpoint_of_url};
use sixfive_shardkv::{Gid, ShardClerk};

mod common;
use common::{BIN, free_port};

struct Server {
    gid: Gid, // 0: controller
    name: String,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: RefCell<Option<Child>>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A controller group and replica groups of `shardkv serve` processes in a scratch directory;
/// killed when dropped (their logs printed if the test failed).
struct Deployment {
    root: PathBuf,
    servers: Vec<Server>,
    ok: bool,
}

impl Deployment {
    fn new(test: &str, gids: &[Gid]) -> Deployment {
        let root = std::env::temp_dir().join(format!("sixfive-shardkv-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut servers = Vec::new();
        for &g in std::iter::once(&0).chain(gids) {
            for i in 1..=3 {
                let name = if g == 0 { format!("c{i}") } else { format!("g{g}s{i}") };
                servers.push(Server {
                    gid: g,
                    port: free_port(),
                    dir: root.join(&name),
                    log: root.join(format!("{name}.log")),
                    name,
                    child: RefCell::new(None),
                });
            }
        }
        let d = Deployment { root, servers, ok: false };
        for i in 0..d.servers.len() {
            d.start(i);
        }
        d
    }

    fn urls(&self, gid: Gid) -> String {
        self.servers.iter().filter(|s| s.gid == gid).map(Server::url).collect::<Vec<_>>().join(",")
    }

    fn start(&self, i: usize) {
        let s = &self.servers[i];
        assert!(s.child.borrow().is_none(), "{} already runs", s.name);
        let initial = self
            .servers
            .iter()
            .filter(|o| o.gid == s.gid)
            .map(|o| format!("{}={}", o.name, o.url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(BIN);
        cmd.args(["shardkv", "serve", "--name", &s.name]).arg(format!("--data-dir={}", s.dir.display()));
        if s.gid == 0 {
            cmd.args(["--role", "ctrler"]);
        } else {
            cmd.args(["--role", "group", "--gid", &s.gid.to_string(), "--ctrler-endpoints", &self.urls(0)]);
        }
        cmd.args(["--listen-peer-urls", &s.url()])
            .arg(format!("--initial-cluster={initial}"))
            .args(["--initial-cluster-token", "test-shardkv"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&s.log).unwrap();
        *s.child.borrow_mut() = Some(cmd.stderr(log).spawn().unwrap());
    }

    fn kill9(&self, i: usize) {
        let mut c = self.servers[i].child.borrow_mut().take().expect("running");
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGKILL) }, 0);
        c.wait().unwrap();
    }

    /// Runs `sixfive shardkv ARGS --ctrlers ...`: (exit code, stdout).
    fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .arg("shardkv")
            .args(args)
            .args(["--ctrlers", &self.urls(0), "--command-timeout", "10"])
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn clerk(&self) -> ShardClerk<ShardTransport> {
        let ctrlers = self.urls(0).split(',').map(|u| endpoint_of_url(u).unwrap()).collect();
        ShardClerk::new(ShardTransport::new(), ctrlers, random_u64())
    }

    /// Index of the server of group `gid` that leads it (as it says itself).
    async fn leader_of(&self, gid: Gid) -> usize {
        let t = ShardTransport::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "group {gid} has no leader within 30 s");
            for (i, s) in self.servers.iter().enumerate().filter(|(_, s)| s.gid == gid) {
                if let Ok(st) = t.status(endpoint_of_url(&s.url()).unwrap(), 300_000).await
                    && st.role == "leader"
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `shardkv status` reports every shard served at the latest configuration and
    /// no migration in progress (its exit code 0); returns its JSON.
    async fn settled(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, out) = self.cli(&["status", "-w", "json"]);
            if code == 0 {
                return serde_json::from_str(&out).unwrap();
            }
            assert!(Instant::now() < deadline, "the deployment did not settle within 60 s:\n{out}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for s in &self.servers {
            if let Some(mut c) = s.child.borrow_mut().take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if self.ok {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            for s in &self.servers {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- last lines of {} ----", s.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Appends its tokens to keys and reads keys back until `stop`; returns how many appends it
/// made (each acknowledged).
async fn worker(mut clerk: ShardClerk<ShardTransport>, c: u64, keys: Vec<String>, stop: Rc<Cell<bool>>) -> u64 {
    let (mut j, mut i) = (0, c as usize);
    while !stop.get() {
        i = i.wrapping_mul(31).wrapping_add(7);
        let key = &keys[i % keys.len()];
        if i.is_multiple_of(3) {
            let r = clerk.get(key).await;
            assert!(matches!(r, Ok(_) | Err(KvError::NoKey)), "get: {r:?}");
        } else {
            clerk.append(key, &token(c, j)).await.expect("append is acknowledged");
            j += 1;
        }
    }
    j
}

#[test]
fn join_leave_and_kill9_under_load_lose_nothing() {
    let mut d = Deployment::new("reconfig", &[1, 2, 3, 4]);
    run_local(async {
        // Groups 1-3 join through the CLI (group 4 runs but is not in any configuration yet).
        for g in [1, 2, 3] {
            let (code, out) = d.cli(&["ctl", "join", &g.to_string(), &d.urls(g)]);
            assert_eq!(code, 0, "join {g}: {out}");
        }
        let history = History::default();
        // Keys written before any change.
        let mut writer = d.clerk().with_history(history.clone());
        let initial: BTreeMap<String, String> = (0..60).map(|i| (format!("init{i}"), format!("v{i}"))).collect();
        for (k, v) in &initial {
            writer.put(k, v, 0).await.expect("put of a new key");
        }
        // Clients run through every change below.
        let stop = Rc::new(Cell::new(false));
        let keys: Vec<String> = (0..8).map(|i| format!("busy{i}")).collect();
        let workers: Vec<_> = (0..4)
            .map(|c| {
                let clerk = d.clerk().with_history(history.clone());
                tokio::task::spawn_local(worker(clerk, c, keys.clone(), stop.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (code, out) = d.cli(&["ctl", "join", "4", &d.urls(4)]);
        assert_eq!(code, 0, "join 4: {out}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let victim = d.leader_of(2).await;
        eprintln!("kill -9 {} (leader of group 2)", d.servers[victim].name);
        d.kill9(victim);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, out) = d.cli(&["ctl", "leave", "1"]);
        assert_eq!(code, 0, "leave 1: {out}");
        // The controller's leader too, while the groups poll it to move through the leave.
        let ctrl = d.leader_of(0).await;
        eprintln!("kill -9 {} (leader of the controller)", d.servers[ctrl].name);
        d.kill9(ctrl);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        d.start(victim);
        d.start(ctrl);
        let status = d.settled().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.set(true);
        let mut counts = Vec::new();
        for w in workers {
            counts.push(w.await.unwrap());
        }

        // Group 1 serves nothing and holds nothing after it left; groups 2-4 serve everything.
        let shards = status["shards"].as_array().unwrap();
        assert!(shards.iter().all(|s| [2, 3, 4].contains(&s["group"].as_u64().unwrap())), "{status}");
        assert!(shards.iter().any(|s| s["group"] == 4), "group 4 got shards: {status}");
        let (code, out) = d.cli(&["ctl", "query", "-w", "json"]);
        assert_eq!(code, 0);
        let latest: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(latest["groups"].get("1").is_none(), "group 1 left: {out}");
        let t = ShardTransport::new();
        for s in d.servers.iter().filter(|s| s.gid == 1) {
            let info = t.info(endpoint_of_url(&s.url()).unwrap(), 1_000_000).await.expect("group 1 answers");
            assert_eq!(info.keys.iter().sum::<usize>(), 0, "{} deleted the shards it gave away", s.name);
        }

        // Every key is still there, every acknowledged append exactly once, in order.
        let mut reader = d.clerk().with_history(history.clone());
        for (k, v) in &initial {
            assert_eq!(reader.get(k).await.map(|(v, _)| v), Ok(v.clone()), "{k}");
        }
        let mut values = Vec::new();
        for k in &keys {
            values.push(reader.get(k).await.map(|(v, _)| v).unwrap_or_default());
        }
        for (c, n) in counts.iter().enumerate() {
            assert!(*n > 0, "client {c} made no progress");
            check_client_appends(&values, c as u64, Some(*n));
        }
        // A scan across shards returns the keys in order.
        let all = reader.scan("init", Some("init~"), 1000).await.unwrap();
        let mut want: Vec<&String> = initial.keys().collect();
        want.sort();
        assert_eq!(all.iter().map(|(k, _, _)| k).collect::<Vec<_>>(), want);

        let records = history.records();
        check_store(&records);
        eprintln!("{} operations checked; appends per client {counts:?}", records.len());

        // Client exit codes: not found is 3; a bad change is refused and makes no configuration.
        assert_eq!(d.cli(&["get", "no-such-key"]).0, 3);
        let (code, _) = d.cli(&["ctl", "move", "0", "99"]);
        assert_eq!(code, 1, "a move to an unknown group is refused");
        let (_, after) = d.cli(&["ctl", "query", "-w", "json"]);
        let after: serde_json::Value = serde_json::from_str(&after).unwrap();
        assert_eq!(after["num"], latest["num"], "the refused move made no configuration");
    });
    d.ok = true;
}

impl Deployment {
    /// SIGTERM to server `i`; true if it exited 0.
    fn terminate(&self, i: usize) -> bool {
        let mut c = self.servers[i].child.borrow_mut().take().expect("running");
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
        c.wait().unwrap().success()
    }

    fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }
}

/// Writes `bytes` to `port` and waits for the server to close the connection.
fn closed_after(port: u16, bytes: &[u8]) -> bool {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn whole_deployment_restarts_from_disk_and_bad_input_changes_nothing() {
    let mut d = Deployment::new("restart", &[1, 2]);
    run_local(async {
        for g in [1, 2] {
            let (code, out) = d.cli(&["ctl", "join", &g.to_string(), &d.urls(g)]);
            assert_eq!(code, 0, "join {g}: {out}");
        }
        let mut clerk = d.clerk();
        for i in 0..40 {
            clerk.put(&format!("k{i}"), &format!("v{i}"), 0).await.unwrap();
        }
        let before = d.settled().await;
        // Graceful stop of every server (exit 0), then all of them again from their data.
        for i in 0..d.servers.len() {
            assert!(d.terminate(i), "{} stops cleanly on SIGTERM", d.servers[i].name);
        }
        for i in 0..d.servers.len() {
            d.start(i);
        }
        let after = d.settled().await;
        assert_eq!(before["config"], after["config"], "the configuration survived the restart");
        let mut clerk = d.clerk();
        for i in 0..40 {
            assert_eq!(clerk.get(&format!("k{i}")).await.map(|(v, _)| v), Ok(format!("v{i}")));
        }

        // Garbage, an oversized frame and a bad checksum close only that connection.
        let g1 = d.servers.iter().position(|s| s.gid == 1).unwrap();
        let port = d.servers[g1].port;
        assert!(closed_after(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        let mut oversized = u32::MAX.to_le_bytes().to_vec();
        oversized.extend_from_slice(&[0; 12]);
        assert!(closed_after(port, &oversized));
        let mut bad_crc = 4u32.to_le_bytes().to_vec();
        bad_crc.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(closed_after(port, &bad_crc));
        assert_eq!(clerk.get("k1").await.map(|(v, _)| v), Ok("v1".into()), "still serving");

        // A second server on a data directory in use is refused.
        let s = &d.servers[g1];
        let out = Command::new(BIN)
            .args(["shardkv", "serve", "--role", "group", "--gid", "1", "--name", &s.name])
            .arg(format!("--data-dir={}", s.dir.display()))
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", free_port())])
            .args(["--ctrler-endpoints", &d.urls(0)])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));

        // Usage errors: exit 2 with a reason, nothing started.
        let usage = |args: &[&str]| {
            let out = Command::new(BIN).args(["shardkv", "serve"]).args(args).output().unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (code, err) = usage(&["--role", "group", "--data-dir", "/nonexistent/x"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--gid"), "{err}");
        let (code, err) =
            usage(&["--role", "ctrler", "--listen-peer-urls", "http://localhost:1", "--data-dir", "/nonexistent/x"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("IPv4"), "{err}");

        // A server of another deployment (another token) is refused by the servers it dials.
        let port = free_port();
        let intruder_dir = d.root.join("intruder");
        let others: Vec<String> =
            d.servers.iter().filter(|s| s.gid == 1).skip(1).map(|s| format!("{}={}", s.name, s.url())).collect();
        let mut intruder = Command::new(BIN)
            .args(["shardkv", "serve", "--role", "group", "--gid", "1", "--name", "x"])
            .arg(format!("--data-dir={}", intruder_dir.display()))
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{port}")])
            .arg(format!("--initial-cluster=x=http://127.0.0.1:{port},{}", others.join(",")))
            .args(["--ctrler-endpoints", &d.urls(0), "--initial-cluster-token", "another"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let refused = loop {
            if (g1 + 1..g1 + 3).any(|i| d.log_of(i).contains("cluster id mismatch")) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = intruder.kill();
        let _ = intruder.wait();
        assert!(refused, "the servers of group 1 log the refusal of the other deployment's server");
        assert_eq!(clerk.get("k2").await.map(|(v, _)| v), Ok("v2".into()), "still serving");
    });
    d.ok = true;
}
