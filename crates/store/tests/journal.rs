//! The journal: recovery of what sled lost, torn tails, corruption,
//! checkpoints.
//!
//! A killed process does not lose what sled handed to the kernel, so a
//! crash that loses sled's unflushed writes (a power cut) is staged by
//! copying: a directory is copied aside while it holds only a keyspace
//! declaration (sled's state "before"), then the original takes writes,
//! and its journal is put beside the old copy of sled's state. Opening
//! that must replay every journaled write.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use concord_core::crdt::{CounterCommand, RegisterCommand};
use concord_core::{Clock, Command, CrdtType};
use concord_store::{journal, Durability, OsDisk, Store, StoreError, StoreOptions};

/// Options that keep sled's own flush out of the way (the tests do not
/// depend on it: dropping a store flushes sled anyway).
fn options() -> StoreOptions {
    StoreOptions {
        flush_every_ms: 600_000,
        ..StoreOptions::default()
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join(journal::DIR))
        .map(|entries| entries.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// Checkpoints run off the write path: gives the last one a moment, then
/// requires at most four segments left: the one just filled, the active
/// one, the next one prepared, and one more when the last fill found the
/// checkpoint before still running (it then starts none; the next fill
/// does).
fn assert_checkpointed(dir: &Path) {
    let mut left = segments(dir).len();
    for _ in 0..100 {
        if left <= 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = segments(dir).len();
    }
    assert!(left <= 4, "{left} segments left after checkpoints");
}

/// Segment header and frame header sizes of the journal's format.
const SEGMENT_HEADER: usize = 12;
const FRAME_HEADER: usize = 12;

/// Where the frames of a segment's `bytes` end (the zeros it was made
/// with follow), and where the last one starts.
fn frames_end(bytes: &[u8]) -> (usize, usize) {
    let (mut at, mut last) = (SEGMENT_HEADER, SEGMENT_HEADER);
    while bytes.len() >= at + FRAME_HEADER && bytes[at..at + 4] != [0; 4] {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        last = at;
        at += FRAME_HEADER + len as usize;
    }
    (at, last)
}

/// Whether the segment at `path` holds no frame.
fn holds_no_frame(path: &Path) -> bool {
    let bytes = std::fs::read(path).expect("read");
    frames_end(&bytes).0 == SEGMENT_HEADER
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Increments of counter `k` by 1, 2, 3, ..., each durable on its own, so
/// each is one frame of the journal; then a peer's batch applied on top.
async fn write_frames(store: &Store, clock: &Clock, increments: i64, peer: &Store) {
    for by in 1..=increments {
        let receipt = store
            .write(
                clock,
                &[write("k", Command::Counter(CounterCommand::Add(by)))],
            )
            .expect("write");
        store.durable(&receipt).await.expect("durable");
    }
    tail(peer, store, clock);
    store.sync().await.expect("sync");
}

/// Stages a crash that lost sled's unflushed writes: `root/source` is
/// copied to `root/lost` while it holds only the declarations, then
/// `writes` run on `source`, and `source`'s journal replaces `lost`'s.
/// Returns `lost` and the dump of `source`.
async fn stage(root: &Path, writes: impl AsyncFnOnce(&Store, &Clock)) -> (PathBuf, Dump) {
    let (source, lost) = (root.join("source"), root.join("lost"));
    let (_t, clock) = manual_clock();
    {
        let store = open_as(&source, 1, options());
        declare_all(&store, &clock);
        store.flush().expect("flush");
    }
    copy_dir(&source, &lost);
    let expected = {
        let store = open_as(&source, 1, options());
        writes(&store, &clock).await;
        dump(&store)
    };
    std::fs::remove_dir_all(lost.join(journal::DIR)).expect("rm journal");
    copy_dir(&source.join(journal::DIR), &lost.join(journal::DIR));
    (lost, expected)
}

/// [`stage`] with `increments` frames and then a peer's batch.
async fn staged(root: &Path, increments: i64) -> (PathBuf, Dump) {
    let peer = open_as(&root.join("peer"), 2, options());
    let (_pt, peer_clock) = manual_clock();
    declare_all(&peer, &peer_clock);
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..40 {
        peer.write(&peer_clock, &[random_write(&mut rng, &peer)])
            .expect("peer write");
    }
    stage(root, async |store: &Store, clock: &Clock| {
        write_frames(store, clock, increments, &peer).await
    })
    .await
}

fn counter_k(store: &Store) -> i128 {
    match store.get(&ks("hits", CrdtType::Counter), "k").expect("get") {
        concord_core::Value::Counter(c) => c.value(),
        other => panic!("not a counter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sled_lost_are_replayed_from_the_journal() {
    let root = tempfile::tempdir().expect("tempdir");
    let (lost, expected) = staged(root.path(), 10).await;
    let store = open_as(&lost, 1, options());
    assert_eq!(dump(&store), expected, "the replay gives back every write");
    assert_eq!(counter_k(&store), 55);
    assert_eq!(
        store
            .version_vector()
            .expect("vv")
            .get(concord_core::ReplicaId(1)),
        14
    );
    // The replayed writes are in sled now: the journal starts anew and a
    // second open finds the same.
    assert_eq!(segments(&lost).len(), 1, "one fresh segment");
    drop(store);
    let again = open_as(&lost, 1, options());
    assert_eq!(dump(&again), expected);
    // And the region goes on numbering its writes after the replayed ones.
    let (_t, clock) = manual_clock();
    let receipt = again
        .write(
            &clock,
            &[write("k", Command::Counter(CounterCommand::Add(1)))],
        )
        .expect("write");
    assert_eq!(receipt.last_seq, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_frame_is_cut_off_and_the_rest_replayed() {
    for tear in ["cut", "zeros", "garbled"] {
        let root = tempfile::tempdir().expect("tempdir");
        // No peer batch here: the last frame is the last increment.
        let (lost, _) = staged_increments_only(root.path(), 5).await;
        let segment = segments(&lost).pop().expect("a segment");
        let mut bytes = std::fs::read(&segment).expect("read");
        // The last frame holds one increment of 5: its delta is under 100
        // bytes, and the frame header 12.
        let (end, _) = frames_end(&bytes);
        match tear {
            "cut" => bytes.truncate(end - 3),
            "zeros" => bytes[end - 20..end].fill(0),
            _ => bytes[end - 1] ^= 0xff,
        }
        std::fs::write(&segment, &bytes).expect("write");
        let store = open_as(&lost, 1, options());
        assert_eq!(
            counter_k(&store),
            1 + 2 + 3 + 4,
            "{tear}: the torn write is dropped"
        );
    }
}

/// A write torn in the active segment, with the next segment prepared
/// after it (holding no frame yet), is the last write: it is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_frame_before_the_prepared_next_segment_is_cut_off() {
    let root = tempfile::tempdir().expect("tempdir");
    // 45 writes of 1,000 bytes take the 64 KiB first segment past half
    // its size (the next one is then prepared) and do not fill it.
    let items = (1..=45u8)
        .map(|i| write("r", Command::Register(RegisterCommand::Set(vec![i; 1000]))))
        .collect();
    let (lost, _) = staged_items(root.path(), items).await;
    let mut found = segments(&lost);
    assert_eq!(found.len(), 2, "the active segment and the prepared one");
    let prepared = found.pop().expect("prepared");
    assert!(holds_no_frame(&prepared));
    let active = found.pop().expect("active");
    let mut bytes = std::fs::read(&active).expect("read");
    let (end, last) = frames_end(&bytes);
    assert_eq!(
        bytes.len() as u64,
        journal::FIRST_SEGMENT_BYTES,
        "made at full size"
    );
    bytes[(last + end) / 2] ^= 0xff;
    std::fs::write(&active, &bytes).expect("write");
    let store = open_as(&lost, 1, options());
    let names = ks("names", CrdtType::Register);
    match store.get(&names, "r").expect("get") {
        concord_core::Value::Register(r) => assert_eq!(
            r.get().map(|(v, _)| v.to_vec()),
            Some(vec![44u8; 1000]),
            "the torn write is dropped, the one before it kept"
        ),
        other => panic!("not a register: {other:?}"),
    }
}

/// Segments are made at their full size and double, up to the configured
/// size; what they hold is all replayed.
#[tokio::test(flavor = "current_thread")]
async fn segments_are_made_at_full_size_and_double() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Inline: every preparation is done before the write returns, so no
    // segment outgrows the size it was made at.
    let inline = StoreOptions {
        offload: concord_store::Offload::Inline,
        journal_segment_bytes: 256 << 10,
        ..options()
    };
    let (_t, clock) = manual_clock();
    let store = open_as(dir.path(), 1, inline.clone());
    declare_all(&store, &clock);
    let mut sizes = std::collections::BTreeSet::new();
    for i in 0..1_000u32 {
        let receipt = store
            .write(
                &clock,
                &[write(
                    &format!("k{i}"),
                    Command::Register(RegisterCommand::Set(vec![7; 1000])),
                )],
            )
            .expect("write");
        store.durable(&receipt).await.expect("durable");
        for path in segments(dir.path()) {
            sizes.insert(std::fs::metadata(&path).expect("metadata").len());
        }
    }
    let first = journal::FIRST_SEGMENT_BYTES;
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        [first, 2 * first, 256 << 10],
        "64 KiB, 128 KiB, then the configured 256 KiB"
    );
    drop(store);
    let store = open_as(dir.path(), 1, inline);
    assert_eq!(
        store
            .version_vector()
            .expect("vv")
            .get(concord_core::ReplicaId(1)),
        1_004
    );
}

/// [`staged`] without the peer's batch: increments of `k` by 1, 2, ...
async fn staged_increments_only(root: &Path, increments: i64) -> (PathBuf, Dump) {
    let items = (1..=increments)
        .map(|by| write("k", Command::Counter(CounterCommand::Add(by))))
        .collect();
    staged_items(root, items).await
}

/// [`stage`] with `items` as the writes, each durable on its own.
async fn staged_items(root: &Path, items: Vec<concord_store::Item>) -> (PathBuf, Dump) {
    stage(root, async move |store: &Store, clock: &Clock| {
        for item in items {
            let receipt = store.write(clock, &[item]).expect("write");
            store.durable(&receipt).await.expect("durable");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_a_limit_lowered_since_are_still_replayed() {
    let root = tempfile::tempdir().expect("tempdir");
    let value = vec![7u8; 200];
    let (lost, expected) = staged_items(
        root.path(),
        vec![write("r", Command::Register(RegisterCommand::Set(value)))],
    )
    .await;
    let mut lowered = options();
    lowered.limits.max_value_bytes = 16;
    let store = open_as(&lost, 1, lowered);
    assert_eq!(
        dump(&store),
        expected,
        "the 200-byte write was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_frame_with_frames_after_it_refuses_to_open_and_changes_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let (lost, _) = staged_increments_only(root.path(), 5).await;
    let segment = segments(&lost).pop().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    // Byte 30 is inside the first frame's payload (the segment header is
    // 12 bytes, the frame header 8).
    bytes[30] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    let Err(err) = Store::open(&lost, identity_of(1), options()) else {
        panic!("a damaged journal is refused");
    };
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("journal segment") && text.contains("byte 12"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&segment).expect("read"),
        bytes,
        "the journal is left as it was"
    );
}

fn identity_of(replica: u32) -> concord_store::Identity {
    concord_store::Identity {
        region: format!("region-{replica}"),
        replica: concord_core::ReplicaId(replica),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_in_relaxed_mode_replays_the_journal_and_removes_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let (lost, expected) = staged(root.path(), 3).await;
    let relaxed = StoreOptions {
        durability: Durability::Relaxed,
        ..options()
    };
    let store = open_as(&lost, 1, relaxed);
    assert_eq!(dump(&store), expected);
    assert!(
        !lost.join(journal::DIR).exists(),
        "relaxed mode keeps no journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_segments_are_checkpointed_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = StoreOptions {
        journal_segment_bytes: journal::MIN_SEGMENT_BYTES,
        ..options()
    };
    let (_t, clock) = manual_clock();
    let store = open_as(dir.path(), 1, small.clone());
    declare_all(&store, &clock);
    // About 60 bytes a frame: 2,000 frames fill some 30 segments.
    for by in 1..=2_000 {
        let receipt = store
            .write(
                &clock,
                &[write("k", Command::Counter(CounterCommand::Add(by)))],
            )
            .expect("write");
        store.durable(&receipt).await.expect("durable");
    }
    assert_checkpointed(dir.path());
    assert!(
        store.flush_count() >= 2_000,
        "one journal write per durable write"
    );
    drop(store);
    let store = open_as(dir.path(), 1, small);
    assert_eq!(counter_k(&store), 2_000 * 2_001 / 2);
}

/// The node's writer is a thread of its own, outside any tokio runtime:
/// the checkpoints its writes start must run from there too.
#[test]
fn writes_from_a_thread_without_a_runtime_start_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = StoreOptions {
        journal_segment_bytes: journal::MIN_SEGMENT_BYTES,
        ..options()
    };
    let store = std::sync::Arc::new(open_as(dir.path(), 1, small));
    let writer = store.clone();
    std::thread::spawn(move || {
        let (_t, clock) = manual_clock();
        declare_all(&writer, &clock);
        for by in 1..=500 {
            writer
                .write(
                    &clock,
                    &[write("k", Command::Counter(CounterCommand::Add(by)))],
                )
                .expect("write");
        }
    })
    .join()
    .expect("the writing thread");
    assert_checkpointed(dir.path());
    assert_eq!(counter_k(&store), 500 * 501 / 2);
}

/// A peer's batches are written to sled at once, their deltas left for
/// the next journal write; a caller that never waits still does not make
/// them pile up in memory.
#[test]
fn peer_batches_nobody_waits_for_are_written_out_past_the_pending_limit() {
    let root = tempfile::tempdir().expect("tempdir");
    let (_t, clock) = manual_clock();
    let peer = open_as(&root.path().join("peer"), 2, options());
    declare_all(&peer, &clock);
    // 64 KiB values: 300 of them are past the 16 MiB limit.
    let value = vec![1u8; 64 << 10];
    for i in 0..300 {
        peer.write(
            &clock,
            &[write(
                &format!("r{i}"),
                Command::Register(RegisterCommand::Set(value.clone())),
            )],
        )
        .expect("peer write");
    }
    assert!(
        (journal::MAX_PENDING_BYTES as u64) < 300 * (64 << 10),
        "the test writes past the limit"
    );
    let store = open_as(&root.path().join("region"), 1, options());
    tail(&peer, &store, &clock);
    assert!(
        store.flush_count() >= 1,
        "nobody waited, yet the journal was written"
    );
}

/// Sets `dir`'s version vector records back to `to` (removing those `to`
/// lacks), as a crash that kept a staged commit's other records but not
/// its vector entry, written last, would leave them.
fn rewind_vector(dir: &Path, to: &concord_core::VersionVector, now: &concord_core::VersionVector) {
    let db = open_sled(dir);
    let vv = db.open_tree("vv").expect("tree");
    for (origin, _) in now.iter() {
        let key = concord_store::layout::replica_key(origin);
        match to.get(origin) {
            0 => vv.remove(key).expect("remove"),
            seq => vv.insert(key, &seq.to_be_bytes()).expect("insert"),
        };
    }
    db.flush().expect("flush");
}

/// A crash may leave sled with part of a staged commit: its values, rows,
/// members and log entries, but not the version vector entry written last.
/// The replay applies those deltas again over records that already hold
/// them, and must give back the same state, each operation counted once.
/// A peer's batch the journal never took (nobody synced before the crash)
/// is not replayed: the vector says it is missing, and the peer sends it
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_sled_kept_in_part_are_completed_by_the_replay_without_double_counting() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("region");
    let peer = open_as(&root.path().join("peer"), 2, options());
    let (_pt, peer_clock) = manual_clock();
    declare_all(&peer, &peer_clock);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut peer_writes = |n: usize| {
        for _ in 0..n {
            peer.write(&peer_clock, &[random_write(&mut rng, &peer)])
                .expect("peer write");
        }
    };
    peer_writes(40);
    let (_t, clock) = manual_clock();
    let declared = {
        let store = open_as(&dir, 1, options());
        declare_all(&store, &clock);
        store.version_vector().expect("vv")
    };
    let journaled_from_peer;
    let expected = {
        let store = open_as(&dir, 1, options());
        let mut rng = fastrand::Rng::with_seed(12);
        for _ in 0..60 {
            let item = random_write(&mut rng, &store);
            let receipt = store.write(&clock, &[item]).expect("write");
            store.durable(&receipt).await.expect("durable");
        }
        tail(&peer, &store, &clock);
        store.sync().await.expect("sync");
        journaled_from_peer = store.applied(concord_core::ReplicaId(2)).expect("applied");
        peer_writes(20);
        tail(&peer, &store, &clock);
        dump(&store)
    };
    assert!(journaled_from_peer > 0);
    rewind_vector(&dir, &declared, &expected.vv);
    let store = open_as(&dir, 1, options());
    let replayed = dump(&store);
    assert_eq!(
        replayed.vv.get(concord_core::ReplicaId(1)),
        expected.vv.get(concord_core::ReplicaId(1)),
        "every local write is replayed"
    );
    assert_eq!(
        replayed.vv.get(concord_core::ReplicaId(2)),
        journaled_from_peer,
        "the peer's deltas the journal took are replayed, the others missing"
    );
    // The log records the crash left past the vector, in runs that the
    // replay and the resent batches start elsewhere, did not stay.
    assert_logs_whole(&store);
    tail(&peer, &store, &clock);
    assert_eq!(
        dump(&store),
        expected,
        "replayed and resent deltas change no value twice"
    );
    assert_logs_whole(&store);
    drop(store);
    assert_logs_whole(&open_as(&dir, 1, options()));
}

/// A commit larger than the replay's chunk of deltas, cut short by a
/// crash after its log records: the replay writes its log in records that
/// start elsewhere than the ones left, and the log stays one run.
#[test]
fn a_commit_larger_than_a_replay_chunk_is_logged_once_after_the_replay() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("region");
    let (_t, clock) = manual_clock();
    let declared = {
        let store = open_as(&dir, 1, options());
        declare_all(&store, &clock);
        store.version_vector().expect("vv")
    };
    let expected = {
        let store = open_as(&dir, 1, options());
        let batches: Vec<Vec<concord_store::Item>> = (0..3)
            .map(|b| {
                (0..400)
                    .map(|i| {
                        write(
                            &format!("k{b}-{i}"),
                            Command::Counter(CounterCommand::Add(1)),
                        )
                    })
                    .collect()
            })
            .collect();
        let batches: Vec<&[concord_store::Item]> = batches.iter().map(Vec::as_slice).collect();
        for receipt in store.write_many(&clock, &batches) {
            receipt.expect("write");
        }
        assert_logs_whole(&store);
        dump(&store)
    };
    assert_eq!(expected.vv.get(concord_core::ReplicaId(1)), 4 + 1_200);
    rewind_vector(&dir, &declared, &expected.vv);
    let store = open_as(&dir, 1, options());
    assert_eq!(dump(&store), expected);
    assert_logs_whole(&store);
}

/// A disk that records, in order, which segments are removed and when
/// sled's files are synced, and otherwise is the operating system's.
#[derive(Debug, Default)]
struct Recording(std::sync::Mutex<Vec<String>>);

impl Recording {
    fn note(&self, what: String) {
        self.0.lock().expect("lock").push(what);
    }
}

impl concord_store::Disk for Recording {
    fn create_new(&self, path: &Path) -> std::io::Result<Box<dyn concord_store::DiskFile>> {
        OsDisk.create_new(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        OsDisk.read(path)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        OsDisk.list(dir)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.note(format!("remove {}", path.display()));
        OsDisk.remove_file(path)
    }
    fn remove_dir(&self, dir: &Path) -> std::io::Result<()> {
        OsDisk.remove_dir(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        OsDisk.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        OsDisk.sync_dir(dir)
    }
    fn sync_trees(&self, dir: &Path) -> std::io::Result<()> {
        self.note("sync sled".into());
        OsDisk.sync_trees(dir)
    }
}

/// A process crash leaves sled's last writes in the operating system's
/// cache, where reopening finds them: nothing is left to replay, and a
/// flush of sled writes nothing. The journal's segments must not go before
/// sled's files are synced, or a power cut after the restart loses
/// acknowledged writes (the simulator found this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_syncs_sleds_files_before_removing_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_t, clock) = manual_clock();
    let store = open_as(dir.path(), 1, options());
    declare_all(&store, &clock);
    let receipt = store
        .write(
            &clock,
            &[write("k", Command::Counter(CounterCommand::Add(1)))],
        )
        .expect("write");
    store.durable(&receipt).await.expect("durable");
    // Dropping the store leaves everything in sled: nothing to replay.
    drop(store);
    let old = segments(dir.path());
    assert!(!old.is_empty());
    let disk = std::sync::Arc::new(Recording::default());
    let store = open_as(
        dir.path(),
        1,
        StoreOptions {
            disk: disk.clone(),
            ..options()
        },
    );
    assert_eq!(counter_k(&store), 1);
    let events = disk.0.lock().expect("lock").clone();
    let synced = events.iter().position(|e| e == "sync sled");
    let first_removal = events.iter().position(|e| e.starts_with("remove"));
    assert!(synced.is_some(), "{events:?}");
    assert!(first_removal.is_some(), "old segments go: {events:?}");
    assert!(synced < first_removal, "{events:?}");
}
