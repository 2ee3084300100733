//! The seam between a transport's consumer loop and the code that handles a message.

use crate::IncomingMessage;

/// What a consumer loop does with a delivery once the handler has returned.
///
/// A transport acknowledges only after the handler returned [`Disposition::Ack`], which a
/// handler built on the inbox returns only after its database transaction committed: a crash in
/// between leads to a redelivery, which the inbox then skips as a duplicate.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// Done (handled now, or a duplicate of something handled before): acknowledge.
    Ack,
    /// Failed, may work later: the consumer loop calls the handler again for the same delivery,
    /// before the next message, up to its [`RetryPolicy`](crate::RetryPolicy)'s max
    /// deliveries, then dead-letters it with the reason.
    Retry(String),
    /// Will never work (malformed, expired, refused): dead-letter at once with the reason.
    DeadLetter(String),
}

/// What a transport's consumer loop did in one `run_once` or `run`: the same counts for every
/// transport (re-exported by each as its own `ConsumeReport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeReport {
    /// Deliveries received (redeliveries count again), malformed ones included.
    pub delivered: u64,
    /// Deliveries acknowledged after the handler returned [`Disposition::Ack`].
    pub acked: u64,
    /// In-place retries: handler calls repeated after [`Disposition::Retry`] or a panic.
    pub retried: u64,
    /// Deliveries dead-lettered: the handler's [`Disposition::DeadLetter`], redeliveries
    /// exhausted, or malformed.
    pub dead_lettered: u64,
    /// Deliveries that could not be decoded (see [`wire::decode`](crate::wire::decode)); they
    /// are dead-lettered.
    pub malformed: u64,
}

impl ConsumeReport {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Self) {
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.malformed += other.malformed;
    }

    /// Adds these counts to the consumer metrics of `consumer` (see [`crate::metrics`]).
    pub fn record(&self, consumer: &str) {
        crate::metrics::record_consume(consumer, self);
    }
}

/// Handles decoded deliveries for a transport's consumer loop. Closures implement it.
///
/// ```
/// use waybill_inbox_core::{DeliveryHandler, Disposition, IncomingMessage};
///
/// let mut seen = 0;
/// let mut handler = |_: &IncomingMessage| { seen += 1; Disposition::Ack };
/// # let msg = IncomingMessage::new(waybill_outbox_core::MessageId::new(), "orders", "OrderPlaced", "{}");
/// assert_eq!(handler.handle(&msg), Disposition::Ack);
/// ```
pub trait DeliveryHandler {
    /// Handles one message and says what to do with the delivery.
    fn handle(&mut self, message: &IncomingMessage) -> Disposition;
}

impl<F: FnMut(&IncomingMessage) -> Disposition> DeliveryHandler for F {
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        self(message)
    }
}
