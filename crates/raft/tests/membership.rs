//! Membership changes (thesis chapter 4): learners, joint consensus, removal, replacement.
//! One rule per test, driven message by message.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sixfive_raft::*;

/// Nodes wired by hand. Messages to nodes that do not exist (yet) are dropped.
struct Net {
    nodes: BTreeMap<NodeId, RawNode>,
    queue: VecDeque<Message>,
    cut: BTreeSet<(NodeId, NodeId)>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    snapshots: BTreeMap<NodeId, Vec<Snapshot>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
}

fn quiet(c: &mut Config) {
    c.check_quorum = false;
}

impl Net {
    fn new(n: u64) -> Net {
        Net::with(n, quiet)
    }

    fn with(n: u64, tweak: fn(&mut Config)) -> Net {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut net = Net {
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            applied: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            reads: BTreeMap::new(),
        };
        for &id in &ids {
            let mut c = Config::new(id, ids.clone());
            tweak(&mut c);
            net.nodes.insert(id, RawNode::new(c).unwrap());
        }
        net
    }

    /// A brand-new node that joins: it knows no configuration.
    fn add_node(&mut self, id: NodeId) {
        let mut c = Config::new(id, vec![]);
        quiet(&mut c);
        self.nodes.insert(id, RawNode::new(c).unwrap());
    }

    fn node(&mut self, id: NodeId) -> &mut RawNode {
        self.nodes.get_mut(&id).unwrap()
    }

    fn status(&self, id: NodeId) -> Status {
        self.nodes[&id].status()
    }

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

    fn stabilize(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
        while let Some(m) = self.queue.pop_front() {
            if self.cut.contains(&(m.from, m.to)) || !self.nodes.contains_key(&m.to) {
                continue;
            }
            let to = m.to;
            self.node(to).step(m).unwrap();
            self.flush(to);
        }
    }

    fn isolate(&mut self, id: NodeId) {
        for o in 1..=20 {
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

    fn tick_all(&mut self, n: u32) {
        for _ in 0..n {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.node(id).tick();
            }
            self.stabilize();
        }
    }

    fn propose(&mut self, id: NodeId, data: &[u8]) -> Index {
        let (i, _) = self.node(id).propose(data.to_vec()).unwrap();
        self.stabilize();
        i
    }

    fn change(&mut self, id: NodeId, changes: &[ConfChange]) -> Index {
        let (i, _) = self.node(id).propose_conf_change(changes).unwrap();
        self.stabilize();
        i
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.status().role == Role::Leader).map(|(&id, _)| id).collect()
    }
}

fn conf(voters: &[NodeId], outgoing: &[NodeId], learners: &[NodeId]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        voters_outgoing: outgoing.to_vec(),
        learners: learners.to_vec(),
        context: Vec::new(),
    }
}

/// A cluster of 1, 2, 3 led by 1 with learner 4 caught up.
fn with_learner() -> Net {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_node(4);
    net.change(1, &[ConfChange::AddLearner(4)]);
    net.propose(1, b"a");
    net
}

// ---------------------------------------------------------------- learners

/// Thesis 4.2.1: a learner receives the log, but is never counted toward a commit.
#[test]
fn learner_receives_log_but_never_counts() {
    let mut net = with_learner();
    assert_eq!(net.status(4).conf, conf(&[1, 2, 3], &[], &[4]));
    assert_eq!(net.status(4).commit, net.status(1).commit, "the learner follows the log");
    assert!(net.applied[&4].iter().any(|e| e.data == b"a"[..]));
    // Voters 2 and 3 gone: leader 1 and learner 4 hold the entry, which is no majority.
    net.isolate(2);
    net.isolate(3);
    let i = net.propose(1, b"b");
    assert_eq!(net.status(4).last_index, i, "the learner holds the entry");
    assert!(net.status(1).commit < i, "a learner's acknowledgement was counted");
}

