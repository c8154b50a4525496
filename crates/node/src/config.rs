//! The node's configuration: a TOML file, overridden by `CONCORD_NODE_*`
//! environment variables, overridden by command-line flags, merged with
//! figment and checked by [`Config::validate`] before anything starts.
//!
//! Unknown fields are errors everywhere (a misspelt limit must not silently
//! fall back to its default), and so are missing required fields: `region`,
//! `replica_id`, `listen` and `data_dir`. Nested fields are reached from the
//! environment with `__`, e.g. `CONCORD_NODE_LIMITS__MAX_KEY_BYTES=512`.
//!
//! ```toml
//! region = "us-east"
//! replica_id = 1
//! listen = "127.0.0.1:7101"
//! data_dir = "/var/lib/concord"
//! metrics_listen = "127.0.0.1:9101"
//! durability = "group"
//!
//! [[peers]]
//! region = "eu-west"
//! replica_id = 2
//! endpoint = "http://127.0.0.1:7102"
//!
//! [[keyspaces]]
//! name = "carts"
//! type = "set"
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use concord_core::limits::Limits;
use concord_core::CrdtType;
pub use concord_store::Durability;
use concord_store::{Offload, StoreOptions};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CONCORD_NODE_";

/// Longest region name, in bytes.
pub const MAX_REGION_NAME_BYTES: usize = 64;

/// Most peers one node may have.
pub const MAX_PEERS: usize = 64;

/// Most keyspaces declared from the configuration.
pub const MAX_CONFIGURED_KEYSPACES: usize = 1024;

/// Everything a region node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This region's name: lowercase letters, digits, `-`, `_` and `.`.
    pub region: String,
    /// This region's replica id, unique in the cluster and never reused;
    /// 1 or more.
    pub replica_id: u32,
    /// Address of the gRPC port (client API, peer API, health, reflection).
    pub listen: SocketAddr,
    /// Directory of the region's data; created if missing.
    pub data_dir: PathBuf,
    /// Address of the Prometheus `/metrics` endpoint; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// A file the binary writes its process id to once it holds the data
    /// directory, and removes when it stops; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// The other regions of the cluster.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// When writes are acknowledged.
    #[serde(default)]
    pub durability: Durability,
    /// Most milliseconds a peer's clock may be ahead of this node's before
    /// its messages are refused.
    #[serde(default = "default_max_drift_ms")]
    pub max_drift_ms: u64,
    /// Storage tuning.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Size limits on client requests and peer deltas.
    #[serde(default)]
    pub limits: Limits,
    /// Keyspaces declared at start (idempotent; a name that exists with
    /// another type stops the start).
    #[serde(default)]
    pub keyspaces: Vec<KeyspaceConfig>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

fn default_max_drift_ms() -> u64 {
    500
}

/// One peer region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's region name.
    pub region: String,
    /// The peer's replica id.
    pub replica_id: u32,
    /// The peer's gRPC endpoint, e.g. `http://10.0.2.7:7100`.
    pub endpoint: String,
}

/// A keyspace declared at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyspaceConfig {
    /// Keyspace name.
    pub name: String,
    /// Its CRDT type: `counter`, `set`, `register` or `stream`.
    #[serde(rename = "type")]
    pub ty: CrdtType,
}

