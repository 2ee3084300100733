//! The inbox: each received message takes effect once per consumer.
//!
//! [`Inbox::process_once`] records the message's dedup key and runs the handler in one
//! transaction on the caller's connection. The record is inserted *first*, so two deliveries
//! of one message handled at the same moment serialize on the table's primary key: the second
//! waits for the first and then sees a duplicate (first committed) or handles the message
//! (first rolled back). A handler error rolls back the record with the handler's writes, so a
//! redelivery processes the message again.
//!
//! Records are kept until a purge deletes them. A purge remembers, per consumer, the newest
//! `processed_at` it deleted (`inbox_purges.purged_through`): a message without a record is new
//! unless it was sent before that mark (plus [`Inbox::max_clock_skew`]), in which case its
//! record may have been purged and it is refused as [`Processed::Expired`].

mod handler;
mod in_order;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use diesel::connection::TransactionManager;
use diesel::Connection;
pub use waybill_inbox_core::{DedupKey, FirstMessage, InOrder, IncomingMessage, Processed};
use waybill_outbox_core::MessageId;

pub use handler::InboxHandler;

use crate::{Error, Result};

/// The longest consumer name and dedup key, in characters (the MySQL columns are
/// `VARCHAR(255)`; the other backends keep the same limit so code moves between them).
pub const MAX_KEY_CHARS: usize = 255;

/// The default retention window: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The default bound on the difference between a sender's and the consumer's database clocks:
/// 5 minutes.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The default gap wait of [`Inbox::process_in_order`]: 30 seconds.
pub const DEFAULT_MAX_GAP_WAIT: Duration = Duration::from_secs(30);

/// The prefix of a business key's stored form, so business keys and message ids (stored as
/// the id's hyphenated lowercase form) never collide.
const BUSINESS_PREFIX: &str = "b:";

/// A diesel connection the inbox can work on: implemented for `PgConnection`,
/// `SqliteConnection`, `MysqlConnection` (each behind its cargo feature) and for r2d2 pooled
/// connections of those.
///
/// These are the per-backend building blocks of [`Inbox`]; every method runs on the connection
/// it is given, joins the caller's transaction if there is one and never checks out another
/// connection.
pub trait InboxConnection: Connection + crate::sequence::InOrderConnection {
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

    /// [`insert_inbox_record`](Self::insert_inbox_record), also reading `consumer`'s purge
    /// mark ([`inbox_purged_through`](Self::inbox_purged_through)) when it inserted: `None`
    /// for a duplicate. The mark is the latest committed once the insert went through, so a
    /// purge of this very key that the insert waited for is seen. PostgreSQL does both in one
    /// statement; the default runs the two.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn insert_inbox_record_with_mark(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<Option<Inserted>> {
        if !self.insert_inbox_record(consumer, key, message_id, payload_digest)? {
            return Ok(None);
        }
        Ok(Some(Inserted {
            purged_through: self.inbox_purged_through(consumer)?,
        }))
    }

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
    /// consumer, oldest first; returns how many. Atomically with the delete, raises each
    /// affected consumer's purge mark ([`inbox_purged_through`](Self::inbox_purged_through))
    /// to the newest `processed_at` it deleted.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is deleted then.
    fn delete_inbox_records(
        &mut self,
        consumer: Option<&str>,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64>;

    /// The newest `processed_at` a purge deleted for `consumer`; `None` when none deleted any
    /// of its records. Reads the latest committed mark, even inside a transaction that began
    /// before it (MySQL's `REPEATABLE READ` uses a locking read for that).
    ///
    /// # Errors
    ///
    /// Database failures.
    fn inbox_purged_through(&mut self, consumer: &str) -> Result<Option<DateTime<Utc>>>;

    /// Commits the transaction (or, inside the caller's, releases the savepoint) that
    /// [`Inbox::process_once`] began, unless a failed statement aborted it: PostgreSQL would
    /// turn that `COMMIT` into a silent rollback. Then it rolls back (the savepoint only,
    /// leaving the caller's transaction usable) and returns `false`. The default commits as
    /// [`Connection::transaction`] does, right where a failed statement leaves the transaction
    /// usable (SQLite, MySQL).
    ///
    /// # Errors
    ///
    /// Database failures, the commit's included: the transaction is rolled back then, or the
    /// connection is broken.
    fn commit_inbox_transaction(&mut self) -> Result<bool> {
        <Self::TransactionManager as TransactionManager<Self>>::commit_transaction(self)?;
        Ok(true)
    }
}

