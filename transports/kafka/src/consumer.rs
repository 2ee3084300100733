//! [`KafkaConsumer`]: a consumer-group member on the shared [`ConsumerLoop`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use waybill_inbox_core::{
    wire::{Binding, Decoder, Received, WireValue},
    ConsumeReport, ConsumerLoop, DeadLetter, DecodeError, DeliveryHandler, IncomingMessage,
    RetryPolicy, Subscription,
};
use waybill_outbox_core::StopHandle;

use crate::delivery::{read_headers, record_headers, DeliveryContext, Tag};
use crate::publisher::millis;
use crate::{Bootstrap, Error, Result};

/// Dead-letter header: why the record was dead-lettered. The same name on every transport.
pub use waybill_inbox_core::DEAD_LETTER_REASON;
/// Dead-letter header: the topic the record came from.
pub const DEAD_LETTER_TOPIC: &str = "waybill-dead-letter-topic";
/// Dead-letter header: the partition the record came from.
pub const DEAD_LETTER_PARTITION: &str = "waybill-dead-letter-partition";
/// Dead-letter header: the record's offset in its partition.
pub const DEAD_LETTER_OFFSET: &str = "waybill-dead-letter-offset";
/// Dead-letter header: how many handler calls the message had.
pub const DEAD_LETTER_DELIVERIES: &str = "waybill-dead-letter-deliveries";

/// How a [`KafkaConsumer`] consumes. Built with [`ConsumerConfig::new`]; every other setting
/// has a documented default.
///
/// ```
/// use std::time::Duration;
/// use waybill_kafka::ConsumerConfig;
///
/// let config = ConsumerConfig::new("orders", "billing")
///     .max_deliveries(3)
///     .max_poll_interval(Duration::from_secs(60));
/// assert_eq!(config.dead_letter_topic_name(), "orders.dead");
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    topic: String,
    group: String,
    retry: RetryPolicy,
    dead_letter_topic: Option<String>,
    create_dead_letter_topic: bool,
    session_timeout: Duration,
    max_poll_interval: Duration,
    request_timeout: Duration,
    batch_size: usize,
    poll_wait: Duration,
    properties: BTreeMap<String, String>,
}

impl fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("retry", &self.retry)
            .field("dead_letter_topic", &self.dead_letter_topic_name())
            .field("create_dead_letter_topic", &self.create_dead_letter_topic)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("request_timeout", &self.request_timeout)
            .field("batch_size", &self.batch_size)
            .field("poll_wait", &self.poll_wait)
            .field("properties", &crate::redacted(&self.properties))
            .finish()
    }
}

