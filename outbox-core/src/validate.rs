//! Checks a message against the limits before any database is touched.

use crate::NewOutboxMessage;

/// Size limits a message must respect to be enqueued.
///
/// ```
/// use waybill_outbox_core::Limits;
///
/// let limits = Limits::default().max_payload_bytes(64 * 1024);
/// assert_eq!(limits.payload_limit(), 64 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    max_payload_bytes: usize,
    max_name_bytes: usize,
    max_headers: usize,
    max_header_value_bytes: usize,
    max_header_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4 * 1024 * 1024,
            max_name_bytes: 255,
            max_headers: 64,
            max_header_value_bytes: 8 * 1024,
            max_header_bytes: None,
            max_message_bytes: None,
        }
    }
}

impl Limits {
    /// The largest payload accepted. Defaults to 4 MiB (MariaDB's default packet limit is 16 MiB).
    #[must_use]
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// The longest topic, partition key, message type, content type or header name.
    /// Defaults to 255 bytes, which every backend indexes.
    #[must_use]
    pub fn max_name_bytes(mut self, bytes: usize) -> Self {
        self.max_name_bytes = bytes;
        self
    }

    /// The most headers on one message. Defaults to 64.
    #[must_use]
    pub fn max_headers(mut self, count: usize) -> Self {
        self.max_headers = count;
        self
    }

    /// The longest header value. Defaults to 8 KiB.
    #[must_use]
    pub fn max_header_value_bytes(mut self, bytes: usize) -> Self {
        self.max_header_value_bytes = bytes;
        self
    }

    /// The most header bytes of one message, counted as [`BrokerLimits`] explains (names and
    /// headers together). Defaults to no limit beyond the others.
    #[must_use]
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = Some(bytes);
        self
    }

    /// The largest message, payload and header bytes together, counted as [`BrokerLimits`]
    /// explains. Defaults to no limit beyond the others.
    #[must_use]
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    /// These limits, lowered to what a broker takes: the publisher's
    /// [`limits`](crate::Publisher::limits). Checking messages against the result at enqueue
    /// time refuses there, in the writer's transaction, a message the broker would refuse at
    /// publish time (the relay would park it).
    ///
    /// ```
    /// use waybill_outbox_core::{BrokerLimits, Limits, NewOutboxMessage, ValidationError};
    ///
    /// // What a NATS publisher reports for a server with the default `max_payload` of 1 MiB.
    /// let broker = BrokerLimits::default().max_message_bytes(1024 * 1024 - 512);
    /// let limits = Limits::default().capped_by(broker);
    ///
    /// let big = NewOutboxMessage::bytes("orders", "k", "T", "application/octet-stream", vec![0; 2 << 20]);
    /// assert!(Limits::default().check(&big).is_ok());
    /// assert!(matches!(limits.check(&big), Err(ValidationError::MessageTooLarge { .. })));
    /// ```
    #[must_use]
    pub fn capped_by(mut self, broker: BrokerLimits) -> Self {
        self.max_header_bytes = min_limit(self.max_header_bytes, broker.max_header_bytes);
        self.max_message_bytes = min_limit(self.max_message_bytes, broker.max_message_bytes);
        self
    }

    /// The payload limit in force.
    pub fn payload_limit(&self) -> usize {
        self.max_payload_bytes
    }

    /// The header bytes limit in force, if any.
    pub fn header_bytes_limit(&self) -> Option<usize> {
        self.max_header_bytes
    }

    /// The message size limit in force, if any.
    pub fn message_bytes_limit(&self) -> Option<usize> {
        self.max_message_bytes
    }

    /// Checks `msg` against these limits.
    ///
    /// ```
    /// use waybill_outbox_core::{Limits, NewOutboxMessage, ValidationError};
    ///
    /// let msg = NewOutboxMessage::bytes("", "k", "T", "text/plain", "hi");
    /// assert_eq!(Limits::default().check(&msg), Err(ValidationError::Empty { field: "topic" }));
    /// ```
    ///
    /// # Errors
    ///
    /// The first [`ValidationError`] found.
    pub fn check(&self, msg: &NewOutboxMessage) -> Result<(), ValidationError> {
        self.check_name("topic", msg.topic())?;
        self.check_name("partition_key", msg.partition_key())?;
        self.check_name("message_type", msg.message_type())?;
        self.check_name("content_type", msg.content_type())?;
        if msg.payload().len() > self.max_payload_bytes {
            return Err(ValidationError::PayloadTooLarge {
                size: msg.payload().len(),
                limit: self.max_payload_bytes,
            });
        }
        if msg.headers().len() > self.max_headers {
            return Err(ValidationError::TooManyHeaders {
                count: msg.headers().len(),
                limit: self.max_headers,
            });
        }
        for (name, value) in msg.headers() {
            if crate::sequence::RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(ValidationError::ReservedHeader(name.clone()));
            }
            if name.is_empty()
                || name.len() > self.max_name_bytes
                || !name.bytes().all(is_token_byte)
            {
                return Err(ValidationError::InvalidHeaderName(name.clone()));
            }
            if value.len() > self.max_header_value_bytes || value.chars().any(char::is_control) {
                return Err(ValidationError::InvalidHeaderValue(name.clone()));
            }
        }
        let header_bytes = header_bytes(msg);
        if let Some(limit) = self.max_header_bytes.filter(|limit| header_bytes > *limit) {
            return Err(ValidationError::HeadersTooLarge {
                size: header_bytes,
                limit,
            });
        }
        let size = header_bytes.saturating_add(msg.payload().len());
        if let Some(limit) = self.max_message_bytes.filter(|limit| size > *limit) {
            return Err(ValidationError::MessageTooLarge { size, limit });
        }
        Ok(())
    }

    fn check_name(&self, field: &'static str, value: &str) -> Result<(), ValidationError> {
        if value.is_empty() {
            return Err(ValidationError::Empty { field });
        }
        if value.len() > self.max_name_bytes {
            return Err(ValidationError::TooLong {
                field,
                len: value.len(),
                limit: self.max_name_bytes,
            });
        }
        if value.chars().any(char::is_control) {
            return Err(ValidationError::ControlCharacter { field });
        }
        Ok(())
    }
}

