//! The sharded key/value service as server processes: a shard-controller member
//! ([`sixfive_shardkv::CtrlerServer`]) or a replica-group member ([`sixfive_shardkv::ShardServer`])
//! on `FileStorage`, driven by [`crate::driver`] exactly as the simulator drives them.
//!
//! ## Addresses
//!
//! The sharded service names every server by an [`Endpoint`]: Raft ids inside a group, the
//! servers of each group in the controller's configurations, the targets of shard pushes and
//! the servers a clerk calls. Here a server's endpoint *is* its address: the IPv4 address and
//! port of its peer URL, `ip << 16 | port` ([`endpoint_of`], [`addr_of`]). So a group that joins
//! later is reachable by every other server and clerk with no directory to keep in step.
//!
//! One port per server carries both protocols: a connection whose first frame is a
//! [`PeerHello`] (with [`PEER_MAGIC`]) is a peer's (one-way: the dialer sends, each side dials
//! its own connection to the other); any other first frame must be a [`ClientMsg`] and the
//! connection is a client's. `--listen-client-urls`, when given, adds more listeners of the same
//! kind; the address in configurations is the peer URL.
//!
//! Peers are reached on demand: the first message to an endpoint starts a link that dials it,
//! with backoff, a bounded queue (Raft and the shard protocol tolerate loss: full queues drop)
//! and a cluster-id handshake derived from `--initial-cluster-token` (servers of another
//! deployment are refused with a logged reason).
//!
//! ## Status
//!
//! Besides [`ClientMsg::Status`] (the Raft view, as `kv status` shows it), a client may send a
//! [`ClientMsg::Call`] whose body is [`SHARD_INFO_REQUEST`]: the answer is a [`ShardInfo`]
//! (role, group, configuration number, each shard's state and key count), answered by the
//! member itself from its applied state, whoever leads.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sixfive_raft::Config;
use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node, RpcError, Transport};
use sixfive_rsm::{Rsm, RsmNode};
use sixfive_shardkv::{CtrlerServer, CtrlerSm, Gid, NSHARDS, ShardServer, ShardSm, ShardState};
use sixfive_storage::FileStorage;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::client::TcpTransport;
use crate::driver::{self, Driven, Input, Router};
use crate::frame::{self, FrameError, MAX_CLIENT_FRAME, MAX_PEER_FRAME};
use crate::metrics::{MeteredStorage, Metrics};
use crate::proto::{ClientMsg, MemberStatus, PEER_MAGIC, PeerHello, PeerWelcome, ServerMsg};
use crate::server::{ServeConfig, ServeError, lock_data_dir};

/// A controller member's node.
pub type CtrlerNode = CtrlerServer<MeteredStorage<FileStorage>>;
/// A replica-group member's node.
pub type GroupNode = ShardServer<MeteredStorage<FileStorage>>;

/// Client connections get endpoints from here up (server endpoints are below 2^48).
const CLIENT_ENDPOINTS: Endpoint = 1 << 60;
/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Replies queued for one client connection before new ones are dropped.
const CLIENT_QUEUE: usize = 8192;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The body of a [`ClientMsg::Call`] that asks a member for its [`ShardInfo`] (no
/// `RsmRequest` starts with this byte).
pub const SHARD_INFO_REQUEST: &[u8] = b"\xffshardkv-info";

/// The endpoint of the server whose peer address is `addr` (`a.b.c.d:port`, IPv4).
pub fn endpoint_of(addr: &str) -> Result<Endpoint, ServeError> {
    let sa: SocketAddrV4 = addr.parse().map_err(|_| {
        ServeError::Config(format!(
            "{addr}: the sharded service names servers by IPv4 address and port (a.b.c.d:port); host names and IPv6 are not supported"
        ))
    })?;
    let ip = u32::from(*sa.ip());
    if ip >> 24 == 0 || sa.port() == 0 {
        return Err(ServeError::Config(format!("{addr}: not an address other servers can reach")));
    }
    Ok(((ip as u64) << 16) | sa.port() as u64)
}

/// The endpoint of `http://a.b.c.d:port` (or `a.b.c.d:port`).
pub fn endpoint_of_url(url: &str) -> Result<Endpoint, ServeError> {
    let url = url.trim();
    let addr = if url.contains("://") { crate::server::parse_url(url)? } else { url.to_string() };
    endpoint_of(&addr)
}

/// The address (`a.b.c.d:port`) of server endpoint `e`.
pub fn addr_of(e: Endpoint) -> String {
    format!("{}:{}", Ipv4Addr::from((e >> 16) as u32), e & 0xffff)
}

/// The URL of server endpoint `e`.
pub fn url_of(e: Endpoint) -> String {
    format!("http://{}", addr_of(e))
}

/// The id shared by every server of one sharded deployment (from its token).
pub fn shard_cluster_id(token: &str) -> u64 {
    crate::server::cluster_id(&format!("shardkv\n{token}"), &BTreeMap::new())
}

/// What a member serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardRole {
    /// A member of the shard controller's group.
    Ctrler,
    /// A member of replica group `gid`.
    Group(Gid),
}

