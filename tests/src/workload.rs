//! Concurrent writes of all four types against one region each, recording
//! every acknowledged write (and how much is of unknown outcome), and the
//! checks that every region ends identical with every acknowledged write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_client::{Client, ClientOptions, Error, KeyspaceType, StreamId};
use tokio::time::Instant;

/// Counter keys, set keys, register keys and stream keys written.
pub const KEYS: usize = 4;

/// What the writers were told.
#[derive(Debug, Default)]
pub struct Record {
    /// Acknowledged increments per counter key.
    pub counter_acked: BTreeMap<String, i64>,
    /// Increments of unknown outcome per counter key.
    pub counter_unknown: BTreeMap<String, i64>,
    /// Acknowledged set adds per key.
    pub set_acked: BTreeMap<String, BTreeSet<String>>,
    /// The acknowledged register write with the greatest (HLC, replica)
    /// per key, with its value.
    pub register_max: BTreeMap<String, (u64, u32, String)>,
    /// Acknowledged stream appends per key.
    pub stream_acked: BTreeMap<String, Vec<StreamId>>,
    /// Writes acknowledged.
    pub acked: u64,
    /// Writes whose outcome is unknown.
    pub unknown: u64,
}

impl Record {
    /// Takes in the record of a region allowed to lose its last
    /// acknowledged writes (relaxed durability, killed): its increments
    /// count as of unknown outcome, and its other writes are not required.
    pub fn absorb_lossy(&mut self, lossy: Record) {
        for (k, n) in lossy.counter_acked.into_iter().chain(lossy.counter_unknown) {
            *self.counter_unknown.entry(k).or_default() += n;
        }
        self.unknown += lossy.acked + lossy.unknown;
    }
}

/// Shared record of every writer.
pub type Shared = Arc<Mutex<Record>>;

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

/// Declares the workload's keyspaces in the region at `endpoint`.
pub async fn declare(endpoint: &str) {
    let client = Client::connect_with([endpoint.to_string()], options())
        .await
        .expect("connect");
    for (name, ty) in [
        ("hits", KeyspaceType::Counter),
        ("tags", KeyspaceType::Set),
        ("names", KeyspaceType::Register),
        ("events", KeyspaceType::Stream),
    ] {
        client.create_keyspace(name, ty).await.expect("declare");
    }
}

