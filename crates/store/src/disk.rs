//! The disk under a store: the journal's file operations, and the moments
//! sled's trees become durable.
//!
//! A store reaches the file system only through a [`Disk`]: [`OsDisk`] in
//! a real process, and in the simulator a disk that loses, tears and
//! fails writes (sled does its own file I/O; its flushes, and the sync of
//! its files at open, are reported here). The contract a disk keeps, and
//! the only one the store relies on, is what survives a power cut:
//!
//! - a journal file keeps what was written to it before its last
//!   [`DiskFile::sync_data`] or [`DiskFile::sync_all`] returned; of the
//!   writes after it, any part may survive or not;
//! - a file created or removed since its directory's last
//!   [`Disk::sync_dir`] may come back as it was before;
//! - sled's trees keep what they held when the store's last flush of them
//!   returned (the store's `Db::flush`, which tells the disk through
//!   [`Disk::trees_flushed`]), or when their files were last synced
//!   ([`Disk::sync_trees`], at open). sled also flushes on its own every
//!   `flush_every_ms`; the store never relies on that.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, StoreError};

/// The file operations a store makes, apart from sled's.
pub trait Disk: fmt::Debug + Send + Sync {
    /// Creates `path`, which must not exist, for writing.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Reads the whole of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The paths of the entries of `dir` (an error of kind `NotFound` when
    /// `dir` does not exist).
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes the empty directory `dir`.
    fn remove_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `dir` and its parents where missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes the creations and removals of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Says that a flush of the sled database in `dir` has just returned:
    /// everything the database held when it started is durable.
    fn trees_flushed(&self, _dir: &Path) {}
    /// Makes durable everything in the files of the sled database in
    /// `dir`, whoever wrote it: after a process crash, what sled finds on
    /// opening may be in the operating system's cache only, and a flush
    /// of sled writes only what changed since it opened.
    fn sync_trees(&self, dir: &Path) -> io::Result<()>;
    /// Time a sync takes on top of the call itself, to be waited in the
    /// caller's clock (a slow disk, in the simulator); zero for a real
    /// disk, whose syncs take their time inside the call.
    fn sync_delay(&self) -> Duration {
        Duration::ZERO
    }
}

/// A file open for writing on a [`Disk`].
pub trait DiskFile: Send {
    /// Writes all of `bytes` at byte `offset`.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Makes the file's data and metadata durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The operating system's file system: the disk of a real process.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

/// A file of [`OsDisk`].
#[derive(Debug)]
pub struct OsFile(pub File);

impl DiskFile for OsFile {
    #[cfg(unix)]
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, bytes, offset)
    }

    #[cfg(not(unix))]
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        self.0.seek(SeekFrom::Start(offset))?;
        self.0.write_all(bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Disk for OsDisk {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().create_new(true).write(true).open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir(dir)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn sync_trees(&self, dir: &Path) -> io::Result<()> {
        let journal = dir.join(crate::journal::DIR);
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if path == journal {
                    continue;
                }
                // sled's threads may remove a file meanwhile (an old
                // snapshot): then there is nothing of it to sync.
                let synced = match entry.file_type()? {
                    t if t.is_dir() => {
                        dirs.push(path);
                        Ok(())
                    }
                    t if t.is_file() => File::open(&path).and_then(|f| f.sync_all()),
                    _ => Ok(()),
                };
                match synced {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            File::open(&d)?.sync_all()?;
        }
        Ok(())
    }
}

/// A store's sled database with the disk it is on. It dereferences to
/// [`sled::Db`], but its own [`Db::flush`] comes first: every flush the
/// store makes goes through it, so the disk learns what became durable.
#[derive(Clone)]
pub(crate) struct Db {
    db: sled::Db,
    disk: Arc<dyn Disk>,
    dir: PathBuf,
}

impl Db {
    pub(crate) fn new(db: sled::Db, disk: Arc<dyn Disk>, dir: &Path) -> Db {
        Db {
            db,
            disk,
            dir: dir.to_path_buf(),
        }
    }

    /// Flushes sled and tells the disk. Blocks.
    pub(crate) fn flush(&self) -> Result<()> {
        self.db.flush()?;
        self.disk.trees_flushed(&self.dir);
        Ok(())
    }

    /// Flushes sled and syncs all of its files, what it found on opening
    /// included ([`Disk::sync_trees`]). Blocks.
    pub(crate) fn sync_all(&self) -> Result<()> {
        self.flush()?;
        self.disk.sync_trees(&self.dir).map_err(|e| {
            let context = format!("syncing sled's files in {}: {e}", self.dir.display());
            StoreError::Sled(sled::Error::Io(io::Error::new(e.kind(), context)))
        })
    }

    /// The disk the database is on.
    pub(crate) fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    /// Waits, in the caller's clock (the simulator's), for the time a
    /// slow disk's sync takes ([`Disk::sync_delay`]); at once on a real
    /// disk.
    pub(crate) async fn slow_disk(&self) {
        let delay = self.disk.sync_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

impl std::ops::Deref for Db {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_file_writes_where_it_is_told_and_refuses_to_be_made_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut file = OsDisk.create_new(&path).expect("create");
        file.write_at(0, b"hello world").expect("write");
        file.write_at(6, b"there").expect("write");
        file.sync_data().expect("sync");
        assert_eq!(OsDisk.read(&path).expect("read"), b"hello there");
        assert_eq!(
            OsDisk.create_new(&path).err().map(|e| e.kind()),
            Some(io::ErrorKind::AlreadyExists)
        );
        assert_eq!(OsDisk.list(dir.path()).expect("list"), vec![path.clone()]);
        OsDisk.remove_file(&path).expect("remove");
        assert_eq!(
            OsDisk.list(&path).err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
    }
}
