//! Conversions between core types and the generated protobuf messages of
//! `concord-proto` (feature `proto`).
//!
//! Conversions into protobuf are infallible. Conversions from protobuf
//! validate: unset required fields, UNSPECIFIED enums and out-of-range values
//! are [`CoreError::Invalid`]; [`delta_from_proto`] also applies
//! [`Delta::validate`].

use concord_proto::v1 as pb;

use crate::catalog::{Conflict, KeyspaceView};
use crate::crdt::{
    CounterOp, CrdtType, Direction, Field, Op, RegisterOp, SetOp, StreamEntry, StreamId, StreamOp,
};
use crate::error::{CoreError, Result};
use crate::limits::Limits;
use crate::{Delta, Hlc, Marker, ReplicaId, VersionVector};

impl From<CrdtType> for pb::CrdtType {
    fn from(ty: CrdtType) -> Self {
        match ty {
            CrdtType::Counter => pb::CrdtType::Counter,
            CrdtType::Set => pb::CrdtType::Set,
            CrdtType::Register => pb::CrdtType::Register,
            CrdtType::Stream => pb::CrdtType::Stream,
        }
    }
}

/// Reads a `CrdtType` enum field, refusing UNSPECIFIED and unknown values.
pub fn crdt_type_from_proto(raw: i32) -> Result<CrdtType> {
    match pb::CrdtType::try_from(raw) {
        Ok(pb::CrdtType::Counter) => Ok(CrdtType::Counter),
        Ok(pb::CrdtType::Set) => Ok(CrdtType::Set),
        Ok(pb::CrdtType::Register) => Ok(CrdtType::Register),
        Ok(pb::CrdtType::Stream) => Ok(CrdtType::Stream),
        Ok(pb::CrdtType::Unspecified) => Err(CoreError::invalid("type", "type is unspecified")),
        Err(_) => Err(CoreError::invalid(
            "type",
            format!("{raw} is not a known CRDT type"),
        )),
    }
}

impl From<StreamId> for pb::StreamId {
    fn from(id: StreamId) -> Self {
        pb::StreamId {
            hlc: id.hlc.as_u64(),
            replica: id.replica.0,
        }
    }
}

impl From<pb::StreamId> for StreamId {
    fn from(id: pb::StreamId) -> Self {
        StreamId::new(Hlc::from_u64(id.hlc), ReplicaId(id.replica))
    }
}

impl From<Field> for pb::StreamField {
    fn from(f: Field) -> Self {
        pb::StreamField {
            name: f.name,
            value: f.value,
        }
    }
}

impl From<pb::StreamField> for Field {
    fn from(f: pb::StreamField) -> Self {
        Field {
            name: f.name,
            value: f.value,
        }
    }
}

