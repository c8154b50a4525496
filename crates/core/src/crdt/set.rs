//! Observed-remove set, add-wins, built on crdts' `Orswot`.
//!
//! Every add is tagged with a dot `(origin, n)`: the origin's n-th add to
//! this set. A remove carries the dots it has observed for its members and
//! deletes only those adds, so an add made concurrently elsewhere (a dot the
//! remover had not seen) survives. A remove whose observed dots are ahead of
//! the receiver is deferred until the receiver has seen those adds.
//!
//! crdts' `Orswot::apply` silently drops an add whose dot skips ahead of the
//! next expected one; [`Set::apply`] refuses it with
//! [`CoreError::DotGap`] instead, so a missing delta is an error, never a
//! silent loss.
//!
//! # Parts and slices
//!
//! A set's state splits into a [`SetHeader`] (the clock of every add seen
//! and the removes still waiting for adds) and each member's
//! [`MemberDots`]. A store keeps the header once per key and every member
//! on its own, so that an operation reads and writes only what it touches:
//! [`Set::from_parts`] given the header and only the members of
//! [`SetHeader::slice_members`] is a *slice* on which preparing or applying
//! that operation gives those members, and the header, exactly what the
//! whole set would; every other member is untouched by it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crdts::orswot::Op as OrOp;
use crdts::{CmRDT, CvRDT, Dot, Orswot, VClock};
use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::command::{Access, Reply};
use crate::error::{CoreError, Result};
use crate::limits::Limits;
use crate::ReplicaId;

/// An add-wins observed-remove set of byte-string members.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    inner: Orswot<Vec<u8>, ReplicaId>,
}

/// The part of a set's state that belongs to no one member: the clock of
/// every add the set has seen, and the removes deferred until the adds they
/// observed arrive. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetHeader {
    clock: VClock<ReplicaId>,
    deferred: HashMap<VClock<ReplicaId>, HashSet<Vec<u8>>>,
}

/// The dots of the adds that keep one member in a set; never empty (a
/// member without dots is not in the set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDots(VClock<ReplicaId>);

/// A member and the dots that keep it in its set.
pub type Member = (Vec<u8>, MemberDots);

/// crdts' `Orswot` as serde sees it: its fields are private to crdts, so a
/// set is taken apart and put back together through its serde form, which
/// this struct mirrors field for field. A test checks that the two still
/// agree.
#[derive(Serialize, Deserialize)]
struct OrswotShape {
    clock: VClock<ReplicaId>,
    entries: HashMap<Vec<u8>, VClock<ReplicaId>>,
    deferred: HashMap<VClock<ReplicaId>, HashSet<Vec<u8>>>,
}

/// Re-reads `from`'s serde form as a `T`.
fn reshape<F: Serialize, T: serde::de::DeserializeOwned>(from: &F) -> Result<T> {
    let bytes = postcard::to_stdvec(from).map_err(|e| CoreError::decode("set parts", e))?;
    postcard::from_bytes(&bytes).map_err(|e| CoreError::decode("set parts", e))
}

/// Version byte in front of an encoded [`SetHeader`].
const SET_HEADER_V1: u8 = 1;

impl SetHeader {
    /// The members a slice must hold for an operation, or the preparation
    /// of a command, naming `named`: those, and every member of a deferred
    /// remove (an add may release it).
    pub fn slice_members(&self, named: &[Vec<u8>]) -> BTreeSet<Vec<u8>> {
        let mut out: BTreeSet<Vec<u8>> = named.iter().cloned().collect();
        for members in self.deferred.values() {
            out.extend(members.iter().cloned());
        }
        out
    }

    /// Encodes the header: a format version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode(SET_HEADER_V1, self)
    }

    /// Decodes what [`SetHeader::encode`] wrote. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<SetHeader> {
        crate::codec::decode("set header", SET_HEADER_V1, bytes)
    }
}

