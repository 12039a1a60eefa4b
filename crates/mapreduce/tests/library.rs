//! The library used directly: a custom app registered by name, a coordinator and two workers
//! on threads of this process over a UNIX socket, compared with the sequential runner.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sixfive_mapreduce::app::{App, AppOptions, Registry};
use sixfive_mapreduce::coordinator::{Coordinator, CoordinatorConfig, serve};
use sixfive_mapreduce::proto::{Addr, Listener};
use sixfive_mapreduce::split::split_inputs;
use sixfive_mapreduce::worker::{WorkerConfig, run_sequential, run_sequential_with, run_worker};

/// Counts words by their first letter, case-folded.
struct Initials;

impl App for Initials {
    fn map(&self, _file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        for w in contents.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()) {
            let first: String = w.chars().next().unwrap().to_lowercase().collect();
            emit(&first, "1");
        }
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        Ok(values.count().to_string())
    }
}

fn sorted_lines(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            v.extend(std::fs::read_to_string(e.path()).unwrap().lines().filter(|l| !l.is_empty()).map(String::from));
        }
    }
    v.sort();
    v
}

#[test]
fn custom_app_in_process_matches_sequential() {
    let mut registry = Registry::builtins();
    registry.register("initials", |_| Ok(Box::new(Initials)));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gutenberg");
    let inputs: Vec<String> =
        ["pg-grimm.txt", "pg-metamorphosis.txt"].iter().map(|f| data.join(f).to_string_lossy().to_string()).collect();
    let dir = std::env::temp_dir().join(format!("sixfive-mr-lib-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();

    // Small chunks: each file becomes several map tasks.
    let chunks = split_inputs(&inputs, 64 << 10).unwrap();
    assert!(chunks.len() > 4);
    let cfg = CoordinatorConfig {
        n_reduce: 3,
        out_dir: dir.join("out").to_string_lossy().to_string(),
        task_timeout: Duration::from_secs(10),
        backup_tasks: false,
        max_task_failures: 3,
    };
    let addr = Addr::Unix(dir.join("coordinator.sock"));
    let listener = Listener::bind(&addr).unwrap();
    let coordinator =
        std::thread::spawn(move || serve(listener, Coordinator::new(cfg, chunks), Duration::from_millis(200)));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let app: Arc<dyn App> = Arc::from(registry.make("initials", &AppOptions::default()).unwrap());
            let cfg = WorkerConfig {
                coordinator: addr.clone(),
                listen: Addr::Unix(dir.join(format!("w{i}.sock"))),
                work_dir: dir.join(format!("w{i}")),
                connect_patience: Duration::from_secs(5),
            };
            std::thread::spawn(move || run_worker(cfg, app))
        })
        .collect();
    let status = coordinator.join().unwrap();
    assert!(status.done && status.failed.is_none(), "{status:?}");
    let ran: u64 = workers.into_iter().map(|w| w.join().unwrap().unwrap().maps).sum();
    assert_eq!(ran as usize, status.maps, "every map task ran exactly once");

    let seq = dir.join("seq");
    run_sequential(&Initials, &inputs, &seq).unwrap();
    let expected: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_to_string(&seq).unwrap().lines().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(sorted_lines(&dir.join("out"), "mr-out-"), expected);
    assert!(expected.iter().any(|l| l.starts_with("t ")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `run_sequential` spills sorted runs when its buffer fills and merges them: with a tiny
/// threshold (hundreds of runs) the output is the same as with everything in memory, and
/// the spill directory is gone afterwards.
#[test]
fn sequential_spills_and_merges_to_the_same_output() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gutenberg");
    let inputs: Vec<String> = ["pg-metamorphosis.txt", "pg-being_ernest.txt"]
        .iter()
        .map(|f| data.join(f).to_string_lossy().to_string())
        .collect();
    let dir = std::env::temp_dir().join(format!("sixfive-mr-seq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let wc = Registry::builtins().make("wc", &AppOptions::default()).unwrap();
    let (_, runs) = run_sequential_with(wc.as_ref(), &inputs, &dir.join("memory"), 16 << 20, usize::MAX).unwrap();
    assert_eq!(runs, 0);
    let (_, runs) = run_sequential_with(wc.as_ref(), &inputs, &dir.join("spilled"), 8 << 10, 16 << 10).unwrap();
    assert!(runs > 10, "only {runs} runs spilled");
    let memory = std::fs::read_to_string(dir.join("memory")).unwrap();
    assert!(memory.lines().count() > 1000);
    assert!(memory == std::fs::read_to_string(dir.join("spilled")).unwrap(), "spilled output differs");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["memory", "spilled"], "spill files left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A typed app: values are structs; the combiner works on them. Run as a job (coordinator
/// and two workers in this process) it agrees with the sequential runner and with a direct
/// computation.
#[test]
fn typed_app_with_struct_values_and_combiner() {
    use sixfive_mapreduce::typed::{Typed, TypedApp};

    #[derive(serde::Serialize, serde::Deserialize, Clone, Copy)]
    struct Stats {
        n: u64,
        letters: u64,
    }
    /// Per initial letter: how many words, and how many letters in them.
    struct InitialStats;
    impl TypedApp for InitialStats {
        type Value = Stats;
        fn map(&self, _f: &str, contents: &str, emit: &mut dyn FnMut(&str, Stats)) -> Result<(), String> {
            for w in contents.split(|c: char| !c.is_ascii_alphabetic()).filter(|w| !w.is_empty()) {
                emit(&w[..1].to_ascii_lowercase(), Stats { n: 1, letters: w.len() as u64 });
            }
            Ok(())
        }
        fn reduce(&self, _k: &str, values: &mut dyn Iterator<Item = Stats>) -> Result<String, String> {
            let s =
                values.fold(Stats { n: 0, letters: 0 }, |a, v| Stats { n: a.n + v.n, letters: a.letters + v.letters });
            Ok(format!("{} {}", s.n, s.letters))
        }
        fn combine(&self, _k: &str, acc: &mut Stats, v: Stats) -> bool {
            acc.n += v.n;
            acc.letters += v.letters;
            true
        }
    }

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gutenberg");
    let inputs: Vec<String> =
        ["pg-metamorphosis.txt"].iter().map(|f| data.join(f).to_string_lossy().to_string()).collect();
    let dir = std::env::temp_dir().join(format!("sixfive-mr-typed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let chunks = split_inputs(&inputs, 32 << 10).unwrap();
    let cfg = CoordinatorConfig {
        n_reduce: 2,
        out_dir: dir.join("out").to_string_lossy().to_string(),
        task_timeout: Duration::from_secs(10),
        backup_tasks: false,
        max_task_failures: 3,
    };
    let addr = Addr::Unix(dir.join("coordinator.sock"));
    let listener = Listener::bind(&addr).unwrap();
    let coordinator =
        std::thread::spawn(move || serve(listener, Coordinator::new(cfg, chunks), Duration::from_millis(200)));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let app: Arc<dyn App> = Arc::new(Typed(InitialStats));
            let cfg = WorkerConfig {
                coordinator: addr.clone(),
                listen: Addr::Unix(dir.join(format!("w{i}.sock"))),
                work_dir: dir.join(format!("w{i}")),
                connect_patience: Duration::from_secs(5),
            };
            std::thread::spawn(move || run_worker(cfg, app))
        })
        .collect();
    assert!(coordinator.join().unwrap().done);
    for w in workers {
        w.join().unwrap().unwrap();
    }
    run_sequential(&Typed(InitialStats), &inputs, &dir.join("seq")).unwrap();
    let mut expected: Vec<String> =
        std::fs::read_to_string(dir.join("seq")).unwrap().lines().map(String::from).collect();
    expected.sort();
    assert_eq!(sorted_lines(&dir.join("out"), "mr-out-"), expected);
    let text = std::fs::read_to_string(&inputs[0]).unwrap();
    let t: Vec<&str> = text.split(|c: char| !c.is_ascii_alphabetic()).filter(|w| w.starts_with(['t', 'T'])).collect();
    let t_line = format!("t {} {}", t.len(), t.iter().map(|w| w.len()).sum::<usize>());
    assert!(expected.contains(&t_line), "{t_line} not in {expected:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
