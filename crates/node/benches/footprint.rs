//! Footprint benchmark: what replication ships and what a region keeps.
//!
//! 1. **Set churn.** us-east holds one set of 10,000 members (20-byte
//!    `element:%012d` names), replicated to the other regions. Then 1% of
//!    it churns: 50 members removed and 50 added, first by one request per
//!    member, then again by one remove and one add of 50 members each. The
//!    bytes eu-west received from us-east for the churn (the encoded
//!    protobuf frames, as its peer status counts them; gRPC and HTTP/2
//!    framing add 14 bytes per frame) are divided by the set's encoded
//!    full state (what a state-based exchange or a snapshot ships).
//! 2. **Stored bytes.** 100,000 members are added to one set in us-east;
//!    once every region has them and has truncated its log, eu-west's data
//!    directory has grown by what sled allocated on disk for them, divided
//!    by the members' bytes; and the bytes of the records (keys and
//!    values) the store's layout hands sled for them, divided the same way.
//! 3. **Memory.** Three `concord-node` processes (release build); us-east
//!    increments 1,000,000 distinct counter keys in batches of 1,000; once
//!    every region has them, each process's resident set size (`VmRSS`) and
//!    peak (`VmHWM`), against the same processes before the load.
//!
//! `cargo bench -p concord-node --bench footprint` (add `-- --members N`,
//! `--stored N`, `--counters N`, or `--only churn|stored|rss`).

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, converged, processes, status, Region, REGIONS};
use concord_core::{CrdtType, KeyspaceId, Value};
use concord_proto::v1 as pb;
use concord_store::layout::member_key;

/// Members per set add request while filling (the default per-op limit).
const FILL_CHUNK: u64 = 1_000;
/// Counter increments per batch while loading keys.
const COUNTER_BATCH: u64 = 1_000;
/// Bytes of one member name.
const MEMBER_BYTES: u64 = 20;

struct Args {
    members: u64,
    stored: u64,
    counters: u64,
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        members: 10_000,
        stored: 100_000,
        counters: 1_000_000,
        only: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    for pair in argv.windows(2) {
        match pair[0].as_str() {
            "--members" => a.members = pair[1].parse().unwrap_or(a.members),
            "--stored" => a.stored = pair[1].parse().unwrap_or(a.stored),
            "--counters" => a.counters = pair[1].parse().unwrap_or(a.counters),
            "--only" => a.only = Some(pair[1].clone()),
            _ => {}
        }
    }
    a
}

fn member(i: u64) -> Vec<u8> {
    format!("element:{i:012}").into_bytes()
}

async fn create(region: &Region, name: &str, ty: pb::CrdtType) {
    region
        .client
        .clone()
        .create_keyspace(pb::CreateKeyspaceRequest {
            name: name.into(),
            r#type: ty.into(),
        })
        .await
        .expect("create keyspace");
}

/// Adds (`add`) or removes members of the set at key `k`.
async fn set_change(region: &Region, keyspace: &str, add: bool, members: Vec<Vec<u8>>) {
    let mut client = region.client.clone();
    let (keyspace, key) = (keyspace.to_string(), "k".to_string());
    let done = if add {
        client
            .set_add(pb::SetAddRequest {
                keyspace,
                key,
                members,
            })
            .await
    } else {
        client
            .set_remove(pb::SetRemoveRequest {
                keyspace,
                key,
                members,
            })
            .await
    };
    done.expect("set change");
}

/// Adds members `from..to`, `FILL_CHUNK` per request.
async fn fill(region: &Region, keyspace: &str, from: u64, to: u64) {
    let mut i = from;
    while i < to {
        let end = (i + FILL_CHUNK).min(to);
        set_change(region, keyspace, true, (i..end).map(member).collect()).await;
        i = end;
    }
}

/// Bytes `region` has received from replica `from`.
async fn received_from(region: &Region, from: u32) -> u64 {
    status(region)
        .await
        .peers
        .iter()
        .find(|p| p.replica_id == from)
        .map(|p| p.bytes_received)
        .expect("peer in status")
}

async fn churn(regions: &[Region], members: u64) {
    let ks = "churn";
    create(&regions[0], ks, pb::CrdtType::Set).await;
    fill(&regions[0], ks, 0, members).await;
    assert!(converged(regions, Duration::from_secs(60)).await);
    let keyspace = KeyspaceId {
        name: ks.into(),
        ty: CrdtType::Set,
    };
    let state = regions[0].store().get(&keyspace, "k").expect("get");
    let state_bytes = state.encode().len() as u64;
    let changes = (members / 100).max(2);
    let half = changes / 2;

    let before = received_from(&regions[1], 1).await;
    for i in 0..half {
        set_change(&regions[0], ks, false, vec![member(i)]).await;
        set_change(&regions[0], ks, true, vec![member(members + i)]).await;
    }
    assert!(converged(regions, Duration::from_secs(60)).await);
    let unary = received_from(&regions[1], 1).await - before;

    let before = received_from(&regions[1], 1).await;
    set_change(
        &regions[0],
        ks,
        false,
        (half..2 * half).map(member).collect(),
    )
    .await;
    let added = (members + half..members + 2 * half).map(member).collect();
    set_change(&regions[0], ks, true, added).await;
    assert!(converged(regions, Duration::from_secs(60)).await);
    let batched = received_from(&regions[1], 1).await - before;

    println!("set churn: {members} members, {changes} changed ({half} removed, {half} added)");
    println!("  full state (encoded):        {state_bytes:>9} bytes");
    for (how, bytes) in [
        ("one request per member", unary),
        ("one remove + one add", batched),
    ] {
        println!(
            "  delta bytes, {how:<22} {bytes:>9} bytes  = {:.4} of the full state",
            bytes as f64 / state_bytes as f64
        );
    }
}