fn lock(record: &Shared) -> std::sync::MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes to the region at `endpoint` (replica `replica`) until
/// `until`, round-robin over the four types, recording every answer. A
/// failed write is recorded as of unknown outcome and never retried.
pub async fn write(endpoint: String, replica: u32, until: Instant, record: Shared) {
    let mut client = None;
    let mut i: u64 = 0;
    while Instant::now() < until {
        if client.is_none() {
            client = Client::connect_with([endpoint.clone()], options())
                .await
                .ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let Some(c) = client.as_ref() else { continue };
        i += 1;
        let key = (i as usize / 4) % KEYS;
        let tag = format!("r{replica}-{i}");
        let failed: Option<Error> = match i % 4 {
            0 => {
                let k = format!("k{key}");
                match c.counter("hits").incr(&k, 1).await {
                    Ok(_) => {
                        *lock(&record).counter_acked.entry(k).or_default() += 1;
                        None
                    }
                    Err(e) => {
                        *lock(&record).counter_unknown.entry(k).or_default() += 1;
                        Some(e)
                    }
                }
            }
            1 => {
                let k = format!("s{key}");
                match c.set("tags").add(&k, [&tag]).await {
                    Ok(_) => {
                        lock(&record).set_acked.entry(k).or_default().insert(tag);
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            2 => {
                let k = format!("n{key}");
                match c.register("names").set(&k, &tag).await {
                    Ok(ack) => {
                        let mut r = lock(&record);
                        let best = r.register_max.entry(k).or_insert((0, 0, String::new()));
                        if (ack.hlc, replica) > (best.0, best.1) {
                            *best = (ack.hlc, replica, tag);
                        }
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            _ => {
                let k = format!("e{}", key % 2);
                match c.stream("events").append(&k, [("from", &tag)]).await {
                    Ok(id) => {
                        lock(&record).stream_acked.entry(k).or_default().push(id);
                        None
                    }
                    Err(e) => Some(e),
                }
            }
        };
        {
            let mut r = lock(&record);
            match failed {
                None => r.acked += 1,
                Some(_) => r.unknown += 1,
            }
        }
        if failed.is_some() {
            // The region may be down: back off, reconnect.
            client = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until every region at `endpoints` has applied the same vector.
pub async fn converge(endpoints: &[String], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut vvs = Vec::new();
        for e in endpoints {
            let vv = match Client::connect_with([e.clone()], options()).await {
                Ok(c) => c
                    .status()
                    .await
                    .ok()
                    .and_then(|s| s.applied)
                    .map(|a| a.seqs),
                Err(_) => None,
            };
            vvs.push(vv);
        }
        if vvs.iter().all(Option::is_some) && vvs.windows(2).all(|w| w[0] == w[1]) {
            return Ok(());
        }
        last = vvs;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("no convergence within {within:?}: {last:?}"))
}

/// Everything the workload's keys hold in one region, as text.
pub async fn dump(endpoint: &str) -> Vec<String> {
    let c = Client::connect_with([endpoint.to_string()], options())
        .await
        .expect("connect");
    let mut out = Vec::new();
    for k in 0..KEYS {
        let v = c.counter("hits").get(&format!("k{k}")).await.expect("get");
        out.push(format!("hits/k{k} = {v}"));
        let m = c
            .set("tags")
            .members(&format!("s{k}"))
            .await
            .expect("members");
        out.push(format!("tags/s{k} = {m:?}"));
        let r = c
            .register("names")
            .get(&format!("n{k}"))
            .await
            .expect("get");
        out.push(format!("names/n{k} = {r:?}"));
    }
    for k in 0..2 {
        let e = c
            .stream("events")
            .range(&format!("e{k}"), None, None, 0)
            .await
            .expect("range");
        for entry in e {
            out.push(format!("events/e{k} {} {:?}", entry.id, entry.fields));
        }
    }
    out
}

/// Checks that every region holds the same, and that it has every
/// acknowledged write with its type's semantics.
pub async fn check(endpoints: &[String], record: &Record) {
    let dumps: Vec<Vec<String>> = {
        let mut d = Vec::new();
        for e in endpoints {
            d.push(dump(e).await);
        }
        d
    };
    for (i, d) in dumps.iter().enumerate().skip(1) {
        assert_eq!(&dumps[0], d, "region 0 and region {i} differ");
    }
    let c = Client::connect_with([endpoints[0].clone()], options())
        .await
        .expect("connect");
    for (k, acked) in &record.counter_acked {
        let unknown = record.counter_unknown.get(k).copied().unwrap_or(0);
        let v = c.counter("hits").get(k).await.expect("get");
        assert!(
            (*acked..=acked + unknown).contains(&v),
            "counter {k} = {v}: {acked} acknowledged increments, {unknown} of unknown outcome"
        );
    }
    for (k, members) in &record.set_acked {
        let have: BTreeSet<String> = c
            .set("tags")
            .members(k)
            .await
            .expect("members")
            .into_iter()
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .collect();
        let missing: Vec<&String> = members.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "set {k} lost acknowledged adds {missing:?}"
        );
    }
    for (k, (hlc, replica, value)) in &record.register_max {
        let got = c
            .register("names")
            .get(k)
            .await
            .expect("get")
            .expect("an acknowledged register is set");
        assert!(
            (got.hlc, got.replica) >= (*hlc, *replica),
            "register {k} went back to an older write"
        );
        if (got.hlc, got.replica) == (*hlc, *replica) {
            assert_eq!(got.value, value.as_bytes(), "register {k}");
        }
    }
    for (k, ids) in &record.stream_acked {
        let entries = c
            .stream("events")
            .range(k, None, None, 0)
            .await
            .expect("range");
        let have: Vec<StreamId> = entries.iter().map(|e| e.id).collect();
        for id in ids {
            let n = have.iter().filter(|h| *h == id).count();
            assert_eq!(
                n, 1,
                "stream {k}: acknowledged entry {id} appears {n} times"
            );
        }
    }
}
