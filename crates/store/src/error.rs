//! The one error type of this crate.

use std::path::PathBuf;

use concord_core::{CoreError, ReplicaId};

/// Everything that can go wrong reading or writing a region's state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O error, or corruption it detected).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),

    /// The data or an operation is invalid for the CRDT core.
    #[error(transparent)]
    Core(#[from] CoreError),

    /// The data directory belongs to another region.
    #[error("data directory {path} belongs to region {found_region:?} (replica {found_replica}), not {region:?} (replica {replica}); refusing to open it")]
    WrongRegion {
        /// The data directory.
        path: PathBuf,
        /// The region this node is configured as.
        region: String,
        /// Its replica id.
        replica: ReplicaId,
        /// The region recorded in the directory.
        found_region: String,
        /// Its replica id.
        found_replica: ReplicaId,
    },

    /// The data directory was written by a build with another format.
    #[error("data directory {path} has format version {found}; this build reads version {supported} only")]
    UnsupportedFormat {
        /// The data directory.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    /// Another process (or a store not yet closed in this one) holds the
    /// data directory.
    #[error("data directory {path} is in use: its lock is held (is another concord-node running on it?)")]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// sled's report, for the debug form.
        reason: String,
    },

    /// The store's options are inconsistent.
    #[error("invalid store options: {0}")]
    Options(String),

    /// A reader asked for log entries that were truncated: it must catch
    /// up by snapshot.
    #[error("the log of replica {origin} no longer holds seq {requested}: it starts after {floor}; catch up by snapshot")]
    Truncated {
        /// The origin.
        origin: ReplicaId,
        /// The first seq asked for.
        requested: u64,
        /// The last seq removed: the log now starts at `floor + 1`.
        floor: u64,
    },

    /// The journal could not be read or written; once a write or sync
    /// failed, nothing more is acknowledged as durable until a restart.
    #[error("journal: {0}")]
    Journal(String),

    /// A flush handed to a blocking task died before it returned (it
    /// panicked, or its runtime shut down): what it was flushing is not
    /// known to be durable.
    #[error("flush task: {0}")]
    FlushTask(#[from] crate::offload::OffloadFailed),

    /// Stored bytes do not decode, or stored records disagree: the disk
    /// (or whoever wrote to it) is at fault.
    #[error("corrupt store: {0}")]
    Corrupt(String),

    /// An invariant of this build broke: a bug here, not bad data on disk
    /// nor bad input.
    #[error("internal error (a bug): {0}")]
    Bug(String),

    /// A write names a keyspace that is not declared.
    #[error("keyspace {name:?} of type {ty} is not declared")]
    UnknownKeyspace {
        /// Keyspace name.
        name: String,
        /// Keyspace type.
        ty: concord_core::CrdtType,
    },

    /// A remote batch skips deltas of an origin: nothing of it was applied.
    #[error("delta {got} of replica {origin} arrived, but the next expected is {expected}")]
    Gap {
        /// The origin.
        origin: ReplicaId,
        /// The next sequence number this store expects.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },

    /// A peer sent deltas of this region that this region does not have:
    /// its log was lost or restored from an old copy.
    #[error("a peer sent delta {seq} of this region, whose own log ends at {local}: this region's data was lost or restored from an old copy")]
    OwnDeltaAhead {
        /// The sequence number received.
        seq: u64,
        /// This region's last sequence number.
        local: u64,
    },
}

impl StoreError {
    /// True when the operation may succeed if retried unchanged (an I/O
    /// error, a missing delta that may still arrive).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(_)) => true,
            StoreError::Gap { .. } => true,
            StoreError::Core(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// True when the caller's input is at fault (and retrying the same
    /// input is pointless).
    pub fn is_invalid_input(&self) -> bool {
        match self {
            StoreError::Core(e) => e.is_invalid_input(),
            StoreError::UnknownKeyspace { .. } | StoreError::Options(_) => true,
            _ => false,
        }
    }
}

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
