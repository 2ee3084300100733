//! Kafka under the contract, and the helpers Kafka's tests share: the broker address, skipping
//! when it is down, topics, and a raw client to put records on a topic and read them back.
//!
//! `KAFKA_BROKERS` (default `127.0.0.1:19092`). An unreachable broker skips the test with a
//! line naming the variable, unless `WAYBILL_REQUIRE_SERVERS=1`, which makes it a failure.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use waybill_inbox_core::RetryPolicy;
use waybill_kafka::{ConsumerConfig, KafkaConsumer, KafkaPublisher, PublisherConfig};
use waybill_outbox_core::{Headers, OutboxMessage};

use crate::{Harness, PATIENCE};

/// The partitions of a harness's topic: several, so that keys spread over partitions.
pub const PARTITIONS: i32 = 3;

/// `KAFKA_BROKERS`, or `None` (the test is skipped) when no broker of it accepts a TCP
/// connection.
///
/// # Panics
///
/// When the broker is unreachable and `WAYBILL_REQUIRE_SERVERS=1`.
pub fn brokers() -> Option<String> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let reachable = brokers.split(',').any(|broker| {
        let broker = broker.trim().trim_start_matches("kafka://");
        broker.to_socket_addrs().is_ok_and(|mut addrs| {
            addrs.any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        })
    });
    if reachable {
        Some(brokers)
    } else {
        crate::skip(
            "Kafka",
            "KAFKA_BROKERS",
            &format!("nothing accepts connections at {brokers}"),
        );
        None
    }
}

/// Creates `topic` with `partitions` partitions.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    waybill_kafka::ensure_topic(brokers, topic, partitions)
        .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
}

/// Deletes `topic`.
pub fn delete_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = runtime
        .block_on(admin.delete_topics(&[topic], &options))
        .expect("delete topics");
    for result in results {
        result.unwrap_or_else(|(t, code)| panic!("deleting topic {t}: {code}"));
    }
}

/// Puts one raw record on `topic` and waits for the broker's acknowledgement.
pub fn produce_raw(brokers: &str, topic: &str, key: Option<&str>, headers: &Headers, value: &[u8]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("raw producer");
    let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v),
        })
    });
    let mut record = BaseRecord::to(topic).payload(value).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer.send(record).map_err(|(e, _)| e).expect("raw send");
    producer.flush(PATIENCE).expect("raw record acknowledged");
}

/// Every record of `topic` up to its end as of now, read from the beginning of each partition
/// without a consumer group.
pub fn read_all(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), PATIENCE)
        .expect("topic metadata");
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for partition in metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions())
    {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition.id(), PATIENCE)
            .expect("watermarks");
        if high > 0 {
            ends.push((partition.id(), high));
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .expect("assignment");
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return records;
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + PATIENCE;
    // Positions, not record offsets: a transaction's commit marker takes an offset of its own
    // that no record has.
    let at_end = |consumer: &BaseConsumer| {
        let positions = consumer.position().expect("positions");
        ends.iter().all(|&(partition, high)| {
            positions
                .find_partition(topic, partition)
                .and_then(|p| p.offset().to_raw())
                .is_some_and(|position| position >= high)
        })
    };
    while !at_end(&consumer) {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: stalled after {} records",
            records.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            records.push(message.expect("raw fetch").detach());
        }
    }
    records
}

/// A header of a record as text.
pub fn header(record: &OwnedMessage, name: &str) -> Option<String> {
    record
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A topic with [`PARTITIONS`] partitions, a consumer group and its dead-letter topic, all
/// named for one test.
#[derive(Debug)]
pub struct KafkaHarness {
    brokers: String,
    topic: String,
    group: String,
    dead_letter_topic: String,
}

impl KafkaHarness {
    /// A harness on fresh topics, or `None` when the broker is unreachable (see [`brokers`]).
    pub fn new() -> Option<Self> {
        let brokers = brokers()?;
        let topic = crate::unique("orders");
        create_topic(&brokers, &topic, PARTITIONS);
        Some(Self {
            dead_letter_topic: format!("{topic}.dead"),
            group: crate::unique("billing"),
            topic,
            brokers,
        })
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The consumer configuration the harness's consumers use.
    pub fn consumer_config(&self, retry: RetryPolicy) -> ConsumerConfig {
        ConsumerConfig::new(&self.topic, &self.group)
            .retry(retry)
            .batch(100, Duration::from_millis(200))
    }
}

impl Harness for KafkaHarness {
    type Publisher = KafkaPublisher;
    type Consumer = KafkaConsumer;

    fn name(&self) -> &'static str {
        "Kafka"
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn publisher(&mut self) -> KafkaPublisher {
        KafkaPublisher::connect(&self.brokers, PublisherConfig::default()).expect("publisher")
    }

    fn consumer(&mut self, retry: RetryPolicy) -> KafkaConsumer {
        KafkaConsumer::connect(&self.brokers, self.consumer_config(retry)).expect("consumer")
    }

    /// Killed by leaving the group, as a crashed process's connection would. (A member stuck in
    /// its handler would be dropped after `max.poll.interval.ms` on Kafka; tansu keeps waiting
    /// for it while its client heartbeats.)
    fn consumer_to_kill(&mut self) -> (KafkaConsumer, crate::contract::Kill) {
        let consumer = self.consumer(RetryPolicy::default());
        let kill = consumer.close_handle();
        (consumer, Box::new(move || kill.close()))
    }

    fn publish_raw(&mut self, headers: Headers, payload: Vec<u8>) {
        produce_raw(&self.brokers, &self.topic, None, &headers, &payload);
    }

    fn dead_letters(&mut self) -> Vec<String> {
        read_all(&self.brokers, &self.dead_letter_topic)
            .iter()
            .map(|r| header(r, waybill_kafka::DEAD_LETTER_REASON).unwrap_or_default())
            .collect()
    }

    /// Deletes the dead-letter topic: the consumer's dead-letter producer never creates a
    /// topic, so dead letters fail until it is back.
    fn break_dead_letters(&mut self) -> bool {
        delete_topic(&self.brokers, &self.dead_letter_topic);
        true
    }

    fn mend_dead_letters(&mut self) {
        create_topic(&self.brokers, &self.dead_letter_topic, 1);
    }

    /// A record over the producer's `message.max.bytes` (1,000,000 bytes).
    fn poison(&mut self) -> Option<OutboxMessage> {
        let mut poison = crate::contract::message(&self.topic, "p", 2);
        poison.payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(1_100_000)).into_bytes();
        Some(poison)
    }
}
