//! # sixfive-storage: Raft storage on real files
//!
//! [`FileStorage`] implements [`sixfive_raft::Storage`] in one directory, through a
//! file-system seam ([`fs::Fs`]): [`fs::OsFs`] in production, [`fs::SimFs`] (feature `sim`) in
//! the simulator, which loses unsynced data page by page and fails calls on purpose.
//!
//! ## Files
//! - `raft.log`: a write-ahead log of frames `[u32 length][u32 checksum][payload]`. The
//!   checksum is CRC32C chained: it covers the previous frame's checksum, this frame's length
//!   and its payload, so a frame from another position or an older generation of the file
//!   never fits. The first frame is a header naming the format. Payloads are a hard state, a
//!   batch of entries (which replaces every entry from its first index on, as the trait
//!   requires), the mark of a snapshot, or a *sync mark*. The file is only appended to; `sync`
//!   makes it durable (`fdatasync`).
//! - `raft.snapshot`: the latest snapshot, `[u32 crc32c][payload]`, written to a temporary
//!   file, synced, renamed into place, and the directory synced.
//!
//! ## Crashes: torn tails against corruption
//! A crash may persist any subset of the pages written since the last sync: a later frame's
//! page may be on disk while an earlier frame's is not, and a grown file may read back as
//! zeros. Opening replays frames until the first one that is incomplete or fails its checksum.
//! Whether that frame is a torn tail (never synced, so never acknowledged: cut it off) or
//! corruption of synced data (refuse to start, naming file and offset) is decided by what was
//! synced: right after every successful `fdatasync`, a sync mark recording its own offset is
//! appended. A sync mark can only exist once everything before it is durable, so a bad frame
//! with a valid sync mark anywhere after it is corruption; a bad frame with none after it was
//! written after the last sync that completed, and is torn. (The one case this cannot tell:
//! a power loss right after a sync, before the mark itself reached the disk, followed by the
//! disk damaging that last synced batch. Opening syncs and marks everything it read, so that
//! window never spans a restart.)
//!
//! ## Durability of names
//! The parent of each directory created on the way to the data directory is synced when it is
//! created; the data directory and its parent are synced at every open (an earlier start may
//! have died between creating a name and syncing it) and the directory after every rename, so
//! a power loss can neither make `raft.log` disappear nor bring back a replaced file.
//!
//! ## I/O errors poison
//! After any I/O error (`EIO`, `ENOSPC`, a short write, a failed `fdatasync`) the storage is
//! poisoned: every later call fails with [`StorageError::Poisoned`]. A failed `fdatasync` is
//! never retried: Linux may have dropped the dirty pages and would report the retry as a
//! success (the PostgreSQL "fsyncgate" lesson). The node must stop; a restart re-reads the
//! files and recovers what is really there.
//!
//! ## Costs
//! Each call costs O(size of its arguments): entries live in a deque indexed by position, the
//! Raft state size is kept as a running total. Once a snapshot has made most of the log dead
//! and the file has grown past the live state by the rewrite slack, the log is rewritten
//! compactly (temporary file, sync, rename, directory sync): amortised O(1) per byte written.
#![deny(missing_docs)]

pub mod fs;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sixfive_raft::{Entry, HardState, Index, RestoredState, Snapshot, SnapshotMeta, Storage, Term};

use fs::{Fs, FsFile, OsFs};

const LOG: &str = "raft.log";
const SNAPSHOT: &str = "raft.snapshot";
/// Largest record accepted when reading (a larger length is a torn or corrupt header).
const MAX_RECORD_BYTES: usize = 1 << 30;
/// The log format this code writes and reads.
const FORMAT: u32 = 2;
/// The chained checksum of the first frame starts from this.
const CHAIN_SEED: u32 = 0x5158_6C6F;
/// Tags a sync mark's own check, so that mark-shaped bytes are unlikely to pass by chance.
const SYNC_MAGIC: u64 = 0x7369_7866_6976_6573;
/// Bytes of bookkeeping counted per entry and for the hard state by `raft_state_bytes`.
const ENTRY_OVERHEAD_BYTES: usize = 24;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The operating system refused. The storage is now poisoned.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An earlier I/O error left the files in an unknown state; nothing more is written.
    #[error("storage unusable after an earlier I/O error ({0}); restart the node to recover from what is on disk")]
    Poisoned(String),
    /// A call that would break the log (entries leaving a hole). Nothing was written.
    #[error("refused: {0}")]
    Invalid(String),
    /// A file's contents are damaged beyond a torn last write.
    #[error("{path} is corrupt at byte {offset}: {reason}; refusing to start (restore this node from a replica)")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
