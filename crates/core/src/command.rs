//! What a client asks of one key, and what it gets back: the one vocabulary
//! of an operation, from the request to the store.
//!
//! Each type's module owns its commands ([`CounterCommand`],
//! [`SetCommand`], [`RegisterCommand`], [`StreamCommand`]): which of them
//! write, how a write becomes the [`Op`] that the region logs, applies and
//! replicates (`prepare`), what every command answers (`reply`), and, with
//! the `proto` feature, how its request and result travel on the wire. The
//! enum [`Command`] only dispatches to them.
//!
//! The store runs every command the same way, guided by its [`Access`]: it
//! loads what the command needs of the value, prepares and applies a write
//! in the same commit, and takes the reply from the value afterwards. A
//! reply that cannot be given (a counter leaving the 64-bit range) fails
//! the command before anything of it is applied or logged.
//!
//! See "Adding an operation" in `docs/ARCHITECTURE.md`.

use crate::crdt::{
    CounterCommand, CrdtType, RegisterCommand, SetCommand, StreamCommand, StreamEntry, StreamId,
    Value,
};
use crate::error::{CoreError, Result};
use crate::limits::Limits;
use crate::{Hlc, Marker, Op, ReplicaId};

/// What a client asks of one key: one command of the key's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A counter command.
    Counter(CounterCommand),
    /// A set command.
    Set(SetCommand),
    /// A register command.
    Register(RegisterCommand),
    /// A stream command.
    Stream(StreamCommand),
}

/// A command on a key of a keyspace, as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Keyspace name, or a conflict alias (`name#type`).
    pub keyspace: String,
    /// The key.
    pub key: String,
    /// What to do.
    pub command: Command,
}

/// What the store must load of a key's value to run a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// The key's value record: a counter, a register, a stream's trim
    /// watermark (without entries).
    Value,
    /// A set's header and the members named (a slice of the set; see
    /// [`crate::crdt::set`]).
    Members(&'a [Vec<u8>]),
    /// The whole set.
    WholeSet,
    /// A stream's watermark and its entries with `from <= id <= to` at or
    /// above the watermark, at most `count`.
    Range {
        /// First id.
        from: StreamId,
        /// Last id.
        to: StreamId,
        /// Most entries.
        count: usize,
    },
}

/// A write's place in the region's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Sequence number in this region's log; 0 when the write changed
    /// nothing and was not logged.
    pub seq: u64,
    /// The write's timestamp; for a stream append, its entry id's. Zero
    /// when `seq` is: a write that changed nothing has no place in the
    /// order of writes (and a timestamp of it would survive no crash).
    pub hlc: Hlc,
}

/// What a command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A write that answers nothing more than its stamp.
    Done,
    /// A counter's value (after the command, for an increment).
    Counter(i64),
    /// A set's members, sorted bytewise.
    Members(Vec<Vec<u8>>),
    /// Whether a set holds a member.
    Contains(bool),
    /// A register's value and the marker of the write that set it; `None`
    /// before the first write.
    Register(Option<(Vec<u8>, Marker)>),
    /// The id of an appended stream entry.
    Appended(StreamId),
    /// Stream entries, in id order, and whether more of the range follow.
    Entries {
        /// The entries.
        entries: Vec<StreamEntry>,
        /// True when the range held more than were read.
        more: bool,
    },
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// For a write, where it went in the log.
    pub write: Option<Stamp>,
    /// Its answer.
    pub reply: Reply,
}

impl Command {
    /// The type of keyspace the command needs.
    pub fn crdt_type(&self) -> CrdtType {
        match self {
            Command::Counter(_) => CrdtType::Counter,
            Command::Set(_) => CrdtType::Set,
            Command::Register(_) => CrdtType::Register,
            Command::Stream(_) => CrdtType::Stream,
        }
    }

    /// True when the command may change the value (and is then stamped,
    /// logged and replicated).
    pub fn is_write(&self) -> bool {
        match self {
            Command::Counter(c) => c.is_write(),
            Command::Set(c) => c.is_write(),
            Command::Register(c) => c.is_write(),
            Command::Stream(c) => c.is_write(),
        }
    }

