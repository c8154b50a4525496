//! A disk that can break: what a region's store writes, and what it would
//! find after a power cut.
//!
//! Every region's store runs on a [`SimDisk`] (a [`concord_store::Disk`]).
//! Files are real files in the run's directory; the disk remembers, for
//! each journal file, what was written to it since its last sync (an undo
//! record per write) and whether its creation has been synced with its
//! directory, and for sled's trees a copy of their files as the store's
//! last flush left them. A power cut ([`SimDisk::power_loss`]) builds, in
//! a new directory, the state a real disk could come back with, under the
//! contract of [`concord_store::disk`]:
//!
//! - sled's files as of the last flush the store made (sled's own
//!   background flushes, which the store never relies on, are ignored);
//! - each journal file with its unsynced writes reaching the disk in
//!   order up to a point drawn from the seed, the write at that point
//!   perhaps in part (a torn write), and none after it;
//! - a file whose creation was not synced with its directory, kept or
//!   not, drawn from the seed. Removals count at once (a segment that came
//!   back would only be replayed again, which recovery allows).
//!
//! Faults armed from the schedule: the next write torn, the power failing
//! during it ([`SimDisk::tear_next_write`]); the next sync failing with an
//! I/O error, its data neither kept nor dropped for sure
//! ([`SimDisk::fail_next_sync`]); syncs that take simulated time
//! ([`SimDisk::set_slow`]). And one planted bug: a disk that says a sync
//! or flush is done without making anything durable
//! ([`SimDisk::lying`]), which the checkers must catch.
//!
//! Journal files skip the real `fsync`: durability here is what the disk
//! remembers, not what the host's disk does.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use concord_store::{Disk, DiskFile, OsDisk};

/// The directory inside a data directory that holds the journal (the rest
/// is sled's).
const JOURNAL_DIR: &str = concord_store::journal::DIR;

/// One write not yet synced: where, and what it overwrote.
#[derive(Debug)]
struct Undo {
    offset: u64,
    /// The bytes it overwrote (shorter than the write where it extended
    /// the file).
    old: Vec<u8>,
    /// The write's length.
    len: u64,
    /// The file's length before it.
    old_len: u64,
}

/// What the disk remembers of one journal file.
#[derive(Debug, Default)]
struct FileState {
    /// Writes since the last sync, oldest first.
    unsynced: Vec<Undo>,
    /// Created, and its directory not synced since.
    creation_unsynced: bool,
    /// A sync of it failed: its unsynced writes stay in doubt.
    sync_failed: bool,
}

/// What a power cut did, for the trace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Unsynced journal writes that did not reach the disk.
    pub writes_dropped: usize,
    /// Unsynced journal writes that reached it in part.
    pub writes_torn: usize,
    /// Journal files whose unsynced creation was undone.
    pub files_dropped: usize,
    /// Whether sled's files came back as of a flush (none before the
    /// first flush: an empty directory).
    pub trees_restored: bool,
}

#[derive(Default)]
struct State {
    rng: Option<fastrand::Rng>,
    files: BTreeMap<PathBuf, FileState>,
    /// sled's files per data directory as of the store's last flush:
    /// (path relative to the data directory, bytes).
    trees: BTreeMap<PathBuf, Vec<(PathBuf, Vec<u8>)>>,
    /// When each flush of sled's trees returned, in simulated time.
    flushes: Vec<Duration>,
    tear_next: bool,
    fail_syncs: u32,
    /// Set once a torn write cut the power: every later operation fails.
    dead: bool,
    /// Set when an armed fault struck; cleared by a power cut.
    struck: bool,
    slow: Duration,
    lying: bool,
}

/// One region's disk (see the module docs). Clones share it.
#[derive(Clone, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimDisk")
    }
}

fn dead() -> io::Error {
    io::Error::other("the power failed (simulated)")
}

