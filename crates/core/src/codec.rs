//! The versioned binary encoding shared by deltas and values: one format
//! version byte, then postcard.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CoreError, Result};

/// Encodes `value` behind `version`.
pub(crate) fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    postcard::to_extend(value, vec![version]).unwrap_or_default()
}

/// Decodes what [`encode`] wrote with `version`, refusing other versions
/// and trailing bytes. Never panics; postcard reads only within `bytes`, and
/// serde's cautious size hints bound pre-allocation.
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    version: u8,
    bytes: &[u8],
) -> Result<T> {
    let (&found, body) = bytes
        .split_first()
        .ok_or_else(|| CoreError::decode(what, "empty input"))?;
    if found != version {
        return Err(CoreError::UnsupportedFormat {
            what,
            version: found,
        });
    }
    let (value, rest): (T, _) =
        postcard::take_from_bytes(body).map_err(|e| CoreError::decode(what, e))?;
    if !rest.is_empty() {
        return Err(CoreError::decode(
            what,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(value)
}
