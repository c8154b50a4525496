//! Replication between regions, both ends of one `Subscribe` stream.
//!
//! - `Provider` (the callee) streams what the subscriber lacks: deltas in
//!   per-origin order from its logs, or a state snapshot when the logs no
//!   longer reach back far enough, then tails its logs live. It ships its
//!   own region's deltas only once they are durable, so a crash can never
//!   leave peers holding writes this region lost. The subscriber's acks
//!   raise what the provider believes it has (a delta it got from another
//!   peer is not sent again) and are stored for log truncation.
//! - `Applier` (the caller's side, driven by [`crate::link`]) validates
//!   and applies each batch atomically, exactly once per (origin, seq),
//!   merges snapshots, and answers with acks.
//!
//! Every limit is explicit: [`BATCH_MAX_DELTAS`], [`BATCH_MAX_BYTES`],
//! [`SNAPSHOT_CHUNK_BYTES`], and the queues of [`crate::peer`] and
//! [`crate::link`].

use std::collections::BTreeSet;
use std::time::Duration;

use concord_core::catalog::KeyspaceId;
use concord_core::crdt::{StreamEntry, StreamId, StreamOp};
use concord_core::proto::{crdt_type_from_proto, declaration_from_proto, declaration_to_proto};
use concord_core::{CoreError, CrdtType, Hlc, Op, ReplicaId, Value, VersionVector};
use concord_proto::v1 as pb;
use concord_store::snapshot::{Declaration, SnapshotChunk, SnapshotValue};
use concord_store::StoreError;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::engine::Engine;
use crate::error::NodeError;
use crate::handshake::{observe_clock, LinkError};
use crate::peer::{Peers, SnapshotUnderWay};
use crate::subscribe::Appended;

/// Most deltas in one batch.
pub const BATCH_MAX_DELTAS: usize = 1024;

/// Most deltas a subscriber applies in one transaction: the batches that
/// arrived while it applied the previous ones are applied together.
pub const APPLY_MAX_DELTAS: usize = 4 * BATCH_MAX_DELTAS;

/// About the most bytes of encoded deltas in one batch (a single larger
/// delta, up to the `max_delta_bytes` limit, travels alone).
pub const BATCH_MAX_BYTES: usize = 1 << 20;

/// About the most bytes of stored state in one snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Interval of heartbeats on an idle stream, both ways.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Longest time without any frame from the other end (which heartbeats
/// every second) before a stream is given up and, on the subscriber's
/// side, reconnected: a frozen peer or a wedged connection is noticed this
/// fast, not after TCP's or HTTP/2's much longer timeouts.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for room in the queue towards a subscriber; a subscriber
/// that takes longer to drain it is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

fn now_unix_ms(engine: &Engine) -> u64 {
    u64::try_from(engine.clock().physical_unix_ms()).unwrap_or(0)
}

/// Runs blocking store work where the store's offload mode says.
async fn blocking<T: Send + 'static>(
    engine: &Engine,
    f: impl FnOnce(&concord_store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    let store = engine.store().clone();
    let offload = store.offload();
    offload
        .run(move || f(&store))
        .await
        .map_err(|e| NodeError::Unavailable(format!("store task failed: {e}")))?
        .map_err(NodeError::from)
}

/// The provider's side of one subscription.
pub(crate) struct Provider {
    pub(crate) engine: Engine,
    pub(crate) peers: Peers,
    /// Index of the subscriber among the configured peers.
    pub(crate) index: usize,
    /// What the subscriber has, as far as this provider knows.
    pub(crate) sent: VersionVector,
    /// Origins the subscriber wants; `None` for all.
    pub(crate) origins: Option<BTreeSet<ReplicaId>>,
}

/// What the provider has to send next.
enum Pending {
    Nothing,
    Deltas(Vec<concord_core::Delta>),
    /// The subscriber is behind a log's truncation point.
    Snapshot,
}