enum Record {
    Header {
        format: u32,
    },
    HardState(HardState),
    Entries(Vec<Entry>),
    Snapshot(SnapshotMeta),
    /// Written right after an `fdatasync` returned: every byte before `at` is durable.
    Synced {
        at: u64,
        check: u32,
    },
}

/// [`Record`] by reference, for writing without copying (same variants, same order, so the
/// same encoding).
#[derive(Clone, Copy, Serialize)]
enum RecordRef<'a> {
    #[allow(dead_code)]
    Header {
        format: u32,
    },
    HardState(&'a HardState),
    Entries(&'a [Entry]),
    Snapshot(&'a SnapshotMeta),
    Synced {
        at: u64,
        check: u32,
    },
}

fn sync_check(at: u64) -> u32 {
    let mut b = SYNC_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&at.to_le_bytes());
    crc32c::crc32c(&b)
}

/// Frames `payload` after a frame whose checksum was `chain`; returns the bytes and this
/// frame's checksum.
fn frame(chain: u32, payload: &[u8]) -> (Vec<u8>, u32) {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(chain, &len), payload);
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    (out, crc)
}

/// The Raft state held, with the invariants the log must keep.
///
/// Invariants: `entries` are consecutive (`entries[k].index == entries[0].index + k`) and
/// start at most one past the snapshot's index; their terms never decrease and are at least
/// the snapshot's term; `entry_bytes` is the sum of their sizes as `raft_state_bytes` counts.
#[derive(Default)]
struct State {
    hard_state: HardState,
    /// The snapshot the log continues from (as of the records replayed so far).
    snap: SnapshotMeta,
    /// The snapshot file's content.
    snapshot: Option<Snapshot>,
    entries: VecDeque<Entry>,
    entry_bytes: usize,
}

fn entry_size(e: &Entry) -> usize {
    e.data.len() + ENTRY_OVERHEAD_BYTES
}

impl State {
    fn last_index(&self) -> Index {
        self.entries.back().map_or(self.snap.index, |e| e.index)
    }

    fn term_at(&self, index: Index) -> Option<Term> {
        let first = self.entries.front()?.index;
        let pos = index.checked_sub(first)?;
        self.entries.get(pos as usize).map(|e| e.term)
    }

    /// Checks that `es` can be appended (no hole, consecutive, terms not decreasing).
    fn check_append(&self, es: &[Entry]) -> Result<(), String> {
        let Some(first) = es.first() else { return Ok(()) };
        let next = self.last_index() + 1;
        if first.index > next {
            return Err(format!("entries start at {} but the log ends at {}", first.index, next - 1));
        }
        let snap = self.snap;
        if first.index <= snap.index {
            return Err(format!("entries start at {}, inside the snapshot (up to {})", first.index, snap.index));
        }
        let mut prev_term = self.term_at(first.index - 1).unwrap_or(snap.term);
        for (k, e) in es.iter().enumerate() {
            if e.index != first.index + k as u64 {
                return Err(format!("entry {} follows entry {}", e.index, first.index + k as u64 - 1));
            }
            if e.term < prev_term {
                return Err(format!("entry {} has term {} after term {prev_term}", e.index, e.term));
            }
            prev_term = e.term;
        }
        Ok(())
    }

    /// Drops entries with index `>= index`.
    fn truncate_from(&mut self, index: Index) {
        let Some(first) = self.entries.front().map(|e| e.index) else { return };
        let keep = index.saturating_sub(first) as usize;
        while self.entries.len() > keep {
            let e = self.entries.pop_back().expect("non-empty");
            self.entry_bytes -= entry_size(&e);
        }
    }

