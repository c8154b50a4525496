//! Physical time for the nodes: turmoil's simulated clock, from a fixed
//! epoch, plus a skew the fault schedule sets per host.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord_core::clock::PhysicalTime;

/// Where simulated time starts: 2025-01-01T00:00:00Z, after the HLC epoch
/// (2024-01-01), so every simulated timestamp is valid.
pub const EPOCH_UNIX_MS: i64 = 1_735_689_600_000;

/// [`EPOCH_UNIX_MS`] as a `SystemTime`, for turmoil's builder.
pub fn epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(EPOCH_UNIX_MS.unsigned_abs())
}

/// A host's clock error, in milliseconds (positive: ahead). Shared between
/// the fault schedule, which sets it, and the host's [`SimTime`].
#[derive(Debug, Clone, Default)]
pub struct Skew(Arc<AtomicI64>);

impl Skew {
    /// Sets the error.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    /// The current error.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A node's physical time source inside the simulation.
#[derive(Debug)]
pub struct SimTime {
    skew: Skew,
    /// The last simulated time read, for a call outside the simulation's
    /// context (none happens in the node's own code; the fallback keeps
    /// such a call harmless).
    last: AtomicI64,
}

impl SimTime {
    /// A source reading the current host's simulated time plus `skew`.
    pub fn new(skew: Skew) -> Self {
        SimTime {
            skew,
            last: AtomicI64::new(EPOCH_UNIX_MS),
        }
    }
}

impl PhysicalTime for SimTime {
    fn now_unix_ms(&self) -> i64 {
        let now = match turmoil::since_epoch() {
            Some(d) => {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                self.last.store(ms, Ordering::Relaxed);
                ms
            }
            None => self.last.load(Ordering::Relaxed),
        };
        now.saturating_add(self.skew.get())
    }
}
