//! [`NatsConsumer`]: a durable JetStream pull consumer that feeds a [`DeliveryHandler`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::{self, stream, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use tokio::runtime::Runtime;
#[cfg(doc)]
use waybill_inbox_core::Disposition;
use waybill_inbox_core::{wire, DeliveryHandler, Outcome, RetryPolicy};
use waybill_outbox_core::Headers;

use crate::publisher::{error_chain, MSG_ID_HEADER};
use crate::{Error, Result};
use waybill_outbox_core::redact_url;

/// Dead-letter header: why the message was dead-lettered. The same name on every transport.
pub use waybill_inbox_core::DEAD_LETTER_REASON;
/// Dead-letter header: the stream the message came from.
pub const DEAD_LETTER_STREAM: &str = "waybill-dead-letter-stream";
/// Dead-letter header: the subject the message was published to.
pub const DEAD_LETTER_SUBJECT: &str = "waybill-dead-letter-subject";
/// Dead-letter header: the message's sequence in its stream.
pub const DEAD_LETTER_SEQUENCE: &str = "waybill-dead-letter-sequence";
/// Dead-letter header: how many times the message had been delivered.
pub const DEAD_LETTER_DELIVERIES: &str = "waybill-dead-letter-deliveries";

/// Deliveries the server may make beyond [`ConsumerConfig::max_deliver`]: they are used only
/// when publishing the dead letter failed, to try that again (with one more handler call).
const SPARE_DELIVERIES: i64 = 3;

/// The longest reason kept in the dead-letter header.
const MAX_REASON_LEN: usize = 1024;

/// How a [`NatsConsumer`] consumes. Built with [`ConsumerConfig::new`]; every other setting
/// has a documented default.
///
/// ```
/// use std::time::Duration;
/// use waybill_nats::ConsumerConfig;
///
/// let config = ConsumerConfig::new("ORDERS", "billing")
///     .filter_subject("orders.>")
///     .max_deliver(5)
///     .nak_delay(Duration::from_secs(2));
/// assert_eq!(config.dead_letter_subject_name(), "waybill.dead.ORDERS");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    stream: String,
    durable_name: String,
    filter_subject: Option<String>,
    retry: RetryPolicy,
    nak_delay: Duration,
    ack_wait: Duration,
    max_ack_pending: Option<i64>,
    dead_letter_subject: Option<String>,
    dead_letter_stream: Option<Option<String>>,
    batch_size: usize,
    poll_wait: Duration,
}

