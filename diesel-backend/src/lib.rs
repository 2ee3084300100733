//! **waybill** on diesel: a transactional outbox and inbox for PostgreSQL, SQLite and
//! MySQL/MariaDB.
//!
//! # Why
//!
//! A service that saves a state change and then publishes an event writes to two systems, and
//! one can fail after the other: the event is lost, or it announces a change that was rolled
//! back. With the outbox, [`enqueue`] writes the event into the *same* database transaction as
//! the state change. A [`Relay`](waybill_outbox_core::Relay) over a [`DieselStore`] publishes
//! committed events afterwards. A rolled-back transaction publishes nothing; a broker that is
//! down only delays delivery.
//!
//! # Getting started
//!
//! ```
//! use diesel::prelude::*;
//! use waybill_diesel::{enqueue, run_migrations};
//! use waybill_outbox_core::NewOutboxMessage;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = SqliteConnection::establish(":memory:")?;
//! run_migrations(&mut conn)?;
//! # diesel::sql_query("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)").execute(&mut conn)?;
//!
//! conn.transaction(|conn| {
//!     diesel::sql_query("INSERT INTO orders (id, total) VALUES (4231, 1999)").execute(conn)?;
//!     let event = NewOutboxMessage::json("orders", "order:4231", "OrderPlaced",
//!         &serde_json::json!({"order_id": 4231, "total": 1999}))?;
//!     enqueue(conn, &event)?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! Then run a relay over a pool: `Relay::new(DieselStore::new(pool), publisher,
//! RelayConfig::default()).run()` (see [`DieselStore`]). It claims committed messages under a
//! fenced lease, publishes them with any [`Publisher`](waybill_outbox_core::Publisher), and keeps
//! per-key order across any number of relays.
//!
//! # Consuming once
//!
//! Brokers deliver at least once. [`Inbox::process_once`] records the message's id in the
//! consumer's transaction together with the handler's writes, so a duplicate is skipped and a
//! failed handler leaves nothing behind; [`InboxHandler`] wires it to a transport's consumer loop.
//!
//! ```
//! use diesel::prelude::*;
//! use waybill_diesel::{Inbox, IncomingMessage, Processed};
//! # use waybill_outbox_core::MessageId;
//! # let mut conn = SqliteConnection::establish(":memory:").unwrap();
//! # waybill_diesel::run_migrations(&mut conn).unwrap();
//! # let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}");
//!
//! let billing = Inbox::new("billing");
//! let first = billing.process_once(&mut conn, &delivery, |_conn| Ok::<_, waybill_diesel::Error>(1))?;
//! let again = billing.process_once(&mut conn, &delivery, |_conn| Ok::<_, waybill_diesel::Error>(2))?;
//! assert_eq!((first, again), (Processed::Handled(1), Processed::Duplicate));
//! # Ok::<(), waybill_diesel::Error>(())
//! ```
//!
//! # Operating
//!
//! [`topic_stats`], [`relay_leases`], [`parked_messages`], [`find_message`], [`requeue`],
//! [`requeue_key`], [`requeue_all_parked`], [`skip`], [`purge_skipped`] and [`inbox_stats`]
//! answer "is anything stuck?" and fix it; the `waybill` binary (package `waybill-cli`) wraps
//! them as commands.
//!
//! # Features
//!
//! No backend is on by default; enable the ones you use:
//! `waybill-diesel = { version = "0.1", features = ["postgres"] }`.
//!
//! - `postgres`: `PgConnection`, with `LISTEN`/`NOTIFY` wake-ups for idle relays. Builds the
//!   bundled libpq (a C compiler, plus `libssl-dev` and `pkg-config` for its TLS).
//! - `sqlite`: `SqliteConnection`, the embedded choice. Builds the bundled SQLite (a C
//!   compiler).
//! - `mysql`: `MysqlConnection` for MySQL 8 and MariaDB 10.6+, linked against the system's
//!   `libmysqlclient`/`libmariadb` (`apt-get install libmariadb-dev`).
//!
//! # Backend differences
//!
//! | | PostgreSQL | MySQL / MariaDB | SQLite |
//! |---|---|---|---|
//! | message id | `uuid` | `BINARY(16)`, big-endian | `BLOB` of 16 bytes, big-endian |
//! | headers | `jsonb` | JSON text (`LONGTEXT` checked by `JSON_VALID`) | JSON text |
//! | times | `timestamptz`, database clock | `DATETIME(6)` in UTC, database clock | integer microseconds, process clock |
//! | claims serialized by | a transaction-scoped advisory lock; random fencing tokens; commits without waiting for the WAL flush | the lock row `outbox_relay_locks.claim` (a counter as fencing token), `READ COMMITTED` | one writer: `BEGIN IMMEDIATE`, one key bucket |
//! | write-backs | lock their claim's lease rows `FOR UPDATE` (fenced by token) | the same | the same, under the single writer |
//! | wake-up | `NOTIFY` from an insert trigger | poll | poll |

