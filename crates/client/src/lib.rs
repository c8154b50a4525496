//! The Rust client SDK of concord.
//!
//! A [`Client`] talks to one region at a time and fails over to the next
//! endpoint when the region is unavailable. Keyspaces are reached through
//! typed handles ([`Counter`], [`Set`], [`Register`], [`Stream`]); many
//! operations go in one atomic round trip with [`Batch`].
//!
//! ```no_run
//! use concord_client::{Client, KeyspaceType};
//! use tokio_stream::StreamExt;
//!
//! # async fn demo() -> concord_client::Result<()> {
//! let client = Client::connect(["http://127.0.0.1:7101", "http://127.0.0.1:7102"]).await?;
//! client.create_keyspace("hits", KeyspaceType::Counter).await?;
//! client.create_keyspace("events", KeyspaceType::Stream).await?;
//!
//! let hits = client.counter("hits");
//! hits.incr("home", 1).await?;
//! assert!(hits.get("home").await? >= 1);
//!
//! let events = client.stream("events");
//! let id = events.append("orders", [("sku", "A-1"), ("qty", "2")]).await?;
//! let mut live = events.subscribe("orders", Some(id)).await?;
//! events.append("orders", [("sku", "B-7")]).await?;
//! let next = live.next().await.expect("an entry")?;
//! assert_eq!(next.fields[0].0, "sku");
//!
//! let results = client
//!     .batch()
//!     .counter_incr("hits", "home", 1)
//!     .counter_get("hits", "home")
//!     .run()
//!     .await?;
//! println!("{results:?}");
//! # Ok(())
//! # }
//! ```
//!
//! # Failures, timeouts and retries
//!
//! Every call has a deadline ([`ClientOptions::request_timeout`]). When a
//! region is unavailable (UNAVAILABLE, or no answer before the deadline):
//!
//! - reads, keyspace creation (idempotent) and subscription openings are
//!   retried on the next endpoints, each tried at most once per call;
//! - writes are **never** retried: the error is
//!   [`Error::WriteOutcomeUnknown`], because the region may have applied
//!   the write before it went away, and repeating it could count an
//!   increment twice. The next call goes to the next endpoint, so retrying
//!   is the caller's explicit choice.
//!
//! Any other error (unknown keyspace, wrong type, a limit) is returned at
//! once as [`Error::Status`].

mod batch;
mod error;
mod handles;
mod types;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use concord_proto::v1 as pb;
use concord_proto::v1::concord_client::ConcordClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response};

pub use batch::{Batch, BatchResult};
pub use error::{Error, Result};
pub use handles::{Counter, Register, Set, Stream, Subscription};
pub use types::{
    Entry, Health, KeyspaceConflict, KeyspaceInfo, KeyspaceType, Page, RangeStart, RegisterValue,
    StreamId, WriteAck,
};

/// The generated protobuf types, for what the SDK passes through as is
/// (the status report).
pub use concord_proto::v1 as proto;

/// Most bytes of one message the client sends or accepts; the node's
/// limit.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most endpoints one client accepts.
pub const MAX_ENDPOINTS: usize = 64;

/// How a client connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Longest wait for a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// Longest wait for a call's answer (for a subscription, for it to
    /// open).
    pub request_timeout: Duration,
    /// Interval of HTTP/2 pings that detect a dead connection.
    pub keepalive: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(20),
        }
    }
}

/// Whether a call may be repeated on another endpoint after a failure
/// whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads and idempotent calls: fail over and repeat.
    Safe,
    /// Writes: fail over for the next call, but return the error.
    Never,
}

/// A connection to a concord cluster through a list of region endpoints.
/// Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<(String, Channel)>,
    current: AtomicUsize,
    options: ClientOptions,
}

