//! The SDK against real nodes served in-process on 127.0.0.1: every typed
//! operation, batches, subscriptions, and failover that never repeats a
//! write.

use std::time::Duration;

use concord_client::{BatchResult, Client, ClientOptions, Error, Health, KeyspaceType, StreamId};
use concord_core::clock::SystemTime;
use concord_node::{Config, Node};
use tokio_stream::StreamExt;
use tonic::Code;

struct Running {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Stops the node and waits until its port is closed.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.served).await.expect("served");
    }
}

async fn node(region: &str, replica: u32) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_toml(&format!(
        "region = {region:?}\nreplica_id = {replica}\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}",
        dir.path().join("data")
    ))
    .expect("config");
    let node = Node::open(config, SystemTime).await.expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        node.serve(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            concord_node::Connector::tcp(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .expect("serve");
    });
    Running {
        url,
        stop: Some(tx),
        served,
        _dir: dir,
    }
}

/// An address nothing listens on.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    format!("http://{}", listener.local_addr().expect("addr"))
}

#[tokio::test]
async fn every_operation_through_the_typed_handles() {
    let n = node("us-east", 1).await;
    let client = Client::connect([n.url.clone()]).await.expect("connect");

    for (name, ty) in [
        ("hits", KeyspaceType::Counter),
        ("tags", KeyspaceType::Set),
        ("names", KeyspaceType::Register),
        ("events", KeyspaceType::Stream),
    ] {
        let (info, created) = client.create_keyspace(name, ty).await.expect("create");
        assert!(created);
        assert_eq!((info.name.as_str(), info.ty), (name, ty));
        let (_, again) = client.create_keyspace(name, ty).await.expect("idempotent");
        assert!(!again);
    }
    let clash = client
        .create_keyspace("hits", KeyspaceType::Set)
        .await
        .expect_err("other type");
    assert_eq!(clash.code(), Code::FailedPrecondition, "{clash}");
    let listed: Vec<String> = client
        .list_keyspaces()
        .await
        .expect("list")
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(listed, ["events", "hits", "names", "tags"]);
    assert_eq!(
        client.describe_keyspace("tags").await.expect("describe").ty,
        KeyspaceType::Set
    );
    let missing = client.describe_keyspace("nope").await.expect_err("missing");
    assert!(
        matches!(&missing, Error::Status(s) if s.code() == Code::NotFound),
        "{missing}"
    );

    let hits = client.counter("hits");
    assert_eq!(hits.incr("home", 5).await.expect("incr"), 5);
    assert_eq!(hits.incr("home", -2).await.expect("decr"), 3);
    assert_eq!(hits.get("home").await.expect("get"), 3);
    assert_eq!(hits.get("never").await.expect("get"), 0);

    let tags = client.set("tags");
    tags.add("post", ["rust", "crdt", "db"]).await.expect("add");
    let removed = tags.remove("post", ["db"]).await.expect("remove");
    assert!(removed.seq > 0);
    assert_eq!(
        tags.members("post").await.expect("members"),
        [b"crdt".to_vec(), b"rust".to_vec()]
    );
    assert!(tags.contains("post", "rust").await.expect("contains"));
    assert!(!tags.contains("post", "db").await.expect("contains"));

    let names = client.register("names");
    assert_eq!(names.get("u1").await.expect("get"), None);
    let ack = names.set("u1", "ada").await.expect("set");
    let value = names.get("u1").await.expect("get").expect("written");
    assert_eq!(value.value, b"ada");
    assert_eq!((value.hlc, value.replica), (ack.hlc, 1));

    let events = client.stream("events");
    let first = events
        .append("orders", [("sku", "A-1"), ("qty", "2")])
        .await
        .expect("append");
    let mut live = events
        .subscribe("orders", Some(StreamId::MIN))
        .await
        .expect("subscribe");
    let second = events
        .append("orders", [("sku", "B-7")])
        .await
        .expect("append");
    assert!(second > first);
    let got: Vec<StreamId> = vec![
        live.next().await.expect("backlog").expect("entry").id,
        live.next().await.expect("live").expect("entry").id,
    ];
    assert_eq!(got, [first, second]);
    let all = events.range("orders", None, None, 0).await.expect("range");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].fields[1], ("qty".to_string(), b"2".to_vec()));
    let from_second = events
        .range("orders", Some(second), None, 10)
        .await
        .expect("range");
    assert_eq!(from_second.len(), 1);
    events.trim("orders", second).await.expect("trim");
    let left = events.range("orders", None, None, 0).await.expect("range");
    assert_eq!(left.iter().map(|e| e.id).collect::<Vec<_>>(), [second]);

    let results = client
        .batch()
        .counter_incr("hits", "home", 10)
        .counter_get("hits", "home")
        .set_add("tags", "post", ["go"])
        .set_contains("tags", "post", "go")
        .register_get("names", "u1")
        .stream_append("events", "orders", [("sku", "C-3")])
        .stream_range("events", "orders", None, None, 0)
        .stream_range("events", "orders", None, None, 1)
        .run()
        .await
        .expect("batch");
    assert_eq!(results.len(), 8);
    assert_eq!(results[0], BatchResult::Counter(13));
    assert_eq!(results[1], BatchResult::Counter(13));
    assert!(matches!(results[2], BatchResult::Write(w) if w.seq > 0));
    assert_eq!(results[3], BatchResult::Contains(true));
    assert!(matches!(&results[4], BatchResult::Register(Some(v)) if v.value == b"ada"));
    let BatchResult::Appended(third) = results[5] else {
        panic!("expected an id, got {:?}", results[5]);
    };
    assert!(matches!(&results[6], BatchResult::Entries(p)
        if p.entries.len() == 2 && p.entries[1].id == third && !p.more));
    // A page cut by its count says so inside a batch too.
    assert!(matches!(&results[7], BatchResult::Entries(p) if p.entries.len() == 1 && p.more));

    // A batch that fails as a whole changes nothing.
    let wrong = client
        .batch()
        .counter_incr("hits", "home", 1)
        .set_add("hits", "home", ["x"])
        .run()
        .await
        .expect_err("wrong type");
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert_eq!(hits.get("home").await.expect("get"), 13);

    let status = client.status().await.expect("status");
    assert_eq!(status.region, "us-east");
    assert_eq!(status.replica_id, 1);
    n.stop().await;
}

