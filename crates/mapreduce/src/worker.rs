//! A worker: asks the coordinator for tasks, runs them, and serves the intermediate files it
//! wrote to the reducers that need them (no shared filesystem needed).
//!
//! Intermediate and output files are written under a temporary name and renamed into place,
//! so a worker that dies mid-write never leaves a visible partial file.

use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::{App, Groups};
use crate::proto::{
    Addr, Fetch, Listener, Reply, Request, Stream, Task, WorkerId, bucket, call, intermediate_name,
    is_intermediate_name, recv, send,
};

/// How a worker runs.
pub struct WorkerConfig {
    /// The coordinator.
    pub coordinator: Addr,
    /// Where this worker serves its intermediate files.
    pub listen: Addr,
    /// This worker's own directory.
    pub work_dir: PathBuf,
    /// How long to keep trying to reach the coordinator, at start (it may not be up yet) and
    /// after losing it (it may be restarting), with backoff between tries.
    pub connect_patience: Duration,
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Map tasks run.
    pub maps: u64,
    /// Reduce tasks run.
    pub reduces: u64,
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Calls the coordinator, retrying with backoff (2 ms doubling to 1 s) for up to `patience`.
/// Says once on stderr that it is waiting.
fn call_patiently(cfg: &WorkerConfig, req: &Request, what: &str) -> Result<Reply, String> {
    let started = Instant::now();
    // Short at first: a worker started with its coordinator finds it listening a few ms later.
    let mut delay = Duration::from_millis(2);
    let mut said = false;
    loop {
        match call::<_, Reply>(&cfg.coordinator, req) {
            Ok(r) => {
                if said {
                    eprintln!("worker {}: reached the coordinator again", std::process::id());
                }
                return Ok(r);
            }
            Err(e) => {
                if started.elapsed() >= cfg.connect_patience {
                    return Err(format!(
                        "cannot reach the coordinator at {} ({what}): {e}; gave up after {} s (--connect-timeout-secs)",
                        cfg.coordinator,
                        cfg.connect_patience.as_secs()
                    ));
                }
                if !said && started.elapsed() >= Duration::from_millis(500) {
                    eprintln!(
                        "worker {}: waiting for the coordinator at {} ({e}); retrying for up to {} s",
                        std::process::id(),
                        cfg.coordinator,
                        cfg.connect_patience.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(delay.min(cfg.connect_patience.saturating_sub(started.elapsed())));
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Sends heartbeats for a running task until dropped.
struct Heartbeat {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(coordinator: Addr, req: Request, every: Duration) -> Heartbeat {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                let _ = call::<_, Reply>(&coordinator, &req); // a missed beat is not fatal
            }
        });
        Heartbeat { stop: Some(tx), thread: Some(thread) }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a worker until the coordinator says the job is done. Fails if the coordinator cannot
/// be reached for `connect_patience`. Removes its intermediate files and socket on the way out.
pub fn run_worker(cfg: WorkerConfig, app: Arc<dyn App>) -> Result<WorkerReport, String> {
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| format!("work dir {}: {e}", cfg.work_dir.display()))?;
    let listener = Listener::bind(&cfg.listen).map_err(|e| format!("cannot listen at {}: {e}", cfg.listen))?;
    let my_addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
    let socket = match &cfg.listen {
        Addr::Unix(p) => Some(p.clone()),
        Addr::Tcp(_) => None,
    };
    let dir = cfg.work_dir.clone();
    std::thread::spawn(move || serve_files(listener, dir));
    let mut written: Vec<PathBuf> = Vec::new();
    let r = work(&cfg, app, &my_addr, &mut written);
    for f in written {
        let _ = std::fs::remove_file(f);
    }
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    r
}

fn work(
    cfg: &WorkerConfig,
    app: Arc<dyn App>,
    my_addr: &str,
    written: &mut Vec<PathBuf>,
) -> Result<WorkerReport, String> {
    let id: WorkerId = ((std::process::id() as u64) << 32) ^ (nonce() & 0xFFFF_FFFF);
    let mut report = WorkerReport::default();
    let mut chunk_buf = Vec::new();
    loop {
        let ask = Request::GetTask { worker: id, addr: my_addr.to_string() };
        let task = match call_patiently(cfg, &ask, "asking for work")? {
            Reply::Task(t) => t,
            other => return Err(format!("unexpected reply from the coordinator: {other:?}")),
        };
        let beat = |map: bool, task: usize, ms: u64| {
            let req = Request::Heartbeat { worker: id, addr: my_addr.to_string(), map, task };
            Heartbeat::start(cfg.coordinator.clone(), req, Duration::from_millis(ms.max(10)))
        };
        let outcome = match task {
            Task::Map { id: task, attempt, file, offset, len, n_reduce, heartbeat_ms } => {
                report.maps += 1;
                let _beat = beat(true, task, heartbeat_ms);
                let r = guarded(|| {
                    run_map(app.as_ref(), &mut chunk_buf, &cfg.work_dir, task, attempt, &file, offset, len, n_reduce)
                });
                match r {
                    Ok((bytes_in, bytes_out, files)) => {
                        written.extend(files);
                        Request::MapDone { worker: id, addr: my_addr.to_string(), task, attempt, bytes_in, bytes_out }
                    }
                    Err(reason) => Request::TaskFailed { worker: id, map: true, task, reason },
                }
            }
            Task::Reduce { id: task, sources, out_dir, heartbeat_ms } => {
                report.reduces += 1;
                let _beat = beat(false, task, heartbeat_ms);
                match guarded(|| run_reduce(app.as_ref(), &cfg.work_dir, my_addr, task, &sources, Path::new(&out_dir)))
                {
                    Ok(Ok(bytes_out)) => Request::ReduceDone { worker: id, task, bytes_out },
                    Ok(Err((map, addr))) => Request::FetchFailed { worker: id, reduce: task, map, addr },
                    Err(reason) => Request::TaskFailed { worker: id, map: false, task, reason },
                }
            }
            // The coordinator held the request until it had nothing to give for a while.
            Task::Wait => continue,
            Task::Exit => return Ok(report),
        };
        // A result is delivered even across a coordinator restart: the new one accepts it.
        call_patiently(cfg, &outcome, "reporting a result")?;
    }
}

/// Runs `f`, turning an error or a panic in the app into a reason.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the app panicked".into())),
    }
}

/// Writes `path` atomically: a temporary file in the same directory, then a rename.
fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".tmp-{}-{name}", nonce()));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let r = write(&mut w).and_then(|()| w.flush());
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let len = w.get_ref().metadata()?.len();
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(len)
}

