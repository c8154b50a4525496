//! The `log` tree's records: each holds a run of one origin's consecutive
//! deltas, keyed by the run's first seq ([`layout::log_key`]).
//!
//! A commit writes one record per origin it logs (more when a run reaches
//! [`RUN_MAX_DELTAS`] or its byte limit), where one record per delta cost
//! a sled insert for every delta and a sled removal for every delta again
//! when the log was truncated: most of what a node spent on its log
//! (docs/DECISIONS.md, "The log is stored in runs").
//!
//! A record's value is the number of deltas (u32 BE), then each encoded
//! delta as its length (u32 BE) and its bytes. The runs of one origin are
//! contiguous: each starts where the one before it ended, and the last ends
//! at the version vector's entry. Truncation removes whole runs, so a log
//! may keep a few deltas below the truncation point until the run holding
//! them is below it too.

use std::collections::BTreeMap;

use concord_core::ReplicaId;

use crate::error::{Result, StoreError};
use crate::layout;
use crate::rw::{abort, Rw, TxResult};

/// Most deltas in one log record.
pub const RUN_MAX_DELTAS: usize = 256;

/// Most bytes of encoded deltas in one log record (a larger delta is a
/// record of its own). The store lowers it for a small log size cap
/// ([`run_max_bytes`]), so one record never outgrows the cap.
pub const RUN_MAX_BYTES: usize = 64 << 10;

/// Bytes a record spends beside its deltas: the count, and a length per
/// delta.
const HEADER_BYTES: usize = 4;
const LENGTH_BYTES: usize = 4;

/// The byte limit of one record under a log cap of `cap` bytes per
/// origin: [`RUN_MAX_BYTES`], or a quarter of the cap when that is less,
/// so that truncating by the cap, which removes whole records and keeps
/// the newest, leaves the log within it.
pub(crate) fn run_max_bytes(cap: u64) -> usize {
    usize::try_from(cap / 4).map_or(RUN_MAX_BYTES, |quarter| quarter.min(RUN_MAX_BYTES))
}

/// A run being built.
struct Open {
    first: u64,
    count: u32,
    /// The deltas' bytes, without the lengths.
    payload: usize,
    value: Vec<u8>,
}

impl Open {
    fn new(first: u64) -> Open {
        Open {
            first,
            count: 0,
            payload: 0,
            value: vec![0; HEADER_BYTES],
        }
    }

    fn next(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    fn write(mut self, origin: ReplicaId, log: &Rw<'_>) -> TxResult<()> {
        self.value[..HEADER_BYTES].copy_from_slice(&self.count.to_be_bytes());
        log.insert(layout::log_key(origin, self.first), self.value)
    }
}

/// The log records of one commit, built as its deltas are logged and
/// written when it ends ([`LogRuns::finish`]).
pub(crate) struct LogRuns {
    max_bytes: usize,
    open: BTreeMap<ReplicaId, Open>,
}

impl LogRuns {
    /// No runs yet; each closes at `max_bytes` of deltas
    /// ([`run_max_bytes`]) or [`RUN_MAX_DELTAS`].
    pub(crate) fn new(max_bytes: usize) -> LogRuns {
        LogRuns {
            max_bytes,
            open: BTreeMap::new(),
        }
    }

    /// Logs delta `seq` of `origin`, encoded as `bytes`. A run full, or
    /// not ending right before `seq`, is written to `log` first.
    pub(crate) fn push(
        &mut self,
        log: &Rw<'_>,
        origin: ReplicaId,
        seq: u64,
        bytes: &[u8],
    ) -> TxResult<()> {
        let Ok(length) = u32::try_from(bytes.len()) else {
            return abort(StoreError::Bug(format!(
                "a delta of {} bytes does not fit a log record",
                bytes.len()
            )));
        };
        let fits = |run: &Open| {
            run.next() == seq
                && (run.count as usize) < RUN_MAX_DELTAS
                && run.payload + bytes.len() <= self.max_bytes
        };
        let mut run = match self.open.remove(&origin) {
            Some(run) if fits(&run) => run,
            Some(run) => {
                run.write(origin, log)?;
                Open::new(seq)
            }
            None => Open::new(seq),
        };
        run.value.extend_from_slice(&length.to_be_bytes());
        run.value.extend_from_slice(bytes);
        run.count += 1;
        run.payload += bytes.len();
        self.open.insert(origin, run);
        Ok(())
    }

