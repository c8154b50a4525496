//! Bounded growth: truncating logs below a vector, the per-origin log size
//! cap, and the sweep of stream rows below a raised trim watermark.
//!
//! Each origin's log is a contiguous run of seqs ending at this region's
//! version vector entry for it. Truncation and the cap remove a prefix of
//! that run, so the first seq left is all a reader needs to know: asking
//! for anything below it gets [`StoreError::Truncated`], and the reader
//! catches up by snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use concord_core::{ReplicaId, VersionVector};

use crate::error::{Result, StoreError};
use crate::layout::{self, meta};
use crate::runs::Run;
use crate::store::{LogUsage, Store, Writer};

/// Most log records (module `runs`) one truncation step removes before
/// it records what it removed (taking the writer lock for that only).
pub const TRUNCATE_STEP_RECORDS: usize = 4096;

/// Most trimmed stream rows a mutation deletes on its way out; the rest
/// are left for the next mutations (or [`Store::sweep_trimmed`]).
pub const SWEEP_ROWS_PER_CALL: usize = 4096;

/// What one pass of [`Store::remove_log_prefix`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    /// Deltas this pass removed.
    pub(crate) entries: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// Records it found, whether it or a racing pass removed them: fewer
    /// than it was allowed means it reached the end of the prefix.
    pub(crate) visited: usize,
}

/// What one origin's log holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// The last seq removed (by truncation or the cap): the log starts at
    /// `floor + 1`.
    pub floor: u64,
    /// The last seq applied: the log ends there.
    pub last: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes held (encoded deltas).
    pub bytes: u64,
}

/// What a truncation removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TruncateReport {
    /// Entries removed.
    pub entries: u64,
    /// Bytes removed.
    pub bytes: u64,
}

impl Store {
    /// Removes from every origin's log the entries with seq at or below
    /// `below[origin]` (never past what this region has applied), record by
    /// record: a record holding a delta above it stays whole. The node
    /// passes the meet of its peers' acknowledged vectors: what every peer
    /// has.
    ///
    /// Writes go on meanwhile: records are removed one at a time, oldest
    /// first, without the writer lock (which is taken per step of
    /// [`TRUNCATE_STEP_RECORDS`], only to record the sizes). Removing them
    /// in one sled batch held sled's exclusive lock, and so every write
    /// and every remote apply, for 6-90 ms each second (docs/BENCHMARKS.md).
    pub fn truncate_logs(&self, below: &VersionVector) -> Result<TruncateReport> {
        let mut report = TruncateReport::default();
        for (origin, seq) in below.iter() {
            let through = seq.min(self.applied(origin)?);
            loop {
                let removed =
                    self.remove_log_prefix(origin, through, None, TRUNCATE_STEP_RECORDS)?;
                if removed.entries > 0 {
                    self.forget_log(&mut self.lock_writer(), origin, removed);
                }
                report.entries += removed.entries;
                report.bytes += removed.bytes;
                if removed.visited < TRUNCATE_STEP_RECORDS {
                    break;
                }
            }
        }
        if report.entries > 0 {
            tracing::debug!(
                entries = report.entries,
                bytes = report.bytes,
                "truncated logs"
            );
        }
        Ok(report)
    }

    /// The last seq of `origin` removed from its log: the log starts at
    /// `floor + 1` (or is empty, when the floor is the last applied seq).
    pub fn log_floor(&self, origin: ReplicaId) -> Result<u64> {
        let range = layout::log_key(origin, 0)..=layout::log_key(origin, u64::MAX);
        match self.t.log.range(range).next().transpose()? {
            Some((k, _)) => Ok(layout::parse_u64("log key", &k[4..])?.saturating_sub(1)),
            None => self.applied(origin),
        }
    }

