//! [`KafkaPublisher`]: the outbox relay's [`Publisher`] for Kafka.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, PurgeConfig};
use waybill_inbox_core::wire::{Binding, Encoder};
use waybill_outbox_core::{OutboxMessage, PublishError, Publisher};

use crate::delivery::{record_headers, wire_size, DeliveryContext, Tag};
use crate::{Bootstrap, Error, Result};
use waybill_outbox_core::error_chain;

/// How a [`KafkaPublisher`] publishes. `Default` gives the documented defaults.
///
/// ```
/// use std::time::Duration;
/// use waybill_kafka::PublisherConfig;
///
/// let config = PublisherConfig::default()
///     .delivery_timeout(Duration::from_secs(20))
///     .max_message_bytes(4 * 1024 * 1024)
///     .set("client.id", "orders-relay");
/// assert_eq!(config.max_message_bytes_in_force(), 4 * 1024 * 1024);
/// let fenced = PublisherConfig::default().transactional("orders-relay-0");
/// assert_eq!(fenced.transactional_id(), Some("orders-relay-0"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PublisherConfig {
    delivery_timeout: Duration,
    max_message_bytes: usize,
    linger: Duration,
    probe_timeout: Duration,
    transactional_id: Option<String>,
    transaction_timeout: Duration,
    topic_prefix: String,
    properties: BTreeMap<String, String>,
    source: Option<String>,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            delivery_timeout: Duration::from_secs(10),
            max_message_bytes: 1_000_000,
            linger: Duration::from_millis(1),
            probe_timeout: Duration::from_secs(5),
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
            topic_prefix: String::new(),
            properties: BTreeMap::new(),
            source: None,
        }
    }
}

impl fmt::Debug for PublisherConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherConfig")
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("linger", &self.linger)
            .field("probe_timeout", &self.probe_timeout)
            .field("transactional_id", &self.transactional_id)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("topic_prefix", &self.topic_prefix)
            .field("properties", &crate::redacted(&self.properties))
            .field("source", &self.source)
            .finish()
    }
}

impl PublisherConfig {
    /// How long librdkafka may take to deliver a record, its retries included
    /// (`message.timeout.ms`); a record not acknowledged by then fails as
    /// [`PublishError::Unavailable`]. Keep it well below the relay's lease. Defaults to 10
    /// seconds.
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The largest record the producer sends (`message.max.bytes`); a bigger one is refused
    /// before sending, as [`PublishError::Fatal`] naming both sizes, and parked by the relay.
    /// Match it to the brokers' `message.max.bytes` (or the topic's `max.message.bytes`).
    /// Defaults to 1,000,000 bytes, librdkafka's and Kafka's default.
    #[must_use]
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes.max(1000);
        self
    }

    /// How long librdkafka waits to fill a request before sending it (`linger.ms`). A key has
    /// at most one record awaiting its acknowledgement (see the crate docs on ordering), so
    /// each further record of a key in a batch costs a round trip plus this. Defaults to 1 ms.
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How long a publish waits for a metadata answer when librdkafka last reported every
    /// broker down (and before the first batch), before reporting the whole batch
    /// [`PublishError::Unavailable`] without sending anything. Defaults to 5 seconds.
    #[must_use]
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// Publishes each batch as one Kafka transaction of the producer with this
    /// `transactional.id` (see the crate docs on fencing). A producer that starts with the
    /// same id fences this one: from then on its batches fail as
    /// [`PublishError::Unavailable`], never charged to a message. Give each relay slot a
    /// stable id (e.g. `orders-relay-0`), so the relay that takes a slot over fences its
    /// predecessor. Defaults to no transactions (idempotent, non-transactional).
    #[must_use]
    pub fn transactional(mut self, transactional_id: impl Into<String>) -> Self {
        self.transactional_id = Some(transactional_id.into());
        self
    }

    /// How long a transaction may stay open before the broker aborts it
    /// (`transaction.timeout.ms`); at least the [delivery timeout](Self::delivery_timeout),
    /// which bounds how long initialising, committing or aborting a transaction may take.
    /// Defaults to 60 seconds.
    #[must_use]
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Publishes each message to the Kafka topic `prefix` + its outbox topic, e.g.
    /// `staging.` so that several environments (or test runs) share one cluster. Consumers
    /// subscribe to the prefixed name. Defaults to no prefix.
    #[must_use]
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// The CloudEvents `source` written on every record (`ce_source`): a URI reference naming
    /// this producer, e.g. `https://shop.example/orders-service`; consumers treat `source` +
    /// `id` as unique. Defaults to `urn:waybill:<topic>` of each message.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets any other librdkafka producer property (security, `client.id`, compression). The
    /// publisher's guarantees override it for `acks`, `enable.idempotence`,
    /// `transactional.id`, `message.timeout.ms` and `message.max.bytes`. Defaults to none.
    /// Values of properties whose name mentions a password, secret or key are not shown by
    /// `Debug`.
    #[must_use]
    pub fn set(mut self, property: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(property.into(), value.into());
        self
    }

    /// The `message.max.bytes` in force.
    pub fn max_message_bytes_in_force(&self) -> usize {
        self.max_message_bytes
    }

    /// The `transactional.id` in force, if transactional.
    pub fn transactional_id(&self) -> Option<&str> {
        self.transactional_id.as_deref()
    }

    /// The librdkafka properties set with [`set`](Self::set), for the clients a relay makes
    /// besides the producer ([`ensure_topic_with`](crate::ensure_topic_with)).
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    fn client_config(&self, brokers: &Bootstrap) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        brokers
            .apply(&mut config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("max.in.flight.requests.per.connection", "5")
            .set("message.timeout.ms", millis(self.delivery_timeout))
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .set("linger.ms", millis(self.linger));
        if let Some(id) = &self.transactional_id {
            config.set("transactional.id", id).set(
                "transaction.timeout.ms",
                millis(self.transaction_timeout.max(self.delivery_timeout)),
            );
        }
        config
    }
}

