//! PostgreSQL: native `uuid`, `jsonb` headers, `timestamptz`, the database clock, and
//! `LISTEN`/`NOTIFY` wake-ups.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::dsl::sql;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use uuid::Uuid;
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention, Status,
};

use crate::common::{into_messages, micros, truncate_error, Grouped, RawRow};
use crate::error::duplicate_or;
use crate::{Error, OutboxConnection, Result, TopicStats};

/// The PostgreSQL migrations, embedded.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The channel the insert trigger notifies.
const CHANNEL: &str = "waybill_outbox";

mod schema {
    diesel::table! {
        outbox_messages (seq) {
            seq -> Int8,
            id -> Uuid,
            topic -> Text,
            partition_key -> Text,
            message_type -> Text,
            content_type -> Text,
            payload -> Bytea,
            headers -> Jsonb,
            status -> Int2,
            attempts -> Int4,
            last_error -> Nullable<Text>,
            available_at -> Timestamptz,
            created_at -> Timestamptz,
            published_at -> Nullable<Timestamptz>,
            lease_token -> Nullable<Int8>,
            lease_owner -> Nullable<Text>,
        }
    }
}

use schema::outbox_messages as m;

#[derive(Insertable)]
#[diesel(table_name = m)]
struct NewRow<'a> {
    id: Uuid,
    topic: &'a str,
    partition_key: &'a str,
    message_type: &'a str,
    content_type: &'a str,
    payload: &'a [u8],
    headers: serde_json::Value,
    // `None` takes the column default: the database clock.
    available_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = m, check_for_backend(diesel::pg::Pg))]
