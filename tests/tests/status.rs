//! What `Status` (and `concord status`) tells an operator about a peer,
//! checked between real processes: a link whose packets stop arriving
//! shows as down, silent, within [`PROMISE`]; the lag towards the peer
//! grows while this region writes; the last contact ages; a peer that
//! refuses this region shows why, with the code it refused with; and all
//! of it clears after the heal.

use std::time::Duration;

use concord_client::proto::{LinkDownCause, PeerState, PeerStatus};
use concord_client::Client;
use concord_tests::cluster::Cluster;
use concord_tests::proxy::Proxy;
use concord_tests::{cli, node_config, workload};
use tokio::time::{sleep, Instant};

/// How soon after a link's packets stop a status must show it down:
/// `CONTACT_TIMEOUT` (three missed heartbeats), with a second of slack
/// for a loaded machine.
const PROMISE: Duration = Duration::from_millis(4_000);

/// Increments written while the link is stalled.
const WRITES: u64 = 20;

async fn peer(client: &Client, region: &str) -> PeerStatus {
    let status = client.status().await.expect("status");
    status
        .peers
        .into_iter()
        .find(|p| p.region == region)
        .unwrap_or_else(|| panic!("no peer {region}"))
}

/// Polls `region`'s status at `client` until `done` holds, for at most
/// `within`; returns the status that held and when.
async fn until(
    client: &Client,
    region: &str,
    within: Duration,
    done: impl Fn(&PeerStatus) -> bool,
) -> Result<(PeerStatus, Instant), PeerStatus> {
    let deadline = Instant::now() + within;
    loop {
        let p = peer(client, region).await;
        if done(&p) {
            return Ok((p, Instant::now()));
        }
        if Instant::now() > deadline {
            return Err(p);
        }
        sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_silent_link_and_a_refusing_peer_within_seconds() {
    let mut cluster = Cluster::new(3);
    // us-east and eu-west reach each other through proxies the test
    // stalls; ap-south is dialled by us-east directly but does not know
    // it, so it refuses every subscription from it.
    let east_to_west = Proxy::start(cluster.regions[1].listen).await;
    let west_to_east = Proxy::start(cluster.regions[0].listen).await;
    let addrs: Vec<_> = cluster.regions.iter().map(|r| r.listen).collect();
    let (ew, we) = (east_to_west.addr, west_to_east.addr);
    cluster.configure(|i, j| match (i, j) {
        (0, 1) => format!("http://{ew}"),
        (1, 0) => format!("http://{we}"),
        _ => format!("http://{}", addrs[j]),
    });
    let south = &cluster.regions[2];
    let only_west = format!(
        "[[peers]]\nregion = \"eu-west\"\nreplica_id = 2\nendpoint = \"http://{}\"\n",
        addrs[1]
    );
    std::fs::write(
        &south.config,
        node_config(
            south.name,
            3,
            &south.listen.to_string(),
            &south.config.with_extension("d"),
            &only_west,
        ),
    )
    .expect("write ap-south's configuration");
    cluster.start_all();
    for e in cluster.endpoints() {
        workload::declare(&e).await;
    }
    let east = Client::connect([cluster.endpoint(0)])
        .await
        .expect("connect");
    let logs = |what: String| format!("{what}\n{}", cluster.logs());

    // Up and in sync, with nothing lacking either way.
    let up = |p: &PeerStatus| {
        p.connected && p.state() == PeerState::InSync && p.peer_lacks_ops == 0 && p.lag_ops == 0
    };
    if let Err(p) = until(&east, "eu-west", Duration::from_secs(20), up).await {
        panic!("{}", logs(format!("eu-west never in sync: {p:?}")));
    }
    // The refusing peer: down, refused, with the code it refused with.
    let refused = |p: &PeerStatus| {
        p.state() == PeerState::Down
            && p.down_cause() == LinkDownCause::Refused
            && p.down_reason.contains("PERMISSION_DENIED")
    };
    if let Err(p) = until(&east, "ap-south", Duration::from_secs(10), refused).await {
        panic!("{}", logs(format!("ap-south's refusal not shown: {p:?}")));
    }

    let west = Client::connect([cluster.endpoint(1)])
        .await
        .expect("connect");
    let west_had = west.counter("hits").get("k").await.expect("get");

    // Packets stop both ways: down, silent, within the promise.
    east_to_west.stall();
    west_to_east.stall();
    let stalled_at = Instant::now();
    let down = |p: &PeerStatus| {
        !p.connected
            && p.state() == PeerState::Down
            && p.down_cause() == LinkDownCause::Silent
            && p.down_for_ms > 0
    };
    let (shown, at) = match until(&east, "eu-west", PROMISE * 2, down).await {
        Ok(shown) => shown,
        Err(p) => panic!("{}", logs(format!("the stall never showed: {p:?}"))),
    };
    let took = at.duration_since(stalled_at);
    assert!(
        took <= PROMISE,
        "the stall showed after {took:?}, later than promised ({PROMISE:?}): {shown:?}"
    );
    // eu-west sees us-east down too.
    if let Err(p) = until(&west, "us-east", PROMISE, down).await {
        panic!("{}", logs(format!("eu-west still shows us-east up: {p:?}")));
    }

    // us-east keeps writing: what eu-west lacks grows, and the last
    // contact ages.
    let hits = east.counter("hits");
    for _ in 0..WRITES {
        hits.incr("k", 1)
            .await
            .expect("a write while the link is down");
    }
    let lagging = |p: &PeerStatus| {
        p.state() == PeerState::Down
            && p.peer_lacks_ops >= WRITES
            && p.peer_lacks_ms > 0
            && p.last_contact_age_ms >= 3_000
    };
    if let Err(p) = until(&east, "eu-west", Duration::from_secs(10), lagging).await {
        panic!(
            "{}",
            logs(format!("the lag towards eu-west never showed: {p:?}"))
        );
    }

    // The CLI's table says the same in words.
    let endpoint = cluster.endpoint(0);
    let out = cli(&["--endpoint", &endpoint, "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("eu-west"))
        .unwrap_or_else(|| panic!("no eu-west row: {text}"));
    assert!(row.contains("down"), "{row}");
    assert!(
        text.contains("eu-west down for") && text.contains("(silent)"),
        "{text}"
    );
    assert!(
        text.contains("(refused): refused: PERMISSION_DENIED"),
        "{text}"
    );

    // After the heal: in sync again, nothing lacking.
    east_to_west.heal();
    west_to_east.heal();
    if let Err(p) = until(&east, "eu-west", Duration::from_secs(30), up).await {
        panic!(
            "{}",
            logs(format!("eu-west not in sync after the heal: {p:?}"))
        );
    }
    // In sync means it: eu-west holds every write us-east made meanwhile.
    let west_has = west.counter("hits").get("k").await.expect("get");
    assert_eq!(west_has, west_had + WRITES as i64);
}
