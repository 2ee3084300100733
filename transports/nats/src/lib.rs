//! NATS JetStream transport for waybill: a [`NatsPublisher`] for the outbox relay, with
//! `Nats-Msg-Id` deduplication and pipelined publish acks, and a [`NatsConsumer`] that feeds a
//! durable pull consumer into a [`DeliveryHandler`](waybill_inbox_core::DeliveryHandler), such
//! as the diesel backend's inbox handler.
//!
//! The API is synchronous like the rest of waybill: each publisher and consumer drives the
//! async `async-nats` client on a private tokio runtime with one worker thread. The consumer's
//! handler runs on the caller's thread, outside that runtime.
//!
//! # Getting started
//!
//! ```no_run
//! use std::time::Duration;
//! use waybill_inbox_core::{Disposition, IncomingMessage};
//! use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig};
//!
//! # fn main() -> Result<(), waybill_nats::Error> {
//! let url = "nats://127.0.0.1:4222";
//! let publisher = NatsPublisher::connect(url, PublisherConfig::default())?;
//! publisher.ensure_stream("ORDERS", &["orders"])?;
//! // Hand `publisher` to `waybill_outbox_core::Relay::new(store, publisher, config)`.
//!
//! let mut consumer = NatsConsumer::connect(url, ConsumerConfig::new("ORDERS", "billing"))?;
//! let mut handler = |_msg: &IncomingMessage| Disposition::Ack;
//! let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
//! # let _ = report;
//! // Or consume until another thread calls `stop.stop()`:
//! let stop = waybill_nats::StopHandle::new();
//! # stop.stop();
//! consumer.run(&mut handler, &stop)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Securing the connection
//!
//! [`ConnectOptions`] (set with [`PublisherConfig::connect_options`] and
//! [`ConsumerConfig::connect_options`]) adds what production servers ask for: a credentials
//! file, an nkey seed file, a token (or token file), a user and password (or password file),
//! a private CA, a client certificate, and TLS required. Secrets never appear in `Debug`
//! output, errors or logs; a failed connection says why in [`ConnectFailure`] (credentials
//! refused, TLS failed, unreachable), and only an unreachable server is retryable.
//!
//! ```no_run
//! use waybill_nats::{ConnectOptions, NatsPublisher, PublisherConfig};
//!
//! let options = ConnectOptions::default()
//!     .credentials_file("/run/secrets/relay.creds")
//!     .root_certificates("/etc/waybill/nats-ca.pem");
//! let publisher = NatsPublisher::connect(
//!     "tls://nats.internal:4222",
//!     PublisherConfig::default().connect_options(options),
//! )?;
//! # let _ = publisher;
//! # Ok::<(), waybill_nats::Error>(())
//! ```
//!
//! # Mapping
//!
//! The wire form is CloudEvents 1.0 binary content mode ([`wire`](waybill_inbox_core::wire),
//! specified in `docs/wire.md`); attribute values are percent-encoded as the HTTP binding says.
//!
//! | outbox message | NATS |
//! |---|---|
//! | `payload` | the message body, unchanged |
//! | `id` | header `ce-id` and header `Nats-Msg-Id` |
//! | `message_type` | header `ce-type` |
//! | `created_at` | header `ce-time` (RFC 3339) |
//! | `content_type` | header `content-type` |
//! | `partition_key` | header `ce-partitionkey` (when not empty) |
//! | `seq` | header `ce-sequence` (zero-padded) |
//! | `topic` | header `ce-waybilltopic` |
//! | [`PublisherConfig::source`] | header `ce-source` (default `urn:waybill:<topic>`) |
//! | - | header `ce-specversion: 1.0` |
//! | `headers` | headers of the same name |
//! | `topic` (+ `partition_key`) | the subject, by [`SubjectMapping`]: the topic by default, or `<topic>.<sanitized key>` |
//!
//! The consumer also reads structured-mode CloudEvents (`content-type:
//! application/cloudevents+json`), waybill's legacy `waybill-*` headers, and, with
//! [`ConsumerConfig::native_metadata`], plain messages identified by `Nats-Msg-Id` alone.
//!
//! The consumer removes JetStream's own `Nats-*` headers before decoding, so a sender header
//! whose name starts with `Nats-` is passed to JetStream (e.g. `Nats-TTL`) but does not reach
//! the handler.
//!
//! # Deduplication
//!
//! The relay publishes at least once: a crash between the broker's ack and the outbox write,
//! or a lost ack, publishes a message again. JetStream stores a message whose `Nats-Msg-Id` it
//! has seen within the stream's *duplicate window* only once, acks the retry with
//! `duplicate = true`, and the publisher reports that as success. Give the stream a window
//! ([`PublisherConfig::duplicate_window`], default 2 minutes) longer than the relay's lease plus
//! its longest backoff. A retry after the window is stored again; the consumer's inbox then
//! drops it, so the effect still happens once.
//!
//! # Unroutable and oversized messages
//!
//! A message whose subject no stream captures (JetStream answers "no responders") is
//! unroutable: by default retryable ([`Unroutable::Retry`]), so the relay retries it with backoff
//! and delivers it once a stream captures the subject, and parks it after its max attempts if
//! none ever does; [`PublisherConfig::unroutable`] with [`Unroutable::Park`] parks it at once.
//! Either way the publisher logs one warning per subject and batch.
//!
//! A message larger than the server's `max_payload` (1 MiB by default, headers included) is
//! refused before it is sent, as fatal, naming both sizes. The outbox accepts 4 MiB by default;
//! [`Publisher::limits`](waybill_outbox_core::Publisher::limits) reports the server's limit so
//! that `Limits::default().capped_by(publisher.limits())` refuses such a message at enqueue
//! time, in the writer's transaction, instead.
//!
//! # Ordering
//!
//! A partition key has at most one message awaiting its ack: its next message is sent once
//! that ack has arrived, so JetStream stores each key's messages in outbox order, and a failure
//! (a refusal, an ack timeout, a lost connection after which the client resends what it had
//! buffered) can never leave a later message of the key stored ahead of an earlier one. After
//! a failure the rest of the key is not sent (`NotAttempted`), as the relay's per-key rule
//! requires. The keys of a batch travel pipelined, up to [`PublisherConfig::max_in_flight`]
//! messages awaiting their ack, each key moving on as soon as its own ack arrives: a batch of
//! many keys publishes about ten times faster than awaiting each message, while a batch of one
//! key publishes one message per round trip.
//!
//! # Redelivery and dead letters
//!
//! The consumer runs on the core's [`ConsumerLoop`](waybill_inbox_core::ConsumerLoop), like
//! every transport's. It acks a delivery only after the handler returned `Ack` (the inbox
//! handler returns it after its transaction committed). `Retry(reason)` or a panicking handler
//! -> the handler is called again for the same delivery after a short backoff, before the next
//! message, so a key's later message never overtakes it (a `nak` would let it). After
//! [`ConsumerConfig::max_deliveries`] handler calls (earlier server deliveries that reached a
//! handler included) a failing message is published to the dead-letter subject with a
//! [`DEAD_LETTER_REASON`] header and then `term`ed, so the final failure is recorded and never
//! silently dropped. `DeadLetter(reason)` and data that does not decode (no id, an id that is
//! not a UUID, a JSON content type with a body that is not JSON) are dead-lettered at once.
//! [`ConsumeReport::dead_lettered`] counts exactly the dead letters the stream stored,
//! malformed ones included.
//!
//! A dead letter that cannot be published (the dead-letter stream is missing) fails the step:
//! the message is `nak`ed, and so are the messages pulled behind it, in order. The durable
//! consumer's `max_deliver` is unlimited, so the server never drops it; it comes back first and
//! is dead-lettered exactly once when the stream exists again. Until then the consumer makes
//! no progress past it ([`NatsConsumer::run`] retries with a growing pause): a message is
//! never lost for want of a place to put it.
//!
//! # Consumer ordering and the ack wait
//!
//! JetStream delivers a durable consumer's messages in stream order, and a `nak` without delay
//! puts the message on the consumer's redelivery queue, which is served before any message not
//! yet delivered (a `nak` with a delay is not: later messages flow meanwhile, which is why the
//! consumer never delays one). Within one consumer process the keys therefore stay in order
//! through retries, failed dead letters and stops. Several processes sharing a durable consumer
//! each get their own messages; a key's order across them holds only with
//! [`ConsumerConfig::max_ack_pending`] of 1.
//!
//! A pull asks for no more messages than the step still handles, expires after at most half
//! the ack wait, and the messages it brought are renewed (`+WPI`) while they wait behind a slow
//! one: a message is neither redelivered into the pull that brought it nor handed to another
//! consumer while this one still holds it, as long as one handler run (in-place retries
//! included) stays under three quarters of [`ConsumerConfig::ack_wait`]. The server counts a
//! delivery for every message pulled; a message handed back because its step failed before a
//! handler saw it is not charged for that delivery by the consumer that pulled it (another
//! process sharing the durable consumer cannot know, and counts it).
//!
//! The dead-letter subject defaults to `waybill.dead.<stream>`, stored in a stream
//! `<stream>_dead` the consumer creates on connect (see [`ConsumerConfig::dead_letter_stream`]).
//! A dead letter keeps the original headers and body and adds [`DEAD_LETTER_REASON`],
//! [`DEAD_LETTER_STREAM`], [`DEAD_LETTER_SUBJECT`], [`DEAD_LETTER_SEQUENCE`] and
//! [`DEAD_LETTER_DELIVERIES`]; its `Nats-Msg-Id` is `dead:<stream>:<sequence>`, so dead-lettering
//! the same delivery twice stores it once.

