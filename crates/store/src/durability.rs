//! Group commit.
//!
//! Every committed mutation gets a commit number. In `group` mode a
//! commit is durable once the journal frame holding its deltas has been
//! written and synced, and a write publishes the highest number it
//! covered.
//!
//! - A local write (the node's writer hands every client batch waiting
//!   for it to the store at once) is staged and queued; its records reach
//!   sled after the journal write that makes it durable (module
//!   `pipeline`). [`crate::Store::write`] makes that write itself and
//!   returns durable; the node's writer stages and moves on, and each
//!   client waits.
//! - A peer's batch is written to sled first and its deltas wait in the
//!   journal's buffer.
//! - The first caller to wait for a number not yet published (a client,
//!   a peer link before it acknowledges) and find no write running writes
//!   whatever is pending, once, and the queued commits it made durable;
//!   the others wait for it.
//!
//! Waiting runs on whatever tokio runtime the caller uses, the
//! simulator's included; a waiter's write runs where the store's
//! [`Offload`] says. When a write fills a journal segment, whoever made it
//! also starts a checkpoint (a sled flush, detached from every waiter);
//! when it takes a segment past half its size, the preparation of the
//! next segment (detached too).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex, MutexGuard};

use crate::disk::Db;
use crate::error::{Result, StoreError};
use crate::journal::{Journal, Written};
use crate::offload::Offload;
use crate::pipeline::{write_and_apply, Pipeline};

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After a disk flush shared by concurrent writes (the default).
    #[default]
    Group,
    /// Before the flush: sled's background flush makes it durable within
    /// `flush_every_ms`; a crash may lose writes acknowledged in that
    /// window. Nothing leaves the region before it is on disk, so what a
    /// crash loses is lost in every region alike.
    Relaxed,
}

/// Least time between the starts of two sled flushes that make a
/// relaxed store's commits durable (see [`crate::Store::sync`]).
pub const RELAXED_FLUSH_SPACING: std::time::Duration = std::time::Duration::from_millis(20);

/// Commit numbers and the flush that makes them durable.
pub(crate) struct GroupCommit {
    committed: AtomicU64,
    durable: watch::Sender<u64>,
    flusher: Mutex<()>,
    flushes: AtomicU64,
    /// When the last sled flush of a relaxed store started.
    sled_flushed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Which commits carry this region's own deltas, and how far those
    /// are durable: the one durability signal the node reads.
    own: std::sync::Mutex<OwnCommits>,
    /// Bumped when the durable own seq rises, and when a peer's deltas
    /// or a snapshot land ([`GroupCommit::notify`]): wakes whatever tails
    /// this region.
    changes: watch::Sender<u64>,
}

/// This region's own deltas between their commit and their durability.
#[derive(Default)]
struct OwnCommits {
    /// Commit number to the last own seq it wrote, for commits not yet
    /// published durable.
    pending: BTreeMap<u64, u64>,
    /// The highest own seq known durable.
    durable_seq: u64,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The flush leader's hold on the flush lock. When dropped it first
/// releases the lock and then publishes "something changed", so every
/// waiter re-checks after the lock is free: a waiter woken while the lock
/// was still held would find it taken and wait for a wake-up that never
/// comes. Dropping covers a failed flush and a leader future dropped
/// half-way alike.
struct Leader<'a> {
    lock: Option<MutexGuard<'a, ()>>,
    durable: &'a watch::Sender<u64>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.lock.take();
        self.durable.send_modify(|_| {});
    }
}

impl GroupCommit {
    pub(crate) fn new() -> Self {
        GroupCommit {
            committed: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            flusher: Mutex::new(()),
            flushes: AtomicU64::new(0),
            sled_flushed_at: std::sync::Mutex::new(None),
            own: std::sync::Mutex::new(OwnCommits::default()),
            changes: watch::Sender::new(0),
        }
    }

    /// Records a committed mutation and returns its commit number;
    /// `own_seq` is the last of this region's own deltas it wrote, if any.
    /// Call it after the transaction committed, under the writer lock
    /// (and, in group mode, under the journal's lock, from
    /// [`Journal::append`]).
    pub(crate) fn committed(&self, own_seq: Option<u64>) -> u64 {
        let mut own = lock(&self.own);
        let n = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(seq) = own_seq {
            // Numbering and registering are one step under `own`, which
            // publishing takes too: no commit is published durable
            // before its own seq is known.
            own.pending.insert(n, seq);
        }
        n
    }

    /// Publishes every commit up to `through` as durable, and the own seq
    /// they cover.
    fn publish(&self, through: u64) {
        let mut own = lock(&self.own);
        self.durable.send_modify(|d| *d = (*d).max(through));
        let later = own.pending.split_off(&through.saturating_add(1));
        let done = std::mem::replace(&mut own.pending, later);
        if let Some(&seq) = done.values().max() {
            if seq > own.durable_seq {
                own.durable_seq = seq;
                drop(own);
                self.notify();
            }
        }
    }

    /// The highest seq of this region's own log that is durable: only up
    /// to it may own deltas leave the region.
    pub(crate) fn durable_own_seq(&self) -> u64 {
        lock(&self.own).durable_seq
    }

