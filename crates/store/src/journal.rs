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
//! deltas, each a 4-byte length and the delta's encoding. A frame
//! is written with one `write` and followed by `fdatasync` before the next
//! is written, so a crash can tear only the last frame of the newest
//! segment. A bad frame there with nothing valid after it is that torn
//! write: it is cut off, with a warning. A bad frame anywhere else, or one
//! followed by a valid frame, is corruption of data that was durable: the
//! store refuses to open and says where.
//!
//! **Checkpoints.** When the active segment reaches
//! [`crate::StoreOptions::journal_segment_bytes`], the leader starts a
//! new one, then (off the write path, one at a time) flushes sled and
//! deletes the segments before the one just filled. The checkpoint
//! starts after the write that filled the segment has written to sled
//! every queued commit it made durable, and every commit before them (in
//! order, module `pipeline`); every commit with a frame in an older
//! segment is among them. The segment just filled stays all the same.
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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use concord_core::{Delta, Limits};

use crate::error::{Result, StoreError};

/// The journal's directory inside a store's data directory.
pub const DIR: &str = "journal";
const MAGIC: &[u8; 8] = b"concordJ";
const VERSION: u32 = 1;
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
    file: File,
    index: u64,
    len: u64,
}

/// The journal of one store (see the module docs).
pub(crate) struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    pending: Mutex<Pending>,
    active: Mutex<Active>,
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
}

/// Segments to delete once sled has been flushed.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    before: u64,
    running: Arc<AtomicBool>,
}

impl Checkpoint {
    /// Flushes `db` and deletes the segments it made redundant. Blocks.
    pub(crate) fn run(self, db: &sled::Db) {
        let result = db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| remove_segments_before(&self.dir, self.before));
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
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io("reading", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io("reading", dir, e))?;
        let name = entry.file_name();
        let index = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok());
        match index {
            Some(i) => found.push((i, entry.path())),
            None => {
                return Err(StoreError::Corrupt(format!(
                    "unexpected file {} in the journal",
                    entry.path().display()
                )))
            }
        }
    }
    found.sort();
    Ok(found)
}

