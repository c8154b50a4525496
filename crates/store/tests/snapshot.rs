//! Snapshot export and import: a region rebuilt from another's snapshot
//! holds the same state; a snapshot taken while writes go on, followed by
//! the logs from the vector it covers, converges; an import merges with the
//! importer's own data; a crash mid-import leaves the vector untouched; bad
//! chunks are refused whole.

mod common;

use common::*;
use concord_core::crdt::CounterCommand;
use concord_core::crdt::{CounterOp, Direction, Field, StreamId};
use concord_core::{Clock, Command, CrdtType, Delta, Hlc, Op, ReplicaId, Value, VersionVector};
use concord_store::{SnapshotChunk, SnapshotValue, Store, StoreError, StoreOptions};

const ME: ReplicaId = ReplicaId(1);
const PEER: ReplicaId = ReplicaId(2);

/// Every chunk of a full export, in order, and the vector it covers.
fn export(store: &Store, max_bytes: usize) -> (VersionVector, Vec<SnapshotChunk>) {
    let mut cursor = store.export_snapshot().expect("export");
    let mut chunks = Vec::new();
    while let Some(chunk) = store.export_chunk(&mut cursor, max_bytes).expect("chunk") {
        chunks.push(chunk);
    }
    assert!(cursor.is_done());
    (cursor.covers().clone(), chunks)
}

fn import(store: &Store, covers: &VersionVector, chunks: &[SnapshotChunk], clock: &Clock) {
    for chunk in chunks {
        store.import_chunk(chunk).expect("import");
    }
    store.finish_import(covers, clock.last()).expect("finish");
}

/// A source region with data of every type, a trimmed stream, a peer's
/// deltas and a conflicting declaration of one name.
fn populated(dir: &std::path::Path, clock: &Clock, rng: &mut fastrand::Rng) -> Store {
    let store = open_as(dir, 1, StoreOptions::default());
    declare_all(&store, clock);
    for _ in 0..200 {
        let item = random_write(rng, &store);
        store.write(clock, &[item]).expect("write");
    }
    let peer = [
        Delta {
            origin: PEER,
            seq: 1,
            hlc: clock.now().expect("now"),
            keyspace: "hits".into(),
            key: "from-peer".into(),
            op: Op::Counter(CounterOp {
                direction: Direction::Decrement,
                total: 7,
            }),
        },
        Delta {
            origin: PEER,
            seq: 2,
            hlc: clock.now().expect("now"),
            keyspace: "hits".into(),
            key: String::new(),
            op: Op::Declare(CrdtType::Set),
        },
    ];
    store.apply_remote(&peer, clock.last()).expect("apply");
    store
}

#[test]
fn a_region_rebuilt_from_a_snapshot_holds_the_same_state_and_then_tails() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (time, clock) = manual_clock();
    let mut rng = fastrand::Rng::with_seed(7);
    let a = populated(a_dir.path(), &clock, &mut rng);
    let b = open_as(b_dir.path(), 3, StoreOptions::default());

    let (covers, chunks) = export(&a, 48);
    assert_eq!(covers, a.version_vector().expect("vv"));
    assert!(chunks.len() > 3, "small chunks: {}", chunks.len());
    import(&b, &covers, &chunks, &clock);
    assert_eq!(dump(&b), dump(&a));
    assert_eq!(b.catalog().expect("catalog").conflict_count(), 1);
    // The importer has none of the logs the snapshot stands for.
    assert!(matches!(
        b.log_from(ME, 1, 10, 1 << 20),
        Err(StoreError::Truncated { .. })
    ));

    // Later writes at the source arrive through the logs as usual.
    time.advance(10);
    for _ in 0..50 {
        let item = random_write(&mut rng, &a);
        a.write(&clock, &[item]).expect("write");
    }
    tail(&a, &b, &clock);
    assert_eq!(dump(&b), dump(&a));
}

