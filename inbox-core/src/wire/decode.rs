//! Reading a delivery: binary mode, structured mode, legacy headers, native metadata.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use waybill_outbox_core::{Headers, MessageId, Stamp};

use super::{
    essence, is_json, legacy, percent, Binding, CONTENT_TYPE_HEADER, EPOCH_EXTENSION,
    SKIPPED_EXTENSION, SPEC_VERSION, STRUCTURED_JSON, TOPIC_EXTENSION, TRACEPARENT, TRACESTATE,
};
use crate::incoming::OCTET_STREAM;
use crate::{DecodeError, IncomingMessage, Sequenced};

/// A header value as the broker delivered it. NATS headers are always text; Kafka header
/// values are bytes ([`WireValue::from_bytes`]); an AMQP headers table holds typed values.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WireValue {
    /// A string (UTF-8).
    Text(String),
    /// Bytes: an AMQP byte array, or a value that is not UTF-8.
    Bytes(Vec<u8>),
    /// An integer of any width.
    Integer(i64),
    /// A floating-point number.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// An AMQP timestamp: seconds since the Unix epoch.
    Timestamp(u64),
    /// Anything else (a table, an array, void), by the name errors use, e.g. `a table`.
    Other(&'static str),
}

impl WireValue {
    /// Text when `bytes` are UTF-8, else [`WireValue::Bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Bytes(bytes.to_vec()),
        }
    }

    /// What the value is, as errors say it: `a string`, `bytes`, `an integer`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Text(_) => "a string",
            Self::Bytes(_) => "bytes",
            Self::Integer(_) => "an integer",
            Self::Float(_) => "a float",
            Self::Bool(_) => "a boolean",
            Self::Timestamp(_) => "a timestamp",
            Self::Other(kind) => kind,
        }
    }

    /// The value as a pass-through header: text as it is, numbers, booleans and timestamps in
    /// decimal; `None` for bytes and anything else.
    fn into_header(self) -> Option<String> {
        Some(match self {
            Self::Text(text) => text,
            Self::Integer(n) => n.to_string(),
            Self::Float(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Timestamp(n) => n.to_string(),
            Self::Bytes(_) | Self::Other(_) => return None,
        })
    }
}

impl From<String> for WireValue {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for WireValue {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

/// A delivery as a transport hands it to [`Decoder::decode`]: headers, body and what the
/// broker knows besides.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Received {
    /// The headers (the AMQP headers table, NATS or Kafka headers), typed.
    pub headers: BTreeMap<String, WireValue>,
    /// The body.
    pub payload: Vec<u8>,
    /// The AMQP `content_type` property (RabbitMQ's `datacontenttype`).
    pub content_type: Option<String>,
    /// The Kafka record key: the partition key when `partitionkey` is absent.
    pub key: Option<Vec<u8>>,
    /// The topic the message came from, when it carries none (a producer that does not know
    /// the `waybilltopic` extension): the Kafka topic, the NATS subject, the AMQP exchange.
    pub topic: Option<String>,
    /// The native message id: the AMQP `message_id` property or NATS `Nats-Msg-Id`.
    pub native_id: Option<WireValue>,
    /// The AMQP `type` property.
    pub native_type: Option<String>,
    /// The AMQP `timestamp` property, seconds since the epoch.
    pub native_timestamp: Option<u64>,
}

impl Received {
    /// A delivery with string headers.
    pub fn from_text(headers: Headers, payload: Vec<u8>) -> Self {
        Self {
            headers: headers
                .into_iter()
                .map(|(name, value)| (name, WireValue::Text(value)))
                .collect(),
            payload,
            ..Self::default()
        }
    }

    /// A delivery with typed headers.
    pub fn new(headers: BTreeMap<String, WireValue>, payload: Vec<u8>) -> Self {
        Self {
            headers,
            payload,
            ..Self::default()
        }
    }

    /// Sets the AMQP `content_type` property.
    #[must_use]
    pub fn with_content_type(mut self, content_type: Option<String>) -> Self {
        self.content_type = content_type;
        self
    }