/// A record [`InboxConnection::insert_inbox_record_with_mark`] inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    /// The consumer's purge mark, read after the insert: the newest `processed_at` a purge
    /// deleted, `None` when none deleted any of its records.
    pub purged_through: Option<DateTime<Utc>>,
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
    max_clock_skew: Duration,
    accept_expired: bool,
    max_gap_wait: Duration,
    first_message: waybill_inbox_core::FirstMessage,
}

impl Inbox {
    /// The inbox of `consumer`, e.g. `billing` (1 to 255 characters, no NUL), with a retention
    /// window of 7 days, a clock skew bound of 5 minutes, and messages whose record a purge
    /// may have deleted refused.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            retention: DEFAULT_RETENTION,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            accept_expired: false,
            max_gap_wait: DEFAULT_MAX_GAP_WAIT,
            first_message: waybill_inbox_core::FirstMessage::MustBeFirst,
        }
    }

    /// How long records are kept: [`purge_processed`](Self::purge_processed) deletes the ones
    /// processed longer ago. Once a purge deleted records, a message sent before the newest
    /// of them (plus [`max_clock_skew`](Self::max_clock_skew)) and not found is
    /// [`Processed::Expired`]: its record may be gone, so it cannot be told from a new one.
    /// A message that was never processed is handled however old it is until then. Choose
    /// it longer than any redelivery can be late. Defaults to 7 days.
    #[must_use]
    pub fn retention(mut self, window: Duration) -> Self {
        self.retention = window;
        self
    }

    /// The most a sender's clock (which stamps `sent_at`) may differ from this consumer's
    /// database clock (which stamps when a message was processed), either way. A message
    /// without a record is refused when it was sent at or before the last purge's newest
    /// deleted record plus this bound, since its record may have been that purge's; larger
    /// values refuse more late first deliveries, smaller ones risk a purged message taking
    /// effect twice when clocks drift further apart. Defaults to 5 minutes.
    #[must_use]
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// Processes messages whose record a purge may have deleted as if they were new instead
    /// of returning [`Processed::Expired`]; for a replay the caller knows to be safe. Defaults
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

    /// The clock skew bound.
    pub fn clock_skew_bound(&self) -> Duration {
        self.max_clock_skew
    }

    /// Runs `handler` once per message for this consumer, deduplicating on the message id.
    ///
    /// In one transaction on `conn` (begun, committed and rolled back as diesel's
    /// `conn.transaction` does: a savepoint when the caller already is in one): inserts the
    /// record, then runs `handler` on the same connection.
    /// Returns [`Processed::Handled`] with the handler's value once it committed;
    /// [`Processed::Duplicate`] without running the handler when the record exists; and
    /// [`Processed::Expired`] without running the handler or recording anything when there is
    /// no record but a purge may have deleted it: the message was sent at or before this
    /// consumer's purge mark plus [`max_clock_skew`](Self::max_clock_skew) (unless
    /// [`accept_expired`](Self::accept_expired)). A message no purge can have forgotten is
    /// handled however old it is. A concurrent delivery of the same message waits for this
    /// one to commit or roll back.
    ///
    /// The handler's writes, including messages it enqueues with
    /// [`enqueue`](crate::enqueue), commit with the record. When it returns `Err`, everything
    /// rolls back, nothing is recorded and its error is returned unchanged, so a redelivery
    /// processes the message. When it panics, everything rolls back the same way and the panic
    /// resumes, leaving the connection out of the transaction. On PostgreSQL, when it returns
    /// `Ok` after one of its statements failed (aborting the transaction), everything rolls
    /// back and [`Error::HandlerTransactionAborted`] is returned instead of a `Handled` that
    /// could never commit. Inside a caller's transaction, all of this happens to a savepoint,
    /// and nothing is final until the caller commits.
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
    /// name and [`Error::InboxKeyWithNul`] for one with a NUL byte, before any SQL;
    /// [`Error::ConflictingDuplicate`] for a known id with another payload;
    /// [`Error::HandlerTransactionAborted`] as above; [`Error::Database`] (converted into `E`)
    /// when recording fails.
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
    /// Business keys and message ids are separate namespaces: a business key that reads like
    /// another message's id is not that message's record.
    ///
    /// # Errors
    ///
    /// As [`process_once`](Self::process_once), plus [`Error::InvalidInboxKey`] for an empty
    /// or over-long business key and [`Error::InboxKeyWithNul`] for one with a NUL byte.
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
        check_key(&key)?;
        // Only a message id promises the same content every time; a business key may be
        // shared by messages that differ.
        let by_id = matches!(key, DedupKey::MessageId(_));
        // Before the namespaces, a business key equal to its own message's id was stored bare,
        // like that id; such a row is this very message's record.
        let legacy = match &key {
            DedupKey::Business(business) if *business == message.id.to_string() => {
                Some(business.clone())
            }
            _ => None,
        };
        let key = stored_key(&key);
        let digest = payload_digest(&message.payload);
        // Begun, committed and rolled back as `conn.transaction` would, except that the commit
        // also tells an aborted transaction (PostgreSQL) from a committed one.
        <C::TransactionManager as TransactionManager<C>>::begin_transaction(conn)?;
        let mut panicked = None;
        let body = (|| -> std::result::Result<T, Abort<E>> {
            let recorded = if self.accept_expired {
                // No purge mark is needed: an inserted record is simply new.
                conn.insert_inbox_record(&self.consumer, &key, Some(message.id), Some(&digest))?
                    .then_some(None)
            } else {
                conn.insert_inbox_record_with_mark(
                    &self.consumer,
                    &key,
                    Some(message.id),
                    Some(&digest),
                )?
                .map(|inserted| inserted.purged_through)
            };
            let Some(purged_through) = recorded else {
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
                    return Err(Abort::Failed(
                        Error::ConflictingDuplicate {
                            consumer: self.consumer.clone(),
                            message_id: message.id,
                        }
                        .into(),
                    ));
                }
                return Err(Abort::Skipped(Skipped::Duplicate));
            };
            if let Some(bare) = &legacy {
                if conn.inbox_record_exists(&self.consumer, bare)? {
                    return Err(Abort::Skipped(Skipped::Duplicate));
                }
            }
            if let Some(through) = purged_through {
                if may_have_been_purged(message.sent_at, through, self.max_clock_skew) {
                    log::warn!(
                        "inbox {}: message {} sent at {} has no record, but a purge deleted \
                         records processed up to {through}; it may have been one, not \
                         processed",
                        self.consumer,
                        message.id,
                        message.sent_at
                    );
                    return Err(Abort::Skipped(Skipped::Expired));
                }
            }
            match catch_unwind(AssertUnwindSafe(|| handler(conn))) {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(Abort::Failed(error)),
                Err(payload) => {
                    panicked = Some(payload);
                    Err(Abort::Panicked)
                }
            }
        })();
        let outcome = match body {
            Ok(value) => match conn.commit_inbox_transaction() {
                Ok(true) => Ok(value),
                // Rolled back already: an aborted transaction could never commit.
                Ok(false) => {
                    log::warn!(
                        "inbox {}: the handler of message {} ignored a failed statement; rolled \
                         back",
                        self.consumer,
                        message.id
                    );
                    Err(Abort::Failed(
                        Error::HandlerTransactionAborted {
                            consumer: self.consumer.clone(),
                            message_id: message.id,
                        }
                        .into(),
                    ))
                }
                Err(error) => Err(Abort::Failed(error.into())),
            },
            Err(abort) => {
                match <C::TransactionManager as TransactionManager<C>>::rollback_transaction(conn) {
                    // A broken transaction manager is the connection's to report; the cause of the
                    // rollback matters more, as in `conn.transaction`.
                    Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(abort),
                    Err(rollback_error) => Err(Abort::Failed(rollback_error.into())),
                }
            }
        };
        // Rolled back by now (or the rollback failed and the connection is broken, which its
        // next use reports): the caller sees the handler's panic, not a rollback error.
        if let Some(payload) = panicked {
            resume_unwind(payload);
        }
        match outcome {
            Ok(value) => Ok(Processed::Handled(value)),
            Err(Abort::Skipped(Skipped::Duplicate)) => {
                log::debug!(
                    "inbox {}: message {} (key {key}) already processed",
                    self.consumer,
                    message.id
                );
                Ok(Processed::Duplicate)
            }
            Err(Abort::Skipped(Skipped::Expired)) => Ok(Processed::Expired),
            Err(Abort::Failed(error)) => Err(error),
            // The payload resumed above; this arm only satisfies the match.
            Err(Abort::Panicked) => resume_unwind(Box::new("inbox handler panicked")),
        }
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
        check_name("consumer name", &self.consumer)?;
        let key = stored_key(&DedupKey::MessageId(message.id));
        Ok(conn
            .inbox_record_digest(&self.consumer, &key)?
            .is_some_and(|digest| digest != payload_digest(&message.payload)))
    }

    /// Whether this consumer has processed (and committed) `key`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInboxKey`] or [`Error::InboxKeyWithNul`] for a bad consumer name or
    /// key; [`Error::Database`].
    pub fn is_processed<C: InboxConnection>(&self, conn: &mut C, key: &DedupKey) -> Result<bool> {
        check_name("consumer name", &self.consumer)?;
        check_key(key)?;
        conn.inbox_record_exists(&self.consumer, &stored_key(key))
    }

    /// How many records this consumer keeps.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInboxKey`] or [`Error::InboxKeyWithNul`] for a bad consumer name;
    /// [`Error::Database`].
    pub fn processed_count<C: InboxConnection>(&self, conn: &mut C) -> Result<u64> {
        check_name("consumer name", &self.consumer)?;
        conn.count_inbox_records(&self.consumer)
    }

    /// Deletes this consumer's records older than the retention window, `batch_size` rows per
    /// statement, and raises its purge mark; returns how many. See [`purge_processed_before`].
    ///
    /// # Errors
    ///
    /// As [`purge_processed_before`], plus [`Error::InvalidInboxKey`] or
    /// [`Error::InboxKeyWithNul`] for a bad consumer name.
    pub fn purge_processed<C: InboxConnection>(
        &self,
        conn: &mut C,
        batch_size: usize,
    ) -> Result<u64> {
        check_name("consumer name", &self.consumer)?;
        purge(
            conn,
            Some(&self.consumer),
            cutoff(Utc::now(), self.retention),
            batch_size,
        )
    }
}

