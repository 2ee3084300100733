//! [`NatsConsumer`]: a durable JetStream pull consumer on the shared [`ConsumerLoop`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::{self, stream, AckKind, Message};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use tokio::runtime::Runtime;
#[cfg(doc)]
use waybill_inbox_core::Disposition;
use waybill_inbox_core::{
    wire::{Binding, Decoder, Received, WireValue},
    ConsumerLoop, DeadLetter, DecodeError, DeliveryHandler, IncomingMessage, RetryPolicy,
    Subscription,
};
use waybill_outbox_core::{redact_url, Headers, StopHandle};

use crate::publisher::MSG_ID_HEADER;
use crate::{ConnectOptions, Error, Result};

pub use waybill_inbox_core::ConsumeReport;
/// Dead-letter header: why the message was dead-lettered. The same name on every transport.
pub use waybill_inbox_core::DEAD_LETTER_REASON;
/// Dead-letter header: the stream the message came from.
pub const DEAD_LETTER_STREAM: &str = "waybill-dead-letter-stream";
/// Dead-letter header: the subject the message was published to.
pub const DEAD_LETTER_SUBJECT: &str = "waybill-dead-letter-subject";
/// Dead-letter header: the message's sequence in its stream.
pub const DEAD_LETTER_SEQUENCE: &str = "waybill-dead-letter-sequence";
/// Dead-letter header: how many handler calls the message had, earlier deliveries included
/// (0 when it was malformed).
pub const DEAD_LETTER_DELIVERIES: &str = "waybill-dead-letter-deliveries";

/// How long a pull that should take only what is at hand lingers on the server when nothing
/// is (the server ends such a pull at once only when it carries no expiry, and a pull without
/// one can stay open past the ack wait: see [`Durable`]).
const AT_HAND: Duration = Duration::from_millis(10);

/// The most messages remembered as handed back unseen (see [`Durable::unseen`]).
const MAX_UNSEEN: usize = 100_000;

/// How a [`NatsConsumer`] consumes. Built with [`ConsumerConfig::new`]; every other setting
/// has a documented default.
///
/// ```
/// use std::time::Duration;
/// use waybill_nats::ConsumerConfig;
///
/// let config = ConsumerConfig::new("ORDERS", "billing")
///     .filter_subject("orders.>")
///     .max_deliveries(5)
///     .ack_wait(Duration::from_secs(60));
/// assert_eq!(config.dead_letter_subject_name(), "waybill.dead.ORDERS");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    stream: String,
    durable_name: String,
    filter_subject: Option<String>,
    retry: RetryPolicy,
    ack_wait: Duration,
    max_ack_pending: Option<i64>,
    dead_letter_subject: Option<String>,
    dead_letter_stream: Option<Option<String>>,
    batch_size: usize,
    poll_wait: Duration,
    native_metadata: bool,
    connect_options: ConnectOptions,
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
            ack_wait: Duration::from_secs(30),
            max_ack_pending: None,
            dead_letter_subject: None,
            dead_letter_stream: None,
            batch_size: 100,
            poll_wait: Duration::from_secs(1),
            native_metadata: false,
            connect_options: ConnectOptions::default(),
        }
    }

    /// Whether a message that is neither a CloudEvent nor in waybill's legacy form is read from
    /// NATS's own metadata: `Nats-Msg-Id` as the id (a UUID), the subject as the topic, the
    /// `content-type` header, the receive time as the send time, an empty type. For producers
    /// that know nothing of CloudEvents. Defaults to `false`: such a message is dead-lettered as
    /// not a CloudEvent.
    #[must_use]
    pub fn native_metadata(mut self, accept: bool) -> Self {
        self.native_metadata = accept;
        self
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
    /// server deliveries that reached a handler (a crashed consumer) count against the budget,
    /// but the handler always sees a delivery at least once. Defaults to
    /// [`RetryPolicy::default`].
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

    /// An alias of [`max_deliveries`](Self::max_deliveries), by its JetStream name. It counts
    /// handler calls, not server deliveries: the durable consumer's own `max_deliver` is
    /// unlimited (see the crate docs).
    #[must_use]
    pub fn max_deliver(self, max: u32) -> Self {
        self.max_deliveries(max)
    }

    /// How long the server waits for a sign of life of a delivery before it hands the message
    /// to another pull (the durable consumer's `ack_wait`). The consumer renews the messages it
    /// fetched ahead whenever a quarter of it has passed, and pulls with an expiry of at most
    /// half of it, so a handler run (in-place retries included) shorter than three quarters of
    /// it never lets a message be delivered twice; a consumer that crashed or hangs gets its
    /// messages redelivered after it. Defaults to 30 seconds; an existing durable consumer
    /// keeps its own.
    #[must_use]
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// How many deliveries the server hands out before it waits for acks (the durable
    /// consumer's `max_ack_pending`). With 1, a delivery that a crashed consumer never
    /// acknowledged is redelivered before any later message, so per-key order survives consumer
    /// crashes, at one round trip per message. Defaults to the server's default (1,000).
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

    /// How many messages [`NatsConsumer::run`] handles per step (and pulls at most at a time).
    /// Defaults to 100. Values below 1 count as 1.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// How long [`NatsConsumer::run`] waits for a message in each step, which is also how
    /// quickly it notices the stop handle when idle. Defaults to 1 second; a pull never waits
    /// longer than half the ack wait.
    #[must_use]
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait;
        self
    }

    /// How the consumer authenticates and secures its connection (credentials, TLS).
    /// Defaults to [`ConnectOptions::default`]: only what the URL carries, TLS when the URL
    /// says `tls://` or the server requires it.
    #[must_use]
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect_options = options;
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

