//! Append-only stream: entries ordered by id `(HLC, replica id)`, trimmed by
//! a replicated max-wins watermark.
//!
//! An entry's id is the `(hlc, origin)` of the delta that appended it, so ids
//! never collide across regions and every region orders entries the same
//! way. The state is the set of entries at or above the trim watermark plus
//! the watermark; merge is the union of entries, the maximum of watermarks,
//! then the removal of entries below the watermark. Union and max are
//! commutative, associative and idempotent, and so is their combination.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::command::{Access, Reply, Stamp};
use crate::error::{CoreError, Result};
use crate::limits::Limits;
use crate::{Hlc, ReplicaId};

/// The id of a stream entry, ordered by timestamp then replica.
///
/// Its text form is `<unix_ms>-<logical>-<replica>`, e.g.
/// `1717171717171-0-2`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct StreamId {
    /// When the entry was appended.
    pub hlc: Hlc,
    /// Which region appended it.
    pub replica: ReplicaId,
}

impl StreamId {
    /// The smallest id.
    pub const MIN: StreamId = StreamId {
        hlc: Hlc::ZERO,
        replica: ReplicaId(0),
    };

    /// The largest id.
    pub const MAX: StreamId = StreamId {
        hlc: Hlc::from_u64(u64::MAX),
        replica: ReplicaId(u32::MAX),
    };

    /// The id of an entry appended by `replica` at `hlc`.
    pub const fn new(hlc: Hlc, replica: ReplicaId) -> Self {
        StreamId { hlc, replica }
    }

    /// The least id above this one, where a range that continues after an
    /// id starts; none above [`StreamId::MAX`].
    pub fn successor(self) -> Option<StreamId> {
        match self.replica.0.checked_add(1) {
            Some(r) => Some(StreamId::new(self.hlc, ReplicaId(r))),
            None => {
                let hlc = self.hlc.as_u64().checked_add(1)?;
                Some(StreamId::new(Hlc::from_u64(hlc), ReplicaId(0)))
            }
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.hlc.unix_ms(),
            self.hlc.logical(),
            self.replica
        )
    }
}

impl FromStr for StreamId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            CoreError::invalid(
                "stream id",
                format!("{s:?} is not of the form <unix_ms>-<logical>-<replica>"),
            )
        };
        let mut parts = s.split('-');
        let (Some(ms), Some(logical), Some(replica), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(logical) || !digits(replica) {
            return Err(bad());
        }
        let ms: i64 = ms.parse().map_err(|_| bad())?;
        let logical: u32 = logical.parse().map_err(|_| bad())?;
        let replica: u32 = replica.parse().map_err(|_| bad())?;
        Ok(StreamId::new(
            Hlc::from_parts(ms, logical)?,
            ReplicaId(replica),
        ))
    }
}

/// One field of a stream entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Field {
    /// Field name, UTF-8.
    pub name: String,
    /// Field value.
    pub value: Vec<u8>,
}

impl Field {
    /// A field.
    pub fn new(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Field {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A stream entry with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry's id.
    pub id: StreamId,
    /// Its fields, in append order.
    pub fields: Vec<Field>,
}

/// A stream operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOp {
    /// Appends an entry whose id is the delta's `(hlc, origin)`.
    Append {
        /// The entry's fields.
        fields: Vec<Field>,
    },
    /// Raises the trim watermark: entries with ids below `before` go.
    Trim {
        /// The new watermark.
        before: StreamId,
    },
}

/// An append-only stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    entries: BTreeMap<StreamId, Vec<Field>>,
    trimmed_before: StreamId,
}

impl Stream {
    /// The operation that appends an entry with `fields`.
    pub fn prepare_append(fields: Vec<Field>) -> StreamOp {
        StreamOp::Append { fields }
    }

    /// The operation that trims entries below `before`. Refuses a watermark
    /// above `now`, the local clock: it would also remove entries that are
    /// appended later, after their append was acknowledged.
    pub fn prepare_trim(before: StreamId, now: Hlc) -> Result<StreamOp> {
        if before.hlc > now {
            return Err(CoreError::invalid(
                "stream trim",
                format!("watermark {before} is in the future (now {now})"),
            ));
        }
        Ok(StreamOp::Trim { before })
    }

