//! Pure logic of concord: no I/O, no async.
//!
//! - [`clock`]: the hybrid logical clock, with injected physical time, drift
//!   refusal and a restart high-water mark.
//! - [`command`]: what a client asks of a key ([`Command`], one enum of
//!   commands per type, owned by the type's module) and what it answers
//!   ([`Outcome`]).
//! - [`crdt`]: the four value types (counter, set, register, stream), their
//!   operations and their state-based merge, behind the [`crdt::Crdt`] laws.
//! - [`delta`]: a replicated change `(origin, seq, hlc, keyspace, key, op)`
//!   and its compact, versioned binary encoding.
//! - [`catalog`]: keyspace declarations and the deterministic resolution of
//!   names declared with different types in different regions.
//! - [`vv`]: version vectors, per-origin highest applied sequence numbers.
//! - [`limits`]: size limits on names, keys, values and operations.
//! - `proto` (feature `proto`): conversions to and from the generated
//!   protobuf messages.
//!
//! Everything that a client, a peer or the disk can influence is validated
//! and returns [`CoreError`], never panics.

pub mod catalog;
pub mod clock;
mod codec;
pub mod command;
pub mod crdt;
pub mod delta;
mod error;
pub mod limits;
#[cfg(feature = "proto")]
pub mod proto;
pub mod vv;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use catalog::{Catalog, KeyspaceId};
pub use clock::{Clock, Hlc, PhysicalTime, SystemTime};
pub use command::{Access, Command, Outcome, Reply, Request, Stamp};
pub use crdt::{CrdtType, Op, Value};
pub use delta::Delta;
pub use error::{CoreError, Result};
pub use limits::Limits;
pub use vv::VersionVector;

/// The identity of a region's replica: the actor of every CRDT operation the
/// region makes. One per region, never per client, so CRDT clocks stay small.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ReplicaId(pub u32);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The order of last-writer-wins markers and of keyspace declarations:
/// timestamp first, replica id to break ties between regions. Unique as long
/// as every region's clock is monotonic.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Marker {
    /// When the write or declaration was made.
    pub hlc: Hlc,
    /// Which region made it.
    pub replica: ReplicaId,
}

impl Marker {
    /// A marker for a change made by `replica` at `hlc`.
    pub const fn new(hlc: Hlc, replica: ReplicaId) -> Self {
        Marker { hlc, replica }
    }
}
