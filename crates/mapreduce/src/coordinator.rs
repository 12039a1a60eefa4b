//! The coordinator: hands out tasks, notices lost and slow ones, knows when the job is done.
//!
//! [`Coordinator`] is a state machine: every decision takes the request and the time, so its
//! rules are unit-tested without processes. Its only IO is the optional [`Journal`] (and the
//! `_SUCCESS` marker at the end). [`serve`] runs it behind a socket.
//!
//! Rules:
//! - Map tasks first; reduce tasks once every map task is done.
//! - Workers send heartbeats while a task runs. An attempt not heard from (no heartbeat, no
//!   result) within the task timeout is presumed lost: the task is handed to the next worker
//!   that asks. A long task whose worker keeps sending heartbeats is never run twice.
//! - With backup tasks on, once no task of the phase is waiting, a task running much longer
//!   than the phase's typical task gets one backup attempt; the first to finish wins.
//! - A reducer that cannot fetch a map output reports it; every map task whose output lived at
//!   that address runs again (the worker is presumed dead), as in the MapReduce paper.
//! - A task that fails (app error) too often fails the job, with the reason.
//! - With a journal, every finished task is recorded (fsynced) before it is acknowledged; a
//!   coordinator restarted on the same job resumes from it: finished tasks are not run again,
//!   tasks that were running are offered again once their attempt has been silent for the
//!   task timeout (their workers' heartbeats, reaching the new coordinator, keep them).
//! - When every reduce task is done, `_SUCCESS` is written in the output directory (last),
//!   and the journal is removed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::journal::{Journal, Record};
use crate::proto::{Addr, JobStatus, Listener, Reply, Request, Task, WorkerId, WorkerInfo, recv, send};
use crate::split::Chunk;

/// Name of the marker written in the output directory once every output file is in place.
pub const SUCCESS_NAME: &str = "_SUCCESS";

/// How the job runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Reduce tasks (output files).
    pub n_reduce: usize,
    /// Where `mr-out-*` go.
    pub out_dir: String,
    /// An attempt silent for this long is presumed lost.
    pub task_timeout: Duration,
    /// Start backup copies of stragglers near the end of a phase.
    pub backup_tasks: bool,
    /// Failures (app errors) of one task that fail the job.
    pub max_task_failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Status {
    Idle,
    Running,
    /// Finished by the attempt `attempt` of the worker serving at `addr`.
    Done {
        addr: String,
        attempt: u64,
    },
}

#[derive(Clone, Debug)]
struct Attempt {
    worker: WorkerId,
    started: Duration,
    /// Last heartbeat (or the start).
    heard: Duration,
}

#[derive(Clone, Debug)]
struct TaskState {
    status: Status,
    /// Attempts in flight.
    attempts: Vec<Attempt>,
    failures: u32,
    /// How long the winning attempt took.
    took: Option<Duration>,
}

impl TaskState {
    fn new() -> TaskState {
        TaskState { status: Status::Idle, attempts: Vec::new(), failures: 0, took: None }
    }
    fn done(&self) -> bool {
        matches!(self.status, Status::Done { .. })
    }
}

/// One task attempt, for the job page's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Map (true) or reduce.
    pub map: bool,
    /// Which task.
    pub task: usize,
    /// Which worker ran it.
    pub worker: WorkerId,
    /// When it started (ms since this coordinator started).
    pub start_ms: u64,
    /// When it ended, if it has.
    pub end_ms: Option<u64>,
    /// "running", "done", "superseded" (another attempt won), "failed", "lost" (its worker
    /// went silent), or "fetch failed".
    pub outcome: &'static str,
}

/// Spans kept for the timeline (a bigger job's page shows the first ones).
const MAX_SPANS: usize = 100_000;

#[derive(Clone, Debug)]
struct WorkerState {
    addr: String,
    heard: Duration,
    tasks_done: u64,
    told_exit: bool,
}

/// The coordinator's state.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    chunks: Vec<Chunk>,
    maps: Vec<TaskState>,
    reduces: Vec<TaskState>,
    workers: BTreeMap<WorkerId, WorkerState>,
    status: JobStatus,
    /// Attempt ids: a random base per coordinator plus a counter, so no two attempts of this
    /// or any other job (or an earlier run of this one) share file names.
    next_attempt: u64,
    journal: Option<Journal>,
    /// Log lines not yet printed, for [`serve`].
    events: Vec<String>,
    /// When the map phase ended (this run), and when the job did.
    map_phase_done: Option<Duration>,
    done_at: Option<Duration>,
    /// Every attempt, for the timeline.
    spans: Vec<Span>,
}