fn min_limit(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The header bytes of `msg` as [`BrokerLimits`] counts them.
fn header_bytes(msg: &NewOutboxMessage) -> usize {
    let names = msg.topic().len()
        + msg.partition_key().len()
        + msg.message_type().len()
        + msg.content_type().len();
    msg.headers().iter().fold(names, |sum, (name, value)| {
        sum.saturating_add(name.len() + value.len() + BrokerLimits::PER_HEADER_BYTES)
    })
}

/// What a broker takes, as its publisher reports it ([`Publisher::limits`]); `None` where the
/// publisher knows no limit. Apply it at enqueue time with [`Limits::capped_by`].
///
/// Sizes are counted from the outbox message, the same way on every broker:
///
/// - its **header bytes** are the lengths of its topic, partition key, message type and content
///   type, plus for each header its name, its value and [`PER_HEADER_BYTES`](Self::PER_HEADER_BYTES);
/// - its **size** is its payload plus its header bytes.
///
/// A publisher reports its broker's limits minus what its own encoding adds to every message
/// (message id, send time, the names of the reserved headers, framing), so a message within
/// them is not refused by the broker for its size. A publisher still checks each message's
/// exact encoded size before sending, and refuses one that is too large as
/// [`PublishError::Fatal`](crate::PublishError::Fatal) naming both sizes.
///
/// [`Publisher::limits`]: crate::Publisher::limits
///
/// ```
/// use waybill_outbox_core::BrokerLimits;
///
/// let limits = BrokerLimits::default().max_message_bytes(1 << 20);
/// assert_eq!(limits.message_limit(), Some(1 << 20));
/// assert_eq!(limits.header_limit(), None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerLimits {
    max_header_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
}

impl BrokerLimits {
    /// What each header counts beyond its name and value: more than AMQP (6 bytes) or NATS
    /// (4 bytes) add to encode one, so a transport's reserve need not depend on the number of
    /// headers.
    pub const PER_HEADER_BYTES: usize = 8;

    /// The most header bytes the broker takes in one message. Defaults to unknown (`None`).
    #[must_use]
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = Some(bytes);
        self
    }

    /// The largest message the broker takes, payload and header bytes together. Defaults to
    /// unknown (`None`).
    #[must_use]
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    /// The header bytes limit, if known.
    pub fn header_limit(&self) -> Option<usize> {
        self.max_header_bytes
    }

    /// The message size limit, if known.
    pub fn message_limit(&self) -> Option<usize> {
        self.max_message_bytes
    }
}

