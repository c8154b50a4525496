//! The newest deltas of every origin's log, in memory.
//!
//! Peers tail the logs: under a steady load each provider asks, many times
//! a second, for the few deltas committed since its last batch. Reading
//! them from sled costs a trip to the blocking pool and waits for sled's
//! lock, which every running transaction holds exclusively, local writes
//! and remote applies alike. That wait was the tail of the replication
//! lag (docs/BENCHMARKS.md). So each commit also leaves its deltas here,
//! and a reader whose range starts inside what is kept gets them from
//! memory; anything older is read from sled as before.
//!
//! What is kept per origin is a contiguous run of seqs ending at the last
//! one committed, at most [`RECENT_DELTAS_PER_ORIGIN`] deltas and
//! [`RECENT_BYTES_PER_ORIGIN`] encoded bytes: the oldest go first. A log
//! truncation or cap removes the same prefix here, so a reader below the
//! log's floor is still told to catch up by snapshot.

use std::collections::{BTreeMap, VecDeque};

use concord_core::{Delta, ReplicaId};

/// Most deltas kept per origin.
pub const RECENT_DELTAS_PER_ORIGIN: usize = 8192;

/// Most encoded bytes of deltas kept per origin.
pub const RECENT_BYTES_PER_ORIGIN: usize = 4 << 20;

/// One origin's newest deltas, with their encoded sizes.
#[derive(Debug, Default)]
struct Tail {
    deltas: VecDeque<(Delta, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_seq(&self) -> Option<u64> {
        self.deltas.front().map(|(d, _)| d.seq)
    }

    fn last_seq(&self) -> Option<u64> {
        self.deltas.back().map(|(d, _)| d.seq)
    }

    fn push(&mut self, delta: Delta, size: usize) {
        if self.last_seq().is_some_and(|last| last + 1 != delta.seq) {
            // Not the next seq (a snapshot moved the log on): what is kept
            // must stay one contiguous run, so start a new one.
            self.deltas.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.deltas.push_back((delta, size));
        while self.deltas.len() > RECENT_DELTAS_PER_ORIGIN
            || (self.bytes > RECENT_BYTES_PER_ORIGIN && self.deltas.len() > 1)
        {
            if let Some((_, size)) = self.deltas.pop_front() {
                self.bytes -= size;
            }
        }
    }

    fn drop_through(&mut self, through: u64) {
        while self.first_seq().is_some_and(|first| first <= through) {
            if let Some((_, size)) = self.deltas.pop_front() {
                self.bytes -= size;
            }
        }
    }
}

/// Every origin's newest deltas.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    tails: BTreeMap<ReplicaId, Tail>,
}

impl Recent {
    /// Keeps a delta just committed to its origin's log.
    pub(crate) fn push(&mut self, delta: Delta, size: usize) {
        self.tails
            .entry(delta.origin)
            .or_default()
            .push(delta, size);
    }

    /// Forgets `origin`'s deltas with seq at or below `through`, as the log
    /// just did.
    pub(crate) fn drop_through(&mut self, origin: ReplicaId, through: u64) {
        if let Some(tail) = self.tails.get_mut(&origin) {
            tail.drop_through(through);
        }
    }

    /// `origin`'s deltas from `from_seq` on, at most `max_count` and about
    /// `max_bytes` (at least one), when `from_seq` is among those kept;
    /// `None` when it is not, and the log must be read.
    pub(crate) fn from(
        &self,
        origin: ReplicaId,
        from_seq: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Option<Vec<Delta>> {
        let tail = self.tails.get(&origin)?;
        let first = tail.first_seq()?;
        let last = tail.last_seq()?;
        if from_seq < first || from_seq > last {
            return None;
        }
        let skip = usize::try_from(from_seq - first).ok()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (delta, size) in tail.deltas.iter().skip(skip) {
            if out.len() >= max_count || (!out.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            out.push(delta.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::{Hlc, Op};

    fn delta(origin: u32, seq: u64) -> Delta {
        Delta {
            origin: ReplicaId(origin),
            seq,
            hlc: Hlc::from_u64(seq),
            keyspace: "ks".into(),
            key: "k".into(),
            op: Op::Declare(concord_core::CrdtType::Counter),
        }
    }

    fn seqs(out: Option<Vec<Delta>>) -> Option<Vec<u64>> {
        out.map(|v| v.iter().map(|d| d.seq).collect())
    }

    #[test]
    fn serves_ranges_that_start_inside_what_is_kept() {
        let mut r = Recent::default();
        for seq in 1..=5 {
            r.push(delta(1, seq), 10);
        }
        assert_eq!(seqs(r.from(ReplicaId(1), 3, 10, 1000)), Some(vec![3, 4, 5]));
        assert_eq!(seqs(r.from(ReplicaId(1), 1, 2, 1000)), Some(vec![1, 2]));
        // The byte budget, but always at least one delta.
        assert_eq!(seqs(r.from(ReplicaId(1), 2, 10, 25)), Some(vec![2, 3]));
        assert_eq!(seqs(r.from(ReplicaId(1), 2, 10, 1)), Some(vec![2]));
        assert_eq!(r.from(ReplicaId(1), 6, 10, 1000), None, "past the end");
        assert_eq!(r.from(ReplicaId(2), 1, 10, 1000), None, "unknown origin");
    }

    #[test]
    fn stays_bounded_contiguous_and_follows_truncation() {
        let mut r = Recent::default();
        for seq in 1..=(RECENT_DELTAS_PER_ORIGIN as u64 + 10) {
            r.push(delta(1, seq), 1);
        }
        assert_eq!(r.from(ReplicaId(1), 10, 1, 1000), None, "the oldest went");
        assert_eq!(seqs(r.from(ReplicaId(1), 11, 1, 1000)), Some(vec![11]));
        r.drop_through(ReplicaId(1), 100);
        assert_eq!(r.from(ReplicaId(1), 100, 1, 1000), None);
        assert_eq!(seqs(r.from(ReplicaId(1), 101, 1, 1000)), Some(vec![101]));
        // A jump (a snapshot moved the log on) starts a new run.
        r.push(delta(1, 100_000), 1);
        assert_eq!(r.from(ReplicaId(1), 101, 1, 1000), None);
        assert_eq!(
            seqs(r.from(ReplicaId(1), 100_000, 5, 1000)),
            Some(vec![100_000])
        );
        // Large deltas: the byte bound, keeping the newest one.
        let mut big = Recent::default();
        big.push(delta(1, 1), RECENT_BYTES_PER_ORIGIN);
        big.push(delta(1, 2), RECENT_BYTES_PER_ORIGIN);
        assert_eq!(big.from(ReplicaId(1), 1, 5, usize::MAX), None);
        assert_eq!(
            seqs(big.from(ReplicaId(1), 2, 5, usize::MAX)),
            Some(vec![2])
        );
    }
}
