//! Crash test: a real process writes in `group` mode from several tasks
//! and is killed with SIGKILL at random moments, again and again, on the
//! same data directory. sled's background flush is set so far apart that
//! acknowledged writes survive through the journal's replay. After every kill the directory must open, every
//! write acknowledged to the writer (its `durable` returned) must be there,
//! and the log must agree with the values and the version vector: the log
//! is contiguous from seq 1 to the vector's entry, and replaying it from
//! nothing gives exactly the stored catalog and values.
//!
//! `CONCORD_CRASH_KILLS` sets the number of kills (default 50) and
//! `CONCORD_CRASH_SEED` the seed of the kill moments and the writes; the
//! seed is printed so a failure can be replayed.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use concord_core::Stamp;
use concord_core::{Catalog, Hlc, Op, ReplicaId, Value};
use concord_store::{Item, Store, StoreOptions};

const ME: ReplicaId = ReplicaId(1);
const CHILD_DIR: &str = "CONCORD_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "CONCORD_CRASH_CHILD_SEED";
const WRITERS: u64 = 8;

/// One acknowledged write, as the child reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    seq: u64,
    hlc: u64,
    keyspace: String,
    key: String,
}

/// The writer process. Ignored in normal runs; the crash test starts it
/// as a child with the data directory in `CONCORD_CRASH_CHILD_DIR`.
#[test]
#[ignore = "the crash test runs this in a child process"]
fn crash_child() {
    let dir = std::env::var(CHILD_DIR).expect("the crash test sets the data directory");
    let seed: u64 = std::env::var(CHILD_SEED)
        .expect("seed")
        .parse()
        .expect("seed");
    // sled's own background flush is all but off, so what survives a kill
    // survives through the journal; and the journal's segments are small
    // now and then, so kills also land on checkpoints.
    let mut rng = fastrand::Rng::with_seed(seed);
    let options = StoreOptions {
        flush_every_ms: 600_000,
        journal_segment_bytes: if rng.bool() {
            rng.u64(4096..64 << 10)
        } else {
            StoreOptions::default().journal_segment_bytes
        },
        ..StoreOptions::default()
    };
    let store = Arc::new(open_as(std::path::Path::new(&dir), 1, options));
    let clock = Arc::new(
        concord_core::Clock::new(
            concord_core::clock::SystemTime,
            0,
            store.hlc_high_water().expect("hlc"),
        )
        .expect("clock"),
    );
    declare_all(&store, &clock);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, clock) = (store.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000).wrapping_add(w));
                loop {
                    // Mostly single writes, sometimes an atomic batch.
                    let n = if rng.u8(0..4) == 0 {
                        rng.usize(2..5)
                    } else {
                        1
                    };
                    let items: Vec<Item> = (0..n).map(|_| random_write(&mut rng, &store)).collect();
                    let receipt = store.write(&clock, &items).expect("write");
                    store.durable(&receipt).await.expect("durable");
                    let mut out = std::io::stdout().lock();
                    for (item, result) in items.iter().zip(&receipt.results) {
                        let Item { keyspace, key, .. } = item;
                        if let Some(Stamp { seq, hlc }) = result.write {
                            if seq > 0 {
                                writeln!(out, "ACK {seq} {} {} {key}", hlc.as_u64(), keyspace.name)
                                    .expect("stdout");
                            }
                        }
                    }
                    out.flush().expect("stdout");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ACK ")?.splitn(4, ' ');
    Some(Ack {
        seq: parts.next()?.parse().ok()?,
        hlc: parts.next()?.parse().ok()?,
        keyspace: parts.next()?.to_string(),
        key: parts.next()?.to_string(),
    })
}

/// When to kill the writer.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after it was started: possibly while it opens the store.
    AfterStart(Duration),
    /// This long after its first acknowledged write.
    AfterFirstAck(Duration),
}

/// Most time a writer may take to acknowledge its first write.
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the writer until it is killed; returns the acks it printed (a line
/// cut by the kill is dropped: it was never acknowledged whole).
fn run_child(dir: &std::path::Path, seed: u64, kill_at: KillAt) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DIR, dir)
        .env(CHILD_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer");
    let stdout = child.stdout.take().expect("stdout");
    let (first_ack, got_first_ack) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line.ends_with('\n') {
                if let Some(ack) = parse_ack(line.trim_end()) {
                    if acks.is_empty() {
                        let _ = first_ack.send(());
                    }
                    acks.push(ack);
                }
            }
            line.clear();
        }
        acks
    });
    match kill_at {
        KillAt::AfterStart(after) => std::thread::sleep(after),
        KillAt::AfterFirstAck(after) => {
            let started = got_first_ack.recv_timeout(FIRST_ACK_TIMEOUT);
            if started.is_err() {
                let _ = child.kill();
                panic!("the writer acknowledged nothing within {FIRST_ACK_TIMEOUT:?}");
            }
            std::thread::sleep(after);
        }
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the writer stopped by itself: {status}");
    reader.join().expect("reader")
}

