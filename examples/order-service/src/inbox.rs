//! Wires a service's inbox to a broker consumer, counting the duplicates it skips.
//!
//! waybill's `InboxHandler` counts duplicates in the process (`duplicates()` and the
//! `waybill_consumer_duplicates_skipped_total` metric); this one writes a row to
//! `inbox_duplicates` (in its own short transaction), so the audit can show how many
//! redeliveries the inbox absorbed across processes and restarts.

use std::fmt;

use waybill_diesel::{Inbox, IncomingMessage, Processed};
use waybill_inbox_core::{DeliveryHandler, Disposition};

use crate::db::{AppConnection, DbPool};
use crate::Error;

/// A [`DeliveryHandler`] that runs `handler` once per message through `consumer`'s inbox.
pub(crate) struct CountingInbox<C: AppConnection, F> {
    pool: DbPool<C>,
    inbox: Inbox,
    handler: F,
}

impl<C: AppConnection, F> fmt::Debug for CountingInbox<C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingInbox")
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

impl<C, F> CountingInbox<C, F>
where
    C: AppConnection,
    F: FnMut(&mut C, &IncomingMessage) -> Result<(), Error>,
{
    /// Runs `handler` for each new message of `consumer`, on connections from `pool`.
    pub(crate) fn new(pool: DbPool<C>, consumer: &str, handler: F) -> Self {
        Self {
            pool,
            inbox: Inbox::new(consumer),
            handler,
        }
    }

    fn process(&mut self, message: &IncomingMessage) -> Result<Processed<()>, Error> {
        let mut conn = self.pool.get()?;
        let handler = &mut self.handler;
        let outcome = self
            .inbox
            .process_once(&mut *conn, message, |conn| handler(conn, message))?;
        if outcome.is_duplicate() {
            // The delivery is done either way; a lost count must not cause a redelivery.
            if let Err(error) = conn.record_duplicate(self.inbox.consumer()) {
                log::warn!(
                    "inbox {}: counting a duplicate failed: {error}",
                    self.inbox.consumer()
                );
            }
        }
        Ok(outcome)
    }
}

impl<C, F> DeliveryHandler for CountingInbox<C, F>
where
    C: AppConnection,
    F: FnMut(&mut C, &IncomingMessage) -> Result<(), Error>,
{
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        match self.process(message) {
            Ok(Processed::Expired) => Disposition::DeadLetter(
                "sent before the inbox's last purge, so its record may be gone".to_owned(),
            ),
            Ok(_) => Disposition::Ack,
            Err(error) => {
                log::warn!(
                    "inbox {}: message {} failed, will be redelivered: {error}",
                    self.inbox.consumer(),
                    message.id
                );
                Disposition::Retry(error.to_string())
            }
        }
    }
}
