//! The CRDT value types of concord and their operations.
//!
//! | type | CRDT | module |
//! |---|---|---|
//! | counter | PN-counter (crdts `PNCounter`) | [`counter`] |
//! | set | OR-set, add-wins (crdts `Orswot`) | [`set`] |
//! | register | LWW register (crdts `LWWReg`, marker (HLC, replica)) | [`register`] |
//! | stream | append-only log ordered by (HLC, replica), max-wins trim | [`stream`] |
//!
//! Every type is both state-based (full states merge with [`Crdt::merge`],
//! used for snapshots) and operation-based (a client's command prepares an
//! operation from the current state, see [`crate::command`]; the operation
//! travels in a [`Delta`](crate::Delta) and is applied in every region).
//!
//! Operations are applied exactly once per `(origin, seq)` and in per-origin
//! order; the replication layer guarantees both. They are nevertheless
//! idempotent, so a redelivered operation, or one already covered by a merged
//! snapshot, changes nothing.

pub mod counter;
pub mod register;
pub mod set;
pub mod stream;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::limits::Limits;
use crate::{Hlc, ReplicaId};

pub use counter::{Counter, CounterCommand, CounterOp, Direction};
pub use register::{Register, RegisterCommand, RegisterOp};
pub use set::{MemberDots, Set, SetCommand, SetHeader, SetOp};
pub use stream::{Field, Stream, StreamCommand, StreamEntry, StreamId, StreamOp};

/// A state-based CRDT: states form a join-semilattice under [`Crdt::merge`].
///
/// For all states `a`, `b`, `c` reachable by applying operations and merges:
///
/// - **commutativity**: `a ⊔ b = b ⊔ a`;
/// - **associativity**: `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)`;
/// - **idempotence**: `a ⊔ a = a`.
///
/// Together these make replicas that have seen the same updates, in any order
/// and any number of times, equal. And for the operation side: applying every
/// operation of every origin (each origin's in order) yields the same state as
/// merging the states of the origins that made them.
///
/// These laws are checked by property tests in `tests/properties.rs`.
pub trait Crdt {
    /// Joins `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// The CRDT type of a keyspace. Its serde names are the lowercase ones of
/// the configuration file (binary encodings use the variant's index).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrdtType {
    /// PN-counter.
    Counter,
    /// Add-wins observed-remove set.
    Set,
    /// Last-writer-wins register.
    Register,
    /// Append-only stream.
    Stream,
}

impl CrdtType {
    /// Every type, in a fixed order.
    pub const ALL: [CrdtType; 4] = [
        CrdtType::Counter,
        CrdtType::Set,
        CrdtType::Register,
        CrdtType::Stream,
    ];

    /// The lowercase name used in the CLI, configuration and aliases.
    pub const fn as_str(self) -> &'static str {
        match self {
            CrdtType::Counter => "counter",
            CrdtType::Set => "set",
            CrdtType::Register => "register",
            CrdtType::Stream => "stream",
        }
    }
}

impl fmt::Display for CrdtType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CrdtType {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self> {
        CrdtType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                CoreError::invalid(
                    "type",
                    format!("{s:?} is not one of counter, set, register, stream"),
                )
            })
    }
}

/// The value of one key: one of the four CRDT types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// A counter.
    Counter(Counter),
    /// A set.
    Set(Set),
    /// A register.
    Register(Register),
    /// A stream.
    Stream(Stream),
}

/// An operation, as carried by a [`Delta`](crate::Delta).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Declares the delta's keyspace with a type (a catalog change; the key
    /// is empty).
    Declare(CrdtType),
    /// Changes a counter.
    Counter(CounterOp),
    /// Changes a set.
    Set(SetOp),
    /// Writes a register.
    Register(RegisterOp),
    /// Changes a stream.
    Stream(StreamOp),
}

/// Version byte in front of every encoded value.
const VALUE_FORMAT_V1: u8 = 1;

