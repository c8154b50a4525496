//! Runs client requests against the region's store: resolves keyspaces,
//! turns a batch of requests into one atomic store batch, waits for
//! durability, and answers each request with its outcome (the service
//! turns outcomes into the API's results). A lone read skips the writer.
//!
//! Client batches go through one writer task, which takes every batch
//! waiting when it is free and stages them together
//! ([`Store::stage_many`]): one commit for many concurrent clients
//! instead of one each, all contending for the store's lock. Each batch
//! stays atomic on its own, and one that fails does not fail the others.
//! The writer does not wait for the journal write that makes a group
//! durable; each client does, so the writer goes on with the next group
//! or a peer's batch meanwhile. Delta batches from peers go through the
//! same writer ([`Engine::apply_remote`]), so the store's lock is never
//! handed from one thread to another under load (docs/DECISIONS.md).

use std::sync::Arc;

use concord_core::catalog::{Catalog, KeyspaceView};
use concord_core::crdt::{StreamCommand, StreamEntry};
use concord_core::{
    Clock, Command, CrdtType, Delta, Hlc, KeyspaceId, Outcome, Reply, Request, Stamp,
};
use concord_store::{ApplyReport, Item, Store, WriteReceipt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{NodeError, Result};
use crate::subscribe::{Appended, Subscriptions};

/// Most batches (client or peer) waiting for the writer; callers wait
/// beyond it.
pub const WRITE_QUEUE: usize = 1024;

/// Most operations and deltas the writer takes in one group (one batch
/// larger than this still runs, alone).
pub const MAX_COALESCED_OPS: usize = 4096;

/// Work on its way to the writer.
#[derive(Debug)]
enum Job {
    /// A client batch.
    Write(WriteJob),
    /// A delta batch from a peer.
    Apply(ApplyJob),
}

/// A client batch on its way to the writer.
#[derive(Debug)]
struct WriteJob {
    ops: Vec<Request>,
    reply: oneshot::Sender<Result<Written>>,
}

/// A batch the writer ran: its operations, their keyspaces, the receipt.
type Written = (Vec<Request>, Vec<KeyspaceId>, WriteReceipt);

/// A peer's delta batch on its way to the writer.
#[derive(Debug)]
struct ApplyJob {
    deltas: Vec<Delta>,
    hwm: Hlc,
    reply: oneshot::Sender<Applied>,
}

/// What applying a delta batch did, and the batch itself.
type Applied = std::result::Result<(ApplyReport, Vec<Delta>), concord_store::StoreError>;

impl Job {
    /// Operations or deltas it carries: its weight in a group.
    fn weight(&self) -> usize {
        match self {
            Job::Write(job) => job.ops.len(),
            Job::Apply(job) => job.deltas.len(),
        }
    }
}

/// The region's state as the services see it.
#[derive(Debug, Clone)]
pub struct Engine {
    store: Arc<Store>,
    clock: Arc<Clock>,
    writer: mpsc::Sender<Job>,
    subscriptions: Subscriptions,
    /// Turns true when the node starts shutting down.
    stopping: Arc<watch::Sender<bool>>,
}

impl Engine {
    /// An engine over `store`, stamping writes with `clock`. Starts the
    /// writer task, so it must be called inside a tokio runtime; the task
    /// ends when the last clone of the engine is dropped.
    pub fn new(store: Arc<Store>, clock: Arc<Clock>) -> Self {
        let (writer, jobs) = mpsc::channel(WRITE_QUEUE);
        spawn_writer(store.clone(), clock.clone(), jobs);
        Engine {
            store,
            clock,
            writer,
            subscriptions: Subscriptions::default(),
            stopping: Arc::new(watch::Sender::new(false)),
        }
    }

    /// A receiver that sees a change whenever own deltas become durable
    /// or a peer's deltas land ([`Store::changes`]).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.store.changes()
    }

    /// The highest seq of this region's own log that may leave the
    /// region ([`Store::durable_own_seq`]).
    pub fn durable_own_seq(&self) -> u64 {
        self.store.durable_own_seq()
    }

    /// Starts the shutdown: subscriptions and peer streams end.
    pub fn begin_shutdown(&self) {
        self.subscriptions.close();
        self.stopping.send_replace(true);
    }

    /// A receiver that turns true when the node starts shutting down.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Where appended entries are published.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.subscriptions
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The node's clock.
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Runs store work where the store's [`Offload`](concord_store::Offload)
    /// says (off the async workers by default): it takes the store's writer
    /// lock and does disk I/O.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &Clock) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (store, clock) = (self.store.clone(), self.clock.clone());
        self.store
            .offload()
            .run(move || f(&store, &clock))
            .await
            .map_err(|e| NodeError::Unavailable(format!("store task failed: {e}")))?
    }

    /// Creates a keyspace (idempotent for the same type); returns it and
    /// whether this call created it, once durable.
    pub async fn create_keyspace(
        &self,
        name: String,
        ty: CrdtType,
    ) -> Result<(KeyspaceView, bool)> {
        concord_core::limits::check_keyspace_name(&name)?;
        let (view, created, receipt) = self
            .blocking(move |store, clock| Ok(store.declare(clock, &name, ty)?))
            .await?;
        // A declaration is acknowledged once on disk in either mode.
        self.store.persisted(&receipt).await?;
        Ok((view, created))
    }

    /// Runs requests as one atomic batch: all are applied or none; reads
    /// see the writes before them. Answered once durable (in relaxed mode,
    /// once applied), with each request and its outcome.
    pub async fn run(&self, requests: Vec<Request>) -> Result<Vec<(Request, Outcome)>> {
        let limits = self.store.limits();
        if requests.is_empty() {
            return Err(NodeError::InvalidRequest(
                "a batch needs at least one operation".into(),
            ));
        }
        if requests.len() > limits.max_batch_ops {
            return Err(concord_core::CoreError::LimitExceeded {
                what: "operations in one batch",
                limit: limits.max_batch_ops as u64,
                actual: requests.len() as u64,
            }
            .into());
        }
        let mut ops = requests
            .into_iter()
            .map(|r| r.checked(limits))
            .collect::<concord_core::Result<Vec<_>>>()?;
        if ops.len() == 1 && !ops[0].command.is_write() {
            if let Some(op) = ops.pop() {
                return Ok(vec![self.read(op).await?]);
            }
        }
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Write(WriteJob { ops, reply })).await?;
        let (ops, keyspaces, receipt) = answer
            .await
            .map_err(|_| NodeError::Unavailable("the store task failed".into()))??;
        // The store publishes own deltas as shippable once they are on
        // disk: here in group mode; in relaxed mode, which answers before
        // the disk, when the writer's sync of the group has flushed them.
        self.store.durable(&receipt).await?;
        for ((op, keyspace), outcome) in ops.iter().zip(keyspaces).zip(&receipt.results) {
            if let (
                Command::Stream(StreamCommand::Append(fields)),
                Outcome {
                    write: Some(Stamp { seq, .. }),
                    reply: Reply::Appended(id),
                },
            ) = (&op.command, outcome)
            {
                if *seq > 0 {
                    self.subscriptions.publish(Appended {
                        keyspace,
                        key: op.key.clone(),
                        entry: StreamEntry {
                            id: *id,
                            fields: fields.clone(),
                        },
                    });
                }
            }
        }
        Ok(ops.into_iter().zip(receipt.results).collect())
    }

    /// Runs a lone read without the writer ([`Store::read`]): it does not
    /// wait behind the write groups queued before it (a set or a range
    /// waits only for the commit running, under the writer lock). A batch of several
    /// reads still goes through the writer, which reads them all from one
    /// commit.
    async fn read(&self, op: Request) -> Result<(Request, Outcome)> {
        let catalog = self
            .store
            .catalog()
            .map_err(|e| NodeError::Unavailable(format!("cannot read the catalog: {e}")))?;
        let (mut items, _) = resolve(&catalog, std::slice::from_ref(&op))?;
        let item = items.pop().ok_or_else(|| {
            NodeError::Core(concord_core::CoreError::Bug(
                "a resolved read has no item".into(),
            ))
        })?;
        let outcome = self
            .blocking(move |store, _| Ok(store.read(&item)?))
            .await?;
        Ok((op, outcome))
    }

    /// Applies a peer's delta batch ([`Store::apply_remote`]) on the
    /// writer, in turn with client batches; returns the report and the
    /// batch. Not durable yet: see [`Store::sync`].
    pub async fn apply_remote(
        &self,
        deltas: Vec<Delta>,
        hwm: Hlc,
    ) -> Result<(ApplyReport, Vec<Delta>)> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Apply(ApplyJob { deltas, hwm, reply }))
            .await?;
        let applied = answer
            .await
            .map_err(|_| NodeError::Unavailable("the store task failed".into()))?;
        Ok(applied?)
    }

    /// Queues work for the writer.
    async fn submit(&self, job: Job) -> Result<()> {
        self.writer
            .send(job)
            .await
            .map_err(|_| NodeError::Unavailable("the writer has stopped".into()))
    }
}

