//! The errors etcd's clients see, with etcd's gRPC codes and messages
//! (etcd `api/v3rpc/rpctypes/error.go`), so etcdctl and the client libraries recognise them.

use serde::{Deserialize, Serialize};

use crate::mvcc::RevError;

/// An error of the etcd API. Its `Display` is etcd's message; [`EtcdError::code`] its gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum EtcdError {
    /// A request without a key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A put with `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A put with `ignore_value` and a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` and a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn with more operations than the limit (`--max-txn-ops`).
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn that writes one key twice.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// An unknown sort order or target.
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A revision older than the last compaction.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A revision newer than the store's.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// No such lease.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant with the id of an existing lease.
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    /// A grant with a TTL above etcd's maximum (9,000,000,000 s).
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// A request larger than `--max-request-bytes`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// No leader is known: the request was not applied.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The leader changed after the request was proposed: it may or may not be applied.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// The server is stopping.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// The request did not finish in time: it may or may not be applied.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// A watch with a user-chosen id already used on its stream.
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateWatchId,
    /// A watch whose range holds no key (`range_end` at or below `key`).
    #[error("mvcc: watcher range is empty")]
    EmptyWatcherRange,
    /// An operation this server does not provide (yet).
    #[error("etcdserver: not capable")]
    NotCapable,
    /// A command or query that does not decode (never sent by this crate's service).
    #[error("etcdserver: malformed request")]
    Malformed,
    /// No member with that id.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// A member has these peer URLs already.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    /// Promoting a member that is not a learner.
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// Promoting a learner that has not caught up.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// Peer URLs that are not `http://host:port` (one per member here).
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    /// A membership change the configuration does not allow (e.g. one that leaves no voter).
    #[error("etcdserver: invalid membership change for the current configuration")]
    BadMembershipChange,
}

/// gRPC status codes (the subset etcd uses), numbered as gRPC numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1
    Canceled = 1,
    /// 3
    InvalidArgument = 3,
    /// 5
    NotFound = 5,
    /// 8
    ResourceExhausted = 8,
    /// 9
    FailedPrecondition = 9,
    /// 11
    OutOfRange = 11,
    /// 14
    Unavailable = 14,
}

impl EtcdError {
    /// The gRPC code etcd sends with this error.
    pub fn code(self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey | InvalidSortOption
            | RequestTooLarge | Malformed | MemberBadUrls => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExist | NotCapable | DuplicateWatchId | EmptyWatcherRange | PeerUrlExist | MemberNotLearner
            | LearnerNotReady | BadMembershipChange => Code::FailedPrecondition,
            NoLeader | LeaderChanged | Stopped | Timeout => Code::Unavailable,
        }
    }
}

impl From<RevError> for EtcdError {
    fn from(e: RevError) -> Self {
        match e {
            RevError::Compacted => EtcdError::Compacted,
            RevError::Future => EtcdError::FutureRev,
        }
    }
}

impl From<EtcdError> for tonic::Status {
    fn from(e: EtcdError) -> Self {
        let code = match e.code() {
            Code::Canceled => tonic::Code::Cancelled,
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::OutOfRange => tonic::Code::OutOfRange,
            Code::Unavailable => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, e.to_string())
    }
}
