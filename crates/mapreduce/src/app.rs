//! Applications: what map and reduce do. Written in Rust against [`App`] and registered by
//! name, or run as external commands ([`Streaming`]) so apps can be written in any language.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A MapReduce application.
///
/// `map` and `reduce` return errors (`Err(reason)`): the task fails with that reason, is
/// retried elsewhere, and fails the job after too many failures. A panic is treated the same.
/// A combiner is enabled by implementing [`App::combine`]; nothing else is needed.
pub trait App: Send + Sync {
    /// Calls `emit(key, value)` for each pair the input produces. `contents` is one input
    /// chunk (whole lines) of `file`; invalid UTF-8 has been replaced.
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String>;

    /// The output value for `key` given all its values, streamed in order (a key with
    /// millions of values is never held in memory at once unless the app collects them).
    fn reduce(&self, key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String>;

    /// The combiner, if the app has one: folds `value` into `acc` (both values of `key`) on
    /// the map side, so less data crosses the network, and returns true. Must agree with
    /// `reduce` (e.g. sums for word count). The default has none: it returns false and leaves
    /// `acc` alone, and the framework then keeps every pair.
    fn combine(&self, _key: &str, _acc: &mut String, _value: &str) -> bool {
        false
    }

    /// Reduces a whole task's sorted groups into output lines. The default calls
    /// [`App::reduce`] per key and writes "key value"; the streaming app overrides it to run
    /// its command once per task.
    fn reduce_task(
        &self,
        groups: &mut dyn Groups,
        out: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> Result<(), String> {
        while let Some(k) = groups.next_key() {
            let v = self.reduce(&k, &mut Values(groups))?;
            out(&format!("{k} {v}")).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// A reduce task's input: its keys in order, each key's values streamed.
pub trait Groups {
    /// The next key (what is left of the current key's values is skipped), or None at the end.
    fn next_key(&mut self) -> Option<String>;
    /// The current key's next value, or None once they are all read.
    fn next_value(&mut self) -> Option<String>;
}

/// The current key's values of some [`Groups`], as an iterator.
pub struct Values<'a>(pub &'a mut dyn Groups);

impl Iterator for Values<'_> {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        self.0.next_value()
    }
}

/// Groups over an in-memory list of (key, values), for tests and small jobs.
pub struct VecGroups {
    groups: std::vec::IntoIter<(String, Vec<String>)>,
    current: std::vec::IntoIter<String>,
}

impl VecGroups {
    /// Groups in the order given.
    pub fn new(groups: Vec<(String, Vec<String>)>) -> VecGroups {
        VecGroups { groups: groups.into_iter(), current: Vec::new().into_iter() }
    }
}

impl Groups for VecGroups {
    fn next_key(&mut self) -> Option<String> {
        let (k, vs) = self.groups.next()?;
        self.current = vs.into_iter();
        Some(k)
    }
    fn next_value(&mut self) -> Option<String> {
        self.current.next()
    }
}

/// Why an app could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppError {
    /// No app of that name.
    #[error("unknown app {name:?}; known apps: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: String,
    },
    /// The streaming app needs its commands.
    #[error("the stream app needs --map-cmd and --reduce-cmd")]
    MissingCommands,
}

/// Options some apps take.
#[derive(Clone, Debug, Default)]
pub struct AppOptions {
    /// For `stream`: the map command.
    pub map_cmd: Option<String>,
    /// For `stream`: the reduce command.
    pub reduce_cmd: Option<String>,
}

/// Makes an app from its options.
pub type Factory = Box<dyn Fn(&AppOptions) -> Result<Box<dyn App>, AppError> + Send + Sync>;

/// Apps by name. A program registers its own apps next to the built-ins and hands the
/// registry to [`crate::cli::main`].
pub struct Registry {
    apps: BTreeMap<String, Factory>,
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Registry {
        Registry { apps: BTreeMap::new() }
    }

