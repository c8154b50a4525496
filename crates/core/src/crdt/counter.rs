//! PN-counter: the value is the sum of every increment and decrement made in
//! every region.
//!
//! Built on crdts' `PNCounter`: each region keeps two running totals (its
//! increments and its decrements) and the value is the sum of all regions'
//! increment totals minus the sum of their decrement totals. An operation
//! carries the origin's new running total, so it is idempotent and
//! order-insensitive; merging takes the maximum of each total.

use crdts::pncounter::{Dir, Op as PnOp};
use crdts::{CmRDT, CvRDT, Dot, PNCounter};
use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::command::Reply;
use crate::error::{CoreError, Result};
use crate::ReplicaId;

/// A PN-counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    inner: PNCounter<ReplicaId>,
}

/// Which running total of its origin a [`CounterOp`] sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// The origin's total of increments.
    Increment,
    /// The origin's total of decrements.
    Decrement,
}

/// Sets the origin's running total in one direction to `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterOp {
    /// Which total.
    pub direction: Direction,
    /// The origin's new total.
    pub total: u64,
}

impl Counter {
    /// The counter's value: increments minus decrements over all regions.
    /// Each region's totals fit 64 bits, so the sum fits 128 bits for any
    /// realistic number of regions; it saturates beyond.
    pub fn value(&self) -> i128 {
        let big = self.inner.read();
        i128::try_from(&big).unwrap_or_else(|_| {
            if big.to_string().starts_with('-') {
                i128::MIN
            } else {
                i128::MAX
            }
        })
    }

    /// The operation that adds `amount` (negative: subtracts) on behalf of
    /// region `origin`. Refuses, before anything is applied or logged, an
    /// amount that would take the value this region sees out of the signed
    /// 64-bit range ([`CoreError::OutOfRange`]), unless it brings a value
    /// other regions pushed out of the range closer to it; and one that
    /// would overflow the origin's 64-bit running total.
    pub fn prepare_add(&self, origin: ReplicaId, amount: i64) -> Result<CounterOp> {
        let before = self.value();
        let after = before.saturating_add(i128::from(amount));
        let in_range = i128::from(i64::MIN)..=i128::from(i64::MAX);
        let closer = (before > i128::from(i64::MAX) && after < before)
            || (before < i128::from(i64::MIN) && after > before);
        if !in_range.contains(&after) && !closer {
            return Err(CoreError::OutOfRange {
                what: "counter value after the increment",
                value: after,
            });
        }
        let (direction, dir, steps) = if amount >= 0 {
            (Direction::Increment, Dir::Pos, amount.unsigned_abs())
        } else {
            (Direction::Decrement, Dir::Neg, amount.unsigned_abs())
        };
        let current = self.total(origin, dir);
        let total = current
            .checked_add(steps)
            .ok_or(CoreError::CounterOverflow { origin })?;
        Ok(CounterOp { direction, total })
    }

    /// The running total of `origin` in one direction.
    fn total(&self, origin: ReplicaId, dir: Dir) -> u64 {
        // Asking for zero more steps yields the current total without
        // exposing crdts' private state.
        match dir {
            Dir::Pos => self.inner.inc_many(origin, 0).dot.counter,
            Dir::Neg => self.inner.dec_many(origin, 0).dot.counter,
        }
    }

    /// Applies an operation of region `origin`. A total at or below the
    /// known one changes nothing.
    pub fn apply(&mut self, origin: ReplicaId, op: &CounterOp) {
        let dir = match op.direction {
            Direction::Increment => Dir::Pos,
            Direction::Decrement => Dir::Neg,
        };
        self.inner.apply(PnOp {
            dot: Dot::new(origin, op.total),
            dir,
        });
    }
}

/// What a client asks of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterCommand {
    /// Add a signed amount (negative subtracts); answers the value after.
    Add(i64),
    /// Read the value.
    Get,
}

impl CounterCommand {
    /// True for [`CounterCommand::Add`].
    pub fn is_write(&self) -> bool {
        matches!(self, CounterCommand::Add(_))
    }

    pub(crate) fn prepare(
        &self,
        counter: &Counter,
        origin: ReplicaId,
    ) -> Result<Option<CounterOp>> {
        match *self {
            CounterCommand::Add(n) => counter.prepare_add(origin, n).map(Some),
            CounterCommand::Get => Ok(None),
        }
    }

    pub(crate) fn reply(&self, counter: &Counter) -> Result<Reply> {
        Ok(Reply::Counter(counter.value_i64()))
    }
}

impl Counter {
    /// The value as the API gives it, in the signed 64-bit range: when
    /// increments made concurrently in several regions together leave it
    /// (each was in range where it was made), the value reads as
    /// `i64::MAX` or `i64::MIN`, the same in every region, until
    /// decrements bring it back; the exact sum is kept ([`Counter::value`]).
    pub fn value_i64(&self) -> i64 {
        let value = self.value();
        i64::try_from(value).unwrap_or(if value > 0 { i64::MAX } else { i64::MIN })
    }
}