/// How long one wait for delivery reports lasts (see `send_per_key`).
const POLL_SLICE: Duration = Duration::from_millis(1);

/// Whole milliseconds, as librdkafka takes durations.
pub(crate) fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Publishes outbox messages to Kafka, for [`waybill_outbox_core::Relay`].
///
/// Each message becomes a record of its topic with the partition key as record key (Kafka's
/// partitioner keeps a key on one partition), the payload as value and the
/// [`wire`](waybill_inbox_core::wire) metadata (CloudEvents binary mode: `ce_id`, `ce_source`,
/// `ce_type`, ..., `content-type`) and sender headers as record headers. The
/// producer is idempotent with `acks=all`; a message is confirmed only once the broker
/// acknowledged its record. See the crate docs on ordering and fencing.
///
/// ```no_run
/// use waybill_kafka::{KafkaPublisher, PublisherConfig};
/// use waybill_outbox_core::{MessageId, OutboxMessage, Publisher, Status};
///
/// let mut publisher = KafkaPublisher::connect("127.0.0.1:19092", PublisherConfig::default())?;
/// let mut msg = OutboxMessage::new(1, MessageId::new(), Status::Pending);
/// msg.topic = "orders".into();
/// msg.partition_key = "order-42".into();
/// msg.message_type = "OrderPlaced".into();
/// assert!(publisher.publish(&[msg]).iter().all(Result::is_ok));
/// # Ok::<(), waybill_kafka::Error>(())
/// ```
pub struct KafkaPublisher {
    producer: BaseProducer<DeliveryContext>,
    config: PublisherConfig,
    /// The bootstrap servers and credentials as librdkafka takes them.
    servers: Bootstrap,
    /// The same, passwords redacted, for logs.
    brokers: String,
    generation: u64,
    transactions: Transactions,
    encoder: Encoder,
}

