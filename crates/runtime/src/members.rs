//! The member directory: who the members are and where they listen, kept in the Raft
//! configuration's context ([`sixfive_raft::ConfState::context`], etcd keeps its members in a
//! `ConfChangeV2`'s context the same way), so it follows the configuration's rules: every node
//! knows the address of every member of the configuration it uses, a change that is rolled back
//! takes its addresses with it, and snapshots and restarts keep it.
//!
//! A cluster that never changed has no context: its directory is the `--initial-cluster` its
//! members were started with (a member that joined later was told the directory when it joined,
//! and keeps it in its data directory until its log shows a context).
//!
//! A change is planned from a [`MembersView`] of the leader ([`plan`]) into an
//! [`RsmRequest::ChangeMembershipWith`] that the leader makes only if the configuration is
//! still the one the view showed: two operators changing members at once cannot lose each
//! other's addresses.
//!
//! Adding a voter is adding a learner marked for promotion: the leader promotes it by itself once
//! it has caught up (a voter that must first receive the whole log would stall the quorum; see
//! the core's rule 5). `--learner` leaves it a learner until promoted by hand.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sixfive_raft::{ConfChange, ConfState, Index, NodeId};
use sixfive_rsm::RsmRequest;

use crate::peer::Peer;

/// Every member's name and peer address, and which learners the leader should promote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// id -> name and peer address.
    pub members: BTreeMap<NodeId, Peer>,
    /// Learners added as voters: promoted by the leader once caught up.
    pub promote: BTreeSet<NodeId>,
    /// The id the next member gets: ids are never given twice, so a server removed while it
    /// was down can never pass for a newer member (0: one above the highest listed).
    pub next_id: NodeId,
}

const MAGIC: &[u8; 4] = b"6fd1";

#[derive(Serialize, Deserialize)]
struct Encoded {
    members: Vec<(NodeId, String, String)>,
    promote: Vec<NodeId>,
    next_id: NodeId,
}

impl Directory {
    /// A directory of `members`, nobody to promote.
    pub fn of(members: BTreeMap<NodeId, Peer>) -> Directory {
        Directory { members, promote: BTreeSet::new(), next_id: 0 }
    }

    /// The id the next member gets.
    pub fn next_id(&self) -> NodeId {
        self.next_id.max(self.members.keys().max().map_or(1, |m| m + 1))
    }

    /// As a configuration's context.
    pub fn encode(&self) -> Vec<u8> {
        let e = Encoded {
            members: self.members.iter().map(|(id, p)| (*id, p.name.clone(), p.addr.clone())).collect(),
            promote: self.promote.iter().copied().collect(),
            next_id: self.next_id,
        };
        let mut out = MAGIC.to_vec();
        out.extend(postcard::to_allocvec(&e).expect("encodes"));
        out
    }

    /// From a configuration's context (None if it is not a directory).
    pub fn decode(context: &[u8]) -> Option<Directory> {
        let rest = context.strip_prefix(MAGIC)?;
        let e: Encoded = postcard::from_bytes(rest).ok()?;
        Some(Directory {
            members: e.members.into_iter().map(|(id, name, addr)| (id, Peer { name, addr })).collect(),
            promote: e.promote.into_iter().collect(),
            next_id: e.next_id,
        })
    }

    /// The members of `conf` this directory lists (all it lists when the configuration carries
    /// no directory of its own: the base is the cluster's).
    pub fn members_of(&self, conf: &ConfState) -> BTreeMap<NodeId, Peer> {
        self.members
            .iter()
            .filter(|(id, _)| conf.context.is_empty() || conf.is_member(**id))
            .map(|(i, p)| (*i, p.clone()))
            .collect()
    }

    /// The members of `conf`, as `member list` shows them (client URLs not filled in).
    pub fn entries(&self, conf: &ConfState) -> Vec<MemberEntry> {
        self.members_of(conf)
            .into_iter()
            .map(|(id, p)| MemberEntry {
                id,
                name: p.name,
                peer_addr: p.addr,
                client_urls: Vec::new(),
                learner: conf.learners.contains(&id),
                promote: self.promote.contains(&id),
            })
            .collect()
    }

    /// The directory in effect with configuration `conf`: its context's, or `base` when the
    /// configuration carries none.
    pub fn in_effect(conf: &ConfState, base: &Directory) -> Directory {
        if conf.context.is_empty() {
            return base.clone();
        }
        Directory::decode(&conf.context).unwrap_or_else(|| base.clone())
    }
}

