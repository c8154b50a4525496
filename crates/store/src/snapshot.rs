//! Snapshots, for a region that is behind its peers' truncated logs or new
//! to the cluster: a chunked export of a region's whole state and its
//! import by CvRDT merge.
//!
//! sled has no point-in-time read, so an export is *fuzzy*: it reads the
//! version vector first (that is what the snapshot [`covers`]), then the
//! catalog, then every value and stream row, while writes go on. Every
//! value it reads includes at least every operation the vector covers, and
//! perhaps later ones. That is enough: operations are idempotent against
//! a state that already includes them (counter totals are per-origin
//! maxima, set adds carry dots, register writes and stream entries carry
//! unique markers, trims are max-wins), so the importer merges the values,
//! takes the vector, and tails the logs from there; redelivered operations
//! change nothing.
//!
//! An import changes values chunk by chunk and the version vector only at
//! the end ([`Store::finish_import`]). A crash in between leaves values
//! that include some operations beyond the vector, which is safe for the
//! same reason; the next snapshot or the logs fill in the rest.
//!
//! [`covers`]: SnapshotCursor::covers

use std::collections::BTreeSet;
use std::ops::Bound;

use concord_core::crdt::{Crdt, Field, Stream, StreamId, StreamOp};
use concord_core::limits::check_keyspace_name;
use concord_core::{CrdtType, Hlc, KeyspaceId, Marker, ReplicaId, Value, VersionVector};
use sled::Transactional;

use crate::error::Result;
use crate::layout;
use crate::logs::TRUNCATE_STEP_RECORDS;
use crate::records::{
    decode_value, tx_declare, tx_put_row, tx_raise_hlc, tx_raise_watermark, tx_value, Overlay,
};
use crate::rw::{from_tx, Rw};
use crate::sets::{MemberOverlay, TxSet};
use crate::store::Store;

/// A keyspace declaration carried by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// Keyspace name.
    pub name: String,
    /// Its type.
    pub ty: CrdtType,
    /// When and where it was first declared.
    pub marker: Marker,
}

/// One key's state carried by a snapshot. A stream's entries may be spread
/// over several of these (and its watermark sent on its own): merging them
/// all gives the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotValue {
    /// The keyspace.
    pub keyspace: KeyspaceId,
    /// The key.
    pub key: String,
    /// The state, or part of it for a stream.
    pub value: Value,
}

/// One chunk of a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotChunk {
    /// Declarations (all of them, in the first chunk).
    pub declarations: Vec<Declaration>,
    /// Values.
    pub values: Vec<SnapshotValue>,
}

/// What an imported chunk held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Declarations merged.
    pub declarations: usize,
    /// Values merged.
    pub values: usize,
}

/// Where an export is. Holds no reference to the store, so a node can keep
/// it across awaits and hand out one chunk at a time.
#[derive(Debug, Clone)]
pub struct SnapshotCursor {
    covers: VersionVector,
    phase: Phase,
    chunks: u64,
}

#[derive(Debug, Clone)]
enum Phase {
    Catalog,
    /// Values after this `values` key.
    Values(Option<Vec<u8>>),
    /// Stream rows after this `stream_rows` key.
    Rows(Option<Vec<u8>>),
    Done,
}

impl SnapshotCursor {
    /// The version vector the snapshot covers: every value exported
    /// includes at least the operations it names.
    pub fn covers(&self) -> &VersionVector {
        &self.covers
    }

    /// Chunks handed out so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// True once the last chunk was handed out.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }
}

