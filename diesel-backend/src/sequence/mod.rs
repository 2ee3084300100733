//! Sequenced messages (issue 25): the producer's per-key counter and the consumer's per-key
//! marks, with the per-backend SQL in `pg.rs`, `mysql.rs` and `sqlite.rs`.
//!
//! Producer: [`enqueue`](crate::enqueue) of a message built with
//! [`NewOutboxMessage::sequenced`] first raises the `(topic, partition key)` row of
//! `outbox_key_sequences` with an upsert in the writer's transaction, then inserts the message
//! stamped with the number and the producer epoch. The upsert locks the counter row until the
//! writer commits, so a second writer of the key waits, draws the next number and inserts its
//! row after the first one committed: numbers follow commit order, and so does the outbox's own
//! order, which the relay publishes by.
//!
//! Consumer: see [`Inbox::process_in_order`](crate::Inbox::process_in_order).

/// The PostgreSQL producer epoch, as an SQL expression: the random row of
/// `outbox_sequence_epoch`, the cluster's system identifier (another cluster), its current
/// timeline (a promoted replica, a point-in-time recovery) and the counter table's oid (the
/// table recreated by a restore). Inline rather than a SQL function, which PostgreSQL plans on
/// every call: with one, a sequenced enqueue ran at about 0.75 of a plain one with 8 clients;
/// inline, at about 0.93 (pgbench, same run).
#[cfg(feature = "postgres")]
macro_rules! pg_epoch {
    () => {
        "((SELECT epoch FROM outbox_sequence_epoch WHERE id = 1) || '.' \
          || (SELECT system_identifier FROM pg_control_system())::text || '.' \
          || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) || '.' \
          || 'outbox_key_sequences'::regclass::oid::text)"
    };
}
#[cfg(feature = "postgres")]
pub(crate) use pg_epoch;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::BTreeMap;

use waybill_outbox_core::{NewOutboxMessage, Stamp};

use crate::{Error, OutboxConnection, Result};

#[cfg(feature = "mysql")]
pub(crate) use mysql::draw as draw_mysql;
#[cfg(feature = "postgres")]
pub(crate) use pg::draw as draw_pg;
#[cfg(feature = "sqlite")]
pub(crate) use sqlite::draw as draw_sqlite;

/// What a counter upsert returned: the key's last number after it, and the producer epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drawn {
    /// The last number handed out for the key, this draw's included.
    pub last: u64,
    /// The producer epoch right now.
    pub epoch: String,
}

/// The numbers drawn for one batch, kept so that a failed insert can give them back.
pub(crate) struct Draws {
    counts: Vec<((String, String), i64)>,
}

/// Stamps the sequenced messages among `messages` with their keys' next numbers, drawing them
/// in the caller's transaction. Returns `None` when none is sequenced (nothing drawn).
///
/// Keys are drawn in sorted order, so two batches with the same keys lock their counter rows
/// in the same order and cannot deadlock each other.
pub(crate) fn stamp<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    messages: &[NewOutboxMessage],
) -> Result<Option<(Vec<NewOutboxMessage>, Draws)>> {
    let Some(first) = messages.iter().find(|m| m.is_sequenced()) else {
        return Ok(None);
    };
    if !conn.in_transaction()? {
        return Err(Error::SequencedOutsideTransaction(first.id()));
    }
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for message in messages.iter().filter(|m| m.is_sequenced()) {
        *counts
            .entry((
                message.topic().to_owned(),
                message.partition_key().to_owned(),
            ))
            .or_default() += 1;
    }
    // The next number to hand out per key, and the epoch.
    let mut next: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
    let mut draws = Draws { counts: Vec::new() };
    for ((topic, key), count) in counts {
        let drawn = conn.draw_key_sequences(&topic, &key, count)?;
        let first = drawn.last + 1 - count.unsigned_abs();
        draws.counts.push(((topic.clone(), key.clone()), count));
        next.insert((topic, key), (first, drawn.epoch));
    }
    let stamped = messages
        .iter()
        .map(|message| {
            if !message.is_sequenced() {
                return message.clone();
            }
            let slot = next.get_mut(&(
                message.topic().to_owned(),
                message.partition_key().to_owned(),
            ));
            match slot {
                Some((number, epoch)) => {
                    let mut headers = message.headers().clone();
                    Stamp::new(*number, epoch.clone()).write(&mut headers);
                    *number += 1;
                    message.clone().with_headers(headers)
                }
                // Every sequenced message's key was drawn above.
                None => message.clone(),
            }
        })
        .collect();
    Ok(Some((stamped, draws)))
}

