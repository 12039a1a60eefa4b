//! What an operator watches, in Prometheus' text format (through `prometheus-client`), and the
//! storage wrapper that measures every sync.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sixfive_raft::{Entry, HardState, Snapshot, Storage};

type Labels = Vec<(String, String)>;

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    /// Client requests answered, by result (`ok` or `failed`).
    pub requests: Family<Labels, Counter>,
    /// Commit index.
    pub commit: Gauge,
    /// Applied index.
    pub applied: Gauge,
    /// Commit index minus applied index.
    pub apply_lag: Gauge,
    /// Current term.
    pub term: Gauge,
    /// 1 while this member leads.
    pub is_leader: Gauge,
    /// Times the known leader changed.
    pub leader_changes: Counter,
    /// Snapshots taken or installed (the snapshot index moved).
    pub snapshots: Counter,
    /// Index of the latest snapshot.
    pub snapshot_index: Gauge,
    /// Syncs of the write-ahead log.
    pub fsyncs: Counter,
    /// Seconds per sync.
    pub fsync_seconds: Histogram,
    /// Log entries written per sync (the group-commit batch).
    pub sync_batch_entries: Histogram,
    /// Log entries written.
    pub entries_written: Counter,
    /// Bytes sent to each peer.
    pub peer_sent_bytes: Family<Labels, Counter>,
    /// Bytes received from each peer.
    pub peer_received_bytes: Family<Labels, Counter>,
    /// Messages dropped because a peer's send queue was full.
    pub peer_dropped: Family<Labels, Counter>,
    /// Connections closed for malformed or oversized frames or a refused handshake.
    pub bad_connections: Family<Labels, Counter>,
    /// `requests` with `result="ok"` and `"failed"`, looked up once (counted for every reply).
    requests_by_result: [Counter; 2],
    last_leader: AtomicU64,
    last_snapshot: AtomicU64,
    extra: Mutex<Vec<(String, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn label(k: &str, v: impl ToString) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sixfive");
        let m = Metrics {
            requests: Family::default(),
            commit: Gauge::default(),
            applied: Gauge::default(),
            apply_lag: Gauge::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            snapshots: Counter::default(),
            snapshot_index: Gauge::default(),
            fsyncs: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            sync_batch_entries: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            entries_written: Counter::default(),
            peer_sent_bytes: Family::default(),
            peer_received_bytes: Family::default(),
            peer_dropped: Family::default(),
            bad_connections: Family::default(),
            requests_by_result: Default::default(),
            last_leader: AtomicU64::new(0),
            last_snapshot: AtomicU64::new(0),
            extra: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        registry.register("requests", "Client requests answered, by result", m.requests.clone());
        registry.register("commit_index", "Raft commit index", m.commit.clone());
        registry.register("applied_index", "Index applied to the state machine", m.applied.clone());
        registry.register("apply_lag", "Committed entries not yet applied", m.apply_lag.clone());
        registry.register("term", "Current Raft term", m.term.clone());
        registry.register("is_leader", "1 while this member leads", m.is_leader.clone());
        registry.register("leader_changes", "Times the known leader changed", m.leader_changes.clone());
        registry.register("snapshots", "Snapshots taken or installed", m.snapshots.clone());
        registry.register("snapshot_index", "Index of the latest snapshot", m.snapshot_index.clone());
        registry.register("fsyncs", "Syncs of the write-ahead log", m.fsyncs.clone());
        registry.register("fsync_seconds", "Duration of one sync", m.fsync_seconds.clone());
        registry.register("sync_batch_entries", "Log entries made durable by one sync", m.sync_batch_entries.clone());
        registry.register("entries_written", "Log entries written", m.entries_written.clone());
        registry.register("peer_sent_bytes", "Bytes sent to each peer", m.peer_sent_bytes.clone());
        registry.register("peer_received_bytes", "Bytes received from each peer", m.peer_received_bytes.clone());
        registry.register("peer_dropped_messages", "Messages dropped on a full peer queue", m.peer_dropped.clone());
        registry.register("bad_connections", "Connections closed for bad input, by port", m.bad_connections.clone());
        // Both results are listed from the start (at 0), as Prometheus advises.
        let by_result = ["ok", "failed"].map(|r| m.requests.get_or_create(&label("result", r)).clone());
        Metrics { registry, requests_by_result: by_result, ..m }
    }

    /// Counts bytes sent to `peer`.
    pub fn sent(&self, peer: &str, bytes: usize) {
        self.peer_sent_bytes.get_or_create(&label("peer", peer)).inc_by(bytes as u64);
    }

    /// Counts bytes received from `peer`.
    pub fn received(&self, peer: &str, bytes: usize) {
        self.peer_received_bytes.get_or_create(&label("peer", peer)).inc_by(bytes as u64);
    }

    /// Counts a message dropped for `peer`.
    pub fn dropped(&self, peer: &str) {
        self.peer_dropped.get_or_create(&label("peer", peer)).inc();
    }

    /// Counts a connection closed on bad input on `port` (`peer` or `client`).
    pub fn bad_connection(&self, port: &str) {
        self.bad_connections.get_or_create(&label("port", port)).inc();
    }

    /// Counts a request answered.
    pub fn request(&self, ok: bool) {
        self.requests_by_result[usize::from(!ok)].inc();
    }

    /// Records the node's state after a batch.
    pub fn observe(&self, st: &sixfive_raft::Status) {
        self.commit.set(st.commit as i64);
        self.applied.set(st.applied as i64);
        self.apply_lag.set(st.commit.saturating_sub(st.applied) as i64);
        self.term.set(st.term as i64);
        self.is_leader.set((st.role == sixfive_raft::Role::Leader) as i64);
        let leader = st.leader.unwrap_or(0);
        if leader != 0 && self.last_leader.swap(leader, Ordering::Relaxed) != leader {
            self.leader_changes.inc();
        }
        if self.last_snapshot.swap(st.snapshot_index, Ordering::Relaxed) < st.snapshot_index {
            self.snapshots.inc();
        }
        self.snapshot_index.set(st.snapshot_index as i64);
    }

    /// Sets a gauge that is computed on demand (file sizes), shown with the others.
    pub fn set_extra(&self, name: &str, value: u64) {
        let mut e = self.extra.lock().expect("metrics");
        match e.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => e.push((name.to_string(), value)),
        }
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
        let mut out = body;
        for (name, v) in self.extra.lock().expect("metrics").iter() {
            out.push_str(&format!("# TYPE sixfive_{name} gauge\nsixfive_{name} {v}\n"));
        }
        out.push_str("# EOF\n");
        out
    }
}

