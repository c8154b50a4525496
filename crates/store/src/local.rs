//! Local writes: a client's batches of commands, run against the values
//! they name, stamped, logged and committed together.

use std::collections::{BTreeMap, BTreeSet};

use concord_core::catalog::KeyspaceView;
use concord_core::crdt::{Stream, StreamCommand, StreamId};
use concord_core::{
    Access, Clock, Command, CoreError, CrdtType, Delta, Hlc, KeyspaceId, Limits, Op, Outcome,
    ReplicaId, Stamp, Value,
};

use crate::error::{Result, StoreError};
use crate::layout;
use crate::records::{is_trim, tx_apply, tx_declare, tx_raise_hlc, tx_value, Overlay, RowNeed};
use crate::runs::LogRuns;
use crate::rw::{abort, Data, Rw, TxResult};
use crate::sets::{MemberOverlay, TxSet};
use crate::store::{CommitKind, Journaling, Store, WriteReceipt, Writer};

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
        let ((), staging) = self.run_data(CommitKind::Local, |data| {
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
        let commit = self
            .commit_local(staging, vec![(delta, bytes)], Journaling::Now)?
            .ok_or_else(|| StoreError::Bug("a declaration was not committed".into()))?;
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
        let (mut receipts, trimmed) =
            self.write_locked(&mut w, clock, &[items], Journaling::Now)?;
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
        self.write_many_then(clock, batches, Journaling::Now)
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
        self.write_many_then(clock, batches, Journaling::Queued)
    }

    pub(crate) fn write_many_then(
        &self,
        clock: &Clock,
        batches: &[&[Item]],
        journaling: Journaling,
    ) -> Vec<Result<WriteReceipt>> {
        let mut w = self.lock_writer();
        let mut trimmed = false;
        let results = match self.write_locked(&mut w, clock, batches, journaling) {
            Ok((receipts, t)) => {
                trimmed = t;
                receipts.into_iter().map(Ok).collect()
            }
            Err(_) if batches.len() > 1 => batches
                .iter()
                .map(|b| {
                    let (mut receipts, t) = self.write_locked(&mut w, clock, &[b], journaling)?;
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
    /// commit, durable on return with [`Journaling::Now`] (or when it
    /// trims a stream: the sweep reads sled); also says whether a stream
    /// was trimmed.
    pub(crate) fn write_locked(
        &self,
        w: &mut Writer,
        clock: &Clock,
        batches: &[&[Item]],
        journaling: Journaling,
    ) -> Result<(Vec<WriteReceipt>, bool)> {
        let me = self.identity.replica;
        let stamps = batches
            .iter()
            .flat_map(|b| b.iter())
            .filter(|item| item.command.is_write())
            .map(|_| clock.now())
            .collect::<concord_core::Result<Vec<Hlc>>>()?;
        let hwm = clock.last();
        let first_seq = w.next_seq;
        let preloaded = self.preload_for(batches)?;
        let body = |data: &Data<'_>| {
            let mut commit = LocalCommit {
                me,
                limits: &self.options.limits,
                seq: first_seq - 1,
                logged: 0,
                fresh: Vec::new(),
                trimmed: false,
                overlay: preloaded.clone(),
                declared: BTreeSet::new(),
                runs: self.log_runs(),
            };
            let mut stamps = stamps.iter().copied();
            let mut per_batch = Vec::with_capacity(batches.len());
            for items in batches {
                let batch_first = commit.seq + 1;
                let results = items
                    .iter()
                    .map(|item| commit.item(data, item, &mut stamps))
                    .collect::<TxResult<Vec<Outcome>>>()?;
                let batch_last = if commit.seq >= batch_first {
                    commit.seq
                } else {
                    0
                };
                per_batch.push((results, batch_last));
            }
            let LocalCommit {
                seq,
                logged,
                fresh,
                trimmed,
                runs,
                ..
            } = commit;
            runs.finish(&data.log)?;
            if seq >= first_seq {
                data.vv.insert(layout::replica_key(me), seq.to_be_bytes())?;
            }
            tx_raise_hlc(&data.meta, hwm)?;
            Ok((per_batch, (seq, logged, trimmed, fresh)))
        };
        let queued = self.pipeline.queued();
        let (mut out, mut staging) = self.run_data(CommitKind::Local, body)?;
        if staging.as_ref().is_some_and(|s| queued.hold_up(s, false)) {
            // It read records a queued commit wrote: once they are in
            // sled, it runs again (nothing of the first run was kept).
            self.drain()?;
            (out, staging) = self.run_data(CommitKind::Local, body)?;
        }
        let (per_batch, (last_seq, logged, trimmed, fresh)) = out;
        let wrote = last_seq >= first_seq;
        // A trim's sweep reads sled, which must then hold the commit.
        let journaling = if trimmed { Journaling::Now } else { journaling };
        let commit = self.commit_local(staging, fresh, journaling)?;
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

    /// What a local commit must read before it starts: sled must hold
    /// every commit before it when it reads ranges (and the watermarks
    /// bounding them) or whole sets, and those rows are loaded ahead.
    fn preload_for(&self, batches: &[&[Item]]) -> Result<Overlay> {
        let items = || batches.iter().flat_map(|b| b.iter());
        let whole_sets: Vec<(&str, &str)> = items()
            .filter(|item| item.command.access() == Access::WholeSet)
            .map(|item| (item.keyspace.name.as_str(), item.key.as_str()))
            .collect();
        let ranges = items().any(|item| matches!(item.command.access(), Access::Range { .. }));
        if ranges || !whole_sets.is_empty() {
            self.drain()?;
        }
        let row_needs = self.row_needs_of_items(batches)?;
        let mut preloaded = Overlay::preload(&self.t.rows, &row_needs)?;
        preloaded.members = MemberOverlay::preload(&self.t.members, whole_sets)?;
        Ok(preloaded)
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

/// The running state of one local commit's body.
struct LocalCommit<'a> {
    me: ReplicaId,
    limits: &'a Limits,
    /// The last sequence number taken.
    seq: u64,
    /// Bytes of deltas logged.
    logged: u64,
    /// The deltas made, with their encodings.
    fresh: Vec<(Delta, Vec<u8>)>,
    /// Whether a stream was trimmed.
    trimmed: bool,
    overlay: Overlay,
    /// Keyspaces found in the catalog (it cannot change inside a commit).
    declared: BTreeSet<&'a KeyspaceId>,
    runs: LogRuns,
}

impl<'a> LocalCommit<'a> {
    /// Runs one item inside the commit: a read's reply; or a write
    /// prepared from the value, stamped with the next of `stamps`, applied
    /// and logged, and its reply from the value after it. A reply that
    /// cannot be given (a counter leaving the 64-bit range) fails the
    /// batch before any of it is written.
    fn item(
        &mut self,
        data: &Data<'_>,
        item: &'a Item,
        stamps: &mut impl Iterator<Item = Hlc>,
    ) -> TxResult<Outcome> {
        let Item {
            keyspace,
            key,
            command,
        } = item;
        let me = self.me;
        if command.crdt_type() != keyspace.ty {
            return abort(CoreError::TypeMismatch {
                expected: keyspace.ty,
                found: command.crdt_type(),
            });
        }
        if !command.is_write() {
            let value = tx_load(&data.values, &data.members, &self.overlay, item)?;
            let reply = command.reply(&value, me, None).or_else(abort)?;
            return Ok(Outcome { write: None, reply });
        }
        let Some(hlc) = stamps.next() else {
            return abort(StoreError::Bug("missing stamp".into()));
        };
        self.check_declared(&data.catalog, keyspace)?;
        self.limits.check_key(key).or_else(abort)?;
        let current = tx_load(&data.values, &data.members, &self.overlay, item)?;
        let Some(op) = command
            .prepare(&current, me, hlc, self.limits)
            .or_else(abort)?
        else {
            // Nothing was written: no timestamp either. One answered here
            // would be durable nowhere, and a region restarted after a
            // power cut could answer a later write with a smaller one.
            let stamp = Stamp {
                seq: 0,
                hlc: Hlc::ZERO,
            };
            let reply = command.reply(&current, me, Some(stamp)).or_else(abort)?;
            return Ok(Outcome {
                write: Some(stamp),
                reply,
            });
        };
        self.seq += 1;
        let delta = Delta {
            origin: me,
            seq: self.seq,
            hlc,
            keyspace: keyspace.name.clone(),
            key: key.clone(),
            op,
        };
        let bytes = delta.encode_checked(self.limits).or_else(abort)?;
        self.trimmed |= is_trim(&delta.op);
        let trees = (&data.values, &data.rows, &data.members, &data.meta);
        let value = tx_apply(trees, &mut self.overlay, &delta, Some(current))?;
        let stamp = Stamp { seq: self.seq, hlc };
        let reply = command.reply(&value, me, Some(stamp)).or_else(abort)?;
        self.logged += bytes.len() as u64;
        self.runs.push(&data.log, me, self.seq, &bytes)?;
        self.fresh.push((delta, bytes));
        Ok(Outcome {
            write: Some(stamp),
            reply,
        })
    }

    /// Refuses a write to a keyspace the catalog does not hold; each
    /// keyspace is looked up once per commit.
    fn check_declared(&mut self, catalog: &Rw<'_>, keyspace: &'a KeyspaceId) -> TxResult<()> {
        if self.declared.contains(keyspace) {
            return Ok(());
        }
        if catalog
            .get(layout::catalog_key(&keyspace.name, keyspace.ty))?
            .is_none()
        {
            return abort(StoreError::UnknownKeyspace {
                name: keyspace.name.clone(),
                ty: keyspace.ty,
            });
        }
        self.declared.insert(keyspace);
        Ok(())
    }
}
