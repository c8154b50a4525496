//! Reads that do not go through the writer: values, lone commands, stream
//! ranges, the catalog, the version vector, the logs, peer acks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use concord_core::crdt::{Stream, StreamEntry, StreamId};
use concord_core::{
    Access, Catalog, CoreError, CrdtType, Delta, Hlc, KeyspaceId, Marker, Outcome, ReplicaId,
    Value, VersionVector,
};

use crate::error::{Result, StoreError};
use crate::layout::{self, meta};
use crate::local::Item;
use crate::records::{decode_row, decode_value};
use crate::runs::Run;
use crate::sets::{decode_header, decode_member, from_parts};
use crate::store::Store;
use concord_core::crdt::{Set, SetHeader};

impl Store {
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
                // Under the locks a whole set is read under: no commit is
                // half written meanwhile, so the range shows a batch's
                // appends all or none.
                let _writer = self.lock_writer();
                let _applying = self.lock_applying();
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
    pub(crate) fn stream_watermark(&self, keyspace: &KeyspaceId, key: &str) -> Result<StreamId> {
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
    pub(crate) fn rows_from(
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

    pub(crate) fn read_catalog(&self) -> Result<Catalog> {
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
    pub(crate) fn read_version_vector(&self) -> Result<VersionVector> {
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

    /// One whole set, its header and members read under the writer lock,
    /// with no queued commit being written, so that both are of the same
    /// commit, and the bytes of its member rows.
    pub(crate) fn whole_set(&self, name: &str, key: &str, vkey: &[u8]) -> Result<(Set, usize)> {
        let _writer = self.lock_writer();
        let _applying = self.lock_applying();
        let header = match self.t.values.get(vkey)? {
            None => SetHeader::default(),
            Some(bytes) => decode_header(&bytes)?,
        };
        let prefix = layout::key_prefix(name, key);
        let mut rows = Vec::new();
        let mut bytes = 0;
        for item in self.t.members.scan_prefix(&prefix) {
            let (k, v) = item?;
            bytes += k.len() + v.len();
            rows.push(decode_member(&k[prefix.len()..], &v)?);
        }
        Ok((from_parts(header, rows)?, bytes))
    }

    /// The slice of one set holding the members `named` (see
    /// [`TxSet::slice`]), read as [`Store::whole_set`] reads.
    pub(crate) fn set_slice(
        &self,
        name: &str,
        key: &str,
        vkey: &[u8],
        named: &[Vec<u8>],
    ) -> Result<Set> {
        let _writer = self.lock_writer();
        let _applying = self.lock_applying();
        let header = match self.t.values.get(vkey)? {
            None => SetHeader::default(),
            Some(bytes) => decode_header(&bytes)?,
        };
        let needed = header.slice_members(named);
        let mut rows = Vec::with_capacity(needed.len());
        for member in &needed {
            if let Some(v) = self.t.members.get(layout::member_key(name, key, member))? {
                rows.push(decode_member(member, &v)?);
            }
        }
        from_parts(header, rows)
    }
}
