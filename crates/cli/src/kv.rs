//! `sixfive kv ...`: the replicated key/value service as real processes, and its command-line
//! client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use sixfive_kv::{KvClient, KvError};
use sixfive_runtime::client::{Cluster, random_u64};
use sixfive_runtime::members::{ChangeError, MemberEntry, MemberOp};
use sixfive_runtime::server::{RawConfig, ServeConfig, serve};

/// The client endpoints of the cluster that `sixfive kv cluster` starts with its defaults.
pub const LOCAL_ENDPOINTS: &str = "http://127.0.0.1:2379,http://127.0.0.1:22379,http://127.0.0.1:32379";
const CLIENT_PORTS: [u16; 6] = [2379, 22379, 32379, 42379, 52379, 62379];
const PEER_PORTS: [u16; 6] = [2380, 22380, 32380, 42380, 52380, 62380];

/// Exit codes of the client commands.
pub mod exit {
    /// A usage error (as clap reports them).
    pub const USAGE: u8 = 2;
    /// The key does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// A compare-and-swap found another version.
    pub const VERSION_MISMATCH: u8 = 4;
    /// A write was sent but no answer came in time: it may or may not have been applied.
    pub const MAYBE_APPLIED: u8 = 5;
    /// No server answered (or no leader could answer) in time; nothing was written.
    pub const UNAVAILABLE: u8 = 6;
}

