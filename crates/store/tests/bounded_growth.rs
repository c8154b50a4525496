//! Bounded growth: truncating logs below a vector, the per-origin log size
//! cap, and the sweep of stream rows below a trim watermark.

mod common;

use common::*;
use concord_core::crdt::{CounterCommand, StreamCommand};
use concord_core::crdt::{CounterOp, Direction, Field, StreamId};
use concord_core::{Command, CrdtType, Delta, Hlc, Limits, Op, ReplicaId, VersionVector};
use concord_store::{StoreError, StoreOptions};

const ME: ReplicaId = ReplicaId(1);
const PEER: ReplicaId = ReplicaId(2);

fn vv(entries: &[(ReplicaId, u64)]) -> VersionVector {
    entries.iter().copied().collect()
}

#[test]
fn truncation_removes_a_prefix_and_sends_earlier_readers_to_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, clock) = manual_clock();
    let store = open_as(dir.path(), 1, StoreOptions::default());
    declare_all(&store, &clock); // seqs 1..=4
    for _ in 0..10 {
        store
            .write(
                &clock,
                &[write("a", Command::Counter(CounterCommand::Add(1)))],
            )
            .expect("write"); // seqs 5..=14
    }
    let report = store.truncate_logs(&vv(&[(ME, 6)])).expect("truncate");
    assert_eq!(report.entries, 6);
    assert_eq!(store.log_floor(ME).expect("floor"), 6);
    match store.log_from(ME, 3, 100, 1 << 20) {
        Err(StoreError::Truncated {
            origin,
            requested,
            floor,
        }) => assert_eq!((origin, requested, floor), (ME, 3, 6)),
        other => panic!("expected Truncated, got {other:?}"),
    }
    let rest = store.log_from(ME, 7, 100, 1 << 20).expect("log");
    assert_eq!(
        rest.iter().map(|d| d.seq).collect::<Vec<_>>(),
        (7..=14).collect::<Vec<_>>()
    );
    // Past the end is not an error: nothing is missing.
    assert!(store
        .log_from(ME, 15, 100, 1 << 20)
        .expect("log")
        .is_empty());

    // Truncation never goes past what was applied, and survives a reopen.
    store
        .truncate_logs(&vv(&[(ME, 1_000), (PEER, 5)]))
        .expect("truncate");
    let stats = store.log_stats().expect("stats")[&ME];
    assert_eq!((stats.floor, stats.last, stats.entries), (14, 14, 0));
    drop(store);
    let store = open_as(dir.path(), 1, StoreOptions::default());
    assert_eq!(store.log_floor(ME).expect("floor"), 14);
    assert!(matches!(
        store.log_from(ME, 14, 100, 1 << 20),
        Err(StoreError::Truncated { .. })
    ));
    let receipt = store
        .write(
            &clock,
            &[write("a", Command::Counter(CounterCommand::Add(1)))],
        )
        .expect("write");
    assert_eq!(receipt.results[0].write.map(|w| w.seq), Some(15));
    let after = store.log_from(ME, 15, 100, 1 << 20).expect("log");
    assert_eq!(after.len(), 1);
    let stats = store.log_stats().expect("stats")[&ME];
    assert_eq!((stats.floor, stats.last, stats.entries), (14, 15, 1));
}

/// The log is stored in records of many deltas (a commit's deltas of one
/// origin, up to a few hundred): a reader may start anywhere in one, and
/// truncation removes only records wholly below its point.
#[test]
fn a_truncation_point_inside_a_record_keeps_the_record_and_readers_start_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, clock) = manual_clock();
    let store = open_as(dir.path(), 1, StoreOptions::default());
    declare_all(&store, &clock);
    // One batch of 600: records of 256, 256 and 88 deltas.
    let deltas: Vec<Delta> = (1..=600).map(peer_counter).collect();
    store.apply_remote(&deltas, clock.last()).expect("apply");
    drop(store);
    // Reopened, so reads come from sled and not from memory.
    let store = open_as(dir.path(), 1, StoreOptions::default());
    let seqs = |from, count| -> Vec<u64> {
        store
            .log_from(PEER, from, count, usize::MAX)
            .expect("log")
            .iter()
            .map(|d| d.seq)
            .collect()
    };
    assert_eq!(seqs(300, 10), (300..310).collect::<Vec<_>>());
    assert_eq!(
        seqs(250, 10),
        (250..260).collect::<Vec<_>>(),
        "across records"
    );
    assert_eq!(seqs(1, usize::MAX), (1..=600).collect::<Vec<_>>());

    let report = store.truncate_logs(&vv(&[(PEER, 300)])).expect("truncate");
    assert_eq!(report.entries, 256, "only the first record is wholly below");
    assert_eq!(store.log_floor(PEER).expect("floor"), 256);
    assert!(matches!(
        store.log_from(PEER, 100, 10, usize::MAX),
        Err(StoreError::Truncated { floor: 256, .. })
    ));
    assert_eq!(seqs(257, 3), vec![257, 258, 259]);
    let stats = store.log_stats().expect("stats")[&PEER];
    assert_eq!((stats.floor, stats.last, stats.entries), (256, 600, 344));

    store.truncate_logs(&vv(&[(PEER, 600)])).expect("truncate");
    let stats = store.log_stats().expect("stats")[&PEER];
    assert_eq!((stats.floor, stats.entries, stats.bytes), (600, 0, 0));
    drop(store);
    let store = open_as(dir.path(), 1, StoreOptions::default());
    let stats = store.log_stats().expect("stats")[&PEER];
    assert_eq!((stats.floor, stats.last, stats.entries), (600, 600, 0));
}

