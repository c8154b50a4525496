//! Client requests, validated into typed operations before anything touches
//! the store: one [`ClientOp`] per data request, whether it came alone
//! (`CounterIncrement`, ...) or inside a `Batch`.

use concord_core::crdt::{Field, StreamId};
use concord_core::{CrdtType, Limits};
use concord_proto::v1 as pb;

use crate::error::{NodeError, Result};

/// One operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOp {
    /// Keyspace name or conflict alias (`name#type`).
    pub keyspace: String,
    /// The key.
    pub key: String,
    /// What to do.
    pub kind: OpKind,
}

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Add a signed amount to a counter.
    CounterAdd(i64),
    /// Read a counter.
    CounterGet,
    /// Add members to a set.
    SetAdd(Vec<Vec<u8>>),
    /// Remove members from a set.
    SetRemove(Vec<Vec<u8>>),
    /// Read a set's members.
    SetMembers,
    /// Test a set's membership.
    SetContains(Vec<u8>),
    /// Write a register.
    RegisterSet(Vec<u8>),
    /// Read a register.
    RegisterGet,
    /// Append a stream entry.
    StreamAppend(Vec<Field>),
    /// Read stream entries with `from <= id <= to`, at most `count` (0: the
    /// server's limit).
    StreamRange {
        /// First id.
        from: StreamId,
        /// Last id.
        to: StreamId,
        /// Most entries.
        count: u32,
    },
    /// Trim a stream below an id.
    StreamTrim(StreamId),
}

impl OpKind {
    /// The keyspace type the operation needs.
    pub fn crdt_type(&self) -> CrdtType {
        match self {
            OpKind::CounterAdd(_) | OpKind::CounterGet => CrdtType::Counter,
            OpKind::SetAdd(_)
            | OpKind::SetRemove(_)
            | OpKind::SetMembers
            | OpKind::SetContains(_) => CrdtType::Set,
            OpKind::RegisterSet(_) | OpKind::RegisterGet => CrdtType::Register,
            OpKind::StreamAppend(_) | OpKind::StreamRange { .. } | OpKind::StreamTrim(_) => {
                CrdtType::Stream
            }
        }
    }
}

impl ClientOp {
    /// Checks what can be checked without the store: names and key sizes.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.keyspace.is_empty() {
            return Err(NodeError::InvalidRequest("keyspace name is empty".into()));
        }
        limits.check_key(&self.key)?;
        Ok(())
    }
}

fn op(keyspace: String, key: String, kind: OpKind) -> ClientOp {
    ClientOp {
        keyspace,
        key,
        kind,
    }
}

fn required(id: Option<pb::StreamId>, what: &str) -> Result<StreamId> {
    id.map(StreamId::from)
        .ok_or_else(|| NodeError::InvalidRequest(format!("{what} is required")))
}

impl From<pb::CounterIncrementRequest> for ClientOp {
    fn from(r: pb::CounterIncrementRequest) -> Self {
        op(r.keyspace, r.key, OpKind::CounterAdd(r.delta))
    }
}

impl From<pb::CounterGetRequest> for ClientOp {
    fn from(r: pb::CounterGetRequest) -> Self {
        op(r.keyspace, r.key, OpKind::CounterGet)
    }
}

impl From<pb::SetAddRequest> for ClientOp {
    fn from(r: pb::SetAddRequest) -> Self {
        op(r.keyspace, r.key, OpKind::SetAdd(r.members))
    }
}

impl From<pb::SetRemoveRequest> for ClientOp {
    fn from(r: pb::SetRemoveRequest) -> Self {
        op(r.keyspace, r.key, OpKind::SetRemove(r.members))
    }
}

impl From<pb::SetMembersRequest> for ClientOp {
    fn from(r: pb::SetMembersRequest) -> Self {
        op(r.keyspace, r.key, OpKind::SetMembers)
    }
}

impl From<pb::SetContainsRequest> for ClientOp {
    fn from(r: pb::SetContainsRequest) -> Self {
        op(r.keyspace, r.key, OpKind::SetContains(r.member))
    }
}

impl From<pb::RegisterSetRequest> for ClientOp {
    fn from(r: pb::RegisterSetRequest) -> Self {
        op(r.keyspace, r.key, OpKind::RegisterSet(r.value))
    }
}

impl From<pb::RegisterGetRequest> for ClientOp {
    fn from(r: pb::RegisterGetRequest) -> Self {
        op(r.keyspace, r.key, OpKind::RegisterGet)
    }
}

impl From<pb::StreamAppendRequest> for ClientOp {
    fn from(r: pb::StreamAppendRequest) -> Self {
        let fields = r.fields.into_iter().map(Field::from).collect();
        op(r.keyspace, r.key, OpKind::StreamAppend(fields))
    }
}

impl From<pb::StreamRangeRequest> for ClientOp {
    fn from(r: pb::StreamRangeRequest) -> Self {
        let kind = OpKind::StreamRange {
            from: r.from.map_or(StreamId::MIN, StreamId::from),
            to: r.to.map_or(StreamId::MAX, StreamId::from),
            count: r.count,
        };
        op(r.keyspace, r.key, kind)
    }
}

impl TryFrom<pb::StreamTrimRequest> for ClientOp {
    type Error = NodeError;

    fn try_from(r: pb::StreamTrimRequest) -> Result<Self> {
        let before = required(r.before, "stream trim `before`")?;
        Ok(op(r.keyspace, r.key, OpKind::StreamTrim(before)))
    }
}

impl TryFrom<pb::Operation> for ClientOp {
    type Error = NodeError;

    fn try_from(o: pb::Operation) -> Result<Self> {
        use pb::operation::Op;
        Ok(match o.op {
            None => {
                return Err(NodeError::InvalidRequest(
                    "an operation has no kind set".into(),
                ))
            }
            Some(Op::CounterIncrement(r)) => r.into(),
            Some(Op::CounterGet(r)) => r.into(),
            Some(Op::SetAdd(r)) => r.into(),
            Some(Op::SetRemove(r)) => r.into(),
            Some(Op::SetMembers(r)) => r.into(),
            Some(Op::SetContains(r)) => r.into(),
            Some(Op::RegisterSet(r)) => r.into(),
            Some(Op::RegisterGet(r)) => r.into(),
            Some(Op::StreamAppend(r)) => r.into(),
            Some(Op::StreamRange(r)) => r.into(),
            Some(Op::StreamTrim(r)) => r.try_into()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_without_a_kind_or_a_trim_without_a_bound_is_refused() {
        let err = ClientOp::try_from(pb::Operation { op: None }).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let trim = pb::StreamTrimRequest {
            keyspace: "ev".into(),
            key: "k".into(),
            before: None,
        };
        assert_eq!(
            ClientOp::try_from(trim).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn empty_names_and_oversized_keys_are_refused() {
        let limits = Limits::default();
        let empty = ClientOp::from(pb::CounterGetRequest {
            keyspace: String::new(),
            key: "k".into(),
        });
        assert_eq!(
            empty.validate(&limits).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let long = ClientOp::from(pb::CounterGetRequest {
            keyspace: "c".into(),
            key: "k".repeat(limits.max_key_bytes + 1),
        });
        assert_eq!(
            long.validate(&limits).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }
}