impl ConsumerConfig {
    /// Consumes the existing stream `stream` through the durable consumer `durable_name`
    /// (created on connect if missing; a name per consuming service).
    pub fn new(stream: impl Into<String>, durable_name: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable_name: durable_name.into(),
            filter_subject: None,
            retry: RetryPolicy::default(),
            nak_delay: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: None,
            dead_letter_subject: None,
            dead_letter_stream: None,
            batch_size: 100,
            poll_wait: Duration::from_secs(1),
        }
    }

    /// Consumes only the stream's messages on subjects matching `filter` (wildcards allowed).
    /// Defaults to every subject of the stream.
    #[must_use]
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// How a message whose handler returned [`Disposition::Retry`] or panicked is retried: in
    /// place, before the next message is handled, so a key's later message never overtakes it
    /// (a `nak` would let it); after the policy's max deliveries it is dead-lettered. Earlier
    /// server deliveries of the message (a crashed consumer) count against the budget, but the
    /// handler always sees a delivery at least once. Defaults to [`RetryPolicy::default`].
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Handler calls per message, the first included, before it is dead-lettered: the same
    /// knob as on every transport. Defaults to 5. Values below 1 count as 1.
    #[must_use]
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.retry = self.retry.max_deliveries(max);
        self
    }

    /// The same as [`max_deliveries`](Self::max_deliveries), by its JetStream name.
    #[must_use]
    pub fn max_deliver(self, max: u32) -> Self {
        self.max_deliveries(max)
    }

    /// How long the server waits before redelivering a message whose dead letter could not be
    /// published. Defaults to 1 second.
    #[must_use]
    pub fn nak_delay(mut self, delay: Duration) -> Self {
        self.nak_delay = delay;
        self
    }

    /// How long the server waits for the ack of a delivery before redelivering it (a crashed
    /// or stuck consumer). Must exceed the handler's longest run for a batch, in-place
    /// retries included. Defaults to 30 seconds.
    #[must_use]
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// How many deliveries the server hands out before it waits for acks (the durable
    /// consumer's `max_ack_pending`). With 1, a delivery that a crashed consumer never
    /// acknowledged is redelivered before any later message, so per-key order survives consumer
    /// crashes, at one round trip per message. Defaults to the server's default.
    #[must_use]
    pub fn max_ack_pending(mut self, max: u32) -> Self {
        self.max_ack_pending = Some(i64::from(max.max(1)));
        self
    }

    /// The subject dead letters are published to. Defaults to `waybill.dead.<stream>`.
    #[must_use]
    pub fn dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter_subject = Some(subject.into());
        self
    }

    /// The stream the consumer creates on connect (if missing) to store the dead-letter
    /// subject; `None` when you provide a stream capturing it yourself. Defaults to
    /// `<stream>_dead`.
    #[must_use]
    pub fn dead_letter_stream(mut self, stream: Option<String>) -> Self {
        self.dead_letter_stream = Some(stream);
        self
    }

    /// How many messages [`NatsConsumer::run`] pulls at a time. Defaults to 100.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// How long [`NatsConsumer::run`] waits for messages in each pull, which is also how
    /// quickly it notices the stop flag when idle. Defaults to 1 second.
    #[must_use]
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait;
        self
    }

    /// The stream consumed.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The durable consumer's name.
    pub fn durable_name(&self) -> &str {
        &self.durable_name
    }

    /// The dead-letter subject in effect.
    pub fn dead_letter_subject_name(&self) -> String {
        self.dead_letter_subject
            .clone()
            .unwrap_or_else(|| format!("waybill.dead.{}", self.stream))
    }

    /// The dead-letter stream the consumer creates, if any.
    pub fn dead_letter_stream_name(&self) -> Option<String> {
        match &self.dead_letter_stream {
            Some(stream) => stream.clone(),
            None => Some(format!("{}_dead", self.stream)),
        }
    }
}

pub use waybill_inbox_core::ConsumeReport;

/// A durable JetStream pull consumer: pulls messages, decodes them with
/// [`wire::decode`], hands them to a [`DeliveryHandler`] and acknowledges each only after the
/// handler returned [`Disposition::Ack`]. See the crate docs for redelivery and dead letters.
///
/// ```no_run
/// use std::time::Duration;
/// use waybill_inbox_core::{Disposition, IncomingMessage};
/// use waybill_nats::{ConsumerConfig, NatsConsumer};
///
/// let mut consumer = NatsConsumer::connect("nats://127.0.0.1:4222", ConsumerConfig::new("ORDERS", "billing"))?;
/// let mut handler = |msg: &IncomingMessage| {
///     println!("{} {}", msg.message_type, msg.id);
///     Disposition::Ack
/// };
/// let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
/// println!("{} acked", report.acked);
/// # Ok::<(), waybill_nats::Error>(())
/// ```
pub struct NatsConsumer {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    consumer: Consumer<pull::Config>,
    config: ConsumerConfig,
    dead_letter_subject: String,
    // Last: dropped after the client, whose tasks it runs.
    runtime: Runtime,
}

