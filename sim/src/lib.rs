//! Deterministic simulation of multi-region concord clusters on turmoil.
//!
//! Not implemented yet; see the README's status section.