#[test]
fn a_snapshot_taken_while_writes_go_on_converges_once_the_logs_are_tailed() {
    for seed in 0..6 {
        let (a_dir, b_dir) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (time, clock) = manual_clock();
        let mut rng = fastrand::Rng::with_seed(seed);
        let a = populated(a_dir.path(), &clock, &mut rng);
        let b = open_as(b_dir.path(), 3, StoreOptions::default());

        let mut cursor = a.export_snapshot().expect("export");
        let covers = cursor.covers().clone();
        loop {
            // Writes of every kind, trims included, between the chunks.
            for _ in 0..rng.usize(0..8) {
                time.advance(1);
                let item = random_write(&mut rng, &a);
                a.write(&clock, &[item]).expect("write");
            }
            match a.export_chunk(&mut cursor, 128).expect("chunk") {
                Some(chunk) => {
                    b.import_chunk(&chunk).expect("import");
                }
                None => break,
            }
        }
        b.finish_import(&covers, clock.last()).expect("finish");
        tail(&a, &b, &clock);
        assert_eq!(dump(&b), dump(&a), "seed {seed}");
    }
}

#[test]
fn an_import_merges_with_the_importers_own_data() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (_, clock) = manual_clock();
    let mut rng = fastrand::Rng::with_seed(11);
    let a = populated(a_dir.path(), &clock, &mut rng);
    let b = open_as(b_dir.path(), 3, StoreOptions::default());
    declare_all(&b, &clock);
    for _ in 0..100 {
        let item = random_write(&mut rng, &b);
        b.write(&clock, &[item]).expect("write");
    }
    // The expected result: each key's two states merged.
    let (da, db) = (dump(&a), dump(&b));
    let mut expected = db.values.clone();
    for (k, v) in &da.values {
        match expected.get_mut(k) {
            Some(mine) => mine.merge(v).expect("merge"),
            None => {
                expected.insert(k.clone(), v.clone());
            }
        }
    }
    let (covers, chunks) = export(&a, 512);
    import(&b, &covers, &chunks, &clock);
    let after = dump(&b);
    assert_eq!(after.values, expected);
    let mut vv = db.vv.clone();
    vv.merge(&da.vv);
    assert_eq!(after.vv, vv);
    // The importer's own log is untouched: it still serves it.
    let own = b
        .log_from(ReplicaId(3), 1, 1_000, usize::MAX)
        .expect("own log");
    assert_eq!(own.len() as u64, db.vv.get(ReplicaId(3)));
}

#[test]
fn a_crash_during_an_import_leaves_the_vector_untouched_and_a_new_import_completes() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (_, clock) = manual_clock();
    let mut rng = fastrand::Rng::with_seed(3);
    let a = populated(a_dir.path(), &clock, &mut rng);
    let (covers, chunks) = export(&a, 200);
    {
        let b = open_as(b_dir.path(), 3, StoreOptions::default());
        for chunk in &chunks[..chunks.len() / 2] {
            b.import_chunk(chunk).expect("import");
        }
        // Dropped before finish_import, as a crash would.
    }
    let b = open_as(b_dir.path(), 3, StoreOptions::default());
    assert!(b.version_vector().expect("vv").is_empty());
    let (covers2, chunks2) = export(&a, 4096);
    assert_eq!(covers2, covers);
    import(&b, &covers2, &chunks2, &clock);
    assert_eq!(dump(&b), dump(&a));
}

#[test]
fn a_snapshot_holding_this_regions_lost_writes_moves_its_seq_past_them() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (time, clock) = manual_clock();
    // Region 1 wrote, then lost its disk: its replacement starts empty and
    // recovers from a copy (here, the old directory's own snapshot).
    let old = open_as(a_dir.path(), 1, StoreOptions::default());
    declare_all(&old, &clock);
    for i in 0..5 {
        old.write(
            &clock,
            &[write("k", Command::Counter(CounterCommand::Add(i)))],
        )
        .expect("write");
    }
    let (covers, chunks) = export(&old, 1 << 20);
    let fresh = open_as(b_dir.path(), 1, StoreOptions::default());
    import(&fresh, &covers, &chunks, &clock);
    time.advance(5);
    let receipt = fresh
        .write(
            &clock,
            &[write("k", Command::Counter(CounterCommand::Add(100)))],
        )
        .expect("write");
    let outcome = &receipt.results[0];
    assert_eq!(
        outcome.write.map(|w| w.seq),
        Some(covers.get(ME) + 1),
        "no seq is reused"
    );
    assert_eq!(outcome.reply, concord_core::Reply::Counter(110));
}