impl Value {
    /// The empty value of a type: what a key holds before its first write.
    pub fn empty(ty: CrdtType) -> Value {
        match ty {
            CrdtType::Counter => Value::Counter(Counter::default()),
            CrdtType::Set => Value::Set(Set::default()),
            CrdtType::Register => Value::Register(Register::default()),
            CrdtType::Stream => Value::Stream(Stream::default()),
        }
    }

    /// The value's type.
    pub fn crdt_type(&self) -> CrdtType {
        match self {
            Value::Counter(_) => CrdtType::Counter,
            Value::Set(_) => CrdtType::Set,
            Value::Register(_) => CrdtType::Register,
            Value::Stream(_) => CrdtType::Stream,
        }
    }

    /// Applies an operation made by region `origin` at `hlc`.
    ///
    /// Fails without changing anything when the operation is of another type
    /// ([`CoreError::TypeMismatch`]) or skips earlier operations of its
    /// origin ([`CoreError::DotGap`]).
    pub fn apply(&mut self, origin: ReplicaId, hlc: Hlc, op: &Op) -> Result<()> {
        match (self, op) {
            (Value::Counter(v), Op::Counter(op)) => {
                v.apply(origin, op);
                Ok(())
            }
            (Value::Set(v), Op::Set(op)) => v.apply(origin, op),
            (Value::Register(v), Op::Register(op)) => {
                v.apply(origin, hlc, op);
                Ok(())
            }
            (Value::Stream(v), Op::Stream(op)) => {
                v.apply(origin, hlc, op);
                Ok(())
            }
            (v, op) => Err(match op.crdt_type() {
                Some(found) => CoreError::TypeMismatch {
                    expected: v.crdt_type(),
                    found,
                },
                None => CoreError::invalid(
                    "operation",
                    "a keyspace declaration is not a value operation",
                ),
            }),
        }
    }

    /// Joins another state of the same type into this one.
    pub fn merge(&mut self, other: &Value) -> Result<()> {
        match (self, other) {
            (Value::Counter(a), Value::Counter(b)) => a.merge(b),
            (Value::Set(a), Value::Set(b)) => a.merge(b),
            (Value::Register(a), Value::Register(b)) => a.merge(b),
            (Value::Stream(a), Value::Stream(b)) => a.merge(b),
            (a, b) => {
                return Err(CoreError::TypeMismatch {
                    expected: a.crdt_type(),
                    found: b.crdt_type(),
                })
            }
        }
        Ok(())
    }

    /// Encodes the full state: a format version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode(VALUE_FORMAT_V1, self)
    }

    /// Decodes a full state encoded by [`Value::encode`], refusing unknown
    /// versions, trailing bytes and states that break the types' invariants.
    /// Never panics; allocation is bounded by a small multiple of
    /// `bytes.len()`.
    pub fn decode(bytes: &[u8]) -> Result<Value> {
        let value: Value = crate::codec::decode("value", VALUE_FORMAT_V1, bytes)?;
        value.check_invariants()?;
        Ok(value)
    }

    fn check_invariants(&self) -> Result<()> {
        match self {
            Value::Stream(s) => s.check_invariants(),
            Value::Counter(_) | Value::Set(_) | Value::Register(_) => Ok(()),
        }
    }
}

impl Op {
    /// The type of value the operation changes; `None` for a declaration.
    pub fn crdt_type(&self) -> Option<CrdtType> {
        match self {
            Op::Declare(_) => None,
            Op::Counter(_) => Some(CrdtType::Counter),
            Op::Set(_) => Some(CrdtType::Set),
            Op::Register(_) => Some(CrdtType::Register),
            Op::Stream(_) => Some(CrdtType::Stream),
        }
    }

    /// Checks the operation's sizes against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        match self {
            Op::Declare(_) | Op::Counter(_) => Ok(()),
            Op::Set(op) => op.validate(limits),
            Op::Register(op) => op.validate(limits),
            Op::Stream(op) => op.validate(limits),
        }
    }
}
