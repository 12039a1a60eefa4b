//! Thesis section 10.2.1: the leader writes its own log in parallel with replicating it. Each
//! test drives nodes by hand, `Ready` by `Ready`, so it can stop a leader between sending its
//! `Append`s and writing the same entries, and crash it there.
//!
//! The rules (their safety argument is on `sixfive_raft::Ready`): a leader's replication goes
//! in `Ready::messages`, which may leave before the persist; votes and acknowledgements go in
//! `Ready::persisted_messages`; a `Ready` that changes the term or the vote holds back every
//! message; and the leader counts its own copy toward a quorum only once `advance` reports it
//! persisted.

use std::collections::{BTreeMap, VecDeque};

use sixfive_raft::*;

mod common;
use common::Mem;

fn config(id: NodeId, voters: Vec<NodeId>) -> Config {
    let mut c = Config::new(id, voters);
    c.pre_vote = false;
    c
}

/// Nodes with storage; messages queue until delivered.
struct Cluster {
    nodes: BTreeMap<NodeId, (RawNode, Mem)>,
    voters: Vec<NodeId>,
    queue: VecDeque<Message>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        let voters: Vec<NodeId> = (1..=n).collect();
        let nodes = voters.iter().map(|&id| (id, (RawNode::new(config(id, voters.clone())).unwrap(), Mem::default())));
        Cluster { nodes: nodes.collect(), voters, queue: VecDeque::new(), applied: BTreeMap::new() }
    }

    /// Three nodes, node 1 elected, its no-op committed everywhere.
    fn elected() -> Cluster {
        let mut c = Cluster::new(3);
        c.node(1).campaign();
        c.stabilize();
        assert_eq!(c.node(1).status().role, Role::Leader);
        c
    }

    fn node(&mut self, id: NodeId) -> &mut RawNode {
        &mut self.nodes.get_mut(&id).unwrap().0
    }

    /// Runs node `id`'s Ready loop as a driver would (early messages, persist, the rest,
    /// apply). Returns (early, after-persist) messages; both also join the queue.
    fn run(&mut self, id: NodeId) -> (Vec<Message>, Vec<Message>) {
        let (mut early, mut late) = (Vec::new(), Vec::new());
        let (n, st) = self.nodes.get_mut(&id).unwrap();
        while n.has_ready() {
            let rd = n.ready();
            early.extend(rd.messages.iter().cloned());
            persist_ready(st, &rd).unwrap();
            late.extend(rd.persisted_messages.iter().cloned());
            self.applied.entry(id).or_default().extend(rd.committed_entries.iter().cloned());
            n.advance(&rd);
        }
        self.queue.extend(early.iter().cloned());
        self.queue.extend(late.iter().cloned());
        (early, late)
    }

    /// Delivers `m` and runs the receiver's Ready loop (if it is up).
    fn deliver(&mut self, m: Message) -> (Vec<Message>, Vec<Message>) {
        let to = m.to;
        if !self.nodes.contains_key(&to) {
            return (Vec::new(), Vec::new());
        }
        self.node(to).step(m).unwrap();
        self.run(to)
    }

    fn stabilize(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.run(id);
        }
        while let Some(m) = self.queue.pop_front() {
            self.deliver(m);
        }
    }

    /// Node `id` loses its process: only what it persisted survives.
    fn crash(&mut self, id: NodeId) -> Mem {
        self.nodes.remove(&id).unwrap().1
    }

    fn restart(&mut self, id: NodeId, st: Mem) {
        let n = RawNode::restart(config(id, self.voters.clone()), st.initial_state().unwrap()).unwrap();
        self.nodes.insert(id, (n, st));
    }

    fn applied_data(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied[&id].iter().filter(|e| e.kind == EntryKind::Normal).map(|e| e.data.to_vec()).collect()
    }
}

fn is_append_carrying(m: &Message, index: Index) -> bool {
    matches!(&m.body, MessageBody::Append { entries, .. } if entries.iter().any(|e| e.index == index))
}

