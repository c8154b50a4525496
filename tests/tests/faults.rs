//! Three (or four) real regions under concurrent writes of all four types
//! in every region, through a fault: a region killed with SIGKILL and
//! restarted, a region frozen with SIGSTOP, a partial partition, a region
//! joining late. Each ends with every region identical and every
//! acknowledged write present.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_tests::cluster::Cluster;
use concord_tests::proxy::Proxy;
use concord_tests::workload::{self, Record, Shared};
use tokio::time::{sleep, Instant};

/// How long the writers run.
const LOAD: Duration = Duration::from_secs(5);

/// Longest wait for convergence after the writers stop.
const CONVERGE: Duration = Duration::from_secs(60);

/// Starts one writer per region in `which`, until `LOAD` from now.
fn writers(
    cluster: &Cluster,
    which: &[usize],
    record: &Shared,
) -> Vec<tokio::task::JoinHandle<()>> {
    let until = Instant::now() + LOAD;
    which
        .iter()
        .map(|&i| {
            tokio::spawn(workload::write(
                cluster.endpoint(i),
                i as u32 + 1,
                until,
                record.clone(),
            ))
        })
        .collect()
}

async fn finish(cluster: &Cluster, writers: Vec<tokio::task::JoinHandle<()>>, record: &Shared) {
    finish_lossy(cluster, writers, record, None).await
}

/// [`finish`], with the writes recorded in `lossy` allowed to be lost
/// (in every region alike).
async fn finish_lossy(
    cluster: &Cluster,
    writers: Vec<tokio::task::JoinHandle<()>>,
    record: &Shared,
    lossy: Option<&Shared>,
) {
    for w in writers {
        w.await.expect("writer");
    }
    if let Some(lossy) = lossy {
        let taken = std::mem::take(&mut *lossy.lock().unwrap_or_else(|p| p.into_inner()));
        record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .absorb_lossy(taken);
    }
    let endpoints = cluster.endpoints();
    if let Err(e) = workload::converge(&endpoints, CONVERGE).await {
        panic!("{e}\n{}", cluster.logs());
    }
    let record = std::mem::take(&mut *record.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(
        record.acked > 100,
        "too few writes to mean anything: {}",
        record.acked
    );
    workload::check(&endpoints, &record).await;
}

async fn three() -> Cluster {
    let mut cluster = Cluster::new(3);
    cluster.configure_direct();
    cluster.start_all();
    for e in cluster.endpoints() {
        workload::declare(&e).await;
    }
    cluster
}

fn record() -> Shared {
    Arc::new(Mutex::new(Record::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_killed_and_restarted_mid_load() {
    let mut cluster = three().await;
    let record = record();
    let w = writers(&cluster, &[0, 1, 2], &record);
    sleep(Duration::from_millis(1500)).await;
    cluster.kill(1);
    sleep(Duration::from_millis(1500)).await;
    cluster.start(1);
    finish(&cluster, w, &record).await;
}

/// Relaxed durability answers before the disk, so a region killed with
/// SIGKILL may lose its last acknowledged writes, but only in every
/// region alike: it restarts with lower sequence numbers, CRDT dots and
/// counter totals, which must never collide with ones another region
/// already holds. sled's own flush is put off for a minute, so every
/// write the region shipped was on disk only if shipping waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaxed_region_killed_mid_load_loses_writes_in_every_region_alike() {
    let mut cluster = Cluster::new(3);
    cluster.settings = "durability = \"relaxed\"\n[storage]\nflush_every_ms = 60000".into();
    cluster.configure_direct();
    cluster.start_all();
    for e in cluster.endpoints() {
        workload::declare(&e).await;
    }
    let (kept, lossy) = (record(), record());
    let mut w = writers(&cluster, &[0, 2], &kept);
    w.extend(writers(&cluster, &[1, 1, 1, 1], &lossy));
    sleep(Duration::from_millis(1500)).await;
    cluster.kill(1);
    sleep(Duration::from_millis(1000)).await;
    cluster.start(1);
    finish_lossy(&cluster, w, &kept, Some(&lossy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_frozen_while_the_others_write() {
    let cluster = three().await;
    let record = record();
    let w = writers(&cluster, &[0, 1, 2], &record);
    sleep(Duration::from_millis(1000)).await;
    cluster.freeze(2);
    sleep(Duration::from_millis(2500)).await;
    cluster.thaw(2);
    finish(&cluster, w, &record).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_partition_between_two_regions() {
    let mut cluster = Cluster::new(3);
    // us-east and ap-south reach each other only through proxies the test
    // cuts; eu-west reaches both directly.
    let a_to_c = Proxy::start(cluster.regions[2].listen).await;
    let c_to_a = Proxy::start(cluster.regions[0].listen).await;
    let addrs: Vec<_> = cluster.regions.iter().map(|r| r.listen).collect();
    let (ac, ca) = (a_to_c.addr, c_to_a.addr);
    cluster.configure(|i, j| match (i, j) {
        (0, 2) => format!("http://{ac}"),
        (2, 0) => format!("http://{ca}"),
        _ => format!("http://{}", addrs[j]),
    });
    cluster.start_all();
    for e in cluster.endpoints() {
        workload::declare(&e).await;
    }
    let record = record();
    let w = writers(&cluster, &[0, 1, 2], &record);
    sleep(Duration::from_millis(1000)).await;
    a_to_c.cut();
    c_to_a.cut();
    // While cut, what ap-south writes still reaches us-east, through
    // eu-west.
    let from_c = |status: concord_client::proto::StatusResponse| {
        status
            .applied
            .and_then(|a| a.seqs.get(&3).copied())
            .unwrap_or(0)
    };
    let east = concord_client::Client::connect([cluster.endpoint(0)])
        .await
        .expect("connect");
    let before = from_c(east.status().await.expect("status"));
    sleep(Duration::from_millis(2500)).await;
    let during = from_c(east.status().await.expect("status"));
    assert!(
        during > before + 10,
        "ap-south's writes stopped reaching us-east during the cut: {before} -> {during}"
    );
    a_to_c.heal();
    c_to_a.heal();
    finish(&cluster, w, &record).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_region_joins_late() {
    let mut cluster = Cluster::new(4);
    cluster.configure_direct();
    for i in 0..3 {
        cluster.start(i);
    }
    for i in 0..3 {
        workload::declare(&cluster.endpoint(i)).await;
    }
    let record = record();
    let mut w = writers(&cluster, &[0, 1, 2], &record);
    sleep(Duration::from_millis(2000)).await;
    cluster.start(3);
    workload::declare(&cluster.endpoint(3)).await;
    let until = Instant::now() + Duration::from_millis(2000);
    w.push(tokio::spawn(workload::write(
        cluster.endpoint(3),
        4,
        until,
        record.clone(),
    )));
    finish(&cluster, w, &record).await;
}
