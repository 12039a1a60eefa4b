//! # sixfive-linearizability: is this history linearizable?
//!
//! A history is a list of operations, each with the time it was called, the time it returned
//! and what it returned. It is linearizable if the operations can be put in one order that
//! respects real time (an operation that returned before another was called comes first) and in
//! which every operation, applied to a sequential [`Model`], returns what it really returned.
//!
//! The search is Wing and Gong's, with Lowe's memoisation (as in Porcupine): walk the history's
//! call and return events in time order, tentatively linearize pending operations, backtrack
//! on reaching a return that was not linearized, and never revisit a (set of linearized
//! operations, model state) pair. Histories are first split by [`Model::partition`] (for a
//! key/value store: by key), since operations on different keys are independent.
//!
//! Operations whose outcome the client never learned (a timeout, `ErrMaybe`) have no output and
//! no return time: they may be linearized anywhere after their call, or effectively not at all
//! (at the very end, where nothing observes them).
//!
//! The search is exponential in the worst case, so it runs under a time budget and may answer
//! [`Verdict::Unknown`].
#![deny(missing_docs)]

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

pub mod models;

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op<I, O> {
    /// Which client ran it (for explanations).
    pub client: u64,
    /// When it was called.
    pub call: u64,
    /// When it returned; `None` if the client never learned its outcome.
    pub ret: Option<u64>,
    /// What was asked.
    pub input: I,
    /// What came back; `None` if the outcome is unknown (then `ret` is `None` too).
    pub output: Option<O>,
}

/// A sequential specification.
pub trait Model {
    /// The state of the sequential object. Hashed for memoisation.
    type State: Clone + Eq + Hash + Debug;
    /// An operation's arguments.
    type Input: Debug;
    /// An operation's result.
    type Output: Debug;
    /// The initial state.
    fn init(&self) -> Self::State;
    /// Applies `input` to `state`. `output` is what the operation returned (`None`: unknown, so
    /// any result is acceptable). Returns the next state, or `None` if the operation could not
    /// have returned `output` in `state`.
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;
    /// Operations with different partition keys never affect each other.
    fn partition(&self, _input: &Self::Input) -> u64 {
        0
    }
}

/// The checker's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some order explains every result.
    Linearizable,
    /// No order does. The text explains the shortest failing prefix.
    NotLinearizable(String),
    /// The time budget ran out first.
    Unknown,
}

/// Checks `history` against `model` within `budget`.
pub fn check<M: Model>(model: &M, history: &[Op<M::Input, M::Output>], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    // One pass to group operations by partition (history order is kept within a partition).
    let mut parts: std::collections::BTreeMap<u64, Vec<_>> = std::collections::BTreeMap::new();
    for op in history {
        parts.entry(model.partition(&op.input)).or_default().push(op);
    }
    let mut unknown = false;
    for part in parts.values() {
        match search(model, part, deadline) {
            Search::Ok => {}
            Search::Timeout => unknown = true,
            Search::Fail => {
                return Verdict::NotLinearizable(explain(model, part, deadline));
            }
        }
    }
    if unknown { Verdict::Unknown } else { Verdict::Linearizable }
}

enum Search {
    Ok,
    Fail,
    Timeout,
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    ret_event: usize,
}

