//! The trees a commit reads and writes, in one of two ways.
//!
//! - Inside a sled transaction ([`Rw::Tx`]), when the store keeps no
//!   journal (`relaxed` durability): sled's transaction is then what makes
//!   a commit all-or-nothing across a crash.
//! - Staged in memory ([`Rw::Staged`]) in `group` durability: the commit
//!   reads through its own writes, its deltas are written and synced to
//!   the [journal](crate::journal), and only then are the staged records
//!   written to sled with plain inserts, the version vector last
//!   ([`Staging::apply`]). The journal is then a write-ahead log: whatever
//!   part of a commit sled holds after a crash, the journal holds the whole
//!   commit, and the replay at open re-applies every delta above the
//!   recovered version vector (sled recovers a prefix of its writes, and
//!   the vector is written after everything it covers). Re-applying an
//!   operation whose records are partly there changes nothing twice:
//!   operations are idempotent against a state that includes them (the
//!   argument of [`crate::snapshot`]).
//!
//! A sled transaction costs more than its records: each commit seals
//! sled's I/O buffer and hands it to a sled I/O thread that writes and
//! syncs it, and it excludes every other sled operation, readers included,
//! while it runs (docs/DECISIONS.md, "Group commits write sled without
//! transactions").
//!
//! Commits of either kind run under the store's writer lock, so a staged
//! commit's reads cannot be invalidated by another commit before its
//! records are written.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::IVec;

use crate::store::TxResult;

/// One tree as a commit sees it.
pub(crate) enum Rw<'a> {
    /// Inside a sled transaction.
    Tx(&'a TransactionalTree),
    /// Staged in memory over the committed tree.
    Staged(&'a Staged),
}

impl Rw<'_> {
    /// The record under `key`, the commit's own writes included.
    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        match self {
            Rw::Tx(t) => Ok(t.get(key.as_ref())?),
            Rw::Staged(s) => {
                if let Some(staged) = s.writes.borrow().get(key.as_ref()) {
                    return Ok(staged.clone());
                }
                s.tree
                    .get(key)
                    .map_err(ConflictableTransactionError::Storage)
            }
        }
    }

    /// Sets the record under `key`.
    pub(crate) fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> TxResult<()> {
        match self {
            Rw::Tx(t) => {
                t.insert(key.as_ref(), value.as_ref())?;
            }
            Rw::Staged(s) => {
                s.writes
                    .borrow_mut()
                    .insert(key.as_ref().to_vec(), Some(IVec::from(value.as_ref())));
            }
        }
        Ok(())
    }

    /// Removes the record under `key`.
    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<()> {
        match self {
            Rw::Tx(t) => {
                t.remove(key.as_ref())?;
            }
            Rw::Staged(s) => {
                s.writes.borrow_mut().insert(key.as_ref().to_vec(), None);
            }
        }
        Ok(())
    }
}

/// One tree's staged writes: `None` removes the record.
pub(crate) struct Staged {
    tree: sled::Tree,
    writes: RefCell<BTreeMap<Vec<u8>, Option<IVec>>>,
}

impl Staged {
    fn over(tree: &sled::Tree) -> Staged {
        Staged {
            tree: tree.clone(),
            writes: RefCell::new(BTreeMap::new()),
        }
    }

    fn apply(self) -> sled::Result<()> {
        for (key, value) in self.writes.into_inner() {
            match value {
                Some(v) => self.tree.insert(key, v)?,
                None => self.tree.remove(key)?,
            };
        }
        Ok(())
    }
}

/// The staged writes of one commit to the data trees.
pub(crate) struct Staging {
    pub(crate) catalog: Staged,
    pub(crate) values: Staged,
    pub(crate) rows: Staged,
    pub(crate) members: Staged,
    pub(crate) log: Staged,
    pub(crate) vv: Staged,
    pub(crate) meta: Staged,
}

impl Staging {
    /// Nothing staged yet, over these trees.
    pub(crate) fn over(t: &crate::store::Trees) -> Staging {
        Staging {
            catalog: Staged::over(&t.catalog),
            values: Staged::over(&t.values),
            rows: Staged::over(&t.rows),
            members: Staged::over(&t.members),
            log: Staged::over(&t.log),
            vv: Staged::over(&t.vv),
            meta: Staged::over(&t.meta),
        }
    }

    /// The trees as the commit's body sees them.
    pub(crate) fn data(&self) -> Data<'_> {
        Data {
            catalog: Rw::Staged(&self.catalog),
            values: Rw::Staged(&self.values),
            rows: Rw::Staged(&self.rows),
            members: Rw::Staged(&self.members),
            log: Rw::Staged(&self.log),
            vv: Rw::Staged(&self.vv),
            meta: Rw::Staged(&self.meta),
        }
    }

    /// Writes the staged records to sled, the version vector last: every
    /// delta the written vector covers has all its records written before.
    pub(crate) fn apply(self) -> sled::Result<()> {
        self.catalog.apply()?;
        self.values.apply()?;
        self.rows.apply()?;
        self.members.apply()?;
        self.meta.apply()?;
        self.log.apply()?;
        self.vv.apply()
    }
}

/// The data trees of one commit, as [`Store`](crate::Store)'s commit
/// bodies take them.
pub(crate) struct Data<'a> {
    pub(crate) catalog: Rw<'a>,
    pub(crate) values: Rw<'a>,
    pub(crate) rows: Rw<'a>,
    pub(crate) members: Rw<'a>,
    pub(crate) log: Rw<'a>,
    pub(crate) vv: Rw<'a>,
    pub(crate) meta: Rw<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_writes_are_read_back_and_reach_the_tree_only_when_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        tree.insert("kept", "old").unwrap();
        tree.insert("gone", "old").unwrap();
        let staged = Staged::over(&tree);
        let rw = Rw::Staged(&staged);
        rw.insert("kept", "new").unwrap();
        rw.insert("fresh", "new").unwrap();
        rw.remove("gone").unwrap();
        assert_eq!(rw.get("kept").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(rw.get("fresh").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(rw.get("gone").unwrap(), None);
        assert_eq!(
            tree.get("kept").unwrap().as_deref(),
            Some(&b"old"[..]),
            "nothing reaches sled before apply"
        );
        assert!(tree.get("fresh").unwrap().is_none());
        staged.apply().unwrap();
        assert_eq!(tree.get("kept").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(tree.get("fresh").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(tree.get("gone").unwrap().is_none());
    }
}
