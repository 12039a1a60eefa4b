//! 3C: persistence, Figure 8, and churn.

use sixfive_raft_sim::{Cluster, ClusterConfig, cmd};
use sixfive_sim::{MS, Micros, SEC};

use crate::{ELECTION_TIMEOUT, after, rand_cmd, scenario};

#[test]
fn persist1_3c() {
    scenario("persist1_3c", |seed| {
        let n = 3;
        let mut c = Cluster::new(ClusterConfig::new(n as usize), seed);
        c.one(cmd(11), 3, true);
        // Crash and restart all.
        for id in c.ids() {
            c.restart(id);
        }
        c.one(cmd(12), 3, true);
        let leader1 = c.check_one_leader();
        c.disconnect(leader1);
        c.restart(leader1);
        c.connect(leader1);
        c.one(cmd(13), 3, true);
        let leader2 = c.check_one_leader();
        c.disconnect(leader2);
        let index = c.one(cmd(14), 2, true);
        c.restart(leader2);
        c.connect(leader2);
        c.wait(index, 3, None); // wait for leader2 to join before killing i3
        let i3 = after(c.check_one_leader(), 1, n);
        c.disconnect(i3);
        c.one(cmd(15), 2, true);
        c.restart(i3);
        c.connect(i3);
        c.one(cmd(16), 3, true);
    });
}

#[test]
fn persist2_3c() {
    scenario("persist2_3c", |seed| {
        let n = 5;
        let mut c = Cluster::new(ClusterConfig::new(n as usize), seed);
        let mut index = 1;
        for _ in 0..5 {
            c.one(cmd(10 + index), 5, true);
            index += 1;
            let leader1 = c.check_one_leader();
            c.disconnect(after(leader1, 1, n));
            c.disconnect(after(leader1, 2, n));
            c.one(cmd(10 + index), 3, true);
            index += 1;
            c.disconnect(leader1);
            c.disconnect(after(leader1, 3, n));
            c.disconnect(after(leader1, 4, n));
            c.restart(after(leader1, 1, n));
            c.restart(after(leader1, 2, n));
            c.connect(after(leader1, 1, n));
            c.connect(after(leader1, 2, n));
            c.sleep(ELECTION_TIMEOUT);
            c.restart(after(leader1, 3, n));
            c.connect(after(leader1, 3, n));
            c.one(cmd(10 + index), 3, true);
            index += 1;
            c.connect(after(leader1, 4, n));
            c.connect(leader1);
        }
        c.one(cmd(1000), 5, true);
    });
}

#[test]
fn persist3_3c() {
    scenario("persist3_3c", |seed| {
        let n = 3;
        let mut c = Cluster::new(ClusterConfig::new(n as usize), seed);
        c.one(cmd(101), 3, true);
        let leader = c.check_one_leader();
        c.disconnect(after(leader, 2, n));
        c.one(cmd(102), 2, true);
        c.crash(leader);
        c.crash(after(leader, 1, n));
        c.connect(after(leader, 2, n));
        c.restart(leader);
        c.connect(leader);
        c.one(cmd(103), 2, true);
        c.restart(after(leader, 1, n));
        c.connect(after(leader, 1, n));
        c.one(cmd(104), 3, true);
    });
}

/// Figure 8: leaders crash right after taking commands, so entries of older terms pile up;
/// only entries of the current term may be committed by counting replicas.
#[test]
fn figure8_3c() {
    scenario("figure8_3c", |seed| {
        let n = 5u64;
        let mut c = Cluster::new(ClusterConfig::new(n as usize), seed);
        let v = rand_cmd(&mut c);
        c.one(v, 1, true);
        let mut nup = n;
        for _ in 0..1000 {
            let mut leader = None;
            for id in c.ids() {
                let v = rand_cmd(&mut c);
                if c.is_live(id) && c.start(id, v).is_some() {
                    leader = Some(id);
                }
            }
            let pause: Micros = if c.rng.below(1000) < 100 { c.rng.below(500) * MS } else { c.rng.below(13) * MS };
            c.sleep(pause);
            if let Some(l) = leader {
                c.crash(l);
                nup -= 1;
            }
            if nup < 3 {
                let s = c.rng.range(1, n);
                if !c.is_live(s) {
                    c.restart(s);
                    nup += 1;
                }
            }
        }
        for id in c.ids() {
            if !c.is_live(id) {
                c.restart(id);
            }
        }
        let v = rand_cmd(&mut c);
        c.one(v, n as usize, true);
    });
}

#[test]
fn unreliable_agree_3c() {
    scenario("unreliable_agree_3c", |seed| {
        let mut c = Cluster::new(ClusterConfig::unreliable(5), seed);
        for iters in 1..50u64 {
            let mut batch: Vec<Vec<u8>> = (0..4).map(|j| cmd(100 * iters + j)).collect();
            batch.push(cmd(iters));
            c.one_many(batch, 1, true);
        }
        c.net.config.unreliable = false;
        c.one(cmd(100), 5, true);
    });
}

