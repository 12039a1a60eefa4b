//! Membership changes through the replicated state machine: a server is replaced while a
//! client keeps incrementing a counter; the history stays linearizable, the new server catches
//! up (by snapshot), the removed one is told, and the configuration survives restarts.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use sixfive_linearizability::models::FnModel;
use sixfive_linearizability::{Op, Verdict, check};
use sixfive_raft::{ConfChange, ConfState, NodeId};
use sixfive_rpc::Transport;
use sixfive_rsm::testkit::{RsmCluster, TestNode, request};
use sixfive_rsm::{ApplyCtx, RsmReply, RsmRequest, StateMachine, SubmitError};
use sixfive_sim::{MS, NetConfig, SEC, SimClient, seeds::run_seeds};

#[derive(Default)]
struct Inc {
    n: u64,
}

impl StateMachine for Inc {
    fn apply(&mut self, _: &[u8], _: ApplyCtx) -> Vec<u8> {
        self.n += 1;
        self.n.to_le_bytes().to_vec()
    }
    fn query(&self, _: &[u8]) -> Vec<u8> {
        self.n.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.n.to_le_bytes().to_vec()
    }
    fn restore(&mut self, s: &[u8]) {
        self.n = u64::from_le_bytes(s.try_into().unwrap());
    }
}

type History = Rc<RefCell<Vec<Op<(), u64>>>>;

/// One increment, tried at the leader (or anyone) until applied; recorded in the history.
async fn inc(cl: &RsmCluster<Inc>, c: &SimClient, h: &History) {
    loop {
        let to = cl.leader().unwrap_or(1);
        let call = c.now();
        match request(c, to, &RsmRequest::Command(b"inc".to_vec()), SEC).await {
            Ok(RsmReply::Done(v)) => {
                let v = u64::from_le_bytes(v.as_slice().try_into().unwrap());
                h.borrow_mut().push(Op { client: c.me(), call, ret: Some(c.now()), input: (), output: Some(v) });
                return;
            }
            Ok(RsmReply::Failed(SubmitError::WrongLeader { .. } | SubmitError::Busy)) => {}
            _ => h.borrow_mut().push(Op { client: c.me(), call, ret: None, input: (), output: None }),
        }
        c.sleep(20 * MS).await;
    }
}

fn voters(v: &[NodeId]) -> impl Fn(&ConfState) -> bool + '_ {
    move |c: &ConfState| c.voters == v && c.learners.is_empty()
}

#[test]
fn replace_server_under_load() {
    run_seeds("replace_server_under_load", 3, |seed| {
        let cl = Rc::new(RsmCluster::new(seed, 3, NetConfig::default(), Some(600), Inc::default));
        let h = History::default();
        let stop = Rc::new(RefCell::new(false));
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let (cl2, h2, stop2, c) = (cl.clone(), h.clone(), stop.clone(), cl.world.client(1000 + i));
                cl.world.spawn(async move {
                    while !*stop2.borrow() {
                        inc(&cl2, &c, &h2).await;
                    }
                })
            })
            .collect();
        let (cl2, stop2, c) = (cl.clone(), stop.clone(), cl.world.client(999));
        cl.world.block_on(async move {
            c.sleep(2 * SEC).await;
            // Server 3 is lost for good; server 4 replaces it.
            let old = 3;
            cl2.crash(old);
            let new = cl2.add_server();
            assert_eq!(new, 4);
            cl2.change_membership(&c, &[ConfChange::AddLearner(new)], |c| c.learners == [new]).await;
            cl2.change_membership(&c, &[ConfChange::Promote(new), ConfChange::Remove(old)], voters(&[1, 2, 4])).await;
            c.sleep(2 * SEC).await;
            // The cluster still has a quorum with any one of the new voters down.
            cl2.crash(1);
            c.sleep(2 * SEC).await;
            cl2.start(1);
            c.sleep(2 * SEC).await;
            *stop2.borrow_mut() = true;
            let snaps = cl2.world.inspect::<TestNode<Inc>, _>(4, |n| n.rsm().snapshots_installed());
            assert!(snaps.unwrap() > 0, "the new server caught up by snapshot");
            // The configuration survives a restart of every member.
            for id in [1, 2, 4] {
                cl2.restart(id);
            }
            c.sleep(3 * SEC).await;
            for id in [1, 2, 4] {
                let m = cl2.membership(id).expect("runs");
                assert_eq!(m.conf.voters, vec![1, 2, 4], "node {id} after restart");
            }
        });
        for w in workers {
            cl.world.block_on(w);
        }
        let n = cl.with_sm(1, |s| s.n).unwrap();
        assert!(n > 20, "too little progress: {n}");
        assert_eq!(cl.with_sm(4, |s| s.n), Some(n), "the new server caught up");
        let model = FnModel::new(0u64, |s: &u64, _: &()| (s + 1, s + 1), |_: &()| 0);
        match check(&model, &h.borrow(), Duration::from_secs(20)) {
            Verdict::Linearizable => {}
            v => panic!("not linearizable: {v:?}"),
        }
    });
}

