//! Tests of the pure core, one claim of the paper (or thesis) each, driven message by message.
//! "section N" = Raft paper, "thesis N" = Ongaro's dissertation.

mod common;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sixfive_raft::*;

/// A few nodes wired together by hand: messages are queued and delivered on demand.
struct Net {
    nodes: BTreeMap<NodeId, RawNode>,
    queue: VecDeque<Message>,
    /// Links (from, to) that drop messages.
    cut: BTreeSet<(NodeId, NodeId)>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    snapshots: BTreeMap<NodeId, Vec<Snapshot>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
}

impl Net {
    fn new(n: u64, tweak: impl Fn(&mut Config)) -> Net {
        let ids: Vec<NodeId> = (1..=n).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let mut c = Config::new(id, ids.clone());
                tweak(&mut c);
                (id, RawNode::new(c).unwrap())
            })
            .collect();
        Net {
            nodes,
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            applied: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            reads: BTreeMap::new(),
        }
    }

    fn node(&mut self, id: NodeId) -> &mut RawNode {
        self.nodes.get_mut(&id).unwrap()
    }

    fn status(&self, id: NodeId) -> Status {
        self.nodes[&id].status()
    }

    /// Runs node `id`'s Ready loop; its messages join the queue.
    fn flush(&mut self, id: NodeId) {
        loop {
            let n = self.nodes.get_mut(&id).unwrap();
            if !n.has_ready() {
                return;
            }
            let rd = n.ready();
            n.advance(&rd);
            self.queue.extend(rd.all_messages().cloned());
            if let Some(s) = rd.snapshot.clone() {
                self.snapshots.entry(id).or_default().push(s);
            }
            self.applied.entry(id).or_default().extend(rd.committed_entries.iter().cloned());
            self.reads.entry(id).or_default().extend(rd.read_states.iter().cloned());
        }
    }

    /// Takes the queued messages (after flushing everyone), without delivering them.
    fn take(&mut self) -> Vec<Message> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
        self.queue.drain(..).collect()
    }

    fn deliver(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) {
            return;
        }
        let to = m.to;
        self.node(to).step(m).unwrap();
        self.flush(to);
    }

    /// Delivers until no message is left.
    fn stabilize(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
        while let Some(m) = self.queue.pop_front() {
            self.deliver(m);
        }
    }

    fn isolate(&mut self, id: NodeId) {
        for &o in self.nodes.keys() {
            if o != id {
                self.cut.insert((id, o));
                self.cut.insert((o, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn elect(&mut self, id: NodeId) {
        self.node(id).campaign();
        self.stabilize();
        assert_eq!(self.status(id).role, Role::Leader, "node {id} failed to win");
    }

    fn tick(&mut self, id: NodeId, n: u32) {
        for _ in 0..n {
            self.node(id).tick();
            self.flush(id);
        }
    }

    fn tick_all(&mut self, n: u32) {
        for _ in 0..n {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.node(id).tick();
            }
            self.stabilize();
        }
    }

    fn normal_applied(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied
            .get(&id)
            .map_or(vec![], |v| v.iter().filter(|e| e.kind == EntryKind::Normal).map(|e| e.data.to_vec()).collect())
    }
}

fn no_prevote(c: &mut Config) {
    c.pre_vote = false;
}

// ---------------------------------------------------------------- section 5.2: leader election

/// Section 5.2: a follower that hears from no leader within its election timeout (randomised in
/// [et, 2et)) becomes candidate: increments its term, votes for itself, asks everyone.
#[test]
fn follower_times_out_into_candidate_5_2() {
    let mut net = Net::new(3, no_prevote);
    for _ in 0..60 {
        net.node(1).tick();
        if net.status(1).role == Role::Candidate {
            break;
        }
    }
    let st = net.status(1);
    assert_eq!((st.role, st.term, st.vote), (Role::Candidate, 1, Some(1)));
    let msgs = net.take();
    let votes: Vec<_> =
        msgs.iter().filter(|m| matches!(m.body, MessageBody::Vote { pre: false, .. })).map(|m| m.to).collect();
    assert_eq!(votes, vec![2, 3]);
}

/// Section 5.2: randomised timeouts fall in [et, 2et) and differ between nodes.
#[test]
fn election_timeouts_are_randomised_5_2() {
    let mut fired = BTreeSet::new();
    for id in 1..=5u64 {
        let mut c = Config::new(id, (1..=5).collect());
        c.pre_vote = false;
        let mut n = RawNode::new(c).unwrap();
        let mut ticks = 0;
        while n.status().role != Role::Candidate {
            n.tick();
            ticks += 1;
        }
        assert!((30..60).contains(&ticks), "timeout {ticks} outside [30, 60)");
        fired.insert(ticks);
    }
    assert!(fired.len() > 1, "every node drew the same timeout");
}

/// Section 5.2: a candidate with votes from a majority becomes leader.
#[test]
fn majority_elects_leader_5_2() {
    let mut net = Net::new(5, no_prevote);
    net.isolate(4);
    net.isolate(5);
    net.elect(1); // votes from 1, 2, 3 are a majority of 5
    assert_eq!(net.status(2).leader, Some(1));
}

/// Section 5.2: each node votes for at most one candidate per term, first come first served.
#[test]
fn one_vote_per_term_5_2() {
    let mut net = Net::new(3, no_prevote);
    let vote = |from, term| Message {
        from,
        to: 3,
        term,
        body: MessageBody::Vote { pre: false, last_index: 0, last_term: 0, transfer: false },
    };
    net.deliver(vote(1, 1));
    net.deliver(vote(2, 1));
    let answers: Vec<bool> = net
        .take()
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::VoteResponse { granted, .. } => Some(granted),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![true, false]);
    assert_eq!(net.status(3).vote, Some(1));
}

/// Section 5.2: a candidate that hears from a leader of its own term steps down.
#[test]
fn candidate_steps_down_for_leader_of_its_term_5_2() {
    let mut net = Net::new(3, no_prevote);
    net.node(2).campaign();
    net.take(); // its vote requests are lost
    let st = net.status(2);
    assert_eq!((st.role, st.term), (Role::Candidate, 1));
    let hb = Message { from: 1, to: 2, term: 1, body: MessageBody::Heartbeat { commit: 0, read_seq: 0 } };
    net.deliver(hb);
    assert_eq!(net.status(2).role, Role::Follower);
    assert_eq!(net.status(2).leader, Some(1));
}

// ---------------------------------------------------------------- section 5.3: log replication

/// Section 5.3: the leader appends, replicates, and commits once a majority stores the entry;
/// followers learn the commit index and apply in order.
#[test]
fn replicate_commit_apply_5_3() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    for x in [b"a", b"b", b"c"] {
        net.node(1).propose(x.to_vec()).unwrap();
    }
    net.stabilize();
    assert_eq!(net.status(1).commit, 4);
    assert_eq!(net.normal_applied(1), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    net.tick_all(10); // a heartbeat carries the commit index
    assert_eq!(net.normal_applied(2), net.normal_applied(1));
    assert_eq!(net.normal_applied(3), net.normal_applied(1));
}

/// Section 5.3: only the leader takes proposals; others name the leader.
#[test]
fn follower_refuses_proposal_with_hint_5_3() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    assert_eq!(net.node(2).propose(b"x".to_vec()), Err(ProposeError::NotLeader { leader: Some(1) }));
}

/// Section 5.3: a follower whose log does not contain prev (index, term) rejects and hints where
/// to retry; the leader backs up by whole terms (fast backtracking) and then repairs the log.
#[test]
fn consistency_check_and_fast_backtracking_5_3() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolate(3);
    for i in 0..20u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    net.stabilize();
    assert_eq!(net.status(3).last_index, 1);
    net.heal();
    net.node(1).propose(b"z".to_vec()).unwrap();
    let msgs = net.take();
    let to3 = msgs.iter().find(|m| m.to == 3).unwrap().clone();
    for m in msgs.into_iter().filter(|m| m.to != 3) {
        net.deliver(m);
    }
    net.deliver(to3);
    let reject = net.take().into_iter().find(|m| m.from == 3).unwrap();
    match reject.body {
        MessageBody::AppendResponse { success: false, hint: Some(h), .. } => {
            assert_eq!(h, RejectHint { conflict_term: None, conflict_index: 2 });
        }
        ref b => panic!("expected a rejection with hint, got {b:?}"),
    }
    net.deliver(reject);
    // One round trip after the hint, node 3 has everything.
    net.stabilize();
    assert_eq!(net.status(3).last_index, net.status(1).last_index);
}