/// Wing-Gong-Lowe over one partition.
fn search<M: Model>(model: &M, ops: &[&Op<M::Input, M::Output>], deadline: Instant) -> Search {
    let n = ops.len();
    if n == 0 {
        return Search::Ok;
    }
    // Events in time order; at equal times calls come first (so equal times are concurrent).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, 0, i));
        order.push((op.ret.unwrap_or(u64::MAX), 1, i));
    }
    order.sort_unstable();
    let mut ret_pos = vec![0; n];
    for (pos, &(_, kind, op)) in order.iter().enumerate() {
        if kind == 1 {
            ret_pos[op] = pos;
        }
    }
    let events: Vec<Event> =
        order.iter().map(|&(_, kind, op)| Event { op, is_call: kind == 0, ret_event: ret_pos[op] }).collect();
    // A doubly linked list over the events: nodes 0..m are events, `head` is a sentinel before
    // the first, `nil` marks the end.
    let m = events.len();
    let (head, nil) = (m, m + 1);
    let mut next: Vec<usize> = (1..=m).collect();
    next[m - 1] = nil;
    next.push(0); // head -> first event
    next.push(nil);
    let mut prev: Vec<usize> = std::iter::once(head).chain(0..m - 1).collect();
    prev.push(nil);
    prev.push(nil);

    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != nil {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != nil {
            prev[nx] = i;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    // (call entry linearized, state before it, pass it was chosen in)
    let mut stack: Vec<(usize, M::State, bool)> = Vec::new();
    let mut state = model.init();
    let mut entry = next[head];
    // Candidates are tried in two passes over the window of pending calls: first operations
    // whose outcome is known, then those whose outcome is unknown. Both passes together try
    // every candidate, so the search stays complete; but an unknown operation that nothing
    // observed is then linearized at the end for free instead of being tried everywhere first
    // (which is exponential in the number of such operations).
    let mut unknown_pass = false;
    let mut steps = 0u64;
    while next[head] != nil {
        steps += 1;
        if steps.is_multiple_of(4096) && Instant::now() > deadline {
            return Search::Timeout;
        }
        let ev = events[entry];
        if ev.is_call {
            let op = ops[ev.op];
            if op.output.is_none() == unknown_pass
                && let Some(new_state) = model.step(&state, &op.input, op.output.as_ref())
            {
                linearized[ev.op / 64] |= 1 << (ev.op % 64);
                if cache.insert((linearized.clone(), new_state.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, new_state), unknown_pass));
                    unlink(entry, &mut next, &mut prev);
                    unlink(ev.ret_event, &mut next, &mut prev);
                    entry = next[head];
                    unknown_pass = false;
                    continue;
                }
                linearized[ev.op / 64] &= !(1 << (ev.op % 64));
            }
            entry = next[entry];
        } else if !unknown_pass {
            // End of the window: now try the operations with unknown outcomes.
            unknown_pass = true;
            entry = next[head];
        } else {
            // A return whose call we could not linearize before it: undo the latest choice.
            let Some((call_entry, old_state, pass)) = stack.pop() else { return Search::Fail };
            let e = events[call_entry];
            linearized[e.op / 64] &= !(1 << (e.op % 64));
            state = old_state;
            relink(e.ret_event, &mut next, &mut prev);
            relink(call_entry, &mut next, &mut prev);
            entry = next[call_entry];
            unknown_pass = pass;
        }
    }
    Search::Ok
}

/// Finds the shortest prefix (by real time) of a failing partition that already cannot be
/// linearized, and describes it. In a prefix ending at time `t`, operations still running at
/// `t` count as having an unknown outcome.
fn explain<M: Model>(model: &M, ops: &[&Op<M::Input, M::Output>], deadline: Instant) -> String {
    let mut times: Vec<u64> = ops.iter().flat_map(|o| [Some(o.call), o.ret]).flatten().collect();
    times.sort_unstable();
    times.dedup();
    let prefix = |t: u64| -> Vec<Op<&M::Input, &M::Output>> {
        ops.iter()
            .filter(|o| o.call <= t)
            .map(|o| match o.ret {
                Some(r) if r <= t => {
                    Op { client: o.client, call: o.call, ret: o.ret, input: &o.input, output: o.output.as_ref() }
                }
                _ => Op { client: o.client, call: o.call, ret: None, input: &o.input, output: None },
            })
            .collect()
    };
    let fails = |t: u64| -> bool {
        let p = prefix(t);
        let owned: Vec<Op<&M::Input, &M::Output>> = p;
        let refs: Vec<&Op<&M::Input, &M::Output>> = owned.iter().collect();
        matches!(search(&ByRef(model), &refs, deadline), Search::Fail)
    };
    // Binary search for the first time at which the prefix fails (the whole history fails).
    let (mut lo, mut hi) = (0usize, times.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails(times[mid]) { hi = mid } else { lo = mid + 1 }
    }
    let t = times[lo];
    let mut out = format!(
        "not linearizable: the history up to time {t} already has no valid order ({} operations on this partition):\n",
        prefix(t).len()
    );
    let mut involved: Vec<&&Op<M::Input, M::Output>> = ops.iter().filter(|o| o.call <= t).collect();
    involved.sort_by_key(|o| o.call);
    for o in involved {
        let ret = match o.ret {
            Some(r) if r <= t => format!("{r}"),
            Some(r) => format!("{r} (after the prefix)"),
            None => "never".to_string(),
        };
        out += &format!(
            "  client {:>4}  [{:>10} .. {:>10}]  {:?} -> {}\n",
            o.client,
            o.call,
            ret,
            o.input,
            o.output.as_ref().map_or("unknown".to_string(), |x| format!("{x:?}"))
        );
    }
    out
}

/// A model over references, used to re-check prefixes without cloning operations.
struct ByRef<'a, M>(&'a M);

impl<'a, M: Model> Model for ByRef<'a, M> {
    type State = M::State;
    type Input = &'a M::Input;
    type Output = &'a M::Output;
    fn init(&self) -> M::State {
        self.0.init()
    }
    fn step(&self, s: &M::State, i: &&'a M::Input, o: Option<&&'a M::Output>) -> Option<M::State> {
        self.0.step(s, i, o.copied())
    }
}