    /// The built-in apps: wc, indexer, mtiming, rtiming, jobcount, early_exit, crash,
    /// nocrash, stream.
    pub fn builtins() -> Registry {
        let mut r = Registry::empty();
        r.register("wc", |_| Ok(Box::new(WordCount)));
        r.register("indexer", |_| Ok(Box::new(Indexer)));
        r.register("mtiming", |_| Ok(Box::new(MapTiming)));
        r.register("rtiming", |_| Ok(Box::new(ReduceTiming)));
        r.register("jobcount", |_| Ok(Box::new(JobCount::default())));
        r.register("early_exit", |_| Ok(Box::new(EarlyExit)));
        r.register("crash", |_| Ok(Box::new(Crash { crash: true })));
        r.register("nocrash", |_| Ok(Box::new(Crash { crash: false })));
        r.register("stream", |o| match (&o.map_cmd, &o.reduce_cmd) {
            (Some(m), Some(r)) => Ok(Box::new(Streaming { map_cmd: m.clone(), reduce_cmd: r.clone() })),
            _ => Err(AppError::MissingCommands),
        });
        r
    }

    /// Registers (or replaces) the app `name`.
    pub fn register(
        &mut self,
        name: &str,
        f: impl Fn(&AppOptions) -> Result<Box<dyn App>, AppError> + Send + Sync + 'static,
    ) {
        self.apps.insert(name.to_string(), Box::new(f));
    }

    /// Makes the app `name`.
    pub fn make(&self, name: &str, opts: &AppOptions) -> Result<Box<dyn App>, AppError> {
        match self.apps.get(name) {
            Some(f) => f(opts),
            None => Err(AppError::Unknown { name: name.to_string(), known: self.names().join(", ") }),
        }
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.apps.keys().cloned().collect()
    }
}

/// ASCII letters; every other ASCII byte separates words.
const ASCII_LETTER: [bool; 128] = {
    let mut t = [false; 128];
    let mut b = 0;
    while b < 128 {
        t[b] = (b as u8).is_ascii_alphabetic();
        b += 1;
    }
    t
};

/// The words of `s`: its maximal runs of letters (`char::is_alphabetic`), in order.
///
/// The same words as `s.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty())`,
/// several times faster: 64 bytes of ASCII are classified at a time (eight bytes per
/// arithmetic step, no branch per byte), and each word costs two bit scans, so there is no
/// branch misprediction per byte or per character class. A block holding any other character
/// is decoded character by character.
pub fn words(s: &str) -> Words<'_> {
    Words { s, next: 0, slow_until: 0, base: 0, edges: 0, in_word: false, start: 0 }
}

/// Iterator returned by [`words`].
pub struct Words<'a> {
    s: &'a str,
    /// Where the next block (or character) starts.
    next: usize,
    /// Characters before this are decoded one by one (their block was not all ASCII).
    slow_until: usize,
    /// Start of the block whose `edges` are pending.
    base: usize,
    /// Bit j: the letter/non-letter class changes at `base + j`.
    edges: u64,
    /// Whether the position just before `next` (or the pending edge) is inside a word.
    in_word: bool,
    /// Where the current word started.
    start: usize,
}

const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Bit j set for each ASCII letter among 64 bytes, or None if one of them is not ASCII.
#[inline(always)]
fn letter_mask(block: &[u8]) -> Option<u64> {
    let mut mask = 0u64;
    let mut high = 0u64;
    for (w, eight) in block.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes(eight.try_into().expect("8 bytes"));
        high |= x;
        // Every byte below 0x80 (checked below), so no sum carries into the next byte.
        let y = (x | 0x2020_2020_2020_2020) & LOW7; // ASCII letters folded to lower case
        let ge_a = y + 0x1F1F_1F1F_1F1F_1F1F; // high bit: y >= b'a'
        let gt_z = y + 0x0505_0505_0505_0505; // high bit: y > b'z'
        let letters = (ge_a & !gt_z & HIGH) >> 7; // bit 8k: byte k is a letter
        // Gather bit 8k to bit 56 + k (the products land on distinct bits: no carries).
        mask |= (letters.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * w);
    }
    (high & HIGH == 0).then_some(mask)
}

