//! One seed's run: boot the regions and clients as turmoil hosts, play the
//! fault schedule, heal, wait for convergence, check.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use concord_core::{Clock, CrdtType, Limits};
use concord_node::config::{Durability, KeyspaceConfig, LogConfig, PeerConfig, StorageConfig};
use concord_node::{Config, Machine, Node};
use concord_store::{Offload, Store};

use crate::check::{self, Dump};
use crate::disk::SimDisk;
use crate::net;
use crate::scenario::{
    Action, FaultKind, Options, Plan, MAX_DRIFT_MS, SIM_MAX_DELTA_BYTES, WITHIN_SKEW_PERCENT,
};
use crate::time::{self, SimTime, Skew};
use crate::trace::Trace;
use crate::workload::{self, History};

/// Simulated time per step.
pub const TICK: Duration = Duration::from_millis(1);

/// How often, after the heal, replicas are compared.
const CONVERGE_POLL: Duration = Duration::from_millis(100);

/// How often each region's HLC goes into the trace.
const TRACE_CLOCKS_EVERY: Duration = Duration::from_millis(100);

/// Segments a simulated TCP socket buffers.
const TCP_CAPACITY: usize = 4096;

/// What one seed's run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Digest of the run's trace: equal for equal seeds and options.
    pub digest: u64,
    /// Everything that went wrong; empty when the run passed.
    pub violations: Vec<String>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, u32>,
    /// Writes acknowledged.
    pub acked: u64,
    /// Operations without an answer or with an error.
    pub failed: u64,
    /// Reads answered.
    pub reads: u64,
    /// Simulated time from the heal until every replica was identical.
    pub converged_after: Option<Duration>,
    /// Simulated time of the whole run.
    pub simulated: Duration,
    /// Wall-clock time of the whole run.
    pub wall: Duration,
}

impl Outcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Weak handles on a running node's store and clock, for the checkers;
/// weak, so a crash still drops (and closes) the store.
#[derive(Default)]
struct Handles {
    store: Weak<Store>,
    clock: Weak<Clock>,
}

type Registry = Rc<RefCell<Vec<Handles>>>;

/// The state of a run between steps.
struct World<'a> {
    plan: Plan,
    options: Options,
    sim: turmoil::Sim<'a>,
    data: PathBuf,
    skews: Vec<Skew>,
    registry: Registry,
    started: Rc<Cell<usize>>,
    crashed: BTreeSet<usize>,
    /// Each region's disk, across its restarts.
    disks: Vec<SimDisk>,
    /// Each region's data directory now: a power cut moves it to a new
    /// one, built from what the disk kept.
    dirs: Vec<Rc<RefCell<PathBuf>>>,
    /// Regions down with their power cut, to be rebuilt before restarting.
    lost_power: BTreeSet<usize>,
    /// Regions with a torn write or a failed sync armed or struck, whose
    /// power is still to be cut.
    disk_faulted: BTreeSet<usize>,
    /// When each region's power was cut.
    power_cuts: Vec<Vec<Duration>>,
    /// Power cuts so far, for the directories' names.
    cuts: u32,
    /// The network episode under way (its starting action).
    episode: Option<Action>,
    /// Regions whose clock was ever off by more than the bound.
    quarantined: BTreeSet<usize>,
    /// Last HLC seen per region in its current life.
    last_hlc: Vec<Option<u64>>,
    trace: Trace,
    violations: Vec<String>,
    faults: BTreeMap<FaultKind, u32>,
}