/// Where a transactional producer is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Transactions {
    /// Not transactional.
    Off,
    /// `init_transactions` has not succeeded yet.
    Uninitialised,
    /// Ready for a transaction.
    Ready,
    /// Another producer with the same `transactional.id` took over: this one is done for good.
    Fenced(String),
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("brokers", &self.brokers)
            .field("config", &self.config)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// Creates the producer for the cluster at `brokers` (`host:port`, comma-separated for
    /// several). No connection is made yet: librdkafka connects in the background and
    /// reconnects by itself, and the first [`publish`](Publisher::publish) checks that a
    /// broker answers.
    ///
    /// # Errors
    ///
    /// [`Error::Client`] when librdkafka refuses the configuration.
    pub fn connect(brokers: &str, config: PublisherConfig) -> Result<Self> {
        let brokers_shown = waybill_outbox_core::redact_url(brokers);
        let servers = Bootstrap::parse(brokers);
        let producer = create_producer(&config, &servers, &brokers_shown)?;
        let transactions = if config.transactional_id.is_some() {
            Transactions::Uninitialised
        } else {
            Transactions::Off
        };
        log::debug!("Kafka publisher for {brokers_shown} created");
        let encoder = match &config.source {
            Some(source) => Encoder::new(Binding::Kafka).with_source(source.as_str()),
            None => Encoder::new(Binding::Kafka),
        };
        Ok(Self {
            encoder,
            producer,
            config,
            servers,
            brokers: brokers_shown,
            generation: 0,
            transactions,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    /// `true` once another producer with the same `transactional.id` fenced this one: it
    /// publishes nothing any more (every batch is [`PublishError::Unavailable`]).
    pub fn is_fenced(&self) -> bool {
        matches!(self.transactions, Transactions::Fenced(_))
    }

    /// Checks that a broker answers a metadata request within the
    /// [probe timeout](PublisherConfig::probe_timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Unreachable`].
    pub fn probe(&self) -> Result<()> {
        let timeout = self.config.probe_timeout;
        self.producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(|source| Error::Unreachable {
                brokers: self.brokers.clone(),
                timeout,
                source: Box::new(source),
            })?;
        self.producer.context().broker_up();
        Ok(())
    }

    fn publish_batch(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        // Serves error events (every broker down) that arrived since the last batch.
        self.producer.poll(Duration::ZERO);
        if let Transactions::Fenced(why) = &self.transactions {
            return none_published(batch, &PublishError::Unavailable(why.clone()));
        }
        if let Err(error) = self.replace_if_broken() {
            return none_published(batch, &error);
        }
        if self.producer.context().all_brokers_down() {
            if let Err(error) = self.probe() {
                let error = error_chain(&error);
                log::warn!(
                    "Kafka unreachable: {} messages not published: {error}",
                    batch.len()
                );
                return none_published(batch, &PublishError::Unavailable(error));
            }
        }
        self.generation += 1;
        let outcomes = if self.transactions == Transactions::Off {
            self.send_per_key(batch)
        } else {
            self.send_transaction(batch)
        };
        let failed = outcomes
            .iter()
            .zip(batch)
            .filter(|(o, _)| matches!(o, Err(e) if *e != PublishError::NotAttempted))
            .count();
        if let Some((Err(error), msg)) = outcomes
            .iter()
            .zip(batch)
            .find(|(o, _)| matches!(o, Err(e) if *e != PublishError::NotAttempted))
        {
            log::warn!(
                "Kafka at {}: {failed} of {} messages failed, first {}: {error}",
                self.brokers,
                batch.len(),
                msg.id
            );
        }
        log::debug!("published a batch of {} messages to Kafka", batch.len());
        outcomes
    }

    /// An idempotent (non-transactional) producer that hit a fatal error (an unrecoverable
    /// sequence gap) can send nothing any more: it is replaced by a new one. A transactional
    /// producer is not: its fatal error is being fenced, and a new one would fence its
    /// successor in turn.
    fn replace_if_broken(&mut self) -> std::result::Result<(), PublishError> {
        if self.transactions != Transactions::Off {
            return Ok(());
        }
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return Ok(());
        };
        log::error!(
            "the Kafka producer for {} hit a fatal error ({code}: {reason}); replacing it",
            self.brokers
        );
        match create_producer(&self.config, &self.servers, &self.brokers) {
            Ok(producer) => {
                self.producer = producer;
                Ok(())
            }
            Err(error) => Err(PublishError::Unavailable(error_chain(&error))),
        }
    }

    /// Sends `batch` one record per key at a time: a key's next record goes once the previous
    /// one is acknowledged, while the keys travel together (see the crate docs on ordering).
    fn send_per_key(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let mut outcomes: Vec<Result<(), PublishError>> = batch
            .iter()
            .map(|_| Err(PublishError::NotAttempted))
            .collect();
        let (next_in_key, firsts) = key_chains(batch);
        let mut ready: VecDeque<usize> = firsts.into();
        let mut awaiting: HashSet<usize> = HashSet::new();
        // librdkafka reports every record by its message timeout; the margin covers the rest.
        let deadline = Instant::now() + self.config.delivery_timeout + Duration::from_secs(5);
        loop {
            while let Some(i) = ready.pop_front() {
                match self.send(&batch[i], i, deadline) {
                    Ok(()) => {
                        awaiting.insert(i);
                    }
                    // The rest of the key stays `NotAttempted`.
                    Err(error) => outcomes[i] = Err(error),
                }
            }
            if awaiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                // Not expected: librdkafka reports every record by its message timeout.
                self.producer
                    .purge(PurgeConfig::default().queue().inflight());
                for i in awaiting.drain() {
                    outcomes[i] = Err(PublishError::Unavailable(
                        "no delivery report within the delivery timeout".into(),
                    ));
                }
                break;
            }
            // rdkafka's `BaseProducer::poll` serves events until its timeout has passed, not
            // until the first one: a long timeout would add itself to every wave of a batch.
            self.producer.poll(POLL_SLICE);
            if self.producer.context().all_brokers_down() {
                // What is not sent yet is certainly not stored: fail it now rather than at the
                // message timeout. (Records in flight are reported as they end.)
                self.producer.purge(PurgeConfig::default().queue());
            }
            for report in self.producer.context().take_reports() {
                if report.generation != self.generation || !awaiting.remove(&report.index) {
                    continue;
                }
                let i = report.index;
                match report.result {
                    Ok(()) => {
                        outcomes[i] = Ok(());
                        ready.extend(next_in_key[i]);
                    }
                    Err(error) => outcomes[i] = Err(classify(&error)),
                }
            }
        }
        outcomes
    }

    /// Sends `batch` as one transaction: all of it is committed, or none of it.
    fn send_transaction(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        if let Err(error) = self.init_transactions() {
            return none_published(batch, &error);
        }
        // Committing flushes the records (each bounded by the delivery timeout) and then ends
        // the transaction: bounded the same way, to stay within the relay's lease.
        let timeout = self.config.delivery_timeout + Duration::from_secs(5);
        if let Err(error) = self.producer.begin_transaction() {
            let error = self.transaction_failed(&error);
            return none_published(batch, &error);
        }
        let mut outcomes: Vec<Result<(), PublishError>> = batch
            .iter()
            .map(|_| Err(PublishError::NotAttempted))
            .collect();
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut sent = Vec::with_capacity(batch.len());
        let deadline = Instant::now() + self.config.delivery_timeout;
        for (i, msg) in batch.iter().enumerate() {
            if failed_keys.contains(msg.partition_key.as_str()) {
                continue;
            }
            match self.send(msg, i, deadline) {
                Ok(()) => sent.push(i),
                Err(error) => {
                    failed_keys.insert(msg.partition_key.as_str());
                    outcomes[i] = Err(error);
                }
            }
        }
        let committed = self.producer.commit_transaction(timeout);
        // The reports of the records the commit flushed (or the abort purged).
        let mut reports: HashMap<usize, Result<(), KafkaError>> = HashMap::new();
        let generation = self.generation;
        let mut collect = |producer: &BaseProducer<DeliveryContext>| {
            producer.poll(Duration::ZERO);
            for report in producer.context().take_reports() {
                if report.generation == generation {
                    reports.insert(report.index, report.result);
                }
            }
        };
        match committed {
            Ok(()) => {
                collect(&self.producer);
                for i in sent {
                    // Committed: every record of the transaction is stored.
                    outcomes[i] = Ok(());
                }
                outcomes
            }
            Err(error) => {
                let error = self.transaction_failed(&error);
                if self.transactions == Transactions::Ready {
                    if let Err(abort) = self.producer.abort_transaction(timeout) {
                        let abort = self.transaction_failed(&abort);
                        log::warn!("aborting the Kafka transaction failed: {abort}");
                    }
                }
                collect(&self.producer);
                // The record that broke the transaction is charged with its own error; the
                // rest of the batch was aborted with it and goes back uncharged.
                let mut blamed = false;
                for &i in &sent {
                    if let Some(Err(record_error)) = reports.get(&i) {
                        let record_error = classify(record_error);
                        if !matches!(record_error, PublishError::Unavailable(_))
                            && !is_purge(reports.get(&i))
                        {
                            outcomes[i] = Err(record_error);
                            blamed = true;
                        }
                    }
                }
                if !blamed {
                    let mut first_of_key: HashSet<&str> = HashSet::new();
                    for &i in &sent {
                        if first_of_key.insert(batch[i].partition_key.as_str()) {
                            outcomes[i] = Err(error.clone());
                        }
                    }
                }
                outcomes
            }
        }
    }

    /// Initialises the producer's transactions once (fencing older producers of its id).
    fn init_transactions(&mut self) -> std::result::Result<(), PublishError> {
        match &self.transactions {
            Transactions::Uninitialised => {}
            Transactions::Fenced(why) => return Err(PublishError::Unavailable(why.clone())),
            Transactions::Ready | Transactions::Off => return Ok(()),
        }
        match self
            .producer
            .init_transactions(self.config.delivery_timeout + Duration::from_secs(5))
        {
            Ok(()) => {
                self.transactions = Transactions::Ready;
                log::info!(
                    "Kafka producer {} took over its transactional.id (older producers are fenced)",
                    self.config.transactional_id.as_deref().unwrap_or_default()
                );
                Ok(())
            }
            Err(error) => Err(self.transaction_failed(&error)),
        }
    }

    /// What a failed transaction call means for the batch; a fenced producer is marked so.
    fn transaction_failed(&mut self, error: &KafkaError) -> PublishError {
        let id = self.config.transactional_id.clone().unwrap_or_default();
        let fatal = matches!(error, KafkaError::Transaction(e) if e.is_fatal())
            || self.producer.client().fatal_error().is_some();
        if fatal || is_fencing(error) {
            let why = format!(
                "the Kafka producer with transactional.id {id} was fenced by a newer one: {error}"
            );
            if !self.is_fenced() {
                log::error!("{why}; it publishes nothing any more");
            }
            self.transactions = Transactions::Fenced(why.clone());
            return PublishError::Unavailable(why);
        }
        match classify(error) {
            // A transaction refused as a whole is not a message's fault.
            PublishError::Fatal(text) | PublishError::Retryable(text) => {
                PublishError::Unavailable(format!("transaction {id}: {text}"))
            }
            other => other,
        }
    }

    /// Hands one record to librdkafka, waiting (up to `deadline`) while its queue is full.
    fn send(
        &self,
        msg: &OutboxMessage,
        index: usize,
        deadline: Instant,
    ) -> std::result::Result<(), PublishError> {
        let (headers, payload) = self.encoder.encode(msg);
        let pairs = || headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let size = wire_size(msg.partition_key.len(), payload.len(), pairs());
        let max = self.config.max_message_bytes;
        if size > max {
            return Err(PublishError::Fatal(format!(
                "the record is {size} bytes, over the producer's message.max.bytes of {max} bytes"
            )));
        }
        let topic = if self.config.topic_prefix.is_empty() {
            Cow::Borrowed(msg.topic.as_str())
        } else {
            Cow::Owned(format!("{}{}", self.config.topic_prefix, msg.topic))
        };
        let mut record = BaseRecord::with_opaque_to(
            &topic,
            Box::new(Tag {
                generation: self.generation,
                index,
            }),
        )
        .payload(payload.as_slice())
        .key(msg.partition_key.as_bytes())
        .headers(record_headers(pairs()));
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => return Err(classify(&error)),
            }
        }
    }
}

