//! Replication benchmark: three regions served in one process on
//! 127.0.0.1 (real gRPC, real sled, group commit).
//!
//! 1. Lag: a steady 5,000 stream appends per second, spread over the three
//!    regions, each region subscribed to every stream. The paced writers
//!    start at evenly spread phases of their interval, so the appends
//!    arrive one at a time rather than all writers at once. The load runs
//!    for a warm-up first (`--warmup S`, 2 s unless told), whose appends
//!    are not measured: a fresh cluster's first half second (new trees,
//!    memory not yet mapped, connections' windows) is slower than its
//!    steady state, and the target is a steady load. For every entry
//!    appended after the warm-up, the lag is the time from the origin's
//!    acknowledgement to its arrival at each of the two other regions'
//!    subscribers; p50/p90/p99/max. `--lag-dump FILE` writes every
//!    measured arrival to FILE (microseconds from the first measured
//!    acknowledgement, lag in microseconds, origin and receiving replica
//!    ids), to see when the slow ones came. `--idle-subscribers N` adds
//!    N subscriptions per region to streams nobody writes; `--repeat N` runs this part N times
//!    against the same regions and sums up the p99s.
//! 2. Backlog: region us-east stops pulling (its outbound links are cut)
//!    while 100,000 counter increments are written in eu-west, in batches
//!    of 100; then the cut heals, and the time until us-east has applied
//!    everything is measured, split into reconnecting and catching up.
//!
//! `cargo bench -p concord-node --bench replication` (add `-- --rate N`,
//! `--seconds S`, `--warmup S`, `--backlog N`, `--idle-subscribers N` or
//! `--repeat N` to change the load). With
//! `-- --processes`, the lag part runs against three `concord-node`
//! processes instead (release build), the load and the subscribers staying
//! in the benchmark's process.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cluster, converged, processes, Region};
use concord_core::ReplicaId;
use concord_proto::v1 as pb;
use tokio_stream::StreamExt;

const STREAM_KEYS: usize = 8;
const WRITERS_PER_REGION: usize = 48;