    fn append(&mut self, es: &[Entry]) {
        let Some(first) = es.first() else { return };
        self.truncate_from(first.index);
        for e in es {
            self.entry_bytes += entry_size(e);
            self.entries.push_back(e.clone());
        }
    }

    /// Section 7: the log now continues from snapshot `meta`. Keep the entries after it if
    /// the log holds its last entry; else none. A log that already starts after the snapshot
    /// has nothing covered.
    fn drop_covered(&mut self, meta: SnapshotMeta) {
        if meta.index <= self.snap.index {
            return;
        }
        self.snap = meta;
        if self.entries.front().is_none_or(|e| e.index > meta.index) {
            return;
        }
        if self.term_at(meta.index) == Some(meta.term) {
            while self.entries.front().is_some_and(|e| e.index <= meta.index) {
                let e = self.entries.pop_front().expect("non-empty");
                self.entry_bytes -= entry_size(&e);
            }
        } else {
            self.entries.clear();
            self.entry_bytes = 0;
        }
    }

    fn apply(&mut self, r: Record) -> Result<(), String> {
        match r {
            Record::Header { .. } => return Err("a second header".into()),
            Record::HardState(hs) => {
                if hs.commit > self.last_index() {
                    return Err(format!("commit index {} past the last entry {}", hs.commit, self.last_index()));
                }
                self.hard_state = hs;
            }
            Record::Entries(es) => {
                self.check_append(&es)?;
                self.append(&es);
            }
            Record::Snapshot(meta) => self.drop_covered(meta),
            Record::Synced { .. } => {}
        }
        Ok(())
    }
}

/// Raft state in a directory.
///
/// Invariant: `state` is exactly what replaying the log and snapshot files would give;
/// `synced_bytes <= log_bytes`; nothing is written once `poisoned` is set.
pub struct FileStorage<F: Fs = OsFs> {
    fs: F,
    dir: PathBuf,
    log: F::File,
    log_bytes: u64,
    /// Checksum of the last frame in the log.
    chain: u32,
    /// Bytes of the log made durable by the last successful sync.
    synced_bytes: u64,
    snapshot_file_bytes: u64,
    state: State,
    /// Rewrite the log once it is this much larger than the live state.
    rewrite_slack_bytes: u64,
    poisoned: Option<String>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io { what, path: path.to_path_buf(), source }
}

impl FileStorage<OsFs> {
    /// Opens (or creates) the storage in `dir` on the real file system, recovering from a
    /// crash if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStorage<OsFs>, StorageError> {
        FileStorage::open_with(OsFs, dir)
    }
}