impl MemberDots {
    /// Encodes the dots (postcard; the store's format version covers it).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_stdvec(&self.0).unwrap_or_default()
    }

    /// Decodes what [`MemberDots::encode`] wrote, refusing trailing bytes
    /// and an empty clock. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<MemberDots> {
        let (clock, rest): (VClock<ReplicaId>, _) =
            postcard::take_from_bytes(bytes).map_err(|e| CoreError::decode("member dots", e))?;
        if !rest.is_empty() {
            return Err(CoreError::decode(
                "member dots",
                format!("{} trailing bytes", rest.len()),
            ));
        }
        if clock.is_empty() {
            return Err(CoreError::decode("member dots", "no dots"));
        }
        Ok(MemberDots(clock))
    }
}

/// A set operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetOp {
    /// Adds members with the dot `(origin, dot_counter)`.
    Add {
        /// The origin's next dot counter for this set.
        dot_counter: u64,
        /// Members to add.
        members: Vec<Vec<u8>>,
    },
    /// Removes the adds of `members` covered by `observed`.
    Remove {
        /// Highest observed dot counter per replica.
        observed: BTreeMap<ReplicaId, u64>,
        /// Members to remove.
        members: Vec<Vec<u8>>,
    },
}

impl Set {
    /// The members, sorted bytewise.
    pub fn members(&self) -> Vec<Vec<u8>> {
        let mut members: Vec<Vec<u8>> = self.inner.iter().map(|m| m.val.clone()).collect();
        members.sort_unstable();
        members
    }

    /// True when `member` is in the set.
    pub fn contains(&self, member: &[u8]) -> bool {
        self.inner.contains(&member.to_vec()).val
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.inner.iter().count()
    }

    /// True when the set has no members.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits the state into its header and every member's dots, members
    /// sorted bytewise.
    pub fn into_parts(&self) -> Result<(SetHeader, Vec<Member>)> {
        let shape: OrswotShape = reshape(&self.inner)?;
        let mut members: Vec<Member> = shape
            .entries
            .into_iter()
            .map(|(m, dots)| (m, MemberDots(dots)))
            .collect();
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let header = SetHeader {
            clock: shape.clock,
            deferred: shape.deferred,
        };
        Ok((header, members))
    }

    /// Puts a state together from its header and members' dots: the whole
    /// set given every member, a slice given some (see the
    /// [module docs](self)).
    pub fn from_parts(header: SetHeader, members: impl IntoIterator<Item = Member>) -> Result<Set> {
        let shape = OrswotShape {
            clock: header.clock,
            entries: members.into_iter().map(|(m, d)| (m, d.0)).collect(),
            deferred: header.deferred,
        };
        Ok(Set {
            inner: reshape(&shape)?,
        })
    }

    /// Highest dot counter of `replica` this set has seen.
    pub fn seen(&self, replica: ReplicaId) -> u64 {
        self.inner.clock().get(&replica)
    }

    /// The operation by which region `origin` adds `members`.
    pub fn prepare_add(&self, origin: ReplicaId, members: Vec<Vec<u8>>) -> SetOp {
        SetOp::Add {
            dot_counter: self.seen(origin).saturating_add(1),
            members,
        }
    }

    /// The operation that removes `members`: it observes exactly the adds
    /// this replica has seen of those members. Absent members are dropped
    /// from the operation; `None` when none is present.
    pub fn prepare_remove(&self, members: Vec<Vec<u8>>) -> Option<SetOp> {
        let mut observed = VClock::new();
        let mut present = Vec::new();
        for member in members {
            let ctx = self.inner.contains(&member);
            if ctx.val && !present.contains(&member) {
                observed.merge(ctx.rm_clock);
                present.push(member);
            }
        }
        if present.is_empty() {
            return None;
        }
        Some(SetOp::Remove {
            observed: observed
                .iter()
                .map(|dot| (*dot.actor, dot.counter))
                .collect(),
            members: present,
        })
    }

