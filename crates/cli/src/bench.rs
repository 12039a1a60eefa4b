//! Benchmarks that print figures.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::Instant;

use sixfive_raft::{Config, EntryKind, Message, RawNode, Role};

use sixfive_mapreduce::cli::peak_rss_kib;

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
                queue.extend(rd.all_messages().cloned());
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
    println!(
        "  {:.0} entries/s committed and applied on the leader ({:.1} MB/s of payload)",
        entries as f64 / secs,
        (entries as f64 * size as f64) / secs / 1e6
    );
    println!("  {:.2} us of core CPU per entry (all three nodes together)", secs * 1e6 / entries as f64);
    if let Some(kib) = peak_rss_kib() {
        println!("  peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    ExitCode::SUCCESS
}

/// The eight Gutenberg texts, built into the binary so that `bench mr` runs from any
/// directory without the repository at hand.
const EMBEDDED_TEXTS: [(&str, &[u8]); 8] = [
    ("pg-being_ernest.txt", include_bytes!("../../../data/gutenberg/pg-being_ernest.txt")),
    ("pg-dorian_gray.txt", include_bytes!("../../../data/gutenberg/pg-dorian_gray.txt")),
    ("pg-frankenstein.txt", include_bytes!("../../../data/gutenberg/pg-frankenstein.txt")),
    ("pg-grimm.txt", include_bytes!("../../../data/gutenberg/pg-grimm.txt")),
    ("pg-huckleberry_finn.txt", include_bytes!("../../../data/gutenberg/pg-huckleberry_finn.txt")),
    ("pg-metamorphosis.txt", include_bytes!("../../../data/gutenberg/pg-metamorphosis.txt")),
    ("pg-sherlock_holmes.txt", include_bytes!("../../../data/gutenberg/pg-sherlock_holmes.txt")),
    ("pg-tom_sawyer.txt", include_bytes!("../../../data/gutenberg/pg-tom_sawyer.txt")),
];

/// The texts to draw lines from: those in `texts` if given, else the built-in ones.
fn load_texts(texts: Option<&std::path::Path>) -> Result<Vec<Vec<u8>>, String> {
    let Some(texts) = texts else {
        return Ok(EMBEDDED_TEXTS.iter().map(|(_, t)| t.to_vec()).collect());
    };
    let mut names: Vec<_> = std::fs::read_dir(texts)
        .map_err(|e| format!("{}: {e}", texts.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.into_iter().map(|p| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))).collect()
}

/// Builds a deterministic corpus of about `size_mib` MiB in `dir` (files of 16 MiB) from the
/// lines of `texts`, picked by a seeded generator.
fn make_corpus(texts: &[Vec<u8>], dir: &std::path::Path, size_mib: u64) -> Result<Vec<String>, String> {
    let mut lines: Vec<String> = Vec::new();
    for t in texts {
        lines.extend(String::from_utf8_lossy(t).lines().map(|l| format!("{l}\n")));
    }
    if lines.is_empty() {
        return Err("no text to build a corpus from".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let total = size_mib << 20;
    let per_file = 16u64 << 20;
    let mut state = 0x5EED_u64;
    let mut files = Vec::new();
    let mut written = 0;
    while written < total {
        let path = dir.join(format!("corpus-{:03}.txt", files.len()));
        let mut buf = String::with_capacity(per_file as usize + 4096);
        while (buf.len() as u64) < per_file.min(total - written) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            buf.push_str(&lines[((z ^ (z >> 31)) % lines.len() as u64) as usize]);
        }
        written += buf.len() as u64;
        std::fs::write(&path, &buf).map_err(|e| e.to_string())?;
        files.push(path.to_string_lossy().to_string());
    }
    Ok(files)
}

/// The baseline: a plain single-threaded Rust word count.
fn plain_word_count(files: &[String]) -> std::collections::HashMap<String, u64> {
    let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for f in files {
        let bytes = std::fs::read(f).expect("corpus file");
        let text = String::from_utf8_lossy(&bytes);
        for w in text.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()) {
            match counts.get_mut(w) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(w.to_string(), 1);
                }
            }
        }
    }
    counts
}

