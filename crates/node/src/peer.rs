//! The peer side of the node: the configured peer regions, what is known
//! of each ([`Peers`], shown by `Status`), and the `concord.v1.Replication`
//! service other regions subscribe to.
//!
//! The service checks every subscription's opening ([`crate::handshake`]):
//! the first frame must be a `Hello` within [`HELLO_TIMEOUT`], in protocol
//! version [`concord_proto::PEER_PROTOCOL_VERSION`], from a configured
//! region with its configured replica id, with a clock no further ahead
//! than `max_drift_ms`. A refused opening is counted per cause and ends the
//! stream with a clear status. An accepted one is answered with `Welcome`,
//! and `replicate::Provider` streams the deltas.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_core::Hlc;
use concord_proto::v1 as pb;
use concord_proto::v1::replication_server::Replication;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::PeerConfig;
use crate::engine::Engine;
use crate::error::NodeError;
use crate::handshake::{check_hello, observe_clock, welcome, LinkError, PeerFault};
use crate::replicate::{origins, Provider};

/// Longest wait for a subscriber's `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued towards one subscriber.
pub const PROVIDER_QUEUE_FRAMES: usize = 64;

/// The configured peer regions and what this node knows of each.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    peers: Arc<Vec<Peer>>,
    unknown_refused: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped whenever a peer link goes up or down.
    reachability: Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    status: Mutex<pb::PeerStatus>,
}

/// Why a subscription's opening was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's clock is too far ahead.
    ClockDrift,
    /// The frames were malformed or out of protocol.
    BadBatch,
    /// The peer is not configured.
    UnknownPeer,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::ClockDrift => "clock_drift",
            Refusal::BadBatch => "bad_batch",
            Refusal::UnknownPeer => "unknown_peer",
        }
    }
}