/// A learner never campaigns, however long it hears nothing.
#[test]
fn learner_never_campaigns() {
    let mut net = with_learner();
    net.isolate(4);
    for _ in 0..300 {
        net.node(4).tick();
    }
    net.node(4).campaign();
    net.stabilize();
    let st = net.status(4);
    assert_eq!(st.role, Role::Follower);
    assert!(!st.removed);
}

/// A learner's vote is never counted: a candidate whose only other grants are learners' loses.
#[test]
fn learner_vote_not_counted() {
    let mut net = with_learner();
    net.add_node(5);
    net.change(1, &[ConfChange::AddLearner(5)]);
    net.cut.insert((2, 1));
    net.cut.insert((3, 1));
    net.cut.insert((1, 2));
    net.cut.insert((1, 3));
    // Node 1 steps down and campaigns: learners 4 and 5 grant (their logs match), 2 and 3
    // never answer. Three grants of five members, but one of three voters.
    let term = net.status(1).term;
    let m = Message {
        from: 2,
        to: 1,
        term: term + 1,
        body: MessageBody::AppendResponse { index: 0, success: false, hint: None },
    };
    net.node(1).step(m).unwrap();
    net.node(1).campaign();
    net.stabilize();
    net.node(1).campaign();
    net.stabilize();
    assert_ne!(net.status(1).role, Role::Leader, "elected with learners' votes");
}