/// Gives the numbers of a batch whose insert failed back to their counters, so a caller that
/// commits anyway (MySQL and SQLite leave the transaction usable) leaves no gap. On PostgreSQL
/// the failed insert aborted the transaction and nothing can be given back, nor needs to be.
pub(crate) fn give_back<C: OutboxConnection + ?Sized>(conn: &mut C, draws: Draws) {
    for ((topic, key), count) in draws.counts {
        if let Err(error) = conn.draw_key_sequences(&topic, &key, -count) {
            log::debug!("giving back {count} sequence numbers of {topic}/{key} failed: {error}");
        }
    }
}

/// The counter row a draw returns on every backend, with the epoch.
#[derive(diesel::QueryableByName)]
struct DrawnRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last_sequence: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    epoch: String,
}

impl From<DrawnRow> for Drawn {
    fn from(row: DrawnRow) -> Self {
        Self {
            last: row.last_sequence.unsigned_abs(),
            epoch: row.epoch,
        }
    }
}

/// The mark row that locking a mark returns on every backend.
#[derive(diesel::QueryableByName)]
struct MarkRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    epoch: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    previous_epoch: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    epoch_start: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last_sequence: i64,
}

impl From<MarkRow> for SequenceMark {
    fn from(row: MarkRow) -> Self {
        Self {
            epoch: row.epoch,
            previous_epoch: row.previous_epoch,
            epoch_start: row.epoch_start.unsigned_abs(),
            last: row.last_sequence.unsigned_abs(),
        }
    }
}

/// A consumer's mark on one stream: the last number applied and the epoch it came under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SequenceMark {
    /// The producer epoch of the last applied message (empty before the first).
    pub epoch: String,
    /// The epoch before it (empty if none): its redeliveries below `epoch_start` are
    /// duplicates.
    pub previous_epoch: String,
    /// The first number applied under `epoch` (0 before the first message).
    pub epoch_start: u64,
    /// The last number applied (0 before the first message).
    pub last: u64,
}

/// One stream of sequenced messages: a producer's key of a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream<'a> {
    /// SHA-256 of source, topic and key, NUL-separated: the stored key of the stream.
    pub digest: Vec<u8>,
    /// The producer's CloudEvents source.
    pub source: &'a str,
    /// The topic.
    pub topic: &'a str,
    /// The partition key.
    pub partition_key: &'a str,
}

impl<'a> Stream<'a> {
    /// The stream of `partition_key` of `topic` from `source`.
    pub fn new(source: &'a str, topic: &'a str, partition_key: &'a str) -> Self {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for part in [source, topic, partition_key] {
            hash.update(part.as_bytes());
            hash.update([0u8]);
        }
        Self {
            digest: hash.finalize().to_vec(),
            source,
            topic,
            partition_key,
        }
    }
}

/// A consumer's mark as `waybill inbox marks` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MarkEntry {
    /// The consumer.
    pub consumer: String,
    /// The producer's source.
    pub source: String,
    /// The topic.
    pub topic: String,
    /// The partition key.
    pub partition_key: String,
    /// The producer epoch of the last applied message.
    pub epoch: String,
    /// The last number applied.
    pub last_sequence: u64,
    /// When the mark last moved.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A message held back (or parked) behind a gap, as `waybill inbox gaps` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GapEntry {
    /// The consumer.
    pub consumer: String,
    /// The producer's source.
    pub source: String,
    /// The topic.
    pub topic: String,
    /// The partition key.
    pub partition_key: String,
    /// The number the consumer waits for.
    pub expected: u64,
    /// The number it received instead.
    pub got: u64,
    /// The held message's id.
    pub message_id: String,
    /// When it was first held back.
    pub first_seen_at: chrono::DateTime<chrono::Utc>,
    /// When it last was.
    pub last_seen_at: chrono::DateTime<chrono::Utc>,
    /// Whether the gap wait ran out and the message was parked.
    pub parked: bool,
}

/// The per-backend statements of [`Inbox::process_in_order`](crate::Inbox::process_in_order)
/// and of the operator listings; implemented for `PgConnection`, `SqliteConnection`,
/// `MysqlConnection` (each behind its feature) and pooled connections of those, and required of
/// every [`InboxConnection`](crate::InboxConnection). Each joins the caller's transaction.
pub trait InOrderConnection {
    /// Moves the mark of `stream` from `from` to `to` if it is at `from` under `epoch`: the
    /// common case in one statement, which locks the mark until the transaction ends (waiting
    /// for a concurrent holder first). `false` when the mark is elsewhere or missing.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn advance_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<bool>;

