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
//!   makes it durable (`fdatasync`). On [`fs::OsFs`] it is appended to over zeros written
//!   ahead of its end ([`fs::OsFile`]), so that a sync flushes the data, not the file's growth;
//!   past the last record a reader finds zeros, which replay takes for a torn tail, and opening
//!   cuts them off.
//! - `raft.snapshot`: the latest snapshot, `[u32 crc32c][payload]`, written to a temporary
//!   file, synced, renamed into place, and the directory synced.
//! - `raft.snapshot.next`: a snapshot the application took, written and synced on another
//!   thread ([`Storage::snapshot_writer`], with [`fs::OsFs`]) while the node goes on; it means
//!   nothing until [`Storage::install_written_snapshot`] renames it into place as above (a
//!   leftover from a crash before that is ignored, and overwritten by the next one).
//!
//! ## Crashes: torn tails against corruption
//! A crash may persist any subset of the pages written since the last sync: a later frame's
//! page may be on disk while an earlier frame's is not, and a grown file may read back as
//! zeros. Opening replays frames until the first one that is incomplete or fails its checksum.
//! Whether that frame is a torn tail (never synced, so never acknowledged: cut it off) or
//! corruption of synced data (refuse to start, naming file and offset) is decided by what was
//! synced: after every successful `fdatasync`, a sync mark is appended recording the offset
//! it made durable (its own offset, or an earlier one when the sync ran on another thread
//! while the node went on writing: [`Storage::start_sync`]). A sync mark can only exist once
//! everything before its offset is durable, so a bad frame with a valid sync mark after it
//! vouching for the frame's bytes is corruption; a bad frame with none was written after the
//! last sync that completed, and is torn. (The one case this cannot tell:
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
//! compactly: amortised O(1) per byte written.
//!
//! ## The rewrite, off the node's thread
//! The live state is captured (the retained entries are reference-counted, so this is cheap)
//! and written as a new log, `raft.log.tmp`, and synced, on a thread of its own (with
//! [`fs::OsFs`]; the simulator's file system writes it at once and puts it in place later, so
//! that the same steps run under fault injection). Meanwhile `raft.log` stays the log: it is
//! appended to and synced as before, and a crash at any point before the rename finds it
//! whole (a leftover `raft.log.tmp` is never read, and the next open removes it). When the
//! new file is ready, at the next sync on the node's thread, whatever changed since the
//! capture is appended to it (the snapshot mark, the entries from the lowest index changed
//! since, the hard state), it is synced, renamed over `raft.log`, and the directory synced: the
//! new file then holds every record the old one had made durable. The old file is released
//! to [`fs::Fs::release`]. Until the rename, giving up loses nothing, so a rewrite is dropped
//! (and the next snapshot starts another) when writing the new file failed, when it is not
//! the length its writer reported, or when what changed cannot be said by appending (the log
//! was cut back below every entry changed since). Dropping the storage waits for its
//! rewrite's thread, so that no thread writes the directory after it is closed.
#![deny(missing_docs)]

pub mod fs;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sixfive_raft::{
    Entry, HardState, Index, RestoredState, Snapshot, SnapshotMeta, SnapshotWriter, Storage, SyncJob, Term,
};

use fs::{Fs, FsFile, Garbage, OsFs};

const LOG: &str = "raft.log";
/// A rewritten log, until it is renamed over [`LOG`].
const LOG_TMP: &str = "raft.log.tmp";
const SNAPSHOT: &str = "raft.snapshot";
/// A snapshot written off the node's thread, waiting to be installed.
const SNAPSHOT_NEXT: &str = "raft.snapshot.next";
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
    /// First in every log file. `nonce` is random per file: sync marks carry it, so bytes
    /// from another file, or planted in a payload by a client, never pass for one.
    Header {
        format: u32,
        nonce: u64,
    },
    HardState(HardState),
    Entries(Vec<Entry>),
    Snapshot(SnapshotMeta),
    /// Written after an `fdatasync` returned: every byte before `at` (at most this record's
    /// offset) is durable.
    Synced {
        at: u64,
        nonce: u64,
        check: u32,
    },
}