fn small_limits() -> Limits {
    Limits {
        max_key_bytes: 64,
        max_value_bytes: 256,
        max_member_bytes: 64,
        max_members_per_op: 8,
        max_fields_per_entry: 4,
        max_field_name_bytes: 32,
        max_entry_bytes: 256,
        max_delta_bytes: 1024,
        ..Limits::default()
    }
}

fn capped(cap: u64) -> StoreOptions {
    StoreOptions {
        limits: small_limits(),
        max_log_bytes_per_origin: cap,
        ..StoreOptions::default()
    }
}

fn peer_counter(seq: u64) -> Delta {
    Delta {
        origin: PEER,
        seq,
        hlc: Hlc::from_parts(T0 - 1_000, seq as u32).expect("hlc"),
        keyspace: "hits".into(),
        key: "p".into(),
        op: Op::Counter(CounterOp {
            direction: Direction::Increment,
            total: seq,
        }),
    }
}

#[test]
fn the_size_cap_keeps_each_log_within_bounds_and_keeps_the_newest_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, clock) = manual_clock();
    let cap = 4096;
    let store = open_as(dir.path(), 1, capped(cap));
    declare_all(&store, &clock);
    for i in 0..300 {
        store
            .write(
                &clock,
                &[write(
                    &format!("k{i}"),
                    Command::Counter(CounterCommand::Add(1)),
                )],
            )
            .expect("write");
    }
    let deltas: Vec<Delta> = (1..=300).map(peer_counter).collect();
    for batch in deltas.chunks(50) {
        store.apply_remote(batch, clock.last()).expect("apply");
    }
    let stats = store.log_stats().expect("stats");
    for origin in [ME, PEER] {
        let s = stats[&origin];
        assert!(s.bytes <= cap, "{origin}: {s:?}");
        assert!(s.floor > 0 && s.entries > 0, "{origin}: {s:?}");
        assert_eq!(s.floor + s.entries, s.last, "{origin}: contiguous {s:?}");
        // What is left is readable, in order, up to the last seq.
        let left = store
            .log_from(origin, s.floor + 1, usize::MAX, usize::MAX)
            .expect("log");
        assert_eq!(left.len() as u64, s.entries);
        assert_eq!(left.last().map(|d| d.seq), Some(s.last));
    }
    assert!(store.cap_removed() > 0);
    // Values are untouched by the cap: only history goes.
    match store.get(&ks("hits", CrdtType::Counter), "p").expect("get") {
        concord_core::Value::Counter(c) => assert_eq!(c.value(), 300),
        other => panic!("not a counter: {other:?}"),
    }
    drop(store);

    // A smaller cap is enforced when the store is opened.
    let store = open_as(dir.path(), 1, capped(2048));
    let s = store.log_stats().expect("stats")[&ME];
    assert!(s.bytes <= 2048 && s.entries > 0, "{s:?}");
    assert_eq!(s.floor + s.entries, s.last);
}

#[test]
fn truncations_racing_writes_the_cap_and_each_other_keep_the_log_whole_and_counted_once() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const WRITES: u64 = 3_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, clock) = manual_clock();
    // A cap of about a hundred deltas. Truncations lag 300 seqs behind for
    // the first half of the writes (the cap removes), then 20 (they do),
    // and the two truncating threads race each other throughout.
    let store = open_as(dir.path(), 1, capped(4096));
    declare_all(&store, &clock); // seqs 1..=4
    let writing = AtomicBool::new(true);
    let lag = AtomicU64::new(300);
    let truncated: u64 = std::thread::scope(|scope| {
        let truncate = || {
            let mut removed = 0;
            while writing.load(Ordering::SeqCst) {
                let upto = store
                    .applied(ME)
                    .expect("applied")
                    .saturating_sub(lag.load(Ordering::SeqCst));
                removed += store
                    .truncate_logs(&vv(&[(ME, upto)]))
                    .expect("truncate")
                    .entries;
            }
            removed
        };
        let threads = [scope.spawn(truncate), scope.spawn(truncate)];
        for i in 0..WRITES {
            if i == WRITES / 2 {
                lag.store(20, Ordering::SeqCst);
            }
            store
                .write(
                    &clock,
                    &[write(
                        &format!("k{}", i % 50),
                        Command::Counter(CounterCommand::Add(1)),
                    )],
                )
                .expect("write");
        }
        writing.store(false, Ordering::SeqCst);
        threads
            .into_iter()
            .map(|t| t.join().expect("truncating thread"))
            .sum()
    });
    let last = 4 + WRITES;
    let check = |store: &concord_store::Store| {
        let s = store.log_stats().expect("stats")[&ME];
        assert_eq!(s.last, last);
        assert_eq!(s.floor + s.entries, s.last, "contiguous: {s:?}");
        let left = store
            .log_from(ME, s.floor + 1, usize::MAX, usize::MAX)
            .expect("log");
        let seqs: Vec<u64> = left.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, (s.floor + 1..=last).collect::<Vec<_>>());
        let bytes: u64 = left.iter().map(|d| d.encode().len() as u64).sum();
        assert_eq!(s.bytes, bytes, "recorded size matches what is there");
        s
    };
    let before = check(&store);
    assert!(
        truncated > 0 && store.cap_removed() > 0,
        "both removed some"
    );
    assert_eq!(
        truncated + store.cap_removed() + before.entries,
        last,
        "every entry is removed once or still there"
    );
    drop(store);
    let store = open_as(dir.path(), 1, capped(4096));
    assert_eq!(check(&store), before, "the same log after a reopen");
}

