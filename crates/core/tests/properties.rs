//! Property tests of concord's CRDT core.
//!
//! A small model of a cluster drives the real types: replicas make local
//! writes (operations prepared from their current state, exactly as a node
//! does), deltas travel in per-origin order with arbitrary interleavings
//! across origins, duplicates and late redeliveries, and the resulting states
//! are checked against the CRDT laws and against a plain model of each
//! type's semantics computed from the write history.
//!
//! Every property runs at least 1,000 cases (`CASES`); set `PROPTEST_CASES`
//! for more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use concord_core::catalog::Catalog;
use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
use concord_core::crdt::{
    Counter, Crdt, CrdtType, Field, MemberDots, Register, Set, SetHeader, SetOp, Stream, StreamId,
    StreamOp,
};
use concord_core::{Clock, CoreError, Delta, Hlc, Marker, Op, ReplicaId, Value, VersionVector};
use proptest::prelude::*;

const CASES: u32 = 1000;
const T0: i64 = HLC_EPOCH_UNIX_MS + 86_400_000;
const KEYS: usize = 2;

/// At least `CASES` cases; `PROPTEST_CASES` raises it for longer runs.
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: default.cases.max(CASES),
        ..default
    }
}

/// What a client asks a replica to do.
#[derive(Debug, Clone)]
enum Intent {
    CounterAdd(i64),
    SetAdd(Vec<u8>),
    SetRemove(Vec<u8>),
    RegisterSet(u8),
    StreamAppend(u8),
    StreamTrim(u8),
}

impl Intent {
    fn keyspace(&self) -> (&'static str, CrdtType) {
        match self {
            Intent::CounterAdd(_) => ("c", CrdtType::Counter),
            Intent::SetAdd(_) | Intent::SetRemove(_) => ("s", CrdtType::Set),
            Intent::RegisterSet(_) => ("r", CrdtType::Register),
            Intent::StreamAppend(_) | Intent::StreamTrim(_) => ("t", CrdtType::Stream),
        }
    }
}

/// One step of a scenario.
#[derive(Debug, Clone)]
enum Step {
    /// A client write at a replica.
    Write {
        replica: usize,
        key: usize,
        intent: Intent,
    },
    /// `to` receives up to `count` more deltas of `origin`, after `dups`
    /// redeliveries of deltas it already has.
    Sync {
        to: usize,
        origin: usize,
        count: usize,
        dups: usize,
    },
    /// A replica's physical clock moves (possibly backwards).
    Tick { replica: usize, ms: i64 },
}

fn member() -> impl Strategy<Value = Vec<u8>> {
    (0u8..6).prop_map(|m| vec![b'a' + m])
}

fn intent() -> impl Strategy<Value = Intent> {
    prop_oneof![
        (-1_000_000i64..1_000_000).prop_map(Intent::CounterAdd),
        member().prop_map(Intent::SetAdd),
        member().prop_map(Intent::SetRemove),
        any::<u8>().prop_map(Intent::RegisterSet),
        any::<u8>().prop_map(Intent::StreamAppend),
        any::<u8>().prop_map(Intent::StreamTrim),
    ]
}

fn step(replicas: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..replicas, 0..KEYS, intent())
            .prop_map(|(replica, key, intent)| Step::Write { replica, key, intent }),
        3 => (0..replicas, 0..replicas, 1usize..6, 0usize..3)
            .prop_map(|(to, origin, count, dups)| Step::Sync { to, origin, count, dups }),
        1 => (0..replicas, -50i64..200).prop_map(|(replica, ms)| Step::Tick { replica, ms }),
    ]
}

/// A scenario: how many replicas, the steps, and a seed for the final
/// delivery's interleaving.
fn scenario() -> impl Strategy<Value = (usize, Vec<Step>, u64)> {
    (2usize..=4).prop_flat_map(|n| (Just(n), prop::collection::vec(step(n), 1..60), any::<u64>()))
}

/// A tiny deterministic generator for delivery orders (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

type Values = BTreeMap<(String, String), Value>;

struct Replica {
    id: ReplicaId,
    time: Arc<ManualTime>,
    clock: Clock,
    vv: VersionVector,
    values: Values,
    /// This replica's own deltas, seq 1.. at index 0..
    log: Vec<Delta>,
}

/// A set remove: key, members removed, dots observed.
type SetRemoveEvent = (String, Vec<Vec<u8>>, BTreeMap<ReplicaId, u64>);