/// Milliseconds, saturating.
fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Coordinator {
    /// A job over `chunks`, with no journal.
    pub fn new(cfg: CoordinatorConfig, chunks: Vec<Chunk>) -> Coordinator {
        assert!(cfg.n_reduce > 0, "at least one reduce task");
        let status = JobStatus {
            maps: chunks.len(),
            reduces: cfg.n_reduce,
            bytes_total: chunks.iter().map(|c| c.len).sum(),
            ..Default::default()
        };
        Coordinator {
            maps: vec![TaskState::new(); chunks.len()],
            reduces: vec![TaskState::new(); cfg.n_reduce],
            cfg,
            chunks,
            workers: BTreeMap::new(),
            status,
            next_attempt: job_nonce() << 24,
            journal: None,
            events: Vec::new(),
            map_phase_done: None,
            done_at: None,
            spans: Vec::new(),
        }
    }

    /// A job that journals its progress to `journal`, resumed from `records` (what the
    /// journal held when opened; empty for a new job).
    pub fn with_journal(cfg: CoordinatorConfig, chunks: Vec<Chunk>, journal: Journal, records: Vec<Record>) -> Self {
        let mut c = Coordinator::new(cfg, chunks);
        for r in records {
            c.replay(r);
        }
        for t in c.maps.iter_mut().chain(c.reduces.iter_mut()) {
            if t.done() {
                t.attempts.clear();
            }
        }
        c.status.resumed_tasks = c.status.maps_done + c.status.reduces_done;
        if c.status.resumed_tasks > 0 {
            let running = c.maps.iter().chain(&c.reduces).filter(|t| t.status == Status::Running).count();
            c.log(format!(
                "resuming from {}: {}/{} map and {}/{} reduce tasks already done; {running} were running \
                 (offered again if their workers stay silent for {} s)",
                journal.path().display(),
                c.status.maps_done,
                c.status.maps,
                c.status.reduces_done,
                c.status.reduces,
                c.cfg.task_timeout.as_secs()
            ));
        }
        c.journal = Some(journal);
        c
    }

    fn replay(&mut self, r: Record) {
        match r {
            Record::Job(_) => {}
            Record::Started { map, task, worker } => {
                let tasks = if map { &mut self.maps } else { &mut self.reduces };
                if let Some(t) = tasks.get_mut(task)
                    && !t.done()
                {
                    t.status = Status::Running;
                    t.attempts.retain(|a| a.worker != worker);
                    t.attempts.push(Attempt { worker, started: Duration::ZERO, heard: Duration::ZERO });
                }
            }
            Record::MapDone { task, addr, attempt, bytes_in, bytes_out } => {
                if let Some(t) = self.maps.get_mut(task)
                    && !t.done()
                {
                    t.status = Status::Done { addr, attempt };
                    self.status.maps_done += 1;
                    self.status.bytes_in += bytes_in;
                    self.status.bytes_intermediate += bytes_out;
                }
            }
            Record::MapLost { task } => {
                if let Some(t) = self.maps.get_mut(task)
                    && t.done()
                {
                    t.status = Status::Idle;
                    self.status.maps_done -= 1;
                }
            }
            Record::ReduceDone { task, bytes_out } => {
                if let Some(t) = self.reduces.get_mut(task)
                    && !t.done()
                {
                    t.status = Status::Done { addr: String::new(), attempt: 0 };
                    self.status.reduces_done += 1;
                    self.status.bytes_out += bytes_out;
                }
            }
        }
        self.status.done = self.status.reduces_done == self.reduces.len();
    }

    /// Journals `r` (durably if `sync`). A journal that cannot be written fails the job: an
    /// acknowledgement the coordinator could forget is not given.
    fn journal(&mut self, r: Record, sync: bool) -> bool {
        if let Some(j) = &mut self.journal
            && let Err(e) = j.append(&r, sync)
        {
            let why = format!("cannot write the journal {}: {e}", j.path().display());
            self.log(why.clone());
            self.status.failed = Some(why);
            return false;
        }
        true
    }

    fn log(&mut self, line: String) {
        self.events.push(line);
    }

    fn open_span(&mut self, map: bool, task: usize, worker: WorkerId, now: Duration) {
        if self.spans.len() < MAX_SPANS {
            self.spans.push(Span { map, task, worker, start_ms: ms(now), end_ms: None, outcome: "running" });
        }
    }

    /// Ends the open spans of a task: `worker`'s with `outcome`, the others' with `others`
    /// (None: leave them open).
    fn close_spans(
        &mut self,
        map: bool,
        task: usize,
        worker: WorkerId,
        outcome: &'static str,
        others: Option<&'static str>,
        now: Duration,
    ) {
        for s in self.spans.iter_mut().filter(|s| s.map == map && s.task == task && s.end_ms.is_none()) {
            if s.worker == worker {
                s.end_ms = Some(ms(now));
                s.outcome = outcome;
            } else if let Some(o) = others {
                s.end_ms = Some(ms(now));
                s.outcome = o;
            }
        }
    }

    /// Every task attempt so far (up to 100,000), in the order they started.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Log lines since the last call.
    pub fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    /// Progress at time `now`.
    pub fn status_at(&self, now: Duration) -> JobStatus {
        let mut s = self.status.clone();
        s.elapsed_ms = ms(now);
        s.maps_running = self.maps.iter().filter(|t| t.status == Status::Running).count();
        s.reduces_running = self.reduces.iter().filter(|t| t.status == Status::Running).count();
        let running = |w: WorkerId| {
            let find = |tasks: &[TaskState]| tasks.iter().position(|t| t.attempts.iter().any(|a| a.worker == w));
            find(&self.maps).map(|i| format!("map {i}")).or_else(|| find(&self.reduces).map(|i| format!("reduce {i}")))
        };
        s.worker_list = self
            .workers
            .iter()
            .map(|(&id, w)| WorkerInfo {
                id,
                addr: w.addr.clone(),
                last_heard_ms: ms(now.saturating_sub(w.heard)),
                tasks_done: w.tasks_done,
                running: running(id),
            })
            .collect();
        // Time left, from this run's rate (tasks done here, not resumed ones).
        let total = s.maps + s.reduces;
        let done = s.maps_done + s.reduces_done;
        let done_here = done.saturating_sub(s.resumed_tasks);
        s.eta_ms = if s.done {
            Some(0)
        } else if done_here > 0 {
            Some(ms(now.mul_f64((total - done) as f64 / done_here as f64)))
        } else {
            None
        };
        s
    }

    /// Progress.
    pub fn status(&self) -> JobStatus {
        self.status.clone()
    }

    fn heard(&mut self, worker: WorkerId, addr: &str, now: Duration) {
        let w = self.workers.entry(worker).or_insert_with(|| WorkerState {
            addr: addr.to_string(),
            heard: now,
            tasks_done: 0,
            told_exit: false,
        });
        if w.addr != addr && !addr.is_empty() {
            w.addr = addr.to_string();
        }
        w.heard = now;
        if self.status.workers != self.workers.len() {
            self.status.workers = self.workers.len();
            self.events.push(format!("worker {worker:x} joined (serving at {addr})"));
        }
    }

    /// Handles one request at time `now` (time since the coordinator started).
    pub fn handle(&mut self, req: Request, now: Duration) -> Reply {
        match req {
            Request::GetTask { worker, addr } => {
                self.heard(worker, &addr, now);
                let t = self.assign(worker, now);
                if t == Task::Exit
                    && let Some(w) = self.workers.get_mut(&worker)
                {
                    w.told_exit = true;
                }
                Reply::Task(t)
            }
            Request::Heartbeat { worker, addr, map, task } => {
                self.heard(worker, &addr, now);
                let tasks = if map { &mut self.maps } else { &mut self.reduces };
                if let Some(t) = tasks.get_mut(task)
                    && !t.done()
                {
                    t.status = Status::Running;
                    match t.attempts.iter_mut().find(|a| a.worker == worker) {
                        Some(a) => a.heard = now,
                        // An attempt this coordinator had given up on, or had never heard of
                        // (it was restarted): the worker is alive and at it, so it counts.
                        None => {
                            t.attempts.push(Attempt { worker, started: now, heard: now });
                            self.open_span(map, task, worker, now);
                        }
                    }
                }
                Reply::Ack
            }
            Request::MapDone { worker, addr, task, attempt, bytes_in, bytes_out } => {
                self.heard(worker, &addr, now);
                if self.maps.get(task).is_some_and(|t| !t.done()) {
                    let rec = Record::MapDone { task, addr: addr.clone(), attempt, bytes_in, bytes_out };
                    if !self.journal(rec, true) {
                        return Reply::Ack;
                    }
                    let t = &mut self.maps[task];
                    t.took = t.attempts.iter().find(|a| a.worker == worker).map(|a| now.saturating_sub(a.started));
                    t.status = Status::Done { addr, attempt };
                    t.attempts.clear();
                    self.status.maps_done += 1;
                    self.status.bytes_in += bytes_in;
                    self.status.bytes_intermediate += bytes_out;
                    self.close_spans(true, task, worker, "done", Some("superseded"), now);
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.tasks_done += 1;
                    }
                    if self.status.maps_done == self.maps.len() && self.map_phase_done.is_none() {
                        self.map_phase_done = Some(now);
                        self.log(format!(
                            "map phase done: {} tasks, {:.1} MB in, {:.1} MB intermediate; reduce phase starts",
                            self.maps.len(),
                            self.status.bytes_in as f64 / 1e6,
                            self.status.bytes_intermediate as f64 / 1e6
                        ));
                    }
                }
                Reply::Ack
            }
            Request::ReduceDone { worker, task, bytes_out } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.heard = now;
                }
                if self.reduces.get(task).is_some_and(|t| !t.done()) {
                    if !self.journal(Record::ReduceDone { task, bytes_out }, true) {
                        return Reply::Ack;
                    }
                    let t = &mut self.reduces[task];
                    t.took = t.attempts.iter().find(|a| a.worker == worker).map(|a| now.saturating_sub(a.started));
                    t.status = Status::Done { addr: String::new(), attempt: 0 };
                    t.attempts.clear();
                    self.status.reduces_done += 1;
                    self.status.bytes_out += bytes_out;
                    self.close_spans(false, task, worker, "done", Some("superseded"), now);
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.tasks_done += 1;
                    }
                    if self.status.reduces_done == self.reduces.len() {
                        self.finish(now);
                    }
                }
                Reply::Ack
            }
            Request::TaskFailed { worker, map, task, reason } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.heard = now;
                }
                let max = self.cfg.max_task_failures;
                let kind = if map { "map" } else { "reduce" };
                let tasks = if map { &mut self.maps } else { &mut self.reduces };
                if let Some(t) = tasks.get_mut(task) {
                    t.attempts.retain(|a| a.worker != worker);
                    t.failures += 1;
                    let failures = t.failures;
                    if t.failures >= max {
                        self.status.failed =
                            Some(format!("{kind} task {task} failed {max} times; last error: {reason}"));
                    } else if t.status == Status::Running && t.attempts.is_empty() {
                        t.status = Status::Idle;
                    }
                    self.log(format!("{kind} task {task} failed on worker {worker:x} ({failures}/{max}): {reason}"));
                    self.close_spans(map, task, worker, "failed", None, now);
                }
                Reply::Ack
            }
            Request::FetchFailed { worker, reduce, map: _, addr } => {
                // The worker that held that output is presumed dead: everything it held is lost.
                let lost: Vec<usize> = (0..self.maps.len())
                    .filter(|&m| matches!(&self.maps[m].status, Status::Done { addr: a, .. } if *a == addr))
                    .collect();
                for &m in &lost {
                    if !self.journal(Record::MapLost { task: m }, true) {
                        return Reply::Ack;
                    }
                    self.maps[m].status = Status::Idle;
                    self.status.maps_done -= 1;
                    self.status.reexecuted += 1;
                }
                if !lost.is_empty() {
                    self.map_phase_done = None;
                    self.log(format!(
                        "map output at {addr} unreachable (its worker is presumed dead): map tasks {lost:?} run again"
                    ));
                }
                if let Some(t) = self.reduces.get_mut(reduce) {
                    t.attempts.retain(|a| a.worker != worker);
                    if t.status == Status::Running && t.attempts.is_empty() {
                        t.status = Status::Idle;
                    }
                }
                self.close_spans(false, reduce, worker, "fetch failed", None, now);
                Reply::Ack
            }
            Request::Status => Reply::Status(self.status_at(now)),
        }
    }

    /// Every output file is in place: the marker, last.
    fn finish(&mut self, now: Duration) {
        if self.journal.is_some() {
            let marker = std::path::Path::new(&self.cfg.out_dir).join(SUCCESS_NAME);
            let r = std::fs::File::create(&marker).and_then(|f| f.sync_all());
            if let Err(e) = r {
                self.status.failed = Some(format!("cannot write {}: {e}", marker.display()));
                return;
            }
            if let Some(j) = self.journal.take() {
                let _ = std::fs::remove_file(j.path());
            }
        }
        self.status.done = true;
        self.done_at = Some(now);
        let s = &self.status;
        let line = format!(
            "job done in {:.2} s: {} map and {} reduce tasks by {} workers, {:.1} MB in, {:.1} MB out, \
             {} map tasks re-executed, {} backups{}",
            now.as_secs_f64(),
            s.maps,
            s.reduces,
            s.workers,
            s.bytes_in as f64 / 1e6,
            s.bytes_out as f64 / 1e6,
            s.reexecuted,
            s.backups,
            if s.resumed_tasks > 0 {
                format!(", {} tasks resumed from the journal", s.resumed_tasks)
            } else {
                String::new()
            }
        );
        self.log(line);
    }

    /// Whether a coordinator whose job is over may exit: every worker heard from lately has
    /// been told to exit (workers that went silent are gone anyway).
    pub fn workers_released(&self, now: Duration) -> bool {
        self.workers.values().all(|w| w.told_exit || now.saturating_sub(w.heard) > Duration::from_millis(1500))
    }

    fn assign(&mut self, worker: WorkerId, now: Duration) -> Task {
        if self.status.done || self.status.failed.is_some() {
            return Task::Exit;
        }
        let timeout = self.cfg.task_timeout;
        let mut lost = Vec::new();
        for (map, tasks) in [(true, &mut self.maps), (false, &mut self.reduces)] {
            for (i, t) in tasks.iter_mut().enumerate() {
                let before = t.attempts.len();
                t.attempts.retain(|a| {
                    let keep = now.saturating_sub(a.heard) < timeout;
                    if !keep {
                        lost.push((map, i, a.worker, now.saturating_sub(a.heard)));
                    }
                    keep
                });
                if t.status == Status::Running && t.attempts.is_empty() && before > 0 {
                    t.status = Status::Idle; // every attempt went silent: hand it out again
                }
            }
        }
        for (map, i, w, silent) in lost {
            self.close_spans(map, i, w, "lost", None, now);
            let kind = if map { "map" } else { "reduce" };
            self.log(format!("worker {w:x} silent for {:.1} s: {kind} task {i} offered again", silent.as_secs_f64()));
            if map {
                self.status.reexecuted += 1;
            }
        }
        let maps_done = self.maps.iter().all(TaskState::done);
        let phase_is_map = !maps_done;
        let pick = {
            let tasks = if phase_is_map { &self.maps } else { &self.reduces };
            tasks
                .iter()
                .position(|t| t.status == Status::Idle)
                .or_else(|| if self.cfg.backup_tasks { straggler(tasks, now) } else { None })
        };
        let Some(i) = pick else { return Task::Wait };
        let kind = if phase_is_map { "map" } else { "reduce" };
        let tasks = if phase_is_map { &mut self.maps } else { &mut self.reduces };
        let backup = tasks[i].status == Status::Running;
        tasks[i].status = Status::Running;
        tasks[i].attempts.push(Attempt { worker, started: now, heard: now });
        if backup {
            self.status.backups += 1;
            self.log(format!("backup attempt of {kind} task {i} on worker {worker:x}"));
        }
        self.journal(Record::Started { map: phase_is_map, task: i, worker }, false);
        self.open_span(phase_is_map, i, worker, now);
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        let heartbeat_ms = ms(timeout / 4).clamp(50, 1000);
        if phase_is_map {
            let c = &self.chunks[i];
            Task::Map {
                id: i,
                attempt,
                file: c.file.clone(),
                offset: c.offset,
                len: c.len,
                n_reduce: self.cfg.n_reduce,
                heartbeat_ms,
            }
        } else {
            let sources = self
                .maps
                .iter()
                .enumerate()
                .map(|(m, t)| match &t.status {
                    Status::Done { addr, attempt } => (m, addr.clone(), *attempt),
                    _ => unreachable!("reduce phase starts after every map is done"),
                })
                .collect();
            Task::Reduce { id: i, sources, out_dir: self.cfg.out_dir.clone(), heartbeat_ms }
        }
    }
}

