//! The one error type of this crate.

use crate::clock::Hlc;
use crate::crdt::CrdtType;
use crate::ReplicaId;

/// Everything that can go wrong in concord's pure logic.
///
/// Errors caused by input from a client, a peer or the disk are values of
/// this enum, never panics. [`CoreError::is_invalid_input`] tells whether the
/// caller sent something wrong (and retrying the same input is pointless).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A name, key, member or other argument is malformed.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid, e.g. "keyspace name".
        what: &'static str,
        /// Why, in words a user understands.
        reason: String,
    },

    /// A size or count limit was exceeded.
    #[error("{what} is {actual}, above the limit of {limit}")]
    LimitExceeded {
        /// What exceeded its limit, with its unit, e.g. "key length (bytes)".
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The size or count that was refused.
        actual: u64,
    },

    /// An operation of one CRDT type was applied to a value of another.
    #[error("type mismatch: expected a {expected} value, found a {found} value")]
    TypeMismatch {
        /// The type the value has.
        expected: CrdtType,
        /// The type the operation or state has.
        found: CrdtType,
    },

    /// A keyspace of that name is already declared with another type.
    #[error("keyspace {name:?} already exists with type {existing}, not {requested}")]
    KeyspaceTypeConflict {
        /// The keyspace name.
        name: String,
        /// The type it has.
        existing: CrdtType,
        /// The type that was asked for.
        requested: CrdtType,
    },

    /// A set add skipped dots of its origin: an earlier delta of that origin
    /// is missing. Applying it would silently lose the missing adds.
    #[error("set add from replica {origin} has dot {counter}, but only {seen} were seen: a delta is missing")]
    DotGap {
        /// The origin of the add.
        origin: ReplicaId,
        /// The dot counter of the add.
        counter: u64,
        /// The origin's highest dot counter seen so far.
        seen: u64,
    },

    /// A counter total would overflow 64 bits.
    #[error("counter total of replica {origin} would overflow")]
    CounterOverflow {
        /// The replica whose running total would overflow.
        origin: ReplicaId,
    },

    /// A result does not fit the API's representation (a counter whose
    /// regions' increments together leave the signed 64-bit range).
    #[error("{what} is {value}, outside the signed 64-bit range")]
    OutOfRange {
        /// What is out of range.
        what: &'static str,
        /// Its value.
        value: i128,
    },

    /// An invariant of this build broke: a bug here, never the fault of a
    /// client, a peer or the disk.
    #[error("internal error (a bug): {0}")]
    Bug(String),

    /// A remote timestamp is further ahead of local physical time than the
    /// allowed drift.
    #[error("remote clock {remote_ms} ms is {drift_ms} ms ahead of local clock {local_ms} ms (max drift {max_drift_ms} ms)")]
    ClockDrift {
        /// Physical part of the remote HLC, Unix ms.
        remote_ms: i64,
        /// Local physical time, Unix ms.
        local_ms: i64,
        /// How far ahead the remote is.
        drift_ms: u64,
        /// The allowed drift.
        max_drift_ms: u64,
    },

    /// The clock cannot produce a timestamp: the logical counter is exhausted
    /// for this millisecond, or physical time is outside the HLC's range.
    #[error("clock cannot advance past {last}: {reason}")]
    ClockExhausted {
        /// The last timestamp the clock issued or observed.
        last: Hlc,
        /// The underlying reason.
        reason: String,
    },

    /// Bytes could not be decoded (from the disk or from a peer).
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },

    /// An encoding's format version is not one this build reads.
    #[error("unsupported {what} format version {version}")]
    UnsupportedFormat {
        /// What was being decoded.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
}

impl CoreError {
    /// True when the error is the fault of the input (from a client, a peer
    /// or the disk) rather than of this node's state: the same input will
    /// always fail the same way.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            CoreError::Invalid { .. }
                | CoreError::LimitExceeded { .. }
                | CoreError::TypeMismatch { .. }
                | CoreError::KeyspaceTypeConflict { .. }
                | CoreError::Decode { .. }
                | CoreError::UnsupportedFormat { .. }
        )
    }

    /// True when retrying the same operation later may succeed (the clock may
    /// move on, a missing delta may arrive).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CoreError::ClockExhausted { .. }
                | CoreError::DotGap { .. }
                | CoreError::ClockDrift { .. }
        )
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        CoreError::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn decode(what: &'static str, reason: impl std::fmt::Display) -> Self {
        CoreError::Decode {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