impl Provider {
    fn frame(&self, body: pb::provider_frame::Body) -> Result<pb::ProviderFrame, Status> {
        let hlc = self.engine.clock().now().map_err(NodeError::from)?;
        Ok(pb::ProviderFrame {
            sender_hlc: hlc.as_u64(),
            body: Some(body),
        })
    }

    /// Streams to `tx` until the subscriber leaves, the node stops, or
    /// something fails (sent to the subscriber as the stream's status).
    pub(crate) async fn run(
        mut self,
        mut inbound: Streaming<pb::SubscriberFrame>,
        tx: mpsc::Sender<Result<pb::ProviderFrame, Status>>,
    ) {
        if let Err(status) = self.serve(&mut inbound, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<pb::SubscriberFrame>,
        tx: &mpsc::Sender<Result<pb::ProviderFrame, Status>>,
    ) -> Result<(), Status> {
        let mut changes = self.engine.changes();
        let mut stopping = self.engine.stopping();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_inbound = tokio::time::Instant::now();
        loop {
            // Mark what is there now as seen before reading it, so a change
            // made while we read wakes the wait below.
            changes.borrow_and_update();
            match self.pending().await? {
                Pending::Deltas(deltas) => {
                    self.send_deltas(deltas, tx).await?;
                    // Between batches, take in what the subscriber said
                    // (acks shrink what is left to send) without waiting.
                    tokio::select! {
                        biased;
                        frame = inbound.message() => {
                            last_inbound = tokio::time::Instant::now();
                            if !self.inbound(frame).await? {
                                return Ok(());
                            }
                        }
                        () = std::future::ready(()) => {}
                    }
                    continue;
                }
                Pending::Snapshot => {
                    self.send_snapshot(tx).await?;
                    continue;
                }
                Pending::Nothing => {}
            }
            // Biased, in a fixed order, so that the same events always take
            // the same branch (the simulator replays runs exactly); the
            // rare events go first so a busy log never starves them.
            tokio::select! {
                biased;
                () = async { let _ = stopping.wait_for(|stopping| *stopping).await; } => {
                    return Err(Status::unavailable("the node is shutting down"));
                }
                frame = inbound.message() => {
                    last_inbound = tokio::time::Instant::now();
                    if !self.inbound(frame).await? {
                        return Ok(());
                    }
                }
                _ = heartbeat.tick() => {
                    let applied = self.engine.store().version_vector().map_err(NodeError::from)?;
                    let beat = pb::Heartbeat {
                        applied: Some((&applied).into()),
                        wall_unix_ms: now_unix_ms(&self.engine),
                    };
                    send(tx, self.frame(pb::provider_frame::Body::Heartbeat(beat))?).await?;
                }
                () = tokio::time::sleep_until(last_inbound + SILENCE_TIMEOUT) => {
                    return Err(Status::unavailable(format!(
                        "nothing from the subscriber for {} s",
                        SILENCE_TIMEOUT.as_secs()
                    )));
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles one frame from the subscriber; false when it has left.
    async fn inbound(
        &mut self,
        frame: Result<Option<pb::SubscriberFrame>, Status>,
    ) -> Result<bool, Status> {
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(false),
            Err(status) => {
                tracing::debug!(status = %status, "subscriber stream failed");
                return Ok(false);
            }
        };
        observe_clock(&self.engine, &self.peers, self.index, frame.sender_hlc)?;
        match frame.body {
            Some(pb::subscriber_frame::Body::Ack(ack)) => {
                let acked: VersionVector = ack.applied.unwrap_or_default().into();
                self.sent.merge(&acked);
                self.peers.peer_holds(self.index, &acked, false);
                let peer = ReplicaId(self.peers.config(self.index).replica_id);
                blocking(&self.engine, move |store| store.set_peer_ack(peer, &acked)).await?;
            }
            Some(pb::subscriber_frame::Body::Interest(interest)) => {
                self.origins = origins(&interest.origins);
            }
            Some(pb::subscriber_frame::Body::Heartbeat(beat)) => {
                let theirs: VersionVector = beat.applied.unwrap_or_default().into();
                self.sent.merge(&theirs);
                self.peers.peer_holds(self.index, &theirs, false);
            }
            Some(pb::subscriber_frame::Body::Hello(_)) | None => {
                return Err(LinkError::bad_data(
                    &self.peers,
                    self.index,
                    "only the first frame may be a Hello, and every frame needs a body",
                )
                .into());
            }
        }
        Ok(true)
    }

    /// The next batch: deltas of every wanted origin the subscriber lacks,
    /// own deltas only up to the durable point.
    async fn pending(&self) -> Result<Pending, Status> {
        let me = self.engine.store().identity().replica;
        let durable_own = self.engine.durable_own_seq();
        let ours = self
            .engine
            .store()
            .version_vector()
            .map_err(NodeError::from)?;
        let wanted: Vec<(ReplicaId, u64, u64)> = ours
            .iter()
            .filter(|(origin, _)| self.origins.as_ref().is_none_or(|o| o.contains(origin)))
            .map(|(origin, seq)| {
                let upto = if origin == me {
                    seq.min(durable_own)
                } else {
                    seq
                };
                (origin, self.sent.get(origin), upto)
            })
            .filter(|(_, sent, upto)| upto > sent)
            .collect();
        if wanted.is_empty() {
            return Ok(Pending::Nothing);
        }
        // Each origin gets an equal share of the batch's byte budget (the
        // log reader enforces it, and returns at least one delta), so the
        // deltas need not be encoded again to count them.
        let share = BATCH_MAX_BYTES / wanted.len();
        // A provider keeping up asks only for the newest deltas, which the
        // store keeps in memory: no trip to the blocking pool, no wait for
        // a transaction holding sled's lock.
        let recent = gather(&wanted, |origin, from, want| {
            self.engine
                .store()
                .recent_log_from(origin, from, want, share)
                .ok_or(())
        });
        let read = match recent {
            Ok(batch) => Ok(batch),
            Err(()) => {
                blocking(&self.engine, move |store| {
                    gather(&wanted, |origin, from, want| {
                        store.log_from(origin, from, want, share)
                    })
                })
                .await
            }
        };
        match read {
            Ok(batch) if batch.is_empty() => Ok(Pending::Nothing),
            Ok(batch) => Ok(Pending::Deltas(batch)),
            Err(NodeError::Store(StoreError::Truncated { .. })) => Ok(Pending::Snapshot),
            Err(e) => Err(e.into()),
        }
    }

    async fn send_deltas(
        &mut self,
        deltas: Vec<concord_core::Delta>,
        tx: &mpsc::Sender<Result<pb::ProviderFrame, Status>>,
    ) -> Result<(), Status> {
        for d in &deltas {
            self.sent.advance(d.origin, d.seq);
        }
        let batch = pb::DeltaBatch {
            deltas: deltas.iter().map(concord_core::Delta::encode).collect(),
        };
        let frame = self.frame(pb::provider_frame::Body::Deltas(batch))?;
        let bytes = prost::Message::encoded_len(&frame) as u64;
        send(tx, frame).await?;
        self.peers.sent(self.index, deltas.len() as u64, bytes);
        Ok(())
    }

    /// Waits until everything read so far for the subscriber is on disk.
    async fn persist_sent(&self) -> Result<(), Status> {
        Ok(self.engine.store().sync().await.map_err(NodeError::from)?)
    }

    /// Sends the whole state, then raises `sent` to what it covers.
    async fn send_snapshot(
        &mut self,
        tx: &mpsc::Sender<Result<pb::ProviderFrame, Status>>,
    ) -> Result<(), Status> {
        let region = &self.peers.config(self.index).region;
        tracing::info!(peer = %region, "peer is behind the logs' truncation point: sending a snapshot");
        let _shown = self.peers.snapshot_under_way(self.index);
        let mut cursor = blocking(&self.engine, |store| store.export_snapshot()).await?;
        let covers = cursor.covers().clone();
        // What leaves the region must be on disk: in relaxed mode a
        // crash would otherwise leave the peer holding own writes this
        // region lost, and later ones reusing their seqs. Each chunk is
        // synced the same way before it is sent.
        self.persist_sent().await?;
        let begin = pb::SnapshotBegin {
            covers: Some((&covers).into()),
        };
        send(
            tx,
            self.frame(pb::provider_frame::Body::SnapshotBegin(begin))?,
        )
        .await?;
        loop {
            let (next, back) = blocking(&self.engine, move |store| {
                let chunk = store.export_chunk(&mut cursor, SNAPSHOT_CHUNK_BYTES)?;
                Ok((chunk, cursor))
            })
            .await?;
            cursor = back;
            let Some(chunk) = next else { break };
            self.persist_sent().await?;
            let frame = self.frame(pb::provider_frame::Body::SnapshotChunk(chunk_to_proto(
                &chunk,
            )))?;
            let bytes = prost::Message::encoded_len(&frame) as u64;
            send(tx, frame).await?;
            self.peers.sent(self.index, 0, bytes);
        }
        let end = pb::SnapshotEnd {
            chunks: cursor.chunks(),
        };
        send(tx, self.frame(pb::provider_frame::Body::SnapshotEnd(end))?).await?;
        self.sent.merge(&covers);
        Ok(())
    }
}

/// Queues a frame towards the subscriber, waiting at most [`SEND_TIMEOUT`]
/// for room.
async fn send(
    tx: &mpsc::Sender<Result<pb::ProviderFrame, Status>>,
    frame: pb::ProviderFrame,
) -> Result<(), Status> {
    match tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Status::cancelled("the subscriber left")),
        Err(_) => Err(Status::unavailable(format!(
            "the subscriber read nothing for {} s",
            SEND_TIMEOUT.as_secs()
        ))),
    }
}

/// The next batch for a subscriber: for each wanted `(origin, sent,
/// upto)`, the deltas after `sent` up to `upto`, as `read(origin, from,
/// count)` returns them (it enforces each origin's share of the byte
/// budget), at most [`BATCH_MAX_DELTAS`] in all.
fn gather<E>(
    wanted: &[(ReplicaId, u64, u64)],
    mut read: impl FnMut(ReplicaId, u64, usize) -> Result<Vec<concord_core::Delta>, E>,
) -> Result<Vec<concord_core::Delta>, E> {
    let mut batch = Vec::new();
    for &(origin, sent, upto) in wanted {
        let room = BATCH_MAX_DELTAS - batch.len();
        if room == 0 {
            break;
        }
        let want = usize::try_from(upto - sent).unwrap_or(usize::MAX).min(room);
        let deltas = read(origin, sent + 1, want)?;
        batch.extend(deltas.into_iter().filter(|d| d.seq <= upto));
    }
    Ok(batch)
}

/// The origins a subscriber asked for; `None` (all) when the list is empty.
pub(crate) fn origins(list: &[u32]) -> Option<BTreeSet<ReplicaId>> {
    (!list.is_empty()).then(|| list.iter().map(|&r| ReplicaId(r)).collect())
}

/// A snapshot chunk on the wire.
pub(crate) fn chunk_to_proto(chunk: &SnapshotChunk) -> pb::SnapshotChunk {
    pb::SnapshotChunk {
        declarations: chunk
            .declarations
            .iter()
            .map(|d| declaration_to_proto(&d.name, d.ty, d.marker))
            .collect(),
        values: chunk
            .values
            .iter()
            .map(|v| pb::SnapshotValue {
                keyspace: v.keyspace.name.clone(),
                r#type: pb::CrdtType::from(v.keyspace.ty).into(),
                key: v.key.clone(),
                state: v.value.encode(),
            })
            .collect(),
    }
}

/// A snapshot chunk from the wire, checked.
pub(crate) fn chunk_from_proto(chunk: pb::SnapshotChunk) -> Result<SnapshotChunk, NodeError> {
    let declarations = chunk
        .declarations
        .into_iter()
        .map(|d| {
            let (name, ty, marker) = declaration_from_proto(d)?;
            Ok(Declaration { name, ty, marker })
        })
        .collect::<Result<_, NodeError>>()?;
    let values = chunk
        .values
        .into_iter()
        .map(|v| {
            let ty = crdt_type_from_proto(v.r#type)?;
            let value = Value::decode(&v.state)?;
            if value.crdt_type() != ty {
                return Err(NodeError::InvalidRequest(format!(
                    "snapshot value of {:?}/{:?} is a {} but its keyspace is a {ty}",
                    v.keyspace,
                    v.key,
                    value.crdt_type()
                )));
            }
            Ok(SnapshotValue {
                keyspace: KeyspaceId {
                    name: v.keyspace,
                    ty,
                },
                key: v.key,
                value,
            })
        })
        .collect::<Result<_, NodeError>>()?;
    Ok(SnapshotChunk {
        declarations,
        values,
    })
}

/// The subscriber's side of one subscription: applies what the provider
/// sends.
pub(crate) struct Applier {
    pub(crate) engine: Engine,
    pub(crate) peers: Peers,
    pub(crate) index: usize,
    /// The snapshot being received: what it covers and the chunks so far.
    snapshot: Option<(VersionVector, u64, SnapshotUnderWay)>,
}

impl Applier {
    pub(crate) fn new(engine: Engine, peers: Peers, index: usize) -> Self {
        Applier {
            engine,
            peers,
            index,
            snapshot: None,
        }
    }

    /// Refuses (and counts) what the peer sent.
    fn refuse(&self, message: String) -> LinkError {
        LinkError::bad_data(&self.peers, self.index, message)
    }

    /// Applies delta batches (their frames' clocks already observed) in
    /// one transaction; returns whether an ack is due once that is durable.
    pub(crate) async fn apply_deltas(
        &mut self,
        batches: Vec<pb::DeltaBatch>,
        bytes: u64,
    ) -> Result<bool, LinkError> {
        if self.snapshot.is_some() {
            return Err(self.refuse("deltas in the middle of a snapshot".into()));
        }
        let limits = self.engine.store().limits().clone();
        let mut deltas = Vec::new();
        let mut newest = Hlc::ZERO;
        for batch in batches {
            let count = batch.deltas.len();
            if count > BATCH_MAX_DELTAS {
                return Err(self.refuse(format!(
                    "a batch of {count} deltas; at most {BATCH_MAX_DELTAS}"
                )));
            }
            for d in batch.deltas {
                let d = concord_core::Delta::decode(&d, &limits)
                    .map_err(|e| self.refuse(format!("undecodable delta: {e}")))?;
                newest = newest.max(d.hlc);
                deltas.push(d);
            }
        }
        let clock = self.engine.clock();
        clock.observe(newest).map_err(|e| match e {
            CoreError::ClockDrift { .. } => LinkError::Clock(e).counted(&self.peers, self.index),
            other => LinkError::Local(other.into()),
        })?;
        let hwm = clock.last();
        let (report, deltas) = match self.engine.apply_remote(deltas, hwm).await {
            Ok(applied) => applied,
            Err(NodeError::Store(
                e @ (StoreError::Gap { .. }
                | StoreError::OwnDeltaAhead { .. }
                | StoreError::Core(_)),
            )) => {
                return Err(self.refuse(format!("batch refused: {e}")));
            }
            Err(e) => return Err(e.into()),
        };
        // Forwarding and showing these deltas need not wait for this
        // region's flush: their origin already has them durably, and a
        // crash here only means fetching them again (the store woke the
        // providers as it applied them). Only the ack waits.
        self.peers
            .received(self.index, report.applied as u64, bytes);
        // How late the newest fresh delta arrived: its origin's
        // clock against ours (skew between hosts adds to it).
        if let Some(newest) = report.fresh.iter().map(|&i| deltas[i].hlc).max() {
            let age = self.engine.clock().physical_unix_ms() - newest.unix_ms();
            let age = u64::try_from(age).unwrap_or(0);
            self.peers.delay(self.index, age);
        }
        // Entries appended elsewhere reach this region's stream
        // subscribers too, once each (duplicates were not applied).
        for &i in &report.fresh {
            let d = &deltas[i];
            if let Op::Stream(StreamOp::Append { fields }) = &d.op {
                self.engine.subscriptions().publish(Appended {
                    keyspace: KeyspaceId {
                        name: d.keyspace.clone(),
                        ty: CrdtType::Stream,
                    },
                    key: d.key.clone(),
                    entry: StreamEntry {
                        id: StreamId::new(d.hlc, d.origin),
                        fields: fields.clone(),
                    },
                });
            }
        }
        // The link acknowledges once this is durable, without holding up
        // the next batches meanwhile.
        Ok(true)
    }

    /// Applies one frame (its clock already observed); returns whether it
    /// changed what this node holds, so an ack is due once that is durable.
    pub(crate) async fn apply(&mut self, frame: pb::ProviderFrame) -> Result<bool, LinkError> {
        let bytes = prost::Message::encoded_len(&frame) as u64;
        match frame.body {
            Some(pb::provider_frame::Body::Deltas(batch)) => {
                self.apply_deltas(vec![batch], bytes).await
            }
            Some(pb::provider_frame::Body::SnapshotBegin(begin)) => {
                let covers: VersionVector = begin.covers.unwrap_or_default().into();
                let shown = self.peers.snapshot_under_way(self.index);
                self.snapshot = Some((covers, 0, shown));
                Ok(false)
            }
            Some(pb::provider_frame::Body::SnapshotChunk(chunk)) => {
                let Some((_, chunks, _)) = self.snapshot.as_mut() else {
                    return Err(self.refuse("a snapshot chunk outside a snapshot".into()));
                };
                *chunks += 1;
                let chunk = chunk_from_proto(chunk)
                    .map_err(|e| self.refuse(format!("bad snapshot chunk: {e}")))?;
                let imported =
                    blocking(&self.engine, move |store| store.import_chunk(&chunk)).await;
                match imported {
                    Ok(_) => {}
                    Err(NodeError::Store(e @ StoreError::Core(_))) => {
                        return Err(self.refuse(format!("snapshot chunk refused: {e}")));
                    }
                    Err(e) => return Err(e.into()),
                }
                self.peers.received(self.index, 0, bytes);
                Ok(false)
            }
            Some(pb::provider_frame::Body::SnapshotEnd(end)) => {
                let Some((covers, chunks, _shown)) = self.snapshot.take() else {
                    return Err(self.refuse("a snapshot end outside a snapshot".into()));
                };
                if chunks != end.chunks {
                    return Err(self.refuse(format!(
                        "the snapshot announced {} chunks; {chunks} arrived",
                        end.chunks
                    )));
                }
                let hwm = self.engine.clock().last();
                blocking(&self.engine, move |store| {
                    store.finish_import(&covers, hwm)?;
                    store.flush()
                })
                .await?;
                tracing::info!(peer = %self.peers.config(self.index).region, chunks, "snapshot applied");
                Ok(true)
            }
            Some(pb::provider_frame::Body::Heartbeat(beat)) => {
                let theirs: VersionVector = beat.applied.unwrap_or_default().into();
                self.peers.peer_holds(self.index, &theirs, false);
                let ours = self
                    .engine
                    .store()
                    .version_vector()
                    .map_err(NodeError::from)?;
                self.peers.lag(self.index, ours.missing_from(&theirs));
                Ok(false)
            }
            Some(pb::provider_frame::Body::Welcome(_)) | None => Err(self.refuse(
                "only the first frame may be a Welcome, and every frame needs a body".into(),
            )),
        }
    }
}
