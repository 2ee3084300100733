//! [`AmqpConsumer`]: the shared [`ConsumerLoop`] over a RabbitMQ queue.

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Confirmation, ExchangeKind};
use tokio::runtime::Runtime;
use waybill_inbox_core::wire::{self, Binding, Decoder, Received, WireValue};
#[cfg(doc)]
use waybill_inbox_core::Disposition;
use waybill_inbox_core::{
    ConsumerLoop, DeadLetter, DecodeError, DeliveryHandler, IncomingMessage, RetryPolicy,
    Subscription,
};
use waybill_outbox_core::StopHandle;

use crate::fields::{self, short};
use crate::link::{self, within};
use crate::topology::{self, ConsumerLink};
use crate::{redact, Error, Result, TlsOptions};

/// Header on a dead letter: why it was dead-lettered. The same name on every transport.
pub use waybill_inbox_core::DEAD_LETTER_REASON;
/// The name this crate used for [`DEAD_LETTER_REASON`] before the transports agreed on one;
/// dead letters still carry it too, so existing readers keep working.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-waybill-dead-letter-reason";
/// Header on a dead letter: the queue it was consumed from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-waybill-original-queue";
/// Header RabbitMQ's quorum queues put on a redelivered message: how often it was delivered
/// before and came back unsettled. Classic queues keep no such count.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The first pause before reconnecting in [`AmqpConsumer::run`]; it doubles up to the limit.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// What a consumer consumes and how. Built with [`ConsumerConfig::new`] and by-value setters.
///
/// ```
/// use waybill_amqp::{AMQPValue, ConsumerConfig, FieldTable, LongString};
///
/// let mut arguments = FieldTable::default();
/// arguments.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
/// let config = ConsumerConfig::new("billing.orders")
///     .bind("orders", "#")
///     .queue_arguments(arguments)
///     .prefetch(64)
///     .max_deliveries(3);
/// assert_eq!(config.dead_letter_queue_name(), "billing.orders.dead");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    pub(crate) queue: String,
    pub(crate) bindings: Vec<(String, String)>,
    pub(crate) declare_exchanges: Option<ExchangeKind>,
    pub(crate) passive: bool,
    pub(crate) queue_arguments: FieldTable,
    pub(crate) prefetch: u16,
    retry: RetryPolicy,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: Option<String>,
    pub(crate) connect_timeout: Duration,
    confirm_timeout: Duration,
    poll_timeout: Duration,
    max_reconnect_delay: Duration,
    native_metadata: bool,
    pub(crate) tls: TlsOptions,
}