fn write_record(w: &mut impl Write, k: &str, v: &str) -> io::Result<()> {
    w.write_all(&(k.len() as u32).to_le_bytes())?;
    w.write_all(k.as_bytes())?;
    w.write_all(&(v.len() as u32).to_le_bytes())?;
    w.write_all(v.as_bytes())
}

fn read_record(r: &mut impl Read) -> io::Result<Option<(String, String)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    fn read_str(r: &mut impl Read, n: usize) -> io::Result<String> {
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
    let k = read_str(r, u32::from_le_bytes(len) as usize)?;
    let mut vlen = [0u8; 4];
    r.read_exact(&mut vlen)?;
    let v = read_str(r, u32::from_le_bytes(vlen) as usize)?;
    Ok(Some((k, v)))
}

/// Maps one chunk into `n_reduce` sorted intermediate files `mr-<task>-<r>-<attempt>`;
/// returns bytes in, bytes out and the files written. Pairs are combined on the map side
/// while the app's [`App::combine`] accepts them (an app without a combiner declines the
/// first time a key repeats, and its pairs are kept as they are from then on).
#[allow(clippy::too_many_arguments)]
fn run_map(
    app: &dyn App,
    buf: &mut Vec<u8>,
    dir: &Path,
    task: usize,
    attempt: u64,
    file: &str,
    offset: u64,
    len: u64,
    n_reduce: usize,
) -> Result<(u64, u64, Vec<PathBuf>), String> {
    read_chunk_into(buf, file, offset, len)?;
    let contents = text(buf);
    let mut buckets: Vec<Vec<(String, String)>> = vec![Vec::new(); n_reduce];
    let mut combined: FxHashMap<String, String> = FxHashMap::default();
    let mut combining = true;
    app.map(file, &contents, &mut |k, v| {
        if combining {
            match combined.get_mut(k) {
                Some(acc) => {
                    if !app.combine(k, acc, v) {
                        // No combiner: from here on every pair is kept. Until now every key
                        // had a single value, so nothing was folded; values keep their order.
                        combining = false;
                        for (k, v) in combined.drain() {
                            buckets[bucket(&k, n_reduce)].push((k, v));
                        }
                        buckets[bucket(k, n_reduce)].push((k.to_string(), v.to_string()));
                    }
                }
                None => {
                    combined.insert(k.to_string(), v.to_string());
                }
            }
        } else {
            buckets[bucket(k, n_reduce)].push((k.to_string(), v.to_string()));
        }
    })
    .map_err(|e| format!("map of {file} at {offset}: {e}"))?;
    for (k, v) in combined {
        buckets[bucket(&k, n_reduce)].push((k, v));
    }
    let mut out_bytes = 0;
    let mut files = Vec::new();
    for (r, mut pairs) in buckets.into_iter().enumerate() {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let name = intermediate_name(task, r, attempt);
        out_bytes += write_bucket(dir, &name, &pairs)?;
        files.push(dir.join(name));
    }
    Ok((len, out_bytes, files))
}

