//! Persisted write throughput of the store, side by side with raw sled.
//!
//! Every operation increments one counter key, picked round-robin from
//! 1,000 keys. The store commits the value, the log entry and the version
//! vector entry in one multi-tree transaction; the peer, raw sled, applies a
//! batch of the same bytes (the same value record, an encoded delta of the
//! same size under a log key, a vector entry) to one tree with
//! `apply_batch`. Both run as tokio tasks on a two-worker runtime, with 1
//! and 64 concurrent writers:
//!
//! - `store-group` waits for `Store::durable` (group commit) and is
//!   compared with `sled-flush`, which flushes after each batch (sled's
//!   `flush` on tokio's blocking pool): both acknowledge only durable
//!   writes;
//! - `store-relaxed` and `sled` acknowledge before any flush.
//!
//! Run with `cargo bench -p concord-store --bench write_throughput`; the
//! numbers and ratios are kept in docs/BENCHMARKS.md.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_core::clock::SystemTime;
use concord_core::crdt::CounterCommand;
use concord_core::{Clock, Command, CrdtType, Hlc, KeyspaceId, ReplicaId};
use concord_store::{layout, Durability, Identity, Item, Store, StoreOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const KEYS: u64 = 1_000;
const ME: ReplicaId = ReplicaId(1);

fn hits() -> KeyspaceId {
    KeyspaceId {
        name: "hits".into(),
        ty: CrdtType::Counter,
    }
}

fn key(i: u64) -> String {
    format!("key-{}", i % KEYS)
}

/// What is being measured.
enum Target {
    Store {
        store: Box<Store>,
        clock: Clock,
    },
    Sled {
        db: sled::Db,
        tree: sled::Tree,
        flush: bool,
        bytes: Bytes,
    },
}

/// The bytes one store write persists, measured on a scratch store.
#[derive(Clone)]
struct Bytes {
    value: Vec<u8>,
    delta: Vec<u8>,
}

fn open_store(dir: &std::path::Path, durability: Durability) -> (Store, Clock) {
    let store = Store::open(
        dir,
        Identity {
            region: "bench".into(),
            replica: ME,
        },
        StoreOptions {
            durability,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    let clock = Clock::new(SystemTime, 0, Hlc::ZERO).expect("clock");
    store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    (store, clock)
}

fn measure_bytes() -> Bytes {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, clock) = open_store(dir.path(), Durability::Relaxed);
    for i in 0..3 {
        write_once(&store, &clock, i);
    }
    let value = store.get(&hits(), &key(0)).expect("get").encode();
    let seq = store.version_vector().expect("vv").get(ME);
    let delta = store.log_from(ME, seq, 1, usize::MAX).expect("log")[0].encode();
    Bytes { value, delta }
}

fn write_once(store: &Store, clock: &Clock, i: u64) -> concord_store::WriteReceipt {
    store
        .write(
            clock,
            &[Item {
                keyspace: hits(),
                key: key(i),
                command: Command::Counter(CounterCommand::Add(1)),
            }],
        )
        .expect("write")
}

impl Target {
    async fn op(&self, i: u64, seq: &AtomicU64) {
        match self {
            Target::Store { store, clock } => {
                let receipt = write_once(store, clock, i);
                store.durable(&receipt).await.expect("durable");
            }
            Target::Sled {
                db,
                tree,
                flush,
                bytes,
            } => {
                let seq = seq.fetch_add(1, Ordering::Relaxed) + 1;
                let mut batch = sled::Batch::default();
                batch.insert(layout::value_key(&hits(), &key(i)), bytes.value.clone());
                batch.insert(&layout::log_key(ME, seq), bytes.delta.clone());
                batch.insert(&layout::replica_key(ME), &seq.to_be_bytes());
                tree.apply_batch(batch).expect("apply_batch");
                if *flush {
                    // Not `flush_async`: with many in flight it deadlocks in
                    // sled 0.34 (spacejam/sled#1308); measured here, it did.
                    let db = db.clone();
                    tokio::task::spawn_blocking(move || db.flush())
                        .await
                        .expect("flush task")
                        .expect("flush");
                }
            }
        }
    }
}

/// Runs `ops` operations spread over `writers` concurrent tasks; returns
/// the wall time.
fn run(
    rt: &tokio::runtime::Runtime,
    target: &Arc<Target>,
    seq: &Arc<AtomicU64>,
    writers: u64,
    ops: u64,
) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let n = ops / writers + u64::from(w < ops % writers);
            let (target, seq) = (target.clone(), seq.clone());
            tasks.push(tokio::spawn(async move {
                for j in 0..n {
                    target.op(w * 7_919 + j, &seq).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bytes = measure_bytes();
    let mut group = c.benchmark_group("write");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    let targets = [
        ("store-group", Some(Durability::Group)),
        ("sled-flush", None),
        ("store-relaxed", Some(Durability::Relaxed)),
        ("sled", None),
    ];
    for writers in [1u64, 64] {
        for (name, durability) in targets {
            let dir = tempfile::tempdir().expect("tempdir");
            let target = Arc::new(match durability {
                Some(durability) => {
                    let (store, clock) = open_store(dir.path(), durability);
                    Target::Store {
                        store: Box::new(store),
                        clock,
                    }
                }
                None => raw(dir.path(), name == "sled-flush", bytes.clone()),
            });
            let seq = Arc::new(AtomicU64::new(0));
            group.bench_with_input(BenchmarkId::new(name, writers), &writers, |b, &w| {
                b.iter_custom(|iters| run(&rt, &target, &seq, w, iters))
            });
        }
    }
    group.finish();
}

fn raw(dir: &std::path::Path, flush: bool, bytes: Bytes) -> Target {
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(Some(500))
        .cache_capacity(256 << 20)
        .open()
        .expect("sled");
    let tree = db.open_tree("data").expect("tree");
    Target::Sled {
        db,
        tree,
        flush,
        bytes,
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
