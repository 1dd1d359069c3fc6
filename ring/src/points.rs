//! A sorted array of ring points with a direct-address index, so that finding the successor of
//! a position costs one index load and, on average, about one comparison.

/// Points sorted by `(position, member)`; `member` is an ordinal into the ring's member list.
#[derive(Clone, Debug)]
pub(crate) struct Points {
    pos: Vec<u64>,
    member: Vec<u32>,
    /// `index[b]` is the first point whose position is at least `b << shift`; `len` when none.
    index: Vec<u32>,
    shift: u32,
}

impl Points {
    /// Builds from `(position, member)` pairs in any order.
    pub(crate) fn from_unsorted(mut pairs: Vec<(u64, u32)>) -> Self {
        pairs.sort_unstable();
        let (pos, member) = pairs.into_iter().unzip();
        Self::from_sorted(pos, member)
    }

    /// Builds from positions sorted by `(position, member)` and their members.
    pub(crate) fn from_sorted(pos: Vec<u64>, member: Vec<u32>) -> Self {
        debug_assert!(pos.windows(2).all(|w| w[0] <= w[1]));
        debug_assert_eq!(pos.len(), member.len());
        let len = pos.len();
        // About two buckets per point keeps the average scan under one step.
        let bits = (usize::BITS - (len.max(1) * 2 - 1).leading_zeros()).clamp(1, 24);
        let shift = 64 - bits;
        let mut index = Vec::with_capacity(1 << bits);
        // One pass: every bucket up to and including a point's bucket that has no entry yet
        // starts at that point. Indices fit in u32: Ring refuses more than u32::MAX points.
        for (i, &p) in pos.iter().enumerate() {
            let bucket = (p >> shift) as usize;
            while index.len() <= bucket {
                index.push(i as u32);
            }
        }
        index.resize(1 << bits, len as u32);
        Points { pos, member, index, shift }
    }

    /// The points of `self` and the sorted `extra` points, merged; members of `self` at or
    /// above `renumber_from` are renumbered up by one (a member was inserted before them).
    pub(crate) fn merged(&self, extra: &[(u64, u32)], renumber_from: u32) -> Points {
        let renumber = |m: u32| if m >= renumber_from { m + 1 } else { m };
        let total = self.len() + extra.len();
        let (mut pos, mut member) = (Vec::with_capacity(total), Vec::with_capacity(total));
        let (mut i, mut j) = (0, 0);
        while i < self.len() || j < extra.len() {
            let take_self = j == extra.len() || (i < self.len() && (self.pos[i], renumber(self.member[i])) <= extra[j]);
            if take_self {
                pos.push(self.pos[i]);
                member.push(renumber(self.member[i]));
                i += 1;
            } else {
                pos.push(extra[j].0);
                member.push(extra[j].1);
                j += 1;
            }
        }
        Points::from_sorted(pos, member)
    }

    /// The points of `self` without those of member `gone`; members above it are renumbered
    /// down by one.
    pub(crate) fn without(&self, gone: u32) -> Points {
        let (mut pos, mut member) = (Vec::with_capacity(self.len()), Vec::with_capacity(self.len()));
        for (&p, &m) in self.pos.iter().zip(&self.member) {
            if m != gone {
                pos.push(p);
                member.push(if m > gone { m - 1 } else { m });
            }
        }
        Points::from_sorted(pos, member)
    }

    pub(crate) fn len(&self) -> usize {
        self.pos.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// Index of the first point at or clockwise after `p`. The ring must not be empty.
    #[inline]
    pub(crate) fn successor(&self, p: u64) -> usize {
        let mut i = self.index[(p >> self.shift) as usize] as usize;
        while i < self.pos.len() && self.pos[i] < p {
            i += 1;
        }
        if i == self.pos.len() { 0 } else { i }
    }

    /// Clockwise distance from `p` to point `i`.
    #[inline]
    pub(crate) fn distance(&self, p: u64, i: usize) -> u64 {
        self.pos[i].wrapping_sub(p)
    }

    #[inline]
    pub(crate) fn member(&self, i: usize) -> u32 {
        self.member[i]
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.pos.capacity() * 8 + self.member.capacity() * 4 + self.index.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_wraps_and_matches_linear_search() {
        let pairs = vec![(10, 0), (u64::MAX - 5, 1), (1 << 63, 2), (10, 3), (500, 1)];
        let points = Points::from_unsorted(pairs);
        for p in [0, 9, 10, 11, 499, 500, 501, 1 << 63, (1 << 63) + 1, u64::MAX - 5, u64::MAX] {
            let linear = points.pos.iter().position(|&x| x >= p).unwrap_or(0);
            assert_eq!(points.successor(p), linear, "successor of {p}");
        }
        // Equal positions are ordered by member ordinal.
        assert_eq!(points.member(points.successor(10)), 0);
    }

    #[test]
    fn merge_and_removal_renumber_members() {
        let points = Points::from_unsorted(vec![(10, 0), (500, 1), (1 << 63, 2), (10, 3)]);
        let merged = points.merged(&[(11, 1), (u64::MAX, 1)], 1);
        assert_eq!(merged.pos, [10, 10, 11, 500, 1 << 63, u64::MAX]);
        assert_eq!(merged.member, [0, 4, 1, 2, 3, 1]);
        let without = merged.without(1);
        assert_eq!(without.pos, [10, 10, 500, 1 << 63]);
        assert_eq!(without.member, [0, 3, 1, 2]);
        for p in [0, 10, 11, 12, 600, u64::MAX] {
            let linear = merged.pos.iter().position(|&x| x >= p).unwrap_or(0);
            assert_eq!(merged.successor(p), linear);
        }
    }
}
