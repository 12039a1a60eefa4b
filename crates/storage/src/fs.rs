//! The file-system seam: every byte [`crate::FileStorage`] reads or writes goes through [`Fs`].
//!
//! [`OsFs`] is the real one. [`SimFs`] (feature `sim`) is a deterministic file system for the
//! simulator that does to unsynced data what POSIX allows a power failure to do, and fails
//! calls the way disks fail:
//!
//! - Reads see every write (as through the page cache); a crash keeps only what was synced.
//! - Unsynced data is lost page by page (4 KiB), each page independently, in any order: a
//!   later page of a write may survive while an earlier one does not.
//! - A file that grew and was not synced may come back at its new size with the unwritten
//!   pages zero-filled (extent allocated, blocks never written: XFS, ext4 writeback).
//! - Names (creation, rename) are durable only after the directory is synced; at a crash each
//!   directory keeps either its last synced listing or its current one.
//! - Any call can fail with `EIO` or `ENOSPC` at a configured rate; a failed append may have
//!   written a prefix (a short write); a failed `fsync` marks the dirty pages clean without
//!   writing them, as Linux does, so a caller that retries the `fsync` and goes on loses data
//!   at the next crash (the PostgreSQL "fsyncgate" behaviour).
//! - Each `fsync` costs a configured latency, which a driver can charge to virtual time.

use std::io;
use std::path::Path;

/// An open file, written only at its end.
pub trait FsFile {
    /// Appends `buf` whole, or fails (possibly after writing a prefix of it).
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts (or extends with zeros) the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The file's length (for a log, its logical end: see [`OsFile`]).
    fn size(&self) -> io::Result<u64>;
    /// From now on this file is a log: appended to and synced often, read only whole. (A
    /// file system may prepare space ahead of its end; see [`OsFile`].)
    fn is_log(&mut self) {}
    /// A function that makes durable, from any thread, what was written to this file before
    /// it returns (as [`FsFile::sync`]), while this handle goes on writing. `None` (the
    /// default): this file is synced from its own thread only.
    fn sync_handle(&self) -> Option<SyncHandle> {
        None
    }
}

/// See [`FsFile::sync_handle`].
pub type SyncHandle = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// Creates (or truncates) a file, writes its parts one after the other and syncs it; usable
/// from any thread.
pub type FileWriter = Box<dyn Fn(&Path, &[&[u8]]) -> io::Result<()> + Send>;