/// A checked configuration of one sharded-service member.
#[derive(Clone, Debug)]
pub struct ShardServeConfig {
    /// The settings shared with `kv serve` (name, data dir, URLs, `--initial-cluster` of this
    /// member's own group, token, Raft timing, snapshot threshold).
    pub base: ServeConfig,
    /// Controller or group member.
    pub role: ShardRole,
    /// The controller members' endpoints (for a controller member: its own group).
    pub ctrlers: Vec<Endpoint>,
    /// Extra client listeners (only those given explicitly).
    pub extra_client: Vec<String>,
}

impl ShardServeConfig {
    /// Checks the role-specific settings. `ctrler_urls` are the controller members' peer URLs
    /// (required for a group member, ignored for a controller member).
    pub fn new(
        base: ServeConfig,
        role: ShardRole,
        ctrler_urls: Option<&str>,
        extra_client: Vec<String>,
    ) -> Result<ShardServeConfig, ServeError> {
        if !base.listen_metrics.is_empty() {
            return Err(ServeError::Config(
                "--listen-metrics-urls is not supported by `shardkv serve` yet (use `shardkv status`)".into(),
            ));
        }
        if role == ShardRole::Group(0) {
            return Err(ServeError::Config("--gid 0 is reserved (\"no group\"); use 1 or more".into()));
        }
        for p in base.members.values() {
            endpoint_of(&p.addr)?;
        }
        let ctrlers = match role {
            ShardRole::Ctrler => base.members.values().map(|p| endpoint_of(&p.addr)).collect::<Result<_, _>>()?,
            ShardRole::Group(_) => {
                let urls = ctrler_urls.ok_or_else(|| {
                    ServeError::Config("a group member needs --ctrler-endpoints (the controller's peer URLs)".into())
                })?;
                let v: Vec<Endpoint> =
                    urls.split(',').filter(|u| !u.trim().is_empty()).map(endpoint_of_url).collect::<Result<_, _>>()?;
                if v.is_empty() {
                    return Err(ServeError::Config("--ctrler-endpoints: no URL given".into()));
                }
                v
            }
        };
        Ok(ShardServeConfig { base, role, ctrlers, extra_client })
    }

    /// This member's endpoint (its peer address).
    pub fn me(&self) -> Endpoint {
        endpoint_of(&self.base.members[&self.base.id].addr).expect("checked")
    }

    /// Its group's endpoints (the Raft voters).
    pub fn group(&self) -> Vec<Endpoint> {
        self.base.members.values().map(|p| endpoint_of(&p.addr).expect("checked")).collect()
    }

    fn member_line(&self) -> String {
        let role = match self.role {
            ShardRole::Ctrler => "ctrler".to_string(),
            ShardRole::Group(g) => format!("group {g}"),
        };
        format!(
            "cluster-id={:016x}\nrole={role}\nname={}\nendpoint={}\ngroup={}\n",
            shard_cluster_id(&self.base.token),
            self.base.name,
            addr_of(self.me()),
            self.group().iter().map(|e| addr_of(*e)).collect::<Vec<_>>().join(",")
        )
    }
}