    /// Sets the Kafka record key.
    #[must_use]
    pub fn with_key(mut self, key: Option<Vec<u8>>) -> Self {
        self.key = key;
        self
    }

    /// Sets the topic the message came from.
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Sets the native message id.
    #[must_use]
    pub fn with_native_id(mut self, id: Option<WireValue>) -> Self {
        self.native_id = id;
        self
    }

    /// Sets the AMQP `type` property.
    #[must_use]
    pub fn with_native_type(mut self, message_type: Option<String>) -> Self {
        self.native_type = message_type;
        self
    }

    /// Sets the AMQP `timestamp` property (seconds since the epoch).
    #[must_use]
    pub fn with_native_timestamp(mut self, seconds: Option<u64>) -> Self {
        self.native_timestamp = seconds;
        self
    }

    /// The `content-type` header's name as sent (any case), for bindings that use it.
    fn content_type_header_name(&self) -> Option<String> {
        self.headers
            .keys()
            .find(|name| name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
            .cloned()
    }
}

/// Reads deliveries of one [`Binding`]: binary mode, then structured mode, then the
/// [`legacy`] headers, then (only with [`Decoder::native_metadata`]) native metadata.
///
/// ```
/// use waybill_inbox_core::wire::{Binding, Decoder, Received, WireValue};
/// use waybill_outbox_core::MessageId;
///
/// // What pika sends with `BasicProperties(message_id=..., type=..., timestamp=...)`:
/// let id = MessageId::new();
/// let received = Received::new(Default::default(), b"{}".to_vec())
///     .with_native_id(Some(WireValue::Text(id.to_string())))
///     .with_native_type(Some("OrderPlaced".into()))
///     .with_native_timestamp(Some(1_764_201_600))
///     .with_content_type(Some("application/json".into()))
///     .with_topic("orders");
/// let strict = Decoder::new(Binding::Amqp);
/// assert!(strict.decode(received.clone()).is_err());
/// let message = strict.native_metadata(true).decode(received)?;
/// assert_eq!((message.id, message.topic.as_str()), (id, "orders"));
/// assert_eq!(message.sent_at.timestamp(), 1_764_201_600);
/// # Ok::<(), waybill_inbox_core::DecodeError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoder {
    binding: Binding,
    native: bool,
}

/// Attributes waybill reads from binary mode and removes from the headers; other `ce-`
/// headers (extensions it does not know) stay with the sender's headers.
const KNOWN: [&str; 15] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "dataschema",
    "subject",
    "partitionkey",
    "sequence",
    TOPIC_EXTENSION,
    EPOCH_EXTENSION,
    SKIPPED_EXTENSION,
    TRACEPARENT,
    TRACESTATE,
];

impl Decoder {
    /// A decoder for `binding` that does not accept native metadata.
    pub fn new(binding: Binding) -> Self {
        Self {
            binding,
            native: false,
        }
    }

    /// Whether a message with neither CloudEvents attributes nor legacy headers is read from
    /// the broker's native metadata: the AMQP `message_id` (the id, a UUID), `type`,
    /// `timestamp` (seconds) and `content_type` properties, or NATS `Nats-Msg-Id`. The topic
    /// is where the message came from, the type empty when not given, the send time the
    /// receive time when not given. Defaults to `false`: such a message is dead-lettered
    /// as not a CloudEvent.
    #[must_use]
    pub fn native_metadata(mut self, accept: bool) -> Self {
        self.native = accept;
        self
    }

