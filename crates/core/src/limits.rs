//! Size limits on everything a client or a peer can send.
//!
//! Every limit is explicit and carries its unit in its name. The defaults
//! suit a general-purpose deployment; a node's configuration may lower or
//! raise them within [`Limits::validate`]'s bounds.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Longest keyspace name, in bytes. Fixed: names are part of the replicated
/// state, so every region must accept every other region's names.
pub const MAX_KEYSPACE_NAME_BYTES: usize = 128;

/// Hard ceiling of any single limit below, so a bad configuration cannot
/// make a node accept what its peers refuse to hold in memory.
pub const LIMIT_CEILING_BYTES: usize = 64 << 20;

/// Size limits applied to client requests and to peer deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// Longest register value, in bytes.
    pub max_value_bytes: usize,
    /// Longest set member, in bytes.
    pub max_member_bytes: usize,
    /// Most members in one set add or remove.
    pub max_members_per_op: usize,
    /// Most fields in one stream entry.
    pub max_fields_per_entry: usize,
    /// Longest stream field name, in bytes of UTF-8.
    pub max_field_name_bytes: usize,
    /// Largest stream entry (names and values of all its fields), in bytes.
    pub max_entry_bytes: usize,
    /// Most replicas in the observed context of a set remove.
    pub max_observed_replicas: usize,
    /// Largest encoded delta, in bytes.
    pub max_delta_bytes: usize,
    /// Most operations in one batch request.
    pub max_batch_ops: usize,
    /// Most entries one stream range read returns.
    pub max_range_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_member_bytes: 64 << 10,
            max_members_per_op: 1024,
            max_fields_per_entry: 256,
            max_field_name_bytes: 256,
            max_entry_bytes: 1 << 20,
            max_observed_replicas: 1024,
            max_delta_bytes: 4 << 20,
            max_batch_ops: 1024,
            max_range_entries: 10_000,
        }
    }
}

impl Limits {
    /// Checks that the limits are usable together: all positive, each below
    /// [`LIMIT_CEILING_BYTES`], and any single allowed value, member or entry
    /// fits a delta. (An operation carrying many members is refused when its
    /// encoded delta exceeds `max_delta_bytes`.)
    pub fn validate(&self) -> Result<()> {
        let all = [
            ("max_key_bytes", self.max_key_bytes),
            ("max_value_bytes", self.max_value_bytes),
            ("max_member_bytes", self.max_member_bytes),
            ("max_members_per_op", self.max_members_per_op),
            ("max_fields_per_entry", self.max_fields_per_entry),
            ("max_field_name_bytes", self.max_field_name_bytes),
            ("max_entry_bytes", self.max_entry_bytes),
            ("max_observed_replicas", self.max_observed_replicas),
            ("max_delta_bytes", self.max_delta_bytes),
            ("max_batch_ops", self.max_batch_ops),
            ("max_range_entries", self.max_range_entries),
        ];
        for (name, value) in all {
            if value == 0 || value > LIMIT_CEILING_BYTES {
                return Err(CoreError::invalid(
                    "limits",
                    format!("{name} is {value}; it must be between 1 and {LIMIT_CEILING_BYTES}"),
                ));
            }
        }
        // A delta carries the key and the keyspace name besides its payload.
        let envelope = self.max_key_bytes + MAX_KEYSPACE_NAME_BYTES + 64;
        let largest_payload = self
            .max_value_bytes
            .max(self.max_entry_bytes + self.max_fields_per_entry * 8)
            .max(self.max_member_bytes + 8);
        if self.max_delta_bytes < envelope + largest_payload {
            return Err(CoreError::invalid(
                "limits",
                format!(
                    "max_delta_bytes is {}, but a single allowed operation may need {}",
                    self.max_delta_bytes,
                    envelope + largest_payload
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn check(&self, what: &'static str, limit: usize, actual: usize) -> Result<()> {
        if actual > limit {
            return Err(CoreError::LimitExceeded {
                what,
                limit: limit as u64,
                actual: actual as u64,
            });
        }
        Ok(())
    }

    /// Checks a key: non-empty and at most `max_key_bytes`.
    pub fn check_key(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(CoreError::invalid("key", "must not be empty"));
        }
        self.check("key length (bytes)", self.max_key_bytes, key.len())
    }
}

/// Checks a keyspace name: 1 to [`MAX_KEYSPACE_NAME_BYTES`] bytes of ASCII
/// letters, digits, `_`, `-` and `.`, starting with a letter or a digit.
/// `#` is reserved for conflict aliases (`name#type`).
pub fn check_keyspace_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(CoreError::invalid("keyspace name", "must not be empty"));
    }
    if name.len() > MAX_KEYSPACE_NAME_BYTES {
        return Err(CoreError::LimitExceeded {
            what: "keyspace name length (bytes)",
            limit: MAX_KEYSPACE_NAME_BYTES as u64,
            actual: name.len() as u64,
        });
    }
    let first_ok = name.as_bytes()[0].is_ascii_alphanumeric();
    let rest_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !first_ok || !rest_ok {
        return Err(CoreError::invalid(
            "keyspace name",
            format!(
                "{name:?} must start with a letter or digit and use only ASCII letters, digits, '_', '-' and '.'"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let limits = Limits {
            max_delta_bytes: 1024,
            ..Limits::default()
        };
        assert!(limits.validate().is_err());
        let limits = Limits {
            max_batch_ops: 0,
            ..Limits::default()
        };
        assert!(limits.validate().is_err());
    }

    #[test]
    fn keyspace_names() {
        for ok in ["a", "carts", "user.sessions-v2", "9lives", "A_b"] {
            check_keyspace_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a#set", "é", &"x".repeat(129)] {
            assert!(check_keyspace_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
