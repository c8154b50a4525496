//! The load generator against a real node served in-process: every
//! operation, unary and batched, at full speed and at a fixed rate, with
//! the node's data checked against what the report says was done.

use std::sync::Arc;
use std::time::Duration;

use concord_bench::{key_name, run, KeyDist, Op, Plan, Progress, Stop};
use concord_client::Client;
use concord_core::clock::SystemTime;
use concord_node::{Config, Node};

struct Running {
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn node() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_toml(&format!(
        "region = \"us-east\"\nreplica_id = 1\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}",
        dir.path().join("data")
    ))
    .expect("config");
    let node = Node::open(config, SystemTime).await.expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = node
            .serve(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                concord_node::Connector::tcp(),
                async {
                    let _ = rx.await;
                },
            )
            .await;
    });
    Running {
        url,
        _stop: tx,
        _dir: dir,
    }
}

fn plan(url: &str, op: Op, batch: usize, stop: Stop) -> Plan {
    Plan {
        endpoints: vec![url.to_string()],
        clients: 4,
        op,
        batch,
        keys: 20,
        members: 50,
        dist: KeyDist::Zipf(1.0),
        rate: None,
        stop,
        value_bytes: 8,
        seed: 9,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_is_done_as_often_as_reported() {
    let n = node().await;
    let client = Client::connect([n.url.clone()]).await.expect("connect");
    let mut increments = 0;
    let mut appends = 0;
    for op in Op::ALL {
        for batch in [1, 16] {
            let report = run(&plan(&n.url, op, batch, Stop::Requests(60)), Arc::default())
                .await
                .expect("run");
            assert_eq!(
                report.errors, 0,
                "{op:?} x{batch}: {:?}",
                report.first_error
            );
            assert_eq!(report.requests, 60);
            assert_eq!(report.ops, 60 * batch as u64);
            assert_eq!(report.latency_us.len(), 60);
            match op {
                Op::Incr => increments += report.ops as i64,
                Op::Xadd => appends += report.ops as usize,
                _ => {}
            }
        }
    }
    // What the node holds agrees with the reports.
    let mut counted = 0;
    let mut appended = 0;
    let mut members = 0;
    let mut registers = 0;
    for k in 0..20 {
        let key = key_name(k);
        counted += client
            .counter("bench-counter")
            .get(&key)
            .await
            .expect("get");
        appended += client
            .stream("bench-stream")
            .range(&key, None, None, 0)
            .await
            .expect("range")
            .len();
        members += client
            .set("bench-set")
            .members(&key)
            .await
            .expect("members")
            .len();
        if let Some(v) = client
            .register("bench-register")
            .get(&key)
            .await
            .expect("get")
        {
            assert_eq!(v.value, b"vvvvvvvv");
            registers += 1;
        }
    }
    assert_eq!(counted, increments);
    assert_eq!(appended, appends);
    assert!(
        members > 0 && registers > 0,
        "{members} members, {registers} registers"
    );
    // Zipf over 20 keys: the first key is the hottest.
    let first = client
        .counter("bench-counter")
        .get(&key_name(0))
        .await
        .expect("get");
    let last = client
        .counter("bench-counter")
        .get(&key_name(19))
        .await
        .expect("get");
    assert!(first > last, "key 0: {first}, key 19: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_rate_run_sends_on_schedule_and_stops_at_its_duration() {
    let n = node().await;
    let mut p = plan(
        &n.url,
        Op::Incr,
        1,
        Stop::After(Duration::from_millis(1500)),
    );
    p.rate = Some(200.0);
    let progress = Arc::new(Progress::default());
    let report = run(&p, progress.clone()).await.expect("run");
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    // 200 requests per second for 1.5 s: requests 0 to 299 are due before
    // the end, the last at 1.495 s; the schedule, not the server, sets the
    // pace, so none is sent early.
    assert_eq!(report.requests, 300);
    assert!(
        report.elapsed >= Duration::from_millis(1495),
        "{:?}",
        report.elapsed
    );
    assert_eq!(
        progress.ops.load(std::sync::atomic::Ordering::Relaxed),
        report.ops
    );
}

#[tokio::test]
async fn an_unreachable_node_is_a_setup_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let err = run(&plan(&dead, Op::Incr, 1, Stop::Requests(1)), Arc::default())
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, concord_bench::BenchError::Setup(_)), "{err}");
}
