//! The region store: its state, the writer lock, and the committer (where
//! a commit runs, its journal write, the waits for durability). The rest
//! of [`Store`]'s methods are in `open`, `local`, `remote` and `reads`.
//!
//! # Lock order
//!
//! A thread that holds several of these takes them in this order, and
//! never one above a lock it holds. None is held across an `.await`, but
//! the flush leader's, which only ever `try_lock`s.
//!
//! | # | lock | guards | taken by |
//! |---|---|---|---|
//! | 1 | `Store::writer` | next seq, log usage; serializes commits | every commit, `whole_set`, `set_slice`, log truncation steps |
//! | 2 | `GroupCommit::flusher` (`try_lock`) | one flush leader | `lead_or_follow`, `flush_now` (under 1) |
//! | 3 | `Journal::active` | the segment written, across its sync | `Journal::write_pending` |
//! | 4 | `Journal::pending` | deltas not yet written | `Journal::append` (under 1), `write_pending` (under 3) |
//! | 5 | `Journal` spare slot | the prepared next segment | `write_pending` (under 3), the preparation |
//! | 6 | `Pipeline::applying` | queued commits being written to sled | `apply_through`; set reads (after 1) |
//! | 7 | a queued commit's deltas | its deltas | `apply_through` (under 6) |
//! | 8 | `Pipeline::queue` | staged commits awaiting the journal | `push` (under 4), `apply_through` (under 6) |
//! | 9 | `Pipeline::recent` | newest deltas per origin | `show` (first), log truncation |
//! | 10 | `Pipeline::applied` | the in-memory version vector | `show` (after 9), `finish_import` (under 1) |
//!
//! Leaves, taken alone: `Journal::failed`, `Store::sweeper` (`try_lock`,
//! after 1 is released), the catalog cache, `GroupCommit`'s last relaxed
//! flush time (under 2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use concord_core::{Catalog, Delta, Hlc, Limits, Outcome, ReplicaId, VersionVector};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use crate::disk::Db;
use crate::durability::{Durability, GroupCommit};
use crate::error::{Result, StoreError};
use crate::journal::Journal;
use crate::layout::{self, meta};
use crate::offload::Offload;
use crate::options::{Identity, StoreOptions};
use crate::pipeline::Pipeline;
use crate::recent::Recent;
use crate::runs::{self, LogRuns};
use crate::rw::{from_tx, Data, Rw, Staging, Trees, TxResult};

/// What a committed local batch returns.
#[derive(Debug)]
pub struct WriteReceipt {
    /// One outcome per item.
    pub results: Vec<Outcome>,
    /// Commit number; pass the receipt to [`Store::durable`] (to answer the
    /// client) or [`Store::persisted`] (before anything of it leaves the
    /// region).
    pub(crate) commit: Option<u64>,
    /// The highest seq of this region's log the write appended; 0 when it
    /// appended nothing. Once [`Store::persisted`] returns (in group mode,
    /// [`Store::durable`] too), every own delta up to it is on disk.
    pub last_seq: u64,
}

/// What applying a remote batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Deltas applied.
    pub applied: usize,
    /// Deltas dropped as already applied.
    pub duplicates: usize,
    /// Positions, in the batch given, of the deltas applied (not dropped).
    pub fresh: Vec<usize>,
    /// Commit number, if anything was applied.
    pub(crate) commit: Option<u64>,
}

/// What a commit is, which decides how it runs: staged in memory and
/// queued for the journal (local and remote commits of a store with a
/// journal), or in a sled transaction (relaxed mode, and the journal's
/// replay, whose deltas the journal holds already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitKind {
    /// A client's batch or a declaration.
    Local,
    /// A peer's delta batch.
    Remote,
    /// The journal's replay at open.
    Replay,
}

/// Whether a local commit's caller writes the journal before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Journaling {
    /// Queue the commit for the next journal write; whoever waits for it
    /// makes that write ([`Store::stage_many`]: the node's writer goes on,
    /// each client waits for its own batch).
    Queued,
    /// Write the journal now, on this thread: the commit is durable and
    /// in sled when the call returns.
    Now,
}

