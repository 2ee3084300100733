//! The wire form: CloudEvents 1.0 in binary content mode on every transport.
//!
//! The full specification, with one example message per broker, the decode order, the legacy
//! format and every error text, is `docs/wire.md` in the repository; this module implements
//! it. In short:
//!
//! - The payload is the message body, unchanged.
//! - The message's metadata are CloudEvents attributes in headers named for the [`Binding`]:
//!   `ce-id`, `ce-source`, `ce-type`, `ce-specversion` (`1.0`), `ce-time` (the enqueue time,
//!   RFC 3339), `ce-partitionkey` (the partition key, when not empty), `ce-sequence` (the
//!   outbox position, zero-padded; for a sequenced message its key's number, with
//!   `ce-waybillepoch` and, on a skip marker, `ce-waybillskipped`), `ce-waybilltopic` (the topic) and `ce-traceparent` /
//!   `ce-tracestate` (copied from the headers of those names). Kafka writes `ce_` instead of
//!   `ce-`; NATS and the memory transport percent-encode values as the HTTP binding does.
//! - `datacontenttype` is the `content-type` header (Kafka, NATS, memory) or the AMQP
//!   `content_type` property (RabbitMQ).
//! - The sender's headers travel unchanged next to them.
//!
//! [`Decoder::decode`] accepts, in this order: binary mode, structured mode
//! (`application/cloudevents+json`), the [`legacy`] `waybill-*` headers of earlier versions,
//! and, when the consumer is configured for it, the broker's native metadata. Decoding never
//! panics: anything a broker hands over either decodes or yields a typed [`DecodeError`].
//!
//! ```
//! use waybill_inbox_core::{wire, IncomingMessage};
//! use waybill_inbox_core::wire::{Binding, Decoder, Encoder, Received};
//! use waybill_outbox_core::{OutboxMessage, MessageId, Status};
//!
//! let mut stored = OutboxMessage::new(1, MessageId::new(), Status::Pending);
//! stored.topic = "orders".into();
//! stored.message_type = "OrderPlaced".into();
//! stored.content_type = "application/json".into();
//! stored.payload = br#"{"total":1999}"#.to_vec();
//!
//! let encoder = Encoder::new(Binding::Kafka).with_source("https://shop.example/orders");
//! let (headers, body) = encoder.encode(&stored);
//! assert_eq!(headers["ce_id"], stored.id.to_string());
//! assert_eq!(headers["ce_source"], "https://shop.example/orders");
//! assert_eq!(headers["content-type"], "application/json");
//!
//! let received = Decoder::new(Binding::Kafka).decode(Received::from_text(headers, body))?;
//! assert_eq!(received, IncomingMessage::from(&stored));
//! # Ok::<(), waybill_inbox_core::DecodeError>(())
//! ```

use std::borrow::Cow;

use chrono::SecondsFormat;
use waybill_outbox_core::{Headers, OutboxMessage};

mod decode;
mod percent;

pub use decode::{Decoder, Received, WireValue};

use crate::{DecodeError, IncomingMessage};

/// The `specversion` waybill writes and reads.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of a structured-mode CloudEvent in JSON.
pub const STRUCTURED_JSON: &str = "application/cloudevents+json";

/// The extension attribute that carries the topic. CloudEvents has no topic attribute, and a
/// destination (exchange, subject) need not name it; a decoder without it falls back to where
/// the message came from.
pub const TOPIC_EXTENSION: &str = "waybilltopic";

/// The extension attribute that carries a sequenced message's producer epoch. Its presence
/// makes `sequence` the per-key number of a sequenced message rather than the informational
/// outbox position.
pub const EPOCH_EXTENSION: &str = "waybillepoch";

/// The extension attribute that marks a skip marker of a sequenced key: the value is the
/// operator's reason.
pub const SKIPPED_EXTENSION: &str = "waybillskipped";

/// The header carrying `datacontenttype` in binary mode on Kafka, NATS and the memory
/// transport (RabbitMQ uses the `content_type` property).
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The legacy wire form of waybill before CloudEvents: reserved `waybill-*` headers. Still
/// decoded, so messages in flight during an upgrade are processed; never written.
pub mod legacy {
    /// The sender-assigned message id (a UUID). Required.
    pub const MESSAGE_ID: &str = "waybill-message-id";
    /// The message type, e.g. `OrderPlaced`. Required.
    pub const MESSAGE_TYPE: &str = "waybill-message-type";
    /// The partition key. Optional (empty when missing).
    pub const PARTITION_KEY: &str = "waybill-partition-key";
    /// The topic the sender enqueued to. Required.
    pub const TOPIC: &str = "waybill-topic";
    /// The payload's media type. Optional (`application/octet-stream` when missing).
    pub const CONTENT_TYPE: &str = "waybill-content-type";
    /// When the sender enqueued the message, RFC 3339. Required.
    pub const SENT_AT: &str = "waybill-sent-at";
    /// Every legacy header name.
    pub const RESERVED: [&str; 6] = [
        MESSAGE_ID,
        MESSAGE_TYPE,
        PARTITION_KEY,
        TOPIC,
        CONTENT_TYPE,
        SENT_AT,
    ];
}

