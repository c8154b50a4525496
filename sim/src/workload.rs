//! Clients: random operations of all four types against random regions,
//! and the history of what each was told.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use concord_proto::v1 as pb;
use concord_proto::v1::concord_client::ConcordClient;
use tonic::transport::Channel;

use crate::net;

/// Keyspaces the workload writes, declared in every region's configuration.
pub const COUNTERS: &str = "hits";
/// The set keyspace.
pub const SETS: &str = "tags";
/// The register keyspace.
pub const REGISTERS: &str = "names";
/// The stream keyspace.
pub const STREAMS: &str = "events";

/// Counter keys, set keys, register keys and stream keys.
const COUNTER_KEYS: usize = 4;
const SET_KEYS: usize = 3;
const REGISTER_KEYS: usize = 4;
const STREAM_KEYS: usize = 2;
/// Members drawn from a small pool, so adds and removes of one member
/// from several regions meet often.
const SET_MEMBERS: usize = 8;

/// Longest a client waits for one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One operation a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add `delta` to a counter.
    Incr {
        /// Key.
        key: String,
        /// Amount (never zero).
        delta: i64,
    },
    /// Add a member to a set.
    Add {
        /// Key.
        key: String,
        /// Member.
        member: String,
    },
    /// Remove a member from a set.
    Remove {
        /// Key.
        key: String,
        /// Member.
        member: String,
    },
    /// Write a register; the value is unique in the run.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Append an entry to a stream; its one field's value is unique.
    Append {
        /// Key.
        key: String,
        /// The `tag` field's value.
        tag: String,
    },
    /// Read a counter (not checked; exercises the read path).
    Read {
        /// Key.
        key: String,
    },
}

/// What a client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The write was acknowledged with this HLC (for an append, its
    /// entry id's HLC; the replica is the region's).
    Acked {
        /// The write's HLC.
        hlc: u64,
    },
    /// A read's value.
    Value(i64),
    /// No answer, or an error: the write may or may not have happened.
    Failed(&'static str),
}

/// One operation and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Which client.
    pub client: usize,
    /// Which region (index in the plan).
    pub region: usize,
    /// Simulated milliseconds from the start when it was sent.
    pub issued_ms: u64,
    /// Simulated milliseconds from the start when the answer came.
    pub completed_ms: u64,
    /// The operation.
    pub op: Op,
    /// The answer.
    pub answer: Answer,
}

impl Record {
    /// The write's HLC, if it was acknowledged.
    pub fn acked_hlc(&self) -> Option<u64> {
        match self.answer {
            Answer::Acked { hlc } => Some(hlc),
            _ => None,
        }
    }

    /// Whether this is a write whose outcome is unknown.
    pub fn failed(&self) -> bool {
        matches!(self.answer, Answer::Failed(_))
    }
}

/// Every client's records, in the order the answers came.
pub type History = Rc<RefCell<Vec<Record>>>;

/// Simulated milliseconds since the start of the run.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs client `id` until `until_ms`: picks a region among the first
/// `regions` (which grows when a region joins), an operation, sends it,
/// records the answer, and waits a little.
pub async fn client(
    id: usize,
    seed: u64,
    names: Vec<&'static str>,
    regions: Rc<Cell<usize>>,
    until_ms: u64,
    history: History,
) -> turmoil::Result {
    let mut rng =
        fastrand::Rng::with_seed(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut clients: Vec<Option<ConcordClient<Channel>>> = vec![None; names.len()];
    let mut n = 0u64;
    while now_ms() < until_ms {
        let region = rng.usize(..regions.get().clamp(1, names.len()));
        let client = clients[region].get_or_insert_with(|| {
            ConcordClient::new(net::channel(names[region], REQUEST_TIMEOUT))
        });
        n += 1;
        let op = draw(&mut rng, id, n);
        let issued_ms = now_ms();
        let answer = send(client, &op).await;
        history.borrow_mut().push(Record {
            client: id,
            region,
            issued_ms,
            completed_ms: now_ms(),
            op,
            answer,
        });
        tokio::time::sleep(Duration::from_millis(rng.u64(5..=60))).await;
    }
    Ok(())
}

fn draw(rng: &mut fastrand::Rng, id: usize, n: u64) -> Op {
    let tag = format!("c{id}-{n}");
    match rng.u32(..100) {
        0..=24 => Op::Incr {
            key: format!("k{}", rng.usize(..COUNTER_KEYS)),
            delta: if rng.u32(..4) == 0 {
                -rng.i64(1..=5)
            } else {
                rng.i64(1..=10)
            },
        },
        25..=41 => Op::Add {
            key: format!("s{}", rng.usize(..SET_KEYS)),
            member: format!("m{}", rng.usize(..SET_MEMBERS)),
        },
        42..=54 => Op::Remove {
            key: format!("s{}", rng.usize(..SET_KEYS)),
            member: format!("m{}", rng.usize(..SET_MEMBERS)),
        },
        55..=74 => Op::Put {
            key: format!("n{}", rng.usize(..REGISTER_KEYS)),
            value: tag,
        },
        75..=94 => Op::Append {
            key: format!("e{}", rng.usize(..STREAM_KEYS)),
            tag,
        },
        _ => Op::Read {
            key: format!("k{}", rng.usize(..COUNTER_KEYS)),
        },
    }
}

/// The field name of the appended entries.
pub const TAG_FIELD: &str = "tag";

async fn send(client: &mut ConcordClient<Channel>, op: &Op) -> Answer {
    let hlc = |w: Option<pb::WriteResponse>| match w {
        Some(w) => Answer::Acked { hlc: w.hlc },
        None => Answer::Failed("NO_WRITE_IN_ANSWER"),
    };
    let answer = match op.clone() {
        Op::Incr { key, delta } => client
            .counter_increment(pb::CounterIncrementRequest {
                keyspace: COUNTERS.into(),
                key,
                delta,
            })
            .await
            .map(|r| hlc(r.into_inner().write)),
        Op::Add { key, member } => client
            .set_add(pb::SetAddRequest {
                keyspace: SETS.into(),
                key,
                members: vec![member.into_bytes()],
            })
            .await
            .map(|r| hlc(Some(r.into_inner()))),
        Op::Remove { key, member } => client
            .set_remove(pb::SetRemoveRequest {
                keyspace: SETS.into(),
                key,
                members: vec![member.into_bytes()],
            })
            .await
            .map(|r| hlc(Some(r.into_inner()))),
        Op::Put { key, value } => client
            .register_set(pb::RegisterSetRequest {
                keyspace: REGISTERS.into(),
                key,
                value: value.into_bytes(),
            })
            .await
            .map(|r| hlc(Some(r.into_inner()))),
        Op::Append { key, tag } => client
            .stream_append(pb::StreamAppendRequest {
                keyspace: STREAMS.into(),
                key,
                fields: vec![pb::StreamField {
                    name: TAG_FIELD.into(),
                    value: tag.into_bytes(),
                }],
            })
            .await
            .map(|r| hlc(r.into_inner().write)),
        Op::Read { key } => client
            .counter_get(pb::CounterGetRequest {
                keyspace: COUNTERS.into(),
                key,
            })
            .await
            .map(|r| Answer::Value(r.into_inner().value)),
    };
    answer.unwrap_or_else(|status| Answer::Failed(concord_proto::code_name(status.code())))
}
