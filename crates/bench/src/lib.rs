//! The load generator of concord: `concord-bench` drives a node, or a
//! cluster, over gRPC the way `redis-benchmark` drives Redis, so the two
//! can be measured side by side.
//!
//! A run is a [`Plan`]: `clients` concurrent clients, each with a
//! connection of its own, send one [`Op`] kind, one operation per request
//! or `batch` operations per request (one atomic round trip), on keys drawn
//! from a [`KeyDist`], as fast as they can or at a fixed total rate, for a
//! number of requests or a duration. [`run`] returns a [`Report`]: counts,
//! errors and the latency of every request in an HdrHistogram.
//!
//! At a fixed rate, request `n` is due at `start + n / rate` whoever sends
//! it, and its latency is counted from that moment, not from when it was
//! sent: a stalled server shows as the latency its clients would have seen
//! (no coordinated omission).
//!
//! Key draws are seeded ([`Plan::seed`], then the client's index), so two
//! runs with the same plan touch the same keys in the same order per
//! client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_client::{Client, ClientOptions, KeyspaceType};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::time::Instant;

/// Most concurrent clients of one run.
pub const MAX_CLIENTS: usize = 4096;
/// Most operations in one request (the node's default batch limit).
pub const MAX_BATCH: usize = 1024;
/// Most distinct keys a run draws from.
pub const MAX_KEYS: u64 = 1 << 32;
/// Most bytes of a register value or stream field written.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Longest latency the histogram holds; longer ones count as this.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

/// Everything that can stop a run before it starts.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The plan asks for something impossible or beyond a limit.
    #[error("invalid plan: {0}")]
    Plan(String),
    /// The node could not be reached, or refused to set the run up.
    #[error("cannot set up the run: {0}")]
    Setup(#[from] concord_client::Error),
}

/// The operation a run sends, each the counterpart of a Redis command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Counter increment by 1 (Redis `INCR`).
    Incr,
    /// Set add of one member (Redis `SADD`).
    Sadd,
    /// Register write (Redis `SET`).
    Set,
    /// Stream append of one field (Redis `XADD`).
    Xadd,
}

impl Op {
    /// Every operation, in the order reports list them.
    pub const ALL: [Op; 4] = [Op::Incr, Op::Sadd, Op::Set, Op::Xadd];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Incr => "incr",
            Op::Sadd => "sadd",
            Op::Set => "set",
            Op::Xadd => "xadd",
        }
    }

    /// The keyspace the run writes (created if missing).
    pub fn keyspace(self) -> &'static str {
        match self {
            Op::Incr => "bench-counter",
            Op::Sadd => "bench-set",
            Op::Set => "bench-register",
            Op::Xadd => "bench-stream",
        }
    }

    fn keyspace_type(self) -> KeyspaceType {
        match self {
            Op::Incr => KeyspaceType::Counter,
            Op::Sadd => KeyspaceType::Set,
            Op::Set => KeyspaceType::Register,
            Op::Xadd => KeyspaceType::Stream,
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Op, String> {
        Op::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| format!("unknown operation {s:?}: incr, sadd, set or xadd"))
    }
}

/// How keys (and set members) are drawn from `0..keys`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDist {
    /// Every key equally likely.
    Uniform,
    /// Key `k` with probability proportional to `1 / (k + 1)^s`: a few hot
    /// keys, a long cold tail.
    Zipf(f64),
}

impl std::str::FromStr for KeyDist {
    type Err = String;
    fn from_str(s: &str) -> Result<KeyDist, String> {
        if s == "uniform" {
            return Ok(KeyDist::Uniform);
        }
        let exponent = match s.strip_prefix("zipf") {
            Some("") => 0.99,
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|e| e.parse::<f64>().ok())
                .ok_or_else(|| format!("{s:?}: expected zipf or zipf:<exponent>"))?,
            None => {
                return Err(format!(
                    "unknown key distribution {s:?}: uniform, zipf or zipf:<exponent>"
                ))
            }
        };
        if !(exponent.is_finite() && exponent > 0.0) {
            return Err(format!("zipf exponent {exponent} must be above 0"));
        }
        Ok(KeyDist::Zipf(exponent))
    }
}

/// Draws key indexes in `0..keys`.
#[derive(Debug)]
pub struct Keys {
    rng: SmallRng,
    keys: u64,
    zipf: Option<Zipf<f64>>,
}

