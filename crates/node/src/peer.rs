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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_core::{Hlc, VersionVector};
use concord_proto::v1 as pb;
use concord_proto::v1::replication_server::Replication;
use concord_store::Store;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::PeerConfig;
use crate::engine::Engine;
use crate::error::NodeError;
use crate::handshake::{check_hello, observe_clock, welcome, LinkError, PeerFault};
use crate::replicate::{origins, Provider, HEARTBEAT};

/// Longest wait for a subscriber's `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued towards one subscriber.
pub const PROVIDER_QUEUE_FRAMES: usize = 64;

/// Longest wait between two warnings about refusing the same caller for
/// the same cause: a refused peer dials again every second, and one line a
/// minute says as much as sixty (the rest go to debug, and every refusal
/// is counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How far behind (in milliseconds) either side may be for a connected
/// peer to show as in sync rather than catching up.
pub const IN_SYNC_MS: u64 = 1_000;

/// How long without a frame from a peer (which heartbeats every second)
/// before its status shows it down, silent: three missed heartbeats. The
/// link gives the stream up later, at
/// [`SILENCE_TIMEOUT`](crate::replicate::SILENCE_TIMEOUT); a link busy
/// applying what already arrived is not silent.
pub const CONTACT_TIMEOUT: Duration = Duration::from_secs(3);

/// Most callers whose refusals are remembered for [`Peers::warn_now`].
const MAX_WARNED: usize = 1024;

/// The configured peer regions and what this node knows of each.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    peers: Arc<Vec<Peer>>,
    unknown_refused: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped whenever a peer link goes up or down.
    reachability: Arc<tokio::sync::watch::Sender<u64>>,
    /// When a refusal was last logged as a warning, per caller and cause.
    warned: Arc<Mutex<HashMap<String, tokio::time::Instant>>>,
}

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    state: Mutex<Tracked>,
}

