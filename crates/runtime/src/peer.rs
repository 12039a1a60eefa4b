//! Peer transport: one TCP connection per pair of members, dialed by the member with the lower
//! id and used in both directions.
//!
//! - The dialer's first frame is a [`PeerHello`] naming the cluster and both members; the other
//!   side refuses a connection from another cluster, an unknown member or the wrong direction
//!   with a clear log line (as etcd does for a cluster id mismatch) and closes it. Both sides
//!   tell their client URLs, so every member can list every member's.
//! - Frames are [`PeerFrame`]s: Raft messages, and requests forwarded to the leader
//!   ([`PeerNet::call`]) with their replies. A forwarded request reaches the node as a request
//!   from the endpoint [`forwarded_endpoint`] of the member that sent it; the node's reply to
//!   that endpoint goes back over the connection ([`PeerNet::reply`]) to the [`Calls`] waiting.
//! - Each peer has a bounded send queue. Raft tolerates loss, so when the queue is full (a slow
//!   or absent peer) new messages are dropped and counted: memory does not grow while a peer
//!   is down. While disconnected, queued messages are discarded (they would be stale).
//! - The dialer reconnects with exponential backoff (50 ms to 2 s).
//! - A frame that is oversized or fails its checksum closes the connection with the reason
//!   logged; Raft messages that do not decode are dropped by the node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sixfive_raft::NodeId;
use sixfive_rpc::Endpoint;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::driver::Input;
use crate::frame::{self, FrameError, MAX_PEER_FRAME};
use crate::metrics::Metrics;
use crate::proto::{JOIN_MAGIC, JoinAnswer, JoinRequest, PEER_MAGIC, PeerFrame, PeerHello, PeerWelcome};

/// Frames queued for one peer before new Raft messages are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Frames queued for one peer before forwarded requests and their replies are dropped too:
/// those are bounded by the clients' requests in flight, and losing one stalls its client until
/// its timeout, where a lost Raft message is simply sent again.
pub const CALL_QUEUE: usize = 65_536;

/// The sending side of one peer's queue, with its length.
struct QueueTx {
    tx: mpsc::UnboundedSender<PeerFrame>,
    len: Arc<AtomicUsize>,
}

/// The receiving side of one peer's queue.
struct QueueRx {
    rx: mpsc::UnboundedReceiver<PeerFrame>,
    len: Arc<AtomicUsize>,
}

fn peer_queue() -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let len = Arc::new(AtomicUsize::new(0));
    (QueueTx { tx, len: len.clone() }, QueueRx { rx, len })
}

impl QueueTx {
    /// Queues `f` unless the queue holds its kind's limit already.
    fn push(&self, f: PeerFrame) -> bool {
        let limit = if matches!(f, PeerFrame::Raft(_)) { PEER_QUEUE } else { CALL_QUEUE };
        if self.len.load(Ordering::Relaxed) >= limit {
            return false;
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        self.tx.send(f).is_ok()
    }
}

impl QueueRx {
    async fn recv(&mut self) -> Option<PeerFrame> {
        let f = self.rx.recv().await;
        if f.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        f
    }

    fn try_recv(&mut self) -> Option<PeerFrame> {
        let f = self.rx.try_recv().ok();
        if f.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        f
    }
}
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Requests forwarded by member `m` reach the node from endpoint `FORWARDED + m`.
const FORWARDED: Endpoint = 1 << 39;

/// The endpoint a request forwarded by member `m` comes from.
pub fn forwarded_endpoint(m: NodeId) -> Endpoint {
    FORWARDED + m
}

/// The member that forwarded a request from endpoint `ep`, if it was forwarded.
pub fn forwarded_by(ep: Endpoint) -> Option<NodeId> {
    (FORWARDED..FORWARDED + (1 << 32)).contains(&ep).then(|| ep - FORWARDED)
}

/// Requests waiting for their replies, by call id (forwarded ones, and a server's own).
#[derive(Default)]
pub struct Calls {
    next: AtomicU64,
    waiting: Mutex<BTreeMap<u64, Waiting>>,
}

/// A call waiting: the member it was forwarded to (if any), and where its reply goes.
type Waiting = (Option<NodeId>, oneshot::Sender<Vec<u8>>);

impl Calls {
    /// A new call id and where its reply will come.
    pub fn open(&self) -> (u64, oneshot::Receiver<Vec<u8>>) {
        self.open_to(None)
    }