/// What ends `process_once`'s transaction without committing it.
enum Abort<E> {
    /// Not handled, and nothing to record: roll back the record just inserted.
    Skipped(Skipped),
    /// The handler's error, or the inbox's converted into the handler's type.
    Failed(E),
    /// The handler panicked; the payload is kept aside to resume after the rollback.
    Panicked,
}

enum Skipped {
    Duplicate,
    Expired,
}

impl<E: From<diesel::result::Error>> From<diesel::result::Error> for Abort<E> {
    fn from(error: diesel::result::Error) -> Self {
        Self::Failed(error.into())
    }
}

impl<E: From<Error>> From<Error> for Abort<E> {
    fn from(error: Error) -> Self {
        Self::Failed(error.into())
    }
}

/// Whether a purge that deleted records processed up to `purged_through` (consumer database
/// clock) may have deleted the record of a message sent at `sent_at` (sender clock): it was
/// processed after it was sent, give or take the clocks' difference.
fn may_have_been_purged(
    sent_at: DateTime<Utc>,
    purged_through: DateTime<Utc>,
    max_clock_skew: Duration,
) -> bool {
    let horizon = TimeDelta::from_std(max_clock_skew)
        .ok()
        .and_then(|skew| purged_through.checked_add_signed(skew))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    sent_at <= horizon
}

