//! One replica of the replicated key/value service as a server process: the `sixfive-kv`
//! state machine in an `RsmNode` on `FileStorage`, driven by [`crate::driver`], reached by peers
//! and clients over TCP.
//!
//! Configuration follows etcd's flags (see [`RawConfig`]). The data directory holds `LOCK`
//! (held with `flock` while the server runs: a second server on it is refused), `member`
//! (the cluster id, name and member id it was created for: a server started with another
//! cluster's data is refused; a member that joined a running cluster also records the member
//! directory it was told when it joined) and `raft/` (the write-ahead log and snapshot).
//!
//! Membership follows the Raft configuration (see [`crate::members`]): the peer links, the
//! member list, joining servers' questions and the leader's promotion of caught-up learners
//! all follow the configuration in effect; a member whose removal is committed stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sixfive_kv::{KvSm, Op};
use sixfive_raft::{Config, NodeId, Role};
use sixfive_rpc::{CallId, Ctx, Endpoint};
use sixfive_rsm::{Rsm, RsmNode, RsmReply, RsmRequest, StateMachine, TICK_MICROS};
use sixfive_storage::FileStorage;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::driver::{self, Input, Router};
use crate::frame::{self, FrameError, MAX_CLIENT_FRAME};
use crate::members::{ChangeError, Directory, MemberOp, MembersView};
use crate::metrics::{MeteredStorage, Metrics};
use crate::outbox::{Outbox, Outboxes};
use crate::peer::{self, Peer, PeerNet};
use crate::proto::{ClientMsg, JoinAnswer, MemberStatus, ServerMsg};

/// The node a server process runs: a replicated state machine on metered file storage.
pub type Member<M> = RsmNode<MeteredStorage<FileStorage>, M>;
/// The node a KV server runs.
pub type KvNode = Member<KvSm>;

/// How long a membership change asked by `kv member` is retried (a learner catching up, a
/// change in progress, no leader).
const MEMBER_CHANGE_RETRIES: Duration = Duration::from_secs(10);
/// Client connections get endpoints from here up (member ids are below).
const CLIENT_ENDPOINTS: Endpoint = 1 << 40;
/// The server's own requests (health checks).
const INTERNAL_ENDPOINT: Endpoint = u64::MAX;

/// Why a server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag, variable or config file value is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Another server holds the data directory.
    #[error("data directory {0} is in use by another server (its LOCK file is held); refusing to start")]
    Locked(PathBuf),
    /// The data directory belongs to another member or cluster.
    #[error("data directory {dir}: {reason}; refusing to start")]
    ForeignData {
        /// Which directory.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The storage could not be opened (corruption is named with its file and offset).
    #[error("storage: {0}")]
    Storage(#[from] sixfive_storage::StorageError),
    /// The operating system refused.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The node stopped on an error it cannot continue from (a storage failure).
    #[error("the node failed and stopped serving: {0}")]
    NodeFailed(String),
    /// `--initial-cluster-state existing`: no member let this server join.
    #[error("cannot join the cluster: {0}")]
    Join(String),
}

/// Waits for SIGTERM or SIGINT, or for `removed` to be set (the member was removed from the
/// cluster): the reason is returned, with the node's handle, for a graceful stop. Or for the
/// node's loop to end on its own: a node failure, returned as the error the server stops with.
pub(crate) fn wait_for_stop<N>(
    rt: &tokio::runtime::Runtime,
    handle: driver::DriverHandle<N>,
    removed: &AtomicBool,
) -> Result<(&'static str, driver::DriverHandle<N>), ServeError> {
    let stop = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(Some("SIGTERM")),
                _ = int.recv() => return Ok(Some("SIGINT")),
                _ = poll.tick() => {
                    if removed.load(Ordering::Relaxed) {
                        return Ok(Some("removed from the cluster"));
                    }
                    if handle.is_finished() {
                        return Ok::<_, ServeError>(None);
                    }
                }
            }
        }
    })?;
    match stop {
        Some(signal) => Ok((signal, handle)),
        None => {
            let err = handle.join().err().unwrap_or_else(|| "the node loop ended".into());
            error!("node failed, stopping: {err}");
            Err(ServeError::NodeFailed(err))
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// What the client port speaks, and so which state machine the members replicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// sixfive's own protocol and key/value service (versioned puts, appends, scans; the
    /// `sixfive kv` client and `KvClient`).
    Sixfive,
    /// etcd's v3 gRPC API with etcd's MVCC semantics (etcdctl, etcd's client libraries), plus
    /// etcd's `/health` on the same port. `sixfive kv status` works too.
    Etcd,
}

impl Api {
    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Api::Sixfive => "sixfive",
            Api::Etcd => "etcd",
        }
    }
}

/// Whether the cluster is being created or the member joins one that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// `new`.
    New,
    /// `existing`.
    Existing,
}

/// The settings as given (flags, environment or config file), before checking. Names are
/// etcd's; lists are comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawConfig {
    /// `--name`: this member's name (default `default`).
    pub name: Option<String>,
    /// `--data-dir` (default `<name>.sixfive`).
    pub data_dir: Option<String>,
    /// `--listen-client-urls` (default `http://127.0.0.1:2379`).
    pub listen_client_urls: Option<String>,
    /// `--advertise-client-urls` (default: the listen URLs).
    pub advertise_client_urls: Option<String>,
    /// `--listen-peer-urls` (default `http://127.0.0.1:2380`).
    pub listen_peer_urls: Option<String>,
    /// `--initial-advertise-peer-urls` (default: the listen URLs).
    pub initial_advertise_peer_urls: Option<String>,
    /// `--initial-cluster`: `name=url,...` (default: this member alone).
    pub initial_cluster: Option<String>,
    /// `--initial-cluster-state`: `new` or `existing` (default `new`).
    pub initial_cluster_state: Option<String>,
    /// `--initial-cluster-token` (default `sixfive-cluster`).
    pub initial_cluster_token: Option<String>,
    /// `--listen-metrics-urls`: where `/metrics` and `/health` are served (default: none).
    pub listen_metrics_urls: Option<String>,
    /// `--heartbeat-interval` in milliseconds (default 100).
    pub heartbeat_interval: Option<String>,
    /// `--election-timeout` in milliseconds (default 1000).
    pub election_timeout: Option<String>,
    /// `--snapshot-bytes`: take a snapshot once the log holds this many bytes (default 64 MiB).
    pub snapshot_bytes: Option<String>,
    /// `--api`: `sixfive` or `etcd` (default `sixfive`).
    pub api: Option<String>,
    /// `--sync-elsewhere-above-us`: a leader syncs on a thread of its own once its syncs take
    /// this many microseconds on average (0: always, the default with `--io-threads 0`; else
    /// 400).
    pub sync_elsewhere_above_us: Option<String>,
    /// `--sync-delay-us`: added to every log sync, as a slower disk would (default 0).
    pub sync_delay_us: Option<String>,
    /// `--io-threads`: threads for the network (0, the default: none, the network runs on the
    /// node's own thread).
    pub io_threads: Option<String>,
}

/// Keys accepted in a config file (etcd's spelling), in [`RawConfig`]'s order.
pub const CONFIG_KEYS: [&str; 17] = [
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "listen-metrics-urls",
    "heartbeat-interval",
    "election-timeout",
    "snapshot-bytes",
    "api",
    "sync-elsewhere-above-us",
    "sync-delay-us",
    "io-threads",
];

