//! How a region's state maps onto sled trees and keys.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `format`, `identity`, `hlc` | format version (u32 BE), identity (postcard), HLC high-water mark (u64 BE) |
//! | `meta` | [`sweep_key`]: `sweep/`, stream prefix | a raised trim watermark whose rows are still to be deleted: the row key of the watermark |
//! | `catalog` | type byte, name | declaration marker (postcard) |
//! | `values` | [`value_key`]: type, name, key | the key's CRDT state ([`Value::encode`](concord_core::Value::encode)); for sets only the [`SetHeader`](concord_core::crdt::SetHeader), for streams only the trim watermark |
//! | `set_members` | [`member_key`]: name, key, member | one set member's [`MemberDots`](concord_core::crdt::MemberDots) |
//! | `stream_rows` | [`row_key`]: name, key, entry id | one stream entry's fields (postcard) |
//! | `log` | origin (u32 BE), first seq (u64 BE) | a run of the origin's consecutive deltas from that seq on: their count (u32 BE), then each [encoded](concord_core::Delta::encode) delta's length (u32 BE) and bytes (module `runs`) |
//! | `vv` | origin (u32 BE) | highest applied seq (u64 BE) |
//! | `acks` | peer (u32 BE) | the peer's acknowledged version vector (postcard) |
//!
//! Why this layout:
//!
//! - Values are keyed by keyspace *type* and name, so two declarations of one
//!   name with different types (a conflict made during a partition) keep
//!   separate data; the type comes first so that scanning one keyspace is a
//!   prefix scan.
//! - Counters and registers are one record per key: every write reads
//!   and rewrites it inside the write's transaction. Sets and streams grow
//!   without bound, so their elements are rows of their own and a write
//!   touches only the rows it names. A set member's row is keyed by the
//!   member and holds the dots of its adds; the set's `values` record holds
//!   its header (the clock of adds seen, the deferred removes). A stream
//!   entry's row is keyed by its id (big-endian, so sled's order is the
//!   stream's order); the stream's `values` record holds only its trim
//!   watermark.
//! - All origins' logs share one tree, prefixed by origin: one log per origin
//!   in order of seq, while a write still touches a fixed set of trees, which
//!   sled's multi-tree transactions need.
//! - A trim only raises the watermark in its transaction and records a
//!   sweep; the rows below it are deleted afterwards in bounded chunks
//!   (resumed after a crash). Every read and append checks the watermark,
//!   so the dead rows are never seen, and a trim's transaction does not
//!   grow with the stream.
//! - Each origin's log holds a contiguous run of seqs ending at the version
//!   vector's entry, in records of up to a few hundred deltas each (a
//!   commit's deltas of one origin): truncation removes a prefix of whole
//!   records, and the first record's first seq is the log's floor. A
//!   reader asking for a seq below it is told to catch up by snapshot.
//! - Big-endian integers make sled's byte order the numeric order.

use concord_core::crdt::{CrdtType, StreamId};
use concord_core::{Hlc, KeyspaceId, ReplicaId};

use crate::error::{Result, StoreError};

/// The on-disk format this build reads and writes.
///
/// Version 1 stored a set whole in its `values` record; version 2 stores
/// each member as a row of `set_members`; version 3 stores the log in
/// runs, one record for many deltas, where version 2 had one per delta.
pub const FORMAT_VERSION: u32 = 3;

/// Tree names.
pub(crate) mod trees {
    pub const META: &str = "meta";
    pub const CATALOG: &str = "catalog";
    pub const VALUES: &str = "values";
    pub const STREAM_ROWS: &str = "stream_rows";
    pub const SET_MEMBERS: &str = "set_members";
    pub const LOG: &str = "log";
    pub const VV: &str = "vv";
    pub const ACKS: &str = "acks";
}

/// Keys of the `meta` tree.
pub(crate) mod meta {
    pub const FORMAT: &[u8] = b"format";
    pub const IDENTITY: &[u8] = b"identity";
    pub const HLC: &[u8] = b"hlc";
    pub const SWEEP_PREFIX: &[u8] = b"sweep/";
}

