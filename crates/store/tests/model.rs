//! Model-based test of the store: random local batches, remote delta
//! batches (in order, with duplicates, and with gaps that must be refused
//! whole), and reboots (close and reopen) are run against the real store and
//! against a plain in-memory model built from the core types; after every
//! step the store must agree with the model, and every log entry with the
//! values and the version vector.

use std::collections::BTreeMap;
use std::sync::Arc;

use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
use concord_core::crdt::{
    CounterCommand, Field, RegisterCommand, SetCommand, Stream, StreamCommand, StreamId,
};
use concord_core::{
    Clock, Command, CrdtType, Delta, Hlc, KeyspaceId, Limits, Op, ReplicaId, Value, VersionVector,
};
use concord_store::{Identity, Item, Store, StoreError, StoreOptions};
use proptest::prelude::*;

const ME: ReplicaId = ReplicaId(1);
const PEER: ReplicaId = ReplicaId(2);
const T0: i64 = HLC_EPOCH_UNIX_MS + 10_000_000;
const KEYSPACES: [(&str, CrdtType); 4] = [
    ("c", CrdtType::Counter),
    ("s", CrdtType::Set),
    ("r", CrdtType::Register),
    ("t", CrdtType::Stream),
];

#[derive(Debug, Clone)]
enum Step {
    /// A local batch of writes (and reads).
    Local(Vec<(usize, Command)>),
    /// The peer makes writes (kept in its log, not yet delivered).
    PeerWrites(Vec<(usize, Command)>),
    /// Deliver up to n more peer deltas, redelivering `dups` before them.
    Deliver { n: usize, dups: usize },
    /// Deliver a batch that skips one delta: must be refused whole.
    DeliverWithGap,
    /// Close and reopen the store.
    Reboot,
}

fn write() -> impl Strategy<Value = Command> {
    let member = (0u8..5).prop_map(|m| vec![b'a' + m]);
    prop_oneof![
        (-100i64..100).prop_map(|n| Command::Counter(CounterCommand::Add(n))),
        prop::collection::vec(member.clone(), 1..3).prop_map(|m| Command::Set(SetCommand::Add(m))),
        prop::collection::vec(member, 1..3).prop_map(|m| Command::Set(SetCommand::Remove(m))),
        any::<u8>().prop_map(|v| Command::Register(RegisterCommand::Set(vec![v]))),
        any::<u8>()
            .prop_map(|v| Command::Stream(StreamCommand::Append(vec![Field::new("f", vec![v])]))),
        Just(Command::Stream(StreamCommand::Trim(StreamId::MIN))),
    ]
}

fn writes() -> impl Strategy<Value = Vec<(usize, Command)>> {
    prop::collection::vec((0usize..2, write()), 1..5)
}

/// The read of a whole value of type `ty`.
fn read_of(ty: CrdtType) -> Command {
    match ty {
        CrdtType::Counter => Command::Counter(CounterCommand::Get),
        CrdtType::Set => Command::Set(SetCommand::Members),
        CrdtType::Register => Command::Register(RegisterCommand::Get),
        CrdtType::Stream => Command::Stream(StreamCommand::Range {
            from: StreamId::MIN,
            to: StreamId::MAX,
            count: 10_000,
        }),
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => writes().prop_map(Step::Local),
        3 => writes().prop_map(Step::PeerWrites),
        3 => (1usize..6, 0usize..3).prop_map(|(n, dups)| Step::Deliver { n, dups }),
        1 => Just(Step::DeliverWithGap),
        1 => Just(Step::Reboot),
    ]
}

fn ks_of(command: &Command) -> KeyspaceId {
    let ty = command.crdt_type();
    let name = KEYSPACES.iter().find(|(_, t)| *t == ty).expect("type").0;
    KeyspaceId {
        name: name.to_string(),
        ty,
    }
}

/// A trim picks the middle of what the writer sees, so it removes something.
fn concrete(command: &Command, stream: &Stream) -> Command {
    match command {
        Command::Stream(StreamCommand::Trim(_)) => {
            let entries: Vec<StreamId> = stream.entries().map(|(id, _)| id).collect();
            Command::Stream(StreamCommand::Trim(
                entries
                    .get(entries.len() / 2)
                    .copied()
                    .unwrap_or(StreamId::MIN),
            ))
        }
        other => other.clone(),
    }
}