    /// What the store must load to run the command.
    pub fn access(&self) -> Access<'_> {
        match self {
            Command::Set(c) => c.access(),
            Command::Stream(c) => c.access(),
            Command::Counter(_) | Command::Register(_) => Access::Value,
        }
    }

    /// The operation by which region `origin`, at local time `now`, carries
    /// out this write on `value`, validated against `limits`; `None` for a
    /// read, or a write that would change nothing (a remove of absent
    /// members).
    pub fn prepare(
        &self,
        value: &Value,
        origin: ReplicaId,
        now: Hlc,
        limits: &Limits,
    ) -> Result<Option<Op>> {
        let op = match (self, value) {
            (Command::Counter(c), Value::Counter(v)) => c.prepare(v, origin)?.map(Op::Counter),
            (Command::Set(c), Value::Set(v)) => c.prepare(v, origin, limits)?.map(Op::Set),
            (Command::Register(c), Value::Register(_)) => c.prepare().map(Op::Register),
            (Command::Stream(c), Value::Stream(v)) => c.prepare(v, now)?.map(Op::Stream),
            (c, v) => return Err(mismatch(c, v)),
        };
        if let Some(op) = &op {
            op.validate(limits)?;
        }
        Ok(op)
    }

    /// The answer, from the value after the command (what [`Access`]
    /// loaded of it) and, for a write, its stamp; `origin` is the region
    /// that ran it.
    pub fn reply(&self, value: &Value, origin: ReplicaId, stamp: Option<Stamp>) -> Result<Reply> {
        match (self, value) {
            (Command::Counter(c), Value::Counter(v)) => c.reply(v),
            (Command::Set(c), Value::Set(v)) => Ok(c.reply(v)),
            (Command::Register(c), Value::Register(v)) => Ok(c.reply(v)),
            (Command::Stream(c), Value::Stream(v)) => c.reply(v, origin, stamp),
            (c, v) => Err(mismatch(c, v)),
        }
    }
}

fn mismatch(command: &Command, value: &Value) -> CoreError {
    CoreError::TypeMismatch {
        expected: value.crdt_type(),
        found: command.crdt_type(),
    }
}

impl Request {
    /// A request for `command` on `key` of `keyspace`.
    pub fn new(keyspace: impl Into<String>, key: impl Into<String>, command: Command) -> Self {
        Request {
            keyspace: keyspace.into(),
            key: key.into(),
            command,
        }
    }

    /// Checks what can be checked without the store (a keyspace named,
    /// the key's size) and bounds what the request may read by `limits`
    /// (a range's count of 0 asks for the most allowed).
    pub fn checked(mut self, limits: &Limits) -> Result<Request> {
        if self.keyspace.is_empty() {
            return Err(CoreError::invalid("keyspace name", "it is empty"));
        }
        limits.check_key(&self.key)?;
        if let Command::Stream(StreamCommand::Range { count, .. }) = &mut self.command {
            *count = match *count {
                0 => limits.max_range_entries,
                n => n.min(limits.max_range_entries),
            };
        }
        Ok(self)
    }
}

#[cfg(feature = "proto")]
mod wire {
    use concord_proto::v1 as pb;

    use super::{Command, Outcome, Reply, Request, Stamp};
    use crate::error::{CoreError, Result};

    impl From<Stamp> for pb::WriteResponse {
        fn from(s: Stamp) -> Self {
            pb::WriteResponse {
                hlc: s.hlc.as_u64(),
                seq: s.seq,
            }
        }
    }

    impl TryFrom<pb::Operation> for Request {
        type Error = CoreError;

        /// One operation of a batch; the same request as its unary RPC's.
        fn try_from(o: pb::Operation) -> Result<Self> {
            use pb::operation::Op;
            Ok(match o.op {
                None => {
                    return Err(CoreError::invalid(
                        "operation",
                        "an operation has no kind set",
                    ))
                }
                Some(Op::CounterIncrement(r)) => r.into(),
                Some(Op::CounterGet(r)) => r.into(),
                Some(Op::SetAdd(r)) => r.into(),
                Some(Op::SetRemove(r)) => r.into(),
                Some(Op::SetMembers(r)) => r.into(),
                Some(Op::SetContains(r)) => r.into(),
                Some(Op::RegisterSet(r)) => r.into(),
                Some(Op::RegisterGet(r)) => r.into(),
                Some(Op::StreamAppend(r)) => r.into(),
                Some(Op::StreamRange(r)) => r.try_into()?,
                Some(Op::StreamTrim(r)) => r.try_into()?,
            })
        }
    }

    impl Outcome {
        /// The wire result of `command`'s outcome.
        pub fn into_proto(self, command: &Command) -> Result<pb::OperationResult> {
            let result = match command {
                Command::Counter(c) => c.result(self)?,
                Command::Set(c) => c.result(self)?,
                Command::Register(c) => c.result(self)?,
                Command::Stream(c) => c.result(self)?,
            };
            Ok(pb::OperationResult {
                result: Some(result),
            })
        }
    }