/// Which CloudEvents protocol binding a transport follows: the header names and value
/// encoding of binary mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Binding {
    /// The in-process memory transport: the NATS form (`ce-` headers, percent-encoded,
    /// `content-type`).
    Memory,
    /// RabbitMQ, AMQP 0-9-1 (the RabbitMQ protocol binding of Knative eventing-rabbitmq):
    /// `ce-` entries in the headers table, values as they are; `datacontenttype` is the
    /// `content_type` property. Decoding also accepts the AMQP 1.0 binding's `cloudEvents_`
    /// and `cloudEvents:` prefixes.
    Amqp,
    /// NATS: `ce-` headers, values percent-encoded as the HTTP binding says,
    /// `content-type`; the publisher adds `Nats-Msg-Id` = `ce-id`.
    Nats,
    /// Kafka: `ce_` headers, values as they are (UTF-8), `content-type`; the record key is
    /// the partition key.
    Kafka,
}

/// Binary-mode header names of one binding, so encoding formats no names.
struct Names {
    specversion: &'static str,
    id: &'static str,
    source: &'static str,
    kind: &'static str,
    time: &'static str,
    partitionkey: &'static str,
    sequence: &'static str,
    topic: &'static str,
    epoch: &'static str,
    skipped: &'static str,
    traceparent: &'static str,
    tracestate: &'static str,
}

const DASH: Names = Names {
    specversion: "ce-specversion",
    id: "ce-id",
    source: "ce-source",
    kind: "ce-type",
    time: "ce-time",
    partitionkey: "ce-partitionkey",
    sequence: "ce-sequence",
    topic: "ce-waybilltopic",
    epoch: "ce-waybillepoch",
    skipped: "ce-waybillskipped",
    traceparent: "ce-traceparent",
    tracestate: "ce-tracestate",
};

const UNDERSCORE: Names = Names {
    specversion: "ce_specversion",
    id: "ce_id",
    source: "ce_source",
    kind: "ce_type",
    time: "ce_time",
    partitionkey: "ce_partitionkey",
    sequence: "ce_sequence",
    topic: "ce_waybilltopic",
    epoch: "ce_waybillepoch",
    skipped: "ce_waybillskipped",
    traceparent: "ce_traceparent",
    tracestate: "ce_tracestate",
};

impl Binding {
    /// The prefix of binary-mode attribute headers this binding writes: `ce_` for Kafka,
    /// `ce-` otherwise.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Kafka => "ce_",
            Self::Memory | Self::Amqp | Self::Nats => "ce-",
        }
    }

    /// The header prefixes this binding reads, compared without regard to case.
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Self::Kafka => &["ce_"],
            Self::Memory | Self::Nats => &["ce-"],
            Self::Amqp => &["ce-", "cloudevents_", "cloudevents:"],
        }
    }

    /// The header holding the CloudEvents `id`, e.g. `ce-id`: the message id.
    pub fn id_header(self) -> &'static str {
        self.names().id
    }

    /// The header of the attribute `attribute` (e.g. `type`), e.g. `ce-type`.
    pub fn header(self, attribute: &str) -> String {
        format!("{}{attribute}", self.prefix())
    }

    fn names(self) -> &'static Names {
        match self {
            Self::Kafka => &UNDERSCORE,
            Self::Memory | Self::Amqp | Self::Nats => &DASH,
        }
    }

    /// Whether attribute values are percent-encoded (the HTTP binding's rule).
    fn percent_encoded(self) -> bool {
        matches!(self, Self::Memory | Self::Nats)
    }

    /// Whether `datacontenttype` is the `content-type` header (else a transport property).
    fn content_type_header(self) -> bool {
        !matches!(self, Self::Amqp)
    }

    fn escape(self, value: &str) -> Cow<'_, str> {
        if self.percent_encoded() {
            percent::escape(value)
        } else {
            Cow::Borrowed(value)
        }
    }
}