impl RawConfig {
    fn slots(&mut self) -> [&mut Option<String>; 17] {
        [
            &mut self.name,
            &mut self.data_dir,
            &mut self.listen_client_urls,
            &mut self.advertise_client_urls,
            &mut self.listen_peer_urls,
            &mut self.initial_advertise_peer_urls,
            &mut self.initial_cluster,
            &mut self.initial_cluster_state,
            &mut self.initial_cluster_token,
            &mut self.listen_metrics_urls,
            &mut self.heartbeat_interval,
            &mut self.election_timeout,
            &mut self.snapshot_bytes,
            &mut self.api,
            &mut self.sync_elsewhere_above_us,
            &mut self.sync_delay_us,
            &mut self.io_threads,
        ]
    }

    /// Fills the settings not given yet from a TOML config file's text (keys as in
    /// [`CONFIG_KEYS`]; strings, numbers, or arrays of strings for URL lists).
    pub fn fill_from_toml(&mut self, text: &str) -> Result<(), ServeError> {
        let table: toml::Table = text.parse().map_err(|e| ServeError::Config(format!("config file: {e}")))?;
        for (k, v) in table {
            let Some(pos) = CONFIG_KEYS.iter().position(|c| *c == k || c.replace('-', "_") == k) else {
                return Err(ServeError::Config(format!(
                    "config file: unknown key {k:?} (known: {})",
                    CONFIG_KEYS.join(", ")
                )));
            };
            let value = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or(()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| ServeError::Config(format!("config file: {k}: a list of strings expected")))?
                    .join(","),
                other => return Err(ServeError::Config(format!("config file: {k}: unexpected value {other}"))),
            };
            let slot = &mut self.slots()[pos];
            if slot.is_none() {
                **slot = Some(value);
            }
        }
        Ok(())
    }
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// This member's name.
    pub name: String,
    /// Its id in `--initial-cluster` (its position there, from 1): the id a new member of a
    /// new cluster takes. A server that has run takes its id from its data directory instead
    /// (`Identity::id`), whatever the flags say.
    pub id: NodeId,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where clients connect.
    pub listen_client: Vec<String>,
    /// What clients are told.
    pub advertise_client: Vec<String>,
    /// Where peers connect.
    pub listen_peer: Vec<String>,
    /// What peers are told (`--initial-advertise-peer-urls`): a restart checks that its
    /// recorded peer address is one of them.
    pub advertise_peer: Vec<String>,
    /// Every member: id -> (name, peer address).
    pub members: BTreeMap<NodeId, Peer>,
    /// New or existing cluster.
    pub state: ClusterState,
    /// The cluster's token.
    pub token: String,
    /// Whether `--initial-cluster-token` was given (not the default): a restart checks it
    /// against the data directory's.
    pub token_given: bool,
    /// Whether `--initial-cluster` was given: a restart ignores it (the membership is the log's).
    pub initial_cluster_given: bool,
    /// Where `/metrics` and `/health` are served.
    pub listen_metrics: Vec<String>,
    /// Raft heartbeat interval, in ticks of 10 ms.
    pub heartbeat_ticks: u32,
    /// Raft base election timeout, in ticks of 10 ms.
    pub election_ticks: u32,
    /// Snapshot threshold in bytes of log.
    pub snapshot_bytes: usize,
    /// What the client port speaks.
    pub api: Api,
    /// A leader syncs on a thread of its own once its syncs take this long on average
    /// (microseconds; see [`crate::metrics::MeteredStorage`]).
    pub sync_elsewhere_above_us: u64,
    /// Microseconds added to every log sync (measuring a slower disk).
    pub sync_delay_us: u64,
    /// Worker threads of the network runtime.
    pub io_threads: usize,
}

/// The runtimes of a server: one for control (signals, metrics, the stop sequence: `io_threads`
/// threads, at least one, which carry the network too when `io_threads` is positive) and, when
/// `io_threads` is 0 (the default), the node's own thread's, which then carries the network:
/// its connections are read and written between the node's batches, and a request reaches the
/// node with no hand-off from one thread to another (on 2 cores, with the leader's sync on a
/// thread of its own: +16% writes/s, +44% reads/s over one network thread; docs/benchmarks.md,
/// "Session 10").
pub(crate) fn runtimes(
    io_threads: usize,
) -> Result<(tokio::runtime::Runtime, Option<tokio::runtime::Runtime>), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads.max(1))
        .enable_all()
        .thread_name("sixfive-io")
        .build()
        .map_err(io("starting the runtime"))?;
    let on_loop =
        if io_threads == 0 { Some(driver::loop_runtime().map_err(io("starting the node's runtime"))?) } else { None };
    Ok((rt, on_loop))
}

/// Default of `--sync-elsewhere-above-us` with I/O threads: between the 0.27 ms syncs of a disk
/// where syncing elsewhere costs 5% and the 0.5 ms where it gains 18% (docs/benchmarks.md).
/// With the network on the node's thread (`--io-threads 0`) the default is 0, always elsewhere:
/// a sync on the loop would stop the network too.
pub const DEFAULT_SYNC_ELSEWHERE_ABOVE_US: u64 = 400;

/// `http://host:port` -> `host:port`; `https://` is refused until TLS exists.
pub fn parse_url(url: &str) -> Result<String, ServeError> {
    let url = url.trim();
    if url.starts_with("https://") || url.starts_with("unixs://") {
        return Err(ServeError::Config(format!(
            "{url}: TLS is not supported yet; use an http:// URL (and a private network)"
        )));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ServeError::Config(format!("{url}: expected a URL of the form http://host:port")))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) =
        rest.rsplit_once(':').ok_or_else(|| ServeError::Config(format!("{url}: the URL has no port")))?;
    if host.is_empty() || port.parse::<u16>().is_err() || rest.contains('/') {
        return Err(ServeError::Config(format!("{url}: expected http://host:port")));
    }
    Ok(rest.to_string())
}

fn url_list(s: &str) -> Result<Vec<String>, ServeError> {
    let v: Vec<String> = s.split(',').filter(|u| !u.trim().is_empty()).map(parse_url).collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(ServeError::Config(format!("{s:?}: no URL given")));
    }
    Ok(v)
}

fn number<T: std::str::FromStr>(what: &str, v: Option<&String>, default: T) -> Result<T, ServeError> {
    match v {
        None => Ok(default),
        Some(s) => s.trim().parse().map_err(|_| ServeError::Config(format!("{what}: {s:?} is not a number"))),
    }
}

