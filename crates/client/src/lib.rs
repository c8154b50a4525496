//! The Rust gRPC client SDK for concord.
//!
//! Not implemented yet; see the README's status section.