/// The chunk as text: checked by the fast UTF-8 validator, and only if that fails copied with
/// replacement characters (`from_utf8_lossy` alone checks byte by byte, several times slower).
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

fn read_chunk(file: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    read_chunk_into(&mut bytes, file, offset, len)?;
    Ok(bytes)
}

/// Reads `len` bytes of `file` from `offset` into `buf` (replacing its contents; a buffer
/// reused across tasks is neither zeroed nor faulted in again).
fn read_chunk_into(buf: &mut Vec<u8>, file: &str, offset: u64, len: u64) -> Result<(), String> {
    let mut f = File::open(file).map_err(|e| format!("input {file}: {e}"))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    buf.clear();
    buf.reserve_exact(len as usize);
    f.take(len).read_to_end(buf).map_err(|e| format!("input {file}: {e}"))?;
    if buf.len() as u64 != len {
        return Err(format!("input {file}: {len} bytes expected at {offset}, found {} (did it shrink?)", buf.len()));
    }
    Ok(())
}

fn write_bucket(dir: &Path, name: &str, pairs: &[(String, String)]) -> Result<u64, String> {
    write_atomically(&dir.join(name), |w| {
        for (k, v) in pairs {
            write_record(w, k, v)?;
        }
        Ok(())
    })
    .map_err(|e| format!("writing intermediate file: {e}"))
}