    /// Applies an operation of region `origin`.
    ///
    /// An add whose dot was already seen changes nothing; an add that skips
    /// dots of its origin is refused with [`CoreError::DotGap`].
    pub fn apply(&mut self, origin: ReplicaId, op: &SetOp) -> Result<()> {
        match op {
            SetOp::Add {
                dot_counter,
                members,
            } => {
                let seen = self.seen(origin);
                if *dot_counter <= seen {
                    return Ok(());
                }
                if *dot_counter != seen + 1 {
                    return Err(CoreError::DotGap {
                        origin,
                        counter: *dot_counter,
                        seen,
                    });
                }
                self.inner.apply(OrOp::Add {
                    dot: Dot::new(origin, *dot_counter),
                    members: members.clone(),
                });
            }
            SetOp::Remove { observed, members } => {
                #[allow(unused_mut)]
                let mut clock: VClock<ReplicaId> = observed
                    .iter()
                    .filter(|(_, &counter)| counter > 0)
                    .map(|(&replica, &counter)| Dot::new(replica, counter))
                    .collect();
                // The deliberately wrong merge the simulation suite must
                // catch: the remove also deletes every add this replica has
                // seen, observed by the remover or not.
                #[cfg(feature = "wrong-merge")]
                clock.merge(self.inner.clock());
                self.inner.apply(OrOp::Rm {
                    clock,
                    members: members.clone(),
                });
            }
        }
        Ok(())
    }
}

/// What a client asks of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetCommand {
    /// Add members.
    Add(Vec<Vec<u8>>),
    /// Remove members: the adds of them this region has seen.
    Remove(Vec<Vec<u8>>),
    /// Read every member.
    Members,
    /// Test one member.
    Contains(Vec<u8>),
}

impl SetCommand {
    /// True for adds and removes.
    pub fn is_write(&self) -> bool {
        matches!(self, SetCommand::Add(_) | SetCommand::Remove(_))
    }

    /// A slice of the set for the members a command names, the whole set
    /// to list them.
    pub(crate) fn access(&self) -> Access<'_> {
        match self {
            SetCommand::Add(named) | SetCommand::Remove(named) => Access::Members(named),
            SetCommand::Contains(member) => Access::Members(std::slice::from_ref(member)),
            SetCommand::Members => Access::WholeSet,
        }
    }

    pub(crate) fn prepare(
        &self,
        set: &Set,
        origin: ReplicaId,
        limits: &Limits,
    ) -> Result<Option<SetOp>> {
        match self {
            SetCommand::Add(members) => Ok(Some(set.prepare_add(origin, members.clone()))),
            SetCommand::Remove(members) => {
                // What the client sent is validated even when none of it
                // is present (and nothing is logged).
                SetOp::Remove {
                    observed: BTreeMap::new(),
                    members: members.clone(),
                }
                .validate(limits)?;
                Ok(set.prepare_remove(members.clone()))
            }
            SetCommand::Members | SetCommand::Contains(_) => Ok(None),
        }
    }

    pub(crate) fn reply(&self, set: &Set) -> Reply {
        match self {
            SetCommand::Add(_) | SetCommand::Remove(_) => Reply::Done,
            SetCommand::Members => Reply::Members(set.members()),
            SetCommand::Contains(member) => Reply::Contains(set.contains(member)),
        }
    }
}

#[cfg(feature = "proto")]
mod wire {
    use concord_proto::v1 as pb;
    use pb::operation_result::Result as R;

    use super::SetCommand;
    use crate::command::{unexpected, written, Command, Outcome, Reply, Request};
    use crate::error::Result;

    impl From<pb::SetAddRequest> for Request {
        fn from(r: pb::SetAddRequest) -> Self {
            Request::new(r.keyspace, r.key, Command::Set(SetCommand::Add(r.members)))
        }
    }

    impl From<pb::SetRemoveRequest> for Request {
        fn from(r: pb::SetRemoveRequest) -> Self {
            Request::new(
                r.keyspace,
                r.key,
                Command::Set(SetCommand::Remove(r.members)),
            )
        }
    }

    impl From<pb::SetMembersRequest> for Request {
        fn from(r: pb::SetMembersRequest) -> Self {
            Request::new(r.keyspace, r.key, Command::Set(SetCommand::Members))
        }
    }

    impl From<pb::SetContainsRequest> for Request {
        fn from(r: pb::SetContainsRequest) -> Self {
            Request::new(
                r.keyspace,
                r.key,
                Command::Set(SetCommand::Contains(r.member)),
            )
        }
    }