fn create_producer(
    config: &PublisherConfig,
    servers: &Bootstrap,
    brokers_shown: &str,
) -> Result<BaseProducer<DeliveryContext>> {
    config
        .client_config(servers)
        .create_with_context(DeliveryContext::unprobed())
        .map_err(|source| Error::Client {
            what: "producer",
            brokers: brokers_shown.to_owned(),
            source: Box::new(source),
        })
}

/// Each message's successor in its key, and the keys' first messages.
fn key_chains(batch: &[OutboxMessage]) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut last_of_key: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    let mut next_in_key: Vec<Option<usize>> = vec![None; batch.len()];
    let mut firsts = Vec::new();
    for (i, msg) in batch.iter().enumerate() {
        match last_of_key.insert(msg.partition_key.as_str(), i) {
            Some(previous) => next_in_key[previous] = Some(i),
            None => firsts.push(i),
        }
    }
    (next_in_key, firsts)
}

/// The outcomes of a batch of which nothing was published: the first message of each key fails
/// with `error`, the rest of the key was not attempted.
fn none_published(batch: &[OutboxMessage], error: &PublishError) -> Vec<Result<(), PublishError>> {
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

fn is_fencing(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::Transaction(e) => Some(e.code()),
        other => other.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionCoordinatorFenced
        )
    )
}

