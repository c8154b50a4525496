//! What one seed simulates: the regions, the network's latencies, and the
//! schedule of faults, all drawn from the seed.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// Region names, in the order regions are created.
pub const REGION_NAMES: [&str; 8] = [
    "us-east",
    "eu-west",
    "ap-south",
    "sa-east",
    "af-south",
    "me-central",
    "ca-central",
    "ap-east",
];

/// Most regions a run starts with (one more may join).
pub const MAX_REGIONS: usize = REGION_NAMES.len() - 1;

/// Each region's clock drift bound, in milliseconds.
pub const MAX_DRIFT_MS: u64 = 500;

/// A skew within the bound is at most this fraction of it (in percent), so
/// an accepted timestamp is never more than `MAX_DRIFT_MS * 1.5` ahead of
/// true time.
pub const WITHIN_SKEW_PERCENT: u64 = 50;

/// A skew beyond the bound is between these multiples of it.
pub const BEYOND_SKEW_MULTIPLES: (u64, u64) = (3, 6);

/// The kinds of fault a run can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// One region cut off from all others, then healed.
    Partition,
    /// One pair of regions cut while both still reach the rest.
    Partial,
    /// One direction of a pair cut.
    Oneway,
    /// Messages between a pair held back, then delivered at once.
    Hold,
    /// WAN latency and jitter per link (20–200 ms), for the whole run.
    Latency,
    /// A link that randomly drops messages (which breaks TCP connections).
    Loss,
    /// A node crashed, then restarted on its data directory.
    Crash,
    /// A host clock off by up to half the drift bound.
    Skew,
    /// A host clock ahead or behind by several times the drift bound.
    SkewBeyond,
    /// A new region added in the middle of the run.
    Join,
    /// A region's power cut: its node stops, and its disk loses what was
    /// not synced ([`crate::disk`]); then it restarts. Counts every power
    /// cut of the schedule, those that end a torn write or a failed disk
    /// included (not those the heal makes for a fault that struck late).
    PowerLoss,
    /// The power failing in the middle of a journal write: a part of the
    /// write reaches the disk; the node restarts on what is there.
    TornWrite,
    /// A sync failing with an I/O error: the journal stops, and the node
    /// is restarted a little later, after a power cut (the kernel may have
    /// dropped the pages it could not write).
    DiskError,
    /// A region's syncs taking 20–200 ms of simulated time for a while.
    SlowDisk,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 14] = [
        FaultKind::Partition,
        FaultKind::Partial,
        FaultKind::Oneway,
        FaultKind::Hold,
        FaultKind::Latency,
        FaultKind::Loss,
        FaultKind::Crash,
        FaultKind::Skew,
        FaultKind::SkewBeyond,
        FaultKind::Join,
        FaultKind::PowerLoss,
        FaultKind::TornWrite,
        FaultKind::DiskError,
        FaultKind::SlowDisk,
    ];

    /// The kind's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Partition => "partition",
            FaultKind::Partial => "partial",
            FaultKind::Oneway => "oneway",
            FaultKind::Hold => "hold",
            FaultKind::Latency => "latency",
            FaultKind::Loss => "loss",
            FaultKind::Crash => "crash",
            FaultKind::Skew => "skew",
            FaultKind::SkewBeyond => "skew-beyond",
            FaultKind::Join => "join",
            FaultKind::PowerLoss => "power-loss",
            FaultKind::TornWrite => "torn-write",
            FaultKind::DiskError => "disk-error",
            FaultKind::SlowDisk => "slow-disk",
        }
    }

    /// Faults that are episodes on the network, one at a time.
    fn is_network_episode(self) -> bool {
        matches!(
            self,
            FaultKind::Partition
                | FaultKind::Partial
                | FaultKind::Oneway
                | FaultKind::Hold
                | FaultKind::Loss
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a run is asked to do, besides its seed.
#[derive(Debug, Clone)]
pub struct Options {
    /// Regions at the start (2..=[`MAX_REGIONS`]).
    pub regions: usize,
    /// Fault kinds the schedule may draw from.
    pub faults: BTreeSet<FaultKind>,
    /// Length of the workload phase, in simulated time.
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// Longest simulated wait, after the heal, for every replica to be
    /// identical.
    pub converge_within: Duration,
    /// Whether the nodes refuse peers whose clock is beyond
    /// [`MAX_DRIFT_MS`]. Off only to prove the clock checker catches a
    /// node that accepts them.
    pub drift_check: bool,
    /// When the regions acknowledge writes.
    pub durability: DurabilityChoice,
    /// Plants a bug: every region's disk says a sync or a flush is done
    /// without making anything durable, so writes are acknowledged before
    /// they are. Only to prove the checkers catch it.
    pub lying_disk: bool,
}

/// Which durability mode the regions of a run use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DurabilityChoice {
    /// Group commit: a write is acknowledged once its journal frame is
    /// synced; no acknowledged write may be lost.
    Group,
    /// Relaxed: acknowledged before sled's flush; a power cut may lose the
    /// writes a region acknowledged since its last flush, alike in every
    /// region.
    Relaxed,
    /// Drawn per seed: relaxed one time in four.
    #[default]
    Mixed,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            regions: 3,
            faults: FaultKind::ALL.into_iter().collect(),
            duration: Duration::from_secs(10),
            clients: 3,
            converge_within: Duration::from_secs(60),
            drift_check: true,
            durability: DurabilityChoice::Mixed,
            lying_disk: false,
        }
    }
}