impl ConsumerConfig {
    /// Consumes `topic` as a member of the consumer group `group` (one group per consuming
    /// service; its members share the topic's partitions).
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            group: group.into(),
            retry: RetryPolicy::default(),
            dead_letter_topic: None,
            create_dead_letter_topic: true,
            session_timeout: Duration::from_secs(6),
            max_poll_interval: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            batch_size: 100,
            poll_wait: Duration::from_secs(1),
            properties: BTreeMap::new(),
        }
    }

    /// How a record whose handler returned `Retry` or panicked is retried: in place, before
    /// the next record of its partition; after the policy's max deliveries it is
    /// dead-lettered. Defaults to [`RetryPolicy::default`].
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Handler calls per record, the first included, before it is dead-lettered: the same
    /// knob as on every transport. Defaults to 5. Values below 1 count as 1.
    #[must_use]
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.retry = self.retry.max_deliveries(max);
        self
    }

    /// The topic dead letters go to. Defaults to `<topic>.dead`.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Whether [`KafkaConsumer::connect`] creates the dead-letter topic (one partition) when it
    /// is missing. Dead letters are never sent to a topic that does not exist (the producer
    /// does not auto-create it): while it is missing, a record to dead-letter stays where it
    /// is and is consumed again. Defaults to `true`.
    #[must_use]
    pub fn create_dead_letter_topic(mut self, create: bool) -> Self {
        self.create_dead_letter_topic = create;
        self
    }

    /// How long the group coordinator waits for a heartbeat before it gives the member's
    /// partitions to others (`session.timeout.ms`). Also sets how fast a first join completes
    /// on brokers that wait out a session before the first rebalance. Defaults to 6 seconds.
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// The longest time between two fetches before the member leaves the group and its
    /// partitions are given to others (`max.poll.interval.ms`). A handler retried in place runs
    /// within one fetch, so this must exceed the longest handler run, retries and backoffs
    /// included. Raised to the session timeout when below it. Defaults to 5 minutes.
    #[must_use]
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// How long a commit, a seek, a dead letter's acknowledgement or a topic creation may take
    /// before it fails. Defaults to 10 seconds.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How many records [`KafkaConsumer::run`] handles per step and how long it waits for the
    /// first. Defaults to 100 and 1 second.
    #[must_use]
    pub fn batch(mut self, size: usize, poll_wait: Duration) -> Self {
        self.batch_size = size.max(1);
        self.poll_wait = poll_wait;
        self
    }

    /// Sets any other librdkafka consumer property (security, `client.id`, fetch sizes). The
    /// consumer's guarantees override it for `group.id`, `enable.auto.commit`,
    /// `enable.auto.offset.store`, `auto.offset.reset`, `session.timeout.ms` and
    /// `max.poll.interval.ms`. The dead-letter producer gets the same properties. Defaults to
    /// none.
    #[must_use]
    pub fn set(mut self, property: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(property.into(), value.into());
        self
    }

    /// The topic consumed.
    pub fn topic_name(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group_name(&self) -> &str {
        &self.group
    }

    /// The dead-letter topic in effect.
    pub fn dead_letter_topic_name(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.topic))
    }

    fn consumer_config(&self, brokers: &Bootstrap) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        brokers
            .apply(&mut config)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(self.session_timeout))
            .set(
                "max.poll.interval.ms",
                millis(self.max_poll_interval.max(self.session_timeout)),
            );
        config
    }

    fn dead_letter_config(&self, brokers: &Bootstrap) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        brokers
            .apply(&mut config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(self.request_timeout))
            .set("linger.ms", "0")
            // A missing dead-letter topic must fail the dead letter, not be created by it.
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "1000");
        config
    }
}

/// A consumer-group member that feeds a [`DeliveryHandler`] (such as the diesel backend's
/// inbox handler) on the shared [`ConsumerLoop`]. See the crate docs for offsets, order and
/// dead letters.
///
/// ```no_run
/// use std::time::Duration;
/// use waybill_inbox_core::{Disposition, IncomingMessage};
/// use waybill_kafka::{ConsumerConfig, KafkaConsumer};
///
/// let mut consumer = KafkaConsumer::connect("127.0.0.1:19092", ConsumerConfig::new("orders", "billing"))?;
/// let mut handler = |msg: &IncomingMessage| {
///     println!("{} {}", msg.message_type, msg.id);
///     Disposition::Ack
/// };
/// let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
/// println!("{} acked", report.acked);
/// # Ok::<(), waybill_kafka::Error>(())
/// ```
#[derive(Debug)]
pub struct KafkaConsumer {
    consumer: ConsumerLoop<TopicSubscription>,
}

