//! # sixfive-storage: Raft storage on real files
//!
//! [`FileStorage`] implements [`sixfive_raft::Storage`] in one directory:
//!
//! - `raft.log`: a write-ahead log of records `[u32 length][u32 crc32c][payload]`, each payload
//!   a hard state, a batch of entries (which replaces every entry from its first index on, as
//!   the trait requires), or the mark of a snapshot. It is only appended to; `sync` makes it
//!   durable (fdatasync).
//! - `raft.snapshot`: the latest snapshot, `[u32 crc32c][payload]`, written to a temporary
//!   file, synced, renamed into place, and the directory synced.
//!
//! Opening replays the log. A crash can leave a torn last record (a partial write): it is
//! cut off, losing only what was never synced. A record that fails its checksum with good
//! records after it is corruption, not a crash: opening refuses with an error naming the file
//! and offset, rather than silently dropping data that was acknowledged.
//!
//! Once a snapshot has made most of the log dead and the file has grown, the log is rewritten
//! compactly (temporary file, sync, rename), so the file stays proportional to the live state.
#![deny(missing_docs)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sixfive_raft::{Entry, HardState, RestoredState, Snapshot, SnapshotMeta, Storage};

const LOG: &str = "raft.log";
const SNAPSHOT: &str = "raft.snapshot";
/// Largest record accepted when reading (a larger length is a torn or corrupt header).
const MAX_RECORD_BYTES: usize = 1 << 30;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The operating system refused.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
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
    HardState(HardState),
    Entries(Vec<Entry>),
    Snapshot(SnapshotMeta),
}

/// Raft state in a directory.
///
/// Invariant: `state` is exactly what replaying the log and snapshot files would give.
pub struct FileStorage {
    dir: PathBuf,
    log: File,
    log_bytes: u64,
    state: RestoredState,
    /// Rewrite the log once it is this much larger than the live state.
    rewrite_slack_bytes: u64,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io { what, path: path.to_path_buf(), source }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn encode(r: &Record) -> Vec<u8> {
    frame(&postcard::to_allocvec(r).expect("records encode"))
}

/// Applies one record to the state, with the semantics of the matching `Storage` call.
fn apply(state: &mut RestoredState, r: Record) -> Result<(), String> {
    match r {
        Record::HardState(hs) => state.hard_state = hs,
        Record::Entries(es) => {
            let Some(first) = es.first() else { return Ok(()) };
            let base = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
            let next = state.entries.last().map_or(base + 1, |e| e.index + 1);
            if first.index > next {
                return Err(format!("entries start at {} but the log ends at {}", first.index, next - 1));
            }
            state.entries.retain(|e| e.index < first.index);
            state.entries.extend(es);
        }
        Record::Snapshot(meta) => drop_covered(state, meta),
    }
    Ok(())
}

/// Section 7: keep the entries after the snapshot if the log holds its last entry; else none.
/// A log that already starts after the snapshot has nothing covered (the snapshot's mark was
/// replayed, or the snapshot file is being reconciled with a log compacted up to it).
fn drop_covered(state: &mut RestoredState, meta: SnapshotMeta) {
    if state.entries.first().is_none_or(|e| e.index > meta.index) {
        return;
    }
    let keeps = state.entries.iter().any(|e| e.index == meta.index && e.term == meta.term);
    if keeps {
        state.entries.retain(|e| e.index > meta.index);
    } else {
        state.entries.clear();
    }
}

impl FileStorage {
    /// Opens (or creates) the storage in `dir`, recovering from a crash if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStorage, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let mut state = RestoredState::default();
        let snap_path = dir.join(SNAPSHOT);
        if snap_path.exists() {
            let bytes = std::fs::read(&snap_path).map_err(io_err("reading", &snap_path))?;
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
            state.snapshot = Some(snap);
        }
        let log_path = dir.join(LOG);
        let mut log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("opening", &log_path))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(io_err("reading", &log_path))?;
        let valid = replay(&bytes, &mut state, &log_path)?;
        if valid < bytes.len() as u64 {
            // A torn last write: drop it (it was never acknowledged).
            log.set_len(valid).map_err(io_err("truncating", &log_path))?;
            log.sync_all().map_err(io_err("syncing", &log_path))?;
        }
        // The snapshot file is renamed into place before its mark is logged; a crash between
        // the two leaves a snapshot the log does not know about yet.
        if let Some(meta) = state.snapshot.as_ref().map(|s| s.meta) {
            drop_covered(&mut state, meta);
        }
        Ok(FileStorage { dir, log, log_bytes: valid, state, rewrite_slack_bytes: 64 << 20 })
    }

    /// Rewrites the log once it exceeds the live state by more than `bytes` (default 64 MiB).
    pub fn with_rewrite_slack(mut self, bytes: u64) -> FileStorage {
        self.rewrite_slack_bytes = bytes;
        self
    }

    /// Size of the log file.
    pub fn log_file_bytes(&self) -> u64 {
        self.log_bytes
    }

    fn write(&mut self, r: &Record) -> Result<(), StorageError> {
        let bytes = encode(r);
        let path = self.dir.join(LOG);
        self.log.write_all(&bytes).map_err(io_err("appending to", &path))?;
        self.log_bytes += bytes.len() as u64;
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StorageError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", &self.dir))
    }

    /// Replaces the log by one record per live item, atomically.
    fn rewrite(&mut self) -> Result<(), StorageError> {
        let path = self.dir.join(LOG);
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        let mut out = encode(&Record::HardState(self.state.hard_state));
        if !self.state.entries.is_empty() {
            out.extend(encode(&Record::Entries(self.state.entries.clone())));
        }
        let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(&out).and_then(|()| f.sync_all()).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
        self.sync_dir()?;
        self.log = OpenOptions::new().read(true).append(true).open(&path).map_err(io_err("opening", &path))?;
        self.log_bytes = out.len() as u64;
        Ok(())
    }
}