/// What is known of one peer: the counters shown as they are, and what
/// the rest of its status is worked out from when it is read.
#[derive(Debug, Default)]
struct Tracked {
    status: pb::PeerStatus,
    /// Whether this node's stream from the peer is open.
    up: bool,
    /// When the last frame arrived on it.
    last_frame: Option<tokio::time::Instant>,
    /// Whether the link is applying what arrived (it reads no frame
    /// meanwhile, and is not silent for it).
    applying: bool,
    /// What the peer holds, as far as this node knows.
    known: VersionVector,
    /// Why the link went down, in words, and when (unix ms).
    down: Option<(pb::LinkDownCause, String, i64)>,
    /// Snapshot transfers under way with the peer, either way.
    snapshots: u32,
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

/// A snapshot transfer with a peer, shown in its status while this lives.
#[derive(Debug)]
pub(crate) struct SnapshotUnderWay {
    peers: Peers,
    index: usize,
}

impl Drop for SnapshotUnderWay {
    fn drop(&mut self) {
        let mut state = self.peers.lock(self.index);
        state.snapshots = state.snapshots.saturating_sub(1);
    }
}

impl Peers {
    /// The peers of a configuration, none of them connected yet.
    pub fn new(configs: &[PeerConfig]) -> Self {
        let mut peers: Vec<Peer> = configs
            .iter()
            .map(|c| Peer {
                config: c.clone(),
                state: Mutex::new(Tracked {
                    status: pb::PeerStatus {
                        region: c.region.clone(),
                        replica_id: c.replica_id,
                        address: c.endpoint.clone(),
                        ..pb::PeerStatus::default()
                    },
                    ..Tracked::default()
                }),
            })
            .collect();
        peers.sort_by(|a, b| a.config.region.cmp(&b.config.region));
        Peers {
            peers: Arc::new(peers),
            unknown_refused: Arc::default(),
            reachability: Arc::new(tokio::sync::watch::Sender::new(0)),
            warned: Arc::default(),
        }
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Tracked> {
        lock(&self.peers[i].state)
    }

    /// The status of every peer, sorted by region name, worked out now:
    /// whether frames still arrive, the lag both ways, the sync state and
    /// why a link is down. Runs where the store's blocking work runs: the
    /// age of the oldest delta a peer lacks may be read from sled.
    pub async fn status(&self, engine: &Engine) -> Result<Vec<pb::PeerStatus>, NodeError> {
        let (peers, working) = (self.clone(), engine.clone());
        engine
            .store()
            .offload()
            .run(move || peers.status_now(&working))
            .await
            .map_err(|e| NodeError::Unavailable(format!("status task failed: {e}")))?
    }

    fn status_now(&self, engine: &Engine) -> Result<Vec<pb::PeerStatus>, NodeError> {
        let store = engine.store();
        let ours = store.version_vector()?;
        let now_ms = engine.clock().physical_unix_ms();
        let mut out = Vec::with_capacity(self.peers.len());
        for i in 0..self.peers.len() {
            let (mut status, known, silent, down, snapshots) = {
                let state = self.lock(i);
                let silent = if state.applying {
                    Some(Duration::ZERO)
                } else {
                    state.last_frame.map(|at| at.elapsed())
                };
                (
                    state.status.clone(),
                    state.known.clone(),
                    silent.filter(|_| state.up),
                    (!state.up).then(|| state.down.clone()),
                    state.snapshots,
                )
            };
            status.last_contact_age_ms = match status.last_contact_unix_ms {
                0 => 0,
                at => u64::try_from(now_ms.saturating_sub_unsigned(at)).unwrap_or(0),
            };
            status.peer_lacks_ops = known.missing_from(&ours);
            status.peer_lacks_ms = oldest_lacking(store, &ours, &known)
                .map(|wall| u64::try_from(now_ms.saturating_sub(wall)).unwrap_or(0))
                .unwrap_or(0);
            match (down, silent) {
                // Up, and frames arrive.
                (None, Some(quiet)) if quiet < CONTACT_TIMEOUT => {
                    status.connected = true;
                    let behind = status.lag_ms.max(status.peer_lacks_ms);
                    status.set_state(if snapshots > 0 {
                        pb::PeerState::Snapshot
                    } else if behind >= IN_SYNC_MS {
                        pb::PeerState::CatchingUp
                    } else {
                        pb::PeerState::InSync
                    });
                }
                // Up, but silent: the link is about to give the stream up.
                (None, quiet) => {
                    let quiet = quiet.unwrap_or_default();
                    status.connected = false;
                    status.set_state(pb::PeerState::Down);
                    status.set_down_cause(pb::LinkDownCause::Silent);
                    status.down_reason = format!(
                        "nothing from the peer for {:.1} s (heartbeats are every {} s)",
                        quiet.as_secs_f64(),
                        HEARTBEAT.as_secs()
                    );
                    status.down_for_ms = quiet.as_millis() as u64;
                }
                (Some(down), _) => {
                    status.connected = false;
                    status.set_state(pb::PeerState::Down);
                    match down {
                        Some((cause, reason, since)) => {
                            status.set_down_cause(cause);
                            status.down_reason = reason;
                            status.down_for_ms =
                                u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0);
                        }
                        None => status.down_reason = "not connected yet".into(),
                    }
                }
            }
            out.push(status);
        }
        Ok(out)
    }

