//! MySQL 8 and MariaDB 10.6+: ids as `BINARY(16)`, headers as checked JSON text, times as
//! `DATETIME(6)` in UTC from the database clock. No `RETURNING`, so a claim selects, updates and
//! reads back inside its `READ COMMITTED` transaction.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Datetime, Nullable, SmallInt, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention, Status,
};

use crate::common::{
    choose, headers_from_text, id_from_bytes, into_messages, micros, truncate_error, Choice,
    Grouped, RawRow, WRITE_BACK_CHUNK,
};
use crate::error::duplicate_or;
use crate::{Error, OutboxConnection, Result, TopicStats};

/// The MySQL / MariaDB migrations, embedded.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

mod schema {
    diesel::table! {
        outbox_messages (seq) {
            seq -> BigInt,
            id -> Binary,
            topic -> Varchar,
            partition_key -> Varchar,
            message_type -> Varchar,
            content_type -> Varchar,
            payload -> Blob,
            headers -> Text,
            status -> SmallInt,
            attempts -> Integer,
            last_error -> Nullable<Text>,
            available_at -> Datetime,
            created_at -> Datetime,
            published_at -> Nullable<Datetime>,
            bucket -> SmallInt,
        }
    }

    diesel::table! {
        outbox_relay_leases (bucket) {
            bucket -> SmallInt,
            token -> BigInt,
            owner -> Nullable<Varchar>,
            expires_at -> Datetime,
        }
    }

    diesel::table! {
        outbox_relays (owner) {
            owner -> Varchar,
            seen_at -> Datetime,
        }
    }
}

use schema::outbox_messages as m;
use schema::outbox_relay_leases as leases;
use schema::outbox_relays as relays;

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
    // `None` takes the column default: the database clock.
    available_at: Option<NaiveDateTime>,
}

#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = m, check_for_backend(diesel::mysql::Mysql))]
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
    available_at: NaiveDateTime,
    created_at: NaiveDateTime,
    published_at: Option<NaiveDateTime>,
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
            available_at: row.available_at.and_utc(),
            created_at: row.created_at.and_utc(),
            published_at: row.published_at.map(|t| t.and_utc()),
        }
    }
}

#[derive(QueryableByName)]
struct TokenNow {
    #[diesel(sql_type = BigInt)]
    token: i64,
    #[diesel(sql_type = Datetime)]
    now: NaiveDateTime,
    /// Lease rows present: fewer than [`BUCKETS`] means some must be restored.
    #[diesel(sql_type = BigInt)]
    buckets: i64,
}

/// The number of key buckets, each with its row in `outbox_relay_leases`.
const BUCKETS: i16 = 64;

/// Restores missing lease rows (deleted by hand, or lost in a partial restore), released. A
/// bucket without its row could never be leased: claims would hand its messages out unleased,
/// to several relays at once, and their write-backs would be refused for ever. The caller
/// holds the claim row, so no other claim leases meanwhile.
fn restore_leases(conn: &mut MysqlConnection) -> Result<()> {
    let present: Vec<i16> = leases::table.select(leases::bucket).load(conn)?;
    let missing: Vec<_> = (0..BUCKETS)
        .filter(|bucket| !present.contains(bucket))
        .map(|bucket| leases::bucket.eq(bucket))
        .collect();
    if !missing.is_empty() {
        let restored = diesel::insert_into(leases::table)
            .values(&missing)
            .execute(conn)?;
        log::warn!("restored {restored} missing outbox lease rows");
    }
    Ok(())
}

#[derive(QueryableByName)]
struct CandidateRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = SmallInt)]
    bucket: i16,
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
    #[diesel(sql_type = Nullable<Datetime>)]
    oldest_pending: Option<NaiveDateTime>,
}

/// See the PostgreSQL claim; binds: now, start, now, now, limit.
const CANDIDATES: &str = "
SELECT m.seq, m.bucket FROM outbox_messages m
LEFT JOIN (
    SELECT partition_key, MIN(seq) AS first_seq FROM outbox_messages
    WHERE (status = 0 AND available_at > ?) OR status = 2
    GROUP BY partition_key
) b ON b.partition_key = m.partition_key
WHERE m.status = 0 AND m.seq >= ? AND m.available_at <= ?
  AND (b.first_seq IS NULL OR m.seq < b.first_seq)
  AND m.bucket NOT IN (SELECT bucket FROM outbox_relay_leases WHERE expires_at > ?)