    impl SetCommand {
        pub(crate) fn result(&self, outcome: Outcome) -> Result<R> {
            Ok(match (self, outcome.reply) {
                (SetCommand::Add(_), Reply::Done) => R::SetAdd(written(outcome.write)?),
                (SetCommand::Remove(_), Reply::Done) => R::SetRemove(written(outcome.write)?),
                (SetCommand::Members, Reply::Members(members)) => {
                    R::SetMembers(pb::SetMembersResponse { members })
                }
                (SetCommand::Contains(_), Reply::Contains(contains)) => {
                    R::SetContains(pb::SetContainsResponse { contains })
                }
                (_, reply) => return Err(unexpected(self, &reply)),
            })
        }
    }
}

impl SetOp {
    /// The members the operation adds or removes.
    pub fn members(&self) -> &[Vec<u8>] {
        match self {
            SetOp::Add { members, .. } | SetOp::Remove { members, .. } => members,
        }
    }

    /// Checks the members against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        let members = match self {
            SetOp::Add { members, .. } => members,
            SetOp::Remove { observed, members } => {
                limits.check(
                    "replicas in a remove context",
                    limits.max_observed_replicas,
                    observed.len(),
                )?;
                members
            }
        };
        if members.is_empty() {
            return Err(CoreError::invalid("set operation", "no members"));
        }
        limits.check(
            "members in one operation",
            limits.max_members_per_op,
            members.len(),
        )?;
        for member in members {
            limits.check(
                "set member length (bytes)",
                limits.max_member_bytes,
                member.len(),
            )?;
        }
        Ok(())
    }
}

impl Crdt for Set {
    fn merge(&mut self, other: &Self) {
        self.inner.merge(other.inner.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ReplicaId = ReplicaId(1);
    const B: ReplicaId = ReplicaId(2);

    fn add(set: &mut Set, origin: ReplicaId, member: &[u8]) -> SetOp {
        let op = set.prepare_add(origin, vec![member.to_vec()]);
        set.apply(origin, &op).unwrap();
        op
    }

    #[test]
    fn concurrent_add_survives_remove() {
        let mut a = Set::default();
        let mut b = Set::default();
        let add_a = add(&mut a, A, b"x");
        b.apply(A, &add_a).unwrap();
        // b removes x while a re-adds it concurrently.
        let rm_b = b.prepare_remove(vec![b"x".to_vec()]).unwrap();
        b.apply(B, &rm_b).unwrap();
        let add_a2 = add(&mut a, A, b"x");
        a.apply(B, &rm_b).unwrap();
        b.apply(A, &add_a2).unwrap();
        assert!(a.contains(b"x") && b.contains(b"x"));
        assert_eq!(a, b);
    }

    #[test]
    fn remove_deletes_observed_adds() {
        let mut a = Set::default();
        add(&mut a, A, b"x");
        add(&mut a, A, b"y");
        let rm = a
            .prepare_remove(vec![b"x".to_vec(), b"zz".to_vec()])
            .unwrap();
        assert!(matches!(&rm, SetOp::Remove { members, .. } if members == &vec![b"x".to_vec()]));
        a.apply(A, &rm).unwrap();
        assert_eq!(a.members(), vec![b"y".to_vec()]);
        assert!(a.prepare_remove(vec![b"zz".to_vec()]).is_none());
    }

    #[test]
    fn remove_arriving_before_the_add_it_observed_is_deferred() {
        let mut a = Set::default();
        let mut b = Set::default();
        let mut c = Set::default();
        let add_a = add(&mut a, A, b"x");
        b.apply(A, &add_a).unwrap();
        let rm_b = b.prepare_remove(vec![b"x".to_vec()]).unwrap();
        b.apply(B, &rm_b).unwrap();
        // c hears b's remove before a's add.
        c.apply(B, &rm_b).unwrap();
        c.apply(A, &add_a).unwrap();
        assert!(!c.contains(b"x"));
        assert_eq!(c.members(), b.members());
    }

    #[test]
    fn gaps_are_refused_and_duplicates_ignored() {
        let mut a = Set::default();
        let first = add(&mut a, A, b"x");
        let second = add(&mut a, A, b"y");
        let mut b = Set::default();
        assert!(matches!(
            b.apply(A, &second),
            Err(CoreError::DotGap {
                counter: 2,
                seen: 0,
                ..
            })
        ));
        assert!(b.is_empty());
        b.apply(A, &first).unwrap();
        b.apply(A, &first).unwrap();
        b.apply(A, &second).unwrap();
        assert_eq!(a, b);
    }
}
