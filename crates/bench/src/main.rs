//! `concord-bench`: drives concord regions with concurrent gRPC clients
//! and reports throughput and latency percentiles.
//!
//! ```text
//! concord-bench --endpoint http://127.0.0.1:7101 --op incr --clients 50 --requests 100000
//! concord-bench --op sadd --batch 16 --dist zipf:0.99 --duration 30 --json
//! concord-bench --op set --rate 5000 --duration 60
//! ```
//!
//! It exits with 1 when any request failed (after printing the report),
//! and with 2 for a malformed command line.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use concord_bench::{KeyDist, Op, Plan, Progress, Report, Stop};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Load generator for concord regions.
#[derive(Debug, Parser)]
#[command(name = "concord-bench", version, about)]
struct Args {
    /// A region's gRPC endpoint; repeat it (or separate with commas) to
    /// spread the clients over several regions.
    #[arg(
        long = "endpoint",
        short = 'e',
        env = "CONCORD_ENDPOINT",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7101"
    )]
    endpoints: Vec<String>,
    /// The operation: incr (counter), sadd (set), set (register) or xadd
    /// (stream).
    #[arg(long, default_value = "incr")]
    op: Op,
    /// Concurrent clients, each on its own connection.
    #[arg(long, short = 'c', default_value_t = 50)]
    clients: usize,
    /// Operations per request; above 1, each request is one batch.
    #[arg(long, short = 'P', default_value_t = 1)]
    batch: usize,
    /// Distinct keys drawn from.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Distinct set members drawn from (sadd).
    #[arg(long, default_value_t = 100_000)]
    members: u64,
    /// Key distribution: uniform, zipf (exponent 0.99) or zipf:<exponent>.
    #[arg(long, default_value = "uniform")]
    dist: KeyDist,
    /// Total requests per second; as fast as possible when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in all (the default stop: 100000).
    #[arg(long, short = 'n', conflicts_with = "duration")]
    requests: Option<u64>,
    /// Seconds to run, instead of a number of requests.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Bytes of each register value and stream field value.
    #[arg(long, short = 'd', default_value_t = 3)]
    value_bytes: usize,
    /// Seed of the key draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stop = match (args.requests, args.duration) {
        (_, Some(s)) if !(s.is_finite() && s > 0.0) => {
            eprintln!("concord-bench: --duration must be above 0");
            return ExitCode::from(2);
        }
        (_, Some(s)) => Stop::After(Duration::from_secs_f64(s)),
        (Some(n), None) => Stop::Requests(n),
        (None, None) => Stop::Requests(100_000),
    };
    let plan = Plan {
        endpoints: args.endpoints.clone(),
        clients: args.clients,
        op: args.op,
        batch: args.batch,
        keys: args.keys,
        members: args.members,
        dist: args.dist,
        rate: args.rate,
        stop,
        value_bytes: args.value_bytes,
        seed: args.seed,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("concord-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(&plan);
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let ops = progress.ops.load(Ordering::Relaxed);
                let errors = progress.errors.load(Ordering::Relaxed);
                bar.set_position(ops);
                bar.set_message(format!("{errors} errors"));
            }
        })
    };
    let result = runtime.block_on(concord_bench::run(&plan, progress));
    ticker.abort();
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            print_report(&plan, &report, args.json);
            if report.errors > 0 {
                eprintln!(
                    "concord-bench: {} requests failed; the first: {}",
                    report.errors,
                    report.first_error.as_deref().unwrap_or("?")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("concord-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn progress_bar(plan: &Plan) -> ProgressBar {
    let bar = match plan.stop {
        Stop::Requests(n) => ProgressBar::new(n.saturating_mul(plan.batch as u64)),
        Stop::After(_) => ProgressBar::no_length(),
    };
    let template = match plan.stop {
        Stop::Requests(_) => "{elapsed_precise} [{bar:30}] {pos}/{len} ops, {per_sec}, {msg}",
        Stop::After(_) => "{elapsed_precise} {pos} ops, {per_sec}, {msg}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn dist_name(dist: KeyDist) -> String {
    match dist {
        KeyDist::Uniform => "uniform".into(),
        KeyDist::Zipf(s) => format!("zipf:{s}"),
    }
}

fn print_report(plan: &Plan, r: &Report, as_json: bool) {
    let quantiles = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];
    if as_json {
        let mut latency = serde_json::Map::new();
        for (name, q) in quantiles {
            latency.insert(name.into(), json!(r.latency_ms(q)));
        }
        latency.insert("max".into(), json!(r.latency_us.max() as f64 / 1000.0));
        println!(
            "{}",
            json!({
                "op": plan.op.name(),
                "clients": plan.clients,
                "batch": plan.batch,
                "keys": plan.keys,
                "dist": dist_name(plan.dist),
                "rate": plan.rate,
                "requests": r.requests,
                "ops": r.ops,
                "errors": r.errors,
                "first_error": r.first_error,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "ops_per_sec": r.ops_per_sec(),
                "latency_ms": latency,
            })
        );
        return;
    }
    println!(
        "{}: {} clients, batch {}, {} over {} keys{}",
        plan.op.name(),
        plan.clients,
        plan.batch,
        dist_name(plan.dist),
        plan.keys,
        plan.rate
            .map(|r| format!(", {r} requests/s"))
            .unwrap_or_default()
    );
    println!(
        "  {} requests ({} failed), {} ops in {:.2} s: {:.0} ops/s",
        r.requests,
        r.errors,
        r.ops,
        r.elapsed.as_secs_f64(),
        r.ops_per_sec()
    );
    let lat: Vec<String> = quantiles
        .iter()
        .map(|(name, q)| format!("{name} {:.3}", r.latency_ms(*q)))
        .collect();
    println!(
        "  latency ms: {}, max {:.3}",
        lat.join(", "),
        r.latency_us.max() as f64 / 1000.0
    );
}
