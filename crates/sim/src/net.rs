//! The network fault model of the scenario catalogue.

use std::collections::{BTreeMap, BTreeSet};

use crate::{MS, Micros, Rng};

/// An address on the simulated network (a server or a client).
pub type Endpoint = u64;

/// How the network misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Unreliable: each request is delayed 0-27 ms, 10% of requests are dropped, and 10% of
    /// replies are dropped (after the handler ran).
    pub unreliable: bool,
    /// Long reordering: with probability 2/3 a reply is held 200 ms + rand(rand(2000)) ms.
    pub long_reordering: bool,
    /// Long delays: a request to a dead or cut-off node fails after 0-7 s instead of 0-100 ms.
    pub long_delays: bool,
    /// Duplication: 5% of delivered messages arrive a second time, 0-50 ms after the first.
    pub duplicate: bool,
}

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// It arrives at this time (the receiver must still be reachable then).
    Deliver(Micros),
    /// It vanishes; a request/response caller learns nothing until its own timeout.
    Drop,
    /// The destination is unreachable: an RPC caller sees a failure at this time.
    FailAt(Micros),
}

/// Per-endpoint traffic counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests (non-reply messages) delivered to this endpoint.
    pub rpcs_received: u64,
    /// All messages delivered to this endpoint.
    pub msgs_received: u64,
    /// Bytes of every message this endpoint sent.
    pub bytes_sent: u64,
    /// Messages this endpoint sent.
    pub msgs_sent: u64,
}

/// The network: who can reach whom, and what each message suffers.
///
/// Two endpoints can talk when neither is disconnected and they are in the same partition
/// group, or one of them is in no group (clients usually: they reach every side of a
/// partition of the servers). Reachability is checked when a message is sent and again when
/// it arrives.
#[derive(Clone, Debug, Default)]
pub struct Network {
    /// The fault model; may be changed at any time.
    pub config: NetConfig,
    disconnected: BTreeSet<Endpoint>,
    group: BTreeMap<Endpoint, u32>,
    /// Links cut in one direction only: (from, to).
    cut: BTreeSet<(Endpoint, Endpoint)>,
    /// Endpoints whose traffic is held until a time, then delivered in a burst.
    held: BTreeMap<Endpoint, Micros>,
    counters: BTreeMap<Endpoint, Counters>,
}

impl Network {
    /// A reliable, fully connected network.
    pub fn new(config: NetConfig) -> Network {
        Network { config, ..Default::default() }
    }

    /// Whether `a` can reach `b` now.
    pub fn reachable(&self, a: Endpoint, b: Endpoint) -> bool {
        if self.disconnected.contains(&a) || self.disconnected.contains(&b) || self.cut.contains(&(a, b)) {
            return false;
        }
        match (self.group.get(&a), self.group.get(&b)) {
            (Some(ga), Some(gb)) => ga == gb,
            _ => true,
        }
    }

    /// Cuts every link of `e`.
    pub fn disconnect(&mut self, e: Endpoint) {
        self.disconnected.insert(e);
    }

    /// Restores the links of `e` (within its partition group).
    pub fn connect(&mut self, e: Endpoint) {
        self.disconnected.remove(&e);
    }

    /// Whether `e` is disconnected.
    pub fn is_connected(&self, e: Endpoint) -> bool {
        !self.disconnected.contains(&e)
    }

    /// Splits the network: endpoints of different groups cannot talk. Endpoints not named
    /// reach every group.
    pub fn partition(&mut self, groups: &[&[Endpoint]]) {
        self.group.clear();
        for (g, members) in groups.iter().enumerate() {
            for &e in members.iter() {
                self.group.insert(e, g as u32);
            }
        }
    }

    /// Puts `e` into partition group `g`.
    pub fn set_group(&mut self, e: Endpoint, g: u32) {
        self.group.insert(e, g);
    }

    /// Removes every partition and one-way cut (disconnections stay).
    pub fn heal(&mut self) {
        self.group.clear();
        self.cut.clear();
        self.held.clear();
    }

    /// Cuts the link from `from` to `to` only: `to` still reaches `from`.
    pub fn cut_one_way(&mut self, from: Endpoint, to: Endpoint) {
        self.cut.insert((from, to));
    }

    /// Holds every message from or to `e` sent before `until`, then delivers them all at
    /// `until` (within a millisecond): a stalled link that comes back with a burst.
    pub fn hold(&mut self, e: Endpoint, until: Micros) {
        self.held.insert(e, until);
    }

    /// Whether a delivered message is also delivered a second time, and when.
    pub fn duplicate(&mut self, rng: &mut Rng, at: Micros) -> Option<Micros> {
        (self.config.duplicate && rng.chance(0.05)).then(|| at + rng.below(50 * MS))
    }

