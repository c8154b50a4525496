//! Reads inside batches, chunked keyspace scans, peer bookkeeping, and the
//! refusals of remote batches and of a directory already in use.

use std::sync::Arc;

use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
use concord_core::crdt::{CounterCommand, StreamCommand};
use concord_core::crdt::{CounterOp, Direction, Field, StreamId};
use concord_core::{
    Clock, Command, CrdtType, Delta, Hlc, KeyspaceId, Limits, Op, ReplicaId, Value, VersionVector,
};
use concord_core::{Outcome, Reply};
use concord_store::{Identity, Item, Store, StoreError, StoreOptions};

const ME: ReplicaId = ReplicaId(1);
const PEER: ReplicaId = ReplicaId(2);

fn open(path: &std::path::Path) -> Store {
    Store::open(
        path,
        Identity {
            region: "east".into(),
            replica: ME,
        },
        StoreOptions::default(),
    )
    .expect("open")
}

fn clock() -> Clock {
    Clock::new(
        Arc::new(ManualTime::new(HLC_EPOCH_UNIX_MS + 5_000)),
        0,
        Hlc::ZERO,
    )
    .expect("clock")
}

fn ks(name: &str, ty: CrdtType) -> KeyspaceId {
    KeyspaceId {
        name: name.into(),
        ty,
    }
}

fn append(v: &str) -> Item {
    Item {
        keyspace: ks("events", CrdtType::Stream),
        key: "s".into(),
        command: Command::Stream(StreamCommand::Append(vec![Field::new("v", v)])),
    }
}

fn range() -> Item {
    Item {
        keyspace: ks("events", CrdtType::Stream),
        key: "s".into(),
        command: Command::Stream(StreamCommand::Range {
            from: StreamId::MIN,
            to: StreamId::MAX,
            count: 100,
        }),
    }
}

/// Declares the stream `events` and the counter `hits`.
fn declare_both(store: &Store, clock: &Clock) {
    store
        .declare(clock, "events", CrdtType::Stream)
        .expect("declare");
    store
        .declare(clock, "hits", CrdtType::Counter)
        .expect("declare");
}

fn values(result: &Outcome) -> Vec<Vec<u8>> {
    match &result.reply {
        Reply::Entries { entries, .. } => {
            entries.iter().map(|e| e.fields[0].value.clone()).collect()
        }
        other => panic!("not entries: {other:?}"),
    }
}

fn counter_delta(seq: u64, total: u64) -> Delta {
    Delta {
        origin: PEER,
        seq,
        hlc: Hlc::from_parts(HLC_EPOCH_UNIX_MS + 4_000, seq as u32).expect("hlc"),
        keyspace: "hits".into(),
        key: "k".into(),
        op: Op::Counter(CounterOp {
            direction: Direction::Increment,
            total,
        }),
    }
}

#[test]
fn reads_in_a_batch_see_the_writes_before_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = open(dir.path());
    declare_both(&store, &clock);
    let first = store
        .write(&clock, &[append("a"), append("b"), append("c")])
        .expect("write");
    let Reply::Appended(b) = first.results[1].reply else {
        panic!("not an append")
    };
    assert_eq!(b.replica, ME);
    let counter = ks("hits", CrdtType::Counter);
    let receipt = store
        .write(
            &clock,
            &[
                append("d"),
                range(),
                Item {
                    keyspace: ks("events", CrdtType::Stream),
                    key: "s".into(),
                    command: Command::Stream(StreamCommand::Trim(b)),
                },
                range(),
                Item::new(counter.clone(), "k", Command::Counter(CounterCommand::Get)),
                Item {
                    keyspace: counter.clone(),
                    key: "k".into(),
                    command: Command::Counter(CounterCommand::Add(5)),
                },
                Item::new(counter.clone(), "k", Command::Counter(CounterCommand::Get)),
            ],
        )
        .expect("write");
    let r = &receipt.results;
    assert_eq!(values(&r[1]), [b"a", b"b", b"c", b"d"].map(|v| v.to_vec()));
    assert_eq!(values(&r[3]), [b"b", b"c", b"d"].map(|v| v.to_vec()));
    assert_eq!(r[4].reply, Reply::Counter(0));
    assert_eq!(
        r[5].reply,
        Reply::Counter(5),
        "an increment answers the value after"
    );
    assert_eq!(r[6].reply, Reply::Counter(5));
    // What the batch read last is what is committed, and the trimmed row is
    // gone from disk, not only hidden.
    let stored = store
        .stream_range(
            &ks("events", CrdtType::Stream),
            "s",
            StreamId::MIN,
            StreamId::MAX,
            100,
        )
        .expect("range");
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].id, b);
}

