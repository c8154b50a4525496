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
    /// region `origin`. Refuses an amount that would overflow the origin's
    /// 64-bit running total.
    pub fn prepare_add(&self, origin: ReplicaId, amount: i64) -> Result<CounterOp> {
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
        Ok(Reply::Counter(counter.value_i64()?))
    }
}

impl Counter {
    /// The value as the API gives it: refused with
    /// [`CoreError::OutOfRange`] when the regions' increments together
    /// leave the signed 64-bit range.
    pub fn value_i64(&self) -> Result<i64> {
        let value = self.value();
        i64::try_from(value).map_err(|_| CoreError::OutOfRange {
            what: "counter value",
            value,
        })
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
        let op = c.prepare_add(r, i64::MAX).unwrap();
        c.apply(r, &op);
        let op = c.prepare_add(r, i64::MAX).unwrap();
        c.apply(r, &op);
        assert_eq!(c.value(), 2 * i128::from(i64::MAX));
        assert!(matches!(
            c.prepare_add(r, 2),
            Err(CoreError::CounterOverflow { .. })
        ));
        let op = c.prepare_add(r, i64::MIN).unwrap();
        c.apply(r, &op);
        assert_eq!(c.value(), 2 * i128::from(i64::MAX) + i128::from(i64::MIN));
    }
}
