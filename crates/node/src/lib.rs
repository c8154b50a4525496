//! The concord region node.
//!
//! - [`config`]: the node's configuration (file, environment, flags).
//! - [`Node`]: opens a region from its configuration and serves it.
//! - [`engine`]: runs client requests (`concord_core::Request`, validated
//!   from the wire by the types' own conversions) against the store as
//!   atomic batches and waits for durability.
//! - [`service`]: the `concord.v1.Concord` gRPC service.
//! - [`peer`]: the configured peers and the `concord.v1.Replication` service.
//! - [`connect`]: how the node dials its peers ([`Connector`]).
//! - [`handshake`]: the opening of a replication stream for both ends,
//!   the one check of a peer's clock, and why a stream fails
//!   ([`handshake::LinkError`]).
//! - [`link`]: the outbound link to each peer.
//! - [`replicate`]: both ends of a replication stream.
//! - [`subscribe`]: live stream subscriptions.
//! - [`metrics`]: what the node records for Prometheus.
//! - [`telemetry`]: log setup for binaries.
//! - [`NodeError`]: the crate's one error type, mapped to gRPC codes.
//!
//! ```no_run
//! use concord_core::clock::SystemTime;
//! use concord_node::{Config, Node};
//!
//! # async fn run() -> Result<(), concord_node::NodeError> {
//! let config = Config::from_toml(
//!     r#"
//!     region = "us-east"
//!     replica_id = 1
//!     listen = "127.0.0.1:7101"
//!     data_dir = "/var/lib/concord/us-east"
//!     "#,
//! )?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| {
//!     concord_node::NodeError::Serve(e.to_string())
//! })?;
//! let node = Node::open(config, SystemTime).await?;
//! node.serve(
//!     tokio_stream::wrappers::TcpListenerStream::new(listener),
//!     concord_node::Connector::tcp(),
//!     async { let _ = tokio::signal::ctrl_c().await; },
//! )
//! .await
//! # }
//! ```

pub mod config;
pub mod connect;
pub mod engine;
mod error;
pub mod handshake;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod replicate;
mod server;
pub mod service;
pub mod subscribe;
pub mod telemetry;

pub use config::Config;
pub use connect::Connector;
pub use engine::Engine;
pub use error::{NodeError, Result};
pub use server::{
    Machine, Node, KEEPALIVE, MAX_CONCURRENT_STREAMS, MAX_MESSAGE_BYTES, SHUTDOWN_GRACE,
};