impl SimDisk {
    /// A disk whose choices in a power cut come from `seed`.
    pub fn new(seed: u64) -> SimDisk {
        let disk = SimDisk::default();
        disk.lock().rng = Some(fastrand::Rng::with_seed(seed));
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next journal write is torn: a part of it reaches the disk and
    /// the power fails. Every later operation fails until
    /// [`SimDisk::power_loss`].
    pub fn tear_next_write(&self) {
        self.lock().tear_next = true;
    }

    /// The next sync fails with an I/O error.
    pub fn fail_next_sync(&self) {
        self.lock().fail_syncs += 1;
    }

    /// Every sync and flush from now on takes `delay` of simulated time
    /// (zero: a fast disk again).
    pub fn set_slow(&self, delay: Duration) {
        self.lock().slow = delay;
    }

    /// Plants the bug: syncs and flushes return without making anything
    /// durable.
    pub fn lying(&self) {
        self.lock().lying = true;
    }

    /// Whether an armed fault (a torn write, a failed sync) struck since
    /// the last power cut: a node that then fails to open is down, not
    /// broken.
    pub fn struck(&self) -> bool {
        self.lock().struck
    }

    /// When each flush of sled's trees returned, in simulated time.
    pub fn flushes(&self) -> Vec<Duration> {
        self.lock().flushes.clone()
    }

    /// Builds in `to` the data directory a power cut leaves of `from`
    /// (see the module docs); the store, and everything it had open, must
    /// be gone. The disk goes on with `to`.
    pub fn power_loss(&self, from: &Path, to: &Path) -> io::Result<Lost> {
        let mut state = self.lock();
        let state = &mut *state;
        let rng = state.rng.get_or_insert_with(|| fastrand::Rng::with_seed(0));
        let mut lost = Lost::default();
        std::fs::create_dir_all(to)?;
        if let Some(files) = state.trees.get(from) {
            lost.trees_restored = true;
            for (rel, bytes) in files {
                let path = to.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, bytes)?;
            }
        }
        let journal = from.join(JOURNAL_DIR);
        if journal.is_dir() {
            let to_journal = to.join(JOURNAL_DIR);
            std::fs::create_dir_all(&to_journal)?;
            let mut names: Vec<PathBuf> = std::fs::read_dir(&journal)?
                .map(|e| e.map(|e| e.path()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for path in names {
                let file = state.files.remove(&path).unwrap_or_default();
                if file.creation_unsynced && rng.bool() {
                    lost.files_dropped += 1;
                    continue;
                }
                let mut bytes = std::fs::read(&path)?;
                undo_from(&mut bytes, &file.unsynced, rng, &mut lost);
                if let Some(name) = path.file_name() {
                    std::fs::write(to_journal.join(name), bytes)?;
                }
            }
        }
        if let Some(image) = state.trees.remove(from) {
            state.trees.insert(to.to_path_buf(), image);
        }
        state.files.retain(|p, _| !p.starts_with(from));
        state.tear_next = false;
        state.fail_syncs = 0;
        state.dead = false;
        state.struck = false;
        Ok(lost)
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if state.dead {
            return Err(dead());
        }
        if state.fail_syncs > 0 {
            state.fail_syncs -= 1;
            state.struck = true;
            // The kernel may have dropped the pages it could not write:
            // no later sync makes this file's unsynced writes safe.
            state
                .files
                .entry(path.to_path_buf())
                .or_default()
                .sync_failed = true;
            return Err(io::Error::other("sync failed (simulated I/O error)"));
        }
        if state.lying {
            return Ok(());
        }
        // fsync, like fdatasync, leaves a new file's directory entry to
        // the directory's own sync. The host's cache is enough for the
        // bytes: what counts as durable is this record.
        if let Some(f) = state.files.get_mut(path) {
            if !f.sync_failed {
                f.unsynced.clear();
            }
        }
        Ok(())
    }

    fn write(&self, path: &Path, file: &mut File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        if state.dead {
            return Err(dead());
        }
        let old_len = file.metadata()?.len();
        let mut old = Vec::new();
        if offset < old_len {
            let n = (old_len - offset).min(bytes.len() as u64);
            old.resize(usize::try_from(n).unwrap_or(usize::MAX), 0);
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut old)?;
        }
        let tear = std::mem::take(&mut state.tear_next) && bytes.len() > 1;
        let written = if tear {
            let rng = state.rng.get_or_insert_with(|| fastrand::Rng::with_seed(0));
            &bytes[..rng.usize(1..bytes.len())]
        } else {
            bytes
        };
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(written)?;
        if tear {
            // The power failed here: writes reach the disk in order, so
            // this file's earlier unsynced writes are on it, and the part
            // of this one.
            if let Some(f) = state.files.get_mut(path) {
                f.unsynced.clear();
            }
            state.dead = true;
            state.struck = true;
            return Err(dead());
        }
        state
            .files
            .entry(path.to_path_buf())
            .or_default()
            .unsynced
            .push(Undo {
                offset,
                old,
                len: bytes.len() as u64,
                old_len,
            });
        Ok(())
    }
}

/// Applies a power cut to one journal file's `bytes`: its unsynced writes
/// reach the disk in order up to a point drawn from `rng`, the one there
/// perhaps in part.
fn undo_from(bytes: &mut Vec<u8>, unsynced: &[Undo], rng: &mut fastrand::Rng, lost: &mut Lost) {
    if unsynced.is_empty() {
        return;
    }
    let keep = rng.usize(..=unsynced.len());
    for (i, u) in unsynced.iter().enumerate().skip(keep).rev() {
        let at = usize::try_from(u.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(u.len).unwrap_or(usize::MAX);
        // What this write put there, once every later one is undone.
        let written = bytes
            .get(at..at.saturating_add(len))
            .unwrap_or_default()
            .to_vec();
        // Back to what it overwrote, and to the old length.
        if let Some(range) = bytes.get_mut(at..at.saturating_add(u.old.len())) {
            range.copy_from_slice(&u.old);
        }
        bytes.truncate(usize::try_from(u.old_len).unwrap_or(usize::MAX));
        if i == keep && written.len() > 1 && rng.bool() {
            // Torn: a part of it reached the disk.
            let part = &written[..rng.usize(1..written.len())];
            if bytes.len() < at + part.len() {
                bytes.resize(at + part.len(), 0);
            }
            bytes[at..at + part.len()].copy_from_slice(part);
            lost.writes_torn += 1;
        } else {
            lost.writes_dropped += 1;
        }
    }
}

/// A journal file on a [`SimDisk`].
struct SimFile {
    disk: SimDisk,
    path: PathBuf,
    file: File,
}

impl DiskFile for SimFile {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.disk.write(&self.path, &mut self.file, offset, bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.disk.sync(&self.path)
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.disk.sync(&self.path)
    }
}

impl Disk for SimDisk {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        if self.lock().dead {
            return Err(dead());
        }
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(path)?;
        self.lock().files.insert(
            path.to_path_buf(),
            FileState {
                unsynced: Vec::new(),
                creation_unsynced: true,
                sync_failed: false,
            },
        );
        Ok(Box::new(SimFile {
            disk: self.clone(),
            path: path.to_path_buf(),
            file,
        }))
    }

    // Reads, listings and directories are the host's: only what a power
    // cut takes differs.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        OsDisk.read(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        OsDisk.list(dir)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if self.lock().dead {
            return Err(dead());
        }
        OsDisk.remove_file(path)?;
        self.lock().files.remove(path);
        Ok(())
    }

    fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        OsDisk.remove_dir(dir)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        OsDisk.create_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if state.dead {
            return Err(dead());
        }
        if !state.lying {
            for (path, file) in state.files.iter_mut() {
                if path.parent() == Some(dir) {
                    file.creation_unsynced = false;
                }
            }
        }
        Ok(())
    }

    fn sync_trees(&self, dir: &Path) -> io::Result<()> {
        if self.lock().dead {
            return Err(dead());
        }
        self.trees_flushed(dir);
        Ok(())
    }

    fn trees_flushed(&self, dir: &Path) {
        let mut state = self.lock();
        if state.dead {
            return;
        }
        // A flush covers every commit made before it started; a simulated
        // store's flush starts and returns at one instant (its blocking
        // work runs inline), so the time it returns is the time it
        // started. The lying disk's flushes count, being what the store
        // believed.
        let now = turmoil::sim_elapsed().unwrap_or_default();
        if state.lying {
            state.flushes.push(now);
            return;
        }
        match copy_trees(dir) {
            Ok(files) => {
                state.trees.insert(dir.to_path_buf(), files);
                state.flushes.push(now);
            }
            // The run's directory is the simulator's own: failing to read
            // it is the simulator's failure, and would show as a lost
            // write in the checks, never pass silently.
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "copying sled's files failed")
            }
        }
    }

    fn sync_delay(&self) -> Duration {
        self.lock().slow
    }
}

