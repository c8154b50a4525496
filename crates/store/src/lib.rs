//! Durable region state for concord, in sled 0.34.
//!
//! - [`Store`]: opens a region's data directory (refusing one of another
//!   region, of an unknown format, or corrupted), applies local writes and
//!   remote deltas atomically, and serves reads.
//! - [`layout`]: how the state maps onto sled trees and keys, and why.
//! - [`durability`]: group commit: a write is acknowledged after a flush
//!   that concurrent writes share (`group`), or before it (`relaxed`).
//! - [`StoreError`]: the crate's one error type.
//!
//! Every mutation — a local write with its log entry and version vector
//! entry, or a batch of remote deltas — commits in one sled transaction, so
//! a crash never leaves a value without its delta or the reverse. Mutations
//! are serialized by one writer lock: local sequence numbers must be
//! assigned in commit order anyway, and a single writer never has sled retry
//! a conflicting transaction.

pub mod durability;
mod error;
pub mod layout;
mod store;

pub use durability::Durability;
pub use error::{Result, StoreError};
pub use store::{ApplyReport, Identity, Item, ItemResult, Store, StoreOptions, WriteReceipt};
