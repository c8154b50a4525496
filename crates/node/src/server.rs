//! A region node: opening its store and clock from a [`Config`], and
//! serving every gRPC service on one listener until shutdown.
//!
//! The caller hands in the listener's connections, the physical time
//! source and the shutdown signal, so the `concord-node` binary passes a
//! TCP listener, the system clock and SIGINT/SIGTERM, tests pass
//! `127.0.0.1:0`, and the simulator passes its own sockets and time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use concord_core::clock::PhysicalTime;
use concord_core::{Clock, ReplicaId};
use concord_proto::v1::concord_server::ConcordServer;
use concord_proto::v1::replication_server::ReplicationServer;
use concord_store::{Disk, Identity, Offload, OsDisk, Store, StoreOptions};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::codegen::http::{HeaderMap, HeaderValue, Response};
use tonic::transport::server::Connected;

use crate::config::Config;
use crate::connect::Connector;
use crate::engine::Engine;
use crate::error::{NodeError, Result};
use crate::peer::{PeerService, Peers};
use crate::service::ClientService;

/// Most bytes of one gRPC message the node decodes or sends: a batch of the
/// largest operations fits; anything larger is refused with
/// RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most concurrent calls on one client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Interval of HTTP/2 pings on idle connections, and how long a ping may
/// go unanswered before the connection is closed.
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// Longest wait, after the shutdown signal, for calls in flight to finish
/// before the node stops serving anyway (writes are flushed either way).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// What a node runs on, besides its configuration and clock: where its
/// blocking store work runs and the disk its journal is written to. The
/// default is a real process's: tokio's blocking pool and the operating
/// system's file system.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Where blocking store work runs.
    pub offload: Offload,
    /// The disk under the store.
    pub disk: Arc<dyn Disk>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            offload: Offload::Pool,
            disk: Arc::new(OsDisk),
        }
    }
}

/// A region node, ready to serve.
#[derive(Debug)]
pub struct Node {
    config: Config,
    engine: Engine,
    peers: Peers,
}

impl Node {
    /// Opens the region's store under `config.data_dir` (created if
    /// missing), starts its clock on `time`, and declares the configured
    /// keyspaces. Blocking store work runs on tokio's blocking pool.
    pub async fn open(config: Config, time: impl PhysicalTime) -> Result<Node> {
        Node::open_on(config, time, Machine::default()).await
    }

    /// [`Node::open`] on `machine`: [`Offload::Inline`] keeps every step
    /// of the node on the calling thread, which a deterministic
    /// single-threaded runtime (the simulator) needs, and its disk may be
    /// one that fails.
    pub async fn open_on(
        config: Config,
        time: impl PhysicalTime,
        machine: Machine,
    ) -> Result<Node> {
        config.validate()?;
        let dir = config.data_dir.clone();
        let identity = Identity {
            region: config.region.clone(),
            replica: ReplicaId(config.replica_id),
        };
        let Machine { offload, disk } = machine;
        let options = StoreOptions {
            offload,
            disk,
            ..config.store_options()
        };
        let store = offload
            .run(move || {
                options.disk.create_dir_all(&dir).map_err(|e| {
                    NodeError::Serve(format!(
                        "cannot create the data directory {}: {e}",
                        dir.display()
                    ))
                })?;
                Ok::<_, NodeError>(Store::open(&dir, identity, options)?)
            })
            .await
            .map_err(|e| NodeError::Serve(format!("opening the store failed: {e}")))??;
        let clock = Clock::new(time, config.max_drift_ms, store.hlc_high_water()?)?;
        let engine = Engine::new(Arc::new(store), Arc::new(clock));
        for ks in &config.keyspaces {
            engine
                .create_keyspace(ks.name.clone(), ks.ty)
                .await
                .map_err(|e| {
                    NodeError::Config(format!("cannot declare keyspace {:?}: {e}", ks.name))
                })?;
        }
        let peers = Peers::new(&config.peers);
        for (replica, holds) in engine.store().peer_acks().map_err(NodeError::from)? {
            peers.assume_holds(replica.0, &holds);
        }
        Ok(Node {
            config,
            engine,
            peers,
        })
    }

