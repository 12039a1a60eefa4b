//! The gRPC services (tonic): KV, Watch, Lease, Cluster and Maintenance over a [`Replica`].
//!
//! Requests are checked here as etcd's `api/v3rpc` checks them (and again when applied, so the
//! state machine never trusts its input), encoded, and sent through the replica. Response
//! headers get the cluster and member ids and the term here.
//!
//! Watches pull: each stream remembers, per watcher, the next revision it owes the client, and
//! after every apply reads the store's history from there ([`Query::Events`]). So events come
//! in revision order, none is skipped, and a client that reconnects with `start_revision` set to
//! its last seen revision plus one resumes exactly, unless that history was compacted, in which
//! case the watch is cancelled with the compaction revision, as etcd does.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    self as pb, AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, HashKvRequest, HashKvResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader, StatusRequest, StatusResponse, TxnRequest,
    TxnResponse, WatchRequest, WatchResponse, cluster_server, kv_server, lease_server, maintenance_server,
    watch_server,
};
use crate::proto::mvccpb;
use crate::replica::{MemberChange, MemberInfo, Replica};
use crate::sm::{self, Command, Output, Query, QueryOutput};

/// The etcd API version this server speaks (what Status reports).
pub const ETCD_API_VERSION: &str = "3.6.0";

/// Automatic compaction (etcd's `--auto-compaction-mode` and `--auto-compaction-retention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep the last `retain` revisions: every `interval`, compact to the current revision
    /// minus `retain` (etcd's revision mode checks every 5 minutes).
    Revision {
        /// Revisions kept.
        retain: i64,
        /// How often to check.
        interval: Duration,
    },
    /// Keep `retention` of history: every tenth of it, note the current revision, and compact
    /// to the last revision noted at least `retention` ago (etcd's periodic mode).
    Periodic {
        /// History kept, measured on the replica's clock.
        retention: Duration,
    },
}

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Largest request accepted, in bytes (`--max-request-bytes`, etcd's default 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most operations in one txn (`--max-txn-ops`); must equal the state machine's.
    pub max_txn_ops: usize,
    /// Interval of progress notifications to watchers that asked for them (etcd: 10 minutes).
    pub progress_notify_interval: Duration,
    /// How often the leader looks for expired leases (etcd: 500 ms).
    pub lease_check_interval: Duration,
    /// Extension a new leader gives every lease (etcd: the election timeout).
    pub lease_promote_extend: Duration,
    /// Most events read from the store at once for one watcher.
    pub watch_batch_events: usize,
    /// Automatic compaction, proposed by the leader; `None`: only on request.
    pub auto_compaction: Option<AutoCompaction>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            progress_notify_interval: Duration::from_secs(600),
            lease_check_interval: Duration::from_millis(500),
            lease_promote_extend: Duration::from_secs(1),
            watch_batch_events: 1000,
            auto_compaction: None,
        }
    }
}

/// The etcd services over one replica. Cheap to clone.
pub struct EtcdService<R> {
    replica: Arc<R>,
    cfg: Arc<ServiceConfig>,
}

impl<R> Clone for EtcdService<R> {
    fn clone(&self) -> Self {
        EtcdService { replica: self.replica.clone(), cfg: self.cfg.clone() }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("sixfive: unexpected {what} from the state machine"))
}

impl<R: Replica> EtcdService<R> {
    /// The services over `replica`.
    pub fn new(replica: Arc<R>, cfg: ServiceConfig) -> Self {
        EtcdService { replica, cfg: Arc::new(cfg) }
    }