    fn open_to(&self, peer: Option<NodeId>) -> (u64, oneshot::Receiver<Vec<u8>>) {
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("calls").insert(call, (peer, tx));
        (call, rx)
    }

    /// Delivers the reply to `call` (false if nobody waits for it any more).
    pub fn answer(&self, call: u64, reply: Vec<u8>) -> bool {
        let tx = self.waiting.lock().expect("calls").remove(&call);
        tx.is_some_and(|(_, tx)| tx.send(reply).is_ok())
    }

    /// The connection to `peer` went down: every call forwarded to it fails at once (its
    /// receiver sees the sender dropped), rather than waiting out its timeout for a reply that
    /// can no longer come.
    fn fail_forwarded_to(&self, peer: NodeId) {
        self.waiting.lock().expect("calls").retain(|_, (p, _)| *p != Some(peer));
    }

    /// Stops waiting for `call` (it timed out).
    pub fn forget(&self, call: u64) {
        self.waiting.lock().expect("calls").remove(&call);
    }
}

/// A member of the cluster, as its peers reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Name.
    pub name: String,
    /// `host:port` of its peer listener.
    pub addr: String,
}

/// One link: the queue of frames to send, the connections accepted from the peer (when it
/// dials), and the task that runs it (dropping the entry ends the task).
struct LinkEntry {
    peer: Peer,
    queue: QueueTx,
    accepted: Option<mpsc::Sender<TcpStream>>,
    _task: AbortOnDrop,
}

/// Aborts the task when dropped.
struct AbortOnDrop<T = ()>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a closed link may still send what was queued for it: a departed member's last
/// message tells it that its removal is committed.
const CLOSING_GRACE: Duration = Duration::from_secs(2);

/// Starts the task of a link to a peer, given its queue's receiver and, for a peer that dials
/// us, where its accepted connections arrive.
type SpawnLink = Box<dyn Fn(NodeId, &Peer, QueueRx, Option<mpsc::Receiver<TcpStream>>) -> AbortOnDrop + Send + Sync>;

/// The outgoing side of the peer transport. The set of peers follows the membership
/// ([`PeerNet::set_members`]).
pub struct PeerNet {
    links: Arc<RwLock<BTreeMap<NodeId, LinkEntry>>>,
    spawn_link: SpawnLink,
    rt: tokio::runtime::Handle,
    shared: Arc<LinkShared>,
    metrics: Arc<Metrics>,
    /// Forwarded requests waiting for the peer's reply.
    pub calls: Arc<Calls>,
}

impl PeerNet {
    fn queue(&self, to: NodeId, f: PeerFrame) -> bool {
        let links = self.links.read().expect("links");
        match links.get(&to) {
            Some(l) => {
                let ok = l.queue.push(f);
                if !ok {
                    self.metrics.dropped(&l.peer.name);
                }
                ok
            }
            None => false,
        }
    }

    /// Queues the Raft message `bytes` for `to`, or drops it if its queue is full.
    pub fn send(&self, to: NodeId, bytes: Vec<u8>) {
        self.queue(to, PeerFrame::Raft(bytes));
    }

    /// Forwards the request `body` to member `to`'s node; its reply arrives on the receiver,
    /// which fails if the connection goes down first. None if it could not be queued (unknown
    /// or unconnected member, or a full queue).
    pub fn call(&self, to: NodeId, body: Vec<u8>) -> Option<(u64, oneshot::Receiver<Vec<u8>>)> {
        if !self.shared.connected.lock().expect("connected").contains(&to) {
            return None;
        }
        let (call, rx) = self.calls.open_to(Some(to));
        if self.queue(to, PeerFrame::Call(call, body)) {
            Some((call, rx))
        } else {
            self.calls.forget(call);
            None
        }
    }

    /// Sends the node's reply to a request member `to` forwarded (dropped if the queue is full:
    /// the forwarding member times out).
    pub fn reply(&self, to: NodeId, call: u64, body: Vec<u8>) {
        self.queue(to, PeerFrame::Reply(call, body));
    }

    /// The client URLs each member told when it last connected.
    pub fn client_urls(&self) -> BTreeMap<NodeId, Vec<String>> {
        self.shared.client_urls.lock().expect("client urls").clone()
    }

