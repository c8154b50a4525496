//! Black-box integration tests that run real `concord-node` processes on
//! 127.0.0.1.
//!
//! Not implemented yet; see the README's status section.
