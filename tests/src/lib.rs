//! Black-box integration tests that run the real `concord-node` and
//! `concord` binaries on 127.0.0.1. This library holds what the tests in
//! `tests/tests/` share: finding (and building) the binaries, picking
//! ports, and running a node process that is killed when dropped.

pub mod cluster;
pub mod dev;
pub mod proxy;
pub mod workload;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest wait for a node to answer after it starts (debug builds start
/// slowly on a loaded 2-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of one of the workspace's binaries (`concord-node` or
/// `concord`), built first in the profile these tests were built in, so a
/// test never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(build_binaries);
    match dir {
        Ok(dir) => dir.join(name),
        Err(e) => panic!("cannot build the binaries under test: {e}"),
    }
}

fn build_binaries() -> Result<PathBuf, String> {
    // This test runs from <target>/<profile>/deps/.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("unexpected test binary location")?
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("unexpected profile directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "concord-node",
        "-p",
        "concord-cli",
    ]);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let out = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(profile_dir)
}

/// Lowest port handed out to the processes under test.
const PORT_FLOOR: u16 = 20_000;

/// Ports handed out stay below Linux's default ephemeral range (32768 and
/// up). A port in that range, once checked free and released, can be taken
/// by any outgoing connection on the machine before the node binds it, and a
/// connection to it can even connect to itself; below it neither happens.
const PORT_CEILING: u16 = 32_768;

/// A base port with `count` free ports after it and after it + 1000 (the
/// layout of `concord dev`), chosen at random so tests in parallel rarely
/// meet; checked by binding them.
pub fn free_base_port(count: u16) -> u16 {
    let top = PORT_CEILING - 1000 - count;
    for _ in 0..200 {
        let base = fastrand::u16(PORT_FLOOR..top);
        let free = (0..count).all(|i| {
            [base + i, base + 1000 + i]
                .iter()
                .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if free {
            return base;
        }
    }
    panic!("no free port range found");
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_for_port(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A GET over plain HTTP/1.0; returns the whole response.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::Write;
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// A `concord-node` process, killed (SIGKILL) when dropped.
pub struct NodeProcess {
    child: Child,
    /// Its gRPC endpoint, `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl NodeProcess {
    /// Starts `concord-node --config <config>` and waits until it answers
    /// on `listen` (`127.0.0.1:<port>`).
    pub fn start(config: &Path, listen: &str) -> NodeProcess {
        Self::start_logged(config, listen, None)
    }

    /// [`NodeProcess::start`], appending the node's log to `log` when
    /// given (else to this process's stderr).
    pub fn start_logged(config: &Path, listen: &str, log: Option<&Path>) -> NodeProcess {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the node's log"),
            ),
            None => Stdio::inherit(),
        };
        let child = Command::new(binary("concord-node"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start concord-node");
        let mut node = NodeProcess {
            child,
            endpoint: format!("http://{listen}"),
        };
        node.wait_listening(listen, log);
        node
    }

    /// Waits until the node listens on `listen`, failing early, with its
    /// log, if it exits instead (its port taken, a bad configuration).
    fn wait_listening(&mut self, listen: &str, log: Option<&Path>) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let tail = log
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                panic!("concord-node for {listen} exited ({status}) before listening:\n{tail}");
            }
            if TcpStream::connect(listen).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "concord-node did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it was clean.
    pub fn terminate(mut self) -> bool {
        signal(self.pid(), rustix::process::Signal::TERM);
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to process `pid`, if it still exists.
pub fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Runs the `concord` CLI with `args`.
pub fn cli(args: &[&str]) -> Output {
    Command::new(binary("concord"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run concord")
}

/// Runs the `concord` CLI with `--json`, expects success, and parses its
/// output.
pub fn cli_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--endpoint", endpoint, "--json"];
    all.extend_from_slice(args);
    let out = cli(&all);
    assert!(
        out.status.success(),
        "concord {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "concord {all:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A minimal node configuration: region `region`, replica `replica_id`,
/// listening on `listen`, data under `dir`; `extra` is appended.
pub fn node_config(region: &str, replica_id: u32, listen: &str, dir: &Path, extra: &str) -> String {
    format!(
        "region = {region:?}\nreplica_id = {replica_id}\nlisten = {listen:?}\ndata_dir = {:?}\n{extra}\n",
        dir.join("data")
    )
}
