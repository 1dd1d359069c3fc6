//! The ring: weighted members placed as points, keys placed by several probes, owners found by
//! the smallest clockwise distance from any probe to any point (multi-probe consistent hashing).

use std::sync::Arc;

use crate::hash;
use crate::points::Points;
use crate::{Member, RingError};

/// Probes per key. With [`POINTS_PER_100_WEIGHT`] this sets the balance; both are part of the
/// versioned mapping (changing either changes which member owns a key).
pub const PROBES: u32 = 8;

/// Points placed for a member of weight 100 (the default weight); other weights scale linearly,
/// rounded, with at least one point.
pub const POINTS_PER_100_WEIGHT: u32 = 64;

/// The largest weight a member may have.
pub const MAX_WEIGHT: u32 = 10_000;

/// The default bounded-load factor `c`: no member takes more than `ceil(c × mean)`.
pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) probes: u32,
    pub(crate) points_per_100: u32,
}

const SHAPE: Shape = Shape { probes: PROBES, points_per_100: POINTS_PER_100_WEIGHT };

impl Shape {
    fn points_for(self, weight: u32) -> u32 {
        ((u64::from(weight) * u64::from(self.points_per_100) + 50) / 100).max(1) as u32
    }
}

/// A consistent-hash ring over a set of members: see the crate documentation for its guarantees.
///
/// A `Ring` is immutable; [`Ring::with_member`] and [`Ring::without_member`] return a new ring
/// and cost time linear in the number of points, without re-hashing the other members.
#[derive(Clone, Debug)]
pub struct Ring {
    /// Sorted by id; a member's ordinal is its index here. Shared, so that deriving a ring
    /// from another copies pointers, not strings.
    members: Vec<Arc<Member>>,
    /// Distinct region names, sorted.
    regions: Vec<String>,
    /// Number of members per region, aligned with `regions`.
    region_sizes: Vec<u32>,
    /// Region ordinal of each member, aligned with `members`.
    member_region: Vec<u32>,
    all: Points,
    total_weight: u64,
    shape: Shape,
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new(Vec::new()).unwrap_or_else(|_| unreachable!("an empty ring is always valid"))
    }
}

