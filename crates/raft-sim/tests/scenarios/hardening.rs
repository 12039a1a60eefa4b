//! Costs and limits of the core that the course does not test (issue 8).

use std::collections::VecDeque;

use sixfive_raft::{Config, Message, RawNode, Role, Storage, persist_ready};
use sixfive_raft_sim::SimStorage;

/// Three nodes, each persisting through its own simulated disk with [`persist_ready`], the way
/// every driver does; messages are delivered in order and none is lost.
struct Trio {
    nodes: Vec<(RawNode, SimStorage)>,
    queue: VecDeque<Message>,
}

impl Trio {
    fn new() -> Trio {
        let nodes = (1..=3).map(|id| (RawNode::new(Config::new(id, vec![1, 2, 3])).unwrap(), SimStorage::default()));
        Trio { nodes: nodes.collect(), queue: VecDeque::new() }
    }

    fn flush(&mut self, i: usize) {
        let (raw, st) = &mut self.nodes[i];
        while raw.has_ready() {
            let rd = raw.ready();
            persist_ready(st, &rd).unwrap();
            self.queue.extend(rd.all_messages().cloned());
            raw.advance(&rd);
        }
    }

    fn stabilize(&mut self) {
        loop {
            for i in 0..3 {
                self.flush(i);
            }
            let Some(m) = self.queue.pop_front() else { return };
            let to = (m.to - 1) as usize;
            self.nodes[to].0.step(m).unwrap();
            self.flush(to);
        }
    }

    /// One heartbeat interval of the leader (node 1); followers do not tick, so none campaigns.
    fn heartbeat(&mut self) {
        for _ in 0..Config::new(1, vec![1]).heartbeat_ticks {
            self.nodes[0].0.tick();
        }
        self.stabilize();
    }

    fn syncs(&self) -> Vec<u64> {
        self.nodes.iter().map(|(_, st)| st.disk.syncs()).collect()
    }
}

/// etcd's `MustSync`: a change of the commit index alone is not worth an fsync. In steady state
/// one committed write costs one sync on the leader (its entry) and one on each follower (the
/// same entry), not a second one each when the commit index moves.
#[test]
fn one_sync_per_write_per_node() {
    let mut t = Trio::new();
    t.nodes[0].0.campaign();
    t.stabilize();
    assert_eq!(t.nodes[0].0.status().role, Role::Leader);
    t.nodes[0].0.propose(b"warm-up".to_vec()).unwrap();
    t.stabilize();
    t.heartbeat();
    let before = t.syncs();
    let writes = 10;
    for i in 0..writes {
        let (index, _) = t.nodes[0].0.propose(vec![i; 100]).unwrap();
        t.stabilize();
        t.heartbeat(); // carries the new commit index to the followers
        for (raw, _) in &t.nodes {
            assert_eq!(raw.status().commit, index, "write {i} not committed everywhere");
        }
    }
    let per_node: Vec<u64> = t.syncs().iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("fsyncs for {writes} committed writes on 3 nodes (leader, follower, follower): {per_node:?}");
    assert_eq!(per_node, vec![writes as u64; 3], "syncs per node for {writes} writes");
    // What those syncs made durable: the entries, and every node's durable commit index may
    // lag (it is learned again from the leader after a crash).
    for (raw, st) in &t.nodes {
        assert_eq!(st.disk.durable().entries.last().map(|e| e.index), Some(raw.status().last_index));
        assert!(st.initial_state().unwrap().hard_state.commit <= raw.status().commit);
    }
}
