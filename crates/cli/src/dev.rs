//! `concord dev`: a local multi-region cluster, one `concord-node` process
//! per region on 127.0.0.1, each with its configuration file under the
//! data directory, wired as each other's peers.
//!
//! Region `i` (from 0) listens on `base_port + i` and serves its metrics on
//! `base_port + 1000 + i`. Its files are under `<data>/<region>/`:
//! `concord-node.toml`, `data/`, `node.log` and, while it runs, `node.pid`.
//! A region whose process dies is reported and left down (the others keep
//! serving); `concord-node --config <data>/<region>/concord-node.toml`
//! restarts it. Ctrl-C (or SIGTERM) stops every region gracefully,
//! restarted ones too: each region's pid file says which process holds it.
//! A region still running from an earlier run (its `concord dev` was
//! killed) is stopped before the new one starts.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use concord_client::{Client, ClientOptions};
use concord_node::config::{Config, Durability, LogConfig, PeerConfig, StorageConfig};
use serde_json::json;
use tokio::sync::mpsc;

use crate::output::Out;

/// The file, in each region's directory, naming the process that holds
/// its data.
pub const PID_FILE: &str = "node.pid";

/// Most regions `concord dev` starts.
pub const MAX_DEV_REGIONS: u16 = 9;

/// Offset of each region's metrics port from its gRPC port.
pub const METRICS_PORT_OFFSET: u16 = 1000;

/// Longest wait for every region to answer after starting.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the regions to stop after SIGTERM before they are
/// killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Names of the regions, in order.
const REGION_NAMES: [&str; MAX_DEV_REGIONS as usize] = [
    "us-east",
    "eu-west",
    "ap-south",
    "us-west",
    "eu-north",
    "ap-east",
    "sa-east",
    "af-south",
    "me-central",
];

/// Arguments of `concord dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Number of regions.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=MAX_DEV_REGIONS as i64))]
    regions: u16,
    /// gRPC port of the first region; the others follow it.
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// Directory of every region's configuration, data and log.
    #[arg(long, default_value = "concord-dev")]
    data: PathBuf,
    /// The concord-node binary [default: next to this one, else on PATH].
    #[arg(long, value_name = "PATH")]
    node_bin: Option<PathBuf>,
}

/// One region of the cluster.
struct Region {
    config: Config,
    config_path: PathBuf,
    log_path: PathBuf,
    pid: u32,
}

impl Region {
    fn endpoint(&self) -> String {
        format!("http://{}", self.config.listen)
    }
}

/// The regions' configurations.
fn configs(args: &DevArgs, data: &Path) -> Result<Vec<Config>, String> {
    let n = args.regions;
    let last = u32::from(args.base_port) + u32::from(METRICS_PORT_OFFSET) + u32::from(n) - 1;
    if args.base_port == 0 || last > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {} leaves no room for {n} regions and their metrics ports (up to base + {})",
            args.base_port,
            METRICS_PORT_OFFSET + n - 1
        ));
    }
    let addr = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let all: Vec<(String, u32, SocketAddr)> = (0..n)
        .map(|i| {
            (
                REGION_NAMES[usize::from(i)].to_string(),
                u32::from(i) + 1,
                addr(args.base_port + i),
            )
        })
        .collect();
    all.iter()
        .enumerate()
        .map(|(i, (region, replica_id, listen))| {
            let config = Config {
                region: region.clone(),
                replica_id: *replica_id,
                listen: *listen,
                data_dir: data.join(region).join("data"),
                metrics_listen: Some(addr(listen.port() + METRICS_PORT_OFFSET)),
                pid_file: Some(data.join(region).join(PID_FILE)),
                peers: all
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (region, replica_id, listen))| PeerConfig {
                        region: region.clone(),
                        replica_id: *replica_id,
                        endpoint: format!("http://{listen}"),
                    })
                    .collect(),
                durability: Durability::Group,
                max_drift_ms: 500,
                storage: StorageConfig::default(),
                limits: Default::default(),
                keyspaces: Vec::new(),
                log: LogConfig::default(),
            };
            config.validate().map_err(|e| e.to_string())?;
            Ok(config)
        })
        .collect()
}

