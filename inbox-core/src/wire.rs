//! The wire form transports use: the payload as the message body, everything else as headers.
//!
//! [`encode`] puts the message's id, type, partition key, topic, content type and send time into
//! reserved `waybill-*` headers next to the sender's own headers; [`decode`] reads them back and
//! removes them, so the consumer sees the sender's headers only. Decoding never panics: anything
//! a broker hands over either decodes or yields a typed [`DecodeError`].
//!
//! ```
//! use waybill_inbox_core::{wire, IncomingMessage};
//! use waybill_outbox_core::{OutboxMessage, MessageId, Status};
//!
//! let mut stored = OutboxMessage::new(1, MessageId::new(), Status::Pending);
//! stored.topic = "orders".into();
//! stored.message_type = "OrderPlaced".into();
//! stored.content_type = "application/json".into();
//! stored.payload = br#"{"total":1999}"#.to_vec();
//! stored.headers.insert("traceparent".into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
//!
//! let (headers, body) = wire::encode(&stored);
//! assert_eq!(headers[wire::MESSAGE_ID], stored.id.to_string());
//! let received = wire::decode(headers, body)?;
//! assert_eq!(received, IncomingMessage::from(&stored));
//! # Ok::<(), waybill_inbox_core::DecodeError>(())
//! ```

use chrono::{DateTime, SecondsFormat, Utc};
use waybill_outbox_core::{Headers, MessageId, OutboxMessage};

use crate::incoming::OCTET_STREAM;
use crate::{DecodeError, IncomingMessage};

/// Reserved header: the sender-assigned message id (a UUID). Required.
pub const MESSAGE_ID: &str = "waybill-message-id";
/// Reserved header: the message type, e.g. `OrderPlaced`. Required.
pub const MESSAGE_TYPE: &str = "waybill-message-type";
/// Reserved header: the partition key. Optional (empty when missing).
pub const PARTITION_KEY: &str = "waybill-partition-key";
/// Reserved header: the topic the sender enqueued to. Required.
pub const TOPIC: &str = "waybill-topic";
/// Reserved header: the payload's media type. Optional (`application/octet-stream` when
/// missing).
pub const CONTENT_TYPE: &str = "waybill-content-type";
/// Reserved header: when the sender enqueued the message, RFC 3339. Required.
pub const SENT_AT: &str = "waybill-sent-at";

/// Every reserved header name.
pub const RESERVED: [&str; 6] = [
    MESSAGE_ID,
    MESSAGE_TYPE,
    PARTITION_KEY,
    TOPIC,
    CONTENT_TYPE,
    SENT_AT,
];

/// The headers and body to publish for `message`.
///
/// The sender's headers are kept; a sender header with a reserved name is replaced by
/// waybill's value. The send time is the enqueue time (`created_at`) in RFC 3339 with as many
/// fractional digits as it has, so it decodes to the same instant.
pub fn encode(message: &OutboxMessage) -> (Headers, Vec<u8>) {
    let mut headers = message.headers.clone();
    for (name, value) in [
        (MESSAGE_ID, message.id.to_string()),
        (MESSAGE_TYPE, message.message_type.clone()),
        (PARTITION_KEY, message.partition_key.clone()),
        (TOPIC, message.topic.clone()),
        (CONTENT_TYPE, message.content_type.clone()),
        (
            SENT_AT,
            message
                .created_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
    ] {
        if headers.insert(name.to_owned(), value).is_some() {
            log::warn!(
                "message {}: header {name} is reserved; replaced",
                message.id
            );
        }
    }
    (headers, message.payload.clone())
}

/// Reads a received message from its headers and body, removing the reserved headers.
///
/// A JSON content type (`application/json`, with or without parameters, or any `+json` type)
/// requires a payload that is UTF-8 and valid JSON, so a handler never sees a broken body.
///
/// # Errors
///
/// [`DecodeError::MissingId`], [`DecodeError::InvalidId`], [`DecodeError::MissingHeader`] for
/// a missing topic, message type or send time, [`DecodeError::InvalidSentAt`],
/// [`DecodeError::PayloadNotUtf8`] and [`DecodeError::PayloadNotJson`].
pub fn decode(mut headers: Headers, payload: Vec<u8>) -> Result<IncomingMessage, DecodeError> {
    let raw_id = headers.remove(MESSAGE_ID).ok_or(DecodeError::MissingId)?;
    let id: MessageId = raw_id
        .trim()
        .parse()
        .map_err(|source| DecodeError::InvalidId {
            value: raw_id.clone(),
            source,
        })?;
    let mut required = |header: &'static str| {
        headers
            .remove(header)
            .ok_or(DecodeError::MissingHeader { id, header })
    };
    let topic = required(TOPIC)?;
    let message_type = required(MESSAGE_TYPE)?;
    let raw_sent_at = required(SENT_AT)?;
    let sent_at = DateTime::parse_from_rfc3339(raw_sent_at.trim())
        .map_err(|source| DecodeError::InvalidSentAt {
            id,
            value: raw_sent_at.clone(),
            source,
        })?
        .with_timezone(&Utc);
    let partition_key = headers.remove(PARTITION_KEY).unwrap_or_default();
    let content_type = headers
        .remove(CONTENT_TYPE)
        .unwrap_or_else(|| OCTET_STREAM.to_owned());
    if is_json(&content_type) {
        let text = std::str::from_utf8(&payload)
            .map_err(|source| DecodeError::PayloadNotUtf8 { id, source })?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|source| DecodeError::PayloadNotJson { id, source })?;
    }
    Ok(IncomingMessage {
        id,
        topic,
        message_type,
        partition_key,
        content_type,
        payload,
        headers,
        sent_at,
    })
}