impl<F: Fs> FileStorage<F> {
    /// Opens (or creates) the storage in `dir` on `fs`, recovering from a crash if needed: a
    /// torn tail is cut off, corruption is refused, and what was read is synced before it is
    /// returned (a node must not acknowledge what a power loss could still take away).
    pub fn open_with(fs: F, dir: impl AsRef<Path>) -> Result<FileStorage<F>, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        // Create what is missing of the path, and sync the parent of each directory created,
        // so that a power loss cannot take the new directory (and all in it) away.
        let mut missing = Vec::new();
        for a in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if fs.exists(a).map_err(io_err("inspecting", a))? {
                break;
            }
            missing.push(a);
        }
        if !missing.is_empty() {
            fs.create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            for created in missing.iter().rev() {
                if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs.sync_dir(parent).map_err(io_err("syncing", parent))?;
                }
            }
        }
        let mut state = State::default();
        let snap_path = dir.join(SNAPSHOT);
        let mut snapshot_file_bytes = 0;
        if fs.exists(&snap_path).map_err(io_err("inspecting", &snap_path))? {
            let bytes = fs.read(&snap_path).map_err(io_err("reading", &snap_path))?;
            let corrupt =
                |reason: &str| StorageError::Corrupt { path: snap_path.clone(), offset: 0, reason: reason.into() };
            if bytes.len() < 4 {
                return Err(corrupt("too short"));
            }
            let crc = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
            if crc32c::crc32c(&bytes[4..]) != crc {
                return Err(corrupt("checksum mismatch"));
            }
            let snap: Snapshot = postcard::from_bytes(&bytes[4..]).map_err(|e| corrupt(&e.to_string()))?;
            snapshot_file_bytes = bytes.len() as u64;
            state.snapshot = Some(snap);
        }
        let log_path = dir.join(LOG);
        let mut log = fs.open_append(&log_path).map_err(io_err("opening", &log_path))?;
        // Always, not only when the log is new: an earlier start (or snapshot) may have died
        // between creating or renaming a file and syncing its directory, leaving a name that
        // reads back now but would not survive a power loss.
        fs.sync_dir(&dir).map_err(io_err("syncing", &dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(io_err("syncing", parent))?;
        }
        let bytes = fs.read(&log_path).map_err(io_err("reading", &log_path))?;
        let (valid, chain) = replay(&bytes, &mut state, &log_path)?;
        if valid < bytes.len() as u64 {
            // A torn tail: drop it (it was never synced, so never acknowledged).
            log.set_len(valid).map_err(io_err("truncating", &log_path))?;
        }
        let mut s = FileStorage {
            fs,
            dir,
            log,
            log_bytes: valid,
            chain,
            synced_bytes: 0,
            snapshot_file_bytes,
            state,
            rewrite_slack_bytes: 64 << 20,
            poisoned: None,
        };
        if valid == 0 {
            s.write(&RecordRef::Header { format: FORMAT })?;
        }
        // The snapshot file is renamed into place before its mark is logged; a crash between
        // the two leaves a snapshot the log does not know about yet. The other way round (a
        // mark newer than the file) cannot come from a crash.
        let file_meta = s.state.snapshot.as_ref().map_or(SnapshotMeta { index: 0, term: 0 }, |sn| sn.meta);
        if file_meta.index < s.state.snap.index {
            return Err(StorageError::Corrupt {
                path: snap_path,
                offset: 0,
                reason: format!(
                    "holds the snapshot at index {} but the log marks one at {}",
                    file_meta.index, s.state.snap.index
                ),
            });
        }
        if file_meta.index > s.state.snap.index {
            s.state.drop_covered(file_meta);
            s.write(&RecordRef::Snapshot(&file_meta))?;
        }
        let last = s.state.last_index();
        if s.state.hard_state.commit > last {
            return Err(StorageError::Corrupt {
                path: log_path,
                offset: valid,
                reason: format!("commit index {} past the last entry {last}", s.state.hard_state.commit),
            });
        }
        s.sync()?;
        Ok(s)
    }

    /// Rewrites the log once it exceeds the live state by more than `bytes` (default 64 MiB).
    pub fn with_rewrite_slack(mut self, bytes: u64) -> FileStorage<F> {
        self.rewrite_slack_bytes = bytes;
        self
    }

    /// Size of the log file.
    pub fn log_file_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// Size of the snapshot file (0 without a snapshot).
    pub fn snapshot_file_bytes(&self) -> u64 {
        self.snapshot_file_bytes
    }

    /// The file system this storage writes to.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// Why the storage refuses every call, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Records an I/O failure: from now on every call fails.
    fn poison<T>(&mut self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }

    fn write(&mut self, r: &RecordRef) -> Result<(), StorageError> {
        self.check_usable()?;
        let payload = postcard::to_allocvec(r).expect("records encode");
        let (bytes, crc) = frame(self.chain, &payload);
        let path = self.dir.join(LOG);
        let res = self.log.append(&bytes).map_err(io_err("appending to", &path));
        self.poison(res)?;
        self.log_bytes += bytes.len() as u64;
        self.chain = crc;
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), StorageError> {
        let res = self.fs.sync_dir(&self.dir).map_err(io_err("syncing", &self.dir));
        self.poison(res)
    }

    /// Writes `bytes` to `name` through a temporary file: written, synced, renamed into
    /// place, directory synced.
    fn replace_file(&mut self, name: &str, bytes: &[u8]) -> Result<F::File, StorageError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let res = (|| {
            let mut f = self.fs.create(&tmp).map_err(io_err("creating", &tmp))?;
            f.append(bytes).and_then(|()| f.sync()).map_err(io_err("writing", &tmp))?;
            self.fs.rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
            Ok(f)
        })();
        let f = self.poison(res)?;
        self.sync_dir()?;
        Ok(f)
    }

    /// Replaces the log by one record per live item, atomically.
    fn rewrite(&mut self) -> Result<(), StorageError> {
        let mut out = Vec::new();
        let mut chain = CHAIN_SEED;
        let entries = self.state.entries.make_contiguous();
        let records = [
            RecordRef::Header { format: FORMAT },
            RecordRef::Snapshot(&self.state.snap),
            RecordRef::Entries(entries),
            RecordRef::HardState(&self.state.hard_state),
        ];
        for r in &records {
            let (bytes, crc) = frame(chain, &postcard::to_allocvec(r).expect("records encode"));
            out.extend(bytes);
            chain = crc;
        }
        let log = self.replace_file(LOG, &out)?;
        self.log = log;
        self.log_bytes = out.len() as u64;
        self.chain = chain;
        self.synced_bytes = self.log_bytes;
        self.write(&RecordRef::Synced { at: self.log_bytes, check: sync_check(self.log_bytes) })
    }
}

