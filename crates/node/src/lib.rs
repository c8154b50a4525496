//! The concord region node: client service, replication service, replicator
//! tasks and configuration.
//!
//! Not implemented yet; see the README's status section.
