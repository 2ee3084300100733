//! SQLite: the embedded default. One writer at a time, so claims take an immediate
//! transaction; ids are 16-byte blobs, headers JSON text, times integer microseconds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::CustomizeConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention, Status,
};

use crate::common::{
    headers_from_text, id_from_bytes, into_messages, micros, truncate_error, Grouped, RawRow,
    WRITE_BACK_CHUNK,
};
use crate::error::duplicate_or;
use crate::{Error, OutboxConnection, Result, TopicStats};

/// The SQLite migrations, embedded.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

mod schema {
    diesel::table! {
        outbox_messages (seq) {
            seq -> BigInt,
            id -> Binary,
            topic -> Text,
            partition_key -> Text,
            message_type -> Text,
            content_type -> Text,
            payload -> Binary,
            headers -> Text,
            status -> SmallInt,
            attempts -> Integer,
            last_error -> Nullable<Text>,
            available_at -> BigInt,
            created_at -> BigInt,
            published_at -> Nullable<BigInt>,
        }
    }
}

use schema::outbox_messages as m;

/// Connection settings for file databases shared by several connections: WAL so readers do not
/// block the writer, a busy timeout so writers queue instead of failing with "database is
/// locked", and `synchronous = NORMAL` (durable across process crashes; WAL's usual pairing).
///
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// use waybill_diesel::sqlite::SqliteOptions;
///
/// let pool = Pool::builder()
///     .connection_customizer(Box::new(SqliteOptions::default()))
///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
/// # Ok::<(), r2d2::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SqliteOptions {
    busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(30),
        }
    }
}

impl SqliteOptions {
    /// How long a writer waits for the database lock. Defaults to 30 s.
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Applies the settings to one connection.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when a pragma fails.
    pub fn apply(&self, conn: &mut SqliteConnection) -> Result<()> {
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            self.busy_timeout.as_millis()
        ))?;
        Ok(())
    }
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqliteOptions {
    fn on_acquire(
        &self,
        conn: &mut SqliteConnection,
    ) -> std::result::Result<(), diesel::r2d2::Error> {
        self.apply(conn).map_err(|e| match e {
            Error::Database(e) => diesel::r2d2::Error::QueryError(e),
            other => diesel::r2d2::Error::QueryError(diesel::result::Error::QueryBuilderError(
                Box::new(other),
            )),
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = m)]
struct NewRow<'a> {
    id: Vec<u8>,
    topic: &'a str,
    partition_key: &'a str,
    message_type: &'a str,
    content_type: &'a str,
    payload: &'a [u8],
    headers: String,
    available_at: i64,
    created_at: i64,
}

#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = m, check_for_backend(diesel::sqlite::Sqlite))]
struct Row {
    seq: i64,
    id: Vec<u8>,
    topic: String,
    partition_key: String,
    message_type: String,
    content_type: String,
    payload: Vec<u8>,
    headers: String,
    status: i16,
    attempts: i32,
    last_error: Option<String>,
    available_at: i64,
    created_at: i64,
    published_at: Option<i64>,
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::UNIX_EPOCH)
}

fn now() -> i64 {
    Utc::now().timestamp_micros()
}

impl From<Row> for RawRow {
    fn from(row: Row) -> Self {
        RawRow {
            seq: row.seq,
            id: id_from_bytes(&row.id),
            topic: row.topic,
            partition_key: row.partition_key,
            message_type: row.message_type,
            content_type: row.content_type,
            payload: row.payload,
            headers: headers_from_text(&row.headers),
            status: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            available_at: time(row.available_at),
            created_at: time(row.created_at),
            published_at: row.published_at.map(time),
        }
    }
}

#[derive(QueryableByName)]
struct Token {
    #[diesel(sql_type = BigInt)]
    token: i64,
}

#[derive(QueryableByName)]
struct StatsRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = BigInt)]
    parked: i64,
    #[diesel(sql_type = BigInt)]
    published: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    oldest_pending: Option<i64>,
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = BigInt)]
    token: i64,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
}

/// See the PostgreSQL claim. SQLite has one writer, so the whole outbox is one bucket: a claim
/// takes the lease on it, and relays take turns. Binds: now, now, limit.
const CLAIM: &str = "
SELECT m.seq, m.id, m.topic, m.partition_key, m.message_type, m.content_type, m.payload,
       m.headers, m.status, m.attempts, m.last_error, m.available_at, m.created_at,
       m.published_at
FROM outbox_messages m
LEFT JOIN (
    SELECT partition_key, min(seq) AS first_seq FROM outbox_messages
    WHERE (status = 0 AND available_at > ?) OR status = 2
    GROUP BY partition_key
) b ON b.partition_key = m.partition_key
WHERE m.status = 0 AND m.available_at <= ? AND (b.first_seq IS NULL OR m.seq < b.first_seq)
ORDER BY m.seq
LIMIT ?";

fn current_lease(conn: &mut SqliteConnection) -> Result<LeaseRow> {
    Ok(
        diesel::sql_query("SELECT token, expires_at FROM outbox_relay_leases WHERE bucket = 0")
            .get_result(conn)?,
    )
}

