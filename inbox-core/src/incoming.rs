//! A message as a consumer receives it.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use waybill_outbox_core::sequence::RESERVED_HEADERS;
use waybill_outbox_core::{
    is_valid_traceparent, Headers, MessageId, OutboxMessage, Stamp, TRACEPARENT,
};

/// The content type of [`IncomingMessage::new`] unless set otherwise.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// A received message: what a transport hands to `waybill_diesel::Inbox::process_once` after
/// [`wire::decode`](crate::wire::decode).
///
/// ```
/// use waybill_inbox_core::IncomingMessage;
/// use waybill_outbox_core::MessageId;
///
/// let msg = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", br#"{"total":1999}"#.to_vec())
///     .with_partition_key("order:4231")
///     .with_content_type("application/json")
///     .with_header("correlation-id", "checkout-77");
/// let body: serde_json::Value = msg.json()?;
/// assert_eq!(body["total"], 1999);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingMessage {
    /// The sender-assigned id: the same on every redelivery, so the default dedup key.
    pub id: MessageId,
    /// The topic it was published to.
    pub topic: String,
    /// What happened, e.g. `OrderPlaced`.
    pub message_type: String,
    /// The sender's unit of ordering, e.g. `order:4231`.
    pub partition_key: String,
    /// The payload's media type.
    pub content_type: String,
    /// The payload bytes, unchanged.
    pub payload: Vec<u8>,
    /// The sender's headers, without waybill's reserved ones.
    pub headers: Headers,
    /// When the sender enqueued the message (the sender's clock).
    pub sent_at: DateTime<Utc>,
    /// Where the message stands in its key's order, when the producer numbered it (a
    /// `sequenced` message); `None` otherwise.
    pub sequence: Option<Sequenced>,
}

/// A sequenced message's position: the producer's source, the per-key number and the epoch it
/// was drawn under, read from the CloudEvents `source`, `sequence` and `waybillepoch`
/// attributes. `process_in_order` keeps, per consumer and `(source, topic, partition key)`,
/// the last number applied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sequenced {
    /// The producer (the CloudEvents `source`).
    pub source: String,
    /// The number and producer epoch.
    pub stamp: Stamp,
    /// `Some(reason)` for a skip marker: an operator skipped the message that had this number;
    /// the consumer moves past it without running its handler.
    pub skipped: Option<String>,
}

impl Sequenced {
    /// The position `stamp` of a message from `source`.
    pub fn new(source: impl Into<String>, stamp: Stamp) -> Self {
        Self {
            source: source.into(),
            stamp,
            skipped: None,
        }
    }

    /// Marks the position as a skip marker with `reason`.
    #[must_use]
    pub fn skipped(mut self, reason: impl Into<String>) -> Self {
        self.skipped = Some(reason.into());
        self
    }

    /// The position stored in an outbox message's reserved headers, with the default source
    /// `urn:waybill:<topic>`; `None` when it is not sequenced or its number does not parse.
    pub fn of_outbox(message: &OutboxMessage) -> Option<Self> {
        let stamp = message.stamp()?.ok()?;
        Some(Self {
            source: format!("urn:waybill:{}", message.topic),
            stamp,
            skipped: message
                .headers
                .get(waybill_outbox_core::sequence::SKIPPED_HEADER)
                .cloned(),
        })
    }
}

/// The sender's headers of an outbox message without the reserved sequence headers.
fn sender_headers(headers: &Headers) -> Headers {
    let mut headers = headers.clone();
    for reserved in RESERVED_HEADERS {
        headers.remove(reserved);
    }
    headers
}

impl IncomingMessage {
    /// A message with the given id, topic, type and payload; no partition key, content type
    /// `application/octet-stream`, no headers, sent now. Change those with the `with_*` methods.
    pub fn new(
        id: MessageId,
        topic: impl Into<String>,
        message_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id,
            topic: topic.into(),
            message_type: message_type.into(),
            partition_key: String::new(),
            content_type: OCTET_STREAM.to_owned(),
            payload: payload.into(),
            headers: Headers::new(),
            sent_at: Utc::now(),
            sequence: None,
        }
    }

    /// Sets the message's position in its key's order (see [`Sequenced`]).
    #[must_use]
    pub fn with_sequence(mut self, sequence: Sequenced) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Sets the partition key.
    #[must_use]
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = key.into();
        self
    }

    /// Sets the content type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Adds (or replaces) a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces all headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Sets when the sender sent the message; the inbox compares it with its last purge to
    /// tell whether the message's record may have been purged.
    #[must_use]
    pub fn with_sent_at(mut self, at: DateTime<Utc>) -> Self {
        self.sent_at = at;
        self
    }

    /// The payload deserialized from JSON.
    ///
    /// # Errors
    ///
    /// When the payload is not JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.payload)
    }

    /// The sender's W3C `traceparent` header, when it has a well-formed one: the handler
    /// continues that trace. A malformed value is ignored, as W3C Trace Context asks.
    ///
    /// ```
    /// # use waybill_inbox_core::IncomingMessage;
    /// # use waybill_outbox_core::MessageId;
    /// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// let msg = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}")
    ///     .with_header("traceparent", tp);
    /// assert_eq!(msg.traceparent(), Some(tp));
    /// assert_eq!(msg.with_header("traceparent", "garbage").traceparent(), None);
    /// ```
    pub fn traceparent(&self) -> Option<&str> {
        self.headers
            .get(TRACEPARENT)
            .map(String::as_str)
            .filter(|value| is_valid_traceparent(value))
    }
}

impl From<&OutboxMessage> for IncomingMessage {
    /// The message as a consumer receives it; `sent_at` is the enqueue time (`created_at`).
    fn from(message: &OutboxMessage) -> Self {
        Self {
            id: message.id,
            topic: message.topic.clone(),
            message_type: message.message_type.clone(),
            partition_key: message.partition_key.clone(),
            content_type: message.content_type.clone(),
            payload: message.payload.clone(),
            headers: sender_headers(&message.headers),
            sent_at: message.created_at,
            sequence: Sequenced::of_outbox(message),
        }
    }
}

impl From<OutboxMessage> for IncomingMessage {
    /// The message as a consumer receives it; `sent_at` is the enqueue time (`created_at`).
    fn from(message: OutboxMessage) -> Self {
        Self::from(&message)
    }
}

#[cfg(test)]
mod tests {
    use waybill_outbox_core::Status;

    use super::*;

    #[test]
    fn from_outbox_message_keeps_every_field_and_uses_created_at() {
        let mut stored = OutboxMessage::new(7, MessageId::new(), Status::Pending);
        stored.topic = "orders".into();
        stored.partition_key = "order:1".into();
        stored.message_type = "OrderPlaced".into();
        stored.content_type = "text/plain".into();
        stored.payload = b"hi".to_vec();
        stored.headers.insert("a".into(), "b".into());
        stored.created_at =
            DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default();
        let incoming = IncomingMessage::from(&stored);
        assert_eq!(incoming.id, stored.id);
        assert_eq!(incoming.sent_at, stored.created_at);
        assert_eq!(incoming.headers, stored.headers);
        assert_eq!(incoming, IncomingMessage::from(stored));
    }
}