impl Ring {
    /// Builds a ring. The result depends only on the set of members, never on their order.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Result<Ring, RingError> {
        Ring::with_shape(members, SHAPE)
    }

    /// Builds a ring with a non-default shape. For the tuning experiment in the benchmarks only:
    /// rings of different shapes map keys differently.
    #[doc(hidden)]
    pub fn with_probes_and_points(
        members: impl IntoIterator<Item = Member>,
        probes: u32,
        points_per_100: u32,
    ) -> Result<Ring, RingError> {
        Ring::with_shape(
            members,
            Shape { probes: probes.clamp(1, MAX_PROBES as u32), points_per_100: points_per_100.max(1) },
        )
    }

    pub(crate) fn with_shape(members: impl IntoIterator<Item = Member>, shape: Shape) -> Result<Ring, RingError> {
        let mut members: Vec<Arc<Member>> = members.into_iter().map(Arc::new).collect();
        for m in &members {
            m.validate()?;
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(w) = members.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(RingError::DuplicateMember(w[0].id.clone()));
        }
        let mut pairs = Vec::new();
        for (ordinal, m) in members.iter().enumerate() {
            push_points(&mut pairs, m, ordinal as u32, shape);
        }
        if pairs.len() >= u32::MAX as usize {
            return Err(RingError::TooLarge { points: pairs.len() });
        }
        Ok(Ring::assemble(members, Points::from_unsorted(pairs), shape))
    }

    /// Derives the region tables from the member list and the global points.
    fn assemble(members: Vec<Arc<Member>>, all: Points, shape: Shape) -> Ring {
        let mut regions: Vec<String> = Vec::new();
        for m in &members {
            if let Err(at) = regions.binary_search(&m.region) {
                regions.insert(at, m.region.clone());
            }
        }
        let member_region: Vec<u32> =
            members.iter().map(|m| regions.binary_search(&m.region).unwrap_or_default() as u32).collect();
        let mut region_sizes = vec![0u32; regions.len()];
        for &r in &member_region {
            region_sizes[r as usize] += 1;
        }
        let total_weight = members.iter().map(|m| u64::from(m.weight)).sum();
        Ring { members, regions, region_sizes, member_region, all, total_weight, shape }
    }

    /// A new ring with `member` added; an error if a member with that id is already present.
    pub fn with_member(&self, member: Member) -> Result<Ring, RingError> {
        member.validate()?;
        let at = match self.members.binary_search_by(|m| m.id.as_str().cmp(&member.id)) {
            Ok(_) => return Err(RingError::DuplicateMember(member.id)),
            Err(at) => at as u32,
        };
        let mut new_points = Vec::new();
        push_points(&mut new_points, &member, at, self.shape);
        new_points.sort_unstable();
        let all = self.all.merged(&new_points, at);
        let mut members = Vec::with_capacity(self.members.len() + 1);
        members.extend_from_slice(&self.members[..at as usize]);
        members.push(Arc::new(member));
        members.extend_from_slice(&self.members[at as usize..]);
        Ok(Ring::assemble(members, all, self.shape))
    }

    /// A new ring without the member named `id` (the same ring if there is none).
    pub fn without_member(&self, id: &str) -> Ring {
        let Ok(at) = self.members.binary_search_by(|m| m.id.as_str().cmp(id)) else {
            return self.clone();
        };
        let all = self.all.without(at as u32);
        let mut members = Vec::with_capacity(self.members.len());
        members.extend_from_slice(&self.members[..at]);
        members.extend_from_slice(&self.members[at + 1..]);
        Ring::assemble(members, all, self.shape)
    }

    /// The members, sorted by id. A member's position in this slice is its ordinal, the index
    /// used by [`Ring::owner_bounded`]'s `loads`.
    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// The ordinal of the member named `id`.
    pub fn ordinal(&self, id: &str) -> Option<usize> {
        self.members.binary_search_by(|m| m.id.as_str().cmp(id)).ok()
    }

    /// The member named `id`.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.ordinal(id).map(|i| &*self.members[i])
    }

    /// The distinct regions, sorted.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.regions.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The sum of all members' weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// The member that owns `key`, or `None` when the ring is empty.
    #[inline]
    pub fn owner(&self, key: impl AsRef<[u8]>) -> Option<&Member> {
        self.owner_hashed(hash::key_hash(key.as_ref()))
    }

    /// The member that owns `key` among the members of `region`: the first member of `region`
    /// in the key's preference order. `None` when the region has no member.
    ///
    /// This walks the key's preference order until it meets a member of `region`, about
    /// `len / members in region` steps. For many lookups confined to one small region, a ring
    /// of just that region's members gives the same answers at the cost of [`Ring::owner`].
    pub fn owner_in_region(&self, key: impl AsRef<[u8]>, region: &str) -> Option<&Member> {
        self.preference_in_region(key, region).next()
    }

    #[inline]
    fn owner_hashed(&self, h: u64) -> Option<&Member> {
        let points = &self.all;
        if points.is_empty() {
            return None;
        }
        let mut best = (u64::MAX, usize::MAX);
        for j in 0..self.shape.probes {
            let p = hash::probe(h, j);
            let i = points.successor(p);
            let d = (points.distance(p, i), i);
            if d < best {
                best = d;
            }
        }
        Some(&*self.members[points.member(best.1) as usize])
    }

    /// The first `n` distinct members in `key`'s preference order: the owner, then the member
    /// that would own the key if the owner left, and so on.
    pub fn owners(&self, key: impl AsRef<[u8]>, n: usize) -> Vec<&Member> {
        self.preference(key).take(n).collect()
    }

    /// Every member, in `key`'s preference order, lazily.
    pub fn preference(&self, key: impl AsRef<[u8]>) -> Preference<'_> {
        Preference::new(self, None, self.members.len(), hash::key_hash(key.as_ref()))
    }

    /// The members of `region`, in `key`'s preference order (the global order, filtered).
    pub fn preference_in_region(&self, key: impl AsRef<[u8]>, region: &str) -> Preference<'_> {
        let h = hash::key_hash(key.as_ref());
        match self.region_ordinal(region) {
            Some(r) => Preference::new(self, Some(r as u32), self.region_sizes[r] as usize, h),
            None => Preference::new(self, None, 0, h),
        }
    }

    /// The failover order for `key` given the caller's region order (nearest first): the members
    /// of the first region in preference order, then those of the second, and so on; at most `n`.
    /// Regions not listed are left out, so a pinned service passes only its own region.
    pub fn failover<'r>(
        &self,
        key: impl AsRef<[u8]>,
        region_order: impl IntoIterator<Item = &'r str>,
        n: usize,
    ) -> Vec<&Member> {
        let key = key.as_ref();
        let mut out = Vec::new();
        for region in region_order {
            if out.len() >= n {
                break;
            }
            let want = n - out.len();
            out.extend(self.preference_in_region(key, region).take(want));
        }
        out
    }

    /// Bounded-load placement for a new session ("Consistent Hashing with Bounded Loads",
    /// Mirrokni, Thorup and Zadimoghaddam): the first member in `key`'s preference order whose
    /// load, after taking this session, stays within its capacity
    /// `ceil(c × (total + 1) × weight / total_weight)`, which for equal weights is
    /// `ceil(c × mean)`. `loads[i]` is the current load of the member of ordinal `i`; missing
    /// entries count as zero. `c` below 1 is treated as 1. `None` only when the ring is empty.
    pub fn owner_bounded(&self, key: impl AsRef<[u8]>, loads: &[u64], c: f64) -> Option<&Member> {
        let total: u64 = loads.iter().take(self.members.len()).sum();
        let c = if c.is_finite() { c.max(1.0) } else { DEFAULT_LOAD_FACTOR };
        let mut pref = self.preference(key);
        while let Some(i) = pref.next_ordinal() {
            let load = loads.get(i).copied().unwrap_or(0);
            if load < self.capacity(i, total + 1, c) {
                return Some(&*self.members[i]);
            }
        }
        None
    }

    /// The bounded-load capacity of the member of ordinal `i` when `total` sessions are placed.
    pub fn capacity(&self, i: usize, total: u64, c: f64) -> u64 {
        let share = f64::from(self.members[i].weight) / self.total_weight as f64;
        (c * total as f64 * share).ceil() as u64
    }

    /// The share of the key space each member owns, by ordinal, estimated from `samples` keys
    /// spread evenly over the hash space. For reports and tests; not on any hot path.
    pub fn estimate_shares(&self, samples: u32) -> Vec<f64> {
        let mut counts = vec![0u64; self.members.len()];
        if self.members.is_empty() || samples == 0 {
            return Vec::new();
        }
        let step = u64::MAX / u64::from(samples);
        for s in 0..u64::from(samples) {
            let h = s * step;
            if let Some(m) = self.owner_hashed(h) {
                counts[self.ordinal(&m.id).unwrap_or(0)] += 1;
            }
        }
        counts.into_iter().map(|c| c as f64 / f64::from(samples)).collect()
    }

    /// Heap bytes held by this ring (members' strings included).
    pub fn heap_bytes(&self) -> usize {
        let members: usize = self
            .members
            .iter()
            .map(|m| {
                std::mem::size_of::<Arc<Member>>()
                    + std::mem::size_of::<Member>()
                    + m.id.capacity()
                    + m.region.capacity()
                    + m.zone.capacity()
            })
            .sum();
        members
            + self.region_sizes.capacity() * 4
            + self.regions.iter().map(|r| r.capacity() + std::mem::size_of::<String>()).sum::<usize>()
            + self.all.heap_bytes()
            + self.member_region.capacity() * 4
    }

    /// The total number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.all.len()
    }

    fn region_ordinal(&self, region: &str) -> Option<usize> {
        self.regions.binary_search_by(|r| r.as_str().cmp(region)).ok()
    }
}