pub(crate) fn type_byte(ty: CrdtType) -> u8 {
    match ty {
        CrdtType::Counter => 1,
        CrdtType::Set => 2,
        CrdtType::Register => 3,
        CrdtType::Stream => 4,
    }
}

pub(crate) fn type_from_byte(b: u8) -> Result<CrdtType> {
    Ok(match b {
        1 => CrdtType::Counter,
        2 => CrdtType::Set,
        3 => CrdtType::Register,
        4 => CrdtType::Stream,
        other => return Err(StoreError::Corrupt(format!("unknown type byte {other}"))),
    })
}

/// `catalog` key: type byte, then the name.
pub(crate) fn catalog_key(name: &str, ty: CrdtType) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(type_byte(ty));
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn parse_catalog_key(k: &[u8]) -> Result<(String, CrdtType)> {
    let (&ty, name) = k
        .split_first()
        .ok_or_else(|| StoreError::Corrupt("empty catalog key".into()))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| StoreError::Corrupt("catalog name is not UTF-8".into()))?;
    Ok((name.to_string(), type_from_byte(ty)?))
}

/// Prefix of every `values` key of a keyspace: type byte, name length
/// (names are at most 128 bytes), name.
pub(crate) fn keyspace_prefix(ks: &KeyspaceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + ks.name.len());
    k.push(type_byte(ks.ty));
    // Names are validated to at most 128 bytes.
    k.push(ks.name.len().min(255) as u8);
    k.extend_from_slice(ks.name.as_bytes());
    k
}