    /// The node's engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves the client API, the peer API, gRPC health and reflection on
    /// the connections of `incoming`, and links to every configured peer
    /// through `connector`, until `shutdown` completes. Then the
    /// health service reports NOT_SERVING, subscriptions end, calls in
    /// flight get up to [`SHUTDOWN_GRACE`] to finish, and the store is
    /// flushed.
    pub async fn serve<I, IO, IE>(
        self,
        incoming: I,
        connector: Connector,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()>
    where
        I: Stream<Item = std::result::Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Node { engine, peers, .. } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ConcordServer<ClientService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(concord_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| NodeError::Serve(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| NodeError::Serve(format!("reflection: {e}")))?;
        let client = ConcordServer::new(ClientService::new(engine.clone(), peers.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let peer = ReplicationServer::new(PeerService::new(engine.clone(), peers.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let (stopping_tx, stopping) = watch::channel(false);
        let gauges = tokio::spawn(crate::metrics::refresh_gauges(
            engine.clone(),
            peers.clone(),
            wait_for(stopping.clone()),
        ));
        crate::link::spawn_links(&engine, &peers, &connector, &stopping);
        let truncation = tokio::spawn(truncate_acked(
            engine.clone(),
            peers.clone(),
            wait_for(stopping.clone()),
        ));
        let graceful = {
            let engine = engine.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: finishing calls in flight");
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                health
                    .set_not_serving::<ConcordServer<ClientService>>()
                    .await;
                engine.begin_shutdown();
                stopping_tx.send_replace(true);
            }
        };
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .layer(tower::util::MapResponseLayer::new(contract_codes))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(client)
            .add_service(peer)
            .serve_with_incoming_shutdown(incoming, graceful);
        let served = tokio::select! {
            biased;
            served = server => served.map_err(|e| NodeError::Serve(format!("serving failed: {e}"))),
            () = async {
                wait_for(stopping).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "calls still in flight after the grace period; stopping anyway");
                Ok(())
            }
        };
        gauges.abort();
        truncation.abort();
        let store = engine.store().clone();
        let flushed = store
            .offload()
            .run(move || store.flush())
            .await
            .map_err(|e| NodeError::Serve(format!("the final flush failed: {e}")))?;
        flushed?;
        tracing::info!("stopped; every write is flushed");
        served
    }
}

/// How often logs are truncated below what every peer has acknowledged.
pub const TRUNCATE_EVERY: Duration = Duration::from_secs(1);

/// Truncates every origin's log below what all configured peers have
/// acknowledged, every [`TRUNCATE_EVERY`], until `stop`. Nothing is
/// truncated while some peer has never acknowledged (the per-log size cap
/// protects the disk meanwhile), nor when no peer is configured.
async fn truncate_acked(engine: Engine, peers: Peers, stop: impl Future<Output = ()>) {
    if peers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(TRUNCATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let store = engine.store().clone();
        let replicas = peers.replica_ids();
        let done = store
            .offload()
            .run(move || {
                let acks = store.peer_acks()?;
                let mut below: Option<concord_core::VersionVector> = None;
                for replica in replicas {
                    let Some(acked) = acks.get(&ReplicaId(replica)) else {
                        return Ok(None);
                    };
                    below = Some(match below {
                        None => acked.clone(),
                        Some(b) => b.meet(acked),
                    });
                }
                match below {
                    Some(below) => store.truncate_logs(&below).map(Some),
                    None => Ok(None),
                }
            })
            .await;
        match done {
            Ok(Ok(Some(report))) if report.entries > 0 => {
                tracing::debug!(
                    entries = report.entries,
                    bytes = report.bytes,
                    "truncated acknowledged deltas"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "truncating the logs failed"),
            _ => {}
        }
    }
}

async fn wait_for(mut flag: watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once serving
    // has ended: stop then too.
    let _ = flag.wait_for(|set| *set).await;
}

/// Rewrites the codes of tonic's own refusals to the ones the API
/// promises (see `proto/concord/v1/client.proto`): a message over the size
/// limit is RESOURCE_EXHAUSTED, not OUT_OF_RANGE, and a message that does
/// not decode (e.g. invalid UTF-8 in a string) is INVALID_ARGUMENT, not
/// INTERNAL. Both arrive before the handler runs, as trailers-only
/// responses, so the status is in the headers.
fn contract_codes<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let remapped = match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"11") if message_contains(headers, "message length too large") => Some("8"),
        Some(b"13") if message_contains(headers, "failed to decode Protobuf message") => Some("3"),
        _ => None,
    };
    if let Some(code) = remapped {
        headers.insert("grpc-status", HeaderValue::from_static(code));
    }
    response
}

/// Whether the percent-encoded `grpc-message` header contains `needle`.
fn message_contains(headers: &HeaderMap, needle: &str) -> bool {
    let Some(message) = headers.get("grpc-message") else {
        return false;
    };
    let message = String::from_utf8_lossy(message.as_bytes()).replace("%20", " ");
    message.contains(needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &'static str, message: &'static str) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(status));
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_static(message));
        r
    }

    fn code(r: &Response<()>) -> &[u8] {
        r.headers()["grpc-status"].as_bytes()
    }

    #[test]
    fn only_tonics_own_refusals_are_remapped() {
        let too_large = response(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%2020000000%20bytes",
        );
        assert_eq!(code(&contract_codes(too_large)), b"8");
        let undecodable = response(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20string%20value",
        );
        assert_eq!(code(&contract_codes(undecodable)), b"3");
        // Our own OUT_OF_RANGE and INTERNAL answers stay what they are.
        let ours = response("11", "counter%20overflow");
        assert_eq!(code(&contract_codes(ours)), b"11");
        let internal = response("13", "store%20failed");
        assert_eq!(code(&contract_codes(internal)), b"13");
    }
}
