//! The billing service: charges each placed order by appending to its ledger, and announces
//! `PaymentCaptured` through its own outbox in the same transaction.

use waybill_diesel::{enqueue, IncomingMessage};
use waybill_outbox_core::NewOutboxMessage;

use crate::db::AppConnection;
use crate::orders::{OrderPlaced, PaymentCaptured};
use crate::Error;

/// Billing's outbox topic.
pub(crate) const PAYMENTS_TOPIC: &str = "payments";
/// Billing's inbox (consumer) name.
pub(crate) const BILLING_CONSUMER: &str = "billing";

/// Billing's inbox handler. It runs inside the inbox's transaction, so the charge, the
/// `PaymentCaptured` event and the dedup record commit together: a redelivered `OrderPlaced`
/// is skipped by the inbox and never reaches this function twice.
///
/// # Errors
///
/// A payload that is not an `OrderPlaced`, or a database error: all rolled back, retried.
pub(crate) fn charge<C: AppConnection>(
    conn: &mut C,
    message: &IncomingMessage,
) -> Result<(), Error> {
    let order: OrderPlaced = message.json()?;
    let charge_id = conn.insert_charge(order.order_id, order.amount_cents)?;
    let event = PaymentCaptured {
        order_id: order.order_id,
        charge_id,
        amount_cents: order.amount_cents,
    };
    let message = NewOutboxMessage::json(
        PAYMENTS_TOPIC,
        format!("order:{}", order.order_id),
        "PaymentCaptured",
        &event,
    )?;
    enqueue(conn, &message)?;
    Ok(())
}