/// Section 5.3: entries that conflict with the leader's are deleted and replaced; entries that
/// match are kept (a delayed duplicate Append never truncates).
#[test]
fn conflicts_truncated_duplicates_harmless_5_3() {
    // Without check-quorum, so followers need not wait out the leader lease before re-electing.
    let mut net = Net::new(3, |c| c.check_quorum = false);
    net.elect(1);
    net.isolate(1);
    net.node(1).propose(b"lost".to_vec()).unwrap(); // only on node 1, term 1
    net.stabilize();
    net.heal();
    net.isolate(1);
    net.elect(2);
    net.node(2).propose(b"kept".to_vec()).unwrap();
    net.stabilize();
    net.heal();
    net.tick_all(10);
    net.stabilize();
    let log1: Vec<_> = net.nodes[&1].log().entries().map(|e| e.data.to_vec()).collect();
    assert!(!log1.contains(&b"lost".to_vec()), "conflicting entry survived: {log1:?}");
    assert!(log1.contains(&b"kept".to_vec()));
    // A stale copy of an old Append that matches must not truncate what follows.
    let last = net.status(1).last_index;
    let stale = Message {
        from: 2,
        to: 1,
        term: net.status(2).term,
        body: MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![net.nodes[&2].log().entry(1).unwrap().clone()],
            commit: 0,
        },
    };
    net.deliver(stale);
    assert_eq!(net.status(1).last_index, last);
}

