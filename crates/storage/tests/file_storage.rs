//! FileStorage: what is synced survives a crash, what is torn is dropped, what is corrupt is
//! refused, and a Raft node restarts from it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sixfive_raft::{Config, Entry, EntryKind, HardState, RawNode, Snapshot, SnapshotMeta, Storage, persist_ready};
use sixfive_storage::fs::{Fs, Garbage, OsFs};
use sixfive_storage::{FileStorage, StorageError};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sixfive-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn entry(index: u64, term: u64) -> Entry {
    Entry { term, index, kind: EntryKind::Normal, data: format!("cmd-{index}-{term}").into_bytes().into() }
}

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..=hi).map(|i| entry(i, term)).collect()
}

#[test]
fn state_round_trips_through_reopen() {
    let d = dir("roundtrip");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 10, 1)).unwrap();
    s.save_hard_state(&HardState { term: 2, vote: Some(3), commit: 4 }).unwrap();
    s.append(&entries(6, 8, 2)).unwrap(); // conflict: replaces 6..=10
    s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 4, term: 1 }, data: b"image".to_vec() }).unwrap();
    s.sync().unwrap();
    let before = s.initial_state().unwrap();
    drop(s);
    let after = FileStorage::open(&d).unwrap().initial_state().unwrap();
    assert_eq!(before, after);
    assert_eq!(after.hard_state, HardState { term: 2, vote: Some(3), commit: 4 });
    assert_eq!(
        after.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
        vec![(5, 1), (6, 2), (7, 2), (8, 2)]
    );
    assert_eq!(after.snapshot.unwrap().data, b"image");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn torn_last_record_is_dropped_at_every_cut() {
    let d = dir("torn");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 5, 1)).unwrap();
    s.sync().unwrap();
    let synced = s.log_file_bytes();
    s.append(&entries(6, 6, 1)).unwrap();
    let written = s.log_file_bytes();
    s.sync().unwrap(); // appends a sync mark after the record
    let full = s.log_file_bytes();
    assert!(full > written, "a sync mark follows a sync");
    drop(s);
    let log = d.join("raft.log");
    let bytes = std::fs::read(&log).unwrap();
    for cut in synced..full {
        std::fs::write(&log, &bytes[..cut as usize]).unwrap();
        let st = FileStorage::open(&d).unwrap().initial_state().unwrap();
        let (want_entries, want_len) = if cut < written { (5, synced) } else { (6, written) };
        assert_eq!(st.entries.len(), want_entries, "a write torn at byte {cut} must vanish whole");
        // Opening marks what it read as synced, so compare only the part before that mark.
        assert!(std::fs::metadata(&log).unwrap().len() >= want_len, "the torn tail is cut off");
        let reread = std::fs::read(&log).unwrap();
        assert_eq!(&reread[..want_len as usize], &bytes[..want_len as usize]);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_zero_filled_tail_is_torn_not_corrupt() {
    // ext4 writeback / XFS: the file grew, its blocks were never written, and read as zeros.
    let d = dir("zeros");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 5, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 5 }).unwrap();
    s.sync().unwrap();
    let before = s.initial_state().unwrap();
    let len = s.log_file_bytes();
    drop(s);
    let log = d.join("raft.log");
    for zeros in [1usize, 7, 8, 9, 4096, 10_000] {
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.truncate(len as usize);
        bytes.resize(len as usize + zeros, 0);
        std::fs::write(&log, &bytes).unwrap();
        let s = FileStorage::open(&d).unwrap_or_else(|e| panic!("{zeros} zero bytes refused: {e}"));
        assert_eq!(s.initial_state().unwrap(), before);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Byte offsets of the frames in a log file (walking the length fields).
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        out.push(off);
        off += 8 + u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
    }
    out
}

