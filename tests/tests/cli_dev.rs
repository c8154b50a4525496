//! `concord dev` and the CLI as a new user meets them: a 3-region cluster
//! of real processes, every type written and read with the CLI, a region
//! killed and restarted from its config file, and Ctrl-C (SIGTERM here)
//! stopping the rest.

use std::process::{Command, Stdio};
use std::time::Duration;

use concord_tests::dev::Dev;
use concord_tests::{binary, cli, cli_json, signal, wait_for_port, NodeProcess};
use serde_json::Value;

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[test]
fn dev_cluster_serves_every_type_and_survives_a_killed_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = Dev::start(dir.path(), 3);
    let names: Vec<&str> = dev
        .regions
        .iter()
        .map(|r| r["region"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["us-east", "eu-west", "ap-south"]);
    let endpoint = |i: usize| dev.endpoint(i);
    let config = |i: usize| dev.config(i);
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
    // Values from standard input and from a file, byte for byte.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut piped = Command::new(binary("concord"))
        .args(["--endpoint", &e0, "register", "set", "names", "piped", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run concord");
    {
        use std::io::Write;
        let mut stdin = piped.stdin.take().expect("stdin");
        stdin.write_all(&big).expect("write stdin");
    }
    assert!(piped.wait().expect("wait").success());
    let file = dir.path().join("value.bin");
    std::fs::write(&file, &big[..1000]).expect("write value file");
    let at_file = format!("@{}", file.display());
    cli_json(&e0, &["register", "set", "names", "filed", &at_file]);
    cli_json(&e0, &["register", "set", "names", "at", "@@home"]);
    let hex = |bytes: &[u8]| -> String {
        let digits: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{digits}")
    };
    assert_eq!(
        cli_json(&e0, &["register", "get", "names", "piped"])["value"],
        Value::from(hex(&big))
    );
    assert_eq!(
        cli_json(&e0, &["register", "get", "names", "filed"])["value"],
        Value::from(hex(&big[..1000]))
    );
    assert_eq!(
        cli_json(&e0, &["register", "get", "names", "at"])["value"],
        "@home"
    );
    let first = cli_json(&e0, &["stream", "append", "ev", "o", "sku=A", "qty=2"])["id"].clone();
    let second = cli_json(&e0, &["stream", "append", "ev", "o", "sku=B"])["id"].clone();
    let all = cli_json(&e0, &["stream", "range", "ev", "o"]);
    assert_eq!(all["entries"].as_array().expect("entries").len(), 2);
    assert_eq!(all["entries"][0]["fields"]["qty"], "2");
    assert_eq!(all["more"], false);
    let second_id = second.as_str().expect("id");
    let tail = cli_json(
        &e0,
        &[
            "stream", "range", "ev", "o", "--from", second_id, "--count", "5",
        ],
    );
    assert_eq!(tail["entries"][0]["id"], second);
    // Paging: a cut page says so, and the next starts after its last id.
    let page = cli_json(&e0, &["stream", "range", "ev", "o", "--count", "1"]);
    assert_eq!(page["entries"][0]["id"], first);
    assert_eq!(page["more"], true);
    let first_id = first.as_str().expect("id");
    let next = cli_json(&e0, &["stream", "range", "ev", "o", "--after", first_id]);
    assert_eq!(next["entries"].as_array().expect("entries").len(), 1);
    assert_eq!(next["entries"][0]["id"], second);
    assert_eq!(next["more"], false);
    let cut = cli(&[
        "--endpoint",
        &e0,
        "stream",
        "range",
        "ev",
        "o",
        "--count",
        "1",
    ]);
    let note = String::from_utf8_lossy(&cut.stderr);
    assert!(
        note.contains(&format!("continue with --after {first_id}")),
        "{note}"
    );
    cli_json(&e0, &["stream", "trim", "ev", "o", "--before", second_id]);
    let left = cli_json(&e0, &["stream", "range", "ev", "o"]);
    assert_eq!(left["entries"].as_array().expect("entries").len(), 1);
    assert_ne!(left["entries"][0]["id"], first);
    let listed = cli_json(&e0, &["keyspace", "list"]);
    assert_eq!(listed.as_array().expect("list").len(), 4);
    assert_eq!(
        cli_json(&e0, &["keyspace", "describe", "tags"])["type"],
        "set"
    );
    let status = cli_json(&e0, &["status"]);
    assert_eq!(status["region"], "us-east");
    assert_eq!(status["peers"].as_array().expect("peers").len(), 2);
    // --watch redraws until Ctrl-C (SIGINT), then exits cleanly; without
    // a terminal, one JSON document per redraw.
    let watch = Command::new(binary("concord"))
        .args([
            "--endpoint",
            &e0,
            "--json",
            "status",
            "--watch",
            "--interval-ms",
            "150",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run concord status --watch");
    std::thread::sleep(Duration::from_millis(1200));
    signal(watch.id(), rustix::process::Signal::INT);
    let watched = watch.wait_with_output().expect("wait");
    assert!(watched.status.success(), "{watched:?}");
    let documents: Vec<Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    assert!(documents.len() >= 2, "redrawn: {documents:?}");
    assert!(documents.iter().all(|d| d["region"] == "us-east"));

    // Errors: one line on stderr; exit 1, or 2 for a malformed command
    // line.
    for (args, code) in [
        (vec!["counter", "get", "nope", "k"], 1),
        (vec!["counter", "incr", "tags", "p"], 1),
        (vec!["register", "set", "names", "u1", "@/no/such/file"], 1),
        (vec!["stream", "range", "ev", "o", "--from", "not-an-id"], 2),
        (vec!["counter", "incr"], 2),
        (vec!["counter", "incr", "hits", "k", "--by", "x"], 2),
        (vec!["frobnicate"], 2),
    ] {
        let mut all = vec!["--endpoint", &e0];
        all.extend(args.iter().copied());
        let out = cli(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("concord: "), "{args:?}: {stderr}");
    }
    let https = cli(&["--endpoint", "https://127.0.0.1:1", "status"]);
    let stderr = String::from_utf8_lossy(&https.stderr);
    assert!(stderr.contains("TLS is not supported yet"), "{stderr}");
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
    for pid in [dev.pids[0], dev.pids[2], restarted.pid()] {
        assert!(!pid_alive(pid), "region pid {pid} still running");
    }
    drop(restarted);
}