    /// The error for a reply that does not belong to its command.
    pub(crate) fn unexpected(command: &impl std::fmt::Debug, reply: &Reply) -> CoreError {
        CoreError::Bug(format!("reply {reply:?} does not answer {command:?}"))
    }

    /// The wire stamp of a write's outcome.
    pub(crate) fn written(write: Option<Stamp>) -> Result<pb::WriteResponse> {
        write
            .map(Into::into)
            .ok_or_else(|| CoreError::Bug("a write's outcome has no stamp".into()))
    }
}

#[cfg(feature = "proto")]
pub(crate) use wire::{unexpected, written};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{CounterCommand, Field, SetCommand};

    #[test]
    fn a_request_is_checked_and_its_range_bounded() {
        let limits = Limits::default();
        let range = |count| {
            Request::new(
                "ev",
                "k",
                Command::Stream(StreamCommand::Range {
                    from: StreamId::MIN,
                    to: StreamId::MAX,
                    count,
                }),
            )
        };
        let bounded = |count| match range(count).checked(&limits).expect("valid").command {
            Command::Stream(StreamCommand::Range { count, .. }) => count,
            other => panic!("{other:?}"),
        };
        assert_eq!(bounded(0), limits.max_range_entries);
        assert_eq!(bounded(5), 5);
        assert_eq!(bounded(usize::MAX), limits.max_range_entries);
        let unnamed = Request::new("", "k", Command::Counter(CounterCommand::Get));
        assert!(matches!(
            unnamed.checked(&limits),
            Err(CoreError::Invalid { .. })
        ));
        let long = Request::new(
            "c",
            "k".repeat(limits.max_key_bytes + 1),
            Command::Counter(CounterCommand::Get),
        );
        assert!(matches!(
            long.checked(&limits),
            Err(CoreError::LimitExceeded { .. })
        ));
    }

    #[test]
    fn a_command_refuses_a_value_of_another_type() {
        let add = Command::Set(SetCommand::Add(vec![b"a".to_vec()]));
        let counter = Value::empty(CrdtType::Counter);
        let err = add
            .prepare(&counter, ReplicaId(1), Hlc::ZERO, &Limits::default())
            .expect_err("mismatch");
        assert!(matches!(
            err,
            CoreError::TypeMismatch {
                expected: CrdtType::Counter,
                found: CrdtType::Set
            }
        ));
        assert!(add.reply(&counter, ReplicaId(1), None).is_err());
    }

    #[test]
    fn a_counter_beyond_i64_reads_clamped_not_wrapped() {
        let mut value = Value::empty(CrdtType::Counter);
        let add = Command::Counter(CounterCommand::Add(i64::MAX));
        // Made concurrently in two regions, each in range where it was made.
        let ops: Vec<_> = [ReplicaId(1), ReplicaId(2)]
            .into_iter()
            .map(|origin| {
                let empty = Value::empty(CrdtType::Counter);
                let op = add
                    .prepare(&empty, origin, Hlc::ZERO, &Limits::default())
                    .expect("prepare")
                    .expect("a write");
                (origin, op)
            })
            .collect();
        for (origin, op) in &ops {
            value.apply(*origin, Hlc::ZERO, op).expect("apply");
        }
        let get = Command::Counter(CounterCommand::Get);
        assert_eq!(
            get.reply(&value, ReplicaId(1), None).expect("a reply"),
            Reply::Counter(i64::MAX)
        );
        // A further increment here is refused before it is made.
        assert!(matches!(
            add.prepare(&value, ReplicaId(1), Hlc::ZERO, &Limits::default()),
            Err(CoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn an_append_answers_its_id_from_its_stamp() {
        let append = Command::Stream(StreamCommand::Append(vec![Field::new("f", "v")]));
        let stream = Value::empty(CrdtType::Stream);
        let hlc = Hlc::from_u64(1 << 30);
        let stamp = Stamp { seq: 3, hlc };
        assert_eq!(
            append
                .reply(&stream, ReplicaId(7), Some(stamp))
                .expect("reply"),
            Reply::Appended(StreamId::new(hlc, ReplicaId(7)))
        );
        assert!(matches!(
            append.reply(&stream, ReplicaId(7), None),
            Err(CoreError::Bug(_))
        ));
    }
}