fn remove_segments_before(dir: &Path, before: u64) -> Result<usize> {
    let mut removed = 0;
    for (index, path) in segments(dir)? {
        if index < before {
            std::fs::remove_file(&path).map_err(|e| io("removing", &path, e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))
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

/// Reads one segment's deltas. `last` says whether it is the newest
/// segment, whose torn tail is cut off; returns the deltas and the length
/// of its valid part.
fn read_segment(path: &Path, last: bool, limits: &Limits) -> Result<(Vec<Delta>, u64)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io("reading", path, e))?;
    let corrupt = |at: usize, what: &str| {
        StoreError::Corrupt(format!(
            "journal segment {} at byte {at}: {what}",
            path.display()
        ))
    };
    if bytes.len() < SEGMENT_HEADER_BYTES {
        // Only the creation of the newest segment can be cut short.
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&VERSION.to_le_bytes());
        if last && (bytes.iter().all(|&b| b == 0) || header.starts_with(&bytes)) {
            return Ok((Vec::new(), 0));
        }
        return Err(corrupt(0, "shorter than its header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a journal segment"));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(corrupt(
            8,
            &format!("format version {version}; this build reads {VERSION}"),
        ));
    }
    let mut deltas = Vec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while at < bytes.len() {
        match frame_at(&bytes, at) {
            Some((payload, end)) => {
                decode_payload(payload, limits, &mut deltas).map_err(|e| corrupt(at, &e))?;
                at = end;
            }
            None if last && !valid_frame_after(&bytes, at) => {
                tracing::warn!(
                    segment = %path.display(),
                    at,
                    dropped_bytes = bytes.len() - at,
                    "the journal ends in a torn write; cutting it off"
                );
                return Ok((deltas, at as u64));
            }
            None => return Err(corrupt(at, "a frame fails its checksum")),
        }
    }
    Ok((deltas, at as u64))
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

fn create_segment(dir: &Path, index: u64) -> Result<File> {
    let path = segment_path(dir, index);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    file.write_all(&header)
        .and_then(|_| file.sync_all())
        .map_err(|e| io("writing", &path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// What the journal left behind: the deltas to replay, in order.
pub(crate) struct Recovered {
    pub(crate) deltas: Vec<Delta>,
    next_index: u64,
}

/// Reads every segment under `data_dir`, cutting off a torn tail.
///
/// The deltas are decoded under the widest limits there are, not the
/// configured ones: they were accepted and acknowledged under the limits
/// of their day, and lowering a limit since must not make the directory
/// unopenable (their checksums vouch for the bytes).
pub(crate) fn recover(data_dir: &Path) -> Result<Recovered> {
    let dir = data_dir.join(DIR);
    let found = segments(&dir)?;
    let mut deltas = Vec::new();
    let count = found.len();
    let limits = widest_limits();
    for (n, (_, path)) in found.iter().enumerate() {
        let (mut d, _) = read_segment(path, n + 1 == count, &limits)?;
        deltas.append(&mut d);
    }
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
        data_dir: &Path,
        recovered: &Recovered,
        segment_bytes: u64,
    ) -> Result<Self> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
        remove_segments_before(&dir, recovered.next_index)?;
        let index = recovered.next_index;
        let file = create_segment(&dir, index)?;
        Ok(Journal {
            dir,
            segment_bytes,
            pending: Mutex::new(Pending::default()),
            active: Mutex::new(Active {
                file,
                index,
                len: SEGMENT_HEADER_BYTES as u64,
            }),
            failed: Mutex::new(None),
            checkpointing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Removes the journal of a store that will not write one (relaxed
    /// durability), once its deltas are flushed into sled.
    pub(crate) fn remove(data_dir: &Path) -> Result<()> {
        let dir = data_dir.join(DIR);
        remove_segments_before(&dir, u64::MAX)?;
        match std::fs::remove_dir(&dir) {
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
        if let Err(e) = self.write_frames(&mut active, &bytes) {
            self.stop(e.to_string());
            return Err(e);
        }
        let mut checkpoint = None;
        if active.len >= self.segment_bytes {
            let index = active.index + 1;
            match create_segment(&self.dir, index) {
                Ok(file) => {
                    *active = Active {
                        file,
                        index,
                        len: SEGMENT_HEADER_BYTES as u64,
                    };
                    if !self.checkpointing.swap(true, Ordering::SeqCst) {
                        checkpoint = Some(Checkpoint {
                            dir: self.dir.clone(),
                            // The segment just filled stays (see the
                            // module docs).
                            before: index - 1,
                            running: self.checkpointing.clone(),
                        });
                    }
                }
                // The full segment goes on growing; a later write retries.
                Err(e) => tracing::warn!(error = %e, "starting a journal segment failed"),
            }
        }
        Ok(Written {
            through,
            checkpoint,
        })
    }

    /// Appends `bytes` (whole length-prefixed deltas) as frames of at
    /// most [`MAX_FRAME_BYTES`], each synced before the next is written.
    fn write_frames(&self, active: &mut Active, bytes: &[u8]) -> Result<()> {
        let path = segment_path(&self.dir, active.index);
        let mut rest = bytes;
        while !rest.is_empty() {
            let cut = frame_cut(rest);
            let (payload, tail) = rest.split_at(cut);
            let len = (payload.len() as u32).to_le_bytes();
            let at = active.len as usize;
            let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
            frame.extend_from_slice(&FRAME_MAGIC);
            frame.extend_from_slice(&len);
            frame.extend_from_slice(&frame_crc(at, &len, payload).to_le_bytes());
            frame.extend_from_slice(payload);
            active
                .file
                .write_all(&frame)
                .and_then(|_| active.file.sync_data())
                .map_err(|e| io("writing", &path, e))?;
            active.len += frame.len() as u64;
            rest = tail;
        }
        Ok(())
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

    /// Makes every later write of `store`'s journal fail, as a full or
    /// failing disk would: its active segment is swapped for a read-only
    /// handle of the same file.
    fn break_journal(store: &crate::Store) {
        let journal = store.journal_for_tests().expect("a journal");
        let mut active = Journal::lock(&journal.active);
        let path = segment_path(&journal.dir, active.index);
        active.file = File::open(&path).expect("open read-only");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_journal_write_stops_the_journal_and_leaves_sled_untouched() {
        use concord_core::clock::{ManualTime, HLC_EPOCH_UNIX_MS};
        use concord_core::crdt::Intent;
        use concord_core::{Clock, CrdtType, Hlc, KeyspaceId, ReplicaId, Value};

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
        let incr = [crate::Item::Write {
            keyspace: hits.clone(),
            key: "k".into(),
            intent: Intent::CounterAdd(1),
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