fn ack(from: NodeId, index: Index, term: Term) -> Message {
    Message { from, to: 1, term, body: MessageBody::AppendResponse { index, success: true, hint: None } }
}

/// Thesis 10.2.1: the leader's `Append`s may leave before it writes the entries they carry;
/// a follower's answer waits for the follower's write; and the leader's own copy counts only
/// once written: one follower's answer is not a majority of durable copies until then.
#[test]
fn leader_replicates_before_its_own_write_and_counts_itself_after_10_2_1() {
    let mut c = Cluster::elected();
    let (index, term) = c.node(1).propose(b"x".to_vec()).unwrap();
    let rd = c.node(1).ready();
    assert_eq!(rd.entries.last().map(|e| e.index), Some(index), "the Ready carries the entry to write");
    let to: Vec<NodeId> = rd.messages.iter().filter(|m| is_append_carrying(m, index)).map(|m| m.to).collect();
    assert_eq!(to, vec![2, 3], "the Appends go out before the leader's write");
    assert!(rd.persisted_messages.is_empty(), "a leader's Ready holds nothing back: {:?}", rd.persisted_messages);

    // Node 2 writes the entry and only then answers.
    let append = rd.messages.iter().find(|m| m.to == 2).unwrap().clone();
    let (early, late) = c.deliver(append);
    assert!(early.is_empty(), "a follower sends nothing before its write: {early:?}");
    assert!(late.contains(&ack(2, index, term)), "node 2 acknowledges after its write: {late:?}");

    // The leader has not written the entry: node 2's copy alone is no majority.
    c.node(1).step(ack(2, index, term)).unwrap();
    assert!(c.node(1).status().commit < index, "the leader counted a copy it has not written");

    // Written: now it counts, and the entry commits and comes out to apply.
    let n1 = c.nodes.get_mut(&1).unwrap();
    persist_ready(&mut n1.1, &rd).unwrap();
    n1.0.advance(&rd);
    assert_eq!(c.node(1).status().commit, index);
    let rd = c.node(1).ready();
    assert_eq!(rd.committed_entries.last().map(|e| e.index), Some(index));
    c.node(1).advance(&rd);
}

/// Section 5.3's commit rule counts durable copies on a majority; the leader's need not be one
/// of them: two followers' answers commit an entry the leader is still writing.
#[test]
fn followers_alone_commit_what_the_leader_is_still_writing_5_3() {
    let mut c = Cluster::elected();
    let (index, term) = c.node(1).propose(b"x".to_vec()).unwrap();
    let rd = c.node(1).ready();
    for m in rd.messages.clone() {
        c.deliver(m);
    }
    c.node(1).step(ack(2, index, term)).unwrap();
    assert!(c.node(1).status().commit < index);
    c.node(1).step(ack(3, index, term)).unwrap();
    assert_eq!(c.node(1).status().commit, index, "a majority of followers holds it durably");
    let n1 = c.nodes.get_mut(&1).unwrap();
    persist_ready(&mut n1.1, &rd).unwrap();
    n1.0.advance(&rd);
    c.queue.clear();
    c.stabilize();
    assert_eq!(c.applied_data(1), vec![b"x".to_vec()]);
}

/// A leader that sent its `Append`s and crashed before writing never counted itself: the one
/// follower that acknowledged holds the only durable copy, the entry is not committed, and a
/// new leader may overwrite it. (Had the leader counted its unwritten copy, it would have
/// committed an entry that the restarted cluster then lost.)
#[test]
fn a_leader_that_crashes_before_its_write_never_counted_itself() {
    let mut c = Cluster::elected();
    let (index, term) = c.node(1).propose(b"x".to_vec()).unwrap();
    let rd = c.node(1).ready();
    let append = rd.messages.iter().find(|m| m.to == 2).unwrap().clone();
    c.deliver(append);
    c.node(1).step(ack(2, index, term)).unwrap();
    assert!(c.node(1).status().commit < index, "committed with one durable copy");
    let st = c.crash(1);
    assert!(st.0.entries.iter().all(|e| e.index < index), "the crash lost the leader's unwritten entry");
    c.queue.clear();
    c.restart(1, st);
    // Node 3, which never saw the entry, wins with node 1's vote, and its no-op takes the index.
    c.node(3).campaign();
    c.stabilize();
    assert_eq!(c.node(3).status().role, Role::Leader);
    for id in 1..=3 {
        assert!(!c.applied_data(id).contains(&b"x".to_vec()), "node {id} applied an uncommitted entry");
        let e = c.node(id).log().entry(index).cloned().unwrap();
        assert_ne!(e.data, b"x".to_vec(), "node {id} kept the lost entry");
    }
}

