//! etcd's v3 API on a server process (`kv serve --api etcd`): the members replicate
//! `sixfive_etcd::EtcdSm`, and the client port serves etcd's gRPC services and `/health`, so
//! etcdctl and etcd's client libraries work unchanged.
//!
//! [`NodeReplica`] is the runtime's implementation of [`Replica`], the seam the gRPC services
//! are written against:
//! - a write goes to the leader's node: this member's own if it leads, else forwarded over the
//!   peer connection to the leader (as etcd's followers forward proposals), and resolves when
//!   applied. A refusal (`WrongLeader`: not applied) is retried at the new leader until the
//!   request's deadline; a request that may have been applied (leadership lost after proposing,
//!   or no answer) is never retried: the client gets etcd's "leader changed" or a timeout;
//! - a linearizable read takes the same path (a ReadIndex round on the leader);
//! - a serializable read is answered from this member's applied state;
//! - [`Replica::applied`] is bumped by the node's loop after every batch, which wakes the watch
//!   streams;
//! - [`Replica::now`] is the clock the node stamps entries with, so lease expiry is judged on
//!   the same clock the log is stamped with.
//!
//! The client port also speaks sixfive's own protocol (for `sixfive kv status`): the first
//! bytes of a connection tell them apart (HTTP/2's preface and HTTP/1's methods are ASCII
//! letters; a sixfive frame starts with a small little-endian length).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sixfive_etcd::replica::MemberInfo;
use sixfive_etcd::{EtcdError, EtcdService, EtcdSm, MemberChange, Replica, ReplicaError, ReplicaStatus, ServiceConfig};
use sixfive_rpc::Micros;
use sixfive_rsm::{RsmReply, RsmRequest, SubmitError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, warn};

use crate::driver;
use crate::members::{ChangeError, MemberEntry, MemberOp};
use crate::server::{ServeConfig, Served, Shared, serve_client};

/// How long a request may wait for a leader and its answer (etcd: 5 s plus two election
/// timeouts).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// Pause before asking again when no leader is known or the leader is busy.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl Served for EtcdSm {
    fn create(_: &ServeConfig) -> Self {
        EtcdSm::new(sixfive_etcd::Config::default())
    }

    fn health_query() -> Vec<u8> {
        let q = sixfive_etcd::Query::Range(sixfive_etcd::proto::etcdserverpb::RangeRequest {
            key: b"health".to_vec(),
            ..Default::default()
        });
        q.encode()
    }

    fn serve_clients(sh: Arc<Shared<Self>>, listeners: Vec<TcpListener>) -> Vec<tokio::task::JoinHandle<()>> {
        let cfg = ServiceConfig { lease_promote_extend: sh.election_timeout, ..ServiceConfig::default() };
        let service = EtcdService::new(Arc::new(NodeReplica { sh: sh.clone() }), cfg);
        let (grpc_tx, grpc_rx) = mpsc::channel::<TcpStream>(64);
        let mut tasks = vec![tokio::spawn(async move {
            let incoming = ReceiverStream::new(grpc_rx).map(Ok::<_, std::io::Error>);
            if let Err(e) = service.serve_incoming(incoming, std::future::pending()).await {
                error!("the etcd API server stopped: {e}");
            }
        })];
        for l in listeners {
            let (sh, grpc_tx) = (sh.clone(), grpc_tx.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, addr)) = l.accept().await else { continue };
                    let (sh, grpc_tx) = (sh.clone(), grpc_tx.clone());
                    tokio::spawn(async move {
                        match speaks_http(&s).await {
                            Some(true) => {
                                let _ = s.set_nodelay(true);
                                let _ = grpc_tx.send(s).await;
                            }
                            Some(false) => serve_client(s, addr, sh).await,
                            None => {}
                        }
                    });
                }
            }));
        }
        tasks
    }
}

