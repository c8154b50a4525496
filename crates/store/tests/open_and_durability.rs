//! Opening data directories (refusing the wrong ones) and group commit.

mod common;

use std::sync::Arc;

use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
use concord_core::crdt::{CounterCommand, SetCommand};
use concord_core::{Clock, Command, CrdtType, Hlc, KeyspaceId, ReplicaId, Value};
use concord_store::{Durability, Identity, Item, Store, StoreError, StoreOptions};

fn identity(region: &str, replica: u32) -> Identity {
    Identity {
        region: region.into(),
        replica: ReplicaId(replica),
    }
}

fn clock() -> Clock {
    Clock::new(
        Arc::new(ManualTime::new(HLC_EPOCH_UNIX_MS + 1_000)),
        0,
        Hlc::ZERO,
    )
    .expect("clock")
}

fn counter() -> KeyspaceId {
    KeyspaceId {
        name: "hits".into(),
        ty: CrdtType::Counter,
    }
}

fn incr(store: &Store, clock: &Clock) -> concord_store::WriteReceipt {
    incr_result(store, clock, "k").expect("write")
}

/// Writes one record straight into a data directory, as a bug, an old
/// build or a disk fault might.
fn tamper(path: &std::path::Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = common::open_sled(path);
    db.open_tree(tree)
        .expect("tree")
        .insert(key, value)
        .expect("insert");
    db.flush().expect("flush");
}

#[test]
fn a_directory_of_another_region_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    {
        let store =
            Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
        store
            .declare(&clock, "hits", CrdtType::Counter)
            .expect("declare");
        incr(&store, &clock);
        store.flush().expect("flush");
    }
    for wrong in [identity("west", 1), identity("east", 2)] {
        let err = Store::open(dir.path(), wrong, StoreOptions::default()).expect_err("refused");
        assert!(matches!(err, StoreError::WrongRegion { .. }), "{err}");
        assert!(
            err.to_string().contains("belongs to region \"east\""),
            "{err}"
        );
    }
    // Nothing was overwritten: the right region still reads its data.
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("reopen");
    match store.get(&counter(), "k").expect("get") {
        Value::Counter(c) => assert_eq!(c.value(), 1),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(store.version_vector().expect("vv").get(ReplicaId(1)), 2);
}

#[test]
fn an_unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    }
    tamper(dir.path(), "meta", b"format", &99u32.to_be_bytes());
    let err =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect_err("refused");
    assert!(
        matches!(err, StoreError::UnsupportedFormat { found: 99, .. }),
        "{err}"
    );
}

/// An own counter delta with `seq`.
fn store_delta(seq: u64) -> concord_core::Delta {
    concord_core::Delta {
        origin: ReplicaId(1),
        seq,
        hlc: Hlc::from_parts(common::T0, 0).expect("hlc"),
        keyspace: "hits".into(),
        key: "k".into(),
        op: concord_core::Op::Counter(concord_core::crdt::CounterOp {
            direction: concord_core::crdt::Direction::Increment,
            total: seq,
        }),
    }
}

#[test]
fn corrupted_records_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    }
    tamper(dir.path(), "meta", b"identity", &[0xff, 0xff, 0xff]);
    let err =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect_err("refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");

    // The log record of a declaration, damaged: five deltas announced and
    // half a length there, none at all, a length past the end.
    for bad in [
        &[0u8, 0, 0, 5, 0, 0][..],
        &[0, 0, 0, 0],
        &[0, 0, 0, 1, 0, 0, 0, 9, 1],
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), identity("east", 1), StoreOptions::default())
                .expect("open");
            store
                .declare(&clock(), "hits", CrdtType::Counter)
                .expect("declare");
            store.flush().expect("flush");
        }
        let key = concord_store::layout::log_key(ReplicaId(1), 1);
        tamper(dir.path(), "log", &key, bad);
        let err = Store::open(dir.path(), identity("east", 1), StoreOptions::default())
            .expect_err("refused");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("log of replica 1"), "{err}");
    }

    // A well-formed record holding another seq than its position says is
    // refused when read, not served.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store =
            Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
        store
            .declare(&clock(), "hits", CrdtType::Counter)
            .expect("declare");
        store.flush().expect("flush");
    }
    let mut wrong = store_delta(5).encode();
    let mut record = 1u32.to_be_bytes().to_vec();
    record.extend_from_slice(&(wrong.len() as u32).to_be_bytes());
    record.append(&mut wrong);
    let key = concord_store::layout::log_key(ReplicaId(1), 1);
    tamper(dir.path(), "log", &key, &record);
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    let err = store
        .log_from(ReplicaId(1), 1, 10, usize::MAX)
        .expect_err("refused");
    assert!(err.to_string().contains("where seq 1 belongs"), "{err}");
    drop(store);

    // Data without a format record is not silently adopted either.
    let dir = tempfile::tempdir().expect("tempdir");
    tamper(dir.path(), "values", b"x", b"y");
    let err =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect_err("refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[test]
fn writes_to_undeclared_keyspaces_and_bad_keys_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    let err = incr_result(&store, &clock, "k").expect_err("undeclared");
    assert!(matches!(err, StoreError::UnknownKeyspace { .. }), "{err}");
    store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    let long = "k".repeat(2000);
    let err = incr_result(&store, &clock, &long).expect_err("long key");
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(store.version_vector().expect("vv").get(ReplicaId(1)), 1);
    // A type mismatch in the middle of a batch refuses the whole batch.
    let err = store
        .write(
            &clock,
            &[
                Item {
                    keyspace: counter(),
                    key: "k".into(),
                    command: Command::Counter(CounterCommand::Add(5)),
                },
                Item {
                    keyspace: counter(),
                    key: "k".into(),
                    command: Command::Set(SetCommand::Add(vec![b"x".to_vec()])),
                },
            ],
        )
        .expect_err("mismatch");
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(
        store.get(&counter(), "k").expect("get"),
        Value::empty(CrdtType::Counter)
    );
    assert_eq!(store.version_vector().expect("vv").get(ReplicaId(1)), 1);
}