/// Fetches map outputs for bucket `task`, merges them by key, reduces, writes `mr-out-<task>`.
/// Map outputs this worker wrote itself (served at `my_addr`) are read where they are; the
/// others are fetched from their workers, all at once. A map output that cannot be fetched
/// is read from this worker's own directory if it is there (workers sharing a directory, or
/// a worker restarted in it): the name includes the winning attempt, so only that attempt's
/// file is ever read. `Ok(Err((map, addr)))` if a map output is nowhere to be had.
#[allow(clippy::type_complexity)]
fn run_reduce(
    app: &dyn App,
    dir: &Path,
    my_addr: &str,
    task: usize,
    sources: &[(usize, String, u64)],
    out_dir: &Path,
) -> Result<Result<u64, (usize, String)>, String> {
    let cleanup = |files: &[PathBuf]| {
        for f in files {
            let _ = std::fs::remove_file(f);
        }
    };
    // Per source: (the file to read, whether it is a fetched copy), or None if nowhere.
    let found: Vec<Option<(PathBuf, bool)>> = std::thread::scope(|scope| {
        let pending: Vec<_> = sources
            .iter()
            .map(|(m, addr, attempt)| {
                let name = intermediate_name(*m, task, *attempt);
                let own = dir.join(&name);
                if addr == my_addr && own.is_file() {
                    return Err(Some((own, false)));
                }
                Ok(scope.spawn(move || {
                    let local = dir.join(format!(".fetched-{task}-{m}-{}", nonce()));
                    if fetch(addr, &name, &local).is_ok() {
                        return Some((local, true));
                    }
                    let _ = std::fs::remove_file(&local);
                    own.is_file().then_some((own, false))
                }))
            })
            .collect();
        pending
            .into_iter()
            .map(|p| match p {
                Ok(h) => h.join().expect("fetch thread"),
                Err(own) => own,
            })
            .collect()
    });
    let fetched: Vec<PathBuf> = found.iter().flatten().filter(|(_, copy)| *copy).map(|(p, _)| p.clone()).collect();
    if let Some(i) = found.iter().position(Option::is_none) {
        cleanup(&fetched);
        return Ok(Err((sources[i].0, sources[i].1.clone())));
    }
    let inputs: Vec<PathBuf> = found.into_iter().flatten().map(|(p, _)| p).collect();
    let mut runs: Vec<Box<dyn Read>> = Vec::new();
    for f in &inputs {
        runs.push(Box::new(BufReader::with_capacity(256 << 10, File::open(f).map_err(|e| e.to_string())?)));
    }
    let r = reduce_runs(app, runs, &out_dir.join(format!("mr-out-{task}")));
    cleanup(&fetched);
    r.map(Ok).map_err(|e| format!("reduce {task}: {e}"))
}

/// Merges sorted runs by key, reduces each group, and writes the lines to `out_path`
/// (atomically). Returns the bytes written.
fn reduce_runs(app: &dyn App, runs: Vec<Box<dyn Read>>, out_path: &Path) -> Result<u64, String> {
    let mut merge = Merge::new(runs).map_err(|e| format!("reading intermediate data: {e}"))?;
    write_atomically(out_path, |w| {
        let mut out = |line: &str| -> io::Result<()> {
            w.write_all(line.as_bytes())?;
            w.write_all(b"\n")
        };
        let r = app.reduce_task(&mut merge, &mut out);
        // Nothing half-read is ever renamed into place.
        if let Some(e) = merge.err.take() {
            return Err(io::Error::other(format!("reading intermediate data: {e}")));
        }
        r.map_err(io::Error::other)
    })
    .map_err(|e| e.to_string())
}

/// K-way merge of sorted runs, yielding keys in order and each key's values streamed (in
/// run order, and within a run in file order). A read error ends the stream; it is kept in
/// `err` for the caller.
struct Merge<R> {
    runs: Vec<R>,
    heap: BinaryHeap<std::cmp::Reverse<(String, usize, String)>>,
    current: Option<String>,
    err: Option<io::Error>,
}

impl<R: Read> Merge<R> {
    fn new(mut runs: Vec<R>) -> io::Result<Merge<R>> {
        let mut heap = BinaryHeap::new();
        for (i, r) in runs.iter_mut().enumerate() {
            if let Some((k, v)) = read_record(r)? {
                heap.push(std::cmp::Reverse((k, i, v)));
            }
        }
        Ok(Merge { runs, heap, current: None, err: None })
    }

    fn refill(&mut self, i: usize) {
        match read_record(&mut self.runs[i]) {
            Ok(Some((k, v))) => self.heap.push(std::cmp::Reverse((k, i, v))),
            Ok(None) => {}
            Err(e) => {
                self.err = Some(e);
                self.heap.clear();
            }
        }
    }
}

