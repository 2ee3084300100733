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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4 * 1024 * 1024,
            max_name_bytes: 255,
            max_headers: 64,
            max_header_value_bytes: 8 * 1024,
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

    /// The payload limit in force.
    pub fn payload_limit(&self) -> usize {
        self.max_payload_bytes
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