/// The in-memory model of one replica.
#[derive(Default, Clone)]
struct Model {
    values: BTreeMap<(String, String), Value>,
    vv: VersionVector,
    logs: BTreeMap<ReplicaId, Vec<Delta>>,
}

impl Model {
    fn value(&self, ks: &KeyspaceId, key: &str) -> Value {
        self.values
            .get(&(ks.name.clone(), key.to_string()))
            .cloned()
            .unwrap_or_else(|| Value::empty(ks.ty))
    }

    fn apply(&mut self, d: &Delta) {
        if let Some(ty) = d.op.crdt_type() {
            let v = self
                .values
                .entry((d.keyspace.clone(), d.key.clone()))
                .or_insert_with(|| Value::empty(ty));
            v.apply(d.origin, d.hlc, &d.op).expect("model applies");
        }
        self.vv.advance(d.origin, d.seq);
        self.logs.entry(d.origin).or_default().push(d.clone());
    }

    /// Makes a delta as region `origin` would, applying it.
    fn make(
        &mut self,
        origin: ReplicaId,
        hlc: Hlc,
        ks: &KeyspaceId,
        key: &str,
        command: &Command,
    ) -> Option<Delta> {
        let op = command
            .prepare(&self.value(ks, key), origin, hlc, &Limits::default())
            .expect("valid command")?;
        let d = Delta {
            origin,
            seq: self.vv.get(origin) + 1,
            hlc,
            keyspace: ks.name.clone(),
            key: key.to_string(),
            op,
        };
        self.apply(&d);
        Some(d)
    }

    fn stream(&self, ks: &KeyspaceId, key: &str) -> Stream {
        match self.value(ks, key) {
            Value::Stream(s) => s,
            _ => Stream::default(),
        }
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        Identity {
            region: "test-east".into(),
            replica: ME,
        },
        StoreOptions::default(),
    )
    .expect("open")
}