impl From<StreamEntry> for pb::StreamEntry {
    fn from(e: StreamEntry) -> Self {
        pb::StreamEntry {
            id: Some(e.id.into()),
            fields: e.fields.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<&VersionVector> for pb::VersionVector {
    fn from(vv: &VersionVector) -> Self {
        pb::VersionVector {
            seqs: vv.iter().map(|(r, s)| (r.0, s)).collect(),
        }
    }
}

impl From<pb::VersionVector> for VersionVector {
    fn from(vv: pb::VersionVector) -> Self {
        vv.seqs
            .into_iter()
            .map(|(r, s)| (ReplicaId(r), s))
            .collect()
    }
}

impl From<&KeyspaceView> for pb::KeyspaceInfo {
    fn from(v: &KeyspaceView) -> Self {
        pb::KeyspaceInfo {
            name: v.name.clone(),
            r#type: pb::CrdtType::from(v.ty).into(),
            created_hlc: v.created.hlc.as_u64(),
            created_by: v.created.replica.0,
            conflicts: v.conflicts.iter().map(Into::into).collect(),
        }
    }
}

impl From<&Conflict> for pb::KeyspaceConflict {
    fn from(c: &Conflict) -> Self {
        pb::KeyspaceConflict {
            r#type: pb::CrdtType::from(c.ty).into(),
            alias: c.alias.clone(),
            created_hlc: c.created.hlc.as_u64(),
            created_by: c.created.replica.0,
        }
    }
}

/// A catalog declaration as sent in snapshots.
pub fn declaration_to_proto(name: &str, ty: CrdtType, created: Marker) -> pb::KeyspaceDeclaration {
    pb::KeyspaceDeclaration {
        name: name.to_string(),
        r#type: pb::CrdtType::from(ty).into(),
        created_hlc: created.hlc.as_u64(),
        created_by: created.replica.0,
    }
}

/// Reads a catalog declaration from a snapshot.
pub fn declaration_from_proto(d: pb::KeyspaceDeclaration) -> Result<(String, CrdtType, Marker)> {
    crate::limits::check_keyspace_name(&d.name)?;
    let ty = crdt_type_from_proto(d.r#type)?;
    let marker = Marker::new(Hlc::from_u64(d.created_hlc), ReplicaId(d.created_by));
    Ok((d.name, ty, marker))
}

impl From<&Op> for pb::Op {
    fn from(op: &Op) -> Self {
        use pb::op::Kind;
        let kind = match op {
            Op::Declare(ty) => Kind::DeclareKeyspace(pb::DeclareKeyspaceOp {
                r#type: pb::CrdtType::from(*ty).into(),
            }),
            Op::Counter(c) => Kind::Counter(pb::CounterOp {
                direction: match c.direction {
                    Direction::Increment => pb::CounterDirection::Increment,
                    Direction::Decrement => pb::CounterDirection::Decrement,
                }
                .into(),
                total: c.total,
            }),
            Op::Set(SetOp::Add {
                dot_counter,
                members,
            }) => Kind::SetAdd(pb::SetAddOp {
                dot_counter: *dot_counter,
                members: members.clone(),
            }),
            Op::Set(SetOp::Remove { observed, members }) => Kind::SetRemove(pb::SetRemoveOp {
                observed: observed.iter().map(|(r, c)| (r.0, *c)).collect(),
                members: members.clone(),
            }),
            Op::Register(r) => Kind::RegisterSet(pb::RegisterSetOp {
                value: r.value.clone(),
            }),
            Op::Stream(StreamOp::Append { fields }) => Kind::StreamAppend(pb::StreamAppendOp {
                fields: fields.iter().cloned().map(Into::into).collect(),
            }),
            Op::Stream(StreamOp::Trim { before }) => Kind::StreamTrim(pb::StreamTrimOp {
                before: Some((*before).into()),
            }),
        };
        pb::Op { kind: Some(kind) }
    }
}

impl TryFrom<pb::Op> for Op {
    type Error = CoreError;

    fn try_from(op: pb::Op) -> Result<Self> {
        use pb::op::Kind;
        let kind = op
            .kind
            .ok_or_else(|| CoreError::invalid("operation", "no operation set"))?;
        Ok(match kind {
            Kind::DeclareKeyspace(d) => Op::Declare(crdt_type_from_proto(d.r#type)?),
            Kind::Counter(c) => {
                let direction = match pb::CounterDirection::try_from(c.direction) {
                    Ok(pb::CounterDirection::Increment) => Direction::Increment,
                    Ok(pb::CounterDirection::Decrement) => Direction::Decrement,
                    _ => {
                        return Err(CoreError::invalid(
                            "counter operation",
                            format!("direction {} is not INCREMENT or DECREMENT", c.direction),
                        ))
                    }
                };
                Op::Counter(CounterOp {
                    direction,
                    total: c.total,
                })
            }
            Kind::SetAdd(a) => Op::Set(SetOp::Add {
                dot_counter: a.dot_counter,
                members: a.members,
            }),
            Kind::SetRemove(r) => Op::Set(SetOp::Remove {
                observed: r
                    .observed
                    .into_iter()
                    .map(|(replica, c)| (ReplicaId(replica), c))
                    .collect(),
                members: r.members,
            }),
            Kind::RegisterSet(r) => Op::Register(RegisterOp { value: r.value }),
            Kind::StreamAppend(a) => Op::Stream(StreamOp::Append {
                fields: a.fields.into_iter().map(Into::into).collect(),
            }),
            Kind::StreamTrim(t) => Op::Stream(StreamOp::Trim {
                before: t
                    .before
                    .ok_or_else(|| CoreError::invalid("stream trim", "no watermark set"))?
                    .into(),
            }),
        })
    }
}

impl From<&Delta> for pb::Delta {
    fn from(d: &Delta) -> Self {
        pb::Delta {
            origin: d.origin.0,
            seq: d.seq,
            hlc: d.hlc.as_u64(),
            keyspace: d.keyspace.clone(),
            key: d.key.clone(),
            op: Some((&d.op).into()),
        }
    }
}

/// Reads and validates a delta received from a peer.
pub fn delta_from_proto(d: pb::Delta, limits: &Limits) -> Result<Delta> {
    let op =
        d.op.ok_or_else(|| CoreError::invalid("delta", "no operation set"))?
            .try_into()?;
    let delta = Delta {
        origin: ReplicaId(d.origin),
        seq: d.seq,
        hlc: Hlc::from_u64(d.hlc),
        keyspace: d.keyspace,
        key: d.key,
        op,
    };
    delta.validate(limits)?;
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_and_unknown_enums_are_refused() {
        assert!(crdt_type_from_proto(0).is_err());
        assert!(crdt_type_from_proto(99).is_err());
        assert_eq!(crdt_type_from_proto(2).unwrap(), CrdtType::Set);
        let op = pb::Op {
            kind: Some(pb::op::Kind::Counter(pb::CounterOp {
                direction: 0,
                total: 1,
            })),
        };
        assert!(Op::try_from(op).is_err());
        assert!(Op::try_from(pb::Op { kind: None }).is_err());
    }

    #[test]
    fn delta_without_op_is_refused() {
        let d = pb::Delta {
            origin: 1,
            seq: 1,
            hlc: 1,
            keyspace: "ks".into(),
            key: "k".into(),
            op: None,
        };
        assert!(delta_from_proto(d, &Limits::default()).is_err());
    }
}