impl Keys {
    /// A seeded sampler over `0..keys` (`keys` ≥ 1).
    pub fn new(dist: KeyDist, keys: u64, seed: u64) -> Result<Keys, BenchError> {
        if keys == 0 || keys > MAX_KEYS {
            return Err(BenchError::Plan(format!(
                "keys must be 1 to {MAX_KEYS}, not {keys}"
            )));
        }
        let zipf = match dist {
            KeyDist::Uniform => None,
            KeyDist::Zipf(s) => Some(Zipf::new(keys as f64, s).map_err(|e| {
                BenchError::Plan(format!("zipf over {keys} keys with exponent {s}: {e}"))
            })?),
        };
        Ok(Keys {
            rng: SmallRng::seed_from_u64(seed),
            keys,
            zipf,
        })
    }

    /// The next key index.
    pub fn next_index(&mut self) -> u64 {
        match &self.zipf {
            // Zipf draws ranks 1..=keys.
            Some(z) => (z.sample(&mut self.rng) as u64).clamp(1, self.keys) - 1,
            None => self.rng.random_range(0..self.keys),
        }
    }
}

/// The fixed-rate schedule: request `n` (from 0) is due `n / rate`
/// seconds after the start.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    interval_ns: f64,
}

impl Pacer {
    /// A schedule of `rate` requests per second (finite, above 0).
    pub fn new(rate: f64) -> Result<Pacer, BenchError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(BenchError::Plan(format!("rate {rate} must be above 0")));
        }
        Ok(Pacer {
            interval_ns: 1e9 / rate,
        })
    }

    /// How long after the start request `n` is due.
    pub fn due(&self, n: u64) -> Duration {
        Duration::from_nanos((n as f64 * self.interval_ns) as u64)
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many requests in all.
    Requests(u64),
    /// After this long.
    After(Duration),
}

/// One run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Region endpoints; clients are spread over them round-robin.
    pub endpoints: Vec<String>,
    /// Concurrent clients, each with its own connection.
    pub clients: usize,
    /// The operation sent.
    pub op: Op,
    /// Operations per request: 1 sends unary calls, more sends batches.
    pub batch: usize,
    /// Distinct keys drawn from.
    pub keys: u64,
    /// Distinct set members drawn from (for `sadd`).
    pub members: u64,
    /// How keys and members are drawn.
    pub dist: KeyDist,
    /// Total requests per second over every client; none: as fast as
    /// they go.
    pub rate: Option<f64>,
    /// When the run stops.
    pub stop: Stop,
    /// Bytes of each register value or stream field value.
    pub value_bytes: usize,
    /// Seed of the key draws.
    pub seed: u64,
}