/// Section 5.3 (heartbeats): the commit index sent to a follower never exceeds what it holds.
#[test]
fn heartbeat_commit_bounded_by_match_5_3() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolate(3);
    net.node(1).propose(b"x".to_vec()).unwrap();
    net.stabilize();
    net.heal();
    net.tick(1, 10);
    let hb = net.take().into_iter().find(|m| m.to == 3 && matches!(m.body, MessageBody::Heartbeat { .. })).unwrap();
    match hb.body {
        MessageBody::Heartbeat { commit, .. } => assert!(commit <= 1, "heartbeat commit {commit} past follower's log"),
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------- section 5.4: safety

/// Section 5.4.1: a vote is refused to a candidate whose log is less up-to-date.
#[test]
fn vote_refused_to_stale_log_5_4_1() {
    let mut net = Net::new(3, |c| {
        c.pre_vote = false;
        c.check_quorum = false;
    });
    net.elect(1);
    net.node(1).propose(b"x".to_vec()).unwrap();
    net.isolate(3);
    net.stabilize(); // nodes 1 and 2 hold index 2; node 3 does not
    net.heal();
    net.isolate(1);
    net.node(3).campaign();
    net.stabilize();
    assert_ne!(net.status(3).role, Role::Leader, "node 3 won with a stale log");
    net.node(2).campaign();
    net.stabilize();
    assert_eq!(net.status(2).role, Role::Leader);
}

/// Section 5.4.2 / Figure 8: a leader does not commit an entry of an earlier term by counting
/// replicas, only through an entry of its own term.
#[test]
fn old_term_entries_not_committed_by_counting_5_4_2() {
    // Node 1 restarts holding entries of term 1 that were never committed, with term 2 on disk.
    let entries = vec![
        Entry { term: 1, index: 1, kind: EntryKind::Normal, data: b"a".to_vec().into() },
        Entry { term: 1, index: 2, kind: EntryKind::Normal, data: b"b".to_vec().into() },
    ];
    let state = RestoredState { hard_state: HardState { term: 2, vote: None, commit: 0 }, snapshot: None, entries };
    let mut c = Config::new(1, vec![1, 2, 3]);
    c.pre_vote = false;
    let mut n = RawNode::restart(c, state).unwrap();
    n.campaign();
    let grant = Message { from: 2, to: 1, term: 3, body: MessageBody::VoteResponse { pre: false, granted: true } };
    n.step(grant).unwrap();
    assert_eq!(n.status().role, Role::Leader);
    assert_eq!(n.status().last_index, 3, "leader appended its no-op at 3");
    // The leader persists its log (it counts its own copy from then on).
    let rd = n.ready();
    n.advance(&rd);
    // Node 2 acknowledges index 2 (term 1): a majority holds it, yet it must not commit.
    let ack = |index| Message {
        from: 2,
        to: 1,
        term: 3,
        body: MessageBody::AppendResponse { index, success: true, hint: None },
    };
    n.step(ack(2)).unwrap();
    assert_eq!(n.status().commit, 0, "committed an old-term entry by counting replicas");
    // Once the term-3 no-op is on a majority, everything before it commits too.
    n.step(ack(3)).unwrap();
    assert_eq!(n.status().commit, 3);
}

// ---------------------------------------------------------------- section 7: snapshots

/// Section 7: the application compacts the log; a follower that needs compacted entries gets
/// the snapshot in chunks, installs it (Ready.snapshot) and then catches up with entries.
#[test]
fn lagging_follower_installs_chunked_snapshot_7() {
    let mut net = Net::new(3, |c| c.snapshot_chunk_bytes = 7);
    net.elect(1);
    net.isolate(3);
    for i in 0..10u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    net.stabilize();
    let data = b"state-machine-image-30-bytes..".to_vec();
    let snap = net.node(1).compact(8, data.clone()).unwrap();
    assert_eq!(snap.meta.index, 8);
    assert_eq!(net.status(1).snapshot_index, 8);
    net.heal();
    // The Appends sent while node 3 was cut off count as lost after two heartbeats without
    // progress; the next heartbeat answer triggers a probe, whose rejection calls for the snapshot.
    net.tick_all(30);
    net.stabilize();
    let got = net.snapshots.get(&3).expect("node 3 received a snapshot");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].app_data(), data, "chunks reassembled");
    assert_eq!(got[0].meta, snap.meta);
    assert_eq!(net.status(3).last_index, net.status(1).last_index, "caught up after the snapshot");
    assert_eq!(net.status(3).commit, net.status(1).commit);
}

/// Section 7: the application may only snapshot what it applied, and only forward.
#[test]
fn compact_validates_index_7() {
    let mut net = Net::new(1, |_| {});
    net.elect(1);
    net.node(1).propose(b"x".to_vec()).unwrap();
    assert_eq!(net.node(1).compact(2, vec![]), Err(CompactError::NotApplied));
    net.stabilize();
    net.node(1).compact(2, vec![]).unwrap();
    assert_eq!(net.node(1).compact(1, vec![]), Err(CompactError::AlreadyCompacted));
}

/// Section 7: a snapshot behind the follower's commit index is acknowledged and ignored.
#[test]
fn stale_snapshot_ignored_7() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).propose(b"x".to_vec()).unwrap();
    net.stabilize();
    net.tick_all(10);
    let commit = net.status(2).commit;
    let stale = Message {
        from: 1,
        to: 2,
        term: net.status(1).term,
        body: MessageBody::Snapshot {
            meta: SnapshotMeta { index: 1, term: 1 },
            stream: 1,
            offset: 0,
            data: vec![],
            done: true,
            checksum: Snapshot { meta: SnapshotMeta { index: 1, term: 1 }, data: vec![] }.checksum(),
        },
    };
    net.deliver(stale);
    assert!(!net.snapshots.contains_key(&2));
    assert_eq!(net.status(2).commit, commit);
}

// ---------------------------------------------------------------- thesis 9.6: pre-vote, check-quorum

/// Thesis 9.6: with pre-vote, a partitioned node keeps its term however long it is cut off,
/// so it cannot depose the leader when it returns. Without pre-vote its term runs away.
#[test]
fn prevote_keeps_partitioned_term_9_6() {
    for (pre_vote, term_grows) in [(true, false), (false, true)] {
        let mut net = Net::new(3, |c| c.pre_vote = pre_vote);
        net.elect(1);
        let term = net.status(1).term;
        net.isolate(3);
        net.tick(3, 500);
        net.take();
        assert_eq!(net.status(3).term > term, term_grows, "pre_vote={pre_vote}");
        net.heal();
        net.tick_all(20);
        if pre_vote {
            assert_eq!(net.status(1).role, Role::Leader, "rejoining node deposed a healthy leader");
            assert_eq!(net.status(1).term, term);
        }
    }
}

/// Thesis 6.2 (check-quorum): a leader that cannot hear a majority for an election timeout
/// steps down.
#[test]
fn leader_without_quorum_steps_down_6_2() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolate(1);
    net.tick(1, 61);
    assert_eq!(net.status(1).role, Role::Follower);
}

/// Thesis 4.2.3 (leader lease): a follower that heard from its leader within the election
/// timeout ignores a vote request of a higher term.
#[test]
fn lease_ignores_disruptive_candidate_4_2_3() {
    let mut net = Net::new(3, no_prevote);
    net.elect(1);
    let term = net.status(2).term;
    let vote = Message {
        from: 3,
        to: 2,
        term: term + 1,
        body: MessageBody::Vote { pre: false, last_index: 9, last_term: 9, transfer: false },
    };
    net.deliver(vote);
    assert_eq!(net.status(2).term, term);
    assert!(net.take().is_empty(), "no answer to a disruptive candidate");
}

// ---------------------------------------------------------------- thesis 6.4: ReadIndex

