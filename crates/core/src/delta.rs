//! A replicated change and its binary encoding.
//!
//! A [`Delta`] is one operation made in one region: `(origin, seq, hlc,
//! keyspace, key, op)`. Each origin numbers its deltas 1, 2, 3... with no
//! gaps; every region applies each `(origin, seq)` exactly once, in `seq`
//! order per origin.
//!
//! The encoding is one format-version byte followed by postcard (varint
//! integers, length-prefixed strings and bytes): compact, and cheap to
//! decode. Decoding checks the size limit before anything else, refuses
//! trailing bytes and validates the result, so hostile bytes yield an error,
//! never a panic, and allocation stays bounded by a small multiple of the
//! input length.

use serde::{Deserialize, Serialize};

use crate::crdt::Op;
use crate::error::{CoreError, Result};
use crate::limits::{check_keyspace_name, Limits};
use crate::{Hlc, Marker, ReplicaId};

/// Version byte in front of every encoded delta.
const DELTA_FORMAT_V1: u8 = 1;

/// One replicated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The region that made the change.
    pub origin: ReplicaId,
    /// Its position in the origin's log, from 1, without gaps.
    pub seq: u64,
    /// The origin's clock when it made the change.
    pub hlc: Hlc,
    /// Keyspace name.
    pub keyspace: String,
    /// Key; empty for a keyspace declaration.
    pub key: String,
    /// The operation.
    pub op: Op,
}

impl Delta {
    /// The change's marker `(hlc, origin)`: the LWW marker of a register
    /// write, the id of a stream append, the age of a declaration.
    pub fn marker(&self) -> Marker {
        Marker::new(self.hlc, self.origin)
    }

    /// Checks sequence number, names and sizes.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.seq == 0 {
            return Err(CoreError::invalid("delta", "sequence numbers start at 1"));
        }
        check_keyspace_name(&self.keyspace)?;
        match self.op {
            Op::Declare(_) if !self.key.is_empty() => {
                return Err(CoreError::invalid(
                    "delta",
                    "a keyspace declaration has no key",
                ))
            }
            Op::Declare(_) => {}
            _ => limits.check_key(&self.key)?,
        }
        self.op.validate(limits)
    }

    /// Encodes the delta.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode(DELTA_FORMAT_V1, self)
    }

    /// Validates the delta and encodes it, refusing an encoding larger than
    /// `limits.max_delta_bytes`.
    pub fn encode_checked(&self, limits: &Limits) -> Result<Vec<u8>> {
        self.validate(limits)?;
        let bytes = self.encode();
        limits.check("delta size (bytes)", limits.max_delta_bytes, bytes.len())?;
        Ok(bytes)
    }

    /// Decodes and validates a delta.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Delta> {
        limits.check("delta size (bytes)", limits.max_delta_bytes, bytes.len())?;
        let delta: Delta = crate::codec::decode("delta", DELTA_FORMAT_V1, bytes)?;
        delta.validate(limits)?;
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{CrdtType, SetOp};

    fn sample() -> Delta {
        Delta {
            origin: ReplicaId(7),
            seq: 3,
            hlc: Hlc::from_u64(1 << 41),
            keyspace: "carts".into(),
            key: "alice".into(),
            op: Op::Set(SetOp::Add {
                dot_counter: 2,
                members: vec![b"apple".to_vec()],
            }),
        }
    }

    #[test]
    fn round_trip_is_compact() {
        let d = sample();
        let bytes = d.encode();
        assert!(bytes.len() < 32, "{} bytes", bytes.len());
        assert_eq!(Delta::decode(&bytes, &Limits::default()).unwrap(), d);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let limits = Limits::default();
        let bytes = sample().encode();
        assert!(Delta::decode(&[], &limits).is_err());
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert!(matches!(
            Delta::decode(&v2, &limits),
            Err(CoreError::UnsupportedFormat { version: 2, .. })
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Delta::decode(&trailing, &limits).is_err());
        for cut in 0..bytes.len() {
            assert!(Delta::decode(&bytes[..cut], &limits).is_err());
        }
        let small = Limits {
            max_delta_bytes: 8,
            ..Limits::default()
        };
        assert!(matches!(
            Delta::decode(&bytes, &small),
            Err(CoreError::LimitExceeded { .. })
        ));
        let declare_with_key = Delta {
            op: Op::Declare(CrdtType::Set),
            ..sample()
        };
        assert!(declare_with_key.validate(&limits).is_err());
        let seq0 = Delta { seq: 0, ..sample() };
        assert!(Delta::decode(&seq0.encode(), &limits).is_err());
    }
}