fn push_points(out: &mut Vec<(u64, u32)>, m: &Member, ordinal: u32, shape: Shape) {
    for j in 0..shape.points_for(m.weight) {
        out.push((hash::point(&m.id, j), ordinal));
    }
}

/// The members of a ring (or of one region) in a key's preference order: a k-way merge of the
/// probes' clockwise walks, yielding each member the first time one of its points is reached.
#[derive(Debug)]
pub struct Preference<'a> {
    ring: &'a Ring,
    /// Only members of this region, when set.
    region: Option<u32>,
    /// Per probe: its position, the next point to visit, and how many points it has visited.
    cursors: [Cursor; MAX_PROBES],
    probes: usize,
    /// Ordinals already yielded: a short list first, a bitset once it grows.
    seen_few: [u32; SEEN_INLINE],
    seen_count: usize,
    seen_bits: Vec<u64>,
    remaining: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    probe: u64,
    next: usize,
    steps: usize,
}

/// The most probes a ring may use (the preference walk keeps its cursors on the stack).
const MAX_PROBES: usize = 32;
const SEEN_INLINE: usize = 8;

impl<'a> Preference<'a> {
    fn new(ring: &'a Ring, region: Option<u32>, members_in_scope: usize, h: u64) -> Self {
        let points = &ring.all;
        let mut cursors = [Cursor::default(); MAX_PROBES];
        let probes = if members_in_scope == 0 { 0 } else { ring.shape.probes as usize };
        for (j, c) in cursors.iter_mut().enumerate().take(probes) {
            let p = hash::probe(h, j as u32);
            *c = Cursor { probe: p, next: points.successor(p), steps: 0 };
        }
        Preference {
            ring,
            region,
            cursors,
            probes,
            seen_few: [0; SEEN_INLINE],
            seen_count: 0,
            seen_bits: Vec::new(),
            remaining: members_in_scope,
        }
    }