    /// Decides the fate of a message of `bytes` bytes sent now. `reply` marks answers to an RPC.
    pub fn send(
        &mut self,
        rng: &mut Rng,
        now: Micros,
        from: Endpoint,
        to: Endpoint,
        reply: bool,
        bytes: usize,
    ) -> Fate {
        let c = self.counters.entry(from).or_default();
        c.bytes_sent += bytes as u64;
        c.msgs_sent += 1;
        if !self.reachable(from, to) {
            let wait = if self.config.long_delays { rng.below(7000 * MS) } else { rng.below(100 * MS) };
            return Fate::FailAt(now + wait);
        }
        let cfg = self.config;
        if cfg.unreliable && rng.chance(0.1) {
            return Fate::Drop;
        }
        let mut delay = if cfg.unreliable { rng.below(27 * MS) } else { rng.below(MS / 2) + 100 };
        if reply && cfg.long_reordering && rng.chance(2.0 / 3.0) {
            let inner = rng.below(2000) + 1;
            delay += 200 * MS + rng.below(inner) * MS;
        }
        let held = [from, to].iter().filter_map(|e| self.held.get(e)).copied().max().filter(|&u| u > now);
        match held {
            Some(until) => Fate::Deliver((now + delay).max(until + rng.below(MS))),
            None => Fate::Deliver(now + delay),
        }
    }

    /// Call when a message arrives: true if it may be handed to `to` (still reachable), and
    /// counts it.
    pub fn arrive(&mut self, from: Endpoint, to: Endpoint, reply: bool) -> bool {
        if !self.reachable(from, to) {
            return false;
        }
        let c = self.counters.entry(to).or_default();
        c.msgs_received += 1;
        if !reply {
            c.rpcs_received += 1;
        }
        true
    }

    /// Counters of `e`.
    pub fn counters(&self, e: Endpoint) -> Counters {
        self.counters.get(&e).copied().unwrap_or_default()
    }

    /// Counters summed over all endpoints.
    pub fn total(&self) -> Counters {
        self.counters.values().fold(Counters::default(), |a, c| Counters {
            rpcs_received: a.rpcs_received + c.rpcs_received,
            msgs_received: a.msgs_received + c.msgs_received,
            bytes_sent: a.bytes_sent + c.bytes_sent,
            msgs_sent: a.msgs_sent + c.msgs_sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_and_disconnects_cut_links() {
        let mut n = Network::new(NetConfig::default());
        assert!(n.reachable(1, 2));
        n.partition(&[&[1, 2], &[3]]);
        assert!(n.reachable(1, 2) && !n.reachable(1, 3));
        assert!(n.reachable(9, 1) && n.reachable(9, 3), "an endpoint in no group reaches all");
        n.disconnect(2);
        assert!(!n.reachable(1, 2));
        n.connect(2);
        n.heal();
        assert!(n.reachable(2, 3));
    }

    #[test]
    fn unreliable_drops_about_ten_percent_and_delays_under_27ms() {
        let mut n = Network::new(NetConfig { unreliable: true, ..Default::default() });
        let mut rng = Rng::new(3);
        let mut dropped = 0;
        for _ in 0..10_000 {
            match n.send(&mut rng, 0, 1, 2, false, 10) {
                Fate::Drop => dropped += 1,
                Fate::Deliver(t) => assert!(t < 27 * MS),
                Fate::FailAt(_) => panic!("reachable"),
            }
        }
        assert!((800..1200).contains(&dropped), "{dropped}");
        assert_eq!(n.counters(1).bytes_sent, 100_000);
    }

    #[test]
    fn one_way_cuts_holds_and_duplicates() {
        let mut n = Network::new(NetConfig { duplicate: true, ..Default::default() });
        n.cut_one_way(1, 2);
        assert!(!n.reachable(1, 2) && n.reachable(2, 1));
        let mut rng = Rng::new(5);
        n.hold(3, 500 * MS);
        for _ in 0..100 {
            match n.send(&mut rng, 0, 3, 1, false, 1) {
                Fate::Deliver(t) => assert!((500 * MS..501 * MS).contains(&t), "{t}"),
                f => panic!("{f:?}"),
            }
        }
        let dups = (0..10_000).filter(|_| n.duplicate(&mut rng, 0).is_some()).count();
        assert!((300..700).contains(&dups), "{dups}");
        n.heal();
        assert!(n.reachable(1, 2));
        assert!(matches!(n.send(&mut rng, 0, 3, 1, false, 1), Fate::Deliver(t) if t < MS));
    }

    #[test]
    fn unreachable_fails_after_bounded_delay() {
        let mut n = Network::new(NetConfig { long_delays: true, ..Default::default() });
        n.disconnect(2);
        let mut rng = Rng::new(9);
        for _ in 0..100 {
            match n.send(&mut rng, 0, 1, 2, false, 1) {
                Fate::FailAt(t) => assert!(t < 7000 * MS),
                f => panic!("{f:?}"),
            }
        }
    }
}