impl<'a> Words<'a> {
    /// Whether the character at byte `i` (a character boundary) is a letter, and its length.
    #[inline(always)]
    fn class(&self, i: usize) -> (bool, usize) {
        let b = self.s.as_bytes()[i];
        if b < 0x80 {
            (ASCII_LETTER[b as usize], 1)
        } else {
            let c = self.s[i..].chars().next().expect("a character starts here");
            (c.is_alphabetic(), c.len_utf8())
        }
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        loop {
            if self.edges != 0 {
                let pos = self.base + self.edges.trailing_zeros() as usize;
                self.edges &= self.edges - 1;
                self.in_word = !self.in_word;
                if self.in_word {
                    self.start = pos;
                    continue;
                }
                return Some(&self.s[self.start..pos]);
            }
            let pos = self.next;
            let n = self.s.len();
            if pos >= self.slow_until && pos + 64 <= n {
                if let Some(mask) = letter_mask(&self.s.as_bytes()[pos..pos + 64]) {
                    // Bit j of the shifted mask: is byte j - 1 a letter (bit 0: the state so far).
                    self.edges = mask ^ ((mask << 1) | self.in_word as u64);
                    self.base = pos;
                    self.next = pos + 64;
                    continue;
                }
                self.slow_until = pos + 64;
            }
            if pos >= n {
                if self.in_word {
                    self.in_word = false;
                    return Some(&self.s[self.start..n]);
                }
                return None;
            }
            let (letter, len) = self.class(pos);
            self.next = pos + len;
            if letter != self.in_word {
                self.in_word = letter;
                if letter {
                    self.start = pos;
                } else {
                    return Some(&self.s[self.start..pos]);
                }
            }
        }
    }
}

/// A word as a hash key, compared without a call to `memcmp` when short (most words are):
/// two overlapping 8-byte (or 4-byte) loads cover it.
#[derive(Clone, Copy, Hash)]
struct Word<'a>(&'a str);

impl PartialEq for Word<'_> {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let n = a.len();
        if n != b.len() {
            return false;
        }
        let load8 = |x: &[u8], i: usize| u64::from_le_bytes(x[i..i + 8].try_into().expect("8 bytes"));
        let load4 = |x: &[u8], i: usize| u32::from_le_bytes(x[i..i + 4].try_into().expect("4 bytes"));
        match n {
            0..=3 => a == b,
            4..=8 => load4(a, 0) == load4(b, 0) && load4(a, n - 4) == load4(b, n - 4),
            9..=16 => load8(a, 0) == load8(b, 0) && load8(a, n - 8) == load8(b, n - 8),
            _ => a == b,
        }
    }
}

impl Eq for Word<'_> {}

/// Word count: "word count". The map counts its chunk's words itself (in-mapper combining,
/// with no allocation per word: the table's keys borrow the chunk) and emits each distinct
/// word once with its count; its combiner adds counts too, so an app that emits "1"s per word
/// gets the same on the map side.
pub struct WordCount;

impl App for WordCount {
    fn map(&self, _file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let mut counts: FxHashMap<Word<'_>, u64> = FxHashMap::default();
        for w in words(contents) {
            *counts.entry(Word(w)).or_insert(0) += 1;
        }
        let mut buf = String::new();
        for (Word(w), n) in counts {
            use std::fmt::Write as _;
            buf.clear();
            let _ = write!(buf, "{n}");
            emit(w, &buf);
        }
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let mut sum = 0u64;
        for v in values {
            sum += v.parse::<u64>().map_err(|e| format!("bad count {v:?}: {e}"))?;
        }
        Ok(sum.to_string())
    }
    fn combine(&self, _key: &str, acc: &mut String, value: &str) -> bool {
        add_decimal(acc, value);
        true
    }
}