/// A member of the sharded service: a controller or a replica-group server.
#[allow(clippy::large_enum_variant)]
pub enum ShardNode {
    /// Controller member.
    Ctrler(CtrlerNode),
    /// Group member.
    Group(GroupNode),
}

impl ShardNode {
    fn rsm_status(&self) -> sixfive_raft::Status {
        match self {
            ShardNode::Ctrler(n) => n.node().rsm().status(),
            ShardNode::Group(n) => n.node().rsm().status(),
        }
    }

    /// This member's [`ShardInfo`].
    pub fn info(&self) -> ShardInfo {
        match self {
            ShardNode::Ctrler(n) => {
                let c = n.node().rsm().state_machine().config(None);
                ShardInfo {
                    role: "ctrler".into(),
                    gid: 0,
                    config: c.num,
                    states: vec![ShardState::Absent; NSHARDS],
                    keys: vec![0; NSHARDS],
                }
            }
            ShardNode::Group(n) => {
                let sm = n.sm();
                ShardInfo {
                    role: "group".into(),
                    gid: sm.gid(),
                    config: sm.config().num,
                    states: sm.states().to_vec(),
                    keys: sm.keys_held().to_vec(),
                }
            }
        }
    }
}

impl Node for ShardNode {
    fn on_start(&mut self, ctx: &mut dyn Ctx) {
        match self {
            ShardNode::Ctrler(n) => n.on_start(ctx),
            ShardNode::Group(n) => n.on_start(ctx),
        }
    }
    fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64) {
        match self {
            ShardNode::Ctrler(n) => n.on_timer(ctx, id),
            ShardNode::Group(n) => n.on_timer(ctx, id),
        }
    }
    fn on_message(&mut self, ctx: &mut dyn Ctx, from: Endpoint, message: Vec<u8>) {
        match self {
            ShardNode::Ctrler(n) => n.on_message(ctx, from, message),
            ShardNode::Group(n) => n.on_message(ctx, from, message),
        }
    }
    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
        match self {
            ShardNode::Ctrler(n) => n.on_request(ctx, from, call, request),
            ShardNode::Group(n) => n.on_request(ctx, from, call, request),
        }
    }
    fn on_shutdown(&mut self, ctx: &mut dyn Ctx) {
        match self {
            ShardNode::Ctrler(n) => n.on_shutdown(ctx),
            ShardNode::Group(n) => n.on_shutdown(ctx),
        }
    }
}

/// Group commit: the controller and group nodes defer their Ready loop to the end of each
/// batch, so every proposal of a batch is written and synced once.
impl Driven for ShardNode {
    fn end_of_batch(&mut self, ctx: &mut dyn Ctx) {
        match self {
            ShardNode::Ctrler(n) => n.flush(ctx),
            ShardNode::Group(n) => n.flush(ctx),
        }
    }
    fn failure(&self) -> Option<String> {
        match self {
            ShardNode::Ctrler(n) => n.node().failed().map(str::to_owned),
            ShardNode::Group(n) => n.node().failed().map(str::to_owned),
        }
    }
}

/// A member's view of the shards (see [`SHARD_INFO_REQUEST`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// `ctrler` or `group`.
    pub role: String,
    /// The group (0 for a controller member).
    pub gid: Gid,
    /// The configuration this member has applied (a controller member: its latest).
    pub config: u64,
    /// Each shard's state in this member (all `Absent` for a controller member).
    pub states: Vec<ShardState>,
    /// Keys held per shard.
    pub keys: Vec<usize>,
}

fn member_status(n: &ShardNode, name: &str, raft_dir: &Path) -> MemberStatus {
    crate::server::member_status_of(n.rsm_status(), name, raft_dir)
}

