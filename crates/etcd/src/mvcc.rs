//! The multi-version key/value store, as etcd's `server/storage/mvcc` defines it.
//!
//! Every write transaction that changes something increases the store revision by one; the
//! changes of one transaction share that main revision and are told apart by a sub revision
//! (their order inside the transaction). Each key keeps its history: one entry per revision that
//! touched it, a put or a tombstone. A read at revision `r` sees, for each key, the latest entry
//! whose main revision is at most `r`. Compaction at `c` forgets what only reads below `c` could
//! see.
//!
//! The same history is the watch event log: [`Store::events`] lists the entries of a key range
//! in revision order from a start revision, so a watcher can resume from any revision that has
//! not been compacted.

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::proto::mvccpb;

/// A revision: (main, sub). `main` is the store revision of the write transaction, `sub` the
/// index of the change inside it.
pub type Rev = (i64, i64);

/// The key range of a request, decoded from etcd's `key` / `range_end` convention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: the key alone.
    Single(Vec<u8>),
    /// `range_end` is `"\0"`: every key `>= key`.
    From(Vec<u8>),
    /// `[key, range_end)`.
    Between(Vec<u8>, Vec<u8>),
}

impl KeyRange {
    /// Decodes etcd's convention: empty `range_end` means the key alone, `"\0"` means every key
    /// from `key` on, anything else the half-open interval `[key, range_end)`.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    /// Whether `k` is in the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(key) => k == key.as_slice(),
            KeyRange::From(key) => k >= key.as_slice(),
            KeyRange::Between(key, end) => k >= key.as_slice() && k < end.as_slice(),
        }
    }

    fn bounds(&self) -> Option<KeyBounds<'_>> {
        match self {
            KeyRange::Single(k) => Some((Bound::Included(k), Bound::Included(k))),
            KeyRange::From(k) => Some((Bound::Included(k), Bound::Unbounded)),
            // An empty or inverted interval holds nothing (a map's `range` would panic on it).
            KeyRange::Between(k, e) if k >= e => None,
            KeyRange::Between(k, e) => Some((Bound::Included(k), Bound::Excluded(e))),
        }
    }
}

/// Bounds of a key range, as a map's `range` takes them.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// A live value of a key at some revision (etcd's `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    /// Revision of the put that created this generation of the key.
    pub create_revision: i64,
    /// Revision of this put.
    pub mod_revision: i64,
    /// Number of puts since the key was created (1 for the first).
    pub version: i64,
    /// The value; shared, so that copies of a history (the store's copy on write after a
    /// snapshot) do not copy the values. Encoded as a `Vec<u8>` is, as one byte string.
    #[serde(with = "sixfive_raft::bytes")]
    pub value: Arc<[u8]>,
    /// Lease attached to the key (0: none).
    pub lease: i64,
}

impl Kv {
    /// The protobuf form, for `key`.
    pub fn to_proto(&self, key: &[u8]) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.to_vec(),
            lease: self.lease,
        }
    }
}

/// One entry of a key's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    rev: Rev,
    /// `None`: a tombstone (the key was deleted at `rev`).
    kv: Option<Kv>,
}

/// Errors of reads and compaction at a revision (etcd's `mvcc.ErrCompacted` / `ErrFutureRev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RevError {
    /// The revision is older than the compaction revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The revision is newer than the store's.
    #[error("mvcc: required revision is a future revision")]
    Future,
}