#[test]
fn an_unsynced_record_lost_before_a_later_one_is_a_torn_tail() {
    // One Ready writes several records before one sync; the crash kept a later record's page
    // but not an earlier one's.
    let d = dir("pages");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    s.sync().unwrap();
    let synced = s.log_file_bytes() as usize;
    let before = s.initial_state().unwrap();
    s.append(&entries(4, 6, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 6 }).unwrap();
    drop(s); // never synced
    let log = d.join("raft.log");
    let mut bytes = std::fs::read(&log).unwrap();
    for b in &mut bytes[synced + 8..synced + 20] {
        *b = 0; // the entries' page never made it; the hard state's did
    }
    std::fs::write(&log, &bytes).unwrap();
    let s = FileStorage::open(&d).expect("a torn tail, not corruption");
    assert_eq!(s.initial_state().unwrap(), before);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn corruption_of_synced_data_is_refused() {
    let d = dir("corrupt");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    s.append(&entries(4, 6, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    let log = d.join("raft.log");
    let pristine = std::fs::read(&log).unwrap();
    let frames = frame_offsets(&pristine);
    // Damage each record of the synced batch in turn, even the last one before the sync mark.
    for &victim in &frames[1..3] {
        let mut bytes = pristine.clone();
        bytes[victim + 10] ^= 0xFF;
        std::fs::write(&log, &bytes).unwrap();
        match FileStorage::open(&d) {
            Err(StorageError::Corrupt { offset, path, .. }) => {
                assert_eq!(offset, victim as u64);
                assert!(path.ends_with("raft.log"));
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a log whose synced record at byte {victim} is damaged"),
        }
        assert_eq!(std::fs::read(&log).unwrap(), bytes, "a refused log is left as it was");
    }
    // A damaged snapshot file is refused too.
    let d2 = dir("corrupt-snap");
    let mut s = FileStorage::open(&d2).unwrap();
    s.append(&entries(1, 2, 1)).unwrap();
    s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 2, term: 1 }, data: vec![7; 100] }).unwrap();
    drop(s);
    let snap = d2.join("raft.snapshot");
    let mut b = std::fs::read(&snap).unwrap();
    b[50] ^= 1;
    std::fs::write(&snap, &b).unwrap();
    let err = FileStorage::open(&d2).err().expect("refused");
    assert!(err.to_string().contains("raft.snapshot") && err.to_string().contains("checksum"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&d2).unwrap();
}

#[test]
fn a_sync_run_on_another_thread_vouches_only_for_what_was_written_before_it_started() {
    let d = dir("sync-elsewhere");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    let job = s.start_sync().unwrap().expect("the OS file system syncs from any thread");
    let covered = s.log_file_bytes() as usize;
    s.append(&entries(4, 6, 1)).unwrap(); // written while the sync runs
    let result = std::thread::spawn(job).join().unwrap();
    s.finish_sync(result).unwrap();
    let all = s.initial_state().unwrap();
    drop(s);
    let log = d.join("raft.log");
    let pristine = std::fs::read(&log).unwrap();
    let frames = frame_offsets(&pristine);
    let at = frames.iter().position(|&f| f == covered).expect("entries 4-6 start where the sync started");
    let (first, later) = (frames[at - 1], frames[at]); // entries 1-3, entries 4-6
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), all);
    // The mark after entries 4-6 vouches for entries 1-3: damage there is corruption.
    let mut bytes = pristine.clone();
    bytes[first + 10] ^= 0xFF;
    std::fs::write(&log, &bytes).unwrap();
    match FileStorage::open(&d) {
        Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, first as u64),
        other => panic!("damage to synced entries must be refused, got {:?}", other.map(|_| ())),
    }
    // Entries 4-6 were written after the sync started: lost pages there are a torn tail.
    let mut bytes = pristine.clone();
    bytes[later + 10] ^= 0xFF;
    std::fs::write(&log, &bytes).unwrap();
    let s = FileStorage::open(&d).expect("a torn tail, not corruption");
    assert_eq!(s.initial_state().unwrap().entries, entries(1, 3, 1));
    drop(s);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_sync_that_failed_on_another_thread_poisons_the_storage() {
    let d = dir("sync-elsewhere-fails");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    let _job = s.start_sync().unwrap().expect("the OS file system syncs from any thread");
    let failed = StorageError::Io { what: "syncing", path: d.join("raft.log"), source: std::io::Error::other("EIO") };
    assert!(matches!(s.finish_sync(Err(failed)), Err(StorageError::Io { .. })));
    assert!(matches!(s.append(&entries(4, 4, 1)), Err(StorageError::Poisoned(_))));
    assert!(matches!(s.sync(), Err(StorageError::Poisoned(_))), "a failed sync is never retried");
    drop(s);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_hole_is_refused_and_changes_nothing() {
    let d = dir("hole");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    let size = s.log_file_bytes();
    assert!(matches!(s.append(&entries(5, 6, 1)), Err(StorageError::Invalid(_))));
    assert_eq!(s.log_file_bytes(), size);
    assert_eq!(s.initial_state().unwrap().entries.len(), 3);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_snapshot_written_on_another_thread_is_in_effect_only_once_installed() {
    let d = dir("written");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 8, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 6 }).unwrap();
    s.sync().unwrap();
    let snap = std::sync::Arc::new(Snapshot { meta: SnapshotMeta { index: 5, term: 1 }, data: vec![7; 300] });
    let write = s.snapshot_writer().expect("the OS file system writes on other threads");
    let written = snap.clone();
    std::thread::spawn(move || write(&written)).join().unwrap().unwrap();
    // The log goes on meanwhile.
    s.append(&entries(9, 9, 1)).unwrap();
    let before = s.initial_state().unwrap();
    assert!(before.snapshot.is_none(), "nothing in effect before the install");
    // A crash now: the written file means nothing.
    drop(s);
    let reopened = FileStorage::open(&d).unwrap();
    assert_eq!(reopened.initial_state().unwrap(), before, "a crash before the install loses nothing");
    drop(reopened);

    let mut s = FileStorage::open(&d).unwrap();
    let write = s.snapshot_writer().unwrap();
    write(&snap).unwrap();
    s.install_written_snapshot(snap.clone()).unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.snapshot.as_ref(), Some(&*snap));
    assert_eq!(st.entries.iter().map(|e| e.index).collect::<Vec<_>>(), (6..=9).collect::<Vec<_>>());
    assert_eq!(s.snapshot_file_bytes(), std::fs::metadata(d.join("raft.snapshot")).unwrap().len());
    assert!(!d.join("raft.snapshot.next").exists(), "renamed into place");
    drop(s);
    // Installed means durable, the entries after it too.
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), st);

    // One at or below the snapshot held is refused and changes nothing.
    let mut s = FileStorage::open(&d).unwrap();
    let write = s.snapshot_writer().unwrap();
    let old = std::sync::Arc::new(Snapshot { meta: SnapshotMeta { index: 5, term: 1 }, data: vec![1; 10] });
    write(&old).unwrap();
    assert!(matches!(s.install_written_snapshot(old), Err(StorageError::Invalid(_))));
    assert_eq!(s.initial_state().unwrap(), st);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn snapshot_renamed_before_its_mark_is_logged() {
    // Crash between the snapshot file's rename and the log record marking it.
    let d = dir("snapwindow");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 8, 1)).unwrap();
    s.sync().unwrap();
    let before_mark = s.log_file_bytes();
    s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 5, term: 1 }, data: b"s".to_vec() }).unwrap();
    drop(s);
    let log = d.join("raft.log");
    let bytes = std::fs::read(&log).unwrap();
    std::fs::write(&log, &bytes[..before_mark as usize]).unwrap();
    let st = FileStorage::open(&d).unwrap().initial_state().unwrap();
    assert_eq!(st.snapshot.unwrap().meta.index, 5);
    assert_eq!(st.entries.first().unwrap().index, 6, "entries the snapshot covers are dropped");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn log_is_rewritten_and_stays_bounded() {
    let d = dir("rewrite");
    let mut s = FileStorage::open(&d).unwrap().with_rewrite_slack(4096);
    let mut last = 0;
    for round in 0..50u64 {
        let lo = last + 1;
        last += 20;
        s.append(&entries(lo, last, 1)).unwrap();
        s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: last }).unwrap();
        s.save_snapshot(&Snapshot {
            meta: SnapshotMeta { index: last - 5, term: 1 },
            data: round.to_le_bytes().to_vec(),
        })
        .unwrap();
        s.sync().unwrap();
        s.finish_rewrite().unwrap();
        assert!(s.log_file_bytes() < 4096 + 2048, "log file grew to {} bytes", s.log_file_bytes());
    }
    assert!(s.log_rewrites() >= 4, "{} rewrites", s.log_rewrites());
    let before = s.initial_state().unwrap();
    drop(s);
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), before);
    assert_eq!(before.entries.len(), 5);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn raft_node_restarts_from_disk() {
    let d = dir("raftnode");
    let mut st = FileStorage::open(&d).unwrap();
    let mut node = RawNode::new(Config::new(1, vec![1])).unwrap();
    node.campaign();
    for i in 0..20u8 {
        node.propose(vec![i]).unwrap();
        while node.has_ready() {
            let rd = node.ready();
            persist_ready(&mut st, &rd).unwrap();
            node.advance(&rd);
        }
    }
    let snap = node.compact(10, b"state at 10".to_vec()).unwrap();
    st.save_snapshot(&snap).unwrap();
    st.sync().unwrap();
    let before = node.status();
    drop(st);
    let restored = FileStorage::open(&d).unwrap().initial_state().unwrap();
    let again = RawNode::restart(Config::new(1, vec![1]), restored).unwrap();
    let after = again.status();
    assert_eq!(
        (after.term, after.vote, after.commit, after.last_index),
        (before.term, before.vote, before.commit, before.last_index)
    );
    assert_eq!(after.snapshot_index, 10);
    assert_eq!(again.log().entry(21).unwrap().data, vec![19]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The writer run in a child process by `acknowledged_entries_survive_kill_9`: appends an
/// entry and a commit index, syncs, then acknowledges on stdout, forever.
#[test]
#[ignore = "run as a child process by acknowledged_entries_survive_kill_9"]
fn kill_9_child_writer() {
    let Ok(d) = std::env::var("SIXFIVE_STORAGE_CHILD_DIR") else { return };
    let mut s = FileStorage::open(&d).unwrap().with_rewrite_slack(64 << 10);
    let mut i = s.initial_state().unwrap().entries.last().map_or(0, |e| e.index);
    loop {
        i += 1;
        s.append(&[entry(i, 1)]).unwrap();
        s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: i }).unwrap();
        if i.is_multiple_of(97) {
            s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: i - 10, term: 1 }, data: vec![1; 300] }).unwrap();
        }
        s.sync().unwrap();
        println!("ACK {i}");
    }
}