/// Outgoing peer links, made on first use.
struct Net {
    me: Endpoint,
    cluster_id: u64,
    rt: tokio::runtime::Handle,
    links: Mutex<BTreeMap<Endpoint, mpsc::Sender<Vec<u8>>>>,
    metrics: Arc<Metrics>,
}

impl Net {
    fn send(self: &Arc<Self>, to: Endpoint, bytes: Vec<u8>) {
        if to >= CLIENT_ENDPOINTS || to == self.me {
            return;
        }
        let mut links = self.links.lock().expect("links");
        let tx = links.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            self.rt.spawn(link(self.clone(), to, rx));
            tx
        });
        if tx.try_send(bytes).is_err() {
            self.metrics.dropped(&addr_of(to));
        }
    }

    async fn dial(&self, to: Endpoint) -> Result<BufWriter<OwnedWriteHalf>, String> {
        let addr = addr_of(to);
        let local = Ipv4Addr::from((self.me >> 16) as u32);
        let connect = async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            // From our own address, so traffic between servers on distinct loopback addresses
            // can be told apart by firewall rules.
            sock.bind(std::net::SocketAddr::new(local.into(), 0))?;
            sock.connect(addr.parse().map_err(std::io::Error::other)?).await
        };
        let s = tokio::time::timeout(DIAL_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let (r, mut w) = s.into_split();
        let hello = PeerHello {
            magic: PEER_MAGIC,
            cluster_id: self.cluster_id,
            from: self.me,
            to,
            client_urls: vec![],
            name: String::new(),
        };
        frame::write_msg(&mut w, &hello).await.map_err(|e| e.to_string())?;
        let mut r = BufReader::new(r);
        let welcome: PeerWelcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read_msg(&mut r, 1 << 16))
            .await
            .map_err(|_| "no answer to the handshake".to_string())?
            .map_err(|e| e.to_string())?;
        match welcome {
            PeerWelcome::Accepted { .. } => {
                // Nothing more comes this way; the read half is kept open by the task below so
                // that a close by the peer is noticed as a write error.
                tokio::spawn(async move {
                    let mut sink = [0u8; 64];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut r, &mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
                Ok(BufWriter::with_capacity(1 << 16, w))
            }
            PeerWelcome::Refused(why) => Err(format!("refused by the peer: {why}")),
        }
    }
}

