//! Generated protobuf messages and gRPC services of concord's API.
//!
//! The source of truth is `proto/concord/v1/` at the repository root:
//!
//! - `types.proto`: types shared by both APIs (CRDT types, stream ids, version
//!   vectors);
//! - `client.proto`: the `Concord` service that applications, the SDK and the
//!   CLI use;
//! - `peer.proto`: the `Replication` service that region nodes use among
//!   themselves.
//!
//! Everything is generated at build time by protox and tonic-prost-build; no
//! system `protoc` is needed. [`FILE_DESCRIPTOR_SET`] holds the compiled
//! descriptors for gRPC server reflection.

/// Version 1 of the concord protocol.
pub mod v1 {
    #![allow(missing_docs)]
    #![allow(clippy::all)]
    tonic::include_proto!("concord.v1");
}

/// The encoded `FileDescriptorSet` of every concord `.proto` file, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/concord_descriptor.bin"));

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources, joined with `: ` (transport errors hide the
/// useful part, such as "Connection refused", in their sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let said = source.to_string();
        // Some errors print their source's text in their own already, or
        // wrap an error of the same words: say each part once.
        if !said.is_empty() && !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = source.source();
    }
    text
}

/// Version of the peer protocol spoken by this build (`Hello.protocol_version`).
/// Version 2 carries deltas in concord's binary encoding instead of
/// protobuf messages of their own.
pub const PEER_PROTOCOL_VERSION: u32 = 2;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn an_error_chain_says_each_part_once() {
        let refused = Layer("Connection refused (os error 111)", None);
        let inner = Layer("tcp connect error", Some(Box::new(refused)));
        let outer = Layer("tcp connect error", Some(Box::new(inner)));
        let top = Layer("transport error", Some(Box::new(outer)));
        assert_eq!(
            super::error_chain(&top),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn descriptor_set_lists_both_services() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        assert!(services.contains(&"concord.v1.Concord".to_string()));
        assert!(services.contains(&"concord.v1.Replication".to_string()));
    }

    #[test]
    fn a_batch_round_trips_through_the_wire_format() {
        let batch = v1::DeltaBatch {
            deltas: vec![vec![1, 2, 3], Vec::new()],
        };
        let bytes = batch.encode_to_vec();
        let back = v1::DeltaBatch::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, batch);
    }
}
