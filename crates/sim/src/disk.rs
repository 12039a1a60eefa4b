//! A disk that loses unsynced writes on a crash.

use crate::Rng;

/// One write to a [`Disk`]: applying it changes the stored state. Each op is atomic.
pub trait DiskOp<S> {
    /// Applies the write.
    fn apply(&self, state: &mut S);
}

/// A simulated disk holding a state `S`.
///
/// Reads see every write (as through an OS page cache). Only synced writes survive a crash,
/// plus, when the crash tears, a random prefix of the unsynced ones (writes reach the platter in
/// order). Invariant: `current` == `durable` with every op of `unsynced` applied in order.
#[derive(Clone, Debug)]
pub struct Disk<S, O> {
    durable: S,
    current: S,
    unsynced: Vec<O>,
    syncs: u64,
}

impl<S: Clone + Default, O: DiskOp<S>> Default for Disk<S, O> {
    fn default() -> Self {
        Disk { durable: S::default(), current: S::default(), unsynced: Vec::new(), syncs: 0 }
    }
}

impl<S: Clone, O: DiskOp<S>> Disk<S, O> {
    /// What a reader sees now.
    pub fn read(&self) -> &S {
        &self.current
    }

    /// What is certainly durable.
    pub fn durable(&self) -> &S {
        &self.durable
    }

    /// Writes (not yet durable).
    pub fn write(&mut self, op: O) {
        op.apply(&mut self.current);
        self.unsynced.push(op);
    }

    /// Makes every write so far durable.
    pub fn sync(&mut self) {
        for op in self.unsynced.drain(..) {
            op.apply(&mut self.durable);
        }
        self.syncs += 1;
    }

    /// Number of `sync` calls.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Number of writes waiting for a sync.
    pub fn unsynced_len(&self) -> usize {
        self.unsynced.len()
    }

    /// A power failure: unsynced writes are lost; with `torn`, a random prefix of them survives.
    pub fn crash(&mut self, rng: &mut Rng, torn: bool) {
        let keep = if torn { rng.below(self.unsynced.len() as u64 + 1) as usize } else { 0 };
        for op in self.unsynced.drain(..).take(keep) {
            op.apply(&mut self.durable);
        }
        self.current = self.durable.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Push(u32);
    impl DiskOp<Vec<u32>> for Push {
        fn apply(&self, s: &mut Vec<u32>) {
            s.push(self.0)
        }
    }

    #[test]
    fn crash_loses_unsynced_and_keeps_synced() {
        let mut d: Disk<Vec<u32>, Push> = Disk::default();
        d.write(Push(1));
        d.sync();
        d.write(Push(2));
        assert_eq!(d.read(), &vec![1, 2]);
        d.crash(&mut Rng::new(1), false);
        assert_eq!(d.read(), &vec![1]);
    }

    #[test]
    fn torn_crash_keeps_a_prefix() {
        for seed in 0..50 {
            let mut d: Disk<Vec<u32>, Push> = Disk::default();
            for i in 0..5 {
                d.write(Push(i));
            }
            d.crash(&mut Rng::new(seed), true);
            let got = d.read().clone();
            assert_eq!(got, (0..got.len() as u32).collect::<Vec<_>>(), "a prefix, in order");
            assert_eq!(d.durable(), &got);
        }
    }
}
