//! The real brokers: which exchange, queue, stream and subject each service uses.
//!
//! Orders' relay publishes topic `orders`, billing's relay topic `payments`. Without a
//! namespace the names are the transports' defaults (AMQP: an exchange per topic, queues
//! bound with `#`; NATS: the subject is the topic, streams `ORDERS` and `PAYMENTS`). A
//! namespace prefixes every name, so several deployments (or tests) share one server.

use std::sync::atomic::AtomicBool;

use waybill_inbox_core::DeliveryHandler;
use waybill_outbox_core::{Publisher, Relay, RelayConfig};

use crate::db::{AppConnection, DbPool};
use crate::Error;

/// A broker URL and the namespace its names are prefixed with.
#[derive(Clone, Debug)]
pub(crate) enum Broker {
    /// RabbitMQ, `amqp://...`.
    Amqp {
        /// The address.
        url: String,
        /// The name prefix, if any.
        namespace: Option<String>,
    },
    /// NATS JetStream, `nats://...`.
    Nats {
        /// The server URL.
        url: String,
        /// The name prefix, if any.
        namespace: Option<String>,
    },
}

impl Broker {
    /// The broker `url` names.
    ///
    /// # Errors
    ///
    /// `memory` (only the embedded mode has an in-process broker) and unknown schemes.
    pub(crate) fn parse(url: &str, namespace: Option<String>) -> Result<Self, Error> {
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Self::Amqp {
                url: url.to_owned(),
                namespace,
            })
        } else if url.starts_with("nats://") {
            Ok(Self::Nats {
                url: url.to_owned(),
                namespace,
            })
        } else if url == "memory" {
            Err(
                "--broker memory works only in the embedded mode (no subcommand): \
                 separate processes need amqp://... or nats://..."
                    .into(),
            )
        } else {
            Err(format!("unknown broker {url:?}: use amqp://..., nats://... or memory").into())
        }
    }

    /// Runs a relay from `db`'s outbox to this broker until the process ends.
    ///
    /// # Errors
    ///
    /// The broker could not be reached at start.
    pub(crate) fn run_relay<C: AppConnection>(&self, db: DbPool<C>) -> Result<(), Error> {
        match self {
            Self::Amqp { url, namespace } => {
                let mut config = waybill_amqp::PublisherConfig::default();
                if let Some(namespace) = namespace {
                    config = config.routing(waybill_amqp::Routing::Exchange(exchange(namespace)));
                }
                let publisher = waybill_amqp::AmqpPublisher::connect(url, config)?;
                // A message no queue takes is parked (NO_ROUTE): declare the consumers' queues
                // first, so a relay that starts before its consumers loses nothing.
                for (topic, consumer) in QUEUES {
                    drop(waybill_amqp::AmqpConsumer::connect(
                        url,
                        amqp_queue(namespace.as_deref(), topic, consumer),
                    )?);
                }
                relay_forever(db, publisher);
            }
            Self::Nats { url, namespace } => {
                let mut config = waybill_nats::PublisherConfig::default();
                if let Some(namespace) = namespace.clone() {
                    config = config.subject_mapping(waybill_nats::SubjectMapping::custom(
                        move |topic, _key| format!("{namespace}.{topic}"),
                    ));
                }
                let publisher = waybill_nats::NatsPublisher::connect(url, config)?;
                ensure_streams(&publisher, namespace.as_deref())?;
                relay_forever(db, publisher);
            }
        }
        Ok(())
    }

    /// Consumes `topic` as `consumer` (a queue or durable consumer of that name) with
    /// `handler` until `stop` is set.
    ///
    /// # Errors
    ///
    /// The broker could not be reached at start, or failed in a way retrying cannot fix.
    pub(crate) fn consume(
        &self,
        topic: &str,
        consumer: &str,
        handler: &mut impl DeliveryHandler,
        stop: &AtomicBool,
    ) -> Result<(), Error> {
        match self {
            Self::Amqp { url, namespace } => {
                let config = match namespace {
                    None => waybill_amqp::ConsumerConfig::new(format!("{consumer}.{topic}"))
                        .bind(topic, "#"),
                    Some(ns) => {
                        waybill_amqp::ConsumerConfig::new(format!("{ns}.{consumer}.{topic}"))
                            .bind(exchange(ns), topic)
                    }
                };
                waybill_amqp::AmqpConsumer::connect(url, config)?.run(handler, stop)?;
            }
            Self::Nats { url, namespace } => {
                // The stream must exist before a durable consumer can be created on it.
                let publisher = waybill_nats::NatsPublisher::connect(
                    url,
                    waybill_nats::PublisherConfig::default(),
                )?;
                ensure_streams(&publisher, namespace.as_deref())?;
                let config = waybill_nats::ConsumerConfig::new(
                    stream(namespace.as_deref(), topic),
                    consumer,
                );
                waybill_nats::NatsConsumer::connect(url, config)?.run(handler, stop)?;
            }
        }
        Ok(())
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

fn ensure_streams(
    publisher: &waybill_nats::NatsPublisher,
    namespace: Option<&str>,
) -> Result<(), Error> {
    for topic in [crate::orders::ORDERS_TOPIC, crate::billing::PAYMENTS_TOPIC] {
        publisher.ensure_stream(&stream(namespace, topic), &[&subject(namespace, topic)])?;
    }
    Ok(())
}

fn relay_forever<C: AppConnection, P: Publisher>(db: DbPool<C>, publisher: P) {
    let mut relay = Relay::new(
        waybill_diesel::DieselStore::new(db),
        publisher,
        RelayConfig::default().poll_interval(std::time::Duration::from_millis(200)),
    );
    let totals = relay.run();
    log::info!("relay stopped: {totals:?}");
}
