//! Messages as the writer builds them and as the outbox table stores them.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;

use crate::{Error, MessageId};

/// Message headers: a string map. Correlation and causation ids and the W3C `traceparent`
/// belong here. Kept sorted so a stored message serializes the same way every time.
pub type Headers = BTreeMap<String, String>;

/// The content type of payloads built with [`NewOutboxMessage::json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A message to put in the outbox, built by the writer inside its business transaction.
///
/// ```
/// use waybill_outbox_core::NewOutboxMessage;
///
/// #[derive(serde::Serialize)]
/// struct OrderPlaced { order_id: u64, total_cents: u64 }
///
/// let msg = NewOutboxMessage::json("orders", "order:4231", "OrderPlaced",
///         &OrderPlaced { order_id: 4231, total_cents: 1999 })?
///     .with_header("correlation-id", "checkout-77");
/// assert_eq!(msg.partition_key(), "order:4231");
/// assert_eq!(msg.payload(), br#"{"order_id":4231,"total_cents":1999}"#);
/// # Ok::<(), waybill_outbox_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutboxMessage {
    id: MessageId,
    topic: String,
    partition_key: String,
    message_type: String,
    content_type: String,
    payload: Vec<u8>,
    headers: Headers,
    available_at: Option<DateTime<Utc>>,
    sequenced: bool,
}

impl NewOutboxMessage {
    /// A message whose payload is `payload` serialized as JSON, with a fresh [`MessageId`].
    ///
    /// `topic` is the destination, `partition_key` the unit of ordering (messages with one key
    /// are published in enqueue order; use the aggregate, e.g. `order:4231`), `message_type`
    /// what happened (e.g. `OrderPlaced`).
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] when `payload` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        partition_key: impl Into<String>,
        message_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self, Error> {
        let payload = serde_json::to_vec(payload).map_err(Error::Encode)?;
        Ok(Self::bytes(
            topic,
            partition_key,
            message_type,
            JSON_CONTENT_TYPE,
            payload,
        ))
    }

    /// A message with a raw payload of the given content type, with a fresh [`MessageId`].
    ///
    /// ```
    /// use waybill_outbox_core::NewOutboxMessage;
    ///
    /// let msg = NewOutboxMessage::bytes("images", "img:7", "Thumbnail", "image/png", vec![0x89, b'P']);
    /// assert_eq!(msg.content_type(), "image/png");
    /// ```
    pub fn bytes(
        topic: impl Into<String>,
        partition_key: impl Into<String>,
        message_type: impl Into<String>,
        content_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id: MessageId::new(),
            topic: topic.into(),
            partition_key: partition_key.into(),
            message_type: message_type.into(),
            content_type: content_type.into(),
            payload: payload.into(),
            headers: Headers::new(),
            available_at: None,
            sequenced: false,
        }
    }

    /// Uses a caller-given id instead of a fresh one, e.g. one derived from an upstream request.
    #[must_use]
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
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

    /// Delays sending: the relay does not publish the message before `at`. Later messages with
    /// the same partition key wait behind it, so per-key order holds.
    #[must_use]
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        // Every backend keeps microseconds; truncating here makes the stored row equal the input.
        self.available_at = Some(at.trunc_subsecs(6));
        self
    }

    /// Makes the message sequenced: `enqueue` gives it the next number of its topic and
    /// partition key, in the writer's transaction, so writers of one key wait for each other
    /// and numbers follow commit order; a consumer's `process_in_order` applies the key's
    /// messages in that order, each once, with no retention window. See [`crate::sequence`].
    ///
    /// ```
    /// use waybill_outbox_core::NewOutboxMessage;
    ///
    /// let msg = NewOutboxMessage::bytes("orders", "order:1", "OrderPlaced", "text/plain", "x").sequenced();
    /// assert!(msg.is_sequenced());
    /// ```
    #[must_use]
    pub fn sequenced(mut self) -> Self {
        self.sequenced = true;
        self
    }

    /// Whether `enqueue` numbers the message (see [`sequenced`](Self::sequenced)).
    pub fn is_sequenced(&self) -> bool {
        self.sequenced
    }

    /// The sender-assigned id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The destination topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The unit of ordering.
    pub fn partition_key(&self) -> &str {
        &self.partition_key
    }

    /// What happened, e.g. `OrderPlaced`.
    pub fn message_type(&self) -> &str {
        &self.message_type
    }

    /// The payload's media type.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The payload bytes, stored and published unchanged.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The earliest publish time, if sending is delayed.
    pub fn available_after(&self) -> Option<DateTime<Utc>> {
        self.available_at
    }
}

