//! The retry contract every consumer loop shares: a failed or panicking handler is called again
//! for the same delivery, in place, before the loop takes the next message.
//!
//! Sending a retry back to the broker (a re-publish to the queue's tail, a NATS `nak`) lets the
//! key's later messages overtake it. Retrying in place keeps per-key order: the next message is
//! only taken once this one was acknowledged or dead-lettered.

use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use crate::{DeliveryHandler, Disposition, IncomingMessage};

/// The header every transport puts on a dead letter: why it was dead-lettered (one line).
pub const DEAD_LETTER_REASON: &str = "waybill-dead-letter-reason";

/// How often and how patiently a consumer loop calls its handler for one message.
///
/// `max_deliveries` counts every handler call for a message, the first one included; a handler
/// that still returns [`Disposition::Retry`] (or panics) on the last one gets the message
/// dead-lettered. Between in-place attempts the loop pauses, starting at `first_backoff` and
/// doubling up to `max_backoff`. The pauses hold up the messages behind this one, so keep them
/// short: they are for a deadlock or a lost pool connection, not for an outage.
///
/// ```
/// use std::time::Duration;
/// use waybill_inbox_core::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_deliveries(3)
///     .backoff(Duration::from_millis(10), Duration::from_millis(40));
/// assert_eq!(policy.max_deliveries_allowed(), 3);
/// assert_eq!(policy.backoff_after(1), Duration::from_millis(10));
/// assert_eq!(policy.backoff_after(4), Duration::from_millis(40));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    max_deliveries: u32,
    first_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// What became of one message after [`RetryPolicy::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned [`Disposition::Ack`]: acknowledge.
    Ack,
    /// The handler refused it, or it failed on every allowed delivery: dead-letter it with
    /// this reason.
    DeadLetter(String),
}

/// The result of [`RetryPolicy::handle`]: the outcome and how many handler calls it took.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Handled {
    /// Acknowledge or dead-letter.
    pub outcome: Outcome,
    /// Handler calls made for this delivery (at least 1).
    pub attempts: u32,
}

impl Handled {
    /// In-place retries made: every call after the first.
    pub fn retries(&self) -> u32 {
        self.attempts.saturating_sub(1)
    }
}

impl RetryPolicy {
    /// Handler calls for one message before it is dead-lettered, the first call included.
    /// Defaults to 5. Values below 1 count as 1.
    #[must_use]
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.max_deliveries = max.max(1);
        self
    }

    /// The pause before the first in-place retry and the longest one (each pause doubles).
    /// Defaults to 50 ms and 1 s, so the default 5 deliveries wait 0.75 s in all.
    #[must_use]
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The configured handler calls per message.
    pub fn max_deliveries_allowed(&self) -> u32 {
        self.max_deliveries
    }

    /// The pause after the `attempt`-th failed call (1-based).
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }

    /// Calls `handler` for `message` until it acknowledges or refuses it, or the deliveries
    /// run out, pausing between attempts. A panic in the handler is caught and counts as a
    /// failed attempt. `earlier` is how many times the handler saw the message in earlier
    /// deliveries (a broker redelivery after a crash); the handler always gets at least one
    /// call, so a message is never dead-lettered for deliveries its handler never saw.
    pub fn handle(
        &self,
        handler: &mut impl DeliveryHandler,
        message: &IncomingMessage,
        earlier: u32,
    ) -> Handled {
        let allowed = self.max_deliveries.saturating_sub(earlier).max(1);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let reason = match call(handler, message) {
                Disposition::Ack => {
                    return Handled {
                        outcome: Outcome::Ack,
                        attempts,
                    }
                }
                Disposition::DeadLetter(reason) => {
                    return Handled {
                        outcome: Outcome::DeadLetter(reason),
                        attempts,
                    }
                }
                Disposition::Retry(reason) => reason,
            };
            let delivery = earlier + attempts;
            if attempts >= allowed {
                return Handled {
                    outcome: Outcome::DeadLetter(format!(
                        "failed {delivery} deliveries, the limit; last error: {reason}"
                    )),
                    attempts,
                };
            }
            let pause = self.backoff_after(attempts);
            log::warn!(
                "message {} failed (delivery {delivery}/{}), retrying in {pause:?}: {reason}",
                message.id,
                self.max_deliveries
            );
            std::thread::sleep(pause);
        }
    }
}

/// Calls the handler, turning a panic into [`Disposition::Retry`] with the panic's message.
fn call(handler: &mut impl DeliveryHandler, message: &IncomingMessage) -> Disposition {
    // The handler's state may be half updated after a panic; the next call sees it as a
    // handler sees its state after any failure, and an inbox handler rolled back its writes.
    match panic::catch_unwind(AssertUnwindSafe(|| handler.handle(message))) {
        Ok(disposition) => disposition,
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text payload".to_owned());
            Disposition::Retry(format!("handler panicked: {text}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waybill_outbox_core::MessageId;

    fn message() -> IncomingMessage {
        IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}")
    }

    fn quick() -> RetryPolicy {
        RetryPolicy::default().backoff(Duration::ZERO, Duration::ZERO)
    }

    #[test]
    fn a_transient_failure_is_retried_in_place_until_it_succeeds() {
        let mut calls = 0;
        let mut handler = |_: &IncomingMessage| {
            calls += 1;
            if calls < 3 {
                Disposition::Retry("deadlock".into())
            } else {
                Disposition::Ack
            }
        };
        let handled = quick().handle(&mut handler, &message(), 0);
        assert_eq!((handled.outcome, handled.attempts), (Outcome::Ack, 3));
    }

    #[test]
    fn max_deliveries_counts_every_handler_call() {
        let mut calls = 0;
        let mut handler = |_: &IncomingMessage| {
            calls += 1;
            Disposition::Retry("down".into())
        };
        let handled = quick()
            .max_deliveries(4)
            .handle(&mut handler, &message(), 0);
        assert_eq!(calls, 4);
        assert_eq!(handled.retries(), 3);
        assert!(
            matches!(handled.outcome, Outcome::DeadLetter(r) if r.contains("failed 4 deliveries") && r.contains("down"))
        );
    }

    #[test]
    fn a_panic_is_a_failed_attempt() {
        let mut handler = |_: &IncomingMessage| -> Disposition { panic!("boom") };
        let handled = quick()
            .max_deliveries(2)
            .handle(&mut handler, &message(), 0);
        assert_eq!(handled.attempts, 2);
        assert!(
            matches!(handled.outcome, Outcome::DeadLetter(r) if r.contains("handler panicked: boom"))
        );
    }

    #[test]
    fn earlier_deliveries_shrink_the_budget_but_the_handler_always_gets_one_call() {
        let mut calls = 0;
        let mut handler = |_: &IncomingMessage| {
            calls += 1;
            Disposition::Retry("no".into())
        };
        quick()
            .max_deliveries(3)
            .handle(&mut handler, &message(), 2);
        quick()
            .max_deliveries(3)
            .handle(&mut handler, &message(), 7);
        assert_eq!(calls, 2);
    }

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let policy =
            RetryPolicy::default().backoff(Duration::from_millis(10), Duration::from_millis(50));
        let pauses: Vec<_> = (1..=5)
            .map(|n| policy.backoff_after(n).as_millis())
            .collect();
        assert_eq!(pauses, [10, 20, 40, 50, 50]);
        assert_eq!(policy.backoff_after(u32::MAX), Duration::from_millis(50));
    }
}