/// Word count on a generated corpus: plain single-threaded Rust vs MapReduce with N workers.
pub fn mapreduce(size_mib: u64, workers: usize, texts: Option<&std::path::Path>, spark: bool, keep: bool) -> ExitCode {
    if size_mib == 0 || workers == 0 {
        eprintln!("error: --size-mib and --workers must be at least 1");
        return ExitCode::from(2);
    }
    let dir = std::env::temp_dir().join(format!("sixfive-bench-mr-{}", std::process::id()));
    let files = match load_texts(texts).and_then(|t| make_corpus(&t, &dir.join("input"), size_mib)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let mb = bytes as f64 / 1e6;
    println!("corpus: {} files, {:.1} MB, in {}", files.len(), mb, dir.join("input").display());

    let t = Instant::now();
    let counts = plain_word_count(&files);
    let plain = t.elapsed().as_secs_f64();
    println!(
        "plain single-threaded word count: {plain:.2} s ({:.1} MB/s), {} distinct words",
        mb / plain,
        counts.len()
    );

    // How much of the difference is the app rather than the parallelism: wc's map alone, in
    // this thread, over the same files (its tokenizer and per-chunk table; nothing merged).
    let t = Instant::now();
    let mut words = 0u64;
    for f in &files {
        use sixfive_mapreduce::app::App;
        let bytes = std::fs::read(f).expect("corpus file");
        let text = String::from_utf8_lossy(&bytes);
        let _ = sixfive_mapreduce::app::WordCount.map(f, &text, &mut |_, n| words += n.parse::<u64>().unwrap_or(0));
    }
    let map_alone = t.elapsed().as_secs_f64();
    println!(
        "  for comparison, the wc app's map alone in one thread: {map_alone:.2} s ({:.1} MB/s, {words} words)",
        mb / map_alone
    );

    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("out dir");
    let app = sixfive_mapreduce::cli::AppArgs { app: "wc".into(), map_cmd: None, reduce_cmd: None };
    let job = sixfive_mapreduce::cli::JobArgs {
        reduces: 10,
        out: out.clone(),
        overwrite: false,
        chunk_mib: 64,
        task_timeout_secs: 60,
        backup_tasks: false,
    };
    let registry = sixfive_mapreduce::app::Registry::builtins();
    let t = Instant::now();
    let code = sixfive_mapreduce::cli::run_job(&registry, &["mr"], &app, &job, workers, false, &files);
    let mr = t.elapsed().as_secs_f64();
    if code != ExitCode::SUCCESS {
        return code;
    }
    println!(
        "mapreduce word count, {workers} workers: {mr:.2} s from launch until every process exited ({:.1} MB/s)",
        mb / mr
    );
    println!(
        "  ratio (launch to exit) mapreduce / plain: {:.2}; the job's own wall time is the 'done in' line above",
        mr / plain
    );
    // Same answer as the plain count?
    let mut mismatches = 0;
    let mut seen = 0;
    for e in std::fs::read_dir(&out).expect("out").flatten() {
        if !e.file_name().to_string_lossy().starts_with("mr-out-") {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap_or_default().lines() {
            let (w, n) = line.rsplit_once(' ').unwrap_or((line, "0"));
            seen += 1;
            if counts.get(w).copied() != n.parse().ok() {
                mismatches += 1;
            }
        }
    }
    if mismatches > 0 || seen != counts.len() {
        eprintln!(
            "error: mapreduce output differs from the plain count ({mismatches} mismatches, {seen} vs {} words)",
            counts.len()
        );
        return ExitCode::FAILURE;
    }
    println!("  outputs agree on all {seen} words");
    if spark {
        match spark_word_count(&files, &dir.join("spark-out"), &counts) {
            Ok(Some(secs)) => {
                println!(
                    "spark word count (pyspark, local[2], DataFrame API): {secs:.2} s from launch to exit ({:.1} MB/s); \
                     outputs agree on all {} words",
                    mb / secs,
                    counts.len()
                );
                println!("  ratio spark / mapreduce (launch to exit): {:.1}", secs / mr);
            }
            Ok(None) => println!("spark: skipped (python3 with pyspark and java are needed)"),
            Err(e) => {
                eprintln!("error: spark: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    ExitCode::SUCCESS
}

/// Fsyncs per committed write, by role, on a simulated three-node cluster.
pub fn fsyncs(writes: u64) -> ExitCode {
    if writes == 0 {
        eprintln!("error: --writes must be at least 1");
        return ExitCode::from(2);
    }
    println!("| writes in flight | leader fsyncs/write | follower fsyncs/write |");
    println!("| --- | --- | --- |");
    for in_flight in [1, 10, 100] {
        let r = sixfive_raft_sim::bench::fsyncs_per_write(3, writes, in_flight);
        let followers: Vec<String> = r.followers.iter().map(|f| format!("{f:.2}")).collect();
        println!("| {in_flight} | {:.2} | {} |", r.leader, followers.join(", "));
    }
    ExitCode::SUCCESS
}

/// The same word count in Apache Spark (pyspark, `local[2]`, DataFrame API: lines split at
/// non-letters, grouped and counted, written as CSV), timed from launch to exit and checked
/// word by word against `counts`. `Ok(None)` when pyspark or Java is missing.
fn spark_word_count(
    files: &[String],
    out: &std::path::Path,
    counts: &std::collections::HashMap<String, u64>,
) -> Result<Option<f64>, String> {
    let have = |cmd: &mut std::process::Command| {
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
    };
    if !have(std::process::Command::new("java").arg("-version"))
        || !have(std::process::Command::new("python3").args(["-c", "import pyspark"]))
    {
        return Ok(None);
    }
    const SCRIPT: &str = r#"
import sys
from pyspark.sql import SparkSession, functions as F
out, files = sys.argv[1], sys.argv[2:]
spark = (SparkSession.builder.master("local[2]").appName("sixfive-bench-wc")
         .config("spark.ui.enabled", "false").config("spark.driver.memory", "4g")
         .config("spark.sql.shuffle.partitions", "10").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
words = spark.read.text(files).select(F.explode(F.split("value", r"[^\p{IsAlphabetic}]+")).alias("w")).where("w != ''")
words.groupBy("w").count().write.mode("overwrite").csv(out)
spark.stop()
"#;
    let t = Instant::now();
    let o = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(out)
        .args(files)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(format!("pyspark failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let mut seen = 0;
    for e in std::fs::read_dir(out).map_err(|e| e.to_string())?.flatten() {
        if !e.file_name().to_string_lossy().starts_with("part-") {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap_or_default().lines() {
            let (w, n) = line.rsplit_once(',').unwrap_or((line, ""));
            seen += 1;
            if counts.get(w).copied() != n.parse().ok() {
                return Err(format!("spark's count for {w:?} is {n}, the plain count's {:?}", counts.get(w)));
            }
        }
    }
    if seen != counts.len() {
        return Err(format!("spark found {seen} words, the plain count {}", counts.len()));
    }
    Ok(Some(secs))
}

/// The snapshot of a large etcd-API state, phase by phase, on one node with its log on disk
/// (`dir`): the copy the node's loop makes, the work done off the loop (serialise, build the
/// Raft snapshot, write and sync its file), the install back on the loop, and a restart's
/// restore. The state is `check perf`'s: `keys` distinct keys of `key_bytes` with values of
/// `value_bytes`, each written once.
pub fn snapshot(keys: u64, key_bytes: usize, value_bytes: usize, dir: &std::path::Path) -> ExitCode {
    use sixfive_etcd::proto::etcdserverpb::PutRequest;
    use sixfive_etcd::{Command, EtcdSm};
    use sixfive_rsm::Rsm;
    if keys == 0 || key_bytes < 8 {
        eprintln!("error: --keys must be at least 1 and --key-bytes at least 8");
        return ExitCode::from(2);
    }
    if dir.exists() {
        eprintln!("error: {} exists; give a new directory", dir.display());
        return ExitCode::from(2);
    }
    let storage = match sixfive_storage::FileStorage::open(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A single voter with background snapshots, every one due (threshold 1 byte): the bench
    // asks for one job at the end, as the server would once its log outgrew the state.
    let mut rsm = Rsm::new(Config::new(1, vec![1]), storage, EtcdSm::default(), Some(1))
        .expect("valid config")
        .with_background_snapshots();
    for _ in 0..100 {
        rsm.tick();
        rsm.process().expect("storage");
    }
    assert_eq!(rsm.status().role, Role::Leader);
    let started = Instant::now();
    let value = vec![0x5A; value_bytes];
    let mut key = vec![b'k'; key_bytes];
    for i in 0..keys {
        key[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        let put = PutRequest { key: key.clone(), value: value.clone(), ..Default::default() };
        rsm.submit(Command::Put(put).encode(), 0).expect("leader");
        if i % 1024 == 1023 || i + 1 == keys {
            rsm.process().expect("storage");
        }
    }
    let state_bytes = rsm.state_machine().store().size_bytes();
    println!(
        "snapshot: {keys} keys of {key_bytes} B, values of {value_bytes} B ({:.1} MB of state) written in {:.1} s",
        state_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let job = rsm.take_snapshot_job().expect("a snapshot is due");
    let copied = t.elapsed();
    let t = Instant::now();
    let taken = job.run();
    let ran = t.elapsed();
    let t = Instant::now();
    assert!(rsm.finish_snapshot(taken).expect("storage"), "installed");
    let installed = t.elapsed();
    let t = Instant::now();
    let restarted = sixfive_storage::FileStorage::open(dir).expect("reopens");
    let restored = Rsm::new(Config::new(1, vec![1]), restarted, EtcdSm::default(), None).expect("valid config");
    let reopened = t.elapsed();
    assert_eq!(restored.state_machine().store().size_bytes(), state_bytes, "the restart restored the state");
    let file = std::fs::metadata(dir.join("raft.snapshot")).map(|m| m.len()).unwrap_or(0);
    println!("  on the loop: state copied in {:.0} ms", copied.as_secs_f64() * 1e3);
    println!(
        "  off the loop: serialised, written and synced in {:.0} ms ({:.1} MB file, {:.0} MB/s)",
        ran.as_secs_f64() * 1e3,
        file as f64 / 1e6,
        file as f64 / 1e6 / ran.as_secs_f64()
    );
    println!("  on the loop: installed in {:.0} ms", installed.as_secs_f64() * 1e3);
    println!("  restart: storage opened and state restored in {:.0} ms", reopened.as_secs_f64() * 1e3);
    if let Some(kib) = peak_rss_kib() {
        println!("  peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    drop(rsm);
    drop(restored);
    let _ = std::fs::remove_dir_all(dir);
    ExitCode::SUCCESS
}
