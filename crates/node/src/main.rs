//! `concord-node`: runs one region.
//!
//! ```text
//! concord-node --config /etc/concord/us-east.toml
//! concord-node --config node.toml --listen 0.0.0.0:7100 --data-dir /data
//! concord-node --config node.toml --check      # validate and print, then exit
//! ```
//!
//! Configuration comes from the file, then `CONCORD_NODE_*` environment
//! variables, then these flags (see the `config` module). SIGINT or SIGTERM
//! shut the node down gracefully: calls in flight finish and every write is
//! flushed before it exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use concord_core::clock::SystemTime;
use concord_node::config::{Config, LogFormat, Overrides};
use concord_node::metrics::RPC_DURATION_BUCKETS;
use concord_node::{Connector, Node, NodeError};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

// sled rewrites and frees whole tree nodes on every write; mimalloc serves
// those allocations in a fraction of the time glibc's allocator takes
// (docs/BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs one concord region node.
#[derive(Debug, Parser)]
#[command(name = "concord-node", version, about)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
    /// Overrides `region`.
    #[arg(long)]
    region: Option<String>,
    /// Overrides `replica_id`.
    #[arg(long)]
    replica_id: Option<u32>,
    /// Overrides `listen`, the gRPC address.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `metrics_listen`, the Prometheus address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Validates the configuration, prints it as TOML, and exits.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let overrides = Overrides {
        region: args.region,
        replica_id: args.replica_id,
        listen: args.listen,
        data_dir: args.data_dir,
        metrics_listen: args.metrics_listen,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("concord-node: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match config.to_toml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("concord-node: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Err(e) = concord_node::telemetry::init(&config.log) {
        eprintln!("concord-node: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("concord-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_logs = config.log.format == LogFormat::Json;
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on standard error: as a log record when logs are for
            // machines, as a line for people otherwise.
            if json_logs {
                tracing::error!(error = %e, "concord-node stopped");
            } else {
                eprintln!("concord-node: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), NodeError> {
    if let Some(addr) = config.metrics_listen {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(
                Matcher::Full("concord_rpc_duration_seconds".into()),
                RPC_DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("concord_replication_delay_seconds".into()),
                    RPC_DURATION_BUCKETS,
                )
            })
            .and_then(|b| b.install())
            .map_err(|e| NodeError::Serve(format!("metrics on {addr}: {e}")))?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| NodeError::Serve(format!("cannot listen on {}: {e}", config.listen)))?;
    let node = Node::open(config, SystemTime).await?;
    // Written once the data directory is ours, so the file names the
    // process that holds it.
    let _pid = match &node.config().pid_file {
        Some(path) => Some(PidFile::write(path.clone())?),
        None => None,
    };
    let c = node.config();
    tracing::info!(
        region = %c.region,
        replica_id = c.replica_id,
        listen = %c.listen,
        metrics = %c.metrics_listen.map_or_else(|| "none".to_string(), |a| a.to_string()),
        data_dir = %c.data_dir.display(),
        peers = c.peers.len(),
        durability = ?c.durability,
        "serving"
    );
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    node.serve(incoming, Connector::tcp(), shutdown_signal())
        .await
}

/// The process id in a file, removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> Result<PidFile, NodeError> {
        std::fs::write(&path, format!("{}\n", std::process::id())).map_err(|e| {
            NodeError::Serve(format!("cannot write pid_file {}: {e}", path.display()))
        })?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only while it still names this process: a node started on the
        // same directory after this one let go of it has written its own.
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the node");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
