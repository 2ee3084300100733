//! [`AmqpPublisher`]: the relay's [`Publisher`] for RabbitMQ, with publisher confirms.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ErrorKind, ExchangeKind, PublisherConfirm};
use tokio::runtime::Runtime;
use waybill_inbox_core::wire::{Binding, Encoder};
use waybill_outbox_core::{BrokerLimits, OutboxMessage, PublishError, Publisher, Unroutable};

use crate::error::{is_unavailable, lapin_error_is_unavailable};
use crate::fields::{short, to_table};
use crate::link::{self, within, Link};
use crate::{redact, Error, Result, TlsOptions};

/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

/// What a content header frame carries besides the properties: the frame's type, channel and
/// size (7 bytes) and end marker (1), the class id and weight (2 + 2) and the body size (8).
const CONTENT_HEADER_OVERHEAD: usize = 20;

/// How many times one batch goes on after the broker closed its channel without a culprit
/// (then one message at a time) before the rest is reported unavailable.
const MAX_UNEXPLAINED: u32 = 3;

/// What this transport adds to the properties of every message beyond the header bytes
/// [`BrokerLimits`] counts: the reserved `waybill-*` headers' names, the message id and send
/// time, the property flags, delivery mode and timestamp, and the content type and message type
/// a second time (as properties), at most 255 bytes each. About 780 bytes; rounded up.
const PROPERTIES_RESERVE: usize = 1024;

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
    unroutable: Unroutable,
    declare_exchanges: Option<ExchangeKind>,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    source: Option<String>,
    tls: TlsOptions,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            routing: Routing::ExchangePerTopic,
            mandatory: true,
            unroutable: Unroutable::Retry,
            declare_exchanges: Some(ExchangeKind::Topic),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            source: None,
            tls: TlsOptions::default(),
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
    /// reported as [unroutable](Self::unroutable) instead of being dropped by the broker.
    /// Defaults to `true`. With `false`, an unroutable message is confirmed and reported as
    /// published (and is lost).
    #[must_use]
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// What to report for a message no queue takes (returned with 312 `NO_ROUTE`: no queue is
    /// bound to its exchange for its routing key) or whose exchange does not exist (404
    /// `NOT_FOUND`). Defaults to [`Unroutable::Retry`]: retryable, so the relay retries it with
    /// backoff and delivers it once a queue is bound, and parks it after its max attempts if
    /// none ever is. [`Unroutable::Park`] reports it fatal: parked at once. Either way the
    /// publisher logs one warning per exchange and batch, naming a routing key.
    #[must_use]
    pub fn unroutable(mut self, unroutable: Unroutable) -> Self {
        self.unroutable = unroutable;
        self
    }

    /// Declares each exchange (durable, of this kind) once per connection before publishing to
    /// it, or, with `None`, only checks that it exists (a passive declaration) for exchanges
    /// managed elsewhere. Defaults to `Some(ExchangeKind::Topic)`. An existing exchange of
    /// another kind makes the declaration fail (and its messages retryable): set the kind the
    /// exchanges really have, or `None`. A missing exchange (with `None`) is
    /// [unroutable](Self::unroutable).
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

    /// The CA and client certificate of `amqps://` connections (see [`TlsOptions`]).
    /// Defaults to the system's CA certificates and no client certificate.
    #[must_use]
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// The CloudEvents `source` written on every message (the `ce-source` header): a URI
    /// reference naming this producer, e.g. `https://shop.example/orders-service`; consumers
    /// treat `source` + `id` as unique. Defaults to `urn:waybill:<topic>` of each message.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
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
    /// Exchanges declared (or found) on the current connection.
    declared: HashSet<String>,
    /// The frame size the last connection negotiated, in bytes.
    frame_max: usize,
    encoder: Encoder,
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
        let link = runtime.block_on(Link::open(addr, &config.tls, config.connect_timeout))?;
        Ok(Self {
            runtime,
            state: State {
                encoder: match &config.source {
                    Some(source) => Encoder::new(Binding::Amqp).with_source(source.as_str()),
                    None => Encoder::new(Binding::Amqp),
                },
                addr: addr.to_owned(),
                config,
                frame_max: link.frame_max(),
                link: Some(link),
                declared: HashSet::new(),
            },
        })
    }

    /// The frame size negotiated with the broker (`frame_max`, 128 KiB on RabbitMQ by default),
    /// in bytes. A message's properties and headers travel in one frame, so they must fit in it;
    /// the body is split over as many frames as it needs.
    pub fn frame_max(&self) -> usize {
        self.state.frame_max
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
    /// - negatively confirmed (nack) -> [`PublishError::Retryable`]
    /// - unroutable: returned (`mandatory`, no queue bound), or its exchange does not exist ->
    ///   as [`PublisherConfig::unroutable`] says: retryable by default, or fatal
    /// - properties and headers that do not fit in one frame ([`frame_max`](AmqpPublisher::frame_max)),
    ///   or a name longer than AMQP allows (255 bytes) -> [`PublishError::Fatal`], before
    ///   anything is sent
    /// - the broker closes the channel over a message (e.g. its exchange was deleted, or it is
    ///   larger than the broker's `max_message_size`): the publisher opens a fresh channel and
    ///   sends the rest of the batch again, one message at a time, to find the message at
    ///   fault; only that one is charged (fatal for 406 `PRECONDITION_FAILED`, unroutable for
    ///   404 `NOT_FOUND`, retryable otherwise). A message whose confirm the closed channel lost
    ///   may reach the queue twice: at least once, never lost.
    /// - the broker cannot be used: connecting fails (refused, timed out, login refused), the
    ///   connection is lost, a confirm does not come within the confirm timeout ->
    ///   [`PublishError::Unavailable`] (the relay charges no attempt and waits) for the first
    ///   unconfirmed message of each partition key; the next call reconnects.
    ///
    /// Messages of a key after one that failed in the batch are not sent:
    /// [`PublishError::NotAttempted`].
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let Self { runtime, state } = self;
        runtime.block_on(state.publish(batch))
    }

    /// The most header bytes (see [`BrokerLimits`]) a message may have: the negotiated
    /// [`frame_max`](AmqpPublisher::frame_max) less the frame's overhead and what this
    /// transport adds to every message, so that properties and headers fit in one frame. No
    /// message size limit: the body is split over frames, and RabbitMQ's `max_message_size`
    /// (128 MiB by default) is not told to clients.
    ///
    /// ```no_run
    /// use waybill_amqp::{AmqpPublisher, PublisherConfig};
    /// use waybill_outbox_core::{Limits, Publisher};
    ///
    /// let publisher = AmqpPublisher::connect("amqp://127.0.0.1:5672/%2f", PublisherConfig::default())?;
    /// // Refuse at enqueue time what the broker would refuse at publish time.
    /// let limits = Limits::default().capped_by(publisher.limits());
    /// assert!(limits.header_bytes_limit() < Some(publisher.frame_max()));
    /// # Ok::<(), waybill_amqp::Error>(())
    /// ```
    fn limits(&self) -> BrokerLimits {
        BrokerLimits::default().max_header_bytes(
            self.state
                .frame_max
                .saturating_sub(CONTENT_HEADER_OVERHEAD + PROPERTIES_RESERVE),
        )
    }
}