    /// Publishes the status of every peer as metrics.
    pub(crate) fn export(statuses: &[pb::PeerStatus]) {
        const STATES: [(pb::PeerState, &str); 4] = [
            (pb::PeerState::InSync, "in_sync"),
            (pb::PeerState::CatchingUp, "catching_up"),
            (pb::PeerState::Snapshot, "snapshot"),
            (pb::PeerState::Down, "down"),
        ];
        for s in statuses {
            let peer = s.region.clone();
            metrics::gauge!("concord_peer_connected", "peer" => peer.clone()).set(if s.connected {
                1.0
            } else {
                0.0
            });
            for (state, label) in STATES {
                metrics::gauge!("concord_peer_state", "peer" => peer.clone(), "state" => label)
                    .set(if s.state() == state { 1.0 } else { 0.0 });
            }
            metrics::gauge!("concord_peer_lag_ops", "peer" => peer.clone(), "direction" => "from_peer")
                .set(s.lag_ops as f64);
            metrics::gauge!("concord_peer_lag_ops", "peer" => peer.clone(), "direction" => "to_peer")
                .set(s.peer_lacks_ops as f64);
            metrics::gauge!("concord_peer_lag_seconds", "peer" => peer.clone(), "direction" => "from_peer")
                .set(s.lag_ms as f64 / 1000.0);
            metrics::gauge!("concord_peer_lag_seconds", "peer" => peer.clone(), "direction" => "to_peer")
                .set(s.peer_lacks_ms as f64 / 1000.0);
            metrics::gauge!("concord_peer_last_contact_age_seconds", "peer" => peer.clone())
                .set(s.last_contact_age_ms as f64 / 1000.0);
            metrics::gauge!("concord_peer_clock_skew_seconds", "peer" => peer)
                .set(s.clock_skew_ms as f64 / 1000.0);
        }
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
        let mut state = self.lock(i);
        state.status.last_contact_unix_ms = u64::try_from(local_ms).unwrap_or(0);
        state.status.clock_skew_ms = remote.unix_ms().saturating_sub(local_ms);
    }

    /// Records a frame arriving on this node's stream from peer `i`.
    pub(crate) fn link_frame(&self, i: usize) {
        self.lock(i).last_frame = Some(tokio::time::Instant::now());
    }

    /// Records that the link from peer `i` starts (`true`) or ends
    /// applying what arrived; its end counts as contact, since frames
    /// that came meanwhile are read next.
    pub(crate) fn link_applying(&self, i: usize, applying: bool) {
        let mut state = self.lock(i);
        state.applying = applying;
        if !applying {
            state.last_frame = Some(tokio::time::Instant::now());
        }
    }