/// A [`Storage`] that measures its syncs into [`Metrics`], and decides from them where a
/// leader's syncs run ([`Storage::start_sync`]).
///
/// Why a threshold: measured with `sixfive bench kv` (docs/benchmarks.md), a leader that syncs
/// on a thread of its own while its loop goes on writes 18-50% more when a sync takes 0.5-1.8
/// ms, but 5% less on a disk whose syncs take 0.27 ms: there the trip to the sync thread and
/// back costs more than the loop waits.
pub struct MeteredStorage<S> {
    inner: S,
    metrics: std::sync::Arc<Metrics>,
    entries_since_sync: u64,
    /// Recent syncs' duration in microseconds (see [`SyncAverage`]), updated by the sync
    /// thread too.
    sync_micros: std::sync::Arc<SyncAverage>,
    /// Sync elsewhere once `sync_micros` reaches this.
    elsewhere_above_micros: u64,
    /// Whether the last sync started was elsewhere (to log the changes).
    elsewhere: bool,
    /// Added to every sync (`--sync-delay-us`).
    delay: std::time::Duration,
    /// Run before a sync on the caller's thread (the node's loop sends what it gathered).
    before_sync: Option<Box<dyn Fn() + Send>>,
}

/// Runs `sync` (after `delay`, `--sync-delay-us`), and records how long it took, on the loop
/// or on the sync thread alike.
fn timed_sync<E>(
    delay: std::time::Duration,
    avg: &SyncAverage,
    metrics: &Metrics,
    sync: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    let started = Instant::now();
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let r = sync();
    avg.record(started.elapsed());
    metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
    metrics.fsyncs.inc();
    r
}

/// A slow moving average of sync durations (weight 1/256, each sample capped at twice the
/// threshold): the disk's steady speed, which a burst of slow syncs (a snapshot's install
/// renames and syncs files; the journal commit makes the syncs around it wait) does not move.
pub struct SyncAverage {
    micros: std::sync::atomic::AtomicU64,
    cap: u64,
}

impl SyncAverage {
    fn record(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering;
        // Kept times 256 for precision.
        let sample = (took.as_micros() as u64).min(self.cap) << 8;
        let _ =
            self.micros.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| Some(old - old / 256 + sample / 256));
    }

    fn get(&self) -> u64 {
        self.micros.load(std::sync::atomic::Ordering::Relaxed) >> 8
    }
}

impl<S> MeteredStorage<S> {
    /// Wraps `inner`; a leader syncs elsewhere once syncs take `elsewhere_above_micros` on
    /// average (0: always).
    pub fn new(inner: S, metrics: std::sync::Arc<Metrics>, elsewhere_above_micros: u64) -> MeteredStorage<S> {
        MeteredStorage {
            inner,
            metrics,
            entries_since_sync: 0,
            sync_micros: std::sync::Arc::new(SyncAverage {
                micros: Default::default(),
                cap: elsewhere_above_micros.saturating_mul(2),
            }),
            elsewhere_above_micros,
            elsewhere: false,
            delay: std::time::Duration::ZERO,
            before_sync: None,
        }
    }