fn is_purge(report: Option<&Result<(), KafkaError>>) -> bool {
    matches!(
        report,
        Some(Err(e)) if matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
        )
    )
}

/// A failed record's outcome:
///
/// - too large, invalid record -> `Fatal` (no retry helps; the relay parks it);
/// - no broker, transport failure, timeout, purged after the cluster went away, fenced ->
///   `Unavailable` (not the record's fault: the relay charges nothing and pauses);
/// - anything else (authorization, not enough replicas, unknown topic) -> `Retryable`.
fn classify(error: &KafkaError) -> PublishError {
    let text = error_chain(error);
    let code = match error {
        KafkaError::Transaction(e) => Some(e.code()),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage,
        ) => PublishError::Fatal(text),
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::TimedOutQueue
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::PurgeQueue
            | RDKafkaErrorCode::PurgeInflight
            | RDKafkaErrorCode::BrokerDestroy
            | RDKafkaErrorCode::DestroyBroker
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fatal,
        ) => PublishError::Unavailable(text),
        _ => PublishError::Retryable(text),
    }
}

impl Publisher for KafkaPublisher {
    /// Sends the messages of `batch`; see the crate docs on ordering and fencing.
    ///
    /// - acknowledged by the broker (`acks=all`) -> `Ok`; in transactional mode, once the
    ///   batch's transaction committed
    /// - record over `message.max.bytes` (checked before sending), or refused as too large or
    ///   invalid -> `Fatal`
    /// - no broker answers, transport failure, delivery timeout, fenced by a newer
    ///   transactional producer -> `Unavailable`: the relay charges no attempt and pauses
    /// - other refusals -> `Retryable`
    /// - an earlier message of the same key failed, or (transactional) another record aborted
    ///   the transaction -> `NotAttempted`
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.publish_batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use waybill_outbox_core::{MessageId, Status};