fn after(key: &Option<Vec<u8>>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    match key {
        Some(k) => (Bound::Excluded(k.clone()), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// Entries of one stream being gathered from consecutive rows.
struct StreamRun {
    name: String,
    key: String,
    watermark: StreamId,
    entries: Vec<(StreamId, Vec<Field>)>,
}

impl StreamRun {
    fn into_value(self) -> Option<SnapshotValue> {
        if self.entries.is_empty() {
            return None;
        }
        Some(SnapshotValue {
            keyspace: KeyspaceId {
                name: self.name,
                ty: CrdtType::Stream,
            },
            key: self.key,
            value: Value::Stream(Stream::from_parts(StreamId::MIN, self.entries)),
        })
    }
}

impl Store {
    /// Starts an export: notes the version vector it covers.
    pub fn export_snapshot(&self) -> Result<SnapshotCursor> {
        Ok(SnapshotCursor {
            covers: self.version_vector()?,
            phase: Phase::Catalog,
            chunks: 0,
        })
    }

    /// The next chunk of an export, of about `max_bytes` of stored data
    /// (more only when a single value is larger), or `None` when the export
    /// is complete. Memory use is bounded by the chunk.
    pub fn export_chunk(
        &self,
        cursor: &mut SnapshotCursor,
        max_bytes: usize,
    ) -> Result<Option<SnapshotChunk>> {
        let mut chunk = SnapshotChunk::default();
        let mut bytes = 0usize;
        loop {
            if bytes >= max_bytes.max(1) {
                break;
            }
            match &cursor.phase {
                Phase::Done => break,
                Phase::Catalog => {
                    for (name, ty, marker) in self.catalog()?.declarations() {
                        bytes += name.len() + 16;
                        chunk.declarations.push(Declaration {
                            name: name.to_string(),
                            ty,
                            marker,
                        });
                    }
                    cursor.phase = Phase::Values(None);
                }
                Phase::Values(last) => {
                    let mut last = last.clone();
                    let mut finished = true;
                    for item in self.t.values.range(after(&last)) {
                        let (k, v) = item?;
                        let (keyspace, key) = layout::parse_value_key(&k)?;
                        let value = if keyspace.ty == CrdtType::Set {
                            // Read whole, header and members of one commit.
                            let (set, member_bytes) = self.whole_set(&keyspace.name, &key, &k)?;
                            bytes += member_bytes;
                            Value::Set(set)
                        } else {
                            decode_value(&v, keyspace.ty)?
                        };
                        bytes += k.len() + v.len();
                        chunk.values.push(SnapshotValue {
                            keyspace,
                            key,
                            value,
                        });
                        last = Some(k.to_vec());
                        if bytes >= max_bytes {
                            finished = false;
                            break;
                        }
                    }
                    cursor.phase = if finished {
                        Phase::Rows(None)
                    } else {
                        Phase::Values(last)
                    };
                }
                Phase::Rows(last) => {
                    let mut last = last.clone();
                    let mut finished = true;
                    let mut run: Option<StreamRun> = None;
                    for item in self.t.rows.range(after(&last)) {
                        let (k, v) = item?;
                        let (name, key, id) = layout::parse_row_key(&k)?;
                        last = Some(k.to_vec());
                        let same = run.as_ref().is_some_and(|r| r.name == name && r.key == key);
                        if !same {
                            chunk
                                .values
                                .extend(run.take().and_then(StreamRun::into_value));
                            let ks = KeyspaceId {
                                name: name.clone(),
                                ty: CrdtType::Stream,
                            };
                            let watermark = match self.get(&ks, &key)? {
                                Value::Stream(s) => s.trimmed_before(),
                                _ => StreamId::MIN,
                            };
                            run = Some(StreamRun {
                                name,
                                key,
                                watermark,
                                entries: Vec::new(),
                            });
                        }
                        let Some(r) = run.as_mut() else { continue };
                        // A row below the watermark is trimmed and waits
                        // for the sweep.
                        if id < r.watermark {
                            continue;
                        }
                        let entry = crate::records::decode_row(&k, &v)?;
                        bytes += k.len() + v.len();
                        r.entries.push((entry.id, entry.fields));
                        if bytes >= max_bytes {
                            finished = false;
                            break;
                        }
                    }
                    chunk
                        .values
                        .extend(run.take().and_then(StreamRun::into_value));
                    cursor.phase = if finished {
                        Phase::Done
                    } else {
                        Phase::Rows(last)
                    };
                }
            }
        }
        if chunk.declarations.is_empty() && chunk.values.is_empty() && cursor.is_done() {
            return Ok(None);
        }
        cursor.chunks += 1;
        Ok(Some(chunk))
    }

    /// Merges a snapshot chunk into this store, atomically: declarations
    /// into the catalog, values into the values (CvRDT merge, so the
    /// order of chunks and of snapshots does not matter). The version
    /// vector is not touched: call [`Store::finish_import`] after the last
    /// chunk. A chunk with an invalid name, key, type or entry is refused
    /// whole.
    pub fn import_chunk(&self, chunk: &SnapshotChunk) -> Result<ImportReport> {
        let limits = &self.options.limits;
        for d in &chunk.declarations {
            check_keyspace_name(&d.name)?;
        }
        for v in &chunk.values {
            check_keyspace_name(&v.keyspace.name)?;
            limits.check_key(&v.key)?;
            if v.value.crdt_type() != v.keyspace.ty {
                return Err(concord_core::CoreError::TypeMismatch {
                    expected: v.keyspace.ty,
                    found: v.value.crdt_type(),
                }
                .into());
            }
            if let Value::Stream(s) = &v.value {
                for (_, fields) in s.entries() {
                    StreamOp::Append {
                        fields: fields.to_vec(),
                    }
                    .validate(limits)?;
                }
            }
        }
        let writer = self.lock_writer();
        // The merge reads sled, which must hold every commit before it.
        self.drain()?;
        let mut preloaded = Overlay::default();
        preloaded.members = MemberOverlay::preload(
            &self.t.members,
            chunk
                .values
                .iter()
                .filter(|v| v.keyspace.ty == CrdtType::Set)
                .map(|v| (v.keyspace.name.as_str(), v.key.as_str())),
        )?;
        let trees = (
            &self.t.catalog,
            &self.t.values,
            &self.t.rows,
            &self.t.members,
            &self.t.meta,
        );
        let trimmed = trees
            .transaction(|(catalog, values, rows, members, meta)| {
                let (catalog, values, rows, members, meta) = (
                    &Rw::Tx(catalog),
                    &Rw::Tx(values),
                    &Rw::Tx(rows),
                    &Rw::Tx(members),
                    &Rw::Tx(meta),
                );
                let mut trimmed = false;
                let mut overlay = preloaded.clone();
                for d in &chunk.declarations {
                    tx_declare(catalog, &d.name, d.ty, d.marker)?;
                }
                for v in &chunk.values {
                    let mut current = tx_value(values, &v.keyspace, &v.key)?;
                    match (&mut current, &v.value) {
                        (Value::Stream(mine), Value::Stream(theirs)) => {
                            let before = mine.trimmed_before();
                            let name = &v.keyspace.name;
                            tx_raise_watermark(
                                values,
                                meta,
                                name,
                                &v.key,
                                mine,
                                theirs.trimmed_before(),
                            )?;
                            trimmed |= mine.trimmed_before() > before;
                            for (id, fields) in theirs.entries() {
                                if id >= mine.trimmed_before() {
                                    tx_put_row(rows, &mut overlay, name, &v.key, id, fields)?;
                                }
                            }
                        }
                        (Value::Set(_), Value::Set(theirs)) => {
                            let set = TxSet::of(&v.keyspace, &v.key);
                            let mut mine = set.whole(values, &overlay.members)?;
                            let mut touched: BTreeSet<Vec<u8>> =
                                mine.members().into_iter().collect();
                            mine.merge(theirs);
                            touched.extend(mine.members());
                            set.store(values, members, &mut overlay.members, &mine, &touched)?;
                        }
                        (current, theirs) => {
                            if let Err(e) = current.merge(theirs) {
                                return crate::rw::abort(e);
                            }
                            values
                                .insert(layout::value_key(&v.keyspace, &v.key), current.encode())?;
                        }
                    }
                }
                Ok(trimmed)
            })
            .map_err(from_tx)?;
        if !chunk.declarations.is_empty() {
            self.catalog_changed();
        }
        drop(writer);
        self.after_trim(trimmed);
        Ok(ImportReport {
            declarations: chunk.declarations.len(),
            values: chunk.values.len(),
        })
    }

    /// Ends an import: every chunk of a snapshot covering `covers` has been
    /// imported, so the version vector takes it in (entry-wise maximum),
    /// and `hwm`, the node's clock after observing the snapshot, becomes
    /// the HLC high-water mark. The logs of origins the vector jumps ahead
    /// on are emptied, as they could not continue contiguously; readers
    /// needing them are sent to a snapshot too.
    ///
    /// A snapshot may hold writes of this very region that it does not
    /// have (its data was lost or restored from an old copy); then its
    /// next sequence number moves past them, so no seq is ever reused.
    pub fn finish_import(&self, covers: &VersionVector, hwm: Hlc) -> Result<()> {
        let me = self.identity.replica;
        let mut w = self.lock_writer();
        self.drain()?;
        let current = self.version_vector()?;
        let advanced: Vec<(ReplicaId, u64)> = covers
            .iter()
            .filter(|&(origin, seq)| seq > current.get(origin))
            .collect();
        for &(origin, _) in &advanced {
            loop {
                let removed =
                    self.remove_log_prefix(origin, u64::MAX, None, TRUNCATE_STEP_RECORDS)?;
                self.forget_log(&mut w, origin, removed);
                if removed.visited < TRUNCATE_STEP_RECORDS {
                    break;
                }
            }
        }
        (&self.t.vv, &self.t.meta)
            .transaction(|(vv, meta)| {
                for &(origin, seq) in &advanced {
                    vv.insert(&layout::replica_key(origin), &seq.to_be_bytes())?;
                }
                tx_raise_hlc(&Rw::Tx(meta), hwm)?;
                Ok(())
            })
            .map_err(from_tx)?;
        {
            let mut applied = self.lock_applied();
            for &(origin, seq) in &advanced {
                applied.advance(origin, seq);
            }
        }
        if let Some(&(_, seq)) = advanced.iter().find(|(origin, _)| *origin == me) {
            tracing::warn!(
                local = w.next_seq - 1,
                snapshot = seq,
                "a snapshot holds writes of this region that it did not have: its data was lost or restored from an old copy; continuing after them"
            );
            w.next_seq = seq + 1;
            // Peers hold them already: they may be shipped.
            self.group.raise_own_to(seq);
        }
        drop(w);
        self.notify_changed();
        Ok(())
    }
}
