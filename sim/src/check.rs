//! The checkers: full dumps of every replica compared, and every
//! acknowledged write looked for with its type's semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use concord_core::catalog::KeyspaceId;
use concord_core::crdt::{CrdtType, Value};
use concord_core::VersionVector;
use concord_store::Store;

use crate::workload::{Answer, Op, Record, COUNTERS, REGISTERS, SETS, STREAMS, TAG_FIELD};

/// Bytes that print as text when they are UTF-8.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

/// A stream entry: its id (HLC, replica) and its fields.
pub type Entry = ((u64, u32), Vec<(String, Bytes)>);

/// One key's value, in a form that compares by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// A counter's value.
    Counter(i128),
    /// A set's members, sorted.
    Set(Vec<Bytes>),
    /// A register's value and marker (HLC, replica), if set.
    Register(Option<(u64, u32, Bytes)>),
    /// A stream's entries: id (HLC, replica) and fields.
    Stream(Vec<Entry>),
}

/// Everything one replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    /// What it has applied of each origin.
    pub applied: VersionVector,
    /// Its keyspace declarations: name, type, marker.
    pub catalog: Vec<(String, String, u64, u32)>,
    /// Every key of every keyspace.
    pub values: BTreeMap<(String, String, String), Rendered>,
}

/// Keys read per scan call.
const SCAN_CHUNK: usize = 256;

/// Reads every keyspace and key of `store`.
pub fn dump(store: &Store) -> Result<Dump, String> {
    let err = |e: concord_store::StoreError| e.to_string();
    let applied = store.version_vector().map_err(err)?;
    let catalog = store.catalog().map_err(err)?;
    let mut declarations = Vec::new();
    let mut values = BTreeMap::new();
    for (name, ty, marker) in catalog.declarations() {
        declarations.push((
            name.to_string(),
            ty.to_string(),
            marker.hlc.as_u64(),
            marker.replica.0,
        ));
        let ks = KeyspaceId {
            name: name.to_string(),
            ty,
        };
        let mut after: Option<String> = None;
        loop {
            let chunk = store.scan(&ks, after.as_deref(), SCAN_CHUNK).map_err(err)?;
            let full = chunk.len() == SCAN_CHUNK;
            for (key, value) in chunk {
                // A stream's value holds its watermark; its entries are
                // rows of their own.
                let rendered = match value {
                    Value::Stream(_) => {
                        render(Value::Stream(store.stream(&ks, &key).map_err(err)?))
                    }
                    value => render(value),
                };
                values.insert((name.to_string(), ty.to_string(), key.clone()), rendered);
                after = Some(key);
            }
            if !full {
                break;
            }
        }
    }
    declarations.sort();
    Ok(Dump {
        applied,
        catalog: declarations,
        values,
    })
}

fn render(value: Value) -> Rendered {
    match value {
        Value::Counter(c) => Rendered::Counter(c.value()),
        Value::Set(s) => Rendered::Set(s.members().into_iter().map(Bytes).collect()),
        Value::Register(r) => Rendered::Register(
            r.get()
                .map(|(v, m)| (m.hlc.as_u64(), m.replica.0, Bytes(v.to_vec()))),
        ),
        Value::Stream(s) => Rendered::Stream(
            s.entries()
                .map(|(id, fields)| {
                    let fields = fields
                        .iter()
                        .map(|f| (f.name.clone(), Bytes(f.value.clone())))
                        .collect();
                    ((id.hlc.as_u64(), id.replica.0), fields)
                })
                .collect(),
        ),
    }
}

/// The first difference between two dumps, if any.
pub fn difference(a: &Dump, b: &Dump) -> Option<String> {
    if a.applied != b.applied {
        return Some(format!("applied {:?} vs {:?}", a.applied, b.applied));
    }
    if a.catalog != b.catalog {
        return Some(format!("catalog {:?} vs {:?}", a.catalog, b.catalog));
    }
    let keys: BTreeSet<_> = a.values.keys().chain(b.values.keys()).collect();
    for k in keys {
        let (x, y) = (a.values.get(k), b.values.get(k));
        if x != y {
            return Some(format!("{}/{}: {x:?} vs {y:?}", k.0, k.2));
        }
    }
    None
}

fn get<'a>(dump: &'a Dump, keyspace: &str, ty: CrdtType, key: &str) -> Option<&'a Rendered> {
    dump.values
        .get(&(keyspace.to_string(), ty.to_string(), key.to_string()))
}

