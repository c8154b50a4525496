//! Live stream subscriptions: entries appended on this node are published
//! to the subscribers of their stream, after their write is durable.
//!
//! A subscriber first gets the entries already there (when it asked for
//! entries after an id), read in pages, then the live ones: entries
//! appended in this region and entries replicated from others. It
//! registers for live entries before reading the backlog, so an entry
//! committed in between arrives once: from the backlog, and its live copy
//! is skipped.
//!
//! When the node shuts down, [`Subscriptions::close`] ends every
//! subscription with UNAVAILABLE, so long-lived calls do not hold the
//! graceful shutdown open.

use std::collections::HashSet;
use std::sync::Arc;

use concord_core::crdt::{StreamEntry, StreamId};
use concord_core::{KeyspaceId, ReplicaId};
use concord_proto::v1 as pb;
use concord_store::Store;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Entries in flight to all subscribers; a subscriber further behind than
/// this is ended with RESOURCE_EXHAUSTED and can resubscribe after the
/// last id it got.
pub const PUBLISH_BUFFER_ENTRIES: usize = 4096;

/// Entries queued for one subscriber's connection.
pub const SUBSCRIBER_QUEUE_ENTRIES: usize = 256;

/// Entries read per page of a subscriber's backlog.
pub const BACKLOG_PAGE_ENTRIES: usize = 512;

/// Most backlog entries one subscription sends before going live; a longer
/// backlog is read with `StreamRange` first. Bounds the memory that keeps
/// each entry from being sent twice.
pub const BACKLOG_MAX_ENTRIES: usize = 100_000;

/// One appended entry.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stream's keyspace.
    pub keyspace: KeyspaceId,
    /// The stream's key.
    pub key: String,
    /// The entry.
    pub entry: StreamEntry,
}

/// The publishing side of every subscription of a node.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    tx: broadcast::Sender<Arc<Appended>>,
    closed: Arc<watch::Sender<bool>>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            tx: broadcast::Sender::new(PUBLISH_BUFFER_ENTRIES),
            closed: Arc::new(watch::Sender::new(false)),
        }
    }
}

/// The id right after `id` in stream order.
fn successor(id: StreamId) -> StreamId {
    match id.replica.0.checked_add(1) {
        Some(r) => StreamId::new(id.hlc, ReplicaId(r)),
        None => StreamId::new(
            concord_core::Hlc::from_u64(id.hlc.as_u64().saturating_add(1)),
            ReplicaId(0),
        ),
    }
}

impl Subscriptions {
    /// Publishes a durable entry to the subscribers of its stream.
    pub fn publish(&self, appended: Appended) {
        // No subscriber is not an error.
        let _ = self.tx.send(Arc::new(appended));
    }

    /// Ends every subscription, current and future, with UNAVAILABLE.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Number of open subscriptions.
    pub fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Subscribes to one stream: entries after `after` already there (none
    /// when `after` is unset), then every new entry.
    pub fn subscribe(
        &self,
        store: Arc<Store>,
        keyspace: KeyspaceId,
        key: String,
        after: Option<StreamId>,
    ) -> ReceiverStream<Result<pb::StreamEntry, Status>> {
        let live = self.tx.subscribe();
        let (out, out_rx) = mpsc::channel(SUBSCRIBER_QUEUE_ENTRIES);
        let mut closed = self.closed.subscribe();
        let goodbye = out.clone();
        let feed = feed(store, keyspace, key, after, live, out);
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = closed.wait_for(|closed| *closed) => {
                    // Best effort: a full queue just ends the stream.
                    let _ = goodbye.try_send(Err(Status::unavailable(
                        "the node is shutting down; resubscribe after the last id received",
                    )));
                }
                () = feed => {}
            }
        });
        ReceiverStream::new(out_rx)
    }
}

/// Sends the backlog after `after`, then live entries, into `out` until the
/// subscriber goes away or falls too far behind.
async fn feed(
    store: Arc<Store>,
    keyspace: KeyspaceId,
    key: String,
    after: Option<StreamId>,
    mut live: broadcast::Receiver<Arc<Appended>>,
    out: mpsc::Sender<Result<pb::StreamEntry, Status>>,
) {
    let mut sent_up_to = after;
    // Ids sent from the backlog: an entry committed while the backlog was
    // read also arrives live, and is skipped then. (Ids alone cannot tell:
    // an entry replicated from another region may have a lower id than
    // entries already sent.)
    let mut from_backlog: HashSet<StreamId> = HashSet::new();
    if let Some(after) = after {
        let mut from = successor(after);
        loop {
            let (s, ks, k) = (store.clone(), keyspace.clone(), key.clone());
            let page = s
                .offload()
                .run(move || s.stream_range(&ks, &k, from, StreamId::MAX, BACKLOG_PAGE_ENTRIES))
                .await;
            let page = match page {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    let _ = out.send(Err(Status::from(crate::NodeError::from(e)))).await;
                    return;
                }
                Err(e) => {
                    let _ = out.send(Err(Status::unavailable(e.to_string()))).await;
                    return;
                }
            };
            let full = page.len() == BACKLOG_PAGE_ENTRIES;
            for entry in page {
                from = successor(entry.id);
                sent_up_to = Some(entry.id);
                if from_backlog.len() == BACKLOG_MAX_ENTRIES {
                    let _ = out
                        .send(Err(Status::resource_exhausted(format!(
                            "the backlog holds more than {BACKLOG_MAX_ENTRIES} entries; read it with StreamRange, then subscribe after its last id"
                        ))))
                        .await;
                    return;
                }
                from_backlog.insert(entry.id);
                if out.send(Ok(entry.into())).await.is_err() {
                    return;
                }
            }
            if !full {
                break;
            }
        }
    }
    loop {
        let appended = match live.recv().await {
            Ok(a) => a,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let last = sent_up_to.map_or("none".to_string(), |id| id.to_string());
                let _ = out
                    .send(Err(Status::resource_exhausted(format!(
                        "subscriber fell {n} entries behind; resubscribe after the last id received ({last})"
                    ))))
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if appended.keyspace != keyspace || appended.key != key {
            continue;
        }
        // Already sent from the backlog.
        if from_backlog.remove(&appended.entry.id) {
            continue;
        }
        sent_up_to = sent_up_to.max(Some(appended.entry.id));
        if out.send(Ok(appended.entry.clone().into())).await.is_err() {
            return;
        }
    }
}
