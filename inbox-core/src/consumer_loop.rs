//! The consumer loop, written once for every transport: fetch, decode, call the handler
//! (retrying in place), settle, count, back off, stop.

use std::time::Duration;

use waybill_outbox_core::{error_chain as chain, Retryable, StopHandle};

use crate::retry::Outcome;
use crate::subscription::one_line;
use crate::{ConsumeReport, DeadLetter, DeliveryHandler, RetryPolicy, Subscription};

/// Runs a [`DeliveryHandler`] over a transport's [`Subscription`]: the memory, RabbitMQ and
/// NATS consumers are thin wrappers around one of these.
///
/// Per delivery: decode it (undecodable: dead-letter as malformed), call the handler under the
/// [`RetryPolicy`] (a retry or a panic calls it again in place, so the next message of the key
/// waits), then acknowledge it or dead-letter it with the reason. A dead letter that cannot be
/// stored is handed back to the broker and the step fails: the message is never dropped.
/// `dead_lettered` counts exactly the copies the dead-letter destination took.
///
/// See [`Subscription`] for a complete example.
#[derive(Debug)]
pub struct ConsumerLoop<S> {
    subscription: S,
    retry: RetryPolicy,
    batch: usize,
    poll_wait: Duration,
    first_reconnect_delay: Duration,
    max_reconnect_delay: Duration,
}

impl<S: Subscription> ConsumerLoop<S> {
    /// A loop over `subscription` that retries handlers under `retry`. [`run`](Self::run) takes
    /// up to 100 deliveries per step, waits up to 1 s for them, and after a failure reconnects
    /// after 100 ms, doubling up to 5 s.
    pub fn new(subscription: S, retry: RetryPolicy) -> Self {
        Self {
            subscription,
            retry,
            batch: 100,
            poll_wait: Duration::from_secs(1),
            first_reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_secs(5),
        }
    }

    /// The deliveries [`run`](Self::run) takes per step and how long it waits for the first.
    /// Defaults to 100 and 1 s. A batch below 1 counts as 1.
    #[must_use]
    pub fn batch(mut self, max: usize, poll_wait: Duration) -> Self {
        self.batch = max.max(1);
        self.poll_wait = poll_wait;
        self
    }

    /// The pause after the first failed step and the longest one (each failure doubles it).
    /// Defaults to 100 ms and 5 s.
    #[must_use]
    pub fn reconnect_delay(mut self, first: Duration, max: Duration) -> Self {
        self.first_reconnect_delay = first;
        self.max_reconnect_delay = max.max(first);
        self
    }

    /// The retry policy handlers run under.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The transport's subscription.
    pub fn subscription(&self) -> &S {
        &self.subscription
    }

    /// The transport's subscription, e.g. to close its connection in a test.
    pub fn subscription_mut(&mut self) -> &mut S {
        &mut self.subscription
    }