/// Where a stored message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Waiting to be published (possibly leased by a relay right now, or backing off).
    Pending,
    /// Confirmed by the broker; kept only while the retention window asks for it.
    Published,
    /// Given up on after a fatal error or too many attempts; waits for an operator, and later
    /// messages with the same key wait behind it.
    Parked,
}

impl Status {
    /// The value stored in the `status` column.
    pub fn code(self) -> i16 {
        match self {
            Self::Pending => 0,
            Self::Published => 1,
            Self::Parked => 2,
        }
    }

    /// Reads a stored `status` column.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownStatus`] for a code this version does not know.
    pub fn from_code(code: i16) -> Result<Self, Error> {
        match code {
            0 => Ok(Self::Pending),
            1 => Ok(Self::Published),
            2 => Ok(Self::Parked),
            other => Err(Error::UnknownStatus(other)),
        }
    }
}

/// A message as stored in the outbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxMessage {
    /// Position in the table: increases with every enqueue; the order of publishing per key.
    pub seq: i64,
    /// The sender-assigned id.
    pub id: MessageId,
    /// The destination topic.
    pub topic: String,
    /// The unit of ordering.
    pub partition_key: String,
    /// What happened, e.g. `OrderPlaced`.
    pub message_type: String,
    /// The payload's media type.
    pub content_type: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers.
    pub headers: Headers,
    /// Where the message is in its life.
    pub status: Status,
    /// Publish attempts that failed so far.
    pub attempts: i32,
    /// The error of the last failed attempt, or the reason it was parked.
    pub last_error: Option<String>,
    /// Not published before this time (a requested delay or a retry backoff).
    pub available_at: DateTime<Utc>,
    /// When the message was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the broker confirmed it.
    pub published_at: Option<DateTime<Utc>>,
}

impl OutboxMessage {
    /// The per-key number and epoch of a sequenced message (`None` when it is not one, `Err`
    /// with the stored value when it does not parse).
    pub fn stamp(&self) -> Option<Result<crate::Stamp, String>> {
        crate::Stamp::read(&self.headers)
    }

    /// A stored message with the given position, id and status; every other field empty (times
    /// at the Unix epoch). For backends and tests that fill the fields afterwards.
    pub fn new(seq: i64, id: MessageId, status: Status) -> Self {
        Self {
            seq,
            id,
            topic: String::new(),
            partition_key: String::new(),
            message_type: String::new(),
            content_type: String::new(),
            payload: Vec::new(),
            headers: Headers::new(),
            status,
            attempts: 0,
            last_error: None,
            available_at: DateTime::UNIX_EPOCH,
            created_at: DateTime::UNIX_EPOCH,
            published_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for status in [Status::Pending, Status::Published, Status::Parked] {
            assert_eq!(Status::from_code(status.code()).ok(), Some(status));
        }
        assert!(matches!(Status::from_code(9), Err(Error::UnknownStatus(9))));
    }

    #[test]
    fn json_payload_is_compact_and_typed() -> Result<(), Error> {
        let msg = NewOutboxMessage::json("t", "k", "T", &serde_json::json!({"a": [1, 2]}))?;
        assert_eq!(msg.payload(), br#"{"a":[1,2]}"#);
        assert_eq!(msg.content_type(), JSON_CONTENT_TYPE);
        Ok(())
    }
}