/// Writes messages in one binding's binary mode with this producer's `source`.
///
/// ```
/// use waybill_inbox_core::wire::{Binding, Encoder};
/// use waybill_outbox_core::{MessageId, OutboxMessage, Status};
///
/// let mut m = OutboxMessage::new(7, MessageId::new(), Status::Pending);
/// m.topic = "orders".into();
/// m.message_type = "OrderPlaced".into();
/// m.partition_key = "order 42".into();
/// let (headers, _) = Encoder::new(Binding::Nats).encode(&m);
/// assert_eq!(headers["ce-source"], "urn:waybill:orders");
/// assert_eq!(headers["ce-partitionkey"], "order%2042");
/// assert_eq!(headers["ce-sequence"], "0000000000000000007");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoder {
    binding: Binding,
    source: Option<String>,
}

impl Encoder {
    /// An encoder for `binding` whose `source` is `urn:waybill:<topic>` of each message.
    pub fn new(binding: Binding) -> Self {
        Self {
            binding,
            source: None,
        }
    }

    /// Sets the CloudEvents `source`, a URI reference naming this producer (e.g.
    /// `https://shop.example/orders-service` or `/orders-service`); consumers treat `source`
    /// + `id` as unique. Defaults to `urn:waybill:<topic>` of each message.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The binding written.
    pub fn binding(&self) -> Binding {
        self.binding
    }

    /// The headers and body to publish for `message`.
    ///
    /// The sender's headers are kept; one with the name of a header written here is replaced
    /// (with a warning). The time is the enqueue time (`created_at`) in RFC 3339 with as many
    /// fractional digits as it has, so it decodes to the same instant.
    pub fn encode(&self, message: &OutboxMessage) -> (Headers, Vec<u8>) {
        let names = self.binding.names();
        let mut headers = message.headers.clone();
        // The reserved sequence headers travel as extension attributes, not as headers.
        for reserved in waybill_outbox_core::sequence::RESERVED_HEADERS {
            headers.remove(reserved);
        }
        let mut put = |name: &'static str, value: &str| {
            let value = self.binding.escape(value).into_owned();
            if headers.insert(name.to_owned(), value).is_some() {
                log::warn!(
                    "message {}: header {name} is written by waybill; replaced",
                    message.id
                );
            }
        };
        put(names.specversion, SPEC_VERSION);
        put(names.id, &message.id.to_string());
        match &self.source {
            Some(source) => put(names.source, source),
            None => put(names.source, &format!("urn:waybill:{}", message.topic)),
        }
        put(names.kind, &message.message_type);
        put(
            names.time,
            &message
                .created_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
        if !message.partition_key.is_empty() {
            put(names.partitionkey, &message.partition_key);
        }
        match message.stamp() {
            // A sequenced message: its key's number (zero-padded, the sequence extension
            // compares values as strings) and the producer epoch.
            Some(Ok(stamp)) => {
                put(names.sequence, &stamp.padded());
                put(names.epoch, &stamp.epoch);
                if let Some(reason) = message
                    .headers
                    .get(waybill_outbox_core::sequence::SKIPPED_HEADER)
                {
                    put(names.skipped, reason);
                }
            }
            Some(Err(value)) => log::error!(
                "message {}: stored sequence number {value:?} does not parse; sent without one",
                message.id
            ),
            None if message.seq > 0 => {
                put(names.sequence, &format!("{:019}", message.seq));
            }
            None => {}
        }
        put(names.topic, &message.topic);
        for (from, to) in [
            (TRACEPARENT, names.traceparent),
            (TRACESTATE, names.tracestate),
        ] {
            if let Some(value) = message.headers.get(from) {
                put(to, value);
            }
        }
        // The media type as it is: `content-type` is a plain header, not an attribute.
        if self.binding.content_type_header()
            && !message.content_type.is_empty()
            && headers
                .insert(CONTENT_TYPE_HEADER.to_owned(), message.content_type.clone())
                .is_some()
        {
            log::warn!(
                "message {}: header {CONTENT_TYPE_HEADER} is written by waybill; replaced",
                message.id
            );
        }
        (headers, message.payload.clone())
    }
}

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// [`Encoder::new`]`(`[`Binding::Memory`]`).encode(message)`: the memory transport's form.
pub fn encode(message: &OutboxMessage) -> (Headers, Vec<u8>) {
    Encoder::new(Binding::Memory).encode(message)
}

/// [`Decoder::new`]`(`[`Binding::Memory`]`)` of string headers and a body: the memory
/// transport's form.
///
/// # Errors
///
/// As [`Decoder::decode`].
pub fn decode(headers: Headers, payload: Vec<u8>) -> Result<IncomingMessage, DecodeError> {
    Decoder::new(Binding::Memory).decode(Received::from_text(headers, payload))
}

/// `application/json`, `application/json; charset=utf-8`, `application/cloudevents+json`, ...
fn is_json(content_type: &str) -> bool {
    let essence = essence(content_type);
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The media type without parameters, lower case.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
