//! `sixfive bench kv`: a fresh local three-member cluster of `kv serve` processes with data on
//! disk (or the cluster at `--endpoints`), N concurrent clients, writes/s then linearizable
//! reads/s with latency percentiles, fsyncs per write, group-commit batch sizes and each
//! server's peak RSS. Then the same cluster serving etcd's API (`--api etcd`) gets the load
//! through the `etcd-client` crate; and when `etcd` is on the PATH, a three-member etcd cluster
//! gets that same load through the same client, and the ratios are printed. With
//! `--etcd-endpoints`, only that load, against a running server of etcd's API.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sixfive_kv::KvClient;
use sixfive_runtime::client::{Cluster, random_u64};
use sixfive_runtime::free_port;

/// Options of `bench kv`.
#[derive(clap::Args)]
pub struct Options {
    /// Concurrent clients.
    #[arg(long, default_value_t = 256)]
    pub clients: usize,
    /// Seconds per phase (writes, then reads).
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Measure this running cluster instead of starting one.
    #[arg(long, conflicts_with = "etcd_endpoints")]
    pub endpoints: Option<String>,
    /// Measure this running server of etcd's API (etcd, `kv serve --api etcd`, or any
    /// other) through the `etcd-client` crate, with the load of the etcd rows, instead of
    /// starting clusters.
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// Where the fresh cluster keeps its data (removed afterwards unless --keep).
    #[arg(long, default_value = "sixfive-bench-data")]
    pub data_dir: std::path::PathBuf,
    /// Keep the data directory.
    #[arg(long)]
    pub keep: bool,
    /// No etcd row even when `etcd` is on the PATH.
    #[arg(long)]
    pub no_etcd: bool,
    /// Start the servers with `--sync-delay-us` (every log sync this much longer, as on a
    /// slower disk); no etcd row then, as etcd cannot be slowed alike.
    #[arg(long, default_value_t = 0)]
    pub sync_delay_us: u64,
}

struct Servers {
    children: Vec<Child>,
    metrics: Vec<String>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Holds `dir` for this run (an exclusive `flock` on the directory itself): a second
/// `bench kv` on the same directory would wipe this one's data under its running servers.
fn lock_bench_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let f = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "another `sixfive bench kv` is using {}: wait for it to finish, or give another --data-dir",
            dir.display()
        ));
    }
    Ok(f)
}

fn start_servers(dir: &std::path::Path, o: &Options, api: &str) -> Result<(Servers, Vec<String>), String> {
    let keep = o.keep;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("b{}=http://127.0.0.1:{}", i + 1, p.1))
        .collect::<Vec<_>>()
        .join(",");
    let mut s = Servers { children: Vec::new(), metrics: Vec::new(), dir: dir.to_path_buf(), keep };
    let mut urls = Vec::new();
    for (i, (c, p, m)) in ports.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let child = Command::new(&exe)
            .args(["kv", "serve", "--name", &name])
            .arg(format!("--data-dir={}", dir.join(&name).display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{c}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{m}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-token=bench")
            .arg(format!("--api={api}"))
            .arg(format!("--sync-delay-us={}", o.sync_delay_us))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        s.children.push(child);
        s.metrics.push(format!("127.0.0.1:{m}"));
        urls.push(format!("http://127.0.0.1:{c}"));
    }
    Ok((s, urls))
}

/// A metric's value (summed over label sets) from a server's /metrics.
fn scrape(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return 0.0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Phase {
    ops: u64,
    secs: f64,
    hist: Histogram<u64>,
    /// Requests that failed (etcd's API answers "leader changed" or "unavailable" around an
    /// election; its clients retry, as the load does), and the first failure.
    errors: u64,
    first_error: Option<String>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn row(&self, what: &str) -> String {
        let q = |p: f64| self.hist.value_at_quantile(p) as f64 / 1000.0;
        let errors = match &self.first_error {
            Some(e) => format!(", {} failed and retried, the first: {e}", self.errors),
            None => String::new(),
        };
        format!(
            "{what:<22} {:>10.0} ops/s   p50 {:>7.2} ms   p99 {:>7.2} ms   p99.9 {:>7.2} ms   ({} ops in {:.1} s{errors})",
            self.ops as f64 / self.secs,
            q(0.5),
            q(0.99),
            q(0.999),
            self.ops,
            self.secs
        )
    }
}

/// The latencies of one phase, recorded by all its clients (one thread) into one histogram:
/// one per client (256 of tens of KiB each) made each record a cache miss, a tenth of the
/// bench's own CPU, taken from the servers it shares the machine with.
#[derive(Clone)]
struct Latencies(Rc<RefCell<Histogram<u64>>>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Rc::new(RefCell::new(Histogram::new(3).expect("histogram"))))
    }
}