/// One member as `member list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Member id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Peer address (`host:port`).
    pub peer_addr: String,
    /// Client addresses (`host:port`), as the member told its peers (empty until it did).
    pub client_urls: Vec<String>,
    /// A learner (receives the log, does not vote).
    pub learner: bool,
    /// A learner the leader promotes once it has caught up.
    pub promote: bool,
}

/// The membership as one member sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersView {
    /// The member that answered.
    pub answered_by: NodeId,
    /// Who it believes leads.
    pub leader: Option<NodeId>,
    /// Every member of its configuration, by id.
    pub members: Vec<MemberEntry>,
    /// The index of the configuration (see `Membership::conf_index`).
    pub conf_index: Index,
    /// The configuration is committed and not joint: a change may start.
    pub settled: bool,
    /// The id the next member gets (see [`Directory::next_id`]).
    pub next_id: NodeId,
}

impl MembersView {
    /// The member named or numbered `who` (a name, or an id in decimal or in etcd's hex).
    pub fn find(&self, who: &str) -> Option<&MemberEntry> {
        self.members.iter().find(|m| m.name == who).or_else(|| {
            let id = who.parse::<NodeId>().ok().or_else(|| NodeId::from_str_radix(who, 16).ok())?;
            self.members.iter().find(|m| m.id == id)
        })
    }

    /// The directory of the members listed.
    fn directory(&self) -> Directory {
        Directory {
            members: self
                .members
                .iter()
                .map(|m| (m.id, Peer { name: m.name.clone(), addr: m.peer_addr.clone() }))
                .collect(),
            promote: self.members.iter().filter(|m| m.promote && m.learner).map(|m| m.id).collect(),
            next_id: self.next_id,
        }
    }
}

/// A membership change, as an operator asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberOp {
    /// A new member `name` listening for peers at `peer_addr` (`host:port`); a learner, promoted
    /// by the leader once caught up unless `learner`.
    Add {
        /// Its name.
        name: String,
        /// Its peer address.
        peer_addr: String,
        /// Stays a learner until promoted by hand.
        learner: bool,
    },
    /// Promote learner `id` to voter (refused while it lags).
    Promote(NodeId),
    /// Remove member `id`.
    Remove(NodeId),
}

/// Why a membership change was not made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ChangeError {
    /// No such member.
    #[error("{0}")]
    NotFound(String),
    /// The name or peer address is a member's already.
    #[error("{0}")]
    Exists(String),
    /// Promoting a member that is not a learner.
    #[error("{0}")]
    NotLearner(String),
    /// The learner to promote has not caught up yet (retry later).
    #[error("{0}")]
    LearnerBehind(String),
    /// The change makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// No leader, or it did not answer: the change may or may not be made when it says so.
    #[error("{0}")]
    Unavailable(String),
}