    fn header(&self, h: Option<ResponseHeader>) -> Option<ResponseHeader> {
        let (cluster_id, member_id, raft_term) = self.replica.header_ids();
        let revision = h.map_or(0, |h| h.revision);
        Some(ResponseHeader { cluster_id, member_id, revision, raft_term })
    }

    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.into());
        }
        Ok(())
    }

    async fn submit(&self, c: Command) -> Result<Output, Status> {
        let out = self.replica.submit(c.encode()).await.map_err(EtcdError::from)?;
        Ok(sm::decode_result(&out)?)
    }

    async fn read(&self, q: Query, linearizable: bool) -> Result<QueryOutput, Status> {
        let out = self.replica.read(q.encode(), linearizable).await.map_err(EtcdError::from)?;
        Ok(sm::decode_answer(&out)?)
    }

    /// Serves every service on `listener` until `shutdown` resolves; runs the lease keeper
    /// beside it (expiry and promotion through the log, on the leader only).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_incoming(TcpListenerStream::new(listener), shutdown).await
    }

    /// [`EtcdService::serve`] on connections accepted elsewhere (a server that shares its client
    /// port with another protocol hands over the connections that speak HTTP).
    pub async fn serve_incoming<S, IO, IE>(
        self,
        incoming: S,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error>
    where
        S: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
        IO: tonic::transport::server::Connected + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let keeper = tokio::spawn(lease_keeper(self.replica.clone(), self.cfg.clone()));
        let compactor = self.cfg.auto_compaction.map(|ac| tokio::spawn(compactor(self.replica.clone(), ac)));
        let max = self.cfg.max_request_bytes + 512 * 1024; // etcd's grpcOverheadBytes
        let routes = tonic::service::Routes::new(kv_server::KvServer::new(self.clone()).max_decoding_message_size(max))
            .add_service(watch_server::WatchServer::new(self.clone()).max_decoding_message_size(max))
            .add_service(lease_server::LeaseServer::new(self.clone()).max_decoding_message_size(max))
            .add_service(cluster_server::ClusterServer::new(self.clone()))
            .add_service(maintenance_server::MaintenanceServer::new(self.clone()));
        let svc = self.clone();
        let router = routes.into_axum_router().route(
            "/health",
            axum::routing::get(move || {
                let svc = svc.clone();
                async move { svc.health().await }
            }),
        );
        let r = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(router.into())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        keeper.abort();
        if let Some(c) = compactor {
            c.abort();
        }
        r
    }
}

