//! Benchmarks that print figures.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::Instant;

use sixfive_raft::{Config, EntryKind, Message, RawNode, Role};

/// Peak resident memory of this process, from /proc (Linux), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Three nodes in one thread: every message is handed over in memory, every Ready is "persisted"
/// by dropping it. What remains is the core's own work per entry: appending, building and
/// stepping Appends, counting acknowledgements, handing out committed entries.
pub fn raft_core(entries: u64, size: usize, batch: u64) -> ExitCode {
    if entries == 0 || batch == 0 {
        eprintln!("error: --entries and --batch must be at least 1");
        return ExitCode::from(2);
    }
    let ids = vec![1, 2, 3];
    let mut nodes: Vec<RawNode> = ids
        .iter()
        .map(|&id| {
            let mut c = Config::new(id, ids.clone());
            c.max_msg_bytes = 4 << 20;
            RawNode::new(c).expect("valid config")
        })
        .collect();
    let mut queue: VecDeque<Message> = VecDeque::new();
    let mut applied = [0u64; 3];
    let pump = |nodes: &mut Vec<RawNode>, queue: &mut VecDeque<Message>, applied: &mut [u64; 3]| loop {
        for (i, n) in nodes.iter_mut().enumerate() {
            while n.has_ready() {
                let rd = n.ready();
                queue.extend(rd.messages.iter().cloned());
                applied[i] += rd.committed_entries.iter().filter(|e| e.kind == EntryKind::Normal).count() as u64;
                n.advance(&rd);
            }
        }
        let Some(m) = queue.pop_front() else { break };
        let to = (m.to - 1) as usize;
        nodes[to].step(m).expect("valid message");
    };
    nodes[0].campaign();
    pump(&mut nodes, &mut queue, &mut applied);
    assert_eq!(nodes[0].status().role, Role::Leader);
    let payload = vec![0xAB; size];
    let started = Instant::now();
    let mut proposed = 0;
    while proposed < entries {
        for _ in 0..batch.min(entries - proposed) {
            nodes[0].propose(payload.clone()).expect("leader");
            proposed += 1;
        }
        pump(&mut nodes, &mut queue, &mut applied);
        // Compact now and then, as an application would, so memory stays bounded.
        let applied_index = nodes[0].status().applied;
        if applied_index % 8192 < batch {
            for n in nodes.iter_mut() {
                let a = n.status().applied;
                let _ = n.compact(a, Vec::new());
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(applied[0], entries, "leader applied every entry");
    println!("raft-core: {entries} entries of {size} B, batch {batch}, 3 nodes in one thread, no IO");
    println!("  {:.0} entries/s committed and applied on the leader ({:.1} MB/s of payload)", entries as f64 / secs, (entries as f64 * size as f64) / secs / 1e6);
    println!("  {:.2} us of core CPU per entry (all three nodes together)", secs * 1e6 / entries as f64);
    if let Some(kib) = peak_rss_kib() {
        println!("  peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    ExitCode::SUCCESS
}
