//! [`NatsPublisher`]: the outbox relay's [`Publisher`] for NATS JetStream.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Runtime;
use waybill_inbox_core::wire::{Binding, Encoder};
use waybill_outbox_core::{
    error_chain, redact_url, BrokerLimits, MessageId, OutboxMessage, PublishError, Publisher,
    Unroutable,
};

use crate::error::{publish_error_is_fatal, publish_error_is_unavailable};
use crate::subject::invalid_publish_subject;
use crate::{ConnectOptions, Error, Result, SubjectMapping};

/// The JetStream header that carries the message id JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// What this transport adds to every message beyond the bytes [`BrokerLimits`] counts: the
/// header block's first and last lines, the reserved `waybill-*` headers' names, the message id
/// and send time, and `Nats-Msg-Id`. About 270 bytes; rounded up.
const MESSAGE_RESERVE: usize = 512;

/// How a [`NatsPublisher`] publishes. `Default` gives the documented defaults.
///
/// ```
/// use std::time::Duration;
/// use waybill_nats::{PublisherConfig, SubjectMapping};
///
/// let config = PublisherConfig::default()
///     .ack_timeout(Duration::from_secs(2))
///     .subject_mapping(SubjectMapping::TopicAndKey)
///     .duplicate_window(Duration::from_secs(600));
/// # let _ = config;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublisherConfig {
    ack_timeout: Duration,
    subject_mapping: SubjectMapping,
    max_in_flight: usize,
    duplicate_window: Duration,
    unroutable: Unroutable,
    source: Option<String>,
    connect_options: ConnectOptions,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            subject_mapping: SubjectMapping::Topic,
            max_in_flight: 1024,
            duplicate_window: Duration::from_secs(120),
            unroutable: Unroutable::Retry,
            source: None,
            connect_options: ConnectOptions::default(),
        }
    }
}

impl PublisherConfig {
    /// How long to wait for JetStream's ack of each message (and for the client to take the
    /// message) before reporting it as retryable. Defaults to 5 seconds.
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How a message's topic and partition key become its subject. Defaults to
    /// [`SubjectMapping::Topic`] (the subject is the topic).
    #[must_use]
    pub fn subject_mapping(mut self, mapping: SubjectMapping) -> Self {
        self.subject_mapping = mapping;
        self
    }

    /// How many messages may await their ack at once. Each partition key has at most one
    /// message awaiting its ack, its next message sent once that ack arrives, and the keys of a
    /// batch are pipelined up to this many: per-key order survives lost acks and reconnects,
    /// and a batch of many keys still travels pipelined. Defaults to 1024. Values below 1 count
    /// as 1.
    #[must_use]
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// The duplicate window [`NatsPublisher::ensure_stream`] gives a stream it creates:
    /// JetStream drops a message whose `Nats-Msg-Id` it stored within this window. Defaults to
    /// 2 minutes (the server's default). Make it longer than the relay's lease plus its longest
    /// backoff, so that a relay retry of an already stored message is always dropped.
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// What to report for a message no stream captures (JetStream's "no responders": no stream
    /// listens on its subject). Defaults to [`Unroutable::Retry`]: retryable, so the relay
    /// retries it with backoff and delivers it once a stream captures the subject, and parks it
    /// after its max attempts if none ever does. [`Unroutable::Park`] reports it fatal: parked
    /// at once. Either way the publisher logs one warning per subject and batch.
    #[must_use]
    pub fn unroutable(mut self, unroutable: Unroutable) -> Self {
        self.unroutable = unroutable;
        self
    }

    /// The CloudEvents `source` written on every message (`ce-source`): a URI reference
    /// naming this producer, e.g. `https://shop.example/orders-service`; consumers treat
    /// `source` + `id` as unique. Defaults to `urn:waybill:<topic>` of each message.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The encoder of the wire form with this configuration's source.
    fn encoder(&self) -> Encoder {
        let encoder = Encoder::new(Binding::Nats);
        match &self.source {
            Some(source) => encoder.with_source(source.as_str()),
            None => encoder,
        }
    }

    /// How the publisher authenticates and secures its connection (credentials, TLS).
    /// Defaults to [`ConnectOptions::default`]: only what the URL carries, TLS when the URL
    /// says `tls://` or the server requires it.
    #[must_use]
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect_options = options;
        self
    }
}

