//! A cluster of real `concord-node` processes on 127.0.0.1, each region
//! configured with every other as a peer, that a test can kill, restart,
//! freeze and thaw.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{free_base_port, node_config, signal, NodeProcess};

/// Region names, in replica-id order.
pub const REGIONS: [&str; 4] = ["us-east", "eu-west", "ap-south", "us-west"];

/// One region's files and address.
pub struct Region {
    /// Region name.
    pub name: &'static str,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

/// The cluster; every process is killed when it is dropped.
pub struct Cluster {
    /// The regions, by index (replica id = index + 1).
    pub regions: Vec<Region>,
    /// Top-level configuration every region gets (`durability = ...`,
    /// a `[storage]` table), written before its peers.
    pub settings: String,
    procs: Vec<Option<NodeProcess>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Lays out `n` regions (addresses, directories); nothing runs yet.
    pub fn new(n: usize) -> Cluster {
        assert!(n <= REGIONS.len());
        let dir = tempfile::tempdir().expect("tempdir");
        let base = free_base_port(n as u16);
        let regions = (0..n)
            .map(|i| Region {
                name: REGIONS[i],
                listen: SocketAddr::from(([127, 0, 0, 1], base + i as u16)),
                config: dir.path().join(format!("{}.toml", REGIONS[i])),
                log: dir.path().join(format!("{}.log", REGIONS[i])),
            })
            .collect();
        Cluster {
            regions,
            settings: String::new(),
            procs: (0..n).map(|_| None).collect(),
            _dir: dir,
        }
    }

    /// Writes every region's configuration: region `i` reaches region `j`
    /// at `endpoint(i, j)`.
    pub fn configure(&self, endpoint: impl Fn(usize, usize) -> String) {
        for (i, r) in self.regions.iter().enumerate() {
            let mut peers = self.settings.clone();
            if !peers.is_empty() && !peers.ends_with('\n') {
                peers.push('\n');
            }
            for (j, p) in self.regions.iter().enumerate() {
                if i != j {
                    peers.push_str(&format!(
                        "[[peers]]\nregion = {:?}\nreplica_id = {}\nendpoint = {:?}\n",
                        p.name,
                        j + 1,
                        endpoint(i, j)
                    ));
                }
            }
            let dir = r.config.with_extension("d");
            let text = node_config(r.name, i as u32 + 1, &r.listen.to_string(), &dir, &peers);
            std::fs::write(&r.config, text).expect("write config");
        }
    }

    /// Every region reaches every other directly.
    pub fn configure_direct(&self) {
        let addrs: Vec<SocketAddr> = self.regions.iter().map(|r| r.listen).collect();
        self.configure(|_, j| format!("http://{}", addrs[j]));
    }

    /// Region `i`'s gRPC endpoint.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.regions[i].listen)
    }

    /// Every region's endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.regions.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Starts region `i` and waits until it listens.
    pub fn start(&mut self, i: usize) {
        let r = &self.regions[i];
        self.procs[i] = Some(NodeProcess::start_logged(
            &r.config,
            &r.listen.to_string(),
            Some(&r.log),
        ));
    }

    /// Starts every region.
    pub fn start_all(&mut self) {
        for i in 0..self.regions.len() {
            self.start(i);
        }
    }

    /// Kills region `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        drop(self.procs[i].take());
    }

    /// Freezes region `i` with SIGSTOP.
    pub fn freeze(&self, i: usize) {
        if let Some(p) = &self.procs[i] {
            signal(p.pid(), rustix::process::Signal::STOP);
        }
    }

    /// Thaws region `i` with SIGCONT.
    pub fn thaw(&self, i: usize) {
        if let Some(p) = &self.procs[i] {
            signal(p.pid(), rustix::process::Signal::CONT);
        }
    }

    /// The last lines of every region's log, for failure messages.
    pub fn logs(&self) -> String {
        self.regions
            .iter()
            .map(|r| {
                let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}\n{}", r.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            // A frozen process must be thawed to die promptly.
            self.thaw(i);
        }
    }
}
