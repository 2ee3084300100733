//! The real brokers, with every name prefixed by the run's namespace so runs never collide.

use std::time::Duration;

use waybill_cli::connect::BrokerArgs;
use waybill_inbox_core::DeliveryHandler;
use waybill_outbox_core::{Publisher, StopHandle};

use crate::pipeline::{PUBLISH_TIMEOUT, TOPIC};
use crate::Error;

/// Which broker a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// RabbitMQ, `amqp://...`.
    Amqp,
    /// NATS JetStream, `nats://...`.
    Nats,
    /// Kafka, `kafka://...`: a private broker per run (see `kafka_broker`).
    Kafka,
    /// The in-process broker, `memory`.
    Memory,
}

impl Kind {
    /// The broker `url` names.
    ///
    /// # Errors
    ///
    /// Unknown schemes.
    pub(crate) fn of(url: &str) -> Result<Self, Error> {
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Self::Amqp)
        } else if url.starts_with("nats://") || url.starts_with("tls://") {
            Ok(Self::Nats)
        } else if url.starts_with("kafka://") {
            Ok(Self::Kafka)
        } else if url == "memory" {
            Ok(Self::Memory)
        } else {
            Err(format!(
                "unknown broker {}: use amqp://..., nats://..., kafka://... or memory",
                waybill_amqp::redact(url)
            )
            .into())
        }
    }
}

/// A real broker at `url`, its names prefixed by `namespace`, connected to as `security` says.
#[derive(Clone, Debug)]
pub(crate) struct Broker {
    kind: Kind,
    url: String,
    namespace: String,
    security: BrokerArgs,
}

impl Broker {
    /// The broker at `url` (AMQP, NATS or Kafka), with the password of
    /// `--broker-password-file` filled in and the TLS and credential flags of `security`.
    ///
    /// # Errors
    ///
    /// `memory` and unknown schemes, flags that do not fit the URL, an unreadable password
    /// file, and `--kafka-option` (a Kafka run uses a private broker of its own).
    pub(crate) fn new(url: &str, namespace: &str, security: &BrokerArgs) -> Result<Self, Error> {
        let kind = Kind::of(url)?;
        if kind == Kind::Memory {
            return Err("the in-process broker cannot span processes".into());
        }
        if kind == Kind::Kafka && !security.kafka.kafka_options.is_empty() {
            return Err(
                "--kafka-option does not apply: a Kafka run starts a private broker".into(),
            );
        }
        Ok(Self {
            kind,
            url: security.url(url)?,
            namespace: namespace.to_owned(),
            security: BrokerArgs {
                broker_password_file: None, // filled into the URL
                ..security.clone()
            },
        })
    }

    /// The TLS and credential flags, for a worker process (its URL carries the password).
    pub(crate) fn security_args(&self) -> Vec<std::ffi::OsString> {
        self.security.to_args(false)
    }

    /// The broker's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Which broker it is.
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The same broker at another URL (a private Kafka broker's own address).
    pub(crate) fn at(&self, url: String) -> Self {
        Self {
            url,
            ..self.clone()
        }
    }

    /// Declares the queue or stream, so nothing published before the consumer starts is lost.
    ///
    /// # Errors
    ///
    /// The broker is unreachable or refused.
    pub(crate) fn setup(&self) -> Result<(), Error> {
        match self.kind {
            Kind::Amqp => drop(waybill_amqp::AmqpConsumer::connect(
                &self.url,
                self.amqp_queue().tls(self.security.amqp_tls()),
            )?),
            Kind::Nats => self
                .nats_publisher()?
                .ensure_stream(&self.stream(), &[&self.subject()])?,
            Kind::Kafka => {
                waybill_kafka::ensure_topic(self.kafka_brokers(), TOPIC, KAFKA_PARTITIONS)?
            }
            Kind::Memory => {}
        }
        Ok(())
    }

    /// Deletes the run's queues, exchanges or streams (dead-letter ones included), so runs
    /// leave nothing behind on a shared broker.
    ///
    /// # Errors
    ///
    /// The broker is unreachable or refused.
    pub(crate) fn teardown(&self) -> Result<(), Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match self.kind {
            Kind::Amqp => runtime.block_on(async {
                use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                let config = self.amqp_queue();
                let connection =
                    lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
                        .await?;
                let channel = connection.create_channel().await?;
                for queue in [
                    config.queue_name().to_owned(),
                    config.dead_letter_queue_name(),
                ] {
                    let queue = lapin::types::ShortString::try_new(queue)?;
                    channel
                        .queue_delete(queue, QueueDeleteOptions::default())
                        .await?;
                }
                for exchange in [self.exchange(), config.dead_letter_exchange_name()] {
                    let exchange = lapin::types::ShortString::try_new(exchange)?;
                    channel
                        .exchange_delete(exchange, ExchangeDeleteOptions::default())
                        .await?;
                }
                connection.close(0, "audit done".into()).await?;
                Ok::<_, Error>(())
            }),
            Kind::Nats => runtime.block_on(async {
                let jetstream = async_nats::jetstream::new(async_nats::connect(&self.url).await?);
                let dead = self.nats_consumer().dead_letter_stream_name();
                for stream in std::iter::once(self.stream()).chain(dead) {
                    jetstream.delete_stream(&stream).await?;
                }
                Ok(())
            }),
            // The private broker's data goes with it.
            Kind::Kafka | Kind::Memory => Ok(()),
        }
    }