/// Runs `seed` under `options`, with the regions' data under a new
/// temporary directory in `data_root` (the system's when `None`).
pub fn run(seed: u64, options: &Options, data_root: Option<&Path>) -> Result<Outcome, String> {
    options.validate()?;
    let started_wall = Instant::now();
    let dir = match data_root {
        Some(root) => tempfile::Builder::new()
            .prefix("concord-sim-")
            .tempdir_in(root),
        None => tempfile::Builder::new().prefix("concord-sim-").tempdir(),
    }
    .map_err(|e| format!("cannot create the data directory: {e}"))?;
    crate::panics::install();
    crate::panics::take();

    let plan = Plan::draw(seed, options);
    let total = options.duration + options.converge_within + Duration::from_secs(60);
    let sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(time::epoch())
        .tick_duration(TICK)
        .simulation_duration(total)
        .min_message_latency(Duration::ZERO)
        .max_message_latency(Duration::from_millis(2))
        .tcp_capacity(TCP_CAPACITY)
        .build();
    let regions = plan.regions.len();
    let mut world = World {
        trace: Trace::new(seed),
        options: options.clone(),
        sim,
        data: dir.path().to_path_buf(),
        skews: (0..regions).map(|_| Skew::default()).collect(),
        registry: Rc::new(RefCell::new(
            (0..regions).map(|_| Handles::default()).collect(),
        )),
        started: Rc::new(Cell::new(0)),
        crashed: BTreeSet::new(),
        disks: (0..regions)
            .map(|r| {
                let disk = SimDisk::new(seed ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                if options.lying_disk {
                    disk.lying();
                }
                disk
            })
            .collect(),
        dirs: plan
            .regions
            .iter()
            .map(|r| Rc::new(RefCell::new(dir.path().join(r.name))))
            .collect(),
        lost_power: BTreeSet::new(),
        disk_faulted: BTreeSet::new(),
        power_cuts: vec![Vec::new(); regions],
        cuts: 0,
        episode: None,
        quarantined: BTreeSet::new(),
        last_hlc: vec![None; regions],
        violations: Vec::new(),
        faults: BTreeMap::new(),
        plan,
    };
    world.trace.line(format_args!("plan {:?}", world.plan));
    let mut outcome = world.play();
    // The hosts (and their sled databases) go before their directory.
    drop(world);
    drop(dir);
    outcome.wall = started_wall.elapsed();
    Ok(outcome)
}

impl World<'_> {
    fn play(&mut self) -> Outcome {
        let history: History = Rc::new(RefCell::new(Vec::new()));
        for i in 0..self.plan.regions.len() {
            if self.plan.regions[i].starts_at.is_zero() {
                self.start_region(i);
            }
        }
        if !self.plan.latencies.is_empty() {
            self.faults.insert(FaultKind::Latency, 1);
        }
        let until_ms = u64::try_from(self.options.duration.as_millis()).unwrap_or(u64::MAX);
        let names: Vec<&'static str> = self.plan.regions.iter().map(|r| r.name).collect();
        for id in 0..self.options.clients {
            let (names, started, history) = (names.clone(), self.started.clone(), history.clone());
            let seed = self.plan.seed;
            self.sim.client(format!("client-{id}"), async move {
                workload::client(id, seed, names, started, until_ms, history).await
            });
        }

        // The workload, with the fault schedule.
        let mut next = 0;
        loop {
            let now = self.sim.elapsed();
            while next < self.plan.events.len() && self.plan.events[next].at <= now {
                let action = self.plan.events[next].action.clone();
                self.apply(&action);
                next += 1;
            }
            let done = match self.sim.step() {
                Ok(done) => done,
                Err(e) => {
                    self.violations.push(format!("a host failed: {e}"));
                    return self.finish(&history, None);
                }
            };
            self.sample_clocks();
            if done && now >= self.options.duration {
                break;
            }
        }

        // Heal: every remaining event that starts something is skipped;
        // the rest of the world is put right.
        self.heal();
        let healed = self.sim.elapsed();
        self.trace.line(format_args!("healed at {healed:?}"));

        let mut converged = None;
        let mut last_poll = healed;
        while self.sim.elapsed() - healed <= self.options.converge_within {
            if let Err(e) = self.sim.step() {
                self.violations.push(format!("a host failed: {e}"));
                return self.finish(&history, None);
            }
            self.sample_clocks();
            if self.sim.elapsed() - last_poll >= CONVERGE_POLL {
                last_poll = self.sim.elapsed();
                if self.converged() {
                    converged = Some(self.sim.elapsed() - healed);
                    break;
                }
            }
        }
        self.finish(&history, converged)
    }

    fn region_config(&self, i: usize) -> Config {
        let region = &self.plan.regions[i];
        let peers = self
            .plan
            .regions
            .iter()
            .filter(|p| p.name != region.name)
            .map(|p| PeerConfig {
                region: p.name.to_string(),
                replica_id: p.replica,
                endpoint: format!("http://{}:{}", p.name, net::PORT),
            })
            .collect();
        let keyspaces = [
            (workload::COUNTERS, CrdtType::Counter),
            (workload::SETS, CrdtType::Set),
            (workload::REGISTERS, CrdtType::Register),
            (workload::STREAMS, CrdtType::Stream),
        ]
        .into_iter()
        .map(|(name, ty)| KeyspaceConfig {
            name: name.to_string(),
            ty,
        })
        .collect();
        Config {
            region: region.name.to_string(),
            replica_id: region.replica,
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], net::PORT)),
            data_dir: self.dirs[i].borrow().clone(),
            metrics_listen: None,
            pid_file: None,
            peers,
            durability: if self.plan.relaxed {
                Durability::Relaxed
            } else {
                Durability::Group
            },
            // 0 turns the node's check off.
            max_drift_ms: if self.options.drift_check {
                MAX_DRIFT_MS
            } else {
                0
            },
            storage: StorageConfig {
                flush_every_ms: 500,
                cache_capacity_bytes: 8 << 20,
                max_log_bytes_per_origin: self.plan.log_cap_bytes,
                // Small, so runs roll segments and checkpoint mid-fault.
                journal_segment_bytes: 256 << 10,
            },
            limits: sim_limits(),
            keyspaces,
            log: LogConfig::default(),
        }
    }

    fn start_region(&mut self, i: usize) {
        let config = self.region_config(i);
        let skew = self.skews[i].clone();
        let registry = self.registry.clone();
        let name = self.plan.regions[i].name;
        let (dir, disk) = (self.dirs[i].clone(), self.disks[i].clone());
        self.sim.host(name, move || {
            let (skew, registry) = (skew.clone(), registry.clone());
            let config = Config {
                data_dir: dir.borrow().clone(),
                ..config.clone()
            };
            let machine = Machine {
                offload: Offload::Inline,
                disk: Arc::new(disk.clone()),
            };
            let struck = disk.clone();
            async move {
                let node = match Node::open_on(config, SimTime::new(skew), machine).await {
                    Ok(node) => node,
                    // A disk fault struck while opening: the node is down
                    // until the power cut that ends the fault.
                    Err(e) if struck.struck() => {
                        tracing::warn!(error = %e, "the node could not open on a failed disk");
                        std::future::pending::<()>().await;
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                };
                registry.borrow_mut()[i] = Handles {
                    store: Arc::downgrade(node.engine().store()),
                    clock: Arc::downgrade(node.engine().clock()),
                };
                let incoming = net::incoming().await?;
                node.serve(incoming, net::connector(), std::future::pending())
                    .await?;
                Ok(())
            }
        });
        // Links to the regions already started; a later one sets its own.
        for l in self.plan.latencies.clone() {
            let (a, b) = l.pair;
            let other = if a == i { b } else { a };
            if (a == i || b == i) && other < self.started.get() {
                let (x, y) = (self.plan.regions[a].name, self.plan.regions[b].name);
                self.sim.set_link_latency(x, y, l.min);
                self.sim.set_link_max_message_latency(x, y, l.max);
            }
        }
        self.started.set(self.started.get().max(i + 1));
    }

    fn names(&self, regions: &[usize]) -> Vec<&'static str> {
        regions
            .iter()
            .filter(|&&r| r < self.started.get())
            .map(|&r| self.plan.regions[r].name)
            .collect()
    }

    fn apply(&mut self, action: &Action) {
        self.trace
            .line(format_args!("{:?} {action:?}", self.sim.elapsed()));
        if let Some(kind) = action.starts() {
            *self.faults.entry(kind).or_default() += 1;
        }
        match action {
            Action::Partition(..)
            | Action::PartitionOneway(..)
            | Action::Hold(..)
            | Action::Loss(..) => self.episode = Some(action.clone()),
            Action::Repair(..)
            | Action::RepairOneway(..)
            | Action::Release(..)
            | Action::LossEnd(..) => self.episode = None,
            _ => {}
        }
        self.network(action);
    }

    /// Applies an action.
    fn network(&mut self, action: &Action) {
        let name = |r: usize| self.plan.regions[r].name;
        match action {
            Action::Partition(a, b) | Action::Repair(a, b) => {
                let cut = matches!(action, Action::Partition(..));
                for x in self.names(a) {
                    for y in self.names(b) {
                        if cut {
                            self.sim.partition(x, y);
                        } else {
                            self.sim.repair(x, y);
                        }
                    }
                }
            }
            Action::PartitionOneway(a, b) => self.sim.partition_oneway(name(*a), name(*b)),
            Action::RepairOneway(a, b) => self.sim.repair_oneway(name(*a), name(*b)),
            Action::Hold(a, b) => self.sim.hold(name(*a), name(*b)),
            Action::Release(a, b) => self.sim.release(name(*a), name(*b)),
            Action::Loss(a, b, ppm) => {
                let (a, b) = (name(*a), name(*b));
                self.sim.set_link_fail_rate(a, b, f64::from(*ppm) / 1e6);
            }
            Action::LossEnd(a, b) => {
                let (a, b) = (name(*a), name(*b));
                self.sim.set_link_fail_rate(a, b, 0.0);
            }
            Action::Crash(r) => {
                if self.crashed.insert(*r) {
                    self.crash(*r);
                }
            }
            Action::Restart(r) => {
                if self.crashed.remove(r) {
                    self.restart(*r);
                }
            }
            Action::PowerLoss(r) => self.cut_power(*r),
            Action::TearNextWrite(r) => {
                self.disk_faulted.insert(*r);
                self.disks[*r].tear_next_write();
            }
            Action::FailNextSync(r) => {
                self.disk_faulted.insert(*r);
                self.disks[*r].fail_next_sync();
            }
            Action::SlowDisk(r, ms) => self.disks[*r].set_slow(Duration::from_millis(*ms)),
            Action::Skew(r, ms) => {
                if ms.unsigned_abs() > MAX_DRIFT_MS {
                    self.quarantined.insert(*r);
                }
                self.skews[*r].set(*ms);
            }
            Action::Join(r) => self.start_region(*r),
        }
    }

    /// Crashes region `r`'s node.
    ///
    /// turmoil crashes a host by dropping its runtime, whose tasks tokio
    /// drops in an order that depends on task ids, which come from a
    /// process-wide counter: the order would differ between a replay and a
    /// run among other seeds. Each dropped socket sends a FIN or RST, and
    /// every message sent draws its latency from the one network RNG, so
    /// that order would leak into every later delivery. So the host is cut
    /// off first: messages on a cut link are dropped without a draw (while
    /// no loss rate is set on it), which also makes the crash lose the
    /// packets it had in flight, as a power cut does. Then the links are
    /// put back as the network episode under way wants them.
    fn crash(&mut self, r: usize) {
        let host = self.plan.regions[r].name;
        let mut others: Vec<String> = self.plan.regions[..self.started.get()]
            .iter()
            .filter(|p| p.name != host)
            .map(|p| p.name.to_string())
            .collect();
        others.extend((0..self.options.clients).map(|c| format!("client-{c}")));
        for other in &others {
            self.sim.set_link_fail_rate(host, other.as_str(), 0.0);
            self.sim.partition(host, other.as_str());
        }
        self.sim.crash(host);
        self.last_hlc[r] = None;
        for other in &others {
            self.sim.repair(host, other.as_str());
        }
        if let Some(episode) = self.episode.clone() {
            self.network(&episode);
        }
    }

    /// Cuts region `r`'s power: its node stops (unless it is down
    /// already), and it restarts on what its disk kept.
    fn cut_power(&mut self, r: usize) {
        if self.crashed.insert(r) {
            self.crash(r);
        }
        self.lost_power.insert(r);
        self.disk_faulted.remove(&r);
        self.power_cuts[r].push(self.sim.elapsed());
    }

    /// Restarts region `r`'s node, first building, after a power cut, the
    /// data directory its disk kept.
    fn restart(&mut self, r: usize) {
        let name = self.plan.regions[r].name;
        if self.lost_power.remove(&r) {
            self.cuts += 1;
            let from = self.dirs[r].borrow().clone();
            let to = self.data.join(format!("{name}.{}", self.cuts));
            match self.disks[r].power_loss(&from, &to) {
                Ok(lost) => {
                    self.trace.line(format_args!(
                        "{:?} power back in {name}: {lost:?}",
                        self.sim.elapsed()
                    ));
                    *self.dirs[r].borrow_mut() = to;
                }
                Err(e) => self.violations.push(format!(
                    "rebuilding {name}'s disk after a power cut failed: {e}"
                )),
            }
        }
        self.sim.bounce(name);
    }

    /// Ends every fault: links repaired and released, loss off, clocks
    /// right, disks fast and whole again (a region whose disk failed has
    /// its power cut), crashed nodes restarted, a region still to join
    /// started.
    fn heal(&mut self) {
        // No episode is under way any more: a power cut below must not
        // bring one back.
        self.episode = None;
        let all: Vec<usize> = (0..self.started.get()).collect();
        for a in &all {
            for b in &all {
                if a < b {
                    let (x, y) = (self.plan.regions[*a].name, self.plan.regions[*b].name);
                    self.sim.release(x, y);
                    self.sim.repair(x, y);
                    self.sim.set_link_fail_rate(x, y, 0.0);
                }
            }
        }
        for skew in &self.skews {
            skew.set(0);
        }
        for disk in &self.disks {
            disk.set_slow(Duration::ZERO);
        }
        for r in std::mem::take(&mut self.disk_faulted) {
            self.cut_power(r);
        }
        for r in std::mem::take(&mut self.crashed) {
            self.restart(r);
        }
        for i in self.started.get()..self.plan.regions.len() {
            self.start_region(i);
        }
    }

    /// Checks every running region's HLC: never backwards in one life, and
    /// never further ahead of true time than an accepted peer could push
    /// it, unless its own clock was ever beyond the bound.
    fn sample_clocks(&mut self) {
        let now = self.sim.elapsed();
        let true_ms = time::EPOCH_UNIX_MS + i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
        let slack = i64::try_from(MAX_DRIFT_MS + MAX_DRIFT_MS * WITHIN_SKEW_PERCENT / 100)
            .unwrap_or(i64::MAX)
            + 2 * i64::try_from(TICK.as_millis()).unwrap_or(1);
        let trace_now = now.as_millis() % TRACE_CLOCKS_EVERY.as_millis() == 0;
        for r in 0..self.started.get() {
            let Some(clock) = self.registry.borrow()[r].clock.upgrade() else {
                self.last_hlc[r] = None;
                continue;
            };
            let hlc = clock.last();
            if let Some(prev) = self.last_hlc[r] {
                if hlc.as_u64() < prev {
                    self.violations.push(format!(
                        "region {} HLC went backwards at {now:?}: {prev} then {}",
                        self.plan.regions[r].name,
                        hlc.as_u64()
                    ));
                }
            }
            self.last_hlc[r] = Some(hlc.as_u64());
            if !self.quarantined.contains(&r) && hlc.unix_ms() > true_ms + slack {
                self.violations.push(format!(
                    "region {} HLC is {} ms ahead of true time at {now:?}: it accepted a timestamp from a clock beyond the drift bound",
                    self.plan.regions[r].name,
                    hlc.unix_ms() - true_ms
                ));
                // One report per region is enough.
                self.quarantined.insert(r);
            }
            if trace_now {
                self.trace
                    .line(format_args!("{now:?} clock {r} {}", hlc.as_u64()));
            }
        }
    }

    fn dumps(&self) -> Vec<Result<Dump, String>> {
        (0..self.plan.regions.len())
            .map(|r| match self.registry.borrow()[r].store.upgrade() {
                Some(store) => check::dump(&store),
                None => Err(format!("{} is not running", self.plan.regions[r].name)),
            })
            .collect()
    }

    fn converged(&self) -> bool {
        let registry = self.registry.borrow();
        let mut vvs = Vec::new();
        for h in registry.iter() {
            match h.store.upgrade().map(|s| s.version_vector()) {
                Some(Ok(vv)) => vvs.push(vv),
                _ => return false,
            }
        }
        drop(registry);
        if !vvs.windows(2).all(|w| w[0] == w[1]) {
            return false;
        }
        let dumps = self.dumps();
        match dumps.first() {
            Some(Ok(first)) => dumps.iter().all(|d| d.as_ref().ok() == Some(first)),
            _ => false,
        }
    }

    fn finish(&mut self, history: &History, converged: Option<Duration>) -> Outcome {
        let history = self.lost_to_power_cuts(&history.borrow());
        for r in history.iter() {
            self.trace.line(format_args!("{r:?}"));
        }
        let dumps = self.dumps();
        let replicas: Vec<u32> = self.plan.regions.iter().map(|r| r.replica).collect();
        match converged {
            Some(after) => {
                self.trace.line(format_args!("converged after {after:?}"));
                if let Some(Ok(dump)) = dumps.first() {
                    self.trace.line(format_args!("{dump:?}"));
                    self.violations
                        .extend(check::acknowledged_writes(dump, &history, &replicas));
                }
            }
            None => {
                let mut why = String::new();
                let first = dumps.first().and_then(|d| d.as_ref().ok());
                for (r, d) in dumps.iter().enumerate() {
                    let name = self.plan.regions[r].name;
                    let _ = match (d, first) {
                        (Err(e), _) => write!(why, "; {name}: {e}"),
                        (Ok(d), Some(f)) => match check::difference(f, d) {
                            Some(diff) => write!(why, "; {name} differs: {diff}"),
                            None => Ok(()),
                        },
                        (Ok(_), None) => Ok(()),
                    };
                }
                self.violations.push(format!(
                    "replicas not identical {:?} after the heal{why}",
                    self.options.converge_within
                ));
            }
        }
        self.violations
            .extend(check::hlc_order(&history, self.plan.regions.len()));
        for p in crate::panics::take() {
            self.violations.push(format!("a panic: {p}"));
        }
        for v in &self.violations {
            self.trace.line(format_args!("violation {v}"));
        }
        let (mut acked, mut failed, mut reads) = (0, 0, 0);
        let history = &history;
        for r in history.iter() {
            match r.answer {
                workload::Answer::Acked { .. } => acked += 1,
                workload::Answer::Value(_) => reads += 1,
                workload::Answer::Failed(_) => failed += 1,
            }
        }
        Outcome {
            seed: self.plan.seed,
            digest: self.trace.digest(),
            violations: std::mem::take(&mut self.violations),
            faults: std::mem::take(&mut self.faults),
            acked,
            failed,
            reads,
            converged_after: converged,
            simulated: self.sim.elapsed(),
            wall: Duration::ZERO,
        }
    }
}

impl World<'_> {
    /// The history as the checks must read it
    /// ([`check::lost_to_power_cuts`], in relaxed runs only).
    fn lost_to_power_cuts(&self, history: &[workload::Record]) -> Vec<workload::Record> {
        if !self.plan.relaxed {
            return history.to_vec();
        }
        let flushes: Vec<Vec<Duration>> = self.disks.iter().map(SimDisk::flushes).collect();
        check::lost_to_power_cuts(history, &self.power_cuts, &flushes)
    }
}

/// Small limits: short logs, so the log cap and catch-up by snapshot come
/// into play within seconds.
fn sim_limits() -> Limits {
    Limits {
        max_key_bytes: 128,
        max_value_bytes: 1024,
        max_member_bytes: 256,
        max_members_per_op: 16,
        max_fields_per_entry: 16,
        max_field_name_bytes: 64,
        max_entry_bytes: 1024,
        max_observed_replicas: 16,
        max_delta_bytes: usize::try_from(SIM_MAX_DELTA_BYTES).unwrap_or(usize::MAX),
        max_batch_ops: 256,
        max_range_entries: 10_000,
    }
}
