//! [`AmqpPublisher`]: the relay's [`Publisher`] for RabbitMQ, with publisher confirms.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind, PublisherConfirm};
use tokio::runtime::Runtime;
use waybill_inbox_core::wire;
use waybill_outbox_core::{OutboxMessage, PublishError, Publisher};

use crate::error::{is_unavailable, lapin_error_is_unavailable};
use crate::fields::{short, to_table};
use crate::link::{self, within, Link};
use crate::{redact, Result};

/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

/// Where a message goes: which exchange, with which routing key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Routing {
    /// One exchange per topic (named like the topic); the routing key is the partition key, so
    /// consumers can bind to all keys (`#` on a topic exchange) or to some of them.
    ExchangePerTopic,
    /// Every message goes to this exchange; the routing key is the topic.
    Exchange(String),
}

/// How an [`AmqpPublisher`] publishes. `Default` plus by-value setters.
///
/// ```
/// use std::time::Duration;
/// use waybill_amqp::{PublisherConfig, Routing};
///
/// let config = PublisherConfig::default()
///     .routing(Routing::Exchange("events".into()))
///     .confirm_timeout(Duration::from_secs(10));
/// # let _ = config;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublisherConfig {
    routing: Routing,
    mandatory: bool,
    declare_exchanges: Option<ExchangeKind>,
    confirm_timeout: Duration,
    connect_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            routing: Routing::ExchangePerTopic,
            mandatory: true,
            declare_exchanges: Some(ExchangeKind::Topic),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl PublisherConfig {
    /// Which exchange and routing key a message gets. Defaults to
    /// [`Routing::ExchangePerTopic`]: exchange = topic, routing key = partition key.
    #[must_use]
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Publishes with the `mandatory` flag, so a message that no queue takes comes back and is
    /// reported as [`PublishError::Fatal`] instead of being dropped by the broker. Defaults to
    /// `true`. With `false`, an unroutable message is confirmed and reported as published.
    #[must_use]
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Declares each exchange (durable, of this kind) once per connection before publishing to
    /// it, or never with `None`. Defaults to `Some(ExchangeKind::Topic)`. An existing exchange
    /// of another kind makes the declaration fail (and the messages retryable): set the kind
    /// the exchanges really have, or `None` when they are managed elsewhere.
    #[must_use]
    pub fn declare_exchanges(mut self, kind: Option<ExchangeKind>) -> Self {
        self.declare_exchanges = kind;
        self
    }

    /// How long a batch waits for the broker's confirms; what is not confirmed by then is
    /// reported retryable and the connection is re-opened. Defaults to 30 seconds.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long connecting (and opening the channel) may take. Defaults to 10 seconds.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// Publishes outbox messages to RabbitMQ with publisher confirms: the relay's [`Publisher`].
///
/// Synchronous: the transport runs lapin on a private tokio runtime. Each batch is published
/// pipelined, then every confirm is awaited, so a batch costs one round trip, not one per
/// message. See the [crate docs](crate) for the field mapping and the ordering caveat.
///
/// ```no_run
/// use waybill_amqp::{AmqpPublisher, PublisherConfig};
/// use waybill_outbox_core::{Publisher, OutboxMessage, MessageId, Status};
///
/// let mut publisher = AmqpPublisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f",
///     PublisherConfig::default())?;
/// let mut message = OutboxMessage::new(1, MessageId::new(), Status::Pending);
/// message.topic = "orders".into();
/// message.partition_key = "order:4231".into();
/// let outcomes = publisher.publish(&[message]);
/// assert_eq!(outcomes.len(), 1);
/// # Ok::<(), waybill_amqp::Error>(())
/// ```
pub struct AmqpPublisher {
    runtime: Runtime,
    state: State,
}

struct State {
    addr: String,
    config: PublisherConfig,
    link: Option<Link>,
    /// Exchanges declared on the current connection.
    declared: HashSet<String>,
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("addr", &redact(&self.state.addr))
            .field("config", &self.state.config)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl AmqpPublisher {
    /// Connects to the broker at `addr` (an `amqp://` or `amqps://` URL) and enables publisher
    /// confirms. Connecting eagerly surfaces a wrong address or refused login at start-up;
    /// after that, the publisher reconnects by itself.
    ///
    /// # Errors
    ///
    /// [`Error::Runtime`](crate::Error::Runtime) when the private runtime cannot start,
    /// [`Error::Amqp`](crate::Error::Amqp) when connecting fails and
    /// [`Error::Timeout`](crate::Error::Timeout) when it takes longer than the connect timeout.
    pub fn connect(addr: &str, config: PublisherConfig) -> Result<Self> {
        let runtime = link::runtime()?;
        let link = runtime.block_on(Link::open(addr, config.connect_timeout))?;
        Ok(Self {
            runtime,
            state: State {
                addr: addr.to_owned(),
                config,
                link: Some(link),
                declared: HashSet::new(),
            },
        })
    }

    /// `true` while the publisher holds an open connection and channel.
    pub fn is_connected(&self) -> bool {
        self.state.link.as_ref().is_some_and(Link::is_open)
    }

    /// Closes the connection under the publisher without telling it, as a broker restart or a
    /// network failure would: the next [`publish`](Publisher::publish) reports the broker
    /// unavailable ([`PublishError::Unavailable`]) and the one after reconnects. A test hook.
    ///
    /// ```no_run
    /// # use waybill_amqp::{AmqpPublisher, PublisherConfig};
    /// let mut publisher = AmqpPublisher::connect("amqp://127.0.0.1:5672/%2f", PublisherConfig::default())?;
    /// publisher.simulate_connection_loss();
    /// assert!(!publisher.is_connected());
    /// # Ok::<(), waybill_amqp::Error>(())
    /// ```
    pub fn simulate_connection_loss(&mut self) {
        if let Some(link) = &self.state.link {
            self.runtime.block_on(link.close());
        }
    }
}

impl Drop for AmqpPublisher {
    fn drop(&mut self) {
        if let Some(link) = self.state.link.take() {
            self.runtime.block_on(link.close());
        }
    }
}

impl Publisher for AmqpPublisher {
    /// Publishes the batch pipelined and then awaits every confirm.
    ///
    /// - confirmed (ack) -> `Ok`
    /// - negatively confirmed (nack), or the channel closed by the broker over what was sent
    ///   (e.g. a missing exchange) -> [`PublishError::Retryable`]
    /// - returned as unroutable (`mandatory`, no queue bound) -> [`PublishError::Fatal`]
    /// - a name longer than AMQP allows (255 bytes) -> [`PublishError::Fatal`]
    /// - the broker cannot be used: connecting fails (refused, timed out, login refused), the
    ///   connection or channel is lost, a confirm does not come within the confirm timeout ->
    ///   [`PublishError::Unavailable`] (the relay charges no attempt and waits) for the first
    ///   unconfirmed message of each partition key, and [`PublishError::NotAttempted`] for the
    ///   rest of that key; the next call reconnects. Messages of other keys left unsent once
    ///   the channel is gone are reported the same way.
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let Self { runtime, state } = self;
        runtime.block_on(state.publish(batch))
    }
}

impl State {
    async fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let mut outcomes: Vec<Result<(), PublishError>> = vec![Ok(()); batch.len()];
        if batch.is_empty() {
            return outcomes;
        }
        // Set once the connection is unusable: every later message fails without being sent,
        // none of them at fault.
        let mut broken = self
            .ensure_link()
            .await
            .err()
            .map(PublishError::Unavailable);
        let mut failed_keys = HashSet::new();
        let mut pending: Vec<(usize, PublisherConfirm)> = Vec::with_capacity(batch.len());

        for (i, message) in batch.iter().enumerate() {
            let key = message.partition_key.as_str();
            if failed_keys.contains(key) {
                outcomes[i] = Err(PublishError::NotAttempted);
                continue;
            }
            if let Some(error) = &broken {
                outcomes[i] = Err(error.clone());
                failed_keys.insert(key);
                continue;
            }
            match self.send(message).await {
                Ok(confirm) => pending.push((i, confirm)),
                Err(Failure::Message(reason)) => {
                    log::error!("message {}: {reason}", message.id);
                    outcomes[i] = Err(PublishError::Fatal(reason));
                    failed_keys.insert(key);
                }
                Err(Failure::Channel {
                    reason,
                    unavailable,
                }) => {
                    log::warn!("message {}: {reason}", message.id);
                    outcomes[i] = Err(if unavailable {
                        PublishError::Unavailable(reason.clone())
                    } else {
                        PublishError::Retryable(reason.clone())
                    });
                    failed_keys.insert(key);
                    broken = Some(PublishError::Unavailable(reason));
                }
            }
        }

        let sent = pending.len();
        let deadline = tokio::time::Instant::now() + self.config.confirm_timeout;
        for (i, confirm) in pending {
            let id = batch[i].id;
            outcomes[i] = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                    let reason = format!(
                        "returned by the broker: {} {} (exchange {:?}, routing key {:?}: no queue bound)",
                        returned.reply_code,
                        returned.reply_text,
                        returned.delivery.exchange.as_str(),
                        returned.delivery.routing_key.as_str(),
                    );
                    log::error!("message {id}: {reason}");
                    Err(PublishError::Fatal(reason))
                }
                Ok(Ok(Confirmation::Nack(None))) => {
                    log::warn!("message {id}: negatively confirmed by the broker");
                    Err(PublishError::Retryable(
                        "negatively confirmed (nack) by the broker".into(),
                    ))
                }
                Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Retryable(
                    "the channel was not in confirm mode".into(),
                )),
                Ok(Err(error)) => {
                    let reason = format!("waiting for the confirm failed: {error}");
                    log::warn!("message {id}: {reason}");
                    broken.get_or_insert(PublishError::Unavailable(reason.clone()));
                    if lapin_error_is_unavailable(&error) {
                        Err(PublishError::Unavailable(reason))
                    } else {
                        Err(PublishError::Retryable(reason))
                    }
                }
                Err(_) => {
                    let reason = format!("not confirmed within {:?}", self.config.confirm_timeout);
                    log::warn!("message {id}: {reason}");
                    broken.get_or_insert(PublishError::Unavailable(reason.clone()));
                    Err(PublishError::Unavailable(reason))
                }
            };
        }
        if broken.is_some() {
            self.disconnect().await;
        }
        log::debug!(
            "published a batch of {}: {sent} sent, {} confirmed",
            batch.len(),
            outcomes.iter().filter(|o| o.is_ok()).count()
        );
        outcomes
    }

    /// Opens a connection when there is none. A connection found closed since the last batch
    /// is a connection loss: reported (retryable) and replaced on the next call.
    async fn ensure_link(&mut self) -> Result<(), String> {
        match &self.link {
            Some(link) if link.is_open() => Ok(()),
            Some(_) => {
                self.disconnect().await;
                Err(
                    "the connection to the broker was lost; reconnecting on the next publish"
                        .into(),
                )
            }
            None => match Link::open(&self.addr, self.config.connect_timeout).await {
                Ok(link) => {
                    self.link = Some(link);
                    Ok(())
                }
                Err(error) => {
                    log::warn!("connecting to {} failed: {error}", redact(&self.addr));
                    Err(format!("connecting to the broker failed: {error}"))
                }
            },
        }
    }

    async fn disconnect(&mut self) {
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        self.declared.clear();
    }

    /// Declares the exchange if needed and sends `message`, without waiting for its confirm.
    async fn send(&mut self, message: &OutboxMessage) -> Result<PublisherConfirm, Failure> {
        let Some(link) = &self.link else {
            return Err(Failure::Channel {
                reason: "not connected".into(),
                unavailable: true,
            });
        };
        let (exchange, routing_key) = match &self.config.routing {
            Routing::ExchangePerTopic => (message.topic.as_str(), message.partition_key.as_str()),
            Routing::Exchange(exchange) => (exchange.as_str(), message.topic.as_str()),
        };
        let (headers, body) = wire::encode(message);
        let properties = properties(message, &headers).map_err(Failure::message)?;
        let exchange_name = short("exchange name", exchange).map_err(Failure::message)?;
        let routing_key = short("routing key", routing_key).map_err(Failure::message)?;

        if let Some(kind) = &self.config.declare_exchanges {
            if !exchange.is_empty() && !self.declared.contains(exchange) {
                within(
                    "declaring an exchange",
                    self.config.connect_timeout,
                    link.channel.exchange_declare(
                        exchange_name.clone(),
                        kind.clone(),
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await
                .map_err(|error| Failure::Channel {
                    reason: format!("declaring exchange {exchange:?} failed: {error}"),
                    unavailable: is_unavailable(&error),
                })?;
                self.declared.insert(exchange.to_owned());
            }
        }
        link.channel
            .basic_publish(
                exchange_name,
                routing_key,
                BasicPublishOptions {
                    mandatory: self.config.mandatory,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .map_err(|error| Failure::Channel {
                reason: format!("publishing failed: {error}"),
                unavailable: lapin_error_is_unavailable(&error),
            })
    }
}

/// Why a message could not be sent.
enum Failure {
    /// This message cannot be published, ever.
    Message(String),
    /// The connection or channel failed; nothing more can be sent on it.
    Channel {
        /// What failed.
        reason: String,
        /// The broker could not be used (rather than refusing what was sent).
        unavailable: bool,
    },
}

impl Failure {
    fn message(error: crate::Error) -> Self {
        Self::Message(error.to_string())
    }
}

/// The AMQP properties of `message`; `headers` are its wire headers.
fn properties(
    message: &OutboxMessage,
    headers: &waybill_outbox_core::Headers,
) -> Result<BasicProperties> {
    Ok(BasicProperties::default()
        .with_message_id(short("message id", message.id.to_string())?)
        .with_type(short("message type", message.message_type.as_str())?)
        .with_content_type(short("content type", message.content_type.as_str())?)
        .with_timestamp(u64::try_from(message.created_at.timestamp()).unwrap_or(0))
        .with_delivery_mode(PERSISTENT)
        .with_headers(to_table(headers)?))
}