    /// Handles up to `max` deliveries: waits at most `wait` for the first, then takes only
    /// those already at hand. The deterministic step tests drive; [`run`](Self::run) loops over
    /// it. Records the consumer metrics (see [`crate::metrics`]).
    ///
    /// # Errors
    ///
    /// The subscription's error when fetching, acknowledging or dead-lettering failed. The
    /// delivery in hand was then handed back or left unacknowledged (the broker delivers it
    /// again), and the connection was reset: the next call reconnects.
    pub fn run_once(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport, S::Error> {
        self.step(handler, max, wait, None)
    }

    /// Runs steps until `stop` is stopped and returns the summed report. A retryable failure
    /// (a lost connection, a dead-letter destination that is missing) is logged, paused on
    /// (the reconnect delay, ending early on stop) and retried: the loop never exits on a
    /// broker that is down. On stop it settles the delivery in hand and hands back what it
    /// fetched ahead ([`Subscription::release_fetched`], also when the stop came between
    /// steps).
    ///
    /// # Errors
    ///
    /// Only an error that retrying cannot fix ([`Retryable::is_retryable`] is `false`), e.g. a
    /// refused login.
    pub fn run(
        &mut self,
        handler: &mut impl DeliveryHandler,
        stop: &StopHandle,
    ) -> Result<ConsumeReport, S::Error> {
        let mut total = ConsumeReport::default();
        let mut delay = self.first_reconnect_delay;
        while !stop.is_stopped() {
            match self.step(handler, self.batch, self.poll_wait, Some(stop)) {
                Ok(report) => {
                    total.add(&report);
                    delay = self.first_reconnect_delay;
                }
                Err(error) if error.is_retryable() => {
                    log::warn!(
                        "consuming {} failed, going on in {delay:?}: {}",
                        self.subscription.name(),
                        chain(&error)
                    );
                    stop.wait(delay);
                    delay = (delay * 2).min(self.max_reconnect_delay);
                }
                Err(error) => {
                    log::error!(
                        "consuming {} failed for good: {}",
                        self.subscription.name(),
                        chain(&error)
                    );
                    return Err(error);
                }
            }
        }
        // Whether the stop came mid-step or between steps, nothing fetched ahead stays held.
        if let Err(error) = self.subscription.release_fetched() {
            log::warn!(
                "{}: handing back deliveries fetched ahead failed, the broker redelivers them \
                 later: {}",
                self.subscription.name(),
                chain(&error)
            );
        }
        Ok(total)
    }

    fn step(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
        stop: Option<&StopHandle>,
    ) -> Result<ConsumeReport, S::Error> {
        let mut report = ConsumeReport::default();
        let result = self.consume(handler, max.max(1), wait, stop, &mut report);
        if result.is_err() {
            // The error itself is the caller's to log (`run` does, once).
            log::debug!("{}: resetting the connection", self.subscription.name());
            self.subscription.reset();
        }
        report.record(self.subscription.name());
        if report.delivered > 0 {
            log::debug!("{}: {report:?}", self.subscription.name());
        } else {
            log::trace!("{}: nothing to consume", self.subscription.name());
        }
        result.map(|()| report)
    }

    fn consume(
        &mut self,
        handler: &mut impl DeliveryHandler,
        max: usize,
        wait: Duration,
        stop: Option<&StopHandle>,
        report: &mut ConsumeReport,
    ) -> Result<(), S::Error> {
        for taken in 0..max {
            if taken > 0 && stop.is_some_and(StopHandle::is_stopped) {
                break; // `run` hands back what was fetched ahead
            }
            let timeout = if taken == 0 { wait } else { Duration::ZERO };
            let Some(delivery) = self.subscription.next(timeout, max - taken)? else {
                break;
            };
            report.delivered += 1;
            self.settle(handler, delivery, report)?;
        }
        Ok(())
    }

    /// Handles one delivery and settles it exactly once.
    fn settle(
        &mut self,
        handler: &mut impl DeliveryHandler,
        delivery: S::Delivery,
        report: &mut ConsumeReport,
    ) -> Result<(), S::Error> {
        let message = match self.subscription.decode(&delivery) {
            Ok(message) => message,
            Err(error) => {
                report.malformed += 1;
                let reason = format!("malformed: {}", chain(&error));
                return self.dead_letter(delivery, "-", &reason, 0, report);
            }
        };
        let earlier = self.subscription.earlier_deliveries(&delivery);
        // Retried in place: the next delivery is taken only once this one is settled.
        let handled = self.retry.handle(handler, &message, earlier);
        report.retried += u64::from(handled.retries());
        match handled.outcome {
            Outcome::Ack => {
                self.subscription.ack(delivery)?;
                report.acked += 1;
                Ok(())
            }
            Outcome::DeadLetter(reason) => {
                let deliveries = earlier.saturating_add(handled.attempts);
                let id = message.id.to_string();
                self.dead_letter(delivery, &id, &reason, deliveries, report)
            }
        }
    }

    fn dead_letter(
        &mut self,
        delivery: S::Delivery,
        id: &str,
        reason: &str,
        deliveries: u32,
        report: &mut ConsumeReport,
    ) -> Result<(), S::Error> {
        let reason = one_line(reason);
        let letter = DeadLetter {
            reason: &reason,
            deliveries,
        };
        match self.subscription.dead_letter(&delivery, &letter) {
            Ok(()) => {
                log::error!(
                    "{}: message {id} dead-lettered: {reason}",
                    self.subscription.name()
                );
                self.subscription.discard(delivery)?;
                report.dead_lettered += 1;
                Ok(())
            }
            Err(error) => {
                log::error!(
                    "{}: message {id} could not be dead-lettered ({reason}), handed back to \
                     the broker: {}",
                    self.subscription.name(),
                    chain(&error)
                );
                if let Err(release) = self.subscription.release(delivery) {
                    log::warn!(
                        "{}: handing message {id} back failed, the broker redelivers it \
                         later: {release}",
                        self.subscription.name()
                    );
                }
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use waybill_outbox_core::{Headers, MessageId};

    use super::*;
    use crate::{wire, DecodeError, Disposition, IncomingMessage};

    #[derive(Debug, thiserror::Error)]
    #[error("broker said no (retryable: {0})")]
    struct BrokerError(bool);

    impl Retryable for BrokerError {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }

    /// A queue whose dead-letter destination can be missing, as a broker's can.
    #[derive(Default)]
    struct Queue {
        queued: VecDeque<(Headers, Vec<u8>)>,
        acked: Vec<String>,
        dead: Vec<String>,
        dead_letter_missing: bool,
        released: usize,
        resets: usize,
        fetched_released: usize,
    }

    impl Queue {
        fn push(&mut self, key: &str) {
            let headers = Headers::from([
                (wire::MESSAGE_ID.to_owned(), MessageId::new().to_string()),
                (wire::TOPIC.to_owned(), "orders".to_owned()),
                (wire::MESSAGE_TYPE.to_owned(), "OrderPlaced".to_owned()),
                (wire::SENT_AT.to_owned(), "2026-12-05T10:00:00Z".to_owned()),
                ("key".to_owned(), key.to_owned()),
            ]);
            self.queued.push_back((headers, b"{}".to_vec()));
        }
    }

    impl Subscription for Queue {
        type Delivery = (Headers, Vec<u8>);
        type Error = BrokerError;

        fn name(&self) -> &str {
            "test-queue"
        }

        fn next(&mut self, _: Duration, _: usize) -> Result<Option<Self::Delivery>, BrokerError> {
            Ok(self.queued.pop_front())
        }

        fn decode(
            &self,
            (headers, payload): &Self::Delivery,
        ) -> Result<IncomingMessage, DecodeError> {
            wire::decode(headers.clone(), payload.clone())
        }

        fn ack(&mut self, (headers, _): Self::Delivery) -> Result<(), BrokerError> {
            self.acked
                .push(headers.get("key").cloned().unwrap_or_default());
            Ok(())
        }

        fn dead_letter(
            &mut self,
            _: &Self::Delivery,
            letter: &DeadLetter<'_>,
        ) -> Result<(), BrokerError> {
            if self.dead_letter_missing {
                return Err(BrokerError(true));
            }
            self.dead.push(letter.reason.to_owned());
            Ok(())
        }

        fn discard(&mut self, _: Self::Delivery) -> Result<(), BrokerError> {
            Ok(())
        }

        fn release(&mut self, delivery: Self::Delivery) -> Result<(), BrokerError> {
            self.released += 1;
            self.queued.push_front(delivery);
            Ok(())
        }

        fn release_fetched(&mut self) -> Result<(), BrokerError> {
            self.fetched_released += 1;
            Ok(())
        }

        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy::default()
            .max_deliveries(3)
            .backoff(Duration::ZERO, Duration::ZERO)
    }

    fn key(message: &IncomingMessage) -> String {
        message.headers.get("key").cloned().unwrap_or_default()
    }

    #[test]
    fn a_retried_message_is_settled_before_the_next_one_is_taken() {
        let mut queue = Queue::default();
        for k in ["k#1", "k#2"] {
            queue.push(k);
        }
        let mut consumer = ConsumerLoop::new(queue, quick());
        let (mut calls, mut effects) = (Vec::new(), Vec::new());
        let mut handler = |message: &IncomingMessage| {
            calls.push(key(message));
            if key(message) == "k#1" && calls.len() < 3 {
                return Disposition::Retry("deadlock".into());
            }
            effects.push(key(message));
            Disposition::Ack
        };
        let report = consumer.run_once(&mut handler, 10, Duration::ZERO);
        assert_eq!(effects, ["k#1", "k#2"]);
        assert_eq!(calls, ["k#1", "k#1", "k#1", "k#2"]);
        let report = report.ok();
        assert_eq!(
            report.map(|r| (r.delivered, r.acked, r.retried)),
            Some((2, 2, 2))
        );
        assert_eq!(consumer.subscription().acked, ["k#1", "k#2"]);
    }

    #[test]
    fn a_panicking_handler_is_retried_then_dead_lettered_and_the_loop_goes_on() {
        let mut queue = Queue::default();
        for k in ["poison", "fine"] {
            queue.push(k);
        }
        let mut consumer = ConsumerLoop::new(queue, quick());
        let mut handler = |message: &IncomingMessage| {
            assert_ne!(key(message), "poison", "poisoned");
            Disposition::Ack
        };
        let report = consumer.run_once(&mut handler, 10, Duration::ZERO).ok();
        assert_eq!(
            report.map(|r| (r.acked, r.retried, r.dead_lettered)),
            Some((1, 2, 1))
        );
        let queue = consumer.subscription();
        assert_eq!(queue.acked, ["fine"]);
        assert!(
            queue.dead[0].contains("failed 3 deliveries") && queue.dead[0].contains("poisoned")
        );
    }

    #[test]
    fn a_dead_letter_that_cannot_be_stored_is_handed_back_not_counted_and_not_lost() {
        let mut queue = Queue::default();
        queue
            .queued
            .push_back((Headers::new(), b"garbage".to_vec()));
        queue.push("after");
        queue.dead_letter_missing = true;
        let mut consumer = ConsumerLoop::new(queue, quick());
        let mut handler = |_: &IncomingMessage| Disposition::Ack;
        let failed = consumer.run_once(&mut handler, 10, Duration::ZERO);
        assert!(failed.is_err());
        let queue = consumer.subscription();
        assert_eq!(
            (queue.released, queue.resets, queue.queued.len()),
            (1, 1, 2)
        );
        assert!(
            queue.dead.is_empty() && queue.acked.is_empty(),
            "nothing behind it overtook it"
        );

        consumer.subscription_mut().dead_letter_missing = false;
        let report = consumer.run_once(&mut handler, 10, Duration::ZERO).ok();
        assert_eq!(
            report.map(|r| (r.malformed, r.dead_lettered, r.acked)),
            Some((1, 1, 1))
        );
        assert_eq!(consumer.subscription().dead.len(), 1);
        assert!(consumer.subscription().dead[0].starts_with("malformed: "));
    }

    #[test]
    fn run_goes_on_after_a_retryable_failure_and_stops_on_the_handle() {
        let mut queue = Queue::default();
        queue.push("first");
        queue.dead_letter_missing = true;
        let stop = StopHandle::new();
        let mut consumer = ConsumerLoop::new(queue, quick().max_deliveries(1))
            .reconnect_delay(Duration::ZERO, Duration::ZERO);
        let mut failures = 0;
        let mut handler = |_: &IncomingMessage| {
            failures += 1;
            if failures == 3 {
                stop.stop();
            }
            Disposition::Retry("not yet".into())
        };
        let report = consumer.run(&mut handler, &stop).ok();
        // Each round the dead letter failed, the message came back and was tried again.
        assert_eq!(report.map(|r| r.dead_lettered), Some(0));
        assert_eq!(consumer.subscription().queued.len(), 1);
        assert_eq!(consumer.subscription().resets, 3);
    }

    #[test]
    fn run_hands_back_what_was_fetched_ahead_whenever_it_stops() {
        // Stopped mid-step (two of three taken) and at the end of a step.
        for stop_at in [2, 3] {
            let mut queue = Queue::default();
            for k in 0..5 {
                queue.push(&format!("k#{k}"));
            }
            let stop = StopHandle::new();
            let mut consumer = ConsumerLoop::new(queue, quick()).batch(3, Duration::ZERO);
            let mut handled = 0;
            let mut handler = |_: &IncomingMessage| {
                handled += 1;
                if handled == stop_at {
                    stop.stop();
                }
                Disposition::Ack
            };
            let report = consumer.run(&mut handler, &stop).ok();
            assert_eq!(report.map(|r| r.acked), Some(stop_at));
            assert_eq!(
                consumer.subscription().fetched_released,
                1,
                "stop at {stop_at}"
            );
        }
    }
}
