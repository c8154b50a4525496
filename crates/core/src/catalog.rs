//! The keyspace catalog: which keyspaces exist and with which CRDT type.
//!
//! A keyspace is declared by a delta (`Op::Declare`) whose marker `(hlc,
//! origin)` dates the declaration. Two regions cut off from each other may
//! declare the same name with different types. The catalog keeps every
//! `(name, type)` declaration — data is stored per `(name, type)`, so nothing
//! written under either is lost — and resolves names deterministically:
//!
//! - the **earliest** declaration (smallest marker) holds the name in every
//!   region; it is most likely the one clients have been using longest;
//! - every other declaration stays reachable under the alias `name#type`
//!   (`#` is not allowed in names, so aliases never collide with names);
//! - [`Catalog::describe`] and [`Catalog::conflict_count`] make the conflict
//!   visible to users.
//!
//! The catalog is itself a state-based CRDT: a map from `(name, type)` to
//! the minimum marker seen, merged by union and minimum, which is
//! commutative, associative and idempotent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crdt::{Crdt, CrdtType};
use crate::error::{CoreError, Result};
use crate::limits::check_keyspace_name;
use crate::Marker;

/// Where a keyspace's data lives: its name and type. Two declarations of one
/// name with different types are two keyspaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyspaceId {
    /// Keyspace name.
    pub name: String,
    /// Keyspace type.
    pub ty: CrdtType,
}

/// A declaration that lost its name to an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The losing declaration's type.
    pub ty: CrdtType,
    /// The alias under which its data stays reachable: `name#type`.
    pub alias: String,
    /// When and where it was declared.
    pub created: Marker,
}

/// A keyspace as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceView {
    /// Keyspace name.
    pub name: String,
    /// The type of the declaration that holds the name.
    pub ty: CrdtType,
    /// When and where that declaration was made.
    pub created: Marker,
    /// Later declarations of the same name with other types.
    pub conflicts: Vec<Conflict>,
}

impl KeyspaceView {
    /// The storage identity of the declaration holding the name.
    pub fn id(&self) -> KeyspaceId {
        KeyspaceId {
            name: self.name.clone(),
            ty: self.ty,
        }
    }
}

/// Every keyspace declaration a region knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    names: BTreeMap<String, BTreeMap<CrdtType, Marker>>,
}

