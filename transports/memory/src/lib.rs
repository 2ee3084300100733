//! An in-process broker for **waybill**: the embedded default and tests, with no server.
//!
//! [`MemoryBroker`] keeps one bounded FIFO queue per topic. [`MemoryPublisher`] implements the
//! relay's [`Publisher`] (a full queue refuses with a retryable error: backpressure instead of
//! unbounded memory), and [`MemoryConsumer`] is a consumer loop that hands decoded messages to a
//! [`DeliveryHandler`] and acknowledges, redelivers or dead-letters them like a real broker.
//!
//! Messages travel in the [`wire`](waybill_inbox_core::wire) form (CloudEvents binary mode, NATS-style `ce-` headers),
//! exactly as over RabbitMQ or NATS. Faults can be switched
//! on so the exactly-once machinery is visibly exercised: a fraction of acknowledged deliveries
//! is delivered again (a lost ack), and the publisher's "connection" can be dropped.
//!
//! ```
//! use std::time::Duration;
//! use waybill_inbox_core::{Disposition, IncomingMessage};
//! use waybill_memory::{MemoryBroker, MemoryConfig};
//! use waybill_outbox_core::{MessageId, OutboxMessage, Publisher, Status};
//!
//! let broker = MemoryBroker::new(MemoryConfig::default().redeliver_fraction(1.0));
//! let mut publisher = broker.publisher();
//! let mut msg = OutboxMessage::new(1, MessageId::new(), Status::Pending);
//! msg.topic = "orders".into();
//! msg.message_type = "OrderPlaced".into();
//! assert!(publisher.publish(&[msg])[0].is_ok());
//!
//! let mut consumer = broker.consumer("orders");
//! let mut handler = |_: &IncomingMessage| Disposition::Ack;
//! let report = consumer.run_once(&mut handler, 10, Duration::ZERO);
//! assert_eq!(report.delivered, 2); // delivered, then redelivered as a duplicate
//! ```

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use waybill_inbox_core::{
    wire::{Binding, Decoder, Encoder, Received},
    ConsumerLoop, DeadLetter as Letter, DecodeError, DeliveryHandler, IncomingMessage, RetryPolicy,
    Subscription,
};
pub use waybill_outbox_core::StopHandle;
use waybill_outbox_core::{Headers, OutboxMessage, PublishError, Publisher};

/// How the in-process broker behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MemoryConfig {
    capacity: usize,
    redeliver_fraction: f64,
    retry: RetryPolicy,
    seed: Option<u64>,
    source: Option<String>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            redeliver_fraction: 0.0,
            retry: RetryPolicy::default(),
            seed: None,
            source: None,
        }
    }
}

