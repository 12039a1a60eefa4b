//! The key/value state machine: versioned Put/Get (section 2 of the catalogue), Append, Delete
//! and an ordered range scan, with limits checked before anything changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 4 << 10;
/// Largest value accepted (and largest value an Append may produce).
pub const MAX_VALUE_BYTES: usize = 32 << 20;
/// Most entries one scan returns.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// An operation on the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The value and version of `key`.
    Get {
        /// Key.
        key: String,
    },
    /// Sets `key` to `value` if its version is `version` (0: the key must not exist).
    Put {
        /// Key.
        key: String,
        /// New value.
        value: String,
        /// Expected current version.
        version: u64,
    },
    /// Appends `arg` to `key`'s value (creating it), returns the old value.
    Append {
        /// Key.
        key: String,
        /// Suffix.
        arg: String,
    },
    /// Removes `key`.
    Delete {
        /// Key.
        key: String,
    },
    /// Entries with `start <= key < end` (no `end`: to the last key), in key order, at most `limit`.
    Scan {
        /// First key.
        start: String,
        /// End (exclusive).
        end: Option<String>,
        /// Most entries.
        limit: u32,
    },
}

impl Op {
    /// The key this operation is about (a scan's start).
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key } | Op::Put { key, .. } | Op::Append { key, .. } | Op::Delete { key } => key,
            Op::Scan { start, .. } => start,
        }
    }

    /// Whether the operation never changes the store.
    pub fn is_read_only(&self) -> bool {
        matches!(self, Op::Get { .. } | Op::Scan { .. })
    }
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// Get: value and version.
    Value {
        /// Value.
        value: String,
        /// Version (number of successful writes since the key was created).
        version: u64,
    },
    /// Put or Delete applied.
    Ok,
    /// Append applied; the value before it.
    Appended {
        /// The old value.
        old: String,
    },
    /// Scan result: (key, value, version).
    Entries(Vec<(String, String, u64)>),
    /// The operation was refused and changed nothing.
    Err(KvError),
}

impl OpResult {
    fn unexpected(self) -> KvError {
        KvError::Malformed(format!("unexpected reply {self:?}"))
    }

    /// A Get's answer: value and version.
    pub fn into_value(self) -> Result<(String, u64), KvError> {
        match self {
            OpResult::Value { value, version } => Ok((value, version)),
            OpResult::Err(e) => Err(e),
            r => Err(r.unexpected()),
        }
    }

    /// A Put's or Delete's answer.
    pub fn into_done(self) -> Result<(), KvError> {
        match self {
            OpResult::Ok => Ok(()),
            OpResult::Err(e) => Err(e),
            r => Err(r.unexpected()),
        }
    }

    /// An Append's answer: the old value.
    pub fn into_appended(self) -> Result<String, KvError> {
        match self {
            OpResult::Appended { old } => Ok(old),
            OpResult::Err(e) => Err(e),
            r => Err(r.unexpected()),
        }
    }

    /// A Scan's answer.
    pub fn into_entries(self) -> Result<Vec<(String, String, u64)>, KvError> {
        match self {
            OpResult::Entries(e) => Ok(e),
            OpResult::Err(e) => Err(e),
            r => Err(r.unexpected()),
        }
    }
}

/// Why an operation was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// No such key.
    #[error("no such key")]
    NoKey,
    /// The Put's version is not the stored one; read the key again and retry with its version.
    #[error("version mismatch: the key changed since it was read")]
    Version,
    /// The key is longer than the limit.
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value (or the value an Append would produce) is larger than the limit.
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The scan asks for more entries than allowed.
    #[error("scan limit {limit} exceeds the maximum of {max}; page through with smaller scans")]
    ScanLimit {
        /// Asked.
        limit: u32,
        /// Allowed.
        max: u32,
    },
    /// The request could not be decoded.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A delayed copy of a request the client has already moved past; not executed.
    #[error("stale duplicate of an earlier request; not executed")]
    Stale,
    /// Client side: a retried Put was answered ErrVersion, so the first attempt may or may not
    /// have been applied. Read the key to find out.
    #[error("the Put may or may not have been applied (its retry found a different version)")]
    Maybe,
}

/// The store: key -> (value, version).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvStore {
    data: BTreeMap<String, (String, u64)>,
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::KeyTooLarge { len: key.len(), max: MAX_KEY_BYTES });
    }
    Ok(())
}

fn check_value(len: usize) -> Result<(), KvError> {
    if len > MAX_VALUE_BYTES {
        return Err(KvError::ValueTooLarge { len, max: MAX_VALUE_BYTES });
    }
    Ok(())
}

impl KvStore {
    /// Checks an operation against the limits without applying it.
    pub fn validate(&self, op: &Op) -> Result<(), KvError> {
        check_key(op.key())?;
        match op {
            Op::Put { value, .. } => check_value(value.len()),
            Op::Append { key, arg } => {
                let old = self.data.get(key).map_or(0, |(v, _)| v.len());
                check_value(old + arg.len())
            }
            Op::Scan { end, limit, .. } => {
                if let Some(e) = end {
                    check_key(e)?;
                }
                if *limit > MAX_SCAN_LIMIT {
                    return Err(KvError::ScanLimit { limit: *limit, max: MAX_SCAN_LIMIT });
                }
                Ok(())
            }
            Op::Get { .. } | Op::Delete { .. } => Ok(()),
        }
    }

