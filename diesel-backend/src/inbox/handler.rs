//! A [`DeliveryHandler`] that runs every delivery through the inbox on a pooled connection.

use std::collections::BTreeSet;
use std::fmt;

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection, R2D2Connection};
use waybill_inbox_core::{
    gap_reason, DeliveryHandler, Disposition, InOrder, IncomingMessage, Processed,
};

use super::in_order::Failure;
use super::{Inbox, InboxConnection};
use crate::Error;

/// Connects a transport's consumer loop to the inbox: each delivery gets a pooled connection,
/// and `handler` runs inside [`Inbox::process_once`], so the delivery is acknowledged only after
/// the handler's writes and the dedup record committed together.
///
/// - a topic outside [`only_topics`](Self::only_topics) -> [`Disposition::DeadLetter`]
/// - handled or duplicate -> [`Disposition::Ack`]
/// - not found but sent before the inbox's last purge reached, so its record may have been
///   purged ([`Processed::Expired`]) -> [`Disposition::DeadLetter`]
/// - an id already processed with a different payload
///   ([`Error::ConflictingDuplicate`](crate::Error::ConflictingDuplicate)) ->
///   [`Disposition::DeadLetter`] with the reason
/// - handler or database error (rolled back, nothing recorded) -> [`Disposition::Retry`]
///
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// use waybill_diesel::{Inbox, InboxHandler};
/// use waybill_inbox_core::{DeliveryHandler, Disposition, IncomingMessage};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder().max_size(1).build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
/// waybill_diesel::run_migrations(&mut pool.get()?)?;
/// let mut handler = InboxHandler::new(pool, Inbox::new("billing"), |_conn: &mut _, _msg: &IncomingMessage| {
///     Ok::<_, waybill_diesel::Error>(()) // the consumer's writes go here, on `_conn`
/// });
/// let msg = IncomingMessage::new(waybill_outbox_core::MessageId::new(), "orders", "OrderPlaced", "{}");
/// assert_eq!(handler.handle(&msg), Disposition::Ack);
/// assert_eq!(handler.handle(&msg), Disposition::Ack); // the duplicate is skipped
/// assert_eq!(handler.duplicates(), 1);
/// # Ok(())
/// # }
/// ```
pub struct InboxHandler<C: R2D2Connection + 'static, F> {
    pool: Pool<ConnectionManager<C>>,
    inbox: Inbox,
    handler: F,
    duplicates: u64,
    topics: Option<BTreeSet<String>>,
    in_order: bool,
}

impl<C: R2D2Connection + 'static, F> fmt::Debug for InboxHandler<C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxHandler")
            .field("inbox", &self.inbox)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl<C: R2D2Connection + 'static, F> InboxHandler<C, F> {
    /// Runs `handler` for each new message through `inbox`, on connections from `pool`.
    pub fn new(pool: Pool<ConnectionManager<C>>, inbox: Inbox, handler: F) -> Self {
        Self {
            pool,
            inbox,
            handler,
            duplicates: 0,
            topics: None,
            in_order: false,
        }
    }

    /// Runs each delivery through [`Inbox::process_in_order`] instead of `process_once`: for
    /// topics of sequenced messages, applied in their key's order by number.
    ///
    /// - handled, a skip marker, or a duplicate -> [`Disposition::Ack`]
    /// - held behind a gap ([`InOrder::Held`](waybill_inbox_core::InOrder::Held)) ->
    ///   [`Disposition::Retry`] with `gap: expected N, got M`: the loop retries in place,
    ///   keeping the key's position
    /// - the gap wait ran out -> [`Disposition::DeadLetter`] with `gap: expected N, got M`
    /// - no sequence number, or a regression of the producer's counter ->
    ///   [`Disposition::DeadLetter`] with the reason
    /// - handler or database error -> [`Disposition::Retry`]
    ///
    /// Give the consumer loop's [`RetryPolicy`](waybill_inbox_core::RetryPolicy) enough
    /// deliveries to span the inbox's [`max_gap_wait`](Inbox::max_gap_wait), or it
    /// dead-letters a held message first (its reason then ends with the gap's). Defaults to
    /// off.
    #[must_use]
    pub fn in_order(mut self) -> Self {
        self.in_order = true;
        self
    }

    /// Acts only on messages of these topics, the ones this consumer subscribed to; any other
    /// (a misrouted binding, a forged `waybill-topic`) is dead-lettered with the reason and
    /// never reaches the handler or the inbox. Defaults to every topic.
    #[must_use]
    pub fn only_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = Some(topics.into_iter().map(Into::into).collect());
        self
    }

    /// Deliveries skipped so far as duplicates of messages the inbox already processed (also
    /// counted in the `waybill_consumer_duplicates_skipped_total` metric, labelled with the
    /// inbox's consumer name).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

impl<C, F, E> DeliveryHandler for InboxHandler<C, F>
where
    C: InboxConnection + R2D2Connection + Send + 'static,
    F: FnMut(&mut PooledConnection<ConnectionManager<C>>, &IncomingMessage) -> Result<(), E>,
    E: From<Error> + From<diesel::result::Error> + fmt::Display,
{
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        if let Some(topics) = self.topics.as_ref().filter(|t| !t.contains(&message.topic)) {
            return Disposition::DeadLetter(format!(
                "topic {:?} is not one this consumer subscribed to ({topics:?})",
                message.topic
            ));
        }
        let mut conn = match self.pool.get() {
            Ok(conn) => conn,
            Err(error) => return Disposition::Retry(format!("no database connection: {error}")),
        };
        let handler = &mut self.handler;
        if self.in_order {
            return match self
                .inbox
                .apply_in_order(&mut conn, message, |conn| handler(conn, message))
            {
                Ok(InOrder::Handled(())) | Ok(InOrder::Skipped { .. }) => Disposition::Ack,
                Ok(InOrder::Duplicate) => {
                    self.duplicates += 1;
                    waybill_inbox_core::metrics::record_duplicate(self.inbox.consumer());
                    Disposition::Ack
                }
                Ok(InOrder::Held { expected, got, .. }) => {
                    Disposition::Retry(gap_reason(expected, got))
                }
                Ok(InOrder::GapParked { expected, got }) => {
                    Disposition::DeadLetter(gap_reason(expected, got))
                }
                Err(Failure::Refused(error)) => {
                    Disposition::DeadLetter(format!("refused: {error}"))
                }
                Err(Failure::Failed(error)) => {
                    log::warn!(
                        "inbox {}: message {} failed, will be redelivered: {error}",
                        self.inbox.consumer(),
                        message.id
                    );
                    Disposition::Retry(error.to_string())
                }
            };
        }
        match self
            .inbox
            .process_once(&mut conn, message, |conn| handler(conn, message))
        {
            Ok(Processed::Handled(())) => Disposition::Ack,
            Ok(Processed::Duplicate) => {
                self.duplicates += 1;
                waybill_inbox_core::metrics::record_duplicate(self.inbox.consumer());
                log::debug!(
                    "inbox {}: skipped duplicate {}",
                    self.inbox.consumer(),
                    message.id
                );
                Disposition::Ack
            }
            Ok(Processed::Expired) => Disposition::DeadLetter(format!(
                "sent at {}, before the inbox's last purge reached (give or take {:?} of clock \
                 skew): its record may have been purged, so it cannot be told from a new message",
                message.sent_at,
                self.inbox.clock_skew_bound()
            )),
            Err(error)
                if self
                    .inbox
                    .is_conflicting_duplicate(&mut conn, message)
                    .unwrap_or(false) =>
            {
                Disposition::DeadLetter(format!("refused: {error}"))
            }
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
