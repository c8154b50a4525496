//! The run's trace: every event that decides its outcome, folded into a
//! digest (FNV-1a, 64 bits) so two runs compare by one number, and kept
//! as text when asked, for a replay's log.

use std::fmt;

/// A run's trace.
#[derive(Debug)]
pub struct Trace {
    hash: u64,
    lines: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    /// An empty trace for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut trace = Trace {
            hash: FNV_OFFSET,
            lines: 0,
        };
        trace.line(format_args!("seed {seed}"));
        trace
    }

    /// Adds one event. It is also logged at trace level (target
    /// `concord_sim::trace`), which `replay` shows.
    pub fn line(&mut self, event: fmt::Arguments<'_>) {
        let text = event.to_string();
        tracing::trace!(target: "concord_sim::trace", "{text}");
        for b in text.as_bytes().iter().chain(b"\n") {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
        self.lines += 1;
    }

    /// The digest of everything added so far.
    pub fn digest(&self) -> u64 {
        self.hash ^ self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_content_and_order() {
        let digest = |lines: &[&str]| {
            let mut t = Trace::new(1);
            for l in lines {
                t.line(format_args!("{l}"));
            }
            t.digest()
        };
        assert_eq!(digest(&["a", "b"]), digest(&["a", "b"]));
        assert_ne!(digest(&["a", "b"]), digest(&["b", "a"]));
        assert_ne!(digest(&["ab"]), digest(&["a", "b"]));
    }
}
