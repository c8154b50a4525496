//! Conversions between core types and the generated protobuf messages of
//! `concord-proto` (feature `proto`).
//!
//! Conversions into protobuf are infallible. Conversions from protobuf
//! validate: unset required fields, UNSPECIFIED enums and out-of-range values
//! are [`CoreError::Invalid`]. Deltas travel between peers in their own
//! binary encoding ([`crate::Delta::encode`]), not as protobuf messages;
//! each type's requests and results convert in the type's module
//! ([`crate::crdt`]).

use concord_proto::v1 as pb;

use crate::catalog::{Conflict, KeyspaceView};
use crate::crdt::{CrdtType, Field, StreamEntry, StreamId};
use crate::error::{CoreError, Result};
use crate::{Hlc, Marker, ReplicaId, VersionVector};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_and_unknown_enums_are_refused() {
        assert!(crdt_type_from_proto(0).is_err());
        assert!(crdt_type_from_proto(99).is_err());
        assert_eq!(crdt_type_from_proto(2).unwrap(), CrdtType::Set);
    }
}
