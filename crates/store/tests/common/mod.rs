//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
use concord_core::crdt::{CounterCommand, RegisterCommand, SetCommand, StreamCommand};
use concord_core::crdt::{Field, StreamId};
use concord_core::{Clock, Command, CrdtType, Hlc, KeyspaceId, ReplicaId, Value, VersionVector};
use concord_store::{Identity, Item, Store, StoreOptions};

/// Physical time at the start of every test clock.
pub const T0: i64 = HLC_EPOCH_UNIX_MS + 5_000_000;

/// Opens `path` as replica `replica` of a region named after it.
pub fn open_as(path: &Path, replica: u32, options: StoreOptions) -> Store {
    Store::open(
        path,
        Identity {
            region: format!("region-{replica}"),
            replica: ReplicaId(replica),
        },
        options,
    )
    .expect("open")
}

/// A clock whose time the test moves.
pub fn manual_clock() -> (Arc<ManualTime>, Clock) {
    let time = Arc::new(ManualTime::new(T0));
    let clock = Clock::new(time.clone(), 0, Hlc::ZERO).expect("clock");
    (time, clock)
}

pub fn ks(name: &str, ty: CrdtType) -> KeyspaceId {
    KeyspaceId {
        name: name.into(),
        ty,
    }
}

/// The keyspaces the helpers below write to, one per type.
pub const KEYSPACES: [(&str, CrdtType); 4] = [
    ("hits", CrdtType::Counter),
    ("tags", CrdtType::Set),
    ("names", CrdtType::Register),
    ("events", CrdtType::Stream),
];

pub fn declare_all(store: &Store, clock: &Clock) {
    for (name, ty) in KEYSPACES {
        store.declare(clock, name, ty).expect("declare");
    }
}

/// A write of one key of the keyspace of `command`'s type.
pub fn write(key: &str, command: Command) -> Item {
    let ty = command.crdt_type();
    let name = KEYSPACES
        .iter()
        .find(|(_, t)| *t == ty)
        .expect("keyspace of type")
        .0;
    Item {
        keyspace: ks(name, ty),
        key: key.into(),
        command,
    }
}

/// A random write of any type to one of a few keys, from `rng`.
pub fn random_write(rng: &mut fastrand::Rng, store: &Store) -> Item {
    let key = format!("k{}", rng.u8(0..4));
    let member = vec![b'a' + rng.u8(0..6)];
    let command = match rng.u8(0..7) {
        0 => Command::Counter(CounterCommand::Add(rng.i64(-50..100))),
        1 | 2 => Command::Set(SetCommand::Add(vec![member])),
        3 => Command::Set(SetCommand::Remove(vec![member])),
        4 => Command::Register(RegisterCommand::Set(vec![rng.u8(..)])),
        5 => Command::Stream(StreamCommand::Append(vec![Field::new(
            "v",
            vec![rng.u8(..)],
        )])),
        _ => {
            // Trim at an existing entry, so something goes.
            let stream = store
                .stream(&ks("events", CrdtType::Stream), &key)
                .expect("stream");
            let ids: Vec<StreamId> = stream.entries().map(|(id, _)| id).collect();
            match ids.get(ids.len() / 2) {
                Some(&id) => Command::Stream(StreamCommand::Trim(id)),
                None => Command::Counter(CounterCommand::Add(1)),
            }
        }
    };
    write(&key, command)
}

/// Everything a region holds that replicas must agree on: declarations,
/// every value of every declared keyspace (streams with their entries), and
/// the version vector.
#[derive(Debug, PartialEq)]
pub struct Dump {
    pub declarations: Vec<(String, CrdtType, concord_core::Marker)>,
    pub values: BTreeMap<(String, CrdtType, String), Value>,
    pub vv: VersionVector,
}

pub fn dump(store: &Store) -> Dump {
    let catalog = store.catalog().expect("catalog");
    let declarations: Vec<_> = catalog
        .declarations()
        .map(|(n, t, m)| (n.to_string(), t, m))
        .collect();
    let mut values = BTreeMap::new();
    for (name, ty, _) in &declarations {
        let keyspace = ks(name, *ty);
        let mut after: Option<String> = None;
        loop {
            let chunk = store.scan(&keyspace, after.as_deref(), 7).expect("scan");
            let Some((last, _)) = chunk.last() else { break };
            after = Some(last.clone());
            for (key, value) in chunk {
                let value = match ty {
                    CrdtType::Stream => {
                        Value::Stream(store.stream(&keyspace, &key).expect("stream"))
                    }
                    _ => value,
                };
                values.insert((name.clone(), *ty, key), value);
            }
        }
    }
    Dump {
        declarations,
        values,
        vv: store.version_vector().expect("vv"),
    }
}

/// Requires every origin's log to be whole: a contiguous run from its
/// floor to the version vector's entry, each seq once, and its recorded
/// size what is there.
pub fn assert_logs_whole(store: &Store) {
    for (origin, s) in store.log_stats().expect("stats") {
        assert_eq!(s.last, store.applied(origin).expect("applied"));
        assert_eq!(s.floor + s.entries, s.last, "origin {origin}: {s:?}");
        let left = store
            .log_from(origin, s.floor + 1, usize::MAX, usize::MAX)
            .expect("log");
        let seqs: Vec<u64> = left.iter().map(|d| d.seq).collect();
        assert_eq!(
            seqs,
            (s.floor + 1..=s.last).collect::<Vec<_>>(),
            "origin {origin}"
        );
        let bytes: u64 = left.iter().map(|d| d.encode().len() as u64).sum();
        assert_eq!(s.bytes, bytes, "origin {origin}: recorded size");
    }
}

/// Brings `to` up to date with `from`'s logs, from `to`'s version vector.
pub fn tail(from: &Store, to: &Store, clock: &Clock) {
    for (origin, last) in from.version_vector().expect("vv").iter() {
        loop {
            let next = to.applied(origin).expect("applied") + 1;
            if next > last {
                break;
            }
            let deltas = from.log_from(origin, next, 64, 1 << 20).expect("log");
            assert!(!deltas.is_empty(), "origin {origin} stops at {next}");
            to.apply_remote(&deltas, clock.last()).expect("apply");
        }
    }
}

/// Opens a closed store's directory with sled itself, to change records
/// behind the store's back as a bug, an old build, a disk fault or a crash
/// might. sled releases a closed directory's lock a moment after the store
/// is dropped, so opening retries briefly.
pub fn open_sled(path: &Path) -> sled::Db {
    let mut attempts = 0;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) if attempts < 100 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open {}: {e}", path.display()),
        }
    }
}
