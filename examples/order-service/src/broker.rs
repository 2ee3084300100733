//! The real brokers: which exchange, queue, stream and subject each service uses.
//!
//! Orders' relay publishes topic `orders`, billing's relay topic `payments`. Without a
//! namespace the names are the transports' defaults (AMQP: an exchange per topic, queues
//! bound with `#`; NATS: the subject is the topic, streams `ORDERS` and `PAYMENTS`; Kafka: the
//! topic is the topic, one consumer group per consuming service). A
//! namespace prefixes every name, so several deployments (or tests) share one server.

use std::time::Duration;

use waybill_cli::connect::BrokerArgs;
use waybill_inbox_core::DeliveryHandler;
use waybill_outbox_core::{Publisher, Relay, RelayConfig, RelayHandle, RelayReport, StopHandle};

use crate::db::{AppConnection, DbPool};
use crate::Error;

/// A broker URL, the namespace its names are prefixed with, how soon work a killed process
/// left behind is taken up again, and how the connections are secured (the flags `waybill
/// relay` takes: `--broker-password-file`, `--nats-*`, `--amqp-*`, `--kafka-option`).
#[derive(Clone, Debug)]
pub(crate) struct Broker {
    transport: Transport,
    url: String,
    namespace: Option<String>,
    timing: Timing,
    security: BrokerArgs,
}

/// Which kind of broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// RabbitMQ, `amqp://...`.
    Amqp,
    /// NATS JetStream, `nats://...`.
    Nats,
    /// Kafka, `kafka://HOST:PORT[,HOST:PORT]`.
    Kafka,
}

/// How long a dead process's unfinished work stays reserved for it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// How long a relay's claim on a batch lasts: a killed relay's claimed messages wait this
    /// long before another relay publishes them.
    pub(crate) relay_lease: Duration,
    /// How long NATS waits for a delivery's ack before redelivering it, and Kafka's session
    /// timeout (RabbitMQ redelivers as soon as the consumer's connection drops).
    pub(crate) ack_wait: Duration,
}

impl Broker {
    /// The broker `url` names, secured as `security` says.
    ///
    /// # Errors
    ///
    /// `memory` (only the one-command run has an in-process broker), unknown schemes, and
    /// security flags that do not fit the URL or a password file that cannot be read.
    pub(crate) fn parse(
        url: &str,
        namespace: Option<String>,
        timing: Timing,
        security: BrokerArgs,
    ) -> Result<Self, Error> {
        let transport = if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Transport::Amqp
        } else if url.starts_with("nats://") || url.starts_with("tls://") {
            Transport::Nats
        } else if url.starts_with("kafka://") {
            Transport::Kafka
        } else if url == "memory" {
            return Err(
                "--broker memory works only in the one-command run (no subcommand): \
                 separate processes need amqp://..., nats://... or kafka://..."
                    .into(),
            );
        } else {
            return Err(format!(
                "unknown broker {url:?}: use amqp://..., nats://..., kafka://... or memory"
            )
            .into());
        };
        Ok(Self {
            transport,
            url: security.url(url)?,
            namespace,
            timing,
            security,
        })
    }

    /// Runs a relay from `db`'s outbox to this broker until it is stopped through the handle
    /// given to `started` (or the process ends); returns the relay's totals.
    ///
    /// # Errors
    ///
    /// The broker could not be reached at start.
    pub(crate) fn run_relay<C: AppConnection>(
        &self,
        db: DbPool<C>,
        started: impl FnOnce(RelayHandle),
    ) -> Result<RelayReport, Error> {
        let (url, namespace) = (&self.url, &self.namespace);
        match self.transport {
            Transport::Amqp => {
                let mut config = waybill_amqp::PublisherConfig::default().tls(self.amqp_tls());
                if let Some(namespace) = namespace {
                    config = config.routing(waybill_amqp::Routing::Exchange(exchange(namespace)));
                }
                let publisher = waybill_amqp::AmqpPublisher::connect(url, config)?;
                // A message no queue takes is parked (NO_ROUTE): declare the consumers' queues
                // first, so a relay that starts before its consumers loses nothing.
                for (topic, consumer) in QUEUES {
                    drop(waybill_amqp::AmqpConsumer::connect(
                        url,
                        amqp_queue(namespace.as_deref(), topic, consumer).tls(self.amqp_tls()),
                    )?);
                }
                Ok(self.relay(db, publisher, started))
            }
            Transport::Nats => {
                let mut config = self.nats_publisher();
                if let Some(namespace) = namespace.clone() {
                    config = config.subject_mapping(waybill_nats::SubjectMapping::custom(
                        move |topic, _key| format!("{namespace}.{topic}"),
                    ));
                }
                let publisher = waybill_nats::NatsPublisher::connect(url, config)?;
                ensure_streams(&publisher, namespace.as_deref())?;
                Ok(self.relay(db, publisher, started))
            }
            Transport::Kafka => {
                let brokers = kafka_brokers(url);
                self.ensure_topics(brokers)?;
                let mut config = self.security.kafka_publisher();
                if let Some(namespace) = namespace {
                    config = config.topic_prefix(format!("{namespace}."));
                }
                let publisher = waybill_kafka::KafkaPublisher::connect(brokers, config)?;
                Ok(self.relay(db, publisher, started))
            }
        }
    }

    /// Consumes `topic` as `consumer` (a queue or durable consumer of that name) with
    /// `handler` until `stop` is stopped.
    ///
    /// # Errors
    ///
    /// The broker could not be reached at start, or failed in a way retrying cannot fix.
    pub(crate) fn consume(
        &self,
        topic: &str,
        consumer: &str,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<(), Error> {
        let (url, namespace) = (&self.url, &self.namespace);
        match self.transport {
            Transport::Amqp => {
                let config = amqp_queue(namespace.as_deref(), topic, consumer).tls(self.amqp_tls());
                let mut consumer = waybill_amqp::AmqpConsumer::connect(url, config)?;
                consumer.run(handler, stop)?;
            }
            Transport::Nats => {
                // The stream must exist before a durable consumer can be created on it.
                let publisher = waybill_nats::NatsPublisher::connect(url, self.nats_publisher())?;
                ensure_streams(&publisher, namespace.as_deref())?;
                let config = waybill_nats::ConsumerConfig::new(
                    stream(namespace.as_deref(), topic),
                    consumer,
                )
                .ack_wait(self.timing.ack_wait)
                .connect_options(self.security.nats_options());
                let mut consumer = waybill_nats::NatsConsumer::connect(url, config)?;
                consumer.run(handler, stop)?;
            }
            Transport::Kafka => {
                let brokers = kafka_brokers(url);
                self.ensure_topics(brokers)?;
                // A killed member's partitions move on once its session runs out.
                let config = waybill_kafka::ConsumerConfig::new(
                    subject(namespace.as_deref(), topic),
                    namespaced(namespace.as_deref(), consumer),
                )
                .session_timeout(self.timing.ack_wait.max(Duration::from_secs(1)));
                let config = self.security.kafka_consumer(config);
                let mut consumer = waybill_kafka::KafkaConsumer::connect(brokers, config)?;
                consumer.run(handler, stop)?;
            }
        }
        Ok(())
    }

    fn amqp_tls(&self) -> waybill_amqp::TlsOptions {
        self.security.amqp_tls()
    }

    fn nats_publisher(&self) -> waybill_nats::PublisherConfig {
        waybill_nats::PublisherConfig::default().connect_options(self.security.nats_options())
    }

    /// Kafka topics are `<namespace>.<topic>`, like NATS subjects.
    fn ensure_topics(&self, brokers: &str) -> Result<(), Error> {
        let config = self.security.kafka_publisher();
        for topic in [crate::orders::ORDERS_TOPIC, crate::billing::PAYMENTS_TOPIC] {
            let topic = subject(self.namespace.as_deref(), topic);
            waybill_kafka::ensure_topic_with(
                brokers,
                &topic,
                KAFKA_PARTITIONS,
                config.properties(),
            )?;
        }
        Ok(())
    }

    /// Relays from `db`'s outbox with `publisher` until stopped.
    fn relay<C: AppConnection, P: Publisher>(
        &self,
        db: DbPool<C>,
        publisher: P,
        started: impl FnOnce(RelayHandle),
    ) -> RelayReport {
        let config = RelayConfig::default()
            .poll_interval(Duration::from_millis(200))
            .lease(self.timing.relay_lease);
        let mut relay = Relay::new(waybill_diesel::DieselStore::new(db), publisher, config);
        started(relay.handle());
        let totals = relay.run_pipelined();
        log::info!("relay stopped: {totals:?}");
        totals
    }
}

