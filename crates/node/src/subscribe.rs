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
//! Subscribers are kept by stream: publishing an entry reaches the queues
//! of that stream's subscribers only, and each subscription's response
//! stream ([`Subscription`]) reads its queue directly.
//!
//! When the node shuts down, [`Subscriptions::close`] ends every
//! subscription with UNAVAILABLE, so long-lived calls do not hold the
//! graceful shutdown open.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use concord_core::crdt::{StreamEntry, StreamId};
use concord_core::KeyspaceId;
use concord_proto::v1 as pb;
use concord_store::Store;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::Status;

/// Live entries queued for one subscriber; a subscriber further behind
/// than this is ended with RESOURCE_EXHAUSTED and can resubscribe after
/// the last id it got.
pub const PUBLISH_BUFFER_ENTRIES: usize = 4096;

/// Backlog entries read ahead for one subscriber.
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

/// One subscriber's live queue, as the publishing side holds it.
#[derive(Debug)]
struct Listener {
    id: u64,
    tx: mpsc::Sender<Arc<Appended>>,
    /// Set when its queue was full: it is ended with RESOURCE_EXHAUSTED.
    lagged: Arc<AtomicBool>,
}

/// Every subscriber, by stream: a published entry reaches only the
/// subscribers of its own stream, so publishing costs nothing per
/// subscriber of other streams.
#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    /// Keyspace, then key; a stream with no subscriber has no entry.
    streams: HashMap<KeyspaceId, HashMap<String, Vec<Listener>>>,
}