    /// The name each member told when it last connected.
    pub fn names(&self) -> BTreeMap<NodeId, String> {
        self.shared.names.lock().expect("names").clone()
    }

    /// Makes the links follow the membership: `members` are the members this one exchanges
    /// messages with (itself may be listed: it is skipped); links to others close, new ones
    /// open, a member whose address changed is reached at the new one. `directory` is the whole
    /// directory, for answering servers that join.
    ///
    /// `joinable`: the members that may still join: the new learners of the committed configuration.
    pub fn set_members(
        &self,
        members: &BTreeMap<NodeId, Peer>,
        directory: &BTreeMap<NodeId, Peer>,
        joinable: &std::collections::BTreeSet<NodeId>,
    ) {
        *self.shared.directory.write().expect("directory") = directory.clone();
        *self.shared.joinable.write().expect("joinable") = joinable.clone();
        let me = self.shared.me.id;
        let mut links = self.links.write().expect("links");
        let gone: Vec<NodeId> =
            links.iter().filter(|(id, l)| members.get(id) != Some(&l.peer)).map(|(id, _)| *id).collect();
        for id in gone {
            let LinkEntry { peer, queue, accepted, _task: task } = links.remove(&id).expect("listed");
            // The queue's end: the link sends what is queued, then ends; or is stopped after a
            // grace period (a peer that cannot be reached).
            // (The accepted side stays open meanwhile: a link that sees it closed stops at once.)
            drop(queue);
            self.rt.spawn(async move {
                tokio::time::sleep(CLOSING_GRACE).await;
                drop((task, accepted));
            });
            info!(peer = %peer.name, id, "no longer a peer: link closed");
            self.shared.connected.lock().expect("connected").remove(&id);
            self.shared.client_urls.lock().expect("client urls").remove(&id);
            self.shared.names.lock().expect("names").remove(&id);
            self.calls.fail_forwarded_to(id);
        }
        for (&id, peer) in members.iter().filter(|(id, _)| **id != me) {
            if links.contains_key(&id) {
                continue;
            }
            let (tx, rx) = peer_queue();
            let (accepted, from_them) = if id < me {
                let (atx, arx) = mpsc::channel(4);
                (Some(atx), Some(arx))
            } else {
                (None, None)
            };
            let task = (self.spawn_link)(id, peer, rx, from_them);
            links.insert(id, LinkEntry { peer: peer.clone(), queue: tx, accepted, _task: task });
        }
    }
}

/// This member, as the peer transport presents it.
#[derive(Clone, Debug)]
pub struct Me {
    /// Member id.
    pub id: NodeId,
    /// Cluster id.
    pub cluster_id: u64,
    /// Client URLs (`host:port`) told to the peers.
    pub client_urls: Vec<String>,
    /// Name told to the peers.
    pub name: String,
}