/// Publishes outbox messages to NATS JetStream, for [`waybill_outbox_core::Relay`].
///
/// Each message goes to the subject its [`SubjectMapping`] gives, with the
/// [`wire`](waybill_inbox_core::wire) headers (CloudEvents binary mode: `ce-id`, `ce-source`,
/// `ce-type`, ..., percent-encoded) and `Nats-Msg-Id` = the message id (`ce-id`), so JetStream's
/// duplicate window drops a relay retry of a message it already stored. A batch is pipelined
/// across its partition keys, one message of a key awaiting its ack at a time (see the crate
/// docs on ordering). The API is synchronous: the publisher drives the async client on a
/// private runtime with one worker thread, which also keeps the connection alive (and
/// reconnects it) between batches. Do not call it from inside an async runtime.
///
/// ```no_run
/// use waybill_nats::{NatsPublisher, PublisherConfig};
/// use waybill_outbox_core::{MessageId, OutboxMessage, Publisher, Status};
///
/// let mut publisher = NatsPublisher::connect("nats://127.0.0.1:4222", PublisherConfig::default())?;
/// publisher.ensure_stream("ORDERS", &["orders", "orders.>"])?;
/// let mut msg = OutboxMessage::new(1, MessageId::new(), Status::Pending);
/// msg.topic = "orders".into();
/// msg.message_type = "OrderPlaced".into();
/// assert!(publisher.publish(&[msg]).iter().all(Result::is_ok));
/// # Ok::<(), waybill_nats::Error>(())
/// ```
pub struct NatsPublisher {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: PublisherConfig,
    url: String,
    // Last: dropped after the client, whose tasks it runs.
    runtime: Runtime,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("url", &self.url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Connects to the server(s) at `url` (comma-separated for several). The client then
    /// reconnects by itself, forever, whenever the connection is lost.
    ///
    /// # Errors
    ///
    /// [`Error::Runtime`] when the private runtime cannot start, [`Error::ReadFile`] or
    /// [`Error::InvalidSecretFile`] for a file of the [`ConnectOptions`], [`Error::Connect`]
    /// when the server cannot be reached or refuses the connection (its
    /// [`ConnectFailure`](crate::ConnectFailure) says why: credentials refused, TLS failed,
    /// unreachable).
    pub fn connect(url: &str, config: PublisherConfig) -> Result<Self> {
        let runtime = crate::runtime()?;
        let client = runtime.block_on(crate::connect(url, &config.connect_options))?;
        // The context spawns its ack task on the runtime.
        let jetstream = {
            let _runtime = runtime.enter();
            jetstream::ContextBuilder::new()
                .timeout(config.ack_timeout)
                .max_ack_inflight(config.max_in_flight)
                // A send beyond the limit waits for an ack instead of failing.
                .backpressure_on_inflight(true)
                .build(client.clone())
        };
        log::debug!("NATS publisher connected to {}", redact_url(url));
        Ok(Self {
            client,
            jetstream,
            config,
            url: redact_url(url),
            runtime,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    /// Creates the stream `name` capturing `subjects`, with the configured
    /// [duplicate window](PublisherConfig::duplicate_window), unless a stream of that name
    /// exists (which is then left as it is). A convenience for tests and small setups;
    /// production streams are usually managed by the operator.
    ///
    /// # Errors
    ///
    /// [`Error::CreateStream`], e.g. when another stream already captures one of `subjects`.
    pub fn ensure_stream(&self, name: &str, subjects: &[&str]) -> Result<()> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        };
        self.runtime
            .block_on(self.jetstream.get_or_create_stream(config))
            .map_err(|source| Error::CreateStream {
                stream: name.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// The largest message the server takes, headers and payload together, in bytes: its
    /// `max_payload` (1 MiB by default), from the `INFO` it sent when the client connected.
    pub fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => self.client.max_payload(),
            max => max,
        }
    }

    /// `true` while the client is connected to a server.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Drops the connection and lets the client reconnect, as a broker restart would. For
    /// tests and for rebalancing; it does not wait for the new connection.
    ///
    /// # Errors
    ///
    /// [`Error::Reconnect`] when the client is closed.
    pub fn force_reconnect(&self) -> Result<()> {
        self.runtime
            .block_on(self.client.force_reconnect())
            .map_err(Error::Reconnect)
    }

    /// Publishes `batch` (see [`Publisher::publish`]). The messages are encoded on the
    /// caller's thread and moved (not copied) to one task on the runtime's worker, the thread
    /// that also drives the connection, which sends them and awaits their acks, so that no
    /// send and no ack crosses threads.
    fn publish_batch(&self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        if self.client.connection_state() == State::Disconnected {
            // Fail fast instead of waiting out the ack timeout; the client is reconnecting.
            log::warn!(
                "NATS at {} unreachable: {} messages not published",
                self.url,
                batch.len()
            );
            return none_published(
                batch,
                PublishError::Unavailable("not connected to NATS".into()),
            );
        }
        // Each message's successor in its key, and the keys' first messages.
        let mut last_of_key: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let mut next_in_key: Vec<Option<usize>> = vec![None; batch.len()];
        let mut firsts = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            match last_of_key.insert(msg.partition_key.as_str(), i) {
                Some(previous) => next_in_key[previous] = Some(i),
                None => firsts.push(i),
            }
        }
        let (encoder, max_payload) = (self.config.encoder(), self.max_payload());
        let outgoing = batch
            .iter()
            .map(|msg| prepare(&self.config.subject_mapping, &encoder, max_payload, msg))
            .collect();
        let task = self.runtime.spawn(send_per_key(
            self.jetstream.clone(),
            self.config.max_in_flight,
            outgoing,
            next_in_key,
            firsts,
        ));
        let (mut outcomes, unroutable) = match self.runtime.block_on(task) {
            Ok(sent) => (sent.outcomes, sent.unroutable),
            // The task panicked or the runtime is shutting down: nothing is known to be stored,
            // so everything is retried (JetStream drops what it already has).
            Err(error) => (
                none_published(
                    batch,
                    PublishError::Retryable(format!("the publishing task ended: {error}")),
                ),
                Vec::new(),
            ),
        };
        let mut unroutable_subjects = BTreeMap::new();
        for (i, error) in &unroutable {
            let subject = self
                .config
                .subject_mapping
                .subject(&batch[*i].topic, &batch[*i].partition_key);
            let reason = format!("no stream captures subject {subject:?} ({error})");
            *unroutable_subjects.entry(subject).or_insert(0) += 1;
            outcomes[*i] = Err(self.config.unroutable.error(reason));
        }
        self.warn_unroutable(&unroutable_subjects);
        let unroutable: HashSet<usize> = unroutable.into_iter().map(|(i, _)| i).collect();
        // Unroutable messages had their warning; the others get one.
        let failed: Vec<_> = outcomes
            .iter()
            .zip(batch)
            .enumerate()
            .filter(|(i, _)| !unroutable.contains(i))
            .filter_map(|(_, (outcome, msg))| match outcome {
                Err(
                    error @ (PublishError::Retryable(_)
                    | PublishError::Unavailable(_)
                    | PublishError::Fatal(_)),
                ) => Some((msg.id, error)),
                _ => None,
            })
            .collect();
        if let Some((id, error)) = failed.first() {
            log::warn!(
                "NATS at {}: {} of {} messages failed, first {id}: {error}",
                self.url,
                failed.len(),
                batch.len()
            );
        }
        log::debug!("published a batch of {} messages to NATS", batch.len());
        outcomes
    }

    /// One warning per subject that no stream captures.
    fn warn_unroutable(&self, unroutable: &BTreeMap<String, usize>) {
        let then = match self.config.unroutable {
            Unroutable::Park => "they are parked (Unroutable::Park)",
            _ => "the relay retries them with backoff until a stream captures the subject",
        };
        for (subject, count) in unroutable {
            log::warn!(
                "no stream captures subject {subject:?} on NATS at {}: {count} message(s) \
                 unroutable; {then}",
                self.url
            );
        }
    }
}

/// What [`send_per_key`] found out.
struct Sent {
    /// One per message, in batch order; unroutable ones are `NotAttempted` here.
    outcomes: Vec<Result<(), PublishError>>,
    /// The messages no stream captured, with the server's error.
    unroutable: Vec<(usize, String)>,
}

/// A message encoded for the client: its subject, headers and body.
struct Outgoing {
    id: MessageId,
    subject: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The outcomes of a batch of which nothing was published: the first message of each key fails
/// with `error`, the rest of the key was not attempted.
fn none_published(batch: &[OutboxMessage], error: PublishError) -> Vec<Result<(), PublishError>> {
    let mut failed_keys: HashSet<&str> = HashSet::new();
    batch
        .iter()
        .map(|msg| {
            if failed_keys.insert(msg.partition_key.as_str()) {
                Err(error.clone())
            } else {
                Err(PublishError::NotAttempted)
            }
        })
        .collect()
}

/// `msg` encoded for the client, or why it can never be published: among others, a message
/// larger than the server's `max_payload`, refused before it is sent.
fn prepare(
    mapping: &SubjectMapping,
    encoder: &Encoder,
    max_payload: usize,
    msg: &OutboxMessage,
) -> Result<Outgoing, PublishError> {
    let fatal = PublishError::Fatal;
    let subject = mapping.subject(&msg.topic, &msg.partition_key);
    if let Some(why) = invalid_publish_subject(&subject) {
        return Err(fatal(format!("invalid subject {subject:?}: {why}")));
    }
    let (headers, body) = encoder.encode(msg);
    let mut map = HeaderMap::new();
    for (name, value) in &headers {
        if !valid_header_name(name) {
            return Err(fatal(format!("header name {name:?} is not valid in NATS")));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(fatal(format!(
                "header {name} has a line break in its value"
            )));
        }
        map.insert(name.as_str(), value.as_str());
    }
    map.insert(MSG_ID_HEADER, msg.id.to_string());
    let headers = wire_len(&map);
    let size = headers + body.len();
    if size > max_payload {
        return Err(fatal(format!(
            "message is {size} bytes as sent ({} bytes of payload, {headers} of headers), more \
             than the NATS server's max_payload of {max_payload} bytes",
            body.len(),
        )));
    }
    Ok(Outgoing {
        id: msg.id,
        subject,
        headers: map,
        body,
    })
}

/// Whether `name` can be a NATS header name: not empty, no `:`, whitespace or control
/// character. Checked per byte when ASCII, as header names nearly always are: this runs for
/// every header of every message.
fn valid_header_name(name: &str) -> bool {
    if name.is_ascii() {
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    } else {
        !name.contains(':') && !name.chars().any(|c| c.is_whitespace() || c.is_control())
    }
}

/// The size of `headers` on the wire: `NATS/1.0`, a `name: value` line per value, a blank line.
fn wire_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .fold(b"NATS/1.0\r\n\r\n".len(), |len, (name, values)| {
            values.iter().fold(len, |len, value| {
                let name: &str = name.as_ref();
                len + name.len() + b": ".len() + value.as_str().len() + b"\r\n".len()
            })
        })
}

/// Sends the `outgoing` messages of a batch and collects the outcomes, in batch order. Each key's messages go one at a
/// time, the next once the previous one is acknowledged, while the keys are pipelined (up to
/// `max_in_flight` messages awaiting their ack): a key never has two messages in flight, so a
/// lost ack or a refusal can never leave a later message of its key stored ahead of an earlier
/// one (after a reconnect the client would resend what it had buffered). A key moves on as soon
/// as its own ack arrives, not once the slowest key of the batch is acknowledged.
///
/// The messages ready to go are encoded and handed to the client in one run, as a raw client
/// would, so the connection writes them in few large writes; only the acks are awaited
/// together. (Awaiting each send among the acks let the set of futures yield every few dozen
/// sends, and each yield cost a write of its own, on both sides of the connection.)
async fn send_per_key(
    jetstream: jetstream::Context,
    max_in_flight: usize,
    mut outgoing: Vec<Result<Outgoing, PublishError>>,
    next_in_key: Vec<Option<usize>>,
    firsts: Vec<usize>,
) -> Sent {
    let mut outcomes: Vec<Result<(), PublishError>> = outgoing
        .iter()
        .map(|_| Err(PublishError::NotAttempted))
        .collect();
    // Messages whose key has nothing awaiting an ack, in the order they became ready.
    let mut ready: VecDeque<usize> = firsts.into();
    let mut acks = FuturesUnordered::new();
    let mut unroutable = Vec::new();
    loop {
        while acks.len() < max_in_flight {
            let Some(i) = ready.pop_front() else { break };
            let message = std::mem::replace(&mut outgoing[i], Err(PublishError::NotAttempted));
            let sent = match message {
                Ok(message) => send(&jetstream, message).await,
                Err(error) => Err(error),
            };
            match sent {
                Ok((id, ack)) => acks.push(async move { (i, id, ack.await) }),
                // The rest of the key stays `NotAttempted`.
                Err(error) => outcomes[i] = Err(error),
            }
        }
        let Some((i, id, ack)) = acks.next().await else {
            break;
        };
        match ack {
            Ok(ack) => {
                if ack.duplicate {
                    log::debug!(
                        "message {id} was already in stream {} (seq {})",
                        ack.stream,
                        ack.sequence
                    );
                }
                outcomes[i] = Ok(());
                ready.extend(next_in_key[i]);
            }
            Err(error) if matches!(error.kind(), PublishErrorKind::StreamNotFound) => {
                unroutable.push((i, error.to_string()));
            }
            Err(error) => outcomes[i] = Err(classify(&error)),
        }
    }
    Sent {
        outcomes,
        unroutable,
    }
}

/// Hands `message` to the client; the returned future awaits its ack. The context holds back
/// the send while `max_in_flight` messages await their ack (it was built with backpressure);
/// [`send_per_key`] keeps below that on its own.
async fn send(
    jetstream: &jetstream::Context,
    message: Outgoing,
) -> Result<(MessageId, jetstream::context::PublishAckFuture), PublishError> {
    let Outgoing {
        id,
        subject,
        headers,
        body,
    } = message;
    jetstream
        .publish_with_headers(subject, headers, body.into())
        .await
        .map(|ack| (id, ack))
        .map_err(|error| classify(&error))
}

fn classify(error: &jetstream::context::PublishError) -> PublishError {
    let text = error_chain(error);
    if publish_error_is_fatal(error) {
        PublishError::Fatal(text)
    } else if publish_error_is_unavailable(error) {
        PublishError::Unavailable(text)
    } else {
        PublishError::Retryable(text)
    }
}

impl Publisher for NatsPublisher {
    /// Sends the messages of `batch`, one at a time per partition key (the next once the
    /// previous one is acknowledged), the keys pipelined; see the crate docs on ordering.
    ///
    /// - ack, including a duplicate ack (already stored) -> `Ok`
    /// - not connected, connection lost, no ack in time -> `Unavailable`: the relay charges no
    ///   attempt and pauses, so an outage of any length parks nothing
    /// - no stream captures the subject (no responders) -> as [`PublisherConfig::unroutable`]
    ///   says: `Retryable` by default, or `Fatal`
    /// - stream full -> `Retryable`
    /// - larger than the server's [`max_payload`](NatsPublisher::max_payload) (refused before
    ///   sending, naming both sizes) or the stream's maximum, invalid subject or header, sealed
    ///   stream -> `Fatal`
    /// - an earlier message of the same key failed -> `NotAttempted`
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.publish_batch(batch)
    }

    /// The largest message (payload and header bytes, see [`BrokerLimits`]) the server takes:
    /// its [`max_payload`](NatsPublisher::max_payload) less what this transport adds to every
    /// message. A stream's own `max_msg_size`, if lower, is not known to the publisher.
    ///
    /// ```no_run
    /// use waybill_nats::{NatsPublisher, PublisherConfig};
    /// use waybill_outbox_core::{Limits, Publisher};
    ///
    /// let publisher = NatsPublisher::connect("nats://127.0.0.1:4222", PublisherConfig::default())?;
    /// // Refuse at enqueue time what the server would refuse at publish time: pass these to
    /// // `waybill_diesel::Outbox::new(limits)`.
    /// let limits = Limits::default().capped_by(publisher.limits());
    /// assert!(limits.message_bytes_limit() < Some(publisher.max_payload()));
    /// # Ok::<(), waybill_nats::Error>(())
    /// ```
    fn limits(&self) -> BrokerLimits {
        BrokerLimits::default()
            .max_message_bytes(self.max_payload().saturating_sub(MESSAGE_RESERVE))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_header_name;

    #[test]
    fn header_names_without_separator_whitespace_or_control_characters_are_valid() {
        for name in ["ce-id", "X-Trace", "Nats-Msg-Id", "ключ", "a~!#"] {
            assert!(valid_header_name(name), "{name:?}");
        }
        for name in [
            "",
            "a:b",
            "a b",
            "a\tb",
            "a\r\nb",
            "a\u{7f}",
            "a\u{0}",
            "ключ:",
            "к лю",
            "к\u{a0}л",
            "к\u{85}",
        ] {
            assert!(!valid_header_name(name), "{name:?}");
        }
    }
}