impl Options {
    /// Checks the options.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=MAX_REGIONS).contains(&self.regions) {
            return Err(format!(
                "--regions is {}; it must be between 2 and {MAX_REGIONS}",
                self.regions
            ));
        }
        if self.clients == 0 || self.clients > 64 {
            return Err(format!(
                "--clients is {}; it must be between 1 and 64",
                self.clients
            ));
        }
        if self.duration < Duration::from_secs(1) || self.duration > Duration::from_secs(3600) {
            return Err(format!(
                "--duration is {:?}; it must be between 1 s and 1 h",
                self.duration
            ));
        }
        Ok(())
    }
}

/// One region of the run.
#[derive(Debug, Clone)]
pub struct Region {
    /// Its name, which is also its host name.
    pub name: &'static str,
    /// Its replica id.
    pub replica: u32,
    /// When it starts (zero, or later for a region that joins).
    pub starts_at: Duration,
}

/// A change to the simulated world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Cut every message between the two groups of regions.
    Partition(Vec<usize>, Vec<usize>),
    /// Undo a [`Action::Partition`].
    Repair(Vec<usize>, Vec<usize>),
    /// Cut messages from the first region to the second only.
    PartitionOneway(usize, usize),
    /// Undo a [`Action::PartitionOneway`].
    RepairOneway(usize, usize),
    /// Hold messages between two regions.
    Hold(usize, usize),
    /// Deliver held messages and stop holding.
    Release(usize, usize),
    /// Make a link drop messages at this rate (per million).
    Loss(usize, usize, u32),
    /// Stop dropping messages on a link.
    LossEnd(usize, usize),
    /// Crash a region's node.
    Crash(usize),
    /// Cut a region's power: its node stops and its disk loses what was
    /// not durable.
    PowerLoss(usize),
    /// Tear the next journal write of a region: the power fails during it.
    TearNextWrite(usize),
    /// Fail the next sync of a region's disk.
    FailNextSync(usize),
    /// Make a region's syncs take this many milliseconds (0: fast again).
    SlowDisk(usize, u64),
    /// Restart a crashed region's node.
    Restart(usize),
    /// Set a region's clock error, in milliseconds.
    Skew(usize, i64),
    /// Start a region that joins the running cluster.
    Join(usize),
}