/// A region's durable state.
pub struct Store {
    pub(crate) path: PathBuf,
    pub(crate) db: Db,
    pub(crate) t: Trees,
    pub(crate) identity: Identity,
    pub(crate) options: StoreOptions,
    /// Serializes every mutation; holds the next local sequence number
    /// and what each origin's log holds.
    pub(crate) writer: Mutex<Writer>,
    /// Staged local commits on their way to sled, and what shows a commit
    /// once sled has it ([`crate::pipeline`]): the `vv` tree as written,
    /// kept in memory (raised after each commit that raises the tree, and
    /// after that commit got its number, so whoever sees an entry there
    /// and then calls [`Store::sync`] waits for the write that covers it;
    /// readers never wait for sled, and the peer links and providers read
    /// it on async workers after every batch), and the newest deltas of
    /// every log, pushed before the vector shows them and read by log
    /// tailers without sled ([`crate::recent`]).
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) group: Arc<GroupCommit>,
    /// Where group-committed mutations become durable; none in relaxed
    /// mode.
    pub(crate) journal: Option<Arc<Journal>>,
    /// Set when a trim left rows below a watermark to delete.
    pub(crate) sweep_pending: AtomicBool,
    /// Held by whoever deletes trimmed rows.
    pub(crate) sweeper: Mutex<()>,
    /// Log entries removed by the size cap, since open.
    pub(crate) cap_removed: AtomicU64,
    /// The catalog as sled holds it, read again only after a commit that
    /// declared something ([`Store::catalog_changed`]).
    pub(crate) catalog: CatalogCache,
}

/// The catalog kept in memory: the generation it was read at, which every
/// commit that declares something raises once sled holds the declaration.
/// A reader that finds another generation reads sled again; one racing a
/// declaration may keep the older catalog, under the older generation,
/// so the next reader reads again.
#[derive(Default)]
pub(crate) struct CatalogCache {
    pub(crate) generation: AtomicU64,
    pub(crate) cached: Mutex<Option<(u64, Arc<Catalog>)>>,
}

/// State guarded by the writer lock.
pub(crate) struct Writer {
    /// The next local sequence number.
    pub(crate) next_seq: u64,
    /// Entries and bytes in each origin's log.
    pub(crate) logs: BTreeMap<ReplicaId, LogUsage>,
}

/// How much one origin's log holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogUsage {
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .finish()
    }
}

impl Store {
    /// The trees a mutation may touch, in the order its transaction
    /// closure receives them.
    #[allow(clippy::type_complexity)]
    pub(crate) fn data_trees(
        &self,
    ) -> (
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
    ) {
        (
            &self.t.catalog,
            &self.t.values,
            &self.t.rows,
            &self.t.members,
            &self.t.log,
            &self.t.vv,
            &self.t.meta,
        )
    }

    /// The log records of one commit, sized for this store's log cap.
    pub(crate) fn log_runs(&self) -> LogRuns {
        LogRuns::new(runs::run_max_bytes(self.options.max_log_bytes_per_origin))
    }

    pub(crate) fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave the store half-written
        // unnoticed (a sled transaction is atomic; a staged commit cut short
        // stops the journal, and a peer's batch cut short is sent again), so
        // a poisoned lock is still usable.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This store's region.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits writes and deltas are checked against.
    pub fn limits(&self) -> &Limits {
        &self.options.limits
    }

    /// The durability mode.
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// Where blocking work runs.
    pub fn offload(&self) -> Offload {
        self.options.offload
    }

    /// The highest seq of this region's own log that is on disk (in the
    /// journal, or in a sled flush in relaxed mode): own deltas leave the
    /// region only up to it, so a crash can never leave peers holding
    /// writes this region lost.
    pub fn durable_own_seq(&self) -> u64 {
        self.group.durable_own_seq()
    }

