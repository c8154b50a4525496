//! The `concord-node` binary as an operator meets it: configuration
//! errors, garbage on its port, its metrics, and a graceful shutdown that
//! keeps every acknowledged write.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use concord_client::{Client, KeyspaceType};
use concord_tests::{
    binary, cli, cli_json, free_base_port, http_get, node_config, wait_for_port, NodeProcess,
};

/// Writes a node's configuration (us-east, replica 1) under `dir`, with
/// `extra` appended; returns its path.
fn config_file(dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(&path, node_config("us-east", 1, listen, dir, extra)).expect("write");
    path
}

fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(binary("concord-node"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .env_remove("CONCORD_NODE_REGION")
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_files_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = node_config("us-east", 1, "127.0.0.1:7101", dir.path(), "");
    let (code, _) = check_config(&good);
    assert_eq!(code, 0, "the minimal file is valid");

    let cases = [
        (format!("{good}colour = \"blue\""), "colour"),
        (
            format!("{good}[limits]\nmax_key_bytez = 1"),
            "max_key_bytez",
        ),
        (good.replace("replica_id = 1\n", ""), "replica_id"),
        (good.replace("region = \"us-east\"\n", ""), "region"),
        (format!("{good}durability = \"often\""), "often"),
        (
            format!(
                "{good}[[peers]]\nregion = \"eu-west\"\nreplica_id = 1\nendpoint = \"http://x:1\""
            ),
            "replica_id",
        ),
    ];
    for (text, expected) in cases {
        let (code, stderr) = check_config(&text);
        assert_eq!(code, 2, "{text:?} must be refused; stderr: {stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
        assert!(stderr.starts_with("concord-node: "), "{stderr:?}");
    }
    // A syntax error shows the line and points at the spot.
    let (code, stderr) = check_config("region = \n");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("line 1") && stderr.contains('^'),
        "{stderr}"
    );
    let missing = Command::new(binary("concord-node"))
        .args(["--config", "/no/such/file.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_changes_nothing_and_metrics_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(1);
    let listen = format!("127.0.0.1:{base}");
    let metrics = format!("127.0.0.1:{}", base + 1000);
    let config = config_file(
        dir.path(),
        &listen,
        &format!("metrics_listen = {metrics:?}"),
    );
    let node = NodeProcess::start(&config, &listen);
    let client = Client::connect([node.endpoint.clone()])
        .await
        .expect("connect");
    client
        .create_keyspace("hits", KeyspaceType::Counter)
        .await
        .expect("create");
    client.counter("hits").incr("k", 5).await.expect("incr");

    // Garbage of several shapes: random bytes, HTTP/1.1, a truncated
    // HTTP/2 preface, and a connection closed at once.
    let mut rng = fastrand::Rng::with_seed(7);
    let random: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
    let payloads: [&[u8]; 4] = [
        &random,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
        b"",
    ];
    for payload in payloads {
        let mut stream = std::net::TcpStream::connect(&listen).expect("connect");
        let _ = stream.write_all(payload);
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Still serving, nothing changed; the health check a container
    // orchestrator runs says so too.
    assert_eq!(client.counter("hits").get("k").await.expect("get"), 5);
    let health = cli_json(&node.endpoint, &["health"]);
    assert_eq!(health["status"], "SERVING", "{health}");
    let status = client.status().await.expect("status");
    assert_eq!(status.applied.expect("vv").seqs.get(&1), Some(&2));

    assert!(wait_for_port(&metrics, Duration::from_secs(10)));
    let scrape = http_get(&metrics, "/metrics").expect("scrape");
    assert!(
        scrape.starts_with("HTTP/1.0 200") || scrape.starts_with("HTTP/1.1 200"),
        "{scrape}"
    );
    for metric in [
        "concord_rpc_requests_total{rpc=\"counter_increment\",code=\"OK\"} 1",
        "concord_rpc_duration_seconds_bucket",
    ] {
        assert!(scrape.contains(metric), "{metric} missing from:\n{scrape}");
    }
    // The store gauges are refreshed every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scrape = http_get(&metrics, "/metrics").expect("scrape");
    assert!(
        scrape.contains("concord_applied_seq{origin=\"1\"} 2"),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_acknowledged_write_even_in_relaxed_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(1);
    let listen = format!("127.0.0.1:{base}");
    // Relaxed mode acknowledges before the flush, and the background flush
    // is a minute away: only the shutdown's flush can save these writes.
    let config = config_file(
        dir.path(),
        &listen,
        "durability = \"relaxed\"\n[storage]\nflush_every_ms = 60000\n[[keyspaces]]\nname = \"hits\"\ntype = \"counter\"",
    );
    let node = NodeProcess::start(&config, &listen);
    let client = Client::connect([node.endpoint.clone()])
        .await
        .expect("connect");
    let hits = client.counter("hits");
    let mut acked = 0;
    for _ in 0..200 {
        hits.incr("k", 1).await.expect("incr");
        acked += 1;
    }
    drop(client);
    let endpoint = node.endpoint.clone();
    assert!(node.terminate(), "a clean exit after SIGTERM");
    let down = cli(&["--endpoint", &endpoint, "--timeout-ms", "1000", "health"]);
    assert_eq!(down.status.code(), Some(1), "health of a stopped node");
    assert!(
        String::from_utf8_lossy(&down.stderr).starts_with("concord: "),
        "{down:?}"
    );

    let node = NodeProcess::start(&config, &listen);
    let client = Client::connect([node.endpoint.clone()])
        .await
        .expect("connect");
    assert_eq!(client.counter("hits").get("k").await.expect("get"), acked);
}

#[test]
fn a_data_directory_in_use_is_refused_in_one_clear_line_and_named_in_the_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(2);
    let listen = format!("127.0.0.1:{base}");
    let pid_file = dir.path().join("node.pid");
    let config = config_file(dir.path(), &listen, &format!("pid_file = {pid_file:?}"));
    let node = NodeProcess::start(&config, &listen);
    // Written once the store is open, a moment after the port listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let written = loop {
        match std::fs::read_to_string(&pid_file) {
            Ok(text) if text.ends_with('\n') => break text,
            _ if std::time::Instant::now() > deadline => panic!("no pid file"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(written.trim(), node.pid().to_string());

    let second = Command::new(binary("concord-node"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", base + 1))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(!stderr.contains("Os {"), "no debug formatting: {stderr}");
    // The pid file still names the node that holds the directory.
    let still = std::fs::read_to_string(&pid_file).expect("the pid file");
    assert_eq!(still.trim(), node.pid().to_string());
    assert!(node.terminate(), "a clean exit");
    assert!(!pid_file.exists(), "removed when the node stops");
}