/// Thesis 6.4: a read is safe at the commit index seen when it arrived, only after a majority
/// answered a heartbeat sent after it arrived.
#[test]
fn read_index_needs_heartbeat_quorum_6_4() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).read_index(b"r1".to_vec()).unwrap();
    let msgs = net.take();
    assert!(msgs.iter().all(|m| matches!(m.body, MessageBody::Heartbeat { read_seq: 1, .. })));
    assert!(net.reads.get(&1).is_none_or(|r| r.is_empty()), "read answered before confirmation");
    // One answer plus the leader itself is a majority of three.
    let hb = msgs.into_iter().find(|m| m.to == 2).unwrap();
    net.deliver(hb);
    let resp = net.take().into_iter().find(|m| m.from == 2).unwrap();
    net.deliver(resp);
    let reads = &net.reads[&1];
    assert_eq!(reads, &vec![ReadState { index: net.status(1).commit, ctx: b"r1".to_vec() }]);
}

/// Thesis 6.4 step 1: until the leader commits an entry of its term, its commit index may lag,
/// so reads wait for that; followers refuse reads.
#[test]
fn read_index_waits_for_first_commit_6_4() {
    let mut net = Net::new(3, |_| {});
    net.node(1).campaign();
    // Deliver the election but hold back the no-op's acknowledgements.
    loop {
        let msgs = net.take();
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            if !matches!(m.body, MessageBody::AppendResponse { .. }) {
                net.deliver(m);
            }
        }
    }
    assert_eq!(net.status(1).role, Role::Leader);
    assert_eq!(net.status(1).commit, 0);
    net.node(1).read_index(b"r".to_vec()).unwrap();
    net.stabilize();
    net.tick_all(10);
    let r = &net.reads[&1];
    assert_eq!(r.len(), 1);
    assert!(r[0].index >= 1, "read index {} from before the no-op committed", r[0].index);
    assert_eq!(net.node(2).read_index(b"x".to_vec()), Err(ProposeError::NotLeader { leader: Some(1) }));
}

// ---------------------------------------------------------------- thesis 3.10: leadership transfer

/// Thesis 3.10: the leader brings the target up to date, then sends TimeoutNow; the target
/// wins at once; proposals are refused meanwhile.
#[test]
fn leadership_transfer_3_10() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolate(3);
    net.node(1).propose(b"x".to_vec()).unwrap();
    net.stabilize();
    net.heal();
    assert_eq!(net.node(1).transfer_leader(9), Err(ProposeError::UnknownNode(9)));
    net.node(1).transfer_leader(3).unwrap();
    assert_eq!(net.node(1).propose(b"y".to_vec()), Err(ProposeError::TransferInProgress));
    net.stabilize();
    let st = net.status(3);
    assert_eq!(st.role, Role::Leader, "transfer target did not take over");
    assert_eq!(net.status(1).role, Role::Follower);
    assert!(net.nodes[&3].log().entries().any(|e| e.data == b"x"[..]), "target lacks the leader's entries");
}

/// Thesis 3.10: a transfer that cannot finish within an election timeout is abandoned.
#[test]
fn leadership_transfer_times_out_3_10() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolate(3);
    net.node(1).transfer_leader(3).unwrap();
    net.tick(1, 31);
    net.take();
    assert_eq!(net.status(1).role, Role::Leader);
    assert!(net.node(1).propose(b"ok".to_vec()).is_ok(), "proposals resume after the transfer is abandoned");
}

// ---------------------------------------------------------------- flow control

/// Proposals made between two Readys travel together in one Append per follower (batching),
/// and the in-flight window bounds unacknowledged Appends (pipelining).
#[test]
fn batching_and_inflight_window() {
    let mut net = Net::new(3, |c| c.max_inflight_msgs = 2);
    net.elect(1);
    for i in 0..5u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    let msgs = net.take();
    let to2: Vec<_> = msgs.iter().filter(|m| m.to == 2).collect();
    assert_eq!(to2.len(), 1, "one batched Append");
    match &to2[0].body {
        MessageBody::Append { entries, .. } => assert_eq!(entries.len(), 5),
        b => panic!("{b:?}"),
    }
    // Withhold acks: at most two Appends go out unacknowledged.
    for i in 0..5u8 {
        net.node(1).propose(vec![i]).unwrap();
        let _ = net.take();
    }
    net.node(1).propose(vec![99]).unwrap();
    assert!(net.take().iter().all(|m| m.to != 2), "window of 2 exceeded");
}

/// Appends respect the byte limit (but always carry at least one entry).
#[test]
fn message_size_limit() {
    let mut net = Net::new(3, |c| c.max_msg_bytes = 100);
    net.elect(1);
    for _ in 0..4 {
        net.node(1).propose(vec![7; 60]).unwrap();
    }
    for m in net.take() {
        if let MessageBody::Append { entries, .. } = &m.body {
            assert_eq!(entries.len(), 1, "{} entries of 84 bytes in a 100-byte message", entries.len());
        }
    }
}

// ---------------------------------------------------------------- the boundary

/// Bad input is refused at the boundary and changes nothing.
#[test]
fn invalid_input_refused() {
    assert!(Config::new(0, vec![0]).validate().is_err());
    assert!(Config::new(1, vec![2, 3]).validate().is_err());
    assert!(Config::new(1, vec![1, 1]).validate().is_err());
    let mut c = Config::new(1, vec![1, 2]);
    c.heartbeat_ticks = 40;
    assert!(RawNode::new(c).is_err());
    let mut net = Net::new(3, |_| {});
    let hb = |from, to| Message { from, to, term: 5, body: MessageBody::Heartbeat { commit: 0, read_seq: 0 } };
    assert_eq!(net.node(1).step(hb(0, 1)), Err(StepError::UnknownSender { from: 0 }));
    assert_eq!(net.node(1).step(hb(1, 1)), Err(StepError::UnknownSender { from: 1 }));
    assert_eq!(net.node(1).step(hb(2, 3)), Err(StepError::WrongRecipient { to: 3 }));
    assert_eq!(net.status(1).term, 0, "a refused message changed state");
}