/// The cluster's id: a hash of its token and its initial members (as etcd derives its own), so
/// members started with another token or member list are told apart.
pub fn cluster_id(token: &str, members: &BTreeMap<NodeId, Peer>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h = (h ^ *x as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(token.as_bytes());
    for (id, p) in members {
        eat(format!("\n{id}={}={}", p.name, p.addr).as_bytes());
    }
    h
}

impl ServeConfig {
    /// Checks `raw` and fills the defaults.
    pub fn from_raw(raw: &RawConfig) -> Result<ServeConfig, ServeError> {
        let name = raw.name.clone().unwrap_or_else(|| "default".into());
        if name.is_empty() || name.contains(['=', ',']) || name.chars().any(char::is_control) {
            return Err(ServeError::Config(format!(
                "--name {name:?}: must be non-empty, without '=', ',' or control characters"
            )));
        }
        if let Some(t) = &raw.initial_cluster_token
            && (t.is_empty() || t.chars().any(char::is_control))
        {
            return Err(ServeError::Config(format!(
                "--initial-cluster-token {t:?}: must be non-empty, without control characters"
            )));
        }
        let data_dir = PathBuf::from(raw.data_dir.clone().unwrap_or_else(|| format!("{name}.sixfive")));
        let listen_client = url_list(raw.listen_client_urls.as_deref().unwrap_or("http://127.0.0.1:2379"))?;
        let advertise_client = match &raw.advertise_client_urls {
            Some(s) => url_list(s)?,
            None => listen_client.clone(),
        };
        let listen_peer = url_list(raw.listen_peer_urls.as_deref().unwrap_or("http://127.0.0.1:2380"))?;
        let advertise_peer = match &raw.initial_advertise_peer_urls {
            Some(s) => url_list(s)?,
            None => listen_peer.clone(),
        };
        let initial = raw.initial_cluster.clone().unwrap_or_else(|| format!("{name}=http://{}", advertise_peer[0]));
        let mut members = BTreeMap::new();
        let mut id = None;
        for (i, part) in initial.split(',').filter(|p| !p.trim().is_empty()).enumerate() {
            let (n, u) = part.split_once('=').ok_or_else(|| {
                ServeError::Config(format!("--initial-cluster: {part:?} is not name=http://host:port"))
            })?;
            let n = n.trim().to_string();
            if n.is_empty() || n.chars().any(char::is_control) {
                return Err(ServeError::Config(format!(
                    "--initial-cluster: member name {n:?} must be non-empty, without control characters"
                )));
            }
            let addr = parse_url(u)?;
            if members.values().any(|p: &Peer| p.name == n) {
                return Err(ServeError::Config(format!("--initial-cluster: member name {n:?} appears twice")));
            }
            let mid = i as NodeId + 1;
            if n == name {
                if !advertise_peer.contains(&addr) {
                    return Err(ServeError::Config(format!(
                        "--initial-cluster gives {name} the peer URL http://{addr}, but --initial-advertise-peer-urls is {}",
                        advertise_peer.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>().join(",")
                    )));
                }
                id = Some(mid);
            }
            members.insert(mid, Peer { name: n, addr });
        }
        let id = id.ok_or_else(|| {
            ServeError::Config(format!(
                "member name {name:?} is not in --initial-cluster ({}); unknown member",
                members.values().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let state = match raw.initial_cluster_state.as_deref().unwrap_or("new") {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            s => return Err(ServeError::Config(format!("--initial-cluster-state {s:?}: expected new or existing"))),
        };
        let listen_metrics = match &raw.listen_metrics_urls {
            Some(s) if !s.trim().is_empty() => url_list(s)?,
            _ => Vec::new(),
        };
        let hb_ms: u64 = number("--heartbeat-interval", raw.heartbeat_interval.as_ref(), 100)?;
        let el_ms: u64 = number("--election-timeout", raw.election_timeout.as_ref(), 1000)?;
        let tick_ms = TICK_MICROS / 1000;
        let (heartbeat_ticks, election_ticks) = ((hb_ms / tick_ms) as u32, (el_ms / tick_ms) as u32);
        if heartbeat_ticks == 0 || election_ticks <= heartbeat_ticks {
            return Err(ServeError::Config(format!(
                "--heartbeat-interval {hb_ms} and --election-timeout {el_ms}: need {tick_ms} <= heartbeat < election (ms)"
            )));
        }
        let snapshot_bytes = number("--snapshot-bytes", raw.snapshot_bytes.as_ref(), 64usize << 20)?;
        let io_threads = match number("--io-threads", raw.io_threads.as_ref(), 0usize)? {
            n if n <= 1024 => n,
            n => return Err(ServeError::Config(format!("--io-threads {n}: at most 1024"))),
        };
        let elsewhere = if io_threads == 0 { 0 } else { DEFAULT_SYNC_ELSEWHERE_ABOVE_US };
        let sync_elsewhere_above_us =
            number("--sync-elsewhere-above-us", raw.sync_elsewhere_above_us.as_ref(), elsewhere)?;
        let sync_delay_us = number("--sync-delay-us", raw.sync_delay_us.as_ref(), 0)?;
        let api = match raw.api.as_deref().unwrap_or("sixfive") {
            "sixfive" => Api::Sixfive,
            "etcd" => Api::Etcd,
            s => return Err(ServeError::Config(format!("--api {s:?}: expected sixfive or etcd"))),
        };
        Ok(ServeConfig {
            name,
            id,
            data_dir,
            listen_client,
            advertise_client,
            listen_peer,
            advertise_peer,
            members,
            state,
            token: raw.initial_cluster_token.clone().unwrap_or_else(|| "sixfive-cluster".into()),
            token_given: raw.initial_cluster_token.is_some(),
            initial_cluster_given: raw.initial_cluster.is_some(),
            listen_metrics,
            heartbeat_ticks,
            election_ticks,
            snapshot_bytes,
            api,
            sync_elsewhere_above_us,
            sync_delay_us,
            io_threads,
        })
    }

    /// The cluster id (see [`cluster_id`]).
    pub fn cluster_id(&self) -> u64 {
        cluster_id(&self.token, &self.members)
    }
}

/// Holds the data directory's lock while alive.
pub struct DirLock {
    _file: std::fs::File,
}

/// Locks `dir` (creating it), or says who holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, ServeError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating data directory {}", dir.display())))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(ServeError::Locked(dir.to_path_buf()));
    }
    Ok(DirLock { _file: file })
}

/// Who a server is: its member id, its cluster's id, the member directory it starts with (until
/// its log shows one), and the voters of the cluster's birth (none for a member that joined).
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) id: NodeId,
    pub(crate) cluster_id: u64,
    pub(crate) base: Directory,
    pub(crate) voters: Vec<NodeId>,
}

/// Finds out who this server is from its data directory's `member` file; a new member of a new
/// cluster writes it; a new member of a running cluster (`--initial-cluster-state existing`)
/// first asks the members listed in `--initial-cluster` to let it join (it must have been
/// added), then writes what they told it. Once written, the file is who the server is: a
/// restart ignores `--initial-cluster` (the membership has moved on in the log since), as
/// etcd does, and refuses only what contradicts the file (another name, API, peer URL or
/// token) and a member whose Raft log is gone.
fn identity(cfg: &ServeConfig, rt: &tokio::runtime::Runtime) -> Result<Identity, ServeError> {
    let path = cfg.data_dir.join("member");
    let member_file = std::fs::read_to_string(&path);
    if member_file.is_ok() {
        check_raft_log_kept(&cfg.data_dir)?;
    }
    match member_file {
        Ok(have) if have.lines().any(|l| l == "joined=1" || l.starts_with("member=")) => recorded_identity(cfg, &have),
        Ok(have) => {
            // Written before member files recorded the members: the flags must still describe
            // the cluster it was born in, and then the file says so itself.
            check_older_member_file(cfg, &have)?;
            write_member_file(&cfg.data_dir, &founding_record(cfg))?;
            Ok(born_identity(cfg))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cfg.data_dir.join("raft").exists() {
                return Err(ServeError::ForeignData {
                    dir: cfg.data_dir.clone(),
                    reason: "it holds Raft data but no member file".into(),
                });
            }
            if cfg.state == ClusterState::New {
                write_member_file(&cfg.data_dir, &founding_record(cfg))?;
                return Ok(born_identity(cfg));
            }
            let me = &cfg.members[&cfg.id];
            let contacts: Vec<String> =
                cfg.members.values().filter(|p| p.name != cfg.name).map(|p| p.addr.clone()).collect();
            if contacts.is_empty() {
                return Err(ServeError::Join("--initial-cluster names no other member to ask".into()));
            }
            // The member may be added a moment after this server starts: ask for a while.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let (cluster_id, id, members) = loop {
                let answer = rt.block_on(peer::join(&contacts, &cfg.name, &me.addr));
                match answer {
                    Ok(JoinAnswer::Accepted { cluster_id, id, members }) => break (cluster_id, id, members),
                    Ok(JoinAnswer::Refused(why)) | Err(why) => {
                        if std::time::Instant::now() >= deadline {
                            return Err(ServeError::Join(why));
                        }
                        warn!("cannot join yet (retrying): {why}");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
            let mut text = format!("cluster-id={cluster_id:016x}\nname={}\nid={id}\n", cfg.name);
            if cfg.api != Api::Sixfive {
                text.push_str(&format!("api={}\n", cfg.api.name()));
            }
            text.push_str("joined=1\n");
            for (i, n, a) in &members {
                text.push_str(&format!("member={i}={n}={a}\n"));
            }
            write_member_file(&cfg.data_dir, &text)?;
            info!(id, cluster_id = %format!("{cluster_id:016x}"), "joined the cluster as a learner");
            recorded_identity(cfg, &text)
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// The identity of a member of the cluster's initial configuration.
fn born_identity(cfg: &ServeConfig) -> Identity {
    Identity {
        id: cfg.id,
        cluster_id: cfg.cluster_id(),
        base: Directory::of(cfg.members.clone()),
        voters: cfg.members.keys().copied().collect(),
    }
}

/// What a founding member's `member` file records: [`member_header`]'s lines, the token
/// and the initial members (`member=id=name=address`, as a joined member's file lists them).
fn founding_record(cfg: &ServeConfig) -> String {
    let mut text = member_header(cfg);
    text.push_str(&format!("token={}\n", cfg.token));
    for (id, p) in &cfg.members {
        text.push_str(&format!("member={id}={}={}\n", p.name, p.addr));
    }
    text
}

/// The identity a `member` file records: a founding member's (the initial members are its
/// first voters) or a joined member's (its voters come from the log). Its name and API must
/// be this server's, and its token too when `--initial-cluster-token` is given.
fn recorded_identity(cfg: &ServeConfig, text: &str) -> Result<Identity, ServeError> {
    let bad = |reason: String| ServeError::ForeignData { dir: cfg.data_dir.clone(), reason };
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
    let name = field("name").unwrap_or("");
    if name != cfg.name {
        return Err(bad(format!("it holds the data of member {name:?}, but this server is {:?}", cfg.name)));
    }
    let api = field("api").unwrap_or("sixfive");
    if api != cfg.api.name() {
        return Err(bad(format!("it holds data of the {api} API, but this server has --api {}", cfg.api.name())));
    }
    if let Some(token) = field("token")
        && cfg.token_given
        && token != cfg.token
    {
        return Err(bad(format!(
            "it holds another cluster's data (token {token:?}), but --initial-cluster-token is {:?}",
            cfg.token
        )));
    }
    let cluster_id = field("cluster-id")
        .and_then(|c| u64::from_str_radix(c, 16).ok())
        .ok_or_else(|| bad("its member file has no cluster id".into()))?;
    let id = field("id").and_then(|c| c.parse().ok()).ok_or_else(|| bad("its member file has no id".into()))?;
    let mut members = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("member=")) {
        let mut it = l.splitn(3, '=');
        let (Some(i), Some(n), Some(a)) = (it.next(), it.next(), it.next()) else {
            return Err(bad(format!("its member file has a malformed line member={l}")));
        };
        let i = i.parse().map_err(|_| bad(format!("its member file has a malformed line member={l}")))?;
        members.insert(i, Peer { name: n.into(), addr: a.into() });
    }
    let Some(mine) = members.get(&id) else {
        return Err(bad(format!("its member file does not list its own id {id}")));
    };
    // Peers reach a member at the address it was added under; there is no changing it.
    if !cfg.advertise_peer.contains(&mine.addr) {
        return Err(bad(format!(
            "its member {id} has the peer URL http://{}, but this server advertises {}: a member keeps \
             its peer URL (to move it, remove the member and add a new one)",
            mine.addr,
            cfg.advertise_peer.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>().join(",")
        )));
    }
    let joined = text.lines().any(|l| l == "joined=1");
    if cfg.initial_cluster_given && !joined && members != cfg.members {
        let list = |m: &BTreeMap<NodeId, Peer>| {
            m.values().map(|p| format!("{}=http://{}", p.name, p.addr)).collect::<Vec<_>>().join(",")
        };
        warn!(
            "--initial-cluster {} ignored: the data directory is member {id} of a cluster born as {}; \
             the membership since is in the log",
            list(&cfg.members),
            list(&members)
        );
    }
    let voters = if joined { Vec::new() } else { members.keys().copied().collect() };
    Ok(Identity { id, cluster_id, base: Directory::of(members), voters })
}

fn write_member_file(dir: &Path, text: &str) -> Result<(), ServeError> {
    let (tmp, path) = (dir.join("member.tmp"), dir.join("member"));
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("syncing the member file"))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", path.display())))?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("syncing the data directory"))
}

/// The lines that name the cluster and member a data directory belongs to.
fn member_header(cfg: &ServeConfig) -> String {
    let mut text = format!("cluster-id={:016x}\nname={}\nid={}\n", cfg.cluster_id(), cfg.name, cfg.id);
    // The state machines differ: a data directory serves the API it was made with.
    if cfg.api != Api::Sixfive {
        text.push_str(&format!("api={}\n", cfg.api.name()));
    }
    text
}

/// Checks a member file of an older sixfive (only [`member_header`]'s lines, `have`): the
/// flags must name the same cluster and member, as at its first start.
fn check_older_member_file(cfg: &ServeConfig, have: &str) -> Result<(), ServeError> {
    let want = member_header(cfg);
    if have == want {
        return Ok(());
    }
    Err(ServeError::ForeignData {
        dir: cfg.data_dir.clone(),
        reason: format!(
            "it holds the data of [{}], but this server is [{}] (another cluster's data, or another \
             member's). Its member file is an older sixfive's, which did not record the members: start \
             it once with its original --initial-cluster and --initial-cluster-token, and later starts \
             may leave them out",
            have.trim().replace('\n', " "),
            want.trim().replace('\n', " ")
        ),
    })
}

/// Refuses a data directory that names a member but has lost its Raft log: started without
/// its vote and its log, a member could vote twice in a term, or count for entries it no
/// longer holds.
pub(crate) fn check_raft_log_kept(dir: &Path) -> Result<(), ServeError> {
    if dir.join("raft").join("raft.log").exists() {
        return Ok(());
    }
    Err(ServeError::ForeignData {
        dir: dir.to_path_buf(),
        reason: "it names a member but holds no Raft log (raft/raft.log): that member's votes and log \
                 are lost, and starting it without them could elect two leaders in one term. Remove the \
                 member and add a new one (or, for a shard group, rebuild the group); if this server's \
                 very first start was interrupted, remove the data directory and start again"
            .into(),
    })
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Follower => "follower",
        Role::PreCandidate => "precandidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
    }
}

/// The member's status as `kv status` shows it.
pub fn member_status<M: StateMachine>(n: &Member<M>, name: &str, raft_dir: &Path) -> MemberStatus {
    member_status_of(n.rsm().status(), name, raft_dir)
}

/// A member's status from its Raft status and the sizes of its files in `raft_dir`.
pub(crate) fn member_status_of(st: sixfive_raft::Status, name: &str, raft_dir: &Path) -> MemberStatus {
    MemberStatus {
        id: st.id,
        name: name.to_string(),
        role: role_name(st.role).into(),
        term: st.term,
        leader: st.leader,
        commit: st.commit,
        applied: st.applied,
        last_index: st.last_index,
        snapshot_index: st.snapshot_index,
        log_bytes: file_len(&raft_dir.join("raft.log")),
        snapshot_bytes: file_len(&raft_dir.join("raft.snapshot")),
    }
}

/// A state machine a server process can run, with what its client port speaks.
pub(crate) trait Served: StateMachine + Sized + Send + 'static {
    /// The empty state machine for this configuration.
    fn create(cfg: &ServeConfig) -> Self;
    /// A cheap read-only query for the health check (answered after a ReadIndex round).
    fn health_query() -> Vec<u8>;
    /// Serves the client listeners; returns their tasks (aborted to stop accepting).
    fn serve_clients(sh: Arc<Shared<Self>>, listeners: Vec<TcpListener>) -> Vec<tokio::task::JoinHandle<()>>;
}

impl Served for KvSm {
    fn create(_: &ServeConfig) -> Self {
        KvSm::default()
    }

    fn health_query() -> Vec<u8> {
        postcard::to_allocvec(&Op::Get { key: "\u{0}health".into() }).expect("encodes")
    }

    fn serve_clients(sh: Arc<Shared<Self>>, listeners: Vec<TcpListener>) -> Vec<tokio::task::JoinHandle<()>> {
        listeners
            .into_iter()
            .map(|l| {
                let sh = sh.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((s, addr)) = l.accept().await else { continue };
                        tokio::spawn(serve_client(s, addr, sh.clone()));
                    }
                })
            })
            .collect()
    }
}

