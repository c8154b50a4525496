//! `concord dev` as a test runs it: a cluster of real region processes on
//! free ports, under a data directory of the test's, stopped with
//! everything it started when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::{binary, free_base_port, signal};

/// A running `concord dev`.
pub struct Dev {
    /// The `concord dev` process.
    pub child: Child,
    /// The regions' process ids, in region order.
    pub pids: Vec<u32>,
    /// The table it printed: one object per region (`region`, `endpoint`,
    /// `metrics`, `pid`, `config`, `log`).
    pub regions: Vec<Value>,
}

impl Dev {
    /// Starts `n` regions under `dir` and waits until they serve.
    pub fn start(dir: &Path, n: u16) -> Dev {
        let base = free_base_port(n);
        let mut child = Command::new(binary("concord"))
            .args([
                "--json",
                "dev",
                "--regions",
                &n.to_string(),
                "--base-port",
                &base.to_string(),
                "--data",
            ])
            .arg(dir)
            .arg("--node-bin")
            .arg(binary("concord-node"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start concord dev");
        let stdout = child.stdout.take().expect("stdout");
        let mut dev = Dev {
            child,
            pids: Vec::new(),
            regions: Vec::new(),
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the cluster table");
        dev.regions = serde_json::from_str(&line).expect("JSON list of regions");
        dev.pids = dev
            .regions
            .iter()
            .map(|r| r["pid"].as_u64().expect("pid") as u32)
            .collect();
        dev
    }

    /// Region `i`'s gRPC endpoint.
    pub fn endpoint(&self, i: usize) -> String {
        self.field(i, "endpoint")
    }

    /// Region `i`'s configuration file.
    pub fn config(&self, i: usize) -> String {
        self.field(i, "config")
    }

    fn field(&self, i: usize, name: &str) -> String {
        self.regions[i][name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} for region {i}"))
            .to_string()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        for &pid in &self.pids {
            signal(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
