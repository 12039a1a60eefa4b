//! The coordinator's journal: a small write-ahead file of task state, so that a coordinator
//! killed mid-job (even with SIGKILL, or by a power cut) can be restarted and resume the job.
//!
//! Every record is a frame `[len: u32 LE][crc32c: u32 LE][postcard bytes]`, appended. The
//! first record names the job ([`JobSpec`]): a journal is only ever resumed by the same job.
//! Records that acknowledge work (a task done, a map output lost) are fsynced before the
//! coordinator answers; records that only say a task started are not (losing one costs at
//! worst a duplicate attempt, which is harmless). A torn or corrupt tail, as a crash leaves
//! it, ends the journal there and is cut off before anything is appended.
//!
//! The file is locked (`flock`) while a coordinator has it open: a second coordinator for the
//! same output directory is refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::WorkerId;

/// Name of the journal file in the output directory.
pub const JOURNAL_NAME: &str = ".mr-journal";

/// What a job is: the same inputs cut the same way into the same number of reduce tasks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobSpec {
    /// Map tasks: (absolute input path, offset, length).
    pub chunks: Vec<(String, u64, u64)>,
    /// Reduce tasks.
    pub n_reduce: usize,
}

/// One journal record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Record {
    /// First record: which job this journal belongs to.
    Job(JobSpec),
    /// A task was handed to a worker (not fsynced).
    Started {
        /// Map (true) or reduce.
        map: bool,
        /// Which task.
        task: usize,
        /// To whom.
        worker: WorkerId,
    },
    /// A map task finished: its output is at `addr` under `attempt`'s names.
    MapDone {
        /// Which task.
        task: usize,
        /// The file server holding its output.
        addr: String,
        /// The winning attempt.
        attempt: u64,
        /// Input bytes.
        bytes_in: u64,
        /// Intermediate bytes.
        bytes_out: u64,
    },
    /// A finished map task's output was lost; the task runs again.
    MapLost {
        /// Which task.
        task: usize,
    },
    /// A reduce task's output file is in place.
    ReduceDone {
        /// Which task.
        task: usize,
        /// Output bytes.
        bytes_out: u64,
    },
}

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The journal belongs to another job.
    #[error("journal {0} belongs to a different job (other inputs or --reduces); use --overwrite to start afresh")]
    OtherJob(PathBuf),
    /// Another coordinator holds it.
    #[error("another coordinator is running the job of {0} (its journal is locked)")]
    Locked(PathBuf),
}

/// An open, locked journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

fn frame(r: &Record) -> Vec<u8> {
    let body = postcard::to_allocvec(r).expect("records serialize");
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes whole, intact frames; returns them and the length of the intact prefix.
fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    while bytes.len() - pos >= 8 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else { break };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let Ok(r) = postcard::from_bytes::<Record>(body) else { break };
        records.push(r);
        pos += 8 + len;
    }
    (records, pos)
}

impl Journal {
    /// Opens (or creates) the journal at `path` for `spec`. Returns the records after the
    /// header (empty for a new journal). Refuses another job's journal and a locked one.
    pub fn open(path: &Path, spec: &JobSpec) -> Result<(Journal, Vec<Record>), JournalError> {
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io_err(path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(JournalError::Locked(path.to_path_buf()));
        }
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        file.read_to_end(&mut bytes).map_err(io_err(path))?;
        let (mut records, good) = decode(&bytes);
        if records.is_empty() {
            // New (or torn before its header was whole): start it.
            file.set_len(0).map_err(io_err(path))?;
            let mut j = Journal { file, path: path.to_path_buf() };
            j.append(&Record::Job(spec.clone()), true).map_err(io_err(path))?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
                File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(path))?;
            }
            return Ok((j, Vec::new()));
        }
        if records[0] != Record::Job(spec.clone()) {
            return Err(JournalError::OtherJob(path.to_path_buf()));
        }
        if good < bytes.len() {
            file.set_len(good as u64).map_err(io_err(path))?; // a torn tail
            file.sync_data().map_err(io_err(path))?;
        }
        records.remove(0);
        Ok((Journal { file, path: path.to_path_buf() }, records))
    }

    /// Reads the job a journal belongs to, if it is a journal at all.
    pub fn job_of(path: &Path) -> Option<JobSpec> {
        let bytes = std::fs::read(path).ok()?;
        match decode(&bytes).0.into_iter().next() {
            Some(Record::Job(spec)) => Some(spec),
            _ => None,
        }
    }

    /// Appends a record; `sync` makes it durable before returning.
    pub fn append(&mut self, r: &Record, sync: bool) -> io::Result<()> {
        self.file.write_all(&frame(r))?;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_resumes_its_own_job_only_and_survives_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("sixfive-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(JOURNAL_NAME);
        let spec = JobSpec { chunks: vec![("/a".into(), 0, 10)], n_reduce: 2 };
        let done = Record::MapDone { task: 0, addr: "w".into(), attempt: 9, bytes_in: 10, bytes_out: 4 };
        {
            let (mut j, recs) = Journal::open(&path, &spec).unwrap();
            assert!(recs.is_empty());
            assert!(matches!(Journal::open(&path, &spec), Err(JournalError::Locked(_))), "one coordinator at a time");
            j.append(&done, true).unwrap();
        }
        // A torn record at the end, as a crash mid-write leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&frame(&Record::ReduceDone { task: 1, bytes_out: 3 })[..5]).unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&path, &spec).unwrap();
        assert_eq!(recs, vec![done.clone()]);
        j.append(&Record::ReduceDone { task: 0, bytes_out: 1 }, true).unwrap();
        drop(j);
        let (_j, recs) = Journal::open(&path, &spec).unwrap();
        assert_eq!(recs, vec![done, Record::ReduceDone { task: 0, bytes_out: 1 }], "the torn tail was cut off");
        drop(_j);
        let other = JobSpec { n_reduce: 3, ..spec.clone() };
        assert!(matches!(Journal::open(&path, &other), Err(JournalError::OtherJob(_))));
        assert_eq!(Journal::job_of(&path), Some(spec));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
