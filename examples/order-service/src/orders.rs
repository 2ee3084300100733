//! The orders service: places an order and its `OrderPlaced` event in one transaction, and
//! marks the order paid when billing's `PaymentCaptured` arrives.

use waybill_diesel::{enqueue, IncomingMessage};
use waybill_outbox_core::NewOutboxMessage;

use crate::db::{AppConnection, Order};
use crate::Error;

/// The orders' outbox topic.
pub(crate) const ORDERS_TOPIC: &str = "orders";
/// The orders service's inbox (consumer) name.
pub(crate) const ORDERS_CONSUMER: &str = "orders";

/// Published by the orders service when an order is placed.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct OrderPlaced {
    /// The order.
    pub(crate) order_id: i64,
    /// What to charge.
    pub(crate) amount_cents: i64,
}

/// Published by billing once it charged an order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PaymentCaptured {
    /// The order that was charged.
    pub(crate) order_id: i64,
    /// The charge's row in billing's ledger.
    pub(crate) charge_id: i64,
    /// What was charged.
    pub(crate) amount_cents: i64,
}

/// Why an order was refused before anything was written.
pub(crate) fn validate(customer: &str, amount_cents: i64) -> Result<(), String> {
    if customer.trim().is_empty() {
        return Err("customer must not be empty".to_owned());
    }
    if amount_cents <= 0 {
        return Err(format!("amount_cents must be positive, got {amount_cents}"));
    }
    Ok(())
}

/// Writes the order and its `OrderPlaced` event in one transaction: both commit, or neither.
///
/// # Errors
///
/// An invalid order (nothing written) or a database error (rolled back).
pub(crate) fn place_order<C: AppConnection>(
    conn: &mut C,
    customer: &str,
    amount_cents: i64,
) -> Result<Order, Error> {
    validate(customer, amount_cents)?;
    conn.transaction(|conn| {
        let order = conn.insert_order(customer, amount_cents)?;
        let event = OrderPlaced {
            order_id: order.id,
            amount_cents,
        };
        let message = NewOutboxMessage::json(
            ORDERS_TOPIC,
            format!("order:{}", order.id),
            "OrderPlaced",
            &event,
        )?;
        enqueue(conn, &message)?;
        Ok(order)
    })
}

/// The orders service's inbox handler: a `PaymentCaptured` marks its order paid.
///
/// # Errors
///
/// A payload that is not a `PaymentCaptured`, or a database error: the inbox rolls back and
/// the delivery is retried.
pub(crate) fn mark_paid<C: AppConnection>(
    conn: &mut C,
    message: &IncomingMessage,
) -> Result<(), Error> {
    let payment: PaymentCaptured = message.json()?;
    if conn.mark_paid(payment.order_id)? == 0 {
        return Err(format!("payment for unknown order {}", payment.order_id).into());
    }
    Ok(())
}