impl Peers {
    /// The peers of a configuration, none of them connected yet.
    pub fn new(configs: &[PeerConfig]) -> Self {
        let mut peers: Vec<Peer> = configs
            .iter()
            .map(|c| Peer {
                config: c.clone(),
                status: Mutex::new(pb::PeerStatus {
                    region: c.region.clone(),
                    replica_id: c.replica_id,
                    address: c.endpoint.clone(),
                    ..pb::PeerStatus::default()
                }),
            })
            .collect();
        peers.sort_by(|a, b| a.config.region.cmp(&b.config.region));
        Peers {
            peers: Arc::new(peers),
            unknown_refused: Arc::default(),
            reachability: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The status of every peer, sorted by region name.
    pub fn status(&self) -> Vec<pb::PeerStatus> {
        self.peers.iter().map(|p| lock(&p.status).clone()).collect()
    }

    /// Number of configured peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is configured.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The configuration of peer `i` (in region-name order).
    pub(crate) fn config(&self, i: usize) -> &PeerConfig {
        &self.peers[i].config
    }

    /// Records a message from peer `i` carrying the peer's clock `remote`.
    pub(crate) fn contact(&self, i: usize, remote: Hlc, local_ms: i64) {
        self.peers[i].contact(remote, local_ms);
    }

    /// Records whether a replication stream with peer `i` is open.
    pub(crate) fn set_connected(&self, i: usize, connected: bool) {
        let changed = {
            let mut status = lock(&self.peers[i].status);
            let changed = status.connected != connected;
            status.connected = connected;
            changed
        };
        if changed {
            self.reachability.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that sees a change whenever a peer link goes up or down.
    pub(crate) fn reachability(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reachability.subscribe()
    }

    /// Replica ids of the peers, other than peer `except`, whose links are
    /// up: their deltas arrive from them directly.
    pub(crate) fn reached_directly(&self, except: usize) -> Vec<u32> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != except && lock(&p.status).connected)
            .map(|(_, p)| p.config.replica_id)
            .collect()
    }

    /// Records an accepted clock from peer `i`.
    pub(crate) fn clock_accepted(&self, i: usize) {
        lock(&self.peers[i].status).clock_refused = false;
    }

    /// Counts deltas and bytes sent to peer `i`.
    pub(crate) fn sent(&self, i: usize, deltas: u64, bytes: u64) {
        let mut status = lock(&self.peers[i].status);
        status.deltas_sent += deltas;
        status.bytes_sent += bytes;
        metrics::counter!("concord_peer_deltas_sent_total", "peer" => self.peers[i].config.region.clone())
            .increment(deltas);
        metrics::counter!("concord_peer_bytes_sent_total", "peer" => self.peers[i].config.region.clone())
            .increment(bytes);
    }

    /// Counts deltas applied and bytes received from peer `i`.
    pub(crate) fn received(&self, i: usize, deltas: u64, bytes: u64) {
        let mut status = lock(&self.peers[i].status);
        status.deltas_received += deltas;
        status.bytes_received += bytes;
        metrics::counter!("concord_peer_deltas_received_total", "peer" => self.peers[i].config.region.clone())
            .increment(deltas);
        metrics::counter!("concord_peer_bytes_received_total", "peer" => self.peers[i].config.region.clone())
            .increment(bytes);
    }

    /// Records how many deltas peer `i` has that this node lacks; none
    /// means no lag in time either.
    pub(crate) fn lag(&self, i: usize, ops: u64) {
        let mut status = lock(&self.peers[i].status);
        status.lag_ops = ops;
        if ops == 0 {
            status.lag_ms = 0;
        }
        drop(status);
        metrics::gauge!("concord_peer_lag_ops", "peer" => self.peers[i].config.region.clone())
            .set(ops as f64);
    }

    /// Records how late, in milliseconds, the newest delta of a batch from
    /// peer `i` arrived.
    pub(crate) fn delay(&self, i: usize, ms: u64) {
        lock(&self.peers[i].status).lag_ms = ms;
        metrics::histogram!("concord_replication_delay_seconds", "peer" => self.peers[i].config.region.clone())
            .record(ms as f64 / 1000.0);
    }

    /// The replica ids of every configured peer.
    pub fn replica_ids(&self) -> Vec<u32> {
        self.peers.iter().map(|p| p.config.replica_id).collect()
    }

    /// Counts a refusal of something peer `i` sent.
    pub(crate) fn refused_by_index(&self, i: usize, why: Refusal) {
        self.refused(&self.peers[i], why);
    }

    /// Openings refused because the caller was not a configured peer.
    pub fn unknown_refused(&self) -> u64 {
        self.unknown_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The index of the peer configured as `region` with `replica_id`.
    pub(crate) fn find(&self, region: &str, replica_id: u32) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.config.region == region && p.config.replica_id == replica_id)
    }

    /// Counts a refused opening from a caller that is no configured peer
    /// (or did not say who it is).
    pub(crate) fn refused_unknown(&self, why: Refusal) {
        metrics::counter!("concord_peer_refusals_total", "cause" => why.label()).increment(1);
        self.unknown_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn refused(&self, peer: &Peer, why: Refusal) {
        metrics::counter!("concord_peer_refusals_total", "cause" => why.label()).increment(1);
        let mut status = lock(&peer.status);
        match why {
            Refusal::ClockDrift => {
                status.refused_clock_drift += 1;
                status.clock_refused = true;
            }
            Refusal::BadBatch => status.refused_bad_batch += 1,
            Refusal::UnknownPeer => status.refused_unknown_peer += 1,
        }
    }
}

impl Peer {
    fn contact(&self, remote: Hlc, local_ms: i64) {
        let mut status = lock(&self.status);
        status.last_contact_unix_ms = u64::try_from(local_ms).unwrap_or(0);
        status.clock_skew_ms = remote.unix_ms().saturating_sub(local_ms);
    }
}

fn lock(m: &Mutex<pb::PeerStatus>) -> std::sync::MutexGuard<'_, pb::PeerStatus> {
    // A panic while holding the lock leaves plain counters behind; they
    // are still worth showing.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `concord.v1.Replication` service.
#[derive(Debug, Clone)]
pub struct PeerService {
    engine: Engine,
    peers: Peers,
}

impl PeerService {
    /// The service of a node with `engine` and `peers`.
    pub fn new(engine: Engine, peers: Peers) -> Self {
        PeerService { engine, peers }
    }

    /// Reads and checks a subscription's opening; returns the peer's
    /// `Hello` and the index of the peer it came from.
    async fn opening(
        &self,
        inbound: &mut Streaming<pb::SubscriberFrame>,
    ) -> Result<(pb::Hello, usize), Status> {
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                self.peers.refused_unknown(Refusal::BadBatch);
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {} s",
                    HELLO_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "the stream ended before its Hello",
                ))
            }
            Ok(Ok(Some(frame))) => frame,
        };
        let Some(pb::subscriber_frame::Body::Hello(hello)) = first.body else {
            self.peers.refused_unknown(Refusal::BadBatch);
            return Err(LinkError::Peer(PeerFault::NoOpening("Hello")).into());
        };
        let index = check_hello(&self.engine, &self.peers, &hello)?;
        if let Err(e) = observe_clock(&self.engine, &self.peers, index, first.sender_hlc) {
            if let LinkError::Clock(_) = e {
                let region = &self.peers.config(index).region;
                tracing::warn!(peer = %region, error = %e, "refused a peer whose clock is too far ahead; fix its clock");
            }
            return Err(e.into());
        }
        Ok((hello, index))
    }
}

#[tonic::async_trait]
impl Replication for PeerService {
    type SubscribeStream = ReceiverStream<Result<pb::ProviderFrame, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscriberFrame>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let (hello, index) = self.opening(&mut inbound).await?;
        tracing::debug!(peer = %self.peers.config(index).region, origins = ?hello.origins, "peer subscribed");
        let applied = self
            .engine
            .store()
            .version_vector()
            .map_err(NodeError::from)?;
        let welcome = pb::ProviderFrame {
            sender_hlc: self.engine.clock().now().map_err(NodeError::from)?.as_u64(),
            body: Some(pb::provider_frame::Body::Welcome(welcome(
                &self.engine,
                &applied,
            ))),
        };
        let (tx, rx) = mpsc::channel(PROVIDER_QUEUE_FRAMES);
        // The queue is new and empty: this cannot block.
        let _ = tx.try_send(Ok(welcome));
        let provider = Provider {
            engine: self.engine.clone(),
            peers: self.peers.clone(),
            index,
            sent: hello.applied.unwrap_or_default().into(),
            origins: origins(&hello.origins),
        };
        tokio::spawn(provider.run(inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