/// Checks that `dump` (of a converged replica) holds every acknowledged
/// write of `history`, with its type's semantics; `replicas` maps region
/// index to replica id. Returns the violations.
pub fn acknowledged_writes(dump: &Dump, history: &[Record], replicas: &[u32]) -> Vec<String> {
    let mut violations = Vec::new();
    counters(dump, history, &mut violations);
    sets(dump, history, &mut violations);
    registers(dump, history, replicas, &mut violations);
    streams(dump, history, replicas, &mut violations);
    violations
}

fn counters(dump: &Dump, history: &[Record], violations: &mut Vec<String>) {
    // (acknowledged sum, unknown negative sum, unknown positive sum)
    let mut expected: BTreeMap<&str, (i128, i128, i128)> = BTreeMap::new();
    for r in history {
        if let Op::Incr { key, delta } = &r.op {
            let e = expected.entry(key).or_default();
            let d = i128::from(*delta);
            match r.answer {
                Answer::Acked { .. } => e.0 += d,
                _ if d < 0 => e.1 += d,
                _ => e.2 += d,
            }
        }
    }
    for (key, (acked, neg, pos)) in expected {
        let value = match get(dump, COUNTERS, CrdtType::Counter, key) {
            Some(Rendered::Counter(v)) => *v,
            None => 0,
            Some(other) => {
                violations.push(format!("counter {key} holds {other:?}"));
                continue;
            }
        };
        if !(acked + neg..=acked + pos).contains(&value) {
            violations.push(format!(
                "counter {key} = {value}: acknowledged increments sum to {acked}, with {neg}..={pos} of unknown outcome"
            ));
        }
    }
}

/// The adds and the removes of one member.
type AddsAndRemoves<'a> = (Vec<&'a Record>, Vec<&'a Record>);

fn sets(dump: &Dump, history: &[Record], violations: &mut Vec<String>) {
    // Per (key, member): the adds and removes sent.
    let mut ops: BTreeMap<(&str, &str), AddsAndRemoves> = BTreeMap::new();
    for r in history {
        match &r.op {
            Op::Add { key, member } => ops.entry((key, member)).or_default().0.push(r),
            Op::Remove { key, member } => ops.entry((key, member)).or_default().1.push(r),
            _ => {}
        }
    }
    let mut keys: BTreeSet<&str> = ops.keys().map(|(k, _)| *k).collect();
    for (ks, ty, key) in dump.values.keys() {
        if ks == SETS && *ty == CrdtType::Set.to_string() {
            keys.insert(key);
        }
    }
    for key in keys {
        let members: BTreeSet<Vec<u8>> = match get(dump, SETS, CrdtType::Set, key) {
            Some(Rendered::Set(m)) => m.iter().map(|b| b.0.clone()).collect(),
            None => BTreeSet::new(),
            Some(other) => {
                violations.push(format!("set {key} holds {other:?}"));
                continue;
            }
        };
        for member in &members {
            let name = String::from_utf8_lossy(member);
            if !ops.contains_key(&(key, name.as_ref())) {
                violations.push(format!("set {key} holds {name:?}, which no client added"));
            }
        }
        for ((k, member), (adds, removes)) in ops.range((key, "")..) {
            if *k != key {
                break;
            }
            // An acknowledged add must survive unless some remove that
            // might have run (acknowledged, or of unknown outcome) could
            // have observed it: one that ended after the add was sent.
            let must = adds.iter().find(|a| {
                matches!(a.answer, Answer::Acked { .. })
                    && removes.iter().all(|x| match x.answer {
                        Answer::Acked { .. } => x.completed_ms < a.issued_ms,
                        _ => false,
                    })
            });
            if let Some(add) = must {
                if !members.contains(member.as_bytes()) {
                    violations.push(format!(
                        "set {key} lost {member:?}: added by client {} in region {} at {} ms (acknowledged), and no remove could have observed that add",
                        add.client, add.region, add.issued_ms
                    ));
                }
            }
        }
    }
}