    /// Records `m` as yielded; false if it was already.
    fn first_sight(&mut self, m: u32) -> bool {
        if self.seen_count < SEEN_INLINE {
            if self.seen_few[..self.seen_count].contains(&m) {
                return false;
            }
            self.seen_few[self.seen_count] = m;
        } else {
            if self.seen_bits.is_empty() {
                self.seen_bits = vec![0; self.ring.members.len().div_ceil(64)];
                for &s in &self.seen_few {
                    self.seen_bits[s as usize / 64] |= 1 << (s % 64);
                }
            }
            let (word, bit) = (m as usize / 64, 1u64 << (m % 64));
            if self.seen_bits[word] & bit != 0 {
                return false;
            }
            self.seen_bits[word] |= bit;
        }
        self.seen_count += 1;
        true
    }

    /// The next member's ordinal.
    fn next_ordinal(&mut self) -> Option<usize> {
        let points = &self.ring.all;
        let len = points.len();
        while self.remaining > 0 {
            // The cursor whose next point is nearest its probe; ties go to the lower point index.
            let mut best: Option<((u64, usize), usize)> = None;
            for (c, cur) in self.cursors[..self.probes].iter().enumerate() {
                if cur.steps < len {
                    let d = (points.distance(cur.probe, cur.next), cur.next);
                    if best.is_none_or(|(b, _)| d < b) {
                        best = Some((d, c));
                    }
                }
            }
            let ((_, i), c) = best?;
            let cursor = &mut self.cursors[c];
            cursor.next = if i + 1 == len { 0 } else { i + 1 };
            cursor.steps += 1;
            let m = points.member(i);
            if self.region.is_some_and(|r| self.ring.member_region[m as usize] != r) {
                continue;
            }
            if self.first_sight(m) {
                self.remaining -= 1;
                return Some(m as usize);
            }
        }
        None
    }
}

impl<'a> Iterator for Preference<'a> {
    type Item = &'a Member;