mod consumer;
mod error;
mod options;
mod publisher;
mod subject;

pub use consumer::{
    ConsumeReport, ConsumerConfig, NatsConsumer, DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON,
    DEAD_LETTER_SEQUENCE, DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECT,
};
pub use error::{ConnectFailure, Error, Result};
pub use options::ConnectOptions;
pub use publisher::{NatsPublisher, PublisherConfig, MSG_ID_HEADER};
pub use subject::{sanitize_token, SubjectFn, SubjectMapping};
/// Stops [`NatsConsumer::run`] (and a relay) from another thread.
pub use waybill_outbox_core::StopHandle;

/// The NATS client this transport is built on, for its types in this crate's API (the sources
/// of [`Error`]'s variants) at the exact version the transport uses.
pub use async_nats;
/// What the publisher reports for an unroutable message ([`PublisherConfig::unroutable`]).
pub use waybill_outbox_core::Unroutable;

/// The private runtime a publisher or consumer drives its client on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("waybill-nats")
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

async fn connect(url: &str, options: &ConnectOptions) -> Result<async_nats::Client> {
    ensure_crypto_provider();
    options
        .client_options(url)
        .await?
        .connect(url)
        .await
        .map_err(|source| Error::Connect {
            url: waybill_outbox_core::redact_url(url),
            cause: ConnectFailure::of(&source),
            source,
        })
}

/// Installs rustls's `ring` provider (the one async-nats is built with) as the process default
/// when no default is installed yet. rustls picks a default by itself only when exactly one
/// provider is compiled in; a program that also links lapin (which brings `aws-lc-rs`) has two,
/// and its first TLS connection would panic. A provider the program installed is kept.
fn ensure_crypto_provider() {
    use async_nats::rustls::crypto::{ring, CryptoProvider};
    if CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile, which is as good.
        let _ = ring::default_provider().install_default();
    }
}