fn registers(dump: &Dump, history: &[Record], replicas: &[u32], violations: &mut Vec<String>) {
    let mut writes: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in history {
        if let Op::Put { key, .. } = &r.op {
            writes.entry(key).or_default().push(r);
        }
    }
    for (key, writes) in writes {
        let best = writes
            .iter()
            .filter_map(|w| w.acked_hlc().map(|h| ((h, replicas[w.region]), w)))
            .max_by_key(|(marker, _)| *marker);
        let held = match get(dump, REGISTERS, CrdtType::Register, key) {
            Some(Rendered::Register(v)) => v.clone(),
            None => None,
            Some(other) => {
                violations.push(format!("register {key} holds {other:?}"));
                continue;
            }
        };
        let Some((hlc, replica, value)) = held else {
            if best.is_some() {
                violations.push(format!("register {key} is empty after acknowledged writes"));
            }
            continue;
        };
        let value = String::from_utf8_lossy(&value.0).into_owned();
        let Some(source) = writes
            .iter()
            .find(|w| matches!(&w.op, Op::Put { value: v, .. } if *v == value))
        else {
            violations.push(format!(
                "register {key} holds {value:?}, which no client wrote"
            ));
            continue;
        };
        if replicas[source.region] != replica {
            violations.push(format!(
                "register {key} holds {value:?} under replica {replica}, but it was written in replica {}",
                replicas[source.region]
            ));
        }
        if let Some(h) = source.acked_hlc() {
            if h != hlc {
                violations.push(format!(
                    "register {key} holds {value:?} at HLC {hlc}, but its write was acknowledged at {h}"
                ));
            }
        }
        if let Some(((best_hlc, best_replica), w)) = best {
            if (hlc, replica) < (best_hlc, best_replica) {
                violations.push(format!(
                    "register {key} holds {value:?} ({hlc}, {replica}), older than the acknowledged write {:?} ({best_hlc}, {best_replica})",
                    w.op
                ));
            }
        }
    }
}

fn streams(dump: &Dump, history: &[Record], replicas: &[u32], violations: &mut Vec<String>) {
    let mut appends: BTreeMap<&str, BTreeMap<&str, &Record>> = BTreeMap::new();
    for r in history {
        if let Op::Append { key, tag } = &r.op {
            appends.entry(key).or_default().insert(tag, r);
        }
    }
    for (key, sent) in appends {
        let entries = match get(dump, STREAMS, CrdtType::Stream, key) {
            Some(Rendered::Stream(e)) => e.clone(),
            None => Vec::new(),
            Some(other) => {
                violations.push(format!("stream {key} holds {other:?}"));
                continue;
            }
        };
        let mut seen: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        for (id, fields) in &entries {
            let tag = match fields.as_slice() {
                [(name, value)] if name == TAG_FIELD => {
                    String::from_utf8_lossy(&value.0).into_owned()
                }
                _ => {
                    violations.push(format!("stream {key} entry {id:?} has fields {fields:?}"));
                    continue;
                }
            };
            let Some(source) = sent.get(tag.as_str()) else {
                violations.push(format!(
                    "stream {key} holds {tag:?}, which no client appended"
                ));
                continue;
            };
            if seen.insert(tag.clone(), *id).is_some() {
                violations.push(format!("stream {key} holds {tag:?} twice"));
            }
            if let Some(h) = source.acked_hlc() {
                if *id != (h, replicas[source.region]) {
                    violations.push(format!(
                        "stream {key} holds {tag:?} as {id:?}, but it was acknowledged as ({h}, {})",
                        replicas[source.region]
                    ));
                }
            }
        }
        for (tag, r) in sent {
            if r.acked_hlc().is_some() && !seen.contains_key(tag) {
                violations.push(format!(
                    "stream {key} lost {tag:?}, acknowledged by region {} at {} ms",
                    r.region, r.completed_ms
                ));
            }
        }
    }
}

/// The history of a relaxed run as the checks must read it: a power cut
/// may lose what a region acknowledged since its last flush (a flush
/// started after a write's answer covers it), so those writes count as of
/// unknown outcome. `power_cuts[r]` and `flushes[r]` are region `r`'s, in
/// simulated time from the start.
///
/// Sound because a simulated flush takes no simulated time (it starts
/// when it returns: [`crate::disk::SimDisk::flushes`]) and a power cut
/// first cuts the region's links, so no answer of it arrives after the
/// cut.
pub fn lost_to_power_cuts(
    history: &[Record],
    power_cuts: &[Vec<std::time::Duration>],
    flushes: &[Vec<std::time::Duration>],
) -> Vec<Record> {
    let mut history = history.to_vec();
    let ms = |d: &std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    for (r, cuts) in power_cuts.iter().enumerate() {
        let flushed = flushes.get(r).map(Vec::as_slice).unwrap_or_default();
        for cut in cuts {
            let since = flushed.iter().filter(|f| *f <= cut).max().map_or(0, ms);
            for record in history.iter_mut().filter(|x| x.region == r) {
                let window = (since..=ms(cut)).contains(&record.completed_ms);
                if window && record.acked_hlc().is_some() {
                    record.answer = Answer::Failed(
                        "acknowledged, then lost in a power cut before a flush (relaxed)",
                    );
                }
            }
        }
    }
    history
}

