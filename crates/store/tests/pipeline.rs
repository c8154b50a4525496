//! `Store::stage_many`: local commits queued for their journal write while
//! the writer lock serves the next commit. Staged groups, peer batches in
//! between and waits at random points give exactly what a store that
//! waits for every write gives; a queued commit is read by nobody until
//! it is durable, while a peer's batch that does not depend on it is read
//! at once; a store closed with a commit queued opens without it.

mod common;

use common::{declare_all, dump, ks, manual_clock, open_as, random_write, tail, write, T0};
use concord_core::crdt::Field;
use concord_core::crdt::{CounterCommand, RegisterCommand, SetCommand, StreamCommand};
use concord_core::{Clock, Command, CrdtType, Hlc, ReplicaId, Value};
use concord_store::{Item, Store, StoreOptions, WriteReceipt};

const ME: ReplicaId = ReplicaId(1);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A peer's write, to the keys local writes use or to keys of its own.
fn peer_write(rng: &mut fastrand::Rng, peer: &Store) -> Item {
    if rng.bool() {
        return random_write(rng, peer);
    }
    let key = format!("p{}", rng.u8(0..3));
    let command = match rng.u8(0..3) {
        0 => Command::Counter(CounterCommand::Add(rng.i64(1..10))),
        1 => Command::Set(SetCommand::Add(vec![vec![b'a' + rng.u8(0..4)]])),
        _ => Command::Stream(StreamCommand::Append(vec![Field::new(
            "v",
            vec![rng.u8(..)],
        )])),
    };
    write(&key, command)
}

/// Stages one batch of one item.
fn stage_one(store: &Store, clock: &Clock, item: Item) -> WriteReceipt {
    store
        .stage_many(clock, &[&[item]])
        .pop()
        .expect("one")
        .expect("staged")
}

fn counter(store: &Store, key: &str) -> i128 {
    match store.get(&ks("hits", CrdtType::Counter), key).expect("get") {
        Value::Counter(c) => c.value(),
        other => panic!("not a counter: {other:?}"),
    }
}

