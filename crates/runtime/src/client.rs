//! The client side: [`TcpTransport`] implements [`sixfive_rpc::Transport`] over the client
//! protocol, so the same [`RaftClerk`] that the simulator tests runs against real servers.
//!
//! One connection per server, opened on first use and again after it breaks; calls are
//! multiplexed on it by call id. A call whose connection breaks fails at once
//! ([`RpcError::Failed`]); one with no answer in time fails with [`RpcError::Timeout`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sixfive_kv::RaftClerk;
use sixfive_rpc::{Endpoint, Micros, RpcError, Transport};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::driver::now_micros;
use crate::frame::{self, MAX_CLIENT_FRAME};
use crate::members::{ChangeError, MemberOp, MembersView};
use crate::proto::{ClientMsg, MemberStatus, ServerMsg};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerMsg>>>>;

#[derive(Clone)]
struct Conn {
    tx: mpsc::Sender<ClientMsg>,
    pending: Pending,
    dead: Arc<AtomicBool>,
}

struct Inner {
    addrs: BTreeMap<Endpoint, String>,
    conns: BTreeMap<Endpoint, tokio::sync::Mutex<Option<Conn>>>,
    next_call: AtomicU64,
    sent: AtomicU64,
}

/// A client transport to a fixed set of servers, each named by an [`Endpoint`]. Cheap to clone
/// (clones share connections); every clone in a process reads the same clock.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

/// Why a client could not use the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An endpoint is not `http://host:port` (or is `https://`).
    #[error("{0}")]
    BadEndpoint(String),
    /// No endpoint answered.
    #[error("no endpoint answered ({0})")]
    Unavailable(String),
    /// The endpoints belong to different clusters.
    #[error("the endpoints belong to different clusters: {0}")]
    MixedClusters(String),
}

impl TcpTransport {
    /// A transport where endpoint `e` is reached at `addrs[e]` (`host:port`).
    pub fn new(addrs: BTreeMap<Endpoint, String>) -> TcpTransport {
        let conns = addrs.keys().map(|e| (*e, tokio::sync::Mutex::new(None))).collect();
        TcpTransport { inner: Arc::new(Inner { addrs, conns, next_call: AtomicU64::new(1), sent: AtomicU64::new(0) }) }
    }

    /// Requests written to some connection so far (0: no server was ever reached).
    pub fn requests_sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }

    async fn conn(&self, to: Endpoint) -> Result<Conn, RpcError> {
        let slot = self.inner.conns.get(&to).ok_or(RpcError::Failed)?;
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.dead.load(Ordering::Relaxed)
        {
            return Ok(c.clone());
        }
        let addr = &self.inner.addrs[&to];
        let stream = TcpStream::connect(addr).await.map_err(|_| RpcError::Failed)?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<ClientMsg>(4096);
        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let c = Conn { tx, pending: pending.clone(), dead: dead.clone() };
        let d2 = dead.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(1 << 16, w);
            while let Some(m) = rx.recv().await {
                let mut ok = frame::write(&mut w, &postcard::to_allocvec(&m).expect("encodes")).await.is_ok();
                while ok && let Ok(m) = rx.try_recv() {
                    ok = frame::write(&mut w, &postcard::to_allocvec(&m).expect("encodes")).await.is_ok();
                }
                if !ok || w.flush().await.is_err() {
                    break;
                }
            }
            d2.store(true, Ordering::Relaxed);
        });
        tokio::spawn(async move {
            let mut r = BufReader::with_capacity(1 << 16, r);
            while let Ok(m) = frame::read_msg::<_, ServerMsg>(&mut r, MAX_CLIENT_FRAME).await {
                let call = match &m {
                    ServerMsg::Hello { call, .. }
                    | ServerMsg::Reply { call, .. }
                    | ServerMsg::Status { call, .. }
                    | ServerMsg::Members { call, .. }
                    | ServerMsg::MembersChanged { call, .. } => *call,
                };
                if let Some(tx) = pending.lock().expect("pending").remove(&call) {
                    let _ = tx.send(m);
                }
            }
            dead.store(true, Ordering::Relaxed);
            pending.lock().expect("pending").clear(); // every waiting call fails now
        });
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn request(
        &self,
        to: Endpoint,
        make: impl FnOnce(u64) -> ClientMsg,
        timeout: Micros,
    ) -> Result<ServerMsg, RpcError> {
        let call = self.inner.next_call.fetch_add(1, Ordering::Relaxed);
        let fut = async {
            let c = self.conn(to).await?;
            let (tx, rx) = oneshot::channel();
            c.pending.lock().expect("pending").insert(call, tx);
            if c.dead.load(Ordering::Relaxed) || c.tx.send(make(call)).await.is_err() {
                c.pending.lock().expect("pending").remove(&call);
                return Err(RpcError::Failed);
            }
            self.inner.sent.fetch_add(1, Ordering::Relaxed);
            rx.await.map_err(|_| RpcError::Failed)
        };
        match tokio::time::timeout(Duration::from_micros(timeout), fut).await {
            Ok(r) => r,
            Err(_) => {
                if let Some(Some(c)) = self.inner.conns.get(&to).and_then(|s| s.try_lock().ok()).map(|s| s.clone()) {
                    c.pending.lock().expect("pending").remove(&call);
                }
                Err(RpcError::Timeout)
            }
        }
    }

    /// Asks server `to` who it is: (cluster id, member id, name).
    pub async fn hello(&self, to: Endpoint, timeout: Micros) -> Result<(u64, u64, String), RpcError> {
        match self.request(to, |call| ClientMsg::Hello { call }, timeout).await? {
            ServerMsg::Hello { cluster_id, id, name, .. } => Ok((cluster_id, id, name)),
            _ => Err(RpcError::Failed),
        }
    }

    /// The membership as server `to` sees it.
    pub async fn members(&self, to: Endpoint, timeout: Micros) -> Result<MembersView, RpcError> {
        match self.request(to, |call| ClientMsg::Members { call }, timeout).await? {
            ServerMsg::Members { members, .. } => Ok(members),
            _ => Err(RpcError::Failed),
        }
    }

    /// Asks server `to` to make membership change `op` at the leader: the id of the member
    /// concerned and the membership the change was planned from, or why it failed (the
    /// server tries for up to 10 s; give a longer timeout).
    pub async fn change_members(
        &self,
        to: Endpoint,
        op: MemberOp,
        timeout: Micros,
    ) -> Result<Result<(u64, MembersView), ChangeError>, RpcError> {
        match self.request(to, |call| ClientMsg::ChangeMembers { call, op }, timeout).await? {
            ServerMsg::MembersChanged { result, .. } => Ok(result),
            _ => Err(RpcError::Failed),
        }
    }

    /// Server `to`'s status.
    pub async fn status(&self, to: Endpoint, timeout: Micros) -> Result<MemberStatus, RpcError> {
        match self.request(to, |call| ClientMsg::Status { call }, timeout).await? {
            ServerMsg::Status { status, .. } => Ok(status),
            _ => Err(RpcError::Failed),
        }
    }
}