fn check(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(&store.version_vector().expect("vv"), &model.vv);
    for (name, ty) in KEYSPACES {
        let ks = KeyspaceId {
            name: name.into(),
            ty,
        };
        for key in ["k0", "k1"] {
            // A lone read, outside the writer, answers as the model does.
            let mut reads = vec![read_of(ty)];
            if ty == CrdtType::Set {
                reads.extend([b"a", b"e"].map(|m| Command::Set(SetCommand::Contains(m.to_vec()))));
            }
            for read in reads {
                let got = store
                    .read(&Item::new(ks.clone(), key, read.clone()))
                    .expect("read");
                let want = read
                    .reply(&model.value(&ks, key), ME, None)
                    .expect("model reply");
                prop_assert_eq!(got.reply, want);
            }
            if ty == CrdtType::Stream {
                prop_assert_eq!(
                    store.stream(&ks, key).expect("stream"),
                    model.stream(&ks, key)
                );
            } else {
                prop_assert_eq!(store.get(&ks, key).expect("get"), model.value(&ks, key));
            }
        }
    }
    // Every log entry agrees with the model's log (and so with the values
    // and the version vector the model derived from it).
    for origin in [ME, PEER] {
        let want: Vec<Delta> = model.logs.get(&origin).cloned().unwrap_or_default();
        let got = store
            .log_from(origin, 1, usize::MAX, usize::MAX)
            .expect("log");
        prop_assert_eq!(got, want);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_the_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let time = Arc::new(ManualTime::new(T0));
        let clock = Clock::new(time.clone(), 0, Hlc::ZERO).expect("clock");
        let peer_time = Arc::new(ManualTime::new(T0));
        let peer_clock = Clock::new(peer_time.clone(), 0, Hlc::ZERO).expect("clock");
        let mut store = open(dir.path());
        let mut model = Model::default();
        // The peer's own view: everything it wrote plus what it declared.
        let mut peer = Model::default();
        let mut delivered = 0usize;

        for (name, ty) in KEYSPACES {
            let (_, created, _) = store.declare(&clock, name, ty).expect("declare");
            prop_assert!(created);
            let d = store.log_from(ME, model.vv.get(ME) + 1, 1, usize::MAX).expect("log").remove(0);
            prop_assert_eq!(&d.op, &Op::Declare(ty));
            model.apply(&d);
        }

        for step in steps {
            time.advance(3);
            peer_time.advance(2);
            match step {
                Step::Local(writes) => {
                    // Each write is followed by a read of its key, which
                    // must see the batch's writes up to it.
                    let items: Vec<Item> = writes
                        .iter()
                        .flat_map(|(k, command)| {
                            let ks = ks_of(command);
                            let key = format!("k{k}");
                            let command = concrete(command, &model.stream(&ks, &key));
                            let read = Item::new(ks.clone(), key.clone(), read_of(ks.ty));
                            [Item::new(ks, key, command), read]
                        })
                        .collect();
                    let receipt = store.write(&clock, &items).expect("write");
                    for (pair, results) in items.chunks(2).zip(receipt.results.chunks(2)) {
                        let Item { keyspace, key, command } = &pair[0];
                        let stamp = results[0].write.expect("a write is stamped");
                        let made = model.make(ME, stamp.hlc, keyspace, key, command);
                        prop_assert_eq!(made.map(|d| d.seq).unwrap_or(0), stamp.seq);
                        let want = pair[1]
                            .command
                            .reply(&model.value(keyspace, key), ME, None)
                            .expect("the model's reply");
                        prop_assert_eq!(&results[1].reply, &want);
                    }
                }
                Step::PeerWrites(writes) => {
                    for (k, command) in writes {
                        let ks = ks_of(&command);
                        let key = format!("k{k}");
                        let command = concrete(&command, &peer.stream(&ks, &key));
                        let hlc = peer_clock.now().expect("clock");
                        peer.make(PEER, hlc, &ks, &key, &command);
                    }
                }
                Step::Deliver { n, dups } => {
                    let log = peer.logs.get(&PEER).cloned().unwrap_or_default();
                    let from = delivered.saturating_sub(dups);
                    let upto = (delivered + n).min(log.len());
                    let batch = &log[from..upto];
                    let report = store.apply_remote(batch, clock.last()).expect("in-order batch applies");
                    prop_assert_eq!(report.applied, upto - delivered);
                    prop_assert_eq!(report.duplicates, delivered - from);
                    for d in &log[delivered..upto] {
                        model.apply(d);
                    }
                    delivered = upto;
                }
                Step::DeliverWithGap => {
                    let log = peer.logs.get(&PEER).cloned().unwrap_or_default();
                    if delivered + 2 <= log.len() {
                        // The next delta is missing: nothing may be applied,
                        // not even the duplicates in front.
                        let mut batch: Vec<Delta> = log[delivered.saturating_sub(1)..delivered].to_vec();
                        batch.push(log[delivered + 1].clone());
                        let err = store.apply_remote(&batch, clock.last()).expect_err("gap refused");
                        prop_assert!(matches!(err, StoreError::Gap { .. }), "{err}");
                    }
                }
                Step::Reboot => {
                    drop(store);
                    store = open(dir.path());
                }
            }
            check(&store, &model)?;
        }
        // Everything the peer made, delivered at last, converges with it.
        let log = peer.logs.get(&PEER).cloned().unwrap_or_default();
        store.apply_remote(&log, clock.last()).expect("catch up");
        for d in &log[delivered..] {
            model.apply(d);
        }
        check(&store, &model)?;
        // The HLC high-water mark covers every stamp the store took.
        prop_assert!(store.hlc_high_water().expect("hwm") >= clock.last());
        // Our state already contains everything the peer has: merging the
        // peer's full state into it changes nothing.
        for ((ks, key), v) in &peer.values {
            let mut ours = model.values.get(&(ks.clone(), key.clone())).cloned().expect("delivered");
            let before = ours.clone();
            ours.merge(v).expect("same type");
            prop_assert_eq!(ours, before);
        }
    }
}
