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

/// An error and its sources on one line, joined with `: `; a source whose text the line
/// already holds (an error that prints its cause itself) is not repeated. For logs and
/// reasons that must name the cause, not just the outermost error.
///
/// ```
/// use waybill_outbox_core::error_chain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("publishing failed")]
/// struct Outer(#[source] std::io::Error);
///
/// let error = Outer(std::io::Error::other("connection refused"));
/// assert_eq!(error_chain(&error), "publishing failed: connection refused");
/// ```
pub fn error_chain(error: &dyn std::error::Error) -> String {
    // Trimmed: libpq ends its messages with a newline.
    let mut text = error.to_string().trim_end().to_owned();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        let cause_text = cause_text.trim_end();
        if !text.contains(cause_text) {
            text.push_str(": ");
            text.push_str(cause_text);
        }
        source = cause.source();
    }
    text
}