/// A message ready to send.
struct Prepared {
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
}

/// The outcomes of one batch as they become known, and which keys failed where.
struct Run<'a> {
    batch: &'a [OutboxMessage],
    outcomes: Vec<Option<Result<(), PublishError>>>,
    /// The position of each failed key's first failure: its later messages are not sent.
    failed_at: HashMap<&'a str, usize>,
    /// Unroutable messages per exchange, for one warning each.
    unroutable: BTreeMap<String, Unrouted>,
}

/// The unroutable messages of one exchange in a batch.
struct Unrouted {
    messages: usize,
    routing_keys: BTreeSet<String>,
    /// The first one's reason.
    reason: String,
    /// The exchange does not exist (rather than has no queue bound for the routing key).
    missing: bool,
}

impl<'a> Run<'a> {
    fn new(batch: &'a [OutboxMessage]) -> Self {
        Self {
            batch,
            outcomes: vec![None; batch.len()],
            failed_at: HashMap::new(),
            unroutable: BTreeMap::new(),
        }
    }

    fn key(&self, i: usize) -> &'a str {
        self.batch[i].partition_key.as_str()
    }

    fn is_settled(&self, i: usize) -> bool {
        self.outcomes[i].is_some()
    }

    /// `true` when an earlier message of `i`'s key failed.
    fn is_blocked(&self, i: usize) -> bool {
        self.failed_at.get(self.key(i)).is_some_and(|&at| at < i)
    }

    fn succeed(&mut self, i: usize) {
        self.outcomes[i] = Some(Ok(()));
    }

    fn fail(&mut self, i: usize, error: PublishError) {
        self.outcomes[i] = Some(Err(error));
        let at = self.failed_at.entry(self.key(i)).or_insert(i);
        *at = (*at).min(i);
    }

    /// Fails `i` as unroutable under `policy`, counting it for the warning: its exchange is
    /// `missing`, or has no queue bound for the routing key.
    fn unroutable(
        &mut self,
        i: usize,
        policy: Unroutable,
        (destination, missing): ((&str, &str), bool),
        reason: String,
    ) {
        let (exchange, routing_key) = destination;
        let entry = self
            .unroutable
            .entry(exchange.to_owned())
            .or_insert_with(|| Unrouted {
                messages: 0,
                routing_keys: BTreeSet::new(),
                reason: reason.clone(),
                missing,
            });
        entry.messages += 1;
        entry.routing_keys.insert(routing_key.to_owned());
        self.fail(i, policy.error(reason));
    }

    /// The messages still to send, in batch order; those behind a failure of their key are
    /// settled as not attempted on the way.
    fn unsent(&mut self) -> Vec<usize> {
        let mut todo = Vec::new();
        for i in 0..self.batch.len() {
            if self.is_settled(i) {
                continue;
            }
            if self.is_blocked(i) {
                self.outcomes[i] = Some(Err(PublishError::NotAttempted));
            } else {
                todo.push(i);
            }
        }
        todo
    }

    /// Settles everything unsettled: the first message of each key fails with `error`, the
    /// rest of the key is not attempted.
    fn give_up(&mut self, error: &PublishError) {
        for i in self.unsent() {
            if self.is_blocked(i) {
                self.outcomes[i] = Some(Err(PublishError::NotAttempted));
            } else {
                self.fail(i, error.clone());
            }
        }
    }

    fn finish(self, policy: Unroutable) -> Vec<Result<(), PublishError>> {
        for (exchange, unrouted) in &self.unroutable {
            let then = match policy {
                Unroutable::Park => "they are parked (Unroutable::Park)",
                _ => "the relay retries them with backoff until a queue is bound",
            };
            let mut keys = unrouted.routing_keys.iter();
            let first = keys.next().map(String::as_str).unwrap_or_default();
            let others = match keys.len() {
                0 => String::new(),
                n => format!(" (and {n} other routing keys)"),
            };
            let why = if unrouted.missing {
                "does not exist, so no queue is bound to it"
            } else {
                "has no queue bound"
            };
            log::warn!(
                "exchange {exchange:?} {why} for routing key {first:?}{others}: {} message(s) \
                 unroutable, e.g. {}; {then}",
                unrouted.messages,
                unrouted.reason
            );
        }
        self.outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(PublishError::NotAttempted)))
            .collect()
    }
}

