//! Errors of the inbox core: reading a message from its wire form.

use waybill_outbox_core::MessageId;

/// Why a received message could not be read from its wire form ([`crate::wire::decode`]).
///
/// Every variant is permanent for that delivery: redelivering the same bytes fails the same
/// way, so a transport should dead-letter the message rather than retry it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The `waybill-message-id` header is missing.
    #[error("header {} is missing", crate::wire::MESSAGE_ID)]
    MissingId,
    /// The `waybill-message-id` header is not a UUID.
    #[error("header {} is not a UUID: {value:?}", crate::wire::MESSAGE_ID)]
    InvalidId {
        /// The header's value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: uuid::Error,
    },
    /// A required header (topic, message type or sent time) is missing.
    #[error("message {id}: header {header} is missing")]
    MissingHeader {
        /// The message.
        id: MessageId,
        /// The missing header's name.
        header: &'static str,
    },
    /// The `waybill-sent-at` header is not an RFC 3339 timestamp.
    #[error(
        "message {id}: header {} is not an RFC 3339 timestamp: {value:?}",
        crate::wire::SENT_AT
    )]
    InvalidSentAt {
        /// The message.
        id: MessageId,
        /// The header's value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: chrono::ParseError,
    },
    /// The content type is JSON but the payload is not UTF-8.
    #[error("message {id}: JSON payload is not UTF-8")]
    PayloadNotUtf8 {
        /// The message.
        id: MessageId,
        /// Where the bytes stop being UTF-8.
        #[source]
        source: std::str::Utf8Error,
    },
    /// The content type is JSON but the payload is not valid JSON.
    #[error("message {id}: payload is not valid JSON")]
    PayloadNotJson {
        /// The message.
        id: MessageId,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The message names another topic than the one it was consumed from (a raw publish to
    /// the wrong queue).
    #[error(
        "message {id}: topic {topic:?} is not {expected:?}, the topic this consumer subscribed to"
    )]
    UnexpectedTopic {
        /// The message.
        id: MessageId,
        /// The topic the message names.
        topic: String,
        /// The topic consumed.
        expected: String,
    },
}

/// The result type of this crate.
pub type Result<T, E = DecodeError> = std::result::Result<T, E>;