    /// Applies an operation made by region `origin` at `hlc`.
    pub fn apply(&mut self, origin: ReplicaId, hlc: Hlc, op: &StreamOp) {
        match op {
            StreamOp::Append { fields } => self.insert(StreamId::new(hlc, origin), fields),
            StreamOp::Trim { before } => self.trim(*before),
        }
    }

    fn insert(&mut self, id: StreamId, fields: &[Field]) {
        if id < self.trimmed_before {
            return;
        }
        match self.entries.get_mut(&id) {
            None => {
                self.entries.insert(id, fields.to_vec());
            }
            // Ids are unique, so an existing entry is the same append seen
            // again. Only a broken peer could send other fields under the
            // same id; keeping the greater keeps replicas convergent.
            Some(existing) => {
                if fields > existing.as_slice() {
                    *existing = fields.to_vec();
                }
            }
        }
    }

    fn trim(&mut self, before: StreamId) {
        if before > self.trimmed_before {
            self.trimmed_before = before;
            self.entries = self.entries.split_off(&before);
        }
    }

    /// A stream made of a watermark and entries; entries below the
    /// watermark are dropped. Lets a store keep entries in rows of their own
    /// and rebuild (a chunk of) the stream from them.
    pub fn from_parts(
        trimmed_before: StreamId,
        entries: impl IntoIterator<Item = (StreamId, Vec<Field>)>,
    ) -> Stream {
        let mut stream = Stream {
            entries: BTreeMap::new(),
            trimmed_before,
        };
        for (id, fields) in entries {
            stream.insert(id, &fields);
        }
        stream
    }

    /// The same stream without its entries: only the trim watermark.
    pub fn watermark_only(&self) -> Stream {
        Stream {
            entries: BTreeMap::new(),
            trimmed_before: self.trimmed_before,
        }
    }

