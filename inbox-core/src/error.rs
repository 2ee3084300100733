//! Errors of the inbox core: reading a message from its wire form.

use waybill_outbox_core::MessageId;

/// Why a received message could not be read from its wire form ([`crate::wire::decode`]).
///
/// Every variant is permanent for that delivery: redelivering the same bytes fails the same
/// way, so a transport should dead-letter the message rather than retry it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Nothing says what the message is: no CloudEvents binary-mode attributes (no
    /// `specversion` header), no structured CloudEvent (content type
    /// `application/cloudevents+json`), no legacy `waybill-message-id` header, and no native
    /// message id where the consumer accepts one.
    #[error("not a CloudEvent: no {specversion} header, no content type application/cloudevents+json and no {} header{hint}", crate::wire::legacy::MESSAGE_ID)]
    NotAnEvent {
        /// The `specversion` header name of this binding, e.g. `ce-specversion`.
        specversion: &'static str,
        /// A hint when the message carries a native id the consumer does not accept.
        hint: &'static str,
    },
    /// The legacy `waybill-message-id` header is missing.
    #[error("header {} is missing", crate::wire::legacy::MESSAGE_ID)]
    MissingId,
    /// A required attribute or header is missing.
    #[error("{name} is missing")]
    Missing {
        /// The header, property or JSON member, as the binding names it (e.g. `ce_type`).
        name: String,
    },
    /// An attribute or header has the wrong type, e.g. bytes where a string belongs.
    #[error("{name} is {found}, expected {expected}")]
    WrongType {
        /// The header, property or JSON member.
        name: String,
        /// What it is, e.g. `bytes`.
        found: &'static str,
        /// What it must be, e.g. `a string`.
        expected: &'static str,
    },
    /// An attribute is empty where CloudEvents requires a value.
    #[error("{name} is empty")]
    Empty {
        /// The header or JSON member.
        name: String,
    },
    /// A binary-mode header value is not valid percent-encoded UTF-8 (NATS, memory).
    #[error("{name} is not valid percent-encoded UTF-8: {value:?}")]
    PercentEncoding {
        /// The header.
        name: String,
        /// Its value as received.
        value: String,
    },
    /// The CloudEvents `specversion` is not `1.0`.
    #[error("{name} is {value:?}, expected \"1.0\"")]
    SpecVersion {
        /// The header or JSON member.
        name: String,
        /// Its value.
        value: String,
    },
    /// The message id is not a UUID.
    #[error("{name} is not a UUID: {value:?}")]
    InvalidId {
        /// The header, property or JSON member.
        name: String,
        /// Its value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: uuid::Error,
    },
    /// A required legacy header (topic, message type or sent time) is missing.
    #[error("message {id}: header {header} is missing")]
    MissingHeader {
        /// The message.
        id: MessageId,
        /// The missing header's name.
        header: &'static str,
    },
    /// A sequenced message (it has a `waybillepoch` attribute) whose `sequence` is missing or
    /// not a decimal number.
    #[error("message {id}: {name} is not a sequence number: {value:?}")]
    InvalidSequence {
        /// The message.
        id: MessageId,
        /// The header.
        name: String,
        /// Its value.
        value: String,
    },
    /// The send time is not an RFC 3339 timestamp.
    #[error("message {id}: {name} is not an RFC 3339 timestamp: {value:?}")]
    InvalidSentAt {
        /// The message.
        id: MessageId,
        /// The header, property or JSON member.
        name: String,
        /// Its value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: chrono::ParseError,
    },
    /// A native AMQP timestamp (seconds since the epoch) outside the representable range.
    #[error("message {id}: {name} {value} is out of range")]
    TimestampOutOfRange {
        /// The message.
        id: MessageId,
        /// The property or header.
        name: String,
        /// The seconds since the epoch.
        value: u64,
    },
    /// A structured CloudEvent whose body is not a JSON object.
    #[error("structured CloudEvent is not a JSON object")]
    StructuredNotJson {
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// A structured CloudEvent in another format than JSON.
    #[error("structured CloudEvent in content type {content_type:?}; only application/cloudevents+json is read")]
    UnsupportedFormat {
        /// The content type.
        content_type: String,
    },
    /// A structured CloudEvent's `data_base64` is not base64.
    #[error("message {id}: data_base64 is not base64")]
    InvalidBase64 {
        /// The message.
        id: MessageId,
        /// What is wrong with it.
        #[source]
        source: base64::DecodeError,
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
