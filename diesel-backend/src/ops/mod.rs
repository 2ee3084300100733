//! Operator functions behind the `waybill` binary: list and skip parked messages, purge skipped
//! ones, see which relays hold leases and what an inbox has processed.
//!
//! Each function runs on the connection it is given. [`skip`] runs its own transaction (a
//! savepoint when the caller already has one); the others are single statements.

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::time::Duration;

use chrono::{DateTime, Utc};
use waybill_outbox_core::{MessageId, Status};

use crate::{Error, OutboxConnection, Result};

/// A parked message as [`parked_messages`] lists it (no payload; see
/// [`find_message`](crate::find_message) for the whole message).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedMessage {
    /// The message's id.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// Its partition key, which is blocked behind it.
    pub partition_key: String,
    /// Its message type.
    pub message_type: String,
    /// Failed publish attempts.
    pub attempts: i32,
    /// Why it was parked.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

/// What one relay holds of one topic right now, from [`relay_leases`]: relays lease partition
/// keys in buckets, so this counts the topic's pending messages whose keys it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayLease {
    /// The topic.
    pub topic: String,
    /// The relay's owner name (`RelayConfig::owner`).
    pub owner: String,
    /// How many pending messages of the topic are in the key buckets it holds.
    pub messages: i64,
    /// When its latest lease expires.
    pub until: DateTime<Utc>,
}

/// What one inbox consumer has recorded, from [`inbox_stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboxStats {
    /// The consumer name.
    pub consumer: String,
    /// Processed messages still kept for deduplication.
    pub processed: i64,
    /// When the oldest kept one was processed.
    pub oldest: Option<DateTime<Utc>>,
    /// When the newest one was processed.
    pub newest: Option<DateTime<Utc>>,
}

/// The per-backend statements behind the operator functions; implemented for
/// `PgConnection`, `SqliteConnection` and `MysqlConnection` (each behind its feature).
pub trait OpsConnection: OutboxConnection {
    /// Parked messages in outbox order, at most `limit`.
    ///
    /// # Errors
    ///
    /// Database failures or a malformed id.
    fn parked_outbox_messages(&mut self, limit: usize) -> Result<Vec<ParkedMessage>>;

    /// Copies the parked message `id` to `outbox_skipped` and, in the same transaction,
    /// deletes it, or, with `marker` (the JSON headers of a skip marker, for a sequenced
    /// message), turns it in place into a pending skip marker with those headers, an empty
    /// payload and the type [`SKIP_MARKER_TYPE`](waybill_outbox_core::sequence::SKIP_MARKER_TYPE).
    ///
    /// # Errors
    ///
    /// As [`skip`].
    fn skip_parked_message(
        &mut self,
        id: MessageId,
        reason: &str,
        by: &str,
        marker: Option<&str>,
    ) -> Result<()>;

    /// Deletes up to `limit` skipped messages skipped more than `older_than` ago.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn purge_skipped_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64>;

    /// Leases held right now, per topic and relay.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn outbox_relay_leases(&mut self) -> Result<Vec<RelayLease>>;

    /// Counts of the inbox records of `consumer`.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn inbox_consumer_stats(&mut self, consumer: &str) -> Result<InboxStats>;

    /// The consumer names the inbox knows: those with records or with a purge mark, sorted.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn inbox_consumer_names(&mut self) -> Result<Vec<String>>;

    /// The clock message times are written with: the database's, or the process's on SQLite.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn outbox_clock(&mut self) -> Result<DateTime<Utc>>;
}

mod pooled {
    use diesel::r2d2::{ConnectionManager, PooledConnection, R2D2Connection};

    use super::*;

    impl<C> OpsConnection for PooledConnection<ConnectionManager<C>>
    where
        C: OpsConnection + R2D2Connection + 'static,
    {
        fn parked_outbox_messages(&mut self, limit: usize) -> Result<Vec<ParkedMessage>> {
            (**self).parked_outbox_messages(limit)
        }
        fn skip_parked_message(
            &mut self,
            id: MessageId,
            reason: &str,
            by: &str,
            marker: Option<&str>,
        ) -> Result<()> {
            (**self).skip_parked_message(id, reason, by, marker)
        }
        fn purge_skipped_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
            (**self).purge_skipped_messages(older_than, limit)
        }
        fn outbox_relay_leases(&mut self) -> Result<Vec<RelayLease>> {
            (**self).outbox_relay_leases()
        }
        fn inbox_consumer_stats(&mut self, consumer: &str) -> Result<InboxStats> {
            (**self).inbox_consumer_stats(consumer)
        }
        fn inbox_consumer_names(&mut self) -> Result<Vec<String>> {
            (**self).inbox_consumer_names()
        }
        fn outbox_clock(&mut self) -> Result<DateTime<Utc>> {
            (**self).outbox_clock()
        }
    }
}

/// Parked messages in outbox order, at most `limit`.
///
/// # Errors
///
/// [`Error::Database`], [`Error::MalformedRow`].
pub fn parked_messages<C: OpsConnection + ?Sized>(
    conn: &mut C,
    limit: usize,
) -> Result<Vec<ParkedMessage>> {
    conn.parked_outbox_messages(limit)
}