/// Sends what is queued for `to`, (re)connecting with backoff; drops what queues up while
/// disconnected (stale for Raft; the shard protocol retries).
async fn link(net: Arc<Net>, to: Endpoint, mut rx: mpsc::Receiver<Vec<u8>>) {
    let addr = addr_of(to);
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        while rx.try_recv().is_ok() {}
        let mut w = match net.dial(to).await {
            Ok(w) => {
                info!(peer = %addr, "connected to peer");
                failures = 0;
                backoff = BACKOFF_MIN;
                w
            }
            Err(e) => {
                failures += 1;
                if e.starts_with("refused") {
                    error!(peer = %addr, "cannot connect to peer: {e}");
                } else if failures == 1 || failures.is_multiple_of(30) {
                    warn!(peer = %addr, "cannot reach peer (retrying): {e}");
                } else {
                    debug!(peer = %addr, "cannot reach peer: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let reason = loop {
            let Some(m) = rx.recv().await else { return };
            let mut bytes = m.len() + frame::HEADER_BYTES;
            let mut res = frame::write(&mut w, &m).await;
            for _ in 0..256 {
                if res.is_err() {
                    break;
                }
                let Ok(m) = rx.try_recv() else { break };
                bytes += m.len() + frame::HEADER_BYTES;
                res = frame::write(&mut w, &m).await;
            }
            if let Err(e) = res.and(w.flush().await) {
                break e.to_string();
            }
            net.metrics.sent(&addr, bytes);
        };
        info!(peer = %addr, "peer connection closed: {reason}");
        tokio::time::sleep(backoff).await;
    }
}

#[derive(Default)]
struct Clients {
    conns: Mutex<BTreeMap<Endpoint, mpsc::Sender<ServerMsg>>>,
}

struct ShardRouter {
    net: Arc<Net>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
}

impl Router for ShardRouter {
    fn send(&self, to: Endpoint, bytes: Vec<u8>) {
        self.net.send(to, bytes);
    }
    fn reply(&self, to: Endpoint, call: CallId, bytes: Vec<u8>) {
        self.metrics.request(bytes.first() == Some(&0));
        let tx = self.clients.conns.lock().expect("clients").get(&to).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(ServerMsg::Reply { call, body: bytes });
        }
    }
}

struct Shared {
    me: Endpoint,
    name: String,
    cluster_id: u64,
    raft_dir: PathBuf,
    input: mpsc::Sender<Input<ShardNode>>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    next_ep: AtomicU64,
}

/// One accepted connection: a peer's or a client's, told apart by its first frame.
async fn serve_conn(stream: TcpStream, addr: std::net::SocketAddr, sh: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 16, r);
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut r, MAX_CLIENT_FRAME)).await {
        Ok(Ok(b)) => b,
        Ok(Err(FrameError::Closed)) | Err(_) => return,
        Ok(Err(e)) => {
            sh.metrics.bad_connection("client");
            warn!("closing connection from {addr}: {e}");
            return;
        }
    };
    if let Ok(hello) = postcard::from_bytes::<PeerHello>(&first)
        && hello.magic == PEER_MAGIC
    {
        let refusal = if hello.cluster_id != sh.cluster_id {
            Some(format!(
                "cluster id mismatch: the peer belongs to deployment {:016x}, this server to {:016x} \
                 (another deployment, or another --initial-cluster-token)",
                hello.cluster_id, sh.cluster_id
            ))
        } else if hello.to != sh.me {
            Some(format!("the peer means to reach {}, this is {}", addr_of(hello.to), addr_of(sh.me)))
        } else if hello.from >= CLIENT_ENDPOINTS || hello.from == sh.me {
            Some(format!("bad peer endpoint {}", hello.from))
        } else {
            None
        };
        if let Some(reason) = refusal {
            sh.metrics.bad_connection("peer");
            error!("refusing peer connection from {addr}: {reason}");
            let _ = frame::write_msg(&mut w, &PeerWelcome::Refused(reason)).await;
            return;
        }
        if frame::write_msg(&mut w, &PeerWelcome::Accepted { client_urls: vec![], name: String::new() }).await.is_err()
        {
            return;
        }
        peer_reader(r, hello.from, sh).await;
        drop(w);
        return;
    }
    match postcard::from_bytes::<ClientMsg>(&first) {
        Ok(m) => serve_client(r, w, m, addr, sh).await,
        Err(e) => {
            sh.metrics.bad_connection("client");
            warn!("closing connection from {addr}: neither a peer nor a client: {e}");
        }
    }
}

async fn peer_reader(mut r: BufReader<OwnedReadHalf>, from: Endpoint, sh: Arc<Shared>) {
    let name = addr_of(from);
    loop {
        match frame::read(&mut r, MAX_PEER_FRAME).await {
            Ok(bytes) => {
                sh.metrics.received(&name, bytes.len() + frame::HEADER_BYTES);
                if sh.input.send(Input::Message { from, bytes }).await.is_err() {
                    return;
                }
            }
            Err(FrameError::Closed) => return,
            Err(e @ (FrameError::Oversized { .. } | FrameError::Checksum | FrameError::Decode(_))) => {
                sh.metrics.bad_connection("peer");
                warn!(peer = %name, "closing peer connection: {e}");
                return;
            }
            Err(_) => return,
        }
    }
}