impl<R: Read> Groups for Merge<R> {
    fn next_key(&mut self) -> Option<String> {
        while self.next_value().is_some() {}
        let key = self.heap.peek()?.0.0.clone();
        self.current = Some(key.clone());
        Some(key)
    }

    fn next_value(&mut self) -> Option<String> {
        let cur = self.current.as_ref()?;
        if self.heap.peek().is_none_or(|top| top.0.0 != *cur) {
            return None;
        }
        let std::cmp::Reverse((_, i, v)) = self.heap.pop().expect("peeked");
        self.refill(i);
        Some(v)
    }
}

/// Copies intermediate file `name` from the worker at `addr` into `local`.
fn fetch(addr: &str, name: &str, local: &Path) -> io::Result<()> {
    let addr: Addr = addr.parse().map_err(io::Error::other)?;
    let mut s = Stream::connect(&addr)?;
    // A stalled peer (stopped, overloaded) must not hold the reduce for long.
    s.set_timeout(Some(Duration::from_secs(3)))?;
    send(&mut s, &Fetch { name: name.to_string() })?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len == u64::MAX {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} not found at {addr}")));
    }
    let mut out = BufWriter::new(File::create(local)?);
    let copied = io::copy(&mut (&mut s).take(len), &mut out)?;
    if copied != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short transfer"));
    }
    out.flush()
}

/// Serves intermediate files from `dir` (only names `mr-<m>-<r>-<attempt>`, nothing else).
fn serve_files(listener: Listener, dir: PathBuf) {
    loop {
        let Ok(mut s) = listener.accept() else { continue };
        let dir = dir.clone();
        std::thread::spawn(move || {
            let Ok(Fetch { name }) = recv::<Fetch>(&mut s) else { return };
            let valid = is_intermediate_name(&name);
            let file = if valid { File::open(dir.join(&name)).ok() } else { None };
            match file {
                Some(mut f) => {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if s.write_all(&len.to_le_bytes()).is_ok() {
                        let _ = io::copy(&mut f, &mut s);
                    }
                }
                None => {
                    let _ = s.write_all(&u64::MAX.to_le_bytes());
                }
            }
        });
    }
}

/// Pairs buffered by [`run_sequential`] before a sorted run is spilled to disk. Pairs are
/// grouped by key in memory: a value costs its bytes plus 4, a distinct key its bytes plus 64.
pub const SEQUENTIAL_SPILL_BYTES: usize = 64 << 20;

/// The sequential reference: map every file (in 16 MiB pieces at line boundaries), sort,
/// reduce, write `out`. Memory stays bounded whatever the input size: pairs are sorted and
/// spilled to disk in runs of [`SEQUENTIAL_SPILL_BYTES`] (next to `out`, removed after), and
/// the runs are merged. Returns the bytes written.
pub fn run_sequential(app: &dyn App, files: &[String], out: &Path) -> Result<u64, String> {
    run_sequential_with(app, files, out, 16 << 20, SEQUENTIAL_SPILL_BYTES).map(|(bytes, _)| bytes)
}

/// [`run_sequential`] with the piece size and spill threshold given; also returns how many
/// sorted runs were spilled.
pub fn run_sequential_with(
    app: &dyn App,
    files: &[String],
    out: &Path,
    piece_bytes: u64,
    spill_bytes: usize,
) -> Result<(u64, usize), String> {
    let chunks = crate::split::split_inputs(files, piece_bytes.max(1))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let spill_dir = parent.join(format!(".mr-sequential-{}", nonce()));
    let r = sequential_in(app, &chunks, out, &spill_dir, spill_bytes);
    let _ = std::fs::remove_dir_all(&spill_dir);
    r
}