/// Client connections.
#[derive(Default)]
struct Clients {
    conns: Mutex<BTreeMap<Endpoint, Arc<Outbox>>>,
}

/// What the peer links follow (see [`Shared::follow_membership`]).
#[derive(Default)]
struct Linked {
    key: Option<(u64, bool, Option<NodeId>)>,
    conf: sixfive_raft::ConfState,
    peers: BTreeMap<NodeId, Peer>,
    tracked: Vec<NodeId>,
    joinable: std::collections::BTreeSet<NodeId>,
}

struct NodeRouter {
    peers: Arc<PeerNet>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    /// Client connections the node replied to since its last flush. (Peers' messages still go
    /// through their link's task: writing them on the loop measured 4% fewer writes/s, as the
    /// leader's loop then also carries the sends' work, loopback delivery included.)
    outboxes: Arc<Outboxes>,
}

impl Router for NodeRouter {
    fn send(&self, to: Endpoint, bytes: Vec<u8>) {
        self.peers.send(to, bytes);
    }

    fn reply(&self, to: Endpoint, call: CallId, bytes: Vec<u8>) {
        // RsmReply::Done is variant 0.
        self.metrics.request(bytes.first() == Some(&0));
        if to == INTERNAL_ENDPOINT {
            self.peers.calls.answer(call, bytes);
            return;
        }
        if let Some(peer) = peer::forwarded_by(to) {
            self.peers.reply(peer, call, bytes);
            return;
        }
        let out = self.clients.conns.lock().expect("clients").get(&to).cloned();
        if let Some(out) = out
            && out.push(&ServerMsg::reply_head(call, bytes.len()), &bytes)
        {
            self.outboxes.mark(&out);
        }
    }

