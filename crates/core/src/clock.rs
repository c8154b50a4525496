//! The hybrid logical clock (HLC) of a region node.
//!
//! Timestamps are 64 bits: the upper 42 are milliseconds since
//! 2024-01-01T00:00:00Z, the lower 22 a logical counter, so the total order of
//! timestamps is the order of their `u64` values. Ties between regions break
//! on replica id wherever an order matters (LWW markers, stream ids).
//!
//! Physical time is injected through [`PhysicalTime`]: production uses
//! [`SystemTime`], tests use [`ManualTime`], and the simulator hands in a
//! closure over its own simulated time. The clock itself is hlc-gen's
//! generator driven by a manual clock source that is set from the injected
//! time before every call, so the same inputs always give the same
//! timestamps.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use hlc_gen::error::HlcError;
use hlc_gen::{HlcGenerator, HlcTimestamp};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Unix milliseconds of the HLC epoch, 2024-01-01T00:00:00Z.
pub const HLC_EPOCH_UNIX_MS: i64 = 1_704_067_200_000;

/// Number of low bits holding the logical counter.
pub const LOGICAL_BITS: u32 = 22;

/// Largest logical counter value.
pub const MAX_LOGICAL: u32 = (1 << LOGICAL_BITS) - 1;

/// A hybrid logical clock timestamp. Every `u64` is a valid timestamp.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hlc(u64);

impl Hlc {
    /// The smallest timestamp: the epoch, logical 0.
    pub const ZERO: Hlc = Hlc(0);

    /// Wraps a raw timestamp.
    pub const fn from_u64(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// The raw timestamp; its order is the timestamp order.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Builds a timestamp from Unix milliseconds and a logical counter.
    pub fn from_parts(unix_ms: i64, logical: u32) -> Result<Hlc> {
        let since_epoch = unix_ms
            .checked_sub(HLC_EPOCH_UNIX_MS)
            .filter(|ms| (0..(1i64 << (64 - LOGICAL_BITS))).contains(ms))
            .ok_or_else(|| {
                CoreError::invalid(
                    "timestamp",
                    format!("{unix_ms} ms is outside the HLC range (2024-01-01 to year 2163)"),
                )
            })?;
        if logical > MAX_LOGICAL {
            return Err(CoreError::invalid(
                "timestamp",
                format!("logical counter {logical} is above {MAX_LOGICAL}"),
            ));
        }
        // The range check above makes the cast lossless.
        Ok(Hlc(
            ((since_epoch as u64) << LOGICAL_BITS) | u64::from(logical)
        ))
    }

    /// The physical part, in Unix milliseconds.
    pub const fn unix_ms(self) -> i64 {
        // 42 bits always fit an i64.
        (self.0 >> LOGICAL_BITS) as i64 + HLC_EPOCH_UNIX_MS
    }

    /// The logical counter.
    pub const fn logical(self) -> u32 {
        (self.0 & MAX_LOGICAL as u64) as u32
    }

    fn to_hlc_gen(self) -> HlcTimestamp {
        // hlc-gen accepts every raw value: its physical part is masked to 42
        // bits and is never below its epoch, which equals ours.
        HlcTimestamp::try_from(self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.unix_ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.unix_ms(), self.logical())
    }
}

/// A source of physical time in Unix milliseconds.
///
/// It may jump backwards (NTP steps, a simulator's skewed host); the HLC stays
/// monotonic regardless.
pub trait PhysicalTime: Send + Sync + 'static {
    /// Current physical time, in milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> i64;
}

