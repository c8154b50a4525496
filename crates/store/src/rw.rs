//! The trees a commit reads and writes, in one of two ways.
//!
//! - Inside a sled transaction ([`Rw::Tx`]), when the store keeps no
//!   journal (`relaxed` durability): sled's transaction is then what makes
//!   a commit all-or-nothing across a crash.
//! - Staged in memory ([`Rw::Staged`]) in `group` durability: the commit
//!   reads through its own writes, its deltas are written and synced to
//!   the [journal](crate::journal), and only then are the staged records
//!   written to sled with plain inserts, value records after what they
//!   stand for and the version vector last ([`Staging::in_order`]). The
//!   journal is then a write-ahead log: whatever part of a commit sled
//!   holds after a crash, the journal holds the whole commit, and the
//!   replay at open re-applies every delta above the
//!   recovered version vector (sled recovers a prefix of its writes, and
//!   the vector is written after everything it covers). Re-applying an
//!   operation whose records are partly there changes nothing twice:
//!   operations are idempotent against a state that includes them (the
//!   argument of [`crate::snapshot`]), and the value record an operation
//!   reads to tell whether it was applied is written after the records
//!   it stands for, so a part of a commit never passes for the whole.
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
use std::collections::{BTreeMap, BTreeSet};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::IVec;

use crate::error::StoreError;
use crate::layout;

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
                s.reads.borrow_mut().insert(key.as_ref().to_vec());
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

/// Staged records of one tree: `None` removes the record.
type Records = BTreeMap<Vec<u8>, Option<IVec>>;

/// One tree's staged writes, and the keys the commit read from the tree
/// itself (not from its own writes).
pub(crate) struct Staged {
    tree: sled::Tree,
    writes: RefCell<Records>,
    reads: RefCell<BTreeSet<Vec<u8>>>,
}

impl Staged {
    fn over(tree: &sled::Tree) -> Staged {
        Staged {
            tree: tree.clone(),
            writes: RefCell::new(BTreeMap::new()),
            reads: RefCell::new(BTreeSet::new()),
        }
    }
}

