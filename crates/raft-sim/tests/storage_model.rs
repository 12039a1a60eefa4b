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
        let slack = rng.range(200, 5000);
        let mut file = FileStorage::open(&dir).unwrap().with_rewrite_slack(slack);
        let mut model = SimStorage::default();
        let mut term = 1;
        for step in 0..300 {
            let st = model.initial_state().unwrap();
            match rng.below(10) {
                0..=7 => {
                    let op = random_op(&mut rng, &st, &mut term, step, 40);
                    apply(&mut file, &op).unwrap();
                    apply(&mut model, &op).unwrap();
                }
                8 => {
                    file.sync().unwrap();
                    model.sync().unwrap();
                }
                _ => {
                    // Clean restart: everything written so far is on disk (process exit keeps
                    // the page cache), so the reopened state must equal the model's.
                    drop(file);
                    file = FileStorage::open(&dir).unwrap().with_rewrite_slack(slack);
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

/// One storage call, applied to both implementations.
#[derive(Clone, Debug)]
enum Op {
    Append(Vec<Entry>),
    HardState(HardState),
    Snapshot(Snapshot),
}

fn apply<S: Storage>(s: &mut S, op: &Op) -> Result<(), S::Error> {
    match op {
        Op::Append(es) => s.append(es),
        Op::HardState(hs) => s.save_hard_state(hs),
        Op::Snapshot(snap) => s.save_snapshot(snap),
    }
}

/// A random call that is valid on `st`, of the shapes a Raft node makes: appends never cut
/// at or below the commit index, the commit index never decreases, snapshots are either a
/// compaction at a committed index or one installed from a leader past the commit index
/// (which drops every entry unless the log holds its last entry).
fn random_op(rng: &mut Rng, st: &sixfive_raft::RestoredState, term: &mut u64, step: u64, data_max: u64) -> Op {
    let base = st.snapshot.as_ref().map_or(0, |s| s.meta.index);
    let last = st.entries.last().map_or(base, |e| e.index);
    let commit = st.hard_state.commit.max(base);
    let held = |i: u64| st.entries.iter().find(|e| e.index == i).map(|e| e.term);
    match rng.below(10) {
        0..=5 => {
            let start = rng.range(commit + 1, last + 1);
            if start <= last && rng.chance(0.5) {
                *term += 1;
            }
            let es = (start..start + rng.range(1, 6))
                .map(|i| Entry {
                    term: *term,
                    index: i,
                    kind: EntryKind::Normal,
                    data: vec![(i % 251) as u8; rng.range(0, data_max) as usize].into(),
                })
                .collect();
            Op::Append(es)
        }
        6..=7 => Op::HardState(HardState { term: *term, vote: Some(rng.range(1, 3)), commit: rng.range(commit, last) }),
        8 if commit > base => {
            let index = rng.range(base + 1, commit);
            let meta = SnapshotMeta { index, term: held(index).expect("held") };
            Op::Snapshot(Snapshot { meta, data: vec![step as u8; 300] })
        }
        9 => {
            let index = rng.range(commit + 1, last + 5);
            let t = match held(index) {
                Some(t) if rng.chance(0.5) => t,
                _ => *term + rng.range(0, 2),
            };
            *term = (*term).max(t);
            Op::Snapshot(Snapshot { meta: SnapshotMeta { index, term: t }, data: vec![step as u8; 300] })
        }
        _ => Op::HardState(HardState { term: *term, vote: None, commit }),
    }
}

/// Power failures on the simulated file system, which loses unsynced pages in any order and
/// may zero-fill grown files: after each crash, FileStorage must reopen (never refuse) and
/// hold exactly the state after some prefix of the calls made since the last sync, never
/// less than what was synced.
#[test]
fn power_loss_keeps_what_was_synced_and_a_prefix_of_the_rest() {
    use sixfive_storage::fs::{SimFs, SimFsConfig};
    sixfive_sim::seeds::run_seeds("power_loss_keeps_what_was_synced_and_a_prefix_of_the_rest", 300, |seed| {
        let mut rng = Rng::new(seed);
        let fs = SimFs::new(rng.fork(), SimFsConfig { zero_fill: rng.chance(0.5), ..Default::default() });
        let dir = "/data/node";
        let slack = rng.range(500, 20_000);
        let mut file = FileStorage::open_with(fs.clone(), dir).unwrap().with_rewrite_slack(slack);
        let mut model = SimStorage::default();
        let mut term = 1;
        // States the disk may legitimately come back with: after the last sync, and after
        // each call since.
        let mut candidates = vec![model.initial_state().unwrap()];
        for step in 0..400 {
            let op = random_op(&mut rng, &model.initial_state().unwrap(), &mut term, step, 3000);
            apply(&mut file, &op).unwrap();
            apply(&mut model, &op).unwrap();
            candidates.push(model.initial_state().unwrap());
            if rng.chance(0.3) {
                file.sync().unwrap();
                model.sync().unwrap();
                candidates = vec![model.initial_state().unwrap()];
            }
            if rng.chance(0.05) {
                drop(file);
                fs.crash();
                file = FileStorage::open_with(fs.clone(), dir)
                    .unwrap_or_else(|e| panic!("SEED={seed} step {step}: refused after a power loss: {e}"))
                    .with_rewrite_slack(slack);
                let got = file.initial_state().unwrap();
                let brief = |st: &sixfive_raft::RestoredState| {
                    format!(
                        "hs {:?} snap {:?} entries {:?}",
                        st.hard_state,
                        st.snapshot.as_ref().map(|s| s.meta),
                        st.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>()
                    )
                };
                let k = candidates.iter().position(|c| *c == got).unwrap_or_else(|| {
                    for c in &candidates {
                        eprintln!("candidate: {}", brief(c));
                    }
                    eprintln!("got:       {}", brief(&got));
                    panic!(
                        "SEED={seed} step {step}: recovered a state that is no prefix of the calls made \
                         ({} candidates)",
                        candidates.len()
                    )
                });
                // Continue from what the disk holds.
                model = SimStorage::default();
                let st = &candidates[k];
                if let Some(s) = &st.snapshot {
                    model.save_snapshot(s).unwrap();
                }
                model.append(&st.entries).unwrap();
                model.save_hard_state(&st.hard_state).unwrap();
                model.sync().unwrap();
                assert_eq!(model.initial_state().unwrap(), got);
                term = term.max(got.hard_state.term).max(got.entries.last().map_or(0, |e| e.term));
                candidates = vec![got];
            }
        }
    });
}