    /// The mark of `stream`, created empty if missing, locked until the transaction ends.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn lock_sequence_mark(&mut self, consumer: &str, stream: &Stream<'_>) -> Result<SequenceMark>;

    /// Writes the mark of `stream` (locked by [`lock_sequence_mark`](Self::lock_sequence_mark)).
    ///
    /// # Errors
    ///
    /// Database failures.
    fn save_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        mark: &SequenceMark,
    ) -> Result<()>;

    /// Records that message `message_id` numbered `got` is held back waiting for `expected`,
    /// and returns when it was first held back (now, unless this very message was held
    /// before).
    ///
    /// # Errors
    ///
    /// Database failures.
    fn hold_sequence_gap(
        &mut self,
        consumer: &str,
        stream: &Stream<'_>,
        held: &Held<'_>,
    ) -> Result<chrono::DateTime<chrono::Utc>>;

    /// Flags the held gap of `stream` as parked.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn park_sequence_gap(&mut self, consumer: &str, stream: &[u8]) -> Result<()>;

    /// Marks of `consumer` (or every consumer), by consumer, source, topic and key, at most
    /// `limit`.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn sequence_marks(&mut self, consumer: Option<&str>, limit: usize) -> Result<Vec<MarkEntry>>;

    /// Gaps still open (the held message not applied since), of `consumer` or every consumer.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn sequence_gaps(&mut self, consumer: Option<&str>) -> Result<Vec<GapEntry>>;
}

/// A message held back behind a gap, as [`InOrderConnection::hold_sequence_gap`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<'a> {
    /// The number the key waits for.
    pub expected: u64,
    /// The number received.
    pub got: u64,
    /// The message's id.
    pub message_id: &'a str,
    /// The consumer's clock now.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// `u64` into a `BIGINT`, saturating (numbers never come near).
pub(crate) fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

mod pooled {
    use diesel::r2d2::{ConnectionManager, PooledConnection, R2D2Connection};

    use super::*;

    impl<C> InOrderConnection for PooledConnection<ConnectionManager<C>>
    where
        C: InOrderConnection + R2D2Connection + Send + 'static,
    {
        fn advance_sequence_mark(
            &mut self,
            consumer: &str,
            stream: &[u8],
            epoch: &str,
            from: u64,
            to: u64,
        ) -> Result<bool> {
            (**self).advance_sequence_mark(consumer, stream, epoch, from, to)
        }
        fn lock_sequence_mark(
            &mut self,
            consumer: &str,
            stream: &Stream<'_>,
        ) -> Result<SequenceMark> {
            (**self).lock_sequence_mark(consumer, stream)
        }
        fn save_sequence_mark(
            &mut self,
            consumer: &str,
            stream: &[u8],
            mark: &SequenceMark,
        ) -> Result<()> {
            (**self).save_sequence_mark(consumer, stream, mark)
        }
        fn hold_sequence_gap(
            &mut self,
            consumer: &str,
            stream: &Stream<'_>,
            held: &Held<'_>,
        ) -> Result<chrono::DateTime<chrono::Utc>> {
            (**self).hold_sequence_gap(consumer, stream, held)
        }
        fn park_sequence_gap(&mut self, consumer: &str, stream: &[u8]) -> Result<()> {
            (**self).park_sequence_gap(consumer, stream)
        }
        fn sequence_marks(
            &mut self,
            consumer: Option<&str>,
            limit: usize,
        ) -> Result<Vec<MarkEntry>> {
            (**self).sequence_marks(consumer, limit)
        }
        fn sequence_gaps(&mut self, consumer: Option<&str>) -> Result<Vec<GapEntry>> {
            (**self).sequence_gaps(consumer)
        }
    }
}

/// The marks of `consumer` (or of every consumer) on their sequenced streams: the last number
/// applied per `(source, topic, partition key)`, at most `limit`, sorted. What `waybill inbox
/// marks` shows.
///
/// # Errors
///
/// [`Error::Database`].
pub fn inbox_marks<C: InOrderConnection + ?Sized>(
    conn: &mut C,
    consumer: Option<&str>,
    limit: usize,
) -> Result<Vec<MarkEntry>> {
    conn.sequence_marks(consumer, limit)
}

/// The messages held back behind a gap, or parked after the gap wait, whose number the
/// consumer has not applied since, oldest first. What `waybill inbox gaps` shows.
///
/// # Errors
///
/// [`Error::Database`].
pub fn inbox_gaps<C: InOrderConnection + ?Sized>(
    conn: &mut C,
    consumer: Option<&str>,
) -> Result<Vec<GapEntry>> {
    conn.sequence_gaps(consumer)
}
