//! The region store: open, write, apply, read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use concord_core::catalog::KeyspaceView;
use concord_core::crdt::{Field, Stream, StreamCommand, StreamEntry, StreamId, StreamOp};
use concord_core::{
    Access, Catalog, Clock, Command, CoreError, CrdtType, Delta, Hlc, KeyspaceId, Limits, Marker,
    Op, Outcome, ReplicaId, Stamp, Value, VersionVector,
};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::durability::{Durability, GroupCommit};
use crate::error::{Result, StoreError};
use crate::journal::{self, Journal};
use crate::layout::{self, meta, trees, FORMAT_VERSION};
use crate::offload::Offload;
use crate::pipeline::{write_and_apply, Pipeline};
use crate::recent::Recent;
use crate::runs::{self, LogRuns, Run};
use crate::rw::{Data, Rw, Staging};
use crate::sets::{MemberOverlay, TxSet};

/// Who a data directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Region name, e.g. `us-east`.
    pub region: String,
    /// The region's replica id.
    pub replica: ReplicaId,
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When writes are acknowledged.
    pub durability: Durability,
    /// Interval of sled's background flush, in milliseconds.
    pub flush_every_ms: u64,
    /// sled's page cache size, in bytes.
    pub cache_capacity_bytes: u64,
    /// Size limits applied to writes and remote deltas.
    pub limits: Limits,
    /// Most bytes one origin's log may hold; the oldest entries go first
    /// when it is over, acknowledged by peers or not (a peer that needed
    /// them catches up by snapshot). At least `limits.max_delta_bytes`.
    pub max_log_bytes_per_origin: u64,
    /// Where blocking work (the group-commit flush) runs; the node runs its
    /// own store calls there too.
    pub offload: Offload,
    /// Size of the journal's segments ([`crate::journal`]): the first is
    /// [`crate::journal::FIRST_SEGMENT_BYTES`] (or this, when smaller), each
    /// next one twice the one before, up to this. Segments are made at
    /// their full size, zero-filled; when one is full the journal moves to
    /// the next and checkpoints: sled is flushed and the older segments
    /// deleted. At least [`crate::journal::MIN_SEGMENT_BYTES`].
    pub journal_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Group,
            flush_every_ms: 500,
            cache_capacity_bytes: 256 << 20,
            limits: Limits::default(),
            max_log_bytes_per_origin: 256 << 20,
            offload: Offload::Pool,
            journal_segment_bytes: 64 << 20,
        }
    }
}

impl StoreOptions {
    /// Checks the options for consistency.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let delta = self.limits.max_delta_bytes as u64;
        if self.max_log_bytes_per_origin < delta {
            return Err(StoreError::Options(format!(
                "max_log_bytes_per_origin ({}) is below max_delta_bytes ({delta}): one delta would not fit",
                self.max_log_bytes_per_origin
            )));
        }
        if self.flush_every_ms == 0 {
            return Err(StoreError::Options(
                "flush_every_ms must be at least 1".into(),
            ));
        }
        if self.journal_segment_bytes < journal::MIN_SEGMENT_BYTES {
            return Err(StoreError::Options(format!(
                "journal_segment_bytes ({}) is below {}",
                self.journal_segment_bytes,
                journal::MIN_SEGMENT_BYTES
            )));
        }
        Ok(())
    }
}

/// One command of a local batch, on a keyspace the catalog resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The keyspace (name and type, as resolved by the catalog).
    pub keyspace: KeyspaceId,
    /// The key.
    pub key: String,
    /// What to do.
    pub command: Command,
}

impl Item {
    /// `command` on `key` of `keyspace`.
    pub fn new(keyspace: KeyspaceId, key: impl Into<String>, command: Command) -> Item {
        Item {
            keyspace,
            key: key.into(),
            command,
        }
    }
}

/// What a committed local batch returns.
#[derive(Debug)]
pub struct WriteReceipt {
    /// One outcome per item.
    pub results: Vec<Outcome>,
    /// Commit number; pass the receipt to [`Store::durable`].
    commit: Option<u64>,
    /// The highest seq of this region's log the write appended; 0 when it
    /// appended nothing. Once [`Store::durable`] returns, every own delta up
    /// to it is on disk.
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
    commit: Option<u64>,
}

/// A region's durable state.
pub struct Store {
    path: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) t: Trees,
    pub(crate) identity: Identity,
    pub(crate) options: StoreOptions,
    /// Serializes every mutation; holds the next local sequence number
    /// and what each origin's log holds.
    writer: Mutex<Writer>,
    /// Staged local commits on their way to sled, and what shows a commit
    /// once sled has it ([`crate::pipeline`]): the `vv` tree as written,
    /// kept in memory (raised after each commit that raises the tree, and
    /// after that commit got its number, so whoever sees an entry there
    /// and then calls [`Store::sync`] waits for the write that covers it;
    /// readers never wait for sled, and the peer links and providers read
    /// it on async workers after every batch), and the newest deltas of
    /// every log, pushed before the vector shows them and read by log
    /// tailers without sled ([`crate::recent`]).
    pipeline: Arc<Pipeline>,
    pub(crate) group: GroupCommit,
    /// Where group-committed mutations become durable; none in relaxed
    /// mode.
    journal: Option<Arc<Journal>>,
    /// Set when a trim left rows below a watermark to delete.
    pub(crate) sweep_pending: AtomicBool,
    /// Held by whoever deletes trimmed rows.
    pub(crate) sweeper: Mutex<()>,
    /// Log entries removed by the size cap, since open.
    pub(crate) cap_removed: AtomicU64,
    /// The catalog as sled holds it, read again only after a commit that
    /// declared something ([`Store::catalog_changed`]).
    catalog: CatalogCache,
}

/// The catalog kept in memory: the generation it was read at, which every
/// commit that declares something raises once sled holds the declaration.
/// A reader that finds another generation reads sled again; one racing a
/// declaration may keep the older catalog, under the older generation,
/// so the next reader reads again.
#[derive(Default)]
struct CatalogCache {
    generation: AtomicU64,
    cached: Mutex<Option<(u64, Arc<Catalog>)>>,
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

#[derive(Clone)]
pub(crate) struct Trees {
    pub(crate) meta: sled::Tree,
    pub(crate) catalog: sled::Tree,
    pub(crate) values: sled::Tree,
    pub(crate) rows: sled::Tree,
    pub(crate) members: sled::Tree,
    pub(crate) log: sled::Tree,
    pub(crate) vv: sled::Tree,
    pub(crate) acks: sled::Tree,
}

/// The trees a value operation touches inside a transaction: values,
/// stream rows, set members, meta.
pub(crate) type ValueTrees<'a> = (&'a Rw<'a>, &'a Rw<'a>, &'a Rw<'a>, &'a Rw<'a>);

pub(crate) type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

pub(crate) fn abort<T>(e: impl Into<StoreError>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e.into()))
}

