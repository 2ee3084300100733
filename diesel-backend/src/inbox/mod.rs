//! The inbox: each received message takes effect once per consumer.
//!
//! [`Inbox::process_once`] records the message's dedup key and runs the handler in one
//! transaction on the caller's connection. The record is inserted *first*, so two deliveries
//! of one message handled at the same moment serialize on the table's primary key: the second
//! waits for the first and then sees a duplicate (first committed) or handles the message
//! (first rolled back). A handler error rolls back the record with the handler's writes, so a
//! redelivery processes the message again.

mod handler;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::Connection;
pub use waybill_inbox_core::{DedupKey, IncomingMessage, Processed};
use waybill_outbox_core::MessageId;

pub use handler::InboxHandler;

use crate::{Error, Result};

/// The longest consumer name and dedup key, in characters (the MySQL columns are
/// `VARCHAR(255)`; the other backends keep the same limit so code moves between them).
pub const MAX_KEY_CHARS: usize = 255;

/// The default retention window: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A diesel connection the inbox can work on: implemented for `PgConnection`,
/// `SqliteConnection`, `MysqlConnection` (each behind its cargo feature) and for r2d2 pooled
/// connections of those.
///
/// These are the per-backend building blocks of [`Inbox`]; every method runs on the connection
/// it is given, joins the caller's transaction if there is one and never checks out another
/// connection.
pub trait InboxConnection: Connection {
    /// Inserts the record of `key` for `consumer` with the payload's SHA-256 digest; `true`
    /// when inserted, `false` when the consumer already has it. Waits for a concurrent
    /// uncommitted insert of the same key, and never leaves the caller's transaction aborted on
    /// a duplicate.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn insert_inbox_record(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<bool>;

    /// The payload digest recorded with `key` for `consumer`: `None` when there is no record,
    /// or it was written before digests were kept.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn inbox_record_digest(&mut self, consumer: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Whether `consumer` has a record of `key`.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn inbox_record_exists(&mut self, consumer: &str, key: &str) -> Result<bool>;

    /// How many records `consumer` has.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn count_inbox_records(&mut self, consumer: &str) -> Result<u64>;

    /// Deletes up to `limit` records processed before `cutoff`, of `consumer` or of every
    /// consumer, in one statement; returns how many.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn delete_inbox_records(
        &mut self,
        consumer: Option<&str>,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64>;
}

/// One consumer's inbox: [`process_once`](Self::process_once) runs a handler at most once per
/// message for this consumer, atomically with the handler's writes.
///
/// Consumers are independent: `billing` and `shipping` each process every message once.
///
/// ```
/// use diesel::prelude::*;
/// use waybill_diesel::{Inbox, Processed};
/// use waybill_inbox_core::IncomingMessage;
/// use waybill_outbox_core::MessageId;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = SqliteConnection::establish(":memory:")?;
/// waybill_diesel::run_migrations(&mut conn)?;
/// # diesel::sql_query("CREATE TABLE payments (order_id INTEGER)").execute(&mut conn)?;
/// let inbox = Inbox::new("billing");
/// let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", br#"{"order_id":4231}"#.to_vec());
///
/// // The broker delivers the message twice; the payment is taken once.
/// let mut outcomes = Vec::new();
/// for _ in 0..2 {
///     outcomes.push(inbox.process_once(&mut conn, &delivery, |conn| {
///         diesel::sql_query("INSERT INTO payments (order_id) VALUES (4231)").execute(conn)?;
///         Ok::<_, waybill_diesel::Error>("charged")
///     })?);
/// }
/// assert_eq!(outcomes, [Processed::Handled("charged"), Processed::Duplicate]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Inbox {
    consumer: String,
    retention: Duration,
    accept_expired: bool,
}

