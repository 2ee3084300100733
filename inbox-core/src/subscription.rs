//! What a transport implements so that the shared [`ConsumerLoop`](crate::ConsumerLoop) can
//! consume from its broker: fetch a delivery, decode it, settle it.

use std::time::Duration;

use waybill_outbox_core::Retryable;

use crate::{DecodeError, IncomingMessage};

/// One broker's deliveries, as the shared [`ConsumerLoop`](crate::ConsumerLoop) sees them.
///
/// The loop calls [`next`](Self::next), decodes the delivery, runs the handler (retrying in
/// place), then settles the delivery exactly once with [`ack`](Self::ack), with
/// [`dead_letter`](Self::dead_letter) followed by [`discard`](Self::discard), or, when the
/// dead letter could not be stored, with [`release`](Self::release). It asks for the next
/// delivery only once the previous one is settled, which is what keeps a key's messages in
/// order through retries. After any error it calls [`reset`](Self::reset) and returns the
/// error; the next call to `next` reconnects.
///
/// ```
/// use std::collections::VecDeque;
/// use std::time::Duration;
/// use waybill_inbox_core::{wire, ConsumerLoop, DeadLetter, DecodeError, Disposition,
///     IncomingMessage, RetryPolicy, Subscription};
/// use waybill_outbox_core::{Headers, Retryable};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("never fails")]
/// struct Never;
/// impl Retryable for Never {
///     fn is_retryable(&self) -> bool { false }
/// }
///
/// /// A queue in a `VecDeque`: what a transport crate writes for its broker.
/// #[derive(Default)]
/// struct Queue { queued: VecDeque<(Headers, Vec<u8>)>, acked: usize, dead: Vec<String> }
///
/// impl Subscription for Queue {
///     type Delivery = (Headers, Vec<u8>);
///     type Error = Never;
///     fn name(&self) -> &str { "queue" }
///     fn next(&mut self, _: Duration, _: usize) -> Result<Option<Self::Delivery>, Never> {
///         Ok(self.queued.pop_front())
///     }
///     fn decode(&self, (headers, payload): &Self::Delivery) -> Result<IncomingMessage, DecodeError> {
///         wire::decode(headers.clone(), payload.clone())
///     }
///     fn ack(&mut self, _: Self::Delivery) -> Result<(), Never> { self.acked += 1; Ok(()) }
///     fn dead_letter(&mut self, _: &Self::Delivery, letter: &DeadLetter<'_>) -> Result<(), Never> {
///         self.dead.push(letter.reason.to_owned());
///         Ok(())
///     }
///     fn release(&mut self, delivery: Self::Delivery) -> Result<(), Never> {
///         self.queued.push_front(delivery);
///         Ok(())
///     }
/// }
///
/// let mut queue = Queue::default();
/// let headers = Headers::from([
///     ("ce-specversion".to_owned(), "1.0".to_owned()),
///     ("ce-source".to_owned(), "/checkout".to_owned()),
///     ("ce-id".to_owned(), waybill_outbox_core::MessageId::new().to_string()),
///     ("ce-waybilltopic".to_owned(), "orders".to_owned()),
///     ("ce-type".to_owned(), "OrderPlaced".to_owned()),
///     ("ce-time".to_owned(), "2026-12-05T10:00:00Z".to_owned()),
/// ]);
/// queue.queued.push_back((headers, b"{}".to_vec()));
/// queue.queued.push_back((Headers::new(), b"not ours".to_vec()));
///
/// let mut consumer = ConsumerLoop::new(queue, RetryPolicy::default());
/// let mut handler = |_: &IncomingMessage| Disposition::Ack;
/// let report = consumer.run_once(&mut handler, 10, Duration::ZERO)?;
/// assert_eq!((report.acked, report.malformed, report.dead_lettered), (1, 1, 1));
/// assert!(consumer.subscription().dead[0].starts_with("malformed"));
/// # Ok::<(), Never>(())
/// ```
pub trait Subscription {
    /// One delivery as the broker client hands it out.
    type Delivery;
    /// The transport's error. [`Retryable::is_retryable`] tells the loop's `run` whether to
    /// reconnect and go on (a lost connection) or to give up (a refused login).
    type Error: std::error::Error + Retryable + 'static;

    /// What is consumed (a queue, a durable consumer, a topic), for logs and the metrics'
    /// `consumer` label.
    fn name(&self) -> &str;