/// How long a worker asking for work is held when there is none yet: it gets a task (or the
/// word to exit) the moment one is there, instead of polling.
const LONG_POLL: Duration = Duration::from_millis(500);

/// Handles `req`; a GetTask that would be told to wait is held until there is something to
/// hand out or [`LONG_POLL`] has passed (rechecked every 50 ms, so silent attempts are
/// noticed). Every other request wakes the held ones.
fn handle_long_poll(state: &Mutex<Coordinator>, changed: &Condvar, req: Request, start: Instant) -> Reply {
    let deadline = Instant::now() + LONG_POLL;
    let mut c = state.lock().expect("coordinator state");
    loop {
        let reply = c.handle(req.clone(), start.elapsed());
        let now = Instant::now();
        if !matches!(reply, Reply::Task(Task::Wait)) || now >= deadline {
            drop(c);
            if !matches!(reply, Reply::Task(Task::Wait)) {
                changed.notify_all();
            }
            return reply;
        }
        let wait = (deadline - now).min(Duration::from_millis(50));
        c = changed.wait_timeout(c, wait).expect("coordinator state").0;
    }
}

/// A random number per coordinator (so attempt ids differ between jobs and runs).
fn job_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() & 0xFF_FFFF_FFFF
}

/// A running task with a single attempt that has run much longer than the phase's finished
/// tasks took (twice the median, and at least a second). None while any task is still idle.
fn straggler(tasks: &[TaskState], now: Duration) -> Option<usize> {
    let mut took: Vec<Duration> = tasks.iter().filter_map(|t| t.took).collect();
    if took.is_empty() {
        return None;
    }
    took.sort_unstable();
    let threshold = (took[took.len() / 2] * 2).max(Duration::from_secs(1));
    tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.status == Status::Running && t.attempts.len() == 1)
        .find(|(_, t)| now.saturating_sub(t.attempts[0].started) > threshold)
        .map(|(i, _)| i)
}

