use std::collections::BTreeMap;

use chrono::DateTime;
use proptest::prelude::*;
use waybill_outbox_core::{Headers, MessageId, OutboxMessage, Status};

use super::*;
use crate::incoming::OCTET_STREAM;

const BINDINGS: [Binding; 4] = [
    Binding::Memory,
    Binding::Amqp,
    Binding::Nats,
    Binding::Kafka,
];

fn stored(content_type: &str, payload: &[u8]) -> OutboxMessage {
    let mut m = OutboxMessage::new(42, MessageId::new(), Status::Pending);
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

/// What the transport of `binding` hands the decoder for what `encoder` wrote: the AMQP
/// publisher moves the content type into the `content_type` property, the Kafka publisher the
/// partition key into the record key.
fn deliver(binding: Binding, message: &OutboxMessage, source: Option<&str>) -> Received {
    let mut encoder = Encoder::new(binding);
    if let Some(source) = source {
        encoder = encoder.with_source(source);
    }
    let (headers, body) = encoder.encode(message);
    let received = Received::from_text(headers, body);
    match binding {
        Binding::Amqp => received.with_content_type(Some(message.content_type.clone())),
        Binding::Kafka => received.with_key(Some(message.partition_key.clone().into_bytes())),
        _ => received,
    }
}

fn decode_as(binding: Binding, received: Received) -> Result<IncomingMessage, DecodeError> {
    Decoder::new(binding).decode(received)
}

fn text_headers(pairs: &[(&str, &str)]) -> BTreeMap<String, WireValue> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), WireValue::from(*v)))
        .collect()
}

/// A minimal binary-mode event of `binding` as a foreign producer would send it.
fn foreign(binding: Binding, id: &str) -> BTreeMap<String, WireValue> {
    let p = binding.prefix();
    text_headers(&[
        (&format!("{p}specversion"), "1.0"),
        (&format!("{p}id"), id),
        (&format!("{p}source"), "/python"),
        (&format!("{p}type"), "com.example.created"),
        (&format!("{p}time"), "2026-12-06T01:02:03.5Z"),
    ])
}

#[test]
fn round_trip_keeps_every_field_on_every_binding() {
    let m = stored("application/json; charset=utf-8", br#"{"a":1}"#);
    for binding in BINDINGS {
        let decoded = decode_as(binding, deliver(binding, &m, None));
        assert_eq!(decoded.ok(), Some(IncomingMessage::from(&m)), "{binding:?}");
    }
}

#[test]
fn binary_mode_headers_per_binding() {
    let mut m = stored("application/json", b"{}");
    m.headers.insert(
        TRACEPARENT.into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    m.message_type = "Order Placed".into();
    let id = m.id.to_string();

    let (kafka, _) = Encoder::new(Binding::Kafka).encode(&m);
    let names: Vec<&str> = kafka.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "ce_id",
            "ce_partitionkey",
            "ce_sequence",
            "ce_source",
            "ce_specversion",
            "ce_time",
            "ce_traceparent",
            "ce_type",
            "ce_waybilltopic",
            "content-type",
            "correlation-id",
            "traceparent"
        ]
    );
    assert_eq!(kafka["ce_id"], id);
    assert_eq!(kafka["ce_type"], "Order Placed");
    assert_eq!(kafka["ce_time"], "2025-11-27T00:00:00.123456Z");
    assert_eq!(kafka["ce_sequence"], "0000000000000000042");
    assert_eq!(kafka["ce_source"], "urn:waybill:orders");

    let (nats, _) = Encoder::new(Binding::Nats)
        .with_source("https://shop.example/orders")
        .encode(&m);
    assert_eq!(nats["ce-type"], "Order%20Placed");
    assert_eq!(nats["ce-source"], "https://shop.example/orders");
    assert_eq!(nats["content-type"], "application/json");
    assert_eq!(nats["ce-specversion"], "1.0");

    let (amqp, _) = Encoder::new(Binding::Amqp).encode(&m);
    assert_eq!(amqp["ce-type"], "Order Placed");
    assert!(
        !amqp.contains_key("content-type"),
        "AMQP: content_type property"
    );

    m.partition_key.clear();
    m.seq = 0;
    let (bare, _) = Encoder::new(Binding::Nats).encode(&m);
    assert!(!bare.contains_key("ce-partitionkey") && !bare.contains_key("ce-sequence"));
}