impl Action {
    /// The fault kind this action starts, if it starts one.
    pub fn starts(&self) -> Option<FaultKind> {
        match self {
            Action::Partition(a, b) if a.len() + b.len() > 2 => Some(FaultKind::Partition),
            Action::Partition(..) => Some(FaultKind::Partial),
            Action::PartitionOneway(..) => Some(FaultKind::Oneway),
            Action::Hold(..) => Some(FaultKind::Hold),
            Action::Loss(..) => Some(FaultKind::Loss),
            Action::Crash(..) => Some(FaultKind::Crash),
            Action::Skew(_, ms) if ms.unsigned_abs() > MAX_DRIFT_MS => Some(FaultKind::SkewBeyond),
            Action::Skew(_, 0) => None,
            Action::Skew(..) => Some(FaultKind::Skew),
            Action::Join(..) => Some(FaultKind::Join),
            Action::PowerLoss(..) => Some(FaultKind::PowerLoss),
            Action::TearNextWrite(..) => Some(FaultKind::TornWrite),
            Action::FailNextSync(..) => Some(FaultKind::DiskError),
            Action::SlowDisk(_, 0) => None,
            Action::SlowDisk(..) => Some(FaultKind::SlowDisk),
            _ => None,
        }
    }
}

/// An action at a point of simulated time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, from the start of the run.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// Latency of one link between two regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLatency {
    /// The two regions.
    pub pair: (usize, usize),
    /// Fastest delivery.
    pub min: Duration,
    /// Slowest delivery.
    pub max: Duration,
}

/// Everything a seed decides before the run starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Every region, the joining one last.
    pub regions: Vec<Region>,
    /// Latency per pair of regions (empty: LAN-like everywhere).
    pub latencies: Vec<LinkLatency>,
    /// Fault events, by time.
    pub events: Vec<Event>,
    /// Most bytes per origin log; small values force catch-up by snapshot.
    pub log_cap_bytes: u64,
    /// Whether the regions run with relaxed durability.
    pub relaxed: bool,
}

/// Largest delta a simulated node accepts: small limits keep logs short.
pub const SIM_MAX_DELTA_BYTES: u64 = 4 << 10;