/// `values` key of one key of a keyspace.
pub fn value_key(ks: &KeyspaceId, key: &str) -> Vec<u8> {
    let mut k = keyspace_prefix(ks);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Prefix of every row of one stream, or of every member of one set: name
/// length, name, key length (u16 BE), key.
pub(crate) fn key_prefix(name: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + name.len() + key.len() + 12);
    k.push(name.len().min(255) as u8);
    k.extend_from_slice(name.as_bytes());
    // Keys are validated to far below 64 KiB.
    k.extend_from_slice(&(key.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// `set_members` key of one member.
pub fn member_key(name: &str, key: &str, member: &[u8]) -> Vec<u8> {
    let mut k = key_prefix(name, key);
    k.extend_from_slice(member);
    k
}

/// `stream_rows` key of one entry.
pub fn row_key(name: &str, key: &str, id: StreamId) -> Vec<u8> {
    let mut k = key_prefix(name, key);
    k.extend_from_slice(&id.hlc.as_u64().to_be_bytes());
    k.extend_from_slice(&id.replica.0.to_be_bytes());
    k
}

/// The `stream_rows` keys of one stream's entries with `from <= id <= to`;
/// `None` when the range is empty.
pub(crate) fn row_range(
    name: &str,
    key: &str,
    from: StreamId,
    to: StreamId,
) -> Option<std::ops::RangeInclusive<Vec<u8>>> {
    (from <= to).then(|| row_key(name, key, from)..=row_key(name, key, to))
}

/// The entry id at the end of a `stream_rows` key.
pub(crate) fn parse_row_id(k: &[u8]) -> Result<StreamId> {
    let n = k.len();
    if n < 12 {
        return Err(StoreError::Corrupt("stream row key too short".into()));
    }
    let hlc = u64::from_be_bytes(k[n - 12..n - 4].try_into().map_err(|_| short())?);
    let replica = u32::from_be_bytes(k[n - 4..].try_into().map_err(|_| short())?);
    Ok(StreamId::new(Hlc::from_u64(hlc), ReplicaId(replica)))
}

fn short() -> StoreError {
    StoreError::Corrupt("stream row key too short".into())
}

/// `meta` key of a pending sweep of one stream's trimmed rows.
pub fn sweep_key(name: &str, key: &str) -> Vec<u8> {
    let mut k = meta::SWEEP_PREFIX.to_vec();
    k.extend_from_slice(&key_prefix(name, key));
    k
}

/// Splits a `values` key into its keyspace and key.
pub(crate) fn parse_value_key(k: &[u8]) -> Result<(KeyspaceId, String)> {
    let bad = || StoreError::Corrupt("malformed value key".into());
    let (&ty, rest) = k.split_first().ok_or_else(bad)?;
    let (&len, rest) = rest.split_first().ok_or_else(bad)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(bad());
    }
    let (name, key) = rest.split_at(len);
    let name = std::str::from_utf8(name).map_err(|_| bad())?;
    let key = std::str::from_utf8(key).map_err(|_| bad())?;
    let ks = KeyspaceId {
        name: name.to_string(),
        ty: type_from_byte(ty)?,
    };
    Ok((ks, key.to_string()))
}

/// Splits a `stream_rows` key into stream name, key and entry id.
pub(crate) fn parse_row_key(k: &[u8]) -> Result<(String, String, StreamId)> {
    let bad = || StoreError::Corrupt("malformed stream row key".into());
    let (&len, rest) = k.split_first().ok_or_else(bad)?;
    let len = usize::from(len);
    if rest.len() < len + 2 {
        return Err(bad());
    }
    let (name, rest) = rest.split_at(len);
    let (klen, rest) = rest.split_at(2);
    let klen = usize::from(u16::from_be_bytes([klen[0], klen[1]]));
    if rest.len() != klen + 12 {
        return Err(bad());
    }
    let name = std::str::from_utf8(name).map_err(|_| bad())?;
    let key = std::str::from_utf8(&rest[..klen]).map_err(|_| bad())?;
    Ok((name.to_string(), key.to_string(), parse_row_id(k)?))
}

/// `log` key of one delta.
pub fn log_key(origin: ReplicaId, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&origin.0.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `vv` and `acks` key of a replica.
pub fn replica_key(r: ReplicaId) -> [u8; 4] {
    r.0.to_be_bytes()
}

pub(crate) fn parse_replica_key(k: &[u8]) -> Result<ReplicaId> {
    let bytes: [u8; 4] = k
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("replica key of {} bytes", k.len())))?;
    Ok(ReplicaId(u32::from_be_bytes(bytes)))
}

pub(crate) fn parse_u64(what: &str, v: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what}: {} bytes, expected 8", v.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_sort_in_stream_order_and_parse_back() {
        let a = StreamId::new(Hlc::from_u64(5), ReplicaId(9));
        let b = StreamId::new(Hlc::from_u64(6), ReplicaId(1));
        let ka = row_key("ks", "k", a);
        let kb = row_key("ks", "k", b);
        assert!(ka < kb);
        assert_eq!(parse_row_id(&ka).unwrap(), a);
        // One stream's rows never interleave with another key's.
        assert!(!row_key("ks", "k2", a).starts_with(&key_prefix("ks", "k")));
    }

    #[test]
    fn value_and_row_keys_parse_back() {
        let ks = KeyspaceId {
            name: "orders".into(),
            ty: CrdtType::Set,
        };
        let (back, key) = parse_value_key(&value_key(&ks, "k/1")).unwrap();
        assert_eq!((back, key.as_str()), (ks, "k/1"));
        let id = StreamId::new(Hlc::from_u64(77), ReplicaId(3));
        let (name, key, back) = parse_row_key(&row_key("ev", "user:9", id)).unwrap();
        assert_eq!((name.as_str(), key.as_str(), back), ("ev", "user:9", id));
        assert!(parse_row_key(b"\x05ab").is_err());
        assert!(parse_value_key(b"\x09\x01a").is_err());
    }

    #[test]
    fn log_keys_sort_by_origin_then_seq() {
        assert!(log_key(ReplicaId(1), 300) < log_key(ReplicaId(2), 1));
        assert!(log_key(ReplicaId(1), 2) < log_key(ReplicaId(1), 256));
    }
}
