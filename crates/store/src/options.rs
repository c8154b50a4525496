//! Who a store belongs to and how it is opened.

use serde::{Deserialize, Serialize};

use concord_core::{Limits, ReplicaId};

use std::sync::Arc;

use crate::disk::{Disk, OsDisk};
use crate::error::{Result, StoreError};
use crate::journal;
use crate::offload::Offload;
use crate::Durability;

/// Who a data directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Region name, e.g. `us-east`.
    pub region: String,
    /// The region's replica id.
    pub replica: ReplicaId,
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When writes are acknowledged.
    pub durability: Durability,
    /// Interval of sled's background flush, in milliseconds.
    pub flush_every_ms: u64,
    /// sled's page cache size, in bytes.
    pub cache_capacity_bytes: u64,
    /// Size limits applied to writes and remote deltas.
    pub limits: Limits,
    /// Most bytes one origin's log may hold; the oldest entries go first
    /// when it is over, acknowledged by peers or not (a peer that needed
    /// them catches up by snapshot). At least `limits.max_delta_bytes`.
    pub max_log_bytes_per_origin: u64,
    /// Where blocking work (the group-commit flush) runs; the node runs its
    /// own store calls there too.
    pub offload: Offload,
    /// Size of the journal's segments ([`crate::journal`]): the first is
    /// [`crate::journal::FIRST_SEGMENT_BYTES`] (or this, when smaller), each
    /// next one twice the one before, up to this. Segments are made at
    /// their full size, zero-filled; when one is full the journal moves to
    /// the next and checkpoints: sled is flushed and the older segments
    /// deleted. At least [`crate::journal::MIN_SEGMENT_BYTES`].
    pub journal_segment_bytes: u64,
    /// The disk the journal is written to and sled's flushes are reported
    /// to ([`crate::disk`]): the operating system's, or the simulator's.
    pub disk: Arc<dyn Disk>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Group,
            flush_every_ms: 500,
            cache_capacity_bytes: 256 << 20,
            limits: Limits::default(),
            max_log_bytes_per_origin: 256 << 20,
            offload: Offload::Pool,
            journal_segment_bytes: 64 << 20,
            disk: Arc::new(OsDisk),
        }
    }
}

impl StoreOptions {
    /// Checks the options for consistency.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let delta = self.limits.max_delta_bytes as u64;
        if self.max_log_bytes_per_origin < delta {
            return Err(StoreError::Options(format!(
                "max_log_bytes_per_origin ({}) is below max_delta_bytes ({delta}): one delta would not fit",
                self.max_log_bytes_per_origin
            )));
        }
        if self.flush_every_ms == 0 {
            return Err(StoreError::Options(
                "flush_every_ms must be at least 1".into(),
            ));
        }
        if self.journal_segment_bytes < journal::MIN_SEGMENT_BYTES {
            return Err(StoreError::Options(format!(
                "journal_segment_bytes ({}) is below {}",
                self.journal_segment_bytes,
                journal::MIN_SEGMENT_BYTES
            )));
        }
        Ok(())
    }
}
