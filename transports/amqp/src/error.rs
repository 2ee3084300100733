//! The transport's error type.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::ErrorKind;

/// What can go wrong while talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The AMQP client failed: connection refused or lost, channel closed, or the broker refused
    /// an operation (e.g. a queue declared again with different arguments).
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The transport's private tokio runtime could not be started.
    #[error("starting the AMQP transport's runtime failed")]
    Runtime(#[source] std::io::Error),
    /// The broker did not answer in time.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        /// What was waited for.
        operation: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// A name or value that AMQP carries as a short string is longer than 255 bytes.
    #[error("{what} is longer than 255 bytes")]
    TooLong {
        /// Which name or value.
        what: &'static str,
        /// The length check that failed.
        #[source]
        source: lapin::types::ShortStringError,
    },
    /// The broker did not take a dead letter the consumer published: it was negatively
    /// acknowledged or returned as unroutable. The original delivery was handed back, so the
    /// broker delivers it again.
    #[error("the broker did not take the {what} of message {message}: {reason}")]
    Refused {
        /// `"dead letter"`.
        what: &'static str,
        /// The message id, or `"-"` when the delivery had none.
        message: String,
        /// Nacked, or the reply code and text of the return.
        reason: String,
    },
    /// The connection or channel closed under the consumer (broker restart, network failure).
    #[error("the connection to the broker was lost")]
    ConnectionLost,
    /// The consumer could not store a dead letter: the dead-letter exchange is missing (the
    /// broker closed the channel with `NOT_FOUND`) or the channel failed while publishing it.
    /// The original delivery was handed back, so the broker delivers it again. Retryable: the
    /// message waits, in its place, until the dead-letter exchange exists.
    #[error("dead-lettering message {message} failed")]
    DeadLetter {
        /// The message id, or `"-"` when the delivery had none.
        message: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a queue, exchange or binding the consumer declares or checks: it
    /// exists with other arguments or of another kind (`PRECONDITION_FAILED`; see
    /// [`ConsumerConfig::passive`](crate::ConsumerConfig::passive)), or it is missing where the
    /// consumer only checks it (`NOT_FOUND`). Retryable only when the connection failed.
    #[error("{operation} {name} failed{}", topology_hint(.source))]
    Topology {
        /// What was done, e.g. `"declaring the queue"` or `"checking the exchange"`.
        operation: &'static str,
        /// The queue or exchange (for a binding: `queue to exchange (routing key)`).
        name: String,
        /// The broker's refusal.
        #[source]
        source: lapin::Error,
    },
    /// A file of the [`TlsOptions`](crate::TlsOptions) could not be read.
    #[error("reading the {what} {} failed", .path.display())]
    ReadFile {
        /// Which option's file.
        what: &'static str,
        /// The file's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the [`TlsOptions`](crate::TlsOptions) does not hold what it should.
    #[error("the {what} {} is not usable: {reason}", .path.display())]
    InvalidFile {
        /// Which option's file.
        what: &'static str,
        /// The file's path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker cancelled the consumer, e.g. because its queue was deleted.
    #[error("the broker cancelled the consumer of queue {queue}")]
    ConsumerCancelled {
        /// The queue that was consumed.
        queue: String,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `true` when trying again later may work: the broker is unreachable, the connection or
    /// channel was lost, an answer timed out, a copy was refused, or the consumer was cancelled.
    /// `false` for configuration errors such as a refused login, a missing exchange or queue,
    /// a queue declared again with different arguments, or a name that is too long.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Amqp(error) | Self::Topology { source: error, .. } => {
                lapin_error_is_retryable(error)
            }
            Self::DeadLetter { .. } => true,
            Self::Timeout { .. }
            | Self::Refused { .. }
            | Self::ConnectionLost
            | Self::ConsumerCancelled { .. } => true,
            Self::Runtime(_)
            | Self::TooLong { .. }
            | Self::ReadFile { .. }
            | Self::InvalidFile { .. } => false,
        }
    }
}

impl waybill_outbox_core::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

/// What to do about a refused topology, for [`Error::Topology`]'s message.
fn topology_hint(error: &lapin::Error) -> &'static str {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                " (it exists with other arguments or of another kind; to use it as it is, \
                 configure the consumer as passive)"
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => " (it does not exist)",
            _ => "",
        },
        _ => "",
    }
}

/// `true` when `error` says the broker could not be used at all (unreachable, connection or
/// channel gone, no answer in time) rather than that it refused something: the publisher then
/// reports [`PublishError::Unavailable`](waybill_outbox_core::PublishError::Unavailable).
pub(crate) fn is_unavailable(error: &Error) -> bool {
    match error {
        Error::Timeout { .. } | Error::ConnectionLost => true,
        Error::Amqp(error) => lapin_error_is_unavailable(error),
        _ => false,
    }
}

/// See [`is_unavailable`]. A channel-level refusal (a missing exchange, a precondition) is about
/// what was sent, not about the broker.
pub(crate) fn lapin_error_is_unavailable(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::RuntimeShutdownError(_) => true,
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Hard(
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
            )
        ),
        _ => false,
    }
}

fn lapin_error_is_retryable(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::RuntimeShutdownError(_) => true,
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(hard) => matches!(
                hard,
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
            ),
            AMQPErrorKind::Soft(soft) => matches!(soft, AMQPSoftError::RESOURCELOCKED),
        },
        _ => false,
    }
}

/// `url` with the password replaced by `***`, for logs and errors.
///
/// ```
/// assert_eq!(
///     waybill_amqp::redact("amqp://guest:secret@rabbit:5672/%2f"),
///     "amqp://guest:***@rabbit:5672/%2f"
/// );
/// assert_eq!(waybill_amqp::redact("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
/// ```
pub fn redact(url: &str) -> String {
    waybill_outbox_core::redact_url(url)
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn soft(kind: AMQPSoftError) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(kind), "refused".into())).into()
    }

    #[test]
    fn a_refused_topology_is_final_and_says_what_to_do_and_a_failed_dead_letter_is_retryable() {
        let refused = Error::Topology {
            operation: "declaring the queue",
            name: "billing".into(),
            source: soft(AMQPSoftError::PRECONDITIONFAILED),
        };
        assert!(!refused.is_retryable());
        assert!(
            refused
                .to_string()
                .starts_with("declaring the queue billing failed (it exists"),
            "{refused}"
        );
        assert!(refused.to_string().contains("passive"), "{refused}");
        let missing = Error::Topology {
            operation: "checking the queue",
            name: "billing".into(),
            source: soft(AMQPSoftError::NOTFOUND),
        };
        assert!(!missing.is_retryable());
        assert!(
            missing.to_string().ends_with("(it does not exist)"),
            "{missing}"
        );
        let dead_letter = Error::DeadLetter {
            message: "-".into(),
            source: soft(AMQPSoftError::NOTFOUND),
        };
        assert!(dead_letter.is_retryable());
    }

    #[test]
    fn timeouts_are_retryable_and_long_names_are_not() {
        let timeout = Error::Timeout {
            operation: "confirm",
            timeout: Duration::from_secs(1),
        };
        assert!(timeout.is_retryable());
        let long = "x".repeat(300);
        let source = lapin::types::ShortString::try_new(long).err();
        if let Some(source) = source {
            assert!(!Error::TooLong {
                what: "routing key",
                source
            }
            .is_retryable());
        }
    }
}