    fn flush(&self) {
        self.outboxes.flush();
    }
}

/// What the network tasks of one server share.
pub(crate) struct Shared<M: StateMachine> {
    pub(crate) me: NodeId,
    pub(crate) name: String,
    pub(crate) cluster_id: u64,
    pub(crate) raft_dir: PathBuf,
    /// The member directory while the configuration carries none (see [`crate::members`]).
    base: Directory,
    /// The membership after the latest batch (client URLs aside).
    view: Mutex<MembersView>,
    /// What the peer links were last set to follow.
    links: Mutex<Linked>,
    /// This member was removed from the cluster, and the removal is committed: it stops.
    pub(crate) removed: AtomicBool,
    /// The base election timeout.
    pub(crate) election_timeout: Duration,
    pub(crate) input: mpsc::Sender<Input<Member<M>>>,
    pub(crate) peers: Arc<PeerNet>,
    clients: Arc<Clients>,
    next_client: AtomicU64,
    metrics: Arc<Metrics>,
    /// The node's Raft status after its latest batch.
    status: Mutex<sixfive_raft::Status>,
    /// The applied index after the latest batch.
    pub(crate) applied: tokio::sync::watch::Sender<u64>,
}

impl<M: Served> Shared<M> {
    /// Runs `f` on the node and returns its result (None if the node is gone).
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Member<M>, &mut dyn Ctx) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job: driver::Job<Member<M>> = Box::new(move |n, ctx| {
            let _ = tx.send(f(n, ctx));
        });
        self.input.send(Input::With(job)).await.ok()?;
        rx.await.ok()
    }

    /// The node's Raft status after its latest batch of events.
    pub(crate) fn status(&self) -> sixfive_raft::Status {
        self.status.lock().expect("status").clone()
    }

    /// Called by the node's loop after every batch.
    fn observe(&self, n: &Member<M>) {
        let st = n.rsm().status();
        self.metrics.observe(&st);
        self.applied.send_if_modified(|a| std::mem::replace(a, st.applied) != st.applied);
        // A leader keeps replicating to the members it still tracks (one removed learns of it).
        let tracked: Vec<NodeId> = n.rsm().raw_node().progress().keys().copied().collect();
        self.follow_membership(&st, tracked);
        *self.status.lock().expect("status") = st;
    }

    /// Makes the peer links and the membership view follow the configuration in effect: links
    /// to every member of it, and to the members of the one before while it is uncommitted or
    /// the leader still replicates to them (so a removed member learns of its removal); a
    /// committed removal of this member stops it.
    fn follow_membership(&self, st: &sixfive_raft::Status, tracked: Vec<NodeId>) {
        let committed = st.commit >= st.conf_index;
        let mut linked = self.links.lock().expect("links");
        let key = (st.conf_index, committed, st.leader);
        if linked.key == Some(key) && linked.conf == st.conf && linked.tracked == tracked {
            return;
        }
        let dir = Directory::in_effect(&st.conf, &self.base);
        let members = dir.members_of(&st.conf);
        let mut peers = members.clone();
        for (id, p) in &linked.peers {
            if !committed || tracked.contains(id) {
                peers.entry(*id).or_insert_with(|| p.clone());
            }
        }
        // Servers may join as the learners of the committed configuration.
        let joinable: std::collections::BTreeSet<NodeId> =
            st.conf.learners.iter().copied().filter(|id| committed || linked.joinable.contains(id)).collect();
        self.peers.set_members(&peers, &dir.members, &joinable);
        *self.view.lock().expect("view") = MembersView {
            answered_by: self.me,
            leader: st.leader,
            members: dir.entries(&st.conf),
            conf_index: st.conf_index,
            settled: committed && !st.conf.is_joint(),
            next_id: dir.next_id(),
        };
        *linked = Linked { key: Some(key), conf: st.conf.clone(), peers, tracked, joinable };
        if st.removed && committed && !self.removed.swap(true, Ordering::Relaxed) {
            warn!(conf_index = st.conf_index, "this member was removed from the cluster: it stops serving");
        }
    }

    /// The membership as this member sees it, with the client URLs its peers told.
    pub(crate) fn members_view(&self) -> MembersView {
        let mut v = self.view.lock().expect("view").clone();
        let (urls, names) = (self.peers.client_urls(), self.peers.names());
        for m in &mut v.members {
            m.client_urls = urls.get(&m.id).cloned().unwrap_or_default();
            if m.name.is_empty() {
                // Added without a name (etcd's MemberAdd): the one it told when it connected.
                m.name = names.get(&m.id).cloned().unwrap_or_default();
            }
        }
        v
    }

    /// Sends `request` to the leader's node (this member's, or forwarded over the peer link)
    /// and returns its reply; None if no leader answered within `timeout`.
    async fn ask_leader(&self, request: &RsmRequest, timeout: Duration) -> Option<RsmReply> {
        let bytes = postcard::to_allocvec(request).expect("encodes");
        let reply = match self.status().leader {
            Some(l) if l != self.me => {
                let (call, rx) = self.peers.call(l, bytes)?;
                let r = tokio::time::timeout(timeout, rx).await;
                self.peers.calls.forget(call);
                r.ok()?.ok()?
            }
            _ => self.ask_local(bytes, timeout).await?,
        };
        postcard::from_bytes(&reply).ok()
    }

    /// Makes membership change `op` at the leader: reads the leader's membership, plans the
    /// change against it, and proposes it there, again while the leader is busy with another
    /// change, is unknown or changes, or a learner to promote is still catching up (`within`).
    /// Returns the id of the member concerned and the membership the change was planned from.
    pub(crate) async fn change_members(
        &self,
        op: &MemberOp,
        within: Duration,
    ) -> Result<(NodeId, MembersView), ChangeError> {
        let deadline = std::time::Instant::now() + within;
        let mut last = ChangeError::Unavailable("no leader answered".into());
        while std::time::Instant::now() < deadline {
            let pause = || tokio::time::sleep(Duration::from_millis(100));
            let Some(RsmReply::Done(b)) = self.ask_leader(&RsmRequest::Membership, Duration::from_secs(2)).await else {
                pause().await;
                continue;
            };
            let Ok(m) = postcard::from_bytes::<sixfive_rsm::Membership>(&b) else {
                return Err(ChangeError::Unavailable("undecodable membership".into()));
            };
            if m.leader.is_none() || !m.settled {
                last = ChangeError::Unavailable("a membership change is in progress".into());
                pause().await;
                continue;
            }
            let view = self.view_of(&m);
            let (request, id) = crate::members::plan(op, &view)?;
            match self.ask_leader(&request, Duration::from_secs(5)).await {
                Some(RsmReply::Done(_)) => return Ok((id, view)),
                Some(RsmReply::Failed(sixfive_rsm::SubmitError::MembershipRefused { retryable: false, reason })) => {
                    return Err(ChangeError::Invalid(reason));
                }
                Some(RsmReply::Failed(sixfive_rsm::SubmitError::Abandoned { .. })) | None => {
                    return Err(ChangeError::Unavailable(
                        "the leader changed or did not answer: the change may or may not be made; list the members"
                            .into(),
                    ));
                }
                Some(RsmReply::Failed(sixfive_rsm::SubmitError::MembershipRefused { reason, .. }))
                    if matches!(op, MemberOp::Promote(_)) && reason.contains("catches up") =>
                {
                    last = ChangeError::LearnerBehind(reason)
                }
                Some(RsmReply::Failed(e)) => last = ChangeError::Unavailable(e.to_string()),
                Some(RsmReply::Malformed(e)) => return Err(ChangeError::Invalid(e)),
            }
            pause().await;
        }
        Err(last)
    }

    /// The membership a node reports, with its directory (this member's base when the
    /// configuration carries none).
    fn view_of(&self, m: &sixfive_rsm::Membership) -> MembersView {
        let dir = Directory::in_effect(&m.conf, &self.base);
        MembersView {
            answered_by: m.leader.unwrap_or(0),
            leader: m.leader,
            members: dir.entries(&m.conf),
            conf_index: m.conf_index,
            settled: m.settled,
            next_id: dir.next_id(),
        }
    }

    /// The leader promotes the learners added as voters once they have caught up (retried
    /// every 200 ms while they lag).
    async fn promote_caught_up(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let view = self.members_view();
            if view.leader != Some(self.me) || !view.settled {
                continue;
            }
            // Each candidate in turn: one that never starts must not hold up the others.
            for m in view.members.iter().filter(|m| m.learner && m.promote) {
                let Ok((request, id)) = crate::members::plan(&MemberOp::Promote(m.id), &view) else { continue };
                if let Some(RsmReply::Done(_)) = self.ask_leader(&request, Duration::from_secs(2)).await {
                    info!(id, "promoted learner {} to voter: it has caught up", m.name);
                    break;
                }
            }
        }
    }

    /// Sends an `RsmRequest` to this member's own node and waits for its reply (None if the
    /// node is gone or no reply came within `timeout`).
    pub(crate) async fn ask_local(&self, request: Vec<u8>, timeout: Duration) -> Option<Vec<u8>> {
        let (call, rx) = self.peers.calls.open();
        if self.input.send(Input::Request { from: INTERNAL_ENDPOINT, call, bytes: request }).await.is_err() {
            self.peers.calls.forget(call);
            return None;
        }
        let r = tokio::time::timeout(timeout, rx).await;
        self.peers.calls.forget(call);
        r.ok()?.ok()
    }

    /// Health: a leader answers a linearizable read (ReadIndex: a quorum confirms its
    /// leadership); a follower knows a leader (with check-quorum, a leader that lost its
    /// majority steps down, and followers that stop hearing from it lose it within an
    /// election timeout).
    async fn healthy(&self) -> bool {
        let st = self.status();
        if st.role != Role::Leader {
            return st.role == Role::Follower && st.leader.is_some();
        }
        let bytes = postcard::to_allocvec(&RsmRequest::Query(M::health_query())).expect("encodes");
        let r = self.ask_local(bytes, Duration::from_secs(1)).await;
        matches!(r, Some(b) if matches!(postcard::from_bytes::<RsmReply>(&b), Ok(RsmReply::Done(_))))
    }
}

