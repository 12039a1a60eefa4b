//! The wire: addresses, sockets (UNIX or TCP), length-prefixed frames, and the messages
//! between workers and the coordinator and between workers.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Largest message accepted (file contents travel outside messages).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Where a process listens: `unix:/path/to.sock` or `host:port` (TCP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A UNIX socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

/// Longest UNIX socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// A bad address.
#[derive(Debug, thiserror::Error)]
#[error("bad address {0:?}: use unix:/path/to.sock (at most 107 bytes of path) or host:port")]
pub struct BadAddr(pub String);

impl std::str::FromStr for Addr {
    type Err = BadAddr;
    fn from_str(s: &str) -> Result<Addr, BadAddr> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() || p.len() > MAX_UNIX_PATH {
                return Err(BadAddr(s.into()));
            }
            return Ok(Addr::Unix(PathBuf::from(p)));
        }
        match s.to_socket_addrs().map(|mut it| it.next().is_some()) {
            Ok(true) => Ok(Addr::Tcp(s.to_string())),
            _ => Err(BadAddr(s.into())),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A connection over either kind of socket.
pub enum Stream {
    /// UNIX.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Stream {
    /// Connects to `addr`.
    pub fn connect(addr: &Addr) -> io::Result<Stream> {
        let s = match addr {
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        s.set_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }

    /// Read and write timeouts (a peer that stops answering must not hang us forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

/// A listening socket.
pub enum Listener {
    /// UNIX; the path is removed when dropped.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens at `addr` (TCP port 0 picks a port). At a UNIX path, only a stale socket (one
    /// nobody accepts on, left by a killed process) is replaced: a live socket means another
    /// process serves there, and any other file is not ours to delete; both are refused.
    pub fn bind(addr: &Addr) -> io::Result<Listener> {
        match addr {
            Addr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if p.as_os_str().len() > MAX_UNIX_PATH {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("socket path {} is longer than {MAX_UNIX_PATH} bytes", p.display()),
                    ));
                }
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket; refusing to replace it", p.display()),
                        ));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("another process is already listening at {}", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?; // stale: its listener is gone
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
            Addr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a)?)),
        }
    }

    /// The address others should connect to.
    pub fn local_addr(&self) -> io::Result<Addr> {
        match self {
            Listener::Unix(_, p) => Ok(Addr::Unix(p.clone())),
            Listener::Tcp(l) => Ok(Addr::Tcp(l.local_addr()?.to_string())),
        }
    }

    /// Waits for a connection.
    pub fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        s.set_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes one message.
pub fn send<T: Serialize>(s: &mut impl Write, msg: &T) -> io::Result<()> {
    let bytes = postcard::to_allocvec(msg).map_err(io::Error::other)?;
    s.write_all(&(bytes.len() as u32).to_le_bytes())?;
    s.write_all(&bytes)?;
    s.flush()
}

/// Reads one message (refusing oversized or malformed ones).
pub fn recv<T: DeserializeOwned>(s: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One request, one reply, on a fresh connection.
pub fn call<Req: Serialize, Rep: DeserializeOwned>(addr: &Addr, req: &Req) -> io::Result<Rep> {
    let mut s = Stream::connect(addr)?;
    send(&mut s, req)?;
    recv(&mut s)
}

/// A worker's identity: its pid and a random nonce (pids are reused).
pub type WorkerId = u64;

/// Worker -> coordinator.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Give me work. `addr` is where this worker serves its intermediate files.
    GetTask {
        /// Who asks.
        worker: WorkerId,
        /// Its file server.
        addr: String,
    },
    /// `worker` is alive and still running this task (sent every heartbeat interval while a
    /// task runs, so a long task is not taken for a lost one).
    Heartbeat {
        /// Who.
        worker: WorkerId,
        /// Its file server.
        addr: String,
        /// Map (true) or reduce.
        map: bool,
        /// Which task.
        task: usize,
    },
    /// A map task's output is in `worker`'s directory.
    MapDone {
        /// Who did it.
        worker: WorkerId,
        /// Its file server (a restarted coordinator may not have heard of it yet).
        addr: String,
        /// Which map task.
        task: usize,
        /// Which attempt (names its files).
        attempt: u64,
        /// Input bytes read.
        bytes_in: u64,
        /// Intermediate bytes written.
        bytes_out: u64,
    },
    /// A reduce task's output file is in place.
    ReduceDone {
        /// Who did it.
        worker: WorkerId,
        /// Which reduce task.
        task: usize,
        /// Output bytes written.
        bytes_out: u64,
    },
    /// A task failed (the app returned an error or panicked).
    TaskFailed {
        /// Who ran it.
        worker: WorkerId,
        /// Map (true) or reduce.
        map: bool,
        /// Which task.
        task: usize,
        /// What went wrong.
        reason: String,
    },
    /// A reduce task could not fetch a map task's output from `addr`.
    FetchFailed {
        /// Who failed.
        worker: WorkerId,
        /// The reduce task it was running.
        reduce: usize,
        /// The map task whose output is missing.
        map: usize,
        /// Where it looked.
        addr: String,
    },
    /// How far is the job?
    Status,
}

