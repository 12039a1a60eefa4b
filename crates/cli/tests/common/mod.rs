//! What the real-process suites share: a cluster of `sixfive kv serve` processes in a scratch
//! directory, started, signalled and killed by the test.
#![allow(dead_code)]

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sixfive_runtime::client::Cluster;

pub const BIN: &str = env!("CARGO_BIN_EXE_sixfive");

pub use sixfive_runtime::free_port;

pub struct Server {
    pub name: String,
    pub host: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: RefCell<Option<Child>>,
}

/// A cluster of `sixfive kv serve` processes in a scratch directory; killed when dropped.
pub struct TestCluster {
    pub root: PathBuf,
    pub servers: Vec<Server>,
    pub initial: String,
    pub token: String,
    pub extra: Vec<String>,
    pub ok: bool,
}

impl TestCluster {
    pub fn new(test: &str, n: usize, extra: &[&str]) -> TestCluster {
        let c = TestCluster::prepare(test, n, extra);
        for i in 0..n {
            c.start(i);
        }
        c
    }

    /// The cluster's directories and ports, nothing started.
    pub fn prepare(test: &str, n: usize, extra: &[&str]) -> TestCluster {
        TestCluster::prepare_on(test, &vec!["127.0.0.1"; n], extra)
    }

    /// As `prepare`, member `i` on address `hosts[i]`.
    pub fn prepare_on(test: &str, hosts: &[&str], extra: &[&str]) -> TestCluster {
        let n = hosts.len();
        let root = std::env::temp_dir().join(format!("sixfive-kv-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let servers: Vec<Server> = (1..=n)
            .map(|i| Server {
                name: format!("n{i}"),
                host: hosts[i - 1].to_string(),
                client_port: free_port(),
                peer_port: free_port(),
                dir: root.join(format!("n{i}")),
                log: root.join(format!("n{i}.log")),
                child: RefCell::new(None),
            })
            .collect();
        let initial = servers
            .iter()
            .map(|s| format!("{}=http://{}:{}", s.name, s.host, s.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        TestCluster {
            root,
            servers,
            initial,
            token: format!("test-{test}"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ok: false,
        }
    }

    pub fn command(&self, i: usize) -> Command {
        self.command_as(i, &self.token)
    }

    pub fn command_as(&self, i: usize, token: &str) -> Command {
        let s = &self.servers[i];
        let mut cmd = Command::new(BIN);
        cmd.args(["kv", "serve", "--name", &s.name])
            .arg(format!("--data-dir={}", s.dir.display()))
            .arg(format!("--listen-client-urls=http://{}:{}", s.host, s.client_port))
            .args(["--listen-peer-urls", &format!("http://{}:{}", s.host, s.peer_port)])
            .arg(format!("--initial-cluster={}", self.initial))
            .args(["--initial-cluster-token", token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(&self.extra)
            // A leader syncs on its own thread whatever the disk (the server's default decides
            // by the disk's speed): these tests put that path under kill -9, partitions,
            // snapshots and a full disk.
            .env("SIXFIVE_SYNC_ELSEWHERE_ABOVE_US", "0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        cmd
    }

    pub fn start(&self, i: usize) {
        assert!(self.servers[i].child.borrow().is_none(), "{} already runs", self.servers[i].name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.servers[i].log).unwrap();
        let child = self.command(i).stderr(log).spawn().unwrap();
        *self.servers[i].child.borrow_mut() = Some(child);
    }

    pub fn signal(&self, i: usize, sig: i32) {
        let pid = self.servers[i].child.borrow().as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    pub fn kill9(&self, i: usize) {
        self.signal(i, libc::SIGKILL);
        self.servers[i].child.borrow_mut().take().unwrap().wait().unwrap();
    }

    /// SIGTERM; waits for the exit.
    pub fn terminate(&self, i: usize) -> ExitStatus {
        self.signal(i, libc::SIGTERM);
        self.servers[i].child.borrow_mut().take().unwrap().wait().unwrap()
    }

    /// Waits for server `i` to exit on its own (panics after `within`).
    pub fn wait_exit(&self, i: usize, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let exited = self.servers[i].child.borrow_mut().as_mut().expect("running").try_wait().unwrap();
            if let Some(st) = exited {
                self.servers[i].child.borrow_mut().take();
                return st;
            }
            assert!(Instant::now() < deadline, "{} did not stop within {within:?}", self.servers[i].name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| format!("http://{}:{}", s.host, s.client_port)).collect()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// Index of the member every running member agrees leads, once one does.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no leader within 30 s");
            if let Ok(cl) = Cluster::connect(&self.urls(), 300_000).await {
                for (e, url) in &cl.urls {
                    if let Ok(st) = cl.transport.status(*e, 300_000).await
                        && st.role == "leader"
                    {
                        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
                        return self.servers.iter().position(|s| s.client_port == port).unwrap();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn connect(&self) -> Cluster {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Cluster::connect(&self.urls(), 500_000).await {
                Ok(c) if c.urls.iter().all(|(e, _)| *e < (1 << 32)) => return c,
                _ => assert!(Instant::now() < deadline, "the cluster did not come up"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestCluster {
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
                eprintln!("---- log of {} ----\n{}", s.name, std::fs::read_to_string(&s.log).unwrap_or_default());
            }
        }
    }
}

pub fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}