/// Starts the writer, which ends when the last sender is dropped.
///
/// With [`Offload::Pool`](concord_store::Offload::Pool) the writer is a
/// thread of its own that blocks on the store: every client write and
/// every peer's delta batch passes through it, and a thread that is
/// already running when the next batches arrive takes them without a
/// wake-up, where a task handing each group to tokio's blocking pool paid
/// two thread switches per group (batched writes gained;
/// docs/BENCHMARKS.md). With
/// [`Offload::Inline`](concord_store::Offload::Inline) — a deterministic,
/// single-threaded runtime — it is a task that runs each group inline, so
/// no second thread decides when a result comes back.
fn spawn_writer(store: Arc<Store>, clock: Arc<Clock>, mut jobs: mpsc::Receiver<Job>) {
    if store.offload() == concord_store::Offload::Inline {
        tokio::spawn(async move {
            let mut held = None;
            loop {
                let first = match held.take() {
                    Some(job) => job,
                    None => match jobs.recv().await {
                        Some(job) => job,
                        None => return,
                    },
                };
                let group = next_group(first, &mut jobs, &mut held);
                run_group(&store, &clock, group, &tokio::runtime::Handle::current());
            }
        });
        return;
    }
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("concord-writer".into())
        .spawn(move || {
            let mut held = None;
            loop {
                let first = match held.take() {
                    Some(job) => job,
                    None => match jobs.blocking_recv() {
                        Some(job) => job,
                        None => return,
                    },
                };
                let group = next_group(first, &mut jobs, &mut held);
                // A panic drops the unanswered reply channels, so their
                // callers are told their batches failed; the writer goes
                // on with the next group, as a failed blocking-pool task
                // would.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_group(&store, &clock, group, &runtime)
                }));
                if ran.is_err() {
                    tracing::error!("a write group panicked; its batches failed");
                }
            }
        });
    if let Err(e) = spawned {
        // Without a writer every write fails with UNAVAILABLE (the jobs'
        // receiver is dropped with the closure), which callers see.
        tracing::error!(error = %e, "cannot start the writer thread");
    }
}

