//! Sequential models of the services we check.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};

use crate::Model;

fn key_hash(key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Arguments of an operation on a versioned key/value store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionedInput {
    /// Get(key).
    Get {
        /// Key.
        key: String,
    },
    /// Put(key, value, version): applies only if `version` is the stored version (0 = absent).
    Put {
        /// Key.
        key: String,
        /// New value.
        value: String,
        /// Expected version.
        version: u64,
    },
}

/// Results of an operation on a versioned key/value store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionedOutput {
    /// Get found `(value, version)`.
    Value(String, u64),
    /// Get or Put: no such key.
    NoKey,
    /// Put applied.
    Ok,
    /// Put refused: the version did not match.
    ErrVersion,
    /// Put may or may not have applied (a retried Put answered ErrVersion).
    ErrMaybe,
}

/// A key/value store whose Puts are conditional on the version (section 2 of the catalogue).
/// State per key: `None` (absent) or `(value, version)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct VersionedKv;

impl Model for VersionedKv {
    type State = Option<(String, u64)>;
    type Input = VersionedInput;
    type Output = VersionedOutput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(&self, s: &Self::State, input: &VersionedInput, out: Option<&VersionedOutput>) -> Option<Self::State> {
        use VersionedOutput as O;
        match input {
            VersionedInput::Get { .. } => {
                let actual = match s {
                    Some((v, ver)) => O::Value(v.clone(), *ver),
                    None => O::NoKey,
                };
                match out {
                    None => Some(s.clone()),
                    Some(o) if *o == actual => Some(s.clone()),
                    Some(_) => None,
                }
            }
            VersionedInput::Put { value, version, .. } => {
                let current = s.as_ref().map_or(0, |(_, v)| *v);
                let applies = current == *version;
                let applied = Some((value.clone(), version + 1));
                match out {
                    // Unknown or maybe: it applied if (and only if) the version matched here.
                    None | Some(O::ErrMaybe) => Some(if applies { applied } else { s.clone() }),
                    Some(O::Ok) => applies.then_some(applied),
                    Some(O::ErrVersion) => (s.is_some() && !applies).then(|| s.clone()),
                    Some(O::NoKey) => (s.is_none() && *version > 0).then_some(None),
                    Some(O::Value(..)) => None,
                }
            }
        }
    }

    fn partition(&self, input: &VersionedInput) -> u64 {
        match input {
            VersionedInput::Get { key } | VersionedInput::Put { key, .. } => key_hash(key),
        }
    }
}

/// Arguments of an operation on a key/value store with Append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendInput {
    /// Get(key): the value, "" if absent.
    Get {
        /// Key.
        key: String,
    },
    /// Put(key, value): replaces.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Append(key, arg): appends, returns the old value.
    Append {
        /// Key.
        key: String,
        /// Suffix.
        arg: String,
    },
}

/// Results of an operation on a key/value store with Append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutput {
    /// Get's value, or Append's old value.
    Value(String),
    /// Put done.
    Ok,
}

/// A key/value store of strings with Get, Put and Append (Append returns the old value).
#[derive(Clone, Copy, Debug, Default)]
pub struct AppendKv;

impl Model for AppendKv {
    type State = String;
    type Input = AppendInput;
    type Output = AppendOutput;

    fn init(&self) -> String {
        String::new()
    }

    fn step(&self, s: &String, input: &AppendInput, out: Option<&AppendOutput>) -> Option<String> {
        match (input, out) {
            (AppendInput::Get { .. }, None) => Some(s.clone()),
            (AppendInput::Get { .. }, Some(AppendOutput::Value(v))) => (v == s).then(|| s.clone()),
            (AppendInput::Put { value, .. }, None | Some(AppendOutput::Ok)) => Some(value.clone()),
            (AppendInput::Append { arg, .. }, None) => Some(format!("{s}{arg}")),
            (AppendInput::Append { arg, .. }, Some(AppendOutput::Value(old))) => {
                (old == s).then(|| format!("{s}{arg}"))
            }
            _ => None,
        }
    }

    fn partition(&self, input: &AppendInput) -> u64 {
        match input {
            AppendInput::Get { key } | AppendInput::Put { key, .. } | AppendInput::Append { key, .. } => key_hash(key),
        }
    }
}

/// Any deterministic sequential object, given as a function `apply(state, input) -> (state,
/// output)`: an operation is legal when its recorded output equals what `apply` returns.
/// Later layers reuse it for their own state machines.
pub struct FnModel<S, I, O, F, P> {
    /// Initial state.
    pub init: S,
    /// The object's behaviour.
    pub apply: F,
    /// Partition key of an input (return 0 to check the history as one).
    pub partition: P,
    _marker: std::marker::PhantomData<(I, O)>,
}

impl<S, I, O, F, P> FnModel<S, I, O, F, P>
where
    F: Fn(&S, &I) -> (S, O),
    P: Fn(&I) -> u64,
{
    /// A model from its initial state, behaviour and partition function.
    pub fn new(init: S, apply: F, partition: P) -> Self {
        FnModel { init, apply, partition, _marker: std::marker::PhantomData }
    }
}

impl<S, I, O, F, P> Model for FnModel<S, I, O, F, P>
where
    S: Clone + Eq + Hash + Debug,
    I: Debug,
    O: Debug + PartialEq,
    F: Fn(&S, &I) -> (S, O),
    P: Fn(&I) -> u64,
{
    type State = S;
    type Input = I;
    type Output = O;

    fn init(&self) -> S {
        self.init.clone()
    }

    fn step(&self, s: &S, input: &I, out: Option<&O>) -> Option<S> {
        let (next, expected) = (self.apply)(s, input);
        match out {
            None => Some(next),
            Some(o) => (*o == expected).then_some(next),
        }
    }

    fn partition(&self, input: &I) -> u64 {
        (self.partition)(input)
    }
}