async fn serve_client(
    mut r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    first: ClientMsg,
    addr: std::net::SocketAddr,
    sh: Arc<Shared>,
) {
    let ep = sh.next_ep.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<ServerMsg>(CLIENT_QUEUE);
    sh.clients.conns.lock().expect("clients").insert(ep, tx.clone());
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(1 << 16, w);
        while let Some(m) = rx.recv().await {
            let mut ok = frame::write(&mut w, &postcard::to_allocvec(&m).expect("encodes")).await.is_ok();
            while ok && let Ok(m) = rx.try_recv() {
                ok = frame::write(&mut w, &postcard::to_allocvec(&m).expect("encodes")).await.is_ok();
            }
            if !ok || w.flush().await.is_err() {
                return;
            }
        }
    });
    let mut next = Some(Ok(first));
    loop {
        let m = match next.take() {
            Some(m) => m,
            None => frame::read_msg::<_, ClientMsg>(&mut r, MAX_CLIENT_FRAME).await,
        };
        let sent = match m {
            Ok(ClientMsg::Hello { call }) => tx
                .send(ServerMsg::Hello { call, cluster_id: sh.cluster_id, id: sh.me, name: sh.name.clone() })
                .await
                .is_ok(),
            Ok(ClientMsg::Call { call, body }) if body == SHARD_INFO_REQUEST => {
                let tx = tx.clone();
                let job: driver::Job<ShardNode> = Box::new(move |n, _| {
                    let body = postcard::to_allocvec(&n.info()).expect("encodes");
                    let _ = tx.try_send(ServerMsg::Reply { call, body });
                });
                sh.input.send(Input::With(job)).await.is_ok()
            }
            Ok(ClientMsg::Call { call, body }) => {
                sh.input.send(Input::Request { from: ep, call, bytes: body }).await.is_ok()
            }
            Ok(ClientMsg::Status { call }) => {
                let (name, dir, tx) = (sh.name.clone(), sh.raft_dir.clone(), tx.clone());
                let job: driver::Job<ShardNode> = Box::new(move |n, _| {
                    let _ = tx.try_send(ServerMsg::Status { call, status: member_status(n, &name, &dir) });
                });
                sh.input.send(Input::With(job)).await.is_ok()
            }
            Ok(ClientMsg::Members { .. } | ClientMsg::ChangeMembers { .. }) => {
                warn!("closing client connection from {addr}: membership requests are not served here");
                break;
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                if !matches!(e, FrameError::Io(_)) {
                    sh.metrics.bad_connection("client");
                }
                warn!("closing client connection from {addr}: {e}");
                break;
            }
        };
        if !sent {
            break;
        }
    }
    sh.clients.conns.lock().expect("clients").remove(&ep);
    drop(tx);
    let _ = writer.await;
}