impl std::fmt::Display for Broker {
    /// The URL without its password, and the namespace.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((user, host)) => {
                    let user = user.split_once(':').map_or(user, |(user, _)| user);
                    format!("{scheme}://{user}:***@{host}")
                }
                None => self.url.clone(),
            },
            None => self.url.clone(),
        };
        match &self.namespace {
            Some(namespace) => write!(f, "{url}, namespace {namespace}"),
            None => f.write_str(&url),
        }
    }
}

/// Who consumes which topic.
const QUEUES: [(&str, &str); 2] = [
    (
        crate::orders::ORDERS_TOPIC,
        crate::billing::BILLING_CONSUMER,
    ),
    (
        crate::billing::PAYMENTS_TOPIC,
        crate::orders::ORDERS_CONSUMER,
    ),
];

/// `consumer`'s queue of `topic`, bound to where the relay publishes it.
fn amqp_queue(
    namespace: Option<&str>,
    topic: &str,
    consumer: &str,
) -> waybill_amqp::ConsumerConfig {
    match namespace {
        None => waybill_amqp::ConsumerConfig::new(format!("{consumer}.{topic}")).bind(topic, "#"),
        Some(ns) => waybill_amqp::ConsumerConfig::new(format!("{ns}.{consumer}.{topic}"))
            .bind(exchange(ns), topic),
    }
}

/// The one exchange of a namespace; the routing key is then the topic.
fn exchange(namespace: &str) -> String {
    format!("{namespace}.waybill")
}

fn stream(namespace: Option<&str>, topic: &str) -> String {
    match namespace {
        None => topic.to_uppercase(),
        Some(ns) => format!("{ns}_{}", topic.to_uppercase()),
    }
}

fn subject(namespace: Option<&str>, topic: &str) -> String {
    match namespace {
        None => topic.to_owned(),
        Some(ns) => format!("{ns}.{topic}"),
    }
}

fn namespaced(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        None => name.to_owned(),
        Some(ns) => format!("{ns}.{name}"),
    }
}

fn kafka_brokers(url: &str) -> &str {
    url.trim_start_matches("kafka://")
}

/// Partitions of each Kafka topic.
const KAFKA_PARTITIONS: i32 = 3;

fn ensure_streams(
    publisher: &waybill_nats::NatsPublisher,
    namespace: Option<&str>,
) -> Result<(), Error> {
    for topic in [crate::orders::ORDERS_TOPIC, crate::billing::PAYMENTS_TOPIC] {
        publisher.ensure_stream(&stream(namespace, topic), &[&subject(namespace, topic)])?;
    }
    Ok(())
}
