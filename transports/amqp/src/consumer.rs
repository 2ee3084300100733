//! [`AmqpConsumer`]: a consumer loop over a RabbitMQ queue that feeds a [`DeliveryHandler`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Confirmation, ExchangeKind};
use tokio::runtime::Runtime;
#[cfg(doc)]
use waybill_inbox_core::Disposition;
use waybill_inbox_core::{wire, DeliveryHandler, Outcome, RetryPolicy};

use crate::fields::{self, short};
use crate::link::{self, within, Link};
use crate::{redact, Error, Result};

/// Header that counted how often an earlier version of the consumer re-published a delivery
/// after [`Disposition::Retry`]. Retries now happen in place; a copy that still carries it
/// counts that many handler calls against [`RetryPolicy`]'s max deliveries.
pub const REDELIVERIES_HEADER: &str = "x-waybill-redeliveries";
/// Header an earlier version put on a re-published copy: the reason of the last
/// [`Disposition::Retry`]. No longer written.
pub const RETRY_REASON_HEADER: &str = "x-waybill-retry-reason";
/// Header on a dead letter: why it was dead-lettered. The same name on every transport.
pub use waybill_inbox_core::DEAD_LETTER_REASON;
/// The name this crate used for [`DEAD_LETTER_REASON`] before the transports agreed on one;
/// dead letters still carry it too, so existing readers keep working.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-waybill-dead-letter-reason";
/// Header on a dead letter: the queue it was consumed from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-waybill-original-queue";

/// The first pause before reconnecting in [`AmqpConsumer::run`]; it doubles up to the limit.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// What a consumer consumes and how. Built with [`ConsumerConfig::new`] and by-value setters.
///
/// ```
/// use waybill_amqp::ConsumerConfig;
///
/// let config = ConsumerConfig::new("billing.orders")
///     .bind("orders", "#")
///     .prefetch(64)
///     .max_deliveries(3);
/// assert_eq!(config.dead_letter_queue_name(), "billing.orders.dead");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    queue: String,
    bindings: Vec<(String, String)>,
    declare_exchanges: Option<ExchangeKind>,
    prefetch: u16,
    retry: RetryPolicy,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: Option<String>,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    poll_timeout: Duration,
    max_reconnect_delay: Duration,
}

