//! A TCP proxy between two regions that a test can cut, stall and heal:
//! cutting drops every connection through it and refuses new ones, as a
//! partition that resets connections would; stalling keeps every
//! connection open and accepts new ones but forwards nothing, as a
//! firewall dropping packets would (nothing tells either end).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// The address to dial instead of the target.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stalled: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let generation = watch::Sender::new(0u64);
        let next = Arc::new(AtomicU64::new(0));
        let stalled = watch::Sender::new(false);
        let task = {
            let cut = cut.clone();
            let generation = generation.clone();
            let stalled = stalled.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let mut cuts = generation.subscribe();
                    let mut stall = stalled.subscribe();
                    tokio::spawn(async move {
                        let mut a = inbound;
                        // A connection made while stalled waits, unanswered.
                        tokio::select! {
                            _ = stall.wait_for(|s| !*s) => {}
                            _ = cuts.changed() => return,
                        }
                        let Ok(mut b) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => return,
                            _ = stall.wait_for(|s| *s) => {}
                            _ = cuts.changed() => return,
                        }
                        // Stalled: bytes in flight are gone, as on a wire
                        // that drops packets; the connection stays open,
                        // silent, until it is cut or the proxy stops.
                        let _ = cuts.changed().await;
                        drop((a, b));
                    });
                }
            })
        };
        Proxy {
            addr,
            cut,
            stalled,
            generation,
            next,
            task,
        }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        self.generation.send_replace(n);
    }

    /// Stops forwarding bytes, keeping every connection open: neither end
    /// hears of it. Connections stalled stay silent for good; new ones
    /// wait, unanswered, until the proxy heals.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets connections through again (after a cut or a stall).
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
