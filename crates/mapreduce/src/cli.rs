//! The MapReduce command line: coordinator, worker, sequential reference and whole local jobs.
//!
//! The `sixfive` binary serves these as `sixfive mr ...` with the built-in apps. A program
//! with apps of its own registers them and calls [`main`] with its [`Registry`]; `run` then
//! starts that program's own executable as coordinator and workers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use clap::builder::RangedU64ValueParser;
use clap::{Args, Subcommand};

use crate::app::{App, AppOptions, Registry};
use crate::coordinator::{Coordinator, CoordinatorConfig, SUCCESS_NAME, serve_with};
use crate::journal::{JOURNAL_NAME, JobSpec, Journal};
use crate::proto::{Addr, JobStatus, Listener, Reply, Request, call};
use crate::split::{Chunk, split_inputs};
use crate::worker::{WorkerConfig, run_sequential, run_worker};

/// Peak resident memory of this process, from /proc (Linux), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Which app, for the commands that run one.
#[derive(Args, Clone, Debug)]
pub struct AppArgs {
    /// App name (built-in: wc, indexer, mtiming, rtiming, jobcount, early_exit, crash,
    /// nocrash, stream).
    #[arg(long)]
    pub app: String,
    /// For `--app stream`: shell command for map (chunk on stdin; lines "key TAB value" out).
    #[arg(long)]
    pub map_cmd: Option<String>,
    /// For `--app stream`: shell command for reduce (sorted lines "key TAB value" in).
    #[arg(long)]
    pub reduce_cmd: Option<String>,
}

impl AppArgs {
    fn make(&self, registry: &Registry) -> Result<Box<dyn App>, String> {
        let opts = AppOptions { map_cmd: self.map_cmd.clone(), reduce_cmd: self.reduce_cmd.clone() };
        registry.make(&self.app, &opts).map_err(|e| e.to_string())
    }
}

/// How the job is cut and timed.
#[derive(Args, Clone, Debug)]
pub struct JobArgs {
    /// Reduce tasks (output files mr-out-0, mr-out-1, ...), 1 to 100000.
    #[arg(long, default_value_t = 10, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub reduces: usize,
    /// Directory for the mr-out-* files (and `_SUCCESS`, written last).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Replace another job's output (mr-out-*, _SUCCESS, journal) found in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Map input chunk size in MiB (large files give several map tasks), 1 to 1048576.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub chunk_mib: u64,
    /// A task whose worker is silent this long (no heartbeat) is handed to another worker,
    /// 1 to 86400.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub task_timeout_secs: u64,
    /// Start backup copies of straggling tasks near the end of each phase.
    #[arg(long)]
    pub backup_tasks: bool,
}

/// How `mr status` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON object.
    Json,
}

