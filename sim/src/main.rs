//! `concord-sim`: runs the partition simulation suite.
//!
//! ```text
//! concord-sim run --seeds 500 [--start S | --random] [--regions 3]
//!                 [--faults partition,crash,...] [--duration 10] [--jobs 2]
//!                 [--durability group|relaxed|mixed] [--lying-disk]
//! concord-sim replay --seed S [same options]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use concord_sim::scenario::DurabilityChoice;
use concord_sim::{FaultKind, Options, Outcome};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "concord-sim",
    version,
    about = "Deterministic partition simulation of concord clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs many seeds and prints a summary.
    Run {
        /// How many seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed (the rest follow it).
        #[arg(long, default_value_t = 0, conflicts_with = "random")]
        start: u64,
        /// Start from a random seed (printed, so the block can be rerun).
        #[arg(long)]
        random: bool,
        /// Seeds run at once, each on its own thread (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Succeed only if some seed fails (to prove the checkers bite).
        #[arg(long)]
        expect_failure: bool,
        /// Print one line per seed, with its trace digest.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        scenario: ScenarioArgs,
    },
    /// Runs one seed with full logs and its trace.
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        scenario: ScenarioArgs,
    },
}

#[derive(Args, Clone)]
struct ScenarioArgs {
    /// Regions at the start (one more may join).
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Fault kinds to draw from, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    faults: Option<Vec<FaultKind>>,
    /// Seconds of simulated workload before the heal.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Directory for the regions' data (default: the system's temporary
    /// directory; a tmpfs such as /dev/shm makes runs faster).
    #[arg(long, env = "CONCORD_SIM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When the regions acknowledge writes (mixed: relaxed in one seed of
    /// four).
    #[arg(long, value_enum, default_value_t = DurabilityChoice::Mixed)]
    durability: DurabilityChoice,
    /// Plant a bug: disks that say a sync is done without doing it, so
    /// writes are acknowledged before they are durable. With power cuts
    /// among the faults the suite must fail (use with --expect-failure).
    #[arg(long)]
    lying_disk: bool,
}

impl ScenarioArgs {
    fn options(&self) -> Options {
        let mut options = Options {
            regions: self.regions,
            duration: Duration::from_secs(self.duration),
            clients: self.clients,
            durability: self.durability,
            lying_disk: self.lying_disk,
            ..Options::default()
        };
        if let Some(faults) = &self.faults {
            options.faults = faults.iter().copied().collect();
        }
        options
    }

    /// The arguments that reproduce these options, for a replay command.
    fn replay_args(&self) -> String {
        let mut args = format!(
            "--regions {} --duration {} --clients {}",
            self.regions, self.duration, self.clients
        );
        if let Some(faults) = &self.faults {
            let names: Vec<&str> = faults.iter().map(|f| f.name()).collect();
            args.push_str(&format!(" --faults {}", names.join(",")));
        }
        if self.durability != DurabilityChoice::Mixed {
            let name = match self.durability {
                DurabilityChoice::Group => "group",
                DurabilityChoice::Relaxed => "relaxed",
                DurabilityChoice::Mixed => "mixed",
            };
            args.push_str(&format!(" --durability {name}"));
        }
        if self.lying_disk {
            args.push_str(" --lying-disk");
        }
        args
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    concord_sim::panics::install();
    if let Some(warning) = concord_sim::reproducibility_warning() {
        eprintln!("warning: {warning}");
    }
    match cli.command {
        Command::Run {
            seeds,
            start,
            random,
            jobs,
            expect_failure,
            verbose,
            scenario,
        } => run(
            seeds,
            start,
            random,
            jobs,
            Report {
                expect_failure,
                verbose,
            },
            &scenario,
        ),
        Command::Replay { seed, scenario } => replay(seed, &scenario),
    }
}

fn replay(seed: u64, scenario: &ScenarioArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,concord_sim::trace=trace"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_timer(SimulatedTime)
        // Colours for a terminal, never escape codes in a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let options = scenario.options();
    match concord_sim::run(seed, &options, scenario.data_dir.as_deref()) {
        Ok(outcome) => {
            println!("{}", describe(&outcome));
            for v in &outcome.violations {
                println!("  violation: {v}");
            }
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Log lines carry the simulated time since the start of the run.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>9.3}s", t.as_secs_f64()),
            None => write!(w, "{:>10}", "-"),
        }
    }
}