impl ConsumerConfig {
    /// Consumes `queue`, which the consumer declares (durable, dead-lettering to the
    /// dead-letter exchange) together with the dead-letter exchange and queue, unless
    /// [`passive`](Self::passive).
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            bindings: Vec::new(),
            declare_exchanges: Some(ExchangeKind::Topic),
            passive: false,
            queue_arguments: FieldTable::default(),
            prefetch: 32,
            retry: RetryPolicy::default(),
            dead_letter_exchange: None,
            dead_letter_queue: None,
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            poll_timeout: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(30),
            native_metadata: false,
            tls: TlsOptions::default(),
        }
    }

    /// Whether a message that is neither a CloudEvent nor in waybill's legacy form is read from
    /// its AMQP properties: `message_id` as the id (a UUID), `type`, `timestamp` (seconds
    /// since the epoch, pika's native form) and `content_type`, with the exchange (else the
    /// routing key) as the topic. For producers that know nothing of CloudEvents. Defaults to
    /// `false`: such a message is dead-lettered as not a CloudEvent.
    #[must_use]
    pub fn native_metadata(mut self, accept: bool) -> Self {
        self.native_metadata = accept;
        self
    }

    /// Binds the queue to `exchange` with `routing_key` (e.g. `#` for everything on a topic
    /// exchange). May be called several times. Binding is idempotent, so this is done in
    /// [`passive`](Self::passive) mode too. Defaults to no bindings (only the default exchange
    /// reaches the queue).
    #[must_use]
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Declares the exchanges named in [`bind`](Self::bind) (durable, of this kind), or, with
    /// `None`, only checks that they exist (a passive declare), whatever their kind and
    /// arguments: for an exchange another team owns. Defaults to `Some(ExchangeKind::Topic)`, as
    /// the publisher does.
    #[must_use]
    pub fn declare_exchanges(mut self, kind: Option<ExchangeKind>) -> Self {
        self.declare_exchanges = kind;
        self
    }

    /// Uses topology that someone else declared (an operator, a policy, another team) as it
    /// is: the queue and the exchanges named in [`bind`](Self::bind) are only checked with
    /// passive declares, whatever arguments and kinds they have, and only the bindings are
    /// made. The dead-letter exchange is checked by [`AmqpConsumer::connect`] (a wrong name
    /// fails at once) but not when reconnecting: while its owner recreates it, only the message
    /// to dead-letter waits in the queue. The dead-letter queue is not touched (the dead-letter
    /// exchange routes where its owner bound it) and
    /// [`queue_arguments`](Self::queue_arguments) are not used. Without it, a queue that exists
    /// with other arguments (e.g. `x-max-length`) fails to connect with `PRECONDITION_FAILED`.
    /// Defaults to `false`.
    #[must_use]
    pub fn passive(mut self, passive: bool) -> Self {
        self.passive = passive;
        self
    }

    /// Arguments the queue is declared with, e.g. `x-queue-type = quorum` or `x-max-length`.
    /// The consumer adds `x-dead-letter-exchange` (the [dead-letter
    /// exchange](Self::dead_letter_exchange)) unless given here. Defaults to none.
    #[must_use]
    pub fn queue_arguments(mut self, arguments: FieldTable) -> Self {
        self.queue_arguments = arguments;
        self
    }

    /// How many unacknowledged deliveries the broker sends ahead (`basic.qos`), and the most
    /// deliveries one step of [`AmqpConsumer::run`] handles. Defaults to 32.
    #[must_use]
    pub fn prefetch(mut self, count: u16) -> Self {
        self.prefetch = count;
        self
    }

    /// How a delivery whose handler returned [`Disposition::Retry`] or panicked is retried: in
    /// place, before the next delivery is taken, so a key's later message never overtakes
    /// it; after the policy's max deliveries it is dead-lettered. Defaults to
    /// [`RetryPolicy::default`] (5 handler calls).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Handler calls per message, the first included, before it is dead-lettered: the same
    /// knob as on every transport. Defaults to 5.
    #[must_use]
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.retry = self.retry.max_deliveries(max);
        self
    }

    /// The dead-letter exchange (fanout). Defaults to `<queue>.dead`.
    #[must_use]
    pub fn dead_letter_exchange(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(name.into());
        self
    }

    /// The dead-letter queue, bound to the dead-letter exchange. Defaults to `<queue>.dead`.
    #[must_use]
    pub fn dead_letter_queue(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(name.into());
        self
    }

    /// How long connecting and declaring may take. Defaults to 10 seconds.
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

    /// How long the broker may take to confirm a dead letter. Defaults to 30 seconds.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long [`AmqpConsumer::run`] waits for a delivery before it looks at its stop handle
    /// again. Defaults to 1 second.
    #[must_use]
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// The longest pause between reconnect attempts in [`AmqpConsumer::run`] (it starts at
    /// 100 ms and doubles). Defaults to 30 seconds.
    #[must_use]
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// The queue consumed.
    pub fn queue_name(&self) -> &str {
        &self.queue
    }

    /// The dead-letter exchange's name.
    pub fn dead_letter_exchange_name(&self) -> String {
        self.dead_letter_exchange
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.queue))
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue_name(&self) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.queue))
    }
}

pub use waybill_inbox_core::ConsumeReport;

/// Consumes a RabbitMQ queue with manual acknowledgements and hands each decoded delivery to a
/// [`DeliveryHandler`], e.g. waybill-diesel's `InboxHandler`: the shared [`ConsumerLoop`] of
/// every waybill transport, over this queue.
///
/// A delivery is acknowledged only after the handler returned [`Disposition::Ack`]. See the
/// [crate docs](crate) for the retry, dead-letter and topology design.
///
/// ```no_run
/// use std::time::Duration;
/// use waybill_amqp::{AmqpConsumer, ConsumerConfig};
/// use waybill_inbox_core::{Disposition, IncomingMessage};
///
/// let mut consumer = AmqpConsumer::connect("amqp://guest:guest@127.0.0.1:5672/%2f",
///     ConsumerConfig::new("billing.orders").bind("orders", "#"))?;
/// let mut handler = |msg: &IncomingMessage| {
///     println!("{} {}", msg.message_type, msg.id);
///     Disposition::Ack
/// };
/// let report = consumer.run_once(&mut handler, 100, Duration::from_secs(1))?;
/// println!("{report:?}");
/// # Ok::<(), waybill_amqp::Error>(())
/// ```
#[derive(Debug)]
pub struct AmqpConsumer {
    inner: ConsumerLoop<AmqpSubscription>,
}