impl Inbox {
    /// The inbox of `consumer`, e.g. `billing` (1 to 255 characters), with a retention window
    /// of 7 days that refuses expired messages.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            retention: DEFAULT_RETENTION,
            accept_expired: false,
        }
    }

    /// How long records are kept: [`purge_processed`](Self::purge_processed) deletes older
    /// ones, and a message sent longer ago than this is [`Processed::Expired`] (its record
    /// may be gone, so it cannot be told from a new one). Choose it longer than any
    /// redelivery can be late. Defaults to 7 days.
    #[must_use]
    pub fn retention(mut self, window: Duration) -> Self {
        self.retention = window;
        self
    }

    /// Processes messages sent before the retention window as if they were new instead of
    /// returning [`Processed::Expired`]; for a replay the caller knows to be safe. Defaults
    /// to `false`.
    #[must_use]
    pub fn accept_expired(mut self, accept: bool) -> Self {
        self.accept_expired = accept;
        self
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The retention window.
    pub fn retention_window(&self) -> Duration {
        self.retention
    }

    /// Runs `handler` once per message for this consumer, deduplicating on the message id.
    ///
    /// In one transaction on `conn` (diesel's `conn.transaction`, a savepoint when the caller
    /// already is in one): inserts the record, then runs `handler` on the same connection.
    /// Returns [`Processed::Handled`] with the handler's value once it committed;
    /// [`Processed::Duplicate`] without running the handler when the record exists; and
    /// [`Processed::Expired`] without touching the database when the message was sent before
    /// the retention window (unless [`accept_expired`](Self::accept_expired)). A concurrent
    /// delivery of the same message waits for this one to commit or roll back.
    ///
    /// The handler's writes, including messages it enqueues with
    /// [`enqueue`](crate::enqueue), commit with the record. When it returns `Err`, everything
    /// rolls back, nothing is recorded and its error is returned unchanged, so a redelivery
    /// processes the message. Inside a caller's transaction, nothing is final until the caller
    /// commits.
    ///
    /// Run it at the default `READ COMMITTED` (PostgreSQL) or `REPEATABLE READ` (MySQL)
    /// isolation. Under PostgreSQL's `REPEATABLE READ` or `SERIALIZABLE`, a duplicate that
    /// committed concurrently surfaces as a serialization failure instead of
    /// [`Processed::Duplicate`]: a retryable error, so leave the delivery unacknowledged.
    ///
    /// A redelivery must carry the same payload: the record keeps the payload's SHA-256
    /// digest, and a message whose id was processed with a different payload is refused with
    /// [`Error::ConflictingDuplicate`] instead of being skipped silently.
    ///
    /// # Errors
    ///
    /// The handler's error; [`Error::InvalidInboxKey`] for an empty or over-long consumer
    /// name; [`Error::ConflictingDuplicate`] for a known id with another payload;
    /// [`Error::Database`] (converted into `E`) when recording fails.
    pub fn process_once<C, T, E, F>(
        &self,
        conn: &mut C,
        message: &IncomingMessage,
        handler: F,
    ) -> std::result::Result<Processed<T>, E>
    where
        C: InboxConnection,
        F: FnOnce(&mut C) -> std::result::Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        self.process_once_by(conn, DedupKey::MessageId(message.id), message, handler)
    }

    /// [`process_once`](Self::process_once) deduplicating on `key` instead of the message id,
    /// e.g. `DedupKey::business("order:4231")` when the sender assigns no stable id.
    ///
    /// # Errors
    ///
    /// As [`process_once`](Self::process_once), plus [`Error::InvalidInboxKey`] for an empty
    /// or over-long business key.
    pub fn process_once_by<C, T, E, F>(
        &self,
        conn: &mut C,
        key: DedupKey,
        message: &IncomingMessage,
        handler: F,
    ) -> std::result::Result<Processed<T>, E>
    where
        C: InboxConnection,
        F: FnOnce(&mut C) -> std::result::Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        check_name("consumer name", &self.consumer)?;
        // Only a message id promises the same content every time; a business key may be
        // shared by messages that differ.
        let by_id = matches!(key, DedupKey::MessageId(_));
        let key = key.to_string();
        check_name("dedup key", &key)?;
        if !self.accept_expired && self.is_expired(message.sent_at, Utc::now()) {
            log::warn!(
                "inbox {}: message {} sent at {} is older than the retention window; not processed",
                self.consumer,
                message.id,
                message.sent_at
            );
            return Ok(Processed::Expired);
        }
        let digest = payload_digest(&message.payload);
        conn.transaction(|conn| {
            if !conn.insert_inbox_record(&self.consumer, &key, Some(message.id), Some(&digest))? {
                if by_id
                    && conn
                        .inbox_record_digest(&self.consumer, &key)?
                        .is_some_and(|d| d != digest)
                {
                    log::warn!(
                        "inbox {}: message {} arrived again with a different payload; refused",
                        self.consumer,
                        message.id
                    );
                    return Err(Error::ConflictingDuplicate {
                        consumer: self.consumer.clone(),
                        message_id: message.id,
                    }
                    .into());
                }
                log::debug!(
                    "inbox {}: message {} (key {key}) already processed",
                    self.consumer,
                    message.id
                );
                return Ok(Processed::Duplicate);
            }
            handler(conn).map(Processed::Handled)
        })
    }

    /// Whether this consumer already processed a message with `message`'s id but a different
    /// payload: a sender bug or a forgery, which [`process_once`](Self::process_once) refuses
    /// with [`Error::ConflictingDuplicate`]. Lets a caller whose error type hides that variant
    /// tell it from a failure worth retrying.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub fn is_conflicting_duplicate<C: InboxConnection>(
        &self,
        conn: &mut C,
        message: &IncomingMessage,
    ) -> Result<bool> {
        let key = DedupKey::MessageId(message.id).to_string();
        Ok(conn
            .inbox_record_digest(&self.consumer, &key)?
            .is_some_and(|digest| digest != payload_digest(&message.payload)))
    }

    /// Whether this consumer has processed (and committed) `key`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub fn is_processed<C: InboxConnection>(&self, conn: &mut C, key: &DedupKey) -> Result<bool> {
        conn.inbox_record_exists(&self.consumer, &key.to_string())
    }

    /// How many records this consumer keeps.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub fn processed_count<C: InboxConnection>(&self, conn: &mut C) -> Result<u64> {
        conn.count_inbox_records(&self.consumer)
    }

    /// Deletes this consumer's records older than the retention window, `batch_size` rows per
    /// statement; returns how many. See [`purge_processed_before`].
    ///
    /// # Errors
    ///
    /// As [`purge_processed_before`].
    pub fn purge_processed<C: InboxConnection>(
        &self,
        conn: &mut C,
        batch_size: usize,
    ) -> Result<u64> {
        purge(
            conn,
            Some(&self.consumer),
            cutoff(Utc::now(), self.retention),
            batch_size,
        )
    }

    fn is_expired(&self, sent_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        sent_at < cutoff(now, self.retention)
    }
}

