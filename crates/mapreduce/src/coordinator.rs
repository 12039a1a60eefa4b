//! The coordinator: hands out tasks, notices lost and slow ones, knows when the job is done.
//!
//! [`Coordinator`] is a pure state machine: every decision takes the request and the time, so
//! its rules are unit-tested without processes. [`serve`] runs it behind a socket.
//!
//! Rules:
//! - Map tasks first; reduce tasks once every map task is done.
//! - An attempt not reported done within the task timeout is presumed lost: the task is handed
//!   to the next worker that asks (never earlier, so no task runs twice while its first
//!   attempt is healthy).
//! - With backup tasks on, once no task of the phase is waiting, a task running much longer
//!   than the phase's typical task gets one backup attempt; the first to finish wins.
//! - A reducer that cannot fetch a map output reports it; every map task whose output lived at
//!   that address runs again (the worker is presumed dead), as in the MapReduce paper.
//! - A task that fails (app error) too often fails the job, with the reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{Addr, JobStatus, Listener, Reply, Request, Task, WorkerId, recv, send};
use crate::split::Chunk;

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
struct TaskState {
    status: Status,
    /// Attempts in flight: (worker, started).
    attempts: Vec<(WorkerId, Duration)>,
    failures: u32,
    /// How long the winning attempt took.
    took: Option<Duration>,
}

impl TaskState {
    fn new() -> TaskState {
        TaskState { status: Status::Idle, attempts: Vec::new(), failures: 0, took: None }
    }
}

/// The coordinator's state.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    chunks: Vec<Chunk>,
    maps: Vec<TaskState>,
    reduces: Vec<TaskState>,
    workers: BTreeMap<WorkerId, (String, Duration)>,
    status: JobStatus,
    /// Attempt ids: a random base per job plus a counter, so no two attempts of this or any
    /// other job share file names.
    next_attempt: u64,
}

impl Coordinator {
    /// A job over `chunks`.
    pub fn new(cfg: CoordinatorConfig, chunks: Vec<Chunk>) -> Coordinator {
        assert!(cfg.n_reduce > 0, "at least one reduce task");
        let status = JobStatus { maps: chunks.len(), reduces: cfg.n_reduce, ..Default::default() };
        Coordinator {
            maps: vec![TaskState::new(); chunks.len()],
            reduces: vec![TaskState::new(); cfg.n_reduce],
            cfg,
            chunks,
            workers: BTreeMap::new(),
            status,
            next_attempt: job_nonce() << 24,
        }
    }

    /// Progress.
    pub fn status(&self) -> JobStatus {
        self.status.clone()
    }

    /// Handles one request at time `now` (time since the coordinator started).
    pub fn handle(&mut self, req: Request, now: Duration) -> Reply {
        match req {
            Request::GetTask { worker, addr } => {
                self.workers.insert(worker, (addr, now));
                self.status.workers = self.workers.len();
                Reply::Task(self.assign(worker, now))
            }
            Request::MapDone { worker, task, attempt, bytes_in, bytes_out } => {
                if let Some(t) = self.maps.get_mut(task)
                    && !matches!(t.status, Status::Done { .. })
                {
                    let addr = self.workers.get(&worker).map(|w| w.0.clone()).unwrap_or_default();
                    t.took = t.attempts.iter().find(|a| a.0 == worker).map(|a| now.saturating_sub(a.1));
                    t.status = Status::Done { addr, attempt };
                    t.attempts.clear();
                    self.status.maps_done += 1;
                    self.status.bytes_in += bytes_in;
                    self.status.bytes_intermediate += bytes_out;
                }
                Reply::Ack
            }
            Request::ReduceDone { worker, task, bytes_out } => {
                if let Some(t) = self.reduces.get_mut(task)
                    && !matches!(t.status, Status::Done { .. })
                {
                    t.took = t.attempts.iter().find(|a| a.0 == worker).map(|a| now.saturating_sub(a.1));
                    t.status = Status::Done { addr: String::new(), attempt: 0 };
                    t.attempts.clear();
                    self.status.reduces_done += 1;
                    self.status.bytes_out += bytes_out;
                    self.status.done = self.status.reduces_done == self.reduces.len();
                }
                Reply::Ack
            }
            Request::TaskFailed { worker, map, task, reason } => {
                let max = self.cfg.max_task_failures;
                let tasks = if map { &mut self.maps } else { &mut self.reduces };
                if let Some(t) = tasks.get_mut(task) {
                    t.attempts.retain(|a| a.0 != worker);
                    t.failures += 1;
                    if t.failures >= max {
                        let kind = if map { "map" } else { "reduce" };
                        self.status.failed =
                            Some(format!("{kind} task {task} failed {max} times; last error: {reason}"));
                    } else if t.status == Status::Running && t.attempts.is_empty() {
                        t.status = Status::Idle;
                    }
                }
                Reply::Ack
            }
            Request::FetchFailed { worker, reduce, map: _, addr } => {
                // The worker that held that output is presumed dead: everything it held is lost.
                for t in self.maps.iter_mut() {
                    if matches!(&t.status, Status::Done { addr: a, .. } if *a == addr) {
                        t.status = Status::Idle;
                        self.status.maps_done -= 1;
                        self.status.reexecuted += 1;
                    }
                }
                if let Some(t) = self.reduces.get_mut(reduce) {
                    t.attempts.retain(|a| a.0 != worker);
                    if t.status == Status::Running && t.attempts.is_empty() {
                        t.status = Status::Idle;
                    }
                }
                Reply::Ack
            }
            Request::Status => Reply::Status(self.status()),
        }
    }