impl MemoryConfig {
    /// The most messages one topic's queue holds; publishing to a full queue fails with a
    /// retryable error. Defaults to 100,000.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The fraction (0.0 to 1.0) of acknowledged messages that are delivered once more, as when
    /// an ack is lost (an extra delivery is not duplicated again). Defaults to 0.
    #[must_use]
    pub fn redeliver_fraction(mut self, fraction: f64) -> Self {
        self.redeliver_fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// How the consumer retries a message whose handler returned [`Disposition::Retry`](waybill_inbox_core::Disposition::Retry) or
    /// panicked: in place, before the next message, up to the policy's max deliveries, then
    /// dead-lettered. Defaults to [`RetryPolicy::default`] (5 deliveries).
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

    /// Retries after the first delivery: `max_deliveries(redeliveries + 1)`. Defaults to 4.
    #[must_use]
    pub fn max_redeliveries(self, redeliveries: u32) -> Self {
        self.max_deliveries(redeliveries.saturating_add(1))
    }

    /// The CloudEvents `source` the publisher writes, a URI reference naming the producer.
    /// Defaults to `urn:waybill:<topic>` of each message.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Seeds the fault injection so a run can be replayed. Defaults to a random seed.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

/// A message that could not be handled, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The topic it was published to.
    pub topic: String,
    /// The wire headers as published.
    pub headers: Headers,
    /// The payload as published.
    pub payload: Vec<u8>,
    /// Why it was dead-lettered.
    pub reason: String,
}

/// What the broker has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Messages accepted from publishers.
    pub published: u64,
    /// Deliveries handed to consumers (including redeliveries).
    pub delivered: u64,
    /// Extra deliveries of acknowledged messages (injected lost acks).
    pub duplicated: u64,
    /// Publish attempts refused (full queue or dropped connection).
    pub refused: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

pub use waybill_inbox_core::ConsumeReport;

#[derive(Clone, Debug)]
struct Envelope {
    headers: Headers,
    payload: Vec<u8>,
    /// An injected extra delivery; never duplicated again, so faults stay bounded.
    duplicate: bool,
}

struct State {
    queues: HashMap<String, VecDeque<Envelope>>,
    dead_letters: Vec<DeadLetter>,
    stats: BrokerStats,
    rng: SmallRng,
}

struct Inner {
    config: MemoryConfig,
    state: Mutex<State>,
    arrived: Condvar,
    disconnected: AtomicBool,
}

/// An in-process broker with one bounded queue per topic. Cheap to clone; clones share queues.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MemoryBroker {
    /// A broker with `config`.
    pub fn new(config: MemoryConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        let state = State {
            queues: HashMap::new(),
            dead_letters: Vec::new(),
            stats: BrokerStats::default(),
            rng,
        };
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                arrived: Condvar::new(),
                disconnected: AtomicBool::new(false),
            }),
        }
    }

    /// A publisher for the relay.
    pub fn publisher(&self) -> MemoryPublisher {
        let encoder = Encoder::new(Binding::Memory);
        let encoder = match &self.inner.config.source {
            Some(source) => encoder.with_source(source.as_str()),
            None => encoder,
        };
        MemoryPublisher {
            broker: self.clone(),
            encoder,
        }
    }

    /// A consumer of `topic`'s queue. Several consumers of one topic compete for its messages.
    pub fn consumer(&self, topic: impl Into<String>) -> MemoryConsumer {
        let queue = TopicQueue {
            broker: self.clone(),
            topic: topic.into(),
        };
        MemoryConsumer {
            consumer: ConsumerLoop::new(queue, self.inner.config.retry)
                .batch(100, Duration::from_millis(50)),
        }
    }

    /// Simulates a lost connection: publishing fails with [`PublishError::Unavailable`] (no
    /// attempt charged, the relay waits) until [`reconnect`](Self::reconnect).
    pub fn disconnect(&self) {
        self.inner.disconnected.store(true, Ordering::SeqCst);
    }

    /// Ends a simulated connection loss.
    pub fn reconnect(&self) {
        self.inner.disconnected.store(false, Ordering::SeqCst);
    }

    /// Puts raw wire data on `topic`'s queue, bypassing the publisher: for bad-input tests.
    pub fn publish_raw(&self, topic: &str, headers: Headers, payload: Vec<u8>) {
        let mut state = self.lock();
        state
            .queues
            .entry(topic.to_owned())
            .or_default()
            .push_back(Envelope {
                headers,
                payload,
                duplicate: false,
            });
        state.stats.published += 1;
        drop(state);
        self.inner.arrived.notify_all();
    }

    /// What the broker has done so far.
    pub fn stats(&self) -> BrokerStats {
        self.lock().stats
    }

    /// Messages waiting in `topic`'s queue.
    pub fn queued(&self, topic: &str) -> usize {
        self.lock().queues.get(topic).map_or(0, VecDeque::len)
    }

    /// Every dead-lettered message so far, for operators and tests.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead_letters.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The relay's [`Publisher`] for a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemoryPublisher {
    broker: MemoryBroker,
    encoder: Encoder,
}

impl Publisher for MemoryPublisher {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let inner = &self.broker.inner;
        let mut state = self.broker.lock();
        let mut failed_keys = std::collections::HashSet::new();
        let outcomes = batch
            .iter()
            .map(|msg| {
                if failed_keys.contains(&msg.partition_key) {
                    return Err(PublishError::NotAttempted);
                }
                let refusal = if inner.disconnected.load(Ordering::SeqCst) {
                    // The broker is gone, not the message at fault: the relay charges nothing.
                    Some(PublishError::Unavailable(
                        "connection to the in-process broker dropped".to_owned(),
                    ))
                } else if state
                    .queues
                    .get(&msg.topic)
                    .is_some_and(|q| q.len() >= inner.config.capacity)
                {
                    Some(PublishError::Retryable("queue full".to_owned()))
                } else {
                    None
                };
                if let Some(refusal) = refusal {
                    state.stats.refused += 1;
                    failed_keys.insert(msg.partition_key.clone());
                    return Err(refusal);
                }
                let (headers, payload) = self.encoder.encode(msg);
                state
                    .queues
                    .entry(msg.topic.clone())
                    .or_default()
                    .push_back(Envelope {
                        headers,
                        payload,
                        duplicate: false,
                    });
                state.stats.published += 1;
                Ok(())
            })
            .collect();
        drop(state);
        inner.arrived.notify_all();
        outcomes
    }
}

