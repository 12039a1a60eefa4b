//! Raft storage on a simulated disk that loses unsynced writes on a crash.

use serde::Serialize;
use sixfive_raft::{Entry, HardState, RestoredState, Snapshot, Storage};
use sixfive_sim::{Disk, DiskOp};
use sixfive_storage::FileStorage;
use sixfive_storage::fs::{SimFs, SimFsConfig};

/// What the disk holds.
#[derive(Clone, Debug, Default)]
pub struct RaftDisk {
    /// Term, vote, commit.
    pub hard_state: HardState,
    /// Latest snapshot.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot.
    pub entries: Vec<Entry>,
}

/// One atomic write.
#[derive(Clone, Debug)]
pub enum RaftOp {
    /// Replace the hard state.
    HardState(HardState),
    /// Truncate at the first entry's index, then append.
    Append(Vec<Entry>),
    /// Store a snapshot and drop what it covers.
    Snapshot(Snapshot),
}

impl DiskOp<RaftDisk> for RaftOp {
    fn apply(&self, d: &mut RaftDisk) {
        match self {
            RaftOp::HardState(hs) => d.hard_state = *hs,
            RaftOp::Append(es) => {
                let first = es[0].index;
                d.entries.retain(|e| e.index < first);
                let expected = d
                    .entries
                    .last()
                    .map(|e| e.index + 1)
                    .or(d.snapshot.as_ref().map(|s| s.meta.index + 1))
                    .unwrap_or(1);
                assert!(first <= expected, "append at {first} leaves a hole after {}", expected - 1);
                d.entries.extend(es.iter().cloned());
            }
            RaftOp::Snapshot(s) => {
                let keeps = d.entries.iter().any(|e| e.index == s.meta.index && e.term == s.meta.term);
                if keeps {
                    d.entries.retain(|e| e.index > s.meta.index);
                } else {
                    d.entries.clear();
                }
                d.snapshot = Some(s.clone());
            }
        }
    }
}

fn encoded_len<T: Serialize>(v: &T) -> usize {
    postcard::to_allocvec(v).expect("encodes").len()
}

impl RaftDisk {
    /// Bytes of Raft state (hard state and log, snapshot excluded), as it would be encoded.
    pub fn raft_state_bytes(&self) -> usize {
        encoded_len(&self.hard_state) + self.entries.iter().map(encoded_len).sum::<usize>()
    }

    /// Bytes of the snapshot's data.
    pub fn snapshot_bytes(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |s| s.data.len())
    }
}

/// [`Storage`] over a simulated [`Disk`].
#[derive(Clone, Debug, Default)]
pub struct SimStorage {
    /// The disk; survives crashes of the node that uses it.
    pub disk: Disk<RaftDisk, RaftOp>,
}

impl Storage for SimStorage {
    type Error = std::convert::Infallible;

