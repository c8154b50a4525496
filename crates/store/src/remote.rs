//! Remote deltas: a peer's batches, applied exactly once per `(origin,
//! seq)` and in per-origin order, and the journal's replay at open.

use std::collections::BTreeMap;

use concord_core::{Delta, Hlc, Op, ReplicaId};

use crate::error::{Result, StoreError};
use crate::layout::{self};
use crate::records::{is_trim, tx_apply, tx_declare, tx_raise_hlc, Overlay};
use crate::rw::{abort, Data, Rw, Staging, TxResult};
use crate::store::{ApplyReport, CommitKind, Store};

/// Most journal deltas replayed in one transaction at open.
pub(crate) const REPLAY_CHUNK_DELTAS: usize = 1_000;

pub(crate) fn tx_vv_get(vv: &Rw<'_>, origin: ReplicaId) -> TxResult<u64> {
    match vv.get(layout::replica_key(origin))? {
        None => Ok(0),
        Some(v) => layout::parse_u64("vv entry", &v).or_else(abort),
    }
}

impl Store {
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
        let (mut out, mut staging) = self.apply_tx(deltas, hwm, CommitKind::Remote)?;
        if staging.as_ref().is_some_and(|s| queued.hold_up(s, true)) {
            // It would reach sled ahead of queued commits whose records it
            // reads or writes: once they are in sled, it runs again.
            self.drain()?;
            (out, staging) = self.apply_tx(deltas, hwm, CommitKind::Remote)?;
        }
        let Applied {
            report,
            logged,
            trimmed,
            encoded,
        } = out;
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
            (report.applied > 0).then(|| self.commit(encoded.iter().map(|b| b.as_slice()), None));
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
        if report.applied > 0 {
            // Their origin holds them durably: they may be forwarded now.
            self.notify_changed();
        }
        self.after_trim(trimmed);
        Ok(ApplyReport { commit, ..report })
    }

    /// The commit of [`Store::apply_remote`]: applies `deltas` each at
    /// most once and in per-origin order, and returns what it did, the
    /// entries and bytes logged per origin, whether a stream was trimmed,
    /// the encodings of the deltas applied, and the staged writes for
    /// [`Store::commit_staged`] when it was staged. A
    /// [`CommitKind::Replay`] (of the journal, at open) applies this
    /// region's own deltas too, in a sled transaction: the journal it
    /// replays already holds them.
    pub(crate) fn apply_tx(
        &self,
        deltas: &[Delta],
        hwm: Hlc,
        kind: CommitKind,
    ) -> Result<(Applied, Option<Staging>)> {
        let me = self.identity.replica;
        self.run_data(kind, |data| {
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
                if d.origin == me && kind != CommitKind::Replay {
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
            Ok(Applied {
                report,
                logged,
                trimmed,
                encoded,
            })
        })
    }

    /// Applies the journal's deltas at open, in chunks of
    /// [`REPLAY_CHUNK_DELTAS`]; returns how many were not in sled yet.
    /// Nothing is journaled again: the caller flushes sled afterwards.
    pub(crate) fn replay(&self, deltas: &[Delta]) -> Result<usize> {
        let mut replayed = 0;
        for chunk in deltas.chunks(REPLAY_CHUNK_DELTAS) {
            let hwm = chunk.iter().map(|d| d.hlc).max().unwrap_or(Hlc::ZERO);
            let (Applied { report, .. }, _) = self.apply_tx(chunk, hwm, CommitKind::Replay).map_err(|e| match e {
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
}

/// What applying a remote batch did, for [`Store::apply_remote`] to
/// finish its commit with.
pub(crate) struct Applied {
    report: ApplyReport,
    /// Entries and bytes logged per origin.
    logged: BTreeMap<ReplicaId, (u64, u64)>,
    /// Whether a stream was trimmed.
    trimmed: bool,
    /// The encodings of the deltas applied, in order.
    encoded: Vec<Vec<u8>>,
}