impl Client {
    /// Connects to the first reachable of `endpoints` (URLs such as
    /// `http://127.0.0.1:7101`), with default options. The others are
    /// used, in order, when it becomes unavailable.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::connect_with(endpoints, ClientOptions::default()).await
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with<I, S>(endpoints: I, options: ClientOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let urls: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if urls.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoint given".into(),
            });
        }
        if urls.len() > MAX_ENDPOINTS {
            return Err(Error::InvalidEndpoint {
                endpoint: format!("{} endpoints", urls.len()),
                reason: format!("at most {MAX_ENDPOINTS} are supported"),
            });
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::InvalidEndpoint {
                    endpoint: url.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(options.keepalive)
                .keep_alive_timeout(options.keepalive)
                .keep_alive_while_idle(true);
            match endpoint.uri().scheme_str() {
                Some("http") => {}
                // Never a plaintext connection to an address that asks
                // for TLS.
                Some("https") => {
                    return Err(Error::InvalidEndpoint {
                        endpoint: url,
                        reason: "TLS is not supported yet: use http://".into(),
                    })
                }
                _ => {
                    return Err(Error::InvalidEndpoint {
                        endpoint: url,
                        reason: "must start with http://".into(),
                    })
                }
            }
            endpoints.push((url, endpoint));
        }
        // Find a reachable endpoint now, so a wrong address fails here and
        // not at the first call.
        let mut last = String::new();
        let mut first = None;
        for (i, (url, endpoint)) in endpoints.iter().enumerate() {
            match endpoint.connect().await {
                Ok(channel) => {
                    first = Some((i, channel));
                    break;
                }
                Err(e) => {
                    tracing::debug!(endpoint = %url, error = %e, "endpoint unreachable");
                    last = format!("{url}: {}", concord_proto::error_chain(&e));
                }
            }
        }
        let Some((current, channel)) = first else {
            return Err(Error::Unavailable {
                tried: endpoints.len(),
                last,
            });
        };
        let endpoints = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, (url, endpoint))| {
                let channel = if i == current {
                    channel.clone()
                } else {
                    endpoint.connect_lazy()
                };
                (url, channel)
            })
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                current: AtomicUsize::new(current),
                options,
            }),
        })
    }

    /// The endpoint the next call goes to.
    pub fn current_endpoint(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed);
        &self.inner.endpoints[i % self.inner.endpoints.len()].0
    }

    /// Creates a keyspace; returns it and whether this call created it.
    /// Idempotent for the same type; FAILED_PRECONDITION when the name
    /// exists with another type.
    pub async fn create_keyspace(
        &self,
        name: &str,
        ty: KeyspaceType,
    ) -> Result<(KeyspaceInfo, bool)> {
        let request = pb::CreateKeyspaceRequest {
            name: name.to_string(),
            r#type: ty.to_proto().into(),
        };
        let r = self
            .call(Retry::Safe, move |mut c| {
                let request = request.clone();
                async move { c.create_keyspace(request).await }
            })
            .await?;
        let info = r
            .keyspace
            .ok_or_else(|| Error::Protocol("created keyspace missing".into()))?;
        Ok((info.try_into()?, r.created))
    }

    /// Every keyspace, sorted by name.
    pub async fn list_keyspaces(&self) -> Result<Vec<KeyspaceInfo>> {
        let r = self
            .call(Retry::Safe, |mut c| async move {
                c.list_keyspaces(pb::ListKeyspacesRequest {}).await
            })
            .await?;
        r.keyspaces.into_iter().map(TryInto::try_into).collect()
    }

    /// One keyspace, by name or conflict alias.
    pub async fn describe_keyspace(&self, name: &str) -> Result<KeyspaceInfo> {
        let request = pb::DescribeKeyspaceRequest {
            name: name.to_string(),
        };
        self.call(Retry::Safe, move |mut c| {
            let request = request.clone();
            async move { c.describe_keyspace(request).await }
        })
        .await?
        .try_into()
    }

    /// The region's status: identity, clock, applied vector, peers.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.call(Retry::Safe, |mut c| async move {
            c.status(pb::StatusRequest {}).await
        })
        .await
    }

    /// The counter keyspace `keyspace`.
    pub fn counter(&self, keyspace: &str) -> Counter {
        Counter::new(self.clone(), keyspace)
    }

    /// The set keyspace `keyspace`.
    pub fn set(&self, keyspace: &str) -> Set {
        Set::new(self.clone(), keyspace)
    }

    /// The register keyspace `keyspace`.
    pub fn register(&self, keyspace: &str) -> Register {
        Register::new(self.clone(), keyspace)
    }

    /// The stream keyspace `keyspace`.
    pub fn stream(&self, keyspace: &str) -> Stream {
        Stream::new(self.clone(), keyspace)
    }

    /// An empty batch: operations added to it run in one atomic round
    /// trip.
    pub fn batch(&self) -> Batch {
        Batch::new(self.clone())
    }

    /// What the gRPC health service (`grpc.health.v1`) of the endpoint
    /// the next call goes to says of `service`: `""` for the node as a
    /// whole, or a gRPC service name such as `concord.v1.Concord`. A
    /// node shutting down answers [`Health::NotServing`]; a service it
    /// does not know is [`Error::Status`] NOT_FOUND. Fails over like a
    /// read, so give a single endpoint to probe one region.
    pub async fn health(&self, service: &str) -> Result<Health> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let answer = self
            .call_channel(Retry::Safe, |channel| async move {
                HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: service.to_string(),
                    })
                    .await
            })
            .await?;
        Ok(match ServingStatus::try_from(answer.status) {
            Ok(ServingStatus::Serving) => Health::Serving,
            Ok(ServingStatus::NotServing) => Health::NotServing,
            _ => Health::Unknown,
        })
    }

    /// Runs `call` on the current endpoint, failing over as the crate
    /// documentation describes.
    pub(crate) async fn call<T, F, Fut>(&self, retry: Retry, call: F) -> Result<T>
    where
        F: Fn(ConcordClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, tonic::Status>>,
    {
        self.call_channel(retry, |channel| {
            call(
                ConcordClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        })
        .await
    }

    /// [`Client::call`] for any gRPC service on the endpoint's channel.
    async fn call_channel<T, F, Fut>(&self, retry: Retry, call: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, tonic::Status>>,
    {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let timeout = self.inner.options.request_timeout;
        let mut last = String::new();
        for attempt in 0..n {
            let i = (start + attempt) % n;
            let (url, channel) = &self.inner.endpoints[i];
            let failure = match tokio::time::timeout(timeout, call(channel.clone())).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if status.code() == Code::Unavailable => {
                    format!("{}: {}", url, status_chain(&status))
                }
                Ok(Err(status)) => return Err(Error::Status(status)),
                Err(_) => format!("{url}: {}", error::timed_out(timeout)),
            };
            // The next call starts at the next endpoint.
            let _ = self.inner.current.compare_exchange(
                i,
                (i + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tracing::debug!(endpoint = %url, failure = %failure, "endpoint failed");
            if retry == Retry::Never {
                return Err(Error::WriteOutcomeUnknown {
                    endpoint: url.clone(),
                    reason: failure,
                });
            }
            last = failure;
        }
        Err(Error::Unavailable { tried: n, last })
    }
}

/// A status's message with the transport error behind it, if any.
fn status_chain(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => format!(
            "{} ({})",
            status.message(),
            concord_proto::error_chain(source)
        ),
        None => status.message().to_string(),
    }
}