/// HTTP token characters (RFC 9110 `tchar`): what AMQP, NATS and HTTP all accept as a header
/// name, so a header never needs rewriting on its way through a broker.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why a message was refused before it reached the database.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A required name is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A name is longer than the limit.
    #[error("{field} is {len} bytes long; the limit is {limit}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A name contains a control character (newlines would let it forge broker headers).
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// Which field.
        field: &'static str,
    },
    /// The payload is larger than the limit.
    #[error("payload is {size} bytes; the limit is {limit}")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The header bytes (see [`BrokerLimits`]) are more than the limit.
    #[error(
        "headers (with topic, key, type and content type) are {size} bytes; the limit is {limit}"
    )]
    HeadersTooLarge {
        /// The message's header bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// Payload and header bytes (see [`BrokerLimits`]) together are more than the limit.
    #[error("message is {size} bytes (payload and headers); the limit is {limit}")]
    MessageTooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// More headers than the limit.
    #[error("{count} headers; the limit is {limit}")]
    TooManyHeaders {
        /// How many headers the message has.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A header name that is empty, too long or not an HTTP token.
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    /// A header value that is too long or contains a control character.
    #[error("invalid value for header {0:?}")]
    InvalidHeaderValue(String),
    /// A header whose name waybill reserves for sequenced messages (see
    /// [`crate::sequence::RESERVED_HEADERS`]); `enqueue` writes those itself.
    #[error("header {0:?} is reserved for sequenced messages")]
    ReservedHeader(String),
    /// A `traceparent` that is not in the W3C Trace Context format.
    #[error("malformed W3C traceparent {0:?}")]
    InvalidTraceparent(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> NewOutboxMessage {
        NewOutboxMessage::bytes("orders", "order:1", "OrderPlaced", "application/json", "{}")
    }

    #[test]
    fn a_plain_message_passes() {
        assert_eq!(Limits::default().check(&msg()), Ok(()));
    }

    #[test]
    fn each_invalid_input_has_its_own_error() {
        let limits = Limits::default().max_payload_bytes(4);
        let cases = [
            (
                NewOutboxMessage::bytes("o", "k", "", "c", ""),
                ValidationError::Empty {
                    field: "message_type",
                },
            ),
            (
                NewOutboxMessage::bytes("o", "k".repeat(256), "T", "c", ""),
                ValidationError::TooLong {
                    field: "partition_key",
                    len: 256,
                    limit: 255,
                },
            ),
            (
                NewOutboxMessage::bytes("o\r\nX: y", "k", "T", "c", ""),
                ValidationError::ControlCharacter { field: "topic" },
            ),
            (
                NewOutboxMessage::bytes("o", "k", "T", "c", "12345"),
                ValidationError::PayloadTooLarge { size: 5, limit: 4 },
            ),
            (
                msg().with_header("bad name", "v"),
                ValidationError::InvalidHeaderName("bad name".into()),
            ),
            (
                msg().with_header("x-ok", "v\r\nInjected: 1"),
                ValidationError::InvalidHeaderValue("x-ok".into()),
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(limits.check(&message), Err(expected));
        }
    }

    #[test]
    fn broker_limits_count_names_headers_and_payload_and_only_ever_lower_the_limits() {
        // topic 6 + key 7 + type 11 + content type 16 = 40; one header 4 + 5 + 8 = 17.
        let m = msg().with_header("x-id", "12345");
        let (headers, size) = (40 + 17, 40 + 17 + 2);
        assert_eq!(header_bytes(&m), headers);

        let exact = Limits::default().capped_by(
            BrokerLimits::default()
                .max_header_bytes(headers)
                .max_message_bytes(size),
        );
        assert_eq!(exact.check(&m), Ok(()));
        let below = Limits::default().capped_by(
            BrokerLimits::default()
                .max_header_bytes(headers - 1)
                .max_message_bytes(size),
        );
        assert_eq!(
            below.check(&m),
            Err(ValidationError::HeadersTooLarge {
                size: headers,
                limit: headers - 1
            })
        );
        let small =
            Limits::default().capped_by(BrokerLimits::default().max_message_bytes(size - 1));
        assert_eq!(
            small.check(&m),
            Err(ValidationError::MessageTooLarge {
                size,
                limit: size - 1
            })
        );

        // Capping never raises a limit, and an unknown broker limit keeps the outbox's own.
        let own = Limits::default().max_message_bytes(100);
        assert_eq!(
            own.capped_by(BrokerLimits::default().max_message_bytes(1000))
                .message_bytes_limit(),
            Some(100)
        );
        assert_eq!(own.capped_by(BrokerLimits::default()), own);
        assert_eq!(Limits::default().message_bytes_limit(), None);
    }

    #[test]
    fn too_many_headers_is_refused() {
        let mut m = msg();
        for i in 0..3 {
            m = m.with_header(format!("h{i}"), "v");
        }
        assert_eq!(
            Limits::default().max_headers(2).check(&m),
            Err(ValidationError::TooManyHeaders { count: 3, limit: 2 })
        );
    }
}
