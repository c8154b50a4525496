//! Durable region state for concord, in sled.
//!
//! This crate will hold the keyspace catalog, values, per-origin delta logs,
//! version vectors and peer acknowledgements of one region, with atomic
//! writes and group-commit durability. It is not implemented yet; see the
//! README's status section.