fn describe(o: &Outcome) -> String {
    format!(
        "seed {}: {} · digest {:016x} · {} writes acknowledged, {} failed, {} reads · converged {} · {:.1} s simulated in {:.2} s",
        o.seed,
        if o.passed() { "passed" } else { "FAILED" },
        o.digest,
        o.acked,
        o.failed,
        o.reads,
        o.converged_after
            .map(|d| format!("{} ms after the heal", d.as_millis()))
            .unwrap_or_else(|| "never".into()),
        o.simulated.as_secs_f64(),
        o.wall.as_secs_f64(),
    )
}

/// How `run` reports.
struct Report {
    expect_failure: bool,
    verbose: bool,
}

fn run(
    seeds: u64,
    start: u64,
    random: bool,
    jobs: Option<usize>,
    report: Report,
    scenario: &ScenarioArgs,
) -> ExitCode {
    let options = scenario.options();
    if let Err(e) = options.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let start = if random {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            % 1_000_000_000;
        println!("random block: seeds {s}..{}", s + seeds);
        s
    } else {
        start
    };
    let jobs = jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 64);
    let bar = ProgressBar::new(seeds);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} seeds · {per_sec} · eta {eta} · {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("no failures");
    let next = AtomicU64::new(start);
    let end = start + seeds;
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<(u64, Result<Outcome, String>)>();
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let tx = tx.clone();
            let (next, options, data) = (&next, &options, scenario.data_dir.as_deref());
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    concord_sim::run(seed, options, data)
                }))
                .unwrap_or_else(|_| Err("the harness panicked".to_string()));
                if tx.send((seed, outcome)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let mut failures = 0;
        let mut done = 0u64;
        let mut reported = Instant::now();
        for (seed, outcome) in rx {
            match outcome {
                Ok(o) => {
                    if report.verbose {
                        say(&bar, describe(&o));
                    }
                    if !o.passed() {
                        failures += 1;
                        say(&bar, format!(
                            "seed {seed} FAILED: {}\n  replay: cargo run -p concord-sim --release -- replay --seed {seed} {}",
                            o.violations.first().map(String::as_str).unwrap_or(""),
                            scenario.replay_args()
                        ));
                    }
                    outcomes.push(o);
                }
                Err(e) => {
                    failures += 1;
                    say(&bar, format!("seed {seed} ERROR: {e}"));
                    errors.push((seed, e));
                }
            }
            bar.set_message(format!("{failures} failed"));
            bar.inc(1);
            done += 1;
            // Without a terminal there is no bar: a line now and then
            // says how far the run is.
            if bar.is_hidden() && (reported.elapsed() >= PROGRESS_EVERY || done == seeds) {
                reported = Instant::now();
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / done as f64 * (seeds - done) as f64;
                println!(
                    "progress: {done}/{seeds} seeds, {failures} failed, {elapsed:.0} s elapsed, about {eta:.0} s to go"
                );
            }
        }
    });
    bar.finish_and_clear();
    outcomes.sort_by_key(|o| o.seed);
    print!(
        "{}",
        summary(&outcomes, &errors, started.elapsed(), scenario)
    );
    let failed = errors.len() + outcomes.iter().filter(|o| !o.passed()).count();
    match (report.expect_failure, failed) {
        (false, 0) => ExitCode::SUCCESS,
        (false, _) => ExitCode::FAILURE,
        (true, 0) => {
            eprintln!("expected at least one seed to fail, but all {seeds} passed");
            ExitCode::FAILURE
        }
        (true, _) => {
            println!("as expected, {failed} of {seeds} seeds failed");
            ExitCode::SUCCESS
        }
    }
}

