//! Raft storage on a simulated disk that loses unsynced writes on a crash.

use serde::Serialize;
use sixfive_raft::{Entry, HardState, RestoredState, Snapshot, Storage};
use sixfive_sim::{Disk, DiskOp};

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
