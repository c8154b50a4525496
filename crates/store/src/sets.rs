//! Sets stored member by member.
//!
//! A set key's `values` record holds its [`SetHeader`]; each member is a
//! row of `set_members` holding its [`MemberDots`] (see [`layout`]). A
//! write loads a *slice*, the header and the members the operation names
//! (plus those of deferred removes, see [`SetHeader::slice_members`]),
//! applies the operation to it with the same code that applies it to a
//! whole set, and writes back the header and those members only. An add
//! to a set of a million members reads and writes two small records.
//!
//! Reading a whole set inside a transaction needs a scan, which sled
//! transactions cannot do: the committed members of the sets a transaction
//! reads whole are loaded before it starts ([`MemberOverlay::preload`])
//! and the transaction's own member writes are laid over them, as
//! [`Overlay`](crate::records::Overlay) does for stream rows. Outside a
//! transaction a whole set is read under the writer lock, so its header
//! and members are of the same commit.

use std::collections::{BTreeMap, BTreeSet};

use concord_core::crdt::{MemberDots, Set, SetHeader};
use concord_core::KeyspaceId;

use crate::error::{Result, StoreError};
use crate::layout;
use crate::rw::Rw;
use crate::rw::{abort, TxResult};

/// The committed member rows of the sets a transaction reads whole, read
/// before it started, and the member rows it has written since.
#[derive(Default, Clone)]
pub(crate) struct MemberOverlay {
    /// Key prefixes of the sets preloaded.
    loaded: BTreeSet<Vec<u8>>,
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `None`: the member was removed.
    written: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl MemberOverlay {
    /// Reads the committed members of every set `keys` names (keyspace
    /// name, key). The caller holds the writer lock, so they cannot change
    /// before its transaction.
    pub(crate) fn preload<'a>(
        tree: &sled::Tree,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<MemberOverlay> {
        let mut overlay = MemberOverlay::default();
        for (name, key) in keys {
            let prefix = layout::key_prefix(name, key);
            if overlay.loaded.contains(&prefix) {
                continue;
            }
            for item in tree.scan_prefix(&prefix) {
                let (k, v) = item?;
                overlay.committed.insert(k.to_vec(), v.to_vec());
            }
            overlay.loaded.insert(prefix);
        }
        Ok(overlay)
    }

    /// The members of one preloaded set as the transaction sees them.
    fn members(&self, name: &str, key: &str) -> Result<Vec<(Vec<u8>, MemberDots)>> {
        let prefix = layout::key_prefix(name, key);
        if !self.loaded.contains(&prefix) {
            return Err(StoreError::Bug(format!(
                "set {name:?}/{key:?} read whole but not preloaded"
            )));
        }
        let mut rows: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        for (k, v) in self.committed.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            rows.insert(k, Some(v));
        }
        for (k, v) in self.written.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            rows.insert(k, v.as_deref());
        }
        rows.into_iter()
            .filter_map(|(k, v)| v.map(|v| decode_member(&k[prefix.len()..], v)))
            .collect()
    }
}

pub(crate) fn decode_member(member: &[u8], dots: &[u8]) -> Result<(Vec<u8>, MemberDots)> {
    let dots = MemberDots::decode(dots)
        .map_err(|e| StoreError::Corrupt(format!("set member row: {e}")))?;
    Ok((member.to_vec(), dots))
}

/// Decodes a set's `values` record.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<SetHeader> {
    SetHeader::decode(bytes).map_err(|e| StoreError::Corrupt(format!("set header: {e}")))
}

fn tx_header(values: &Rw<'_>, vkey: &[u8]) -> TxResult<SetHeader> {
    match values.get(vkey)? {
        None => Ok(SetHeader::default()),
        Some(bytes) => decode_header(&bytes).or_else(abort),
    }
}

/// [`Set::from_parts`], its failure reported as a corrupt store.
pub(crate) fn from_parts(
    header: SetHeader,
    members: impl IntoIterator<Item = (Vec<u8>, MemberDots)>,
) -> Result<Set> {
    Set::from_parts(header, members).map_err(|e| StoreError::Corrupt(format!("set: {e}")))
}

/// One set key inside a transaction.
pub(crate) struct TxSet<'a> {
    pub(crate) name: &'a str,
    pub(crate) key: &'a str,
    /// Its `values` key.
    pub(crate) vkey: Vec<u8>,
}

impl<'a> TxSet<'a> {
    /// Key `key` of set keyspace `keyspace`.
    pub(crate) fn of(keyspace: &'a KeyspaceId, key: &'a str) -> TxSet<'a> {
        TxSet {
            name: &keyspace.name,
            key,
            vkey: layout::value_key(keyspace, key),
        }
    }

    /// The slice of the set an operation naming `named` needs, and the
    /// members it holds or could hold (the ones to write back).
    pub(crate) fn slice(
        &self,
        values: &Rw<'_>,
        members: &Rw<'_>,
        named: &[Vec<u8>],
    ) -> TxResult<(Set, BTreeSet<Vec<u8>>)> {
        let header = tx_header(values, &self.vkey)?;
        let needed = header.slice_members(named);
        let mut rows = Vec::with_capacity(needed.len());
        for member in &needed {
            if let Some(v) = members.get(layout::member_key(self.name, self.key, member))? {
                rows.push(decode_member(member, &v).or_else(abort)?);
            }
        }
        Ok((from_parts(header, rows).or_else(abort)?, needed))
    }

    /// The whole set, from the overlay (which must have preloaded it).
    pub(crate) fn whole(&self, values: &Rw<'_>, overlay: &MemberOverlay) -> TxResult<Set> {
        let header = tx_header(values, &self.vkey)?;
        let rows = overlay.members(self.name, self.key).or_else(abort)?;
        from_parts(header, rows).or_else(abort)
    }

    /// Writes back `set`, a slice that holds every member in `needed` it
    /// has: its header, each of those members, and the removal of those
    /// it no longer has.
    pub(crate) fn store(
        &self,
        values: &Rw<'_>,
        members: &Rw<'_>,
        overlay: &mut MemberOverlay,
        set: &Set,
        needed: &BTreeSet<Vec<u8>>,
    ) -> TxResult<()> {
        let (header, present) = set
            .into_parts()
            .map_err(|e| StoreError::Corrupt(format!("set: {e}")))
            .or_else(abort)?;
        values.insert(self.vkey.as_slice(), header.encode())?;
        let mut present: BTreeMap<Vec<u8>, MemberDots> = present.into_iter().collect();
        for member in needed {
            let rk = layout::member_key(self.name, self.key, member);
            let row = present.remove(member).map(|dots| dots.encode());
            match &row {
                Some(bytes) => members.insert(rk.as_slice(), bytes.as_slice())?,
                None => members.remove(rk.as_slice())?,
            };
            overlay.written.insert(rk, row);
        }
        if let Some(member) = present.into_keys().next() {
            return abort(StoreError::Bug(format!(
                "a set operation produced member {member:?} it was not given"
            )));
        }
        Ok(())
    }
}