/// Checks the data directory was made for this member (or marks it so).
fn check_member_file(cfg: &ShardServeConfig) -> Result<(), ServeError> {
    let dir = &cfg.base.data_dir;
    let path = dir.join("member");
    let want = cfg.member_line();
    let io = |what: String| move |source| ServeError::Io { what, source };
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => crate::server::check_raft_log_kept(dir),
        Ok(have) => Err(ServeError::ForeignData {
            dir: dir.clone(),
            reason: format!(
                "it holds the data of [{}], but this server is [{}]",
                have.trim().replace('\n', " "),
                want.trim().replace('\n', " ")
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("raft").exists() {
                return Err(ServeError::ForeignData {
                    dir: dir.clone(),
                    reason: "it holds Raft data but no member file".into(),
                });
            }
            let tmp = dir.join("member.tmp");
            std::fs::write(&tmp, &want).map_err(io(format!("writing {}", tmp.display())))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("syncing the member file".into()))?;
            std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", path.display())))?;
            std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("syncing the data directory".into()))?;
            Ok(())
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Runs the member until SIGTERM or SIGINT (graceful stop: returns `Ok`) or until the node
/// fails (returns the error; the caller exits non-zero).
pub fn serve(cfg: ShardServeConfig) -> Result<(), ServeError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ServeError::Io { what, source }
    };
    let _lock = lock_data_dir(&cfg.base.data_dir)?;
    check_member_file(&cfg)?;
    let raft_dir = cfg.base.data_dir.join("raft");
    let storage = FileStorage::open(&raft_dir)?;
    let metrics = Arc::new(Metrics::new());
    let me = cfg.me();
    let mut raft = Config::new(me, cfg.group());
    raft.heartbeat_ticks = cfg.base.heartbeat_ticks;
    raft.election_ticks = cfg.base.election_ticks;
    raft.seed = driver::now_micros() ^ me.rotate_left(32);
    let storage = MeteredStorage::new(storage, metrics.clone(), cfg.base.sync_elsewhere_above_us);
    let snap = Some(cfg.base.snapshot_bytes);
    let node = match cfg.role {
        ShardRole::Ctrler => {
            let rsm =
                Rsm::new(raft, storage, CtrlerSm::default(), snap).map_err(|e| ServeError::Config(e.to_string()))?;
            ShardNode::Ctrler(CtrlerServer::new(RsmNode::new(rsm).with_group_commit()))
        }
        ShardRole::Group(gid) => {
            let rsm =
                Rsm::new(raft, storage, ShardSm::new(gid), snap).map_err(|e| ServeError::Config(e.to_string()))?;
            ShardNode::Group(ShardServer::new(RsmNode::new(rsm).with_group_commit(), cfg.group(), cfg.ctrlers.clone()))
        }
    };
    let restored = node.rsm_status();
    let cluster_id = shard_cluster_id(&cfg.base.token);

    // A shard server's syncs are not pipelined (each is on its loop), so its network keeps
    // threads of its own (`--io-threads 0`: half the cores, at least one): on the loop, a
    // leader's Appends and answers would wait behind its sync.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let io_threads = if cfg.base.io_threads == 0 { (cores / 2).max(1) } else { cfg.base.io_threads };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads)
        .enable_all()
        .thread_name("sixfive-io")
        .build()
        .map_err(io("starting the runtime"))?;
    let listeners = rt.block_on(async {
        let mut out = Vec::new();
        for a in cfg.base.listen_peer.iter().chain(&cfg.extra_client) {
            out.push(TcpListener::bind(a).await.map_err(io(&format!("cannot listen on http://{a}")))?);
        }
        Ok::<_, ServeError>(out)
    })?;
    let (input, rx) = driver::channel::<ShardNode>();
    let net = Arc::new(Net {
        me,
        cluster_id,
        rt: rt.handle().clone(),
        links: Mutex::new(BTreeMap::new()),
        metrics: metrics.clone(),
    });
    let clients = Arc::new(Clients::default());
    let router = Arc::new(ShardRouter { net, clients: clients.clone(), metrics: metrics.clone() });
    let m2 = metrics.clone();
    let observer: driver::Observer<ShardNode> = Box::new(move |n: &ShardNode| m2.observe(&n.rsm_status()));
    let handle = driver::spawn(me, node, router, Some(observer), (input.clone(), rx));
    let sh = Arc::new(Shared {
        me,
        name: cfg.base.name.clone(),
        cluster_id,
        raft_dir,
        input,
        clients,
        metrics,
        next_ep: AtomicU64::new(CLIENT_ENDPOINTS),
    });
    let mut accept_tasks = Vec::new();
    {
        let _g = rt.enter();
        for l in listeners {
            let sh = sh.clone();
            accept_tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, addr)) = l.accept().await else { continue };
                    tokio::spawn(serve_conn(s, addr, sh.clone()));
                }
            }));
        }
    }
    info!(
        name = %cfg.base.name,
        role = ?cfg.role,
        endpoint = %url_of(me),
        group = %cfg.group().iter().map(|e| url_of(*e)).collect::<Vec<_>>().join(","),
        ctrlers = %cfg.ctrlers.iter().map(|e| url_of(*e)).collect::<Vec<_>>().join(","),
        cluster_id = %format!("{cluster_id:016x}"),
        term = restored.term,
        commit = restored.commit,
        snapshot = restored.snapshot_index,
        last_index = restored.last_index,
        "serving"
    );

    let (signal, handle) = crate::server::wait_for_stop(&rt, handle, &AtomicBool::new(false))?;
    info!("{signal}: stopping (answering what waits)");
    for t in &accept_tasks {
        t.abort();
    }
    rt.block_on(async {
        let _ = sh.input.send(Input::Shutdown).await;
    });
    let result = handle.join();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => {
            info!("stopped cleanly");
            Ok(())
        }
        Err(e) => Err(ServeError::NodeFailed(e)),
    }
}

