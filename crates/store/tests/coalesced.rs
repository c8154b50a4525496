//! `Store::write_many`: batches run together in one transaction give
//! exactly what running them one after the other gives, and a batch that
//! fails fails alone.

mod common;

use common::{declare_all, dump, ks, manual_clock, open_as, random_write, write};
use concord_core::crdt::CounterCommand;
use concord_core::{Command, CrdtType, Value};
use concord_store::{Item, StoreOptions};

#[test]
fn coalesced_batches_match_their_sequential_run() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = open_as(dir_a.path(), 1, StoreOptions::default());
    let b = open_as(dir_b.path(), 1, StoreOptions::default());
    let (time_a, clock_a) = manual_clock();
    let (time_b, clock_b) = manual_clock();
    declare_all(&a, &clock_a);
    declare_all(&b, &clock_b);
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..60 {
        // A group of 1 to 8 batches of 1 to 5 items, drawn from the state
        // before the group (both stores hold the same).
        let group: Vec<Vec<Item>> = (0..rng.usize(1..9))
            .map(|_| {
                (0..rng.usize(1..6))
                    .map(|_| random_write(&mut rng, &b))
                    .collect()
            })
            .collect();
        let refs: Vec<&[Item]> = group.iter().map(Vec::as_slice).collect();
        let together = a.write_many(&clock_a, &refs);
        let one_by_one: Vec<_> = group.iter().map(|items| b.write(&clock_b, items)).collect();
        assert_eq!(together.len(), one_by_one.len());
        for (t, s) in together.iter().zip(&one_by_one) {
            let (t, s) = (t.as_ref().expect("together"), s.as_ref().expect("alone"));
            assert_eq!(t.results, s.results, "round {round}");
            assert_eq!(t.last_seq, s.last_seq, "round {round}");
        }
        let step = rng.i64(0..3);
        time_a.advance(step);
        time_b.advance(step);
    }
    assert_eq!(dump(&a), dump(&b));
    let log = |s: &concord_store::Store| {
        s.log_from(concord_core::ReplicaId(1), 1, 100_000, 1 << 30)
            .expect("log")
    };
    assert_eq!(log(&a), log(&b), "the logs are the same");
}

#[test]
fn a_failing_batch_fails_alone_and_the_others_commit() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open_as(dir.path(), 1, StoreOptions::default());
    let (_time, clock) = manual_clock();
    declare_all(&store, &clock);
    let base = store.applied(concord_core::ReplicaId(1)).expect("applied");
    let too_long = "k".repeat(store.limits().max_key_bytes + 1);
    let get = Item::new(
        ks("hits", CrdtType::Counter),
        "a",
        Command::Counter(CounterCommand::Get),
    );
    let first = [write("a", Command::Counter(CounterCommand::Add(5)))];
    let bad = [
        write("b", Command::Counter(CounterCommand::Add(1))),
        write(&too_long, Command::Counter(CounterCommand::Add(1))),
    ];
    let third = [
        write("a", Command::Counter(CounterCommand::Add(2))),
        get.clone(),
    ];
    let read_only = [get];
    let out = store.write_many(&clock, &[&first, &bad, &third, &read_only]);
    assert_eq!(out[0].as_ref().expect("first").last_seq, base + 1);
    assert!(out[1].is_err(), "the batch with the long key fails");
    let third = out[2].as_ref().expect("third");
    assert_eq!(
        third.last_seq,
        base + 2,
        "no seq is spent on the failed batch"
    );
    assert_eq!(third.results[1].reply, concord_core::Reply::Counter(7));
    let read = out[3].as_ref().expect("read");
    assert_eq!(read.last_seq, 0, "a read writes nothing");
    // Nothing of the failed batch was applied, not even its valid write.
    let b = store.get(&ks("hits", CrdtType::Counter), "b").expect("get");
    assert_eq!(b, Value::Counter(Default::default()));
}