/// Starts the peer transport of member `me` on the current tokio runtime: accepts on
/// `listeners`, links to `members` (see [`PeerNet::set_members`]; the member with the lower id
/// of a pair dials), delivers what arrives to `input`, and answers servers asking to join from
/// the directory last given.
pub fn start<N: Send + 'static>(
    me: Me,
    members: &BTreeMap<NodeId, Peer>,
    listeners: Vec<TcpListener>,
    input: mpsc::Sender<Input<N>>,
    metrics: Arc<Metrics>,
) -> (PeerNet, Vec<tokio::task::JoinHandle<()>>) {
    let calls = Arc::new(Calls::default());
    // Dial from our own advertised address, so that traffic between members is told apart by
    // address (each member on its own loopback address can be partitioned by firewall rules).
    let local = members
        .get(&me.id)
        .and_then(|p| p.addr.rsplit_once(':'))
        .and_then(|(h, _)| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok());
    let shared = Arc::new(LinkShared {
        me: me.clone(),
        calls: calls.clone(),
        client_urls: Mutex::new(BTreeMap::from([(me.id, me.client_urls.clone())])),
        names: Mutex::new(BTreeMap::from([(me.id, me.name.clone())])),
        connected: Mutex::new(std::collections::BTreeSet::new()),
        directory: RwLock::new(members.clone()),
        joinable: RwLock::default(),
        seen: Mutex::default(),
    });
    let links: Arc<RwLock<BTreeMap<NodeId, LinkEntry>>> = Arc::default();
    let rt = tokio::runtime::Handle::current();
    let link_rt = rt.clone();
    let spawn_link: SpawnLink = {
        let (shared, metrics) = (shared.clone(), metrics.clone());
        Box::new(move |id, peer: &Peer, rx, from_them| {
            let link = Link {
                shared: shared.clone(),
                local,
                peer: id,
                name: peer.name.clone(),
                addr: peer.addr.clone(),
                input: input.clone(),
                metrics: metrics.clone(),
            };
            AbortOnDrop(link_rt.spawn(link.run(rx, from_them)))
        })
    };
    // The links first: a peer's connection accepted before them would be refused as unknown.
    let net = PeerNet { links: links.clone(), spawn_link, rt, shared: shared.clone(), metrics: metrics.clone(), calls };
    net.set_members(members, members, &Default::default());
    let mut tasks = Vec::new();
    for l in listeners {
        let (links, metrics, shared) = (links.clone(), metrics.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, addr)) = l.accept().await else { continue };
                let (links, metrics, shared) = (links.clone(), metrics.clone(), shared.clone());
                tokio::spawn(async move {
                    match handshake(stream, &shared, &links).await {
                        Ok(Some((from, stream))) => {
                            let tx = links.read().expect("links").get(&from).and_then(|l| l.accepted.clone());
                            if let Some(tx) = tx {
                                let _ = tx.send(stream).await;
                            }
                        }
                        Ok(None) => {}
                        Err(HandshakeError::Refused(reason)) => {
                            metrics.bad_connection("peer");
                            error!("refusing peer connection from {addr}: {reason}");
                        }
                        Err(HandshakeError::Frame(e)) => {
                            metrics.bad_connection("peer");
                            warn!("closing peer connection from {addr}: {e}");
                        }
                    }
                });
            }
        }));
    }
    (net, tasks)
}

/// Asks the members at `contacts` (peer addresses), one after the other, to let server `name`
/// at `peer_addr` join: the first that answers decides. An error names every contact's failure.
pub async fn join(contacts: &[String], name: &str, peer_addr: &str) -> Result<JoinAnswer, String> {
    let mut failures = Vec::new();
    for c in contacts {
        let ask = async {
            let mut s = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(c))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let req = JoinRequest { magic: JOIN_MAGIC, name: name.to_string(), peer_addr: peer_addr.to_string() };
            frame::write_msg(&mut s, &req).await.map_err(|e| e.to_string())?;
            tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read_msg::<_, JoinAnswer>(&mut s, 1 << 20))
                .await
                .map_err(|_| "no answer".to_string())?
                .map_err(|e| e.to_string())
        };
        match ask.await {
            Ok(a) => return Ok(a),
            Err(e) => failures.push(format!("http://{c}: {e}")),
        }
    }
    Err(failures.join("; "))
}

/// What every link of a member shares.
struct LinkShared {
    me: Me,
    calls: Arc<Calls>,
    client_urls: Mutex<BTreeMap<NodeId, Vec<String>>>,
    names: Mutex<BTreeMap<NodeId, String>>,
    connected: Mutex<std::collections::BTreeSet<NodeId>>,
    /// The whole member directory, for servers that join.
    directory: RwLock<BTreeMap<NodeId, Peer>>,
    /// The members that may join (see [`join_answer`]).
    joinable: RwLock<std::collections::BTreeSet<NodeId>>,
    /// Members this one has ever exchanged a handshake with (in this process).
    seen: Mutex<std::collections::BTreeSet<NodeId>>,
}

impl LinkShared {
    fn learned(&self, peer: NodeId, name: String, urls: Vec<String>) {
        self.client_urls.lock().expect("client urls").insert(peer, urls);
        self.names.lock().expect("names").insert(peer, name);
        self.seen.lock().expect("seen").insert(peer);
    }
}

enum HandshakeError {
    Refused(String),
    Frame(FrameError),
}