    /// What each origin's log holds.
    pub fn log_stats(&self) -> Result<BTreeMap<ReplicaId, LogStats>> {
        let usage = self.lock_writer().logs.clone();
        let vv = self.version_vector()?;
        let mut out = BTreeMap::new();
        for (origin, last) in vv.iter() {
            let u = usage.get(&origin).copied().unwrap_or_default();
            out.insert(
                origin,
                LogStats {
                    floor: self.log_floor(origin)?,
                    last,
                    entries: u.entries,
                    bytes: u.bytes,
                },
            );
        }
        Ok(out)
    }

    /// Log entries removed by the size cap since the store was opened.
    pub fn cap_removed(&self) -> u64 {
        self.cap_removed.load(Ordering::Relaxed)
    }

    /// Reads every log's size; run at open.
    pub(crate) fn measure_logs(&self) -> Result<BTreeMap<ReplicaId, LogUsage>> {
        let mut logs: BTreeMap<ReplicaId, LogUsage> = BTreeMap::new();
        for item in self.t.log.iter() {
            let (k, v) = item?;
            let origin =
                layout::parse_replica_key(k.get(..4).ok_or_else(|| {
                    StoreError::Corrupt(format!("log key of {} bytes", k.len()))
                })?)?;
            let run = Run::parse(origin, &k, &v)?;
            let u = logs.entry(origin).or_default();
            u.entries += run.deltas.len() as u64;
            u.bytes += run.bytes();
        }
        Ok(logs)
    }

    /// Counts entries just committed to `origin`'s log and enforces the
    /// cap on it. Runs after a commit, so it cannot fail the mutation: a
    /// failure to shrink the log is logged and retried by the next one.
    pub(crate) fn account_log(&self, w: &mut Writer, origin: ReplicaId, entries: u64, bytes: u64) {
        let u = w.logs.entry(origin).or_default();
        u.entries += entries;
        u.bytes += bytes;
        if let Err(e) = self.enforce_log_cap(w, &[origin]) {
            tracing::error!(origin = origin.0, error = %e, "could not enforce the log size cap");
        }
    }

    /// Removes the oldest entries of each of `origins`' logs until it is
    /// within `max_log_bytes_per_origin`. The newest record always stays:
    /// the cap is at least one delta's size, and a record holds at most a
    /// quarter of the cap or one delta ([`crate::runs::run_max_bytes`]).
    pub(crate) fn enforce_log_cap(&self, w: &mut Writer, origins: &[ReplicaId]) -> Result<()> {
        let cap = self.options.max_log_bytes_per_origin;
        for &origin in origins {
            let Some(u) = w.logs.get(&origin).copied() else {
                continue;
            };
            if u.bytes <= cap {
                continue;
            }
            let excess = u.bytes - cap;
            let removed = self.remove_log_prefix(origin, u64::MAX, Some(excess), usize::MAX)?;
            self.forget_log(w, origin, removed);
            let Removed { entries, bytes, .. } = removed;
            self.cap_removed.fetch_add(entries, Ordering::Relaxed);
            tracing::warn!(
                origin = origin.0,
                entries,
                bytes,
                cap_bytes = cap,
                "log over its size cap: removed its oldest entries; peers that still needed them will catch up by snapshot"
            );
        }
        Ok(())
    }

    /// Removes records of `origin`'s log ([`crate::runs`]) from the oldest
    /// on, each only when all its deltas have seq at most `through`, at
    /// most `max_records` of them, and — when `min_bytes` is given — only
    /// as many as it takes to remove that many bytes (but never the newest
    /// record). The caller passes what it removed to
    /// [`Store::forget_log`].
    ///
    /// One record at a time, oldest first: sled keeps each removal atomic
    /// and recovers a prefix of them after a crash, so the log stays a
    /// contiguous run whatever happens, and no lock is held across the
    /// whole prefix. Two removals racing over the same records count each
    /// record once (only the one that removed it does).
    pub(crate) fn remove_log_prefix(
        &self,
        origin: ReplicaId,
        through: u64,
        min_bytes: Option<u64>,
        max_records: usize,
    ) -> Result<Removed> {
        let range = layout::log_key(origin, 0)..=layout::log_key(origin, through);
        let mut removed = Removed::default();
        let mut last = None;
        let mut records = self.t.log.range(range).peekable();
        while let Some(record) = records.next() {
            if removed.visited >= max_records || min_bytes.is_some_and(|m| removed.bytes >= m) {
                break;
            }
            if min_bytes.is_some() && records.peek().is_none() {
                break;
            }
            let (key, value) = record?;
            let run = Run::parse(origin, &key, &value)?;
            if run.last() > through {
                break;
            }
            removed.visited += 1;
            if let Some(old) = self.t.log.remove(&key)? {
                let run = Run::parse(origin, &key, &old)?;
                removed.entries += run.deltas.len() as u64;
                removed.bytes += run.bytes();
            }
            last = Some(run.last());
        }
        if let Some(seq) = last {
            self.lock_recent().drop_through(origin, seq);
        }
        Ok(removed)
    }

