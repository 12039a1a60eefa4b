//! What the gRPC service needs from "the replicated store", and an in-process implementation.
//!
//! [`Replica`] is the seam between the etcd API and the runtime. It speaks bytes
//! ([`crate::Command::encode`], [`crate::Query::encode`] and the matching result codecs), which
//! is exactly what `sixfive_rsm::Rsm::submit` / `query` carry, so the runtime's implementation
//! is a thin adapter over its `RsmNode` event loop:
//! - [`Replica::submit`]: propose through Raft, resolve when the entry is applied;
//! - [`Replica::read`]: linearizable (ReadIndex) or serializable (this replica's applied state);
//! - [`Replica::applied`]: a `watch` channel bumped after each apply, which wakes the watch
//!   streams (they then pull events from the store's history, so nothing is lost or reordered);
//! - [`Replica::status`] and [`Replica::now`].
//!
//! [`LocalReplica`] is one replica applying commands directly (no Raft): the service's tests use
//! it, and it is what a single-node development server would be.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sixfive_rsm::{ApplyCtx, StateMachine};

use tokio::sync::watch;

use crate::error::EtcdError;
use crate::sm::{Config, EtcdSm, Micros};

/// Why a replica could not serve a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// No leader is known; nothing was applied.
    #[error("no leader")]
    NoLeader,
    /// Leadership changed after the command was proposed; it may or may not be applied.
    #[error("leader changed")]
    LeaderChanged,
    /// The replica is shutting down.
    #[error("stopped")]
    Stopped,
    /// No answer in time; a command may or may not be applied.
    #[error("timed out")]
    Timeout,
}

impl From<ReplicaError> for EtcdError {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::NoLeader => EtcdError::NoLeader,
            ReplicaError::LeaderChanged => EtcdError::LeaderChanged,
            ReplicaError::Stopped => EtcdError::Stopped,
            ReplicaError::Timeout => EtcdError::Timeout,
        }
    }
}

/// One member of the cluster, as MemberList shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Member id.
    pub id: u64,
    /// Member name (`--name`).
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs.
    pub client_urls: Vec<String>,
    /// A learner (receives the log, does not vote).
    pub is_learner: bool,
}

/// A membership change asked through etcd's Cluster service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// MemberAdd: a new member reached at `peer_urls`; a learner if `learner`.
    Add {
        /// Its peer URLs as given.
        peer_urls: Vec<String>,
        /// MemberAddAsLearner.
        learner: bool,
    },
    /// MemberPromote.
    Promote(u64),
    /// MemberRemove.
    Remove(u64),
}

/// What this replica knows of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Cluster id (the same on every member).
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: u64,
    /// The leader this replica believes in, if any.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// Raft commit index.
    pub commit_index: u64,
    /// Raft applied index.
    pub applied_index: u64,
    /// Size of the replica's data, in bytes.
    pub db_size: i64,
    /// The members.
    pub members: Vec<MemberInfo>,
}

impl ReplicaStatus {
    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.member_id)
    }
}

/// The replicated store, as the etcd service uses it.
#[tonic::async_trait]
pub trait Replica: Send + Sync + 'static {
    /// Proposes an encoded [`crate::Command`]; returns the encoded result once applied.
    async fn submit(&self, cmd: Vec<u8>) -> Result<Vec<u8>, ReplicaError>;
    /// Answers an encoded [`crate::Query`]: after a ReadIndex round when `linearizable`, else
    /// from this replica's applied state.
    async fn read(&self, query: Vec<u8>, linearizable: bool) -> Result<Vec<u8>, ReplicaError>;
    /// Changes after every apply (the value: the applied index).
    fn applied(&self) -> watch::Receiver<u64>;
    /// The replica's view of the cluster.
    fn status(&self) -> ReplicaStatus;
    /// What every response header carries: cluster id, member id, term. An implementation
    /// whose [`Replica::status`] is costly (it reads file sizes) answers this cheaply.
    fn header_ids(&self) -> (u64, u64, u64) {
        let st = self.status();
        (st.cluster_id, st.member_id, st.term)
    }
    /// The clock the leader stamps entries with, in microseconds (used for lease expiry).
    fn now(&self) -> Micros;
    /// Makes a membership change: the id of the member concerned and the members after it.
    /// A replica without membership changes says it is not capable.
    async fn change_members(&self, _change: MemberChange) -> Result<(u64, Vec<MemberInfo>), EtcdError> {
        Err(EtcdError::NotCapable)
    }
}

/// A clock in microseconds.
pub type Clock = Arc<dyn Fn() -> Micros + Send + Sync>;

/// The system clock, in microseconds since the Unix epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
    })
}

/// A clock tests move by hand.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at `t` microseconds.
    pub fn new(t: Micros) -> Self {
        ManualClock(Arc::new(AtomicU64::new(t)))
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: Micros) {
        self.0.fetch_add(d, Ordering::SeqCst);
    }
    /// The time.
    pub fn get(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
    /// As a [`Clock`].
    pub fn clock(&self) -> Clock {
        let c = self.clone();
        Arc::new(move || c.get())
    }
}

/// A single replica applying commands directly: the leader of a one-member cluster.
pub struct LocalReplica {
    inner: Mutex<Local>,
    applied: watch::Sender<u64>,
    clock: Clock,
    member: MemberInfo,
}

struct Local {
    sm: EtcdSm,
    index: u64,
    time: Micros,
}

impl LocalReplica {
    /// A new, empty store with the state machine settings `cfg`, the system clock, and one member.
    pub fn new(cfg: Config) -> Self {
        Self::with_clock(cfg, system_clock())
    }

    /// The same with a given clock.
    pub fn with_clock(cfg: Config, clock: Clock) -> Self {
        LocalReplica {
            inner: Mutex::new(Local { sm: EtcdSm::new(cfg), index: 0, time: 0 }),
            applied: watch::channel(0).0,
            clock,
            member: MemberInfo {
                id: 1,
                name: "default".into(),
                peer_urls: vec![],
                client_urls: vec![],
                is_learner: false,
            },
        }
    }

    /// Sets the member shown by MemberList.
    pub fn set_member(&mut self, m: MemberInfo) {
        self.member = m;
    }
}

#[tonic::async_trait]
impl Replica for LocalReplica {
    async fn submit(&self, cmd: Vec<u8>) -> Result<Vec<u8>, ReplicaError> {
        let out = {
            let mut l = self.inner.lock().expect("not poisoned");
            l.index += 1;
            // The leader's stamp never goes back along the log.
            l.time = l.time.max((self.clock)());
            let ctx = ApplyCtx { index: l.index, time: l.time };
            let out = l.sm.apply(&cmd, ctx);
            self.applied.send_replace(l.index);
            out
        };
        Ok(out)
    }

    async fn read(&self, query: Vec<u8>, _linearizable: bool) -> Result<Vec<u8>, ReplicaError> {
        Ok(self.inner.lock().expect("not poisoned").sm.query(&query))
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn status(&self) -> ReplicaStatus {
        let l = self.inner.lock().expect("not poisoned");
        ReplicaStatus {
            cluster_id: 0x5153_4956_4546_4956,
            member_id: self.member.id,
            leader: Some(self.member.id),
            term: 1,
            commit_index: l.index,
            applied_index: l.index,
            db_size: l.sm.store().size_bytes() as i64,
            members: vec![self.member.clone()],
        }
    }

    fn now(&self) -> Micros {
        (self.clock)()
    }
}