/// A durable JetStream pull consumer on the shared [`ConsumerLoop`]: pulls messages, decodes
/// them from the [`wire`](waybill_inbox_core::wire) form (CloudEvents binary or structured mode, the legacy headers,
/// and with [`ConsumerConfig::native_metadata`] plain NATS messages), hands them to a [`DeliveryHandler`] and acknowledges each only
/// after the handler returned [`Disposition::Ack`]. See the crate docs for redelivery and
/// dead letters.
///
/// ```no_run
/// use std::time::Duration;
/// use waybill_inbox_core::{Disposition, IncomingMessage};
/// use waybill_nats::{ConsumerConfig, NatsConsumer, StopHandle};
///
/// let config = ConsumerConfig::new("ORDERS", "billing");
/// let mut consumer = NatsConsumer::connect("nats://127.0.0.1:4222", config)?;
/// let mut handler = |msg: &IncomingMessage| {
///     println!("{} {}", msg.message_type, msg.id);
///     Disposition::Ack
/// };
/// // One step, as a test drives it:
/// let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
/// println!("{} acked", report.acked);
/// // Or until another thread calls `stop.stop()`:
/// let stop = StopHandle::new();
/// # stop.stop();
/// let total = consumer.run(&mut handler, &stop)?;
/// # let _ = total;
/// # Ok::<(), waybill_nats::Error>(())
/// ```
#[derive(Debug)]
pub struct NatsConsumer {
    consumer: ConsumerLoop<Durable>,
}