/// What [`crate::FileStorage`] needs of a file system.
pub trait Fs {
    /// An open file.
    type File: FsFile;
    /// Creates `dir` and its missing parents (not durable until their parents are synced).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Whether a file or directory exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// The whole content of a file, as readers see it (through the page cache).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The whole content of a file as it is on the disk: what a predecessor left dirty is
    /// flushed first, and pages the kernel marked clean after a failed writeback (so never
    /// written) are not trusted from the cache but read again from the device.
    fn read_durable(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// A random number, unpredictable to clients (tags a log file so that bytes from another
    /// file, or planted in a payload, are never taken for its own).
    fn random_u64(&self) -> u64;
    /// Opens a file for appending, creating it empty if missing.
    fn open_append(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates (or truncates) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file (to hold on to it: a file replaced by a rename while open here
    /// keeps its blocks until [`Fs::release`] lets go of it).
    fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Renames `from` to `to`, replacing `to` (durable once their directory is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file's name (durable once its directory is synced; its blocks are freed
    /// when no handle holds it open).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// For writing files on another thread (snapshots in the background): `None` (the
    /// default) if this file system is used from one thread only.
    fn file_writer(&self) -> Option<FileWriter> {
        None
    }
    /// Frees what the storage no longer needs: at once by default (the simulator's choice,
    /// one thread and no wall-clock cost).
    fn release(&self, garbage: Garbage<Self::File>) {
        drop(garbage);
    }
}

/// What a snapshot made dead: the files it replaced (still open), the entries it covers, the
/// snapshot it superseded.
pub struct Garbage<F> {
    /// The replaced files, no longer named: the previous snapshot file, and the log file if a
    /// rewrite replaced it.
    pub files: Vec<F>,
    /// The entries dropped from the log.
    pub entries: std::collections::VecDeque<sixfive_raft::Entry>,
    /// The snapshot held before.
    pub snapshot: Option<std::sync::Arc<sixfive_raft::Snapshot>>,
}

/// A [`FileWriter`] of [`OsFs`] syncs after each of this many bytes.
const WRITER_SYNC_BYTES: usize = 8 << 20;

/// [`OsFs`] frees a released file this many bytes at a time.
const FREE_CHUNK_BYTES: u64 = 4 << 20;

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

impl FsFile for std::fs::File {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

/// Space [`OsFile`] writes zeros into ahead of the log's end, at a time.
const PREZEROED_BYTES: u64 = 256 << 10;

/// A file of [`OsFs`], appended to at its logical end with positional writes over space
/// already written with zeros, 256 KiB at a time.
///
/// Why: an `fdatasync` after an append that grows the file must also commit the new size and
/// block allocation (an ext4 journal commit: a second device flush); after overwriting blocks
/// that are already allocated and written, it flushes the data alone. Measured on this
/// project's disk, 8 KiB writes each followed by `fdatasync`: 233-278 us growing the file,
/// 143-145 us over zeros written before. (Space reserved with `fallocate` is no better: its
/// blocks are "unwritten" and the first write to each is again a metadata change.)
///
/// The zeros after the logical end are what a reader sees past the last record: a zero
/// length never passes for a record, so replay stops there as at a torn tail, and
/// [`crate::FileStorage::open_with`] cuts the file back to its last record.
#[derive(Debug)]
pub struct OsFile {
    /// Shared with the syncs running elsewhere ([`FsFile::sync_handle`]).
    file: std::sync::Arc<std::fs::File>,
    /// Where the next append goes.
    end: u64,
    /// Bytes of the file written (with data or zeros) so far.
    written: u64,
    /// Whether to write zeros ahead ([`FsFile::is_log`]).
    ahead: bool,
}

impl OsFile {
    fn new(file: std::fs::File) -> io::Result<OsFile> {
        let len = file.metadata()?.len();
        Ok(OsFile { file: std::sync::Arc::new(file), end: len, written: len, ahead: false })
    }
}

impl FsFile for OsFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let need = self.end + buf.len() as u64;
        if self.ahead && need > self.written {
            static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
            let to = need.next_multiple_of(PREZEROED_BYTES);
            while self.written < to {
                let n = (to - self.written).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], self.written)?;
                self.written += n as u64;
            }
        }
        self.file.write_all_at(buf, self.end)?;
        self.end = need;
        self.written = self.written.max(need);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.end = len;
        self.written = len;
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.end)
    }
    fn is_log(&mut self) {
        self.ahead = true;
    }
    fn sync_handle(&self) -> Option<SyncHandle> {
        let file = self.file.clone();
        Some(Box::new(move || file.sync_data()))
    }
}

