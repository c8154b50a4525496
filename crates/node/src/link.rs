//! The node's outbound side: one long-lived link per configured peer,
//! dialled through the caller's [`Connector`].
//!
//! A link connects, opens the peer's `Subscribe` stream with a `Hello`
//! (this region, its replica id, its applied vector), and checks the
//! answer: a `Welcome` from the region and replica id configured for that
//! endpoint, in this protocol version, with a clock within `max_drift_ms`.
//! It then applies what the peer streams (`replicate::Applier`),
//! observing each frame's clock and applying the delta batches that
//! arrived together in one transaction; it acknowledges what it applied
//! once that is durable (see `Acks`) and sends heartbeats, until the
//! stream ends; status shows the peer connected meanwhile, as long as
//! frames arrive (`peer::CONTACT_TIMEOUT`). Any failure is
//! retried after a backoff that doubles from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`] and starts over only after a session that lasted longer
//! than [`BACKOFF_MAX`], so a peer that accepts and drops at once is not
//! hammered. A new session resumes from this node's applied vector.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use concord_core::VersionVector;
use concord_proto::v1 as pb;
use concord_proto::v1::replication_client::ReplicationClient;
use concord_store::Store;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::Streaming;

use crate::connect::Connector;
use crate::engine::Engine;
use crate::error::NodeError;
use crate::handshake::{check_welcome, hello, observe_clock, LinkError, PeerFault};
use crate::peer::Peers;
use crate::replicate::{Applier, APPLY_MAX_DELTAS, HEARTBEAT, SILENCE_TIMEOUT};
use crate::server::{KEEPALIVE, MAX_MESSAGE_BYTES};

/// Longest wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a peer's `Welcome` after the stream opens.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// First wait before reconnecting to a peer.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait before reconnecting to a peer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Frames queued towards one peer.
pub const SUBSCRIBER_QUEUE_FRAMES: usize = 64;

/// Least time between two acknowledgements on one link. Acks let the peer
/// truncate its logs (every `TRUNCATE_EVERY`) and skip what this node has
/// when it sends again; its provider sends on without them. Each costs a
/// journal flush here and a frame and a store write at the peer, so one
/// per applied batch cost about as much as the batches under a steady load
/// (docs/BENCHMARKS.md).
pub const ACK_INTERVAL: Duration = Duration::from_millis(20);

/// Starts one link per configured peer; they stop when `stop` turns true.
pub(crate) fn spawn_links(
    engine: &Engine,
    peers: &Peers,
    connector: &Connector,
    stop: &watch::Receiver<bool>,
) {
    for i in 0..peers.len() {
        let link = Link {
            engine: engine.clone(),
            peers: peers.clone(),
            index: i,
            connector: connector.clone(),
        };
        tokio::spawn(link.run(stop.clone()));
    }
}

struct Link {
    engine: Engine,
    peers: Peers,
    index: usize,
    connector: Connector,
}

impl Link {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let region = self.peers.config(self.index).region.clone();
        let mut backoff = BACKOFF_MIN;
        let mut last_failure: Option<String> = None;
        // Whether "link up" was logged since the last new failure: a peer
        // that keeps failing the same way after the handshake is logged
        // once, not every retry.
        let mut announced = false;
        loop {
            let started = tokio::time::Instant::now();
            let ended = tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return,
                ended = self.session(&mut announced) => ended,
            };
            let failure = match ended {
                Ok(()) => LinkError::Ended,
                Err(e) => e,
            };
            let now_ms = self.engine.clock().physical_unix_ms();
            self.peers.link_down(self.index, &failure, now_ms);
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            let failure = failure.to_string();
            // Say it once; repeats of the same failure go to debug.
            if last_failure.as_deref() != Some(failure.as_str()) {
                announced = false;
                tracing::warn!(peer = %region, failure = %failure, retry_ms = backoff.as_millis() as u64, "peer link down");
            } else {
                tracing::debug!(peer = %region, failure = %failure, "peer link still down");
            }
            last_failure = Some(failure);
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: the opening, then frames until the stream ends.
    async fn session(&self, announced: &mut bool) -> Result<(), LinkError> {
        let opened = self.open().await?;
        self.peers.link_up(self.index);
        if !*announced {
            tracing::info!(peer = %self.peers.config(self.index).region, "peer link up");
            *announced = true;
        }
        self.stream(opened).await
    }