    /// Writes the runs still open to `log`.
    pub(crate) fn finish(self, log: &Rw<'_>) -> TxResult<()> {
        for (origin, run) in self.open {
            run.write(origin, log)?;
        }
        Ok(())
    }
}

/// One log record, read back: a run of `origin`'s deltas from `first` on.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    /// Its first seq.
    pub(crate) first: u64,
    /// Each delta's encoding, in seq order.
    pub(crate) deltas: Vec<&'a [u8]>,
}

impl<'a> Run<'a> {
    /// Parses the record under `key`; a malformed one is reported as
    /// corruption of `origin`'s log.
    pub(crate) fn parse(origin: ReplicaId, key: &[u8], value: &'a [u8]) -> Result<Run<'a>> {
        let bad = |what: &str| StoreError::Corrupt(format!("log of replica {origin}: {what}"));
        let first = layout::parse_u64("log key", key.get(4..).unwrap_or_default())?;
        let (count, mut rest) =
            split_u32(value).ok_or_else(|| bad("a record without its count"))?;
        if count == 0 {
            return Err(bad("an empty record"));
        }
        let mut deltas = Vec::with_capacity(count.min(RUN_MAX_DELTAS as u32) as usize);
        for _ in 0..count {
            let (length, after) =
                split_u32(rest).ok_or_else(|| bad("a record cut short in a delta's length"))?;
            let length = length as usize;
            if after.len() < length {
                return Err(bad("a record cut short in a delta"));
            }
            let (delta, after) = after.split_at(length);
            deltas.push(delta);
            rest = after;
        }
        if !rest.is_empty() {
            return Err(bad("bytes after a record's last delta"));
        }
        if first == 0 || first.checked_add(u64::from(count) - 1).is_none() {
            return Err(bad("a record keyed by an impossible seq"));
        }
        Ok(Run { first, deltas })
    }

    /// Its last seq.
    pub(crate) fn last(&self) -> u64 {
        self.first + self.deltas.len() as u64 - 1
    }

    /// The bytes of its deltas (what the log's size counts).
    pub(crate) fn bytes(&self) -> u64 {
        self.deltas.iter().map(|d| d.len() as u64).sum()
    }
}

fn split_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<LENGTH_BYTES>()?;
    Some((u32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs `(origin, seq, size)` deltas in one commit and returns the
    /// records written: (origin, first seq, seqs held).
    fn commit(max_bytes: usize, deltas: &[(u32, u64, usize)]) -> Vec<(u32, u64, usize)> {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("log").expect("tree");
        tree.transaction(|tx| {
            let log = Rw::Tx(tx);
            let mut runs = LogRuns::new(max_bytes);
            for &(origin, seq, size) in deltas {
                runs.push(&log, ReplicaId(origin), seq, &vec![7u8; size])?;
            }
            runs.finish(&log)
        })
        .expect("commit");
        tree.iter()
            .map(|item| {
                let (k, v) = item.expect("record");
                let origin = layout::parse_replica_key(&k[..4]).expect("origin");
                let run = Run::parse(origin, &k, &v).expect("parse");
                assert!(run.deltas.iter().all(|d| d.iter().all(|&b| b == 7)));
                (origin.0, run.first, run.deltas.len())
            })
            .collect()
    }

    #[test]
    fn runs_close_at_their_byte_limit_and_a_larger_delta_stands_alone() {
        let deltas: Vec<_> = (1..=7).map(|seq| (1, seq, 20 << 10)).collect();
        assert_eq!(
            commit(RUN_MAX_BYTES, &deltas),
            vec![(1, 1, 3), (1, 4, 3), (1, 7, 1)]
        );
        assert_eq!(
            commit(1000, &[(1, 1, 100), (1, 2, 5000), (1, 3, 100)]),
            vec![(1, 1, 1), (1, 2, 1), (1, 3, 1)]
        );
    }

    #[test]
    fn runs_close_at_their_count_limit_at_a_gap_and_are_kept_per_origin() {
        let mut deltas: Vec<_> = (1..=300).map(|seq| (1, seq, 10)).collect();
        deltas.insert(10, (2, 40, 10));
        deltas.push((2, 41, 10));
        deltas.push((1, 305, 10));
        assert_eq!(
            commit(RUN_MAX_BYTES, &deltas),
            vec![(1, 1, 256), (1, 257, 44), (1, 305, 1), (2, 40, 2)]
        );
    }

    #[test]
    fn a_small_cap_makes_small_records() {
        assert_eq!(run_max_bytes(u64::MAX), RUN_MAX_BYTES);
        assert_eq!(run_max_bytes(4096), 1024);
    }
}
