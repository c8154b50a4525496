//! Deterministic simulation of whole multi-region concord clusters.
//!
//! Each region is a turmoil host running the real node
//! ([`concord_node::Node`]): tonic over turmoil's simulated TCP, turmoil's
//! clock (from a fixed epoch, plus a skew per host) feeding the HLC, sled
//! on a real directory per host that survives a crash and restart, and
//! every blocking store call run inline ([`concord_store::Offload::Inline`])
//! so the whole cluster advances on one thread in an order fixed by the
//! seed. Clients send random operations of all four types to random
//! regions and record every answer.
//!
//! - [`scenario`]: what a seed decides: regions, latencies, fault schedule.
//! - [`mod@run`]: one seed, start to checks ([`run()`]).
//! - [`check`]: replica dumps, and the checks of acknowledged writes.
//! - [`workload`]: the clients and their history.
//! - [`disk`]: the regions' disks, which lose what was not synced in a
//!   power cut, tear a write, fail a sync, or run slow.
//! - [`net`], [`time`]: the node's transport and clock in the simulation.
//! - [`trace`]: the digest that proves a seed replays exactly.

pub mod check;
pub mod disk;
pub mod net;
pub mod panics;
pub mod run;
pub mod scenario;
pub mod time;
pub mod trace;
pub mod workload;

pub use run::{run, Outcome};

/// Whether runs replay exactly: the build must pass `--cfg tokio_unstable`
/// (the workspace's `.cargo/config.toml` does, unless `RUSTFLAGS` replaces
/// it), so that turmoil can seed each host runtime's RNG.
pub const REPRODUCIBLE: bool = cfg!(tokio_unstable);

/// Why a run may not replay, when it may not.
pub fn reproducibility_warning() -> Option<&'static str> {
    (!REPRODUCIBLE).then_some(
        "built without --cfg tokio_unstable (RUSTFLAGS replaces .cargo/config.toml): seeds will not replay exactly",
    )
}
pub use scenario::{FaultKind, Options, Plan};