impl Plan {
    /// Draws the plan of `seed` under `options`.
    pub fn draw(seed: u64, options: &Options) -> Plan {
        let mut rng = fastrand::Rng::with_seed(seed);
        let on = |k: FaultKind| options.faults.contains(&k);
        let duration_ms = u64::try_from(options.duration.as_millis()).unwrap_or(u64::MAX);
        let at = |rng: &mut fastrand::Rng, from: u64, to: u64| {
            Duration::from_millis(rng.u64(from.min(to)..=to))
        };

        let mut regions: Vec<Region> = (0..options.regions)
            .map(|i| Region {
                name: REGION_NAMES[i],
                replica: u32::try_from(i + 1).unwrap_or(u32::MAX),
                starts_at: Duration::ZERO,
            })
            .collect();
        let mut events = Vec::new();
        if on(FaultKind::Join) && rng.bool() {
            let i = regions.len();
            let starts_at = at(&mut rng, duration_ms / 4, duration_ms * 3 / 4);
            regions.push(Region {
                name: REGION_NAMES[i],
                replica: u32::try_from(i + 1).unwrap_or(u32::MAX),
                starts_at,
            });
            events.push(Event {
                at: starts_at,
                action: Action::Join(i),
            });
        }
        let founders = options.regions;

        let mut latencies = Vec::new();
        if on(FaultKind::Latency) {
            for a in 0..regions.len() {
                for b in a + 1..regions.len() {
                    let min = rng.u64(20..=200);
                    let jitter = rng.u64(0..=min / 2);
                    latencies.push(LinkLatency {
                        pair: (a, b),
                        min: Duration::from_millis(min),
                        max: Duration::from_millis(min + jitter),
                    });
                }
            }
        }

        // Network episodes, one after another.
        let network: Vec<FaultKind> = options
            .faults
            .iter()
            .copied()
            .filter(|k| k.is_network_episode())
            .collect();
        if !network.is_empty() {
            let mut t = rng.u64(0..=duration_ms / 5);
            while t < duration_ms {
                let kind = network[rng.usize(..network.len())];
                let len = rng.u64(300..=3_000).min(duration_ms - t);
                let (a, b) = two(&mut rng, founders);
                let (start, end) = match kind {
                    FaultKind::Partition => {
                        let others: Vec<usize> = (0..regions.len()).filter(|&r| r != a).collect();
                        (
                            Action::Partition(vec![a], others.clone()),
                            Action::Repair(vec![a], others),
                        )
                    }
                    FaultKind::Partial => (
                        Action::Partition(vec![a], vec![b]),
                        Action::Repair(vec![a], vec![b]),
                    ),
                    FaultKind::Oneway => {
                        (Action::PartitionOneway(a, b), Action::RepairOneway(a, b))
                    }
                    FaultKind::Hold => (Action::Hold(a, b), Action::Release(a, b)),
                    _ => (
                        Action::Loss(a, b, rng.u32(5_000..=100_000)),
                        Action::LossEnd(a, b),
                    ),
                };
                events.push(Event {
                    at: Duration::from_millis(t),
                    action: start,
                });
                events.push(Event {
                    at: Duration::from_millis(t + len),
                    action: end,
                });
                t += len + rng.u64(100..=2_000);
            }
        }

        if on(FaultKind::Crash) {
            for _ in 0..rng.usize(1..=2) {
                let r = rng.usize(..founders);
                let down = at(&mut rng, 0, duration_ms.saturating_sub(500));
                let up = down + Duration::from_millis(rng.u64(50..=5_000));
                events.push(Event {
                    at: down,
                    action: Action::Crash(r),
                });
                events.push(Event {
                    at: up,
                    action: Action::Restart(r),
                });
            }
        }

        let mut skewed = BTreeSet::new();
        if on(FaultKind::Skew) {
            let bound = i64::try_from(MAX_DRIFT_MS * WITHIN_SKEW_PERCENT / 100).unwrap_or(0);
            for r in 0..founders {
                if rng.bool() {
                    skewed.insert(r);
                    events.push(Event {
                        at: Duration::ZERO,
                        action: Action::Skew(r, rng.i64(-bound..=bound)),
                    });
                }
            }
        }
        if on(FaultKind::SkewBeyond) {
            let r = rng.usize(..founders);
            if !skewed.contains(&r) {
                let (lo, hi) = BEYOND_SKEW_MULTIPLES;
                let size =
                    i64::try_from(rng.u64(MAX_DRIFT_MS * lo..=MAX_DRIFT_MS * hi)).unwrap_or(0);
                let sign = if rng.bool() { 1 } else { -1 };
                let from = at(&mut rng, 0, duration_ms / 2);
                let to = from + Duration::from_millis(rng.u64(200..=duration_ms / 2));
                events.push(Event {
                    at: from,
                    action: Action::Skew(r, sign * size),
                });
                events.push(Event {
                    at: to,
                    action: Action::Skew(r, 0),
                });
            }
        }

        disk_faults(&mut rng, options, founders, &mut events);

        // Stable: events at the same time keep the order they were drawn in.
        events.sort_by_key(|e| e.at);
        let log_cap_bytes = if rng.bool() {
            SIM_MAX_DELTA_BYTES
        } else {
            64 << 20
        };
        let relaxed = match options.durability {
            DurabilityChoice::Group => false,
            DurabilityChoice::Relaxed => true,
            DurabilityChoice::Mixed => rng.u32(..4) == 0,
        };
        Plan {
            seed,
            regions,
            latencies,
            events,
            log_cap_bytes,
            relaxed,
        }
    }
}