/// The other side: an entry the followers committed while the leader was still writing it
/// survives the leader's crash there; the restarted leader learns it from the new leader.
#[test]
fn an_entry_followers_committed_survives_the_leaders_crash_before_its_write() {
    let mut c = Cluster::elected();
    let (index, term) = c.node(1).propose(b"x".to_vec()).unwrap();
    let rd = c.node(1).ready();
    for m in rd.messages.clone() {
        c.deliver(m);
    }
    c.node(1).step(ack(2, index, term)).unwrap();
    c.node(1).step(ack(3, index, term)).unwrap();
    assert_eq!(c.node(1).status().commit, index);
    let st = c.crash(1);
    c.queue.clear();
    c.restart(1, st);
    c.node(2).campaign();
    c.stabilize();
    assert_eq!(c.node(2).status().role, Role::Leader);
    // A heartbeat tells the followers the new commit index.
    for _ in 0..Config::new(1, vec![1]).heartbeat_ticks {
        c.node(2).tick();
    }
    c.stabilize();
    for id in 1..=3 {
        assert_eq!(c.applied_data(id), vec![b"x".to_vec()], "node {id}");
    }
}

/// The term and the vote are durable before any message of the term leaves: a candidate's
/// vote requests and a voter's grant wait for the persist, and so do even a leader's
/// `Append`s when it won in the same step that raised its term (a lone voter with a learner),
/// or a crash could let it lead the same term twice with different logs.
#[test]
fn a_new_term_or_vote_holds_back_every_message_5_2() {
    let mut c = Cluster::new(3);
    c.node(1).campaign();
    let rd = c.node(1).ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(1))));
    assert!(rd.messages.is_empty(), "sent before the term was durable: {:?}", rd.messages);
    assert_eq!(rd.persisted_messages.iter().filter(|m| matches!(m.body, MessageBody::Vote { .. })).count(), 2);
    let vote = rd.persisted_messages.iter().find(|m| m.to == 2).unwrap().clone();
    c.node(1).advance(&rd);
    c.node(2).step(vote).unwrap();
    let rd = c.node(2).ready();
    assert!(rd.messages.is_empty(), "a vote granted before it was durable: {:?}", rd.messages);
    assert!(matches!(
        rd.persisted_messages[..],
        [Message { body: MessageBody::VoteResponse { granted: true, .. }, .. }]
    ));
    c.node(2).advance(&rd);

    // A lone voter with a learner leads at once when it campaigns.
    let mut n = RawNode::new(config(1, vec![1])).unwrap();
    let mut st = Mem::default();
    let drain = |n: &mut RawNode, st: &mut Mem| {
        while n.has_ready() {
            let rd = n.ready();
            persist_ready(st, &rd).unwrap();
            n.advance(&rd);
        }
    };
    n.campaign();
    drain(&mut n, &mut st);
    n.propose_conf_change(&[ConfChange::AddLearner(2)]).unwrap();
    drain(&mut n, &mut st);
    let mut n = RawNode::restart(config(1, vec![1]), st.initial_state().unwrap()).unwrap();
    n.campaign();
    assert_eq!(n.status().role, Role::Leader);
    let rd = n.ready();
    assert_eq!(rd.hard_state.map(|h| h.term), Some(2));
    assert!(rd.messages.is_empty(), "replicated in a term not yet durable: {:?}", rd.messages);
    assert!(rd.persisted_messages.iter().any(|m| m.to == 2 && matches!(m.body, MessageBody::Append { .. })));
    n.advance(&rd);
}