/// Restart: a node rebuilt from what it persisted has the same term, vote, log and commit.
#[test]
fn restart_restores_persisted_state() {
    use common::Mem;
    let mut store = Mem::default();
    let mut n = RawNode::new(Config::new(1, vec![1])).unwrap();
    n.campaign();
    n.propose(b"a".to_vec()).unwrap();
    n.propose(b"b".to_vec()).unwrap();
    while n.has_ready() {
        let rd = n.ready();
        persist_ready(&mut store, &rd).unwrap();
        n.advance(&rd);
    }
    let snap = n.compact(2, b"img".to_vec()).unwrap();
    store.save_snapshot(&snap).unwrap();
    let before = n.status();
    let m = RawNode::restart(Config::new(1, vec![1]), store.initial_state().unwrap()).unwrap();
    let after = m.status();
    assert_eq!(
        (after.term, after.vote, after.commit, after.last_index, after.snapshot_index),
        (before.term, before.vote, before.commit, before.last_index, 2)
    );
    assert_eq!(after.role, Role::Follower);
    assert_eq!(m.log().entry(3).unwrap().data, b"b"[..]);
}

/// Regression (found by the swarm, seed 639018616): a follower that restarts in the middle of a
/// chunked snapshot loses its partial copy and asks for offset 0; the leader must go back to it
/// rather than keep resending the chunk it believed was next.
#[test]
fn snapshot_transfer_resumes_after_follower_restart_7() {
    let mut net = Net::new(3, |c| c.snapshot_chunk_bytes = 4);
    net.elect(1);
    net.isolate(3);
    for i in 0..10u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    net.stabilize();
    let data = b"0123456789abcdefghij".to_vec();
    net.node(1).compact(8, data.clone()).unwrap();
    net.heal();
    // Run the leader until node 3 has received two chunks, then stop the transfer there.
    let mut got_chunks = 0;
    for _ in 0..100 {
        net.tick(1, 1);
        loop {
            let msgs = net.take();
            if msgs.is_empty() || got_chunks >= 2 {
                break;
            }
            for m in msgs {
                if matches!(m.body, MessageBody::Snapshot { .. }) {
                    if got_chunks >= 2 {
                        continue;
                    }
                    got_chunks += 1;
                }
                net.deliver(m);
            }
        }
        if got_chunks >= 2 {
            break;
        }
    }
    assert_eq!(got_chunks, 2, "transfer never began");
    let _ = net.take();
    // Restart node 3 from what it persisted (its hard state and log, not the partial snapshot).
    let st = net.status(3);
    let state = RestoredState {
        hard_state: HardState { term: st.term, vote: st.vote, commit: st.commit },
        snapshot: None,
        entries: net.nodes[&3].log().entries().cloned().collect(),
    };
    let fresh = RawNode::restart(Config { snapshot_chunk_bytes: 4, ..Config::new(3, vec![1, 2, 3]) }, state).unwrap();
    net.nodes.insert(3, fresh);
    net.tick_all(30);
    net.stabilize();
    let snaps = net.snapshots.get(&3).expect("node 3 completed the snapshot after restarting");
    assert_eq!(snaps.last().unwrap().app_data(), data);
    assert_eq!(net.status(3).commit, net.status(1).commit);
}

// ---------------------------------------------------------------- hardening (issue 8)

/// Runs a lone node's Ready loop and returns the messages it would send.
fn drain(n: &mut RawNode) -> Vec<Message> {
    let mut out = Vec::new();
    while n.has_ready() {
        let rd = n.ready();
        out.extend(rd.all_messages().cloned());
        n.advance(&rd);
    }
    out
}

/// Node 2 of three, restarted in term 2 holding `n` entries of term 1 that it never saw committed.
fn follower_with_term1_entries(n: u64) -> RawNode {
    let entries =
        (1..=n).map(|i| Entry { term: 1, index: i, kind: EntryKind::Normal, data: vec![i as u8].into() }).collect();
    let state = RestoredState { hard_state: HardState { term: 2, vote: None, commit: 0 }, snapshot: None, entries };
    RawNode::restart(Config::new(2, vec![1, 2, 3]), state).unwrap()
}

fn append_from_1(term: Term, prev_index: Index, prev_term: Term, entries: Vec<Entry>, commit: Index) -> Message {
    Message { from: 1, to: 2, term, body: MessageBody::Append { prev_index, prev_term, entries, commit } }
}

/// Figure 2, AppendEntries receiver rule 2: reply false if the log has no entry at `prev_index`
/// whose term is `prev_term`, and change nothing.
#[test]
fn append_refused_on_prev_mismatch_rule_2_5_3() {
    let mut n = follower_with_term1_entries(3);
    let new = |index| vec![Entry { term: 2, index, kind: EntryKind::Normal, data: b"new".to_vec().into() }];
    for (prev_index, prev_term) in [(3, 2), (4, 1), (2, 2)] {
        n.step(append_from_1(2, prev_index, prev_term, new(prev_index + 1), 3)).unwrap();
        let answers = drain(&mut n);
        assert!(
            matches!(answers[..], [Message { body: MessageBody::AppendResponse { success: false, index, .. }, .. }] if index == prev_index),
            "prev ({prev_index}, {prev_term}) accepted: {answers:?}"
        );
        let st = n.status();
        assert_eq!((st.last_index, st.commit), (3, 0), "a refused Append changed the log or the commit index");
        assert_eq!(n.log().term(3), Some(1));
    }
    // The matching prev is accepted.
    n.step(append_from_1(2, 3, 1, new(4), 0)).unwrap();
    let answers = drain(&mut n);
    assert!(matches!(answers[..], [Message { body: MessageBody::AppendResponse { success: true, index: 4, .. }, .. }]));
}