/// The concord-node binary: the one given, else the one next to this
/// executable, else the first on PATH.
fn node_binary(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("--node-bin {} is not a file", path.display()))
        };
    }
    let sibling = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("concord-node"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("concord-node"))
            .find(|p| p.is_file())
    });
    sibling.filter(|p| p.is_file()).or(on_path).ok_or_else(|| {
        "cannot find the concord-node binary next to concord or on PATH; build it with \
             `cargo build --release -p concord-node` or pass --node-bin"
            .to_string()
    })
}

/// Runs `concord dev` until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs, out: Out) -> Result<(), String> {
    let bin = node_binary(args.node_bin.clone())?;
    std::fs::create_dir_all(&args.data)
        .map_err(|e| format!("cannot create {}: {e}", args.data.display()))?;
    let data =
        std::path::absolute(&args.data).map_err(|e| format!("{}: {e}", args.data.display()))?;
    let configs = configs(&args, &data)?;
    // Every region directory under the data directory, not only those of
    // this run: an earlier run may have had more regions.
    let leftovers: Vec<(String, u32)> = std::fs::read_dir(&data)
        .map(|dirs| {
            dirs.flatten()
                .filter_map(|d| {
                    let pid = running_region(&d.path().join(PID_FILE))?;
                    Some((d.file_name().to_string_lossy().into_owned(), pid))
                })
                .collect()
        })
        .unwrap_or_default();
    for (region, pid) in &leftovers {
        eprintln!("region {region} is still running from an earlier run (pid {pid}); stopping it");
    }
    stop_pids(&leftovers.iter().map(|(_, pid)| *pid).collect::<Vec<_>>()).await;

    let (exits_tx, mut exits) = mpsc::channel::<(usize, String)>(configs.len());
    let mut regions: Vec<Region> = Vec::with_capacity(configs.len());
    for (i, config) in configs.into_iter().enumerate() {
        let dir = data.join(&config.region);
        let spawned = spawn(&bin, &dir, &config, i, exits_tx.clone()).await;
        match spawned {
            Ok(region) => regions.push(region),
            Err(e) => {
                stop(&regions, &mut exits).await;
                return Err(e);
            }
        }
    }
    let mut alive: BTreeMap<usize, u32> = regions
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.pid))
        .collect();

    if let Err(e) = wait_ready(&regions, &mut exits).await {
        stop(&regions, &mut exits).await;
        return Err(e);
    }
    print_cluster(&regions, &out);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            Some((i, status)) = exits.recv() => {
                alive.remove(&i);
                let r = &regions[i];
                eprintln!(
                    "region {} (pid {}) exited: {status}; the others keep serving. Restart it with: {} --config {} (Ctrl-C here stops it too)",
                    r.config.region, r.pid, bin.display(), r.config_path.display()
                );
                if alive.is_empty() {
                    return Err("every region has exited".into());
                }
            }
        }
    }
    eprintln!("stopping {} regions...", alive.len());
    let live: Vec<&Region> = alive.keys().map(|&i| &regions[i]).collect();
    stop_all(&live, &mut exits, alive.len()).await;
    // Regions restarted by hand hold their data under a pid this process
    // did not start: stopped too.
    let restarted: Vec<u32> = regions
        .iter()
        .filter_map(|r| running_region(r.config.pid_file.as_deref()?))
        .collect();
    if !restarted.is_empty() {
        eprintln!("stopping {} regions restarted by hand...", restarted.len());
        stop_pids(&restarted).await;
    }
    eprintln!("stopped");
    Ok(())
}

/// Writes a region's configuration and starts its process.
async fn spawn(
    bin: &Path,
    dir: &Path,
    config: &Config,
    index: usize,
    exits: mpsc::Sender<(usize, String)>,
) -> Result<Region, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let config_path = dir.join("concord-node.toml");
    let log_path = dir.join("node.log");
    let text = format!(
        "# Written by `concord dev`; rewritten at its next start.\n{}",
        config.to_toml().map_err(|e| e.to_string())?
    );
    std::fs::write(&config_path, text)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let mut child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| format!("region {} exited at once", config.region))?;
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = exits.send((index, status)).await;
    });
    Ok(Region {
        config: config.clone(),
        config_path,
        log_path,
        pid,
    })
}