impl Latencies {
    fn record(&self, d: Duration) {
        self.0.borrow_mut().record(d.as_micros() as u64).expect("auto-resizing histogram");
    }

    fn take(&self) -> Histogram<u64> {
        self.0.borrow().clone()
    }
}

/// The 16 keys client `c` writes and reads, padded to `size` bytes.
fn client_keys(c: usize, size: usize) -> Vec<String> {
    (0..16).map(|slot| format!("{:0>size$}", format!("{c}-{slot}"))).collect()
}

/// Failed requests one etcd-API client tries again before the load gives up (the cluster is
/// down, not electing).
const ERRORS_PER_CLIENT: u64 = 100;

/// How long past a phase's end an operation may go unanswered before the bench gives up.
const STUCK: Duration = Duration::from_secs(20);

async fn phase(cluster: &Cluster, o: &Options, write: bool) -> Phase {
    let deadline = Instant::now() + Duration::from_secs_f64(o.secs);
    let value = "v".repeat(o.value_size);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let value = Rc::new(value);
    let hist = Latencies::default();
    for c in 0..o.clients {
        let mut clerk = cluster.clerk(random_u64());
        let value = value.clone();
        let keys = client_keys(c, o.key_size);
        let h = hist.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut versions = vec![0u64; keys.len()];
            let mut ops = 0u64;
            let mut i = 0usize;
            while Instant::now() < deadline {
                // Each client owns 16 keys: a Put with the version it knows is one round trip.
                let slot = i % versions.len();
                let key = &keys[slot];
                let t = Instant::now();
                // A clerk retries until the cluster answers: if it never does (a server died),
                // the bench stops instead of waiting forever.
                let limit = tokio::time::Instant::from_std(deadline + STUCK);
                let stuck = || panic!("no answer {} s after the phase's end: is a server down?", STUCK.as_secs());
                if write {
                    match tokio::time::timeout_at(limit, clerk.put(key, &value, versions[slot])).await {
                        Ok(Ok(())) => versions[slot] += 1,
                        Ok(Err(e)) => panic!("put {key}: {e}"),
                        Err(_) => stuck(),
                    }
                } else if tokio::time::timeout_at(limit, clerk.get(key)).await.is_err() {
                    stuck();
                }
                h.record(t.elapsed());
                ops += 1;
                i += 1;
            }
            ops
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await.expect("client task");
    }
    Phase { ops, secs: started.elapsed().as_secs_f64(), hist: hist.take(), errors: 0, first_error: None }
}