/// Most bytes of replies waiting for one client connection (beyond, replies are dropped and
/// that client's calls time out, as with any lost reply).
const CLIENT_OUTBOX_BYTES: usize = 64 << 20;

/// How long a closed client connection may take to read the replies gathered for it.
const CLIENT_LINGER: Duration = Duration::from_secs(10);

/// Queues `m` for a client and sends it at once (from a network task: no batch to wait for).
fn send_to_client(out: &Outbox, m: &ServerMsg) {
    out.push(&postcard::to_allocvec(m).expect("encodes"), &[]);
    out.flush();
}

/// Serves one connection of the sixfive client protocol.
pub(crate) async fn serve_client<M: Served>(stream: TcpStream, addr: std::net::SocketAddr, sh: Arc<Shared<M>>) {
    let ep = sh.next_client.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let out = match Outbox::new(&stream, CLIENT_OUTBOX_BYTES) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            warn!("closing client connection from {addr}: {e}");
            return;
        }
    };
    let (r, w) = stream.into_split();
    sh.clients.conns.lock().expect("clients").insert(ep, out.clone());
    let writer = {
        let out = out.clone();
        tokio::spawn(async move { out.run_writer(w).await })
    };
    let mut r = BufReader::with_capacity(1 << 16, r);
    loop {
        match frame::read_msg::<_, ClientMsg>(&mut r, MAX_CLIENT_FRAME).await {
            Ok(ClientMsg::Hello { call }) => {
                let hello = ServerMsg::Hello { call, cluster_id: sh.cluster_id, id: sh.me, name: sh.name.clone() };
                send_to_client(&out, &hello);
            }
            Ok(ClientMsg::Call { call, body }) => {
                if sh.input.send(Input::Request { from: ep, call, bytes: body }).await.is_err() {
                    break;
                }
            }
            Ok(ClientMsg::Status { call }) => {
                let (name, dir, out) = (sh.name.clone(), sh.raft_dir.clone(), out.clone());
                let job: driver::Job<Member<M>> = Box::new(move |n, _| {
                    send_to_client(&out, &ServerMsg::Status { call, status: member_status(n, &name, &dir) });
                });
                if sh.input.send(Input::With(job)).await.is_err() {
                    break;
                }
            }
            Ok(ClientMsg::Members { call }) => {
                send_to_client(&out, &ServerMsg::Members { call, members: sh.members_view() });
            }
            Ok(ClientMsg::ChangeMembers { call, op }) => {
                let (sh, out) = (sh.clone(), out.clone());
                tokio::spawn(async move {
                    let result = sh.change_members(&op, MEMBER_CHANGE_RETRIES).await;
                    send_to_client(&out, &ServerMsg::MembersChanged { call, result });
                });
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                if !matches!(e, FrameError::Io(_)) {
                    sh.metrics.bad_connection("client");
                }
                warn!("closing client connection from {addr}: {e}");
                break;
            }
        }
    }
    // Replies already gathered still go out (a client may half-close and read its answers),
    // for as long as the client reads them.
    sh.clients.conns.lock().expect("clients").remove(&ep);
    out.finish();
    let _ = tokio::time::timeout(CLIENT_LINGER, writer).await;
    out.close();
}