    /// Records that this node's stream from peer `i` opened.
    pub(crate) fn link_up(&self, i: usize) {
        {
            let mut state = self.lock(i);
            state.up = true;
            state.applying = false;
            state.last_frame = Some(tokio::time::Instant::now());
            state.down = None;
        }
        self.reachability.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records that this node's stream from peer `i` failed with `error`
    /// (at `now_ms`), counted by cause.
    pub(crate) fn link_down(&self, i: usize, error: &LinkError, now_ms: i64) {
        let cause = error.down_cause();
        let was_up = {
            let mut state = self.lock(i);
            let was_up = state.up;
            state.up = false;
            state.applying = false;
            // Down since the link's first failure after it was last up,
            // whatever the causes after it (silent, then unreachable);
            // a silent link since its last frame.
            let since = match (&state.down, error) {
                (Some((_, _, since)), _) if !was_up => *since,
                (_, LinkError::Silent { silent_s, .. }) => {
                    now_ms.saturating_sub(i64::try_from(*silent_s).unwrap_or(0) * 1000)
                }
                _ => now_ms,
            };
            state.down = Some((cause, error.to_string(), since));
            was_up
        };
        metrics::counter!("concord_peer_link_failures_total", "peer" => self.peers[i].config.region.clone(), "cause" => cause_label(cause))
            .increment(1);
        if was_up {
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
        (0..self.peers.len())
            .filter(|&j| j != except && self.lock(j).up)
            .map(|j| self.peers[j].config.replica_id)
            .collect()
    }

    /// What this node knew peer `replica_id` to hold when it last ran (its
    /// stored acknowledgements), until the peer says more.
    pub(crate) fn assume_holds(&self, replica_id: u32, holds: &VersionVector) {
        if let Some(i) = self
            .peers
            .iter()
            .position(|p| p.config.replica_id == replica_id)
        {
            self.lock(i).known.merge(holds);
        }
    }

    /// Records what peer `i` said it holds: a session's opening replaces
    /// what was known (a relaxed region may have lost writes in a crash),
    /// acknowledgements and heartbeats add to it.
    pub(crate) fn peer_holds(&self, i: usize, holds: &VersionVector, opening: bool) {
        let mut state = self.lock(i);
        if opening {
            state.known = holds.clone();
        } else {
            state.known.merge(holds);
        }
    }

    /// Marks a snapshot transfer with peer `i` under way until the
    /// returned guard is dropped.
    pub(crate) fn snapshot_under_way(&self, i: usize) -> SnapshotUnderWay {
        self.lock(i).snapshots += 1;
        SnapshotUnderWay {
            peers: self.clone(),
            index: i,
        }
    }

    /// Records an accepted clock from peer `i`.
    pub(crate) fn clock_accepted(&self, i: usize) {
        self.lock(i).status.clock_refused = false;
    }

    /// Counts deltas and bytes sent to peer `i`.
    pub(crate) fn sent(&self, i: usize, deltas: u64, bytes: u64) {
        let mut state = self.lock(i);
        state.status.deltas_sent += deltas;
        state.status.bytes_sent += bytes;
        drop(state);
        metrics::counter!("concord_peer_deltas_sent_total", "peer" => self.peers[i].config.region.clone())
            .increment(deltas);
        metrics::counter!("concord_peer_bytes_sent_total", "peer" => self.peers[i].config.region.clone())
            .increment(bytes);
    }

    /// Counts deltas applied and bytes received from peer `i`.
    pub(crate) fn received(&self, i: usize, deltas: u64, bytes: u64) {
        let mut state = self.lock(i);
        state.status.deltas_received += deltas;
        state.status.bytes_received += bytes;
        drop(state);
        metrics::counter!("concord_peer_deltas_received_total", "peer" => self.peers[i].config.region.clone())
            .increment(deltas);
        metrics::counter!("concord_peer_bytes_received_total", "peer" => self.peers[i].config.region.clone())
            .increment(bytes);
    }

    /// Records how many deltas peer `i` has that this node lacks; none
    /// means no lag in time either.
    pub(crate) fn lag(&self, i: usize, ops: u64) {
        let mut state = self.lock(i);
        state.status.lag_ops = ops;
        if ops == 0 {
            state.status.lag_ms = 0;
        }
    }

    /// Records how late, in milliseconds, the newest delta of a batch from
    /// peer `i` arrived.
    pub(crate) fn delay(&self, i: usize, ms: u64) {
        self.lock(i).status.lag_ms = ms;
        metrics::histogram!("concord_replication_delay_seconds", "peer" => self.peers[i].config.region.clone())
            .record(ms as f64 / 1000.0);
    }

    /// The replica ids of every configured peer.
    pub fn replica_ids(&self) -> Vec<u32> {
        self.peers.iter().map(|p| p.config.replica_id).collect()
    }

    /// Counts a refusal of something peer `i` sent.
    pub(crate) fn refused_by_index(&self, i: usize, why: Refusal) {
        metrics::counter!("concord_peer_refusals_total", "cause" => why.label()).increment(1);
        let mut state = self.lock(i);
        match why {
            Refusal::ClockDrift => {
                state.status.refused_clock_drift += 1;
                state.status.clock_refused = true;
            }
            Refusal::BadBatch => state.status.refused_bad_batch += 1,
            Refusal::UnknownPeer => state.status.refused_unknown_peer += 1,
        }
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

    /// Whether a refusal of `caller` for `cause` should be logged as a
    /// warning now: the first time, and again once
    /// [`REFUSAL_LOG_INTERVAL`] has passed since the last warning.
    pub(crate) fn warn_now(&self, caller: &str, cause: &str) -> bool {
        let now = tokio::time::Instant::now();
        let mut warned = lock(&self.warned);
        // Callers name themselves: only so much of the name is kept.
        let caller: String = caller.chars().take(128).collect();
        let key = format!("{caller}\u{0}{cause}");
        match warned.get(&key) {
            Some(&at) if now.duration_since(at) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                // Bounded: callers that stopped calling are forgotten, and
                // while more than MAX_WARNED call at once the others are
                // not warned about (each refusal is still counted).
                if warned.len() >= MAX_WARNED {
                    warned.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
                    if warned.len() >= MAX_WARNED {
                        return false;
                    }
                }
                warned.insert(key, now);
                true
            }
        }
    }
}

/// The label of a cause in metrics.
fn cause_label(cause: pb::LinkDownCause) -> &'static str {
    match cause {
        pb::LinkDownCause::Unspecified => "unspecified",
        pb::LinkDownCause::Unreachable => "unreachable",
        pb::LinkDownCause::Refused => "refused",
        pb::LinkDownCause::Silent => "silent",
        pb::LinkDownCause::ClockRefused => "clock_refused",
        pb::LinkDownCause::PeerFault => "peer_fault",
        pb::LinkDownCause::Ended => "ended",
        pb::LinkDownCause::LocalFailure => "local_failure",
    }
}

/// The wall time (unix ms, from its HLC) of the oldest delta in `ours`
/// that `known` lacks, read from the logs; none when nothing is lacking
/// (or the logs no longer hold it).
fn oldest_lacking(store: &Store, ours: &VersionVector, known: &VersionVector) -> Option<i64> {
    ours.iter()
        .filter(|&(origin, seq)| seq > known.get(origin))
        .filter_map(|(origin, _)| {
            let first = store
                .log_from(origin, known.get(origin) + 1, 1, usize::MAX)
                .ok()?;
            first.first().map(|d| d.hlc.unix_ms())
        })
        .min()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
                if self.peers.warn_now(region, "clock") {
                    tracing::warn!(peer = %region, error = %e, "refused a peer whose clock is too far ahead; fix its clock (said again at most once a minute)");
                } else {
                    tracing::debug!(peer = %region, error = %e, "refused a peer whose clock is too far ahead");
                }
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
        let holds: VersionVector = hello.applied.clone().unwrap_or_default().into();
        self.peers.peer_holds(index, &holds, true);
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
            sent: holds,
            origins: origins(&hello.origins),
        };
        tokio::spawn(provider.run(inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_peer() -> Peers {
        Peers::new(&[PeerConfig {
            region: "eu-west".into(),
            replica_id: 2,
            endpoint: "http://127.0.0.1:1".into(),
        }])
    }

    fn since(peers: &Peers) -> Option<(pb::LinkDownCause, i64)> {
        peers.lock(0).down.as_ref().map(|(c, _, at)| (*c, *at))
    }

    #[test]
    fn a_link_is_down_since_its_first_failure_whatever_the_causes_after_it() {
        let peers = one_peer();
        peers.link_up(0);
        let silent = LinkError::Silent {
            silent_s: 5,
            heartbeat_s: 1,
        };
        peers.link_down(0, &silent, 100_000);
        // Silent since its last frame, five seconds before it was given up.
        assert_eq!(since(&peers), Some((pb::LinkDownCause::Silent, 95_000)));
        let unreachable = LinkError::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            reason: "no answer".into(),
        };
        peers.link_down(0, &unreachable, 115_000);
        assert_eq!(
            since(&peers),
            Some((pb::LinkDownCause::Unreachable, 95_000)),
            "the cause changes, the time it went down does not"
        );
        peers.link_up(0);
        assert_eq!(since(&peers), None);
        peers.link_down(0, &unreachable, 200_000);
        assert_eq!(
            since(&peers),
            Some((pb::LinkDownCause::Unreachable, 200_000))
        );
    }

    #[test]
    fn refusals_are_warned_about_once_a_minute_and_callers_are_bounded() {
        let peers = one_peer();
        assert!(peers.warn_now("ap-south/3", "unknown"));
        assert!(
            !peers.warn_now("ap-south/3", "unknown"),
            "not again at once"
        );
        assert!(peers.warn_now("ap-south/3", "clock"), "another cause is");
        for n in 0..2 * MAX_WARNED {
            peers.warn_now(&format!("caller {n}"), "unknown");
        }
        assert!(peers.warned.lock().expect("lock").len() <= MAX_WARNED);
    }
}