/// A group of jobs: `first`, then every job waiting, up to
/// [`MAX_COALESCED_OPS`] operations and deltas; a job that would overflow
/// the group is held back in `held` for the next one.
fn next_group(first: Job, jobs: &mut mpsc::Receiver<Job>, held: &mut Option<Job>) -> Vec<Job> {
    let mut weight = first.weight();
    let mut group = vec![first];
    while weight < MAX_COALESCED_OPS {
        let Ok(job) = jobs.try_recv() else { break };
        if weight + job.weight() > MAX_COALESCED_OPS {
            *held = Some(job);
            break;
        }
        weight += job.weight();
        group.push(job);
    }
    group
}

/// Runs a group and answers each job: the peers' delta batches first, one
/// transaction each (a refused batch fails only itself), then the client
/// batches together, staged: each client waits for its batch to be
/// durable, and so does a task spawned on `runtime`, so that the group
/// reaches sled, and is shipped (the store publishes it durable), even
/// when every client gave up waiting.
fn run_group(store: &Arc<Store>, clock: &Clock, group: Vec<Job>, runtime: &tokio::runtime::Handle) {
    let mut writes = Vec::with_capacity(group.len());
    for job in group {
        match job {
            Job::Write(job) => writes.push(job),
            Job::Apply(job) => {
                let applied = store
                    .apply_remote(&job.deltas, job.hwm)
                    .map(|report| (report, job.deltas));
                // A peer link that gave up no longer listens; what was
                // applied stands and is acknowledged by a later frame.
                let _ = job.reply.send(applied);
            }
        }
    }
    if writes.is_empty() {
        return;
    }
    let done = run_writes(store, clock, writes);
    let wrote = done
        .iter()
        .any(|(_, r)| r.as_ref().is_ok_and(|(_, _, receipt)| receipt.last_seq > 0));
    if wrote {
        let store = store.clone();
        runtime.spawn(async move {
            if let Err(e) = store.sync().await {
                tracing::warn!(error = %e, "a staged write group did not become durable")
            }
        });
    }
    for (reply, result) in done {
        // A caller that gave up no longer listens; its write stands.
        let _ = reply.send(result);
    }
}