#[test]
fn figure8_unreliable_3c() {
    scenario("figure8_unreliable_3c", |seed| {
        let n = 5u64;
        let mut c = Cluster::new(ClusterConfig::unreliable(n as usize), seed);
        let v = cmd(c.rng.below(10_000));
        c.one(v, 1, true);
        let mut nup = n;
        for iters in 0..1000 {
            if iters == 200 {
                c.net.config.long_reordering = true;
            }
            let mut leader = None;
            for id in c.ids() {
                let v = cmd(c.rng.below(10_000));
                if c.start(id, v).is_some() && c.net.is_connected(id) {
                    leader = Some(id);
                }
            }
            let pause: Micros = if c.rng.below(1000) < 100 { c.rng.below(500) * MS } else { c.rng.below(13) * MS };
            c.sleep(pause);
            if let Some(l) = leader
                && c.rng.below(1000) < ELECTION_TIMEOUT / MS / 2
            {
                c.disconnect(l);
                nup -= 1;
            }
            if nup < 3 {
                let s = c.rng.range(1, n);
                if !c.net.is_connected(s) {
                    c.connect(s);
                    nup += 1;
                }
            }
        }
        for id in c.ids() {
            c.connect(id);
        }
        let v = cmd(c.rng.below(10_000));
        c.one(v, n as usize, true);
    });
}

/// A client of the churn test: proposes on every live node, then looks for its value.
struct ChurnClient {
    me: u64,
    wake: Micros,
    /// Waiting for `value` at `index`; `polls` counts the back-off steps used.
    pending: Option<(u64, u64, usize)>,
    /// Values seen committed.
    seen: Vec<u64>,
}

impl ChurnClient {
    fn step(&mut self, c: &mut Cluster) {
        const BACKOFF_MS: [u64; 5] = [10, 20, 50, 100, 200];
        if c.now() < self.wake {
            return;
        }
        match self.pending.take() {
            None => {
                let x = c.rng.next_u64() >> 1;
                let mut index = None;
                for id in c.ids() {
                    if let Some((i, _)) = c.start(id, cmd(x)) {
                        index = Some(i);
                    }
                }
                match index {
                    Some(i) => {
                        self.pending = Some((x, i, 0));
                        self.wake = c.now() + BACKOFF_MS[0] * MS;
                    }
                    None => self.wake = c.now() + (79 + self.me * 17) * MS,
                }
            }
            Some((x, index, polls)) => {
                let (nd, v) = c.n_committed(index);
                if nd > 0 {
                    if v == Some(cmd(x)) {
                        self.seen.push(x);
                    }
                } else if polls + 1 < BACKOFF_MS.len() {
                    self.pending = Some((x, index, polls + 1));
                    self.wake = c.now() + BACKOFF_MS[polls + 1] * MS;
                }
            }
        }
    }
}

fn churn(seed: u64, unreliable: bool) {
    let n = 5u64;
    let cfg = if unreliable { ClusterConfig::unreliable(n as usize) } else { ClusterConfig::new(n as usize) };
    let mut c = Cluster::new(cfg, seed);
    let mut clients: Vec<ChurnClient> =
        (0..3).map(|me| ChurnClient { me, wake: 0, pending: None, seen: Vec::new() }).collect();
    let run_clients = |c: &mut Cluster, d: Micros, clients: &mut Vec<ChurnClient>| {
        let until = c.now() + d;
        while c.now() < until {
            for cl in clients.iter_mut() {
                cl.step(c);
            }
            c.sleep(MS);
        }
    };
    for _ in 0..20 {
        if c.rng.below(1000) < 200 {
            let i = c.rng.range(1, n);
            c.disconnect(i);
        }
        if c.rng.below(1000) < 500 {
            let i = c.rng.range(1, n);
            if !c.is_live(i) {
                c.restart(i);
            }
            c.connect(i);
        }
        if c.rng.below(1000) < 200 {
            let i = c.rng.range(1, n);
            c.crash(i);
        }
        // Long enough for a new leader to emerge; short enough to give it little time.
        run_clients(&mut c, ELECTION_TIMEOUT * 7 / 10, &mut clients);
    }
    run_clients(&mut c, ELECTION_TIMEOUT, &mut clients);
    c.net.config.unreliable = false;
    for id in c.ids() {
        if !c.is_live(id) {
            c.restart(id);
        }
        c.connect(id);
    }
    let values: Vec<u64> = clients.iter().flat_map(|cl| cl.seen.iter().copied()).collect();
    c.sleep(SEC);
    let v = rand_cmd(&mut c);
    let last = c.one(v, n as usize, true);
    let mut really = Vec::new();
    for index in 1..=last {
        if let Some(v) = c.wait(index, n as usize, None) {
            really.push(u64::from_le_bytes(v.try_into().expect("8-byte command")));
        }
    }
    assert!(!values.is_empty() || unreliable, "no client saw a commit under reliable churn");
    for v in values {
        assert!(really.contains(&v), "didn't find a value {v} that a client saw committed");
    }
}

#[test]
fn reliable_churn_3c() {
    scenario("reliable_churn_3c", |seed| churn(seed, false));
}

#[test]
fn unreliable_churn_3c() {
    scenario("unreliable_churn_3c", |seed| churn(seed, true));
}