/// Answers a connection's first frame: a peer's hello (Some: the connection is the peer's) or a
/// joining server's request (answered, then closed: None).
async fn handshake(
    mut stream: TcpStream,
    shared: &LinkShared,
    links: &RwLock<BTreeMap<NodeId, LinkEntry>>,
) -> Result<Option<(NodeId, TcpStream)>, HandshakeError> {
    let (me, cluster_id) = (shared.me.id, shared.me.cluster_id);
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut stream, 1 << 16))
        .await
        .map_err(|_| HandshakeError::Frame(FrameError::Io(std::io::ErrorKind::TimedOut.into())))?
        .map_err(HandshakeError::Frame)?;
    if first.starts_with(&JOIN_MAGIC) {
        let req: JoinRequest =
            postcard::from_bytes(&first).map_err(|e| HandshakeError::Frame(FrameError::Decode(e.to_string())))?;
        let answer = {
            let joinable = shared.joinable.read().expect("joinable");
            let seen = shared.seen.lock().expect("seen");
            let may_join = |id: NodeId| joinable.contains(&id) && !seen.contains(&id);
            join_answer(&req, cluster_id, &shared.directory.read().expect("directory"), &may_join)
        };
        let _ = frame::write_msg(&mut stream, &answer).await;
        return match answer {
            JoinAnswer::Accepted { id, .. } => {
                info!(name = %req.name, id, "told a joining member who it is");
                Ok(None)
            }
            JoinAnswer::Refused(why) => Err(HandshakeError::Refused(why)),
        };
    }
    let hello: PeerHello =
        postcard::from_bytes(&first).map_err(|e| HandshakeError::Frame(FrameError::Decode(e.to_string())))?;
    let known = links.read().expect("links").contains_key(&hello.from);
    let refusal = if hello.magic != PEER_MAGIC {
        Some("not a sixfive peer (bad magic)".to_string())
    } else if hello.cluster_id != cluster_id {
        Some(format!(
            "cluster id mismatch: the peer belongs to cluster {:016x}, this member to {:016x} \
             (a member of another cluster, or started with another --initial-cluster or --initial-cluster-token)",
            hello.cluster_id, cluster_id
        ))
    } else if hello.to != me {
        Some(format!("the peer means to reach member {}, this is member {me}", hello.to))
    } else if !known || hello.from == me {
        Some(format!("unknown member id {} (not a member of this member's configuration)", hello.from))
    } else if hello.from > me {
        Some(format!("member {} has the higher id: this member dials it, not the other way", hello.from))
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = frame::write_msg(&mut stream, &PeerWelcome::Refused(reason.clone())).await;
        return Err(HandshakeError::Refused(reason));
    }
    let welcome = PeerWelcome::Accepted { client_urls: shared.me.client_urls.clone(), name: shared.me.name.clone() };
    frame::write_msg(&mut stream, &welcome).await.map_err(|e| HandshakeError::Frame(e.into()))?;
    shared.learned(hello.from, hello.name, hello.client_urls);
    let _ = stream.set_nodelay(true);
    Ok(Some((hello.from, stream)))
}

/// Who a joining server is, if the directory lists it under that name and address and it
/// `may_join`: a learner of the committed configuration that never connected yet. A server that
/// already ran under that id and lost its data must not come back under it with an empty log
/// (as a voter it could vote twice in a term; as a learner its stale progress could make a
/// commit count it): it is removed and added again (etcd: "already bootstrapped").
fn join_answer(
    req: &JoinRequest,
    cluster_id: u64,
    directory: &BTreeMap<NodeId, Peer>,
    may_join: &dyn Fn(NodeId) -> bool,
) -> JoinAnswer {
    // Found by name, or by address for a member added without one (etcd's MemberAdd).
    let found = directory
        .iter()
        .find(|(_, p)| p.name == req.name)
        .or_else(|| directory.iter().find(|(_, p)| p.name.is_empty() && p.addr == req.peer_addr));
    match found {
        Some((&id, p)) if p.addr == req.peer_addr && !may_join(id) => JoinAnswer::Refused(format!(
            "member {} (id {id}) is not a new learner of the committed configuration: it ran already, or \
             its addition is not committed yet; if its data was lost, remove it and add it again",
            req.name
        )),
        Some((&id, p)) if p.addr == req.peer_addr => JoinAnswer::Accepted {
            cluster_id,
            id,
            members: directory.iter().map(|(i, p)| (*i, p.name.clone(), p.addr.clone())).collect(),
        },
        Some((_, p)) => JoinAnswer::Refused(format!(
            "member {} was added with the peer URL http://{}, not http://{}",
            req.name, p.addr, req.peer_addr
        )),
        None => JoinAnswer::Refused(format!(
            "no member named {} in this cluster: add it first (sixfive kv member add {} --peer-urls http://{}, \
             or etcdctl member add)",
            req.name, req.name, req.peer_addr
        )),
    }
}

