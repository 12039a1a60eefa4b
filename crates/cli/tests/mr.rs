//! Section 1: MapReduce with real processes over real sockets, as the course's test-mr.sh
//! runs it: a coordinator and workers started separately in a scratch directory, each under a
//! time limit, the output compared (sorted, blank lines dropped) with the sequential run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{BIN, free_port};

fn inputs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gutenberg");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .expect("data/gutenberg is in the repository")
        .map(|e| e.unwrap().path().canonicalize().unwrap().to_string_lossy().to_string())
        .filter(|p| p.ends_with(".txt"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 8, "the eight Gutenberg texts");
    v
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sixfive-mr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sixfive(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir).stdout(Stdio::null());
    c
}

fn coordinator(dir: &Path, extra: &[&str]) -> Child {
    let sock = format!("unix:{}", dir.join("coordinator.sock").display());
    sixfive(dir)
        .args(["mr", "coordinator", "--listen", &sock, "--reduces", "10"])
        .args(extra)
        .args(inputs())
        .spawn()
        .unwrap()
}

fn worker(dir: &Path, app: &str) -> Child {
    worker_in(dir, dir, app)
}

/// A worker whose current directory and work directory are `cwd` and `work` (separate for
/// the no-shared-filesystem tests).
fn worker_in(cwd: &Path, work: &Path, app: &str) -> Child {
    worker_args(cwd, work, &["--app", app])
}

fn worker_args(cwd: &Path, work: &Path, app_args: &[&str]) -> Child {
    let sock = format!("unix:{}", cwd.join("coordinator.sock").display());
    sixfive(cwd)
        .args(["mr", "worker", "--coordinator", &sock])
        .args(app_args)
        .arg("--work-dir")
        .arg(work)
        .spawn()
        .unwrap()
}

/// Word count as shell commands (for runs that need a slow reduce).
const STREAM_MAP: &str = r#"tr -cs 'A-Za-z' '\n' | grep . | sed 's/$/\t1/'"#;
const STREAM_REDUCE: &str = r#"awk -F'\t' '{c[$1]+=$2} END {for (k in c) print k, c[k]}'"#;