impl NatsConsumer {
    /// Connects to `url`, creates the dead-letter stream if configured and missing, and
    /// creates (or reuses) the durable pull consumer with explicit acks and an unlimited
    /// `max_deliver`. The stream itself must exist. An existing durable consumer keeps its
    /// settings (a limited `max_deliver` is logged as a warning: the server drops a message
    /// after it, even one that could not be dead-lettered yet).
    ///
    /// # Errors
    ///
    /// [`Error::ReadFile`] or [`Error::InvalidSecretFile`] for a file of the
    /// [`ConnectOptions`], [`Error::Connect`] (see [`NatsPublisher::connect`](crate::NatsPublisher::connect)), [`Error::GetStream`] when the stream does not exist,
    /// [`Error::CreateStream`] for the dead-letter stream, [`Error::Consumer`].
    pub fn connect(url: &str, config: ConsumerConfig) -> Result<Self> {
        let durable = Durable::connect(url, config)?;
        log::debug!(
            "NATS consumer {} on stream {} connected to {}",
            durable.config.durable_name,
            durable.config.stream,
            redact_url(url)
        );
        let (batch, poll_wait) = (durable.config.batch_size, durable.config.poll_wait);
        let retry = durable.config.retry;
        Ok(Self {
            consumer: ConsumerLoop::new(durable, retry).batch(batch, poll_wait),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.consumer.subscription().config
    }

    /// Drops the connection and lets the client reconnect, as a broker restart would. For
    /// tests; it does not wait for the new connection.
    ///
    /// # Errors
    ///
    /// [`Error::Reconnect`] when the client is closed.
    pub fn force_reconnect(&self) -> Result<()> {
        let durable = self.consumer.subscription();
        durable
            .runtime
            .block_on(durable.client.force_reconnect())
            .map_err(Error::Reconnect)
    }

    /// Handles up to `max` messages, waiting at most `wait` for the first (and at most half
    /// the ack wait), then taking only those at hand: the deterministic step tests drive;
    /// [`run`](Self::run) loops over it. It never pulls more than it has yet to handle.
    ///
    /// Per delivery: the handler's [`Disposition::Ack`] -> ack; [`Disposition::Retry`] or a
    /// panic -> the handler is called again in place (see [`ConsumerConfig::retry`]), and
    /// after the last allowed call the message is dead-lettered and `term`ed;
    /// [`Disposition::DeadLetter`] or undecodable data -> dead-letter and `term`. A dead letter
    /// that cannot be published ends the step with [`Error::DeadLetter`]: the message and the
    /// ones pulled behind it are `nak`ed in order, so it comes back first and nothing is lost.
    ///
    /// # Errors
    ///
    /// [`Error::Fetch`] / [`Error::Receive`] when pulling fails, [`Error::DeadLetter`],
    /// [`Error::Ack`] when an acknowledgement cannot be sent (the server redelivers what was
    /// not acknowledged). All of them are retryable.
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        self.consumer.run_once(handler, max, wait)
    }

    /// Runs steps of [`batch_size`](ConsumerConfig::batch_size) messages until `stop` is
    /// stopped, and returns the summed report. A failed step (connection lost, dead-letter
    /// stream missing) is logged and retried after a pause from 100 ms doubling up to 5 s;
    /// the client reconnects by itself and the loop resumes where the durable consumer left
    /// off. On stop it settles the message in hand and `nak`s what it pulled ahead.
    ///
    /// # Errors
    ///
    /// Only an error that retrying cannot fix (see [`Error::is_retryable`]).
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<ConsumeReport> {
        self.consumer.run(handler, stop)
    }
}

/// The durable pull consumer as a [`Subscription`].
///
/// Pulls hold no message longer than needed: a pull is sent only once every message of the
/// previous one was handed out, it asks for no more than the loop still wants, and it expires
/// after at most half the ack wait. A pull that stays open past the ack wait would get the
/// messages it already delivered again (the server redelivers into any open pull), which is
/// how a step could once handle one message three times. Messages pulled ahead wait in
/// `fetched`; [`next`](Subscription::next) renews their ack timer (`+WPI`) whenever a quarter
/// of the ack wait has passed, so they are not handed to another consumer while they wait
/// behind a slow message. The renewal is made by the loop's thread, not in the background: a
/// consumer whose handler hangs stops renewing, and the server redelivers its messages.
struct Durable {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    consumer: Consumer<pull::Config>,
    config: ConsumerConfig,
    dead_letter_subject: String,
    /// The durable consumer's ack wait, as the server has it.
    ack_wait: Duration,
    /// The most messages one pull asks for: the consumer's `max_ack_pending`, beyond which
    /// the server would hold the pull open.
    max_pull: usize,
    /// Pulled, not yet handed to the loop, in stream order.
    fetched: VecDeque<Message>,
    /// When the ack timers of `fetched` were last renewed.
    renewed: Instant,
    /// Per stream sequence, how often this consumer handed the message back without a handler
    /// having seen it (pulled ahead when a step failed). The server counts those deliveries;
    /// [`earlier_deliveries`](Subscription::earlier_deliveries) does not.
    unseen: HashMap<u64, u32>,
    // Last: dropped after the client, whose tasks it runs.
    runtime: Runtime,
}

impl fmt::Debug for Durable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Durable")
            .field("config", &self.config)
            .field("fetched", &self.fetched.len())
            .finish_non_exhaustive()
    }
}