impl Fs for OsFs {
    type File = OsFile;
    /// On a thread of its own: closing a replaced log of a hundred MB and more (the file
    /// system frees its blocks then) stalled the node's loop for 70-110 ms, and freeing the
    /// covered entries and the superseded snapshot for tens more.
    ///
    /// Files are freed a few MB at a time, each step committed (`ftruncate`, `fdatasync`):
    /// freed all at once, a file's blocks join one journal transaction, and whoever syncs next
    /// waits for its commit, which on a file system mounted with `discard` (this project's
    /// disk) discards them all first. The node's loop syncs its log every few milliseconds:
    /// a replaced snapshot of 260 MB, freed by the rename that replaced it, made the rename's
    /// directory sync take 17-46 ms. (RocksDB deletes its files by chunks for the same
    /// reason.)
    ///
    /// One thread for the whole process frees everything released, in order.
    fn release(&self, garbage: Garbage<OsFile>) {
        type Free = Box<dyn FnOnce() + Send>;
        static FREER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Free>>> = std::sync::OnceLock::new();
        let freer = FREER.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Free>();
            let spawned = std::thread::Builder::new().name("sixfive-free".into()).spawn(move || {
                for free in rx {
                    free();
                }
            });
            spawned.ok().map(|_| tx)
        });
        let free: Free = Box::new(move || {
            for f in &garbage.files {
                free_gradually(&f.file);
            }
            drop(garbage);
        });
        // If no thread could be started, the garbage is freed here.
        if let Some(Err(std::sync::mpsc::SendError(free))) = freer.as_ref().map(|tx| tx.send(free)) {
            free();
        }
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn read_durable(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = std::fs::File::open(path)?;
        f.sync_data()?;
        // Drop the (now clean) cached pages so the read below comes from the device: after a
        // failed writeback Linux keeps the data in the cache marked clean, never to be written.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise on an open file descriptor we own; only a hint.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let mut out = Vec::new();
        io::Read::read_to_end(&mut &f, &mut out)?;
        Ok(out)
    }
    fn random_u64(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // RandomState's keys come from the operating system's randomness.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        h.finish()
    }
    fn open_append(&self, path: &Path) -> io::Result<OsFile> {
        // Not O_APPEND: appends go to the logical end, before the zeros written ahead.
        OsFile::new(std::fs::OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?)
    }
    fn create(&self, path: &Path) -> io::Result<OsFile> {
        OsFile::new(std::fs::File::create(path)?)
    }
    fn open(&self, path: &Path) -> io::Result<OsFile> {
        // Writable: freeing it gradually truncates it.
        OsFile::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn file_writer(&self) -> Option<FileWriter> {
        Some(Box::new(|path: &Path, parts: &[&[u8]]| {
            let mut f = std::fs::File::create(path)?;
            // Synced as it goes, a chunk at a time: the file's dirty pages never pile up. On
            // ext4 (data=ordered) the log's next `fdatasync` on the node's loop would otherwise
            // wait for them all: a snapshot of hundreds of MB stalled every member's loop for
            // up to a second and a half while it was written.
            let mut unsynced = 0;
            for part in parts {
                for chunk in part.chunks(WRITER_SYNC_BYTES) {
                    io::Write::write_all(&mut f, chunk)?;
                    unsynced += chunk.len();
                    if unsynced >= WRITER_SYNC_BYTES {
                        f.sync_data()?;
                        unsynced = 0;
                    }
                }
            }
            f.sync_data()
        }))
    }
}