fn wait_limit(c: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sort mr-out* | grep .`
fn output(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("mr-out-") {
            lines.extend(std::fs::read_to_string(&p).unwrap().lines().filter(|l| !l.is_empty()).map(String::from));
        }
    }
    lines.sort();
    lines
}

fn sequential(dir: &Path, app: &str) -> Vec<String> {
    let seq_dir = dir.join("seq");
    std::fs::create_dir_all(&seq_dir).unwrap();
    let ok = sixfive(&seq_dir)
        .args(["mr", "sequential", "--app", app, "--out", "mr-correct"])
        .args(inputs())
        .status()
        .unwrap();
    assert!(ok.success());
    let mut v: Vec<String> = std::fs::read_to_string(seq_dir.join("mr-correct"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// A coordinator and `n` workers of `app`; waits for all of them within the course's 45 s.
fn run_job(dir: &Path, app: &str, n: usize) -> Vec<String> {
    let mut c = coordinator(dir, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let mut ws: Vec<Child> = (0..n).map(|_| worker(dir, app)).collect();
    assert!(wait_limit(&mut c, Duration::from_secs(45), "coordinator").success());
    for w in ws.iter_mut() {
        wait_limit(w, Duration::from_secs(45), "worker");
    }
    output(dir)
}

#[test]
fn mr_wc() {
    let dir = scratch("wc");
    let got = run_job(&dir, "wc", 3);
    assert_eq!(got.len(), 22_107, "distinct words");
    let total: u64 = got.iter().map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(total, 623_948, "words in all");
    assert!(got.contains(&"A 509".to_string()));
    assert!(got == sequential(&dir, "wc"), "word count output differs from the sequential run");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.starts_with(".tmp-").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left visible: {leftovers:?}");
    // Workers clean their work directory (intermediate files, sockets) when the job ends.
    let debris: Vec<String> = names_in(&dir)
        .into_iter()
        .filter(|n| sixfive_mapreduce::proto::is_intermediate_name(n) || n.ends_with(".sock") || n.starts_with('.'))
        .collect();
    assert!(debris.is_empty(), "left in the work directory: {debris:?}");
    assert!(dir.join("_SUCCESS").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_indexer() {
    let dir = scratch("indexer");
    let got = run_job(&dir, "indexer", 2);
    assert!(got == sequential(&dir, "indexer"), "indexer output differs from the sequential run");
    assert!(got.iter().all(|l| l.split(' ').count() == 3), "each line is 'word N docs'");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_map_parallel() {
    let dir = scratch("mtiming");
    let got = run_job(&dir, "mtiming", 2);
    let workers = got.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(workers, 2, "expected 2 workers to run map tasks: {got:?}");
    let parallel = got.iter().filter(|l| l.starts_with("parallel-") && l.split(' ').skip(1).any(|n| n == "2")).count();
    assert!(parallel >= 1, "map workers did not run in parallel: {got:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_reduce_parallel() {
    let dir = scratch("rtiming");
    let got = run_job(&dir, "rtiming", 2);
    let parallel = got.iter().filter(|l| l.len() == 3 && l.ends_with(" 2")).count();
    assert!(parallel >= 2, "too few parallel reduces: {got:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_job_count() {
    let dir = scratch("jobcount");
    let got = run_job(&dir, "jobcount", 4);
    assert_eq!(got, vec!["a 8".to_string()], "a map task ran more than once (or not at all)");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_early_exit() {
    let dir = scratch("early_exit");
    let mut c = coordinator(&dir, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let mut procs: Vec<Child> = (0..3).map(|_| worker(&dir, "early_exit")).collect();
    procs.push(c);
    // Wait for the first process to exit, and take the output as it is then.
    let t0 = Instant::now();
    let first = loop {
        if let Some(i) = procs.iter_mut().position(|p| p.try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(t0.elapsed() < Duration::from_secs(45), "no process exited within 45 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    let initial = output(&dir);
    for p in procs.iter_mut() {
        wait_limit(p, Duration::from_secs(45), "process");
    }
    c = procs.pop().unwrap();
    drop(c);
    let last = output(&dir);
    assert!(!initial.is_empty(), "process {first} exited before any output existed");
    assert_eq!(initial, last, "output changed after the first process exited: someone exited early");
    assert_eq!(last, sequential(&dir, "early_exit"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mr_crash() {
    let dir = scratch("crash");
    let expected = sequential(&dir, "nocrash");
    let mut c = coordinator(&dir, &[]);
    std::thread::sleep(Duration::from_millis(200));
    // Workers that crash are restarted, in a loop, while the coordinator lives.
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (dir, alive) = (dir.clone(), alive.clone());
            std::thread::spawn(move || {
                while alive.load(std::sync::atomic::Ordering::SeqCst) {
                    // A worker started just as the coordinator exits waits for it only briefly.
                    let mut w = worker_args(&dir, &dir, &["--app", "crash", "--connect-timeout-secs", "3"]);
                    let _ = wait_limit(&mut w, Duration::from_secs(120), "crashing worker");
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    let st = wait_limit(&mut c, Duration::from_secs(120), "coordinator");
    alive.store(false, std::sync::atomic::Ordering::SeqCst);
    for l in loops {
        l.join().unwrap();
    }
    assert!(st.success());
    assert!(output(&dir) == expected, "crash output differs from nocrash's");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn status(dir: &Path) -> Option<sixfive_mapreduce::proto::JobStatus> {
    use sixfive_mapreduce::proto::{Addr, Reply, Request, call};
    let addr = Addr::Unix(dir.join("coordinator.sock"));
    match call::<_, Reply>(&addr, &Request::Status) {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
    }
}

/// No shared filesystem: every worker has its own directory and serves its map output to the
/// reducers. A worker that finished map tasks is killed with SIGKILL while reduces run; its
/// map tasks run again elsewhere and the output is still right. (Word count as shell
/// commands whose reduce sleeps 0.5 s, so the reduce phase outlasts the kill for sure.)
#[test]
fn mr_no_shared_fs_kill_map_holder() {
    let dir = scratch("noshared");
    let mut c = coordinator(&dir, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let dirs: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("w{i}"))).collect();
    let slow_reduce = format!("sleep 0.5; {STREAM_REDUCE}");
    let mut ws: Vec<Child> = dirs
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d).unwrap();
            worker_args(&dir, d, &["--app", "stream", "--map-cmd", STREAM_MAP, "--reduce-cmd", &slow_reduce])
        })
        .collect();
    // When the reduce phase starts, kill a worker holding map output.
    let t0 = Instant::now();
    let victim = loop {
        let s = status(&dir);
        if s.as_ref().is_some_and(|s| s.maps_done == s.maps) {
            let holder = dirs.iter().position(|d| {
                std::fs::read_dir(d).unwrap().any(|e| {
                    let n = e.unwrap().file_name().to_string_lossy().to_string();
                    n.starts_with("mr-") && !n.starts_with("mr-out")
                })
            });
            break holder.expect("some worker holds map output");
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "map phase did not finish");
        std::thread::sleep(Duration::from_millis(5));
    };
    ws[victim].kill().unwrap(); // SIGKILL
    ws[victim].wait().unwrap();
    let mut reexecuted = 0;
    while c.try_wait().unwrap().is_none() {
        if let Some(s) = status(&dir) {
            reexecuted = reexecuted.max(s.reexecuted);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "job did not finish after the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, w) in ws.iter_mut().enumerate() {
        if i != victim {
            wait_limit(w, Duration::from_secs(20), "worker");
        }
    }
    assert!(reexecuted > 0, "no map task was re-executed after its output was lost");
    assert!(output(&dir) == sequential(&dir, "wc"), "output differs from the sequential word count");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A straggler (a worker stopped with SIGSTOP in the middle of a task) does not hold the job
/// to the task timeout when backup tasks are on: with a 60 s timeout the job still finishes
/// in well under 60 s.
#[test]
fn mr_straggler_backup_tasks() {
    let dir = scratch("straggler");
    let t0 = Instant::now();
    let mut c = coordinator(&dir, &["--backup-tasks", "--task-timeout-secs", "60"]);
    std::thread::sleep(Duration::from_millis(200));
    let mut ws: Vec<Child> = (0..3).map(|_| worker(&dir, "jobcount")).collect();
    // jobcount's maps take 2-5 s: stop a worker in the middle of its first one.
    std::thread::sleep(Duration::from_millis(1000));
    let pid = ws[0].id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let mut backups = 0;
    while c.try_wait().unwrap().is_none() {
        if let Some(s) = status(&dir) {
            backups = backups.max(s.backups);
        }
        assert!(t0.elapsed() < Duration::from_secs(50), "the straggler held the job towards the 60 s timeout");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    for w in ws.iter_mut() {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(backups >= 1, "no backup task was started");
    let out = output(&dir);
    assert_eq!(out.len(), 1, "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Beyond the course: `mr run` (coordinator and workers as child processes) over TCP, the
/// streaming app (map and reduce as shell commands), and bad input refused before any work.
#[test]
fn mr_run_tcp_streaming_and_bad_input() {
    let dir = scratch("run");
    let expected = sequential(&dir, "wc");
    let out = dir.join("tcp");
    std::fs::create_dir_all(&out).unwrap();
    let ok = sixfive(&dir)
        .args(["mr", "run", "--app", "wc", "--workers", "2", "--tcp", "--out"])
        .arg(&out)
        .args(inputs())
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(output(&out) == expected, "TCP run differs from the sequential run");

    let out = dir.join("stream");
    std::fs::create_dir_all(&out).unwrap();
    let ok = sixfive(&dir)
        .args([
            "mr",
            "run",
            "--app",
            "stream",
            "--map-cmd",
            STREAM_MAP,
            "--reduce-cmd",
            STREAM_REDUCE,
            "--workers",
            "2",
            "--out",
        ])
        .arg(&out)
        .args(inputs())
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(output(&out) == expected, "streaming word count differs from the built-in one");

    // Bad input: a clear error, a non-zero exit, and no output.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--app".into(), "wc".into(), "/no/such/file.txt".into()], "/no/such/file.txt"),
        (vec!["--app".into(), "nope".into(), inputs()[0].clone()], "unknown app"),
        (vec!["--app".into(), "stream".into(), inputs()[0].clone()], "--map-cmd"),
    ];
    for (args, needle) in cases {
        let o =
            Command::new(BIN).current_dir(&bad).args(["mr", "run", "--out"]).arg(&bad).args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: error {err:?} does not mention {needle:?}");
        assert!(output(&bad).is_empty(), "output written despite bad input");
    }
    // An app that keeps failing fails the job, with its reason, instead of retrying forever.
    let o = Command::new(BIN)
        .current_dir(&bad)
        .args(["mr", "run", "--app", "stream", "--map-cmd", "exit 3", "--reduce-cmd", "cat", "--workers", "2", "--out"])
        .arg(&bad)
        .arg(&inputs()[0])
        .output()
        .unwrap();
    assert!(!o.status.success(), "a job whose map always fails succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("failed 4 times") && err.contains("exit status: 3"), "{err}");
    assert!(output(&bad).is_empty());
    let o =
        Command::new(BIN).args(["mr", "worker", "--coordinator", "not an address", "--app", "wc"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("bad address"));

    // Non-UTF-8 input does not crash a worker.
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let f = odd.join("latin1.txt");
    std::fs::write(&f, b"caf\xe9 caf\xe9 ok\n\xff\xfe words\n").unwrap();
    let ok =
        sixfive(&odd).args(["mr", "run", "--app", "wc", "--workers", "1", "--out"]).arg(&odd).arg(&f).status().unwrap();
    assert!(ok.success());
    let got = output(&odd);
    assert!(got.contains(&"ok 1".to_string()) && got.contains(&"words 1".to_string()), "{got:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Issue 13: what a new user hit at the edges. Each test below failed (or hung) before its fix.

/// `mr run` with a time limit; returns (status, stderr, stdout).
fn mr_run(cwd: &Path, args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut c = Command::new(BIN)
        .current_dir(cwd)
        .args(["mr", "run"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (c.stdout.take().unwrap(), c.stderr.take().unwrap());
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let st = wait_limit(&mut c, limit, &format!("mr run {args:?}"));
    (st, e.join().unwrap(), o.join().unwrap())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

/// A run owns its output directory: another job's `mr-out-*` is refused unless `--overwrite`
/// (which removes it), and `_SUCCESS` is written once every output file is in place.
#[test]
fn mr_stale_output_refused_and_success_marker() {
    let dir = scratch("stale");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("mr-out-7"), "zebra 99\n").unwrap();
    let input = inputs()[5].clone(); // metamorphosis, the smallest
    let o = out.to_str().unwrap();
    let (st, err, _) = mr_run(&dir, &["--app", "wc", "--reduces", "3", "--out", o, &input], Duration::from_secs(30));
    assert!(!st.success(), "a directory holding another job's output was accepted");
    assert!(err.contains("mr-out-7") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("mr-out-7")).unwrap(), "zebra 99\n", "refusal changed nothing");
    let (st, err, _) =
        mr_run(&dir, &["--app", "wc", "--reduces", "3", "--overwrite", "--out", o, &input], Duration::from_secs(30));
    assert!(st.success(), "{err}");
    assert_eq!(names_in(&out), vec!["_SUCCESS", "mr-out-0", "mr-out-1", "mr-out-2"], "the run's own files only");
    let seq = dir.join("seq");
    std::fs::create_dir_all(&seq).unwrap();
    assert!(sixfive(&seq).args(["mr", "sequential", "--app", "wc", "--out", "c", &input]).status().unwrap().success());
    let mut expected: Vec<String> = std::fs::read_to_string(seq.join("c")).unwrap().lines().map(String::from).collect();
    expected.sort();
    assert!(output(&out) == expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A map task longer than the task timeout is not handed out again while its worker is alive:
/// the worker sends heartbeats while the task runs. (Each map run leaves a marker file.)
#[test]
fn mr_long_task_with_heartbeats_runs_once() {
    let dir = scratch("heartbeat");
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let map = format!("touch {}/$$; sleep 3; {STREAM_MAP}", marks.display());
    let o = dir.to_str().unwrap();
    let input = inputs()[5].clone();
    let args = [
        "--app",
        "stream",
        "--map-cmd",
        &map,
        "--reduce-cmd",
        STREAM_REDUCE,
        "--task-timeout-secs",
        "1",
        "--reduces",
        "2",
        "--out",
        o,
        &input,
    ];
    let (st, err, _) = mr_run(&dir, &args, Duration::from_secs(40));
    assert!(st.success(), "{err}");
    assert_eq!(names_in(&marks).len(), 1, "the 3 s map ran more than once although its worker was busy with it");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Workers that die are noticed: the crash app (workers exit mid-task) is restarted until the
/// job is done; workers that die every time fail the run with the reason and a non-zero exit;
/// an output path too long for a UNIX socket does not matter (the sockets live elsewhere).
#[test]
fn mr_run_notices_dead_workers() {
    let dir = scratch("deadworkers");
    let two = [inputs()[5].clone(), inputs()[0].clone()];
    let crash = dir.join("crash");
    std::fs::create_dir_all(&crash).unwrap();
    let c = crash.to_str().unwrap();
    let args = ["--app", "crash", "--workers", "2", "--reduces", "3", "--task-timeout-secs", "2", "--out", c];
    let (st, err, _) = mr_run(&dir, &[&args[..], &[&two[0], &two[1]]].concat(), Duration::from_secs(90));
    assert!(st.success(), "{err}");
    let nocrash = dir.join("nocrash");
    std::fs::create_dir_all(&nocrash).unwrap();
    let n = nocrash.to_str().unwrap();
    let (st, err, _) = mr_run(
        &dir,
        &["--app", "nocrash", "--workers", "2", "--reduces", "3", "--out", n, &two[0], &two[1]],
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    assert!(output(&crash) == output(&nocrash), "crash output differs from nocrash's");

    // The map command kills its worker (its parent) every time.
    let doomed = dir.join("doomed");
    std::fs::create_dir_all(&doomed).unwrap();
    let d = doomed.to_str().unwrap();
    let args = [
        "--app",
        "stream",
        "--map-cmd",
        "kill -9 $PPID",
        "--reduce-cmd",
        "cat",
        "--task-timeout-secs",
        "1",
        "--max-worker-restarts",
        "3",
        "--out",
        d,
        &two[0],
    ];
    let (st, err, _) = mr_run(&dir, &args, Duration::from_secs(40));
    assert!(!st.success(), "a job whose workers always die succeeded");
    assert!(err.contains("worker") && err.contains("signal: 9"), "the reason is given: {err}");
    assert!(names_in(&doomed).is_empty(), "debris left: {:?}", names_in(&doomed));

    let long = dir.join("x".repeat(60)).join("y".repeat(60));
    std::fs::create_dir_all(&long).unwrap();
    let l = long.to_str().unwrap();
    let (st, err, _) = mr_run(
        &dir,
        &["--app", "wc", "--workers", "2", "--reduces", "2", "--out", l, &two[0]],
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    assert_eq!(names_in(&long), vec!["_SUCCESS", "mr-out-0", "mr-out-1"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--listen unix:PATH` never deletes a file that is not a stale socket, and never takes
/// over the socket of a live coordinator.
#[test]
fn mr_listen_refuses_files_and_live_sockets() {
    let dir = scratch("listen");
    let precious = dir.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let input = inputs()[5].clone();
    let o = Command::new(BIN)
        .current_dir(&dir)
        .args(["mr", "coordinator", "--listen", &format!("unix:{}", precious.display()), &input])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a socket"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let mut first = coordinator(&dir, &[]);
    let t0 = Instant::now();
    while status(&dir).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "first coordinator never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = Command::new(BIN)
        .current_dir(&dir)
        .args(["mr", "coordinator", "--listen", &format!("unix:{}", dir.join("coordinator.sock").display()), &input])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_limit(&mut second, Duration::from_secs(10), "second coordinator on a live socket");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!st.success());
    assert!(err.contains("already"), "{err}");
    assert!(status(&dir).is_some_and(|s| s.maps == 8), "the first coordinator still owns its socket");
    first.kill().unwrap();
    first.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Numeric flags out of range are usage errors, never panics.
#[test]
fn mr_numeric_flags_are_range_checked() {
    let dir = scratch("ranges");
    let input = inputs()[5].clone();
    let o = dir.to_str().unwrap();
    for (flag, value) in [
        ("--chunk-mib", "17592186044416"),
        ("--chunk-mib", "0"),
        ("--reduces", "0"),
        ("--reduces", "99999999999"),
        ("--task-timeout-secs", "0"),
        ("--task-timeout-secs", "18446744073709551615"),
        ("--workers", "0"),
        ("--workers", "100000"),
    ] {
        let (st, err, _) = mr_run(&dir, &["--app", "wc", flag, value, "--out", o, &input], Duration::from_secs(20));
        assert_eq!(st.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{flag} {value}: {err}");
    }
    assert!(output(&dir).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A streaming map that fails gives one clean message (no panic backtraces); a map output
/// line without a tab is an error naming the line.
#[test]
fn mr_streaming_errors_are_clean() {
    let dir = scratch("streamerr");
    let input = inputs()[5].clone();
    let o = dir.to_str().unwrap();
    let (st, err, _) = mr_run(
        &dir,
        &["--app", "stream", "--map-cmd", "exit 3", "--reduce-cmd", "cat", "--out", o, &input],
        Duration::from_secs(30),
    );
    assert!(!st.success());
    assert!(err.contains("exit status: 3") && !err.contains("panicked"), "{err}");
    let (st, err, _) = mr_run(
        &dir,
        &["--app", "stream", "--map-cmd", "echo 'no tab here'", "--reduce-cmd", "cat", "--out", o, &input],
        Duration::from_secs(30),
    );
    assert!(!st.success(), "a map line without a tab was accepted");
    assert!(err.contains("no tab here") && err.contains("tab") && !err.contains("panicked"), "{err}");
    assert!(output(&dir).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Inputs named relative to the coordinator's directory are found by a worker started
/// elsewhere.
#[test]
fn mr_relative_inputs_reach_workers_elsewhere() {
    let dir = scratch("relative");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(a.join("data")).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::copy(&inputs()[5], a.join("data/in.txt")).unwrap();
    let sock = format!("unix:{}", dir.join("coordinator.sock").display());
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut c = sixfive(&a)
        .args(["mr", "coordinator", "--listen", &sock, "--reduces", "2", "--out"])
        .arg(&out)
        .arg("data/in.txt")
        .spawn()
        .unwrap();
    let mut w = sixfive(&b).args(["mr", "worker", "--coordinator", &sock, "--app", "wc"]).spawn().unwrap();
    assert!(wait_limit(&mut c, Duration::from_secs(30), "coordinator").success());
    wait_limit(&mut w, Duration::from_secs(30), "worker");
    let seq = dir.join("seq");
    std::fs::create_dir_all(&seq).unwrap();
    assert!(
        sixfive(&seq).args(["mr", "sequential", "--app", "wc", "--out", "c", &inputs()[5]]).status().unwrap().success()
    );
    let mut expected: Vec<String> = std::fs::read_to_string(seq.join("c")).unwrap().lines().map(String::from).collect();
    expected.sort();
    assert!(!expected.is_empty() && output(&out) == expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A worker started before its coordinator waits for it (with backoff) instead of giving up
/// after 5 s; with `--connect-timeout-secs` it gives up when told, saying so.
#[test]
fn mr_worker_waits_for_a_late_coordinator() {
    let dir = scratch("late");
    let sock = format!("unix:{}", dir.join("coordinator.sock").display());
    let o = Command::new(BIN)
        .current_dir(&dir)
        .args(["mr", "worker", "--coordinator", &sock, "--app", "wc", "--connect-timeout-secs", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1 s") && err.contains("coordinator"), "{err}");
    let mut w = sixfive(&dir).args(["mr", "worker", "--coordinator", &sock, "--app", "wc"]).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let mut c = coordinator(&dir, &[]);
    assert!(wait_limit(&mut c, Duration::from_secs(45), "coordinator").success());
    assert!(wait_limit(&mut w, Duration::from_secs(20), "worker").success());
    assert_eq!(output(&dir).len(), 22_107);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn status_at(sock: &Path) -> Option<sixfive_mapreduce::proto::JobStatus> {
    use sixfive_mapreduce::proto::{Addr, Reply, Request, call};
    match call::<_, Reply>(&Addr::Unix(sock.to_path_buf()), &Request::Status) {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
    }
}

/// Polls the coordinator at `sock` until `cond` holds (panics after `limit`).
fn wait_status(
    sock: &Path,
    limit: Duration,
    what: &str,
    cond: impl Fn(&sixfive_mapreduce::proto::JobStatus) -> bool,
) -> sixfive_mapreduce::proto::JobStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = status_at(sock)
            && cond(&s)
        {
            return s;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?} (last status {:?})", status_at(sock));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child killed when dropped (a failing test leaves no process behind).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill9(c: &mut Child) {
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}

/// The coordinator survives SIGKILL: killed mid-map and again mid-reduce, and started again
/// with the same arguments, it resumes from its journal. No finished task runs again (each map
/// and reduce run leaves a marker), and the output equals the sequential run. `mr status`
/// reports the job meanwhile, as text and as JSON.
#[test]
fn mr_coordinator_killed_mid_map_and_mid_reduce_resumes() {
    let dir = scratch("restart");
    let (out, marks) = (dir.join("out"), dir.join("marks"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&marks).unwrap();
    let sock_path = dir.join("coordinator.sock"); // where worker_args looks
    let sock = format!("unix:{}", sock_path.display());
    let start = || {
        Reap(
            sixfive(&dir)
                .args(["mr", "coordinator", "--listen", &sock, "--reduces", "4", "--out"])
                .arg(&out)
                .args(inputs())
                .spawn()
                .unwrap(),
        )
    };
    let map = format!("touch {}/map.$$; sleep 0.4; {STREAM_MAP}", marks.display());
    let reduce = format!("touch {}/reduce.$$; sleep 1; {STREAM_REDUCE}", marks.display());
    let mut c = start();
    let mut ws: Vec<Reap> = (0..2)
        .map(|i| {
            let d = dir.join(format!("w{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let app = ["--app", "stream", "--map-cmd", &map, "--reduce-cmd", &reduce, "--connect-timeout-secs", "30"];
            Reap(worker_args(&dir, &d, &app))
        })
        .collect();
    let s = wait_status(&sock_path, Duration::from_secs(30), "two maps done", |s| s.maps_done >= 2);
    kill9(&mut c.0);
    assert!(s.maps_done < s.maps, "killed mid-map: {s:?}");
    assert!(sock_path.exists(), "SIGKILL leaves the socket file");

    let mut c = start();
    let s = wait_status(&sock_path, Duration::from_secs(10), "restarted coordinator", |_| true);
    assert!(s.resumed_tasks >= 2 && s.maps_done >= 2, "finished maps were not resumed: {s:?}");
    // mr status, for people and as JSON.
    let text = Command::new(BIN).args(["mr", "status", "--coordinator", &sock]).output().unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("map tasks:") && text.contains("reduce tasks:") && text.contains("workers:"), "{text}");
    assert!(text.contains("resumed from the journal"), "{text}");
    let json = Command::new(BIN).args(["mr", "status", "--coordinator", &sock, "-w", "json"]).output().unwrap();
    let json = String::from_utf8_lossy(&json.stdout);
    assert!(json.starts_with('{') && json.contains("\"maps\":8") && json.contains("\"workers\":["), "{json}");

    let s = wait_status(&sock_path, Duration::from_secs(60), "a reduce done", |s| s.reduces_done >= 1);
    kill9(&mut c.0);
    assert!(!s.done && s.reduces_done < s.reduces, "killed mid-reduce: {s:?}");

    let mut c = start();
    assert!(wait_limit(&mut c.0, Duration::from_secs(60), "coordinator after the second restart").success());
    for w in ws.iter_mut() {
        assert!(wait_limit(&mut w.0, Duration::from_secs(20), "worker").success(), "a worker did not exit cleanly");
    }
    let runs = |prefix: &str| names_in(&marks).iter().filter(|n| n.starts_with(prefix)).count();
    assert_eq!(runs("map."), 8, "a map task ran again although it had finished (or was still running)");
    assert_eq!(runs("reduce."), 4, "a reduce task ran again");
    assert!(output(&out) == sequential(&dir, "wc"), "output differs from the sequential run");
    assert_eq!(names_in(&out), vec!["_SUCCESS", "mr-out-0", "mr-out-1", "mr-out-2", "mr-out-3"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `mr run` interrupted (SIGINT) stops its coordinator and workers and leaves nothing behind.
#[test]
fn mr_run_interrupted_leaves_no_debris() {
    let dir = scratch("interrupt");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let map = format!("sleep 30; {STREAM_MAP}");
    let mut run = Command::new(BIN)
        .current_dir(&dir)
        .args(["mr", "run", "--app", "stream", "--map-cmd", &map, "--reduce-cmd", STREAM_REDUCE, "--out"])
        .arg(&out)
        .arg(&inputs()[5])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    let sock = std::env::temp_dir().join(format!("sixfive-mr-{pid}")).join("c.sock");
    let s = wait_status(&sock, Duration::from_secs(20), "job started", |s| s.maps_running == 1);
    assert!(!s.done);
    assert!(Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap().success());
    let st = wait_limit(&mut run, Duration::from_secs(20), "interrupted mr run");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(names_in(&out).is_empty(), "debris in the output directory: {:?}", names_in(&out));
    assert!(!sock.parent().unwrap().exists(), "the socket directory was left");
    // No process of the run is left (coordinator, workers).
    let out_s = out.to_string_lossy().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&out_s) && c.contains(" mr "))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

/// The job page (`--http`), rendered by headless Chromium while the job runs: its script
/// fetched /status.json and drew the phases, the worker and the timeline. A screenshot is
/// left in the target directory and named in the test output. Skipped, saying so, where
/// Chromium is not installed (`.ci/run` installs Debian's `chromium`).
#[test]
fn mr_job_page_in_headless_chromium() {
    let Some(chromium) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists())
    else {
        eprintln!("note: chromium not installed; mr_job_page_in_headless_chromium skipped (apt-get install chromium)");
        return;
    };
    let dir = scratch("page");
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut c = Reap(coordinator(&dir, &["--http", &http]));
    let map = format!("sleep 0.3; {STREAM_MAP}");
    let mut w = Reap(worker_args(&dir, &dir, &["--app", "stream", "--map-cmd", &map, "--reduce-cmd", STREAM_REDUCE]));
    wait_status(&dir.join("coordinator.sock"), Duration::from_secs(20), "two maps done", |s| s.maps_done >= 2);

    let json = http_get(&http, "/status.json");
    assert!(json.starts_with("HTTP/1.1 200") && json.contains("\"timeline\":[{\"kind\":\"map\""), "{json}");
    assert!(http_get(&http, "/etc/passwd").starts_with("HTTP/1.1 404"));

    let browse = |extra: &[&str]| {
        let profile = dir.join(format!("profile-{}", extra.len()));
        Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=3000", "--window-size=1000,700"])
            .args(extra)
            .arg(format!("http://{http}/"))
            .stderr(Stdio::null())
            .output()
            .unwrap()
    };
    let dom = browse(&["--dump-dom"]);
    assert!(dom.status.success());
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("data-loaded=\"yes\""), "the page's script did not load the job's state: {dom}");
    assert!(dom.contains("<td class=\"t\">8</td>") && dom.contains("<td class=\"t\">10</td>"), "phases: {dom}");
    assert!(dom.contains("<tbody><tr><td>"), "no worker row: {dom}");
    assert!(dom.contains("<title>map 0: done</title>"), "no timeline: {dom}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mr-job-page.png");
    assert!(browse(&[&format!("--screenshot={}", shot.display())]).status.success());
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "empty screenshot");
    println!("screenshot of the job page: {}", shot.display());

    assert!(wait_limit(&mut c.0, Duration::from_secs(45), "coordinator").success());
    wait_limit(&mut w.0, Duration::from_secs(20), "worker");
    assert_eq!(output(&dir).len(), 22_107);
    std::fs::remove_dir_all(&dir).unwrap();
}