impl KafkaConsumer {
    /// Creates the dead-letter topic if configured and missing, joins the consumer group and
    /// subscribes to the topic. Partitions are assigned during the first fetches (a group's
    /// first join takes a few seconds); a new group starts at the earliest offset.
    ///
    /// # Errors
    ///
    /// [`Error::Client`] when librdkafka refuses the configuration, [`Error::CreateTopic`] or
    /// [`Error::Unreachable`] when the dead-letter topic cannot be created,
    /// [`Error::Subscribe`].
    pub fn connect(brokers: &str, config: ConsumerConfig) -> Result<Self> {
        let shown = waybill_outbox_core::redact_url(brokers);
        let servers = Bootstrap::parse(brokers);
        let dead_letter_topic = config.dead_letter_topic_name();
        if config.create_dead_letter_topic {
            let properties = config.properties.iter();
            let properties = properties.map(|(key, value)| (key.as_str(), value.as_str()));
            crate::ensure_topic_with(brokers, &dead_letter_topic, 1, properties)?;
        }
        let client_error = |what| {
            let brokers = shown.clone();
            move |source| Error::Client {
                what,
                brokers,
                source: Box::new(source),
            }
        };
        let consumer: BaseConsumer = config
            .consumer_config(&servers)
            .create()
            .map_err(client_error("consumer"))?;
        let dead_letters: BaseProducer<DeliveryContext> = config
            .dead_letter_config(&servers)
            .create_with_context(DeliveryContext::default())
            .map_err(client_error("dead-letter producer"))?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(|source| Error::Subscribe {
                topic: config.topic.clone(),
                source: Box::new(source),
            })?;
        log::debug!(
            "Kafka consumer of {} in group {} created for {shown}",
            config.topic,
            config.group
        );
        let (batch, poll_wait, retry) = (config.batch_size, config.poll_wait, config.retry);
        let subscription = TopicSubscription {
            consumer: Arc::new(consumer),
            dead_letters,
            dead_letter_topic,
            config,
            generation: 0,
        };
        Ok(Self {
            consumer: ConsumerLoop::new(subscription, retry).batch(batch, poll_wait),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.consumer.subscription().config
    }

    /// Handles up to `max` records: waits at most `wait` for the first, then takes only those
    /// already fetched. The deterministic step tests drive; [`run`](Self::run) loops over it.
    ///
    /// # Errors
    ///
    /// [`Error::Consume`] when fetching failed, [`Error::Commit`] when an offset could not be
    /// committed (the record comes back unless a later offset of its partition is committed),
    /// [`Error::DeadLetter`] when the dead-letter topic did not take a record (the partition
    /// was rewound to it, so it is consumed again).
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        self.consumer.run_once(handler, max, wait)
    }

    /// Handles records until `stop` is stopped and returns the summed report. Retryable
    /// failures (a lost connection, a missing dead-letter topic) are logged and retried after
    /// a pause.
    ///
    /// # Errors
    ///
    /// Only an error that retrying cannot fix, e.g. failed authorization.
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<ConsumeReport> {
        self.consumer.run(handler, stop)
    }

    /// A handle that makes this member leave its group from another thread, e.g. while the
    /// consumer's own thread is stuck in a handler.
    pub fn close_handle(&self) -> CloseHandle {
        CloseHandle {
            consumer: Arc::clone(&self.consumer.subscription().consumer),
            timeout: self.config().request_timeout,
        }
    }

    /// The partitions assigned to this member now (empty before the first join completed).
    ///
    /// # Errors
    ///
    /// [`Error::Consume`] when librdkafka cannot tell.
    pub fn assignment(&self) -> Result<Vec<i32>> {
        let subscription = self.consumer.subscription();
        let list = subscription
            .consumer
            .assignment()
            .map_err(|source| subscription.consume_error(source))?;
        Ok(list.elements().iter().map(|e| e.partition()).collect())
    }
}

/// Makes a [`KafkaConsumer`] leave its consumer group from any thread: its partitions go to
/// the other members at once instead of after `max.poll.interval.ms` (which, on some brokers,
/// never comes while the stuck member's client keeps heartbeating). Records it handled but
/// whose offsets it did not commit are delivered again to the member that gets the partition.
///
/// ```no_run
/// use waybill_kafka::{ConsumerConfig, KafkaConsumer};
///
/// let consumer = KafkaConsumer::connect("127.0.0.1:19092", ConsumerConfig::new("orders", "billing"))?;
/// let closer = consumer.close_handle();
/// std::thread::spawn(move || { let _consumer = consumer; /* consume; may get stuck */ });
/// closer.close();
/// # Ok::<(), waybill_kafka::Error>(())
/// ```
#[derive(Clone)]
pub struct CloseHandle {
    consumer: Arc<BaseConsumer<DefaultConsumerContext>>,
    timeout: Duration,
}

impl fmt::Debug for CloseHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloseHandle")
            .field("closed", &self.consumer.closed())
            .finish_non_exhaustive()
    }
}