#[test]
fn staged_groups_and_peer_batches_match_a_store_that_waits_for_every_write() {
    let rt = runtime();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let staged = open_as(dirs[0].path(), 1, StoreOptions::default());
    let waiting = open_as(dirs[1].path(), 1, StoreOptions::default());
    let peer = open_as(dirs[2].path(), 2, StoreOptions::default());
    let (time_s, clock_s) = manual_clock();
    let (time_w, clock_w) = manual_clock();
    let (time_p, clock_p) = manual_clock();
    declare_all(&staged, &clock_s);
    declare_all(&waiting, &clock_w);
    declare_all(&peer, &clock_p);
    let mut rng = fastrand::Rng::with_seed(23);
    let mut receipts: Vec<WriteReceipt> = Vec::new();
    for round in 0..300 {
        match rng.u8(0..10) {
            0..=4 => {
                let group: Vec<Vec<Item>> = (0..rng.usize(1..5))
                    .map(|_| {
                        (0..rng.usize(1..4))
                            .map(|_| random_write(&mut rng, &waiting))
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[Item]> = group.iter().map(Vec::as_slice).collect();
                let queued = staged.stage_many(&clock_s, &refs);
                let done = waiting.write_many(&clock_w, &refs);
                for (q, d) in queued.into_iter().zip(done) {
                    match (q, d) {
                        (Ok(q), Ok(d)) => {
                            assert_eq!(q.results, d.results, "round {round}");
                            assert_eq!(q.last_seq, d.last_seq, "round {round}");
                            receipts.push(q);
                        }
                        (Err(q), Err(d)) => assert_eq!(q.to_string(), d.to_string()),
                        (q, d) => panic!("round {round}: staged {q:?}, written {d:?}"),
                    }
                }
            }
            5..=7 => {
                let items: Vec<Item> = (0..rng.usize(1..4))
                    .map(|_| peer_write(&mut rng, &peer))
                    .collect();
                peer.write(&clock_p, &items).expect("peer write");
                // The peer's deltas reach both, from each one's vector,
                // and both clocks observe the peer's.
                clock_s.observe(clock_p.last()).expect("observe");
                clock_w.observe(clock_p.last()).expect("observe");
                tail(&peer, &staged, &clock_s);
                tail(&peer, &waiting, &clock_w);
            }
            8 => {
                // A client of an earlier write waits for it: then it is
                // read, and so is every own write before it.
                if !receipts.is_empty() {
                    let receipt = &receipts[rng.usize(0..receipts.len())];
                    rt.block_on(staged.durable(receipt)).expect("durable");
                    assert!(
                        staged.applied(ME).expect("applied") >= receipt.last_seq,
                        "round {round}: durable but not in the vector"
                    );
                }
            }
            _ => {
                // Time moves on, alike for the two that must agree.
                let by = rng.i64(0..3);
                time_s.advance(by);
                time_w.advance(by);
                time_p.advance(rng.i64(0..3));
            }
        }
        assert!(
            staged.applied(ME).expect("applied") <= waiting.applied(ME).expect("applied"),
            "round {round}: the vector shows more than was written"
        );
    }
    rt.block_on(staged.sync()).expect("sync");
    assert_eq!(dump(&staged), dump(&waiting));
    // And what was staged is what a restart finds.
    let before = dump(&staged);
    drop(staged);
    let reopened = open_as(dirs[0].path(), 1, StoreOptions::default());
    assert_eq!(dump(&reopened), before);
}

#[test]
fn a_peer_batch_is_read_while_a_local_commit_waits_for_its_journal_write() {
    let rt = runtime();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let store = open_as(dirs[0].path(), 1, StoreOptions::default());
    let peer = open_as(dirs[1].path(), 2, StoreOptions::default());
    let (_, clock) = manual_clock();
    let (_, peer_clock) = manual_clock();
    declare_all(&store, &clock);
    declare_all(&peer, &peer_clock);
    tail(&peer, &store, &clock);
    let declared = store.applied(ME).expect("applied");

    let local = stage_one(
        &store,
        &clock,
        write("mine", Command::Counter(CounterCommand::Add(5))),
    );
    assert_eq!(counter(&store, "mine"), 0, "read before it is durable");
    assert_eq!(store.applied(ME).expect("applied"), declared);

    peer.write(
        &peer_clock,
        &[write("theirs", Command::Counter(CounterCommand::Add(7)))],
    )
    .expect("peer");
    tail(&peer, &store, &clock);
    assert_eq!(counter(&store, "theirs"), 7, "the peer's batch waited");
    assert_eq!(counter(&store, "mine"), 0, "the peer's batch wrote it out");

    // A peer's batch on the same key waits for the queued commit: both
    // are in the value after it.
    peer.write(
        &peer_clock,
        &[write("mine", Command::Counter(CounterCommand::Add(2)))],
    )
    .expect("peer");
    tail(&peer, &store, &clock);
    assert_eq!(counter(&store, "mine"), 7);
    rt.block_on(store.durable(&local)).expect("durable");
    assert_eq!(store.applied(ME).expect("applied"), local.last_seq);

    // A local commit that reads a queued one's record sees it.
    let first = stage_one(
        &store,
        &clock,
        write("again", Command::Counter(CounterCommand::Add(1))),
    );
    let second = stage_one(
        &store,
        &clock,
        write("again", Command::Counter(CounterCommand::Add(1))),
    );
    rt.block_on(store.durable(&second)).expect("durable");
    assert!(first.last_seq < second.last_seq);
    assert_eq!(counter(&store, "again"), 2);
}

#[test]
fn a_store_closed_with_a_commit_queued_opens_without_it() {
    let dir = tempfile::tempdir().expect("dir");
    let clock = Clock::new(
        std::sync::Arc::new(concord_core::clock::ManualTime::new(T0)),
        0,
        Hlc::ZERO,
    )
    .expect("clock");
    let store = open_as(dir.path(), 1, StoreOptions::default());
    declare_all(&store, &clock);
    let durable = store.applied(ME).expect("applied");
    let queued = stage_one(
        &store,
        &clock,
        write("k", Command::Counter(CounterCommand::Add(5))),
    );
    assert_eq!(queued.last_seq, durable + 1);
    drop(store);

    let store = open_as(dir.path(), 1, StoreOptions::default());
    assert_eq!(store.applied(ME).expect("applied"), durable);
    assert_eq!(counter(&store, "k"), 0);
    let again = store
        .write(
            &clock,
            &[write("k", Command::Counter(CounterCommand::Add(3)))],
        )
        .expect("write");
    assert_eq!(again.last_seq, durable + 1, "its seq is free again");
    assert_eq!(counter(&store, "k"), 3);
}

#[test]
fn commits_staged_while_others_are_written_out_read_no_stale_record() {
    // One thread stages writes to a few keys while another keeps writing
    // the queue out, as clients waiting for durability do. A commit that
    // read a record from sled just before a queued commit wrote it there
    // would repeat a set's dot or a counter's total; a replica rebuilt
    // from the log would then differ.
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let store = std::sync::Arc::new(open_as(dirs[0].path(), 1, StoreOptions::default()));
    let (_, clock) = manual_clock();
    declare_all(&store, &clock);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                rt.block_on(store.sync()).expect("sync");
            }
        })
    };
    let mut rng = fastrand::Rng::with_seed(5);
    for n in 0..4000u32 {
        let key = format!("k{}", rng.u8(0..2));
        let item = match rng.u8(0..3) {
            0 => write(
                &key,
                Command::Set(SetCommand::Add(vec![n.to_le_bytes().to_vec()])),
            ),
            1 => write(&key, Command::Counter(CounterCommand::Add(1))),
            _ => write(
                &key,
                Command::Register(RegisterCommand::Set(n.to_le_bytes().to_vec())),
            ),
        };
        stage_one(&store, &clock, item);
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    syncer.join().expect("syncer");
    runtime().block_on(store.sync()).expect("sync");
    let replica = open_as(dirs[1].path(), 2, StoreOptions::default());
    tail(&store, &replica, &clock);
    assert_eq!(dump(&store).values, dump(&replica).values);
}