impl Durable {
    fn connect(url: &str, config: ConsumerConfig) -> Result<Self> {
        let runtime = crate::runtime()?;
        let client = runtime.block_on(crate::connect(url, &config.connect_options))?;
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
                        // The loop counts handler calls and dead-letters; a server limit would
                        // drop a message whose dead letter could not be stored yet.
                        max_deliver: -1,
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
        let server = &consumer.cached_info().config;
        if server.max_deliver > 0 {
            log::warn!(
                "durable consumer {} on stream {} has max_deliver {}: the server drops a \
                 message delivered that often, even one whose dead letter could not be stored; \
                 set it to -1",
                config.durable_name,
                config.stream,
                server.max_deliver
            );
        }
        let ack_wait = if server.ack_wait.is_zero() {
            config.ack_wait
        } else {
            server.ack_wait
        };
        let max_pull = usize::try_from(server.max_ack_pending)
            .ok()
            .filter(|max| *max > 0)
            .unwrap_or(usize::MAX);
        Ok(Self {
            client,
            jetstream,
            consumer,
            config,
            dead_letter_subject,
            ack_wait,
            max_pull,
            fetched: VecDeque::new(),
            renewed: Instant::now(),
            unseen: HashMap::new(),
            runtime,
        })
    }

    /// Sends `kind` for `message`; `confirm` waits until the server processed it (and with it
    /// every acknowledgement sent before on this connection).
    fn acknowledge(&self, message: &Message, kind: AckKind, confirm: bool) -> Result<()> {
        let sequence = message.info().map_or(0, |info| info.stream_sequence);
        self.runtime
            .block_on(async {
                if confirm {
                    message.double_ack_with(kind).await
                } else {
                    message.ack_with(kind).await
                }
            })
            .map_err(|source| Error::Ack { sequence, source })
    }

    /// Renews the ack timers of the messages pulled ahead once a quarter of the ack wait passed.
    fn renew_if_due(&mut self) {
        if self.fetched.is_empty() || self.renewed.elapsed() < self.ack_wait / 4 {
            return;
        }
        let renewed = self.runtime.block_on(async {
            for message in &self.fetched {
                message.ack_with(AckKind::Progress).await?;
            }
            Ok::<(), async_nats::Error>(())
        });
        if let Err(error) = renewed {
            log::warn!(
                "{}: renewing messages pulled ahead failed, the server may redeliver them: \
                 {error}",
                self.config.durable_name
            );
        }
        self.renewed = Instant::now();
    }

    /// Forgets what `unseen` knows of a settled message.
    fn settled(&mut self, message: &Message) {
        if let Ok(info) = message.info() {
            self.unseen.remove(&info.stream_sequence);
        }
    }
}

/// One pull of at most `max` messages, taken whole: it ends when `max` arrived, when nothing
/// more is at hand, or after `expires`.
async fn pull(
    consumer: &Consumer<pull::Config>,
    max: usize,
    expires: Duration,
) -> Result<VecDeque<Message>> {
    let mut batch = consumer
        .fetch()
        .max_messages(max)
        .expires(expires)
        .messages()
        .await
        .map_err(Error::Fetch)?;
    let mut messages = VecDeque::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push_back(message),
            // Handle what arrived; the next pull reports the error if it persists.
            Err(error) if !messages.is_empty() => {
                log::warn!("pulling messages stopped early: {error}");
                break;
            }
            Err(error) => return Err(Error::Receive(error)),
        }
    }
    Ok(messages)
}

impl Subscription for Durable {
    type Delivery = Message;
    type Error = Error;

    fn name(&self) -> &str {
        &self.config.durable_name
    }

    fn next(&mut self, wait: Duration, wanted: usize) -> Result<Option<Message>> {
        if !self.fetched.is_empty() {
            self.renew_if_due();
            return Ok(self.fetched.pop_front());
        }
        let max = wanted.min(self.max_pull);
        let linger = if wait.is_zero() { AT_HAND } else { wait };
        let expires = linger.min(self.ack_wait / 2).max(Duration::from_millis(1));
        let started = Instant::now();
        self.fetched = self
            .runtime
            .block_on(pull(&self.consumer, max.max(1), expires))?;
        // The first messages arrived when the pull started; a pull held open (the consumer's
        // max_ack_pending reached) makes them wait until it expires.
        self.renewed = started;
        self.renew_if_due();
        Ok(self.fetched.pop_front())
    }

