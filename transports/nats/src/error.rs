//! The transport's error type.

use async_nats::jetstream::consumer::pull::BatchError;
use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError,
    PublishErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectError, ConnectErrorKind};

/// What can go wrong in the NATS transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The private tokio runtime that drives the async client could not be built.
    #[error("building the transport's tokio runtime failed")]
    Runtime(#[source] std::io::Error),
    /// Connecting to the server failed. The URL is shown without its password; `cause` says
    /// why in a word, the source in detail.
    #[error("connecting to NATS at {url} failed: {cause}")]
    Connect {
        /// The server URL, password redacted.
        url: String,
        /// Why: unreachable (retryable), credentials refused, or TLS failed.
        cause: ConnectFailure,
        /// The client's error.
        #[source]
        source: ConnectError,
    },
    /// A file of the [`ConnectOptions`](crate::ConnectOptions) (a credentials, nkey seed,
    /// token or password file, a certificate or key) could not be read. Names the option and
    /// the path, never the content.
    #[error("reading the NATS {what} {path} failed")]
    ReadFile {
        /// Which option's file.
        what: &'static str,
        /// The file's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A secret file of the [`ConnectOptions`](crate::ConnectOptions) was read but does not
    /// hold what the option needs. Names the option, the path and what is wrong, never the
    /// content.
    #[error("the NATS {what} {path} is not usable: {reason}")]
    InvalidSecretFile {
        /// Which option's file.
        what: &'static str,
        /// The file's path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Creating or updating a stream failed.
    #[error("creating stream {stream} failed")]
    CreateStream {
        /// The stream's name.
        stream: String,
        /// The client's error.
        #[source]
        source: CreateStreamError,
    },
    /// Looking up (or deleting) a stream failed, e.g. because it does not exist.
    #[error("looking up stream {stream} failed")]
    GetStream {
        /// The stream's name.
        stream: String,
        /// The client's error.
        #[source]
        source: GetStreamError,
    },
    /// Creating or looking up the durable consumer failed.
    #[error("setting up consumer {consumer} on stream {stream} failed")]
    Consumer {
        /// The stream's name.
        stream: String,
        /// The durable consumer's name.
        consumer: String,
        /// The client's error.
        #[source]
        source: ConsumerError,
    },
    /// Pulling a batch of messages failed (connection lost, consumer deleted, ...).
    #[error("pulling messages failed")]
    Fetch(#[source] BatchError),
    /// Receiving a message of a pulled batch failed.
    #[error("receiving a message failed")]
    Receive(#[source] async_nats::Error),
    /// Acknowledging (ack, nak or term) a delivery failed; the server redelivers it after the
    /// consumer's ack wait.
    #[error("acknowledging a delivery of stream sequence {sequence} failed")]
    Ack {
        /// The delivery's stream sequence.
        sequence: u64,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// Publishing a dead letter failed (the dead-letter stream is missing, the connection was
    /// lost); the message was handed back to the server to be delivered again.
    #[error("dead-lettering stream sequence {sequence} to {subject} failed")]
    DeadLetter {
        /// The message's stream sequence.
        sequence: u64,
        /// The dead-letter subject.
        subject: String,
        /// The client's error.
        #[source]
        source: PublishError,
    },
    /// Forcing a reconnect failed because the client is closed.
    #[error("forcing a reconnect failed")]
    Reconnect(#[source] async_nats::client::ReconnectError),
    /// A configured name or subject is not valid for NATS.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Why connecting failed ([`Error::Connect`]), classified from the client's error, which
/// reports most TLS failures (an untrusted certificate, a server without TLS) as I/O errors.
///
/// ```
/// use waybill_nats::ConnectFailure;
///
/// assert_eq!(ConnectFailure::Tls.to_string(), "TLS failed (a certificate was not trusted or \
///     not presented, or the server does not speak TLS)");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// The server could not be reached or did not answer in time; trying again may succeed.
    Unreachable,
    /// The server refused the credentials (wrong password, token or nkey, an unknown user),
    /// or they could not sign the server's nonce.
    Credentials,
    /// The TLS handshake failed: the server's certificate is not signed by a trusted CA or
    /// does not name the host, the server refused the client certificate (or its absence), or
    /// TLS was required and the server does not speak it.
    Tls,
    /// The URL is not a valid server address.
    InvalidUrl,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unreachable => "the server is unreachable",
            Self::Credentials => "the server refused the credentials",
            Self::Tls => {
                "TLS failed (a certificate was not trusted or not presented, or the server does \
                 not speak TLS)"
            }
            Self::InvalidUrl => "the URL is not a valid server address",
        })
    }
}

impl ConnectFailure {
    /// Classifies the client's connect error: its kind, and a TLS error anywhere in its
    /// source chain (reported by the client as an I/O error).
    pub(crate) fn of(error: &ConnectError) -> Self {
        match error.kind() {
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                return Self::Credentials
            }
            ConnectErrorKind::Tls => return Self::Tls,
            ConnectErrorKind::ServerParse => return Self::InvalidUrl,
            _ => {}
        }
        let mut source = std::error::Error::source(error);
        while let Some(error) = source {
            // An I/O error's `source` skips the error it wraps; look at that one too.
            let wrapped = error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref);
            if error.is::<async_nats::rustls::Error>()
                || wrapped.is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return Self::Tls;
            }
            source = error.source();
        }
        Self::Unreachable
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `true` when trying again later may succeed: the server is unreachable or timed out, the
    /// connection was lost, or JetStream is temporarily unavailable. `false` for a wrong
    /// configuration or a request the server refuses.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Runtime(_)
            | Self::Config(_)
            | Self::ReadFile { .. }
            | Self::InvalidSecretFile { .. } => false,
            Self::Connect { cause, .. } => *cause == ConnectFailure::Unreachable,
            Self::CreateStream { source, .. } => matches!(
                source.kind(),
                CreateStreamErrorKind::JetStreamUnavailable
                    | CreateStreamErrorKind::TimedOut
                    | CreateStreamErrorKind::Response
            ),
            Self::GetStream { source, .. } => {
                matches!(source.kind(), GetStreamErrorKind::Request)
            }
            Self::Consumer { source, .. } => matches!(
                source.kind(),
                ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request
            ),
            Self::Fetch(_) | Self::Receive(_) | Self::Ack { .. } | Self::Reconnect(_) => true,
            // A dead letter the stream can never take (an invalid subject, too large) stops
            // the consumer rather than holding the message back forever.
            Self::DeadLetter { source, .. } => !publish_error_is_fatal(source),
        }
    }
}

