//! Opening a region's data directory: its identity and format checks,
//! the store's options, recovery from the journal, and sled's own opening.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use concord_core::ReplicaId;

use crate::disk::Db;
use crate::durability::{Durability, GroupCommit};
use crate::error::{Result, StoreError};
use crate::journal::{self, Journal};
use crate::layout::{self, meta, trees, FORMAT_VERSION};
use crate::options::{Identity, StoreOptions};
use crate::rw::Trees;
use crate::store::{CatalogCache, Store, Writer};

/// How many times, and how far apart, opening retries a directory whose
/// lock is still held: sled releases it a moment after the previous `Db` in
/// this process is dropped (its background threads hold it until they
/// stop), so a close followed by an open must wait a little.
pub(crate) const OPEN_LOCK_ATTEMPTS: u32 = 100;

pub(crate) const OPEN_LOCK_RETRY_MS: u64 = 20;

pub(crate) fn open_db(path: &Path, options: &StoreOptions) -> Result<sled::Db> {
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

impl Store {
    /// Opens (or creates) the data directory `path` for region `identity`.
    ///
    /// Refuses, without writing anything, a directory that belongs to
    /// another region, has another format version, or whose records do not
    /// decode.
    pub fn open(path: &Path, identity: Identity, options: StoreOptions) -> Result<Store> {
        options.validate()?;
        let db = Db::new(open_db(path, &options)?, options.disk.clone(), path);
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
        let recovered = journal::recover(&*options.disk, path)?;
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
            group: Arc::new(GroupCommit::new()),
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
        }
        // Everything the journal holds is in sled for good before its
        // segments are removed: the replayed deltas, and the others, which
        // were in sled's recovered state, perhaps only in the operating
        // system's cache (a process crash leaves them there): a flush
        // alone would not write them again.
        store.db.sync_all()?;
        store.journal = match store.options.durability {
            Durability::Group => Some(Arc::new(Journal::start(
                store.options.disk.clone(),
                path,
                &recovered,
                store.options.journal_segment_bytes,
            )?)),
            Durability::Relaxed => {
                Journal::remove(&*store.options.disk, path)?;
                None
            }
        };
        let applied = store.read_version_vector()?;
        let last = applied.get(store.identity.replica);
        store.group.raise_own_to(last);
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
    pub(crate) fn drop_log_tails_past_the_vector(&self) -> Result<()> {
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
}
