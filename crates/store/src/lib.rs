//! Durable region state for concord, in sled 0.34.
//!
//! - [`Store`] (`store`): the region's state, the writer lock, and the
//!   committer: where a commit runs (staged, or in a sled transaction),
//!   its journal write, and the durability waits. Its other methods live
//!   along the store's seams:
//!   - `open`: opening a data directory (refusing one of another region,
//!     of an unknown format, or corrupted) and recovering it; `options`:
//!     [`Identity`] and [`StoreOptions`];
//!   - `local`: a client's batches ([`Item`]), prepared, stamped, logged;
//!   - `remote`: a peer's delta batches, and the journal's replay;
//!   - `reads`: values, lone reads, ranges, the catalog (kept in memory),
//!     the version vector, the logs;
//!   - `records`: the record primitives every commit uses (values, stream
//!     rows, declarations, the clock's high-water mark).
//! - [`layout`]: how the state maps onto sled trees and keys, and why.
//! - [`disk`]: the file operations a store makes, behind a trait the
//!   simulator implements with a disk that loses, tears and fails writes;
//!   sled's flushes go through it too.
//! - [`durability`]: group commit: a write is acknowledged after a flush
//!   that concurrent writes share (`group`), or before it (`relaxed`).
//! - [`journal`]: the append-only file group commit syncs, which sled's
//!   state is recovered from after a crash.
//! - [`logs`]: bounded growth: log truncation below a vector, the
//!   per-origin log size cap, and the sweep of trimmed stream rows.
//! - `pipeline`: staged local commits queued for their journal write, so
//!   that the writer lock is free meanwhile.
//! - [`offload`]: where blocking work runs: tokio's blocking pool, or
//!   inline on a deterministic single-threaded runtime.
//! - [`recent`]: the newest deltas of every log, kept in memory for the
//!   peers tailing them.
//! - `runs`: the log's records, each a run of one origin's consecutive
//!   deltas.
//! - `rw`: one tree as a commit sees it (a sled transaction, or writes
//!   staged in memory), and the commit's result type.
//! - `sets`: sets stored member by member.
//! - [`snapshot`]: chunked export of the whole state and its import by
//!   CvRDT merge, for catch-up.
//! - [`StoreError`]: the crate's one error type.
//!
//! Every mutation — a local write with its log records and version vector
//! entry, or a batch of remote deltas — is all or nothing across a crash:
//! in `group` durability its deltas are in the journal before its records
//! reach sled, and the journal's replay completes a commit sled kept in
//! part; in `relaxed` durability it commits in one sled transaction.
//! Mutations are serialized by one writer lock: local sequence numbers must
//! be assigned in commit order anyway.

pub mod disk;
pub mod durability;
mod error;
pub mod journal;
pub mod layout;
mod local;
pub mod logs;
pub mod offload;
mod open;
mod options;
mod pipeline;
mod reads;
pub mod recent;
mod records;
mod remote;
mod runs;
mod rw;
mod sets;
pub mod snapshot;
mod store;

pub use disk::{Disk, DiskFile, OsDisk};
pub use durability::Durability;
pub use error::{Result, StoreError};
pub use local::Item;
pub use logs::{LogStats, TruncateReport};
pub use offload::{Offload, OffloadFailed};
pub use options::{Identity, StoreOptions};
pub use snapshot::{Declaration, ImportReport, SnapshotChunk, SnapshotCursor, SnapshotValue};
pub use store::{ApplyReport, Store, WriteReceipt};
