//! W3C Trace Context: a `traceparent` given at enqueue travels in the message's headers through
//! the relay and the broker to the consumer, where `IncomingMessage::traceparent` returns it.

use crate::{NewOutboxMessage, ValidationError};

/// The header W3C Trace Context puts the parent span in; transports carry it like any header.
pub const TRACEPARENT: &str = "traceparent";

/// Whether `value` is a well-formed W3C `traceparent`: `version-traceid-parentid-flags` in
/// lowercase hex, version not `ff`, ids not all zeros; version `00` has exactly these four
/// fields, later versions may append more after a `-`.
///
/// ```
/// use waybill_outbox_core::is_valid_traceparent;
///
/// assert!(is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
/// assert!(!is_valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
/// assert!(!is_valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
/// ```
pub fn is_valid_traceparent(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &[u8]| s.iter().all(|b| *b == b'0');
    let (version, trace_id, parent_id, flags) =
        (&bytes[..2], &bytes[3..35], &bytes[36..52], &bytes[53..55]);
    if !(hex(version) && hex(trace_id) && hex(parent_id) && hex(flags))
        || version == b"ff"
        || zeros(trace_id)
        || zeros(parent_id)
    {
        return false;
    }
    if version == b"00" {
        bytes.len() == 55
    } else {
        bytes.len() == 55 || bytes[55] == b'-'
    }
}

impl NewOutboxMessage {
    /// Sets the `traceparent` header after checking it with [`is_valid_traceparent`], so the
    /// consumer's handler continues the trace of the transaction that enqueued the message.
    ///
    /// ```
    /// use waybill_outbox_core::{NewOutboxMessage, TRACEPARENT};
    ///
    /// let msg = NewOutboxMessage::bytes("orders", "order:1", "OrderPlaced", "text/plain", "hi")
    ///     .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
    /// assert!(msg.headers().contains_key(TRACEPARENT));
    /// # Ok::<(), waybill_outbox_core::ValidationError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ValidationError::InvalidTraceparent`] for a malformed value; the message is dropped.
    pub fn with_traceparent(self, traceparent: &str) -> Result<Self, ValidationError> {
        if !is_valid_traceparent(traceparent) {
            return Err(ValidationError::InvalidTraceparent(traceparent.to_owned()));
        }
        Ok(self.with_header(TRACEPARENT, traceparent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for value in bad {
            assert!(!is_valid_traceparent(value), "{value:?}");
            let msg = NewOutboxMessage::bytes("t", "k", "T", "text/plain", "");
            assert_eq!(
                msg.with_traceparent(value).err(),
                Some(ValidationError::InvalidTraceparent(value.to_owned()))
            );
        }
    }

    #[test]
    fn well_formed_traceparents_become_the_header() {
        assert!(is_valid_traceparent(VALID));
        // A later version may carry more fields.
        assert!(is_valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        let msg = NewOutboxMessage::bytes("t", "k", "T", "text/plain", "")
            .with_traceparent(VALID)
            .expect("valid");
        assert_eq!(
            msg.headers().get(TRACEPARENT).map(String::as_str),
            Some(VALID)
        );
    }
}
