//! What the node benchmarks share: three regions on 127.0.0.1, in this
//! process or as `concord-node` processes, and a convergence wait.

#![allow(dead_code)]

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use concord_core::clock::SystemTime;
use concord_node::{Config, Connector, Node};
use concord_proto::v1 as pb;
use concord_proto::v1::concord_client::ConcordClient;
use concord_store::Store;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::Channel;

// The same allocator as the concord-node binary, so that regions served in
// this process cost what the real node costs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The regions' names; region `i` has replica id `i + 1`.
pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// A connection that fails as soon as its link is cut.
struct Cuttable {
    inner: tokio::net::TcpStream,
    cut: Arc<AtomicBool>,
}

fn check(cut: &AtomicBool) -> io::Result<()> {
    if cut.load(Ordering::SeqCst) {
        Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut"))
    } else {
        Ok(())
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        check(&self.cut)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        check(&self.cut)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub fn cuttable(cut: Arc<AtomicBool>) -> Connector {
    Connector::new(move |uri: tonic::codegen::http::Uri| {
        let cut = cut.clone();
        let addr = format!(
            "{}:{}",
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or(80)
        );
        async move {
            check(&cut)?;
            let inner = tokio::net::TcpStream::connect(addr).await?;
            inner.set_nodelay(true)?;
            Ok(Cuttable { inner, cut })
        }
    })
}

/// Region `i`'s configuration: every other region a direct peer.
pub fn config_text(i: usize, addrs: &[std::net::SocketAddr], dir: &std::path::Path) -> String {
    let peers: String = (0..addrs.len())
        .filter(|&j| j != i)
        .map(|j| {
            format!(
                "[[peers]]\nregion = {:?}\nreplica_id = {}\nendpoint = \"http://{}\"\n",
                REGIONS[j],
                j + 1,
                addrs[j]
            )
        })
        .collect();
    format!(
        "region = {:?}\nreplica_id = {}\nlisten = \"{}\"\ndata_dir = {:?}\n[log]\nfilter = \"warn\"\n{peers}",
        REGIONS[i],
        i + 1,
        addrs[i],
        dir.join(REGIONS[i])
    )
}

pub struct Region {
    pub client: ConcordClient<Channel>,
    /// The store, when the region runs in this process.
    pub store: Option<Arc<Store>>,
}

impl Region {
    pub fn store(&self) -> &Store {
        self.store.as_deref().expect("an in-process region")
    }
}

pub async fn cluster(dir: &std::path::Path, cut: Arc<AtomicBool>) -> Vec<Region> {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut regions = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let config = Config::from_toml(&config_text(i, &addrs, dir)).expect("config");
        let node = Node::open(config, SystemTime).await.expect("open");
        let store = node.engine().store().clone();
        let connector = if i == 0 {
            cuttable(cut.clone())
        } else {
            Connector::tcp()
        };
        tokio::spawn(node.serve(
            // As the binary does: replies go out at once (no Nagle).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            connector,
            std::future::pending::<()>(),
        ));
        let client = ConcordClient::connect(format!("http://{}", addrs[i]))
            .await
            .expect("connect");
        regions.push(Region {
            client,
            store: Some(store),
        });
    }
    regions
}

/// A region's status report.
pub async fn status(region: &Region) -> pb::StatusResponse {
    region
        .client
        .clone()
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Waits until every region has applied the same deltas; false when
/// `timeout` passes first.
pub async fn converged(regions: &[Region], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut vvs = Vec::new();
        for r in regions {
            vvs.push(status(r).await.applied.map(|a| a.seqs));
        }
        if vvs.windows(2).all(|w| w[0] == w[1]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// Three `concord-node` processes (release build) with direct links; the
/// processes are killed when the returned guard drops.
pub async fn processes(dir: &std::path::Path) -> (Vec<Region>, Vec<std::process::Child>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "concord-node"])
        .status()
        .expect("cargo build");
    assert!(built.success(), "building concord-node failed");
    let exe = std::env::current_exe().expect("exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("concord-node");
    let addrs: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
        })
        .collect();
    let mut children = Vec::new();
    let mut regions = Vec::new();
    for (i, name) in REGIONS.iter().enumerate() {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config_text(i, &addrs, dir)).expect("config");
        children.push(
            std::process::Command::new(&bin)
                .arg("--config")
                .arg(&path)
                .spawn()
                .expect("start concord-node"),
        );
    }
    for addr in &addrs {
        let client = loop {
            match ConcordClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        regions.push(Region {
            client,
            store: None,
        });
    }
    (regions, children)
}