/// Resolves and runs client batches in one transaction; returns each
/// one's reply channel and outcome.
fn run_writes(
    store: &Store,
    clock: &Clock,
    group: Vec<WriteJob>,
) -> Vec<(oneshot::Sender<Result<Written>>, Result<Written>)> {
    let catalog = store.catalog();
    let mut ready = Vec::with_capacity(group.len());
    let mut done = Vec::with_capacity(group.len());
    for job in group {
        let resolved = match &catalog {
            Ok(catalog) => resolve(catalog, &job.ops),
            Err(e) => Err(NodeError::Unavailable(format!(
                "cannot read the catalog: {e}"
            ))),
        };
        match resolved {
            Ok((items, keyspaces)) => ready.push((job, items, keyspaces)),
            Err(e) => done.push((job.reply, Err(e))),
        }
    }
    let batches: Vec<&[Item]> = ready.iter().map(|(_, items, _)| items.as_slice()).collect();
    let receipts = store.stage_many(clock, &batches);
    for ((job, _, keyspaces), receipt) in ready.into_iter().zip(receipts) {
        let result = receipt
            .map(|receipt| (job.ops, keyspaces, receipt))
            .map_err(NodeError::from);
        done.push((job.reply, result));
    }
    done
}

/// The store items of a batch, and their keyspaces.
fn resolve(catalog: &Catalog, ops: &[Request]) -> Result<(Vec<Item>, Vec<KeyspaceId>)> {
    let mut items = Vec::with_capacity(ops.len());
    let mut keyspaces = Vec::with_capacity(ops.len());
    for op in ops {
        let keyspace = catalog
            .resolve(&op.keyspace)
            .ok_or_else(|| NodeError::UnknownKeyspace(op.keyspace.clone()))?;
        let needed = op.command.crdt_type();
        if keyspace.ty != needed {
            return Err(NodeError::WrongType {
                keyspace: op.keyspace.clone(),
                is: keyspace.ty,
                needs: needed,
            });
        }
        items.push(Item::new(
            keyspace.clone(),
            op.key.clone(),
            op.command.clone(),
        ));
        keyspaces.push(keyspace);
    }
    Ok((items, keyspaces))
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
    use concord_core::crdt::{CounterOp, Direction};
    use concord_core::{Op, ReplicaId};
    use concord_store::{Identity, Offload, StoreError, StoreOptions};

    const T0: i64 = HLC_EPOCH_UNIX_MS + 5_000_000;
    const PEER: ReplicaId = ReplicaId(2);

    fn engine(dir: &std::path::Path) -> Engine {
        engine_with(
            dir,
            StoreOptions {
                offload: Offload::Inline,
                ..StoreOptions::default()
            },
        )
    }

    fn engine_with(dir: &std::path::Path, options: StoreOptions) -> Engine {
        let identity = Identity {
            region: "here".into(),
            replica: ReplicaId(1),
        };
        let store = Store::open(dir, identity, options).expect("open");
        let clock = Clock::new(ManualTime::new(T0), 0, Hlc::ZERO).expect("clock");
        Engine::new(Arc::new(store), Arc::new(clock))
    }

    /// An engine with the counter keyspace `hits` declared.
    async fn counting(dir: &std::path::Path) -> Engine {
        let engine = engine(dir);
        engine
            .create_keyspace("hits".into(), CrdtType::Counter)
            .await
            .expect("create");
        engine
    }

    fn add(n: i64) -> Vec<Request> {
        vec![Request::new(
            "hits",
            "k",
            Command::Counter(concord_core::crdt::CounterCommand::Add(n)),
        )]
    }

    fn from_peer(seq: u64) -> Delta {
        Delta {
            origin: PEER,
            seq,
            hlc: Hlc::from_parts(T0 - 1_000, seq as u32).expect("hlc"),
            keyspace: "hits".into(),
            key: "p".into(),
            op: Op::Counter(CounterOp {
                direction: Direction::Increment,
                total: seq,
            }),
        }
    }

    fn counter(engine: &Engine, key: &str) -> i64 {
        let ks = engine.store().catalog().expect("catalog");
        let ks = ks.resolve("hits").expect("keyspace").clone();
        match engine.store().get(&ks, key).expect("get") {
            concord_core::Value::Counter(c) => i64::try_from(c.value()).expect("fits"),
            other => panic!("not a counter: {other:?}"),
        }
    }

    /// A client that gave up before its write ran: nobody waits for the
    /// staged group, yet it becomes durable, readable and shipped.
    #[tokio::test(flavor = "current_thread")]
    async fn a_group_whose_clients_gave_up_is_still_written_and_shipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = counting(dir.path()).await;
        let before = engine.durable_own_seq();
        let (reply, answer) = oneshot::channel();
        drop(answer);
        engine
            .submit(Job::Write(WriteJob { ops: add(4), reply }))
            .await
            .expect("submit");
        let shipped = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while engine.durable_own_seq() <= before {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(shipped.is_ok(), "the abandoned write was never shipped");
        assert_eq!(engine.durable_own_seq(), before + 1);
        assert_eq!(counter(&engine, "k"), 4);
    }

    /// With the writer a task on this very thread, every job queued below
    /// is waiting when it first runs: they make one group, in which a
    /// refused peer batch must fail alone.
    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_peer_batch_fails_alone_among_client_writes_and_good_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = counting(dir.path()).await;
        let hwm = engine.clock().last();
        let (first, gap, second, good) = tokio::join!(
            engine.run(add(1)),
            // Seq 2 before seq 1: a gap, refused whole.
            engine.apply_remote(vec![from_peer(2), from_peer(3)], hwm),
            engine.run(add(2)),
            engine.apply_remote(vec![from_peer(1)], hwm),
        );
        first.expect("first write");
        second.expect("second write");
        assert!(
            matches!(gap, Err(NodeError::Store(StoreError::Gap { .. }))),
            "{gap:?}"
        );
        let (report, deltas) = good.expect("good batch");
        assert_eq!((report.applied, report.duplicates), (1, 0));
        assert_eq!(deltas, vec![from_peer(1)]);
        assert_eq!(counter(&engine, "k"), 3);
        assert_eq!(counter(&engine, "p"), 1);
        assert_eq!(engine.store().applied(PEER).expect("applied"), 1);
    }

    /// With the default offload the writer is a thread outside the tokio
    /// runtime; the journal checkpoints its writes start must not fail
    /// them (they did: a checkpoint went to tokio's blocking pool).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_thread_fills_journal_segments_without_failing_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine_with(
            dir.path(),
            StoreOptions {
                journal_segment_bytes: concord_store::journal::MIN_SEGMENT_BYTES,
                ..StoreOptions::default()
            },
        );
        engine
            .create_keyspace("hits".into(), CrdtType::Counter)
            .await
            .expect("create");
        // About 60 bytes a write: 300 fill several 4 KiB segments.
        for _ in 0..300 {
            engine.run(add(1)).await.expect("write");
        }
        assert_eq!(counter(&engine, "k"), 300);
    }
}