/// What was acknowledged to clients, for the semantic checks.
#[derive(Default)]
struct History {
    counter_sum: BTreeMap<String, i128>,
    set_adds: Vec<(String, Vec<u8>, ReplicaId, u64)>,
    set_removes: Vec<SetRemoveEvent>,
    register_writes: BTreeMap<String, Vec<(Marker, Vec<u8>)>>,
    stream_appends: BTreeMap<String, Vec<(StreamId, Vec<Field>)>>,
    stream_trims: BTreeMap<String, StreamId>,
}

impl Replica {
    fn new(i: usize) -> Self {
        let time = Arc::new(ManualTime::new(T0));
        let clock = Clock::new(time.clone(), 0, Hlc::ZERO).expect("clock");
        Replica {
            id: ReplicaId(i as u32 + 1),
            time,
            clock,
            vv: VersionVector::new(),
            values: Values::new(),
            log: Vec::new(),
        }
    }

    fn value(&self, ks: &str, key: &str, ty: CrdtType) -> Value {
        self.values
            .get(&(ks.to_string(), key.to_string()))
            .cloned()
            .unwrap_or_else(|| Value::empty(ty))
    }

    /// Applies a delta exactly once, in per-origin order, as a node does.
    fn deliver(&mut self, delta: &Delta) {
        if self.vv.contains(delta.origin, delta.seq) {
            return;
        }
        assert_eq!(
            delta.seq,
            self.vv.get(delta.origin) + 1,
            "harness delivered out of order"
        );
        self.clock
            .observe(delta.hlc)
            .expect("drift is unchecked here");
        let ty = delta.op.crdt_type().expect("value op");
        let through_slice = match (
            self.values
                .get(&(delta.keyspace.clone(), delta.key.clone())),
            &delta.op,
        ) {
            (Some(Value::Set(before)), Op::Set(op)) => {
                Some(apply_through_slice(before, delta.origin, op))
            }
            (None, Op::Set(op)) => Some(apply_through_slice(&Set::default(), delta.origin, op)),
            _ => None,
        };
        let value = self
            .values
            .entry((delta.keyspace.clone(), delta.key.clone()))
            .or_insert_with(|| Value::empty(ty));
        value
            .apply(delta.origin, delta.hlc, &delta.op)
            .expect("in-order delta applies");
        if let (Some(sliced), Value::Set(whole)) = (through_slice, &*value) {
            assert_eq!(&sliced, whole, "a slice applied the operation differently");
        }
        self.vv.advance(delta.origin, delta.seq);
    }

    /// Re-applies an already applied delta straight to its value, bypassing
    /// the version vector: operations must be idempotent.
    fn reapply(&mut self, delta: &Delta) {
        let value = self
            .values
            .get_mut(&(delta.keyspace.clone(), delta.key.clone()))
            .expect("already applied");
        value
            .apply(delta.origin, delta.hlc, &delta.op)
            .expect("reapply");
    }

