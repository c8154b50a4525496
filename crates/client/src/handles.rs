//! Typed handles on one keyspace each, and the request builders and
//! response readers they share with [`crate::Batch`].

use std::pin::Pin;
use std::task::{Context, Poll};

use concord_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::types::{ack, entries, Entry, Page, RangeStart, RegisterValue, StreamId, WriteAck};
use crate::{Client, Retry};

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            client: Client,
            keyspace: String,
        }

        impl $name {
            pub(crate) fn new(client: Client, keyspace: &str) -> Self {
                $name {
                    client,
                    keyspace: keyspace.to_string(),
                }
            }

            /// The keyspace's name.
            pub fn keyspace(&self) -> &str {
                &self.keyspace
            }
        }
    };
}

handle!(
    /// A counter keyspace: keys hold PN-counters.
    Counter
);
handle!(
    /// A set keyspace: keys hold add-wins sets of byte strings.
    Set
);
handle!(
    /// A register keyspace: keys hold last-writer-wins byte strings.
    Register
);
handle!(
    /// A stream keyspace: keys hold append-only logs of entries.
    Stream
);

/// Runs one unary RPC: `$rpc` of the generated client with `$request`.
macro_rules! unary {
    ($client:expr, $retry:expr, $rpc:ident, $request:expr) => {{
        let request = $request;
        $client
            .call($retry, move |mut c| {
                let request = request.clone();
                async move { c.$rpc(request).await }
            })
            .await
    }};
}

impl Counter {
    /// Adds `by` (negative subtracts) to `key`; returns the value in this
    /// region right after. Not retried on failure (see the crate docs).
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64> {
        let r = unary!(
            self.client,
            Retry::Never,
            counter_increment,
            counter_incr(&self.keyspace, key, by)
        )?;
        Ok(r.value)
    }

    /// The value of `key`; 0 when never written.
    pub async fn get(&self, key: &str) -> Result<i64> {
        let r = unary!(
            self.client,
            Retry::Safe,
            counter_get,
            counter_get(&self.keyspace, key)
        )?;
        Ok(r.value)
    }
}

impl Set {
    /// Adds members to the set at `key`.
    pub async fn add<M: AsRef<[u8]>>(
        &self,
        key: &str,
        members: impl IntoIterator<Item = M>,
    ) -> Result<WriteAck> {
        let r = unary!(
            self.client,
            Retry::Never,
            set_add,
            set_add(&self.keyspace, key, members)
        )?;
        Ok(r.into())
    }

    /// Removes members (the adds of them this region has seen).
    pub async fn remove<M: AsRef<[u8]>>(
        &self,
        key: &str,
        members: impl IntoIterator<Item = M>,
    ) -> Result<WriteAck> {
        let r = unary!(
            self.client,
            Retry::Never,
            set_remove,
            set_remove(&self.keyspace, key, members)
        )?;
        Ok(r.into())
    }

    /// The members, sorted bytewise.
    pub async fn members(&self, key: &str) -> Result<Vec<Vec<u8>>> {
        let r = unary!(
            self.client,
            Retry::Safe,
            set_members,
            set_members(&self.keyspace, key)
        )?;
        Ok(r.members)
    }

    /// Whether `member` is in the set.
    pub async fn contains(&self, key: &str, member: impl AsRef<[u8]>) -> Result<bool> {
        let r = unary!(
            self.client,
            Retry::Safe,
            set_contains,
            set_contains(&self.keyspace, key, member)
        )?;
        Ok(r.contains)
    }
}

impl Register {
    /// Writes `value`; the write with the greatest (HLC, replica id) wins
    /// in every region.
    pub async fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<WriteAck> {
        let r = unary!(
            self.client,
            Retry::Never,
            register_set,
            register_set(&self.keyspace, key, value)
        )?;
        Ok(r.into())
    }

    /// The winning value; `None` when never written.
    pub async fn get(&self, key: &str) -> Result<Option<RegisterValue>> {
        let r = unary!(
            self.client,
            Retry::Safe,
            register_get,
            register_get(&self.keyspace, key)
        )?;
        Ok(register_value(r))
    }
}

impl Stream {
    /// Appends an entry with `fields` (name, value); returns its id.
    pub async fn append<N: Into<String>, V: AsRef<[u8]>>(
        &self,
        key: &str,
        fields: impl IntoIterator<Item = (N, V)>,
    ) -> Result<StreamId> {
        let r = unary!(
            self.client,
            Retry::Never,
            stream_append,
            stream_append(&self.keyspace, key, fields)
        )?;
        appended_id(r)
    }

    /// One page of entries: from `start` up to `to` (inclusive; `None`:
    /// the stream's end), at most `count` (0: the server's limit, 10,000
    /// by default), and whether more follow. The next page starts
    /// [`RangeStart::After`] the last id of this one.
    pub async fn page(
        &self,
        key: &str,
        start: RangeStart,
        to: Option<StreamId>,
        count: u32,
    ) -> Result<Page> {
        let r = unary!(self.client, Retry::Safe, stream_range, {
            let (from, after) = match start {
                RangeStart::Beginning => (None, None),
                RangeStart::From(id) => (Some(id), None),
                RangeStart::After(id) => (None, Some(id)),
            };
            let mut request = stream_range(&self.keyspace, key, from, to, count);
            request.after = after.map(Into::into);
            request
        })?;
        Ok(Page {
            entries: entries(r.entries)?,
            more: r.more,
        })
    }