    /// Takes entries removed by [`Store::remove_log_prefix`] off `origin`'s
    /// recorded log size.
    pub(crate) fn forget_log(&self, w: &mut Writer, origin: ReplicaId, removed: Removed) {
        if removed.entries > 0 {
            let u = w.logs.entry(origin).or_default();
            u.entries = u.entries.saturating_sub(removed.entries);
            u.bytes = u.bytes.saturating_sub(removed.bytes);
        }
    }

    /// The streams whose trimmed rows are still to be deleted: (sweep key,
    /// row key of the watermark).
    pub(crate) fn pending_sweeps(&self) -> Result<Vec<(sled::IVec, sled::IVec)>> {
        self.t
            .meta
            .scan_prefix(meta::SWEEP_PREFIX)
            .map(|item| item.map_err(StoreError::from))
            .collect()
    }

    /// After a mutation: notes a committed trim and deletes up to
    /// [`SWEEP_ROWS_PER_CALL`] trimmed rows if any are pending. Runs after
    /// a commit, so it cannot fail the mutation: a failed sweep is logged
    /// and resumed later.
    pub(crate) fn after_trim(&self, trimmed: bool) {
        if trimmed {
            self.sweep_pending.store(true, Ordering::SeqCst);
        }
        if self.sweep_pending.load(Ordering::SeqCst) {
            if let Err(e) = self.sweep_trimmed(SWEEP_ROWS_PER_CALL) {
                self.sweep_pending.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "could not sweep trimmed stream rows");
            }
        }
    }

    /// Deletes up to `max_rows` stream rows below their stream's trim
    /// watermark; returns how many. Those rows are already invisible; this
    /// only reclaims their space. Returns 0 at once when another caller is
    /// sweeping.
    pub fn sweep_trimmed(&self, max_rows: usize) -> Result<usize> {
        let Ok(_sweeping) = self.sweeper.try_lock() else {
            return Ok(0);
        };
        // Cleared before reading the records, so a trim committed from now
        // on sets it again and is not missed.
        self.sweep_pending.store(false, Ordering::SeqCst);
        let mut removed = 0usize;
        for (sweep_key, bound) in self.pending_sweeps()? {
            let budget = max_rows - removed;
            if budget == 0 {
                self.sweep_pending.store(true, Ordering::SeqCst);
                break;
            }
            // Every row of the stream starts with the prefix, and the
            // watermark's row key is the prefix followed by its id.
            let prefix = sweep_key[meta::SWEEP_PREFIX.len()..].to_vec();
            let mut batch = sled::Batch::default();
            let mut n = 0usize;
            for item in self.t.rows.range(prefix..bound.to_vec()).take(budget) {
                let (k, _) = item?;
                batch.remove(k);
                n += 1;
            }
            self.t.rows.apply_batch(batch)?;
            removed += n;
            if n < budget {
                // Done with this stream, unless a newer trim raised its
                // watermark meanwhile: then the record stays for that one.
                let _ = self.t.meta.compare_and_swap(
                    &sweep_key,
                    Some(&bound),
                    None as Option<&[u8]>,
                )?;
            } else {
                self.sweep_pending.store(true, Ordering::SeqCst);
            }
        }
        Ok(removed)
    }
}