#[cfg(feature = "proto")]
mod wire {
    use concord_proto::v1 as pb;
    use pb::operation_result::Result as R;

    use super::CounterCommand;
    use crate::command::{unexpected, written, Command, Outcome, Reply, Request};
    use crate::error::Result;

    impl From<pb::CounterIncrementRequest> for Request {
        fn from(r: pb::CounterIncrementRequest) -> Self {
            Request::new(
                r.keyspace,
                r.key,
                Command::Counter(CounterCommand::Add(r.delta)),
            )
        }
    }

    impl From<pb::CounterGetRequest> for Request {
        fn from(r: pb::CounterGetRequest) -> Self {
            Request::new(r.keyspace, r.key, Command::Counter(CounterCommand::Get))
        }
    }

    impl CounterCommand {
        pub(crate) fn result(&self, outcome: Outcome) -> Result<R> {
            Ok(match (self, outcome.reply) {
                (CounterCommand::Add(_), Reply::Counter(value)) => {
                    R::CounterIncrement(pb::CounterIncrementResponse {
                        value,
                        write: Some(written(outcome.write)?),
                    })
                }
                (CounterCommand::Get, Reply::Counter(value)) => {
                    R::CounterGet(pb::CounterGetResponse { value })
                }
                (_, reply) => return Err(unexpected(self, &reply)),
            })
        }
    }
}

impl Crdt for Counter {
    fn merge(&mut self, other: &Self) {
        self.inner.merge(other.inner.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_and_decrements_from_two_regions() {
        let (a, b) = (ReplicaId(1), ReplicaId(2));
        let mut ca = Counter::default();
        let mut cb = Counter::default();
        let op1 = ca.prepare_add(a, 5).unwrap();
        ca.apply(a, &op1);
        let op2 = cb.prepare_add(b, -7).unwrap();
        cb.apply(b, &op2);
        let op3 = ca.prepare_add(a, 2).unwrap();
        ca.apply(a, &op3);
        // Deliver b's op to a twice and a's ops to b out of order.
        ca.apply(b, &op2);
        ca.apply(b, &op2);
        cb.apply(a, &op3);
        cb.apply(a, &op1);
        assert_eq!(ca.value(), 0);
        assert_eq!(ca, cb);
    }

    #[test]
    fn overflowing_total_is_refused() {
        let r = ReplicaId(1);
        let mut c = Counter::default();
        // Up and down, staying in range, until the increments' running
        // total is near the top of u64.
        for amount in [i64::MAX, -i64::MAX, i64::MAX, -i64::MAX] {
            let op = c.prepare_add(r, amount).unwrap();
            c.apply(r, &op);
        }
        assert_eq!(c.value(), 0);
        assert!(matches!(
            c.prepare_add(r, 2),
            Err(CoreError::CounterOverflow { .. })
        ));
    }

    #[test]
    fn a_local_write_never_leaves_the_range_and_merged_ones_read_clamped() {
        let (a, b) = (ReplicaId(1), ReplicaId(2));
        let mut c = Counter::default();
        let op = c.prepare_add(a, i64::MAX).unwrap();
        c.apply(a, &op);
        // Past the top, here: refused before anything is applied.
        let before = c.clone();
        assert!(matches!(
            c.prepare_add(a, 1),
            Err(CoreError::OutOfRange { .. })
        ));
        assert_eq!(c, before);
        // The same increment made concurrently elsewhere, in range there.
        let mut elsewhere = Counter::default();
        let theirs = elsewhere.prepare_add(b, i64::MAX).unwrap();
        c.apply(b, &theirs);
        elsewhere.apply(b, &theirs);
        elsewhere.apply(a, &op);
        assert_eq!(c, elsewhere);
        assert_eq!(c.value(), 2 * i128::from(i64::MAX));
        assert_eq!(c.value_i64(), i64::MAX, "read clamped, in every region");
        assert_eq!(elsewhere.value_i64(), i64::MAX);
        // Further away: refused; back towards the range: taken, even while
        // still outside it.
        assert!(c.prepare_add(a, 1).is_err());
        let down = c.prepare_add(a, -10).unwrap();
        c.apply(a, &down);
        assert_eq!(c.value(), 2 * i128::from(i64::MAX) - 10);
        let back = c.prepare_add(a, i64::MIN).unwrap();
        c.apply(a, &back);
        assert_eq!(c.value_i64(), i64::MAX - 11);
        // The same below the bottom.
        let mut low = Counter::default();
        for r in [a, b] {
            let op = Counter::default().prepare_add(r, i64::MIN).unwrap();
            low.apply(r, &op);
        }
        assert_eq!(low.value_i64(), i64::MIN);
        assert!(low.prepare_add(a, -1).is_err());
        assert!(low.prepare_add(a, 1).is_ok());
    }
}