/// Adds the decimal number `b` to the decimal number in `acc`, in place. Adding "1" (every
/// word count emit) touches only the last digits, with no parsing or allocation.
fn add_decimal(acc: &mut String, b: &str) {
    if b == "1" && !acc.is_empty() && acc.bytes().all(|d| d.is_ascii_digit()) {
        let nines = acc.bytes().rev().take_while(|&d| d == b'9').count();
        let len = acc.len();
        if nines == len {
            *acc = format!("1{}", "0".repeat(len));
        } else {
            let d = acc.as_bytes()[len - nines - 1];
            acc.truncate(len - nines - 1);
            acc.push((d + 1) as char);
            acc.extend(std::iter::repeat_n('0', nines));
        }
        return;
    }
    let sum = acc.parse::<u64>().unwrap_or(0) + b.parse::<u64>().unwrap_or(0);
    *acc = sum.to_string();
}

/// Inverted index: "word N doc1,doc2,...".
pub struct Indexer;

impl App for Indexer {
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for w in words(contents) {
            if seen.insert(w) {
                emit(w, file);
            }
        }
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let mut docs: Vec<String> = values.collect();
        docs.sort_unstable();
        docs.dedup();
        Ok(format!("{} {}", docs.len(), docs.join(",")))
    }
}

/// Counts workers that are in `phase` right now: each leaves a marker file named after its
/// pid in the working directory and checks which markers belong to live processes.
fn nparallel(phase: &str) -> usize {
    let pid = std::process::id();
    let mine = format!("mr-worker-{phase}-{pid}");
    let _ = std::fs::write(&mine, "x");
    let prefix = format!("mr-worker-{phase}-");
    let mut live = 0;
    if let Ok(dir) = std::fs::read_dir(".") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(p) = name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok())
                && std::path::Path::new(&format!("/proc/{p}")).exists()
            {
                live += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&mine);
    live
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Test app: how many workers run map tasks at the same time.
pub struct MapTiming;

impl App for MapTiming {
    fn map(&self, _file: &str, _contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let t = now_secs();
        let pid = std::process::id();
        let n = nparallel("map");
        emit(&format!("times-{pid}"), &format!("{t:.1}"));
        emit(&format!("parallel-{pid}"), &n.to_string());
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let mut v: Vec<String> = values.collect();
        v.sort();
        Ok(v.join(" "))
    }
}

/// Test app: how many workers run reduce tasks at the same time.
pub struct ReduceTiming;

impl App for ReduceTiming {
    fn map(&self, _file: &str, _contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        for k in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
            emit(k, "1");
        }
        Ok(())
    }
    fn reduce(&self, _key: &str, _values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        Ok(nparallel("reduce").to_string())
    }
}

/// Test app: each map invocation leaves a uniquely named marker; the reducer counts them.
#[derive(Default)]
pub struct JobCount {
    count: std::sync::atomic::AtomicU64,
}

impl App for JobCount {
    fn map(&self, _file: &str, _contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let n = self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::write(format!("mr-worker-jobcount-{}-{n}", std::process::id()), "x");
        let jitter = (now_secs().fract() * 3000.0) as u64;
        std::thread::sleep(Duration::from_millis(2000 + jitter));
        emit("a", "x");
        Ok(())
    }
    fn reduce(&self, _key: &str, _values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let n = std::fs::read_dir(".")
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("mr-worker-jobcount")).count())
            .unwrap_or(0);
        Ok(n.to_string())
    }
}

/// Test app: some reduce tasks take 3 s, to catch workers or coordinators that exit early.
pub struct EarlyExit;

