//! The peer API's opening handshake (who may subscribe, with which clock),
//! the standard health service, and what status shows of the peers.

use std::time::{SystemTime, UNIX_EPOCH};

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
    let now = SystemTime::now()
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
