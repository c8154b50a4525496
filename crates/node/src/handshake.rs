//! The opening of a replication stream, for both of its ends, the one
//! check of a peer's clock, and why a stream fails.
//!
//! A subscriber ([`crate::link`]) opens with a `Hello`; the provider
//! ([`crate::peer`]) answers with a `Welcome`. Each end checks what the
//! other says with the functions here: the protocol version, who the peer
//! is, and, on every frame either way, its clock (`observe_clock`).
//!
//! Failures are typed by whose fault they are ([`LinkError`]): the peer's
//! (refused and counted on its status), the network's (retried), or this
//! node's own (its store or disk, or a bug), so a status and a log line can
//! say which.

use concord_core::{CoreError, Hlc, VersionVector};
use concord_proto::v1 as pb;
use concord_proto::PEER_PROTOCOL_VERSION;
use tonic::{Code, Status};

use crate::engine::Engine;
use crate::error::NodeError;
use crate::peer::{Peers, Refusal};

/// Why a replication stream failed, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached: the connection failed, or no answer
    /// came in time. Retried with backoff.
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The peer's endpoint.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The peer refused the stream or ended it with an error status.
    #[error("{what}: {}: {message}", concord_proto::code_name(*code))]
    Status {
        /// When: "refused" (the opening) or "stream ended".
        what: &'static str,
        /// The status code the peer (or the transport) gave.
        code: Code,
        /// Its message.
        message: String,
    },
    /// Nothing arrived from the peer for longer than its heartbeats allow.
    #[error("nothing from the peer for {silent_s} s (heartbeats are every {heartbeat_s} s)")]
    Silent {
        /// Seconds without a frame.
        silent_s: u64,
        /// The heartbeat interval, in seconds.
        heartbeat_s: u64,
    },
    /// The peer accepted the connection but did not answer the opening
    /// in time.
    #[error("connected, but no answer within {within_s} s")]
    NoAnswer {
        /// The handshake's timeout, in seconds.
        within_s: u64,
    },
    /// The peer ended the stream cleanly.
    #[error("the peer ended the stream")]
    Ended,
    /// The stream towards the peer closed: the connection is gone.
    #[error("the stream towards the peer closed")]
    Closed,
    /// The peer's clock is further ahead than `max_drift_ms`.
    #[error("refused the peer's clock: {0}")]
    Clock(CoreError),
    /// The peer broke the protocol or sent data this node refuses.
    #[error(transparent)]
    Peer(#[from] PeerFault),
    /// This node failed: its store, its disk, or a bug.
    #[error("this node failed: {0}")]
    Local(#[from] NodeError),
}

/// What a peer did wrong. Each is counted on the peer's status under its
/// [`Refusal`].
#[derive(Debug, thiserror::Error)]
pub enum PeerFault {
    /// The first frame was not the opening the protocol asks for.
    #[error("the first frame was not a {0}")]
    NoOpening(&'static str),
    /// The peer is not who it should be.
    #[error("{claimed} is not a configured peer: {expected}")]
    Unknown {
        /// Who it says it is.
        claimed: String,
        /// Who was expected, in words.
        expected: String,
    },
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {0}, this node {PEER_PROTOCOL_VERSION}")]
    Protocol(u32),
    /// The peer sent a frame or data out of protocol.
    #[error("refused the peer's data: {0}")]
    BadData(String),
}

impl PeerFault {
    /// The cause it is counted under.
    pub fn refusal(&self) -> Refusal {
        match self {
            PeerFault::Unknown { .. } => Refusal::UnknownPeer,
            PeerFault::NoOpening(_) | PeerFault::Protocol(_) | PeerFault::BadData(_) => {
                Refusal::BadBatch
            }
        }
    }
}

impl LinkError {
    /// An error status from the peer or the transport. A frame over the
    /// message limit, which the decoder refuses before it is read, is the
    /// peer's fault.
    pub(crate) fn status(what: &'static str, s: &Status) -> LinkError {
        if s.code() == Code::OutOfRange && s.message().contains("too large") {
            return LinkError::Peer(PeerFault::BadData(format!(
                "a frame over the message limit: {}",
                s.message()
            )));
        }
        LinkError::Status {
            what,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// The cause a peer's status shows while the link is down after it.
    pub fn down_cause(&self) -> pb::LinkDownCause {
        match self {
            LinkError::Unreachable { .. } | LinkError::NoAnswer { .. } => {
                pb::LinkDownCause::Unreachable
            }
            // A peer that says no; one going away (shutting down, killed,
            // a connection reset) is not refusing anything.
            LinkError::Status { code, what, .. } => match code {
                Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Aborted => {
                    if *what == "refused" {
                        pb::LinkDownCause::Unreachable
                    } else {
                        pb::LinkDownCause::Ended
                    }
                }
                _ => pb::LinkDownCause::Refused,
            },
            LinkError::Silent { .. } => pb::LinkDownCause::Silent,
            LinkError::Ended | LinkError::Closed => pb::LinkDownCause::Ended,
            LinkError::Clock(_) => pb::LinkDownCause::ClockRefused,
            LinkError::Peer(_) => pb::LinkDownCause::PeerFault,
            LinkError::Local(_) => pb::LinkDownCause::LocalFailure,
        }
    }

    /// True when the peer is at fault.
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, LinkError::Peer(_) | LinkError::Clock(_))
    }

    /// The peer sent data out of protocol: refused, and counted on peer
    /// `index`'s status.
    pub(crate) fn bad_data(peers: &Peers, index: usize, message: impl Into<String>) -> LinkError {
        LinkError::Peer(PeerFault::BadData(message.into())).counted(peers, index)
    }

    /// Counts the failure on peer `index`'s status when the peer is at
    /// fault; returns the error.
    pub(crate) fn counted(self, peers: &Peers, index: usize) -> LinkError {
        match &self {
            LinkError::Peer(fault) => peers.refused_by_index(index, fault.refusal()),
            LinkError::Clock(_) => peers.refused_by_index(index, Refusal::ClockDrift),
            _ => {}
        }
        self
    }
}

/// How a provider ends a subscription it refuses.
impl From<LinkError> for Status {
    fn from(e: LinkError) -> Status {
        match e {
            LinkError::Local(e) => e.into(),
            LinkError::Status { code, message, .. } => Status::new(code, message),
            LinkError::Peer(PeerFault::Unknown { .. }) => Status::permission_denied(e.to_string()),
            LinkError::Peer(PeerFault::Protocol(_)) | LinkError::Clock(_) => {
                Status::failed_precondition(e.to_string())
            }
            LinkError::Peer(_) => Status::invalid_argument(e.to_string()),
            LinkError::Silent { .. }
            | LinkError::NoAnswer { .. }
            | LinkError::Unreachable { .. }
            | LinkError::Ended
            | LinkError::Closed => Status::unavailable(e.to_string()),
        }
    }
}

/// Checks the protocol version the other end speaks.
pub(crate) fn check_protocol(theirs: u32) -> Result<(), PeerFault> {
    if theirs == PEER_PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(PeerFault::Protocol(theirs))
    }
}

/// Observes the clock of a frame from peer `index`, on either end of a
/// stream: records the contact and the skew, and refuses (and counts) a
/// clock further ahead than `max_drift_ms`, which then moves nothing here.
pub(crate) fn observe_clock(
    engine: &Engine,
    peers: &Peers,
    index: usize,
    sender_hlc: u64,
) -> Result<(), LinkError> {
    let clock = engine.clock();
    let remote = Hlc::from_u64(sender_hlc);
    peers.contact(index, remote, clock.physical_unix_ms());
    match clock.observe(remote) {
        Ok(_) => {
            peers.clock_accepted(index);
            Ok(())
        }
        Err(e @ CoreError::ClockDrift { .. }) => {
            tracing::debug!(peer = %peers.config(index).region, error = %e, "refused a peer's clock");
            Err(LinkError::Clock(e).counted(peers, index))
        }
        Err(e) => Err(LinkError::Local(e.into())),
    }
}

/// The opening a subscriber sends: who it is, what it has, and which
/// origins it wants.
pub(crate) fn hello(engine: &Engine, applied: &VersionVector, origins: Vec<u32>) -> pb::Hello {
    let identity = engine.store().identity();
    pb::Hello {
        protocol_version: PEER_PROTOCOL_VERSION,
        region: identity.region.clone(),
        replica_id: identity.replica.0,
        applied: Some(applied.into()),
        origins,
    }
}

/// The answer a provider sends to an accepted `Hello`.
pub(crate) fn welcome(engine: &Engine, applied: &VersionVector) -> pb::Welcome {
    let identity = engine.store().identity();
    pb::Welcome {
        protocol_version: PEER_PROTOCOL_VERSION,
        region: identity.region.clone(),
        replica_id: identity.replica.0,
        applied: Some(applied.into()),
    }
}

/// Checks a provider's `Welcome` against the peer `index` the subscriber
/// dialled: the region and replica id configured for that endpoint, and
/// the protocol version.
pub(crate) fn check_welcome(
    peers: &Peers,
    index: usize,
    welcome: &pb::Welcome,
) -> Result<(), PeerFault> {
    let config = peers.config(index);
    if welcome.region != config.region || welcome.replica_id != config.replica_id {
        return Err(PeerFault::Unknown {
            claimed: format!(
                "{} (region {:?} with replica id {})",
                config.endpoint, welcome.region, welcome.replica_id
            ),
            expected: format!(
                "the configured region {:?} with replica id {}",
                config.region, config.replica_id
            ),
        });
    }
    check_protocol(welcome.protocol_version)
}

/// Checks a subscriber's `Hello`: it must come from a configured peer with
/// its configured replica id, in this protocol version. Returns the
/// peer's index; an unknown caller is counted apart from the peers.
pub(crate) fn check_hello(
    engine: &Engine,
    peers: &Peers,
    hello: &pb::Hello,
) -> Result<usize, LinkError> {
    let Some(index) = peers.find(&hello.region, hello.replica_id) else {
        peers.refused_unknown(Refusal::UnknownPeer);
        let caller = format!("{}/{}", hello.region, hello.replica_id);
        if peers.warn_now(&caller, "unknown") {
            tracing::warn!(region = %hello.region, replica_id = hello.replica_id, "refused a subscription from an unknown region (said again at most once a minute)");
        } else {
            tracing::debug!(region = %hello.region, replica_id = hello.replica_id, "refused a subscription from an unknown region");
        }
        return Err(LinkError::Peer(PeerFault::Unknown {
            claimed: format!(
                "region {:?} with replica id {}",
                hello.region, hello.replica_id
            ),
            expected: format!(
                "the peers of region {:?} are configured by region and replica id",
                engine.store().identity().region
            ),
        }));
    };
    check_protocol(hello.protocol_version)
        .map_err(|fault| LinkError::Peer(fault).counted(peers, index))?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_is_told_apart_by_whose_fault_it_is() {
        assert!(LinkError::Peer(PeerFault::Protocol(1)).is_peer_fault());
        assert!(!LinkError::Ended.is_peer_fault());
        assert!(!LinkError::Local(NodeError::Unavailable("disk".into())).is_peer_fault());
        let too_large = Status::out_of_range("decoded message length too large");
        assert!(LinkError::status("stream ended", &too_large).is_peer_fault());
        let refused = Status::permission_denied("not a peer");
        let e = LinkError::status("refused", &refused);
        assert!(!e.is_peer_fault());
        assert_eq!(e.to_string(), "refused: PERMISSION_DENIED: not a peer");
        assert_eq!(
            Status::from(LinkError::Peer(PeerFault::Protocol(1))).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            PeerFault::Unknown {
                claimed: String::new(),
                expected: String::new()
            }
            .refusal(),
            Refusal::UnknownPeer
        );
        assert_eq!(e.down_cause(), pb::LinkDownCause::Refused);
        let going = LinkError::status("stream ended", &Status::unavailable("shutting down"));
        assert_eq!(going.down_cause(), pb::LinkDownCause::Ended);
        let gone = LinkError::status("refused", &Status::unknown("connection reset"));
        assert_eq!(gone.down_cause(), pb::LinkDownCause::Unreachable);
        assert!(check_protocol(PEER_PROTOCOL_VERSION).is_ok());
        assert!(matches!(check_protocol(1), Err(PeerFault::Protocol(1))));
    }
}