    /// A client write: prepare from local state, stamp, log, apply.
    fn write(&mut self, key: usize, intent: &Intent, history: &mut History) {
        let (ks, ty) = intent.keyspace();
        let key = format!("k{key}");
        let current = self.value(ks, &key, ty);
        let hlc = self.clock.now().expect("clock");
        let op = match (intent, &current) {
            (Intent::CounterAdd(n), Value::Counter(c)) => {
                *history.counter_sum.entry(key.clone()).or_default() += i128::from(*n);
                Op::Counter(c.prepare_add(self.id, *n).expect("no overflow"))
            }
            (Intent::SetAdd(m), Value::Set(s)) => {
                let op = s.prepare_add(self.id, vec![m.clone()]);
                if let SetOp::Add { dot_counter, .. } = &op {
                    history
                        .set_adds
                        .push((key.clone(), m.clone(), self.id, *dot_counter));
                }
                Op::Set(op)
            }
            (Intent::SetRemove(m), Value::Set(s)) => match prepare_remove_checked(s, m) {
                Some(op) => {
                    if let SetOp::Remove { observed, members } = &op {
                        history
                            .set_removes
                            .push((key.clone(), members.clone(), observed.clone()));
                    }
                    Op::Set(op)
                }
                None => return,
            },
            (Intent::RegisterSet(v), Value::Register(_)) => {
                let value = vec![*v];
                history
                    .register_writes
                    .entry(key.clone())
                    .or_default()
                    .push((Marker::new(hlc, self.id), value.clone()));
                Op::Register(Register::prepare_set(value))
            }
            (Intent::StreamAppend(v), Value::Stream(_)) => {
                let fields = vec![Field::new("v", vec![*v])];
                history
                    .stream_appends
                    .entry(key.clone())
                    .or_default()
                    .push((StreamId::new(hlc, self.id), fields.clone()));
                Op::Stream(Stream::prepare_append(fields))
            }
            (Intent::StreamTrim(pick), Value::Stream(s)) => {
                let entries = s.range(StreamId::MIN, StreamId::MAX, usize::MAX);
                if entries.is_empty() {
                    return;
                }
                let before = entries[*pick as usize % entries.len()].id;
                let op = Stream::prepare_trim(before, hlc).expect("past watermark");
                let w = history.stream_trims.entry(key.clone()).or_default();
                *w = (*w).max(before);
                Op::Stream(op)
            }
            _ => unreachable!("intent and value types match"),
        };
        let delta = Delta {
            origin: self.id,
            seq: self.log.len() as u64 + 1,
            hlc,
            keyspace: ks.to_string(),
            key,
            op,
        };
        // Every delta a replica makes must survive its own encoding.
        let limits = concord_core::Limits::default();
        let bytes = delta.encode_checked(&limits).expect("encodes");
        assert_eq!(Delta::decode(&bytes, &limits).expect("decodes"), delta);
        self.deliver(&delta);
        self.log.push(delta);
    }
}

/// Applies `op` the way a store does: to a slice of `before` holding only
/// the members the operation needs, whose parts then replace those of
/// `before`; returns the whole set put back together.
fn apply_through_slice(before: &Set, origin: ReplicaId, op: &SetOp) -> Set {
    let (header, members) = before.into_parts().expect("parts");
    let named = match op {
        SetOp::Add { members, .. } | SetOp::Remove { members, .. } => members,
    };
    let needed = header.slice_members(named);
    let mut all: BTreeMap<Vec<u8>, _> = members.into_iter().collect();
    let slice_members = needed
        .iter()
        .filter_map(|m| all.get(m).map(|d| (m.clone(), d.clone())));
    let mut slice = Set::from_parts(header, slice_members.collect::<Vec<_>>()).expect("slice");
    slice
        .apply(origin, op)
        .expect("in-order op applies to the slice");
    let (header, touched) = slice.into_parts().expect("parts");
    for m in &needed {
        all.remove(m);
    }
    for (m, d) in touched {
        assert!(
            needed.contains(&m),
            "the slice grew a member it was not given"
        );
        all.insert(m, d);
    }
    Set::from_parts(header, all).expect("whole")
}

/// `prepare_remove` on the whole set, checked against a slice of it.
fn prepare_remove_checked(whole: &Set, member: &[u8]) -> Option<SetOp> {
    let op = whole.prepare_remove(vec![member.to_vec()]);
    let (header, members) = whole.into_parts().expect("parts");
    let needed = header.slice_members(&[member.to_vec()]);
    let slice = Set::from_parts(
        header,
        members.into_iter().filter(|(m, _)| needed.contains(m)),
    )
    .expect("slice");
    assert_eq!(slice.prepare_remove(vec![member.to_vec()]), op);
    op
}

struct Cluster {
    replicas: Vec<Replica>,
    history: History,
}

impl Cluster {
    fn run(n: usize, steps: &[Step]) -> Cluster {
        let mut c = Cluster {
            replicas: (0..n).map(Replica::new).collect(),
            history: History::default(),
        };
        for step in steps {
            match step {
                Step::Write {
                    replica,
                    key,
                    intent,
                } => c.replicas[*replica].write(*key, intent, &mut c.history),
                Step::Sync {
                    to,
                    origin,
                    count,
                    dups,
                } => c.sync(*to, *origin, *count, *dups),
                Step::Tick { replica, ms } => c.replicas[*replica].time.advance(*ms),
            }
        }
        c
    }

    fn sync(&mut self, to: usize, origin: usize, count: usize, dups: usize) {
        if to == origin {
            return;
        }
        let origin_id = self.replicas[origin].id;
        let have = self.replicas[to].vv.get(origin_id) as usize;
        let from = have.saturating_sub(dups);
        let upto = (have + count).min(self.replicas[origin].log.len());
        let deltas: Vec<Delta> = self.replicas[origin].log[from..upto].to_vec();
        for d in &deltas {
            self.replicas[to].deliver(d);
        }
    }