#[test]
fn a_keyspace_scans_in_bounded_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = open(dir.path());
    store
        .declare(&clock, "hits", CrdtType::Counter)
        .expect("declare");
    store
        .declare(&clock, "hits2", CrdtType::Counter)
        .expect("declare");
    let items: Vec<Item> = (0..25)
        .map(|i| Item {
            keyspace: ks("hits", CrdtType::Counter),
            key: format!("key{i:02}"),
            command: Command::Counter(CounterCommand::Add(i)),
        })
        .chain(std::iter::once(Item {
            keyspace: ks("hits2", CrdtType::Counter),
            key: "other".into(),
            command: Command::Counter(CounterCommand::Add(1)),
        }))
        .collect();
    store.write(&clock, &items).expect("write");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let chunk = store
            .scan(&ks("hits", CrdtType::Counter), after.as_deref(), 10)
            .expect("scan");
        assert!(chunk.len() <= 10);
        let Some((last, _)) = chunk.last() else { break };
        after = Some(last.clone());
        seen.extend(chunk);
    }
    assert_eq!(seen.len(), 25);
    for (i, (key, value)) in seen.iter().enumerate() {
        assert_eq!(key, &format!("key{i:02}"));
        match value {
            Value::Counter(c) => assert_eq!(c.value(), i as i128),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn peer_acks_and_the_clock_high_water_mark_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: VersionVector = [(ME, 7), (PEER, 3)].into_iter().collect();
    {
        let store = open(dir.path());
        store.set_peer_ack(PEER, &acked).expect("ack");
        store
            .raise_hlc_high_water(Hlc::from_u64(1 << 40))
            .expect("raise");
        // A lower mark never lowers it.
        store
            .raise_hlc_high_water(Hlc::from_u64(1 << 30))
            .expect("raise");
    }
    let store = open(dir.path());
    assert_eq!(store.peer_acks().expect("acks").get(&PEER), Some(&acked));
    assert_eq!(store.hlc_high_water().expect("hwm"), Hlc::from_u64(1 << 40));
}

#[test]
fn bad_remote_batches_are_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = open(dir.path());
    let hits = ks("hits", CrdtType::Counter);

    // A delta of this region that this region never made.
    let mut own = counter_delta(1, 1);
    own.origin = ME;
    let err = store
        .apply_remote(&[own], clock.last())
        .expect_err("own delta");
    assert!(
        matches!(err, StoreError::OwnDeltaAhead { seq: 1, local: 0 }),
        "{err}"
    );

    // A batch with an oversized delta after a good one applies neither.
    let mut big = counter_delta(2, 2);
    big.key = "x".repeat(Limits::default().max_key_bytes + 1);
    let err = store
        .apply_remote(&[counter_delta(1, 1), big], clock.last())
        .expect_err("oversized");
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(store.version_vector().expect("vv").get(PEER), 0);

    // A value delta may arrive before its keyspace's declaration: it is
    // kept, and the keyspace shows up once the declaration arrives.
    let report = store
        .apply_remote(&[counter_delta(1, 4)], clock.last())
        .expect("apply");
    assert_eq!(report.applied, 1);
    assert!(store.catalog().expect("catalog").resolve("hits").is_none());
    let declare = Delta {
        key: String::new(),
        op: Op::Declare(CrdtType::Counter),
        ..counter_delta(2, 0)
    };
    store
        .apply_remote(&[declare], clock.last())
        .expect("declare");
    assert_eq!(
        store.catalog().expect("catalog").resolve("hits"),
        Some(hits.clone())
    );
    match store.get(&hits, "k").expect("get") {
        Value::Counter(c) => assert_eq!(c.value(), 4),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_directory_in_use_is_refused_after_bounded_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(dir.path());
    let err = Store::open(
        dir.path(),
        Identity {
            region: "east".into(),
            replica: ME,
        },
        StoreOptions::default(),
    )
    .expect_err("in use");
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
}

/// The newest deltas are served from memory (`recent_log_from`); what that
/// returns must be what the log on disk holds, through truncations, and a
/// reader below the floor must still be sent to a snapshot.
#[test]
fn log_tails_from_memory_match_the_log_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let mut from_memory = Vec::new();
    {
        let store = open(dir.path());
        declare_both(&store, &clock);
        for i in 0..40 {
            store
                .write(&clock, &[append(&format!("e{i}"))])
                .expect("append");
        }
        // In batches of five, so that the log's records end at 5 and
        // truncation at 5 removes the first one whole.
        let remote: Vec<Delta> = (1..=30).map(|s| counter_delta(s, s)).collect();
        for batch in remote.chunks(5) {
            store
                .apply_remote(batch, clock.now().expect("now"))
                .expect("apply");
        }
        let truncate: VersionVector = [(ME, 10), (PEER, 5)].into_iter().collect();
        store.truncate_logs(&truncate).expect("truncate");
        for origin in [ME, PEER] {
            // Below the floor: not in memory, and the log says truncated.
            assert_eq!(store.recent_log_from(origin, 5, 100, usize::MAX), None);
            assert!(matches!(
                store.log_from(origin, 5, 100, usize::MAX),
                Err(StoreError::Truncated { .. })
            ));
            let tail = store
                .recent_log_from(origin, 11, 100, usize::MAX)
                .expect("the newest deltas are in memory");
            assert_eq!(tail.first().map(|d| d.seq), Some(11));
            from_memory.push(tail);
        }
        // Count and byte limits hold as on disk: at least one delta.
        assert_eq!(
            store
                .recent_log_from(ME, 11, 3, usize::MAX)
                .map(|d| d.len()),
            Some(3)
        );
        assert_eq!(
            store.recent_log_from(ME, 11, 100, 1).map(|d| d.len()),
            Some(1)
        );
    }
    // Reopened, memory is empty and the same ranges come from sled.
    let store = open(dir.path());
    for (origin, expected) in [ME, PEER].into_iter().zip(from_memory) {
        assert_eq!(store.recent_log_from(origin, 11, 100, usize::MAX), None);
        let on_disk = store.log_from(origin, 11, 100, usize::MAX).expect("log");
        assert_eq!(on_disk, expected, "origin {origin}");
    }
}