impl AmqpConsumer {
    /// Connects to the broker at `addr`, declares (or, [passive](ConsumerConfig::passive),
    /// checks) the queue, the dead-letter exchange and queue and the exchanges to bind to,
    /// binds the queue, sets the prefetch and starts consuming.
    ///
    /// Whatever must exist already is checked, and whatever exists is declared again (which
    /// verifies its arguments), before anything is created; if creating, binding or consuming
    /// then fails, the queues and exchanges this call created are deleted again (only while
    /// empty and unused). So a failed connect leaves nothing new behind, except when the broker
    /// goes away in the middle (then what stays is what the next connect declares anyway).
    ///
    /// # Errors
    ///
    /// [`Error::Topology`] when the broker refuses the topology (a queue or exchange that
    /// exists with other arguments or another kind: `PRECONDITION_FAILED`; one that is missing
    /// where it is only checked: `NOT_FOUND`), [`Error::Amqp`] when connecting fails (refused,
    /// wrong credentials), [`Error::Timeout`] when the broker does not answer within the
    /// connect timeout, [`Error::TooLong`] for a name over 255 bytes (checked before
    /// connecting) and [`Error::Runtime`] when the private runtime cannot start.
    pub fn connect(addr: &str, config: ConsumerConfig) -> Result<Self> {
        let runtime = link::runtime()?;
        let link = runtime.block_on(topology::open(addr, &config, true))?;
        let inner = ConsumerLoop::new(
            AmqpSubscription {
                runtime,
                addr: addr.to_owned(),
                config: config.clone(),
                link: Some(link),
            },
            config.retry,
        );
        Ok(Self {
            inner: inner
                .batch(usize::from(config.prefetch), config.poll_timeout)
                .reconnect_delay(FIRST_RECONNECT_DELAY, config.max_reconnect_delay),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.inner.subscription().config
    }

    /// `true` while the consumer holds an open connection and channel.
    pub fn is_connected(&self) -> bool {
        self.inner.subscription().is_connected()
    }

    /// Closes the connection under the consumer without telling it, as a broker restart or a
    /// network failure would: deliveries not yet acknowledged go back to the queue, and the
    /// next [`run_once`](Self::run_once) reconnects. A test hook.
    ///
    /// ```no_run
    /// # use waybill_amqp::{AmqpConsumer, ConsumerConfig};
    /// let mut consumer = AmqpConsumer::connect("amqp://127.0.0.1:5672/%2f", ConsumerConfig::new("q"))?;
    /// consumer.simulate_connection_loss();
    /// assert!(!consumer.is_connected());
    /// # Ok::<(), waybill_amqp::Error>(())
    /// ```
    pub fn simulate_connection_loss(&mut self) {
        let subscription = self.inner.subscription_mut();
        if let Some(current) = &subscription.link {
            subscription.runtime.block_on(current.link.close());
        }
    }

    /// Handles up to `max` deliveries: waits at most `wait` for the first, then takes only
    /// those already at hand. Reconnects first if an earlier call lost the connection. The
    /// deterministic step that [`run`](Self::run) loops over
    /// ([`ConsumerLoop::run_once`]).
    ///
    /// # Errors
    ///
    /// A lost connection or channel ([`Error::ConnectionLost`], [`Error::Amqp`]), a dead letter
    /// the broker did not store ([`Error::Refused`], [`Error::DeadLetter`]: the original was
    /// handed back), an answer that timed out ([`Error::Timeout`]), a cancelled consumer
    /// ([`Error::ConsumerCancelled`]) or a refused topology on reconnecting
    /// ([`Error::Topology`]). A delivery not settled went back to the queue; the next call
    /// reconnects.
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        self.inner.run_once(handler, max, wait)
    }

    /// Consumes until `stop` is stopped, in steps of up to `prefetch` deliveries
    /// ([`ConsumerLoop::run`]). After a connection loss or any other retryable error (a missing
    /// dead-letter exchange included) it logs, pauses (100 ms, doubling up to the configured
    /// limit) and reconnects: it never exits on a broker that is down. Once stopped, it settles
    /// the delivery in hand and hands back what the broker sent ahead (by closing the
    /// connection; the next call reconnects).
    ///
    /// ```no_run
    /// use waybill_amqp::{AmqpConsumer, ConsumerConfig, StopHandle};
    /// use waybill_inbox_core::{Disposition, IncomingMessage};
    ///
    /// let mut consumer = AmqpConsumer::connect("amqp://127.0.0.1:5672/%2f",
    ///     ConsumerConfig::new("billing.orders").bind("orders", "#"))?;
    /// let stop = StopHandle::new();
    /// let stopper = stop.clone(); // e.g. for a signal handler
    /// # stopper.stop();
    /// let report = consumer.run(&mut |_: &IncomingMessage| Disposition::Ack, &stop)?;
    /// # let _ = report;
    /// # Ok::<(), waybill_amqp::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Only errors that retrying cannot fix, e.g. a refused login, a queue that exists with
    /// other arguments or a name over 255 bytes ([`Error::is_retryable`] is `false`).
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<ConsumeReport> {
        self.inner.run(handler, stop)
    }
}

/// The queue as the shared loop sees it: a connection (opened again after a failure) and a
/// lapin consumer on it.
struct AmqpSubscription {
    runtime: Runtime,
    addr: String,
    config: ConsumerConfig,
    link: Option<ConsumerLink>,
}

impl fmt::Debug for AmqpSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSubscription")
            .field("addr", &redact(&self.addr))
            .field("config", &self.config)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl AmqpSubscription {
    fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.link.is_open())
    }

    /// The live link, for settling a delivery it handed out.
    fn live(&self) -> Result<&ConsumerLink> {
        self.link.as_ref().ok_or(Error::ConnectionLost)
    }

    /// Closes the connection, if any: the broker takes back every unsettled delivery.
    fn close(&mut self) {
        if let Some(current) = self.link.take() {
            self.runtime.block_on(current.link.close());
        }
    }
}