    /// Entries with ids from `from` to `to` (both inclusive; `None` is the
    /// stream's start or end), at most `count` (0: the server's limit);
    /// [`Stream::page`] also says whether more follow.
    pub async fn range(
        &self,
        key: &str,
        from: Option<StreamId>,
        to: Option<StreamId>,
        count: u32,
    ) -> Result<Vec<Entry>> {
        let r = unary!(
            self.client,
            Retry::Safe,
            stream_range,
            stream_range(&self.keyspace, key, from, to, count)
        )?;
        entries(r.entries)
    }

    /// Removes, in every region, the entries with ids below `before`.
    pub async fn trim(&self, key: &str, before: StreamId) -> Result<WriteAck> {
        let r = unary!(
            self.client,
            Retry::Never,
            stream_trim,
            stream_trim(&self.keyspace, key, before)
        )?;
        Ok(r.into())
    }

    /// Follows the stream: with `after`, the entries already there with
    /// ids above it first; then every new entry as it is appended. The
    /// subscription ends with an error when the node goes away or the
    /// subscriber falls too far behind; resubscribe after the last id
    /// received.
    pub async fn subscribe(&self, key: &str, after: Option<StreamId>) -> Result<Subscription> {
        let request = pb::StreamSubscribeRequest {
            keyspace: self.keyspace.clone(),
            key: key.to_string(),
            after: after.map(Into::into),
        };
        let inner = unary!(self.client, Retry::Safe, stream_subscribe, request)?;
        Ok(Subscription { inner })
    }
}

/// Entries of a stream as they arrive; see [`Stream::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    inner: tonic::Streaming<pb::StreamEntry>,
}

impl tokio_stream::Stream for Subscription {
    type Item = Result<Entry>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|next| {
            next.map(|r| match r {
                Ok(entry) => Entry::try_from(entry),
                Err(status) => Err(Error::Status(status)),
            })
        })
    }
}

// The requests, built in one place for the handles and the batch.

pub(crate) fn counter_incr(ks: &str, key: &str, by: i64) -> pb::CounterIncrementRequest {
    pb::CounterIncrementRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        delta: by,
    }
}

pub(crate) fn counter_get(ks: &str, key: &str) -> pb::CounterGetRequest {
    pb::CounterGetRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
    }
}

fn byte_vecs<M: AsRef<[u8]>>(members: impl IntoIterator<Item = M>) -> Vec<Vec<u8>> {
    members.into_iter().map(|m| m.as_ref().to_vec()).collect()
}

pub(crate) fn set_add<M: AsRef<[u8]>>(
    ks: &str,
    key: &str,
    members: impl IntoIterator<Item = M>,
) -> pb::SetAddRequest {
    pb::SetAddRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        members: byte_vecs(members),
    }
}

pub(crate) fn set_remove<M: AsRef<[u8]>>(
    ks: &str,
    key: &str,
    members: impl IntoIterator<Item = M>,
) -> pb::SetRemoveRequest {
    pb::SetRemoveRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        members: byte_vecs(members),
    }
}

pub(crate) fn set_members(ks: &str, key: &str) -> pb::SetMembersRequest {
    pb::SetMembersRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
    }
}

pub(crate) fn set_contains(
    ks: &str,
    key: &str,
    member: impl AsRef<[u8]>,
) -> pb::SetContainsRequest {
    pb::SetContainsRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        member: member.as_ref().to_vec(),
    }
}

pub(crate) fn register_set(ks: &str, key: &str, value: impl AsRef<[u8]>) -> pb::RegisterSetRequest {
    pb::RegisterSetRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        value: value.as_ref().to_vec(),
    }
}

pub(crate) fn register_get(ks: &str, key: &str) -> pb::RegisterGetRequest {
    pb::RegisterGetRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
    }
}

pub(crate) fn stream_append<N: Into<String>, V: AsRef<[u8]>>(
    ks: &str,
    key: &str,
    fields: impl IntoIterator<Item = (N, V)>,
) -> pb::StreamAppendRequest {
    pb::StreamAppendRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        fields: fields
            .into_iter()
            .map(|(name, value)| pb::StreamField {
                name: name.into(),
                value: value.as_ref().to_vec(),
            })
            .collect(),
    }
}

pub(crate) fn stream_range(
    ks: &str,
    key: &str,
    from: Option<StreamId>,
    to: Option<StreamId>,
    count: u32,
) -> pb::StreamRangeRequest {
    pb::StreamRangeRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        from: from.map(Into::into),
        to: to.map(Into::into),
        count,
        after: None,
    }
}

pub(crate) fn stream_trim(ks: &str, key: &str, before: StreamId) -> pb::StreamTrimRequest {
    pb::StreamTrimRequest {
        keyspace: ks.to_string(),
        key: key.to_string(),
        before: Some(before.into()),
    }
}

// The responses, read in one place.

pub(crate) fn register_value(r: pb::RegisterGetResponse) -> Option<RegisterValue> {
    r.found.then_some(RegisterValue {
        value: r.value,
        hlc: r.hlc,
        replica: r.replica,
    })
}

pub(crate) fn appended_id(r: pb::StreamAppendResponse) -> Result<StreamId> {
    ack(r.write)?;
    r.id.map(Into::into)
        .ok_or_else(|| Error::Protocol("an append was acknowledged without its id".into()))
}
