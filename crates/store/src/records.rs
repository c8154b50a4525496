//! Record primitives: how a commit reads and writes values, stream rows,
//! declarations and the clock's high-water mark, whatever commits it
//! (a local batch, a peer's batch, a replay, a snapshot import).

use std::collections::BTreeMap;

use concord_core::crdt::{Field, Stream, StreamEntry, StreamId, StreamOp};
use concord_core::{CoreError, CrdtType, Delta, Hlc, KeyspaceId, Marker, Op, Value};

use crate::error::{Result, StoreError};
use crate::layout::{self, meta};
use crate::rw::{abort, Rw, TxResult};
use crate::sets::{MemberOverlay, TxSet};

/// The trees a value operation touches inside a transaction: values,
/// stream rows, set members, meta.
pub(crate) type ValueTrees<'a> = (&'a Rw<'a>, &'a Rw<'a>, &'a Rw<'a>, &'a Rw<'a>);

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

/// A key's `values` record inside a commit (for a set, its header only:
/// see [`decode_value`]).
pub(crate) fn tx_value(values: &Rw<'_>, ks: &KeyspaceId, key: &str) -> TxResult<Value> {
    match values.get(layout::value_key(ks, key))? {
        None => Ok(Value::empty(ks.ty)),
        Some(bytes) => decode_value(&bytes, ks.ty).or_else(abort),
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
pub(crate) fn tx_apply(
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
            set.store(values, members, &mut overlay.members, &slice, &needed)?;
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

impl Overlay {
    /// Reads the committed rows `needs` asks for.
    pub(crate) fn preload(committed: &sled::Tree, needs: &[RowNeed]) -> Result<Overlay> {
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
    pub(crate) fn range(
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

/// A range of one stream's committed rows a transaction will need.
pub(crate) struct RowNeed {
    pub(crate) name: String,
    pub(crate) key: String,
    pub(crate) from: StreamId,
    pub(crate) to: StreamId,
    /// Most rows to read from `from` on.
    pub(crate) limit: usize,
}