    /// The next delivery, waiting at most `wait` for one; `None` when none came. `wanted` is
    /// how many deliveries the loop still means to take in this step: never fetch ahead more
    /// than that, so nothing is left fetched but unhandled when the step ends. Connects first
    /// when there is no live connection.
    ///
    /// # Errors
    ///
    /// A lost connection or any other failure of the broker client.
    fn next(
        &mut self,
        wait: Duration,
        wanted: usize,
    ) -> Result<Option<Self::Delivery>, Self::Error>;

    /// The message the handler sees, read from the delivery (usually [`crate::wire::decode`]).
    ///
    /// # Errors
    ///
    /// Why the delivery cannot be read; the loop dead-letters it as malformed.
    fn decode(&self, delivery: &Self::Delivery) -> Result<IncomingMessage, DecodeError>;

    /// How many times a handler already saw this message in earlier deliveries (a consumer that
    /// crashed or lost its connection mid-way); 0 when the broker does not know. It only
    /// shrinks the handler calls left: the handler always gets at least one.
    fn earlier_deliveries(&self, _delivery: &Self::Delivery) -> u32 {
        0
    }

    /// Acknowledges a handled delivery: the broker forgets it.
    ///
    /// # Errors
    ///
    /// The acknowledgement could not be sent; the broker will deliver the message again.
    fn ack(&mut self, delivery: Self::Delivery) -> Result<(), Self::Error>;

    /// Stores a copy of the delivery, with `letter`'s reason, where an operator finds it (a
    /// dead-letter queue or stream), and returns once the broker confirmed it. The original is
    /// settled afterwards by [`discard`](Self::discard).
    ///
    /// # Errors
    ///
    /// The copy was not stored (destination missing, refused, connection lost); the loop then
    /// [releases](Self::release) the original so nothing is lost.
    fn dead_letter(
        &mut self,
        delivery: &Self::Delivery,
        letter: &DeadLetter<'_>,
    ) -> Result<(), Self::Error>;

    /// Removes a dead-lettered delivery from the queue. Defaults to [`ack`](Self::ack).
    ///
    /// # Errors
    ///
    /// As for [`ack`](Self::ack).
    fn discard(&mut self, delivery: Self::Delivery) -> Result<(), Self::Error> {
        self.ack(delivery)
    }

    /// Hands an unsettled delivery back to the broker, to be delivered again before the later
    /// messages of its key where the broker can (a requeue, a `nak`).
    ///
    /// # Errors
    ///
    /// The broker could not be told; it redelivers the message anyway once the connection
    /// closes or the acknowledgement wait runs out.
    fn release(&mut self, delivery: Self::Delivery) -> Result<(), Self::Error>;

    /// Hands back deliveries fetched ahead but not yet returned by [`next`](Self::next), when the
    /// loop stops before taking them. Defaults to nothing to do.
    ///
    /// # Errors
    ///
    /// As for [`release`](Self::release).
    fn release_fetched(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Drops the connection after an error so that [`next`](Self::next) reconnects;
    /// deliveries not yet settled go back to the broker. Defaults to nothing to do.
    fn reset(&mut self) {}
}

/// Why a delivery is dead-lettered, handed to [`Subscription::dead_letter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter<'a> {
    /// One line, at most [`DeadLetter::MAX_REASON_BYTES`]: put it in the
    /// [`DEAD_LETTER_REASON`](crate::DEAD_LETTER_REASON) header.
    pub reason: &'a str,
    /// Handler calls this message had, earlier deliveries included (0 when malformed).
    pub deliveries: u32,
}

impl DeadLetter<'_> {
    /// The longest reason a dead letter carries, so that it fits in a header.
    pub const MAX_REASON_BYTES: usize = 1024;
}

/// `reason` fit for a header value: one line, at most [`DeadLetter::MAX_REASON_BYTES`].
pub(crate) fn one_line(reason: &str) -> String {
    let mut line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > DeadLetter::MAX_REASON_BYTES {
        let mut end = DeadLetter::MAX_REASON_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_single_bounded_lines() {
        assert_eq!(one_line("a\r\nb"), "a  b");
        let long = "é".repeat(DeadLetter::MAX_REASON_BYTES);
        let line = one_line(&long);
        assert!(line.len() <= DeadLetter::MAX_REASON_BYTES && line.chars().all(|c| c == 'é'));
    }
}