/// Work for a worker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Task {
    /// Map `len` bytes of `file` from `offset`, partition into `n_reduce` buckets.
    Map {
        /// Task number.
        id: usize,
        /// This attempt's unique id: output files are `mr-<id>-<r>-<attempt>`.
        attempt: u64,
        /// Input file.
        file: String,
        /// Chunk start.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Reduce buckets.
        n_reduce: usize,
        /// Send a heartbeat this often while the task runs.
        heartbeat_ms: u64,
    },
    /// Reduce bucket `id`: fetch the winning attempt of each map task from its worker.
    Reduce {
        /// Task number.
        id: usize,
        /// Where each map task's output is: (map task, worker address, attempt).
        sources: Vec<(usize, String, u64)>,
        /// Directory for `mr-out-<id>`.
        out_dir: String,
        /// Send a heartbeat this often while the task runs.
        heartbeat_ms: u64,
    },
    /// Nothing now; ask again shortly.
    Wait,
    /// The job is done: exit.
    Exit,
}

/// A worker as the coordinator knows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id.
    pub id: WorkerId,
    /// Its file server.
    pub addr: String,
    /// Milliseconds since it was last heard from (a request or a heartbeat).
    pub last_heard_ms: u64,
    /// Tasks it finished (map and reduce).
    pub tasks_done: u64,
    /// What it runs now, e.g. "map 3", if anything.
    pub running: Option<String>,
}

/// Progress of a job.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobStatus {
    /// Map tasks done.
    pub maps_done: usize,
    /// Map tasks running (at least one attempt in flight).
    pub maps_running: usize,
    /// Map tasks in all.
    pub maps: usize,
    /// Reduce tasks done.
    pub reduces_done: usize,
    /// Reduce tasks running.
    pub reduces_running: usize,
    /// Reduce tasks in all.
    pub reduces: usize,
    /// Input bytes in all.
    pub bytes_total: u64,
    /// Milliseconds since the coordinator started (this run of it).
    pub elapsed_ms: u64,
    /// Estimated milliseconds left (from the rate of progress so far), once there is a rate.
    pub eta_ms: Option<u64>,
    /// Tasks found done in the journal when this coordinator started (a resumed job).
    pub resumed_tasks: usize,
    /// Every worker heard from, by id.
    pub worker_list: Vec<WorkerInfo>,
    /// Input bytes mapped.
    pub bytes_in: u64,
    /// Intermediate bytes written.
    pub bytes_intermediate: u64,
    /// Output bytes written.
    pub bytes_out: u64,
    /// Workers seen.
    pub workers: usize,
    /// Map tasks run again because their output was lost or they timed out.
    pub reexecuted: usize,
    /// Backup copies started.
    pub backups: usize,
    /// All output written.
    pub done: bool,
    /// The job failed for good (a task failed too often).
    pub failed: Option<String>,
}

/// Coordinator -> worker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// Work (or wait, or exit).
    Task(Task),
    /// Noted.
    Ack,
    /// Progress.
    Status(JobStatus),
}

/// Worker -> worker: send me this intermediate file. The answer is a u64 length (u64::MAX if
/// missing) followed by the bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fetch {
    /// `mr-<map>-<reduce>-<attempt>`.
    pub name: String,
}

/// The name of map task `map`'s output for bucket `reduce`, written by attempt `attempt`.
pub fn intermediate_name(map: usize, reduce: usize, attempt: u64) -> String {
    format!("mr-{map}-{reduce}-{attempt}")
}

/// Whether `name` is an intermediate file name (and nothing else, e.g. no path).
pub fn is_intermediate_name(name: &str) -> bool {
    name.strip_prefix("mr-").is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('-').collect();
        parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// FNV-1a of the key, as the course's `ihash`: which reduce bucket a key goes to.
pub fn bucket(key: &str, n_reduce: usize) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h & 0x7fff_ffff) as usize) % n_reduce
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_intermediate_names_are_served() {
        assert!(is_intermediate_name(&intermediate_name(3, 7, 123456789)));
        for bad in ["mr-1-2", "mr-1-2-3-4", "mr-out-1", "../mr-1-2-3", "mr-1-2-3/../../etc", "mr--2-3", "x-1-2-3"] {
            assert!(!is_intermediate_name(bad), "{bad}");
        }
        assert!("unix:".parse::<Addr>().is_err());
        assert!("no address".parse::<Addr>().is_err());
        assert_eq!("unix:/tmp/x.sock".parse::<Addr>().unwrap(), Addr::Unix("/tmp/x.sock".into()));
        assert_eq!("127.0.0.1:0".parse::<Addr>().unwrap(), Addr::Tcp("127.0.0.1:0".into()));
        assert_eq!(bucket("a", 10), bucket("a", 10));
    }
}