/// A learner is promoted only once caught up; the leader refuses with a typed error.
#[test]
fn promote_refused_while_learner_behind() {
    let mut net = with_learner();
    net.isolate(4);
    net.propose(1, b"b");
    let err = net.node(1).propose_conf_change(&[ConfChange::Promote(4)]).unwrap_err();
    assert!(matches!(err, ConfChangeError::LearnerBehind { id: 4, .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(net.status(1).conf, conf(&[1, 2, 3], &[], &[4]), "a refused change changed nothing");
    net.heal();
    net.tick_all(30); // lost Appends are presumed lost after two heartbeats; a probe follows
    net.change(1, &[ConfChange::Promote(4)]);
    assert_eq!(net.status(1).conf, conf(&[1, 2, 3, 4], &[], &[]), "promoted, through the joint state");
}

/// Nonsense is refused with a typed error and changes nothing.
#[test]
fn invalid_changes_refused() {
    let mut net = with_learner();
    let before = net.status(1).last_index;
    for bad in [
        vec![ConfChange::AddLearner(2)],
        vec![ConfChange::Promote(2)],
        vec![ConfChange::Remove(9)],
        vec![ConfChange::AddLearner(0)],
        vec![ConfChange::Remove(1), ConfChange::Remove(2), ConfChange::Remove(3)],
        vec![ConfChange::Remove(2), ConfChange::AddLearner(2)],
        vec![],
    ] {
        let err = net.node(1).propose_conf_change(&bad).unwrap_err();
        assert!(matches!(err, ConfChangeError::Invalid(_)), "{bad:?}: {err:?}");
        assert!(!err.is_retryable());
    }
    assert!(matches!(
        net.node(2).propose_conf_change(&[ConfChange::Remove(3)]),
        Err(ConfChangeError::NotLeader { leader: Some(1) })
    ));
    assert_eq!(net.node(1).transfer_leader(4), Err(ProposeError::UnknownNode(4)), "transfer to a learner");
    assert_eq!(net.status(1).last_index, before);
}

// ---------------------------------------------------------------- joint consensus

/// Thesis 4.3: in the joint configuration an entry commits only on majorities of both the old
/// and the new voters; the leader then leaves the joint state on its own.
#[test]
fn joint_commit_needs_both_majorities() {
    let mut net = Net::new(3);
    net.elect(1);
    for id in [4, 5] {
        net.add_node(id);
    }
    net.change(1, &[ConfChange::AddLearner(4), ConfChange::AddLearner(5)]);
    net.tick_all(30);
    // Replace 2 and 3 by 4 and 5 in one change.
    let (j, _) = net
        .node(1)
        .propose_conf_change(&[
            ConfChange::Promote(4),
            ConfChange::Promote(5),
            ConfChange::Remove(2),
            ConfChange::Remove(3),
        ])
        .unwrap();
    assert_eq!(net.status(1).conf, conf(&[1, 4, 5], &[1, 2, 3], &[]), "joint, in effect when appended");
    // Once joint, the new majority alone (1, 4, 5) cannot commit it.
    net.cut.insert((1, 2));
    net.cut.insert((1, 3));
    net.stabilize();
    assert!(net.status(4).commit < j && net.status(1).commit < j, "committed by the new majority alone");
    assert!(net.status(4).conf.is_joint(), "followers use the joint configuration once they hold it");
    net.heal();
    net.tick_all(50);
    let st = net.status(1);
    assert!(st.commit > j, "both majorities commit it: {st:?} {:?} {:?}", net.nodes[&1].progress(), net.status(2));
    assert_eq!(st.conf, conf(&[1, 4, 5], &[], &[]), "left the joint state automatically");
    assert_eq!(st.commit, st.conf_index, "C_new committed");
    // 2 and 3 learn they are removed and stay quiet.
    net.tick_all(30);
    for id in [2, 3] {
        assert!(net.status(id).removed, "node {id} does not know it was removed");
    }
    net.isolate(1);
    net.tick_all(150);
    assert_eq!(net.leaders().iter().filter(|&&l| l != 1).count(), 1, "4 or 5 leads: {:?}", net.leaders());
    assert!([4, 5].contains(&net.leaders().into_iter().find(|&l| l != 1).unwrap()));
}

/// Thesis 4.3: in the joint configuration an election needs both majorities.
#[test]
fn joint_election_needs_both_majorities() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_node(4);
    net.change(1, &[ConfChange::AddLearner(4)]);
    net.tick_all(30);
    // Joint {1,2,3,4} & {1,2,3}, held everywhere but not committed: 1 is cut off after sending.
    for id in [2, 3, 4] {
        net.cut.insert((id, 1));
    }
    let j = net.node(1).propose_conf_change(&[ConfChange::Promote(4)]).unwrap().0;
    net.stabilize();
    net.isolate(1);
    assert!(net.status(2).conf.is_joint());
    // Node 2 with only 3's vote: a majority of {1,2,3}, not of {1,2,3,4}.
    net.isolate(4);
    net.cut.remove(&(2, 3));
    net.cut.remove(&(3, 2));
    net.node(2).campaign();
    net.stabilize();
    net.node(2).campaign();
    net.stabilize();
    assert_ne!(net.status(2).role, Role::Leader, "elected by the old majority alone in a joint configuration");
    // With 4's vote too it wins, commits the joint entry and leaves the joint state.
    net.heal();
    net.isolate(1);
    net.node(2).campaign();
    net.stabilize();
    assert_eq!(net.status(2).role, Role::Leader);
    let st = net.status(2);
    assert!(st.commit > j);
    assert_eq!(st.conf, conf(&[1, 2, 3, 4], &[], &[]));
}

/// Thesis 4.1: a configuration entry that a new leader truncates is rolled back.
#[test]
fn truncated_change_is_rolled_back() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(1);
    net.node(1).propose_conf_change(&[ConfChange::AddLearner(4)]).unwrap();
    net.stabilize();
    assert_eq!(net.status(1).conf, conf(&[1, 2, 3], &[], &[4]), "in effect on append");
    net.elect(2);
    net.propose(2, b"x");
    net.heal();
    net.tick_all(30);
    let st = net.status(1);
    assert_eq!(st.leader, Some(2));
    assert_eq!(st.conf, conf(&[1, 2, 3], &[], &[]), "the truncated change is rolled back");
    assert!(net.nodes[&1].log().entries().all(|e| e.kind != EntryKind::ConfChange));
}

/// One change at a time: a second change waits for the first to finish.
#[test]
fn one_change_at_a_time() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(2);
    net.isolate(3);
    net.node(1).propose_conf_change(&[ConfChange::AddLearner(4)]).unwrap();
    assert_eq!(net.node(1).propose_conf_change(&[ConfChange::AddLearner(5)]), Err(ConfChangeError::ChangeInProgress));
    net.heal();
    net.tick_all(30);
    net.node(1).propose_conf_change(&[ConfChange::AddLearner(5)]).unwrap();
}