/// Cuts a file no longer named down to at most [`FREE_CHUNK_BYTES`], that much at a time,
/// each step made durable before the next; stops at the first error. The rest is freed when
/// the file is closed.
fn free_gradually(file: &std::fs::File) {
    let Ok(meta) = file.metadata() else { return };
    let mut len = meta.len();
    while len > FREE_CHUNK_BYTES {
        len = len.saturating_sub(FREE_CHUNK_BYTES);
        if file.set_len(len).and_then(|()| file.sync_data()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod os_tests {
    use super::*;

    #[test]
    fn a_released_file_is_cut_by_chunks_through_its_handle() {
        let dir = std::env::temp_dir().join(format!("sixfive-free-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; (2 * FREE_CHUNK_BYTES + 5) as usize]).unwrap();
        let held = OsFs.open(&path).unwrap();
        std::fs::write(dir.join("g"), b"new").unwrap();
        OsFs.rename(&dir.join("g"), &path).unwrap();
        assert_eq!(held.file.metadata().unwrap().len(), 2 * FREE_CHUNK_BYTES + 5, "held open after the rename");
        free_gradually(&held.file);
        assert_eq!(held.file.metadata().unwrap().len(), 5, "cut by whole chunks; the rest goes with the handle");
        assert_eq!(std::fs::read(&path).unwrap(), b"new", "only the held file was cut");
        assert!(OsFs.open(&dir.join("missing")).is_err(), "open does not create");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(feature = "sim")]
pub use sim::{SimFs, SimFsConfig, SimFsStats};

#[cfg(feature = "sim")]
mod sim {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::io;
    use std::path::{Path, PathBuf};
    use std::rc::Rc;

    use sixfive_sim::{Micros, Rng};

    use super::{Fs, FsFile};

    /// Page size of the simulated disk: the unit in which unsynced data survives or not.
    pub const PAGE_BYTES: usize = 4096;

    /// How a [`SimFs`] misbehaves.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct SimFsConfig {
        /// Probability that a mutating call (append, sync, set_len, create, rename, directory
        /// sync) fails with `EIO` or `ENOSPC`.
        pub fail_rate: f64,
        /// A grown, unsynced file may come back at its new size with unwritten pages zeroed.
        pub zero_fill: bool,
        /// Virtual time each `fsync` (file or directory) takes.
        pub sync_latency: Micros,
    }

    /// What a [`SimFs`] counted.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SimFsStats {
        /// Successful file syncs.
        pub syncs: u64,
        /// Successful directory syncs.
        pub dir_syncs: u64,
        /// Calls failed on purpose.
        pub injected_failures: u64,
        /// Crashes.
        pub crashes: u64,
    }

    #[derive(Default)]
    struct Inode {
        /// What survives a crash for certain.
        durable: Vec<u8>,
        /// What readers see.
        current: Vec<u8>,
        /// Pages of `current` that differ (or may differ) from `durable`.
        /// Invariant: every page where `current` and `durable` differ is listed, and so is any
        /// page past the shorter of the two lengths.
        dirty: BTreeSet<usize>,
    }

    impl Inode {
        fn mark(&mut self, from: usize, to: usize) {
            if to > from {
                self.dirty.extend(from / PAGE_BYTES..to.div_ceil(PAGE_BYTES));
            }
        }

        fn sync(&mut self) {
            self.durable.resize(self.current.len(), 0);
            for &p in &self.dirty {
                let lo = p * PAGE_BYTES;
                let hi = ((p + 1) * PAGE_BYTES).min(self.current.len());
                if lo < hi {
                    self.durable[lo..hi].copy_from_slice(&self.current[lo..hi]);
                }
            }
            self.dirty.clear();
        }

        /// A power failure. The file comes back at a length between its synced and its
        /// current one. Each dirty page below the synced length independently keeps its new or
        /// old content. Past the synced length: with `zero_fill` (the size reached the disk
        /// before the data), each page holds its new content or zeros; without it (ordered
        /// data), the length covers only data that reached the disk.
        fn crash(&mut self, rng: &mut Rng, zero_fill: bool) {
            let (d, c) = (self.durable.len(), self.current.len());
            let len = if c > d {
                d + rng.below((c - d) as u64 + 1) as usize
            } else if c < d && rng.chance(0.5) {
                c
            } else {
                d
            };
            let mut out = self.durable.clone();
            out.resize(len, 0);
            for &p in &self.dirty {
                let lo = p * PAGE_BYTES;
                let hi = ((p + 1) * PAGE_BYTES).min(len).min(c);
                if lo < hi && rng.chance(0.5) {
                    out[lo..hi].copy_from_slice(&self.current[lo..hi]);
                }
            }
            if !zero_fill && len > d {
                out[d..len].copy_from_slice(&self.current[d..len]);
            }
            self.durable = out.clone();
            self.current = out;
            self.dirty.clear();
        }
    }

    #[derive(Default)]
    struct State {
        rng: Option<Rng>,
        config: SimFsConfig,
        inodes: BTreeMap<u64, Inode>,
        next_inode: u64,
        /// Directory -> (name -> inode) as readers see it.
        names: BTreeMap<PathBuf, BTreeMap<PathBuf, u64>>,
        /// Directory -> (name -> inode) as of its last sync.
        durable_names: BTreeMap<PathBuf, BTreeMap<PathBuf, u64>>,
        /// Incremented at each crash: handles of an earlier incarnation must not be used.
        epoch: u64,
        stats: SimFsStats,
        latency: Micros,
    }

    impl State {
        fn rng(&mut self) -> &mut Rng {
            self.rng.as_mut().expect("seeded")
        }

        fn fault(&mut self, what: &str) -> io::Result<()> {
            let p = self.config.fail_rate;
            if p > 0.0 && self.rng().chance(p) {
                self.stats.injected_failures += 1;
                let enospc = self.rng().chance(0.5);
                let kind = if enospc { "ENOSPC (injected)" } else { "EIO (injected)" };
                return Err(io::Error::other(format!("{what}: {kind}")));
            }
            Ok(())
        }

        fn lookup(&self, path: &Path) -> Option<u64> {
            self.names.get(parent(path)).and_then(|d| d.get(path)).copied()
        }

        fn is_dir(&self, path: &Path) -> bool {
            self.names.contains_key(path)
        }

        fn new_inode(&mut self) -> u64 {
            self.next_inode += 1;
            self.inodes.insert(self.next_inode, Inode::default());
            self.next_inode
        }

        fn link(&mut self, path: &Path, ino: u64) -> io::Result<()> {
            let dir = self.names.get_mut(parent(path)).ok_or_else(|| not_found(parent(path)))?;
            dir.insert(path.to_path_buf(), ino);
            Ok(())
        }
    }

    fn parent(path: &Path) -> &Path {
        path.parent().unwrap_or(Path::new(""))
    }

    fn not_found(path: &Path) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file or directory", path.display()))
    }

    /// A deterministic, simulated file system (see the module docs). Clones share it. Paths
    /// are absolute; `/` exists from the start.
    #[derive(Clone, Default)]
    pub struct SimFs(Rc<RefCell<State>>);

    /// An open file of a [`SimFs`].
    pub struct SimFile {
        fs: SimFs,
        ino: u64,
        epoch: u64,
    }

    impl SimFs {
        /// An empty file system whose faults follow `rng`.
        pub fn new(rng: Rng, config: SimFsConfig) -> SimFs {
            let mut st = State { rng: Some(rng), config, ..Default::default() };
            st.names.insert(PathBuf::from("/"), BTreeMap::new());
            st.durable_names.insert(PathBuf::from("/"), BTreeMap::new());
            SimFs(Rc::new(RefCell::new(st)))
        }

        /// Changes the fault model.
        pub fn set_config(&self, config: SimFsConfig) {
            self.0.borrow_mut().config = config;
        }

        /// The fault model.
        pub fn config(&self) -> SimFsConfig {
            self.0.borrow().config
        }

        /// Counters.
        pub fn stats(&self) -> SimFsStats {
            self.0.borrow().stats
        }

        /// Virtual time spent in syncs since the last call.
        pub fn take_latency(&self) -> Micros {
            std::mem::take(&mut self.0.borrow_mut().latency)
        }

        /// A power failure: unsynced data and names are lost as the module docs describe.
        /// Files opened before it must not be used again.
        pub fn crash(&self) {
            let mut guard = self.0.borrow_mut();
            let st = &mut *guard;
            st.epoch += 1;
            st.stats.crashes += 1;
            let zero_fill = st.config.zero_fill;
            let mut rng = st.rng.take().expect("seeded");
            // Each directory keeps its synced listing, or (a journal commit got there first)
            // its current one.
            let dirs: Vec<PathBuf> = st.names.keys().cloned().collect();
            let mut names = BTreeMap::new();
            for d in dirs {
                let listing = if rng.chance(0.5) { st.names.get(&d) } else { st.durable_names.get(&d) };
                if let Some(l) = listing {
                    names.insert(d, l.clone());
                }
            }
            // A directory whose own name was lost is gone, with everything below it (parents
            // sort before their children).
            let mut kept: BTreeMap<PathBuf, BTreeMap<PathBuf, u64>> = BTreeMap::new();
            for (d, listing) in names {
                let named = d == Path::new("/") || kept.get(parent(&d)).is_some_and(|l| l.contains_key(&d));
                if named {
                    kept.insert(d, listing);
                }
            }
            let names = kept;
            st.durable_names = names.clone();
            st.names = names;
            for inode in st.inodes.values_mut() {
                inode.crash(&mut rng, zero_fill);
            }
            st.rng = Some(rng);
        }

        fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
            f(&mut self.0.borrow_mut())
        }
    }

    impl SimFile {
        fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
            let mut st = self.fs.0.borrow_mut();
            assert_eq!(st.epoch, self.epoch, "a file handle used after the file system crashed");
            f(&mut st, self.ino)
        }
    }

    impl FsFile for SimFile {
        fn append(&mut self, buf: &[u8]) -> io::Result<()> {
            self.with(|st, ino| {
                let failed = st.fault("write");
                // A failed write may still have written a prefix (a short write).
                let n = if failed.is_err() { st.rng().below(buf.len() as u64 + 1) as usize } else { buf.len() };
                let inode = st.inodes.get_mut(&ino).expect("open inode");
                let old = inode.current.len();
                inode.current.extend_from_slice(&buf[..n]);
                inode.mark(old, old + n);
                failed
            })
        }

        fn sync(&mut self) -> io::Result<()> {
            self.with(|st, ino| {
                st.latency += st.config.sync_latency;
                if let Err(e) = st.fault("fsync") {
                    // Linux: the dirty pages are marked clean although never written.
                    st.inodes.get_mut(&ino).expect("open inode").dirty.clear();
                    return Err(e);
                }
                st.inodes.get_mut(&ino).expect("open inode").sync();
                st.stats.syncs += 1;
                Ok(())
            })
        }

        fn size(&self) -> io::Result<u64> {
            self.with(|st, ino| Ok(st.inodes[&ino].current.len() as u64))
        }

        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.with(|st, ino| {
                st.fault("ftruncate")?;
                let inode = st.inodes.get_mut(&ino).expect("open inode");
                let old = inode.current.len();
                let len = len as usize;
                inode.current.resize(len, 0);
                inode.mark(old.min(len), old.max(len).max(inode.durable.len()));
                Ok(())
            })
        }
    }

    impl Fs for SimFs {
        type File = SimFile;

        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.with(|st| {
                let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !st.is_dir(a)).collect();
                missing.reverse();
                for d in missing {
                    if d.as_os_str().is_empty() {
                        continue;
                    }
                    st.names.get_mut(parent(d)).ok_or_else(|| not_found(parent(d)))?.insert(d.to_path_buf(), 0);
                    st.names.insert(d.to_path_buf(), BTreeMap::new());
                    st.durable_names.entry(d.to_path_buf()).or_default();
                }
                Ok(())
            })
        }

        fn exists(&self, path: &Path) -> io::Result<bool> {
            Ok(self.with(|st| st.is_dir(path) || st.lookup(path).is_some()))
        }

        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            self.with(|st| {
                let ino = st.lookup(path).filter(|&i| i != 0).ok_or_else(|| not_found(path))?;
                Ok(st.inodes[&ino].current.clone())
            })
        }

        fn read_durable(&self, path: &Path) -> io::Result<Vec<u8>> {
            self.with(|st| {
                let ino = st.lookup(path).filter(|&i| i != 0).ok_or_else(|| not_found(path))?;
                st.fault("fsync")?;
                let inode = st.inodes.get_mut(&ino).expect("listed inode");
                inode.sync();
                // The device's content: pages a failed fsync marked clean were never written.
                inode.current = inode.durable.clone();
                Ok(inode.durable.clone())
            })
        }

        fn random_u64(&self) -> u64 {
            self.with(|st| st.rng().next_u64())
        }

        fn open_append(&self, path: &Path) -> io::Result<SimFile> {
            self.with(|st| {
                let ino = match st.lookup(path) {
                    Some(ino) => ino,
                    None => {
                        st.fault("create")?;
                        let ino = st.new_inode();
                        st.link(path, ino)?;
                        ino
                    }
                };
                Ok(ino)
            })
            .map(|ino| SimFile { fs: self.clone(), ino, epoch: self.0.borrow().epoch })
        }

        fn create(&self, path: &Path) -> io::Result<SimFile> {
            self.with(|st| {
                st.fault("create")?;
                let ino = st.new_inode();
                st.link(path, ino)?;
                Ok(ino)
            })
            .map(|ino| SimFile { fs: self.clone(), ino, epoch: self.0.borrow().epoch })
        }

        fn open(&self, path: &Path) -> io::Result<SimFile> {
            let ino = self.with(|st| st.lookup(path).filter(|&i| i != 0).ok_or_else(|| not_found(path)))?;
            Ok(SimFile { fs: self.clone(), ino, epoch: self.0.borrow().epoch })
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.with(|st| {
                st.fault("rename")?;
                let ino = st.lookup(from).ok_or_else(|| not_found(from))?;
                st.names.get_mut(parent(from)).expect("listed").remove(from);
                st.link(to, ino)
            })
        }

        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.with(|st| {
                st.fault("unlink")?;
                st.lookup(path).ok_or_else(|| not_found(path))?;
                st.names.get_mut(parent(path)).expect("listed").remove(path);
                Ok(())
            })
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.with(|st| {
                st.latency += st.config.sync_latency;
                st.fault("fsync directory")?;
                let listing = st.names.get(dir).cloned().ok_or_else(|| not_found(dir))?;
                st.durable_names.insert(dir.to_path_buf(), listing);
                st.stats.dir_syncs += 1;
                Ok(())
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn fs(seed: u64) -> SimFs {
            SimFs::new(Rng::new(seed), SimFsConfig { zero_fill: true, ..Default::default() })
        }

        #[test]
        fn synced_data_survives_and_unsynced_pages_come_back_in_any_combination() {
            let mut saw_later_page_without_earlier = false;
            let mut saw_zero_tail = false;
            for seed in 0..200 {
                let f = fs(seed);
                f.create_dir_all(Path::new("/d")).unwrap();
                f.sync_dir(Path::new("/")).unwrap();
                let mut h = f.open_append(Path::new("/d/log")).unwrap();
                f.sync_dir(Path::new("/d")).unwrap();
                h.append(&[1; 100]).unwrap();
                h.sync().unwrap();
                h.append(&[2; 3 * PAGE_BYTES]).unwrap();
                f.crash();
                let got = f.read(Path::new("/d/log")).unwrap();
                assert!(got.len() >= 100 && got[..100] == [1; 100], "synced bytes survive");
                if got.len() > PAGE_BYTES + 1 {
                    let page = |p: usize| got[p * PAGE_BYTES + 1];
                    if page(1) == 2 && page(0) != 2 {
                        saw_later_page_without_earlier = true;
                    }
                }
                if got.len() > 100 && got[100..].iter().all(|&b| b == 0) {
                    saw_zero_tail = true;
                }
            }
            assert!(saw_later_page_without_earlier && saw_zero_tail);
        }

        #[test]
        fn names_need_a_directory_sync() {
            let mut lost = 0;
            for seed in 0..50 {
                let f = fs(seed);
                f.create_dir_all(Path::new("/d")).unwrap();
                f.sync_dir(Path::new("/")).unwrap();
                let mut h = f.create(Path::new("/d/a")).unwrap();
                h.append(b"x").unwrap();
                h.sync().unwrap();
                f.crash();
                if !f.exists(Path::new("/d/a")).unwrap() {
                    lost += 1;
                }
                // Synced directory: the name stays.
                let mut h = f.create(Path::new("/d/b")).unwrap();
                h.sync().unwrap();
                f.sync_dir(Path::new("/d")).unwrap();
                f.crash();
                assert!(f.exists(Path::new("/d/b")).unwrap());
            }
            assert!(lost > 0 && lost < 50, "{lost}");
        }

        #[test]
        fn a_failed_fsync_loses_the_data_it_did_not_write() {
            let f = SimFs::new(Rng::new(1), SimFsConfig { fail_rate: 1.0, ..Default::default() });
            f.set_config(SimFsConfig::default());
            f.create_dir_all(Path::new("/d")).unwrap();
            f.sync_dir(Path::new("/")).unwrap();
            let mut h = f.create(Path::new("/d/a")).unwrap();
            f.sync_dir(Path::new("/d")).unwrap();
            h.append(&[7; 10]).unwrap();
            f.set_config(SimFsConfig { fail_rate: 1.0, ..Default::default() });
            assert!(h.sync().is_err());
            f.set_config(SimFsConfig::default());
            h.sync().unwrap(); // "succeeds", as on Linux
            f.crash();
            assert_ne!(f.read(Path::new("/d/a")).unwrap(), [7; 10], "the retried fsync wrote nothing");
        }
    }
}