impl<R: Replica> EtcdService<R> {
    /// `GET /health`, as etcd answers it: 200 and `{"health":"true","reason":""}` when a leader
    /// is known and a linearizable read goes through; 503 and the reason otherwise.
    async fn health(&self) -> (axum::http::StatusCode, [(axum::http::HeaderName, &'static str); 1], String) {
        let reason = if self.replica.status().leader.is_none() {
            Some("RAFT NO LEADER")
        } else {
            let q = Query::Range(RangeRequest { key: b"health".to_vec(), ..Default::default() });
            match self.read(q, true).await {
                Ok(_) => None,
                Err(_) => Some("QGET ERROR"),
            }
        };
        let code =
            if reason.is_some() { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK };
        let body = format!(r#"{{"health":"{}","reason":"{}"}}"#, reason.is_none(), reason.unwrap_or(""));
        (code, [(axum::http::header::CONTENT_TYPE, "application/json")], body)
    }
}

/// On the leader: after each election, extend every lease (etcd's `Promote`); then, every
/// `lease_check_interval`, revoke the leases expired at the leader's clock, through the log.
async fn lease_keeper<R: Replica>(replica: Arc<R>, cfg: Arc<ServiceConfig>) {
    let mut promoted_term = None;
    let mut tick = tokio::time::interval(cfg.lease_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = replica.status();
        if !st.is_leader() {
            promoted_term = None;
            continue;
        }
        if promoted_term != Some(st.term) {
            let extend = cfg.lease_promote_extend.as_micros() as u64;
            if replica.submit(Command::PromoteLeases { extend }.encode()).await.is_ok() {
                promoted_term = Some(st.term);
            }
            continue;
        }
        let q = Query::ExpiredLeases { now: replica.now() }.encode();
        let Ok(out) = replica.read(q, false).await else { continue };
        if let Ok(QueryOutput::ExpiredLeases(ids)) = sm::decode_answer(&out)
            && !ids.is_empty()
        {
            // The entry's own stamp decides what expires; a failure is retried next tick.
            let _ = replica.submit(Command::ExpireLeases.encode()).await;
        }
    }
}

/// On the leader: automatic compaction, through the log like a client's Compact.
async fn compactor<R: Replica>(replica: Arc<R>, ac: AutoCompaction) {
    let every = match ac {
        AutoCompaction::Revision { interval, .. } => interval,
        AutoCompaction::Periodic { retention } => (retention / 10).max(Duration::from_millis(1)),
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Periodic mode: (time, revision) noted every tick, oldest first.
    let mut samples: std::collections::VecDeque<(u64, i64)> = std::collections::VecDeque::new();
    loop {
        tick.tick().await;
        let Ok(out) = replica.read(Query::Revision.encode(), false).await else { continue };
        let Ok(QueryOutput::Revision { revision, compact_revision }) = sm::decode_answer(&out) else { continue };
        let target = match ac {
            AutoCompaction::Revision { retain, .. } => revision - retain,
            AutoCompaction::Periodic { retention } => {
                let now = replica.now();
                samples.push_back((now, revision));
                let horizon = now.saturating_sub(retention.as_micros() as u64);
                let mut target = 0;
                while let Some(&(t, r)) = samples.front() {
                    if t > horizon {
                        break;
                    }
                    target = r;
                    // Keep the newest sample at or before the horizon for the next round.
                    if samples.len() > 1 && samples[1].0 <= horizon {
                        samples.pop_front();
                    } else {
                        break;
                    }
                }
                target
            }
        };
        if !replica.status().is_leader() || target <= 0 || target <= compact_revision {
            continue;
        }
        // Refusals (a racing compaction got there first) are harmless; retried next tick.
        let _ =
            replica.submit(Command::Compact(CompactionRequest { revision: target, physical: false }).encode()).await;
    }
}

#[tonic::async_trait]
impl<R: Replica> kv_server::Kv for EtcdService<R> {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        sm::check_range(&r)?;
        let linearizable = !r.serializable;
        match self.read(Query::Range(r), linearizable).await? {
            QueryOutput::Range(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("range answer")),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let p = req.into_inner();
        sm::check_put(&p)?;
        self.check_size(&p)?;
        match self.submit(Command::Put(p)).await? {
            Output::Put(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("put result")),
        }
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let d = req.into_inner();
        if d.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_size(&d)?;
        match self.submit(Command::DeleteRange(d)).await? {
            Output::DeleteRange(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("delete result")),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let t = req.into_inner();
        sm::check_txn(&t, self.cfg.max_txn_ops)?;
        self.check_size(&t)?;
        match self.submit(Command::Txn(t)).await? {
            Output::Txn(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("txn result")),
        }
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        match self.submit(Command::Compact(req.into_inner())).await? {
            Output::Compact(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compaction result")),
        }
    }
}

#[tonic::async_trait]
impl<R: Replica> lease_server::Lease for EtcdService<R> {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        match self.submit(Command::LeaseGrant(req.into_inner())).await? {
            Output::LeaseGrant(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("lease grant result")),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        match self.submit(Command::LeaseRevoke(req.into_inner())).await? {
            Output::LeaseRevoke(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("lease revoke result")),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<LeaseKeepAliveResponse>>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let svc = self.clone();
        tokio::spawn(async move {
            loop {
                let id = match inbound.message().await {
                    Ok(Some(r)) => r.id,
                    _ => return,
                };
                let resp = match svc.submit(Command::LeaseKeepAlive(id)).await {
                    Ok(Output::LeaseKeepAlive(mut r)) => {
                        r.header = svc.header(r.header);
                        Ok(r)
                    }
                    // etcd answers a keep-alive of an unknown lease with TTL 0, not an error.
                    Err(s) if s.message() == EtcdError::LeaseNotFound.to_string() => {
                        let rev = svc.read(Query::Revision, false).await.ok().and_then(|o| match o {
                            QueryOutput::Revision { revision, .. } => Some(revision),
                            _ => None,
                        });
                        let h = svc.header(Some(ResponseHeader { revision: rev.unwrap_or(0), ..Default::default() }));
                        Ok(LeaseKeepAliveResponse { header: h, id, ttl: 0 })
                    }
                    Err(s) => Err(s),
                    Ok(_) => Err(unexpected("keep-alive result")),
                };
                let stop = resp.is_err();
                if tx.send(resp).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let q = Query::LeaseTimeToLive { id: r.id, keys: r.keys, now: self.replica.now() };
        match self.read(q, true).await {
            Ok(QueryOutput::LeaseTimeToLive(mut resp)) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            // etcd answers TTL -1 for an unknown lease.
            Err(s) if s.message() == EtcdError::LeaseNotFound.to_string() => {
                let rev = match self.read(Query::Revision, false).await? {
                    QueryOutput::Revision { revision, .. } => revision,
                    _ => 0,
                };
                Ok(Response::new(LeaseTimeToLiveResponse {
                    header: self.header(Some(ResponseHeader { revision: rev, ..Default::default() })),
                    id: r.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            Err(s) => Err(s),
            Ok(_) => Err(unexpected("time-to-live answer")),
        }
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        match self.read(Query::LeaseLeases, true).await? {
            QueryOutput::LeaseLeases(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("leases answer")),
        }
    }
}

#[tonic::async_trait]
impl<R: Replica> cluster_server::Cluster for EtcdService<R> {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = self.replica.status().members.iter().map(to_member).collect();
        Ok(Response::new(MemberListResponse { header: self.header(None), members }))
    }

    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        let change = MemberChange::Add { peer_urls: req.peer_ur_ls.clone(), learner: req.is_learner };
        let (id, members) = self.replica.change_members(change).await?;
        // Every new member is a learner first; one added as a voter is promoted by the leader
        // once it has caught up (so `member list` shows it a learner until then).
        let member = Member { id, peer_ur_ls: req.peer_ur_ls, is_learner: true, ..Default::default() };
        Ok(Response::new(MemberAddResponse {
            header: self.header(None),
            member: Some(member),
            members: members.iter().map(to_member).collect(),
        }))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let (_, members) = self.replica.change_members(MemberChange::Remove(req.into_inner().id)).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(None),
            members: members.iter().map(to_member).collect(),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let (_, members) = self.replica.change_members(MemberChange::Promote(req.into_inner().id)).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(None),
            members: members.iter().map(to_member).collect(),
        }))
    }
}

fn to_member(m: &MemberInfo) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

#[tonic::async_trait]
impl<R: Replica> maintenance_server::Maintenance for EtcdService<R> {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        use pb::alarm_request::AlarmAction;
        match AlarmAction::try_from(req.into_inner().action) {
            // This server raises no alarm (it has no space quota yet): the list is empty and
            // deactivating is a no-op.
            Ok(AlarmAction::Get | AlarmAction::Deactivate) => {
                Ok(Response::new(AlarmResponse { header: self.header(None), alarms: vec![] }))
            }
            Ok(AlarmAction::Activate) => {
                Err(Status::unimplemented("sixfive: raising alarms by request is not supported"))
            }
            Err(_) => Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        }
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.replica.status();
        let rev = match self.read(Query::Revision, false).await? {
            QueryOutput::Revision { revision, .. } => revision,
            _ => 0,
        };
        Ok(Response::new(StatusResponse {
            header: self.header(Some(ResponseHeader { revision: rev, ..Default::default() })),
            version: ETCD_API_VERSION.into(),
            db_size: st.db_size,
            leader: st.leader.unwrap_or(0),
            raft_index: st.commit_index,
            raft_term: st.term,
            raft_applied_index: st.applied_index,
            db_size_in_use: st.db_size,
            is_learner: false,
            errors: if st.leader.is_none() { vec![EtcdError::NoLeader.to_string()] } else { vec![] },
            storage_version: ETCD_API_VERSION.into(),
            ..Default::default()
        }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        match self.read(Query::HashKv { revision: req.into_inner().revision }, false).await? {
            QueryOutput::HashKv(mut resp) => {
                resp.header = self.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("hash answer")),
        }
    }
}

/// One watcher of a watch stream.
struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The next revision this watcher owes the client.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

type WatchTx = mpsc::Sender<Result<WatchResponse, Status>>;

#[tonic::async_trait]
impl<R: Replica> watch_server::Watch for EtcdService<R> {
    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<BoxStream<WatchResponse>>, Status> {
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().watch_stream(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl<R: Replica> EtcdService<R> {
    async fn current_rev(&self) -> Result<i64, Status> {
        match self.read(Query::Revision, false).await? {
            QueryOutput::Revision { revision, .. } => Ok(revision),
            _ => Err(unexpected("revision answer")),
        }
    }

    fn watch_resp(&self, rev: i64, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: self.header(Some(ResponseHeader { revision: rev, ..Default::default() })),
            watch_id,
            ..Default::default()
        }
    }

    /// Sends a watcher everything it is owed. Returns false if the watcher was cancelled
    /// (compacted); errors when the stream is gone or the replica failed.
    async fn sync(&self, id: i64, w: &mut Watcher, tx: &WatchTx) -> Result<bool, Status> {
        loop {
            let q = Query::Events {
                key: w.key.clone(),
                range_end: w.range_end.clone(),
                from: w.next,
                max: self.cfg.watch_batch_events,
            };
            match self.read(q, false).await? {
                QueryOutput::Events { events, next, revision } => {
                    let events: Vec<mvccpb::Event> = events
                        .into_iter()
                        .filter(|e| {
                            let put = e.r#type == mvccpb::event::EventType::Put as i32;
                            !(put && w.no_put || !put && w.no_delete)
                        })
                        .map(|mut e| {
                            if !w.prev_kv {
                                e.prev_kv = None;
                            }
                            e
                        })
                        .collect();
                    w.next = next;
                    if !events.is_empty() {
                        let mut r = self.watch_resp(revision, id);
                        r.events = events;
                        tx.send(Ok(r)).await.map_err(|_| Status::cancelled("watch stream closed"))?;
                    }
                    if next > revision {
                        return Ok(true);
                    }
                }
                QueryOutput::EventsCompacted { compact_revision, revision } => {
                    let mut r = self.watch_resp(revision, id);
                    r.compact_revision = compact_revision;
                    // etcd sets no cancel_reason here: clients read compact_revision.
                    r.canceled = true;
                    tx.send(Ok(r)).await.map_err(|_| Status::cancelled("watch stream closed"))?;
                    return Ok(false);
                }
                _ => return Err(unexpected("events answer")),
            }
        }
    }

    async fn sync_all(&self, watchers: &mut BTreeMap<i64, Watcher>, tx: &WatchTx) -> Result<(), Status> {
        let mut gone = Vec::new();
        for (id, w) in watchers.iter_mut() {
            if !self.sync(*id, w, tx).await? {
                gone.push(*id);
            }
        }
        for id in gone {
            watchers.remove(&id);
        }
        Ok(())
    }

    async fn watch_stream(self, mut inbound: Streaming<WatchRequest>, tx: WatchTx) {
        let mut applied = self.replica.applied();
        let mut watchers: BTreeMap<i64, Watcher> = BTreeMap::new();
        let mut next_id = 0i64;
        let mut progress = tokio::time::interval(self.cfg.progress_notify_interval);
        progress.tick().await; // the first tick is immediate
        loop {
            let step: Result<(), Status> = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.watch_request(req, &mut watchers, &mut next_id, &tx).await,
                    _ => return,
                },
                ch = applied.changed() => match ch {
                    Ok(()) => self.sync_all(&mut watchers, &tx).await,
                    Err(_) => Err(EtcdError::Stopped.into()),
                },
                _ = progress.tick() => {
                    let mut res = Ok(());
                    for (id, w) in &watchers {
                        // A watcher has sent everything below `next`: that is its progress.
                        if w.progress_notify && tx.send(Ok(self.watch_resp(w.next - 1, *id))).await.is_err() {
                            res = Err(Status::cancelled("watch stream closed"));
                            break;
                        }
                    }
                    res
                }
                _ = tx.closed() => return,
            };
            if let Err(s) = step {
                let _ = tx.send(Err(s)).await;
                return;
            }
        }
    }

    async fn watch_request(
        &self,
        req: WatchRequest,
        watchers: &mut BTreeMap<i64, Watcher>,
        next_id: &mut i64,
        tx: &WatchTx,
    ) -> Result<(), Status> {
        use pb::watch_create_request::FilterType;
        use pb::watch_request::RequestUnion;
        let closed = |_| Status::cancelled("watch stream closed");
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                let rev = self.current_rev().await?;
                let key = if c.key.is_empty() { vec![0] } else { c.key };
                let refuse = |reason: String| {
                    let mut r = self.watch_resp(rev, -1);
                    r.created = true;
                    r.canceled = true;
                    r.cancel_reason = reason;
                    r
                };
                if c.start_revision < 0 {
                    return tx.send(Ok(refuse(EtcdError::Compacted.to_string()))).await.map_err(closed);
                }
                // As etcd's watch stream: a range that holds no key is refused ("\0" means
                // every key from `key` on, not an end).
                if !c.range_end.is_empty() && c.range_end != [0] && key >= c.range_end {
                    return tx.send(Ok(refuse(EtcdError::EmptyWatcherRange.to_string()))).await.map_err(closed);
                }
                let id = if c.watch_id != 0 {
                    if watchers.contains_key(&c.watch_id) {
                        return tx.send(Ok(refuse(EtcdError::DuplicateWatchId.to_string()))).await.map_err(closed);
                    }
                    c.watch_id
                } else {
                    while watchers.contains_key(next_id) {
                        *next_id += 1;
                    }
                    *next_id += 1;
                    *next_id - 1
                };
                let mut w = Watcher {
                    key,
                    range_end: c.range_end,
                    next: if c.start_revision == 0 { rev + 1 } else { c.start_revision },
                    prev_kv: c.prev_kv,
                    no_put: c.filters.contains(&(FilterType::Noput as i32)),
                    no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
                    progress_notify: c.progress_notify,
                };
                let mut r = self.watch_resp(rev, id);
                r.created = true;
                tx.send(Ok(r)).await.map_err(closed)?;
                if self.sync(id, &mut w, tx).await? {
                    watchers.insert(id, w);
                }
                Ok(())
            }
            Some(RequestUnion::CancelRequest(c)) => {
                if watchers.remove(&c.watch_id).is_some() {
                    let rev = self.current_rev().await?;
                    let mut r = self.watch_resp(rev, c.watch_id);
                    r.canceled = true;
                    tx.send(Ok(r)).await.map_err(closed)?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.sync_all(watchers, tx).await?;
                // Every event up to the lowest watcher's progress has been sent (with no
                // watcher: up to the current revision).
                let rev = match watchers.values().map(|w| w.next - 1).min() {
                    Some(r) => r,
                    None => self.current_rev().await?,
                };
                tx.send(Ok(self.watch_resp(rev, -1))).await.map_err(closed)
            }
            None => Ok(()),
        }
    }
}