/// A consumer of one topic's queue of a [`MemoryBroker`], on the shared
/// [`ConsumerLoop`]: in-place retries, panics caught, dead letters kept in the broker.
#[derive(Debug)]
pub struct MemoryConsumer {
    consumer: ConsumerLoop<TopicQueue>,
}

impl MemoryConsumer {
    /// Handles up to `max` deliveries, waiting at most `wait` for the first one. The
    /// deterministic step tests drive.
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> ConsumeReport {
        self.consumer
            .run_once(handler, max, wait)
            .unwrap_or_else(|never| match never {})
    }

    /// Handles deliveries until `stop` is stopped; an idle wait lasts at most 50 ms between
    /// checks.
    pub fn run(&mut self, handler: &mut impl DeliveryHandler, stop: &StopHandle) -> ConsumeReport {
        self.consumer
            .run(handler, stop)
            .unwrap_or_else(|never| match never {})
    }
}

/// One topic's queue as a [`Subscription`]: the memory broker never fails, so its error type
/// is [`Infallible`].
#[derive(Debug)]
struct TopicQueue {
    broker: MemoryBroker,
    topic: String,
}

impl Subscription for TopicQueue {
    type Delivery = Envelope;
    type Error = Infallible;

    fn name(&self) -> &str {
        &self.topic
    }

    fn next(&mut self, wait: Duration, _wanted: usize) -> Result<Option<Envelope>, Infallible> {
        let deadline = Instant::now() + wait;
        let mut state = self.broker.lock();
        loop {
            if let Some(envelope) = state
                .queues
                .get_mut(&self.topic)
                .and_then(VecDeque::pop_front)
            {
                state.stats.delivered += 1;
                return Ok(Some(envelope));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            state = self
                .broker
                .inner
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn decode(&self, envelope: &Envelope) -> Result<IncomingMessage, DecodeError> {
        let received = Received::from_text(envelope.headers.clone(), envelope.payload.clone())
            .with_topic(self.topic.as_str());
        let message = Decoder::new(Binding::Memory).decode(received)?;
        // Only raw publishes can put a message of another topic on this queue.
        if message.topic != self.topic {
            return Err(DecodeError::UnexpectedTopic {
                id: message.id,
                topic: message.topic,
                expected: self.topic.clone(),
            });
        }
        Ok(message)
    }

    fn ack(&mut self, envelope: Envelope) -> Result<(), Infallible> {
        let fraction = self.broker.inner.config.redeliver_fraction;
        let mut state = self.broker.lock();
        if !envelope.duplicate && fraction > 0.0 && state.rng.random_bool(fraction) {
            state.stats.duplicated += 1;
            self.requeue(
                &mut state,
                Envelope {
                    duplicate: true,
                    ..envelope
                },
            );
        }
        Ok(())
    }

    fn dead_letter(&mut self, envelope: &Envelope, letter: &Letter<'_>) -> Result<(), Infallible> {
        let mut state = self.broker.lock();
        state.stats.dead_lettered += 1;
        state.dead_letters.push(DeadLetter {
            topic: self.topic.clone(),
            headers: envelope.headers.clone(),
            payload: envelope.payload.clone(),
            reason: letter.reason.to_owned(),
        });
        Ok(())
    }

    fn discard(&mut self, _: Envelope) -> Result<(), Infallible> {
        Ok(())
    }

    fn release(&mut self, envelope: Envelope) -> Result<(), Infallible> {
        let mut state = self.broker.lock();
        state
            .queues
            .entry(self.topic.clone())
            .or_default()
            .push_front(envelope);
        drop(state);
        self.broker.inner.arrived.notify_all();
        Ok(())
    }
}

impl TopicQueue {
    fn requeue(&self, state: &mut State, envelope: Envelope) {
        state
            .queues
            .entry(self.topic.clone())
            .or_default()
            .push_back(envelope);
        self.broker.inner.arrived.notify_all();
    }
}