/// Replays `bytes` into `state`; returns how many bytes are valid.
fn replay(bytes: &[u8], state: &mut RestoredState, path: &Path) -> Result<u64, StorageError> {
    let mut off = 0usize;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if rest.len() < 8 {
            break; // torn header at the tail
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES || rest.len() - 8 < len {
            break; // a record reaching past the end: torn at the tail
        }
        let payload = &rest[8..8 + len];
        let corrupt = |reason: String| StorageError::Corrupt { path: path.to_path_buf(), offset: off as u64, reason };
        if crc32c::crc32c(payload) != crc {
            if off + 8 + len == bytes.len() {
                break; // the last record, torn
            }
            return Err(corrupt("checksum mismatch with valid data after it".into()));
        }
        let r: Record = postcard::from_bytes(payload).map_err(|e| corrupt(format!("undecodable record: {e}")))?;
        apply(state, r).map_err(corrupt)?;
        off += 8 + len;
    }
    Ok(off as u64)
}

impl Storage for FileStorage {
    type Error = StorageError;

    fn initial_state(&self) -> Result<RestoredState, StorageError> {
        Ok(self.state.clone())
    }

    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.write(&Record::HardState(*hs))?;
        self.state.hard_state = *hs;
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let base = self.state.snapshot.as_ref().map_or(0, |s| s.meta.index);
        let next = self.state.entries.last().map_or(base + 1, |e| e.index + 1);
        if entries[0].index > next {
            return Err(StorageError::Invalid(format!(
                "entries start at {} but the log ends at {}",
                entries[0].index,
                next - 1
            )));
        }
        let r = Record::Entries(entries.to_vec());
        self.write(&r)?;
        apply(&mut self.state, r).expect("checked above");
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let path = self.dir.join(SNAPSHOT);
        let tmp = self.dir.join(format!("{SNAPSHOT}.tmp"));
        let payload = postcard::to_allocvec(snapshot).expect("snapshots encode");
        let mut bytes = crc32c::crc32c(&payload).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
        self.sync_dir()?;
        self.write(&Record::Snapshot(snapshot.meta))?;
        drop_covered(&mut self.state, snapshot.meta);
        self.state.snapshot = Some(snapshot.clone());
        if self.log_bytes > self.raft_state_bytes() as u64 + self.rewrite_slack_bytes {
            self.rewrite()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.log.sync_data().map_err(io_err("syncing", &self.dir.join(LOG)))
    }

    /// The live Raft state (hard state and retained entries) as the log would encode it;
    /// dead records awaiting a rewrite do not count.
    fn raft_state_bytes(&self) -> usize {
        let entries: usize = self.state.entries.iter().map(|e| e.data.len() + 24).sum();
        entries + 24
    }
}