/// [`Record`] by reference, for writing without copying (same variants, same order, so the
/// same encoding).
#[derive(Clone, Copy, Serialize)]
enum RecordRef<'a> {
    Header { format: u32, nonce: u64 },
    HardState(&'a HardState),
    Entries(&'a [Entry]),
    Snapshot(&'a SnapshotMeta),
    Synced { at: u64, nonce: u64, check: u32 },
}

/// Most bytes of entries framed into one record by a rewrite (far below `MAX_RECORD_BYTES`).
const REWRITE_RECORD_BYTES: usize = 16 << 20;

fn sync_check(nonce: u64, at: u64) -> u32 {
    let mut b = SYNC_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&nonce.to_le_bytes());
    b.extend_from_slice(&at.to_le_bytes());
    crc32c::crc32c(&b)
}

/// Encodes and frames `r` after a frame whose checksum was `chain`; returns the bytes and this
/// frame's checksum. Encoded in place, into one allocation of about the right size.
fn frame(chain: u32, r: &RecordRef) -> (Vec<u8>, u32) {
    let hint = match r {
        RecordRef::Entries(es) => es.iter().map(Entry::size_bytes).sum::<usize>(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(64 + hint);
    out.extend_from_slice(&[0; 8]);
    let mut out = postcard::to_extend(r, out).expect("records encode");
    let len = ((out.len() - 8) as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(chain, &len), &out[8..]);
    out[..4].copy_from_slice(&len);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    (out, crc)
}

/// Frames records one after the other into one buffer.
struct Framer {
    out: Vec<u8>,
    /// Checksum of the last frame.
    chain: u32,
}

impl Framer {
    fn push(&mut self, r: &RecordRef) {
        let (bytes, crc) = frame(self.chain, r);
        self.out.extend(bytes);
        self.chain = crc;
    }

    /// Entries, in records of at most [`REWRITE_RECORD_BYTES`] of commands (at least one
    /// entry each).
    fn push_entries(&mut self, entries: &[Entry]) {
        let mut start = 0;
        while start < entries.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < entries.len() && (end == start || bytes + entries[end].data.len() <= REWRITE_RECORD_BYTES) {
                bytes += entries[end].data.len();
                end += 1;
            }
            self.push(&RecordRef::Entries(&entries[start..end]));
            start = end;
        }
    }
}

/// A compact log file holding `snap`, `entries` and `hs`: its bytes and last checksum.
fn compact_log(nonce: u64, snap: &SnapshotMeta, entries: &[Entry], hs: &HardState) -> (Vec<u8>, u32) {
    let bytes = entries.iter().map(entry_size).sum::<usize>();
    let mut f = Framer { out: Vec::with_capacity(bytes + 256), chain: CHAIN_SEED };
    f.push(&RecordRef::Header { format: FORMAT, nonce });
    f.push(&RecordRef::Snapshot(snap));
    f.push_entries(entries);
    f.push(&RecordRef::HardState(hs));
    (f.out, f.chain)
}

/// A rewrite of the log under way (see the crate's docs): what the new file was made from.
struct Rewrite {
    /// The new file's nonce.
    nonce: u64,
    /// The snapshot and hard state it holds.
    snap: SnapshotMeta,
    hard_state: HardState,
    /// The lowest index changed since the capture (by an append, or by a newer snapshot:
    /// one past its index): the entries from there on are appended to the new file.
    touched_from: Option<Index>,
    /// The new file's length and last checksum, once written and synced.
    written: Written,
}

/// See [`Rewrite::written`].
enum Written {
    /// Written at once (a file system without [`Fs::file_writer`]), put in place after
    /// `polls` more polls: as a thread, it may finish at any time.
    Now {
        result: Result<(u64, u32), StorageError>,
        polls: u64,
    },
    Elsewhere(std::sync::mpsc::Receiver<Result<(u64, u32), StorageError>>),
}

impl Rewrite {
    fn touch(&mut self, index: Index) {
        self.touched_from = Some(self.touched_from.map_or(index, |t| t.min(index)));
    }
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
    /// The snapshot file's content (shared with the Raft core when installed from a written
    /// snapshot, so that a large one is held once).
    snapshot: Option<Arc<Snapshot>>,
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
    /// has nothing covered. Returns the entries dropped, for the caller to free.
    fn drop_covered(&mut self, meta: SnapshotMeta) -> VecDeque<Entry> {
        if meta.index <= self.snap.index {
            return VecDeque::new();
        }
        self.snap = meta;
        if self.entries.front().is_none_or(|e| e.index > meta.index) {
            return VecDeque::new();
        }
        if self.term_at(meta.index) == Some(meta.term) {
            let covered = self.entries.partition_point(|e| e.index <= meta.index);
            self.entry_bytes -= self.entries.range(..covered).map(entry_size).sum::<usize>();
            let kept = self.entries.split_off(covered);
            std::mem::replace(&mut self.entries, kept)
        } else {
            self.entry_bytes = 0;
            std::mem::take(&mut self.entries)
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
            Record::Snapshot(meta) => {
                self.drop_covered(meta);
            }
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
    /// The log file's nonce (from its header).
    nonce: u64,
    /// Bytes of the log made durable by the last successful sync.
    synced_bytes: u64,
    /// A sync running elsewhere ([`Storage::start_sync`]): the log file's nonce and length
    /// when it started (a rewrite replaces the file, and with it the nonce).
    sync_started: Option<(u64, u64)>,
    snapshot_file_bytes: u64,
    state: State,
    /// Rewrite the log once it is this much larger than the live state.
    rewrite_slack_bytes: u64,
    /// A rewrite under way.
    rewrite: Option<Rewrite>,
    /// Rewrites put in place since the storage was opened.
    rewrites: u64,
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
        if !fs.exists(&dir).map_err(io_err("inspecting", &dir))? {
            fs.create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        // Every directory on the way, at every open (not only when created here): an operator's
        // `mkdir -p`, or an earlier start that died between creating a name and syncing it,
        // can leave a name that reads back now but would not survive a power loss.
        fs.sync_dir(&dir).map_err(io_err("syncing", &dir))?;
        let mut up = dir.clone();
        loop {
            let parent = match up.parent() {
                Some(q) if q.as_os_str().is_empty() => PathBuf::from("."),
                Some(q) => q.to_path_buf(),
                None => break,
            };
            fs.sync_dir(&parent).map_err(io_err("syncing", &parent))?;
            if parent == Path::new(".") {
                break;
            }
            up = parent;
        }
        let mut state = State::default();
        let snap_path = dir.join(SNAPSHOT);
        let mut snapshot_file_bytes = 0;
        if fs.exists(&snap_path).map_err(io_err("inspecting", &snap_path))? {
            let bytes = fs.read_durable(&snap_path).map_err(io_err("reading", &snap_path))?;
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
            state.snapshot = Some(Arc::new(snap));
        }
        let log_path = dir.join(LOG);
        let mut log = fs.open_append(&log_path).map_err(io_err("opening", &log_path))?;
        log.is_log();
        fs.sync_dir(&dir).map_err(io_err("syncing", &dir))?;
        // What is on the disk, not what a failed writeback left in the page cache.
        let bytes = fs.read_durable(&log_path).map_err(io_err("reading", &log_path))?;
        let (valid, chain, nonce) = replay(&bytes, &mut state, &log_path)?;
        // Check everything before changing anything: a refused directory is left as it was.
        // The snapshot file is renamed into place before its mark is logged; a crash between
        // the two leaves a snapshot the log does not know about yet. The other way round (a
        // mark newer than the file) cannot come from a crash.
        let file_meta = state.snapshot.as_ref().map_or(SnapshotMeta { index: 0, term: 0 }, |sn| sn.meta);
        if file_meta.index < state.snap.index {
            return Err(StorageError::Corrupt {
                path: snap_path,
                offset: 0,
                reason: format!(
                    "holds the snapshot at index {} but the log marks one at {}",
                    file_meta.index, state.snap.index
                ),
            });
        }
        let mark_snapshot = file_meta.index > state.snap.index;
        state.drop_covered(file_meta);
        let last = state.last_index();
        if state.hard_state.commit > last {
            return Err(StorageError::Corrupt {
                path: log_path,
                offset: valid,
                reason: format!("commit index {} past the last entry {last}", state.hard_state.commit),
            });
        }
        if valid < bytes.len() as u64 {
            // A torn tail: drop it (it was never synced, so never acknowledged).
            log.set_len(valid).map_err(io_err("truncating", &log_path))?;
        }
        let nonce = match nonce {
            Some(n) => n,
            None => fs.random_u64(),
        };
        let mut s = FileStorage {
            fs,
            dir,
            log,
            log_bytes: valid,
            chain,
            nonce,
            synced_bytes: 0,
            sync_started: None,
            snapshot_file_bytes,
            state,
            rewrite_slack_bytes: 64 << 20,
            rewrite: None,
            rewrites: 0,
            poisoned: None,
        };
        if valid == 0 {
            s.write(&RecordRef::Header { format: FORMAT, nonce })?;
        }
        // A rewrite that a crash (or a drop) interrupted: never read, never to be used.
        let tmp = s.dir.join(LOG_TMP);
        if s.fs.exists(&tmp).map_err(io_err("inspecting", &tmp))? {
            s.drop_rewritten_file();
        }
        if mark_snapshot {
            s.write(&RecordRef::Snapshot(&file_meta))?;
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

    /// How many times the log was rewritten compactly since the storage was opened.
    pub fn log_rewrites(&self) -> u64 {
        self.rewrites
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
        let (bytes, crc) = frame(self.chain, r);
        if bytes.len() - 8 > MAX_RECORD_BYTES {
            return Err(StorageError::Invalid(format!(
                "a record of {} bytes is over the limit of {MAX_RECORD_BYTES}",
                bytes.len() - 8
            )));
        }
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
    fn replace_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let res = (|| {
            let mut f = self.fs.create(&tmp).map_err(io_err("creating", &tmp))?;
            f.append(bytes).and_then(|()| f.sync()).map_err(io_err("writing", &tmp))?;
            self.fs.rename(&tmp, &path).map_err(io_err("renaming", &tmp))
        })();
        self.poison(res)?;
        self.sync_dir()
    }

    /// Refuses a snapshot that is not newer than the one held, or that contradicts the log
    /// below the commit index.
    fn check_snapshot(&self, meta: SnapshotMeta) -> Result<(), StorageError> {
        self.check_usable()?;
        if meta.index < self.state.snap.index || (meta.index == self.state.snap.index && meta.index > 0) {
            return Err(StorageError::Invalid(format!(
                "a snapshot at index {} is not newer than the one held (index {})",
                meta.index, self.state.snap.index
            )));
        }
        let keeps_log = self.state.term_at(meta.index) == Some(meta.term);
        if !keeps_log && meta.index < self.state.hard_state.commit {
            return Err(StorageError::Invalid(format!(
                "a snapshot at index {} (term {}) disagrees with the log below the commit index {}",
                meta.index, meta.term, self.state.hard_state.commit
            )));
        }
        Ok(())
    }

    /// The snapshot file, opened before a new one replaces it: held open, its blocks are not
    /// freed by the rename (on the node's loop) but when [`Fs::release`] lets go of it.
    /// (If it cannot be opened, the rename frees it: slower, not wrong.)
    fn hold_snapshot_file(&mut self) -> Option<F::File> {
        if self.snapshot_file_bytes == 0 {
            return None;
        }
        self.fs.open(&self.dir.join(SNAPSHOT)).ok()
    }

    /// The snapshot file now holds `snapshot` (and `replaced` is the file it replaced): logs
    /// its mark, drops the entries it covers and rewrites the log if most of it is dead.
    fn snapshot_in_effect(&mut self, snapshot: Arc<Snapshot>, replaced: Option<F::File>) -> Result<(), StorageError> {
        self.write(&RecordRef::Snapshot(&snapshot.meta))?;
        if let Some(rw) = &mut self.rewrite {
            rw.touch(snapshot.meta.index + 1);
        }
        let entries = self.state.drop_covered(snapshot.meta);
        let snapshot = self.state.snapshot.replace(snapshot);
        self.fs.release(Garbage { files: replaced.into_iter().collect(), entries, snapshot });
        if self.rewrite.is_none() && self.log_bytes > self.raft_state_bytes() as u64 + self.rewrite_slack_bytes {
            self.start_rewrite();
        }
        Ok(())
    }

    /// Starts rewriting the log compactly: captures the live state and writes it, synced, to
    /// [`LOG_TMP`], on a thread of its own when the file system can write from one
    /// ([`Fs::file_writer`]), else at once; [`FileStorage::poll_rewrite`] puts it in place.
    fn start_rewrite(&mut self) {
        let nonce = self.fs.random_u64();
        let (snap, hard_state) = (self.state.snap, self.state.hard_state);
        let entries: Vec<Entry> = self.state.entries.iter().cloned().collect();
        let tmp = self.dir.join(LOG_TMP);
        let written = match self.fs.file_writer() {
            Some(write) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let job = move || {
                    let (bytes, chain) = compact_log(nonce, &snap, &entries, &hard_state);
                    let r = write(&tmp, &[&bytes]).map(|()| (bytes.len() as u64, chain));
                    let _ = tx.send(r.map_err(io_err("writing", &tmp)));
                };
                // If no thread can be started, the rewrite is dropped (the receiver finds the
                // sender gone) and the next snapshot tries again.
                let _ = std::thread::Builder::new().name("sixfive-rewrite".into()).spawn(job);
                Written::Elsewhere(rx)
            }
            None => {
                let (bytes, chain) = compact_log(nonce, &snap, &entries, &hard_state);
                let r = (|| {
                    let mut f = self.fs.create(&tmp)?;
                    f.append(&bytes)?;
                    f.sync()
                })();
                let result = r.map(|()| (bytes.len() as u64, chain)).map_err(io_err("writing", &tmp));
                Written::Now { result, polls: self.fs.random_u64() % 4 }
            }
        };
        self.rewrite = Some(Rewrite { nonce, snap, hard_state, touched_from: None, written });
    }

    /// Puts a rewritten log in place if it is ready (or, with `wait`, once it is): appends
    /// what changed since its capture, syncs it, renames it over the log, syncs the directory.
    fn poll_rewrite(&mut self, wait: bool) -> Result<(), StorageError> {
        let Some(rw) = &mut self.rewrite else { return Ok(()) };
        let received = match &mut rw.written {
            Written::Now { polls, .. } if *polls > 0 && !wait => {
                *polls -= 1;
                return Ok(());
            }
            Written::Now { .. } => None,
            Written::Elsewhere(rx) if wait => Some(rx.recv().ok()),
            Written::Elsewhere(rx) => match rx.try_recv() {
                Ok(r) => Some(Some(r)),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(None),
            },
        };
        let rw = self.rewrite.take().expect("checked above");
        // Until the rename, nothing is lost by giving up: the log is whole, and the next
        // snapshot starts another rewrite. So a rewrite that failed (the thread could not be
        // started, or writing the new file failed: its failed sync cannot have dropped any of
        // the log's pages) is dropped, not a reason to stop the node.
        let Some((len, chain)) = (match (rw.written, received) {
            (Written::Now { result, .. }, _) | (_, Some(Some(result))) => result.ok(),
            _ => None,
        }) else {
            self.drop_rewritten_file();
            return Ok(());
        };
        // The entries to append again: from the lowest index changed since the capture.
        let first = self.state.entries.front().map(|e| e.index);
        let again = match (rw.touched_from, first) {
            (None, _) => None,
            (Some(t), Some(first)) if t.max(first) <= self.state.last_index() => Some(t.max(first)),
            // Cut back below everything changed since: not expressible by appending.
            (Some(_), _) => {
                self.drop_rewritten_file();
                return Ok(());
            }
        };
        let mut delta = Framer { out: Vec::new(), chain };
        if self.state.snap != rw.snap {
            delta.push(&RecordRef::Snapshot(&self.state.snap));
        }
        if let (Some(from), Some(first)) = (again, first) {
            let entries = self.state.entries.make_contiguous();
            delta.push_entries(&entries[(from - first) as usize..]);
        }
        if self.state.hard_state != rw.hard_state {
            delta.push(&RecordRef::HardState(&self.state.hard_state));
        }
        let (tmp, path) = (self.dir.join(LOG_TMP), self.dir.join(LOG));
        let prepared = (|| {
            let mut f = self.fs.open(&tmp)?;
            if f.size()? != len {
                return Err(io::Error::other("not the file the rewrite wrote"));
            }
            f.is_log();
            if !delta.out.is_empty() {
                f.append(&delta.out)?;
                f.sync()?;
            }
            Ok(f)
        })();
        let Ok(log) = prepared else {
            self.drop_rewritten_file();
            return Ok(());
        };
        let res = self.fs.rename(&tmp, &path).map_err(io_err("renaming", &tmp));
        self.poison(res)?;
        self.sync_dir()?;
        let old = std::mem::replace(&mut self.log, log);
        self.log_bytes = len + delta.out.len() as u64;
        self.chain = delta.chain;
        self.nonce = rw.nonce;
        self.synced_bytes = self.log_bytes;
        let (at, nonce) = (self.log_bytes, self.nonce);
        self.write(&RecordRef::Synced { at, nonce, check: sync_check(nonce, at) })?;
        // As in `sync`: the mark needs no sync of its own.
        self.synced_bytes = self.log_bytes;
        self.fs.release(Garbage { files: vec![old], entries: VecDeque::new(), snapshot: None });
        self.rewrites += 1;
        #[cfg(debug_assertions)]
        self.check_replays_to_state(&path);
        Ok(())
    }

    /// Lets go of a rewritten log that will not take the log's place: its name is removed and
    /// its blocks freed off the node's thread ([`Fs::release`]). Failures are ignored: the
    /// file is never read, and the next rewrite replaces it.
    fn drop_rewritten_file(&mut self) {
        let tmp = self.dir.join(LOG_TMP);
        if let Ok(f) = self.fs.open(&tmp) {
            let _ = self.fs.remove_file(&tmp);
            self.fs.release(Garbage { files: vec![f], entries: VecDeque::new(), snapshot: None });
        }
    }

    /// Checks that the log file replays to the state held (the invariant every write keeps).
    #[cfg(debug_assertions)]
    fn check_replays_to_state(&self, path: &Path) {
        let bytes = self.fs.read(path).expect("the log reads back");
        let mut st = State::default();
        let (valid, chain, nonce) = replay(&bytes, &mut st, path).expect("the log replays");
        assert_eq!((valid, chain, nonce), (self.log_bytes, self.chain, Some(self.nonce)), "the log's extent");
        assert_eq!(st.hard_state, self.state.hard_state, "the log's hard state");
        assert_eq!(st.snap, self.state.snap, "the log's snapshot");
        assert!(st.entries == self.state.entries, "the log's entries");
    }

    /// Waits for a rewrite of the log under way, if any, and puts it in place (as the next
    /// sync does once it is ready): for tests, and for whoever wants the log compact now.
    pub fn finish_rewrite(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        self.poll_rewrite(true)
    }
}

impl<F: Fs> Drop for FileStorage<F> {
    /// Waits for a rewrite's thread: it writes the directory's `raft.log.tmp`, which a storage
    /// opened on the directory after this one would otherwise share with it.
    fn drop(&mut self) {
        if let Some(Rewrite { written: Written::Elsewhere(rx), .. }) = self.rewrite.take() {
            let _ = rx.recv();
        }
    }
}

/// The snapshot file's content: `[u32 crc32c][payload]`.
fn snapshot_file(snapshot: &Snapshot) -> Vec<u8> {
    [&snapshot_file_head(snapshot)[..], &snapshot.data].concat()
}

/// [`snapshot_file`] up to the snapshot's data (the checksum covers the data too): written
/// before the data, it makes the file without a copy of the data.
fn snapshot_file_head(snapshot: &Snapshot) -> Vec<u8> {
    // The payload is the snapshot in postcard: its meta, then its data as a byte string (a
    // varint length, then the bytes).
    let head = postcard::to_extend(&snapshot.meta, vec![0u8; 4]).expect("metas encode");
    let mut head = postcard::to_extend(&(snapshot.data.len() as u64), head).expect("lengths encode");
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[4..]), &snapshot.data);
    head[..4].copy_from_slice(&crc.to_le_bytes());
    head
}

/// The length of [`snapshot_file`]'s result, without encoding the data.
fn snapshot_file_len(snapshot: &Snapshot) -> u64 {
    let varint = |mut v: u64| {
        let mut n = 1;
        while v >= 0x80 {
            v >>= 7;
            n += 1;
        }
        n
    };
    let meta = varint(snapshot.meta.index) + varint(snapshot.meta.term);
    (4 + meta + varint(snapshot.data.len() as u64) + snapshot.data.len()) as u64
}

/// Replays `bytes` into `state`; returns how many bytes are valid, the checksum of the last
/// valid frame and the file's nonce (`None` when not even the header is there).
fn replay(bytes: &[u8], state: &mut State, path: &Path) -> Result<(u64, u32, Option<u64>), StorageError> {
    let mut off = 0usize;
    let mut chain = CHAIN_SEED;
    let mut nonce = None;
    while off < bytes.len() {
        let corrupt = |reason: String| StorageError::Corrupt { path: path.to_path_buf(), offset: off as u64, reason };
        let Some((r, crc, len)) = parse(bytes, off, chain) else {
            // Torn, or corrupt: a sync mark after it proves it was durable, so damaged.
            if let Some(at) =
                (off + 1..bytes.len()).find_map(|p| is_sync_mark(bytes, p, nonce).filter(|&at| at > off as u64))
            {
                return Err(corrupt(format!(
                    "damaged record (bad length or checksum) before data synced up to byte {at}"
                )));
            }
            break;
        };
        match r {
            Record::Header { format, nonce: n } if off == 0 => {
                if format != FORMAT {
                    return Err(corrupt(format!("log format {format}; this build reads format {FORMAT}")));
                }
                nonce = Some(n);
            }
            _ if off == 0 => return Err(corrupt("no header: not a sixfive Raft log of this format".into())),
            Record::Synced { at, nonce: n, check } => {
                if at > off as u64 || Some(n) != nonce || check != sync_check(n, at) {
                    return Err(corrupt(format!("sync mark for byte {at} found at byte {off}")));
                }
            }
            r => state.apply(r).map_err(corrupt)?,
        }
        off += len;
        chain = crc;
    }
    Ok((off as u64, chain, nonce))
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

/// The offset a valid sync mark at `p` vouches for (at most `p`), if one sits there (its
/// checksum chain is unknown here, so the mark's own check stands in for it). With the file's nonce known, only a mark with
/// that nonce counts; without it (the header itself is damaged), any well-formed mark does,
/// which errs on the side of refusing to start.
fn is_sync_mark(bytes: &[u8], p: usize, nonce: Option<u64>) -> Option<u64> {
    let rest = &bytes[p..];
    if rest.len() < 9 {
        return None;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > 40 || rest.len() - 8 < len {
        return None;
    }
    match postcard::from_bytes(&rest[8..8 + len]) {
        Ok(Record::Synced { at, nonce: n, check })
            if at <= p as u64 && nonce.is_none_or(|k| k == n) && check == sync_check(n, at) =>
        {
            Some(at)
        }
        _ => None,
    }
}

impl<F: Fs> Storage for FileStorage<F> {
    type Error = StorageError;

    fn initial_state(&self) -> Result<RestoredState, StorageError> {
        self.check_usable()?;
        Ok(RestoredState {
            hard_state: self.state.hard_state,
            snapshot: self.state.snapshot.as_deref().cloned(),
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
        if let Some(rw) = &mut self.rewrite {
            rw.touch(entries[0].index);
        }
        self.state.append(entries);
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        self.check_snapshot(snapshot.meta)?;
        // The snapshot file is durable as soon as it is renamed into place; writes made before
        // it must not be lost while it survives (writes reach the disk in order). Free when
        // nothing is pending, as in `persist_ready`, where the snapshot comes first.
        self.sync()?;
        let bytes = snapshot_file(snapshot);
        let replaced = self.hold_snapshot_file();
        self.replace_file(SNAPSHOT, &bytes)?;
        self.snapshot_file_bytes = bytes.len() as u64;
        self.snapshot_in_effect(Arc::new(snapshot.clone()), replaced)
    }

    fn snapshot_writer(&self) -> Option<SnapshotWriter<StorageError>> {
        let write = self.fs.file_writer()?;
        let path = self.dir.join(SNAPSHOT_NEXT);
        Some(Box::new(move |snapshot: &Snapshot| {
            let head = snapshot_file_head(snapshot);
            write(&path, &[&head, &snapshot.data]).map_err(io_err("writing", &path))
        }))
    }

    fn install_written_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Result<(), StorageError> {
        if self.fs.file_writer().is_none() {
            // Nothing was written elsewhere: save it here.
            self.save_snapshot(&snapshot)?;
            return self.sync();
        }
        self.check_snapshot(snapshot.meta)?;
        // As in `save_snapshot`: what was written before must be durable before the snapshot
        // that replaces it is.
        self.sync()?;
        let (next, path) = (self.dir.join(SNAPSHOT_NEXT), self.dir.join(SNAPSHOT));
        let replaced = self.hold_snapshot_file();
        let res = self.fs.rename(&next, &path).map_err(io_err("renaming", &next));
        self.poison(res)?;
        self.sync_dir()?;
        self.snapshot_file_bytes = snapshot_file_len(&snapshot);
        // Its mark in the log need not be synced now: the file is durable, and opening puts
        // in effect a snapshot file newer than the log's last mark.
        self.snapshot_in_effect(snapshot, replaced)
    }

    /// The log file's sync handle, used from the thread the job runs on. A mark for the
    /// offset it made durable is appended by [`Storage::finish_sync`].
    fn start_sync(&mut self) -> Result<Option<SyncJob<StorageError>>, StorageError> {
        self.check_usable()?;
        assert!(self.sync_started.is_none(), "a sync started before has not finished");
        self.poll_rewrite(false)?;
        let Some(sync) = self.log.sync_handle() else { return Ok(None) };
        self.sync_started = Some((self.nonce, self.log_bytes));
        let path = self.dir.join(LOG);
        Ok(Some(Box::new(move || sync().map_err(io_err("syncing", &path)))))
    }

    fn finish_sync(&mut self, result: Result<(), StorageError>) -> Result<(), StorageError> {
        let started = self.sync_started.take();
        self.check_usable()?;
        self.poison(result)?;
        // Unless the file was replaced meanwhile (a rewrite syncs what it writes) or a sync
        // on this thread covered as much.
        let Some((nonce, at)) = started.filter(|&(n, at)| n == self.nonce && at > self.synced_bytes) else {
            return Ok(());
        };
        let quiet = at == self.log_bytes;
        self.synced_bytes = at;
        self.write(&RecordRef::Synced { at, nonce, check: sync_check(nonce, at) })?;
        if quiet {
            // As in `sync`: the mark needs no sync of its own.
            self.synced_bytes = self.log_bytes;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        self.poll_rewrite(false)?;
        if self.synced_bytes == self.log_bytes {
            return Ok(());
        }
        let path = self.dir.join(LOG);
        let res = self.log.sync().map_err(io_err("syncing", &path));
        self.poison(res)?;
        self.synced_bytes = self.log_bytes;
        // Everything before this mark is now durable; the mark says so to a later reader.
        let (at, nonce) = (self.log_bytes, self.nonce);
        self.write(&RecordRef::Synced { at, nonce, check: sync_check(nonce, at) })?;
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

    #[test]
    fn the_snapshot_file_is_its_checksum_then_the_snapshot_in_postcard() {
        for data in [Vec::new(), vec![7u8; 5], (0..100_000u32).map(|i| i as u8).collect()] {
            let snapshot = Snapshot { meta: SnapshotMeta { index: 300, term: 7 }, data };
            let payload = postcard::to_allocvec(&snapshot).unwrap();
            let whole = [&crc32c::crc32c(&payload).to_le_bytes()[..], &payload].concat();
            assert_eq!(snapshot_file(&snapshot), whole);
            assert_eq!(snapshot_file_len(&snapshot), whole.len() as u64);
        }
    }

    fn log_of(records: &[RecordRef]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chain = CHAIN_SEED;
        for r in records {
            let (b, c) = frame(chain, r);
            out.extend(b);
            chain = c;
        }
        out
    }

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, kind: EntryKind::Normal, data: vec![1].into() }
    }

    /// A rewrite frames the entries in records of at most `REWRITE_RECORD_BYTES` of commands
    /// (exactly that much fits), each with at least one entry (a larger entry goes alone), and
    /// the file replays to the same state.
    #[test]
    fn a_rewrite_frames_its_entries_in_records_of_bounded_size() {
        let mib = 1 << 20;
        let sizes = [7 * mib, 7 * mib, 7 * mib, 17 * mib, 0, 9 * mib, 7 * mib, 1];
        let entries: Vec<Entry> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Entry {
                index: 11 + i as u64,
                term: 2,
                kind: EntryKind::Normal,
                data: vec![i as u8; n].into(),
            })
            .collect();
        let snap = SnapshotMeta { index: 10, term: 1 };
        let hs = HardState { term: 2, vote: Some(3), commit: 14 };
        let (bytes, last) = compact_log(42, &snap, &entries, &hs);
        let (mut off, mut chain, mut groups) = (0, CHAIN_SEED, Vec::new());
        while let Some((r, c, len)) = parse(&bytes, off, chain) {
            if let Record::Entries(es) = r {
                groups.push(es.iter().map(|e| e.index).collect::<Vec<_>>());
            }
            (off, chain) = (off + len, c);
        }
        assert_eq!((off, chain), (bytes.len(), last), "every record parses, in one chain");
        assert_eq!(groups, vec![vec![11, 12], vec![13], vec![14], vec![15, 16, 17], vec![18]]);
        let mut state = State::default();
        replay(&bytes, &mut state, Path::new("raft.log")).unwrap();
        assert_eq!((state.snap, state.hard_state), (snap, hs));
        assert_eq!(state.entries.iter().cloned().collect::<Vec<_>>(), entries);
    }

    fn refused(records: &[RecordRef]) -> String {
        let bytes = log_of(records);
        match replay(&bytes, &mut State::default(), Path::new("raft.log")) {
            Err(StorageError::Corrupt { reason, .. }) => reason,
            r => panic!("accepted: {:?}", r.map(|(n, _, _)| n)),
        }
    }

    #[test]
    fn open_validates_what_it_reads() {
        let h = RecordRef::Header { format: FORMAT, nonce: 7 };
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 1), e(3, 1)])]).contains("entry 3 follows entry 1"));
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 2), e(2, 1)])]).contains("term 1 after term 2"));
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 2)]), RecordRef::Entries(&[e(2, 1)])]).contains("term 1 after"));
        assert!(refused(&[h, RecordRef::Entries(&[e(2, 1)])]).contains("log ends at 0"));
        let hs = HardState { term: 1, vote: None, commit: 2 };
        assert!(refused(&[h, RecordRef::Entries(&[e(1, 1)]), RecordRef::HardState(&hs)]).contains("commit index 2"));
        assert!(refused(&[RecordRef::Entries(&[e(1, 1)])]).contains("no header"));
        assert!(refused(&[RecordRef::Header { format: 9, nonce: 7 }]).contains("format 9"));
        // And a good one passes.
        let ok = log_of(&[h, RecordRef::Entries(&[e(1, 1), e(2, 2)]), RecordRef::HardState(&hs)]);
        let mut st = State::default();
        assert_eq!(replay(&ok, &mut st, Path::new("raft.log")).unwrap().0, ok.len() as u64);
        assert_eq!((st.last_index(), st.hard_state.commit, st.entry_bytes), (2, 2, 2 * (1 + ENTRY_OVERHEAD_BYTES)));
    }
}