/// Why a round of sends stopped short.
enum Broken {
    /// The broker closed the channel (or the connection) over something that was sent.
    Refused(lapin::Error),
    /// The broker cannot be used (connection lost, no answer in time).
    Unavailable(String),
}

/// What a round of sends ended with.
enum RoundEnd {
    /// Every message sent in the round has its outcome.
    Done,
    /// The broker closed the channel; `culprit` is the message it closed it over, when known.
    Refused {
        culprit: Option<usize>,
        error: lapin::Error,
    },
    /// The broker cannot be used.
    Unavailable(String),
}

impl State {
    async fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let policy = self.config.unroutable;
        let mut run = Run::new(batch);
        if batch.is_empty() {
            return run.finish(policy);
        }
        if let Err(reason) = self.ensure_link().await {
            run.give_up(&PublishError::Unavailable(reason));
            return run.finish(policy);
        }
        let prepared: Vec<Option<Prepared>> = batch
            .iter()
            .enumerate()
            .map(|(i, message)| {
                if run.is_blocked(i) {
                    // Held back by an earlier failure of its key: not attempted.
                    return None;
                }
                match self.prepare(message) {
                    Ok(prepared) => Some(prepared),
                    Err(reason) => {
                        log::error!("message {} cannot be published: {reason}", message.id);
                        run.fail(i, PublishError::Fatal(reason));
                        None
                    }
                }
            })
            .collect();

