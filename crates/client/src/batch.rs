//! Many operations in one atomic round trip.

use concord_proto::v1 as pb;
use concord_proto::v1::operation::Op;
use concord_proto::v1::operation_result::Result as OpResult;

use crate::error::{Error, Result};
use crate::handles;
use crate::types::{entries, Page, RegisterValue, StreamId, WriteAck};
use crate::{Client, Retry};

/// Operations that run as one atomic batch in one region: all are applied
/// or none, reads see the writes before them, and results come back in
/// order. A batch holding a write is never retried (see the crate docs);
/// a batch of reads is.
#[derive(Debug, Clone)]
#[must_use = "a batch does nothing until run"]
pub struct Batch {
    client: Client,
    ops: Vec<pb::Operation>,
    writes: bool,
}

/// The result of one operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// A counter's value: after an increment, or as read.
    Counter(i64),
    /// A write's acknowledgement (set add/remove, register set, stream trim).
    Write(WriteAck),
    /// A set's members.
    Members(Vec<Vec<u8>>),
    /// Whether a set holds a member.
    Contains(bool),
    /// A register's value, if written.
    Register(Option<RegisterValue>),
    /// The id of an appended stream entry.
    Appended(StreamId),
    /// Stream entries, and whether more of the range follow (see
    /// [`crate::Stream::page`]).
    Entries(Page),
}

impl Batch {
    pub(crate) fn new(client: Client) -> Self {
        Batch {
            client,
            ops: Vec::new(),
            writes: false,
        }
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn push(mut self, op: Op, write: bool) -> Self {
        self.ops.push(pb::Operation { op: Some(op) });
        self.writes |= write;
        self
    }

    /// Adds `by` to a counter.
    pub fn counter_incr(self, keyspace: &str, key: &str, by: i64) -> Self {
        self.push(
            Op::CounterIncrement(handles::counter_incr(keyspace, key, by)),
            true,
        )
    }

    /// Reads a counter.
    pub fn counter_get(self, keyspace: &str, key: &str) -> Self {
        self.push(Op::CounterGet(handles::counter_get(keyspace, key)), false)
    }

    /// Adds set members.
    pub fn set_add<M: AsRef<[u8]>>(
        self,
        keyspace: &str,
        key: &str,
        members: impl IntoIterator<Item = M>,
    ) -> Self {
        self.push(Op::SetAdd(handles::set_add(keyspace, key, members)), true)
    }

    /// Removes set members.
    pub fn set_remove<M: AsRef<[u8]>>(
        self,
        keyspace: &str,
        key: &str,
        members: impl IntoIterator<Item = M>,
    ) -> Self {
        self.push(
            Op::SetRemove(handles::set_remove(keyspace, key, members)),
            true,
        )
    }

    /// Reads a set's members.
    pub fn set_members(self, keyspace: &str, key: &str) -> Self {
        self.push(Op::SetMembers(handles::set_members(keyspace, key)), false)
    }

    /// Tests set membership.
    pub fn set_contains(self, keyspace: &str, key: &str, member: impl AsRef<[u8]>) -> Self {
        self.push(
            Op::SetContains(handles::set_contains(keyspace, key, member)),
            false,
        )
    }

    /// Writes a register.
    pub fn register_set(self, keyspace: &str, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.push(
            Op::RegisterSet(handles::register_set(keyspace, key, value)),
            true,
        )
    }

    /// Reads a register.
    pub fn register_get(self, keyspace: &str, key: &str) -> Self {
        self.push(Op::RegisterGet(handles::register_get(keyspace, key)), false)
    }

    /// Appends a stream entry.
    pub fn stream_append<N: Into<String>, V: AsRef<[u8]>>(
        self,
        keyspace: &str,
        key: &str,
        fields: impl IntoIterator<Item = (N, V)>,
    ) -> Self {
        self.push(
            Op::StreamAppend(handles::stream_append(keyspace, key, fields)),
            true,
        )
    }

    /// Reads stream entries (see [`crate::Stream::range`]).
    pub fn stream_range(
        self,
        keyspace: &str,
        key: &str,
        from: Option<StreamId>,
        to: Option<StreamId>,
        count: u32,
    ) -> Self {
        self.push(
            Op::StreamRange(handles::stream_range(keyspace, key, from, to, count)),
            false,
        )
    }

    /// Trims a stream.
    pub fn stream_trim(self, keyspace: &str, key: &str, before: StreamId) -> Self {
        self.push(
            Op::StreamTrim(handles::stream_trim(keyspace, key, before)),
            true,
        )
    }

    /// Runs the batch; one result per operation, in order.
    pub async fn run(self) -> Result<Vec<BatchResult>> {
        let retry = if self.writes {
            Retry::Never
        } else {
            Retry::Safe
        };
        let request = pb::BatchRequest {
            operations: self.ops,
        };
        let expected = request.operations.len();
        let response = self
            .client
            .call(retry, move |mut c| {
                let request = request.clone();
                async move { c.batch(request).await }
            })
            .await?;
        if response.results.len() != expected {
            return Err(Error::Protocol(format!(
                "{expected} operations sent, {} results received",
                response.results.len()
            )));
        }
        response
            .results
            .into_iter()
            .map(|r| {
                let r = r
                    .result
                    .ok_or_else(|| Error::Protocol("an empty batch result".into()))?;
                Ok(match r {
                    OpResult::CounterIncrement(r) => BatchResult::Counter(r.value),
                    OpResult::CounterGet(r) => BatchResult::Counter(r.value),
                    OpResult::SetAdd(w)
                    | OpResult::SetRemove(w)
                    | OpResult::RegisterSet(w)
                    | OpResult::StreamTrim(w) => BatchResult::Write(w.into()),
                    OpResult::SetMembers(r) => BatchResult::Members(r.members),
                    OpResult::SetContains(r) => BatchResult::Contains(r.contains),
                    OpResult::RegisterGet(r) => BatchResult::Register(handles::register_value(r)),
                    OpResult::StreamAppend(r) => BatchResult::Appended(handles::appended_id(r)?),
                    OpResult::StreamRange(r) => BatchResult::Entries(Page {
                        entries: entries(r.entries)?,
                        more: r.more,
                    }),
                })
            })
            .collect()
    }
}