fn incr_result(
    store: &Store,
    clock: &Clock,
    key: &str,
) -> Result<concord_store::WriteReceipt, StoreError> {
    store.write(
        clock,
        &[Item {
            keyspace: counter(),
            key: key.into(),
            command: Command::Counter(CounterCommand::Add(1)),
        }],
    )
}

/// In group mode a write is durable when it returns, and the batches
/// handed to one `write_many` (how the node's writer coalesces concurrent
/// clients) share one flush; concurrent writers calling `write` each get
/// a flush of their own and every increment counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_one_flush_among_the_batches_of_a_write_many() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(clock());
    let store = Arc::new(
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open"),
    );
    assert_eq!(store.durability(), Durability::Group);
    let (_, _, declared) = store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    store.durable(&declared).await.expect("durable");
    let before = store.flush_count();

    let batch = [Item {
        keyspace: counter(),
        key: "k".into(),
        command: Command::Counter(CounterCommand::Add(1)),
    }];
    let batches: Vec<&[Item]> = (0..64).map(|_| &batch[..]).collect();
    let receipts = store.write_many(&clock, &batches);
    assert_eq!(receipts.len(), 64);
    assert_eq!(store.flush_count(), before + 1, "one flush for the group");
    for receipt in &receipts {
        let receipt = receipt.as_ref().expect("write");
        store.durable(receipt).await.expect("durable");
    }
    assert_eq!(store.flush_count(), before + 1, "durable on return");

    let writers = 16;
    let per_writer = 10;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = store.clone();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_writer {
                let receipt = incr(&store, &clock);
                store.durable(&receipt).await.expect("durable");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let writes = 64 + (writers * per_writer) as i128;
    match store.get(&counter(), "k").expect("get") {
        Value::Counter(c) => assert_eq!(c.value(), writes),
        other => panic!("unexpected {other:?}"),
    }
}

/// In relaxed mode a write is acknowledged without waiting for a flush.
#[tokio::test]
async fn relaxed_mode_does_not_flush_per_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let options = StoreOptions {
        durability: Durability::Relaxed,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), identity("east", 1), options).expect("open");
    store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    for _ in 0..10 {
        let receipt = incr(&store, &clock);
        store.durable(&receipt).await.expect("durable");
    }
    assert_eq!(store.flush_count(), 0);
}

/// What leaves a relaxed region waits for the disk all the same:
/// `persisted` and `sync` flush sled once for everything committed
/// before them, and not again while nothing new is committed.
#[tokio::test]
async fn relaxed_mode_flushes_before_anything_leaves_the_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let options = StoreOptions {
        durability: Durability::Relaxed,
        flush_every_ms: 60_000,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), identity("east", 1), options).expect("open");
    let (_, _, declared) = store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    store.persisted(&declared).await.expect("persisted");
    assert_eq!(store.flush_count(), 1);
    let receipts: Vec<_> = (0..5).map(|_| incr(&store, &clock)).collect();
    assert_eq!(
        store.flush_count(),
        1,
        "writes are answered before the disk"
    );
    store.sync().await.expect("sync");
    assert_eq!(store.flush_count(), 2, "one flush covers them all");
    for receipt in &receipts {
        store.persisted(receipt).await.expect("persisted");
    }
    store.sync().await.expect("sync again");
    assert_eq!(store.flush_count(), 2, "nothing new to flush");
    // Flushes are spaced: the next one starts no sooner than
    // RELAXED_FLUSH_SPACING after the one before.
    let started = std::time::Instant::now();
    incr(&store, &clock);
    store.sync().await.expect("sync");
    incr(&store, &clock);
    store.sync().await.expect("sync");
    assert_eq!(store.flush_count(), 4);
    assert!(
        started.elapsed() >= concord_store::durability::RELAXED_FLUSH_SPACING,
        "two flushes within {:?}",
        started.elapsed()
    );
}