/// Draws the disk's faults: power cuts, a torn write and a failed sync
/// (each ended by a power cut and a restart), a slow spell.
fn disk_faults(
    rng: &mut fastrand::Rng,
    options: &Options,
    founders: usize,
    events: &mut Vec<Event>,
) {
    let on = |k: FaultKind| options.faults.contains(&k);
    let duration_ms = u64::try_from(options.duration.as_millis()).unwrap_or(u64::MAX);
    let ms = Duration::from_millis;
    let mut cut = |rng: &mut fastrand::Rng, r: usize, arm: Option<Action>| {
        let at = rng.u64(0..=duration_ms.saturating_sub(500));
        let mut down = at;
        if let Some(arm) = arm {
            events.push(Event {
                at: ms(at),
                action: arm,
            });
            // The armed fault strikes at the region's next write or sync.
            down += rng.u64(1..=500);
        }
        events.push(Event {
            at: ms(down),
            action: Action::PowerLoss(r),
        });
        events.push(Event {
            at: ms(down + rng.u64(50..=3_000)),
            action: Action::Restart(r),
        });
    };
    if on(FaultKind::PowerLoss) {
        for _ in 0..rng.usize(1..=2) {
            let r = rng.usize(..founders);
            cut(rng, r, None);
        }
    }
    if on(FaultKind::TornWrite) && rng.bool() {
        let r = rng.usize(..founders);
        cut(rng, r, Some(Action::TearNextWrite(r)));
    }
    if on(FaultKind::DiskError) && rng.bool() {
        let r = rng.usize(..founders);
        cut(rng, r, Some(Action::FailNextSync(r)));
    }
    if on(FaultKind::SlowDisk) && rng.bool() {
        let r = rng.usize(..founders);
        let from = rng.u64(0..=duration_ms / 2);
        let to = from + rng.u64(200..=duration_ms / 2);
        events.push(Event {
            at: ms(from),
            action: Action::SlowDisk(r, rng.u64(20..=200)),
        });
        events.push(Event {
            at: ms(to),
            action: Action::SlowDisk(r, 0),
        });
    }
}

/// Two different regions among the first `n` (n >= 2).
fn two(rng: &mut fastrand::Rng, n: usize) -> (usize, usize) {
    let a = rng.usize(..n);
    let b = (a + rng.usize(1..n)) % n;
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plan_and_every_kind_gets_drawn() {
        let options = Options::default();
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let a = Plan::draw(seed, &options);
            let b = Plan::draw(seed, &options);
            assert_eq!(a.events, b.events);
            assert_eq!(a.latencies, b.latencies);
            seen.extend(a.events.iter().filter_map(|e| e.action.starts()));
            if !a.latencies.is_empty() {
                seen.insert(FaultKind::Latency);
            }
        }
        let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
        assert_eq!(seen, all, "200 seeds draw every kind of fault");
    }

    #[test]
    fn options_out_of_range_are_refused_with_the_flag_named() {
        assert!(Options::default().validate().is_ok());
        for (bad, flag) in [
            (
                Options {
                    regions: 1,
                    ..Options::default()
                },
                "--regions",
            ),
            (
                Options {
                    regions: MAX_REGIONS + 1,
                    ..Options::default()
                },
                "--regions",
            ),
            (
                Options {
                    clients: 0,
                    ..Options::default()
                },
                "--clients",
            ),
            (
                Options {
                    duration: Duration::ZERO,
                    ..Options::default()
                },
                "--duration",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn only_the_asked_faults_are_drawn() {
        let options = Options {
            faults: [FaultKind::Crash].into_iter().collect(),
            ..Options::default()
        };
        for seed in 0..50 {
            let plan = Plan::draw(seed, &options);
            assert!(plan.latencies.is_empty());
            assert_eq!(plan.regions.len(), options.regions);
            for e in &plan.events {
                assert!(
                    matches!(e.action, Action::Crash(_) | Action::Restart(_)),
                    "{e:?}"
                );
            }
        }
    }
}