/// sled's files under `dir` (everything but the journal), relative to it.
fn copy_trees(dir: &Path) -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if path == dir.join(JOURNAL_DIR) {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(path);
            } else if let (true, Ok(rel)) = (kind.is_file(), path.strip_prefix(dir)) {
                // sled's threads may remove a file meanwhile (an old
                // snapshot): it is then not part of the state.
                match std::fs::read(&path) {
                    Ok(bytes) => files.push((rel.to_path_buf(), bytes)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_file(disk: &SimDisk, data: &Path) -> (PathBuf, Box<dyn DiskFile>) {
        let dir = data.join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("0.journal");
        let file = disk.create_new(&path).expect("create");
        (path, file)
    }

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_a_prefix_of_the_rest_in_order() {
        for seed in 0..64 {
            let root = tempfile::tempdir().expect("tempdir");
            let (from, to) = (root.path().join("a"), root.path().join("b"));
            let disk = SimDisk::new(seed);
            let (_, mut file) = journal_file(&disk, &from);
            disk.sync_dir(&from.join(JOURNAL_DIR)).expect("sync dir");
            file.write_at(0, b"synced.").expect("write");
            file.sync_data().expect("sync");
            file.write_at(7, b"one.").expect("write");
            file.write_at(11, b"two.").expect("write");
            drop(file);
            disk.power_loss(&from, &to).expect("power loss");
            let after = std::fs::read(to.join(JOURNAL_DIR).join("0.journal")).expect("read");
            let full = b"synced.one.two.";
            assert!(full.starts_with(&after), "seed {seed}: {after:?}");
            assert!(after.starts_with(b"synced."), "seed {seed}: {after:?}");
        }
    }

    #[test]
    fn an_unsynced_creation_may_vanish_and_a_lying_disk_keeps_nothing() {
        let mut vanished = 0;
        for seed in 0..32 {
            let root = tempfile::tempdir().expect("tempdir");
            let (from, to) = (root.path().join("a"), root.path().join("b"));
            let disk = SimDisk::new(seed);
            let (_, mut file) = journal_file(&disk, &from);
            file.write_at(0, b"x").expect("write");
            file.sync_data().expect("sync");
            drop(file);
            disk.power_loss(&from, &to).expect("power loss");
            if !to.join(JOURNAL_DIR).join("0.journal").exists() {
                vanished += 1;
            }
        }
        assert!((1..32).contains(&vanished), "{vanished} of 32");

        // A lying disk: the sync returns, and the write may be lost.
        let mut lost_acknowledged = 0;
        for seed in 0..16 {
            let root = tempfile::tempdir().expect("tempdir");
            let (from, to) = (root.path().join("a"), root.path().join("b"));
            let disk = SimDisk::new(seed);
            disk.lying();
            let (_, mut file) = journal_file(&disk, &from);
            file.write_at(0, b"acknowledged").expect("write");
            file.sync_data().expect("the lie");
            drop(file);
            disk.power_loss(&from, &to).expect("power loss");
            let after = std::fs::read(to.join(JOURNAL_DIR).join("0.journal")).unwrap_or_default();
            if after != b"acknowledged" {
                lost_acknowledged += 1;
            }
        }
        assert!(lost_acknowledged > 0, "a lying disk loses synced writes");
    }

    #[test]
    fn a_torn_write_leaves_a_prefix_and_a_dead_disk_until_the_power_cut() {
        let root = tempfile::tempdir().expect("tempdir");
        let (from, to) = (root.path().join("a"), root.path().join("b"));
        let disk = SimDisk::new(3);
        let (_, mut file) = journal_file(&disk, &from);
        disk.sync_dir(&from.join(JOURNAL_DIR)).expect("sync dir");
        disk.tear_next_write();
        assert!(file.write_at(0, b"0123456789").is_err());
        assert!(file.sync_data().is_err(), "no power");
        drop(file);
        disk.power_loss(&from, &to).expect("power loss");
        let after = std::fs::read(to.join(JOURNAL_DIR).join("0.journal")).expect("read");
        assert!(!after.is_empty() && after.len() < 10 && b"0123456789".starts_with(&after));
        assert!(disk.create_new(&to.join("x")).is_ok(), "powered again");
    }

    #[test]
    fn a_failed_sync_keeps_the_write_unsynced_and_sled_comes_back_as_flushed() {
        let root = tempfile::tempdir().expect("tempdir");
        let (from, to) = (root.path().join("a"), root.path().join("b"));
        let disk = SimDisk::new(5);
        std::fs::create_dir_all(&from).expect("mkdir");
        std::fs::write(from.join("db"), b"flushed").expect("write");
        disk.trees_flushed(&from);
        std::fs::write(from.join("db"), b"not flushed").expect("write");
        let (_, mut file) = journal_file(&disk, &from);
        disk.fail_next_sync();
        file.write_at(0, b"w").expect("write");
        assert!(file.sync_data().is_err());
        drop(file);
        disk.power_loss(&from, &to).expect("power loss");
        assert_eq!(std::fs::read(to.join("db")).expect("read"), b"flushed");
    }
}
