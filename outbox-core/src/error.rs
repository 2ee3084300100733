//! Errors of the backend-free outbox types.

use crate::ValidationError;

/// What can go wrong while building or reading an outbox message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload could not be serialized to JSON.
    #[error("encoding the payload as JSON failed")]
    Encode(#[source] serde_json::Error),
    /// The message breaks a limit; nothing was written.
    #[error("invalid message")]
    Invalid(#[from] ValidationError),
    /// A stored row has a status this version does not know (written by a newer version?).
    #[error("unknown message status code {0}")]
    UnknownStatus(i16),
}

/// Tells whether trying the same operation again later may succeed.
///
/// The relay backs off and retries on a retryable store error (a lost connection, a
/// serialization failure, a deadlock, a pool timeout) and logs the others at error level.
pub trait Retryable {
    /// `true` when the failure is transient.
    fn is_retryable(&self) -> bool;
}

/// Nothing to retry: the error of a source that cannot fail (the in-process broker).
impl Retryable for std::convert::Infallible {
    fn is_retryable(&self) -> bool {
        match *self {}
    }
}