    use super::*;

    #[test]
    fn the_bundled_librdkafka_has_tls_and_scram() {
        // Creating the client checks the configuration without connecting: a librdkafka built
        // without OpenSSL refuses SASL_SSL and SCRAM here ("No provider for SASL mechanism").
        for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
            let config = PublisherConfig::default()
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanism", mechanism);
            let connected = KafkaPublisher::connect("kafka://relay:pw@127.0.0.1:1", config);
            let error = connected.err().map(|e| error_chain(&e));
            assert_eq!(error, None, "{mechanism}");
        }
    }

    fn msg(key: &str) -> OutboxMessage {
        let mut msg = OutboxMessage::new(1, MessageId::new(), Status::Pending);
        msg.partition_key = key.into();
        msg
    }

    #[test]
    fn each_key_chains_its_messages_in_batch_order() {
        let batch = [msg("a"), msg("b"), msg("a"), msg("c"), msg("a")];
        let (next, firsts) = key_chains(&batch);
        assert_eq!(firsts, [0, 1, 3]);
        assert_eq!(next, [Some(2), None, Some(4), None, None]);
    }

    #[test]
    fn an_unpublished_batch_charges_only_each_keys_first_message() {
        let batch = [msg("a"), msg("a"), msg("b")];
        let outcomes = none_published(&batch, &PublishError::Unavailable("down".into()));
        assert_eq!(
            outcomes,
            [
                Err(PublishError::Unavailable("down".into())),
                Err(PublishError::NotAttempted),
                Err(PublishError::Unavailable("down".into())),
            ]
        );
    }

    #[test]
    fn size_refusals_are_fatal_and_outages_are_not_the_messages_fault() {
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&big), PublishError::Fatal(_)));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(classify(&timeout), PublishError::Unavailable(_)));
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert!(matches!(classify(&fenced), PublishError::Unavailable(_)));
        let replicas = KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas);
        assert!(matches!(classify(&replicas), PublishError::Retryable(_)));
    }

    #[test]
    fn config_defaults() {
        let config = PublisherConfig::default();
        assert_eq!(config.max_message_bytes_in_force(), 1_000_000);
        assert_eq!(config.transactional_id(), None);
        let client = config.client_config(&Bootstrap::parse("h:1"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("message.timeout.ms"), Some("10000"));
        let secret = PublisherConfig::default().set("sasl.password", "hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
