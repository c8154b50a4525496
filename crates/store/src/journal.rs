//! The journal: what makes a group-committed mutation durable.
//!
//! sled 0.34's `flush` holds sled's process-wide concurrency lock (as a
//! reader) for as long as it waits for the disk, and every sled
//! transaction takes that lock exclusively. With group commit a flush is
//! nearly always under way, so every commit of the writer waited for the
//! flush in progress: the write path's latency and the tail of the
//! replication lag were made of sled flushes (docs/BENCHMARKS.md). So
//! durability no longer comes from sled's flush. Every mutation that gets
//! a commit number (a local write, a declaration, a peer's delta batch)
//! hands its encoded deltas to the journal, in commit order, under the
//! writer lock; a write appends what has accumulated to an append-only
//! file as one frame and `fdatasync`s it. A local write or declaration
//! is staged in memory and queued; its records are written to sled,
//! without a sled transaction (module `rw`), by whoever makes the journal
//! write that covers it (module `pipeline`): for them the journal is a
//! write-ahead log. A peer's batch is written to
//! sled first (its origin holds it durably and sends it again until this
//! region acknowledges it, which waits for the journal). sled keeps its
//! own background flush every `flush_every_ms` and is flushed by us only
//! at checkpoints.
//!
//! **Recovery.** sled recovers, after a crash, a prefix of what it was
//! given, perhaps only part of a staged commit, whose version vector
//! entry comes last. On open, the journal's deltas are applied on top of
//! it in order, each `(origin, seq)` at most once: deltas the version
//! vector already covers are skipped, the others applied exactly as a
//! peer's delta would be (the local writes too: a delta carries the
//! operation the write applied), which is harmless where some of their
//! records are there already (operations are idempotent). Then sled is
//! flushed and the journal starts anew.
//! Deltas are the whole of what a commit changes: values, stream rows, set
//! members and the catalog follow from them; the log entry and version
//! vector entry are written by the replay itself; the HLC high-water mark
//! is raised to the newest delta's HLC. What is not journaled can be lost
//! safely: peer acknowledgements (a peer acks again), truncation (it is
//! redone), and snapshot imports, which flush sled themselves before they
//! count as done.
//!
//! **Format.** A segment file `NNNNNNNNNNNNNNNNNNNN.journal` (its index,
//! 20 digits) starts with the 8-byte magic `concordJ` and a 4-byte
//! little-endian format version. Then frames: a 4-byte magic, a 4-byte
//! little-endian payload length, a 4-byte CRC-32 of the frame's offset in
//! the segment (8 bytes), the length and the payload, and the payload:
//! deltas, each a 4-byte length and the delta's encoding. After the last
//! frame come zeros (see "Prepared segments"), which end the segment. A
//! frame is written with one `write` and followed by `fdatasync` before
//! the next is written, so a crash can tear only the last frame written:
//! a bad frame with nothing valid after it in its segment, and no frame
//! in any newer segment, is that torn write: it is cut off, with a
//! warning. Any other bad frame is corruption of data that was durable:
//! the store refuses to open and says where. (A durable tail that the disk
//! turned into zeros reads as the end; a zeroed range with frames after
//! it is corruption.) Format version 1 had no zero tails; this build reads
//! both.
//!
//! **Prepared segments.** A segment is created at its full size, zeros
//! after the header, and synced with its directory before its first frame
//! is written. `fdatasync` of a frame that overwrites zeros in place then
//! writes the frame's blocks and nothing else; on a file that grows, every
//! sync also commits the file's new size to the file system's own journal,
//! which made each durable write about a quarter slower
//! (docs/BENCHMARKS.md). The first segment is [`FIRST_SEGMENT_BYTES`] and
//! made when the journal starts; each next one is twice the size of the
//! one before, up to [`crate::StoreOptions::journal_segment_bytes`], so a
//! store that writes little writes few zeros. The next segment is made off
//! the write path: the write that takes the active segment past half its
//! size starts it, and it syncs after every MiB of zeros, so that the
//! write path's syncs never queue behind many megabytes of them. A frame
//! that does not fit what is left of the active segment goes to the next
//! one; should that not be ready yet, the active segment grows until it
//! is.
//!
//! **Checkpoints.** When the journal moves to the next segment, the
//! leader (off the write path, one at a time) flushes sled and deletes the
//! segments before the one just filled. The checkpoint starts after the
//! write that filled the segment has written to sled every queued commit
//! it made durable, and every commit before them (in order, module
//! `pipeline`); every commit with a frame in an older segment is among
//! them. The segment just filled stays all the same. So the journal holds
//! at most the segment just filled, the active one and the next, prepared
//! one, and one more while a checkpoint runs.
//!
//! **Memory.** A local write's deltas wait in memory only until its own
//! write; a peer batch's until the next write. Past [`MAX_PENDING_BYTES`]
//! the commit that crossed it writes them itself, so a caller that never
//! waits for durability cannot make them pile up.
//!
//! **Failure.** A failed journal write or sync stops the journal for
//! good: waiters get an error, nothing is acknowledged as durable any
//! more, and a restart recovers from what is on disk. Retrying after a
//! failed `fsync` is unsafe on Linux (the kernel may have dropped the
//! dirty pages it could not write).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use concord_core::{Delta, Limits};