#[tokio::test]
async fn connect_skips_unreachable_endpoints_and_refuses_bad_ones() {
    let dead = closed_port().await;
    let n = node("us-east", 1).await;
    let client = Client::connect([dead.clone(), n.url.clone()])
        .await
        .expect("connect");
    assert_eq!(client.current_endpoint(), n.url);

    let none = Client::connect([dead])
        .await
        .expect_err("nothing reachable");
    assert!(
        matches!(none, Error::Unavailable { tried: 1, .. }),
        "{none}"
    );
    let empty = Client::connect(Vec::<String>::new())
        .await
        .expect_err("no endpoints");
    assert!(matches!(empty, Error::InvalidEndpoint { .. }));
    let bad = Client::connect(["127.0.0.1:7101"])
        .await
        .expect_err("no scheme");
    assert!(matches!(bad, Error::InvalidEndpoint { .. }), "{bad}");
    n.stop().await;
}

#[tokio::test]
async fn a_dead_region_fails_reads_over_but_never_repeats_a_write() {
    let a = node("us-east", 1).await;
    let b = node("eu-west", 2).await;
    let client = Client::connect([a.url.clone(), b.url.clone()])
        .await
        .expect("connect");
    for url in [&a.url, &b.url] {
        let direct = Client::connect([url.clone()]).await.expect("connect");
        direct
            .create_keyspace("hits", KeyspaceType::Counter)
            .await
            .expect("create");
    }
    let hits = client.counter("hits");
    assert_eq!(hits.incr("k", 1).await.expect("on a"), 1);
    let a_url = a.url.clone();
    a.stop().await;

    // The write is not repeated on b: its outcome on a is unknown to us.
    let e = hits.incr("k", 1).await.expect_err("a is gone");
    match &e {
        Error::WriteOutcomeUnknown { endpoint, .. } => assert_eq!(endpoint, &a_url),
        other => panic!("expected WriteOutcomeUnknown, got {other}"),
    }
    assert_eq!(client.current_endpoint(), b.url, "the next call goes to b");
    assert_eq!(
        hits.get("k").await.expect("read on b"),
        0,
        "b never saw a write"
    );
    assert_eq!(hits.incr("k", 1).await.expect("explicit retry on b"), 1);

    // Reads fail over on their own.
    let reader = Client::connect([a_url, b.url.clone()])
        .await
        .expect("connect");
    assert_eq!(reader.current_endpoint(), b.url);
    assert_eq!(reader.counter("hits").get("k").await.expect("read"), 1);
    b.stop().await;
    let all_down = reader.counter("hits").get("k").await.expect_err("all down");
    assert!(
        matches!(all_down, Error::Unavailable { tried: 2, .. }),
        "{all_down}"
    );
}