    fn decode(&self, message: &Message) -> Result<IncomingMessage, DecodeError> {
        let native_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(MSG_ID_HEADER))
            .map(|id| WireValue::Text(id.as_str().to_owned()));
        let received = Received::from_text(
            read_headers(message.headers.as_ref()),
            message.payload.to_vec(),
        )
        .with_topic(message.subject.as_str())
        .with_native_id(native_id);
        Decoder::new(Binding::Nats)
            .native_metadata(self.config.native_metadata)
            .decode(received)
    }

    /// The server's count of earlier deliveries, less those this consumer handed back before
    /// a handler saw them.
    fn earlier_deliveries(&self, message: &Message) -> u32 {
        let Ok(info) = message.info() else { return 0 };
        let unseen = self.unseen.get(&info.stream_sequence).copied().unwrap_or(0);
        u32::try_from(info.delivered.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .saturating_sub(unseen)
    }

    /// The last message of a pull is acknowledged with a confirmation: the server processes
    /// acknowledgements apart from pulls, and one still unprocessed when the next pull comes
    /// would let a message whose ack wait ran out (a slow handler) be delivered again.
    fn ack(&mut self, message: Message) -> Result<()> {
        self.acknowledge(&message, AckKind::Ack, self.fetched.is_empty())?;
        self.settled(&message);
        Ok(())
    }

    fn dead_letter(&mut self, message: &Message, letter: &DeadLetter<'_>) -> Result<()> {
        let sequence = message.info().map_or(0, |info| info.stream_sequence);
        let mut headers = HeaderMap::new();
        for (name, value) in read_headers(message.headers.as_ref()) {
            headers.insert(name, value);
        }
        headers.insert(DEAD_LETTER_REASON, letter.reason);
        headers.insert(DEAD_LETTER_STREAM, self.config.stream.as_str());
        headers.insert(DEAD_LETTER_SUBJECT, message.subject.as_str());
        headers.insert(DEAD_LETTER_SEQUENCE, sequence.to_string());
        headers.insert(DEAD_LETTER_DELIVERIES, letter.deliveries.to_string());
        // A dead letter published twice (term lost, message redelivered) is stored once.
        headers.insert(
            MSG_ID_HEADER,
            format!("dead:{}:{sequence}", self.config.stream),
        );
        self.runtime
            .block_on(async {
                self.jetstream
                    .publish_with_headers(
                        self.dead_letter_subject.clone(),
                        headers,
                        message.payload.clone(),
                    )
                    .await?
                    .await
            })
            .map(drop)
            .map_err(|source| Error::DeadLetter {
                sequence,
                subject: self.dead_letter_subject.clone(),
                source,
            })
    }

    /// `term`, confirmed for the last message of a pull as [`ack`](Self::ack) is.
    fn discard(&mut self, message: Message) -> Result<()> {
        self.acknowledge(&message, AckKind::Term, self.fetched.is_empty())?;
        self.settled(&message);
        Ok(())
    }

    /// `nak` without a delay, confirmed: JetStream then redelivers the message before any
    /// message it has not delivered yet, so no later message of its key overtakes it (a nak
    /// delay would let them). The confirmation makes sure the next pull sees the `nak`.
    fn release(&mut self, message: Message) -> Result<()> {
        self.acknowledge(&message, AckKind::Nak(None), true)
    }

    /// `nak`s the messages pulled ahead, in order (the last one confirmed), and remembers that
    /// no handler saw those deliveries.
    fn release_fetched(&mut self) -> Result<()> {
        if self.unseen.len() > MAX_UNSEEN {
            self.unseen.clear();
        }
        let fetched = std::mem::take(&mut self.fetched);
        let last = fetched.len().saturating_sub(1);
        for (i, message) in fetched.iter().enumerate() {
            if let Ok(info) = message.info() {
                *self.unseen.entry(info.stream_sequence).or_default() += 1;
            }
            self.acknowledge(message, AckKind::Nak(None), i == last)?;
        }
        Ok(())
    }

    /// Hands back what was pulled ahead, behind the message the loop released (if any): the
    /// redelivery queue keeps `nak` order, so the key order survives. (Pulling one message at
    /// a time after a failure would not: the released message would cycle behind the others.)
    /// The client reconnects by itself.
    fn reset(&mut self) {
        if let Err(error) = self.release_fetched() {
            log::warn!(
                "{}: handing back messages pulled ahead failed, the server redelivers them \
                 after the ack wait: {error}",
                self.config.durable_name
            );
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

#[cfg(test)]
mod tests {
    use super::*;

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
