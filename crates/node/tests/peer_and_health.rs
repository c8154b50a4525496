//! The peer API's opening handshake (who may subscribe, with which clock),
//! the standard health service, and what status shows of the peers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime as StdTime, UNIX_EPOCH};

use concord_core::clock::SystemTime;
use concord_node::{Config, Connector, Node};

use concord_core::Hlc;
use concord_proto::v1 as pb;
use concord_proto::v1::replication_client::ReplicationClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod common;

const PEER: &str = r#"
max_drift_ms = 500
[[peers]]
region = "eu-west"
replica_id = 2
endpoint = "http://127.0.0.1:1"
"#;

fn hlc_at(offset_ms: i64) -> u64 {
    let now = StdTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_millis() as i64;
    Hlc::from_parts(now + offset_ms, 0).expect("hlc").as_u64()
}

fn hello(region: &str, replica_id: u32, sender_hlc: u64) -> pb::SubscriberFrame {
    pb::SubscriberFrame {
        sender_hlc,
        body: Some(pb::subscriber_frame::Body::Hello(pb::Hello {
            protocol_version: concord_proto::PEER_PROTOCOL_VERSION,
            region: region.into(),
            replica_id,
            applied: None,
            origins: Vec::new(),
        })),
    }
}

/// Opens a subscription with `first` and returns the first answer.
async fn open(
    node: &common::Node,
    first: pb::SubscriberFrame,
) -> Result<pb::ProviderFrame, tonic::Status> {
    let mut peer = ReplicationClient::new(node.channel.clone());
    let mut frames = peer
        .subscribe(tokio_stream::iter(vec![first]))
        .await?
        .into_inner();
    frames
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no frame"))
}

async fn peer_status(node: &common::Node) -> pb::PeerStatus {
    let status = node
        .client
        .clone()
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.peers.len(), 1);
    status.peers[0].clone()
}

#[tokio::test]
async fn only_configured_peers_with_sane_clocks_may_subscribe() {
    let node = common::start_with(PEER).await;

    let stranger = open(&node, hello("ap-south", 3, hlc_at(0)))
        .await
        .expect_err("unknown region");
    assert_eq!(stranger.code(), Code::PermissionDenied, "{stranger:?}");
    assert!(stranger.message().contains("ap-south"), "{stranger:?}");
    let wrong_id = open(&node, hello("eu-west", 9, hlc_at(0)))
        .await
        .expect_err("wrong replica id");
    assert_eq!(wrong_id.code(), Code::PermissionDenied);

    let not_hello = pb::SubscriberFrame {
        sender_hlc: hlc_at(0),
        body: Some(pb::subscriber_frame::Body::Heartbeat(
            pb::Heartbeat::default(),
        )),
    };
    let e = open(&node, not_hello)
        .await
        .expect_err("must open with Hello");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let ahead = open(&node, hello("eu-west", 2, hlc_at(60_000)))
        .await
        .expect_err("clock a minute ahead");
    assert_eq!(ahead.code(), Code::FailedPrecondition, "{ahead:?}");
    let status = peer_status(&node).await;
    assert!(status.clock_refused);
    assert_eq!(status.refused_clock_drift, 1);
    assert!(status.clock_skew_ms >= 59_000, "{status:?}");
    // The refused clock did not move ours.
    let ours = node
        .client
        .clone()
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .hlc;
    assert!(Hlc::from_u64(ours).unix_ms() < Hlc::from_u64(hlc_at(30_000)).unix_ms());

    let welcome = open(&node, hello("eu-west", 2, hlc_at(0)))
        .await
        .expect("configured peer");
    match welcome.body {
        Some(pb::provider_frame::Body::Welcome(w)) => {
            assert_eq!(w.region, "us-east");
            assert_eq!(w.replica_id, 1);
            assert_eq!(w.protocol_version, concord_proto::PEER_PROTOCOL_VERSION);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    let status = peer_status(&node).await;
    assert!(!status.clock_refused, "an accepted opening clears the flag");
    assert_eq!(status.region, "eu-west");
    assert_eq!(status.address, "http://127.0.0.1:1");
    assert!(status.last_contact_unix_ms > 0);
}

#[tokio::test]
async fn health_reports_serving() {
    let node = common::start().await;
    let mut health = HealthClient::new(node.channel.clone());
    for service in ["", "concord.v1.Concord"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Two nodes on pre-bound listeners, each configured with the other as a
/// peer, A dialling through a connector that counts its dials. `b_replica`
/// is B's real replica id; A always expects 2.
async fn pair(
    b_replica: u32,
) -> (
    common::Node,
    Arc<AtomicUsize>,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let b_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a_addr = a_listener.local_addr().expect("addr");
    let b_addr = b_listener.local_addr().expect("addr");
    let b_config = Config::from_toml(&format!(
        "region = \"eu-west\"\nreplica_id = {b_replica}\nlisten = \"{b_addr}\"\ndata_dir = {:?}\n\
         [[peers]]\nregion = \"us-east\"\nreplica_id = 1\nendpoint = \"http://{a_addr}\"",
        dir.path().join("b")
    ))
    .expect("config");
    let b = Node::open(b_config, SystemTime).await.expect("open b");
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(b.serve(
        tokio_stream::wrappers::TcpListenerStream::new(b_listener),
        Connector::tcp(),
        async {
            let _ = stopped_b.await;
        },
    ));

    let (connector, dials) = common::counting_connector();
    let a = common::serve_on(
        a_listener,
        &format!("[[peers]]\nregion = \"eu-west\"\nreplica_id = 2\nendpoint = \"http://{b_addr}\""),
        connector,
    )
    .await;
    (a, dials, stop_b, dir)
}

async fn wait_for_peer(
    node: &common::Node,
    done: impl Fn(&pb::PeerStatus) -> bool,
) -> pb::PeerStatus {
    for _ in 0..200 {
        let status = peer_status(node).await;
        if done(&status) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "peer status never reached the expected state: {:?}",
        peer_status(node).await
    );
}

#[tokio::test]
async fn a_node_links_to_its_peers_through_the_connector_it_is_given() {
    let (a, dials, _stop_b, _dir) = pair(2).await;
    let status = wait_for_peer(&a, |p| p.last_contact_unix_ms > 0).await;
    assert_eq!(status.region, "eu-west");
    assert!(!status.clock_refused);
    assert_eq!(status.refused_unknown_peer, 0);
    assert!(
        dials.load(Ordering::SeqCst) >= 1,
        "every dial goes through the connector"
    );
}

#[tokio::test]
async fn a_link_refuses_a_peer_that_is_not_who_the_configuration_says() {
    // B answers as replica 3 where A expects replica 2.
    let (a, _dials, _stop_b, _dir) = pair(3).await;
    let status = wait_for_peer(&a, |p| p.refused_unknown_peer > 0).await;
    assert!(!status.connected);
    let status = wait_for_peer(&a, |p| p.down_cause() == pb::LinkDownCause::PeerFault).await;
    assert_eq!(status.state(), pb::PeerState::Down);
    assert!(
        status.down_reason.contains("is not a configured peer"),
        "{status:?}"
    );
}
