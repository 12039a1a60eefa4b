//! What the core's test suites share.
#![allow(dead_code)]

use sixfive_raft::*;

/// Stable storage in memory: every write is durable at once (a crash is modelled by not
/// writing a `Ready` at all).
#[derive(Default)]
pub struct Mem(pub RestoredState);

impl Storage for Mem {
    type Error = ();
    fn initial_state(&self) -> Result<RestoredState, ()> {
        Ok(self.0.clone())
    }
    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), ()> {
        self.0.hard_state = *hs;
        Ok(())
    }
    fn append(&mut self, es: &[Entry]) -> Result<(), ()> {
        self.0.entries.retain(|e| e.index < es[0].index);
        self.0.entries.extend_from_slice(es);
        Ok(())
    }
    fn save_snapshot(&mut self, s: &Snapshot) -> Result<(), ()> {
        self.0.entries.retain(|e| e.index > s.meta.index);
        self.0.snapshot = Some(s.clone());
        Ok(())
    }
    fn sync(&mut self) -> Result<(), ()> {
        Ok(())
    }
    fn raft_state_bytes(&self) -> usize {
        self.0.entries.iter().map(|e| e.data.len() + 24).sum()
    }
}