// Without a backend feature the shared SQL helpers have no user; the crate still builds.
#![cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]

mod common;
mod connection;
mod error;
pub mod inbox;
#[cfg(feature = "mysql")]
pub mod mysql;
pub mod ops;
#[cfg(feature = "postgres")]
pub mod partitions;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "postgres")]
mod prepared;
pub mod sequence;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod store;

/// The README's snippet, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

/// The guide's snippets (`docs/guide.md`), compiled as doctests and, where they need no server,
/// run.
#[cfg(doctest)]
#[doc = include_str!("../../docs/guide.md")]
struct GuideDoctests;

use chrono::{DateTime, Utc};
use waybill_outbox_core::{Limits, MessageId, NewOutboxMessage, OutboxMessage};

pub use connection::OutboxConnection;
pub use error::{Error, Regression, Result};
pub use inbox::{
    purge_processed_before, DedupKey, FirstMessage, InOrder, Inbox, InboxConnection, InboxHandler,
    IncomingMessage, Inserted, Processed,
};
pub use ops::{
    inbox_consumers, inbox_stats, outbox_clock, parked_messages, purge_skipped, relay_leases,
    requeue_all_parked, skip, InboxStats, OpsConnection, ParkedMessage, RelayLease,
};
pub use sequence::{inbox_gaps, inbox_marks, GapEntry, InOrderConnection, MarkEntry};
pub use store::DieselStore;

/// Rows per `INSERT` statement: far below every backend's bind-parameter limit.
pub(crate) const INSERT_CHUNK: usize = 1000;

/// Writes `message` to the outbox on `conn`, joining the caller's transaction.
///
/// Call it inside the transaction that changes your state (`conn.transaction(|conn| ..)`): the
/// message commits with that transaction and disappears with its rollback, or with the
/// rollback of a savepoint around the call. It never checks out another connection, begins a
/// transaction or commits. Called outside a transaction, the single insert commits on its own.
/// The message is checked against [`Limits::default`] first; see [`Outbox`] for other limits.
///
/// Returns the message's id.
///
/// # Errors
///
/// [`Error::Invalid`] before the database is touched; [`Error::DuplicateMessageId`] when the id
/// is already in the outbox (on PostgreSQL the caller's transaction is then aborted);
/// [`Error::Database`].
pub fn enqueue<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    message: &NewOutboxMessage,
) -> Result<MessageId> {
    Outbox::default().enqueue(conn, message)
}

/// Writes all `messages` to the outbox on `conn`, in order, joining the caller's transaction.
///
/// Like [`enqueue`], with as few statements as the backend allows. More than 1,000 messages
/// need several statements, and so do messages larger together than a MySQL statement may be
/// (the server's `max_allowed_packet`): then it must run inside a transaction.
///
/// # Errors
///
/// As [`enqueue`], plus [`Error::NotInTransaction`] for a multi-statement batch outside a
/// transaction, [`Error::DuplicateMessageId`] for an id repeated within `messages` and, on
/// MySQL, [`Error::TooLargeForServer`] for a message larger than one statement may be.
pub fn enqueue_all<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    messages: &[NewOutboxMessage],
) -> Result<()> {
    Outbox::default().enqueue_all(conn, messages)
}

/// Inserts validated messages, stamping the sequenced ones first (see [`sequence`]).
fn insert<C: OutboxConnection + ?Sized>(conn: &mut C, messages: &[NewOutboxMessage]) -> Result<()> {
    if let [message] = messages {
        if message.is_sequenced() {
            if !conn.in_transaction()? {
                return Err(Error::SequencedOutsideTransaction(message.id()));
            }
            if conn.insert_sequenced_outbox_message(message)? {
                return Ok(());
            }
        }
    }
    match sequence::stamp(conn, messages)? {
        None => conn.insert_outbox_messages(messages),
        Some((stamped, draws)) => {
            let inserted = conn.insert_outbox_messages(&stamped);
            if inserted.is_err() {
                sequence::give_back(conn, draws);
            }
            inserted
        }
    }
}

/// Draws a new random part of the producer epoch of sequenced messages. Run it after restoring
/// the producer database from a backup or failing it over, when the epoch's automatic parts do
/// not change (on MySQL/MariaDB and SQLite it has none; on PostgreSQL see
/// `docs/guarantees.md`): consumers then refuse numbers that went back instead of skipping
/// them as duplicates. Harmless otherwise: numbers that continue are accepted under a new
/// epoch. Returns the new random part.
///
/// # Errors
///
/// [`Error::Database`].
pub fn rotate_sequence_epoch<C: OutboxConnection + ?Sized>(conn: &mut C) -> Result<String> {
    let epoch = uuid::Uuid::new_v4().simple().to_string();
    conn.set_sequence_epoch(&epoch)?;
    Ok(epoch)
}