impl fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NatsConsumer {
    /// Connects to `url`, creates the dead-letter stream if configured and missing, and
    /// creates (or reuses) the durable pull consumer with explicit acks. The stream itself
    /// must exist. An existing durable consumer keeps its settings.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`], [`Error::GetStream`] when the stream does not exist,
    /// [`Error::CreateStream`] for the dead-letter stream, [`Error::Consumer`].
    pub fn connect(url: &str, config: ConsumerConfig) -> Result<Self> {
        let runtime = crate::runtime()?;
        let client = runtime.block_on(crate::connect(url))?;
        // The context spawns its ack task on the runtime.
        let jetstream = {
            let _runtime = runtime.enter();
            jetstream::new(client.clone())
        };
        let dead_letter_subject = config.dead_letter_subject_name();
        let consumer = runtime.block_on(async {
            let stream = jetstream
                .get_stream(&config.stream)
                .await
                .map_err(|source| Error::GetStream {
                    stream: config.stream.clone(),
                    source,
                })?;
            if let Some(name) = config.dead_letter_stream_name() {
                jetstream
                    .get_or_create_stream(stream::Config {
                        name: name.clone(),
                        subjects: vec![dead_letter_subject.clone()],
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| Error::CreateStream {
                        stream: name,
                        source,
                    })?;
            }
            stream
                .get_or_create_consumer(
                    &config.durable_name,
                    pull::Config {
                        durable_name: Some(config.durable_name.clone()),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: config.ack_wait,
                        max_deliver: i64::from(config.retry.max_deliveries_allowed())
                            + SPARE_DELIVERIES,
                        filter_subject: config.filter_subject.clone().unwrap_or_default(),
                        max_ack_pending: config.max_ack_pending.unwrap_or(0),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|source| Error::Consumer {
                    stream: config.stream.clone(),
                    consumer: config.durable_name.clone(),
                    source,
                })
        })?;
        log::debug!(
            "NATS consumer {} on stream {} connected to {}",
            config.durable_name,
            config.stream,
            redact_url(url)
        );
        Ok(Self {
            client,
            jetstream,
            consumer,
            config,
            dead_letter_subject,
            runtime,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Drops the connection and lets the client reconnect, as a broker restart would. For
    /// tests; it does not wait for the new connection.
    ///
    /// # Errors
    ///
    /// [`Error::Reconnect`] when the client is closed.
    pub fn force_reconnect(&self) -> Result<()> {
        self.runtime
            .block_on(self.client.force_reconnect())
            .map_err(Error::Reconnect)
    }

    /// Pulls up to `max` messages, waiting at most `wait` for them, and handles each in
    /// delivery order. Returns early when `max` messages arrived. The deterministic step that
    /// tests drive; [`run`](Self::run) is the loop around it.
    ///
    /// Per delivery: the handler's [`Disposition::Ack`] -> ack; [`Disposition::Retry`] or a
    /// panic -> the handler is called again in place (see [`ConsumerConfig::retry`]), and
    /// after the last allowed call the message is dead-lettered and `term`ed;
    /// [`Disposition::DeadLetter`] or undecodable data -> dead-letter and `term`. A dead letter
    /// that cannot be published is nak'ed with the [nak delay](ConsumerConfig::nak_delay)
    /// instead and counted as retried, so it is tried again rather than lost.
    ///
    /// # Errors
    ///
    /// [`Error::Fetch`] / [`Error::Receive`] when pulling fails, [`Error::Ack`] when an
    /// acknowledgement cannot be sent (the server redelivers what was not acknowledged).
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        let runtime = &self.runtime;
        let this = &*self;
        runtime.block_on(this.run_once_async(handler, max.max(1), wait))
    }

    /// Runs [`run_once`](Self::run_once) in a loop until `stop` is set, and returns the summed
    /// report. A broker error (connection lost, consumer unavailable) is logged and retried
    /// with a backoff from 100 ms doubling up to 5 s; the loop never exits on one. The client
    /// reconnects by itself and the loop resumes where the durable consumer left off.
    ///
    /// # Errors
    ///
    /// None today: the `Result` leaves room for errors that stopping must report.
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &AtomicBool,
    ) -> Result<ConsumeReport> {
        const MIN_BACKOFF: Duration = Duration::from_millis(100);
        const MAX_BACKOFF: Duration = Duration::from_secs(5);
        let mut total = ConsumeReport::default();
        let mut backoff = MIN_BACKOFF;
        while !stop.load(Ordering::SeqCst) {
            let (batch_size, poll_wait) = (self.config.batch_size, self.config.poll_wait);
            match self.run_once(handler, batch_size, poll_wait) {
                Ok(report) => {
                    if report.delivered == 0 {
                        log::trace!("consumer {}: nothing to do", self.config.durable_name);
                    }
                    total.add(&report);
                    backoff = MIN_BACKOFF;
                }
                Err(error) => {
                    log::warn!(
                        "consumer {} on stream {}: {}; retrying in {backoff:?}",
                        self.config.durable_name,
                        self.config.stream,
                        error_chain(&error)
                    );
                    let until = Instant::now() + backoff;
                    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                        std::thread::sleep(
                            until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(50)),
                        );
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        Ok(total)
    }

    async fn run_once_async(
        &self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        let mut report = ConsumeReport::default();
        let mut batch = self
            .consumer
            .batch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(Error::Fetch)?;
        // Take the whole batch first: the batch ends on its own timer, and a message left
        // in it would only come back after the ack wait.
        let mut messages = Vec::with_capacity(max);
        while let Some(message) = batch.next().await {
            match message {
                Ok(message) => messages.push(message),
                // Handle what arrived (else it would come back only after the ack wait); the
                // next pull reports the error if it persists.
                Err(error) if !messages.is_empty() => {
                    log::warn!("pulling messages stopped early: {error}");
                    break;
                }
                Err(error) => return Err(Error::Receive(error)),
            }
        }
        for message in messages {
            report.delivered += 1;
            self.dispose(handler, &message, &mut report).await?;
        }
        if report.delivered > 0 {
            if let Err(error) = self.client.flush().await {
                log::warn!("flushing acknowledgements failed: {error}");
            }
            log::debug!("consumer {}: {report:?}", self.config.durable_name);
        }
        report.record(&self.config.durable_name);
        Ok(report)
    }

    async fn dispose(
        &self,
        handler: &mut impl DeliveryHandler,
        message: &jetstream::Message,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let (delivered, sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream_sequence),
            Err(error) => {
                // Not a JetStream delivery (no reply subject): nothing to acknowledge.
                log::error!("a delivery without JetStream metadata was skipped: {error}");
                report.malformed += 1;
                return Ok(());
            }
        };
        let headers = read_headers(message.headers.as_ref());
        let incoming = match wire::decode(headers, message.payload.to_vec()) {
            Ok(incoming) => incoming,
            Err(error) => {
                let reason = format!("malformed: {}", error_chain(&error));
                log::error!(
                    "stream {} seq {sequence} is dead-lettered: {reason}",
                    self.config.stream
                );
                if self
                    .dead_letter(message, sequence, delivered, &reason)
                    .await
                {
                    report.malformed += 1;
                    self.acknowledge(message, sequence, AckKind::Term).await?;
                } else {
                    report.retried += 1;
                    self.acknowledge(message, sequence, self.nak()).await?;
                }
                return Ok(());
            }
        };
        // Earlier server deliveries (a consumer that crashed or lost its connection).
        let earlier = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
        // Retried in place: the next message is handled only once this one is settled.
        let handled = self.config.retry.handle(handler, &incoming, earlier);
        report.retried += u64::from(handled.retries());
        let delivered = i64::from(earlier) + i64::from(handled.attempts);
        let reason = match handled.outcome {
            Outcome::Ack => {
                report.acked += 1;
                return self.acknowledge(message, sequence, AckKind::Ack).await;
            }
            Outcome::DeadLetter(reason) => reason,
        };
        log::error!("message {} is dead-lettered: {reason}", incoming.id);
        if self
            .dead_letter(message, sequence, delivered, &reason)
            .await
        {
            report.dead_lettered += 1;
            self.acknowledge(message, sequence, AckKind::Term).await
        } else {
            report.retried += 1;
            self.acknowledge(message, sequence, self.nak()).await
        }
    }

    fn nak(&self) -> AckKind {
        AckKind::Nak(Some(self.config.nak_delay))
    }

    async fn acknowledge(
        &self,
        message: &jetstream::Message,
        sequence: u64,
        kind: AckKind,
    ) -> Result<()> {
        message
            .ack_with(kind)
            .await
            .map_err(|source| Error::Ack { sequence, source })
    }

    /// Publishes `message` with the reason to the dead-letter subject and awaits the ack;
    /// `false` (logged) when that failed.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        sequence: u64,
        delivered: i64,
        reason: &str,
    ) -> bool {
        let mut headers = HeaderMap::new();
        for (name, value) in read_headers(message.headers.as_ref()) {
            headers.insert(name, value);
        }
        headers.insert(DEAD_LETTER_REASON, one_line(reason));
        headers.insert(DEAD_LETTER_STREAM, self.config.stream.as_str());
        headers.insert(DEAD_LETTER_SUBJECT, message.subject.as_str());
        headers.insert(DEAD_LETTER_SEQUENCE, sequence.to_string());
        headers.insert(DEAD_LETTER_DELIVERIES, delivered.to_string());
        // A dead letter published twice (term lost, message redelivered) is stored once.
        headers.insert(
            MSG_ID_HEADER,
            format!("dead:{}:{sequence}", self.config.stream),
        );
        let published = match self
            .jetstream
            .publish_with_headers(
                self.dead_letter_subject.clone(),
                headers,
                message.payload.clone(),
            )
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match published {
            Ok(_) => true,
            Err(error) => {
                log::error!(
                    "dead-lettering stream {} seq {sequence} to {} failed, will retry: {}",
                    self.config.stream,
                    self.dead_letter_subject,
                    error_chain(&error)
                );
                false
            }
        }
    }
}

/// The message's headers as a string map, without JetStream's own `Nats-*` headers. A header
/// sent several times keeps its first value.
fn read_headers(headers: Option<&HeaderMap>) -> Headers {
    let mut map = Headers::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") {
            continue;
        }
        if let Some(value) = values.first() {
            map.entry(name.to_owned())
                .or_insert_with(|| value.as_str().to_owned());
        }
    }
    map
}

/// `reason` fit for a header value: one line, at most [`MAX_REASON_LEN`] bytes.
fn one_line(reason: &str) -> String {
    let mut line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_single_bounded_lines() {
        assert_eq!(one_line("a\r\nb"), "a  b");
        let long = "é".repeat(MAX_REASON_LEN);
        let line = one_line(&long);
        assert!(line.len() <= MAX_REASON_LEN && line.chars().all(|c| c == 'é'));
    }

    #[test]
    fn jetstream_headers_are_not_user_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "x");
        headers.insert("nats-expected-stream", "y");
        headers.insert("traceparent", "t");
        let read = read_headers(Some(&headers));
        assert_eq!(read.len(), 1);
        assert_eq!(read["traceparent"], "t");
    }

    #[test]
    fn config_defaults() {
        let config = ConsumerConfig::new("S", "d");
        assert_eq!(config.dead_letter_subject_name(), "waybill.dead.S");
        assert_eq!(config.dead_letter_stream_name().as_deref(), Some("S_dead"));
        assert_eq!(
            config
                .clone()
                .dead_letter_stream(None)
                .dead_letter_stream_name(),
            None
        );
        assert_eq!(config.max_deliver(0).retry.max_deliveries_allowed(), 1);
    }
}