/// Checks the directory after a kill against every ack so far.
fn check(store: &Store, acks: &BTreeMap<u64, Ack>, round: usize) {
    let vv = store.version_vector().expect("vv");
    let last = vv.get(ME);
    let log = store.log_from(ME, 1, usize::MAX, usize::MAX).expect("log");
    let seqs: Vec<u64> = log.iter().map(|d| d.seq).collect();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "round {round}: log is not 1..={last}"
    );

    for ack in acks.values() {
        let d = log.get((ack.seq - 1) as usize).unwrap_or_else(|| {
            panic!("round {round}: acknowledged {ack:?} lost (log ends at {last})")
        });
        assert_eq!(
            (d.hlc.as_u64(), d.keyspace.as_str(), d.key.as_str()),
            (ack.hlc, ack.keyspace.as_str(), ack.key.as_str()),
            "round {round}: log entry {} differs from its ack",
            ack.seq
        );
    }

    // Replay the log from nothing: it must give exactly what is stored.
    let mut catalog = Catalog::new();
    let mut values: BTreeMap<(String, concord_core::CrdtType, String), Value> = BTreeMap::new();
    let mut max_hlc = Hlc::ZERO;
    for d in &log {
        max_hlc = max_hlc.max(d.hlc);
        match &d.op {
            Op::Declare(ty) => catalog.declare(&d.keyspace, *ty, d.marker()),
            op => {
                let ty = op.crdt_type().expect("value op");
                values
                    .entry((d.keyspace.clone(), ty, d.key.clone()))
                    .or_insert_with(|| Value::empty(ty))
                    .apply(d.origin, d.hlc, op)
                    .expect("replay");
            }
        }
    }
    let stored = dump(store);
    let replayed: Vec<_> = catalog
        .declarations()
        .map(|(n, t, m)| (n.to_string(), t, m))
        .collect();
    assert_eq!(stored.declarations, replayed, "round {round}: catalog");
    // Which keys differ, with their newest operations: the whole dump
    // below is long.
    for (key, value) in &values {
        if stored.values.get(key) != Some(value) {
            let newest: Vec<_> = log
                .iter()
                .rev()
                .filter(|d| d.keyspace == key.0 && d.key == key.2)
                .take(3)
                .map(|d| (d.seq, d.op.clone()))
                .collect();
            eprintln!(
                "round {round}: {key:?} differs; vector at {last}, newest operations {newest:?}"
            );
        }
    }
    assert_eq!(
        stored.values, values,
        "round {round}: values differ from the log"
    );
    assert!(
        store.hlc_high_water().expect("hlc") >= max_hlc,
        "round {round}: HLC high-water mark below the log"
    );
}

#[test]
fn every_acknowledged_write_survives_repeated_kill_9() {
    let kills: usize = std::env::var("CONCORD_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("CONCORD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash test: {kills} kills, CONCORD_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acks: BTreeMap<u64, Ack> = BTreeMap::new();
    for round in 0..kills {
        // Now and then a kill while the writer may still be opening the
        // store; otherwise at a random moment of its writing.
        let kill_at = if rng.u8(0..8) == 0 {
            KillAt::AfterStart(Duration::from_millis(rng.u64(0..100)))
        } else {
            KillAt::AfterFirstAck(Duration::from_millis(rng.u64(0..100)))
        };
        for ack in run_child(dir.path(), rng.u64(..), kill_at) {
            if let Some(old) = acks.insert(ack.seq, ack.clone()) {
                panic!(
                    "round {round}: seq {} acknowledged twice: {old:?} and {ack:?}",
                    ack.seq
                );
            }
        }
        let store = open_as(dir.path(), 1, StoreOptions::default());
        check(&store, &acks, round);
    }
    assert!(
        acks.len() > kills,
        "the writer acknowledged only {} writes",
        acks.len()
    );
    eprintln!(
        "crash test: {} acknowledged writes checked after {kills} kills",
        acks.len()
    );
}