use crate::disk::{Db, Disk, DiskFile};
use crate::error::{Result, StoreError};

/// The journal's directory inside a store's data directory.
pub const DIR: &str = "journal";
const MAGIC: &[u8; 8] = b"concordJ";
/// The format version written; 1 (segments without a zero tail) is read too.
const VERSION: u32 = 2;
const SEGMENT_HEADER_BYTES: usize = 12;
const FRAME_HEADER_BYTES: usize = 12;
/// First bytes of every frame: lets a search for a valid frame after a bad
/// one skip nearly every offset without computing a checksum.
const FRAME_MAGIC: [u8; 4] = [0xC0, 0x4E, 0xC0, 0x4A];
const SUFFIX: &str = ".journal";
/// Largest frame payload written or read: more pending deltas than this
/// are written as several frames, each synced before the next. Twice the
/// ceiling of any delta, so one delta always fits.
pub(crate) const MAX_FRAME_BYTES: usize = 2 * concord_core::limits::LIMIT_CEILING_BYTES;
/// Most bytes of deltas waiting to be written: the commit that crosses it
/// writes them at once, so a store whose peer batches nobody waits for
/// does not hold them in memory without bound.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// Smallest segment size the options accept.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Size of the segment a journal starts with (at most the configured
/// segment size); each next one is twice as large, up to the configured
/// size.
pub const FIRST_SEGMENT_BYTES: u64 = 64 << 10;
/// Zeros written at a time when a segment is prepared.
const ZERO_CHUNK_BYTES: usize = 64 << 10;
/// Zeros written between two syncs when a segment is prepared: the
/// preparation never puts much more than this in the disk's queue ahead of
/// the write path's syncs.
const ZERO_SYNC_BYTES: u64 = 1 << 20;
/// Longest a dropped journal waits for the preparation of its next
/// segment, so that no file is being written in the directory after the
/// store that owns it is gone.
const PREPARE_DRAIN: Duration = Duration::from_secs(30);

/// Deltas handed over by the writer, not yet written.
#[derive(Default)]
struct Pending {
    /// Length-prefixed delta encodings.
    bytes: Vec<u8>,
    /// The highest commit number whose deltas are in `bytes` or written.
    through: u64,
}

/// The segment being appended to.
struct Active {
    file: Box<dyn DiskFile>,
    index: u64,
    /// Bytes written: where the next frame goes.
    len: u64,
    /// The size it was prepared at: zeros from `len` to here.
    capacity: u64,
    /// Once `len` reaches this, the next segment is to be prepared.
    prepare_at: u64,
}

/// The next segment, prepared off the write path.
enum Spare {
    /// None, and none being made.
    Absent,
    /// Being made by a [`Prepare`].
    Preparing,
    /// Made and synced: the write that fills the active segment moves here.
    Ready(Active),
}

/// Where a [`Prepare`] leaves the segment it made.
struct SpareSlot {
    spare: Mutex<Spare>,
    /// Notified when a preparation ends.
    ended: Condvar,
}

/// The journal of one store (see the module docs).
pub(crate) struct Journal {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    segment_bytes: u64,
    pending: Mutex<Pending>,
    active: Mutex<Active>,
    /// The next segment. Locked after `active` when both are.
    next: Arc<SpareSlot>,
    /// Why the journal stopped, once it has.
    failed: Mutex<Option<String>>,
    /// Set while a checkpoint runs.
    checkpointing: Arc<AtomicBool>,
}

/// What a write of pending deltas did.
pub(crate) struct Written {
    /// Every commit up to this number is durable.
    pub(crate) through: u64,
    /// Segments that a sled flush starting now makes redundant, when the
    /// write started a new segment.
    pub(crate) checkpoint: Option<Checkpoint>,
    /// The next segment to make, when the write took the active one past
    /// half its size.
    pub(crate) prepare: Option<Prepare>,
}

/// The making of the next segment (see the module docs), to run off the
/// write path. Dropped unrun, it gives the work back: a later write starts
/// it again.
pub(crate) struct Prepare {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    index: u64,
    capacity: u64,
    slot: Arc<SpareSlot>,
    made: Option<Result<Active>>,
}

impl Prepare {
    /// Writes and syncs the segment. Blocks.
    pub(crate) fn run(mut self) {
        self.made = Some(prepare_segment(
            &*self.disk,
            &self.dir,
            self.index,
            self.capacity,
        ));
    }
}

impl Drop for Prepare {
    fn drop(&mut self) {
        let next = match self.made.take() {
            Some(Ok(segment)) => Spare::Ready(segment),
            Some(Err(e)) => {
                // A later write tries again.
                tracing::warn!(error = %e, "preparing the next journal segment failed");
                Spare::Absent
            }
            None => Spare::Absent,
        };
        *Journal::lock(&self.slot.spare) = next;
        self.slot.ended.notify_all();
    }
}