// ---------------------------------------------------------------- removal

/// Thesis 4.2.2: a leader that removes itself leads until the change commits, without counting
/// itself, then steps down; removed, it never campaigns again.
#[test]
fn leader_removes_itself() {
    let mut net = Net::new(3);
    net.elect(1);
    net.node(1).propose_conf_change(&[ConfChange::Remove(1)]).unwrap();
    net.stabilize();
    let st = net.status(1);
    assert!(st.removed, "the removed leader says so");
    assert_ne!(st.role, Role::Leader, "stepped down once its removal committed");
    // It handed leadership over to an up-to-date voter.
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert!([2, 3].contains(&leaders[0]));
    assert_eq!(net.status(leaders[0]).conf, conf(&[2, 3], &[], &[]));
    for _ in 0..300 {
        net.node(1).tick();
    }
    net.node(1).campaign();
    assert_eq!(net.status(1).role, Role::Follower, "a removed node campaigned");
    let l = leaders[0];
    net.propose(l, b"after");
    assert!(net.applied[&l].iter().any(|e| e.data == b"after"[..]));
}

/// While its removal is uncommitted the leader leads, but does not count itself in C_new.
#[test]
fn leaving_leader_does_not_count_itself() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    // Joint {2,3} & {1,2,3}: 1 and 2 are a majority of the old voters, 2 alone not of the new.
    let (j, _) = net.node(1).propose_conf_change(&[ConfChange::Remove(1)]).unwrap();
    net.stabilize();
    assert!(net.status(1).commit < j, "the leaving leader counted itself among the new voters");
    assert_eq!(net.status(1).role, Role::Leader);
    net.heal();
    net.tick_all(30);
    assert!(net.status(1).removed);
}

// ---------------------------------------------------------------- snapshots and restarts

/// The configuration is part of snapshots: a new node that catches up by snapshot learns it,
/// and a restarted node recovers it from its snapshot and log.
#[test]
fn conf_survives_snapshot_and_restart() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_node(4);
    net.change(1, &[ConfChange::AddLearner(4)]);
    net.tick_all(30);
    net.change(1, &[ConfChange::Promote(4)]);
    net.isolate(3);
    net.node(1).propose_conf_change(&[ConfChange::Remove(3)]).unwrap();
    net.stabilize();
    net.tick_all(30);
    let want = conf(&[1, 2, 4], &[], &[]);
    assert_eq!(net.status(1).conf, want);
    // Compact the leader's log past every configuration entry.
    let applied = net.status(1).applied;
    let snap = net.node(1).compact(applied, b"image".to_vec()).unwrap();
    assert_eq!(snap.conf_state(), Some(want.clone()));
    assert_eq!(snap.app_data(), b"image");
    // A new learner catches up by snapshot and learns the configuration from it.
    net.add_node(5);
    net.change(1, &[ConfChange::AddLearner(5)]);
    net.tick_all(30);
    let got = net.snapshots.get(&5).expect("node 5 received a snapshot");
    assert_eq!(got[0].app_data(), b"image");
    assert_eq!(net.status(5).conf, conf(&[1, 2, 4], &[], &[5]));
    assert!(!net.status(5).removed, "a joining node is not removed");
    // Node 1 restarts from what it persisted, with the bootstrap voters of the cluster's birth.
    let log = net.nodes[&1].log().clone();
    let st = net.status(1);
    let state = RestoredState {
        hard_state: HardState { term: st.term, vote: st.vote, commit: st.commit },
        snapshot: Some(log.snapshot().clone()),
        entries: log.entries().cloned().collect(),
    };
    let again = RawNode::restart(Config::new(1, vec![1, 2, 3]), state.clone()).unwrap();
    assert_eq!(again.status().conf, conf(&[1, 2, 4], &[], &[5]), "recovered from snapshot and log");
    // Without the entries after the snapshot: the snapshot's configuration.
    let bare = RestoredState { entries: vec![], hard_state: HardState { commit: 0, ..state.hard_state }, ..state };
    let again = RawNode::restart(Config::new(1, vec![1, 2, 3]), bare).unwrap();
    assert_eq!(again.status().conf, want, "recovered from the snapshot");
    // Node 3 was removed while cut off and never learns it (thesis 4.2.3); once back it cannot
    // disturb the cluster: its pre-votes fail on the log check.
    let term = net.status(1).term;
    net.heal();
    net.tick_all(200);
    assert_eq!(net.status(1).role, Role::Leader);
    assert_eq!(net.status(1).term, term, "the removed node disrupted the cluster");
}