    /// Connects, sends the `Hello` and checks the `Welcome`
    /// ([`crate::handshake`]).
    async fn open(&self) -> Result<Opened, LinkError> {
        let config = self.peers.config(self.index);
        let unreachable = |reason: String| LinkError::Unreachable {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| unreachable(format!("not an endpoint: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect_with_connector(self.connector.clone())
            .await
            .map_err(|e| unreachable(concord_proto::error_chain(&e)))?;
        let mut client = ReplicationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let applied = self
            .engine
            .store()
            .version_vector()
            .map_err(NodeError::from)?;
        let mut known: BTreeSet<u32> = applied.iter().map(|(origin, _)| origin.0).collect();
        let interest = self.interest(&known);
        let hello = self.frame(pb::subscriber_frame::Body::Hello(hello(
            &self.engine,
            &applied,
            interest.clone(),
        )))?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE_FRAMES);
        tx.send(hello).await.map_err(|_| LinkError::Closed)?;
        let waited = || LinkError::NoAnswer {
            within_s: HANDSHAKE_TIMEOUT.as_secs(),
        };
        let opened =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, client.subscribe(ReceiverStream::new(rx)))
                .await
                .map_err(|_| waited())?
                .map_err(|s| LinkError::status("refused", &s))?;
        let mut frames = opened.into_inner();
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.message())
            .await
            .map_err(|_| waited())?
            .map_err(|s| LinkError::status("refused", &s))?
            .ok_or(LinkError::Ended)?;
        self.observe(first.sender_hlc)?;
        let Some(pb::provider_frame::Body::Welcome(welcome)) = first.body else {
            return Err(self.fault(PeerFault::NoOpening("Welcome")));
        };
        check_welcome(&self.peers, self.index, &welcome).map_err(|f| self.fault(f))?;
        if let Some(theirs) = &welcome.applied {
            known.extend(theirs.seqs.keys());
        }
        let holds: VersionVector = welcome.applied.clone().unwrap_or_default().into();
        self.peers.peer_holds(self.index, &holds, true);
        Ok(Opened {
            tx,
            frames,
            known,
            interest,
        })
    }