/// A lone voter is its own majority: its entry commits once written, in the next `Ready`.
#[test]
fn a_lone_voter_commits_its_entry_once_written() {
    let mut n = RawNode::new(config(1, vec![1])).unwrap();
    let mut st = Mem::default();
    n.campaign();
    while n.has_ready() {
        let rd = n.ready();
        persist_ready(&mut st, &rd).unwrap();
        n.advance(&rd);
    }
    let (index, _) = n.propose(b"x".to_vec()).unwrap();
    let rd = n.ready();
    assert!(rd.committed_entries.iter().all(|e| e.index < index), "committed before it was written");
    assert_eq!(n.status().commit, index - 1);
    persist_ready(&mut st, &rd).unwrap();
    n.advance(&rd);
    assert_eq!(n.status().commit, index);
    let rd = n.ready();
    assert_eq!(rd.committed_entries.last().map(|e| (e.index, e.data.to_vec())), Some((index, b"x".to_vec())));
    n.advance(&rd);
}

/// Heartbeats acknowledge nothing and leave early; their answers (which confirm ReadIndex
/// rounds) wait like any answer.
#[test]
fn heartbeats_leave_early_and_their_answers_wait() {
    let mut c = Cluster::elected();
    let ticks = Config::new(1, vec![1]).heartbeat_ticks;
    for _ in 0..ticks {
        c.node(1).tick();
    }
    let (early, late) = c.run(1);
    assert_eq!(early.iter().filter(|m| matches!(m.body, MessageBody::Heartbeat { .. })).count(), 2);
    assert!(late.is_empty());
    let hb = early.into_iter().find(|m| m.to == 2).unwrap();
    c.queue.clear();
    let (early, late) = c.deliver(hb);
    assert!(early.is_empty());
    assert!(matches!(late[..], [Message { body: MessageBody::HeartbeatResponse { .. }, .. }]));
}

/// A driver may step several messages before the next `Ready` (group commit, or while it
/// persists). An acknowledgement queued for entries that a later message truncated would go
/// out after a persist that no longer holds them: it is dropped, and only the answer for what
/// is written goes out.
#[test]
fn an_acknowledgement_of_entries_truncated_before_the_persist_is_dropped() {
    let mut n = RawNode::new(config(3, vec![1, 2, 3])).unwrap();
    let entry = |index, term, d: &[u8]| Entry { term, index, kind: EntryKind::Normal, data: d.to_vec().into() };
    let append = |from, term, entries: Vec<Entry>| Message {
        from,
        to: 3,
        term,
        body: MessageBody::Append { prev_index: 0, prev_term: 0, entries, commit: 0 },
    };
    n.step(append(1, 1, vec![entry(1, 1, b"a"), entry(2, 1, b"b")])).unwrap();
    // Before that is persisted, leader 2 of term 2 replaces index 2.
    n.step(append(2, 2, vec![entry(1, 1, b"a"), entry(2, 2, b"c")])).unwrap();
    let rd = n.ready();
    assert_eq!(rd.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(1, 1), (2, 2)]);
    let acks: Vec<(NodeId, Index)> = rd
        .persisted_messages
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResponse { index, success: true, .. } => Some((m.to, index)),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![(2, 2)], "leader 1 must not hear that node 3 holds its entry 2");
    n.advance(&rd);

    // Likewise a vote granted in a term that a later message ended before the persist.
    let mut n = RawNode::new(config(3, vec![1, 2, 3])).unwrap();
    let vote = Message {
        from: 1,
        to: 3,
        term: 1,
        body: MessageBody::Vote { pre: false, last_index: 0, last_term: 0, transfer: false },
    };
    n.step(vote).unwrap();
    n.step(Message { from: 2, to: 3, term: 2, body: MessageBody::Heartbeat { commit: 0, read_seq: 0 } }).unwrap();
    let rd = n.ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((2, None)));
    assert!(
        !rd.all_messages().any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. })),
        "a vote went out that no persist holds: {:?}",
        rd.persisted_messages
    );
    n.advance(&rd);
}