impl Registry {
    /// Keeps the listeners of one stream for which `keep` holds, and
    /// forgets the stream when none is left.
    fn retain(&mut self, keyspace: &KeyspaceId, key: &str, keep: impl FnMut(&Listener) -> bool) {
        let Some(keys) = self.streams.get_mut(keyspace) else {
            return;
        };
        let Some(listeners) = keys.get_mut(key) else {
            return;
        };
        listeners.retain(keep);
        if listeners.is_empty() {
            keys.remove(key);
            if keys.is_empty() {
                self.streams.remove(keyspace);
            }
        }
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // The registry is consistent after every statement: a panic elsewhere
    // while it was held leaves nothing half done.
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The publishing side of every subscription of a node.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    registry: Arc<Mutex<Registry>>,
    closed: Arc<watch::Sender<bool>>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            registry: Arc::default(),
            closed: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl Subscriptions {
    /// Publishes a durable entry to the subscribers of its stream. A
    /// subscriber whose queue is full is dropped and told so.
    pub fn publish(&self, appended: Appended) {
        let appended = Arc::new(appended);
        lock(&self.registry).retain(&appended.keyspace, &appended.key, |l| {
            match l.tx.try_send(appended.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    l.lagged.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Ends every subscription, current and future, with UNAVAILABLE.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Number of open subscriptions.
    pub fn count(&self) -> usize {
        lock(&self.registry)
            .streams
            .values()
            .flat_map(HashMap::values)
            .map(Vec::len)
            .sum()
    }

    /// Subscribes to one stream: entries after `after` already there (none
    /// when `after` is unset), then every new entry.
    pub fn subscribe(
        &self,
        store: Arc<Store>,
        keyspace: KeyspaceId,
        key: String,
        after: Option<StreamId>,
    ) -> Subscription {
        // Registered before the backlog is read, so nothing committed in
        // between is missed.
        let (tx, live) = mpsc::channel(PUBLISH_BUFFER_ENTRIES);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = {
            let mut registry = lock(&self.registry);
            let id = registry.next_id;
            registry.next_id += 1;
            registry
                .streams
                .entry(keyspace.clone())
                .or_default()
                .entry(key.clone())
                .or_default()
                .push(Listener {
                    id,
                    tx,
                    lagged: lagged.clone(),
                });
            id
        };
        let registration = Registration {
            registry: Arc::downgrade(&self.registry),
            keyspace: keyspace.clone(),
            key: key.clone(),
            id,
        };
        let backlog = after.map(|after| {
            let (out, backlog) = mpsc::channel(SUBSCRIBER_QUEUE_ENTRIES);
            tokio::spawn(read_backlog(
                store,
                keyspace,
                key,
                after,
                BACKLOG_MAX_ENTRIES,
                out,
            ));
            backlog
        });
        let mut closed = self.closed.subscribe();
        Subscription {
            closed: Box::pin(async move {
                // An error means the sender is gone with the node: end too.
                let _ = closed.wait_for(|closed| *closed).await;
            }),
            backlog,
            live,
            lagged,
            from_backlog: HashSet::new(),
            sent_up_to: after,
            done: false,
            _registration: registration,
        }
    }
}

/// Removes a subscriber from the registry when its stream is dropped.
struct Registration {
    registry: Weak<Mutex<Registry>>,
    keyspace: KeyspaceId,
    key: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            lock(&registry).retain(&self.keyspace, &self.key, |l| l.id != self.id);
        }
    }
}

/// What the backlog reader hands to its subscription.
enum Backlog {
    Entry(StreamEntry),
    Failed(Status),
}

/// Reads the entries after `after` in pages into `out`; ends (dropping
/// `out`) when they are all sent, or with an error item, RESOURCE_EXHAUSTED
/// when there are more than `most`.
async fn read_backlog(
    store: Arc<Store>,
    keyspace: KeyspaceId,
    key: String,
    after: StreamId,
    most: usize,
    out: mpsc::Sender<Backlog>,
) {
    // Nothing is above the greatest id.
    let Some(mut from) = after.successor() else {
        return;
    };
    let mut sent = 0usize;
    loop {
        let (s, ks, k) = (store.clone(), keyspace.clone(), key.clone());
        let page = s
            .offload()
            .run(move || s.stream_range(&ks, &k, from, StreamId::MAX, BACKLOG_PAGE_ENTRIES))
            .await;
        let page = match page {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                let _ = out
                    .send(Backlog::Failed(Status::from(crate::NodeError::from(e))))
                    .await;
                return;
            }
            Err(e) => {
                let _ = out
                    .send(Backlog::Failed(Status::unavailable(e.to_string())))
                    .await;
                return;
            }
        };
        let full = page.len() == BACKLOG_PAGE_ENTRIES;
        for entry in page {
            if sent == most {
                let _ = out
                    .send(Backlog::Failed(Status::resource_exhausted(format!(
                        "the backlog holds more than {most} entries; read it with StreamRange, then subscribe after its last id"
                    ))))
                    .await;
                return;
            }
            let next = entry.id.successor();
            sent += 1;
            if out.send(Backlog::Entry(entry)).await.is_err() {
                return;
            }
            let Some(next) = next else { return };
            from = next;
        }
        if !full {
            return;
        }
    }
}

/// One subscription's stream of entries: the backlog first, then the live
/// entries of its stream, each once, until the node shuts down (UNAVAILABLE)
/// or the subscriber falls too far behind (RESOURCE_EXHAUSTED).
///
/// Live entries go from the publisher straight into the subscription's
/// queue, which the connection reads: no task in between.
pub struct Subscription {
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The backlog still being read, when the subscriber asked for one.
    backlog: Option<mpsc::Receiver<Backlog>>,
    live: mpsc::Receiver<Arc<Appended>>,
    lagged: Arc<AtomicBool>,
    /// Ids sent from the backlog: an entry committed while the backlog was
    /// read also arrives live, and is skipped then. (Ids alone cannot
    /// tell: an entry replicated from another region may have a lower id
    /// than entries already sent.)
    from_backlog: HashSet<StreamId>,
    sent_up_to: Option<StreamId>,
    done: bool,
    _registration: Registration,
}

impl Subscription {
    fn end(&mut self, status: Status) -> Poll<Option<Result<pb::StreamEntry, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl Stream for Subscription {
    type Item = Result<pb::StreamEntry, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.closed.as_mut().poll(cx).is_ready() {
            return this.end(Status::unavailable(
                "the node is shutting down; resubscribe after the last id received",
            ));
        }
        if let Some(backlog) = this.backlog.as_mut() {
            match backlog.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Backlog::Entry(entry))) => {
                    this.from_backlog.insert(entry.id);
                    this.sent_up_to = this.sent_up_to.max(Some(entry.id));
                    return Poll::Ready(Some(Ok(entry.into())));
                }
                Poll::Ready(Some(Backlog::Failed(status))) => return this.end(status),
                Poll::Ready(None) => this.backlog = None,
            }
        }
        loop {
            match this.live.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(appended)) => {
                    // Already sent from the backlog.
                    if this.from_backlog.remove(&appended.entry.id) {
                        continue;
                    }
                    this.sent_up_to = this.sent_up_to.max(Some(appended.entry.id));
                    return Poll::Ready(Some(Ok(appended.entry.clone().into())));
                }
                Poll::Ready(None) => {
                    if this.lagged.load(Ordering::Acquire) {
                        let last = this
                            .sent_up_to
                            .map_or("none".to_string(), |id| id.to_string());
                        return this.end(Status::resource_exhausted(format!(
                            "subscriber fell more than {PUBLISH_BUFFER_ENTRIES} entries behind; resubscribe after the last id received ({last})"
                        )));
                    }
                    // The publishing side is gone with the node.
                    return this.end(Status::unavailable(
                        "the node is shutting down; resubscribe after the last id received",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::{CrdtType, Hlc, ReplicaId};
    use concord_store::{Identity, Offload, StoreOptions};
    use tokio_stream::StreamExt;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        let identity = Identity {
            region: "here".into(),
            replica: ReplicaId(1),
        };
        let options = StoreOptions {
            offload: Offload::Inline,
            ..StoreOptions::default()
        };
        Arc::new(Store::open(dir, identity, options).expect("open"))
    }

    fn events() -> KeyspaceId {
        KeyspaceId {
            name: "events".into(),
            ty: CrdtType::Stream,
        }
    }

    fn appended(key: &str, n: u64) -> Appended {
        Appended {
            keyspace: events(),
            key: key.into(),
            entry: StreamEntry {
                id: StreamId::new(Hlc::from_u64(n << 16), ReplicaId(2)),
                fields: Vec::new(),
            },
        }
    }

    /// Nothing is ready now (the stream would wait).
    async fn nothing_ready(sub: &mut Subscription) {
        let next = tokio::time::timeout(std::time::Duration::from_millis(20), sub.next()).await;
        assert!(next.is_err(), "unexpected item: {next:?}");
    }

    #[tokio::test]
    async fn an_entry_reaches_only_its_streams_subscribers_and_a_dropped_one_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let subs = Subscriptions::default();
        let mut a = subs.subscribe(store.clone(), events(), "a".into(), None);
        let mut b = subs.subscribe(store.clone(), events(), "b".into(), None);
        let a2 = subs.subscribe(store, events(), "a".into(), None);
        assert_eq!(subs.count(), 3);

        subs.publish(appended("a", 1));
        let got = a.next().await.expect("an item").expect("an entry");
        assert_eq!(got.id.map(|id| id.hlc), Some(1 << 16));
        nothing_ready(&mut b).await;

        drop(a2);
        assert_eq!(subs.count(), 2);
        drop(a);
        assert_eq!(subs.count(), 1);
        // No subscriber left on "a": publishing there is a no-op.
        subs.publish(appended("a", 2));
        subs.publish(appended("b", 3));
        let got = b.next().await.expect("an item").expect("an entry");
        assert_eq!(got.id.map(|id| id.hlc), Some(3 << 16));
    }

    #[tokio::test]
    async fn a_backlog_longer_than_its_limit_ends_with_resource_exhausted() {
        use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
        use concord_core::crdt::{Field, StreamCommand};
        use concord_core::{Command, Request};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let clock =
            concord_core::Clock::new(ManualTime::new(HLC_EPOCH_UNIX_MS + 5_000_000), 0, Hlc::ZERO)
                .expect("clock");
        let engine = crate::engine::Engine::new(store.clone(), Arc::new(clock));
        engine
            .create_keyspace("events".into(), CrdtType::Stream)
            .await
            .expect("create");
        for n in 0..5u8 {
            engine
                .run(vec![Request::new(
                    "events",
                    "a",
                    Command::Stream(StreamCommand::Append(vec![Field::new("n", vec![n])])),
                )])
                .await
                .expect("append");
        }
        let read = |most: usize| {
            let (out, mut backlog) = mpsc::channel(SUBSCRIBER_QUEUE_ENTRIES);
            let reader = read_backlog(
                store.clone(),
                events(),
                "a".into(),
                StreamId::MIN,
                most,
                out,
            );
            async move {
                reader.await;
                let mut got = Vec::new();
                while let Some(item) = backlog.recv().await {
                    got.push(item);
                }
                got
            }
        };
        let all = read(5).await;
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|b| matches!(b, Backlog::Entry(_))));
        let cut = read(3).await;
        assert_eq!(cut.len(), 4);
        assert!(cut[..3].iter().all(|b| matches!(b, Backlog::Entry(_))));
        let Backlog::Failed(status) = &cut[3] else {
            panic!("the fourth item is the refusal");
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("StreamRange"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn closing_ends_current_and_later_subscriptions_with_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let subs = Subscriptions::default();
        let mut before = subs.subscribe(store.clone(), events(), "a".into(), None);
        nothing_ready(&mut before).await;
        subs.close();
        let mut after = subs.subscribe(store, events(), "a".into(), None);
        for sub in [&mut before, &mut after] {
            let status = sub.next().await.expect("an item").expect_err("an error");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(sub.next().await.is_none());
        }
    }

    #[tokio::test]
    async fn a_subscriber_whose_queue_is_full_gets_what_was_queued_then_resource_exhausted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let subs = Subscriptions::default();
        let mut sub = subs.subscribe(store, events(), "a".into(), None);
        let n = PUBLISH_BUFFER_ENTRIES as u64 + 1;
        for i in 1..=n {
            subs.publish(appended("a", i));
        }
        assert_eq!(subs.count(), 0, "dropped when its queue overflowed");
        for i in 1..n {
            let got = sub.next().await.expect("an item").expect("an entry");
            assert_eq!(got.id.map(|id| id.hlc), Some(i << 16));
        }
        let status = sub.next().await.expect("an item").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("resubscribe"),
            "{}",
            status.message()
        );
        let last = StreamId::new(Hlc::from_u64((n - 1) << 16), ReplicaId(2));
        assert!(
            status.message().contains(&last.to_string()),
            "{}",
            status.message()
        );
        assert!(sub.next().await.is_none());
    }
}