        let mut refused_any = false;
        let mut outcome = self
            .check_exchanges(&mut run, &prepared, &mut refused_any)
            .await;
        // After the broker closed a channel over a message whose culprit was not known, send one
        // message at a time: the next close names its message.
        let mut one_at_a_time = false;
        let mut unexplained = 0;
        while outcome.is_ok() {
            let todo = run.unsent();
            if todo.is_empty() {
                break;
            }
            outcome = match self
                .send_round(&mut run, &prepared, &todo, one_at_a_time)
                .await
            {
                RoundEnd::Done => Ok(()),
                RoundEnd::Unavailable(reason) => Err(reason),
                RoundEnd::Refused { culprit, error } => {
                    refused_any = true;
                    match culprit {
                        Some(i) => {
                            if let Some(prepared) = &prepared[i] {
                                let (id, reason) = (batch[i].id, refusal_reason(&error));
                                log::warn!("message {id}: the broker closed the channel: {reason}");
                                self.refused(&mut run, i, prepared, &error);
                            }
                            self.reopen().await
                        }
                        // Not known which message (or none: a connection-level error): go
                        // on one message at a time, a few times at most.
                        None if unexplained >= MAX_UNEXPLAINED => {
                            Err(format!("the broker closed the channel: {error}"))
                        }
                        None => {
                            log::debug!(
                                "the broker closed the channel ({error}); sending the rest of \
                                 the batch one message at a time"
                            );
                            unexplained += 1;
                            one_at_a_time = true;
                            self.reopen().await
                        }
                    }
                }
            };
        }
        if let Err(reason) = outcome {
            log::warn!("publishing to {} failed: {reason}", redact(&self.addr));
            run.give_up(&PublishError::Unavailable(reason));
            self.disconnect().await;
        }
        if refused_any {
            // An exchange may have gone: declare (or check) them again next time.
            self.declared.clear();
        }
        let outcomes = run.finish(policy);
        log::debug!(
            "published a batch of {}: {} confirmed",
            batch.len(),
            outcomes.iter().filter(|o| o.is_ok()).count()
        );
        outcomes
    }

    /// Where `message` goes and what it carries, or why it can never be published.
    fn prepare(&self, message: &OutboxMessage) -> Result<Prepared, String> {
        let (exchange, routing_key) = match &self.config.routing {
            Routing::ExchangePerTopic => (message.topic.as_str(), message.partition_key.as_str()),
            Routing::Exchange(exchange) => (exchange.as_str(), message.topic.as_str()),
        };
        short("exchange name", exchange).map_err(|e| e.to_string())?;
        short("routing key", routing_key).map_err(|e| e.to_string())?;
        let (headers, body) = self.encoder.encode(message);
        let properties = properties(message, &headers).map_err(|e| e.to_string())?;
        let size = encoded_len(&properties);
        let room = self.frame_max.saturating_sub(CONTENT_HEADER_OVERHEAD);
        if size > room {
            return Err(format!(
                "its properties and headers encode to {size} bytes, more than the {room} bytes \
                 one frame holds (the broker's frame_max is {} bytes)",
                self.frame_max
            ));
        }
        Ok(Prepared {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties,
            body,
        })
    }

    /// Declares (or, without a kind to declare, checks) every exchange the batch sends to that
    /// was not declared on this connection yet, before anything is sent. The messages to an
    /// exchange the broker refuses fail (the first of each key); the rest go on, on a fresh
    /// channel.
    async fn check_exchanges(
        &mut self,
        run: &mut Run<'_>,
        prepared: &[Option<Prepared>],
        refused_any: &mut bool,
    ) -> Result<(), String> {
        let mut checked = HashSet::new();
        for (i, message) in prepared.iter().enumerate() {
            let Some(message) = message else { continue };
            let exchange = message.exchange.as_str();
            if run.is_settled(i)
                || exchange.is_empty()
                || self.declared.contains(exchange)
                || !checked.insert(exchange)
            {
                continue;
            }
            let Some(link) = &self.link else {
                return Err("not connected".into());
            };
            let declared = within(
                "declaring an exchange",
                self.config.connect_timeout,
                link.channel.exchange_declare(
                    ShortString::from(exchange),
                    self.config
                        .declare_exchanges
                        .clone()
                        .unwrap_or(ExchangeKind::Topic),
                    ExchangeDeclareOptions {
                        passive: self.config.declare_exchanges.is_none(),
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            let error = match declared {
                Ok(()) => {
                    self.declared.insert(exchange.to_owned());
                    continue;
                }
                Err(error) if is_unavailable(&error) => {
                    return Err(format!("declaring exchange {exchange:?} failed: {error}"));
                }
                Err(error) => error,
            };
            *refused_any = true;
            let missing =
                matches!(&error, Error::Amqp(e) if soft_error(e) == Some(AMQPSoftError::NOTFOUND));
            let reason = match &error {
                Error::Amqp(e) if missing => format!(
                    "exchange {exchange:?} does not exist ({})",
                    refusal_reason(e)
                ),
                Error::Amqp(e) => {
                    format!(
                        "declaring exchange {exchange:?} failed: {}",
                        refusal_reason(e)
                    )
                }
                _ => format!("declaring exchange {exchange:?} failed: {error}"),
            };
            if !missing {
                log::warn!("{reason}");
            }
            for (j, other) in prepared.iter().enumerate().skip(i) {
                let Some(other) = other else { continue };
                if other.exchange != exchange || run.is_settled(j) || run.is_blocked(j) {
                    continue;
                }
                if missing {
                    let destination = (exchange, other.routing_key.as_str());
                    run.unroutable(
                        j,
                        self.config.unroutable,
                        (destination, true),
                        reason.clone(),
                    );
                } else {
                    run.fail(j, PublishError::Retryable(reason.clone()));
                }
            }
            self.reopen().await?;
        }
        Ok(())
    }

    /// Sends `todo` (skipping what an earlier failure of its key holds back) and settles what
    /// the broker answered: all pipelined, or one message at a time.
    async fn send_round(
        &self,
        run: &mut Run<'_>,
        prepared: &[Option<Prepared>],
        todo: &[usize],
        one_at_a_time: bool,
    ) -> RoundEnd {
        let Some(link) = &self.link else {
            return RoundEnd::Unavailable("not connected".into());
        };
        let timeout = self.config.confirm_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut pending = Vec::with_capacity(todo.len());
        let mut broken = None;
        for &i in todo {
            let message = match &prepared[i] {
                Some(message) if !run.is_blocked(i) => message,
                _ => {
                    run.outcomes[i] = Some(Err(PublishError::NotAttempted));
                    continue;
                }
            };
            let sent = link
                .channel
                .basic_publish(
                    ShortString::from(message.exchange.as_str()),
                    ShortString::from(message.routing_key.as_str()),
                    BasicPublishOptions {
                        mandatory: self.config.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    message.properties.clone(),
                )
                .await;
            let confirm = match sent {
                Ok(confirm) => confirm,
                Err(error) => {
                    broken = Some(broke(error, "publishing"));
                    break;
                }
            };
            if !one_at_a_time {
                pending.push((i, confirm));
                continue;
            }
            deadline = tokio::time::Instant::now() + timeout;
            if let Err(error) = self.settle(run, i, message, confirm, deadline).await {
                return match error {
                    // A channel-level refusal on a fresh channel with this message alone in
                    // flight is about this message; a connection-level error may not be.
                    Broken::Refused(error) => RoundEnd::Refused {
                        culprit: soft_error(&error).map(|_| i),
                        error,
                    },
                    Broken::Unavailable(reason) => RoundEnd::Unavailable(reason),
                };
            }
        }
        for (i, confirm) in pending {
            let Some(message) = &prepared[i] else {
                continue;
            };
            if let Err(error) = self.settle(run, i, message, confirm, deadline).await {
                // Keep the first cause; the broker's own refusal over a mere "closing".
                broken = match (broken, error) {
                    (Some(Broken::Unavailable(reason)), _) | (_, Broken::Unavailable(reason)) => {
                        Some(Broken::Unavailable(reason))
                    }
                    (Some(Broken::Refused(first)), Broken::Refused(next)) => {
                        Some(Broken::Refused(if soft_error(&first).is_some() {
                            first
                        } else {
                            next
                        }))
                    }
                    (None, error) => Some(error),
                };
            }
        }
        match broken {
            None => RoundEnd::Done,
            Some(Broken::Unavailable(reason)) => RoundEnd::Unavailable(reason),
            Some(Broken::Refused(error)) => RoundEnd::Refused {
                culprit: None,
                error,
            },
        }
    }

    /// Awaits the confirm of message `i` and settles it, or says why the channel broke (the
    /// message then stays unsettled).
    async fn settle(
        &self,
        run: &mut Run<'_>,
        i: usize,
        message: &Prepared,
        confirm: PublisherConfirm,
        deadline: tokio::time::Instant,
    ) -> Result<(), Broken> {
        match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => run.succeed(i),
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                let reason = format!(
                    "returned by the broker: {} {} (exchange {:?}, routing key {:?}: no queue bound)",
                    returned.reply_code,
                    returned.reply_text,
                    returned.delivery.exchange.as_str(),
                    returned.delivery.routing_key.as_str(),
                );
                let destination = (message.exchange.as_str(), message.routing_key.as_str());
                run.unroutable(i, self.config.unroutable, (destination, false), reason);
            }
            Ok(Ok(Confirmation::Nack(None))) => {
                log::warn!(
                    "message {}: negatively confirmed by the broker",
                    run.batch[i].id
                );
                run.fail(
                    i,
                    PublishError::Retryable("negatively confirmed (nack) by the broker".into()),
                );
            }
            Ok(Ok(Confirmation::NotRequested)) => run.fail(
                i,
                PublishError::Retryable("the channel was not in confirm mode".into()),
            ),
            Ok(Err(error)) => return Err(broke(error, "waiting for the confirm")),
            Err(_) => {
                return Err(Broken::Unavailable(format!(
                    "not confirmed within {:?}",
                    self.config.confirm_timeout
                )))
            }
        }
        Ok(())
    }

    /// Charges message `i` for the channel the broker closed over it.
    fn refused(&self, run: &mut Run<'_>, i: usize, message: &Prepared, error: &lapin::Error) {
        let reason = format!(
            "the broker closed the channel over this message: {}",
            refusal_reason(error)
        );
        match soft_error(error) {
            // Publishing to an exchange that does not exist (any more).
            Some(AMQPSoftError::NOTFOUND) => {
                let destination = (message.exchange.as_str(), message.routing_key.as_str());
                run.unroutable(i, self.config.unroutable, (destination, true), reason);
            }
            // E.g. larger than the broker's `max_message_size`.
            Some(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE) => {
                run.fail(i, PublishError::Fatal(reason));
            }
            _ => run.fail(i, PublishError::Retryable(reason)),
        }
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
            None => {
                match Link::open(&self.addr, &self.config.tls, self.config.connect_timeout).await {
                    Ok(link) => {
                        self.frame_max = link.frame_max();
                        self.link = Some(link);
                        Ok(())
                    }
                    Err(error) => {
                        log::warn!("connecting to {} failed: {error}", redact(&self.addr));
                        Err(format!("connecting to the broker failed: {error}"))
                    }
                }
            }
        }
    }

    /// A fresh channel after the broker closed one, or a fresh connection if it closed that
    /// (a frame sent on the channel after the broker closed it makes the broker close the
    /// connection too).
    async fn reopen(&mut self) -> Result<(), String> {
        let timeout = self.config.connect_timeout;
        if let Some(link) = &mut self.link {
            if link.connection.status().connected() {
                match link.reopen_channel(timeout).await {
                    Ok(()) => return Ok(()),
                    Err(error) => log::debug!("opening a fresh channel failed: {error}"),
                }
            }
        }
        self.disconnect().await;
        self.ensure_link().await
    }

    async fn disconnect(&mut self) {
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        self.declared.clear();
    }
}