/// Pipelined persistence: a driver may take the next `Ready` while earlier ones are written or
/// synced. Each entry is handed out once, in order, and the leader counts its own copy only
/// once the `Ready` carrying it is advanced.
#[test]
fn readys_in_flight_hand_out_each_entry_once_and_the_leader_counts_its_copy_on_advance() {
    let mut c = Cluster::elected();
    c.queue.clear();
    let (a, _) = c.node(1).propose(b"a".to_vec()).unwrap();
    let rd1 = c.node(1).ready();
    let (b, _) = c.node(1).propose(b"b".to_vec()).unwrap();
    let rd2 = c.node(1).ready();
    assert_eq!(rd1.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![a]);
    assert_eq!(rd2.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![b], "a is not handed out twice");
    assert!(!c.node(1).has_ready());
    assert_eq!(c.node(1).in_flight(), 2);
    // Node 2 acknowledges both; the leader's own copies are still in flight: one copy of three.
    let appends: Vec<Message> = rd1.messages.iter().chain(&rd2.messages).filter(|m| m.to == 2).cloned().collect();
    assert_eq!(appends.len(), 2, "both Readys replicate at once");
    for m in appends {
        let (_, late) = c.deliver(m);
        for ack in late {
            c.node(1).step(ack).unwrap();
        }
    }
    // Two copies of three (node 2's) is a quorum only with the leader's: not counted yet.
    let rd3 = c.node(1).ready();
    assert!(rd3.committed_entries.is_empty(), "committed with the leader's copy not durable");
    // The first Ready is durable: a commits; b waits for the second.
    let (_, st) = c.nodes.get_mut(&1).unwrap();
    persist_ready(st, &rd1).unwrap();
    persist_ready(st, &rd2).unwrap();
    c.node(1).advance(&rd1);
    let rd4 = c.node(1).ready();
    assert_eq!(rd4.committed_entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![a]);
    c.node(1).advance(&rd2);
    c.node(1).advance(&rd3);
    c.node(1).advance(&rd4);
    let rd5 = c.node(1).ready();
    assert_eq!(rd5.committed_entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![b]);
    c.node(1).advance(&rd5);
    assert_eq!(c.node(1).in_flight(), 0);
}

/// Pipelined persistence: while the `Ready` carrying a new term and vote is in flight, the
/// `Ready`s after it send nothing early either, though they change neither themselves: a
/// crash before that term is durable must not leave Appends of it behind.
#[test]
fn while_a_new_term_is_in_flight_no_later_ready_sends_early() {
    let mut n = RawNode::new(config(1, vec![1, 2, 3])).unwrap();
    n.campaign();
    let rd1 = n.ready();
    assert_eq!(rd1.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(1))));
    assert!(rd1.messages.is_empty());
    // Node 2's vote arrives before the candidate's own term and vote are durable (it saw the
    // request only after they were, but a driver finishes Readys when it can).
    n.step(Message { from: 2, to: 1, term: 1, body: MessageBody::VoteResponse { pre: false, granted: true } }).unwrap();
    assert_eq!(n.status().role, Role::Leader);
    let rd2 = n.ready();
    assert!(rd2.hard_state.is_none_or(|h| (h.term, h.vote) == (1, Some(1))), "no new term in rd2 itself");
    assert!(rd2.messages.is_empty(), "sent before term 1 is durable: {:?}", rd2.messages);
    assert!(rd2.persisted_messages.iter().any(|m| matches!(m.body, MessageBody::Append { .. })));
    n.advance(&rd1);
    n.advance(&rd2);
    for _ in 0..Config::new(1, vec![1]).heartbeat_ticks {
        n.tick();
    }
    let rd3 = n.ready();
    assert!(rd3.messages.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })), "term 1 durable now");
    n.advance(&rd3);
}