/// The form `key` is stored in: a message id as its hyphenated lowercase string, a business
/// key behind a prefix no id starts with, so the two never collide.
fn stored_key(key: &DedupKey) -> String {
    match key {
        DedupKey::MessageId(id) => id.to_string(),
        DedupKey::Business(business) => format!("{BUSINESS_PREFIX}{business}"),
    }
}

fn check_key(key: &DedupKey) -> Result<()> {
    match key {
        DedupKey::MessageId(_) => Ok(()),
        DedupKey::Business(business) => check_name("dedup key", business),
    }
}

/// Deletes every consumer's inbox records processed before `cutoff`, in bounded batches: a
/// loop of `DELETE` statements of at most `batch_size` rows (at least 1) each, so no statement
/// holds many locks for long. Returns the total deleted.
///
/// Each batch also raises the purge mark of every consumer it deleted records of to the newest
/// `processed_at` it deleted, atomically with the delete: from then on that consumer refuses a
/// message without a record that was sent before the mark (plus its clock skew bound) as
/// [`Processed::Expired`], since it may have been one of the deleted. Outside a transaction
/// every batch commits on its own, and a failure keeps the batches deleted before it. Keep
/// `cutoff` at least the consumers' retention window in the past: redeliveries later than the
/// purge's reach are refused.
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
    if value.contains('\0') {
        return Err(Error::InboxKeyWithNul { what });
    }
    Ok(())
}

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
        fn insert_inbox_record_with_mark(
            &mut self,
            consumer: &str,
            key: &str,
            message_id: Option<MessageId>,
            payload_digest: Option<&[u8]>,
        ) -> Result<Option<Inserted>> {
            (**self).insert_inbox_record_with_mark(consumer, key, message_id, payload_digest)
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
        fn inbox_purged_through(&mut self, consumer: &str) -> Result<Option<DateTime<Utc>>> {
            (**self).inbox_purged_through(consumer)
        }
        fn commit_inbox_transaction(&mut self) -> Result<bool> {
            (**self).commit_inbox_transaction()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_sent_before_the_purge_mark_plus_the_skew_may_have_been_purged() {
        let mark = Utc::now();
        let skew = Duration::from_secs(60);
        assert!(may_have_been_purged(mark - TimeDelta::days(30), mark, skew));
        assert!(may_have_been_purged(
            mark + TimeDelta::seconds(60),
            mark,
            skew
        ));
        assert!(!may_have_been_purged(
            mark + TimeDelta::seconds(61),
            mark,
            skew
        ));
        assert!(may_have_been_purged(
            DateTime::<Utc>::MAX_UTC,
            mark,
            Duration::MAX
        ));
    }

    #[test]
    fn business_keys_and_message_ids_are_stored_apart() {
        let id = MessageId::new();
        assert_eq!(stored_key(&DedupKey::from(id)), id.to_string());
        assert_eq!(
            stored_key(&DedupKey::business(id.to_string())),
            format!("b:{id}")
        );
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
        assert!(matches!(
            check_name("consumer name", "bill\0ing"),
            Err(Error::InboxKeyWithNul {
                what: "consumer name"
            })
        ));
    }
}
