//! # sixfive-etcd: etcd's v3 API on sixfive
//!
//! Unmodified etcd clients (etcdctl, the Go client, the `etcd-client` crate) talk to sixfive
//! through etcd's own gRPC API, with etcd's semantics and errors. The crate has three layers:
//!
//! - [`sm`]: the key/value service as a deterministic `sixfive_rsm::StateMachine`
//!   ([`EtcdSm`]): the MVCC store of [`mvcc`] (one revision per write transaction, per-key
//!   create/mod revision and version, tombstones, reads at past revisions, compaction with
//!   etcd's errors), Put/DeleteRange/Txn with etcd's checks, and leases whose expiry is decided
//!   through the log with the leader-stamped entry time, so every replica deletes the same keys
//!   at the same revision. Its history is also the watch event log.
//! - [`replica`]: the seam to the replicated store ([`Replica`]: submit a command through Raft,
//!   linearizable and serializable reads, a notification after each apply, status), and
//!   [`LocalReplica`], one replica applying commands directly.
//! - [`service`]: the tonic services KV, Watch, Lease, Cluster and Maintenance over any
//!   [`Replica`] ([`EtcdService::serve`]), plus the lease keeper that, on the leader, proposes
//!   lease promotion after an election and lease expiry.
//!
//! The protobufs are etcd v3.6.14's (`proto/`, Apache-2.0, annotations trimmed), compiled at
//! build time with protox (no `protoc`), in [`proto`].
//!
//! ## What is done
//! - KV: Range (single key, `[key, range_end)`, prefix and from-key via `range_end`, limit with
//!   `more` and `count`, revision, sort order and target, serializable, keys_only, count_only,
//!   min/max mod and create revision), Put (prev_kv, lease, ignore_value, ignore_lease),
//!   DeleteRange (prev_kv), Txn (compares on value, version, create, mod and lease over keys or
//!   ranges; nested txns; etcd's duplicate-key and `--max-txn-ops` checks; reads inside a txn
//!   see its earlier writes), Compact.
//! - Watch: many watchers per stream, key/range/prefix, start revision in the past (replayed
//!   from history) or now, prev_kv, NOPUT/NODELETE filters, progress notify and progress
//!   requests, cancel, user-chosen watch ids; a watch from a compacted revision is cancelled
//!   with `compact_revision`. Watchers pull from the history after each apply, so events come
//!   in revision order, none lost, and a client that reconnects from its last seen revision
//!   resumes exactly.
//! - Lease: grant (requested or chosen id; etcd's minimum and maximum TTL), revoke (deleting the
//!   attached keys in one revision), keep-alive stream (TTL 0 for an unknown lease),
//!   time-to-live with keys (TTL -1 for an unknown lease), list; expiry and promotion through
//!   the log.
//! - Cluster: MemberList. Maintenance: Status, HashKV (a crc32c of the history, equal across
//!   replicas; not etcd's bolt-page hash), Alarm (list is empty: no space quota yet).
//! - `GET /health` over HTTP/1.1 on the same port as gRPC, answering as etcd does.
//! - Automatic compaction by revision count or by age ([`AutoCompaction`]), proposed by the
//!   leader through the log.
//! - Errors with etcd's gRPC codes and messages; `--max-request-bytes` and `--max-txn-ops`.
//! - Tested: the state machine per operation against etcd's semantics and against a naive
//!   model at every revision (`tests/sm.rs`); the service through `etcd-client` over a socket
//!   (`tests/client.rs`); the state machine replicated by the real `Rsm` on three simulated
//!   servers with a crashed leader and snapshot installs, every replica ending identical and
//!   the lease's keys deleted everywhere (`tests/replicated.rs`); when `etcd` is installed, a
//!   conformance test running the same seeded operations against a real three-member etcd and
//!   comparing every response and watch event (`tests/conformance.rs`); when `etcdctl` is
//!   installed, etcdctl unmodified: put/get (`--prefix`, `--rev`, `--limit`, `--keys-only`,
//!   `-w json`), del, txn, watch from a past revision, lease grant / keep-alive / timetolive /
//!   list / revoke, compaction, member list, endpoint status and health, `lock` (two contending
//!   processes) and `elect` (`tests/etcdctl.rs`). `examples/serve.rs` is a single-member server
//!   to point etcdctl at by hand (`etcdctl check perf --load s` passes against it).
//!
//! ## Choices where etcd and sixfive differ
//! - Lease keep-alives go through the log (etcd renews on the leader only), so that expiry,
//!   decided by log time, is the same on every replica and survives a leader change.
//! - A lease past its expiry can be renewed until its revocation is applied (etcd refuses it
//!   at once): a new leader's lease promotion is a log entry that a client's first keep-alive
//!   after a failover may precede, and refusing that keep-alive would end the lease early.
//! - A chosen lease id is derived from the log index of the grant (etcd draws it on the leader
//!   before proposing); ids are positive and never collide with a live lease.
//! - Read-only txns go through the log (etcd serves them from the read path); results are the
//!   same, the cost is a log entry.
//! - Sorted ranges break ties in key order (etcd's sort leaves ties unspecified).
//! - HashKV hashes our history, not etcd's bolt pages: equal across sixfive replicas, not
//!   comparable with etcd's value.
//!
//! ## On the real cluster
//! `sixfive kv serve --api etcd` (and `sixfive kv cluster --api etcd`) runs [`EtcdSm`] in the
//! server process and serves these services on its client URLs; the runtime's
//! `sixfive_runtime::etcd::NodeReplica` implements [`Replica`]: followers forward writes and
//! linearizable reads to the leader over the peer connection, `applied` is bumped by the node's
//! loop, and `now` is the clock that stamps entries. Real-process tests:
//! `crates/cli/tests/etcd_cluster.rs` (Txn compare-and-set under `kill -9` of the leader,
//! checked for linearizability; watches across leader changes and reconnects; etcdctl against
//! every member). Not yet: membership changes through the Cluster service, the auth service,
//! watch response fragmentation.
#![deny(missing_docs)]

pub mod error;
pub mod mvcc;
pub mod proto;
pub mod replica;
pub mod service;
pub mod sm;

pub use error::EtcdError;
pub use replica::{LocalReplica, MemberChange, Replica, ReplicaError, ReplicaStatus};
pub use service::{AutoCompaction, EtcdService, ServiceConfig};
pub use sm::{Command, Config, EtcdSm, Output, Query, QueryOutput};