async fn serve_http<M: Served>(stream: TcpStream, sh: Arc<Shared<M>>) {
    let mut stream = stream;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    })
    .await;
    if !matches!(read, Ok(Some(()))) {
        return;
    }
    let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string();
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => {
            sh.metrics.set_extra("log_bytes", file_len(&sh.raft_dir.join("raft.log")));
            sh.metrics.set_extra("snapshot_bytes", file_len(&sh.raft_dir.join("raft.snapshot")));
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", sh.metrics.render())
        }
        "/health" => {
            if sh.healthy().await {
                ("200 OK", "application/json", "{\"health\":\"true\"}\n".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "application/json",
                    "{\"health\":\"false\",\"reason\":\"no leader or no quorum\"}\n".to_string(),
                )
            }
        }
        _ => ("404 Not Found", "text/plain", "not found: try /metrics or /health\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn bind(urls: &[String], what: &str) -> Result<Vec<TcpListener>, ServeError> {
    let mut out = Vec::new();
    for a in urls {
        out.push(TcpListener::bind(a).await.map_err(io(format!("cannot listen for {what} on http://{a}")))?);
    }
    Ok(out)
}

/// Runs the server until SIGTERM or SIGINT (graceful stop: returns `Ok`) or until the node
/// fails (returns the error; the caller exits non-zero).
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    match cfg.api {
        Api::Sixfive => run::<KvSm>(cfg),
        Api::Etcd => run::<sixfive_etcd::EtcdSm>(cfg),
    }
}