/// Replays `bytes` into `state`; returns how many bytes are valid and the checksum of the
/// last valid frame.
fn replay(bytes: &[u8], state: &mut State, path: &Path) -> Result<(u64, u32), StorageError> {
    let mut off = 0usize;
    let mut chain = CHAIN_SEED;
    while off < bytes.len() {
        let corrupt = |reason: String| StorageError::Corrupt { path: path.to_path_buf(), offset: off as u64, reason };
        let Some((r, crc, len)) = parse(bytes, off, chain) else {
            // Torn, or corrupt: a sync mark after it proves it was durable, so damaged.
            if let Some(at) = (off + 1..bytes.len()).find(|&p| is_sync_mark(bytes, p)) {
                return Err(corrupt(format!(
                    "damaged record (bad length or checksum) before data synced up to byte {at}"
                )));
            }
            break;
        };
        match r {
            Record::Header { format } if off == 0 => {
                if format != FORMAT {
                    return Err(corrupt(format!("log format {format}; this build reads format {FORMAT}")));
                }
            }
            _ if off == 0 => return Err(corrupt("no header: not a sixfive Raft log of this format".into())),
            Record::Synced { at, check } => {
                if at != off as u64 || check != sync_check(at) {
                    return Err(corrupt(format!("sync mark for byte {at} found at byte {off}")));
                }
            }
            r => state.apply(r).map_err(corrupt)?,
        }
        off += len;
        chain = crc;
    }
    Ok((off as u64, chain))
}