/// ReadIndex in a joint configuration is confirmed by both majorities.
#[test]
fn read_index_in_joint_needs_both_majorities() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_node(4);
    net.add_node(5);
    net.change(1, &[ConfChange::AddLearner(4), ConfChange::AddLearner(5)]);
    net.tick_all(30);
    // Joint {1,4,5} & {1,2,3}; hold it there by cutting the new voters after the append.
    net.node(1).propose_conf_change(&[ConfChange::Promote(4), ConfChange::Promote(5), ConfChange::Remove(2)]).unwrap();
    net.cut.insert((1, 4));
    net.cut.insert((1, 5));
    net.stabilize();
    assert!(net.status(1).conf.is_joint());
    net.node(1).read_index(b"r".to_vec()).unwrap();
    net.stabilize();
    assert!(net.reads.get(&1).is_none_or(|r| r.is_empty()), "read confirmed by the old majority alone");
    net.heal();
    net.tick_all(30);
    assert!(net.reads[&1].iter().any(|r| r.ctx == b"r"), "read never confirmed");
}

// ---------------------------------------------------------------- the other features across changes

/// Check-quorum in a joint configuration needs both majorities: a leader that hears only from
/// the old voters steps down.
#[test]
fn check_quorum_in_joint_needs_both_majorities() {
    let mut net = Net::with(3, |_| {});
    net.elect(1);
    for id in [4, 5] {
        let mut c = Config::new(id, vec![]);
        c.seed = id;
        net.nodes.insert(id, RawNode::new(c).unwrap());
    }
    net.change(1, &[ConfChange::AddLearner(4), ConfChange::AddLearner(5)]);
    net.tick_all(30);
    // Joint {1,4,5} & {1,2,3}, and 4 and 5 then unreachable: it can never commit.
    net.node(1).propose_conf_change(&[ConfChange::Promote(4), ConfChange::Promote(5), ConfChange::Remove(2)]).unwrap();
    net.isolate(4);
    net.isolate(5);
    net.stabilize();
    assert!(net.status(1).conf.is_joint());
    for _ in 0..70 {
        net.node(1).tick();
        net.stabilize();
        for id in [2, 3] {
            // 2 and 3 answer heartbeats but do not time out meanwhile (they hear the leader).
            net.node(id).tick();
        }
        net.stabilize();
    }
    assert_ne!(net.status(1).role, Role::Leader, "led on the old majority alone");
}