    /// Delivers every remaining delta to every replica in a random
    /// interleaving that keeps per-origin order, with redeliveries and late
    /// idempotent re-applications mixed in.
    fn deliver_all(&mut self, seed: u64) {
        let mut rng = Rng(seed);
        let logs: Vec<Vec<Delta>> = self.replicas.iter().map(|r| r.log.clone()).collect();
        for r in &mut self.replicas {
            loop {
                let pending: Vec<usize> = (0..logs.len())
                    .filter(|&o| (r.vv.get(ReplicaId(o as u32 + 1)) as usize) < logs[o].len())
                    .collect();
                if pending.is_empty() {
                    break;
                }
                let o = pending[rng.below(pending.len())];
                let next = r.vv.get(ReplicaId(o as u32 + 1)) as usize;
                r.deliver(&logs[o][next]);
                match rng.below(4) {
                    0 => r.deliver(&logs[o][rng.below(next + 1)]),
                    1 => r.reapply(&logs[o][rng.below(next + 1)]),
                    _ => {}
                }
            }
        }
    }

    fn states(&self) -> Vec<Values> {
        self.replicas.iter().map(|r| r.values.clone()).collect()
    }
}

/// The three replicas' values of one key, defaulting to empty.
fn three_states(c: &Cluster, ks: &str, ty: CrdtType, key: usize) -> [Value; 3] {
    let key = format!("k{key}");
    let pick = |i: usize| c.replicas[i % c.replicas.len()].value(ks, &key, ty);
    [pick(0), pick(1), pick(2)]
}

fn merged(a: &Value, b: &Value) -> Value {
    let mut out = a.clone();
    out.merge(b).expect("same type");
    out
}

fn check_merge_laws(ks: &str, ty: CrdtType, c: &Cluster) -> Result<(), TestCaseError> {
    for key in 0..KEYS {
        let [a, b, d] = three_states(c, ks, ty, key);
        prop_assert_eq!(merged(&a, &b), merged(&b, &a), "commutativity");
        prop_assert_eq!(
            merged(&merged(&a, &b), &d),
            merged(&a, &merged(&b, &d)),
            "associativity"
        );
        prop_assert_eq!(&merged(&a, &a), &a, "idempotence");
        // Merging is also a join: the result absorbs both sides.
        let ab = merged(&a, &b);
        prop_assert_eq!(&merged(&ab, &a), &ab, "absorption");
    }
    Ok(())
}