/// Deletes every consumer's inbox records processed before `cutoff`, in bounded batches: a
/// loop of `DELETE` statements of at most `batch_size` rows (at least 1) each, so no statement
/// holds many locks for long. Returns the total deleted.
///
/// Outside a transaction every batch commits on its own, and a failure keeps the batches
/// deleted before it. Keep `cutoff` at least the consumers' retention window in the past:
/// messages sent after it must still find their records.
///
/// ```
/// use diesel::prelude::*;
/// use waybill_diesel::{purge_processed_before, Inbox};
/// use waybill_inbox_core::IncomingMessage;
/// use waybill_outbox_core::MessageId;
/// # let mut conn = SqliteConnection::establish(":memory:").unwrap();
/// # waybill_diesel::run_migrations(&mut conn).unwrap();
///
/// let inbox = Inbox::new("billing");
/// for _ in 0..5 {
///     let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", Vec::new());
///     inbox.process_once(&mut conn, &delivery, |_| Ok::<_, waybill_diesel::Error>(())).unwrap();
/// }
/// let later = chrono::Utc::now() + chrono::Duration::minutes(1);
/// assert_eq!(purge_processed_before(&mut conn, later, 2).unwrap(), 5);
/// ```
///
/// # Errors
///
/// [`Error::Database`].
pub fn purge_processed_before<C: InboxConnection>(
    conn: &mut C,
    cutoff: DateTime<Utc>,
    batch_size: usize,
) -> Result<u64> {
    purge(conn, None, cutoff, batch_size)
}

