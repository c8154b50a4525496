//! Local writes: a client's batches of commands, run against the values
//! they name, stamped, logged and committed together.

use std::collections::{BTreeMap, BTreeSet};

use concord_core::catalog::KeyspaceView;
use concord_core::crdt::{Stream, StreamCommand, StreamId};
use concord_core::{
    Access, Clock, Command, CoreError, CrdtType, Delta, KeyspaceId, Op, Outcome, Stamp, Value,
};

use crate::error::{Result, StoreError};
use crate::layout::{self};
use crate::records::{is_trim, tx_apply, tx_declare, tx_raise_hlc, tx_value, Overlay, RowNeed};
use crate::rw::{abort, Data, Rw, TxResult};
use crate::sets::{MemberOverlay, TxSet};
use crate::store::{Store, WriteReceipt, Writer};

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

/// A key's `values` record inside a transaction (for a set, its header
/// only: see [`decode_value`]).
/// What `item`'s command needs of its key's value ([`Access`]), read
/// inside the commit: the value record, a slice of a set or the whole
/// set, or a stream's watermark with the entries of a range.
pub(crate) fn tx_load(
    values: &Rw<'_>,
    members: &Rw<'_>,
    overlay: &Overlay,
    item: &Item,
) -> TxResult<Value> {
    let Item { keyspace, key, .. } = item;
    match item.command.access() {
        Access::Value => tx_value(values, keyspace, key),
        Access::Members(named) => Ok(Value::Set(
            TxSet::of(keyspace, key).slice(values, members, named)?.0,
        )),
        Access::WholeSet => Ok(Value::Set(
            TxSet::of(keyspace, key).whole(values, &overlay.members)?,
        )),
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

impl Store {
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

    pub(crate) fn write_many_then(
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
    pub(crate) fn write_locked(
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
    pub(crate) fn row_needs_of_items(&self, batches: &[&[Item]]) -> Result<Vec<RowNeed>> {
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
}