impl Transport for TcpTransport {
    async fn call(&self, to: Endpoint, request: Vec<u8>, timeout: Micros) -> Result<Vec<u8>, RpcError> {
        match self.request(to, |call| ClientMsg::Call { call, body: request }, timeout).await? {
            ServerMsg::Reply { body, .. } => Ok(body),
            _ => Err(RpcError::Failed),
        }
    }

    async fn sleep(&self, d: Micros) {
        tokio::time::sleep(Duration::from_micros(d)).await
    }

    fn now(&self) -> Micros {
        now_micros()
    }
}

/// Endpoints given to an unreachable URL start here (their member id is not known yet).
const UNKNOWN_ENDPOINTS: Endpoint = 1 << 32;

/// A connection to a cluster: the transport, and the member id behind each endpoint URL.
#[derive(Clone)]
pub struct Cluster {
    /// The transport; endpoints are member ids (or placeholders for URLs that did not answer).
    pub transport: TcpTransport,
    /// Every endpoint, in the order of the URLs.
    pub endpoints: Vec<Endpoint>,
    /// (endpoint, URL) pairs.
    pub urls: Vec<(Endpoint, String)>,
    /// The cluster's id.
    pub cluster_id: u64,
}

/// A random 64-bit number (client ids must differ between processes).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_micros());
    h.write_u32(std::process::id());
    h.finish()
}

impl Cluster {
    /// Connects to the cluster behind `urls` (`http://host:port` or `host:port`): asks each who
    /// it is, so that leader hints (member ids) map to URLs, and one of them who the other
    /// members are (they are added after the URLs given). Fails if none answers in `timeout`.
    pub async fn connect(urls: &[String], timeout: Micros) -> Result<Cluster, ClientError> {
        let mut addrs = Vec::new();
        for u in urls {
            let u = u.trim();
            let a = if u.contains("://") {
                crate::server::parse_url(u).map_err(|e| ClientError::BadEndpoint(e.to_string()))?
            } else {
                u.to_string()
            };
            addrs.push(a);
        }
        if addrs.is_empty() {
            return Err(ClientError::BadEndpoint("no endpoint given".into()));
        }
        let probe = TcpTransport::new(addrs.iter().enumerate().map(|(i, a)| (i as Endpoint, a.clone())).collect());
        let answers =
            futures_join_all((0..addrs.len()).map(|i| probe.hello(i as Endpoint, timeout)).collect::<Vec<_>>()).await;
        let mut map = BTreeMap::new();
        let mut endpoints = Vec::new();
        let mut clusters = std::collections::BTreeSet::new();
        for (i, (a, r)) in addrs.iter().zip(answers).enumerate() {
            let e = match r {
                Ok((cid, id, _)) if !map.contains_key(&id) => {
                    clusters.insert(cid);
                    id
                }
                _ => UNKNOWN_ENDPOINTS + i as Endpoint,
            };
            map.insert(e, a.clone());
            endpoints.push(e);
        }
        if clusters.is_empty() {
            return Err(ClientError::Unavailable(addrs.join(",")));
        }
        if clusters.len() > 1 {
            return Err(ClientError::MixedClusters(addrs.join(",")));
        }
        // Members beyond the URLs given (added since, or not listed): learned from one that
        // answered, so leader hints naming them can be followed.
        if let Some(&known) = endpoints.iter().find(|e| **e < UNKNOWN_ENDPOINTS) {
            let ask = TcpTransport::new(BTreeMap::from([(known, map[&known].clone())]));
            if let Ok(view) = ask.members(known, timeout).await {
                for m in view.members {
                    if let (false, Some(url)) = (map.contains_key(&m.id), m.client_urls.first()) {
                        map.insert(m.id, url.clone());
                        endpoints.push(m.id);
                    }
                }
            }
        }
        let urls = endpoints.iter().map(|e| (*e, map[e].clone())).collect();
        Ok(Cluster { transport: TcpTransport::new(map), endpoints, urls, cluster_id: *clusters.first().expect("one") })
    }

    /// A clerk with id `client` (unique among the cluster's clients; see [`random_u64`]).
    pub fn clerk(&self, client: u64) -> RaftClerk<TcpTransport> {
        RaftClerk::new(self.transport.clone(), self.endpoints.clone(), client)
    }
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