/// A change event (etcd's `mvccpb.Event`), with the value the key had before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Revision of the change.
    pub rev: Rev,
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` for a delete.
    pub kv: Option<Kv>,
    /// The value before the change, if the key existed and its history still holds it.
    pub prev: Option<Kv>,
}

impl Event {
    /// The protobuf form; `prev_kv` only when `with_prev`. A delete's key-value carries the key
    /// and the delete's revision as `mod_revision`, as etcd sends it.
    pub fn to_proto(&self, with_prev: bool) -> mvccpb::Event {
        let (r#type, kv) = match &self.kv {
            Some(kv) => (mvccpb::event::EventType::Put, kv.to_proto(&self.key)),
            None => (
                mvccpb::event::EventType::Delete,
                mvccpb::KeyValue { key: self.key.clone(), mod_revision: self.rev.0, ..Default::default() },
            ),
        };
        mvccpb::Event {
            r#type: r#type as i32,
            kv: Some(kv),
            prev_kv: if with_prev { self.prev.as_ref().map(|p| p.to_proto(&self.key)) } else { None },
        }
    }
}

/// Result of a range read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResult {
    /// The key-values found, in key order, at most `limit` of them.
    pub kvs: Vec<mvccpb::KeyValue>,
    /// How many keys the range holds at the revision read (ignores `limit`).
    pub count: i64,
}

/// A key as the store holds it: one allocation shared by its history and the revision index.
type Key = Arc<[u8]>;

/// The MVCC store.
///
/// Invariants (checked by [`Store::check`]):
/// - every history in `keys` is non-empty and strictly increasing in revision, and its first
///   entry is a put (a tombstone only ends a generation);
/// - `by_rev` holds exactly one `(rev, key)` for every entry of every history;
/// - every revision in the store is at most `(rev, _)`, and `compact_rev <= rev`;
/// - `size` is the sum of the entries' sizes.
///
/// Both maps are persistent B-trees: a clone shares every node and costs O(1), and a write
/// after it copies only the nodes on its path (each node once, however many writes follow).
/// So a snapshot's copy of a store of any size takes no time on the node's loop (etcd gets
/// the same from bolt's copy-on-write pages), and the writes meanwhile pay for what they
/// touch.
///
/// Serialised, a store is its histories and counters; the revision index is rebuilt from the
/// histories when read back (it says nothing they do not).
#[derive(Clone, Debug, Default)]
pub struct Store {
    keys: OrdMap<Key, Vec<Entry>>,
    by_rev: OrdMap<Rev, Key>,
    /// The store revision: that of the last write transaction that changed something; 1 for a
    /// new store, as in etcd.
    rev: i64,
    /// The last compaction revision; -1 when never compacted, as in etcd.
    compact_rev: i64,
    /// Approximate bytes held: the sum of [`entry_size`] over every entry.
    size: u64,
}

/// The value a history holds at revision `at` (main revision), if the key is live there. The
/// last entry first: reads and writes at the current revision, nearly all of them, need no
/// search.
fn at_rev(hist: &[Entry], at: i64) -> Option<&Kv> {
    let i = match hist.last() {
        Some(last) if last.rev.0 <= at => hist.len(),
        _ => hist.partition_point(|e| e.rev.0 <= at),
    };
    hist.get(i.checked_sub(1)?)?.kv.as_ref()
}

/// Approximate bytes one history entry holds (key, value and fixed fields).
fn entry_size(key: &[u8], kv: Option<&Kv>) -> u64 {
    (key.len() + kv.map_or(0, |kv| kv.value.len()) + 48) as u64
}

impl Store {
    /// An empty store at revision 1.
    pub fn new() -> Self {
        Store { keys: OrdMap::new(), by_rev: OrdMap::new(), rev: 1, compact_rev: -1, size: 0 }
    }

    /// The current revision.
    pub fn rev(&self) -> i64 {
        self.rev
    }

    /// The last compaction revision (-1: never compacted).
    pub fn compact_rev(&self) -> i64 {
        self.compact_rev
    }

    /// Approximate bytes the history holds.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Number of history entries kept (puts and tombstones of all keys).
    pub fn entries(&self) -> usize {
        self.by_rev.len()
    }

    /// The value of `key` at revision `at` (main revision), if it is live there.
    pub fn get_at(&self, key: &[u8], at: i64) -> Option<&Kv> {
        at_rev(self.keys.get(key)?, at)
    }

    /// Checks a read revision against the store (0 or negative: the current one), as etcd's
    /// `rangeKeys` does; returns the revision to read at.
    pub fn read_rev(&self, rev: i64, cur: i64) -> Result<i64, RevError> {
        if rev > cur {
            return Err(RevError::Future);
        }
        let rev = if rev <= 0 { cur } else { rev };
        if rev < self.compact_rev {
            return Err(RevError::Compacted);
        }
        Ok(rev)
    }

    /// The live keys of `range` at revision `at`, in key order; at most `limit` key-values
    /// (0: no limit) but `count` counts them all.
    pub fn range(&self, range: &KeyRange, at: i64, limit: usize, count_only: bool) -> RangeResult {
        let mut kvs = Vec::new();
        let mut count = 0;
        if let Some(bounds) = range.bounds() {
            for (k, hist) in self.keys.range::<_, [u8]>(bounds) {
                if let Some(kv) = at_rev(hist, at) {
                    count += 1;
                    if !count_only && (limit == 0 || kvs.len() < limit) {
                        kvs.push(kv.to_proto(k));
                    }
                }
            }
        }
        RangeResult { kvs, count }
    }

    /// Appends a put of `key` at revision `rev` (main revision `rev.0 > self.rev` while a
    /// transaction is open). Returns the new key-value and the previous live one.
    pub(crate) fn put(&mut self, key: &[u8], value: Arc<[u8]>, lease: i64, rev: Rev) -> (Kv, Option<Kv>) {
        let next = |prev: Option<&Kv>| {
            let (create_revision, version) = prev.map_or((rev.0, 1), |p| (p.create_revision, p.version + 1));
            Kv { create_revision, mod_revision: rev.0, version, value, lease }
        };
        // One lookup of the key when it has a history (the common case).
        let (key, kv, prev) = match self.keys.get_key_value_mut(key) {
            Some((key, hist)) => {
                debug_assert!(hist.last().is_none_or(|e| e.rev < rev), "history goes forward");
                let prev = hist.last().and_then(|e| e.kv.clone());
                let kv = next(prev.as_ref());
                hist.push(Entry { rev, kv: Some(kv.clone()) });
                (key.clone(), kv, prev)
            }
            None => {
                let (key, kv) = (Key::from(key), next(None));
                self.keys.insert(key.clone(), vec![Entry { rev, kv: Some(kv.clone()) }]);
                (key, kv, None)
            }
        };
        self.size += entry_size(&key, Some(&kv));
        self.by_rev.insert(rev, key);
        (kv, prev)
    }

    /// Appends a tombstone for `key` at `rev` if the key is live; returns its last value.
    pub(crate) fn delete(&mut self, key: &[u8], rev: Rev) -> Option<Kv> {
        let (key, hist) = self.keys.get_key_value_mut(key)?;
        let prev = hist.last()?.kv.clone()?;
        debug_assert!(hist.last().is_none_or(|e| e.rev < rev), "history goes forward");
        hist.push(Entry { rev, kv: None });
        self.size += entry_size(key, None);
        self.by_rev.insert(rev, key.clone());
        Some(prev)
    }

    /// The live keys of `range` now (including changes of the open transaction).
    pub(crate) fn live_keys(&self, range: &KeyRange) -> Vec<Vec<u8>> {
        let Some(bounds) = range.bounds() else { return Vec::new() };
        self.keys
            .range::<_, [u8]>(bounds)
            .filter(|(_, h)| h.last().is_some_and(|e| e.kv.is_some()))
            .map(|(k, _)| k.to_vec())
            .collect()
    }

    /// Ends a write transaction that made changes: the store revision becomes `rev`.
    pub(crate) fn commit(&mut self, rev: i64) {
        assert_eq!(rev, self.rev + 1, "one revision per write transaction");
        self.rev = rev;
    }

    /// Compacts at `rev`, as etcd's `Compact`: refuses a revision at or below the last
    /// compaction (`Compacted`) or above the current one (`Future`). Afterwards reads at
    /// revisions `>= rev` see what they saw before; history only older reads could see is gone.
    pub fn compact(&mut self, rev: i64) -> Result<(), RevError> {
        if rev <= self.compact_rev {
            return Err(RevError::Compacted);
        }
        if rev > self.rev {
            return Err(RevError::Future);
        }
        self.compact_rev = rev;
        // Found first, changed after: only the histories that lose entries are written (and
        // so copied, if a snapshot still shares them).
        let mut trimmed = Vec::new();
        for (k, hist) in self.keys.iter() {
            // The entry a read at `rev` sees; everything before it is invisible to reads at
            // `rev` or later. A tombstone strictly below `rev` goes too; one at exactly `rev`
            // stays, so a watch from `rev` still sees that delete (etcd lost it before its
            // fix, etcd-io/etcd#18274 for issue #18089; Debian's 3.4.23 still may).
            let i = hist.partition_point(|e| e.rev.0 <= rev);
            if i == 0 {
                continue;
            }
            let mut drop = i - 1;
            if hist[i - 1].kv.is_none() && hist[i - 1].rev.0 < rev {
                drop = i;
            }
            if drop > 0 {
                trimmed.push((k.clone(), drop));
            }
        }
        for (k, drop) in trimmed {
            let hist = self.keys.get_mut(&k).expect("listed above");
            for e in hist.drain(..drop) {
                self.by_rev.remove(&e.rev);
                self.size -= entry_size(&k, e.kv.as_ref());
            }
            if hist.is_empty() {
                self.keys.remove(&k);
            }
        }
        Ok(())
    }

    /// The changes to keys of `range` with main revision in `[from, to]`, in revision order,
    /// each with the key's previous value (if history still holds it). `from` must not be below
    /// the compaction revision: `Compacted` then, as a watch from there is cancelled in etcd.
    /// At most about `max` events (0: no limit), never splitting a revision; the caller resumes at
    /// the revision after the last one returned.
    pub fn events(&self, range: &KeyRange, from: i64, to: i64, max: usize) -> Result<Vec<Event>, RevError> {
        if from < self.compact_rev {
            return Err(RevError::Compacted);
        }
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        // Full once `max` events are out, but never in the middle of a revision: the caller
        // resumes at the revision after the last one returned.
        let full =
            |out: &Vec<Event>, next: Rev| max != 0 && out.len() >= max && out.last().is_some_and(|e| e.rev.0 != next.0);
        let scan = |out: &mut Vec<Event>, rev: Rev, key: &[u8]| {
            let hist = self.history(key);
            let i = hist.partition_point(|e| e.rev < rev);
            debug_assert_eq!(hist[i].rev, rev);
            let prev = if i > 0 { hist[i - 1].kv.clone() } else { None };
            out.push(Event { rev, key: key.to_vec(), kv: hist[i].kv.clone(), prev });
        };
        match range {
            // A single key: walk its own history rather than the whole revision index.
            KeyRange::Single(k) => {
                if let Some(hist) = self.keys.get(k.as_slice()) {
                    let start = hist.partition_point(|e| e.rev.0 < from);
                    for e in &hist[start..] {
                        if e.rev.0 > to || full(&out, e.rev) {
                            break;
                        }
                        scan(&mut out, e.rev, k);
                    }
                }
            }
            _ => {
                for (rev, key) in self.by_rev.range((from, 0)..=(to, i64::MAX)) {
                    if full(&out, *rev) {
                        break;
                    }
                    if range.contains(key) {
                        scan(&mut out, *rev, key);
                    }
                }
            }
        }
        Ok(out)
    }

    /// A hash of the history visible at revisions in `(compact_rev, rev]` (etcd's HashKV
    /// covers the same span), equal on replicas that applied the same log.
    pub fn hash(&self, rev: i64) -> u32 {
        let mut h = 0u32;
        for (r, key) in self.by_rev.range(..=(rev, i64::MAX)) {
            let hist = self.history(key);
            let e = &hist[hist.partition_point(|e| e.rev < *r)];
            h = crc32c::crc32c_append(h, &r.0.to_le_bytes());
            h = crc32c::crc32c_append(h, &r.1.to_le_bytes());
            h = crc32c::crc32c_append(h, key);
            match &e.kv {
                Some(kv) => {
                    h = crc32c::crc32c_append(h, &[1]);
                    h = crc32c::crc32c_append(h, &kv.value);
                    h = crc32c::crc32c_append(h, &kv.lease.to_le_bytes());
                }
                None => h = crc32c::crc32c_append(h, &[0]),
            }
        }
        h
    }

    /// The history of a key the revision index names (invariant: it has one).
    fn history(&self, key: &[u8]) -> &[Entry] {
        self.keys.get(key).expect("the revision index names only keys with a history")
    }

    /// A store of these histories and counters, with its revision index rebuilt.
    fn from_histories(keys: OrdMap<Key, Vec<Entry>>, rev: i64, compact_rev: i64, size: u64) -> Store {
        let by_rev = keys.iter().flat_map(|(k, hist)| hist.iter().map(move |e| (e.rev, k.clone()))).collect();
        Store { keys, by_rev, rev, compact_rev, size }
    }

    /// Checks the invariants written on [`Store`]; panics on a broken one.
    pub fn check(&self) {
        assert!(self.compact_rev <= self.rev, "compaction revision beyond the store's");
        let mut n = 0;
        let mut size = 0;
        for (k, hist) in &self.keys {
            assert!(!hist.is_empty(), "empty history kept for {k:?}");
            assert!(
                hist[0].kv.is_some() || hist[0].rev.0 <= self.compact_rev.max(0),
                "history starts with a tombstone"
            );
            for w in hist.windows(2) {
                assert!(w[0].rev < w[1].rev, "history out of order");
            }
            for e in hist {
                assert!(e.rev.0 <= self.rev, "entry beyond the store revision");
                assert_eq!(self.by_rev.get(&e.rev), Some(k), "revision index misses an entry");
                n += 1;
                size += entry_size(k, e.kv.as_ref());
            }
        }
        assert_eq!(n, self.by_rev.len(), "revision index holds entries no history has");
        assert_eq!(size, self.size, "size accounting is off");
    }
}

/// A byte string, serialised as one (not as a sequence of numbers).
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A key read back from a byte string.
struct KeyDe(Key);

impl<'de> Deserialize<'de> for KeyDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        sixfive_raft::bytes::deserialize(d).map(KeyDe)
    }
}

/// The histories, serialised as a map from key to history, in key order.
struct Histories<'a>(&'a OrdMap<Key, Vec<Entry>>);

impl Serialize for Histories<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, h)| (ByteStr(k), h)))
    }
}

/// The histories read back.
struct HistoriesDe(OrdMap<Key, Vec<Entry>>);

impl<'de> Deserialize<'de> for HistoriesDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HistoriesDe;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of key histories")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HistoriesDe, A::Error> {
                let mut keys = OrdMap::new();
                while let Some((k, h)) = map.next_entry::<KeyDe, Vec<Entry>>()? {
                    keys.insert(k.0, h);
                }
                Ok(HistoriesDe(keys))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for Store {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Store", 4)?;
        st.serialize_field("keys", &Histories(&self.keys))?;
        st.serialize_field("rev", &self.rev)?;
        st.serialize_field("compact_rev", &self.compact_rev)?;
        st.serialize_field("size", &self.size)?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Store {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "Store")]
        struct Wire {
            keys: HistoriesDe,
            rev: i64,
            compact_rev: i64,
            size: u64,
        }
        let w = Wire::deserialize(d)?;
        Ok(Store::from_histories(w.keys.0, w.rev, w.compact_rev, w.size))
    }
}

/// A store as snapshots before the persistent maps encoded it: the revision index was
/// written out too. Read (and the index dropped) so that old snapshots still restore.
#[derive(Deserialize)]
pub(crate) struct LegacyStore {
    keys: HistoriesDe,
    #[allow(dead_code, reason = "read to skip it: rebuilt from the histories")]
    by_rev: Vec<(Rev, KeyDe)>,
    rev: i64,
    compact_rev: i64,
    size: u64,
}

impl From<LegacyStore> for Store {
    fn from(l: LegacyStore) -> Store {
        Store::from_histories(l.keys.0, l.rev, l.compact_rev, l.size)
    }
}
