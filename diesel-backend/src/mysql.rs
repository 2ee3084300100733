//! MySQL 8 and MariaDB 10.6+: ids as `BINARY(16)`, headers as checked JSON text, times as
//! `DATETIME(6)` in UTC from the database clock. No `RETURNING`, so a claim selects, updates and
//! reads back inside its `READ COMMITTED` transaction.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Datetime, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention, Status,
};

use crate::common::{
    headers_from_text, id_from_bytes, into_messages, micros, truncate_error, Grouped, RawRow,
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
            lease_token -> Nullable<BigInt>,
            lease_owner -> Nullable<Varchar>,
        }
    }
}

use schema::outbox_messages as m;

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
}

#[derive(QueryableByName)]
struct SeqRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
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

/// See the PostgreSQL claim; binds: now, now, limit.
const DUE: &str = "
SELECT m.seq FROM outbox_messages m
LEFT JOIN (
    SELECT partition_key, MIN(seq) AS first_seq FROM outbox_messages
    WHERE (status = 0 AND available_at > ?) OR status = 2
    GROUP BY partition_key
) b ON b.partition_key = m.partition_key
WHERE m.status = 0 AND m.available_at <= ? AND (b.first_seq IS NULL OR m.seq < b.first_seq)
ORDER BY m.seq
LIMIT ?";

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

    fn run_outbox_migrations(&mut self) -> Result<()> {
        self.run_pending_migrations(MIGRATIONS)
            .map_err(Error::Migration)?;
        Ok(())
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
    ) -> Result<Claimed> {
        // Every statement of the claim must see what other claims committed before it took the
        // lock row, not a snapshot from before the wait.
        self.batch_execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")?;
        self.transaction(|conn| {
            diesel::sql_query(
                "UPDATE outbox_relay_locks SET token = token + 1, holder = ?, updated_at = UTC_TIMESTAMP(6) \
                 WHERE name = 'claim'",
            )
            .bind::<Text, _>(owner)
            .execute(conn)?;
            let TokenNow { token, now } = diesel::sql_query(
                "SELECT token, UTC_TIMESTAMP(6) AS now FROM outbox_relay_locks WHERE name = 'claim'",
            )
            .get_result(conn)?;
            let seqs: Vec<i64> = diesel::sql_query(DUE)
                .bind::<Datetime, _>(now)
                .bind::<Datetime, _>(now)
                .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
                .load::<SeqRow>(conn)?
                .into_iter()
                .map(|row| row.seq)
                .collect();
            if seqs.is_empty() {
                return Ok(Claimed::new(token, Vec::new()));
            }
            let lease_end = now + chrono::Duration::microseconds(micros(lease));
            diesel::update(m::table.filter(m::seq.eq_any(&seqs)))
                .set((m::available_at.eq(lease_end), m::lease_token.eq(token), m::lease_owner.eq(owner)))
                .execute(conn)?;
            let rows: Vec<Row> = m::table
                .filter(m::seq.eq_any(&seqs))
                .order(m::seq)
                .select(Row::as_select())
                .load(conn)?;
            let (messages, malformed) = into_messages(rows.into_iter().map(RawRow::from).collect());
            for (seq, reason) in &malformed {
                park(conn, token, *seq, reason)?;
            }
            Ok(Claimed::new(token, messages))
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
            // Shared with other completions, exclusive against claims (see the PostgreSQL side).
            diesel::sql_query(
                "SELECT token FROM outbox_relay_locks WHERE name = 'claim' LOCK IN SHARE MODE",
            )
            .execute(conn)?;
            let mut applied = 0;
            let owned = m::lease_token.eq(token);
            let unlease = || {
                (
                    m::lease_token.eq(None::<i64>),
                    m::lease_owner.eq(None::<String>),
                )
            };
            if !grouped.published.is_empty() {
                let target = m::table
                    .filter(m::seq.eq_any(&grouped.published))
                    .filter(owned);
                applied += match retention {
                    Retention::Delete => diesel::delete(target).execute(conn)?,
                    Retention::Keep(_) => diesel::update(target)
                        .set((
                            m::status.eq(Status::Published.code()),
                            m::published_at.eq(sql::<Nullable<Datetime>>("UTC_TIMESTAMP(6)")),
                            unlease(),
                        ))
                        .execute(conn)?,
                };
            }
            if !grouped.released.is_empty() {
                applied += diesel::update(
                    m::table
                        .filter(m::seq.eq_any(&grouped.released))
                        .filter(owned),
                )
                .set((m::available_at.eq(db_now()), unlease()))
                .execute(conn)?;
            }
            for (seq, delay, error) in &grouped.retried {
                applied += diesel::sql_query(
                    "UPDATE outbox_messages SET attempts = attempts + 1, last_error = ?, \
                       available_at = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)), \
                       lease_token = NULL, lease_owner = NULL \
                     WHERE seq = ? AND lease_token = ?",
                )
                .bind::<Text, _>(truncate_error(error))
                .bind::<BigInt, _>(micros(*delay))
                .bind::<BigInt, _>(seq)
                .bind::<BigInt, _>(token)
                .execute(conn)?;
            }
            for (seq, reason) in &grouped.parked {
                applied += park(conn, token, *seq, reason)?;
            }
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

fn park(conn: &mut MysqlConnection, token: LeaseToken, seq: i64, reason: &str) -> Result<usize> {
    Ok(diesel::update(
        m::table
            .filter(m::seq.eq(seq))
            .filter(m::lease_token.eq(token)),
    )
    .set((
        m::status.eq(Status::Parked.code()),
        m::attempts.eq(m::attempts + 1),
        m::last_error.eq(truncate_error(reason)),
        m::lease_token.eq(None::<i64>),
        m::lease_owner.eq(None::<String>),
    ))
    .execute(conn)?)
}