/// Waits until every region answers a status call and shows every peer
/// connected.
async fn wait_ready(
    regions: &[Region],
    exits: &mut mpsc::Receiver<(usize, String)>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    for r in regions {
        loop {
            if let Ok((i, status)) = exits.try_recv() {
                let failed = &regions[i];
                return Err(format!(
                    "region {} exited while starting ({status}); its log {} ends with: {}",
                    failed.config.region,
                    failed.log_path.display(),
                    log_tail(&failed.log_path)
                ));
            }
            // Serving, and linked to every peer: a write made anywhere
            // then reaches the others at once.
            if let Ok(client) = Client::connect_with([r.endpoint()], options.clone()).await {
                let status = client.status().await;
                if status.is_ok_and(|s| s.peers.iter().all(|p| p.connected)) {
                    break;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "region {} was not serving on {} with every peer linked within {} s (`concord --endpoint {} status` says which link is down and why); see {}",
                    r.config.region,
                    r.endpoint(),
                    READY_TIMEOUT.as_secs(),
                    r.endpoint(),
                    r.log_path.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The last line of a log, for error messages.
fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(nothing)".into())
}

fn print_cluster(regions: &[Region], out: &Out) {
    if out.is_json() {
        let all: Vec<serde_json::Value> = regions
            .iter()
            .map(|r| {
                json!({
                    "region": r.config.region,
                    "replica_id": r.config.replica_id,
                    "endpoint": r.endpoint(),
                    "metrics": r.config.metrics_listen.map(|a| format!("http://{a}/metrics")),
                    "pid": r.pid,
                    "config": r.config_path,
                    "log": r.log_path,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    println!(
        "{:<10} {:<24} {:<34} {:>8}  CONFIG",
        "REGION", "ENDPOINT", "METRICS", "PID"
    );
    for r in regions {
        let metrics = r
            .config
            .metrics_listen
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_default();
        println!(
            "{:<10} {:<24} {:<34} {:>8}  {}",
            r.config.region,
            r.endpoint(),
            metrics,
            r.pid,
            r.config_path.display()
        );
    }
    println!();
    println!(
        "{} regions serving; logs are next to each config. Ctrl-C stops them all.",
        regions.len()
    );
    println!(
        "Try: concord --endpoint {} keyspace create hits --type counter",
        regions.first().map(Region::endpoint).unwrap_or_default()
    );
}

/// Stops every region started so far (after a failed start).
async fn stop(regions: &[Region], exits: &mut mpsc::Receiver<(usize, String)>) {
    let all: Vec<&Region> = regions.iter().collect();
    stop_all(&all, exits, regions.len()).await;
}

/// Sends SIGTERM to `regions`, waits up to [`STOP_TIMEOUT`] for `expected`
/// exits, then kills what is left.
async fn stop_all(
    regions: &[&Region],
    exits: &mut mpsc::Receiver<(usize, String)>,
    expected: usize,
) {
    for r in regions {
        signal(r.pid, rustix::process::Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    let mut exited = 0;
    while exited < expected {
        match tokio::time::timeout_at(deadline, exits.recv()).await {
            Ok(Some(_)) => exited += 1,
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "regions still running after {} s; killing them",
                    STOP_TIMEOUT.as_secs()
                );
                for r in regions {
                    signal(r.pid, rustix::process::Signal::KILL);
                }
                break;
            }
        }
    }
}

/// The pid of the `concord-node` process a region's pid file names, when
/// that process is still running on the configuration next to the pid
/// file (so a pid reused by another program, or by a node of another
/// cluster, is left alone).
fn running_region(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    let is_node = args
        .next()
        .is_some_and(|exe| exe.ends_with(b"concord-node"));
    let config = pid_file
        .with_file_name("concord-node.toml")
        .canonicalize()
        .ok()?;
    // An argument may be relative to the process's working directory.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let on_ours = args.any(|arg| {
        let arg = Path::new(std::ffi::OsStr::from_bytes(arg));
        cwd.join(arg).canonicalize().is_ok_and(|p| p == config)
    });
    (is_node && on_ours && alive(pid)).then_some(pid)
}

/// Whether `pid` runs (a zombie, dead but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Sends SIGTERM to processes this one did not start, waits up to
/// [`STOP_TIMEOUT`] for them to end, then kills what is left.
async fn stop_pids(pids: &[u32]) {
    for &pid in pids {
        signal(pid, rustix::process::Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while pids.iter().any(|&pid| alive(pid)) {
        if tokio::time::Instant::now() > deadline {
            eprintln!(
                "regions still running after {} s; killing them",
                STOP_TIMEOUT.as_secs()
            );
            for &pid in pids {
                signal(pid, rustix::process::Signal::KILL);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // The process may be gone already: nothing to do then.
        let _ = rustix::process::kill_process(pid, signal);
    }
}