/// Segments to delete once sled has been flushed.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    before: u64,
    running: Arc<AtomicBool>,
}

impl Checkpoint {
    /// Flushes `db` and deletes the segments it made redundant. Blocks.
    pub(crate) fn run(self, db: &Db) {
        let result = db
            .flush()
            .and_then(|_| remove_segments_before(&**db.disk(), &self.dir, self.before));
        match result {
            Ok(removed) => tracing::debug!(removed, "journal checkpoint done"),
            // The segments stay; the next checkpoint removes them.
            Err(e) => tracing::warn!(error = %e, "journal checkpoint failed"),
        }
        self.running.store(false, Ordering::SeqCst);
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Journal(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:020}{SUFFIX}"))
}

/// The segments in `dir`, by index; an unknown file there is an error.
fn segments(disk: &dyn Disk, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match disk.list(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io("reading", dir, e)),
    };
    for path in entries {
        let index = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok());
        match index {
            Some(i) => found.push((i, path)),
            None => {
                return Err(StoreError::Corrupt(format!(
                    "unexpected file {} in the journal",
                    path.display()
                )))
            }
        }
    }
    found.sort();
    Ok(found)
}

fn remove_segments_before(disk: &dyn Disk, dir: &Path, before: u64) -> Result<usize> {
    let mut removed = 0;
    for (index, path) in segments(disk, dir)? {
        if index < before {
            disk.remove_file(&path)
                .map_err(|e| io("removing", &path, e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(disk, dir)?;
    }
    Ok(removed)
}

fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<()> {
    disk.sync_dir(dir).map_err(|e| io("syncing", dir, e))
}

/// The checksum of a frame at byte `at` of its segment: its position is
/// part of it, so a copy of a frame's bytes elsewhere (inside a stored
/// value, say) never passes for a frame.
fn frame_crc(at: usize, len: &[u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(at as u64).to_le_bytes());
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Where a segment's frames end with a bad one that may be a torn write.
struct Torn {
    at: usize,
    dropped_bytes: usize,
}

/// What one segment holds: its deltas (every frame holds at least one),
/// and whether its frames end in a bad frame with nothing valid after it
/// (see [`recover`]).
struct Segment {
    deltas: Vec<Delta>,
    torn: Option<Torn>,
}

/// Whether every byte of `bytes` is zero.
fn zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads one segment's deltas. `newest` says whether it is the newest
/// file, which may be a creation cut short (a header cut short, or zeros
/// where the header was to be).
fn read_segment(disk: &dyn Disk, path: &Path, newest: bool, limits: &Limits) -> Result<Segment> {
    let empty = Segment {
        deltas: Vec::new(),
        torn: None,
    };
    let bytes = disk.read(path).map_err(|e| io("reading", path, e))?;
    let corrupt = |at: usize, what: &str| {
        StoreError::Corrupt(format!(
            "journal segment {} at byte {at}: {what}",
            path.display()
        ))
    };
    // Only the creation of the newest segment can be cut short: a header
    // (of either version) cut short, or zeros where the header was to be,
    // then zeros.
    let header_part = &bytes[..bytes.len().min(SEGMENT_HEADER_BYTES)];
    let header_of = |version: u32| [&MAGIC[..], &version.to_le_bytes()].concat();
    let unfinished = (zeros(header_part)
        || header_of(1).starts_with(header_part)
        || header_of(VERSION).starts_with(header_part))
        && zeros(&bytes[header_part.len()..]);
    if newest && unfinished {
        return Ok(empty);
    }
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(corrupt(0, "shorter than its header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a journal segment"));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != 1 && version != VERSION {
        return Err(corrupt(
            8,
            &format!("format version {version}; this build reads 1 and {VERSION}"),
        ));
    }
    let mut segment = empty;
    let mut at = SEGMENT_HEADER_BYTES;
    while at < bytes.len() {
        match frame_at(&bytes, at) {
            Some((payload, end)) => {
                decode_payload(payload, limits, &mut segment.deltas)
                    .map_err(|e| corrupt(at, &e))?;
                at = end;
            }
            // The zeros a prepared segment was made with: the end.
            None if zeros(&bytes[at..]) => break,
            None if !valid_frame_after(&bytes, at) => {
                segment.torn = Some(Torn {
                    at,
                    dropped_bytes: bytes.len() - at,
                });
                break;
            }
            None => return Err(corrupt(at, "a frame fails its checksum")),
        }
    }
    Ok(segment)
}

/// The payload of a valid frame at `at`, and where the frame ends.
fn frame_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(FRAME_HEADER_BYTES)?)?;
    if header[..4] != FRAME_MAGIC {
        return None;
    }
    let len_bytes: [u8; 4] = header[4..8].try_into().ok()?;
    let crc = u32::from_le_bytes(header[8..].try_into().ok()?);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return None;
    }
    let start = at + FRAME_HEADER_BYTES;
    let payload = bytes.get(start..start + len)?;
    (frame_crc(at, &len_bytes, payload) == crc).then_some((payload, start + len))
}

/// Whether a valid frame starts anywhere after `at`: then the bad frame
/// at `at` is not the last write, and not a torn one.
fn valid_frame_after(bytes: &[u8], at: usize) -> bool {
    let Some(rest) = bytes.get(at + 1..) else {
        return false;
    };
    rest.windows(FRAME_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == FRAME_MAGIC)
        .any(|(i, _)| frame_at(bytes, at + 1 + i).is_some())
}

fn decode_payload(
    payload: &[u8],
    limits: &Limits,
    out: &mut Vec<Delta>,
) -> std::result::Result<(), String> {
    let mut at = 0;
    while at < payload.len() {
        let len = payload
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("a delta's length is cut short")?;
        let body = payload
            .get(at + 4..at + 4 + len)
            .ok_or("a delta is cut short")?;
        out.push(Delta::decode(body, limits).map_err(|e| e.to_string())?);
        at += 4 + len;
    }
    Ok(())
}

/// Makes segment `index`: its header, zeros up to `capacity` bytes, all
/// synced, and its directory entry synced; frames go after the header.
fn prepare_segment(disk: &dyn Disk, dir: &Path, index: u64, capacity: u64) -> Result<Active> {
    let path = segment_path(dir, index);
    let mut file = disk
        .create_new(&path)
        .map_err(|e| io("creating", &path, e))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let written = (|| {
        file.write_at(0, &header)?;
        let mut at = SEGMENT_HEADER_BYTES as u64;
        let mut left = capacity.saturating_sub(at);
        let mut unsynced = 0;
        while left > 0 {
            let n = left.min(ZERO_CHUNK_BYTES as u64) as usize;
            file.write_at(at, &zeros[..n])?;
            at += n as u64;
            left -= n as u64;
            unsynced += n as u64;
            if unsynced >= ZERO_SYNC_BYTES {
                file.sync_data()?;
                unsynced = 0;
            }
        }
        file.sync_all()
    })();
    if let Err(e) = written
        .map_err(|e| io("writing", &path, e))
        .and_then(|_| sync_dir(disk, dir))
    {
        // A partly made file would only be read as an unfinished
        // creation; removing the file made here keeps the directory tidy.
        drop(file);
        let _ = disk.remove_file(&path);
        return Err(e);
    }
    let capacity = capacity.max(SEGMENT_HEADER_BYTES as u64);
    Ok(Active {
        file,
        index,
        len: SEGMENT_HEADER_BYTES as u64,
        capacity,
        prepare_at: capacity / 2,
    })
}

/// What the journal left behind: the deltas to replay, in order.
pub(crate) struct Recovered {
    pub(crate) deltas: Vec<Delta>,
    next_index: u64,
}

/// Reads every segment under `data_dir`, cutting off a torn tail.
///
/// A bad frame with nothing valid after it is a torn write only in the
/// newest segment that holds frames: a newer one (the prepared next
/// segment, or one the journal moved to) must hold none, for no frame is
/// written before the one before it is synced.
///
/// The deltas are decoded under the widest limits there are, not the
/// configured ones: they were accepted and acknowledged under the limits
/// of their day, and lowering a limit since must not make the directory
/// unopenable (their checksums vouch for the bytes).
pub(crate) fn recover(disk: &dyn Disk, data_dir: &Path) -> Result<Recovered> {
    let dir = data_dir.join(DIR);
    let found = segments(disk, &dir)?;
    let count = found.len();
    let limits = widest_limits();
    let mut read = Vec::with_capacity(count);
    for (n, (_, path)) in found.iter().enumerate() {
        read.push(read_segment(disk, path, n + 1 == count, &limits)?);
    }
    let mut frames_after = false;
    for (n, segment) in read.iter().enumerate().rev() {
        if let Some(torn) = &segment.torn {
            let path = found[n].1.display();
            if frames_after {
                return Err(StoreError::Corrupt(format!(
                    "journal segment {path} at byte {}: a frame fails its checksum, and a newer segment holds frames",
                    torn.at
                )));
            }
            tracing::warn!(
                segment = %path,
                at = torn.at,
                dropped_bytes = torn.dropped_bytes,
                "the journal ends in a torn write; cutting it off"
            );
        }
        frames_after |= !segment.deltas.is_empty();
    }
    let deltas = read.into_iter().flat_map(|s| s.deltas).collect();
    let next_index = found.last().map_or(0, |(i, _)| i + 1);
    Ok(Recovered { deltas, next_index })
}

fn widest_limits() -> Limits {
    let c = concord_core::limits::LIMIT_CEILING_BYTES;
    Limits {
        max_key_bytes: c,
        max_value_bytes: c,
        max_member_bytes: c,
        max_members_per_op: c,
        max_fields_per_entry: c,
        max_field_name_bytes: c,
        max_entry_bytes: c,
        max_observed_replicas: c,
        max_delta_bytes: c,
        max_batch_ops: c,
        max_range_entries: c,
    }
}

impl Journal {
    /// Starts a fresh journal after recovery: removes every old segment
    /// (call it only once their deltas are flushed into sled) and opens a
    /// new one.
    pub(crate) fn start(
        disk: Arc<dyn Disk>,
        data_dir: &Path,
        recovered: &Recovered,
        segment_bytes: u64,
    ) -> Result<Self> {
        let dir = data_dir.join(DIR);
        disk.create_dir_all(&dir)
            .map_err(|e| io("creating", &dir, e))?;
        // The journal's own entry in the data directory, made on the first
        // open, must be durable before anything in it counts.
        sync_dir(&*disk, data_dir)?;
        remove_segments_before(&*disk, &dir, recovered.next_index)?;
        let active = prepare_segment(
            &*disk,
            &dir,
            recovered.next_index,
            FIRST_SEGMENT_BYTES.min(segment_bytes),
        )?;
        Ok(Journal {
            disk,
            dir,
            segment_bytes,
            pending: Mutex::new(Pending::default()),
            active: Mutex::new(active),
            next: Arc::new(SpareSlot {
                spare: Mutex::new(Spare::Absent),
                ended: Condvar::new(),
            }),
            failed: Mutex::new(None),
            checkpointing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Removes the journal of a store that will not write one (relaxed
    /// durability), once its deltas are flushed into sled.
    pub(crate) fn remove(disk: &dyn Disk, data_dir: &Path) -> Result<()> {
        let dir = data_dir.join(DIR);
        remove_segments_before(disk, &dir, u64::MAX)?;
        match disk.remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &dir, e)),
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands over the encoded deltas of one commit; `commit` gives it its
    /// number, under the same lock, so every number handed out is in the
    /// pending bytes by the time anyone can wait for it. Returns the
    /// number, and whether the pending bytes have reached
    /// [`MAX_PENDING_BYTES`]: then the caller should write them now.
    pub(crate) fn append<'a>(
        &self,
        deltas: impl IntoIterator<Item = &'a [u8]>,
        commit: impl FnOnce() -> u64,
    ) -> (u64, bool) {
        let mut p = Self::lock(&self.pending);
        for d in deltas {
            p.bytes.extend_from_slice(&(d.len() as u32).to_le_bytes());
            p.bytes.extend_from_slice(d);
        }
        let n = commit();
        p.through = n;
        (n, p.bytes.len() >= MAX_PENDING_BYTES)
    }

    /// Stops the journal: nothing more is written or acknowledged as
    /// durable, and every waiter gets `why`.
    pub(crate) fn stop(&self, why: String) {
        tracing::error!(reason = %why, "the journal stopped; nothing more is acknowledged as durable");
        Self::lock(&self.failed).get_or_insert(why);
    }

    /// The error every waiter gets once the journal has stopped.
    pub(crate) fn check(&self) -> Result<()> {
        match Self::lock(&self.failed).as_ref() {
            Some(why) => Err(StoreError::Journal(format!(
                "the journal stopped after a failed write ({why}); restart the node to recover"
            ))),
            None => Ok(()),
        }
    }

    /// Writes and syncs everything pending. Blocks; callers (a staged
    /// commit, a group-commit leader) take turns on the active segment.
    pub(crate) fn write_pending(&self) -> Result<Written> {
        self.check()?;
        // The pending bytes are taken under the segment's lock, so two
        // writers (a staged commit and a group-commit leader) write them in
        // the order they were handed over.
        let mut active = Self::lock(&self.active);
        let (bytes, through) = {
            let mut p = Self::lock(&self.pending);
            (std::mem::take(&mut p.bytes), p.through)
        };
        let moved = match self.write_frames(&mut active, &bytes) {
            Ok(moved) => moved,
            Err(e) => {
                self.stop(e.to_string());
                return Err(e);
            }
        };
        let mut checkpoint = None;
        if moved && !self.checkpointing.swap(true, Ordering::SeqCst) {
            checkpoint = Some(Checkpoint {
                dir: self.dir.clone(),
                // The segment just filled stays (see the module docs).
                before: active.index - 1,
                running: self.checkpointing.clone(),
            });
        }
        let mut prepare = None;
        let mut spare = Self::lock(&self.next.spare);
        if active.len >= active.prepare_at && matches!(*spare, Spare::Absent) {
            *spare = Spare::Preparing;
            // Should this one fail, the next try comes half a segment on.
            active.prepare_at = active.len + active.capacity / 2;
            prepare = Some(Prepare {
                disk: self.disk.clone(),
                dir: self.dir.clone(),
                index: active.index + 1,
                capacity: active.capacity.saturating_mul(2).min(self.segment_bytes),
                slot: self.next.clone(),
                made: None,
            });
        }
        Ok(Written {
            through,
            checkpoint,
            prepare,
        })
    }

    /// Waits, for at most [`PREPARE_DRAIN`], until no preparation runs.
    fn drain_preparation(&self) {
        let spare = Self::lock(&self.next.spare);
        let waited = self
            .next
            .ended
            .wait_timeout_while(spare, PREPARE_DRAIN, |s| matches!(s, Spare::Preparing));
        if waited.is_ok_and(|(_, timeout)| timeout.timed_out()) {
            tracing::warn!("the journal closed while its next segment was still being prepared");
        }
    }

    /// Moves to the next segment if it is ready; says whether it did.
    fn move_to_next(&self, active: &mut Active) -> bool {
        let mut spare = Self::lock(&self.next.spare);
        match std::mem::replace(&mut *spare, Spare::Absent) {
            Spare::Ready(next) => {
                *active = next;
                true
            }
            other => {
                *spare = other;
                false
            }
        }
    }

    /// Appends `bytes` (whole length-prefixed deltas) as frames of at
    /// most [`MAX_FRAME_BYTES`], each synced before the next is written.
    /// A frame that does not fit the rest of a segment that holds frames
    /// goes to the next segment if that is ready (and makes the current
    /// one grow if not). Says whether it moved to a next segment.
    fn write_frames(&self, active: &mut Active, bytes: &[u8]) -> Result<bool> {
        let mut moved = false;
        let mut rest = bytes;
        while !rest.is_empty() {
            let cut = frame_cut(rest);
            let (payload, tail) = rest.split_at(cut);
            let frame_bytes = (FRAME_HEADER_BYTES + payload.len()) as u64;
            if active.len > SEGMENT_HEADER_BYTES as u64
                && active.len.saturating_add(frame_bytes) > active.capacity
            {
                moved |= self.move_to_next(active);
            }
            let path = segment_path(&self.dir, active.index);
            let len = (payload.len() as u32).to_le_bytes();
            let at = active.len as usize;
            let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
            frame.extend_from_slice(&FRAME_MAGIC);
            frame.extend_from_slice(&len);
            frame.extend_from_slice(&frame_crc(at, &len, payload).to_le_bytes());
            frame.extend_from_slice(payload);
            active
                .file
                .write_at(active.len, &frame)
                .and_then(|_| active.file.sync_data())
                .map_err(|e| io("writing", &path, e))?;
            active.len += frame.len() as u64;
            rest = tail;
        }
        Ok(moved)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.drain_preparation();
    }
}

/// Where the first frame of `bytes` ends: after as many whole deltas as
/// fit [`MAX_FRAME_BYTES`] (at least one; a delta is far smaller).
fn frame_cut(bytes: &[u8]) -> usize {
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let next = at + 4 + len as usize;
        if at > 0 && next > MAX_FRAME_BYTES {
            break;
        }
        at = next;
    }
    at.min(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{OsDisk, OsFile};

    fn frame(at: usize, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_le_bytes();
        let mut f = FRAME_MAGIC.to_vec();
        f.extend_from_slice(&len);
        f.extend_from_slice(&frame_crc(at, &len, payload).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_are_found_only_where_whole_and_checked() {
        let mut bytes = frame(0, b"abc");
        bytes.extend(frame(15, b"defg"));
        assert_eq!(
            frame_at(&bytes, 0).map(|(p, e)| (p.to_vec(), e)),
            Some((b"abc".to_vec(), 15))
        );
        assert_eq!(
            frame_at(&bytes, 15).map(|(p, _)| p.to_vec()),
            Some(b"defg".to_vec())
        );
        assert!(frame_at(&bytes, 1).is_none());
        assert!(
            frame_at(&bytes[..bytes.len() - 1], 15).is_none(),
            "cut short"
        );
        let mut flipped = bytes.clone();
        flipped[13] ^= 1;
        assert!(frame_at(&flipped, 0).is_none(), "payload changed");
        assert!(
            valid_frame_after(&flipped, 0),
            "the second frame is still whole"
        );
        assert!(!valid_frame_after(&bytes[..bytes.len() - 1], 15));
        assert!(frame_at(&[0u8; 16], 0).is_none(), "zeros are no frame");
    }

    #[test]
    fn a_frame_copied_elsewhere_is_no_frame() {
        // A stored value holding a frame's bytes, e.g. a stream entry.
        let inner = frame(0, b"abc");
        let mut bytes = frame(0, &inner);
        let copy_at = FRAME_HEADER_BYTES;
        assert_eq!(&bytes[copy_at..copy_at + inner.len()], inner.as_slice());
        assert!(frame_at(&bytes, copy_at).is_none());
        bytes[FRAME_HEADER_BYTES - 1] ^= 1;
        assert!(
            !valid_frame_after(&bytes, 0),
            "the damaged outer frame is the last"
        );
    }

    #[test]
    fn a_frame_is_cut_after_whole_deltas() {
        let mut bytes = Vec::new();
        for len in [10u32, 20] {
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend(std::iter::repeat_n(7u8, len as usize));
        }
        assert_eq!(frame_cut(&bytes), bytes.len());
    }

    #[test]
    fn pending_bytes_past_the_frame_limit_are_cut_into_frames() {
        // Two deltas of 100 MiB: together over the 128 MiB frame limit.
        let big = 100usize << 20;
        let mut bytes = vec![0u8; 2 * (4 + big)];
        bytes[..4].copy_from_slice(&(big as u32).to_le_bytes());
        bytes[4 + big..8 + big].copy_from_slice(&(big as u32).to_le_bytes());
        assert_eq!(
            frame_cut(&bytes),
            4 + big,
            "the second delta starts the next frame"
        );
        assert_eq!(frame_cut(&bytes[4 + big..]), 4 + big);
    }

    /// A length-prefixed delta: a declaration with sequence number `seq`.
    fn delta_bytes(seq: u64) -> Vec<u8> {
        use concord_core::{CrdtType, Hlc, Op, ReplicaId};
        let delta = Delta {
            origin: ReplicaId(1),
            seq,
            hlc: Hlc::ZERO,
            keyspace: "hits".into(),
            key: String::new(),
            op: Op::Declare(CrdtType::Counter),
        }
        .encode();
        let mut bytes = (delta.len() as u32).to_le_bytes().to_vec();
        bytes.extend(delta);
        bytes
    }

    /// The bytes of a segment of format `version`: one frame per seq, then
    /// `zeros` zero bytes; `garble_last` flips a byte of the last frame.
    fn segment_bytes(version: u32, seqs: &[u64], zeros: usize, garble_last: bool) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        for &seq in seqs {
            bytes.extend(frame(bytes.len(), &delta_bytes(seq)));
        }
        if garble_last {
            let n = bytes.len();
            bytes[n - 1] ^= 0xff;
        }
        bytes.resize(bytes.len() + zeros, 0);
        bytes
    }

    /// A data directory whose journal holds `segments`, oldest first.
    fn journal_of(segments: &[Vec<u8>]) -> tempfile::TempDir {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join(DIR);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (index, bytes) in segments.iter().enumerate() {
            std::fs::write(segment_path(&dir, index as u64), bytes).expect("write");
        }
        data
    }

    fn recovered_seqs(segments: &[Vec<u8>]) -> Result<Vec<u64>> {
        let data = journal_of(segments);
        let recovered = recover(&OsDisk, data.path())?;
        Ok(recovered.deltas.iter().map(|d| d.seq).collect())
    }

    #[test]
    fn zeros_end_a_segment_and_a_torn_frame_before_an_empty_newer_segment_is_cut_off() {
        let seqs = recovered_seqs(&[
            segment_bytes(VERSION, &[1, 2], 1000, false),
            segment_bytes(VERSION, &[3, 4], 1000, true),
            // The next segment, prepared and not written to yet.
            segment_bytes(VERSION, &[], 4096, false),
        ])
        .expect("recovers");
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn a_torn_frame_with_frames_in_a_newer_segment_is_corruption() {
        let err = recovered_seqs(&[
            segment_bytes(VERSION, &[1, 2], 1000, true),
            segment_bytes(VERSION, &[3], 1000, false),
            segment_bytes(VERSION, &[], 4096, false),
        ])
        .expect_err("refused");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(
            err.to_string().contains("newer segment holds frames"),
            "{err}"
        );
    }

    #[test]
    fn frames_after_zeros_are_corruption() {
        let mut bytes = segment_bytes(VERSION, &[1], 100, false);
        let at = bytes.len();
        bytes.extend(frame(at, &delta_bytes(2)));
        let err = recovered_seqs(&[bytes]).expect_err("refused");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }

    #[test]
    fn an_unfinished_creation_is_empty_only_as_the_newest_file() {
        let done = segment_bytes(VERSION, &[1], 100, false);
        // A version 1 header cut short, as an older build left it.
        let v1_cut = [&MAGIC[..], &1u32.to_le_bytes()[..1]].concat();
        for unfinished in [vec![0u8; 4096], MAGIC[..5].to_vec(), v1_cut] {
            assert_eq!(
                recovered_seqs(&[done.clone(), unfinished.clone()]).expect("recovers"),
                [1]
            );
            let err = recovered_seqs(&[unfinished, done.clone()]).expect_err("refused");
            assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        }
    }

    #[test]
    fn version_1_segments_are_read_and_unknown_versions_refused() {
        assert_eq!(
            recovered_seqs(&[
                segment_bytes(1, &[1, 2], 0, false),
                segment_bytes(VERSION, &[3], 64, false)
            ])
            .expect("recovers"),
            [1, 2, 3]
        );
        let err =
            recovered_seqs(&[segment_bytes(VERSION + 1, &[1], 0, false)]).expect_err("refused");
        assert!(err.to_string().contains("format version 3"), "{err}");
    }

    #[test]
    fn a_prepared_segment_is_zeros_after_its_header_and_written_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Past one sync's worth of zeros, and not a whole number of chunks.
        let size = ZERO_SYNC_BYTES as usize + 3 * ZERO_CHUNK_BYTES + 5;
        let mut active = prepare_segment(&OsDisk, dir.path(), 7, size as u64).expect("prepared");
        let path = segment_path(dir.path(), 7);
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), size);
        assert_eq!(&bytes[..8], MAGIC);
        assert!(zeros(&bytes[SEGMENT_HEADER_BYTES..]));
        assert_eq!(active.capacity, bytes.len() as u64);
        active.file.write_at(active.len, b"x").expect("write");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(
            bytes[SEGMENT_HEADER_BYTES], b'x',
            "writes go after the header"
        );
        assert_eq!(bytes.len(), size, "in place");
        assert!(
            prepare_segment(&OsDisk, dir.path(), 7, 4096).is_err(),
            "an existing segment is never overwritten"
        );
    }

    /// Hands `journal` the declaration `seq` and writes it, running any
    /// preparation it starts right here; says whether it moved segments.
    fn write_one(journal: &Journal, seq: u64) -> bool {
        let delta = delta_bytes(seq);
        journal.append([&delta[4..]], || seq);
        let written = journal.write_pending().expect("written");
        if let Some(prepare) = written.prepare {
            prepare.run();
        }
        written.checkpoint.is_some()
    }

    #[test]
    fn a_failed_preparation_lets_the_segment_grow_and_is_tried_again() {
        let data = tempfile::tempdir().expect("tempdir");
        let recovered = recover(&OsDisk, data.path()).expect("nothing to recover");
        let journal = Journal::start(Arc::new(OsDisk), data.path(), &recovered, MIN_SEGMENT_BYTES)
            .expect("start");
        // A file where the next segment goes: its preparation fails.
        let blocker = segment_path(&journal.dir, 1);
        std::fs::write(&blocker, b"not the journal's").expect("write");
        let mut seq = 0;
        while Journal::lock(&journal.active).len <= 2 * MIN_SEGMENT_BYTES {
            seq += 1;
            assert!(!write_one(&journal, seq), "nowhere to move to");
        }
        let first = segment_path(&journal.dir, 0);
        assert!(std::fs::metadata(&first).expect("metadata").len() > 2 * MIN_SEGMENT_BYTES);
        assert_eq!(
            std::fs::read(&blocker).expect("read"),
            b"not the journal's",
            "a file the preparation did not make is left alone"
        );
        std::fs::remove_file(&blocker).expect("rm");
        // The next try, half a segment on, succeeds; the write after it moves.
        let mut moved = false;
        for _ in 0..200 {
            seq += 1;
            if write_one(&journal, seq) {
                moved = true;
                break;
            }
        }
        assert!(moved, "the journal moved to the next segment");
        assert_eq!(Journal::lock(&journal.active).index, 1);
        drop(journal);
        let replayed: Vec<u64> = recover(&OsDisk, data.path())
            .expect("recovers")
            .deltas
            .iter()
            .map(|d| d.seq)
            .collect();
        assert_eq!(replayed, (1..=seq).collect::<Vec<_>>());
    }

    /// Makes every later write of `store`'s journal fail, as a full or
    /// failing disk would: its active segment is swapped for a read-only
    /// handle of the same file.
    fn break_journal(store: &crate::Store) {
        let journal = store.journal_for_tests().expect("a journal");
        let mut active = Journal::lock(&journal.active);
        let path = segment_path(&journal.dir, active.index);
        active.file = Box::new(OsFile(std::fs::File::open(&path).expect("open read-only")));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_journal_write_stops_the_journal_and_leaves_sled_untouched() {
        use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
        use concord_core::crdt::CounterCommand;
        use concord_core::{Clock, Command, CrdtType, Hlc, KeyspaceId, ReplicaId, Value};

        let dir = tempfile::tempdir().expect("tempdir");
        let identity = crate::Identity {
            region: "here".into(),
            replica: ReplicaId(1),
        };
        let clock = Clock::new(ManualTime::new(HLC_EPOCH_UNIX_MS + 5_000_000), 0, Hlc::ZERO)
            .expect("clock");
        let hits = KeyspaceId {
            name: "hits".into(),
            ty: CrdtType::Counter,
        };
        let incr = [crate::Item {
            keyspace: hits.clone(),
            key: "k".into(),
            command: Command::Counter(CounterCommand::Add(1)),
        }];
        let counter = |store: &crate::Store| match store.get(&hits, "k").expect("get") {
            Value::Counter(c) => c.value(),
            other => panic!("not a counter: {other:?}"),
        };
        {
            let store =
                crate::Store::open(dir.path(), identity.clone(), crate::StoreOptions::default())
                    .expect("open");
            store
                .declare(&clock, "hits", CrdtType::Counter)
                .expect("declare");
            store.write(&clock, &incr).expect("write before the fault");
            break_journal(&store);
            let failed = store
                .write(&clock, &incr)
                .expect_err("the journal cannot be written");
            assert!(matches!(failed, StoreError::Journal(_)), "{failed}");
            assert_eq!(counter(&store), 1, "sled never got the failed write");
            let later = store
                .write(&clock, &incr)
                .expect_err("the journal has stopped");
            assert!(later.to_string().contains("stopped"), "{later}");
            // A peer link syncs before it acknowledges: nothing more is.
            let sync = store.sync().await.expect_err("nothing is durable any more");
            assert!(sync.to_string().contains("stopped"), "{sync}");
        }
        let store = crate::Store::open(dir.path(), identity, crate::StoreOptions::default())
            .expect("reopen");
        assert_eq!(counter(&store), 1);
        let receipt = store.write(&clock, &incr).expect("write after the restart");
        assert_eq!(receipt.last_seq, 3, "the failed write's seq was never used");
        assert_eq!(counter(&store), 2);
    }
}