/// Whether a new connection speaks HTTP (gRPC's HTTP/2 or HTTP/1.1), judged from its first four
/// bytes without consuming them; None if it sends fewer within 10 seconds or closes.
async fn speaks_http(s: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 4];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), s.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if n == buf.len() {
            // "PRI " (HTTP/2), "GET ", "POST"...: ASCII capitals. A sixfive frame's length is
            // below 64 MiB, so its fourth byte is tiny.
            return Some(buf.iter().all(|b| b.is_ascii_uppercase() || *b == b' '));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The replicated store of one server process, as the etcd services see it.
pub struct NodeReplica {
    sh: Arc<Shared<EtcdSm>>,
}

impl NodeReplica {
    /// Sends `request` to the leader's node (this one's, or forwarded) and returns what it
    /// applied or answered; retries only what was certainly not applied.
    async fn request(&self, request: RsmRequest) -> Result<Vec<u8>, ReplicaError> {
        let bytes = postcard::to_allocvec(&request).expect("encodes");
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReplicaError::Timeout);
            }
            let st = self.sh.status();
            let reply = match st.leader {
                Some(l) if l != self.sh.me => match self.sh.peers.call(l, bytes.clone()) {
                    Some((call, rx)) => {
                        let r = tokio::time::timeout(left, rx).await;
                        self.sh.peers.calls.forget(call);
                        match r {
                            Ok(Ok(b)) => b,
                            // The connection to the leader went down with the request on it.
                            Ok(Err(_)) if matches!(request, RsmRequest::Query(_)) => continue,
                            Ok(Err(_)) => return Err(ReplicaError::LeaderChanged),
                            Err(_) => return Err(ReplicaError::Timeout),
                        }
                    }
                    None => {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                },
                _ => match self.sh.ask_local(bytes.clone(), left).await {
                    Some(b) => b,
                    None if self.sh.input.is_closed() => return Err(ReplicaError::Stopped),
                    None => return Err(ReplicaError::Timeout),
                },
            };
            match postcard::from_bytes::<RsmReply>(&reply) {
                Ok(RsmReply::Done(out)) => return Ok(out),
                Ok(RsmReply::Failed(SubmitError::WrongLeader { .. } | SubmitError::Busy)) => {
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(if st.leader.is_none() { ReplicaError::NoLeader } else { ReplicaError::Timeout });
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(RsmReply::Failed(SubmitError::Abandoned { .. })) => return Err(ReplicaError::LeaderChanged),
                Ok(RsmReply::Failed(SubmitError::Shutdown)) if st.leader.is_some_and(|l| l != self.sh.me) => {
                    // The leader is stopping; it may have proposed the request.
                    if matches!(request, RsmRequest::Query(_)) {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    return Err(ReplicaError::LeaderChanged);
                }
                Ok(RsmReply::Failed(SubmitError::Shutdown)) => return Err(ReplicaError::Stopped),
                Ok(other) => {
                    warn!("unexpected answer from the node: {other:?}");
                    return Err(ReplicaError::Stopped);
                }
                Err(e) => {
                    warn!("undecodable answer from the node: {e}");
                    return Err(ReplicaError::Stopped);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Replica for NodeReplica {
    async fn submit(&self, cmd: Vec<u8>) -> Result<Vec<u8>, ReplicaError> {
        self.request(RsmRequest::Command(cmd)).await
    }

    async fn read(&self, query: Vec<u8>, linearizable: bool) -> Result<Vec<u8>, ReplicaError> {
        if linearizable {
            return self.request(RsmRequest::Query(query)).await;
        }
        use sixfive_rsm::StateMachine;
        self.sh.with(move |n, _| n.rsm().state_machine().query(&query)).await.ok_or(ReplicaError::Stopped)
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.sh.applied.subscribe()
    }

    fn status(&self) -> ReplicaStatus {
        let st = self.sh.status();
        let members = self.sh.members_view().members.iter().map(member_info).collect();
        let db = ["raft.log", "raft.snapshot"]
            .iter()
            .map(|f| std::fs::metadata(self.sh.raft_dir.join(f)).map(|m| m.len()).unwrap_or(0))
            .sum::<u64>();
        ReplicaStatus {
            cluster_id: self.sh.cluster_id,
            member_id: self.sh.me,
            leader: st.leader,
            term: st.term,
            commit_index: st.commit,
            applied_index: st.applied,
            db_size: db as i64,
            members,
        }
    }

    fn header_ids(&self) -> (u64, u64, u64) {
        (self.sh.cluster_id, self.sh.me, self.sh.status().term)
    }

    fn now(&self) -> Micros {
        driver::now_micros()
    }

    async fn change_members(&self, change: MemberChange) -> Result<(u64, Vec<MemberInfo>), EtcdError> {
        let op = match change {
            MemberChange::Add { peer_urls, learner } => {
                let [url] = peer_urls.as_slice() else { return Err(EtcdError::MemberBadUrls) };
                let peer_addr = crate::server::parse_url(url).map_err(|_| EtcdError::MemberBadUrls)?;
                // etcd's MemberAdd names no member: the name is the one it starts with.
                MemberOp::Add { name: String::new(), peer_addr, learner }
            }
            MemberChange::Promote(id) => MemberOp::Promote(id),
            MemberChange::Remove(id) => MemberOp::Remove(id),
        };
        // Well within etcdctl's default command timeout (5 s).
        let (id, mut view) = self.sh.change_members(&op, Duration::from_secs(3)).await.map_err(|e| match e {
            ChangeError::NotFound(_) => EtcdError::MemberNotFound,
            ChangeError::Exists(_) => EtcdError::PeerUrlExist,
            ChangeError::NotLearner(_) => EtcdError::MemberNotLearner,
            ChangeError::LearnerBehind(_) => EtcdError::LearnerNotReady,
            ChangeError::Invalid(why) => {
                warn!("membership change refused: {why}");
                EtcdError::BadMembershipChange
            }
            ChangeError::Unavailable(_) => EtcdError::Timeout,
        })?;
        // The members after the change, from the leader's view before it.
        match op {
            MemberOp::Add { name, peer_addr, learner } => view.members.push(MemberEntry {
                id,
                name,
                peer_addr,
                client_urls: vec![],
                learner: true,
                promote: !learner,
            }),
            MemberOp::Promote(id) => view.members.iter_mut().filter(|m| m.id == id).for_each(|m| m.learner = false),
            MemberOp::Remove(id) => view.members.retain(|m| m.id != id),
        }
        let urls = self.sh.peers.client_urls();
        for m in &mut view.members {
            m.client_urls = urls.get(&m.id).cloned().unwrap_or_default();
        }
        Ok((id, view.members.iter().map(member_info).collect()))
    }
}

/// A member as etcd's Cluster service shows it.
fn member_info(m: &MemberEntry) -> MemberInfo {
    let http = |v: &[String]| v.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>();
    MemberInfo {
        id: m.id,
        name: m.name.clone(),
        peer_urls: http(std::slice::from_ref(&m.peer_addr)),
        client_urls: http(&m.client_urls),
        is_learner: m.learner,
    }
}