    /// The message in `received`.
    ///
    /// A JSON content type (`application/json`, with or without parameters, or any `+json`
    /// type) requires a payload that is UTF-8 and valid JSON, so a handler never sees a
    /// broken body.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the header and what is wrong with it: missing, of the wrong
    /// type ("ce-id is bytes, expected a string"), empty, not percent-encoded, not a UUID, not
    /// RFC 3339; a structured event that is not JSON; a JSON payload that is not JSON; or
    /// [`DecodeError::NotAnEvent`] when none of the accepted forms applies.
    pub fn decode(&self, mut received: Received) -> Result<IncomingMessage, DecodeError> {
        if self.attribute_header(&received, "specversion").is_some() {
            return self.binary(received);
        }
        let content_type_header = if self.binding.content_type_header() {
            received.content_type_header_name()
        } else {
            None
        };
        let content_type = match (&received.content_type, &content_type_header) {
            (Some(value), _) => Some(WireValue::Text(value.clone())),
            (None, Some(name)) => received.headers.get(name).cloned(),
            (None, None) => None,
        };
        if let Some(WireValue::Text(content_type)) = &content_type {
            if essence(content_type).starts_with("application/cloudevents") {
                if essence(content_type) != STRUCTURED_JSON {
                    return Err(DecodeError::UnsupportedFormat {
                        content_type: content_type.clone(),
                    });
                }
                if let Some(name) = content_type_header {
                    received.headers.remove(&name);
                }
                return structured(received);
            }
        }
        if received.headers.contains_key(legacy::MESSAGE_ID) {
            return legacy_headers(received);
        }
        if received.native_id.is_some() {
            if self.native {
                return self.native(received);
            }
            return Err(DecodeError::NotAnEvent {
                specversion: self.binding.names().specversion,
                hint: "; it has a native message id, which this consumer reads only with \
                       native metadata turned on",
            });
        }
        Err(DecodeError::NotAnEvent {
            specversion: self.binding.names().specversion,
            hint: "",
        })
    }

    /// The name of the header holding `attribute` under any accepted prefix.
    fn attribute_header(&self, received: &Received, attribute: &str) -> Option<String> {
        received
            .headers
            .keys()
            .find(|name| {
                self.attribute_of(name)
                    .is_some_and(|a| a.eq_ignore_ascii_case(attribute))
            })
            .cloned()
    }