    /// A receiver that sees a change whenever [`Store::durable_own_seq`]
    /// rises or a peer's deltas or a snapshot land: what wakes the peers
    /// tailing this region.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.group.changes()
    }

    /// Wakes everything waiting on [`Store::changes`].
    pub fn notify_changed(&self) {
        self.group.notify();
    }

    /// Number of group-commit flushes (journal writes and syncs) so far.
    pub fn flush_count(&self) -> u64 {
        self.group.flushes()
    }

    /// Waits until the writes of `receipt` may be acknowledged to the
    /// client: durable in `group` mode (a local write there is durable
    /// when it returned); at once in `relaxed` mode, which acknowledges
    /// before the disk. Call it inside a tokio runtime: a flush runs where
    /// [`StoreOptions::offload`] says.
    pub async fn durable(&self, receipt: &WriteReceipt) -> Result<()> {
        if self.journal.is_none() {
            return Ok(());
        }
        self.wait_commit(receipt.commit).await
    }

    /// Waits until the writes of `receipt` are on disk, in either mode:
    /// what must hold before they leave the region.
    pub async fn persisted(&self, receipt: &WriteReceipt) -> Result<()> {
        self.wait_commit(receipt.commit).await
    }

    /// Waits until everything committed so far is on disk: afterwards the
    /// version vector read before the call may be acknowledged upstream,
    /// and own deltas up to the seq read before it may be shipped. Flushes
    /// only when something committed is not on disk yet: the journal in
    /// `group` mode, sled itself in `relaxed` mode.
    pub async fn sync(&self) -> Result<()> {
        self.wait_commit(Some(self.group.last_committed())).await
    }

    /// Waits until an applied remote batch is on disk, so it can be
    /// acknowledged upstream.
    pub async fn durable_apply(&self, report: &ApplyReport) -> Result<()> {
        self.wait_commit(report.commit).await
    }

    pub(crate) async fn wait_commit(&self, commit: Option<u64>) -> Result<()> {
        let offload = self.options.offload;
        // A store has a journal exactly in group mode.
        match (&self.journal, commit) {
            (_, None) => Ok(()),
            (Some(journal), Some(n)) => {
                self.group
                    .wait(journal, &self.pipeline, &self.db, n, offload)
                    .await
            }
            (None, Some(n)) => self.group.wait_flushed(&self.db, n, offload).await,
        }
    }

    /// The journal, for tests that break it.
    #[cfg(test)]
    pub(crate) fn journal_for_tests(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Flushes everything to disk now.
    pub fn flush(&self) -> Result<()> {
        self.drain()?;
        self.db.flush()
    }

    /// Writes the journal and every queued local commit to sled now, when
    /// any is queued ([`crate::pipeline`]). Called under the writer lock,
    /// it leaves sled holding every commit so far.
    pub(crate) fn drain(&self) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if self.pipeline.is_empty() {
            return Ok(());
        }
        self.group
            .write_out(journal, &self.pipeline, &self.db, self.options.offload)?;
        Ok(())
    }

    /// Runs a commit's `body`, which reads and writes the data trees:
    /// staged in memory when the store keeps a journal and the commit is
    /// not the journal's replay, its writes returned for
    /// [`Store::commit_staged`]; otherwise in a sled transaction,
    /// committed on return ([`crate::rw`]).
    pub(crate) fn run_data<T>(
        &self,
        kind: CommitKind,
        body: impl Fn(&Data<'_>) -> TxResult<T>,
    ) -> Result<(T, Option<Staging>)> {
        if kind != CommitKind::Replay && self.journal.is_some() {
            let staging = Staging::over(&self.t);
            let out = body(&staging.data()).map_err(|e| match e {
                ConflictableTransactionError::Abort(e) => e,
                ConflictableTransactionError::Storage(e) => StoreError::Sled(e),
                _ => StoreError::Bug("a staged commit reported a conflict".into()),
            })?;
            return Ok((out, Some(staging)));
        }
        let out = self
            .data_trees()
            .transaction(|(catalog, values, rows, members, log, vv, meta)| {
                body(&Data {
                    catalog: Rw::Tx(catalog),
                    values: Rw::Tx(values),
                    rows: Rw::Tx(rows),
                    members: Rw::Tx(members),
                    log: Rw::Tx(log),
                    vv: Rw::Tx(vv),
                    meta: Rw::Tx(meta),
                })
            })
            .map_err(from_tx)?;
        Ok((out, None))
    }

    /// Queues a staged local commit ([`crate::pipeline`]): its deltas go
    /// to the journal with whatever other commits were waiting there, and
    /// its records wait for the journal write that makes them durable.
    /// With [`Journaling::Now`], that write is made now, on this thread, and the commit
    /// is durable and in sled on return. Returns its commit number.
    pub(crate) fn commit_staged(
        &self,
        staging: Staging,
        fresh: Vec<(Delta, Vec<u8>)>,
        journaling: Journaling,
    ) -> Result<u64> {
        let Some(journal) = &self.journal else {
            return Err(StoreError::Bug("a staged commit without a journal".into()));
        };
        journal.check()?;
        let own_seq = fresh.last().map(|(d, _)| d.seq);
        let (deltas, encoded): (Vec<Delta>, Vec<Vec<u8>>) = fresh.into_iter().unzip();
        let queued = deltas
            .into_iter()
            .zip(encoded.iter().map(Vec::len))
            .collect();
        let (n, full) = journal.append(encoded.iter().map(Vec::as_slice), || {
            let n = self.group.committed(own_seq);
            self.pipeline.push(n, staging, queued);
            n
        });
        if journaling == Journaling::Now || full {
            self.group
                .write_out(journal, &self.pipeline, &self.db, self.options.offload)?;
        }
        Ok(n)
    }

    /// Commits a local commit's deltas (`fresh`, none for a batch of
    /// reads and no-ops): a staged one is queued for the journal
    /// ([`Store::commit_staged`]); one a sled transaction already committed
    /// (relaxed mode) is numbered and shown. Returns its commit number,
    /// none when it wrote no delta.
    pub(crate) fn commit_local(
        &self,
        staging: Option<Staging>,
        fresh: Vec<(Delta, Vec<u8>)>,
        journaling: Journaling,
    ) -> Result<Option<u64>> {
        match staging {
            // Nothing to journal: at most the clock's high-water mark
            // changed, which only rises.
            Some(staging) if fresh.is_empty() => {
                staging.apply()?;
                Ok(None)
            }
            Some(staging) => Ok(Some(self.commit_staged(staging, fresh, journaling)?)),
            None if fresh.is_empty() => Ok(None),
            None => {
                let own_seq = fresh.last().map(|(d, _)| d.seq);
                let n = self.commit(fresh.iter().map(|(_, b)| b.as_slice()), own_seq);
                self.pipeline
                    .show(fresh.into_iter().map(|(d, b)| (d, b.len())));
                Ok(Some(n))
            }
        }
    }

    /// Gives a mutation already written to sled its commit number, handing
    /// its encoded deltas to the journal in group mode, for the next write
    /// of the journal (by a staged commit or a durable wait) to take.
    /// Past [`journal::MAX_PENDING_BYTES`] waiting, the committer writes
    /// them itself, blocking: a backstop for callers that never wait for
    /// durability (the node always does).
    pub(crate) fn commit<'a>(
        &self,
        deltas: impl IntoIterator<Item = &'a [u8]>,
        own_seq: Option<u64>,
    ) -> u64 {
        let Some(journal) = &self.journal else {
            return self.group.committed(own_seq);
        };
        let (n, full) = journal.append(deltas, || self.group.committed(own_seq));
        if full {
            // A failure stops the journal, which every durable wait reports.
            if let Err(e) =
                self.group
                    .flush_now(journal, &self.pipeline, &self.db, self.options.offload)
            {
                tracing::warn!(error = %e, "writing the full journal buffer failed");
            }
        }
        n
    }

    /// Records a peer's acknowledged version vector.
    pub fn set_peer_ack(&self, peer: ReplicaId, acked: &VersionVector) -> Result<()> {
        let bytes = postcard::to_stdvec(acked)
            .map_err(|e| StoreError::Bug(format!("encoding ack: {e}")))?;
        self.t.acks.insert(layout::replica_key(peer), bytes)?;
        Ok(())
    }

    /// Raises the persisted HLC high-water mark to `hlc`.
    pub fn raise_hlc_high_water(&self, hlc: Hlc) -> Result<()> {
        let raised = hlc.as_u64().to_be_bytes();
        // Only ever up, whoever else raises it meanwhile.
        self.t.meta.fetch_and_update(meta::HLC, |old| match old {
            Some(old) if old >= &raised[..] => Some(sled::IVec::from(old)),
            _ => Some(sled::IVec::from(&raised[..])),
        })?;
        Ok(())
    }

    /// Tells the catalog cache that sled now holds a new declaration.
    pub(crate) fn catalog_changed(&self) {
        self.catalog.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn lock_applied(&self) -> std::sync::MutexGuard<'_, VersionVector> {
        self.pipeline.lock_applied()
    }

    pub(crate) fn lock_recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.pipeline.lock_recent()
    }

    /// Held while no queued local commit is being written to sled: with
    /// the writer lock, a reader sees every commit whole.
    pub(crate) fn lock_applying(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pipeline.lock_applying()
    }
}
