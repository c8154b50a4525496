//! Plain Rust types for what the API sends and returns.

use std::fmt;
use std::str::FromStr;

use concord_proto::v1 as pb;

use crate::error::{Error, Result};

/// Unix milliseconds of the HLC epoch, 2024-01-01T00:00:00Z.
const HLC_EPOCH_UNIX_MS: u64 = 1_704_067_200_000;
/// Bits of the HLC's logical counter.
const LOGICAL_BITS: u32 = 22;

/// A keyspace's CRDT type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyspaceType {
    /// PN-counter: the sum of every increment and decrement.
    Counter,
    /// Add-wins observed-remove set of byte strings.
    Set,
    /// Last-writer-wins register of a byte string.
    Register,
    /// Append-only log of entries, ordered the same in every region.
    Stream,
}

impl KeyspaceType {
    /// The lowercase name: `counter`, `set`, `register` or `stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyspaceType::Counter => "counter",
            KeyspaceType::Set => "set",
            KeyspaceType::Register => "register",
            KeyspaceType::Stream => "stream",
        }
    }

    pub(crate) fn to_proto(self) -> pb::CrdtType {
        match self {
            KeyspaceType::Counter => pb::CrdtType::Counter,
            KeyspaceType::Set => pb::CrdtType::Set,
            KeyspaceType::Register => pb::CrdtType::Register,
            KeyspaceType::Stream => pb::CrdtType::Stream,
        }
    }

    pub(crate) fn from_proto(raw: i32) -> Result<Self> {
        match pb::CrdtType::try_from(raw) {
            Ok(pb::CrdtType::Counter) => Ok(KeyspaceType::Counter),
            Ok(pb::CrdtType::Set) => Ok(KeyspaceType::Set),
            Ok(pb::CrdtType::Register) => Ok(KeyspaceType::Register),
            Ok(pb::CrdtType::Stream) => Ok(KeyspaceType::Stream),
            _ => Err(Error::Protocol(format!("unknown keyspace type {raw}"))),
        }
    }
}

impl fmt::Display for KeyspaceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyspaceType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "counter" => Ok(KeyspaceType::Counter),
            "set" => Ok(KeyspaceType::Set),
            "register" => Ok(KeyspaceType::Register),
            "stream" => Ok(KeyspaceType::Stream),
            other => Err(Error::InvalidArgument(format!(
                "{other:?} is not a keyspace type; use counter, set, register or stream"
            ))),
        }
    }
}

/// A keyspace as a region sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceInfo {
    /// Name.
    pub name: String,
    /// The type operations on `name` use.
    pub ty: KeyspaceType,
    /// HLC of the declaration that holds the name.
    pub created_hlc: u64,
    /// Replica id of the region that made it.
    pub created_by: u32,
    /// Declarations of the same name with other types, made concurrently
    /// elsewhere; their data stays reachable under their alias.
    pub conflicts: Vec<KeyspaceConflict>,
}

/// A declaration that lost its keyspace's name to an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceConflict {
    /// Its type.
    pub ty: KeyspaceType,
    /// The name its data is reachable under, `<name>#<type>`.
    pub alias: String,
    /// HLC of the declaration.
    pub created_hlc: u64,
    /// Replica id of the region that made it.
    pub created_by: u32,
}

impl TryFrom<pb::KeyspaceInfo> for KeyspaceInfo {
    type Error = Error;