/// `sync` covers everything committed before it, flushing only when some
/// of it is not durable yet; the in-memory vector it is paired with
/// matches the stored one across a reopen.
#[tokio::test]
async fn sync_flushes_only_what_is_not_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    store.sync().await.expect("sync with nothing written");
    assert_eq!(store.flush_count(), 0);
    let (_, _, receipt) = store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    store.durable(&receipt).await.expect("durable");
    let after_declare = store.flush_count();
    assert_eq!(after_declare, 1);
    store.sync().await.expect("sync after a durable write");
    assert_eq!(store.flush_count(), after_declare, "nothing new to flush");

    // A write is durable when it returns (its own flush); sync then has
    // nothing to do.
    incr(&store, &clock);
    incr(&store, &clock);
    let seen = store.version_vector().expect("vector");
    assert_eq!(seen.get(ReplicaId(1)), 3);
    assert_eq!(store.flush_count(), after_declare + 2);
    store.sync().await.expect("sync after two writes");
    assert_eq!(store.flush_count(), after_declare + 2);
    drop(store);

    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("reopen");
    assert_eq!(store.version_vector().expect("vector"), seen);
    assert_eq!(store.applied(ReplicaId(1)).expect("applied"), 3);
}

#[test]
fn a_corrupted_set_member_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let set = KeyspaceId {
        name: "tags".into(),
        ty: CrdtType::Set,
    };
    let add = |member: &[u8]| Item {
        keyspace: set.clone(),
        key: "k".into(),
        command: Command::Set(SetCommand::Add(vec![member.to_vec()])),
    };
    {
        let store =
            Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
        store
            .declare(&clock, "tags", CrdtType::Set)
            .expect("declare");
        store.write(&clock, &[add(b"a"), add(b"b")]).expect("write");
        store.flush().expect("flush");
    }
    let row = concord_store::layout::member_key("tags", "k", b"a");
    tamper(dir.path(), "set_members", &row, &[0xff, 0xff, 0xff]);
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("reopen");
    // Reading the set whole, or writing the bad member, is an error that
    // names the damage; nothing is applied.
    let err = store.get(&set, "k").expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("set member"), "{err}");
    let before = store.version_vector().expect("vv");
    let err = store.write(&clock, &[add(b"a")]).expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(store.version_vector().expect("vv"), before);
    // The set's other members are still written and read one by one.
    let receipt = store.write(&clock, &[add(b"c")]).expect("write");
    assert!(receipt.last_seq > 0);
}

#[test]
fn a_range_read_of_a_set_is_a_type_mismatch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store =
        Store::open(dir.path(), identity("east", 1), StoreOptions::default()).expect("open");
    store
        .declare(&clock, "tags", CrdtType::Set)
        .expect("declare");
    let set = KeyspaceId {
        name: "tags".into(),
        ty: CrdtType::Set,
    };
    let add = Item {
        keyspace: set.clone(),
        key: "k".into(),
        command: Command::Set(SetCommand::Add(vec![b"a".to_vec()])),
    };
    store.write(&clock, &[add]).expect("write");
    let range = Item::new(
        set,
        "k",
        Command::Stream(concord_core::crdt::StreamCommand::Range {
            from: concord_core::crdt::StreamId::MIN,
            to: concord_core::crdt::StreamId::MAX,
            count: 10,
        }),
    );
    let err = store.write(&clock, &[range]).expect_err("mismatch");
    assert!(
        matches!(
            err,
            StoreError::Core(concord_core::CoreError::TypeMismatch { .. })
        ),
        "{err}"
    );
}

/// The durable own seq, the one signal of what may leave the region,
/// rises only when own deltas are on disk, in both modes, and starts at
/// what a reopened store holds.
#[tokio::test]
async fn the_durable_own_seq_follows_the_disk_in_both_modes() {
    for durability in [Durability::Group, Durability::Relaxed] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = clock();
        let options = StoreOptions {
            durability,
            flush_every_ms: 60_000,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), identity("east", 1), options.clone()).expect("open");
        let (_, _, declared) = store
            .declare(&clock, "hits", CrdtType::Counter)
            .expect("declare");
        store.persisted(&declared).await.expect("persisted");
        assert_eq!(store.durable_own_seq(), 1, "{durability:?}");
        let item = Item {
            keyspace: counter(),
            key: "k".into(),
            command: Command::Counter(CounterCommand::Add(1)),
        };
        let staged = store.stage_many(
            &clock,
            &[std::slice::from_ref(&item), std::slice::from_ref(&item)],
        );
        let last = staged
            .iter()
            .map(|r| r.as_ref().expect("staged").last_seq)
            .max()
            .expect("receipts");
        assert_eq!(last, 3);
        assert_eq!(
            store.durable_own_seq(),
            1,
            "{durability:?}: staged writes are not on disk yet"
        );
        let mut changes = store.changes();
        changes.borrow_and_update();
        store.sync().await.expect("sync");
        assert_eq!(store.durable_own_seq(), 3, "{durability:?}");
        assert!(
            changes.has_changed().expect("sender"),
            "{durability:?}: nobody woken"
        );
        drop(store);
        let store = Store::open(dir.path(), identity("east", 1), options).expect("reopen");
        assert_eq!(store.durable_own_seq(), 3, "{durability:?} after a reopen");
    }
}