    /// Raises the durable own seq to `seq` when it is below: at open
    /// (whatever the store holds then is on disk), and when a snapshot
    /// brought back own deltas that peers hold already.
    pub(crate) fn raise_own_to(&self, seq: u64) {
        let mut own = lock(&self.own);
        own.durable_seq = own.durable_seq.max(seq);
    }

    /// Wakes whatever tails this region.
    pub(crate) fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a change whenever the durable own seq rises
    /// or a peer's deltas land.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The highest commit number handed out so far.
    pub(crate) fn last_committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Number of flushes done by waiters so far.
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Writes and syncs the journal now, on the calling thread, unless a
    /// flush is running already (it, or the next, takes what is pending).
    pub(crate) fn flush_now(
        &self,
        journal: &Journal,
        pipeline: &Pipeline,
        db: &Db,
        offload: Offload,
    ) -> Result<()> {
        let Ok(lock) = self.flusher.try_lock() else {
            return Ok(());
        };
        let _leader = Leader {
            lock: Some(lock),
            durable: &self.durable,
        };
        self.write_out(journal, pipeline, db, offload)
    }

    /// The one place a store with a journal makes commits durable: writes
    /// and syncs what the journal holds pending, writes to sled every
    /// queued commit the write made durable ([`write_and_apply`]),
    /// publishes the highest commit number it covered, and starts the
    /// checkpoint or the next segment's preparation when due. A flush
    /// leader ([`GroupCommit::wait`], [`GroupCommit::flush_now`]) and
    /// whoever holds the writer lock may run it at once: the journal's
    /// `active` lock and the pipeline's `applying` lock put their writes
    /// in order.
    pub(crate) fn write_out(
        &self,
        journal: &Journal,
        pipeline: &Pipeline,
        db: &Db,
        offload: Offload,
    ) -> Result<()> {
        let written = write_and_apply(journal, pipeline)?;
        self.written(written, db, offload);
        Ok(())
    }

    /// Publishes what a flush made durable and starts its checkpoint.
    fn written(&self, written: Written, db: &Db, offload: Offload) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.publish(written.through);
        if let Some(checkpoint) = written.checkpoint {
            let db = db.clone();
            offload.detach(move || checkpoint.run(&db));
        }
        if let Some(prepare) = written.prepare {
            // Holding sled keeps the directory locked while a file is
            // being written in it (a dropped journal waits for it too).
            let db = db.clone();
            offload.detach(move || {
                prepare.run();
                drop(db);
            });
        }
    }

    /// Waits until commit `n` is durable, writing the journal if no one
    /// else is; `db` is flushed by the checkpoints the write may start.
    pub(crate) async fn wait(
        self: &Arc<Self>,
        journal: &Arc<Journal>,
        pipeline: &Arc<Pipeline>,
        db: &Db,
        n: u64,
        offload: Offload,
    ) -> Result<()> {
        self.lead_or_follow(n, || async {
            journal.check()?;
            // Commits that arrive meanwhile join this write.
            db.slow_disk().await;
            let (group, writing, queue, db) =
                (self.clone(), journal.clone(), pipeline.clone(), db.clone());
            offload
                .run(move || group.write_out(&writing, &queue, &db, offload))
                .await
                .map_err(StoreError::FlushTask)?
        })
        .await
    }

    /// Waits until commit `n` is in a completed sled flush, flushing if
    /// no one else is: how a store without a journal (`relaxed` mode)
    /// makes its commits durable. Writes are acknowledged before it; what
    /// leaves the region (own deltas shipped to peers, acknowledgements
    /// upstream, snapshots) waits for it, so a crash can never leave
    /// other regions holding what this one lost (docs/DECISIONS.md).
    pub(crate) async fn wait_flushed(&self, db: &Db, n: u64, offload: Offload) -> Result<()> {
        self.lead_or_follow(n, || async {
            // Flushes start at most every RELAXED_FLUSH_SPACING: back to
            // back they took a quarter of a busy region's throughput, and
            // what waits for them (shipping, acks) need not be faster.
            let due = lock(&self.sled_flushed_at).map(|at| at + RELAXED_FLUSH_SPACING);
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
            *lock(&self.sled_flushed_at) = Some(tokio::time::Instant::now());
            db.slow_disk().await;
            // Every commit numbered so far is in sled's memory: the flush
            // below covers them all.
            let through = self.last_committed();
            let flushing = db.clone();
            offload.run(move || flushing.flush()).await??;
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.publish(through);
            Ok(())
        })
        .await
    }

    /// Waits until commit `n` is published as durable. The first waiter
    /// to find no flush running leads one (`flush`, which publishes what
    /// it made durable); the others wait for it and check again.
    async fn lead_or_follow<F, Fut>(&self, n: u64, mut flush: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut rx = self.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= n {
                return Ok(());
            }
            match self.flusher.try_lock() {
                Ok(lock) => {
                    let _leader = Leader {
                        lock: Some(lock),
                        durable: &self.durable,
                    };
                    // A leader that published just before this one took
                    // the lock may have covered `n` already.
                    if *rx.borrow_and_update() >= n {
                        return Ok(());
                    }
                    flush().await?;
                }
                Err(_) => {
                    // The sender lives as long as `self`, so this cannot
                    // fail while we hold `&self`.
                    let _ = rx.changed().await;
                }
            }
        }
    }
}