/// Serves `coord` on `listener` until the job is done (or failed) and every worker still
/// around has been told to exit (at least `linger`, at most 5 s more), so that workers asking
/// for work learn to exit. Log lines go to stderr unless `quiet`. Returns the final status.
/// A worker asking for work while there is none is held until there is, or the job is over,
/// or half a second has passed (long poll), so no worker sleeps while a task waits.
pub fn serve(listener: Listener, coord: Coordinator, linger: Duration) -> JobStatus {
    serve_with(listener, coord, linger, false, None)
}

/// [`serve`], choosing whether to log, and serving the job's web page on `http` if given.
pub fn serve_with(
    listener: Listener,
    coord: Coordinator,
    linger: Duration,
    quiet: bool,
    http: Option<std::net::TcpListener>,
) -> JobStatus {
    let state = Arc::new(Mutex::new(coord));
    // Notified whenever a request may have changed what a waiting worker could be given.
    let changed = Arc::new(Condvar::new());
    // Connections being handled: the process does not exit before their replies (an Exit
    // among them) are sent.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    if let Some(h) = http {
        let state = state.clone();
        std::thread::spawn(move || crate::web::serve_http(h, state, start));
    }
    let unix_path = match listener.local_addr() {
        Ok(Addr::Unix(p)) => Some(p),
        _ => None,
    };
    {
        let state = state.clone();
        let changed = changed.clone();
        let in_flight = in_flight.clone();
        std::thread::spawn(move || {
            loop {
                let Ok(mut s) = listener.accept() else { continue };
                let state = state.clone();
                let changed = changed.clone();
                let in_flight = in_flight.clone();
                in_flight.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    // A connection that sends garbage or hangs up is just dropped.
                    if let Ok(req) = recv::<Request>(&mut s) {
                        let reply = handle_long_poll(&state, &changed, req, start);
                        let _ = send(&mut s, &reply);
                    }
                    drop(s);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    changed.notify_all();
                });
            }
        });
    }
    let mut finished_at = None;
    loop {
        let (st, events, released) = {
            let c = state.lock().expect("coordinator state");
            // Woken by any change (the job finishing, a worker told to exit), else every 20 ms.
            let (mut c, _) = changed.wait_timeout(c, Duration::from_millis(20)).expect("coordinator state");
            (c.status(), c.take_events(), c.workers_released(start.elapsed()))
        };
        if !quiet {
            for e in events {
                eprintln!("[coordinator {:7.2}s] {e}", start.elapsed().as_secs_f64());
            }
        }
        if st.done || st.failed.is_some() {
            let t = *finished_at.get_or_insert_with(Instant::now);
            let quiet_now = released && in_flight.load(Ordering::SeqCst) == 0;
            if (t.elapsed() >= linger && quiet_now) || t.elapsed() >= linger + Duration::from_secs(5) {
                if let Some(p) = unix_path {
                    let _ = std::fs::remove_file(p);
                }
                return st;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coord(maps: usize, backup: bool) -> Coordinator {
        let chunks = (0..maps).map(|i| Chunk { file: format!("f{i}"), offset: 0, len: 10 }).collect();
        let cfg = CoordinatorConfig {
            n_reduce: 2,
            out_dir: ".".into(),
            task_timeout: Duration::from_secs(10),
            backup_tasks: backup,
            max_task_failures: 3,
        };
        Coordinator::new(cfg, chunks)
    }
    fn get(c: &mut Coordinator, w: u64, secs: u64) -> Task {
        match c.handle(Request::GetTask { worker: w, addr: format!("w{w}") }, Duration::from_secs(secs)) {
            Reply::Task(t) => t,
            r => panic!("{r:?}"),
        }
    }
    fn id(t: &Task) -> usize {
        match t {
            Task::Map { id, .. } | Task::Reduce { id, .. } => *id,
            t => panic!("{t:?}"),
        }
    }
    fn map_done(c: &mut Coordinator, w: u64, task: usize, secs: u64) {
        c.handle(
            Request::MapDone { worker: w, addr: format!("w{w}"), task, attempt: 7, bytes_in: 10, bytes_out: 5 },
            Duration::from_secs(secs),
        );
    }

    #[test]
    fn maps_then_reduces_then_exit() {
        let mut c = coord(2, false);
        let (a, b) = (get(&mut c, 1, 0), get(&mut c, 2, 0));
        assert_eq!((id(&a), id(&b)), (0, 1));
        let attempt = |t: &Task| match t {
            Task::Map { attempt, .. } => *attempt,
            t => panic!("{t:?}"),
        };
        assert_ne!(attempt(&a), attempt(&b), "every attempt has its own id");
        assert_eq!(get(&mut c, 3, 0), Task::Wait, "no reduce before every map is done");
        map_done(&mut c, 1, 0, 1);
        map_done(&mut c, 2, 1, 1);
        let r = get(&mut c, 3, 1);
        match &r {
            Task::Reduce { sources, .. } => {
                assert_eq!(sources, &vec![(0, "w1".to_string(), 7), (1, "w2".to_string(), 7)])
            }
            t => panic!("{t:?}"),
        }
        get(&mut c, 1, 1);
        for t in 0..2 {
            c.handle(Request::ReduceDone { worker: 1, task: t, bytes_out: 1 }, Duration::from_secs(2));
        }
        assert!(c.status().done);
        assert_eq!(get(&mut c, 2, 2), Task::Exit);
    }

    #[test]
    fn silent_attempt_reassigned_only_after_the_timeout() {
        let mut c = coord(1, false);
        get(&mut c, 1, 0);
        assert_eq!(get(&mut c, 2, 9), Task::Wait, "not before the timeout");
        assert_eq!(id(&get(&mut c, 2, 10)), 0, "after it");
        // The late first attempt still counts if it finishes first.
        map_done(&mut c, 1, 0, 11);
        map_done(&mut c, 2, 0, 12);
        assert_eq!(c.status().maps_done, 1);
    }

    #[test]
    fn lost_map_output_runs_again() {
        let mut c = coord(2, false);
        get(&mut c, 1, 0);
        get(&mut c, 2, 0);
        map_done(&mut c, 1, 0, 1);
        map_done(&mut c, 2, 1, 1);
        let r = get(&mut c, 3, 1);
        c.handle(Request::FetchFailed { worker: 3, reduce: id(&r), map: 0, addr: "w1".into() }, Duration::from_secs(2));
        assert_eq!(c.status().maps_done, 1);
        let again = get(&mut c, 3, 2);
        assert!(matches!(again, Task::Map { id: 0, .. }), "{again:?}");
    }

    #[test]
    fn backups_only_for_stragglers_near_the_end() {
        let mut c = coord(3, true);
        for w in 1..=3 {
            get(&mut c, w, 0);
        }
        map_done(&mut c, 1, 0, 1);
        map_done(&mut c, 2, 1, 1);
        assert_eq!(get(&mut c, 4, 1), Task::Wait, "task 2 is not slow yet");
        let b = get(&mut c, 4, 3);
        assert_eq!(id(&b), 2, "2 s > twice the median of 1 s: backup");
        assert_eq!(c.status().backups, 1);
        assert_eq!(get(&mut c, 5, 4), Task::Wait, "one backup per task");
        map_done(&mut c, 4, 2, 4);
        assert_eq!(c.status().maps_done, 3);
    }

    #[test]
    fn failing_task_fails_the_job() {
        let mut c = coord(1, false);
        for i in 0..3 {
            get(&mut c, 1, i);
            c.handle(
                Request::TaskFailed { worker: 1, map: true, task: 0, reason: "boom".into() },
                Duration::from_secs(i),
            );
        }
        assert!(c.status().failed.unwrap().contains("boom"));
        assert_eq!(get(&mut c, 1, 5), Task::Exit);
    }

    #[test]
    fn heartbeats_keep_a_long_task_and_silence_loses_it() {
        let mut c = coord(1, false);
        get(&mut c, 1, 0);
        for secs in [3, 6, 9, 12, 15] {
            c.handle(
                Request::Heartbeat { worker: 1, addr: "w1".into(), map: true, task: 0 },
                Duration::from_secs(secs),
            );
            assert_eq!(get(&mut c, 2, secs), Task::Wait, "a task whose worker sends heartbeats is not re-offered");
        }
        assert_eq!(get(&mut c, 2, 24), Task::Wait, "9 s after the last heartbeat: still within the timeout");
        assert_eq!(id(&get(&mut c, 2, 25)), 0, "silent for the timeout: offered again");
        assert_eq!(c.status().reexecuted, 1);
    }

    #[test]
    fn a_restarted_coordinator_resumes_from_its_journal() {
        use crate::journal::{JobSpec, Journal};
        let dir = std::env::temp_dir().join(format!("sixfive-coord-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(crate::journal::JOURNAL_NAME);
        let chunks: Vec<Chunk> = (0..3).map(|i| Chunk { file: format!("f{i}"), offset: 0, len: 10 }).collect();
        let spec = JobSpec { chunks: chunks.iter().map(|c| (c.file.clone(), c.offset, c.len)).collect(), n_reduce: 2 };
        let cfg = CoordinatorConfig {
            n_reduce: 2,
            out_dir: dir.to_string_lossy().to_string(),
            task_timeout: Duration::from_secs(10),
            backup_tasks: false,
            max_task_failures: 3,
        };
        {
            let (j, recs) = Journal::open(&path, &spec).unwrap();
            let mut c = Coordinator::with_journal(cfg.clone(), chunks.clone(), j, recs);
            for w in 1..=3 {
                get(&mut c, w, 0);
            }
            map_done(&mut c, 1, 0, 1);
            map_done(&mut c, 2, 1, 1);
            // Killed here: map 2 is running on worker 3.
        }
        let (j, recs) = Journal::open(&path, &spec).unwrap();
        let mut c = Coordinator::with_journal(cfg, chunks, j, recs);
        assert_eq!((c.status().maps_done, c.status().resumed_tasks), (2, 2));
        assert_eq!(get(&mut c, 4, 0), Task::Wait, "the running map is not offered before its timeout");
        // Its worker, alive, reaches the new coordinator and finishes it.
        c.handle(Request::Heartbeat { worker: 3, addr: "w3".into(), map: true, task: 2 }, Duration::from_secs(8));
        assert_eq!(get(&mut c, 4, 12), Task::Wait, "heartbeats reached the new coordinator");
        map_done(&mut c, 3, 2, 13);
        match get(&mut c, 4, 13) {
            Task::Reduce { sources, .. } => assert_eq!(
                sources.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
                vec!["w1", "w2", "w3"],
                "map outputs are where the journal says"
            ),
            t => panic!("{t:?}"),
        }
        get(&mut c, 5, 13);
        for t in 0..2 {
            c.handle(Request::ReduceDone { worker: 4, task: t, bytes_out: 1 }, Duration::from_secs(14));
        }
        assert!(c.status().done);
        assert!(dir.join(SUCCESS_NAME).is_file(), "_SUCCESS written");
        assert!(!path.exists(), "the journal of a finished job is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
