//! Local commits between their staging and sled.
//!
//! A local write or declaration is staged in memory under the writer lock
//! ([`crate::rw`]); its records may reach sled only once the journal holds
//! its deltas durably (the journal is its write-ahead log). Waiting for
//! that write under the writer lock would hold up every commit behind it,
//! a peer's delta batch included, for a whole `fdatasync`: on a busy disk
//! the largest part of the replication lag (docs/BENCHMARKS.md). So a
//! staged local commit is queued here, numbered, and the writer lock is
//! free again at once. Whoever writes the journal next — a client waiting
//! for its write to be durable, a peer link waiting to acknowledge, or a
//! commit that must wait — also writes to sled, in commit order, every
//! queued commit the write made durable ([`write_and_apply`]), and only
//! then publishes the write. So a commit number published as durable is
//! also readable, and a client acknowledged after [`crate::Store::durable`]
//! reads its write.
//!
//! **Order.** A commit staged while others are queued read sled, which
//! does not hold their records yet. It may go on only if it does not
//! depend on them ([`crate::rw::Staging::depends_on`]); otherwise the
//! queue is written out first ([`crate::Store`]'s `drain`) and the commit
//! staged again. A later local commit is queued behind them, so it may
//! write the same records (the version vector entry of this region, say):
//! they reach sled in order. A peer's batch is written to sled at once,
//! ahead of the queue, so it must neither read nor write any queued
//! record. The HLC high-water mark is shared by all and only ever rises
//! when written, whatever the order.
//!
//! **Visibility.** The in-memory version vector and the recent deltas
//! ([`crate::recent`]) show a queued commit only once its records are in
//! sled: whoever reads the vector (a snapshot export, a provider) finds
//! every delta it covers.
//!
//! **Crashes.** A queued commit not yet durable is lost in a crash, as a
//! write never acknowledged may be; sled holds none of it. One durable but
//! not yet in sled is replayed from the journal at open. A peer batch that
//! reached sled ahead of the queue depends on nothing queued, so it stands
//! on its own in whatever sled recovered.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use concord_core::{Delta, VersionVector};

use crate::error::Result;
use crate::journal::{Journal, Written};
use crate::recent::Recent;
use crate::rw::{Frozen, Staging};

/// A queued local commit.
struct Queued {
    /// Its commit number.
    n: u64,
    records: Frozen,
    /// Its deltas and their encoded sizes, for [`Recent`] and the vector;
    /// taken by whoever writes the commit to sled.
    deltas: Mutex<Vec<(Delta, usize)>>,
}

/// The commits queued at one moment ([`Pipeline::queued`]).
pub(crate) struct QueueView(Vec<Arc<Queued>>);

impl QueueView {
    /// Whether `staging` depends on one of them (see
    /// [`Staging::depends_on`]).
    pub(crate) fn hold_up(&self, staging: &Staging, writes_too: bool) -> bool {
        self.0
            .iter()
            .any(|q| staging.depends_on(&q.records, writes_too))
    }
}

/// The queue of staged local commits, and what shows them once written.
#[derive(Default)]
pub(crate) struct Pipeline {
    queue: Mutex<VecDeque<Arc<Queued>>>,
    /// Held while queued records are written to sled: one writer at a
    /// time keeps commit order, and a reader that must see no commit half
    /// written (a whole set) takes it too.
    applying: Mutex<()>,
    /// The version vector as sled holds it (see [`crate::Store`]).
    applied: Mutex<VersionVector>,
    /// The newest deltas of every log.
    recent: Mutex<Recent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Whatever a panicking holder left is whole: queue entries are
    // removed only once written, and writing one again is harmless.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipeline {
    /// Queues a staged commit numbered `n`. Call it under the journal's
    /// lock, from [`Journal::append`]'s numbering: a journal write that
    /// takes its deltas then finds it queued.
    pub(crate) fn push(&self, n: u64, staging: Staging, deltas: Vec<(Delta, usize)>) {
        lock(&self.queue).push_back(Arc::new(Queued {
            n,
            records: staging.freeze(),
            deltas: Mutex::new(deltas),
        }));
    }

    /// Whether no commit is queued.
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }

    /// The commits queued now. Take it before staging a commit and ask it
    /// afterwards whether the commit depends on one of them: one written
    /// out meanwhile left the queue, but the commit may have read sled
    /// before it was there.
    pub(crate) fn queued(&self) -> QueueView {
        QueueView(lock(&self.queue).iter().cloned().collect())
    }

    /// Writes every queued commit numbered up to `through` to sled, oldest
    /// first, and shows it in the vector and the recent deltas. The caller
    /// made them durable.
    pub(crate) fn apply_through(&self, through: u64) -> sled::Result<()> {
        let _applying = lock(&self.applying);
        loop {
            let Some(next) = lock(&self.queue)
                .front()
                .filter(|q| q.n <= through)
                .cloned()
            else {
                return Ok(());
            };
            // Written before it leaves the queue, so a commit staged
            // meanwhile still sees that it must not read these records
            // from sled.
            next.records.apply()?;
            self.show(std::mem::take(&mut *lock(&next.deltas)));
            lock(&self.queue).pop_front();
        }
    }

    /// Shows deltas whose records sled now holds: pushes them to the
    /// recent deltas, then raises the vector, both under their locks at
    /// once, so a reader of the vector finds them in the recent deltas.
    pub(crate) fn show(&self, deltas: impl IntoIterator<Item = (Delta, usize)>) {
        let mut recent = lock(&self.recent);
        let mut applied = lock(&self.applied);
        for (delta, size) in deltas {
            applied.advance(delta.origin, delta.seq);
            recent.push(delta, size);
        }
    }

    /// Held while no queued commit is being written to sled.
    pub(crate) fn lock_applying(&self) -> MutexGuard<'_, ()> {
        lock(&self.applying)
    }

    pub(crate) fn lock_applied(&self) -> MutexGuard<'_, VersionVector> {
        lock(&self.applied)
    }

    pub(crate) fn lock_recent(&self) -> MutexGuard<'_, Recent> {
        lock(&self.recent)
    }
}

/// Writes and syncs the journal's pending deltas, then writes to sled the
/// queued commits they made durable. Every journal write goes through
/// here, so nothing is published as durable before it is readable. Should
/// sled refuse the records, the journal stops: they are durable in it and
/// only a restart's replay brings sled level again.
pub(crate) fn write_and_apply(journal: &Journal, pipeline: &Pipeline) -> Result<Written> {
    let written = journal.write_pending()?;
    if let Err(e) = pipeline.apply_through(written.through) {
        journal.stop(format!("sled refused a journaled commit: {e}"));
        return Err(e.into());
    }
    Ok(written)
}