/// Pairs grouped by key in memory, values appended (length-prefixed) to one buffer per key,
/// spilled as a sorted run when they hold `limit` bytes.
struct Spiller<'a> {
    groups: FxHashMap<String, Vec<u8>>,
    held: usize,
    limit: usize,
    dir: &'a Path,
    runs: Vec<PathBuf>,
    err: Option<String>,
}

impl Spiller<'_> {
    fn add(&mut self, k: &str, v: &str) {
        let buf = match self.groups.get_mut(k) {
            Some(b) => b,
            None => {
                self.held += k.len() + 64;
                self.groups.entry(k.to_string()).or_default()
            }
        };
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
        self.held += 4 + v.len();
        if self.held >= self.limit
            && self.err.is_none()
            && let Err(e) = self.spill()
        {
            self.err = Some(e);
        }
    }

    /// The groups, sorted by key, as records (key, value) in value order.
    fn write_sorted(&mut self, w: &mut impl Write) -> io::Result<()> {
        let mut groups: Vec<(String, Vec<u8>)> = self.groups.drain().collect();
        self.held = 0;
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, buf) in groups {
            let mut pos = 0;
            while pos < buf.len() {
                let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
                let v = std::str::from_utf8(&buf[pos + 4..pos + 4 + len]).expect("values are str");
                write_record(w, &k, v)?;
                pos += 4 + len;
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let path = self.dir.join(format!("run-{}", self.runs.len()));
        write_atomically(&path, |w| self.write_sorted(w))
            .map_err(|e| format!("spilling to {}: {e}", path.display()))?;
        self.runs.push(path);
        Ok(())
    }
}

fn sequential_in(
    app: &dyn App,
    chunks: &[crate::split::Chunk],
    out: &Path,
    spill: &Path,
    spill_bytes: usize,
) -> Result<(u64, usize), String> {
    let mut sp =
        Spiller { groups: FxHashMap::default(), held: 0, limit: spill_bytes, dir: spill, runs: Vec::new(), err: None };
    for c in chunks {
        let bytes = read_chunk(&c.file, c.offset, c.len)?;
        let contents = text(&bytes);
        app.map(&c.file, &contents, &mut |k, v| sp.add(k, v)).map_err(|e| format!("map of {}: {e}", c.file))?;
        if let Some(e) = sp.err.take() {
            return Err(e);
        }
    }
    let mut readers: Vec<Box<dyn Read>> = Vec::new();
    if sp.runs.is_empty() {
        let mut last = Vec::new();
        sp.write_sorted(&mut last).map_err(|e| e.to_string())?;
        readers.push(Box::new(io::Cursor::new(last)));
    } else if !sp.groups.is_empty() {
        sp.spill()?;
    }
    for r in &sp.runs {
        readers.push(Box::new(BufReader::with_capacity(256 << 10, File::open(r).map_err(|e| e.to_string())?)));
    }
    let bytes = reduce_runs(app, readers, out).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok((bytes, sp.runs.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_merge_groups_in_order() {
        let runs: Vec<Vec<u8>> = [vec![("a", "1"), ("c", "2")], vec![("a", "3"), ("b", "4"), ("c", "5")], vec![]]
            .iter()
            .map(|pairs| {
                let mut buf = Vec::new();
                for (k, v) in pairs {
                    write_record(&mut buf, k, v).unwrap();
                }
                buf
            })
            .collect();
        let mut m = Merge::new(runs.iter().map(|r| r.as_slice()).collect()).unwrap();
        let mut got = Vec::new();
        while let Some(k) = m.next_key() {
            got.push((k, crate::app::Values(&mut m).collect::<Vec<_>>()));
        }
        assert!(m.err.is_none());
        assert_eq!(
            got,
            vec![
                ("a".to_string(), vec!["1".to_string(), "3".to_string()]),
                ("b".to_string(), vec!["4".to_string()]),
                ("c".to_string(), vec!["2".to_string(), "5".to_string()]),
            ]
        );
    }
}