    /// A publisher for a relay.
    ///
    /// # Errors
    ///
    /// The broker is unreachable.
    pub(crate) fn publisher(&self) -> Result<Box<dyn Publisher>, Error> {
        Ok(match self.kind {
            Kind::Amqp => Box::new(waybill_amqp::AmqpPublisher::connect(
                &self.url,
                waybill_amqp::PublisherConfig::default()
                    .tls(self.security.amqp_tls())
                    .routing(waybill_amqp::Routing::Exchange(self.exchange()))
                    .connect_timeout(PUBLISH_TIMEOUT)
                    .confirm_timeout(PUBLISH_TIMEOUT),
            )?),
            Kind::Kafka => Box::new(waybill_kafka::KafkaPublisher::connect(
                self.kafka_brokers(),
                waybill_kafka::PublisherConfig::default()
                    .delivery_timeout(PUBLISH_TIMEOUT)
                    .probe_timeout(PUBLISH_TIMEOUT),
            )?),
            Kind::Nats | Kind::Memory => Box::new(self.nats_publisher()?),
        })
    }

    /// Consumes the audit topic with `handler` until `stop` is stopped.
    ///
    /// # Errors
    ///
    /// The broker could not be reached at start, or failed in a way retrying cannot fix.
    pub(crate) fn consume(
        &self,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<(), Error> {
        match self.kind {
            Kind::Amqp => {
                let config = self
                    .amqp_queue()
                    .tls(self.security.amqp_tls())
                    .max_reconnect_delay(Duration::from_secs(1))
                    .connect_timeout(Duration::from_secs(5));
                let mut consumer = waybill_amqp::AmqpConsumer::connect(&self.url, config)?;
                consumer.run(handler, stop)?;
            }
            Kind::Kafka => {
                // A restarted member takes the partitions over once the killed one's session
                // ran out; records it had not committed come back in their place.
                // tansu answers a fetch only after `fetch.wait.max.ms` (500 ms by default) when
                // a partition holds little, however much is waiting elsewhere: the relays' small
                // batches then arrive at a few dozen a second.
                let config = waybill_kafka::ConsumerConfig::new(TOPIC, CONSUMER_NAME)
                    .max_poll_interval(Duration::from_secs(30))
                    .set("fetch.wait.max.ms", "10");
                let mut consumer =
                    waybill_kafka::KafkaConsumer::connect(self.kafka_brokers(), config)?;
                consumer.run(handler, stop)?;
            }
            Kind::Nats | Kind::Memory => {
                let mut consumer =
                    waybill_nats::NatsConsumer::connect(&self.url, self.nats_consumer())?;
                consumer.run(handler, stop)?;
            }
        }
        Ok(())
    }

    fn nats_consumer(&self) -> waybill_nats::ConsumerConfig {
        // One unacknowledged delivery at a time: a crashed consumer's delivery is then
        // redelivered before any later one, which keeps per-key order.
        waybill_nats::ConsumerConfig::new(self.stream(), CONSUMER_NAME)
            .ack_wait(Duration::from_secs(2))
            .max_ack_pending(1)
            .batch_size(1)
            .connect_options(self.security.nats_options())
    }

    fn nats_publisher(&self) -> Result<waybill_nats::NatsPublisher, Error> {
        let namespace = self.namespace.clone();
        // The publisher keeps one message per key in flight, so a message whose ack is lost (a
        // cut connection) stops its key before a later one is sent.
        let config = waybill_nats::PublisherConfig::default()
            .connect_options(self.security.nats_options())
            .ack_timeout(PUBLISH_TIMEOUT)
            .subject_mapping(waybill_nats::SubjectMapping::custom(move |topic, _key| {
                format!("{namespace}.{topic}")
            }));
        Ok(waybill_nats::NatsPublisher::connect(&self.url, config)?)
    }

    fn kafka_brokers(&self) -> &str {
        self.url.trim_start_matches("kafka://")
    }

    fn amqp_queue(&self) -> waybill_amqp::ConsumerConfig {
        waybill_amqp::ConsumerConfig::new(format!("{}.{TOPIC}", self.namespace))
            .bind(self.exchange(), TOPIC)
    }

    fn exchange(&self) -> String {
        format!("{}.waybill", self.namespace)
    }

    fn stream(&self) -> String {
        format!("{}_{}", self.namespace, TOPIC).to_uppercase()
    }

    fn subject(&self) -> String {
        format!("{}.{TOPIC}", self.namespace)
    }
}

const CONSUMER_NAME: &str = "audit";
/// Partitions of the Kafka topic: several, so keys spread and a partition's order is tested.
const KAFKA_PARTITIONS: i32 = 4;