    /// Applies `op` (taken by value: its key and value move into the store, not copied). A
    /// refused operation changes nothing.
    pub fn apply(&mut self, op: Op) -> OpResult {
        if let Err(e) = self.validate(&op) {
            return OpResult::Err(e);
        }
        if op.is_read_only() {
            return self.read(&op);
        }
        match op {
            Op::Put { key, value, version } => match self.data.get_mut(&key) {
                Some((v, ver)) if *ver == version => {
                    *v = value;
                    *ver += 1;
                    OpResult::Ok
                }
                Some(_) => OpResult::Err(KvError::Version),
                None if version == 0 => {
                    self.data.insert(key, (value, 1));
                    OpResult::Ok
                }
                None => OpResult::Err(KvError::NoKey),
            },
            Op::Append { key, arg } => {
                let e = self.data.entry(key).or_insert((String::new(), 0));
                let old = e.0.clone();
                e.0.push_str(&arg);
                e.1 += 1;
                OpResult::Appended { old }
            }
            Op::Delete { key } => match self.data.remove(&key) {
                Some(_) => OpResult::Ok,
                None => OpResult::Err(KvError::NoKey),
            },
            Op::Get { .. } | Op::Scan { .. } => unreachable!("reads are handled by read()"),
        }
    }

    /// Answers a read-only operation (Get, Scan); never changes the store.
    pub fn read(&self, op: &Op) -> OpResult {
        if let Err(e) = self.validate(op) {
            return OpResult::Err(e);
        }
        match op {
            Op::Get { key } => match self.data.get(key) {
                Some((v, ver)) => OpResult::Value { value: v.clone(), version: *ver },
                None => OpResult::Err(KvError::NoKey),
            },
            Op::Scan { start, end, limit } => {
                let upper = match end {
                    Some(e) => std::ops::Bound::Excluded(e.clone()),
                    None => std::ops::Bound::Unbounded,
                };
                if end.as_ref().is_some_and(|e| e <= start) {
                    return OpResult::Entries(Vec::new());
                }
                let entries = self
                    .data
                    .range((std::ops::Bound::Included(start.clone()), upper))
                    .take(*limit as usize)
                    .map(|(k, (v, ver))| (k.clone(), v.clone(), *ver))
                    .collect();
                OpResult::Entries(entries)
            }
            _ => OpResult::Err(KvError::Malformed("not a read-only operation".into())),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str, ver: u64) -> Op {
        Op::Put { key: k.into(), value: v.into(), version: ver }
    }
    fn get(k: &str) -> Op {
        Op::Get { key: k.into() }
    }

    #[test]
    fn versioned_put_semantics() {
        let mut s = KvStore::default();
        assert_eq!(s.apply(get("k")), OpResult::Err(KvError::NoKey));
        assert_eq!(s.apply(put("k", "a", 1)), OpResult::Err(KvError::NoKey));
        assert_eq!(s.apply(put("k", "a", 0)), OpResult::Ok);
        assert_eq!(s.apply(put("k", "b", 0)), OpResult::Err(KvError::Version));
        assert_eq!(s.apply(get("k")), OpResult::Value { value: "a".into(), version: 1 });
        assert_eq!(s.apply(put("k", "b", 1)), OpResult::Ok);
        assert_eq!(s.apply(get("k")), OpResult::Value { value: "b".into(), version: 2 });
    }

    #[test]
    fn append_delete_scan() {
        let mut s = KvStore::default();
        assert_eq!(s.apply(Op::Append { key: "a".into(), arg: "x".into() }), OpResult::Appended { old: "".into() });
        assert_eq!(s.apply(Op::Append { key: "a".into(), arg: "y".into() }), OpResult::Appended { old: "x".into() });
        assert_eq!(s.apply(get("a")), OpResult::Value { value: "xy".into(), version: 2 });
        for k in ["b", "c", "d"] {
            s.apply(put(k, k, 0));
        }
        let scan =
            |start: &str, end: Option<&str>, limit| Op::Scan { start: start.into(), end: end.map(Into::into), limit };
        let keys = |r: OpResult| match r {
            OpResult::Entries(e) => e.into_iter().map(|(k, _, _)| k).collect::<Vec<_>>(),
            r => panic!("{r:?}"),
        };
        assert_eq!(keys(s.apply(scan("b", Some("d"), 10))), vec!["b", "c"]);
        assert_eq!(keys(s.apply(scan("", None, 2))), vec!["a", "b"]);
        assert_eq!(keys(s.apply(scan("d", Some("a"), 10))), Vec::<String>::new());
        assert_eq!(s.apply(Op::Delete { key: "b".into() }), OpResult::Ok);
        assert_eq!(s.apply(Op::Delete { key: "b".into() }), OpResult::Err(KvError::NoKey));
        assert_eq!(s.apply(put("b", "again", 0)), OpResult::Ok, "a deleted key starts over at version 0");
    }

    #[test]
    fn limits_refuse_and_change_nothing() {
        let mut s = KvStore::default();
        s.apply(put("k", "v", 0));
        let before = s.clone();
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(s.apply(put(&long_key, "v", 0)), OpResult::Err(KvError::KeyTooLarge { .. })));
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(s.apply(put("k", &big, 1)), OpResult::Err(KvError::ValueTooLarge { .. })));
        let half = "x".repeat(MAX_VALUE_BYTES / 2 + 1);
        assert_eq!(s.apply(Op::Append { key: "h".into(), arg: half.clone() }), OpResult::Appended { old: "".into() });
        let after_first = s.clone();
        assert!(matches!(
            s.apply(Op::Append { key: "h".into(), arg: half }),
            OpResult::Err(KvError::ValueTooLarge { .. })
        ));
        assert_eq!(s, after_first);
        let scan = Op::Scan { start: "".into(), end: None, limit: MAX_SCAN_LIMIT + 1 };
        assert!(matches!(s.apply(scan), OpResult::Err(KvError::ScanLimit { .. })));
        s.apply(Op::Delete { key: "h".into() });
        assert_eq!(s, before);
    }
}