    /// Every entry, in id order.
    pub fn entries(&self) -> impl Iterator<Item = (StreamId, &[Field])> + '_ {
        self.entries.iter().map(|(&id, f)| (id, f.as_slice()))
    }

    /// The entry with id `id`.
    pub fn get(&self, id: StreamId) -> Option<&[Field]> {
        self.entries.get(&id).map(Vec::as_slice)
    }

    /// Entries with `from <= id <= to`, in id order, at most `count`.
    pub fn range(&self, from: StreamId, to: StreamId, count: usize) -> Vec<StreamEntry> {
        if from > to {
            return Vec::new();
        }
        self.collect((Bound::Included(from), Bound::Included(to)), count)
    }

    /// Entries with ids strictly above `after`, in id order, at most `count`.
    pub fn after(&self, after: StreamId, count: usize) -> Vec<StreamEntry> {
        self.collect((Bound::Excluded(after), Bound::Unbounded), count)
    }

    fn collect(&self, range: (Bound<StreamId>, Bound<StreamId>), count: usize) -> Vec<StreamEntry> {
        self.entries
            .range(range)
            .take(count)
            .map(|(&id, fields)| StreamEntry {
                id,
                fields: fields.clone(),
            })
            .collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the stream has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The trim watermark: every entry's id is at or above it.
    pub fn trimmed_before(&self) -> StreamId {
        self.trimmed_before
    }

    /// The greatest id, if any.
    pub fn last_id(&self) -> Option<StreamId> {
        self.entries.last_key_value().map(|(&id, _)| id)
    }

    pub(crate) fn check_invariants(&self) -> Result<()> {
        match self.entries.first_key_value() {
            Some((&first, _)) if first < self.trimmed_before => Err(CoreError::decode(
                "stream",
                format!(
                    "entry {first} is below the trim watermark {}",
                    self.trimmed_before
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What a client asks of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamCommand {
    /// Append an entry; answers its id.
    Append(Vec<Field>),
    /// Read entries with `from <= id <= to`, at most `count` (0 asks for
    /// the most [`Limits::max_range_entries`] allows; see
    /// [`crate::Request::checked`]); the reply says whether more entries
    /// of the range follow.
    Range {
        /// First id.
        from: StreamId,
        /// Last id.
        to: StreamId,
        /// Most entries.
        count: usize,
    },
    /// Trim entries below an id.
    Trim(StreamId),
}

impl StreamCommand {
    /// True for appends and trims.
    pub fn is_write(&self) -> bool {
        matches!(self, StreamCommand::Append(_) | StreamCommand::Trim(_))
    }

    /// A range reads entries; the others only the watermark.
    pub(crate) fn access(&self) -> Access<'_> {
        match *self {
            // One more than asked, to tell whether more follow.
            StreamCommand::Range { from, to, count } => Access::Range {
                from,
                to,
                count: count.saturating_add(1),
            },
            StreamCommand::Append(_) | StreamCommand::Trim(_) => Access::Value,
        }
    }

    /// The operation for this command on `stream` (its watermark is what
    /// a trim needs); none for a read, and for a trim that would not raise
    /// the watermark: it changes nothing, in any region, so it is neither
    /// logged nor replicated.
    pub(crate) fn prepare(&self, stream: &Stream, now: Hlc) -> Result<Option<StreamOp>> {
        match self {
            StreamCommand::Append(fields) => Ok(Some(Stream::prepare_append(fields.clone()))),
            StreamCommand::Trim(before) if *before <= stream.trimmed_before() => Ok(None),
            StreamCommand::Trim(before) => Stream::prepare_trim(*before, now).map(Some),
            StreamCommand::Range { .. } => Ok(None),
        }
    }

    pub(crate) fn reply(
        &self,
        stream: &Stream,
        origin: ReplicaId,
        stamp: Option<Stamp>,
    ) -> Result<Reply> {
        Ok(match *self {
            StreamCommand::Append(_) => {
                let stamp = stamp.ok_or_else(|| CoreError::Bug("an append has no stamp".into()))?;
                Reply::Appended(StreamId::new(stamp.hlc, origin))
            }
            StreamCommand::Range { from, to, count } => {
                let mut entries = stream.range(from, to, count.saturating_add(1));
                let more = entries.len() > count;
                entries.truncate(count);
                Reply::Entries { entries, more }
            }
            StreamCommand::Trim(_) => Reply::Done,
        })
    }
}

#[cfg(feature = "proto")]
mod wire {
    use concord_proto::v1 as pb;
    use pb::operation_result::Result as R;

    use super::{Field, StreamCommand, StreamId};
    use crate::command::{unexpected, written, Command, Outcome, Reply, Request};
    use crate::error::{CoreError, Result};

    impl From<pb::StreamAppendRequest> for Request {
        fn from(r: pb::StreamAppendRequest) -> Self {
            let fields = r.fields.into_iter().map(Field::from).collect();
            Request::new(
                r.keyspace,
                r.key,
                Command::Stream(StreamCommand::Append(fields)),
            )
        }
    }

    impl TryFrom<pb::StreamRangeRequest> for Request {
        type Error = CoreError;

        fn try_from(r: pb::StreamRangeRequest) -> Result<Self> {
            let from = match (r.from, r.after) {
                (Some(_), Some(_)) => {
                    return Err(CoreError::invalid(
                        "stream range",
                        "set `from` (inclusive) or `after` (exclusive), not both",
                    ))
                }
                (Some(from), None) => StreamId::from(from),
                (None, Some(after)) => match StreamId::from(after).successor() {
                    Some(from) => from,
                    // Nothing is above the greatest id: an empty range.
                    None => {
                        return Ok(Request::new(
                            r.keyspace,
                            r.key,
                            Command::Stream(StreamCommand::Range {
                                from: StreamId::MAX,
                                to: StreamId::MIN,
                                count: r.count as usize,
                            }),
                        ))
                    }
                },
                (None, None) => StreamId::MIN,
            };
            let range = StreamCommand::Range {
                from,
                to: r.to.map_or(StreamId::MAX, StreamId::from),
                count: r.count as usize,
            };
            Ok(Request::new(r.keyspace, r.key, Command::Stream(range)))
        }
    }

    impl TryFrom<pb::StreamTrimRequest> for Request {
        type Error = CoreError;

        fn try_from(r: pb::StreamTrimRequest) -> Result<Self> {
            let before = r
                .before
                .ok_or_else(|| CoreError::invalid("stream trim", "`before` is required"))?;
            let trim = StreamCommand::Trim(before.into());
            Ok(Request::new(r.keyspace, r.key, Command::Stream(trim)))
        }
    }

    impl StreamCommand {
        pub(crate) fn result(&self, outcome: Outcome) -> Result<R> {
            Ok(match (self, outcome.reply) {
                (StreamCommand::Append(_), Reply::Appended(id)) => {
                    R::StreamAppend(pb::StreamAppendResponse {
                        id: Some(id.into()),
                        write: Some(written(outcome.write)?),
                    })
                }
                (StreamCommand::Range { .. }, Reply::Entries { entries, more }) => {
                    R::StreamRange(pb::StreamRangeResponse {
                        entries: entries.into_iter().map(Into::into).collect(),
                        more,
                    })
                }
                (StreamCommand::Trim(_), Reply::Done) => R::StreamTrim(written(outcome.write)?),
                (_, reply) => return Err(unexpected(self, &reply)),
            })
        }
    }
}

impl StreamOp {
    /// Checks an append's fields against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let StreamOp::Append { fields } = self else {
            return Ok(());
        };
        if fields.is_empty() {
            return Err(CoreError::invalid("stream entry", "no fields"));
        }
        limits.check(
            "fields in one stream entry",
            limits.max_fields_per_entry,
            fields.len(),
        )?;
        let mut total = 0usize;
        for field in fields {
            if field.name.is_empty() {
                return Err(CoreError::invalid("stream field", "empty name"));
            }
            limits.check(
                "stream field name length (bytes)",
                limits.max_field_name_bytes,
                field.name.len(),
            )?;
            total = total.saturating_add(field.name.len() + field.value.len());
        }
        limits.check("stream entry size (bytes)", limits.max_entry_bytes, total)
    }
}

impl Crdt for Stream {
    fn merge(&mut self, other: &Self) {
        self.trim(other.trimmed_before);
        for (&id, fields) in other.entries.range(self.trimmed_before..) {
            self.insert(id, fields);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms_offset: i64, replica: u32) -> StreamId {
        StreamId::new(
            Hlc::from_parts(crate::clock::HLC_EPOCH_UNIX_MS + ms_offset, 0).unwrap(),
            ReplicaId(replica),
        )
    }

    #[test]
    fn ids_order_and_text_form() {
        let a = id(10, 2);
        let b = id(10, 3);
        let c = id(11, 1);
        assert!(a < b && b < c);
        let text = a.to_string();
        assert_eq!(
            text,
            format!("{}-0-2", crate::clock::HLC_EPOCH_UNIX_MS + 10)
        );
        assert_eq!(text.parse::<StreamId>().unwrap(), a);
        for bad in [
            "",
            "1-2",
            "1-2-3-4",
            "a-0-1",
            "-1-0-1",
            "1704067200000-99999999-1",
            "1-0-1",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_successor_of_an_id_is_the_least_id_above_it() {
        let at = |hlc: u64, r: u32| StreamId::new(Hlc::from_u64(hlc), ReplicaId(r));
        assert_eq!(at(5, 1).successor(), Some(at(5, 2)));
        assert_eq!(at(5, u32::MAX).successor(), Some(at(6, 0)));
        assert_eq!(StreamId::MAX.successor(), None);
        assert_eq!(StreamId::MIN.successor(), Some(at(0, 1)));
    }

    #[test]
    fn trim_is_a_max_wins_watermark() {
        let mut s = Stream::default();
        let f = vec![Field::new("k", "v")];
        for i in 0..5 {
            s.apply(
                ReplicaId(1),
                id(i, 1).hlc,
                &Stream::prepare_append(f.clone()),
            );
        }
        s.apply(
            ReplicaId(1),
            id(9, 1).hlc,
            &StreamOp::Trim { before: id(3, 0) },
        );
        s.apply(
            ReplicaId(1),
            id(9, 1).hlc,
            &StreamOp::Trim { before: id(1, 0) },
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s.trimmed_before(), id(3, 0));
        // A late append below the watermark is dropped.
        s.apply(ReplicaId(2), id(2, 2).hlc, &Stream::prepare_append(f));
        assert_eq!(s.len(), 2);
        assert!(Stream::prepare_trim(id(100, 0), id(50, 0).hlc).is_err());
    }

    #[test]
    fn range_and_after() {
        let mut s = Stream::default();
        for i in 0..10 {
            s.apply(
                ReplicaId(1),
                id(i, 1).hlc,
                &Stream::prepare_append(vec![Field::new("i", i.to_string())]),
            );
        }
        let r = s.range(id(2, 0), id(5, 9), 100);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].id, id(2, 1));
        assert_eq!(s.range(StreamId::MIN, StreamId::MAX, 3).len(), 3);
        assert_eq!(s.after(id(7, 1), 100).len(), 2);
        assert!(s.range(id(5, 0), id(2, 0), 10).is_empty());
    }
}
