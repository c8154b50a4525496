//! The concord region node.
//!
//! - [`command`]: client requests validated into typed operations.
//! - [`engine`]: runs operations against the store as atomic batches and
//!   waits for durability.
//! - [`service`]: the `concord.v1.Concord` gRPC service.
//! - [`subscribe`]: live stream subscriptions.
//! - [`serve`]: serves the node's gRPC API on a listener the caller hands
//!   in, until a shutdown signal, so tests bind `127.0.0.1:0` and the
//!   simulator hands in its own sockets.
//! - [`NodeError`]: the crate's one error type, mapped to gRPC codes.

pub mod command;
pub mod engine;
mod error;
pub mod service;
pub mod subscribe;

use std::future::Future;

pub use engine::Engine;
pub use error::{NodeError, Result};

use concord_proto::v1::concord_server::ConcordServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// Most bytes of one gRPC message the node decodes or sends: a batch of the
/// largest operations fits; anything larger is refused with
/// RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Serves the node's gRPC API on the connections of `incoming` until
/// `shutdown` completes; requests in flight are finished first.
pub async fn serve<I, IO, IE>(
    engine: Engine,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = std::result::Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = ConcordServer::new(service::ClientService::new(engine))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(client)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