/// Figure 2, AppendEntries receiver rule 5: a follower sets its commit index to
/// `min(leader_commit, index of last new entry)`, never to the leader's commit alone: entries
/// after the last one the leader sent are not known to match the leader's log.
#[test]
fn follower_commit_bounded_by_last_new_entry_rule_5_5_3() {
    let mut n = follower_with_term1_entries(5);
    // A probe that matches at index 1 and carries no entries: only index 1 is known to match.
    n.step(append_from_1(2, 1, 1, vec![], 5)).unwrap();
    drain(&mut n);
    assert_eq!(n.status().commit, 1, "committed entries not known to match the leader");
    // An entry of term 2 at index 2 replaces the stale tail; the commit stops at it.
    let e2 = Entry { term: 2, index: 2, kind: EntryKind::Normal, data: b"two".to_vec().into() };
    n.step(append_from_1(2, 1, 1, vec![e2], 5)).unwrap();
    drain(&mut n);
    let st = n.status();
    assert_eq!((st.last_index, st.commit), (2, 2));
    // A leader commit below the last new entry bounds it the other way.
    let e3 = Entry { term: 2, index: 3, kind: EntryKind::Normal, data: b"three".to_vec().into() };
    n.step(append_from_1(2, 2, 2, vec![e3], 2)).unwrap();
    drain(&mut n);
    assert_eq!(n.status().commit, 2);
}

/// Thesis 6.4: an acknowledgement of an earlier heartbeat round does not confirm a read that
/// arrived after that round was sent.
#[test]
fn read_index_ignores_ack_of_earlier_round_6_4() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).read_index(b"r1".to_vec()).unwrap();
    let round1 = net.take();
    let hb = round1.iter().find(|m| m.to == 2 && matches!(m.body, MessageBody::Heartbeat { .. })).unwrap().clone();
    net.deliver(hb);
    let ack1 = net.take().into_iter().find(|m| m.from == 2).unwrap();
    assert!(matches!(ack1.body, MessageBody::HeartbeatResponse { .. }));
    net.node(1).read_index(b"r2".to_vec()).unwrap();
    let round2 = net.take();
    net.deliver(ack1);
    let ctxs = |net: &Net| net.reads.get(&1).map_or(vec![], |r| r.iter().map(|r| r.ctx.clone()).collect::<Vec<_>>());
    assert_eq!(ctxs(&net), vec![b"r1".to_vec()], "a round-1 ack confirmed a read of round 2");
    let hb = round2.into_iter().find(|m| m.to == 2 && matches!(m.body, MessageBody::Heartbeat { .. })).unwrap();
    net.deliver(hb);
    net.stabilize();
    assert_eq!(ctxs(&net), vec![b"r1".to_vec(), b"r2".to_vec()]);
}

/// ReadIndex batching: reads that arrive between two `Ready`s share one heartbeat round.
#[test]
fn read_index_requests_share_a_heartbeat_round_6_4() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    for i in 0..10u8 {
        net.node(1).read_index(vec![i]).unwrap();
    }
    let msgs = net.take();
    let heartbeats = msgs.iter().filter(|m| matches!(m.body, MessageBody::Heartbeat { .. })).count();
    assert_eq!(heartbeats, 2, "10 reads took {heartbeats} heartbeats; one round (one per follower) is enough");
    for m in msgs {
        net.deliver(m);
    }
    net.stabilize();
    let reads = &net.reads[&1];
    assert_eq!(reads.iter().map(|r| r.ctx[0]).collect::<Vec<_>>(), (0..10).collect::<Vec<u8>>());
}

/// Thesis 3.10 / 6.2: a caller that keeps asking an isolated leader to transfer leadership does
/// not keep it alive: check-quorum still deposes it within two election timeouts (no transfer
/// request touches the election clock).
#[test]
fn repeated_transfer_does_not_defer_check_quorum_3_10() {
    // The same target every time, or alternating targets (each call a new transfer).
    for alternate in [false, true] {
        let mut net = Net::new(3, |_| {});
        net.elect(1);
        net.isolate(1);
        let mut stepped_down_at = None;
        for t in 1..=300u32 {
            let to = if alternate && t % 2 == 0 { 3 } else { 2 };
            let _ = net.node(1).transfer_leader(to);
            net.tick(1, 1);
            net.take();
            if net.status(1).role != Role::Leader {
                stepped_down_at = Some(t);
                break;
            }
        }
        let t = stepped_down_at.expect("an isolated leader asked to transfer kept leading for 300 ticks");
        assert!(t <= 60, "stepped down after {t} ticks (alternate={alternate}); check-quorum allows 2 x 30");
    }
}

/// Thesis 3.10: retrying a transfer to the same node does not extend it; it is abandoned one
/// election timeout after it began, and proposals are taken again.
#[test]
fn repeated_transfer_still_times_out_3_10() {
    let mut net = Net::new(3, |c| c.check_quorum = false);
    net.elect(1);
    net.isolate(3);
    for _ in 0..30 {
        net.node(1).transfer_leader(3).unwrap();
        net.tick(1, 1);
    }
    net.take();
    assert_eq!(net.status(1).role, Role::Leader);
    assert!(net.node(1).propose(b"ok".to_vec()).is_ok(), "a retried transfer never timed out");
}

/// Thesis 9.6 with 4.2.3: winning a pre-vote does not make the real vote request a transfer;
/// a voter that heard from its leader within the election timeout still ignores it.
#[test]
fn vote_after_prevote_respects_lease_9_6() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    let term = net.status(3).term;
    net.node(3).campaign(); // pre-vote first
    net.take();
    // Node 2 grants the pre-vote (as it could once its lease ran out); node 3 then campaigns.
    let grant =
        Message { from: 2, to: 3, term: term + 1, body: MessageBody::VoteResponse { pre: true, granted: true } };
    net.deliver(grant);
    assert_eq!(net.status(3).role, Role::Candidate);
    let votes: Vec<Message> =
        net.take().into_iter().filter(|m| matches!(m.body, MessageBody::Vote { pre: false, .. })).collect();
    assert_eq!(votes.len(), 2);
    for v in &votes {
        assert!(
            matches!(v.body, MessageBody::Vote { transfer: false, .. }),
            "a vote after pre-vote claims to be a transfer: {v:?}"
        );
    }
    // Node 2 heard from leader 1 just now: its lease makes it ignore the request.
    net.deliver(votes.into_iter().find(|m| m.to == 2).unwrap());
    assert_eq!(net.status(2).term, term, "the vote request skipped node 2's leader lease");
    assert_eq!(net.status(2).leader, Some(1));
}

