//! The audit: what both services' databases say about every order.

use waybill_diesel::topic_stats;

use crate::db::{AppConnection, DbPool};
use crate::Error;

/// Counts from both databases. Field names are the `report` subcommand's JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Report {
    /// Orders placed.
    pub(crate) orders: i64,
    /// Orders marked paid by the orders service.
    pub(crate) orders_paid: i64,
    /// Messages not yet published, over both services' outboxes.
    pub(crate) outbox_pending: i64,
    /// Messages parked for an operator, over both outboxes.
    pub(crate) outbox_parked: i64,
    /// Rows in billing's ledger.
    pub(crate) charges: i64,
    /// Orders with exactly one charge.
    pub(crate) orders_charged_once: i64,
    /// Orders charged twice or more: what the inbox must prevent.
    pub(crate) orders_charged_more_than_once: i64,
    /// Orders without a charge (yet).
    pub(crate) orders_not_charged: i64,
    /// Redeliveries that both inboxes skipped as duplicates.
    pub(crate) inbox_duplicates: i64,
}

impl Report {
    /// Every order charged exactly once and paid, and nothing left to publish.
    pub(crate) fn is_settled(&self) -> bool {
        self.orders_charged_once == self.orders
            && self.orders_charged_more_than_once == 0
            && self.orders_paid == self.orders
            && self.outbox_pending == 0
    }
}

impl Report {
    /// What changed since `before`; what is pending or parked stays as it is now.
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self {
            orders: self.orders - before.orders,
            orders_paid: self.orders_paid - before.orders_paid,
            charges: self.charges - before.charges,
            orders_charged_once: self.orders_charged_once - before.orders_charged_once,
            orders_charged_more_than_once: self.orders_charged_more_than_once
                - before.orders_charged_more_than_once,
            orders_not_charged: self.orders_not_charged - before.orders_not_charged,
            inbox_duplicates: self.inbox_duplicates - before.inbox_duplicates,
            ..*self
        }
    }
}

/// Reads the report from the orders and the billing database.
///
/// # Errors
///
/// Database errors.
pub(crate) fn audit<O: AppConnection, B: AppConnection>(
    orders_db: &DbPool<O>,
    billing_db: &DbPool<B>,
) -> Result<Report, Error> {
    let mut orders = orders_db.get()?;
    let mut billing = billing_db.get()?;
    let mut report = Report {
        orders: orders.count("SELECT count(*) AS n FROM orders")?,
        orders_paid: orders.count("SELECT count(*) AS n FROM orders WHERE paid")?,
        charges: billing.count("SELECT count(*) AS n FROM charges")?,
        orders_charged_once: billing.count(
            "SELECT count(*) AS n FROM \
             (SELECT order_id FROM charges GROUP BY order_id HAVING count(*) = 1) once",
        )?,
        orders_charged_more_than_once: billing.count(
            "SELECT count(*) AS n FROM \
             (SELECT order_id FROM charges GROUP BY order_id HAVING count(*) > 1) again",
        )?,
        inbox_duplicates: orders.count("SELECT count(*) AS n FROM inbox_duplicates")?
            + billing.count("SELECT count(*) AS n FROM inbox_duplicates")?,
        ..Report::default()
    };
    // Billing charges only orders it heard of, so the rest are the orders not charged.
    report.orders_not_charged =
        report.orders - report.orders_charged_once - report.orders_charged_more_than_once;
    for stats in topic_stats(&mut *orders)?
        .into_iter()
        .chain(topic_stats(&mut *billing)?)
    {
        report.outbox_pending += stats.pending;
        report.outbox_parked += stats.parked;
    }
    Ok(report)
}