    fn try_from(info: pb::KeyspaceInfo) -> Result<Self> {
        Ok(KeyspaceInfo {
            ty: KeyspaceType::from_proto(info.r#type)?,
            name: info.name,
            created_hlc: info.created_hlc,
            created_by: info.created_by,
            conflicts: info
                .conflicts
                .into_iter()
                .map(|c| {
                    Ok(KeyspaceConflict {
                        ty: KeyspaceType::from_proto(c.r#type)?,
                        alias: c.alias,
                        created_hlc: c.created_hlc,
                        created_by: c.created_by,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// Acknowledgement of a write: durable in the region that took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// HLC the region stamped on the write; 0 when the write changed
    /// nothing (`seq` 0).
    pub hlc: u64,
    /// The write's position in the region's log; 0 when it changed nothing.
    pub seq: u64,
}

impl From<pb::WriteResponse> for WriteAck {
    fn from(w: pb::WriteResponse) -> Self {
        WriteAck {
            hlc: w.hlc,
            seq: w.seq,
        }
    }
}

pub(crate) fn ack(w: Option<pb::WriteResponse>) -> Result<WriteAck> {
    w.map(WriteAck::from)
        .ok_or_else(|| Error::Protocol("a write was acknowledged without its ack".into()))
}

/// A register's winning value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterValue {
    /// The value.
    pub value: Vec<u8>,
    /// HLC of the winning write.
    pub hlc: u64,
    /// Replica id of the region that made it.
    pub replica: u32,
}

/// A stream entry's id: its append HLC and the appending region's replica
/// id. Ids order a stream the same way in every region. Its text form is
/// `<unix_ms>-<logical>-<replica>`, e.g. `1732000000000-0-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// The HLC.
    pub hlc: u64,
    /// The replica id.
    pub replica: u32,
}

impl StreamId {
    /// The smallest id: every entry is at or after it.
    pub const MIN: StreamId = StreamId { hlc: 0, replica: 0 };

    /// Unix milliseconds of the id's HLC.
    pub fn unix_ms(&self) -> u64 {
        (self.hlc >> LOGICAL_BITS) + HLC_EPOCH_UNIX_MS
    }

    /// The logical counter of the id's HLC.
    pub fn logical(&self) -> u32 {
        (self.hlc & ((1 << LOGICAL_BITS) - 1)) as u32
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.unix_ms(), self.logical(), self.replica)
    }
}

impl FromStr for StreamId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("stream id {s:?}: {why}"));
        let parts: Vec<&str> = s.split('-').collect();
        let shape = || {
            bad("not of the form <unix_ms>-<logical>-<replica>, three decimal numbers (e.g. 1795580908332-0-1)".into())
        };
        let [ms, logical, replica] = parts[..] else {
            return Err(shape());
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(logical) || !digits(replica) {
            return Err(shape());
        }
        let max_ms = HLC_EPOCH_UNIX_MS + (1 << (64 - LOGICAL_BITS)) - 1;
        let max_logical = (1u64 << LOGICAL_BITS) - 1;
        let ms = ms
            .parse::<u64>()
            .ok()
            .filter(|ms| (HLC_EPOCH_UNIX_MS..=max_ms).contains(ms))
            .ok_or_else(|| {
                bad(format!(
                    "its time {ms} is outside the clock's range, {HLC_EPOCH_UNIX_MS} to {max_ms} unix ms (leave the bound out for the start or the end of the stream)"
                ))
            })?;
        let logical = logical
            .parse::<u64>()
            .ok()
            .filter(|l| *l <= max_logical)
            .ok_or_else(|| {
                bad(format!(
                    "its logical counter {logical} is above {max_logical}"
                ))
            })?;
        let replica: u32 = replica
            .parse()
            .map_err(|_| bad(format!("its replica id {replica} is above {}", u32::MAX)))?;
        let since = ms - HLC_EPOCH_UNIX_MS;
        Ok(StreamId {
            hlc: (since << LOGICAL_BITS) | logical,
            replica,
        })
    }
}

impl From<StreamId> for pb::StreamId {
    fn from(id: StreamId) -> Self {
        pb::StreamId {
            hlc: id.hlc,
            replica: id.replica,
        }
    }
}

impl From<pb::StreamId> for StreamId {
    fn from(id: pb::StreamId) -> Self {
        StreamId {
            hlc: id.hlc,
            replica: id.replica,
        }
    }
}

/// Where a page of a stream starts ([`crate::Stream::page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeStart {
    /// At the stream's first entry.
    Beginning,
    /// At this id, inclusive.
    From(StreamId),
    /// Right after this id: the last id of the previous page.
    After(StreamId),
}

/// A page of a stream ([`crate::Stream::page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The entries, in id order.
    pub entries: Vec<Entry>,
    /// True when more entries follow the last one (within the range asked
    /// for): ask again after its id.
    pub more: bool,
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id.
    pub id: StreamId,
    /// Its fields, in append order: name and value.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl TryFrom<pb::StreamEntry> for Entry {
    type Error = Error;

    fn try_from(e: pb::StreamEntry) -> Result<Self> {
        let id =
            e.id.ok_or_else(|| Error::Protocol("a stream entry without an id".into()))?;
        Ok(Entry {
            id: id.into(),
            fields: e.fields.into_iter().map(|f| (f.name, f.value)).collect(),
        })
    }
}

pub(crate) fn entries(raw: Vec<pb::StreamEntry>) -> Result<Vec<Entry>> {
    raw.into_iter().map(Entry::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip_through_text() {
        let id = StreamId {
            hlc: (123_456 << LOGICAL_BITS) | 7,
            replica: 3,
        };
        let text = id.to_string();
        assert_eq!(text, format!("{}-7-3", HLC_EPOCH_UNIX_MS + 123_456));
        assert_eq!(text.parse::<StreamId>().expect("parses"), id);
    }

    #[test]
    fn the_text_form_is_the_servers() {
        // The node prints and parses ids with concord-core; the two must agree.
        let core = concord_core::crdt::StreamId::new(
            concord_core::Hlc::from_parts(1_732_000_000_123, 42).expect("hlc"),
            concord_core::ReplicaId(9),
        );
        let ours: StreamId = core.to_string().parse().expect("parses");
        assert_eq!(ours.hlc, core.hlc.as_u64());
        assert_eq!(ours.replica, 9);
        assert_eq!(ours.to_string(), core.to_string());
    }

    #[test]
    fn bad_stream_ids_are_refused() {
        for bad in [
            "",
            "1-2",
            "1-2-3-4",
            "a-0-1",
            "-0-1",
            "1000-0-1",
            "1732000000000-4194304-1",
            "1732000000000-0-4294967296",
            "1732000000000-0-+1",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?}");
        }
        // Each says what is wrong with it.
        for (bad, says) in [
            ("1-2", "not of the form"),
            ("0-0-1", "its time 0 is outside the clock's range"),
            (
                "1732000000000-4194304-1",
                "its logical counter 4194304 is above",
            ),
            (
                "1732000000000-0-4294967296",
                "its replica id 4294967296 is above",
            ),
        ] {
            let e = bad.parse::<StreamId>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn keyspace_types_parse_and_print() {
        for ty in [
            KeyspaceType::Counter,
            KeyspaceType::Set,
            KeyspaceType::Register,
            KeyspaceType::Stream,
        ] {
            assert_eq!(ty.as_str().parse::<KeyspaceType>().expect("parses"), ty);
        }
        assert!("map".parse::<KeyspaceType>().is_err());
    }
}

/// A region's health, as its gRPC health service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Serving requests.
    Serving,
    /// Up but not serving: shutting down, or not ready.
    NotServing,
    /// The service reported a status this SDK does not know.
    Unknown,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Serving => "SERVING",
            Health::NotServing => "NOT_SERVING",
            Health::Unknown => "UNKNOWN",
        })
    }
}