impl Plan {
    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Plan(m));
        if self.endpoints.is_empty() {
            return bad("no endpoint".into());
        }
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return bad(format!(
                "clients must be 1 to {MAX_CLIENTS}, not {}",
                self.clients
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return bad(format!(
                "batch must be 1 to {MAX_BATCH}, not {}",
                self.batch
            ));
        }
        if self.value_bytes > MAX_VALUE_BYTES {
            return bad(format!(
                "values of {} bytes are over the limit of {MAX_VALUE_BYTES}",
                self.value_bytes
            ));
        }
        match self.stop {
            Stop::Requests(0) => return bad("a run needs at least one request".into()),
            Stop::After(d) if d.is_zero() => return bad("a run needs a duration".into()),
            _ => {}
        }
        if let Some(rate) = self.rate {
            Pacer::new(rate)?;
        }
        Keys::new(self.dist, self.keys, self.seed)?;
        Keys::new(self.dist, self.members, self.seed)?;
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Requests answered successfully.
    pub requests: u64,
    /// Operations they carried.
    pub ops: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Latency of every successful request, in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Report {
    /// Successful operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile (0.5, 0.99...) in milliseconds.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Counts a run shares with whoever shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful operations so far.
    pub ops: AtomicU64,
    /// Failed requests so far.
    pub errors: AtomicU64,
}

/// The key of index `i`, as `redis-benchmark` names its random keys.
pub fn key_name(i: u64) -> String {
    format!("key:{i:012}")
}

/// The set member of index `i`, as `redis-benchmark` names its members.
pub fn member_name(i: u64) -> String {
    format!("element:{i:012}")
}

fn histogram() -> Histogram<u64> {
    // Three significant digits from 1 µs to MAX_LATENCY: fixed bounds, so
    // the histogram never grows while the run goes on.
    Histogram::new_with_bounds(1, MAX_LATENCY.as_micros() as u64, 3)
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// Runs `plan`: creates its keyspace, connects every client, and sends
/// until it stops; `progress` is updated as it goes.
pub async fn run(plan: &Plan, progress: Arc<Progress>) -> Result<Report, BenchError> {
    plan.validate()?;
    let options = ClientOptions {
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let setup = Client::connect_with(plan.endpoints.clone(), options.clone()).await?;
    setup
        .create_keyspace(plan.op.keyspace(), plan.op.keyspace_type())
        .await?;
    let mut clients = Vec::with_capacity(plan.clients);
    for i in 0..plan.clients {
        // Each client on its own connection, to one endpoint, the others
        // behind it for failover.
        let n = plan.endpoints.len();
        let order: Vec<String> = (0..n)
            .map(|j| plan.endpoints[(i + j) % n].clone())
            .collect();
        clients.push(Client::connect_with(order, options.clone()).await?);
    }

    let value = "v".repeat(plan.value_bytes);
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        pacer: plan.rate.map(Pacer::new).transpose()?,
        first_error: Mutex::new(None),
        progress,
    });
    let start = Instant::now();
    let deadline = match plan.stop {
        Stop::After(d) => Some(start + d),
        Stop::Requests(_) => None,
    };
    let limit = match plan.stop {
        Stop::Requests(n) => n,
        Stop::After(_) => u64::MAX,
    };
    let mut tasks = Vec::with_capacity(plan.clients);
    for (i, client) in clients.into_iter().enumerate() {
        let worker = Worker {
            client,
            op: plan.op,
            batch: plan.batch,
            keys: Keys::new(plan.dist, plan.keys, plan.seed.wrapping_add(i as u64))?,
            members: Keys::new(
                plan.dist,
                plan.members,
                plan.seed.wrapping_add(i as u64).wrapping_add(1 << 32),
            )?,
            value: value.clone(),
            shared: shared.clone(),
            start,
            deadline,
            limit,
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    let mut report = Report {
        requests: 0,
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency_us: histogram(),
    };
    for task in tasks {
        let done = task
            .await
            .map_err(|e| BenchError::Plan(format!("a client failed: {e}")))?;
        report.requests += done.requests;
        report.errors += done.errors;
        report
            .latency_us
            .add(&done.latency_us)
            .map_err(|e| BenchError::Plan(format!("merging latencies: {e}")))?;
    }
    report.elapsed = start.elapsed();
    report.ops = report.requests * plan.batch as u64;
    report.first_error = shared
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    Ok(report)
}

struct Shared {
    /// The next request number, over every client.
    next: AtomicU64,
    pacer: Option<Pacer>,
    first_error: Mutex<Option<String>>,
    progress: Arc<Progress>,
}

struct Worker {
    client: Client,
    op: Op,
    batch: usize,
    keys: Keys,
    members: Keys,
    value: String,
    shared: Arc<Shared>,
    start: Instant,
    deadline: Option<Instant>,
    limit: u64,
}

struct Done {
    requests: u64,
    errors: u64,
    latency_us: Histogram<u64>,
}

impl Worker {
    async fn run(mut self) -> Done {
        let mut done = Done {
            requests: 0,
            errors: 0,
            latency_us: histogram(),
        };
        loop {
            let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
            if n >= self.limit {
                break;
            }
            let sent = match self.shared.pacer {
                Some(p) => {
                    let due = self.start + p.due(n);
                    tokio::time::sleep_until(due).await;
                    due
                }
                None => Instant::now(),
            };
            if self.deadline.is_some_and(|d| sent >= d) {
                break;
            }
            match self.request().await {
                Ok(()) => {
                    done.requests += 1;
                    let us = sent.elapsed().as_micros().min(u64::MAX as u128) as u64;
                    done.latency_us.saturating_record(us.max(1));
                    self.shared
                        .progress
                        .ops
                        .fetch_add(self.batch as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    done.errors += 1;
                    self.shared.progress.errors.fetch_add(1, Ordering::Relaxed);
                    let mut first = self
                        .shared
                        .first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
        done
    }

    async fn request(&mut self) -> Result<(), concord_client::Error> {
        let ks = self.op.keyspace();
        if self.batch == 1 {
            let key = key_name(self.keys.next_index());
            return match self.op {
                Op::Incr => self.client.counter(ks).incr(&key, 1).await.map(drop),
                Op::Sadd => {
                    let member = member_name(self.members.next_index());
                    self.client.set(ks).add(&key, [member]).await.map(drop)
                }
                Op::Set => self
                    .client
                    .register(ks)
                    .set(&key, &self.value)
                    .await
                    .map(drop),
                Op::Xadd => self
                    .client
                    .stream(ks)
                    .append(&key, [("field", self.value.as_str())])
                    .await
                    .map(drop),
            };
        }
        let mut batch = self.client.batch();
        for _ in 0..self.batch {
            let key = key_name(self.keys.next_index());
            batch = match self.op {
                Op::Incr => batch.counter_incr(ks, &key, 1),
                Op::Sadd => {
                    let member = member_name(self.members.next_index());
                    batch.set_add(ks, &key, [member])
                }
                Op::Set => batch.register_set(ks, &key, &self.value),
                Op::Xadd => batch.stream_append(ks, &key, [("field", self.value.as_str())]),
            };
        }
        batch.run().await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spreads_requests_evenly() {
        let p = Pacer::new(4000.0).expect("rate");
        assert_eq!(p.due(0), Duration::ZERO);
        assert_eq!(p.due(1), Duration::from_micros(250));
        assert_eq!(p.due(4000), Duration::from_secs(1));
        assert!(Pacer::new(0.0).is_err());
        assert!(Pacer::new(f64::NAN).is_err());
    }

    #[test]
    fn uniform_keys_cover_the_range_and_repeat_with_the_seed() {
        let mut a = Keys::new(KeyDist::Uniform, 10, 7).expect("keys");
        let mut b = Keys::new(KeyDist::Uniform, 10, 7).expect("keys");
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let k = a.next_index();
            assert_eq!(k, b.next_index());
            seen[k as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn zipf_keys_favour_the_first_ones() {
        let mut keys = Keys::new(KeyDist::Zipf(1.0), 1000, 3).expect("keys");
        let mut seen = vec![0u32; 1000];
        for _ in 0..100_000 {
            seen[keys.next_index() as usize] += 1;
        }
        // With s = 1, key 0 is drawn about twice as often as key 1 and
        // ten times as often as key 9.
        assert!(seen[0] > seen[1] && seen[1] > seen[9], "{:?}", &seen[..10]);
        let ratio = f64::from(seen[0]) / f64::from(seen[9]);
        assert!((7.0..13.0).contains(&ratio), "{ratio}");
        assert!(seen[500..].iter().any(|&n| n > 0), "the tail is drawn too");
    }

    #[test]
    fn distributions_parse_and_bad_ones_are_refused() {
        assert_eq!("uniform".parse::<KeyDist>(), Ok(KeyDist::Uniform));
        assert_eq!("zipf".parse::<KeyDist>(), Ok(KeyDist::Zipf(0.99)));
        assert_eq!("zipf:1.2".parse::<KeyDist>(), Ok(KeyDist::Zipf(1.2)));
        for bad in ["zipf:0", "zipf:-1", "zipf:x", "zipfy", "normal"] {
            assert!(bad.parse::<KeyDist>().is_err(), "{bad}");
        }
        assert_eq!("xadd".parse::<Op>(), Ok(Op::Xadd));
        assert!("del".parse::<Op>().is_err());
    }

    #[test]
    fn plans_beyond_a_limit_are_refused() {
        let good = Plan {
            endpoints: vec!["http://127.0.0.1:1".into()],
            clients: 50,
            op: Op::Incr,
            batch: 16,
            keys: 100_000,
            members: 100_000,
            dist: KeyDist::Uniform,
            rate: None,
            stop: Stop::Requests(1000),
            value_bytes: 3,
            seed: 1,
        };
        assert!(good.validate().is_ok());
        type Change = Box<dyn Fn(&mut Plan)>;
        let cases: Vec<Change> = vec![
            Box::new(|p| p.endpoints.clear()),
            Box::new(|p| p.clients = 0),
            Box::new(|p| p.clients = MAX_CLIENTS + 1),
            Box::new(|p| p.batch = 0),
            Box::new(|p| p.batch = MAX_BATCH + 1),
            Box::new(|p| p.keys = 0),
            Box::new(|p| p.members = MAX_KEYS + 1),
            Box::new(|p| p.value_bytes = MAX_VALUE_BYTES + 1),
            Box::new(|p| p.stop = Stop::Requests(0)),
            Box::new(|p| p.stop = Stop::After(Duration::ZERO)),
            Box::new(|p| p.rate = Some(-5.0)),
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut p = good.clone();
            change(&mut p);
            assert!(
                matches!(p.validate(), Err(BenchError::Plan(_))),
                "case {i} passed"
            );
        }
    }
}