/// Runs the embedded outbox migrations that have not run yet, in their own transactions, and
/// returns the names of those it applied (`<version>_<name>`, in order; empty when the schema
/// was up to date).
///
/// The same SQL is in the repository's `migrations/<backend>/` folders for projects that manage
/// their schema with `diesel migration`.
///
/// On PostgreSQL it also sets the `seq` sequence's `CACHE` back to 1 (with a warning) if it was
/// raised: with a cache, sessions draw `seq` from their own ranges, and a message enqueued after
/// another one committed could be published before it.
///
/// # Errors
///
/// [`Error::Migration`].
pub fn run_migrations<C: OutboxConnection + ?Sized>(conn: &mut C) -> Result<Vec<String>> {
    conn.run_outbox_migrations()
}

/// Reverts every embedded migration, dropping the outbox (and inbox) tables with their data.
///
/// # Errors
///
/// [`Error::Migration`].
pub fn revert_migrations<C: OutboxConnection + ?Sized>(conn: &mut C) -> Result<()> {
    conn.revert_outbox_migrations()
}

/// Puts the parked message `id` back to pending with a fresh attempt count; returns whether
/// it was parked. Later messages of its key flow again once it is published.
///
/// # Errors
///
/// [`Error::Database`].
pub fn requeue<C: OutboxConnection + ?Sized>(conn: &mut C, id: MessageId) -> Result<bool> {
    Ok(conn.requeue_parked_messages(Some(id), None)? > 0)
}

/// Puts every parked message of `partition_key` back to pending; returns how many.
///
/// # Errors
///
/// [`Error::Database`].
pub fn requeue_key<C: OutboxConnection + ?Sized>(conn: &mut C, partition_key: &str) -> Result<u64> {
    conn.requeue_parked_messages(None, Some(partition_key))
}

/// The stored message with `id`, if it is still in the outbox.
///
/// # Errors
///
/// [`Error::Database`], [`Error::MalformedRow`].
pub fn find_message<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    id: MessageId,
) -> Result<Option<OutboxMessage>> {
    conn.find_outbox_message(id)
}

/// Per-topic counts for monitoring, from [`topic_stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Messages waiting to be published (including leased and backing-off ones).
    pub pending: i64,
    /// Parked messages waiting for an operator.
    pub parked: i64,
    /// Published messages still kept for the retention window.
    pub published: i64,
    /// When the oldest pending message was enqueued.
    pub oldest_pending: Option<DateTime<Utc>>,
}

impl TopicStats {
    /// Counts for one topic.
    pub fn new(
        topic: String,
        pending: i64,
        parked: i64,
        published: i64,
        oldest_pending: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            topic,
            pending,
            parked,
            published,
            oldest_pending,
        }
    }
}

/// Pending, parked and retained counts and the oldest pending message, per topic.
///
/// # Errors
///
/// [`Error::Database`].
pub fn topic_stats<C: OutboxConnection + ?Sized>(conn: &mut C) -> Result<Vec<TopicStats>> {
    conn.outbox_topic_stats()
}

/// The outbox with non-default [`Limits`].
///
/// ```
/// use waybill_diesel::{Error, Outbox};
/// use waybill_outbox_core::{Limits, NewOutboxMessage};
/// # use diesel::prelude::*;
/// # let mut conn = SqliteConnection::establish(":memory:").unwrap();
/// # waybill_diesel::run_migrations(&mut conn).unwrap();
///
/// let outbox = Outbox::new(Limits::default().max_payload_bytes(16));
/// let big = NewOutboxMessage::bytes("t", "k", "T", "text/plain", vec![b'x'; 17]);
/// assert!(matches!(outbox.enqueue(&mut conn, &big), Err(Error::Invalid { .. })));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Outbox {
    limits: Limits,
}

impl Outbox {
    /// An outbox that checks messages against `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// [`enqueue`] with these limits.
    ///
    /// # Errors
    ///
    /// As [`enqueue`].
    pub fn enqueue<C: OutboxConnection + ?Sized>(
        &self,
        conn: &mut C,
        message: &NewOutboxMessage,
    ) -> Result<MessageId> {
        self.validate(message)?;
        insert(conn, std::slice::from_ref(message))?;
        Ok(message.id())
    }

    /// [`enqueue_all`] with these limits.
    ///
    /// # Errors
    ///
    /// As [`enqueue_all`].
    pub fn enqueue_all<C: OutboxConnection + ?Sized>(
        &self,
        conn: &mut C,
        messages: &[NewOutboxMessage],
    ) -> Result<()> {
        let mut seen = std::collections::HashSet::with_capacity(messages.len());
        for message in messages {
            self.validate(message)?;
            if !seen.insert(message.id()) {
                return Err(Error::DuplicateMessageId(Some(message.id())));
            }
        }
        if messages.len() > INSERT_CHUNK && !conn.in_transaction()? {
            return Err(Error::NotInTransaction(messages.len()));
        }
        if messages.is_empty() {
            return Ok(());
        }
        insert(conn, messages)
    }

    fn validate(&self, message: &NewOutboxMessage) -> Result<()> {
        self.limits.check(message).map_err(|source| Error::Invalid {
            id: message.id(),
            source,
        })
    }
}