fn run<M: Served>(cfg: ServeConfig) -> Result<(), ServeError> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let (rt, loop_rt) = runtimes(cfg.io_threads)?;
    let who = identity(&cfg, &rt)?;
    let raft_dir = cfg.data_dir.join("raft");
    let storage = FileStorage::open(&raft_dir)?;
    let metrics = Arc::new(Metrics::new());
    let mut raft = Config::new(who.id, who.voters.clone());
    raft.heartbeat_ticks = cfg.heartbeat_ticks;
    raft.election_ticks = cfg.election_ticks;
    raft.seed = driver::now_micros() ^ who.id.rotate_left(32);
    // Replies the node gathered go out before its loop blocks in a sync.
    let outboxes = Arc::new(Outboxes::default());
    let flush = outboxes.clone();
    let storage = MeteredStorage::new(storage, metrics.clone(), cfg.sync_elsewhere_above_us)
        .with_sync_delay(Duration::from_micros(cfg.sync_delay_us))
        .with_before_sync(Box::new(move || flush.flush()));
    let rsm = Rsm::new(raft, storage, M::create(&cfg), Some(cfg.snapshot_bytes))
        .map_err(|e| ServeError::Config(e.to_string()))?
        .with_amortized_snapshots()
        .with_background_snapshots()
        .with_pipelined_persistence();
    let restored = rsm.status();
    let node: Member<M> = RsmNode::new(rsm).with_group_commit();
    let cluster_id = who.cluster_id;
    // The network's tasks (and its sockets' readiness): on the node's own thread, or on the
    // I/O threads.
    let net = loop_rt.as_ref().unwrap_or(&rt);
    let (peer_l, client_l) = net.block_on(async {
        Ok::<_, ServeError>((bind(&cfg.listen_peer, "peers").await?, bind(&cfg.listen_client, "clients").await?))
    })?;
    let metrics_l = rt.block_on(bind(&cfg.listen_metrics, "metrics"))?;
    let net = net.handle().clone();
    let (input, rx) = driver::channel::<Member<M>>();
    let me = peer::Me { id: who.id, cluster_id, client_urls: cfg.advertise_client.clone(), name: cfg.name.clone() };
    let (peers, mut tasks) = {
        let _g = net.enter();
        peer::start(me, &who.base.members, peer_l, input.clone(), metrics.clone())
    };
    let peers = Arc::new(peers);
    let clients = Arc::new(Clients::default());
    let router = Arc::new(NodeRouter {
        peers: peers.clone(),
        clients: clients.clone(),
        metrics: metrics.clone(),
        outboxes: outboxes.clone(),
    });
    let sh = Arc::new(Shared {
        me: who.id,
        name: cfg.name.clone(),
        cluster_id,
        raft_dir: raft_dir.clone(),
        base: who.base.clone(),
        view: Mutex::new(MembersView::default()),
        links: Mutex::new(Linked::default()),
        removed: AtomicBool::new(false),
        election_timeout: Duration::from_micros(cfg.election_ticks as u64 * TICK_MICROS),
        input: input.clone(),
        peers,
        clients,
        next_client: AtomicU64::new(CLIENT_ENDPOINTS),
        metrics,
        status: Mutex::new(restored.clone()),
        applied: tokio::sync::watch::channel(restored.applied).0,
    });
    let sh2 = sh.clone();
    let observer: driver::Observer<Member<M>> = Box::new(move |n: &Member<M>| sh2.observe(n));
    let client_tasks = {
        let _g = rt.enter();
        for l in metrics_l {
            let sh = sh.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else { continue };
                    tokio::spawn(serve_http(s, sh.clone()));
                }
            }));
        }
        tasks.push(tokio::spawn(sh.clone().promote_caught_up()));
        let _g = net.enter();
        M::serve_clients(sh.clone(), client_l)
    };
    let handle = driver::spawn_on(loop_rt, who.id, node, router, Some(observer), (input, rx));
    info!(
        name = %cfg.name,
        id = who.id,
        api = cfg.api.name(),
        cluster_id = %format!("{cluster_id:016x}"),
        clients = %cfg.advertise_client.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>().join(","),
        peers = %cfg.listen_peer.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>().join(","),
        term = restored.term,
        commit = restored.commit,
        snapshot = restored.snapshot_index,
        last_index = restored.last_index,
        "serving"
    );

    let (signal, handle) = wait_for_stop(&rt, handle, &sh.removed)?;
    info!("{signal}: stopping (no new clients; handing off leadership; answering what waits)");
    for t in &client_tasks {
        t.abort();
    }
    rt.block_on(async {
        let me = who.id;
        let moved = sh
            .with(move |n, _ctx| {
                let raw = n.rsm_mut().raw();
                if raw.status().role != Role::Leader {
                    return None;
                }
                let best = raw.progress().iter().filter(|(id, _)| **id != me).max_by_key(|(_, p)| p.match_index);
                let to = best.map(|(id, _)| *id)?;
                raw.transfer_leader(to).ok().map(|_| to)
            })
            .await
            .flatten();
        if let Some(to) = moved {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let role = sh.with(|n, _| n.rsm().status().role).await;
                if role != Some(Role::Leader) {
                    info!("leadership handed to member {to}");
                    break;
                }
            }
        }
        let _ = sh.input.send(Input::Shutdown).await;
    });
    let result = handle.join();
    // Let the replies to what waited go out.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    for t in tasks {
        t.abort();
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => {
            info!("stopped cleanly");
            Ok(())
        }
        Err(e) => Err(ServeError::NodeFailed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_threads_default_to_the_nodes_own_thread_and_are_range_checked() {
        let cfg = |toml: &str| {
            let mut raw = RawConfig::default();
            raw.fill_from_toml(toml).expect("toml");
            ServeConfig::from_raw(&raw)
        };
        let threads = |c: ServeConfig| (c.io_threads, c.sync_elsewhere_above_us);
        // The network on the node's thread, whose syncs then go elsewhere.
        assert_eq!(threads(cfg("").unwrap()), (0, 0));
        assert_eq!(threads(cfg("io-threads = 0").unwrap()), (0, 0));
        assert_eq!(threads(cfg("io-threads = 3").unwrap()), (3, DEFAULT_SYNC_ELSEWHERE_ABOVE_US));
        assert_eq!(threads(cfg("io-threads = 3\nsync-elsewhere-above-us = 7").unwrap()), (3, 7));
        assert_eq!(threads(cfg("sync-elsewhere-above-us = 7").unwrap()), (0, 7));
        for bad in ["io-threads = 5000", "io-threads = \"many\"", "io-threads = -1"] {
            let err = cfg(bad).unwrap_err().to_string();
            assert!(err.contains("--io-threads"), "{bad}: {err}");
        }
    }

    /// A founding member's data directory says who it is: a restart with another
    /// `--initial-cluster` (the membership has changed since) keeps the recorded id, cluster
    /// id, first voters and their addresses; another name, API, peer URL or (given) token is
    /// refused. A member file of the older shape (no members listed) is checked against the
    /// flags, then brought up to date.
    #[test]
    fn a_restart_takes_its_identity_from_the_data_directory() {
        let dir = std::env::temp_dir().join(format!("sixfive-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let raw = |name: &str, extra: &str| {
            let mut raw = RawConfig::default();
            let toml = format!("name = \"{name}\"\ndata-dir = \"{}\"\n{extra}", dir.display());
            raw.fill_from_toml(&toml).expect("toml");
            ServeConfig::from_raw(&raw)
        };
        let cfg = |extra: &str| raw("n2", extra).unwrap();
        let refused = |extra: &str| identity(&cfg(extra), &rt).unwrap_err().to_string();
        let first = "initial-cluster = \"n1=http://127.0.0.1:1,n2=http://127.0.0.1:2,n3=http://127.0.0.1:3\"\n\
                     initial-cluster-token = \"t\"\nlisten-peer-urls = \"http://127.0.0.1:2\"";
        let born = identity(&cfg(first), &rt).unwrap();
        assert_eq!((born.id, born.voters.clone()), (2, vec![1, 2, 3]));
        let text = std::fs::read_to_string(dir.join("member")).unwrap();
        // No start without the Raft log (lost, or the first start died before the storage made
        // it): a member without its votes could vote twice in a term.
        assert!(refused(first).contains("holds no Raft log"));
        std::fs::create_dir_all(dir.join("raft")).unwrap();
        std::fs::write(dir.join("raft").join("raft.log"), b"").unwrap();
        assert!(text.contains("token=t\n") && text.contains("member=3=n3=127.0.0.1:3\n"), "{text}");
        // A sixfive member's file names no API (as older files, which compare whole); an etcd
        // member's does.
        assert!(!text.contains("api="), "{text}");
        assert!(member_header(&cfg(&format!("{first}\napi = \"etcd\""))).contains("api=etcd\n"));
        let addrs = |who: &Identity| who.base.members.iter().map(|(i, p)| (*i, p.addr.clone())).collect::<Vec<_>>();

        // n3 was removed and n4, n5 added; n2 restarts with the list of today, in another
        // order (where it would be id 1), or with no list at all, and no token or the same.
        let today = "initial-cluster = \"n2=http://127.0.0.1:2,n1=http://127.0.0.1:1,n4=http://127.0.0.1:4,\
                     n5=http://127.0.0.1:5\"\nlisten-peer-urls = \"http://127.0.0.1:2\"";
        let same_token = format!("{today}\ninitial-cluster-token = \"t\"");
        for flags in [today, "listen-peer-urls = \"http://127.0.0.1:2\"", &same_token] {
            let again = identity(&cfg(flags), &rt).unwrap();
            assert_eq!((again.id, again.cluster_id, again.voters.clone()), (2, born.cluster_id, vec![1, 2, 3]));
            assert_eq!(addrs(&again), addrs(&born));
        }
        // What contradicts the file is refused, and changes nothing.
        assert!(refused(&format!("{today}\ninitial-cluster-token = \"other\"")).contains("another cluster's data"));
        assert!(
            refused(&format!("{today}\napi = \"etcd\"")).contains("the sixfive API, but this server has --api etcd")
        );
        let moved = refused("listen-peer-urls = \"http://127.0.0.1:9\"");
        assert!(
            moved.contains("peer URL http://127.0.0.1:2, but this server advertises http://127.0.0.1:9"),
            "{moved}"
        );
        let as_n1 = first.replace("127.0.0.1:2\"", "127.0.0.1:1\"");
        let err = identity(&raw("n1", &as_n1).unwrap(), &rt).unwrap_err();
        assert!(err.to_string().contains("member \"n2\""), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("member")).unwrap(), text);
        let no_self = text.replace("member=2=n2=127.0.0.1:2\n", "");
        std::fs::write(dir.join("member"), &no_self).unwrap();
        assert!(refused(today).contains("does not list its own id 2"));

        // The older shape: only the header, which the flags must match; then rewritten.
        let old = member_header(&cfg(first));
        std::fs::write(dir.join("member"), &old).unwrap();
        let err = refused(today);
        assert!(err.contains("another cluster's data, or another member's") && err.contains("start it once"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("member")).unwrap(), old, "a refusal changes nothing");
        assert_eq!(identity(&cfg(first), &rt).unwrap().voters, vec![1, 2, 3]);
        assert_eq!(std::fs::read_to_string(dir.join("member")).unwrap(), text, "brought up to date");
        assert_eq!(identity(&cfg(today), &rt).unwrap().id, 2);

        // What the file could not hold is refused in the flags.
        for bad in ["initial-cluster-token = \"t\\nmember=9=x=127.0.0.1:9\"", "initial-cluster-token = \"\""] {
            let err = raw("n2", &format!("{today}\n{bad}")).unwrap_err().to_string();
            assert!(err.contains("--initial-cluster-token"), "{err}");
        }
        assert!(raw("n2\\njoined=1", "").unwrap_err().to_string().contains("control characters"));
        let err = raw("n2", "initial-cluster = \"n2=http://127.0.0.1:2380,n\\r1=http://127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