/// Classifies an error of the channel a batch travels on.
fn broke(error: lapin::Error, doing: &str) -> Broken {
    let refused = match error.kind() {
        ErrorKind::ProtocolError(_) => !lapin_error_is_unavailable(&error),
        // The channel is closing or closed: the broker closed it, or the whole connection, over
        // something sent (its reason comes with the confirms), or the connection is gone.
        // Reopening tells which.
        ErrorKind::InvalidChannelState(..) => true,
        _ => false,
    };
    if refused {
        Broken::Refused(error)
    } else {
        Broken::Unavailable(format!("{doing} failed: {error}"))
    }
}

/// The soft (channel-level) error code the broker closed a channel with, if it did.
fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// The broker's reply code and text, e.g. `404 NOT_FOUND - no exchange 'x' in vhost '/'`.
fn refusal_reason(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message())
        }
        _ => error.to_string(),
    }
}

/// The size of `properties` on the wire (property flags included).
fn encoded_len(properties: &BasicProperties) -> usize {
    let serialize = lapin::protocol::basic::gen_properties::<Vec<u8>>(properties);
    match serialize(Vec::new().into()) {
        Ok(written) => usize::try_from(written.position).unwrap_or(usize::MAX),
        // Writing to a `Vec` does not fail; should it, the broker will say.
        Err(_) => 0,
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