impl App for EarlyExit {
    fn map(&self, file: &str, _contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        emit(file, "1");
        Ok(())
    }
    fn reduce(&self, key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        if key.contains("sherlock") || key.contains("tom") {
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(values.count().to_string())
    }
}

/// Test apps `crash` and `nocrash`: the same output; `crash` exits the process with
/// probability 1/3 and sleeps up to 10 s with probability 1/3 in every map and reduce.
pub struct Crash {
    crash: bool,
}

impl Crash {
    fn maybe_crash(&self) {
        if !self.crash {
            return;
        }
        // Entropy from the OS via the hasher's random keys: every call differs.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_secs().to_bits());
        let r = h.finish() % 1000;
        if r < 330 {
            std::process::exit(1);
        } else if r < 660 {
            std::thread::sleep(Duration::from_millis(h.finish() % 10_000));
        }
    }
}

impl App for Crash {
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        self.maybe_crash();
        emit("a", file);
        emit("b", &file.len().to_string());
        emit("c", &contents.len().to_string());
        emit("d", "xyzzy");
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        self.maybe_crash();
        let mut v: Vec<String> = values.collect();
        v.sort();
        Ok(v.join(" "))
    }
}

/// An app made of two shell commands. Map: the command reads the chunk on stdin (with
/// `MR_INPUT_FILE` set) and writes `key<TAB>value` lines. Reduce: the command runs once per
/// reduce task, reads that task's `key<TAB>value` lines sorted by key on stdin, and writes
/// output lines (conventionally "key value").
pub struct Streaming {
    /// Map command (run with `sh -c`).
    pub map_cmd: String,
    /// Reduce command (run with `sh -c`).
    pub reduce_cmd: String,
}

