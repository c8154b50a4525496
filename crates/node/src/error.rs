//! The one error type of this crate, and how it reaches clients as a gRPC
//! status.

use concord_core::CoreError;
use concord_store::StoreError;
use tonic::{Code, Status};

/// Everything that can go wrong serving a region.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The request or the data is invalid for the CRDT core.
    #[error(transparent)]
    Core(#[from] CoreError),

    /// A request names a keyspace this region does not know.
    #[error("keyspace {0:?} does not exist")]
    UnknownKeyspace(String),

    /// An operation needs another keyspace type than the keyspace has.
    #[error("keyspace {keyspace:?} holds {is} values; this operation needs a {needs} keyspace")]
    WrongType {
        /// The keyspace as named in the request.
        keyspace: String,
        /// Its type.
        is: concord_core::CrdtType,
        /// The type the operation needs.
        needs: concord_core::CrdtType,
    },

    /// A request is malformed (beyond what the core checks).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The node is shutting down, or a background task it needed is gone.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// The configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The node could not start or serve: a port, the metrics endpoint or
    /// the transport failed.
    #[error("{0}")]
    Serve(String),
}

impl NodeError {
    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::Store(e) => store_code(e),
            NodeError::Core(e) => core_code(e),
            NodeError::UnknownKeyspace(_) => Code::NotFound,
            NodeError::WrongType { .. } => Code::FailedPrecondition,
            NodeError::InvalidRequest(_) => Code::InvalidArgument,
            NodeError::Unavailable(_) => Code::Unavailable,
            NodeError::Config(_) => Code::InvalidArgument,
            NodeError::Serve(_) => Code::Unavailable,
        }
    }
}

fn core_code(e: &CoreError) -> Code {
    match e {
        CoreError::Invalid { .. }
        | CoreError::Decode { .. }
        | CoreError::UnsupportedFormat { .. } => Code::InvalidArgument,
        CoreError::LimitExceeded { .. } => Code::ResourceExhausted,
        CoreError::TypeMismatch { .. } | CoreError::KeyspaceTypeConflict { .. } => {
            Code::FailedPrecondition
        }
        CoreError::CounterOverflow { .. } | CoreError::OutOfRange { .. } => Code::OutOfRange,
        CoreError::Bug(_) => Code::Internal,
        CoreError::ClockDrift { .. } | CoreError::ClockExhausted { .. } => Code::Unavailable,
        CoreError::DotGap { .. } => Code::Internal,
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::Core(e) => core_code(e),
        StoreError::UnknownKeyspace { .. } => Code::NotFound,
        StoreError::Sled(_) if e.is_retryable() => Code::Unavailable,
        StoreError::Options(_) => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error serving a request");
        }
        Status::new(code, e.to_string())
    }
}

/// Result with [`NodeError`].
pub type Result<T, E = NodeError> = std::result::Result<T, E>;
