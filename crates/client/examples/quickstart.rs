//! The README's SDK example: `cargo run -p concord-client --example
//! quickstart` against a running region (`concord dev`), or with the
//! endpoints as arguments. A new project needs `concord-client`, `tokio`
//! (features `macros` and `rt-multi-thread`) and `tokio-stream`.

use concord_client::{BatchResult, Client, KeyspaceType};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> concord_client::Result<()> {
    let mut endpoints: Vec<String> = std::env::args().skip(1).collect();
    if endpoints.is_empty() {
        endpoints = vec![
            "http://127.0.0.1:7101".into(),
            "http://127.0.0.1:7102".into(),
        ];
    }
    demo(endpoints).await
}

/// Creates three keyspaces (creating one that exists is fine), writes to
/// each, follows a stream and runs a batch.
pub async fn demo(endpoints: Vec<String>) -> concord_client::Result<()> {
    let client = Client::connect(endpoints).await?;
    client
        .create_keyspace("hits", KeyspaceType::Counter)
        .await?;
    client.create_keyspace("tags", KeyspaceType::Set).await?;
    client
        .create_keyspace("orders", KeyspaceType::Stream)
        .await?;

    let hits = client.counter("hits").incr("home", 1).await?;
    println!("hits/home is {hits} in this region");

    let orders = client.stream("orders");
    let id = orders.append("eu", [("sku", "A-1"), ("qty", "2")]).await?;
    // Follow the stream after that entry: every entry appended later, in
    // any region, arrives here.
    let mut live = orders.subscribe("eu", Some(id)).await?;
    let next = orders.append("eu", [("sku", "B-7"), ("qty", "1")]).await?;
    if let Some(entry) = live.next().await {
        let entry = entry?;
        assert_eq!(entry.id, next);
        println!("followed {} (appended after {id})", entry.id);
    }

    let results = client
        .batch() // one atomic round trip
        .counter_incr("hits", "home", 1)
        .set_add("tags", "post:1", ["rust"])
        .run()
        .await?;
    if let Some(BatchResult::Counter(value)) = results.first() {
        println!("after the batch, hits/home is {value}");
    }
    Ok(())
}