/// Invalid changes are refused with a typed, non-retryable error; asking a follower redirects.
#[test]
fn membership_requests_refused_cleanly() {
    run_seeds("membership_requests_refused_cleanly", 1, |seed| {
        let cl = Rc::new(RsmCluster::new(seed, 3, NetConfig::default(), None, Inc::default));
        let (cl2, c) = (cl.clone(), cl.world.client(999));
        cl.world.block_on(async move {
            let l = cl2.wait_leader(&c).await;
            c.sleep(SEC).await;
            let r = request(&c, l, &RsmRequest::ChangeMembership(vec![ConfChange::Promote(2)]), SEC).await.unwrap();
            assert!(matches!(r, RsmReply::Failed(SubmitError::MembershipRefused { retryable: false, .. })), "{r:?}");
            let f = if l == 1 { 2 } else { 1 };
            let r = request(&c, f, &RsmRequest::ChangeMembership(vec![ConfChange::AddLearner(9)]), SEC).await.unwrap();
            assert!(matches!(r, RsmReply::Failed(SubmitError::WrongLeader { leader: Some(x) }) if x == l), "{r:?}");
            let r = request(&c, f, &RsmRequest::Membership, SEC).await.unwrap();
            let RsmReply::Done(b) = r else { panic!("{r:?}") };
            let m: sixfive_rsm::Membership = postcard::from_bytes(&b).unwrap();
            assert_eq!((m.conf.voters, m.settled, m.leader), (vec![1, 2, 3], true, Some(l)));
        });
    });
}

/// A change with a context is made only against the configuration it was computed from: a
/// stale one is refused (retryable) and changes nothing; the context reaches every member.
#[test]
fn change_with_context_is_conditional() {
    run_seeds("change_with_context_is_conditional", 1, |seed| {
        let cl = Rc::new(RsmCluster::new(seed, 3, NetConfig::default(), None, Inc::default));
        let (cl2, c) = (cl.clone(), cl.world.client(999));
        cl.world.block_on(async move {
            let l = cl2.wait_leader(&c).await;
            c.sleep(SEC).await;
            let base = cl2.membership(l).unwrap().conf_index;
            let new = cl2.add_server();
            let change = |context: &[u8], conf_index| RsmRequest::ChangeMembershipWith {
                changes: vec![ConfChange::AddLearner(new)],
                context: context.to_vec(),
                conf_index,
            };
            let r = request(&c, l, &change(b"stale", base + 1), SEC).await.unwrap();
            assert!(matches!(r, RsmReply::Failed(SubmitError::MembershipRefused { retryable: true, .. })), "{r:?}");
            assert_eq!(cl2.membership(l).unwrap().conf_index, base, "a refused change changes nothing");
            let r = request(&c, l, &change(b"dir", base), SEC).await.unwrap();
            assert!(matches!(r, RsmReply::Done(_)), "{r:?}");
            c.sleep(2 * SEC).await;
            for id in [1, 2, 3, new] {
                let m = cl2.membership(id).unwrap();
                assert_eq!((m.conf.context.as_slice(), m.conf.learners.as_slice()), (&b"dir"[..], &[new][..]), "{id}");
                assert!(m.conf_index > base);
            }
        });
    });
}