/// Thesis 3.10: a `TimeoutNow` from a transfer the leader has since abandoned (it took new
/// proposals meanwhile) is ignored, and so is one of an older term.
#[test]
fn stale_timeout_now_ignored_3_10() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).transfer_leader(2).unwrap(); // node 2 is up to date: TimeoutNow at once
    let tn = net.take().into_iter().find(|m| matches!(m.body, MessageBody::TimeoutNow { .. })).unwrap();
    net.tick(1, 30); // the transfer is abandoned
    net.stabilize();
    net.node(1).propose(b"after".to_vec()).unwrap();
    net.stabilize();
    let term = net.status(1).term;
    net.deliver(tn.clone());
    assert_eq!(net.status(2).term, term, "a TimeoutNow of an abandoned transfer started an election");
    assert_eq!(net.status(1).role, Role::Leader);
    // A completed transfer, then a duplicate of its TimeoutNow (older term now): ignored.
    net.node(1).transfer_leader(2).unwrap();
    net.stabilize();
    assert_eq!(net.status(2).role, Role::Leader);
    let tn = Message { to: 2, ..tn };
    let term = net.status(2).term;
    net.deliver(tn);
    assert_eq!((net.status(2).role, net.status(2).term), (Role::Leader, term));
}

/// Section 7: a chunked snapshot transfer finishes even though the leader compacts its log
/// again and again meanwhile (it keeps sending the snapshot the transfer began with).
#[test]
fn snapshot_transfer_survives_leader_compaction_7() {
    let image = |i: Index| format!("image-of-the-state-at-index-{i:06}").into_bytes();
    let mut net = Net::new(3, |c| c.snapshot_chunk_bytes = 4);
    net.elect(1);
    net.isolate(3);
    for i in 0..10u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    net.stabilize();
    net.node(1).compact(8, image(8)).unwrap();
    net.heal();
    let mut compactions = 0;
    for _ in 0..400 {
        for id in 1..=3 {
            net.node(id).tick();
        }
        for id in 1..=3 {
            net.flush(id);
        }
        while let Some(m) = net.queue.pop_front() {
            let chunk = m.to == 3 && matches!(m.body, MessageBody::Snapshot { .. });
            net.deliver(m);
            if chunk && !net.snapshots.contains_key(&3) {
                // Between any two chunks the leader takes a command and compacts what it applied.
                net.node(1).propose(b"more".to_vec()).unwrap();
                net.flush(1);
                let st = net.status(1);
                if st.applied > st.snapshot_index {
                    net.node(1).compact(st.applied, image(st.applied)).unwrap();
                    compactions += 1;
                }
            }
        }
        if net.snapshots.contains_key(&3) {
            break;
        }
    }
    let got = net.snapshots.get(&3).expect("node 3 never completed a snapshot while the leader compacted");
    assert!(compactions >= 3, "the leader compacted only {compactions} times during the transfer");
    assert_eq!(got[0].app_data(), image(got[0].meta.index), "snapshot spliced from different images");
    net.tick_all(30);
    net.stabilize();
    assert_eq!(net.status(3).commit, net.status(1).commit, "node 3 caught up after the snapshot");
}

/// etcd's `MustSync`: a `Ready` whose only durable change is the commit index need not be
/// synced; a new term, vote or entries must be.
#[test]
fn commit_only_ready_needs_no_sync() {
    let mut n = follower_with_term1_entries(3);
    n.step(append_from_1(2, 3, 1, vec![], 0)).unwrap();
    drain(&mut n);
    let hb = Message { from: 1, to: 2, term: 2, body: MessageBody::Heartbeat { commit: 2, read_seq: 0 } };
    n.step(hb).unwrap();
    let rd = n.ready();
    assert_eq!(rd.hard_state.map(|h| h.commit), Some(2), "the new commit index is handed out to write");
    assert!(!rd.must_sync(), "a commit-only change asked for an fsync");
    n.advance(&rd);
    // A vote must be durable before it is granted.
    let vote = Message {
        from: 3,
        to: 2,
        term: 9,
        body: MessageBody::Vote { pre: false, last_index: 3, last_term: 1, transfer: true },
    };
    n.step(vote).unwrap();
    let rd = n.ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((9, Some(3))));
    assert!(rd.must_sync(), "a new term and vote were not synced");
    n.advance(&rd);
}

/// Back-pressure: a leader refuses proposals past `max_uncommitted_bytes` of uncommitted
/// command data with a retryable error, and takes them again once earlier ones commit.
#[test]
fn uncommitted_bytes_bounded() {
    let mut net = Net::new(3, |c| c.max_uncommitted_bytes = 100);
    net.elect(1);
    net.isolate(1);
    net.node(1).propose(vec![1; 60]).unwrap();
    let err = net.node(1).propose(vec![2; 60]).unwrap_err();
    assert_eq!(err, ProposeError::UncommittedLimit { limit: 100 });
    assert!(err.is_retryable());
    assert_eq!(net.status(1).last_index, 2, "a refused proposal was appended");
    net.node(1).propose(vec![3; 40]).unwrap(); // 60 + 40 fits
    net.take();
    net.heal();
    net.tick_all(20);
    net.stabilize();
    assert_eq!(net.status(1).commit, 3);
    net.node(1).propose(vec![4; 60]).unwrap();
    net.stabilize();
    // With nothing uncommitted, one proposal larger than the limit is still taken.
    net.node(1).propose(vec![5; 500]).unwrap();
}

