//! The set of `seq`s already stored for one agent.
//!
//! Seqs arrive mostly in order, but a spool replay sends old seqs after new ones, so the set keeps
//! disjoint inclusive ranges: its memory grows with the number of gaps, not with the history.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent inclusive ranges `start -> end`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IntervalSet {
    ranges: BTreeMap<u64, u64>,
}

impl IntervalSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The range holding `v`, if any.
    fn range_of(&self, v: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=v)
            .next_back()
            .filter(|&(_, &end)| end >= v)
            .map(|(&s, &e)| (s, e))
    }

    pub fn contains(&self, v: u64) -> bool {
        self.range_of(v).is_some()
    }

    /// Adds `v`; returns false when it was already present.
    pub fn insert(&mut self, v: u64) -> bool {
        let before = self.ranges.range(..=v).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, end)) = before
            && end >= v
        {
            return false;
        }
        // Merge with the range ending just before `v` and/or the one starting just after it.
        let joins_before = before.filter(|&(_, end)| end.checked_add(1) == Some(v));
        let after = v
            .checked_add(1)
            .and_then(|next| self.ranges.get(&next).map(|&end| (next, end)));
        match (joins_before, after) {
            (Some((start, _)), Some((next, end))) => {
                self.ranges.remove(&next);
                self.ranges.insert(start, end);
            }
            (Some((start, _)), None) => {
                self.ranges.insert(start, v);
            }
            (None, Some((next, end))) => {
                self.ranges.remove(&next);
                self.ranges.insert(v, end);
            }
            (None, None) => {
                self.ranges.insert(v, v);
            }
        }
        true
    }

    /// Whether inserting `v` would add a range: `v` is neither held nor next to a held range.
    /// (Inserting it otherwise extends or merges ranges, which never grows the set.)
    pub fn would_add_range(&self, v: u64) -> bool {
        if self.contains(v) {
            return false;
        }
        let ends_before = v
            .checked_sub(1)
            .is_some_and(|prev| self.range_of(prev).is_some());
        let starts_after = v
            .checked_add(1)
            .is_some_and(|next| self.ranges.contains_key(&next));
        !ends_before && !starts_after
    }

    /// Removes `v` (used to roll back a group whose write failed); returns false when absent.
    pub fn remove(&mut self, v: u64) -> bool {
        let Some((start, end)) = self.range_of(v) else {
            return false;
        };
        self.ranges.remove(&start);
        if start < v {
            self.ranges.insert(start, v - 1);
        }
        if v < end {
            self.ranges.insert(v + 1, end);
        }
        true
    }

    /// Number of disjoint ranges (the memory this set takes).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Number of seqs held.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(&s, &e)| e - s + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in ascending order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ranges(s: &IntervalSet) -> Vec<(u64, u64)> {
        s.ranges().collect()
    }

    #[test]
    fn in_order_inserts_stay_one_range() {
        let mut s = IntervalSet::new();
        for v in 1..=10_000 {
            assert!(s.insert(v));
        }
        assert_eq!(ranges(&s), vec![(1, 10_000)]);
        assert!(!s.insert(5_000));
        assert_eq!(s.len(), 10_000);
    }

    #[test]
    fn gap_filled_later_merges_both_sides() {
        let mut s = IntervalSet::new();
        for v in [1, 2, 3, 7, 8, 5] {
            assert!(s.insert(v));
        }
        assert_eq!(ranges(&s), vec![(1, 3), (5, 5), (7, 8)]);
        assert!(s.insert(4));
        assert_eq!(ranges(&s), vec![(1, 5), (7, 8)]);
        assert!(s.insert(6));
        assert_eq!(ranges(&s), vec![(1, 8)]);
        assert!(!s.contains(0));
        assert!(!s.contains(9));
        assert!(s.contains(6));
    }

    #[test]
    fn would_add_range_only_for_isolated_values() {
        let mut s = IntervalSet::new();
        assert!(s.would_add_range(5));
        for v in [5, 6, 10] {
            s.insert(v);
        }
        assert!(!s.would_add_range(4), "extends 5..=6 downwards");
        assert!(!s.would_add_range(7), "extends 5..=6 upwards");
        assert!(!s.would_add_range(6), "held");
        assert!(!s.would_add_range(9), "extends 10");
        assert!(s.would_add_range(8));
        assert!(s.would_add_range(0) && s.would_add_range(u64::MAX));
        s.insert(u64::MAX);
        assert!(!s.would_add_range(u64::MAX - 1));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut s = IntervalSet::new();
        assert!(s.insert(u64::MAX));
        assert!(s.insert(0));
        assert!(s.insert(u64::MAX - 1));
        assert!(!s.insert(u64::MAX));
        assert_eq!(ranges(&s), vec![(0, 0), (u64::MAX - 1, u64::MAX)]);
        assert!(s.remove(u64::MAX));
        assert_eq!(ranges(&s), vec![(0, 0), (u64::MAX - 1, u64::MAX - 1)]);
    }

    #[test]
    fn remove_splits_a_range() {
        let mut s = IntervalSet::new();
        for v in 10..=20 {
            s.insert(v);
        }
        assert!(s.remove(15));
        assert!(!s.remove(15));
        assert_eq!(ranges(&s), vec![(10, 14), (16, 20)]);
        assert!(s.remove(10));
        assert!(s.remove(20));
        assert_eq!(ranges(&s), vec![(11, 14), (16, 19)]);
        assert!(!s.remove(100));
    }

    /// Pseudo-random inserts and removes against a BTreeSet model (xorshift: no rand dependency).
    #[test]
    fn matches_a_set_model() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut s = IntervalSet::new();
        let mut model = BTreeSet::new();
        for _ in 0..20_000 {
            let v = next() % 300;
            if next() % 4 == 0 {
                assert_eq!(s.remove(v), model.remove(&v), "remove {v}");
            } else {
                assert_eq!(s.insert(v), model.insert(v), "insert {v}");
            }
        }
        assert_eq!(s.len(), model.len() as u64);
        for v in 0..300 {
            assert_eq!(s.contains(v), model.contains(&v));
        }
        // Ranges are disjoint and never adjacent (i.e. maximally merged).
        let r = ranges(&s);
        for w in r.windows(2) {
            assert!(w[0].1 + 1 < w[1].0, "{w:?} not merged");
        }
    }
}