/// A client [`Transport`] to any server of a sharded deployment: the address of each endpoint
/// is the endpoint itself ([`addr_of`]), so the groups a configuration names are reachable as
/// they join. One [`TcpTransport`] connection per server, opened on first use. Cheap to clone.
#[derive(Clone, Default)]
pub struct ShardTransport {
    conns: Arc<Mutex<BTreeMap<Endpoint, TcpTransport>>>,
}

impl ShardTransport {
    /// A transport with no connection yet.
    pub fn new() -> ShardTransport {
        ShardTransport::default()
    }

    fn to(&self, e: Endpoint) -> TcpTransport {
        self.conns
            .lock()
            .expect("conns")
            .entry(e)
            .or_insert_with(|| TcpTransport::new([(e, addr_of(e))].into()))
            .clone()
    }

    /// Requests written to some connection so far (0: no server was ever reached).
    pub fn requests_sent(&self) -> u64 {
        self.conns.lock().expect("conns").values().map(TcpTransport::requests_sent).sum()
    }

    /// Server `e`'s Raft status.
    pub async fn status(&self, e: Endpoint, timeout: Micros) -> Result<MemberStatus, RpcError> {
        self.to(e).status(e, timeout).await
    }

    /// Server `e`'s view of the shards.
    pub async fn info(&self, e: Endpoint, timeout: Micros) -> Result<ShardInfo, RpcError> {
        let b = self.to(e).call(e, SHARD_INFO_REQUEST.to_vec(), timeout).await?;
        postcard::from_bytes(&b).map_err(|_| RpcError::Failed)
    }
}

impl Transport for ShardTransport {
    async fn call(&self, to: Endpoint, request: Vec<u8>, timeout: Micros) -> Result<Vec<u8>, RpcError> {
        self.to(to).call(to, request, timeout).await
    }

    async fn sleep(&self, d: Micros) {
        tokio::time::sleep(Duration::from_micros(d)).await
    }

    fn now(&self) -> Micros {
        driver::now_micros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_addresses() {
        let e = endpoint_of("127.0.0.1:26010").unwrap();
        assert_eq!(addr_of(e), "127.0.0.1:26010");
        assert!(e < CLIENT_ENDPOINTS);
        assert_eq!(endpoint_of_url("http://127.0.0.2:80").map(addr_of).unwrap(), "127.0.0.2:80");
        assert!(endpoint_of("localhost:2380").is_err());
        assert!(endpoint_of("[::1]:2380").is_err());
        assert!(endpoint_of("0.0.0.0:2380").is_err());
        assert!(endpoint_of_url("https://127.0.0.1:1").is_err());
    }

    /// A shard server's data directory is marked at the first start; a restart needs the same
    /// member and its Raft log (one that lost it could vote twice in a term).
    #[test]
    fn a_member_without_its_raft_log_is_refused() {
        let dir = std::env::temp_dir().join(format!("sixfive-shard-member-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut raw = crate::server::RawConfig::default();
        raw.fill_from_toml(&format!(
            "name = \"c1\"\ndata-dir = \"{}\"\nlisten-peer-urls = \"http://127.0.0.1:26100\"",
            dir.display()
        ))
        .unwrap();
        let cfg =
            ShardServeConfig::new(ServeConfig::from_raw(&raw).unwrap(), ShardRole::Ctrler, None, Vec::new()).unwrap();
        check_member_file(&cfg).unwrap();
        let err = check_member_file(&cfg).unwrap_err().to_string();
        assert!(err.contains("holds no Raft log"), "{err}");
        std::fs::create_dir_all(dir.join("raft")).unwrap();
        std::fs::write(dir.join("raft").join("raft.log"), b"").unwrap();
        check_member_file(&cfg).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