fn check_survivors(d: &Path, acked: u64) {
    let st = FileStorage::open(d).expect("opens after kill -9").initial_state().unwrap();
    let base = st.snapshot.as_ref().map_or(0, |s| s.meta.index);
    let last = st.entries.last().map_or(base, |e| e.index);
    assert!(last >= acked, "acknowledged entry {acked} lost (log ends at {last})");
    assert!(st.hard_state.commit >= acked, "acknowledged commit {acked} lost");
    for (k, e) in st.entries.iter().enumerate() {
        assert_eq!(e.index, base + 1 + k as u64, "hole in the recovered log");
        assert_eq!(e, &entry(e.index, 1), "entry {} damaged", e.index);
    }
}

#[test]
fn acknowledged_entries_survive_kill_9() {
    let d = dir("kill9");
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0u64;
    for round in 0..5u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill_9_child_writer", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("SIXFIVE_STORAGE_CHILD_DIR", &d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it write a varying amount, then kill it without warning.
        let target = 200 + round * 173;
        let mut seen = 0;
        for line in lines.by_ref() {
            if let Some(n) = line.unwrap().strip_prefix("ACK ") {
                acked = n.parse().unwrap();
                seen += 1;
                if seen >= target {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(seen >= target, "the writer stopped early");
        check_survivors(&d, acked);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

mod on_a_simulated_disk {
    use sixfive_raft::{HardState, Storage};
    use sixfive_sim::Rng;
    use sixfive_storage::fs::{SimFs, SimFsConfig};
    use sixfive_storage::{FileStorage, StorageError};

    use super::entries;

    fn failing(fs: &SimFs, on: bool) {
        fs.set_config(SimFsConfig { fail_rate: if on { 1.0 } else { 0.0 }, ..Default::default() });
    }

    #[test]
    fn a_failed_fsync_poisons_and_is_never_retried() {
        let fs = SimFs::new(Rng::new(7), SimFsConfig::default());
        let mut s = FileStorage::open_with(fs.clone(), "/data/n1").unwrap();
        s.append(&entries(1, 3, 1)).unwrap();
        s.sync().unwrap();
        s.append(&entries(4, 6, 1)).unwrap();
        failing(&fs, true);
        let err = s.sync().unwrap_err();
        assert!(matches!(err, StorageError::Io { what: "syncing", .. }), "{err}");
        failing(&fs, false);
        // The disk works again, but what the failed fsync dropped is gone: no call succeeds.
        assert!(matches!(s.sync(), Err(StorageError::Poisoned(_))));
        assert!(matches!(s.append(&entries(7, 7, 1)), Err(StorageError::Poisoned(_))));
        assert!(matches!(
            s.save_hard_state(&HardState { term: 1, vote: None, commit: 3 }),
            Err(StorageError::Poisoned(_))
        ));
        assert!(s.poisoned().unwrap().contains("fsync"), "{:?}", s.poisoned());
        // A restart re-reads what is really on disk: the synced entries, at least.
        drop(s);
        fs.crash();
        let st = FileStorage::open_with(fs.clone(), "/data/n1").unwrap().initial_state().unwrap();
        assert!(st.entries.len() >= 3 && st.entries[..3] == entries(1, 3, 1)[..]);
    }

    #[test]
    fn a_failed_or_short_write_poisons() {
        for seed in 0..20 {
            let fs = SimFs::new(Rng::new(seed), SimFsConfig::default());
            let mut s = FileStorage::open_with(fs.clone(), "/data/n1").unwrap();
            s.append(&entries(1, 3, 1)).unwrap();
            s.sync().unwrap();
            failing(&fs, true);
            assert!(matches!(s.append(&entries(4, 40, 1)), Err(StorageError::Io { .. })));
            failing(&fs, false);
            assert!(matches!(s.append(&entries(4, 4, 1)), Err(StorageError::Poisoned(_))));
            drop(s);
            // Without a crash the short write is still in the file: a torn tail, cut off.
            let st = FileStorage::open_with(fs.clone(), "/data/n1").unwrap().initial_state().unwrap();
            assert_eq!(st.entries, entries(1, 3, 1));
        }
    }

    #[test]
    fn an_open_that_failed_halfway_leaves_nothing_fragile() {
        // Start-up dies on an injected I/O error, possibly between creating a file or
        // directory and syncing its parent; the next start must make those names durable.
        for seed in 0..200 {
            let fs = SimFs::new(Rng::new(seed), SimFsConfig { fail_rate: 0.3, ..Default::default() });
            let mut opened = None;
            for _ in 0..100 {
                if let Ok(s) = FileStorage::open_with(fs.clone(), "/n1") {
                    opened = Some(s);
                    break;
                }
            }
            let mut s = opened.expect("opens eventually");
            fs.set_config(SimFsConfig::default());
            s.append(&entries(1, 2, 1)).unwrap();
            s.sync().unwrap();
            drop(s);
            fs.crash();
            let st = FileStorage::open_with(fs.clone(), "/n1").unwrap().initial_state().unwrap();
            assert_eq!(st.entries, entries(1, 2, 1), "seed {seed}: synced entries lost");
        }
    }

    fn big(lo: u64, hi: u64) -> Vec<sixfive_raft::Entry> {
        (lo..=hi)
            .map(|i| sixfive_raft::Entry {
                term: 1,
                index: i,
                kind: sixfive_raft::EntryKind::Normal,
                data: vec![(i % 251) as u8; 5000].into(),
            })
            .collect()
    }

    #[test]
    fn a_restart_after_a_failed_fsync_reads_the_disk_not_the_page_cache() {
        // fsyncgate, second half: the node stops after the failed fsync and is restarted
        // (no power loss). The failed writeback left 4..6 in the page cache marked clean,
        // never written; open must not vouch for them.
        for seed in 0..20 {
            let fs = SimFs::new(Rng::new(seed), SimFsConfig::default());
            let mut s = FileStorage::open_with(fs.clone(), "/d").unwrap();
            s.append(&big(1, 3)).unwrap();
            s.sync().unwrap();
            s.append(&big(4, 6)).unwrap();
            failing(&fs, true);
            assert!(s.sync().is_err());
            failing(&fs, false);
            drop(s);
            let mut s = FileStorage::open_with(fs.clone(), "/d").unwrap();
            let n = s.initial_state().unwrap().entries.len() as u64;
            assert!(n >= 3, "seed {seed}: synced entries lost");
            s.append(&big(n + 1, n + 1)).unwrap();
            s.sync().unwrap(); // acknowledged: 1..=n+1
            drop(s);
            fs.crash();
            let st = FileStorage::open_with(fs.clone(), "/d")
                .unwrap_or_else(|e| panic!("seed {seed}: refused after a power loss: {e}"))
                .initial_state()
                .unwrap();
            assert_eq!(st.entries.len() as u64, n + 1, "seed {seed}: acknowledged entries lost");
        }
    }

    #[test]
    fn an_older_snapshot_is_refused_and_changes_nothing() {
        let fs = SimFs::new(Rng::new(1), SimFsConfig::default());
        let mut s = FileStorage::open_with(fs.clone(), "/d").unwrap();
        s.append(&entries(1, 10, 1)).unwrap();
        s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 10 }).unwrap();
        let snap = |index, data: &[u8]| sixfive_raft::Snapshot {
            meta: sixfive_raft::SnapshotMeta { index, term: 1 },
            data: data.to_vec(),
        };
        s.save_snapshot(&snap(5, b"five")).unwrap();
        let before = s.initial_state().unwrap();
        assert!(matches!(s.save_snapshot(&snap(3, b"three")), Err(StorageError::Invalid(_))));
        assert_eq!(s.initial_state().unwrap(), before);
        // A snapshot that disagrees with committed entries is refused too.
        let other = sixfive_raft::Snapshot { meta: sixfive_raft::SnapshotMeta { index: 8, term: 9 }, data: vec![] };
        assert!(matches!(s.save_snapshot(&other), Err(StorageError::Invalid(_))));
        s.sync().unwrap();
        drop(s);
        assert_eq!(FileStorage::open_with(fs.clone(), "/d").unwrap().initial_state().unwrap(), before);
    }

    #[test]
    fn every_directory_on_the_way_is_made_durable() {
        use sixfive_storage::fs::Fs;
        for seed in 0..40 {
            let fs = SimFs::new(Rng::new(seed), SimFsConfig::default());
            fs.create_dir_all(std::path::Path::new("/var/lib/sixfive/n1")).unwrap(); // an operator's mkdir -p
            let mut s = FileStorage::open_with(fs.clone(), "/var/lib/sixfive/n1").unwrap();
            s.save_hard_state(&HardState { term: 3, vote: Some(2), commit: 0 }).unwrap();
            s.sync().unwrap();
            drop(s);
            fs.crash();
            let st = FileStorage::open_with(fs.clone(), "/var/lib/sixfive/n1").unwrap().initial_state().unwrap();
            assert_eq!(st.hard_state.vote, Some(2), "seed {seed}: the synced vote was forgotten");
        }
    }

    #[test]
    fn unsynced_appends_may_survive_whole_or_in_part() {
        use sixfive_storage::fs::{Fs, FsFile};
        use std::path::Path;
        for zero_fill in [false, true] {
            let (mut some_survived, mut intermediate_len) = (false, false);
            for seed in 0..200 {
                let f = SimFs::new(Rng::new(seed), SimFsConfig { zero_fill, ..Default::default() });
                f.create_dir_all(Path::new("/d")).unwrap();
                f.sync_dir(Path::new("/")).unwrap();
                let mut h = f.open_append(Path::new("/d/log")).unwrap();
                f.sync_dir(Path::new("/d")).unwrap();
                h.append(&[1; 100]).unwrap();
                h.sync().unwrap();
                h.append(&[2; 3 * 4096]).unwrap();
                f.crash();
                let got = f.read(Path::new("/d/log")).unwrap();
                assert_eq!(got[..100], [1; 100]);
                some_survived |= got.contains(&2);
                intermediate_len |= got.len() != 100 && got.len() != 100 + 3 * 4096;
            }
            assert!(some_survived && intermediate_len, "zero_fill {zero_fill}");
        }
    }

    #[test]
    fn the_log_survives_power_loss_before_any_snapshot() {
        // Before the first snapshot no rename ever synced the directory: the log's own
        // creation must have.
        for seed in 0..50 {
            let fs = SimFs::new(Rng::new(seed), SimFsConfig::default());
            let mut s = FileStorage::open_with(fs.clone(), "/var/lib/sixfive/n1").unwrap();
            s.append(&entries(1, 1, 1)).unwrap();
            s.save_hard_state(&HardState { term: 1, vote: Some(2), commit: 0 }).unwrap();
            s.sync().unwrap();
            drop(s);
            fs.crash();
            let st = FileStorage::open_with(fs.clone(), "/var/lib/sixfive/n1").unwrap().initial_state().unwrap();
            assert_eq!(st.hard_state.vote, Some(2), "seed {seed}: the vote was forgotten");
        }
    }
}

/// Bytes shaped like a sync mark inside a client's value (without the file's secret nonce)
/// must not turn a legitimate torn tail into "corruption".
#[test]
fn a_sync_mark_planted_in_a_payload_does_not_count() {
    let d = dir("forge");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&[Entry { term: 1, index: 1, kind: EntryKind::Normal, data: vec![1; 10].into() }]).unwrap();
    s.sync().unwrap();
    let synced = s.log_file_bytes() as usize;
    s.append(&[Entry { term: 1, index: 2, kind: EntryKind::Normal, data: vec![2; 3 * 4096].into() }]).unwrap();
    // Entry 3 carries, for every guess of a nonce a client might try, a well-formed mark for
    // the offset where its data lands.
    let p = s.log_file_bytes();
    let n = 64;
    let probe = Entry { term: 1, index: 3, kind: EntryKind::Normal, data: vec![0; n].into() };
    let payload_len = 1 + postcard::to_allocvec(&vec![probe]).unwrap().len();
    let q = p + 8 + (payload_len - n) as u64;
    let guess = 0u64;
    let mut m = 0x7369_7866_6976_6573u64.to_le_bytes().to_vec();
    m.extend_from_slice(&guess.to_le_bytes());
    m.extend_from_slice(&q.to_le_bytes());
    let mark = postcard::to_allocvec(&(4u32, q, guess, crc32c::crc32c(&m))).unwrap();
    let mut data = (mark.len() as u32).to_le_bytes().to_vec();
    data.extend_from_slice(&[0xAB; 4]);
    data.extend_from_slice(&mark);
    data.resize(n, 0);
    s.append(&[Entry { term: 1, index: 3, kind: EntryKind::Normal, data: data.into() }]).unwrap();
    drop(s); // never synced
    // Power loss: one page inside entry 2 never reached the disk; the rest did.
    let log = d.join("raft.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let page = (synced / 4096 + 1) * 4096;
    bytes[page..page + 4096].fill(0);
    std::fs::write(&log, &bytes).unwrap();
    let st = FileStorage::open(&d).expect("a torn unsynced tail, not corruption").initial_state().unwrap();
    assert_eq!(st.entries.len(), 1);
    std::fs::remove_dir_all(&d).unwrap();
}

/// One release: whether a replaced log file came with it, the indices of the entries, and the
/// index of the superseded snapshot.
type Released = (usize, Vec<u64>, Option<u64>);

/// The operating system's file system, recording what the storage releases.
#[derive(Clone, Default)]
struct Releasing {
    released: std::sync::Arc<std::sync::Mutex<Vec<Released>>>,
}

impl Fs for Releasing {
    type File = sixfive_storage::fs::OsFile;
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        OsFs.create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        OsFs.exists(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        OsFs.read(path)
    }
    fn read_durable(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        OsFs.read_durable(path)
    }
    fn random_u64(&self) -> u64 {
        OsFs.random_u64()
    }
    fn open_append(&self, path: &Path) -> std::io::Result<Self::File> {
        OsFs.open_append(path)
    }
    fn create(&self, path: &Path) -> std::io::Result<Self::File> {
        OsFs.create(path)
    }
    fn open(&self, path: &Path) -> std::io::Result<Self::File> {
        OsFs.open(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        OsFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        OsFs.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        OsFs.sync_dir(dir)
    }
    fn file_writer(&self) -> Option<sixfive_storage::fs::FileWriter> {
        OsFs.file_writer()
    }
    fn release(&self, garbage: Garbage<Self::File>) {
        let entries = garbage.entries.iter().map(|e| e.index).collect();
        let snapshot = garbage.snapshot.as_ref().map(|s| s.meta.index);
        self.released.lock().unwrap().push((garbage.files.len(), entries, snapshot));
    }
}

#[test]
fn what_a_snapshot_makes_dead_is_released_to_the_file_system() {
    // The replaced files (the log a rewrite replaced, the previous snapshot file, held open
    // so that its rename does not free it), the covered entries and the superseded snapshot
    // go to `Fs::release` (which the OS file system frees on another thread), none of it lost
    // to the log: a reopen finds the same state.
    let d = dir("release");
    let fs = Releasing::default();
    let mut s = FileStorage::open_with(fs.clone(), &d).unwrap().with_rewrite_slack(64);
    s.append(&entries(1, 8, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 8 }).unwrap();
    s.sync().unwrap();
    let write = s.snapshot_writer().unwrap();
    let first = std::sync::Arc::new(Snapshot { meta: SnapshotMeta { index: 5, term: 1 }, data: vec![5; 10] });
    write(&first).unwrap();
    s.install_written_snapshot(first).unwrap();
    assert_eq!(fs.released.lock().unwrap().clone(), vec![(0, (1..=5).collect(), None)]);
    // The log's rewrite, started by the install, put in place: the old log is released.
    s.finish_rewrite().unwrap();
    assert_eq!(s.log_rewrites(), 1);
    assert_eq!(fs.released.lock().unwrap()[1], (1, vec![], None));
    let second = Snapshot { meta: SnapshotMeta { index: 7, term: 1 }, data: vec![7; 10] };
    s.save_snapshot(&second).unwrap();
    s.sync().unwrap();
    // The first snapshot's file, held open when the second replaced it.
    assert_eq!(fs.released.lock().unwrap()[2], (1, vec![6, 7], Some(5)));
    let st = s.initial_state().unwrap();
    assert_eq!(st.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![8]);
    drop(s);
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), st);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_log_is_written_over_zeros_prepared_ahead_and_reopens_the_same() {
    // OsFs writes zeros ahead of the log's end (so that an fdatasync flushes data, not the
    // file's growth); a reader sees them past the last record, and a reopen cuts them off.
    let d = dir("zeros");
    let mut s = FileStorage::open(&d).unwrap();
    s.append(&entries(1, 50, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 50 }).unwrap();
    s.sync().unwrap();
    let logical = s.log_file_bytes();
    let on_disk = std::fs::read(d.join("raft.log")).unwrap();
    assert!(on_disk.len() as u64 > logical, "space prepared ahead of the end");
    assert_eq!(on_disk.len() % (256 << 10), 0, "a whole number of chunks");
    assert!(on_disk[logical as usize..].iter().all(|&b| b == 0), "zeros past the last record");
    let st = s.initial_state().unwrap();
    drop(s);
    let mut s = FileStorage::open(&d).unwrap();
    assert_eq!(s.initial_state().unwrap(), st);
    // Appends go on at the logical end, not after the zeros.
    s.append(&entries(51, 60, 1)).unwrap();
    s.sync().unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.entries.last().unwrap().index, 60);
    drop(s);
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), st);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_rewrite_put_in_place_late_carries_what_was_written_meanwhile() {
    // The rewrite's thread captured the state at the snapshot; until its file takes the log's
    // place, the node goes on: entries appended (one append cutting back the log), the hard
    // state, a second snapshot, a sync running on another thread across the swap. The new
    // log must hold all of it, and a sync job of the replaced file must finish harmlessly.
    let d = dir("late-rewrite");
    // Commands large enough that a snapshot leaves most of the log dead.
    let entries = |lo: u64, hi: u64, term: u64| -> Vec<Entry> {
        (lo..=hi).map(|i| Entry { term, index: i, kind: EntryKind::Normal, data: vec![i as u8; 200].into() }).collect()
    };
    let mut s = FileStorage::open(&d).unwrap().with_rewrite_slack(64);
    s.append(&entries(1, 40, 1)).unwrap();
    s.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 30 }).unwrap();
    s.sync().unwrap();
    let job = s.start_sync().unwrap().expect("the OS file system syncs elsewhere");
    s.append(&entries(41, 50, 1)).unwrap();
    s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 10, term: 1 }, data: vec![1; 10] }).unwrap();
    assert_eq!(s.log_rewrites(), 0, "under way");
    s.append(&entries(45, 47, 2)).unwrap();
    s.save_hard_state(&HardState { term: 2, vote: Some(2), commit: 44 }).unwrap();
    s.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 20, term: 1 }, data: vec![2; 10] }).unwrap();
    s.append(&entries(48, 49, 2)).unwrap();
    s.finish_rewrite().unwrap();
    assert_eq!(s.log_rewrites(), 1);
    // The sync started on the replaced file finishes without a mark in the new one.
    s.finish_sync(job()).unwrap();
    s.append(&entries(50, 52, 2)).unwrap();
    s.sync().unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.entries.first().map(|e| e.index), Some(21));
    assert_eq!(st.entries.last().map(|e| (e.index, e.term)), Some((52, 2)));
    assert_eq!(st.entries.iter().find(|e| e.index == 46).map(|e| e.term), Some(2), "the cut-back append");
    assert_eq!(st.hard_state, HardState { term: 2, vote: Some(2), commit: 44 });
    drop(s);
    assert_eq!(FileStorage::open(&d).unwrap().initial_state().unwrap(), st);
    assert!(!d.join("raft.log.tmp").exists(), "the rewritten file took the log's name");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn dropping_the_storage_waits_for_its_rewrite_and_opening_removes_the_leftover() {
    // A rewrite's thread writes raft.log.tmp; a storage dropped while it runs waits for it (a
    // storage opened next on the directory, in the same process, would otherwise share that
    // file with it: the review reproduced a damaged log so). The next open removes the
    // leftover, which nothing reads.
    let d = dir("drop-rewrite");
    let big = |lo: u64, hi: u64| -> Vec<Entry> {
        (lo..=hi)
            .map(|i| Entry { term: 1, index: i, kind: EntryKind::Normal, data: vec![i as u8; 1 << 20].into() })
            .collect()
    };
    let mut a = FileStorage::open(&d).unwrap().with_rewrite_slack(1);
    for k in 0..4 {
        a.append(&big(k * 8 + 1, k * 8 + 8)).unwrap();
    }
    a.save_hard_state(&HardState { term: 1, vote: Some(1), commit: 32 }).unwrap();
    a.sync().unwrap();
    a.save_snapshot(&Snapshot { meta: SnapshotMeta { index: 1, term: 1 }, data: vec![1; 10] }).unwrap();
    let st = a.initial_state().unwrap();
    drop(a);
    let tmp = d.join("raft.log.tmp");
    let written = std::fs::metadata(&tmp).map_or(0, |m| m.len());
    assert!(written > 31 << 20, "the rewrite was whole when the drop returned ({written} bytes)");
    let b = FileStorage::open(&d).unwrap();
    assert!(!tmp.exists(), "the leftover is removed");
    assert_eq!(b.initial_state().unwrap(), st);
    drop(b);
    std::fs::remove_dir_all(&d).unwrap();
}