#[derive(Subcommand)]
pub enum KvCommand {
    /// Runs one replica (flags as etcd's; each also from a SIXFIVE_* variable and --config-file).
    Serve(Box<ServeArgs>),
    /// Starts a local cluster of server processes with data under ./sixfive-data; Ctrl-C stops
    /// them all cleanly; running it again reuses the data.
    Cluster(ClusterArgs),
    /// Stores VALUE under KEY (whatever its version).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Prints KEY's value and version (exit 3 if there is no such key).
    Get {
        /// Key.
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Removes KEY (exit 3 if there is no such key).
    Del {
        /// Key.
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Lists keys from START (inclusive) to --end (exclusive), in order.
    Scan {
        /// First key (default: the first).
        #[arg(default_value = "")]
        start: String,
        /// End key (exclusive; default: to the last key).
        #[arg(long)]
        end: Option<String>,
        /// Most entries.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Appends SUFFIX to KEY's value exactly once (creating it); prints the old value.
    Append {
        /// Key.
        key: String,
        /// Suffix.
        suffix: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Compare-and-swap: stores VALUE under KEY only if KEY's version is --version (0: only if
    /// KEY does not exist); exit 4 on another version.
    Cas {
        /// Key.
        key: String,
        /// New value.
        value: String,
        /// Expected current version.
        #[arg(long)]
        version: u64,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Every member's role, term, indexes and disk use; exits 0 only when the cluster has a
    /// leader and answers a linearizable read.
    Status {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Lists, adds, promotes and removes members (see the README's operations section).
    #[command(subcommand)]
    Member(MemberCommand),
}

/// `kv member ...`.
#[derive(Subcommand)]
pub enum MemberCommand {
    /// Every member: id, name, voter or learner, peer and client URLs, and the leader.
    List {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Adds member NAME, reached by its peers at --peer-urls; it joins as a learner and the
    /// leader promotes it to voter once it has caught up (with --learner: once promoted by
    /// hand). Prints the settings to start it with (`--initial-cluster-state existing`).
    Add {
        /// The new member's name (its --name).
        name: String,
        /// Its peer URL (its --initial-advertise-peer-urls).
        #[arg(long)]
        peer_urls: String,
        /// Leave it a learner until `kv member promote`.
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Promotes learner MEMBER (a name or an id) to voter; refused while it lags the leader.
    Promote {
        /// Name or id.
        member: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Removes MEMBER (a name or an id) from the cluster; a removed server stops.
    Remove {
        /// Name or id.
        member: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

/// Options of every client command.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Client URLs of the cluster's members (default: the local cluster of `kv cluster`).
    #[arg(long, env = "SIXFIVE_ENDPOINTS", default_value = LOCAL_ENDPOINTS)]
    pub endpoints: String,
    /// Output format.
    #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Simple)]
    pub write_out: Output,
    /// Seconds to wait for an answer before giving up.
    #[arg(long, env = "SIXFIVE_COMMAND_TIMEOUT", default_value_t = 5.0)]
    pub command_timeout: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Simple,
    /// One JSON document.
    Json,
}

/// `kv serve`'s flags: etcd's names. Each is also read from the environment variable
/// SIXFIVE_ followed by its name in capitals (e.g. SIXFIVE_DATA_DIR), then from --config-file; a flag wins over the
/// variable, the variable over the file.
#[derive(Args)]
pub struct ServeArgs {
    /// Human-readable name of this member; must appear in --initial-cluster [default: default].
    #[arg(long, env = "SIXFIVE_NAME")]
    name: Option<String>,
    /// Directory of this member's data (write-ahead log, snapshot) [default: NAME.sixfive, NAME being --name].
    #[arg(long, env = "SIXFIVE_DATA_DIR")]
    data_dir: Option<String>,
    /// URLs to listen on for clients, comma-separated [default: http://127.0.0.1:2379].
    #[arg(long, env = "SIXFIVE_LISTEN_CLIENT_URLS")]
    listen_client_urls: Option<String>,
    /// Client URLs to tell others about [default: --listen-client-urls].
    #[arg(long, env = "SIXFIVE_ADVERTISE_CLIENT_URLS")]
    advertise_client_urls: Option<String>,
    /// URLs to listen on for peer traffic [default: http://127.0.0.1:2380].
    #[arg(long, env = "SIXFIVE_LISTEN_PEER_URLS")]
    listen_peer_urls: Option<String>,
    /// This member's peer URLs as the other members reach them [default: --listen-peer-urls].
    #[arg(long, env = "SIXFIVE_INITIAL_ADVERTISE_PEER_URLS")]
    initial_advertise_peer_urls: Option<String>,
    /// Every member of a new cluster: name=http://host:port,... (the same on every member;
    /// member ids are the positions in this list); a joining member's list names members to
    /// ask. Ignored once the data directory has a member [default: this member alone].
    #[arg(long, env = "SIXFIVE_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// `new` when creating the cluster, `existing` when a member with empty data joins a running
    /// one (it catches up from the leader) [default: new].
    #[arg(long, env = "SIXFIVE_INITIAL_CLUSTER_STATE")]
    initial_cluster_state: Option<String>,
    /// Token that tells clusters apart: members of two clusters refuse each other; on a
    /// restart, if given, it must be the one the data directory records [default:
    /// sixfive-cluster].
    #[arg(long, env = "SIXFIVE_INITIAL_CLUSTER_TOKEN")]
    initial_cluster_token: Option<String>,
    /// URLs to serve /metrics (Prometheus) and /health on [default: none].
    #[arg(long, env = "SIXFIVE_LISTEN_METRICS_URLS")]
    listen_metrics_urls: Option<String>,
    /// Time between leader heartbeats, in milliseconds [default: 100].
    #[arg(long, env = "SIXFIVE_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Base election timeout, in milliseconds [default: 1000].
    #[arg(long, env = "SIXFIVE_ELECTION_TIMEOUT")]
    election_timeout: Option<String>,
    /// Take a snapshot and compact the log once it holds this many bytes [default: 67108864].
    #[arg(long, env = "SIXFIVE_SNAPSHOT_BYTES")]
    snapshot_bytes: Option<String>,
    /// What the client port speaks: `sixfive` (this program's client, `sixfive kv put`...) or
    /// `etcd` (etcd's v3 gRPC API, for etcdctl and etcd's client libraries; `kv status` works
    /// too). A data directory keeps the API it was created with [default: sixfive].
    #[arg(long, env = "SIXFIVE_API")]
    api: Option<String>,
    /// A leader writes each batch at once but syncs it on a thread of its own, going on
    /// meanwhile, once its syncs take this many microseconds on average; below, it syncs on its
    /// loop (a quick disk: the trip to the other thread costs more). 0: always [default: 0
    /// with the network on the node's thread (`--io-threads 0`), else 400].
    #[arg(long, env = "SIXFIVE_SYNC_ELSEWHERE_ABOVE_US")]
    sync_elsewhere_above_us: Option<String>,
    /// Adds this many microseconds to every log sync, as a slower disk would (a network
    /// volume's latency, say): to measure how the server behaves there [default: 0].
    #[arg(long, env = "SIXFIVE_SYNC_DELAY_US")]
    sync_delay_us: Option<String>,
    /// Threads for the network (client and peer connections). 0: none, the node's own thread
    /// reads and writes its connections between its batches (no hand-off between threads on a
    /// request's way; `shardkv serve`, whose syncs are on its loop, takes half the cores, at
    /// least one) [default: 0].
    #[arg(long, env = "SIXFIVE_IO_THREADS")]
    io_threads: Option<String>,
    /// TOML file with any of the settings above (keys as the flags, without the dashes in
    /// front: name = "n1", data-dir = "..."); flags and variables win over it.
    #[arg(long, env = "SIXFIVE_CONFIG_FILE")]
    config_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The settings as given (flags, variables, then `--config-file`), for other `serve`
    /// commands that take the same flags (`shardkv serve`).
    pub fn into_raw(self) -> Result<RawConfig, String> {
        let mut raw = RawConfig {
            name: self.name,
            data_dir: self.data_dir,
            listen_client_urls: self.listen_client_urls,
            advertise_client_urls: self.advertise_client_urls,
            listen_peer_urls: self.listen_peer_urls,
            initial_advertise_peer_urls: self.initial_advertise_peer_urls,
            initial_cluster: self.initial_cluster,
            initial_cluster_state: self.initial_cluster_state,
            initial_cluster_token: self.initial_cluster_token,
            listen_metrics_urls: self.listen_metrics_urls,
            heartbeat_interval: self.heartbeat_interval,
            election_timeout: self.election_timeout,
            snapshot_bytes: self.snapshot_bytes,
            api: self.api,
            sync_elsewhere_above_us: self.sync_elsewhere_above_us,
            sync_delay_us: self.sync_delay_us,
            io_threads: self.io_threads,
        };
        if let Some(f) = &self.config_file {
            let text =
                std::fs::read_to_string(f).map_err(|e| format!("cannot read --config-file {}: {e}", f.display()))?;
            raw.fill_from_toml(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        Ok(raw)
    }
}

#[derive(Args)]
pub struct ClusterArgs {
    /// Number of server processes (at most 6).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Directory holding one data directory per member.
    #[arg(long, default_value = "sixfive-data")]
    data_dir: PathBuf,
    /// Client ports, comma-separated [default: 2379,22379,32379,...].
    #[arg(long)]
    client_ports: Option<String>,
    /// Peer ports, comma-separated [default: 2380,22380,32380,...].
    #[arg(long)]
    peer_ports: Option<String>,
    /// Serve /metrics and /health on each client port + 2.
    #[arg(long)]
    metrics: bool,
    /// What the servers' client ports speak: `sixfive` or `etcd` (etcd's v3 API, for etcdctl).
    #[arg(long, default_value = "sixfive", value_parser = ["sixfive", "etcd"])]
    api: String,
    /// Extra flags passed to every `kv serve` (e.g. "--snapshot-bytes=1000000").
    #[arg(long, allow_hyphen_values = true)]
    serve_flag: Vec<String>,
}

pub fn main(cmd: KvCommand) -> ExitCode {
    match cmd {
        KvCommand::Serve(a) => serve_main(*a),
        KvCommand::Cluster(a) => cluster_main(a),
        other => client_main(other),
    }
}

fn serve_main(a: ServeArgs) -> ExitCode {
    sixfive_runtime::init_logging();
    let raw = match a.into_raw() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let cfg = match ServeConfig::from_raw(&raw) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ports(given: &Option<String>, default: &[u16], n: usize, what: &str) -> Result<Vec<u16>, String> {
    let v: Vec<u16> = match given {
        Some(s) => s
            .split(',')
            .map(|p| p.trim().parse().map_err(|_| format!("--{what}: {p:?} is not a port")))
            .collect::<Result<_, _>>()?,
        None => default.to_vec(),
    };
    if v.len() < n {
        return Err(format!("--{what}: {n} ports needed, {} given", v.len()));
    }
    Ok(v[..n].to_vec())
}

fn cluster_main(a: ClusterArgs) -> ExitCode {
    if a.nodes == 0 || a.nodes > 6 {
        eprintln!("error: --nodes must be between 1 and 6");
        return ExitCode::from(exit::USAGE);
    }
    let (cp, pp) = match (
        ports(&a.client_ports, &CLIENT_PORTS, a.nodes, "client-ports"),
        ports(&a.peer_ports, &PEER_PORTS, a.nodes, "peer-ports"),
    ) {
        (Ok(c), Ok(p)) => (c, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let names: Vec<String> = (1..=a.nodes).map(|i| format!("n{i}")).collect();
    let initial = names.iter().zip(&pp).map(|(n, p)| format!("{n}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut children = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = a.data_dir.join(name);
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["kv", "serve", "--name", name])
            .arg("--data-dir")
            .arg(&dir)
            .arg(format!("--listen-client-urls=http://127.0.0.1:{}", cp[i]))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", pp[i]))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-token=sixfive-local")
            .arg(format!("--api={}", a.api));
        if a.metrics {
            cmd.arg(format!("--listen-metrics-urls=http://127.0.0.1:{}", cp[i] + 2));
        }
        cmd.args(&a.serve_flag);
        // Each server in its own process group: a Ctrl-C reaches only us, and we stop them in order.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        match cmd.spawn() {
            Ok(c) => children.push((name.clone(), c)),
            Err(e) => {
                eprintln!("error: cannot start {name}: {e}");
                stop_all(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    let endpoints = cp.iter().map(|p| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    println!("started {} servers (data in {}):", a.nodes, a.data_dir.display());
    for (i, (name, c)) in children.iter().enumerate() {
        println!("  {name}  pid {:>7}  client http://127.0.0.1:{}  peer http://127.0.0.1:{}", c.id(), cp[i], pp[i]);
    }
    println!("endpoints: {endpoints}");
    if a.api == "etcd" {
        println!(
            "try: etcdctl --endpoints={endpoints} put greeting hello && etcdctl get greeting   (Ctrl-C stops the cluster)"
        );
    } else {
        println!("try: sixfive kv put greeting hello && sixfive kv get greeting   (Ctrl-C stops the cluster)");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let code = supervise(&rt, &mut children);
    println!("stopping the cluster...");
    let clean = stop_all(&mut children);
    if code == 0 && clean {
        println!("stopped; the data stays in {} (run again to reuse it)", a.data_dir.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// SIGTERM to every child, then waits for each; true if all exited 0.
/// Watches the processes of a local deployment until Ctrl-C or SIGTERM (0) or until all of them
/// have exited (1). A process that exits is reported once and not restarted.
pub(crate) fn supervise(rt: &tokio::runtime::Runtime, children: &mut [(String, std::process::Child)]) -> i32 {
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = int.recv() => return 0,
                _ = term.recv() => return 0,
                _ = tick.tick() => {
                    let mut alive = 0;
                    for (name, c) in children.iter_mut() {
                        match c.try_wait() {
                            Ok(None) => alive += 1,
                            Ok(Some(st)) => {
                                if !name.ends_with(" (exited)") {
                                    eprintln!("{name} exited ({st}); not restarting it (see its log above)");
                                    name.push_str(" (exited)");
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    if alive == 0 {
                        return 1;
                    }
                }
            }
        }
    })
}

pub(crate) fn stop_all(children: &mut [(String, std::process::Child)]) -> bool {
    for (_, c) in children.iter() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    }
    let mut clean = true;
    for (name, c) in children.iter_mut() {
        match c.wait() {
            Ok(st) if st.success() => {}
            Ok(st) => {
                if !name.ends_with(" (exited)") {
                    eprintln!("{name}: {st}");
                }
                clean = false;
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                clean = false;
            }
        }
    }
    clean
}

/// What a client command ended with.
pub(crate) struct Outcome {
    pub(crate) code: u8,
    pub(crate) simple: String,
    pub(crate) json: serde_json::Value,
}

impl Outcome {
    /// Prints the outcome as asked (errors on stderr in simple form) and gives its exit code.
    pub(crate) fn finish(self, w: Output) -> ExitCode {
        match w {
            Output::Json => println!("{}", self.json),
            Output::Simple if self.simple.starts_with("error: ") => eprintln!("{}", self.simple),
            Output::Simple if !self.simple.is_empty() => println!("{}", self.simple),
            Output::Simple => {}
        }
        ExitCode::from(self.code)
    }
}

pub(crate) fn ok(simple: String, json: serde_json::Value) -> Outcome {
    Outcome { code: 0, simple, json }
}

pub(crate) fn failed(code: u8, msg: String) -> Outcome {
    Outcome { code, simple: format!("error: {msg}"), json: json!({ "error": msg, "code": code }) }
}

/// The writes and scans both command-line clients (`kv` and `shardkv`) offer.
pub(crate) enum DataOp {
    /// Set `key` whatever its version: read the version, then a versioned Put, again if
    /// another writer got in first.
    Put {
        key: String,
        value: String,
    },
    Del {
        key: String,
    },
    Append {
        key: String,
        suffix: String,
    },
    Scan {
        start: String,
        end: Option<String>,
        limit: u32,
    },
}

/// Runs `op` with `clerk`.
pub(crate) async fn data_op(clerk: &mut impl KvClient, op: DataOp) -> Outcome {
    match op {
        DataOp::Put { key, value } => loop {
            let version = match clerk.get(&key).await {
                Ok((_, v)) => v,
                Err(KvError::NoKey) => 0,
                Err(e) => return kv_error(e),
            };
            match clerk.put(&key, &value, version).await {
                Ok(()) => return ok("OK".into(), json!({ "key": key, "ok": true, "version": version + 1 })),
                Err(KvError::Version) => continue,
                Err(e) => return kv_error(e),
            }
        },
        DataOp::Del { key } => match clerk.delete(&key).await {
            Ok(()) => ok("OK".into(), json!({ "key": key, "deleted": true })),
            Err(e) => kv_error(e),
        },
        DataOp::Append { key, suffix } => match clerk.append(&key, &suffix).await {
            Ok(old) => ok(old.clone(), json!({ "key": key, "old": old })),
            Err(e) => kv_error(e),
        },
        DataOp::Scan { start, end, limit } => match clerk.scan(&start, end.as_deref(), limit).await {
            Ok(entries) => {
                let simple =
                    entries.iter().map(|(k, v, ver)| format!("{k}\t{v}\t{ver}")).collect::<Vec<_>>().join("\n");
                let j: Vec<_> =
                    entries.iter().map(|(k, v, ver)| json!({ "key": k, "value": v, "version": ver })).collect();
                ok(simple, json!({ "entries": j }))
            }
            Err(e) => kv_error(e),
        },
    }
}

pub(crate) fn kv_error(e: KvError) -> Outcome {
    match e {
        KvError::NoKey => failed(exit::NOT_FOUND, "key not found".into()),
        KvError::Version => failed(exit::VERSION_MISMATCH, "version mismatch".into()),
        KvError::Maybe => failed(exit::MAYBE_APPLIED, "the write may or may not have been applied".into()),
        e => failed(1, e.to_string()),
    }
}

fn client_main(cmd: KvCommand) -> ExitCode {
    let c = match &cmd {
        KvCommand::Put { c, .. }
        | KvCommand::Get { c, .. }
        | KvCommand::Del { c, .. }
        | KvCommand::Scan { c, .. }
        | KvCommand::Append { c, .. }
        | KvCommand::Cas { c, .. }
        | KvCommand::Status { c }
        | KvCommand::Member(
            MemberCommand::List { c }
            | MemberCommand::Add { c, .. }
            | MemberCommand::Promote { c, .. }
            | MemberCommand::Remove { c, .. },
        ) => c.clone(),
        _ => unreachable!("server commands are handled elsewhere"),
    };
    let urls: Vec<String> = c.endpoints.split(',').filter(|s| !s.trim().is_empty()).map(str::to_string).collect();
    let timeout = Duration::from_secs_f64(c.command_timeout.max(0.01));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let out = rt.block_on(async move {
        if let KvCommand::Status { .. } = cmd {
            return status(&urls, timeout).await;
        }
        if let KvCommand::Member(m) = cmd {
            return member(&urls, m, timeout).await;
        }
        let cluster = match Cluster::connect(&urls, 1_000_000.min(timeout.as_micros() as u64)).await {
            Ok(cl) => cl,
            Err(e) => return failed(exit::UNAVAILABLE, e.to_string()),
        };
        let transport = cluster.transport.clone();
        let mut clerk = cluster.clerk(random_u64());
        let write = !matches!(cmd, KvCommand::Get { .. } | KvCommand::Scan { .. });
        let run = async {
            match cmd {
                KvCommand::Get { key, .. } => match clerk.get(&key).await {
                    Ok((v, ver)) => ok(v.clone(), json!({ "key": key, "value": v, "version": ver })),
                    Err(e) => kv_error(e),
                },
                KvCommand::Put { key, value, .. } => data_op(&mut clerk, DataOp::Put { key, value }).await,
                KvCommand::Cas { key, value, version, .. } => match clerk.put(&key, &value, version).await {
                    Ok(()) => ok("OK".into(), json!({ "key": key, "ok": true, "version": version + 1 })),
                    Err(e) => kv_error(e),
                },
                KvCommand::Del { key, .. } => data_op(&mut clerk, DataOp::Del { key }).await,
                KvCommand::Append { key, suffix, .. } => data_op(&mut clerk, DataOp::Append { key, suffix }).await,
                KvCommand::Scan { start, end, limit, .. } => {
                    data_op(&mut clerk, DataOp::Scan { start, end, limit }).await
                }
                _ => unreachable!(),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(o) => o,
            Err(_) if write && transport.requests_sent() > 0 => failed(
                exit::MAYBE_APPLIED,
                format!("no answer within {timeout:?}: the write may or may not have been applied"),
            ),
            Err(_) => failed(exit::UNAVAILABLE, format!("no leader answered within {timeout:?}")),
        }
    });
    out.finish(c.write_out)
}

async fn status(urls: &[String], timeout: Duration) -> Outcome {
    let per = 1_000_000.min(timeout.as_micros() as u64);
    let cluster = match Cluster::connect(urls, per).await {
        Ok(c) => c,
        Err(e) => return failed(exit::UNAVAILABLE, e.to_string()),
    };
    let mut rows = Vec::new();
    let mut table = vec![format!(
        "{:<28} {:>4} {:<8} {:<12} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "ENDPOINT",
        "ID",
        "NAME",
        "ROLE",
        "TERM",
        "LEADER",
        "COMMIT",
        "APPLIED",
        "LAST",
        "SNAPSHOT",
        "LOG BYTES",
        "SNAP BYTES"
    )];
    let mut leaders = std::collections::BTreeMap::new();
    for (e, url) in &cluster.urls {
        match cluster.transport.status(*e, per).await {
            Ok(s) => {
                if s.role == "leader" {
                    leaders.insert(s.id, *e);
                }
                table.push(format!(
                    "{:<28} {:>4} {:<8} {:<12} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}",
                    format!("http://{url}"),
                    s.id,
                    s.name,
                    s.role,
                    s.term,
                    s.leader.map_or("-".into(), |l| l.to_string()),
                    s.commit,
                    s.applied,
                    s.last_index,
                    s.snapshot_index,
                    s.log_bytes,
                    s.snapshot_bytes
                ));
                rows.push(json!({
                    "endpoint": format!("http://{url}"), "id": s.id, "name": s.name, "role": s.role, "term": s.term,
                    "leader": s.leader, "commit": s.commit, "applied": s.applied, "last_index": s.last_index,
                    "snapshot_index": s.snapshot_index, "log_bytes": s.log_bytes, "snapshot_bytes": s.snapshot_bytes,
                }));
            }
            Err(err) => {
                table.push(format!("{:<28} unreachable ({err})", format!("http://{url}")));
                rows.push(json!({ "endpoint": format!("http://{url}"), "error": err.to_string() }));
            }
        }
    }
    // Ready only if a read on the leader (ReadIndex: a quorum confirms it) answers. The query
    // is one the sixfive store understands; a member serving etcd's API answers it too (with
    // an error of its state machine), and either answer proves a ReadIndex round went through.
    let readable = match leaders.last_key_value() {
        Some((_, leader)) => {
            use sixfive_rpc::Transport;
            let q = postcard::to_allocvec(&sixfive_kv::Op::Get { key: "\u{0}status".into() }).expect("encodes");
            let req = postcard::to_allocvec(&sixfive_rsm::RsmRequest::Query(q)).expect("encodes");
            let answer = cluster.transport.call(*leader, req, timeout.as_micros() as u64).await;
            matches!(answer.map(|b| postcard::from_bytes(&b)), Ok(Ok(sixfive_rsm::RsmReply::Done(_))))
        }
        None => false,
    };
    let healthy = !leaders.is_empty() && readable;
    table.push(if healthy {
        format!("cluster healthy: leader {}, a linearizable read answered", leaders.keys().last().expect("one"))
    } else if leaders.is_empty() {
        "cluster NOT ready: no member reports itself leader".to_string()
    } else {
        format!("cluster NOT ready: a linearizable read got no answer within {timeout:?}")
    });
    let json = json!({ "members": rows, "healthy": healthy, "leader": leaders.keys().last() });
    Outcome { code: if healthy { 0 } else { exit::UNAVAILABLE }, simple: table.join("\n"), json }
}

fn member_json(m: &MemberEntry, leader: Option<u64>) -> serde_json::Value {
    json!({
        "id": m.id, "name": m.name, "peer_url": format!("http://{}", m.peer_addr),
        "client_urls": m.client_urls.iter().map(|u| format!("http://{u}")).collect::<Vec<_>>(),
        "learner": m.learner, "promote_when_caught_up": m.promote, "leader": leader == Some(m.id),
    })
}

/// `kv member ...`: asks the first member that answers (which makes a change at the leader).
async fn member(urls: &[String], cmd: MemberCommand, timeout: Duration) -> Outcome {
    let per = 1_000_000.min(timeout.as_micros() as u64);
    let cluster = match Cluster::connect(urls, per).await {
        Ok(c) => c,
        Err(e) => return failed(exit::UNAVAILABLE, e.to_string()),
    };
    let mut answered = None;
    for e in &cluster.endpoints {
        if let Ok(v) = cluster.transport.members(*e, per).await {
            answered = Some((*e, v));
            break;
        }
    }
    let Some((endpoint, view)) = answered else {
        return failed(exit::UNAVAILABLE, "no member answered".into());
    };
    let op = match cmd {
        MemberCommand::List { .. } => {
            let mut table = vec![format!(
                "{:>4}  {:<10} {:<8} {:<28} {:<28} {}",
                "ID", "NAME", "ROLE", "PEER URL", "CLIENT URLS", ""
            )];
            for m in &view.members {
                let role = if m.learner { "learner" } else { "voter" };
                let clients = m.client_urls.iter().map(|u| format!("http://{u}")).collect::<Vec<_>>().join(",");
                let note = match (view.leader == Some(m.id), m.learner && m.promote) {
                    (true, _) => "leader",
                    (_, true) => "(promoted once caught up)",
                    _ => "",
                };
                table.push(format!(
                    "{:>4}  {:<10} {:<8} {:<28} {:<28} {note}",
                    m.id,
                    m.name,
                    role,
                    format!("http://{}", m.peer_addr),
                    clients
                ));
            }
            let rows: Vec<_> = view.members.iter().map(|m| member_json(m, view.leader)).collect();
            let json = json!({ "members": rows, "leader": view.leader, "settled": view.settled, "cluster_id": format!("{:016x}", cluster.cluster_id) });
            return ok(table.join("\n"), json);
        }
        MemberCommand::Add { name, peer_urls, learner, .. } => {
            let peer_addr = match sixfive_runtime::server::parse_url(&peer_urls) {
                Ok(a) => a,
                Err(e) => return failed(2, e.to_string()),
            };
            if name.is_empty() {
                return failed(2, "the new member needs a name".into());
            }
            MemberOp::Add { name, peer_addr, learner }
        }
        MemberCommand::Promote { member, .. } | MemberCommand::Remove { member, .. }
            if view.find(&member).is_none() =>
        {
            return failed(exit::NOT_FOUND, format!("no member named or numbered {member}"));
        }
        MemberCommand::Promote { member, .. } => MemberOp::Promote(view.find(&member).expect("found").id),
        MemberCommand::Remove { member, .. } => MemberOp::Remove(view.find(&member).expect("found").id),
    };
    // The member tries for up to 10 s (a learner catching up, a change in progress).
    let wait = timeout.as_micros() as u64 + 15_000_000;
    let result = match cluster.transport.change_members(endpoint, op.clone(), wait).await {
        Ok(r) => r,
        Err(e) => {
            return failed(
                exit::UNAVAILABLE,
                format!("no answer ({e}): the change may or may not be made; run kv member list"),
            );
        }
    };
    let (id, before) = match result {
        Ok(r) => r,
        Err(e @ ChangeError::NotFound(_)) => return failed(exit::NOT_FOUND, e.to_string()),
        Err(e @ ChangeError::Unavailable(_)) => return failed(exit::UNAVAILABLE, e.to_string()),
        Err(e) => return failed(1, e.to_string()),
    };
    let cid = format!("{:016x}", cluster.cluster_id);
    match op {
        MemberOp::Add { name, peer_addr, learner } => {
            let mut initial: Vec<String> =
                before.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer_addr)).collect();
            initial.push(format!("{name}=http://{peer_addr}"));
            let how = if learner { "as a learner" } else { "as a learner, promoted to voter once caught up" };
            let simple = format!(
                "Member {id} added to cluster {cid} {how}\n\n\
                 SIXFIVE_NAME=\"{name}\"\n\
                 SIXFIVE_INITIAL_CLUSTER=\"{}\"\n\
                 SIXFIVE_INITIAL_ADVERTISE_PEER_URLS=\"http://{peer_addr}\"\n\
                 SIXFIVE_INITIAL_CLUSTER_STATE=\"existing\"",
                initial.join(",")
            );
            ok(
                simple,
                json!({ "added": id, "name": name, "learner": learner, "initial_cluster": initial.join(","), "cluster_id": cid }),
            )
        }
        MemberOp::Promote(_) => {
            ok(format!("Member {id} promoted in cluster {cid}"), json!({ "promoted": id, "cluster_id": cid }))
        }
        MemberOp::Remove(_) => {
            ok(format!("Member {id} removed from cluster {cid}"), json!({ "removed": id, "cluster_id": cid }))
        }
    }
}
