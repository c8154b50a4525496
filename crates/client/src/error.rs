//! The SDK's one error type.

use std::time::Duration;

use concord_proto::code_name;
use tonic::Code;

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node answered with an error: a bad request, an unknown
    /// keyspace, a wrong type, a limit. [`Error::code`] tells which.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),

    /// A write (or a batch with a write) failed in a way that does not tell
    /// whether the node applied it: the node became unavailable or the call
    /// timed out. It was not retried; the next call goes to the next
    /// endpoint. Retrying it may apply it twice (a counter increment counted
    /// twice, a stream entry appended twice).
    #[error("the write's outcome is unknown (it may or may not have been applied) on {endpoint}: {reason}")]
    WriteOutcomeUnknown {
        /// The endpoint the write was sent to.
        endpoint: String,
        /// What happened.
        reason: String,
    },

    /// No endpoint could serve a read or an idempotent call.
    #[error("no endpoint is available (tried {tried}); last error: {last}")]
    Unavailable {
        /// How many endpoints were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },

    /// The client was given no endpoint, or one that is not a URL.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it is invalid.
        reason: String,
    },

    /// An argument was refused before anything was sent (for example a
    /// stream id that does not parse).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The node answered with something this SDK does not understand
    /// (a newer or broken server).
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl Error {
    /// The gRPC code that best describes the error.
    pub fn code(&self) -> Code {
        match self {
            Error::Status(s) => s.code(),
            Error::WriteOutcomeUnknown { .. } | Error::Unavailable { .. } => Code::Unavailable,
            Error::InvalidEndpoint { .. } | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Protocol(_) => Code::Internal,
        }
    }
}

pub(crate) fn timed_out(after: Duration) -> String {
    format!("no answer within {} ms", after.as_millis())
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