ORDER BY m.seq
LIMIT ?";

/// Where the candidates' walk starts (see the PostgreSQL claim): 0 while no bucket is leased,
/// else the first pending message of a free bucket, one index probe per free bucket; `NULL`
/// when no free bucket has a pending message. Binds: now, now. (A separate statement: MariaDB
/// would not bound the walk's range by a subquery.)
const START: &str = "
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM outbox_relay_leases WHERE expires_at > ?) THEN 0
       ELSE (SELECT MIN((SELECT f.seq FROM outbox_messages f
                         WHERE f.status = 0 AND f.bucket = l.bucket ORDER BY f.seq LIMIT 1))
             FROM outbox_relay_leases l WHERE l.expires_at <= ?) END AS seq";

#[derive(QueryableByName)]
struct Start {
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
}

/// `expires_at` of a released lease.
fn released() -> NaiveDateTime {
    DateTime::UNIX_EPOCH.naive_utc()
}

/// How many relays claimed within the last lease period (this one included).
fn live_relays(
    conn: &mut MysqlConnection,
    owner: &str,
    now: NaiveDateTime,
    lease: chrono::Duration,
) -> Result<usize> {
    diesel::replace_into(relays::table)
        .values((relays::owner.eq(owner), relays::seen_at.eq(now)))
        .execute(conn)?;
    diesel::delete(relays::table.filter(relays::seen_at.lt(now - chrono::Duration::days(1))))
        .execute(conn)?;
    let count: i64 = relays::table
        .filter(relays::seen_at.gt(now - lease))
        .count()
        .get_result(conn)?;
    Ok(usize::try_from(count).unwrap_or(1).max(1))
}

/// The keys among `buckets` that are blocked from a position on: by their first message that
/// is not due yet or parked, and, when the claim's walk started at `walk_start` (above 0), by
/// their first pending message below it, which the walk skipped (see the claim).
fn blocked_keys(
    conn: &mut MysqlConnection,
    buckets: &[i16],
    now: NaiveDateTime,
    walk_start: i64,
) -> Result<std::collections::HashMap<String, i64>> {
    let mut blocked = std::collections::HashMap::new();
    let mut block = |rows: Vec<(String, Option<i64>)>| {
        for (key, first) in rows {
            if let Some(first) = first {
                let at = blocked.entry(key).or_insert(first);
                *at = (*at).min(first);
            }
        }
    };
    block(
        m::table
            .filter(m::bucket.eq_any(buckets))
            .filter(
                m::status
                    .eq(Status::Pending.code())
                    .and(m::available_at.gt(now))
                    .or(m::status.eq(Status::Parked.code())),
            )
            .group_by(m::partition_key)
            .select((m::partition_key, diesel::dsl::min(m::seq)))
            .load(conn)?,
    );
    if walk_start > 0 {
        block(
            m::table
                .filter(m::bucket.eq_any(buckets))
                .filter(m::status.eq(Status::Pending.code()))
                .filter(m::seq.lt(walk_start))
                .group_by(m::partition_key)
                .select((m::partition_key, diesel::dsl::min(m::seq)))
                .load(conn)?,
        );
    }
    Ok(blocked)
}

fn db_now() -> diesel::expression::SqlLiteral<Datetime> {
    sql::<Datetime>("UTC_TIMESTAMP(6)")
}

impl OutboxConnection for MysqlConnection {
    fn in_transaction(&mut self) -> Result<bool> {
        let status = AnsiTransactionManager::transaction_manager_status_mut(self);
        Ok(status.transaction_depth()?.is_some())
    }

    fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()> {
        let single = (messages.len() == 1).then(|| messages[0].id());
        let chunks = packet_chunks(self, messages)?;
        if chunks.len() > 1 && !self.in_transaction()? {
            return Err(Error::NotInTransaction(messages.len()));
        }
        for chunk in chunks {
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
                        available_at: msg.available_after().map(|at| at.naive_utc()),
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
        crate::sequence::draw_mysql(self, topic, partition_key, count)
    }

    fn set_sequence_epoch(&mut self, epoch: &str) -> Result<()> {
        diesel::sql_query("UPDATE outbox_sequence_epoch SET epoch = ? WHERE id = 1")
            .bind::<diesel::sql_types::Text, _>(epoch)
            .execute(self)?;
        Ok(())
    }

    fn run_outbox_migrations(&mut self) -> Result<Vec<String>> {
        // Several processes starting at once would race on diesel's migrations table: the
        // first runs them, the others wait (up to an hour) and find nothing left to do.
        diesel::sql_query("SELECT GET_LOCK('waybill_migrations', 3600)").execute(self)?;
        let migrated = self
            .run_pending_migrations(MIGRATIONS)
            .map_err(Error::Migration)
            .and_then(|applied| {
                crate::common::migration_names::<diesel::mysql::Mysql>(&MIGRATIONS, &applied)
            });
        diesel::sql_query("SELECT RELEASE_LOCK('waybill_migrations')").execute(self)?;
        migrated
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
        in_flight: usize,
    ) -> Result<Claimed> {
        // Every statement of the claim must see what other claims committed before it took the
        // lock row, not a snapshot from before the wait.
        self.batch_execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")?;
        self.transaction(|conn| {
            // The claim row serializes claims and hands out the fencing token.
            diesel::sql_query(
                "UPDATE outbox_relay_locks SET token = token + 1, holder = ?, updated_at = UTC_TIMESTAMP(6) \
                 WHERE name = 'claim'",
            )
            .bind::<Text, _>(owner)
            .execute(conn)?;
            let TokenNow {
                token,
                now,
                buckets: present,
            } = diesel::sql_query(
                "SELECT token, UTC_TIMESTAMP(6) AS now, \
                   (SELECT COUNT(*) FROM outbox_relay_leases) AS buckets \
                 FROM outbox_relay_locks WHERE name = 'claim'",
            )
            .get_result(conn)?;
            if present < i64::from(BUCKETS) {
                restore_leases(conn)?;
            }
            let lease = chrono::Duration::microseconds(micros(lease));
            // Each relay's share, split again among its own claims in flight.
            let relay_count = live_relays(conn, owner, now, lease)?.saturating_mul(1 + in_flight);
            let Start { seq: start } = diesel::sql_query(START)
                .bind::<Datetime, _>(now)
                .bind::<Datetime, _>(now)
                .get_result(conn)?;
            let Some(start) = start else {
                // Every bucket with work is leased.
                return Ok(Claimed::new(token, Vec::new()));
            };
            let candidates: Vec<CandidateRow> = diesel::sql_query(CANDIDATES)
                .bind::<Datetime, _>(now)
                .bind::<BigInt, _>(start)
                .bind::<Datetime, _>(now)
                .bind::<Datetime, _>(now)
                .bind::<BigInt, _>(
                    i64::try_from(limit.saturating_mul(relay_count)).unwrap_or(i64::MAX),
                )
                .load(conn)?;
            let order: Vec<i16> = candidates.iter().map(|c| c.bucket).collect();
            let Choice { keep, buckets } = choose(&order, relay_count, limit);
            if buckets.is_empty() {
                return Ok(Claimed::new(token, Vec::new()));
            }
            let seqs: Vec<i64> = candidates
                .iter()
                .zip(keep)
                .filter_map(|(c, take)| take.then_some(c.seq))
                .collect();
            let previous: Vec<(i16, NaiveDateTime)> = leases::table
                .filter(leases::bucket.eq_any(&buckets))
                .select((leases::bucket, leases::expires_at))
                .for_update()
                .load(conn)?;
            if previous.len() != buckets.len() {
                // Fail closed: a message of a bucket without its lease row would go out unleased.
                // (Restored above, so the rows were deleted while this claim ran.)
                let missing = buckets
                    .iter()
                    .copied()
                    .filter(|b| previous.iter().all(|(present, _)| present != b));
                return Err(Error::MissingLeaseRows(missing.collect()));
            }
            let takeovers = previous.iter().filter(|(_, at)| *at != released()).count();
            diesel::update(leases::table.filter(leases::bucket.eq_any(&buckets)))
                .set((
                    leases::token.eq(token),
                    leases::owner.eq(owner),
                    leases::expires_at.eq(now + lease),
                ))
                .execute(conn)?;
            // Read again now that the buckets are leased (see the PostgreSQL claim).
            // The walk started where `START` read, one statement earlier: a bucket leased then
            // may have been released since (its relay's write-back committed between the two
            // reads), and the walk skipped its messages below `start`. They block their keys,
            // or a later message of theirs would be published first.
            let blocked = blocked_keys(conn, &buckets, now, start)?;
            let rows: Vec<Row> = m::table
                .filter(m::seq.eq_any(&seqs))
                .filter(m::status.eq(Status::Pending.code()))
                .filter(m::available_at.le(now))
                .order(m::seq)
                .select(Row::as_select())
                .load(conn)?;
            let rows = rows
                .into_iter()
                .filter(|row| blocked.get(&row.partition_key).is_none_or(|&first| row.seq < first))
                .map(RawRow::from)
                .collect();
            let (messages, malformed) = into_messages(rows);
            for (seq, reason) in &malformed {
                park(conn, &buckets, *seq, reason)?;
            }
            if messages.is_empty() {
                // Nothing to publish, so no write-back will release the buckets: release them
                // now rather than hold the other keys in them until the lease expires.
                diesel::update(leases::table.filter(leases::token.eq(token)))
                    .set((
                        leases::owner.eq(None::<String>),
                        leases::expires_at.eq(released()),
                    ))
                    .execute(conn)?;
            }
            Ok(Claimed::new(token, messages).with_lease_takeovers(takeovers as u64))
        })
    }

    fn complete_outbox_messages(
        &mut self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport> {
        let grouped = Grouped::new(completions);
        let applied = self.transaction::<_, Error, _>(|conn| {
            // The buckets this claim still holds, locked until the writes below commit (see
            // the PostgreSQL side).
            let held: Vec<i16> = leases::table
                .filter(leases::token.eq(token))
                .select(leases::bucket)
                .for_update()
                .load(conn)?;
            if held.is_empty() {
                return Ok(0);
            }
            let mut applied = 0;
            let mine = || {
                m::table
                    .filter(m::bucket.eq_any(held.clone()))
                    .filter(m::status.eq(Status::Pending.code()))
            };
            for chunk in grouped.published.chunks(WRITE_BACK_CHUNK) {
                let target = mine().filter(m::seq.eq_any(chunk));
                applied += match retention {
                    Retention::Delete => diesel::delete(target).execute(conn)?,
                    Retention::Keep(_) => diesel::update(target)
                        .set((
                            m::status.eq(Status::Published.code()),
                            m::published_at.eq(sql::<Nullable<Datetime>>("UTC_TIMESTAMP(6)")),
                        ))
                        .execute(conn)?,
                };
            }
            for chunk in grouped.released.chunks(WRITE_BACK_CHUNK) {
                // Nothing to write: releasing the bucket hands them back.
                let still_mine: i64 = mine()
                    .filter(m::seq.eq_any(chunk))
                    .count()
                    .get_result(conn)?;
                applied += usize::try_from(still_mine).unwrap_or(0);
            }
            for (seq, delay, error) in &grouped.retried {
                applied += diesel::update(mine().filter(m::seq.eq(seq)))
                    .set((
                        m::attempts.eq(m::attempts + 1),
                        m::last_error.eq(truncate_error(error)),
                        m::available_at.eq(sql::<Datetime>("TIMESTAMPADD(MICROSECOND, ")
                            .bind::<BigInt, _>(micros(*delay))
                            .sql(", UTC_TIMESTAMP(6))")),
                    ))
                    .execute(conn)?;
            }
            for (seq, reason) in &grouped.parked {
                applied += park(conn, &held, *seq, reason)?;
            }
            diesel::update(leases::table.filter(leases::token.eq(token)))
                .set((
                    leases::owner.eq(None::<String>),
                    leases::expires_at.eq(released()),
                ))
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
        self.transaction(|conn| {
            let locked = diesel::sql_query(
                "SELECT token FROM outbox_relay_locks WHERE name = 'purge' FOR UPDATE SKIP LOCKED",
            )
            .execute(conn)?;
            if locked == 0 {
                return Ok(0);
            }
            let deleted = diesel::sql_query(
                "DELETE FROM outbox_messages WHERE status = 1 \
                 AND published_at < TIMESTAMPADD(MICROSECOND, -?, UTC_TIMESTAMP(6)) \
                 ORDER BY published_at LIMIT ?",
            )
            .bind::<BigInt, _>(micros(older_than))
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
                m::available_at.eq(db_now()),
            ))
            .execute(self)?;
        Ok(requeued as u64)
    }

    fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>> {
        let row: Option<Row> = m::table
            .filter(m::id.eq(id.as_bytes().to_vec()))
            .select(Row::as_select())
            .first(self)
            .optional()?;
        row.map(|row| RawRow::from(row).into_message()).transpose()
    }

    fn retire_outbox_relay(&mut self, owner: &str) -> Result<()> {
        diesel::delete(relays::table.filter(relays::owner.eq(owner))).execute(self)?;
        Ok(())
    }

    fn outbox_topic_stats(&mut self) -> Result<Vec<TopicStats>> {
        let rows: Vec<StatsRow> = diesel::sql_query(
            "SELECT topic, \
               CAST(SUM(status = 0) AS SIGNED) AS pending, CAST(SUM(status = 2) AS SIGNED) AS parked, \
               CAST(SUM(status = 1) AS SIGNED) AS published, \
               MIN(CASE WHEN status = 0 THEN created_at END) AS oldest_pending \
             FROM outbox_messages GROUP BY topic ORDER BY topic",
        )
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let oldest: Option<DateTime<Utc>> = r.oldest_pending.map(|t| t.and_utc());
                TopicStats::new(r.topic, r.pending, r.parked, r.published, oldest)
            })
            .collect())
    }
}

/// Bytes of a statement beyond its rows' values (SQL text, protocol headers): kept free of the
/// packet limit.
const PACKET_MARGIN: u64 = 64 * 1024;

/// Bytes a row takes beyond its values (length prefixes, type codes).
const ROW_OVERHEAD: u64 = 128;

/// Below this total size no server refuses a batch (MySQL's default `max_allowed_packet` is
/// 64 MiB, MariaDB's 16 MiB, the lowest either ships with 4 MiB), so the limit is not read.
const SMALL_BATCH: u64 = 1024 * 1024;

/// About how many bytes `message`'s row takes in an `INSERT`.
fn row_bytes(message: &NewOutboxMessage) -> u64 {
    // An upper bound of the headers' JSON: escaping turns a byte into at most six.
    let headers: usize = message
        .headers()
        .iter()
        .map(|(name, value)| 6 * (name.len() + value.len()) + 6)
        .sum();
    let text = message.topic().len()
        + message.partition_key().len()
        + message.message_type().len()
        + message.content_type().len();
    (message.payload().len() + headers + text + 16) as u64 + ROW_OVERHEAD
}

#[derive(QueryableByName)]
struct Packet {
    #[diesel(sql_type = BigInt)]
    packet: i64,
}

/// Splits `messages` into `INSERT`s that each fit the server's `max_allowed_packet` (read once,
/// and only for a batch large enough to matter) and hold at most `INSERT_CHUNK` rows. A
/// statement above the limit is not refused politely: the server drops the connection.
fn packet_chunks<'m>(
    conn: &mut MysqlConnection,
    messages: &'m [NewOutboxMessage],
) -> Result<Vec<&'m [NewOutboxMessage]>> {
    let sizes: Vec<u64> = messages.iter().map(row_bytes).collect();
    let total: u64 = sizes.iter().sum();
    if total <= SMALL_BATCH {
        return Ok(messages.chunks(crate::INSERT_CHUNK).collect());
    }
    let Packet { packet } =
        diesel::sql_query("SELECT CAST(@@max_allowed_packet AS SIGNED) AS packet")
            .get_result(conn)?;
    let limit = u64::try_from(packet).unwrap_or(0);
    let budget = limit.saturating_sub(PACKET_MARGIN);
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, (message, &size)) in messages.iter().zip(&sizes).enumerate() {
        if size > budget {
            return Err(Error::TooLargeForServer {
                id: message.id(),
                bytes: size,
                limit,
            });
        }
        if index > start && (bytes + size > budget || index - start == crate::INSERT_CHUNK) {
            chunks.push(&messages[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < messages.len() {
        chunks.push(&messages[start..]);
    }
    Ok(chunks)
}

/// Parks one message in a bucket the caller holds.
fn park(conn: &mut MysqlConnection, held: &[i16], seq: i64, reason: &str) -> Result<usize> {
    Ok(diesel::update(
        m::table
            .filter(m::seq.eq(seq))
            .filter(m::bucket.eq_any(held))
            .filter(m::status.eq(Status::Pending.code())),
    )
    .set((
        m::status.eq(Status::Parked.code()),
        m::attempts.eq(m::attempts + 1),
        m::last_error.eq(truncate_error(reason)),
    ))
    .execute(conn)?)
}
