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

use crate::app::App;
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
    /// How long to keep trying to reach the coordinator at start.
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

/// Runs a worker until the coordinator says the job is done or can no longer be reached.
pub fn run_worker(cfg: WorkerConfig, app: Arc<dyn App>) -> Result<WorkerReport, String> {
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| format!("work dir {}: {e}", cfg.work_dir.display()))?;
    let listener = Listener::bind(&cfg.listen).map_err(|e| format!("cannot listen at {}: {e}", cfg.listen))?;
    let my_addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
    let dir = cfg.work_dir.clone();
    std::thread::spawn(move || serve_files(listener, dir));
    let id: WorkerId = ((std::process::id() as u64) << 32) ^ (nonce() & 0xFFFF_FFFF);
    let mut report = WorkerReport::default();
    let started = Instant::now();
    let mut contacted = false;
    loop {
        let reply = call::<_, Reply>(&cfg.coordinator, &Request::GetTask { worker: id, addr: my_addr.clone() });
        let task = match reply {
            Ok(Reply::Task(t)) => t,
            Ok(other) => return Err(format!("unexpected reply from the coordinator: {other:?}")),
            Err(e) => {
                if !contacted && started.elapsed() < cfg.connect_patience {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                if !contacted {
                    return Err(format!("cannot reach the coordinator at {}: {e}", cfg.coordinator));
                }
                return Ok(report); // the coordinator is gone: the job is over
            }
        };
        contacted = true;
        let outcome = match task {
            Task::Map { id: task, attempt, file, offset, len, n_reduce } => {
                report.maps += 1;
                match guarded(|| run_map(app.as_ref(), &cfg.work_dir, task, attempt, &file, offset, len, n_reduce)) {
                    Ok((bytes_in, bytes_out)) => Request::MapDone { worker: id, task, attempt, bytes_in, bytes_out },
                    Err(reason) => Request::TaskFailed { worker: id, map: true, task, reason },
                }
            }
            Task::Reduce { id: task, sources, out_dir } => {
                report.reduces += 1;
                match guarded(|| run_reduce(app.as_ref(), &cfg.work_dir, task, &sources, Path::new(&out_dir))) {
                    Ok(Ok(bytes_out)) => Request::ReduceDone { worker: id, task, bytes_out },
                    Ok(Err((map, addr))) => Request::FetchFailed { worker: id, reduce: task, map, addr },
                    Err(reason) => Request::TaskFailed { worker: id, map: false, task, reason },
                }
            }
            Task::Wait => {
                std::thread::sleep(Duration::from_millis(25));
                continue;
            }
            Task::Exit => return Ok(report),
        };
        if call::<_, Reply>(&cfg.coordinator, &outcome).is_err() {
            return Ok(report); // the coordinator is gone
        }
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

/// Maps one chunk into `n_reduce` sorted intermediate files `mr-<task>-<r>-<attempt>`.
#[allow(clippy::too_many_arguments)]
fn run_map(
    app: &dyn App,
    dir: &Path,
    task: usize,
    attempt: u64,
    file: &str,
    offset: u64,
    len: u64,
    n_reduce: usize,
) -> Result<(u64, u64), String> {
    let mut f = File::open(file).map_err(|e| format!("input {file}: {e}"))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; len as usize];
    f.read_exact(&mut bytes).map_err(|e| format!("input {file}: {e}"))?;
    let contents = String::from_utf8_lossy(&bytes);
    let mut out_bytes = 0;
    if app.has_combiner() {
        // Map-side combining: one value per key. Buckets are assigned once per distinct key
        // when writing, not once per emitted pair.
        let mut combined: FxHashMap<String, String> = FxHashMap::default();
        app.map(file, &contents, &mut |k, v| match combined.get_mut(k) {
            Some(acc) => {
                app.combine(k, acc, v);
            }
            None => {
                combined.insert(k.to_string(), v.to_string());
            }
        });
        let mut buckets: Vec<Vec<(String, String)>> = vec![Vec::new(); n_reduce];
        for (k, v) in combined {
            buckets[bucket(&k, n_reduce)].push((k, v));
        }
        for (r, mut pairs) in buckets.into_iter().enumerate() {
            pairs.sort_unstable();
            out_bytes += write_bucket(dir, &intermediate_name(task, r, attempt), &pairs)?;
        }
    } else {
        let mut buckets: Vec<Vec<(String, String)>> = vec![Vec::new(); n_reduce];
        app.map(file, &contents, &mut |k, v| buckets[bucket(k, n_reduce)].push((k.to_string(), v.to_string())));
        for (r, mut pairs) in buckets.into_iter().enumerate() {
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            out_bytes += write_bucket(dir, &intermediate_name(task, r, attempt), &pairs)?;
        }
    }
    Ok((len, out_bytes))
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
/// A map output that cannot be fetched from its worker is read from this worker's own
/// directory if it is there (workers sharing a directory, or a worker restarted in it): the
/// name includes the winning attempt, so only that attempt's file is ever read.
/// `Ok(Err((map, addr)))` if a map output is nowhere to be had.
#[allow(clippy::type_complexity)]
fn run_reduce(
    app: &dyn App,
    dir: &Path,
    task: usize,
    sources: &[(usize, String, u64)],
    out_dir: &Path,
) -> Result<Result<u64, (usize, String)>, String> {
    let mut fetched = Vec::new();
    let mut inputs = Vec::new();
    let cleanup = |files: &[PathBuf]| {
        for f in files {
            let _ = std::fs::remove_file(f);
        }
    };
    for (m, addr, attempt) in sources {
        let name = intermediate_name(*m, task, *attempt);
        let local = dir.join(format!(".fetched-{task}-{m}-{}", nonce()));
        if fetch(addr, &name, &local).is_ok() {
            fetched.push(local.clone());
            inputs.push(local);
            continue;
        }
        let _ = std::fs::remove_file(&local);
        let own = dir.join(&name);
        if own.is_file() {
            inputs.push(own);
            continue;
        }
        cleanup(&fetched);
        return Ok(Err((*m, addr.clone())));
    }
    let mut runs = Vec::new();
    for f in &inputs {
        runs.push(BufReader::with_capacity(256 << 10, File::open(f).map_err(|e| e.to_string())?));
    }
    let mut merge = Merge::new(runs).map_err(|e| e.to_string())?;
    let out_path = out_dir.join(format!("mr-out-{task}"));
    let mut app_err = None;
    let written = write_atomically(&out_path, |w| {
        let mut groups = std::iter::from_fn(|| match merge.next_group() {
            Ok(g) => g,
            Err(e) => {
                app_err = Some(format!("reading intermediate data: {e}"));
                None
            }
        });
        let mut out = |line: &str| -> io::Result<()> {
            w.write_all(line.as_bytes())?;
            w.write_all(b"\n")
        };
        app.reduce_task(&mut groups, &mut out).map_err(io::Error::other)
    });
    cleanup(&fetched);
    if let Some(e) = app_err {
        return Err(e);
    }
    written.map(Ok).map_err(|e| format!("reduce {task}: {e}"))
}

/// K-way merge of sorted runs, yielding (key, values) groups in key order.
struct Merge<R> {
    runs: Vec<R>,
    heap: BinaryHeap<std::cmp::Reverse<(String, usize, String)>>,
}

impl<R: Read> Merge<R> {
    fn new(mut runs: Vec<R>) -> io::Result<Merge<R>> {
        let mut heap = BinaryHeap::new();
        for (i, r) in runs.iter_mut().enumerate() {
            if let Some((k, v)) = read_record(r)? {
                heap.push(std::cmp::Reverse((k, i, v)));
            }
        }
        Ok(Merge { runs, heap })
    }

    fn next_group(&mut self) -> io::Result<Option<(String, Vec<String>)>> {
        let Some(std::cmp::Reverse((key, i, v))) = self.heap.pop() else { return Ok(None) };
        let mut values = vec![v];
        self.refill(i)?;
        while self.heap.peek().is_some_and(|top| top.0.0 == key) {
            let std::cmp::Reverse((_, j, v)) = self.heap.pop().expect("peeked");
            values.push(v);
            self.refill(j)?;
        }
        Ok(Some((key, values)))
    }

    fn refill(&mut self, i: usize) -> io::Result<()> {
        if let Some((k, v)) = read_record(&mut self.runs[i])? {
            self.heap.push(std::cmp::Reverse((k, i, v)));
        }
        Ok(())
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

/// The sequential reference: map every file whole, sort, reduce, write `out`.
pub fn run_sequential(app: &dyn App, files: &[String], out: &Path) -> Result<u64, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| format!("input {f}: {e}"))?;
        let contents = String::from_utf8_lossy(&bytes);
        app.map(f, &contents, &mut |k, v| pairs.push((k.to_string(), v.to_string())));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let groups = crate::app::group_sorted(pairs);
    write_atomically(out, |w| {
        let mut it = groups.into_iter();
        let mut line = |l: &str| -> io::Result<()> {
            w.write_all(l.as_bytes())?;
            w.write_all(b"\n")
        };
        app.reduce_task(&mut it, &mut line).map_err(io::Error::other)
    })
    .map_err(|e| format!("writing {}: {e}", out.display()))
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
        while let Some(g) = m.next_group().unwrap() {
            got.push(g);
        }
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