#[test]
fn sender_headers_with_written_names_are_replaced() {
    let mut m = stored("text/plain", b"x");
    m.headers.insert("ce-id".into(), "spoofed".into());
    m.headers.insert("content-type".into(), "spoofed".into());
    let (headers, _) = Encoder::new(Binding::Memory).encode(&m);
    assert_eq!(headers["ce-id"], m.id.to_string());
    assert_eq!(headers["content-type"], "text/plain");
}

#[test]
fn a_foreign_binary_event_decodes_with_fallbacks() -> Result<(), DecodeError> {
    let id = MessageId::new();
    let mut headers = foreign(Binding::Kafka, &id.to_string());
    headers.insert("content-type".into(), "text/plain".into());
    headers.insert(
        "ce_traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    headers.insert("ce_myextension".into(), "kept".into());
    headers.insert("binary".into(), WireValue::Bytes(vec![0xff]));
    let received = Received::new(headers, b"hi".to_vec())
        .with_key(Some(b"order:1".to_vec()))
        .with_topic("orders.v1");
    let m = decode_as(Binding::Kafka, received)?;
    assert_eq!(m.id, id);
    assert_eq!(m.message_type, "com.example.created");
    assert_eq!(m.topic, "orders.v1", "falls back to where it came from");
    assert_eq!(m.partition_key, "order:1", "falls back to the record key");
    assert_eq!(m.content_type, "text/plain");
    assert_eq!(m.sent_at.timestamp_millis(), 1_796_518_923_500);
    assert_eq!(
        m.headers["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(m.headers["ce_myextension"], "kept");
    assert!(!m.headers.contains_key("binary"));
    Ok(())
}

#[test]
fn binary_mode_without_time_or_content_type_has_defaults() -> Result<(), DecodeError> {
    let mut headers = foreign(Binding::Nats, &MessageId::new().to_string());
    headers.remove("ce-time");
    let before = chrono::Utc::now();
    let m = decode_as(Binding::Nats, Received::new(headers, vec![0xff]))?;
    assert!(m.sent_at >= before);
    assert_eq!(m.content_type, OCTET_STREAM);
    assert_eq!((m.topic.as_str(), m.partition_key.as_str()), ("", ""));
    Ok(())
}

#[test]
fn nats_values_are_percent_decoded_and_other_bindings_are_not() -> Result<(), DecodeError> {
    let id = MessageId::new().to_string();
    let mut headers = foreign(Binding::Nats, &id);
    headers.insert("ce-type".into(), "com.example%3Acreated%20%E2%82%AC".into());
    let m = decode_as(Binding::Nats, Received::new(headers, Vec::new()))?;
    assert_eq!(m.message_type, "com.example:created €");

    let mut headers = foreign(Binding::Amqp, &id);
    headers.insert("ce-type".into(), "50%".into());
    let m = decode_as(Binding::Amqp, Received::new(headers, Vec::new()))?;
    assert_eq!(m.message_type, "50%");
    Ok(())
}

#[test]
fn amqp_accepts_amqp_1_0_names_and_any_case_and_timestamps() -> Result<(), DecodeError> {
    let id = MessageId::new();
    let mut headers = text_headers(&[
        ("CloudEvents_SpecVersion", "1.0"),
        ("cloudEvents:id", &id.to_string()),
        ("CE-Source", "/java"),
        ("cloudEvents_type", "created"),
    ]);
    headers.insert(
        "cloudEvents_time".into(),
        WireValue::Timestamp(1_764_201_600),
    );
    let m = decode_as(Binding::Amqp, Received::new(headers.clone(), Vec::new()))?;
    assert_eq!((m.id, m.message_type.as_str()), (id, "created"));
    assert_eq!(m.sent_at.timestamp(), 1_764_201_600);
    // Kafka reads only its own prefix.
    assert!(matches!(
        decode_as(Binding::Kafka, Received::new(headers, Vec::new())),
        Err(DecodeError::NotAnEvent {
            specversion: "ce_specversion",
            ..
        })
    ));
    Ok(())
}

#[test]
fn amqp_time_falls_back_to_the_timestamp_property() -> Result<(), DecodeError> {
    let mut headers = foreign(Binding::Amqp, &MessageId::new().to_string());
    headers.remove("ce-time");
    let received = Received::new(headers, Vec::new()).with_native_timestamp(Some(1_700_000_000));
    let m = decode_as(Binding::Amqp, received)?;
    assert_eq!(m.sent_at.timestamp(), 1_700_000_000);
    Ok(())
}

/// Each malformed binary-mode variant and its exact error text.
#[test]
fn malformed_binary_mode_is_a_precise_error() {
    let id = MessageId::new().to_string();
    let base = || foreign(Binding::Amqp, &id);
    let with = |name: &str, value: WireValue| {
        let mut h = base();
        h.insert(name.into(), value);
        decode_as(Binding::Amqp, Received::new(h, b"{}".to_vec()))
            .err()
            .map(|e| e.to_string())
    };
    let without = |name: &str| {
        let mut h = base();
        h.remove(name);
        decode_as(Binding::Amqp, Received::new(h, b"{}".to_vec()))
            .err()
            .map(|e| e.to_string())
    };
    let cases = [
        (
            with("ce-id", WireValue::Bytes(id.clone().into_bytes())),
            "ce-id is bytes, expected a string",
        ),
        (
            with("ce-id", WireValue::Integer(7)),
            "ce-id is an integer, expected a string",
        ),
        (
            with("ce-type", WireValue::Other("a table")),
            "ce-type is a table, expected a string",
        ),
        (with("ce-id", "".into()), "ce-id is empty"),
        (
            with("ce-id", "order:1".into()),
            "ce-id is not a UUID: \"order:1\"",
        ),
        (
            with("ce-specversion", "0.3".into()),
            "ce-specversion is \"0.3\", expected \"1.0\"",
        ),
        (
            with("ce-specversion", WireValue::Bool(true)),
            "ce-specversion is a boolean, expected a string",
        ),
        (without("ce-id"), "ce-id is missing"),
        (without("ce-source"), "ce-source is missing"),
        (without("ce-type"), "ce-type is missing"),
        (
            with("ce-time", "yesterday".into()),
            &format!("message {id}: ce-time is not an RFC 3339 timestamp: \"yesterday\""),
        ),
        (
            with("ce-time", WireValue::Timestamp(u64::MAX)),
            &format!("message {id}: ce-time {} is out of range", u64::MAX),
        ),
        (
            with("ce-partitionkey", WireValue::Float(1.5)),
            "ce-partitionkey is a float, expected a string",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got.as_deref(), Some(want));
    }
    let mut h = foreign(Binding::Nats, &id);
    h.insert("ce-type".into(), "100%".into());
    assert_eq!(
        decode_as(Binding::Nats, Received::new(h, Vec::new()))
            .err()
            .map(|e| e.to_string()),
        Some("ce-type is not valid percent-encoded UTF-8: \"100%\"".to_owned())
    );
    let h = foreign(Binding::Kafka, &id);
    let received = Received::new(h, Vec::new()).with_key(Some(vec![0xff]));
    assert_eq!(
        decode_as(Binding::Kafka, received)
            .err()
            .map(|e| e.to_string()),
        Some("record key is bytes, expected a UTF-8 string".to_owned())
    );
}

#[test]
fn json_content_type_requires_utf8_json_in_every_mode() {
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
    let (headers, body) = encode(&stored("application/vnd.x+json", b"nope"));
    assert!(matches!(
        decode(headers, body),
        Err(DecodeError::PayloadNotJson { .. })
    ));
    let (headers, body) = encode(&stored("application/octet-stream", &[0xff, 0]));
    assert!(decode(headers, body).is_ok());
}

fn structured_event(event: &serde_json::Value) -> Received {
    Received::from_text(
        Headers::from([
            (
                "content-type".to_owned(),
                "application/cloudevents+json; charset=utf-8".to_owned(),
            ),
            ("x-user".to_owned(), "kept".to_owned()),
        ]),
        event.to_string().into_bytes(),
    )
}

#[test]
fn structured_mode_reads_data_data_base64_and_extensions() -> Result<(), DecodeError> {
    let id = MessageId::new();
    let event = serde_json::json!({
        "specversion": "1.0", "id": id.to_string(), "source": "/python", "type": "created",
        "time": "2026-12-06T01:02:03Z", "partitionkey": "k", "waybilltopic": "orders",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "data": {"total": 1999}
    });
    let m = decode_as(Binding::Nats, structured_event(&event))?;
    assert_eq!(
        (m.id, m.topic.as_str(), m.partition_key.as_str()),
        (id, "orders", "k")
    );
    assert_eq!(m.content_type, "application/json");
    assert_eq!(m.payload, br#"{"total":1999}"#);
    assert_eq!(
        m.headers.len(),
        2,
        "x-user and traceparent: {:?}",
        m.headers
    );

    let event = serde_json::json!({
        "specversion": "1.0", "id": id.to_string(), "source": "/python", "type": "created",
        "datacontenttype": "text/plain", "data": "hello"
    });
    let m = decode_as(Binding::Kafka, structured_event(&event).with_topic("t"))?;
    assert_eq!(
        (
            m.payload.as_slice(),
            m.content_type.as_str(),
            m.topic.as_str()
        ),
        (&b"hello"[..], "text/plain", "t")
    );

    let event = serde_json::json!({
        "specversion": "1.0", "id": id.to_string(), "source": "/python", "type": "created",
        "data_base64": "/wA="
    });
    let m = decode_as(Binding::Memory, structured_event(&event))?;
    assert_eq!(
        (m.payload.as_slice(), m.content_type.as_str()),
        (&[0xff, 0][..], OCTET_STREAM)
    );

    // RabbitMQ: the content type is the property.
    let received = Received::new(BTreeMap::new(), event.to_string().into_bytes())
        .with_content_type(Some(STRUCTURED_JSON.to_owned()));
    assert_eq!(decode_as(Binding::Amqp, received)?.payload, [0xff, 0]);
    Ok(())
}

#[test]
fn malformed_structured_mode_is_a_precise_error() {
    let id = MessageId::new().to_string();
    let valid = serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/python", "type": "created"
    });
    let with = |member: &str, value: serde_json::Value| {
        let mut event = valid.clone();
        event[member] = value;
        decode_as(Binding::Nats, structured_event(&event))
            .err()
            .map(|e| e.to_string())
    };
    let without = |member: &str| {
        let mut event = valid.clone();
        event.as_object_mut().map(|o| o.remove(member));
        decode_as(Binding::Nats, structured_event(&event))
            .err()
            .map(|e| e.to_string())
    };
    let cases = [
        (
            with("id", 7.into()),
            "id of the structured event is a number, expected a string".to_owned(),
        ),
        (
            with("id", "x".into()),
            "id of the structured event is not a UUID: \"x\"".to_owned(),
        ),
        (
            with("specversion", "0.3".into()),
            "specversion of the structured event is \"0.3\", expected \"1.0\"".to_owned(),
        ),
        (
            with("type", "".into()),
            "type of the structured event is empty".to_owned(),
        ),
        (
            without("source"),
            "source of the structured event is missing".to_owned(),
        ),
        (
            with("data_base64", "***".into()),
            format!("message {id}: data_base64 is not base64"),
        ),
        (
            with("data_base64", serde_json::json!([1])),
            "data_base64 of the structured event is an array, expected a string".to_owned(),
        ),
        (
            with("time", "soon".into()),
            format!(
                "message {id}: time of the structured event is not an RFC 3339 timestamp: \"soon\""
            ),
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, Some(want));
    }
    let mut not_json = structured_event(&valid);
    not_json.payload = b"[1]".to_vec();
    assert_eq!(
        decode_as(Binding::Nats, not_json)
            .err()
            .map(|e| e.to_string()),
        Some("structured CloudEvent is not a JSON object".to_owned())
    );
    let avro = Received::from_text(
        Headers::from([(
            "content-type".to_owned(),
            "application/cloudevents+avro".to_owned(),
        )]),
        Vec::new(),
    );
    assert_eq!(
        decode_as(Binding::Nats, avro).err().map(|e| e.to_string()),
        Some("structured CloudEvent in content type \"application/cloudevents+avro\"; only application/cloudevents+json is read".to_owned())
    );
}

/// The headers the previous version of waybill wrote.
fn legacy_headers(m: &OutboxMessage) -> Headers {
    let mut headers = m.headers.clone();
    for (name, value) in [
        (legacy::MESSAGE_ID, m.id.to_string()),
        (legacy::MESSAGE_TYPE, m.message_type.clone()),
        (legacy::PARTITION_KEY, m.partition_key.clone()),
        (legacy::TOPIC, m.topic.clone()),
        (legacy::CONTENT_TYPE, m.content_type.clone()),
        (
            legacy::SENT_AT,
            m.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
    ] {
        headers.insert(name.to_owned(), value);
    }
    headers
}

#[test]
fn legacy_headers_still_decode_on_every_binding() {
    let m = stored("application/json", b"{}");
    for binding in BINDINGS {
        let received = Received::from_text(legacy_headers(&m), m.payload.clone());
        assert_eq!(
            decode_as(binding, received).ok(),
            Some(IncomingMessage::from(&m)),
            "{binding:?}"
        );
    }
}

#[test]
fn malformed_legacy_headers_are_precise_errors() {
    let m = stored("text/plain", b"x");
    let headers = legacy_headers(&m);
    let without = |name: &str| {
        let mut h = headers.clone();
        h.remove(name);
        decode(h, b"x".to_vec())
    };
    let with = |name: &str, value: &str| {
        let mut h = headers.clone();
        h.insert(name.into(), value.into());
        decode(h, b"x".to_vec())
    };
    assert!(matches!(
        with(legacy::MESSAGE_ID, "order:1"),
        Err(DecodeError::InvalidId { value, .. }) if value == "order:1"
    ));
    for name in [legacy::TOPIC, legacy::MESSAGE_TYPE, legacy::SENT_AT] {
        assert!(
            matches!(without(name), Err(DecodeError::MissingHeader { header, .. }) if header == name),
            "{name}"
        );
    }
    assert!(matches!(
        with(legacy::SENT_AT, "yesterday"),
        Err(DecodeError::InvalidSentAt { .. })
    ));
    assert_eq!(
        without(legacy::PARTITION_KEY).map(|m| m.partition_key).ok(),
        Some(String::new())
    );
    assert_eq!(
        without(legacy::CONTENT_TYPE).map(|m| m.content_type).ok(),
        Some(OCTET_STREAM.to_owned())
    );
    let mut typed = Received::from_text(headers, Vec::new());
    typed.headers.insert(
        legacy::MESSAGE_ID.into(),
        WireValue::Bytes(m.id.to_string().into_bytes()),
    );
    assert_eq!(
        decode_as(Binding::Amqp, typed).err().map(|e| e.to_string()),
        Some("waybill-message-id is bytes, expected a string".to_owned())
    );
}

#[test]
fn native_metadata_only_when_configured() -> Result<(), DecodeError> {
    let id = MessageId::new();
    let received = Received::new(text_headers(&[("x-user", "kept")]), b"{}".to_vec())
        .with_native_id(Some(id.to_string().into()))
        .with_native_type(Some("OrderPlaced".into()))
        .with_native_timestamp(Some(1_764_201_600))
        .with_content_type(Some("application/json".into()))
        .with_topic("orders");
    assert_eq!(
        decode_as(Binding::Amqp, received.clone())
            .err()
            .map(|e| e.to_string()),
        Some(
            "not a CloudEvent: no ce-specversion header, no content type \
             application/cloudevents+json and no waybill-message-id header; it has a native \
             message id, which this consumer reads only with native metadata turned on"
                .to_owned()
        )
    );
    let native = Decoder::new(Binding::Amqp).native_metadata(true);
    let m = native.decode(received.clone())?;
    assert_eq!(
        (m.id, m.message_type.as_str(), m.topic.as_str()),
        (id, "OrderPlaced", "orders")
    );
    assert_eq!(
        (m.content_type.as_str(), m.sent_at.timestamp()),
        ("application/json", 1_764_201_600)
    );
    assert_eq!(m.headers["x-user"], "kept");

    let nats = Decoder::new(Binding::Nats).native_metadata(true);
    let m = nats.decode(
        Received::new(BTreeMap::new(), b"x".to_vec())
            .with_native_id(Some(id.to_string().into()))
            .with_topic("orders.eu"),
    )?;
    assert_eq!(
        (m.id, m.message_type.as_str(), m.topic.as_str()),
        (id, "", "orders.eu")
    );

    let bytes = received
        .clone()
        .with_native_id(Some(WireValue::Bytes(id.to_string().into_bytes())));
    assert_eq!(
        native.decode(bytes).err().map(|e| e.to_string()),
        Some("message_id property is bytes, expected a string".to_owned())
    );
    let not_uuid = received.clone().with_native_id(Some("42".into()));
    assert_eq!(
        nats.decode(not_uuid).err().map(|e| e.to_string()),
        Some("Nats-Msg-Id header is not a UUID: \"42\"".to_owned())
    );
    let far = received.with_native_timestamp(Some(u64::MAX));
    assert!(matches!(
        native.decode(far),
        Err(DecodeError::TimestampOutOfRange { .. })
    ));
    Ok(())
}

#[test]
fn nothing_recognisable_is_not_an_event() {
    assert_eq!(
        decode(Headers::new(), b"{}".to_vec())
            .err()
            .map(|e| e.to_string()),
        Some(
            "not a CloudEvent: no ce-specversion header, no content type \
             application/cloudevents+json and no waybill-message-id header"
                .to_owned()
        )
    );
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
        (0..i64::MAX, any::<u128>()),
        text,
        text,
        "[^\\p{Cc}]{1,40}",
        payload_and_type,
        proptest::collection::btree_map("[a-bd-z][a-z0-9-]{0,20}", text, 0..6),
        // Any instant from year 1 to 9999, to the nanosecond.
        -62_135_596_800_000_000_000i128..253_402_300_799_000_000_000i128,
    )
        .prop_map(
            |((seq, id), topic, key, kind, (payload, content_type), mut headers, nanos)| {
                headers.retain(|name, _| !name.starts_with("waybill-") && name != "content-type");
                let mut m = OutboxMessage::new(
                    seq,
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

fn arbitrary_value() -> impl Strategy<Value = WireValue> {
    prop_oneof![
        Just(WireValue::from("1.0")),
        Just(WireValue::from(MessageId::new().to_string())),
        Just(WireValue::from("2026-11-27T10:00:00Z")),
        Just(WireValue::from("application/json")),
        Just(WireValue::from("application/cloudevents+json")),
        "\\PC{0,40}".prop_map(WireValue::Text),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(WireValue::Bytes),
        any::<i64>().prop_map(WireValue::Integer),
        any::<u64>().prop_map(WireValue::Timestamp),
        any::<bool>().prop_map(WireValue::Bool),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode_on_every_binding(m in arbitrary_message()) {
        for binding in BINDINGS {
            let decoded = decode_as(binding, deliver(binding, &m, Some("/p")));
            prop_assert!(decoded.is_ok(), "{:?} {:?}", binding, decoded);
            prop_assert_eq!(decoded.ok(), Some(IncomingMessage::from(&m)));
        }
    }

    #[test]
    fn decode_never_panics(
        headers in proptest::collection::btree_map(
            prop_oneof![
                Just("ce-specversion".to_owned()), Just("ce_specversion".to_owned()),
                Just("ce-id".to_owned()), Just("ce_id".to_owned()), Just("cloudEvents:id".to_owned()),
                Just("ce-type".to_owned()), Just("ce-source".to_owned()), Just("ce-time".to_owned()),
                Just("ce_time".to_owned()), Just("content-type".to_owned()),
                Just(legacy::MESSAGE_ID.to_owned()), Just(legacy::TOPIC.to_owned()),
                Just(legacy::SENT_AT.to_owned()), Just(legacy::MESSAGE_TYPE.to_owned()),
                "\\PC{0,12}",
            ],
            arbitrary_value(),
            0..12,
        ),
        payload in proptest::collection::vec(any::<u8>(), 0..128),
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        native_id in proptest::option::of(arbitrary_value()),
        timestamp in proptest::option::of(any::<u64>()),
        content_type in proptest::option::of("\\PC{0,30}"),
    ) {
        for binding in BINDINGS {
            let received = Received::new(headers.clone(), payload.clone())
                .with_key(key.clone())
                .with_native_id(native_id.clone())
                .with_native_timestamp(timestamp)
                .with_content_type(content_type.clone());
            if let Ok(message) = Decoder::new(binding).native_metadata(true).decode(received) {
                if is_json(&message.content_type) {
                    prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload).is_ok());
                }
            }
        }
    }

    /// Any structured event body: a typed error or a sound message.
    #[test]
    fn structured_decode_never_panics(body in "\\PC{0,200}", id in any::<bool>()) {
        let body = if id {
            format!(r#"{{"specversion":"1.0","id":"{}","source":"s","type":"t",{body}}}"#, MessageId::new())
        } else {
            body
        };
        let received = Received::from_text(
            Headers::from([("content-type".to_owned(), STRUCTURED_JSON.to_owned())]),
            body.into_bytes(),
        );
        let _ = decode_as(Binding::Nats, received);
    }
}

/// The example message of `docs/wire.md`, so the document and the code cannot drift apart.
fn documented_example() -> OutboxMessage {
    let id = "0193a5b4-7c1e-7d2a-9f3e-2b8c4d6e8f01"
        .parse()
        .expect("a UUID");
    let mut m = OutboxMessage::new(1042, id, Status::Pending);
    m.topic = "orders".into();
    m.partition_key = "order:4231".into();
    m.message_type = "OrderPlaced".into();
    m.content_type = "application/json".into();
    m.payload = br#"{"order_id":4231,"total_cents":1999}"#.to_vec();
    m.headers.insert(
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    m.headers
        .insert("correlation-id".into(), "checkout-77".into());
    m.created_at = DateTime::from_timestamp_micros(1_796_552_130_123_456).unwrap_or_default();
    m
}

#[test]
fn the_documented_examples_are_what_is_encoded() {
    let doc = include_str!("../../../docs/wire.md");
    let m = documented_example();
    let (kafka, body) = Encoder::new(Binding::Kafka).encode(&m);
    assert_eq!(kafka.len(), 12);
    for (name, value) in &kafka {
        let line = format!("{name:<17}{value}");
        assert!(
            doc.contains(&line),
            "docs/wire.md lacks the Kafka line {line:?}"
        );
    }
    let (nats, _) = Encoder::new(Binding::Nats).encode(&m);
    for (name, value) in &nats {
        let line = format!("\n{name}: {value}\n");
        assert!(
            doc.contains(&line),
            "docs/wire.md lacks the NATS line {line:?}"
        );
    }
    let (amqp, _) = Encoder::new(Binding::Amqp).encode(&m);
    for (name, value) in &amqp {
        let line = format!("{name}: \"{value}\"");
        assert!(
            doc.contains(&line),
            "docs/wire.md lacks the RabbitMQ entry {line:?}"
        );
    }
    assert_eq!(
        amqp.len(),
        kafka.len() - 1,
        "no content-type header on RabbitMQ"
    );
    assert!(doc.contains(&format!("timestamp: {}", m.created_at.timestamp())));
    assert!(doc.contains(std::str::from_utf8(&body).unwrap_or_default()));
    let mut key = m.clone();
    key.partition_key = "order 4231 ü".into();
    let (nats, _) = Encoder::new(Binding::Nats).encode(&key);
    assert!(doc.contains(&format!("ce-partitionkey: {}`", nats["ce-partitionkey"])));
}

#[test]
fn a_sequenced_message_sends_its_key_number_and_epoch_as_extensions_not_headers() {
    let mut message = stored("text/plain", b"x");
    waybill_outbox_core::Stamp::new(7, "epoch-1").write(&mut message.headers);
    for binding in BINDINGS {
        let (headers, _) = Encoder::new(binding).encode(&message);
        assert_eq!(headers[&binding.header("sequence")], "0000000000000000007");
        assert_eq!(headers[&binding.header(EPOCH_EXTENSION)], "epoch-1");
        for reserved in waybill_outbox_core::sequence::RESERVED_HEADERS {
            assert!(
                !headers.contains_key(reserved),
                "{reserved} stays in the outbox"
            );
        }
        let decoded = Decoder::new(binding)
            .decode(deliver(binding, &message, Some("/orders-service")))
            .unwrap_or_else(|e| panic!("{binding:?}: {e}"));
        let position = decoded
            .sequence
            .unwrap_or_else(|| panic!("{binding:?}: no sequence"));
        assert_eq!(position.source, "/orders-service");
        assert_eq!(
            position.stamp,
            waybill_outbox_core::Stamp::new(7, "epoch-1")
        );
        assert_eq!(position.skipped, None);
        assert_eq!(
            decoded.headers.get("correlation-id").map(String::as_str),
            Some("checkout-77")
        );
    }
}

#[test]
fn a_bare_sequence_is_the_informational_outbox_position_and_a_broken_one_is_refused() {
    let message = stored("text/plain", b"x");
    let decoded = Decoder::new(Binding::Kafka)
        .decode(deliver(Binding::Kafka, &message, None))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded.sequence, None, "no epoch: not a sequenced message");
    let (mut headers, body) = Encoder::new(Binding::Kafka).encode(&message);
    headers.insert("ce_waybillepoch".into(), "e".into());
    headers.insert("ce_sequence".into(), "seven".into());
    let refused = Decoder::new(Binding::Kafka).decode(Received::from_text(headers, body));
    assert!(
        matches!(refused, Err(DecodeError::InvalidSequence { ref value, .. }) if value == "seven"),
        "{refused:?}"
    );
}

#[test]
fn a_skip_marker_carries_its_reason() {
    let mut message = stored("application/octet-stream", b"");
    waybill_outbox_core::Stamp::new(3, "e").write(&mut message.headers);
    message.headers.insert(
        waybill_outbox_core::sequence::SKIPPED_HEADER.into(),
        "poison payload".into(),
    );
    let decoded = Decoder::new(Binding::Nats)
        .decode(deliver(Binding::Nats, &message, None))
        .unwrap_or_else(|e| panic!("{e}"));
    let position = decoded.sequence.unwrap_or_else(|| panic!("no sequence"));
    assert_eq!(position.skipped.as_deref(), Some("poison payload"));
    assert_eq!(position.source, "urn:waybill:orders");
}
