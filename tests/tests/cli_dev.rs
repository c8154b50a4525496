//! `concord dev` and the CLI as a new user meets them: a 3-region cluster
//! of real processes, every type written and read with the CLI, a region
//! killed and restarted from its config file, and Ctrl-C (SIGTERM here)
//! stopping the rest.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use concord_tests::{binary, cli, cli_json, free_base_port, signal, wait_for_port, NodeProcess};
use serde_json::Value;

/// Kills `concord dev` and whatever it started if the test fails.
struct Dev {
    child: std::process::Child,
    pids: Vec<u32>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        for &pid in &self.pids {
            signal(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[test]
fn dev_cluster_serves_every_type_and_survives_a_killed_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(3);
    let mut child = Command::new(binary("concord"))
        .args([
            "--json",
            "dev",
            "--regions",
            "3",
            "--base-port",
            &base.to_string(),
            "--data",
        ])
        .arg(dir.path())
        .arg("--node-bin")
        .arg(binary("concord-node"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start concord dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut dev = Dev {
        child,
        pids: Vec::new(),
    };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the cluster table");
    let regions: Vec<Value> = serde_json::from_str(&line).expect("JSON list of regions");
    assert_eq!(regions.len(), 3);
    dev.pids = regions
        .iter()
        .map(|r| r["pid"].as_u64().expect("pid") as u32)
        .collect();
    let names: Vec<&str> = regions
        .iter()
        .map(|r| r["region"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["us-east", "eu-west", "ap-south"]);
    let endpoint = |i: usize| {
        regions[i]["endpoint"]
            .as_str()
            .expect("endpoint")
            .to_string()
    };
    let config = |i: usize| regions[i]["config"].as_str().expect("config").to_string();
    assert!(std::path::Path::new(&config(0)).is_file());
    let e0 = endpoint(0);

    // Every type through the CLI.
    for (ks, ty) in [
        ("hits", "counter"),
        ("tags", "set"),
        ("names", "register"),
        ("ev", "stream"),
    ] {
        let created = cli_json(&e0, &["keyspace", "create", ks, "--type", ty]);
        assert_eq!(created["created"], true);
    }
    assert_eq!(
        cli_json(&e0, &["counter", "incr", "hits", "home", "--by", "-3"])["value"],
        -3
    );
    assert_eq!(
        cli_json(&e0, &["counter", "incr", "hits", "home", "--by", "10"])["value"],
        7
    );
    assert_eq!(
        cli_json(&e0, &["counter", "get", "hits", "home"])["value"],
        7
    );
    cli_json(&e0, &["set", "add", "tags", "p", "a", "b", "c"]);
    cli_json(&e0, &["set", "rm", "tags", "p", "b"]);
    assert_eq!(
        cli_json(&e0, &["set", "members", "tags", "p"]),
        serde_json::json!(["a", "c"])
    );
    assert_eq!(
        cli_json(&e0, &["set", "contains", "tags", "p", "b"])["contains"],
        false
    );
    cli_json(&e0, &["register", "set", "names", "u1", "ada"]);
    let reg = cli_json(&e0, &["register", "get", "names", "u1"]);
    assert_eq!(
        (reg["found"].clone(), reg["value"].clone()),
        (Value::Bool(true), Value::from("ada"))
    );
    let first = cli_json(&e0, &["stream", "append", "ev", "o", "sku=A", "qty=2"])["id"].clone();
    let second = cli_json(&e0, &["stream", "append", "ev", "o", "sku=B"])["id"].clone();
    let all = cli_json(&e0, &["stream", "range", "ev", "o"]);
    assert_eq!(all.as_array().expect("entries").len(), 2);
    assert_eq!(all[0]["fields"]["qty"], "2");
    let second_id = second.as_str().expect("id");
    let tail = cli_json(
        &e0,
        &[
            "stream", "range", "ev", "o", "--from", second_id, "--count", "5",
        ],
    );
    assert_eq!(tail[0]["id"], second);
    cli_json(&e0, &["stream", "trim", "ev", "o", "--before", second_id]);
    let left = cli_json(&e0, &["stream", "range", "ev", "o"]);
    assert_eq!(left.as_array().expect("entries").len(), 1);
    assert_ne!(left[0]["id"], first);
    let listed = cli_json(&e0, &["keyspace", "list"]);
    assert_eq!(listed.as_array().expect("list").len(), 4);
    assert_eq!(
        cli_json(&e0, &["keyspace", "describe", "tags"])["type"],
        "set"
    );
    let status = cli_json(&e0, &["status"]);
    assert_eq!(status["region"], "us-east");
    assert_eq!(status["peers"].as_array().expect("peers").len(), 2);

    // Errors: one line on stderr, a non-zero exit.
    for args in [
        vec!["counter", "get", "nope", "k"],
        vec!["counter", "incr", "tags", "p"],
        vec!["stream", "range", "ev", "o", "--from", "not-an-id"],
    ] {
        let mut all = vec!["--endpoint", &e0];
        all.extend(args.iter().copied());
        let out = cli(&all);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{args:?}");
    }
    let unknown = cli(&["--endpoint", &e0, "counter", "get", "nope", "k"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");

    // Kill one region: the others keep serving.
    signal(dev.pids[1], rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cli_json(&endpoint(2), &["status"])["region"], "ap-south");
    assert_eq!(
        cli_json(&e0, &["counter", "get", "hits", "home"])["value"],
        7
    );

    // Restart it from its config file; its data is still there.
    let listen = endpoint(1).trim_start_matches("http://").to_string();
    let restarted = NodeProcess::start(std::path::Path::new(&config(1)), &listen);
    assert_eq!(
        cli_json(&restarted.endpoint, &["status"])["region"],
        "eu-west"
    );
    assert!(wait_for_port(&listen, Duration::from_secs(5)));

    // SIGTERM (what Ctrl-C sends the whole group) stops the regions it
    // runs.
    signal(dev.child.id(), rustix::process::Signal::TERM);
    let exited = dev.child.wait().expect("wait");
    assert!(exited.success(), "concord dev exits cleanly: {exited}");
    for pid in [dev.pids[0], dev.pids[2]] {
        assert!(!pid_alive(pid), "region pid {pid} still running");
    }
    drop(restarted);
}