fn merge_all(states: &[Values]) -> Values {
    let mut out = Values::new();
    for state in states {
        for (k, v) in state {
            match out.get_mut(k) {
                Some(existing) => existing.merge(v).expect("same type"),
                None => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn merge_laws_counter((n, steps, _) in scenario()) {
        check_merge_laws("c", CrdtType::Counter, &Cluster::run(n, &steps))?;
    }

    #[test]
    fn merge_laws_set((n, steps, _) in scenario()) {
        check_merge_laws("s", CrdtType::Set, &Cluster::run(n, &steps))?;
    }

    #[test]
    fn merge_laws_register((n, steps, _) in scenario()) {
        check_merge_laws("r", CrdtType::Register, &Cluster::run(n, &steps))?;
    }

    #[test]
    fn merge_laws_stream((n, steps, _) in scenario()) {
        check_merge_laws("t", CrdtType::Stream, &Cluster::run(n, &steps))?;
    }

    /// Replicas that receive the same deltas in any per-origin-ordered
    /// interleaving, with duplicates, end identical; and equal to the merge
    /// of the full states the replicas had before the final delivery.
    #[test]
    fn delta_delivery_converges_and_equals_state_merge((n, steps, seed) in scenario()) {
        let mut c = Cluster::run(n, &steps);
        let before = merge_all(&c.states());
        c.deliver_all(seed);
        let states = c.states();
        for s in &states[1..] {
            prop_assert_eq!(s, &states[0]);
        }
        prop_assert_eq!(&states[0], &before);
    }

    /// counter = exact sum of every acknowledged increment.
    #[test]
    fn counter_is_the_exact_sum((n, steps, seed) in scenario()) {
        let mut c = Cluster::run(n, &steps);
        c.deliver_all(seed);
        for r in &c.replicas {
            for key in 0..KEYS {
                let key = format!("k{key}");
                let Value::Counter(v) = r.value("c", &key, CrdtType::Counter) else { unreachable!() };
                let expected = c.history.counter_sum.get(&key).copied().unwrap_or(0);
                prop_assert_eq!(v.value(), expected);
            }
        }
    }

    /// A member is present iff some add of it was not observed by any
    /// remove of it: add-wins, and a remove deletes exactly what it saw.
    #[test]
    fn set_is_add_wins((n, steps, seed) in scenario()) {
        let mut c = Cluster::run(n, &steps);
        c.deliver_all(seed);
        for key in 0..KEYS {
            let key = format!("k{key}");
            let expected: BTreeSet<Vec<u8>> = c.history.set_adds.iter()
                .filter(|(k, _, _, _)| *k == key)
                .filter(|(_, m, origin, dot)| {
                    !c.history.set_removes.iter().any(|(k, members, observed)| {
                        *k == key
                            && members.contains(m)
                            && observed.get(origin).copied().unwrap_or(0) >= *dot
                    })
                })
                .map(|(_, m, _, _)| m.clone())
                .collect();
            for r in &c.replicas {
                let Value::Set(v) = r.value("s", &key, CrdtType::Set) else { unreachable!() };
                let got: BTreeSet<Vec<u8>> = v.members().into_iter().collect();
                prop_assert_eq!(&got, &expected);
            }
        }
    }

    /// register = the acknowledged write with the greatest (HLC, replica).
    #[test]
    fn register_is_the_max_marker_write((n, steps, seed) in scenario()) {
        let mut c = Cluster::run(n, &steps);
        c.deliver_all(seed);
        for key in 0..KEYS {
            let key = format!("k{key}");
            let expected = c.history.register_writes.get(&key)
                .and_then(|w| w.iter().max_by_key(|(m, _)| *m).cloned());
            for r in &c.replicas {
                let Value::Register(v) = r.value("r", &key, CrdtType::Register) else { unreachable!() };
                let got = v.get().map(|(val, m)| (m, val.to_vec()));
                prop_assert_eq!(&got, &expected);
            }
        }
    }

    /// Every acknowledged append at or above the highest trim watermark is
    /// present exactly once, in id order, in every replica.
    #[test]
    fn stream_keeps_every_entry_once_in_order((n, steps, seed) in scenario()) {
        let mut c = Cluster::run(n, &steps);
        c.deliver_all(seed);
        for key in 0..KEYS {
            let key = format!("k{key}");
            let watermark = c.history.stream_trims.get(&key).copied().unwrap_or(StreamId::MIN);
            let mut expected: Vec<(StreamId, Vec<Field>)> = c.history.stream_appends
                .get(&key).cloned().unwrap_or_default()
                .into_iter()
                .filter(|(id, _)| *id >= watermark)
                .collect();
            expected.sort_by_key(|(id, _)| *id);
            for r in &c.replicas {
                let Value::Stream(v) = r.value("t", &key, CrdtType::Stream) else { unreachable!() };
                let got: Vec<(StreamId, Vec<Field>)> = v
                    .range(StreamId::MIN, StreamId::MAX, usize::MAX)
                    .into_iter()
                    .map(|e| (e.id, e.fields))
                    .collect();
                prop_assert_eq!(&got, &expected);
                prop_assert_eq!(v.trimmed_before(), watermark);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Catalog and version vectors are CRDTs too.

fn declaration() -> impl Strategy<Value = (String, CrdtType, Marker)> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        prop::sample::select(CrdtType::ALL.to_vec()),
        0u64..50,
        1u32..4,
    )
        .prop_map(|(n, ty, t, r)| {
            (
                n.to_string(),
                ty,
                Marker::new(Hlc::from_u64(t), ReplicaId(r)),
            )
        })
}

fn catalog() -> impl Strategy<Value = Catalog> {
    prop::collection::vec(declaration(), 0..8).prop_map(|decls| {
        let mut c = Catalog::new();
        for (n, ty, m) in decls {
            c.declare(&n, ty, m);
        }
        c
    })
}

fn vv() -> impl Strategy<Value = VersionVector> {
    prop::collection::vec((1u32..5, 0u64..20), 0..5)
        .prop_map(|v| v.into_iter().map(|(r, s)| (ReplicaId(r), s)).collect())
}

fn join<T: Crdt + Clone>(a: &T, b: &T) -> T {
    let mut out = a.clone();
    out.merge(b);
    out
}

fn vv_join(a: &VersionVector, b: &VersionVector) -> VersionVector {
    let mut out = a.clone();
    out.merge(b);
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn catalog_merge_laws_and_same_resolution_everywhere(a in catalog(), b in catalog(), c in catalog()) {
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(&join(&a, &a), &a);
        // Every declaration survives a merge (no data is orphaned) and each
        // name resolves to its earliest declaration.
        let ab = join(&a, &b);
        for (name, ty, _) in a.declarations().chain(b.declarations()) {
            let alias = concord_core::catalog::alias(name, ty);
            prop_assert!(ab.resolve(&alias).is_some());
            let view = ab.describe(name).expect("declared");
            let earliest = ab.declarations().filter(|(n, _, _)| n == &name).map(|(_, _, m)| m).min();
            prop_assert_eq!(Some(view.created), earliest);
            prop_assert_eq!(view.conflicts.len() + 1, ab.declarations().filter(|(n, _, _)| n == &name).count());
        }
    }

    #[test]
    fn version_vector_merge_laws(a in vv(), b in vv(), c in vv()) {
        prop_assert_eq!(vv_join(&a, &b), vv_join(&b, &a));
        prop_assert_eq!(vv_join(&vv_join(&a, &b), &c), vv_join(&a, &vv_join(&b, &c)));
        prop_assert_eq!(&vv_join(&a, &a), &a);
        prop_assert!(vv_join(&a, &b).dominates(&a));
    }
}

// ---------------------------------------------------------------------------
// The hybrid logical clock.

#[derive(Debug, Clone)]
enum ClockEvent {
    Now,
    /// A remote timestamp this many ms from local physical time.
    Observe(i64, u32),
    /// Physical time jumps (NTP step, VM pause).
    Jump(i64),
    /// The node restarts with its high-water mark.
    Restart,
}

fn clock_event() -> impl Strategy<Value = ClockEvent> {
    prop_oneof![
        4 => Just(ClockEvent::Now),
        3 => (-5_000i64..5_000, 0u32..100).prop_map(|(d, l)| ClockEvent::Observe(d, l)),
        2 => (-10_000i64..10_000).prop_map(ClockEvent::Jump),
        1 => Just(ClockEvent::Restart),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// No timestamp the clock returns is ever at or below one it returned or
    /// accepted before, across time jumps and restarts; remotes beyond the
    /// drift bound are refused and leave the clock unchanged.
    #[test]
    fn hlc_never_goes_backwards(events in prop::collection::vec(clock_event(), 1..200), max_drift in 1u64..3_000) {
        let time = Arc::new(ManualTime::new(T0));
        let mut clock = Clock::new(time.clone(), max_drift, Hlc::ZERO).expect("clock");
        let mut high = Hlc::ZERO;
        for event in events {
            match event {
                ClockEvent::Now => {
                    let t = clock.now().expect("now");
                    prop_assert!(t > high);
                    high = t;
                }
                ClockEvent::Observe(delta_ms, logical) => {
                    let remote_ms = time.now_unix_ms_for_test() + delta_ms;
                    let remote = Hlc::from_parts(remote_ms, logical).expect("in range");
                    let before = clock.last();
                    match clock.observe(remote) {
                        Ok(t) => {
                            prop_assert!(delta_ms <= max_drift as i64);
                            prop_assert!(t > high && t > remote);
                            high = t;
                        }
                        Err(CoreError::ClockDrift { drift_ms, .. }) => {
                            prop_assert!(delta_ms > max_drift as i64);
                            prop_assert_eq!(drift_ms, delta_ms as u64);
                            prop_assert_eq!(clock.last(), before);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                ClockEvent::Jump(ms) => time.advance(ms),
                ClockEvent::Restart => {
                    clock = Clock::new(time.clone(), max_drift, clock.last()).expect("restart");
                }
            }
        }
    }
}

/// Reads a `ManualTime` in tests without naming the trait at every call.
trait ReadTime {
    fn now_unix_ms_for_test(&self) -> i64;
}

impl ReadTime for Arc<ManualTime> {
    fn now_unix_ms_for_test(&self) -> i64 {
        concord_core::PhysicalTime::now_unix_ms(self.as_ref())
    }
}

// ---------------------------------------------------------------------------
// Encodings.

fn op() -> impl Strategy<Value = Op> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..16);
    prop_oneof![
        prop::sample::select(CrdtType::ALL.to_vec()).prop_map(Op::Declare),
        (any::<bool>(), any::<u64>()).prop_map(|(inc, total)| Op::Counter(
            concord_core::crdt::CounterOp {
                direction: if inc {
                    concord_core::crdt::Direction::Increment
                } else {
                    concord_core::crdt::Direction::Decrement
                },
                total,
            }
        )),
        (1u64.., prop::collection::vec(bytes(), 1..4)).prop_map(|(dot_counter, members)| Op::Set(
            SetOp::Add {
                dot_counter,
                members
            }
        )),
        (
            prop::collection::btree_map(any::<u32>().prop_map(ReplicaId), any::<u64>(), 0..4),
            prop::collection::vec(bytes(), 1..4)
        )
            .prop_map(|(observed, members)| Op::Set(SetOp::Remove { observed, members })),
        bytes().prop_map(|value| Op::Register(Register::prepare_set(value))),
        prop::collection::vec(("[a-z]{1,8}", bytes()), 1..4).prop_map(|f| {
            Op::Stream(StreamOp::Append {
                fields: f.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
            })
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(h, r)| Op::Stream(StreamOp::Trim {
            before: StreamId::new(Hlc::from_u64(h), ReplicaId(r)),
        })),
    ]
}

fn delta() -> impl Strategy<Value = Delta> {
    (
        any::<u32>(),
        1u64..,
        any::<u64>(),
        "[a-z][a-z0-9_.-]{0,20}",
        "\\PC{1,20}",
        op(),
    )
        .prop_map(|(origin, seq, hlc, keyspace, key, op)| {
            let key = if matches!(op, Op::Declare(_)) {
                String::new()
            } else {
                key
            };
            Delta {
                origin: ReplicaId(origin),
                seq,
                hlc: Hlc::from_u64(hlc),
                keyspace,
                key,
                op,
            }
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn delta_encoding_round_trips(d in delta()) {
        let limits = concord_core::Limits::default();
        let bytes = d.encode_checked(&limits).expect("valid delta encodes");
        prop_assert_eq!(&Delta::decode(&bytes, &limits).expect("decodes"), &d);
    }

    /// Hostile bytes never panic the decoders; whatever decodes is valid.
    #[test]
    fn hostile_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let limits = concord_core::Limits::default();
        if let Ok(d) = Delta::decode(&bytes, &limits) {
            prop_assert!(d.validate(&limits).is_ok());
        }
        let _ = Value::decode(&bytes);
    }

    /// Valid encodings with a few bytes corrupted never panic the decoders.
    #[test]
    fn corrupted_encodings_never_panic(d in delta(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let limits = concord_core::Limits::default();
        let mut bytes = d.encode();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b | 1;
        }
        if let Ok(d) = Delta::decode(&bytes, &limits) {
            prop_assert!(d.validate(&limits).is_ok());
        }
    }

    /// Full states round-trip through their encoding, and corrupting it
    /// never panics.
    #[test]
    fn value_encoding_round_trips((n, steps, _) in scenario(), flip in any::<(prop::sample::Index, u8)>()) {
        let c = Cluster::run(n, &steps);
        for r in &c.replicas {
            for v in r.values.values() {
                let bytes = v.encode();
                prop_assert_eq!(&Value::decode(&bytes).expect("decodes"), v);
                let mut bad = bytes.clone();
                let at = flip.0.index(bad.len());
                bad[at] ^= flip.1 | 1;
                let _ = Value::decode(&bad);
                if let Value::Set(set) = v {
                    let (header, members) = set.into_parts().expect("parts");
                    let header = SetHeader::decode(&header.encode()).expect("header decodes");
                    let members: Vec<_> = members
                        .into_iter()
                        .map(|(m, d)| (m, MemberDots::decode(&d.encode()).expect("dots decode")))
                        .collect();
                    prop_assert_eq!(&Set::from_parts(header, members).expect("whole"), set);
                }
            }
        }
    }
}

#[test]
fn values_of_other_types_do_not_merge() {
    let mut c = Value::Counter(Counter::default());
    assert!(matches!(
        c.merge(&Value::Set(Set::default())),
        Err(CoreError::TypeMismatch { .. })
    ));
}
