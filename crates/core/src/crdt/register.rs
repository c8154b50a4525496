//! Last-writer-wins register over crdts' `LWWReg`, with the marker
//! `(HLC, replica id)`.
//!
//! The write with the greatest marker wins in every region. Markers are
//! unique because every region's HLC is strictly monotonic and the replica id
//! breaks ties between regions. Should two writes ever carry the same marker
//! with different values (only a broken or hostile peer could send that),
//! the greater value wins, so replicas still converge whatever the order.

use crdts::LWWReg;
use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::command::Reply;
use crate::error::Result;
use crate::limits::Limits;
use crate::{Hlc, Marker, ReplicaId};

/// A last-writer-wins register holding bytes; empty until first written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    inner: Option<LWWReg<Vec<u8>, Marker>>,
}

/// Writes the register with the marker of the delta that carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterOp {
    /// The new value.
    pub value: Vec<u8>,
}

impl Register {
    /// The winning value and its marker; `None` before the first write.
    pub fn get(&self) -> Option<(&[u8], Marker)> {
        self.inner.as_ref().map(|r| (r.val.as_slice(), r.marker))
    }

    /// The operation that writes `value`.
    pub fn prepare_set(value: Vec<u8>) -> RegisterOp {
        RegisterOp { value }
    }

    /// Applies a write made by region `origin` at `hlc`.
    pub fn apply(&mut self, origin: ReplicaId, hlc: Hlc, op: &RegisterOp) {
        self.offer(&op.value, Marker::new(hlc, origin));
    }

    fn offer(&mut self, value: &[u8], marker: Marker) {
        match &mut self.inner {
            None => {
                self.inner = Some(LWWReg {
                    val: value.to_vec(),
                    marker,
                })
            }
            Some(reg) => {
                let wins =
                    marker > reg.marker || (marker == reg.marker && value > reg.val.as_slice());
                if wins {
                    reg.val = value.to_vec();
                    reg.marker = marker;
                }
            }
        }
    }
}

/// What a client asks of a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterCommand {
    /// Write a value.
    Set(Vec<u8>),
    /// Read the value.
    Get,
}

impl RegisterCommand {
    /// True for [`RegisterCommand::Set`].
    pub fn is_write(&self) -> bool {
        matches!(self, RegisterCommand::Set(_))
    }

    pub(crate) fn prepare(&self) -> Option<RegisterOp> {
        match self {
            RegisterCommand::Set(value) => Some(Register::prepare_set(value.clone())),
            RegisterCommand::Get => None,
        }
    }

    pub(crate) fn reply(&self, register: &Register) -> Reply {
        match self {
            RegisterCommand::Set(_) => Reply::Done,
            RegisterCommand::Get => Reply::Register(
                register
                    .get()
                    .map(|(value, marker)| (value.to_vec(), marker)),
            ),
        }
    }
}

#[cfg(feature = "proto")]
mod wire {
    use concord_proto::v1 as pb;
    use pb::operation_result::Result as R;

    use super::RegisterCommand;
    use crate::command::{unexpected, written, Command, Outcome, Reply, Request};
    use crate::error::Result;

    impl From<pb::RegisterSetRequest> for Request {
        fn from(r: pb::RegisterSetRequest) -> Self {
            Request::new(
                r.keyspace,
                r.key,
                Command::Register(RegisterCommand::Set(r.value)),
            )
        }
    }

    impl From<pb::RegisterGetRequest> for Request {
        fn from(r: pb::RegisterGetRequest) -> Self {
            Request::new(r.keyspace, r.key, Command::Register(RegisterCommand::Get))
        }
    }

    impl RegisterCommand {
        pub(crate) fn result(&self, outcome: Outcome) -> Result<R> {
            Ok(match (self, outcome.reply) {
                (RegisterCommand::Set(_), Reply::Done) => R::RegisterSet(written(outcome.write)?),
                (RegisterCommand::Get, Reply::Register(found)) => R::RegisterGet(match found {
                    None => pb::RegisterGetResponse::default(),
                    Some((value, marker)) => pb::RegisterGetResponse {
                        found: true,
                        value,
                        hlc: marker.hlc.as_u64(),
                        replica: marker.replica.0,
                    },
                }),
                (_, reply) => return Err(unexpected(self, &reply)),
            })
        }
    }
}

impl RegisterOp {
    /// Checks the value against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        limits.check(
            "register value length (bytes)",
            limits.max_value_bytes,
            self.value.len(),
        )
    }
}

impl Crdt for Register {
    fn merge(&mut self, other: &Self) {
        if let Some(reg) = &other.inner {
            self.offer(&reg.val, reg.marker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greatest_marker_wins_ties_break_on_replica() {
        let t = Hlc::from_u64(1 << 40);
        let mut a = Register::default();
        let mut b = Register::default();
        let w1 = Register::prepare_set(b"one".to_vec());
        let w2 = Register::prepare_set(b"two".to_vec());
        a.apply(ReplicaId(2), t, &w1);
        a.apply(ReplicaId(1), t, &w2);
        b.apply(ReplicaId(1), t, &w2);
        b.apply(ReplicaId(2), t, &w1);
        assert_eq!(a, b);
        assert_eq!(a.get().unwrap().0, b"one");
        let later = Register::prepare_set(b"three".to_vec());
        b.apply(ReplicaId(1), Hlc::from_u64((1 << 40) + 1), &later);
        a.merge(&b);
        assert_eq!(a.get().unwrap().0, b"three");
    }
}