/// Input handed to a command per step.
const FILTER_PIECE: usize = 64 << 10;

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a file descriptor this process owns (a pipe end of its child).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `cmd` (with `sh -c`), streaming: `feed(buf)` appends the next piece of its input to
/// `buf` and returns false once there is no more; `line` gets each line of its output as it
/// comes. One thread, `poll` on both pipes: input is pulled only as fast as the command takes
/// it, so memory stays bounded by a piece and the pipes' buffers whatever the data's size.
fn run_filter(
    cmd: &str,
    env: &[(&str, &str)],
    feed: &mut dyn FnMut(&mut Vec<u8>) -> Result<bool, String>,
    mut line: impl FnMut(&str) -> Result<(), String>,
) -> Result<(), String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take().expect("piped");
    let r = (|| -> Result<(), String> {
        if let Some(i) = &stdin {
            set_nonblocking(i.as_raw_fd()).map_err(|e| e.to_string())?;
        }
        set_nonblocking(stdout.as_raw_fd()).map_err(|e| e.to_string())?;
        let mut pending: Vec<u8> = Vec::with_capacity(FILTER_PIECE);
        let mut sent = 0;
        let mut more = true;
        let mut partial: Vec<u8> = Vec::new();
        let mut rbuf = vec![0u8; FILTER_PIECE];
        loop {
            if stdin.is_some() && sent == pending.len() {
                pending.clear();
                sent = 0;
                while more && pending.len() < FILTER_PIECE {
                    more = feed(&mut pending)?;
                }
                if pending.is_empty() && !more {
                    stdin = None; // end of input: the command sees EOF
                }
            }
            let mut fds = vec![libc::pollfd { fd: stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            if let Some(i) = &stdin {
                fds.push(libc::pollfd { fd: i.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
            }
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if would_block(&e) {
                    continue;
                }
                return Err(format!("waiting on {cmd:?}: {e}"));
            }
            if fds.len() > 1 && fds[1].revents != 0 {
                let i = stdin.as_mut().expect("polled");
                match i.write(&pending[sent..]) {
                    Ok(k) => sent += k,
                    Err(e) if would_block(&e) => {}
                    // The command stopped reading (it exited or closed stdin): its business.
                    Err(_) => stdin = None,
                }
            }
            if fds[0].revents != 0 {
                match stdout.read(&mut rbuf) {
                    Ok(0) => {
                        if !partial.is_empty() {
                            line(&String::from_utf8_lossy(&partial))?;
                        }
                        return Ok(());
                    }
                    Ok(k) => {
                        let mut start = 0;
                        for (j, &b) in rbuf[..k].iter().enumerate() {
                            if b == b'\n' {
                                if partial.is_empty() {
                                    line(&String::from_utf8_lossy(&rbuf[start..j]))?;
                                } else {
                                    partial.extend_from_slice(&rbuf[start..j]);
                                    line(&String::from_utf8_lossy(&partial))?;
                                    partial.clear();
                                }
                                start = j + 1;
                            }
                        }
                        partial.extend_from_slice(&rbuf[start..k]);
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(format!("reading from {cmd:?}: {e}")),
                }
            }
        }
    })();
    drop(stdin);
    if r.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    r?;
    if !status.success() {
        return Err(format!("command {cmd:?} failed: {status}"));
    }
    Ok(())
}

impl App for Streaming {
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let cmd = &self.map_cmd;
        let mut rest = contents.as_bytes();
        let mut feed = |buf: &mut Vec<u8>| {
            let n = rest.len().min(FILTER_PIECE);
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            Ok(!rest.is_empty())
        };
        run_filter(cmd, &[("MR_INPUT_FILE", file)], &mut feed, |l| match l.split_once('\t') {
            Some((k, v)) => {
                emit(k, v);
                Ok(())
            }
            None => {
                Err(format!("map command {cmd:?} printed a line without a tab: {l:?} (lines must be key<TAB>value)"))
            }
        })
    }

    fn reduce(&self, _key: &str, _values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        Err("the stream app reduces whole tasks".into())
    }

    fn reduce_task(
        &self,
        groups: &mut dyn Groups,
        out: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> Result<(), String> {
        // The task's pairs, key group by key group, pulled from the merge as the command
        // reads them: nothing is buffered beyond a piece.
        let mut key = groups.next_key();
        let mut feed = |buf: &mut Vec<u8>| {
            while buf.len() < FILTER_PIECE {
                let Some(k) = &key else { return Ok(false) };
                match groups.next_value() {
                    Some(v) => {
                        buf.extend_from_slice(k.as_bytes());
                        buf.push(b'\t');
                        buf.extend_from_slice(v.as_bytes());
                        buf.push(b'\n');
                    }
                    None => key = groups.next_key(),
                }
            }
            Ok(key.is_some())
        };
        run_filter(&self.reduce_cmd, &[], &mut feed, |l| out(l).map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_words_are_the_letter_runs() {
        let reference = |s: &str| -> Vec<String> {
            s.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()).map(String::from).collect()
        };
        // Pieces that exercise the 64-byte blocks: ASCII edges (@ [ ` { are next to letters),
        // multi-byte letters and non-letters, words across block boundaries.
        let pieces = [
            "a",
            "Z",
            "@",
            "[",
            "`",
            "{",
            " ",
            "\n",
            "0",
            "9",
            "é",
            "ß",
            "Ω",
            "日本",
            "’",
            "—",
            "\u{1F600}",
            "ǅ",
            "١",
            "word",
            "LongerWordThatSpansMuchOfABlock",
            "x".repeat(70).leak(),
        ];
        let mut state = 0x1234_5678_9abc_def0u64;
        for len in [0, 1, 5, 63, 64, 65, 127, 128, 200, 1000] {
            for _ in 0..200 {
                let mut s = String::new();
                while s.len() < len {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    s.push_str(pieces[(state % pieces.len() as u64) as usize]);
                }
                let got: Vec<String> = words(&s).map(String::from).collect();
                assert_eq!(got, reference(&s), "{s:?}");
            }
        }
        let ascii = "The quick brown fox, 42 times; jumps over the lazy dog!\n".repeat(10);
        assert_eq!(words(&ascii).map(String::from).collect::<Vec<_>>(), reference(&ascii));
    }

    #[test]
    fn word_keys_compare_as_strings() {
        let base = "abcdefghijklmnopqrstuvwxyz";
        for n in 0..=base.len() {
            let a = &base[..n];
            assert!(Word(a) == Word(&base.to_string()[..n]));
            for i in 0..n {
                // Differ in one byte, anywhere: first, middle, last.
                let mut b = a.as_bytes().to_vec();
                b[i] = b'Z';
                assert!(Word(a) != Word(std::str::from_utf8(&b).unwrap()), "{a} vs {b:?}");
            }
            assert!(Word(a) != Word(&base[..n.saturating_sub(1)]) || n == 0);
        }
    }

    #[test]
    fn word_count_map_counts_each_word_once_per_chunk() {
        let mut got = BTreeMap::new();
        WordCount
            .map("f", "a b a c\nb a", &mut |k, v| {
                assert!(got.insert(k.to_string(), v.to_string()).is_none(), "{k} emitted twice");
            })
            .unwrap();
        let want: BTreeMap<String, String> =
            [("a", "3"), ("b", "2"), ("c", "1")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(got, want);
    }

    /// Pairs made on demand, counting the bytes handed out.
    struct Endless {
        keys: u64,
        values_per_key: u64,
        key: u64,
        value: u64,
        produced: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl Groups for Endless {
        fn next_key(&mut self) -> Option<String> {
            if self.key == self.keys {
                return None;
            }
            self.key += 1;
            self.value = 0;
            Some(format!("key{:08}", self.key))
        }
        fn next_value(&mut self) -> Option<String> {
            if self.value == self.values_per_key {
                return None;
            }
            self.value += 1;
            let v = format!("{:0100}", self.value);
            self.produced.set(self.produced.get() + (8 + 3 + 1 + 1 + v.len()) as u64);
            Some(v)
        }
    }

    #[test]
    fn streaming_reduce_streams_a_large_task() {
        // 64 MiB of pairs through `cat`: the pairs are pulled only as the command's output
        // comes back, so what is in flight (in our buffer, the pipes and cat's) stays small.
        let produced = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let mut groups = Endless { keys: 5_000, values_per_key: 120, key: 0, value: 0, produced: produced.clone() };
        let app = Streaming { map_cmd: "cat".into(), reduce_cmd: "cat".into() };
        let (mut lines, mut consumed, mut most_ahead) = (0u64, 0u64, 0u64);
        app.reduce_task(&mut groups, &mut |l: &str| {
            lines += 1;
            consumed += l.len() as u64 + 1;
            most_ahead = most_ahead.max(produced.get() - consumed);
            Ok(())
        })
        .unwrap();
        assert_eq!(lines, 5_000 * 120);
        assert_eq!(consumed, produced.get());
        assert!(produced.get() > 64 << 20);
        assert!(most_ahead < 4 << 20, "{most_ahead} bytes were produced before the command gave them back");
        // A failing command is still an error, and so is a map line without a tab.
        let bad = Streaming { map_cmd: "echo no-tab".into(), reduce_cmd: "exit 3".into() };
        let err =
            bad.reduce_task(&mut VecGroups::new(vec![("k".into(), vec!["v".into()])]), &mut |_| Ok(())).unwrap_err();
        assert!(err.contains("failed"), "{err}");
        let err = bad.map("f", "x", &mut |_, _| {}).unwrap_err();
        assert!(err.contains("without a tab"), "{err}");
    }

    #[test]
    fn decimal_addition_in_place() {
        for (a, b, sum) in [
            ("0", "1", "1"),
            ("9", "1", "10"),
            ("199", "1", "200"),
            ("41", "1", "42"),
            ("12", "30", "42"),
            ("999", "1", "1000"),
        ] {
            let mut acc = a.to_string();
            add_decimal(&mut acc, b);
            assert_eq!(acc, sum);
        }
    }

    #[test]
    fn word_count_combiner_agrees_with_reduce() {
        let wc = WordCount;
        let mut acc = "1".to_string();
        for v in ["1", "1", "5", "1"] {
            wc.combine("w", &mut acc, v);
        }
        let values = ["1", "1", "1", "5", "1"].map(String::from);
        assert_eq!(acc, wc.reduce("w", &mut values.into_iter()).unwrap());
        let err = Registry::builtins().make("nope", &AppOptions::default()).err().unwrap();
        assert!(err.to_string().contains("wc"), "the error lists the known apps: {err}");
    }
}