/// The outbox's lease row, restored (released) if it is missing: deleted by hand, or lost in a
/// partial restore. Without it the outbox could never be leased. The caller holds the write lock.
fn lease_or_restore(conn: &mut SqliteConnection) -> Result<LeaseRow> {
    let lease =
        diesel::sql_query("SELECT token, expires_at FROM outbox_relay_leases WHERE bucket = 0")
            .get_result(conn)
            .optional()?;
    if let Some(lease) = lease {
        return Ok(lease);
    }
    log::warn!("restoring the missing outbox lease row");
    Ok(diesel::sql_query(
        "INSERT INTO outbox_relay_leases (bucket, token, expires_at) VALUES (0, 0, ?) \
         RETURNING token, expires_at",
    )
    .bind::<BigInt, _>(RELEASED)
    .get_result(conn)?)
}

impl OutboxConnection for SqliteConnection {
    fn in_transaction(&mut self) -> Result<bool> {
        let status = AnsiTransactionManager::transaction_manager_status_mut(self);
        Ok(status.transaction_depth()?.is_some())
    }

    fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()> {
        let single = (messages.len() == 1).then(|| messages[0].id());
        let created_at = now();
        for chunk in messages.chunks(crate::INSERT_CHUNK) {
            let rows = chunk
                .iter()
                .map(|msg| {
                    Ok(NewRow {
                        id: msg.id().as_bytes().to_vec(),
                        topic: msg.topic(),
                        partition_key: msg.partition_key(),
                        message_type: msg.message_type(),
                        content_type: msg.content_type(),
                        payload: msg.payload(),
                        headers: serde_json::to_string(msg.headers()).map_err(|e| {
                            Error::Database(diesel::result::Error::SerializationError(Box::new(e)))
                        })?,
                        available_at: msg
                            .available_after()
                            .map_or(created_at, |at| at.timestamp_micros()),
                        created_at,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            diesel::insert_into(m::table)
                .values(&rows)
                .execute(self)
                .map_err(|e| duplicate_or(e, single))?;
        }
        Ok(())
    }

    fn draw_key_sequences(
        &mut self,
        topic: &str,
        partition_key: &str,
        count: i64,
    ) -> Result<crate::sequence::Drawn> {
        crate::sequence::draw_sqlite(self, topic, partition_key, count)
    }

    fn set_sequence_epoch(&mut self, epoch: &str) -> Result<()> {
        diesel::sql_query("UPDATE outbox_sequence_epoch SET epoch = ? WHERE id = 1")
            .bind::<diesel::sql_types::Text, _>(epoch)
            .execute(self)?;
        Ok(())
    }

    fn run_outbox_migrations(&mut self) -> Result<Vec<String>> {
        // One immediate transaction: a second process starting at once waits for the first
        // (busy timeout) instead of racing it on diesel's migrations table.
        self.immediate_transaction(|conn| {
            let applied = conn
                .run_pending_migrations(MIGRATIONS)
                .map_err(Error::Migration)?;
            crate::common::migration_names::<diesel::sqlite::Sqlite>(&MIGRATIONS, &applied)
        })
    }

    fn revert_outbox_migrations(&mut self) -> Result<()> {
        self.revert_all_migrations(MIGRATIONS)
            .map_err(Error::Migration)?;
        Ok(())
    }

    fn claim_outbox_messages(
        &mut self,
        limit: usize,
        lease: Duration,
        owner: &str,
        _in_flight: usize,
    ) -> Result<Claimed> {
        self.immediate_transaction(|conn| {
            let now = now();
            let Token { token } = diesel::sql_query(
                "UPDATE outbox_relay_locks SET token = token + 1, holder = ?, updated_at = ? \
                 WHERE name = 'claim' RETURNING token",
            )
            .bind::<Text, _>(owner)
            .bind::<BigInt, _>(now)
            .get_result(conn)?;
            let previous = lease_or_restore(conn)?;
            if previous.expires_at > now {
                return Ok(Claimed::new(token, Vec::new()));
            }
            let rows: Vec<Row> = diesel::sql_query(CLAIM)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
                .load(conn)?;
            if rows.is_empty() {
                return Ok(Claimed::new(token, Vec::new()));
            }
            let leased = diesel::sql_query(
                "UPDATE outbox_relay_leases SET token = ?, owner = ?, expires_at = ? WHERE bucket = 0",
            )
            .bind::<BigInt, _>(token)
            .bind::<Text, _>(owner)
            .bind::<BigInt, _>(now.saturating_add(micros(lease)))
            .execute(conn)?;
            if leased != 1 {
                // Fail closed: never hand out a message without its lease.
                return Err(Error::MissingLeaseRows(vec![0]));
            }
            let (messages, malformed) = into_messages(rows.into_iter().map(RawRow::from).collect());
            for (seq, reason) in &malformed {
                park(conn, *seq, reason)?;
            }
            if messages.is_empty() {
                // Nothing to publish, so no write-back will release the lease: release it now.
                diesel::sql_query(
                    "UPDATE outbox_relay_leases SET owner = NULL, expires_at = ? WHERE bucket = 0",
                )
                .bind::<BigInt, _>(RELEASED)
                .execute(conn)?;
            }
            // A lease that ended without being released belonged to a relay that stopped short.
            let takeovers = u64::from(previous.expires_at != RELEASED);
            Ok(Claimed::new(token, messages).with_lease_takeovers(takeovers))
        })
    }

    fn complete_outbox_messages(
        &mut self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport> {
        let grouped = Grouped::new(completions);
        let applied = self.immediate_transaction::<_, Error, _>(|conn| {
            if current_lease(conn)?.token != token {
                return Ok(0); // taken over: every write is refused
            }
            let now = now();
            let mut applied = 0;
            let pending = || m::table.filter(m::status.eq(Status::Pending.code()));
            for chunk in grouped.published.chunks(WRITE_BACK_CHUNK) {
                let target = pending().filter(m::seq.eq_any(chunk));
                applied += match retention {
                    Retention::Delete => diesel::delete(target).execute(conn)?,
                    Retention::Keep(_) => diesel::update(target)
                        .set((
                            m::status.eq(Status::Published.code()),
                            m::published_at.eq(now),
                        ))
                        .execute(conn)?,
                };
            }
            for chunk in grouped.released.chunks(WRITE_BACK_CHUNK) {
                // Nothing to write: releasing the lease hands them back.
                let still_pending: i64 = pending()
                    .filter(m::seq.eq_any(chunk))
                    .count()
                    .get_result(conn)?;
                applied += usize::try_from(still_pending).unwrap_or(0);
            }
            for (seq, delay, error) in &grouped.retried {
                applied += diesel::update(pending().filter(m::seq.eq(seq)))
                    .set((
                        m::attempts.eq(m::attempts + 1),
                        m::last_error.eq(truncate_error(error)),
                        m::available_at.eq(now.saturating_add(micros(*delay))),
                    ))
                    .execute(conn)?;
            }
            for (seq, reason) in &grouped.parked {
                applied += park(conn, *seq, reason)?;
            }
            diesel::sql_query(
                "UPDATE outbox_relay_leases SET owner = NULL, expires_at = ? WHERE bucket = 0",
            )
            .bind::<BigInt, _>(RELEASED)
            .execute(conn)?;
            Ok(applied)
        })?;
        let applied = applied as u64;
        Ok(CompleteReport::new(
            applied,
            (completions.len() as u64).saturating_sub(applied),
        ))
    }

    fn purge_published_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
        // The immediate transaction is SQLite's only writer: no other purge can run alongside.
        self.immediate_transaction(|conn| {
            let deleted = diesel::sql_query(
                "DELETE FROM outbox_messages WHERE seq IN (\
                   SELECT seq FROM outbox_messages WHERE status = 1 AND published_at < ? \
                   ORDER BY published_at LIMIT ?)",
            )
            .bind::<BigInt, _>(now().saturating_sub(micros(older_than)))
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(conn)?;
            Ok(deleted as u64)
        })
    }

    fn requeue_parked_messages(
        &mut self,
        id: Option<MessageId>,
        partition_key: Option<&str>,
    ) -> Result<u64> {
        let mut update = diesel::update(m::table)
            .filter(m::status.eq(Status::Parked.code()))
            .into_boxed();
        if let Some(id) = id {
            update = update.filter(m::id.eq(id.as_bytes().to_vec()));
        }
        if let Some(key) = partition_key {
            update = update.filter(m::partition_key.eq(key.to_owned()));
        }
        let requeued = update
            .set((
                m::status.eq(Status::Pending.code()),
                m::attempts.eq(0),
                m::available_at.eq(now()),
            ))
            .execute(self)?;
        Ok(requeued as u64)
    }

    fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>> {
        let row: Option<Row> = m::table
            .filter(m::id.eq(id.as_bytes().as_slice()))
            .select(Row::as_select())
            .first(self)
            .optional()?;
        row.map(|row| RawRow::from(row).into_message()).transpose()
    }

    fn outbox_topic_stats(&mut self) -> Result<Vec<TopicStats>> {
        let rows: Vec<StatsRow> = diesel::sql_query(
            "SELECT topic, \
               sum(status = 0) AS pending, sum(status = 2) AS parked, sum(status = 1) AS published, \
               min(CASE WHEN status = 0 THEN created_at END) AS oldest_pending \
             FROM outbox_messages GROUP BY topic ORDER BY topic",
        )
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                TopicStats::new(
                    r.topic,
                    r.pending,
                    r.parked,
                    r.published,
                    r.oldest_pending.map(time),
                )
            })
            .collect())
    }
}

/// `expires_at` of a released lease.
const RELEASED: i64 = 0;

/// Parks one pending message; the caller holds the lease.
fn park(conn: &mut SqliteConnection, seq: i64, reason: &str) -> Result<usize> {
    Ok(diesel::update(
        m::table
            .filter(m::seq.eq(seq))
            .filter(m::status.eq(Status::Pending.code())),
    )
    .set((
        m::status.eq(Status::Parked.code()),
        m::attempts.eq(m::attempts + 1),
        m::last_error.eq(truncate_error(reason)),
    ))
    .execute(conn)?)
}