pub fn run(o: Options) -> ExitCode {
    if o.clients == 0 || o.secs <= 0.0 {
        eprintln!("error: --clients and --secs must be positive");
        return ExitCode::from(2);
    }
    if let Some(e) = &o.etcd_endpoints {
        return etcd_api_at(e, &o);
    }
    let _lock = match &o.endpoints {
        Some(_) => None,
        None => match lock_bench_dir(&o.data_dir) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let (servers, urls) = match &o.endpoints {
        Some(e) => (None, e.split(',').map(str::to_string).collect::<Vec<_>>()),
        None => match start_servers(&o.data_dir.join("sixfive"), &o, "sixfive") {
            Ok((s, u)) => (Some(s), u),
            Err(e) => {
                eprintln!("error: cannot start the servers: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&rt, async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let cluster = loop {
            if let Ok(c) = Cluster::connect(&urls, 500_000).await
                && c.urls.iter().all(|(e, _)| *e < (1 << 32))
            {
                let mut clerk = c.clerk(random_u64());
                if tokio::time::timeout(Duration::from_secs(2), clerk.get("warmup")).await.is_ok() {
                    break c;
                }
            }
            if Instant::now() > deadline {
                return Err("the cluster did not become ready within 30 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let fs0: f64 =
            servers.as_ref().map_or(0.0, |s| s.metrics.iter().map(|m| scrape(m, "sixfive_fsyncs_total")).sum());
        let writes = phase(&cluster, &o, true).await;
        let (fs1, batch_sum, batch_count) = servers.as_ref().map_or((0.0, 0.0, 0.0), |s| {
            (
                s.metrics.iter().map(|m| scrape(m, "sixfive_fsyncs_total")).sum(),
                s.metrics.iter().map(|m| scrape(m, "sixfive_sync_batch_entries_sum")).sum(),
                s.metrics.iter().map(|m| scrape(m, "sixfive_sync_batch_entries_count")).sum(),
            )
        });
        let reads = phase(&cluster, &o, false).await;
        Ok((writes, reads, fs1 - fs0, batch_sum, batch_count))
    });
    let (writes, reads, fsyncs, batch_sum, batch_count) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "sixfive bench kv: 3 members, {} clients, {} s per phase, {} B keys, {} B values, every write fsynced on a majority",
        o.clients, o.secs, o.key_size, o.value_size
    );
    println!("{}", writes.row("sixfive writes (Put)"));
    println!("{}", reads.row("sixfive reads (Get, RI)"));
    if let Some(s) = &servers {
        println!(
            "  fsyncs per write {:.3} (all 3 members)   log entries per sync {:.1}   peak RSS per server: {}",
            fsyncs / writes.ops.max(1) as f64,
            batch_sum / batch_count.max(1.0),
            s.children.iter().map(|c| format!("{} MiB", peak_rss_kib(c.id()) / 1024)).collect::<Vec<_>>().join(", ")
        );
    }
    drop(servers);
    let via_etcd_api = if o.endpoints.is_none() { etcd_api_rows(&o) } else { None };
    if o.endpoints.is_none() && !o.no_etcd && o.sync_delay_us > 0 {
        println!("(no etcd row: --sync-delay-us slows sixfive's disk only)");
    } else if o.endpoints.is_none() && !o.no_etcd {
        etcd_side_by_side(&o, &writes, &reads, via_etcd_api.as_ref());
    }
    if o.endpoints.is_none() && !o.keep {
        let _ = std::fs::remove_dir_all(&o.data_dir);
    }
    ExitCode::SUCCESS
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

/// The etcd load ([`etcd_load`]) against the running server of etcd's API at `endpoints`.
fn etcd_api_at(endpoints: &str, o: &Options) -> ExitCode {
    let urls: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    match etcd_load(&urls, o) {
        Ok((w, r)) => {
            println!(
                "bench kv through the etcd-client crate against {endpoints}: {} clients, {} s per phase, {} B keys, {} B values",
                o.clients, o.secs, o.key_size, o.value_size
            );
            println!("{}", w.row("writes (Put)"));
            println!("{}", r.row("reads (Get, lin.)"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The same sixfive cluster serving etcd's API (`--api etcd`), driven by the etcd load
/// ([`etcd_load`]): the same client library and requests as the etcd row.
fn etcd_api_rows(o: &Options) -> Option<(Phase, Phase)> {
    let (servers, urls) = match start_servers(&o.data_dir.join("etcd-api"), o, "etcd") {
        Ok(s) => s,
        Err(e) => {
            println!("(sixfive with --api etcd: cannot start the servers: {e})");
            return None;
        }
    };
    let result = etcd_load(&urls, o);
    let rss: Vec<String> = servers.children.iter().map(|c| format!("{} MiB", peak_rss_kib(c.id()) / 1024)).collect();
    drop(servers);
    match result {
        Ok((w, r)) => {
            println!("{}", w.row("sixfive --api etcd writes (Put)"));
            println!("{}", r.row("sixfive --api etcd reads (Get, lin.)"));
            println!("  peak RSS per server: {}", rss.join(", "));
            Some((w, r))
        }
        Err(e) => {
            println!("(sixfive with --api etcd: the load failed: {e})");
            None
        }
    }
}

/// The etcd row: a three-member etcd cluster started the same way (same disk, loopback), the
/// same load driven through the `etcd-client` crate ([`etcd_load`]); ratios against sixfive's
/// own protocol and, when measured, against sixfive through etcd's API.
fn etcd_side_by_side(o: &Options, writes: &Phase, reads: &Phase, via_api: Option<&(Phase, Phase)>) {
    let Some(etcd) = on_path("etcd") else {
        println!("(etcd not on the PATH: no side-by-side row; Debian: apt-get install etcd-server)");
        return;
    };
    let dir = o.data_dir.join("etcd");
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!("(etcd: cannot create {}: {e})", dir.display());
        return;
    }
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{}=http://127.0.0.1:{}", i + 1, p.1))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Servers { children: Vec::new(), metrics: Vec::new(), dir: dir.clone(), keep: o.keep };
    for (i, (c, p)) in ports.iter().enumerate() {
        let name = format!("e{}", i + 1);
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).ok();
        let spawned = Command::new(&etcd)
            .args(["--name", &name])
            .arg(format!("--data-dir={}", dir.join(&name).display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{c}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{c}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!("--initial-cluster={initial}"))
            .args(["--initial-cluster-token=bench", "--initial-cluster-state=new"])
            .stdout(Stdio::null())
            .stderr(log.map(Stdio::from).unwrap_or_else(Stdio::null))
            .spawn();
        match spawned {
            Ok(c) => members.children.push(c),
            Err(e) => {
                println!("(etcd: cannot start {name}: {e})");
                return;
            }
        }
    }
    let endpoints: Vec<String> = ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect();
    let result = etcd_load(&endpoints, o);
    let rss: Vec<String> = members.children.iter().map(|c| format!("{} MiB", peak_rss_kib(c.id()) / 1024)).collect();
    drop(members);
    let (etcd_writes, etcd_reads) = match result {
        Ok(r) => r,
        Err(e) => {
            println!("(etcd load failed: {e})");
            return;
        }
    };
    let rows = [
        ("writes", writes, via_api.map(|v| &v.0), &etcd_writes, "etcd writes (Put)"),
        ("reads", reads, via_api.map(|v| &v.1), &etcd_reads, "etcd reads (Get, lin.)"),
    ];
    for (what, ours, api, theirs, label) in rows {
        println!("{}", theirs.row(label));
        let q99 = |p: &Phase| p.hist.value_at_quantile(0.99) as f64;
        println!(
            "  sixfive / etcd: {:.2}x the {what}/s, p99 {:.2}x etcd's",
            ours.rate() / theirs.rate().max(1e-9),
            q99(ours) / q99(theirs).max(1e-9)
        );
        if let Some(api) = api {
            println!(
                "  sixfive --api etcd / etcd (same client): {:.2}x the {what}/s, p99 {:.2}x etcd's",
                api.rate() / theirs.rate().max(1e-9),
                q99(api) / q99(theirs).max(1e-9)
            );
        }
    }
    println!("  etcd peak RSS per member: {}", rss.join(", "));
}

/// The load of [`phase`] against etcd through the `etcd-client` crate: the same number of
/// clients, each Putting its own 16 keys, then linearizable Gets of them (etcd's default).
/// The clients share a few connections, as etcd's own benchmark tool does (`--conns`).
fn etcd_load(endpoints: &[String], o: &Options) -> Result<(Phase, Phase), String> {
    use etcd_client::Client;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut clients = Vec::new();
        while clients.len() < 8 {
            match Client::connect(endpoints, None).await {
                // Ready once a write commits (a leader is elected and a quorum answers).
                Ok(mut c) => {
                    if c.put("warmup", "x", None).await.is_ok() {
                        clients.push(c);
                    }
                }
                Err(e) if Instant::now() > deadline => return Err(format!("etcd did not come up: {e}")),
                Err(_) => {}
            }
            if Instant::now() > deadline {
                return Err("etcd did not become ready within 60 s".into());
            }
            if clients.len() < 8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let value = "v".repeat(o.value_size);
        let local = tokio::task::LocalSet::new();
        let mut out = Vec::new();
        for write in [true, false] {
            let stop = Instant::now() + Duration::from_secs_f64(o.secs);
            let started = Instant::now();
            let mut tasks = Vec::new();
            let hist = Latencies::default();
            for c in 0..o.clients {
                let mut client = clients[c % clients.len()].clone();
                let (value, keys, h) = (value.clone(), client_keys(c, o.key_size), hist.clone());
                tasks.push(local.spawn_local(async move {
                    let (mut ops, mut i, mut errors, mut first_error) = (0u64, 0usize, 0u64, None);
                    while Instant::now() < stop {
                        let key = keys[i % keys.len()].clone();
                        let t = Instant::now();
                        let result = if write {
                            client.put(key, value.clone(), None).await.map(drop).map_err(|e| format!("put: {e}"))
                        } else {
                            client.get(key, None).await.map(drop).map_err(|e| format!("get: {e}"))
                        };
                        if let Err(e) = result {
                            // Counted, and tried again after a pause, as etcd's clients do.
                            errors += 1;
                            first_error.get_or_insert(e);
                            if errors > ERRORS_PER_CLIENT {
                                return Err(first_error.expect("set"));
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        h.record(t.elapsed());
                        ops += 1;
                        i += 1;
                    }
                    Ok::<_, String>((ops, errors, first_error))
                }));
            }
            let (mut ops, mut errors, mut first_error) = (0, 0, None);
            for t in tasks {
                let (n, e, first) = local.run_until(t).await.map_err(|e| e.to_string())??;
                ops += n;
                errors += e;
                first_error = first_error.or(first);
            }
            out.push(Phase { ops, secs: started.elapsed().as_secs_f64(), hist: hist.take(), errors, first_error });
        }
        let reads = out.pop().expect("two phases");
        let writes = out.pop().expect("two phases");
        Ok((writes, reads))
    })
}