    fn next(&mut self) -> Option<&'a Member> {
        let ring = self.ring;
        self.next_ordinal().map(|i| &*ring.members[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(specs: &[(&str, &str)]) -> Ring {
        Ring::new(specs.iter().map(|(id, region)| Member::new(*id, *region, format!("{region}-a")))).unwrap()
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let r = Ring::default();
        assert!(r.owner("k").is_none());
        assert!(r.owners("k", 3).is_empty());
        assert!(r.owner_in_region("k", "us-east").is_none());
        assert!(r.owner_bounded("k", &[], 1.25).is_none());
    }

    #[test]
    fn preference_starts_with_owner_and_lists_everyone_once() {
        let r = ring(&[("a", "e"), ("b", "e"), ("c", "w"), ("d", "w"), ("e", "x")]);
        for k in 0..500 {
            let key = format!("session-{k}");
            let pref: Vec<_> = r.preference(&key).map(|m| m.id.as_str()).collect();
            assert_eq!(pref.len(), 5);
            assert_eq!(pref[0], r.owner(&key).unwrap().id);
            let mut sorted = pref.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 5);
        }
    }

    #[test]
    fn region_order_is_global_order_filtered() {
        let r = ring(&[("a", "e"), ("b", "e"), ("c", "w"), ("d", "w"), ("e", "e"), ("f", "w")]);
        for k in 0..300 {
            let key = format!("k{k}");
            let global: Vec<_> = r.preference(&key).filter(|m| m.region == "w").map(|m| m.id.clone()).collect();
            let regional: Vec<_> = r.preference_in_region(&key, "w").map(|m| m.id.clone()).collect();
            assert_eq!(global, regional);
            assert_eq!(r.owner_in_region(&key, "w").map(|m| &m.id), regional.first());
        }
        assert!(r.owner_in_region("k", "nowhere").is_none());
    }

    #[test]
    fn failover_follows_region_order() {
        let r = ring(&[("a", "e"), ("b", "e"), ("c", "w"), ("d", "w"), ("e", "x")]);
        let f = r.failover("key", ["w", "e"], 10);
        let regions: Vec<_> = f.iter().map(|m| m.region.as_str()).collect();
        assert_eq!(regions, ["w", "w", "e", "e"]);
        assert_eq!(r.failover("key", ["w", "e"], 3).len(), 3);
        assert_eq!(f[0].id, r.owner_in_region("key", "w").unwrap().id);
    }

    #[test]
    fn incremental_changes_equal_a_fresh_build() {
        let base = ring(&[("a", "e"), ("c", "w"), ("e", "x")]);
        let grown = base.with_member(Member::new("b", "w", "w-a")).unwrap();
        let fresh = ring(&[("a", "e"), ("b", "w"), ("c", "w"), ("e", "x")]);
        let shrunk = fresh.without_member("c");
        let fresh_shrunk = ring(&[("a", "e"), ("b", "w"), ("e", "x")]);
        for k in 0..500 {
            let key = format!("k{k}");
            assert_eq!(grown.owners(&key, 4), fresh.owners(&key, 4));
            assert_eq!(shrunk.owners(&key, 3), fresh_shrunk.owners(&key, 3));
            assert_eq!(shrunk.owner_in_region(&key, "w"), fresh_shrunk.owner_in_region(&key, "w"));
        }
        assert!(matches!(base.with_member(Member::new("a", "e", "z")), Err(RingError::DuplicateMember(_))));
        assert_eq!(base.without_member("zzz").len(), 3);
    }

    #[test]
    fn rejects_bad_members() {
        assert!(matches!(Ring::new([Member::new("", "e", "z")]), Err(RingError::EmptyId)));
        assert!(matches!(Ring::new([Member::new("a", "e", "z").with_weight(0)]), Err(RingError::Weight { .. })));
        assert!(matches!(
            Ring::new([Member::new("a", "e", "z").with_weight(MAX_WEIGHT + 1)]),
            Err(RingError::Weight { .. })
        ));
        assert!(matches!(
            Ring::new([Member::new("a", "e", "z"), Member::new("a", "w", "z")]),
            Err(RingError::DuplicateMember(_))
        ));
    }

    #[test]
    fn bounded_load_skips_full_members() {
        let r = ring(&[("a", "e"), ("b", "e"), ("c", "e")]);
        let key = "sticky";
        let first = r.ordinal(&r.owner(key).unwrap().id).unwrap();
        let mut loads = vec![0u64; 3];
        loads[first] = 10; // total 10, cap for 11 sessions at c=1.25 is ceil(4.58) = 5
        let chosen = r.owner_bounded(key, &loads, 1.25).unwrap();
        assert_ne!(chosen.id, r.members()[first].id);
        assert_eq!(chosen.id, r.owners(key, 2)[1].id);
    }
}