/// `max_committed_bytes_per_ready` bounds the committed entries of one `Ready` (at least one
/// entry goes out); the rest follows in order.
#[test]
fn committed_bytes_per_ready_bounded() {
    let mut c = Config::new(1, vec![1]);
    c.max_committed_bytes_per_ready = 100;
    let mut n = RawNode::new(c).unwrap();
    n.campaign();
    for i in 0..10u8 {
        n.propose(vec![i; 60]).unwrap(); // 84 bytes each, as counted
    }
    let mut applied = Vec::new();
    let mut readys = 0;
    while n.has_ready() {
        let rd = n.ready();
        let bytes: usize = rd.committed_entries.iter().map(|e| e.size_bytes()).sum();
        assert!(rd.committed_entries.len() <= 1 || bytes <= 100, "{bytes} committed bytes in one Ready");
        applied.extend(rd.committed_entries.iter().map(|e| e.index));
        readys += 1;
        n.advance(&rd);
    }
    assert_eq!(applied, (1..=11).collect::<Vec<_>>());
    assert!(readys >= 10, "{readys} Readys for 10 entries that fit one per Ready");
}

/// A leader holds at most `max_pending_reads` unanswered reads; more are refused (retryable).
#[test]
fn pending_reads_bounded() {
    let mut net = Net::new(3, |c| c.max_pending_reads = 2);
    net.elect(1);
    net.node(1).read_index(b"a".to_vec()).unwrap();
    net.node(1).read_index(b"b".to_vec()).unwrap();
    assert_eq!(net.node(1).read_index(b"c".to_vec()), Err(ProposeError::PendingReadsLimit { limit: 2 }));
    net.stabilize();
    assert_eq!(net.reads[&1].len(), 2);
    net.node(1).read_index(b"c".to_vec()).unwrap();
}

fn snapshot_chunk(stream: u64, snap: &Snapshot, offset: usize, len: usize, checksum: u32) -> Message {
    let end = (offset + len).min(snap.data.len());
    Message {
        from: 1,
        to: 2,
        term: 1,
        body: MessageBody::Snapshot {
            meta: snap.meta,
            stream,
            offset: offset as u64,
            data: snap.data[offset..end].to_vec(),
            done: end == snap.data.len(),
            checksum,
        },
    }
}

fn snapshot_answer(net: &mut Net) -> (u64, u64, bool) {
    let m = net.take().into_iter().find(|m| m.from == 2).unwrap();
    match m.body {
        MessageBody::SnapshotResponse { stream, next_offset, done, .. } => (stream, next_offset, done),
        b => panic!("expected a snapshot answer, got {b:?}"),
    }
}

/// Section 7: chunks of two snapshot streams are never joined, even for the same snapshot
/// position: a foreign chunk neither completes nor disturbs the stream under way, and a
/// delayed chunk of a stream the leader has replaced is ignored.
#[test]
fn snapshot_streams_never_spliced_7() {
    let meta = SnapshotMeta { index: 5, term: 1 };
    let a = Snapshot { meta, data: b"AAAAAAAA".to_vec() };
    let b = Snapshot { meta, data: b"BBBBBBBB".to_vec() };
    let mut net = Net::new(3, |_| {});
    net.deliver(snapshot_chunk(1, &a, 0, 4, a.checksum()));
    assert_eq!(snapshot_answer(&mut net), (1, 4, false));
    // The second half of another stream does not complete stream 1: it must start at 0.
    net.deliver(snapshot_chunk(2, &b, 4, 4, b.checksum()));
    assert_eq!(snapshot_answer(&mut net), (2, 0, false));
    assert!(!net.snapshots.contains_key(&2), "installed a snapshot spliced from two streams");
    // Stream 1 goes on where it was.
    net.deliver(snapshot_chunk(1, &a, 4, 4, a.checksum()));
    assert_eq!(snapshot_answer(&mut net), (1, 8, true));
    assert_eq!(net.snapshots[&2], vec![a]);
    // A later position: stream 4 replaces stream 3; a late chunk of stream 3 is ignored.
    let meta = SnapshotMeta { index: 9, term: 1 };
    let c = Snapshot { meta, data: b"CCCCCCCC".to_vec() };
    let d = Snapshot { meta, data: b"DDDDDDDD".to_vec() };
    net.deliver(snapshot_chunk(3, &c, 0, 4, c.checksum()));
    assert_eq!(snapshot_answer(&mut net), (3, 4, false));
    net.deliver(snapshot_chunk(4, &d, 0, 4, d.checksum()));
    assert_eq!(snapshot_answer(&mut net), (4, 4, false));
    net.deliver(snapshot_chunk(3, &c, 4, 4, c.checksum()));
    assert!(net.take().is_empty(), "a chunk of a replaced stream was answered");
    net.deliver(snapshot_chunk(4, &d, 4, 4, d.checksum()));
    assert_eq!(snapshot_answer(&mut net), (4, 8, true));
    assert_eq!(net.snapshots[&2][1], d);
}

/// Section 7: a snapshot whose bytes do not match its checksum (corrupted in transit) is not
/// installed; the follower asks for the stream again from offset 0.
#[test]
fn corrupted_snapshot_refused_7() {
    let snap = Snapshot { meta: SnapshotMeta { index: 5, term: 1 }, data: b"0123456789".to_vec() };
    let mut net = Net::new(3, |_| {});
    net.deliver(snapshot_chunk(1, &snap, 0, 5, snap.checksum()));
    assert_eq!(snapshot_answer(&mut net), (1, 5, false));
    let mut bad = snapshot_chunk(1, &snap, 5, 5, snap.checksum());
    if let MessageBody::Snapshot { data, .. } = &mut bad.body {
        data[0] ^= 1;
    }
    net.deliver(bad);
    assert_eq!(snapshot_answer(&mut net), (1, 0, false));
    assert!(!net.snapshots.contains_key(&2), "installed a corrupted snapshot");
    net.deliver(snapshot_chunk(1, &snap, 0, 5, snap.checksum()));
    net.deliver(snapshot_chunk(1, &snap, 5, 5, snap.checksum()));
    assert_eq!(net.snapshots[&2], vec![snap]);
}