    /// The attribute a header carries (as spelled; attributes are compared in lower case),
    /// when its name has an accepted prefix.
    fn attribute_of<'n>(&self, name: &'n str) -> Option<&'n str> {
        self.binding.prefixes().iter().find_map(|prefix| {
            let head = name.get(..prefix.len())?;
            let attribute = name.get(prefix.len()..)?;
            (head.eq_ignore_ascii_case(prefix)
                && !attribute.is_empty()
                && attribute.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then_some(attribute)
        })
    }

    fn binary(&self, mut received: Received) -> Result<IncomingMessage, DecodeError> {
        // Take the attributes waybill knows out of the headers, by lower-case name.
        let mut attributes: BTreeMap<String, (String, WireValue)> = BTreeMap::new();
        let names: Vec<String> = received
            .headers
            .keys()
            .filter(|name| {
                self.attribute_of(name)
                    .is_some_and(|a| KNOWN.contains(&a.to_ascii_lowercase().as_str()))
            })
            .cloned()
            .collect();
        for name in names {
            if let Some(value) = received.headers.remove(&name) {
                let attribute = self
                    .attribute_of(&name)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                attributes.entry(attribute).or_insert((name, value));
            }
        }
        let mut text = |attribute: &str| self.take(&mut attributes, attribute);
        let required = |found: Option<(String, String)>, attribute: &str| {
            let (name, value) = found.ok_or_else(|| DecodeError::Missing {
                name: self.binding.header(attribute),
            })?;
            if value.is_empty() {
                return Err(DecodeError::Empty { name });
            }
            Ok((name, value))
        };
        let (name, version) = required(text("specversion")?, "specversion")?;
        if version != SPEC_VERSION {
            return Err(DecodeError::SpecVersion {
                name,
                value: version,
            });
        }
        let (id_name, raw_id) = required(text("id")?, "id")?;
        let id = parse_id(&id_name, &raw_id)?;
        let (_, source) = required(text("source")?, "source")?;
        let (_, message_type) = required(text("type")?, "type")?;
        for optional in ["dataschema", "subject"] {
            text(optional)?;
        }
        let sequence = text("sequence")?;
        let epoch = text(EPOCH_EXTENSION)?;
        let skipped = text(SKIPPED_EXTENSION)?.map(|(_, reason)| reason);
        // Only a message with an epoch is sequenced; a bare `sequence` is the informational
        // outbox position.
        let sequence = match (epoch, sequence) {
            (None, _) => None,
            (Some((_, epoch)), Some((name, value))) => {
                let number =
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| DecodeError::InvalidSequence {
                            id,
                            name: name.clone(),
                            value: value.clone(),
                        })?;
                let position = Sequenced::new(source, Stamp::new(number, epoch));
                Some(match skipped {
                    Some(reason) => position.skipped(reason),
                    None => position,
                })
            }
            (Some(_), None) => {
                return Err(DecodeError::InvalidSequence {
                    id,
                    name: self.binding.header("sequence"),
                    value: String::new(),
                })
            }
        };
        let partition_key = text("partitionkey")?.map(|(_, key)| key);
        let topic = text(TOPIC_EXTENSION)?.map(|(_, topic)| topic);
        let traceparent = text(TRACEPARENT)?;
        let tracestate = text(TRACESTATE)?;
        let datacontenttype = text("datacontenttype")?.map(|(_, value)| value);
        let time = attributes.remove("time");

        let sent_at = match time {
            Some((name, WireValue::Timestamp(seconds))) => timestamp(id, &name, seconds)?,
            Some((name, value)) => {
                let value = self.text(&name, value)?;
                rfc3339(id, name, value)?
            }
            None => match received.native_timestamp {
                Some(seconds) => timestamp(id, "timestamp property", seconds)?,
                None => Utc::now(),
            },
        };
        let content_type = match received.content_type.take() {
            Some(value) => value,
            None => {
                let header = if self.binding.content_type_header() {
                    received.content_type_header_name()
                } else {
                    None
                };
                match header.and_then(|name| received.headers.remove_entry(&name)) {
                    Some((name, value)) => self.plain_text(&name, value)?,
                    None => datacontenttype.unwrap_or_else(|| OCTET_STREAM.to_owned()),
                }
            }
        };
        let partition_key = match (partition_key, received.key.take()) {
            (Some(key), _) => key,
            (None, Some(key)) => String::from_utf8(key).map_err(|_| DecodeError::WrongType {
                name: "record key".into(),
                found: "bytes",
                expected: "a UTF-8 string",
            })?,
            (None, None) => String::new(),
        };
        let mut headers = pass_through(received.headers);
        for (header, found) in [(TRACEPARENT, traceparent), (TRACESTATE, tracestate)] {
            if let Some((_, value)) = found {
                headers.entry(header.to_owned()).or_insert(value);
            }
        }
        finish(IncomingMessage {
            id,
            topic: topic.or(received.topic).unwrap_or_default(),
            message_type,
            partition_key,
            content_type,
            payload: received.payload,
            headers,
            sent_at,
            sequence,
        })
    }

    /// Takes `attribute` out of `attributes` as text.
    fn take(
        &self,
        attributes: &mut BTreeMap<String, (String, WireValue)>,
        attribute: &str,
    ) -> Result<Option<(String, String)>, DecodeError> {
        let Some((name, value)) = attributes.remove(attribute) else {
            return Ok(None);
        };
        let text = self.text(&name, value)?;
        Ok(Some((name, text)))
    }

    /// A binary-mode attribute's text: a string, percent-decoded where the binding says so.
    fn text(&self, name: &str, value: WireValue) -> Result<String, DecodeError> {
        let text = self.plain_text(name, value)?;
        if !self.binding.percent_encoded() {
            return Ok(text);
        }
        match percent::unescape(&text) {
            Some(decoded) => Ok(decoded.into_owned()),
            None => Err(DecodeError::PercentEncoding {
                name: name.to_owned(),
                value: text,
            }),
        }
    }

    /// A header's text, not percent-decoded.
    fn plain_text(&self, name: &str, value: WireValue) -> Result<String, DecodeError> {
        string(name, value)
    }

    fn native(&self, mut received: Received) -> Result<IncomingMessage, DecodeError> {
        let name = match self.binding {
            Binding::Amqp => "message_id property",
            _ => "Nats-Msg-Id header",
        };
        let raw_id = match received.native_id.take() {
            Some(value) => string(name, value)?,
            None => {
                return Err(DecodeError::Missing { name: name.into() });
            }
        };
        let id = parse_id(name, &raw_id)?;
        let sent_at = match received.native_timestamp {
            Some(seconds) => timestamp(id, "timestamp property", seconds)?,
            None => Utc::now(),
        };
        let content_type = match received.content_type.take() {
            Some(value) => value,
            None => {
                let header = if self.binding.content_type_header() {
                    received.content_type_header_name()
                } else {
                    None
                };
                match header.and_then(|name| received.headers.remove_entry(&name)) {
                    Some((name, value)) => string(&name, value)?,
                    None => OCTET_STREAM.to_owned(),
                }
            }
        };
        let partition_key = match received.key.take() {
            Some(key) => String::from_utf8_lossy(&key).into_owned(),
            None => String::new(),
        };
        finish(IncomingMessage {
            id,
            topic: received.topic.unwrap_or_default(),
            message_type: received.native_type.unwrap_or_default(),
            partition_key,
            content_type,
            payload: received.payload,
            headers: pass_through(received.headers),
            sent_at,
            sequence: None,
        })
    }
}