/// Storage tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Interval of the background flush, in milliseconds.
    pub flush_every_ms: u64,
    /// Page cache size, in bytes.
    pub cache_capacity_bytes: u64,
    /// Most bytes one origin's delta log may hold.
    pub max_log_bytes_per_origin: u64,
    /// Largest size of a journal segment (they start at 64 KiB and double):
    /// segments are zero-filled when made, and when one is full, sled is
    /// flushed and the full segments are deleted. The journal takes up to
    /// about three times this on disk.
    pub journal_segment_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let store = StoreOptions::default();
        StorageConfig {
            flush_every_ms: store.flush_every_ms,
            cache_capacity_bytes: store.cache_capacity_bytes,
            max_log_bytes_per_origin: store.max_log_bytes_per_origin,
            journal_segment_bytes: store.journal_segment_bytes,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `concord_node=debug,info`;
    /// `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Values given on the command line; each one set wins over the file and
/// the environment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `region`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `replica_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<u32>,
    /// `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `metrics_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Config {
    /// Loads the configuration: the file at `path` (if any), then the
    /// `CONCORD_NODE_*` environment, then `overrides`; then validates it.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.is_file() {
                return Err(NodeError::Config(format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .merge(Serialized::defaults(overrides));
        Self::extract(figment)
    }

    /// Parses and validates a configuration from TOML text alone.
    pub fn from_toml(text: &str) -> Result<Config> {
        Self::extract(Figment::from(Toml::string(text)))
    }

    fn extract(figment: Figment) -> Result<Config> {
        let config: Config = figment.extract().map_err(|e| {
            // One line per problem, each naming the field and its source.
            let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            NodeError::Config(all.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: names, ids, peers, endpoints and limits.
    pub fn validate(&self) -> Result<()> {
        check_region_name("region", &self.region)?;
        if self.replica_id == 0 {
            return Err(bad("replica_id must be 1 or more"));
        }
        if self.peers.len() > MAX_PEERS {
            return Err(bad(format!(
                "{} peers configured; at most {MAX_PEERS} are supported",
                self.peers.len()
            )));
        }
        let mut regions = BTreeSet::from([self.region.as_str()]);
        let mut ids = BTreeSet::from([self.replica_id]);
        for (i, peer) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            check_region_name(&format!("{at}.region"), &peer.region)?;
            if peer.replica_id == 0 {
                return Err(bad(format!("{at}.replica_id must be 1 or more")));
            }
            if !regions.insert(peer.region.as_str()) {
                return Err(bad(format!(
                    "{at}.region {:?} appears twice (a peer cannot share this node's region either)",
                    peer.region
                )));
            }
            if !ids.insert(peer.replica_id) {
                return Err(bad(format!(
                    "{at}.replica_id {} appears twice (a peer cannot share this node's replica id either)",
                    peer.replica_id
                )));
            }
            check_endpoint(&at, &peer.endpoint)?;
        }
        if self.keyspaces.len() > MAX_CONFIGURED_KEYSPACES {
            return Err(bad(format!(
                "{} keyspaces configured; at most {MAX_CONFIGURED_KEYSPACES}",
                self.keyspaces.len()
            )));
        }
        let mut names = BTreeSet::new();
        for (i, ks) in self.keyspaces.iter().enumerate() {
            concord_core::limits::check_keyspace_name(&ks.name)
                .map_err(|e| bad(format!("keyspaces[{i}].name: {e}")))?;
            if !names.insert(ks.name.as_str()) {
                return Err(bad(format!(
                    "keyspaces[{i}].name {:?} appears twice",
                    ks.name
                )));
            }
        }
        if self.metrics_listen == Some(self.listen) {
            return Err(bad("metrics_listen must differ from listen"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir must not be empty"));
        }
        self.store_options()
            .validate()
            .map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    /// The store's options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            durability: self.durability,
            flush_every_ms: self.storage.flush_every_ms,
            cache_capacity_bytes: self.storage.cache_capacity_bytes,
            limits: self.limits.clone(),
            max_log_bytes_per_origin: self.storage.max_log_bytes_per_origin,
            offload: Offload::Pool,
            journal_segment_bytes: self.storage.journal_segment_bytes,
            ..StoreOptions::default()
        }
    }

    /// The configuration as TOML, as `concord dev` writes it.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| NodeError::Config(e.to_string()))
    }
}

fn bad(message: impl Into<String>) -> NodeError {
    NodeError::Config(message.into())
}

fn check_region_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_REGION_NAME_BYTES {
        return Err(bad(format!(
            "{field} must be 1 to {MAX_REGION_NAME_BYTES} bytes long, got {}",
            name.len()
        )));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(bad(format!(
            "{field} {name:?} may hold only lowercase letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

fn check_endpoint(at: &str, endpoint: &str) -> Result<()> {
    let uri: tonic::codegen::http::Uri = endpoint
        .parse()
        .map_err(|e| bad(format!("{at}.endpoint {endpoint:?} is not a URI: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        // Never a plaintext link to an address that asks for TLS.
        Some("https") => {
            return Err(bad(format!(
                "{at}.endpoint {endpoint:?}: TLS between regions is not supported yet: use http://"
            )))
        }
        _ => {
            return Err(bad(format!(
                "{at}.endpoint {endpoint:?} must start with http://"
            )))
        }
    }
    if uri.host().is_none() {
        return Err(bad(format!("{at}.endpoint {endpoint:?} has no host")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        region = "us-east"
        replica_id = 1
        listen = "127.0.0.1:7101"
        data_dir = "/var/lib/concord/us-east"
    "#;

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(config.durability, Durability::Group);
        assert_eq!(config.max_drift_ms, 500);
        assert_eq!(config.limits, Limits::default());
        assert!(config.peers.is_empty());
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn full_file_round_trips_through_toml() {
        let text = format!(
            "{MINIMAL}
            metrics_listen = \"127.0.0.1:9101\"
            durability = \"relaxed\"
            max_drift_ms = 250
            [storage]
            flush_every_ms = 100
            [limits]
            max_key_bytes = 64
            [log]
            format = \"json\"
            [[peers]]
            region = \"eu-west\"
            replica_id = 2
            endpoint = \"http://127.0.0.1:7102\"
            [[keyspaces]]
            name = \"carts\"
            type = \"set\""
        );
        let config = Config::from_toml(&text).expect("valid");
        assert_eq!(config.limits.max_key_bytes, 64);
        assert_eq!(config.keyspaces[0].ty, CrdtType::Set);
        let again = Config::from_toml(&config.to_toml().expect("serializes")).expect("valid");
        assert_eq!(again, config);
    }

    fn error_of(text: &str) -> String {
        Config::from_toml(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        assert!(error_of(&format!("{MINIMAL}\nreplicaid = 3")).contains("replicaid"));
        let nested = error_of(&format!("{MINIMAL}\n[limits]\nmax_key_byte = 3"));
        assert!(nested.contains("max_key_byte"), "{nested}");
        let peer = error_of(&format!(
            "{MINIMAL}\n[[peers]]\nregion = \"b\"\nreplica_id = 2\nendpoint = \"http://b:1\"\nweight = 1"
        ));
        assert!(peer.contains("weight"), "{peer}");
    }

    #[test]
    fn missing_required_fields_are_named() {
        let e = error_of("region = \"us-east\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"");
        assert!(e.contains("replica_id"), "{e}");
        let e = error_of("replica_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"");
        assert!(e.contains("region"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        let cases = [
            ("replica_id = 0", "replica_id must be 1 or more"),
            ("region = \"US East\"", "lowercase"),
            ("listen = \"not-an-address\"", "listen"),
            ("durability = \"sometimes\"", "sometimes"),
            ("[limits]\nmax_key_bytes = 0", "max_key_bytes"),
            ("[storage]\nflush_every_ms = 0", "flush_every_ms"),
            (
                "[storage]\njournal_segment_bytes = 100",
                "journal_segment_bytes",
            ),
            ("metrics_listen = \"127.0.0.1:7101\"", "must differ"),
            (
                "[[keyspaces]]\nname = \"\"\ntype = \"set\"",
                "keyspaces[0].name",
            ),
            ("[[keyspaces]]\nname = \"a\"\ntype = \"map\"", "map"),
            (
                "[[peers]]\nregion = \"us-east\"\nreplica_id = 2\nendpoint = \"http://x:1\"",
                "appears twice",
            ),
            (
                "[[peers]]\nregion = \"b\"\nreplica_id = 1\nendpoint = \"http://x:1\"",
                "appears twice",
            ),
            (
                "[[peers]]\nregion = \"b\"\nreplica_id = 2\nendpoint = \"x:1\"",
                "http://",
            ),
        ];
        for (change, expected) in cases {
            // Later keys win in a table only by replacing the line, so build
            // each case from the minimal file with the field swapped in.
            let key = change.split([' ', '\n']).next().unwrap_or_default();
            let base: String = MINIMAL
                .lines()
                .filter(|l| !l.trim_start().starts_with(&format!("{key} ")))
                .collect::<Vec<_>>()
                .join("\n");
            let e = error_of(&format!("{base}\n{change}"));
            assert!(e.contains(expected), "{change:?}: {e}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature
    fn environment_and_flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("CONCORD_NODE_MAX_DRIFT_MS", "42");
            jail.set_env("CONCORD_NODE_LIMITS__MAX_KEY_BYTES", "99");
            jail.set_env("CONCORD_NODE_REGION", "from-env");
            let overrides = Overrides {
                region: Some("from-flag".into()),
                ..Overrides::default()
            };
            let config = Config::load(Some(&path), &overrides).map_err(|e| e.to_string())?;
            assert_eq!(config.max_drift_ms, 42);
            assert_eq!(config.limits.max_key_bytes, 99);
            assert_eq!(config.region, "from-flag");
            jail.set_env("CONCORD_NODE_NO_SUCH_FIELD", "1");
            let e = Config::load(Some(&path), &Overrides::default())
                .expect_err("unknown env field")
                .to_string();
            assert!(e.contains("no_such_field"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = Config::load(
            Some(Path::new("/no/such/concord.toml")),
            &Overrides::default(),
        )
        .expect_err("missing")
        .to_string();
        assert!(e.contains("/no/such/concord.toml"), "{e}");
    }
}