/// Gives up on the parked message `id`: moves its row to `outbox_skipped` with `reason` and
/// `by` (who skipped it), in one transaction (a savepoint inside the caller's). Later messages
/// of its key flow again; the skipped row stays for the audit trail until
/// [`purge_skipped`] deletes it.
///
/// A sequenced message (see [`NewOutboxMessage::sequenced`](waybill_outbox_core::NewOutboxMessage::sequenced))
/// is not deleted but replaced in place by a *skip marker*: a pending message with the same
/// id, number and epoch, an empty payload, the type
/// [`SKIP_MARKER_TYPE`](waybill_outbox_core::sequence::SKIP_MARKER_TYPE) and the reason in the
/// [`SKIPPED_HEADER`](waybill_outbox_core::sequence::SKIPPED_HEADER). The relay publishes it
/// in the skipped message's place, and consumers' `process_in_order` moves past its number
/// instead of waiting at a gap forever.
///
/// # Errors
///
/// [`Error::MessageNotFound`], [`Error::NotParked`] (nothing is written then),
/// [`Error::Database`].
pub fn skip<C: OpsConnection + ?Sized>(
    conn: &mut C,
    id: MessageId,
    reason: &str,
    by: &str,
) -> Result<()> {
    let marker = match conn.find_outbox_message(id)? {
        Some(message) => match message.stamp() {
            Some(Ok(stamp)) => {
                let mut headers = waybill_outbox_core::Headers::new();
                stamp.write(&mut headers);
                headers.insert(
                    waybill_outbox_core::sequence::SKIPPED_HEADER.to_owned(),
                    reason.to_owned(),
                );
                Some(serde_json::to_string(&headers).map_err(|e| {
                    Error::Database(diesel::result::Error::SerializationError(Box::new(e)))
                })?)
            }
            _ => None,
        },
        None => return Err(Error::MessageNotFound(id)),
    };
    conn.skip_parked_message(id, reason, by, marker.as_deref())
}

/// Deletes up to `limit` skipped messages skipped more than `older_than` ago; returns how many.
///
/// # Errors
///
/// [`Error::Database`].
pub fn purge_skipped<C: OpsConnection + ?Sized>(
    conn: &mut C,
    older_than: Duration,
    limit: usize,
) -> Result<u64> {
    conn.purge_skipped_messages(older_than, limit)
}

/// Puts every parked message back to pending; returns how many.
///
/// # Errors
///
/// [`Error::Database`].
pub fn requeue_all_parked<C: OutboxConnection + ?Sized>(conn: &mut C) -> Result<u64> {
    conn.requeue_parked_messages(None, None)
}

/// Which relays hold leases on pending messages right now, per topic.
///
/// # Errors
///
/// [`Error::Database`].
pub fn relay_leases<C: OpsConnection + ?Sized>(conn: &mut C) -> Result<Vec<RelayLease>> {
    conn.outbox_relay_leases()
}

/// How many messages the inbox of `consumer` keeps, and the oldest and newest.
///
/// # Errors
///
/// [`Error::Database`].
pub fn inbox_stats<C: OpsConnection + ?Sized>(conn: &mut C, consumer: &str) -> Result<InboxStats> {
    conn.inbox_consumer_stats(consumer)
}

/// The consumer names the inbox knows (with processed records or a purge mark), sorted: what
/// `waybill inbox status` offers when asked about a consumer it does not know.
///
/// # Errors
///
/// [`Error::Database`].
pub fn inbox_consumers<C: OpsConnection + ?Sized>(conn: &mut C) -> Result<Vec<String>> {
    conn.inbox_consumer_names()
}

/// The same statements on every backend: consumers with records, and with a purge mark (two
/// statements, not a `UNION`: on MySQL the two columns have different collations).
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
const CONSUMER_NAMES: [&str; 2] = [
    "SELECT DISTINCT consumer FROM inbox_processed",
    "SELECT consumer FROM inbox_purges",
];

/// A row of [`CONSUMER_NAMES`].
#[derive(diesel::QueryableByName)]
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
struct ConsumerRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    consumer: String,
}

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
impl From<ConsumerRow> for String {
    fn from(row: ConsumerRow) -> Self {
        row.consumer
    }
}

/// The time by the clock message times are written with, to compute ages such as the oldest
/// pending message's.
///
/// # Errors
///
/// [`Error::Database`].
pub fn outbox_clock<C: OpsConnection + ?Sized>(conn: &mut C) -> Result<DateTime<Utc>> {
    conn.outbox_clock()
}

/// A message's `status`, read before skipping it.
#[derive(diesel::QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = diesel::sql_types::SmallInt)]
    status: i16,
}

/// The skip precondition, shared by the backends: the row exists and is parked.
fn check_parked(id: MessageId, status: Option<i16>) -> Result<()> {
    match status {
        None => Err(Error::MessageNotFound(id)),
        Some(code) if code == Status::Parked.code() => Ok(()),
        Some(code) => Err(Error::NotParked {
            id,
            status: Status::from_code(code).map_err(|e| Error::MalformedRow {
                seq: 0,
                reason: e.to_string(),
            })?,
        }),
    }
}

/// Columns copied from `outbox_messages` to `outbox_skipped`.
const SKIPPED_COLUMNS: &str = "seq, id, topic, partition_key, message_type, content_type, \
                               payload, headers, attempts, last_error, created_at";