impl ConsumerConfig {
    /// Consumes `queue`, which the consumer declares (durable, dead-lettering to the
    /// dead-letter exchange) together with the dead-letter exchange and queue.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            bindings: Vec::new(),
            declare_exchanges: Some(ExchangeKind::Topic),
            prefetch: 32,
            retry: RetryPolicy::default(),
            dead_letter_exchange: None,
            dead_letter_queue: None,
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            poll_timeout: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(30),
        }
    }

    /// Binds the queue to `exchange` with `routing_key` (e.g. `#` for everything on a topic
    /// exchange). May be called several times. Defaults to no bindings (only the default
    /// exchange reaches the queue).
    #[must_use]
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Declares the exchanges named in [`bind`](Self::bind) (durable, of this kind), or not at
    /// all with `None`. Defaults to `Some(ExchangeKind::Topic)`, as the publisher does.
    #[must_use]
    pub fn declare_exchanges(mut self, kind: Option<ExchangeKind>) -> Self {
        self.declare_exchanges = kind;
        self
    }

    /// How many unacknowledged deliveries the broker sends ahead (`basic.qos`). Defaults to 32.
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

    /// Calls after the first: `max_deliveries(count + 1)`, so the handler sees a message at
    /// most `count + 1` times, as before. Defaults to 4.
    #[must_use]
    pub fn max_redeliveries(self, count: u32) -> Self {
        self.max_deliveries(count.saturating_add(1))
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

    /// How long the broker may take to confirm a redelivery copy or a dead letter. Defaults to
    /// 30 seconds.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long [`AmqpConsumer::run`] waits for a delivery before it looks at its stop flag
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
/// [`DeliveryHandler`], e.g. waybill-diesel's `InboxHandler`.
///
/// A delivery is acknowledged only after the handler returned [`Disposition::Ack`]. See the
/// [crate docs](crate) for the redelivery and dead-letter design.
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
pub struct AmqpConsumer {
    runtime: Runtime,
    addr: String,
    config: ConsumerConfig,
    link: Option<ConsumerLink>,
}

struct ConsumerLink {
    link: Link,
    consumer: lapin::Consumer,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("addr", &redact(&self.addr))
            .field("config", &self.config)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl AmqpConsumer {
    /// Connects to the broker at `addr`, declares the queue, the dead-letter exchange and
    /// queue and the bindings, sets the prefetch and starts consuming.
    ///
    /// # Errors
    ///
    /// [`Error::Amqp`] when connecting or declaring fails (e.g. the queue exists with other
    /// arguments), [`Error::Timeout`] when the broker does not answer within the connect
    /// timeout, [`Error::TooLong`] for a name over 255 bytes and [`Error::Runtime`] when the
    /// private runtime cannot start.
    pub fn connect(addr: &str, config: ConsumerConfig) -> Result<Self> {
        let runtime = link::runtime()?;
        let link = runtime.block_on(open(addr, &config))?;
        Ok(Self {
            runtime,
            addr: addr.to_owned(),
            config,
            link: Some(link),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// `true` while the consumer holds an open connection and channel.
    pub fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.link.is_open())
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
        if let Some(link) = &self.link {
            self.runtime.block_on(link.link.close());
        }
    }

    /// Handles up to `max` deliveries: waits at most `wait` for the first, then takes only
    /// those already at hand. Reconnects first if an earlier call lost the connection. The
    /// deterministic step that [`run`](Self::run) loops over.
    ///
    /// # Errors
    ///
    /// A lost connection or channel ([`Error::ConnectionLost`], [`Error::Amqp`]), a broker that
    /// refused a redelivery copy or dead letter ([`Error::Refused`]), an answer that timed out
    /// ([`Error::Timeout`]) or a cancelled consumer ([`Error::ConsumerCancelled`]). The
    /// delivery at hand was then not acknowledged, so the broker delivers it again; the next
    /// call reconnects.
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport> {
        let mut report = ConsumeReport::default();
        let outcome = self.step(handler, max, wait, &mut report);
        report.record(&self.config.queue);
        outcome.map(|()| report)
    }

    /// Consumes until `stop` is set, in steps of up to `prefetch` deliveries. After a
    /// connection loss or any other retryable error it logs, pauses (100 ms, doubling up to the
    /// configured limit) and reconnects: it never exits on a broker that is down.
    ///
    /// # Errors
    ///
    /// Only errors that retrying cannot fix, e.g. a refused login, a queue that exists with
    /// other arguments or a name over 255 bytes ([`Error::is_retryable`] is `false`).
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &AtomicBool,
    ) -> Result<ConsumeReport> {
        let mut total = ConsumeReport::default();
        let mut delay = FIRST_RECONNECT_DELAY;
        let max = usize::from(self.config.prefetch.max(1));
        while !stop.load(Ordering::Relaxed) {
            let mut report = ConsumeReport::default();
            let outcome = self.step(handler, max, self.config.poll_timeout, &mut report);
            report.record(&self.config.queue);
            total.add(&report);
            match outcome {
                Ok(()) => {
                    delay = FIRST_RECONNECT_DELAY;
                    if report.delivered == 0 {
                        log::trace!("queue {}: nothing to consume", self.config.queue);
                    }
                }
                Err(error) if error.is_retryable() => {
                    log::warn!(
                        "consuming {} from {} failed, reconnecting in {delay:?}: {error}",
                        self.config.queue,
                        redact(&self.addr)
                    );
                    pause(delay, stop);
                    delay = (delay * 2).min(self.config.max_reconnect_delay);
                }
                Err(error) => {
                    log::error!(
                        "consuming {} from {} failed for good: {error}",
                        self.config.queue,
                        redact(&self.addr)
                    );
                    return Err(error);
                }
            }
        }
        Ok(total)
    }

    fn step(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
        report: &mut ConsumeReport,
    ) -> Result<()> {
        let result = self.consume(handler, max, wait, report);
        if result.is_err() {
            // Unacknowledged deliveries go back to the queue when the connection closes.
            if let Some(link) = self.link.take() {
                self.runtime.block_on(link.link.close());
            }
        }
        if report.delivered > 0 {
            log::debug!("queue {}: {report:?}", self.config.queue);
        }
        result
    }

    fn consume(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
        report: &mut ConsumeReport,
    ) -> Result<()> {
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
                link.insert(runtime.block_on(open(addr, config))?)
            }
        };
        for n in 0..max {
            let timeout = if n == 0 { wait } else { Duration::ZERO };
            let Some(delivery) = runtime.block_on(next(current, &config.queue, timeout))? else {
                break;
            };
            report.delivered += 1;
            dispose(runtime, current, config, handler, delivery, report)?;
        }
        Ok(())
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            self.runtime.block_on(link.link.close());
        }
    }
}