    /// Every sync takes `delay` longer, as on a slower disk (the latency of a network volume,
    /// say): to measure how the server behaves there. The sleep is where the disk's wait would
    /// be, on whichever thread syncs.
    pub fn with_sync_delay(mut self, delay: std::time::Duration) -> MeteredStorage<S> {
        self.delay = delay;
        self
    }

    /// Runs `f` before every sync made on the caller's thread: the node's loop blocks there,
    /// so what it gathered to send goes out first.
    pub fn with_before_sync(mut self, f: Box<dyn Fn() + Send>) -> MeteredStorage<S> {
        self.before_sync = Some(f);
        self
    }

    /// The entries written since the last sync make one group-commit batch.
    fn count_batch(&mut self) {
        if self.entries_since_sync > 0 {
            self.metrics.sync_batch_entries.observe(self.entries_since_sync as f64);
            self.entries_since_sync = 0;
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Storage> Storage for MeteredStorage<S>
where
    S::Error: 'static,
{
    type Error = S::Error;
    fn initial_state(&self) -> Result<sixfive_raft::RestoredState, S::Error> {
        self.inner.initial_state()
    }
    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), S::Error> {
        self.inner.save_hard_state(hs)
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), S::Error> {
        self.entries_since_sync += entries.len() as u64;
        self.metrics.entries_written.inc_by(entries.len() as u64);
        self.inner.append(entries)
    }
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), S::Error> {
        self.inner.save_snapshot(snapshot)
    }
    fn sync(&mut self) -> Result<(), S::Error> {
        if let Some(f) = &self.before_sync {
            f();
        }
        let r = timed_sync(self.delay, &self.sync_micros, &self.metrics, || self.inner.sync());
        self.count_batch();
        r
    }
    fn start_sync(&mut self) -> Result<Option<sixfive_raft::SyncJob<S::Error>>, S::Error> {
        // Back on the loop only below three quarters of the threshold: an average that hovers
        // around it (measured: `etcdctl check perf` here) would otherwise flip it every few
        // syncs.
        let avg = self.sync_micros.get();
        let elsewhere = if self.elsewhere {
            avg >= self.elsewhere_above_micros / 4 * 3
        } else {
            avg >= self.elsewhere_above_micros
        };
        if elsewhere != self.elsewhere {
            self.elsewhere = elsewhere;
            let how = if elsewhere { "on a thread of its own" } else { "on its loop" };
            tracing::info!(
                "syncs take {avg} us on average (threshold {} us): the leader now syncs {how}",
                self.elsewhere_above_micros
            );
        }
        if !elsewhere {
            return Ok(None);
        }
        let Some(job) = self.inner.start_sync()? else { return Ok(None) };
        self.count_batch();
        let (metrics, avg, delay) = (self.metrics.clone(), self.sync_micros.clone(), self.delay);
        Ok(Some(Box::new(move || timed_sync(delay, &avg, &metrics, job))))
    }
    fn finish_sync(&mut self, result: Result<(), S::Error>) -> Result<(), S::Error> {
        self.inner.finish_sync(result)
    }
    fn raft_state_bytes(&self) -> usize {
        self.inner.raft_state_bytes()
    }
    fn snapshot_writer(&self) -> Option<sixfive_raft::SnapshotWriter<S::Error>> {
        self.inner.snapshot_writer()
    }
    fn install_written_snapshot(&mut self, snapshot: std::sync::Arc<Snapshot>) -> Result<(), S::Error> {
        // Its final sync is the storage's; counted with the others.
        let started = Instant::now();
        let r = self.inner.install_written_snapshot(snapshot);
        self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.fsyncs.inc();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_every_family() {
        let m = Metrics::new();
        m.request(true);
        m.request(true);
        m.request(false);
        m.sent("n2", 100);
        m.fsync_seconds.observe(0.001);
        m.set_extra("log_bytes", 42);
        let text = m.render();
        for name in [
            "sixfive_requests_total{result=\"ok\"} 2",
            "sixfive_requests_total{result=\"failed\"} 1",
            "sixfive_peer_sent_bytes_total{peer=\"n2\"} 100",
            "sixfive_fsync_seconds_count 1",
            "sixfive_log_bytes 42",
            "sixfive_leader_changes_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn what_the_loop_gathered_goes_out_before_it_blocks_in_a_sync() {
        let dir = std::env::temp_dir().join(format!("sixfive-before-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let metrics = std::sync::Arc::new(Metrics::new());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, log) = (metrics.clone(), seen.clone());
        let mut s = MeteredStorage::new(sixfive_storage::FileStorage::open(&dir).unwrap(), metrics.clone(), 400)
            .with_before_sync(Box::new(move || log.lock().unwrap().push(m.fsyncs.get())));
        s.sync().unwrap();
        s.sync().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![0, 1], "the hook runs before each sync, once");
        assert_eq!(metrics.fsyncs.get(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