/// The `mr` subcommands.
#[derive(Subcommand)]
pub enum MrCommand {
    /// Runs a coordinator: splits the inputs and hands out tasks until the job is done. Its
    /// progress is journaled in --out: killed and started again with the same arguments, it
    /// resumes the job.
    Coordinator {
        /// Where to listen: unix:/path/to.sock or host:port.
        #[arg(long)]
        listen: String,
        /// How the job is cut and timed.
        #[command(flatten)]
        job: JobArgs,
        /// Serve the job's web page (phases, tasks, workers, timeline) at this TCP address,
        /// e.g. 127.0.0.1:8080; its data is at /status.json.
        #[arg(long)]
        http: Option<String>,
        /// Log only errors (`mr run` uses this; it shows its own progress).
        #[arg(long, hide = true)]
        quiet: bool,
        /// Append a line "coordinator PID PEAK_RSS_KIB" to this file on exit.
        #[arg(long, hide = true)]
        stats_file: Option<PathBuf>,
        /// Write the job's final status (postcard) to this file on exit (for `mr run`'s summary).
        #[arg(long, hide = true)]
        summary_file: Option<PathBuf>,
        /// Input files.
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Runs a worker until the coordinator says the job is done.
    Worker {
        /// The coordinator's address.
        #[arg(long)]
        coordinator: String,
        /// Which app.
        #[command(flatten)]
        app: AppArgs,
        /// This worker's directory for intermediate files (default: the current directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Where to serve intermediate files (default: a UNIX socket in the work dir, or
        /// 127.0.0.1 on a free port when the coordinator is on TCP).
        #[arg(long)]
        listen: Option<String>,
        /// How long to keep trying to reach the coordinator (at start, and after losing it,
        /// e.g. while it restarts), with backoff; then exit with an error. 1 to 86400.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        connect_timeout_secs: u64,
        /// Append a line "worker PID PEAK_RSS_KIB" to this file on exit.
        #[arg(long, hide = true)]
        stats_file: Option<PathBuf>,
    },
    /// The sequential reference: one process, no RPC; writes one sorted output file. Streams:
    /// memory stays bounded (sorted runs are spilled next to the output and merged).
    Sequential {
        /// Which app.
        #[command(flatten)]
        app: AppArgs,
        /// Output file.
        #[arg(long, default_value = "mr-out-0")]
        out: PathBuf,
        /// Input files.
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Runs a whole job here: a coordinator and N worker processes, with progress and a summary.
    /// Workers that die are restarted; an interrupted run (Ctrl-C) cleans up after itself.
    Run {
        /// Which app.
        #[command(flatten)]
        app: AppArgs,
        /// How the job is cut and timed.
        #[command(flatten)]
        job: JobArgs,
        /// Worker processes, 1 to 1024.
        #[arg(long, default_value_t = 2, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024))]
        workers: usize,
        /// Worker restarts (after a worker died) before the run gives up, 0 to 100000.
        #[arg(long, default_value_t = 20, value_parser = RangedU64ValueParser::<usize>::new().range(0..=100_000))]
        max_worker_restarts: usize,
        /// Use TCP on 127.0.0.1 instead of UNIX sockets.
        #[arg(long)]
        tcp: bool,
        /// Input files.
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Prints a running job's state: tasks per phase and state, workers and when each was
    /// last heard from, bytes, elapsed time and an estimate of the time left.
    Status {
        /// The coordinator's address.
        #[arg(long)]
        coordinator: String,
        /// Output format.
        #[arg(short = 'w', long = "output", value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

fn write_stats(path: &Option<PathBuf>, role: &str) {
    if let (Some(p), Some(kib)) = (path, peak_rss_kib()) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
            // One write call: appends of concurrent processes do not interleave.
            let _ = f.write_all(format!("{role} {} {kib}\n", std::process::id()).as_bytes());
        }
    }
}

/// A job checked and resolved: its chunks (absolute paths), its absolute output directory.
struct Job {
    chunks: Vec<Chunk>,
    out: PathBuf,
    spec: JobSpec,
}

/// Checks a job's arguments before anything starts; resolves inputs and the output directory
/// to absolute paths (workers may run in other directories).
fn validate_job(job: &JobArgs, inputs: &[String]) -> Result<Job, String> {
    let out = job.out.canonicalize().map_err(|e| format!("output directory {}: {e}", job.out.display()))?;
    if !out.is_dir() {
        return Err(format!("output directory {} is not a directory", job.out.display()));
    }
    let mut abs = Vec::with_capacity(inputs.len());
    for f in inputs {
        let p = std::fs::canonicalize(f).map_err(|e| format!("input {f}: {e}"))?;
        abs.push(p.to_str().ok_or_else(|| format!("input {f}: the path is not UTF-8"))?.to_string());
    }
    let chunks = split_inputs(&abs, job.chunk_mib << 20)?;
    let spec =
        JobSpec { chunks: chunks.iter().map(|c| (c.file.clone(), c.offset, c.len)).collect(), n_reduce: job.reduces };
    Ok(Job { chunks, out, spec })
}

fn is_output_name(name: &str) -> bool {
    name.starts_with("mr-out-") || name == SUCCESS_NAME
}

/// A run owns its output directory. Another job's output (`mr-out-*`, `_SUCCESS`, or a
/// journal of a different job) is refused, or with `overwrite` removed (only if `apply`).
/// Output of this same job with its journal is the job being resumed, and is kept.
fn prepare_output(job: &Job, overwrite: bool, apply: bool) -> Result<(), String> {
    let journal = job.out.join(JOURNAL_NAME);
    let journal_ours = Journal::job_of(&journal).is_some_and(|s| s == job.spec);
    if journal_ours {
        return Ok(());
    }
    let mut found: Vec<String> = std::fs::read_dir(&job.out)
        .map_err(|e| format!("{}: {e}", job.out.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| is_output_name(n) || n == JOURNAL_NAME)
        .collect();
    found.sort();
    if found.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let shown: Vec<&str> = found.iter().take(5).map(String::as_str).collect();
        return Err(format!(
            "{} holds another job's output ({}{}); use another --out, or --overwrite to replace it",
            job.out.display(),
            shown.join(", "),
            if found.len() > shown.len() { format!(" and {} more", found.len() - shown.len()) } else { String::new() }
        ));
    }
    if apply {
        for n in found {
            std::fs::remove_file(job.out.join(&n)).map_err(|e| format!("removing {n}: {e}"))?;
        }
    }
    Ok(())
}

fn coordinator_config(job: &JobArgs, out: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        n_reduce: job.reduces,
        out_dir: out.to_string_lossy().to_string(),
        task_timeout: Duration::from_secs(job.task_timeout_secs),
        backup_tasks: job.backup_tasks,
        max_task_failures: 4,
    }
}

fn run_coordinator(
    listen: &str,
    job: &JobArgs,
    http: Option<&str>,
    quiet: bool,
    inputs: &[String],
) -> Result<JobStatus, String> {
    let addr: Addr = listen.parse().map_err(|e: crate::proto::BadAddr| e.to_string())?;
    let resolved = validate_job(job, inputs)?;
    let http = match http {
        Some(h) => Some(std::net::TcpListener::bind(h).map_err(|e| format!("--http {h}: {e}"))?),
        None => None,
    };
    let listener = Listener::bind(&addr).map_err(|e| format!("cannot listen at {addr}: {e}"))?;
    prepare_output(&resolved, job.overwrite, true)?;
    let (journal, records) =
        Journal::open(&resolved.out.join(JOURNAL_NAME), &resolved.spec).map_err(|e| e.to_string())?;
    let journal_path = journal.path().to_path_buf();
    if let (Some(h), false) = (&http, quiet)
        && let Ok(a) = h.local_addr()
    {
        eprintln!("[coordinator] job page at http://{a}/");
    }
    if !quiet {
        eprintln!(
            "[coordinator] listening at {addr}: {} map tasks over {} inputs ({:.1} MB), {} reduce tasks, output in {}",
            resolved.chunks.len(),
            inputs.len(),
            resolved.chunks.iter().map(|c| c.len).sum::<u64>() as f64 / 1e6,
            job.reduces,
            resolved.out.display()
        );
    }
    let coord = Coordinator::with_journal(coordinator_config(job, &resolved.out), resolved.chunks, journal, records);
    // No linger: waiting workers are told to exit the moment the job is done (long poll), and
    // the coordinator stays until every worker it heard from lately has been told.
    let st = serve_with(listener, coord, Duration::ZERO, quiet, http);
    if st.failed.is_some() {
        let _ = std::fs::remove_file(journal_path); // a failed job is over; a new run starts afresh
    }
    Ok(st)
}

/// Runs a MapReduce command with the apps of `registry`. `prefix` is what this executable
/// needs before `coordinator`/`worker` on its command line (`["mr"]` for `sixfive`), so
/// that `run` can start it again as the coordinator and the workers.
pub fn main(cmd: MrCommand, registry: &Registry, prefix: &[&str]) -> ExitCode {
    match cmd {
        MrCommand::Coordinator { listen, job, http, quiet, stats_file, summary_file, inputs } => {
            let r = run_coordinator(&listen, &job, http.as_deref(), quiet, &inputs);
            write_stats(&stats_file, "coordinator");
            if let (Some(p), Ok(st)) = (&summary_file, &r)
                && let Ok(bytes) = postcard::to_allocvec(st)
            {
                let _ = std::fs::write(p, bytes);
            }
            match r {
                Err(e) => fail(e),
                Ok(JobStatus { failed: Some(why), .. }) => fail(format!("job failed: {why}")),
                Ok(_) => ExitCode::SUCCESS,
            }
        }
        MrCommand::Worker { coordinator, app, work_dir, listen, connect_timeout_secs, stats_file } => {
            let app = match app.make(registry) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let coordinator: Addr = match coordinator.parse() {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let work_dir = work_dir.unwrap_or_else(|| PathBuf::from("."));
            let listen = match listen {
                Some(l) => match l.parse() {
                    Ok(a) => a,
                    Err(e) => return fail(e),
                },
                None => match coordinator {
                    Addr::Unix(_) => Addr::Unix(work_dir.join(format!(".mr-worker-{}.sock", std::process::id()))),
                    Addr::Tcp(_) => Addr::Tcp("127.0.0.1:0".into()),
                },
            };
            let cfg = WorkerConfig {
                coordinator,
                listen,
                work_dir,
                connect_patience: Duration::from_secs(connect_timeout_secs),
            };
            let r = run_worker(cfg, Arc::from(app));
            write_stats(&stats_file, "worker");
            match r {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        MrCommand::Sequential { app, out, inputs } => {
            let app = match app.make(registry) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            match run_sequential(app.as_ref(), &inputs, &out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        MrCommand::Run { app, job, workers, max_worker_restarts, tcp, inputs } => {
            run_job_with(registry, prefix, &app, &job, workers, max_worker_restarts, tcp, &inputs)
        }
        MrCommand::Status { coordinator, format } => {
            let addr: Addr = match coordinator.parse() {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            match call::<_, Reply>(&addr, &Request::Status) {
                Ok(Reply::Status(s)) => {
                    match format {
                        Format::Text => print!("{}", status_text(&s)),
                        Format::Json => println!("{}", status_json(&s)),
                    }
                    ExitCode::SUCCESS
                }
                Ok(other) => fail(format!("unexpected reply from {addr}: {other:?}")),
                Err(e) => fail(format!("no coordinator answers at {addr}: {e}")),
            }
        }
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// `mr status` for people.
pub fn status_text(s: &JobStatus) -> String {
    let state = match (&s.failed, s.done) {
        (Some(why), _) => format!("failed: {why}"),
        (None, true) => "done".to_string(),
        (None, false) if s.maps_done < s.maps => "map phase".to_string(),
        (None, false) => "reduce phase".to_string(),
    };
    let mut o = format!("job: {state}\n");
    o += &format!(
        "  map tasks:    {:>6} done {:>6} running {:>6} waiting   (of {})\n",
        s.maps_done,
        s.maps_running,
        s.maps - s.maps_done - s.maps_running.min(s.maps - s.maps_done),
        s.maps
    );
    o += &format!(
        "  reduce tasks: {:>6} done {:>6} running {:>6} waiting   (of {})\n",
        s.reduces_done,
        s.reduces_running,
        s.reduces - s.reduces_done - s.reduces_running.min(s.reduces - s.reduces_done),
        s.reduces
    );
    o += &format!(
        "  bytes: {:.1} of {:.1} MB mapped, {:.1} MB intermediate, {:.1} MB out\n",
        s.bytes_in as f64 / 1e6,
        s.bytes_total as f64 / 1e6,
        s.bytes_intermediate as f64 / 1e6,
        s.bytes_out as f64 / 1e6
    );
    o += &format!(
        "  elapsed {}; {}; {} map tasks re-executed, {} backups{}\n",
        secs(s.elapsed_ms),
        match s.eta_ms {
            Some(ms) => format!("about {} left", secs(ms)),
            None => "time left unknown yet".to_string(),
        },
        s.reexecuted,
        s.backups,
        if s.resumed_tasks > 0 {
            format!(", {} tasks resumed from the journal", s.resumed_tasks)
        } else {
            String::new()
        }
    );
    o += &format!("  workers: {}\n", s.worker_list.len());
    for w in &s.worker_list {
        o += &format!(
            "    {:016x}  {}  heard {} ago  {} tasks done  {}\n",
            w.id,
            w.addr,
            secs(w.last_heard_ms),
            w.tasks_done,
            w.running.as_deref().map(|r| format!("running {r}")).unwrap_or_else(|| "idle".into())
        );
    }
    o
}

/// `mr status -w json`: one JSON object (also what the job page reads).
pub fn status_json(s: &JobStatus) -> String {
    crate::web::status_json(s)
}

fn status(addr: &Addr) -> Option<JobStatus> {
    match call::<_, Reply>(addr, &Request::Status) {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
    }
}

/// Set by SIGINT, SIGTERM or SIGHUP while `run` runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Everything a run made, removed however it ends.
struct RunDirs {
    job_dir: PathBuf,
    sock_dir: PathBuf,
}

impl Drop for RunDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.job_dir);
        let _ = std::fs::remove_dir_all(&self.sock_dir);
    }
}

/// A whole job on this machine: this executable started again as the coordinator and as
/// `workers` workers. Returns the coordinator's exit status.
pub fn run_job(
    registry: &Registry,
    prefix: &[&str],
    app: &AppArgs,
    job: &JobArgs,
    workers: usize,
    tcp: bool,
    inputs: &[String],
) -> ExitCode {
    run_job_with(registry, prefix, app, job, workers, 20, tcp, inputs)
}

fn kill_all(coord: &mut Child, kids: &mut [Option<Child>]) {
    let _ = coord.kill();
    let _ = coord.wait();
    for k in kids.iter_mut().flatten() {
        let _ = k.kill();
        let _ = k.wait();
    }
}

/// [`run_job`], restarting dead workers up to `max_restarts` times in all.
#[allow(clippy::too_many_arguments)]
pub fn run_job_with(
    registry: &Registry,
    prefix: &[&str],
    app: &AppArgs,
    job: &JobArgs,
    workers: usize,
    max_restarts: usize,
    tcp: bool,
    inputs: &[String],
) -> ExitCode {
    // Everything that can be wrong is checked before any process starts.
    if let Err(e) = app.make(registry) {
        return fail(e);
    }
    if workers == 0 {
        return fail("--workers must be at least 1");
    }
    let resolved = match validate_job(job, inputs) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Err(e) = prepare_output(&resolved, job.overwrite, false) {
        return fail(e);
    }
    catch_interrupts();
    let pid = std::process::id();
    // Sockets live in a short directory of their own (an output path may be too long for a
    // UNIX socket); intermediate data lives next to the output.
    let dirs = RunDirs {
        job_dir: resolved.out.join(format!(".mr-job-{pid}")),
        sock_dir: std::env::temp_dir().join(format!("sixfive-mr-{pid}")),
    };
    for d in [&dirs.job_dir, &dirs.sock_dir] {
        if let Err(e) = std::fs::create_dir_all(d) {
            return fail(format!("{}: {e}", d.display()));
        }
    }
    let addr = if tcp {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        match port {
            Ok(p) => format!("127.0.0.1:{p}"),
            Err(e) => return fail(e),
        }
    } else {
        format!("unix:{}", dirs.sock_dir.join("c.sock").display())
    };
    let a: Addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => return fail(format!("{e} (set TMPDIR to a shorter directory)")),
    };
    let stats = dirs.job_dir.join("stats");
    let summary = dirs.job_dir.join("summary");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let started = Instant::now();
    let mut coord = Command::new(&exe);
    coord
        .args(prefix)
        .args(["coordinator", "--quiet", "--listen", &addr, "--reduces", &job.reduces.to_string()])
        .args(["--chunk-mib", &job.chunk_mib.to_string(), "--task-timeout-secs", &job.task_timeout_secs.to_string()])
        .arg("--out")
        .arg(&resolved.out)
        .arg("--stats-file")
        .arg(&stats)
        .arg("--summary-file")
        .arg(&summary);
    if job.backup_tasks {
        coord.arg("--backup-tasks");
    }
    if job.overwrite {
        coord.arg("--overwrite");
    }
    let mut coord = match coord.args(inputs).spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the coordinator: {e}")),
    };
    let spawn_worker = |i: usize, generation: usize| -> std::io::Result<Child> {
        let dir = dirs.job_dir.join(format!("worker-{i}"));
        let mut w = Command::new(&exe);
        w.args(prefix)
            .args(["worker", "--coordinator", &addr, "--app", &app.app])
            .arg("--work-dir")
            .arg(&dir)
            .arg("--stats-file")
            .arg(&stats);
        if !tcp {
            w.arg("--listen").arg(format!("unix:{}", dirs.sock_dir.join(format!("w{i}-{generation}.sock")).display()));
        }
        if let Some(m) = &app.map_cmd {
            w.args(["--map-cmd", m]);
        }
        if let Some(r) = &app.reduce_cmd {
            w.args(["--reduce-cmd", r]);
        }
        w.stdout(Stdio::null()).spawn()
    };
    let mut kids: Vec<Option<Child>> = Vec::new();
    for i in 0..workers {
        match spawn_worker(i, 0) {
            Ok(c) => kids.push(Some(c)),
            Err(e) => {
                kill_all(&mut coord, &mut kids);
                return fail(format!("cannot start worker {i}: {e}"));
            }
        }
    }
    let total = (resolved.chunks.len() + job.reduces) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} tasks  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last = JobStatus::default();
    let mut restarts = 0;
    let mut polls = 0u64;
    let mut generation = vec![0usize; workers];
    let cleanup_failed_output = || {
        let _ = std::fs::remove_file(resolved.out.join(JOURNAL_NAME));
        if let Ok(d) = std::fs::read_dir(&resolved.out) {
            for e in d.flatten() {
                if is_output_name(&e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    };
    let code = loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bar.finish_and_clear();
            kill_all(&mut coord, &mut kids);
            cleanup_failed_output();
            eprintln!("interrupted: stopped the coordinator and the workers, removed the job's files");
            return ExitCode::from(130);
        }
        // Progress every 100 ms; exits are noticed within 5 ms (the job's own time is short).
        polls += 1;
        if polls % 20 == 1
            && let Some(s) = status(&a)
        {
            bar.set_position((s.maps_done + s.reduces_done) as u64);
            bar.set_message(format!(
                "map {}/{} reduce {}/{}  {:.1} MB in",
                s.maps_done,
                s.maps,
                s.reduces_done,
                s.reduces,
                s.bytes_in as f64 / 1e6
            ));
            last = s;
        }
        if let Ok(Some(st)) = coord.try_wait() {
            break st;
        }
        // A worker that died is restarted (its lost work is redone); one that keeps dying
        // ends the run with the reason.
        for i in 0..workers {
            let Some(k) = kids[i].as_mut() else { continue };
            let Ok(Some(st)) = k.try_wait() else { continue };
            kids[i] = None;
            if st.success() || last.done {
                continue; // told to exit
            }
            if restarts >= max_restarts {
                bar.finish_and_clear();
                kill_all(&mut coord, &mut kids);
                cleanup_failed_output();
                return fail(format!(
                    "worker {i} died ({st}) and {restarts} restarts are used up (--max-worker-restarts); \
                     see the workers' messages above"
                ));
            }
            restarts += 1;
            generation[i] += 1;
            bar.println(format!("worker {i} died ({st}); restarting it ({restarts}/{max_restarts})"));
            match spawn_worker(i, generation[i]) {
                Ok(c) => kids[i] = Some(c),
                Err(e) => {
                    bar.finish_and_clear();
                    kill_all(&mut coord, &mut kids);
                    cleanup_failed_output();
                    return fail(format!("cannot restart worker {i}: {e}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    bar.finish_and_clear();
    // Workers exit when told; the coordinator told every one it heard from before exiting. A
    // worker still around after a moment never reached it (started too late to get any work:
    // the job is over and its files are removed with the run's directory) and is stopped.
    let deadline = Instant::now() + Duration::from_millis(500);
    for k in kids.iter_mut().flatten() {
        while Instant::now() < deadline && matches!(k.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = k.kill();
        let _ = k.wait();
    }
    let wall = started.elapsed();
    // The coordinator's last word (it may have exited between two polls).
    if let Some(st) = std::fs::read(&summary).ok().and_then(|b| postcard::from_bytes::<JobStatus>(&b).ok()) {
        last = st;
    }
    let rss = std::fs::read_to_string(&stats).unwrap_or_default();
    drop(dirs);
    if !code.success() {
        cleanup_failed_output();
        eprintln!("job failed ({code}); see the coordinator's message above");
        return ExitCode::FAILURE;
    }
    let mb = last.bytes_in as f64 / 1e6;
    println!(
        "done in {:.2} s: {} map and {} reduce tasks on {workers} workers, {:.1} MB in ({:.1} MB/s), {:.1} MB intermediate, {:.1} MB out",
        wall.as_secs_f64(),
        last.maps,
        last.reduces,
        mb,
        mb / wall.as_secs_f64().max(1e-9),
        last.bytes_intermediate as f64 / 1e6,
        last.bytes_out as f64 / 1e6,
    );
    if last.reexecuted > 0 || last.backups > 0 || restarts > 0 {
        println!(
            "  {} map tasks re-executed, {} backup tasks, {restarts} worker restarts",
            last.reexecuted, last.backups
        );
    }
    for line in rss.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [role, pid, kib] = parts[..] {
            let mib = kib.parse::<f64>().unwrap_or(0.0) / 1024.0;
            println!("  peak RSS {role:<11} pid {pid:>7}: {mib:.1} MiB");
        }
    }
    println!("  output: {} ({} files and _SUCCESS)", resolved.out.join("mr-out-*").display(), job.reduces);
    ExitCode::SUCCESS
}