pub(crate) fn from_tx(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
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
    /// Opens (or creates) the data directory `path` for region `identity`.
    ///
    /// Refuses, without writing anything, a directory that belongs to
    /// another region, has another format version, or whose records do not
    /// decode.
    pub fn open(path: &Path, identity: Identity, options: StoreOptions) -> Result<Store> {
        options.validate()?;
        let db = open_db(path, &options)?;
        let t = Trees {
            meta: db.open_tree(trees::META)?,
            catalog: db.open_tree(trees::CATALOG)?,
            values: db.open_tree(trees::VALUES)?,
            rows: db.open_tree(trees::STREAM_ROWS)?,
            members: db.open_tree(trees::SET_MEMBERS)?,
            log: db.open_tree(trees::LOG)?,
            vv: db.open_tree(trees::VV)?,
            acks: db.open_tree(trees::ACKS)?,
        };
        match t.meta.get(meta::FORMAT)? {
            None => {
                let has_data = [
                    &t.catalog, &t.values, &t.rows, &t.members, &t.log, &t.vv, &t.acks,
                ]
                .iter()
                .any(|tree| !tree.is_empty());
                if has_data {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds data but no format record",
                        path.display()
                    )));
                }
                let identity_bytes = postcard::to_stdvec(&identity)
                    .map_err(|e| StoreError::Bug(format!("encoding identity: {e}")))?;
                let mut batch = sled::Batch::default();
                batch.insert(meta::IDENTITY, identity_bytes);
                batch.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes());
                t.meta.apply_batch(batch)?;
                db.flush()?;
            }
            Some(format) => {
                let found = <[u8; 4]>::try_from(format.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("format record is not 4 bytes".into()))?;
                if found != FORMAT_VERSION {
                    return Err(StoreError::UnsupportedFormat {
                        path: path.to_path_buf(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                let stored: Identity = t
                    .meta
                    .get(meta::IDENTITY)?
                    .ok_or_else(|| StoreError::Corrupt("identity record missing".into()))
                    .and_then(|b| {
                        postcard::from_bytes(&b)
                            .map_err(|e| StoreError::Corrupt(format!("identity record: {e}")))
                    })?;
                if stored != identity {
                    return Err(StoreError::WrongRegion {
                        path: path.to_path_buf(),
                        region: identity.region,
                        replica: identity.replica,
                        found_region: stored.region,
                        found_replica: stored.replica,
                    });
                }
            }
        }
        let recovered = journal::recover(path)?;
        let mut store = Store {
            path: path.to_path_buf(),
            db,
            t,
            identity,
            options,
            writer: Mutex::new(Writer {
                next_seq: 0,
                logs: BTreeMap::new(),
            }),
            pipeline: Arc::default(),
            group: GroupCommit::new(),
            journal: None,
            sweep_pending: AtomicBool::new(false),
            sweeper: Mutex::new(()),
            cap_removed: AtomicU64::new(0),
            catalog: CatalogCache::default(),
        };
        store.drop_log_tails_past_the_vector()?;
        let replayed = store.replay(&recovered.deltas)?;
        store.catalog_changed();
        if replayed > 0 {
            tracing::info!(
                replayed,
                journaled = recovered.deltas.len(),
                "recovered writes from the journal"
            );
            // The replayed deltas are in sled for good before the journal
            // is removed; the others were in sled's recovered state.
            store.db.flush()?;
        }
        store.journal = match store.options.durability {
            Durability::Group => Some(Arc::new(Journal::start(
                path,
                &recovered,
                store.options.journal_segment_bytes,
            )?)),
            Durability::Relaxed => {
                Journal::remove(path)?;
                None
            }
        };
        let applied = store.read_version_vector()?;
        let last = applied.get(store.identity.replica);
        *store.lock_applied() = applied;
        let logs = store.measure_logs()?;
        let sweeps = store.pending_sweeps()?;
        {
            let mut w = store.lock_writer();
            w.next_seq = last + 1;
            w.logs = logs;
        }
        if !sweeps.is_empty() {
            store.sweep_pending.store(true, Ordering::SeqCst);
        }
        // A directory written by a build with a larger cap, or by one that
        // crashed between a write and its cap enforcement, is brought
        // under the cap before the first write.
        let origins: Vec<ReplicaId> = store.lock_writer().logs.keys().copied().collect();
        store.enforce_log_cap(&mut store.lock_writer(), &origins)?;
        Ok(store)
    }

    /// Removes the log records of every origin above its version vector
    /// entry, before the journal is replayed: what a commit cut short by
    /// a crash left of its log (the entry is written after everything it
    /// covers). Its deltas come back whole from the journal, or for a
    /// peer's batch the journal never took, from the peer; in records
    /// that need not start where these did, so these must not stay.
    fn drop_log_tails_past_the_vector(&self) -> Result<()> {
        let vv = self.read_version_vector()?;
        let mut next = Some(0u32);
        while let Some(origin) = next {
            let Some((k, _)) = self
                .t
                .log
                .range(layout::log_key(ReplicaId(origin), 0)..)
                .next()
                .transpose()?
            else {
                break;
            };
            let origin = layout::parse_replica_key(k.get(..4).unwrap_or(&k))?;
            let above = layout::log_key(origin, vv.get(origin).saturating_add(1));
            let mut dropped = 0usize;
            for key in self
                .t
                .log
                .range(above..=layout::log_key(origin, u64::MAX))
                .keys()
            {
                self.t.log.remove(key?)?;
                dropped += 1;
            }
            if dropped > 0 {
                tracing::warn!(
                    origin = origin.0,
                    records = dropped,
                    "dropped log records a crash left past the version vector"
                );
            }
            next = origin.0.checked_add(1);
        }
        Ok(())
    }

    /// The trees a mutation may touch, in the order its transaction
    /// closure receives them.
    #[allow(clippy::type_complexity)]
    fn data_trees(
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
    fn log_runs(&self) -> LogRuns {
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

    async fn wait_commit(&self, commit: Option<u64>) -> Result<()> {
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
        self.db.flush()?;
        Ok(())
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
        let written = write_and_apply(journal, &self.pipeline)?;
        self.group.written(written, &self.db, self.options.offload);
        Ok(())
    }

    // -----------------------------------------------------------------
    // Mutations.

    /// Declares a keyspace locally: logs and replicates the declaration when
    /// it is new. Returns the keyspace, whether this call declared it, and a
    /// receipt to wait on with [`Store::durable`]; fails when the name is
    /// held by another type.
    pub fn declare(
        &self,
        clock: &Clock,
        name: &str,
        ty: CrdtType,
    ) -> Result<(KeyspaceView, bool, WriteReceipt)> {
        let mut w = self.lock_writer();
        if let Some(view) = self.catalog()?.check_create(name, ty)? {
            let receipt = WriteReceipt {
                results: Vec::new(),
                commit: None,
                last_seq: 0,
            };
            return Ok((view, false, receipt));
        }
        let seq = w.next_seq;
        let delta = Delta {
            origin: self.identity.replica,
            seq,
            hlc: clock.now()?,
            keyspace: name.to_string(),
            key: String::new(),
            op: Op::Declare(ty),
        };
        let bytes = delta.encode_checked(&self.options.limits)?;
        let marker = delta.marker();
        let hwm = clock.last();
        let ((), staging) = self.run_data(true, |data| {
            tx_declare(&data.catalog, name, ty, marker)?;
            let mut runs = self.log_runs();
            runs.push(&data.log, delta.origin, seq, &bytes)?;
            runs.finish(&data.log)?;
            data.vv
                .insert(layout::replica_key(delta.origin), seq.to_be_bytes())?;
            tx_raise_hlc(&data.meta, hwm)?;
            Ok(())
        })?;
        let logged = bytes.len() as u64;
        let commit = match staging {
            Some(staging) => self.commit_staged(staging, vec![(delta, bytes)], true)?,
            None => {
                let commit = self.commit([bytes.as_slice()]);
                self.pipeline.show([(delta, bytes.len())]);
                commit
            }
        };
        w.next_seq = seq + 1;
        self.account_log(&mut w, self.identity.replica, 1, logged);
        self.catalog_changed();
        drop(w);
        let receipt = WriteReceipt {
            results: Vec::new(),
            commit: Some(commit),
            last_seq: seq,
        };
        let view = self
            .catalog()?
            .describe(name)
            .ok_or_else(|| StoreError::Bug(format!("declared {name:?} but cannot read it")))?;
        Ok((view, true, receipt))
    }

    /// Runs a local batch atomically: every write is prepared from the
    /// current value, stamped with its own HLC and sequence number, applied,
    /// logged and recorded in the version vector, all in one commit; reads
    /// see the batch's earlier writes. Either the whole batch commits or
    /// nothing does, across a crash too (module `rw`). In group mode the
    /// batch is durable when this returns.
    pub fn write(&self, clock: &Clock, items: &[Item]) -> Result<WriteReceipt> {
        let mut w = self.lock_writer();
        let (mut receipts, trimmed) = self.write_locked(&mut w, clock, &[items], true)?;
        drop(w);
        self.after_trim(trimmed);
        receipts
            .pop()
            .ok_or_else(|| StoreError::Bug("a write produced no receipt".into()))
    }

    /// Runs independent local batches, each as [`Store::write`] would, in
    /// as few commits as it can: all of them in one when none fails,
    /// which is how concurrent clients share the cost of a commit (in
    /// group mode, its journal write and sync). Each batch stays atomic and
    /// sees the batches before it. When one batch fails (a limit, a type
    /// mismatch, an unknown keyspace), the shared commit is abandoned
    /// before anything of it is written and each batch runs on its own, so
    /// a failing batch never fails the others. The caller bounds how many
    /// items it hands over at once. In group mode the batches are durable
    /// when this returns.
    pub fn write_many(&self, clock: &Clock, batches: &[&[Item]]) -> Vec<Result<WriteReceipt>> {
        self.write_many_then(clock, batches, true)
    }

    /// [`Store::write_many`] without waiting for the journal: in group mode
    /// the batches are staged and queued, and each becomes durable, and
    /// readable, when [`Store::durable`] returns for its receipt; until
    /// then nobody reads it. The writer lock is free again as soon as they
    /// are staged, so a peer's batch need not wait for the journal write
    /// of the local commit before it (module `pipeline`). A batch that
    /// reads ranges or whole sets, trims a stream, or depends on a queued
    /// commit waits for the queue's journal write first, under the lock.
    pub fn stage_many(&self, clock: &Clock, batches: &[&[Item]]) -> Vec<Result<WriteReceipt>> {
        self.write_many_then(clock, batches, false)
    }

    fn write_many_then(
        &self,
        clock: &Clock,
        batches: &[&[Item]],
        wait: bool,
    ) -> Vec<Result<WriteReceipt>> {
        let mut w = self.lock_writer();
        let mut trimmed = false;
        let results = match self.write_locked(&mut w, clock, batches, wait) {
            Ok((receipts, t)) => {
                trimmed = t;
                receipts.into_iter().map(Ok).collect()
            }
            Err(_) if batches.len() > 1 => batches
                .iter()
                .map(|b| {
                    let (mut receipts, t) = self.write_locked(&mut w, clock, &[b], wait)?;
                    trimmed |= t;
                    receipts
                        .pop()
                        .ok_or_else(|| StoreError::Bug("a write produced no receipt".into()))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        };
        drop(w);
        self.after_trim(trimmed);
        results
    }

    /// [`Store::write_many`] with the writer lock held, all batches in one
    /// commit, durable on return when `wait` says so (or when it trims a
    /// stream: the sweep reads sled); also says whether a stream was
    /// trimmed.
    fn write_locked(
        &self,
        w: &mut Writer,
        clock: &Clock,
        batches: &[&[Item]],
        wait: bool,
    ) -> Result<(Vec<WriteReceipt>, bool)> {
        let mut hlcs = Vec::new();
        for item in batches.iter().flat_map(|b| b.iter()) {
            if item.command.is_write() {
                hlcs.push(clock.now()?);
            }
        }
        let hwm = clock.last();
        let me = self.identity.replica;
        let limits = &self.options.limits;
        let first_seq = w.next_seq;
        let items = || batches.iter().flat_map(|b| b.iter());
        let whole_sets: Vec<(&str, &str)> = items()
            .filter(|item| item.command.access() == Access::WholeSet)
            .map(|item| (item.keyspace.name.as_str(), item.key.as_str()))
            .collect();
        // Ranges (and the watermarks bounding them) are read from sled
        // before the commit: it must hold every commit before this one.
        let ranges = items().any(|item| matches!(item.command.access(), Access::Range { .. }));
        if ranges || !whole_sets.is_empty() {
            self.drain()?;
        }
        let row_needs = self.row_needs_of_items(batches)?;
        let mut preloaded = Overlay::preload(&self.t.rows, &row_needs)?;
        preloaded.members = MemberOverlay::preload(&self.t.members, whole_sets)?;
        let body = |data: &Data<'_>| {
            let Data {
                catalog,
                values,
                rows,
                members,
                log,
                vv,
                meta,
            } = data;
            let mut seq = first_seq - 1;
            let mut logged = 0u64;
            let mut fresh = Vec::new();
            let mut trimmed = false;
            let mut overlay = preloaded.clone();
            let mut stamps = hlcs.iter();
            let mut declared: BTreeSet<&KeyspaceId> = BTreeSet::new();
            let mut per_batch = Vec::with_capacity(batches.len());
            let mut runs = self.log_runs();
            for items in batches {
                let batch_first = seq + 1;
                let mut results = Vec::with_capacity(items.len());
                for item in items.iter() {
                    let Item {
                        keyspace,
                        key,
                        command,
                    } = item;
                    if command.crdt_type() != keyspace.ty {
                        return abort(CoreError::TypeMismatch {
                            expected: keyspace.ty,
                            found: command.crdt_type(),
                        });
                    }
                    if !command.is_write() {
                        let value = tx_load(values, members, &overlay, item)?;
                        let reply = command.reply(&value, me, None).or_else(abort)?;
                        results.push(Outcome { write: None, reply });
                        continue;
                    }
                    let Some(&hlc) = stamps.next() else {
                        return abort(StoreError::Bug("missing stamp".into()));
                    };
                    // The catalog cannot change inside the transaction:
                    // each keyspace is looked up once.
                    if !declared.contains(&keyspace)
                        && catalog
                            .get(layout::catalog_key(&keyspace.name, keyspace.ty))?
                            .is_none()
                    {
                        return abort(StoreError::UnknownKeyspace {
                            name: keyspace.name.clone(),
                            ty: keyspace.ty,
                        });
                    }
                    declared.insert(keyspace);
                    if let Err(e) = limits.check_key(key) {
                        return abort(e);
                    }
                    let current = tx_load(values, members, &overlay, item)?;
                    let op = command.prepare(&current, me, hlc, limits).or_else(abort)?;
                    let Some(op) = op else {
                        let stamp = Stamp { seq: 0, hlc };
                        let reply = command.reply(&current, me, Some(stamp)).or_else(abort)?;
                        results.push(Outcome {
                            write: Some(stamp),
                            reply,
                        });
                        continue;
                    };
                    seq += 1;
                    let delta = Delta {
                        origin: me,
                        seq,
                        hlc,
                        keyspace: keyspace.name.clone(),
                        key: key.clone(),
                        op,
                    };
                    let bytes = delta.encode_checked(limits).or_else(abort)?;
                    trimmed |= is_trim(&delta.op);
                    let value = tx_apply(
                        (values, rows, members, meta),
                        &mut overlay,
                        &delta,
                        Some(current),
                    )?;
                    // A reply that cannot be given (a counter leaving the
                    // 64-bit range) fails the batch before any of it is
                    // written.
                    let stamp = Stamp { seq, hlc };
                    let reply = command.reply(&value, me, Some(stamp)).or_else(abort)?;
                    logged += bytes.len() as u64;
                    runs.push(log, me, seq, &bytes)?;
                    fresh.push((delta, bytes));
                    results.push(Outcome {
                        write: Some(stamp),
                        reply,
                    });
                }
                let batch_last = if seq >= batch_first { seq } else { 0 };
                per_batch.push((results, batch_last));
            }
            runs.finish(log)?;
            if seq >= first_seq {
                vv.insert(layout::replica_key(me), seq.to_be_bytes())?;
            }
            tx_raise_hlc(meta, hwm)?;
            Ok((per_batch, seq, logged, trimmed, fresh))
        };
        let queued = self.pipeline.queued();
        let (mut out, mut staging) = self.run_data(true, body)?;
        if staging.as_ref().is_some_and(|s| queued.hold_up(s, false)) {
            // It read records a queued commit wrote: once they are in
            // sled, it runs again (nothing of the first run was kept).
            self.drain()?;
            (out, staging) = self.run_data(true, body)?;
        }
        let (per_batch, last_seq, logged, trimmed, fresh) = out;
        let wrote = last_seq >= first_seq;
        let commit = match (staging, wrote) {
            (Some(staging), true) => Some(self.commit_staged(staging, fresh, wait || trimmed)?),
            // Nothing to journal (a batch of reads and no-ops): at most the
            // clock's high-water mark changed, which only rises.
            (Some(staging), false) => {
                staging.apply()?;
                None
            }
            (None, wrote) => {
                let commit = wrote.then(|| self.commit(fresh.iter().map(|(_, b)| b.as_slice())));
                self.pipeline
                    .show(fresh.into_iter().map(|(d, b)| (d, b.len())));
                commit
            }
        };
        // First, so that nothing after the commit can make a later one
        // reuse its sequence numbers.
        w.next_seq = last_seq + 1;
        if wrote {
            self.account_log(w, me, last_seq + 1 - first_seq, logged);
        }
        let receipts = per_batch
            .into_iter()
            .map(|(results, batch_last)| WriteReceipt {
                results,
                commit: if batch_last > 0 { commit } else { None },
                last_seq: batch_last,
            })
            .collect();
        Ok((receipts, trimmed))
    }

    /// The committed stream rows local batches run in one transaction may
    /// need: for each range read, `count` rows from every lower bound the
    /// stream's watermark can have at that point of the transaction.
    fn row_needs_of_items(&self, batches: &[&[Item]]) -> Result<Vec<RowNeed>> {
        let items = || batches.iter().flat_map(|b| b.iter());
        let mut needs = Vec::new();
        let mut trims: BTreeMap<(String, String), Vec<StreamId>> = BTreeMap::new();
        for item in items() {
            if let Command::Stream(StreamCommand::Trim(before)) = item.command {
                trims
                    .entry((item.keyspace.name.clone(), item.key.clone()))
                    .or_default()
                    .push(before);
            }
        }
        for item in items() {
            let Item {
                keyspace,
                key,
                command,
            } = item;
            if let Access::Range { from, to, count } = command.access() {
                // Another type's range read fails in the transaction; its
                // value is not read here (a set's whole read would take
                // the writer lock this caller holds).
                if keyspace.ty != CrdtType::Stream {
                    continue;
                }
                let committed = match self.get(keyspace, key)? {
                    Value::Stream(s) => s.trimmed_before(),
                    _ => StreamId::MIN,
                };
                let mut lows = vec![committed];
                if let Some(t) = trims.get(&(keyspace.name.clone(), key.clone())) {
                    lows.extend(t.iter().copied());
                }
                for low in lows {
                    needs.push(RowNeed {
                        name: keyspace.name.clone(),
                        key: key.clone(),
                        from: from.max(low),
                        to,
                        limit: count,
                    });
                }
            }
        }
        Ok(needs)
    }

    /// Applies deltas received from a peer, atomically: each `(origin,
    /// seq)` exactly once and in order. Deltas already applied are dropped;
    /// a delta that skips ahead of its origin refuses the whole batch with
    /// [`StoreError::Gap`] and nothing of it is applied. `hwm` is the
    /// node's clock after observing the batch, persisted as the high-water
    /// mark.
    ///
    /// In group mode the batch is staged and written to sled at once,
    /// without waiting for the journal, which takes its deltas for the
    /// next write ([`Store::durable_apply`]), and ahead of queued local
    /// commits it does not depend on (module `pipeline`). Unlike a local
    /// write it needs no write-ahead: its origin holds these deltas
    /// durably, and until this region acknowledges them (only once the
    /// journal has them) the peer sends them again after a crash. Whatever
    /// part of the batch sled kept then, its version vector entries,
    /// written last, cover no more than that, and applying the rest again
    /// is idempotent.
    pub fn apply_remote(&self, deltas: &[Delta], hwm: Hlc) -> Result<ApplyReport> {
        for d in deltas {
            d.validate(&self.options.limits)?;
        }
        let mut w = self.lock_writer();
        // A trim's sweep reads sled, which must hold the commits before it.
        if deltas.iter().any(|d| is_trim(&d.op)) {
            self.drain()?;
        }
        let queued = self.pipeline.queued();
        let (mut out, mut staging) = self.apply_tx(deltas, hwm, false)?;
        if staging.as_ref().is_some_and(|s| queued.hold_up(s, true)) {
            // It would reach sled ahead of queued commits whose records it
            // reads or writes: once they are in sled, it runs again.
            self.drain()?;
            (out, staging) = self.apply_tx(deltas, hwm, false)?;
        }
        let (report, logged, trimmed, encoded) = out;
        if let Some(staging) = staging {
            staging.apply()?;
        }
        if report
            .fresh
            .iter()
            .any(|&i| matches!(deltas[i].op, Op::Declare(_)))
        {
            self.catalog_changed();
        }
        let commit =
            (report.applied > 0).then(|| self.commit(encoded.iter().map(|b| b.as_slice())));
        self.pipeline.show(
            report
                .fresh
                .iter()
                .zip(&encoded)
                .map(|(&i, bytes)| (deltas[i].clone(), bytes.len())),
        );
        for (origin, (entries, bytes)) in logged {
            self.account_log(&mut w, origin, entries, bytes);
        }
        drop(w);
        self.after_trim(trimmed);
        Ok(ApplyReport { commit, ..report })
    }

    /// The commit of [`Store::apply_remote`]: applies `deltas` each at
    /// most once and in per-origin order, and returns what it did, the
    /// entries and bytes logged per origin, whether a stream was trimmed,
    /// the encodings of the deltas applied, and the staged writes for
    /// [`Store::commit_staged`] when it was staged. A `replay` (of the
    /// journal, at open) applies this region's own deltas too, in a sled
    /// transaction: the journal it replays already holds them.
    #[allow(clippy::type_complexity)]
    fn apply_tx(
        &self,
        deltas: &[Delta],
        hwm: Hlc,
        replay: bool,
    ) -> Result<(
        (
            ApplyReport,
            BTreeMap<ReplicaId, (u64, u64)>,
            bool,
            Vec<Vec<u8>>,
        ),
        Option<Staging>,
    )> {
        let me = self.identity.replica;
        self.run_data(!replay, |data| {
            let Data {
                catalog,
                values,
                rows,
                members,
                log,
                vv,
                meta,
            } = data;
            let mut report = ApplyReport::default();
            let mut seen: BTreeMap<ReplicaId, u64> = BTreeMap::new();
            let mut logged: BTreeMap<ReplicaId, (u64, u64)> = BTreeMap::new();
            let mut trimmed = false;
            let mut overlay = Overlay::default();
            let mut encoded = Vec::new();
            let mut runs = self.log_runs();
            for (position, d) in deltas.iter().enumerate() {
                let applied = match seen.get(&d.origin) {
                    Some(&s) => s,
                    None => tx_vv_get(vv, d.origin)?,
                };
                if d.seq <= applied {
                    report.duplicates += 1;
                    continue;
                }
                if d.origin == me && !replay {
                    return abort(StoreError::OwnDeltaAhead {
                        seq: d.seq,
                        local: applied,
                    });
                }
                if d.seq != applied + 1 {
                    return abort(StoreError::Gap {
                        origin: d.origin,
                        expected: applied + 1,
                        got: d.seq,
                    });
                }
                match &d.op {
                    Op::Declare(ty) => tx_declare(catalog, &d.keyspace, *ty, d.marker())?,
                    _ => {
                        trimmed |= is_trim(&d.op);
                        tx_apply((values, rows, members, meta), &mut overlay, d, None)?;
                    }
                }
                let bytes = d.encode();
                let entry = logged.entry(d.origin).or_default();
                entry.0 += 1;
                entry.1 += bytes.len() as u64;
                runs.push(log, d.origin, d.seq, &bytes)?;
                encoded.push(bytes);
                seen.insert(d.origin, d.seq);
                report.applied += 1;
                report.fresh.push(position);
            }
            runs.finish(log)?;
            for (origin, seq) in &seen {
                vv.insert(layout::replica_key(*origin), seq.to_be_bytes())?;
            }
            if report.applied > 0 {
                tx_raise_hlc(meta, hwm)?;
            }
            Ok((report, logged, trimmed, encoded))
        })
    }

    /// Runs a commit's `body`, which reads and writes the data trees:
    /// staged in memory when `staged` is asked for and the store keeps a
    /// journal, its writes returned for [`Store::commit_staged`]; otherwise
    /// in a sled transaction, committed on return ([`crate::rw`]).
    fn run_data<T>(
        &self,
        staged: bool,
        body: impl Fn(&Data<'_>) -> TxResult<T>,
    ) -> Result<(T, Option<Staging>)> {
        if staged && self.journal.is_some() {
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
    /// With `wait`, that write is made now, on this thread, and the commit
    /// is durable and in sled on return. Returns its commit number.
    fn commit_staged(
        &self,
        staging: Staging,
        fresh: Vec<(Delta, Vec<u8>)>,
        wait: bool,
    ) -> Result<u64> {
        let Some(journal) = &self.journal else {
            return Err(StoreError::Bug("a staged commit without a journal".into()));
        };
        journal.check()?;
        let (deltas, encoded): (Vec<Delta>, Vec<Vec<u8>>) = fresh.into_iter().unzip();
        let queued = deltas
            .into_iter()
            .zip(encoded.iter().map(Vec::len))
            .collect();
        let (n, full) = journal.append(encoded.iter().map(Vec::as_slice), || {
            let n = self.group.committed();
            self.pipeline.push(n, staging, queued);
            n
        });
        if wait || full {
            let written = write_and_apply(journal, &self.pipeline)?;
            self.group.written(written, &self.db, self.options.offload);
        }
        Ok(n)
    }

    /// Applies the journal's deltas at open, in chunks of
    /// [`REPLAY_CHUNK_DELTAS`]; returns how many were not in sled yet.
    /// Nothing is journaled again: the caller flushes sled afterwards.
    fn replay(&self, deltas: &[Delta]) -> Result<usize> {
        let mut replayed = 0;
        for chunk in deltas.chunks(REPLAY_CHUNK_DELTAS) {
            let hwm = chunk.iter().map(|d| d.hlc).max().unwrap_or(Hlc::ZERO);
            let ((report, ..), _) = self.apply_tx(chunk, hwm, true).map_err(|e| match e {
                StoreError::Gap {
                    origin,
                    expected,
                    got,
                } => StoreError::Corrupt(format!(
                    "the journal holds delta {got} of replica {origin}, but the store's next is {expected}: the journal misses deltas"
                )),
                other => other,
            })?;
            replayed += report.applied;
        }
        Ok(replayed)
    }

    /// Gives a mutation already written to sled its commit number, handing
    /// its encoded deltas to the journal in group mode, for the next write
    /// of the journal (by a staged commit or a durable wait) to take.
    /// Past [`journal::MAX_PENDING_BYTES`] waiting, the committer writes
    /// them itself, blocking: a backstop for callers that never wait for
    /// durability (the node always does).
    fn commit<'a>(&self, deltas: impl IntoIterator<Item = &'a [u8]>) -> u64 {
        let Some(journal) = &self.journal else {
            return self.group.committed();
        };
        let (n, full) = journal.append(deltas, || self.group.committed());
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

    // -----------------------------------------------------------------
    // Reads.

    /// The value of one key; empty for a key never written. For a stream
    /// the value holds only the trim watermark: see [`Store::stream_range`].
    pub fn get(&self, keyspace: &KeyspaceId, key: &str) -> Result<Value> {
        let vkey = layout::value_key(keyspace, key);
        if keyspace.ty == CrdtType::Set {
            return Ok(Value::Set(self.whole_set(&keyspace.name, key, &vkey)?.0));
        }
        match self.t.values.get(vkey)? {
            None => Ok(Value::empty(keyspace.ty)),
            Some(bytes) => decode_value(&bytes, keyspace.ty),
        }
    }

    /// Runs one read on its own, without the writer: what its [`Access`]
    /// names, read from sled as the last commit left it (a set under the
    /// writer lock, so that its header and members are of one commit),
    /// and the reply. A write is refused: it must go through
    /// [`Store::write`] and its kin.
    pub fn read(&self, item: &Item) -> Result<Outcome> {
        let Item {
            keyspace,
            key,
            command,
        } = item;
        if command.is_write() {
            return Err(StoreError::Bug(format!(
                "{command:?} is a write, not a read"
            )));
        }
        if command.crdt_type() != keyspace.ty {
            return Err(StoreError::Core(CoreError::TypeMismatch {
                expected: keyspace.ty,
                found: command.crdt_type(),
            }));
        }
        let value = match command.access() {
            Access::Value | Access::WholeSet => self.get(keyspace, key)?,
            Access::Members(named) => {
                let vkey = layout::value_key(keyspace, key);
                Value::Set(self.set_slice(&keyspace.name, key, &vkey, named)?)
            }
            Access::Range { from, to, count } => {
                let watermark = self.stream_watermark(keyspace, key)?;
                let entries =
                    self.rows_from(&keyspace.name, key, from.max(watermark), to, count)?;
                Value::Stream(Stream::from_parts(
                    watermark,
                    entries.into_iter().map(|e| (e.id, e.fields)),
                ))
            }
        };
        let reply = command.reply(&value, self.identity.replica, None)?;
        Ok(Outcome { write: None, reply })
    }

    /// Stream entries with `from <= id <= to`, in id order, at most `count`.
    pub fn stream_range(
        &self,
        keyspace: &KeyspaceId,
        key: &str,
        from: StreamId,
        to: StreamId,
        count: usize,
    ) -> Result<Vec<StreamEntry>> {
        let watermark = self.stream_watermark(keyspace, key)?;
        self.rows_from(&keyspace.name, key, from.max(watermark), to, count)
    }

    /// A stream's trim watermark; a type mismatch for other keyspaces.
    fn stream_watermark(&self, keyspace: &KeyspaceId, key: &str) -> Result<StreamId> {
        match self.get(keyspace, key)? {
            Value::Stream(s) => Ok(s.trimmed_before()),
            other => Err(CoreError::TypeMismatch {
                expected: other.crdt_type(),
                found: CrdtType::Stream,
            }
            .into()),
        }
    }

    /// Committed rows of one stream with `from <= id <= to`, at most `count`.
    fn rows_from(
        &self,
        name: &str,
        key: &str,
        from: StreamId,
        to: StreamId,
        count: usize,
    ) -> Result<Vec<StreamEntry>> {
        let Some(range) = layout::row_range(name, key, from, to) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.t.rows.range(range).take(count) {
            let (k, v) = item?;
            out.push(decode_row(&k, &v)?);
        }
        Ok(out)
    }

    /// A stream with its entries, for tests and snapshots of small streams.
    pub fn stream(&self, keyspace: &KeyspaceId, key: &str) -> Result<Stream> {
        let watermark = self.stream_watermark(keyspace, key)?;
        let entries = self.rows_from(&keyspace.name, key, watermark, StreamId::MAX, usize::MAX)?;
        Ok(Stream::from_parts(
            watermark,
            entries.into_iter().map(|e| (e.id, e.fields)),
        ))
    }

    /// Keys of a keyspace after `after` (exclusive), in key byte order, with
    /// their values, at most `max_keys`: iterate a keyspace in bounded
    /// chunks.
    pub fn scan(
        &self,
        keyspace: &KeyspaceId,
        after: Option<&str>,
        max_keys: usize,
    ) -> Result<Vec<(String, Value)>> {
        let prefix = layout::keyspace_prefix(keyspace);
        let start = match after {
            Some(k) => {
                let mut s = layout::value_key(keyspace, k);
                s.push(0);
                s
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for item in self.t.values.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= max_keys {
                break;
            }
            let key = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| StoreError::Corrupt("stored key is not UTF-8".into()))?;
            let value = match keyspace.ty {
                CrdtType::Set => Value::Set(self.whole_set(&keyspace.name, key, &k)?.0),
                ty => decode_value(&v, ty)?,
            };
            out.push((key.to_string(), value));
        }
        Ok(out)
    }

    /// The keyspace catalog.
    pub fn catalog(&self) -> Result<Arc<Catalog>> {
        let generation = self.catalog.generation.load(Ordering::SeqCst);
        let mut cached = self
            .catalog
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((at, catalog)) = cached.as_ref() {
            if *at == generation {
                return Ok(catalog.clone());
            }
        }
        let fresh = Arc::new(self.read_catalog()?);
        *cached = Some((generation, fresh.clone()));
        Ok(fresh)
    }

    /// Tells the catalog cache that sled now holds a new declaration.
    pub(crate) fn catalog_changed(&self) {
        self.catalog.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn read_catalog(&self) -> Result<Catalog> {
        let mut catalog = Catalog::new();
        for item in self.t.catalog.iter() {
            let (k, v) = item?;
            let (name, ty) = layout::parse_catalog_key(&k)?;
            let marker: Marker = postcard::from_bytes(&v)
                .map_err(|e| StoreError::Corrupt(format!("catalog marker of {name:?}: {e}")))?;
            catalog.declare(&name, ty, marker);
        }
        Ok(catalog)
    }

    /// The highest seq of `origin` this region has applied.
    pub fn applied(&self, origin: ReplicaId) -> Result<u64> {
        Ok(self.lock_applied().get(origin))
    }

    /// What this region has applied, per origin. Read from memory: it
    /// never waits for a running transaction.
    pub fn version_vector(&self) -> Result<VersionVector> {
        Ok(self.lock_applied().clone())
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

    /// [`Store::log_from`] from memory only: the newest deltas of
    /// `origin`'s log from `from_seq` on, when `from_seq` is among the
    /// deltas kept in memory; `None` when the log itself must be read.
    /// Never waits for sled, so it may be called on an async worker.
    pub fn recent_log_from(
        &self,
        origin: ReplicaId,
        from_seq: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Option<Vec<Delta>> {
        if max_count == 0 {
            return Some(Vec::new());
        }
        self.lock_recent()
            .from(origin, from_seq.max(1), max_count, max_bytes)
    }

    /// The `vv` tree as stored.
    fn read_version_vector(&self) -> Result<VersionVector> {
        let mut vv = VersionVector::new();
        for item in self.t.vv.iter() {
            let (k, v) = item?;
            vv.advance(
                layout::parse_replica_key(&k)?,
                layout::parse_u64("vv entry", &v)?,
            );
        }
        Ok(vv)
    }

    /// Deltas of `origin` from `from_seq` on, in order, at most `max_count`
    /// and about `max_bytes` (at least one delta if any is there). Fails
    /// with [`StoreError::Truncated`] when the log no longer starts at or
    /// below `from_seq` although this region has applied it: the reader
    /// must catch up by snapshot.
    pub fn log_from(
        &self,
        origin: ReplicaId,
        from_seq: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delta>> {
        let from_seq = from_seq.max(1);
        if let Some(recent) = self.recent_log_from(origin, from_seq, max_count, max_bytes) {
            return Ok(recent);
        }
        // Read before the log: every seq up to `applied` was in the log
        // when it was read, so only a truncation can have removed one.
        let applied = self.applied(origin)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // The record holding `from_seq` starts at or below it.
        let start = match self
            .t
            .log
            .range(layout::log_key(origin, 0)..=layout::log_key(origin, from_seq))
            .next_back()
            .transpose()?
        {
            Some((k, _)) => k.to_vec(),
            None => layout::log_key(origin, from_seq).to_vec(),
        };
        'records: for item in self
            .t
            .log
            .range(start..=layout::log_key(origin, u64::MAX).to_vec())
        {
            let (k, v) = item?;
            let run = Run::parse(origin, &k, &v)?;
            for (seq, encoded) in (run.first..).zip(&run.deltas) {
                if seq < from_seq {
                    continue;
                }
                if out.len() >= max_count || (!out.is_empty() && bytes + encoded.len() > max_bytes)
                {
                    break 'records;
                }
                bytes += encoded.len();
                let delta = Delta::decode(encoded, &self.options.limits)
                    .map_err(|e| StoreError::Corrupt(format!("log of replica {origin}: {e}")))?;
                if delta.origin != origin || delta.seq != seq {
                    return Err(StoreError::Corrupt(format!(
                        "log of replica {origin}: delta {} of replica {} where seq {seq} belongs",
                        delta.seq, delta.origin
                    )));
                }
                out.push(delta);
            }
        }
        // Logs are contiguous runs ending at the version vector's entry, so
        // anything but `from_seq` first means the entries asked for were
        // truncated, possibly while we read.
        let first = out.first().map(|d| d.seq);
        if first != Some(from_seq) && from_seq <= applied {
            return Err(StoreError::Truncated {
                origin,
                requested: from_seq,
                floor: self.log_floor(origin)?,
            });
        }
        Ok(out)
    }

    /// Every peer's acknowledged version vector.
    pub fn peer_acks(&self) -> Result<BTreeMap<ReplicaId, VersionVector>> {
        let mut out = BTreeMap::new();
        for item in self.t.acks.iter() {
            let (k, v) = item?;
            let vv: VersionVector = postcard::from_bytes(&v)
                .map_err(|e| StoreError::Corrupt(format!("peer ack: {e}")))?;
            out.insert(layout::parse_replica_key(&k)?, vv);
        }
        Ok(out)
    }

    /// The persisted HLC high-water mark: restart the clock above it.
    pub fn hlc_high_water(&self) -> Result<Hlc> {
        match self.t.meta.get(meta::HLC)? {
            None => Ok(Hlc::ZERO),
            Some(v) => Ok(Hlc::from_u64(layout::parse_u64("hlc record", &v)?)),
        }
    }
}

/// Most journal deltas replayed in one transaction at open.
const REPLAY_CHUNK_DELTAS: usize = 1_000;

/// How many times, and how far apart, opening retries a directory whose
/// lock is still held: sled releases it a moment after the previous `Db` in
/// this process is dropped (its background threads hold it until they
/// stop), so a close followed by an open must wait a little.
const OPEN_LOCK_ATTEMPTS: u32 = 100;
const OPEN_LOCK_RETRY_MS: u64 = 20;

fn open_db(path: &Path, options: &StoreOptions) -> Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .flush_every_ms(Some(options.flush_every_ms))
        .cache_capacity(options.cache_capacity_bytes);
    let mut attempt = 1;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && attempt < OPEN_LOCK_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(OPEN_LOCK_RETRY_MS));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::InUse {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
            other => return Ok(other?),
        }
    }
}

/// Decodes a `values` record of a keyspace of type `ty`. For a set that is
/// its header only: a set without members (see [`crate::sets`]).
pub(crate) fn decode_value(bytes: &[u8], ty: CrdtType) -> Result<Value> {
    if ty == CrdtType::Set {
        let header = crate::sets::decode_header(bytes)?;
        return Ok(Value::Set(crate::sets::from_parts(header, [])?));
    }
    let value = Value::decode(bytes).map_err(|e| StoreError::Corrupt(format!("value: {e}")))?;
    if value.crdt_type() != ty {
        return Err(StoreError::Corrupt(format!(
            "a {} value is stored under a {ty} keyspace",
            value.crdt_type()
        )));
    }
    Ok(value)
}

/// A key's `values` record inside a transaction (for a set, its header
/// only: see [`decode_value`]).
/// What `item`'s command needs of its key's value ([`Access`]), read
/// inside the commit: the value record, a slice of a set or the whole
/// set, or a stream's watermark with the entries of a range.
fn tx_load(values: &Rw<'_>, members: &Rw<'_>, overlay: &Overlay, item: &Item) -> TxResult<Value> {
    let Item { keyspace, key, .. } = item;
    match item.command.access() {
        Access::Value => tx_value(values, keyspace, key),
        Access::Members(named) => Ok(Value::Set(
            TxSet::of(keyspace, key).slice(values, members, named)?.0,
        )),
        Access::WholeSet => Ok(Value::Set(TxSet::of(keyspace, key).whole(values, overlay)?)),
        Access::Range { from, to, count } => {
            let watermark = match tx_value(values, keyspace, key)? {
                Value::Stream(s) => s.trimmed_before(),
                other => {
                    return abort(CoreError::TypeMismatch {
                        expected: other.crdt_type(),
                        found: CrdtType::Stream,
                    })
                }
            };
            let entries = overlay
                .range(&keyspace.name, key, from.max(watermark), to, count)
                .or_else(abort)?;
            Ok(Value::Stream(Stream::from_parts(
                watermark,
                entries.into_iter().map(|e| (e.id, e.fields)),
            )))
        }
    }
}

pub(crate) fn tx_value(values: &Rw<'_>, ks: &KeyspaceId, key: &str) -> TxResult<Value> {
    match values.get(layout::value_key(ks, key))? {
        None => Ok(Value::empty(ks.ty)),
        Some(bytes) => decode_value(&bytes, ks.ty).or_else(abort),
    }
}

fn tx_vv_get(vv: &Rw<'_>, origin: ReplicaId) -> TxResult<u64> {
    match vv.get(layout::replica_key(origin))? {
        None => Ok(0),
        Some(v) => layout::parse_u64("vv entry", &v).or_else(abort),
    }
}

pub(crate) fn tx_declare(
    catalog: &Rw<'_>,
    name: &str,
    ty: CrdtType,
    marker: Marker,
) -> TxResult<()> {
    let key = layout::catalog_key(name, ty);
    let keep = match catalog.get(&key)? {
        Some(existing) => {
            let existing: Marker = match postcard::from_bytes(&existing) {
                Ok(m) => m,
                Err(e) => return abort(StoreError::Corrupt(format!("catalog marker: {e}"))),
            };
            existing.min(marker)
        }
        None => marker,
    };
    match postcard::to_stdvec(&keep) {
        Ok(bytes) => {
            catalog.insert(key, bytes)?;
            Ok(())
        }
        Err(e) => abort(StoreError::Bug(format!("encoding marker: {e}"))),
    }
}

pub(crate) fn tx_raise_hlc(meta: &Rw<'_>, hwm: Hlc) -> TxResult<()> {
    let current = match meta.get(meta::HLC)? {
        None => 0,
        Some(v) => layout::parse_u64("hlc record", &v).or_else(abort)?,
    };
    if hwm.as_u64() > current {
        meta.insert(meta::HLC, hwm.as_u64().to_be_bytes())?;
    }
    Ok(())
}

/// Applies a value operation inside a transaction and returns the value
/// after it (for streams, the watermark only; for sets, the members it
/// touched). `current` is the key's `values` record when the caller has
/// just read it in this transaction (a set reads its own slice).
fn tx_apply(
    (values, rows, members, meta): ValueTrees<'_>,
    overlay: &mut Overlay,
    d: &Delta,
    current: Option<Value>,
) -> TxResult<Value> {
    let Some(ty) = d.op.crdt_type() else {
        return abort(CoreError::Invalid {
            what: "operation",
            reason: "a declaration is not a value operation".into(),
        });
    };
    let ks = KeyspaceId {
        name: d.keyspace.clone(),
        ty,
    };
    let vkey = layout::value_key(&ks, &d.key);
    let mut value = match current {
        Some(value) => value,
        None => tx_value(values, &ks, &d.key)?,
    };
    match (&mut value, &d.op) {
        (Value::Stream(stream), Op::Stream(StreamOp::Append { fields })) => {
            let id = StreamId::new(d.hlc, d.origin);
            if id >= stream.trimmed_before() {
                tx_put_row(rows, overlay, &d.keyspace, &d.key, id, fields)?;
            }
            // The watermark record exists from the first write on. An
            // append does not change it, so it is written only once:
            // appends to one stream from several regions then touch no
            // common record, and a peer's append need not wait for a
            // queued local one ([`crate::pipeline`]).
            if values.get(&vkey)?.is_none() {
                values.insert(vkey, value.encode())?;
            }
        }
        (Value::Stream(stream), Op::Stream(StreamOp::Trim { before })) => {
            tx_raise_watermark(values, meta, &d.keyspace, &d.key, stream, *before)?;
        }
        (Value::Set(_), Op::Set(op)) => {
            let set = TxSet::of(&ks, &d.key);
            let (mut slice, needed) = set.slice(values, members, op.members())?;
            if let Err(e) = slice.apply(d.origin, op) {
                return abort(e);
            }
            set.store(values, members, overlay, &slice, &needed)?;
            value = Value::Set(slice);
        }
        _ => {
            if let Err(e) = value.apply(d.origin, d.hlc, &d.op) {
                return abort(e);
            }
            values.insert(vkey, value.encode())?;
        }
    }
    Ok(value)
}

/// Writes one stream entry inside a transaction. An entry with the same
/// id seen again is the same append delivered twice; should a broken peer
/// send other fields under that id, the greater fields are kept everywhere
/// so that replicas cannot diverge.
pub(crate) fn tx_put_row(
    rows: &Rw<'_>,
    overlay: &mut Overlay,
    name: &str,
    key: &str,
    id: StreamId,
    fields: &[Field],
) -> TxResult<()> {
    let rk = layout::row_key(name, key, id);
    if let Some(existing) = rows.get(&rk)? {
        let existing: Vec<Field> = match postcard::from_bytes(&existing) {
            Ok(f) => f,
            Err(e) => return abort(StoreError::Corrupt(format!("stream entry: {e}"))),
        };
        if fields <= existing.as_slice() {
            return Ok(());
        }
    }
    let bytes = match postcard::to_stdvec(fields) {
        Ok(b) => b,
        Err(e) => return abort(StoreError::Bug(format!("encoding entry: {e}"))),
    };
    rows.insert(rk.clone(), bytes.clone())?;
    overlay.inserted.insert(rk, bytes);
    Ok(())
}

/// Raises a stream's trim watermark inside a transaction (no-op when
/// `before` is not above it) and records the rows below it for the sweep.
/// Rows below the watermark are invisible from this commit on (every read
/// and append checks the watermark), so they can be deleted afterwards in
/// bounded chunks instead of in this transaction, whose size would grow
/// with the stream.
pub(crate) fn tx_raise_watermark(
    values: &Rw<'_>,
    meta: &Rw<'_>,
    name: &str,
    key: &str,
    stream: &mut Stream,
    before: StreamId,
) -> TxResult<()> {
    if before > stream.trimmed_before() {
        *stream = Stream::from_parts(before, std::iter::empty());
        meta.insert(
            layout::sweep_key(name, key),
            layout::row_key(name, key, before),
        )?;
    }
    let ks = KeyspaceId {
        name: name.to_string(),
        ty: CrdtType::Stream,
    };
    values.insert(
        layout::value_key(&ks, key),
        Value::Stream(stream.clone()).encode(),
    )?;
    Ok(())
}

pub(crate) fn is_trim(op: &Op) -> bool {
    matches!(op, Op::Stream(StreamOp::Trim { .. }))
}

/// Stream rows as the current transaction sees them: the committed rows
/// it needs, read before the transaction started (sled transactions cannot
/// scan, and a scan inside one would deadlock on sled's concurrency lock),
/// with the transaction's own inserts laid over them. The committed rows
/// cannot change meanwhile: every mutation holds the writer lock (the sweep
/// deletes only rows below a committed watermark, which no read returns).
#[derive(Default, Clone)]
pub(crate) struct Overlay {
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) inserted: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The same for the members of sets read whole.
    pub(crate) members: MemberOverlay,
}

/// A range of one stream's committed rows a transaction will need.
struct RowNeed {
    name: String,
    key: String,
    from: StreamId,
    to: StreamId,
    /// Most rows to read from `from` on.
    limit: usize,
}

impl Overlay {
    /// Reads the committed rows `needs` asks for.
    fn preload(committed: &sled::Tree, needs: &[RowNeed]) -> Result<Overlay> {
        let mut overlay = Overlay::default();
        for need in needs {
            let Some(range) = layout::row_range(&need.name, &need.key, need.from, need.to) else {
                continue;
            };
            for item in committed.range(range).take(need.limit) {
                let (k, v) = item?;
                overlay.committed.insert(k.to_vec(), v.to_vec());
            }
        }
        Ok(overlay)
    }

    /// Entries with `from <= id <= to`, at most `count`.
    fn range(
        &self,
        name: &str,
        key: &str,
        from: StreamId,
        to: StreamId,
        count: usize,
    ) -> Result<Vec<StreamEntry>> {
        let Some(range) = layout::row_range(name, key, from, to) else {
            return Ok(Vec::new());
        };
        let mut rows: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
        for (k, v) in self.committed.range(range.clone()) {
            rows.insert(k, v);
        }
        for (k, v) in self.inserted.range(range) {
            rows.insert(k, v);
        }
        rows.into_iter()
            .take(count)
            .map(|(k, v)| decode_row(k, v))
            .collect()
    }
}

pub(crate) fn decode_row(k: &[u8], v: &[u8]) -> Result<StreamEntry> {
    let fields: Vec<Field> =
        postcard::from_bytes(v).map_err(|e| StoreError::Corrupt(format!("stream entry: {e}")))?;
    Ok(StreamEntry {
        id: layout::parse_row_id(k)?,
        fields,
    })
}