/// Leadership transfer works to a freshly promoted voter, and the new leader serves.
#[test]
fn transfer_to_promoted_learner() {
    let mut net = with_learner();
    net.tick_all(30);
    net.change(1, &[ConfChange::Promote(4)]);
    assert_eq!(net.status(1).conf, conf(&[1, 2, 3, 4], &[], &[]));
    net.node(1).transfer_leader(4).unwrap();
    net.stabilize();
    assert_eq!(net.status(4).role, Role::Leader);
    let i = net.propose(4, b"from 4");
    assert_eq!(net.status(4).commit, i, "the new leader commits");
}

/// The context travels with the configuration: in effect on append on every node, kept by
/// changes that give none (leaving the joint state too), rolled back with a truncated change,
/// carried by snapshots and recovered on restart.
#[test]
fn context_follows_the_configuration() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add_node(4);
    net.node(1).propose_conf_change_with_context(&[ConfChange::AddLearner(4)], b"dir:1234".to_vec()).unwrap();
    net.stabilize();
    net.tick_all(30);
    for id in 1..=4 {
        assert_eq!(net.status(id).conf.context, b"dir:1234", "node {id}");
    }
    // A change without a context keeps it, through the joint phase and out of it.
    net.change(1, &[ConfChange::Promote(4)]);
    net.tick_all(5);
    assert!(!net.status(1).conf.is_joint());
    assert_eq!(net.status(1).conf.voters, vec![1, 2, 3, 4]);
    for id in 1..=4 {
        assert_eq!(net.status(id).conf.context, b"dir:1234", "node {id} after promotion");
    }
    // A change whose entry a new leader truncates takes its context with it.
    net.isolate(1);
    net.node(1).propose_conf_change_with_context(&[ConfChange::Remove(4)], b"dir:123".to_vec()).unwrap();
    net.stabilize();
    assert_eq!(net.status(1).conf.context, b"dir:123", "in effect on append");
    net.elect(2);
    net.propose(2, b"x");
    net.heal();
    net.tick_all(30);
    assert_eq!(net.status(1).leader, Some(2));
    assert_eq!(net.status(1).conf.context, b"dir:1234", "rolled back with its entry");
    // Snapshots carry it; a restart recovers it from the snapshot alone.
    let applied = net.status(2).applied;
    let snap = net.node(2).compact(applied, b"image".to_vec()).unwrap();
    assert_eq!(snap.conf_state().map(|c| c.context), Some(b"dir:1234".to_vec()));
    assert_eq!(snap.app_data(), b"image");
    let state = RestoredState { hard_state: HardState::default(), snapshot: Some(snap), entries: vec![] };
    let again = RawNode::restart(Config::new(2, vec![1, 2, 3]), state).unwrap();
    assert_eq!(again.status().conf.context, b"dir:1234");
    // A configuration written before contexts existed still decodes, with none.
    #[derive(serde::Serialize)]
    struct V1 {
        voters: Vec<NodeId>,
        voters_outgoing: Vec<NodeId>,
        learners: Vec<NodeId>,
    }
    let old = postcard::to_allocvec(&V1 { voters: vec![1, 2], voters_outgoing: vec![], learners: vec![3] }).unwrap();
    assert_eq!(ConfState::decode(&old), Some(conf(&[1, 2], &[], &[3])));
}

/// A removed follower learns that the configuration removing it is committed (so its server
/// may stop for good), and the leader then stops tracking it.
#[test]
fn removed_follower_learns_its_removal_is_final() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, b"a");
    net.change(1, &[ConfChange::Remove(3)]);
    net.tick_all(5);
    let l = net.status(1);
    assert_eq!(l.conf, conf(&[1, 2], &[], &[]));
    assert!(l.commit >= l.conf_index);
    let st = net.status(3);
    assert!(st.removed, "{st:?}");
    assert!(st.commit >= l.conf_index, "node 3 knows its removal is committed: {st:?}");
    assert!(!net.nodes[&1].progress().contains_key(&3), "the leader stopped tracking it");
}