/// A value that must be a string.
fn string(name: &str, value: WireValue) -> Result<String, DecodeError> {
    match value {
        WireValue::Text(text) => Ok(text),
        other => Err(DecodeError::WrongType {
            name: name.to_owned(),
            found: other.kind(),
            expected: "a string",
        }),
    }
}

fn parse_id(name: &str, raw: &str) -> Result<MessageId, DecodeError> {
    raw.trim().parse().map_err(|source| DecodeError::InvalidId {
        name: name.to_owned(),
        value: raw.to_owned(),
        source,
    })
}

fn rfc3339(id: MessageId, name: String, value: String) -> Result<DateTime<Utc>, DecodeError> {
    match DateTime::parse_from_rfc3339(value.trim()) {
        Ok(at) => Ok(at.with_timezone(&Utc)),
        Err(source) => Err(DecodeError::InvalidSentAt {
            id,
            name,
            value,
            source,
        }),
    }
}

/// An AMQP timestamp: seconds since the epoch (pika's and the RabbitMQ binding's form).
fn timestamp(id: MessageId, name: &str, seconds: u64) -> Result<DateTime<Utc>, DecodeError> {
    i64::try_from(seconds)
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .ok_or_else(|| DecodeError::TimestampOutOfRange {
            id,
            name: name.to_owned(),
            value: seconds,
        })
}

/// The sender's headers: text as it is, numbers in decimal; bytes, tables and arrays left out.
fn pass_through(headers: BTreeMap<String, WireValue>) -> Headers {
    headers
        .into_iter()
        .filter_map(|(name, value)| value.into_header().map(|value| (name, value)))
        .collect()
}

/// Checks a JSON payload is JSON.
fn finish(message: IncomingMessage) -> Result<IncomingMessage, DecodeError> {
    if is_json(&message.content_type) {
        let id = message.id;
        let text = std::str::from_utf8(&message.payload)
            .map_err(|source| DecodeError::PayloadNotUtf8 { id, source })?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|source| DecodeError::PayloadNotJson { id, source })?;
    }
    Ok(message)
}