impl CloseHandle {
    /// Leaves the group and closes the consumer, waiting at most the consumer's
    /// [request timeout](ConsumerConfig::request_timeout) for librdkafka to finish. Records
    /// fetched meanwhile are dropped, uncommitted. The consumer fails every call afterwards.
    pub fn close(&self) {
        if self.consumer.closed() {
            return;
        }
        if let Err(error) = self.consumer.close_queue() {
            log::warn!("closing the Kafka consumer failed: {error}");
            return;
        }
        let deadline = Instant::now() + self.timeout;
        while !self.consumer.closed() && Instant::now() < deadline {
            // Serves the revocation and the leave; what it fetches is dropped.
            let _ = self.consumer.poll(Duration::from_millis(100));
        }
    }
}

/// One record as the consumer took it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: BTreeMap<String, WireValue>,
    payload: Vec<u8>,
}

/// The consumer group's view of one topic as a [`Subscription`].
struct TopicSubscription {
    consumer: Arc<BaseConsumer<DefaultConsumerContext>>,
    dead_letters: BaseProducer<DeliveryContext>,
    dead_letter_topic: String,
    config: ConsumerConfig,
    generation: u64,
}

impl fmt::Debug for TopicSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicSubscription")
            .field("config", &self.config)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

impl TopicSubscription {
    fn consume_error(&self, source: KafkaError) -> Error {
        Error::Consume {
            topic: self.config.topic.clone(),
            source: Box::new(source),
        }
    }

    /// Commits `offset` (the next record to consume) of `partition` in the background: a
    /// commit waited for would cost every record a round trip to the group coordinator. The
    /// commits of a partition go out in order; one lost in a crash only redelivers records the
    /// inbox has already recorded.
    fn commit(&self, partition: i32, offset: i64) -> Result<()> {
        let mut list = TopicPartitionList::with_capacity(1);
        let commit_error = |source| Error::Commit {
            topic: self.config.topic.clone(),
            partition,
            offset,
            source: Box::new(source),
        };
        list.add_partition_offset(&self.config.topic, partition, Offset::Offset(offset))
            .map_err(commit_error)?;
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(commit_error)
    }