impl Subscription for AmqpSubscription {
    type Delivery = Delivery;
    type Error = Error;

    fn name(&self) -> &str {
        &self.config.queue
    }

    /// The next delivery the broker pushed. The broker sends up to `prefetch` deliveries ahead
    /// whatever `wanted` is; those not taken in this step wait, unacknowledged, on this
    /// consumer's channel for the next one (or go back when the connection closes).
    fn next(&mut self, wait: Duration, _wanted: usize) -> Result<Option<Delivery>> {
        let Self {
            runtime,
            addr,
            config,
            link,
        } = self;
        let current = match link {
            Some(current) if current.link.is_open() => current,
            _ => {
                if let Some(stale) = link.take() {
                    runtime.block_on(stale.link.close());
                }
                link.insert(runtime.block_on(topology::open(addr, config, false))?)
            }
        };
        runtime.block_on(async {
            match tokio::time::timeout(wait, current.consumer.next()).await {
                Err(_) if current.link.is_open() => Ok(None),
                Err(_) => Err(Error::ConnectionLost),
                Ok(Some(delivery)) => Ok(Some(delivery?)),
                Ok(None) if current.link.is_open() => Err(Error::ConsumerCancelled {
                    queue: config.queue.clone(),
                }),
                Ok(None) => Err(Error::ConnectionLost),
            }
        })
    }

    /// The [`wire`] form of the delivery (this transport's `x-waybill-*` headers left out):
    /// the headers table, the `content_type` property, and the `message_id`, `type` and
    /// `timestamp` properties for the timestamp fallback and native metadata.
    fn decode(&self, delivery: &Delivery) -> Result<IncomingMessage, DecodeError> {
        let properties = &delivery.properties;
        let topic = if delivery.exchange.as_str().is_empty() {
            delivery.routing_key.as_str()
        } else {
            delivery.exchange.as_str()
        };
        let received = Received::new(
            fields::from_table(properties.headers().as_ref()),
            delivery.data.clone(),
        )
        .with_content_type(properties.content_type().as_ref().map(|ct| ct.to_string()))
        .with_native_id(
            properties
                .message_id()
                .as_ref()
                .map(|id| WireValue::Text(id.to_string())),
        )
        .with_native_type(properties.kind().as_ref().map(|kind| kind.to_string()))
        .with_native_timestamp(*properties.timestamp())
        .with_topic(topic);
        Decoder::new(Binding::Amqp)
            .native_metadata(self.config.native_metadata)
            .decode(received)
    }