/// The frame at `off` if it is whole, its chained checksum matches and it decodes: the
/// record, its checksum and its length in bytes.
fn parse(bytes: &[u8], off: usize, chain: u32) -> Option<(Record, u32, usize)> {
    let rest = &bytes[off..];
    if rest.len() < 8 {
        return None;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    // No record is empty: zeros (a zero-filled tail) never pass as one.
    if len == 0 || len > MAX_RECORD_BYTES || rest.len() - 8 < len {
        return None;
    }
    let payload = &rest[8..8 + len];
    if crc32c::crc32c_append(crc32c::crc32c_append(chain, &rest[..4]), payload) != crc {
        return None;
    }
    let r: Record = postcard::from_bytes(payload).ok()?;
    Some((r, crc, 8 + len))
}

/// Whether a valid sync mark for offset `p` sits at `p` (its checksum chain is unknown here,
/// so the mark's own check stands in for it).
fn is_sync_mark(bytes: &[u8], p: usize) -> bool {
    let rest = &bytes[p..];
    if rest.len() < 9 {
        return false;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > 32 || rest.len() - 8 < len {
        return false;
    }
    matches!(postcard::from_bytes(&rest[8..8 + len]), Ok(Record::Synced { at, check })
        if at == p as u64 && check == sync_check(at))
}

impl<F: Fs> Storage for FileStorage<F> {
    type Error = StorageError;

    fn initial_state(&self) -> Result<RestoredState, StorageError> {
        self.check_usable()?;
        Ok(RestoredState {
            hard_state: self.state.hard_state,
            snapshot: self.state.snapshot.clone(),
            entries: self.state.entries.iter().cloned().collect(),
        })
    }

    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.check_usable()?;
        if hs.commit > self.state.last_index() {
            return Err(StorageError::Invalid(format!(
                "commit index {} past the last entry {}",
                hs.commit,
                self.state.last_index()
            )));
        }
        self.write(&RecordRef::HardState(hs))?;
        self.state.hard_state = *hs;
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check_usable()?;
        if entries.is_empty() {
            return Ok(());
        }
        self.state.check_append(entries).map_err(StorageError::Invalid)?;
        self.write(&RecordRef::Entries(entries))?;
        self.state.append(entries);
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        self.check_usable()?;
        // The snapshot file is durable as soon as it is renamed into place; writes made before
        // it must not be lost while it survives (writes reach the disk in order). Free when
        // nothing is pending, as in `persist_ready`, where the snapshot comes first.
        self.sync()?;
        let payload = postcard::to_allocvec(snapshot).expect("snapshots encode");
        let mut bytes = crc32c::crc32c(&payload).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        self.replace_file(SNAPSHOT, &bytes)?;
        self.snapshot_file_bytes = bytes.len() as u64;
        self.write(&RecordRef::Snapshot(&snapshot.meta))?;
        self.state.drop_covered(snapshot.meta);
        self.state.snapshot = Some(snapshot.clone());
        if self.log_bytes > self.raft_state_bytes() as u64 + self.rewrite_slack_bytes {
            self.rewrite()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        if self.synced_bytes == self.log_bytes {
            return Ok(());
        }
        let path = self.dir.join(LOG);
        let res = self.log.sync().map_err(io_err("syncing", &path));
        self.poison(res)?;
        self.synced_bytes = self.log_bytes;
        // Everything before this mark is now durable; the mark says so to a later reader.
        let at = self.log_bytes;
        self.write(&RecordRef::Synced { at, check: sync_check(at) })?;
        // The mark needs no sync of its own: whenever it reaches the disk, it is true.
        self.synced_bytes = self.log_bytes;
        Ok(())
    }

    /// The live Raft state (hard state and retained entries) as the log would encode it;
    /// dead records awaiting a rewrite do not count.
    fn raft_state_bytes(&self) -> usize {
        self.state.entry_bytes + ENTRY_OVERHEAD_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sixfive_raft::EntryKind;

    fn log_of(records: &[RecordRef]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chain = CHAIN_SEED;
        for r in records {
            let (b, c) = frame(chain, &postcard::to_allocvec(r).unwrap());
            out.extend(b);
            chain = c;
        }
        out
    }

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, kind: EntryKind::Normal, data: vec![1] }
    }

    fn refused(records: &[RecordRef]) -> String {
        let bytes = log_of(records);
        match replay(&bytes, &mut State::default(), Path::new("raft.log")) {
            Err(StorageError::Corrupt { reason, .. }) => reason,
            r => panic!("accepted: {:?}", r.map(|(n, _)| n)),
        }
    }

    #[test]
    fn open_validates_what_it_reads() {
        let h = RecordRef::Header { format: FORMAT };
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 1), e(3, 1)])]).contains("entry 3 follows entry 1"));
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 2), e(2, 1)])]).contains("term 1 after term 2"));
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 2)]), RecordRef::Entries(&[e(2, 1)])]).contains("term 1 after"));
        assert!(refused(&[h, RecordRef::Entries(&[e(2, 1)])]).contains("log ends at 0"));
        let hs = HardState { term: 1, vote: None, commit: 2 };
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 1)]), RecordRef::HardState(&hs)]).contains("commit index 2"));
        assert!(refused(&[RecordRef::Entries(&[e(1, 1)])]).contains("no header"));
        assert!(refused(&[RecordRef::Header { format: 9 }]).contains("format 9"));
        // And a good one passes.
        let ok = log_of(&[h, RecordRef::Entries(&[e(1, 1), e(2, 2)]), RecordRef::HardState(&hs)]);
        let mut st = State::default();
        assert_eq!(replay(&ok, &mut st, Path::new("raft.log")).unwrap().0, ok.len() as u64);
        assert_eq!((st.last_index(), st.hard_state.commit, st.entry_bytes), (2, 2, 2 * (1 + ENTRY_OVERHEAD_BYTES)));
    }
}