#[tokio::test]
async fn a_region_that_never_answers_times_out() {
    // Accepts connections (the kernel's backlog) but never speaks HTTP/2.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole_url = format!("http://{}", hole.local_addr().expect("addr"));
    let b = node("eu-west", 2).await;
    Client::connect([b.url.clone()])
        .await
        .expect("connect")
        .create_keyspace("hits", KeyspaceType::Counter)
        .await
        .expect("create");
    let options = ClientOptions {
        request_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let client = Client::connect_with([hole_url.clone(), b.url.clone()], options)
        .await
        .expect("connect");
    let hits = client.counter("hits");
    // The TCP connection succeeds (the kernel accepts it), so the client
    // starts on the silent endpoint.
    assert_eq!(client.current_endpoint(), hole_url);
    let e = hits.incr("k", 1).await.expect_err("no answer");
    assert!(matches!(e, Error::WriteOutcomeUnknown { .. }), "{e}");
    assert!(e.to_string().contains("no answer within 500 ms"), "{e}");
    assert_eq!(client.current_endpoint(), b.url);
    assert_eq!(hits.get("k").await.expect("read on b"), 0);
    // A read that starts on the silent endpoint moves on by itself.
    let reader = Client::connect_with(
        [hole_url.clone(), b.url.clone()],
        ClientOptions {
            request_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("connect");
    assert_eq!(reader.counter("hits").get("k").await.expect("read"), 0);
    assert_eq!(reader.current_endpoint(), b.url);
    drop(hole);
    b.stop().await;
}

#[tokio::test]
async fn health_reports_a_serving_node_and_refuses_unknown_services() {
    let n = node("us-east", 1).await;
    let client = Client::connect([n.url.clone()]).await.expect("connect");
    assert_eq!(client.health("").await.expect("health"), Health::Serving);
    assert_eq!(
        client.health("concord.v1.Concord").await.expect("health"),
        Health::Serving
    );
    let unknown = client
        .health("no.such.Service")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
    n.stop().await;
    let gone = client.health("").await.expect_err("the node is gone");
    assert!(matches!(gone, Error::Unavailable { .. }), "{gone}");
}

#[path = "../examples/quickstart.rs"]
#[allow(dead_code)]
mod quickstart;

#[tokio::test]
async fn the_readme_example_runs_on_a_fresh_region_twice() {
    let n = node("us-east", 1).await;
    // Twice: creating keyspaces that exist is fine.
    quickstart::demo(vec![n.url.clone()])
        .await
        .expect("the example runs");
    quickstart::demo(vec![n.url.clone()])
        .await
        .expect("and runs again");
    let client = Client::connect([n.url.clone()]).await.expect("connect");
    assert_eq!(client.counter("hits").get("home").await.expect("get"), 4);
    n.stop().await;
}

#[test]
fn the_readme_shows_the_example_as_it_is() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let example = std::fs::read_to_string(root.join("crates/client/examples/quickstart.rs"))
        .expect("example");
    let block = format!("```rust\n{example}```");
    assert!(
        readme.contains(&block),
        "README.md must show crates/client/examples/quickstart.rs verbatim in a ```rust block"
    );
}