#[test]
fn bad_chunks_are_refused_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, clock) = manual_clock();
    let b = open_as(dir.path(), 3, StoreOptions::default());
    let good = SnapshotValue {
        keyspace: ks("hits", CrdtType::Counter),
        key: "k".into(),
        value: Value::empty(CrdtType::Counter),
    };
    let bad_values = [
        // A set's state under a counter keyspace.
        SnapshotValue {
            value: Value::empty(CrdtType::Set),
            ..good.clone()
        },
        SnapshotValue {
            keyspace: ks("no spaces", CrdtType::Counter),
            ..good.clone()
        },
        SnapshotValue {
            key: String::new(),
            ..good.clone()
        },
        SnapshotValue {
            key: "k".repeat(10_000),
            ..good.clone()
        },
        SnapshotValue {
            keyspace: ks("events", CrdtType::Stream),
            key: "s".into(),
            value: Value::Stream(concord_core::crdt::Stream::from_parts(
                StreamId::MIN,
                [(
                    StreamId::new(Hlc::from_u64(1 << 30), PEER),
                    vec![Field::new("", "no name")],
                )],
            )),
        },
    ];
    for bad in bad_values {
        let chunk = SnapshotChunk {
            declarations: Vec::new(),
            values: vec![good.clone(), bad.clone()],
        };
        let err = b.import_chunk(&chunk).expect_err("bad chunk");
        assert!(err.is_invalid_input(), "{bad:?}: {err}");
    }
    let before = dump(&b);
    assert!(before.values.is_empty() && before.declarations.is_empty());
    // Nothing of the good values went in either.
    b.declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    assert!(b
        .scan(&ks("hits", CrdtType::Counter), None, 10)
        .expect("scan")
        .is_empty());
}

/// The catalog is kept in memory: every way a declaration arrives (a
/// local declaration, a peer's delta, a snapshot) shows in the next read,
/// after a read that cached the catalog before it.
#[test]
fn the_catalog_in_memory_follows_every_declaration() {
    let (a_dir, b_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (_, clock) = manual_clock();
    let a = open_as(a_dir.path(), 1, StoreOptions::default());
    let b = open_as(b_dir.path(), 2, StoreOptions::default());
    let names = |store: &Store| -> Vec<String> {
        let catalog = store.catalog().expect("catalog");
        catalog.list().iter().map(|v| v.name.clone()).collect()
    };
    assert!(names(&b).is_empty());
    b.declare(&clock, "local", CrdtType::Counter)
        .expect("declare");
    assert_eq!(names(&b), ["local"]);
    let remote = Delta {
        origin: ReplicaId(3),
        seq: 1,
        hlc: clock.now().expect("clock"),
        keyspace: "remote".into(),
        key: String::new(),
        op: Op::Declare(CrdtType::Set),
    };
    b.apply_remote(&[remote], clock.last()).expect("apply");
    assert_eq!(names(&b), ["local", "remote"]);
    a.declare(&clock, "snapshotted", CrdtType::Stream)
        .expect("declare");
    let (covers, chunks) = export(&a, 1 << 20);
    import(&b, &covers, &chunks, &clock);
    assert_eq!(names(&b), ["local", "remote", "snapshotted"]);
    drop(b);
    let b = open_as(b_dir.path(), 2, StoreOptions::default());
    assert_eq!(names(&b), ["local", "remote", "snapshotted"]);
}
