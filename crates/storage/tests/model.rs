//! Model-based: random sequences of storage calls give the same state on FileStorage (after
//! reopening its files at random points) as on the simulator's in-memory storage.

use sixfive_raft::{Entry, EntryKind, HardState, Snapshot, SnapshotMeta, Storage};
use sixfive_raft_sim::SimStorage;
use sixfive_sim::Rng;
use sixfive_storage::FileStorage;

#[test]
fn file_storage_agrees_with_the_in_memory_model() {
    for seed in 0..40u64 {
        let mut rng = Rng::new(seed);
        let dir = std::env::temp_dir().join(format!("sixfive-storage-model-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut file = FileStorage::open(&dir).unwrap().with_rewrite_slack(rng.range(200, 5000));
        let mut model = SimStorage::default();
        let mut term = 1;
        for step in 0..300 {
            let st = model.initial_state().unwrap();
            let base = st.snapshot.as_ref().map_or(0, |s| s.meta.index);
            let last = st.entries.last().map_or(base, |e| e.index);
            match rng.below(10) {
                0..=4 => {
                    // Append, possibly overwriting a suffix with a newer term.
                    let start = rng.range(base + 1, last + 1);
                    if start <= last && rng.chance(0.5) {
                        term += 1;
                    }
                    let es: Vec<Entry> = (start..start + rng.range(1, 6))
                        .map(|i| Entry {
                            term,
                            index: i,
                            kind: EntryKind::Normal,
                            data: vec![(i % 251) as u8; rng.range(0, 40) as usize],
                        })
                        .collect();
                    file.append(&es).unwrap();
                    model.append(&es).unwrap();
                }
                5..=6 => {
                    let hs = HardState { term, vote: Some(rng.range(1, 3)), commit: rng.range(0, last) };
                    file.save_hard_state(&hs).unwrap();
                    model.save_hard_state(&hs).unwrap();
                }
                7 if last > base => {
                    // A snapshot at a held index (its term), or one from a leader the log
                    // does not match (another term): both shapes the trait allows.
                    let index = rng.range(base + 1, last);
                    let held = st.entries.iter().find(|e| e.index == index).map(|e| e.term).unwrap();
                    let t = if rng.chance(0.8) { held } else { held + 100 };
                    let snap = Snapshot { meta: SnapshotMeta { index, term: t }, data: vec![step as u8; 30] };
                    file.save_snapshot(&snap).unwrap();
                    model.save_snapshot(&snap).unwrap();
                }
                8 => {
                    file.sync().unwrap();
                    model.sync().unwrap();
                }
                _ => {
                    // Clean restart: everything written so far is on disk (process exit keeps
                    // the page cache), so the reopened state must equal the model's.
                    drop(file);
                    file = FileStorage::open(&dir).unwrap();
                }
            }
            assert_eq!(file.initial_state().unwrap(), model.initial_state().unwrap(), "seed {seed} step {step}");
            assert!(file.raft_state_bytes() > 0);
        }
        drop(file);
        let reopened = FileStorage::open(&dir).unwrap().initial_state().unwrap();
        assert_eq!(reopened, model.initial_state().unwrap(), "seed {seed}: after the last reopen");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
