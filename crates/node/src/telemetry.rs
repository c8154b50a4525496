//! Log setup for the node's binaries: a tracing subscriber with an
//! environment filter (`RUST_LOG` wins over the configured filter) and
//! text or JSON lines on standard error.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::error::{NodeError, Result};

/// Installs the global tracing subscriber described by `log`.
pub fn init(log: &LogConfig) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => filter,
        _ => log.filter.clone(),
    };
    let filter = EnvFilter::try_new(&filter)
        .map_err(|e| NodeError::Config(format!("log.filter {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| NodeError::Serve(format!("cannot install the log subscriber: {e}")))
}
