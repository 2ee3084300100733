//! Publishing to a broker: the trait transports implement, and an in-memory publisher.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::{BrokerLimits, OutboxMessage};

/// Sends batches of messages to a broker. Synchronous: it returns only after the broker has
/// confirmed, or failed, each message.
///
/// # Contract
///
/// - The result has one entry per message, in the order of `batch`.
/// - Messages come in outbox order. Messages that share a partition key must reach the broker in
///   that order, and once one of them fails the publisher must not send the rest of that key in
///   this batch: it reports them as [`PublishError::NotAttempted`]. Other keys go on.
/// - A failure that is not about the message (the broker cannot be reached, the connection or
///   channel is gone, no answer in time) is [`PublishError::Unavailable`]: only failures about
///   the message itself count toward parking it.
/// - One message's failure is charged to that message only: a broker that refuses one message
///   (even by closing the channel the batch travels on) never costs the other keys of the
///   batch an attempt; the publisher sends them on, or reports them uncharged.
/// - A message larger than the broker takes ([`limits`](Self::limits)) is refused before it
///   is sent, as [`PublishError::Fatal`] naming its size and the limit.
///
/// [`InMemoryPublisher`] is the reference implementation of this contract.
pub trait Publisher {
    /// Publishes `batch` and reports each message's outcome.
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>>;

    /// The largest messages the broker takes, for
    /// [`Limits::capped_by`](crate::Limits::capped_by) at enqueue time. Defaults to
    /// [`BrokerLimits::default`]: nothing known.
    fn limits(&self) -> BrokerLimits {
        BrokerLimits::default()
    }
}

impl<P: Publisher + ?Sized> Publisher for Box<P> {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        (**self).publish(batch)
    }

    fn limits(&self) -> BrokerLimits {
        (**self).limits()
    }
}

/// Why a message was not published.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// Trying again later may work for this message (negatively confirmed, refused for now).
    /// The relay backs the message off and counts the attempt: enough of them park it.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The broker could not be used at all (unreachable, connection or channel gone, no answer
    /// in time): nothing about this message. The relay hands the message back without counting
    /// an attempt, so an outage of any length parks nothing, and pauses until the broker is back.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Trying again will not help (the broker refused this message). The relay parks it.
    #[error("fatal: {0}")]
    Fatal(String),
    /// Not sent because an earlier message with the same partition key failed in this batch. The
    /// relay releases it without counting an attempt (and, unlike
    /// [`Unavailable`](Self::Unavailable), without pausing).
    #[error("not attempted: an earlier message with the same partition key failed")]
    NotAttempted,
}

/// What a publisher reports for a message the broker cannot route anywhere: no queue is bound
/// to its exchange and routing key, or its exchange does not exist (AMQP), or no stream captures
/// its subject (NATS). Transports offer it as `PublisherConfig::unroutable`.
///
/// ```
/// use waybill_outbox_core::{PublishError, Unroutable};
///
/// assert_eq!(Unroutable::default(), Unroutable::Retry);
/// assert!(matches!(Unroutable::Park.error("no stream".into()), PublishError::Fatal(_)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unroutable {
    /// [`PublishError::Retryable`]: the relay retries the message with backoff, counting an
    /// attempt each time, so it goes out once a queue or stream appears, and is parked with the
    /// reason after the relay's max attempts if none does. The default: queues and streams are
    /// often created by their consumers, which may start after the first messages were
    /// enqueued.
    #[default]
    Retry,
    /// [`PublishError::Fatal`]: the relay parks the message at once (and the rest of its key
    /// behind it) for an operator to requeue once the routing exists.
    Park,
}

impl Unroutable {
    /// The outcome of an unroutable message under this policy, with the `reason`.
    pub fn error(self, reason: String) -> PublishError {
        match self {
            Self::Retry => PublishError::Retryable(reason),
            Self::Park => PublishError::Fatal(reason),
        }
    }
}

impl crate::Retryable for PublishError {
    /// `true` for [`Retryable`](Self::Retryable), [`Unavailable`](Self::Unavailable) and
    /// [`NotAttempted`](Self::NotAttempted); `false` for [`Fatal`](Self::Fatal).
    fn is_retryable(&self) -> bool {
        !matches!(self, Self::Fatal(_))
    }
}

/// A publisher that keeps messages in memory: for tests, examples and the embedded setup.
///
/// Clones share the same log. A fault hook decides per message whether to fail it.
///
/// ```
/// use waybill_outbox_core::{InMemoryPublisher, Publisher};
///
/// let publisher = InMemoryPublisher::new();
/// let log = publisher.clone();
/// assert!(log.published().is_empty());
/// ```
#[derive(Clone, Default)]
pub struct InMemoryPublisher {
    shared: Arc<Shared>,
    fault: Option<Arc<FaultHook>>,
}

type FaultHook = dyn Fn(&OutboxMessage) -> Option<PublishError> + Send + Sync;

#[derive(Default)]
struct Shared {
    published: Mutex<Vec<OutboxMessage>>,
    grew: Condvar,
}

impl fmt::Debug for InMemoryPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryPublisher")
            .field("published", &self.lock().len())
            .field("fault_hook", &self.fault.is_some())
            .finish()
    }
}

impl InMemoryPublisher {
    /// A publisher that accepts every message.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the messages for which `fault` returns an error, e.g. to simulate a broker outage
    /// ([`PublishError::Unavailable`]) or a poison message. The hook sees every message the publisher is asked to send.
    #[must_use]
    pub fn with_fault(
        mut self,
        fault: impl Fn(&OutboxMessage) -> Option<PublishError> + Send + Sync + 'static,
    ) -> Self {
        self.fault = Some(Arc::new(fault));
        self
    }

    /// Every message published so far, in publish order (retries appear again).
    pub fn published(&self) -> Vec<OutboxMessage> {
        self.lock().clone()
    }

    /// How many messages were published so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// `true` when nothing was published yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Blocks until at least `count` messages were published or `timeout` passed; returns
    /// whether the count was reached. Lets tests wait for a relay thread without sleeping.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut published = self.lock();
        while published.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            published = self
                .shared
                .grew
                .wait_timeout(published, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, Vec<OutboxMessage>> {
        // A panicking test thread must not hide what was published before it.
        self.shared
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Publisher for InMemoryPublisher {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let mut failed_keys = HashSet::new();
        let mut published = self.lock();
        let outcomes = batch
            .iter()
            .map(|msg| {
                if failed_keys.contains(msg.partition_key.as_str()) {
                    return Err(PublishError::NotAttempted);
                }
                if let Some(error) = self.fault.as_ref().and_then(|fault| fault(msg)) {
                    failed_keys.insert(msg.partition_key.as_str());
                    return Err(error);
                }
                published.push(msg.clone());
                Ok(())
            })
            .collect();
        drop(published);
        self.shared.grew.notify_all();
        outcomes
    }
}