/// Structured mode: the body is the event in the JSON format.
fn structured(received: Received) -> Result<IncomingMessage, DecodeError> {
    let mut event: Map<String, Value> = serde_json::from_slice(&received.payload)
        .map_err(|source| DecodeError::StructuredNotJson { source })?;
    let name = |member: &str| format!("{member} of the structured event");
    let mut text = |member: &str| -> Result<Option<String>, DecodeError> {
        match event.remove(member) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(DecodeError::WrongType {
                name: name(member),
                found: json_kind(&other),
                expected: "a string",
            }),
        }
    };
    let required = |found: Option<String>, member: &str| match found {
        None => Err(DecodeError::Missing { name: name(member) }),
        Some(value) if value.is_empty() => Err(DecodeError::Empty { name: name(member) }),
        Some(value) => Ok(value),
    };
    let version = required(text("specversion")?, "specversion")?;
    if version != SPEC_VERSION {
        return Err(DecodeError::SpecVersion {
            name: name("specversion"),
            value: version,
        });
    }
    let raw_id = required(text("id")?, "id")?;
    let id = parse_id(&name("id"), &raw_id)?;
    required(text("source")?, "source")?;
    let message_type = required(text("type")?, "type")?;
    let sent_at = match text("time")? {
        Some(value) => rfc3339(id, name("time"), value)?,
        None => Utc::now(),
    };
    let datacontenttype = text("datacontenttype")?;
    let partition_key = text("partitionkey")?.unwrap_or_default();
    let topic = text(TOPIC_EXTENSION)?;
    let traceparent = text(TRACEPARENT)?;
    let tracestate = text(TRACESTATE)?;
    let (content_type, payload) = match (event.remove("data_base64"), event.remove("data")) {
        (Some(Value::String(encoded)), _) => {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|source| DecodeError::InvalidBase64 { id, source })?;
            (
                datacontenttype.unwrap_or_else(|| OCTET_STREAM.to_owned()),
                payload,
            )
        }
        (Some(other), _) => {
            return Err(DecodeError::WrongType {
                name: name("data_base64"),
                found: json_kind(&other),
                expected: "a string",
            })
        }
        (None, Some(Value::String(text)))
            if datacontenttype.as_deref().is_some_and(|ct| !is_json(ct)) =>
        {
            (datacontenttype.unwrap_or_default(), text.into_bytes())
        }
        (None, Some(data)) => (
            datacontenttype.unwrap_or_else(|| "application/json".to_owned()),
            data.to_string().into_bytes(),
        ),
        (None, None) => (
            datacontenttype.unwrap_or_else(|| OCTET_STREAM.to_owned()),
            Vec::new(),
        ),
    };
    let mut headers = pass_through(received.headers);
    for (header, found) in [(TRACEPARENT, traceparent), (TRACESTATE, tracestate)] {
        if let Some(value) = found {
            headers.entry(header.to_owned()).or_insert(value);
        }
    }
    finish(IncomingMessage {
        id,
        topic: topic.or(received.topic).unwrap_or_default(),
        message_type,
        partition_key,
        content_type,
        payload,
        headers,
        sent_at,
        sequence: None,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The `waybill-*` headers of earlier versions.
fn legacy_headers(received: Received) -> Result<IncomingMessage, DecodeError> {
    let mut headers = received.headers;
    let mut take = |header: &'static str| -> Result<Option<String>, DecodeError> {
        headers
            .remove(header)
            .map(|value| string(header, value))
            .transpose()
    };
    let raw_id = take(legacy::MESSAGE_ID)?.ok_or(DecodeError::MissingId)?;
    let id = parse_id(legacy::MESSAGE_ID, &raw_id)?;
    let mut required =
        |header: &'static str| take(header)?.ok_or(DecodeError::MissingHeader { id, header });
    let topic = required(legacy::TOPIC)?;
    let message_type = required(legacy::MESSAGE_TYPE)?;
    let raw_sent_at = required(legacy::SENT_AT)?;
    let sent_at = rfc3339(id, legacy::SENT_AT.to_owned(), raw_sent_at)?;
    let partition_key = take(legacy::PARTITION_KEY)?.unwrap_or_default();
    let content_type = take(legacy::CONTENT_TYPE)?.unwrap_or_else(|| OCTET_STREAM.to_owned());
    finish(IncomingMessage {
        id,
        topic,
        message_type,
        partition_key,
        content_type,
        payload: received.payload,
        headers: pass_through(headers),
        sent_at,
        sequence: None,
    })
}