#[test]
fn a_cap_below_one_delta_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = concord_store::Store::open(
        dir.path(),
        concord_store::Identity {
            region: "r".into(),
            replica: ME,
        },
        capped(100),
    )
    .expect_err("cap below one delta");
    assert!(matches!(err, StoreError::Options(_)), "{err}");
    assert!(err.to_string().contains("max_log_bytes_per_origin"));
}

fn append_many(
    store: &concord_store::Store,
    clock: &concord_core::Clock,
    n: usize,
) -> Vec<StreamId> {
    let mut ids = Vec::new();
    let items: Vec<_> = (0..1000)
        .map(|i| {
            write(
                "s",
                Command::Stream(StreamCommand::Append(vec![Field::new("i", format!("{i}"))])),
            )
        })
        .collect();
    for _ in 0..n / 1000 {
        let receipt = store.write(clock, &items).expect("append");
        for r in &receipt.results {
            if let concord_core::Reply::Appended(id) = r.reply {
                ids.push(id);
            }
        }
    }
    ids
}

#[test]
fn trimmed_rows_are_invisible_at_once_and_swept_in_bounded_steps_even_across_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, clock) = manual_clock();
    let events = ks("events", CrdtType::Stream);
    let store = open_as(dir.path(), 1, StoreOptions::default());
    declare_all(&store, &clock);
    let ids = append_many(&store, &clock, 10_000);
    assert_eq!(ids.len(), 10_000);

    // Trim all but the last 100: the trim's own call sweeps one bounded
    // step; the rest waits.
    let cut = ids[9_900];
    store
        .write(
            &clock,
            &[write("s", Command::Stream(StreamCommand::Trim(cut)))],
        )
        .expect("trim");
    let stream = store.stream(&events, "s").expect("stream");
    assert_eq!(stream.len(), 100);
    assert_eq!(stream.entries().next().map(|(id, _)| id), Some(cut));

    // Close without sweeping more, as a crash would; the sweep resumes
    // after the reopen and deletes exactly the rest.
    drop(store);
    let store = open_as(dir.path(), 1, StoreOptions::default());
    let left = store.sweep_trimmed(usize::MAX).expect("sweep");
    assert_eq!(left, 9_900 - concord_store::logs::SWEEP_ROWS_PER_CALL);
    assert_eq!(store.sweep_trimmed(usize::MAX).expect("sweep"), 0);
    assert_eq!(store.stream(&events, "s").expect("stream").len(), 100);

    // A remote trim is swept the same way, and appends below a watermark
    // are dropped.
    let remote_trim = Delta {
        origin: PEER,
        seq: 1,
        hlc: clock.now().expect("now"),
        keyspace: "events".into(),
        key: "s".into(),
        op: Op::Stream(concord_core::crdt::StreamOp::Trim { before: ids[9_950] }),
    };
    store
        .apply_remote(&[remote_trim], clock.last())
        .expect("apply");
    assert_eq!(store.stream(&events, "s").expect("stream").len(), 50);
    assert_eq!(store.sweep_trimmed(usize::MAX).expect("sweep"), 0);
    let late = Delta {
        origin: PEER,
        seq: 2,
        hlc: ids[0].hlc,
        keyspace: "events".into(),
        key: "s".into(),
        op: Op::Stream(concord_core::crdt::StreamOp::Append {
            fields: vec![Field::new("late", "x")],
        }),
    };
    store.apply_remote(&[late], clock.last()).expect("apply");
    assert_eq!(store.stream(&events, "s").expect("stream").len(), 50);
}

#[test]
fn a_zero_flush_interval_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        flush_every_ms: 0,
        ..StoreOptions::default()
    };
    let err = concord_store::Store::open(
        dir.path(),
        concord_store::Identity {
            region: "r".into(),
            replica: ME,
        },
        options,
    )
    .expect_err("zero interval");
    assert!(matches!(err, StoreError::Options(_)), "{err}");
    assert!(err.is_invalid_input());
}