    fn initial_state(&self) -> Result<RestoredState, Self::Error> {
        let d = self.disk.read();
        Ok(RestoredState { hard_state: d.hard_state, snapshot: d.snapshot.clone(), entries: d.entries.clone() })
    }

    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), Self::Error> {
        self.disk.write(RaftOp::HardState(*hs));
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), Self::Error> {
        if !entries.is_empty() {
            self.disk.write(RaftOp::Append(entries.to_vec()));
        }
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error> {
        self.disk.write(RaftOp::Snapshot(snapshot.clone()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), Self::Error> {
        self.disk.sync();
        Ok(())
    }

    fn raft_state_bytes(&self) -> usize {
        self.disk.read().raft_state_bytes()
    }
}

/// Where the directory of node storage lives on a simulated file system.
const FILE_DIR: &str = "/raft";

/// A node's storage in the simulator: the in-memory model over a [`Disk`], or the real
/// [`FileStorage`] over a simulated file system ([`SimFs`]) that loses unsynced pages and fails
/// calls on purpose. Both outlive the node that uses them.
pub enum NodeStorage {
    /// The model.
    Model(SimStorage),
    /// The production storage on a simulated disk; `None` while the node is down (or could
    /// not open it: an injected I/O error at start-up).
    File {
        /// The disk.
        fs: SimFs,
        /// The open storage.
        open: Option<FileStorage<SimFs>>,
    },
}

impl NodeStorage {
    /// Production storage on a fresh simulated disk.
    pub fn file(rng: sixfive_sim::Rng, config: SimFsConfig) -> NodeStorage {
        NodeStorage::File { fs: SimFs::new(rng, config), open: None }
    }

    /// A crash: the model loses its unsynced writes (a prefix of them survives with `torn`);
    /// the file system loses unsynced pages as a power failure does.
    pub fn crash(&mut self, rng: &mut sixfive_sim::Rng, torn: bool) {
        match self {
            NodeStorage::Model(m) => m.disk.crash(rng, torn),
            NodeStorage::File { fs, open } => {
                *open = None;
                fs.crash();
            }
        }
    }

    /// Opens the files again after a crash. An injected I/O error is returned (the node
    /// cannot start now); corruption after a crash is a bug and panics.
    pub fn reopen(&mut self) -> Result<(), String> {
        if let NodeStorage::File { fs, open } = self
            && open.is_none()
        {
            match FileStorage::open_with(fs.clone(), FILE_DIR) {
                Ok(s) => *open = Some(s.with_rewrite_slack(16 << 10)),
                Err(e @ sixfive_storage::StorageError::Corrupt { .. }) => {
                    panic!("storage refused to open after a crash: {e}")
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// The state that is certainly durable, when the storage can tell (the model can).
    pub fn durable(&self) -> Option<&RaftDisk> {
        match self {
            NodeStorage::Model(m) => Some(m.disk.durable()),
            NodeStorage::File { .. } => None,
        }
    }

    /// Syncs so far.
    pub fn syncs(&self) -> u64 {
        match self {
            NodeStorage::Model(m) => m.disk.syncs(),
            NodeStorage::File { fs, .. } => fs.stats().syncs,
        }
    }

    /// Bytes of the snapshot.
    pub fn snapshot_bytes(&self) -> usize {
        match self {
            NodeStorage::Model(m) => m.disk.read().snapshot_bytes(),
            NodeStorage::File { open, .. } => open.as_ref().map_or(0, |s| s.snapshot_file_bytes() as usize),
        }
    }

    /// The simulated file system, if this is file storage.
    pub fn fs(&self) -> Option<&SimFs> {
        match self {
            NodeStorage::Model(_) => None,
            NodeStorage::File { fs, .. } => Some(fs),
        }
    }

    fn open_file(&mut self) -> Result<&mut FileStorage<SimFs>, String> {
        match self {
            NodeStorage::File { open: Some(s), .. } => Ok(s),
            NodeStorage::File { open: None, .. } => Err("storage not open".into()),
            NodeStorage::Model(_) => unreachable!("model storage"),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            NodeStorage::Model($m) => Ok($e.expect("infallible")),
            _ => {
                let $m = $self.open_file()?;
                $e.map_err(|e| e.to_string())
            }
        }
    };
}

impl Storage for NodeStorage {
    type Error = String;

    fn initial_state(&self) -> Result<RestoredState, String> {
        match self {
            NodeStorage::Model(m) => Ok(m.initial_state().expect("infallible")),
            NodeStorage::File { open: Some(s), .. } => s.initial_state().map_err(|e| e.to_string()),
            NodeStorage::File { open: None, .. } => Err("storage not open".into()),
        }
    }
    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), String> {
        delegate!(self, s => s.save_hard_state(hs))
    }
    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        delegate!(self, s => s.append(entries))
    }
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        delegate!(self, s => s.save_snapshot(snapshot))
    }
    fn sync(&mut self) -> Result<(), String> {
        delegate!(self, s => s.sync())
    }
    fn raft_state_bytes(&self) -> usize {
        match self {
            NodeStorage::Model(m) => m.raft_state_bytes(),
            NodeStorage::File { open, .. } => open.as_ref().map_or(0, |s| s.raft_state_bytes()),
        }
    }
}