/// Writes `records` to `tree`. The HLC high-water mark in `meta` only
/// ever rises: commits may reach sled out of their commit order
/// ([`crate::pipeline`]), and each raised it from what it read.
fn write_records(tree: &sled::Tree, records: &Records, meta: bool) -> sled::Result<()> {
    for (key, value) in records {
        match value {
            Some(v) if meta && key.as_slice() == layout::meta::HLC => {
                tree.fetch_and_update(key, |old| match old {
                    Some(old) if old >= v.as_ref() => Some(IVec::from(old)),
                    _ => Some(v.clone()),
                })?;
            }
            Some(v) => {
                tree.insert(key.as_slice(), v.clone())?;
            }
            None => {
                tree.remove(key.as_slice())?;
            }
        }
    }
    Ok(())
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
    pub(crate) fn over(t: &Trees) -> Staging {
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

    /// The trees in the order their records are written to sled. sled
    /// may recover any prefix of them after a crash, so:
    ///
    /// - the version vector comes last: every delta the recovered vector
    ///   covers has all its records;
    /// - `values` comes after the stream rows, set members and `meta`
    ///   records its operations write: a value record is what a replayed
    ///   operation reads to tell whether it was applied (a set's header
    ///   holds the dots it has seen, a stream's its watermark), so it must
    ///   not say so before the records it stands for are there. A set
    ///   header written before its members would make the replayed add of
    ///   a member a no-op, and the member would be lost.
    ///
    /// Each says whether it is `meta`.
    fn in_order(&self) -> [(&Staged, bool); 7] {
        [
            (&self.catalog, false),
            (&self.rows, false),
            (&self.members, false),
            (&self.meta, true),
            (&self.values, false),
            (&self.log, false),
            (&self.vv, false),
        ]
    }

    /// Writes the staged records to sled, in [`Staging::in_order`].
    pub(crate) fn apply(self) -> sled::Result<()> {
        self.freeze().apply()
    }

    /// The staged records, no longer writable, for a commit that reaches
    /// sled later, perhaps from another thread.
    pub(crate) fn freeze(self) -> Frozen {
        Frozen {
            trees: self
                .in_order()
                .map(|(s, meta)| (s.tree.clone(), s.writes.take(), meta)),
        }
    }

    /// Whether this commit depends on records of `earlier` that are not in
    /// sled yet: it read one of them from sled, or (with `writes_too`, for
    /// a commit that reaches sled before `earlier` does) wrote one. The
    /// HLC high-water mark does not count: it only rises
    /// ([`write_records`]).
    pub(crate) fn depends_on(&self, earlier: &Frozen, writes_too: bool) -> bool {
        self.in_order()
            .iter()
            .zip(&earlier.trees)
            .any(|((mine, meta), (_, theirs, _))| {
                let touched = |key: &Vec<u8>| {
                    !(*meta && key.as_slice() == layout::meta::HLC) && theirs.contains_key(key)
                };
                mine.reads.borrow().iter().any(touched)
                    || (writes_too && mine.writes.borrow().keys().any(touched))
            })
    }
}

/// A staged commit's records, frozen ([`Staging::freeze`]).
pub(crate) struct Frozen {
    trees: [(sled::Tree, Records, bool); 7],
}

impl Frozen {
    /// Writes the records to sled, in [`Staging::in_order`]. Writing them
    /// again after a failure part-way is harmless: each is a plain record.
    pub(crate) fn apply(&self) -> sled::Result<()> {
        for (tree, records, meta) in &self.trees {
            write_records(tree, records, *meta)?;
        }
        Ok(())
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
        write_records(&tree, &staged.writes.take(), false).unwrap();
        assert_eq!(tree.get("kept").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(tree.get("fresh").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(tree.get("gone").unwrap().is_none());
    }

    fn trees() -> (tempfile::TempDir, Trees) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let open = |name: &str| db.open_tree(name).unwrap();
        let t = Trees {
            meta: open("meta"),
            catalog: open("catalog"),
            values: open("values"),
            rows: open("rows"),
            members: open("members"),
            log: open("log"),
            vv: open("vv"),
            acks: open("acks"),
        };
        (dir, t)
    }

    #[test]
    fn the_high_water_mark_only_rises_whatever_order_commits_reach_sled_in() {
        let (_dir, t) = trees();
        let hlc = |n: u64| n.to_be_bytes();
        let earlier = Staging::over(&t);
        earlier
            .data()
            .meta
            .insert(layout::meta::HLC, hlc(150))
            .unwrap();
        earlier.data().values.insert("k", "v").unwrap();
        let earlier = earlier.freeze();
        let later = Staging::over(&t);
        later
            .data()
            .meta
            .insert(layout::meta::HLC, hlc(160))
            .unwrap();
        later.apply().unwrap();
        earlier.apply().unwrap();
        assert_eq!(
            t.meta.get(layout::meta::HLC).unwrap().as_deref(),
            Some(&hlc(160)[..]),
            "the commit written last lowered the mark"
        );
        assert_eq!(t.values.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn value_records_follow_what_they_stand_for_and_the_vector_comes_last() {
        let (_dir, t) = trees();
        let staging = Staging::over(&t);
        let order: Vec<String> = staging
            .in_order()
            .iter()
            .map(|(s, _)| String::from_utf8(s.tree.name().to_vec()).unwrap())
            .collect();
        let at = |name: &str| order.iter().position(|n| n == name).unwrap();
        for part in ["rows", "members", "meta"] {
            assert!(at(part) < at("values"), "{part} after values: {order:?}");
        }
        assert_eq!(at("vv"), order.len() - 1, "{order:?}");
    }

    #[test]
    fn a_commit_depends_on_an_earlier_one_through_what_it_read_or_wrote() {
        let (_dir, t) = trees();
        let earlier = Staging::over(&t);
        earlier.data().values.insert("hot", "1").unwrap();
        earlier.data().vv.insert("me", "7").unwrap();
        earlier
            .data()
            .meta
            .insert(layout::meta::HLC, 5u64.to_be_bytes())
            .unwrap();
        let earlier = earlier.freeze();

        let reader = Staging::over(&t);
        reader.data().values.get("hot").unwrap();
        assert!(reader.depends_on(&earlier, false), "read a queued record");

        let blind = Staging::over(&t);
        blind.data().vv.insert("me", "8").unwrap();
        assert!(
            !blind.depends_on(&earlier, false),
            "a blind write behind it in the queue is ordered"
        );
        assert!(
            blind.depends_on(&earlier, true),
            "a blind write ahead of it would be overwritten"
        );

        let other = Staging::over(&t);
        other.data().values.get("cold").unwrap();
        other.data().values.insert("cold", "2").unwrap();
        other.data().meta.get(layout::meta::HLC).unwrap();
        other
            .data()
            .meta
            .insert(layout::meta::HLC, 9u64.to_be_bytes())
            .unwrap();
        assert!(
            !other.depends_on(&earlier, true),
            "other records and the high-water mark are no dependency"
        );

        let own = Staging::over(&t);
        own.data().values.insert("hot", "3").unwrap();
        own.data().values.get("hot").unwrap();
        assert!(
            !own.depends_on(&earlier, false),
            "reading its own write reads nothing from sled"
        );
    }
}

#[derive(Clone)]
pub(crate) struct Trees {
    pub(crate) meta: sled::Tree,
    pub(crate) catalog: sled::Tree,
    pub(crate) values: sled::Tree,
    pub(crate) rows: sled::Tree,
    pub(crate) members: sled::Tree,
    pub(crate) log: sled::Tree,
    pub(crate) vv: sled::Tree,
    pub(crate) acks: sled::Tree,
}

pub(crate) type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

pub(crate) fn abort<T>(e: impl Into<StoreError>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e.into()))
}

pub(crate) fn from_tx(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}
