//! Version vectors: for each origin region, the highest sequence number of
//! its deltas that has been applied.
//!
//! Sequence numbers start at 1 and have no gaps, and deltas of one origin are
//! applied strictly in order, so `vv[origin] = n` means exactly deltas
//! `1..=n` of that origin are in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ReplicaId;

/// Highest applied sequence number per origin; absent means 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<ReplicaId, u64>);

impl VersionVector {
    /// An empty vector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest applied sequence number of `origin`.
    pub fn get(&self, origin: ReplicaId) -> u64 {
        self.0.get(&origin).copied().unwrap_or(0)
    }

    /// True when delta `seq` of `origin` has been applied.
    pub fn contains(&self, origin: ReplicaId, seq: u64) -> bool {
        seq <= self.get(origin)
    }

    /// Raises `origin`'s entry to `seq` (never lowers it).
    pub fn advance(&mut self, origin: ReplicaId, seq: u64) {
        if seq > 0 {
            let entry = self.0.entry(origin).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (&origin, &seq) in &other.0 {
            self.advance(origin, seq);
        }
    }

    /// Pointwise minimum over the origins of `self` (absent in `other`
    /// counts as 0): what both have applied.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let mut out = VersionVector::new();
        for (&origin, &seq) in &self.0 {
            out.advance(origin, seq.min(other.get(origin)));
        }
        out
    }

    /// True when `self` has applied everything `other` has.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other
            .0
            .iter()
            .all(|(&origin, &seq)| self.get(origin) >= seq)
    }

    /// Number of deltas `other` has applied that `self` has not.
    pub fn missing_from(&self, other: &VersionVector) -> u64 {
        other
            .0
            .iter()
            .map(|(&origin, &seq)| seq.saturating_sub(self.get(origin)))
            .fold(0u64, u64::saturating_add)
    }

    /// Origins and their sequence numbers, in replica id order.
    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0.iter().map(|(&o, &s)| (o, s))
    }

    /// Number of origins with a non-zero entry.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when nothing has been applied.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (ReplicaId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (origin, seq) in iter {
            vv.advance(origin, seq);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u32, u64)]) -> VersionVector {
        entries.iter().map(|&(r, s)| (ReplicaId(r), s)).collect()
    }

    #[test]
    fn merge_meet_and_lag() {
        let a = vv(&[(1, 5), (2, 3)]);
        let b = vv(&[(1, 2), (3, 4)]);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m, vv(&[(1, 5), (2, 3), (3, 4)]));
        assert!(m.dominates(&a) && m.dominates(&b));
        assert!(!a.dominates(&b));
        assert_eq!(a.meet(&b), vv(&[(1, 2)]));
        assert_eq!(a.missing_from(&b), 4);
        assert_eq!(b.missing_from(&a), 6);
        assert!(a.contains(ReplicaId(1), 5) && !a.contains(ReplicaId(1), 6));
    }
}
