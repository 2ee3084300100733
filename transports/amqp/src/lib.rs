//! RabbitMQ (AMQP 0-9-1) transport for waybill: a confirmed publisher for the relay and an
//! inbox consumer loop.
//!
//! - [`AmqpPublisher`] implements [`waybill_outbox_core::Publisher`]: the relay hands it a
//!   batch of outbox messages and gets one outcome per message, after the broker confirmed.
//! - [`AmqpConsumer`] consumes a queue and hands each decoded delivery to a
//!   [`waybill_inbox_core::DeliveryHandler`] (e.g. waybill-diesel's `InboxHandler`), and
//!   acknowledges only after the handler returned [`Disposition::Ack`], i.e. after the
//!   handler's transaction committed.
//!
//! Both are synchronous, like the rest of waybill: each owns a small private tokio runtime
//! that runs lapin, and nothing async shows in the API. Being blocking, they belong on plain
//! threads (like the relay's); calling them from inside an async runtime panics, as every
//! nested `block_on` does: use `spawn_blocking` there.
//!
//! # Getting started
//!
//! ```no_run
//! use std::time::Duration;
//! use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig};
//! use waybill_inbox_core::{Disposition, IncomingMessage};
//!
//! let addr = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! // The relay side: give this to `waybill_outbox_core::Relay::new(store, publisher, ..)`.
//! let publisher = AmqpPublisher::connect(addr, PublisherConfig::default())?;
//! // The consuming side: a queue bound to the `orders` topic's exchange, every key.
//! let mut consumer = AmqpConsumer::connect(addr, ConsumerConfig::new("billing.orders").bind("orders", "#"))?;
//! let mut handler = |_: &IncomingMessage| Disposition::Ack;
//! let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
//! # let _ = (publisher, report);
//! # Ok::<(), waybill_amqp::Error>(())
//! ```
//!
//! # How an outbox message maps to AMQP
//!
//! | outbox message | AMQP |
//! |---|---|
//! | `topic`, `partition_key` | exchange = topic, routing key = partition key ([`Routing::ExchangePerTopic`], the default), or a fixed exchange with routing key = topic ([`Routing::Exchange`]) |
//! | `id` | header `ce-id`, and the `message_id` property |
//! | `message_type` | header `ce-type`, and the `type` property |
//! | `content_type` | the `content_type` property (the binding's `datacontenttype`) |
//! | `created_at` | header `ce-time` (RFC 3339, full precision), and the `timestamp` property (seconds) |
//! | `partition_key` | header `ce-partitionkey` (when not empty) |
//! | `seq` | header `ce-sequence` (zero-padded) |
//! | `topic` | header `ce-waybilltopic` |
//! | [`PublisherConfig::source`] | header `ce-source` (default `urn:waybill:<topic>`) |
//! | - | header `ce-specversion: 1.0` |
//! | `headers` | headers (long strings) of the same name |
//! | `payload` | the body, unchanged |
//! | - | `delivery_mode` 2 (persistent); `mandatory` set (configurable) |
//!
//! This is CloudEvents 1.0 binary content mode in the RabbitMQ protocol binding (Knative
//! eventing-rabbitmq's, which the Python `cloudevents` SDK implements as
//! `cloudevents.core.bindings.rabbitmq`); [`waybill_inbox_core::wire`] implements it and
//! `docs/wire.md` specifies it. The consumer also reads the AMQP 1.0 binding's
//! `cloudEvents_*` / `cloudEvents:*` names, structured mode (`content_type`
//! `application/cloudevents+json`), waybill's legacy `waybill-*` headers, and, with
//! [`ConsumerConfig::native_metadata`], plain messages carrying only AMQP properties. A header
//! of the wrong AMQP type (a byte array where a string belongs) is dead-lettered with a reason
//! that says so.

