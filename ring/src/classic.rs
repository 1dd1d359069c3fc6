//! The classic consistent-hash ring: `vnodes` points per member on the `hashring` crate, one
//! probe per key. Kept as the benchmark baseline and for callers that want the textbook ring.

use std::hash::{Hash, Hasher};

use hashring::HashRing;

use crate::{Member, RingError};

/// One virtual node: a member's ordinal and the virtual node's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VNode {
    member: u32,
    replica: u32,
}

/// A classic ring on the `hashring` crate. Unlike `hashring`'s own replica list, [`owners`]
/// returns distinct members.
///
/// [`owners`]: ClassicRing::owners
#[derive(Clone, Debug)]
pub struct ClassicRing {
    members: Vec<Member>,
    inner: HashRing<VNodeKey>,
    vnodes: u32,
}

/// What `hashring` hashes for a virtual node: the member id and the replica number.
#[derive(Clone, Debug, PartialEq)]
struct VNodeKey {
    id: String,
    vnode: VNode,
}

impl Hash for VNodeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.vnode.replica.hash(state);
    }
}

impl ClassicRing {
    /// Builds a ring with `vnodes` virtual nodes per member (weights are ignored, as in most
    /// classic rings).
    pub fn new(members: impl IntoIterator<Item = Member>, vnodes: u32) -> Result<ClassicRing, RingError> {
        let mut members: Vec<Member> = members.into_iter().collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(w) = members.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(RingError::DuplicateMember(w[0].id.clone()));
        }
        let mut inner = HashRing::new();
        let nodes = members
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                (0..vnodes).map(move |r| VNodeKey { id: m.id.clone(), vnode: VNode { member: i as u32, replica: r } })
            })
            .collect();
        inner.batch_add(nodes);
        Ok(ClassicRing { members, inner, vnodes })
    }

    /// Adds a member the way `hashring` does it: one insertion (and one sort) per virtual node.
    /// Ordinals of the existing members are kept, so the new member is appended.
    pub fn add(&mut self, member: Member) {
        let ordinal = self.members.len() as u32;
        for r in 0..self.vnodes {
            self.inner.add(VNodeKey { id: member.id.clone(), vnode: VNode { member: ordinal, replica: r } });
        }
        self.members.push(member);
    }

    /// Removes a member's virtual nodes. Its slot in the member list stays, so ordinals are kept.
    pub fn remove(&mut self, id: &str) {
        if let Some(i) = self.members.iter().position(|m| m.id == id) {
            for r in 0..self.vnodes {
                self.inner.remove(&VNodeKey { id: id.to_string(), vnode: VNode { member: i as u32, replica: r } });
            }
        }
    }

    /// The member that owns `key`.
    #[inline]
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.inner.get(&key).map(|v| &self.members[v.vnode.member as usize])
    }

    /// The first `n` distinct members clockwise from `key`.
    pub fn owners(&self, key: &str, n: usize) -> Vec<&Member> {
        let live = self.inner.len() / self.vnodes.max(1) as usize;
        let mut out: Vec<&Member> = Vec::new();
        let Some(all) = self.inner.get_with_replicas(&key, self.inner.len()) else {
            return out;
        };
        for v in all {
            let m = &self.members[v.vnode.member as usize];
            if !out.iter().any(|o| o.id == m.id) {
                out.push(m);
                if out.len() == n.min(live) {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_distinct_and_start_with_owner() {
        let r = ClassicRing::new((0..5).map(|i| Member::new(format!("n{i}"), "e", "z")), 20).unwrap();
        let owners = r.owners("key", 3);
        assert_eq!(owners.len(), 3);
        assert_eq!(owners[0].id, r.owner("key").unwrap().id);
        assert_ne!(owners[1].id, owners[0].id);
        assert_ne!(owners[2].id, owners[1].id);
    }
}