struct Row {
    seq: i64,
    id: Uuid,
    topic: String,
    partition_key: String,
    message_type: String,
    content_type: String,
    payload: Vec<u8>,
    headers: serde_json::Value,
    status: i16,
    attempts: i32,
    last_error: Option<String>,
    available_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

impl From<Row> for RawRow {
    fn from(row: Row) -> Self {
        RawRow {
            seq: row.seq,
            id: Ok(MessageId::from(row.id)),
            topic: row.topic,
            partition_key: row.partition_key,
            message_type: row.message_type,
            content_type: row.content_type,
            payload: row.payload,
            headers: serde_json::from_value(row.headers)
                .map_err(|e| format!("headers are not a JSON string map: {e}")),
            status: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            available_at: row.available_at,
            created_at: row.created_at,
            published_at: row.published_at,
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
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest_pending: Option<DateTime<Utc>>,
}

/// Claims the due head of every unblocked key, in outbox order. A key is blocked from its first
/// message that is not due yet (delayed, backing off, leased by another relay) or parked.
/// Runs after taking the `claim` lock row, so claims never interleave.
const CLAIM: &str = "
WITH blocked AS (
    SELECT partition_key, min(seq) AS first_seq FROM outbox_messages
    WHERE (status = 0 AND available_at > statement_timestamp()) OR status = 2
    GROUP BY partition_key
), due AS (
    SELECT m.seq FROM outbox_messages m
    LEFT JOIN blocked b ON b.partition_key = m.partition_key
    WHERE m.status = 0 AND m.available_at <= statement_timestamp()
      AND (b.first_seq IS NULL OR m.seq < b.first_seq)
    ORDER BY m.seq
    LIMIT $1
)
UPDATE outbox_messages m
SET available_at = statement_timestamp() + $2 * interval '1 microsecond',
    lease_token = $3, lease_owner = $4
FROM due WHERE m.seq = due.seq
RETURNING m.seq, m.id, m.topic, m.partition_key, m.message_type, m.content_type, m.payload,
          m.headers, m.status, m.attempts, m.last_error, m.available_at, m.created_at,
          m.published_at";

fn headers_json(msg: &NewOutboxMessage) -> serde_json::Value {
    serde_json::Value::Object(
        msg.headers()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

impl OutboxConnection for PgConnection {
    fn in_transaction(&mut self) -> Result<bool> {
        let status = AnsiTransactionManager::transaction_manager_status_mut(self);
        Ok(status.transaction_depth()?.is_some())
    }

    fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()> {
        let single = (messages.len() == 1).then(|| messages[0].id());
        for chunk in messages.chunks(crate::INSERT_CHUNK) {
            let rows: Vec<NewRow<'_>> = chunk
                .iter()
                .map(|msg| NewRow {
                    id: *msg.id().as_uuid(),
                    topic: msg.topic(),
                    partition_key: msg.partition_key(),
                    message_type: msg.message_type(),
                    content_type: msg.content_type(),
                    payload: msg.payload(),
                    headers: headers_json(msg),
                    available_at: msg.available_after(),
                })
                .collect();
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
        self.transaction(|conn| {
            let Token { token } = diesel::sql_query(
                "UPDATE outbox_relay_locks SET token = token + 1, holder = $1, updated_at = now() \
                 WHERE name = 'claim' RETURNING token",
            )
            .bind::<Text, _>(owner)
            .get_result(conn)?;
            let rows: Vec<Row> = diesel::sql_query(CLAIM)
                .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind::<BigInt, _>(micros(lease))
                .bind::<BigInt, _>(token)
                .bind::<Text, _>(owner)
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
            // Shared with other completions, exclusive against claims: a claim never reads
            // the blocked keys while a completion is changing them.
            diesel::sql_query(
                "SELECT token FROM outbox_relay_locks WHERE name = 'claim' FOR SHARE",
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
                            m::published_at
                                .eq(sql::<Nullable<Timestamptz>>("statement_timestamp()")),
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
                .set((
                    m::available_at.eq(sql::<Timestamptz>("statement_timestamp()")),
                    unlease(),
                ))
                .execute(conn)?;
            }
            for (seq, delay, error) in &grouped.retried {
                applied += diesel::sql_query(
                    "UPDATE outbox_messages SET attempts = attempts + 1, last_error = $1, \
                       available_at = statement_timestamp() + $2 * interval '1 microsecond', \
                       lease_token = NULL, lease_owner = NULL \
                     WHERE seq = $3 AND lease_token = $4",
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
            completions.len() as u64 - applied.min(completions.len() as u64),
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
                "DELETE FROM outbox_messages WHERE seq IN (\
                   SELECT seq FROM outbox_messages WHERE status = 1 \
                   AND published_at < statement_timestamp() - $1 * interval '1 microsecond' \
                   ORDER BY published_at LIMIT $2)",
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
            update = update.filter(m::id.eq(*id.as_uuid()));
        }
        if let Some(key) = partition_key {
            update = update.filter(m::partition_key.eq(key.to_owned()));
        }
        let requeued = update
            .set((
                m::status.eq(Status::Pending.code()),
                m::attempts.eq(0),
                m::available_at.eq(sql::<Timestamptz>("statement_timestamp()")),
            ))
            .execute(self)?;
        Ok(requeued as u64)
    }

    fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>> {
        let row: Option<Row> = m::table
            .filter(m::id.eq(*id.as_uuid()))
            .select(Row::as_select())
            .first(self)
            .optional()?;
        row.map(|row| RawRow::from(row).into_message()).transpose()
    }

    fn outbox_topic_stats(&mut self) -> Result<Vec<TopicStats>> {
        let rows: Vec<StatsRow> = diesel::sql_query(
            "SELECT topic, \
               count(*) FILTER (WHERE status = 0) AS pending, \
               count(*) FILTER (WHERE status = 2) AS parked, \
               count(*) FILTER (WHERE status = 1) AS published, \
               min(created_at) FILTER (WHERE status = 0) AS oldest_pending \
             FROM outbox_messages GROUP BY topic ORDER BY topic",
        )
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| TopicStats::new(r.topic, r.pending, r.parked, r.published, r.oldest_pending))
            .collect())
    }

    fn listen_for_outbox(&mut self) -> Result<bool> {
        diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(self)?;
        Ok(true)
    }

    fn announce_outbox_idle(&mut self, idle: bool) -> Result<()> {
        diesel::sql_query(
            "UPDATE outbox_relay_locks SET token = $1, updated_at = now() WHERE name = 'wakeup'",
        )
        .bind::<BigInt, _>(i64::from(idle))
        .execute(self)?;
        Ok(())
    }

    fn outbox_notified(&mut self) -> Result<bool> {
        let mut notified = false;
        for notification in self.notifications_iter() {
            notification?;
            notified = true;
        }
        Ok(notified)
    }
}

fn park(conn: &mut PgConnection, token: LeaseToken, seq: i64, reason: &str) -> Result<usize> {
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
