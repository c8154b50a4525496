//! One node served in-process on 127.0.0.1, for the API tests.

#![allow(dead_code)]

use concord_core::clock::SystemTime;
use concord_node::Config;
use concord_proto::v1::concord_client::ConcordClient;
use tonic::transport::Channel;

pub struct Node {
    pub client: ConcordClient<Channel>,
    pub channel: Channel,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// A TCP connector that counts its dials.
pub fn counting_connector() -> (
    concord_node::Connector,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    let connector = concord_node::Connector::new(move |uri: tonic::codegen::http::Uri| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let addr = format!(
            "{}:{}",
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or(80)
        );
        async move { tokio::net::TcpStream::connect(addr).await }
    });
    (connector, dials)
}

/// A node of region us-east (replica 1) with the default configuration.
pub async fn start() -> Node {
    start_with("max_drift_ms = 0").await
}

/// A node of region us-east (replica 1); `extra` is appended to its
/// configuration file.
pub async fn start_with(extra: &str) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    serve_on(listener, extra, concord_node::Connector::tcp()).await
}

/// A node of region us-east (replica 1) served on `listener`, dialling its
/// peers through `connector`; `extra` is appended to its configuration.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    extra: &str,
    connector: concord_node::Connector,
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = listener.local_addr().expect("addr");
    let config = Config::from_toml(&format!(
        "region = \"us-east\"\nreplica_id = 1\nlisten = \"{addr}\"\ndata_dir = {:?}\n{extra}",
        dir.path().join("data")
    ))
    .expect("config");
    let node = concord_node::Node::open(config, SystemTime)
        .await
        .expect("open");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(node.serve(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        connector,
        async {
            let _ = rx.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let client = ConcordClient::new(channel.clone()).max_encoding_message_size(64 << 20);
    Node {
        client,
        channel,
        _shutdown: tx,
        _dir: dir,
    }
}