    /// Applies what the peer streams, acknowledges it once durable, and
    /// sends heartbeats and changes of interest, until the stream ends.
    async fn stream(&self, opened: Opened) -> Result<(), LinkError> {
        let Opened {
            tx,
            mut frames,
            mut known,
            mut interest,
        } = opened;
        let store = self.engine.store();
        let mut applier = Applier::new(self.engine.clone(), self.peers.clone(), self.index);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_frame = tokio::time::Instant::now();
        let mut reachability = self.peers.reachability();
        let mut acks = Acks::new(store.clone());
        // A frame taken in while gathering delta batches, handled next.
        let mut held: Option<pb::ProviderFrame> = None;
        loop {
            // Ask this peer for its own deltas and for those of every
            // origin this node does not reach directly right now.
            let wanted = self.interest(&known);
            if wanted != interest {
                tracing::debug!(peer = %self.peers.config(self.index).region, origins = ?wanted, "interest changed");
                let body = pb::subscriber_frame::Body::Interest(pb::Interest {
                    origins: wanted.clone(),
                });
                self.send(&tx, body).await?;
                interest = wanted;
            }
            let silent_until = last_frame + SILENCE_TIMEOUT;
            let frame = match held.take() {
                Some(frame) => Some(frame),
                // Biased, in a fixed order, so that the same events always
                // take the same branch (the simulator replays runs
                // exactly); the rare events go first so a busy stream
                // never starves acknowledgements or heartbeats.
                None => tokio::select! {
                biased;
                durable = acks.flushed() => {
                    let ack = pb::Ack { applied: Some((&durable?).into()) };
                    self.send(&tx, pb::subscriber_frame::Body::Ack(ack)).await?;
                    continue;
                }
                _ = heartbeat.tick() => {
                    self.heartbeat(&tx, &mut acks).await?;
                    continue;
                }
                _ = reachability.changed() => continue,
                // Before the silence: after a long apply, a frame that
                // arrived meanwhile is read, not taken for silence.
                frame = frames.message() => {
                    last_frame = tokio::time::Instant::now();
                    let frame = frame.map_err(|s| self.stream_failed(&s))?;
                    if let Some(frame) = &frame {
                        self.observe(frame.sender_hlc)?;
                    }
                    frame
                }
                () = tokio::time::sleep_until(silent_until) => {
                    return Err(LinkError::Silent {
                        silent_s: SILENCE_TIMEOUT.as_secs(),
                        heartbeat_s: HEARTBEAT.as_secs(),
                    });
                }
                },
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            if let Some(pb::provider_frame::Body::Heartbeat(beat)) = &frame.body {
                if let Some(theirs) = &beat.applied {
                    known.extend(theirs.seqs.keys());
                }
            }
            let bytes = prost::Message::encoded_len(&frame) as u64;
            self.peers.link_applying(self.index, true);
            let applied = match frame.body {
                Some(pb::provider_frame::Body::Deltas(batch)) => {
                    let Some((batches, bytes)) = self
                        .gather(batch, bytes, &mut frames, &mut last_frame, &mut held)
                        .await?
                    else {
                        return Ok(());
                    };
                    applier.apply_deltas(batches, bytes).await
                }
                body => applier.apply(pb::ProviderFrame { body, ..frame }).await,
            };
            self.peers.link_applying(self.index, false);
            if applied? {
                acks.due(store.version_vector().map_err(NodeError::from)?);
            }
        }
    }

    /// Sends a frame to the peer.
    async fn send(
        &self,
        tx: &mpsc::Sender<pb::SubscriberFrame>,
        body: pb::subscriber_frame::Body,
    ) -> Result<(), LinkError> {
        tx.send(self.frame(body)?)
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Sends a heartbeat with this node's vector, and asks for it to be
    /// acknowledged: deltas arriving over other links change the vector
    /// too, and the peer learns of them only from here, and needs them
    /// acknowledged to truncate its logs.
    async fn heartbeat(
        &self,
        tx: &mpsc::Sender<pb::SubscriberFrame>,
        acks: &mut Acks,
    ) -> Result<(), LinkError> {
        let applied = self
            .engine
            .store()
            .version_vector()
            .map_err(NodeError::from)?;
        acks.due(applied.clone());
        let wall_unix_ms = u64::try_from(self.engine.clock().physical_unix_ms()).unwrap_or(0);
        let beat = pb::Heartbeat {
            applied: Some((&applied).into()),
            wall_unix_ms,
        };
        self.send(tx, pb::subscriber_frame::Body::Heartbeat(beat))
            .await
    }

    /// The delta batches already received after `first`, taken in to be
    /// applied with it in one transaction: under load the link keeps up by
    /// applying more per transaction, not by queueing. At most
    /// [`APPLY_MAX_DELTAS`]; a frame of another kind, or a batch that
    /// would go past it, is left in `held`. `None` when the stream ended
    /// meanwhile (what was taken in is fetched again on the next
    /// connection).
    async fn gather(
        &self,
        first: pb::DeltaBatch,
        mut bytes: u64,
        frames: &mut Streaming<pb::ProviderFrame>,
        last_frame: &mut tokio::time::Instant,
        held: &mut Option<pb::ProviderFrame>,
    ) -> Result<Option<(Vec<pb::DeltaBatch>, u64)>, LinkError> {
        let mut count = first.deltas.len();
        let mut batches = vec![first];
        while count < APPLY_MAX_DELTAS {
            let next = tokio::select! {
                biased;
                next = frames.message() => next,
                () = std::future::ready(()) => break,
            };
            let Some(next) = next.map_err(|s| self.stream_failed(&s))? else {
                return Ok(None);
            };
            *last_frame = tokio::time::Instant::now();
            self.observe(next.sender_hlc)?;
            let size = prost::Message::encoded_len(&next) as u64;
            match next.body {
                Some(pb::provider_frame::Body::Deltas(batch))
                    if count + batch.deltas.len() <= APPLY_MAX_DELTAS =>
                {
                    count += batch.deltas.len();
                    bytes += size;
                    batches.push(batch);
                }
                body => {
                    *held = Some(pb::ProviderFrame { body, ..next });
                    break;
                }
            }
        }
        Ok(Some((batches, bytes)))
    }

    /// A failed stream, counted when the peer is at fault (a frame over
    /// the message limit, which the decoder refuses before we see it).
    fn stream_failed(&self, s: &tonic::Status) -> LinkError {
        LinkError::status("stream ended", s).counted(&self.peers, self.index)
    }

    /// Refuses (and counts) what the peer did.
    fn fault(&self, fault: PeerFault) -> LinkError {
        LinkError::Peer(fault).counted(&self.peers, self.index)
    }

    /// A frame to the peer, stamped with this node's clock.
    fn frame(&self, body: pb::subscriber_frame::Body) -> Result<pb::SubscriberFrame, LinkError> {
        let hlc = self.engine.clock().now().map_err(NodeError::from)?;
        Ok(pb::SubscriberFrame {
            sender_hlc: hlc.as_u64(),
            body: Some(body),
        })
    }

    /// The origins to ask this link's peer for: every origin known here
    /// (from the vectors seen and the configuration), except this node's
    /// own and those of other peers reached directly, plus the peer's own.
    /// Never empty, since empty would mean every origin.
    fn interest(&self, known: &BTreeSet<u32>) -> Vec<u32> {
        let me = self.engine.store().identity().replica.0;
        let direct = self.peers.reached_directly(self.index);
        let mut origins: BTreeSet<u32> = known.clone();
        origins.extend(self.peers.replica_ids());
        origins.retain(|o| *o != me && !direct.contains(o));
        origins.insert(self.peers.config(self.index).replica_id);
        origins.into_iter().collect()
    }

    /// Observes a peer frame's clock ([`observe_clock`]) and records that
    /// a frame arrived.
    fn observe(&self, sender_hlc: u64) -> Result<(), LinkError> {
        self.peers.link_frame(self.index);
        observe_clock(&self.engine, &self.peers, self.index, sender_hlc)
    }
}

/// An opened stream: the queue towards the peer, the frames from it, the
/// origins known so far, and the interest sent in the `Hello`.
struct Opened {
    tx: mpsc::Sender<pb::SubscriberFrame>,
    frames: Streaming<pb::ProviderFrame>,
    known: BTreeSet<u32>,
    interest: Vec<u32>,
}

/// A flush under way and the vector it makes acknowledgeable.
type Flushing = Pin<Box<dyn Future<Output = Result<VersionVector, LinkError>> + Send>>;

/// Acknowledgements of one link. An ack may name only what is durable
/// here, yet waiting for each batch's flush before reading the next would
/// put a disk flush between every two batches: replication lag would be
/// queueing behind flushes. So batches are applied as they come, and at
/// most one flush per link is under way: when it ends, the vector read
/// before it began is acknowledged. The newest vector that became due
/// meanwhile starts the next flush, at the earliest [`ACK_INTERVAL`] after
/// the last ack, so acks do not multiply with the batches.
struct Acks {
    store: Arc<Store>,
    /// The vector of the last ack sent.
    sent: VersionVector,
    /// When the last ack was sent.
    sent_at: Option<tokio::time::Instant>,
    flushing: Option<Flushing>,
    /// The newest vector due for an ack and not being flushed yet.
    waiting: Option<VersionVector>,
}

impl Acks {
    fn new(store: Arc<Store>) -> Self {
        Acks {
            store,
            sent: VersionVector::new(),
            sent_at: None,
            flushing: None,
            waiting: None,
        }
    }

    /// Asks for `applied` (read from the store) to be acknowledged once
    /// durable.
    fn due(&mut self, applied: VersionVector) {
        self.waiting = (applied != self.sent).then_some(applied);
    }

    /// Waits for the flush under way, or for [`ACK_INTERVAL`] to pass
    /// since the last ack and then for the flush of the vector due (forever
    /// when none is), and returns the vector to acknowledge. Cancel-safe:
    /// the flush under way and the vector due outlive a dropped call.
    async fn flushed(&mut self) -> Result<VersionVector, LinkError> {
        if self.flushing.is_none() {
            if self.waiting.is_none() {
                return std::future::pending().await;
            }
            if let Some(at) = self.sent_at {
                tokio::time::sleep_until(at + ACK_INTERVAL).await;
            }
            let Some(applied) = self.waiting.take() else {
                return std::future::pending().await;
            };
            let store = self.store.clone();
            self.flushing = Some(Box::pin(async move {
                // Everything committed before this call is durable after
                // it, and `applied` was read before it.
                store.sync().await.map_err(NodeError::from)?;
                Ok(applied)
            }));
        }
        let Some(flushing) = self.flushing.as_mut() else {
            return std::future::pending().await;
        };
        let result = flushing.await;
        self.flushing = None;
        let applied = result?;
        self.sent = applied.clone();
        self.sent_at = Some(tokio::time::Instant::now());
        if self.waiting.as_ref() == Some(&self.sent) {
            self.waiting = None;
        }
        Ok(applied)
    }
}
