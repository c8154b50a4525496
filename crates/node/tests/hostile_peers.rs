//! A node's link facing a broken or hostile peer: a fake provider answers
//! the handshake correctly, then sends one bad thing. Each is refused with
//! a clear cause on the peer's status, nothing of it is applied, and the
//! node keeps serving its clients.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime as StdTime, UNIX_EPOCH};

use concord_core::{CrdtType, Delta, Hlc, Op, ReplicaId};
use concord_proto::v1 as pb;
use concord_proto::v1::replication_server::{Replication, ReplicationServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

mod common;

fn hlc_at(offset_ms: i64) -> u64 {
    let now = StdTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_millis() as i64;
    Hlc::from_parts(now + offset_ms, 0).expect("hlc").as_u64()
}

/// Answers every subscription with a Welcome as eu-west (replica 2), then
/// `frames` (`pace` apart), then keeps the stream open; reports each ack's
/// seq of origin 2 to `acks`, when set.
struct Fake {
    frames: Vec<pb::ProviderFrame>,
    pace: Duration,
    acks: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
}

#[tonic::async_trait]
impl Replication for Fake {
    type SubscribeStream = ReceiverStream<Result<pb::ProviderFrame, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscriberFrame>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        if let Some(acks) = self.acks.clone() {
            let mut inbound = request.into_inner();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = inbound.message().await {
                    if let Some(pb::subscriber_frame::Body::Ack(ack)) = frame.body {
                        let seq = ack.applied.and_then(|v| v.seqs.get(&2).copied());
                        let _ = acks.send(seq.unwrap_or(0));
                    }
                }
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let welcome = pb::ProviderFrame {
            sender_hlc: hlc_at(0),
            body: Some(pb::provider_frame::Body::Welcome(pb::Welcome {
                protocol_version: concord_proto::PEER_PROTOCOL_VERSION,
                region: "eu-west".into(),
                replica_id: 2,
                applied: None,
            })),
        };
        let (frames, pace) = (self.frames.clone(), self.pace);
        tokio::spawn(async move {
            let _ = tx.send(Ok(welcome)).await;
            for f in frames {
                let _ = tx.send(Ok(f)).await;
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            // Hold the stream open; the node ends it.
            tx.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves a [`Fake`] provider on 127.0.0.1; returns its address.
async fn fake(frames: Vec<pb::ProviderFrame>) -> std::net::SocketAddr {
    serve_fake(Fake {
        frames,
        pace: Duration::ZERO,
        acks: None,
    })
    .await
}

async fn serve_fake(fake: Fake) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicationServer::new(fake).max_encoding_message_size(64 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn declare(seq: u64, name: &str) -> Delta {
    Delta {
        origin: ReplicaId(2),
        seq,
        hlc: Hlc::from_u64(hlc_at(0)),
        keyspace: name.into(),
        key: String::new(),
        op: Op::Declare(CrdtType::Counter),
    }
}

fn batch(sender_hlc: u64, deltas: Vec<Delta>) -> pb::ProviderFrame {
    let encoded = deltas.iter().map(Delta::encode).collect();
    raw_batch(sender_hlc, encoded)
}

fn raw_batch(sender_hlc: u64, deltas: Vec<Vec<u8>>) -> pb::ProviderFrame {
    pb::ProviderFrame {
        sender_hlc,
        body: Some(pb::provider_frame::Body::Deltas(pb::DeltaBatch { deltas })),
    }
}

/// Runs a node whose one peer is the fake, and waits until `refused`
/// says the fake's data was refused; returns the peer's status and what
/// the node applied from origin 2.
async fn against(
    frames: Vec<pb::ProviderFrame>,
    refused: impl Fn(&pb::PeerStatus) -> bool,
) -> (pb::PeerStatus, u64, u64) {
    let fake_addr = fake(frames).await;
    let node = common::start_with(&format!(
        "max_drift_ms = 500\n[[peers]]\nregion = \"eu-west\"\nreplica_id = 2\nendpoint = \"http://{fake_addr}\""
    ))
    .await;
    for _ in 0..200 {
        let status = node
            .client
            .clone()
            .status(pb::StatusRequest {})
            .await
            .expect("the node keeps serving")
            .into_inner();
        let peer = status.peers[0].clone();
        if refused(&peer) {
            let applied = status
                .applied
                .and_then(|vv| vv.seqs.get(&2).copied())
                .unwrap_or(0);
            // Its clients are still served.
            let created = node
                .client
                .clone()
                .create_keyspace(pb::CreateKeyspaceRequest {
                    name: "still-here".into(),
                    r#type: pb::CrdtType::Set.into(),
                })
                .await
                .expect("create");
            assert!(created.into_inner().created);
            return (peer, applied, status.hlc);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the bad data was never refused");
}

#[tokio::test]
async fn a_batch_with_a_gap_is_refused_whole() {
    // seq 1 is fine, seq 3 skips 2: nothing of the batch may land.
    let frames = vec![batch(hlc_at(0), vec![declare(1, "a"), declare(3, "b")])];
    let (peer, applied, _) = against(frames, |p| p.refused_bad_batch > 0).await;
    assert_eq!(applied, 0, "{peer:?}");
    assert_eq!(peer.refused_clock_drift, 0);
}

#[tokio::test]
async fn an_undecodable_operation_is_refused() {
    // A good delta, then one cut short: nothing of the batch may land.
    let cut = declare(2, "b").encode();
    let frames = vec![raw_batch(
        hlc_at(0),
        vec![declare(1, "a").encode(), cut[..cut.len() - 1].to_vec()],
    )];
    let (_, applied, _) = against(frames, |p| p.refused_bad_batch > 0).await;
    assert_eq!(applied, 0);
}

#[tokio::test]
async fn a_far_future_clock_is_refused_and_does_not_move_ours() {
    let frames = vec![batch(hlc_at(3_600_000), vec![declare(1, "a")])];
    let (peer, applied, ours) = against(frames, |p| p.refused_clock_drift > 0).await;
    assert_eq!(applied, 0);
    assert!(
        Hlc::from_u64(ours).unix_ms() < Hlc::from_u64(hlc_at(60_000)).unix_ms(),
        "the refused clock must not move ours"
    );
    assert!(peer.clock_refused);
    assert!(peer.clock_skew_ms > 3_000_000, "{peer:?}");
}

#[tokio::test]
async fn a_delta_with_a_far_future_clock_inside_a_sane_frame_is_refused() {
    let mut future = declare(1, "a");
    future.hlc = Hlc::from_u64(hlc_at(3_600_000));
    let frames = vec![batch(hlc_at(0), vec![future])];
    let (_, applied, _) = against(frames, |p| p.refused_clock_drift > 0).await;
    assert_eq!(applied, 0);
}

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let mut huge = declare(1, "a");
    huge.key = "k".repeat(20 << 20);
    let frames = vec![batch(hlc_at(0), vec![huge])];
    let (_, applied, _) = against(frames, |p| p.refused_bad_batch > 0).await;
    assert_eq!(applied, 0);
}

#[tokio::test]
async fn a_good_batch_from_the_same_fake_is_applied() {
    // The control: the fake's framing is right, so the refusals above are
    // about their content.
    let frames = vec![batch(hlc_at(0), vec![declare(1, "a"), declare(2, "b")])];
    let (peer, applied, _) = against(frames, |p| p.deltas_received >= 2).await;
    assert_eq!(applied, 2);
    assert_eq!(peer.refused_bad_batch + peer.refused_clock_drift, 0);
}

#[tokio::test]
async fn batches_arriving_together_are_all_applied_once() {
    // Six full frames back to back, with a heartbeat among them: more
    // than one transaction's worth, so the link applies several frames
    // together, holds back the frame that does not fit, and the heartbeat
    // in between, and must still apply every delta exactly once.
    let per_frame = 1000u64;
    let mut frames = Vec::new();
    for f in 0..6 {
        if f == 3 {
            frames.push(pb::ProviderFrame {
                sender_hlc: hlc_at(0),
                body: Some(pb::provider_frame::Body::Heartbeat(pb::Heartbeat {
                    applied: None,
                    wall_unix_ms: 0,
                })),
            });
        }
        let deltas = (f * per_frame + 1..=(f + 1) * per_frame)
            .map(|seq| declare(seq, &format!("k{seq}")))
            .collect();
        frames.push(batch(hlc_at(0), deltas));
    }
    assert!(6 * per_frame as usize > concord_node::replicate::APPLY_MAX_DELTAS);
    let (peer, applied, _) = against(frames, |p| p.deltas_received >= 6 * per_frame).await;
    assert_eq!(applied, 6 * per_frame);
    assert_eq!(peer.deltas_received, 6 * per_frame, "{peer:?}");
    assert_eq!(peer.refused_bad_batch + peer.refused_clock_drift, 0);
}

#[tokio::test]
async fn a_link_acknowledges_a_steady_stream_of_batches_at_most_once_per_ack_interval() {
    use concord_node::link::ACK_INTERVAL;
    let n = 120u64;
    let frames = (1..=n)
        .map(|seq| batch(hlc_at(0), vec![declare(seq, &format!("k{seq}"))]))
        .collect();
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let fake_addr = serve_fake(Fake {
        frames,
        pace: Duration::from_millis(2),
        acks: Some(acks_tx),
    })
    .await;
    let _node = common::start_with(&format!(
        "[[peers]]\nregion = \"eu-west\"\nreplica_id = 2\nendpoint = \"http://{fake_addr}\""
    ))
    .await;
    let mut count = 0u32;
    let mut first = None;
    let last = loop {
        let seq = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("acks keep coming")
            .expect("the fake is up");
        let now = std::time::Instant::now();
        count += 1;
        first.get_or_insert(now);
        if seq == n {
            break now;
        }
    };
    // One batch about every 2 ms for a quarter of a second, and each is
    // its own flush: an ack per batch would be about n acks. Paced, acks
    // leave at least ACK_INTERVAL apart however slow the machine (one
    // more for their arrival's jitter).
    let span = last - first.expect("an ack");
    let most = (span.as_millis() / ACK_INTERVAL.as_millis()) as u32 + 2;
    assert!(count <= most, "{count} acks in {span:?}; at most {most}");
}

#[tokio::test]
async fn a_batch_over_the_delta_limit_is_refused() {
    let deltas = (1..=concord_node::replicate::BATCH_MAX_DELTAS as u64 + 1)
        .map(|seq| declare(seq, &format!("k{seq}")))
        .collect();
    let frames = vec![batch(hlc_at(0), deltas)];
    let (_, applied, _) = against(frames, |p| p.refused_bad_batch > 0).await;
    assert_eq!(applied, 0);
}

#[tokio::test]
async fn a_peer_that_falls_silent_is_given_up_and_dialled_again() {
    // The fake answers the handshake, then sends nothing at all (no
    // heartbeats): the link must notice within the silence timeout and
    // reconnect, not wait on the stream forever.
    let addr = fake(Vec::new()).await;
    let (connector, dials) = common::counting_connector();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let _node = common::serve_on(
        listener,
        &format!("[[peers]]\nregion = \"eu-west\"\nreplica_id = 2\nendpoint = \"http://{addr}\""),
        connector,
    )
    .await;
    let deadline = tokio::time::Instant::now()
        + concord_node::replicate::SILENCE_TIMEOUT
        + Duration::from_secs(5);
    while dials.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link kept waiting on a silent peer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