/// Closures work as time sources, which is how the simulator injects its
/// simulated time.
impl<F> PhysicalTime for F
where
    F: Fn() -> i64 + Send + Sync + 'static,
{
    fn now_unix_ms(&self) -> i64 {
        self()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemTime;

impl PhysicalTime for SystemTime {
    fn now_unix_ms(&self) -> i64 {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A wall clock before 1970 is broken; the HLC then runs on its
            // logical counter alone.
            Err(_) => 0,
        }
    }
}

/// A time source set by hand, for tests.
#[derive(Debug, Default)]
pub struct ManualTime(AtomicI64);

impl ManualTime {
    /// A manual time source reading `unix_ms`.
    pub fn new(unix_ms: i64) -> Self {
        ManualTime(AtomicI64::new(unix_ms))
    }

    /// Sets the time.
    pub fn set(&self, unix_ms: i64) {
        self.0.store(unix_ms, Ordering::SeqCst);
    }

    /// Moves the time by `delta_ms`, which may be negative.
    pub fn advance(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl PhysicalTime for ManualTime {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl PhysicalTime for Arc<ManualTime> {
    fn now_unix_ms(&self) -> i64 {
        self.as_ref().now_unix_ms()
    }
}

/// A region node's hybrid logical clock.
///
/// - [`Clock::now`] stamps a local event; every call returns a timestamp
///   greater than every timestamp issued or observed before.
/// - [`Clock::observe`] takes a remote timestamp into account, refusing it
///   (and leaving the clock unchanged) when it is more than `max_drift_ms`
///   ahead of local physical time.
/// - [`Clock::new`] takes a high-water mark, the greatest timestamp the node
///   issued or observed before a restart, so the clock stays monotonic across
///   restarts even when physical time went backwards meanwhile.
pub struct Clock {
    generator: HlcGenerator<hlc_gen::source::ManualClock>,
    time: Box<dyn PhysicalTime>,
    max_drift_ms: u64,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("last", &self.last())
            .field("max_drift_ms", &self.max_drift_ms)
            .finish()
    }
}

impl Clock {
    /// Creates a clock reading `time`, refusing remote timestamps more than
    /// `max_drift_ms` ahead (0 disables the check), that never issues a
    /// timestamp at or below `high_water`.
    pub fn new(time: impl PhysicalTime, max_drift_ms: u64, high_water: Hlc) -> Result<Self> {
        let clock = Clock {
            generator: HlcGenerator::manual(usize::try_from(max_drift_ms).unwrap_or(usize::MAX)),
            time: Box::new(time),
            max_drift_ms,
        };
        // Restoring the high-water mark is observing it with the physical
        // clock set to at least its physical part, so the drift check cannot
        // refuse our own past.
        let now = clock.time.now_unix_ms();
        clock
            .generator
            .set_current_timestamp(now.max(high_water.unix_ms()));
        clock
            .generator
            .update(&high_water.to_hlc_gen())
            .map_err(|e| clock.exhausted(e))?;
        Ok(clock)
    }

    /// The allowed drift of remote clocks, in milliseconds (0: unchecked).
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// Current physical time of the injected source, in Unix milliseconds.
    pub fn physical_unix_ms(&self) -> i64 {
        self.time.now_unix_ms()
    }

    /// The greatest timestamp issued or observed so far. Persist it (or a
    /// value above it) to keep the clock monotonic across restarts.
    pub fn last(&self) -> Hlc {
        Hlc(self.generator.timestamp().as_u64())
    }

    /// A new timestamp for a local event, greater than every timestamp issued
    /// or observed before.
    pub fn now(&self) -> Result<Hlc> {
        self.generator
            .set_current_timestamp(self.time.now_unix_ms());
        self.generator
            .next_timestamp()
            .map(|ts| Hlc(ts.as_u64()))
            .ok_or_else(|| CoreError::ClockExhausted {
                last: self.last(),
                reason: "the logical counter is exhausted or physical time is out of range"
                    .to_string(),
            })
    }

    /// Observes a timestamp received from another region and returns the new
    /// local timestamp, which is greater than both `remote` and every
    /// timestamp issued before.
    ///
    /// Refuses a `remote` more than `max_drift_ms` ahead of local physical
    /// time with [`CoreError::ClockDrift`]; the clock is then unchanged.
    pub fn observe(&self, remote: Hlc) -> Result<Hlc> {
        let local_ms = self.time.now_unix_ms();
        self.check_drift(remote, local_ms)?;
        self.generator.set_current_timestamp(local_ms);
        self.generator
            .update(&remote.to_hlc_gen())
            .map(|ts| Hlc(ts.as_u64()))
            .map_err(|e| match e {
                HlcError::DriftTooLarge(drift, max) => CoreError::ClockDrift {
                    remote_ms: remote.unix_ms(),
                    local_ms,
                    drift_ms: drift as u64,
                    max_drift_ms: max as u64,
                },
                other => self.exhausted(other),
            })
    }

    /// Checks `remote` against the drift bound without changing the clock.
    pub fn check_drift(&self, remote: Hlc, local_ms: i64) -> Result<()> {
        if self.max_drift_ms == 0 {
            return Ok(());
        }
        let drift_ms = remote.unix_ms().saturating_sub(local_ms);
        if drift_ms > 0 && drift_ms.unsigned_abs() > self.max_drift_ms {
            return Err(CoreError::ClockDrift {
                remote_ms: remote.unix_ms(),
                local_ms,
                drift_ms: drift_ms.unsigned_abs(),
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    fn exhausted(&self, e: HlcError) -> CoreError {
        CoreError::ClockExhausted {
            last: self.last(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = HLC_EPOCH_UNIX_MS + 1_000_000;

    #[test]
    fn parts_round_trip() {
        let h = Hlc::from_parts(T0, 17).unwrap();
        assert_eq!(h.unix_ms(), T0);
        assert_eq!(h.logical(), 17);
        assert!(Hlc::from_parts(T0, MAX_LOGICAL + 1).is_err());
        assert!(Hlc::from_parts(HLC_EPOCH_UNIX_MS - 1, 0).is_err());
    }

    #[test]
    fn now_is_strictly_increasing_when_time_stands_still() {
        let time = Arc::new(ManualTime::new(T0));
        let clock = Clock::new(time.clone(), 1000, Hlc::ZERO).unwrap();
        let a = clock.now().unwrap();
        let b = clock.now().unwrap();
        assert!(b > a);
        assert_eq!(a.unix_ms(), T0);
        time.advance(-500);
        assert!(clock.now().unwrap() > b);
    }

    #[test]
    fn far_future_remote_is_refused_and_changes_nothing() {
        let time = Arc::new(ManualTime::new(T0));
        let clock = Clock::new(time, 1000, Hlc::ZERO).unwrap();
        let before = clock.now().unwrap();
        let remote = Hlc::from_parts(T0 + 1001, 0).unwrap();
        let err = clock.observe(remote).unwrap_err();
        assert!(matches!(err, CoreError::ClockDrift { drift_ms: 1001, .. }));
        assert_eq!(clock.last(), before);
        let near = Hlc::from_parts(T0 + 1000, 5).unwrap();
        assert!(clock.observe(near).unwrap() > near);
    }

    #[test]
    fn restart_with_high_water_mark_stays_monotonic() {
        let time = Arc::new(ManualTime::new(T0));
        let clock = Clock::new(time.clone(), 1000, Hlc::ZERO).unwrap();
        let last = clock.now().unwrap();
        // The machine restarts with its wall clock an hour behind.
        time.set(T0 - 3_600_000);
        let clock = Clock::new(time, 1000, last).unwrap();
        assert!(clock.now().unwrap() > last);
    }
}