/// Plans `op` against the leader's `view`: the request to send to the leader, and the id of the
/// member concerned (a new one's id for an add). Refused with a clear reason when it makes no
/// sense (a name or address in use, an unknown member).
pub fn plan(op: &MemberOp, view: &MembersView) -> Result<(RsmRequest, NodeId), ChangeError> {
    let mut dir = view.directory();
    let (changes, id) = match op {
        MemberOp::Add { name, peer_addr, learner } => {
            // An empty name (etcd's MemberAdd names none) is taken from the server that joins.
            if name.contains(['=', ',']) {
                return Err(ChangeError::Invalid(format!("member name {name:?}: without '=' or ','")));
            }
            if let Some(m) = view.members.iter().find(|m| !name.is_empty() && &m.name == name) {
                return Err(ChangeError::Exists(format!("a member named {name} exists already (id {:x})", m.id)));
            }
            if let Some(m) = view.members.iter().find(|m| &m.peer_addr == peer_addr) {
                return Err(ChangeError::Exists(format!("peer URL http://{peer_addr} is member {}'s already", m.name)));
            }
            // Ids stay below 2^32 (the runtime's endpoint numbering) and are never reused.
            let id = dir.next_id();
            dir.members.insert(id, Peer { name: name.clone(), addr: peer_addr.clone() });
            dir.next_id = id + 1;
            if !learner {
                dir.promote.insert(id);
            }
            (vec![ConfChange::AddLearner(id)], id)
        }
        MemberOp::Promote(id) => {
            let m = view
                .members
                .iter()
                .find(|m| m.id == *id)
                .ok_or_else(|| ChangeError::NotFound(format!("no member with id {id:x}")))?;
            if !m.learner {
                return Err(ChangeError::NotLearner(format!("member {} is a voter already", m.name)));
            }
            dir.promote.remove(id);
            (vec![ConfChange::Promote(*id)], *id)
        }
        MemberOp::Remove(id) => {
            if !view.members.iter().any(|m| m.id == *id) {
                return Err(ChangeError::NotFound(format!("no member with id {id:x}")));
            }
            dir.next_id = dir.next_id();
            dir.members.remove(id);
            dir.promote.remove(id);
            (vec![ConfChange::Remove(*id)], *id)
        }
    };
    Ok((RsmRequest::ChangeMembershipWith { changes, context: dir.encode(), conf_index: view.conf_index }, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> MembersView {
        let m = |id: NodeId, learner: bool| MemberEntry {
            id,
            name: format!("n{id}"),
            peer_addr: format!("127.0.0.1:{}", 2380 + id),
            client_urls: vec![],
            learner,
            promote: false,
        };
        MembersView {
            answered_by: 1,
            leader: Some(1),
            members: vec![m(1, false), m(2, false), m(4, true)],
            conf_index: 7,
            settled: true,
            next_id: 0,
        }
    }

    fn planned(r: RsmRequest) -> (Vec<ConfChange>, Directory, Index) {
        match r {
            RsmRequest::ChangeMembershipWith { changes, context, conf_index } => {
                (changes, Directory::decode(&context).unwrap(), conf_index)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plans_carry_the_whole_directory_and_the_configuration_they_read() {
        let v = view();
        let add = MemberOp::Add { name: "n5".into(), peer_addr: "127.0.0.1:9999".into(), learner: false };
        let (r, id) = plan(&add, &v).unwrap();
        assert_eq!(id, 5, "one above the highest id");
        let (changes, dir, at) = planned(r);
        assert_eq!((changes, at), (vec![ConfChange::AddLearner(5)], 7));
        assert_eq!(dir.members.keys().copied().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert_eq!(dir.members[&5].addr, "127.0.0.1:9999");
        assert_eq!(dir.promote, BTreeSet::from([5]), "a voter is a learner to promote");
        let add_learner = MemberOp::Add { name: "n5".into(), peer_addr: "127.0.0.1:9999".into(), learner: true };
        assert!(planned(plan(&add_learner, &v).unwrap().0).1.promote.is_empty());

        let (changes, dir, _) = planned(plan(&MemberOp::Remove(4), &v).unwrap().0);
        assert_eq!(changes, vec![ConfChange::Remove(4)]);
        assert!(!dir.members.contains_key(&4));
        // The highest id removed is never given again.
        let after = MembersView { members: v.members[..2].to_vec(), next_id: dir.next_id, ..v.clone() };
        assert_eq!(plan(&add_learner, &after).unwrap().1, 5);
        let (changes, _, _) = planned(plan(&MemberOp::Promote(4), &v).unwrap().0);
        assert_eq!(changes, vec![ConfChange::Promote(4)]);
    }

    #[test]
    fn nonsense_is_refused() {
        let v = view();
        let add = |name: &str, addr: &str| MemberOp::Add { name: name.into(), peer_addr: addr.into(), learner: false };
        assert!(plan(&add("n2", "127.0.0.1:1"), &v).unwrap_err().to_string().contains("exists already"));
        assert!(plan(&add("x", "127.0.0.1:2382"), &v).unwrap_err().to_string().contains("n2's already"));
        assert!(plan(&add("a=b", "127.0.0.1:1"), &v).is_err());
        assert!(matches!(plan(&MemberOp::Promote(2), &v), Err(ChangeError::NotLearner(_))));
        assert!(matches!(plan(&MemberOp::Remove(9), &v), Err(ChangeError::NotFound(_))));
        assert_eq!(v.find("n4").map(|m| m.id), Some(4));
        assert_eq!(v.find("4").map(|m| m.id), Some(4));
        assert!(v.find("n9").is_none());
    }

    #[test]
    fn directory_round_trips_and_falls_back_to_the_base() {
        let v = view();
        let d = v.directory();
        assert_eq!(Directory::decode(&d.encode()), Some(d.clone()));
        assert_eq!(Directory::decode(b"garbage"), None);
        let base = Directory::of(BTreeMap::from([(1, Peer { name: "a".into(), addr: "h:1".into() })]));
        let bare = ConfState::with_voters(vec![1]);
        assert_eq!(Directory::in_effect(&bare, &base), base);
        let with = ConfState { context: d.encode(), ..bare };
        assert_eq!(Directory::in_effect(&with, &base), d);
    }
}