/// `application/json`, `application/json; charset=utf-8`, `application/cloudevents+json`, ...
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use waybill_outbox_core::Status;

    use super::*;

    fn stored(content_type: &str, payload: &[u8]) -> OutboxMessage {
        let mut m = OutboxMessage::new(1, MessageId::new(), Status::Pending);
        m.topic = "orders".into();
        m.partition_key = "order:4231".into();
        m.message_type = "OrderPlaced".into();
        m.content_type = content_type.into();
        m.payload = payload.to_vec();
        m.headers
            .insert("correlation-id".into(), "checkout-77".into());
        m.created_at = DateTime::from_timestamp_micros(1_764_201_600_123_456).unwrap_or_default();
        m
    }

    #[test]
    fn round_trip_keeps_every_field_and_strips_reserved_headers() {
        let m = stored("application/json; charset=utf-8", br#"{"a":1}"#);
        let (headers, body) = encode(&m);
        assert_eq!(headers[SENT_AT], "2025-11-27T00:00:00.123456Z");
        assert_eq!(headers.len(), 7);
        let decoded = decode(headers, body).expect("decodes");
        assert_eq!(decoded, IncomingMessage::from(&m));
        assert!(decoded
            .headers
            .keys()
            .all(|k| !RESERVED.contains(&k.as_str())));
    }

    #[test]
    fn sender_headers_with_reserved_names_are_replaced() {
        let mut m = stored("text/plain", b"x");
        m.headers.insert(TOPIC.into(), "spoofed".into());
        let (headers, _) = encode(&m);
        assert_eq!(headers[TOPIC], "orders");
    }

    #[test]
    fn missing_and_malformed_headers_are_typed_errors() {
        let m = stored("text/plain", b"x");
        let (headers, body) = encode(&m);
        let without = |name: &str| {
            let mut h = headers.clone();
            h.remove(name);
            decode(h, body.clone())
        };
        let with = |name: &str, value: &str| {
            let mut h = headers.clone();
            h.insert(name.into(), value.into());
            decode(h, body.clone())
        };
        assert!(matches!(without(MESSAGE_ID), Err(DecodeError::MissingId)));
        assert!(
            matches!(with(MESSAGE_ID, "order:1"), Err(DecodeError::InvalidId { value, .. }) if value == "order:1")
        );
        for name in [TOPIC, MESSAGE_TYPE, SENT_AT] {
            assert!(
                matches!(without(name), Err(DecodeError::MissingHeader { header, .. }) if header == name),
                "{name}"
            );
        }
        assert!(matches!(
            with(SENT_AT, "yesterday"),
            Err(DecodeError::InvalidSentAt { .. })
        ));
        let optional = without(PARTITION_KEY).expect("key is optional");
        assert_eq!(optional.partition_key, "");
        let optional = without(CONTENT_TYPE).expect("content type is optional");
        assert_eq!(optional.content_type, OCTET_STREAM);
    }

    #[test]
    fn json_content_type_requires_utf8_json() {
        let (headers, _) = encode(&stored("application/json", b"{}"));
        assert!(matches!(
            decode(headers.clone(), vec![b'"', 0xff, b'"']),
            Err(DecodeError::PayloadNotUtf8 { .. })
        ));
        assert!(matches!(
            decode(headers.clone(), b"{\"a\":".to_vec()),
            Err(DecodeError::PayloadNotJson { .. })
        ));
        assert!(decode(headers, b" [1, 2] ".to_vec()).is_ok());
        let (headers, body) = encode(&stored("application/cloudevents+json", b"nope"));
        assert!(matches!(
            decode(headers, body),
            Err(DecodeError::PayloadNotJson { .. })
        ));
        let (headers, body) = encode(&stored("application/octet-stream", &[0xff, 0]));
        assert!(decode(headers, body).is_ok());
    }

    fn arbitrary_message() -> impl Strategy<Value = OutboxMessage> {
        let text = "[^\\p{Cc}]{0,40}";
        let payload_and_type = prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..256),
                Just("application/octet-stream".to_owned())
            ),
            (
                proptest::collection::btree_map("[^\\p{Cc}]{0,8}", any::<i64>(), 0..5)
                    .prop_map(|map| serde_json::to_vec(&map).unwrap_or_default()),
                Just("application/json".to_owned())
            ),
            (
                "[^\\p{Cc}]{0,64}".prop_map(String::into_bytes),
                "text/[a-z]{1,8}"
            ),
        ];
        (
            any::<u128>(),
            text,
            text,
            text,
            payload_and_type,
            proptest::collection::btree_map("[a-z][a-z0-9-]{0,20}", text, 0..6),
            // Any instant from year 1 to 9999, to the nanosecond.
            -62_135_596_800_000_000_000i128..253_402_300_799_000_000_000i128,
        )
            .prop_map(
                |(id, topic, key, kind, (payload, content_type), mut headers, nanos)| {
                    headers.retain(|name, _| !name.starts_with("waybill-"));
                    let mut m = OutboxMessage::new(
                        0,
                        MessageId::from(uuid::Uuid::from_u128(id)),
                        Status::Pending,
                    );
                    m.topic = topic;
                    m.partition_key = key;
                    m.message_type = kind;
                    m.content_type = content_type;
                    m.payload = payload;
                    m.headers = headers;
                    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or_default();
                    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or_default();
                    m.created_at = DateTime::from_timestamp(secs, sub).unwrap_or_default();
                    m
                },
            )
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(m in arbitrary_message()) {
            let (headers, body) = encode(&m);
            let decoded = decode(headers, body);
            prop_assert!(decoded.is_ok(), "{:?}", decoded);
            prop_assert_eq!(decoded.ok(), Some(IncomingMessage::from(&m)));
        }

        #[test]
        fn decode_never_panics(
            headers in proptest::collection::btree_map(
                prop_oneof![
                    Just(MESSAGE_ID.to_owned()), Just(MESSAGE_TYPE.to_owned()), Just(TOPIC.to_owned()),
                    Just(SENT_AT.to_owned()), Just(CONTENT_TYPE.to_owned()), Just(PARTITION_KEY.to_owned()),
                    "\\PC{0,12}",
                ],
                prop_oneof![
                    Just(MessageId::new().to_string()), Just("2026-11-27T10:00:00Z".to_owned()),
                    Just("application/json".to_owned()), "\\PC{0,40}",
                ],
                0..10,
            ),
            payload in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let _ = decode(headers, payload);
        }

        /// Hostile values in every reserved header: control characters, CR/LF, NUL, huge
        /// strings, JSON-ish content types over arbitrary bytes. A decode either fails with a
        /// typed error or yields a message whose JSON payload really is JSON.
        #[test]
        fn decode_of_hostile_reserved_headers_is_typed_or_sound(
            values in proptest::collection::vec(any::<String>(), 6),
            content_type in prop_oneof![
                Just("application/json".to_owned()), Just("APPLICATION/JSON; charset=x".to_owned()),
                Just("application/x+json".to_owned()), any::<String>(),
            ],
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            keep_valid_id in any::<bool>(),
        ) {
            let mut headers: Headers = RESERVED.iter().map(|n| (*n).to_owned()).zip(values).collect();
            if keep_valid_id {
                headers.insert(MESSAGE_ID.into(), MessageId::new().to_string());
                headers.insert(SENT_AT.into(), "2026-11-27T10:00:00Z".into());
            }
            headers.insert(CONTENT_TYPE.into(), content_type);
            if let Ok(message) = decode(headers, payload) {
                if is_json(&message.content_type) {
                    prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload).is_ok());
                }
                prop_assert!(message.headers.keys().all(|k| !RESERVED.contains(&k.as_str())));
            }
        }
    }
}