struct Link<N> {
    shared: Arc<LinkShared>,
    local: Option<std::net::IpAddr>,
    peer: NodeId,
    name: String,
    addr: String,
    input: mpsc::Sender<Input<N>>,
    metrics: Arc<Metrics>,
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl<N: Send + 'static> Link<N> {
    async fn dial(&self) -> Result<TcpStream, String> {
        let connect = async {
            let addr = tokio::net::lookup_host(&self.addr)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
            let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            if let Some(ip) = self.local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
                sock.bind(std::net::SocketAddr::new(ip, 0))?;
            }
            sock.connect(addr).await
        };
        let mut s = tokio::time::timeout(DIAL_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let me = &self.shared.me;
        let hello = PeerHello {
            magic: PEER_MAGIC,
            cluster_id: me.cluster_id,
            from: me.id,
            to: self.peer,
            client_urls: me.client_urls.clone(),
            name: me.name.clone(),
        };
        frame::write_msg(&mut s, &hello).await.map_err(|e| e.to_string())?;
        let welcome: PeerWelcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read_msg(&mut s, 1 << 16))
            .await
            .map_err(|_| "no answer to the handshake".to_string())?
            .map_err(|e| e.to_string())?;
        match welcome {
            PeerWelcome::Accepted { client_urls, name } => {
                self.shared.learned(self.peer, name, client_urls);
                Ok(s)
            }
            PeerWelcome::Refused(why) => Err(format!("refused by the peer: {why}")),
        }
    }

    async fn run(self, mut out: QueueRx, mut from_them: Option<mpsc::Receiver<TcpStream>>) {
        let dialer = from_them.is_none();
        let mut backoff = BACKOFF_MIN;
        let mut next: Option<TcpStream> = None;
        let mut failures = 0u64;
        loop {
            let stream = match next.take() {
                Some(s) => s,
                None if dialer => {
                    while out.try_recv().is_some() {} // stale while disconnected
                    match self.dial().await {
                        Ok(s) => {
                            info!(peer = %self.name, addr = %self.addr, "connected to peer");
                            failures = 0;
                            s
                        }
                        Err(e) => {
                            failures += 1;
                            if e.starts_with("refused") {
                                error!(peer = %self.name, addr = %self.addr, "cannot connect to peer: {e}");
                            } else if failures == 1 || failures.is_multiple_of(30) {
                                warn!(peer = %self.name, addr = %self.addr, "cannot reach peer (retrying): {e}");
                            } else {
                                debug!(peer = %self.name, "cannot reach peer: {e}");
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
                None => {
                    tokio::select! {
                        s = recv_opt(&mut from_them) => match s {
                            Some(s) => {
                                info!(peer = %self.name, "peer connected");
                                s
                            }
                            None => return,
                        },
                        m = out.recv() => match m {
                            Some(_) => continue, // not connected: dropped
                            None => return,
                        },
                    }
                }
            };
            let connected_at = std::time::Instant::now();
            self.shared.connected.lock().expect("connected").insert(self.peer);
            let (r, w) = stream.into_split();
            // Aborted with this task, also when the link is closed for a departed member.
            let mut reader = AbortOnDrop(tokio::spawn(read_loop(
                r,
                self.peer,
                self.name.clone(),
                self.input.clone(),
                self.metrics.clone(),
                self.shared.calls.clone(),
            )));
            let mut w = BufWriter::with_capacity(1 << 16, w);
            let reason: String = loop {
                tokio::select! {
                    res = &mut reader.0 => break res.unwrap_or_else(|e| e.to_string()),
                    m = out.recv() => {
                        let Some(m) = m else { return };
                        if let Err(e) = self.write_batch(&mut w, m, &mut out).await {
                            break format!("write failed: {e}");
                        }
                    }
                    s = recv_opt(&mut from_them) => {
                        next = s;
                        break "replaced by a newer connection from the peer".into();
                    }
                }
            };
            drop(reader);
            self.shared.connected.lock().expect("connected").remove(&self.peer);
            self.shared.calls.fail_forwarded_to(self.peer);
            info!(peer = %self.name, "peer connection closed: {reason}");
            // A connection that closes at once (the peer is stopping) must not make us spin.
            if dialer && connected_at.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
            }
        }
    }

    async fn write_batch(
        &self,
        w: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
        first: PeerFrame,
        out: &mut QueueRx,
    ) -> std::io::Result<()> {
        let mut bytes = 0;
        let mut next = Some(first);
        for _ in 0..256 {
            let Some(m) = next.take().or_else(|| out.try_recv()) else { break };
            let (head, n) = m.head();
            bytes += n + m.body().len() + frame::HEADER_BYTES;
            frame::write_parts(w, &head[..n], m.body()).await?;
        }
        w.flush().await?;
        self.metrics.sent(&self.name, bytes);
        Ok(())
    }
}

async fn read_loop<N: Send + 'static>(
    r: OwnedReadHalf,
    peer: NodeId,
    name: String,
    input: mpsc::Sender<Input<N>>,
    metrics: Arc<Metrics>,
    calls: Arc<Calls>,
) -> String {
    let mut r = BufReader::with_capacity(1 << 16, r);
    loop {
        match frame::read_tagged(&mut r, MAX_PEER_FRAME).await {
            Ok((tag, rest)) => {
                metrics.received(&name, 1 + rest.len() + frame::HEADER_BYTES);
                let to_node = match PeerFrame::parse(tag, rest) {
                    Ok(PeerFrame::Raft(bytes)) => Input::Message { from: peer, bytes },
                    Ok(PeerFrame::Call(call, bytes)) => Input::Request { from: forwarded_endpoint(peer), call, bytes },
                    Ok(PeerFrame::Reply(call, bytes)) => {
                        calls.answer(call, bytes);
                        continue;
                    }
                    Err(e) => {
                        metrics.bad_connection("peer");
                        warn!(peer = %name, "closing peer connection: {e}");
                        return e;
                    }
                };
                if input.send(to_node).await.is_err() {
                    return "the node stopped".into();
                }
            }
            Err(FrameError::Closed) => return "closed by the peer".into(),
            Err(e @ (FrameError::Oversized { .. } | FrameError::Checksum | FrameError::Decode(_))) => {
                metrics.bad_connection("peer");
                warn!(peer = %name, "closing peer connection: {e}");
                return e.to_string();
            }
            Err(e) => return e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, addr: &str) -> JoinRequest {
        JoinRequest { magic: JOIN_MAGIC, name: name.into(), peer_addr: addr.into() }
    }

    #[test]
    fn only_new_learners_join_and_only_as_added() {
        let p = |n: &str, a: &str| Peer { name: n.into(), addr: a.into() };
        let dir = BTreeMap::from([(1, p("n1", "h:1")), (2, p("n2", "h:2")), (4, p("", "h:4"))]);
        let learners = |id: NodeId| id == 4;
        // A learner added by etcd's MemberAdd (no name) is found by its address.
        match join_answer(&req("n4", "h:4"), 9, &dir, &learners) {
            JoinAnswer::Accepted { cluster_id, id, members } => {
                assert_eq!((cluster_id, id, members.len()), (9, 4, 3));
            }
            other => panic!("{other:?}"),
        }
        // A voter that lost its data cannot come back under its id with an empty log.
        let r = join_answer(&req("n2", "h:2"), 9, &dir, &learners);
        assert!(matches!(&r, JoinAnswer::Refused(why) if why.contains("remove it and add it again")), "{r:?}");
        // Nor a learner that already ran (`may_join` false), nor another address, nor a stranger.
        let r = join_answer(&req("n4", "h:4"), 9, &dir, &|_| false);
        assert!(matches!(r, JoinAnswer::Refused(_)), "{r:?}");
        let r = join_answer(&req("n1", "h:9"), 9, &dir, &|_| true);
        assert!(matches!(&r, JoinAnswer::Refused(why) if why.contains("was added with the peer URL")), "{r:?}");
        let r = join_answer(&req("zz", "h:7"), 9, &dir, &|_| true);
        assert!(matches!(&r, JoinAnswer::Refused(why) if why.contains("add it first")), "{r:?}");
    }
}
