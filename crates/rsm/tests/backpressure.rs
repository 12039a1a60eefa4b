//! The core's back-pressure reaches clients as a typed, retryable refusal.

use sixfive_raft::{Config, Message, MessageBody, Role};
use sixfive_rsm::testkit::SharedStorage;
use sixfive_rsm::{ApplyCtx, Rsm, StateMachine, SubmitError};

struct Nothing;

impl StateMachine for Nothing {
    fn apply(&mut self, _: &[u8], _: ApplyCtx) -> Vec<u8> {
        Vec::new()
    }
    fn query(&self, _: &[u8]) -> Vec<u8> {
        Vec::new()
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _: &[u8]) {}
}

/// Node 1 of three, elected by a vote fed by hand; its peers never answer anything else.
fn lonely_leader(tweak: impl Fn(&mut Config)) -> Rsm<SharedStorage, Nothing> {
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.pre_vote = false;
    tweak(&mut cfg);
    let mut rsm = Rsm::new(cfg, SharedStorage::default(), Nothing, None).unwrap();
    rsm.raw().campaign();
    rsm.process().unwrap();
    let grant = Message { from: 2, to: 1, term: 1, body: MessageBody::VoteResponse { pre: false, granted: true } };
    rsm.step(grant).unwrap();
    rsm.process().unwrap();
    assert_eq!(rsm.status().role, Role::Leader);
    rsm
}

#[test]
fn uncommitted_limit_is_busy() {
    let mut rsm = lonely_leader(|c| c.max_uncommitted_bytes = 100);
    rsm.submit(vec![0; 70], 0).unwrap();
    assert_eq!(rsm.submit(vec![0; 70], 0), Err(SubmitError::Busy));
}

#[test]
fn pending_reads_limit_is_busy() {
    let mut rsm = lonely_leader(|c| c.max_pending_reads = 1);
    rsm.query(b"q".to_vec()).unwrap();
    assert_eq!(rsm.query(b"q".to_vec()), Err(SubmitError::Busy));
}
