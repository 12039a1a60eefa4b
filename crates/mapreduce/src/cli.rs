//! The MapReduce command line: coordinator, worker, sequential reference and whole local jobs.
//!
//! The `sixfive` binary serves these as `sixfive mr ...` with the built-in apps. A program
//! with apps of its own registers them and calls [`main`] with its [`Registry`]; `run` then
//! starts that program's own executable as coordinator and workers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::app::{App, AppOptions, Registry};
use crate::coordinator::{Coordinator, CoordinatorConfig, serve};
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
    /// Reduce tasks (output files mr-out-0, mr-out-1, ...).
    #[arg(long, default_value_t = 10)]
    pub reduces: usize,
    /// Directory for the mr-out-* files.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Map input chunk size in MiB (large files give several map tasks).
    #[arg(long, default_value_t = 64)]
    pub chunk_mib: u64,
    /// A task silent this long is handed to another worker.
    #[arg(long, default_value_t = 10)]
    pub task_timeout_secs: u64,
    /// Start backup copies of straggling tasks near the end of each phase.
    #[arg(long)]
    pub backup_tasks: bool,
}

/// The `mr` subcommands.
#[derive(Subcommand)]
pub enum MrCommand {
    /// Runs a coordinator: splits the inputs and hands out tasks until the job is done.
    Coordinator {
        /// Where to listen: unix:/path/to.sock or host:port.
        #[arg(long)]
        listen: String,
        /// How the job is cut and timed.
        #[command(flatten)]
        job: JobArgs,
        /// Append a line "coordinator PID PEAK_RSS_KIB" to this file on exit.
        #[arg(long, hide = true)]
        stats_file: Option<PathBuf>,
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
        /// Append a line "worker PID PEAK_RSS_KIB" to this file on exit.
        #[arg(long, hide = true)]
        stats_file: Option<PathBuf>,
    },
    /// The sequential reference: one process, no RPC; writes one sorted output file.
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
    Run {
        /// Which app.
        #[command(flatten)]
        app: AppArgs,
        /// How the job is cut and timed.
        #[command(flatten)]
        job: JobArgs,
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Use TCP on 127.0.0.1 instead of UNIX sockets.
        #[arg(long)]
        tcp: bool,
        /// Input files.
        #[arg(required = true)]
        inputs: Vec<String>,
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

fn coordinator_config(job: &JobArgs) -> CoordinatorConfig {
    CoordinatorConfig {
        n_reduce: job.reduces,
        out_dir: job.out.to_string_lossy().to_string(),
        task_timeout: Duration::from_secs(job.task_timeout_secs),
        backup_tasks: job.backup_tasks,
        max_task_failures: 4,
    }
}

/// Checks a job's arguments before anything starts.
fn validate_job(job: &JobArgs, inputs: &[String]) -> Result<Vec<Chunk>, String> {
    if job.reduces == 0 || job.chunk_mib == 0 || job.task_timeout_secs == 0 {
        return Err("--reduces, --chunk-mib and --task-timeout-secs must be at least 1".into());
    }
    if !job.out.is_dir() {
        return Err(format!("output directory {} does not exist", job.out.display()));
    }
    split_inputs(inputs, job.chunk_mib << 20)
}

/// Runs a MapReduce command with the apps of `registry`. `prefix` is what this executable
/// needs before `coordinator`/`worker` on its command line (`["mr"]` for `sixfive`), so
/// that `run` can start it again as the coordinator and the workers.
pub fn main(cmd: MrCommand, registry: &Registry, prefix: &[&str]) -> ExitCode {
    match cmd {
        MrCommand::Coordinator { listen, job, stats_file, inputs } => {
            let addr: Addr = match listen.parse() {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let chunks = match validate_job(&job, &inputs) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let listener = match Listener::bind(&addr) {
                Ok(l) => l,
                Err(e) => return fail(format!("cannot listen at {addr}: {e}")),
            };
            let st = serve(listener, Coordinator::new(coordinator_config(&job), chunks), Duration::from_millis(200));
            write_stats(&stats_file, "coordinator");
            match st.failed {
                Some(why) => fail(format!("job failed: {why}")),
                None => ExitCode::SUCCESS,
            }
        }
        MrCommand::Worker { coordinator, app, work_dir, listen, stats_file } => {
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
            let cfg = WorkerConfig { coordinator, listen, work_dir, connect_patience: Duration::from_secs(5) };
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
        MrCommand::Run { app, job, workers, tcp, inputs } => {
            run_job(registry, prefix, &app, &job, workers, tcp, &inputs)
        }
    }
}

fn status(addr: &Addr) -> Option<JobStatus> {
    match call::<_, Reply>(addr, &Request::Status) {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
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
    // Everything that can be wrong is checked before any process starts.
    if let Err(e) = app.make(registry) {
        return fail(e);
    }
    if workers == 0 {
        return fail("--workers must be at least 1");
    }
    let chunks = match validate_job(job, inputs) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let job_dir = job.out.join(format!(".mr-job-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&job_dir) {
        return fail(format!("{}: {e}", job_dir.display()));
    }
    let addr = if tcp {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        match port {
            Ok(p) => format!("127.0.0.1:{p}"),
            Err(e) => return fail(e),
        }
    } else {
        format!("unix:{}", job_dir.join("coordinator.sock").display())
    };
    let stats = job_dir.join("stats");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let started = Instant::now();
    let mut coord = Command::new(&exe);
    coord
        .args(prefix)
        .args(["coordinator", "--listen", &addr, "--reduces", &job.reduces.to_string()])
        .args(["--chunk-mib", &job.chunk_mib.to_string(), "--task-timeout-secs", &job.task_timeout_secs.to_string()])
        .arg("--out")
        .arg(&job.out)
        .arg("--stats-file")
        .arg(&stats);
    if job.backup_tasks {
        coord.arg("--backup-tasks");
    }
    let mut coord = match coord.args(inputs).spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the coordinator: {e}")),
    };
    let mut kids: Vec<Child> = Vec::new();
    for i in 0..workers {
        let dir = job_dir.join(format!("worker-{i}"));
        let mut w = Command::new(&exe);
        w.args(prefix)
            .args(["worker", "--coordinator", &addr, "--app", &app.app])
            .arg("--work-dir")
            .arg(&dir)
            .arg("--stats-file")
            .arg(&stats);
        if let Some(m) = &app.map_cmd {
            w.args(["--map-cmd", m]);
        }
        if let Some(r) = &app.reduce_cmd {
            w.args(["--reduce-cmd", r]);
        }
        match w.stdout(Stdio::null()).spawn() {
            Ok(c) => kids.push(c),
            Err(e) => {
                let _ = coord.kill();
                return fail(format!("cannot start worker {i}: {e}"));
            }
        }
    }
    let a: Addr = addr.parse().expect("we made it");
    let total = (chunks.len() + job.reduces) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} tasks  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last = JobStatus::default();
    let mut done_at = None;
    let code = loop {
        if let Some(s) = status(&a) {
            if s.done && done_at.is_none() {
                done_at = Some(started.elapsed());
            }
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
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let wall = done_at.unwrap_or_else(|| started.elapsed());
    // Workers exit when told or when they find the coordinator gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    for k in kids.iter_mut() {
        while Instant::now() < deadline && matches!(k.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = k.kill();
        let _ = k.wait();
    }
    let rss = std::fs::read_to_string(&stats).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&job_dir);
    if !code.success() {
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
    if last.reexecuted > 0 || last.backups > 0 {
        println!("  {} map tasks re-executed, {} backup tasks", last.reexecuted, last.backups);
    }
    for line in rss.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [role, pid, kib] = parts[..] {
            let mib = kib.parse::<f64>().unwrap_or(0.0) / 1024.0;
            println!("  peak RSS {role:<11} pid {pid:>7}: {mib:.1} MiB");
        }
    }
    println!("  output: {}", Path::new(&job.out).join("mr-out-*").display());
    ExitCode::SUCCESS
}