fn purge<C: InboxConnection>(
    conn: &mut C,
    consumer: Option<&str>,
    cutoff: DateTime<Utc>,
    batch_size: usize,
) -> Result<u64> {
    let batch_size = batch_size.max(1);
    let mut total = 0;
    loop {
        let deleted = conn.delete_inbox_records(consumer, cutoff, batch_size)?;
        total += deleted;
        if deleted < batch_size as u64 {
            log::debug!("inbox purge before {cutoff}: {total} records deleted");
            return Ok(total);
        }
    }
}

/// `now - window`, or the beginning of time when the window reaches past it.
fn cutoff(now: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(window)
        .ok()
        .and_then(|window| now.checked_sub_signed(window))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The SHA-256 digest of a payload, as the inbox records it.
fn payload_digest(payload: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(payload).to_vec()
}

fn check_name(what: &'static str, value: &str) -> Result<()> {
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_KEY_CHARS {
        return Err(Error::InvalidInboxKey { what, chars });
    }
    Ok(())
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod pooled {
    use diesel::r2d2::{ConnectionManager, PooledConnection, R2D2Connection};

    use super::*;

    impl<C> InboxConnection for PooledConnection<ConnectionManager<C>>
    where
        C: InboxConnection + R2D2Connection + Send + 'static,
    {
        fn insert_inbox_record(
            &mut self,
            consumer: &str,
            key: &str,
            message_id: Option<MessageId>,
            payload_digest: Option<&[u8]>,
        ) -> Result<bool> {
            (**self).insert_inbox_record(consumer, key, message_id, payload_digest)
        }
        fn inbox_record_digest(&mut self, consumer: &str, key: &str) -> Result<Option<Vec<u8>>> {
            (**self).inbox_record_digest(consumer, key)
        }
        fn inbox_record_exists(&mut self, consumer: &str, key: &str) -> Result<bool> {
            (**self).inbox_record_exists(consumer, key)
        }
        fn count_inbox_records(&mut self, consumer: &str) -> Result<u64> {
            (**self).count_inbox_records(consumer)
        }
        fn delete_inbox_records(
            &mut self,
            consumer: Option<&str>,
            cutoff: DateTime<Utc>,
            limit: usize,
        ) -> Result<u64> {
            (**self).delete_inbox_records(consumer, cutoff, limit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_older_than_the_window_are_expired() {
        let inbox = Inbox::new("billing").retention(Duration::from_secs(60));
        let now = Utc::now();
        assert!(!inbox.is_expired(now - TimeDelta::seconds(59), now));
        assert!(inbox.is_expired(now - TimeDelta::seconds(61), now));
        assert!(
            !inbox.is_expired(now + TimeDelta::hours(1), now),
            "sender clock ahead"
        );
        let forever = Inbox::new("billing").retention(Duration::MAX);
        assert!(!forever.is_expired(DateTime::<Utc>::MIN_UTC + TimeDelta::seconds(1), now));
    }

    #[test]
    fn names_must_fit_the_columns() {
        assert!(check_name("dedup key", "order:1").is_ok());
        assert!(check_name("dedup key", &"é".repeat(255)).is_ok());
        assert!(matches!(
            check_name("dedup key", &"é".repeat(256)),
            Err(Error::InvalidInboxKey { chars: 256, .. })
        ));
        assert!(matches!(
            check_name("consumer name", ""),
            Err(Error::InvalidInboxKey { chars: 0, .. })
        ));
    }
}
