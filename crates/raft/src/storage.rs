//! What a driver must keep on stable storage, and in which order.
//!
//! The core never calls storage itself (it has no IO). The driver takes each [`crate::Ready`],
//! writes it through a [`Storage`] with [`persist_ready`], and at start-up rebuilds the node
//! from [`Storage::initial_state`] with [`crate::RawNode::restart`].

use std::sync::Arc;

use crate::types::{Entry, HardState, Snapshot};

/// Writes a snapshot's file and makes it durable, on a thread other than the node's, without
/// putting it in effect: see [`Storage::snapshot_writer`].
pub type SnapshotWriter<E> = Box<dyn FnOnce(&Snapshot) -> Result<(), E> + Send>;

/// Makes durable, on a thread other than the node's, every write made before
/// [`Storage::start_sync`] returned it; its result goes to [`Storage::finish_sync`].
pub type SyncJob<E> = Box<dyn FnOnce() -> Result<(), E> + Send>;

/// Everything a node persisted, as read back after a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoredState {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// Latest snapshot, if any. The application restores its state machine from it.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, in index order without holes.
    pub entries: Vec<Entry>,
}

/// Stable storage for one node's Raft state.
///
/// Each write call must be atomic on its own (a crash keeps it whole or drops it whole); writes
/// reach the disk in the order they were made; `sync` returns once all earlier writes are durable.
pub trait Storage {
    /// The storage's error.
    type Error: std::fmt::Debug;
    /// What was persisted (an empty state for a new node).
    fn initial_state(&self) -> Result<RestoredState, Self::Error>;
    /// Replaces the hard state.
    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), Self::Error>;
    /// Drops stored entries with index `>= entries[0].index`, then appends `entries`.
    fn append(&mut self, entries: &[Entry]) -> Result<(), Self::Error>;
    /// Stores a snapshot and drops the entries it covers. If the stored log does not hold the
    /// snapshot's last entry with the same term, every entry is dropped (section 7).
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error>;
    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), Self::Error>;
    /// Bytes of Raft state held (hard state and entries, not the snapshot): what an application
    /// compares with its limit to decide when to take a snapshot.
    fn raft_state_bytes(&self) -> usize;

    /// Pipelined persistence, step 1: starts a sync of every write made so far without
    /// waiting for it: the job returned does the waiting, on another thread, while the node
    /// goes on writing (later writes may or may not be made durable by it). At most one
    /// started sync at a time. `None` (the default): this storage syncs only in
    /// [`Storage::sync`], which the caller then uses.
    fn start_sync(&mut self) -> Result<Option<SyncJob<Self::Error>>, Self::Error> {
        Ok(None)
    }

    /// Pipelined persistence, step 2: the outcome of the job from [`Storage::start_sync`]. An
    /// error is returned (and, as for [`Storage::sync`], the storage may refuse every later
    /// call: a failed sync may have dropped the data it was to write).
    fn finish_sync(&mut self, result: Result<(), Self::Error>) -> Result<(), Self::Error> {
        result
    }

    /// Background snapshots, step 1: a function that writes a snapshot the application took
    /// into a file of its own and syncs it, meant to run on another thread while the node goes
    /// on (the snapshot of a large state takes seconds to write). Nothing is in effect until
    /// [`Storage::install_written_snapshot`]; a crash before leaves the storage as it was. At
    /// most one written snapshot may wait to be installed. `None` (the default): this storage
    /// writes snapshots only in [`Storage::save_snapshot`].
    fn snapshot_writer(&self) -> Option<SnapshotWriter<Self::Error>> {
        None
    }

    /// Background snapshots, step 2: puts in effect `snapshot`, which the function from
    /// [`Storage::snapshot_writer`] wrote, as [`Storage::save_snapshot`] followed by
    /// [`Storage::sync`] would (every earlier write is made durable first), without writing it
    /// again. The default, for storages without a writer, is exactly that.
    fn install_written_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Result<(), Self::Error> {
        self.save_snapshot(&snapshot)?;
        self.sync()
    }
}

/// Writes a `Ready`'s persistent parts in the order that keeps a crash at any point recoverable:
/// snapshot, then entries, then hard state (so a durable commit index never points past durable
/// entries), then `sync` if [`crate::Ready::must_sync`] (a change of the commit index alone is
/// written but not synced: one committed write costs one sync per node). Only after this
/// returns may the `Ready`'s `persisted_messages` be sent; its `messages` may go out before
/// (see [`crate::Ready`]).
pub fn persist_ready<S: Storage>(storage: &mut S, ready: &crate::Ready) -> Result<(), S::Error> {
    write_ready(storage, ready)?;
    if ready.must_sync() {
        storage.sync()?;
    }
    Ok(())
}

/// [`persist_ready`] without the sync: for a driver that syncs later (pipelined persistence,
/// [`Storage::start_sync`]), and writes the next `Ready` meanwhile.
pub fn write_ready<S: Storage>(storage: &mut S, ready: &crate::Ready) -> Result<(), S::Error> {
    if let Some(s) = &ready.snapshot {
        storage.save_snapshot(s)?;
    }
    if !ready.entries.is_empty() {
        storage.append(&ready.entries)?;
    }
    if let Some(hs) = &ready.hard_state {
        storage.save_hard_state(hs)?;
    }
    Ok(())
}
