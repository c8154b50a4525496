//! The node's transport over turmoil's simulated TCP: the listener side as
//! the stream of connections `Node::serve` takes, the dialing side as a
//! [`Connector`], and client channels.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use concord_node::Connector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

/// The port every region serves on.
pub const PORT: u16 = 7100;

/// A simulated TCP connection accepted by a region.
pub struct Accepted(turmoil::net::TcpStream);

impl Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections accepted on [`PORT`] of the current host.
pub async fn incoming() -> io::Result<impl Stream<Item = io::Result<Accepted>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    Ok(tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(accept_loop(listener)),
        |accepted| accepted.map(Accepted),
    ))
}

/// Accepts connections on a task of the host's runtime and hands them over
/// through a bounded queue (of [`ACCEPT_QUEUE`] connections).
fn accept_loop(
    listener: turmoil::net::TcpListener,
) -> tokio::sync::mpsc::Receiver<io::Result<turmoil::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
    tokio::task::spawn_local(async move {
        loop {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Connections accepted but not yet taken by the server.
pub const ACCEPT_QUEUE: usize = 64;

/// Dials `http://host:port` URIs over simulated TCP.
pub fn connector() -> Connector {
    Connector::new(|uri: Uri| async move {
        let host = uri
            .host()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host"))
            })?
            .to_string();
        let port = uri.port_u16().unwrap_or(PORT);
        turmoil::net::TcpStream::connect((host, port)).await
    })
}

/// Longest wait for a simulated connection to a region.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A lazily connecting client channel to `region`, whose calls time out
/// after `timeout`.
pub fn channel(region: &str, timeout: Duration) -> Channel {
    // The URI is made of a region name from this crate's own list, so it
    // always parses.
    let endpoint = Endpoint::from_shared(format!("http://{region}:{PORT}"))
        .expect("a region name makes a valid URI")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout);
    endpoint.connect_with_connector_lazy(connector())
}