impl waybill_outbox_core::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

/// The JetStream publish errors that no retry can fix:
///
/// - the message exceeds the server's `max_payload` (the publisher, and the client after it,
///   refuse it before sending),
/// - the stream refuses it as larger than its `max_msg_size` or its headers as too large,
/// - the subject is invalid,
/// - the stream is sealed.
///
/// Everything else is retryable: a full stream with the `discard new` policy, storage
/// exhausted, a briefly leaderless stream in a cluster; the relay's attempt limit bounds those
/// retries. No responders (no stream captures the subject) is unroutable, which the publisher
/// reports as `PublisherConfig::unroutable` says (retryable by default). A timeout or a broken connection is retryable too, but says the server is
/// unavailable ([`publish_error_is_unavailable`]), which charges no attempt.
pub(crate) fn publish_error_is_fatal(error: &PublishError) -> bool {
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => {
            let Some(source) = std::error::Error::source(error) else {
                return false;
            };
            if let Some(js) = source.downcast_ref::<async_nats::jetstream::Error>() {
                return matches!(
                    js.error_code(),
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_SEALED
                );
            }
            source
                .downcast_ref::<async_nats::subject::SubjectError>()
                .is_some()
        }
        _ => false,
    }
}

/// `true` when a publish failed because the server could not be used (the connection broke, no
/// ack came in time), not because it refused the message.
pub(crate) fn publish_error_is_unavailable(error: &PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
    )
}