    fn assign(&mut self, worker: WorkerId, now: Duration) -> Task {
        if self.status.done || self.status.failed.is_some() {
            return Task::Exit;
        }
        let timeout = self.cfg.task_timeout;
        for tasks in [&mut self.maps, &mut self.reduces] {
            for t in tasks.iter_mut() {
                let before = t.attempts.len();
                t.attempts.retain(|a| now.saturating_sub(a.1) < timeout);
                if t.status == Status::Running && t.attempts.is_empty() && before > 0 {
                    t.status = Status::Idle; // every attempt went silent: hand it out again
                }
            }
        }
        let maps_done = self.maps.iter().all(|t| matches!(t.status, Status::Done { .. }));
        let phase_is_map = !maps_done;
        let pick = {
            let tasks = if phase_is_map { &self.maps } else { &self.reduces };
            tasks
                .iter()
                .position(|t| t.status == Status::Idle)
                .or_else(|| if self.cfg.backup_tasks { straggler(tasks, now) } else { None })
        };
        let Some(i) = pick else { return Task::Wait };
        let tasks = if phase_is_map { &mut self.maps } else { &mut self.reduces };
        if tasks[i].status == Status::Running {
            self.status.backups += 1;
        }
        tasks[i].status = Status::Running;
        tasks[i].attempts.push((worker, now));
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        if phase_is_map {
            let c = &self.chunks[i];
            Task::Map {
                id: i,
                attempt,
                file: c.file.clone(),
                offset: c.offset,
                len: c.len,
                n_reduce: self.cfg.n_reduce,
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
            Task::Reduce { id: i, sources, out_dir: self.cfg.out_dir.clone() }
        }
    }
}

/// A random number per coordinator (so attempt ids differ between jobs).
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
        .find(|(_, t)| now.saturating_sub(t.attempts[0].1) > threshold)
        .map(|(i, _)| i)
}

/// Serves `coord` on `listener` until the job is done (or failed) and `linger` has passed, so
/// that workers asking for work learn to exit. Returns the final status.
pub fn serve(listener: Listener, coord: Coordinator, linger: Duration) -> JobStatus {
    let state = Arc::new(Mutex::new(coord));
    let start = Instant::now();
    let unix_path = match listener.local_addr() {
        Ok(Addr::Unix(p)) => Some(p),
        _ => None,
    };
    {
        let state = state.clone();
        std::thread::spawn(move || {
            loop {
                let Ok(mut s) = listener.accept() else { continue };
                let state = state.clone();
                std::thread::spawn(move || {
                    // A connection that sends garbage or hangs up is just dropped.
                    if let Ok(req) = recv::<Request>(&mut s) {
                        let reply = state.lock().expect("coordinator state").handle(req, start.elapsed());
                        let _ = send(&mut s, &reply);
                    }
                });
            }
        });
    }
    let mut finished_at = None;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let st = state.lock().expect("coordinator state").status();
        if st.done || st.failed.is_some() {
            let t = *finished_at.get_or_insert_with(Instant::now);
            if t.elapsed() >= linger {
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
            Request::MapDone { worker: w, task, attempt: 7, bytes_in: 10, bytes_out: 5 },
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
}