/// The alias of a declaration: `name#type`.
pub fn alias(name: &str, ty: CrdtType) -> String {
    format!("{name}#{ty}")
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides what a local request to create `name` with type `ty` does:
    /// `Ok(Some(view))` when it already exists with that type (nothing to
    /// do), `Ok(None)` when it must be declared, and
    /// [`CoreError::KeyspaceTypeConflict`] when the name is held by another
    /// type.
    pub fn check_create(&self, name: &str, ty: CrdtType) -> Result<Option<KeyspaceView>> {
        check_keyspace_name(name)?;
        match self.view(name) {
            None => Ok(None),
            Some(view) if view.ty == ty => Ok(Some(view)),
            Some(view) => Err(CoreError::KeyspaceTypeConflict {
                name: name.to_string(),
                existing: view.ty,
                requested: ty,
            }),
        }
    }

    /// Records a declaration (local or remote). Declaring an existing
    /// `(name, type)` again keeps the earlier marker.
    pub fn declare(&mut self, name: &str, ty: CrdtType, created: Marker) {
        let marker = self
            .names
            .entry(name.to_string())
            .or_default()
            .entry(ty)
            .or_insert(created);
        *marker = (*marker).min(created);
    }

    /// Resolves a name or an alias `name#type` to the keyspace it denotes.
    pub fn resolve(&self, name_or_alias: &str) -> Option<KeyspaceId> {
        match name_or_alias.split_once('#') {
            None => self.view(name_or_alias).map(|v| v.id()),
            Some((name, ty)) => {
                let ty: CrdtType = ty.parse().ok()?;
                self.names.get(name)?.contains_key(&ty).then(|| KeyspaceId {
                    name: name.to_string(),
                    ty,
                })
            }
        }
    }

    /// Describes a keyspace by name or alias.
    pub fn describe(&self, name_or_alias: &str) -> Option<KeyspaceView> {
        let name = name_or_alias
            .split_once('#')
            .map_or(name_or_alias, |(name, _)| name);
        self.resolve(name_or_alias)?;
        self.view(name)
    }

    fn view(&self, name: &str) -> Option<KeyspaceView> {
        let decls = self.names.get(name)?;
        let (&ty, &created) = decls.iter().min_by_key(|(_, &marker)| marker)?;
        let mut conflicts: Vec<Conflict> = decls
            .iter()
            .filter(|(&other, _)| other != ty)
            .map(|(&ty, &created)| Conflict {
                ty,
                alias: alias(name, ty),
                created,
            })
            .collect();
        conflicts.sort_by_key(|c| c.created);
        Some(KeyspaceView {
            name: name.to_string(),
            ty,
            created,
            conflicts,
        })
    }

    /// Every keyspace, sorted by name.
    pub fn list(&self) -> Vec<KeyspaceView> {
        self.names.keys().filter_map(|n| self.view(n)).collect()
    }

    /// Every declaration: name, type and marker.
    pub fn declarations(&self) -> impl Iterator<Item = (&str, CrdtType, Marker)> + '_ {
        self.names.iter().flat_map(|(name, decls)| {
            decls
                .iter()
                .map(move |(&ty, &marker)| (name.as_str(), ty, marker))
        })
    }

    /// Number of names declared with more than one type.
    pub fn conflict_count(&self) -> usize {
        self.names.values().filter(|d| d.len() > 1).count()
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl Crdt for Catalog {
    fn merge(&mut self, other: &Self) {
        for (name, ty, marker) in other.declarations() {
            self.declare(name, ty, marker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hlc, ReplicaId};

    fn m(t: u64, r: u32) -> Marker {
        Marker::new(Hlc::from_u64(t), ReplicaId(r))
    }

    #[test]
    fn concurrent_declarations_resolve_the_same_everywhere() {
        let mut east = Catalog::new();
        let mut west = Catalog::new();
        east.declare("carts", CrdtType::Set, m(10, 1));
        west.declare("carts", CrdtType::Counter, m(12, 2));
        let mut e2 = east.clone();
        e2.merge(&west);
        let mut w2 = west.clone();
        w2.merge(&east);
        assert_eq!(e2, w2);
        let view = e2.describe("carts").unwrap();
        assert_eq!(view.ty, CrdtType::Set);
        assert_eq!(view.conflicts.len(), 1);
        assert_eq!(view.conflicts[0].alias, "carts#counter");
        assert_eq!(
            e2.resolve("carts#counter"),
            Some(KeyspaceId {
                name: "carts".into(),
                ty: CrdtType::Counter
            })
        );
        assert_eq!(e2.resolve("carts#stream"), None);
        assert_eq!(e2.resolve("carts#bogus"), None);
        assert_eq!(e2.conflict_count(), 1);
        assert!(matches!(
            e2.check_create("carts", CrdtType::Counter),
            Err(CoreError::KeyspaceTypeConflict { .. })
        ));
        assert!(e2.check_create("carts", CrdtType::Set).unwrap().is_some());
        assert!(e2.check_create("new", CrdtType::Set).unwrap().is_none());
        assert!(e2.check_create("bad#name", CrdtType::Set).is_err());
    }

    #[test]
    fn same_type_declared_twice_keeps_the_earliest() {
        let mut c = Catalog::new();
        c.declare("hits", CrdtType::Counter, m(20, 2));
        c.declare("hits", CrdtType::Counter, m(5, 3));
        c.declare("hits", CrdtType::Counter, m(30, 1));
        let view = c.describe("hits").unwrap();
        assert_eq!(view.created, m(5, 3));
        assert!(view.conflicts.is_empty());
        assert_eq!(c.conflict_count(), 0);
    }
}