//! # Confirms, outcomes and the ordering caveat
//!
//! The publisher sends a whole batch pipelined, then awaits every confirm: one round trip per
//! batch instead of one per message (about ten times the throughput on loopback). Outcomes:
//!
//! - ack -> published;
//! - nack -> retryable (the relay counts an attempt);
//! - no confirm within [`PublisherConfig::confirm_timeout`] -> the broker is unavailable;
//! - unroutable: returned with 312 NO_ROUTE (a `mandatory` message no queue took; RabbitMQ
//!   then still acks it), or its exchange does not exist (404 NOT_FOUND) -> as
//!   [`PublisherConfig::unroutable`] says. By default **retryable** ([`Unroutable::Retry`]):
//!   queues are often declared by their consumers, which may start after the relay, so the
//!   relay retries with backoff and delivers the message once a queue is bound; one that stays
//!   unroutable is parked after the relay's max attempts, with the reason. With
//!   [`Unroutable::Park`] it is parked at once. Either way one warning per exchange and batch
//!   says that no queue is bound, for which routing keys;
//! - properties and headers too large for one frame (the negotiated
//!   [`frame_max`](AmqpPublisher::frame_max)), or a name longer than 255 bytes -> **fatal**,
//!   found before anything is sent. [`Publisher::limits`](waybill_outbox_core::Publisher::limits)
//!   reports the limit, so `Limits::capped_by` can refuse such messages at enqueue time;
//! - the broker closes the channel over one message (its exchange was deleted since the
//!   publisher declared it, or it is larger than the broker's `max_message_size`) -> only that
//!   message is charged: the publisher opens a fresh channel, sends the rest of the batch one
//!   message at a time to find it, and reports everything else as usual. A message whose
//!   confirm the closed channel lost may be delivered twice (at least once, never lost);
//! - connecting fails, the connection is lost, or no confirm comes in time ->
//!   [`PublishError::Unavailable`](waybill_outbox_core::PublishError::Unavailable) for the
//!   message at hand and
//!   [`PublishError::NotAttempted`](waybill_outbox_core::PublishError::NotAttempted) for the
//!   later messages of the same key that were not sent yet: the relay charges no attempt and
//!   pauses, so an outage of any length parks nothing. The next `publish` reconnects.
//!
//! Per-key order holds whenever a batch publishes cleanly, and when the connection fails
//! (later messages of the key are not sent). It can break in one place that pipelining
//! cannot avoid: the broker may nack (or return) one message while it acks a later message of
//! the same key that was already sent in the same batch. The later one is then delivered first
//! and the earlier one after its retry. RabbitMQ nacks only on internal errors (e.g. a queue
//! process crash), so this is rare; consumers that need strict order per key should check a
//! per-key sequence. Retries on the consumer side keep the order (see below).
//!
//! # Retries, dead letters and hand-backs
//!
//! [`AmqpConsumer`] runs the shared [`ConsumerLoop`](waybill_inbox_core::ConsumerLoop) of every
//! waybill transport over its queue. It declares the queue durable with
//! `x-dead-letter-exchange` pointing to a fanout dead-letter exchange, plus a dead-letter queue
//! bound to it (both named `<queue>.dead` unless configured), so even messages the broker
//! dead-letters by itself (e.g. a TTL) are kept.
//!
//! - [`Disposition::Ack`] -> `basic.ack`.
//! - [`Disposition::Retry`] or a panicking handler -> the handler is called again for the same
//!   delivery after a short backoff, before the consumer takes the next one, so a key's later
//!   message never overtakes it (a copy re-published to the queue's tail would). After
//!   [`ConsumerConfig::max_deliveries`] handler calls (5 by default) the message is
//!   dead-lettered. A message the broker delivers again after a lost connection gets the
//!   whole budget again on a classic queue, which keeps no delivery count; on a quorum queue
//!   its [`DELIVERY_COUNT_HEADER`] counts against the budget (the handler always gets at least
//!   one call).
//! - [`Disposition::DeadLetter`] and deliveries that do not decode (no message id, an id that
//!   is not a UUID, a missing header, a payload that is not the JSON its content type
//!   promises) -> a copy with [`DEAD_LETTER_REASON`] (the header name every transport uses,
//!   plus the older [`DEAD_LETTER_REASON_HEADER`]) is published (confirmed, `mandatory`) to
//!   the dead-letter exchange, then the original is acknowledged. A `basic.reject` would keep
//!   the original headers only and lose the reason.
//! - A dead letter the broker does not store (the dead-letter exchange is missing, no queue is
//!   bound to it) -> the original is handed back with `basic.nack` + requeue (RabbitMQ puts it
//!   back in its place), the step fails with a retryable error ([`Error::DeadLetter`],
//!   [`Error::Refused`]) and the connection is reopened. [`AmqpConsumer::run`] goes on: the
//!   message waits, ahead of its key's later messages, until the exchange is back, and is then
//!   dead-lettered once. `dead_lettered` in the report counts only stored dead letters.
//!
//! Copy first, acknowledge second: a crash in between leaves a duplicate (the inbox skips it),
//! never a loss.
//!
//! # Topology someone else owns
//!
//! By default the consumer declares what it consumes, and a queue or exchange that exists with
//! other arguments (a queue with `x-max-length`, another team's fanout exchange) fails the
//! connect with [`Error::Topology`] (`PRECONDITION_FAILED`). [`ConsumerConfig::passive`] uses
//! the queue, the bound exchanges and the dead-letter exchange as they are (passive declares
//! only check that they exist) and only makes the bindings;
//! [`ConsumerConfig::declare_exchanges`]`(None)` does that for the bound exchanges alone.
//!
//! A connect checks everything before it creates anything, and deletes what it created when a
//! later step fails, so a failed connect leaves no half topology behind (see
//! [`AmqpConsumer::connect`]).
//!
//! # Connection loss
//!
//! The publisher reports the broker unavailable and reconnects (channel, confirm mode) on the
//! next `publish`. [`AmqpConsumer::run_once`] returns the error and reconnects on the next
//! call; [`AmqpConsumer::run`] does that by itself with a capped backoff until its
//! [`StopHandle`] is stopped. Unacknowledged
//! deliveries return to the queue when a connection closes. Passwords are redacted from every
//! address this crate logs ([`redact`]).
//!
//! [`Disposition::Ack`]: waybill_inbox_core::Disposition::Ack
//! [`Disposition::Retry`]: waybill_inbox_core::Disposition::Retry
//! [`Disposition::DeadLetter`]: waybill_inbox_core::Disposition::DeadLetter

mod consumer;
mod error;
mod fields;
mod link;
mod publisher;
mod tls;
mod topology;

pub use consumer::{
    AmqpConsumer, ConsumeReport, ConsumerConfig, DEAD_LETTER_REASON, DEAD_LETTER_REASON_HEADER,
    DELIVERY_COUNT_HEADER, ORIGINAL_QUEUE_HEADER,
};
pub use error::{redact, Error, Result};
/// The lapin types the configurations take: exchange kinds for
/// [`ConsumerConfig::declare_exchanges`] and [`PublisherConfig::declare_exchanges`], field
/// tables and values for [`ConsumerConfig::queue_arguments`].
pub use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
pub use lapin::ExchangeKind;
pub use publisher::{AmqpPublisher, PublisherConfig, Routing};
pub use tls::TlsOptions;

/// The AMQP client this transport is built on, for its types in this crate's API
/// ([`Error::Amqp`] wraps a `lapin::Error`) at the exact version the transport uses.
pub use lapin;
/// Stops [`AmqpConsumer::run`] (and a relay) from another thread.
pub use waybill_outbox_core::StopHandle;
/// What the publisher reports for an unroutable message ([`PublisherConfig::unroutable`]).
pub use waybill_outbox_core::Unroutable;