/// Checks that each region stamped its acknowledged writes with strictly
/// increasing HLCs in real-time order: a write sent after another was
/// acknowledged by the same region has a greater HLC, across restarts too.
pub fn hlc_order(history: &[Record], regions: usize) -> Vec<String> {
    let mut violations = Vec::new();
    for region in 0..regions {
        let mut acked: Vec<(u64, u64, u64)> = history
            .iter()
            .filter(|r| r.region == region)
            .filter_map(|r| r.acked_hlc().map(|h| (r.completed_ms, r.issued_ms, h)))
            .filter(|(_, _, h)| *h > 0)
            .collect();
        acked.sort_unstable();
        let mut by_issue: Vec<(u64, u64)> = acked.iter().map(|&(_, i, h)| (i, h)).collect();
        by_issue.sort_unstable();
        // Walk writes by send time, keeping the greatest HLC of the writes
        // acknowledged strictly before it.
        let mut done = 0;
        let mut max_before: Option<u64> = None;
        for (issued, hlc) in by_issue {
            while done < acked.len() && acked[done].0 < issued {
                max_before = max_before.max(Some(acked[done].2));
                done += 1;
            }
            if let Some(m) = max_before {
                if hlc <= m {
                    violations.push(format!(
                        "region {region} acknowledged HLC {hlc} for a write sent at {issued} ms, not above HLC {m} of a write it acknowledged before"
                    ));
                }
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(region: usize, issued_ms: u64, completed_ms: u64, op: Op, answer: Answer) -> Record {
        Record {
            client: 0,
            region,
            issued_ms,
            completed_ms,
            op,
            answer,
        }
    }

    fn dump(values: Vec<(&str, CrdtType, &str, Rendered)>) -> Dump {
        Dump {
            applied: VersionVector::new(),
            catalog: Vec::new(),
            values: values
                .into_iter()
                .map(|(ks, ty, k, v)| ((ks.to_string(), ty.to_string(), k.to_string()), v))
                .collect(),
        }
    }

    const ACK: Answer = Answer::Acked { hlc: 1 };
    const LOST: Answer = Answer::Failed("UNAVAILABLE");

    fn incr(delta: i64, answer: Answer) -> Record {
        record(
            0,
            0,
            1,
            Op::Incr {
                key: "k".into(),
                delta,
            },
            answer,
        )
    }

    #[test]
    fn counter_must_hold_acknowledged_sum_within_unknowns() {
        let history = [incr(5, ACK), incr(3, LOST), incr(-2, LOST)];
        for (value, ok) in [(3, true), (5, true), (8, true), (2, false), (9, false)] {
            let d = dump(vec![(
                COUNTERS,
                CrdtType::Counter,
                "k",
                Rendered::Counter(value),
            )]);
            assert_eq!(
                acknowledged_writes(&d, &history, &[1]).is_empty(),
                ok,
                "value {value}"
            );
        }
    }

    fn set_op(add: bool, issued: u64, completed: u64, answer: Answer) -> Record {
        let (key, member) = ("s".to_string(), "m".to_string());
        let op = if add {
            Op::Add { key, member }
        } else {
            Op::Remove { key, member }
        };
        record(0, issued, completed, op, answer)
    }

    #[test]
    fn set_keeps_an_add_no_remove_could_have_observed() {
        let absent = dump(vec![(SETS, CrdtType::Set, "s", Rendered::Set(vec![]))]);
        let present = dump(vec![(
            SETS,
            CrdtType::Set,
            "s",
            Rendered::Set(vec![Bytes(b"m".to_vec())]),
        )]);
        // The remove ended before the add was sent: the add must survive.
        let history = [set_op(false, 1, 5, ACK), set_op(true, 10, 11, ACK)];
        assert!(!acknowledged_writes(&absent, &history, &[1]).is_empty());
        assert!(acknowledged_writes(&present, &history, &[1]).is_empty());
        // A remove that ended after the add was sent may have observed it.
        let history = [set_op(true, 10, 11, ACK), set_op(false, 9, 20, ACK)];
        assert!(acknowledged_writes(&absent, &history, &[1]).is_empty());
        // So may a remove of unknown outcome.
        let history = [set_op(false, 1, 5, LOST), set_op(true, 10, 11, ACK)];
        assert!(acknowledged_writes(&absent, &history, &[1]).is_empty());
        // A member nobody added is a violation.
        assert!(!acknowledged_writes(&present, &[], &[1]).is_empty());
    }

    fn put(region: usize, value: &str, answer: Answer) -> Record {
        record(
            region,
            0,
            1,
            Op::Put {
                key: "n".into(),
                value: value.into(),
            },
            answer,
        )
    }

    #[test]
    fn register_holds_the_greatest_acknowledged_write() {
        let history = [
            put(0, "a", Answer::Acked { hlc: 10 }),
            put(1, "b", Answer::Acked { hlc: 20 }),
        ];
        let holding = |hlc, replica, value: &str| {
            dump(vec![(
                REGISTERS,
                CrdtType::Register,
                "n",
                Rendered::Register(Some((hlc, replica, Bytes(value.as_bytes().to_vec())))),
            )])
        };
        let replicas = [1, 2];
        assert!(acknowledged_writes(&holding(20, 2, "b"), &history, &replicas).is_empty());
        assert!(!acknowledged_writes(&holding(10, 1, "a"), &history, &replicas).is_empty());
        assert!(!acknowledged_writes(&holding(20, 2, "z"), &history, &replicas).is_empty());
        assert!(!acknowledged_writes(&holding(21, 2, "b"), &history, &replicas).is_empty());
    }

    fn append(tag: &str, hlc: u64) -> Record {
        record(
            0,
            0,
            1,
            Op::Append {
                key: "e".into(),
                tag: tag.into(),
            },
            Answer::Acked { hlc },
        )
    }

    fn entry(hlc: u64, tag: &str) -> Entry {
        (
            (hlc, 1),
            vec![(TAG_FIELD.to_string(), Bytes(tag.as_bytes().to_vec()))],
        )
    }

    #[test]
    fn stream_holds_every_acknowledged_entry_once() {
        let history = [append("a", 10), append("b", 11)];
        let stream = |entries| {
            dump(vec![(
                STREAMS,
                CrdtType::Stream,
                "e",
                Rendered::Stream(entries),
            )])
        };
        let good = stream(vec![entry(10, "a"), entry(11, "b")]);
        assert!(acknowledged_writes(&good, &history, &[1]).is_empty());
        let lost = stream(vec![entry(10, "a")]);
        assert!(!acknowledged_writes(&lost, &history, &[1]).is_empty());
        let twice = stream(vec![entry(10, "a"), entry(11, "b"), entry(12, "b")]);
        assert!(!acknowledged_writes(&twice, &history, &[1]).is_empty());
        let moved = stream(vec![entry(10, "a"), entry(13, "b")]);
        assert!(!acknowledged_writes(&moved, &history, &[1]).is_empty());
    }

    #[test]
    fn a_power_cut_excuses_only_what_a_relaxed_region_acknowledged_since_its_last_flush() {
        let ms = Duration::from_millis;
        let at = |region, completed| {
            record(
                region,
                completed - 1,
                completed,
                Op::Read { key: "k".into() },
                Answer::Acked { hlc: 1 },
            )
        };
        let history = vec![at(0, 90), at(0, 100), at(0, 150), at(0, 250), at(1, 150)];
        let cuts = vec![vec![ms(200)], vec![]];
        let flushes = vec![vec![ms(50), ms(100), ms(300)], vec![]];
        let seen = lost_to_power_cuts(&history, &cuts, &flushes);
        let excused: Vec<(usize, u64)> = seen
            .iter()
            .filter(|r| r.failed())
            .map(|r| (r.region, r.completed_ms))
            .collect();
        // Flushed before the cut: 90 (flush at 100 started after it).
        // In doubt: answered at or after the last flush before the cut
        // (100), up to the cut. After the cut, and other regions: kept.
        assert_eq!(excused, vec![(0, 100), (0, 150)]);
    }

    #[test]
    fn hlc_order_follows_real_time_per_region() {
        let w = |region, issued, completed, hlc| {
            record(
                region,
                issued,
                completed,
                Op::Incr {
                    key: "k".into(),
                    delta: 1,
                },
                Answer::Acked { hlc },
            )
        };
        // Overlapping writes may be stamped in either order.
        assert!(hlc_order(&[w(0, 0, 10, 50), w(0, 5, 6, 40)], 1).is_empty());
        // A write sent after another was acknowledged must be stamped later.
        assert!(!hlc_order(&[w(0, 0, 10, 50), w(0, 11, 12, 40)], 1).is_empty());
        // Regions are independent.
        assert!(hlc_order(&[w(0, 0, 10, 50), w(1, 11, 12, 40)], 2).is_empty());
    }
}
