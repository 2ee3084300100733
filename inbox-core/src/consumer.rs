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
    /// Failed, may work later: negatively acknowledge so the broker redelivers, up to the
    /// transport's redelivery limit, then dead-letter with the reason.
    Retry(String),
    /// Will never work (malformed, expired, refused): dead-letter at once with the reason.
    DeadLetter(String),
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