    /// Sends `record` with `letter`'s reason to the dead-letter topic and waits for the
    /// broker's acknowledgement (`acks=all`).
    fn send_dead_letter(&mut self, record: &Record, letter: &DeadLetter<'_>) -> Result<()> {
        let dead_letter_error = |source| Error::DeadLetter {
            topic: self.config.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            dead_letter_topic: self.dead_letter_topic.clone(),
            source: Box::new(source),
        };
        // Brokers that create topics on first use (`auto.create.topics.enable`, tansu) would
        // create a missing dead-letter topic when the producer asks for its metadata, whatever
        // `allow.auto.create.topics` says; the cluster's topic list does not create anything.
        let metadata = self
            .dead_letters
            .client()
            .fetch_metadata(None, self.config.request_timeout)
            .map_err(dead_letter_error)?;
        if !metadata
            .topics()
            .iter()
            .any(|t| t.name() == self.dead_letter_topic && t.error().is_none())
        {
            return Err(dead_letter_error(KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopic,
            )));
        }
        self.generation += 1;
        let (partition, offset, deliveries) = (
            record.partition.to_string(),
            record.offset.to_string(),
            letter.deliveries.to_string(),
        );
        let extra = [
            (DEAD_LETTER_REASON, letter.reason),
            (DEAD_LETTER_TOPIC, self.config.topic.as_str()),
            (DEAD_LETTER_PARTITION, partition.as_str()),
            (DEAD_LETTER_OFFSET, offset.as_str()),
            (DEAD_LETTER_DELIVERIES, deliveries.as_str()),
        ];
        // Copied as received; a value that is not UTF-8 is copied lossily.
        let copied: Vec<(&str, Cow<'_, str>)> = record
            .headers
            .iter()
            .filter_map(|(k, v)| match v {
                WireValue::Text(text) => Some((k.as_str(), Cow::Borrowed(text.as_str()))),
                WireValue::Bytes(bytes) => Some((k.as_str(), String::from_utf8_lossy(bytes))),
                _ => None,
            })
            .collect();
        let headers = copied
            .iter()
            .map(|(k, v)| (*k, v.as_ref()))
            .filter(|(k, _)| !extra.iter().any(|(name, _)| name == k))
            .chain(extra);
        let mut dead = BaseRecord::with_opaque_to(
            &self.dead_letter_topic,
            Box::new(Tag {
                generation: self.generation,
                index: 0,
            }),
        )
        .payload(record.payload.as_slice())
        .headers(record_headers(headers));
        if let Some(key) = &record.key {
            dead = dead.key(key.as_slice());
        }
        self.dead_letters
            .send(dead)
            .map_err(|(source, _)| dead_letter_error(source))?;
        // librdkafka reports the record by its message timeout (the request timeout).
        let deadline = Instant::now() + self.config.request_timeout + Duration::from_secs(5);
        while Instant::now() < deadline {
            // `poll` serves events until its timeout has passed: wait in short slices.
            self.dead_letters.poll(Duration::from_millis(1));
            let reports = self.dead_letters.context().take_reports();
            if let Some(report) = reports
                .into_iter()
                .find(|r| r.generation == self.generation)
            {
                return report.result.map_err(dead_letter_error);
            }
        }
        self.dead_letters
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        Err(dead_letter_error(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        )))
    }
}

impl Subscription for TopicSubscription {
    type Delivery = Record;
    type Error = Error;

    fn name(&self) -> &str {
        &self.config.topic
    }

    fn next(&mut self, wait: Duration, _wanted: usize) -> Result<Option<Record>> {
        // librdkafka fetches ahead into its own queue, but a record counts as consumed only
        // once its offset is committed: nothing taken here is lost when the consumer stops.
        // A poll also ends on an event without a record (an offset commit's answer, a
        // rebalance): poll again until the wait is over, and a few times when there is no wait,
        // so that a commit's answer does not end a step while records are at hand.
        let deadline = Instant::now() + wait;
        let mut polls = 0;
        let polled = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            polls += 1;
            match self.consumer.poll(left) {
                Some(polled) => break polled,
                None if left.is_zero() && polls >= 3 => return Ok(None),
                None => {}
            }
        };
        match polled {
            Ok(message) => Ok(Some(Record {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                headers: read_headers(message.headers()),
                payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            })),
            Err(KafkaError::PartitionEOF(_)) => Ok(None),
            Err(source) => Err(self.consume_error(source)),
        }
    }

    fn decode(&self, record: &Record) -> std::result::Result<IncomingMessage, DecodeError> {
        let received = Received::new(record.headers.clone(), record.payload.clone())
            .with_key(record.key.clone())
            .with_topic(self.config.topic.as_str());
        Decoder::new(Binding::Kafka).decode(received)
    }

    /// Commits the offset after the record: the group forgets it.
    fn ack(&mut self, record: Record) -> Result<()> {
        self.commit(record.partition, record.offset + 1)
    }

    fn dead_letter(&mut self, record: &Record, letter: &DeadLetter<'_>) -> Result<()> {
        self.send_dead_letter(record, letter)
    }

    /// Rewinds the record's partition to it, so that it is consumed again before the later
    /// records of its partition.
    fn release(&mut self, record: Record) -> Result<()> {
        self.consumer
            .seek(
                &self.config.topic,
                record.partition,
                Offset::Offset(record.offset),
                self.config.request_timeout,
            )
            .map_err(|source| Error::Seek {
                topic: self.config.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                source: Box::new(source),
            })
    }
}