    /// The quorum queue's [`DELIVERY_COUNT_HEADER`], else 0 (classic queues count nothing: the
    /// `redelivered` flag says only "maybe seen before"). The count includes deliveries the
    /// broker sent ahead that no handler saw before they came back, so it may overstate the
    /// handler calls; it only shrinks the calls left, and the handler always gets one.
    fn earlier_deliveries(&self, delivery: &Delivery) -> u32 {
        fields::count(
            delivery.properties.headers().as_ref(),
            DELIVERY_COUNT_HEADER,
        )
    }

    fn ack(&mut self, delivery: Delivery) -> Result<()> {
        let channel = &self.live()?.link.channel;
        self.runtime
            .block_on(channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()))?;
        Ok(())
    }

    /// Publishes a copy with the reason ([`DEAD_LETTER_REASON`], [`DEAD_LETTER_REASON_HEADER`])
    /// and [`ORIGINAL_QUEUE_HEADER`] to the dead-letter exchange (`mandatory`, routing key =
    /// the queue) and waits for the broker's confirm. A `basic.reject` would dead-letter the
    /// original headers only and lose the reason.
    fn dead_letter(&mut self, delivery: &Delivery, letter: &DeadLetter<'_>) -> Result<()> {
        let id = delivery_id(delivery);
        let exchange = short(
            "dead-letter exchange name",
            self.config.dead_letter_exchange_name(),
        )?;
        let routing_key = short("queue name", self.config.queue.as_str())?;
        let mut table = delivery.properties.headers().clone().unwrap_or_default();
        for (name, value) in [
            (DEAD_LETTER_REASON, letter.reason),
            (DEAD_LETTER_REASON_HEADER, letter.reason),
            (ORIGINAL_QUEUE_HEADER, self.config.queue.as_str()),
        ] {
            table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        let properties = delivery.properties.clone().with_headers(table);
        let channel = &self.live()?.link.channel;
        let failed = |source| Error::DeadLetter {
            message: id.clone(),
            source,
        };
        let confirmation = self.runtime.block_on(async {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let confirm = channel
                .basic_publish(exchange, routing_key, options, &delivery.data, properties)
                .await
                .map_err(failed)?;
            within(
                "confirming a dead letter",
                self.config.confirm_timeout,
                confirm,
            )
            .await
            .map_err(|error| match error {
                Error::Amqp(source) => failed(source),
                other => other,
            })
        })?;
        let refused = |reason: String| Error::Refused {
            what: "dead letter",
            message: id.clone(),
            reason,
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(refused(
                format!("returned: {} {}", returned.reply_code, returned.reply_text),
            )),
            Confirmation::Nack(None) => Err(refused("negatively confirmed (nack)".into())),
            Confirmation::NotRequested => Err(refused("the channel is not in confirm mode".into())),
        }
    }

    /// `basic.nack` with requeue: RabbitMQ puts the message back at its place in the queue
    /// where it can, so it comes again before the later messages of its key.
    fn release(&mut self, delivery: Delivery) -> Result<()> {
        let channel = &self.live()?.link.channel;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        self.runtime
            .block_on(channel.basic_nack(delivery.delivery_tag, requeue))?;
        Ok(())
    }

    /// Closes the connection: the deliveries the broker sent ahead go back to the queue.
    fn release_fetched(&mut self) -> Result<()> {
        self.close();
        Ok(())
    }

    fn reset(&mut self) {
        self.close();
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        self.close();
    }
}

/// The id a delivery claims to have, for errors: the `ce-id` (or legacy) header, else the AMQP
/// message id.
fn delivery_id(delivery: &Delivery) -> String {
    let table = delivery.properties.headers().as_ref();
    table
        .and_then(|t| {
            let t = t.inner();
            t.get(Binding::Amqp.id_header())
                .or_else(|| t.get(wire::legacy::MESSAGE_ID))
        })
        .and_then(fields::scalar_text)
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
        })
        .unwrap_or_else(|| "-".to_owned())
}