/// Bytes allocated on disk under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

async fn stored(regions: &[Region], dir: &Path, members: u64) {
    let ks = "stored";
    let region_dir = dir.join(REGIONS[1]);
    create(&regions[0], ks, pb::CrdtType::Set).await;
    assert!(converged(regions, Duration::from_secs(60)).await);
    let store = regions[1].store();
    store.flush().expect("flush");
    let before = disk_bytes(&region_dir);
    let started = Instant::now();
    fill(&regions[0], ks, 0, members).await;
    let fill_secs = started.elapsed().as_secs_f64();
    assert!(converged(regions, Duration::from_secs(300)).await);
    // Wait for the logs to be truncated (every region has acknowledged).
    let deadline = Instant::now() + Duration::from_secs(60);
    while store
        .log_stats()
        .expect("log stats")
        .values()
        .any(|s| s.entries > 0)
    {
        assert!(Instant::now() < deadline, "logs were not truncated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.flush().expect("flush");
    let after = disk_bytes(&region_dir);
    let payload = members * MEMBER_BYTES;
    // What the store's layout asks sled to keep for them: the member rows
    // (keys and values) and the set's header.
    let keyspace = KeyspaceId {
        name: ks.into(),
        ty: CrdtType::Set,
    };
    let Value::Set(set) = store.get(&keyspace, "k").expect("get") else {
        panic!("not a set")
    };
    let (header, rows) = set.into_parts().expect("parts");
    let logical: u64 = header.encode().len() as u64
        + rows
            .iter()
            .map(|(m, dots)| (member_key(ks, "k", m).len() + dots.encode().len()) as u64)
            .sum::<u64>();
    let grown = after.saturating_sub(before);
    println!(
        "stored bytes: {members} members of {MEMBER_BYTES} bytes added in {fill_secs:.1} s ({:.0} members/s)",
        members as f64 / fill_secs
    );
    println!(
        "  records (keys + values) {logical} bytes for {payload} payload bytes = {:.2}x",
        logical as f64 / payload as f64
    );
    println!(
        "  eu-west's directory grew {grown} bytes on disk for {payload} payload bytes = {:.2}x",
        grown as f64 / payload as f64
    );
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn rss(dir: &Path, keys: u64) {
    let (regions, mut children) = processes(dir).await;
    let ks = "rss";
    create(&regions[0], ks, pb::CrdtType::Counter).await;
    assert!(converged(&regions, Duration::from_secs(60)).await);
    let idle: Vec<(f64, f64)> = children.iter().map(|c| memory_mib(c.id())).collect();
    let started = Instant::now();
    let mut i = 0;
    while i < keys {
        let end = (i + COUNTER_BATCH).min(keys);
        let operations = (i..end)
            .map(|k| pb::Operation {
                op: Some(pb::operation::Op::CounterIncrement(
                    pb::CounterIncrementRequest {
                        keyspace: ks.into(),
                        key: format!("key:{k:012}"),
                        delta: 1,
                    },
                )),
            })
            .collect();
        regions[0]
            .client
            .clone()
            .batch(pb::BatchRequest { operations })
            .await
            .expect("batch");
        i = end;
    }
    let load_secs = started.elapsed().as_secs_f64();
    assert!(converged(&regions, Duration::from_secs(600)).await);
    // Let the logs be truncated, as in steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "memory: {keys} counter keys written in us-east in {load_secs:.1} s, replicated to all"
    );
    for (i, child) in children.iter().enumerate() {
        let (rss, hwm) = memory_mib(child.id());
        println!(
            "  {:<9} RSS {rss:>7.1} MiB (idle {:>5.1}), peak {hwm:>7.1} MiB",
            REGIONS[i], idle[i].0
        );
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let wants = |part: &str| args.only.as_deref().is_none_or(|o| o == part);
    runtime.block_on(async {
        if wants("churn") || wants("stored") {
            let dir = tempfile::tempdir().expect("tempdir");
            let regions = cluster(dir.path(), Arc::new(AtomicBool::new(false))).await;
            if wants("churn") {
                churn(&regions, args.members).await;
            }
            if wants("stored") {
                stored(&regions, dir.path(), args.stored).await;
            }
        }
        if wants("rss") {
            let dir = tempfile::tempdir().expect("tempdir");
            rss(dir.path(), args.counters).await;
        }
    });
}