struct Args {
    processes: bool,
    rate: u64,
    seconds: u64,
    warmup: u64,
    backlog: u64,
    idle_subscribers: u64,
    repeat: u64,
    lag_dump: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        processes: std::env::args().any(|a| a == "--processes"),
        rate: 5_000,
        seconds: 10,
        warmup: 2,
        backlog: 100_000,
        idle_subscribers: 0,
        repeat: 1,
        lag_dump: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    for pair in argv.windows(2) {
        if pair[0] == "--lag-dump" {
            a.lag_dump = Some(pair[1].clone());
        }
        let value = pair[1].parse().ok();
        match (pair[0].as_str(), value) {
            ("--rate", Some(v)) => a.rate = v,
            ("--seconds", Some(v)) => a.seconds = v,
            ("--warmup", Some(v)) => a.warmup = v,
            ("--backlog", Some(v)) => a.backlog = v,
            ("--idle-subscribers", Some(v)) => a.idle_subscribers = v,
            ("--repeat", Some(v)) => a.repeat = v,
            _ => {}
        }
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

type Acked = Arc<Mutex<HashMap<(u64, u32), Instant>>>;

/// Entry id, receiving replica, arrival time.
type Arrivals = Arc<Mutex<Vec<((u64, u32), u32, Instant)>>>;

/// One lag run; returns its p99 in milliseconds.
async fn lag(regions: &[Region], args: &Args) -> f64 {
    let (rate, seconds) = (args.rate, args.seconds);
    for (name, ty) in [
        ("events", pb::CrdtType::Stream),
        ("hits", pb::CrdtType::Counter),
    ] {
        regions[0]
            .client
            .clone()
            .create_keyspace(pb::CreateKeyspaceRequest {
                name: name.into(),
                r#type: ty.into(),
            })
            .await
            .expect("create");
    }
    assert!(converged(regions, Duration::from_secs(10)).await);

    let acked: Acked = Arc::default();
    let arrivals: Arrivals = Arc::default();
    let mut subscribers = Vec::new();
    for (r, region) in regions.iter().enumerate() {
        for k in 0..STREAM_KEYS {
            let mut live = region
                .client
                .clone()
                .stream_subscribe(pb::StreamSubscribeRequest {
                    keyspace: "events".into(),
                    key: format!("k{k}"),
                    after: None,
                })
                .await
                .expect("subscribe")
                .into_inner();
            let arrivals = arrivals.clone();
            let me = r as u32 + 1;
            subscribers.push(tokio::spawn(async move {
                while let Some(Ok(entry)) = live.next().await {
                    let now = Instant::now();
                    if let Some(id) = entry.id {
                        if id.replica != me {
                            arrivals
                                .lock()
                                .expect("lock")
                                .push(((id.hlc, id.replica), me, now));
                        }
                    }
                }
            }));
        }
    }

    // Subscriptions to streams no one writes: publishing an entry should
    // cost nothing for them. Held open until the end.
    let mut idle = Vec::new();
    for region in regions {
        for k in 0..args.idle_subscribers {
            let live = region
                .client
                .clone()
                .stream_subscribe(pb::StreamSubscribeRequest {
                    keyspace: "events".into(),
                    key: format!("idle{k}"),
                    after: None,
                })
                .await
                .expect("subscribe")
                .into_inner();
            idle.push(live);
        }
    }

    let per_writer = rate as f64 / (regions.len() * WRITERS_PER_REGION) as f64;
    let interval = Duration::from_secs_f64(1.0 / per_writer);
    let measured_from = Instant::now() + Duration::from_secs(args.warmup);
    let until = measured_from + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    let writers = (regions.len() * WRITERS_PER_REGION) as u32;
    let start = tokio::time::Instant::now();
    for (r, region) in regions.iter().enumerate() {
        for w in 0..WRITERS_PER_REGION {
            let mut client = region.client.clone();
            let acked = acked.clone();
            // Writer i of n starts i/n of an interval in.
            let phase = interval * (w * regions.len() + r) as u32 / writers;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(start + phase, interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let (mut n, mut measured) = (0usize, 0usize);
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    let sent = Instant::now();
                    let r = client
                        .stream_append(pb::StreamAppendRequest {
                            keyspace: "events".into(),
                            key: format!("k{}", (w + n) % STREAM_KEYS),
                            fields: vec![pb::StreamField {
                                name: "n".into(),
                                value: n.to_le_bytes().to_vec(),
                            }],
                        })
                        .await
                        .expect("append")
                        .into_inner();
                    let id = r.id.expect("id");
                    if sent >= measured_from {
                        measured += 1;
                        acked
                            .lock()
                            .expect("lock")
                            .insert((id.hlc, id.replica), Instant::now());
                    }
                }
                measured
            }));
        }
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.expect("writer");
    }
    assert!(converged(regions, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let acked = acked.lock().expect("lock");
    let arrivals = arrivals.lock().expect("lock");
    let mut lags: Vec<Duration> = arrivals
        .iter()
        .filter_map(|(id, _, at)| acked.get(id).map(|a| at.saturating_duration_since(*a)))
        .collect();
    if let Some(path) = &args.lag_dump {
        dump(path, &acked, &arrivals);
    }
    lags.sort();
    let expected = written * (regions.len() - 1);
    println!(
        "lag: {written} appends in {seconds} s after a {} s warm-up ({:.0}/s offered {rate}/s), {} of {expected} remote arrivals measured",
        args.warmup,
        written as f64 / seconds as f64,
        lags.len()
    );
    println!(
        "lag ms (origin ack -> remote subscriber): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&lags, 0.50),
        percentile(&lags, 0.90),
        percentile(&lags, 0.99),
        percentile(&lags, 1.0)
    );
    // A later run starts with no subscription of this one left.
    for s in subscribers {
        s.abort();
    }
    percentile(&lags, 0.99)
}

/// Writes every measured arrival to `path`, one line each: when its
/// append was acknowledged (µs after the first measured one), its lag
/// (µs), its origin and the replica it arrived at.
fn dump(path: &str, acked: &HashMap<(u64, u32), Instant>, arrivals: &[((u64, u32), u32, Instant)]) {
    use std::io::Write;
    let Some(first) = acked.values().min().copied() else {
        return;
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create the dump"));
    for (id, at_replica, at) in arrivals {
        if let Some(acked_at) = acked.get(id) {
            writeln!(
                out,
                "{} {} {} {at_replica}",
                acked_at.duration_since(first).as_micros(),
                at.saturating_duration_since(*acked_at).as_micros(),
                id.1
            )
            .expect("write the dump");
        }
    }
    out.flush().expect("write the dump");
}

/// Runs the lag part `args.repeat` times and sums up the p99s.
async fn lag_runs(regions: &[Region], args: &Args) {
    let mut p99s = Vec::new();
    for _ in 0..args.repeat.max(1) {
        p99s.push(lag(regions, args).await);
    }
    if p99s.len() > 1 {
        p99s.sort_by(f64::total_cmp);
        let within = p99s.iter().filter(|&&p| p <= 10.0).count();
        println!(
            "lag p99 over {} runs: min {:.2}  median {:.2}  max {:.2} ms; {within} of {} within 10 ms",
            p99s.len(),
            p99s[0],
            p99s[p99s.len() / 2],
            p99s[p99s.len() - 1],
            p99s.len()
        );
    }
}

async fn backlog(regions: &[Region], cut: &AtomicBool, total: u64) {
    cut.store(true, Ordering::SeqCst);
    // Let us-east's links notice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = regions[1].client.clone();
    let started = Instant::now();
    let mut written = 0;
    while written < total {
        let n = 100.min(total - written);
        let operations = (0..n)
            .map(|i| pb::Operation {
                op: Some(pb::operation::Op::CounterIncrement(
                    pb::CounterIncrementRequest {
                        keyspace: "hits".into(),
                        key: format!("k{}", (written + i) % 1000),
                        delta: 1,
                    },
                )),
            })
            .collect();
        client
            .batch(pb::BatchRequest { operations })
            .await
            .expect("batch");
        written += n;
    }
    let wrote_in = started.elapsed();
    let target = regions[1].store().applied(ReplicaId(2)).expect("applied");
    let behind = target - regions[0].store().applied(ReplicaId(2)).expect("applied");
    println!(
        "backlog: {total} increments written in eu-west in {:.2} s while us-east was cut off; us-east {behind} deltas behind",
        wrote_in.as_secs_f64()
    );
    let healed = Instant::now();
    cut.store(false, Ordering::SeqCst);
    let mut first_progress = None;
    let before = regions[0].store().applied(ReplicaId(2)).expect("applied");
    loop {
        let have = regions[0].store().applied(ReplicaId(2)).expect("applied");
        if first_progress.is_none() && have > before {
            first_progress = Some(healed.elapsed());
        }
        if have >= target {
            break;
        }
        if healed.elapsed() > Duration::from_secs(120) {
            println!("backlog: not converged after 120 s ({have} of {target})");
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let total_s = healed.elapsed().as_secs_f64();
    let reconnect = first_progress.unwrap_or_default().as_secs_f64();
    println!(
        "backlog: converged {total_s:.2} s after the heal ({reconnect:.2} s until the link was back, {:.2} s applying)",
        total_s - reconnect
    );
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        if args.processes {
            let (regions, mut children) = processes(dir.path()).await;
            lag_runs(&regions, &args).await;
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            return;
        }
        let cut = Arc::new(AtomicBool::new(false));
        let regions = cluster(dir.path(), cut.clone()).await;
        lag_runs(&regions, &args).await;
        backlog(&regions, &cut, args.backlog).await;
    });
}