/// Sleeps `delay` in short steps, returning early once `stop` is set.
fn pause(delay: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut left = delay;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let now = left.min(step);
        std::thread::sleep(now);
        left -= now;
    }
}

/// Connects, declares the topology and starts consuming.
async fn open(addr: &str, config: &ConsumerConfig) -> Result<ConsumerLink> {
    let link = Link::open(addr, config.connect_timeout).await?;
    let timeout = config.connect_timeout;
    let channel = &link.channel;
    let queue = short("queue name", config.queue.as_str())?;
    let dlx = short(
        "dead-letter exchange name",
        config.dead_letter_exchange_name(),
    )?;
    let dlq = short("dead-letter queue name", config.dead_letter_queue_name())?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };

    within(
        "declaring the dead-letter exchange",
        timeout,
        channel.exchange_declare(
            dlx.clone(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        ),
    )
    .await?;
    within(
        "declaring the dead-letter queue",
        timeout,
        channel.queue_declare(dlq.clone(), durable, FieldTable::default()),
    )
    .await?;
    within(
        "binding the dead-letter queue",
        timeout,
        channel.queue_bind(
            dlq,
            dlx.clone(),
            ShortString::default(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    within(
        "declaring the queue",
        timeout,
        channel.queue_declare(queue.clone(), durable, arguments),
    )
    .await?;
    for (exchange, routing_key) in &config.bindings {
        let exchange = short("exchange name", exchange.as_str())?;
        if let Some(kind) = &config.declare_exchanges {
            within(
                "declaring an exchange",
                timeout,
                channel.exchange_declare(
                    exchange.clone(),
                    kind.clone(),
                    durable_exchange,
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        within(
            "binding the queue",
            timeout,
            channel.queue_bind(
                queue.clone(),
                exchange,
                short("routing key", routing_key.as_str())?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    within(
        "setting the prefetch",
        timeout,
        channel.basic_qos(config.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let consumer = within(
        "starting the consumer",
        timeout,
        channel.basic_consume(
            queue,
            ShortString::default(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    log::debug!(
        "consuming {} from {} (prefetch {})",
        config.queue,
        redact(addr),
        config.prefetch
    );
    Ok(ConsumerLink { link, consumer })
}

/// The next delivery, or `None` when none came within `timeout`.
async fn next(
    current: &mut ConsumerLink,
    queue: &str,
    timeout: Duration,
) -> Result<Option<Delivery>> {
    match tokio::time::timeout(timeout, current.consumer.next()).await {
        Err(_) if current.link.is_open() => Ok(None),
        Err(_) => Err(Error::ConnectionLost),
        Ok(Some(delivery)) => Ok(Some(delivery?)),
        Ok(None) if current.link.is_open() => Err(Error::ConsumerCancelled {
            queue: queue.to_owned(),
        }),
        Ok(None) => Err(Error::ConnectionLost),
    }
}

/// Runs the handler on one delivery (retrying in place) and acknowledges or dead-letters it.
fn dispose(
    runtime: &Runtime,
    current: &ConsumerLink,
    config: &ConsumerConfig,
    handler: &mut impl DeliveryHandler,
    delivery: Delivery,
    report: &mut ConsumeReport,
) -> Result<()> {
    let table = delivery.properties.headers().as_ref();
    let redeliveries = fields::count(table, REDELIVERIES_HEADER);
    let headers = fields::from_table(table);
    let message = match wire::decode(headers, delivery.data.clone()) {
        Ok(message) => message,
        Err(error) => {
            let id = delivery_id(&delivery);
            let reason = format!("malformed: {}", chain(&error));
            log::error!(
                "queue {}: message {id} dead-lettered: {reason}",
                config.queue
            );
            runtime.block_on(dead_letter(current, config, &delivery, &id, &reason))?;
            report.malformed += 1;
            report.dead_lettered += 1;
            return Ok(());
        }
    };
    let id = message.id.to_string();
    // Retried in place: the next delivery is taken only once this one is settled.
    let handled = config.retry.handle(handler, &message, redeliveries);
    report.retried += u64::from(handled.retries());
    runtime.block_on(async {
        match handled.outcome {
            Outcome::Ack => {
                ack(current, &delivery).await?;
                report.acked += 1;
            }
            Outcome::DeadLetter(reason) => {
                log::error!(
                    "queue {}: message {id} dead-lettered: {reason}",
                    config.queue
                );
                dead_letter(current, config, &delivery, &id, &reason).await?;
                report.dead_lettered += 1;
            }
        }
        Ok(())
    })
}

/// The id a delivery claims to have, for logs: the wire header, else the AMQP message id.
fn delivery_id(delivery: &Delivery) -> String {
    let table = delivery.properties.headers().as_ref();
    table
        .and_then(|t| t.inner().get(wire::MESSAGE_ID))
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

/// An error and its sources, joined with `: `.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn ack(current: &ConsumerLink, delivery: &Delivery) -> Result<()> {
    current
        .link
        .channel
        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
        .await?;
    Ok(())
}

/// Publishes a copy with the reason to the dead-letter exchange, then acknowledges the
/// original. If the dead-letter queue does not take it, the original stays unacknowledged.
async fn dead_letter(
    current: &ConsumerLink,
    config: &ConsumerConfig,
    delivery: &Delivery,
    id: &str,
    reason: &str,
) -> Result<()> {
    let extra = [
        (
            DEAD_LETTER_REASON,
            AMQPValue::LongString(LongString::from(reason)),
        ),
        (
            DEAD_LETTER_REASON_HEADER,
            AMQPValue::LongString(LongString::from(reason)),
        ),
        (
            ORIGINAL_QUEUE_HEADER,
            AMQPValue::LongString(LongString::from(config.queue.as_str())),
        ),
    ];
    copy(
        current,
        config,
        delivery,
        short(
            "dead-letter exchange name",
            config.dead_letter_exchange_name(),
        )?,
        short("queue name", config.queue.as_str())?,
        &extra,
    )
    .await
    .map_err(|reason| Error::Refused {
        what: "dead letter",
        message: id.to_owned(),
        reason,
    })??;
    ack(current, delivery).await
}

/// Publishes `delivery` again (mandatory, confirmed) with `extra` headers. The outer error is a
/// refusal by the broker (nack, return), the inner one a failure of the client.
async fn copy(
    current: &ConsumerLink,
    config: &ConsumerConfig,
    delivery: &Delivery,
    exchange: ShortString,
    routing_key: ShortString,
    extra: &[(&str, AMQPValue)],
) -> std::result::Result<Result<()>, String> {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    for (name, value) in extra {
        table.insert((*name).into(), value.clone());
    }
    let properties = delivery.properties.clone().with_headers(table);
    let sent = async {
        let confirm = current
            .link
            .channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await?;
        within("confirming a copy", config.confirm_timeout, confirm).await
    };
    Ok(match sent.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
            return Err(format!(
                "returned: {} {}",
                returned.reply_code, returned.reply_text
            ))
        }
        Ok(Confirmation::Nack(None)) => return Err("negatively confirmed (nack)".into()),
        Ok(Confirmation::NotRequested) => return Err("the channel is not in confirm mode".into()),
        Err(error) => Err(error),
    })
}
