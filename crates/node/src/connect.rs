//! How the node dials its peers. The node never opens a socket itself: the
//! caller hands in a [`Connector`], so the binary dials TCP and the
//! simulator dials through its simulated network.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::http::Uri;

/// A connection to a peer: any byte stream.
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerIo for T {}

type Dialed = Pin<Box<dyn Future<Output = io::Result<Box<dyn PeerIo>>> + Send>>;

/// Opens connections to peers' endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    dial: Arc<dyn Fn(Uri) -> Dialed + Send + Sync>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

impl Connector {
    /// A connector from a function that dials an endpoint's URI.
    pub fn new<F, Fut, Io>(dial: F) -> Self
    where
        F: Fn(Uri) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<Io>> + Send + 'static,
        Io: PeerIo,
    {
        Connector {
            dial: Arc::new(move |uri| {
                let dialing = dial(uri);
                Box::pin(async move { Ok(Box::new(dialing.await?) as Box<dyn PeerIo>) })
            }),
        }
    }

    /// Dials TCP, with Nagle's algorithm off.
    pub fn tcp() -> Self {
        Connector::new(|uri: Uri| async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host"))
            })?;
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            // An IPv6 literal keeps its brackets in the URI's host.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = tokio::net::TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn PeerIo>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialing = (self.dial)(uri);
        Box::pin(async move { Ok(TokioIo::new(dialing.await?)) })
    }
}