/// How often a run without a terminal prints a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Prints a line above the progress bar, or plainly when there is no bar
/// (output not to a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    format!("{} ms", sorted[i.min(sorted.len() - 1)].as_millis())
}

fn summary(
    outcomes: &[Outcome],
    errors: &[(u64, String)],
    wall: Duration,
    scenario: &ScenarioArgs,
) -> String {
    let mut out = String::new();
    let row = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<28} {v}\n"));
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    let seeds = outcomes.len() + errors.len();
    out.push_str("\nsummary\n");
    row(
        &mut out,
        "seeds",
        format!(
            "{seeds} ({} passed, {} failed, {} errors)",
            outcomes.len() - failed.len(),
            failed.len(),
            errors.len()
        ),
    );
    let (acked, failed_ops, reads) = outcomes.iter().fold((0, 0, 0), |(a, f, r), o| {
        (a + o.acked, f + o.failed, r + o.reads)
    });
    row(
        &mut out,
        "operations",
        format!("{acked} writes acknowledged, {failed_ops} of unknown outcome, {reads} reads"),
    );
    let mut faults: BTreeMap<FaultKind, (u32, u32)> = BTreeMap::new();
    for o in outcomes {
        for (k, n) in &o.faults {
            let e = faults.entry(*k).or_default();
            e.0 += n;
            e.1 += 1;
        }
    }
    out.push_str("  faults injected              kind         count   seeds\n");
    for kind in FaultKind::ALL {
        let (n, s) = faults.get(&kind).copied().unwrap_or((0, 0));
        out.push_str(&format!(
            "  {:<28} {:<12} {n:>5}   {s:>5}\n",
            "",
            kind.name()
        ));
    }
    let mut conv: Vec<Duration> = outcomes.iter().filter_map(|o| o.converged_after).collect();
    conv.sort_unstable();
    row(
        &mut out,
        "convergence after the heal",
        format!(
            "p50 {} · p90 {} · p99 {} · max {}",
            percentile(&conv, 0.5),
            percentile(&conv, 0.9),
            percentile(&conv, 0.99),
            conv.last()
                .map(|d| format!("{} ms", d.as_millis()))
                .unwrap_or_else(|| "-".into())
        ),
    );
    let simulated: f64 = outcomes.iter().map(|o| o.simulated.as_secs_f64()).sum();
    let busy: f64 = outcomes.iter().map(|o| o.wall.as_secs_f64()).sum();
    row(
        &mut out,
        "simulated time",
        format!(
            "{simulated:.0} s in {:.1} s of wall time ({:.1} simulated s per wall s per thread)",
            wall.as_secs_f64(),
            if busy > 0.0 { simulated / busy } else { 0.0 }
        ),
    );
    row(
        &mut out,
        "throughput",
        format!(
            "{:.1} seeds per minute",
            seeds as f64 / wall.as_secs_f64().max(1e-9) * 60.0
        ),
    );
    out.push_str(
        "\n  Every acknowledged write must be present in every region with its type's\n  \
         semantics. A write of unknown outcome is one whose client got an error or no\n  \
         answer (its region was cut off, crashed or lost power); it may or may not have\n  \
         been applied, and the checkers accept either, the same in every region. A\n  \
         fault's count is how often it was injected, its seeds how many runs had it.\n  \
         Convergence is the simulated time from the last heal until every region\n  \
         applied the same vector.\n",
    );
    if !failed.is_empty() || !errors.is_empty() {
        out.push_str("  failures\n");
        for o in &failed {
            out.push_str(&format!(
                "    seed {:<10} {}\n      replay: cargo run -p concord-sim --release -- replay --seed {} {}\n",
                o.seed,
                o.violations.first().map(String::as_str).unwrap_or(""),
                o.seed,
                scenario.replay_args()
            ));
        }
        for (seed, e) in errors {
            out.push_str(&format!("    seed {seed:<10} error: {e}\n"));
        }
    }
    out
}
